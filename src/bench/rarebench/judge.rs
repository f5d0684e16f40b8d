//! The judge: an OpenAI-compatible vision chat endpoint asked how well an image matches its
//! prompt, answering in the RareBench format
//!
//! ```text
//! ### SCORE: <0-5>
//! ### EXPLANATION: <a short reason>
//! ```
//!
//! The request is the official evaluation's shape: one user message whose content is the judge
//! prompt (text) and the image as a base64 `data:` URL, `max_tokens` 4096, the API's default
//! sampling unless a temperature is set. [`DEFAULT_PROMPT`] is our own wording with the official
//! structure (a role, what to look at, the prompt quoted, a 5-to-1 rubric, the answer format);
//! [`JudgeSettings::prompt_template`] takes any other text, e.g. the official judge prompt from a
//! file, with `{prompt}` where the prompt goes.
//!
//! Transport errors, HTTP 429 and 5xx are retried with exponential backoff (jittered), waiting
//! what `Retry-After` (seconds or an HTTP date) or `retry-after-ms` says when the server sends
//! it; an answer that does not parse is asked again, and counted. Tokens are summed from every
//! answer's `usage`, the malformed ones included (they are billed too).

use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::spec::sniff_format;
use crate::image::ImageFormat;

/// The judge model of the official RareBench scores.
pub const OFFICIAL_MODEL: &str = "gpt-4o-2024-05-13";

/// The placeholder a judge prompt template holds where the image's prompt goes.
pub const PROMPT_PLACEHOLDER: &str = "{prompt}";

/// Our judge prompt: the official evaluation's structure and answer format in our own words.
/// Scores 0 and 1 count the same in the aggregate (`max(score - 1, 0)`).
pub const DEFAULT_PROMPT: &str = "You are an assistant that rates how faithfully an image \
depicts a text prompt. Look at the objects in the image, their attributes (such as color, shape, \
texture and material), how they are placed, and what they do to one another. Rate how well the \
image matches the text prompt: \"{prompt}\"\n\
Give an integer score from 0 to 5, using this scale:\n\
5: everything the prompt describes is in the image, with nothing wrong.\n\
4: most of the described objects, actions, events and relations are shown, with small mistakes.\n\
3: some elements of the prompt are shown, but key parts or details are missing.\n\
2: none of the described actions or events are shown.\n\
1 (or 0): the image does not convey what the prompt describes.\n\
Answer in exactly this format, with an explanation of at most 20 words:\n\
### SCORE: score\n\
### EXPLANATION: explanation";

/// How the image's media type is written in its `data:` URL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageMime {
    /// The type of the bytes (PNG, JPEG or WebP, from their magic numbers).
    #[default]
    Sniffed,
    /// `image/jpeg` whatever the bytes are, as the official evaluation labels its PNGs.
    AlwaysJpeg,
}

/// Where the judge is and how it is asked.
#[derive(Debug, Clone)]
pub struct JudgeSettings {
    /// The API root, e.g. `https://api.openai.com/v1` (`/chat/completions` is added).
    pub base_url: String,
    pub model: String,
    /// Sent as a bearer token when set.
    pub api_key: Option<String>,
    pub timeout: Duration,
    /// HTTP tries of one question (transport errors, 429, 5xx), at least 1.
    pub max_attempts: u32,
    /// Questions asked again after an answer that does not parse.
    pub max_reasks: u32,
    /// The first retry's delay without `Retry-After`; doubled each retry, jittered ±50%.
    pub retry_backoff: Duration,
    /// No wait is longer, whatever `Retry-After` says.
    pub max_retry_wait: Duration,
    pub max_tokens: u32,
    /// None: the API's default (the official runs set none).
    pub temperature: Option<f64>,
    /// The judge prompt, with [`PROMPT_PLACEHOLDER`] where the image's prompt goes.
    pub prompt_template: String,
    pub image_mime: ImageMime,
}

impl Default for JudgeSettings {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".into(),
            model: OFFICIAL_MODEL.into(),
            api_key: None,
            timeout: Duration::from_secs(120),
            max_attempts: 6,
            max_reasks: 2,
            retry_backoff: Duration::from_secs(2),
            max_retry_wait: Duration::from_secs(120),
            max_tokens: 4096,
            temperature: None,
            prompt_template: DEFAULT_PROMPT.into(),
            image_mime: ImageMime::Sniffed,
        }
    }
}

impl JudgeSettings {
    /// Takes the judge prompt from a file (UTF-8, used as it is): the file must hold
    /// [`PROMPT_PLACEHOLDER`].
    pub fn with_prompt_file(mut self, path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the judge prompt {}: {e}", path.display()))?;
        check_template(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        self.prompt_template = text;
        Ok(self)
    }

    /// The judge prompt of one image.
    pub fn prompt_for(&self, prompt: &str) -> String {
        self.prompt_template.replace(PROMPT_PLACEHOLDER, prompt)
    }
}

/// The identity of a judge in the run state: the model and a short hash of everything else that
/// shapes its scores (the prompt template, the temperature, the image's media type). Scores of
/// another judge, or of the same model asked differently, are not reused.
pub fn judge_id(s: &JudgeSettings) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [
        s.prompt_template.as_str(),
        &format!("{:?}", s.temperature),
        &format!("{:?}", s.image_mime),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    format!("{}@{}", s.model, hex::encode(&h.finalize()[..4]))
}

/// A judge prompt template must say where the prompt goes.
pub fn check_template(text: &str) -> Result<(), String> {
    if text.contains(PROMPT_PLACEHOLDER) {
        Ok(())
    } else {
        Err(format!(
            "the judge prompt holds no {PROMPT_PLACEHOLDER} placeholder"
        ))
    }
}

/// Tokens billed, from the answers' `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, o: Usage) {
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.total_tokens += o.total_tokens;
    }
}

/// A parsed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// 0 to 5.
    pub score: u8,
    pub explanation: String,
}

/// The judgement of one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    pub score: u8,
    pub explanation: String,
    /// The answer the score was read from, as the judge wrote it.
    pub answer: String,
    /// The model the server says answered (the requested one when it does not say).
    pub model: String,
    /// HTTP requests made, retries included.
    pub requests: u32,
    /// Answers that did not parse and were asked again.
    pub malformed: u32,
    pub usage: Usage,
}

/// Why an image has no judgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JudgeErrorKind {
    /// Unreachable, rate limited or failing (5xx) through every try: worth a later run.
    Unavailable,
    /// HTTP 401, 403, 404 or 407: the key, model or URL is wrong; every image would fail.
    Refused,
    /// Every answer was malformed.
    Malformed,
    /// Another refusal of the request (400, 413, ...), or a reply that is no chat completion.
    Failed,
}

#[derive(Debug, Clone)]
pub struct JudgeError {
    pub kind: JudgeErrorKind,
    pub message: String,
    pub requests: u32,
    pub malformed: u32,
    /// Tokens billed all the same (malformed answers).
    pub usage: Usage,
}

impl std::fmt::Display for JudgeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JudgeError {}

fn marker(name: &str) -> regex::Regex {
    regex::Regex::new(&format!(r"(?i)#+[ \t]*{name}[ \t]*:?")).expect("a valid marker pattern")
}

/// Reads a judge answer: a `### SCORE:` marker followed by an integer 0–5 (`4/5` reads as 4),
/// then an `### EXPLANATION:` marker and the explanation (the rest of the answer). Markdown
/// decoration (`**`, backticks), the case of the markers, the number of `#` and the spacing
/// are forgiven; a missing marker, a score that is not a whole number in range, and two
/// different scores are not. The official parser reads `### SCORE: ` up to `### EXPLANATION: `
/// and takes the integer between, failing otherwise.
pub fn parse_answer(text: &str) -> Result<Verdict, String> {
    let clean = text.replace("**", "").replace('`', "");
    let score_re = marker("score");
    let expl_re = marker("explanation");
    let expl = expl_re
        .find(&clean)
        .ok_or("the answer has no ### EXPLANATION: line")?;
    let mut score: Option<u8> = None;
    let mut found = false;
    for m in score_re.find_iter(&clean) {
        found = true;
        let rest = &clean[m.end()..];
        let mut end = rest.find('\n').unwrap_or(rest.len());
        if let Some(e) = expl_re.find(rest) {
            end = end.min(e.start());
        }
        let value = rest[..end].trim().trim_matches('*').trim();
        let number = value
            .strip_suffix("/5")
            .or_else(|| value.strip_suffix("/ 5"))
            .map(str::trim_end)
            .unwrap_or(value);
        let s = number
            .parse::<u8>()
            .ok()
            .filter(|s| *s <= 5)
            .ok_or_else(|| {
                let v: String = value.chars().take(40).collect();
                format!("the score `{v}` is not a whole number from 0 to 5")
            })?;
        match score {
            Some(prev) if prev != s => {
                return Err(format!("the answer gives two scores, {prev} and {s}"))
            }
            _ => score = Some(s),
        }
    }
    if !found {
        return Err("the answer has no ### SCORE: line".into());
    }
    let explanation = clean[expl.end()..].trim().to_string();
    Ok(Verdict {
        score: score.expect("a score was read"),
        explanation,
    })
}

/// The wait a refusal asks for: `retry-after-ms` (milliseconds), else `Retry-After` in seconds
/// (a whole or decimal number) or as an HTTP date (the time from `now` to it; none once past).
pub fn retry_after(
    headers: &reqwest::header::HeaderMap,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    let v = get("retry-after")?;
    if let Ok(s) = v.parse::<f64>() {
        return (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    (at.with_timezone(&chrono::Utc) - now).to_std().ok()
}

/// The `data:` URL of an image.
pub fn data_url(image: &[u8], mime: ImageMime) -> Result<String, String> {
    let format = sniff_format(image).ok_or("the image is not PNG, JPEG or WebP")?;
    let content_type = match mime {
        ImageMime::Sniffed => format.content_type(),
        ImageMime::AlwaysJpeg => ImageFormat::Jpeg.content_type(),
    };
    Ok(format!(
        "data:{content_type};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(image)
    ))
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<String>,
}

/// One answer: its text, usage and the answering model.
struct Answer {
    content: Option<String>,
    usage: Usage,
    model: Option<String>,
}

/// The judge client.
pub struct Judge {
    http: reqwest::Client,
    s: JudgeSettings,
}

impl Judge {
    /// A client with the process's TLS configuration (`crate::service::tls`).
    pub fn new(s: JudgeSettings) -> anyhow::Result<Self> {
        check_template(&s.prompt_template).map_err(anyhow::Error::msg)?;
        let http = crate::service::tls::get()
            .http(reqwest::Client::builder())
            .timeout(s.timeout.max(Duration::from_secs(1)))
            .connect_timeout(
                s.timeout
                    .clamp(Duration::from_secs(1), Duration::from_secs(10)),
            )
            .build()?;
        Ok(Self { http, s })
    }

    pub fn settings(&self) -> &JudgeSettings {
        &self.s
    }

    /// The chat-completions request body for an image of `prompt`.
    pub fn request_body(&self, prompt: &str, image: &[u8]) -> Result<Value, String> {
        let mut body = json!({
            "model": self.s.model,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "text", "text": self.s.prompt_for(prompt)},
                    {"type": "image_url", "image_url": {"url": data_url(image, self.s.image_mime)?}}
                ]
            }],
            "max_tokens": self.s.max_tokens,
        });
        if let Some(t) = self.s.temperature {
            body["temperature"] = json!(t);
        }
        Ok(body)
    }

    fn delay(&self, retry: u32, asked: Option<Duration>) -> Duration {
        let wait = asked.unwrap_or_else(|| {
            let base = self
                .s
                .retry_backoff
                .saturating_mul(1 << retry.saturating_sub(1).min(16));
            base.mul_f64(0.5 + rand::random::<f64>())
        });
        wait.min(self.s.max_retry_wait)
    }

    /// One question, retried on transport errors, 429 and 5xx; `requests` counts every try.
    async fn ask(
        &self,
        body: &Value,
        requests: &mut u32,
    ) -> Result<Answer, (JudgeErrorKind, String)> {
        let url = format!("{}/chat/completions", self.s.base_url.trim_end_matches('/'));
        let max = self.s.max_attempts.max(1);
        let mut tries = 0;
        loop {
            tries += 1;
            *requests += 1;
            let mut req = self.http.post(&url).json(body);
            if let Some(key) = &self.s.api_key {
                req = req.bearer_auth(key);
            }
            let (message, asked) = match req.send().await {
                Err(e) => (format!("the judge cannot be reached: {e}"), None),
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        let r: ChatResponse = resp.json().await.map_err(|e| {
                            (
                                JudgeErrorKind::Failed,
                                format!("the judge's reply is not a chat completion: {e}"),
                            )
                        })?;
                        let content = r.choices.into_iter().next().and_then(|c| c.message.content);
                        return Ok(Answer {
                            content,
                            usage: r.usage.unwrap_or_default(),
                            model: r.model,
                        });
                    }
                    let asked = retry_after(resp.headers(), chrono::Utc::now());
                    let text: String = resp
                        .text()
                        .await
                        .unwrap_or_default()
                        .chars()
                        .take(300)
                        .collect();
                    let message = format!("the judge answered HTTP {status}: {text}");
                    let code = status.as_u16();
                    if matches!(code, 401 | 403 | 404 | 407) {
                        return Err((JudgeErrorKind::Refused, message));
                    }
                    if code != 429 && !status.is_server_error() {
                        return Err((JudgeErrorKind::Failed, message));
                    }
                    (message, asked)
                }
            };
            if tries >= max {
                return Err((
                    JudgeErrorKind::Unavailable,
                    format!("{message} (after {tries} tries)"),
                ));
            }
            let wait = self.delay(tries, asked);
            tracing::warn!(try_ = tries, wait_ms = wait.as_millis() as u64, error = %message, "judge call failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// Judges an image (PNG, JPEG or WebP bytes) of `prompt`.
    pub async fn judge(&self, prompt: &str, image: &[u8]) -> Result<Judgement, JudgeError> {
        let mut requests = 0;
        let mut malformed = 0;
        let mut usage = Usage::default();
        let fail = |kind, message, requests, malformed, usage| JudgeError {
            kind,
            message,
            requests,
            malformed,
            usage,
        };
        let body = self
            .request_body(prompt, image)
            .map_err(|m| fail(JudgeErrorKind::Failed, m, 0, 0, usage))?;
        let mut last = String::new();
        for _ in 0..=self.s.max_reasks {
            let answer = match self.ask(&body, &mut requests).await {
                Ok(a) => a,
                Err((kind, message)) => {
                    return Err(fail(kind, message, requests, malformed, usage))
                }
            };
            usage += answer.usage;
            let text = answer.content.unwrap_or_default();
            match parse_answer(&text) {
                Ok(v) => {
                    return Ok(Judgement {
                        score: v.score,
                        explanation: v.explanation,
                        answer: text,
                        model: answer.model.unwrap_or_else(|| self.s.model.clone()),
                        requests,
                        malformed,
                        usage,
                    })
                }
                Err(e) => {
                    malformed += 1;
                    let shown: String = text.chars().take(200).collect();
                    tracing::warn!(error = %e, answer = %shown, "judge answer malformed; asking again");
                    last = format!("{e} (answer: {shown:?})");
                }
            }
        }
        Err(fail(
            JudgeErrorKind::Malformed,
            format!("the judge's answer stayed malformed after {malformed} tries: {last}"),
            requests,
            malformed,
            usage,
        ))
    }
}

#[cfg(test)]
#[path = "judge_tests.rs"]
mod tests;
