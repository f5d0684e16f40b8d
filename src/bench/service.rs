//! Service benchmark: jobs per second through the broker and the per-job overhead of everything
//! but the model (broker hops, validation, storage, events), measured against a running worker.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions};
use lapin::types::FieldTable;

use crate::config::Settings;
use crate::service::amqp;

pub struct ServiceReport {
    pub jobs: usize,
    pub succeeded: usize,
    pub wall: Duration,
    pub jobs_per_second: f64,
    /// Mean of (worker total - encode - denoise - decode): validation, plan, storage, events.
    pub worker_overhead_ms: f64,
    /// Wall time per job in a saturated queue minus model time: the whole service overhead
    /// (broker hops, ack, validation, storage, events) per job at full throughput.
    pub saturated_overhead_ms: f64,
    pub model_ms: f64,
}

pub async fn run(
    settings: &Settings,
    jobs: usize,
    steps: u32,
    size: u32,
) -> anyhow::Result<ServiceReport> {
    let s = &settings.amqp;
    let conn = amqp::connect(s, "r2f-bench-service").await?;
    let ch = amqp::confirm_channel(&conn).await?;
    amqp::declare_topology(&ch, s, &settings.routed_models()).await?;
    let q = amqp::declare_private_queue(&ch).await?;
    for key in ["job.succeeded", "job.failed", "job.rejected"] {
        ch.queue_bind(
            q.name().as_str().into(),
            s.events_exchange.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp::amqp_error)?;
    }
    let mut events = ch
        .basic_consume(
            q.name().as_str().into(),
            "bench".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(amqp::amqp_error)?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let mut sent: HashSet<String> = HashSet::new();
    let start = Instant::now();
    for i in 0..jobs {
        let id = format!("bench-{run_id}-{i}");
        let job = serde_json::json!({
            "id": id, "prompt": "a hairy frog warrior", "model": settings.worker.model,
            "mode": crate::generate::JobMode::Plain,
            "params": {"steps": steps, "width": size, "height": size, "seed": i}
        });
        let props = amqp::json_props()
            .with_message_id(id.as_str().into())
            .with_timestamp(amqp::now_unix());
        sent.insert(id.clone());
        let timeout = std::time::Duration::from_secs(s.confirm_timeout_secs.max(1));
        let body = job.to_string();
        let (exchange, model) = (&s.jobs_exchange, &settings.worker.model);
        amqp::publish_confirmed(&ch, exchange, model, body.as_bytes(), props, timeout).await?;
    }
    let (mut done, mut ok) = (0, 0);
    let (mut worker_overhead, mut model) = (0.0, 0.0);
    while done < jobs {
        let next = tokio::time::timeout(Duration::from_secs(600), events.next())
            .await
            .map_err(|_| anyhow::anyhow!("no result event for 10 minutes: is a worker running?"))?;
        let Some(Ok(d)) = next else {
            anyhow::bail!("event stream closed");
        };
        let v: serde_json::Value = serde_json::from_slice(&d.data)?;
        let id = v["id"].as_str().unwrap_or("");
        if !sent.contains(id) {
            continue;
        }
        done += 1;
        if v["status"] == crate::job::Outcome::Succeeded.name() {
            ok += 1;
            let t = &v["timings_ms"];
            let get = |k: &str| t[k].as_f64().unwrap_or(0.0);
            let m = get("encode") + get("denoise") + get("decode");
            model += m;
            worker_overhead += get("total") - m;
        }
    }
    let wall = start.elapsed();
    let n = ok.max(1) as f64;
    Ok(ServiceReport {
        jobs,
        succeeded: ok,
        wall,
        jobs_per_second: jobs as f64 / wall.as_secs_f64(),
        worker_overhead_ms: worker_overhead / n,
        saturated_overhead_ms: wall.as_secs_f64() * 1e3 / jobs as f64 - model / n,
        model_ms: model / n,
    })
}
