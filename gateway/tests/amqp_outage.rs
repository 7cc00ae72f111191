//! A RabbitMQ outage (DESIGN.md §4): readiness follows the broker, sessions
//! survive it, and delivery resumes after reconnection.
//!
//! This stops and starts the whole local RabbitMQ application, so it lives
//! alone in its own test binary: cargo runs test binaries one at a time.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Answer, TestBackend, TestGateway, amqp_config, require_rabbitmq, unique_exchange};
use serde_json::json;

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run rabbitmqctl ({e}): the outage test needs Debian's rabbitmq-server (tests/run installs it)")
    });
    assert!(out.status.success(), "rabbitmqctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Starts the RabbitMQ application again however the test ends.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
    }
}

#[tokio::test]
async fn readiness_follows_the_broker_and_sessions_survive_an_outage() {
    require_rabbitmq().await;
    let exchange = unique_exchange("outage");
    let backend = TestBackend::new().answer("bob", Answer::rooms(json!([{"user": 2}])));
    let gw = TestGateway::with_backend(&backend, &amqp_config(&exchange)).await;
    gw.wait_ready(200).await;
    let mut c = gw.client("bob").await;
    assert_eq!(c.subscribe(json!({"user": 2}), json!("u")).await["code"], "success");

    let _restart = RestartOnDrop;
    rabbitmqctl(&["stop_app"]);
    let stopped = Instant::now();
    gw.wait_ready(503).await;
    assert!(stopped.elapsed() < Duration::from_secs(5), "readiness took {:?} to fail", stopped.elapsed());
    assert_eq!(gw.metric("hightemplar_amqp_connected").await, 0.0);
    // The websocket stays open through the outage.
    c.send("ping").await;
    assert_eq!(c.recv_text().await, "pong");

    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    gw.wait_ready(200).await;
    assert_eq!(gw.metric("hightemplar_amqp_connected").await, 1.0);
    assert!(gw.metric("hightemplar_amqp_reconnects_total").await >= 1.0);
    assert_eq!(gw.trigger(&json!({"rooms": [{"user": 2}], "data": "after the outage"})).await, 202);
    assert_eq!(c.recv_json().await, json!({"type": "publish", "data": "after the outage", "requestId": "u"}));
    common::AmqpPublisher::connect().await.delete_exchange(&exchange).await;
}
