//! The contract as code: JSON Schemas of the documents clients exchange with r2f, generated from
//! the Rust types that read and write them (`r2f schema job|result|progress`; committed under
//! `docs/schemas/`, and a test keeps the two equal).

use crate::job::{JobMessage, ProgressEvent, ResultEvent};

/// The documents with a schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Document {
    /// A job message (published on the jobs queue).
    Job,
    /// A result event (and `<id>/result.json`).
    Result,
    /// A progress event.
    Progress,
    /// A job's status record (`r2f status ID`).
    Status,
}

impl Document {
    pub const ALL: [Document; 4] = [
        Document::Job,
        Document::Result,
        Document::Progress,
        Document::Status,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Document::Job => "job",
            Document::Result => "result",
            Document::Progress => "progress",
            Document::Status => "status",
        }
    }

    /// The schema as pretty JSON with a trailing newline (what `docs/schemas/` holds).
    pub fn schema_json(self) -> String {
        let schema = match self {
            Document::Job => schemars::schema_for!(JobMessage),
            Document::Result => schemars::schema_for!(ResultEvent),
            Document::Progress => schemars::schema_for!(ProgressEvent),
            Document::Status => schemars::schema_for!(super::status::JobStatus),
        };
        let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
        text.push('\n');
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_schemas_equal_the_generated_ones() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas");
        for doc in Document::ALL {
            let path = dir.join(format!("{}.schema.json", doc.name()));
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == doc.schema_json(),
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
            let schema: serde_json::Value = serde_json::from_str(&doc.schema_json()).unwrap();
            keys_described(doc.name(), &example, &schema, &schema);
            checked += 1;
        }
        assert!(checked >= 5, "only {checked} examples found");
    }

    #[test]
    fn the_job_schema_names_every_field_and_param() {
        let v: serde_json::Value = serde_json::from_str(&Document::Job.schema_json()).unwrap();
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
