//! Autoscaling on connections per pod (pure): the replica count the fleet's
//! figures call for, and the pod-deletion costs that make a scale-down
//! remove the emptiest pods. No I/O: the fleet scrape feeds it figures and
//! applies what it returns ([`crate::scaler`]).
//!
//! The rules follow the HorizontalPodAutoscaler's, on connections instead
//! of CPU: the raw recommendation is `ceil(connections / target)` within
//! `[min, max]`; a scale-up takes effect at once, by at most `max_step`
//! pods; a scale-down takes the *highest* recommendation of the last
//! `scale_down_window` (so a dip does not remove pods that the next
//! reconnect wave needs), by at most `max_step` pods. Two rules of our own:
//! no scale-down on incomplete figures (a pod not read holds connections
//! nobody counted), and none before the history covers a whole window (a
//! new leader knows nothing of the last minutes).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;

use crate::crd::AutoscalingSpec;

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

impl Policy {
    /// The policy of `spec`, when it scales on connections.
    pub fn of(spec: &AutoscalingSpec) -> Option<Policy> {
        let target = spec.target_connections_per_pod?;
        Some(Policy {
            target_per_pod: u64::try_from(target).unwrap_or(1).max(1),
            min_replicas: spec.min_replicas.max(0),
            max_replicas: spec.max_replicas.max(spec.min_replicas.max(0)),
            scale_down_window: Duration::from_secs(u64::try_from(spec.scale_down_stabilization_seconds).unwrap_or(0)),
            max_step: spec.max_step.max(1),
        })
    }
}

/// What the fleet scrape saw of one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The Deployment's `spec.replicas` now.
    pub current: i32,
    /// Connections summed over the pods read.
    pub connections: u64,
    /// Every pod of the resource (not terminating) was read: no pod is
    /// starting, not ready or failed to answer.
    pub complete: bool,
}

/// One decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Replicas to set (equal to `current`: nothing to do).
    pub replicas: i32,
    /// The raw recommendation of this observation.
    pub recommended: i32,
    /// Why `replicas` is what it is, for the Event and the log.
    pub why: String,
    /// `replicas` differs from the current count.
    pub changed: bool,
}

/// The recommendations of one resource over its scale-down window.
#[derive(Debug)]
pub struct History {
    /// When this history began (operator start, leadership or a policy change).
    since: Instant,
    /// The policy the recommendations were made under.
    policy: Option<Policy>,
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
    /// An empty history beginning at `now`.
    pub fn new(now: Instant) -> History {
        History { since: now, policy: None, seen: VecDeque::new() }
    }

    /// The replica count to set now, and records this recommendation.
    pub fn decide(&mut self, now: Instant, seen: Observation, policy: &Policy) -> Decision {
        if self.policy.as_ref() != Some(policy) {
            // Recommendations under another target or window mean nothing now.
            *self = History { since: now, policy: Some(policy.clone()), seen: VecDeque::new() };
        }
        let current = seen.current;
        let recommended = raw(seen.connections, policy);
        let decision =
            |replicas: i32, why: String| Decision { replicas, recommended, why, changed: replicas != current };
        while self.seen.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > policy.scale_down_window) {
            self.seen.pop_front();
        }
        self.seen.push_back((now, recommended));
        let load = format!("{} connections, target {} per pod", seen.connections, policy.target_per_pod);
        let step = policy.max_step.max(1);
        let bounded = current.clamp(policy.min_replicas, policy.max_replicas.max(policy.min_replicas));
        if bounded != current {
            return decision(
                bounded,
                format!("{current} replicas is outside [{}, {}]", policy.min_replicas, policy.max_replicas),
            );
        }
        if recommended > bounded {
            return decision(
                recommended.min(bounded.saturating_add(step)),
                format!("{load}: {recommended} pods needed"),
            );
        }
        // Scale down only to the highest recommendation of the window.
        let highest = self.seen.iter().map(|(_, r)| *r).max().unwrap_or(recommended);
        if highest >= bounded {
            return decision(bounded, format!("{load}: {bounded} pods needed within the window"));
        }
        if !seen.complete {
            return decision(bounded, format!("{load}: not scaling down while a pod's figures are missing"));
        }
        if now.saturating_duration_since(self.since) < policy.scale_down_window {
            return decision(bounded, format!("{load}: not scaling down before a whole window is observed"));
        }
        decision(
            highest.max(bounded.saturating_sub(step)),
            format!("{load}: at most {highest} pods needed for {} s", policy.scale_down_window.as_secs()),
        )
    }
}

/// `controller.kubernetes.io/pod-deletion-cost` of each pod: its open
/// connections, so the ReplicaSet removes the pods with the fewest first
/// and as few clients as possible reconnect.
pub fn deletion_cost(connections: u64) -> i32 {
    i32::try_from(connections).unwrap_or(i32::MAX)
}

/// Whether field manager `manager` owns the Deployment's `spec.replicas`
/// through a server-side apply (from its `managedFields`).
pub fn applies_replicas(deployment: &Deployment, manager: &str) -> bool {
    deployment.metadata.managed_fields.iter().flatten().any(|entry| {
        entry.manager.as_deref() == Some(manager)
            && entry.operation.as_deref() == Some("Apply")
            && entry.fields_v1.as_ref().is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
    })
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

    fn seen(current: i32, connections: u64) -> Observation {
        Observation { current, connections, complete: true }
    }

    /// Replicas decided for each `(seconds after t0, current, connections)`.
    fn run(h: &mut History, t0: Instant, p: &Policy, steps: &[(u64, i32, u64)]) -> Vec<i32> {
        steps
            .iter()
            .map(|&(at, current, c)| h.decide(t0 + Duration::from_secs(at), seen(current, c), p).replicas)
            .collect()
    }

    #[test]
    fn policy_comes_from_the_spec_only_with_a_connection_target() {
        let spec = AutoscalingSpec::default();
        assert_eq!(Policy::of(&spec), None, "no target: no connection autoscaling");
        let spec = AutoscalingSpec { target_connections_per_pod: Some(5000), min_replicas: 3, ..spec };
        assert_eq!(
            Policy::of(&spec),
            Some(Policy {
                target_per_pod: 5000,
                min_replicas: 3,
                max_replicas: 10,
                scale_down_window: Duration::from_secs(300),
                max_step: 4
            })
        );
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
        let mut h = History::new(t0);
        assert_eq!(run(&mut h, t0, &p, &[(0, 2, 9500), (10, 4, 9500), (20, 6, 2500)]), [4, 6, 6]);
        let partial = Observation { complete: false, ..seen(6, 9500) };
        assert_eq!(h.decide(t0 + Duration::from_secs(30), partial, &p).replicas, 8, "partial figures still scale up");
    }

    #[test]
    fn scale_down_waits_for_the_window_and_is_step_limited() {
        let (p, t0) = (policy(), Instant::now());
        let mut h = History::new(t0);
        let got = run(
            &mut h,
            t0,
            &p,
            &[(0, 6, 5500), (60, 6, 100), (299, 6, 100), (301, 6, 100), (311, 4, 100), (321, 2, 0)],
        );
        assert_eq!(got, [6, 6, 6, 4, 2, 2], "6 held within the window, then down by the step, never below min");
    }

    #[test]
    fn no_scale_down_on_missing_figures_or_a_short_history() {
        let (p, t0) = (policy(), Instant::now());
        let mut h = History::new(t0);
        assert_eq!(run(&mut h, t0, &p, &[(0, 6, 100), (299, 6, 100)]), [6, 6], "a new history knows no window yet");
        let partial = Observation { complete: false, ..seen(6, 100) };
        let d = h.decide(t0 + Duration::from_secs(301), partial, &p);
        assert_eq!(d.replicas, 6, "a pod not read may hold the connections: {}", d.why);
        assert!(d.why.contains("missing"), "{}", d.why);
        assert_eq!(h.decide(t0 + Duration::from_secs(302), seen(6, 100), &p).replicas, 4);
    }

    #[test]
    fn a_changed_policy_starts_a_new_history() {
        let (p, t0) = (policy(), Instant::now());
        let mut h = History::new(t0);
        assert_eq!(run(&mut h, t0, &p, &[(0, 4, 100), (400, 4, 100)]), [4, 2]);
        let lower = Policy { target_per_pod: 10, ..p.clone() };
        let d = h.decide(t0 + Duration::from_secs(410), seen(2, 100), &lower);
        assert_eq!((d.replicas, d.recommended), (4, 10), "a lower target scales up at once");
        let d = h.decide(t0 + Duration::from_secs(420), seen(4, 0), &p);
        assert_eq!(d.replicas, 4, "back to the old target: a new window before scaling down");
    }

    #[test]
    fn replicas_outside_the_bounds_are_brought_back() {
        let (p, t0) = (policy(), Instant::now());
        assert_eq!(History::new(t0).decide(t0, seen(0, 0), &p).replicas, 2);
        assert_eq!(History::new(t0).decide(t0, seen(30, 0), &p).replicas, 10, "back within the bounds first");
    }

    #[test]
    fn deletion_cost_is_the_connections() {
        assert_eq!(deletion_cost(0), 0);
        assert_eq!(deletion_cost(18_000), 18_000);
        assert_eq!(deletion_cost(u64::MAX), i32::MAX);
    }

    #[test]
    fn replicas_ownership_is_read_from_managed_fields() {
        let deployment = |manager: &str, operation: &str, fields: serde_json::Value| -> Deployment {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "chat", "managedFields": [
                {"manager": manager, "operation": operation, "fieldsType": "FieldsV1", "fieldsV1": fields}
            ]}}))
            .expect("a deployment")
        };
        let replicas = serde_json::json!({"f:spec": {"f:replicas": {}, "f:template": {}}});
        assert!(applies_replicas(&deployment("op", "Apply", replicas.clone()), "op"));
        assert!(!applies_replicas(&deployment("other", "Apply", replicas.clone()), "op"));
        assert!(!applies_replicas(&deployment("op", "Update", replicas), "op"), "a scale by update is not an apply");
        assert!(!applies_replicas(&deployment("op", "Apply", serde_json::json!({"f:spec": {"f:template": {}}})), "op"));
    }
}
