//! A job as clients write it (docs/contract.md, "Job"): the message published on `r2f.jobs`, in
//! Rust types whose closed sets are the core's named enums. Unknown fields are ignored. Reading a
//! message into these types is the first half of validation; the rules of
//! [`crate::job::rules`] are the second ([`crate::job::validate`]).

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::generate::JobMode;
use crate::image::ImageFormat;
use crate::job::state::Outcome;
use crate::r2f::regions::RegionMask;
use crate::r2f::{PromptSchedule, StopStepMapName};
use crate::schedulers::discrete::Scheduler;

/// A job message as published on `r2f.jobs`. The rules each field must meet (a violation
/// rejects the job) are in docs/contract.md and in this schema's bounds.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
pub struct JobMessage {
    /// The idempotency key, chosen by the client: 1-128 characters of `A-Z a-z 0-9 - _ . :`.
    pub id: String,
    /// The prompt (not blank; at most `limits.max_prompt_chars` characters).
    pub prompt: String,
    /// The model to run; default: the fleet's default model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `r2f` (default), `r2fplus` (SD3) or `plain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<JobMode>,
    /// An R2F plan (`visual_detail_level`, `r2f_prompt`) or an R2F+ plan (`original_prompt`,
    /// `base_prompt`, `objects`) in the official shapes; without one the worker asks the LLM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Value>,
    /// Generation parameters; each missing one takes the model's default.
    #[serde(default)]
    pub params: JobParams,
    /// 0–255, copied by `r2f enqueue` into the AMQP priority property, capped at
    /// `amqp.max_priority` (10).
    #[serde(
        default,
        deserialize_with = "integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub priority: Option<i64>,
    /// Where the outputs go, and in which format; who is told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<JobOutput>,
    /// An RFC 3339 time (`2026-12-07T18:00:00Z`): a job no worker has started by then ends
    /// `expired`, without being generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
pub struct JobParams {
    /// Denoising steps (1 to `limits.max_steps`); default: the model's for the mode.
    #[serde(
        default,
        deserialize_with = "integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub steps: Option<i64>,
    /// Classifier-free guidance scale, 0–100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    /// A multiple of 16 up to 8192 (and within the model's size and `limits.max_pixels`).
    #[serde(
        default,
        deserialize_with = "integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub width: Option<i64>,
    /// A multiple of 16 up to 8192 (and within the model's size and `limits.max_pixels`).
    #[serde(
        default,
        deserialize_with = "integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub height: Option<i64>,
    /// Image `i` uses `seed + i`; default 0.
    #[serde(
        default,
        deserialize_with = "integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub seed: Option<i64>,
    /// Images of the job (1 to `limits.max_images_per_job`).
    #[serde(
        default,
        deserialize_with = "integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub num_images: Option<i64>,
    /// At most `limits.max_prompt_chars` characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// How R2F picks each step's prompt: `faithful` (default) or `clean`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<PromptSchedule>,
    /// The SDXL sampler; default: the model's scheduler in plain mode, DPM-Solver++ 2M Karras
    /// in R2F mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<Scheduler>,
    /// `paper` or `head` (R2F level -> stop-step map); default: the model's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_step_map: Option<StopStepMapName>,
    /// R2F+: `ellipse` (default) or `box`, the object masks of the latent fusion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_mask: Option<RegionMask>,
    /// R2F+: steps with bbox attention guidance (default 10).
    #[serde(
        default,
        deserialize_with = "integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub bbox_guidance_steps: Option<i64>,
    /// R2F+: gradient steps per guided step (default 5).
    #[serde(
        default,
        deserialize_with = "integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub bbox_guidance_iterations: Option<i64>,
    /// R2F+: scale of the bbox loss (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bbox_loss_scale: Option<f64>,
    /// R2F+: steps after which the object latents are pasted in (default 20).
    #[serde(
        default,
        deserialize_with = "integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub latent_fusion_steps: Option<i64>,
    /// R2F+: recompute the transformer block by block in the guidance's backward pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bbox_guidance_recompute: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
pub struct JobOutput {
    /// A folder under the storage prefix: `/`-separated segments of letters, digits, `-`, `_`,
    /// `.`, `=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// POST the terminal event to this URL (signed; allowed hosts only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
    /// `png` (default), `jpeg` or `webp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
    /// 1–100, the lossy formats' quality (default 90).
    #[serde(
        default,
        deserialize_with = "integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub quality: Option<i64>,
    /// Sign a C2PA manifest (Content Credentials) into the images; default: the deployment's
    /// `c2pa.sign_by_default`. A worker without a signing key rejects a job that asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c2pa: Option<bool>,
}

/// A job's `output.webhook`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct WebhookSpec {
    /// `https://` (or `http://` where allowed) URL on a host, and at a port, its tenant (or the
    /// fleet) allows, without credentials, at most 2048 characters: checked by the worker
    /// against its settings.
    pub url: String,
    /// The events to be told of; default: the terminal ones (`succeeded`, `failed`,
    /// `rejected`, `cancelled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<WebhookEvent>>,
}

crate::named_enum! {
    /// An event a webhook can ask for.
    pub enum WebhookEvent("webhook event") {
        /// A worker took the job.
        Started = "started",
        /// Denoising steps done (throttled like progress events).
        Progress = "progress",
        Succeeded = "succeeded",
        Failed = "failed",
        Rejected = "rejected",
        Cancelled = "cancelled",
        Expired = "expired",
    }
}

impl WebhookEvent {
    /// The `type` of its webhook body: `job.<event>`.
    pub fn event_type(self) -> String {
        format!("job.{}", self.name())
    }

    /// Whether it is a job's last event.
    pub fn is_terminal(self) -> bool {
        !matches!(self, WebhookEvent::Started | WebhookEvent::Progress)
    }
}

impl From<Outcome> for WebhookEvent {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Succeeded => WebhookEvent::Succeeded,
            Outcome::Failed => WebhookEvent::Failed,
            Outcome::Rejected => WebhookEvent::Rejected,
            Outcome::Cancelled => WebhookEvent::Cancelled,
            Outcome::Expired => WebhookEvent::Expired,
        }
    }
}

impl WebhookSpec {
    /// Whether an event of `kind` is to be sent.
    pub fn wants(&self, kind: WebhookEvent) -> bool {
        match &self.events {
            None => kind.is_terminal(),
            Some(e) => e.contains(&kind),
        }
    }
}

/// An optional JSON integer: `4`, or a number with no fraction (`4.0`, `4e0`), which JSON
/// Schema counts as the same integer. Anything else is an error naming what was found.
fn integer<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Option<i64>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an integer")
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }

        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            i64::try_from(v)
                .map(Some)
                .map_err(|_| E::custom(format!("integer {v} is out of range")))
        }

        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            // 2^63 is the first f64 past i64::MAX.
            let two_63 = -(i64::MIN as f64);
            if v.fract() == 0.0 && (-two_63..two_63).contains(&v) {
                Ok(Some(v as i64))
            } else {
                Err(E::invalid_type(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_option(Visitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_may_be_written_as_whole_numbers() {
        let p: JobParams = serde_json::from_str(r#"{"steps": 4.0, "seed": -2e3}"#).unwrap();
        assert_eq!((p.steps, p.seed), (Some(4), Some(-2000)));
        let p: JobParams = serde_json::from_str(r#"{"steps": null}"#).unwrap();
        assert_eq!(p.steps, None);
        for bad in [
            r#"{"steps": 4.5}"#,
            r#"{"steps": "4"}"#,
            r#"{"seed": 9223372036854775808}"#,
        ] {
            assert!(serde_json::from_str::<JobParams>(bad).is_err(), "{bad}");
        }
    }
}
