//! Job status records: what happened to a job, by id, at every transition (`running` when a
//! worker takes it, `retrying` when it goes back with a delay, `queued` when it is handed back,
//! then `succeeded`, `failed`, `rejected` or `cancelled` with the result event), and the
//! cancellation requests of `r2f cancel`.
//!
//! Kept in Redis under `<redis.key_prefix>:status:<id>` with a TTL (`redis.status_ttl_secs`):
//! a client asks by id alone (the storage path of `result.json` depends on the job's output
//! prefix, which `r2f status ID` does not know), each transition is one small write, and old
//! records expire by themselves. `result.json` in the storage stays the durable record of
//! finished jobs. Writes are best effort: Redis down costs a status record, never a job.

use std::time::Duration;

use crate::job::status::{CancelAnswer, CancelVerdict, JobStatus, Transition};
use crate::job::{JobState, ResultEvent};
use crate::service::redis_store::RedisStore;

fn key(redis: &RedisStore, id: &str) -> String {
    redis.key(&["status", id])
}

/// The channel on which every transition of `id` is announced (its new state), so that a
/// client waits for events instead of polling (`r2f wait`).
pub fn channel(redis: &RedisStore, id: &str) -> String {
    redis.key(&["status-changed", id])
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The status record of `id`, if Redis holds one.
pub async fn read(redis: &RedisStore, id: &str) -> anyhow::Result<Option<JobStatus>> {
    let text = redis
        .get(&key(redis, id))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| anyhow::anyhow!("status of {id}: {e}")))
        .transpose()
}

/// What one transition writes.
pub struct Update<'a> {
    pub id: &'a str,
    pub state: JobState,
    pub attempt: u32,
    pub worker: &'a str,
    pub reason: Option<&'a str>,
    pub result: Option<&'a ResultEvent>,
}

/// Appends a transition to the record of `u.id` (best effort: a failure is logged).
pub async fn record(redis: &RedisStore, ttl: Duration, u: Update<'_>) {
    let previous = match read(redis, u.id).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(job_id = u.id, error = %e, "status record not written");
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
        id: u.id.to_string(),
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
            tracing::warn!(job_id = u.id, error = %e, "status record not written");
            return;
        }
    };
    if let Err(e) = redis.set_ex(&key(redis, u.id), &text, ttl).await {
        tracing::warn!(job_id = u.id, error = %e, "status record not written");
        return;
    }
    let mut publish = redis::cmd("PUBLISH");
    publish.arg(channel(redis, u.id)).arg(u.state.name());
    if let Err(e) = redis.query::<i64>(&publish).await {
        tracing::debug!(job_id = u.id, error = %e, "status change not announced");
    }
}

/// Waits until the job is finished (a terminal state) and returns its record; None when
/// `timeout` passes first. Listens to the job's status channel, reading the record again at each
/// announcement (and every 2 s besides, in case one was missed or Redis cannot subscribe).
pub async fn wait_terminal(
    redis: &RedisStore,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<Option<JobStatus>> {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + timeout;
    // Subscribed before the first read, so no transition falls between the two.
    let mut pubsub = redis.subscribe(&channel(redis, id)).await.ok();
    loop {
        if let Some(r) = read(redis, id).await? {
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

fn cancel_key(redis: &RedisStore, id: &str) -> String {
    redis.key(&["cancel", id])
}

/// Records a cancellation request for `id` (kept as long as status records), unless the job is
/// already finished. The request is written before the state is read, so a worker that takes
/// the job in between sees it.
pub async fn request_cancel(
    redis: &RedisStore,
    id: &str,
    ttl: Duration,
) -> anyhow::Result<CancelAnswer> {
    let key = cancel_key(redis, id);
    redis
        .set_ex(&key, &now_ms().to_string(), ttl)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let state = read(redis, id).await?.map(|s| s.state);
    let finished = state.is_some_and(JobState::is_terminal);
    if finished {
        // Nothing to stop: the request must not linger for an id sent again after a rejection.
        redis
            .query::<i64>(redis::cmd("DEL").arg(&key))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(CancelAnswer {
        id: id.to_string(),
        cancel: if finished {
            CancelVerdict::TooLate
        } else {
            CancelVerdict::Requested
        },
        state,
    })
}

/// Whether a cancellation was requested for `id`. Redis unreachable reads as no (the job runs;
/// the request is seen at the next check).
pub async fn cancel_requested(redis: &RedisStore, id: &str) -> bool {
    matches!(redis.get(&cancel_key(redis, id)).await, Ok(Some(_)))
}
