//! `r2f replay`: jobs that failed during a storage outage are selected from the dead-letter
//! queue, published again without their attempt and routing headers and with their stored
//! failure cleared, and succeed exactly once (real RabbitMQ, Redis and S3).

mod common;

use std::process::Command;
use std::time::Duration;

use common::harness::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn replay(cfg: &WorkerConfig, args: &[&str]) -> std::process::Output {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut file, cfg.toml().as_bytes()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_r2f"))
        .arg("replay")
        .arg("--config")
        .arg(file.path())
        .args(args)
        .env("AWS_ACCESS_KEY_ID", S3_KEY)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_failed_during_a_storage_outage_are_replayed_and_succeed_once() {
    let (names, s3, proxy, mut cfg) = s3_behind_proxy("replay").await;
    cfg.max_attempts = 2;
    cfg.storage_retry_budget_secs = 1;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    // The store goes away; three jobs fail (two attempts each) and are dead-lettered.
    proxy.set_refuse(true);
    proxy.cut_all();
    let ids = ["outage-1", "outage-2", "outage-3"];
    for id in ids {
        broker.publish(&tiny_job(id, 1)).await;
    }
    let failed = broker.wait_results(3, Duration::from_secs(120)).await;
    assert_eq!(failed.len(), 3, "{}", worker.log());
    for r in &failed {
        assert_eq!(r["status"], "failed", "{r}");
    }
    // And an unrelated dead letter the selection must leave alone: a job rejected as invalid.
    broker
        .publish(&serde_json::json!({"id": "invalid-1", "prompt": "x", "model": "tiny", "params": {"steps": 0}}))
        .await;
    let rejected = broker.wait_results(1, T).await;
    assert_eq!(rejected[0]["status"], "rejected", "{}", rejected[0]);
    // The store is back.
    proxy.set_refuse(false);
    assert_eq!(broker.queue_len(&names.dead).await, 4);
    // A stored failure would be published again instead of running the job: one job has one.
    let stored_failure = failed.iter().find(|r| r["id"] == "outage-3").unwrap();
    std::fs::create_dir_all(s3.root.path().join(&s3.bucket).join("out/outage-3")).unwrap();
    std::fs::write(
        s3.root
            .path()
            .join(&s3.bucket)
            .join("out/outage-3/result.json"),
        stored_failure.to_string(),
    )
    .unwrap();

    // Dry run: says what it would do, changes nothing.
    let o = replay(&cfg, &["--status", "failed", "--reason", "storing"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(out.matches("would replay").count(), 3, "{out}");
    assert!(!out.contains("invalid-1"), "{out}");
    assert!(out.contains("dry run: 3 of 4"), "{out}");
    assert_eq!(broker.queue_len(&names.dead).await, 4);

    let o = replay(
        &cfg,
        &["--status", "failed", "--reason", "storing", "--apply"],
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("3 replayed, 0 not, of 3 selected"), "{out}");
    // The three run again from their first attempt and succeed; the rejected one stays.
    let done = broker.wait_results(3, Duration::from_secs(120)).await;
    assert_eq!(done.len(), 3, "{}", worker.log());
    let mut seen: Vec<&str> = done.iter().map(|r| r["id"].as_str().unwrap()).collect();
    seen.sort();
    assert_eq!(seen, ids);
    for r in &done {
        assert_eq!(r["status"], "succeeded", "{r}\n{}", worker.log());
        assert_eq!(r["attempt"], 1, "{r}");
    }
    for id in ids {
        assert!(
            s3.keys().contains(&format!("out/{id}/0.png")),
            "{:?}",
            s3.keys()
        );
        let stored: Value =
            serde_json::from_slice(&s3.read(&format!("out/{id}/result.json"))).unwrap();
        assert_eq!(stored["status"], "succeeded", "{stored}");
        let st = job_status(&names, id).await.unwrap();
        assert_eq!(st.state, r2f::job::JobState::Succeeded, "{st:?}");
    }
    // Exactly once: nothing more comes, and only the rejected job is dead.
    assert!(broker
        .wait_results(1, Duration::from_secs(2))
        .await
        .is_empty());
    let dead = broker.take_dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0["id"], "invalid-1");
    broker.cleanup().await;
}
