//! `LogThrottle`: at most one warning per interval for an event that
//! untrusted input can repeat at will (malformed triggers, accept errors),
//! with the number of lines left out since the last one. A flood of bad
//! messages then costs a counter increment each, not a log line each.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One throttled log event.
#[derive(Debug)]
pub struct LogThrottle {
    /// Shortest time between two lines.
    interval: Duration,
    /// When the last line was allowed, and the events suppressed since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    /// A throttle allowing one line per `interval`.
    pub const fn new(interval: Duration) -> LogThrottle {
        LogThrottle { interval, state: Mutex::new((None, 0)) }
    }

    /// Records one event at `now`: `Some(suppressed)` when a line may be
    /// written (with the count of events left out before it), `None` when
    /// this one is left out.
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        // A poisoned lock only means another thread panicked while counting.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.0 {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                state.1 += 1;
                None
            }
            _ => {
                let suppressed = state.1;
                *state = (Some(now), 0);
                Some(suppressed)
            }
        }
    }

    /// [`LogThrottle::allow_at`] now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let t = LogThrottle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.allow_at(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(t.allow_at(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(t.allow_at(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(t.allow_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(t.allow_at(t0 + Duration::from_secs(30)), Some(1));
    }
}
