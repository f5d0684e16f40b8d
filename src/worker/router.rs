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

use super::context::{count_job, Context};
use super::outcome::{decide, JobOutcome, Rejected};
use super::settle::{self, attempt_of, best_effort_id_bounded, record_status, was_routed};
use crate::job::{validate_message, Outcome};
use crate::service::amqp::amqp_error;
use crate::service::tenancy::{JobKey, Scope};

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
pub async fn inbox_outcome(ctx: &Context, d: &Delivery, scope: Option<&Scope>) -> JobOutcome {
    let s = &ctx.settings;
    let id = || best_effort_id_bounded(ctx, &d.data);
    let Some(scope) = scope else {
        let reason = ctx.scope_of(d).err().map(|r| r.0).unwrap_or_default();
        return JobOutcome::Rejected(Rejected::unattributable(id(), reason));
    };
    let limits = ctx.tenancy.limits(scope, &s.limits);
    let models = ctx.tenancy.models(scope, &ctx.models);
    match validate_message(&d.data, &limits, &models, ctx.settings.default_model()) {
        Ok(job) if !was_routed(d) => JobOutcome::Route { model: job.model },
        // The exchange sent it back: no queue is bound for its model.
        Ok(job) => JobOutcome::Rejected(Rejected::invalid(
            Some(job.id.clone()),
            format!(
                "no queue takes model `{}` (the broker has no queue bound to it on `{}`)",
                job.model, s.amqp.jobs_exchange
            ),
        )),
        Err(rejection) => match id() {
            // An invalid message under an id the tenant used for a job leaves that job alone.
            Some(id)
                if crate::service::status::claimed(
                    &ctx.redis,
                    &JobKey::new(scope.clone(), id.as_str()),
                )
                .await =>
            {
                let reason = format!(
                    "duplicate_id: `{id}` is already another job's ({})",
                    rejection.0
                );
                JobOutcome::Rejected(Rejected::duplicate(id, reason))
            }
            id => JobOutcome::Rejected(Rejected::invalid(id, rejection.0)),
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
    let scope = ctx.scope_of(d).ok();
    let outcome = inbox_outcome(ctx, d, scope.as_ref()).await;
    if let JobOutcome::Rejected(r) = &outcome {
        warn!(job_id = r.id.as_deref().unwrap_or("-"), reason = ?r.reason, "inbox job rejected");
        count_job(ctx, None, Outcome::Rejected);
    }
    let settlement = decide(outcome, attempt, ctx.settings.worker.max_attempts);
    record_status(ctx, d, attempt, &settlement, scope.as_ref()).await;
    settle::settle(
        ctx,
        publish,
        reply,
        d,
        attempt,
        settlement,
        None,
        scope.as_ref(),
    )
    .await
}
