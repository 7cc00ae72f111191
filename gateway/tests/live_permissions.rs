//! Live permissions (DESIGN.md §8, docs/protocol.md "Control messages"):
//! `refresh` and `disconnect` control messages, over RabbitMQ to two
//! replicas and over `POST /trigger`, by user identity and by room; a
//! refresh during a backend outage; the periodic refresh. A real backend
//! whose answers the tests change while the clients stay connected.

mod common;

use std::time::{Duration, Instant};

use common::{
    AmqpPublisher, Answer, Client, Ended, TestBackend, TestGateway, WAIT, amqp_config, http_post, require_rabbitmq,
    unique_exchange,
};
use serde_json::{Value, json};

/// A bootstrap answer for user `id` with `rooms`.
fn user(id: Value, rooms: Value) -> Answer {
    Answer::body(&json!({"user": {"id": id, "name": "x"}, "allowed_rooms": rooms}).to_string())
}

const USER_PATH: &str = "permissions: {userPath: user.id}\n";

fn backend() -> TestBackend {
    TestBackend::new()
        .answer("alice", user(json!("alice"), json!([{"team": "red"}, {"team": "blue"}])))
        .answer("bob", user(json!(2), json!([{"team": "red"}, {"team": "blue"}])))
}

async fn amqp_gateway(backend: &TestBackend, exchange: &str) -> TestGateway {
    require_rabbitmq().await;
    let gw = TestGateway::with_backend(backend, &format!("{}{USER_PATH}", amqp_config(exchange))).await;
    gw.wait_ready(200).await;
    gw
}

async fn subscribed(gw: &TestGateway, token: &str, rooms: &[(&str, &str)]) -> Client {
    let mut c = gw.client(token).await;
    for (team, id) in rooms {
        assert_eq!(c.subscribe(json!({"team": team}), json!(id)).await["code"], "success");
    }
    c
}

fn unsubscribed(request_id: &str) -> Value {
    json!({"type": "unsubscribed", "requestId": request_id, "reason": "permission-revoked"})
}

fn publish(data: &str, request_id: &str) -> Value {
    json!({"type": "publish", "data": data, "requestId": request_id})
}

#[tokio::test]
async fn revoking_a_room_stops_its_deliveries_on_both_replicas_and_keeps_the_others() {
    let exchange = unique_exchange("revoke");
    let backend = backend();
    let a = amqp_gateway(&backend, &exchange).await;
    let b = amqp_gateway(&backend, &exchange).await;
    let mut alice_a = subscribed(&a, "alice", &[("red", "r"), ("blue", "b")]).await;
    let mut alice_b = subscribed(&b, "alice", &[("red", "r"), ("blue", "b")]).await;
    let mut bob = subscribed(&b, "bob", &[("red", "r")]).await;

    // The API takes `red` away from alice, then asks every replica to refresh her.
    let _ = backend.clone().answer("alice", user(json!("alice"), json!([{"team": "blue"}])));
    let asked = Instant::now();
    assert_eq!(a.trigger(&json!({"control": "refresh", "users": ["alice"]})).await, 202);
    // The promise is "within a second": a red trigger sent one second after
    // the refresh, without waiting for anything else, must not reach alice
    // on either replica.
    tokio::time::sleep_until((asked + Duration::from_secs(1)).into()).await;
    assert_eq!(a.trigger(&json!({"rooms": [{"team": "red"}], "data": "red"})).await, 202);
    assert_eq!(a.trigger(&json!({"rooms": [{"team": "blue"}], "data": "blue"})).await, 202);
    assert_eq!(alice_a.recv_json().await, unsubscribed("r"));
    assert_eq!(alice_b.recv_json().await, unsubscribed("r"));
    // Triggers arrive in order: the blue one after the (undelivered) red one.
    assert_eq!(alice_a.recv_json().await, publish("blue", "b"));
    assert_eq!(alice_b.recv_json().await, publish("blue", "b"));
    assert_eq!(bob.recv_json().await, publish("red", "r"), "another user keeps the room");
    alice_a.expect_silence(Duration::from_millis(300)).await;
    alice_b.expect_silence(Duration::from_millis(10)).await;
    // The refreshed permissions also hold for new subscriptions.
    let again = alice_a.subscribe(json!({"team": "red"}), json!("r2")).await;
    assert_eq!(again, json!({"code": "error", "message": "room-not-found", "requestId": "r2"}));
    for gw in [&a, &b] {
        assert_eq!(gw.metric(r#"hightemplar_controls_total{action="refresh"}"#).await, 1.0);
        assert_eq!(gw.metric("hightemplar_subscriptions_revoked_total").await, 1.0);
        assert_eq!(gw.metric(r#"hightemplar_permission_refreshes_total{outcome="revoked"}"#).await, 1.0);
    }
    AmqpPublisher::connect().await.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn disconnect_closes_only_that_users_sockets_on_every_replica() {
    let exchange = unique_exchange("disconnect");
    let backend = backend();
    let a = amqp_gateway(&backend, &exchange).await;
    let b = amqp_gateway(&backend, &exchange).await;
    let mut alice_a = subscribed(&a, "alice", &[("red", "r")]).await;
    let mut alice_b = subscribed(&b, "alice", &[("red", "r")]).await;
    let mut bob_a = subscribed(&a, "bob", &[("red", "r")]).await;
    let mut bob_b = subscribed(&b, "bob", &[("red", "r")]).await;

    // As a Django publisher would send it, straight to the exchange.
    let publisher = AmqpPublisher::connect().await;
    publisher.publish(&exchange, br#"{"control": "disconnect", "users": ["alice"]}"#).await;
    assert_eq!(alice_a.until_end().await, (vec![], Ended::Close(4001)));
    assert_eq!(alice_b.until_end().await, (vec![], Ended::Close(4001)));

    publisher.publish(&exchange, br#"{"rooms": [{"team": "red"}], "data": "still"}"#).await;
    assert_eq!(bob_a.recv_json().await, publish("still", "r"));
    assert_eq!(bob_b.recv_json().await, publish("still", "r"));
    // A user id is compared as JSON: bob is 2, not "2".
    publisher.publish(&exchange, br#"{"control": "disconnect", "users": ["2"]}"#).await;
    publisher.publish(&exchange, br#"{"control": "disconnect", "users": [2], "code": 4403}"#).await;
    assert_eq!(bob_a.until_end().await, (vec![], Ended::Close(4403)));
    assert_eq!(bob_b.until_end().await, (vec![], Ended::Close(4403)));
    for gw in [&a, &b] {
        assert_eq!(gw.metric(r#"hightemplar_disconnects_total{reason="disconnected"}"#).await, 2.0);
    }
    publisher.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn refresh_by_room_reaches_the_connections_a_trigger_there_would() {
    // No user path: connections have no identity, rooms still name them.
    let backend = backend();
    let gw = TestGateway::with_backend(&backend, "").await;
    let mut on_red = subscribed(&gw, "alice", &[("red", "r"), ("blue", "b")]).await;
    let mut on_blue = subscribed(&gw, "bob", &[("blue", "b")]).await;
    let _ = backend.clone().answer("alice", user(json!("alice"), json!([])));
    let _ = backend.clone().answer("bob", user(json!(2), json!([])));
    assert_eq!(gw.trigger(&json!({"control": "refresh", "subscribed": [{"team": "*"}], "users": [2]})).await, 202);
    // alice and bob both hold a `team` subscription: both are refreshed (the
    // `users` selector names nobody here, without a user path).
    let mut got = vec![on_red.recv_json().await, on_red.recv_json().await];
    got.sort_by_key(|v| v["requestId"].to_string());
    assert_eq!(got, [unsubscribed("b"), unsubscribed("r")]);
    assert_eq!(on_blue.recv_json().await, unsubscribed("b"));

    // A refresh by room reaches only what a trigger there would.
    let _ = backend.clone().answer("alice", user(json!("alice"), json!([{"team": "red"}, {"team": "blue"}])));
    let mut red = subscribed(&gw, "alice", &[("red", "r")]).await;
    let mut blue = subscribed(&gw, "alice", &[("blue", "b")]).await;
    let _ = backend.clone().answer("alice", user(json!("alice"), json!([])));
    assert_eq!(gw.trigger(&json!({"control": "refresh", "subscribed": [{"team": "red"}]})).await, 202);
    assert_eq!(red.recv_json().await, unsubscribed("r"));
    blue.expect_silence(Duration::from_millis(500)).await;
    assert_eq!(blue.request(r#"{"type":"unsubscribe","requestId":"b"}"#).await["code"], "success");
}

#[tokio::test]
async fn a_refused_user_is_closed_with_4401() {
    let backend = backend();
    let gw = TestGateway::with_backend(&backend, USER_PATH).await;
    let mut alice = subscribed(&gw, "alice", &[("red", "r")]).await;
    let mut bob = subscribed(&gw, "bob", &[("red", "r")]).await;
    let _ = backend.clone().answer("alice", Answer::status(401));
    let _ = backend.clone().answer("bob", Answer::status(403));
    assert_eq!(gw.trigger(&json!({"control": "refresh", "users": ["alice", 2]})).await, 202);
    assert_eq!(alice.until_end().await, (vec![], Ended::Close(4401)));
    assert_eq!(bob.until_end().await, (vec![], Ended::Close(4401)));
    assert_eq!(gw.metric(r#"hightemplar_permission_refreshes_total{outcome="denied"}"#).await, 2.0);
}

#[tokio::test]
async fn a_refresh_during_a_backend_outage_keeps_the_permissions_and_retries() {
    let backend = backend();
    let gw = TestGateway::with_backend(&backend, USER_PATH).await;
    let mut alice = subscribed(&gw, "alice", &[("red", "r"), ("blue", "b")]).await;
    let _ = backend.clone().answer("alice", Answer::status(503));
    assert_eq!(gw.trigger(&json!({"control": "refresh", "users": ["alice"]})).await, 202);
    common::eventually("the refresh failed", || async {
        gw.metric(r#"hightemplar_permission_refreshes_total{outcome="failed"}"#).await >= 1.0
    })
    .await;
    // Still subscribed to both: an outage logs nobody out.
    assert_eq!(gw.trigger(&json!({"rooms": [{"team": "red"}], "data": "during"})).await, 202);
    assert_eq!(alice.recv_json().await, publish("during", "r"));
    // The API comes back without `red`: the retry (1–2 s later) applies it.
    let _ = backend.clone().answer("alice", user(json!("alice"), json!([{"team": "blue"}])));
    let started = Instant::now();
    assert_eq!(alice.recv_json().await, unsubscribed("r"));
    assert!(started.elapsed() < WAIT);
    assert_eq!(gw.trigger(&json!({"rooms": [{"team": "red"}, {"team": "blue"}], "data": "after"})).await, 202);
    assert_eq!(alice.recv_json().await, publish("after", "b"));
    alice.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn the_periodic_refresh_drops_revoked_rooms() {
    let backend = backend();
    let gw = TestGateway::with_backend(&backend, "permissions: {refreshSeconds: 1}\n").await;
    let mut alice = subscribed(&gw, "alice", &[("red", "r"), ("blue", "b")]).await;
    let _ = backend.clone().answer("alice", user(json!("alice"), json!([{"team": "red"}])));
    // No control message: the next periodic refresh (0.8–1.2 s) finds it.
    assert_eq!(alice.recv_json().await, unsubscribed("b"));
    // It keeps refreshing: an answer that refuses the user closes it.
    let _ = backend.clone().answer("alice", Answer::status(401));
    assert_eq!(alice.until_end().await, (vec![], Ended::Close(4401)));
    assert!(gw.metric(r#"hightemplar_permission_refreshes_total{outcome="revoked"}"#).await >= 1.0);
}

#[tokio::test]
async fn malformed_control_messages_are_refused_with_the_reason() {
    let gw = TestGateway::with_backend(&backend(), USER_PATH).await;
    let url = gw.http_url("/trigger");
    for (body, message) in [
        (json!({"control": "reboot", "users": [1]}), "`control` must be"),
        (json!({"control": "refresh"}), "names connections with `users` and/or `subscribed`"),
        (json!({"control": "refresh", "users": [1], "rooms": [{"a": 1}]}), "has no `rooms`"),
        (json!({"control": "refresh", "users": [{"id": 1}]}), "`users` must be a list"),
        (json!({"control": "refresh", "subscribed": [[1]]}), "`subscribed` must be a list of rooms"),
        (json!({"control": "disconnect", "users": [1], "code": 1000}), "`code` must be a number from 4000"),
        (json!({"control": "refresh", "users": [1], "code": 4001}), "only `disconnect` takes a `code`"),
    ] {
        let (status, text) = http_post(&url, Some("test-token"), body.to_string().into_bytes()).await;
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(message), "{body}: {text}");
    }
    assert_eq!(gw.metric(r#"hightemplar_triggers_rejected_total{reason="invalid_control"}"#).await, 7.0);
    // Nothing else happened: a client connected meanwhile is untouched.
    let mut c = subscribed(&gw, "alice", &[("red", "r")]).await;
    assert_eq!(gw.trigger(&json!({"rooms": [{"team": "red"}], "data": 1})).await, 202);
    assert_eq!(c.recv_json().await["data"], 1);
}
