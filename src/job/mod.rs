//! Jobs, their validation into clear rejections, and the result and progress events
//! (docs/contract.md: "Job", "Result event").

pub mod schema;
pub mod status;

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::generate::{JobMode, Params};
use crate::pipelines::sd3::plus::RegionKnobs;
use crate::plan::{Plan, PlanLimits};
use crate::r2f::regions::{check_stop_steps, RegionMask};

#[derive(Debug, Clone, Deserialize)]
/// What one job may ask of a worker (`[limits]` in the settings).
pub struct Limits {
    pub max_prompt_chars: usize,
    pub max_steps: usize,
    pub max_pixels: i64,
    pub max_images_per_job: usize,
    pub max_message_bytes: usize,
    /// Prompts in one R2F plan (the frequent prompts plus the rare one), and `r2f` prompts of
    /// one R2F+ object.
    pub max_plan_prompts: usize,
    /// Characters in any one prompt string a plan carries.
    pub max_plan_prompt_chars: usize,
    /// Objects in one R2F+ plan.
    pub max_plan_objects: usize,
}

impl Limits {
    /// The bounds a plan must keep.
    pub fn plan(&self) -> PlanLimits {
        PlanLimits {
            max_prompts: self.max_plan_prompts,
            max_prompt_chars: self.max_plan_prompt_chars,
            max_objects: self.max_plan_objects,
        }
    }
}

/// A job message as published on `r2f.jobs`. Unknown fields are ignored. The rules each field
/// must meet (a violation rejects the job) are in docs/contract.md.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct JobMessage {
    /// The idempotency key, chosen by the client: 1-128 characters of `A-Z a-z 0-9 - _ . :`.
    pub id: String,
    /// The prompt (not empty; at most `limits.max_prompt_chars` characters).
    pub prompt: String,
    /// The model to run; default: the worker's. A worker serves one model.
    #[serde(default)]
    pub model: Option<String>,
    /// `r2f` (default), `r2fplus` (SD3) or `plain`.
    #[serde(default)]
    pub mode: Option<String>,
    /// An R2F plan (`visual_detail_level`, `r2f_prompt`) or an R2F+ plan (`original_prompt`,
    /// `base_prompt`, `objects`) in the official shapes; without one the worker asks the LLM.
    #[serde(default)]
    pub plan: Option<Value>,
    /// Generation parameters; each missing one takes the model's default.
    #[serde(default)]
    pub params: JobParams,
    /// Read by `r2f enqueue` only (copied, capped, into the AMQP priority property).
    #[serde(default)]
    pub priority: Option<u8>,
    /// Where the outputs go under the storage prefix.
    #[serde(default)]
    pub output: Option<JobOutput>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
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
    /// R2F+: `ellipse` (default) or `box`, the object masks of the latent fusion.
    pub region_mask: Option<String>,
    /// R2F+: steps with bbox attention guidance (default 10).
    pub bbox_guidance_steps: Option<i64>,
    /// R2F+: gradient steps per guided step (default 5).
    pub bbox_guidance_iterations: Option<i64>,
    /// R2F+: scale of the bbox loss (default 30).
    pub bbox_loss_scale: Option<f64>,
    /// R2F+: steps after which the object latents are pasted in (default 20).
    pub latent_fusion_steps: Option<i64>,
    /// R2F+: recompute the transformer block by block in the guidance's backward pass.
    pub bbox_guidance_recompute: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
pub struct JobOutput {
    #[serde(default)]
    pub prefix: Option<String>,
    /// POST the terminal event to this URL (signed; allowed hosts only).
    #[serde(default)]
    pub webhook: Option<WebhookSpec>,
    /// `png` (default), `jpeg` or `webp`.
    #[serde(default)]
    pub format: Option<String>,
    /// 1–100, the lossy formats' quality (default 90).
    #[serde(default)]
    pub quality: Option<i64>,
}

/// The terminal states a webhook can ask for.
pub const EVENTS: [&str; 4] = ["succeeded", "failed", "rejected", "cancelled"];

/// A job's `output.webhook`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct WebhookSpec {
    /// `https://` (or `http://` where `webhook.allow_http`) URL on an allowed host.
    pub url: String,
    /// The terminal states to be told of (`succeeded`, `failed`, `rejected`, `cancelled`);
    /// default: all of them.
    #[serde(default)]
    pub events: Option<Vec<String>>,
}

impl WebhookSpec {
    /// Whether an event of `status` is to be sent.
    pub fn wants(&self, status: &str) -> bool {
        self.events
            .as_ref()
            .is_none_or(|e| e.iter().any(|x| x == status))
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
    pub schedule: crate::r2f::PromptSchedule,
    pub stop_steps: Option<crate::r2f::StopStepMap>,
    /// R2F+ knobs (defaults unless the job sets them; unused by other modes).
    pub regions: RegionKnobs,
    pub prefix: String,
    /// Checked against `webhook.*` by the worker (the settings are not known here).
    pub webhook: Option<WebhookSpec>,
    /// The outputs' file format.
    pub encoding: crate::generate::Encoding,
}

/// Why a job was rejected: the reason is what goes to the dead-letter queue and the event.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Rejection(pub String);

fn reject<T>(msg: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection(msg.into()))
}

/// The most gradient steps per guided step a job may ask for: each costs a forward and a
/// backward pass of the transformer per run.
pub const MAX_BBOX_GUIDANCE_ITERATIONS: i64 = 20;

/// The R2F+ knobs of a job's params, each checked against its bound.
fn region_knobs(
    p: &JobParams,
    schedule: crate::r2f::PromptSchedule,
    stop_steps: Option<crate::r2f::StopStepMap>,
    limits: &Limits,
) -> Result<RegionKnobs, Rejection> {
    let mut k = RegionKnobs {
        schedule,
        ..RegionKnobs::default()
    };
    if let Some(m) = stop_steps {
        k.stop_steps = m;
    }
    if let Some(m) = &p.region_mask {
        k.mask = RegionMask::parse(m).map_err(Rejection)?;
    }
    let step_count = |name: &str, v: Option<i64>, default: usize| match v {
        None => Ok(default),
        Some(v) if (0..=limits.max_steps as i64).contains(&v) => Ok(v as usize),
        Some(v) => reject(format!(
            "{name} must be between 0 and {} (got {v}; max_steps)",
            limits.max_steps
        )),
    };
    k.guidance_steps = step_count(
        "bbox_guidance_steps",
        p.bbox_guidance_steps,
        k.guidance_steps,
    )?;
    k.fusion_steps = step_count("latent_fusion_steps", p.latent_fusion_steps, k.fusion_steps)?;
    if let Some(n) = p.bbox_guidance_iterations {
        if !(0..=MAX_BBOX_GUIDANCE_ITERATIONS).contains(&n) {
            return reject(format!(
                "bbox_guidance_iterations must be between 0 and {MAX_BBOX_GUIDANCE_ITERATIONS} (got {n})"
            ));
        }
        k.guidance_iterations = n as usize;
    }
    if let Some(r) = p.bbox_guidance_recompute {
        k.recompute_blocks = r;
    }
    if let Some(s) = p.bbox_loss_scale {
        if !s.is_finite() || !(0.0..=1e6).contains(&s) {
            return reject(format!(
                "bbox_loss_scale must be between 0 and 1e6 (got {s})"
            ));
        }
        k.loss_scale = s;
    }
    Ok(k)
}

/// Faithful R2F+ refuses, before any work, what the official loop cannot run: guidance ≤ 1, a
/// non-square size, too few steps for the stop-step map (sizes and steps the job leaves to the
/// model's defaults are checked when the run starts).
fn check_faithful_regions(
    p: &JobParams,
    steps: Option<usize>,
    k: &RegionKnobs,
) -> Result<(), Rejection> {
    if k.schedule != crate::r2f::PromptSchedule::Faithful {
        return Ok(());
    }
    if let (Some(w), Some(h)) = (p.width, p.height) {
        if w != h {
            return reject(format!(
                "mode r2fplus with schedule faithful needs a square image (got {w}x{h}); use schedule clean"
            ));
        }
    }
    if let Some(g) = p.guidance {
        if g <= 1.0 {
            return reject(format!(
                "mode r2fplus with schedule faithful needs guidance above 1 (got {g}); use schedule clean"
            ));
        }
    }
    if let Some(s) = steps {
        check_stop_steps(&k.stop_steps.0, s).map_err(|e| {
            Rejection(format!(
                "mode r2fplus with schedule faithful: {e}; use 41 steps or more, or schedule clean"
            ))
        })?;
    }
    Ok(())
}

/// The id of a message that may not be a valid job (for its rejected event and the logs):
/// only a valid id (see [`valid_id`]) is returned. A body over `max_bytes` is not parsed: its
/// first 4 KiB are scanned for a top-level-looking `"id": "..."` instead.
pub fn best_effort_id(body: &[u8], max_bytes: usize) -> Option<String> {
    let id = if body.len() <= max_bytes {
        let v: Value = serde_json::from_slice(body).ok()?;
        v.get("id")?.as_str()?.to_string()
    } else {
        scan_id(&body[..body.len().min(4096)])?
    };
    valid_id(&id).then_some(id)
}

/// `"id"`, optional whitespace, `:`, optional whitespace, then a string without escapes.
fn scan_id(head: &[u8]) -> Option<String> {
    let at = head.windows(4).position(|w| w == b"\"id\"")?;
    let rest = &head[at + 4..];
    let rest = rest
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start();
    let rest = rest.strip_prefix(b"\"")?;
    let end = rest.iter().position(|&c| c == b'"' || c == b'\\')?;
    String::from_utf8(rest[..end].to_vec()).ok()
}

/// A job id: 1 to 128 characters of ASCII letters, digits, `-`, `_`, `.`, `:` (safe as a
/// storage key segment, a Redis key part and an AMQP message id).
pub fn valid_id(id: &str) -> bool {
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
            "unknown model `{model}` (known models: {})",
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
        None => crate::r2f::PromptSchedule::Faithful,
        Some(s) => match crate::r2f::PromptSchedule::parse(s) {
            Ok(k) => k,
            Err(e) => return reject(e),
        },
    };
    if let Some(s) = &p.scheduler {
        if let Err(e) = crate::schedulers::discrete::Scheduler::parse(s) {
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
    let output = msg.output.clone().unwrap_or_default();
    let format = match output.format.as_deref() {
        None | Some("png") => crate::image::ImageFormat::Png,
        Some("jpeg" | "jpg") => crate::image::ImageFormat::Jpeg,
        Some("webp") => crate::image::ImageFormat::Webp,
        Some(other) => {
            return reject(format!(
                "output format `{}` is not png, jpeg or webp",
                bounded_text(other)
            ))
        }
    };
    let quality = match output.quality {
        None => crate::image::DEFAULT_QUALITY,
        Some(q @ 1..=100) => q as u8,
        Some(q) => {
            return reject(format!(
                "output quality must be between 1 and 100 (got {q})"
            ))
        }
    };
    let plan = match &msg.plan {
        None | Some(Value::Null) => None,
        Some(v) => match Plan::from_json(v) {
            Ok(plan) => Some(plan),
            Err(e) => return reject(format!("invalid plan: {e}")),
        },
    };
    if let Some(plan) = &plan {
        plan.check_limits(&limits.plan())
            .map_err(|e| Rejection(format!("invalid plan: {e}")))?;
    }
    if mode == JobMode::R2fplus && matches!(plan, Some(Plan::R2f(_))) {
        return reject(
            "mode r2fplus was given an R2F plan: send an R2F+ plan (base_prompt and objects), or mode r2f",
        );
    }
    let regions = region_knobs(p, schedule, stop_steps, limits)?;
    if mode == JobMode::R2fplus {
        check_faithful_regions(p, steps, &regions)?;
    }
    if mode == JobMode::R2f && matches!(plan, Some(Plan::Regions(_))) {
        return reject(
            "mode r2f was given an R2F+ (regions) plan: send an R2F plan, or mode r2fplus",
        );
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
        regions,
        prefix,
        webhook: output.webhook,
        encoding: crate::generate::Encoding { format, quality },
    })
}

/// Checks what can be checked without a model: a clear message for each violated bound.
pub fn validate_params(prompt: &str, p: &Params, limits: &Limits) -> anyhow::Result<()> {
    if prompt.trim().is_empty() {
        anyhow::bail!("prompt is empty");
    }
    if prompt.chars().count() > limits.max_prompt_chars {
        anyhow::bail!(
            "prompt has {} characters, over the limit of {}",
            prompt.chars().count(),
            limits.max_prompt_chars
        );
    }
    if let Some(s) = p.steps {
        if s == 0 || s > limits.max_steps {
            anyhow::bail!("steps must be between 1 and {} (got {s})", limits.max_steps);
        }
    }
    if let Some(g) = p.guidance {
        if !g.is_finite() || !(0.0..=100.0).contains(&g) {
            anyhow::bail!("guidance must be a number between 0 and 100 (got {g})");
        }
    }
    for (name, v) in [("width", p.width), ("height", p.height)] {
        if let Some(v) = v {
            if v <= 0 || v % 16 != 0 {
                anyhow::bail!("{name} must be a positive multiple of 16 (got {v})");
            }
        }
    }
    if let (Some(w), Some(h)) = (p.width, p.height) {
        if w * h > limits.max_pixels {
            anyhow::bail!(
                "image of {w}x{h} = {} pixels is over the limit of {} pixels",
                w * h,
                limits.max_pixels
            );
        }
    }
    if let Some(s) = &p.scheduler {
        crate::schedulers::discrete::Scheduler::parse(s).map_err(anyhow::Error::msg)?;
    }
    if let Some(t) = p.t5_tokens {
        if !(1..=512).contains(&t) {
            anyhow::bail!("T5 sequence length must be between 1 and 512 (got {t})");
        }
    }
    Ok(())
}

/// At most 40 characters of a client's string, for a rejection reason.
fn bounded_text(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Error kinds of failed and rejected jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidJob,
    Llm,
    Storage,
    Model,
    Internal,
    /// A client cancelled the job (`r2f cancel`).
    Cancelled,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidJob => "invalid_job",
            ErrorKind::Llm => "llm",
            ErrorKind::Storage => "storage",
            ErrorKind::Model => "model",
            ErrorKind::Internal => "internal",
            ErrorKind::Cancelled => "cancelled",
        }
    }
}

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
    /// `succeeded`, `failed`, `rejected` or `cancelled`.
    pub status: String,
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
}

/// A progress event: `step` of `steps` denoising steps done (every image and, for R2F+, every
/// run of the job counted).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ProgressEvent {
    pub id: String,
    pub step: usize,
    pub steps: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    fn limits() -> Limits {
        Limits {
            max_prompt_chars: 100,
            max_steps: 50,
            max_pixels: 512 * 512,
            max_images_per_job: 2,
            max_message_bytes: 4096,
            max_plan_prompts: 4,
            max_plan_prompt_chars: 100,
            max_plan_objects: 2,
        }
    }

    fn models() -> Vec<String> {
        vec!["sd3".into()]
    }

    fn validate(v: &Value) -> Result<ValidJob, Rejection> {
        validate_message(v.to_string().as_bytes(), &limits(), &models(), "sd3")
    }

    fn job() -> Value {
        json!({"id": "j-1", "prompt": "a hairy frog", "mode": "plain",
               "params": {"steps": 4, "width": 256, "height": 128, "seed": 1}})
    }

    fn with(path: &[&str], value: Value) -> Value {
        let mut j = job();
        let mut at = &mut j;
        for p in &path[..path.len() - 1] {
            at = &mut at[*p];
        }
        at[path[path.len() - 1]] = value;
        j
    }

    /// An r2fplus job with `params` overrides.
    fn plus(params: &[(&str, Value)]) -> Value {
        let mut j = with(&["mode"], json!("r2fplus"));
        for (k, v) in params {
            j["params"][*k] = v.clone();
        }
        j
    }

    trait WithPlan {
        fn with_plan(self, plan: Value) -> Value;
    }

    impl WithPlan for Value {
        fn with_plan(mut self, plan: Value) -> Value {
            self["plan"] = plan;
            self
        }
    }

    #[test]
    fn r2fplus_knobs_reach_the_job_and_clean_mode_takes_any_size() {
        let j = validate(&plus(&[
            ("schedule", json!("clean")),
            ("region_mask", json!("box")),
            ("bbox_guidance_steps", json!(4)),
            ("bbox_guidance_iterations", json!(2)),
            ("bbox_loss_scale", json!(100.0)),
            ("latent_fusion_steps", json!(8)),
            ("bbox_guidance_recompute", json!(true)),
        ]))
        .unwrap();
        assert_eq!(j.mode, JobMode::R2fplus);
        let k = &j.regions;
        assert_eq!(k.mask, RegionMask::Box);
        assert_eq!(
            (k.guidance_steps, k.guidance_iterations, k.fusion_steps),
            (4, 2, 8)
        );
        assert_eq!(k.loss_scale, 100.0);
        assert!(k.recompute_blocks);
        assert_eq!(k.schedule, crate::r2f::PromptSchedule::Clean);
        // Defaults: the official values.
        let j = validate(&plus(&[("width", json!(128)), ("steps", json!(50))])).unwrap();
        assert_eq!(j.regions, RegionKnobs::default());
    }

    #[test]
    fn a_valid_job_takes_defaults_for_what_it_omits() {
        let j = validate(&json!({"id": "x", "prompt": " a frog "})).unwrap();
        assert_eq!(j.prompt, "a frog");
        assert_eq!(j.model, "sd3");
        assert_eq!(j.mode, JobMode::R2f);
        assert_eq!(j.num_images, 1);
        assert_eq!(j.params.steps, None);
        assert_eq!(j.prefix, "");
    }

    #[test]
    fn each_invalid_field_is_rejected_with_its_reason() {
        let long_id = "x".repeat(300);
        let plan_prompts: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
        let cases: Vec<(Value, &str)> = vec![
            (with(&["id"], json!("")), "invalid job id"),
            (with(&["id"], json!(long_id)), "invalid job id"),
            (with(&["id"], json!("a/b")), "invalid job id"),
            (with(&["id"], json!("..")), "invalid job id"),
            (with(&["id"], json!(7)), "invalid job"),
            (with(&["prompt"], json!("  ")), "prompt is empty"),
            (
                with(&["prompt"], json!("a".repeat(101))),
                "max_prompt_chars",
            ),
            (with(&["model"], json!("sdxl")), "unknown model"),
            (with(&["mode"], json!("r3f")), "unknown mode"),
            (with(&["params", "steps"], json!(0)), "max_steps"),
            (with(&["params", "steps"], json!(51)), "max_steps"),
            (with(&["params", "steps"], json!("4")), "invalid job"),
            (with(&["params", "guidance"], json!(-1.0)), "guidance"),
            (with(&["params", "width"], json!(100)), "multiple of 16"),
            (with(&["params", "height"], json!(-16)), "multiple of 16"),
            (with(&["params", "width"], json!(9008)), "over 8192"),
            (with(&["params", "width"], json!(4096)), "max_pixels"),
            (
                with(&["params", "num_images"], json!(3)),
                "max_images_per_job",
            ),
            (with(&["params", "schedule"], json!("fast")), "schedule"),
            (with(&["params", "scheduler"], json!("ddim")), "ddim"),
            (with(&["params", "stop_step_map"], json!("x")), "x"),
            (
                with(&["output", "prefix"], json!("../up")),
                "invalid output prefix",
            ),
            (with(&["plan"], json!({"r2f_prompt": 3})), "invalid plan"),
            (
                with(
                    &["plan"],
                    json!({"visual_detail_level": ["1", "2", "3", "4"], "r2f_prompt": [plan_prompts]}),
                ),
                "max_plan_prompts",
            ),
            // R2F+ in faithful mode (the default): what the official loop cannot run.
            (with(&["mode"], json!("r2fplus")), "needs a square image"),
            (
                plus(&[("width", json!(128)), ("guidance", json!(1.0))]),
                "guidance above 1",
            ),
            (
                plus(&[("width", json!(128)), ("steps", json!(40))]),
                "41 steps",
            ),
            // R2F+ knobs out of bounds, in any mode.
            (
                with(&["params", "region_mask"], json!("star")),
                "region mask",
            ),
            (
                with(&["params", "bbox_guidance_iterations"], json!(21)),
                "bbox_guidance_iterations",
            ),
            (
                with(&["params", "bbox_loss_scale"], json!(-1.0)),
                "bbox_loss_scale",
            ),
            (
                with(&["params", "bbox_guidance_steps"], json!(51)),
                "max_steps",
            ),
            (
                with(&["params", "latent_fusion_steps"], json!(-1)),
                "max_steps",
            ),
            (
                plus(&[("width", json!(128))]).with_plan(json!(
                    {"visual_detail_level": "3", "r2f_prompt": [["a frog", "a hairy frog"]]}
                )),
                "was given an R2F plan",
            ),
            (json!([1, 2]), "not a JSON object"),
        ];
        for (msg, want) in cases {
            let err = validate(&msg)
                .err()
                .unwrap_or_else(|| panic!("accepted: {msg}"));
            assert!(
                err.0.contains(want),
                "{msg}: `{}` should say `{want}`",
                err.0
            );
        }
    }

    #[test]
    fn a_r2f_job_with_a_regions_plan_is_rejected() {
        let plan = json!({"original_prompt": "a frog and a cat", "base_prompt": "a frog and a cat",
            "objects": {"#1": {"prompt": "a frog", "object": "frog", "r2f": ["an animal", "a frog"],
                                "visual_detail_levels": ["3"], "bbox": [0.0, 0.0, 0.5, 0.5]}}});
        let mut j = with(&["plan"], plan);
        j["mode"] = json!("r2f");
        let err = validate(&j).expect_err("rejected");
        assert!(err.0.contains("R2F+"), "{}", err.0);
    }

    #[test]
    fn oversized_and_non_utf8_bodies_are_rejected_before_parsing() {
        let big = format!("{{\"id\": \"big-1\", \"pad\": \"{}\"}}", "x".repeat(5000));
        let err = validate_message(big.as_bytes(), &limits(), &models(), "sd3").unwrap_err();
        assert!(err.0.contains("max_message_bytes"), "{}", err.0);
        assert_eq!(
            best_effort_id(big.as_bytes(), 4096).as_deref(),
            Some("big-1")
        );
        let err = validate_message(b"\xff\xfe{", &limits(), &models(), "sd3").unwrap_err();
        assert!(err.0.contains("not valid JSON"), "{}", err.0);
    }

    #[test]
    fn best_effort_ids_are_only_valid_ids() {
        let long = format!("{{\"id\": \"{}\"}}", "a".repeat(300));
        assert_eq!(best_effort_id(long.as_bytes(), 4096), None);
        assert_eq!(best_effort_id(b"{\"id\": \"a\\nb\"}", 4096), None);
        assert_eq!(best_effort_id(b"not json", 4096), None);
        assert_eq!(
            best_effort_id(b"{\"id\": \"ok-1\"}", 4096).as_deref(),
            Some("ok-1")
        );
    }

    /// A random JSON value of bounded depth, biased towards the job's own field names.
    fn random_json(rng: &mut rand::rngs::StdRng, depth: u32) -> Value {
        const KEYS: [&str; 14] = [
            "id",
            "prompt",
            "model",
            "mode",
            "plan",
            "params",
            "steps",
            "width",
            "height",
            "output",
            "prefix",
            "r2f_prompt",
            "visual_detail_level",
            "objects",
        ];
        match rng.random_range(0..if depth == 0 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => json!(rng.random::<bool>()),
            2 => json!(rng.random_range(-70000i64..70000)),
            3 => json!(rng.random::<f64>() * 1e6 - 5e5),
            4 => {
                let pool = [
                    "", "a", "Ⱥ", "K", "🦀", "..", "a/b", "r2f", "plain", "sd3", "3",
                ];
                json!(pool[rng.random_range(0..pool.len())].repeat(rng.random_range(0..4)))
            }
            5 => Value::Array(
                (0..rng.random_range(0..4))
                    .map(|_| random_json(rng, depth - 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..rng.random_range(0..6))
                    .map(|_| {
                        let k = KEYS[rng.random_range(0..KEYS.len())].to_string();
                        (k, random_json(rng, depth - 1))
                    })
                    .collect(),
            ),
        }
    }

    /// Arbitrary bytes and arbitrary JSON never panic: they give a job or a rejection.
    #[test]
    fn arbitrary_input_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(20261130);
        for _ in 0..3000 {
            let len = rng.random_range(0..300);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let _ = validate_message(&bytes, &limits(), &models(), "sd3");
            let _ = best_effort_id(&bytes, 100);
        }
        for _ in 0..5000 {
            let v = random_json(&mut rng, 4);
            let _ = validate(&v);
            // And mutations of a valid job, one field at a time.
            let mut j = job();
            let key = ["id", "prompt", "mode", "plan", "params", "output", "model"]
                [rng.random_range(0..7)];
            j[key] = random_json(&mut rng, 3);
            let _ = validate(&j);
        }
        // Deep nesting is refused by the parser's recursion limit, not by a stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let big = Limits {
            max_message_bytes: 1 << 20,
            ..limits()
        };
        assert!(validate_message(deep.as_bytes(), &big, &models(), "sd3").is_err());
    }
}
