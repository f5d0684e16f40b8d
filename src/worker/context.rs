//! What every job of a worker shares ([`Context`]), and the small helpers its parts use.

use std::sync::Arc;

use crate::config::Settings;
use crate::generate::{JobMode, ModelCaps};
use crate::job::Outcome;
use crate::service::metrics::{Metrics, UNKNOWN_MODE};
use crate::service::redis_store::RedisStore;
use crate::service::storage::Storage;

use super::gpu::GpuWorker;

/// Aborts a spawned task when dropped: a task tied to a job or a broker session (the lock
/// renewer, the inbox router) ends with it.
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts a finished job (a delivery settled for good) in `r2f_jobs_total`.
pub fn count_job(ctx: &Context, mode: Option<JobMode>, outcome: Outcome) {
    let mode = mode.map_or(UNKNOWN_MODE, JobMode::name);
    ctx.metrics
        .jobs
        .with_label_values(&[&ctx.settings.worker.model, mode, outcome.name()])
        .inc();
}

/// What every job of this worker shares.
pub struct Context {
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub storage: Box<dyn Storage>,
    pub redis: RedisStore,
    pub gpu: GpuWorker,
    pub worker_name: String,
    pub planner: Option<Arc<dyn crate::service::planner::Planner>>,
    /// The models that have a queue (job `model` values that are not rejected); this worker
    /// serves `settings.worker.model` and sends the others on.
    pub models: Vec<String>,
    /// What the loaded model can draw.
    pub caps: ModelCaps,
    /// Webhook deliveries; None when no host is allowed.
    pub webhooks: Option<Arc<crate::service::webhook::Webhooks>>,
}
