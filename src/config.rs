//! Settings: the built-in `config/default.toml`, then an optional file, then `R2F__...`
//! environment variables. Validated at start; secrets never printed.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::device::{DType, DeviceSpec, OrAuto};
use crate::job::Limits;

const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct ModelSettings {
    /// A local diffusers-layout folder or a Hub model id.
    pub source: String,
    /// Which weight files to download and load where a component has both the full-precision
    /// files and the `.fp16.` variant: `auto` (the variant when the worker runs in fp16 or
    /// bf16), `fp16` or `full`.
    #[serde(default)]
    pub variant: crate::models::weights::WeightsVariant,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    pub model: String,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: OrAuto<DeviceSpec>,
    /// `auto`, `fp32`, `fp16` or `bf16`.
    pub dtype: OrAuto<DType>,
    pub prefetch: u16,
    pub max_attempts: u32,
    pub retry_backoff_ms: u64,
    pub retry_backoff_max_ms: u64,
    /// On SIGTERM the job in hand may finish for this long; past it, it is stopped at its next
    /// denoising step and handed back to the queue (not counted as a failure or a death).
    pub drain_timeout_secs: u64,
    /// After the drain deadline (or a second signal): how long the job in hand has to stop and
    /// be handed back before the process exits anyway (status 1; the broker redelivers it).
    pub stop_grace_secs: u64,
    pub progress_interval_ms: u64,
    /// How often a running job checks Redis for a cancellation request.
    pub cancel_poll_ms: u64,
    pub warmup: bool,
    pub name: String,
    /// A job still running after this long is abandoned: given back to the queue, its lock no
    /// longer renewed, `/healthz` failing until the GPU is free again.
    pub job_timeout_secs: u64,
    /// Failures in a row that are not the jobs' fault (dependencies, this worker) after which
    /// the worker stops consuming for a while; jobs stay queued for healthy workers.
    pub pause_after_failures: u32,
    /// The first pause; it doubles (with jitter) while the failures go on, up to the maximum.
    pub pause_min_secs: u64,
    pub pause_max_secs: u64,
    /// Delay before a job given back by a sick worker, or postponed because another worker
    /// holds it, is delivered again.
    pub give_back_delay_ms: u64,
}

#[derive(Clone, Deserialize)]
pub struct AmqpSettings {
    pub url: String,
    /// A file holding the URL (a mounted secret); when set it replaces `url`.
    #[serde(default)]
    pub url_file: String,
    /// Clients publish jobs here (a direct exchange) with the job's model as routing key.
    pub jobs_exchange: String,
    /// The queue of one model's jobs; `{model}` stands for the model's name (see
    /// [`AmqpSettings::queue_of`]).
    pub jobs_queue: String,
    /// Jobs published straight to this queue (the single queue of earlier versions), and jobs
    /// the exchange could not route: every worker routes them by their model, or rejects them.
    pub inbox_queue: String,
    /// The model of an inbox job that names none; empty: `worker.model`.
    pub default_model: String,
    pub dead_letter_queue: String,
    /// The prefix of one model's retry queues (`{model}` as in `jobs_queue`).
    pub retry_queue: String,
    pub events_exchange: String,
    /// The webhook outbox: deliveries wait here (durable) until a receiver answers 2xx; retries
    /// wait in `<webhooks_queue>.retry`, deliveries given up go to `<webhooks_queue>.dead`.
    pub webhooks_queue: String,
    /// Clients publish control messages (`cancel`) to this direct exchange.
    pub control_exchange: String,
    /// The queue every worker takes control messages from.
    pub control_queue: String,
    /// `reply_to` queues the worker answers: names starting with one of these (never r2f's own
    /// queues).
    pub reply_to_prefixes: Vec<String>,
    pub max_priority: u8,
    /// The type of r2f's durable queues: `classic`, or `quorum` (replicated; the broker
    /// enforces `delivery_limit`, priorities fold into its two levels, dead-lettering is
    /// at-least-once). An existing queue keeps its type: see the migration in the README.
    #[serde(default)]
    pub queue_type: QueueType,
    /// Quorum queues: deliveries of one message after which the broker dead-letters it (a
    /// backstop under the worker's own count of `worker.max_attempts`).
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// The reconnect backoff resets only after a connection has stayed up this long.
    pub stable_connection_secs: u64,
    /// Bound on a broker publish confirm; past it the connection is treated as broken.
    pub confirm_timeout_secs: u64,
}

impl AmqpSettings {
    /// Settings with the given broker objects and the default tuning.
    /// The jobs exchange is `<jobs>.route` and the inbox `<jobs>.inbox`.
    pub fn named(url: &str, jobs: &str, dead: &str, retry: &str, events: &str) -> Self {
        Self {
            url: url.into(),
            url_file: String::new(),
            jobs_exchange: format!("{jobs}.route"),
            jobs_queue: jobs.into(),
            inbox_queue: format!("{jobs}.inbox"),
            default_model: String::new(),
            dead_letter_queue: dead.into(),
            retry_queue: retry.into(),
            events_exchange: events.into(),
            webhooks_queue: format!("{jobs}.webhooks"),
            control_exchange: format!("{jobs}.control"),
            control_queue: format!("{jobs}.control"),
            reply_to_prefixes: vec![
                "amq.rabbitmq.reply-to".into(),
                "amq.gen-".into(),
                "r2f.reply.".into(),
            ],
            max_priority: 10,
            queue_type: QueueType::Classic,
            delivery_limit: default_delivery_limit(),
            reconnect_min_ms: 500,
            reconnect_max_ms: 30000,
            stable_connection_secs: 60,
            confirm_timeout_secs: 30,
        }
    }
}

fn default_delivery_limit() -> u32 {
    10
}

crate::named_enum! {
    /// The type of r2f's durable queues.
    #[derive(Default)]
    pub enum QueueType("queue type") {
        /// Single-node queues (RabbitMQ 4 no longer mirrors them).
        #[default]
        Classic = "classic",
        /// Raft-replicated queues: survive the loss of a minority of broker nodes.
        Quorum = "quorum",
    }
}

impl AmqpSettings {
    /// The queue that holds `model`'s jobs.
    pub fn queue_of(&self, model: &str) -> String {
        self.jobs_queue.replace("{model}", model)
    }

    /// The prefix of `model`'s retry queues (`<prefix>.<level>`).
    pub fn retry_queue_of(&self, model: &str) -> String {
        self.retry_queue.replace("{model}", model)
    }

    /// Whether every model has a queue of its own (`jobs_queue` names `{model}`); otherwise the
    /// one queue serves `worker.model` only.
    pub fn queue_per_model(&self) -> bool {
        self.jobs_queue.contains("{model}")
    }
}

impl std::fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("url", &redact_url(&self.url))
            .field("jobs_exchange", &self.jobs_exchange)
            .field("jobs_queue", &self.jobs_queue)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Deserialize)]
pub struct RedisSettings {
    pub url: String,
    /// A file holding the URL (a mounted secret); when set it replaces `url`.
    #[serde(default)]
    pub url_file: String,
    pub key_prefix: String,
    pub plan_ttl_secs: u64,
    /// Job status records live this long after their last transition.
    pub status_ttl_secs: u64,
    pub lock_ttl_secs: u64,
    pub timeout_ms: u64,
    /// Redis down for the job lock: a transient failure (true), or run the job unlocked,
    /// counted and logged, relying on idempotent outputs (false).
    pub require_lock: bool,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct S3Settings {
    pub endpoint: String,
    pub region: String,
    pub force_path_style: bool,
    pub request_checksums: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StorageSettings {
    pub backend: StorageBackend,
    pub local_dir: String,
    pub bucket: String,
    pub prefix: String,
    /// Bound of one storage call attempt (S3: per attempt; the whole call gets three times it).
    pub timeout_secs: u64,
    /// How long the worker keeps retrying the upload of generated images in-process, with
    /// backoff, before giving the job back.
    pub retry_budget_secs: u64,
    /// Result events carry a presigned GET URL per image, valid this long (S3 only; 0: none).
    pub presign_ttl_secs: u64,
    pub s3: S3Settings,
}

crate::named_enum! {
    /// Where images and result files go.
    pub enum StorageBackend("storage backend") {
        /// A folder (`storage.local_dir`).
        Local = "local",
        /// An S3 bucket (`storage.bucket`, `[storage.s3]`).
        S3 = "s3",
    }
}

crate::named_enum! {
    /// The LLM server's dialect: `openai` (GPT-4o, vLLM, Ollama's OpenAI API) or `llama`.
    pub enum LlmBackend("llm backend") {
        Openai = "openai",
        Llama = "llama",
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct LlmSettings {
    pub enabled: bool,
    pub base_url: String,
    pub model: String,
    pub backend: LlmBackend,
    pub api_key_env: String,
    pub api_key_file: String,
    pub timeout_secs: u64,
    pub max_attempts: u32,
    pub retry_backoff_ms: u64,
    pub max_reasks: u32,
    pub max_tokens: u32,
}

/// A secret from the file `file` (the setting `file_setting`) when one is set, else from the
/// environment variable `env` (none when `env` is empty); trimmed, and None when empty.
fn read_secret(file_setting: &str, file: &str, env: &str) -> anyhow::Result<Option<String>> {
    let value = if !file.is_empty() {
        std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("cannot read {file_setting} {file}: {e}"))?
    } else if env.is_empty() {
        return Ok(None);
    } else {
        std::env::var(env).unwrap_or_default()
    };
    Ok(Some(value.trim().to_string()).filter(|k| !k.is_empty()))
}

impl LlmSettings {
    /// The API key from the configured environment variable or file (None: no auth header,
    /// as local servers need none).
    /// A key that is configured (`api_key_env` or `api_key_file` set) but absent is an error:
    /// a server that needs no key has `api_key_env = ""`.
    pub fn api_key(&self) -> anyhow::Result<Option<String>> {
        let key = read_secret("llm.api_key_file", &self.api_key_file, &self.api_key_env)?;
        if key.is_none() && (!self.api_key_env.is_empty() || !self.api_key_file.is_empty()) {
            let from = if self.api_key_file.is_empty() {
                format!(
                    "the environment variable {} (llm.api_key_env) is unset or empty",
                    self.api_key_env
                )
            } else {
                format!("llm.api_key_file {} is empty", self.api_key_file)
            };
            anyhow::bail!(
                "no API key for the LLM at {}: {from}; set it, or set llm.api_key_env = \"\" \
                 for a server that needs no key",
                redact_url(&self.base_url)
            );
        }
        Ok(key)
    }
}

/// Webhooks (`output.webhook` of a job): see `crate::service::webhook`.
#[derive(Clone, Deserialize)]
pub struct WebhookSettings {
    /// Hosts a webhook may call: exact names, or `*.domain` for its subdomains. Empty: jobs
    /// asking for a webhook are rejected.
    pub allowed_hosts: Vec<String>,
    /// Allow `http://` URLs (tests, a receiver inside the cluster).
    pub allow_http: bool,
    /// The signing secret comes from this environment variable, or from `secret_file`.
    pub secret_env: String,
    pub secret_file: String,
    /// Bound of one POST.
    pub timeout_secs: u64,
    /// How long a delivery is retried (network errors, 429, 5xx).
    pub retry_budget_secs: u64,
    /// The first retry delay; it doubles, with jitter, up to a minute.
    pub retry_min_ms: u64,
    /// Deliveries in flight at once per worker.
    pub max_in_flight: usize,
    /// Deliveries in flight at once to one receiver host (per worker): a receiver that is slow
    /// or never answers holds no more than this, and its other deliveries wait in the outbox.
    pub max_per_host: usize,
    /// Ports a webhook URL may name besides 443 (and 80 with `allow_http`); single-tenant
    /// fleets (a tenant's own list otherwise).
    pub allowed_ports: Vec<u16>,
    /// Private networks (CIDR) webhooks may reach; single-tenant fleets.
    pub allowed_networks: Vec<String>,
}

impl WebhookSettings {
    /// The signing secret: the file when set, else the environment variable.
    pub fn secret(&self) -> anyhow::Result<Option<String>> {
        read_secret("webhook.secret_file", &self.secret_file, &self.secret_env)
    }
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("allowed_hosts", &self.allowed_hosts)
            .field("allow_http", &self.allow_http)
            .finish_non_exhaustive()
    }
}

/// C2PA signing (`[c2pa]`): the key and certificate chain, and whether images are signed when
/// their job does not say.
#[derive(Debug, Clone, Deserialize)]
pub struct C2paSettings {
    /// The PEM (PKCS#8) private key that signs manifests; with `cert_file`, or neither.
    pub key_file: String,
    /// The PEM certificate chain of `key_file`, leaf first.
    pub cert_file: String,
    /// Sign every image whose job does not set `output.c2pa`.
    pub sign_by_default: bool,
}

impl C2paSettings {
    /// The signer the settings describe (None when no key is configured); the error names the
    /// setting, the file and what is wrong.
    pub fn signer(&self) -> Result<Option<crate::c2pa_sign::C2paSigner>, String> {
        self.check_pairing()?;
        if self.key_file.is_empty() {
            return Ok(None);
        }
        crate::c2pa_sign::C2paSigner::from_pem_files(
            std::path::Path::new(&self.key_file),
            std::path::Path::new(&self.cert_file),
        )
        .map(Some)
        .map_err(|e| format!("c2pa.key_file / c2pa.cert_file cannot sign: {e:#}"))
    }

    /// The settings' shape, without reading the files (checked by every command: a gateway
    /// that shares the workers' configuration but not their key still starts).
    pub fn check_pairing(&self) -> Result<(), String> {
        match (self.key_file.is_empty(), self.cert_file.is_empty()) {
            (true, true) if self.sign_by_default => {
                Err("c2pa.sign_by_default needs c2pa.key_file and c2pa.cert_file".into())
            }
            (false, true) => {
                Err("c2pa.key_file is set without c2pa.cert_file (set both or neither)".into())
            }
            (true, false) => {
                Err("c2pa.cert_file is set without c2pa.key_file (set both or neither)".into())
            }
            _ => Ok(()),
        }
    }
}

/// What every TLS client trusts and presents (`service::tls` builds the clients' configuration).
#[derive(Debug, Clone, Deserialize)]
pub struct TlsSettings {
    /// A PEM bundle of CA certificates trusted on top of the system roots (never instead).
    pub ca_file: String,
    /// A PEM client certificate (chain) for mutual TLS with the broker, Redis, S3 and the LLM;
    /// with `key_file`, or neither.
    #[serde(default)]
    pub cert_file: String,
    /// The PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: String,
}

/// The contents of the `[tls]` files, parsed.
#[derive(Debug)]
pub struct TlsFiles {
    /// The certificates of `tls.ca_file` (none when unset).
    pub ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The client certificate and key, when set.
    pub client: Option<ClientIdentity>,
}

/// A client certificate chain and its private key, parsed and as the PEM they were read from.
#[derive(Debug)]
pub struct ClientIdentity {
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl TlsSettings {
    /// Reads and parses the files named: `ca_file` and `cert_file` must hold at least one PEM
    /// certificate, `key_file` a PEM private key, and the certificate and the key come together.
    pub fn read(&self) -> Result<TlsFiles, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        fn read(setting: &str, path: &str) -> Result<Vec<u8>, String> {
            std::fs::read(path).map_err(|e| format!("{setting} {path} cannot be read: {e}"))
        }
        fn certs(
            setting: &str,
            path: &str,
            pem: &[u8],
        ) -> Result<Vec<CertificateDer<'static>>, String> {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{setting} {path} is not a PEM certificate file: {e}"))?;
            if certs.is_empty() {
                return Err(format!("{setting} {path} holds no PEM certificate"));
            }
            Ok(certs)
        }
        let ca = if self.ca_file.is_empty() {
            Vec::new()
        } else {
            certs(
                "tls.ca_file",
                &self.ca_file,
                &read("tls.ca_file", &self.ca_file)?,
            )?
        };
        let client = match (self.cert_file.is_empty(), self.key_file.is_empty()) {
            (true, true) => None,
            (false, true) => {
                return Err(
                    "tls.cert_file is set without tls.key_file (set both or neither)".into(),
                )
            }
            (true, false) => {
                return Err(
                    "tls.key_file is set without tls.cert_file (set both or neither)".into(),
                )
            }
            (false, false) => {
                let cert_pem = read("tls.cert_file", &self.cert_file)?;
                let chain = certs("tls.cert_file", &self.cert_file, &cert_pem)?;
                let key_pem = read("tls.key_file", &self.key_file)?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                    format!(
                        "tls.key_file {} holds no PEM private key: {e}",
                        self.key_file
                    )
                })?;
                Some(ClientIdentity {
                    chain,
                    key,
                    cert_pem,
                    key_pem,
                })
            }
        };
        Ok(TlsFiles { ca, client })
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct MetricsSettings {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
}

crate::named_enum! {
    /// How log lines are written (standard error).
    pub enum LogFormat("log format") {
        Text = "text",
        Json = "json",
    }
}

crate::named_enum! {
    /// Who a fleet's clients are.
    pub enum TenancyMode("tenancy mode") {
        /// One team: every client acts as the operator; ids, status records and storage paths
        /// are shared by all clients (the layout of earlier releases).
        Single = "single",
        /// Tenants: a job belongs to the tenant of its broker user (the `user_id` property,
        /// which RabbitMQ checks against the connection's user), and its status record, cancel
        /// requests, lock, id claim and storage keys are scoped by (tenant, id).
        Multi = "multi",
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct TenancySettings {
    pub mode: TenancyMode,
}

/// One tenant (`[tenants.<name>]`): who publishes as it, where its webhooks may go and how they
/// are signed, what it may ask for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TenantSettings {
    /// The broker users that publish as this tenant (their `user_id`); empty: the user named
    /// like the tenant.
    pub users: Vec<String>,
    /// Files each holding one webhook signing secret (`whsec_<base64>`, Standard Webhooks);
    /// every one signs each delivery, so that a secret can be rotated without a gap.
    pub webhook_secret_files: Vec<String>,
    /// Hosts its webhooks may call: exact names, or `*.example.com` for the subdomains.
    pub webhook_allowed_hosts: Vec<String>,
    /// Ports its webhook URLs may name besides 443 (and 80 where `webhook.allow_http`).
    pub webhook_allowed_ports: Vec<u16>,
    /// Private networks (CIDR) its webhooks may reach; loopback, private, link-local, CGNAT,
    /// multicast and cloud-metadata addresses outside them are refused.
    pub webhook_allowed_networks: Vec<String>,
    /// The models it may run; empty: every model of the fleet.
    pub models: Vec<String>,
    /// Its own bounds, within the fleet's `[limits]`.
    pub max_steps: Option<usize>,
    pub max_pixels: Option<i64>,
    /// Its jobs running at once across the fleet; more wait in their queue.
    pub max_jobs_in_flight: Option<usize>,
    /// Gateway: files of the SHA-256 digests (hex) of its API keys, one per line.
    pub api_key_files: Vec<String>,
    /// Gateway: its requests per second and burst (all replicas together); none: the
    /// gateway's.
    pub rate_per_sec: Option<f64>,
    pub burst: Option<u32>,
    /// Gateway: its jobs accepted and not finished at once; none: the gateway's.
    pub max_jobs_open: Option<usize>,
}

/// The HTTP door (`r2f gateway`).
#[derive(Debug, Clone, Deserialize)]
pub struct GatewaySettings {
    pub listen: String,
    /// A single-tenant fleet's API keys: files of SHA-256 digests (hex), one per line.
    pub api_key_files: Vec<String>,
    /// Requests per second and burst per tenant (all gateway replicas together).
    pub rate_per_sec: f64,
    pub burst: u32,
    /// A tenant's jobs accepted and not finished at once (across the gateways).
    pub max_jobs_open: usize,
    /// How long an accepted job counts as open at most (a job whose end was never recorded
    /// stops counting then).
    pub open_lapse_secs: u64,
    /// Origins allowed by CORS (`*` for any); empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// On SIGTERM: stop accepting, finish requests and close event streams within this.
    pub drain_secs: u64,
    /// How long an `Idempotency-Key` keeps naming its job.
    pub idempotency_ttl_secs: u64,
}

/// Traces (OpenTelemetry).
#[derive(Debug, Clone, Deserialize)]
pub struct TelemetrySettings {
    /// The OTLP/HTTP endpoint (`http://collector:4318`); empty: no export (spans cost nothing).
    pub otlp_endpoint: String,
    /// `http/protobuf` or `http/json`.
    pub otlp_protocol: OtlpProtocol,
    /// The share of traces started here that are kept (a `traceparent` that says sampled is
    /// always kept).
    pub sample_ratio: f64,
}

crate::named_enum! {
    /// How spans are sent to the OTLP endpoint.
    pub enum OtlpProtocol("otlp protocol") {
        Protobuf = "http/protobuf",
        Json = "http/json",
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    #[serde(default)]
    pub models: BTreeMap<String, ModelSettings>,
    pub tenancy: TenancySettings,
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantSettings>,
    pub worker: WorkerSettings,
    pub amqp: AmqpSettings,
    pub redis: RedisSettings,
    pub storage: StorageSettings,
    pub llm: LlmSettings,
    pub webhook: WebhookSettings,
    pub tls: TlsSettings,
    pub c2pa: C2paSettings,
    pub metrics: MetricsSettings,
    pub log: LogSettings,
    pub limits: Limits,
    pub gateway: GatewaySettings,
    pub telemetry: TelemetrySettings,
}

impl Settings {
    /// The defaults, then `file`, then the `R2F__SECTION__KEY` environment variables. A key
    /// that no setting reads stops the load, named with its source.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::load_from(file, std::env::vars())
    }

    /// [`Settings::load`] with the environment given.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let layers = Layers::read(file, env)?;
        let mut unknown = Vec::new();
        let settings: Settings =
            serde_ignored::deserialize(layers.merged()?, |path| unknown.push(path.to_string()))
                .map_err(|e| invalid(&e.to_string()))?;
        if let Some(path) = unknown.first() {
            let more = match unknown.len() {
                1 => String::new(),
                n => format!(" (and {} more: {})", n - 1, unknown[1..].join(", ")),
            };
            anyhow::bail!(
                "invalid configuration: unknown key `{path}` in {}{more}",
                layers.source_of(path)
            );
        }
        let mut settings = settings;
        settings.read_url_files()?;
        settings.validate()?;
        Ok(settings)
    }

    /// The effective configuration as TOML, secrets redacted (`r2f config check`).
    pub fn effective_toml(file: Option<&Path>) -> anyhow::Result<String> {
        let layers = Layers::read(file, std::env::vars())?;
        let mut table: toml::Table = layers
            .merged()?
            .try_deserialize()
            .map_err(|e| invalid(&e.to_string()))?;
        redact_table(&mut table);
        Ok(toml::to_string(&table)?)
    }

    /// `amqp.url_file`, `redis.url_file`: the URL from a file (a mounted secret).
    fn read_url_files(&mut self) -> anyhow::Result<()> {
        for (name, file, url) in [
            ("amqp.url_file", &self.amqp.url_file, &mut self.amqp.url),
            ("redis.url_file", &self.redis.url_file, &mut self.redis.url),
        ] {
            if file.is_empty() {
                continue;
            }
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("invalid configuration: {name} `{file}`: {e}"))?;
            let text = text.trim();
            if text.is_empty() {
                anyhow::bail!("invalid configuration: {name} `{file}` is empty");
            }
            *url = text.to_string();
        }
        Ok(())
    }

    /// The models that have a queue (every model of [models] when each has its own queue,
    /// `worker.model` otherwise): jobs naming any other model are rejected.
    pub fn routed_models(&self) -> Vec<String> {
        if self.amqp.queue_per_model() {
            self.models.keys().cloned().collect()
        } else {
            vec![self.worker.model.clone()]
        }
    }

    /// The model of an inbox job that names none.
    pub fn default_model(&self) -> &str {
        if self.amqp.default_model.is_empty() {
            &self.worker.model
        } else {
            &self.amqp.default_model
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        let bad = |m: String| Err(anyhow::anyhow!("invalid configuration: {m}"));
        let l = &self.limits;
        if l.max_steps == 0
            || l.max_pixels < 256
            || l.max_images_per_job == 0
            || l.max_prompt_chars == 0
            || l.max_message_bytes < 64
            || l.max_plan_prompts == 0
            || l.max_plan_prompt_chars == 0
            || l.max_plan_objects == 0
        {
            return bad(format!("limits must be positive ({l:?})"));
        }
        let w = &self.worker;
        if w.prefetch == 0 {
            return bad("worker.prefetch must be at least 1".into());
        }
        if !(1..=10).contains(&w.max_attempts) {
            return bad("worker.max_attempts must be between 1 and 10".into());
        }
        if w.job_timeout_secs == 0 || w.pause_after_failures == 0 || w.pause_min_secs == 0 {
            return bad(
                "worker.job_timeout_secs, pause_after_failures and pause_min_secs must be positive"
                    .into(),
            );
        }
        if self.storage.presign_ttl_secs > 604_800 {
            return bad(format!(
                "storage.presign_ttl_secs {} is over S3's limit of 604800 (7 days)",
                self.storage.presign_ttl_secs
            ));
        }
        let a = &self.amqp;
        if !a.default_model.is_empty() && !self.models.contains_key(&a.default_model) {
            return bad(format!(
                "amqp.default_model `{}` is not one of [models]",
                a.default_model
            ));
        }
        if a.queue_per_model() != a.retry_queue.contains("{model}") {
            return bad(
                "amqp.jobs_queue and amqp.retry_queue must both name {model}, or neither".into(),
            );
        }
        for m in self.models.keys() {
            if m.is_empty()
                || !m
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return bad(format!(
                    "model name `{m}`: letters, digits, '-', '_' and '.' only (it names a queue)"
                ));
            }
            let q = a.queue_of(m);
            if [&a.inbox_queue, &a.dead_letter_queue].contains(&&q) {
                return bad(format!(
                    "the queue of model `{m}` ({q}) is also amqp.inbox_queue or amqp.dead_letter_queue"
                ));
            }
        }
        if !self.models.contains_key(&w.model) {
            return bad(format!(
                "worker.model `{}` is not one of [models] ({})",
                w.model,
                self.models.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        for (name, url, schemes) in [
            ("amqp.url", &self.amqp.url, &["amqp", "amqps"][..]),
            ("redis.url", &self.redis.url, &["redis", "rediss"][..]),
        ] {
            let scheme = url.split("://").next().unwrap_or("");
            if !url.contains("://") || !schemes.contains(&scheme) {
                return bad(format!(
                    "{name} `{}` must start with {}",
                    redact_url(url),
                    schemes
                        .iter()
                        .map(|s| format!("{s}://"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ));
            }
        }
        match self.storage.backend {
            StorageBackend::Local if self.storage.local_dir.is_empty() => {
                return bad("storage.local_dir is empty".into())
            }
            StorageBackend::S3 if self.storage.bucket.is_empty() => {
                return bad("storage.bucket is empty".into())
            }
            StorageBackend::Local | StorageBackend::S3 => {}
        }
        if self.llm.enabled && !self.llm.base_url.starts_with("http") {
            return bad(format!(
                "llm.base_url `{}` is not an http(s) URL",
                self.llm.base_url
            ));
        }
        if self.llm.max_attempts == 0 {
            return bad("llm.max_attempts must be at least 1".into());
        }
        if self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(format!(
                "metrics.listen `{}` is not host:port",
                self.metrics.listen
            ));
        }
        if let Err(m) = self.tls.read() {
            return bad(m);
        }
        if let Err(m) = self.c2pa.check_pairing() {
            return bad(m);
        }
        self.validate_tenants()
    }

    fn validate_tenants(&self) -> anyhow::Result<()> {
        let bad = |m: String| Err(anyhow::anyhow!("invalid configuration: {m}"));
        if self.tenancy.mode == TenancyMode::Multi && self.tenants.is_empty() {
            return bad("tenancy.mode is multi but no [tenants.<name>] is configured".into());
        }
        let mut users = std::collections::BTreeSet::new();
        for (name, t) in &self.tenants {
            // A tenant's name is a Redis key part, a storage key segment and an AMQP routing key
            // word.
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
            {
                return bad(format!(
                    "tenant name `{name}`: 1 to 64 letters, digits, '-' or '_'"
                ));
            }
            let names = if t.users.is_empty() {
                vec![name.clone()]
            } else {
                t.users.clone()
            };
            for u in names {
                if !users.insert(u.clone()) {
                    return bad(format!("broker user `{u}` belongs to two tenants"));
                }
            }
            if let Some(m) = t.models.iter().find(|m| !self.models.contains_key(*m)) {
                return bad(format!(
                    "tenants.{name}.models: `{m}` is not one of [models]"
                ));
            }
            for n in &t.webhook_allowed_networks {
                if n.parse::<ipnet::IpNet>().is_err() {
                    return bad(format!(
                        "tenants.{name}.webhook_allowed_networks: `{n}` is not a CIDR network"
                    ));
                }
            }
            if t.max_jobs_in_flight == Some(0) {
                return bad(format!(
                    "tenants.{name}.max_jobs_in_flight must be at least 1"
                ));
            }
        }
        for n in &self.webhook.allowed_networks {
            if n.parse::<ipnet::IpNet>().is_err() {
                return bad(format!(
                    "webhook.allowed_networks: `{n}` is not a CIDR network"
                ));
            }
        }
        Ok(())
    }

    /// A model argument: a logical name from `[models]`, else taken as a folder or Hub id.
    pub fn model_source(&self, name: &str) -> String {
        self.models
            .get(name)
            .map(|m| m.source.clone())
            .unwrap_or_else(|| name.to_string())
    }
}

fn invalid(e: &str) -> anyhow::Error {
    anyhow::anyhow!("invalid configuration: {}", redact_text(e))
}

/// The environment variables of the configuration start with this (`R2F__WORKER__PREFETCH`).
const ENV_PREFIX: &str = "R2F__";

/// Settings that hold a list in every tenant's section (a comma-separated list in the
/// environment, as every list of the defaults).
const TENANT_LISTS: &[&str] = &[
    "users",
    "webhook_secret_files",
    "webhook_allowed_hosts",
    "webhook_allowed_ports",
    "webhook_allowed_networks",
    "models",
    "api_key_files",
];

/// The layers of the configuration: the defaults, the file, the environment.
struct Layers {
    file: Option<(std::path::PathBuf, toml::Table)>,
    /// Key path (`worker.prefetch`) → (variable name, value) of each `R2F__` variable.
    env: BTreeMap<String, (String, config::Value)>,
}

impl Layers {
    fn read(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let file = match file {
            None => None,
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| anyhow::anyhow!("config file {}: {e}", file.display()))?;
                let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
                    anyhow::anyhow!(
                        "invalid configuration: {} is not valid TOML: {}",
                        file.display(),
                        redact_text(&e.to_string())
                    )
                })?;
                Some((file.to_path_buf(), table))
            }
        };
        let defaults: toml::Table = DEFAULT_TOML.parse()?;
        let mut lists = std::collections::BTreeSet::new();
        array_paths(&defaults, "", &mut lists);
        let mut vars = BTreeMap::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path = rest.to_lowercase().replace("__", ".");
            if path.is_empty() || path.split('.').any(str::is_empty) {
                anyhow::bail!("invalid configuration: environment variable {name} names no key");
            }
            let is_list = lists.contains(&path)
                || (path.starts_with("tenants.")
                    && path.split('.').count() == 3
                    && TENANT_LISTS.contains(&path.rsplit('.').next().unwrap_or("")));
            let value = if is_list {
                let items: Vec<config::Value> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| config::Value::from(s.to_string()))
                    .collect();
                config::Value::from(items)
            } else {
                config::Value::from(value)
            };
            vars.insert(path, (name, value));
        }
        Ok(Self { file, env: vars })
    }

    fn merged(&self) -> anyhow::Result<config::Config> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some((path, _)) = &self.file {
            builder = builder
                .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml));
        }
        for (path, (_, value)) in &self.env {
            builder = builder
                .set_override(path.as_str(), value.clone())
                .map_err(|e| invalid(&e.to_string()))?;
        }
        builder.build().map_err(|e| invalid(&e.to_string()))
    }

    /// Where key `path` (as serde_ignored names it: `worker.prefech`) was set.
    fn source_of(&self, path: &str) -> String {
        if let Some((name, _)) = self.env.get(path) {
            return format!("the environment ({name})");
        }
        if let Some((file, table)) = &self.file {
            let mut node = Some(table);
            let parts: Vec<&str> = path.split('.').collect();
            for (i, part) in parts.iter().enumerate() {
                let Some(t) = node else { break };
                match t.get(*part) {
                    Some(v) if i + 1 == parts.len() => {
                        let _ = v;
                        return format!("{}", file.display());
                    }
                    Some(toml::Value::Table(inner)) => node = Some(inner),
                    _ => node = None,
                }
            }
            return format!("{}", file.display());
        }
        "the configuration".to_string()
    }
}

/// The paths of the arrays in `table` (`webhook.allowed_hosts`).
fn array_paths(table: &toml::Table, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
    for (k, v) in table {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Array(_) => {
                out.insert(path);
            }
            toml::Value::Table(t) => array_paths(t, &path, out),
            _ => {}
        }
    }
}

/// Whether a setting named `key` holds a secret: its value is printed as `***`.
fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    let names_file = k.ends_with("_file") || k.ends_with("_files") || k.ends_with("_env");
    !names_file
        && ["secret", "password", "token", "api_key", "key_pem"]
            .iter()
            .any(|s| k.contains(s))
}

/// Redacts URLs with credentials and secret values in an effective configuration.
fn redact_table(table: &mut toml::Table) {
    for (k, v) in table.iter_mut() {
        match v {
            toml::Value::Table(t) => redact_table(t),
            toml::Value::String(s) if is_secret_key(k) && !s.is_empty() => *s = "***".into(),
            toml::Value::String(s) => *s = redact_text(s),
            toml::Value::Array(items) => {
                for item in items {
                    if let toml::Value::String(s) = item {
                        *s = redact_text(s);
                    }
                }
            }
            _ => {}
        }
    }
}

/// `scheme://user:password@host/...` -> `scheme://user:***@host/...`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_string(),
    }
}

/// Redacts every URL with credentials inside a free text (error messages).
pub fn redact_text(text: &str) -> String {
    text.split_inclusive(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '`')
        .map(|tok| {
            if tok.contains("://") && tok.contains('@') {
                let trimmed = tok.trim_end_matches(|c: char| {
                    c.is_whitespace() || c == '"' || c == '\'' || c == '`'
                });
                let tail = &tok[trimmed.len()..];
                let start = trimmed.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(0);
                format!(
                    "{}{}{}",
                    &trimmed[..start],
                    redact_url(&trimmed[start..]),
                    tail
                )
            } else {
                tok.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
