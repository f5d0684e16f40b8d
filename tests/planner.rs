//! R2F planning end to end: workers with a local OpenAI-protocol server standing in for the
//! remote LLM, the machine's Redis as plan cache, RabbitMQ, the tiny SD3 model.

mod common;
#[path = "common/fake_llm.rs"]
mod fake_llm;
#[path = "common/harness.rs"]
mod harness;

use std::time::Duration;

use fake_llm::{FakeLlm, Reply};
use harness::*;
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
            .env("R2F_TEST_LLM_KEY", fake_llm::API_KEY)
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
