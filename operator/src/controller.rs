//! The controller: watches `HighTemplar`s (one namespace or all), the
//! objects they own, and the Secrets they reference; runs [`reconcile`]
//! for each change.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, Predicate, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{debug, info};

use crate::crd::HighTemplar;
use crate::metrics::Metrics;
use crate::reconcile::{Context, Settings, error_policy, reconcile};

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Whether `ht` references Secret `name`.
fn references(ht: &HighTemplar, name: &str) -> bool {
    crate::reconcile::secret_references(ht).iter().any(|(_, _, r)| r.name == name)
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let ns = namespace.as_deref();
    let reporter = Reporter { controller: "high-templar-operator".into(), instance: std::env::var("POD_NAME").ok() };
    let ctx = Arc::new(Context::new(
        client.clone(),
        Recorder::new(client.clone(), reporter),
        metrics.clone(),
        settings.clone(),
    ));
    let config = watcher::Config::default();
    // Only changes of the spec (generation; deletion bumps it too) and of
    // the finalizers reach the reconciler: status-only changes (its own
    // status patches, the fleet figures written every fleet period) would
    // re-apply every object and re-declare the exchange each time. Owned
    // objects, referenced Secrets and the periodic resync still trigger it.
    let (store, writer) = reflector::store();
    let resources = watcher(api::<HighTemplar>(&client, ns), config.clone())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation.combine(predicates::finalizers), Default::default());
    let controller = Controller::for_stream(resources, store.clone());
    // The fleet scrape lives as long as the controller (it stops with
    // leadership).
    let fleet = tokio::spawn(crate::scrape::run(
        client.clone(),
        store.clone(),
        settings.fleet_period,
        metrics.clone(),
        ctx.recorder.clone(),
    ));
    info!(namespace = ns.unwrap_or("<all>"), "high-templar operator controller starting");
    controller
        .owns(api::<ConfigMap>(&client, ns), config.clone())
        .owns(api::<Deployment>(&client, ns), config.clone())
        .owns(api::<Service>(&client, ns), config.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), config.clone())
        .owns(api::<HorizontalPodAutoscaler>(&client, ns), config.clone())
        // A rotated Secret re-reconciles every HighTemplar referencing it,
        // which changes the rollout annotation and rolls the pods.
        .watches(api::<Secret>(&client, ns), config, move |secret: Secret| {
            let name = secret.name_any();
            let secret_ns = secret.namespace();
            store
                .state()
                .into_iter()
                .filter(|ht| ht.namespace() == secret_ns && references(ht, &name))
                .map(|ht| ObjectRef::from_obj(&*ht))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(ht = %object, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile error (requeued)"),
            }
        })
        .await;
    fleet.abort();
    info!("controller stopped");
}
