//! `Admission`: at most `backend.admission.maxConcurrent` bootstrap calls
//! in flight per process. An upgrade waits for a slot in a bounded queue
//! for a bounded time, or is refused before the 101 (`503` with
//! `Retry-After`), so a reconnect storm reaches the API at the pace it
//! serves instead of all at once, and a refused client holds nothing.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::AdmissionConfig;

/// Why an upgrade was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `maxQueued` upgrades were already waiting.
    #[error("too many connections waiting for the backend")]
    QueueFull,
    /// No slot freed within `maxWaitSeconds`.
    #[error("waited too long for the backend")]
    Timeout,
}

impl Refused {
    /// Metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::QueueFull => "admission_queue_full",
            Refused::Timeout => "admission_timeout",
        }
    }
}

/// One slot for a bootstrap call; freed on drop.
#[derive(Debug)]
pub struct Admitted {
    /// The slot.
    _permit: OwnedSemaphorePermit,
    /// `hightemplar_bootstrap_in_flight`, decremented on drop.
    in_flight: Gauge,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

/// The bootstrap slots of one process and their queue.
#[derive(Debug)]
pub struct Admission {
    /// One permit per call in flight.
    slots: Arc<Semaphore>,
    /// Waiting upgrades allowed.
    max_queued: usize,
    /// Longest wait.
    max_wait: Duration,
    /// Calls in flight (exposed).
    in_flight: Gauge,
    /// Upgrades waiting now (exposed; also the count the queue bound checks).
    queued: Gauge,
}

/// Ends one wait, however it ends.
struct Waiting<'a>(&'a Admission);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.queued.dec();
    }
}

impl Admission {
    /// Slots and queue as configured; `in_flight` and `queued` are the
    /// gauges to keep current.
    pub fn new(config: &AdmissionConfig, in_flight: Gauge, queued: Gauge) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(config.max_concurrent)),
            max_queued: config.max_queued,
            max_wait: crate::config::seconds(config.max_wait_seconds),
            in_flight,
            queued,
        }
    }

    fn admitted(&self, permit: OwnedSemaphorePermit) -> Admitted {
        self.in_flight.inc();
        Admitted { _permit: permit, in_flight: self.in_flight.clone() }
    }

    /// A slot now, or after waiting in the queue, or why not.
    pub async fn admit(&self) -> Result<Admitted, Refused> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(self.admitted(permit));
        }
        // `inc` returns the count before this upgrade joined.
        let _waiting = Waiting(self);
        if usize::try_from(self.queued.inc()).unwrap_or(usize::MAX) >= self.max_queued {
            return Err(Refused::QueueFull);
        }
        match tokio::time::timeout(self.max_wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(self.admitted(permit)),
            // The semaphore is never closed; a closed one refuses too.
            Ok(Err(_)) | Err(_) => Err(Refused::Timeout),
        }
    }

    /// Upgrades waiting now.
    pub fn queued(&self) -> usize {
        usize::try_from(self.queued.get()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_concurrent: usize, max_queued: usize, max_wait_seconds: f64) -> Admission {
        Admission::new(
            &AdmissionConfig { max_concurrent, max_queued, max_wait_seconds },
            Gauge::default(),
            Gauge::default(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn slots_then_a_bounded_queue_then_refusals() {
        let a = Arc::new(admission(2, 1, 1.0));
        let first = a.admit().await.expect("slot 1");
        assert_eq!(a.in_flight.get(), 1);
        let _second = a.admit().await.expect("slot 2");
        let queued = tokio::spawn({
            let a = a.clone();
            async move { a.admit().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(a.queued(), 1);
        assert_eq!(a.admit().await.err(), Some(Refused::QueueFull));
        drop(first);
        let third = queued.await.expect("task");
        assert!(third.is_ok(), "a freed slot goes to the waiting upgrade");
        assert_eq!((a.queued(), a.queued.get(), a.in_flight.get()), (0, 0, 2));
        // Nobody frees a slot: the wait ends at max_wait.
        let started = tokio::time::Instant::now();
        assert_eq!(a.admit().await.err(), Some(Refused::Timeout));
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(a.queued(), 0);
        drop(third);
        assert_eq!(a.in_flight.get(), 1);
    }
}
