//! The webhook outbox: a job's webhook deliveries are messages on `amqp.webhooks_queue`,
//! published with confirms before the job is acked, and taken by every worker's outbox task.
//! A delivery is acked only once its receiver answered 2xx; one that should be tried again goes
//! to `<webhooks_queue>.retry` with a per-message TTL (the backoff, or the receiver's
//! `Retry-After`) and comes back when it runs out; one given up (a refused address, a 4xx, the
//! retry budget spent) goes to `<webhooks_queue>.dead` with its last answer. A worker that dies
//! holding deliveries leaves them unacked: the broker hands them to another worker, and the
//! receiver sees the same `webhook-id`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use tracing::{info, warn};

use super::context::Context;
use crate::service::amqp::{self, amqp_error, json_props, publish_confirmed};
use crate::service::backoff::retry_delay;
use crate::service::metrics::Delivery as Counted;
use crate::service::webhook::{Attempt, Delivery};

/// Header: attempts made so far at a delivery.
const ATTEMPTS: &str = "x-r2f-attempts";
/// Header of a delivery given up: its last answer.
const LAST_ANSWER: &str = "x-r2f-last-answer";
/// How soon a delivery whose receiver host is at its bound is tried again.
const HOST_BUSY_DELAY: Duration = Duration::from_millis(500);

fn confirm_timeout(ctx: &Context) -> Duration {
    Duration::from_secs(ctx.settings.amqp.confirm_timeout_secs.max(1))
}

/// Puts deliveries into the outbox (confirmed): they survive this worker.
pub async fn enqueue(
    ctx: &Context,
    publish: &Channel,
    deliveries: &[Delivery],
) -> anyhow::Result<()> {
    for d in deliveries {
        let body = serde_json::to_vec(d)?;
        let props = json_props()
            .with_message_id(d.id.as_str().into())
            .with_timestamp(amqp::now_unix());
        publish_confirmed(
            publish,
            "",
            &ctx.settings.amqp.webhooks_queue,
            &body,
            props,
            confirm_timeout(ctx),
        )
        .await?;
    }
    Ok(())
}

/// Puts deliveries into the outbox without waiting for the broker (progress and start events:
/// best effort, like their events).
pub async fn enqueue_unconfirmed(ctx: &Context, ch: &Channel, d: &Delivery) {
    let Ok(body) = serde_json::to_vec(d) else {
        return;
    };
    let props = json_props().with_message_id(d.id.as_str().into());
    let _ = ch
        .basic_publish(
            "".into(),
            ctx.settings.amqp.webhooks_queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await;
}

/// Takes deliveries from the outbox until the consumer ends; returns why it ended. Each is
/// attempted in a task of its own (the consumer's prefetch, `webhook.max_in_flight`, bounds
/// them; `webhook.max_per_host` bounds those of one receiver host).
pub async fn run(
    ctx: Arc<Context>,
    mut consumer: lapin::Consumer,
    publish: Channel,
) -> anyhow::Error {
    loop {
        let d = match consumer.next().await {
            Some(Ok(d)) => d,
            Some(Err(e)) => return amqp_error(e),
            None => return anyhow::anyhow!("webhook outbox consumer cancelled by the broker"),
        };
        let (ctx, publish) = (ctx.clone(), publish.clone());
        tokio::spawn(async move {
            if let Err(e) = attempt_one(&ctx, &publish, &d).await {
                // Unacked: the broker hands the delivery out again.
                warn!(error = %e, "webhook delivery not settled");
            }
        });
    }
}

fn attempts_of(d: &AmqpDelivery) -> u32 {
    let Some(headers) = d.properties.headers().as_ref() else {
        return 0;
    };
    match headers.inner().get(ATTEMPTS) {
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

async fn attempt_one(ctx: &Context, publish: &Channel, d: &AmqpDelivery) -> anyhow::Result<()> {
    let Some(sender) = &ctx.webhooks else {
        // This worker sends no webhooks: the message goes back for one that does.
        d.nack(lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .map_err(amqp_error)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        return Ok(());
    };
    let delivery: Delivery = match serde_json::from_slice(&d.data) {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, "unreadable webhook delivery dropped");
            return ack(d).await;
        }
    };
    let attempts = attempts_of(d) + 1;
    let count = |c: Counted| ctx.metrics.webhooks.with_label_values(&[c.name()]).inc();
    let span = tracing::info_span!(
        "webhook",
        webhook_id = %delivery.id,
        trace_id = tracing::field::Empty,
    );
    crate::service::telemetry::adopt(&span, delivery.trace().as_ref());
    let attempt = tracing::Instrument::instrument(sender.attempt(&delivery), span).await;
    let host = reqwest::Url::parse(&delivery.url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    match attempt {
        Attempt::Delivered => {
            count(Counted::Ok);
            info!(webhook_id = %delivery.id, host = %host, attempts, "webhook delivered");
            ack(d).await
        }
        Attempt::HostBusy => {
            later(ctx, publish, d, attempts - 1, HOST_BUSY_DELAY).await?;
            ack(d).await
        }
        Attempt::GiveUp { answer } => {
            count(Counted::Failed);
            warn!(webhook_id = %delivery.id, host = %host, attempts, answer = %answer, "webhook not delivered: given up");
            dead(ctx, publish, d, attempts, &answer).await?;
            ack(d).await
        }
        Attempt::Retry { answer, after } => {
            let s = sender.settings();
            let backoff = retry_delay(attempts, s.retry_min_ms.max(1), 60_000);
            let delay = after.map_or(backoff, |a| a.max(Duration::from_millis(s.retry_min_ms)));
            let spent = (chrono::Utc::now().timestamp_millis().max(0) as u64)
                .saturating_sub(delivery.first_at_ms);
            let budget = Duration::from_secs(s.retry_budget_secs);
            if Duration::from_millis(spent) + delay > budget {
                count(Counted::Failed);
                warn!(webhook_id = %delivery.id, host = %host, attempts, answer = %answer, "webhook not delivered: retry budget spent");
                dead(ctx, publish, d, attempts, &answer).await?;
            } else {
                count(Counted::Retry);
                warn!(webhook_id = %delivery.id, host = %host, attempts, answer = %answer, retry_in_ms = delay.as_millis() as u64, "webhook failed; retrying");
                later(ctx, publish, d, attempts, delay).await?;
            }
            ack(d).await
        }
    }
}

async fn ack(d: &AmqpDelivery) -> anyhow::Result<()> {
    d.ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(amqp_error)
}

fn props_with(d: &AmqpDelivery, edit: impl FnOnce(&mut FieldTable)) -> BasicProperties {
    let mut headers = d.properties.headers().clone().unwrap_or_default();
    edit(&mut headers);
    d.properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2)
}

/// Back into the outbox after `delay`, with `attempts` made so far.
async fn later(
    ctx: &Context,
    publish: &Channel,
    d: &AmqpDelivery,
    attempts: u32,
    delay: Duration,
) -> anyhow::Result<()> {
    let props = props_with(d, |h| {
        h.insert(ATTEMPTS.into(), AMQPValue::LongUInt(attempts));
    })
    .with_expiration(delay.as_millis().max(1).to_string().as_str().into());
    let queue = amqp::webhooks_retry_queue(&ctx.settings.amqp);
    publish_confirmed(publish, "", &queue, &d.data, props, confirm_timeout(ctx)).await
}

/// To the dead deliveries, with the last answer.
async fn dead(
    ctx: &Context,
    publish: &Channel,
    d: &AmqpDelivery,
    attempts: u32,
    answer: &str,
) -> anyhow::Result<()> {
    let props = props_with(d, |h| {
        h.insert(ATTEMPTS.into(), AMQPValue::LongUInt(attempts));
        h.insert(
            LAST_ANSWER.into(),
            amqp::header_str(&super::outcome::bounded(answer, 500)),
        );
    });
    let queue = amqp::webhooks_dead_queue(&ctx.settings.amqp);
    publish_confirmed(publish, "", &queue, &d.data, props, confirm_timeout(ctx)).await
}
