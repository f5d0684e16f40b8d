//! The broker session: channels, the consumer, the delivery loop (select → run → settle), and
//! the pause a sick worker takes. A broker error ends the session; the caller reconnects.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::sync::mpsc;
use tracing::{error, info, warn, Instrument};

use super::context::{count_job, AbortOnDrop, Context};
use super::lifecycle::{run_job, Incoming, Notice, ProgressTx};
use super::outcome::{decide, Fault, JobError, JobOutcome, Settlement};
use super::settle::{self, attempt_of, best_effort_id_bounded, deliveries_of, record_status};
use super::shutdown::Shutdown;
use crate::job::{ErrorKind, Outcome, ProgressEvent, ResultEvent, StartedEvent, WebhookEvent};
use crate::service::amqp::{self, amqp_error, json_props};
use crate::service::backoff::Breaker;
use crate::service::status::Progress;
use crate::service::telemetry::{self, TraceHeaders};
use crate::service::tenancy::{JobKey, Scope};
use crate::service::webhook::Delivery as WebhookDelivery;

/// A session's broker state: two connections, one that consumes and acks and one that
/// publishes, so that a broker blocking publishers (a memory or disk alarm) never holds up an
/// ack or the consumers.
pub struct Session {
    _conn: lapin::Connection,
    /// The publishing connection: `publish`, `progress` and `reply` live on it.
    publish_conn: lapin::Connection,
    consume: Channel,
    /// Confirmed publishes: events, retries, dead letters.
    publish: Channel,
    /// Progress events: no confirms, so nothing is kept per event.
    progress: Channel,
    /// Replies to `reply_to` queues: no confirms, and a channel error there costs no job.
    reply: Channel,
    consumer: lapin::Consumer,
    tag: String,
    /// The consumer `tag` was cancelled (a drain began while a job was in hand).
    cancelled: bool,
    /// The consumers of the side tasks, each on a channel of its own: the inbox router (see
    /// [`super::router`]), control messages ([`super::control`]) and the webhook outbox
    /// ([`super::outbox`]; only where this worker sends webhooks).
    sides: Option<Sides>,
    _side_channels: Vec<Channel>,
}

struct Sides {
    inbox: lapin::Consumer,
    control: lapin::Consumer,
    outbox: Option<lapin::Consumer>,
}

/// How a session ended.
pub enum SessionEnd {
    /// Shutdown requested and the job in hand settled.
    Drained,
    /// The broker connection broke (or a confirm timed out).
    Broken(anyhow::Error),
}

impl Session {
    pub async fn open(ctx: &Context) -> anyhow::Result<Self> {
        let s = &ctx.settings.amqp;
        let conn = amqp::connect(s, &format!("r2f-worker {} consume", ctx.worker_name)).await?;
        let publish_conn =
            amqp::connect(s, &format!("r2f-worker {} publish", ctx.worker_name)).await?;
        let consume = conn.create_channel().await.map_err(amqp_error)?;
        let publish = amqp::confirm_channel(&publish_conn).await?;
        let progress = publish_conn.create_channel().await.map_err(amqp_error)?;
        let reply = publish_conn.create_channel().await.map_err(amqp_error)?;
        let model = &ctx.settings.worker.model;
        amqp::declare_topology(&publish, s, &ctx.models).await?;
        amqp::declare_retry_levels(&publish, s, model, ctx.settings.worker.max_attempts).await?;
        consume
            .basic_qos(
                ctx.settings.worker.prefetch,
                BasicQosOptions { global: false },
            )
            .await
            .map_err(amqp_error)?;
        let tag = format!("r2f-{}-{}", ctx.worker_name, uuid::Uuid::new_v4().simple());
        let consumer = start_consumer(&consume, &s.queue_of(model), &tag).await?;
        // Routing is cheap: many inbox messages in flight at once.
        let inbox_channel = conn.create_channel().await.map_err(amqp_error)?;
        inbox_channel
            .basic_qos(32, BasicQosOptions { global: false })
            .await
            .map_err(amqp_error)?;
        let inbox_tag = format!("{tag}-inbox");
        let inbox = start_consumer(&inbox_channel, &s.inbox_queue, &inbox_tag).await?;
        let control_channel = conn.create_channel().await.map_err(amqp_error)?;
        control_channel
            .basic_qos(8, BasicQosOptions { global: false })
            .await
            .map_err(amqp_error)?;
        let control = start_consumer(
            &control_channel,
            &s.control_queue,
            &format!("{tag}-control"),
        )
        .await?;
        let mut side_channels = vec![inbox_channel, control_channel];
        let outbox = match &ctx.webhooks {
            Some(sender) => {
                let ch = conn.create_channel().await.map_err(amqp_error)?;
                let prefetch = sender.settings().max_in_flight.clamp(1, u16::MAX as usize) as u16;
                ch.basic_qos(prefetch, BasicQosOptions { global: false })
                    .await
                    .map_err(amqp_error)?;
                let c = start_consumer(&ch, &s.webhooks_queue, &format!("{tag}-outbox")).await?;
                side_channels.push(ch);
                Some(c)
            }
            None => None,
        };
        Ok(Self {
            _conn: conn,
            publish_conn,
            consume,
            publish,
            progress,
            reply,
            consumer,
            tag,
            cancelled: false,
            sides: Some(Sides {
                inbox,
                control,
                outbox,
            }),
            _side_channels: side_channels,
        })
    }

    /// Consumes until drained or broken.
    pub async fn run(mut self, ctx: &Arc<Context>, shutdown: &mut Shutdown) -> SessionEnd {
        let progress = spawn_progress_publisher(ctx, &self);
        let _blocked = watch_blocked(ctx, &self.publish_conn, self.progress.clone());
        let Some(sides) = self.sides.take() else {
            return SessionEnd::Broken(anyhow::anyhow!("session run twice"));
        };
        // The side tasks end with the session; the first of them to stop breaks it.
        let mut router = AbortOnDrop(tokio::spawn({
            let router = super::router::run(
                ctx.clone(),
                sides.inbox,
                self.publish.clone(),
                self.reply.clone(),
            );
            let control = super::control::run(ctx.clone(), sides.control, self.reply.clone());
            let outbox = sides
                .outbox
                .map(|c| super::outbox::run(ctx.clone(), c, self.publish.clone()));
            async move {
                let outbox = async move {
                    match outbox {
                        Some(o) => o.await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    e = router => e,
                    e = control => e,
                    e = outbox => e,
                }
            }
        }));
        let mut breaker = Breaker::new(
            ctx.settings.worker.pause_after_failures,
            Duration::from_secs(ctx.settings.worker.pause_min_secs),
            Duration::from_secs(ctx.settings.worker.pause_max_secs.max(1)),
        );
        let end = loop {
            let next = tokio::select! {
                d = self.consumer.next() => d,
                _ = shutdown.requested() => break SessionEnd::Drained,
                e = &mut router.0 => break SessionEnd::Broken(match e {
                    Ok(e) => e,
                    Err(e) => anyhow::anyhow!("a side task (inbox, control, outbox) stopped: {e}"),
                }),
            };
            // While the broker blocks publishing, a job could not be settled: take none.
            if ctx.metrics.broker_blocked.get() != 0 {
                info!("the broker blocks publishing (memory or disk alarm): waiting before taking a job");
                while ctx.metrics.broker_blocked.get() != 0 && !shutdown.is_requested() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => break SessionEnd::Broken(amqp_error(e)),
                None => {
                    break SessionEnd::Broken(anyhow::anyhow!("consumer cancelled by the broker"))
                }
            };
            // A drain that begins while the job runs stops the consumer at once: nothing more is
            // delivered to this worker (not even the job it may hand back).
            let mut cancel_sent = false;
            let handled = {
                let handled = self.handle(ctx, &delivery, &progress, &mut breaker);
                tokio::pin!(handled);
                loop {
                    tokio::select! {
                        r = &mut handled => break r,
                        _ = shutdown.requested(), if !cancel_sent => {
                            cancel_sent = true;
                            if let Err(e) = self
                                .consume
                                .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
                                .await
                            {
                                warn!(error = %amqp_error(e), "cancelling the consumer failed");
                                cancel_sent = false;
                            }
                        }
                    }
                }
            };
            self.cancelled |= cancel_sent;
            let pause = match handled {
                Ok(pause) => pause,
                Err(e) => break SessionEnd::Broken(e),
            };
            if shutdown.is_requested() {
                break SessionEnd::Drained;
            }
            if let Some((pause, kind)) = pause {
                if let Err(e) = self.pause(ctx, pause, kind, shutdown).await {
                    break SessionEnd::Broken(e);
                }
                if shutdown.is_requested() {
                    break SessionEnd::Drained;
                }
            }
        };
        if let SessionEnd::Drained = end {
            let _ = self.stop_consuming(ctx).await;
            let _ = self.consume.close(200, "drained".into()).await;
            let _ = self.publish.close(200, "drained".into()).await;
        }
        ctx.metrics.broker_blocked.set(0);
        end
    }

    /// One delivery: count a redelivery, or run the job and settle it. Returns a pause when the
    /// breaker trips.
    async fn handle(
        &self,
        ctx: &Arc<Context>,
        d: &Delivery,
        progress: &ProgressTx,
        breaker: &mut Breaker,
    ) -> anyhow::Result<Option<(Duration, ErrorKind)>> {
        let attempt = attempt_of(d);
        let scope = ctx.scope_of(d);
        if d.redelivered {
            // Delivered before and never settled: the worker holding it died or lost its
            // connection. Count that on the message itself before touching its content.
            let deliveries = deliveries_of(d) + 1;
            let id = best_effort_id_bounded(ctx, &d.data);
            if deliveries >= ctx.settings.worker.max_attempts {
                let outcome = JobOutcome::Poison { id, deliveries };
                let s = decide(outcome, attempt, ctx.settings.worker.max_attempts);
                count_job(ctx, None, Outcome::Failed);
                record_status(ctx, d, attempt, &s, scope.as_ref().ok()).await;
                let scope = scope.as_ref().ok();
                // Its failure is stored like any other: `result.json` says what became of it.
                let result_key =
                    scope.and_then(|s| super::lifecycle::result_key_of(ctx, s, &d.data));
                settle::settle(
                    ctx,
                    &self.publish,
                    &self.reply,
                    d,
                    attempt,
                    s,
                    result_key.as_deref(),
                    scope,
                )
                .await?;
            } else {
                warn!(
                    job_id = id.as_deref().unwrap_or("-"),
                    deliveries, "redelivered without being settled: counted and put back"
                );
                settle::count_redelivery(ctx, &self.publish, d, deliveries).await?;
            }
            return Ok(None);
        }
        let queue_ms = d
            .properties
            .timestamp()
            .map(|t| amqp::now_unix().saturating_sub(t) * 1000)
            .unwrap_or(0);
        // The job's span continues the trace of whoever published it.
        let span = tracing::info_span!(
            "job",
            job_id = tracing::field::Empty,
            attempt,
            trace_id = tracing::field::Empty,
        );
        let trace_id = telemetry::adopt(&span, TraceHeaders::from_amqp(&d.properties).as_ref());
        let incoming = Incoming {
            body: &d.data,
            attempt,
            queue_ms,
            routed: settle::was_routed(d),
            scope: scope.clone(),
            trace_id,
        };
        ctx.metrics.jobs_in_progress.inc();
        ctx.metrics.job_started.set(amqp::now_unix() as f64);
        let limit = Duration::from_secs(ctx.settings.worker.job_timeout_secs);
        let run = run_job(ctx, incoming, progress).instrument(span.clone());
        let (outcome, info) = match tokio::time::timeout(limit, run).await {
            Ok(x) => x,
            Err(_) => {
                // Dropping the job's future asked its GPU task to stop at the next denoising
                // step; until the GPU thread lets go of it /healthz fails. The job is retried.
                error!(
                    timeout_secs = limit.as_secs(),
                    "job ran past job_timeout_secs: abandoned"
                );
                let event = ResultEvent {
                    id: best_effort_id_bounded(ctx, &d.data).unwrap_or_default(),
                    tenant: scope
                        .as_ref()
                        .ok()
                        .and_then(Scope::name)
                        .map(str::to_string),
                    status: Outcome::Failed,
                    attempt,
                    outputs: vec![],
                    plan: None,
                    timings_ms: Default::default(),
                    error: None,
                    worker: ctx.worker_name.clone(),
                    trace_id: None,
                };
                // Transient, not the worker's: a job that outlives the limit on every worker
                // is dead-lettered after max_attempts instead of circulating forever.
                let error = JobError::new(
                    ErrorKind::Internal,
                    Fault::Transient,
                    format!("the job ran past job_timeout_secs ({} s)", limit.as_secs()),
                );
                (JobOutcome::Failed { event, error }, Default::default())
            }
        };
        ctx.metrics.jobs_in_progress.dec();
        ctx.metrics.job_started.set(0.0);

        if let JobOutcome::Failed { event, error } = &outcome {
            // The whole detail goes to the log; clients get a short reason.
            warn!(job_id = %event.id, attempt, kind = error.kind.name(), fault = ?error.fault, detail = ?error.detail, "attempt failed");
        }
        // The breaker sees every outcome: failures that are not the job's own count.
        let pause = match &outcome {
            JobOutcome::Failed { error, .. } if error.fault != Fault::Job => {
                breaker.failure().map(|p| (p, error.kind))
            }
            JobOutcome::Busy | JobOutcome::HandBack => None,
            _ => {
                breaker.success();
                None
            }
        };
        let status = match &outcome {
            JobOutcome::Succeeded(_) => Some(Outcome::Succeeded),
            JobOutcome::Rejected { .. } => Some(Outcome::Rejected),
            JobOutcome::Cancelled(e) => Some(e.status),
            _ => None,
        };
        let settlement = decide(outcome, attempt, ctx.settings.worker.max_attempts);
        let status = status.or(match &settlement {
            Settlement::DeadLetter { event, .. } => Some(event.status),
            _ => None,
        });
        if let Some(status) = status {
            count_job(ctx, info.mode, status);
        }
        let scope = scope.as_ref().ok();
        async {
            record_status(ctx, d, attempt, &settlement, scope).await;
            settle::settle(
                ctx,
                &self.publish,
                &self.reply,
                d,
                attempt,
                settlement,
                info.result_key.as_deref(),
                scope,
            )
            .await
        }
        .instrument(span)
        .await?;
        Ok(pause)
    }

    /// Stops consuming for `pause` (readiness fails meanwhile), giving back what was prefetched,
    /// then consumes again; the first job after the pause probes the dependency.
    async fn pause(
        &mut self,
        ctx: &Context,
        pause: Duration,
        kind: ErrorKind,
        shutdown: &mut Shutdown,
    ) -> anyhow::Result<()> {
        warn!(
            pause_secs = pause.as_secs_f64(),
            kind = kind.name(),
            "failures that are not the jobs' fault in a row: pausing consumption (jobs stay queued)"
        );
        ctx.metrics.pauses.with_label_values(&[kind.name()]).inc();
        ctx.metrics.paused.set(1);
        self.stop_consuming(ctx).await?;
        let until = Instant::now() + pause;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {},
                _ = shutdown.requested() => break,
            }
            // A job stuck on the GPU keeps the worker out until the GPU is free.
            if !ctx.metrics.is_stuck() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        ctx.metrics.paused.set(0);
        if shutdown.is_requested() {
            return Ok(());
        }
        self.tag = format!("r2f-{}-{}", ctx.worker_name, uuid::Uuid::new_v4().simple());
        self.cancelled = false;
        let queue = ctx.settings.amqp.queue_of(&ctx.settings.worker.model);
        self.consumer = start_consumer(&self.consume, &queue, &self.tag).await?;
        info!("consuming again after the pause");
        Ok(())
    }

    /// Cancels the consumer and gives back whatever was prefetched but not worked.
    async fn stop_consuming(&mut self, ctx: &Context) -> anyhow::Result<()> {
        if !self.cancelled {
            self.consume
                .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
                .await
                .map_err(amqp_error)?;
            self.cancelled = true;
        }
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_millis(200), self.consumer.next()).await
        {
            settle::give_back_unworked(ctx, &self.publish, &d).await?;
        }
        Ok(())
    }
}

pub(super) async fn start_consumer(
    ch: &Channel,
    queue: &str,
    tag: &str,
) -> anyhow::Result<lapin::Consumer> {
    ch.basic_consume(
        queue.into(),
        tag.into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(amqp_error)
}

/// Start and progress events, progress throttled to `progress_interval_ms`, on their own
/// channel without confirms: best effort, and nothing accumulates per event. Routed
/// `job.started` / `job.progress` (`job.<kind>.<tenant>.<id>` in a multi-tenant fleet); a job
/// whose webhook asks for them gets them there too, through the outbox.
/// Follows whether the broker blocks the publishing connection (`connection.blocked`: a memory
/// or disk alarm) into `r2f_broker_blocked` and `/readyz`. RabbitMQ tells a connection only once
/// it publishes, so an idle worker publishes an empty, unroutable probe every few seconds.
fn watch_blocked(ctx: &Arc<Context>, conn: &lapin::Connection, probe: Channel) -> AbortOnDrop<()> {
    let status = conn.status().clone();
    let metrics = ctx.metrics.clone();
    AbortOnDrop(tokio::spawn(async move {
        let mut last_probe = Instant::now() - Duration::from_secs(60);
        let mut was = false;
        loop {
            let blocked = status.blocked();
            if blocked != was {
                if blocked {
                    warn!("the broker blocks publishing (memory or disk alarm): not ready, taking no job");
                } else {
                    info!("the broker publishes again: ready");
                }
                was = blocked;
            }
            metrics.broker_blocked.set(i64::from(blocked));
            if !blocked && last_probe.elapsed() >= Duration::from_secs(3) {
                last_probe = Instant::now();
                let _ = probe
                    .basic_publish(
                        "".into(),
                        "r2f.alarm-probe".into(),
                        lapin::options::BasicPublishOptions::default(),
                        b"",
                        lapin::BasicProperties::default(),
                    )
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }))
}

fn spawn_progress_publisher(ctx: &Arc<Context>, session: &Session) -> ProgressTx {
    let (tx, mut rx) = mpsc::unbounded_channel::<Notice>();
    let ch = session.progress.clone();
    let ctx = ctx.clone();
    let exchange = ctx.settings.amqp.events_exchange.clone();
    let interval = Duration::from_millis(ctx.settings.worker.progress_interval_ms);
    let status_ttl = Duration::from_secs(ctx.settings.redis.status_ttl_secs);
    tokio::spawn(async move {
        let mut last: Option<(JobKey, Instant)> = None;
        // The first progress of the run in hand: the pace since then gives the estimate.
        let mut first: Option<(JobKey, u32, usize, Instant)> = None;
        while let Some(notice) = rx.recv().await {
            let (job, kind, body, webhook, nth) = match notice {
                Notice::Started {
                    job,
                    attempt,
                    webhook,
                    trace_id,
                } => {
                    first = None;
                    let event = StartedEvent {
                        id: job.id.clone(),
                        tenant: job.scope.name().map(str::to_string),
                        attempt,
                        worker: ctx.worker_name.clone(),
                        trace_id,
                    };
                    let body = serde_json::to_value(&event).unwrap_or_default();
                    (
                        job,
                        WebhookEvent::Started,
                        body,
                        webhook,
                        u64::from(attempt),
                    )
                }
                Notice::Progress {
                    job,
                    attempt,
                    step,
                    steps,
                    webhook,
                    trace_id,
                } => {
                    let now = Instant::now();
                    let same_run = matches!(&first, Some((k, a, s0, _)) if *k == job && *a == attempt && *s0 <= step);
                    if !same_run {
                        first = Some((job.clone(), attempt, step, now));
                    }
                    let (step0, t0) = first.as_ref().map_or((step, now), |f| (f.2, f.3));
                    let due = match &last {
                        Some((last_job, at)) if *last_job == job => {
                            at.elapsed() >= interval || step == steps
                        }
                        _ => true,
                    };
                    if !due {
                        continue;
                    }
                    last = Some((job.clone(), now));
                    // Time per step since the first progress of this run, times the steps left.
                    let eta_ms = (step > step0).then(|| {
                        let per_step = t0.elapsed().as_secs_f64() / (step - step0) as f64;
                        (per_step * steps.saturating_sub(step) as f64 * 1e3) as u64
                    });
                    let p = Progress {
                        attempt,
                        step,
                        steps,
                        eta_ms,
                    };
                    crate::service::status::progress(&ctx.redis, status_ttl, &job, p).await;
                    let event = ProgressEvent {
                        id: job.id.clone(),
                        tenant: job.scope.name().map(str::to_string),
                        step,
                        steps,
                        attempt,
                        eta_ms,
                        trace_id,
                    };
                    let body = serde_json::to_value(&event).unwrap_or_default();
                    (job, WebhookEvent::Progress, body, webhook, step as u64)
                }
            };
            let key = job.scope.notice_key(kind.name(), &job.id);
            let _ = ch
                .basic_publish(
                    exchange.as_str().into(),
                    key.as_str().into(),
                    Default::default(),
                    body.to_string().as_bytes(),
                    json_props().with_delivery_mode(1),
                )
                .await;
            if let (Some(spec), Some(_)) = (webhook, &ctx.webhooks) {
                if let Some(d) = WebhookDelivery::of(&job.scope, &job.id, &spec, kind, nth, &body) {
                    super::outbox::enqueue_unconfirmed(&ctx, &ch, &d).await;
                }
            }
        }
    });
    tx
}
