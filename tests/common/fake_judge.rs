//! A local stand-in for an OpenAI-compatible vision judge (the RareBench judge): it checks the
//! key and the message shape (one user message: the judge prompt, then the image as a `data:`
//! URL), scores the image by a rule the test controls (a table from the image's SHA-256 to a
//! score, per judge model), answers in the official `### SCORE:` / `### EXPLANATION:` format with
//! a usage block shaped like a real one, counts every request, and can be scripted to answer
//! 429 with `Retry-After` or a malformed answer first.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const API_KEY: &str = "sk-judge-test-0123";

/// Image tokens of one image as the judge bills them: a high-detail 512×512 tile plus the base
/// (85 + 170), the order of what a vision model bills for a small image.
pub const IMAGE_TOKENS: u64 = 255;
/// Completion tokens of one answer (a score and a sentence of at most 20 words).
pub const COMPLETION_TOKENS: u64 = 32;

/// One scripted reaction, used before the rule.
#[derive(Clone, Debug)]
pub enum Fault {
    /// 429 with `Retry-After: <secs>`.
    RateLimited(u32),
    /// A 200 whose answer does not follow the format.
    Malformed(&'static str),
}

#[derive(Default)]
struct Inner {
    script: Mutex<VecDeque<Fault>>,
    /// (judge model, image sha256) -> score.
    scores: Mutex<HashMap<(String, String), u8>>,
    /// Judge model -> score of any image the table does not name.
    fallback: Mutex<HashMap<String, u8>>,
    requests: Mutex<Vec<Value>>,
}

#[derive(Clone)]
pub struct FakeJudge {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    _rt: Arc<tokio::runtime::Runtime>,
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": {"message": message}}))).into_response()
}

/// A judge prompt's words, billed as a tokenizer roughly would (4/3 tokens a word).
fn text_tokens(text: &str) -> u64 {
    (text.split_whitespace().count() as u64 * 4).div_ceil(3)
}

async fn chat(
    State(s): State<Arc<Inner>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    s.requests.lock().unwrap().push(body.clone());
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {API_KEY}"))
    {
        return error(StatusCode::UNAUTHORIZED, "Incorrect API key provided");
    }
    let content = &body["messages"][0]["content"];
    let (Some(text), Some(url)) = (
        content[0]["text"].as_str(),
        content[1]["image_url"]["url"].as_str(),
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected a text part, then an image_url part",
        );
    };
    let Some(b64) = url
        .strip_prefix("data:image/png;base64,")
        .or_else(|| url.strip_prefix("data:image/jpeg;base64,"))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "the image is not a base64 data URL",
        );
    };
    let Ok(image) = base64::engine::general_purpose::STANDARD.decode(b64) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the image's base64 does not decode",
        );
    };
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let usage = |completion: u64| {
        json!({
            "prompt_tokens": text_tokens(text) + IMAGE_TOKENS,
            "completion_tokens": completion,
            "total_tokens": text_tokens(text) + IMAGE_TOKENS + completion,
        })
    };
    let completion = |answer: String, tokens: u64| {
        Json(json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": usage(tokens),
        }))
        .into_response()
    };
    let fault = s.script.lock().unwrap().pop_front();
    match fault {
        Some(Fault::RateLimited(secs)) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", secs.to_string())],
                Json(json!({"error": {"message": "Rate limit reached for requests", "type": "requests"}})),
            )
                .into_response();
        }
        Some(Fault::Malformed(text)) => return completion(text.to_string(), 12),
        None => {}
    }
    let sha = sha256_hex(&image);
    let score = s
        .scores
        .lock()
        .unwrap()
        .get(&(model.clone(), sha))
        .copied()
        .or_else(|| s.fallback.lock().unwrap().get(&model).copied())
        .unwrap_or(3);
    let why = match score {
        5 => "Every object and attribute of the prompt is shown clearly and correctly.",
        4 => "The main objects are present; one attribute is slightly off.",
        3 => "Some elements appear, but a key attribute of the prompt is missing.",
        2 => "The objects are hard to recognise and the described action is absent.",
        _ => "The image does not convey the prompt; it shows an abstract pattern.",
    };
    completion(
        format!("### SCORE: {score}\n### EXPLANATION: {why}"),
        COMPLETION_TOKENS,
    )
}

impl FakeJudge {
    /// Serves on a port of its own, on a runtime of its own (the tests that use it are
    /// synchronous: they run the `r2f` binary).
    pub fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let inner = Arc::new(Inner::default());
        let app = axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(chat))
            .with_state(inner.clone());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            inner,
            _rt: Arc::new(rt),
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Requests so far (every try, faults included).
    pub fn requests(&self) -> usize {
        self.inner.requests.lock().unwrap().len()
    }

    pub fn request_bodies(&self) -> Vec<Value> {
        self.inner.requests.lock().unwrap().clone()
    }

    pub fn script(&self, faults: &[Fault]) {
        self.inner
            .script
            .lock()
            .unwrap()
            .extend(faults.iter().cloned());
    }

    /// `model` scores the image with this SHA-256 `score`.
    pub fn set_score(&self, model: &str, sha256: &str, score: u8) {
        self.inner
            .scores
            .lock()
            .unwrap()
            .insert((model.to_string(), sha256.to_string()), score);
    }

    /// `model` scores every image the table does not name `score`.
    pub fn set_fallback(&self, model: &str, score: u8) {
        self.inner
            .fallback
            .lock()
            .unwrap()
            .insert(model.to_string(), score);
    }
}
