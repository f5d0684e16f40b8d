//! Gateway benchmark (`r2f bench-gateway`): `POST /v1/jobs` at a fixed rate (open loop: each
//! request's latency counts from when it was due, so a slow answer cannot hide the ones queued
//! behind it), reporting submissions per second and latency percentiles.
//!
//! Without `--url` it runs a gateway in this process against the configured broker and Redis,
//! under broker objects and Redis keys of its own (`r2f-bench-<random>`) that it removes
//! afterwards: no worker sees its jobs.

use std::time::{Duration, Instant};

use crate::config::{Settings, TenancyMode};
use crate::service::amqp;

pub struct GatewayBenchArgs {
    pub rate: f64,
    pub seconds: f64,
    /// A running gateway and one of its keys; none: one started here.
    pub url: Option<String>,
    pub key: Option<String>,
}

pub struct GatewayReport {
    pub target_rate: f64,
    pub sent: usize,
    pub accepted: usize,
    /// Answers other than 202, by status (0: no answer).
    pub errors: Vec<(u16, usize)>,
    pub wall: Duration,
    /// Sorted latencies of every request.
    latencies_ms: Vec<f64>,
    pub in_process: bool,
}

impl GatewayReport {
    pub fn percentile(&self, p: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * (self.latencies_ms.len() - 1) as f64).round() as usize;
        self.latencies_ms[i.min(self.latencies_ms.len() - 1)]
    }

    pub fn achieved_rate(&self) -> f64 {
        self.accepted as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for GatewayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "POST /v1/jobs at {:.0}/s for {:.1} s ({}): {} sent, {} accepted (202), {:.1} accepted/s",
            self.target_rate,
            self.wall.as_secs_f64(),
            if self.in_process {
                "gateway in this process"
            } else {
                "remote gateway"
            },
            self.sent,
            self.accepted,
            self.achieved_rate()
        )?;
        writeln!(
            f,
            "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
            self.percentile(50.0),
            self.percentile(90.0),
            self.percentile(99.0),
            self.percentile(100.0)
        )?;
        if !self.errors.is_empty() {
            let e: Vec<String> = self
                .errors
                .iter()
                .map(|(s, n)| format!("{n} x {s}"))
                .collect();
            writeln!(f, "not accepted: {}", e.join(", "))?;
        }
        Ok(())
    }
}

/// Broker objects and Redis keys of the benchmark's own, named `r2f-bench-<tag>`.
fn isolated(settings: &Settings, tag: &str) -> Settings {
    let mut s = settings.clone();
    let p = format!("r2f-bench-{tag}");
    let a = &mut s.amqp;
    a.jobs_exchange = format!("{p}.jobs");
    a.jobs_queue = format!("{p}.jobs.{{model}}");
    a.inbox_queue = format!("{p}.inbox");
    a.dead_letter_queue = format!("{p}.dead");
    a.retry_queue = format!("{p}.retry.{{model}}");
    a.events_exchange = format!("{p}.events");
    a.webhooks_queue = format!("{p}.webhooks");
    a.control_exchange = format!("{p}.control");
    a.control_queue = format!("{p}.control");
    s.redis.key_prefix = p;
    s.tenancy.mode = TenancyMode::Single;
    s
}

/// Removes what [`isolated`] settings made.
async fn clean_up(s: &Settings) -> anyhow::Result<()> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let a = &s.amqp;
    let conn = amqp::connect(a, "r2f-bench-gateway").await?;
    let ch = conn.create_channel().await.map_err(amqp::amqp_error)?;
    let mut queues: Vec<String> = s.routed_models().iter().map(|m| a.queue_of(m)).collect();
    queues.extend([
        a.inbox_queue.clone(),
        a.dead_letter_queue.clone(),
        a.webhooks_queue.clone(),
        amqp::webhooks_retry_queue(a),
        amqp::webhooks_dead_queue(a),
        a.control_queue.clone(),
    ]);
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in [
        a.jobs_exchange.clone(),
        amqp::unrouted_exchange(a),
        a.events_exchange.clone(),
        a.control_exchange.clone(),
    ] {
        let _ = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
    let redis = crate::service::redis_store::RedisStore::new(&s.redis);
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis
            .query(
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(redis.key(&["*"]))
                    .arg("COUNT")
                    .arg(1000),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if !keys.is_empty() {
            let _: i64 = redis
                .query(redis::cmd("DEL").arg(&keys))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(())
}

pub async fn run(settings: &Settings, args: GatewayBenchArgs) -> anyhow::Result<GatewayReport> {
    if !(args.rate > 0.0 && args.seconds > 0.0) {
        anyhow::bail!("--rate and --seconds must be positive");
    }
    let total = (args.rate * args.seconds).round().max(1.0) as usize;
    let (url, key, local) = match (&args.url, &args.key) {
        (Some(u), Some(k)) => (u.trim_end_matches('/').to_string(), k.clone(), None),
        (Some(_), None) => anyhow::bail!("--url needs --key"),
        _ => {
            let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
            let mut s = isolated(settings, &tag);
            let key = crate::gateway::auth::new_key();
            let file = std::env::temp_dir().join(format!("r2f-bench-{tag}.keys"));
            std::fs::write(&file, crate::gateway::auth::digest(&key))?;
            s.gateway.api_key_files = vec![file.display().to_string()];
            s.gateway.rate_per_sec = args.rate * 10.0;
            s.gateway.burst = (args.rate as u32).max(100);
            s.gateway.max_jobs_open = total * 2;
            // The broker objects a fleet's workers would declare.
            let conn = amqp::connect(&s.amqp, "r2f-bench-gateway").await?;
            let ch = conn.create_channel().await.map_err(amqp::amqp_error)?;
            amqp::declare_topology(&ch, &s.amqp, &s.routed_models()).await?;
            let _ = conn.close(200, "declared".into()).await;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let (trigger, shutdown) = crate::worker::Shutdown::channel();
            let serve_settings = s.clone();
            let server = tokio::spawn(crate::gateway::serve(serve_settings, listener, shutdown));
            (
                format!("http://{addr}"),
                key,
                Some((s, trigger, server, file)),
            )
        }
    };
    let client = crate::service::tls::get()
        .http(reqwest::Client::builder())
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build()?;
    // Ready before measuring: the first request opens the broker connection.
    let ready = Instant::now();
    loop {
        match client.get(format!("{url}/readyz")).send().await {
            Ok(r) if r.status().is_success() => break,
            _ if ready.elapsed() > Duration::from_secs(30) => {
                anyhow::bail!("the gateway at {url} is not ready")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let body = serde_json::json!({"prompt": "a benchmark job", "params": {"steps": 1}}).to_string();
    // A few requests to warm the connection pool up, not measured.
    for _ in 0..20 {
        let _ = client
            .post(format!("{url}/v1/jobs"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
    }
    eprintln!("sending {total} jobs at {}/s to {url}", args.rate);
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due).await;
        let (client, url, key, body) = (client.clone(), url.clone(), key.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(format!("{url}/v1/jobs"))
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let status = r.map(|r| r.status().as_u16()).unwrap_or(0);
            (status, due.elapsed())
        }));
    }
    let mut latencies_ms = Vec::with_capacity(total);
    let mut accepted = 0;
    let mut errors = std::collections::BTreeMap::<u16, usize>::new();
    for t in tasks {
        let (status, took) = t.await?;
        latencies_ms.push(took.as_secs_f64() * 1e3);
        if status == 202 {
            accepted += 1;
        } else {
            *errors.entry(status).or_default() += 1;
        }
    }
    let wall = start.elapsed();
    latencies_ms.sort_by(f64::total_cmp);
    if let Some((s, trigger, server, file)) = local {
        trigger.request(crate::worker::shutdown::Request::Immediate);
        let _ = server.await;
        let _ = std::fs::remove_file(file);
        clean_up(&s).await?;
    }
    Ok(GatewayReport {
        target_rate: args.rate,
        sent: total,
        accepted,
        errors: errors.into_iter().collect(),
        wall,
        latencies_ms,
        in_process: args.url.is_none(),
    })
}
