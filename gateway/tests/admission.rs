//! Connect storms (issue 12 §1): at most `backend.admission.maxConcurrent`
//! bootstrap calls reach the backend at once; upgrades wait in a bounded
//! queue for a bounded time, and past either bound are refused before the
//! 101 with `503` and `Retry-After`. A real, slow backend and real clients.

mod common;

use std::time::Duration;

use common::{Answer, Client, Ended, TestBackend, TestGateway};
use serde_json::json;
use tokio_tungstenite::tungstenite::Error as WsError;

/// What a connect attempt got: authorised, or refused with this status and `Retry-After`.
#[derive(Debug, PartialEq)]
enum Outcome {
    Authorized,
    Refused(u16, Option<u64>),
}

async fn connect(gw: &TestGateway, token: &str) -> Outcome {
    match Client::connect(&gw.ws_url(Some(token)), &[]).await {
        Ok(mut c) => {
            assert_eq!(c.recv_json().await["is_authorized"], json!(true));
            Outcome::Authorized
        }
        Err(WsError::Http(response)) => {
            let retry = response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
            Outcome::Refused(response.status().as_u16(), retry)
        }
        Err(e) => panic!("unexpected connect error: {e}"),
    }
}

async fn storm(gw: &TestGateway, clients: usize, token: &str) -> Vec<Outcome> {
    let attempts: Vec<_> = (0..clients).map(|_| connect(gw, token)).collect();
    futures_util::future::join_all(attempts).await
}

#[tokio::test]
async fn a_storm_reaches_the_backend_at_most_max_concurrent_at_once() {
    let backend = TestBackend::new().answer("storm", Answer::rooms(json!([])).delayed(Duration::from_millis(800)));
    let gw = TestGateway::with_backend(
        &backend,
        "backend: {coalesce: false, admission: {maxConcurrent: 4, maxQueued: 8, maxWaitSeconds: 5}}",
    )
    .await;
    // 12 fit: 4 in flight, 8 waiting.
    let outcomes = storm(&gw, 12, "storm").await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Authorized), "{outcomes:?}");
    assert_eq!(backend.max_in_flight(), 4, "the cap is reached and held");
    // 30 at once: 12 are served, the others refused at once with a retry hint.
    let outcomes = storm(&gw, 30, "storm").await;
    let authorized = outcomes.iter().filter(|o| **o == Outcome::Authorized).count();
    let refused: Vec<_> = outcomes.iter().filter(|o| **o != Outcome::Authorized).collect();
    assert_eq!(authorized, 12, "{outcomes:?}");
    for o in &refused {
        let Outcome::Refused(503, Some(retry)) = o else { panic!("refused without 503 + Retry-After: {o:?}") };
        assert!((1..=5).contains(retry), "Retry-After {retry}");
    }
    assert_eq!(backend.max_in_flight(), 4);
    assert_eq!(gw.metric(r#"hightemplar_connections_refused_total{reason="admission_queue_full"}"#).await, 18.0);
    assert_eq!(gw.metric("hightemplar_bootstrap_in_flight").await, 0.0);
    assert_eq!(gw.metric("hightemplar_bootstrap_queued").await, 0.0);
}

#[tokio::test]
async fn an_upgrade_waits_at_most_max_wait_seconds() {
    let backend = TestBackend::new().answer("storm", Answer::rooms(json!([])).delayed(Duration::from_millis(1500)));
    let gw = TestGateway::with_backend(
        &backend,
        "backend: {coalesce: false, admission: {maxConcurrent: 1, maxQueued: 10, maxWaitSeconds: 0.3}}",
    )
    .await;
    let started = std::time::Instant::now();
    let outcomes = storm(&gw, 3, "storm").await;
    let refused = outcomes.iter().filter(|o| matches!(o, Outcome::Refused(503, Some(_)))).count();
    assert_eq!(refused, 2, "{outcomes:?}");
    assert!(outcomes.contains(&Outcome::Authorized), "{outcomes:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(gw.metric(r#"hightemplar_connections_refused_total{reason="admission_timeout"}"#).await, 2.0);
    assert_eq!(backend.max_in_flight(), 1);
}

async fn connect_close_code(gw: &TestGateway, token: &str) -> Ended {
    let mut c = Client::connect(&gw.ws_url(Some(token)), &[]).await.expect("upgrade");
    c.until_end().await.1
}

/// A failing backend opens the circuit: new connections get 1013 at once,
/// without a backend call; `/readyz` stays 200 and says so; after the open
/// period one probe goes through, and its success closes the circuit.
#[tokio::test]
async fn a_failing_backend_opens_the_circuit_and_a_probe_closes_it() {
    let backend = TestBackend::new().answer("flaky", Answer::status(503));
    let gw = TestGateway::with_backend(
        &backend,
        "backend: {circuitBreaker: {window: 4, failureRatio: 0.5, openSeconds: 1}}",
    )
    .await;
    for _ in 0..4 {
        assert_eq!(connect_close_code(&gw, "flaky").await, Ended::Close(1013));
    }
    assert_eq!(backend.seen().len(), 4);
    // Open: refused without calling the backend.
    for _ in 0..3 {
        assert_eq!(connect_close_code(&gw, "flaky").await, Ended::Close(1013));
    }
    assert_eq!(backend.seen().len(), 4, "no call while the circuit is open");
    assert_eq!(gw.metric(r#"hightemplar_auth_total{outcome="circuit_open"}"#).await, 3.0);
    assert_eq!(gw.metric("hightemplar_backend_circuit_state").await, 1.0);
    assert_eq!(gw.metric("hightemplar_backend_circuit_opened_total").await, 1.0);
    let (status, body) = common::http_get(&gw.http_url("/readyz")).await;
    assert_eq!(status, 200, "a backend outage does not make the replica unready");
    assert!(body.contains("circuit breaker: open"), "{body}");
    // The backend recovers; after the open period (1 s ± 20 %) a probe closes the circuit.
    let _ = backend.clone().answer("flaky", Answer::rooms(json!([])));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let mut c = gw.client("flaky").await;
    assert_eq!(backend.seen().len(), 5);
    assert_eq!(gw.metric("hightemplar_backend_circuit_state").await, 0.0);
    let (_, body) = common::http_get(&gw.http_url("/readyz")).await;
    assert_eq!(body, "ready\n");
    c.expect_silence(Duration::from_millis(50)).await;
}

/// 401/403 are answers, not failures: they never open the circuit.
#[tokio::test]
async fn refusals_do_not_open_the_circuit() {
    let backend = TestBackend::new().answer("nobody", Answer::status(403));
    let gw = TestGateway::with_backend(&backend, "backend: {circuitBreaker: {window: 2, openSeconds: 30}}").await;
    for _ in 0..6 {
        assert_eq!(connect_close_code(&gw, "nobody").await, Ended::Close(4401));
    }
    assert_eq!(backend.seen().len(), 6);
    assert_eq!(gw.metric("hightemplar_backend_circuit_opened_total").await, 0.0);
}

/// One user's tabs reconnecting together make one backend call; another
/// user's identical-looking connect (different credentials) never shares it.
#[tokio::test]
async fn identical_concurrent_requests_share_one_call() {
    let slow = |rooms| Answer::rooms(rooms).delayed(Duration::from_millis(500));
    let backend =
        TestBackend::new().answer("alice", slow(json!([{"u": "alice"}]))).answer("bob", slow(json!([{"u": "bob"}])));
    let gw = TestGateway::with_backend(&backend, "").await;
    let tab = |token: &'static str| {
        let url = gw.ws_url(Some(token));
        async move {
            let mut c = Client::connect(&url, &[("Cookie", "sessionid=s")]).await.expect("connect");
            c.recv_json().await
        }
    };
    let alice: Vec<_> = (0..10).map(|_| tab("alice")).collect();
    let (alice, bob) = tokio::join!(futures_util::future::join_all(alice), tab("bob"));
    for auth in &alice {
        assert_eq!(auth["is_authorized"], json!(true));
        assert_eq!(auth["allowed_rooms"], json!([{"u": "alice"}]), "{auth}");
    }
    assert_eq!(bob["allowed_rooms"], json!([{"u": "bob"}]), "{bob}");
    assert_eq!(backend.seen().len(), 2, "one call per distinct request");
    assert_eq!(gw.metric("hightemplar_bootstrap_coalesced_total").await, 9.0);
}

#[tokio::test]
async fn coalescing_can_be_turned_off() {
    let backend = TestBackend::new().answer("alice", Answer::rooms(json!([])).delayed(Duration::from_millis(300)));
    let gw = TestGateway::with_backend(&backend, "backend: {coalesce: false}").await;
    let tabs: Vec<_> = (0..5).map(|_| gw.client("alice")).collect();
    futures_util::future::join_all(tabs).await;
    assert_eq!(backend.seen().len(), 5);
}

/// A tab that joins its user's call in flight takes no admission slot: with
/// one slot and no queue, nine more tabs are served by the first one's call
/// instead of being refused.
#[tokio::test]
async fn joining_a_call_in_flight_takes_no_slot() {
    let backend = TestBackend::new().answer("alice", Answer::rooms(json!([])).delayed(Duration::from_millis(800)));
    let gw = TestGateway::with_backend(
        &backend,
        "backend: {admission: {maxConcurrent: 1, maxQueued: 0, maxWaitSeconds: 0}}",
    )
    .await;
    let first = tokio::spawn({
        let url = gw.ws_url(Some("alice"));
        async move {
            let mut c = Client::connect(&url, &[]).await.expect("first tab");
            c.recv_json().await
        }
    });
    let metrics = gw.gateway.metrics.clone();
    common::eventually("the first tab's call in flight", || async { metrics.bootstrap_in_flight.get() == 1 }).await;
    let outcomes = storm(&gw, 9, "alice").await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Authorized), "{outcomes:?}");
    assert_eq!(first.await.expect("first")["is_authorized"], json!(true));
    assert_eq!(backend.seen().len(), 1);
    assert_eq!(gw.metric("hightemplar_bootstrap_coalesced_total").await, 9.0);
}

#[tokio::test]
async fn answers_are_reused_only_for_the_identical_request_and_only_when_configured() {
    let backend = TestBackend::new()
        .answer("alice", Answer::rooms(json!([{"team": "red"}])))
        .answer("bob", Answer::rooms(json!([{"team": "blue"}])));
    let gw = TestGateway::with_backend(&backend, "backend: {answerReuse: {seconds: 60}}").await;
    let calls = |token: &'static str| {
        let backend = backend.clone();
        move || {
            backend
                .seen()
                .iter()
                .filter(|h| h.get("authorization").is_some_and(|v| v == &format!("Token {token}")))
                .count()
        }
    };
    let (alice_calls, bob_calls) = (calls("alice"), calls("bob"));
    for _ in 0..3 {
        let mut c = gw.client("alice").await;
        assert_eq!(c.subscribe(json!({"team": "red"}), json!(1)).await["code"], "success");
    }
    assert_eq!(alice_calls(), 1, "one call, then the kept answer");
    assert_eq!(gw.metric("hightemplar_bootstrap_reused_total").await, 2.0);
    // Other credentials never get it.
    let mut bob = gw.client("bob").await;
    assert_eq!(bob.subscribe(json!({"team": "red"}), json!(1)).await["code"], "error");
    assert_eq!(bob.subscribe(json!({"team": "blue"}), json!(2)).await["code"], "success");
    assert_eq!(bob_calls(), 1);
    // A control message may be a revocation: kept answers are dropped, and
    // its refresh asks the backend.
    assert_eq!(gw.trigger(&json!({"control": "refresh", "subscribed": [{"team": "blue"}]})).await, 202);
    common::eventually("bob's refresh called the backend", || async { bob_calls() == 2 }).await;
    let _ = backend.clone().answer("alice", Answer::rooms(json!([])));
    let mut c = gw.client("alice").await;
    assert_eq!(
        c.subscribe(json!({"team": "red"}), json!(1)).await["code"],
        "error",
        "the new answer, not the kept one"
    );
    assert_eq!(alice_calls(), 2);

    // Off by default: every connect calls the backend.
    let plain = TestGateway::with_backend(&backend, "").await;
    let before = bob_calls();
    for _ in 0..2 {
        plain.client("bob").await;
    }
    assert_eq!(bob_calls(), before + 2);
    assert_eq!(plain.metric("hightemplar_bootstrap_reused_total").await, 0.0);
}
