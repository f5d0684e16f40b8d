//! Prometheus metrics (names from CONTRACT.md) and the HTTP endpoints `/metrics`, `/healthz`,
//! `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

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
    ready: AtomicBool,
    wedged: AtomicBool,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let r = Registry::new();
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            HistogramOpts::new(name, help).buckets(buckets.to_vec())
        };
        let m = Metrics {
            jobs: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "r2f_jobs_total",
                        "Jobs finished, by model, mode and status.",
                    ),
                    &["model", "mode", "status"],
                )
                .unwrap(),
            ),
            stage_seconds: reg(
                &r,
                HistogramVec::new(
                    hist(
                        "r2f_job_stage_seconds",
                        "Time per job stage (queue, plan, encode, denoise, decode, upload, total).",
                        JOB_BUCKETS,
                    ),
                    &["stage"],
                )
                .unwrap(),
            ),
            denoise_step_seconds: reg(
                &r,
                HistogramVec::new(
                    hist(
                        "r2f_denoise_step_seconds",
                        "Time per denoising step (average over a job's steps).",
                        STEP_BUCKETS,
                    ),
                    &["model"],
                )
                .unwrap(),
            ),
            plan_cache: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "r2f_plan_cache_requests_total",
                        "Plan cache lookups: hit, miss, error (Redis down: bypassed).",
                    ),
                    &["result"],
                )
                .unwrap(),
            ),
            llm_requests: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "r2f_llm_requests_total",
                        "LLM chat-completion calls by outcome.",
                    ),
                    &["outcome"],
                )
                .unwrap(),
            ),
            llm_seconds: reg(
                &r,
                Histogram::with_opts(hist(
                    "r2f_llm_request_seconds",
                    "LLM chat-completion call latency.",
                    LLM_BUCKETS,
                ))
                .unwrap(),
            ),
            jobs_in_progress: reg(
                &r,
                IntGauge::new("r2f_jobs_in_progress", "Jobs being processed.").unwrap(),
            ),
            images: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("r2f_images_generated_total", "Images generated and stored."),
                    &["model"],
                )
                .unwrap(),
            ),
            model_load_seconds: reg(
                &r,
                GaugeVec::new(
                    Opts::new("r2f_model_load_seconds", "Time the model took to load."),
                    &["model"],
                )
                .unwrap(),
            ),
            gpu_memory: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "r2f_gpu_memory_allocated_bytes",
                        "GPU memory held by this process (driver's view; 0 on the CPU).",
                    ),
                    &["device"],
                )
                .unwrap(),
            ),
            dead_lettered: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "r2f_dead_lettered_total",
                        "Jobs sent to the dead-letter queue.",
                    ),
                    &["reason"],
                )
                .unwrap(),
            ),
            job_started: reg(
                &r,
                Gauge::new(
                    "r2f_job_started_timestamp_seconds",
                    "Unix time the job in hand started (0 when idle).",
                )
                .unwrap(),
            ),
            ready_gauge: reg(
                &r,
                IntGauge::new("r2f_worker_ready", "1 once the model is loaded and warm.").unwrap(),
            ),
            amqp_reconnects: reg(
                &r,
                prometheus::IntCounter::new(
                    "r2f_amqp_reconnects_total",
                    "Broker connections re-established after a loss.",
                )
                .unwrap(),
            ),
            redis_errors: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "r2f_redis_unavailable_total",
                        "Operations that went on without Redis (lock, cache), by use.",
                    ),
                    &["use"],
                )
                .unwrap(),
            ),
            build_info: reg(
                &r,
                GaugeVec::new(
                    Opts::new("r2f_build_info", "Build information."),
                    &["version"],
                )
                .unwrap(),
            ),
            registry: r,
            ready: AtomicBool::new(false),
            wedged: AtomicBool::new(false),
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        // Known label values start at zero so every series exists from the first scrape.
        for r in ["hit", "miss", "error"] {
            m.plan_cache.with_label_values(&[r]);
        }
        for o in ["ok", "error", "retry", "invalid"] {
            m.llm_requests.with_label_values(&[o]);
        }
        for s in [
            "queue", "plan", "encode", "denoise", "decode", "upload", "total",
        ] {
            m.stage_seconds.with_label_values(&[s]);
        }
        for u in ["lock", "delivery_count"] {
            m.redis_errors.with_label_values(&[u]);
        }
        for r in ["invalid_job", "max_attempts", "model", "llm"] {
            m.dead_lettered.with_label_values(&[r]);
        }
        Arc::new(m)
    }

    /// Pre-creates the per-model series.
    pub fn init_model(&self, model: &str, modes: &[&str]) {
        for mode in modes {
            for status in ["succeeded", "failed", "rejected"] {
                self.jobs.with_label_values(&[model, mode, status]);
            }
        }
        self.images.with_label_values(&[model]);
        self.denoise_step_seconds.with_label_values(&[model]);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.ready_gauge.set(ready as i64);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.is_wedged()
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

/// GPU memory held by this process, from nvidia-smi (None when unavailable).
pub fn process_gpu_bytes() -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    let me = std::process::id().to_string();
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut parts = l.split(',').map(str::trim);
        (parts.next()? == me).then(|| parts.next()?.parse::<u64>().ok().map(|mib| mib << 20))?
    })
}
