//! What r2f tells clients about a job: the result event (also the job's `result.json`, the
//! body of its webhook and its reply), and progress events.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::generate::GenerationRecord;
use crate::job::state::{ErrorKind, Outcome};

/// One stored image of a job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct OutputImage {
    pub uri: String,
    pub width: i64,
    pub height: i64,
    pub sha256: String,
    /// An HTTPS URL that downloads the image without credentials until it expires
    /// (`storage.presign_ttl_secs`; S3 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The image's generation record: the same fields its own metadata carries (PNG text
    /// chunks, XMP), typed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<GenerationRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct EventError {
    pub kind: ErrorKind,
    pub message: String,
}

/// The result event (and the content of `<id>/result.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct ResultEvent {
    /// The job's id (empty when a rejected message had none that could be read).
    pub id: String,
    /// The job's tenant, in a multi-tenant fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// How the job ended.
    pub status: Outcome,
    /// The delivery attempt that produced this event (1 for the first).
    pub attempt: u32,
    #[serde(default)]
    pub outputs: Vec<OutputImage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Value>,
    #[serde(default)]
    pub timings_ms: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<EventError>,
    pub worker: String,
    /// The W3C trace id of the job's trace, when the job came with a `traceparent` or traces are
    /// exported: the id to look the job up by in the tracing back-end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// A worker took the job (`job.started`): its attempt and the worker.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct StartedEvent {
    pub id: String,
    /// The job's tenant, in a multi-tenant fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub attempt: u32,
    pub worker: String,
    /// The W3C trace id of the job's trace, when the job came with a `traceparent` or traces are
    /// exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// A progress event: `step` of `steps` denoising steps done (every image and, for R2F+, every
/// run of the job counted).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ProgressEvent {
    pub id: String,
    /// The job's tenant, in a multi-tenant fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub step: usize,
    pub steps: usize,
    /// The attempt this run is (progress restarts with each attempt).
    #[serde(default)]
    pub attempt: u32,
    /// An estimate of the milliseconds left, from the pace of the steps so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
    /// The W3C trace id of the job's trace (see `StartedEvent.trace_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}
