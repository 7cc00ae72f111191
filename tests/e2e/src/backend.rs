//! A real HTTP backend for the node tier: `GET /api/bootstrap/` answers every
//! token `user-<n>` with the room `{"chat": "*"}` and records the address each
//! bootstrap call came from, which is the gateway pod that serves that client.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, StatusCode};
use serde_json::json;

/// The running backend.
#[derive(Clone)]
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Token → address of the last bootstrap call made for it.
    callers: Arc<Mutex<HashMap<String, IpAddr>>>,
}

impl Backend {
    /// Starts a backend on `ip`:`port` (0: chosen by the kernel).
    pub async fn start(ip: IpAddr, port: u16) -> Backend {
        let callers: Arc<Mutex<HashMap<String, IpAddr>>> = Arc::default();
        let seen = callers.clone();
        let app = Router::new().route(
            "/api/bootstrap/",
            axum::routing::get(move |ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap| {
                let seen = seen.clone();
                async move {
                    let token = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Token "));
                    match token {
                        Some(t) if t.starts_with("user-") => {
                            seen.lock().expect("callers lock").insert(t.to_string(), peer.ip());
                            (StatusCode::OK, json!({"allowed_rooms": [{"chat": "*"}], "user": {"id": t}}).to_string())
                        }
                        _ => (StatusCode::FORBIDDEN, "{}".to_string()),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind((ip, port))
            .await
            .unwrap_or_else(|e| panic!("bind the backend on {ip}:{port}: {e} (another node test binary running?)"));
        let addr = listener.local_addr().expect("backend address");
        tokio::spawn(
            async move { axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await },
        );
        Backend { addr, callers }
    }

    /// One backend on `ip`:8000 for the whole test binary, on a runtime of
    /// its own: HighTemplars outlive the test that made them, and their pods
    /// keep calling it, also in a later run on the same node (the address
    /// is the node's own veth end, so the fixed port collides with nothing
    /// else).
    pub fn shared(ip: IpAddr) -> Backend {
        static SHARED: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
        SHARED
            .get_or_init(|| {
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("the backend's runtime");
                    runtime.block_on(async move {
                        let _ = tx.send(Backend::start(ip, 8000).await);
                        std::future::pending::<()>().await
                    })
                });
                rx.recv().expect("the shared backend started")
            })
            .clone()
    }

    /// The URL a HighTemplar's `backend.url` names.
    pub fn url(&self) -> String {
        format!("http://{}/api/", self.addr)
    }

    /// The address the last bootstrap call for `token` came from.
    pub fn caller_of(&self, token: &str) -> Option<IpAddr> {
        self.callers.lock().expect("callers lock").get(token).copied()
    }
}
