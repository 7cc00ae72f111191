//! The TCP accept loop and HTTP/1 serving up to the websocket upgrade, with
//! a bound and a deadline on everything a client can hold before it is a
//! session (docs/security.md):
//!
//! - **headers** of each request within `limits.handshakeTimeoutSeconds`
//!   of the connection opening or of the previous response (hyper's
//!   header-read timer), so silent sockets, slowloris clients and idle
//!   keep-alive connections all close;
//! - **responses** that the client does not read: a write blocked that long
//!   closes the connection;
//! - **connections not yet upgraded** (handshakes, triggers, probes,
//!   scrapes): at most [`pending_limit`]; beyond it, a 503 at once and close;
//! - **accept errors** (out of file descriptors): logged at most once per
//!   10 s with a count, counted in `/metrics`, retried after a pause.
//!
//! Every stream closes through [`ServedStream`]'s lingering close.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::{debug, warn};

use crate::gateway::Gateway;
use crate::linger::{Lingering, ServedStream};
use crate::log_throttle::LogThrottle;
use crate::metrics::{Metrics, Reason};

/// Largest request head (request line and headers); hyper answers 431 past
/// it. Browsers send a few KiB, cookies included.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Pause after an accept error that is not the peer's fault (usually
/// `EMFILE`): accepting again at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Sent to a connection past the pending limit, then closed; the
/// `Retry-After` is 1–5 s at random, so refused clients do not come back in
/// step.
fn busy_response() -> String {
    let body = "too many pending connections\n";
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nretry-after: {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        1 + rand::random::<u32>() % 5,
        body.len()
    )
}

/// Connections not yet upgraded a process serves at once: the configured
/// `limits.maxPendingConnections`, and at most half the file-descriptor
/// reserve of [`crate::gateway::connection_limit`], so handshakes in
/// progress cannot exhaust the descriptors that websockets leave free.
pub fn pending_limit(max_pending: usize, nofile: u64) -> usize {
    let half_reserve = usize::try_from(crate::gateway::fd_reserve(nofile) / 2).unwrap_or(usize::MAX);
    max_pending.min(half_reserve).max(1)
}

/// The accept loop of one process and what its connections share.
pub struct Listener {
    /// The bound socket.
    tcp: TcpListener,
    /// The routes.
    router: Router,
    /// Configuration and metrics.
    gateway: Arc<Gateway>,
    /// One permit per connection not yet upgraded.
    pending: Arc<Semaphore>,
    /// Lingering closes in progress.
    lingering: Lingering,
    /// Every connection task, so shutdown can wait for them.
    connections: TaskTracker,
    /// Accept errors are logged at most this often.
    accept_errors: LogThrottle,
}

impl Listener {
    /// A loop over `tcp` serving `router`.
    pub fn new(tcp: TcpListener, router: Router, gateway: Arc<Gateway>, nofile: u64) -> Listener {
        let pending = pending_limit(gateway.config.limits.max_pending_connections, nofile);
        gateway.metrics.http_connections_limit.set(i64::try_from(pending).unwrap_or(i64::MAX));
        Listener {
            tcp,
            router,
            pending: Arc::new(Semaphore::new(pending)),
            lingering: Lingering::new(crate::linger::lingering_limit(nofile)),
            gateway,
            connections: TaskTracker::new(),
            accept_errors: LogThrottle::new(Duration::from_secs(10)),
        }
    }

    /// Accepts until `stop` is cancelled, then lets the connections not yet
    /// upgraded finish the request in progress (bounded by the handshake
    /// timeout) and returns. Upgraded websockets are the sessions' business.
    pub async fn serve(self, stop: CancellationToken) {
        let timeout = crate::config::seconds(self.gateway.config.limits.handshake_timeout_seconds);
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                accepted = self.tcp.accept() => accepted,
            };
            match accepted {
                Ok((tcp, peer)) => self.admit(tcp, peer, &stop),
                Err(e) if is_peer_error(&e) => debug!(error = %e, "accept: connection gone before it was accepted"),
                Err(e) => {
                    self.gateway.metrics.accept_errors.inc();
                    if let Some(suppressed) = self.accept_errors.allow() {
                        warn!(
                            error = %e,
                            suppressed,
                            "cannot accept connections (raise the open-file limit or lower limits.maxConnections)"
                        );
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
        self.connections.close();
        if tokio::time::timeout(timeout + Duration::from_secs(1), self.connections.wait()).await.is_err() {
            debug!(left = self.connections.len(), "HTTP connections still open at shutdown");
        }
    }

    /// Serves one accepted connection, or refuses it when too many are
    /// pending.
    fn admit(&self, tcp: TcpStream, peer: SocketAddr, stop: &CancellationToken) {
        // Small frames must not wait for Nagle's algorithm (tens of ms on
        // the first publish after a reply).
        let _ = tcp.set_nodelay(true);
        let send_buffer = self.gateway.config.limits.send_buffer_bytes;
        if send_buffer > 0
            && let Err(e) = socket2::SockRef::from(&tcp).set_send_buffer_size(send_buffer)
        {
            debug!(error = %e, "cannot set the send buffer size");
        }
        let Ok(permit) = self.pending.clone().try_acquire_owned() else {
            closed(&self.gateway.metrics, "pending_limit");
            // Best effort, never waits: the descriptor is freed at once.
            let _ = tcp.try_write(busy_response().as_bytes());
            return;
        };
        let stream = ServedStream::new(tcp, self.lingering.clone());
        let connection = Connection {
            router: self.router.clone(),
            gateway: self.gateway.clone(),
            peer,
            stop: stop.clone(),
            _permit: permit,
        };
        self.connections.spawn(connection.serve(stream));
    }
}

/// Accept errors caused by the peer: nothing to wait for.
fn is_peer_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset)
}

fn closed(metrics: &Metrics, reason: &'static str) {
    metrics.http_connections_closed.get_or_create(&Reason { reason }).inc();
}

/// One accepted connection until it upgrades or closes.
struct Connection {
    /// The routes (a clone shares them).
    router: Router,
    /// Configuration and metrics.
    gateway: Arc<Gateway>,
    /// The TCP peer, for `ConnectInfo`.
    peer: SocketAddr,
    /// Cancelled at shutdown: finish the request in progress, then close.
    stop: CancellationToken,
    /// Held until the upgrade or the close.
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    async fn serve(self, stream: ServedStream) {
        let metrics = &self.gateway.metrics;
        metrics.http_connections_pending.inc();
        let limits = &self.gateway.config.limits;
        let timeout = crate::config::seconds(limits.handshake_timeout_seconds);
        let blocked = stream.write_blocked();
        let (router, peer) = (self.router, self.peer);
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            let mut router = router.clone();
            async move { Ok::<_, Infallible>(router.call(request).await.unwrap_or_else(|never| match never {})) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(timeout).max_buf_size(MAX_HEAD_BYTES).keep_alive(true);
        let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service).with_upgrades());
        let mut check = tokio::time::interval((timeout / 4).max(Duration::from_millis(10)));
        let mut stopping = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    match result {
                        Ok(()) => {}
                        Err(e) if e.is_timeout() => closed(metrics, "header_timeout"),
                        Err(e) => debug!(error = %e, "HTTP connection ended with an error"),
                    }
                    break;
                }
                () = self.stop.cancelled(), if !stopping => {
                    stopping = true;
                    connection.as_mut().graceful_shutdown();
                }
                _ = check.tick() => {
                    if blocked.longer_than(timeout) {
                        closed(metrics, "write_stalled");
                        break;
                    }
                }
            }
        }
        metrics.http_connections_pending.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::pending_limit;
    use crate::linger::lingering_limit;

    #[test]
    fn pending_and_lingering_connections_fit_the_descriptor_reserve() {
        assert_eq!(pending_limit(512, 1_048_576), 512);
        assert_eq!(pending_limit(512, 20_000), 512);
        assert_eq!(pending_limit(4, 20_000), 4);
        assert_eq!(pending_limit(512, 1_024), 128);
        assert_eq!(pending_limit(512, 256), 32);
        assert_eq!(pending_limit(512, 0), 1);
        assert_eq!(lingering_limit(20_000), 256);
        assert_eq!(lingering_limit(256), 16);
    }
}
