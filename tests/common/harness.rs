#![allow(dead_code)]
//! Real services for the worker tests: an in-process S3 server (s3s-fs, signatures and
//! checksums checked), a TCP proxy that can refuse or cut connections, the machine's RabbitMQ
//! and Redis, and the `r2f worker` binary as a child process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::net::{TcpListener, TcpStream};

pub const AMQP_ADDR: &str = "127.0.0.1:5672";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const S3_KEY: &str = "r2ftestkey";
pub const S3_SECRET: &str = "r2ftestsecret-0123456789";

/// A unique name prefix per test (queues, exchange, bucket, Redis keys).
pub fn unique(name: &str) -> String {
    format!(
        "t{}-{}-{}",
        std::process::id(),
        name,
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..6)
            .unwrap_or("x")
    )
}

pub struct S3Server {
    pub addr: SocketAddr,
    pub root: tempfile::TempDir,
    pub bucket: String,
    task: tokio::task::JoinHandle<()>,
}

impl S3Server {
    pub async fn start(bucket: &str) -> Self {
        Self::start_on("127.0.0.1:0", bucket).await
    }

    pub async fn start_on(addr: &str, bucket: &str) -> Self {
        let root = tempfile::tempdir().unwrap();
        Self::start_with_root(addr, bucket, root).await
    }

    pub async fn start_with_root(addr: &str, bucket: &str, root: tempfile::TempDir) -> Self {
        std::fs::create_dir_all(root.path().join(bucket)).unwrap();
        let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(S3_KEY, S3_SECRET));
        let service = b.build();
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let http =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let conn = http
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Self {
            addr,
            root,
            bucket: bucket.to_string(),
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Objects stored under the bucket, as keys.
    pub fn keys(&self) -> Vec<String> {
        let base = self.root.path().join(&self.bucket);
        let mut out = Vec::new();
        fn walk(dir: &std::path::Path, base: &std::path::Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else {
                    let k = p.strip_prefix(base).unwrap().to_string_lossy().to_string();
                    // s3s-fs keeps internal metadata files next to objects.
                    if !k.contains(".s3s") && !k.starts_with('.') && !k.contains("/.") {
                        out.push(k);
                    }
                }
            }
        }
        walk(&base, &base, &mut out);
        out.sort();
        out
    }

    pub fn read(&self, key: &str) -> Vec<u8> {
        std::fs::read(self.root.path().join(&self.bucket).join(key)).unwrap()
    }

    /// Stops serving (the port closes) and hands back the data folder.
    pub fn stop(self) -> tempfile::TempDir {
        self.task.abort();
        self.root
    }
}

/// A TCP proxy in front of a service: forwards, refuses new connections, or cuts open ones.
pub struct Proxy {
    pub addr: SocketAddr,
    refuse: Arc<AtomicBool>,
    /// Milliseconds after which each new connection is cut (0: never).
    cut_after_ms: Arc<std::sync::atomic::AtomicU64>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refuse = Arc::new(AtomicBool::new(false));
        let cut_after_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (r, c, target) = (refuse.clone(), conns.clone(), target.to_string());
        let cut = cut_after_ms.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if r.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let cut_ms = cut.load(Ordering::SeqCst);
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                        if cut_ms == 0 {
                            let _ = copy.await;
                        } else {
                            let _ = tokio::time::timeout(Duration::from_millis(cut_ms), copy).await;
                        }
                    }
                });
                c.lock().unwrap().push(h);
            }
        });
        Self {
            addr,
            refuse,
            cut_after_ms,
            conns,
            accept,
        }
    }

    /// Each connection opened from now on is cut after `after` (None: kept).
    pub fn set_cut_after(&self, after: Option<Duration>) {
        let ms = after.map(|d| d.as_millis().max(1) as u64).unwrap_or(0);
        self.cut_after_ms.store(ms, Ordering::SeqCst);
    }

    /// New connections are closed at once while set.
    pub fn set_refuse(&self, refuse: bool) {
        self.refuse.store(refuse, Ordering::SeqCst);
    }

    /// Cuts every open connection.
    pub fn cut_all(&self) {
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

/// Names of one test's broker objects.
#[derive(Clone)]
pub struct Names {
    pub prefix: String,
    /// The jobs queue of a single-queue worker (model `tiny`).
    pub jobs: String,
    pub dead: String,
    pub retry: String,
    pub events: String,
    /// The jobs exchange (routing key: the model).
    pub route: String,
    /// The inbox queue (jobs published to it directly, and the unroutable ones).
    pub inbox: String,
    /// The webhook outbox (retries in `<webhooks>.retry`, given up in `<webhooks>.dead`).
    pub webhooks: String,
    /// The control exchange and queue (cancel requests).
    pub control: String,
}

/// The models of a fleet test: (name, fixture folder).
pub const FLEET: [(&str, &str); 2] = [("sd3", "sd3-tiny-a"), ("sdxl", "sdxl-tiny-a")];

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.into(),
            jobs: format!("{prefix}.jobs"),
            dead: format!("{prefix}.dead"),
            retry: format!("{prefix}.retry"),
            events: format!("{prefix}.events"),
            route: format!("{prefix}.jobs.route"),
            inbox: format!("{prefix}.jobs.inbox"),
            webhooks: format!("{prefix}.jobs.webhooks"),
            control: format!("{prefix}.jobs.control"),
        }
    }

    /// The queue of `model` in a fleet (a queue per model).
    pub fn queue_of(&self, model: &str) -> String {
        format!("{}.{model}", self.jobs)
    }

    /// The broker settings the worker gets (a fleet: a queue per model).
    pub fn settings(&self, fleet: bool) -> r2f::config::AmqpSettings {
        let mut s = r2f::config::AmqpSettings::named(
            AMQP_URL,
            &self.jobs,
            &self.dead,
            &self.retry,
            &self.events,
        );
        if fleet {
            s.jobs_queue = format!("{}.{{model}}", self.jobs);
            s.retry_queue = format!("{}.{{model}}", self.retry);
        }
        s.queue_type = queue_type();
        s
    }
}

/// A server-named, exclusive, auto-deleted queue (a client's own queue for events or replies).
pub async fn private_queue(ch: &Channel) -> lapin::Queue {
    r2f::service::amqp::declare_private_queue(ch).await.unwrap()
}

/// The test's own broker client: publishes jobs, listens to events, reads dead letters.
pub struct Broker {
    pub conn: Connection,
    pub ch: Channel,
    pub names: Names,
    events: lapin::Consumer,
    pub events_seen: Vec<serde_json::Value>,
}

impl Broker {
    pub async fn connect(names: &Names) -> Self {
        Self::connect_with(names, false).await
    }

    /// A broker client for a fleet: a queue per model of [`FLEET`].
    pub async fn connect_fleet(names: &Names) -> Self {
        Self::connect_with(names, true).await
    }

    async fn connect_with(names: &Names, fleet: bool) -> Self {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 (scripts/services.sh starts it)");
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        // Declare like the worker does, so either may come first.
        let models: Vec<String> = if fleet {
            FLEET.iter().map(|(m, _)| m.to_string()).collect()
        } else {
            vec!["tiny".into()]
        };
        r2f::service::amqp::declare_topology(&ch, &names.settings(fleet), &models)
            .await
            .unwrap();
        let q = private_queue(&ch).await;
        ch.queue_bind(
            q.name().as_str().into(),
            names.events.as_str().into(),
            "job.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let events = ch
            .basic_consume(
                q.name().as_str().into(),
                "test-events".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            conn,
            ch,
            names: names.clone(),
            events,
            events_seen: Vec::new(),
        }
    }

    pub async fn publish_raw(&self, body: &[u8]) {
        self.publish_at("", &self.names.jobs.clone(), body).await;
    }

    /// Publishes (confirmed) to `exchange` with `key`, as a client would.
    pub async fn publish_at(&self, exchange: &str, key: &str, body: &[u8]) {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_timestamp(r2f::service::amqp::now_unix());
        let c = self
            .ch
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(c.is_ack());
    }

    pub async fn publish(&self, job: &serde_json::Value) {
        self.publish_raw(job.to_string().as_bytes()).await;
    }

    /// Waits for an event matching `pred` (progress events included), up to `timeout`.
    pub async fn wait_event(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value, &str) -> bool,
    ) -> Option<(serde_json::Value, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let next = tokio::time::timeout(left, self.events.next())
                .await
                .ok()??;
            let d = next.ok()?;
            let v: serde_json::Value = serde_json::from_slice(&d.data).ok()?;
            let rk = d.routing_key.as_str().to_string();
            self.events_seen.push(v.clone());
            if pred(&v, &rk) {
                return Some((v, rk));
            }
        }
    }

    /// Waits for `n` final events (not progress, not started); returns them.
    pub async fn wait_results(&mut self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.wait_event(left, |_, rk| is_final(rk)).await {
                Some((v, _)) => out.push(v),
                None => break,
            }
        }
        out
    }

    pub async fn queue_len(&self, queue: &str) -> u32 {
        passive_len(&self.ch, queue).await.unwrap()
    }

    /// Takes every message of the dead-letter queue: (body, reason header).
    pub async fn take_dead_letters(&self) -> Vec<(serde_json::Value, String, String)> {
        let mut out = Vec::new();
        while let Some(m) = self
            .ch
            .basic_get(
                self.names.dead.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            let headers = m.properties.headers().clone().unwrap_or_default();
            let get = |k: &str| -> String {
                match headers.inner().get(k) {
                    Some(lapin::types::AMQPValue::LongString(s)) => s.to_string(),
                    _ => String::new(),
                }
            };
            let body = serde_json::from_slice(&m.data).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&m.data).into())
            });
            out.push((body, get("x-r2f-reason"), get("x-r2f-error-kind")));
        }
        out
    }

    /// Messages waiting in the jobs queue and in every retry level (give-backs included).
    pub async fn queued_anywhere(&self) -> u32 {
        let mut n = self.queue_len(&self.names.jobs).await;
        for level in 0..=10 {
            n += self
                .queue_len_or_zero(&format!("{}.{level}", self.names.retry))
                .await;
        }
        n
    }

    /// The queue's length, 0 when it does not exist (on a channel of its own: a passive
    /// declare of a missing queue closes the channel).
    pub async fn queue_len_or_zero(&self, queue: &str) -> u32 {
        let Ok(ch) = self.conn.create_channel().await else {
            return 0;
        };
        let n = passive_len(&ch, queue).await.unwrap_or(0);
        let _ = ch.close(200, "done".into()).await;
        n
    }

    pub async fn cleanup(&self) {
        let mut queues = vec![
            self.names.jobs.clone(),
            self.names.dead.clone(),
            self.names.retry.clone(),
            self.names.inbox.clone(),
            self.names.webhooks.clone(),
            format!("{}.retry", self.names.webhooks),
            format!("{}.dead", self.names.webhooks),
            self.names.control.clone(),
        ];
        queues.extend((0..=10).map(|l| format!("{}.{l}", self.names.retry)));
        for (m, _) in FLEET {
            queues.push(self.names.queue_of(m));
            queues.extend((0..=10).map(|l| format!("{}.{m}.{l}", self.names.retry)));
        }
        for x in [
            self.names.route.clone(),
            format!("{}.unrouted", self.names.route),
            self.names.control.clone(),
        ] {
            let _ = self
                .ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        for q in &queues {
            let _ = self
                .ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self
            .ch
            .exchange_delete(
                self.names.events.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = ExchangeKind::Topic;
    }
}

/// Whether an event's routing key is a job's final event (`job.<status>`, or
/// `job.<status>.<tenant>.<id>`), not `job.started` or `job.progress`.
pub fn is_final(routing_key: &str) -> bool {
    let kind = routing_key.split('.').nth(1).unwrap_or("");
    !matches!(kind, "progress" | "started")
}

/// A queue's message count through a passive declare.
async fn passive_len(ch: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let opts = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare(queue.into(), opts, FieldTable::default())
        .await?;
    Ok(q.message_count())
}

/// A free loopback port (bound, then released).
/// A port for a worker's metrics listener. Taken below Linux's ephemeral range (32768–60999):
/// a port the OS hands out for `:0` is free only until the next outgoing connection (to RabbitMQ,
/// Redis, S3) takes it as its local port, before the worker binds it. Never the same port twice
/// in one test process; checked free when handed out.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test processes (one per test file, run one after another) start at different places.
    let base = 20_000 + (std::process::id() % 200) * 60;
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = (base + n % 600) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The type of the queues the tests' workers and clients declare: `R2F_TEST_QUEUE_TYPE`
/// (`classic` by default; the test command runs the broker-facing tests with `quorum` too).
pub fn queue_type() -> r2f::config::QueueType {
    match std::env::var("R2F_TEST_QUEUE_TYPE").as_deref() {
        Ok("quorum") => r2f::config::QueueType::Quorum,
        Ok("classic") | Ok("") | Err(_) => r2f::config::QueueType::Classic,
        Ok(other) => panic!("R2F_TEST_QUEUE_TYPE is classic or quorum, not {other}"),
    }
}

pub struct WorkerConfig {
    pub names: Names,
    pub amqp_url: String,
    pub s3_endpoint: Option<String>,
    pub bucket: String,
    pub local_dir: Option<PathBuf>,
    pub metrics_port: u16,
    pub max_attempts: u32,
    pub retry_backoff_ms: u64,
    pub drain_timeout_secs: u64,
    /// In-process upload retries before a job is given back (short in tests).
    pub storage_retry_budget_secs: u64,
    /// The first pause of a worker whose failures are its own.
    pub pause_min_secs: u64,
    /// S3 call timeout (per attempt).
    pub storage_timeout_secs: u64,
    /// More lines for the `[worker]` section.
    pub worker_extra: String,
    /// `redis.require_lock`.
    pub redis_require_lock: bool,
    pub redis_url: String,
    pub extra: String,
    pub env: Vec<(String, String)>,
    /// Serve this model of [`FLEET`] with a queue per model, instead of `tiny` on one queue.
    pub fleet_model: Option<String>,
    /// More lines for the `[storage]` section.
    pub storage_extra: String,
}

impl WorkerConfig {
    pub fn new(names: &Names) -> Self {
        Self {
            names: names.clone(),
            amqp_url: AMQP_URL.into(),
            s3_endpoint: None,
            bucket: "unused".into(),
            local_dir: None,
            metrics_port: free_port(),
            max_attempts: 3,
            retry_backoff_ms: 200,
            drain_timeout_secs: 60,
            storage_retry_budget_secs: 2,
            pause_min_secs: 1,
            storage_timeout_secs: 5,
            worker_extra: String::new(),
            redis_require_lock: true,
            redis_url: "redis://127.0.0.1:6379".into(),
            extra: String::new(),
            env: vec![("R2F_TEST_LLM_KEY".into(), "sk-test-0123456789".into())],
            fleet_model: None,
            storage_extra: String::new(),
        }
    }

    pub fn toml(&self) -> String {
        let n = &self.names;
        let storage = match (&self.s3_endpoint, &self.local_dir) {
            (Some(ep), _) => format!(
                "[storage]\nbackend = \"s3\"\nbucket = \"{}\"\nprefix = \"out\"\nretry_budget_secs = {}\ntimeout_secs = {}\n{}\n[storage.s3]\nendpoint = \"{ep}\"\nregion = \"us-east-1\"\nforce_path_style = true\nrequest_checksums = true\n",
                self.bucket, self.storage_retry_budget_secs, self.storage_timeout_secs, self.storage_extra
            ),
            (None, Some(dir)) => format!(
                "[storage]\nbackend = \"local\"\nlocal_dir = \"{}\"\nretry_budget_secs = {}\n",
                dir.display(),
                self.storage_retry_budget_secs
            ),
            (None, None) => String::new(),
        };
        let (models, model, jobs, retry) = match &self.fleet_model {
            None => (
                format!(
                    "[models.tiny]\nsource = \"{}\"\n",
                    crate::common::model_dir("sd3-tiny-a").display()
                ),
                "tiny".to_string(),
                n.jobs.clone(),
                n.retry.clone(),
            ),
            Some(m) => (
                FLEET
                    .iter()
                    .map(|(name, dir)| {
                        format!(
                            "[models.{name}]\nsource = \"{}\"\n",
                            crate::common::model_dir(dir).display()
                        )
                    })
                    .collect(),
                m.clone(),
                format!("{}.{{model}}", n.jobs),
                format!("{}.{{model}}", n.retry),
            ),
        };
        format!(
            r#"{models}
[worker]
model = "{model}"
device = "cpu"
dtype = "fp32"
max_attempts = {attempts}
retry_backoff_ms = {backoff}
retry_backoff_max_ms = 2000
drain_timeout_secs = {drain}
progress_interval_ms = 50
name = "{worker_name}"
pause_min_secs = {pause}
pause_max_secs = {pause}
give_back_delay_ms = 200
{worker_extra}
[amqp]
url = "{amqp}"
queue_type = "{queue_type}"
jobs_exchange = "{route}"
inbox_queue = "{inbox}"
jobs_queue = "{jobs}"
dead_letter_queue = "{dead}"
retry_queue = "{retry}"
events_exchange = "{events}"
webhooks_queue = "{webhooks}"
control_exchange = "{control}"
control_queue = "{control}"
reconnect_min_ms = 100
reconnect_max_ms = 1000
stable_connection_secs = 2
confirm_timeout_secs = 10
[redis]
url = "{redis}"
key_prefix = "{prefix}"
timeout_ms = 500
require_lock = {require_lock}
lock_ttl_secs = 5
[metrics]
listen = "127.0.0.1:{port}"
{llm_default}
{storage}
{extra}
"#,
            attempts = self.max_attempts,
            backoff = self.retry_backoff_ms,
            drain = self.drain_timeout_secs,
            pause = self.pause_min_secs,
            worker_extra = self.worker_extra,
            require_lock = self.redis_require_lock,
            prefix = n.prefix,
            worker_name = match &self.fleet_model {
                None => format!("{}-worker", n.prefix),
                Some(m) => format!("{}-{m}-worker", n.prefix),
            },
            amqp = self.amqp_url,
            queue_type = queue_type(),
            route = n.route,
            inbox = n.inbox,
            dead = n.dead,
            events = n.events,
            webhooks = n.webhooks,
            control = n.control,
            redis = self.redis_url,
            port = self.metrics_port,
            storage = storage,
            extra = self.extra,
            // No LLM unless the test configures one.
            llm_default = if self.extra.contains("[llm]") {
                ""
            } else {
                "[llm]\nenabled = false"
            },
        )
    }
}

/// The `r2f worker` binary as a child process, its stderr collected.
pub struct WorkerProc {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    pub metrics_port: u16,
    _config: tempfile::NamedTempFile,
}

impl WorkerProc {
    pub fn spawn(cfg: &WorkerConfig) -> Self {
        Self::spawn_as(cfg, "worker")
    }

    /// `r2f COMMAND --config <cfg>` (`worker`, `gateway`); `metrics_port` is where its HTTP
    /// endpoints are.
    pub fn spawn_as(cfg: &WorkerConfig, command: &str) -> Self {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(&mut file, cfg.toml().as_bytes()).unwrap();
        // R2F_TEST_BIN runs the tests against another build (for example an older commit's, to
        // show that a regression test fails there).
        let bin =
            std::env::var("R2F_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_r2f").into());
        let mut child = Command::new(bin)
            .args([command, "--config"])
            .arg(file.path())
            .env("AWS_ACCESS_KEY_ID", S3_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "info")
            .envs(cfg.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut g = l.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        Self {
            child,
            log,
            metrics_port: cfg.metrics_port,
            _config: file,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub async fn http(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("http://127.0.0.1:{}{path}", self.metrics_port);
        let r = reqwest::get(&url).await.ok()?;
        let status = r.status().as_u16();
        Some((status, r.text().await.unwrap_or_default()))
    }

    pub async fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if let Some((200, _)) = self.http("/readyz").await {
                return self.wait_log("consuming", Duration::from_secs(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker config with its own broker names and a fresh in-process S3 bucket.
pub async fn s3_setup(name: &str) -> (Names, S3Server, WorkerConfig) {
    let names = Names::new(&unique(name));
    let bucket = format!("b{}", uuid::Uuid::new_v4().simple());
    let s3 = S3Server::start(&bucket).await;
    let mut cfg = WorkerConfig::new(&names);
    cfg.s3_endpoint = Some(s3.endpoint());
    cfg.bucket = bucket;
    (names, s3, cfg)
}

/// The same, with the S3 reached through a proxy that can refuse or cut connections.
pub async fn s3_behind_proxy(name: &str) -> (Names, S3Server, Proxy, WorkerConfig) {
    let (names, s3, mut cfg) = s3_setup(name).await;
    let proxy = Proxy::start(&s3.addr.to_string()).await;
    cfg.s3_endpoint = Some(format!("http://{}", proxy.addr));
    (names, s3, proxy, cfg)
}

/// The sum of a worker's metric series whose lines start with `line_start` (0 when absent).
pub async fn metric(worker: &WorkerProc, line_start: &str) -> f64 {
    let (_, text) = worker.http("/metrics").await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A job for the tiny model: small and quick.
pub fn tiny_job(id: &str, steps: u32) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "prompt": "a hairy frog warrior",
        "model": "tiny",
        "mode": "plain",
        "params": {"steps": steps, "guidance": 5.0, "width": 64, "height": 48, "seed": 7}
    })
}

/// Metric family names in a Prometheus text exposition.
pub fn exported_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// `r2f_*` metric names in a text, histogram series suffixes folded into their family.
pub fn metric_names_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("r2f_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if boundary {
            let mut name = &text[start..end];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    name = base;
                }
            }
            out.insert(name.to_string());
        }
        i = end.max(start + 1);
    }
    out
}

/// A store on the local Redis under key prefix `prefix` (the tests' workers' `redis.key_prefix`).
pub fn local_redis(prefix: &str) -> r2f::service::redis_store::RedisStore {
    r2f::service::redis_store::RedisStore::new(&r2f::config::RedisSettings {
        url: "redis://127.0.0.1:6379".into(),
        url_file: String::new(),
        key_prefix: prefix.to_string(),
        plan_ttl_secs: 60,
        status_ttl_secs: 600,
        lock_ttl_secs: 5,
        timeout_ms: 1000,
        require_lock: true,
    })
}

/// The status record of single-tenant job `id`, as the workers of `names` wrote it.
pub async fn job_status(names: &Names, id: &str) -> Option<r2f::job::status::JobStatus> {
    let redis = local_redis(&names.prefix);
    r2f::service::status::read(&redis, &r2f::service::tenancy::JobKey::single(id))
        .await
        .unwrap()
}

/// `rabbitmqctl ARGS` on the machine's RabbitMQ; fails the test when it fails. Its output.
pub fn ctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl (the machine's RabbitMQ)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "rabbitmqctl {args:?}: {text}");
    text
}

/// A broker user with `password`, `tags` and every permission on `/`.
pub fn broker_user(name: &str, password: &str, tags: &[&str]) {
    if Command::new("rabbitmqctl")
        .args(["add_user", name, password])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        ctl(&["change_password", name, password]);
    }
    let mut t = vec!["set_user_tags", name];
    t.extend(tags);
    ctl(&t);
    ctl(&["set_permissions", "-p", "/", name, ".*", ".*", ".*"]);
}
