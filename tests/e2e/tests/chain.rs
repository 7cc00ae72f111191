//! The whole chain: control plane + operator + RabbitMQ + a gateway process
//! started from exactly what the operator wrote (the ConfigMap's config and
//! the Deployment container's args and environment, Secrets resolved) — the
//! stand-in for the pod a kubelet would start — + a backend + a websocket
//! client; a 3.x-style AMQP publish reaches the client. Then `kubectl`.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;

use axum::Router;
use futures_util::{SinkExt, StreamExt};
use high_templar_e2e::{
    AMQP_URL, Namespaced, client, eventually, free_port, http_status, install_crd, kubeconfig_path, workspace_binary,
};
use high_templar_operator::crd::HighTemplar;
use high_templar_operator::desired::{CONFIG_HASH_ANNOTATION, CONFIG_KEY};
use high_templar_operator::metrics::Metrics;
use high_templar_operator::reconcile::Settings;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// A backend answering `bootstrap/` for token `alice`.
async fn backend() -> u16 {
    let app = Router::new().route(
        "/api/bootstrap/",
        axum::routing::get(|headers: axum::http::HeaderMap| async move {
            let ok = headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Token alice");
            if ok {
                (axum::http::StatusCode::OK, json!({"allowed_rooms": [{"user": "*"}]}).to_string())
            } else {
                (axum::http::StatusCode::FORBIDDEN, "{}".to_string())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// The pod the kubelet would run: container args and environment of the
/// Deployment, Secret references resolved, the ConfigMap mounted where the
/// args point. Only the listen address differs (`HT_LISTEN`), as the pod
/// network would.
async fn start_gateway_like_a_kubelet(ns: &Namespaced, dir: &std::path::Path, port: u16) -> tokio::process::Child {
    let deployment = ns.api::<Deployment>().get("chat").await.expect("Deployment");
    let pod = deployment.spec.expect("spec").template.spec.expect("pod spec");
    let container = &pod.containers[0];
    let config_map = ns.api::<ConfigMap>().get("chat").await.expect("ConfigMap");
    let config_path = dir.join(CONFIG_KEY);
    std::fs::write(&config_path, &config_map.data.expect("data")[CONFIG_KEY]).expect("write config");
    let mount = container.volume_mounts.as_ref().expect("mounts")[0].mount_path.clone();
    let args: Vec<String> = container
        .args
        .clone()
        .expect("args")
        .into_iter()
        .map(|a| a.replace(&format!("{mount}/{CONFIG_KEY}"), &config_path.display().to_string()))
        .collect();
    let mut env = HashMap::new();
    for var in container.env.clone().unwrap_or_default() {
        let value = match (var.value, var.value_from.and_then(|v| v.secret_key_ref)) {
            (Some(v), _) => v,
            (None, Some(r)) => {
                let secret = ns.api::<Secret>().get(&r.name).await.expect("referenced Secret");
                String::from_utf8(secret.data.expect("data")[&r.key].0.clone()).expect("utf-8")
            }
            (None, None) => panic!("env {} has neither a value nor a Secret reference", var.name),
        };
        env.insert(var.name, value);
    }
    assert!(env.contains_key("HT_AMQP_URL") && env.contains_key("HT_TRIGGER_TOKEN"), "{env:?}");
    tokio::process::Command::new(workspace_binary("high-templar-gateway"))
        .args(&args)
        .env_clear()
        .envs(&env)
        .env("HT_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn gateway")
}

/// The next text frame as JSON (pings skipped).
async fn next_json<S>(ws: &mut S) -> Value
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let msg =
            tokio::time::timeout(high_templar_e2e::WAIT, ws.next()).await.expect("a frame").expect("open").expect("ok");
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).expect("json");
        }
    }
}

fn kubectl() -> std::path::PathBuf {
    let path =
        std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/high-templar/bin/kubectl");
    assert!(path.exists(), "kubectl not found at {}: run tests/controlplane/ensure-tools.sh kubectl", path.display());
    path
}

fn run_kubectl(ns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(kubectl())
        .args(["--kubeconfig", &kubeconfig_path(), "-n", ns])
        .args(args)
        .output()
        .expect("run kubectl");
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn operator_to_gateway_to_websocket_client() {
    let admin = client().await;
    install_crd(&admin).await;
    let ns = Namespaced::create(&admin, "chain").await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(high_templar_operator::controller::run(
        admin.clone(),
        Some(ns.name.clone()),
        Settings { gateway_image: "high-templar-gateway:test".into() },
        Arc::new(Metrics::new()),
        async move {
            let _ = stopped.await;
        },
    ));

    let backend_port = backend().await;
    let exchange = format!("ht-chain-{}", std::process::id());
    ns.secret("rabbitmq", "url", AMQP_URL).await;
    ns.secret("ht-trigger", "token", "chain-token").await;
    let hts = ns.api::<HighTemplar>();
    let apply = |max_connections: i64| {
        let hts = hts.clone();
        let exchange = exchange.clone();
        async move {
            let obj = json!({
                "apiVersion": "hightemplar.io/v1alpha1", "kind": "HighTemplar", "metadata": {"name": "chat"},
                "spec": {
                    "replicas": 2,
                    "backend": {"url": format!("http://127.0.0.1:{backend_port}/api/")},
                    "rabbitmq": {"urlSecretRef": {"name": "rabbitmq", "key": "url"}, "exchange": exchange,
                                 "deletionPolicy": "Delete"},
                    "trigger": {"tokenSecretRef": {"name": "ht-trigger", "key": "token"}},
                    "limits": {"maxConnections": max_connections},
                }
            });
            hts.patch("chat", &PatchParams::apply("high-templar-tests").force(), &Patch::Apply(&obj))
                .await
                .expect("apply")
        }
    };
    apply(1000).await;
    eventually("exchange declared", || async {
        let s = hts.get("chat").await.ok()?.status?;
        s.conditions.iter().any(|c| c.type_ == "BrokerReady" && c.status == "True").then_some(())
    })
    .await;

    let dir = std::env::temp_dir().join(format!("ht-chain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let port = free_port();
    let mut gateway = start_gateway_like_a_kubelet(&ns, &dir, port).await;
    eventually("gateway ready (consuming from RabbitMQ)", || async {
        (http_status(port, "/readyz").await == Some(200)).then_some(())
    })
    .await;

    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws/?token=alice")).await.expect("websocket");
    assert_eq!(next_json(&mut ws).await["is_authorized"], json!(true));
    ws.send(Message::text(json!({"type": "subscribe", "room": {"user": 7}, "requestId": "r"}).to_string()))
        .await
        .expect("send");
    let reply = next_json(&mut ws).await;
    assert_eq!(reply, json!({"code": "success", "requestId": "r"}));

    // Publish the 3.x way: basic_publish(exchange, routing_key="*").
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()).await.expect("amqp");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .basic_publish(
            exchange.as_str().into(),
            "*".into(),
            Default::default(),
            br#"{"rooms":[{"user":7}],"data":{"from":"django"}}"#,
            Default::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let delivered = next_json(&mut ws).await;
    assert_eq!(delivered, json!({"type": "publish", "data": {"from": "django"}, "requestId": "r"}));

    // kubectl: the printer columns, describe, scale.
    let table = run_kubectl(&ns.name, &["get", "ht"]);
    let header: Vec<&str> = table.lines().next().expect("header").split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "REPLICAS", "ENDPOINT", "AGE"], "{table}");
    assert!(table.contains(&format!("ws://chat.{}.svc:80/ws/", ns.name)), "{table}");
    let described = run_kubectl(&ns.name, &["describe", "ht", "chat"]);
    assert!(described.contains("BrokerReady") && described.contains("ExchangeDeclared"), "{described}");
    assert!(described.contains("Created"), "events in describe: {described}");
    run_kubectl(&ns.name, &["scale", "ht/chat", "--replicas=3"]);
    eventually("scaled through kubectl", || async {
        let d = ns.api::<Deployment>().get("chat").await.ok()?;
        (d.spec?.replicas == Some(3)).then_some(())
    })
    .await;

    // A CR change rewrites the ConfigMap and the rollout annotation.
    let hash = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .map(|a| a[CONFIG_HASH_ANNOTATION].clone())
    };
    let before = hash(&ns.api::<Deployment>().get("chat").await.expect("deployment"));
    apply(2000).await;
    eventually("ConfigMap and rollout annotation follow the CR", || async {
        let cm = ns.api::<ConfigMap>().get("chat").await.ok()?;
        let d = ns.api::<Deployment>().get("chat").await.ok()?;
        (cm.data?[CONFIG_KEY].contains("maxConnections: 2000") && hash(&d) != before).then_some(())
    })
    .await;

    let _ = gateway.start_kill();
    let _ = gateway.wait().await;
    let _ = conn.close(200, "done".into()).await;
    hts.delete("chat", &Default::default()).await.expect("delete");
    eventually("deleted (exchange removed by the finalizer)", || async {
        hts.get_opt("chat").await.ok()?.is_none().then_some(())
    })
    .await;
    let _ = stop.send(());
    let _ = controller.await;
    let _ = std::fs::remove_dir_all(&dir);
    ns.delete().await;
}
