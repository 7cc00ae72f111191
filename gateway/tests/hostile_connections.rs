//! Regression tests of the hardening findings on connections (issue 11,
//! findings 1 and 5): what a client holds before its websocket opens has a
//! deadline and a cap, and the answers the docs promise reach the client
//! instead of being lost to a TCP reset. A real gateway on a loopback port,
//! a real HTTP backend, raw sockets and real websocket clients.

mod common;

use std::time::{Duration, Instant};

use common::{Answer, Client, RawSocket, TestBackend, TestGateway};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn backend() -> TestBackend {
    TestBackend::new().answer("alice", Answer::rooms(json!([{"user": "*"}])))
}

/// Reads until the gateway closes the socket; returns what it sent and
/// when. Panics if it is still open after `within`.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Err(_) => panic!("still open after {within:?} (got {:?})", String::from_utf8_lossy(&got)),
            Ok(Ok(0) | Err(_)) => return (got, Instant::now()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Silent sockets, clients that send their headers a line at a time, and
/// keep-alive connections that stay idle after a response are all closed
/// after `limits.handshakeTimeoutSeconds`, and counted.
#[tokio::test]
async fn silent_slow_and_idle_connections_are_closed_after_the_handshake_timeout() {
    let gw = TestGateway::with_backend(&backend(), "limits: {handshakeTimeoutSeconds: 1}").await;
    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(gw.addr).await.expect("connect"));
    }
    // Slowloris: a header line every 200 ms, never the blank line.
    let mut slow = Vec::new();
    for _ in 0..5 {
        let s = TcpStream::connect(gw.addr).await.expect("connect");
        slow.push(tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            let _ = w.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n").await;
            let trickle = async {
                for i in 0.. {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if w.write_all(format!("X-Pad-{i}: a\r\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
            };
            let mut buf = [0u8; 64];
            tokio::select! {
                () = trickle => {}
                _ = r.read(&mut buf) => {}
            }
            Instant::now()
        }));
    }
    // Keep-alive: one answered request, then nothing.
    let mut idle = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n").await.expect("request");
        let mut answer = [0u8; 256];
        let n = s.read(&mut answer).await.expect("answer");
        assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer[..n]));
        idle.push(s);
    }
    for s in silent.iter_mut().chain(idle.iter_mut()) {
        let (_, closed) = read_until_closed(s, Duration::from_secs(5)).await;
        assert!(closed - opened >= Duration::from_millis(900), "closed before the timeout");
    }
    for task in slow {
        let closed = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("a slowloris connection is closed despite its trickle")
            .expect("task");
        assert!(closed - opened < Duration::from_secs(4), "the trickle extended the deadline");
    }
    assert_eq!(gw.metric(r#"hightemplar_http_connections_closed_total{reason="header_timeout"}"#).await, 30.0);
    // The scrape itself is the one connection pending now.
    assert_eq!(gw.metric("hightemplar_http_connections_pending").await, 1.0);
}

/// Past `limits.maxPendingConnections`, a connection gets a 503 at once
/// and is closed; upgraded websockets do not count, and once the silent
/// sockets time out everything works again.
#[tokio::test]
async fn connections_past_the_pending_limit_get_503_and_sessions_are_untouched() {
    let gw =
        TestGateway::with_backend(&backend(), "limits: {handshakeTimeoutSeconds: 1.5, maxPendingConnections: 4}").await;
    let mut session = gw.client("alice").await;
    assert_eq!(session.subscribe(json!({"user": "1"}), json!(1)).await["code"], json!("success"));
    let metrics = gw.gateway.metrics.clone();
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(gw.addr).await.expect("connect"));
    }
    common::eventually("four connections pending", || async { metrics.http_connections_pending.get() == 4 }).await;
    let mut refused = TcpStream::connect(gw.addr).await.expect("connect");
    let (answer, _) = read_until_closed(&mut refused, Duration::from_secs(1)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let retry_after: u32 = answer
        .to_ascii_lowercase()
        .split("retry-after: ")
        .nth(1)
        .and_then(|rest| rest.split("\r\n").next()?.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in {answer}"));
    assert!((1..=5).contains(&retry_after), "{answer}");
    assert!(Client::connect(&gw.ws_url(Some("alice")), &[]).await.is_err(), "a new websocket past the limit");
    assert_eq!(gw.gateway.metrics.connections_open.get(), 1, "the open session is kept");
    for s in &mut silent {
        read_until_closed(s, Duration::from_secs(5)).await;
    }
    // Free again: triggers and new websockets work, and the old session got nothing wrong.
    assert_eq!(gw.trigger(&json!({"rooms": [{"user": "1"}], "data": "after"})).await, 202);
    let publish = session.recv_json().await;
    assert_eq!(publish["data"], json!("after"));
    gw.client("alice").await;
    assert!(gw.metric(r#"hightemplar_http_connections_closed_total{reason="pending_limit"}"#).await >= 2.0);
    assert_eq!(gw.metric("hightemplar_http_connections_limit").await, 4.0);
}

/// A client that pipelines requests and never reads the answers cannot
/// hold its connection: a write blocked for the handshake timeout closes it.
#[tokio::test]
async fn a_client_that_never_reads_its_responses_is_dropped() {
    let gw = TestGateway::with_backend(&backend(), "limits: {handshakeTimeoutSeconds: 1, sendBufferBytes: 4096}").await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let s = socket.connect(gw.addr).await.expect("connect");
    let (_reader, mut writer) = s.into_split();
    let writing = tokio::spawn(async move {
        let request = b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n";
        for _ in 0..20_000 {
            if writer.write_all(request).await.is_err() {
                return;
            }
        }
    });
    let metrics = gw.gateway.metrics.clone();
    common::eventually("the stalled connection is dropped", || async {
        metrics
            .http_connections_closed
            .get_or_create(&high_templar_gateway::metrics::Reason { reason: "write_stalled" })
            .get()
            == 1
    })
    .await;
    writing.abort();
}

/// Sends `bytes` in 64 KiB pieces 5 ms apart, like a client on a real
/// network; `Err` when a write fails (a client then reports the
/// connection as failed: 1006 in a browser, "connection reset" elsewhere).
async fn trickle(s: &mut TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let (piece, rest) = bytes.split_at(bytes.len().min(64 * 1024));
        s.write_all(piece).await?;
        bytes = rest;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// A message over `limits.maxMessageBytes` is answered with a 1009 close
/// frame that reaches the client, although the client was still sending.
#[tokio::test]
async fn an_oversize_message_gets_its_1009_close_frame() {
    let gw = TestGateway::with_backend(&backend(), "").await;
    let payload_len: u64 = 2 << 20;
    for attempt in 0..4 {
        let mut raw = RawSocket::open(&gw, "alice").await;
        // One masked text frame of 2 MiB.
        let mut frame = vec![0x81, 0x80 | 127];
        frame.extend(payload_len.to_be_bytes());
        frame.extend([1, 2, 3, 4]);
        frame.resize(frame.len() + payload_len as usize, b'[');
        let sent = trickle(&mut raw.0, &frame).await;
        assert!(sent.is_ok(), "attempt {attempt}: the gateway reset the connection: {sent:?}");
        let (opcode, payload) = raw.frame().await.expect("a close frame");
        assert_eq!(opcode, 8, "attempt {attempt}");
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1009, "attempt {attempt}");
    }
}

/// A refused large trigger body (413), and a large body with a wrong token
/// (401), are answered with their status: the client reads it instead of a
/// connection reset.
#[tokio::test]
async fn refused_large_bodies_get_their_status() {
    let gw = TestGateway::with_backend(&backend(), "trigger: {maxBodyBytes: 1048576}").await;
    let body = vec![b' '; 8 << 20];
    for attempt in 0..3 {
        for (token, expected) in [("test-token", "413"), ("wrong", "401")] {
            let mut s = TcpStream::connect(gw.addr).await.expect("connect");
            let head = format!(
                "POST /trigger HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).await.expect("head");
            let sent = trickle(&mut s, &body).await;
            assert!(sent.is_ok(), "attempt {attempt}, {expected}: the gateway reset the connection: {sent:?}");
            let (answer, _) = read_until_closed(&mut s, common::WAIT).await;
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with(&format!("HTTP/1.1 {expected}")), "attempt {attempt}: {answer}");
        }
    }
}
