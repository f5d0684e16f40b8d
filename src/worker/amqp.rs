//! Broker plumbing shared by the worker and `r2f enqueue`: connection, topology, confirmed
//! publishing.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::{redact_text, AmqpSettings};

/// A broker error with any credentials removed from its text.
pub fn amqp_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("broker: {}", redact_text(&e.to_string()))
}

pub async fn connect(s: &AmqpSettings, name: &str) -> anyhow::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(&s.url, props).await.map_err(amqp_error)
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Queue arguments that dead-letter expired or rejected messages to `queue` (default exchange).
fn dead_letter_to(queue: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(queue)),
    );
    args
}

/// Declares (idempotently) the events exchange, the jobs queue with its dead-letter route, the
/// dead-letter queue and the retry queue that dead-letters back into the jobs queue.
pub async fn declare_topology(ch: &Channel, s: &AmqpSettings) -> anyhow::Result<()> {
    ch.exchange_declare(
        s.events_exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(amqp_error)?;
    ch.queue_declare(
        s.dead_letter_queue.as_str().into(),
        durable(),
        FieldTable::default(),
    )
    .await
    .map_err(amqp_error)?;
    let mut jobs = dead_letter_to(&s.dead_letter_queue);
    jobs.insert(
        "x-max-priority".into(),
        AMQPValue::ShortShortUInt(s.max_priority),
    );
    ch.queue_declare(s.jobs_queue.as_str().into(), durable(), jobs)
        .await
        .map_err(amqp_error)?;
    ch.queue_declare(
        s.retry_queue.as_str().into(),
        durable(),
        dead_letter_to(&s.jobs_queue),
    )
    .await
    .map_err(amqp_error)?;
    Ok(())
}

/// A channel in confirm mode.
pub async fn confirm_channel(conn: &Connection) -> anyhow::Result<Channel> {
    let ch = conn.create_channel().await.map_err(amqp_error)?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp_error)?;
    Ok(ch)
}

/// Publishes and waits for the broker's confirm, at most `timeout`; a nack, or no confirm in
/// time, is an error (the caller treats the connection as broken).
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let publish = async {
        ch.basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .map_err(amqp_error)?
        .await
        .map_err(amqp_error)
    };
    let confirm = tokio::time::timeout(timeout, publish).await.map_err(|_| {
        anyhow::anyhow!(
            "broker: no confirm for a publish to `{exchange}`/`{routing_key}` within {} s",
            timeout.as_secs()
        )
    })??;
    if confirm.is_nack() {
        anyhow::bail!("broker: publish to `{exchange}`/`{routing_key}` was nacked");
    }
    Ok(())
}

/// The AMQP `message_id` for a job id, when it can be one. Ids come from messages: an id of
/// 256 bytes or more does not fit a short string (lapin panics on it), and an id that failed
/// validation is not worth carrying.
pub fn message_id(id: &str) -> Option<ShortString> {
    crate::job::valid_id(id).then(|| ShortString::from(id))
}

/// The retry queue of backoff level `level` (0: give-back and postpone; n: after attempt n).
/// One queue per level, so a long delay never holds up a short one behind it.
pub fn retry_level_queue(s: &AmqpSettings, level: u32) -> String {
    format!("{}.{level}", s.retry_queue)
}

/// Declares the per-level retry queues 0..=levels; each dead-letters back into the jobs queue.
pub async fn declare_retry_levels(
    ch: &Channel,
    s: &AmqpSettings,
    levels: u32,
) -> anyhow::Result<()> {
    for level in 0..=levels {
        let queue = retry_level_queue(s, level);
        ch.queue_declare(
            queue.as_str().into(),
            durable(),
            dead_letter_to(&s.jobs_queue),
        )
        .await
        .map_err(amqp_error)?;
    }
    Ok(())
}

pub fn header_str(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

/// A persistent JSON message.
pub fn json_props() -> BasicProperties {
    BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2)
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
