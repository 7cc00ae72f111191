//! Test harness: a real HTTP backend (an axum app) that records what it
//! receives, a real gateway server on an ephemeral loopback port, and real
//! websocket clients (tokio-tungstenite).

#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use futures_util::{SinkExt, StreamExt};
use high_templar_gateway::config::Config;
use high_templar_gateway::gateway::Gateway;
use high_templar_gateway::server::Server;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// What the test backend answers for one token.
#[derive(Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub body: String,
    pub delay: Duration,
}

impl Answer {
    pub fn rooms(rooms: Value) -> Answer {
        Answer {
            status: StatusCode::OK,
            body: json!({ "allowed_rooms": rooms, "user": {"id": 1} }).to_string(),
            delay: Duration::ZERO,
        }
    }
    pub fn status(status: u16) -> Answer {
        Answer { status: StatusCode::from_u16(status).expect("valid status"), body: "{}".into(), delay: Duration::ZERO }
    }
    pub fn body(body: &str) -> Answer {
        Answer { status: StatusCode::OK, body: body.into(), delay: Duration::ZERO }
    }
    pub fn delayed(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }
}

/// A real HTTP backend answering `GET /api/bootstrap/` per token
/// (`Authorization: Token <t>`), recording every request's headers.
#[derive(Clone, Default)]
pub struct TestBackend {
    answers: Arc<Mutex<HashMap<String, Answer>>>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    /// Requests being answered now, and the most at once so far.
    in_flight: Arc<(std::sync::atomic::AtomicUsize, std::sync::atomic::AtomicUsize)>,
}

impl TestBackend {
    pub fn new() -> TestBackend {
        TestBackend::default()
    }

    /// Answer `answer` to requests carrying token `token`.
    pub fn answer(self, token: &str, answer: Answer) -> TestBackend {
        self.answers.lock().expect("lock").insert(token.into(), answer);
        self
    }

    /// Headers of every bootstrap request received so far.
    pub fn seen(&self) -> Vec<HeaderMap> {
        self.seen.lock().expect("lock").clone()
    }

    /// The most bootstrap requests it was answering at once.
    pub fn max_in_flight(&self) -> usize {
        self.in_flight.1.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn router(&self) -> Router {
        let backend = self.clone();
        Router::new().route(
            "/api/bootstrap/",
            axum::routing::get(move |headers: HeaderMap| {
                let backend = backend.clone();
                async move {
                    backend.seen.lock().expect("lock").push(headers.clone());
                    let token = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Token "))
                        .unwrap_or("")
                        .to_string();
                    let answer = backend.answers.lock().expect("lock").get(&token).cloned();
                    let answer = answer.unwrap_or_else(|| Answer::status(403));
                    use std::sync::atomic::Ordering::SeqCst;
                    let now = backend.in_flight.0.fetch_add(1, SeqCst) + 1;
                    backend.in_flight.1.fetch_max(now, SeqCst);
                    tokio::time::sleep(answer.delay).await;
                    backend.in_flight.0.fetch_sub(1, SeqCst);
                    (answer.status, [("content-type", "application/json")], answer.body).into_response()
                }
            }),
        )
    }

    /// Serves on an ephemeral loopback port; returns the base URL.
    pub async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let app = self.router();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/api/")
    }

    /// Serves over TLS (`tls`, e.g. [`TestCa::server_config`]) on an
    /// ephemeral loopback port; returns the port. A failed handshake only
    /// ends that connection.
    pub async fn serve_tls(&self, tls: Arc<rustls::ServerConfig>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let port = listener.local_addr().expect("addr").port();
        let app = self.router();
        let listener = TlsListener { tcp: listener, acceptor: tokio_rustls::TlsAcceptor::from(tls) };
        tokio::spawn(async move { axum::serve(listener, app).await });
        port
    }

    /// Serves on a unix socket at `path`.
    pub async fn serve_unix(&self, path: &std::path::Path) {
        let listener = tokio::net::UnixListener::bind(path).expect("bind unix backend");
        let app = self.router();
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
}

/// A gateway server running in this process on an ephemeral port.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// A config for tests: loopback, the given backend, a trigger token, and
/// short shutdown timings; `extra` YAML is merged over it.
pub fn test_config(backend_url: &str, extra: &str) -> Config {
    let mut base: serde_yaml::Value = serde_yaml::from_str(&format!(
        "listen: 127.0.0.1:0\nbackend: {{url: '{backend_url}', timeoutSeconds: 2}}\ntrigger: {{token: test-token}}\nshutdown: {{drainDelaySeconds: 0.2, closeWindowSeconds: 0.5}}\n"
    ))
    .expect("base yaml");
    if !extra.trim().is_empty() {
        let extra: serde_yaml::Value = serde_yaml::from_str(extra).expect("extra yaml");
        merge(&mut base, extra);
    }
    let text = serde_yaml::to_string(&base).expect("yaml");
    Config::from_yaml(&text).expect("test config parses")
}

fn merge(base: &mut serde_yaml::Value, extra: serde_yaml::Value) {
    match (base, extra) {
        (serde_yaml::Value::Mapping(b), serde_yaml::Value::Mapping(e)) => {
            for (k, v) in e {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, e) => *b = e,
    }
}

impl TestGateway {
    pub async fn start(config: Config) -> TestGateway {
        let server = Server::bind(config).await.expect("gateway binds");
        let addr = server.local_addr().expect("addr");
        let gateway = server.gateway();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        TestGateway { addr, gateway, stop: Some(stop), done }
    }

    /// A gateway in front of `backend` with `extra` config.
    pub async fn with_backend(backend: &TestBackend, extra: &str) -> TestGateway {
        let url = backend.serve().await;
        TestGateway::start(test_config(&url, extra)).await
    }

    pub fn ws_url(&self, token: Option<&str>) -> String {
        match token {
            Some(t) => format!("ws://{}/ws/?token={t}", self.addr),
            None => format!("ws://{}/ws/", self.addr),
        }
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Connects a client with `token` and reads the auth frame.
    pub async fn client(&self, token: &str) -> Client {
        let mut c = Client::connect(&self.ws_url(Some(token)), &[]).await.expect("websocket connects");
        let auth = c.recv_json().await;
        assert_eq!(auth["is_authorized"], json!(true), "auth frame: {auth}");
        c
    }

    /// POST /trigger with the test token; returns the status.
    pub async fn trigger(&self, body: &Value) -> u16 {
        let res = http_post(&self.http_url("/trigger"), Some("test-token"), body.to_string().into_bytes()).await;
        res.0
    }

    /// A metric sample's value from /metrics (0 when absent).
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = http_get(&self.http_url("/metrics")).await;
        metric_value(&text, sample)
    }

    /// Runs the graceful shutdown and waits for the server to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.done)
            .await
            .expect("server stops in time")
            .expect("server task")
            .expect("server ok");
    }
}

/// The value of `sample` (name with labels, exactly as exposed) in a
/// Prometheus text exposition.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().expect("numeric sample"))
        .unwrap_or(0.0)
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A real websocket client.
pub struct Client {
    pub ws: Ws,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// A close frame with this code.
    Close(u16),
    /// The connection dropped without a close frame.
    Dropped,
}

impl Client {
    /// Connects with extra request headers.
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<Client, WsError> {
        let mut request = url.into_client_request().expect("request");
        for (k, v) in headers {
            request.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Client { ws })
    }

    pub async fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next text frame (pings/pongs skipped); panics on close or timeout.
    pub async fn recv_text(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame within the wait")
                .expect("stream open")
                .expect("frame ok");
            match msg {
                Message::Text(t) => return t.to_string(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    pub async fn recv_json(&mut self) -> Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// Sends `text` and returns the JSON reply.
    pub async fn request(&mut self, text: &str) -> Value {
        self.send(text).await;
        self.recv_json().await
    }

    pub async fn subscribe(&mut self, room: Value, request_id: Value) -> Value {
        self.request(&json!({"type": "subscribe", "room": room, "requestId": request_id}).to_string()).await
    }

    /// Nothing arrives within `d` (pings aside).
    pub async fn expect_silence(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }

    /// Reads until the connection ends; returns how. Text frames before
    /// the close are returned too.
    pub async fn until_end(&mut self) -> (Vec<String>, Ended) {
        let mut texts = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await.expect("the connection ends in time") {
                Some(Ok(Message::Text(t))) => texts.push(t.to_string()),
                Some(Ok(Message::Close(Some(frame)))) => return (texts, Ended::Close(u16::from(frame.code))),
                Some(Ok(Message::Close(None))) => return (texts, Ended::Close(u16::from(CloseCode::Status))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return (texts, Ended::Dropped),
            }
        }
    }
}

/// A raw HTTP/1.1 request over loopback; returns status and body.
async fn http_request(method: &str, url: &str, headers: &[(&str, String)], body: Vec<u8>) -> (u16, String) {
    try_http_request(method, url, headers, body).await.unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// [`http_request`] that reports a refused, reset or silent connection
/// (a server out of descriptors, say) instead of panicking.
async fn try_http_request(
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").ok_or("not an http:// URL")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = TcpStream::connect(host).await.map_err(|e| format!("connect: {e}"))?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.map_err(|e| format!("write head: {e}"))?;
    // The server may answer (413) before reading a large body; ignore the write error then.
    let _ = stream.write_all(&body).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut raw)).await.map_err(|_| "no response in time")?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// GET within `deadline`; `None` when the connection is refused, reset or
/// not answered in time.
pub async fn try_http_get(url: &str, deadline: Duration) -> Option<(u16, String)> {
    tokio::time::timeout(deadline, try_http_request("GET", url, &[], Vec::new())).await.ok()?.ok()
}

/// Everything a child's piped stderr says, read as it comes (a full pipe
/// would block the child); the task ends when the child exits.
pub fn collect_stderr(child: &mut tokio::process::Child) -> tokio::task::JoinHandle<String> {
    use tokio::io::AsyncReadExt;
    let mut stderr = child.stderr.take().expect("stderr piped");
    tokio::spawn(async move {
        let mut logs = String::new();
        let _ = stderr.read_to_string(&mut logs).await;
        logs
    })
}

pub async fn http_get(url: &str) -> (u16, String) {
    http_request("GET", url, &[], Vec::new()).await
}

/// POST with an optional bearer token.
pub async fn http_post(url: &str, bearer: Option<&str>, body: Vec<u8>) -> (u16, String) {
    http_post_authorized(url, bearer.map(|t| format!("Bearer {t}")), body).await
}

/// A JSON POST with `Authorization: <authorization>` as given.
pub async fn http_post_authorized(url: &str, authorization: Option<String>, body: Vec<u8>) -> (u16, String) {
    let mut headers = vec![("Content-Type", "application/json".to_string())];
    if let Some(a) = authorization {
        headers.push(("Authorization", a));
    }
    http_request("POST", url, &headers, body).await
}

/// Polls `f` until it is true or the wait runs out.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// The RabbitMQ the tests use: `HT_TEST_AMQP_URL`, default the local one
/// that `tests/run` installs and starts.
pub fn amqp_url() -> String {
    std::env::var("HT_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Fails the test with instructions when no RabbitMQ listens.
pub async fn require_rabbitmq() {
    let url = amqp_url();
    if let Err(e) = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await {
        panic!(
            "RabbitMQ is required at {url} and is not usable ({e}). Run tests/run, which installs and starts \
             Debian's rabbitmq-server, or start one yourself (set HT_TEST_AMQP_URL to use another)."
        );
    }
}

/// An exchange name no other test uses.
pub fn unique_exchange(test: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("ht-test-{test}-{}-{n}", std::process::id())
}

/// Config YAML for the amqp broker on `exchange` (non-durable, as 3.x).
pub fn amqp_config(exchange: &str) -> String {
    format!("broker: {{kind: amqp, amqp: {{url: '{}', exchange: '{exchange}', exchangeDurable: false}}}}\n", amqp_url())
}

/// A raw AMQP publisher, exactly like a 3.x Django publisher.
pub struct AmqpPublisher {
    pub connection: lapin::Connection,
    pub channel: lapin::Channel,
}

impl AmqpPublisher {
    pub async fn connect() -> AmqpPublisher {
        require_rabbitmq().await;
        let connection = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        AmqpPublisher { connection, channel }
    }

    /// `basic_publish(exchange=…, routing_key="*", body=…)`.
    pub async fn publish(&self, exchange: &str, body: &[u8]) {
        self.channel
            .basic_publish(
                exchange.into(),
                "*".into(),
                lapin::options::BasicPublishOptions::default(),
                body,
                lapin::BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("publish confirm");
    }

    /// Declares `exchange` the way 3.x gateways do: direct, non-durable.
    pub async fn declare_3x_exchange(&self, exchange: &str) {
        self.channel
            .exchange_declare(
                exchange.into(),
                lapin::ExchangeKind::Direct,
                lapin::options::ExchangeDeclareOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("declare exchange");
    }

    pub async fn delete_exchange(&self, exchange: &str) {
        let _ = self.channel.exchange_delete(exchange.into(), lapin::options::ExchangeDeleteOptions::default()).await;
    }
}

impl TestGateway {
    /// Waits until `/readyz` answers `status`.
    pub async fn wait_ready(&self, status: u16) {
        let url = self.http_url("/readyz");
        eventually(&format!("/readyz answers {status}"), || {
            let url = url.clone();
            async move { http_get(&url).await.0 == status }
        })
        .await;
    }
}

/// Waits until a gateway process on 127.0.0.1:`port` listens and its
/// `/readyz` answers 200; returns its base URL.
pub async fn wait_process_ready(port: u16) -> String {
    let base = format!("http://127.0.0.1:{port}");
    eventually("the gateway process listening and ready", || async {
        TcpStream::connect(("127.0.0.1", port)).await.is_ok() && http_get(&format!("{base}/readyz")).await.0 == 200
    })
    .await;
    base
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Everything an exited child process wrote to its (piped) stderr.
pub async fn stderr_of(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    let mut logs = String::new();
    child.stderr.take().expect("stderr piped").read_to_string(&mut logs).await.expect("read stderr");
    logs
}

/// A websocket opened by hand over raw TCP, to send frames no client
/// library would.
pub struct RawSocket(pub tokio::net::TcpStream);

impl RawSocket {
    /// Upgrades with `token` and reads the authorisation frame.
    pub async fn open(gw: &TestGateway, token: &str) -> RawSocket {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
        let request = format!(
            "GET /ws/?token={token} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            gw.addr
        );
        s.write_all(request.as_bytes()).await.expect("upgrade request");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.expect("upgrade response");
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        let mut raw = RawSocket(s);
        let (opcode, auth) = raw.frame().await.expect("the authorisation frame");
        assert_eq!(opcode, 1, "{}", String::from_utf8_lossy(&auth));
        raw
    }

    /// The next frame from the gateway (servers do not mask): opcode and payload.
    pub async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut h = [0u8; 2];
        self.0.read_exact(&mut h).await.ok()?;
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                self.0.read_exact(&mut l).await.ok()?;
                u64::from(u16::from_be_bytes(l))
            }
            127 => {
                let mut l = [0u8; 8];
                self.0.read_exact(&mut l).await.ok()?;
                u64::from_be_bytes(l)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; usize::try_from(len).ok()?];
        self.0.read_exact(&mut payload).await.ok()?;
        Some((h[0] & 0x0f, payload))
    }

    /// Sends raw bytes, then returns the close code the gateway sent, if any.
    pub async fn close_code_after(mut self, bytes: &[u8]) -> Option<u16> {
        use tokio::io::AsyncWriteExt;
        self.0.write_all(bytes).await.expect("send");
        loop {
            let (opcode, payload) = tokio::time::timeout(WAIT, self.frame()).await.expect("an answer")?;
            if opcode == 8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    }
}

/// A TCP listener whose connections are served after a TLS handshake.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, peer)) = self.tcp.accept().await else { continue };
            // Handshakes the client refuses are what the TLS tests provoke.
            if let Ok(Ok(tls)) = tokio::time::timeout(WAIT, self.acceptor.accept(tcp)).await {
                return (tls, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A certificate authority made for one test, and what it signs.
pub struct TestCa {
    /// The CA certificate, PEM.
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A certificate and its key, PEM.
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa { pem: cert.pem(), issuer: rcgen::Issuer::new(params, key) }
    }

    /// A certificate for `names` (DNS names or IP addresses), for a server
    /// or a client.
    pub fn issue(&self, names: &[&str], server: bool) -> TestCert {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        params.extended_key_usages = vec![if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        TestCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    /// A server configuration presenting a certificate for `names`; with
    /// `client_ca`, clients must present a certificate it signed.
    pub fn server_config(&self, names: &[&str], client_ca: Option<&TestCa>) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let leaf = self.issue(names, true);
        let chain = vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("pem")];
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key pem");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("pem")).expect("root");
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        Arc::new(builder.with_single_cert(chain, key).expect("server certificate"))
    }
}

/// A directory of files for one test, removed at the end.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ht-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    /// Writes `contents` to `name` in the directory; returns its path.
    pub fn file(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write file");
        path.to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
