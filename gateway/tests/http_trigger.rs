//! `POST /trigger` (DESIGN.md §3 "HTTP"): authentication, validation,
//! limits, and delivery through the embedded broker.

mod common;

use common::{Answer, TestBackend, TestGateway, http_post};
use serde_json::{Value, json};

fn backend() -> TestBackend {
    TestBackend::new().answer("bob", Answer::rooms(json!([{"user": 2}])))
}

/// RFC 7235 §2.1: the scheme is case-insensitive (`bearer`, as some HTTP
/// clients send it); the token is not.
#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let gw = TestGateway::with_backend(&backend(), "").await;
    let url = gw.http_url("/trigger");
    let good = br#"{"rooms":[{"user":2}],"data":1}"#.to_vec();
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let (status, body) =
            common::http_post_authorized(&url, Some(format!("{scheme} test-token")), good.clone()).await;
        assert_eq!(status, 202, "{scheme}: {body}");
    }
    let (status, _) = common::http_post_authorized(&url, Some("bearer TEST-TOKEN".into()), good.clone()).await;
    assert_eq!(status, 401, "the token itself is compared exactly");
    let (status, _) = common::http_post_authorized(&url, Some("Basic test-token".into()), good).await;
    assert_eq!(status, 401, "another scheme");
}

#[tokio::test]
async fn trigger_auth_and_validation_errors() {
    let gw = TestGateway::with_backend(&backend(), "trigger: {maxBodyBytes: 4096}").await;
    let url = gw.http_url("/trigger");
    let good = br#"{"rooms":[{"user":2}],"data":1}"#.to_vec();

    let (status, _) = http_post(&url, None, good.clone()).await;
    assert_eq!(status, 401, "no token");
    let (status, body) = http_post(&url, Some("wrong-token"), good.clone()).await;
    assert_eq!(status, 401, "wrong token");
    assert!(!body.contains("test-token"), "the error never echoes the token: {body}");

    let (status, body) = http_post(&url, Some("test-token"), b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    let err: Value = serde_json::from_str(&body).expect("JSON error body");
    assert!(err["error"].as_str().is_some_and(|e| e.contains("not a JSON object")), "{err}");

    let (status, body) = http_post(&url, Some("test-token"), br#"{"rooms":[{"user":[2]}]}"#.to_vec()).await;
    assert_eq!(status, 400);
    let err: Value = serde_json::from_str(&body).expect("JSON error body");
    assert_eq!(
        err["error"],
        json!(r#"rooms[0]: room key "user" has a value that is not a string, number, boolean or null"#)
    );

    let (status, _) = http_post(&url, Some("test-token"), br#"{"data":1}"#.to_vec()).await;
    assert_eq!(status, 400, "rooms missing");

    let big = format!(r#"{{"rooms":[{{"user":2}}],"data":"{}"}}"#, "x".repeat(5000));
    let (status, body) = http_post(&url, Some("test-token"), big.into_bytes()).await;
    assert_eq!(status, 413, "{body}");

    let (status, _) = http_post(&url, Some("test-token"), good.clone()).await;
    assert_eq!(status, 202);
    let (status, _) = http_post(&gw.http_url("/trigger/"), Some("test-token"), good).await;
    assert_eq!(status, 202, "trailing slash");

    assert_eq!(gw.metric(r#"hightemplar_triggers_rejected_total{reason="unauthorized"}"#).await, 2.0);
    assert_eq!(gw.metric(r#"hightemplar_triggers_rejected_total{reason="not_json"}"#).await, 1.0);
    assert_eq!(gw.metric(r#"hightemplar_triggers_rejected_total{reason="invalid_room"}"#).await, 1.0);
    assert_eq!(gw.metric(r#"hightemplar_triggers_rejected_total{reason="too_large"}"#).await, 1.0);
    assert_eq!(gw.metric(r#"hightemplar_triggers_total{source="http"}"#).await, 2.0);
}

#[tokio::test]
async fn trigger_endpoint_is_absent_without_a_token() {
    let url = backend().serve().await;
    let mut config = common::test_config(&url, "");
    config.trigger.token = None;
    let gw = TestGateway::start(config).await;
    let (status, _) = http_post(&gw.http_url("/trigger"), Some("test-token"), br#"{"rooms":[]}"#.to_vec()).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn accepted_trigger_is_delivered_with_data_verbatim() {
    let gw = TestGateway::with_backend(&backend(), "").await;
    let mut c = gw.client("bob").await;
    assert_eq!(c.subscribe(json!({"user": 2}), json!("r")).await["code"], "success");
    let data = json!({"nested": {"list": [1, "two", null, true, 3.5]}, "unicode": "héllo ✓"});
    assert_eq!(gw.trigger(&json!({"rooms": [{"user": 2}], "data": data})).await, 202);
    assert_eq!(c.recv_json().await, json!({"type": "publish", "data": data, "requestId": "r"}));
    assert_eq!(gw.metric("hightemplar_messages_delivered_total").await, 1.0);
}
