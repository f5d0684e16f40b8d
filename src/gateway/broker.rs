//! The gateway's publisher: one broker connection with a confirm channel, opened on first use
//! and again after it breaks, shared by every request (confirms are waited for per message).
//! A blocked connection (the broker's memory or disk alarm) makes the gateway not ready.

use std::time::Duration;

use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;

use crate::config::AmqpSettings;
use crate::service::amqp;

pub struct Publisher {
    settings: AmqpSettings,
    name: String,
    open: Mutex<Option<(Connection, Channel)>>,
}

impl Publisher {
    pub fn new(settings: &AmqpSettings, name: &str) -> Self {
        Self {
            settings: settings.clone(),
            name: name.to_string(),
            open: Mutex::new(None),
        }
    }

    /// The confirm channel, opening the connection when there is none (or it broke).
    async fn channel(&self) -> anyhow::Result<Channel> {
        let mut open = self.open.lock().await;
        if let Some((conn, ch)) = open.as_ref() {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        *open = None;
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            amqp::connect(&self.settings, &self.name),
        )
        .await
        .map_err(|_| anyhow::anyhow!("broker: connection timed out"))??;
        let ch = amqp::confirm_channel(&conn).await?;
        *open = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Publishes to `exchange`/`routing_key` and waits for the broker's confirm; a failure
    /// drops the connection (the next publish opens a new one).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> anyhow::Result<()> {
        let ch = self.channel().await?;
        let timeout = Duration::from_secs(self.settings.confirm_timeout_secs.max(1));
        let result =
            amqp::publish_confirmed(&ch, exchange, routing_key, body, props, timeout).await;
        if result.is_err() {
            let mut open = self.open.lock().await;
            if let Some((conn, _)) = open.take() {
                let _ = conn.close(200, "publish failed".into()).await;
            }
        }
        result
    }

    /// Whether the broker can be reached (opening the connection if needed) and does not
    /// block publishers (`connection.blocked`: a memory or disk alarm).
    pub async fn ready(&self) -> Result<(), &'static str> {
        if self.channel().await.is_err() {
            return Err("the broker is unreachable");
        }
        match self.open.lock().await.as_ref() {
            Some((conn, _)) if conn.status().blocked() => {
                Err("the broker blocks publishers (memory or disk alarm)")
            }
            _ => Ok(()),
        }
    }

    /// Closes the connection (at the end of a drain).
    pub async fn close(&self) {
        if let Some((conn, _)) = self.open.lock().await.take() {
            let _ = conn.close(200, "gateway stopping".into()).await;
        }
    }
}
