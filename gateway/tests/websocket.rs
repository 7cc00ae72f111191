//! Black-box tests of the websocket protocol (DESIGN.md §2): a real gateway
//! on a loopback port, a real HTTP backend, real websocket clients.

mod common;

use std::time::Duration;

use common::{Answer, Client, Ended, TestBackend, TestGateway, eventually, http_get};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn backend() -> TestBackend {
    TestBackend::new()
        .answer("alice", Answer::rooms(json!([{"target": "message", "user": "*"}, {"customer": 1, "warehouse": "*"}])))
        .answer("bob", Answer::rooms(json!([{"user": 2}])))
        .answer("everything", Answer::rooms(json!([{"customer": "*", "warehouse": "*"}])))
}

#[tokio::test]
async fn auth_frame_lists_allowed_rooms_and_headers_are_forwarded() {
    let backend = backend();
    let gw = TestGateway::with_backend(&backend, "").await;
    let mut c = Client::connect(
        &gw.ws_url(Some("alice")),
        &[
            ("Cookie", "sessionid=s3ss; csrftoken=csrf1"),
            ("User-Agent", "test-agent/1.0"),
            ("Host", "evil.example"),
            ("X-Other", "not-forwarded"),
        ],
    )
    .await
    .expect("connects");
    let auth = c.recv_json().await;
    assert_eq!(auth["is_authorized"], json!(true));
    assert_eq!(auth["is_authenticated"], json!(true));
    let mut rooms = auth["allowed_rooms"].as_array().expect("list").clone();
    rooms.sort_by_key(|r| r.to_string());
    assert_eq!(rooms, [json!({"customer": 1, "warehouse": "*"}), json!({"target": "message", "user": "*"})]);

    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    let h = &seen[0];
    let get = |k: &str| h.get(k).map(|v| v.to_str().expect("ascii").to_string());
    assert_eq!(get("cookie").as_deref(), Some("sessionid=s3ss; csrftoken=csrf1"));
    assert_eq!(get("user-agent").as_deref(), Some("test-agent/1.0"));
    assert_eq!(get("x-real-ip").as_deref(), Some("127.0.0.1"), "peer address when no X-Real-IP");
    assert_eq!(get("x-csrftoken").as_deref(), Some("csrf1"));
    assert_eq!(get("authorization").as_deref(), Some("Token alice"));
    assert_ne!(get("host").as_deref(), Some("evil.example"), "Host is never forwarded");
    assert_eq!(get("x-other"), None);
}

#[tokio::test]
async fn x_real_ip_and_extra_forwarding_rules() {
    let backend = backend();
    let gw = TestGateway::with_backend(
        &backend,
        "backend:\n  forward:\n    - {header: X-Tenant, from: {cookie: tenant}, format: 'tenant-{}'}\n    - {header: X-Fixed, from: {value: v1}}\n    - {header: X-Lang, from: [{query: lang}, {value: en}]}\nsecurity: {trustedProxies: [127.0.0.0/8]}\n",
    )
    .await;
    let mut c = Client::connect(
        &format!("{}&lang=nl", gw.ws_url(Some("bob"))),
        &[("X-Real-IP", "203.0.113.7"), ("Cookie", "tenant=acme")],
    )
    .await
    .expect("connects");
    c.recv_json().await;
    let h = &backend.seen()[0];
    let get = |k: &str| h.get(k).map(|v| v.to_str().expect("ascii").to_string());
    assert_eq!(get("x-real-ip").as_deref(), Some("203.0.113.7"));
    assert_eq!(get("x-tenant").as_deref(), Some("tenant-acme"));
    assert_eq!(get("x-fixed").as_deref(), Some("v1"));
    assert_eq!(get("x-lang").as_deref(), Some("nl"));
}

#[tokio::test]
async fn unix_socket_backend() {
    let dir = std::env::temp_dir().join(format!("ht-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("backend.sock");
    let _ = std::fs::remove_file(&path);
    let backend = backend();
    backend.serve_unix(&path).await;
    let config =
        common::test_config("http://backend.invalid/api/", &format!("backend: {{socket: '{}'}}", path.display()));
    let gw = TestGateway::start(config).await;
    let mut c = gw.client("bob").await;
    assert_eq!(c.subscribe(json!({"user": 2}), json!(1)).await, json!({"code": "success", "requestId": 1}));
    assert_eq!(backend.seen().len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Connects with `token` and returns the auth frame and how the connection ended.
async fn refused(gw: &TestGateway, token: &str) -> (Value, Ended) {
    let mut c = Client::connect(&gw.ws_url(Some(token)), &[]).await.expect("upgrade succeeds");
    let (texts, ended) = c.until_end().await;
    assert_eq!(texts.len(), 1, "exactly one frame before the close: {texts:?}");
    (serde_json::from_str(&texts[0]).expect("json"), ended)
}

#[tokio::test]
async fn backend_refusal_vs_backend_failure() {
    let backend = backend()
        .answer("forbidden", Answer::status(403))
        .answer("unauthorized", Answer::status(401))
        .answer("redirect", Answer::status(302))
        .answer("broken", Answer::status(500))
        .answer("unavailable", Answer::status(503))
        .answer("ratelimited", Answer::status(429))
        .answer("slow", Answer::rooms(json!([])).delayed(Duration::from_secs(3)))
        .answer("html", Answer::body("<html>login</html>"))
        .answer("badrooms", Answer::body(r#"{"allowed_rooms": [{"a": [1]}]}"#));
    let gw = TestGateway::with_backend(&backend, "backend: {timeoutSeconds: 0.5}").await;
    let refused_frame = json!({"is_authorized": false, "is_authenticated": false});
    for (token, code) in [
        ("forbidden", 4401),
        ("unauthorized", 4401),
        ("redirect", 4401),
        ("html", 4401),
        ("badrooms", 4401),
        ("nobody", 4401),
        ("broken", 1013),
        ("unavailable", 1013),
        ("ratelimited", 1013),
        ("slow", 1013),
    ] {
        let (frame, ended) = refused(&gw, token).await;
        assert_eq!(frame, refused_frame, "token {token}");
        assert_eq!(ended, Ended::Close(code), "token {token}");
    }
    assert_eq!(gw.metric(r#"hightemplar_auth_total{outcome="denied"}"#).await, 4.0);
    assert_eq!(gw.metric(r#"hightemplar_auth_total{outcome="invalid_body"}"#).await, 2.0);
    assert_eq!(gw.metric(r#"hightemplar_auth_total{outcome="unavailable"}"#).await, 4.0);
}

#[tokio::test]
async fn unreachable_backend_closes_with_try_again_later() {
    // A port that was just free: nothing listens there.
    let port = common::free_port();
    let gw = TestGateway::start(common::test_config(&format!("http://127.0.0.1:{port}/api/"), "")).await;
    let (frame, ended) = refused(&gw, "alice").await;
    assert_eq!(frame, json!({"is_authorized": false, "is_authenticated": false}));
    assert_eq!(ended, Ended::Close(1013));
}

#[tokio::test]
async fn every_client_frame_of_the_protocol_table() {
    let gw = TestGateway::with_backend(&backend(), "limits: {maxSubscriptionsPerConnection: 2}").await;
    let mut c = gw.client("alice").await;

    c.send("ping").await;
    assert_eq!(c.recv_text().await, "pong");

    let ok = |r: Value| json!({"code": "success", "requestId": r});
    let err = |m: &str, r: Value| json!({"code": "error", "message": m, "requestId": r});
    assert_eq!(c.subscribe(json!({"target": "message", "user": 5}), json!("a")).await, ok(json!("a")));
    assert_eq!(
        c.subscribe(json!({"target": "message", "user": 6}), json!("a")).await,
        err("request-id-in-use", json!("a"))
    );
    assert_eq!(c.subscribe(json!({"target": "other", "user": 5}), json!("b")).await, err("room-not-found", json!("b")));
    assert_eq!(c.subscribe(json!({"user": 5}), json!("b")).await, err("room-not-found", json!("b")));
    assert_eq!(c.subscribe(json!([1]), json!("b")).await, err("invalid-room", json!("b")));
    assert_eq!(c.subscribe(json!({"user": {"id": 1}}), json!("b")).await, err("invalid-room", json!("b")));
    assert_eq!(
        c.request(r#"{"type":"subscribe","room":{"user":1,"target":"message"}}"#).await,
        json!({"code": "error", "message": "no-request-id"})
    );
    // Numbers are echoed as numbers, and differ from the same digits as a string.
    assert_eq!(c.subscribe(json!({"customer": 1, "warehouse": 9}), json!(7)).await, ok(json!(7)));
    assert_eq!(
        c.subscribe(json!({"customer": 1, "warehouse": 8}), json!("7")).await,
        err("too-many-subscriptions", json!("7"))
    );

    assert_eq!(c.request(r#"{"type":"unsubscribe","requestId":7}"#).await, ok(json!(7)));
    assert_eq!(c.request(r#"{"type":"unsubscribe","requestId":7}"#).await, err("not-subscribed", json!(7)));
    assert_eq!(c.request(r#"{"type":"unsubscribe","requestId":"7"}"#).await, err("not-subscribed", json!("7")));
    assert_eq!(c.request(r#"{"type":"unsubscribe"}"#).await, json!({"code": "error", "message": "no-request-id"}));

    let status = c.request(r#"{"type":"status"}"#).await;
    assert_eq!(status["open_connections"], json!(1), "{status}");
    assert_eq!(status["num_rooms"], json!(1), "{status}");
    assert!(status["online_since"].as_str().is_some_and(|s| s.ends_with('Z')), "{status}");

    assert_eq!(c.request("not json").await, json!({"code": "error", "message": "non-json-message"}));
    assert_eq!(c.request(r#"{"type":"dance"}"#).await, json!({"code": "error", "message": "message-type-not-allowed"}));
    assert_eq!(c.request(r#"{"room":{}}"#).await, json!({"code": "error", "message": "message-type-not-allowed"}));
    // The connection is still fine after all those errors.
    c.send("ping").await;
    assert_eq!(c.recv_text().await, "pong");
}

#[tokio::test]
async fn pipelined_frames_are_all_answered_in_order() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let gw = TestGateway::with_backend(&backend(), "limits: {maxSubscriptionsPerConnection: 1000}").await;
    let mut c = gw.client("alice").await;
    // 600 frames written at once: the gateway answers what it has read in
    // batches (one flush each, at most 256 frames); none may be lost or reordered.
    for i in 0..600 {
        let frame = json!({"type": "subscribe", "room": {"target": "message", "user": i}, "requestId": i});
        c.ws.feed(Message::text(frame.to_string())).await.expect("feed");
    }
    c.ws.feed(Message::text("ping")).await.expect("feed");
    c.ws.feed(Message::text(r#"{"type":"unsubscribe","requestId":0}"#)).await.expect("feed");
    c.ws.flush().await.expect("flush");
    for i in 0..600 {
        assert_eq!(c.recv_json().await, json!({"code": "success", "requestId": i}));
    }
    assert_eq!(c.recv_text().await, "pong");
    assert_eq!(c.recv_json().await, json!({"code": "success", "requestId": 0}));
    assert_eq!(
        gw.trigger(
            &json!({"rooms": [{"target": "message", "user": 0}, {"target": "message", "user": 599}], "data": 1})
        )
        .await,
        202
    );
    assert_eq!(c.recv_json().await, json!({"type": "publish", "data": 1, "requestId": 599}));
    c.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn status_can_be_switched_off() {
    let gw = TestGateway::with_backend(&backend(), "clientStatus: {enabled: false}").await;
    let mut c = gw.client("bob").await;
    assert_eq!(
        c.request(r#"{"type":"status","requestId":1}"#).await,
        json!({"code": "error", "message": "message-type-not-allowed", "requestId": 1})
    );
}

#[tokio::test]
async fn wildcard_delivery_in_both_directions_with_one_copy_each() {
    let gw = TestGateway::with_backend(&backend(), "").await;
    let mut wide = gw.client("everything").await;
    let mut narrow = gw.client("alice").await;
    assert_eq!(wide.subscribe(json!({"customer": "*", "warehouse": "*"}), json!("w")).await["code"], "success");
    assert_eq!(narrow.subscribe(json!({"customer": 1, "warehouse": 3}), json!("n3")).await["code"], "success");
    assert_eq!(narrow.subscribe(json!({"customer": 1, "warehouse": "*"}), json!("n*")).await["code"], "success");

    // Concrete trigger: reaches the wildcard subscriptions and the exact one.
    assert_eq!(gw.trigger(&json!({"rooms": [{"customer": 1, "warehouse": 3}], "data": {"n": 1}})).await, 202);
    assert_eq!(wide.recv_json().await, json!({"type": "publish", "data": {"n": 1}, "requestId": "w"}));
    let mut got = vec![narrow.recv_json().await, narrow.recv_json().await];
    got.sort_by_key(|v| v["requestId"].to_string());
    assert_eq!(
        got,
        [
            json!({"type": "publish", "data": {"n": 1}, "requestId": "n*"}),
            json!({"type": "publish", "data": {"n": 1}, "requestId": "n3"})
        ]
    );

    // Wildcard trigger: reaches concrete subscriptions too.
    assert_eq!(gw.trigger(&json!({"rooms": [{"customer": "*", "warehouse": 3}], "data": 2})).await, 202);
    assert_eq!(wide.recv_json().await["data"], json!(2));
    let mut ids = vec![narrow.recv_json().await["requestId"].clone(), narrow.recv_json().await["requestId"].clone()];
    ids.sort_by_key(|v| v.to_string());
    assert_eq!(ids, [json!("n*"), json!("n3")]);

    // Several rooms matching one subscription: one copy.
    assert_eq!(
        gw.trigger(&json!({"rooms": [{"customer": 2, "warehouse": 1}, {"customer": 2, "warehouse": 2}, {"customer": "*", "warehouse": "*"}], "data": 3}))
            .await,
        202
    );
    assert_eq!(wide.recv_json().await, json!({"type": "publish", "data": 3, "requestId": "w"}));
    let mut ids = vec![narrow.recv_json().await["requestId"].clone(), narrow.recv_json().await["requestId"].clone()];
    ids.sort_by_key(|v| v.to_string());
    assert_eq!(ids, [json!("n*"), json!("n3")]);
    wide.expect_silence(Duration::from_millis(300)).await;
    narrow.expect_silence(Duration::from_millis(10)).await;

    // Not for `narrow`: different value, different key set, string vs
    // number. The (*, *) subscription still gets the two of its shape.
    for room in
        [json!({"customer": 2, "warehouse": 3}), json!({"customer": 1}), json!({"customer": "1", "warehouse": 3})]
    {
        assert_eq!(gw.trigger(&json!({"rooms": [room], "data": 0})).await, 202);
    }
    narrow.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(wide.recv_json().await["data"], json!(0));
    assert_eq!(wide.recv_json().await["data"], json!(0));
    wide.expect_silence(Duration::from_millis(10)).await;

    // After unsubscribe: nothing more for that subscription.
    assert_eq!(narrow.request(r#"{"type":"unsubscribe","requestId":"n*"}"#).await["code"], "success");
    assert_eq!(gw.trigger(&json!({"rooms": [{"customer": 1, "warehouse": 3}], "data": 4})).await, 202);
    assert_eq!(narrow.recv_json().await, json!({"type": "publish", "data": 4, "requestId": "n3"}));
    narrow.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(wide.recv_json().await["data"], json!(4));
}

#[tokio::test]
async fn disconnect_releases_subscriptions() {
    let gw = TestGateway::with_backend(&backend(), "").await;
    let mut c = gw.client("bob").await;
    assert_eq!(c.subscribe(json!({"user": 2}), json!(1)).await["code"], "success");
    assert_eq!(gw.metric("hightemplar_subscriptions_active").await, 1.0);
    drop(c);
    eventually("subscriptions released", || async {
        gw.metric("hightemplar_subscriptions_active").await == 0.0
            && gw.metric("hightemplar_connections_open").await == 0.0
    })
    .await;
    assert_eq!(gw.metric("hightemplar_rooms_active").await, 0.0);
}

#[tokio::test]
async fn oversized_frame_closes_with_1009() {
    let gw = TestGateway::with_backend(&backend(), "limits: {maxMessageBytes: 1024}").await;
    let mut c = gw.client("bob").await;
    // Just under the limit is fine.
    let fits = format!(r#"{{"type":"status","pad":"{}"}}"#, "x".repeat(900));
    assert_eq!(c.request(&fits).await["code"], "success");
    c.send(&"x".repeat(2000)).await;
    let (_, ended) = c.until_end().await;
    assert_eq!(ended, Ended::Close(1009));
}

#[tokio::test]
async fn idle_connection_is_closed_and_pings_are_sent() {
    let gw = TestGateway::with_backend(&backend(), "limits: {idleTimeoutSeconds: 0.6, pingIntervalSeconds: 0.2}").await;
    let mut c = gw.client("bob").await;
    // A server ping arrives first (the client library answers it itself).
    let mut saw_ping = false;
    let ended = loop {
        match tokio::time::timeout(common::WAIT, futures_util::StreamExt::next(&mut c.ws)).await.expect("frame") {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) => saw_ping = true,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => break u16::from(f.code),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(saw_ping, "server pings before the idle timeout");
    // The client library answered every ping with a pong, yet sent no data
    // frame: pongs do not count as activity (see docs/protocol.md).
    assert_eq!(ended, 1000);
}

#[tokio::test]
async fn text_frames_keep_a_connection_alive() {
    let gw = TestGateway::with_backend(&backend(), "limits: {idleTimeoutSeconds: 0.5}").await;
    let mut c = gw.client("bob").await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.send("ping").await;
        assert_eq!(c.recv_text().await, "pong");
    }
}

#[tokio::test]
async fn too_many_connections_are_refused_before_upgrade() {
    let gw = TestGateway::with_backend(&backend(), "limits: {maxConnections: 1}").await;
    let _first = gw.client("bob").await;
    let second = Client::connect(&gw.ws_url(Some("bob")), &[]).await;
    match second {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("expected HTTP 503, got {:?}", other.map(|_| ())),
    }
    assert_eq!(gw.metric(r#"hightemplar_connections_refused_total{reason="max_connections"}"#).await, 1.0);
}

#[tokio::test]
async fn slow_consumer_is_disconnected_and_others_get_everything() {
    let gw = TestGateway::with_backend(&backend(), "limits: {outboundQueue: 8}").await;
    let mut healthy = gw.client("bob").await;
    let mut slow = gw.client("bob").await;
    assert_eq!(healthy.subscribe(json!({"user": 2}), json!("h")).await["code"], "success");
    assert_eq!(slow.subscribe(json!({"user": 2}), json!("s")).await["code"], "success");
    // The slow client stops reading. 256 KiB triggers fill its socket
    // buffers, then its queue, while the healthy client reads each one.
    let pad = "x".repeat(256 * 1024);
    let mut sent = 0;
    for i in 0..400 {
        assert_eq!(gw.trigger(&json!({"rooms": [{"user": 2}], "data": {"i": i, "pad": pad}})).await, 202);
        let got = healthy.recv_json().await;
        assert_eq!(got["data"]["i"], json!(i), "healthy client gets every trigger, in order");
        sent += 1;
        if gw.metric(r#"hightemplar_disconnects_total{reason="slow_consumer"}"#).await >= 1.0 {
            break;
        }
    }
    assert!(sent < 400, "the slow consumer was never disconnected");
    assert!(gw.metric(r#"hightemplar_messages_dropped_total{reason="slow_consumer"}"#).await >= 1.0);
    // The slow client, reading at last, finds its connection ended.
    let (texts, ended) = slow.until_end().await;
    assert!(texts.len() < sent, "the slow client missed some messages");
    assert!(matches!(ended, Ended::Close(1013) | Ended::Dropped), "{ended:?}");
    // The healthy one carries on.
    assert_eq!(gw.trigger(&json!({"rooms": [{"user": 2}], "data": "after"})).await, 202);
    assert_eq!(healthy.recv_json().await["data"], json!("after"));
}

#[tokio::test]
async fn a_client_that_pauses_gets_every_frame_once_in_order() {
    // Deliveries are written through to an idle socket by the fan-out,
    // queued once the socket would block (a 4 KiB send buffer, 9.6 MB
    // against a receive buffer of at most 6 MB), and written by the
    // session when the client reads again; then written through again.
    for write_through in [true, false] {
        pausing_client_gets_every_frame(write_through).await;
    }
}

async fn pausing_client_gets_every_frame(write_through: bool) {
    let config =
        format!("limits: {{outboundQueue: 1024, sendBufferBytes: 4096}}\nfanout: {{writeThrough: {write_through}}}");
    let gw = TestGateway::with_backend(&backend(), &config).await;
    let mut paused = gw.client("bob").await;
    assert_eq!(paused.subscribe(json!({"user": 2}), json!("p")).await["code"], "success");
    let pad = "x".repeat(16 * 1024);
    for i in 0..600 {
        assert_eq!(gw.trigger(&json!({"rooms": [{"user": 2}], "data": {"i": i, "pad": pad}})).await, 202);
    }
    for i in 0..600 {
        let got = paused.recv_json().await;
        assert_eq!((got["requestId"].clone(), got["data"]["i"].clone()), (json!("p"), json!(i)), "in order, once");
    }
    for i in 600..610 {
        assert_eq!(gw.trigger(&json!({"rooms": [{"user": 2}], "data": {"i": i}})).await, 202);
        assert_eq!(paused.recv_json().await["data"]["i"], json!(i));
    }
    paused.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(gw.metric(r#"hightemplar_messages_dropped_total{reason="slow_consumer"}"#).await, 0.0);
    let written = gw.metric("hightemplar_messages_written_through_total").await;
    if write_through {
        // The first ones at least, and the last ten (the client reads each).
        assert!((10.0..610.0).contains(&written), "some written through, some queued: {written}");
    } else {
        assert_eq!(written, 0.0);
    }
}

#[tokio::test]
async fn pings_between_frames_written_through_leave_every_frame_whole() {
    // The gateway answers each ping with a pong written by tungstenite,
    // while the fan-out writes publish frames straight to the socket; a
    // 4 KiB send buffer makes most of those writes partial. A pong inside
    // a publish frame (or a publish frame inside a pong) breaks the
    // client's framing, and the client reports a protocol error.
    let config = "limits: {outboundQueue: 1024, sendBufferBytes: 4096}\nfanout: {writeThrough: true}";
    let gw = TestGateway::with_backend(&backend(), config).await;
    let mut client = gw.client("bob").await;
    assert_eq!(client.subscribe(json!({"user": 2}), json!("p")).await["code"], "success");
    // 9.6 MB against a receive buffer of at most 6 MB: the socket fills.
    let pad = "x".repeat(16 * 1024);
    for i in 0..600u32 {
        client.ws.send(Message::Ping(i.to_be_bytes().to_vec().into())).await.expect("ping");
        assert_eq!(gw.trigger(&json!({"rooms": [{"user": 2}], "data": {"i": i, "pad": pad}})).await, 202);
    }
    let mut next = 0;
    while next < 600 {
        let msg = tokio::time::timeout(Duration::from_secs(10), client.ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("stream open")
            .unwrap_or_else(|e| panic!("frame {next}: {e}"));
        match msg {
            Message::Text(t) => {
                let got: Value = serde_json::from_str(&t).expect("JSON");
                assert_eq!((got["requestId"].clone(), got["data"]["i"].clone()), (json!("p"), json!(next)), "in order");
                next += 1;
            }
            Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // Pongs came in between (tungstenite answers the latest ping it has
    // not answered yet); the connection still answers one.
    assert!(client_has_pong(&mut client).await, "no pong came back");
    assert!(gw.metric("hightemplar_messages_written_through_total").await >= 1.0);
}

/// Sends one more ping and waits for its pong.
async fn client_has_pong(client: &mut Client) -> bool {
    client.ws.send(Message::Ping(b"last".to_vec().into())).await.expect("ping");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), client.ws.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) => return &p[..] == b"last",
            Ok(Some(Ok(_))) => continue,
            _ => return false,
        }
    }
}

/// Sends 60 triggers of 16 KiB (≈ 1 MiB) to a client that reads nothing;
/// true when the gateway closed it as a slow consumer.
async fn stalled_client_is_closed(limits: &str) -> bool {
    let gw = TestGateway::with_backend(&backend(), &format!("limits: {{outboundQueue: 8{limits}}}")).await;
    let mut stalled = gw.client("bob").await;
    assert_eq!(stalled.subscribe(json!({"user": 2}), json!("s")).await["code"], "success");
    let pad = "x".repeat(16 * 1024);
    for i in 0..60 {
        assert_eq!(gw.trigger(&json!({"rooms": [{"user": 2}], "data": {"i": i, "pad": pad}})).await, 202);
    }
    let closed = r#"hightemplar_disconnects_total{reason="slow_consumer"}"#;
    for _ in 0..50 {
        if gw.metric(closed).await >= 1.0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn a_small_send_buffer_bounds_what_a_stalled_client_holds() {
    // With a 4 KiB kernel send buffer the ≈ 1 MiB cannot all be parked in
    // the kernel: the queue fills and the client is closed. With kernel
    // autotuning (the default) the same megabyte fits in socket buffers.
    assert!(stalled_client_is_closed(", sendBufferBytes: 4096").await, "closed with a 4 KiB send buffer");
    assert!(!stalled_client_is_closed("").await, "kernel autotuning absorbs 1 MiB (so the test above means something)");
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let gw = TestGateway::with_backend(&backend(), "").await;
    assert_eq!(http_get(&gw.http_url("/healthz")).await.0, 200);
    assert_eq!(http_get(&gw.http_url("/readyz")).await.0, 200);
    let _c = gw.client("bob").await;
    let (status, text) = http_get(&gw.http_url("/metrics")).await;
    assert_eq!(status, 200);
    for family in [
        "hightemplar_connections_open",
        "hightemplar_connections_total",
        "hightemplar_auth_total",
        "hightemplar_subscriptions_active",
        "hightemplar_rooms_active",
        "hightemplar_messages_delivered_total",
        "hightemplar_backend_request_duration_seconds_bucket",
        "hightemplar_fanout_duration_seconds_bucket",
    ] {
        assert!(text.contains(family), "/metrics lacks {family}:\n{text}");
    }
    assert_eq!(common::metric_value(&text, "hightemplar_connections_open"), 1.0);
    gw.shutdown().await;
}
