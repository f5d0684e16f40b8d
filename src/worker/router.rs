//! The inbox router. Jobs published straight to the inbox queue (the single queue of earlier
//! versions) and jobs the jobs exchange could not route land in the inbox; every worker
//! consumes it on a channel of its own, next to its model's queue, so that routing never waits
//! for a generation. A valid job is sent on to its model's queue through the jobs exchange; an
//! invalid one, or one for a model without a queue, is rejected like any invalid job (event,
//! status record, dead letter with its reason).

use std::sync::Arc;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::Channel;
use tracing::warn;

use super::amqp::amqp_error;
use super::context::{count_job, Context};
use super::outcome::{decide, JobOutcome};
use super::settle::{self, attempt_of, best_effort_id_bounded, record_status, was_routed};
use crate::job::{validate_message, Outcome};

/// Routes inbox deliveries until the consumer ends; returns why it ended.
pub async fn run(
    ctx: Arc<Context>,
    mut inbox: lapin::Consumer,
    publish: Channel,
    reply: Channel,
) -> anyhow::Error {
    loop {
        let d = match inbox.next().await {
            Some(Ok(d)) => d,
            Some(Err(e)) => return amqp_error(e),
            None => return anyhow::anyhow!("inbox consumer cancelled by the broker"),
        };
        if let Err(e) = route_one(&ctx, &publish, &reply, &d).await {
            return e;
        }
    }
}

/// What becomes of one inbox delivery: sent on to its model's queue, or rejected.
pub fn inbox_outcome(ctx: &Context, d: &Delivery) -> JobOutcome {
    let s = &ctx.settings;
    match validate_message(
        &d.data,
        &s.limits,
        &ctx.models,
        ctx.settings.default_model(),
    ) {
        Ok(job) if !was_routed(d) => JobOutcome::Route { model: job.model },
        // The exchange sent it back: no queue is bound for its model.
        Ok(job) => JobOutcome::Rejected {
            reason: format!(
                "no queue takes model `{}` (the broker has no queue bound to it on `{}`)",
                job.model, s.amqp.jobs_exchange
            ),
            id: Some(job.id),
        },
        Err(rejection) => JobOutcome::Rejected {
            id: best_effort_id_bounded(ctx, &d.data),
            reason: rejection.0,
        },
    }
}

async fn route_one(
    ctx: &Context,
    publish: &Channel,
    reply: &Channel,
    d: &Delivery,
) -> anyhow::Result<()> {
    let attempt = attempt_of(d);
    let outcome = inbox_outcome(ctx, d);
    if let JobOutcome::Rejected { id, reason } = &outcome {
        warn!(job_id = id.as_deref().unwrap_or("-"), reason = ?reason, "inbox job rejected");
        count_job(ctx, None, Outcome::Rejected);
    }
    let settlement = decide(outcome, attempt, ctx.settings.worker.max_attempts);
    record_status(ctx, d, attempt, &settlement).await;
    settle::settle(ctx, publish, reply, d, attempt, settlement, None).await
}
