//! Regression tests of the hardening findings (issue 11): what a hostile or
//! broken client sends is answered and bounded. A real gateway on a loopback
//! port, a real HTTP backend, real websocket clients.

mod common;

use common::{Answer, Client, RawSocket, TestBackend, TestGateway};
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

/// A masked client frame: `first` byte (FIN, RSV, opcode), payload.
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    assert!(payload.len() < 126);
    let mut f = vec![first, 0x80 | payload.len() as u8];
    f.extend(mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// RFC 6455 §7.1.7: a frame that breaks the protocol is answered with a
/// close frame (1002, or 1007 for text that is not UTF-8), not a silent
/// TCP close, and counted.
#[tokio::test]
async fn protocol_violations_get_their_close_codes() {
    let gw = TestGateway::with_backend(&backend(), "").await;
    let mut control_too_long = vec![0x89, 0x80 | 126, 0, 200, 1, 2, 3, 4];
    control_too_long.extend(std::iter::repeat_n(0u8, 200));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked client frame", vec![0x81, 0x02, b'h', b'i'], 1002),
        ("reserved opcode", masked(0x83, b"x"), 1002),
        ("RSV1 without an extension", masked(0xc1, b"ping"), 1002),
        ("control frame over 125 bytes", control_too_long, 1002),
        ("fragmented ping", masked(0x09, b"p"), 1002),
        ("continuation without a start", masked(0x80, b"x"), 1002),
        ("text that is not UTF-8", masked(0x81, &[0xff, 0xfe, 0xfd]), 1007),
    ];
    for (what, bytes, code) in &cases {
        let raw = RawSocket::open(&gw, "mallory").await;
        assert_eq!(raw.close_code_after(bytes).await, Some(*code), "{what}");
    }
    let counted = gw.metric(r#"hightemplar_disconnects_total{reason="protocol_error"}"#).await
        + gw.metric(r#"hightemplar_disconnects_total{reason="invalid_utf8"}"#).await;
    assert_eq!(counted, cases.len() as f64);
    // A well-formed masked frame still works on a raw socket.
    let mut raw = RawSocket::open(&gw, "mallory").await;
    use tokio::io::AsyncWriteExt;
    raw.0.write_all(&masked(0x81, b"ping")).await.expect("send");
    assert_eq!(raw.frame().await, Some((1, b"pong".to_vec())));
}

/// A client that never reads its (large) first frame is closed after the
/// idle timeout instead of holding its connection for ever.
#[tokio::test]
async fn a_client_that_never_reads_the_first_frame_is_dropped() {
    let rooms: Vec<serde_json::Value> = (0..9_000).map(|i| json!({"user": i, "team": "a-long-team-name"})).collect();
    let backend = TestBackend::new().answer("hoarder", Answer::rooms(json!(rooms)));
    // Small kernel buffers on both ends, so the frame cannot be absorbed by them.
    let gw = TestGateway::with_backend(&backend, "limits: {idleTimeoutSeconds: 2, sendBufferBytes: 4096}").await;
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let mut s = socket.connect(gw.addr).await.expect("connect");
    let request = format!(
        "GET /ws/?token=hoarder HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        gw.addr
    );
    s.write_all(request.as_bytes()).await.expect("upgrade request");
    common::eventually("the connection counted open", || async {
        gw.metric("hightemplar_connections_open").await == 1.0
    })
    .await;
    // Never read; the gateway gives up after the idle timeout.
    common::eventually("the stalled connection closed", || async {
        gw.metric("hightemplar_connections_open").await == 0.0
    })
    .await;
    let metrics = common::http_get(&gw.http_url("/metrics")).await.1;
    assert_eq!(gw.metric(r#"hightemplar_disconnects_total{reason="slow_consumer"}"#).await, 1.0, "{metrics}");
    drop(s);
}

/// A `POST /trigger` whose body stalls is answered 408 after
/// `trigger.bodyTimeoutSeconds`.
#[tokio::test]
async fn a_stalled_trigger_body_is_answered_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::with_backend(&backend(), "trigger: {bodyTimeoutSeconds: 1}").await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    let head = format!(
        "POST /trigger HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer test-token\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"rooms\":",
        gw.addr
    );
    s.write_all(head.as_bytes()).await.expect("send the head and part of the body");
    let started = std::time::Instant::now();
    let mut answer = String::new();
    tokio::time::timeout(common::WAIT, s.read_to_string(&mut answer)).await.expect("answered").expect("read");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900), "answered before the deadline");
    assert_eq!(gw.metric(r#"hightemplar_triggers_rejected_total{reason="body_timeout"}"#).await, 1.0);
}

/// 3.1.0's own load test subscribes one connection to 1 500 rooms: the
/// defaults take that (the memory budget, not a count, protects).
#[tokio::test]
async fn fifteen_hundred_subscriptions_on_one_connection_fit_the_defaults() {
    let gw = TestGateway::with_backend(&backend(), "").await;
    let mut c = gw.client("mallory").await;
    let frames: String = (0..1500)
        .map(|i| format!("{}\n", json!({"type": "subscribe", "room": {"user": i}, "requestId": format!("{i:036}")})))
        .collect();
    for line in frames.lines() {
        c.send(line).await;
    }
    for i in 0..1500 {
        let reply = c.recv_json().await;
        assert_eq!(reply["code"], "success", "subscription {i}: {reply}");
    }
}

/// The per-connection memory budget: subscriptions past it are refused,
/// unsubscribing gives room back, and a bootstrap answer whose rooms alone
/// exceed it refuses the user.
#[tokio::test]
async fn the_connection_memory_budget_bounds_what_one_client_holds() {
    let gw = TestGateway::with_backend(&backend(), "limits: {maxConnectionBytes: 4096}").await;
    let mut c = gw.client("mallory").await;
    let mut accepted = 0;
    for i in 0..100 {
        let reply = c.subscribe(json!({"user": i}), json!(format!("id-{i}"))).await;
        if reply["code"] == "success" {
            accepted += 1;
            continue;
        }
        assert_eq!(reply["message"], "too-many-subscriptions", "{reply}");
        break;
    }
    assert!((1..100).contains(&accepted), "{accepted} subscriptions within 4 KiB");
    assert_eq!(c.request(r#"{"type":"unsubscribe","requestId":"id-0"}"#).await["code"], "success");
    assert_eq!(c.subscribe(json!({"user": 1000}), json!("again")).await["code"], "success", "room given back");

    let rooms: Vec<serde_json::Value> = (0..200).map(|i| json!({"user": i, "name": "x".repeat(40)})).collect();
    let hoarder = TestBackend::new().answer("hoarder", Answer::rooms(json!(rooms)));
    let gw = TestGateway::with_backend(&hoarder, "limits: {maxConnectionBytes: 4096}").await;
    let mut c = Client::connect(&gw.ws_url(Some("hoarder")), &[]).await.expect("upgrade");
    assert_eq!(c.recv_json().await, json!({"is_authorized": false, "is_authenticated": false}));
    assert_eq!(c.until_end().await.1, common::Ended::Close(4401));
}

/// A bootstrap answer larger than `backend.maxBodyBytes` is not read past
/// the limit: the user is refused, and an answer within it is accepted.
#[tokio::test]
async fn bootstrap_answers_past_the_body_limit_refuse_the_user() {
    let padding = "x".repeat(8 * 1024);
    let big = format!(r#"{{"allowed_rooms": [{{"user": 1}}], "user": {{"bio": "{padding}"}}}}"#);
    let small = r#"{"allowed_rooms": [{"user": 1}]}"#;
    let backend = TestBackend::new().answer("big", Answer::body(&big)).answer("small", Answer::body(small));
    let gw = TestGateway::with_backend(&backend, "backend: {maxBodyBytes: 4096}").await;
    let mut c = Client::connect(&gw.ws_url(Some("big")), &[]).await.expect("upgrade");
    assert_eq!(c.recv_json().await["is_authorized"], json!(false));
    assert_eq!(c.until_end().await.1, common::Ended::Close(4401));
    assert_eq!(gw.metric(r#"hightemplar_auth_total{outcome="invalid_body"}"#).await, 1.0);
    let mut c = Client::connect(&gw.ws_url(Some("small")), &[]).await.expect("upgrade");
    assert_eq!(c.recv_json().await["is_authorized"], json!(true));
}

/// `backend.maxAllowedRooms`: an answer with more allowed rooms refuses
/// the user instead of being held.
#[tokio::test]
async fn too_many_allowed_rooms_refuse_the_user() {
    let rooms: Vec<serde_json::Value> = (0..11).map(|i| json!({"user": i})).collect();
    let hoarder = TestBackend::new().answer("hoarder", Answer::rooms(json!(rooms)));
    let gw = TestGateway::with_backend(&hoarder, "backend: {maxAllowedRooms: 10}").await;
    let mut c = Client::connect(&gw.ws_url(Some("hoarder")), &[]).await.expect("upgrade");
    assert_eq!(c.recv_json().await["is_authorized"], json!(false));
    assert_eq!(c.until_end().await.1, common::Ended::Close(4401));
    assert_eq!(gw.metric(r#"hightemplar_auth_total{outcome="invalid_body"}"#).await, 1.0);
}
