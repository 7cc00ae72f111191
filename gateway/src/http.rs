//! The HTTP surface: `/ws/` (websocket upgrade), `POST /trigger`,
//! `/healthz`, `/readyz`, `/metrics` (DESIGN.md §2–§4).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use subtle::ConstantTimeEq;
use tracing::{debug, warn};

use crate::forwarding::{ClientRequest, client_address};
use crate::gateway::Gateway;
use crate::metrics::{Reason, TriggerSource};
use crate::session;
use crate::trigger::Published;
use crate::websocket::Upgrade;
use tungstenite::protocol::WebSocketConfig;

/// Read buffer per websocket, kept for the connection's whole life; larger
/// client messages still work (the buffer grows for them), up to
/// `limits.maxMessageBytes`. Client frames are small (a subscribe is
/// ≈ 100 bytes): 256 bytes cost an idle connection little, and pipelined
/// subscribes still run at > 200 000/s (docs/performance.md).
pub const READ_BUFFER_BYTES: usize = 256;
/// Bytes buffered before a write goes to the socket; every batch of
/// publish frames is flushed at its end regardless.
pub const WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// Longest a `POST /trigger` waits for the broker's confirm.
const PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The router of one gateway process.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/ws", get(websocket))
        .route("/ws/", get(websocket))
        .route("/trigger", post(trigger))
        .route("/trigger/", post(trigger))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(gateway)
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

async fn readyz(State(gateway): State<Arc<Gateway>>) -> Response {
    if gateway.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !gateway.broker.is_ready() {
        let why = gateway.broker.last_error().map(|e| format!(": {e}")).unwrap_or_default();
        (StatusCode::SERVICE_UNAVAILABLE, format!("broker {} not ready{why}\n", gateway.broker.name())).into_response()
    } else {
        // Informational only: a backend outage must not make every replica
        // unready at once (new connections get 1013 and retry).
        match gateway.backend.circuit() {
            crate::breaker::State::Closed => "ready\n".into_response(),
            state => format!("ready\nbackend circuit breaker: {}\n", state.name()).into_response(),
        }
    }
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], gateway.metrics.encode())
        .into_response()
}

async fn websocket(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    let refuse_with = |status: StatusCode, reason: &'static str, message: &'static str| {
        gateway.metrics.connections_refused.get_or_create(&Reason { reason }).inc();
        (status, message).into_response()
    };
    let refuse = |reason, message| refuse_with(StatusCode::SERVICE_UNAVAILABLE, reason, message);
    // Before anything else, the backend call included: a page of another
    // site must not get the user's rooms with the user's cookies.
    let header_text = |name| headers.get(name).and_then(|v: &header::HeaderValue| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).map(|v| v.to_str().unwrap_or(""));
    if !gateway.origins.allows(origin, header_text(header::HOST)) {
        return refuse_with(StatusCode::FORBIDDEN, "origin", "origin not allowed\n");
    }
    // Not while draining: endpoints and load balancers go on sending new
    // clients for a moment after readiness fails, and those must connect.
    // Once sessions are being closed, the listener is closing too.
    if gateway.close_sessions.is_cancelled() {
        return refuse("draining", "shutting down\n");
    }
    if gateway.metrics.connections_open.get() >= i64::try_from(gateway.connection_limit).unwrap_or(i64::MAX) {
        return refuse("max_connections", "too many connections\n");
    }
    // Only what the forwarding rules pick is kept for the session.
    let client = client_address(&headers, peer.ip(), &gateway.config.security.trusted_proxies);
    let request = ClientRequest { headers: &headers, query: uri.query(), peer: peer.ip(), client };
    let backend_headers = gateway.forwarding.backend_headers(&request);
    // Before the 101: a refused client holds nothing, and a storm reaches
    // the backend at the pace of the slots.
    // An upgrade that joins an identical call in flight (the same user's
    // other tab) costs the backend nothing and takes no slot.
    let admitted = if gateway.backend.joins_call_in_flight(&backend_headers) {
        None
    } else {
        match gateway.admission.admit().await {
            Ok(admitted) => Some(admitted),
            Err(refused) => {
                gateway.metrics.connections_refused.get_or_create(&Reason { reason: refused.reason() }).inc();
                // Spread the retries of a storm over a few seconds.
                let retry_after = 1 + rand::random::<u64>() % 5;
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, retry_after.to_string())],
                    format!("{refused}, retry later\n"),
                )
                    .into_response();
            }
        }
    };
    let max = gateway.config.limits.max_message_bytes;
    let tracker = gateway.sessions.clone();
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        // tungstenite's defaults (128 KiB each) cost memory per connection
        // and a 128 KiB memset per read; client frames are small, and
        // publish frames are batched per flush anyway.
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES);
    // A task of its own rather than the upgrade's: that one would keep the
    // upgrade's state alive next to the session for its whole life.
    upgrade.accept(config, move |socket| {
        tracker.spawn(session::run(socket, gateway, admitted, backend_headers, peer));
    })
}

/// `Authorization: Bearer <token>` (the scheme case-insensitive, RFC 7235
/// §2.1), the token compared in constant time.
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((scheme, given)) = value.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && given.trim().as_bytes().ct_eq(token.as_bytes()).into()
}

async fn trigger(State(gateway): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    let reject = |reason: &'static str| {
        gateway.metrics.triggers_rejected.get_or_create(&Reason { reason }).inc();
    };
    let Some(token) = &gateway.config.trigger.token else {
        return json_error(StatusCode::NOT_FOUND, "POST /trigger is disabled: no trigger token is configured");
    };
    if !bearer_matches(&headers, &token.0) {
        reject("unauthorized");
        let mut response = json_error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return response;
    }
    let limit = gateway.config.trigger.max_body_bytes;
    let deadline = crate::config::seconds(gateway.config.trigger.body_timeout_seconds);
    let Ok(read) = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await else {
        reject("body_timeout");
        return json_error(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time");
    };
    let bytes = match read {
        Ok(bytes) => bytes,
        Err(e) => {
            let too_big = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_big {
                reject("too_large");
                return json_error(StatusCode::PAYLOAD_TOO_LARGE, format!("trigger body is larger than {limit} bytes"));
            }
            reject("body_error");
            return json_error(StatusCode::BAD_REQUEST, "could not read the request body");
        }
    };
    let message = match Published::parse_within(&bytes, gateway.config.trigger.limits()) {
        Ok(message) => message,
        Err(e) => {
            reject(e.reason());
            return json_error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    if let Published::Trigger(_) = message {
        gateway.metrics.triggers.get_or_create(&TriggerSource { source: "http" }).inc();
    }
    let kind = message.kind();
    // A broker that stops confirming (memory alarm, flow control) must not
    // hold the request, and its pending-connection slot, for ever.
    let Ok(published) = tokio::time::timeout(PUBLISH_TIMEOUT, gateway.broker.publish(message)).await else {
        warn!(timeout_s = PUBLISH_TIMEOUT.as_secs(), "trigger not confirmed by the broker in time");
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker did not confirm the trigger in time; it may still be delivered",
        );
    };
    match published {
        Ok(()) => {
            // One line per trigger is too many at production rates.
            debug!(kind, "trigger accepted");
            (StatusCode::ACCEPTED, axum::Json(json!({"status": "accepted"}))).into_response()
        }
        Err(e) => {
            warn!(error = %e, "trigger not published");
            json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_check() {
        let mut h = HeaderMap::new();
        assert!(!bearer_matches(&h, "t0k"));
        h.insert(header::AUTHORIZATION, "Bearer t0k".parse().expect("value"));
        assert!(bearer_matches(&h, "t0k"));
        assert!(!bearer_matches(&h, "t0"));
        assert!(!bearer_matches(&h, "t0kk"));
        h.insert(header::AUTHORIZATION, "Token t0k".parse().expect("value"));
        assert!(!bearer_matches(&h, "t0k"));
        for scheme in ["bearer", "BEARER", "bEaReR"] {
            h.insert(header::AUTHORIZATION, format!("{scheme} t0k").parse().expect("value"));
            assert!(bearer_matches(&h, "t0k"), "{scheme}");
        }
        h.insert(header::AUTHORIZATION, "Bearert0k".parse().expect("value"));
        assert!(!bearer_matches(&h, "t0k"));
    }
}
