//! A Redis connection that is optional by design: every operation has a timeout, and when Redis
//! is down the caller goes on without it (the plan cache is bypassed, the job lock skipped).

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::Mutex;

use crate::config::{redact_text, RedisSettings};

#[derive(Debug, thiserror::Error)]
#[error("redis unavailable: {0}")]
pub struct RedisUnavailable(pub String);

#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Option<redis::Client>,
    conn: Mutex<Option<ConnectionManager>>,
    last_attempt: Mutex<Option<Instant>>,
    timeout: Duration,
    prefix: String,
    init_error: Option<String>,
}

impl RedisStore {
    pub fn new(s: &RedisSettings) -> Self {
        // rediss://: the process's TLS configuration (the system roots plus tls.ca_file, the
        // client certificate).
        let client = if s.url.starts_with("rediss://") {
            redis::Client::build_with_tls(s.url.as_str(), crate::service::tls::get().redis())
        } else {
            redis::Client::open(s.url.as_str())
        };
        let (client, init_error) = match client {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(redact_text(&e.to_string()))),
        };
        Self {
            inner: Arc::new(Inner {
                client,
                conn: Mutex::new(None),
                last_attempt: Mutex::new(None),
                timeout: Duration::from_millis(s.timeout_ms.max(50)),
                prefix: s.key_prefix.clone(),
                init_error,
            }),
        }
    }

    /// `<prefix>:<parts...>`.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut k = self.inner.prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    /// The client, or why the URL gave none.
    fn client(&self) -> Result<&redis::Client, RedisUnavailable> {
        self.inner
            .client
            .as_ref()
            .ok_or_else(|| RedisUnavailable(self.inner.init_error.clone().unwrap_or_default()))
    }

    async fn connection(&self) -> Result<ConnectionManager, RedisUnavailable> {
        let mut guard = self.inner.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let client = self.client()?;
        // Do not hammer a Redis that is down: one connection attempt per second at most.
        {
            let mut last = self.inner.last_attempt.lock().await;
            if let Some(t) = *last {
                if t.elapsed() < Duration::from_secs(1) {
                    return Err(RedisUnavailable("recently unreachable".into()));
                }
            }
            *last = Some(Instant::now());
        }
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.inner.timeout))
            .set_response_timeout(Some(self.inner.timeout))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(
            self.inner.timeout * 2,
            ConnectionManager::new_with_config(client.clone(), cfg),
        )
        .await
        .map_err(|_| RedisUnavailable("connect timed out".into()))?
        .map_err(|e| RedisUnavailable(redact_text(&e.to_string())))?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn forget(&self) {
        *self.inner.conn.lock().await = None;
    }

    /// Runs one command with the timeout; a failure drops the connection for a fresh one later.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, RedisUnavailable> {
        let mut conn = self.connection().await?;
        match tokio::time::timeout(self.inner.timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.forget().await;
                }
                Err(RedisUnavailable(redact_text(&e.to_string())))
            }
            Err(_) => {
                self.forget().await;
                Err(RedisUnavailable("command timed out".into()))
            }
        }
    }

    /// SET key value NX PX ttl: true when this caller took the key.
    pub async fn set_nx(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, RedisUnavailable> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64);
        let r: Option<String> = self.query(&cmd).await?;
        Ok(r.is_some())
    }

    /// Extends the TTL of `key` when it still holds `value`.
    pub async fn renew(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, RedisUnavailable> {
        let script = redis::cmd("EVAL")
            .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end")
            .arg(1)
            .arg(key)
            .arg(value)
            .arg(ttl.as_millis() as u64)
            .clone();
        let n: i64 = self.query(&script).await?;
        Ok(n == 1)
    }

    /// Deletes `key` when it still holds `value`.
    pub async fn release(&self, key: &str, value: &str) -> Result<(), RedisUnavailable> {
        let script = redis::cmd("EVAL")
            .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end")
            .arg(1)
            .arg(key)
            .arg(value)
            .clone();
        let _: i64 = self.query(&script).await?;
        Ok(())
    }

    /// A subscription to `channel` on a connection of its own (publish/subscribe).
    pub async fn subscribe(&self, channel: &str) -> Result<redis::aio::PubSub, RedisUnavailable> {
        let client = self.client()?;
        let subscribe = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        tokio::time::timeout(self.inner.timeout * 2, subscribe)
            .await
            .map_err(|_| RedisUnavailable("subscribe timed out".into()))?
            .map_err(|e| RedisUnavailable(redact_text(&e.to_string())))
    }

    /// A subscription to every channel matching `pattern`, on a connection of its own.
    pub async fn psubscribe(&self, pattern: &str) -> Result<redis::aio::PubSub, RedisUnavailable> {
        let client = self.client()?;
        let subscribe = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(pattern).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        tokio::time::timeout(self.inner.timeout * 2, subscribe)
            .await
            .map_err(|_| RedisUnavailable("subscribe timed out".into()))?
            .map_err(|e| RedisUnavailable(redact_text(&e.to_string())))
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>, RedisUnavailable> {
        self.query(redis::cmd("GET").arg(key)).await
    }

    pub async fn set_ex(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<(), RedisUnavailable> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis() as u64);
        let _: () = self.query(&cmd).await?;
        Ok(())
    }

    pub async fn incr_with_ttl(&self, key: &str, ttl: Duration) -> Result<i64, RedisUnavailable> {
        let n: i64 = self.query(redis::cmd("INCR").arg(key)).await?;
        let _: i64 = self
            .query(redis::cmd("PEXPIRE").arg(key).arg(ttl.as_millis() as u64))
            .await?;
        Ok(n)
    }
}
