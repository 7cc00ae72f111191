//! The bundled backend: a tiny HTTP server standing in for the API (Django
//! in 3.x deployments) so a benchmark needs nothing else. Every `GET` (the
//! gateway calls `<backend.url>bootstrap/`) answers
//! `{"allowed_rooms":[...]}` with the configured rooms, whoever asks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

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

/// A running bundled backend.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Bootstrap requests answered so far.
    pub requests: Arc<AtomicU64>,
}

/// Binds `listen` and serves in the background; returns once listening.
pub async fn start(listen: SocketAddr, allowed_rooms: Vec<Value>) -> Result<Backend, String> {
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("backend: cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| format!("backend: {e}"))?;
    let body: Arc<str> =
        json!({ "allowed_rooms": allowed_rooms, "user": {"id": 1, "username": "bench"} }).to_string().into();
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    let app = Router::new().fallback(move |method: Method| {
        let body = body.clone();
        let counter = counter.clone();
        async move { answer(&method, &body, &counter) }
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("backend: server stopped: {e}");
        }
    });
    Ok(Backend { addr, requests })
}

/// The answer to one request.
fn answer(method: &Method, body: &Arc<str>, counter: &AtomicU64) -> Response {
    if method != Method::GET {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    counter.fetch_add(1, Ordering::Relaxed);
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
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
        let backend = start("127.0.0.1:0".parse().expect("addr"), vec![json!({"user": "*"})]).await.expect("starts");
        let url = format!("http://{}/api/bootstrap/", backend.addr);
        let response = reqwest::get(&url).await.expect("answers");
        assert_eq!(response.status(), 200);
        let body: Value = serde_json::from_str(&response.text().await.expect("body")).expect("json");
        assert_eq!(body["allowed_rooms"], json!([{"user": "*"}]));
        assert_eq!(backend.requests.load(Ordering::Relaxed), 1);
    }
}
