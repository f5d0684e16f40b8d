//! Soak: two workers on the bundled tiny model, N jobs of which about 10% are malformed in
//! varied ways, kill -9 of a worker twice (restarted), an S3 outage, every broker connection
//! cut once, then SIGTERM. Prints what happened to every job and asserts the goal: every
//! valid job succeeds exactly once, every malformed one is rejected and dead-lettered, no
//! crash, nothing lost, both drains exit 0.
//!
//! `cargo test --test soak` runs it small (CI); `scripts/soak.sh N` runs it in release with N
//! jobs and a 30 s outage (`R2F_SOAK_JOBS`, `R2F_SOAK_OUTAGE_SECS`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::harness::*;
use serde_json::json;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The malformed message number `i`, in one of eight ways; its id when it has a usable one.
fn malformed(i: usize, limits_bytes: usize) -> (Vec<u8>, &'static str) {
    let id = format!("bad-{i}");
    let job = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut j = tiny_job(&id, 2);
        f(&mut j);
        j.to_string().into_bytes()
    };
    match i % 8 {
        0 => (b"{\"id\": \"unterminated".to_vec(), "not JSON"),
        1 => (vec![0xff, 0xfe, b'{', 0xc3, 0x28, b'}'], "not UTF-8"),
        2 => (
            job(&|j| j["pad"] = json!("x".repeat(limits_bytes + 10))),
            "huge",
        ),
        3 => (
            format!("{}1{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
            "deeply nested",
        ),
        4 => (job(&|j| j["id"] = json!("i".repeat(300))), "300-byte id"),
        5 => (job(&|j| j["params"]["width"] = json!(100)), "bad size"),
        6 => (
            job(&|j| {
                j["mode"] = json!("r2f");
                j["plan"] = json!({"visual_detail_level": ["9"], "r2f_prompt": [["a"]]});
            }),
            "bad plan",
        ),
        _ => (job(&|j| j["params"]["steps"] = json!("many")), "wrong type"),
    }
}

struct Fleet {
    cfgs: [WorkerConfig; 2],
    workers: [Option<WorkerProc>; 2],
    logs: [String; 2],
}

impl Fleet {
    fn restart(&mut self, i: usize) {
        if let Some(w) = self.workers[i].take() {
            self.logs[i].push_str(&w.log());
        }
        self.workers[i] = Some(WorkerProc::spawn(&self.cfgs[i]));
    }

    fn log(&self) -> String {
        let mut all = self.logs.join("\n");
        for w in self.workers.iter().flatten() {
            all.push_str(&w.log());
        }
        all
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_every_valid_job_once_every_malformed_one_rejected() {
    let jobs = env_or("R2F_SOAK_JOBS", 80) as usize;
    let outage = Duration::from_secs(env_or("R2F_SOAK_OUTAGE_SECS", 4));
    let started = Instant::now();
    let names = Names::new(&unique("soak"));
    let bucket = format!("b{}", uuid::Uuid::new_v4().simple());
    let s3 = S3Server::start(&bucket).await;
    let s3_proxy = Proxy::start(&s3.addr.to_string()).await;
    let amqp_proxy = Proxy::start(AMQP_ADDR).await;
    let max_bytes = 65536;
    let cfg = || {
        let mut c = WorkerConfig::new(&names);
        c.s3_endpoint = Some(format!("http://{}", s3_proxy.addr));
        c.bucket = bucket.clone();
        c.amqp_url = format!("amqp://guest:guest@{}/%2f", amqp_proxy.addr);
        c.storage_retry_budget_secs = 120;
        c.extra = format!("[limits]\nmax_message_bytes = {max_bytes}\n");
        c
    };
    let mut fleet = Fleet {
        cfgs: [cfg(), cfg()],
        workers: [None, None],
        logs: [String::new(), String::new()],
    };
    let mut broker = Broker::connect(&names).await;
    fleet.restart(0);
    fleet.restart(1);
    for w in fleet.workers.iter_mut().flatten() {
        assert!(w.wait_ready(Duration::from_secs(120)).await, "{}", w.log());
    }

    // Every tenth message is malformed; the rest are small valid jobs.
    let mut valid = BTreeSet::new();
    let mut bad_kinds = BTreeMap::new();
    for i in 0..jobs {
        if i % 10 == 9 {
            let (body, kind) = malformed(i / 10, max_bytes);
            *bad_kinds.entry(kind).or_insert(0) += 1;
            broker.publish_raw(&body).await;
        } else {
            let id = format!("ok-{i}");
            broker.publish(&tiny_job(&id, 3)).await;
            valid.insert(id);
        }
    }
    let malformed_count: usize = bad_kinds.values().sum();

    // Faults, spread over the run.
    let mut succeeded: BTreeMap<String, usize> = BTreeMap::new();
    let mut rejected = BTreeSet::new();
    let mut failed = Vec::new();
    let total = valid.len() + malformed_count;
    let deadline = Instant::now() + Duration::from_secs(120 + jobs as u64 * 2 + outage.as_secs());
    let mut done = 0;
    let mut fault_at = [total / 6, total / 3, total / 2, 2 * total / 3];
    let mut kills = 0;
    while done < total && Instant::now() < deadline {
        if fault_at[0] <= done {
            fault_at[0] = usize::MAX;
            kills += 1;
            fleet.workers[0].as_ref().unwrap().signal(libc::SIGKILL);
            fleet.workers[0]
                .as_mut()
                .unwrap()
                .wait_exit(Duration::from_secs(10))
                .await;
            fleet.restart(0);
        }
        if fault_at[1] <= done {
            fault_at[1] = usize::MAX;
            // Jobs keep running meanwhile; their uploads wait inside the retry budget.
            s3_proxy.set_refuse(true);
            s3_proxy.cut_all();
            tokio::time::sleep(outage).await;
            s3_proxy.set_refuse(false);
        }
        if fault_at[2] <= done {
            fault_at[2] = usize::MAX;
            amqp_proxy.cut_all();
        }
        if fault_at[3] <= done {
            fault_at[3] = usize::MAX;
            kills += 1;
            fleet.workers[1].as_ref().unwrap().signal(libc::SIGKILL);
            fleet.workers[1]
                .as_mut()
                .unwrap()
                .wait_exit(Duration::from_secs(10))
                .await;
            fleet.restart(1);
        }
        let Some((ev, _)) = broker
            .wait_event(Duration::from_secs(5), |_, rk| is_final(rk))
            .await
        else {
            continue;
        };
        let id = ev["id"].as_str().unwrap_or("").to_string();
        match ev["status"].as_str() {
            Some("succeeded") => {
                let n = succeeded.entry(id.clone()).or_insert(0);
                *n += 1;
                if *n == 1 {
                    done += 1;
                }
            }
            Some("rejected") => {
                rejected.insert(format!("{id}#{}", rejected.len()));
                done += 1;
            }
            _ => {
                failed.push(ev.clone());
                done += 1;
            }
        }
    }

    // Drain both with SIGTERM.
    let mut exit_codes = Vec::new();
    for w in fleet.workers.iter_mut().flatten() {
        w.signal(libc::SIGTERM);
        let status = w.wait_exit(Duration::from_secs(60)).await;
        exit_codes.push(status.and_then(|s| s.code()));
    }
    let log = fleet.log();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dead = broker.take_dead_letters().await;
    let dead_with_reason = dead.iter().filter(|d| !d.1.is_empty()).count();
    let lost: Vec<&String> = valid
        .iter()
        .filter(|id| !succeeded.contains_key(*id))
        .collect();
    // A job generated twice logs "job succeeded" twice (a redelivered finished job does not).
    let twice = valid
        .iter()
        .filter(|id| {
            let tag = format!("job_id={id} ");
            log.lines()
                .filter(|l| l.contains("job succeeded") && l.contains(&tag))
                .count()
                > 1
        })
        .count();
    let crashes = log.matches("panicked at").count();
    println!(
        "soak: {jobs} messages ({} valid, {malformed_count} malformed: {bad_kinds:?}) in {:.0} s\n\
         soak: valid jobs succeeded {} of {}, lost {}, generated twice {}, failed {}\n\
         soak: malformed rejected {}, dead-lettered with a reason {dead_with_reason} of {}\n\
         soak: faults: kill -9 x{kills}, S3 outage {} s, broker connections cut x1\n\
         soak: crashes {crashes}, drain exit codes {exit_codes:?}",
        valid.len(),
        started.elapsed().as_secs_f64(),
        succeeded.keys().filter(|id| valid.contains(*id)).count(),
        valid.len(),
        lost.len(),
        twice,
        failed.len(),
        rejected.len(),
        dead.len(),
        outage.as_secs(),
    );
    assert!(lost.is_empty(), "lost {lost:?}\n{failed:?}");
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(rejected.len(), malformed_count);
    assert_eq!(dead.len(), malformed_count, "{dead:?}");
    assert_eq!(dead_with_reason, malformed_count);
    assert_eq!(crashes, 0, "{log}");
    assert_eq!(exit_codes, vec![Some(0), Some(0)], "{log}");
    broker.cleanup().await;
}
