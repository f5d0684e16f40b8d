//! The commands that talk to the services: `worker`, `plan`, `enqueue`, `bench-service`.

use std::path::Path;
use std::time::Duration;

use super::exit::{error_line, Exit};
use crate::config::{Settings, TenancyMode};
use crate::job::status::CancelVerdict;
use crate::job::JobState;
use crate::service::metrics::Metrics;
use crate::service::planner::PlanMode;
use crate::service::tenancy::{JobKey, Scope};

/// `r2f worker`: runs until a signal, then drains: the job in hand finishes within
/// `drain_timeout_secs`, or is stopped at its next step and handed back (a second signal stops
/// it at once); exit 0. Only a job that cannot be stopped and handed back within
/// `stop_grace_secs` more makes the process exit without acking: status 1 after the drain
/// deadline, 130 after a second signal (the broker redelivers the job).
pub fn worker(settings: Settings) -> anyhow::Result<()> {
    // An unusable C2PA key stops the start as a configuration error, before any connection;
    // the signer read here is the one the GPU thread signs with.
    let signer = settings
        .c2pa
        .signer()
        .map_err(|m| super::exit::Exit::config(format!("invalid configuration: {m}")))?;
    runtime()?.block_on(async move {
        let mut shutdown = crate::worker::Shutdown::on_signals();
        let planner = crate::service::planner::planner_from_settings(&settings)?;
        let drain = Duration::from_secs(settings.worker.drain_timeout_secs);
        let grace = Duration::from_secs(settings.worker.stop_grace_secs);
        let Some(worker) = crate::worker::Worker::start(settings, &mut shutdown, planner, signer).await?
        else {
            return Ok(());
        };
        let mut watch = shutdown.clone();
        let deadline = async move {
            watch.requested().await;
            tokio::select! {
                _ = tokio::time::sleep(drain + grace) => 1,
                _ = watch.immediate() => {
                    tokio::time::sleep(grace).await;
                    130
                }
            }
        };
        tokio::select! {
            r = worker.run(shutdown) => r,
            code = deadline => {
                tracing::error!(code, "the job in hand could not be handed back in time: exiting without acking; the broker will redeliver it");
                super::exit::hard_exit(code)
            }
        }
    })
}

/// `r2f gateway`: serves HTTP until a signal, then drains (a second signal stops it at once).
pub fn gateway(settings: Settings) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let shutdown = crate::worker::Shutdown::on_signals();
        let listen = settings.gateway.listen.clone();
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .map_err(|e| Exit::unavailable(format!("cannot listen on {listen}: {e}")))?;
        crate::gateway::serve(settings, listener, shutdown).await
    })
}

/// `r2f key`: a new API key and its digest; with `hash`, the digest of the key on stdin.
pub fn key(hash: bool) -> anyhow::Result<()> {
    use crate::gateway::auth::{digest, new_key};
    if hash {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        let key = line.trim();
        if key.is_empty() {
            return Err(Exit::usage("no key on standard input").into());
        }
        println!("{}", digest(key));
        return Ok(());
    }
    let key = new_key();
    println!("{key}");
    println!("{}", digest(&key));
    eprintln!("line 1: the key, for the client (shown once); line 2: its digest, for a key file in gateway.api_key_files or tenants.<name>.api_key_files");
    Ok(())
}

/// `r2f bench-gateway`: `POST /v1/jobs` at a fixed rate.
pub fn bench_gateway(settings: &Settings, a: super::args::BenchGatewayArgs) -> anyhow::Result<()> {
    let args = crate::bench::gateway::GatewayBenchArgs {
        rate: a.rate,
        seconds: a.seconds,
        url: a.url,
        key: a.key,
    };
    let report = runtime()?.block_on(crate::bench::gateway::run(settings, args))?;
    print!("{report}");
    Ok(())
}

/// `r2f plan`: the LLM's plan (through the plan cache), printed as JSON.
pub fn plan(settings: &Settings, prompt: &str, mode: PlanMode) -> anyhow::Result<()> {
    if prompt.trim().is_empty() {
        anyhow::bail!("prompt is empty");
    }
    let planner = crate::service::planner::planner(settings)?.ok_or_else(|| {
        anyhow::anyhow!("the LLM is disabled in the configuration ([llm] enabled)")
    })?;
    let metrics = Metrics::new();
    let plan = runtime()?
        .block_on(planner.plan_value(prompt.trim(), mode, &metrics))
        .map_err(|e| anyhow::anyhow!("planning failed: {e}"))?;
    println!("{}", serde_json::to_string_pretty(&plan)?);
    Ok(())
}

/// `r2f enqueue`: checks a JSON-lines file (`-`: standard input) line by line, then publishes
/// the valid lines with publisher confirms (none with `check`).
pub fn enqueue(
    settings: &Settings,
    file: &Path,
    check: bool,
    validate: bool,
) -> anyhow::Result<()> {
    let reader: Box<dyn std::io::BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(file).map_err(
            |e| Exit::usage(format!("cannot read {}: {e}", file.display())),
        )?))
    };
    let checked = super::enqueue::check(settings, reader, validate)?;
    for (line, reason) in &checked.refused {
        eprintln!("line {line}: not published: {reason}");
    }
    let mut refused = checked.refused.len();
    if check {
        println!("{} valid, {refused} refused", checked.valid.len());
    } else {
        let published = if checked.valid.is_empty() {
            super::enqueue::Published {
                ids: Vec::new(),
                refused: Vec::new(),
            }
        } else {
            runtime()?
                .block_on(super::enqueue::publish(settings, &checked.valid))
                .map_err(|e| Exit::unavailable(format!("broker: {}", error_line(&e))))?
        };
        for (line, reason) in &published.refused {
            eprintln!("line {line}: not published: {reason}");
        }
        refused += published.refused.len();
        println!(
            "{} published (confirmed by the broker), {refused} refused",
            published.ids.len()
        );
    }
    if refused > 0 {
        return Err(Exit::data(format!("{refused} line(s) refused")).into());
    }
    Ok(())
}

/// `r2f bench-service`: jobs per second and service overhead against a running worker.
pub fn bench_service(
    settings: &Settings,
    jobs: usize,
    steps: u32,
    size: u32,
) -> anyhow::Result<()> {
    let report = runtime()?.block_on(crate::bench::service::run(settings, jobs, steps, size))?;
    println!("{report}");
    Ok(())
}

/// `r2f status ID`: the job's status record, as JSON.
pub fn status(settings: &Settings, id: &str, tenant: Option<&str>) -> anyhow::Result<()> {
    let job = job_key(settings, id, tenant)?;
    let redis = crate::service::redis_store::RedisStore::new(&settings.redis);
    let record = runtime()?.block_on(crate::service::status::read(&redis, &job))?;
    match record {
        Some(r) => {
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
        None => Err(Exit::data(format!(
            "no status for job `{id}` (never accepted, or older than redis.status_ttl_secs)"
        ))
        .into()),
    }
}

/// `r2f cancel ID`: records a cancellation request; fails when the job had already finished,
/// or (without `force`) when no job of that id is known.
pub fn cancel(
    settings: &Settings,
    id: &str,
    tenant: Option<&str>,
    force: bool,
) -> anyhow::Result<()> {
    let job = job_key(settings, id, tenant)?;
    let redis = crate::service::redis_store::RedisStore::new(&settings.redis);
    let ttl = Duration::from_secs(settings.redis.status_ttl_secs);
    let answer = runtime()?.block_on(async {
        let known = crate::service::status::read(&redis, &job)
            .await
            .map_err(|e| Exit::unavailable(format!("redis: {}", error_line(&e))))?
            .is_some();
        if !known && !force {
            return Err(Exit::data(format!(
                "no job `{id}` is known (no status record: never accepted, or older than \
                 redis.status_ttl_secs); nothing recorded. --force records the request anyway, \
                 for a job published straight to the broker that no worker has taken yet"
            ))
            .into());
        }
        crate::service::status::request_cancel(&redis, &job, ttl)
            .await
            .map_err(|e| {
                anyhow::Error::new(Exit::unavailable(format!("redis: {}", error_line(&e))))
            })
    })?;
    println!("{}", serde_json::to_string(&answer)?);
    if answer.cancel != CancelVerdict::Requested {
        let state = answer.state.map_or("finished", JobState::name);
        return Err(Exit::data(format!("job `{id}` already {state}: nothing to cancel")).into());
    }
    Ok(())
}

/// `r2f wait ID`: blocks until the job is finished (on its status announcements), prints its
/// status record; succeeds only when the job did.
pub fn wait(
    settings: &Settings,
    id: &str,
    tenant: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let job = job_key(settings, id, tenant)?;
    let redis = crate::service::redis_store::RedisStore::new(&settings.redis);
    let record =
        runtime()?.block_on(crate::service::status::wait_terminal(&redis, &job, timeout))?;
    let Some(r) = record else {
        return Err(Exit::tempfail(format!(
            "job `{id}` not finished after {} s",
            timeout.as_secs_f64()
        ))
        .into());
    };
    println!("{}", serde_json::to_string_pretty(&r)?);
    if r.state == JobState::Succeeded {
        return Ok(());
    }
    anyhow::bail!("job `{id}` {}", r.state)
}

/// The runtime of the commands that talk to the services.
pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// The job an operator command names: its id, and in a multi-tenant fleet its tenant.
fn job_key(settings: &Settings, id: &str, tenant: Option<&str>) -> anyhow::Result<JobKey> {
    if !crate::job::valid_id(id) {
        return Err(Exit::usage(format!("`{id}` is not a valid job id")).into());
    }
    match (settings.tenancy.mode, tenant) {
        (TenancyMode::Single, None) => Ok(JobKey::single(id)),
        (TenancyMode::Single, Some(_)) => {
            Err(Exit::usage("--tenant names a tenant, but tenancy.mode is single").into())
        }
        (TenancyMode::Multi, None) => {
            Err(Exit::usage("a multi-tenant fleet needs --tenant NAME (the job's tenant)").into())
        }
        (TenancyMode::Multi, Some(t)) if settings.tenants.contains_key(t) => {
            Ok(JobKey::new(Scope::tenant(t), id))
        }
        (TenancyMode::Multi, Some(t)) => {
            Err(Exit::usage(format!("`{t}` is not a configured tenant")).into())
        }
    }
}
