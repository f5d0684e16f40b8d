//! What a tenant may ask of the gateway: requests per second (a token bucket kept in Redis as
//! GCRA, so that every gateway replica counts against the same bucket) and jobs open at once
//! (counted by the status records, `service::status::admit`), each with the tenant's own
//! figures or the gateway's; and `Idempotency-Key`s, which name the job of a first request.

use std::time::Duration;

use crate::config::Settings;
use crate::service::redis_store::{RedisStore, RedisUnavailable};
use crate::service::tenancy::Scope;

/// A tenant's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    pub rate_per_sec: f64,
    pub burst: u32,
    pub max_jobs_open: usize,
}

impl Quota {
    /// The figures of `scope`: its tenant's, else the gateway's.
    pub fn of(settings: &Settings, scope: &Scope) -> Self {
        let g = &settings.gateway;
        let t = scope.name().and_then(|n| settings.tenants.get(n));
        Self {
            rate_per_sec: t.and_then(|t| t.rate_per_sec).unwrap_or(g.rate_per_sec),
            burst: t.and_then(|t| t.burst).unwrap_or(g.burst),
            max_jobs_open: t.and_then(|t| t.max_jobs_open).unwrap_or(g.max_jobs_open),
        }
    }
}

/// Takes one request from the tenant's bucket: None when it may go on, else how long to wait.
/// A rate of 0 or less refuses nothing.
pub async fn take(
    redis: &RedisStore,
    scope: &Scope,
    quota: &Quota,
) -> Result<Option<Duration>, RedisUnavailable> {
    if quota.rate_per_sec <= 0.0 {
        return Ok(None);
    }
    // GCRA in microseconds: the bucket is the "theoretical arrival time" of the next request.
    let interval_us = (1e6 / quota.rate_per_sec).max(1.0).floor() as u64;
    let tolerance_us = interval_us * u64::from(quota.burst.max(1));
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let script = redis::cmd("EVAL")
        .arg(
            "local now = tonumber(ARGV[1]) \
             local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1]) \
             if tat < now then tat = now end \
             local next_tat = tat + tonumber(ARGV[2]) \
             local wait = next_tat - tonumber(ARGV[3]) - now \
             if wait > 0 then return string.format('%.0f', wait) end \
             redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', \
                        math.ceil((next_tat - now) / 1000) + 1000) \
             return '0'",
        )
        .arg(1)
        .arg(redis.key(&scope.key("rate", &[])))
        .arg(now_us)
        .arg(interval_us)
        .arg(tolerance_us)
        .clone();
    let wait: String = redis.query(&script).await?;
    let wait_us: u64 = wait.parse().unwrap_or(0);
    Ok((wait_us > 0).then(|| Duration::from_micros(wait_us)))
}

/// What an `Idempotency-Key` names: the job of the first request and that request's body digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    pub id: String,
    pub body_sha256: String,
}

fn idempotency_key(redis: &RedisStore, scope: &Scope, key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    redis.key(&scope.key("idempotency", &[&digest]))
}

/// Remembers that `key` names job `id` (made from a body of digest `body_sha256`), unless it
/// names a job already: then that job is returned.
pub async fn remember(
    redis: &RedisStore,
    scope: &Scope,
    key: &str,
    entry: &Remembered,
    ttl: Duration,
) -> Result<Option<Remembered>, RedisUnavailable> {
    let k = idempotency_key(redis, scope, key);
    let value = format!("{} {}", entry.body_sha256, entry.id);
    if redis.set_nx(&k, &value, ttl).await? {
        return Ok(None);
    }
    let held = redis.get(&k).await?.unwrap_or_default();
    let (digest, id) = held.split_once(' ').unwrap_or(("", ""));
    Ok(Some(Remembered {
        id: id.to_string(),
        body_sha256: digest.to_string(),
    }))
}

/// Forgets `key` (its job could not be published: a retry must try again).
pub async fn forget(redis: &RedisStore, scope: &Scope, key: &str) {
    let k = idempotency_key(redis, scope, key);
    let _ = redis.query::<i64>(redis::cmd("DEL").arg(k)).await;
}
