//! The real `high-templar-gateway` binary: configuration errors, and the
//! graceful shutdown on SIGTERM (DESIGN.md §4).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Answer, Client, Ended, TestBackend, http_get};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_high-templar-gateway");

fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ht-bin-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("config.yaml");
    std::fs::write(&path, contents).expect("write config");
    path
}

#[test]
fn invalid_config_exits_2_naming_the_field() {
    for (name, yaml, field) in [
        ("type", "backend: {url: 'http://a/'}\nlimits: {maxConnections: many}\n", "limits.maxConnections"),
        ("unknown", "backend: {url: 'http://a/', bootstrap: x}\n", "backend.bootstrap"),
        ("missing", "limits: {maxConnections: 5}\n", "backend.url"),
        ("range", "backend: {url: 'http://a/'}\nlimits: {idleTimeoutSeconds: -1}\n", "limits.idleTimeoutSeconds"),
    ] {
        let path = temp_file(name, yaml);
        let out = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("HT_BACKEND_URL")
            .output()
            .expect("run binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(field), "{name}: stderr should name {field}: {stderr}");
    }
}

#[test]
fn unusable_tls_files_exit_2_naming_the_setting() {
    let path = temp_file(
        "tls",
        "backend: {url: 'https://api/', tls: {caFile: /nonexistent/backend-ca.pem}}\nbroker: {kind: amqp, amqp: {url: 'amqps://u:hunter2@h/'}}\n",
    );
    for command in ["check-config", "serve"] {
        let out = Command::new(BIN).args([command, "--config"]).arg(&path).output().expect("run binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(stderr.contains("backend.tls.caFile: cannot read /nonexistent/backend-ca.pem"), "{command}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{command}: {stderr}");
    }
}

#[test]
fn missing_config_file_exits_2() {
    let out = Command::new(BIN).args(["serve", "--config", "/nonexistent/ht.yaml"]).output().expect("run binary");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ht.yaml"));
}

#[test]
fn flags_and_env_override_the_file_and_secrets_are_redacted() {
    let path = temp_file("override", "backend: {url: 'http://file/'}\nlimits: {maxConnections: 7}\n");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .args(["--backend-url", "http://flag/api/", "--listen", "127.0.0.1:9999"])
        .env("HT_TRIGGER_TOKEN", "super-secret-token")
        .env("HT_BOOTSTRAP_PATH", "boot/")
        .output()
        .expect("run binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("http://flag/api/"), "{stdout}");
    assert!(stdout.contains("127.0.0.1:9999"), "{stdout}");
    assert!(stdout.contains("boot/"), "{stdout}");
    assert!(stdout.contains("maxConnections: 7"), "{stdout}");
    assert!(!stdout.contains("super-secret-token"), "{stdout}");
}

#[tokio::test]
async fn sigterm_drains_closes_with_1001_and_exits_0() {
    let backend = TestBackend::new().answer("bob", Answer::rooms(json!([{"user": 2}])));
    let url = backend.serve().await;
    let port = common::free_port();
    let path = temp_file(
        "shutdown",
        &format!(
            "listen: 127.0.0.1:{port}\nbackend: {{url: '{url}'}}\nshutdown: {{drainDelaySeconds: 1, closeWindowSeconds: 1}}\n"
        ),
    );
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .env("HT_TRIGGER_TOKEN", "super-secret-token")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn gateway");
    let base = common::wait_process_ready(port).await;
    let mut c =
        Client::connect(&format!("ws://127.0.0.1:{port}/ws/?token=bob"), &[("Cookie", "sessionid=cookie-secret")])
            .await
            .expect("connect");
    assert_eq!(c.recv_json().await["is_authorized"], json!(true));

    let pid = child.id().expect("pid").to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(status.success());
    let signalled = Instant::now();
    // Readiness turns 503 at once, while the socket is still open.
    common::eventually("readyz 503", || async { http_get(&format!("{base}/readyz")).await.0 == 503 }).await;
    assert!(signalled.elapsed() < Duration::from_secs(1), "readiness must fail before the drain delay ends");
    // New websockets are still served during the drain delay: endpoints
    // and load balancers go on sending clients for a moment after readiness
    // fails. They are closed with the others.
    let mut late = Client::connect(&format!("ws://127.0.0.1:{port}/ws/?token=bob"), &[])
        .await
        .expect("a new websocket during the drain delay is served");
    assert_eq!(late.recv_json().await["is_authorized"], json!(true));

    let (_, ended) = c.until_end().await;
    assert_eq!(ended, Ended::Close(1001));
    assert!(signalled.elapsed() >= Duration::from_millis(900), "sessions close after the drain delay");
    assert_eq!(late.until_end().await.1, Ended::Close(1001));
    // After the drain delay nothing is accepted any more.
    let refused = Client::connect(&format!("ws://127.0.0.1:{port}/ws/?token=bob"), &[]).await;
    assert!(refused.is_err(), "a new websocket after the drain delay must be refused");

    let exit = tokio::time::timeout(common::WAIT, child.wait()).await.expect("exits in time").expect("wait");
    assert_eq!(exit.code(), Some(0));
    let logs = common::stderr_of(&mut child).await;
    assert!(logs.contains("connection closed"), "lifecycle is logged: {logs}");
    for secret in ["super-secret-token", "cookie-secret", "token=bob", "Token bob"] {
        assert!(!logs.contains(secret), "logs leak {secret:?}: {logs}");
    }
    // JSON lines when not on a terminal.
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
    }
}
