//! `r2f worker`: consume jobs from RabbitMQ, generate, store, publish results.
//!
//! The parts, by role:
//! - [`consumer`]: the broker session and the delivery loop (select → run → settle), the pause
//!   a sick worker takes;
//! - [`router`]: the inbox, whose jobs are sent on to their model's queue;
//! - [`lifecycle`]: one job from message to stored result, as a [`outcome::JobOutcome`] value;
//! - [`lock`]: the job lock (one worker at a time per job);
//! - [`upload`]: storing the images and `result.json` within the storage retry budget;
//! - [`outcome`]: the failure policy, [`outcome::decide`], pure;
//! - [`settle`]: the broker side effects of a decision (events, retries, dead letters, acks)
//!   and the status record it leaves;
//! - [`gpu`]: the thread that owns the model;
//! - [`shutdown`]: drain and immediate-stop requests;
//! - [`amqp`]: broker plumbing shared with `r2f enqueue`.
//!
//! A job is acked only after its outputs and `result.json` are stored and its result event is
//! confirmed. Failure semantics: docs/contract.md.

pub mod consumer;
pub mod context;
pub mod control;
pub mod gpu;
pub mod lifecycle;
pub mod lock;
pub mod outbox;
pub mod outcome;
pub mod router;
pub mod settle;
pub mod shutdown;
pub mod upload;

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::Settings;
use crate::service::backoff::Backoff;
use crate::service::metrics::Metrics;
use crate::service::redis_store::RedisStore;
use consumer::{Session, SessionEnd};
pub use context::Context;
use gpu::GpuWorker;
pub use shutdown::Shutdown;

pub struct Worker {
    ctx: Arc<Context>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "r2f-worker".into())
}

impl Worker {
    /// Starts everything but the consumer: metrics server, storage check, model (on the GPU
    /// thread), Redis. Returns once the model is loaded and warm, or None when shutdown is
    /// requested first.
    pub async fn start(
        settings: Settings,
        shutdown: &mut Shutdown,
        planner: Option<Arc<dyn crate::service::planner::Planner>>,
        signer: Option<crate::c2pa_sign::C2paSigner>,
    ) -> anyhow::Result<Option<Self>> {
        let metrics = Metrics::new();
        let webhooks = crate::service::webhook::Sender::from_settings(&settings)?;
        let addr =
            crate::service::metrics::serve(metrics.clone(), &settings.metrics.listen).await?;
        info!(%addr, "metrics, /healthz and /readyz listening");
        metrics.init_model(&settings.worker.model);
        let worker_name = if settings.worker.name.is_empty() {
            hostname()
        } else {
            settings.worker.name.clone()
        };
        // A storage misconfiguration fails the start, not every job after a model load.
        let storage = crate::service::storage::from_settings(&settings.storage)
            .await
            .map_err(|e| anyhow::anyhow!("storage: {e}"))?;
        match storage.check().await {
            Ok(()) => info!("storage checked: reachable, missing objects read as missing"),
            // Refused credentials or permissions, or no such bucket: no job could succeed.
            Err(e) if e.is_denied() || e.0.contains("NoSuchBucket") => {
                anyhow::bail!("storage: {e}")
            }
            // Unreachable: jobs retry it (it may be coming up with us).
            Err(e) => warn!(error = %e.0, "storage not reachable at start; jobs will retry it"),
        }
        info!(model = %settings.worker.model, worker = %worker_name, "loading model");
        let (gpu, ready) = GpuWorker::start(&settings, metrics.clone(), signer)?;
        let loaded = tokio::select! {
            r = ready => r.map_err(|_| anyhow::anyhow!("the GPU thread stopped while loading"))??,
            _ = shutdown.requested() => {
                info!("shutdown requested while loading the model");
                return Ok(None);
            }
        };
        let caps = loaded.caps;
        if let tch::Device::Cuda(ordinal) = loaded.device {
            crate::service::metrics::sample_gpu_memory(
                metrics.clone(),
                ordinal as u32,
                crate::device::device_name(loaded.device),
                Duration::from_secs(15),
            );
        } else {
            let label = crate::device::device_name(loaded.device);
            metrics.gpu_memory.with_label_values(&[&label]).set(0.0);
        }
        metrics.set_ready(true);
        info!(?caps, "model loaded and warm: ready");
        let redis = RedisStore::new(&settings.redis);
        let models = settings.routed_models();
        for m in &models {
            metrics.routed.with_label_values(&[m]);
        }
        let tenancy = crate::service::tenancy::Tenancy::from_settings(&settings);
        Ok(Some(Self {
            ctx: Arc::new(Context {
                settings,
                metrics,
                storage,
                redis,
                gpu,
                worker_name,
                tenancy,
                planner,
                models,
                caps,
                webhooks,
                stopping: tokio::sync::watch::channel(false).0,
            }),
        }))
    }

    /// Consumes until drained, reconnecting with jittered backoff whenever the broker
    /// connection is lost.
    pub async fn run(self, mut shutdown: Shutdown) -> anyhow::Result<()> {
        let ctx = &self.ctx;
        let s = &ctx.settings.amqp;
        let mut backoff = Backoff::new(
            Duration::from_millis(s.reconnect_min_ms),
            Duration::from_millis(s.reconnect_max_ms),
            Duration::from_secs(s.stable_connection_secs),
        );
        let mut connected_before = false;
        // Past the drain deadline, or at a second signal, the job in hand is stopped and handed
        // back (`Context::stopping`).
        let stopper = context::AbortOnDrop(tokio::spawn({
            let ctx = ctx.clone();
            let mut signal = shutdown.clone();
            let drain = Duration::from_secs(ctx.settings.worker.drain_timeout_secs);
            async move {
                signal.requested().await;
                tokio::select! {
                    () = tokio::time::sleep(drain) => {
                        info!(drain_timeout_secs = drain.as_secs(), "drain deadline: stopping the job in hand to hand it back");
                    }
                    () = signal.immediate() => {
                        info!("second signal: stopping the job in hand to hand it back");
                    }
                }
                ctx.stopping.send_replace(true);
            }
        }));
        while !shutdown.is_requested() {
            let session = match Session::open(ctx).await {
                Ok(x) => x,
                Err(e) => {
                    let wait = backoff.next_delay();
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker unavailable");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {},
                        _ = shutdown.requested() => break,
                    }
                    continue;
                }
            };
            if connected_before {
                ctx.metrics.amqp_reconnects.inc();
                info!("broker connection re-established");
            } else {
                info!(queue = %s.queue_of(&ctx.settings.worker.model), inbox = %s.inbox_queue, "consuming");
            }
            connected_before = true;
            backoff.up();
            match session.run(ctx, &mut shutdown).await {
                SessionEnd::Drained => break,
                SessionEnd::Broken(e) => {
                    backoff.down();
                    let wait = backoff.next_delay();
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker connection lost; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {},
                        _ = shutdown.requested() => break,
                    }
                }
            }
        }
        drop(stopper);
        info!("worker stopped");
        Ok(())
    }
}
