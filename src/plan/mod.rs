//! R2F and R2F+ plans: the canonical types, and the two official JSON shapes jobs may carry
//! (and that the LLM answers are turned into).

use indexmap::IndexMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod parse;
pub mod template;

/// How large a plan may be: prompts of an R2F plan (its frequent prompts plus the rare one) and
/// `r2f` prompts of one R2F+ object, characters of any one prompt string, objects of an R2F+
/// plan. The names in error messages are the settings that set them (`[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanLimits {
    pub max_prompts: usize,
    pub max_prompt_chars: usize,
    pub max_objects: usize,
}

/// An R2F plan: prompts `p0 ... pK` from frequent to rare (`pK` is the rare prompt) and one
/// visual-detail level (0..=5) per rare concept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct R2fPlan {
    pub prompts: Vec<String>,
    pub levels: Vec<u8>,
}

impl R2fPlan {
    /// The plan of a prompt without rare concepts: the prompt alone.
    pub fn plain(prompt: &str) -> Self {
        Self {
            prompts: vec![prompt.to_string()],
            levels: vec![0],
        }
    }

    /// The official JSON shape: `{"visual_detail_level": "3" | ["3","5"], "r2f_prompt": [[...]]}`.
    pub fn to_official_json(&self) -> Value {
        let levels: Vec<String> = self.levels.iter().map(|l| l.to_string()).collect();
        let level = if levels.len() == 1 {
            Value::String(levels[0].clone())
        } else {
            Value::from(levels)
        };
        serde_json::json!({"visual_detail_level": level, "r2f_prompt": [self.prompts]})
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.prompts.is_empty() {
            return Err("r2f_prompt holds no prompt".into());
        }
        if let Some(i) = self.prompts.iter().position(|p| p.trim().is_empty()) {
            return Err(format!("r2f_prompt entry {i} is empty"));
        }
        if let Some(l) = self.levels.iter().find(|&&l| l > 5) {
            return Err(format!("visual detail level {l} is outside 0..5"));
        }
        if self.prompts.len() > 1 && self.levels.len() != self.prompts.len() - 1 {
            return Err(format!(
                "{} prompts need {} visual detail levels, got {}",
                self.prompts.len(),
                self.prompts.len() - 1,
                self.levels.len()
            ));
        }
        Ok(())
    }
}

/// One object of an R2F+ plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionObject {
    pub prompt: String,
    pub object: String,
    pub r2f: Vec<String>,
    #[serde(deserialize_with = "whole_levels")]
    pub visual_detail_levels: Vec<u8>,
    pub bbox: [f64; 4],
}

/// An R2F+ plan: a base prompt with `#N` placeholders and one region per object.
///
/// `objects` keeps the JSON order, as the official code's `dict` does: it fixes the order of the
/// object runs (and so which noise draw each gets), the fusion order (later objects overwrite
/// earlier ones) and the order of the loss terms. A sorted map would put `#10` before `#2`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionPlan {
    pub original_prompt: String,
    pub base_prompt: String,
    pub objects: IndexMap<String, RegionObject>,
}

fn placeholders(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'#' {
            let mut j = i + 1;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if j > i + 1 {
                out.push(s[i..j].to_string());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

impl RegionPlan {
    /// The validation rules of the official `R2FplusDiffusionPrompt.from_json`.
    pub fn validate(&self) -> Result<(), String> {
        if self.objects.is_empty() {
            return Err("objects is empty".into());
        }
        for (key, o) in &self.objects {
            let keys = placeholders(&o.prompt);
            if keys.len() != 1 || keys[0] != *key {
                return Err(format!(
                    "object {key}: prompt must contain exactly one placeholder, {key}"
                ));
            }
            if o.r2f.len() != o.visual_detail_levels.len() {
                return Err(format!(
                    "object {key}: {} r2f prompts but {} visual detail levels",
                    o.r2f.len(),
                    o.visual_detail_levels.len()
                ));
            }
            if o.visual_detail_levels.iter().any(|&l| l > 5) {
                return Err(format!("object {key}: visual detail levels must be 0..5"));
            }
            if o.visual_detail_levels.windows(2).any(|w| w[0] > w[1]) {
                return Err(format!(
                    "object {key}: visual detail levels must not decrease"
                ));
            }
            let [x0, y0, x1, y1] = o.bbox;
            let ok = |v: f64| (0.0..=1.0).contains(&v);
            if !(ok(x0) && ok(y0) && ok(x1) && ok(y1) && x0 <= x1 && y0 <= y1) {
                return Err(format!(
                    "object {key}: bbox {:?} is not [x_min, y_min, x_max, y_max] within [0, 1]",
                    o.bbox
                ));
            }
        }
        let in_base = placeholders(&self.base_prompt);
        if in_base.len() != self.objects.len() {
            return Err(format!(
                "base_prompt has {} placeholders for {} objects",
                in_base.len(),
                self.objects.len()
            ));
        }
        for n in 1..=self.objects.len() {
            let key = format!("#{n}");
            if !in_base.contains(&key) || !self.objects.contains_key(&key) {
                return Err(format!("{key} is missing from base_prompt or objects"));
            }
        }
        Ok(())
    }
}

/// A plan of either kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    R2f(R2fPlan),
    Regions(RegionPlan),
}

/// A level written as a JSON number: an integer 0–255, or a number without a fraction (`3.0`,
/// which JSON Schema counts as the integer 3).
fn small_integer(n: &serde_json::Number) -> Result<u8, String> {
    let whole = n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=255.0).contains(f))
            .map(|f| f as u64)
    });
    whole
        .and_then(|v| u8::try_from(v).ok())
        .ok_or_else(|| format!("visual detail level {n} is not a small integer"))
}

/// Levels as R2F+ objects write them: a list of JSON numbers (whole numbers, 0–255).
fn whole_levels<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let numbers = Vec::<serde_json::Number>::deserialize(d)?;
    numbers
        .iter()
        .map(small_integer)
        .collect::<Result<_, _>>()
        .map_err(serde::de::Error::custom)
}

fn levels_from(v: &Value) -> Result<Vec<u8>, String> {
    let digit = |s: &str| -> Result<u8, String> {
        let t = s.trim();
        t.parse::<u8>()
            .map_err(|_| format!("visual detail level `{t}` is not a number"))
    };
    match v {
        // Single-object files carry one string, e.g. "4" (a multi-digit string holds one level
        // per character, as the official loader iterates it).
        Value::String(s) => {
            let t = s.trim();
            if t.is_empty() {
                return Err("visual_detail_level is empty".into());
            }
            if t.chars().all(|c| c.is_ascii_digit()) {
                Ok(t.chars().map(|c| c as u8 - b'0').collect())
            } else {
                Err(format!("visual detail level `{t}` is not a number"))
            }
        }
        Value::Number(n) => small_integer(n).map(|n| vec![n]),
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => digit(s),
                Value::Number(n) => small_integer(n),
                other => Err(format!("visual detail level {other} is not a number")),
            })
            .collect(),
        other => Err(format!(
            "visual_detail_level must be a string or a list, got {other}"
        )),
    }
}

impl Plan {
    /// Reads a plan in either official shape and validates it.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let obj = v.as_object().ok_or("a plan must be a JSON object")?;
        if obj.contains_key("objects") {
            // serde reads a struct from an array too; the official shape has objects.
            if let Some(objects) = obj.get("objects").and_then(Value::as_object) {
                if let Some((key, _)) = objects.iter().find(|(_, o)| !o.is_object()) {
                    return Err(format!(
                        "not a valid R2F+ plan: object {key} is not a JSON object"
                    ));
                }
            }
            let plan: RegionPlan = serde_json::from_value(v.clone())
                .map_err(|e| format!("not a valid R2F+ plan: {e}"))?;
            plan.validate()?;
            return Ok(Plan::Regions(plan));
        }
        let level = obj
            .get("visual_detail_level")
            .ok_or("missing visual_detail_level")?;
        let prompts_v = obj.get("r2f_prompt").ok_or("missing r2f_prompt")?;
        let list = match prompts_v {
            // The official shape is a one-element outer list.
            Value::Array(outer) if outer.len() == 1 && outer[0].is_array() => &outer[0],
            Value::Array(outer) if outer.iter().all(|x| x.is_string()) => prompts_v,
            Value::Array(outer) if outer.len() != 1 => {
                return Err(format!(
                    "r2f_prompt must be a one-element list of prompt lists, got {} lists",
                    outer.len()
                ))
            }
            _ => return Err("r2f_prompt must be a list of prompt lists".into()),
        };
        let prompts = list
            .as_array()
            .ok_or("r2f_prompt must hold a list of strings")?
            .iter()
            .map(|p| {
                p.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("r2f_prompt entry {p} is not a string"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let plan = R2fPlan {
            prompts,
            levels: levels_from(level)?,
        };
        plan.validate()?;
        Ok(Plan::R2f(plan))
    }

    /// Checks the plan against the `max_plan_*` limits (a plan in a job message or from the LLM
    /// can otherwise carry thousands of prompts): the number of prompts of an R2F plan (its
    /// frequent prompts plus the rare one; the visual detail levels count too) and of each R2F+
    /// object's `r2f` list against `max_plan_prompts`, the number of R2F+ objects against
    /// `max_plan_objects`, and the characters of every prompt string the plan carries against
    /// `max_plan_prompt_chars`. The error names the limit. Counts are checked before lengths.
    pub fn check_limits(&self, limits: &PlanLimits) -> Result<(), String> {
        let max_prompts = limits.max_prompts;
        let max_chars = limits.max_prompt_chars;
        let chars = |what: &str, s: &str| -> Result<(), String> {
            let n = s.chars().count();
            if n > max_chars {
                return Err(format!(
                    "{what} has {n} characters, over the limit of {max_chars} (max_plan_prompt_chars)"
                ));
            }
            Ok(())
        };
        match self {
            Plan::R2f(p) => {
                let n = p.prompts.len();
                if n > max_prompts {
                    return Err(format!(
                        "plan has {n} prompts, over the limit of {max_prompts} (max_plan_prompts)"
                    ));
                }
                let n = p.levels.len();
                if n > max_prompts {
                    return Err(format!(
                        "plan has {n} visual detail levels, over the limit of {max_prompts} (max_plan_prompts)"
                    ));
                }
                for (i, prompt) in p.prompts.iter().enumerate() {
                    chars(&format!("plan prompt {i}"), prompt)?;
                }
            }
            Plan::Regions(p) => {
                let n = p.objects.len();
                if n > limits.max_objects {
                    return Err(format!(
                        "plan has {n} objects, over the limit of {} (max_plan_objects)",
                        limits.max_objects
                    ));
                }
                // Keys are `#N` in a validated plan; count them too so that an unvalidated plan
                // cannot put a huge key into the messages below.
                for key in p.objects.keys() {
                    chars("plan object key", key)?;
                }
                for (key, o) in &p.objects {
                    let n = o.r2f.len().max(o.visual_detail_levels.len());
                    if n > max_prompts {
                        return Err(format!(
                            "plan object {key} has {n} r2f prompts, over the limit of {max_prompts} (max_plan_prompts)"
                        ));
                    }
                }
                chars("plan original_prompt", &p.original_prompt)?;
                chars("plan base_prompt", &p.base_prompt)?;
                for (key, o) in &p.objects {
                    chars(&format!("plan object {key} prompt"), &o.prompt)?;
                    chars(&format!("plan object {key} name"), &o.object)?;
                    for (i, r) in o.r2f.iter().enumerate() {
                        chars(&format!("plan object {key} r2f prompt {i}"), r)?;
                    }
                }
            }
        }
        Ok(())
    }

    pub fn to_json(&self) -> Value {
        match self {
            Plan::R2f(p) => p.to_official_json(),
            Plan::Regions(p) => serde_json::to_value(p).unwrap_or(Value::Null),
        }
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
