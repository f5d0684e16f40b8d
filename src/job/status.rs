//! A job's status record, as `r2f status ID` prints it and Redis keeps it (`service::status`
//! writes and reads it): every transition of the job, and its result event once finished.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::job::event::ResultEvent;
use crate::job::state::JobState;

/// One transition of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Transition {
    pub state: JobState,
    /// The delivery attempt (1-based).
    pub attempt: u32,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// A job's status record (`r2f status ID`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobStatus {
    pub id: String,
    /// The latest state.
    pub state: JobState,
    pub attempt: u32,
    /// The worker that wrote the latest transition.
    pub worker: String,
    pub updated_at_ms: u64,
    /// Why the job is retrying or was handed back, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The transitions, oldest first: the first one and the latest 31 (a job retried or
    /// handed back many times does not grow its record without bound).
    pub history: Vec<Transition>,
    /// While `running`: denoising steps done, of `steps` (every image and, for R2F+, every run
    /// of the job counted), updated as progress events are published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// While `running`: an estimate of the milliseconds left, from the pace of the steps so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
    /// The result event, once the job is finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultEvent>,
}

/// The most transitions a status record keeps.
pub const HISTORY_MAX: usize = 32;

impl JobStatus {
    /// Appends a transition, keeping the first and the latest ones within [`HISTORY_MAX`].
    pub fn push_transition(history: &mut Vec<Transition>, t: Transition) {
        history.push(t);
        if history.len() > HISTORY_MAX {
            history.drain(1..history.len() - (HISTORY_MAX - 1));
        }
    }

    /// Whether the job is finished (succeeded, failed, rejected or cancelled).
    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal()
    }
}

crate::named_enum! {
    /// What `r2f cancel` did.
    pub enum CancelVerdict("cancel verdict") {
        /// The job is dropped when a worker takes it, or stops at its next denoising step if
        /// it is running.
        Requested = "requested",
        /// The job had already finished.
        TooLate = "too_late",
        /// The request was refused (`reason` says why).
        Invalid = "invalid",
    }
}

/// What `r2f cancel` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CancelAnswer {
    pub id: String,
    pub cancel: CancelVerdict,
    /// The job's state when the request was made (`unknown` without a status record).
    #[serde(with = "state_or_unknown")]
    #[schemars(with = "String")]
    pub state: Option<JobState>,
    /// Why a request was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A state, or `unknown` for none.
mod state_or_unknown {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::job::state::JobState;

    const UNKNOWN: &str = "unknown";

    pub fn serialize<S: Serializer>(s: &Option<JobState>, ser: S) -> Result<S::Ok, S::Error> {
        match s {
            Some(state) => state.serialize(ser),
            None => ser.serialize_str(UNKNOWN),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<JobState>, D::Error> {
        let text = String::deserialize(d)?;
        if text == UNKNOWN {
            return Ok(None);
        }
        JobState::parse(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_first_and_the_latest_transitions() {
        let mut h = Vec::new();
        for i in 0..100u64 {
            let state = if i == 0 {
                JobState::Queued
            } else {
                JobState::Running
            };
            JobStatus::push_transition(
                &mut h,
                Transition {
                    state,
                    attempt: 1,
                    at_ms: i,
                },
            );
            assert!(h.len() <= HISTORY_MAX);
        }
        assert_eq!(h.len(), HISTORY_MAX);
        assert_eq!(h[0].at_ms, 0);
        assert_eq!(h[1].at_ms, 100 - (HISTORY_MAX as u64 - 1));
        assert_eq!(h.last().unwrap().at_ms, 99);
    }
}
