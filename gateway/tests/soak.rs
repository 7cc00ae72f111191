//! Soak (issue 11): the real gateway binary on a real RabbitMQ under
//! connect/subscribe/disconnect churn, triggers over both ways in, slow
//! readers and hostile clients and publishers, for `HT_SOAK_SECONDS`
//! (default 60; docs/security.md gives the 10-minute run). Afterwards the
//! process must return to the baseline taken after a warm-up with the same
//! load: open files, the `/metrics` gauges, and RSS within a margin. It
//! also checks that steady clients got every trigger to their room exactly
//! once, in order per publisher. It asserts behaviour, not speed.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{AmqpPublisher, Answer, Client, TestBackend, http_get, metric_value, unique_exchange};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_high-templar-gateway");
/// Clients that stay for a whole phase and count their publishes.
const STEADY: usize = 8;
/// Tasks that connect, subscribe, read a little and leave, in a loop.
const CHURNERS: usize = 16;
/// Tasks whose clients subscribe to everything and never read.
const SLOW: usize = 3;

/// What the process holds, read from /proc and /metrics.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    rss_kib: u64,
    open_files: usize,
    connections_open: f64,
    subscriptions_active: f64,
    rooms_active: f64,
    http_connections_pending: f64,
    index_projections: f64,
}

async fn footprint(pid: u32, base: &str) -> Footprint {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    let open_files = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc fd").count();
    let (_, metrics) = http_get(&format!("{base}/metrics")).await;
    let m = |name| metric_value(&metrics, name);
    Footprint {
        rss_kib,
        open_files,
        connections_open: m("hightemplar_connections_open"),
        subscriptions_active: m("hightemplar_subscriptions_active"),
        rooms_active: m("hightemplar_rooms_active"),
        // The scrape itself is one.
        http_connections_pending: m("hightemplar_http_connections_pending") - 1.0,
        index_projections: m("hightemplar_index_projections"),
    }
}

/// Counts of what one load phase did.
#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    triggers: AtomicU64,
    hostile: AtomicU64,
}

/// One steady client: subscribes to `{"user": "steady"}` and records the
/// sequence numbers it gets.
async fn steady_client(url: String) -> (Client, Vec<u64>) {
    let mut c = Client::connect(&url, &[]).await.expect("steady client connects");
    assert_eq!(c.recv_json().await["is_authorized"], json!(true));
    assert_eq!(c.subscribe(json!({"user": "steady"}), json!("steady")).await["code"], json!("success"));
    (c, Vec::new())
}

async fn churn(url: String, stop: Arc<AtomicBool>, counts: Arc<Counts>, seed: u64) {
    let mut n = seed;
    while !stop.load(Ordering::Relaxed) {
        n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let Ok(mut c) = Client::connect(&url, &[]).await else { continue };
        counts.connections.fetch_add(1, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(5), c.ws.next()).await;
        for i in 0..5 {
            let room = json!({"user": (n >> (i * 4)) % 20});
            let frame = json!({"type": "subscribe", "room": room, "requestId": format!("c{i}")});
            if c.ws.send(Message::text(frame.to_string())).await.is_err() {
                break;
            }
        }
        let stay = Duration::from_millis(100 + (n >> 40) % 900);
        let _ = tokio::time::timeout(stay, async { while let Some(Ok(_)) = c.ws.next().await {} }).await;
        if n & 1 == 0 {
            let _ = c.ws.close(None).await;
        }
        // Otherwise dropped without a close frame.
    }
}

async fn slow_reader(url: String, stop: Arc<AtomicBool>, counts: Arc<Counts>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = Client::connect(&url, &[]).await else { continue };
        counts.connections.fetch_add(1, Ordering::Relaxed);
        let frame = json!({"type": "subscribe", "room": {"user": "*"}, "requestId": "slow"});
        let _ = c.ws.send(Message::text(frame.to_string())).await;
        // Never read: the gateway closes it as a slow consumer (1013).
        let held = Instant::now();
        while !stop.load(Ordering::Relaxed) && held.elapsed() < Duration::from_secs(8) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn hostile(addr: String, stop: Arc<AtomicBool>, counts: Arc<Counts>, amqp: Arc<AmqpPublisher>, exchange: String) {
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        counts.hostile.fetch_add(1, Ordering::Relaxed);
        match round % 5 {
            // A silent socket: closed by the handshake timeout.
            0 => {
                if let Ok(s) = TcpStream::connect(&addr).await {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(4)).await;
                        drop(s);
                    });
                }
            }
            // Slowloris.
            1 => {
                if let Ok(mut s) = TcpStream::connect(&addr).await {
                    tokio::spawn(async move {
                        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n").await;
                        for _ in 0..20 {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            if s.write_all(b"X-A: b\r\n").await.is_err() {
                                break;
                            }
                        }
                    });
                }
            }
            // An oversize message (1009).
            2 => {
                if let Ok(mut c) = Client::connect(&format!("ws://{addr}/ws/?token=soak"), &[]).await {
                    let _ = c.ws.send(Message::text("x".repeat(100_000))).await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), c.until_end()).await;
                }
            }
            // Malformed AMQP body and a trigger with a wrong token.
            3 => {
                amqp.publish(&exchange, b"{\"rooms\": [{\"user\": ").await;
                let _ = common::http_post(&format!("http://{addr}/trigger"), Some("wrong"), b"{}".to_vec()).await;
            }
            // A wildcard trigger of a new pattern.
            _ => {
                let body = json!({"rooms": [{"user": "*"}], "data": "wildcard"});
                let _ =
                    common::http_post(&format!("http://{addr}/trigger"), Some("soak-token"), body.to_string().into())
                        .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs one load phase for `length`; returns the steady clients'
/// sequences and how many triggers went to the steady room.
async fn load_phase(
    addr: &str,
    length: Duration,
    amqp: &Arc<AmqpPublisher>,
    exchange: &str,
    counts: &Arc<Counts>,
) -> (Vec<Vec<u64>>, u64) {
    let url = format!("ws://{addr}/ws/?token=soak");
    let mut steady = Vec::new();
    for _ in 0..STEADY {
        steady.push(steady_client(url.clone()).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..CHURNERS {
        tasks.push(tokio::spawn(churn(url.clone(), stop.clone(), counts.clone(), i as u64 + 1)));
    }
    for _ in 0..SLOW {
        tasks.push(tokio::spawn(slow_reader(url.clone(), stop.clone(), counts.clone())));
    }
    tasks.push(tokio::spawn(hostile(addr.to_string(), stop.clone(), counts.clone(), amqp.clone(), exchange.into())));
    // Triggers, alternating between AMQP and POST /trigger, each to the
    // steady room and a churn room, while the steady clients read.
    let readers: Vec<_> = steady
        .into_iter()
        .map(|(mut c, mut seen)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                // A frame now and then, so the idle timeout (300 s) does not
                // close a client that only listens.
                let mut alive = tokio::time::interval(Duration::from_secs(60));
                loop {
                    let next = tokio::select! {
                        _ = alive.tick() => {
                            let status = json!({"type": "status"}).to_string();
                            c.ws.send(Message::text(status)).await.expect("a steady client sends");
                            continue;
                        }
                        next = tokio::time::timeout(Duration::from_secs(3), c.ws.next()) => next,
                    };
                    match next {
                        Ok(Some(Ok(Message::Text(t)))) => {
                            let v: Value = serde_json::from_str(&t).expect("publish is JSON");
                            if let Some(seq) = v["data"]["seq"].as_u64() {
                                seen.push(seq);
                            }
                        }
                        Ok(Some(Ok(_))) => {}
                        Ok(Some(Err(e))) => panic!("a steady client lost its connection: {e}"),
                        Ok(None) => panic!("a steady client's connection ended"),
                        Err(_) if stop.load(Ordering::Relaxed) => return seen,
                        Err(_) => {}
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut seq = 0u64;
    while started.elapsed() < length {
        seq += 1;
        let body = json!({"rooms": [{"user": "steady"}, {"user": seq % 20}], "data": {"seq": seq}});
        if seq % 2 == 0 {
            amqp.publish(exchange, body.to_string().as_bytes()).await;
        } else {
            let (status, answer) =
                common::http_post(&format!("http://{addr}/trigger"), Some("soak-token"), body.to_string().into()).await;
            assert_eq!(status, 202, "{answer}");
        }
        counts.triggers.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The last triggers reach the steady clients, then everything stops.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load task");
    }
    let mut sequences = Vec::new();
    for r in readers {
        sequences.push(r.await.expect("steady reader"));
    }
    (sequences, seq)
}

/// Waits until the gauges are back to zero and the handshake timeouts and
/// lingering closes have run out, then a little for the allocator to return
/// freed pages.
async fn settle(pid: u32, base: &str) -> Footprint {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let f = footprint(pid, base).await;
        let idle = f.connections_open == 0.0
            && f.subscriptions_active == 0.0
            && f.rooms_active == 0.0
            && f.http_connections_pending == 0.0
            && f.index_projections == 0.0;
        if idle {
            break;
        }
        assert!(Instant::now() < deadline, "the gateway does not return to idle: {f:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Handshake timeout 2 s, lingering 2 s; jemalloc returns dirty pages over ~10 s.
    tokio::time::sleep(Duration::from_secs(12)).await;
    footprint(pid, base).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_returns_to_its_baseline_after_a_soak() {
    let seconds: u64 = std::env::var("HT_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let amqp = Arc::new(AmqpPublisher::connect().await);
    let exchange = unique_exchange("soak");
    let backend = TestBackend::new().answer("soak", Answer::rooms(json!([{"user": "*"}])));
    let backend_url = backend.serve().await;
    let port = common::free_port();
    let config = std::env::temp_dir().join(format!("ht-soak-{}.yaml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\nbackend: {{url: '{backend_url}'}}\n{}\
             limits: {{handshakeTimeoutSeconds: 2, outboundQueue: 64}}\n\
             shutdown: {{drainDelaySeconds: 0, closeWindowSeconds: 1}}\n",
            common::amqp_config(&exchange)
        ),
    )
    .expect("write config");
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("HT_TRIGGER_TOKEN", "soak-token")
        .env("HT_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn gateway");
    let pid = child.id().expect("pid");
    let base = common::wait_process_ready(port).await;
    let addr = format!("127.0.0.1:{port}");

    // Warm-up with the same load: pools, caches and allocator arenas fill.
    let warm = Duration::from_secs((seconds / 6).max(8));
    let counts = Arc::new(Counts::default());
    load_phase(&addr, warm, &amqp, &exchange, &counts).await;
    let baseline = settle(pid, &base).await;

    let counts = Arc::new(Counts::default());
    let (sequences, sent_to_steady) = load_phase(&addr, Duration::from_secs(seconds), &amqp, &exchange, &counts).await;
    let after = settle(pid, &base).await;
    println!(
        "soak {seconds} s: {} connections, {} triggers, {} hostile rounds; baseline {baseline:?}; after {after:?}",
        counts.connections.load(Ordering::Relaxed),
        counts.triggers.load(Ordering::Relaxed),
        counts.hostile.load(Ordering::Relaxed),
    );
    // Every trigger once, and in order per publisher: odd numbers went
    // through POST /trigger (the gateway's own AMQP channel), even ones
    // through the test's AMQP connection. RabbitMQ orders per channel, so
    // two publishers 20 ms apart may arrive swapped on a loaded machine.
    for (i, seen) in sequences.iter().enumerate() {
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert!(
            sorted.len() == seen.len() && sorted == (1..=sent_to_steady).collect::<Vec<u64>>(),
            "steady client {i} got {} of {sent_to_steady} triggers (or some twice)",
            seen.len()
        );
        for parity in [0, 1] {
            let one_way: Vec<u64> = seen.iter().copied().filter(|s| s % 2 == parity).collect();
            assert!(one_way.is_sorted(), "steady client {i}: triggers of one publisher out of order: {one_way:?}");
        }
    }
    assert!(counts.connections.load(Ordering::Relaxed) > (CHURNERS as u64) * seconds / 2, "the churn did not run");
    assert!(after.open_files <= baseline.open_files + 4, "open files grew: {baseline:?} → {after:?}");
    let rss_margin = baseline.rss_kib / 4 + 8 * 1024;
    assert!(after.rss_kib <= baseline.rss_kib + rss_margin, "RSS grew: {baseline:?} → {after:?}");
    let _ = child.kill().await;
    amqp.delete_exchange(&exchange).await;
    let _ = std::fs::remove_file(&config);
}
