//! Drains that lose no work: a worker told to stop finishes the job in hand within its drain
//! deadline, or stops it at the next denoising step and hands it back to the queue without
//! counting a death; it then exits 0 (real RabbitMQ, Redis and S3).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::harness::*;

const T: Duration = Duration::from_secs(60);

/// Steps that take the tiny model several seconds on any CPU (a drain deadline is 1 s).
const LONG: u32 = 4000;

/// A worker configuration with a 1 s drain deadline and steps allowed up to `LONG` and more.
async fn setup(tag: &str) -> (Names, S3Server, WorkerConfig) {
    let (names, s3, mut cfg) = s3_setup(tag).await;
    cfg.drain_timeout_secs = 1;
    cfg.max_attempts = 3;
    cfg.extra = "[limits]\nmax_steps = 1000000\n".into();
    (names, s3, cfg)
}

/// Sends SIGTERM (and a second one when `twice`) to a worker generating, and returns its exit
/// status.
async fn drain(worker: &mut WorkerProc, twice: bool) -> std::process::ExitStatus {
    worker.signal(libc::SIGTERM);
    if twice {
        tokio::time::sleep(Duration::from_millis(100)).await;
        worker.signal(libc::SIGTERM);
    }
    worker
        .wait_exit(T)
        .await
        .unwrap_or_else(|| panic!("the worker did not exit\n{}", worker.log()))
}

/// The lines of a worker's log that say it crashed.
fn crash_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("panicked")
                || l.contains("SIGSEGV")
                || l.contains("Invalid (backend, op)")
                || l.contains("could not be handed back")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_longer_than_the_drain_deadline_is_handed_back_and_never_dead_lettered() {
    let (names, s3, mut cfg) = setup("handback").await;
    let mut broker = Broker::connect(&names).await;
    broker.publish(&tiny_job("long", LONG)).await;
    // Five workers in a row take it and are drained mid-job.
    for round in 0..5 {
        let mut worker = WorkerProc::spawn(&cfg);
        assert!(worker.wait_ready(T).await, "{}", worker.log());
        assert!(worker.wait_log("generating", T).await, "{}", worker.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = drain(&mut worker, false).await;
        let log = worker.log();
        assert_eq!(status.code(), Some(0), "round {round}: {status:?}\n{log}");
        assert!(log.contains("job handed back to the queue"), "{log}");
        assert!(crash_lines(&log).is_empty(), "{log}");
        assert!(
            !log.contains("redelivered without being settled"),
            "a hand-back is not a death\n{log}"
        );
        let st = job_status(&names, "long").await.expect("a status record");
        assert_eq!(st.state, r2f::job::JobState::Queued, "{st:?}");
        assert!(
            st.reason.as_deref().unwrap_or("").contains("handed back"),
            "{st:?}"
        );
        assert_eq!(st.attempt, 1, "{st:?}");
    }
    assert!(
        broker.take_dead_letters().await.is_empty(),
        "never dead-lettered"
    );
    // Another worker, with time to finish, does.
    cfg.drain_timeout_secs = 60;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let r = broker.wait_results(1, Duration::from_secs(300)).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["id"], "long");
    assert_eq!(r[0]["status"], "succeeded", "{}", r[0]);
    assert_eq!(r[0]["attempt"], 1, "{}", r[0]);
    assert!(s3.keys().contains(&"out/long/0.png".to_string()));
    let st = job_status(&names, "long").await.unwrap();
    assert_eq!(st.state, r2f::job::JobState::Succeeded, "{st:?}");
    // Five runs were handed back: each left `running` then `queued`.
    let queued = st
        .history
        .iter()
        .filter(|t| t.state == r2f::job::JobState::Queued)
        .count();
    assert!(queued >= 5, "{st:?}");
    assert!(broker.take_dead_letters().await.is_empty());
    worker.signal(libc::SIGTERM);
    assert_eq!(worker.wait_exit(T).await.and_then(|s| s.code()), Some(0));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_drains_mid_step_exit_zero_without_a_signal_or_a_panic() {
    let (names, _s3, cfg) = setup("drains").await;
    let broker = Broker::connect(&names).await;
    // A job no worker here finishes: every drain comes mid-step.
    broker.publish(&tiny_job("endless", 1_000_000)).await;
    let mut codes = Vec::new();
    for round in 0..20u64 {
        let mut worker = WorkerProc::spawn(&cfg);
        assert!(worker.wait_ready(T).await, "{}", worker.log());
        assert!(worker.wait_log("generating", T).await, "{}", worker.log());
        // A different moment of the step loop each time; every other drain with a second
        // signal (stop at once, no deadline).
        tokio::time::sleep(Duration::from_millis(50 + 37 * round)).await;
        let status = drain(&mut worker, round % 2 == 1).await;
        let log = worker.log();
        assert_eq!(status.signal(), None, "round {round}: {status:?}\n{log}");
        assert!(crash_lines(&log).is_empty(), "round {round}\n{log}");
        assert!(log.contains("job handed back to the queue"), "{log}");
        codes.push(status.code());
    }
    assert!(codes.iter().all(|c| *c == Some(0)), "{codes:?}");
    assert!(broker.take_dead_letters().await.is_empty());
    assert_eq!(broker.queue_len(&names.jobs).await, 1, "the job is queued");
    let st = job_status(&names, "endless").await.unwrap();
    assert_eq!(st.state, r2f::job::JobState::Queued, "{st:?}");
    assert!(st.history.len() <= r2f::job::status::HISTORY_MAX, "{st:?}");
    broker.cleanup().await;
}
