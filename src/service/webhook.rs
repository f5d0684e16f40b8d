//! Webhooks, in the Standard Webhooks format (as Svix and cog/Replicate send them): a job may
//! ask (`output.webhook`) for its events to be POSTed to a URL.
//!
//! - **What is sent.** `{"type": "job.succeeded", "timestamp": "<RFC 3339>", "data": <event>}`
//!   with the headers `webhook-id` (one per (job, event), the same on every retry and every
//!   redelivery of the job, so receivers deduplicate), `webhook-timestamp` (Unix seconds of the
//!   attempt) and `webhook-signature` (`v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`,
//!   one per configured secret, space-separated, so a secret rotates without a gap). Signed
//!   with the `standardwebhooks` crate; each tenant has its own secrets.
//! - **Where it may go.** A host of the tenant's (or the fleet's) allow-list, `https` (or
//!   `http` where allowed), port 443 (80 for http) or a listed port, no credentials. The name
//!   is resolved by the sender itself and every address checked: loopback, private, link-local,
//!   CGNAT, multicast, unspecified and cloud-metadata addresses are refused unless inside a
//!   network the tenant allows; the connection goes to an address that was checked (no second
//!   lookup, so DNS rebinding cannot switch it). Redirects are not followed.
//! - **Durable.** Deliveries are messages in an outbox queue (`amqp.webhooks_queue`), published
//!   with confirms before the job is acked and acked only after a 2xx ([`crate::worker`] runs
//!   the outbox): a worker killed after the job's ack loses no delivery. 429, 5xx, timeouts and
//!   network errors are retried with backoff (honouring `Retry-After`) for
//!   `webhook.retry_budget_secs`, then dead-lettered with the last answer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Settings, TenantSettings, WebhookSettings};
use crate::job::{WebhookEvent, WebhookSpec};
use crate::service::tenancy::Scope;

/// The hosts, ports and networks a tenant's (or the fleet's) webhooks may reach.
#[derive(Debug, Clone, Default)]
pub struct Receivers {
    pub hosts: Vec<String>,
    pub ports: Vec<u16>,
    pub networks: Vec<IpNet>,
    pub allow_http: bool,
}

impl Receivers {
    /// The receivers of a tenant (its own lists) or, without one, of the fleet (`[webhook]`).
    pub fn of(settings: &Settings, tenant: Option<&TenantSettings>) -> Self {
        let w = &settings.webhook;
        let (hosts, ports, networks) = match tenant {
            Some(t) => (
                &t.webhook_allowed_hosts,
                &t.webhook_allowed_ports,
                &t.webhook_allowed_networks,
            ),
            None => (&w.allowed_hosts, &w.allowed_ports, &w.allowed_networks),
        };
        Self {
            hosts: hosts.clone(),
            ports: ports.clone(),
            // Checked when the settings were loaded.
            networks: networks.iter().filter_map(|n| n.parse().ok()).collect(),
            allow_http: w.allow_http,
        }
    }

    /// Checks a webhook URL: syntax, scheme, no credentials, an allowed host and port, and an
    /// allowed address when the host is an IP literal (names are checked when resolved). The
    /// reason is a client's.
    pub fn check(&self, spec: &WebhookSpec) -> Result<reqwest::Url, String> {
        if spec.url.len() > 2048 {
            return Err("webhook url is longer than 2048 characters".into());
        }
        let url = reqwest::Url::parse(&spec.url).map_err(|e| format!("webhook url: {e}"))?;
        let default_port = match url.scheme() {
            "https" => 443,
            "http" if self.allow_http => 80,
            other => {
                return Err(format!(
                    "webhook url scheme `{other}` is not allowed (https{})",
                    if self.allow_http { " or http" } else { "" }
                ))
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err("webhook url must not carry credentials".into());
        }
        if self.hosts.is_empty() {
            return Err("webhooks are not enabled for this tenant (no allowed hosts)".into());
        }
        let host = url.host_str().unwrap_or("").to_ascii_lowercase();
        if !host_allowed(&host, &self.hosts) {
            return Err(format!("webhook host `{host}` is not an allowed host"));
        }
        let port = url.port().unwrap_or(default_port);
        if port != default_port && !self.ports.contains(&port) {
            return Err(format!("webhook port {port} is not an allowed port"));
        }
        // An IP literal is reached without a lookup: its address is checked here.
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        if let Some(ip) = literal.filter(|ip| !self.address_allowed(*ip)) {
            return Err(format!("webhook address {ip} is a refused address"));
        }
        Ok(url)
    }

    /// Whether a receiver may be reached at `ip`: a public address, or one inside an allowed
    /// network.
    pub fn address_allowed(&self, ip: IpAddr) -> bool {
        !refused(ip) || self.networks.iter().any(|n| n.contains(&ip))
    }
}

/// Addresses no webhook reaches by default: loopback, private (RFC 1918, ULA), link-local
/// (cloud metadata at 169.254.169.254 included), CGNAT (100.64/10), multicast, broadcast,
/// unspecified, documentation and IPv4-mapped forms of these.
pub fn refused(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_unspecified()
                || v4.is_documentation()
                || (a == 100 && (64..128).contains(&b))
                || a == 0
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return refused(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // Unique local (fc00::/7, AWS's metadata fd00:ec2::254 among them), link-local.
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
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

/// Reads `output.webhook` from a message body, if it has a usable one (used at settlement,
/// when the message may not be a valid job).
pub fn spec_of(body: &[u8], max_bytes: usize) -> Option<WebhookSpec> {
    if body.len() > max_bytes {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    serde_json::from_value(v.get("output")?.get("webhook")?.clone()).ok()
}

/// One delivery in the outbox: what to send, where, under which id. The body of a message on
/// `amqp.webhooks_queue`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// The tenant whose receivers and secrets apply (none in a single-tenant fleet).
    pub tenant: Option<String>,
    pub url: String,
    /// `webhook-id`: the same for every attempt and every redelivery of the job.
    pub id: String,
    /// The body, as sent.
    pub body: String,
    /// When the first attempt was due (ms since the Unix epoch): the retry budget counts from
    /// here.
    pub first_at_ms: u64,
    /// The job's trace context: the delivery's span continues it, and the receiver gets it as
    /// `traceparent`/`tracestate` headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl Delivery {
    /// The delivery of an event of `kind` about job `job_id` (`data` is the event's JSON), or
    /// none when the job's webhook does not ask for it. `nth` tells apart events of one kind
    /// (the attempt of a start, the step of a progress event).
    pub fn of(
        scope: &Scope,
        job_id: &str,
        spec: &WebhookSpec,
        kind: WebhookEvent,
        nth: u64,
        data: &impl Serialize,
    ) -> Option<Self> {
        if !spec.wants(kind) {
            return None;
        }
        let now = chrono::Utc::now();
        let body = serde_json::json!({
            "type": kind.event_type(),
            "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "data": data,
        });
        let mut h = Sha256::new();
        for part in [
            scope.name().unwrap_or(""),
            job_id,
            kind.name(),
            &nth.to_string(),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        Some(Self {
            tenant: scope.name().map(str::to_string),
            url: spec.url.clone(),
            id: format!("msg_{}", &hex::encode(h.finalize())[..32]),
            body: body.to_string(),
            first_at_ms: now.timestamp_millis().max(0) as u64,
            traceparent: None,
            tracestate: None,
        })
    }

    /// The delivery carrying the trace context `trace`.
    pub fn traced(mut self, trace: Option<crate::service::telemetry::TraceHeaders>) -> Self {
        if let Some(t) = trace {
            self.traceparent = Some(t.traceparent);
            self.tracestate = t.tracestate;
        }
        self
    }

    /// The trace context it carries, if valid.
    pub fn trace(&self) -> Option<crate::service::telemetry::TraceHeaders> {
        crate::service::telemetry::TraceHeaders::parse(
            self.traceparent.as_deref()?,
            self.tracestate.as_deref(),
        )
    }

    pub fn scope(&self) -> Scope {
        self.tenant
            .as_deref()
            .map_or_else(Scope::single, Scope::tenant)
    }
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// The receiver answered 2xx.
    Delivered,
    /// Worth trying again (429, 5xx, a timeout, a network error), after `after` when the
    /// receiver said (`Retry-After`).
    Retry {
        answer: String,
        after: Option<Duration>,
    },
    /// Not worth trying again (another status, a refused address or URL, no secret).
    GiveUp { answer: String },
    /// The receiver's host already has `webhook.max_per_host` deliveries in flight: try again
    /// soon, without counting an attempt.
    HostBusy,
}

/// A tenant's (or the fleet's) way out: its receivers, an HTTP client that resolves names
/// itself under those rules, and its signing secrets.
struct Outlet {
    receivers: Arc<Receivers>,
    client: reqwest::Client,
    signers: Vec<standardwebhooks::Webhook>,
}

/// Sends deliveries: one outlet per tenant, a bound per receiver host.
pub struct Sender {
    outlets: HashMap<Option<String>, Outlet>,
    settings: WebhookSettings,
    per_host: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A resolver that lets a connection go only to addresses its receivers allow.
struct CheckedResolver(Arc<Receivers>);

/// Why no address of a name may be reached.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves only to refused addresses")]
struct RefusedAddress(String);

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let receivers = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = all
                .into_iter()
                .filter(|a| receivers.address_allowed(a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(
                    Box::new(RefusedAddress(host)) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A secret as Standard Webhooks writes it (`whsec_<base64 of the key>`); any other text is the
/// key's bytes themselves (the secrets of earlier releases).
fn signer(secret: &str) -> anyhow::Result<standardwebhooks::Webhook> {
    let secret = secret.trim();
    if secret.starts_with("whsec_") {
        standardwebhooks::Webhook::new(secret)
            .map_err(|e| anyhow::anyhow!("webhook secret `whsec_…` is not base64: {e}"))
    } else {
        standardwebhooks::Webhook::from_bytes(secret.as_bytes().to_vec())
            .map_err(|e| anyhow::anyhow!("webhook secret: {e}"))
    }
}

fn read_secret_file(path: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read webhook secret file {path}: {e}"))?;
    let secret = text.trim().to_string();
    if secret.is_empty() {
        anyhow::bail!("webhook secret file {path} is empty");
    }
    Ok(secret)
}

impl Outlet {
    fn new(
        receivers: Receivers,
        secrets: Vec<String>,
        s: &WebhookSettings,
    ) -> anyhow::Result<Self> {
        let receivers = Arc::new(receivers);
        // The roots of every TLS client (the system's plus tls.ca_file), never the client
        // certificate: receivers are third parties.
        let client = crate::service::tls::get()
            .http_anonymous(reqwest::Client::builder())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(s.timeout_secs.max(1)))
            .user_agent(concat!("r2f/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(CheckedResolver(receivers.clone())))
            .build()?;
        let signers = secrets
            .iter()
            .map(|x| signer(x))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            receivers,
            client,
            signers,
        })
    }
}

impl Sender {
    /// None when no webhook may be sent (no allowed host anywhere). Every allow-list needs a
    /// secret: an unsigned webhook cannot be trusted by its receiver.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Option<Arc<Self>>> {
        let w = &settings.webhook;
        let mut outlets = HashMap::new();
        if !w.allowed_hosts.is_empty() {
            let secret = w.secret()?.ok_or_else(|| {
                anyhow::anyhow!(
                    "webhook.allowed_hosts is set but there is no secret (set {} or webhook.secret_file)",
                    w.secret_env
                )
            })?;
            let receivers = Receivers::of(settings, None);
            outlets.insert(None, Outlet::new(receivers, vec![secret], w)?);
        }
        for (name, t) in &settings.tenants {
            if t.webhook_allowed_hosts.is_empty() {
                continue;
            }
            if t.webhook_secret_files.is_empty() {
                anyhow::bail!(
                    "tenants.{name}.webhook_allowed_hosts is set but tenants.{name}.webhook_secret_files is empty"
                );
            }
            let secrets = t
                .webhook_secret_files
                .iter()
                .map(|f| read_secret_file(f))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let receivers = Receivers::of(settings, Some(t));
            outlets.insert(Some(name.clone()), Outlet::new(receivers, secrets, w)?);
        }
        if outlets.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Self {
            outlets,
            settings: w.clone(),
            per_host: Mutex::new(HashMap::new()),
        })))
    }

    pub fn settings(&self) -> &WebhookSettings {
        &self.settings
    }

    /// A slot for one delivery to `host`, if it has one free.
    fn slot(&self, host: &str) -> Option<OwnedSemaphorePermit> {
        let sem = {
            let mut map = self.per_host.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(host.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.settings.max_per_host.max(1))))
                .clone()
        };
        sem.try_acquire_owned().ok()
    }

    /// The `webhook-signature` header of `body` sent as `id` at `timestamp`: one `v1,…` per
    /// secret.
    fn signature(outlet: &Outlet, id: &str, timestamp: i64, body: &str) -> Result<String, String> {
        let mut out = Vec::new();
        for s in &outlet.signers {
            out.push(
                s.sign(id, timestamp, body.as_bytes())
                    .map_err(|e| format!("signing: {e}"))?,
            );
        }
        Ok(out.join(" "))
    }

    /// One attempt at a delivery.
    pub async fn attempt(&self, d: &Delivery) -> Attempt {
        let Some(outlet) = self.outlets.get(&d.tenant) else {
            return Attempt::GiveUp {
                answer: "webhooks are not enabled for this tenant".into(),
            };
        };
        let spec = WebhookSpec {
            url: d.url.clone(),
            events: None,
        };
        let url = match outlet.receivers.check(&spec) {
            Ok(u) => u,
            Err(why) => return Attempt::GiveUp { answer: why },
        };
        let host = url.host_str().unwrap_or("").to_ascii_lowercase();
        let Some(_slot) = self.slot(&host) else {
            return Attempt::HostBusy;
        };
        let timestamp = chrono::Utc::now().timestamp();
        let signature = match Self::signature(outlet, &d.id, timestamp, &d.body) {
            Ok(s) => s,
            Err(e) => return Attempt::GiveUp { answer: e },
        };
        let mut request = outlet
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &d.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature);
        let trace =
            crate::service::telemetry::outgoing(&tracing::Span::current(), d.trace().as_ref());
        if let Some(t) = trace {
            request = request.header(crate::service::telemetry::TRACEPARENT, t.traceparent);
            if let Some(s) = t.tracestate {
                request = request.header(crate::service::telemetry::TRACESTATE, s);
            }
        }
        let answer = request.body(d.body.clone()).send().await;
        match answer {
            Ok(r) if r.status().is_success() => Attempt::Delivered,
            Ok(r) => {
                let status = r.status();
                let answer = format!("HTTP {}", status.as_u16());
                if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                    Attempt::Retry {
                        answer,
                        after: retry_after(r.headers()),
                    }
                } else {
                    Attempt::GiveUp { answer }
                }
            }
            Err(e) => {
                let refused =
                    std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                        e.source()
                    })
                    .any(|e| e.is::<RefusedAddress>());
                let answer = crate::config::redact_text(&error_chain(&e));
                if refused {
                    Attempt::GiveUp { answer }
                } else {
                    Attempt::Retry {
                        answer,
                        after: None,
                    }
                }
            }
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// `Retry-After` in seconds (an HTTP date is read as "now"), capped at an hour.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let secs = v.trim().parse::<u64>().unwrap_or(0);
    Some(Duration::from_secs(secs.min(3600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receivers(hosts: &[&str]) -> Receivers {
        Receivers {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            ports: vec![8443],
            networks: vec![],
            allow_http: false,
        }
    }

    fn spec(url: &str) -> WebhookSpec {
        WebhookSpec {
            url: url.into(),
            events: None,
        }
    }

    #[test]
    fn only_allowed_hosts_ports_schemes_and_addresses_pass() {
        let r = receivers(&["hooks.example.com", "*.clients.example.org", "10.0.0.5"]);
        assert!(r.check(&spec("https://hooks.example.com/r2f")).is_ok());
        assert!(r.check(&spec("https://a.clients.example.org/x")).is_ok());
        assert!(r.check(&spec("https://hooks.example.com:8443/x")).is_ok());
        for (url, why) in [
            ("http://hooks.example.com/r2f", "scheme `http`"),
            (
                "https://169.254.169.254/latest/meta-data",
                "not an allowed host",
            ),
            ("https://localhost/", "not an allowed host"),
            ("https://clients.example.org/", "not an allowed host"),
            ("https://evilclients.example.org/", "not an allowed host"),
            ("https://hooks.example.com.evil.net/", "not an allowed host"),
            ("https://hooks.example.com:22/", "port 22"),
            ("https://10.0.0.5/", "refused address"),
            ("https://user:pw@hooks.example.com/", "credentials"),
            ("file:///etc/passwd", "scheme `file`"),
            ("not a url", "webhook url"),
        ] {
            let err = r.check(&spec(url)).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
        }
        assert!(receivers(&[])
            .check(&spec("https://hooks.example.com/"))
            .unwrap_err()
            .contains("not enabled"));
        let mut allowed = r.clone();
        allowed.networks = vec!["10.0.0.0/24".parse().unwrap()];
        assert!(allowed.check(&spec("https://10.0.0.5/")).is_ok());
    }

    #[test]
    fn internal_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(refused(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "100.128.0.1",
        ] {
            assert!(!refused(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn a_delivery_id_is_stable_per_job_and_event() {
        let s = spec("https://h/");
        let data = serde_json::json!({"id": "j"});
        let a = Delivery::of(
            &Scope::tenant("t"),
            "j",
            &s,
            WebhookEvent::Succeeded,
            0,
            &data,
        )
        .unwrap();
        let b = Delivery::of(
            &Scope::tenant("t"),
            "j",
            &s,
            WebhookEvent::Succeeded,
            0,
            &data,
        )
        .unwrap();
        assert_eq!(a.id, b.id);
        let c = Delivery::of(
            &Scope::tenant("u"),
            "j",
            &s,
            WebhookEvent::Succeeded,
            0,
            &data,
        )
        .unwrap();
        assert_ne!(a.id, c.id);
        assert!(
            Delivery::of(&Scope::single(), "j", &s, WebhookEvent::Progress, 1, &data).is_none()
        );
        let body: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(body["type"], "job.succeeded");
        assert_eq!(body["data"]["id"], "j");
    }

    #[test]
    fn signatures_verify_with_the_standard_webhooks_library_under_every_secret() {
        let secrets = [
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_c2Vjb25kLXNlY3JldC0xMjM0NTY3OA==",
        ];
        let outlet = Outlet::new(
            receivers(&["h"]),
            secrets.iter().map(|s| s.to_string()).collect(),
            &WebhookSettings {
                allowed_hosts: vec![],
                allow_http: false,
                secret_env: String::new(),
                secret_file: String::new(),
                timeout_secs: 1,
                retry_budget_secs: 1,
                retry_min_ms: 1,
                max_in_flight: 1,
                max_per_host: 1,
                allowed_ports: vec![],
                allowed_networks: vec![],
            },
        )
        .unwrap();
        let ts = chrono::Utc::now().timestamp();
        let sig = Sender::signature(&outlet, "msg_1", ts, "{\"a\":1}").unwrap();
        assert_eq!(sig.split(' ').count(), 2, "{sig}");
        for s in secrets {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert("webhook-id", "msg_1".parse().unwrap());
            headers.insert("webhook-timestamp", ts.to_string().parse().unwrap());
            headers.insert("webhook-signature", sig.parse().unwrap());
            standardwebhooks::Webhook::new(s)
                .unwrap()
                .verify(b"{\"a\":1}", &headers)
                .unwrap();
        }
    }
}
