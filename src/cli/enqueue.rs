//! `r2f enqueue FILE.jsonl`: publish jobs (one JSON object a line) with publisher confirms, each
//! to the jobs exchange with its model as routing key.

use std::io::BufRead;

use crate::config::Settings;
use crate::worker::amqp;

pub struct EnqueueReport {
    pub accepted: Vec<String>,
    /// (line number, reason)
    pub refused: Vec<(usize, String)>,
}

/// Publishes each line; lines that are not JSON objects with an `id`, or that name a model no
/// queue exists for, are refused locally (a worker would only dead-letter them). Every accepted
/// message was confirmed by the broker.
pub async fn enqueue(settings: &Settings, input: impl BufRead) -> anyhow::Result<EnqueueReport> {
    let s = &settings.amqp;
    let conn = amqp::connect(s, "r2f-enqueue").await?;
    let ch = amqp::confirm_channel(&conn).await?;
    let models = settings.routed_models();
    amqp::declare_topology(&ch, s, &models).await?;
    let mut report = EnqueueReport {
        accepted: Vec::new(),
        refused: Vec::new(),
    };
    for (i, line) in input.lines().enumerate() {
        let lineno = i + 1;
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                report
                    .refused
                    .push((lineno, format!("not valid JSON: {e}")));
                continue;
            }
        };
        let Some(id) = value.get("id").and_then(|v| v.as_str()).map(str::to_string) else {
            report.refused.push((lineno, "no string `id` field".into()));
            continue;
        };
        let model = match value.get("model") {
            None | Some(serde_json::Value::Null) => settings.default_model().to_string(),
            Some(serde_json::Value::String(m)) => m.clone(),
            Some(_) => {
                report
                    .refused
                    .push((lineno, "`model` must be a string".into()));
                continue;
            }
        };
        if !models.contains(&model) {
            report.refused.push((
                lineno,
                format!(
                    "no queue exists for model `{model}` (models: {})",
                    models.join(", ")
                ),
            ));
            continue;
        }
        let priority = value
            .get("priority")
            .and_then(|p| p.as_u64())
            .map(|p| p.min(s.max_priority as u64) as u8)
            .unwrap_or(0);
        if !crate::job::valid_id(&id) {
            report.refused.push((
                lineno,
                "invalid `id`: 1 to 128 characters of letters, digits, '-', '_', '.', ':'".into(),
            ));
            continue;
        }
        let mut props = amqp::json_props()
            .with_timestamp(amqp::now_unix())
            .with_priority(priority);
        if let Some(mid) = amqp::message_id(&id) {
            props = props.with_message_id(mid);
        }
        let timeout = std::time::Duration::from_secs(s.confirm_timeout_secs.max(1));
        let exchange = &s.jobs_exchange;
        amqp::publish_confirmed(&ch, exchange, &model, line.as_bytes(), props, timeout).await?;
        report.accepted.push(id);
    }
    let _ = ch.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(report)
}
