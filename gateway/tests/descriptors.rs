//! The open-file limit (issue 11, finding 1): the gateway binary run under a
//! low `RLIMIT_NOFILE` (util-linux `prlimit`) refuses websockets with 503
//! before its descriptors run out, keeps answering `/metrics`, and when
//! accepts do fail (a limit too low for even the reserve) it counts and logs
//! them, at most a line per interval, and recovers once descriptors free up.

mod common;

use std::process::Stdio;

use common::{Answer, Client, TestBackend, http_get};
use serde_json::json;
use tokio_tungstenite::tungstenite::Error as WsError;

const BIN: &str = env!("CARGO_BIN_EXE_high-templar-gateway");

/// The gateway binary under `prlimit --nofile=N:N`, on a free port, and
/// its stderr, read as it comes (a full pipe would block the gateway).
async fn gateway_with_nofile(
    nofile: u32,
    backend_url: &str,
) -> (tokio::process::Child, u16, String, tokio::task::JoinHandle<String>) {
    let port = common::free_port();
    let mut child = tokio::process::Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg(BIN)
        .args(["serve", "--backend-url", backend_url, "--listen", &format!("127.0.0.1:{port}")])
        .env("HT_LOG", "info")
        .env("HT_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the gateway under prlimit (util-linux; apt-get install util-linux)");
    let logs = common::collect_stderr(&mut child);
    let base = common::wait_process_ready(port).await;
    (child, port, base, logs)
}

/// Opens websockets until `count` tries: (clients kept, statuses of refusals).
async fn open_many(port: u16, count: usize) -> (Vec<Client>, Vec<u16>) {
    let url = format!("ws://127.0.0.1:{port}/ws/?token=fd-user");
    let mut clients = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..count {
        match Client::connect(&url, &[]).await {
            Ok(mut c) => {
                assert_eq!(c.recv_json().await["is_authorized"], json!(true));
                clients.push(c);
            }
            Err(WsError::Http(response)) => refused.push(response.status().as_u16()),
            Err(e) => refused.push({
                eprintln!("connect failed without an HTTP answer: {e}");
                0
            }),
        }
    }
    (clients, refused)
}

#[tokio::test]
async fn websockets_past_the_open_file_limit_get_503_and_accepts_never_fail() {
    let backend = TestBackend::new().answer("fd-user", Answer::rooms(json!([{"user": 1}])));
    let backend_url = backend.serve().await;
    // 256 descriptors: a reserve of 64, so at most 192 websockets.
    let (mut child, port, base, _logs) = gateway_with_nofile(256, &backend_url).await;
    let metrics = http_get(&format!("{base}/metrics")).await.1;
    let limit = common::metric_value(&metrics, "hightemplar_connections_limit");
    assert_eq!(limit, 192.0, "the limit follows the open-file limit");

    let (clients, refused) = open_many(port, 230).await;
    assert_eq!(clients.len(), 192, "every websocket up to the limit is served");
    assert!(refused.iter().all(|&s| s == 503), "past the limit: 503, not a failed accept: {refused:?}");
    assert_eq!(refused.len(), 230 - 192);
    // Full, the process still answers its probes and metrics.
    let (status, metrics) = metrics_page(&base).await;
    assert_eq!(status, Some(200), "/metrics of a full gateway");
    assert_eq!(common::metric_value(&metrics, "hightemplar_accept_errors_total"), 0.0);
    assert_eq!(common::metric_value(&metrics, "hightemplar_connections_open"), 192.0);
    drop(clients);
    common::eventually("the closed websockets are released", || async {
        let (status, metrics) = metrics_page(&base).await;
        status == Some(200) && common::metric_value(&metrics, "hightemplar_connections_open") == 0.0
    })
    .await;
    let (again, refused) = open_many(port, 10).await;
    assert_eq!((again.len(), refused.len()), (10, 0), "room again after the clients left");
    child.kill().await.expect("kill");
}

#[tokio::test]
async fn failed_accepts_are_counted_logged_once_per_interval_and_recovered_from() {
    let backend = TestBackend::new().answer("fd-user", Answer::rooms(json!([{"user": 1}])));
    let backend_url = backend.serve().await;
    // So few descriptors that the process's own use (runtime, listener,
    // backend connection) leaves less than the reserve assumes: websockets
    // under the limit exhaust the table, and accepts fail.
    let nofile = 24;
    let (mut child, port, base, logs) = gateway_with_nofile(nofile, &backend_url).await;
    let limit = common::metric_value(&http_get(&format!("{base}/metrics")).await.1, "hightemplar_connections_limit");
    assert_eq!(limit, 18.0);
    let pid = child.id().expect("pid");
    let in_use = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the gateway's fd table").count();
    assert!(in_use + 18 > nofile as usize, "premise: {in_use} descriptors in use leave room for 18 websockets");

    // Websockets one at a time until one is not even accepted: its
    // connection waits in the backlog while the gateway retries.
    let url = format!("ws://127.0.0.1:{port}/ws/?token=fd-user");
    let mut clients = Vec::new();
    let mut unserved = 0;
    for _ in 0..18 {
        match tokio::time::timeout(std::time::Duration::from_secs(2), Client::connect(&url, &[])).await {
            Ok(Ok(mut c)) => {
                assert_eq!(c.recv_json().await["is_authorized"], json!(true));
                clients.push(c);
            }
            Ok(Err(e)) => panic!("a websocket under the limit was refused: {e}"),
            Err(_) => {
                unserved += 1;
                break;
            }
        }
    }
    assert_eq!(unserved, 1, "a websocket waited for a descriptor ({} served)", clients.len());
    // Let the websockets go; the gateway accepts again and tells what happened.
    drop(clients);
    common::eventually("the gateway serves again and counted the failed accepts", || async {
        let (status, metrics) = metrics_page(&base).await;
        status == Some(200) && common::metric_value(&metrics, "hightemplar_accept_errors_total") > 0.0
    })
    .await;
    let (clients, refused) = open_many(port, 3).await;
    assert_eq!((clients.len(), refused.len()), (3, 0), "websockets served after the errors");
    drop(clients);
    child.kill().await.expect("kill");
    let logs = logs.await.expect("the stderr reader");
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("cannot accept connections")).collect();
    assert!(!lines.is_empty(), "accept errors are logged: {logs}");
    assert!(lines.len() <= 2, "at most a line per 10 s, not one per failed accept: {lines:?}");
}

/// `/metrics` within 2 s: (status, page), `(None, "")` when the gateway
/// could not accept or answer (out of descriptors).
async fn metrics_page(base: &str) -> (Option<u16>, String) {
    match common::try_http_get(&format!("{base}/metrics"), std::time::Duration::from_secs(2)).await {
        Some((status, page)) => (Some(status), page),
        None => (None, String::new()),
    }
}
