//! Regression tests of the hardening findings about triggers (issue 11):
//! one body limit and one rooms limit for `POST /trigger` and AMQP alike,
//! so a publisher cannot make every replica hold many times a huge body.
//! A real RabbitMQ, a real gateway, real clients.

mod common;

use common::{
    AmqpPublisher, Answer, TestBackend, TestGateway, amqp_config, http_post, require_rabbitmq, unique_exchange,
};
use serde_json::json;

fn backend() -> TestBackend {
    TestBackend::new().answer("bob", Answer::rooms(json!([{"user": "*"}])))
}

fn body_with_rooms(n: usize) -> Vec<u8> {
    let rooms: Vec<String> = (0..n).map(|i| format!(r#"{{"user":{i}}}"#)).collect();
    format!(r#"{{"rooms":[{}],"data":"d"}}"#, rooms.join(",")).into_bytes()
}

#[tokio::test]
async fn amqp_bodies_over_the_limits_are_dropped_and_the_consumer_goes_on() {
    require_rabbitmq().await;
    let exchange = unique_exchange("limits");
    let extra = format!("{}trigger: {{maxBodyBytes: 2048, maxRooms: 5}}\n", amqp_config(&exchange));
    let gw = TestGateway::with_backend(&backend(), &extra).await;
    gw.wait_ready(200).await;
    let mut c = gw.client("bob").await;
    assert_eq!(c.subscribe(json!({"user": 1}), json!("u")).await["code"], "success");
    let publisher = AmqpPublisher::connect().await;
    let big = format!(r#"{{"rooms":[{{"user":1}}],"data":"{}"}}"#, "x".repeat(4096));
    publisher.publish(&exchange, big.as_bytes()).await;
    publisher.publish(&exchange, &body_with_rooms(6)).await;
    publisher.publish(&exchange, &body_with_rooms(5)).await;
    // Only the one within both limits arrives; the consumer kept going.
    assert_eq!(c.recv_json().await, json!({"type": "publish", "data": "d", "requestId": "u"}));
    c.expect_silence(std::time::Duration::from_millis(300)).await;
    assert_eq!(gw.metric(r#"hightemplar_triggers_rejected_total{reason="too_large"}"#).await, 1.0);
    assert_eq!(gw.metric(r#"hightemplar_triggers_rejected_total{reason="too_many_rooms"}"#).await, 1.0);
    publisher.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn http_triggers_with_too_many_rooms_are_refused() {
    let gw = TestGateway::with_backend(&backend(), "trigger: {maxRooms: 5}").await;
    let url = gw.http_url("/trigger");
    let (status, body) = http_post(&url, Some("test-token"), body_with_rooms(6)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("at most 5 rooms"), "{body}");
    assert_eq!(http_post(&url, Some("test-token"), body_with_rooms(5)).await.0, 202);
    assert_eq!(gw.metric(r#"hightemplar_triggers_rejected_total{reason="too_many_rooms"}"#).await, 1.0);
}
