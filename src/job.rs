//! Jobs, their validation into clear rejections, and the result and progress events
//! (CONTRACT.md: "Job", "Result event").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Limits;
use crate::generate::Params;
use crate::plan::Plan;

/// A job message as published on `r2f.jobs`. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct JobMessage {
    pub id: String,
    pub prompt: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub plan: Option<Value>,
    #[serde(default)]
    pub params: JobParams,
    #[serde(default)]
    pub priority: Option<u8>,
    #[serde(default)]
    pub output: Option<JobOutput>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct JobParams {
    pub steps: Option<i64>,
    pub guidance: Option<f64>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub seed: Option<i64>,
    pub num_images: Option<i64>,
    pub negative_prompt: Option<String>,
    pub schedule: Option<String>,
    pub scheduler: Option<String>,
    /// `paper` or `head` (R2F level -> stop-step map); default: the model's own.
    pub stop_step_map: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct JobOutput {
    #[serde(default)]
    pub prefix: Option<String>,
}

/// How a job's prompt conditions the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobMode {
    R2f,
    R2fplus,
    Plain,
}

impl JobMode {
    pub fn name(self) -> &'static str {
        match self {
            JobMode::R2f => "r2f",
            JobMode::R2fplus => "r2fplus",
            JobMode::Plain => "plain",
        }
    }
}

/// A job that passed validation: everything the pipeline needs, bounded.
#[derive(Debug, Clone)]
pub struct ValidJob {
    pub id: String,
    pub prompt: String,
    pub model: String,
    pub mode: JobMode,
    pub plan: Option<Plan>,
    pub params: Params,
    pub num_images: usize,
    pub schedule: crate::r2f::ScheduleKind,
    pub stop_steps: Option<crate::r2f::StopStepMap>,
    pub prefix: String,
}

/// Why a job was rejected: the reason is what goes to the dead-letter queue and the event.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Rejection(pub String);

fn reject<T>(msg: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection(msg.into()))
}

/// The id of a message that may not even be valid JSON (for the rejected event).
pub fn best_effort_id(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("id")?.as_str().map(str::to_string)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

fn valid_prefix(p: &str) -> bool {
    p.len() <= 512
        && !p.starts_with('/')
        && p.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '='))
        })
}

/// Parses and validates a message body against the limits and the models this worker knows.
pub fn validate_message(
    body: &[u8],
    limits: &Limits,
    known_models: &[String],
    default_model: &str,
) -> Result<ValidJob, Rejection> {
    if body.len() > limits.max_message_bytes {
        return reject(format!(
            "message of {} bytes is over the limit of {} bytes (max_message_bytes)",
            body.len(),
            limits.max_message_bytes
        ));
    }
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return reject(format!("message is not valid JSON: {e}")),
    };
    if !value.is_object() {
        return reject("message is not a JSON object");
    }
    let msg: JobMessage = match serde_json::from_value(value) {
        Ok(m) => m,
        Err(e) => return reject(format!("invalid job: {e}")),
    };
    if !valid_id(&msg.id) {
        return reject(
            "invalid job id: 1 to 128 characters of letters, digits, '-', '_', '.', ':'",
        );
    }
    let prompt = msg.prompt.trim().to_string();
    if prompt.is_empty() {
        return reject("prompt is empty");
    }
    let chars = prompt.chars().count();
    if chars > limits.max_prompt_chars {
        return reject(format!(
            "prompt has {chars} characters, over the limit of {} (max_prompt_chars)",
            limits.max_prompt_chars
        ));
    }
    let model = msg
        .model
        .clone()
        .unwrap_or_else(|| default_model.to_string());
    if !known_models.contains(&model) {
        return reject(format!(
            "unknown model `{model}` (this worker serves: {})",
            known_models.join(", ")
        ));
    }
    let mode = match msg.mode.as_deref().unwrap_or("r2f") {
        "r2f" => JobMode::R2f,
        "r2fplus" => JobMode::R2fplus,
        "plain" => JobMode::Plain,
        other => {
            return reject(format!(
                "unknown mode `{other}` (expected r2f, r2fplus or plain)"
            ))
        }
    };
    let p = &msg.params;
    let steps = match p.steps {
        None => None,
        Some(s) if s >= 1 && (s as usize) <= limits.max_steps => Some(s as usize),
        Some(s) => {
            return reject(format!(
                "steps must be between 1 and {} (got {s}; max_steps)",
                limits.max_steps
            ))
        }
    };
    if let Some(g) = p.guidance {
        if !g.is_finite() || !(0.0..=100.0).contains(&g) {
            return reject(format!("guidance must be between 0 and 100 (got {g})"));
        }
    }
    for (name, v) in [("width", p.width), ("height", p.height)] {
        if let Some(v) = v {
            if v <= 0 || v % 16 != 0 {
                return reject(format!(
                    "{name} must be a positive multiple of 16 (got {v})"
                ));
            }
            if v > 8192 {
                return reject(format!("{name} of {v} is over 8192"));
            }
        }
    }
    if let (Some(w), Some(h)) = (p.width, p.height) {
        if w * h > limits.max_pixels {
            return reject(format!(
                "image of {w}x{h} = {} pixels is over the limit of {} (max_pixels)",
                w * h,
                limits.max_pixels
            ));
        }
    }
    let num_images = match p.num_images {
        None => 1,
        Some(n) if n >= 1 && (n as usize) <= limits.max_images_per_job => n as usize,
        Some(n) => {
            return reject(format!(
                "num_images must be between 1 and {} (got {n}; max_images_per_job)",
                limits.max_images_per_job
            ))
        }
    };
    let schedule = match p.schedule.as_deref() {
        None => crate::r2f::ScheduleKind::Faithful,
        Some(s) => match crate::r2f::ScheduleKind::parse(s) {
            Ok(k) => k,
            Err(e) => return reject(e),
        },
    };
    if let Some(s) = &p.scheduler {
        if let Err(e) = crate::schedulers::discrete::SamplerKind::parse(s) {
            return reject(e);
        }
    }
    let stop_steps = match p.stop_step_map.as_deref() {
        None => None,
        Some(s) => match crate::r2f::StopStepMap::parse(s) {
            Ok(m) => Some(m),
            Err(e) => return reject(e),
        },
    };
    if let Some(neg) = &p.negative_prompt {
        if neg.chars().count() > limits.max_prompt_chars {
            return reject(format!(
                "negative prompt is over the limit of {} characters (max_prompt_chars)",
                limits.max_prompt_chars
            ));
        }
    }
    let prefix = msg
        .output
        .as_ref()
        .and_then(|o| o.prefix.clone())
        .unwrap_or_default();
    let prefix = prefix.trim_matches('/').to_string();
    if !prefix.is_empty() && !valid_prefix(&prefix) {
        return reject(format!("invalid output prefix `{prefix}`"));
    }
    let plan = match &msg.plan {
        None | Some(Value::Null) => None,
        Some(v) => match Plan::from_json(v, &prompt) {
            Ok(plan) => Some(plan),
            Err(e) => return reject(format!("invalid plan: {e}")),
        },
    };
    if mode == JobMode::R2fplus {
        return reject("mode r2fplus is not supported by this worker yet");
    }
    Ok(ValidJob {
        id: msg.id,
        prompt,
        model,
        mode,
        plan,
        params: Params {
            steps,
            guidance: p.guidance,
            seed: p.seed.unwrap_or(0),
            width: p.width,
            height: p.height,
            negative_prompt: p.negative_prompt.clone().unwrap_or_default(),
            t5_tokens: None,
            scheduler: p.scheduler.clone(),
        },
        num_images,
        schedule,
        stop_steps,
        prefix,
    })
}

/// Error kinds of failed and rejected jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidJob,
    Llm,
    Storage,
    Model,
    Internal,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidJob => "invalid_job",
            ErrorKind::Llm => "llm",
            ErrorKind::Storage => "storage",
            ErrorKind::Model => "model",
            ErrorKind::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputImage {
    pub uri: String,
    pub width: i64,
    pub height: i64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventError {
    pub kind: ErrorKind,
    pub message: String,
}

/// The result event (and the content of `<id>/result.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResultEvent {
    pub id: String,
    pub status: String,
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgressEvent {
    pub id: String,
    pub step: usize,
    pub steps: usize,
}
