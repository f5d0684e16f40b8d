//! What becomes of a job, by name: its states (status records), its outcomes (result events,
//! `result.json`, webhooks, the `status` label of `r2f_jobs_total`) and the kinds of error a
//! failed or rejected job reports. The wire spellings are written here and nowhere else.

crate::named_enum! {
    /// A job's state in its status record: where it is now.
    pub enum JobState("job state") {
        /// Accepted and waiting for a worker (also: handed back by a worker for another).
        Queued = "queued",
        /// A worker holds it.
        Running = "running",
        /// An attempt failed on a dependency; it waits in a retry queue.
        Retrying = "retrying",
        /// Its images and `result.json` are stored.
        Succeeded = "succeeded",
        /// It failed for good (its own fault, or out of attempts).
        Failed = "failed",
        /// It is not a valid job (or not one this fleet runs).
        Rejected = "rejected",
        /// A client cancelled it.
        Cancelled = "cancelled",
        /// No worker started it before its `expires_at`.
        Expired = "expired",
    }
}

crate::named_enum! {
    /// How a job ended: the `status` of its result event.
    pub enum Outcome("job status") {
        Succeeded = "succeeded",
        Failed = "failed",
        Rejected = "rejected",
        Cancelled = "cancelled",
        Expired = "expired",
    }
}

impl JobState {
    /// Whether the job is finished (succeeded, failed, rejected or cancelled).
    pub fn is_terminal(self) -> bool {
        self.outcome().is_some()
    }

    /// The outcome a terminal state records.
    pub fn outcome(self) -> Option<Outcome> {
        match self {
            JobState::Succeeded => Some(Outcome::Succeeded),
            JobState::Failed => Some(Outcome::Failed),
            JobState::Rejected => Some(Outcome::Rejected),
            JobState::Cancelled => Some(Outcome::Cancelled),
            JobState::Expired => Some(Outcome::Expired),
            JobState::Queued | JobState::Running | JobState::Retrying => None,
        }
    }
}

impl From<Outcome> for JobState {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Succeeded => JobState::Succeeded,
            Outcome::Failed => JobState::Failed,
            Outcome::Rejected => JobState::Rejected,
            Outcome::Cancelled => JobState::Cancelled,
            Outcome::Expired => JobState::Expired,
        }
    }
}

impl Outcome {
    /// The routing key of its event on the events exchange (and the webhook's event type):
    /// `job.<status>`.
    pub fn event_key(self) -> String {
        format!("job.{}", self.name())
    }
}

crate::named_enum! {
    /// Why a job failed or was rejected (`error.kind` of its result event).
    pub enum ErrorKind("error kind") {
        /// The message is not a valid job.
        InvalidJob = "invalid_job",
        /// The LLM planner failed (or answered nothing usable).
        Llm = "llm",
        /// Storing the outputs failed.
        Storage = "storage",
        /// The model failed on the job.
        Model = "model",
        /// Anything else (a lock, a time limit, the worker).
        Internal = "internal",
        /// The job's own content cannot be produced (its metadata does not fit its output
        /// format): failed at once, never retried.
        Job = "job",
        /// The id is already its tenant's for another job (a different body): the message is
        /// dead-lettered and the first job left alone.
        DuplicateId = "duplicate_id",
        /// A client cancelled the job.
        Cancelled = "cancelled",
        /// The job's `expires_at` passed before a worker started it.
        Expired = "expired",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_is_a_terminal_state_of_the_same_name() {
        for o in Outcome::ALL {
            let s = JobState::from(*o);
            assert_eq!(s.name(), o.name());
            assert!(s.is_terminal());
            assert_eq!(s.outcome(), Some(*o));
        }
        let open: Vec<&str> = JobState::ALL
            .iter()
            .filter(|s| !s.is_terminal())
            .map(|s| s.name())
            .collect();
        assert_eq!(
            open.len(),
            JobState::ALL.len() - Outcome::ALL.len(),
            "{open:?}"
        );
        assert_eq!(Outcome::Failed.event_key(), "job.failed");
    }
}
