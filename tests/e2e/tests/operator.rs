//! The operator against a real control plane (kube-apiserver + etcd +
//! kube-controller-manager, no kubelet) and a real RabbitMQ. `tests/run`
//! starts the control plane and sets `HT_TEST_KUBECONFIG`. Each test works
//! in a namespace of its own with its own in-process controller watching it.

use high_templar_e2e::{AMQP_URL, client, create_namespace, delete_namespace, eventually, install_crd};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use high_templar_operator::crd::{HighTemplar, HighTemplarStatus};
use high_templar_operator::desired::{CONFIG_HASH_ANNOTATION, CONFIG_KEY, SECRETS_HASH_ANNOTATION};
use high_templar_operator::metrics::Metrics;
use high_templar_operator::reconcile::{FINALIZER, Settings};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// One test's namespace, with the CRD installed and a controller running.
struct Env {
    client: Client,
    ns: String,
    stop: Option<oneshot::Sender<()>>,
    controller: Option<tokio::task::JoinHandle<()>>,
    /// The controller's metrics (reconciliations run).
    metrics: Arc<Metrics>,
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Env {
    async fn new(test: &str) -> Env {
        let client = client().await;
        install_crd(&client).await;
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = format!("{test}-{}-{n}", std::process::id());
        create_namespace(&client, &ns).await;
        let mut env = Env { client, ns, stop: None, controller: None, metrics: Arc::new(Metrics::new()) };
        env.start_controller();
        env
    }

    fn start_controller(&mut self) {
        let (stop, stopped) = oneshot::channel::<()>();
        let settings = Settings {
            gateway_image: "high-templar-gateway:test".into(),
            fleet_period: std::time::Duration::from_secs(1),
        };
        self.controller = Some(tokio::spawn(high_templar_operator::controller::run(
            self.client.clone(),
            Some(self.ns.clone()),
            settings,
            self.metrics.clone(),
            async move {
                let _ = stopped.await;
            },
        )));
        self.stop = Some(stop);
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn secret(&self, name: &str, key: &str, value: &str) {
        let secret = Secret {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
            data: Some(BTreeMap::from([(key.to_string(), ByteString(value.as_bytes().to_vec()))])),
            ..Default::default()
        };
        self.api::<Secret>()
            .patch(name, &PatchParams::apply("high-templar-tests").force(), &Patch::Apply(&secret))
            .await
            .expect("apply secret");
    }

    /// Applies a HighTemplar from JSON (the way `kubectl apply` would).
    async fn apply(&self, name: &str, spec: Value) -> Result<HighTemplar, kube::Error> {
        let obj = json!({
            "apiVersion": "hightemplar.io/v1alpha1",
            "kind": "HighTemplar",
            "metadata": {"name": name},
            "spec": spec,
        });
        self.api::<HighTemplar>()
            .patch(name, &PatchParams::apply("high-templar-tests").force(), &Patch::Apply(&obj))
            .await
    }

    async fn status_where(&self, name: &str, what: &str, f: impl Fn(&HighTemplarStatus) -> bool) -> HighTemplarStatus {
        let api = self.api::<HighTemplar>();
        eventually(what, || async {
            let ht = api.get(name).await.ok()?;
            let status = ht.status?;
            f(&status).then_some(status)
        })
        .await
    }

    async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(c) = self.controller.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
        }
        delete_namespace(&self.client, &self.ns).await;
    }
}

fn condition<'a>(s: &'a HighTemplarStatus, t: &str) -> (&'a str, &'a str) {
    let c = s.conditions.iter().find(|c| c.type_ == t).unwrap_or_else(|| panic!("no {t} condition in {s:?}"));
    (c.status.as_str(), c.reason.as_str())
}

fn unique_exchange(test: &str) -> String {
    format!("ht-op-{test}-{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

async fn exchange_exists(exchange: &str) -> bool {
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (tests/run starts it)");
    let channel = conn.create_channel().await.expect("channel");
    let passive = lapin::options::ExchangeDeclareOptions { passive: true, ..Default::default() };
    let exists = channel
        .exchange_declare(exchange.into(), lapin::ExchangeKind::Direct, passive, lapin::types::FieldTable::default())
        .await
        .is_ok();
    let _ = conn.close(200, "done".into()).await;
    exists
}

fn spec(exchange: &str, policy: &str) -> Value {
    json!({
        "replicas": 2,
        "backend": {"url": "http://api.example.svc:8000/api/"},
        "rabbitmq": {"urlSecretRef": {"name": "rabbitmq", "key": "url"}, "exchange": exchange, "deletionPolicy": policy},
        "trigger": {"tokenSecretRef": {"name": "ht-trigger", "key": "token"}},
    })
}

fn pod_annotation(d: &Deployment, key: &str) -> String {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(key))
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn reconciles_objects_status_and_rollouts() {
    let env = Env::new("reconcile").await;
    let exchange = unique_exchange("reconcile");
    env.secret("rabbitmq", "url", AMQP_URL).await;
    env.secret("ht-trigger", "token", "first-token").await;
    let ht = env.apply("chat", spec(&exchange, "Retain")).await.expect("valid HighTemplar");
    assert_eq!(ht.spec.backend.bootstrap_path, "bootstrap/", "the apiserver applied the schema defaults");

    let deployments = env.api::<Deployment>();
    let d = eventually("Deployment", || async { deployments.get_opt("chat").await.ok().flatten() }).await;
    let owner = &d.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("HighTemplar", "chat", Some(true)));
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let cm = env.api::<ConfigMap>().get("chat").await.expect("ConfigMap");
    let config_yaml = cm.data.as_ref().expect("data")[CONFIG_KEY].clone();
    let config = high_templar_gateway::config::Config::from_yaml(&config_yaml).expect("a gateway config");
    assert_eq!(config.broker.amqp.exchange, exchange);
    let svc = env.api::<Service>().get("chat").await.expect("Service");
    assert_eq!(svc.spec.as_ref().and_then(|s| s.ports.as_ref()).expect("ports")[0].port, 80);
    env.api::<PodDisruptionBudget>().get("chat").await.expect("PDB for 2 replicas");

    let status = env
        .status_where("chat", "BrokerReady condition", |s| s.conditions.iter().any(|c| c.type_ == "BrokerReady"))
        .await;
    assert_eq!(condition(&status, "BrokerReady"), ("True", "ExchangeDeclared"));
    // No kubelet: pods never run, so the gateway is not available.
    assert_eq!(condition(&status, "Available").0, "False");
    assert_eq!(condition(&status, "Ready").0, "False");
    assert_eq!(condition(&status, "Degraded"), ("False", "ReconcileSucceeded"));
    assert_eq!(status.endpoint.as_deref(), Some(format!("ws://chat.{}.svc:80/ws/", env.ns).as_str()));
    assert_eq!(status.observed_generation, Some(1));
    assert!(exchange_exists(&exchange).await, "the operator declared the exchange");

    // A spec change rewrites the config and rolls the pods.
    let config_hash = pod_annotation(&d, CONFIG_HASH_ANNOTATION);
    let mut changed = spec(&exchange, "Retain");
    changed["limits"] = json!({"maxConnections": 777});
    env.apply("chat", changed).await.expect("apply change");
    let d2 = eventually("config hash changes", || async {
        let d = deployments.get("chat").await.ok()?;
        (pod_annotation(&d, CONFIG_HASH_ANNOTATION) != config_hash).then_some(d)
    })
    .await;
    let cm = env.api::<ConfigMap>().get("chat").await.expect("ConfigMap");
    assert!(cm.data.expect("data")[CONFIG_KEY].contains("maxConnections: 777"));

    // A rotated Secret rolls the pods too.
    let secrets_hash = pod_annotation(&d2, SECRETS_HASH_ANNOTATION);
    env.secret("ht-trigger", "token", "rotated-token").await;
    eventually("secrets hash changes", || async {
        let d = deployments.get("chat").await.ok()?;
        (pod_annotation(&d, SECRETS_HASH_ANNOTATION) != secrets_hash).then_some(())
    })
    .await;

    // An owned object deleted by hand comes back.
    let services = env.api::<Service>();
    let uid = svc.uid();
    services.delete("chat", &DeleteParams::default()).await.expect("delete Service");
    eventually("Service recreated", || async {
        let s = services.get_opt("chat").await.ok().flatten()?;
        (s.uid() != uid).then_some(())
    })
    .await;

    // kubectl scale goes through the scale subresource.
    let hts = env.api::<HighTemplar>();
    hts.patch_scale("chat", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}})))
        .await
        .expect("scale subresource");
    eventually("Deployment scaled", || async {
        let d = deployments.get("chat").await.ok()?;
        (d.spec?.replicas == Some(3)).then_some(())
    })
    .await;
    let scale = hts.get_scale("chat").await.expect("get scale");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(3));

    // Events tell what happened.
    let events = env.api::<Event>().list(&ListParams::default()).await.expect("events");
    assert!(
        events.items.iter().any(|e| e.reason.as_deref() == Some("Created")),
        "a Created event: {:?}",
        events.items.iter().map(|e| e.reason.clone()).collect::<Vec<_>>()
    );
    env.finish().await;
}

fn deployment_replicas(d: &Deployment) -> Option<i32> {
    d.spec.as_ref().and_then(|s| s.replicas)
}

/// Field managers that own the Deployment's `spec.replicas`.
fn replicas_owners(d: &Deployment) -> Vec<String> {
    d.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.fields_v1.as_ref().is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some()))
        .filter_map(|m| m.manager.clone())
        .collect()
}

/// Turning connection autoscaling on hands the Deployment's replicas from
/// the reconciler to the autoscaler without a dip (a field nobody owns
/// would fall back to 1 pod); the autoscaler keeps them within the bounds,
/// scales nothing down while pods are not read (no kubelet here: pods stay
/// Pending), says so in the status and Events; turning it off gives the
/// replicas back to `spec.replicas`; turning the CPU HPA on hands them over
/// without a dip as well (before, they fell to 1 pod, then to the HPA's
/// minimum). Real pods and connections: the node tier.
#[tokio::test]
async fn connection_autoscaling_takes_over_the_replicas_and_keeps_the_bounds() {
    let env = Env::new("autoscale").await;
    let exchange = unique_exchange("autoscale");
    env.secret("rabbitmq", "url", AMQP_URL).await;
    env.secret("ht-trigger", "token", "token").await;
    let mut fixed = spec(&exchange, "Retain");
    fixed["replicas"] = json!(3);
    env.apply("chat", fixed.clone()).await.expect("apply");
    let deployments = env.api::<Deployment>();
    eventually("Deployment with 3 replicas", || async {
        (deployment_replicas(&deployments.get("chat").await.ok()?) == Some(3)).then_some(())
    })
    .await;

    let mut scaled = fixed.clone();
    scaled["autoscaling"] =
        json!({"targetConnectionsPerPod": 100, "minReplicas": 2, "maxReplicas": 5, "scaleDownStabilizationSeconds": 0});
    env.apply("chat", scaled.clone()).await.expect("autoscaling on");
    // 0 connections call for 2 pods, but the 3 pods were never read
    // (Pending): no scale-down, for several fleet periods (1 s here).
    env.status_where("chat", "generation 2 and a recommendation", |s| {
        s.observed_generation == Some(2) && s.recommended_replicas == Some(2)
    })
    .await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let d = deployments.get("chat").await.expect("Deployment");
        assert_eq!(deployment_replicas(&d), Some(3), "the replicas changed while handed over or on unread pods");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = deployments.get("chat").await.expect("Deployment");
    assert_eq!(replicas_owners(&d), ["high-templar-operator-autoscaler"], "{:?}", d.metadata.managed_fields);

    // Raising the minimum above the current count scales up at once.
    scaled["autoscaling"]["minReplicas"] = json!(4);
    env.apply("chat", scaled).await.expect("minReplicas 4");
    eventually("scaled to the new minimum", || async {
        (deployment_replicas(&deployments.get("chat").await.ok()?) == Some(4)).then_some(())
    })
    .await;
    let status = env.status_where("chat", "a scale time", |s| s.last_scale_time.is_some()).await;
    assert_eq!(status.recommended_replicas, Some(4));
    let events = env.api::<Event>();
    let event = eventually("a ScaledUp event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|e| e.reason.as_deref() == Some("ScaledUp"))
    })
    .await;
    let note = event.message.unwrap_or_default();
    assert!(note.contains("3 → 4 replicas") && note.contains("outside [4, 5]"), "{note}");
    assert!(env.metrics.encode().contains("hightemplar_operator_scale_events_total{direction=\"up\"} 1"));

    // Off again: spec.replicas rules.
    env.apply("chat", fixed.clone()).await.expect("autoscaling off");
    eventually("spec.replicas again", || async {
        (deployment_replicas(&deployments.get("chat").await.ok()?) == Some(3)).then_some(())
    })
    .await;
    env.status_where("chat", "no recommendation", |s| s.recommended_replicas.is_none()).await;

    // The CPU HPA takes over without a dip too (with no metrics server
    // here it leaves a count within its bounds alone).
    let mut cpu = fixed.clone();
    cpu["autoscaling"] = json!({"enabled": true, "minReplicas": 2, "maxReplicas": 5});
    env.apply("chat", cpu).await.expect("CPU HPA on");
    env.status_where("chat", "generation 5", |s| s.observed_generation == Some(5)).await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let d = deployments.get("chat").await.expect("Deployment");
        assert_eq!(deployment_replicas(&d), Some(3), "the replicas changed when the HPA took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.finish().await;
}

/// Status-only changes (the operator's own status patches, the fleet
/// figures written every fleet period) do not re-run the reconciler, which
/// would re-apply every object and re-declare the exchange each time; a
/// spec change does.
#[tokio::test]
async fn status_only_changes_do_not_reconcile() {
    let env = Env::new("status-only").await;
    env.apply("solo", json!({"replicas": 1, "backend": {"url": "http://api.example:8000/api/"}})).await.expect("apply");
    env.status_where("solo", "observed generation 1", |s| s.observed_generation == Some(1)).await;
    // Settled: no reconciliation for 2 s (the Deployment's own status
    // changes, from kube-controller-manager, trigger some at first).
    let settled = eventually("reconciliations settle", || async {
        let before = env.metrics.reconciliations.get();
        tokio::time::sleep(Duration::from_secs(2)).await;
        (env.metrics.reconciliations.get() == before).then_some(before)
    })
    .await;
    let hts = env.api::<HighTemplar>();
    for n in 0..5 {
        let patch =
            json!({"apiVersion": "hightemplar.io/v1alpha1", "kind": "HighTemplar", "status": {"connections": n}});
        hts.patch_status("solo", &PatchParams::apply("high-templar-tests-fleet").force(), &Patch::Apply(&patch))
            .await
            .expect("status patch");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.metrics.reconciliations.get(), settled, "status-only patches re-ran the reconciler");
    env.apply(
        "solo",
        json!({"replicas": 1, "backend": {"url": "http://api.example:8000/api/"}, "limits": {"maxConnections": 500}}),
    )
    .await
    .expect("spec change");
    env.status_where("solo", "observed generation 2", |s| s.observed_generation == Some(2)).await;
    assert!(env.metrics.reconciliations.get() > settled);
    env.finish().await;
}

#[tokio::test]
async fn invalid_resources_are_rejected_by_the_apiserver() {
    let env = Env::new("invalid").await;
    let cases = [
        (json!({"replicas": 2, "backend": {"url": "http://api/"}}), "spec.rabbitmq is required"),
        (
            json!({"replicas": 1, "backend": {"url": "http://api/"}, "autoscaling": {"enabled": true, "minReplicas": 5, "maxReplicas": 2},
                   "rabbitmq": {"urlSecretRef": {"name": "r", "key": "u"}}}),
            "minReplicas must not exceed",
        ),
        (json!({"replicas": 1, "backend": {"url": "ftp://api/"}}), "backend.url must be an http:// or https:// URL"),
        (
            json!({"replicas": 1, "backend": {"url": "http://api/", "tls": {"caSecretRef": {"name": "ca", "key": "ca.crt"}}}}),
            "backend.tls needs an https:// backend.url",
        ),
        (json!({"replicas": 1}), "backend"),
        (
            json!({"replicas": 5000, "backend": {"url": "http://api/"}, "rabbitmq": {"urlSecretRef": {"name": "r", "key": "u"}}}),
            "replicas",
        ),
        (
            json!({"replicas": 1, "backend": {"url": "http://api/"}, "autoscaling": {"enabled": true, "targetConnectionsPerPod": 100},
                   "rabbitmq": {"urlSecretRef": {"name": "r", "key": "u"}}}),
            "exclude each other",
        ),
        (
            json!({"replicas": 1, "backend": {"url": "http://api/"}, "autoscaling": {"targetConnectionsPerPod": 100}}),
            "spec.rabbitmq is required",
        ),
        (
            json!({"replicas": 1, "backend": {"url": "http://api/"}, "autoscaling": {"targetConnectionsPerPod": 0},
                   "rabbitmq": {"urlSecretRef": {"name": "r", "key": "u"}}}),
            "targetConnectionsPerPod",
        ),
        (
            json!({"replicas": 1, "backend": {"url": "http://api/"}, "autoscaling": {"targetConnectionsPerPod": 9, "maxStep": 0},
                   "rabbitmq": {"urlSecretRef": {"name": "r", "key": "u"}}}),
            "maxStep",
        ),
        (
            json!({"replicas": 1, "backend": {"url": "http://api/", "forward": [{"header": "X-A", "from": [{"cookie": "a", "query": "b"}]}]}}),
            "set exactly one of",
        ),
        (
            json!({"replicas": 1, "backend": {"url": "http://api/", "forward": [{"header": "Host", "from": [{"value": "x"}]}]}}),
            "the Host header is never forwarded",
        ),
        (
            json!({"replicas": 1, "backend": {"url": "http://api/"}, "security": {"allowedOrigins": ["https://a.*.com"]}}),
            "allowedOrigins entries are scheme://host[:port]",
        ),
        (
            json!({"replicas": 1, "backend": {"url": "http://api/"}, "security": {"allowedOrigins": ["example.com"]}}),
            "allowedOrigins entries are scheme://host[:port]",
        ),
        (
            json!({"replicas": 1, "backend": {"url": "http://api/"}, "security": {"trustedProxies": ["10.0.0.0/33"]}}),
            "trustedProxies entries are CIDRs",
        ),
        (
            json!({"replicas": 1, "backend": {"url": "http://api/"}, "permissions": {"userPath": "user..id"}}),
            "userPath is object keys joined by '.'",
        ),
        (
            json!({"replicas": 1, "backend": {"url": "http://api/"}, "permissions": {"refreshSeconds": 5}}),
            "refreshSeconds is 0 (off) or at least 10",
        ),
    ];
    for (i, (spec, message)) in cases.into_iter().enumerate() {
        match env.apply(&format!("bad{i}"), spec.clone()).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "case {i}: {status:?}");
                assert!(status.message.contains(message), "case {i}: {:?} lacks {message:?}", status.message);
            }
            other => panic!("case {i} ({spec}) was not rejected: {other:?}"),
        }
    }
    env.finish().await;
}

#[tokio::test]
async fn broker_and_secret_failures_become_conditions_and_recover() {
    let env = Env::new("failures").await;
    let exchange = unique_exchange("failures");
    // No Secrets yet: Degraded, but the objects are still applied.
    env.apply("chat", spec(&exchange, "Retain")).await.expect("valid");
    let status = env
        .status_where("chat", "Degraded", |s| s.conditions.iter().any(|c| c.type_ == "Degraded" && c.status == "True"))
        .await;
    assert_eq!(condition(&status, "Degraded").1, "SecretMissing");
    assert_eq!(condition(&status, "Ready"), ("False", "SecretMissing"));
    env.api::<Deployment>().get("chat").await.expect("the Deployment exists despite the missing Secret");

    // Wrong credentials: BrokerReady False, AccessRefused; the password never shows.
    env.secret("rabbitmq", "url", "amqp://guest:wrong-hunter2@127.0.0.1:5672/%2f").await;
    env.secret("ht-trigger", "token", "t").await;
    let status = env
        .status_where("chat", "BrokerReady AccessRefused", |s| {
            s.conditions.iter().any(|c| c.type_ == "BrokerReady" && c.reason == "AccessRefused")
        })
        .await;
    let broker = status.conditions.iter().find(|c| c.type_ == "BrokerReady").expect("condition");
    assert_eq!(broker.status, "False");
    assert!(!broker.message.contains("hunter2"), "{}", broker.message);
    assert_eq!(condition(&status, "Degraded").0, "False");

    // Unreachable broker.
    env.secret("rabbitmq", "url", "amqp://guest:guest@127.0.0.1:1/%2f").await;
    env.status_where("chat", "BrokerReady Unreachable", |s| {
        s.conditions.iter().any(|c| c.type_ == "BrokerReady" && c.reason == "Unreachable")
    })
    .await;

    // Fixed Secret: the watch on Secrets re-reconciles.
    env.secret("rabbitmq", "url", AMQP_URL).await;
    env.status_where("chat", "BrokerReady True", |s| {
        s.conditions.iter().any(|c| c.type_ == "BrokerReady" && c.status == "True")
    })
    .await;
    let warnings = env.api::<Event>().list(&ListParams::default()).await.expect("events");
    assert!(warnings.items.iter().any(|e| e.type_.as_deref() == Some("Warning")), "failures produce Warning events");
    env.finish().await;
}

#[tokio::test]
async fn deletion_policies() {
    let env = Env::new("deletion").await;
    env.secret("rabbitmq", "url", AMQP_URL).await;
    env.secret("ht-trigger", "token", "t").await;
    let hts = env.api::<HighTemplar>();

    let deleted = unique_exchange("delete");
    env.apply("gone", spec(&deleted, "Delete")).await.expect("valid");
    let retained = unique_exchange("retain");
    env.apply("kept", spec(&retained, "Retain")).await.expect("valid");
    for name in ["gone", "kept"] {
        env.status_where(name, "exchange declared", |s| {
            s.conditions.iter().any(|c| c.type_ == "BrokerReady" && c.status == "True")
        })
        .await;
    }
    assert!(hts.get("gone").await.expect("ht").finalizers().iter().any(|f| f == FINALIZER));
    assert!(hts.get("kept").await.expect("ht").finalizers().is_empty(), "Retain needs no finalizer");
    assert!(exchange_exists(&deleted).await && exchange_exists(&retained).await);

    hts.delete("gone", &DeleteParams::default()).await.expect("delete");
    hts.delete("kept", &DeleteParams::default()).await.expect("delete");
    for name in ["gone", "kept"] {
        eventually("HighTemplar gone", || async { hts.get_opt(name).await.ok()?.is_none().then_some(()) }).await;
    }
    assert!(!exchange_exists(&deleted).await, "Delete removed the exchange");
    assert!(exchange_exists(&retained).await, "Retain left the exchange");
    // Clean up what Retain left.
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()).await.expect("amqp");
    let channel = conn.create_channel().await.expect("channel");
    let _ = channel.exchange_delete(retained.as_str().into(), Default::default()).await;
    env.finish().await;
}

/// An exchange declared by high-templar 3.x (non-durable) and a resource
/// asking for a durable one: BrokerReady says exactly that.
#[tokio::test]
async fn exchange_with_other_arguments_is_a_precondition_failure() {
    let env = Env::new("precondition").await;
    let exchange = unique_exchange("precondition");
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()).await.expect("amqp");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("declare the 3.x way");
    env.secret("rabbitmq", "url", AMQP_URL).await;
    env.secret("ht-trigger", "token", "t").await;
    env.apply("chat", spec(&exchange, "Retain")).await.expect("valid");
    let status = env
        .status_where("chat", "BrokerReady PreconditionFailed", |s| {
            s.conditions.iter().any(|c| c.type_ == "BrokerReady" && c.reason == "PreconditionFailed")
        })
        .await;
    let broker = status.conditions.iter().find(|c| c.type_ == "BrokerReady").expect("condition");
    assert_eq!(broker.status, "False");
    assert!(broker.message.contains("durable"), "the message says what to change: {}", broker.message);
    let mut fixed = spec(&exchange, "Retain");
    fixed["rabbitmq"]["durable"] = json!(false);
    env.apply("chat", fixed).await.expect("valid");
    env.status_where("chat", "BrokerReady True once durable matches", |s| {
        s.conditions.iter().any(|c| c.type_ == "BrokerReady" && c.status == "True")
    })
    .await;
    let _ = channel.exchange_delete(exchange.as_str().into(), Default::default()).await;
    env.finish().await;
}

/// The CA and client certificate of the test RabbitMQ's TLS listener
/// (tests/rabbitmq.sh: 127.0.0.1:5671, certificate for `localhost` only).
fn rabbitmq_tls(file: &str) -> String {
    let dir = std::env::var("HT_RABBITMQ_TLS_DIR").unwrap_or_else(|_| "/var/lib/rabbitmq/ht-test-tls".into());
    let path = format!("{dir}/{file}");
    let listening = std::net::TcpStream::connect(("127.0.0.1", 5671)).is_ok();
    match std::fs::read_to_string(&path) {
        Ok(text) if listening => text,
        _ => panic!(
            "this test needs the RabbitMQ TLS listener on 127.0.0.1:5671 (listening: {listening}) and {path}: run \
             tests/rabbitmq.sh (as root), which makes them"
        ),
    }
}

fn broker_condition(s: &HighTemplarStatus) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.conditions.iter().find(|c| c.type_ == "BrokerReady")
}

#[tokio::test]
async fn amqps_with_ca_and_client_certificate_secrets_and_tls_failures_as_conditions() {
    let env = Env::new("tls").await;
    let exchange = unique_exchange("tls");
    env.secret("rabbitmq", "url", "amqps://guest:guest@localhost:5671/%2f").await;
    env.secret("mq-ca", "ca.crt", &rabbitmq_tls("ca.pem")).await;
    let client_cert = Secret {
        metadata: kube::api::ObjectMeta { name: Some("mq-client".into()), ..Default::default() },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_string(), ByteString(rabbitmq_tls("client.pem").into_bytes())),
            ("tls.key".to_string(), ByteString(rabbitmq_tls("client.key").into_bytes())),
        ])),
        ..Default::default()
    };
    env.api::<Secret>()
        .patch("mq-client", &PatchParams::apply("high-templar-tests").force(), &Patch::Apply(&client_cert))
        .await
        .expect("apply the client certificate Secret");
    env.secret("ht-trigger", "token", "t").await;
    let mut spec = spec(&exchange, "Retain");
    spec["rabbitmq"]["tls"] =
        json!({"caSecretRef": {"name": "mq-ca", "key": "ca.crt"}, "clientCertSecretRef": {"name": "mq-client"}});
    env.apply("chat", spec.clone()).await.expect("valid");
    let status = env
        .status_where("chat", "BrokerReady True over amqps", |s| {
            broker_condition(s).is_some_and(|c| c.status == "True")
        })
        .await;
    assert_eq!(condition(&status, "BrokerReady"), ("True", "ExchangeDeclared"));
    assert!(exchange_exists(&exchange).await, "declared over TLS, visible on the plain port");

    // The gateway pods get the Secrets as files, and the config names them.
    let config = env.api::<ConfigMap>().get("chat").await.expect("ConfigMap");
    let yaml = &config.data.expect("data")[CONFIG_KEY];
    for file in ["rabbitmq/ca.crt", "rabbitmq/tls.crt", "rabbitmq/tls.key"] {
        assert!(yaml.contains(&format!("/etc/high-templar-tls/{file}")), "{file} in {yaml}");
    }
    let deployment = env.api::<Deployment>().get("chat").await.expect("Deployment");
    let pod = deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec");
    let volume = pod.volumes.as_ref().and_then(|v| v.iter().find(|v| v.name == "tls")).expect("tls volume");
    let sources = volume.projected.as_ref().and_then(|p| p.sources.as_ref()).expect("projected Secrets");
    let names: Vec<&str> = sources.iter().filter_map(|s| s.secret.as_ref()).map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["mq-ca", "mq-client", "mq-client"]);
    let hash = pod_annotation(&deployment, SECRETS_HASH_ANNOTATION);

    // A CA that did not sign the broker's certificate: the Secret watch
    // re-reconciles, BrokerReady False with the TLS reason, and the pods roll.
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let wrong_ca = params.self_signed(&key).expect("a CA").pem();
    env.secret("mq-ca", "ca.crt", &wrong_ca).await;
    let status = env
        .status_where("chat", "BrokerReady TLSError (unknown CA)", |s| {
            broker_condition(s).is_some_and(|c| c.reason == "TLSError" && c.message.contains("unknown issuer"))
        })
        .await;
    let broker = broker_condition(&status).expect("condition");
    assert_eq!(broker.status, "False");
    assert!(!broker.message.contains("guest:guest"), "{}", broker.message);
    let rolled = env.api::<Deployment>().get("chat").await.expect("Deployment");
    assert_ne!(pod_annotation(&rolled, SECRETS_HASH_ANNOTATION), hash, "a CA change rolls the pods");

    // The right CA, but the URL's host is not the certificate's name.
    env.secret("mq-ca", "ca.crt", &rabbitmq_tls("ca.pem")).await;
    env.secret("rabbitmq", "url", "amqps://guest:guest@127.0.0.1:5671/%2f").await;
    let status = env
        .status_where("chat", "BrokerReady TLSError (hostname mismatch)", |s| {
            broker_condition(s).is_some_and(|c| c.reason == "TLSError" && c.message.contains("hostname mismatch"))
        })
        .await;
    assert_eq!(condition(&status, "BrokerReady").0, "False");

    // TLS settings with an amqp:// URL: said so, not attempted.
    env.secret("rabbitmq", "url", AMQP_URL).await;
    env.status_where("chat", "BrokerReady InvalidURL", |s| {
        broker_condition(s).is_some_and(|c| c.reason == "InvalidURL" && c.message.contains("amqps://"))
    })
    .await;
    env.finish().await;
}
