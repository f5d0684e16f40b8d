//! Carries out a [`Settlement`]: every broker side effect of a finished delivery — events,
//! dead letters, retries, give-backs — and then the ack. An error means the broker connection
//! is broken; the delivery is then left unacked and the broker redelivers it.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use tracing::{info, warn};

use super::context::Context;
use super::outcome::Settlement;
use crate::config::TenancyMode;
use crate::job::{best_effort_id, JobState, Outcome, ResultEvent, WebhookEvent};
use crate::service::amqp::{self, amqp_error, json_props, publish_confirmed};
use crate::service::backoff::retry_delay;
use crate::service::telemetry::{self, TraceHeaders};
use crate::service::tenancy::{JobKey, Scope};
use crate::service::webhook::Delivery as WebhookDelivery;

/// Header: the attempt number of a job (transient failures retried so far + 1).
pub const ATTEMPT_HEADER: &str = "x-r2f-attempt";
/// Header: set when a worker sent the job on to its model's queue (the model's name).
pub const ROUTED_HEADER: &str = "x-r2f-routed";
/// Header: deliveries of this message that ended without being settled (the worker died or
/// lost its connection holding it).
pub const DELIVERIES_HEADER: &str = "x-r2f-deliveries";

fn header_u32(d: &Delivery, name: &str) -> Option<u32> {
    let headers = d.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(*n as u32),
        AMQPValue::ShortShortUInt(n) => Some(*n as u32),
        _ => None,
    }
}

/// The delivery's attempt number (1 when absent).
pub fn attempt_of(d: &Delivery) -> u32 {
    header_u32(d, ATTEMPT_HEADER).unwrap_or(1).max(1)
}

/// Unsettled deliveries so far (0 when absent).
pub fn deliveries_of(d: &Delivery) -> u32 {
    header_u32(d, DELIVERIES_HEADER).unwrap_or(0)
}

/// The broker side of a settlement, then the ack.
/// `reply` carries the terminal event to the message's `reply_to` queue, when it names one.
/// `scope` is the delivery's tenant (none for a message that belongs to no tenant).
#[allow(clippy::too_many_arguments)]
pub async fn settle(
    ctx: &Context,
    publish: &Channel,
    reply: &Channel,
    d: &Delivery,
    attempt: u32,
    settlement: Settlement,
    result_key: Option<&str>,
    scope: Option<&Scope>,
) -> anyhow::Result<()> {
    let trace = trace_of(d);
    match settlement {
        Settlement::Publish { mut event } => {
            fill_trace_id(&mut event, d);
            publish_event(ctx, publish, &event, trace.as_ref()).await?;
            send_reply(ctx, reply, d, &event, scope).await;
            send_webhook(ctx, publish, d, &event, scope).await?;
        }
        Settlement::DeadLetter {
            mut event,
            label,
            reason,
            announce,
        } => {
            event.worker = ctx.worker_name.clone();
            event.tenant = scope.and_then(Scope::name).map(str::to_string);
            fill_trace_id(&mut event, d);
            let result_key = result_key.filter(|_| announce);
            if let Some(key) = result_key.filter(|_| event.status == Outcome::Failed) {
                // A failed job keeps its outcome, so a redelivery publishes it again instead
                // of working the job once more.
                if let Ok(body) = serde_json::to_vec_pretty(&event) {
                    if let Err(e) = ctx.storage.put(key, body, "application/json").await {
                        warn!(error = %e.0, "cannot store the failed result.json");
                    }
                }
            }
            // The dead letter first: whoever sees the event finds the message in the
            // dead-letter queue already.
            dead_letter(ctx, publish, d, &event, label, &reason, attempt).await?;
            if announce {
                publish_event(ctx, publish, &event, trace.as_ref()).await?;
            }
            send_reply(ctx, reply, d, &event, scope).await;
            if announce {
                send_webhook(ctx, publish, d, &event, scope).await?;
            }
        }
        Settlement::Retry {
            next_attempt,
            reason,
        } => {
            let delay = retry_delay(
                attempt,
                ctx.settings.worker.retry_backoff_ms,
                ctx.settings.worker.retry_backoff_max_ms,
            );
            let level = next_attempt - 1;
            republish(ctx, publish, d, Some(level), delay, |h| {
                h.insert(ATTEMPT_HEADER.into(), AMQPValue::LongUInt(next_attempt));
                h.insert(
                    "x-r2f-last-error".into(),
                    amqp::header_str(&bounded_header(&reason)),
                );
            })
            .await?;
            info!(retry_in_ms = delay.as_millis() as u64, next_attempt, error = ?reason, "job will be retried");
        }
        Settlement::GiveBack { reason } => {
            let delay = Duration::from_millis(ctx.settings.worker.give_back_delay_ms);
            republish(ctx, publish, d, Some(0), delay, |_| {}).await?;
            ctx.metrics
                .given_back
                .with_label_values(&["sick_worker"])
                .inc();
            warn!(error = ?reason, "failure is this worker's, not the job's: job given back");
        }
        Settlement::Route { model } => {
            info!(model = %model, "job for another model: sent on to its queue");
            // `route` acks.
            return route(ctx, publish, d, &model).await;
        }
        Settlement::Postpone => {
            let delay = Duration::from_millis(ctx.settings.worker.give_back_delay_ms);
            republish(ctx, publish, d, Some(0), delay, |_| {}).await?;
            ctx.metrics.given_back.with_label_values(&["busy"]).inc();
        }
        Settlement::HandBack => {
            republish(ctx, publish, d, None, Duration::ZERO, |_| {}).await?;
            ctx.metrics
                .given_back
                .with_label_values(&["stopping"])
                .inc();
            info!("the worker is stopping: job handed back to the queue");
        }
    }
    ack(d).await
}

async fn ack(d: &Delivery) -> anyhow::Result<()> {
    d.ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(amqp_error)
}

/// Puts a redelivered message back at the tail of the jobs queue with its unsettled-delivery
/// count raised, and acks the redelivery: the count survives on the message itself, without
/// Redis, before any validation.
pub async fn count_redelivery(
    ctx: &Context,
    publish: &Channel,
    d: &Delivery,
    deliveries: u32,
) -> anyhow::Result<()> {
    republish(ctx, publish, d, None, Duration::ZERO, |h| {
        h.insert(DELIVERIES_HEADER.into(), AMQPValue::LongUInt(deliveries));
    })
    .await?;
    ctx.metrics
        .given_back
        .with_label_values(&["redelivered"])
        .inc();
    ack(d).await
}

/// Gives back a delivery that was never worked (prefetched when the worker paused or drained).
pub async fn give_back_unworked(
    ctx: &Context,
    publish: &Channel,
    d: &Delivery,
) -> anyhow::Result<()> {
    republish(ctx, publish, d, None, Duration::ZERO, |_| {}).await?;
    ack(d).await
}

/// The `reason` of the `queued` record of a job a stopping worker handed back.
pub const HANDED_BACK: &str = "handed back by a stopping worker: another worker starts it again";

/// The trace context to pass on for what is published about delivery `d` (see
/// `service::telemetry::outgoing`; the settlement runs in the job's span).
fn trace_of(d: &Delivery) -> Option<TraceHeaders> {
    telemetry::outgoing(
        &tracing::Span::current(),
        TraceHeaders::from_amqp(&d.properties).as_ref(),
    )
}

fn confirm_timeout(ctx: &Context) -> Duration {
    Duration::from_secs(ctx.settings.amqp.confirm_timeout_secs.max(1))
}

fn bounded_header(s: &str) -> String {
    super::outcome::bounded(s, 500)
}

/// Republishes the message unchanged but for its headers: to the retry queue of `level` with a
/// per-message TTL of `delay`, or (level None) straight to the jobs queue.
async fn republish(
    ctx: &Context,
    publish: &Channel,
    d: &Delivery,
    level: Option<u32>,
    delay: Duration,
    edit: impl FnOnce(&mut FieldTable),
) -> anyhow::Result<()> {
    let s = &ctx.settings.amqp;
    let mut props = republished_props(d, edit);
    let queue = match level {
        Some(level) => {
            props = props.with_expiration(delay.as_millis().max(1).to_string().as_str().into());
            amqp::retry_level_queue(s, &ctx.settings.worker.model, level)
        }
        None => s.queue_of(&ctx.settings.worker.model),
    };
    publish_confirmed(publish, "", &queue, &d.data, props, confirm_timeout(ctx)).await
}

/// The delivery's properties for publishing it again: persistent, its headers edited, and a
/// timestamp when it had none (the queue time counts from the first publish).
fn republished_props(d: &Delivery, edit: impl FnOnce(&mut FieldTable)) -> BasicProperties {
    let mut headers = d.properties.headers().clone().unwrap_or_default();
    edit(&mut headers);
    if let Some(t) = trace_of(d) {
        t.to_amqp(&mut headers);
    }
    let props = d
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2);
    if props.timestamp().is_none() {
        props.with_timestamp(amqp::now_unix())
    } else {
        props
    }
}

/// Sends a job on to the queue of `model` through the jobs exchange, marked as routed (a job
/// that comes back from the exchange marked so has no queue to go to), and acks it here.
pub async fn route(
    ctx: &Context,
    publish: &Channel,
    d: &Delivery,
    model: &str,
) -> anyhow::Result<()> {
    let props = republished_props(d, |h| {
        h.insert(ROUTED_HEADER.into(), amqp::header_str(model));
    });
    let exchange = &ctx.settings.amqp.jobs_exchange;
    publish_confirmed(
        publish,
        exchange,
        model,
        &d.data,
        props,
        confirm_timeout(ctx),
    )
    .await?;
    ctx.metrics.routed.with_label_values(&[model]).inc();
    ack(d).await
}

/// Whether the delivery was routed by a worker before (see [`route`]).
pub fn was_routed(d: &Delivery) -> bool {
    d.properties
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key(ROUTED_HEADER))
}

/// The trace id of an event built without one (a rejection, a timeout), from the job's span.
fn fill_trace_id(event: &mut ResultEvent, d: &Delivery) {
    if event.trace_id.is_none() {
        event.trace_id = telemetry::trace_id_of(
            &tracing::Span::current(),
            TraceHeaders::from_amqp(&d.properties).as_ref(),
        );
    }
}

/// Publishes a result event (confirmed) on `job.<status>` (`job.<status>.<tenant>.<id>` in a
/// multi-tenant fleet), with the job's trace context.
pub async fn publish_event(
    ctx: &Context,
    publish: &Channel,
    event: &ResultEvent,
    trace: Option<&TraceHeaders>,
) -> anyhow::Result<()> {
    let scope = event
        .tenant
        .as_deref()
        .map_or_else(Scope::single, Scope::tenant);
    let body = serde_json::to_vec(event)?;
    let mut props = json_props().with_timestamp(amqp::now_unix());
    if let Some(id) = amqp::message_id(&event.id) {
        props = props.with_message_id(id);
    }
    if let Some(t) = trace {
        let mut headers = FieldTable::default();
        t.to_amqp(&mut headers);
        props = props.with_headers(headers);
    }
    amqp::publish_confirmed_optional(
        publish,
        &ctx.settings.amqp.events_exchange,
        &scope.routing_key(event.status.name(), &event.id),
        &body,
        props,
        confirm_timeout(ctx),
    )
    .await
}

/// The reply-to queue that RabbitMQ binds to the publishing connection (direct reply-to).
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Whether the worker may publish a reply to `queue`: one of `amqp.reply_to_prefixes` (by
/// default RabbitMQ's direct reply-to and server-named queues, `amq.gen-…`), and never one of
/// r2f's own queues (a client must not make the worker feed its jobs, retry or dead-letter
/// queues). In a multi-tenant fleet only direct reply-to and the tenant's own
/// `r2f.reply.<tenant>.…` queues (none for a message of no tenant): a message cannot make a
/// worker write into another tenant's queue.
pub fn reply_allowed(
    s: &crate::config::AmqpSettings,
    queue: &str,
    tenancy: TenancyMode,
    scope: Option<&Scope>,
) -> Result<(), &'static str> {
    if tenancy == TenancyMode::Multi {
        if queue.starts_with(DIRECT_REPLY_TO) {
            return Ok(());
        }
        return match scope.and_then(Scope::reply_prefix) {
            Some(prefix) if queue.starts_with(&prefix) => Ok(()),
            _ => {
                Err("is neither direct reply-to nor one of the tenant's r2f.reply.<tenant>. queues")
            }
        };
    }
    // A template's text before `{model}` starts every queue made from it.
    let stem = |t: &str| t.split("{model}").next().unwrap_or_default().to_string();
    let own = queue == s.inbox_queue
        || queue == s.dead_letter_queue
        || queue.starts_with(&s.webhooks_queue)
        || queue == s.control_queue
        || queue.starts_with(&stem(&s.jobs_queue))
        || queue.starts_with(&stem(&s.retry_queue));
    if own {
        return Err("names one of r2f's own queues");
    }
    if !s
        .reply_to_prefixes
        .iter()
        .any(|p| queue.starts_with(p.as_str()))
    {
        return Err("does not start with one of amqp.reply_to_prefixes");
    }
    Ok(())
}

/// Sends the terminal event to the queue the message names in `reply_to` (RabbitMQ's direct
/// reply-to `amq.rabbitmq.reply-to` included), with the message's `correlation_id` (its
/// `message_id` when it has none). Best effort, on a channel of its own without confirms: a
/// client that has gone away never costs the job (the event on the events exchange and the
/// status record stay the durable answers).
pub async fn send_reply(
    ctx: &Context,
    reply: &Channel,
    d: &Delivery,
    event: &ResultEvent,
    scope: Option<&Scope>,
) {
    let Some(queue) = d.properties.reply_to().as_ref() else {
        return;
    };
    if let Err(why) = reply_allowed(
        &ctx.settings.amqp,
        queue.as_str(),
        ctx.tenancy.mode(),
        scope,
    ) {
        warn!(reply_to = ?super::outcome::bounded(queue.as_str(), 100), why, "reply_to not answered");
        return;
    }
    let Ok(body) = serde_json::to_vec(event) else {
        return;
    };
    let mut props = json_props()
        .with_delivery_mode(1)
        .with_timestamp(amqp::now_unix())
        .with_type(event.status.event_key().as_str().into());
    if let Some(c) = d
        .properties
        .correlation_id()
        .clone()
        .or_else(|| d.properties.message_id().clone())
    {
        props = props.with_correlation_id(c);
    }
    if let Some(id) = amqp::message_id(&event.id) {
        props = props.with_message_id(id);
    }
    let sent = reply
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await;
    if let Err(e) = sent {
        warn!(error = %e, "reply_to not answered");
    }
}

/// Puts the terminal event's webhook delivery into the outbox (confirmed, before the ack) when
/// the message asks for one: the delivery survives this worker.
async fn send_webhook(
    ctx: &Context,
    publish: &Channel,
    d: &Delivery,
    event: &ResultEvent,
    scope: Option<&Scope>,
) -> anyhow::Result<()> {
    let (Some(_), Some(scope)) = (&ctx.webhooks, scope) else {
        return Ok(());
    };
    let Some(spec) =
        crate::service::webhook::spec_of(&d.data, ctx.settings.limits.max_message_bytes)
    else {
        return Ok(());
    };
    let kind = WebhookEvent::from(event.status);
    if let Some(delivery) = WebhookDelivery::of(scope, &event.id, &spec, kind, 0, event) {
        let delivery = delivery.traced(trace_of(d));
        super::outbox::enqueue(ctx, publish, &[delivery]).await?;
    }
    Ok(())
}

/// Copies the original message to the dead-letter queue (confirmed), with why.
async fn dead_letter(
    ctx: &Context,
    publish: &Channel,
    d: &Delivery,
    event: &ResultEvent,
    label: &str,
    reason: &str,
    attempt: u32,
) -> anyhow::Result<()> {
    let kind = event
        .error
        .as_ref()
        .map(|e| e.kind.name())
        .unwrap_or("internal");
    let mut headers = d.properties.headers().clone().unwrap_or_default();
    headers.insert(
        "x-r2f-reason".into(),
        amqp::header_str(&bounded_header(reason)),
    );
    headers.insert("x-r2f-error-kind".into(), amqp::header_str(kind));
    headers.insert("x-r2f-status".into(), amqp::header_str(event.status.name()));
    headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongUInt(attempt));
    headers.insert("x-r2f-worker".into(), amqp::header_str(&ctx.worker_name));
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
        &ctx.settings.amqp.dead_letter_queue,
        &d.data,
        props,
        confirm_timeout(ctx),
    )
    .await?;
    ctx.metrics.dead_lettered.with_label_values(&[label]).inc();
    warn!(reason = ?reason, kind, "dead-lettered");
    Ok(())
}

/// The job's status record after a settlement: finished with its result event, `retrying` or
/// `queued` (handed back) with the reason. Messages without a readable id have none.
/// `scope` is the delivery's (none for a message that belongs to no tenant: it has no record).
pub async fn record_status(
    ctx: &Context,
    d: &Delivery,
    attempt: u32,
    settlement: &Settlement,
    scope: Option<&Scope>,
) {
    let Some(scope) = scope else {
        return;
    };
    let (id, state, reason, result, attempt) = match settlement {
        Settlement::Publish { event } => (
            Some(event.id.clone()),
            JobState::from(event.status),
            None,
            Some(event),
            attempt,
        ),
        // Not under the id of another job of the tenant (a duplicate id).
        Settlement::DeadLetter {
            announce: false, ..
        } => return,
        Settlement::DeadLetter { event, reason, .. } => (
            Some(event.id.clone()),
            JobState::from(event.status),
            Some(reason.as_str()),
            Some(event),
            attempt,
        ),
        // No event carries the id: read it back from the message, only here.
        Settlement::Retry {
            next_attempt,
            reason,
        } => (
            best_effort_id_bounded(ctx, &d.data),
            JobState::Retrying,
            Some(reason.as_str()),
            None,
            *next_attempt,
        ),
        Settlement::GiveBack { reason } => (
            best_effort_id_bounded(ctx, &d.data),
            JobState::Queued,
            Some(reason.as_str()),
            None,
            attempt,
        ),
        Settlement::HandBack => (
            best_effort_id_bounded(ctx, &d.data),
            JobState::Queued,
            Some(HANDED_BACK),
            None,
            attempt,
        ),
        Settlement::Postpone | Settlement::Route { .. } => return,
    };
    let Some(id) = id.filter(|i| crate::job::valid_id(i)) else {
        return;
    };
    let job = JobKey::new(scope.clone(), id);
    crate::service::status::record(
        &ctx.redis,
        Duration::from_secs(ctx.settings.redis.status_ttl_secs),
        crate::service::status::Update {
            job: &job,
            state,
            attempt,
            worker: &ctx.worker_name,
            reason,
            result,
        },
    )
    .await;
}

pub fn best_effort_id_bounded(ctx: &Context, body: &[u8]) -> Option<String> {
    best_effort_id(body, ctx.settings.limits.max_message_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_go_only_to_client_queues() {
        let mut s = crate::config::AmqpSettings::named(
            "amqp://x",
            "r2f.jobs.{model}",
            "r2f.jobs.dead",
            "r2f.jobs.{model}.retry",
            "r2f.events",
        );
        s.inbox_queue = "r2f.jobs".into();
        for ok in [
            "amq.rabbitmq.reply-to",
            "amq.rabbitmq.reply-to.g1h2AA==.abc",
            "amq.gen-JzTY20BRgKO-HjmUJj0wLg",
            "r2f.reply.client-7",
        ] {
            assert_eq!(
                reply_allowed(&s, ok, TenancyMode::Single, None),
                Ok(()),
                "{ok}"
            );
        }
        for bad in [
            "r2f.jobs",
            "r2f.jobs.sd3",
            "r2f.jobs.sd3.retry.1",
            "r2f.jobs.dead",
            "billing.invoices",
            "",
        ] {
            assert!(
                reply_allowed(&s, bad, TenancyMode::Single, None).is_err(),
                "{bad}"
            );
        }
        // Tenants: direct reply-to and their own r2f.reply.<tenant>. queues, nothing else.
        let acme = Scope::tenant("acme");
        let multi =
            |q: &str, scope: Option<&Scope>| reply_allowed(&s, q, TenancyMode::Multi, scope);
        assert_eq!(multi("amq.rabbitmq.reply-to", Some(&acme)), Ok(()));
        assert_eq!(multi("r2f.reply.acme.7f", Some(&acme)), Ok(()));
        assert_eq!(multi("amq.rabbitmq.reply-to.g1h2AA==.abc", None), Ok(()));
        for bad in [
            "r2f.reply.beta.7f",
            "amq.gen-JzTY20BRgKO",
            "r2f.reply.acmex.1",
        ] {
            assert!(multi(bad, Some(&acme)).is_err(), "{bad}");
        }
        assert!(multi("r2f.reply.acme.7f", None).is_err());
    }
}
