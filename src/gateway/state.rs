//! What every request of the gateway shares: settings, keys, Redis, storage (for presigned
//! URLs), the publisher, the event hub and the metrics.

use std::sync::Arc;

use tokio::sync::watch;

use super::{auth, broker, events, metrics};
use crate::config::Settings;
use crate::service::redis_store::RedisStore;
use crate::service::storage::Storage;
use crate::service::tenancy::Tenancy;

/// What every request shares.
pub struct Gateway {
    pub settings: Settings,
    pub tenancy: Tenancy,
    pub keys: auth::Keys,
    pub redis: RedisStore,
    pub storage: Box<dyn Storage>,
    pub publisher: broker::Publisher,
    pub hub: Arc<events::Hub>,
    pub metrics: metrics::GatewayMetrics,
    /// This replica's name (the `worker` of the `queued` records it writes).
    pub name: String,
    /// The models that have a queue.
    pub models: Vec<String>,
    /// True once a drain began.
    pub draining: watch::Receiver<bool>,
}

impl Gateway {
    /// Everything but the listener: keys, Redis, storage (for presigned URLs), the publisher
    /// and the event hub. `draining` flips to true when a drain begins.
    pub async fn new(settings: Settings, draining: watch::Receiver<bool>) -> anyhow::Result<Self> {
        let keys = auth::Keys::load(&settings)?;
        let redis = RedisStore::new(&settings.redis);
        let storage = crate::service::storage::from_settings(&settings.storage)
            .await
            .map_err(|e| anyhow::anyhow!("storage: {}", e.0))?;
        let name = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .map(|h| format!("gateway/{h}"))
            .unwrap_or_else(|| "gateway".into());
        let publisher = broker::Publisher::new(&settings.amqp, &format!("r2f-{name}"));
        Ok(Self {
            tenancy: Tenancy::from_settings(&settings),
            models: settings.routed_models(),
            hub: events::Hub::start(redis.clone()),
            keys,
            redis,
            storage,
            publisher,
            metrics: metrics::GatewayMetrics::new(),
            name,
            draining,
            settings,
        })
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Whether the gateway can take jobs: not draining, the broker reachable and not blocking
    /// publishers, Redis reachable.
    pub async fn ready(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("draining".into());
        }
        self.publisher.ready().await.map_err(str::to_string)?;
        self.redis
            .query::<String>(&redis::cmd("PING"))
            .await
            .map_err(|e| format!("Redis: {e}"))?;
        Ok(())
    }
}
