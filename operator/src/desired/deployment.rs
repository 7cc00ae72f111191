//! The gateway Deployment.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
    SecretKeySelector, SecretProjection, SecurityContext, TopologySpreadConstraint, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::gateway_config::{CONFIG_PATH, GATEWAY_PORT, TLS_DIR, termination_grace_seconds, tls_file};
use super::{CONFIG_HASH_ANNOTATION, CONFIG_KEY, Inputs, SECRETS_HASH_ANNOTATION, gateway_config_yaml, meta};
use super::{selector_labels, sha256_hex};
use crate::crd::{HighTemplar, SecretKeyRef};

/// UID the gateway runs as (non-root, matches the image's user).
pub const GATEWAY_UID: i64 = 65532;

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn secret_env(name: &str, r: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: r.name.clone(), key: r.key.clone(), optional: Some(false) }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("100m".into())),
            ("memory".to_string(), Quantity("128Mi".into())),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), Quantity("512Mi".into()))])),
        ..ResourceRequirements::default()
    }
}

/// The TLS Secrets of `ht`, projected into one read-only volume at
/// [`TLS_DIR`] (`rabbitmq/ca.crt`, `backend/tls.key`, ...); `None` without
/// any.
fn tls_volume(ht: &HighTemplar) -> Option<Volume> {
    let peers = [
        ("rabbitmq", ht.spec.rabbitmq.as_ref().and_then(|r| r.tls.as_ref())),
        ("backend", ht.spec.backend.tls.as_ref()),
    ];
    let mut sources = Vec::new();
    for (peer, tls) in peers {
        for (role, reference) in tls.map(|t| t.references()).unwrap_or_default() {
            sources.push(VolumeProjection {
                secret: Some(SecretProjection {
                    name: reference.name,
                    items: Some(vec![KeyToPath { key: reference.key, path: tls_file(peer, role), mode: None }]),
                    optional: Some(false),
                }),
                ..VolumeProjection::default()
            });
        }
    }
    (!sources.is_empty()).then(|| Volume {
        name: "tls".into(),
        projected: Some(ProjectedVolumeSource { sources: Some(sources), ..ProjectedVolumeSource::default() }),
        ..Volume::default()
    })
}

/// The restricted Pod Security Standard, for the container.
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(GATEWAY_UID),
        run_as_group: Some(GATEWAY_UID),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
        ..SecurityContext::default()
    }
}

/// The gateway Deployment. `inputs.secrets_hash` and the config's own
/// hash are pod-template annotations, so a change of either rolls the pods.
pub fn deployment(ht: &HighTemplar, inputs: &Inputs) -> Deployment {
    let spec = &ht.spec;
    let mut env = vec![EnvVar { name: "HT_LOG_FORMAT".into(), value: Some("json".into()), ..EnvVar::default() }];
    if let Some(rabbitmq) = &spec.rabbitmq {
        env.push(secret_env("HT_AMQP_URL", &rabbitmq.url_secret_ref));
    }
    if let Some(trigger) = &spec.trigger {
        env.push(secret_env("HT_TRIGGER_TOKEN", &trigger.token_secret_ref));
    }
    let mut annotations = spec.pod_annotations.clone();
    annotations.insert(CONFIG_HASH_ANNOTATION.into(), sha256_hex(gateway_config_yaml(spec).as_bytes()));
    annotations.insert(SECRETS_HASH_ANNOTATION.into(), inputs.secrets_hash.clone());
    let mut pod_labels = super::labels(ht);
    pod_labels.extend(selector_labels(ht));
    let image = spec.image.clone().unwrap_or_else(|| inputs.default_image.clone());
    let mut mounts = vec![VolumeMount {
        name: "config".into(),
        mount_path: "/etc/high-templar".into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: ht.name_any(),
            items: Some(vec![KeyToPath { key: CONFIG_KEY.into(), path: CONFIG_KEY.into(), ..Default::default() }]),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    if let Some(tls) = tls_volume(ht) {
        mounts.push(VolumeMount {
            name: tls.name.clone(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(tls);
    }
    let container = Container {
        name: "gateway".into(),
        image: Some(image),
        image_pull_policy: spec.image_pull_policy.clone(),
        args: Some(vec!["serve".into(), "--config".into(), CONFIG_PATH.into()]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(GATEWAY_PORT),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        resources: Some(spec.resources.clone().unwrap_or_else(default_resources)),
        security_context: Some(container_security()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
            ..PodSecurityContext::default()
        }),
        termination_grace_period_seconds: Some(termination_grace_seconds(spec)),
        // Spread the replicas over nodes, so one node going away takes at
        // most its share of the websockets with it.
        topology_spread_constraints: Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector { match_labels: Some(selector_labels(ht)), ..LabelSelector::default() }),
            ..TopologySpreadConstraint::default()
        }]),
        node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
        tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
        affinity: spec.affinity.clone(),
        automount_service_account_token: Some(false),
        volumes: Some(volumes),
        ..PodSpec::default()
    };
    Deployment {
        metadata: meta(ht),
        spec: Some(DeploymentSpec {
            // With autoscaling on, the autoscaler (the HPA, or the fleet
            // scrape on connections) owns `replicas`: leaving the field out
            // of the applied object leaves it to the autoscaler.
            replicas: (!spec.autoscaling.is_on()).then_some(spec.replicas),
            selector: LabelSelector { match_labels: Some(selector_labels(ht)), ..LabelSelector::default() },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".into())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}
