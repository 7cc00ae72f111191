//! A RabbitMQ outage (DESIGN.md §4): readiness follows the broker, sessions
//! survive it, and delivery resumes after reconnection.
//!
//! These tests stop the whole local RabbitMQ, so they live in their own test
//! binary (cargo runs test binaries one at a time) and take turns through
//! `OUTAGE`.

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

/// One outage at a time.
static OUTAGE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts the RabbitMQ application again however the test ends.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
    }
}

#[tokio::test]
async fn readiness_follows_the_broker_and_sessions_survive_an_outage() {
    let _turn = OUTAGE.lock().await;
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

/// The pid of the RabbitMQ server of the tests: the process listening on
/// 127.0.0.1:5672 (other Erlang VMs, other RabbitMQ nodes among them, may
/// run on the machine too).
fn rabbitmq_pid() -> String {
    let out = Command::new("ss")
        .args(["-Hltnp", "src", "127.0.0.1:5672"])
        .output()
        .expect("run ss (Debian's iproute2) to find the broker's pid");
    let listeners = String::from_utf8_lossy(&out.stdout);
    let pids: std::collections::BTreeSet<&str> =
        listeners.split("pid=").skip(1).filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()).collect();
    assert!(pids.len() == 1, "expected one process listening on 127.0.0.1:5672, found {listeners:?}");
    pids.into_iter().next().expect("one pid").to_string()
}

/// Resumes a SIGSTOPped broker however the test ends.
struct ContinueOnDrop(String);

impl Drop for ContinueOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

/// A broker that goes silent without closing anything (a network partition,
/// a frozen VM) is noticed through missed heartbeats.
#[tokio::test]
async fn a_silent_broker_is_detected_by_missed_heartbeats() {
    let _turn = OUTAGE.lock().await;
    require_rabbitmq().await;
    let exchange = unique_exchange("silent");
    let backend = TestBackend::new().answer("bob", Answer::rooms(json!([{"user": 2}])));
    let mut config = common::test_config(&backend.serve().await, &amqp_config(&exchange));
    // The default; set here because the test depends on it.
    config.broker.amqp.heartbeat_seconds = 2;
    let gw = TestGateway::start(config).await;
    gw.wait_ready(200).await;
    let mut c = gw.client("bob").await;
    assert_eq!(c.subscribe(json!({"user": 2}), json!("u")).await["code"], "success");

    let pid = rabbitmq_pid();
    let resume = ContinueOnDrop(pid.clone());
    assert!(Command::new("kill").args(["-STOP", &pid]).status().expect("kill").success());
    let frozen = Instant::now();
    gw.wait_ready(503).await;
    assert!(frozen.elapsed() < Duration::from_secs(6), "readiness took {:?} to fail", frozen.elapsed());
    drop(resume);

    gw.wait_ready(200).await;
    assert_eq!(gw.trigger(&json!({"rooms": [{"user": 2}], "data": "thawed"})).await, 202);
    assert_eq!(c.recv_json().await["data"], json!("thawed"));
    common::AmqpPublisher::connect().await.delete_exchange(&exchange).await;
}
