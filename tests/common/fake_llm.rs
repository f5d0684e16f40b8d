//! A local server speaking the OpenAI chat-completions protocol, standing in for the remote LLM
//! (the only stand-in the tests use). It answers with realistic R2F / R2F+ answers written for
//! these tests, counts calls, and can be told to fail or to be slow.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

pub const API_KEY: &str = "sk-test-0123456789";

/// One scripted reaction.
#[derive(Clone, Debug)]
pub enum Reply {
    /// Answer with this content.
    Answer(String),
    /// Fail with this HTTP status.
    Status(u16),
}

#[derive(Default)]
struct Inner {
    calls: AtomicUsize,
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
    delay: Mutex<Duration>,
    requests: Mutex<Vec<Value>>,
}

#[derive(Clone)]
pub struct FakeLlm {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

/// A realistic R2F answer for the tests' prompt family "a hairy frog warrior ...".
pub fn r2f_answer_for(prompt: &str) -> String {
    let lower = prompt.to_lowercase();
    if let Some(pos) = lower.find("hairy frog") {
        let span = &prompt[pos..pos + "hairy frog".len()];
        format!(
            "### Num Rare Concepts: 1\n\
             a. Rare concept: {span}\n\
             b. Frogs have smooth skin, not hair. Main noun subject: frog, Context: hairy, Replaced frequent subject: animal\n\
             c. hairy animal BREAK {span}\n\
             d. Hair is a fine texture covering the body. Visual Detail Level: 4\n\
             ### Visual Detail Level: 4\n\
             ### Final Prompt Sequence: hairy animal BREAK {span}"
        )
    } else {
        format!(
            "### Num Rare Concepts: 0\nNo rare concept was found in the given input text.\n\
             ### Visual Detail Level: 0\n### Final Prompt Sequence: {prompt}"
        )
    }
}

fn prompt_of(body: &Value) -> String {
    let user = body["messages"][1]["content"].as_str().unwrap_or("");
    // R2F template: "### Input: <prompt>\n### Output:" at the end; R2F+: Original prompt: "<p>".
    if let Some(i) = user.rfind("### Input: ") {
        let rest = &user[i + "### Input: ".len()..];
        return rest.split('\n').next().unwrap_or("").trim().to_string();
    }
    if let Some(i) = user.rfind("Original prompt: \"") {
        let rest = &user[i + "Original prompt: \"".len()..];
        return rest.split('"').next().unwrap_or("").to_string();
    }
    String::new()
}

fn r2fplus_answer_for(prompt: &str) -> String {
    json!({
        "original_prompt": prompt,
        "base_prompt": "#1 and #2",
        "objects": {
            "#1": {"prompt": "a photo of #1", "object": "a hairy frog", "r2f": ["a hairy animal"],
                   "visual_detail_levels": [4], "bbox": [0.05, 0.3, 0.45, 0.8]},
            "#2": {"prompt": "a photo of #2", "object": "a golden sword", "r2f": [],
                   "visual_detail_levels": [], "bbox": [0.55, 0.2, 0.9, 0.8]}
        }
    })
    .to_string()
}

async fn chat(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    inner.calls.fetch_add(1, Ordering::SeqCst);
    inner.requests.lock().unwrap().push(body.clone());
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {API_KEY}") {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"message": "bad key"}})),
        )
            .into_response();
    }
    let roles: Vec<&str> = body["messages"]
        .as_array()
        .map(|m| m.iter().filter_map(|x| x["role"].as_str()).collect())
        .unwrap_or_default();
    if body["model"].as_str().is_none() || roles != ["system", "user"] {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "bad request"}})),
        )
            .into_response();
    }
    let delay = *inner.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let reply = inner
        .script
        .lock()
        .unwrap()
        .pop_front()
        .or_else(|| inner.default.lock().unwrap().clone());
    let prompt = prompt_of(&body);
    let content = match reply {
        Some(Reply::Status(code)) => {
            return (
                StatusCode::from_u16(code).unwrap(),
                Json(json!({"error": {"message": "scripted failure", "type": "server_error"}})),
            )
                .into_response()
        }
        Some(Reply::Answer(text)) => text,
        None => {
            let system = body["messages"][0]["content"].as_str().unwrap_or("");
            if system.contains("JSON") {
                r2fplus_answer_for(&prompt)
            } else {
                r2f_answer_for(&prompt)
            }
        }
    };
    Json(json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_764_000_000,
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 812, "completion_tokens": 96, "total_tokens": 908}
    }))
    .into_response()
}

impl FakeLlm {
    pub async fn start() -> Self {
        let inner = Arc::new(Inner::default());
        let app = axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(chat))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn calls(&self) -> usize {
        self.inner.calls.load(Ordering::SeqCst)
    }

    pub fn script(&self, replies: &[Reply]) {
        self.inner
            .script
            .lock()
            .unwrap()
            .extend(replies.iter().cloned());
    }

    pub fn set_default(&self, reply: Option<Reply>) {
        *self.inner.default.lock().unwrap() = reply;
    }

    pub fn set_delay(&self, d: Duration) {
        *self.inner.delay.lock().unwrap() = d;
    }

    pub fn requests(&self) -> Vec<Value> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// The `[llm]` section pointing a worker at this server.
    pub fn config(&self, max_attempts: u32) -> String {
        format!(
            "[llm]\nenabled = true\nbase_url = \"{}\"\nmodel = \"gpt-4o\"\nbackend = \"openai\"\napi_key_env = \"R2F_TEST_LLM_KEY\"\ntimeout_secs = 10\nmax_attempts = {max_attempts}\nretry_backoff_ms = 50\nmax_reasks = 1\n",
            self.base_url()
        )
    }
}
