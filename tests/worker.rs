//! The worker against real services: RabbitMQ and Redis on loopback, an in-process S3 server
//! (s3s-fs), the `r2f worker` binary with the tiny SD3 fixture model.

mod common;

use std::time::Duration;

use common::harness::*;
use serde_json::json;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_jobs_produce_events_images_and_results_in_s3() {
    let (names, s3, cfg) = s3_setup("valid").await;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(
        worker.wait_ready(T).await,
        "worker not ready: {}",
        worker.log()
    );
    let n = 3;
    for i in 0..n {
        broker.publish(&tiny_job(&format!("job-{i}"), 2)).await;
    }
    let results = broker.wait_results(n, T).await;
    assert_eq!(
        results.len(),
        n,
        "events: {:?}\nlog: {}",
        broker.events_seen,
        worker.log()
    );
    for r in &results {
        assert_eq!(r["status"], "succeeded", "{r}");
        let out = &r["outputs"][0];
        assert_eq!(out["width"], 64);
        assert_eq!(out["height"], 48);
        assert!(out["uri"]
            .as_str()
            .unwrap()
            .starts_with(&format!("s3://{}/out/", s3.bucket)));
        for stage in [
            "queue", "plan", "encode", "denoise", "decode", "upload", "total",
        ] {
            assert!(
                r["timings_ms"].get(stage).is_some(),
                "timing {stage} missing: {r}"
            );
        }
    }
    let keys = s3.keys();
    for i in 0..n {
        let png = s3.read(&format!("out/job-{i}/0.png"));
        assert_eq!(&png[1..4], b"PNG");
        let result: serde_json::Value =
            serde_json::from_slice(&s3.read(&format!("out/job-{i}/result.json"))).unwrap();
        assert_eq!(result["status"], "succeeded");
        let sha = result["outputs"][0]["sha256"].as_str().unwrap().to_string();
        use sha2::Digest;
        assert_eq!(sha, hex::encode(sha2::Sha256::digest(&png)));
        // result.json carries the image's own generation record, typed.
        let record = &result["outputs"][0]["metadata"];
        let (fields, marked) = r2f::image::read_metadata(&png).unwrap();
        assert!(marked);
        let in_image = r2f::generate::GenerationRecord::from_fields(&fields).unwrap();
        assert_eq!(serde_json::to_value(&in_image).unwrap(), *record);
        assert_eq!(record["model"], "tiny", "{record}");
        assert_eq!(record["width"], 64, "{record}");
        assert_eq!(
            record["weights_hash"].as_str().unwrap().len(),
            12,
            "{record}"
        );
    }
    assert_eq!(keys.len(), 2 * n, "{keys:?}");
    assert!(
        broker.events_seen.iter().any(|e| e.get("step").is_some()),
        "progress events expected"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broker.queue_len(&names.jobs).await, 0);
    let (_, metrics) = worker.http("/metrics").await.unwrap();
    assert!(
        metrics.contains(r#"r2f_jobs_total{mode="plain",model="tiny",status="succeeded"} 3"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"r2f_images_generated_total{model="tiny"} 3"#));
    // The broker URL's password never reaches the log.
    assert!(!worker.log().contains(":guest@"), "{}", worker.log());
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_are_dead_lettered_with_reasons_and_valid_ones_still_served() {
    let (names, _s3, cfg) = s3_setup("invalid").await;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    broker.publish(&tiny_job("ok-1", 1)).await;
    broker.publish_raw(b"{this is not json").await;
    let mut bad_params = tiny_job("bad-params", 2);
    bad_params["params"]["width"] = json!(50);
    broker.publish(&bad_params).await;
    let mut bad_plan = tiny_job("bad-plan", 2);
    bad_plan["mode"] = json!("r2f");
    bad_plan["plan"] =
        json!({"visual_detail_level": ["3", "4"], "r2f_prompt": [["a frog", "a hairy frog"]]});
    broker.publish(&bad_plan).await;
    broker.publish(&tiny_job("ok-2", 1)).await;

    let results = broker.wait_results(5, T).await;
    assert_eq!(
        results.len(),
        5,
        "{:?}\n{}",
        broker.events_seen,
        worker.log()
    );
    let status = |id: &str| {
        results
            .iter()
            .find(|r| r["id"] == id)
            .map(|r| r["status"].as_str().unwrap().to_string())
    };
    assert_eq!(status("ok-1").as_deref(), Some("succeeded"));
    assert_eq!(status("ok-2").as_deref(), Some("succeeded"));
    assert_eq!(status("bad-params").as_deref(), Some("rejected"));
    assert_eq!(status("bad-plan").as_deref(), Some("rejected"));
    let rejected_unparsable = results
        .iter()
        .filter(|r| r["status"] == "rejected" && r["id"] == "")
        .count();
    assert_eq!(rejected_unparsable, 1);
    for r in results.iter().filter(|r| r["status"] == "rejected") {
        assert_eq!(r["error"]["kind"], "invalid_job");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dead = broker.take_dead_letters().await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    let reason_of = |needle: &str| {
        dead.iter()
            .any(|(_, r, k)| r.contains(needle) && k == "invalid_job")
    };
    assert!(reason_of("not valid JSON"), "{dead:?}");
    assert!(reason_of("width must be a multiple of 16"), "{dead:?}");
    assert!(reason_of("invalid plan"), "{dead:?}");
    assert_eq!(broker.queue_len(&names.jobs).await, 0);
    assert!(worker.http("/healthz").await.unwrap().0 == 200);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_down_is_retried_then_succeeds_and_down_for_good_fails() {
    let names = Names::new(&unique("s3down"));
    let bucket = format!("b{}", uuid::Uuid::new_v4().simple());
    // S3 reachable only through a proxy that refuses connections at first.
    let s3 = S3Server::start(&bucket).await;
    let proxy = Proxy::start(&s3.addr.to_string()).await;
    proxy.set_refuse(true);
    let mut cfg = WorkerConfig::new(&names);
    cfg.s3_endpoint = Some(format!("http://{}", proxy.addr));
    cfg.bucket = bucket.clone();
    cfg.max_attempts = 3;
    cfg.retry_backoff_ms = 300;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());

    broker.publish(&tiny_job("comes-back", 1)).await;
    assert!(
        worker.wait_log("job will be retried", T).await,
        "{}",
        worker.log()
    );
    proxy.set_refuse(false);
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["status"], "succeeded", "{}", r[0]);
    assert!(r[0]["attempt"].as_u64().unwrap() >= 2, "{}", r[0]);
    assert!(s3
        .keys()
        .contains(&"out/comes-back/result.json".to_string()));

    proxy.set_refuse(true);
    proxy.cut_all();
    broker.publish(&tiny_job("never", 1)).await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["status"], "failed");
    assert_eq!(r[0]["error"]["kind"], "storage");
    assert_eq!(r[0]["attempt"], 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dead = broker.take_dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0["id"], "never");
    assert_eq!(dead[0].2, "storage");
    assert_eq!(broker.queue_len(&names.jobs).await, 0);
    // Nothing left waiting in any retry level (0: give-backs, 1..=3: after each attempt).
    for level in 0..=3 {
        let queue = format!("{}.{level}", names.retry);
        assert_eq!(broker.queue_len(&queue).await, 0, "{queue}");
    }
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_job_completes_it_exactly_once_after_restart() {
    let (names, s3, cfg) = s3_setup("kill").await;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    broker.publish(&tiny_job("killed", 120)).await;
    // Mid-job: after the first progress event.
    let p = broker
        .wait_event(T, |v, rk| {
            rk == format!("job.progress.{}", v["id"].as_str().unwrap_or("")) && v["id"] == "killed"
        })
        .await;
    assert!(p.is_some(), "{}", worker.log());
    worker.signal(libc::SIGKILL);
    worker.wait_exit(T).await.expect("killed");
    assert!(
        s3.keys().is_empty(),
        "nothing stored before the kill: {:?}",
        s3.keys()
    );

    let mut worker2 = WorkerProc::spawn(&cfg);
    assert!(worker2.wait_ready(T).await, "{}", worker2.log());
    let r = broker.wait_results(1, Duration::from_secs(120)).await;
    assert_eq!(r.len(), 1, "{}", worker2.log());
    assert_eq!(r[0]["status"], "succeeded");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        s3.keys(),
        vec!["out/killed/0.png", "out/killed/result.json"]
    );
    // No second result: the job ran once to completion.
    assert!(broker
        .wait_results(1, Duration::from_secs(2))
        .await
        .is_empty());
    assert_eq!(broker.queue_len(&names.jobs).await, 0);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_finished_job_is_republished_not_generated_again() {
    let (names, s3, cfg) = s3_setup("idem").await;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    broker.publish(&tiny_job("twice", 1)).await;
    let first = broker.wait_results(1, T).await;
    assert_eq!(first[0]["status"], "succeeded");
    let png_before = s3.read("out/twice/0.png");
    let modified = std::fs::metadata(s3.root.path().join(&s3.bucket).join("out/twice/0.png"))
        .unwrap()
        .modified()
        .unwrap();
    broker.publish(&tiny_job("twice", 1)).await;
    let second = broker.wait_results(1, T).await;
    assert_eq!(
        second[0], first[0],
        "the stored result is re-published as is"
    );
    assert!(worker.wait_log("re-publishing the stored result", T).await);
    let modified_after = std::fs::metadata(s3.root.path().join(&s3.bucket).join("out/twice/0.png"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(modified, modified_after);
    assert_eq!(png_before, s3.read("out/twice/0.png"));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_job_finishes_it_acks_and_exits_zero() {
    let (names, s3, cfg) = s3_setup("term").await;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    broker.publish(&tiny_job("in-hand", 60)).await;
    broker.publish(&tiny_job("next", 1)).await;
    let p = broker
        .wait_event(T, |v, rk| {
            rk == format!("job.progress.{}", v["id"].as_str().unwrap_or("")) && v["id"] == "in-hand"
        })
        .await;
    assert!(p.is_some(), "{}", worker.log());
    worker.signal(libc::SIGTERM);
    let status = worker
        .wait_exit(Duration::from_secs(120))
        .await
        .expect("exits");
    assert!(status.success(), "exit status {status:?}\n{}", worker.log());
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["id"], "in-hand");
    assert_eq!(r[0]["status"], "succeeded");
    assert!(s3.keys().contains(&"out/in-hand/result.json".to_string()));
    assert!(!s3.keys().iter().any(|k| k.contains("next")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        broker.queue_len(&names.jobs).await,
        1,
        "the next job stays queued"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connection_dropped_idle_and_busy_recovers() {
    let (names, s3, mut cfg) = s3_setup("drop").await;
    let proxy = Proxy::start(AMQP_ADDR).await;
    cfg.amqp_url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());

    // Idle.
    proxy.cut_all();
    assert!(
        worker.wait_log("broker connection lost", T).await,
        "{}",
        worker.log()
    );
    assert!(
        worker.wait_log("broker connection re-established", T).await,
        "{}",
        worker.log()
    );
    broker.publish(&tiny_job("after-idle-drop", 1)).await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["status"], "succeeded");

    // Busy: cut while a job is being generated.
    broker.publish(&tiny_job("busy-drop", 60)).await;
    let p = broker
        .wait_event(T, |v, rk| {
            rk == format!("job.progress.{}", v["id"].as_str().unwrap_or(""))
                && v["id"] == "busy-drop"
        })
        .await;
    assert!(p.is_some());
    proxy.cut_all();
    let r = broker.wait_results(1, Duration::from_secs(120)).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["id"], "busy-drop");
    assert_eq!(r[0]["status"], "succeeded");
    broker.publish(&tiny_job("later", 1)).await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["id"], "later");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(broker.queue_len(&names.jobs).await, 0);
    let busy: Vec<String> = s3
        .keys()
        .into_iter()
        .filter(|k| k.contains("busy-drop"))
        .collect();
    assert_eq!(
        busy,
        vec!["out/busy-drop/0.png", "out/busy-drop/result.json"]
    );
    let (_, metrics) = worker.http("/metrics").await.unwrap();
    assert!(
        !metrics.contains("r2f_amqp_reconnects_total 0"),
        "{metrics}"
    );
    broker.cleanup().await;
}

/// Every metric docs/contract.md names.
const CONTRACT_METRICS: &[&str] = &[
    "r2f_jobs_total",
    "r2f_job_stage_seconds",
    "r2f_denoise_step_seconds",
    "r2f_plan_cache_requests_total",
    "r2f_llm_requests_total",
    "r2f_llm_request_seconds",
    "r2f_jobs_in_progress",
    "r2f_images_generated_total",
    "r2f_model_load_seconds",
    "r2f_gpu_memory_allocated_bytes",
    "r2f_dead_lettered_total",
    "r2f_jobs_routed_total",
    "r2f_webhook_deliveries_total",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_model_and_metrics_carry_every_contract_name() {
    let (names, _s3, cfg) = s3_setup("ready").await;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    // The HTTP endpoints come up before the model: not ready, but live.
    let mut saw_not_ready = false;
    let deadline = std::time::Instant::now() + T;
    while std::time::Instant::now() < deadline {
        match worker.http("/readyz").await {
            Some((503, body)) => {
                saw_not_ready = true;
                assert!(body.contains("loading"));
                assert_eq!(worker.http("/healthz").await.unwrap().0, 200);
                break;
            }
            Some((200, _)) => break,
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    assert!(
        saw_not_ready,
        "/readyz answered ready before the model was loaded"
    );
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    broker.publish(&tiny_job("one", 1)).await;
    assert_eq!(broker.wait_results(1, T).await.len(), 1);
    let (_, text) = worker.http("/metrics").await.unwrap();
    let names_exported = exported_names(&text);
    for m in CONTRACT_METRICS {
        assert!(names_exported.contains(*m), "{m} not exported:\n{text}");
    }
    // Process metrics for the OOM runbook (resident memory, CPU, open files).
    for m in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(names_exported.contains(m), "{m} not exported:\n{text}");
    }
    // Every r2f_ metric the dashboard and the alert rules use is exported.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut used = std::collections::BTreeSet::new();
    for file in ["dashboards/r2f.json", "dashboards/alerts.yml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        used.extend(metric_names_in(&text));
    }
    assert!(
        used.len() >= 8,
        "too few metric names found in the ops files: {used:?}"
    );
    for name in &used {
        // The gateway's own metrics come from `r2f gateway` (tests/gateway.rs checks them).
        if name.starts_with("r2f_gateway_") {
            continue;
        }
        assert!(
            names_exported.contains(name),
            "{name} (used by dashboards/rules) is not exported"
        );
    }
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_over_each_limit_are_rejected_naming_the_limit() {
    let (names, _s3, mut cfg) = s3_setup("limits").await;
    cfg.extra = "[limits]\nmax_prompt_chars = 50\nmax_steps = 10\nmax_pixels = 4096\nmax_images_per_job = 2\nmax_message_bytes = 2000\n".into();
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let mut cases = Vec::new();
    let mut j = tiny_job("long-prompt", 1);
    j["prompt"] = json!("a".repeat(51));
    cases.push((j, "max_prompt_chars"));
    cases.push((tiny_job("many-steps", 11), "max_steps"));
    let mut j = tiny_job("big-image", 1);
    j["params"]["width"] = json!(128);
    j["params"]["height"] = json!(64);
    cases.push((j, "max_pixels"));
    let mut j = tiny_job("many-images", 1);
    j["params"]["num_images"] = json!(3);
    cases.push((j, "max_images_per_job"));
    let mut j = tiny_job("big-message", 1);
    j["padding"] = json!("x".repeat(3000));
    cases.push((j, "max_message_bytes"));
    for (job, _) in &cases {
        broker.publish(job).await;
    }
    let results = broker.wait_results(cases.len(), T).await;
    assert_eq!(results.len(), cases.len(), "{}", worker.log());
    for (job, limit) in &cases {
        let r = results
            .iter()
            .find(|r| r["id"] == job["id"])
            .expect("event per job");
        assert_eq!(r["status"], "rejected");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(limit),
            "{} should name {limit}: {msg}",
            job["id"]
        );
    }
    let dead = broker.take_dead_letters().await;
    assert_eq!(dead.len(), cases.len());
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_password_never_appears_in_logs() {
    let names = Names::new(&unique("secret"));
    let mut cfg = WorkerConfig::new(&names);
    let dir = tempfile::tempdir().unwrap();
    cfg.local_dir = Some(dir.path().to_path_buf());
    // Nothing listens there: the worker logs its connection failures.
    cfg.amqp_url = format!("amqp://r2f:s3cr3t-pw@127.0.0.1:{}/%2f", free_port());
    let worker = WorkerProc::spawn(&cfg);
    assert!(
        worker.wait_log("broker unavailable", T).await,
        "{}",
        worker.log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = worker.log();
    assert!(!log.contains("s3cr3t-pw"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_publishes_with_confirms_and_reports_refused_lines() {
    let names = Names::new(&unique("enqueue"));
    let broker = Broker::connect(&names).await;
    let cfg = WorkerConfig::new(&names);
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut file, cfg.toml().as_bytes()).unwrap();
    let jobs = tempfile::NamedTempFile::new().unwrap();
    let lines = [
        tiny_job("e-1", 1).to_string(),
        "{not json".to_string(),
        json!({"prompt": "no id"}).to_string(),
        String::new(),
        tiny_job("e-2", 1).to_string(),
    ];
    std::fs::write(jobs.path(), lines.join("\n")).unwrap();
    let (cfg_path, jobs_path) = (file.path().to_path_buf(), jobs.path().to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_r2f"))
            .args(["enqueue", "--config"])
            .arg(&cfg_path)
            .arg(&jobs_path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "refused lines make the exit status non-zero"
    );
    assert!(stdout.contains("2 published"), "{stdout}");
    assert!(
        stderr.contains("line 2") && stderr.contains("line 3"),
        "{stderr}"
    );
    assert_eq!(broker.queue_len(&names.jobs).await, 2);
    // Accepted jobs are `queued` from then on, by r2f-enqueue, before any worker runs.
    let out = status_cli(file.path(), &["status", "e-1"]);
    assert!(out.status.success(), "{out:?}");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["state"], "queued", "{st}");
    assert_eq!(st["worker"], "r2f-enqueue");
    // Another job under a claimed id is refused before publishing; the same job again is not.
    let mut other = tiny_job("e-1", 1);
    other["prompt"] = json!("another prompt");
    std::fs::write(
        jobs.path(),
        [other.to_string(), tiny_job("e-2", 1).to_string()].join("\n"),
    )
    .unwrap();
    let (cfg_path, jobs_path) = (file.path().to_path_buf(), jobs.path().to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_r2f"))
            .args(["enqueue", "--config"])
            .arg(&cfg_path)
            .arg(&jobs_path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(
        stderr.contains("line 1") && stderr.contains("duplicate_id"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 published"));
    assert_eq!(broker.queue_len(&names.jobs).await, 3);
    broker.cleanup().await;
}

/// `r2f status|wait ID` with the worker's own configuration file.
fn status_cli(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_r2f"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_leaves_a_status_record_that_status_and_wait_read() {
    let (names, _s3, cfg) = s3_setup("status").await;
    let mut config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut config, cfg.toml().as_bytes()).unwrap();
    let config = config.into_temp_path();
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let ok = format!("{}-ok", names.prefix);
    let bad = format!("{}-bad", names.prefix);
    broker.publish(&tiny_job(&ok, 2)).await;
    let mut bad_job = tiny_job(&bad, 2);
    bad_job["params"]["width"] = json!(50);
    broker.publish(&bad_job).await;
    // `wait` blocks until the job is finished: exit 0 for the succeeded one.
    let (c, id) = (config.to_path_buf(), ok.clone());
    let waited =
        tokio::task::spawn_blocking(move || status_cli(&c, &["wait", &id, "--timeout", "90"]))
            .await
            .unwrap();
    assert!(
        waited.status.success(),
        "{}",
        String::from_utf8_lossy(&waited.stderr)
    );
    let record: serde_json::Value = serde_json::from_slice(&waited.stdout).unwrap();
    assert_eq!(record["state"], "succeeded", "{record}");
    let states: Vec<&str> = record["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["running", "succeeded"], "{record}");
    assert_eq!(
        record["result"]["outputs"].as_array().unwrap().len(),
        1,
        "{record}"
    );
    broker.wait_results(2, T).await;
    // The rejected one: `status` shows it with its reason, `wait` fails on it.
    let out = status_cli(&config, &["status", &bad]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["state"], "rejected", "{record}");
    assert!(
        record["result"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("multiple of 16"),
        "{record}"
    );
    let out = status_cli(&config, &["wait", &bad, "--timeout", "5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rejected"));
    // A job nobody took: no record, a clear error, and `wait` gives up after its timeout.
    let none = format!("{}-none", names.prefix);
    let out = status_cli(&config, &["status", &none]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no status"));
    let out = status_cli(&config, &["wait", &none, "--timeout", "0.5"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not finished"));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_not_started_before_its_expires_at_ends_expired() {
    let (names, s3, cfg) = s3_setup("expires").await;
    let mut broker = Broker::connect(&names).await;
    let mut past = tiny_job("too-late", 1);
    past["expires_at"] = json!("2020-01-01T00:00:00Z");
    let mut future = tiny_job("in-time", 1);
    future["expires_at"] = json!("2999-01-01T00:00:00+02:00");
    let mut bad = tiny_job("bad-time", 1);
    bad["expires_at"] = json!("tomorrow");
    for j in [&past, &future, &bad] {
        broker.publish(j).await;
    }
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let r = broker.wait_results(3, T).await;
    assert_eq!(r.len(), 3, "{}", worker.log());
    let by_id = |id: &str| r.iter().find(|e| e["id"] == id).unwrap().clone();
    let late = by_id("too-late");
    assert_eq!(late["status"], "expired", "{late}");
    assert_eq!(late["error"]["kind"], "expired", "{late}");
    assert_eq!(by_id("in-time")["status"], "succeeded");
    let bad = by_id("bad-time");
    assert_eq!(bad["status"], "rejected", "{bad}");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expires_at"),
        "{bad}"
    );
    assert!(!s3.keys().iter().any(|k| k.starts_with("out/too-late/0")));
    let stored: serde_json::Value =
        serde_json::from_slice(&s3.read("out/too-late/result.json")).unwrap();
    assert_eq!(stored["status"], "expired");
    let st = job_status(&names, "too-late").await.unwrap();
    assert_eq!(st.state, r2f::job::JobState::Expired, "{st:?}");
    broker.cleanup().await;
}
