//! `reconcile` and `error_policy` of one `HighTemplar`. Kubernetes and
//! RabbitMQ I/O happen here; what to apply comes from the pure builders of
//! [`crate::desired`], the status from [`crate::status`].
//!
//! Order: finalizer → Secrets (values and hash) → ConfigMap → Deployment →
//! Service → PDB → HPA → exchange → status and Events. A failure is written
//! into the status (`Degraded`) and the resource is requeued with backoff;
//! the process never exits over one resource.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{info, warn};

use crate::crd::{DeletionPolicy, HighTemplar, SecretKeyRef};
use crate::desired::{self, FIELD_MANAGER, Inputs};
use crate::metrics::Metrics;
use crate::rabbitmq;
use crate::status::{self, BrokerState, Observed};

/// Finalizer present while the exchange must be deleted with the resource.
pub const FINALIZER: &str = "hightemplar.io/exchange-cleanup";

/// Steady-state requeue: status follows the Deployment through the watch,
/// this only re-checks RabbitMQ now and then.
const RESYNC: Duration = Duration::from_secs(300);

/// Settings of the operator process.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Gateway image when a resource names none.
    pub gateway_image: String,
    /// Period of the fleet scrape (gateway pods' `/metrics` into the status).
    pub fleet_period: Duration,
}

/// What every reconciliation shares.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Event recorder.
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Process settings.
    pub settings: Settings,
    /// Consecutive failures per resource (`namespace/name`), for backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context for `client`.
    pub fn new(client: Client, recorder: Recorder, metrics: Arc<Metrics>, settings: Settings) -> Context {
        Context { client, recorder, metrics, settings, failures: Mutex::new(HashMap::new()) }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A reconciliation failure; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A referenced Secret or key is missing.
    #[error("{0}")]
    SecretMissing(String),
    /// RabbitMQ refused or could not be reached.
    #[error("{0}")]
    Broker(#[from] rabbitmq::TopologyError),
    /// The resource has no namespace (cannot happen for a namespaced kind).
    #[error("HighTemplar without a namespace")]
    NoNamespace,
}

impl Error {
    /// Metric and condition label.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "ApplyFailed",
            Error::SecretMissing(_) => "SecretMissing",
            Error::Broker(e) => e.reason(),
            Error::NoNamespace => "NoNamespace",
        }
    }
}

/// Reads `reference` from namespace `ns`.
async fn secret_value(client: &Client, ns: &str, reference: &SecretKeyRef) -> Result<String, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = api
        .get_opt(&reference.name)
        .await?
        .ok_or_else(|| Error::SecretMissing(format!("Secret {ns}/{} not found", reference.name)))?;
    let value = secret.data.as_ref().and_then(|d| d.get(&reference.key)).ok_or_else(|| {
        Error::SecretMissing(format!("Secret {ns}/{} has no key {:?}", reference.name, reference.key))
    })?;
    String::from_utf8(value.0.clone()).map_err(|_| {
        Error::SecretMissing(format!("Secret {ns}/{} key {:?} is not UTF-8", reference.name, reference.key))
    })
}

/// Values of the referenced Secrets, and a hash of them for the rollout
/// annotation. Missing ones are reported, not fatal: the other objects are
/// still applied.
struct Secrets {
    /// Where the exchange is declared: the AMQP URL and the TLS material
    /// of `spec.rabbitmq.tls`, when configured and all present.
    amqp: Option<rabbitmq::Target>,
    /// Why `amqp` is `None` although `spec.rabbitmq` is set.
    amqp_missing: Option<String>,
    /// Hash over every referenced value.
    hash: String,
    /// The first missing reference.
    missing: Option<Error>,
}

/// Every Secret key `ht` references: (what, role, reference). `what` is
/// `amqp`, `trigger`, `rabbitmq-tls` or `backend-tls`; `role` is the TLS
/// role (`ca`, `cert`, `key`) or empty.
pub fn secret_references(ht: &HighTemplar) -> Vec<(&'static str, &'static str, SecretKeyRef)> {
    let mut refs = Vec::new();
    if let Some(r) = &ht.spec.rabbitmq {
        refs.push(("amqp", "", r.url_secret_ref.clone()));
        for (role, reference) in r.tls.as_ref().map(|t| t.references()).unwrap_or_default() {
            refs.push(("rabbitmq-tls", role, reference));
        }
    }
    if let Some(t) = &ht.spec.trigger {
        refs.push(("trigger", "", t.token_secret_ref.clone()));
    }
    for (role, reference) in ht.spec.backend.tls.as_ref().map(|t| t.references()).unwrap_or_default() {
        refs.push(("backend-tls", role, reference));
    }
    refs
}

async fn read_secrets(client: &Client, ns: &str, ht: &HighTemplar) -> Result<Secrets, Error> {
    use high_templar_gateway::tls::Pem;
    let mut material = String::new();
    let mut missing = None;
    let mut amqp_missing = None;
    let mut amqp_url = None;
    let rabbitmq_tls = ht.spec.rabbitmq.as_ref().and_then(|r| r.tls.as_ref());
    let mut tls = rabbitmq_tls.map(|_| high_templar_gateway::tls::TlsMaterial::default());
    let mut client_cert = None;
    for (what, role, reference) in secret_references(ht) {
        match secret_value(client, ns, &reference).await {
            Ok(value) => {
                material.push_str(&format!("{what}:{role}:{}/{}={value}\n", reference.name, reference.key));
                let pem = || Pem {
                    name: format!("Secret {ns}/{} key {}", reference.name, reference.key),
                    pem: value.clone().into_bytes(),
                };
                match (what, role) {
                    ("amqp", _) => amqp_url = Some(value.clone()),
                    ("rabbitmq-tls", "ca") => {
                        if let Some(tls) = tls.as_mut() {
                            tls.ca = Some(pem());
                        }
                    }
                    ("rabbitmq-tls", "cert") => client_cert = Some(pem()),
                    ("rabbitmq-tls", "key") => {
                        if let (Some(tls), Some(cert)) = (tls.as_mut(), client_cert.take()) {
                            tls.identity = Some((cert, pem()));
                        }
                    }
                    _ => {}
                }
            }
            Err(e @ Error::SecretMissing(_)) => {
                material.push_str(&format!("{what}:{role}:missing\n"));
                if what == "amqp" || what == "rabbitmq-tls" {
                    amqp_missing.get_or_insert(e.to_string());
                }
                missing.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    let amqp = match (amqp_url, &amqp_missing) {
        (Some(url), None) => Some(rabbitmq::Target { url: high_templar_gateway::config::Secret(url), tls }),
        _ => None,
    };
    Ok(Secrets { amqp, amqp_missing, hash: desired::sha256_hex(material.as_bytes()), missing })
}

/// Server-side applies `object`.
async fn apply<K>(client: &Client, ns: &str, object: &K) -> Result<K, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&object.name_any(), &params, &Patch::Apply(object)).await
}

/// Deletes the object `name` of kind `K` if it exists and `ht` owns it.
async fn delete_if_owned<K>(client: &Client, ns: &str, name: &str, ht: &HighTemplar) -> Result<(), kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    if let Some(existing) = api.get_opt(name).await? {
        let ours = existing.owner_references().iter().any(|o| Some(&o.uid) == ht.uid().as_ref());
        if ours {
            api.delete(name, &DeleteParams::default()).await?;
        }
    }
    Ok(())
}

async fn publish(ctx: &Context, ht: &HighTemplar, type_: EventType, reason: &str, action: &str, note: String) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&event, &ht.object_ref(&())).await {
        warn!(error = %e, "cannot publish event");
    }
}

async fn set_finalizer(client: &Client, ns: &str, ht: &HighTemplar, present: bool) -> Result<(), kube::Error> {
    let mut finalizers = ht.finalizers().to_vec();
    let has = finalizers.iter().any(|f| f == FINALIZER);
    if has == present {
        return Ok(());
    }
    if present {
        finalizers.push(FINALIZER.into());
    } else {
        finalizers.retain(|f| f != FINALIZER);
    }
    let api: Api<HighTemplar> = Api::namespaced(client.clone(), ns);
    // The resourceVersion makes this a compare-and-swap: a concurrent change
    // fails with a conflict and the resource is requeued.
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": ht.resource_version()}});
    api.patch(&ht.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Deletion: delete the exchange if asked, then release the resource.
async fn finalize(ht: &HighTemplar, ctx: &Context, ns: &str) -> Result<Action, Error> {
    if !ht.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    if let Some(rabbitmq) = &ht.spec.rabbitmq
        && rabbitmq.deletion_policy == DeletionPolicy::Delete
    {
        let secrets = read_secrets(&ctx.client, ns, ht).await?;
        let target = secrets.amqp.ok_or_else(|| {
            Error::SecretMissing(secrets.amqp_missing.unwrap_or_else(|| "the RabbitMQ URL Secret is missing".into()))
        })?;
        rabbitmq::delete_exchange(&target, &rabbitmq.exchange).await?;
        info!(ht = %status::display_name(ht), exchange = %rabbitmq.exchange, "exchange deleted");
        publish(
            ctx,
            ht,
            EventType::Normal,
            "ExchangeDeleted",
            "Delete",
            format!("exchange {:?} deleted", rabbitmq.exchange),
        )
        .await;
    }
    set_finalizer(&ctx.client, ns, ht, false).await?;
    Ok(Action::await_change())
}

/// Applies every desired object; returns the Deployment's status.
async fn apply_objects(ht: &HighTemplar, ctx: &Context, ns: &str, inputs: &Inputs) -> Result<Deployment, Error> {
    let client = &ctx.client;
    apply(client, ns, &desired::config_map(ht)).await?;
    crate::scaler::hand_over_replicas(client, ns, ht).await?;
    let deployment = apply(client, ns, &desired::deployment(ht, inputs)).await?;
    apply(client, ns, &desired::service(ht)).await?;
    match desired::pod_disruption_budget(ht) {
        Some(pdb) => drop(apply(client, ns, &pdb).await?),
        None => delete_if_owned::<PodDisruptionBudget>(client, ns, &ht.name_any(), ht).await?,
    }
    match desired::horizontal_pod_autoscaler(ht) {
        Some(hpa) => drop(apply(client, ns, &hpa).await?),
        None => delete_if_owned::<HorizontalPodAutoscaler>(client, ns, &ht.name_any(), ht).await?,
    }
    Ok(deployment)
}

/// Reconciles one `HighTemplar`.
pub async fn reconcile(ht: Arc<HighTemplar>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let ns = ht.namespace().ok_or(Error::NoNamespace)?;
    let result = reconcile_inner(&ht, &ctx, &ns).await;
    ctx.metrics.observe(started.elapsed(), result.as_ref().err().map(Error::reason));
    if result.is_ok() {
        ctx.failures().remove(&status::display_name(&ht));
    }
    result
}

async fn reconcile_inner(ht: &HighTemplar, ctx: &Context, ns: &str) -> Result<Action, Error> {
    if ht.meta().deletion_timestamp.is_some() {
        return finalize(ht, ctx, ns).await;
    }
    let wants_finalizer = ht.spec.rabbitmq.as_ref().is_some_and(|r| r.deletion_policy == DeletionPolicy::Delete);
    set_finalizer(&ctx.client, ns, ht, wants_finalizer).await?;

    let secrets = read_secrets(&ctx.client, ns, ht).await?;
    let inputs = Inputs { default_image: ctx.settings.gateway_image.clone(), secrets_hash: secrets.hash.clone() };
    let first_time = ht.status.is_none();
    let applied = apply_objects(ht, ctx, ns, &inputs).await;

    let broker = match (&ht.spec.rabbitmq, &secrets.amqp) {
        (None, _) => BrokerState::Embedded,
        (Some(_), None) => BrokerState::Failed(
            "SecretMissing",
            secrets.amqp_missing.clone().unwrap_or_else(|| "the RabbitMQ URL Secret is missing".into()),
        ),
        (Some(r), Some(target)) => match rabbitmq::declare_exchange(target, &r.exchange, r.durable).await {
            Ok(()) => BrokerState::Declared,
            Err(e) => BrokerState::Failed(e.reason(), e.to_string()),
        },
    };
    let (deployment, failure) = match applied {
        Ok(d) => (Some(d), secrets.missing),
        Err(e) => (None, Some(e)),
    };
    let observed = Observed {
        deployment: deployment.and_then(|d| d.status),
        broker: broker.clone(),
        degraded: failure.as_ref().map(|e| (e.reason(), e.to_string())),
    };
    let new_status = status::status(ht, &observed, Time(k8s_openapi::jiff::Timestamp::now()));
    let api: Api<HighTemplar> = Api::namespaced(ctx.client.clone(), ns);
    let patch = json!({
        "apiVersion": "hightemplar.io/v1alpha1",
        "kind": "HighTemplar",
        "status": new_status,
    });
    api.patch_status(&ht.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;

    let generation_changed = ht.status.as_ref().and_then(|s| s.observed_generation) != ht.metadata.generation;
    if let Some(e) = failure {
        publish(ctx, ht, EventType::Warning, e.reason(), "Reconcile", e.to_string()).await;
        return Err(e);
    }
    if let BrokerState::Failed(reason, message) = &broker {
        publish(ctx, ht, EventType::Warning, reason, "DeclareExchange", message.clone()).await;
        return Err(Error::Broker(rabbitmq::TopologyError::Other(message.clone())));
    }
    if first_time {
        publish(ctx, ht, EventType::Normal, "Created", "Reconcile", "gateway objects created".into()).await;
    } else if generation_changed {
        publish(ctx, ht, EventType::Normal, "Updated", "Reconcile", "gateway objects updated".into()).await;
    }
    Ok(Action::requeue(RESYNC))
}

/// Requeues a failed resource with capped exponential backoff (1 s … 5 min).
pub fn error_policy(ht: Arc<HighTemplar>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = status::display_name(&ht);
    let attempt = {
        let mut failures = ctx.failures();
        let n = failures.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(attempt);
    warn!(ht = %key, error = %error, retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

/// Delay before retry `attempt` (1-based): 1 s doubling, capped at 5 min.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_reason_is_preset_in_the_metrics() {
        use rabbitmq::TopologyError as T;
        let s = String::new;
        let broker = [
            T::InvalidUrl,
            T::TlsWithoutAmqps,
            T::TlsConfig(s()),
            T::Tls(s()),
            T::AccessRefused(s()),
            T::Unreachable(s()),
            T::PreconditionFailed(s()),
            T::Other(s()),
        ];
        let mut reasons: Vec<&str> = broker.into_iter().map(|e| Error::Broker(e).reason()).collect();
        reasons.extend([Error::SecretMissing(s()).reason(), Error::NoNamespace.reason(), "ApplyFailed"]);
        for reason in reasons {
            assert!(crate::metrics::FAILURE_REASONS.contains(&reason), "{reason} not preset");
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(10), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }
}
