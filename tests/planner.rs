//! R2F planning end to end: workers with a local OpenAI-protocol server standing in for the
//! remote LLM, the machine's Redis as plan cache, RabbitMQ, the tiny SD3 model.

mod common;

use std::time::Duration;

use common::fake_llm::{FakeLlm, Reply};
use common::harness::*;
use serde_json::json;

const T: Duration = Duration::from_secs(90);

fn r2f_job(id: &str, prompt: &str) -> serde_json::Value {
    json!({
        "id": id,
        "prompt": prompt,
        "model": "tiny",
        "mode": "r2f",
        "params": {"steps": 4, "guidance": 5.0, "width": 64, "height": 48, "seed": 3}
    })
}

fn setup(name: &str, llm: &FakeLlm, llm_attempts: u32) -> (Names, WorkerConfig, tempfile::TempDir) {
    let names = Names::new(&unique(name));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WorkerConfig::new(&names);
    cfg.local_dir = Some(dir.path().to_path_buf());
    cfg.extra = llm.config(llm_attempts);
    (names, cfg, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_same_new_prompt_make_one_llm_call_then_cache_hits() {
    let llm = FakeLlm::start().await;
    llm.set_delay(Duration::from_millis(1500));
    let (names, cfg, dir) = setup("flight", &llm, 3);
    let mut broker = Broker::connect(&names).await;
    let mut w1 = WorkerProc::spawn(&cfg);
    let mut cfg2 = WorkerConfig::new(&names);
    cfg2.local_dir = cfg.local_dir.clone();
    cfg2.extra = cfg.extra.clone();
    let mut w2 = WorkerProc::spawn(&cfg2);
    assert!(w1.wait_ready(T).await, "{}", w1.log());
    assert!(w2.wait_ready(T).await, "{}", w2.log());
    let prompt = format!("a hairy frog warrior number {}", names.prefix);
    broker.publish(&r2f_job("same-1", &prompt)).await;
    broker.publish(&r2f_job("same-2", &prompt)).await;
    let results = broker.wait_results(2, T).await;
    assert_eq!(results.len(), 2, "{}\n{}", w1.log(), w2.log());
    for r in &results {
        assert_eq!(r["status"], "succeeded", "{r}");
        let prompts = r["plan"]["r2f_prompt"][0].as_array().unwrap();
        assert_eq!(prompts.len(), 2, "{r}");
        assert!(
            prompts[0]
                .as_str()
                .unwrap()
                .contains("hairy animal warrior"),
            "{r}"
        );
        assert_eq!(r["plan"]["visual_detail_level"], "4");
    }
    assert!(
        w1.log().contains("job received") && w2.log().contains("job received"),
        "each worker must take one job:\n{}\n{}",
        w1.log(),
        w2.log()
    );
    assert_eq!(
        llm.calls(),
        1,
        "single flight: one LLM call for both workers"
    );
    let req = &llm.requests()[0];
    assert_eq!(req["model"], "gpt-4o");
    assert!(
        req.get("temperature").is_none(),
        "GPT-4o runs with the API's default sampling"
    );

    // The same prompt again: a cache hit, no new call.
    broker.publish(&r2f_job("same-3", &prompt)).await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r[0]["status"], "succeeded");
    assert_eq!(llm.calls(), 1);
    let hits = metric(&w1, r#"r2f_plan_cache_requests_total{result="hit"}"#).await
        + metric(&w2, r#"r2f_plan_cache_requests_total{result="hit"}"#).await;
    assert!(hits >= 2.0, "cache hits counted: {hits}");
    drop(dir);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_llm_failures_are_retried_and_permanent_ones_fail_the_job_as_llm() {
    let llm = FakeLlm::start().await;
    let (names, mut cfg, _dir) = setup("llmfail", &llm, 3);
    cfg.max_attempts = 2;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());

    // Two failures, then an answer: retried inside the LLM client.
    llm.script(&[Reply::Status(503), Reply::Status(429)]);
    broker
        .publish(&r2f_job(
            "flaky",
            &format!("a hairy frog knight {}", names.prefix),
        ))
        .await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r[0]["status"], "succeeded", "{}", worker.log());
    assert_eq!(llm.calls(), 3);
    assert!(metric(&worker, r#"r2f_llm_requests_total{outcome="retry"}"#).await >= 2.0);

    // Down for good: the job fails with kind llm after the worker's attempts, dead-lettered.
    llm.set_default(Some(Reply::Status(500)));
    broker
        .publish(&r2f_job(
            "down",
            &format!("a hairy frog bard {}", names.prefix),
        ))
        .await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["status"], "failed");
    assert_eq!(r[0]["error"]["kind"], "llm");
    assert_eq!(r[0]["attempt"], 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dead = broker.take_dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].2, "llm");
    // An answer that stays unusable is not retried as transient: it fails the job at once.
    llm.set_default(Some(Reply::Answer("Sorry, I can't do that.".into())));
    broker
        .publish(&r2f_job(
            "garbled",
            &format!("a hairy frog monk {}", names.prefix),
        ))
        .await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r[0]["status"], "failed");
    assert_eq!(r[0]["attempt"], 1);
    assert!(
        r[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unusable"),
        "{}",
        r[0]
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_bypasses_the_cache_and_jobs_still_succeed() {
    let llm = FakeLlm::start().await;
    let (names, mut cfg, _dir) = setup("noredis", &llm, 3);
    // Redis behind a proxy that refuses every connection: down, from the worker's view.
    let proxy = Proxy::start("127.0.0.1:6379").await;
    proxy.set_refuse(true);
    cfg.redis_url = format!("redis://{}", proxy.addr);
    // Jobs may run without their lock here, so that the plan cache bypass is what is tested.
    cfg.redis_require_lock = false;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let prompt = format!("a hairy frog sailor {}", names.prefix);
    broker.publish(&r2f_job("no-cache-1", &prompt)).await;
    broker.publish(&r2f_job("no-cache-2", &prompt)).await;
    let r = broker.wait_results(2, T).await;
    assert_eq!(r.len(), 2, "{}", worker.log());
    assert!(r.iter().all(|e| e["status"] == "succeeded"), "{r:?}");
    assert_eq!(llm.calls(), 2, "no cache: each job asks the LLM");
    assert!(metric(&worker, r#"r2f_plan_cache_requests_total{result="error"}"#).await >= 2.0);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_command_prints_r2f_and_r2fplus_plans_through_the_cache() {
    let llm = FakeLlm::start().await;
    let prefix = unique("plancli");
    let cfg = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(
        cfg.path(),
        format!("{}\n[redis]\nkey_prefix = \"{prefix}\"\n", llm.config(2)),
    )
    .unwrap();
    let cfg_path = cfg.path().to_path_buf();
    let run = move |mode: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_r2f"))
            .args(["plan", "--config"])
            .arg(&cfg_path)
            .args([
                "--prompt",
                "A hairy frog playing the violin",
                "--mode",
                mode,
            ])
            .env("R2F_TEST_LLM_KEY", common::fake_llm::API_KEY)
            .output()
            .unwrap()
    };
    let out = tokio::task::spawn_blocking(move || (run("r2f"), run("r2f"), run("r2fplus")))
        .await
        .unwrap();
    for o in [&out.0, &out.1, &out.2] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let plan: serde_json::Value = serde_json::from_slice(&out.0.stdout).unwrap();
    assert_eq!(
        plan,
        json!({"visual_detail_level": "4",
               "r2f_prompt": [["A hairy animal playing the violin", "A hairy frog playing the violin"]]})
    );
    assert_eq!(out.0.stdout, out.1.stdout);
    let regions: serde_json::Value = serde_json::from_slice(&out.2.stdout).unwrap();
    assert_eq!(regions["objects"]["#1"]["r2f"][0], "a hairy animal");
    assert_eq!(llm.calls(), 2, "the second r2f call is a cache hit");
}

/// An R2F+ job on the tiny model: clean schedule (the tiny model draws 64x48, not square) and
/// few steps, so that guidance (1 step) and fusion (2 steps) both run.
fn r2fplus_job(id: &str, prompt: &str) -> serde_json::Value {
    json!({
        "id": id,
        "prompt": prompt,
        "model": "tiny",
        "mode": "r2fplus",
        "params": {"steps": 6, "guidance": 5.0, "width": 64, "height": 48, "seed": 5,
                   "schedule": "clean", "region_mask": "box", "bbox_guidance_iterations": 2}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r2fplus_jobs_run_with_their_plan_or_the_llm_plan_and_bad_ones_are_rejected() {
    let llm = FakeLlm::start().await;
    let (names, cfg, dir) = setup("r2fplus", &llm, 3);
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());

    // A plan given with the job, its objects listed #2 first: that order is kept.
    let mut given = r2fplus_job("plus-given", "a furry frog and a glass sword");
    given["plan"] = json!({
        "original_prompt": "a furry frog and a glass sword",
        "base_prompt": "a #1 next to a #2",
        "objects": {
            "#2": {"prompt": "a photo of a #2", "object": "glass sword", "r2f": [],
                   "visual_detail_levels": [], "bbox": [0.5, 0.1, 0.9, 0.9]},
            "#1": {"prompt": "a photo of a #1", "object": "furry frog", "r2f": ["furry animal"],
                   "visual_detail_levels": [3], "bbox": [0.1, 0.2, 0.5, 0.8]}
        }
    });
    broker.publish(&given).await;
    // No plan: the LLM's R2F+ plan.
    let prompt = format!("a hairy frog and a golden sword {}", names.prefix);
    broker.publish(&r2fplus_job("plus-llm", &prompt)).await;
    // An invalid R2F+ plan (the base prompt lacks #2), an R2F plan in an r2fplus job, and a
    // faithful job on a size the official loop cannot draw.
    let mut bad_plan = r2fplus_job("plus-bad-plan", "x");
    bad_plan["plan"] = given["plan"].clone();
    bad_plan["plan"]["base_prompt"] = json!("a #1 alone");
    broker.publish(&bad_plan).await;
    let mut r2f_plan = r2fplus_job("plus-r2f-plan", "x");
    r2f_plan["plan"] =
        json!({"visual_detail_level": "3", "r2f_prompt": [["a frog", "a hairy frog"]]});
    broker.publish(&r2f_plan).await;
    let mut faithful = r2fplus_job("plus-faithful-wide", "x");
    faithful["params"]["schedule"] = json!("faithful");
    faithful["params"]["steps"] = json!(50);
    broker.publish(&faithful).await;

    let results = broker.wait_results(5, Duration::from_secs(300)).await;
    assert_eq!(
        results.len(),
        5,
        "{:?}\n{}",
        broker.events_seen,
        worker.log()
    );
    let by_id = |id: &str| results.iter().find(|r| r["id"] == id).unwrap().clone();
    let r = by_id("plus-given");
    assert_eq!(r["status"], "succeeded", "{r}\n{}", worker.log());
    let keys: Vec<&String> = r["plan"]["objects"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["#2", "#1"], "plan order kept: {r}");
    assert!(r["timings_ms"].get("guidance").is_some(), "{r}");
    let r = by_id("plus-llm");
    assert_eq!(r["status"], "succeeded", "{r}\n{}", worker.log());
    assert_eq!(r["plan"]["base_prompt"], "#1 and #2", "{r}");
    assert_eq!(llm.calls(), 1);
    assert!(
        llm.requests()[0]["messages"][1]["content"]
            .as_str()
            .unwrap()
            .contains("Original prompt"),
        "the R2F+ template was used"
    );
    for (id, reason) in [
        ("plus-bad-plan", "invalid plan"),
        ("plus-r2f-plan", "was given an R2F plan"),
        ("plus-faithful-wide", "needs a square image"),
    ] {
        let r = by_id(id);
        assert_eq!(r["status"], "rejected", "{r}");
        let msg = r["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(reason), "{id}: {r}");
    }
    let dead = broker.take_dead_letters().await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    let stage = metric(
        &worker,
        r#"r2f_job_stage_seconds_count{model="tiny",stage="guidance"}"#,
    )
    .await;
    assert_eq!(stage, 2.0, "guidance timed for both R2F+ jobs");
    let ok = metric(
        &worker,
        r#"r2f_jobs_total{mode="r2fplus",model="tiny",status="succeeded"}"#,
    )
    .await;
    assert_eq!(ok, 2.0);
    drop(dir);
    broker.cleanup().await;
}
