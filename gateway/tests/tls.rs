//! TLS to RabbitMQ (`amqps://`) and to the backend (`https://`), against a
//! real RabbitMQ TLS listener (tests/rabbitmq.sh: 127.0.0.1:5671, its CA in
//! /var/lib/rabbitmq/ht-test-tls, server certificate for `localhost` only)
//! and a real axum backend over rustls with a CA each test makes. A wrong CA,
//! a wrong host name and a refused client certificate are refused with a
//! message that says so, and never show the AMQP password.

mod common;

use std::path::PathBuf;
use std::process::Stdio;

use common::{
    AmqpPublisher, Answer, Client, Ended, TempDir, TestBackend, TestCa, TestGateway, http_get, test_config,
    unique_exchange,
};
use serde_json::json;

/// Where tests/rabbitmq.sh keeps the TLS listener's CA and client certificate.
fn rabbitmq_tls_dir() -> PathBuf {
    let dir =
        PathBuf::from(std::env::var("HT_RABBITMQ_TLS_DIR").unwrap_or_else(|_| "/var/lib/rabbitmq/ht-test-tls".into()));
    let listening = std::net::TcpStream::connect(("127.0.0.1", 5671)).is_ok();
    assert!(
        listening && dir.join("ca.pem").is_file() && dir.join("client.key").is_file(),
        "these tests need the RabbitMQ TLS listener on 127.0.0.1:5671 and its CA in {} (listening: {listening}): run \
         tests/rabbitmq.sh (as root), which makes them",
        dir.display()
    );
    dir
}

fn file(dir: &std::path::Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

const PASSWORD: &str = "guest";

fn amqps_config(host: &str, exchange: &str, tls: &str) -> String {
    format!(
        "broker: {{kind: amqp, amqp: {{url: 'amqps://guest:{PASSWORD}@{host}:5671/%2f', exchange: '{exchange}', \
         exchangeDurable: false, reconnectMaxSeconds: 0.5, tls: {tls}}}}}\n"
    )
}

fn backend() -> TestBackend {
    TestBackend::new().answer("bob", Answer::rooms(json!([{"user": 2}])))
}

/// A gateway on the TLS listener; waits for `/readyz` to answer `status`.
async fn amqps_gateway(host: &str, exchange: &str, tls: &str, status: u16) -> TestGateway {
    let gw = TestGateway::with_backend(&backend(), &amqps_config(host, exchange, tls)).await;
    gw.wait_ready(status).await;
    gw
}

/// Waits until the `/readyz` body (503 from the start; the reason once an
/// attempt has failed) contains `text`; returns the body. The gateway
/// retries every half second, so a reason that only some attempts show
/// (a refused client certificate: TLS 1.3 sends the alert after the
/// handshake, and it can be lost to a reset) is seen too.
async fn readyz_says(gw: &TestGateway, text: &str) -> String {
    let url = gw.http_url("/readyz");
    let seen = std::sync::Mutex::new(String::new());
    common::eventually(&format!("/readyz says {text:?}"), || async {
        let (status, body) = http_get(&url).await;
        let found = status == 503 && body.contains(text);
        *seen.lock().expect("lock") = body;
        found
    })
    .await;
    seen.into_inner().expect("lock")
}

#[tokio::test]
async fn amqps_with_the_listeners_ca_is_ready_and_delivers_both_ways() {
    let dir = rabbitmq_tls_dir();
    let exchange = unique_exchange("amqps");
    let gw = amqps_gateway("localhost", &exchange, &format!("{{caFile: '{}'}}", file(&dir, "ca.pem")), 200).await;
    let mut c = gw.client("bob").await;
    assert_eq!(c.subscribe(json!({"user": 2}), json!("u")).await["code"], "success");
    // A 3.x publisher on the plain port reaches the TLS consumer...
    let publisher = AmqpPublisher::connect().await;
    publisher.publish(&exchange, br#"{"rooms": [{"user": 2}], "data": "over amqp"}"#).await;
    assert_eq!(c.recv_json().await["data"], json!("over amqp"));
    // ... and POST /trigger goes out through the TLS publisher channel.
    assert_eq!(gw.trigger(&json!({"rooms": [{"user": 2}], "data": "over http"})).await, 202);
    assert_eq!(c.recv_json().await["data"], json!("over http"));
    assert_eq!(gw.metric("hightemplar_amqp_connected").await, 1.0);
    publisher.delete_exchange(&exchange).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn an_unknown_ca_is_refused_and_named_without_the_password() {
    let _dir = rabbitmq_tls_dir();
    let other = TempDir::new("tls-other-ca");
    let ca = other.file("ca.pem", &TestCa::new("not the broker's CA").pem);
    let exchange = unique_exchange("amqps-ca");
    let gw = amqps_gateway("localhost", &exchange, &format!("{{caFile: '{ca}'}}"), 503).await;
    let body = readyz_says(&gw, "not trusted: unknown issuer").await;
    assert!(!body.contains(&format!(":{PASSWORD}@")), "/readyz shows no password: {body}");
    common::eventually("the failure counted", || async {
        gw.metric(r#"hightemplar_tls_failures_total{peer="broker",reason="unknown_ca"}"#).await >= 1.0
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn the_system_store_does_not_trust_a_private_ca() {
    let _dir = rabbitmq_tls_dir();
    let exchange = unique_exchange("amqps-system");
    let gw = amqps_gateway("localhost", &exchange, "{}", 503).await;
    readyz_says(&gw, "unknown issuer").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_hostname_mismatch_is_refused_and_named() {
    let dir = rabbitmq_tls_dir();
    let exchange = unique_exchange("amqps-name");
    // The listener's certificate names `localhost` only.
    let gw = amqps_gateway("127.0.0.1", &exchange, &format!("{{caFile: '{}'}}", file(&dir, "ca.pem")), 503).await;
    let body = readyz_says(&gw, "hostname mismatch").await;
    assert!(body.contains("127.0.0.1"), "/readyz says which host: {body}");
    assert!(body.contains("localhost"), "and which names the certificate holds: {body}");
    assert!(
        gw.metric(r#"hightemplar_tls_failures_total{peer="broker",reason="hostname_mismatch"}"#).await >= 1.0,
        "counted"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_certificate_is_presented_and_verified_by_the_broker() {
    let dir = rabbitmq_tls_dir();
    let ca = file(&dir, "ca.pem");
    // The listener's own client certificate: accepted.
    let exchange = unique_exchange("amqps-client");
    let gw = amqps_gateway(
        "localhost",
        &exchange,
        &format!(
            "{{caFile: '{ca}', certFile: '{}', keyFile: '{}'}}",
            file(&dir, "client.pem"),
            file(&dir, "client.key")
        ),
        200,
    )
    .await;
    gw.shutdown().await;
    AmqpPublisher::connect().await.delete_exchange(&exchange).await;
    // One from a CA the broker does not know: the broker (verify_peer)
    // refuses it, so the gateway did present it.
    let stranger = TestCa::new("stranger").issue(&["gateway"], false);
    let files = TempDir::new("tls-stranger");
    let (cert, key) = (files.file("c.pem", &stranger.cert_pem), files.file("c.key", &stranger.key_pem));
    let exchange = unique_exchange("amqps-stranger");
    let gw = amqps_gateway(
        "localhost",
        &exchange,
        &format!("{{caFile: '{ca}', certFile: '{cert}', keyFile: '{key}'}}"),
        503,
    )
    .await;
    readyz_says(&gw, "refused the client certificate").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn unusable_tls_files_stop_the_start_naming_the_setting() {
    let files = TempDir::new("tls-bad-files");
    let not_pem = files.file("ca.pem", "not a certificate");
    let cert = TestCa::new("some").issue(&["gateway"], false);
    let cert_file = files.file("c.pem", &cert.cert_pem);
    let other_key = files.file("other.key", &TestCa::new("other").issue(&["x"], false).key_pem);
    let backend_url = backend().serve().await;
    for (tls, expected) in [
        ("{caFile: /nonexistent/ca.pem}".to_string(), "broker.amqp.tls.caFile: cannot read /nonexistent/ca.pem"),
        (format!("{{caFile: '{not_pem}'}}"), "broker.amqp.tls.caFile /tmp/"),
        (format!("{{caFile: '{not_pem}'}}"), "no PEM certificate"),
        (format!("{{certFile: '{cert_file}', keyFile: '{not_pem}'}}"), "broker.amqp.tls.keyFile /tmp/"),
        (format!("{{certFile: '{cert_file}', keyFile: '{not_pem}'}}"), "no PEM private key"),
        (format!("{{certFile: '{cert_file}', keyFile: '{other_key}'}}"), "client certificate and key cannot be used"),
    ] {
        let config = test_config(&backend_url, &amqps_config("localhost", "unused", &tls));
        let e = high_templar_gateway::server::Server::bind(config).await.err().expect("refused");
        let text = e.to_string();
        assert!(text.contains(expected), "{tls}: {text}");
        assert!(!text.contains(PASSWORD) && !text.contains("-----BEGIN"), "{text}");
    }
    let config = test_config("https://localhost:1/api/", "backend: {tls: {caFile: /nonexistent/b.pem}}");
    let e = high_templar_gateway::server::Server::bind(config).await.err().expect("refused");
    assert!(e.to_string().contains("backend.tls.caFile: cannot read /nonexistent/b.pem"), "{e}");
}

/// An HTTPS backend with its own CA; returns the CA file and the port.
async fn https_backend(files: &TempDir, client_ca: Option<&TestCa>) -> (String, u16) {
    let ca = TestCa::new("backend CA");
    let port = backend().serve_tls(ca.server_config(&["localhost"], client_ca)).await;
    (files.file("backend-ca.pem", &ca.pem), port)
}

/// Connects `bob` and returns how the connection went: authorized, or
/// the close code.
async fn bootstrap_over(gw: &TestGateway) -> Result<(), Ended> {
    let mut c = Client::connect(&gw.ws_url(Some("bob")), &[]).await.expect("upgrade");
    let auth = c.recv_json().await;
    if auth["is_authorized"] == json!(true) {
        return Ok(());
    }
    Err(c.until_end().await.1)
}

#[tokio::test]
async fn an_https_backend_with_its_ca_authorizes() {
    let files = TempDir::new("tls-backend");
    let (ca, port) = https_backend(&files, None).await;
    let config =
        test_config(&format!("https://localhost:{port}/api/"), &format!("backend: {{tls: {{caFile: '{ca}'}}}}"));
    let gw = TestGateway::start(config).await;
    assert_eq!(bootstrap_over(&gw).await, Ok(()));
    gw.shutdown().await;
}

#[tokio::test]
async fn an_https_backend_with_a_wrong_ca_or_name_is_unavailable_1013() {
    let files = TempDir::new("tls-backend-wrong");
    let (ca, port) = https_backend(&files, None).await;
    let wrong_ca = files.file("wrong.pem", &TestCa::new("wrong").pem);
    for (url, ca, reason) in [
        (format!("https://localhost:{port}/api/"), wrong_ca.as_str(), "unknown_ca"),
        (format!("https://127.0.0.1:{port}/api/"), ca.as_str(), "hostname_mismatch"),
    ] {
        let gw = TestGateway::start(test_config(&url, &format!("backend: {{tls: {{caFile: '{ca}'}}}}"))).await;
        assert_eq!(bootstrap_over(&gw).await, Err(Ended::Close(1013)), "{reason}: retryable, not logged out");
        let sample = format!(r#"hightemplar_tls_failures_total{{peer="backend",reason="{reason}"}}"#);
        assert_eq!(gw.metric(&sample).await, 1.0, "{sample}");
        assert_eq!(gw.metric(r#"hightemplar_auth_total{outcome="unavailable"}"#).await, 1.0);
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn an_https_backend_requiring_a_client_certificate() {
    let files = TempDir::new("tls-backend-mtls");
    let clients = TestCa::new("client CA");
    let (ca, port) = https_backend(&files, Some(&clients)).await;
    let url = format!("https://localhost:{port}/api/");
    // Without one: refused by the backend, 1013.
    let gw = TestGateway::start(test_config(&url, &format!("backend: {{tls: {{caFile: '{ca}'}}}}"))).await;
    assert_eq!(bootstrap_over(&gw).await, Err(Ended::Close(1013)));
    assert_eq!(
        gw.metric(r#"hightemplar_tls_failures_total{peer="backend",reason="client_certificate_refused"}"#).await,
        1.0
    );
    gw.shutdown().await;
    // With one: authorized.
    let id = clients.issue(&["gateway"], false);
    let (cert, key) = (files.file("c.pem", &id.cert_pem), files.file("c.key", &id.key_pem));
    let tls = format!("backend: {{tls: {{caFile: '{ca}', certFile: '{cert}', keyFile: '{key}'}}}}");
    let gw = TestGateway::start(test_config(&url, &tls)).await;
    assert_eq!(bootstrap_over(&gw).await, Ok(()));
    gw.shutdown().await;
}

/// The binary's log lines: the broker's and the backend's TLS failures
/// named, the password nowhere.
#[tokio::test]
async fn the_binary_logs_tls_failures_by_name_and_never_the_password() {
    let _dir = rabbitmq_tls_dir();
    let files = TempDir::new("tls-binary");
    let (backend_ca, port) = https_backend(&files, None).await;
    let wrong = files.file("wrong.pem", &TestCa::new("wrong").pem);
    let gw_port = common::free_port();
    let config = files.file(
        "config.yaml",
        &format!(
            "listen: 127.0.0.1:{gw_port}\nbackend: {{url: 'https://localhost:{port}/api/', tls: {{caFile: '{wrong}'}}}}\n{}",
            amqps_config("localhost", &unique_exchange("amqps-bin"), &format!("{{caFile: '{backend_ca}'}}"))
        ),
    );
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_high-templar-gateway"))
        .args(["serve", "--config", &config])
        .env("HT_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the binary");
    let logs = common::collect_stderr(&mut child);
    let base = format!("http://127.0.0.1:{gw_port}");
    common::eventually("the binary answers /readyz 503 naming the TLS failure", || async {
        std::net::TcpStream::connect(("127.0.0.1", gw_port)).is_ok()
            && http_get(&format!("{base}/readyz")).await.1.contains("unknown issuer")
    })
    .await;
    let mut c = Client::connect(&format!("ws://127.0.0.1:{gw_port}/ws/?token=bob"), &[]).await.expect("upgrade");
    assert_eq!(c.until_end().await.1, Ended::Close(1013));
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().expect("pid").to_string()]).status();
    let _ = tokio::time::timeout(common::WAIT, child.wait()).await;
    let logs = logs.await.expect("the stderr reader");
    assert!(logs.contains("RabbitMQ unavailable") && logs.contains("unknown issuer"), "broker failure: {logs}");
    assert!(logs.contains("backend TLS failed") && logs.contains("unknown_ca"), "backend failure: {logs}");
    assert!(!logs.contains(&format!(":{PASSWORD}@")), "no password in the logs: {logs}");
}
