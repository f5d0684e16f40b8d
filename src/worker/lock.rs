//! The job lock: one worker at a time works a job. A Redis key per idempotency key (the job's
//! `result.json` key, hashed to bound the key's length) holds the owner's token with a TTL
//! (`redis.lock_ttl_secs`); the owner renews it every third of the TTL, releases it when the job
//! is settled, and releases it too when the job's future is dropped first (a job abandoned past
//! its timeout), so that the next attempt does not wait for the key to expire.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::context::AbortOnDrop;
use crate::service::redis_store::{RedisStore, RedisUnavailable};

/// A held job lock. Dropping it releases it (in the background); [`JobLock::release`] does so
/// and waits.
pub struct JobLock {
    redis: RedisStore,
    key: String,
    token: String,
    /// Turns true when the lock was taken over, or could not be renewed before it expired.
    lost: watch::Receiver<bool>,
    _renewer: AbortOnDrop<()>,
    armed: bool,
}

/// What an attempt to take a job's lock came to.
pub enum Acquired {
    /// This worker holds the job.
    Held(JobLock),
    /// Another worker holds it.
    Busy,
}

impl JobLock {
    /// Takes the lock of the job whose result lives at `result_key`, for `owner` (a worker
    /// name), renewed in the background every `ttl / 3` until released.
    pub async fn acquire(
        redis: &RedisStore,
        result_key: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Acquired, RedisUnavailable> {
        let key = redis.key(&[
            "job",
            &hex::encode(&Sha256::digest(result_key.as_bytes())[..16]),
            "lock",
        ]);
        let token = format!("{owner}:{}", uuid::Uuid::new_v4().simple());
        if !redis.set_nx(&key, &token, ttl).await? {
            return Ok(Acquired::Busy);
        }
        let (lost_tx, lost) = watch::channel(false);
        let renewer = AbortOnDrop(tokio::spawn({
            let (redis, key, token) = (redis.clone(), key.clone(), token.clone());
            async move {
                let mut renewed = Instant::now();
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    match redis.renew(&key, &token, ttl).await {
                        Ok(true) => renewed = Instant::now(),
                        Ok(false) => break,
                        Err(_) if renewed.elapsed() >= ttl => break,
                        Err(_) => {}
                    }
                }
                let _ = lost_tx.send(true);
            }
        }));
        Ok(Acquired::Held(JobLock {
            redis: redis.clone(),
            key,
            token,
            lost,
            _renewer: renewer,
            armed: true,
        }))
    }

    /// Whether the lock was lost while held (another worker may be working the job).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Stops renewing and deletes the lock if this worker still holds it.
    pub async fn release(mut self) {
        self.armed = false;
        let _ = self.redis.release(&self.key, &self.token).await;
    }
}

impl Drop for JobLock {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (redis, key, token) = (
            self.redis.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
        );
        runtime.spawn(async move {
            let _ = redis.release(&key, &token).await;
        });
    }
}
