//! Control messages: clients cancel jobs through the broker, not through the workers' Redis.
//! A client publishes `{"id": "<job id>"}` to `amqp.control_exchange` with routing key
//! `cancel` (and, to be answered, a `reply_to`); any worker takes it from
//! `amqp.control_queue`, reads its tenant from the broker-checked `user_id`, records the request
//! for that tenant's job only, and answers `{"id", "cancel": "requested" | "too_late" |
//! "invalid", "state"}` to the `reply_to` queue (the tenant's own queues or direct reply-to).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::Channel;
use serde::Deserialize;
use tracing::{info, warn};

use super::context::Context;
use super::settle::reply_allowed;
use crate::job::status::{CancelAnswer, CancelVerdict};
use crate::job::valid_id;
use crate::service::amqp::{self, amqp_error, json_props};
use crate::service::tenancy::JobKey;

/// A cancel request's body.
#[derive(Deserialize)]
struct CancelRequest {
    id: String,
}

/// Takes control messages until the consumer ends; returns why it ended.
pub async fn run(
    ctx: Arc<Context>,
    mut consumer: lapin::Consumer,
    reply: Channel,
) -> anyhow::Error {
    loop {
        let d = match consumer.next().await {
            Some(Ok(d)) => d,
            Some(Err(e)) => return amqp_error(e),
            None => return anyhow::anyhow!("control consumer cancelled by the broker"),
        };
        let answer = answer(&ctx, &d).await;
        send(&ctx, &reply, &d, &answer).await;
        if let Err(e) = d.ack(BasicAckOptions::default()).await {
            return amqp_error(e);
        }
    }
}

/// What a control message asks, done.
async fn answer(ctx: &Context, d: &Delivery) -> CancelAnswer {
    let invalid = |id: String, why: String| {
        warn!(job_id = %id, reason = %why, "control message refused");
        CancelAnswer {
            id,
            cancel: CancelVerdict::Invalid,
            state: None,
            reason: Some(why),
        }
    };
    if d.data.len() > 4096 {
        return invalid(
            String::new(),
            "a control message is at most 4096 bytes".into(),
        );
    }
    let request: CancelRequest = match serde_json::from_slice(&d.data) {
        Ok(r) => r,
        Err(e) => return invalid(String::new(), format!("not a cancel request: {e}")),
    };
    if !valid_id(&request.id) {
        return invalid(String::new(), "invalid job id".into());
    }
    let scope = match ctx.scope_of(d) {
        Ok(s) => s,
        Err(r) => return invalid(request.id, r.0),
    };
    let job = JobKey::new(scope, request.id.as_str());
    let ttl = Duration::from_secs(ctx.settings.redis.status_ttl_secs);
    match crate::service::status::request_cancel(&ctx.redis, &job, ttl).await {
        Ok(answer) => {
            info!(job_id = %job.id, tenant = job.scope.name().unwrap_or("-"), cancel = %answer.cancel, "cancel request");
            answer
        }
        Err(e) => {
            warn!(job_id = %job.id, error = %e, "cancel request not recorded");
            CancelAnswer {
                id: request.id,
                cancel: CancelVerdict::Invalid,
                state: None,
                reason: Some("the request could not be recorded: try again".into()),
            }
        }
    }
}

/// The answer to the sender's `reply_to`, when it names an allowed queue.
async fn send(ctx: &Context, reply: &Channel, d: &Delivery, answer: &CancelAnswer) {
    let Some(queue) = d.properties.reply_to().as_ref() else {
        return;
    };
    let scope = ctx.scope_of(d).ok();
    if let Err(why) = reply_allowed(
        &ctx.settings.amqp,
        queue.as_str(),
        ctx.tenancy.mode(),
        scope.as_ref(),
    ) {
        warn!(why, "control reply_to not answered");
        return;
    }
    let Ok(body) = serde_json::to_vec(answer) else {
        return;
    };
    let mut props = json_props()
        .with_delivery_mode(1)
        .with_timestamp(amqp::now_unix());
    if let Some(c) = d
        .properties
        .correlation_id()
        .clone()
        .or_else(|| d.properties.message_id().clone())
    {
        props = props.with_correlation_id(c);
    }
    let _ = reply
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await;
}
