//! `r2f worker`: consume jobs from RabbitMQ, generate, store, publish results.
//!
//! A job is acked only after its outputs and `result.json` are stored and its result event is
//! confirmed by the broker. Invalid jobs are dead-lettered at once with their reason; transient
//! failures (storage, broker, LLM) are retried through a TTL queue with backoff up to
//! `max_attempts`; a redelivered job whose `result.json` exists is not generated again.

pub mod amqp;
pub mod gpu;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn, Instrument};

use crate::config::{redact_text, Settings};
use crate::generate::Mode;
use crate::job::{
    best_effort_id, validate_message, ErrorKind, EventError, OutputImage, ProgressEvent,
    ResultEvent, ValidJob,
};
use crate::metrics::Metrics;
use crate::plan::Plan;
use crate::redis_store::RedisStore;
use crate::storage::{join_key, Storage};
use amqp::{amqp_error, json_props, publish_confirmed};
use gpu::{ms, total_timings, GpuTask, GpuWorker};

/// Shutdown requests: 0 running, 1 drain (first signal), 2 immediate (second signal).
pub type Shutdown = watch::Receiver<u8>;

/// Installs SIGTERM/SIGINT handling: the first signal drains, the second exits at once without
/// acking (the job in hand is redelivered by the broker).
pub fn shutdown_signal() -> Shutdown {
    let (tx, rx) = watch::channel(0u8);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            error!("cannot install signal handlers");
            return;
        };
        for n in 1u8..=2 {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            if n == 1 {
                info!("signal received: draining (finishing the job in hand, then exiting)");
                let _ = tx.send(1);
            } else {
                warn!("second signal: exiting now without acking");
                std::process::exit(130);
            }
        }
    });
    rx
}

/// Why a job did not succeed.
struct JobFailure {
    kind: ErrorKind,
    message: String,
    /// Retry later (transient) or give up now.
    transient: bool,
}

impl JobFailure {
    fn transient(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            transient: true,
        }
    }
    fn fatal(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            transient: false,
        }
    }
}

/// What to do with a delivery once handled.
enum Outcome {
    Ack,
    /// Put back for another worker (a duplicate in progress elsewhere).
    Requeue,
    /// The broker connection broke: leave the delivery unacked, reconnect.
    Reconnect(anyhow::Error),
}

pub struct Worker {
    settings: Settings,
    metrics: Arc<Metrics>,
    storage: Box<dyn Storage>,
    redis: RedisStore,
    gpu: GpuWorker,
    worker_name: String,
    planner: Option<Arc<dyn crate::plan::Planner>>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "r2f-worker".into())
}

fn attempt_of(d: &Delivery) -> u32 {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-r2f-attempt").cloned())
        .and_then(|v| match v {
            AMQPValue::LongUInt(n) => Some(n),
            AMQPValue::LongLongInt(n) => Some(n as u32),
            AMQPValue::LongInt(n) => Some(n as u32),
            AMQPValue::ShortUInt(n) => Some(n as u32),
            AMQPValue::ShortShortUInt(n) => Some(n as u32),
            _ => None,
        })
        .unwrap_or(1)
        .max(1)
}

impl Worker {
    /// Starts everything but the consumer: metrics server, model (on the GPU thread), storage,
    /// Redis. Returns once the model is loaded and warm, or when shutdown is requested first.
    pub async fn start(
        settings: Settings,
        shutdown: &mut Shutdown,
        planner: Option<Arc<dyn crate::plan::Planner>>,
    ) -> anyhow::Result<Option<Self>> {
        let metrics = Metrics::new();
        let addr = crate::metrics::serve(metrics.clone(), &settings.metrics.listen).await?;
        info!(%addr, "metrics, /healthz and /readyz listening");
        metrics.init_model(&settings.worker.model, &["r2f", "r2fplus", "plain"]);
        let worker_name = if settings.worker.name.is_empty() {
            hostname()
        } else {
            settings.worker.name.clone()
        };
        info!(model = %settings.worker.model, worker = %worker_name, "loading model");
        let (gpu, ready) = GpuWorker::start(&settings, metrics.clone())?;
        tokio::select! {
            r = ready => {
                r.map_err(|_| anyhow::anyhow!("the GPU thread stopped while loading"))??;
            }
            _ = shutdown.wait_for(|s| *s > 0) => {
                info!("shutdown requested while loading the model");
                return Ok(None);
            }
        }
        metrics.set_ready(true);
        info!("model loaded and warm: ready");
        let storage = crate::storage::from_settings(&settings.storage)
            .await
            .map_err(|e| anyhow::anyhow!("storage: {e}"))?;
        let redis = RedisStore::new(&settings.redis);
        Ok(Some(Self {
            settings,
            metrics,
            storage,
            redis,
            gpu,
            worker_name,
            planner,
        }))
    }

    /// Consumes until drained. Reconnects with backoff whenever the broker connection is lost.
    pub async fn run(self, mut shutdown: Shutdown) -> anyhow::Result<()> {
        let s = &self.settings.amqp;
        let mut backoff = Duration::from_millis(s.reconnect_min_ms);
        let mut connected_before = false;
        loop {
            if *shutdown.borrow() > 0 {
                break;
            }
            let session = match self.open_session().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "broker unavailable");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {},
                        _ = shutdown.wait_for(|s| *s > 0) => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(s.reconnect_max_ms));
                    continue;
                }
            };
            if connected_before {
                self.metrics.amqp_reconnects.inc();
                info!("broker connection re-established");
            } else {
                info!(queue = %s.jobs_queue, "consuming");
            }
            connected_before = true;
            backoff = Duration::from_millis(s.reconnect_min_ms);
            match self.consume(session, &mut shutdown).await {
                Ok(()) => break, // drained
                Err(e) => {
                    warn!(error = %e, "broker connection lost; reconnecting");
                }
            }
        }
        info!("worker stopped");
        Ok(())
    }

    async fn open_session(&self) -> anyhow::Result<Session> {
        let s = &self.settings.amqp;
        let conn = amqp::connect(s, &format!("r2f-worker {}", self.worker_name)).await?;
        let consume = conn.create_channel().await.map_err(amqp_error)?;
        let publish = amqp::confirm_channel(&conn).await?;
        amqp::declare_topology(&publish, s).await?;
        consume
            .basic_qos(
                self.settings.worker.prefetch,
                BasicQosOptions { global: false },
            )
            .await
            .map_err(amqp_error)?;
        let tag = format!("r2f-{}-{}", self.worker_name, uuid::Uuid::new_v4().simple());
        let consumer = consume
            .basic_consume(
                s.jobs_queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp_error)?;
        Ok(Session {
            _conn: conn,
            consume,
            publish,
            consumer,
            tag,
        })
    }

    /// Returns Ok when drained (shutdown), Err when the connection broke.
    async fn consume(&self, mut session: Session, shutdown: &mut Shutdown) -> anyhow::Result<()> {
        // Stop deliveries as soon as a drain starts, even while a job is in hand.
        let cancel_ch = session.consume.clone();
        let cancel_tag = session.tag.clone();
        let mut drain_rx = shutdown.clone();
        let canceller = tokio::spawn(async move {
            if drain_rx.wait_for(|s| *s > 0).await.is_ok() {
                let _ = cancel_ch
                    .basic_cancel(cancel_tag.as_str().into(), BasicCancelOptions::default())
                    .await;
            }
        });
        let result = loop {
            let next = tokio::select! {
                d = session.consumer.next() => d,
                _ = shutdown.wait_for(|s| *s > 0) => break Ok(()),
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => break Err(amqp_error(e)),
                None => {
                    if *shutdown.borrow() > 0 {
                        break Ok(());
                    }
                    break Err(anyhow::anyhow!("consumer cancelled by the broker"));
                }
            };
            match self.handle(&session.publish, &delivery, shutdown).await {
                Outcome::Ack => {
                    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                        break Err(amqp_error(e));
                    }
                }
                Outcome::Requeue => {
                    let opts = BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    };
                    if let Err(e) = delivery.nack(opts).await {
                        break Err(amqp_error(e));
                    }
                }
                Outcome::Reconnect(e) => break Err(e),
            }
            if *shutdown.borrow() > 0 {
                break Ok(());
            }
        };
        canceller.abort();
        if result.is_ok() {
            let _ = session.consume.close(200, "drained".into()).await;
            let _ = session.publish.close(200, "drained".into()).await;
        }
        result
    }

    /// Handles one delivery end to end and says what to do with it.
    async fn handle(&self, publish: &Channel, d: &Delivery, shutdown: &Shutdown) -> Outcome {
        let received = Instant::now();
        let attempt = attempt_of(d);
        let s = &self.settings;
        let known: Vec<String> = vec![s.worker.model.clone()];
        let job = match validate_message(&d.data, &s.limits, &known, &s.worker.model) {
            Ok(j) => j,
            Err(rejection) => {
                let id = best_effort_id(&d.data).unwrap_or_default();
                let span = tracing::info_span!("job", job_id = %id, attempt);
                return self
                    .reject(publish, d, &id, attempt, &rejection.0)
                    .instrument(span)
                    .await;
            }
        };
        let span = tracing::info_span!("job", job_id = %job.id, attempt);
        self.handle_valid(publish, d, job, attempt, received, shutdown)
            .instrument(span)
            .await
    }

    async fn reject(
        &self,
        publish: &Channel,
        d: &Delivery,
        id: &str,
        attempt: u32,
        reason: &str,
    ) -> Outcome {
        warn!(reason = %reason, "job rejected");
        let mode = "unknown";
        self.metrics
            .jobs
            .with_label_values(&[&self.settings.worker.model, mode, "rejected"])
            .inc();
        let event = ResultEvent {
            id: id.to_string(),
            status: "rejected".into(),
            attempt,
            outputs: vec![],
            plan: None,
            timings_ms: BTreeMap::new(),
            error: Some(EventError {
                kind: ErrorKind::InvalidJob,
                message: reason.to_string(),
            }),
            worker: self.worker_name.clone(),
        };
        if let Err(e) = self.publish_event(publish, &event).await {
            return Outcome::Reconnect(e);
        }
        if let Err(e) = self
            .dead_letter(
                publish,
                d,
                ErrorKind::InvalidJob,
                "invalid_job",
                reason,
                attempt,
            )
            .await
        {
            return Outcome::Reconnect(e);
        }
        Outcome::Ack
    }

    async fn publish_event(&self, publish: &Channel, event: &ResultEvent) -> anyhow::Result<()> {
        let body = serde_json::to_vec(event)?;
        let props = json_props()
            .with_message_id(event.id.as_str().into())
            .with_timestamp(amqp::now_unix());
        publish_confirmed(
            publish,
            &self.settings.amqp.events_exchange,
            &format!("job.{}", event.status),
            &body,
            props,
        )
        .await
    }

    /// Publishes the original message with its reason to the dead-letter queue (confirmed).
    async fn dead_letter(
        &self,
        publish: &Channel,
        d: &Delivery,
        kind: ErrorKind,
        reason_label: &str,
        reason: &str,
        attempt: u32,
    ) -> anyhow::Result<()> {
        let mut headers = FieldTable::default();
        headers.insert("x-r2f-reason".into(), amqp::header_str(reason));
        headers.insert("x-r2f-error-kind".into(), amqp::header_str(kind.name()));
        headers.insert("x-r2f-attempt".into(), AMQPValue::LongUInt(attempt));
        headers.insert("x-r2f-worker".into(), amqp::header_str(&self.worker_name));
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers)
            .with_timestamp(amqp::now_unix());
        if let Some(ct) = d.properties.content_type() {
            props = props.with_content_type(ct.clone());
        }
        if let Some(id) = d.properties.message_id() {
            props = props.with_message_id(id.clone());
        }
        publish_confirmed(
            publish,
            "",
            &self.settings.amqp.dead_letter_queue,
            &d.data,
            props,
        )
        .await?;
        self.metrics
            .dead_lettered
            .with_label_values(&[reason_label])
            .inc();
        warn!(reason = %reason, kind = kind.name(), "dead-lettered");
        Ok(())
    }

    /// Schedules another attempt through the retry queue (its TTL is the backoff).
    async fn retry_later(
        &self,
        publish: &Channel,
        d: &Delivery,
        attempt: u32,
        why: &str,
    ) -> anyhow::Result<()> {
        let w = &self.settings.worker;
        let base = w
            .retry_backoff_ms
            .saturating_mul(1u64 << (attempt - 1).min(16));
        let capped = base.min(w.retry_backoff_max_ms).max(1);
        let jitter = 0.8 + rand::random::<f64>() * 0.4;
        let delay = ((capped as f64) * jitter) as u64;
        let mut headers = d.properties.headers().clone().unwrap_or_default();
        headers.insert("x-r2f-attempt".into(), AMQPValue::LongUInt(attempt + 1));
        headers.insert("x-r2f-last-error".into(), amqp::header_str(why));
        let mut props = d
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_expiration(delay.to_string().as_str().into());
        if props.timestamp().is_none() {
            props = props.with_timestamp(amqp::now_unix());
        }
        publish_confirmed(publish, "", &self.settings.amqp.retry_queue, &d.data, props).await?;
        info!(retry_in_ms = delay, next_attempt = attempt + 1, error = %why, "job will be retried");
        Ok(())
    }

    fn result_key(&self, job: &ValidJob) -> String {
        join_key(&[
            &self.settings.storage.prefix,
            &job.prefix,
            &job.id,
            "result.json",
        ])
    }

    async fn handle_valid(
        &self,
        publish: &Channel,
        d: &Delivery,
        job: ValidJob,
        attempt: u32,
        received: Instant,
        shutdown: &Shutdown,
    ) -> Outcome {
        let model = self.settings.worker.model.clone();
        let mode_name = job.mode.name();
        info!(mode = mode_name, model = %model, redelivered = d.redelivered, "job received");

        // Idempotency: a finished job is not generated again; its result is re-published.
        let result_key = self.result_key(&job);
        match self.storage.get(&result_key).await {
            Ok(Some(bytes)) => {
                if let Ok(event) = serde_json::from_slice::<ResultEvent>(&bytes) {
                    info!(
                        "result.json exists: re-publishing the stored result, not generating again"
                    );
                    if let Err(e) = self.publish_event(publish, &event).await {
                        return Outcome::Reconnect(e);
                    }
                    return Outcome::Ack;
                }
                warn!("result.json exists but is unreadable: generating again");
            }
            Ok(None) => {}
            Err(e) => {
                return self
                    .fail_or_retry(
                        publish,
                        d,
                        &job,
                        attempt,
                        JobFailure::transient(ErrorKind::Storage, e.0),
                    )
                    .await
            }
        }

        // One worker at a time per job id.
        let lock_key = self.redis.key(&["job", &job.id, "lock"]);
        let lock_value = format!("{}:{}", self.worker_name, uuid::Uuid::new_v4().simple());
        let lock_ttl = Duration::from_secs(self.settings.redis.lock_ttl_secs.max(5));
        let locked = match self.redis.set_nx(&lock_key, &lock_value, lock_ttl).await {
            Ok(true) => true,
            Ok(false) => {
                info!("job is being processed by another worker: requeued for later");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Outcome::Requeue;
            }
            Err(e) => {
                self.metrics.redis_errors.with_label_values(&["lock"]).inc();
                warn!(error = %e, "job lock unavailable: going on without it");
                false
            }
        };
        // A job redelivered again and again (it crashes its workers) is not retried forever;
        // counted once the lock is ours, so waiting for another worker's lock does not count.
        if d.redelivered {
            let key = self.redis.key(&["job", &job.id, "deliveries"]);
            match self
                .redis
                .incr_with_ttl(&key, Duration::from_secs(86400))
                .await
            {
                Ok(n) if n as u32 >= self.settings.worker.max_attempts => {
                    let msg = format!(
                        "redelivered {n} times without finishing (the worker processing it died each time)"
                    );
                    let outcome = self
                        .fail_or_retry(
                            publish,
                            d,
                            &job,
                            attempt,
                            JobFailure::fatal(ErrorKind::Internal, msg),
                        )
                        .await;
                    if locked {
                        let _ = self.redis.release(&lock_key, &lock_value).await;
                    }
                    return outcome;
                }
                Ok(_) => {}
                Err(e) => {
                    self.metrics
                        .redis_errors
                        .with_label_values(&["delivery_count"])
                        .inc();
                    warn!(error = %e, "cannot count redeliveries");
                }
            }
        }

        let renewer = locked.then(|| {
            let redis = self.redis.clone();
            let (k, v) = (lock_key.clone(), lock_value.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lock_ttl / 3).await;
                    let _ = redis.renew(&k, &v, lock_ttl).await;
                }
            })
        });

        let outcome = self
            .process(publish, d, &job, attempt, received, shutdown)
            .await;
        if let Some(r) = renewer {
            r.abort();
        }
        if locked {
            let _ = self.redis.release(&lock_key, &lock_value).await;
        }
        outcome
    }

    async fn process(
        &self,
        publish: &Channel,
        d: &Delivery,
        job: &ValidJob,
        attempt: u32,
        received: Instant,
        shutdown: &Shutdown,
    ) -> Outcome {
        let model = self.settings.worker.model.clone();
        let started = Instant::now();
        self.metrics.jobs_in_progress.inc();
        self.metrics.job_started.set(amqp::now_unix() as f64);
        let queue_ms = d
            .properties
            .timestamp()
            .map(|t| amqp::now_unix().saturating_sub(t) * 1000)
            .unwrap_or(0);

        let result = self
            .generate_and_store(publish, job, attempt, shutdown)
            .await;

        self.metrics.jobs_in_progress.dec();
        self.metrics.job_started.set(0.0);
        match result {
            Ok((mut event, stage)) => {
                let total = started.elapsed();
                event.timings_ms.insert("queue".into(), queue_ms);
                event.timings_ms.insert("total".into(), ms(total));
                let m = &self.metrics;
                m.stage_seconds
                    .with_label_values(&["queue"])
                    .observe(queue_ms as f64 / 1e3);
                for (name, d) in &stage {
                    m.stage_seconds
                        .with_label_values(&[name])
                        .observe(d.as_secs_f64());
                }
                m.stage_seconds
                    .with_label_values(&["total"])
                    .observe(total.as_secs_f64());
                // result.json is stored before the event is published and the message acked.
                let key = self.result_key(job);
                let body = match serde_json::to_vec_pretty(&event) {
                    Ok(b) => b,
                    Err(e) => {
                        return self
                            .fail_or_retry(
                                publish,
                                d,
                                job,
                                attempt,
                                JobFailure::fatal(ErrorKind::Internal, e.to_string()),
                            )
                            .await
                    }
                };
                if let Err(e) = self.storage.put(&key, body, "application/json").await {
                    return self
                        .fail_or_retry(
                            publish,
                            d,
                            job,
                            attempt,
                            JobFailure::transient(ErrorKind::Storage, e.0),
                        )
                        .await;
                }
                if let Err(e) = self.publish_event(publish, &event).await {
                    return Outcome::Reconnect(e);
                }
                m.jobs
                    .with_label_values(&[&model, job.mode.name(), "succeeded"])
                    .inc();
                m.images
                    .with_label_values(&[&model])
                    .inc_by(event.outputs.len() as u64);
                info!(
                    outputs = event.outputs.len(),
                    total_ms = ms(total),
                    since_received_ms = ms(received.elapsed()),
                    "job succeeded"
                );
                Outcome::Ack
            }
            Err(f) => self.fail_or_retry(publish, d, job, attempt, f).await,
        }
    }

    /// Transient failures go back through the retry queue until `max_attempts`; everything else
    /// (and the last attempt) becomes a `failed` event and a dead letter.
    async fn fail_or_retry(
        &self,
        publish: &Channel,
        d: &Delivery,
        job: &ValidJob,
        attempt: u32,
        f: JobFailure,
    ) -> Outcome {
        let msg = redact_text(&f.message);
        if f.transient && attempt < self.settings.worker.max_attempts {
            warn!(kind = f.kind.name(), error = %msg, attempt, "attempt failed");
            return match self.retry_later(publish, d, attempt, &msg).await {
                Ok(()) => Outcome::Ack,
                Err(e) => Outcome::Reconnect(e),
            };
        }
        error!(kind = f.kind.name(), error = %msg, attempt, "job failed");
        self.metrics
            .jobs
            .with_label_values(&[&self.settings.worker.model, job.mode.name(), "failed"])
            .inc();
        let event = ResultEvent {
            id: job.id.clone(),
            status: "failed".into(),
            attempt,
            outputs: vec![],
            plan: job.plan.as_ref().map(Plan::to_json),
            timings_ms: BTreeMap::new(),
            error: Some(EventError {
                kind: f.kind,
                message: msg.clone(),
            }),
            worker: self.worker_name.clone(),
        };
        if let Err(e) = self.publish_event(publish, &event).await {
            return Outcome::Reconnect(e);
        }
        let label = if f.transient {
            "max_attempts"
        } else {
            f.kind.name()
        };
        if let Err(e) = self
            .dead_letter(publish, d, f.kind, label, &msg, attempt)
            .await
        {
            return Outcome::Reconnect(e);
        }
        Outcome::Ack
    }

    /// Plans (when needed), generates on the GPU thread with progress events, stores the PNGs.
    async fn generate_and_store(
        &self,
        publish: &Channel,
        job: &ValidJob,
        attempt: u32,
        shutdown: &Shutdown,
    ) -> Result<(ResultEvent, Vec<(&'static str, Duration)>), JobFailure> {
        let model = self.settings.worker.model.clone();
        let mut stages: Vec<(&'static str, Duration)> = Vec::new();

        // Plan.
        let t = Instant::now();
        let (mode, plan_json) = match (job.mode, &job.plan) {
            (crate::job::JobMode::Plain, _) => (Mode::Plain, None),
            (crate::job::JobMode::R2f, Some(Plan::R2f(p))) => (
                Mode::R2f {
                    plan: p.clone(),
                    schedule: job.schedule,
                    stop_steps: job.stop_steps,
                },
                Some(p.to_official_json()),
            ),
            (crate::job::JobMode::R2f, Some(Plan::Regions(_))) => {
                return Err(JobFailure::fatal(
                    ErrorKind::InvalidJob,
                    "mode r2f was given an R2F+ (regions) plan",
                ))
            }
            (crate::job::JobMode::R2f, None) => match &self.planner {
                Some(planner) => {
                    let p = planner
                        .plan(&job.prompt, &self.metrics)
                        .await
                        .map_err(|e| JobFailure {
                            kind: ErrorKind::Llm,
                            transient: e.transient,
                            message: e.message,
                        })?;
                    let json = p.to_official_json();
                    (
                        Mode::R2f {
                            plan: p,
                            schedule: job.schedule,
                            stop_steps: job.stop_steps,
                        },
                        Some(json),
                    )
                }
                None => {
                    return Err(JobFailure::fatal(
                        ErrorKind::Llm,
                        "mode r2f without a plan needs an LLM, and none is configured",
                    ))
                }
            },
            (crate::job::JobMode::R2fplus, _) => {
                return Err(JobFailure::fatal(
                    ErrorKind::InvalidJob,
                    "r2fplus is not supported",
                ))
            }
        };
        stages.push(("plan", t.elapsed()));

        // Generate, with throttled progress events.
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<(usize, usize)>();
        let (reply_tx, reply_rx) = oneshot::channel();
        self.gpu
            .submit(GpuTask {
                model_name: model.clone(),
                prompt: job.prompt.clone(),
                mode,
                params: job.params.clone(),
                num_images: job.num_images,
                progress: progress_tx,
                reply: reply_tx,
            })
            .map_err(|e| JobFailure::fatal(ErrorKind::Internal, e))?;
        let interval = Duration::from_millis(self.settings.worker.progress_interval_ms);
        let events_exchange = self.settings.amqp.events_exchange.clone();
        let progress_ch = publish.clone();
        let job_id = job.id.clone();
        let progress_task = tokio::spawn(async move {
            let mut last: Option<Instant> = None;
            while let Some((step, steps)) = progress_rx.recv().await {
                let due = last.map(|l| l.elapsed() >= interval).unwrap_or(true) || step == steps;
                if !due {
                    continue;
                }
                last = Some(Instant::now());
                let ev = ProgressEvent {
                    id: job_id.clone(),
                    step,
                    steps,
                };
                if let Ok(body) = serde_json::to_vec(&ev) {
                    // Progress is best effort: not confirmed, not retried.
                    let _ = progress_ch
                        .basic_publish(
                            events_exchange.as_str().into(),
                            "job.progress".into(),
                            Default::default(),
                            &body,
                            json_props(),
                        )
                        .await;
                }
            }
        });
        let drain_timeout = Duration::from_secs(self.settings.worker.drain_timeout_secs);
        let mut drain_watch = shutdown.clone();
        let reply = tokio::select! {
            r = reply_rx => r,
            _ = async {
                let _ = drain_watch.wait_for(|s| *s > 0).await;
                tokio::time::sleep(drain_timeout).await;
            } => {
                error!(timeout_secs = drain_timeout.as_secs(), "drain timeout: exiting without acking (the job will be redelivered)");
                std::process::exit(1);
            }
        };
        let _ = progress_task.await;
        let images = match reply {
            Ok(Ok(images)) => images,
            Ok(Err(msg)) => return Err(JobFailure::fatal(ErrorKind::Model, msg)),
            Err(_) => {
                return Err(JobFailure::fatal(
                    ErrorKind::Internal,
                    "the GPU thread stopped during the job",
                ))
            }
        };
        let timings = total_timings(&images);
        stages.push(("encode", timings.encode));
        stages.push(("denoise", timings.denoise));
        stages.push(("decode", timings.decode));
        for img in &images {
            if img.steps > 0 {
                self.metrics
                    .denoise_step_seconds
                    .with_label_values(&[&model])
                    .observe(img.timings.denoise.as_secs_f64() / img.steps as f64);
            }
        }

        // Upload.
        let t = Instant::now();
        let mut outputs = Vec::new();
        for (index, img) in images.into_iter().enumerate() {
            let key = join_key(&[
                &self.settings.storage.prefix,
                &job.prefix,
                &job.id,
                &format!("{index}.png"),
            ]);
            let sha = hex::encode(Sha256::digest(&img.png));
            let uri = self
                .storage
                .put(&key, img.png, "image/png")
                .await
                .map_err(|e| JobFailure::transient(ErrorKind::Storage, e.0))?;
            outputs.push(OutputImage {
                uri,
                width: img.width,
                height: img.height,
                sha256: sha,
            });
        }
        let upload = t.elapsed();
        stages.push(("upload", upload));

        let mut timings_ms = BTreeMap::new();
        for (name, d) in &stages {
            timings_ms.insert(name.to_string(), ms(*d));
        }
        Ok((
            ResultEvent {
                id: job.id.clone(),
                status: "succeeded".into(),
                attempt,
                outputs,
                plan: plan_json,
                timings_ms,
                error: None,
                worker: self.worker_name.clone(),
            },
            stages,
        ))
    }
}

struct Session {
    _conn: lapin::Connection,
    consume: Channel,
    publish: Channel,
    consumer: lapin::Consumer,
    tag: String,
}
