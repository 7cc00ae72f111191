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

/// Finding 4b: every wildcard pattern a trigger ever used kept a projection
/// in the index (1 022 patterns over a 10-key room held +170 MB with 300
/// subscriptions). Now the index keeps a bounded number, and deliveries are
/// still exact.
#[tokio::test]
async fn distinct_wildcard_patterns_do_not_accumulate() {
    let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    let allowed: serde_json::Map<String, serde_json::Value> = keys.iter().map(|k| (k.clone(), json!("*"))).collect();
    let backend = TestBackend::new().answer("carol", Answer::rooms(json!([allowed])));
    let gw = TestGateway::with_backend(&backend, "").await;
    let mut c = gw.client("carol").await;
    // Two rooms: all ones, and all ones but k0 = 0.
    let ones: serde_json::Map<String, serde_json::Value> = keys.iter().map(|k| (k.clone(), json!(1))).collect();
    let mut other = ones.clone();
    other.insert("k0".into(), json!(0));
    assert_eq!(c.subscribe(json!(ones), json!("ones")).await["code"], "success");
    assert_eq!(c.subscribe(json!(other), json!("other")).await["code"], "success");
    let mut expected = Vec::new();
    for pattern in 1u32..(1 << 10) - 1 {
        let room: serde_json::Map<String, serde_json::Value> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), if pattern & (1 << i) != 0 { json!("*") } else { json!(1) }))
            .collect();
        assert_eq!(gw.trigger(&json!({"rooms": [room], "data": pattern})).await, 202);
        expected.push((pattern, "ones"));
        if pattern & 1 != 0 {
            expected.push((pattern, "other"));
        }
    }
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let publish = c.recv_json().await;
        let pattern = publish["data"].as_u64().expect("pattern") as u32;
        got.push((pattern, if publish["requestId"] == "ones" { "ones" } else { "other" }));
    }
    // Triggers arrive in order; within one, the two subscriptions in any order.
    got.sort();
    assert!(got == expected, "each subscription gets each matching trigger exactly once");
    c.expect_silence(std::time::Duration::from_millis(200)).await;
    let held = gw.metric("hightemplar_index_projections").await;
    assert!((1.0..=8.0).contains(&held), "{held} projections held after 1 022 patterns");
}
