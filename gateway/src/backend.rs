//! `BootstrapClient`: asks the existing API who a connecting user is
//! (`GET <backend.url><bootstrapPath>`) and which rooms they may join.
//!
//! The outcome decides the close code (DESIGN.md §2 "Connect"): a refusal
//! (`401`/`403`, any other 3xx/4xx, or a body that is not a bootstrap answer)
//! closes with 4401, so the client treats the user as logged out; a backend
//! that is down, slow, overloaded (`429`) or failing (`5xx`) closes with 1013
//! (try again later), so clients retry instead of logging the user out.

use std::time::{Duration, Instant};

use axum::http::{HeaderName, HeaderValue, StatusCode};
use serde_json::value::RawValue;

use tracing::warn;

use crate::admission::{Admission, Admitted};
use crate::answer_cache::AnswerCache;
use crate::breaker::{CircuitBreaker, Permit};
use crate::coalesce::Coalescer;
use crate::config::{BackendConfig, seconds};
use crate::identity::{UserId, UserPath};
use crate::log_throttle::LogThrottle;
use crate::metrics::{Metrics, Outcome, TlsFailureLabels};
use crate::room::{InvalidRoomList, Room, parse_room_list};

/// Close code for a refused user.
pub const CLOSE_UNAUTHORIZED: u16 = 4401;
/// Close code for "try again later".
pub const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

/// Why a bootstrap call did not authorise the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    /// The backend refused the user.
    #[error("backend answered {0}")]
    Denied(StatusCode),
    /// `200`, but not `{"allowed_rooms": [room, …]}`.
    #[error("backend answer is not a bootstrap object: {0}")]
    InvalidBody(&'static str),
    /// Unreachable, timed out, `429` or `5xx`.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// Not called: the circuit breaker is open after repeated failures.
    #[error("backend unavailable: not called while the circuit breaker is open")]
    CircuitOpen,
    /// Not called: joined an identical call that was then abandoned, and no
    /// admission slot freed in time for a call of its own.
    #[error("backend busy: {0}")]
    Busy(crate::admission::Refused),
}

impl BootstrapError {
    /// The websocket close code this outcome gets.
    pub fn close_code(&self) -> u16 {
        match self {
            BootstrapError::Denied(_) | BootstrapError::InvalidBody(_) => CLOSE_UNAUTHORIZED,
            BootstrapError::Unavailable(_) | BootstrapError::CircuitOpen | BootstrapError::Busy(_) => {
                CLOSE_TRY_AGAIN_LATER
            }
        }
    }

    /// Metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            BootstrapError::Denied(_) => "denied",
            BootstrapError::InvalidBody(_) => "invalid_body",
            BootstrapError::Unavailable(_) => "unavailable",
            BootstrapError::CircuitOpen => "circuit_open",
            BootstrapError::Busy(_) => "busy",
        }
    }
}

/// The headers a bootstrap call sends.
type ForwardedRequest = Vec<(HeaderName, HeaderValue)>;

/// The coalescing key: the whole forwarded request, and the generation of
/// the call (0 for connects, a control message's for its refreshes), so a
/// refresh never shares an answer from a call that started before it was
/// asked for.
type CallKey = (u64, ForwardedRequest);

/// Generation of the calls of new connections.
pub const CONNECT: u64 = 0;
/// Generation of periodic refreshes (`permissions.refreshSeconds`).
pub const PERIODIC: u64 = u64::MAX;

/// What a forwarded request holds in memory, bytes, roughly (for budgets:
/// the kept answers, a session's kept request).
pub fn request_bytes(headers: &[(HeaderName, HeaderValue)]) -> usize {
    headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 64).sum()
}

/// What a bootstrap answer grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    /// Rooms the user may subscribe to.
    pub allowed: Vec<Room>,
    /// The user, at `permissions.userPath` (when configured and present).
    pub user: Option<UserId>,
}

/// Client for the backend's bootstrap endpoint.
pub struct BootstrapClient {
    /// HTTP client (pooled connections, TCP or unix socket).
    client: reqwest::Client,
    /// `backend.url` joined with `bootstrapPath`.
    url: reqwest::Url,
    /// Where latency and outcomes are counted.
    metrics: std::sync::Arc<Metrics>,
    /// `backend.maxBodyBytes`.
    max_body_bytes: usize,
    /// `backend.maxAllowedRooms`.
    max_allowed_rooms: usize,
    /// Stops calls to a failing backend.
    breaker: std::sync::Mutex<CircuitBreaker>,
    /// Identical concurrent requests share one call (`backend.coalesce`).
    coalescer: Option<Coalescer<CallKey, Result<Bootstrap, BootstrapError>>>,
    /// `permissions.userPath`.
    user_path: Option<UserPath>,
    /// Answers kept for identical connects (`backend.answerReuse`).
    answers: Option<std::sync::Mutex<KeptAnswers>>,
    /// Control messages received so far (the hub's count): kept answers
    /// from before the latest are dropped.
    controls: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The answer cache and the control count it was filled under.
struct KeptAnswers {
    /// Answers by request.
    cache: AnswerCache<ForwardedRequest, Bootstrap>,
    /// The control count when they were kept.
    controls: u64,
}

/// Why the client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BackendSetupError {
    /// `backend.url` + `bootstrapPath` is not a URL.
    #[error("backend.url / backend.bootstrapPath do not form a URL: {0}")]
    Url(String),
    /// The HTTP client could not be built.
    #[error("cannot build the backend HTTP client: {0}")]
    Client(String),
    /// `backend.tls` cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// The part of a bootstrap answer the gateway reads; the rest is skipped
/// without being built.
#[derive(serde::Deserialize)]
struct Answer<'a> {
    #[serde(borrow, default)]
    allowed_rooms: Option<&'a RawValue>,
}

/// Parses a bootstrap answer into at most `max_rooms` allowed rooms, one
/// room at a time (memory bounded by the limit, not by the answer).
pub fn parse_bootstrap(body: &[u8], max_rooms: usize) -> Result<Vec<Room>, BootstrapError> {
    // serde would also read a struct from a JSON array; an answer is an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(BootstrapError::InvalidBody("not a JSON object"));
    }
    let Ok(answer) = serde_json::from_slice::<Answer>(body) else {
        return Err(BootstrapError::InvalidBody("not a JSON object"));
    };
    match answer.allowed_rooms.map(RawValue::get) {
        None | Some("null") => Ok(Vec::new()),
        Some(rooms) => parse_room_list(rooms, max_rooms).map_err(|e| {
            BootstrapError::InvalidBody(match e {
                InvalidRoomList::NotAList => "allowed_rooms is not a list",
                InvalidRoomList::TooMany(_) => "more allowed_rooms than backend.maxAllowedRooms",
                InvalidRoomList::BadRoom { .. } => "allowed_rooms holds a non-room",
            })
        }),
    }
}

impl BootstrapClient {
    /// A client for `config`, reporting into `metrics`.
    pub fn new(config: &BackendConfig, metrics: std::sync::Arc<Metrics>) -> Result<BootstrapClient, BackendSetupError> {
        let base = config.url.as_deref().unwrap_or_default();
        // Join relative to the base's directory, whether or not it ends in '/'.
        let base = if base.ends_with('/') { base.to_string() } else { format!("{base}/") };
        let url = reqwest::Url::parse(&base)
            .and_then(|b| b.join(&config.bootstrap_path))
            .map_err(|e| BackendSetupError::Url(e.to_string()))?;
        let timeout = seconds(config.timeout_seconds);
        crate::tls::install_default_provider();
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            // A connect storm opens many backend connections at once; keep
            // only a few idle afterwards (each holds buffers of ~20 KiB).
            .pool_max_idle_per_host(32)
            .user_agent(concat!("high-templar-gateway/", env!("CARGO_PKG_VERSION")));
        if let Some(socket) = &config.socket {
            builder = builder.unix_socket(socket.clone());
        }
        if url.scheme() == "https" {
            // The same rustls configuration as the broker's (crate::tls);
            // reqwest adds its ALPN protocols to it.
            let tls = crate::tls::client_config(&config.tls, "backend.tls")?;
            builder = builder.tls_backend_preconfigured(rustls::ClientConfig::clone(&tls));
        }
        let client = builder.build().map_err(|e| BackendSetupError::Client(e.to_string()))?;
        Ok(BootstrapClient {
            client,
            url,
            metrics,
            max_body_bytes: config.max_body_bytes,
            max_allowed_rooms: config.max_allowed_rooms,
            breaker: std::sync::Mutex::new(CircuitBreaker::new(&config.circuit_breaker)),
            coalescer: config.coalesce.then(Coalescer::default),
            user_path: None,
            answers: (config.answer_reuse.seconds > 0.0).then(|| {
                let reuse = &config.answer_reuse;
                std::sync::Mutex::new(KeptAnswers {
                    cache: AnswerCache::new(seconds(reuse.seconds), reuse.max_entries, reuse.max_bytes),
                    controls: 0,
                })
            }),
            controls: std::sync::Arc::default(),
        })
    }

    /// Drops kept answers whenever `controls` (the hub's count of control
    /// messages) moves: a kept answer may predate a revocation.
    pub fn with_control_count(mut self, controls: std::sync::Arc<std::sync::atomic::AtomicU64>) -> BootstrapClient {
        self.controls = controls;
        self
    }

    /// The kept answers, emptied if a control message came since they were kept.
    fn kept(&self) -> Option<std::sync::MutexGuard<'_, KeptAnswers>> {
        let mut kept = self.answers.as_ref()?.lock().unwrap_or_else(|e| e.into_inner());
        let controls = self.controls.load(std::sync::atomic::Ordering::Relaxed);
        if kept.controls != controls {
            kept.cache.clear();
            kept.controls = controls;
        }
        Some(kept)
    }

    /// Keeps a successful answer for identical connects.
    fn keep(&self, headers: ForwardedRequest, answer: &Bootstrap) {
        if let Some(mut kept) = self.kept() {
            let bytes = answer.allowed.iter().map(Room::approx_bytes).sum::<usize>() + request_bytes(&headers);
            kept.cache.insert(headers, answer.clone(), bytes, Instant::now());
            self.metrics.answers_kept.set(kept.cache.len() as i64);
        }
    }

    /// Reads the user identity of each answer at `path`.
    pub fn with_user_path(mut self, path: Option<UserPath>) -> BootstrapClient {
        self.user_path = path;
        self
    }

    /// The bootstrap URL.
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// The circuit breaker's state now.
    pub fn circuit(&self) -> crate::breaker::State {
        self.breaker().state()
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, CircuitBreaker> {
        // A poisoned lock only means another thread panicked while recording.
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `permit`'s outcome and exposes the state.
    fn record(&self, permit: Permit, failed: bool) {
        let (opened, state) = {
            let mut breaker = self.breaker();
            let opened = breaker.record(permit, failed, Instant::now(), rand::random::<f64>());
            (opened, breaker.state())
        };
        self.metrics.backend_circuit_state.set(state.gauge());
        if opened {
            self.metrics.backend_circuit_opened.inc();
            warn!("backend failing: circuit breaker open, new connections get 1013 without a backend call");
        }
    }

    /// Whether an identical call (same forwarded `headers`) is in flight:
    /// an upgrade that would join it needs no admission slot.
    pub fn joins_call_in_flight(&self, headers: &ForwardedRequest) -> bool {
        self.kept().is_some_and(|mut kept| kept.cache.contains(headers, Instant::now()))
            || self.coalescer.as_ref().is_some_and(|c| c.is_in_flight(&(CONNECT, headers.clone())))
    }

    /// Calls the backend with the forwarded `headers`, unless the circuit
    /// breaker is open, or shares an identical call in flight. The call
    /// runs in the admission slot `held`; without one (the upgrade expected
    /// to join a call that has ended since), it takes one from `admission`
    /// first. Calls of the same `generation` ([`CONNECT`], [`PERIODIC`], a
    /// control message's) with the same headers may share one execution.
    pub async fn bootstrap(
        &self,
        headers: ForwardedRequest,
        held: Option<Admitted>,
        admission: &Admission,
        generation: u64,
    ) -> Result<Bootstrap, BootstrapError> {
        // Only connects take a kept answer: a refresh asks the backend.
        if generation == CONNECT
            && let Some(answer) = self.kept().and_then(|mut kept| kept.cache.get(&headers, Instant::now()))
        {
            self.metrics.bootstrap_reused.inc();
            self.metrics.auth.get_or_create(&Outcome { outcome: "authorized" }).inc();
            return Ok(answer);
        }
        let (permit, state) = {
            let mut breaker = self.breaker();
            (breaker.permit(Instant::now()), breaker.state())
        };
        // `permit` may have moved it from open to half-open.
        self.metrics.backend_circuit_state.set(state.gauge());
        if permit == Permit::Refused {
            self.metrics.auth.get_or_create(&Outcome { outcome: "circuit_open" }).inc();
            return Err(BootstrapError::CircuitOpen);
        }
        // A probe abandoned half-way (the client left) counts as failed, or
        // the breaker would stay half-open for ever.
        let mut pending = PendingCall { client: self, permit, done: false };
        let start = Instant::now();
        let key = self.coalescer.as_ref().map(|_| (generation, headers.clone()));
        let keep = self.answers.as_ref().map(|_| headers.clone());
        let call = async move {
            let _slot = match held {
                Some(slot) => slot,
                None => admission.admit().await.map_err(BootstrapError::Busy)?,
            };
            self.call(headers).await
        };
        let (result, shared) = match (&self.coalescer, key) {
            // The key is the whole forwarded request: only the same
            // credentials share an answer.
            (Some(coalescer), Some(key)) => coalescer.run(key, call).await,
            _ => (call.await, false),
        };
        pending.done = true;
        if shared {
            self.metrics.bootstrap_coalesced.inc();
        }
        // A shared answer is not a call of ours, unless this was the probe.
        if !shared || permit == Permit::Probe {
            self.record(permit, matches!(result, Err(BootstrapError::Unavailable(_))));
        }
        self.metrics.backend_latency.observe(start.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(_) => "authorized",
            Err(e) => e.outcome(),
        };
        self.metrics.auth.get_or_create(&Outcome { outcome }).inc();
        if let (Some(headers), Ok(answer)) = (keep, &result) {
            self.keep(headers, answer);
        }
        result
    }
}

/// A call in progress; records a failed probe if dropped before the end.
struct PendingCall<'a> {
    /// Whose breaker.
    client: &'a BootstrapClient,
    /// The call's permit.
    permit: Permit,
    /// Recorded already.
    done: bool,
}

impl Drop for PendingCall<'_> {
    fn drop(&mut self) {
        if !self.done && self.permit == Permit::Probe {
            self.client.record(Permit::Probe, true);
        }
    }
}

impl BootstrapClient {
    /// The outcome of a failed request: unavailable, its causes spelled out
    /// (reqwest's message alone is "error sending request"); a TLS failure
    /// is counted and logged (throttled: every connect can repeat it).
    fn unavailable(&self, error: reqwest::Error) -> BootstrapError {
        if let Some(tls) = crate::tls::failure(&error) {
            self.metrics.tls_failures.get_or_create(&TlsFailureLabels { peer: "backend", reason: tls.reason }).inc();
            static TLS_FAILED: LogThrottle = LogThrottle::new(Duration::from_secs(10));
            if let Some(suppressed) = TLS_FAILED.allow() {
                warn!(
                    reason = tls.reason,
                    error = %tls.message,
                    suppressed,
                    "backend TLS failed: connections get 1013 (counted in hightemplar_tls_failures_total)"
                );
            }
            return BootstrapError::Unavailable(tls.message);
        }
        let mut message = error.to_string();
        let mut cause = std::error::Error::source(&error);
        while let Some(e) = cause {
            message = format!("{message}: {e}");
            cause = e.source();
        }
        BootstrapError::Unavailable(message)
    }

    async fn call(&self, headers: Vec<(HeaderName, HeaderValue)>) -> Result<Bootstrap, BootstrapError> {
        let mut request = self.client.get(self.url.clone());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        // `without_url`: the message must not carry anything from the request.
        let unavailable = |e: reqwest::Error| self.unavailable(e.without_url());
        let mut response = request.send().await.map_err(unavailable)?;
        let status = response.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(BootstrapError::Unavailable(format!("backend answered {status}")));
        }
        if !status.is_success() {
            return Err(BootstrapError::Denied(status));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unavailable)? {
            if body.len() + chunk.len() > self.max_body_bytes {
                return Err(BootstrapError::InvalidBody("larger than backend.maxBodyBytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let allowed = parse_bootstrap(&body, self.max_allowed_rooms)?;
        // A valid answer is a JSON object, so also UTF-8.
        let user = self.user_path.as_ref().and_then(|path| path.find(std::str::from_utf8(&body).ok()?));
        Ok(Bootstrap { allowed, user })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_is_preset_in_the_metrics() {
        use crate::admission::Refused;
        let errors = [
            BootstrapError::Denied(StatusCode::FORBIDDEN),
            BootstrapError::InvalidBody("x"),
            BootstrapError::Unavailable("x".into()),
            BootstrapError::CircuitOpen,
            BootstrapError::Busy(Refused::QueueFull),
        ];
        for e in errors {
            assert!(crate::metrics::AUTH_OUTCOMES.contains(&e.outcome()), "{} not preset", e.outcome());
        }
        for r in [Refused::QueueFull, Refused::Timeout] {
            assert!(crate::metrics::REFUSAL_REASONS.contains(&r.reason()), "{} not preset", r.reason());
        }
    }

    fn parse_bootstrap_(body: &[u8]) -> Result<Vec<Room>, BootstrapError> {
        parse_bootstrap(body, 100)
    }

    #[test]
    fn allowed_rooms_past_the_limit_refuse_the_user() {
        let body = |n: usize| {
            let rooms: Vec<String> = (0..n).map(|i| format!(r#"{{"u":{i}}}"#)).collect();
            format!(r#"{{"user":{{"id":1}},"allowed_rooms":[{}]}}"#, rooms.join(","))
        };
        assert_eq!(parse_bootstrap(body(3).as_bytes(), 3).expect("at the limit").len(), 3);
        assert_eq!(
            parse_bootstrap(body(4).as_bytes(), 3),
            Err(BootstrapError::InvalidBody("more allowed_rooms than backend.maxAllowedRooms"))
        );
    }

    #[test]
    fn bootstrap_bodies() {
        assert_eq!(parse_bootstrap_(br#"{}"#), Ok(vec![]));
        assert_eq!(parse_bootstrap_(br#"{"allowed_rooms": null, "user": 1}"#), Ok(vec![]));
        let rooms = parse_bootstrap_(br#"{"allowed_rooms": [{"u": 1}, {"u": "*", "t": "x"}]}"#).expect("valid");
        assert_eq!(rooms.len(), 2);
        assert_eq!(parse_bootstrap_(b"<html>"), Err(BootstrapError::InvalidBody("not a JSON object")));
        assert_eq!(parse_bootstrap_(b"[]"), Err(BootstrapError::InvalidBody("not a JSON object")));
        assert_eq!(
            parse_bootstrap_(br#"{"allowed_rooms": {"u": 1}}"#),
            Err(BootstrapError::InvalidBody("allowed_rooms is not a list"))
        );
        assert_eq!(
            parse_bootstrap_(br#"{"allowed_rooms": [{"u": [1]}]}"#),
            Err(BootstrapError::InvalidBody("allowed_rooms holds a non-room"))
        );
    }

    #[test]
    fn close_codes() {
        assert_eq!(BootstrapError::Denied(StatusCode::FORBIDDEN).close_code(), 4401);
        assert_eq!(BootstrapError::InvalidBody("x").close_code(), 4401);
        assert_eq!(BootstrapError::Unavailable("x".into()).close_code(), 1013);
    }

    #[test]
    fn url_joins_relative_to_the_base() {
        let m = std::sync::Arc::new(Metrics::new());
        let mut c = BackendConfig { url: Some("http://api:8000/api/".into()), ..BackendConfig::default() };
        assert_eq!(BootstrapClient::new(&c, m.clone()).expect("ok").url().as_str(), "http://api:8000/api/bootstrap/");
        c.url = Some("http://api:8000/api".into());
        assert_eq!(BootstrapClient::new(&c, m).expect("ok").url().as_str(), "http://api:8000/api/bootstrap/");
    }
}
