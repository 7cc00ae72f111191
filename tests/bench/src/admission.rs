//! The `admission` scenario: a reconnect storm. Every client connects at
//! once (as after a rollout); a refused upgrade (HTTP 503) is retried after
//! its `Retry-After` seconds plus a little jitter, other failures after a
//! second, until every client is connected and authorised or the storm's
//! time is up. The bundled backend stands in for an API that serves a
//! bounded number of bootstrap calls at once and records how many it had in
//! flight: that peak must not exceed the gateway's
//! `backend.admission.maxConcurrent`.
//!
//! Variants: every client its own credential (nothing to coalesce), or the
//! clients shared out over a few users (≈ 20 tabs each) so a coalescing
//! gateway (`backend.coalesce: true`) can make one call for several.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::backend::BackendStats;
use crate::client::{self, Ctx, OpenError, Stats, lock, new_histogram};
use crate::procstat::{self, delta};
use crate::report::{AdmissionBackend, AdmissionGateway, AdmissionReport, Latency};
use crate::rooms::Rng;

/// Who the clients of a storm are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Variant {
    /// Every client its own credential: nothing can be coalesced.
    Distinct,
    /// The clients shared out over `--users` users, tabs in random order
    /// (each tab reconnects on its own, as after a rollout).
    Shared,
    /// Shared, each user's tabs one after the other (as after a network
    /// blip, when one browser's tabs reconnect together).
    Grouped,
}

impl Variant {
    /// Name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Distinct => "distinct",
            Variant::Shared => "shared",
            Variant::Grouped => "grouped",
        }
    }

    /// Whether clients share credentials (and so the coalescing gateway is used).
    pub fn shares(self) -> bool {
        self != Variant::Distinct
    }
}

/// One storm.
#[derive(Debug, Clone)]
pub struct StormSpec {
    /// Which clients.
    pub variant: Variant,
    /// Clients.
    pub clients: usize,
    /// Distinct credentials (= clients for [`Variant::Distinct`]).
    pub users: usize,
}

impl StormSpec {
    /// The user (credential) of each client, in the order they connect.
    pub fn users_of_clients(&self, seed: u64) -> Vec<usize> {
        let users = self.users.max(1);
        match self.variant {
            Variant::Distinct => (0..self.clients).collect(),
            // Consecutive clients are one user's tabs.
            Variant::Grouped => (0..self.clients).map(|i| i * users / self.clients.max(1)).collect(),
            Variant::Shared => {
                let mut order: Vec<usize> = (0..self.clients).map(|i| i % users).collect();
                let mut rng = Rng::new(seed);
                for i in (1..order.len()).rev() {
                    let j = rng.below(i as u64 + 1) as usize;
                    order.swap(i, j);
                }
                order
            }
        }
    }
}

/// Settings of every storm of an invocation, and where this one goes.
#[derive(Debug, Clone)]
pub struct StormOptions {
    /// Websocket URL ending in `token=` (the client's token is appended).
    pub url_prefix: String,
    /// The gateway's `/metrics` (scraped before, during and after).
    pub metrics_url: String,
    /// The gateway's address.
    pub server: SocketAddr,
    /// Source addresses.
    pub sources: Vec<IpAddr>,
    /// The gateway's pid.
    pub server_pid: Option<u32>,
    /// Per attempt: connect + upgrade + authorisation frame.
    pub connect_timeout: Duration,
    /// The whole storm; clients not connected by then have failed.
    pub timeout: Duration,
    /// Added to each `Retry-After`: uniform in `0..jitter`.
    pub jitter: Duration,
    /// The bound the backend's peak must stay within (the gateway's
    /// `backend.admission.maxConcurrent`).
    pub max_concurrent: u64,
    /// The bundled backend's capacity and delay (reported).
    pub backend_capacity: Option<usize>,
    /// Time per backend call.
    pub backend_delay: Duration,
    /// PRNG seed.
    pub seed: u64,
    /// Progress lines on stderr.
    pub progress: bool,
}

/// What one client of a storm went through.
#[derive(Debug, Default, Clone)]
struct ClientOutcome {
    /// Connected and authorised.
    connected: bool,
    /// Attempts made.
    attempts: u64,
    /// First attempt → authorised, µs.
    latency_us: u64,
    /// When it got authorised, µs since the storm's start.
    done_us: u64,
    /// Its authorisation frame did not carry its own credential's room.
    wrong_answer: bool,
}

/// Counters the clients of a storm share.
#[derive(Debug, Default)]
struct Shared {
    /// Connected and authorised.
    connected: AtomicU64,
    /// Gave up (time is up, or a refusal that is not worth retrying).
    failed: AtomicU64,
    /// Refusals (non-101 answers), by `"<status> <reason>"`.
    refusals: Mutex<BTreeMap<String, u64>>,
    /// `Retry-After` values received, by seconds.
    retry_after: Mutex<BTreeMap<u64, u64>>,
}

/// Counts one of `key` in `map`.
fn count<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    *lock(map).entry(key).or_insert(0) += 1;
}

/// One client: attempts until connected or `deadline`, then holds the
/// connection until `stop`.
#[allow(clippy::too_many_arguments)]
async fn storm_client(
    ctx: Arc<Ctx>,
    shared: Arc<Shared>,
    url: String,
    credential: String,
    source: usize,
    options: Arc<StormOptions>,
    deadline: tokio::time::Instant,
    start: Instant,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) -> ClientOutcome {
    let mut rng = Rng::new(seed);
    let mut outcome = ClientOutcome::default();
    let first = Instant::now();
    let jitter = |rng: &mut Rng| Duration::from_micros(rng.below(options.jitter.as_micros().max(1) as u64));
    let ws = loop {
        outcome.attempts += 1;
        let pause = match client::attempt(&ctx, &url, source).await {
            Ok((ws, rooms)) => {
                let own = json!({ "credential": credential.as_str() });
                outcome.wrong_answer = !rooms.contains(&own);
                break Some(ws);
            }
            Err(OpenError::Refused { status, retry_after, reason }) => {
                count(&shared.refusals, format!("{status} {reason}"));
                if let Some(seconds) = retry_after {
                    count(&shared.retry_after, seconds);
                }
                if status != 503 && status != 429 {
                    ctx.stats.error(format!("refused with HTTP {status} ({reason}): not retried"));
                    break None;
                }
                Duration::from_secs(retry_after.unwrap_or(1)) + jitter(&mut rng)
            }
            // 1013: try again later (the circuit breaker's answer).
            Err(OpenError::Closed(1013)) => {
                ctx.stats.error("closed 1013 before the authorisation frame (retried)");
                Duration::from_secs(1) + jitter(&mut rng)
            }
            Err(OpenError::Unauthorized) => {
                ctx.stats.error("is_authorized false (not retried)");
                break None;
            }
            Err(e) => {
                ctx.stats.error(format!("{e} (retried after 1 s)"));
                Duration::from_secs(1) + jitter(&mut rng)
            }
        };
        if tokio::time::Instant::now() + pause >= deadline {
            ctx.stats.error("not connected before the storm timeout");
            break None;
        }
        tokio::time::sleep(pause).await;
    };
    let Some(ws) = ws else {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        return outcome;
    };
    outcome.connected = true;
    outcome.latency_us = first.elapsed().as_micros() as u64;
    outcome.done_us = start.elapsed().as_micros() as u64;
    shared.connected.fetch_add(1, Ordering::Relaxed);
    // Hold it (answering pings) until every client is done.
    let mut ws = ws;
    let ended = loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break false,
            next = futures_util::StreamExt::next(&mut ws) => match next {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break true,
            },
        }
    };
    if ended {
        ctx.stats.error("connection ended by the server during the storm");
        let _ = stop.wait_for(|s| *s).await;
    } else {
        client::close(ws).await;
    }
    outcome
}

/// The gateway's counters this storm looks at, from `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
struct Scrape {
    queue_full: f64,
    timeout: f64,
    pending_limit: f64,
    coalesced: f64,
    authorized: f64,
    in_flight: f64,
    queued: f64,
}

/// The value of the first sample line `name` (with its labels, exactly).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

fn parse_scrape(text: &str) -> Option<Scrape> {
    let get = |name: &str| sample(text, name).unwrap_or(0.0);
    // Not a high-templar gateway (or not this version): nothing.
    sample(text, "hightemplar_bootstrap_in_flight")?;
    Some(Scrape {
        queue_full: get(r#"hightemplar_connections_refused_total{reason="admission_queue_full"}"#),
        timeout: get(r#"hightemplar_connections_refused_total{reason="admission_timeout"}"#),
        pending_limit: get(r#"hightemplar_http_connections_closed_total{reason="pending_limit"}"#),
        coalesced: get("hightemplar_bootstrap_coalesced_total"),
        authorized: get(r#"hightemplar_auth_total{outcome="authorized"}"#),
        in_flight: get("hightemplar_bootstrap_in_flight"),
        queued: get("hightemplar_bootstrap_queued"),
    })
}

async fn scrape(client: &reqwest::Client, url: &str) -> Option<Scrape> {
    let response = client.get(url).timeout(Duration::from_secs(2)).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    parse_scrape(&response.text().await.ok()?)
}

fn progress(options: &StormOptions, message: impl AsRef<str>) {
    if options.progress {
        eprintln!("[bench] {}", message.as_ref());
    }
}

/// Runs one storm against the gateway of `options`, with the bundled
/// backend's `backend` stats (reset first).
pub async fn run(spec: &StormSpec, options: StormOptions, backend: &BackendStats) -> Result<AdmissionReport, String> {
    let options = Arc::new(options);
    let name = spec.variant.name();
    let users = spec.users_of_clients(options.seed ^ 0x0053_544f_524d);
    let credentials = if spec.variant.shares() { spec.users.max(1) } else { spec.clients };
    let http = reqwest::Client::builder().build().map_err(|e| format!("HTTP client: {e}"))?;
    let before_scrape = scrape(&http, &options.metrics_url).await;
    backend.reset();
    let stats = Arc::new(Stats::new(0));
    let ctx = Arc::new(Ctx {
        url: String::new(),
        server: options.server,
        sources: options.sources.clone(),
        ws_config: WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_write_buffer_size(1 << 20)
            .max_message_size(Some(16 << 20)),
        connect_timeout: options.connect_timeout,
        subscribe_timeout: Duration::from_secs(1),
        epoch: Instant::now(),
        stats: stats.clone(),
        // All at once: that is the storm.
        connect_permits: Arc::new(Semaphore::new(spec.clients.max(1))),
        client_ping: None,
        // The storm exercises the 3.x gateway's admission control.
        protocol: client::Protocol::HighTemplar,
    });
    let shared = Arc::new(Shared::default());
    let before = procstat::sample(options.server_pid);
    let bench_cpu0 = procstat::self_cpu_seconds();
    let rss_max = Arc::new(AtomicU64::new(before.rss_kib.unwrap_or(0)));
    progress(&options, format!("admission {name}: {} clients, {credentials} credentials, all at once", spec.clients));
    let (stop_tx, stop_rx) = watch::channel(false);
    let start = Instant::now();
    let start_backend_us = backend.now_us();
    let deadline = tokio::time::Instant::now() + options.timeout;
    let mut handles = Vec::with_capacity(spec.clients);
    let mut seeds = Rng::new(options.seed ^ 0x6a69_7474_6572_u64);
    for (i, &user) in users.iter().enumerate() {
        let credential = format!("htb-{name}-{user}");
        let url = format!("{}{credential}", options.url_prefix);
        // The gateway forwards `Authorization: Token <token>`.
        let credential = format!("Token {credential}");
        // One user's tabs come from one address (the gateway forwards the
        // peer address as X-Real-IP, part of what must be equal to coalesce).
        let source = if spec.variant.shares() { user } else { i };
        handles.push(tokio::spawn(storm_client(
            ctx.clone(),
            shared.clone(),
            url,
            credential,
            source,
            options.clone(),
            deadline,
            start,
            seeds.next_u64(),
            stop_rx.clone(),
        )));
    }

    // Watch: progress, the server's RSS, the gateway's gauges.
    let mut last_print = Instant::now();
    let mut gauges_max = (0.0f64, 0.0f64);
    let mut next_scrape = Instant::now();
    loop {
        let done = shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
        if done >= spec.clients as u64 {
            break;
        }
        if let Some(kib) = options.server_pid.and_then(procstat::rss_kib) {
            rss_max.fetch_max(kib, Ordering::Relaxed);
        }
        if Instant::now() >= next_scrape {
            if let Some(s) = scrape(&http, &options.metrics_url).await {
                gauges_max = (gauges_max.0.max(s.in_flight), gauges_max.1.max(s.queued));
            }
            next_scrape = Instant::now() + Duration::from_millis(200);
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            let refused: u64 = lock(&shared.refusals).values().sum();
            progress(
                &options,
                format!(
                    "admission {name}: {}/{} connected, {refused} refusals, backend {} calls, peak {} at once",
                    shared.connected.load(Ordering::Relaxed),
                    spec.clients,
                    backend.requests.load(Ordering::Relaxed),
                    backend.peak_in_flight.load(Ordering::Relaxed)
                ),
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let backend_seconds = backend.busy_seconds();
    let calls = backend.requests.load(Ordering::Relaxed);
    let peak = backend.peak_in_flight.load(Ordering::Relaxed);
    let distinct_called = lock(&backend.credentials).len() as u64;
    let calls_timeline = per_second(lock(&backend.answered_us).iter().map(|&us| us.saturating_sub(start_backend_us)));
    let after = procstat::sample(options.server_pid);
    let bench_cpu = delta(bench_cpu0, procstat::self_cpu_seconds());
    if let Some(kib) = after.rss_kib {
        rss_max.fetch_max(kib, Ordering::Relaxed);
    }
    let after_scrape = scrape(&http, &options.metrics_url).await;
    progress(&options, format!("admission {name}: done in {seconds:.2}s, closing"));
    let _ = stop_tx.send(true);
    let mut outcomes = Vec::with_capacity(handles.len());
    for handle in handles {
        outcomes.push(handle.await.unwrap_or_default());
    }

    let mut latency = new_histogram();
    let mut last_us = 0;
    for o in outcomes.iter().filter(|o| o.connected) {
        latency.saturating_record(o.latency_us.max(1));
        last_us = last_us.max(o.done_us);
    }
    let connected = outcomes.iter().filter(|o| o.connected).count() as u64;
    let connected_timeline = per_second(outcomes.iter().filter(|o| o.connected).map(|o| o.done_us));
    let attempts: u64 = outcomes.iter().map(|o| o.attempts).sum();
    let refusals = lock(&shared.refusals).clone();
    let storm_seconds = if last_us > 0 { last_us as f64 / 1e6 } else { seconds };
    let gateway = match (before_scrape, after_scrape) {
        (Some(b), Some(a)) => Some(AdmissionGateway {
            refused_queue_full: (a.queue_full - b.queue_full) as u64,
            refused_timeout: (a.timeout - b.timeout) as u64,
            closed_pending_limit: (a.pending_limit - b.pending_limit) as u64,
            coalesced: (a.coalesced - b.coalesced) as u64,
            authorized: (a.authorized - b.authorized) as u64,
            in_flight_max_sampled: gauges_max.0 as u64,
            queued_max_sampled: gauges_max.1 as u64,
        }),
        _ => None,
    };
    Ok(AdmissionReport {
        name: name.to_string(),
        variant: name.to_string(),
        url: options.url_prefix.trim_end_matches("token=").trim_end_matches(['?', '&']).to_string(),
        clients: spec.clients as u64,
        credentials: credentials as u64,
        connected,
        failed: spec.clients as u64 - connected,
        wrong_answers: outcomes.iter().filter(|o| o.connected && o.wrong_answer).count() as u64,
        seconds: storm_seconds,
        connects_per_second: (storm_seconds > 0.0).then(|| connected as f64 / storm_seconds),
        latency_ms: Latency::from_histogram(&latency),
        attempts,
        attempts_max: outcomes.iter().map(|o| o.attempts).max().unwrap_or(0),
        refusals_503: refusals.iter().filter(|(k, _)| k.starts_with("503")).map(|(_, n)| n).sum(),
        refusals,
        retry_after_seconds: lock(&shared.retry_after).iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        connected_per_second: connected_timeline,
        backend: AdmissionBackend {
            calls,
            calls_per_second: backend_seconds.filter(|_| calls > 0).map(|s| calls as f64 / s),
            busy_seconds: backend_seconds,
            peak_concurrent: peak,
            max_concurrent: options.max_concurrent,
            capacity: options.backend_capacity.map(|c| c as u64),
            delay_ms: options.backend_delay.as_secs_f64() * 1e3,
            credentials_called: distinct_called,
            calls_per_second_timeline: calls_timeline,
        },
        gateway,
        server_cpu_seconds: delta(before.cpu_seconds, after.cpu_seconds),
        server_rss_max_kib: options.server_pid.map(|_| rss_max.load(Ordering::Relaxed)),
        errors: lock(&stats.errors).clone(),
        bench_cpu_seconds: bench_cpu,
        wall_seconds: seconds,
    })
}

/// Counts of `times` (µs since the start) per whole second.
fn per_second(times: impl Iterator<Item = u64>) -> Vec<u64> {
    let mut buckets = Vec::new();
    for us in times {
        let second = (us / 1_000_000) as usize;
        if buckets.len() <= second {
            buckets.resize(second + 1, 0);
        }
        buckets[second] += 1;
    }
    buckets
}

/// The figures of the scenario, one entry per variant.
pub fn summary(reports: &[AdmissionReport]) -> Value {
    let mut out = serde_json::Map::new();
    for r in reports {
        out.insert(
            r.name.clone(),
            json!({
                "clients": r.clients,
                "credentials": r.credentials,
                "connected": r.connected,
                "seconds": r.seconds,
                "connect_p50_ms": r.latency_ms.p50,
                "connect_p99_ms": r.latency_ms.p99,
                "refusals_503": r.refusals_503,
                "backend_calls": r.backend.calls,
                "backend_calls_per_second": r.backend.calls_per_second,
                "backend_peak_concurrent": r.backend.peak_concurrent,
                "max_concurrent": r.backend.max_concurrent,
                "coalesced": r.gateway.as_ref().map(|g| g.coalesced),
            }),
        );
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_of_clients() {
        let spec = |variant| StormSpec { variant, clients: 100, users: 5 };
        assert_eq!(spec(Variant::Distinct).users_of_clients(1), (0..100).collect::<Vec<_>>());
        let grouped = spec(Variant::Grouped).users_of_clients(1);
        assert_eq!((grouped[0], grouped[19], grouped[20], grouped[99]), (0, 0, 1, 4));
        let shared = spec(Variant::Shared).users_of_clients(1);
        let mut per_user = [0; 5];
        shared.iter().for_each(|&u| per_user[u] += 1);
        assert_eq!(per_user, [20; 5], "20 tabs each");
        assert_ne!(shared, grouped, "shuffled");
        assert_eq!(shared, spec(Variant::Shared).users_of_clients(1), "reproducible");
    }

    #[test]
    fn buckets_per_second() {
        assert_eq!(per_second([0, 999_999, 1_000_000, 3_500_000].into_iter()), vec![2, 1, 0, 1]);
        assert!(per_second(std::iter::empty()).is_empty());
    }

    #[test]
    fn parses_the_gateways_metrics() {
        let text = "# TYPE hightemplar_bootstrap_in_flight gauge\n\
            hightemplar_bootstrap_in_flight 3\n\
            hightemplar_bootstrap_queued 250\n\
            hightemplar_bootstrap_coalesced_total 17\n\
            hightemplar_connections_refused_total{reason=\"admission_queue_full\"} 9000\n\
            hightemplar_connections_refused_total{reason=\"admission_timeout\"} 2\n\
            hightemplar_auth_total{outcome=\"authorized\"} 10000\n\
            # EOF\n";
        let s = parse_scrape(text).expect("a gateway");
        assert_eq!((s.in_flight, s.queued, s.coalesced), (3.0, 250.0, 17.0));
        assert_eq!((s.queue_full, s.timeout, s.pending_limit, s.authorized), (9000.0, 2.0, 0.0, 10000.0));
        assert!(parse_scrape("something else 1\n").is_none());
    }
}
