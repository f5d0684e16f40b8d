//! `r2f enqueue` checks every line with the workers' validation before it touches the broker:
//! a line a worker would reject is refused with its line number and reason, even with no broker
//! at all, and its exit status (65) differs from a broker failure's (69).

use std::process::{Command, Output};

use serde_json::json;

/// A configuration whose broker does not exist (a closed port on this machine).
fn config_without_broker(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("r2f.toml");
    std::fs::write(
        &path,
        "[amqp]\nurl = \"amqp://guest:guest@127.0.0.1:9/%2f\"\nreconnect_min_ms = 10\n",
    )
    .unwrap();
    path
}

fn enqueue(config: &std::path::Path, lines: &[String], extra: &[&str]) -> Output {
    let dir = config.parent().unwrap();
    let file = dir.join("jobs.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_r2f"))
        .args(["enqueue", "--config"])
        .arg(config)
        .arg(&file)
        .args(extra)
        .output()
        .unwrap()
}

fn valid(id: &str) -> String {
    json!({"id": id, "prompt": "a hairy frog", "model": "sd3", "mode": "plain",
           "params": {"steps": 4, "width": 512, "height": 512}})
    .to_string()
}

/// The jobs the issue saw "published": every worker rejects them.
fn invalid() -> Vec<(String, &'static str)> {
    vec![
        (
            json!({"id": "w", "prompt": "p", "params": {"width": 1000}}).to_string(),
            "width must be a multiple of 16 between 16 and 8192 (got 1000)",
        ),
        (
            json!({"id": "s", "prompt": "p", "params": {"steps": 5000}}).to_string(),
            "steps must be between 1 and 200 (got 5000; max_steps)",
        ),
        (
            json!({"id": "m", "prompt": "p", "mode": "sideways"}).to_string(),
            "mode: unknown mode `sideways` (expected r2f, r2fplus or plain)",
        ),
        (
            json!({"id": "", "prompt": ""}).to_string(),
            "invalid job id",
        ),
        ("{not json".to_string(), "not valid JSON"),
        (
            json!({"id": "x", "prompt": "p", "model": "sd9"}).to_string(),
            "unknown model `sd9`",
        ),
    ]
}

#[test]
fn invalid_lines_are_refused_without_a_broker_with_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_without_broker(dir.path());
    let cases = invalid();
    let lines: Vec<String> = cases.iter().map(|(l, _)| l.clone()).collect();
    let out = enqueue(&config, &lines, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    for (i, (_, reason)) in cases.iter().enumerate() {
        let want = format!("line {}: not published: ", i + 1);
        let line = stderr
            .lines()
            .find(|l| l.starts_with(&want))
            .unwrap_or_else(|| panic!("no refusal of line {}: {stderr}", i + 1));
        assert!(line.contains(reason), "`{line}` should say `{reason}`");
    }
    // Nothing valid: the broker was never contacted.
    assert!(!stderr.contains("broker"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 published"));
}

#[test]
fn a_broker_failure_has_an_exit_status_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_without_broker(dir.path());
    let out = enqueue(&config, &[valid("ok-1")], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("error: broker"), "{stderr}");
}

#[test]
fn check_validates_every_line_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_without_broker(dir.path());
    let mut lines = vec![valid("ok-1"), String::new(), valid("ok-2")];
    let out = enqueue(&config, &lines, &["--check"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 valid, 0 refused"));
    lines.push(invalid().remove(0).0);
    let out = enqueue(&config, &lines, &["--check"]);
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 4: not published: width"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 valid, 1 refused"));
}

#[test]
fn no_validate_lets_through_what_only_a_worker_would_reject() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_without_broker(dir.path());
    // A width no worker takes goes to the broker unvalidated (which is not there: 69), but a
    // line without an id is still refused.
    let (bad, _) = invalid().remove(0);
    let out = enqueue(&config, &[bad], &["--no-validate"]);
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let out = enqueue(
        &config,
        &["{\"prompt\": \"no id\"}".into()],
        &["--no-validate"],
    );
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1: not published: no string `id`"));
}
