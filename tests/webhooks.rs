//! Webhooks a receiver can trust, against the example receiver (`examples/python/
//! webhook_receiver.py`, which verifies with the PyPI `standardwebhooks` library): every
//! delivery verifies, under either of two secrets while one rotates; one `webhook-id` per
//! (job, event) across a 503, a redelivery of the job and a worker killed between its ack and the
//! delivery; a listed name that resolves to a refused address is never called; a receiver that
//! never answers does not hold up another's deliveries.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::harness::*;

const T: Duration = Duration::from_secs(90);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Two Standard Webhooks secrets (`whsec_` + base64 of 24 random bytes).
fn secrets() -> (String, String) {
    use base64::Engine;
    let one = || {
        let bytes: Vec<u8> = (0..24).map(|_| rand::random::<u8>()).collect();
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    };
    (one(), one())
}

/// The example receiver as a child process, its JSON lines collected.
struct Receiver {
    child: Child,
    port: u16,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    fn start(secrets: &[&str], fail_first: u32) -> Self {
        Self::start_on("127.0.0.1", secrets, fail_first)
    }

    fn start_on(host: &str, secrets: &[&str], fail_first: u32) -> Self {
        let py = common::venv_python();
        assert!(py.exists(), "no {} (run scripts/setup.sh)", py.display());
        let port = free_port();
        let mut cmd = Command::new(py);
        cmd.arg(root().join("examples/python/webhook_receiver.py"))
            .args(["--host", host, "--port", &port.to_string()])
            .args(["--fail-first", &fail_first.to_string()]);
        for s in secrets {
            cmd.args(["--secret", s]);
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let lines: Arc<Mutex<Vec<Value>>> = Arc::default();
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        let r = Self { child, port, lines };
        r.wait(Duration::from_secs(20), |l| {
            l.iter().any(|v| v.get("listening").is_some())
        });
        r
    }

    fn deliveries(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v.get("webhook_id").is_some())
            .cloned()
            .collect()
    }

    /// Waits until `pred` holds for the lines so far; panics past `timeout`.
    fn wait(&self, timeout: Duration, pred: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !pred(&self.lines.lock().unwrap()) {
            assert!(
                Instant::now() < deadline,
                "receiver: {:?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A multi-tenant worker config whose tenant `acme` (the broker user guest) may call loopback
/// receivers on `ports`, signing with `secrets`.
fn config(names: &Names, dir: &std::path::Path, secrets: &[&str], ports: &[u16]) -> WorkerConfig {
    let mut files = Vec::new();
    for (i, s) in secrets.iter().enumerate() {
        let f = dir.join(format!("whsec-{i}"));
        std::fs::write(&f, s).unwrap();
        files.push(format!("\"{}\"", f.display()));
    }
    let mut cfg = WorkerConfig::new(names);
    cfg.local_dir = Some(dir.join("storage"));
    let ports: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
    cfg.extra = format!(
        "[tenancy]\nmode = \"multi\"\n[tenants.acme]\nusers = [\"guest\"]\nwebhook_secret_files = [{}]\nwebhook_allowed_hosts = [\"127.0.0.1\", \"localhost\"]\nwebhook_allowed_ports = [{}]\nwebhook_allowed_networks = [\"127.0.0.0/8\", \"::1/128\"]\n[webhook]\nallow_http = true\nretry_min_ms = 300\ntimeout_secs = 2\nmax_per_host = 2\nmax_in_flight = 16\n",
        files.join(", "),
        ports.join(", ")
    );
    cfg
}

/// Publishes a job as guest (tenant acme) with a webhook to `url` for `events`.
async fn publish(broker: &Broker, id: &str, url: &str, events: Option<Value>) {
    let mut j = tiny_job(id, 2);
    j["output"] = json!({"webhook": {"url": url}});
    if let Some(e) = events {
        j["output"]["webhook"]["events"] = e;
    }
    broker_publish_as_guest(broker, &j).await;
}

async fn broker_publish_as_guest(broker: &Broker, j: &Value) {
    use lapin::options::BasicPublishOptions;
    let props = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_user_id("guest".into());
    let c = broker
        .ch
        .basic_publish(
            broker.names.route.as_str().into(),
            "tiny".into(),
            BasicPublishOptions::default(),
            j.to_string().as_bytes(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(c.is_ack());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_delivery_verifies_under_either_secret_with_one_id_per_event() {
    let (a, b) = secrets();
    // Two receivers, each knowing one of the two secrets (a rotation: both are signed).
    let only_a = Receiver::start(&[&a], 1);
    let only_b = Receiver::start(&[&b], 0);
    let names = Names::new(&unique("whook"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&names, dir.path(), &[&a, &b], &[only_a.port, only_b.port]);
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let p = &names.prefix;
    let (one, two) = (format!("{p}-one"), format!("{p}-two"));
    // One: a 503 first (retried under the same id), started and progress events asked for too.
    publish(
        &broker,
        &one,
        &format!("http://127.0.0.1:{}/hook", only_a.port),
        Some(json!(["started", "succeeded"])),
    )
    .await;
    publish(
        &broker,
        &two,
        &format!("http://localhost:{}/hook", only_b.port),
        None,
    )
    .await;
    let results = broker.wait_results(2, T).await;
    assert_eq!(results.len(), 2, "{}", worker.log());
    only_a.wait(T, |l| {
        l.iter()
            .filter(|v| v["type"] == "job.succeeded" && v["status"] == 200)
            .count()
            == 1
    });
    only_b.wait(T, |l| l.iter().any(|v| v["type"] == "job.succeeded"));
    for d in only_a.deliveries().iter().chain(&only_b.deliveries()) {
        assert_eq!(d["verified"], true, "{d}");
    }
    let a_seen = only_a.deliveries();
    let succeeded: Vec<&Value> = a_seen
        .iter()
        .filter(|v| v["type"] == "job.succeeded")
        .collect();
    assert_eq!(succeeded.len(), 2, "a 503, then a 200: {a_seen:?}");
    assert_eq!(succeeded[0]["status"], 503);
    assert_eq!(succeeded[0]["webhook_id"], succeeded[1]["webhook_id"]);
    assert!(
        a_seen.iter().any(|v| v["type"] == "job.started"),
        "{a_seen:?}"
    );

    // The same job delivered again: its stored result is published again, and its webhook
    // arrives under the same id (the receiver sees a duplicate).
    publish(
        &broker,
        &one,
        &format!("http://127.0.0.1:{}/hook", only_a.port),
        Some(json!(["started", "succeeded"])),
    )
    .await;
    only_a.wait(T, |l| {
        l.iter()
            .filter(|v| v["type"] == "job.succeeded" && v["status"] == 200)
            .count()
            == 2
    });
    let again: Vec<Value> = only_a
        .deliveries()
        .into_iter()
        .filter(|v| v["type"] == "job.succeeded")
        .collect();
    assert!(again
        .iter()
        .all(|v| v["webhook_id"] == succeeded[0]["webhook_id"]));
    assert_eq!(again.last().unwrap()["duplicate"], true);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_before_delivering_loses_no_delivery() {
    let (a, _) = secrets();
    // Three 503s: the delivery waits in the outbox's retry queue when the worker dies.
    let receiver = Receiver::start(&[&a], 3);
    let names = Names::new(&unique("whkill"));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&names, dir.path(), &[&a], &[receiver.port]);
    cfg.extra = cfg
        .extra
        .replace("retry_min_ms = 300", "retry_min_ms = 1500");
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let id = format!("{}-k", names.prefix);
    publish(
        &broker,
        &id,
        &format!("http://127.0.0.1:{}/hook", receiver.port),
        None,
    )
    .await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r[0]["status"], "succeeded", "{}", worker.log());
    // The job is acked; its delivery failed once and waits: kill -9.
    receiver.wait(T, |l| l.iter().any(|v| v["status"] == 503));
    worker.signal(libc::SIGKILL);
    let _ = worker.wait_exit(Duration::from_secs(10)).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    receiver.wait(T, |l| l.iter().any(|v| v["status"] == 200));
    let seen = receiver.deliveries();
    assert!(seen.len() >= 4, "{seen:?}");
    assert!(seen
        .iter()
        .all(|v| v["webhook_id"] == seen[0]["webhook_id"] && v["verified"] == true));
    assert!(seen.iter().all(|v| v["job"] == id.as_str()));
    drop(worker);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_addresses_are_never_called_and_a_silent_receiver_holds_up_no_other() {
    let (a, _) = secrets();
    let fast = Receiver::start_on("127.0.0.3", &[&a], 0);
    // A receiver that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    {
        let held = held.clone();
        std::thread::spawn(move || {
            for s in silent.incoming().map_while(Result::ok) {
                held.lock().unwrap().push(s);
            }
        });
    }
    let names = Names::new(&unique("whpol"));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&names, dir.path(), &[&a], &[fast.port, silent_port]);
    // `localhost` is listed, but the tenant's networks leave out 127.0.0.1 and ::1: the name
    // resolves to refused addresses only. The receivers are reached by their IP literals,
    // allowed explicitly.
    cfg.extra = cfg
        .extra
        .replace(
            "[\"127.0.0.0/8\", \"::1/128\"]",
            "[\"127.0.0.2/32\", \"127.0.0.3/32\"]",
        )
        .replace(
            "[\"127.0.0.1\", \"localhost\"]",
            "[\"127.0.0.2\", \"127.0.0.3\", \"localhost\"]",
        );
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let p = &names.prefix;
    // Many deliveries to the silent receiver, then one to the fast one.
    for i in 0..8 {
        publish(
            &broker,
            &format!("{p}-silent-{i}"),
            &format!("http://127.0.0.2:{silent_port}/"),
            None,
        )
        .await;
    }
    let refused = format!("{p}-refused");
    publish(
        &broker,
        &refused,
        &format!("http://localhost:{}/hook", fast.port),
        None,
    )
    .await;
    let quick = format!("{p}-quick");
    publish(
        &broker,
        &quick,
        &format!("http://127.0.0.3:{}/hook", fast.port),
        None,
    )
    .await;
    let results = broker.wait_results(10, T).await;
    assert_eq!(results.len(), 10, "{}", worker.log());
    let quick_done = Instant::now();
    // The quick one arrives within about one retry interval of its job's end (the silent one
    // holds two slots for its host, never the others').
    fast.wait(Duration::from_secs(5), |l| {
        l.iter().any(|v| v["job"] == quick.as_str())
    });
    let waited = quick_done.elapsed();
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
    // The refused one is never called; it is given up with why.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!fast
        .deliveries()
        .iter()
        .any(|v| v["job"] == refused.as_str()));
    let dead = dead_webhooks(&broker, &names).await;
    assert!(
        dead.iter().any(
            |(d, why)| d["body"].as_str().unwrap_or("").contains(&refused)
                && why.contains("refused")
        ),
        "{dead:?}"
    );
    assert!(
        !held.lock().unwrap().is_empty(),
        "the silent receiver was called"
    );
    drop(worker);
    broker.cleanup().await;
}

/// The deliveries given up, with their last answer.
async fn dead_webhooks(broker: &Broker, names: &Names) -> Vec<(Value, String)> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let mut out = Vec::new();
    let queue = format!("{}.dead", names.webhooks);
    while let Ok(Some(m)) = broker
        .ch
        .basic_get(queue.as_str().into(), BasicGetOptions::default())
        .await
    {
        let why = m
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-r2f-last-answer").cloned())
            .map(|v| match v {
                lapin::types::AMQPValue::LongString(s) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        out.push((serde_json::from_slice(&m.data).unwrap_or_default(), why));
        let _ = m.ack(BasicAckOptions::default()).await;
    }
    out
}
