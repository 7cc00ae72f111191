//! Regression tests of the hardening findings (issue 11): what a hostile or
//! broken client sends is answered and bounded. A real gateway on a loopback
//! port, a real HTTP backend, real websocket clients.

mod common;

use common::{Answer, Client, TestBackend, TestGateway};
use serde_json::json;
use tokio_tungstenite::tungstenite::Error as WsError;

fn backend() -> TestBackend {
    TestBackend::new().answer("mallory", Answer::rooms(json!([{"user": "*"}])))
}

/// A `requestId` is echoed as its original JSON text, in replies and in
/// publishes: numbers keep their spelling and precision.
#[tokio::test]
async fn request_ids_are_echoed_exactly_as_written() {
    let gw = TestGateway::with_backend(&backend(), "").await;
    let mut c = gw.client("mallory").await;
    for (n, raw) in ["18446744073709551616", "1e2", "-0", "1.50"].iter().enumerate() {
        c.send(&format!(r#"{{"type":"subscribe","room":{{"user":{n}}},"requestId":{raw}}}"#)).await;
        assert_eq!(c.recv_text().await, format!(r#"{{"code":"success","requestId":{raw}}}"#));
        assert_eq!(gw.trigger(&json!({"rooms": [{"user": n}], "data": 1})).await, 202);
        assert_eq!(c.recv_text().await, format!(r#"{{"type":"publish","data":1,"requestId":{raw}}}"#));
    }
    c.send(r#"{"type":"unsubscribe","requestId":1e2}"#).await;
    assert_eq!(c.recv_text().await, r#"{"code":"success","requestId":1e2}"#);
    c.send(r#"{"type":"unsubscribe","requestId":100}"#).await;
    assert_eq!(c.recv_text().await, r#"{"code":"error","message":"not-subscribed","requestId":100}"#);
}

/// Long `requestId`s are refused (`invalid-request-id`, not echoed) and
/// nothing is kept for them: one connection cannot hold megabytes of ids.
#[tokio::test]
async fn long_request_ids_are_refused_and_not_kept() {
    let gw = TestGateway::with_backend(&backend(), "").await;
    let mut c = gw.client("mallory").await;
    let long = "x".repeat(60_000);
    for n in 0..20 {
        let frame = json!({"type": "subscribe", "room": {"user": n}, "requestId": long}).to_string();
        assert_eq!(c.request(&frame).await, json!({"code": "error", "message": "invalid-request-id"}));
    }
    let frame = json!({"type": "unsubscribe", "requestId": long}).to_string();
    assert_eq!(c.request(&frame).await, json!({"code": "error", "message": "invalid-request-id"}));
    let status = c.request(r#"{"type":"status"}"#).await;
    assert_eq!(status["num_subscriptions"], json!(0), "{status}");
    // A UUID, as 3.x clients send, fits the default limit.
    let uuid = "0b4e7a0e-5e2b-4a3c-9c1e-7f0f3a6b2d11";
    assert_eq!(c.subscribe(json!({"user": 1}), json!(uuid)).await, json!({"code": "success", "requestId": uuid}));
}

/// The limit is configurable.
#[tokio::test]
async fn the_request_id_limit_is_configurable() {
    let gw = TestGateway::with_backend(&backend(), "limits: {maxRequestIdBytes: 8}").await;
    let mut c = gw.client("mallory").await;
    assert_eq!(c.subscribe(json!({"user": 1}), json!("123456")).await["code"], "success");
    let refused = c.subscribe(json!({"user": 2}), json!("1234567")).await;
    assert_eq!(refused, json!({"code": "error", "message": "invalid-request-id"}));
}

/// The HTTP status of an upgrade to `gw` as `mallory` with `origin`;
/// 101 when it went through.
async fn upgrade_status(gw: &TestGateway, origin: Option<&str>) -> u16 {
    let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
    match Client::connect(&gw.ws_url(Some("mallory")), &headers).await {
        Ok(_) => 101,
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade failed otherwise: {e}"),
    }
}

/// Cross-site websocket hijacking: a page of another site, in the victim's
/// browser (cookies attached), is refused with 403 before the backend is
/// asked anything; same-origin pages and non-browser clients connect.
#[tokio::test]
async fn other_sites_cannot_open_a_websocket_with_the_users_cookies() {
    let backend = backend();
    let gw = TestGateway::with_backend(&backend, "").await;
    assert_eq!(upgrade_status(&gw, Some("https://evil.example")).await, 403);
    assert_eq!(upgrade_status(&gw, Some("null")).await, 403);
    assert_eq!(upgrade_status(&gw, Some(&format!("http://{}.evil.example", gw.addr.ip()))).await, 403);
    assert!(backend.seen().is_empty(), "the backend was called for a refused origin");
    assert_eq!(gw.metric(r#"hightemplar_connections_refused_total{reason="origin"}"#).await, 3.0);
    assert_eq!(upgrade_status(&gw, Some(&format!("http://{}", gw.addr))).await, 101, "same origin");
    assert_eq!(upgrade_status(&gw, None).await, 101, "no Origin: not a browser");
}

#[tokio::test]
async fn allowed_origins_lists_other_sites_and_star_turns_the_check_off() {
    let gw = TestGateway::with_backend(
        &backend(),
        r#"security: {allowedOrigins: ["https://app.example.com", "https://*.example.org"]}"#,
    )
    .await;
    assert_eq!(upgrade_status(&gw, Some("https://app.example.com")).await, 101);
    assert_eq!(upgrade_status(&gw, Some("https://a.b.example.org")).await, 101);
    assert_eq!(upgrade_status(&gw, Some("https://example.org")).await, 403);
    assert_eq!(upgrade_status(&gw, Some("https://app.example.com.evil.example")).await, 403);
    let open = TestGateway::with_backend(&backend(), r#"security: {allowedOrigins: ["*"]}"#).await;
    assert_eq!(upgrade_status(&open, Some("https://evil.example")).await, 101);
}

/// `X-Real-IP` and `X-Forwarded-For` from a client that is not one of the
/// `security.trustedProxies` are not believed: the backend gets the TCP
/// peer's address, whatever the client wrote.
#[tokio::test]
async fn clients_cannot_choose_the_address_the_backend_sees() {
    let backend = backend();
    let gw = TestGateway::with_backend(&backend, "security: {trustedProxies: [10.0.0.0/8]}").await;
    let spoofed = [("X-Real-IP", "203.0.113.7"), ("X-Forwarded-For", "203.0.113.8")];
    let mut c = Client::connect(&gw.ws_url(Some("mallory")), &spoofed).await.expect("connects");
    c.recv_json().await;
    let seen = backend.seen();
    assert_eq!(seen[0].get("x-real-ip").and_then(|v| v.to_str().ok()), Some("127.0.0.1"));
}
