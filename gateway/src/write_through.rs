//! `WriteThroughPolicy`: whether the fan-out writes deliveries into idle
//! sockets itself (write-through) or queues them for the sessions' tasks.
//!
//! Writing through saves every delivery a task wake-up and a poll of the
//! whole session (a third of the gateway's CPU per delivery below
//! saturation, docs/performance.md), but costs one system call per
//! delivery on one thread, under the index lock. Queued deliveries are
//! written by the sessions' tasks, which batch whatever queued meanwhile
//! into one write and spread over the runtime's threads: that is what
//! keeps up when triggers come faster than one thread can write them one
//! by one. So the fan-out writes through while doing so would keep it
//! busy for less than `HIGH` of the time, and queues above that, until
//! the load it would have falls back under `LOW`.
//!
//! The load is the window's deliveries times the cost of one delivery
//! written through, in both modes. That cost is learned from fan-outs
//! that wrote through, as the lowest recent one: a fan-out's wall time
//! also counts the time its thread was preempted (the sessions' tasks
//! compete for the same core), and a cost learned from wall time alone
//! kept write-through off at 10 triggers/s, where it fits easily.
//!
//! Pure: the caller measures each fan-out and passes the time in.

use std::time::{Duration, Instant};

/// Decisions are taken once per window of this length.
const WINDOW: Duration = Duration::from_millis(250);
/// Stop writing through when it keeps the fan-out busy this share of the
/// time (one thread's).
const HIGH: f64 = 0.8;
/// Write through again when it would keep the fan-out busy under this
/// share of the time.
const LOW: f64 = 0.55;
/// The cost of one delivery written through before any was measured,
/// seconds (measured here: 6–8 µs on loopback, system call included).
const INITIAL_COST: f64 = 8e-6;
/// How much the learned cost may rise per fan-out.
const RISE: f64 = 1.1;

/// The write-through decision and what it is based on.
#[derive(Debug, Clone)]
pub struct WriteThroughPolicy {
    /// Whether writing through is allowed at all (`fanout.writeThrough`).
    allowed: bool,
    /// Whether fan-outs write through now (when allowed).
    on: bool,
    /// Start of the current window.
    window_start: Instant,
    /// Deliveries in the current window.
    deliveries: u64,
    /// Fan-out seconds per delivery when written through: follows a
    /// lower sample at once and a higher one by at most [`RISE`] per
    /// fan-out (of those that wrote most of theirs through).
    cost: f64,
}

impl WriteThroughPolicy {
    /// On, with nothing measured yet.
    pub fn new(now: Instant) -> WriteThroughPolicy {
        WriteThroughPolicy { allowed: true, on: true, window_start: now, deliveries: 0, cost: INITIAL_COST }
    }

    /// Allows or forbids writing through.
    pub fn allow(&mut self, allowed: bool) {
        self.allowed = allowed;
    }

    /// Whether the next fan-out writes through.
    pub fn is_on(&self) -> bool {
        self.allowed && self.on
    }

    /// Records a fan-out that ended at `now`, took `took`, reached
    /// `deliveries` subscriptions and wrote `written` of them through.
    pub fn record(&mut self, now: Instant, took: Duration, deliveries: u64, written: u64) {
        self.deliveries += deliveries;
        if deliveries > 0 && written * 2 >= deliveries {
            let sample = took.as_secs_f64() / deliveries as f64;
            self.cost = sample.min(self.cost * RISE);
        }
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < WINDOW {
            return;
        }
        let load = self.load(elapsed);
        if self.on && load > HIGH {
            self.on = false;
        } else if !self.on && load < LOW {
            self.on = true;
        }
        self.window_start = now;
        self.deliveries = 0;
    }

    /// The share of `elapsed` the fan-out is or would be busy writing
    /// through.
    fn load(&self, elapsed: Duration) -> f64 {
        self.deliveries as f64 * self.cost / elapsed.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fan-outs of `n` deliveries at `rate` per second for `seconds`, each
    /// costing `per` per delivery when written through and a tenth of it
    /// when queued; returns whether it ended on.
    fn drive(
        policy: &mut WriteThroughPolicy,
        now: &mut Instant,
        rate: u32,
        n: u64,
        per: Duration,
        seconds: u32,
    ) -> bool {
        for _ in 0..rate * seconds {
            *now += Duration::from_secs(1) / rate;
            let (took, written) = if policy.is_on() { (per * n as u32, n) } else { (per * n as u32 / 10, 0) };
            policy.record(*now, took, n, written);
        }
        policy.is_on()
    }

    #[test]
    fn writes_through_while_it_keeps_up_and_queues_above() {
        let mut now = Instant::now();
        let mut policy = WriteThroughPolicy::new(now);
        let per = Duration::from_micros(7);
        // 10 triggers/s to 5 000: 35 % of the time.
        assert!(drive(&mut policy, &mut now, 10, 5_000, per, 5));
        // 20/s: 70 %, still under the high mark.
        assert!(drive(&mut policy, &mut now, 20, 5_000, per, 5));
        // 50/s: it would need 175 %: queued, and it stays queued while
        // the load it would have is above the low mark, though the
        // queued fan-outs themselves are cheap.
        assert!(!drive(&mut policy, &mut now, 50, 5_000, per, 5));
        assert!(!drive(&mut policy, &mut now, 20, 5_000, per, 5), "70 % is above the low mark");
        // Back to 10/s: on again.
        assert!(drive(&mut policy, &mut now, 10, 5_000, per, 5));
    }

    #[test]
    fn learns_the_cost_from_fan_outs_that_wrote_through() {
        let mut now = Instant::now();
        let mut policy = WriteThroughPolicy::new(now);
        // Writes 5 times dearer than assumed: 10/s to 5 000 is 200 %.
        assert!(!drive(&mut policy, &mut now, 10, 5_000, Duration::from_micros(40), 5));
        // A fan-out that queued everything teaches nothing.
        let cost = policy.cost;
        now += Duration::from_millis(10);
        policy.record(now, Duration::from_millis(1), 1_000, 0);
        assert_eq!(policy.cost, cost);
        assert!(cost > 16e-6, "{cost}");
    }

    #[test]
    fn a_preempted_fan_out_does_not_teach_a_higher_cost() {
        let mut now = Instant::now();
        let mut policy = WriteThroughPolicy::new(now);
        // 10/s to 5 000 at 7 µs, one fan-out in three taking 4 times as
        // long (its thread preempted): still written through.
        for i in 0..100 {
            now += Duration::from_millis(100);
            let per = if i % 3 == 0 { Duration::from_micros(28) } else { Duration::from_micros(7) };
            policy.record(now, per * 5_000, 5_000, 5_000);
            assert!(policy.is_on(), "fan-out {i}: cost {}", policy.cost);
        }
    }

    #[test]
    fn an_idle_window_turns_it_back_on() {
        let mut now = Instant::now();
        let mut policy = WriteThroughPolicy::new(now);
        assert!(!drive(&mut policy, &mut now, 100, 5_000, Duration::from_micros(7), 2));
        // One small trigger after a quiet second.
        now += Duration::from_secs(1);
        policy.record(now, Duration::from_micros(10), 1, 0);
        assert!(policy.is_on());
    }
}
