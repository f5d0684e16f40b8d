//! A broker memory alarm (`connection.blocked`) turns a worker's `/readyz` to 503 and
//! `r2f_broker_blocked` to 1, and back once it clears; the worker then takes jobs again. The
//! alarm is raised on the real local RabbitMQ with `rabbitmqctl set_vm_memory_high_watermark`
//! and the earlier watermark is restored by a guard even when the test fails. This file holds
//! one test so that no other test runs under the alarm.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::harness::*;

const T: Duration = Duration::from_secs(60);

/// Restores the broker's memory watermark when dropped.
struct Watermark(String);

impl Watermark {
    /// Reads the current watermark and sets `value`.
    fn set(value: &str) -> Self {
        let out = Command::new("rabbitmqctl")
            .args(["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
            .output()
            .expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let before = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("0.4")
            .trim()
            .to_string();
        let guard = Self(before);
        rabbitmqctl_watermark(value);
        guard
    }
}

impl Drop for Watermark {
    fn drop(&mut self) {
        rabbitmqctl_watermark(&self.0);
    }
}

/// `rabbitmqctl set_vm_memory_high_watermark` with a relative value or `{absolute,N}` as the
/// broker prints it.
fn rabbitmqctl_watermark(value: &str) {
    let mut cmd = Command::new("rabbitmqctl");
    cmd.arg("set_vm_memory_high_watermark");
    match value
        .strip_prefix("{absolute,")
        .and_then(|v| v.strip_suffix('}'))
    {
        Some(n) => cmd.args(["absolute", n]),
        None => cmd.arg(value),
    };
    let out = cmd.output().expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "set_vm_memory_high_watermark {value}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn wait_readyz(worker: &WorkerProc, want: u16) -> Option<String> {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        if let Some((status, body)) = worker.http("/readyz").await {
            if status == want {
                return Some(body);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_turns_readyz_to_503_and_back() {
    let (names, s3, cfg) = s3_setup("alarm").await;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    {
        let _alarm = Watermark::set("0.0001");
        let body = wait_readyz(&worker, 503).await;
        assert!(
            body.as_deref()
                .is_some_and(|b| b.contains("blocks publishing")),
            "{body:?}\n{}",
            worker.log()
        );
        assert_eq!(metric(&worker, "r2f_broker_blocked ").await, 1.0);
        assert!(worker.log().contains("the broker blocks publishing"));
    }
    // The guard restored the watermark: ready again, and jobs run.
    assert!(
        wait_readyz(&worker, 200).await.is_some(),
        "{}",
        worker.log()
    );
    assert_eq!(metric(&worker, "r2f_broker_blocked ").await, 0.0);
    broker.publish(&tiny_job("after-alarm", 1)).await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["status"], "succeeded", "{}", r[0]);
    assert!(s3.keys().contains(&"out/after-alarm/0.png".to_string()));
    broker.cleanup().await;
}
