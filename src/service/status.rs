//! Job status records: what happened to a job, by id, at every transition (`running` when a
//! worker takes it, `retrying` when it goes back with a delay, `queued` when it is handed back,
//! then `succeeded`, `failed`, `rejected` or `cancelled` with the result event), and the
//! cancellation requests of `r2f cancel`.
//!
//! Kept in Redis under `<redis.key_prefix>:status:<id>` (`...:status:<tenant>:<id>` in a
//! multi-tenant fleet) with a TTL (`redis.status_ttl_secs`):
//! a client asks by id alone (the storage path of `result.json` depends on the job's output
//! prefix, which `r2f status ID` does not know), each transition is one small write, and old
//! records expire by themselves. `result.json` in the storage stays the durable record of
//! finished jobs. Writes are best effort: Redis down costs a status record, never a job.

use std::time::Duration;

use crate::job::status::{CancelAnswer, CancelVerdict, JobStatus, Transition};
use crate::job::{JobState, ResultEvent};
use crate::service::redis_store::RedisStore;
use crate::service::tenancy::JobKey;

fn key(redis: &RedisStore, job: &JobKey) -> String {
    job.redis_key(redis, "status")
}

/// The channel on which every transition of `job` is announced (its new state), so that a
/// client waits for events instead of polling (`r2f wait`).
pub fn channel(redis: &RedisStore, job: &JobKey) -> String {
    job.redis_key(redis, "status-changed")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The status record of `job`, if Redis holds one.
pub async fn read(redis: &RedisStore, job: &JobKey) -> anyhow::Result<Option<JobStatus>> {
    let text = redis
        .get(&key(redis, job))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| anyhow::anyhow!("status of {}: {e}", job.id)))
        .transpose()
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
    history.push(Transition {
        state: u.state,
        attempt: u.attempt,
        at_ms,
    });
    let status = JobStatus {
        id: u.job.id.clone(),
        state: u.state,
        attempt: u.attempt,
        worker: u.worker.to_string(),
        updated_at_ms: at_ms,
        reason: u.reason.map(str::to_string),
        history,
        result: u.result.cloned(),
    };
    let text = match serde_json::to_string(&status) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(job_id = %u.job.id, error = %e, "status record not written");
            return;
        }
    };
    if let Err(e) = redis.set_ex(&key(redis, u.job), &text, ttl).await {
        tracing::warn!(job_id = %u.job.id, error = %e, "status record not written");
        return;
    }
    let mut publish = redis::cmd("PUBLISH");
    publish.arg(channel(redis, u.job)).arg(u.state.name());
    if let Err(e) = redis.query::<i64>(&publish).await {
        tracing::debug!(job_id = %u.job.id, error = %e, "status change not announced");
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
