//! The client examples (`examples/python`, `examples/typescript`) run against the local
//! RabbitMQ and a tiny-model worker, talking to nothing but the broker: each submits a job and
//! gets its result, and cancels a running job through the control exchange. `scripts/setup.sh` installs what they need (their one-line setups).

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use common::harness::*;

const T: Duration = Duration::from_secs(120);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn client_args(names: &Names, steps: u32, cancel: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "--jobs-exchange",
        &names.route,
        "--events-exchange",
        &names.events,
        "--control-exchange",
        &names.control,
        "--model",
        "tiny",
        "--prompt",
        "a hairy frog warrior",
        "--steps",
        &steps.to_string(),
        "--width",
        "64",
        "--height",
        "48",
        "--timeout",
        "120",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if cancel {
        args.push("--cancel-after-progress".into());
    }
    args
}

/// One JSON object per line of the client's output.
fn lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn result_of(out: &Output) -> serde_json::Value {
    lines(out)
        .into_iter()
        .find_map(|v| v.get("result").cloned())
        .unwrap_or_else(|| {
            panic!(
                "no result line:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

async fn run_client(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("the example runs"))
        .await
        .unwrap()
}

async fn check_client(name: &str, make: impl Fn(Vec<String>) -> Command) {
    let names = Names::new(&unique(name));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WorkerConfig::new(&names);
    cfg.local_dir = Some(dir.path().to_path_buf());
    cfg.worker_extra = "cancel_poll_ms = 100".into();
    cfg.extra = "[limits]\nmax_steps = 1000000".into();
    let broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());

    // Submit, follow, wait: exit 0, the succeeded event, progress seen on the way.
    let out = run_client(make(client_args(&names, 3, false))).await;
    assert!(
        out.status.success(),
        "{name}:\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    let ev = result_of(&out);
    assert_eq!(ev["status"], "succeeded", "{ev}");
    assert_eq!(ev["outputs"].as_array().unwrap().len(), 1);
    assert!(lines(&out).iter().any(|v| v.get("progress").is_some()));

    // Cancel a long job once it runs: the result is `cancelled` and the client exits 1.
    let out = run_client(make(client_args(&names, 1_000_000, true))).await;
    let ev = result_of(&out);
    assert_eq!(ev["status"], "cancelled", "{ev}\n{}", worker.log());
    assert_eq!(out.status.code(), Some(1));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_submits_follows_waits_and_cancels() {
    let py = common::venv_python();
    assert!(py.exists(), "no {} (run scripts/setup.sh)", py.display());
    check_client("expy", |args| {
        let mut c = Command::new(&py);
        c.arg(root().join("examples/python/client.py")).args(args);
        c
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typescript_client_submits_follows_waits_and_cancels() {
    let dir = root().join("examples/typescript");
    let tsx = dir.join("node_modules/.bin/tsx");
    assert!(
        tsx.exists(),
        "no {} (run scripts/setup.sh, or npm ci --prefix examples/typescript)",
        tsx.display()
    );
    check_client("exts", |args| {
        let mut c = Command::new(&tsx);
        c.arg(dir.join("client.ts")).args(args);
        c
    })
    .await;
}

/// The TypeScript webhook receiver verifies a delivery signed the way the worker signs it
/// (the `standardwebhooks` crate) with the npm `standardwebhooks` library, and refuses one whose
/// body was changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typescript_webhook_receiver_verifies_signed_deliveries() {
    use std::io::{BufRead, BufReader};
    let dir = root().join("examples/typescript");
    let tsx = dir.join("node_modules/.bin/tsx");
    assert!(tsx.exists(), "no {} (run scripts/setup.sh)", tsx.display());
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let port = free_port();
    // tsx runs node as its child: a process group of its own, killed whole at the end.
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(&tsx)
        .arg(dir.join("webhook-receiver.ts"))
        .args(["--port", &port.to_string(), "--secret", secret])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    struct Group(i32);
    impl Drop for Group {
        fn drop(&mut self) {
            // SAFETY: signals the process group this test made.
            unsafe { libc::kill(-self.0, libc::SIGKILL) };
        }
    }
    let _group = Group(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the receiver listens");
    assert!(first.get("listening").is_some(), "{first}");
    let body =
        r#"{"type":"job.succeeded","timestamp":"2026-12-07T00:00:00.000Z","data":{"id":"j-1"}}"#;
    let ts = chrono::Utc::now().timestamp();
    let sig = standardwebhooks::Webhook::new(secret)
        .unwrap()
        .sign("msg_1", ts, body.as_bytes())
        .unwrap();
    let client = reqwest::Client::new();
    let post = |body: &'static str| {
        client
            .post(format!("http://127.0.0.1:{port}/"))
            .header("webhook-id", "msg_1")
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", &sig)
            .body(body)
            .send()
    };
    assert_eq!(post(body).await.unwrap().status().as_u16(), 200);
    let line = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(line["verified"], true, "{line}");
    assert_eq!(line["job"], "j-1", "{line}");
    let tampered =
        r#"{"type":"job.succeeded","timestamp":"2026-12-07T00:00:00.000Z","data":{"id":"j-2"}}"#;
    assert_eq!(post(tampered).await.unwrap().status().as_u16(), 401);
    let line = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(line["verified"], false, "{line}");
    drop(_group);
    let _ = child.wait();
}
