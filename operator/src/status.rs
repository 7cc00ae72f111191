//! The status a `HighTemplar` reports: pure functions from what the
//! reconciler observed to `HighTemplarStatus`, conditions in the
//! `metav1.Condition` shape. A condition keeps its `lastTransitionTime`
//! while its status does not change.

use k8s_openapi::api::apps::v1::DeploymentStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::crd::{HighTemplar, HighTemplarStatus};
use crate::desired;
use crate::fleet::FleetFigures;

/// The state of the RabbitMQ exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerState {
    /// No `spec.rabbitmq`: the embedded broker.
    Embedded,
    /// The exchange is declared.
    Declared,
    /// Declaring failed: (reason, message).
    Failed(&'static str, String),
}

/// A failure of the reconciliation itself: (reason, message).
pub type Degradation = Option<(&'static str, String)>;

/// What one reconciliation observed.
#[derive(Clone, Debug)]
pub struct Observed {
    /// The Deployment's status, when it exists.
    pub deployment: Option<DeploymentStatus>,
    /// The RabbitMQ exchange.
    pub broker: BrokerState,
    /// Something the operator could not do (apply failed, Secret missing).
    pub degraded: Degradation,
}

fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    condition_with(previous, type_, if ok { "True" } else { "False" }, reason, message, generation, now)
}

/// A condition of status `status` (`True`, `False`, `Unknown`), keeping
/// the previous `lastTransitionTime` while the status is unchanged.
fn condition_with(
    previous: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The status for `ht` given what was observed, at time `now`.
pub fn status(ht: &HighTemplar, observed: &Observed, now: Time) -> HighTemplarStatus {
    let previous = ht.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let generation = ht.metadata.generation;
    let d = observed.deployment.clone().unwrap_or_default();
    let replicas = d.replicas.unwrap_or(0);
    let ready = d.ready_replicas.unwrap_or(0);
    let desired =
        if ht.spec.autoscaling.is_on() { replicas.max(ht.spec.autoscaling.min_replicas) } else { ht.spec.replicas };

    let (broker_ok, broker_reason, broker_message) = match &observed.broker {
        BrokerState::Embedded => {
            (true, "EmbeddedBroker", "no spec.rabbitmq: the gateway uses its embedded broker".to_string())
        }
        BrokerState::Declared => {
            let exchange = ht.spec.rabbitmq.as_ref().map(|r| r.exchange.as_str()).unwrap_or_default();
            (true, "ExchangeDeclared", format!("exchange {exchange:?} is declared"))
        }
        BrokerState::Failed(reason, message) => (false, *reason, message.clone()),
    };
    let (available, available_reason, available_message) = if observed.deployment.is_none() {
        (false, "NoDeployment", "the gateway Deployment does not exist yet".to_string())
    } else if desired == 0 {
        (false, "ScaledToZero", "replicas is 0".to_string())
    } else if ready >= 1 {
        (true, "ReplicasReady", format!("{ready} of {desired} replicas ready"))
    } else {
        (false, "NoReplicasReady", format!("0 of {desired} replicas ready"))
    };
    let (degraded, degraded_reason, degraded_message) = match &observed.degraded {
        Some((reason, message)) => (true, *reason, message.clone()),
        None => (false, "ReconcileSucceeded", "all objects are applied".to_string()),
    };
    let (ready_ok, ready_reason, ready_message) = if degraded {
        (false, degraded_reason, degraded_message.clone())
    } else if !broker_ok {
        (false, broker_reason, broker_message.clone())
    } else if !available {
        (false, available_reason, available_message.clone())
    } else {
        (true, "Ready", format!("{ready} of {desired} replicas ready; clients connect to {}", desired::endpoint(ht)))
    };
    let conditions = vec![
        condition(previous, "Ready", ready_ok, ready_reason, ready_message, generation, &now),
        condition(previous, "BrokerReady", broker_ok, broker_reason, broker_message, generation, &now),
        condition(previous, "Available", available, available_reason, available_message, generation, &now),
        condition(previous, "Degraded", degraded, degraded_reason, degraded_message, generation, &now),
    ];
    HighTemplarStatus {
        observed_generation: generation,
        replicas,
        ready_replicas: ready,
        replica_summary: Some(format!("{ready}/{desired}")),
        endpoint: Some(desired::endpoint(ht)),
        selector: Some(desired::selector_string(ht)),
        conditions,
        // The fleet figures are the scrape's (its own field manager).
        ..HighTemplarStatus::default()
    }
}

/// The connection autoscaler's part of the fleet status.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleStatus {
    /// Replicas the connections call for now.
    pub recommended: i32,
    /// When the replicas were last changed by the autoscaler.
    pub last_scale_time: Option<Time>,
}

/// The fleet scrape's part of the status (its own field manager): the
/// figures summed over the ready pods, the `Saturated` condition and, when
/// scaling on connections, the autoscaler's figures. `failure` is the first
/// page that could not be read, if any.
pub fn fleet_status(
    ht: &HighTemplar,
    figures: &FleetFigures,
    failure: Option<&str>,
    scale: Option<&ScaleStatus>,
    now: Time,
) -> serde_json::Value {
    let previous = ht.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let percent = u64::try_from(ht.spec.limits.saturated_percent).unwrap_or(90);
    let read = figures.pods_read;
    let tried = read + figures.pods_failed;
    let failed = match failure {
        Some(f) => format!("; {} of {tried} pods not read, e.g. {f}", figures.pods_failed),
        None => String::new(),
    };
    let (status, reason, message) = if figures.saturated(percent) {
        (
            "True",
            "PodAboveThreshold",
            format!(
                "a pod holds {} % of its connection limit (threshold {percent} %; {} connections on the fullest pod){failed}",
                figures.max_fill_percent, figures.max_pod_connections
            ),
        )
    } else if read == 0 && tried > 0 {
        ("Unknown", "ScrapeFailed", format!("no ready pod's /metrics could be read{failed}"))
    } else {
        (
            "False",
            if failure.is_some() { "ScrapeFailed" } else { "BelowThreshold" },
            format!(
                "the fullest of {read} ready pods holds {} % of its connection limit (threshold {percent} %){failed}",
                figures.max_fill_percent
            ),
        )
    };
    let saturated = condition_with(previous, "Saturated", status, reason, message, ht.metadata.generation, &now);
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let mut fleet = serde_json::json!({
        "connections": count(figures.connections),
        "subscriptions": count(figures.subscriptions),
        "consumers": count(figures.consumers),
        "maxPodConnections": count(figures.max_pod_connections),
        "slowConsumerCloses": count(figures.slow_consumer_closes),
        "scrapedPods": read,
        "lastScrapeTime": now,
        "conditions": [saturated],
    });
    // Left out when not scaling on connections: this field manager's apply
    // then removes them.
    if let Some(scale) = scale {
        fleet["recommendedReplicas"] = scale.recommended.into();
        if let Some(at) = &scale.last_scale_time {
            fleet["lastScaleTime"] = serde_json::json!(at);
        }
    }
    fleet
}

/// The status of condition `type_`, if present.
pub fn condition_status<'a>(status: &'a HighTemplarStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// Name of `ht` for messages.
pub fn display_name(ht: &HighTemplar) -> String {
    format!("{}/{}", ht.namespace().unwrap_or_default(), ht.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::tests::Fixture;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid time"))
    }

    fn deployment(replicas: i32, ready: i32) -> Option<DeploymentStatus> {
        Some(DeploymentStatus { replicas: Some(replicas), ready_replicas: Some(ready), ..DeploymentStatus::default() })
    }

    fn get<'a>(s: &'a HighTemplarStatus, t: &str) -> &'a Condition {
        condition_status(s, t).expect("condition present")
    }

    #[test]
    fn ready_when_everything_is() {
        let ht = Fixture::new("chat").replicas(2).rabbitmq().build();
        let s = status(
            &ht,
            &Observed { deployment: deployment(2, 2), broker: BrokerState::Declared, degraded: None },
            at(100),
        );
        assert_eq!(get(&s, "Ready").status, "True");
        assert_eq!(get(&s, "BrokerReady").reason, "ExchangeDeclared");
        assert_eq!(get(&s, "Available").status, "True");
        assert_eq!(get(&s, "Degraded").status, "False");
        assert_eq!(s.replica_summary.as_deref(), Some("2/2"));
        assert_eq!(s.endpoint.as_deref(), Some("ws://chat.apps.svc:80/ws/"));
    }

    #[test]
    fn the_first_failure_explains_not_ready() {
        let ht = Fixture::new("chat").replicas(2).rabbitmq().build();
        let broker_down = Observed {
            deployment: deployment(2, 2),
            broker: BrokerState::Failed("AccessRefused", "RabbitMQ refused the credentials".into()),
            degraded: None,
        };
        let s = status(&ht, &broker_down, at(1));
        assert_eq!((get(&s, "Ready").status.as_str(), get(&s, "Ready").reason.as_str()), ("False", "AccessRefused"));
        assert_eq!(get(&s, "BrokerReady").status, "False");
        let degraded =
            Observed { degraded: Some(("SecretMissing", "Secret apps/rabbitmq not found".into())), ..broker_down };
        let s = status(&ht, &degraded, at(1));
        assert_eq!(get(&s, "Ready").reason, "SecretMissing");
        assert_eq!(get(&s, "Degraded").status, "True");
        let no_pods = Observed { deployment: deployment(2, 0), broker: BrokerState::Declared, degraded: None };
        let s = status(&ht, &no_pods, at(1));
        assert_eq!(get(&s, "Ready").reason, "NoReplicasReady");
        assert_eq!(get(&s, "Available").message, "0 of 2 replicas ready");
    }

    #[test]
    fn fleet_status_sums_and_saturates() {
        use crate::fleet::PodFigures;
        let ht = Fixture::new("chat").with(|s| s.limits.max_connections = 100).build();
        let pod = |connections, limit| PodFigures {
            connections,
            limit,
            subscriptions: 2 * connections,
            amqp_connected: Some(true),
            slow_consumer_closes: 1,
        };
        let mut fleet = FleetFigures::new(100);
        fleet.add(&Ok::<_, ()>(pod(40, None)));
        fleet.add(&Ok::<_, ()>(pod(10, Some(20))));
        let s = fleet_status(&ht, &fleet, None, None, at(5));
        assert_eq!(s["connections"], 50);
        assert_eq!(s["subscriptions"], 100);
        assert_eq!(s["consumers"], 2);
        assert_eq!(s["maxPodConnections"], 40);
        assert_eq!(s["scrapedPods"], 2);
        assert_eq!(s["conditions"][0]["type"], "Saturated");
        assert_eq!(s["conditions"][0]["status"], "False", "{s}");
        assert_eq!(s["conditions"][0]["reason"], "BelowThreshold");

        fleet.add(&Ok::<_, ()>(pod(18, Some(20))));
        let s = fleet_status(&ht, &fleet, None, None, at(6));
        assert_eq!(s["conditions"][0]["status"], "True", "18 of 20 is 90 %: {s}");
        assert_eq!(s["conditions"][0]["reason"], "PodAboveThreshold");

        let mut dead = FleetFigures::new(100);
        dead.add(&Err::<PodFigures, _>(()));
        let s = fleet_status(&ht, &dead, Some("GET http://10.0.0.1:8080/metrics: timed out"), None, at(7));
        assert_eq!(s["conditions"][0]["status"], "Unknown");
        assert_eq!(s["conditions"][0]["reason"], "ScrapeFailed");
        assert!(s["conditions"][0]["message"].as_str().is_some_and(|m| m.contains("timed out")), "{s}");

        let mut some = FleetFigures::new(100);
        some.add(&Ok::<_, ()>(pod(1, None)));
        some.add(&Err::<PodFigures, _>(()));
        let s = fleet_status(&ht, &some, Some("refused"), None, at(8));
        assert_eq!(
            (s["conditions"][0]["status"].as_str(), s["conditions"][0]["reason"].as_str()),
            (Some("False"), Some("ScrapeFailed"))
        );
        assert_eq!(s["connections"], 1, "the pods read still count");
        assert!(s.get("recommendedReplicas").is_none() && s.get("lastScaleTime").is_none(), "{s}");

        let scale = ScaleStatus { recommended: 3, last_scale_time: Some(at(4)) };
        let s = fleet_status(&ht, &some, None, Some(&scale), at(9));
        assert_eq!(s["recommendedReplicas"], 3);
        assert_eq!(s["lastScaleTime"], serde_json::json!(at(4)));
        let never = ScaleStatus { recommended: 2, last_scale_time: None };
        assert!(fleet_status(&ht, &some, None, Some(&never), at(9)).get("lastScaleTime").is_none());
    }

    #[test]
    fn transition_time_moves_only_on_change() {
        let mut ht = Fixture::new("chat").build();
        let up = Observed { deployment: deployment(1, 1), broker: BrokerState::Embedded, degraded: None };
        ht.status = Some(status(&ht, &up, at(10)));
        let again = status(&ht, &up, at(20));
        assert_eq!(get(&again, "Ready").last_transition_time, at(10));
        let down = Observed { deployment: deployment(1, 0), ..up };
        let changed = status(&ht, &down, at(30));
        assert_eq!(get(&changed, "Ready").last_transition_time, at(30));
        assert_eq!(get(&changed, "BrokerReady").last_transition_time, at(10));
    }
}
