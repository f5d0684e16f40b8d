//! Prometheus metrics (names from docs/contract.md) and the HTTP endpoints `/metrics`, `/healthz`,
//! `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::generate::JobMode;
use crate::job::{ErrorKind, Outcome};

/// The `mode` label of jobs whose mode is not known (messages that are not valid jobs).
pub const UNKNOWN_MODE: &str = "unknown";
/// The `reason` label of `r2f_dead_lettered_total` for a job out of attempts.
pub const MAX_ATTEMPTS: &str = "max_attempts";
/// The `reason` label of `r2f_dead_lettered_total` for a job delivered too often unsettled.
pub const POISON: &str = "poison";

crate::named_enum! {
    /// What became of one webhook POST (`r2f_webhook_deliveries_total`'s `outcome`).
    pub enum Delivery("webhook delivery outcome") {
        /// The receiver answered 2xx.
        Ok = "ok",
        /// It failed and is tried again.
        Retry = "retry",
        /// It failed and is given up.
        Failed = "failed",
    }
}

/// Job-scale latencies: 50 ms to 20 min.
const JOB_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
];
/// One denoising step: 1 ms to 10 s.
const STEP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];
/// LLM calls: 50 ms to 2 min.
const LLM_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0,
];

/// A task that holds the GPU: the worker's GPU thread says when it has let go of it.
pub trait HeldTask: Send + Sync {
    fn is_finished(&self) -> bool;
}

pub struct Metrics {
    pub registry: Registry,
    pub jobs: IntCounterVec,
    pub stage_seconds: HistogramVec,
    pub denoise_step_seconds: HistogramVec,
    pub plan_cache: IntCounterVec,
    pub llm_requests: IntCounterVec,
    pub llm_seconds: Histogram,
    pub jobs_in_progress: IntGauge,
    pub images: IntCounterVec,
    pub model_load_seconds: GaugeVec,
    pub gpu_memory: GaugeVec,
    pub dead_lettered: IntCounterVec,
    pub job_started: Gauge,
    pub ready_gauge: IntGauge,
    pub amqp_reconnects: prometheus::IntCounter,
    pub redis_errors: IntCounterVec,
    pub build_info: GaugeVec,
    pub storage_retries: IntCounterVec,
    pub paused: IntGauge,
    pub broker_blocked: IntGauge,
    pub pauses: IntCounterVec,
    pub given_back: IntCounterVec,
    pub routed: IntCounterVec,
    pub webhooks: IntCounterVec,
    ready: AtomicBool,
    wedged: AtomicBool,
    /// The GPU task of a job abandoned past its timeout, until the GPU thread lets go of it.
    abandoned: std::sync::Mutex<Option<Arc<dyn HeldTask>>>,
}

/// Registers metrics on one registry; every constructor also creates the series of the label
/// values given as known, so that they exist (at zero) from the first scrape.
struct Registrar(Registry);

impl Registrar {
    fn add<T: prometheus::core::Collector + Clone + 'static>(&self, c: T) -> T {
        self.0.register(Box::new(c.clone())).expect("unique metric");
        c
    }

    fn counters(&self, name: &str, help: &str, label: &str, known: &[&str]) -> IntCounterVec {
        let c =
            self.add(IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"));
        for k in known {
            c.with_label_values(&[k]);
        }
        c
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn counter(&self, name: &str, help: &str) -> prometheus::IntCounter {
        self.add(prometheus::IntCounter::new(name, help).expect("valid metric"))
    }

    fn int_gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric"))
    }

    fn gauge(&self, name: &str, help: &str) -> Gauge {
        self.add(Gauge::new(name, help).expect("valid metric"))
    }

    fn gauges(&self, name: &str, help: &str, label: &str) -> GaugeVec {
        self.add(GaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric"))
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(Histogram::with_opts(opts).expect("valid metric"))
    }

    fn histograms(&self, name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(HistogramVec::new(opts, labels).expect("valid metric"))
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let r = Registrar(Registry::new());
        let m = Metrics {
            jobs: r.counter_vec(
                "r2f_jobs_total",
                "Jobs finished, by model, mode and status.",
                &["model", "mode", "status"],
            ),
            stage_seconds: r.histograms(
                "r2f_job_stage_seconds",
                "Time per job stage (queue, plan, encode, denoise, guidance, decode, upload, total), by model.",
                JOB_BUCKETS,
                &["model", "stage"],
            ),
            denoise_step_seconds: r.histograms(
                "r2f_denoise_step_seconds",
                "Time per denoising step (average over a job's steps).",
                STEP_BUCKETS,
                &["model"],
            ),
            plan_cache: r.counters(
                "r2f_plan_cache_requests_total",
                "Plan cache lookups: hit, miss, error (Redis down: bypassed).",
                "result",
                &["hit", "miss", "error"],
            ),
            llm_requests: r.counters(
                "r2f_llm_requests_total",
                "LLM chat-completion calls by outcome.",
                "outcome",
                &["ok", "error", "retry", "invalid"],
            ),
            llm_seconds: r.histogram(
                "r2f_llm_request_seconds",
                "LLM chat-completion call latency.",
                LLM_BUCKETS,
            ),
            jobs_in_progress: r.int_gauge("r2f_jobs_in_progress", "Jobs being processed."),
            images: r.counters(
                "r2f_images_generated_total",
                "Images generated and stored.",
                "model",
                &[],
            ),
            model_load_seconds: r.gauges(
                "r2f_model_load_seconds",
                "Time the model took to load.",
                "model",
            ),
            gpu_memory: r.gauges(
                "r2f_gpu_memory_allocated_bytes",
                "GPU memory held by this process (driver's view; 0 on the CPU).",
                "device",
            ),
            dead_lettered: r.counters(
                "r2f_dead_lettered_total",
                "Jobs sent to the dead-letter queue.",
                "reason",
                &[
                    ErrorKind::InvalidJob.name(),
                    MAX_ATTEMPTS,
                    ErrorKind::Model.name(),
                    ErrorKind::Llm.name(),
                    POISON,
                ],
            ),
            job_started: r.gauge(
                "r2f_job_started_timestamp_seconds",
                "Unix time the job in hand started (0 when idle).",
            ),
            ready_gauge: r.int_gauge("r2f_worker_ready", "1 once the model is loaded and warm."),
            amqp_reconnects: r.counter(
                "r2f_amqp_reconnects_total",
                "Broker connections re-established after a loss.",
            ),
            redis_errors: r.counters(
                "r2f_redis_unavailable_total",
                "Operations that went on without Redis (lock, cache), by use.",
                "use",
                &["lock"],
            ),
            build_info: r.gauges("r2f_build_info", "Build information.", "version"),
            storage_retries: r.counters(
                "r2f_storage_retries_total",
                "Storage calls retried in-process (images kept in memory meanwhile).",
                "op",
                &["put"],
            ),
            paused: r.int_gauge(
                "r2f_worker_paused",
                "1 while the worker stopped consuming after failures that were not the jobs' fault.",
            ),
            broker_blocked: r.int_gauge(
                "r2f_broker_blocked",
                "1 while the broker blocks this process's publishing connection (a memory or disk alarm).",
            ),
            pauses: r.counters(
                "r2f_worker_pauses_total",
                "Times the worker stopped consuming, by the kind of the last failure.",
                "kind",
                &[
                    ErrorKind::Llm,
                    ErrorKind::Storage,
                    ErrorKind::Model,
                    ErrorKind::Internal,
                ]
                .map(ErrorKind::name),
            ),
            routed: r.counters(
                "r2f_jobs_routed_total",
                "Jobs this worker sent on to the queue of their model (from the inbox, or from the wrong queue).",
                "model",
                &[],
            ),
            webhooks: r.counters(
                "r2f_webhook_deliveries_total",
                "Webhook POSTs, by outcome: ok, retry (failed, tried again), failed (given up).",
                "outcome",
                &Delivery::ALL.iter().map(|d| d.name()).collect::<Vec<_>>(),
            ),
            given_back: r.counters(
                "r2f_jobs_given_back_total",
                "Jobs put back on the queue unconsumed (sick worker, lock held elsewhere, redelivery count).",
                "reason",
                &["sick_worker", "busy", "redelivered", "stopping"],
            ),
            registry: {
                // Process metrics (resident memory, CPU, open files) for the OOM runbook.
                let _ = r.0.register(Box::new(
                    prometheus::process_collector::ProcessCollector::for_self(),
                ));
                r.0
            },
            ready: AtomicBool::new(false),
            wedged: AtomicBool::new(false),
            abandoned: std::sync::Mutex::new(None),
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        Arc::new(m)
    }

    /// Pre-creates the per-model series.
    pub fn init_model(&self, model: &str) {
        let modes = JobMode::ALL.iter().map(|m| m.name());
        for mode in modes.chain([UNKNOWN_MODE]) {
            for status in Outcome::ALL {
                self.jobs.with_label_values(&[model, mode, status.name()]);
            }
        }
        self.images.with_label_values(&[model]);
        self.denoise_step_seconds.with_label_values(&[model]);
        for s in [
            "queue", "plan", "encode", "denoise", "decode", "upload", "total",
        ] {
            self.stage_seconds.with_label_values(&[model, s]);
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.ready_gauge.set(ready as i64);
    }

    /// Ready: the model is loaded, and the worker neither paused nor stuck.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
            && !self.is_unhealthy()
            && self.paused.get() == 0
            && self.broker_blocked.get() == 0
    }

    /// A job ran past `job_timeout_secs` and was abandoned with its GPU task: until the GPU
    /// thread lets go of that task (it stops at the next denoising step; a step that never
    /// returns keeps it), /healthz fails and the orchestrator restarts the pod if it stays so.
    pub fn set_abandoned(&self, task: Arc<dyn HeldTask>) {
        if let Ok(mut a) = self.abandoned.lock() {
            *a = Some(task);
        }
    }

    /// An abandoned GPU task still holds the GPU.
    pub fn is_stuck(&self) -> bool {
        self.abandoned
            .lock()
            .map(|a| a.as_ref().is_some_and(|t| !t.is_finished()))
            .unwrap_or(false)
    }

    /// /healthz fails: the GPU context is unusable or a job is stuck on it.
    pub fn is_unhealthy(&self) -> bool {
        self.is_wedged() || self.is_stuck()
    }

    /// The GPU context is unusable: /healthz fails so the orchestrator restarts the pod.
    pub fn set_wedged(&self) {
        self.wedged.store(true, Ordering::SeqCst);
    }

    pub fn is_wedged(&self) -> bool {
        self.wedged.load(Ordering::SeqCst)
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(metrics: Arc<Metrics>, listen: &str) -> anyhow::Result<std::net::SocketAddr> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let m1 = metrics.clone();
    let m2 = metrics.clone();
    let m3 = metrics;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m1.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let m = m2.clone();
                async move {
                    if m.is_wedged() {
                        (StatusCode::SERVICE_UNAVAILABLE, "GPU context unusable")
                    } else if m.is_stuck() {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "a job is stuck past its timeout",
                        )
                    } else {
                        (StatusCode::OK, "ok")
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let m = m3.clone();
                async move {
                    if m.is_ready() {
                        (StatusCode::OK, "ready")
                    } else if m.paused.get() != 0 {
                        (StatusCode::SERVICE_UNAVAILABLE, "paused after failures")
                    } else if m.broker_blocked.get() != 0 {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the broker blocks publishing (memory or disk alarm)",
                        )
                    } else if m.is_unhealthy() {
                        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy (see /healthz)")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "loading model")
                    }
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(addr)
}

/// Samples the GPU memory gauge every `every` on a thread of its own, off the jobs' path (an NVML
/// call that hangs holds nothing else). NVML (the driver's library, loaded at run time) gives
/// this process's memory when its PID is visible, else the device's used memory: inside a
/// container the driver reports host PIDs, and a worker owns its GPU. Nothing happens where
/// NVML is missing (a CPU machine).
pub fn sample_gpu_memory(
    metrics: Arc<Metrics>,
    ordinal: u32,
    label: String,
    every: std::time::Duration,
) {
    let spawned = std::thread::Builder::new()
        .name("r2f-gpu-memory".into())
        .spawn(move || {
            let nvml = match nvml_wrapper::Nvml::init() {
                Ok(n) => n,
                Err(e) => {
                    tracing::info!(error = %e, "NVML unavailable: r2f_gpu_memory_allocated_bytes stays 0");
                    return;
                }
            };
            let me = std::process::id();
            loop {
                if let Ok(device) = nvml.device_by_index(ordinal) {
                    let own = device.running_compute_processes().ok().and_then(|ps| {
                        ps.into_iter().find(|p| p.pid == me).and_then(|p| match p.used_gpu_memory {
                            nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => Some(b),
                            nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
                        })
                    });
                    let bytes = own.or_else(|| device.memory_info().ok().map(|m| m.used));
                    if let Some(b) = bytes {
                        metrics.gpu_memory.with_label_values(&[&label]).set(b as f64);
                    }
                }
                std::thread::sleep(every);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the GPU memory sampler");
    }
}

const NVIDIA_SMI_ARGS: [&str; 2] = [
    "--query-compute-apps=pid,used_memory",
    "--format=csv,noheader,nounits",
];

/// GPU memory held by this process, from nvidia-smi (for `r2f bench`, outside any job).
pub fn process_gpu_bytes() -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(NVIDIA_SMI_ARGS)
        .output()
        .ok()?;
    own_gpu_bytes(&out.stdout)
}

/// This process's line of nvidia-smi's compute-apps table, in bytes.
fn own_gpu_bytes(table: &[u8]) -> Option<u64> {
    let me = std::process::id().to_string();
    String::from_utf8_lossy(table).lines().find_map(|l| {
        let mut parts = l.split(',').map(str::trim);
        (parts.next()? == me).then(|| parts.next()?.parse::<u64>().ok().map(|mib| mib << 20))?
    })
}
