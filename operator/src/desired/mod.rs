//! Desired state: the Kubernetes objects one `HighTemplar` asks for.
//! Pure functions of the resource (and of hashes the reconciler computed);
//! no I/O. The reconciler server-side-applies what these return.

mod deployment;
pub mod gateway_config;

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec, MetricTarget,
    ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServicePort, ServiceSpec as CoreServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

pub use deployment::deployment;
pub use gateway_config::{GATEWAY_PORT, gateway_config_yaml};

use crate::crd::HighTemplar;

/// Annotation on the pod template: hash of the gateway config.
pub const CONFIG_HASH_ANNOTATION: &str = "hightemplar.io/config-hash";
/// Annotation on the pod template: hash of the referenced Secrets' values.
pub const SECRETS_HASH_ANNOTATION: &str = "hightemplar.io/secrets-hash";
/// Key of the gateway config in the ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// The operator's field manager for server-side apply.
pub const FIELD_MANAGER: &str = "high-templar-operator";

/// What the builders need besides the resource.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// Image when the spec names none.
    pub default_image: String,
    /// Hash of the referenced Secrets' values (rolls the pods on rotation).
    pub secrets_hash: String,
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Labels selecting the pods of `ht` (stable: a Deployment's selector is immutable).
pub fn selector_labels(ht: &HighTemplar) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "high-templar".to_string()),
        ("app.kubernetes.io/instance".to_string(), ht.name_any()),
    ])
}

/// Labels of every object the operator creates for `ht`.
pub fn labels(ht: &HighTemplar) -> BTreeMap<String, String> {
    let mut l = selector_labels(ht);
    l.insert("app.kubernetes.io/component".into(), "gateway".into());
    l.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
    l
}

/// The selector as a string (status and scale subresource).
pub fn selector_string(ht: &HighTemplar) -> String {
    selector_labels(ht).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn owner(ht: &HighTemplar) -> Vec<OwnerReference> {
    ht.controller_owner_ref(&()).into_iter().collect()
}

/// Metadata of an owned object: same name and namespace as `ht`.
fn meta(ht: &HighTemplar) -> ObjectMeta {
    ObjectMeta {
        name: Some(ht.name_any()),
        namespace: ht.namespace(),
        labels: Some(labels(ht)),
        owner_references: Some(owner(ht)),
        ..ObjectMeta::default()
    }
}

/// The in-cluster websocket URL of `ht`.
pub fn endpoint(ht: &HighTemplar) -> String {
    format!(
        "ws://{}.{}.svc:{}/ws/",
        ht.name_any(),
        ht.namespace().unwrap_or_else(|| "default".into()),
        ht.spec.service.port
    )
}

/// The gateway config, as a ConfigMap.
pub fn config_map(ht: &HighTemplar) -> ConfigMap {
    ConfigMap {
        metadata: meta(ht),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), gateway_config_yaml(&ht.spec))])),
        ..ConfigMap::default()
    }
}

/// The Service in front of the gateway pods.
pub fn service(ht: &HighTemplar) -> Service {
    let spec = &ht.spec.service;
    let mut metadata = meta(ht);
    if !spec.annotations.is_empty() {
        metadata.annotations = Some(spec.annotations.clone());
    }
    Service {
        metadata,
        spec: Some(CoreServiceSpec {
            type_: Some(format!("{:?}", spec.type_)),
            selector: Some(selector_labels(ht)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: spec.port,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..CoreServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The most replicas that may run: the autoscaler's maximum, or `replicas`.
fn max_replicas(ht: &HighTemplar) -> i32 {
    if ht.spec.autoscaling.is_on() { ht.spec.autoscaling.max_replicas } else { ht.spec.replicas }
}

/// A PodDisruptionBudget, when more than one replica may run (with a
/// single replica a PDB would block node drains forever).
pub fn pod_disruption_budget(ht: &HighTemplar) -> Option<PodDisruptionBudget> {
    if max_replicas(ht) <= 1 {
        return None;
    }
    Some(PodDisruptionBudget {
        metadata: meta(ht),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(ht.spec.pod_disruption_budget.max_unavailable.clone()),
            selector: Some(LabelSelector { match_labels: Some(selector_labels(ht)), ..LabelSelector::default() }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

/// A HorizontalPodAutoscaler on CPU, when enabled.
pub fn horizontal_pod_autoscaler(ht: &HighTemplar) -> Option<HorizontalPodAutoscaler> {
    let a = &ht.spec.autoscaling;
    if !a.enabled {
        return None;
    }
    Some(HorizontalPodAutoscaler {
        metadata: meta(ht),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: ht.name_any(),
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(a.target_cpu_utilization_percentage),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            ..HorizontalPodAutoscalerSpec::default()
        }),
        ..HorizontalPodAutoscaler::default()
    })
}

#[cfg(test)]
pub(crate) mod tests;
