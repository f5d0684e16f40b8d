//! Delays: reconnect backoff with jitter that resets only after a stable period, the retry
//! delay of each attempt, and the breaker that pauses a worker whose failures are its own.

use std::time::{Duration, Instant};

/// Exponential backoff with jitter. After a failure the next wait doubles (capped); a success
/// resets it only once it has lasted `stable` — so a connection that opens and breaks at once
/// (a failing publish, a broker that closes every new channel) does not make a hot loop, and
/// many pods that lost one broker do not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    stable: Duration,
    next: Duration,
    up_since: Option<Instant>,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, stable: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Self {
            min,
            max: max.max(min),
            stable,
            next: min,
            up_since: None,
        }
    }

    /// The wait before the next try, jittered uniformly in [½, 1] of the current step; doubles
    /// the step for the time after.
    pub fn next_delay(&mut self) -> Duration {
        self.settle_up_period(Instant::now());
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }

    /// The thing backed off from works again (connected, or a job succeeded).
    pub fn up(&mut self) {
        self.up_since.get_or_insert_with(Instant::now);
    }

    /// It broke again: the step resets only when the period it worked lasted `stable`.
    pub fn down(&mut self) {
        self.settle_up_period(Instant::now());
    }

    fn settle_up_period(&mut self, now: Instant) {
        if let Some(since) = self.up_since.take() {
            if now.duration_since(since) >= self.stable {
                self.next = self.min;
            }
        }
    }

    /// The current (un-jittered) step.
    pub fn step(&self) -> Duration {
        self.next
    }
}

/// The retry delay of a failed attempt (1-based): `base · 2^(attempt-1)`, capped, jittered by
/// ±20% so that jobs failed together are not retried together.
pub fn retry_delay(attempt: u32, base_ms: u64, max_ms: u64) -> Duration {
    let level = base_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(20));
    let capped = level.min(max_ms).max(1);
    Duration::from_millis(((capped as f64) * (0.8 + rand::random::<f64>() * 0.4)) as u64)
}

/// Counts failures that are the worker's own (or a dependency's) in a row; after `threshold`
/// the worker stops consuming for a while.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    consecutive: u32,
    pause: Backoff,
}

impl Breaker {
    pub fn new(threshold: u32, min_pause: Duration, max_pause: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            consecutive: 0,
            // A pause resets to the minimum once jobs have succeeded for ten minimum pauses.
            pause: Backoff::new(min_pause, max_pause, min_pause * 10),
        }
    }

    /// A job went through (or failed by its own fault): the worker is healthy.
    pub fn success(&mut self) {
        self.consecutive = 0;
        self.pause.up();
    }

    /// A failure that is not the job's: `Some(pause)` when the worker must stop consuming.
    pub fn failure(&mut self) -> Option<Duration> {
        self.consecutive += 1;
        if self.consecutive < self.threshold {
            return None;
        }
        self.consecutive = 0;
        self.pause.down();
        Some(self.pause.next_delay())
    }

    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_millis(800),
            Duration::from_secs(60),
        );
        let mut steps = vec![];
        for _ in 0..6 {
            let d = b.next_delay();
            steps.push(d);
        }
        for (d, step) in steps.iter().zip([100u64, 200, 400, 800, 800, 800]) {
            assert!(
                *d >= Duration::from_millis(step / 2) && *d <= Duration::from_millis(step),
                "{d:?} not within [{}, {step}] ms",
                step / 2
            );
        }
    }

    #[test]
    fn a_short_success_does_not_reset_the_backoff() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(10),
            Duration::from_secs(60),
        );
        b.next_delay();
        b.next_delay();
        assert_eq!(b.step(), Duration::from_millis(400));
        b.up();
        b.down(); // connected and lost again at once
        assert_eq!(b.step(), Duration::from_millis(400));
    }

    #[test]
    fn a_stable_success_resets_the_backoff() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(10),
            Duration::ZERO,
        );
        b.next_delay();
        b.next_delay();
        b.up();
        b.down();
        assert_eq!(b.step(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_many_workers() {
        let delays: std::collections::BTreeSet<u128> = (0..32)
            .map(|_| {
                Backoff::new(
                    Duration::from_secs(1),
                    Duration::from_secs(30),
                    Duration::from_secs(60),
                )
                .next_delay()
                .as_micros()
            })
            .collect();
        assert!(delays.len() > 16, "{} distinct delays of 32", delays.len());
    }

    #[test]
    fn retry_delay_grows_per_attempt_within_jitter() {
        for (attempt, level) in [(1u32, 2000u64), (2, 4000), (3, 8000), (9, 60000)] {
            let d = retry_delay(attempt, 2000, 60000).as_millis() as u64;
            assert!(
                d >= level * 8 / 10 && d <= level * 12 / 10,
                "attempt {attempt}: {d} ms"
            );
        }
    }

    #[test]
    fn breaker_trips_after_threshold_failures_in_a_row_only() {
        let mut b = Breaker::new(3, Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(b.failure(), None);
        assert_eq!(b.failure(), None);
        b.success();
        assert_eq!(b.failure(), None);
        assert_eq!(b.failure(), None);
        let pause = b.failure().expect("third failure in a row trips");
        assert!(pause <= Duration::from_secs(1));
        assert_eq!(b.consecutive(), 0);
        b.failure();
        b.failure();
        let second = b.failure().expect("trips again");
        assert!(second >= Duration::from_secs(1), "pauses grow: {second:?}");
    }
}
