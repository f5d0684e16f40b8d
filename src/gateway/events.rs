//! A job's events over Server-Sent Events, made from its status record: the record holds every
//! transition and, while the job runs, its progress; each write is announced on the job's
//! Redis channel. The gateway follows all job channels on one subscription ([`Hub`]) and wakes
//! the streams of the jobs announced; a stream then reads the record and sends what is new.
//! Because events are derived from the record, a stream that starts late, or resumes with
//! `Last-Event-ID` on another replica, sends the same events with the same ids; and a missed
//! announcement only delays an event (each stream also reads the record every 2 s).
//!
//! Event ids order a job's events: `0.0` queued, `<attempt>.0` started, `<attempt>.<step>`
//! progress, `end` the terminal event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::watch;

use crate::job::api::QueuedEvent;
use crate::job::event::{ProgressEvent, ResultEvent, StartedEvent};
use crate::job::status::JobStatus;
use crate::job::{JobState, Outcome};
use crate::service::redis_store::RedisStore;

/// Wakes the streams of the jobs whose channel was announced.
pub struct Hub {
    watchers: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Hub {
    /// Starts following every job channel of `redis` (reconnecting when the subscription
    /// breaks; every stream is woken then, in case it missed something).
    pub fn start(redis: RedisStore) -> Arc<Self> {
        let hub = Arc::new(Self {
            watchers: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&hub);
        tokio::spawn(async move {
            let pattern = crate::service::status::channel_pattern(&redis);
            loop {
                if weak.strong_count() == 0 {
                    return;
                }
                match redis.psubscribe(&pattern).await {
                    Ok(mut pubsub) => {
                        if let Some(hub) = weak.upgrade() {
                            hub.wake_all();
                        }
                        let mut messages = pubsub.on_message();
                        while let Some(m) = messages.next().await {
                            let Some(hub) = weak.upgrade() else { return };
                            hub.wake(m.get_channel_name());
                        }
                        tracing::warn!("job channel subscription lost: resubscribing");
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot follow job channels"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        hub
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self, channel: &str) {
        if let Some(tx) = self.lock().get(channel) {
            tx.send_modify(|n| *n += 1);
        }
    }

    fn wake_all(&self) {
        for tx in self.lock().values() {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// A receiver woken at each announcement on `channel`.
    pub fn watch(&self, channel: &str) -> watch::Receiver<u64> {
        let mut w = self.lock();
        w.retain(|_, tx| tx.receiver_count() > 0);
        w.entry(channel.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }
}

/// Where a stream is: the id of the last event sent, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor(u32, u32);

impl Cursor {
    const QUEUED: Cursor = Cursor(0, 0);
    const END: Cursor = Cursor(u32::MAX, u32::MAX);

    /// The cursor of a `Last-Event-ID` (none for one this gateway did not make).
    pub fn parse(text: &str) -> Option<Self> {
        if text == "end" {
            return Some(Self::END);
        }
        let (a, n) = text.split_once('.')?;
        Some(Cursor(a.parse().ok()?, n.parse().ok()?))
    }

    pub fn text(&self) -> String {
        if *self == Self::END {
            "end".into()
        } else {
            format!("{}.{}", self.0, self.1)
        }
    }
}

/// One event to send: its id, name and data.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    pub cursor: Cursor,
    pub name: String,
    pub data: Value,
}

/// The events of `status` after `after` (all of them for none), in order. The terminal event
/// carries `result` (the record's result event, its URLs refreshed by the caller).
pub fn events_of(
    status: &JobStatus,
    tenant: Option<&str>,
    after: Option<Cursor>,
    result: Option<&ResultEvent>,
) -> Vec<JobEvent> {
    let mut out = Vec::new();
    let is_new = |c: Cursor| after.is_none_or(|a| c > a);
    let mut push = |cursor: Cursor, name: &str, data: Value| {
        if is_new(cursor) {
            out.push(JobEvent {
                cursor,
                name: name.to_string(),
                data,
            });
        }
    };
    let tenant = tenant.map(str::to_string);
    let accepted_at = status
        .history
        .first()
        .map_or(status.updated_at_ms, |t| t.at_ms);
    push(
        Cursor::QUEUED,
        JobState::Queued.name(),
        serde_json::to_value(QueuedEvent {
            id: status.id.clone(),
            tenant: tenant.clone(),
            at_ms: accepted_at,
        })
        .unwrap_or_default(),
    );
    // The latest attempt a worker took.
    let ran = status
        .history
        .iter()
        .rev()
        .find(|t| t.state == JobState::Running)
        .map(|t| t.attempt);
    if let Some(attempt) = ran {
        push(
            Cursor(attempt, 0),
            "started",
            serde_json::to_value(StartedEvent {
                id: status.id.clone(),
                tenant: tenant.clone(),
                attempt,
                worker: status.worker.clone(),
                trace_id: None,
            })
            .unwrap_or_default(),
        );
    }
    if status.state == JobState::Running {
        if let (Some(step), Some(steps)) = (status.step, status.steps) {
            if step > 0 {
                push(
                    Cursor(status.attempt, step.min(u32::MAX as usize - 1) as u32),
                    "progress",
                    serde_json::to_value(ProgressEvent {
                        id: status.id.clone(),
                        tenant: tenant.clone(),
                        step,
                        steps,
                        attempt: status.attempt,
                        eta_ms: status.eta_ms,
                        trace_id: None,
                    })
                    .unwrap_or_default(),
                );
            }
        }
    }
    if let Some(outcome) = status.state.outcome() {
        let data = match result {
            Some(r) => serde_json::to_value(r).unwrap_or_default(),
            None => serde_json::to_value(ResultEvent {
                id: status.id.clone(),
                tenant,
                status: outcome,
                attempt: status.attempt,
                outputs: vec![],
                plan: None,
                timings_ms: Default::default(),
                error: None,
                worker: status.worker.clone(),
                trace_id: None,
            })
            .unwrap_or_default(),
        };
        push(Cursor::END, outcome_name(outcome), data);
    }
    out
}

fn outcome_name(o: Outcome) -> &'static str {
    o.name()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::status::Transition;

    fn status(state: JobState, attempt: u32, history: &[(JobState, u32)]) -> JobStatus {
        JobStatus {
            id: "j".into(),
            state,
            attempt,
            worker: "w".into(),
            updated_at_ms: 5,
            reason: None,
            history: history
                .iter()
                .enumerate()
                .map(|(i, (s, a))| Transition {
                    state: *s,
                    attempt: *a,
                    at_ms: i as u64,
                })
                .collect(),
            step: None,
            steps: None,
            eta_ms: None,
            result: None,
        }
    }

    fn names(events: &[JobEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| format!("{}@{}", e.name, e.cursor.text()))
            .collect()
    }

    #[test]
    fn a_stream_sends_each_event_once_in_order_and_resumes_after_the_last_id() {
        let q = status(JobState::Queued, 1, &[(JobState::Queued, 1)]);
        assert_eq!(names(&events_of(&q, None, None, None)), ["queued@0.0"]);
        let mut r = status(
            JobState::Running,
            1,
            &[(JobState::Queued, 1), (JobState::Running, 1)],
        );
        r.step = Some(3);
        r.steps = Some(10);
        let all = events_of(&r, None, None, None);
        assert_eq!(names(&all), ["queued@0.0", "started@1.0", "progress@1.3"]);
        let after = Cursor::parse("1.0");
        assert_eq!(names(&events_of(&r, None, after, None)), ["progress@1.3"]);
        assert!(events_of(&r, None, Cursor::parse("1.3"), None).is_empty());
        // A retry: attempt 2 starts again from step 1, after everything of attempt 1.
        let mut r2 = status(
            JobState::Running,
            2,
            &[
                (JobState::Queued, 1),
                (JobState::Running, 1),
                (JobState::Retrying, 2),
                (JobState::Running, 2),
            ],
        );
        r2.step = Some(1);
        r2.steps = Some(10);
        assert_eq!(
            names(&events_of(&r2, None, Cursor::parse("1.9"), None)),
            ["started@2.0", "progress@2.1"]
        );
        let done = status(
            JobState::Succeeded,
            2,
            &[
                (JobState::Queued, 1),
                (JobState::Running, 2),
                (JobState::Succeeded, 2),
            ],
        );
        let ev = events_of(&done, Some("acme"), Cursor::parse("2.1"), None);
        assert_eq!(names(&ev), ["succeeded@end"]);
        assert_eq!(ev[0].data["tenant"], "acme");
        assert!(events_of(&done, None, Cursor::parse("end"), None).is_empty());
        assert_eq!(Cursor::parse("x"), None);
        assert!(Cursor::parse("0.0").unwrap() < Cursor::parse("1.0").unwrap());
    }
}
