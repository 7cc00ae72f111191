//! The Helm chart: lint and template with every optional feature, the
//! values schema, `helm install` into the real control plane, and RBAC
//! sufficiency: the operator, running with nothing but the chart's
//! ServiceAccount token, reconciles a HighTemplar end to end.

use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};

use high_templar_e2e::{
    AMQP_URL, Namespaced, client, eventually, free_port, helm, http_status, install_crd, kubeconfig_path, monitoring,
    repo_root, workspace_binary,
};
use high_templar_operator::crd::HighTemplar;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn chart() -> String {
    repo_root().join("charts/high-templar").display().to_string()
}

fn run_helm(args: &[&str]) -> Output {
    Command::new(helm()).args(args).env("KUBECONFIG", kubeconfig_path_or_none()).output().expect("run helm")
}

fn kubeconfig_path_or_none() -> String {
    std::env::var("HT_TEST_KUBECONFIG").unwrap_or_else(|_| "/nonexistent".into())
}

/// `helm template` with `sets`; the rendered documents by kind.
fn template(sets: &[&str]) -> BTreeMap<String, Vec<serde_yaml::Value>> {
    let chart = chart();
    let mut args = vec!["template", "t", &chart];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    let out = run_helm(&args);
    assert!(out.status.success(), "helm template {sets:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut by_kind: BTreeMap<String, Vec<serde_yaml::Value>> = BTreeMap::new();
    for doc in serde_yaml::Deserializer::from_slice(&out.stdout) {
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).expect("rendered YAML");
        if let Some(kind) = value.get("kind").and_then(|k| k.as_str()) {
            by_kind.entry(kind.to_string()).or_default().push(value.clone());
        }
    }
    by_kind
}

fn operator_args(rendered: &BTreeMap<String, Vec<serde_yaml::Value>>) -> Vec<String> {
    let d = &rendered["Deployment"][0];
    d["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_string())
        .collect()
}

#[test]
fn chart_crd_is_the_generated_crd() {
    let path = repo_root().join("charts/high-templar/crds/hightemplar.io_hightemplars.yaml");
    let in_chart = std::fs::read_to_string(&path).expect("chart CRD");
    assert!(
        in_chart == high_templar_operator::crd_yaml(),
        "{} is stale: cp crds/hightemplar.io_hightemplars.yaml charts/high-templar/crds/",
        path.display()
    );
}

#[test]
fn lint_and_template_with_every_feature() {
    let out = run_helm(&["lint", "--strict", &chart()]);
    assert!(
        out.status.success(),
        "helm lint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let default = template(&[]);
    for kind in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Deployment", "Service"]
    {
        assert!(default.contains_key(kind), "default render lacks {kind}: {:?}", default.keys());
    }
    assert!(
        ["ServiceMonitor", "HighTemplar", "PodMonitor", "PrometheusRule", "ConfigMap"]
            .iter()
            .all(|k| !default.contains_key(*k)),
        "optional features are off"
    );
    let args = operator_args(&default);
    assert!(args.contains(&"--leader-election=false".to_string()), "{args:?}");
    assert!(args.contains(&"--gateway-image=high-templar-gateway:0.1.0".to_string()), "{args:?}");
    let sc = &default["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], serde_yaml::Value::Bool(true));
    assert_eq!(sc["allowPrivilegeEscalation"], serde_yaml::Value::Bool(false));
    let pod_sc = &default["Deployment"][0]["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(pod_sc["runAsNonRoot"], serde_yaml::Value::Bool(true));
    assert_eq!(pod_sc["seccompProfile"]["type"].as_str(), Some("RuntimeDefault"));

    let ha = template(&["replicaCount=2"]);
    assert!(operator_args(&ha).contains(&"--leader-election=true".to_string()));

    let namespaced = template(&["watchNamespace=apps"]);
    assert!(!namespaced.contains_key("ClusterRole"), "single-namespace mode needs no ClusterRole");
    assert!(namespaced["Role"].iter().any(|r| r["metadata"]["namespace"].as_str() == Some("apps")));
    assert!(operator_args(&namespaced).contains(&"--namespace=apps".to_string()));

    assert_eq!(template(&["metrics.serviceMonitor.enabled=true"])["ServiceMonitor"].len(), 1);
    let example = template(&["example.enabled=true"]);
    assert_eq!(example["HighTemplar"][0]["spec"]["replicas"].as_i64(), Some(1));

    let no_rbac = template(&["rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=existing"]);
    assert!(!no_rbac.contains_key("ClusterRole") && !no_rbac.contains_key("ServiceAccount"));
    assert_eq!(no_rbac["Deployment"][0]["spec"]["template"]["spec"]["serviceAccountName"].as_str(), Some("existing"));
}

#[test]
fn values_schema_rejects_bad_values() {
    for bad in [
        "replicaCount=-1",
        "image.pullPolicy=Sometimes",
        "watchNamespace=Not_A_Namespace",
        "unknownKey=1",
        "monitoring.prometheusRule.saturatedFraction=2",
        "monitoring.prometheusRule.saturatedFor=soon",
        "monitoring.podMonitor.unknown=1",
    ] {
        let out = run_helm(&["template", "t", &chart(), "--set", bad]);
        assert!(!out.status.success(), "helm accepted --set {bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("schema"), "--set {bad}: {err}");
    }
}

#[test]
fn monitoring_flags_render_the_pod_monitor_rules_and_dashboard() {
    let all = [
        "monitoring.podMonitor.enabled=true",
        "monitoring.prometheusRule.enabled=true",
        "monitoring.dashboard.enabled=true",
    ];
    let rendered = template(&all);
    // The PodMonitor selects the pods the operator makes, on the port
    // their /metrics is served on.
    let pm = &rendered["PodMonitor"][0]["spec"];
    let ht =
        HighTemplar::new("chat", serde_json::from_value(json!({"backend": {"url": "http://api/"}})).expect("spec"));
    let pod_labels = high_templar_operator::desired::labels(&ht);
    for (k, v) in pm["selector"]["matchLabels"].as_mapping().expect("matchLabels") {
        let (k, v) = (k.as_str().expect("key"), v.as_str().expect("value"));
        assert_eq!(pod_labels.get(k).map(String::as_str), Some(v), "gateway pods lack {k}={v}: {pod_labels:?}");
    }
    assert_eq!(pm["podMetricsEndpoints"][0]["port"].as_str(), Some("http"));
    assert_eq!(pm["namespaceSelector"]["any"].as_bool(), Some(true));
    let scoped = template(&["monitoring.podMonitor.enabled=true", "watchNamespace=apps"]);
    assert_eq!(scoped["PodMonitor"][0]["spec"]["namespaceSelector"]["matchNames"][0].as_str(), Some("apps"));
    // The dashboard ConfigMap holds the dashboard file, for Grafana's sidecar.
    let cm = &rendered["ConfigMap"][0];
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"].as_str(), Some("1"));
    let held: serde_json::Value =
        serde_json::from_str(cm["data"]["high-templar.json"].as_str().expect("dashboard data")).expect("JSON");
    let file = std::fs::read_to_string(repo_root().join("charts/high-templar/dashboards/high-templar.json"))
        .expect("dashboard file");
    assert_eq!(held, serde_json::from_str::<serde_json::Value>(&file).expect("JSON"));
    assert_eq!(rendered["PrometheusRule"].len(), 1);
}

/// The rendered alerting rules pass `promtool check rules`, and the unit
/// tests of tests/monitoring/alerts.test.yaml (each alert firing, and not
/// firing for its healthy neighbour) pass `promtool test rules`; every
/// alert has a test there.
#[test]
fn alerting_rules_pass_promtool_and_every_alert_is_unit_tested() {
    let rules = monitoring::rendered_rules("ht-system");
    let dir = std::env::temp_dir().join(format!("ht-promtool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("rules.yaml"), &rules).expect("write rules");
    let tests = std::fs::read_to_string(repo_root().join("tests/monitoring/alerts.test.yaml")).expect("alert tests");
    std::fs::write(dir.join("alerts.test.yaml"), &tests).expect("write tests");
    let promtool = |args: &[&str]| {
        let out = Command::new(monitoring::promtool()).args(args).current_dir(&dir).output().expect("run promtool");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {args:?}:\n{text}\nrules:\n{rules}");
        text
    };
    let alerts = monitoring::alerts(&rules);
    assert_eq!(alerts.len(), 6, "{alerts:?}");
    let checked = promtool(&["check", "rules", "rules.yaml"]);
    assert!(checked.contains(&format!("SUCCESS: {} rules found", alerts.len())), "{checked}");
    promtool(&["test", "rules", "alerts.test.yaml"]);
    for (name, _) in &alerts {
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "{name} has no test in tests/monitoring/alerts.test.yaml"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A kubeconfig authenticating with `token` (a ServiceAccount's).
fn token_kubeconfig(token: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let admin: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(kubeconfig_path()).expect("kubeconfig")).expect("yaml");
    let cluster = admin["clusters"][0]["cluster"].clone();
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": serde_json::to_value(&cluster).expect("cluster")}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "test", "user": "operator"}}],
        "current-context": "operator",
    });
    let path = dir.join("operator-kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("write kubeconfig");
    path
}

/// Installs the chart (mode: cluster-wide or `watchNamespace`), then runs
/// the operator binary with only the chart ServiceAccount's token and
/// reconciles a HighTemplar with every kind of object, and its deletion.
/// The two installs run one after the other: a cluster-wide operator
/// reconciles every namespace's HighTemplars, so beside the namespaced
/// install it would act on that test's objects too (and log that test's
/// namespace terminating as a "forbidden" event write).
static INSTALLS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn install_and_reconcile_with_chart_permissions(mode: &str, namespaced: bool) {
    let _one_install_at_a_time = INSTALLS.lock().await;
    let admin = client().await;
    install_crd(&admin).await;
    // Cluster-scoped objects carry the release name: unique per run.
    let release = &format!("{mode}-{}", std::process::id());
    let ns = Namespaced::create(&admin, mode).await;
    let chart = chart();
    let mut args = vec!["install", release, &chart];
    args.extend(["--namespace", &ns.name, "--wait=false"]);
    let watch = format!("watchNamespace={}", ns.name);
    if namespaced {
        args.extend(["--set", &watch]);
    }
    let out = run_helm(&args);
    assert!(out.status.success(), "helm install: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("kubectl get ht"), "NOTES.txt tells how to watch");

    let fullname = format!("{release}-high-templar");
    let deployments = ns.api::<Deployment>();
    let d = deployments.get(&fullname).await.expect("the operator Deployment exists");
    assert_eq!(d.spec.and_then(|s| s.template.spec).and_then(|p| p.service_account_name), Some(fullname.clone()));
    ns.api::<ServiceAccount>().get(&fullname).await.expect("ServiceAccount");
    ns.api::<k8s_openapi::api::core::v1::Service>().get(&format!("{fullname}-metrics")).await.expect("metrics Service");
    if namespaced {
        ns.api::<k8s_openapi::api::rbac::v1::Role>().get(&fullname).await.expect("Role");
    } else {
        Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(admin.clone()).get(&fullname).await.expect("ClusterRole");
    }

    // A token of the chart's ServiceAccount, from the TokenRequest API.
    let sa_api = ns.api::<ServiceAccount>();
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}})).expect("token request");
    let token: TokenRequest =
        sa_api.create_subresource("token", &fullname, &PostParams::default(), &request).await.expect("TokenRequest");
    let token = token.status.expect("token status").token;
    let dir = std::env::temp_dir().join(format!("ht-chart-{release}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = token_kubeconfig(&token, &dir);

    let port = free_port();
    let mut operator_cmd = tokio::process::Command::new(workspace_binary("high-templar-operator"));
    operator_cmd
        .args(["run", "--lease-namespace", &ns.name, "--identity", release, "--leader-election", "true"])
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if namespaced {
        operator_cmd.args(["--namespace", &ns.name]);
    }
    let mut operator = operator_cmd.spawn().expect("spawn operator");
    eventually("operator /healthz", || async { (http_status(port, "/healthz").await == Some(200)).then_some(()) })
        .await;

    let exchange = format!("ht-chart-{release}-{}", std::process::id());
    ns.secret("rabbitmq", "url", AMQP_URL).await;
    ns.secret("ht-trigger", "token", "t").await;
    let hts = ns.api::<HighTemplar>();
    let obj = json!({
        "apiVersion": "hightemplar.io/v1alpha1", "kind": "HighTemplar", "metadata": {"name": "chat"},
        "spec": {
            "backend": {"url": "http://api/"},
            "rabbitmq": {"urlSecretRef": {"name": "rabbitmq", "key": "url"}, "exchange": exchange, "deletionPolicy": "Delete"},
            "trigger": {"tokenSecretRef": {"name": "ht-trigger", "key": "token"}},
            "autoscaling": {"enabled": true, "minReplicas": 2, "maxReplicas": 4},
        }
    });
    hts.patch("chat", &PatchParams::apply("high-templar-tests").force(), &Patch::Apply(&obj)).await.expect("apply HT");
    let status = eventually("reconciled with the chart's permissions", || async {
        let status = hts.get("chat").await.ok()?.status?;
        let ok = |t: &str, s: &str| status.conditions.iter().any(|c| c.type_ == t && c.status == s);
        (ok("BrokerReady", "True") && ok("Degraded", "False")).then_some(status)
    })
    .await;
    assert!(status.endpoint.is_some());
    ns.api::<ConfigMap>().get("chat").await.expect("ConfigMap");
    ns.api::<HorizontalPodAutoscaler>().get("chat").await.expect("HPA");
    ns.api::<k8s_openapi::api::policy::v1::PodDisruptionBudget>().get("chat").await.expect("PDB");
    let events = ns.api::<k8s_openapi::api::events::v1::Event>().list(&Default::default()).await.expect("events");
    assert!(events.items.iter().any(|e| e.reason.as_deref() == Some("Created")), "events were published");
    // Deletion through the finalizer.
    hts.delete("chat", &DeleteParams::default()).await.expect("delete HT");
    eventually("HighTemplar released by the finalizer", || async {
        hts.get_opt("chat").await.ok()?.is_none().then_some(())
    })
    .await;

    let _ = operator.start_kill();
    let _ = operator.wait().await;
    let mut logs = String::new();
    if let Some(mut stderr) = operator.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = stderr.read_to_string(&mut logs).await;
    }
    // RBAC denials read `<resource> is forbidden: User "system:serviceaccount:…" cannot <verb> …`;
    // other 403s (a namespace being terminated) are not missing permissions.
    let denied: Vec<&str> = logs.lines().filter(|l| l.contains("forbidden: User")).collect();
    assert!(denied.is_empty(), "the operator hit a missing permission:\n{}", denied.join("\n"));
    let out = run_helm(&["uninstall", release, "--namespace", &ns.name]);
    assert!(out.status.success(), "helm uninstall: {}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    ns.delete().await;
}

#[tokio::test]
async fn install_cluster_wide_and_reconcile_with_chart_rbac() {
    install_and_reconcile_with_chart_permissions("cluster", false).await;
}

#[tokio::test]
async fn install_single_namespace_and_reconcile_with_chart_rbac() {
    install_and_reconcile_with_chart_permissions("single", true).await;
}
