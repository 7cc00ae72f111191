//! `CircuitBreaker`: stops calling a backend that is failing (5xx, `429`,
//! timeouts, unreachable), so a down API gets no bootstrap traffic to
//! recover under and clients get their "try again later" (1013) at once.
//!
//! Closed: calls go through; of the last `window` calls, when at least
//! `failureRatio` failed, it opens. Open: no calls, for `openSeconds` with
//! ±20 % jitter (replicas do not probe in step). Then half-open: one call
//! goes through as a probe; success closes it, failure opens it again.
//! Pure logic: time comes in as arguments.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::CircuitBreakerConfig;

/// The state, as exposed in `/metrics` (`0` closed, `1` open, `2` half-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls go through.
    Closed,
    /// No calls until the instant.
    Open(Instant),
    /// One probe is in flight; other calls are refused.
    HalfOpen,
}

impl State {
    /// The gauge value.
    pub fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open(_) => 1,
            State::HalfOpen => 2,
        }
    }

    /// For `/readyz`'s body.
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open(_) => "open",
            State::HalfOpen => "half-open",
        }
    }
}

/// The outcomes of recent calls and the state they led to.
#[derive(Debug)]
pub struct CircuitBreaker {
    /// `backend.circuitBreaker.enabled`; a disabled breaker records nothing.
    enabled: bool,
    /// Current state.
    state: State,
    /// Outcomes of the last calls while closed, `true` = failed.
    recent: VecDeque<bool>,
    /// Failures in `recent`.
    failures: usize,
    /// Calls considered.
    window: usize,
    /// Failed share of `window` that opens the circuit.
    failure_ratio: f64,
    /// Time open, before jitter.
    open_for: Duration,
}

/// Whether a call may go to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// A normal call.
    Call,
    /// The half-open probe: its outcome decides the state.
    Probe,
    /// Refused: the circuit is open.
    Refused,
}

impl CircuitBreaker {
    /// A closed breaker; `enabled: false` never opens.
    pub fn new(config: &CircuitBreakerConfig) -> CircuitBreaker {
        CircuitBreaker {
            enabled: config.enabled,
            state: State::Closed,
            recent: VecDeque::with_capacity(if config.enabled { config.window } else { 0 }),
            failures: 0,
            window: config.window.max(1),
            failure_ratio: config.failure_ratio,
            open_for: crate::config::seconds(config.open_seconds),
        }
    }

    /// The state now.
    pub fn state(&self) -> State {
        self.state
    }

    /// Asks to call the backend at `now`.
    pub fn permit(&mut self, now: Instant) -> Permit {
        match self.state {
            State::Closed => Permit::Call,
            State::Open(until) if now >= until => {
                self.state = State::HalfOpen;
                Permit::Probe
            }
            State::Open(_) | State::HalfOpen => Permit::Refused,
        }
    }

    /// Records a call's outcome at `now`; `jitter` in `[0, 1)` spreads the
    /// open period over ±20 %. Returns whether the circuit just opened.
    pub fn record(&mut self, permit: Permit, failed: bool, now: Instant, jitter: f64) -> bool {
        if !self.enabled {
            return false;
        }
        match (permit, self.state) {
            (Permit::Probe, _) if failed => {
                self.open(now, jitter);
                true
            }
            (Permit::Probe, _) => {
                self.state = State::Closed;
                self.recent.clear();
                self.failures = 0;
                false
            }
            (Permit::Call, State::Closed) => {
                self.recent.push_back(failed);
                self.failures += usize::from(failed);
                if self.recent.len() > self.window
                    && let Some(oldest) = self.recent.pop_front()
                {
                    self.failures -= usize::from(oldest);
                }
                let full = self.recent.len() >= self.window;
                if full && self.failures as f64 >= self.failure_ratio * self.window as f64 {
                    self.open(now, jitter);
                    return true;
                }
                false
            }
            // Calls admitted before the circuit opened end later: ignored.
            _ => false,
        }
    }

    fn open(&mut self, now: Instant, jitter: f64) {
        let factor = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
        self.state = State::Open(now + self.open_for.mul_f64(factor));
        self.recent.clear();
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(&CircuitBreakerConfig { enabled: true, window: 10, failure_ratio: 0.5, open_seconds: 10.0 })
    }

    #[test]
    fn opens_at_the_failure_ratio_probes_then_closes() {
        let mut b = breaker();
        let t = Instant::now();
        // 4 failures in 10: stays closed.
        for i in 0..10 {
            assert_eq!(b.permit(t), Permit::Call);
            assert!(!b.record(Permit::Call, i < 4, t, 0.5));
        }
        assert_eq!(b.state(), State::Closed);
        // The window slides: 5 failures among the last 10 opens it.
        let mut opened = false;
        for _ in 0..5 {
            opened |= b.record(Permit::Call, true, t, 0.5);
        }
        assert!(opened);
        assert_eq!(b.state(), State::Open(t + Duration::from_secs(10)));
        assert_eq!(b.permit(t + Duration::from_secs(9)), Permit::Refused);
        // Half-open: one probe, others refused.
        let later = t + Duration::from_secs(10);
        assert_eq!(b.permit(later), Permit::Probe);
        assert_eq!(b.permit(later), Permit::Refused);
        assert!(b.record(Permit::Probe, true, later, 0.0), "a failed probe opens it again");
        assert_eq!(b.state(), State::Open(later + Duration::from_secs(8)), "jitter 0 is -20 %");
        let again = later + Duration::from_secs(8);
        assert_eq!(b.permit(again), Permit::Probe);
        assert!(!b.record(Permit::Probe, false, again, 0.0));
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.permit(again), Permit::Call);
    }

    #[test]
    fn disabled_never_opens() {
        let mut b = CircuitBreaker::new(&CircuitBreakerConfig {
            enabled: false,
            window: 10,
            failure_ratio: 0.5,
            open_seconds: 1.0,
        });
        let t = Instant::now();
        for _ in 0..1000 {
            assert_eq!(b.permit(t), Permit::Call);
            assert!(!b.record(Permit::Call, true, t, 0.5));
        }
        assert!(b.recent.is_empty(), "nothing is kept");
    }
}
