//! What the real binary logs (issue 11, finding 10): never a credential at
//! any level, dependencies included (`HT_LOG=trace`); never the contents of
//! a trigger body; malformed triggers rate-limited; per-trigger lines at
//! debug only. Runs against the real RabbitMQ with a user of its own.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Answer, TestBackend, http_get, http_post, require_rabbitmq, unique_exchange};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_high-templar-gateway");

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run rabbitmqctl ({e}): this test needs Debian's rabbitmq-server (tests/run installs it)")
    });
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A RabbitMQ user with a password no log may show; deleted on drop.
struct AmqpUser(String);

impl AmqpUser {
    fn create(password: &str) -> AmqpUser {
        let name = format!("ht-logs-{}", std::process::id());
        rabbitmqctl(&["add_user", &name, password]);
        rabbitmqctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        AmqpUser(name)
    }
}

impl Drop for AmqpUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_user", &self.0]).output();
    }
}

#[tokio::test]
async fn trace_logs_hold_no_credentials_no_body_contents_and_few_lines() {
    require_rabbitmq().await;
    let password = format!("pw-{}-Zq7", std::process::id());
    let user = AmqpUser::create(&password);
    let exchange = unique_exchange("logs");
    // The user's credentials: a token (forwarded as `Authorization`) and a
    // session cookie, both sent through the upgrade.
    let backend = TestBackend::new().answer("carol-Tk8secret", Answer::rooms(json!([{"user": 3}])));
    let backend_url = backend.serve().await;
    let port = common::free_port();
    let amqp_url = format!("amqp://{}:{password}@127.0.0.1:5672/%2f", user.0);
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--broker", "amqp", "--exchange", &exchange, "--exchange-durable", "false"])
        .args(["--backend-url", &backend_url, "--listen", &format!("127.0.0.1:{port}")])
        .env("HT_AMQP_URL", &amqp_url)
        .env("HT_TRIGGER_TOKEN", "trigger-token-Xy9")
        // Trace for every dependency that could write a secret, and for the
        // gateway itself; not for tokio and mio, whose trace lines only
        // slow the test down.
        .env("HT_LOG", "debug,high_templar_gateway=trace,lapin=trace,amq_protocol=trace,hyper=trace,hyper_util=trace,reqwest=trace,h2=trace,tungstenite=trace,tokio_tungstenite=trace")
        .env("HT_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn gateway");
    // Read as it comes: trace output would fill the pipe and block the gateway.
    let logs = common::collect_stderr(&mut child);
    let base = common::wait_process_ready(port).await;

    // A browser-like client: cookie and token through the upgrade, a
    // subscription and a publish (hyper, tungstenite and reqwest all see
    // the credentials at trace level).
    let ws_url = format!("ws://127.0.0.1:{port}/ws/?token=carol-Tk8secret");
    let mut carol =
        common::Client::connect(&ws_url, &[("Cookie", "sessionid=cookie-Mn4secret")]).await.expect("upgrade");
    assert_eq!(carol.recv_json().await["is_authorized"], json!(true));
    let reply = carol.subscribe(json!({"user": 3}), json!("c")).await;
    assert_eq!(reply["code"], json!("success"), "{reply}");

    // A flood of malformed bodies naming a room key, and good triggers.
    let publisher = common::AmqpPublisher::connect().await;
    for _ in 0..300 {
        publisher.publish(&exchange, br#"{"rooms":[{"secret-room-key":{"nested":1}}],"data":1}"#).await;
    }
    for _ in 0..5 {
        let body = json!({"rooms": [{"user": 3}], "data": "fine"}).to_string().into_bytes();
        assert_eq!(http_post(&format!("{base}/trigger"), Some("trigger-token-Xy9"), body).await.0, 202);
    }
    common::eventually("the malformed bodies were all counted", || async {
        let metrics = http_get(&format!("{base}/metrics")).await.1;
        common::metric_value(&metrics, "hightemplar_triggers_rejected_total{reason=\"invalid_room\"}") >= 300.0
    })
    .await;
    assert_eq!(carol.recv_json().await["data"], json!("fine"), "the client got the triggers");
    // Past the throttle's 10 s interval, one more malformed body writes a
    // line that counts the ones left out.
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    publisher.publish(&exchange, br#"{"rooms":[{"secret-room-key":{"nested":1}}],"data":1}"#).await;
    common::eventually("the 301st malformed body was counted", || async {
        let metrics = http_get(&format!("{base}/metrics")).await.1;
        common::metric_value(&metrics, "hightemplar_triggers_rejected_total{reason=\"invalid_room\"}") >= 301.0
    })
    .await;
    let _ = Command::new("kill").args(["-TERM", &child.id().expect("pid").to_string()]).status();
    let _ = child.wait().await;
    let logs = logs.await.expect("the stderr reader");
    publisher.delete_exchange(&exchange).await;

    let password_bytes = password.bytes().map(|b| b.to_string()).collect::<Vec<_>>().join(", ");
    for secret in
        [password.as_str(), password_bytes.as_str(), "trigger-token-Xy9", "secret-room-key", "Tk8secret", "Mn4secret"]
    {
        assert!(!logs.contains(secret), "the logs show {secret:?}");
    }
    // The session and the upgrade were logged (at trace), so the check above
    // covers them; hyper, tungstenite and reqwest stay capped at info.
    let targets: std::collections::BTreeSet<&str> =
        logs.lines().filter_map(|l| l.split("\"target\":\"").nth(1)?.split('"').next()).collect();
    for logged in ["high_templar_gateway::session", "high_templar_gateway::http"] {
        assert!(targets.contains(logged), "no line of {logged}: {targets:?}");
    }
    assert!(!targets.iter().any(|t| t.starts_with("hyper") || t.contains("tungstenite")), "{targets:?}");
    let malformed: Vec<&str> = logs.lines().filter(|l| l.contains("malformed AMQP trigger dropped")).collect();
    assert!((2..=4).contains(&malformed.len()), "{} lines for 301 malformed triggers", malformed.len());
    // Every body is either a line or counted in the next line's `suppressed`.
    let suppressed: u64 = malformed
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON log line");
            v["suppressed"].as_u64().unwrap_or_else(|| panic!("no suppressed count in {l}"))
        })
        .sum();
    assert_eq!(suppressed + malformed.len() as u64, 301, "{malformed:?}");
    let accepted: Vec<&str> = logs.lines().filter(|l| l.contains("trigger accepted")).collect();
    assert_eq!(accepted.len(), 5, "each trigger at debug level: {accepted:?}");
    assert!(accepted.iter().all(|l| l.contains(r#""level":"DEBUG""#)), "{accepted:?}");
    // The filter keeps what the project itself logs at trace and debug.
    assert!(logs.contains(r#""level":"DEBUG""#), "debug lines of the gateway are kept");
}
