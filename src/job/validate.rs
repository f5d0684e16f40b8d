//! Parse, don't validate: a message body becomes a [`ValidJob`] once, or a [`Rejection`] with
//! its reason. Every check of a field is its rule's ([`crate::job::rules`]); what is checked here
//! besides is what spans fields: the mode and its plan, the pixel count of a size, and what the
//! official R2F+ loop cannot run.
//!
//! `r2f generate`, `r2f enqueue` and the worker all go through [`JobMessage::validate`].

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::generate::{Encoding, JobMode, Mode, Params};
use crate::image::{ImageFormat, DEFAULT_QUALITY};
use crate::job::rules::{check_prefix, invalid_id, valid_id, Limits, Rejection, Rules};
use crate::job::wire::{JobMessage, JobParams, WebhookSpec};
use crate::pipelines::sd3::plus::RegionKnobs;
use crate::plan::{Plan, R2fPlan, RegionPlan};
use crate::r2f::regions::check_stop_steps;
use crate::r2f::{PromptSchedule, StopStepMap};

/// A job's mode with what it brings: a plan of the mode's own kind, or none (the planner makes
/// one). A mode with a plan of the other kind cannot be represented.
#[derive(Debug, Clone, PartialEq)]
pub enum ModeSpec {
    /// The base model with the prompt alone (a plan, if given, is checked and not used).
    Plain,
    R2f {
        plan: Option<R2fPlan>,
        schedule: PromptSchedule,
        /// None: the model family's map.
        stop_steps: Option<StopStepMap>,
    },
    R2fPlus {
        plan: Option<RegionPlan>,
        knobs: RegionKnobs,
    },
}

impl ModeSpec {
    pub fn mode(&self) -> JobMode {
        match self {
            ModeSpec::Plain => JobMode::Plain,
            ModeSpec::R2f { .. } => JobMode::R2f,
            ModeSpec::R2fPlus { .. } => JobMode::R2fplus,
        }
    }

    /// Whether the job brings its own plan (a mode that needs one and has none asks the LLM).
    pub fn needs_planner(&self) -> bool {
        matches!(
            self,
            ModeSpec::R2f { plan: None, .. } | ModeSpec::R2fPlus { plan: None, .. }
        )
    }

    /// The mode to run: with the job's own plan, or with `planned` (the planner's plan for a
    /// job that brought none). The error says which plan is missing or of the wrong kind.
    pub fn into_mode(self, planned: Option<Plan>) -> Result<Mode, String> {
        match (self, planned) {
            (ModeSpec::Plain, _) => Ok(Mode::Plain),
            (
                ModeSpec::R2f {
                    plan,
                    schedule,
                    stop_steps,
                },
                planned,
            ) => {
                let plan = match (plan, planned) {
                    (Some(p), _) | (None, Some(Plan::R2f(p))) => p,
                    (None, Some(Plan::Regions(_))) => {
                        return Err("mode r2f needs an R2F plan, not an R2F+ plan".into())
                    }
                    (None, None) => return Err("mode r2f needs a plan".into()),
                };
                Ok(Mode::R2f {
                    plan,
                    schedule,
                    stop_steps,
                })
            }
            (ModeSpec::R2fPlus { plan, knobs }, planned) => {
                let plan = match (plan, planned) {
                    (Some(p), _) | (None, Some(Plan::Regions(p))) => p,
                    (None, Some(Plan::R2f(_))) => {
                        return Err("mode r2fplus needs an R2F+ plan, not an R2F plan".into())
                    }
                    (None, None) => return Err("mode r2fplus needs a plan".into()),
                };
                Ok(Mode::R2fPlus { plan, knobs })
            }
        }
    }

    /// The plan the job brought, in its official JSON shape.
    pub fn plan_json(&self) -> Option<Value> {
        match self {
            ModeSpec::R2f { plan: Some(p), .. } => Some(Plan::R2f(p.clone()).to_json()),
            ModeSpec::R2fPlus { plan: Some(p), .. } => Some(Plan::Regions(p.clone()).to_json()),
            _ => None,
        }
    }
}

/// A job that passed validation: everything the pipeline needs, bounded.
#[derive(Debug, Clone)]
pub struct ValidJob {
    pub id: String,
    /// The prompt, trimmed.
    pub prompt: String,
    pub model: String,
    pub spec: ModeSpec,
    pub params: Params,
    pub num_images: usize,
    /// The output prefix without leading or trailing slashes.
    pub prefix: String,
    /// Checked against `webhook.*` by the worker (the settings are not known here).
    pub webhook: Option<WebhookSpec>,
    /// The outputs' file format.
    pub encoding: Encoding,
    /// `output.c2pa`: whether to sign a C2PA manifest into the images (None: the deployment's
    /// default; checked against its signing key by the worker).
    pub c2pa: Option<bool>,
    /// When the job expires (Unix milliseconds), from `expires_at`.
    pub expires_at_ms: Option<u64>,
    /// The SHA-256 (hex) of the message as read (its fields in a fixed order, unknown fields
    /// left out): two messages with one id are the same job only when this matches.
    pub fingerprint: String,
}

fn reject<T>(msg: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection(msg.into()))
}

impl JobMessage {
    /// Reads a message body: at most `max_message_bytes`, UTF-8 JSON, an object, each field of
    /// its type. The error names the field (`params.steps: invalid type: …`).
    pub fn parse(body: &[u8], limits: &Limits) -> Result<JobMessage, Rejection> {
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
        // serde reads a struct from an array too (its fields in order); a job's objects are
        // objects.
        for path in ["params", "output", "output.webhook"] {
            let field = path.split('.').try_fold(&value, |v, k| v.get(k));
            if let Some(v) = field.filter(|v| !v.is_null() && !v.is_object()) {
                return reject(format!(
                    "invalid job: {path}: invalid type: {}, expected an object",
                    json_type(v)
                ));
            }
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            Rejection(if path == "." {
                format!("invalid job: {inner}")
            } else {
                format!("invalid job: {path}: {inner}")
            })
        })
    }

    /// Checks every rule and builds the job. `models`: the model names that have a queue (None:
    /// any name, as `r2f generate` takes a folder or a Hub id); `default_model` stands for a
    /// job that names none.
    pub fn validate(
        self,
        limits: &Limits,
        models: Option<&[String]>,
        default_model: &str,
    ) -> Result<ValidJob, Rejection> {
        let rules = Rules::new(limits);
        let fingerprint = hex::encode(Sha256::digest(
            serde_json::to_vec(&self).unwrap_or_default(),
        ));
        if !valid_id(&self.id) {
            return Err(invalid_id());
        }
        rules.prompt.check(&self.prompt)?;
        let model = self.model.unwrap_or_else(|| default_model.to_string());
        if let Some(models) = models {
            if !models.contains(&model) {
                let shown: String = model.chars().take(40).collect();
                return reject(format!(
                    "unknown model `{shown}` (known models: {})",
                    models.join(", ")
                ));
            }
        }
        let p = &self.params;
        let steps = rules.steps.check_opt(p.steps)?.map(|s| s as usize);
        let guidance = rules.guidance.check_opt(p.guidance)?;
        let width = rules.width.check_opt(p.width)?;
        let height = rules.height.check_opt(p.height)?;
        rules.check_pixels(width, height)?;
        let seed = rules.seed.check_opt(p.seed)?.unwrap_or(0);
        let num_images = rules.num_images.check_opt(p.num_images)?.unwrap_or(1) as usize;
        if let Some(neg) = &p.negative_prompt {
            rules.negative_prompt.check(neg)?;
        }
        rules.priority.check_opt(self.priority)?;
        let expires_at_ms = match &self.expires_at {
            None => None,
            Some(t) => Some(
                chrono::DateTime::parse_from_rfc3339(t)
                    .map_err(|e| {
                        Rejection(format!(
                            "expires_at: `{}` is not an RFC 3339 time ({e})",
                            t.chars().take(64).collect::<String>()
                        ))
                    })?
                    .timestamp_millis()
                    .max(0) as u64,
            ),
        };
        let output = self.output.unwrap_or_default();
        let prefix = check_prefix(output.prefix.as_deref().unwrap_or(""))?;
        let quality = rules
            .quality
            .check_opt(output.quality)?
            .map_or(DEFAULT_QUALITY, |q| q as u8);
        let encoding = Encoding {
            format: output.format.unwrap_or(ImageFormat::Png),
            quality,
        };
        if let Some(webhook) = &output.webhook {
            if webhook.events.as_ref().is_some_and(Vec::is_empty) {
                return reject("output.webhook.events is empty (leave it out for every status)");
            }
        }
        let knobs = region_knobs(&rules, p)?;
        let plan = match &self.plan {
            None | Some(Value::Null) => None,
            Some(v) => {
                let plan =
                    Plan::from_json(v).map_err(|e| Rejection(format!("invalid plan: {e}")))?;
                plan.check_limits(&limits.plan())
                    .map_err(|e| Rejection(format!("invalid plan: {e}")))?;
                Some(plan)
            }
        };
        let spec = match (self.mode.unwrap_or(JobMode::R2f), plan) {
            (JobMode::Plain, _) => ModeSpec::Plain,
            (JobMode::R2f, None) => ModeSpec::R2f {
                plan: None,
                schedule: knobs.schedule,
                stop_steps: p.stop_step_map.map(|m| m.map()),
            },
            (JobMode::R2f, Some(Plan::R2f(plan))) => ModeSpec::R2f {
                plan: Some(plan),
                schedule: knobs.schedule,
                stop_steps: p.stop_step_map.map(|m| m.map()),
            },
            (JobMode::R2f, Some(Plan::Regions(_))) => {
                return reject(
                    "mode r2f was given an R2F+ (regions) plan: send an R2F plan, or mode r2fplus",
                )
            }
            (JobMode::R2fplus, Some(Plan::R2f(_))) => {
                return reject(
                    "mode r2fplus was given an R2F plan: send an R2F+ plan (base_prompt and objects), or mode r2f",
                )
            }
            (JobMode::R2fplus, plan) => {
                check_faithful_regions(p, steps, &knobs)?;
                ModeSpec::R2fPlus {
                    plan: plan.and_then(|p| match p {
                        Plan::Regions(r) => Some(r),
                        Plan::R2f(_) => None,
                    }),
                    knobs,
                }
            }
        };
        let prompt = self.prompt.trim().to_string();
        Ok(ValidJob {
            id: self.id,
            prompt,
            model,
            spec,
            params: Params {
                steps,
                guidance,
                seed,
                width,
                height,
                negative_prompt: p.negative_prompt.clone().unwrap_or_default(),
                t5_tokens: None,
                scheduler: p.scheduler,
            },
            num_images,
            prefix,
            webhook: output.webhook,
            encoding,
            c2pa: output.c2pa,
            expires_at_ms,
            fingerprint,
        })
    }
}

/// The JSON type of a value, as serde names it in errors.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "sequence",
        Value::Object(_) => "map",
    }
}

/// Parses and validates a message body against the limits and the models of the fleet.
pub fn validate_message(
    body: &[u8],
    limits: &Limits,
    models: &[String],
    default_model: &str,
) -> Result<ValidJob, Rejection> {
    JobMessage::parse(body, limits)?.validate(limits, Some(models), default_model)
}

/// The R2F+ knobs of a job's params, each checked against its rule (in every mode).
fn region_knobs(rules: &Rules, p: &JobParams) -> Result<RegionKnobs, Rejection> {
    let mut k = RegionKnobs {
        schedule: p.schedule.unwrap_or_default(),
        ..RegionKnobs::default()
    };
    if let Some(m) = p.stop_step_map {
        k.stop_steps = m.map();
    }
    if let Some(m) = p.region_mask {
        k.mask = m;
    }
    let count = |v: Option<i64>| v.map(|v| v as usize);
    k.guidance_steps = count(rules.bbox_guidance_steps.check_opt(p.bbox_guidance_steps)?)
        .unwrap_or(k.guidance_steps);
    k.fusion_steps = count(rules.latent_fusion_steps.check_opt(p.latent_fusion_steps)?)
        .unwrap_or(k.fusion_steps);
    k.guidance_iterations = count(
        rules
            .bbox_guidance_iterations
            .check_opt(p.bbox_guidance_iterations)?,
    )
    .unwrap_or(k.guidance_iterations);
    k.loss_scale = rules
        .bbox_loss_scale
        .check_opt(p.bbox_loss_scale)?
        .unwrap_or(k.loss_scale);
    if let Some(r) = p.bbox_guidance_recompute {
        k.recompute_blocks = r;
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
    if k.schedule != PromptSchedule::Faithful {
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
                "mode r2fplus with schedule faithful: {e}; use {} steps or more, or schedule clean",
                min_faithful_steps(&k.stop_steps)
            ))
        })?;
    }
    Ok(())
}

/// The fewest steps a faithful R2F+ run with `map` can take: one more than its last stop step.
pub fn min_faithful_steps(map: &StopStepMap) -> usize {
    map.0.last().copied().unwrap_or(0) + 1
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

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
