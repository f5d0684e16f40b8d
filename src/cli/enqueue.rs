//! `r2f enqueue FILE.jsonl`: publish jobs (one JSON object a line) with publisher confirms, each
//! to the jobs exchange with its model as routing key.
//!
//! Every line is validated first, without the broker, by the workers' own validation
//! ([`JobMessage::validate`] with the configured limits and models): a line a worker would
//! reject is refused here, with its line number and reason. The valid lines are then published;
//! with none, the broker is never contacted.

use std::io::BufRead;

use crate::config::Settings;
use crate::job::{valid_id, JobMessage};
use crate::service::amqp;

/// One line to publish: its body, id, model (the routing key), AMQP priority and, for a
/// validated job, its fingerprint (its `queued` record and id claim are written first).
pub struct Line {
    pub number: usize,
    pub body: String,
    pub id: String,
    pub model: String,
    pub priority: u8,
    pub fingerprint: Option<String>,
}

/// What reading a file came to: the lines to publish and the lines refused (with why).
pub struct Checked {
    pub valid: Vec<Line>,
    pub refused: Vec<(usize, String)>,
}

/// Reads and checks every line. `validate` false only checks what publishing needs (a JSON
/// object with a valid `id` and a model that has a queue): a way to send workers jobs they will
/// reject, for testing them.
pub fn check(settings: &Settings, input: impl BufRead, validate: bool) -> anyhow::Result<Checked> {
    let models = settings.routed_models();
    let limits = &settings.limits;
    let mut out = Checked {
        valid: Vec::new(),
        refused: Vec::new(),
    };
    for (i, line) in input.lines().enumerate() {
        let number = i + 1;
        let body = line.map_err(|e| anyhow::anyhow!("cannot read line {number}: {e}"))?;
        if body.trim().is_empty() {
            continue;
        }
        let message = match JobMessage::parse(body.as_bytes(), limits) {
            Ok(m) => m,
            Err(r) if validate => {
                out.refused.push((number, r.0));
                continue;
            }
            Err(_) => match loose(&body) {
                Ok(m) => m,
                Err(why) => {
                    out.refused.push((number, why));
                    continue;
                }
            },
        };
        let max_priority = i64::from(settings.amqp.max_priority);
        let priority = message.priority.unwrap_or(0).clamp(0, max_priority) as u8;
        let (id, model, fingerprint) = if validate {
            match message.validate(limits, Some(&models), settings.default_model()) {
                Ok(job) => (job.id, job.model, Some(job.fingerprint)),
                Err(r) => {
                    out.refused.push((number, r.0));
                    continue;
                }
            }
        } else {
            let model = message
                .model
                .clone()
                .unwrap_or_else(|| settings.default_model().to_string());
            if !valid_id(&message.id) {
                out.refused
                    .push((number, crate::job::rules::invalid_id().0));
                continue;
            }
            if !models.contains(&model) {
                out.refused.push((
                    number,
                    format!(
                        "no queue exists for model `{model}` (models: {})",
                        models.join(", ")
                    ),
                ));
                continue;
            }
            (message.id, model, None)
        };
        out.valid.push(Line {
            number,
            body,
            id,
            model,
            priority,
            fingerprint,
        });
    }
    Ok(out)
}

/// Without validation: the id and model of anything that is a JSON object with a string `id`.
fn loose(body: &str) -> Result<JobMessage, String> {
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("not valid JSON: {e}"))?;
    let id = v
        .get("id")
        .and_then(|x| x.as_str())
        .ok_or("no string `id` field")?;
    let model = match v.get("model") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(m)) => Some(m.clone()),
        Some(_) => return Err("`model` must be a string".into()),
    };
    Ok(JobMessage {
        id: id.to_string(),
        model,
        priority: v.get("priority").and_then(|p| p.as_i64()),
        ..JobMessage::default()
    })
}

/// What publishing came to: the ids published, and the lines refused because their id is
/// another job's.
pub struct Published {
    pub ids: Vec<String>,
    pub refused: Vec<(usize, String)>,
}

/// The broker user of an AMQP URL (`guest` when it names none).
fn url_user(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .map(|u| u.username().to_string())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "guest".into())
}

/// Publishes the lines, each confirmed by the broker; a validated job is first recorded
/// `queued` under its id (best effort: without Redis it is published all the same), and a line
/// whose id another job holds is refused. An error is the broker's (unreachable, refused, a
/// confirm that did not come). In a multi-tenant fleet the jobs are the tenant's of the URL's
/// user, and carry it as `user_id`.
pub async fn publish(settings: &Settings, lines: &[Line]) -> anyhow::Result<Published> {
    use crate::service::status::{admit, Admission, Admit};
    let s = &settings.amqp;
    let user = url_user(&s.url);
    let multi = settings.tenancy.mode == crate::config::TenancyMode::Multi;
    let scope = crate::service::tenancy::Tenancy::from_settings(settings)
        .scope_of(Some(&user))
        .map_err(|r| anyhow::anyhow!("{}", r.0))?;
    let redis = crate::service::redis_store::RedisStore::new(&settings.redis);
    let conn = amqp::connect(s, "r2f-enqueue").await?;
    let ch = amqp::confirm_channel(&conn).await?;
    amqp::declare_topology(&ch, s, &settings.routed_models()).await?;
    let timeout = std::time::Duration::from_secs(s.confirm_timeout_secs.max(1));
    let ttl = std::time::Duration::from_secs(settings.redis.status_ttl_secs);
    let mut out = Published {
        ids: Vec::new(),
        refused: Vec::new(),
    };
    let mut redis_down = false;
    for line in lines {
        if let (Some(fingerprint), false) = (&line.fingerprint, redis_down) {
            let job = crate::service::tenancy::JobKey::new(scope.clone(), line.id.as_str());
            let a = Admit {
                job: &job,
                fingerprint,
                by: "r2f-enqueue",
                ttl,
                open: None,
            };
            match admit(&redis, a).await {
                Ok(Admission::Conflict) => {
                    out.refused.push((
                        line.number,
                        format!(
                            "duplicate_id: `{}` is already another job's (a message with another body); send a new id",
                            line.id
                        ),
                    ));
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "Redis unavailable: publishing without queued records");
                    redis_down = true;
                }
            }
        }
        let mut props = amqp::json_props()
            .with_timestamp(amqp::now_unix())
            .with_priority(line.priority);
        if let Some(mid) = amqp::message_id(&line.id) {
            props = props.with_message_id(mid);
        }
        if multi {
            props = props.with_user_id(user.as_str().into());
        }
        amqp::publish_confirmed(
            &ch,
            &s.jobs_exchange,
            &line.model,
            line.body.as_bytes(),
            props,
            timeout,
        )
        .await
        .map_err(|e| anyhow::anyhow!("line {}: {e}", line.number))?;
        out.ids.push(line.id.clone());
    }
    let _ = ch.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(out)
}
