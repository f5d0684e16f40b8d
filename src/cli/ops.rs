//! Operator commands: `r2f config check` (the effective configuration and a probe of each
//! dependency) and `r2f replay` (dead letters published again).

use std::path::Path;
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};

use super::args::ReplayArgs;
use super::exit::{error_line, Exit};
use super::remote::runtime;
use crate::config::{redact_text, redact_url, Settings, TenancyMode};
use crate::job::JobState;
use crate::service::amqp;
use crate::service::tenancy::{JobKey, Scope};

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// `r2f config check`: prints the effective configuration, secrets redacted, then one verdict
/// a line for the broker, Redis, storage, the LLM and the model.
pub fn config_check(
    settings: &Settings,
    file: Option<&Path>,
    no_probe: bool,
) -> anyhow::Result<()> {
    // The files the settings name are read by the commands that use them; the check reads the
    // C2PA key too.
    settings
        .c2pa
        .signer()
        .map_err(|m| Exit::config(format!("invalid configuration: {m}")))?;
    println!("# the effective configuration (defaults, file, environment; secrets redacted)");
    print!("{}", Settings::effective_toml(file)?);
    if no_probe {
        return Ok(());
    }
    println!();
    let verdicts = runtime()?.block_on(probe_all(settings));
    let mut failed = Vec::new();
    for (name, target, verdict) in &verdicts {
        match verdict {
            Ok(what) => println!("ok    {name:<8} {target}: {what}"),
            Err(why) => {
                println!("FAIL  {name:<8} {target}: {why}");
                failed.push(*name);
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Exit::unavailable(format!(
            "{} of {} dependencies unavailable: {}",
            failed.len(),
            verdicts.len(),
            failed.join(", ")
        ))
        .into())
    }
}

type Verdict = (&'static str, String, Result<String, String>);

async fn probe_all(s: &Settings) -> Vec<Verdict> {
    let (broker, redis, storage, llm) = tokio::join!(
        timed(probe_broker(s)),
        timed(probe_redis(s)),
        timed(probe_storage(s)),
        timed(probe_llm(s)),
    );
    let storage_target = match s.storage.backend {
        crate::config::StorageBackend::S3 => format!(
            "s3://{} ({})",
            s.storage.bucket,
            if s.storage.s3.endpoint.is_empty() {
                "AWS".to_string()
            } else {
                redact_url(&s.storage.s3.endpoint)
            }
        ),
        crate::config::StorageBackend::Local => format!("file://{}", s.storage.local_dir),
    };
    let mut out = vec![
        ("broker", redact_url(&s.amqp.url), broker),
        ("redis", redact_url(&s.redis.url), redis),
        ("storage", storage_target, storage),
    ];
    if s.llm.enabled {
        out.push(("llm", redact_url(&s.llm.base_url), llm));
    }
    let model = s.worker.model.clone();
    let source = s.model_source(&model);
    out.push(("model", format!("{model} ({source})"), probe_model(&source)));
    out
}

/// A probe with [`PROBE_TIMEOUT`] and its duration in the verdict.
async fn timed(
    probe: impl std::future::Future<Output = anyhow::Result<String>>,
) -> Result<String, String> {
    let started = Instant::now();
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(what)) => Ok(format!("{what} ({} ms)", started.elapsed().as_millis())),
        Ok(Err(e)) => Err(redact_text(&error_line(&e))),
        Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    }
}

async fn probe_broker(s: &Settings) -> anyhow::Result<String> {
    let conn = amqp::connect(&s.amqp, "r2f-config-check").await?;
    let ch = conn.create_channel().await.map_err(amqp::amqp_error)?;
    let _ = ch.close(200, "checked".into()).await;
    let _ = conn.close(200, "checked".into()).await;
    Ok("connected, a channel opened".into())
}

async fn probe_redis(s: &Settings) -> anyhow::Result<String> {
    let redis = crate::service::redis_store::RedisStore::new(&s.redis);
    let pong: String = redis
        .query(&redis::cmd("PING"))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(format!("answered {pong}"))
}

async fn probe_storage(s: &Settings) -> anyhow::Result<String> {
    let storage = crate::service::storage::from_settings(&s.storage)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    storage.check().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok("reachable; a missing object reads as missing".into())
}

async fn probe_llm(s: &Settings) -> anyhow::Result<String> {
    if !s.llm.enabled {
        return Ok("disabled".into());
    }
    let key = s.llm.api_key()?;
    // As the worker's planner reaches it: the process's TLS configuration.
    let http = crate::service::tls::get()
        .http(reqwest::Client::builder())
        .timeout(PROBE_TIMEOUT)
        .build()?;
    let url = format!("{}/models", s.llm.base_url.trim_end_matches('/'));
    let mut req = http.get(&url);
    if let Some(k) = &key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let status = resp.status();
    match status.as_u16() {
        200..=299 => Ok(format!("answered {status}")),
        401 | 403 => anyhow::bail!("refused the API key ({status})"),
        // Servers without a model list still answer chat completions.
        404 | 405 => Ok(format!("reachable ({status} for /models)")),
        _ => anyhow::bail!("answered {status}"),
    }
}

fn probe_model(source: &str) -> Result<String, String> {
    let path = Path::new(source);
    if path.is_dir() {
        return if path.join("model_index.json").is_file() {
            Ok("local folder with model_index.json".into())
        } else {
            Err("local folder without model_index.json: not a diffusers-layout model".into())
        };
    }
    if crate::models::hub::is_hub_id(source) {
        Ok("a Hugging Face Hub id (fetched or taken from the cache at start)".into())
    } else {
        Err(format!("model folder `{source}` does not exist"))
    }
}

/// `r2f replay`: dead letters matching the filters go back to their model's queue, as new.
pub fn replay(settings: &Settings, a: ReplayArgs) -> anyhow::Result<()> {
    let scope = match (settings.tenancy.mode, a.tenant.as_deref()) {
        (TenancyMode::Single, None) => Scope::single(),
        (TenancyMode::Single, Some(_)) => {
            return Err(Exit::usage("--tenant names a tenant, but tenancy.mode is single").into())
        }
        (TenancyMode::Multi, None) => {
            return Err(Exit::usage("a multi-tenant fleet needs --tenant NAME").into())
        }
        (TenancyMode::Multi, Some(t)) if settings.tenants.contains_key(t) => Scope::tenant(t),
        (TenancyMode::Multi, Some(t)) => {
            return Err(Exit::usage(format!("`{t}` is not a configured tenant")).into())
        }
    };
    if let Some(st) = &a.status {
        if st != JobState::Failed.name() && st != JobState::Rejected.name() {
            return Err(Exit::usage(format!("--status is failed or rejected, not `{st}`")).into());
        }
    }
    runtime()?.block_on(replay_async(settings, &a, &scope))
}

/// One dead letter as `r2f replay` sees it.
struct DeadLetter {
    id: String,
    model: String,
    status: String,
    reason: String,
    user: Option<String>,
}

impl DeadLetter {
    fn of(d: &lapin::message::BasicGetMessage, default_model: &str) -> Self {
        let body: Option<serde_json::Value> = serde_json::from_slice(&d.delivery.data).ok();
        let field = |k: &str| {
            body.as_ref()
                .and_then(|b| b.get(k))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        let header = |k: &str| {
            d.delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(k))
                .and_then(|v| match v {
                    AMQPValue::LongString(s) => Some(s.to_string()),
                    AMQPValue::ShortString(s) => Some(s.to_string()),
                    _ => None,
                })
                .unwrap_or_default()
        };
        Self {
            id: field("id").unwrap_or_default(),
            model: field("model").unwrap_or_else(|| default_model.to_string()),
            status: header("x-r2f-status"),
            reason: header("x-r2f-reason"),
            user: d
                .delivery
                .properties
                .user_id()
                .as_ref()
                .map(|u| u.to_string()),
        }
    }

    fn selected(&self, a: &ReplayArgs, settings: &Settings, scope: &Scope) -> bool {
        let tenant_ok = match scope.name() {
            None => true,
            Some(t) => self.user.as_deref().is_some_and(|u| {
                settings
                    .tenants
                    .get(t)
                    .map(|ts| {
                        if ts.users.is_empty() {
                            u == t
                        } else {
                            ts.users.iter().any(|x| x == u)
                        }
                    })
                    .unwrap_or(false)
            }),
        };
        tenant_ok
            && a.reason
                .as_ref()
                .is_none_or(|r| self.reason.to_lowercase().contains(&r.to_lowercase()))
            && a.status.as_ref().is_none_or(|s| &self.status == s)
            && a.model.as_ref().is_none_or(|m| &self.model == m)
            && (a.ids.is_empty() || a.ids.contains(&self.id))
    }
}

/// The headers a replayed job loses: its attempt, routing and delivery counts, and the marks of
/// its dead-lettering.
fn replay_headers(h: Option<&FieldTable>) -> FieldTable {
    let mut out = FieldTable::default();
    if let Some(h) = h {
        for (k, v) in h.inner() {
            let k = k.as_str();
            let dropped = k.starts_with("x-r2f-")
                || k.starts_with("x-death")
                || k.starts_with("x-first-death")
                || k.starts_with("x-last-death")
                || k == "x-delivery-count";
            if !dropped {
                out.insert(k.into(), v.clone());
            }
        }
    }
    out.insert(
        "x-r2f-replayed-at".into(),
        AMQPValue::LongLongInt(amqp::now_unix() as i64),
    );
    out
}

async fn replay_async(settings: &Settings, a: &ReplayArgs, scope: &Scope) -> anyhow::Result<()> {
    let s = &settings.amqp;
    let conn = amqp::connect(s, "r2f-replay")
        .await
        .map_err(|e| Exit::unavailable(format!("broker: {}", error_line(&e))))?;
    let get = conn.create_channel().await.map_err(amqp::amqp_error)?;
    let publish = amqp::confirm_channel(&conn).await?;
    let storage = if a.apply {
        Some(
            crate::service::storage::from_settings(&settings.storage)
                .await
                .map_err(|e| Exit::unavailable(format!("storage: {e}")))?,
        )
    } else {
        None
    };
    let redis = crate::service::redis_store::RedisStore::new(&settings.redis);
    let routed = settings.routed_models();
    let default_model = settings.default_model().to_string();
    // Every dead letter is taken (unacked) before any is settled, so none is seen twice; the
    // ones not replayed go back in their places when the channel closes.
    let mut held = Vec::new();
    while held.len() < a.limit {
        match get
            .basic_get(
                s.dead_letter_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .map_err(amqp::amqp_error)?
        {
            Some(m) => held.push(m),
            None => break,
        }
    }
    let (mut replayed, mut selected, mut failed) = (0usize, 0usize, 0usize);
    for m in &held {
        let dl = DeadLetter::of(m, &default_model);
        if !dl.selected(a, settings, scope) {
            continue;
        }
        selected += 1;
        let queue = if routed.contains(&dl.model) {
            s.queue_of(&dl.model)
        } else {
            s.inbox_queue.clone()
        };
        let line = format!(
            "{} model={} status={} reason={:?} -> {queue}",
            if dl.id.is_empty() { "-" } else { &dl.id },
            dl.model,
            dl.status,
            dl.reason
        );
        if !a.apply {
            println!("would replay {line}");
            continue;
        }
        match replay_one(
            settings,
            &publish,
            storage.as_deref(),
            &redis,
            scope,
            m,
            &dl,
            &queue,
        )
        .await
        {
            Ok(()) => {
                m.delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(amqp::amqp_error)?;
                replayed += 1;
                println!("replayed {line}");
            }
            Err(e) => {
                failed += 1;
                println!("not replayed {line}: {}", error_line(&e));
            }
        }
    }
    for m in &held {
        // Requeued in place; acked ones are gone already (a second settle is refused quietly).
        let _ = m
            .delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await;
    }
    let _ = conn.close(200, "replayed".into()).await;
    if a.apply {
        println!(
            "{replayed} replayed, {failed} not, of {selected} selected ({} dead letters looked at)",
            held.len()
        );
    } else {
        println!(
            "dry run: {selected} of {} dead letters would be replayed; --apply replays them",
            held.len()
        );
    }
    if failed > 0 {
        return Err(Exit::unavailable(format!("{failed} dead letter(s) not replayed")).into());
    }
    Ok(())
}

/// Clears the stored failure and the status of one dead letter and publishes it to `queue`.
#[allow(clippy::too_many_arguments)]
async fn replay_one(
    settings: &Settings,
    publish: &lapin::Channel,
    storage: Option<&dyn crate::service::storage::Storage>,
    redis: &crate::service::redis_store::RedisStore,
    scope: &Scope,
    m: &lapin::message::BasicGetMessage,
    dl: &DeadLetter,
    queue: &str,
) -> anyhow::Result<()> {
    let valid = crate::job::valid_id(&dl.id);
    if valid {
        // The stored failure would be published again instead of running the job.
        if let (Some(storage), Ok(job)) = (
            storage,
            crate::job::validate::validate_message(
                &m.delivery.data,
                &settings.limits,
                &settings.routed_models(),
                settings.default_model(),
            ),
        ) {
            let key = crate::worker::lifecycle::result_key(&settings.storage.prefix, scope, &job);
            storage
                .delete(&key)
                .await
                .map_err(|e| anyhow::anyhow!("clearing the stored failure {key}: {e}"))?;
        }
    }
    let props = m
        .delivery
        .properties
        .clone()
        .with_headers(replay_headers(m.delivery.properties.headers().as_ref()))
        .with_delivery_mode(2)
        .with_timestamp(amqp::now_unix());
    amqp::publish_confirmed(
        publish,
        "",
        queue,
        &m.delivery.data,
        props,
        Duration::from_secs(settings.amqp.confirm_timeout_secs.max(1)),
    )
    .await?;
    if valid {
        crate::service::status::record(
            redis,
            Duration::from_secs(settings.redis.status_ttl_secs),
            crate::service::status::Update {
                job: &JobKey::new(scope.clone(), dl.id.clone()),
                state: JobState::Queued,
                attempt: 1,
                worker: "r2f replay",
                reason: Some("replayed from the dead-letter queue"),
                result: None,
            },
        )
        .await;
    }
    Ok(())
}
