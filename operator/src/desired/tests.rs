//! Unit tests of the desired-object builders, with a builder-style fixture.

use high_templar_gateway::config::{BrokerKind, Config};

use super::*;
use crate::crd::{
    AutoscalingSpec, BackendSpec, DeletionPolicy, ForwardRuleSpec, ForwardSourceSpec, HighTemplarSpec, LimitsSpec,
    PodDisruptionBudgetSpec, RabbitmqSpec, SecretKeyRef, ServiceSpec, ShutdownSpec, TriggerSpec,
};

/// Builds `HighTemplar` fixtures: `Fixture::new("chat").rabbitmq().build()`.
pub(crate) struct Fixture {
    ht: HighTemplar,
}

impl Fixture {
    pub(crate) fn new(name: &str) -> Fixture {
        let spec = HighTemplarSpec {
            replicas: 1,
            image: None,
            image_pull_policy: None,
            backend: BackendSpec {
                url: "http://api.default.svc:8000/api/".into(),
                bootstrap_path: "bootstrap/".into(),
                timeout_seconds: 5,
                forward: vec![],
                admission: Default::default(),
                circuit_breaker: Default::default(),
                coalesce: true,
                answer_reuse_seconds: 0,
                max_body_bytes: 4 << 20,
                max_allowed_rooms: 10_000,
                tls: None,
            },
            rabbitmq: None,
            trigger: None,
            limits: LimitsSpec::default(),
            shutdown: ShutdownSpec::default(),
            security: Default::default(),
            permissions: Default::default(),
            service: ServiceSpec::default(),
            autoscaling: AutoscalingSpec::default(),
            pod_disruption_budget: PodDisruptionBudgetSpec::default(),
            resources: None,
            node_selector: Default::default(),
            tolerations: vec![],
            affinity: None,
            pod_annotations: Default::default(),
        };
        let mut ht = HighTemplar::new(name, spec);
        ht.metadata.namespace = Some("apps".into());
        ht.metadata.uid = Some("0000-uid".into());
        Fixture { ht }
    }

    pub(crate) fn replicas(mut self, n: i32) -> Fixture {
        self.ht.spec.replicas = n;
        self
    }

    pub(crate) fn rabbitmq(mut self) -> Fixture {
        self.ht.spec.rabbitmq = Some(RabbitmqSpec {
            url_secret_ref: SecretKeyRef { name: "rabbitmq".into(), key: "url".into() },
            tls: None,
            exchange: "hightemplar".into(),
            durable: true,
            deletion_policy: DeletionPolicy::Retain,
        });
        self
    }

    pub(crate) fn trigger(mut self) -> Fixture {
        self.ht.spec.trigger =
            Some(TriggerSpec { token_secret_ref: SecretKeyRef { name: "ht-trigger".into(), key: "token".into() } });
        self
    }

    pub(crate) fn autoscaling(mut self, min: i32, max: i32) -> Fixture {
        self.ht.spec.autoscaling = AutoscalingSpec {
            enabled: true,
            min_replicas: min,
            max_replicas: max,
            target_cpu_utilization_percentage: 60,
            ..AutoscalingSpec::default()
        };
        self
    }

    /// Autoscaling on connections (the operator, no HPA).
    pub(crate) fn connection_autoscaling(mut self, min: i32, max: i32, target: i64) -> Fixture {
        self.ht.spec.autoscaling = AutoscalingSpec {
            min_replicas: min,
            max_replicas: max,
            target_connections_per_pod: Some(target),
            ..AutoscalingSpec::default()
        };
        self
    }

    pub(crate) fn with(mut self, f: impl FnOnce(&mut HighTemplarSpec)) -> Fixture {
        f(&mut self.ht.spec);
        self
    }

    pub(crate) fn build(self) -> HighTemplar {
        self.ht
    }
}

fn inputs() -> Inputs {
    Inputs { default_image: "high-templar-gateway:test".into(), secrets_hash: "abc".into() }
}

fn parse_config(ht: &HighTemplar) -> Config {
    let yaml = &config_map(ht).data.expect("data")[CONFIG_KEY];
    Config::from_yaml(yaml).expect("the gateway reads the operator's config")
}

#[test]
fn config_map_is_a_valid_gateway_config() {
    let ht = Fixture::new("chat")
        .replicas(3)
        .rabbitmq()
        .trigger()
        .with(|s| {
            s.rabbitmq.as_mut().expect("rabbitmq").exchange = "events".into();
            s.rabbitmq.as_mut().expect("rabbitmq").durable = false;
            s.limits.max_connections = 1234;
            s.limits.send_buffer_bytes = 65536;
            s.limits.max_request_id_bytes = 64;
            s.limits.handshake_timeout_seconds = 7;
            s.limits.max_pending_connections = 99;
            s.limits.max_trigger_body_bytes = 4096;
            s.limits.max_trigger_rooms = 12;
            s.limits.trigger_body_timeout_seconds = 4;
            s.backend.max_body_bytes = 65536;
            s.backend.max_allowed_rooms = 77;
            s.backend.admission.max_concurrent = 16;
            s.backend.answer_reuse_seconds = 3;
            s.backend.circuit_breaker.failure_percent = 25;
            s.security.allowed_origins = vec!["https://*.example.com".into()];
            s.security.trusted_proxies = vec!["10.0.0.0/8".into()];
            s.permissions.user_path = Some("user.data.id".into());
            s.permissions.refresh_seconds = 300;
            s.backend.forward = vec![ForwardRuleSpec {
                header: "X-Tenant".into(),
                from: vec![
                    ForwardSourceSpec { cookie: Some("tenant".into()), ..Default::default() },
                    ForwardSourceSpec { peer_address: Some(true), ..Default::default() },
                ],
                format: Some("t={}".into()),
            }];
        })
        .build();
    let mut config = parse_config(&ht);
    assert_eq!(config.broker.kind, BrokerKind::Amqp);
    assert_eq!(config.broker.amqp.exchange, "events");
    assert!(!config.broker.amqp.exchange_durable);
    assert_eq!(config.limits.max_connections, 1234);
    assert_eq!(config.limits.send_buffer_bytes, 65536);
    assert_eq!(config.limits.max_request_id_bytes, 64);
    assert_eq!(config.limits.handshake_timeout_seconds, 7.0);
    assert_eq!(config.limits.max_pending_connections, 99);
    assert_eq!(config.trigger.max_body_bytes, 4096);
    assert_eq!(config.trigger.max_rooms, 12);
    assert_eq!(config.trigger.body_timeout_seconds, 4.0);
    assert_eq!(config.backend.max_body_bytes, 65536);
    assert_eq!(config.backend.max_allowed_rooms, 77);
    assert_eq!(config.backend.admission.max_concurrent, 16);
    assert_eq!(config.backend.answer_reuse.seconds, 3.0);
    assert_eq!(config.backend.admission.max_wait_seconds, 5.0);
    assert_eq!(config.backend.circuit_breaker.failure_ratio, 0.25);
    assert_eq!(config.backend.circuit_breaker.window, 20);
    assert_eq!(config.security.allowed_origins, ["https://*.example.com"]);
    assert_eq!(config.permissions.user_path.as_deref(), Some("user.data.id"));
    assert_eq!(config.permissions.refresh_seconds, 300.0);
    let proxies: Vec<String> = config.security.trusted_proxies.iter().map(ToString::to_string).collect();
    assert_eq!(proxies, ["10.0.0.0/8"]);
    assert_eq!(config.listen.0.port(), GATEWAY_PORT);
    assert_eq!(config.backend.forward.len(), 1);
    assert!(config.broker.amqp.url.is_none(), "the AMQP URL (a secret) is not in the ConfigMap");
    assert!(config.trigger.token.is_none(), "the trigger token is not in the ConfigMap");
    // With the URL from the environment, as in the pod, it validates.
    config.broker.amqp.url = Some(high_templar_gateway::config::Secret("amqp://u:p@rabbitmq:5672/%2f".into()));
    config.validate().expect("valid gateway config");
}

#[test]
fn memory_broker_without_rabbitmq() {
    let config = parse_config(&Fixture::new("solo").build());
    assert_eq!(config.broker.kind, BrokerKind::Memory);
    config.validate().expect("valid");
}

#[test]
fn objects_are_owned_and_labelled() {
    let ht = Fixture::new("chat").replicas(2).rabbitmq().build();
    let metas = [
        config_map(&ht).metadata,
        deployment(&ht, &inputs()).metadata,
        service(&ht).metadata,
        pod_disruption_budget(&ht).expect("pdb").metadata,
    ];
    for m in metas {
        assert_eq!(m.name.as_deref(), Some("chat"));
        assert_eq!(m.namespace.as_deref(), Some("apps"));
        let owners = m.owner_references.expect("owner refs");
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "HighTemplar");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(m.labels.expect("labels")["app.kubernetes.io/instance"], "chat");
    }
}

#[test]
fn deployment_runs_the_gateway_safely() {
    let ht = Fixture::new("chat").replicas(3).rabbitmq().trigger().build();
    let d = deployment(&ht, &inputs());
    let spec = d.spec.expect("spec");
    assert_eq!(spec.replicas, Some(3));
    let template = spec.template;
    let pod = template.spec.expect("pod");
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("high-templar-gateway:test"));
    assert_eq!(
        c.args.as_deref(),
        Some(&["serve".to_string(), "--config".into(), "/etc/high-templar/config.yaml".into()][..])
    );
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|g| g.path.clone())
    };
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/readyz"));
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/healthz"));
    let sc = c.security_context.as_ref().expect("security context");
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_string()]));
    assert_eq!(sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()), Some("RuntimeDefault"));
    let env = c.env.as_ref().expect("env");
    let secret_of = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.secret_key_ref.as_ref())
            .map(|s| (s.name.clone(), s.key.clone()))
    };
    assert_eq!(secret_of("HT_AMQP_URL"), Some(("rabbitmq".into(), "url".into())));
    assert_eq!(secret_of("HT_TRIGGER_TOKEN"), Some(("ht-trigger".into(), "token".into())));
    assert!(c.resources.as_ref().and_then(|r| r.requests.as_ref()).is_some(), "resource requests by default");
    let spread = pod.topology_spread_constraints.expect("spread");
    assert_eq!(spread[0].topology_key, "kubernetes.io/hostname");
    assert!(pod.termination_grace_period_seconds.expect("grace") >= 5 + 10);
    let annotations = template.metadata.expect("meta").annotations.expect("annotations");
    assert_eq!(annotations[SECRETS_HASH_ANNOTATION], "abc");
    assert_eq!(annotations[CONFIG_HASH_ANNOTATION].len(), 64);
}

#[test]
fn rollout_annotations_follow_config_and_secrets() {
    let annotations = |ht: &HighTemplar, secrets: &str| {
        let inputs = Inputs { secrets_hash: secrets.into(), ..inputs() };
        deployment(ht, &inputs).spec.expect("spec").template.metadata.expect("meta").annotations.expect("a")
    };
    let a = Fixture::new("chat").build();
    let b = Fixture::new("chat").with(|s| s.limits.max_connections = 7).build();
    assert_ne!(annotations(&a, "x")[CONFIG_HASH_ANNOTATION], annotations(&b, "x")[CONFIG_HASH_ANNOTATION]);
    assert_eq!(annotations(&a, "x")[CONFIG_HASH_ANNOTATION], annotations(&a, "y")[CONFIG_HASH_ANNOTATION]);
    assert_ne!(annotations(&a, "x")[SECRETS_HASH_ANNOTATION], annotations(&a, "y")[SECRETS_HASH_ANNOTATION]);
}

#[test]
fn pdb_only_when_more_than_one_replica_may_run() {
    assert!(pod_disruption_budget(&Fixture::new("a").replicas(1).build()).is_none());
    assert!(pod_disruption_budget(&Fixture::new("a").replicas(2).rabbitmq().build()).is_some());
    assert!(pod_disruption_budget(&Fixture::new("a").replicas(1).rabbitmq().autoscaling(1, 3).build()).is_some());
}

#[test]
fn hpa_owns_replicas_when_enabled() {
    let ht = Fixture::new("a").rabbitmq().autoscaling(2, 8).build();
    let hpa = horizontal_pod_autoscaler(&ht).expect("hpa");
    let spec = hpa.spec.expect("spec");
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 8));
    assert_eq!(spec.scale_target_ref.name, "a");
    assert_eq!(deployment(&ht, &inputs()).spec.expect("spec").replicas, None, "the HPA sets replicas");
    assert!(horizontal_pod_autoscaler(&Fixture::new("a").build()).is_none());
}

#[test]
fn the_operator_owns_replicas_when_scaling_on_connections() {
    let ht = Fixture::new("a").replicas(1).rabbitmq().connection_autoscaling(1, 4, 5000).build();
    assert!(horizontal_pod_autoscaler(&ht).is_none(), "no HPA: the operator scales");
    assert_eq!(deployment(&ht, &inputs()).spec.expect("spec").replicas, None, "replicas left to the autoscaler");
    assert!(pod_disruption_budget(&ht).is_some(), "up to 4 pods may run");
}

#[test]
fn service_and_endpoint() {
    let ht = Fixture::new("chat")
        .with(|s| {
            s.service.port = 8081;
            s.service.annotations.insert("lb".into(), "internal".into());
        })
        .build();
    let svc = service(&ht);
    let spec = svc.spec.expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.ports.expect("ports")[0].port, 8081);
    assert_eq!(spec.selector, Some(selector_labels(&ht)));
    assert_eq!(svc.metadata.annotations.expect("annotations")["lb"], "internal");
    assert_eq!(endpoint(&ht), "ws://chat.apps.svc:8081/ws/");
    assert_eq!(selector_string(&ht), "app.kubernetes.io/instance=chat,app.kubernetes.io/name=high-templar");
}

#[test]
fn spec_image_and_pod_settings_win() {
    let ht = Fixture::new("chat")
        .with(|s| {
            s.image = Some("registry.example/ht:1".into());
            s.node_selector.insert("pool".into(), "ws".into());
            s.pod_annotations.insert("team".into(), "rt".into());
        })
        .build();
    let d = deployment(&ht, &inputs());
    let template = d.spec.expect("spec").template;
    let pod = template.spec.expect("pod");
    assert_eq!(pod.containers[0].image.as_deref(), Some("registry.example/ht:1"));
    assert_eq!(pod.node_selector.expect("selector")["pool"], "ws");
    assert_eq!(template.metadata.expect("meta").annotations.expect("a")["team"], "rt");
}

#[test]
fn tls_secrets_are_mounted_and_the_config_names_their_files() {
    use crate::crd::{SecretRef, TlsSpec};
    let ht = Fixture::new("chat")
        .rabbitmq()
        .with(|s| {
            s.rabbitmq.as_mut().expect("rabbitmq").tls = Some(TlsSpec {
                ca_secret_ref: Some(SecretKeyRef { name: "mq-ca".into(), key: "ca.pem".into() }),
                client_cert_secret_ref: Some(SecretRef { name: "mq-client".into() }),
            });
            s.backend.url = "https://api.example.com/api/".into();
            s.backend.tls = Some(TlsSpec {
                ca_secret_ref: Some(SecretKeyRef { name: "api-ca".into(), key: "ca.crt".into() }),
                client_cert_secret_ref: None,
            });
        })
        .build();
    let mut config = parse_config(&ht);
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
    assert_eq!(path(&config.broker.amqp.tls.ca_file).as_deref(), Some("/etc/high-templar-tls/rabbitmq/ca.crt"));
    assert_eq!(path(&config.broker.amqp.tls.cert_file).as_deref(), Some("/etc/high-templar-tls/rabbitmq/tls.crt"));
    assert_eq!(path(&config.broker.amqp.tls.key_file).as_deref(), Some("/etc/high-templar-tls/rabbitmq/tls.key"));
    assert_eq!(path(&config.backend.tls.ca_file).as_deref(), Some("/etc/high-templar-tls/backend/ca.crt"));
    assert_eq!(config.backend.tls.cert_file, None);
    config.broker.amqp.url = Some(high_templar_gateway::config::Secret("amqps://u:p@mq:5671/%2f".into()));
    config.validate().expect("valid gateway config");

    let pod = deployment(&ht, &inputs()).spec.expect("spec").template.spec.expect("pod");
    let mounts = pod.containers[0].volume_mounts.clone().expect("mounts");
    let mount = mounts.iter().find(|m| m.name == "tls").expect("the tls volume is mounted");
    assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/etc/high-templar-tls", Some(true)));
    let volume = pod.volumes.expect("volumes").into_iter().find(|v| v.name == "tls").expect("tls volume");
    let projected: Vec<(String, String, String)> = volume
        .projected
        .expect("projected")
        .sources
        .expect("sources")
        .into_iter()
        .flat_map(|s| {
            let secret = s.secret.expect("a secret");
            let name = secret.name.clone();
            secret.items.expect("items").into_iter().map(move |i| (name.clone(), i.key, i.path))
        })
        .collect();
    let expected = [
        ("mq-ca", "ca.pem", "rabbitmq/ca.crt"),
        ("mq-client", "tls.crt", "rabbitmq/tls.crt"),
        ("mq-client", "tls.key", "rabbitmq/tls.key"),
        ("api-ca", "ca.crt", "backend/ca.crt"),
    ];
    let expected: Vec<(String, String, String)> =
        expected.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect();
    assert_eq!(projected, expected);
    // No TLS settings: no volume, nothing in the config.
    let plain = Fixture::new("chat").rabbitmq().build();
    let pod = deployment(&plain, &inputs()).spec.expect("spec").template.spec.expect("pod");
    assert!(pod.volumes.expect("volumes").iter().all(|v| v.name != "tls"));
    assert!(!config_map(&plain).data.expect("data")[CONFIG_KEY].contains("tls"));
}

#[test]
fn every_tls_secret_is_referenced_for_the_watch_and_the_hash() {
    use crate::crd::{SecretRef, TlsSpec};
    let ht = Fixture::new("chat")
        .rabbitmq()
        .trigger()
        .with(|s| {
            s.rabbitmq.as_mut().expect("rabbitmq").tls = Some(TlsSpec {
                ca_secret_ref: Some(SecretKeyRef { name: "mq-ca".into(), key: "ca.crt".into() }),
                client_cert_secret_ref: None,
            });
            s.backend.tls = Some(TlsSpec {
                ca_secret_ref: None,
                client_cert_secret_ref: Some(SecretRef { name: "api-client".into() }),
            });
        })
        .build();
    let refs: Vec<String> = crate::reconcile::secret_references(&ht)
        .into_iter()
        .map(|(what, role, r)| format!("{what}:{role}:{}/{}", r.name, r.key))
        .collect();
    assert_eq!(
        refs,
        [
            "amqp::rabbitmq/url",
            "rabbitmq-tls:ca:mq-ca/ca.crt",
            "trigger::ht-trigger/token",
            "backend-tls:cert:api-client/tls.crt",
            "backend-tls:key:api-client/tls.key"
        ]
    );
}
