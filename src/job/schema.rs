//! The contract as code: JSON Schemas of the documents clients exchange with r2f, generated from
//! the Rust types that read and write them (`r2f schema job|result|progress|status`; committed
//! under `docs/schemas/`, and a test keeps the two equal).
//!
//! The job schema carries the rules of [`crate::job::rules`] for the limits it is made with
//! (`r2f schema job` uses the configured `[limits]` and models): a job the schema accepts is a
//! job the validator accepts, but for the rules that span fields or need the model or the
//! fleet's settings, which its description names. `tests/job_schema.rs` checks the two against
//! each other on generated jobs, both ways.

use serde_json::{json, Map, Value};

use crate::generate::JobMode;
use crate::job::event::{ProgressEvent, ResultEvent, StartedEvent};
use crate::job::rules::{Limits, Rules, NOT_BLANK_PATTERN, WHITE_SPACE_CLASS};
use crate::job::status::JobStatus;
use crate::job::validate::min_faithful_steps;
use crate::job::wire::JobMessage;
use crate::plan::PlanLimits;
use crate::r2f::StopStepMapName;

/// The documents with a schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Document {
    /// A job message (published on the jobs exchange).
    Job,
    /// A result event (and `<id>/result.json`).
    Result,
    /// A progress event.
    Progress,
    /// A started event.
    Started,
    /// A job's status record (`r2f status ID`).
    Status,
    /// The gateway's OpenAPI document (HTTP API), whose schemas are these.
    Openapi,
}

impl Document {
    pub const ALL: [Document; 6] = [
        Document::Job,
        Document::Result,
        Document::Progress,
        Document::Started,
        Document::Status,
        Document::Openapi,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Document::Job => "job",
            Document::Result => "result",
            Document::Progress => "progress",
            Document::Started => "started",
            Document::Status => "status",
            Document::Openapi => "openapi",
        }
    }

    /// Its file under `docs/schemas/`.
    pub fn file_name(self) -> String {
        match self {
            Document::Openapi => "openapi.json".into(),
            d => format!("{}.schema.json", d.name()),
        }
    }

    /// The schema; the job's with the bounds of `limits` and the model names `models`.
    pub fn schema(self, limits: &Limits, models: &[String]) -> Value {
        let schema = match self {
            Document::Job => return job_schema(limits, models),
            Document::Openapi => return crate::job::api::openapi(job_schema(limits, models)),
            Document::Result => schemars::schema_for!(ResultEvent),
            Document::Progress => schemars::schema_for!(ProgressEvent),
            Document::Started => schemars::schema_for!(StartedEvent),
            Document::Status => schemars::schema_for!(JobStatus),
        };
        serde_json::to_value(schema).unwrap_or_default()
    }

    /// The schema as pretty JSON with a trailing newline (what `docs/schemas/` holds, made with
    /// the default settings).
    pub fn schema_json(self, limits: &Limits, models: &[String]) -> String {
        let mut text =
            serde_json::to_string_pretty(&self.schema(limits, models)).unwrap_or_default();
        text.push('\n');
        text
    }
}

/// What the job schema cannot state, each checked by the validator (or, where it needs the
/// model or the fleet, by the worker) and named in the schema's description.
const CROSS_FIELD_RULES: &str = "Rules this schema cannot state (a job that breaks one is rejected with its reason): \
width x height at most limits.max_pixels, and within the model's own size (a side left out takes the model's default); \
an R2F plan with N > 1 prompts has N - 1 visual detail levels; \
an R2F+ plan's objects are keyed #1..#n, each key once in base_prompt and once in its own object's prompt, \
with as many r2f prompts as visual_detail_levels, levels that do not decrease, and bbox x_min <= x_max, y_min <= y_max; \
mode r2fplus with schedule faithful (the default) needs a square size, guidance above 1, \
and more steps than the stop-step map's last stop; \
mode r2fplus runs on SD3 models only; a job without a plan needs the fleet's LLM planner; \
a webhook URL must be https (or http where allowed) on a host in webhook.allowed_hosts; \
the whole message is at most limits.max_message_bytes; \
with output format jpeg, the image metadata (prompt, negative prompt and plan, XML-escaped) fits one 64 KiB JPEG segment.";

/// The job schema: the message's types, with every rule's bounds, the plan's two official
/// shapes, and which plan shape each mode takes.
fn job_schema(limits: &Limits, models: &[String]) -> Value {
    let mut root = serde_json::to_value(schemars::schema_for!(JobMessage)).unwrap_or_default();
    let rules = Rules::new(limits);
    for (path, bounds) in rules.schema_bounds() {
        merge(property(&mut root, path), bounds);
    }
    let mut names: Vec<Value> = models.iter().map(|m| json!(m)).collect();
    names.push(Value::Null);
    merge(property(&mut root, "model"), json!({ "enum": names }));
    merge(
        property(&mut root, "output.webhook.events"),
        json!({"minItems": 1}),
    );
    let plan = limits.plan();
    let defs = root["$defs"].as_object_mut().expect("a schema with $defs");
    defs.insert("R2fPlan".into(), r2f_plan_schema(&plan));
    defs.insert("RegionPlan".into(), region_plan_schema(&plan));
    defs.insert("RegionObject".into(), region_object_schema(&plan));
    let description = property(&mut root, "plan")["description"].clone();
    *property(&mut root, "plan") = json!({
        "description": description,
        "anyOf": [
            {"$ref": "#/$defs/R2fPlan"},
            {"$ref": "#/$defs/RegionPlan"},
            {"type": "null"}
        ]
    });
    let plan_of = |kind: &str| json!({"properties": {"plan": {"anyOf": [{"$ref": format!("#/$defs/{kind}")}, {"type": "null"}]}}});
    root["allOf"] = json!([
        {
            "if": {"properties": {"mode": {"const": JobMode::R2fplus}}, "required": ["mode"]},
            "then": plan_of("RegionPlan")
        },
        {
            "if": {"properties": {"mode": {"enum": [JobMode::R2f, null]}}},
            "then": plan_of("R2fPlan")
        }
    ]);
    let text = root["description"].as_str().unwrap_or_default().to_string();
    let steps: Vec<String> = StopStepMapName::ALL
        .iter()
        .map(|m| format!("{} with {m}", min_faithful_steps(&m.map())))
        .collect();
    root["description"] = json!(format!(
        "{text}\n\n{CROSS_FIELD_RULES} (Faithful R2F+ steps: at least {}.)",
        steps.join(", ")
    ));
    root
}

/// The schema of the property at `path` (`params.steps`), through `$ref`s and optional objects.
fn property<'a>(root: &'a mut Value, path: &str) -> &'a mut Value {
    let mut at: Vec<String> = Vec::new();
    for seg in path.split('.') {
        let here = resolve_object(root, &at);
        at = here;
        at.push("properties".into());
        at.push(seg.into());
    }
    // A leaf that is an optional array (`events`): the array's own schema.
    let leaf = pointer(root, &at);
    if let Some(any) = leaf.get("anyOf").and_then(Value::as_array) {
        if let Some(i) = any
            .iter()
            .position(|s| s.get("type") == Some(&json!("array")))
        {
            at.push("anyOf".into());
            at.push(i.to_string());
        }
    }
    pointer_mut(root, &at)
}

/// The path of the object schema at `at`: itself, or the `$defs` entry its `$ref` (possibly
/// inside an `anyOf` with null) names.
fn resolve_object(root: &Value, at: &[String]) -> Vec<String> {
    let here = pointer(root, at);
    let reference = here.get("$ref").or_else(|| {
        here.get("anyOf")?
            .as_array()?
            .iter()
            .find_map(|s| s.get("$ref"))
    });
    match reference.and_then(Value::as_str) {
        Some(r) => vec!["$defs".into(), r.trim_start_matches("#/$defs/").into()],
        None => at.to_vec(),
    }
}

fn pointer<'a>(root: &'a Value, at: &[String]) -> &'a Value {
    at.iter().fold(root, |v, k| match v {
        Value::Array(a) => k
            .parse::<usize>()
            .ok()
            .and_then(|i| a.get(i))
            .unwrap_or(&Value::Null),
        _ => v.get(k).unwrap_or(&Value::Null),
    })
}

fn pointer_mut<'a>(root: &'a mut Value, at: &[String]) -> &'a mut Value {
    at.iter().fold(root, |v, k| match v {
        Value::Array(a) => {
            let i = k.parse::<usize>().unwrap_or(0);
            &mut a[i]
        }
        _ => &mut v[k.as_str()],
    })
}

fn merge(target: &mut Value, add: Value) {
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let (Some(t), Value::Object(a)) = (target.as_object_mut(), add) {
        t.extend(a);
    }
}

/// A prompt string of a plan: at most `max_prompt_chars` characters.
fn plan_text(p: &PlanLimits) -> Value {
    json!({"type": "string", "maxLength": p.max_prompt_chars})
}

/// The official R2F plan shape, with the reader's tolerances (a level string of digits, or a
/// list of numbers or digit strings; a one-element list of prompt lists, or a flat list).
fn r2f_plan_schema(p: &PlanLimits) -> Value {
    let ws = WHITE_SPACE_CLASS;
    let n = p.max_prompts;
    let prompt = json!({
        "type": "string",
        "maxLength": p.max_prompt_chars,
        "pattern": *NOT_BLANK_PATTERN,
    });
    let level = json!({"type": "integer", "minimum": 0, "maximum": 5});
    json!({
        "description": "An R2F plan in the official shape: prompts from frequent to rare (the last is the rare prompt) and one visual detail level (0-5) per rare concept.",
        "type": "object",
        "required": ["visual_detail_level", "r2f_prompt"],
        "not": {"required": ["objects"]},
        "properties": {
            "visual_detail_level": {
                "anyOf": [
                    {"type": "string", "pattern": format!("^[{ws}]*[0-5]{{1,{n}}}[{ws}]*$")},
                    level,
                    {
                        "type": "array",
                        "maxItems": n,
                        "items": {"anyOf": [
                            {"type": "string", "pattern": format!("^[{ws}]*\\+?0*[0-5][{ws}]*$")},
                            level
                        ]}
                    }
                ]
            },
            "r2f_prompt": {
                "anyOf": [
                    {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 1,
                        "items": {"type": "array", "minItems": 1, "maxItems": n, "items": prompt}
                    },
                    {"type": "array", "minItems": 1, "maxItems": n, "items": prompt}
                ]
            }
        }
    })
}

/// The official R2F+ plan shape.
fn region_plan_schema(p: &PlanLimits) -> Value {
    json!({
        "description": "An R2F+ plan in the official shape: a base prompt with #N placeholders and one region per object.",
        "type": "object",
        "required": ["original_prompt", "base_prompt", "objects"],
        "properties": {
            "original_prompt": plan_text(p),
            "base_prompt": plan_text(p),
            "objects": {
                "type": "object",
                "minProperties": 1,
                "maxProperties": p.max_objects,
                "propertyNames": {"pattern": "^#[1-9][0-9]*$", "maxLength": p.max_prompt_chars},
                "additionalProperties": {"$ref": "#/$defs/RegionObject"}
            }
        }
    })
}

fn region_object_schema(p: &PlanLimits) -> Value {
    let mut schema = json!({
        "description": "One object of an R2F+ plan: its prompt (with its own #N), its name, its frequent prompts with their levels, and its box [x_min, y_min, x_max, y_max] in [0, 1].",
        "type": "object",
        "properties": {
            "prompt": plan_text(p),
            "object": plan_text(p),
            "r2f": {"type": "array", "maxItems": p.max_prompts, "items": plan_text(p)},
            "visual_detail_levels": {
                "type": "array",
                "maxItems": p.max_prompts,
                "items": {"type": "integer", "minimum": 0, "maximum": 5}
            },
            "bbox": {
                "type": "array",
                "minItems": 4,
                "maxItems": 4,
                "items": {"type": "number", "minimum": 0, "maximum": 1}
            }
        }
    });
    // Every property is required.
    let names: Vec<String> = schema["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    schema["required"] = json!(names);
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> crate::config::Settings {
        crate::config::Settings::load(None).unwrap()
    }

    #[test]
    fn committed_schemas_equal_the_generated_ones() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas");
        for doc in Document::ALL {
            let path = dir.join(doc.file_name());
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == doc.schema_json(&defaults().limits, &defaults().routed_models()),
                "{} is stale: regenerate it with `r2f schema {} > {}`",
                path.display(),
                doc.name(),
                path.display()
            );
        }
    }

    /// Every key of `example` (and of its nested objects the schema describes) is a property
    /// of `schema` (resolving `$ref`s into `$defs`).
    fn keys_described(
        label: &str,
        example: &serde_json::Value,
        schema: &serde_json::Value,
        root: &serde_json::Value,
    ) {
        let resolve = |s: &serde_json::Value| -> serde_json::Value {
            let mut s = s.clone();
            // `Option<T>` of an object is `anyOf: [{$ref}, {type: null}]`.
            if let Some(any) = s.get("anyOf").and_then(|a| a.as_array()) {
                if let Some(first) = any.iter().find(|x| x.get("$ref").is_some()) {
                    s = first.clone();
                }
            }
            if let Some(r) = s.get("$ref").and_then(|r| r.as_str()) {
                let name = r.trim_start_matches("#/$defs/");
                s = root["$defs"][name].clone();
            }
            s
        };
        let schema = resolve(schema);
        let Some(obj) = example.as_object() else {
            return;
        };
        let Some(props) = schema.get("properties").and_then(|p| p.as_object()) else {
            return;
        };
        for (k, v) in obj {
            let prop = props
                .get(k)
                .unwrap_or_else(|| panic!("{label}: `{k}` is not in the schema"));
            if k != "plan" && k != "timings_ms" {
                keys_described(&format!("{label}.{k}"), v, prop, root);
            }
        }
    }

    #[test]
    fn every_json_example_of_the_contract_is_described_by_its_schema() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/contract.md");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut checked = 0;
        for block in text.split("```json").skip(1) {
            let body = block.split("```").next().unwrap_or_default();
            let example: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| {
                panic!("a JSON example of {} does not parse: {e}", path.display())
            });
            let doc = if example.get("prompt").is_some() {
                serde_json::from_value::<JobMessage>(example.clone()).unwrap();
                Document::Job
            } else if example.get("status").is_some() {
                serde_json::from_value::<ResultEvent>(example.clone()).unwrap();
                Document::Result
            } else {
                serde_json::from_value::<ProgressEvent>(example.clone()).unwrap();
                Document::Progress
            };
            let schema = doc.schema(&defaults().limits, &defaults().routed_models());
            keys_described(doc.name(), &example, &schema, &schema);
            checked += 1;
        }
        assert!(checked >= 5, "only {checked} examples found");
    }

    #[test]
    fn the_job_schema_names_every_field_and_param() {
        let v = Document::Job.schema(&defaults().limits, &defaults().routed_models());
        let text = v.to_string();
        for field in [
            "prompt",
            "plan",
            "params",
            "region_mask",
            "bbox_guidance_steps",
            "prefix",
        ] {
            assert!(
                text.contains(&format!("\"{field}\"")),
                "{field} missing from {text}"
            );
        }
    }
}
