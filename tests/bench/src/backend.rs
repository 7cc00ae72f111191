//! The bundled backend: a tiny HTTP server standing in for the API (Django
//! in 3.x deployments) so a benchmark needs nothing else. Every `GET` (the
//! gateway calls `<backend.url>bootstrap/`) answers
//! `{"allowed_rooms":[...]}` with the configured rooms, whoever asks. For
//! the `admission` scenario it can stand in for a slow API with a bounded
//! number of workers, and records how many calls it had at once.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// The rooms every preset scenario subscribes to, as wildcards: what the
/// bundled backend allows when no `--allow` is given.
pub fn default_allowed_rooms() -> Vec<Value> {
    vec![
        json!({"user": "*"}),
        json!({"group": "*"}),
        json!({"hot": "*"}),
        json!({"room": "*"}),
        json!({"customer": "*", "warehouse": "*"}),
    ]
}

/// How the bundled backend answers, beyond its rooms.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// Serve at most this many calls at once; the others wait (inside the
    /// backend, still counted as in flight), as an API with that many
    /// workers would. `None`: no bound.
    pub capacity: Option<usize>,
    /// Time each call takes (after it got one of the `capacity` slots).
    pub delay: Duration,
    /// Add `{"credential": "<Authorization header>"}` to each answer's
    /// rooms, so a client can check the answer was computed for its own
    /// credentials (a gateway that coalesces calls must never share them
    /// between credentials).
    pub per_credential: bool,
}

/// What the bundled backend saw.
#[derive(Debug)]
pub struct BackendStats {
    /// Bootstrap requests answered.
    pub requests: AtomicU64,
    /// Requests arrived and not answered yet (waiting for a slot or served).
    pub in_flight: AtomicU64,
    /// Largest `in_flight` seen.
    pub peak_in_flight: AtomicU64,
    /// First request's arrival, µs since `epoch` (`u64::MAX`: none yet).
    pub first_us: AtomicU64,
    /// Last answer, µs since `epoch`.
    pub last_us: AtomicU64,
    /// Distinct `Authorization` values seen (with `per_credential` only).
    pub credentials: Mutex<HashSet<String>>,
    /// When each call was answered, µs since `epoch` (with `per_credential` only).
    pub answered_us: Mutex<Vec<u64>>,
    /// Time zero of `first_us` and `last_us`.
    pub epoch: Instant,
}

impl BackendStats {
    fn new() -> BackendStats {
        BackendStats {
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
            first_us: AtomicU64::new(u64::MAX),
            last_us: AtomicU64::new(0),
            credentials: Mutex::new(HashSet::new()),
            answered_us: Mutex::new(Vec::new()),
            epoch: Instant::now(),
        }
    }

    /// Forgets everything but the requests in flight now (between runs).
    pub fn reset(&self) {
        self.requests.store(0, Ordering::Relaxed);
        self.peak_in_flight.store(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
        self.first_us.store(u64::MAX, Ordering::Relaxed);
        self.last_us.store(0, Ordering::Relaxed);
        crate::client::lock(&self.credentials).clear();
        crate::client::lock(&self.answered_us).clear();
    }

    /// Seconds from the first request's arrival to the last answer.
    pub fn busy_seconds(&self) -> Option<f64> {
        let (first, last) = (self.first_us.load(Ordering::Relaxed), self.last_us.load(Ordering::Relaxed));
        (first != u64::MAX && last > first).then(|| (last - first) as f64 / 1e6)
    }

    /// µs since `epoch`.
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

/// A running bundled backend.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub stats: Arc<BackendStats>,
}

/// Everything a request handler needs.
struct Shared {
    /// The answer (without the per-credential room).
    body: Arc<str>,
    /// The allowed rooms, for per-credential answers.
    allowed_rooms: Vec<Value>,
    /// Slots, when the capacity is bounded.
    slots: Option<Semaphore>,
    /// How it answers.
    options: BackendOptions,
    /// What it saw.
    stats: Arc<BackendStats>,
}

/// Binds `listen` and serves in the background; returns once listening.
pub async fn start(listen: SocketAddr, allowed_rooms: Vec<Value>) -> Result<Backend, String> {
    start_with(listen, allowed_rooms, BackendOptions::default()).await
}

/// [`start`] with a bounded capacity, a delay per call, per-credential answers.
pub async fn start_with(
    listen: SocketAddr,
    allowed_rooms: Vec<Value>,
    options: BackendOptions,
) -> Result<Backend, String> {
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("backend: cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| format!("backend: {e}"))?;
    let body: Arc<str> = answer_body(&allowed_rooms).into();
    let stats = Arc::new(BackendStats::new());
    let shared = Arc::new(Shared {
        body,
        allowed_rooms,
        slots: options.capacity.map(|n| Semaphore::new(n.max(1))),
        options,
        stats: stats.clone(),
    });
    let app = Router::new().fallback(move |method: Method, headers: HeaderMap| {
        let shared = shared.clone();
        async move { answer(&method, &headers, &shared).await }
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("backend: server stopped: {e}");
        }
    });
    Ok(Backend { addr, stats })
}

fn answer_body(allowed_rooms: &[Value]) -> String {
    json!({ "allowed_rooms": allowed_rooms, "user": {"id": 1, "username": "bench"} }).to_string()
}

/// Counts a request out of `in_flight` however it ends (the gateway may
/// give up on it).
struct InFlight<'a>(&'a BackendStats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The answer to one request.
async fn answer(method: &Method, headers: &HeaderMap, shared: &Shared) -> Response {
    if method != Method::GET {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let stats = &shared.stats;
    let now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    let _in_flight = InFlight(stats);
    stats.peak_in_flight.fetch_max(now, Ordering::Relaxed);
    stats.first_us.fetch_min(stats.now_us(), Ordering::Relaxed);
    let _slot = match &shared.slots {
        Some(slots) => Some(slots.acquire().await),
        None => None,
    };
    if !shared.options.delay.is_zero() {
        tokio::time::sleep(shared.options.delay).await;
    }
    let body = if shared.options.per_credential {
        let credential = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
        crate::client::lock(&stats.credentials).insert(credential.to_string());
        let mut rooms = shared.allowed_rooms.clone();
        rooms.push(json!({ "credential": credential }));
        answer_body(&rooms)
    } else {
        shared.body.to_string()
    };
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let now = stats.now_us();
    stats.last_us.fetch_max(now, Ordering::Relaxed);
    if shared.options.per_credential {
        crate::client::lock(&stats.answered_us).push(now);
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Parses `--allow` values: each a JSON room object, or a JSON list of them.
pub fn parse_allowed(values: &[String]) -> Result<Vec<Value>, String> {
    let mut rooms = Vec::new();
    for text in values {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(room)) => rooms.push(Value::Object(room)),
            Ok(Value::Array(list)) if list.iter().all(Value::is_object) => rooms.extend(list),
            _ => return Err(format!("--allow {text:?}: expected a JSON room object or a list of them")),
        }
    }
    Ok(rooms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_allowed_rooms() {
        let rooms = parse_allowed(&[r#"{"user":"*"}"#.into(), r#"[{"a":1},{"b":"*"}]"#.into()]).expect("valid");
        assert_eq!(rooms, vec![json!({"user":"*"}), json!({"a":1}), json!({"b":"*"})]);
        assert!(parse_allowed(&["[1]".into()]).is_err());
        assert!(parse_allowed(&["nope".into()]).is_err());
    }

    #[tokio::test]
    async fn answers_bootstrap() {
        crate::install_tls_provider();
        let backend = start("127.0.0.1:0".parse().expect("addr"), vec![json!({"user": "*"})]).await.expect("starts");
        let url = format!("http://{}/api/bootstrap/", backend.addr);
        let response = reqwest::get(&url).await.expect("answers");
        assert_eq!(response.status(), 200);
        let body: Value = serde_json::from_str(&response.text().await.expect("body")).expect("json");
        assert_eq!(body["allowed_rooms"], json!([{"user": "*"}]));
        assert_eq!(backend.stats.requests.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn bounded_capacity_records_the_peak_and_answers_per_credential() {
        crate::install_tls_provider();
        let options = BackendOptions { capacity: Some(2), delay: Duration::from_millis(50), per_credential: true };
        let backend = start_with("127.0.0.1:0".parse().expect("addr"), vec![json!({"user": "*"})], options)
            .await
            .expect("starts");
        let url = format!("http://{}/bootstrap/", backend.addr);
        let client = reqwest::Client::new();
        let started = Instant::now();
        let calls = (0..4).map(|i| {
            let request = client.get(&url).header("authorization", format!("Token t{i}"));
            async move { request.send().await.expect("answers").text().await.expect("body") }
        });
        let bodies = futures_util::future::join_all(calls).await;
        // Two slots, four calls of 50 ms: two rounds.
        assert!(started.elapsed() >= Duration::from_millis(100), "{:?}", started.elapsed());
        for (i, body) in bodies.iter().enumerate() {
            let body: Value = serde_json::from_str(body).expect("json");
            assert_eq!(body["allowed_rooms"], json!([{"user": "*"}, {"credential": format!("Token t{i}")}]));
        }
        let stats = &backend.stats;
        assert_eq!(stats.requests.load(Ordering::Relaxed), 4);
        assert_eq!(stats.peak_in_flight.load(Ordering::Relaxed), 4, "waiting calls count as in flight");
        assert_eq!(stats.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(crate::client::lock(&stats.credentials).len(), 4);
        assert_eq!(crate::client::lock(&stats.answered_us).len(), 4);
        assert!(stats.busy_seconds().is_some_and(|s| s >= 0.1));
        stats.reset();
        assert_eq!((stats.requests.load(Ordering::Relaxed), stats.peak_in_flight.load(Ordering::Relaxed)), (0, 0));
        assert_eq!(stats.busy_seconds(), None);
    }
}
