//! Job status records: what happened to a job, by id, at every transition (`queued` when the
//! gateway or `r2f enqueue` accepts it, `running` when a worker takes it, `retrying` when it goes back with a delay, `queued` when it is handed back,
//! then `succeeded`, `failed`, `rejected` or `cancelled` with the result event), and the
//! cancellation requests of `r2f cancel`.
//!
//! Kept in Redis under `<redis.key_prefix>:status:<id>` (`...:status:<tenant>:<id>` in a
//! multi-tenant fleet) with a TTL (`redis.status_ttl_secs`):
//! a client asks by id alone (the storage path of `result.json` depends on the job's output
//! prefix, which `r2f status ID` does not know), each transition is one small write, and old
//! records expire by themselves. `result.json` in the storage stays the durable record of
//! finished jobs. Writes are best effort: Redis down costs a status record, never a job.
//!
//! A running job's progress (step, steps, an estimate of the time left) is kept beside its
//! record (`...:progress:...`, one small write per progress event) and merged into it on read;
//! every transition and every progress write is announced on the job's channel, which is what
//! the gateway's event streams follow.

use std::time::Duration;

use crate::job::status::{CancelAnswer, CancelVerdict, JobStatus, Transition};
use crate::job::{JobState, ResultEvent};
use crate::service::redis_store::RedisStore;
use crate::service::tenancy::JobKey;

fn key(redis: &RedisStore, job: &JobKey) -> String {
    job.redis_key(redis, "status")
}

fn progress_key(redis: &RedisStore, job: &JobKey) -> String {
    job.redis_key(redis, "progress")
}

/// The key of a tenant's open jobs (accepted by the gateway and not finished): a sorted set of
/// ids scored by when each entry lapses.
fn open_key(redis: &RedisStore, job: &JobKey) -> String {
    redis.key(&job.scope.key("open", &[]))
}

/// What is announced on a job's channel for a progress write (transitions announce the state).
pub const PROGRESS_ANNOUNCEMENT: &str = "progress";

/// The channel on which every transition of `job` is announced (its new state), so that a
/// client waits for events instead of polling (`r2f wait`).
pub fn channel(redis: &RedisStore, job: &JobKey) -> String {
    job.redis_key(redis, "status-changed")
}

/// The pattern of every job's channel (`PSUBSCRIBE`).
pub fn channel_pattern(redis: &RedisStore) -> String {
    redis.key(&["status-changed", "*"])
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The status record of `job`, if Redis holds one, with its progress while it runs.
pub async fn read(redis: &RedisStore, job: &JobKey) -> anyhow::Result<Option<JobStatus>> {
    let mut cmd = redis::cmd("MGET");
    cmd.arg(key(redis, job)).arg(progress_key(redis, job));
    let (text, progress): (Option<String>, Option<String>) = redis
        .query(&cmd)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(text) = text else {
        return Ok(None);
    };
    let mut status: JobStatus =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("status of {}: {e}", job.id))?;
    if let Some(p) = progress.as_deref().and_then(Progress::parse) {
        if status.state == JobState::Running && p.attempt == status.attempt {
            status.step = Some(p.step);
            status.steps = Some(p.steps);
            status.eta_ms = p.eta_ms;
        }
    }
    Ok(Some(status))
}

/// A running job's progress, as the worker writes it beside the record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub attempt: u32,
    pub step: usize,
    pub steps: usize,
    pub eta_ms: Option<u64>,
}

impl Progress {
    fn text(&self) -> String {
        let eta = self
            .eta_ms
            .map(|e| e.to_string())
            .unwrap_or_else(|| "-".into());
        format!("{} {} {} {eta}", self.attempt, self.step, self.steps)
    }

    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let attempt = parts.next()?.parse().ok()?;
        let step = parts.next()?.parse().ok()?;
        let steps = parts.next()?.parse().ok()?;
        let eta_ms = parts.next()?.parse().ok();
        Some(Self {
            attempt,
            step,
            steps,
            eta_ms,
        })
    }
}

/// Records a running job's progress and announces it (best effort: a failure is logged at
/// debug level; the next one comes soon).
pub async fn progress(redis: &RedisStore, ttl: Duration, job: &JobKey, p: Progress) {
    let script = redis::cmd("EVAL")
        .arg(
            "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) \
             redis.call('PUBLISH', KEYS[2], ARGV[3]) return 1",
        )
        .arg(2)
        .arg(progress_key(redis, job))
        .arg(channel(redis, job))
        .arg(p.text())
        .arg(ttl.as_millis() as u64)
        .arg(PROGRESS_ANNOUNCEMENT)
        .clone();
    if let Err(e) = redis.query::<i64>(&script).await {
        tracing::debug!(job_id = %job.id, error = %e, "progress not recorded");
    }
}

/// What one transition writes.
pub struct Update<'a> {
    pub job: &'a JobKey,
    pub state: JobState,
    pub attempt: u32,
    pub worker: &'a str,
    pub reason: Option<&'a str>,
    pub result: Option<&'a ResultEvent>,
}

/// Appends a transition to the record of `u.job` (best effort: a failure is logged).
pub async fn record(redis: &RedisStore, ttl: Duration, u: Update<'_>) {
    let previous = match read(redis, u.job).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(job_id = %u.job.id, error = %e, "status record not written");
            return;
        }
    };
    let at_ms = now_ms();
    let mut history = previous.map(|p| p.history).unwrap_or_default();
    JobStatus::push_transition(
        &mut history,
        Transition {
            state: u.state,
            attempt: u.attempt,
            at_ms,
        },
    );
    let status = JobStatus {
        id: u.job.id.clone(),
        state: u.state,
        attempt: u.attempt,
        worker: u.worker.to_string(),
        updated_at_ms: at_ms,
        reason: u.reason.map(str::to_string),
        history,
        step: None,
        steps: None,
        eta_ms: None,
        result: u.result.cloned(),
    };
    let text = match serde_json::to_string(&status) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(job_id = %u.job.id, error = %e, "status record not written");
            return;
        }
    };
    // One round trip: the record, the progress of the run before it dropped, the job out of its
    // tenant's open jobs once finished, and the announcement.
    let script = redis::cmd("EVAL")
        .arg(
            "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) \
             redis.call('DEL', KEYS[2]) \
             if ARGV[4] == '1' then redis.call('ZREM', KEYS[3], ARGV[5]) end \
             redis.call('PUBLISH', KEYS[4], ARGV[3]) return 1",
        )
        .arg(4)
        .arg(key(redis, u.job))
        .arg(progress_key(redis, u.job))
        .arg(open_key(redis, u.job))
        .arg(channel(redis, u.job))
        .arg(text)
        .arg(ttl.as_millis() as u64)
        .arg(u.state.name())
        .arg(if u.state.is_terminal() { "1" } else { "0" })
        .arg(&u.job.id)
        .clone();
    if let Err(e) = redis.query::<i64>(&script).await {
        tracing::warn!(job_id = %u.job.id, error = %e, "status record not written");
    }
}

/// What [`admit`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The job is recorded `queued`, its id claimed and counted open: publish it.
    Admitted,
    /// The same job (same fingerprint) was accepted before: answer with it, publish nothing.
    Exists,
    /// Another job of the tenant holds the id.
    Conflict,
    /// The tenant has `max_open` jobs open already.
    Full,
}

/// What an admission writes.
pub struct Admit<'a> {
    pub job: &'a JobKey,
    /// The job's fingerprint (its id claim holds it).
    pub fingerprint: &'a str,
    /// Who accepted it (the `worker` of the `queued` record).
    pub by: &'a str,
    /// How long the records live (`redis.status_ttl_secs`).
    pub ttl: Duration,
    /// The tenant's cap on open jobs and how long an entry counts; none: not counted.
    pub open: Option<(usize, Duration)>,
}

/// Accepts a job before it is published, atomically: claims its id, writes its `queued` record
/// and counts it among its tenant's open jobs (under the cap). Written before publishing, so
/// that no worker's `running` can come first and be overwritten.
pub async fn admit(
    redis: &RedisStore,
    a: Admit<'_>,
) -> Result<Admission, crate::service::redis_store::RedisUnavailable> {
    let at_ms = now_ms();
    let status = JobStatus {
        id: a.job.id.clone(),
        state: JobState::Queued,
        attempt: 1,
        worker: a.by.to_string(),
        updated_at_ms: at_ms,
        reason: None,
        history: vec![Transition {
            state: JobState::Queued,
            attempt: 1,
            at_ms,
        }],
        step: None,
        steps: None,
        eta_ms: None,
        result: None,
    };
    let text = serde_json::to_string(&status).unwrap_or_default();
    let (max_open, lapse) = match a.open {
        Some((max, lapse)) => (max as i64, lapse),
        None => (-1, Duration::ZERO),
    };
    let script = redis::cmd("EVAL")
        .arg(
            "local held = redis.call('GET', KEYS[2]) \
             if held and held ~= ARGV[1] then return 'conflict' end \
             if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end \
             local max = tonumber(ARGV[6]) \
             if max >= 0 then \
               redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[4]) \
               if redis.call('ZCARD', KEYS[3]) >= max then return 'full' end \
               redis.call('ZADD', KEYS[3], ARGV[5], ARGV[7]) \
               redis.call('PEXPIRE', KEYS[3], ARGV[8]) \
             end \
             redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) \
             redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2]) \
             redis.call('PUBLISH', KEYS[4], 'queued') \
             return 'admitted'",
        )
        .arg(4)
        .arg(key(redis, a.job))
        .arg(claim_key(redis, a.job))
        .arg(open_key(redis, a.job))
        .arg(channel(redis, a.job))
        .arg(a.fingerprint)
        .arg(a.ttl.as_millis() as u64)
        .arg(text)
        .arg(at_ms)
        .arg(at_ms + lapse.as_millis() as u64)
        .arg(max_open)
        .arg(&a.job.id)
        .arg(lapse.as_millis() as u64)
        .clone();
    let answer: String = redis.query(&script).await?;
    Ok(match answer.as_str() {
        "admitted" => Admission::Admitted,
        "exists" => Admission::Exists,
        "conflict" => Admission::Conflict,
        _ => Admission::Full,
    })
}

/// Undoes an admission whose job could not be published: its record, claim and open entry.
pub async fn withdraw(redis: &RedisStore, job: &JobKey) {
    let script = redis::cmd("EVAL")
        .arg("redis.call('DEL', KEYS[1], KEYS[2]) redis.call('ZREM', KEYS[3], ARGV[1]) return 1")
        .arg(3)
        .arg(key(redis, job))
        .arg(claim_key(redis, job))
        .arg(open_key(redis, job))
        .arg(&job.id)
        .clone();
    if let Err(e) = redis.query::<i64>(&script).await {
        tracing::warn!(job_id = %job.id, error = %e, "admission not withdrawn");
    }
}

/// Waits until the job is finished (a terminal state) and returns its record; None when
/// `timeout` passes first. Listens to the job's status channel, reading the record again at each
/// announcement (and every 2 s besides, in case one was missed or Redis cannot subscribe).
pub async fn wait_terminal(
    redis: &RedisStore,
    job: &JobKey,
    timeout: Duration,
) -> anyhow::Result<Option<JobStatus>> {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + timeout;
    // Subscribed before the first read, so no transition falls between the two.
    let mut pubsub = redis.subscribe(&channel(redis, job)).await.ok();
    loop {
        if let Some(r) = read(redis, job).await? {
            if r.is_terminal() {
                return Ok(Some(r));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        let tick = tokio::time::sleep_until(
            deadline.min(tokio::time::Instant::now() + Duration::from_secs(2)),
        );
        match pubsub.as_mut() {
            Some(p) => {
                let mut messages = p.on_message();
                tokio::select! {
                    m = messages.next() => {
                        if m.is_none() {
                            // The subscription broke: poll from now on.
                            drop(messages);
                            pubsub = None;
                        }
                    }
                    _ = tick => {}
                }
            }
            None => tick.await,
        }
    }
}

fn cancel_key(redis: &RedisStore, job: &JobKey) -> String {
    job.redis_key(redis, "cancel")
}

/// Records a cancellation request for `job` (kept as long as status records), unless the job is
/// already finished. The request is written before the state is read, so a worker that takes
/// the job in between sees it.
pub async fn request_cancel(
    redis: &RedisStore,
    job: &JobKey,
    ttl: Duration,
) -> anyhow::Result<CancelAnswer> {
    let key = cancel_key(redis, job);
    redis
        .set_ex(&key, &now_ms().to_string(), ttl)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let state = read(redis, job).await?.map(|s| s.state);
    let finished = state.is_some_and(JobState::is_terminal);
    if finished {
        // Nothing to stop: the request must not linger for an id sent again after a rejection.
        redis
            .query::<i64>(redis::cmd("DEL").arg(&key))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(CancelAnswer {
        id: job.id.clone(),
        cancel: if finished {
            CancelVerdict::TooLate
        } else {
            CancelVerdict::Requested
        },
        state,
        reason: None,
    })
}

/// Whether a cancellation was requested for `job`. Redis unreachable reads as no (the job runs;
/// the request is seen at the next check).
pub async fn cancel_requested(redis: &RedisStore, job: &JobKey) -> bool {
    matches!(redis.get(&cancel_key(redis, job)).await, Ok(Some(_)))
}

/// The key of the id claim of `job`: the fingerprint of the job that holds the id.
fn claim_key(redis: &RedisStore, job: &JobKey) -> String {
    job.redis_key(redis, "claim")
}

/// Claims the id of `job` for the job whose message has fingerprint `fingerprint`, for `ttl`
/// (as long as status records live). True when this job holds the id (now, or since an earlier
/// delivery of the same message); false when another job of the tenant holds it.
pub async fn claim(
    redis: &RedisStore,
    job: &JobKey,
    fingerprint: &str,
    ttl: Duration,
) -> Result<bool, crate::service::redis_store::RedisUnavailable> {
    let key = claim_key(redis, job);
    if redis.set_nx(&key, fingerprint, ttl).await? {
        return Ok(true);
    }
    Ok(redis.get(&key).await?.as_deref() == Some(fingerprint))
}

/// Whether another job of the tenant holds the id of `job` (Redis unreachable reads as no).
pub async fn claimed(redis: &RedisStore, job: &JobKey) -> bool {
    matches!(redis.get(&claim_key(redis, job)).await, Ok(Some(_)))
}

/// The key of a tenant's jobs in flight: a sorted set of job ids scored by when each entry
/// lapses (a worker that dies takes its entry with it after `job_timeout_secs`).
fn in_flight_key(redis: &RedisStore, job: &JobKey) -> String {
    redis.key(&job.scope.key("in-flight", &[]))
}

/// Counts `job` among its tenant's jobs in flight unless `max` are in flight already (entries
/// lapse after `lapse`). True when it may run.
pub async fn enter_in_flight(
    redis: &RedisStore,
    job: &JobKey,
    max: usize,
    lapse: Duration,
) -> Result<bool, crate::service::redis_store::RedisUnavailable> {
    let now = now_ms();
    let script = redis::cmd("EVAL")
        .arg(
            "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]) \
             if not redis.call('ZSCORE', KEYS[1], ARGV[3]) \
                and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end \
             redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3]) \
             redis.call('PEXPIRE', KEYS[1], ARGV[5]) \
             return 1",
        )
        .arg(1)
        .arg(in_flight_key(redis, job))
        .arg(now)
        .arg(now + lapse.as_millis() as u64)
        .arg(&job.id)
        .arg(max)
        .arg(lapse.as_millis() as u64)
        .clone();
    Ok(redis.query::<i64>(&script).await? == 1)
}

/// Takes `job` out of its tenant's jobs in flight (best effort).
pub async fn leave_in_flight(redis: &RedisStore, job: &JobKey) {
    let mut cmd = redis::cmd("ZREM");
    cmd.arg(in_flight_key(redis, job)).arg(&job.id);
    let _ = redis.query::<i64>(&cmd).await;
}
