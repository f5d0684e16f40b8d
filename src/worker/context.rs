//! What every job of a worker shares ([`Context`]), and the small helpers its parts use.

use std::sync::Arc;

use crate::config::Settings;
use crate::generate::{JobMode, ModelCaps};
use crate::job::{Outcome, Rejection, WebhookSpec};
use crate::service::metrics::{Metrics, UNKNOWN_MODE};
use crate::service::redis_store::RedisStore;
use crate::service::storage::Storage;
use crate::service::tenancy::{Scope, Tenancy};

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

impl Context {
    /// A delivery's scope: its tenant (from the broker-checked `user_id`), or why it has none.
    pub fn scope_of(&self, d: &lapin::message::Delivery) -> Result<Scope, Rejection> {
        let user = d.properties.user_id().as_ref().map(|u| u.as_str());
        self.tenancy.scope_of(user)
    }

    /// Checks a job's webhook against the receivers its tenant (or the fleet) allows.
    pub fn webhook_check(&self, scope: &Scope, spec: &WebhookSpec) -> Result<(), String> {
        crate::service::webhook::Receivers::of(&self.settings, self.tenancy.settings(scope))
            .check(spec)
            .map(|_| ())
    }
}

/// What every job of this worker shares.
pub struct Context {
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub storage: Box<dyn Storage>,
    pub redis: RedisStore,
    pub gpu: GpuWorker,
    pub worker_name: String,
    /// The fleet's tenants (one unnamed scope in a single-tenant fleet).
    pub tenancy: Tenancy,
    pub planner: Option<Arc<dyn crate::service::planner::Planner>>,
    /// The models that have a queue (job `model` values that are not rejected); this worker
    /// serves `settings.worker.model` and sends the others on.
    pub models: Vec<String>,
    /// What the loaded model can draw.
    pub caps: ModelCaps,
    /// Webhook deliveries; None when no host is allowed.
    pub webhooks: Option<Arc<crate::service::webhook::Sender>>,
    /// True once the worker is stopping (drain deadline, second signal): the job in hand stops
    /// at its next denoising step (or leaves its planning) and is handed back.
    pub stopping: tokio::sync::watch::Sender<bool>,
}

impl Context {
    /// Whether the worker is stopping (see [`Context::stopping`]).
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Resolves once the worker is stopping.
    pub async fn stopped(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}
