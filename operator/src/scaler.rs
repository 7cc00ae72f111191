//! Connection autoscaling, the I/O half (#14 item 2): after each fleet
//! scrape of a resource with `autoscaling.targetConnectionsPerPod`, decide
//! with [`crate::autoscale`] and apply the decision to the Deployment.
//!
//! - The Deployment's `spec.replicas` is written by server-side apply under
//!   [`AUTOSCALER_FIELD_MANAGER`] (a partial object: only `replicas`), the
//!   way an HPA owns it; the reconciler leaves the field out while
//!   autoscaling is on. [`hand_over_replicas`] moves the field from the
//!   reconciler to the autoscaler when autoscaling (on connections, or the
//!   CPU HPA) is turned on, so the Deployment keeps its pods instead of
//!   falling back to the default of 1.
//! - Before a scale-down every pod read gets its connections as
//!   `controller.kubernetes.io/pod-deletion-cost`, so the ReplicaSet
//!   removes the emptiest pods; their clients reconnect through the pods'
//!   normal close window.
//! - Each scale is an Event (`ScaledUp`, `ScaledDown`) and counted in
//!   `hightemplar_operator_scale_events_total{direction}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::autoscale::{self, Decision, History, Observation, Policy};
use crate::crd::HighTemplar;
use crate::desired::FIELD_MANAGER;
use crate::metrics::Metrics;
use crate::scrape::FleetScrape;
use crate::status;

/// Field manager of the Deployment's `replicas` while the operator scales on
/// connections (and of the count handed over to a CPU HPA).
pub const AUTOSCALER_FIELD_MANAGER: &str = "high-templar-operator-autoscaler";

/// The annotation the ReplicaSet controller reads to pick the pods to remove.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Scales resources on their connections; one per fleet scrape loop.
pub struct ConnectionAutoscaler {
    /// Kubernetes client.
    client: Client,
    /// Event recorder.
    recorder: Recorder,
    /// Operator metrics.
    metrics: Arc<Metrics>,
    /// Recommendations of each resource, by UID.
    histories: HashMap<String, History>,
}

/// Sets the Deployment `name`'s replicas under the autoscaler's field manager.
async fn apply_replicas(client: &Client, ns: &str, name: &str, replicas: i32) -> Result<(), kube::Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let patch = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas},
    });
    let params = PatchParams::apply(AUTOSCALER_FIELD_MANAGER).force();
    api.patch(name, &params, &Patch::Apply(&patch)).await.map(drop)
}

/// When autoscaling is on (on connections, or the CPU HPA) and the
/// reconciler still applies the Deployment's `replicas` (it was off until
/// now), the autoscaler's field manager applies the current count (within
/// the bounds) first: the reconciler's next apply leaves the field out, and
/// a field nobody else owns would be reset to 1 pod. The HPA then changes
/// it through the scale subresource as usual.
pub async fn hand_over_replicas(client: &Client, ns: &str, ht: &HighTemplar) -> Result<(), kube::Error> {
    let spec = &ht.spec.autoscaling;
    if !spec.is_on() {
        return Ok(());
    }
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let Some(deployment) = api.get_opt(&ht.name_any()).await? else { return Ok(()) };
    if !autoscale::applies_replicas(&deployment, FIELD_MANAGER) {
        return Ok(());
    }
    let current = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let replicas = current.clamp(spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
    info!(ht = %status::display_name(ht), replicas, "autoscaling on: the autoscaler takes over the replicas");
    apply_replicas(client, ns, &ht.name_any(), replicas).await
}

impl ConnectionAutoscaler {
    /// An autoscaler with no history.
    pub fn new(client: Client, recorder: Recorder, metrics: Arc<Metrics>) -> ConnectionAutoscaler {
        ConnectionAutoscaler { client, recorder, metrics, histories: HashMap::new() }
    }

    /// Forgets resources whose UID is not in `live`.
    pub fn retain(&mut self, live: &[String]) {
        self.histories.retain(|uid, _| live.contains(uid));
    }

    /// Decides for `ht` from its `scrape` and applies the decision. `None`:
    /// `ht` does not scale on connections, or has no Deployment yet.
    pub async fn step(&mut self, ht: &HighTemplar, scrape: &FleetScrape) -> Result<Option<Decision>, kube::Error> {
        let uid = ht.uid().unwrap_or_default();
        let Some(policy) = Policy::of(&ht.spec.autoscaling) else {
            self.histories.remove(&uid);
            return Ok(None);
        };
        let ns = ht.namespace().unwrap_or_default();
        let name = ht.name_any();
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &ns);
        let Some(deployment) = api.get_opt(&name).await? else { return Ok(None) };
        let current = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let figures = &scrape.figures;
        let read = i32::try_from(figures.pods_read).unwrap_or(i32::MAX);
        let seen = Observation {
            current,
            connections: figures.connections,
            complete: figures.pods_failed == 0 && scrape.not_ready == 0 && read >= current,
        };
        let now = Instant::now();
        let decision = self.histories.entry(uid).or_insert_with(|| History::new(now)).decide(now, seen, &policy);
        if !decision.changed {
            return Ok(Some(decision));
        }
        let down = decision.replicas < current;
        if down {
            self.set_deletion_costs(&ns, scrape).await?;
        }
        apply_replicas(&self.client, &ns, &name, decision.replicas).await?;
        let (reason, direction) = if down { ("ScaledDown", "down") } else { ("ScaledUp", "up") };
        let note = format!("{current} → {} replicas: {}", decision.replicas, decision.why);
        info!(ht = %status::display_name(ht), from = current, to = decision.replicas, why = %decision.why, "scaled");
        self.metrics.scaled(direction);
        let event = Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note),
            action: "Scale".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &ht.object_ref(&())).await {
            warn!(error = %e, "cannot publish event");
        }
        Ok(Some(decision))
    }

    /// Annotates each pod read with its connections as deletion cost
    /// (only where the annotation differs).
    async fn set_deletion_costs(&self, ns: &str, scrape: &FleetScrape) -> Result<(), kube::Error> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let params = PatchParams { field_manager: Some(AUTOSCALER_FIELD_MANAGER.into()), ..PatchParams::default() };
        for pod in &scrape.pods {
            let cost = autoscale::deletion_cost(pod.connections).to_string();
            if pod.deletion_cost.as_deref() == Some(cost.as_str()) {
                continue;
            }
            let patch = json!({"metadata": {"annotations": {DELETION_COST: cost}}});
            match pods.patch(&pod.name, &params, &Patch::Merge(&patch)).await {
                // Gone since the scrape: nothing left to rank.
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                other => drop(other?),
            }
        }
        Ok(())
    }
}
