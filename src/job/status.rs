//! A job's status record, as `r2f status ID` prints it and Redis keeps it (`service::status`
//! writes and reads it): every transition of the job, and its result event once finished.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ResultEvent;

/// One transition of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Transition {
    /// `running`, `retrying`, `queued`, `succeeded`, `failed`, `rejected` or `cancelled`.
    pub state: String,
    /// The delivery attempt (1-based).
    pub attempt: u32,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// A job's status record (`r2f status ID`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobStatus {
    pub id: String,
    /// The latest state (see [`Transition::state`]).
    pub state: String,
    pub attempt: u32,
    /// The worker that wrote the latest transition.
    pub worker: String,
    pub updated_at_ms: u64,
    /// Why the job is retrying or was handed back, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every transition, oldest first.
    pub history: Vec<Transition>,
    /// The result event, once the job is finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultEvent>,
}

impl JobStatus {
    /// Whether the job is finished (`succeeded`, `failed`, `rejected` or `cancelled`).
    pub fn is_terminal(&self) -> bool {
        is_terminal(&self.state)
    }
}

pub fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "rejected" | "cancelled")
}

/// What `r2f cancel` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CancelAnswer {
    pub id: String,
    /// `requested`: the job is dropped when a worker takes it, or stops at its next denoising
    /// step if it is running; `too_late`: the job had already finished (`state`).
    pub cancel: String,
    /// The job's state when the request was made (`unknown` without a status record).
    pub state: String,
}
