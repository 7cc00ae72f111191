//! Autoscaling on connections per pod (pure): the replica count the fleet's
//! figures call for, and the pod-deletion costs that make a scale-down
//! remove the emptiest pods. No I/O: the fleet scrape feeds it figures and
//! applies what it returns.
//!
//! The rules follow the HorizontalPodAutoscaler's, on connections instead
//! of CPU: the raw recommendation is `ceil(connections / target)` within
//! `[min, max]`; a scale-up takes effect at once, by at most `max_step`
//! pods; a scale-down takes the *highest* recommendation of the last
//! `scale_down_window` (so a dip does not remove pods that the next
//! reconnect wave needs), by at most `max_step` pods.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What the resource asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Connections one pod should hold (`targetConnectionsPerPod`), ≥ 1.
    pub target_per_pod: u64,
    /// Fewest replicas.
    pub min_replicas: i32,
    /// Most replicas.
    pub max_replicas: i32,
    /// How long a lower recommendation must hold before pods are removed.
    pub scale_down_window: Duration,
    /// Most pods added or removed by one decision, ≥ 1.
    pub max_step: i32,
}

/// The recommendations of one resource over its scale-down window.
#[derive(Debug, Default)]
pub struct History {
    /// `(when, raw recommendation)`, oldest first, none older than the window.
    seen: VecDeque<(Instant, i32)>,
}

/// The raw recommendation: enough pods for `connections` at the target,
/// within the bounds.
pub fn raw(connections: u64, policy: &Policy) -> i32 {
    let target = policy.target_per_pod.max(1);
    let pods = connections.div_ceil(target);
    let pods = i32::try_from(pods).unwrap_or(i32::MAX);
    pods.clamp(policy.min_replicas, policy.max_replicas.max(policy.min_replicas))
}

impl History {
    /// The replica count to set now, given `current` replicas and the
    /// fleet's `connections`, and records this recommendation.
    pub fn decide(&mut self, now: Instant, current: i32, connections: u64, policy: &Policy) -> i32 {
        let recommended = raw(connections, policy);
        while self.seen.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > policy.scale_down_window) {
            self.seen.pop_front();
        }
        self.seen.push_back((now, recommended));
        let step = policy.max_step.max(1);
        let bounded = current.clamp(policy.min_replicas, policy.max_replicas.max(policy.min_replicas));
        if bounded != current {
            // Out of bounds (the bounds changed): back within them first.
            return bounded;
        }
        if recommended > bounded {
            return recommended.min(bounded.saturating_add(step));
        }
        // Scale down only to the highest recommendation of the window.
        let highest = self.seen.iter().map(|(_, r)| *r).max().unwrap_or(recommended);
        if highest < bounded { highest.max(bounded.saturating_sub(step)) } else { bounded }
    }
}

/// `controller.kubernetes.io/pod-deletion-cost` of each pod: its open
/// connections, so the ReplicaSet removes the pods with the fewest first
/// and as few clients as possible reconnect.
pub fn deletion_cost(connections: u64) -> i32 {
    i32::try_from(connections).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            target_per_pod: 1000,
            min_replicas: 2,
            max_replicas: 10,
            scale_down_window: Duration::from_secs(300),
            max_step: 2,
        }
    }

    #[test]
    fn raw_is_enough_pods_within_bounds() {
        let p = policy();
        assert_eq!(raw(0, &p), 2);
        assert_eq!(raw(2001, &p), 3);
        assert_eq!(raw(3000, &p), 3);
        assert_eq!(raw(1_000_000, &p), 10);
        assert_eq!(raw(u64::MAX, &Policy { target_per_pod: 0, ..p }), 10, "a zero target is one connection");
    }

    #[test]
    fn scale_up_is_immediate_and_step_limited() {
        let (p, t0) = (policy(), Instant::now());
        let mut h = History::default();
        assert_eq!(h.decide(t0, 2, 9500, &p), 4, "two pods at most per decision");
        assert_eq!(h.decide(t0 + Duration::from_secs(10), 4, 9500, &p), 6);
        assert_eq!(h.decide(t0 + Duration::from_secs(20), 6, 2500, &p), 6, "a dip right after is no scale-down");
    }

    #[test]
    fn scale_down_waits_for_the_window_and_is_step_limited() {
        let (p, t0) = (policy(), Instant::now());
        let mut h = History::default();
        assert_eq!(h.decide(t0, 6, 5500, &p), 6);
        assert_eq!(h.decide(t0 + Duration::from_secs(60), 6, 100, &p), 6);
        assert_eq!(h.decide(t0 + Duration::from_secs(299), 6, 100, &p), 6, "6 still recommended within the window");
        assert_eq!(h.decide(t0 + Duration::from_secs(301), 6, 100, &p), 4, "window passed: down by the step");
        assert_eq!(h.decide(t0 + Duration::from_secs(311), 4, 100, &p), 2);
        assert_eq!(h.decide(t0 + Duration::from_secs(321), 2, 0, &p), 2, "never below min");
    }

    #[test]
    fn replicas_outside_the_bounds_are_brought_back() {
        let (p, t0) = (policy(), Instant::now());
        let mut h = History::default();
        assert_eq!(h.decide(t0, 0, 0, &p), 2);
        let mut h = History::default();
        assert_eq!(h.decide(t0, 30, 0, &p), 10, "back within the bounds first");
    }

    #[test]
    fn deletion_cost_is_the_connections() {
        assert_eq!(deletion_cost(0), 0);
        assert_eq!(deletion_cost(18_000), 18_000);
        assert_eq!(deletion_cost(u64::MAX), i32::MAX);
    }
}
