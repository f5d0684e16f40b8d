//! The rules a job must keep, each written once: the validator checks a field against its rule
//! and the JSON Schema carries the same bounds and patterns ([`Rules::schema_bounds`]), so one
//! number and one wording stand for each rule. The limits that set some of them are the
//! `[limits]` settings ([`Limits`]); a rule that comes from a setting names it in its message.

use std::sync::LazyLock;

use regex::Regex;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::plan::PlanLimits;

/// What one job may ask of a worker (`[limits]` in the settings).
#[derive(Debug, Clone, Deserialize)]
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

/// Why a job was rejected: the reason is what goes to the dead-letter queue and the event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Rejection(pub String);

/// The characters Rust's `char::is_whitespace` (Unicode White_Space) counts, as a regex class
/// body both Rust's `regex` and ECMA-262 (JSON Schema) read the same way.
pub const WHITE_SPACE_CLASS: &str =
    r"\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000";

/// One path segment of an id or a prefix: letters, digits and `extra`, not `.` nor `..`.
fn segment(extra: &str) -> String {
    format!(
        r"(?:[A-Za-z0-9_{extra}-][A-Za-z0-9._{extra}-]*|\.[A-Za-z0-9_{extra}-][A-Za-z0-9._{extra}-]*|\.\.[A-Za-z0-9._{extra}-]+)"
    )
}

/// A job id: 1 to 128 characters of ASCII letters, digits, `-`, `_`, `.`, `:`, not `.` nor
/// `..` (safe as a storage key segment, a Redis key part and an AMQP message id).
pub static ID_PATTERN: LazyLock<String> = LazyLock::new(|| format!("^{}$", segment(":")));
/// An output prefix: `/`-separated segments of letters, digits, `-`, `_`, `.`, `=` (none `.`
/// or `..`), leading and trailing slashes ignored; empty is the storage prefix itself.
pub static PREFIX_PATTERN: LazyLock<String> = LazyLock::new(|| {
    let seg = segment("=");
    format!("^/*(?:{seg}(?:/{seg})*)?/*$")
});
/// Text with at least one character that is not white space.
pub static NOT_BLANK_PATTERN: LazyLock<String> =
    LazyLock::new(|| format!("[^{WHITE_SPACE_CLASS}]"));

/// The most characters of an id.
pub const MAX_ID_CHARS: usize = 128;
/// The most characters of an output prefix.
pub const MAX_PREFIX_CHARS: usize = 512;
/// The most gradient steps per guided step a job may ask for: each costs a forward and a
/// backward pass of the transformer per run.
pub const MAX_BBOX_GUIDANCE_ITERATIONS: i64 = 20;

fn regex(pattern: &str) -> Regex {
    Regex::new(pattern).expect("a valid pattern")
}

static ID_RE: LazyLock<Regex> = LazyLock::new(|| regex(&ID_PATTERN));
static PREFIX_RE: LazyLock<Regex> = LazyLock::new(|| regex(&PREFIX_PATTERN));
static NOT_BLANK_RE: LazyLock<Regex> = LazyLock::new(|| regex(&NOT_BLANK_PATTERN));

/// Whether `id` is a valid job id (see [`ID_PATTERN`]).
pub fn valid_id(id: &str) -> bool {
    id.chars().count() <= MAX_ID_CHARS && ID_RE.is_match(id)
}

/// Whether `text` holds a character other than white space.
pub fn not_blank(text: &str) -> bool {
    NOT_BLANK_RE.is_match(text)
}

/// The id rule's one wording.
pub fn invalid_id() -> Rejection {
    Rejection(format!(
        "invalid job id: 1 to {MAX_ID_CHARS} characters of letters, digits, '-', '_', '.', ':' (not `.` or `..`)"
    ))
}

/// Checks an output prefix; returns it without its leading and trailing slashes.
pub fn check_prefix(prefix: &str) -> Result<String, Rejection> {
    if prefix.chars().count() > MAX_PREFIX_CHARS || !PREFIX_RE.is_match(prefix) {
        let shown: String = prefix.chars().take(40).collect();
        return Err(Rejection(format!(
            "invalid output prefix `{shown}`: `/`-separated segments of letters, digits, '-', '_', '.', '=' (not `.` or `..`), at most {MAX_PREFIX_CHARS} characters"
        )));
    }
    Ok(prefix.trim_matches('/').to_string())
}

/// An integer field: between `min` and `max`, and a multiple of `multiple_of`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntRule {
    /// The field's path in a job (`params.steps`).
    pub field: &'static str,
    pub min: i64,
    pub max: i64,
    pub multiple_of: i64,
    /// The setting the maximum comes from, named in the message.
    pub setting: Option<&'static str>,
}

impl IntRule {
    const fn new(field: &'static str, min: i64, max: i64) -> Self {
        Self {
            field,
            min,
            max,
            multiple_of: 1,
            setting: None,
        }
    }

    const fn from_setting(field: &'static str, min: i64, max: i64, setting: &'static str) -> Self {
        Self {
            setting: Some(setting),
            ..Self::new(field, min, max)
        }
    }

    /// The field's name (the last part of its path).
    pub fn name(&self) -> &'static str {
        self.field.rsplit('.').next().unwrap_or(self.field)
    }

    pub fn check(&self, v: i64) -> Result<i64, Rejection> {
        if (self.min..=self.max).contains(&v) && v % self.multiple_of == 0 {
            return Ok(v);
        }
        let (name, min, max) = (self.name(), self.min, self.max);
        let setting = self.setting.map(|s| format!("; {s}")).unwrap_or_default();
        Err(Rejection(if self.multiple_of > 1 {
            format!(
                "{name} must be a multiple of {} between {min} and {max} (got {v}{setting})",
                self.multiple_of
            )
        } else {
            format!("{name} must be between {min} and {max} (got {v}{setting})")
        }))
    }

    /// The field's optional value, checked.
    pub fn check_opt(&self, v: Option<i64>) -> Result<Option<i64>, Rejection> {
        v.map(|v| self.check(v)).transpose()
    }

    fn schema(&self) -> Value {
        let mut s = json!({"minimum": self.min, "maximum": self.max});
        if self.multiple_of > 1 {
            s["multipleOf"] = json!(self.multiple_of);
        }
        s
    }
}

/// A number field: finite, between `min` and `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NumRule {
    pub field: &'static str,
    pub min: f64,
    pub max: f64,
}

impl NumRule {
    pub fn name(&self) -> &'static str {
        self.field.rsplit('.').next().unwrap_or(self.field)
    }

    pub fn check_opt(&self, v: Option<f64>) -> Result<Option<f64>, Rejection> {
        match v {
            Some(v) if !v.is_finite() || !(self.min..=self.max).contains(&v) => {
                Err(Rejection(format!(
                    "{} must be between {} and {} (got {v})",
                    self.name(),
                    self.min,
                    self.max
                )))
            }
            v => Ok(v),
        }
    }

    fn schema(&self) -> Value {
        json!({"minimum": self.min, "maximum": self.max})
    }
}

/// A text field: at most `max_chars` characters (Unicode scalar values, as JSON Schema counts
/// them), and not blank when `required`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextRule {
    pub field: &'static str,
    pub max_chars: usize,
    pub setting: &'static str,
    pub not_blank: bool,
}

impl TextRule {
    pub fn check(&self, text: &str) -> Result<(), Rejection> {
        let name = self.field.rsplit('.').next().unwrap_or(self.field);
        if self.not_blank && !not_blank(text) {
            return Err(Rejection(format!("{name} is empty")));
        }
        let n = text.chars().count();
        if n > self.max_chars {
            return Err(Rejection(format!(
                "{name} has {n} characters, over the limit of {} ({})",
                self.max_chars, self.setting
            )));
        }
        Ok(())
    }

    fn schema(&self) -> Value {
        let mut s = json!({"maxLength": self.max_chars});
        if self.not_blank {
            s["minLength"] = json!(1);
            s["pattern"] = json!(*NOT_BLANK_PATTERN);
        }
        s
    }
}

/// Every rule of a job under the given limits.
#[derive(Debug, Clone)]
pub struct Rules {
    pub prompt: TextRule,
    pub negative_prompt: TextRule,
    pub steps: IntRule,
    pub width: IntRule,
    pub height: IntRule,
    pub seed: IntRule,
    pub num_images: IntRule,
    pub guidance: NumRule,
    pub bbox_guidance_steps: IntRule,
    pub latent_fusion_steps: IntRule,
    pub bbox_guidance_iterations: IntRule,
    pub bbox_loss_scale: NumRule,
    pub quality: IntRule,
    pub priority: IntRule,
    /// `max_pixels`: the most pixels of one image (width × height, a rule across two fields).
    pub max_pixels: i64,
}

/// The largest width or height any job may ask for (a model may allow less).
pub const MAX_SIDE: i64 = 8192;
/// Widths and heights are multiples of this (the VAE's factor times the patch size).
pub const SIDE_MULTIPLE: i64 = 16;

impl Rules {
    pub fn new(l: &Limits) -> Self {
        let max_steps = l.max_steps as i64;
        let side = |field| IntRule {
            multiple_of: SIDE_MULTIPLE,
            ..IntRule::new(field, SIDE_MULTIPLE, MAX_SIDE)
        };
        Self {
            prompt: TextRule {
                field: "prompt",
                max_chars: l.max_prompt_chars,
                setting: "max_prompt_chars",
                not_blank: true,
            },
            negative_prompt: TextRule {
                field: "params.negative_prompt",
                max_chars: l.max_prompt_chars,
                setting: "max_prompt_chars",
                not_blank: false,
            },
            steps: IntRule::from_setting("params.steps", 1, max_steps, "max_steps"),
            width: side("params.width"),
            height: side("params.height"),
            seed: IntRule::new("params.seed", i64::MIN, i64::MAX),
            num_images: IntRule::from_setting(
                "params.num_images",
                1,
                l.max_images_per_job as i64,
                "max_images_per_job",
            ),
            guidance: NumRule {
                field: "params.guidance",
                min: 0.0,
                max: 100.0,
            },
            bbox_guidance_steps: IntRule::from_setting(
                "params.bbox_guidance_steps",
                0,
                max_steps,
                "max_steps",
            ),
            latent_fusion_steps: IntRule::from_setting(
                "params.latent_fusion_steps",
                0,
                max_steps,
                "max_steps",
            ),
            bbox_guidance_iterations: IntRule::new(
                "params.bbox_guidance_iterations",
                0,
                MAX_BBOX_GUIDANCE_ITERATIONS,
            ),
            bbox_loss_scale: NumRule {
                field: "params.bbox_loss_scale",
                min: 0.0,
                max: 1e6,
            },
            quality: IntRule::new("output.quality", 1, 100),
            priority: IntRule::new("priority", 0, 255),
            max_pixels: l.max_pixels,
        }
    }

    /// The pixel rule, when both sides are known (a side left to the model's default is
    /// checked once the model is known).
    pub fn check_pixels(&self, width: Option<i64>, height: Option<i64>) -> Result<(), Rejection> {
        if let (Some(w), Some(h)) = (width, height) {
            let pixels = w.saturating_mul(h);
            if pixels > self.max_pixels {
                return Err(Rejection(format!(
                    "image of {w}x{h} = {pixels} pixels is over the limit of {} (max_pixels)",
                    self.max_pixels
                )));
            }
        }
        Ok(())
    }

    /// Every field rule as (the field's path, the JSON Schema keywords that state it).
    pub fn schema_bounds(&self) -> Vec<(&'static str, Value)> {
        let ints = [
            &self.steps,
            &self.width,
            &self.height,
            &self.seed,
            &self.num_images,
            &self.bbox_guidance_steps,
            &self.latent_fusion_steps,
            &self.bbox_guidance_iterations,
            &self.quality,
            &self.priority,
        ];
        let mut out: Vec<(&'static str, Value)> =
            ints.iter().map(|r| (r.field, r.schema())).collect();
        out.extend([&self.guidance, &self.bbox_loss_scale].map(|r| (r.field, r.schema())));
        out.extend([&self.prompt, &self.negative_prompt].map(|r| (r.field, r.schema())));
        out.push((
            "id",
            json!({"minLength": 1, "maxLength": MAX_ID_CHARS, "pattern": *ID_PATTERN}),
        ));
        out.push((
            "output.prefix",
            json!({"maxLength": MAX_PREFIX_CHARS, "pattern": *PREFIX_PATTERN}),
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_prefixes_follow_their_patterns() {
        for id in ["a", "j-1", "a.b:c_d", "...", ".a", "..a", &"x".repeat(128)] {
            assert!(valid_id(id), "{id}");
        }
        for id in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(!valid_id(id), "{id}");
        }
        for p in ["", "/", "a", "a/b=c", "/a/b/", "x/...y"] {
            assert!(check_prefix(p).is_ok(), "{p}");
        }
        assert_eq!(check_prefix("/a/b/").unwrap(), "a/b");
        for p in ["..", "a/../b", "a//b", "a b", "./a", &"a".repeat(513)] {
            assert!(check_prefix(p).is_err(), "{p}");
        }
    }

    #[test]
    fn blank_means_what_rust_calls_white_space() {
        for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
            let s = c.to_string();
            assert_eq!(not_blank(&s), !c.is_whitespace(), "U+{:04X}", c as u32);
        }
    }

    #[test]
    fn every_rule_speaks_one_wording() {
        let l = Limits {
            max_prompt_chars: 10,
            max_steps: 50,
            max_pixels: 4096,
            max_images_per_job: 2,
            max_message_bytes: 4096,
            max_plan_prompts: 4,
            max_plan_prompt_chars: 10,
            max_plan_objects: 2,
        };
        let r = Rules::new(&l);
        assert_eq!(
            r.steps.check(51).unwrap_err().0,
            "steps must be between 1 and 50 (got 51; max_steps)"
        );
        assert_eq!(
            r.width.check(100).unwrap_err().0,
            "width must be a multiple of 16 between 16 and 8192 (got 100)"
        );
        assert_eq!(
            r.guidance.check_opt(Some(f64::NAN)).unwrap_err().0,
            "guidance must be between 0 and 100 (got NaN)"
        );
        assert_eq!(r.prompt.check(" \t").unwrap_err().0, "prompt is empty");
        assert!(r
            .prompt
            .check(&"é".repeat(11))
            .unwrap_err()
            .0
            .contains("max_prompt_chars"));
        assert!(r.check_pixels(Some(128), Some(64)).is_err());
        assert!(r.check_pixels(Some(128), None).is_ok());
    }
}
