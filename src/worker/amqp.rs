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
    let mut jobs = FieldTable::default();
    jobs.insert(
        "x-max-priority".into(),
        AMQPValue::ShortShortUInt(s.max_priority),
    );
    jobs.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    jobs.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(s.dead_letter_queue.as_str())),
    );
    ch.queue_declare(s.jobs_queue.as_str().into(), durable(), jobs)
        .await
        .map_err(amqp_error)?;
    let mut retry = FieldTable::default();
    retry.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    retry.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(s.jobs_queue.as_str())),
    );
    ch.queue_declare(s.retry_queue.as_str().into(), durable(), retry)
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

/// Publishes and waits for the broker's confirm; a nack is an error.
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> anyhow::Result<()> {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .map_err(amqp_error)?
        .await
        .map_err(amqp_error)?;
    if confirm.is_nack() {
        anyhow::bail!("broker: publish to `{exchange}`/`{routing_key}` was nacked");
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
