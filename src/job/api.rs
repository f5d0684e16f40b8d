//! The HTTP API's own documents (`r2f gateway`): what `POST /v1/jobs` answers, errors, the
//! `queued` event of a job's event stream, and the OpenAPI document, made from the same types
//! as the JSON Schemas (the job, its status record, its events, a cancel answer).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::job::event::{ProgressEvent, ResultEvent, StartedEvent};
use crate::job::state::JobState;
use crate::job::status::{CancelAnswer, JobStatus};

/// What `POST /v1/jobs` answers: the job was accepted (`202`), or had been before under the
/// same `Idempotency-Key` or with the same id and body (`200`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Accepted {
    /// The job's id (the gateway makes one when the job has none).
    pub id: String,
    /// The job's state now (`queued` for a job just accepted).
    pub state: JobState,
    /// Where the job's status is (`GET`), relative to the gateway.
    pub status_url: String,
    /// Where the job's events stream (`GET`, Server-Sent Events).
    pub events_url: String,
    /// The W3C trace id of the job's trace, when the request carried a `traceparent` or traces
    /// are exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApiError {
    pub error: ApiErrorBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApiErrorBody {
    /// What went wrong, for programs: `unauthorized`, `not_found`, `invalid_job`,
    /// `conflict`, `idempotency_mismatch`, `payload_too_large`, `rate_limited`,
    /// `too_many_open_jobs`, `unavailable`, `draining`.
    pub code: String,
    /// What went wrong, for people (for `invalid_job`: the validator's reason).
    pub message: String,
}

/// The first event of a job's stream: it was accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QueuedEvent {
    pub id: String,
    /// The job's tenant, in a multi-tenant fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// When it was accepted, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// The OpenAPI 3.1 document of the gateway, with `job` (the job's JSON Schema, bounded by a
/// fleet's limits and models: `schema::Document::Openapi` passes it) as the request body.
pub fn openapi(job: Value) -> Value {
    let mut components = Map::new();
    let mut add = |name: &str, mut schema: Value| {
        if let Some(defs) = schema.as_object_mut().and_then(|o| o.remove("$defs")) {
            for (k, v) in defs.as_object().cloned().unwrap_or_default() {
                components.insert(k, v);
            }
        }
        if let Some(o) = schema.as_object_mut() {
            o.remove("$schema");
        }
        components.insert(name.to_string(), schema);
    };
    let mut job = job;
    // Over HTTP the id may be left out: the gateway makes one.
    if let Some(required) = job["required"].as_array_mut() {
        required.retain(|r| r != "id");
    }
    add("Job", job);
    let of = |s: schemars::Schema| serde_json::to_value(s).unwrap_or_default();
    add("Accepted", of(schemars::schema_for!(Accepted)));
    add("ApiError", of(schemars::schema_for!(ApiError)));
    add("JobStatus", of(schemars::schema_for!(JobStatus)));
    add("CancelAnswer", of(schemars::schema_for!(CancelAnswer)));
    add("QueuedEvent", of(schemars::schema_for!(QueuedEvent)));
    add("StartedEvent", of(schemars::schema_for!(StartedEvent)));
    add("ProgressEvent", of(schemars::schema_for!(ProgressEvent)));
    add("ResultEvent", of(schemars::schema_for!(ResultEvent)));
    let mut components = Value::Object(components);
    rewrite_refs(&mut components);

    let error = |what: &str| {
        json!({
            "description": what,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ApiError"}}}
        })
    };
    let limited = json!({
        "description": "Too many requests for the tenant (`rate_limited`), or too many of its jobs open (`too_many_open_jobs`).",
        "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer", "minimum": 1}}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ApiError"}}}
    });
    let id_param = json!({
        "name": "id", "in": "path", "required": true,
        "description": "The job's id.",
        "schema": {"type": "string", "minLength": 1, "maxLength": crate::job::rules::MAX_ID_CHARS}
    });
    let ok = |what: &str, schema: &str| {
        json!({
            "description": what,
            "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
        })
    };
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "r2f gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Submit text-to-image jobs (R2F, R2F+ or plain), follow them and fetch their images. Every request but the health and metrics endpoints needs `Authorization: Bearer <API key>`; a key belongs to one tenant, which sees only its own jobs (another tenant's job is 404).",
        },
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}],
        "paths": {
            "/v1/jobs": {"post": {
                "operationId": "submitJob",
                "summary": "Submit a job",
                "description": "Validated as a worker would (422 with the reason otherwise) and published with the broker's confirm. With `Idempotency-Key`, a retried request answers the job of the first. Answers a `traceparent` of the job's trace.",
                "parameters": [
                    {"name": "Idempotency-Key", "in": "header", "required": false,
                     "description": "Any string up to 255 characters: the same key with the same body answers the same job, with another body 422.",
                     "schema": {"type": "string", "minLength": 1, "maxLength": 255}},
                    {"name": "traceparent", "in": "header", "required": false,
                     "description": "W3C trace context: the job's spans continue this trace.",
                     "schema": {"type": "string"}}
                ],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}},
                "responses": {
                    "202": {
                        "description": "Accepted and queued.",
                        "headers": {"Location": {"description": "The job's status URL.", "schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}
                    },
                    "200": ok("Accepted before (same Idempotency-Key, or the same id and body).", "Accepted"),
                    "400": error("Not JSON."),
                    "401": error("No valid API key."),
                    "409": error("The id is another job's (`conflict`)."),
                    "413": error("The body is larger than limits.max_message_bytes."),
                    "422": error("Not a valid job (`invalid_job`, with the reason), or an Idempotency-Key reused with another body."),
                    "429": limited.clone(),
                    "503": error("The broker or Redis is unreachable: retry.")
                }
            }},
            "/v1/jobs/{id}": {"get": {
                "operationId": "getJob",
                "summary": "A job's status",
                "description": "`queued`, then `running` (with step, steps and an estimate of the time left), `retrying` between attempts, then `succeeded`, `failed`, `rejected` or `cancelled` with the result event; its outputs carry fresh presigned URLs (S3).",
                "parameters": [id_param.clone()],
                "responses": {
                    "200": ok("The job's status record.", "JobStatus"),
                    "401": error("No valid API key."),
                    "404": error("No such job of this tenant."),
                    "429": limited.clone(),
                    "503": error("Redis is unreachable.")
                }
            }},
            "/v1/jobs/{id}/cancel": {"post": {
                "operationId": "cancelJob",
                "summary": "Cancel a job",
                "description": "A queued job is dropped when a worker takes it; a running one stops at its next denoising step. A finished job is left as it is (`too_late`).",
                "parameters": [id_param.clone()],
                "responses": {
                    "200": ok("What the request did.", "CancelAnswer"),
                    "401": error("No valid API key."),
                    "404": error("No such job of this tenant."),
                    "429": limited.clone(),
                    "503": error("Redis is unreachable.")
                }
            }},
            "/v1/jobs/{id}/events": {"get": {
                "operationId": "jobEvents",
                "summary": "A job's events (Server-Sent Events)",
                "description": "Events `queued` (QueuedEvent), `started` (StartedEvent, once per attempt), `progress` (ProgressEvent; steps increase within an attempt), then one terminal event named by the outcome (`succeeded`, `failed`, `rejected`, `cancelled`; a ResultEvent with fresh presigned URLs), after which the stream ends. Each event has an id; reconnecting with `Last-Event-ID` resumes after it. Comments keep the connection alive.",
                "parameters": [id_param,
                    {"name": "Last-Event-ID", "in": "header", "required": false,
                     "description": "The id of the last event received.", "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "The event stream.", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    "401": error("No valid API key."),
                    "404": error("No such job of this tenant."),
                    "429": limited,
                    "503": error("Redis is unreachable, or the gateway is draining.")
                }
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document", "security": [],
                "responses": {"200": {"description": "The OpenAPI document.", "content": {"application/json": {"schema": {"type": "object"}}}}}
            }},
            "/healthz": {"get": {
                "operationId": "healthz", "summary": "Liveness", "security": [],
                "responses": {"200": {"description": "The process serves requests."}}
            }},
            "/readyz": {"get": {
                "operationId": "readyz", "summary": "Readiness", "security": [],
                "responses": {
                    "200": {"description": "The broker and Redis are reachable."},
                    "503": {"description": "Not ready: a dependency is down, the broker blocks publishers, or the gateway is draining."}
                }
            }},
            "/metrics": {"get": {
                "operationId": "metrics", "summary": "Prometheus metrics", "security": [],
                "responses": {"200": {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}}
            }}
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "description": "An API key made by `r2f key`; the gateway keeps only its SHA-256."}},
            "schemas": components
        }
    })
}

/// `#/$defs/X` → `#/components/schemas/X`, everywhere.
fn rewrite_refs(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "$ref" {
                    if let Some(r) = x.as_str().and_then(|r| r.strip_prefix("#/$defs/")) {
                        *x = json!(format!("#/components/schemas/{r}"));
                    }
                } else {
                    rewrite_refs(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(rewrite_refs),
        _ => {}
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn every_reference_of_the_openapi_document_resolves() {
        let s = crate::config::Settings::load(None).unwrap();
        let doc = crate::job::schema::Document::Openapi.schema(&s.limits, &s.routed_models());
        let text = doc.to_string();
        assert!(!text.contains("#/$defs/"));
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for part in text.split("\"#/components/schemas/").skip(1) {
            let name = &part[..part.find('"').unwrap()];
            assert!(schemas.contains_key(name), "{name}");
        }
        let job = &schemas["Job"];
        assert!(!job["required"]
            .as_array()
            .map(|r| r.iter().any(|x| x == "id"))
            .unwrap_or(false));
    }
}
