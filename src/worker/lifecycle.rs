//! One job, start to end: validate → lock → dedupe → plan → generate → store. [`run_job`]
//! returns a [`JobOutcome`]; it touches no broker state (the consumer settles the outcome), so
//! every way a job can end is a value.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn, Instrument};

use super::context::Context;
use super::gpu::{ms, total_timings, GeneratedImage, GpuFailure, GpuTask, StopReason, TaskControl};
use super::lock::{Acquired, JobLock};
use super::outcome::{bounded, Fault, JobError, JobOutcome, Rejected};
use super::upload::{storage_error, store_result, upload};
use crate::generate::{JobMode, Mode};
use crate::job::{
    best_effort_id, validate_message, ErrorKind, JobState, Outcome, Rejection, ResultEvent,
    ValidJob, WebhookSpec,
};
use crate::models::hub::Family;
use crate::plan::Plan;
use crate::service::storage::join_key;
use crate::service::tenancy::{JobKey, Scope};

/// What the lifecycle needs of a delivery.
pub struct Incoming<'a> {
    pub body: &'a [u8],
    pub attempt: u32,
    /// Milliseconds since the message was first published (0 when unknown).
    pub queue_ms: u64,
    /// A worker sent it on to this queue already (it is not sent on again).
    pub routed: bool,
    /// Whose job it is (from the delivery's `user_id`), or why it is no tenant's.
    pub scope: Result<Scope, Rejection>,
    /// The W3C trace id the job goes by (`service::telemetry::adopt`).
    pub trace_id: Option<String>,
}

/// What the job in hand tells as it runs; published by the consumer (best effort).
pub enum Notice {
    /// A worker took the job (`job.started`).
    Started {
        job: JobKey,
        attempt: u32,
        webhook: Option<Arc<WebhookSpec>>,
        trace_id: Option<String>,
    },
    /// `step` of `steps` denoising steps done (`job.progress`, throttled).
    Progress {
        job: JobKey,
        attempt: u32,
        step: usize,
        steps: usize,
        webhook: Option<Arc<WebhookSpec>>,
        trace_id: Option<String>,
    },
}

pub type ProgressTx = mpsc::UnboundedSender<Notice>;

/// A valid job this worker runs, with its keys: (tenant, id) for its records and requests,
/// and its `result.json` (also its lock and idempotency key).
pub struct Taken {
    pub job: ValidJob,
    pub key: JobKey,
    pub result_key: String,
    /// The job's trace id, for its events.
    pub trace_id: Option<String>,
}

impl Taken {
    /// A result event of this job (its id, tenant and worker filled in).
    fn event(&self, ctx: &Context, status: Outcome, attempt: u32) -> ResultEvent {
        ResultEvent {
            id: self.job.id.clone(),
            tenant: self.key.scope.name().map(str::to_string),
            status,
            attempt,
            outputs: vec![],
            plan: self.job.spec.plan_json(),
            timings_ms: BTreeMap::new(),
            error: None,
            worker: ctx.worker_name.clone(),
            trace_id: self.trace_id.clone(),
        }
    }
}

/// What the consumer needs to know of a job besides its outcome.
#[derive(Default)]
pub struct JobInfo {
    /// The job's mode (none for a message that is not a valid job), a metric label.
    pub mode: Option<JobMode>,
    /// Where the job's `result.json` lives, for a valid job.
    pub result_key: Option<String>,
}

/// Runs one delivery to its outcome.
pub async fn run_job(
    ctx: &Arc<Context>,
    msg: Incoming<'_>,
    progress: &ProgressTx,
) -> (JobOutcome, JobInfo) {
    let s = &ctx.settings;
    // The id is only read back from a message of bounded size, and only a valid one is carried
    // on (it names storage keys, AMQP properties and log lines).
    let id_of = || best_effort_id(msg.body, s.limits.max_message_bytes);
    let scope = match &msg.scope {
        Ok(scope) => scope.clone(),
        Err(rejection) => {
            let id = id_of();
            warn!(job_id = id.as_deref().unwrap_or("-"), reason = ?rejection.0, "job of no tenant rejected");
            let outcome = JobOutcome::Rejected(Rejected::unattributable(id, rejection.0.clone()));
            return (outcome, JobInfo::default());
        }
    };
    let limits = ctx.tenancy.limits(&scope, &s.limits);
    let models = ctx.tenancy.models(&scope, &ctx.models);
    let validated = {
        let _v = tracing::info_span!("validate").entered();
        validate_message(msg.body, &limits, &models, &s.worker.model)
    };
    let job = match validated {
        Ok(job) => job,
        Err(rejection) => {
            let id = id_of();
            warn!(job_id = id.as_deref().unwrap_or("-"), reason = ?rejection.0, "job rejected");
            // An invalid message under an id the tenant used for a job leaves that job alone.
            if let Some(id) = &id {
                let key = JobKey::new(scope.clone(), id.as_str());
                if crate::service::status::claimed(&ctx.redis, &key).await {
                    let reason = format!(
                        "duplicate_id: `{id}` is already another job's ({})",
                        rejection.0
                    );
                    let outcome = JobOutcome::Rejected(Rejected::duplicate(id.clone(), reason));
                    return (outcome, JobInfo::default());
                }
            }
            let outcome = JobOutcome::Rejected(Rejected::invalid(id, rejection.0));
            return (outcome, JobInfo::default());
        }
    };
    // A valid job this worker will not run: logged, and rejected with its reason.
    let rejected = |id: String, reason: String, info: JobInfo| {
        warn!(job_id = %id, reason = ?reason, "job rejected");
        (
            JobOutcome::Rejected(Rejected::invalid(Some(id), reason)),
            info,
        )
    };
    if job.model != s.worker.model {
        if !msg.routed {
            return (JobOutcome::Route { model: job.model }, JobInfo::default());
        }
        // Sent on once already and still not at its model's queue: a broker set up otherwise
        // than this worker's configuration says. Rejected rather than sent round again.
        let reason = format!(
            "job for model `{}` reached the queue of model `{}`",
            job.model, s.worker.model
        );
        return rejected(job.id, reason, JobInfo::default());
    }
    let key = JobKey::new(scope.clone(), job.id.as_str());
    // The id is this job's from now on (within its tenant): a message with another body under
    // the same id is rejected as a duplicate, and never touches this job.
    let ttl = Duration::from_secs(s.redis.status_ttl_secs);
    match crate::service::status::claim(&ctx.redis, &key, &job.fingerprint, ttl).await {
        Ok(true) => {}
        Ok(false) => {
            let reason = format!(
                "duplicate_id: `{}` is already another job's (a message with another body); send a new id",
                job.id
            );
            warn!(job_id = %job.id, "duplicate id rejected");
            let outcome = JobOutcome::Rejected(Rejected::duplicate(job.id, reason));
            return (outcome, JobInfo::default());
        }
        Err(e) if !s.redis.require_lock => {
            ctx.metrics.redis_errors.with_label_values(&["claim"]).inc();
            warn!(error = %e, "id claim unavailable: not checked (redis.require_lock = false)");
        }
        Err(e) => {
            ctx.metrics.redis_errors.with_label_values(&["claim"]).inc();
            let taken = taken(ctx, job, key, msg.trace_id.clone());
            let error = JobError::new(
                ErrorKind::Internal,
                Fault::Transient,
                format!("the id claim is unavailable: {e}"),
            );
            return (failed(ctx, &taken, msg.attempt, error), JobInfo::default());
        }
    }
    if let Some(Err(reason)) = job.webhook.as_ref().map(|w| ctx.webhook_check(&scope, w)) {
        return rejected(job.id, reason, JobInfo::default());
    }
    if job.c2pa == Some(true) && s.c2pa.key_file.is_empty() {
        return rejected(
            job.id,
            "output.c2pa: this deployment signs no C2PA manifests (no c2pa.key_file configured)"
                .into(),
            JobInfo::default(),
        );
    }
    let taken = taken(ctx, job, key, msg.trace_id.clone());
    let info = JobInfo {
        mode: Some(taken.job.spec.mode()),
        result_key: Some(taken.result_key.clone()),
    };
    let job = &taken.job;
    let reason = if let Err(reason) =
        ctx.caps
            .check_size(job.params.width, job.params.height, s.limits.max_pixels)
    {
        Some(reason)
    } else if job.spec.mode() == JobMode::R2fplus && ctx.caps.family != Family::Sd3 {
        Some(format!(
            "mode r2fplus runs on SD3 models only; model `{}` is {:?}",
            job.model, ctx.caps.family
        ))
    } else if job.spec.needs_planner() && ctx.planner.is_none() {
        Some(format!(
            "mode {} without a plan needs the LLM planner, which this worker has disabled: send a plan",
            job.spec.mode()
        ))
    } else {
        None
    };
    if let Some(reason) = reason {
        return rejected(job.id.clone(), reason, info);
    }
    // The consumer's `job` span (when there is one) names the job from now on.
    tracing::Span::current().record("job_id", job.id.as_str());
    info!(
        mode = job.spec.mode().name(),
        prompt = ?bounded(&job.prompt, 200),
        "job received"
    );
    let outcome = locked(ctx, &taken, msg, progress).await;
    (outcome, info)
}

/// Where the `result.json` of job `job` of `scope` lives, under `storage.prefix`
/// `storage_prefix` (`r2f replay` clears it there too).
pub fn result_key(storage_prefix: &str, scope: &Scope, job: &ValidJob) -> String {
    join_key(&[
        storage_prefix,
        scope.name().unwrap_or(""),
        &job.prefix,
        &job.id,
        "result.json",
    ])
}

/// Where the `result.json` of the job in `body` lives, when it is a valid job of `scope` (for a
/// message that is dead-lettered without being run: its failure is stored like any other).
pub fn result_key_of(ctx: &Context, scope: &Scope, body: &[u8]) -> Option<String> {
    let limits = ctx.tenancy.limits(scope, &ctx.settings.limits);
    let models = ctx.tenancy.models(scope, &ctx.models);
    let job = validate_message(body, &limits, &models, &ctx.settings.worker.model).ok()?;
    Some(result_key(&ctx.settings.storage.prefix, scope, &job))
}

/// A valid job with its keys.
fn taken(ctx: &Context, job: ValidJob, key: JobKey, trace_id: Option<String>) -> Taken {
    let result_key = result_key(&ctx.settings.storage.prefix, &key.scope, &job);
    Taken {
        job,
        key,
        result_key,
        trace_id,
    }
}

fn failed(ctx: &Context, t: &Taken, attempt: u32, error: JobError) -> JobOutcome {
    JobOutcome::Failed {
        event: t.event(ctx, Outcome::Failed, attempt),
        error,
    }
}

/// Takes the job's lock, runs it, releases the lock.
async fn locked(
    ctx: &Arc<Context>,
    t: &Taken,
    msg: Incoming<'_>,
    progress: &ProgressTx,
) -> JobOutcome {
    let key = &t.result_key;
    let ttl = Duration::from_secs(ctx.settings.redis.lock_ttl_secs.max(5));
    // Redis down for the lock is a transient failure (docs/contract.md): running unlocked
    // would let two workers generate one job.
    let lock = match JobLock::acquire(&ctx.redis, key, &ctx.worker_name, ttl).await {
        Ok(Acquired::Held(lock)) => lock,
        Ok(Acquired::Busy) => {
            info!("another worker holds this job: postponed");
            return JobOutcome::Busy;
        }
        Err(e) if !ctx.settings.redis.require_lock => {
            ctx.metrics.redis_errors.with_label_values(&["lock"]).inc();
            warn!(error = %e, "job lock unavailable: running unlocked (redis.require_lock = false)");
            return in_flight(ctx, t, &msg, progress, None).await;
        }
        Err(e) => {
            ctx.metrics.redis_errors.with_label_values(&["lock"]).inc();
            return failed(
                ctx,
                t,
                msg.attempt,
                JobError::new(
                    ErrorKind::Internal,
                    Fault::Transient,
                    format!("the job lock is unavailable: {e}"),
                ),
            );
        }
    };
    let outcome = in_flight(ctx, t, &msg, progress, Some(&lock)).await;
    lock.release().await;
    outcome
}

/// Counts the job among its tenant's jobs in flight (`max_jobs_in_flight`) while it runs; a
/// tenant at its cap has the job postponed.
async fn in_flight(
    ctx: &Arc<Context>,
    t: &Taken,
    msg: &Incoming<'_>,
    progress: &ProgressTx,
    lock: Option<&JobLock>,
) -> JobOutcome {
    let cap = ctx
        .tenancy
        .settings(&t.key.scope)
        .and_then(|s| s.max_jobs_in_flight);
    let Some(max) = cap else {
        return with_lock(ctx, t, msg, progress, lock).await;
    };
    let lapse = Duration::from_secs(ctx.settings.worker.job_timeout_secs + 60);
    match crate::service::status::enter_in_flight(&ctx.redis, &t.key, max, lapse).await {
        Ok(true) => {}
        Ok(false) => {
            info!(max, "the tenant has max_jobs_in_flight running: postponed");
            return JobOutcome::Busy;
        }
        Err(e) => {
            ctx.metrics
                .redis_errors
                .with_label_values(&["in_flight"])
                .inc();
            warn!(error = %e, "in-flight count unavailable: running uncounted");
        }
    }
    let outcome = with_lock(ctx, t, msg, progress, lock).await;
    crate::service::status::leave_in_flight(&ctx.redis, &t.key).await;
    outcome
}

async fn with_lock(
    ctx: &Arc<Context>,
    t: &Taken,
    msg: &Incoming<'_>,
    progress: &ProgressTx,
    lock: Option<&JobLock>,
) -> JobOutcome {
    let attempt = msg.attempt;
    let (job, key) = (&t.job, t.result_key.as_str());
    // Idempotency, checked under the lock: a finished job (succeeded or failed) is not worked
    // again; its stored result is published again.
    match ctx.storage.get(key).await {
        Ok(Some(bytes)) => match serde_json::from_slice::<ResultEvent>(&bytes) {
            Ok(event) => {
                info!(status = %event.status, "result.json exists: re-publishing the stored result, not generating again");
                return JobOutcome::AlreadyFinished(event);
            }
            Err(_) => warn!("result.json exists but is unreadable: generating again"),
        },
        Ok(None) => {}
        Err(e) => return failed(ctx, t, attempt, storage_error(e)),
    }
    // A job cancelled while it was queued is dropped here, before any work.
    if crate::service::status::cancel_requested(&ctx.redis, &t.key).await {
        return cancelled(ctx, t, attempt, "while queued").await;
    }
    // Not started in time: a first attempt past the job's `expires_at` ends here.
    if let Some(at) = t.job.expires_at_ms.filter(|_| attempt == 1) {
        let now = crate::service::amqp::now_unix().saturating_mul(1000);
        if now > at {
            return ended_early(
                ctx,
                t,
                attempt,
                Outcome::Expired,
                ErrorKind::Expired,
                "expired before a worker started it",
                "before it started",
            )
            .await;
        }
    }
    if ctx.is_stopping() {
        return JobOutcome::HandBack;
    }
    // `running` only once this worker holds the job and it is not finished already: a
    // postponed or re-published delivery must not overwrite the state of the real run.
    crate::service::status::record(
        &ctx.redis,
        Duration::from_secs(ctx.settings.redis.status_ttl_secs),
        crate::service::status::Update {
            job: &t.key,
            state: JobState::Running,
            attempt,
            worker: &ctx.worker_name,
            reason: None,
            result: None,
        },
    )
    .await;
    let _ = progress.send(Notice::Started {
        job: t.key.clone(),
        attempt,
        webhook: job.webhook.clone().map(Arc::new),
        trace_id: t.trace_id.clone(),
    });
    let started = Instant::now();
    let planned = tokio::select! {
        p = plan(ctx, job).instrument(tracing::info_span!("plan")) => p,
        () = ctx.stopped() => return JobOutcome::HandBack,
    };
    let (mode, plan_json) = match planned {
        Ok(x) => x,
        Err(e) => return failed(ctx, t, attempt, e),
    };
    let plan_time = started.elapsed();
    info!(mode = mode.name(), images = job.num_images, "generating");
    let images = match generate(ctx, t, mode, attempt, progress).await {
        Ok(images) => images,
        Err(Halt::Cancelled) => return cancelled(ctx, t, attempt, "while running").await,
        Err(Halt::Stopping) => return JobOutcome::HandBack,
        Err(Halt::Failed(e)) => return failed(ctx, t, attempt, e),
    };
    // A request that came after the last step still wins over storing the images.
    if crate::service::status::cancel_requested(&ctx.redis, &t.key).await {
        return cancelled(ctx, t, attempt, "after generating, before storing").await;
    }
    if lock.is_some_and(JobLock::is_lost) {
        warn!("the job's lock was lost while generating: postponed (its holder finishes it)");
        return JobOutcome::Busy;
    }
    let upload_started = Instant::now();
    let outputs = match upload(ctx, job, key, images.iter())
        .instrument(tracing::info_span!("upload"))
        .await
    {
        Ok(o) => o,
        Err(e) => return failed(ctx, t, attempt, e),
    };
    let mut stages = vec![("plan", plan_time)];
    let timings = total_timings(&images);
    stages.extend([("encode", timings.encode), ("denoise", timings.denoise)]);
    if !timings.guidance.is_zero() {
        // R2F+ bbox guidance, apart from the denoising it precedes.
        stages.push(("guidance", timings.guidance));
    }
    stages.extend([
        ("decode", timings.decode),
        ("upload", upload_started.elapsed()),
    ]);
    let total = started.elapsed();
    observe(ctx, &stages, &images, msg.queue_ms, total);
    let mut timings_ms: BTreeMap<String, u64> = stages
        .iter()
        .map(|(n, d)| (n.to_string(), ms(*d)))
        .collect();
    timings_ms.insert("queue".into(), msg.queue_ms);
    timings_ms.insert("total".into(), ms(total));
    let event = ResultEvent {
        outputs,
        plan: plan_json,
        timings_ms,
        ..t.event(ctx, Outcome::Succeeded, attempt)
    };
    // result.json before the event and the ack: a redelivery after a crash finds it.
    if let Err(e) = store_result(ctx, key, &event).await {
        return failed(ctx, t, attempt, e);
    }
    info!(
        outputs = event.outputs.len(),
        total_ms = ms(total),
        "job succeeded"
    );
    JobOutcome::Succeeded(event)
}

/// A cancelled job: `result.json` records it (a redelivery or the same id sent again publishes
/// it again instead of running), no image is stored.
async fn cancelled(ctx: &Context, t: &Taken, attempt: u32, when: &str) -> JobOutcome {
    ended_early(
        ctx,
        t,
        attempt,
        Outcome::Cancelled,
        ErrorKind::Cancelled,
        "cancelled by request",
        when,
    )
    .await
}

/// A job that ends without its images (cancelled, expired): `result.json` records it.
async fn ended_early(
    ctx: &Context,
    t: &Taken,
    attempt: u32,
    outcome: Outcome,
    kind: ErrorKind,
    message: &str,
    when: &str,
) -> JobOutcome {
    let event = ResultEvent {
        error: Some(crate::job::EventError {
            kind,
            message: message.into(),
        }),
        ..t.event(ctx, outcome, attempt)
    };
    if let Err(e) = store_result(ctx, &t.result_key, &event).await {
        return failed(ctx, t, attempt, e);
    }
    info!(when, status = %outcome, "job ended without generating");
    JobOutcome::Cancelled(event)
}

/// A planner failure as a job error: the LLM refusing this worker is the worker's fault,
/// an outage transient, a bad answer the job's.
fn plan_error(e: crate::service::planner::PlanError) -> JobError {
    let fault = if e.planner_fault {
        Fault::Worker
    } else if e.transient {
        Fault::Transient
    } else {
        Fault::Job
    };
    JobError::new(ErrorKind::Llm, fault, e.message)
}

/// The mode to run and the plan to report: the job's own plan, or one from the planner.
async fn plan(
    ctx: &Context,
    job: &ValidJob,
) -> Result<(Mode, Option<serde_json::Value>), JobError> {
    let mode = job.spec.mode();
    let planned = if job.spec.needs_planner() {
        let Some(planner) = &ctx.planner else {
            // Rejected in `run_job` before any work.
            return Err(JobError::new(
                ErrorKind::InvalidJob,
                Fault::Job,
                format!("mode {mode} without a plan needs the LLM planner"),
            ));
        };
        let plan = if mode == JobMode::R2fplus {
            Plan::Regions(
                planner
                    .plan_regions(&job.prompt, &ctx.metrics)
                    .await
                    .map_err(plan_error)?,
            )
        } else {
            Plan::R2f(
                planner
                    .plan(&job.prompt, &ctx.metrics)
                    .await
                    .map_err(plan_error)?,
            )
        };
        if let Err(reason) = plan.check_limits(&ctx.settings.limits.plan()) {
            return Err(JobError::new(
                ErrorKind::Llm,
                Fault::Job,
                format!("the planner's plan is unusable: {reason}"),
            ));
        }
        Some(plan)
    } else {
        None
    };
    let mode = job
        .spec
        .clone()
        .into_mode(planned)
        .map_err(|e| JobError::new(ErrorKind::Llm, Fault::Job, e))?;
    let json = mode.plan_json();
    Ok((mode, json))
}

/// Why [`generate`] gave no images.
enum Halt {
    Failed(JobError),
    Cancelled,
    /// The worker is stopping: the job goes back to the queue.
    Stopping,
}

/// Stops the GPU task of a job whose future is dropped before the task finished: the job ran
/// past `job_timeout_secs` and was abandoned. The GPU thread stops it at its next step; until
/// then /healthz fails.
struct AbandonOnDrop<'a> {
    control: Arc<TaskControl>,
    ctx: &'a Context,
    armed: bool,
}

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed && !self.control.is_finished() {
            self.control.stop(StopReason::Abandoned);
            self.ctx.metrics.set_abandoned(self.control.clone());
        }
    }
}

/// Generates on the GPU thread, forwarding progress and watching for a cancellation request
/// (one Redis read per `worker.cancel_poll_ms`; the GPU thread reads the stop flag between
/// steps without synchronising the device).
async fn generate(
    ctx: &Context,
    t: &Taken,
    mode: Mode,
    attempt: u32,
    progress: &ProgressTx,
) -> Result<Vec<GeneratedImage>, Halt> {
    let job = &t.job;
    let (step_tx, mut step_rx) = mpsc::unbounded_channel::<(usize, usize)>();
    let (reply_tx, reply_rx) = oneshot::channel();
    let control = TaskControl::new();
    let task = GpuTask {
        model_name: ctx.settings.worker.model.clone(),
        prompt: job.prompt.clone(),
        mode,
        params: job.params.clone(),
        num_images: job.num_images,
        encoding: job.encoding,
        c2pa: job.c2pa.unwrap_or(ctx.settings.c2pa.sign_by_default),
        progress: step_tx,
        control: control.clone(),
        reply: reply_tx,
        span: tracing::Span::current(),
    };
    if ctx.gpu.submit(task).is_err() {
        return Err(Halt::Failed(gpu_thread_gone()));
    }
    let mut guard = AbandonOnDrop {
        control: control.clone(),
        ctx,
        armed: true,
    };
    let forward = {
        let progress = progress.clone();
        let key = t.key.clone();
        let webhook = job.webhook.clone().map(Arc::new);
        let trace_id = t.trace_id.clone();
        async move {
            while let Some((step, steps)) = step_rx.recv().await {
                let _ = progress.send(Notice::Progress {
                    job: key.clone(),
                    attempt,
                    step,
                    steps,
                    webhook: webhook.clone(),
                    trace_id: trace_id.clone(),
                });
            }
        }
    };
    let watch_cancel = async {
        let every = Duration::from_millis(ctx.settings.worker.cancel_poll_ms.max(50));
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = ctx.stopped() => {
                    info!("the worker is stopping: stopping the job at the next denoising step");
                    control.stop(StopReason::Stopping);
                    break;
                }
            }
            if crate::service::status::cancel_requested(&ctx.redis, &t.key).await {
                info!("cancellation requested: stopping at the next denoising step");
                control.stop(StopReason::Cancelled);
                break;
            }
        }
        // The GPU thread answers once it has stopped; the reply ends the select.
        std::future::pending::<std::convert::Infallible>().await
    };
    let (reply, ()) = tokio::select! {
        r = async { tokio::join!(reply_rx, forward) } => r,
        never = watch_cancel => match never {},
    };
    guard.armed = false;
    match reply {
        Ok(Ok(images)) => Ok(images),
        Ok(Err(GpuFailure::Stopped(StopReason::Cancelled))) => Err(Halt::Cancelled),
        Ok(Err(GpuFailure::Stopped(StopReason::Stopping))) => Err(Halt::Stopping),
        Ok(Err(GpuFailure::Stopped(StopReason::Abandoned))) => Err(Halt::Failed(JobError::new(
            ErrorKind::Internal,
            Fault::Transient,
            "the generation was stopped past job_timeout_secs",
        ))),
        Ok(Err(GpuFailure::Job(msg))) => Err(Halt::Failed(JobError::new(
            ErrorKind::Model,
            Fault::Transient,
            msg,
        ))),
        Ok(Err(GpuFailure::Device(msg))) => Err(Halt::Failed(JobError::new(
            ErrorKind::Model,
            Fault::Worker,
            msg,
        ))),
        Err(_) => Err(Halt::Failed(gpu_thread_gone())),
    }
}

fn gpu_thread_gone() -> JobError {
    JobError::new(
        ErrorKind::Internal,
        Fault::Worker,
        "the GPU thread has stopped",
    )
}

fn observe(
    ctx: &Context,
    stages: &[(&str, Duration)],
    images: &[GeneratedImage],
    queue_ms: u64,
    total: Duration,
) {
    let m = &ctx.metrics;
    let model = &ctx.settings.worker.model;
    m.stage_seconds
        .with_label_values(&[model, "queue"])
        .observe(queue_ms as f64 / 1e3);
    for (name, d) in stages {
        m.stage_seconds
            .with_label_values(&[model.as_str(), name])
            .observe(d.as_secs_f64());
    }
    m.stage_seconds
        .with_label_values(&[model, "total"])
        .observe(total.as_secs_f64());
    for img in images {
        if img.steps > 0 {
            m.denoise_step_seconds
                .with_label_values(&[model])
                .observe(img.timings.denoise.as_secs_f64() / img.steps as f64);
        }
    }
    m.images
        .with_label_values(&[model])
        .inc_by(images.len() as u64);
}
