//! Shutdown requests, as a type (after mini-redis's `Shutdown`): the first SIGTERM or SIGINT
//! asks for a drain (finish the job in hand, take no other), the second for an immediate stop.
//! What either means in time is the caller's business: `r2f worker` bounds the drain with
//! `worker.drain_timeout_secs` and exits at once on the second signal.

use tokio::sync::watch;
use tracing::{error, info, warn};

/// What the process has been asked to do, in increasing urgency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Request {
    /// Keep consuming.
    Run,
    /// Finish the job in hand, take no other, exit.
    Drain,
    /// Stop now, without acking the job in hand (the broker redelivers it).
    Immediate,
}

/// The receiving end: cheap to clone, one per task that must stop.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<Request>);

/// The sending end, for whoever decides (the signal handler, or a test).
#[derive(Debug)]
pub struct Trigger(watch::Sender<Request>);

impl Trigger {
    /// Raises the request to `r` (a request never goes back down).
    pub fn request(&self, r: Request) {
        self.0.send_if_modified(|now| {
            let raise = r > *now;
            if raise {
                *now = r;
            }
            raise
        });
    }
}

impl Shutdown {
    /// A pair that nothing but the returned [`Trigger`] ends.
    pub fn channel() -> (Trigger, Shutdown) {
        let (tx, rx) = watch::channel(Request::Run);
        (Trigger(tx), Shutdown(rx))
    }

    /// Shutdown on SIGTERM and SIGINT: the first asks for a drain, the second for an immediate
    /// stop. Without signal handlers (they could not be installed) nothing ever asks.
    pub fn on_signals() -> Shutdown {
        let (trigger, shutdown) = Self::channel();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                error!("cannot install signal handlers");
                // Keep the trigger: a dropped sender must not read as a request.
                std::future::pending::<()>().await;
                return;
            };
            for request in [Request::Drain, Request::Immediate] {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
                match request {
                    Request::Drain => {
                        info!("signal received: draining (finishing the job in hand, then exiting)")
                    }
                    _ => warn!("second signal: stopping now without acking"),
                }
                trigger.request(request);
            }
            std::future::pending::<()>().await;
        });
        shutdown
    }

    /// The current request.
    pub fn request(&self) -> Request {
        *self.0.borrow()
    }

    /// Whether a drain (or more) was asked for.
    pub fn is_requested(&self) -> bool {
        self.request() >= Request::Drain
    }

    /// Waits until a drain (or more) is asked for.
    pub async fn requested(&mut self) {
        self.reached(Request::Drain).await
    }

    /// Waits until an immediate stop is asked for.
    pub async fn immediate(&mut self) {
        self.reached(Request::Immediate).await
    }

    async fn reached(&mut self, level: Request) {
        if self.0.wait_for(|r| *r >= level).await.is_err() {
            // The trigger is gone without asking: nothing ever will.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_only_go_up_and_wake_the_waiters() {
        let (trigger, mut shutdown) = Shutdown::channel();
        assert_eq!(shutdown.request(), Request::Run);
        assert!(!shutdown.is_requested());
        let mut other = shutdown.clone();
        let waiter = tokio::spawn(async move { other.immediate().await });
        trigger.request(Request::Drain);
        shutdown.requested().await;
        assert!(shutdown.is_requested());
        assert!(!waiter.is_finished());
        trigger.request(Request::Immediate);
        waiter.await.unwrap();
        trigger.request(Request::Drain);
        assert_eq!(shutdown.request(), Request::Immediate);
    }

    #[tokio::test]
    async fn a_dropped_trigger_is_not_a_request() {
        let (trigger, mut shutdown) = Shutdown::channel();
        drop(trigger);
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), shutdown.requested()).await;
        assert!(waited.is_err(), "no request was made");
    }
}
