//! The `amqp` broker against a real RabbitMQ (DESIGN.md §3): 3.x
//! publishers, several replicas, malformed bodies, an exchange declared by
//! 3.x, and a broker that is down at startup. Each test uses its own
//! exchange so tests run in parallel and leave nothing behind.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{AmqpPublisher, Answer, TestBackend, TestGateway, amqp_config, require_rabbitmq, unique_exchange};
use serde_json::json;

fn backend() -> TestBackend {
    TestBackend::new().answer("bob", Answer::rooms(json!([{"user": 2}, {"team": "*"}])))
}

async fn amqp_gateway(backend: &TestBackend, exchange: &str) -> TestGateway {
    require_rabbitmq().await;
    let gw = TestGateway::with_backend(backend, &amqp_config(exchange)).await;
    gw.wait_ready(200).await;
    gw
}

#[tokio::test]
async fn a_3x_publisher_reaches_a_websocket_client() {
    let exchange = unique_exchange("3x");
    let gw = amqp_gateway(&backend(), &exchange).await;
    let mut c = gw.client("bob").await;
    assert_eq!(c.subscribe(json!({"user": 2}), json!("u")).await["code"], "success");
    let publisher = AmqpPublisher::connect().await;
    publisher.publish(&exchange, br#"{"rooms": [{"user": 2}], "data": {"from": "django"}}"#).await;
    assert_eq!(c.recv_json().await, json!({"type": "publish", "data": {"from": "django"}, "requestId": "u"}));
    assert_eq!(gw.metric(r#"hightemplar_triggers_total{source="amqp"}"#).await, 1.0);
    assert_eq!(gw.metric("hightemplar_amqp_connected").await, 1.0);
    publisher.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn http_trigger_to_one_replica_reaches_clients_of_all_once() {
    let exchange = unique_exchange("replicas");
    let backend = backend();
    let a = amqp_gateway(&backend, &exchange).await;
    let b = amqp_gateway(&backend, &exchange).await;
    let mut on_a = a.client("bob").await;
    let mut on_b = b.client("bob").await;
    assert_eq!(on_a.subscribe(json!({"team": "*"}), json!(1)).await["code"], "success");
    assert_eq!(on_b.subscribe(json!({"team": "red"}), json!(2)).await["code"], "success");
    assert_eq!(on_b.subscribe(json!({"user": 2}), json!(3)).await["code"], "success");

    assert_eq!(a.trigger(&json!({"rooms": [{"team": "red"}, {"user": 2}], "data": "x"})).await, 202);
    assert_eq!(on_a.recv_json().await, json!({"type": "publish", "data": "x", "requestId": 1}));
    let mut ids = vec![on_b.recv_json().await["requestId"].clone(), on_b.recv_json().await["requestId"].clone()];
    ids.sort_by_key(|v| v.to_string());
    assert_eq!(ids, [json!(2), json!(3)]);
    // Exactly one copy each.
    on_a.expect_silence(Duration::from_millis(500)).await;
    on_b.expect_silence(Duration::from_millis(10)).await;
    // HTTP in amqp mode goes through RabbitMQ: counted as received from AMQP on both.
    assert_eq!(a.metric(r#"hightemplar_triggers_total{source="amqp"}"#).await, 1.0);
    assert_eq!(b.metric(r#"hightemplar_triggers_total{source="amqp"}"#).await, 1.0);
    AmqpPublisher::connect().await.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn malformed_bodies_are_dropped_and_the_consumer_goes_on() {
    let exchange = unique_exchange("malformed");
    let gw = amqp_gateway(&backend(), &exchange).await;
    let mut c = gw.client("bob").await;
    assert_eq!(c.subscribe(json!({"user": 2}), json!("u")).await["code"], "success");
    let publisher = AmqpPublisher::connect().await;
    for bad in [&b"not json at all"[..], br#"{"rooms": "user"}"#, br#"{"rooms": [{"user": [2]}]}"#, b"\xff\xfe"] {
        publisher.publish(&exchange, bad).await;
    }
    publisher.publish(&exchange, br#"{"rooms": [{"user": 2}], "data": "valid"}"#).await;
    assert_eq!(c.recv_json().await["data"], json!("valid"));
    assert_eq!(gw.metric(r#"hightemplar_triggers_rejected_total{reason="not_json"}"#).await, 2.0);
    assert_eq!(gw.metric(r#"hightemplar_triggers_rejected_total{reason="no_rooms"}"#).await, 1.0);
    assert_eq!(gw.metric(r#"hightemplar_triggers_rejected_total{reason="invalid_room"}"#).await, 1.0);
    gw.wait_ready(200).await;
    publisher.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn an_exchange_declared_by_3x_is_used_as_it_is() {
    let exchange = unique_exchange("legacy");
    let publisher = AmqpPublisher::connect().await;
    // A 3.x gateway got there first: direct, non-durable.
    publisher.declare_3x_exchange(&exchange).await;
    let url = backend().serve().await;
    let mut config = common::test_config(&url, &amqp_config(&exchange));
    config.broker.amqp.exchange_durable = true;
    let gw = TestGateway::start(config).await;
    gw.wait_ready(200).await;
    let mut c = gw.client("bob").await;
    assert_eq!(c.subscribe(json!({"user": 2}), json!("u")).await["code"], "success");
    publisher.publish(&exchange, br#"{"rooms": [{"user": 2}], "data": 1}"#).await;
    assert_eq!(c.recv_json().await["data"], json!(1));
    // POST /trigger publishes into the same (3.x) exchange.
    assert_eq!(gw.trigger(&json!({"rooms": [{"user": 2}], "data": 2})).await, 202);
    assert_eq!(c.recv_json().await["data"], json!(2));
    publisher.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn broker_down_at_startup_is_not_ready_keeps_retrying_and_hides_the_password() {
    let (port, http_port) = (common::free_port(), common::free_port());
    let url = backend().serve().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_high-templar-gateway"))
        .args(["serve", "--broker", "amqp", "--backend-url", &url, "--listen", &format!("127.0.0.1:{http_port}")])
        .env("HT_AMQP_URL", format!("amqp://ht:hunter2@127.0.0.1:{port}/%2f"))
        .env("HT_TRIGGER_TOKEN", "t")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let base = format!("http://127.0.0.1:{http_port}");
    common::eventually("gateway answers", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", http_port)).await.is_ok()
    })
    .await;
    assert_eq!(common::http_get(&format!("{base}/healthz")).await.0, 200);
    assert_eq!(common::http_get(&format!("{base}/readyz")).await.0, 503);
    // POST /trigger cannot be accepted without the broker.
    let (status, _) = common::http_post(&format!("{base}/trigger"), Some("t"), br#"{"rooms":[]}"#.to_vec()).await;
    assert_eq!(status, 503);
    common::eventually("several reconnection attempts", || async {
        let (_, text) = common::http_get(&format!("{base}/metrics")).await;
        common::metric_value(&text, "hightemplar_amqp_reconnects_total") >= 2.0
    })
    .await;
    assert!(child.try_wait().expect("status").is_none(), "the process keeps running");
    child.start_kill().expect("kill");
    let _ = child.wait().await;
    let logs = common::stderr_of(&mut child).await;
    assert!(logs.contains("RabbitMQ unavailable"), "{logs}");
    assert!(logs.contains("ht:***@127.0.0.1"), "the URL is logged redacted: {logs}");
    assert!(!logs.contains("hunter2"), "the password leaked: {logs}");
}
