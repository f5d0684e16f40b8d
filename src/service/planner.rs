//! The LLM behind the planner: an OpenAI-compatible chat-completions client (GPT-4o, or LLaMA 3
//! served by vLLM, llama.cpp or Ollama) with timeouts and jittered retries, and the Redis plan
//! cache in front of it (single-flight across workers, bypassed when Redis is down).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::{redact_text, LlmSettings};
use crate::generate::JobMode;
use crate::plan::parse::{parse_r2f_answer, parse_r2fplus_answer};
use crate::plan::template::{self, TEMPLATE_VERSION};
use crate::plan::{Plan, PlanLimits, R2fPlan, RegionPlan};
use crate::service::metrics::Metrics;
use crate::service::redis_store::RedisStore;

/// Why no plan could be had: `transient` failures (LLM unreachable, rate limited) are retried
/// by the worker; the others (an answer that stays unusable) fail the job.
#[derive(Debug, Clone)]
pub struct PlanError {
    pub transient: bool,
    pub message: String,
    /// The planner refused this worker (HTTP 401, 403, 404: a bad key, model name or URL), not
    /// the job: the job must not be consumed by it.
    pub planner_fault: bool,
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub type PlanFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<R2fPlan, PlanError>> + Send + 'a>>;
pub type RegionPlanFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<RegionPlan, PlanError>> + Send + 'a>>;

/// The planner the settings configure: the LLM behind the Redis plan cache, or None when
/// `llm.enabled` is false.
pub fn planner_from_settings(
    settings: &crate::config::Settings,
) -> anyhow::Result<Option<std::sync::Arc<dyn Planner>>> {
    Ok(planner(settings)?.map(|p| p as std::sync::Arc<dyn Planner>))
}

/// Something that turns a prompt into an R2F or R2F+ plan (the LLM behind the plan cache).
pub trait Planner: Send + Sync {
    fn plan<'a>(&'a self, prompt: &'a str, metrics: &'a Metrics) -> PlanFuture<'a>;
    fn plan_regions<'a>(&'a self, prompt: &'a str, metrics: &'a Metrics) -> RegionPlanFuture<'a>;
}

/// Which plan to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanMode {
    R2f,
    R2fPlus,
}

impl PlanMode {
    /// The job mode this plan is for; its name is the mode's.
    pub fn job_mode(self) -> JobMode {
        match self {
            PlanMode::R2f => JobMode::R2f,
            PlanMode::R2fPlus => JobMode::R2fplus,
        }
    }

    pub fn name(self) -> &'static str {
        self.job_mode().name()
    }
}

pub struct LlmClient {
    http: reqwest::Client,
    s: LlmSettings,
    api_key: Option<String>,
    /// The `max_plan_*` limits answers must keep; an answer over them is unusable.
    limits: Option<PlanLimits>,
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<String>,
}

fn transient(message: String) -> PlanError {
    PlanError {
        transient: true,
        message,
        planner_fault: false,
    }
}

fn permanent(message: String) -> PlanError {
    PlanError {
        transient: false,
        message,
        planner_fault: false,
    }
}

/// The LLM refused this worker's credentials, model or URL.
fn refused(message: String) -> PlanError {
    PlanError {
        transient: false,
        message,
        planner_fault: true,
    }
}

impl LlmClient {
    pub fn new(s: &LlmSettings) -> anyhow::Result<Self> {
        let api_key = s.api_key()?;
        // The process's TLS configuration: the system roots plus tls.ca_file, the client
        // certificate.
        let http = crate::service::tls::get()
            .http(reqwest::Client::builder())
            .timeout(Duration::from_secs(s.timeout_secs.max(1)))
            .connect_timeout(Duration::from_secs(s.timeout_secs.clamp(1, 10)))
            .build()?;
        Ok(Self {
            http,
            s: s.clone(),
            api_key,
            limits: None,
        })
    }

    /// Treats answers whose plan breaks the `max_plan_*` limits as unusable (asked again, never
    /// cached).
    pub fn with_limits(mut self, limits: PlanLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    pub fn model(&self) -> &str {
        &self.s.model
    }

    /// A short hash of everything that shapes an answer: the server, model, dialect, answer
    /// length, the templates' version and the plan limits. Plans cached under one planner are
    /// not served by another (and nobody can predict a key without the configuration).
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            self.s.base_url.as_str(),
            self.s.model.as_str(),
            self.s.backend.name(),
            &self.s.max_tokens.to_string(),
            TEMPLATE_VERSION,
            &format!("{:?}", self.limits),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        hex::encode(&h.finalize()[..8])
    }

    /// The request body: GPT-4o with the API's default sampling (as the official runs), LLaMA 3
    /// with temperature 0.6 and top_p 0.9.
    fn body(&self, system: &str, user: &str) -> Value {
        let mut body = json!({
            "model": self.s.model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user}
            ],
            "max_tokens": self.s.max_tokens,
        });
        if self.s.backend == crate::config::LlmBackend::Llama {
            body["temperature"] = json!(0.6);
            body["top_p"] = json!(0.9);
        }
        body
    }

    /// One chat completion with retries on transport errors, 429 and 5xx.
    pub async fn chat(
        &self,
        system: &str,
        user: &str,
        metrics: &Metrics,
    ) -> Result<String, PlanError> {
        let url = format!("{}/chat/completions", self.s.base_url.trim_end_matches('/'));
        let body = self.body(system, user);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let started = Instant::now();
            let mut req = self.http.post(&url).json(&body);
            if let Some(key) = &self.api_key {
                req = req.bearer_auth(key);
            }
            let result = req.send().await;
            metrics.llm_seconds.observe(started.elapsed().as_secs_f64());
            let mut refused_status = None;
            let (retryable, message, retry_after) = match result {
                Err(e) => (
                    true,
                    format!("LLM request failed: {}", redact_text(&e.to_string())),
                    None,
                ),
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        let parsed: Result<ChatResponse, _> = resp.json().await;
                        return match parsed {
                            Ok(r) => match r.choices.into_iter().next() {
                                Some(c) => {
                                    metrics.llm_requests.with_label_values(&["ok"]).inc();
                                    if c.finish_reason.as_deref() == Some("length") {
                                        tracing::warn!("LLM answer was cut at max_tokens");
                                    }
                                    Ok(c.message.content.unwrap_or_default())
                                }
                                None => {
                                    metrics.llm_requests.with_label_values(&["error"]).inc();
                                    Err(permanent("LLM answer has no choices".into()))
                                }
                            },
                            Err(e) => {
                                metrics.llm_requests.with_label_values(&["error"]).inc();
                                Err(permanent(format!(
                                    "LLM answer is not a chat completion: {e}"
                                )))
                            }
                        };
                    }
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = resp.text().await.unwrap_or_default();
                    let text: String = text.chars().take(300).collect();
                    let retryable = status.as_u16() == 429 || status.is_server_error();
                    if matches!(status.as_u16(), 401 | 403 | 404 | 407) {
                        refused_status = Some(status);
                    }
                    (
                        retryable,
                        format!("LLM answered HTTP {status}: {text}"),
                        retry_after,
                    )
                }
            };
            if !retryable {
                metrics.llm_requests.with_label_values(&["error"]).inc();
                return Err(if refused_status.is_some() {
                    refused(message)
                } else {
                    permanent(message)
                });
            }
            if attempt >= self.s.max_attempts {
                metrics.llm_requests.with_label_values(&["error"]).inc();
                return Err(transient(format!("{message} (after {attempt} attempts)")));
            }
            metrics.llm_requests.with_label_values(&["retry"]).inc();
            let base = self
                .s
                .retry_backoff_ms
                .saturating_mul(1 << (attempt - 1).min(10));
            let jittered = (base as f64 * (0.5 + rand::random::<f64>())) as u64;
            let delay = retry_after
                .unwrap_or(Duration::from_millis(jittered))
                .min(Duration::from_secs(60));
            tracing::warn!(attempt, retry_in_ms = delay.as_millis() as u64, error = ?message, "LLM call failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// Asks for a plan, re-asking up to `max_reasks` times when the answer is unusable.
    pub async fn ask(
        &self,
        prompt: &str,
        mode: PlanMode,
        metrics: &Metrics,
    ) -> Result<Value, PlanError> {
        let (system, user) = match mode {
            PlanMode::R2f => (template::R2F_SYSTEM, template::r2f_user(prompt)),
            PlanMode::R2fPlus => (template::R2FPLUS_SYSTEM, template::r2fplus_user(prompt)),
        };
        let mut last = String::new();
        for _ in 0..=self.s.max_reasks {
            let answer = self.chat(system, &user, metrics).await?;
            let parsed = match mode {
                PlanMode::R2f => parse_r2f_answer(&answer, prompt).map(Plan::R2f),
                PlanMode::R2fPlus => parse_r2fplus_answer(&answer).map(Plan::Regions),
            }
            .and_then(|plan| {
                if let Some(limits) = &self.limits {
                    plan.check_limits(limits)?;
                }
                Ok(plan.to_json())
            });
            match parsed {
                Ok(v) => return Ok(v),
                Err(e) => {
                    metrics.llm_requests.with_label_values(&["invalid"]).inc();
                    tracing::warn!(error = ?e, "LLM answer unusable; asking again");
                    last = e;
                }
            }
        }
        Err(permanent(format!(
            "the LLM's answer stayed unusable after {} tries: {last}",
            self.s.max_reasks + 1
        )))
    }
}

/// Collapses whitespace: prompts that differ only in spacing share a plan.
pub fn normalize_prompt(p: &str) -> String {
    p.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The LLM behind the Redis plan cache.
pub struct CachedPlanner {
    llm: LlmClient,
    redis: RedisStore,
    ttl: Duration,
    lock_ttl: Duration,
}

impl CachedPlanner {
    pub fn new(llm: LlmClient, redis: RedisStore, ttl: Duration) -> Self {
        let lock_ttl = Duration::from_secs(
            (llm.s.timeout_secs * llm.s.max_attempts as u64 * (llm.s.max_reasks as u64 + 1))
                .clamp(10, 600),
        );
        Self {
            llm,
            redis,
            ttl,
            lock_ttl,
        }
    }

    /// Key: the planner's fingerprint (server, model, dialect, templates, limits), the mode and
    /// the normalised prompt's hash.
    pub fn cache_key(&self, prompt: &str, mode: PlanMode) -> String {
        let hash = hex::encode(Sha256::digest(normalize_prompt(prompt).as_bytes()));
        self.redis
            .key(&["plan", &self.llm.fingerprint(), mode.name(), &hash])
    }

    /// The plan for a prompt: from the cache, or from the LLM once across all workers.
    pub async fn plan_value(
        &self,
        prompt: &str,
        mode: PlanMode,
        metrics: &Metrics,
    ) -> Result<Value, PlanError> {
        let key = self.cache_key(prompt, mode);
        let lock = format!("{key}:lock");
        let token = uuid::Uuid::new_v4().simple().to_string();
        let deadline = Instant::now() + self.lock_ttl;
        let mut counted_miss = false;
        loop {
            match self.redis.get(&key).await {
                Ok(Some(v)) => match serde_json::from_str::<Value>(&v) {
                    Ok(v) => {
                        metrics.plan_cache.with_label_values(&["hit"]).inc();
                        return Ok(v);
                    }
                    Err(_) => tracing::warn!("unreadable cached plan; asking the LLM"),
                },
                Ok(None) => {}
                Err(e) => {
                    metrics.plan_cache.with_label_values(&["error"]).inc();
                    tracing::warn!(error = %e, "plan cache unavailable: asking the LLM directly");
                    return self.llm.ask(prompt, mode, metrics).await;
                }
            }
            if !counted_miss {
                metrics.plan_cache.with_label_values(&["miss"]).inc();
                counted_miss = true;
            }
            match self.redis.set_nx(&lock, &token, self.lock_ttl).await {
                Ok(true) => {
                    let result = self.llm.ask(prompt, mode, metrics).await;
                    if let Ok(v) = &result {
                        if let Err(e) = self.redis.set_ex(&key, &v.to_string(), self.ttl).await {
                            tracing::warn!(error = %e, "cannot store the plan in the cache");
                        }
                    }
                    let _ = self.redis.release(&lock, &token).await;
                    return result;
                }
                Ok(false) => {
                    // Another worker is asking the LLM for this prompt: wait for its answer.
                    if Instant::now() > deadline {
                        return self.llm.ask(prompt, mode, metrics).await;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    metrics.plan_cache.with_label_values(&["error"]).inc();
                    tracing::warn!(error = %e, "plan cache unavailable: asking the LLM directly");
                    return self.llm.ask(prompt, mode, metrics).await;
                }
            }
        }
    }
}

impl Planner for CachedPlanner {
    fn plan<'a>(&'a self, prompt: &'a str, metrics: &'a Metrics) -> PlanFuture<'a> {
        Box::pin(async move {
            let v = self.plan_value(prompt, PlanMode::R2f, metrics).await?;
            match Plan::from_json(&v) {
                Ok(Plan::R2f(p)) => Ok(p),
                Ok(_) => Err(permanent("cached plan is not an R2F plan".into())),
                Err(e) => Err(permanent(format!("cached plan invalid: {e}"))),
            }
        })
    }

    fn plan_regions<'a>(&'a self, prompt: &'a str, metrics: &'a Metrics) -> RegionPlanFuture<'a> {
        Box::pin(async move {
            let v = self.plan_value(prompt, PlanMode::R2fPlus, metrics).await?;
            match Plan::from_json(&v) {
                Ok(Plan::Regions(p)) => Ok(p),
                Ok(_) => Err(permanent("cached plan is not an R2F+ plan".into())),
                Err(e) => Err(permanent(format!("cached R2F+ plan invalid: {e}"))),
            }
        })
    }
}

/// The configured planner, or None when `llm.enabled` is false.
pub fn planner(s: &crate::config::Settings) -> anyhow::Result<Option<Arc<CachedPlanner>>> {
    if !s.llm.enabled {
        return Ok(None);
    }
    let llm = LlmClient::new(&s.llm)?.with_limits(s.limits.plan());
    let redis = RedisStore::new(&s.redis);
    Ok(Some(Arc::new(CachedPlanner::new(
        llm,
        redis,
        Duration::from_secs(s.redis.plan_ttl_secs),
    ))))
}
