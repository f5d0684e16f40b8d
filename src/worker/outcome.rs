//! What a job came to, and what the broker must do about it: the worker's whole failure policy in
//! one pure function, [`decide`], unit-tested without a broker.
//!
//! | outcome | settlement |
//! | --- | --- |
//! | succeeded / already finished / cancelled | publish the (stored) result event, ack |
//! | rejected (invalid message) | `rejected` event, dead letter, ack — never retried |
//! | failed, the job's fault | `failed` event (stored), dead letter, ack |
//! | failed, transient dependency, attempts left | republish to the retry queue of that attempt's backoff level, ack |
//! | failed, transient dependency, last attempt | `failed` event (stored), dead letter, ack |
//! | failed, this worker's fault | give the job back untouched (republished, attempt not counted) |
//! | busy (another worker holds its lock) | postpone: republished after a short delay, not counted |
//! | a job for another model | sent on through the jobs exchange to that model's queue |
//! | delivered too often without finishing | `failed` event, dead letter, ack |

use crate::job::{ErrorKind, Outcome, ResultEvent};
use crate::service::metrics::{MAX_ATTEMPTS, POISON};

/// Whose fault a failure is: decides whether the failure may consume the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The job itself (its input, or a model error that recurs on every attempt): it may be
    /// dead-lettered once its attempts are spent.
    Job,
    /// A dependency that may recover by itself (LLM 429/5xx, S3 5xx or unreachable, Redis
    /// unreachable for the lock): retried with backoff up to `max_attempts`.
    Transient,
    /// This worker or its configuration (LLM 401/403/404, S3 403, a dead GPU thread, a job that
    /// outlived `job_timeout_secs`): the job goes back to the queue untouched for a healthy
    /// worker, and the worker pauses after a few of these in a row.
    Worker,
}

/// A failed attempt: a kind for the event, whose fault it is, and the detail for the logs.
#[derive(Debug, Clone, PartialEq)]
pub struct JobError {
    pub kind: ErrorKind,
    pub fault: Fault,
    /// The full detail: logged, never sent to clients (they get [`JobError::public_reason`]).
    pub detail: String,
}

impl JobError {
    pub fn new(kind: ErrorKind, fault: Fault, detail: impl Into<String>) -> Self {
        Self {
            kind,
            fault,
            detail: detail.into(),
        }
    }

    /// What a client is told: invalid input and LLM answers are the client's business and are
    /// told in full (bounded); internal detail (paths, hosts, CUDA text) stays in the logs.
    pub fn public_reason(&self) -> String {
        match self.kind {
            ErrorKind::InvalidJob => bounded(&self.detail, 500),
            ErrorKind::Llm => format!("the planner failed: {}", bounded(&self.detail, 200)),
            ErrorKind::Storage => "storing the images failed".into(),
            ErrorKind::Model => "the model failed on this job".into(),
            ErrorKind::Internal => bounded(&self.detail, 200),
            ErrorKind::Job | ErrorKind::DuplicateId => bounded(&self.detail, 500),
            ErrorKind::Cancelled => "cancelled by request".into(),
            ErrorKind::Expired => "expired before a worker started it".into(),
        }
    }
}

/// At most `max` characters of `s`, on a character boundary.
pub fn bounded(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// What running a job came to.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// Images and `result.json` are stored; the event is to be published.
    Succeeded(ResultEvent),
    /// `result.json` already existed (a redelivered finished job, or a duplicate message): the
    /// stored event is published again, nothing is generated.
    AlreadyFinished(ResultEvent),
    /// The message is not a job this fleet runs (invalid, or an id its tenant already used for
    /// another job). `id` is the message's id when it has a usable one.
    Rejected(Rejected),
    /// An attempt failed.
    Failed {
        /// The event a terminal failure publishes (status, id, plan, attempt filled in).
        event: ResultEvent,
        error: JobError,
    },
    /// A client cancelled the job, or its `expires_at` passed before it started: nothing is
    /// stored but `result.json` (status `cancelled` or `expired`); the event is to be published.
    Cancelled(ResultEvent),
    /// Another worker holds the job's lock.
    Busy,
    /// This worker is stopping (its drain deadline passed, or a second signal came) and
    /// stopped the job: it goes back to the queue as it was, for another worker.
    HandBack,
    /// A valid job for another model of the fleet (published straight to the inbox, or to the
    /// wrong queue): sent on to that model's queue.
    Route { model: String },
    /// The message was delivered `deliveries` times and no worker finished it (each one died or
    /// lost its connection while holding it).
    Poison { id: Option<String>, deliveries: u32 },
}

/// A rejection: why, of which kind, and whether it is announced under the job's id.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub id: Option<String>,
    pub reason: String,
    /// `invalid_job`, or `duplicate_id` for an id its tenant used for another job.
    pub kind: ErrorKind,
    /// Whether the rejection is published as the id's event and status record. Not for an id
    /// that belongs to another job of the tenant (its record and events stay that job's), nor
    /// for a message no tenant can be told of (no or an unknown `user_id`): those go to the
    /// dead-letter queue and the sender's `reply_to` only.
    pub announce: bool,
}

impl Rejected {
    /// An invalid job, announced under its id.
    pub fn invalid(id: Option<String>, reason: impl Into<String>) -> Self {
        Self {
            id,
            reason: reason.into(),
            kind: ErrorKind::InvalidJob,
            announce: true,
        }
    }

    /// An id its tenant already used for another job.
    pub fn duplicate(id: String, reason: impl Into<String>) -> Self {
        Self {
            id: Some(id),
            reason: reason.into(),
            kind: ErrorKind::DuplicateId,
            announce: false,
        }
    }

    /// A message that belongs to no tenant.
    pub fn unattributable(id: Option<String>, reason: impl Into<String>) -> Self {
        Self {
            announce: false,
            ..Self::invalid(id, reason)
        }
    }
}

/// The broker side effects of an outcome. Every variant ends with the delivery acked, except
/// [`Settlement::GiveBack`] and [`Settlement::Postpone`], which republish it first.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// Publish `event` (confirmed), ack.
    Publish { event: ResultEvent },
    /// Copy the message to the dead-letter queue with `reason`, publish `event` (when
    /// `announce`), ack.
    DeadLetter {
        event: ResultEvent,
        /// The `reason` label of `r2f_dead_lettered_total`.
        label: &'static str,
        reason: String,
        /// Whether the event is published and recorded under its id (else only the dead letter
        /// and the sender's `reply_to` carry it).
        announce: bool,
    },
    /// Republish to the retry queue of backoff level `next_attempt - 1` with the attempt header
    /// set to `next_attempt`, ack.
    Retry { next_attempt: u32, reason: String },
    /// Republish unchanged (same attempt) after the give-back delay, ack: a healthy worker
    /// takes it. Counts towards pausing this worker.
    GiveBack { reason: String },
    /// Republish unchanged after the postpone delay, ack (another worker holds it).
    Postpone,
    /// Republish unchanged straight to the model's queue, ack: a stopping worker hands its job
    /// back without counting an attempt or a death.
    HandBack,
    /// Publish to the jobs exchange with `model` as routing key, ack.
    Route { model: String },
}

/// The failure policy. `attempt` is the delivery's attempt number (1-based).
pub fn decide(outcome: JobOutcome, attempt: u32, max_attempts: u32) -> Settlement {
    match outcome {
        JobOutcome::Succeeded(event)
        | JobOutcome::AlreadyFinished(event)
        | JobOutcome::Cancelled(event) => Settlement::Publish { event },
        JobOutcome::Rejected(r) => Settlement::DeadLetter {
            event: terminal_event(r.id, Outcome::Rejected, attempt, r.kind, &r.reason),
            label: r.kind.name(),
            reason: r.reason,
            announce: r.announce,
        },
        JobOutcome::Poison { id, deliveries } => {
            let reason = format!(
                "delivered {deliveries} times without finishing (each worker that took it died or lost its connection)"
            );
            Settlement::DeadLetter {
                event: terminal_event(id, Outcome::Failed, attempt, ErrorKind::Internal, &reason),
                label: POISON,
                reason,
                announce: true,
            }
        }
        JobOutcome::Busy => Settlement::Postpone,
        JobOutcome::HandBack => Settlement::HandBack,
        JobOutcome::Route { model } => Settlement::Route { model },
        JobOutcome::Failed { mut event, error } => match error.fault {
            Fault::Worker => Settlement::GiveBack {
                reason: error.detail,
            },
            Fault::Transient if attempt < max_attempts => Settlement::Retry {
                next_attempt: attempt + 1,
                reason: error.detail,
            },
            fault => {
                let reason = error.public_reason();
                event.status = Outcome::Failed;
                event.attempt = attempt;
                event.error = Some(crate::job::EventError {
                    kind: error.kind,
                    message: reason.clone(),
                });
                Settlement::DeadLetter {
                    event,
                    label: if fault == Fault::Transient {
                        MAX_ATTEMPTS
                    } else {
                        error.kind.name()
                    },
                    reason,
                    announce: true,
                }
            }
        },
    }
}

fn terminal_event(
    id: Option<String>,
    status: Outcome,
    attempt: u32,
    kind: ErrorKind,
    message: &str,
) -> ResultEvent {
    ResultEvent {
        id: id.unwrap_or_default(),
        tenant: None,
        status,
        attempt,
        outputs: vec![],
        plan: None,
        timings_ms: Default::default(),
        error: Some(crate::job::EventError {
            kind,
            message: bounded(message, 500),
        }),
        worker: String::new(),
        trace_id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> ResultEvent {
        ResultEvent {
            id: id.into(),
            tenant: None,
            status: Outcome::Succeeded,
            attempt: 1,
            outputs: vec![],
            plan: None,
            timings_ms: Default::default(),
            error: None,
            worker: "w".into(),
            trace_id: None,
        }
    }

    fn failed(fault: Fault, kind: ErrorKind) -> JobOutcome {
        JobOutcome::Failed {
            event: event("j"),
            error: JobError::new(kind, fault, "detail /secret/path"),
        }
    }

    #[test]
    fn successes_are_published() {
        for o in [
            JobOutcome::Succeeded(event("a")),
            JobOutcome::AlreadyFinished(event("a")),
        ] {
            assert_eq!(decide(o, 1, 3), Settlement::Publish { event: event("a") });
        }
    }

    #[test]
    fn rejections_are_dead_lettered_at_once_with_their_reason() {
        let s = decide(
            JobOutcome::Rejected(Rejected::invalid(Some("x".into()), "bad width")),
            1,
            3,
        );
        let Settlement::DeadLetter {
            event,
            label,
            reason,
            announce,
        } = s
        else {
            panic!("{s:?}")
        };
        assert_eq!((event.status.name(), label), ("rejected", "invalid_job"));
        assert_eq!(reason, "bad width");
        assert!(announce);
        assert_eq!(event.error.unwrap().kind, ErrorKind::InvalidJob);
        // An id taken by another job of the tenant: dead-lettered, not announced under the id.
        let s = decide(
            JobOutcome::Rejected(Rejected::duplicate("x".into(), "taken")),
            1,
            3,
        );
        assert!(
            matches!(
                &s,
                Settlement::DeadLetter {
                    label: "duplicate_id",
                    announce: false,
                    ..
                }
            ),
            "{s:?}"
        );
    }

    #[test]
    fn transient_failures_retry_until_the_last_attempt() {
        let s = decide(failed(Fault::Transient, ErrorKind::Storage), 1, 3);
        assert!(
            matches!(
                s,
                Settlement::Retry {
                    next_attempt: 2,
                    ..
                }
            ),
            "{s:?}"
        );
        let s = decide(failed(Fault::Transient, ErrorKind::Storage), 2, 3);
        assert!(
            matches!(
                s,
                Settlement::Retry {
                    next_attempt: 3,
                    ..
                }
            ),
            "{s:?}"
        );
        let s = decide(failed(Fault::Transient, ErrorKind::Storage), 3, 3);
        let Settlement::DeadLetter { event, label, .. } = s else {
            panic!("{s:?}")
        };
        assert_eq!(label, "max_attempts");
        assert_eq!(event.status, Outcome::Failed);
        assert_eq!(event.attempt, 3);
    }

    #[test]
    fn worker_faults_never_consume_the_job() {
        for attempt in [1, 3, 10] {
            let s = decide(failed(Fault::Worker, ErrorKind::Llm), attempt, 3);
            assert!(matches!(s, Settlement::GiveBack { .. }), "{s:?}");
        }
    }

    #[test]
    fn job_faults_dead_letter_with_a_short_public_reason() {
        let s = decide(failed(Fault::Job, ErrorKind::Model), 1, 3);
        let Settlement::DeadLetter { event, label, .. } = s else {
            panic!("{s:?}")
        };
        assert_eq!(label, "model");
        let message = event.error.unwrap().message;
        assert!(!message.contains("/secret/path"), "{message}");
    }

    #[test]
    fn busy_jobs_are_postponed_and_poison_is_dead_lettered() {
        assert_eq!(decide(JobOutcome::Busy, 1, 3), Settlement::Postpone);
        let s = decide(
            JobOutcome::Poison {
                id: None,
                deliveries: 3,
            },
            1,
            3,
        );
        assert!(
            matches!(
                s,
                Settlement::DeadLetter {
                    label: "poison",
                    ..
                }
            ),
            "{s:?}"
        );
    }

    #[test]
    fn bounded_cuts_on_character_boundaries() {
        assert_eq!(bounded("héllo", 2), "hé…");
        assert_eq!(bounded("ab", 5), "ab");
        assert_eq!(bounded("🦀🦀🦀", 1), "🦀…");
    }
}
