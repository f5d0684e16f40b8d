//! Webhooks: a job may ask (`output.webhook`) for its terminal event to be POSTed to a URL.
//!
//! - Only hosts in `webhook.allowed_hosts` are called (exact names, or `*.example.com` for the
//!   subdomains of a domain); a job naming any other host is rejected at validation, so no job
//!   can make a worker request an arbitrary (internal) address. Redirects are not followed.
//!   `https` only, unless `webhook.allow_http`.
//! - The body is the result event, signed with HMAC-SHA256 over `"<timestamp>.<body>"` with
//!   `webhook.secret` (from the environment variable `webhook.secret_env` or the file
//!   `webhook.secret_file`): headers `X-R2F-Timestamp` (Unix seconds), `X-R2F-Signature`
//!   (`v1=<hex>`), `X-R2F-Event` (`job.<status>`) and `X-R2F-Delivery` (one id per event, the
//!   same on every retry, for the receiver's deduplication).
//! - Delivered off the job path (a task per event, at most `webhook.max_in_flight` at once):
//!   network errors, timeouts, 429 and 5xx are retried with jittered exponential backoff for up
//!   to `webhook.retry_budget_secs`; other answers end the delivery. Deliveries live in the
//!   worker process: one that exits drops what it has not delivered (the result event on the
//!   broker and the status record stay the durable answers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::config::WebhookSettings;
use crate::job::{ResultEvent, WebhookSpec};
use crate::service::metrics::{Delivery, Metrics};

/// Checks a job's webhook URL against the settings; the reason is a client's.
pub fn check(spec: &WebhookSpec, s: &WebhookSettings) -> Result<reqwest::Url, String> {
    if spec.url.len() > 2048 {
        return Err("webhook url is longer than 2048 characters".into());
    }
    let url = reqwest::Url::parse(&spec.url).map_err(|e| format!("webhook url: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if s.allow_http => {}
        other => {
            return Err(format!(
                "webhook url scheme `{other}` is not allowed (https{})",
                if s.allow_http { " or http" } else { "" }
            ))
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("webhook url must not carry credentials".into());
    }
    let host = url.host_str().unwrap_or("").to_ascii_lowercase();
    if s.allowed_hosts.is_empty() {
        return Err(
            "webhooks are not enabled on this fleet (webhook.allowed_hosts is empty)".into(),
        );
    }
    if !host_allowed(&host, &s.allowed_hosts) {
        return Err(format!(
            "webhook host `{host}` is not in webhook.allowed_hosts"
        ));
    }
    // The event names are the job's typed outcomes, checked when the job was read.
    Ok(url)
}

/// `host` is listed, or is a subdomain of a `*.domain` entry.
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    allowed.iter().any(|a| {
        let a = a.trim().to_ascii_lowercase();
        match a.strip_prefix("*.") {
            Some(domain) => host
                .strip_suffix(domain)
                .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
            None => host == a,
        }
    })
}

/// `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Reads `output.webhook` from a message body, if it has a usable one (used at settlement,
/// when the message may not be a valid job).
pub fn spec_of(body: &[u8], max_bytes: usize) -> Option<WebhookSpec> {
    if body.len() > max_bytes {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    serde_json::from_value(v.get("output")?.get("webhook")?.clone()).ok()
}

/// The sender: one HTTP client, the secret, a bound on deliveries in flight.
pub struct Webhooks {
    client: reqwest::Client,
    secret: Vec<u8>,
    settings: WebhookSettings,
    in_flight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Webhooks {
    /// None when webhooks are off (no allowed host). A fleet that allows hosts must have a
    /// secret: an unsigned webhook cannot be trusted by its receiver.
    pub fn from_settings(
        s: &WebhookSettings,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        if s.allowed_hosts.is_empty() {
            return Ok(None);
        }
        let secret = s.secret()?.ok_or_else(|| {
            anyhow::anyhow!(
                "webhook.allowed_hosts is set but there is no secret (set {} or webhook.secret_file)",
                s.secret_env
            )
        })?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(s.timeout_secs.max(1)))
            .user_agent(concat!("r2f/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Some(Arc::new(Self {
            client,
            secret: secret.into_bytes(),
            settings: s.clone(),
            in_flight: Arc::new(Semaphore::new(s.max_in_flight.max(1))),
            metrics,
        })))
    }

    /// Sends `event` to the spec's URL in the background, if the spec wants its status and
    /// still passes the checks.
    pub fn deliver(self: &Arc<Self>, spec: &WebhookSpec, event: &ResultEvent) {
        if !spec.wants(event.status) {
            return;
        }
        let url = match check(spec, &self.settings) {
            Ok(u) => u,
            Err(reason) => {
                warn!(job_id = %event.id, reason = %reason, "webhook not sent");
                return;
            }
        };
        let Ok(body) = serde_json::to_vec(event) else {
            return;
        };
        let this = self.clone();
        let (id, kind) = (event.id.clone(), event.status.event_key());
        tokio::spawn(async move {
            let Ok(_permit) = this.in_flight.clone().acquire_owned().await else {
                return;
            };
            this.send(url, &id, &kind, body).await;
        });
    }

    async fn send(&self, url: reqwest::Url, id: &str, kind: &str, body: Vec<u8>) {
        let delivery = uuid::Uuid::new_v4().to_string();
        let budget = Duration::from_secs(self.settings.retry_budget_secs);
        let start = Instant::now();
        let mut backoff = crate::service::backoff::Backoff::new(
            Duration::from_millis(self.settings.retry_min_ms.max(1)),
            Duration::from_secs(60),
            Duration::MAX,
        );
        let host = url.host_str().unwrap_or("").to_string();
        for attempt in 1u32.. {
            let ts = now_unix();
            let answer = self
                .client
                .post(url.clone())
                .header("content-type", "application/json")
                .header("x-r2f-timestamp", ts.to_string())
                .header("x-r2f-signature", signature(&self.secret, ts, &body))
                .header("x-r2f-event", kind)
                .header("x-r2f-delivery", &delivery)
                .body(body.clone())
                .send()
                .await;
            let retry = match &answer {
                Ok(r) if r.status().is_success() => {
                    self.count(Delivery::Ok);
                    info!(job_id = id, host = %host, attempt, "webhook delivered");
                    return;
                }
                Ok(r) => r.status().is_server_error() || r.status().as_u16() == 429,
                Err(_) => true,
            };
            let what = match &answer {
                Ok(r) => format!("HTTP {}", r.status().as_u16()),
                Err(e) => crate::config::redact_text(&e.to_string()),
            };
            let wait = backoff.next_delay();
            if !retry || start.elapsed() + wait > budget {
                self.count(Delivery::Failed);
                warn!(job_id = id, host = %host, attempt, answer = %what, "webhook not delivered: giving up");
                return;
            }
            self.count(Delivery::Retry);
            warn!(job_id = id, host = %host, attempt, answer = %what, retry_in_ms = wait.as_millis() as u64, "webhook failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    fn count(&self, outcome: Delivery) {
        self.metrics
            .webhooks
            .with_label_values(&[outcome.name()])
            .inc();
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Outcome;

    fn settings(hosts: &[&str]) -> WebhookSettings {
        WebhookSettings {
            allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            allow_http: false,
            secret_env: "R2F_TEST_NO_SUCH_VAR".into(),
            secret_file: String::new(),
            timeout_secs: 10,
            retry_budget_secs: 600,
            retry_min_ms: 500,
            max_in_flight: 64,
        }
    }

    fn spec(url: &str) -> WebhookSpec {
        WebhookSpec {
            url: url.into(),
            events: None,
        }
    }

    #[test]
    fn only_allowed_hosts_and_schemes_pass() {
        let s = settings(&["hooks.example.com", "*.clients.example.org"]);
        assert!(check(&spec("https://hooks.example.com/r2f"), &s).is_ok());
        assert!(check(&spec("https://a.clients.example.org/x"), &s).is_ok());
        for (url, why) in [
            ("http://hooks.example.com/r2f", "scheme `http`"),
            (
                "https://169.254.169.254/latest/meta-data",
                "not in webhook.allowed_hosts",
            ),
            ("https://localhost/", "not in webhook.allowed_hosts"),
            (
                "https://clients.example.org/",
                "not in webhook.allowed_hosts",
            ),
            (
                "https://evilclients.example.org/",
                "not in webhook.allowed_hosts",
            ),
            (
                "https://hooks.example.com.evil.net/",
                "not in webhook.allowed_hosts",
            ),
            ("https://user:pw@hooks.example.com/", "credentials"),
            ("file:///etc/passwd", "scheme `file`"),
            ("not a url", "webhook url"),
        ] {
            let err = check(&spec(url), &s).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
        }
        let off = settings(&[]);
        assert!(check(&spec("https://hooks.example.com/"), &off)
            .unwrap_err()
            .contains("not enabled"));
    }

    #[test]
    fn the_filter_picks_statuses() {
        let mut s = spec("https://h/");
        assert!(s.wants(Outcome::Succeeded) && s.wants(Outcome::Cancelled));
        s.events = Some(vec![Outcome::Failed]);
        assert!(s.wants(Outcome::Failed) && !s.wants(Outcome::Succeeded));
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: Python's hmac.new(b"Jefe", b"1700000000.{}", "sha256").
        assert_eq!(
            signature(b"Jefe", 1_700_000_000, b"{}"),
            "v1=d3793e2b4103edfbd98cc19591832f5fad701d413db9fcae0ae7dab8184ed207"
        );
    }
}
