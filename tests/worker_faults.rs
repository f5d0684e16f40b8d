//! The worker under hostile messages and sick dependencies, on the real RabbitMQ and Redis and
//! an in-process S3: each test names the defect it guards against (issue #10).

mod common;

use std::time::Duration;

use common::fake_llm::{FakeLlm, Reply};
use common::harness::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// Defect 1: a job id of 256 bytes or more made the `rejected` event's AMQP message id panic,
/// so every worker that took the message crashed, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_byte_id_is_rejected_and_the_worker_lives_on() {
    let (names, _s3, cfg) = s3_setup("longid").await;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    broker.publish(&tiny_job(&"x".repeat(300), 1)).await;
    let mut nested = tiny_job("nested", 1);
    nested["id"] = json!({"deep": ["x".repeat(300)]});
    broker.publish(&nested).await;
    broker.publish(&tiny_job("after-long-id", 1)).await;
    let results = broker.wait_results(3, T).await;
    assert_eq!(results.len(), 3, "{}", worker.log());
    assert_eq!(
        results.iter().filter(|r| r["status"] == "rejected").count(),
        2,
        "{results:?}"
    );
    let ok = results.iter().find(|r| r["id"] == "after-long-id").unwrap();
    assert_eq!(ok["status"], "succeeded", "{ok}");
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "the worker died"
    );
    let dead = broker.take_dead_letters().await;
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|d| d.1.contains("invalid job")), "{dead:?}");
    broker.cleanup().await;
}

/// Defect 11: sizes the model cannot draw, an R2F+ plan in an `r2f` job and a pixel limit
/// broken with one side given came out `failed` (kind model) after work; they are rejected
/// before any work now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_and_plans_the_model_cannot_run_are_rejected_not_failed() {
    let (names, _s3, mut cfg) = s3_setup("caps").await;
    cfg.extra = "[limits]\nmax_pixels = 65536\nmax_plan_prompts = 3\n".into();
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let mut cases = Vec::new();
    // The tiny model's positional table is far smaller than 4096 pixels a side.
    let mut j = tiny_job("too-wide", 1);
    j["params"]["width"] = json!(4096);
    j["params"]["height"] = json!(16);
    cases.push((j, "larger than this model draws"));
    // One side given: the other takes the model's default, and the product is checked.
    let mut j = tiny_job("one-side", 1);
    j["params"]["width"] = json!(8192);
    j["params"].as_object_mut().unwrap().remove("height");
    cases.push((j, "max_pixels"));
    let mut j = tiny_job("regions-in-r2f", 1);
    j["mode"] = json!("r2f");
    j["plan"] = json!({"original_prompt": "a frog and a cat", "base_prompt": "a frog and a cat",
        "objects": {"#1": {"prompt": "a frog", "object": "frog", "r2f": ["an animal", "a frog"],
                            "visual_detail_levels": ["3"], "bbox": [0.0, 0.0, 0.5, 0.5]}}});
    cases.push((j, "R2F+"));
    let mut j = tiny_job("long-plan", 1);
    j["mode"] = json!("r2f");
    j["plan"] =
        json!({"visual_detail_level": ["1", "2", "3"], "r2f_prompt": [["a", "b", "c", "d"]]});
    cases.push((j, "max_plan_prompts"));
    for (job, _) in &cases {
        broker.publish(job).await;
    }
    let results = broker.wait_results(cases.len(), T).await;
    assert_eq!(results.len(), cases.len(), "{}", worker.log());
    for (job, want) in &cases {
        let r = results.iter().find(|r| r["id"] == job["id"]).unwrap();
        assert_eq!(r["status"], "rejected", "{r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(want),
            "{}: `{msg}` should say `{want}`",
            job["id"]
        );
    }
    assert!(!worker.log().contains("job succeeded"));
    broker.cleanup().await;
}

/// Defect 4: an LLM that refuses the worker's key (401) failed every job at once and emptied
/// the queue into the dead letters. Now the jobs are given back untouched and the worker
/// pauses (readiness fails) after a few such failures in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_llm_refuses_it_pauses_and_keeps_the_backlog() {
    let llm = FakeLlm::start().await;
    llm.set_default(Some(Reply::Status(401)));
    let names = Names::new(&unique("sick"));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WorkerConfig::new(&names);
    cfg.local_dir = Some(dir.path().to_path_buf());
    cfg.extra = llm.config(2);
    cfg.pause_min_secs = 6;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    for i in 0..6 {
        let mut j = tiny_job(&format!("needs-plan-{i}"), 1);
        j["mode"] = json!("r2f");
        broker.publish(&j).await;
    }
    assert!(
        worker.wait_log("pausing consumption", T).await,
        "{}",
        worker.log()
    );
    let mut readyz = None;
    for _ in 0..100 {
        readyz = worker.http("/readyz").await;
        if matches!(&readyz, Some((503, _))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(readyz, Some((503, "paused after failures".to_string())));
    assert_eq!(metric(&worker, "r2f_worker_paused ").await, 1.0);
    // Nothing was consumed: no terminal event, no dead letter, all six jobs still queued.
    let seen = broker.wait_results(1, Duration::from_secs(2)).await;
    assert!(seen.is_empty(), "{seen:?}");
    assert!(broker.take_dead_letters().await.is_empty());
    assert_eq!(broker.queued_anywhere().await, 6, "{}", worker.log());
    // The LLM is fixed: the worker resumes after its pause and every job succeeds.
    llm.set_default(None);
    let results = broker.wait_results(6, T).await;
    assert_eq!(results.len(), 6, "{}", worker.log());
    assert!(
        results.iter().all(|r| r["status"] == "succeeded"),
        "{results:?}"
    );
    assert!(results.iter().all(|r| r["attempt"] == 1), "{results:?}");
    broker.cleanup().await;
}

/// Defect 5: an upload failure sent the job through the retry queue and the GPU generated it
/// again. Now the encoded images are kept and the upload retried in-process: a short outage
/// costs no attempt and no second generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_during_upload_costs_no_attempt_and_no_regeneration() {
    let (names, s3, proxy, mut cfg) = s3_behind_proxy("upload").await;
    cfg.storage_retry_budget_secs = 30;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    broker.publish(&tiny_job("through-outage", 150)).await;
    // Generation has started (the result.json lookup is done): S3 goes away for 3 s.
    let progress = broker
        .wait_event(T, |v, rk| {
            rk == format!("job.progress.{}", v["id"].as_str().unwrap_or(""))
                && v["id"] == "through-outage"
        })
        .await;
    assert!(progress.is_some(), "{}", worker.log());
    proxy.set_refuse(true);
    proxy.cut_all();
    assert!(
        worker.wait_log("upload failed; retrying", T).await,
        "{}",
        worker.log()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set_refuse(false);
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["status"], "succeeded", "{}", r[0]);
    assert_eq!(r[0]["attempt"], 1, "{}", r[0]);
    assert_eq!(worker.log().matches("job received").count(), 1);
    assert!(metric(&worker, "r2f_storage_retries_total").await >= 1.0);
    assert!(s3.keys().contains(&"out/through-outage/0.png".to_string()));
    broker.cleanup().await;
}

/// Defect 7: with Redis down the job ran without its lock. Now taking the lock is a step that
/// can fail: the job is retried and, Redis staying down, fails without generating anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_for_the_lock_is_a_transient_failure_not_an_unlocked_run() {
    let (names, s3, mut cfg) = s3_setup("nolock").await;
    cfg.pause_min_secs = 1;
    cfg.redis_url = format!("redis://127.0.0.1:{}", free_port());
    cfg.max_attempts = 2;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    broker.publish(&tiny_job("unlockable", 1)).await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["status"], "failed", "{}", r[0]);
    assert_eq!(r[0]["attempt"], 2, "{}", r[0]);
    assert!(!worker.log().contains("job succeeded"));
    assert!(
        !s3.keys().iter().any(|k| k.ends_with(".png")),
        "{:?}",
        s3.keys()
    );
    broker.cleanup().await;
}

/// Defect 8: a message that kills whoever takes it was counted only with Redis and after
/// validation. Now each unsettled delivery is counted on the message itself: after
/// `max_attempts` of them it is dead-lettered with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_workers_keep_dying_is_dead_lettered_after_max_attempts() {
    let (names, s3, mut cfg) = s3_setup("poison").await;
    cfg.max_attempts = 3;
    let mut broker = Broker::connect(&names).await;
    broker.publish(&tiny_job("kills-workers", 200)).await;
    // Three workers take it and die holding it; the fourth dead-letters it before any work.
    let mut logs = String::new();
    for round in 0..4 {
        let mut worker = WorkerProc::spawn(&cfg);
        assert!(worker.wait_ready(T).await, "{}", worker.log());
        if round < 3 {
            // Generating (the dead worker's lock may first postpone it for its TTL).
            assert!(worker.wait_log("generating", T).await, "{}", worker.log());
            // Mid-job, with the worker's earlier acks on the wire.
            tokio::time::sleep(Duration::from_millis(500)).await;
            worker.signal(libc::SIGKILL);
            worker.wait_exit(T).await;
            logs.push_str(&worker.log());
        } else {
            let r = broker.wait_results(1, T).await;
            assert_eq!(r.len(), 1, "{}", worker.log());
            assert_eq!(
                r[0]["status"],
                "failed",
                "{}\n{logs}\n{}",
                r[0],
                worker.log()
            );
            assert_eq!(r[0]["id"], "kills-workers");
            let msg = r[0]["error"]["message"].as_str().unwrap();
            assert!(msg.contains("delivered 3 times"), "{msg}");
            assert!(!worker.log().contains("job received"), "{}", worker.log());
        }
    }
    // A kill between a republish and its ack can leave a second copy (at-least-once): every
    // copy ends dead-lettered with the reason, none is generated to the end.
    let dead = broker.take_dead_letters().await;
    assert!(!dead.is_empty());
    for d in &dead {
        assert_eq!(d.0["id"], "kills-workers", "{dead:?}");
        assert!(d.1.contains("without finishing"), "{dead:?}");
    }
    assert!(!s3.keys().iter().any(|k| k.ends_with(".png")));
    // Its status record and its stored result say what became of it.
    let st = job_status(&names, "kills-workers")
        .await
        .expect("a status record");
    assert_eq!(st.state, r2f::job::JobState::Failed, "{st:?}");
    assert!(
        st.reason
            .as_deref()
            .unwrap_or("")
            .contains("delivered 3 times"),
        "{st:?}"
    );
    let stored: Value = serde_json::from_slice(&s3.read("out/kills-workers/result.json")).unwrap();
    assert_eq!(stored["status"], "failed", "{stored}");
    assert!(
        stored["error"]["message"]
            .as_str()
            .unwrap()
            .contains("delivered 3 times"),
        "{stored}"
    );
    broker.cleanup().await;
}

/// Defect 13: a failed job that was redelivered (or sent again) was worked again. Its failed
/// result is stored now, and published again instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_sent_again_publishes_its_stored_failure() {
    let llm = FakeLlm::start().await;
    // Unusable answers: the job fails by its own fault (the planner cannot plan this prompt).
    llm.set_default(Some(Reply::Answer("I cannot help with that.".into())));
    let names = Names::new(&unique("failonce"));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WorkerConfig::new(&names);
    cfg.local_dir = Some(dir.path().to_path_buf());
    cfg.extra = llm.config(1);
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let mut j = tiny_job("fails-once", 1);
    j["mode"] = json!("r2f");
    broker.publish(&j).await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["status"], "failed", "{}", r[0]);
    let calls = llm.calls();
    broker.publish(&j).await;
    let again = broker.wait_results(1, T).await;
    assert_eq!(again.len(), 1, "{}", worker.log());
    assert_eq!(again[0], r[0], "the stored failure is published again");
    assert_eq!(llm.calls(), calls, "the job was not planned again");
    assert_eq!(broker.take_dead_letters().await.len(), 1);
    broker.cleanup().await;
}

/// Defect 13: internal error text (paths, hosts) stays in the logs; clients get a short
/// reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failures_reach_clients_as_a_short_reason() {
    let (names, _s3, proxy, mut cfg) = s3_behind_proxy("short").await;
    cfg.max_attempts = 1;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    proxy.set_refuse(true);
    proxy.cut_all();
    broker.publish(&tiny_job("no-store", 1)).await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["status"], "failed", "{}", r[0]);
    assert_eq!(r[0]["error"]["message"], "storing the images failed");
    assert!(
        worker.wait_log("S3 GET of", T).await,
        "the detail is logged"
    );
    broker.cleanup().await;
}

/// Defect 13: a prompt with newlines cannot forge log lines in the text log format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_cannot_forge_log_lines() {
    let (names, _s3, cfg) = s3_setup("forge").await;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let forged = "\n2026-11-30T00:00:00Z  INFO job succeeded job_id=fake";
    let mut j = tiny_job("forger", 1);
    j["prompt"] = json!(format!("a frog{forged}"));
    broker.publish(&j).await;
    // Text of a message that ends up in a rejection reason.
    let mut j = tiny_job("forger-2", 1);
    j["mode"] = json!(format!("r2f{forged}"));
    broker.publish(&j).await;
    assert_eq!(broker.wait_results(2, T).await.len(), 2);
    assert!(
        !worker
            .log()
            .lines()
            .any(|l| l.starts_with("2026-11-30T00:00:00Z")),
        "{}",
        worker.log()
    );
    broker.cleanup().await;
}

/// A TCP server that accepts connections, reads, and never answers.
async fn black_hole() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (addr, task)
}

/// Defect 3: the S3 client had no timeouts: a store that accepts connections and never
/// answers held the job (and the GPU slot) forever. Now every call is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_that_never_answers_is_bounded_by_its_timeout() {
    let names = Names::new(&unique("hung"));
    let (addr, _hole) = black_hole().await;
    let mut cfg = WorkerConfig::new(&names);
    cfg.s3_endpoint = Some(format!("http://{addr}"));
    cfg.bucket = "hung".into();
    cfg.storage_timeout_secs = 1;
    cfg.max_attempts = 1;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    assert!(worker.wait_log("storage not reachable at start", T).await);
    let t = std::time::Instant::now();
    broker.publish(&tiny_job("into-the-void", 1)).await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["status"], "failed", "{}", r[0]);
    assert_eq!(r[0]["error"]["kind"], "storage");
    // One S3 call: at most three 1 s attempts, plus the SDK's backoff between them.
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    broker.cleanup().await;
}

/// Defect 3: a job that never ends kept its worker busy and healthy-looking forever. Past
/// `job_timeout_secs` it is abandoned: its generation is stopped at the next denoising step
/// (the GPU is not left working for nobody), the attempt fails as transient and is retried, and
/// after `max_attempts` the job fails for good. The job is long enough (a million steps) to
/// outlive the limit on any machine; without the stop, each attempt would hold the GPU for hours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_timeout_is_abandoned_and_its_generation_stopped() {
    let (names, s3, mut cfg) = s3_setup("timeout").await;
    cfg.worker_extra = "job_timeout_secs = 1".into();
    cfg.extra = "[limits]\nmax_steps = 1000000".into();
    cfg.max_attempts = 2;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    broker.publish(&tiny_job("slow", 1_000_000)).await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["status"], "failed", "{}", r[0]);
    assert_eq!(r[0]["attempt"], 2);
    let msg = r[0]["error"]["message"].as_str().unwrap();
    assert!(msg.contains("job_timeout_secs"), "{msg}");
    // Both attempts were abandoned and their generations stopped, not left running (the log
    // is read from the worker's stderr as it comes: wait for the lines).
    let deadline = std::time::Instant::now() + T;
    for line in [
        "job ran past job_timeout_secs: abandoned",
        "reason=abandoned past job_timeout_secs",
    ] {
        while worker.log().matches(line).count() < 2 {
            assert!(std::time::Instant::now() < deadline, "{}", worker.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(worker.log().matches(line).count(), 2, "{}", worker.log());
    }
    // The abandoned attempt's lock was released, not left to expire: the retry ran at once.
    assert!(
        !worker.log().contains("another worker holds this job"),
        "{}",
        worker.log()
    );
    // The GPU is free again: healthy, and the next job runs.
    assert_eq!(worker.http("/healthz").await.unwrap().0, 200);
    broker.publish(&tiny_job("after", 2)).await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["status"], "succeeded", "{}", r[0]);
    assert!(
        !s3.keys()
            .iter()
            .any(|k| k.contains("/slow/") && k.ends_with(".png")),
        "no outputs of an abandoned job"
    );
    broker.cleanup().await;
}

/// Defect 9: the reconnect backoff reset after every successful connect, so a broker link
/// that breaks right after opening made a hot reconnect loop. It resets only after a stable
/// period now, and doubles otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_break_at_once_back_off_instead_of_looping() {
    let names = Names::new(&unique("flap"));
    let proxy = Proxy::start(AMQP_ADDR).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WorkerConfig::new(&names);
    cfg.local_dir = Some(dir.path().to_path_buf());
    cfg.amqp_url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let _broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    // From now on every connection lives 300 ms: connect succeeds, then breaks.
    proxy.set_cut_after(Some(Duration::from_millis(300)));
    proxy.cut_all();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let log = worker.log();
    let losses =
        log.matches("broker connection lost").count() + log.matches("broker unavailable").count();
    // reconnect_min_ms 100, max 1000: backing off, about 8 s / (0.3 s + up to 1 s) ≈ 6–10
    // losses; resetting after each connect (the defect) gives about 8 s / 0.35 s ≈ 20.
    assert!((2..=13).contains(&losses), "{losses} losses:\n{log}");
    _broker.cleanup().await;
}
