//! Broker plumbing shared by the worker, the gateway and `r2f enqueue`: connection, topology,
//! confirmed publishing.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::{redact_text, AmqpSettings, QueueType};

/// A broker error with any credentials removed from its text.
pub fn amqp_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("broker: {}", redact_text(&e.to_string()))
}

/// A connection named `name`; `amqps://` with the process's TLS configuration
/// ([`crate::service::tls`]: the system roots plus `tls.ca_file`, the client certificate).
pub async fn connect(s: &AmqpSettings, name: &str) -> anyhow::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let runtime = lapin::runtime::default_runtime().map_err(amqp_error)?;
    let tls = crate::service::tls::get().amqp();
    Connection::connect_with_config(&s.url, props, tls, runtime)
        .await
        .map_err(amqp_error)
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

/// `args` for a durable queue of the configured type: quorum queues get their type and, when
/// they dead-letter (`args` names an `x-dead-letter-exchange`), at-least-once dead-lettering
/// (which needs `reject-publish` overflow).
fn typed(s: &AmqpSettings, mut args: FieldTable) -> FieldTable {
    if s.queue_type == QueueType::Quorum {
        args.insert("x-queue-type".into(), header_str("quorum"));
        if args.inner().contains_key("x-dead-letter-exchange") {
            args.insert("x-dead-letter-strategy".into(), header_str("at-least-once"));
            args.insert("x-overflow".into(), header_str("reject-publish"));
        }
    }
    args
}

/// The arguments of a jobs queue: dead-letters to the dead-letter queue; classic queues carry
/// `max_priority` levels, quorum queues their own two levels and the broker's delivery limit.
fn jobs_queue_args(s: &AmqpSettings) -> FieldTable {
    let mut args = dead_letter_to(&s.dead_letter_queue);
    match s.queue_type {
        QueueType::Classic => args.insert(
            "x-max-priority".into(),
            AMQPValue::ShortShortUInt(s.max_priority),
        ),
        QueueType::Quorum => args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(s.delivery_limit.min(i32::MAX as u32) as i32),
        ),
    };
    typed(s, args)
}

/// Declares durable queue `name` of the configured type with `args`; a queue that exists with
/// other arguments (another type) is an error that says what to do.
async fn declare_queue(
    ch: &Channel,
    s: &AmqpSettings,
    name: &str,
    args: FieldTable,
) -> anyhow::Result<()> {
    ch.queue_declare(name.into(), durable(), typed(s, args))
        .await
        .map_err(|e| {
            let text = e.to_string();
            if text.contains("PRECONDITION_FAILED") {
                anyhow::anyhow!(
                    "broker: queue `{name}` exists with other arguments than amqp.queue_type = \
                     \"{}\" asks for ({}); a queue keeps its type: see \"Quorum queues\" in the \
                     README to migrate",
                    s.queue_type,
                    redact_text(&text)
                )
            } else {
                amqp_error(e)
            }
        })?;
    Ok(())
}

/// The fanout exchange that takes what the jobs exchange cannot route, into the inbox.
pub fn unrouted_exchange(s: &AmqpSettings) -> String {
    format!("{}.unrouted", s.jobs_exchange)
}

/// Declares (idempotently) the events exchange, the dead-letter queue, the jobs exchange with
/// its queue per model (of `models`, each bound with the model's name as routing key), and the
/// inbox, which takes jobs published to it directly and those the exchange cannot route.
pub async fn declare_topology(
    ch: &Channel,
    s: &AmqpSettings,
    models: &[String],
) -> anyhow::Result<()> {
    let exchange = |name: &str, kind: ExchangeKind, args: FieldTable| {
        let name = name.to_string();
        async move {
            ch.exchange_declare(
                name.as_str().into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                args,
            )
            .await
            .map_err(amqp_error)
        }
    };
    exchange(
        &s.events_exchange,
        ExchangeKind::Topic,
        FieldTable::default(),
    )
    .await?;
    declare_queue(ch, s, &s.dead_letter_queue, FieldTable::default()).await?;
    let unrouted = unrouted_exchange(s);
    exchange(&unrouted, ExchangeKind::Fanout, FieldTable::default()).await?;
    let mut alternate = FieldTable::default();
    alternate.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(LongString::from(unrouted.as_str())),
    );
    exchange(&s.jobs_exchange, ExchangeKind::Direct, alternate).await?;
    declare_queue(ch, s, &s.inbox_queue, jobs_queue_args(s)).await?;
    bind(ch, &s.inbox_queue, &unrouted, "").await?;
    for model in models {
        let queue = s.queue_of(model);
        declare_queue(ch, s, &queue, jobs_queue_args(s)).await?;
        bind(ch, &queue, &s.jobs_exchange, model).await?;
    }
    // The webhook outbox: deliveries, their delayed retries (dead-lettering back into the
    // outbox when their per-message TTL runs out) and the deliveries given up.
    for (queue, args) in [
        (s.webhooks_queue.clone(), FieldTable::default()),
        (webhooks_retry_queue(s), dead_letter_to(&s.webhooks_queue)),
        (webhooks_dead_queue(s), FieldTable::default()),
    ] {
        declare_queue(ch, s, &queue, args).await?;
    }
    // Control messages: clients publish `cancel` to the exchange; workers share the queue.
    exchange(
        &s.control_exchange,
        ExchangeKind::Direct,
        FieldTable::default(),
    )
    .await?;
    declare_queue(ch, s, &s.control_queue, FieldTable::default()).await?;
    bind(ch, &s.control_queue, &s.control_exchange, CANCEL).await?;
    Ok(())
}

/// The routing key of a cancel request on the control exchange.
pub const CANCEL: &str = "cancel";

/// Where webhook deliveries wait for their next attempt.
pub fn webhooks_retry_queue(s: &AmqpSettings) -> String {
    format!("{}.retry", s.webhooks_queue)
}

/// Where webhook deliveries that were given up go, with their last answer.
pub fn webhooks_dead_queue(s: &AmqpSettings) -> String {
    format!("{}.dead", s.webhooks_queue)
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> anyhow::Result<()> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(amqp_error)
}

/// A server-named, exclusive, auto-deleted queue: a client's own queue for events or replies.
pub async fn declare_private_queue(ch: &Channel) -> anyhow::Result<lapin::Queue> {
    ch.queue_declare(
        "".into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(amqp_error)
}

/// A channel in confirm mode.
pub async fn confirm_channel(conn: &Connection) -> anyhow::Result<Channel> {
    let ch = conn.create_channel().await.map_err(amqp_error)?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp_error)?;
    Ok(ch)
}

/// Publishes a message that must reach a queue (`mandatory`) and waits for the broker's
/// confirm, at most `timeout`; a nack, a message returned as unroutable (a deleted queue), or no
/// confirm in time, is an error (the caller does not ack what it was moving).
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    publish_with(ch, exchange, routing_key, body, props, timeout, true).await
}

/// [`publish_confirmed`] for a message nobody need receive (an event on the events exchange,
/// which has no binding until a client subscribes): not mandatory.
pub async fn publish_confirmed_optional(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    publish_with(ch, exchange, routing_key, body, props, timeout, false).await
}

async fn publish_with(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
    timeout: std::time::Duration,
    mandatory: bool,
) -> anyhow::Result<()> {
    let publish = async {
        ch.basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
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
    match confirm {
        lapin::Confirmation::Nack(_) => {
            anyhow::bail!("broker: publish to `{exchange}`/`{routing_key}` was nacked")
        }
        lapin::Confirmation::Ack(Some(returned)) => anyhow::bail!(
            "broker: publish to `{exchange}`/`{routing_key}` was returned: {} {} (no queue \
             takes it: a deleted or undeclared queue)",
            returned.reply_code,
            returned.reply_text
        ),
        _ => Ok(()),
    }
}

/// The AMQP `message_id` for a job id, when it can be one. Ids come from messages: an id of
/// 256 bytes or more does not fit a short string (lapin panics on it), and an id that failed
/// validation is not worth carrying.
pub fn message_id(id: &str) -> Option<ShortString> {
    crate::job::valid_id(id).then(|| ShortString::from(id))
}

/// `model`'s retry queue of backoff level `level` (0: give-back and postpone; n: after attempt
/// n). One queue per level, so a long delay never holds up a short one behind it.
pub fn retry_level_queue(s: &AmqpSettings, model: &str, level: u32) -> String {
    format!("{}.{level}", s.retry_queue_of(model))
}

/// Declares `model`'s retry queues of levels 0..=levels; each dead-letters back into the
/// model's jobs queue.
pub async fn declare_retry_levels(
    ch: &Channel,
    s: &AmqpSettings,
    model: &str,
    levels: u32,
) -> anyhow::Result<()> {
    for level in 0..=levels {
        let queue = retry_level_queue(s, model, level);
        declare_queue(ch, s, &queue, dead_letter_to(&s.queue_of(model))).await?;
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
