//! `Gateway`: the state shared by every request and session of one
//! process — configuration, hub, broker, backend client, metrics, and the
//! shutdown switches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::BootstrapClient;
use crate::broker::Broker;
use crate::config::Config;
use crate::forwarding::ForwardingTable;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::origin::OriginPolicy;

/// Shared state of one gateway process.
pub struct Gateway {
    /// The validated configuration.
    pub config: Config,
    /// Subscriptions and fan-out.
    pub hub: Arc<Hub>,
    /// Where `POST /trigger` publishes; also drives readiness.
    pub broker: Arc<dyn Broker>,
    /// The backend's bootstrap endpoint.
    pub backend: BootstrapClient,
    /// Bootstrap slots and their queue.
    pub admission: crate::admission::Admission,
    /// What of a client's request is forwarded to the backend.
    pub forwarding: ForwardingTable,
    /// Which browser origins may connect.
    pub origins: OriginPolicy,
    /// Websockets accepted at most ([`connection_limit`]).
    pub connection_limit: usize,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
    /// Set on SIGTERM: readiness 503 (new websockets are still served
    /// until `close_sessions`).
    pub draining: AtomicBool,
    /// Cancelled when open sessions must close (1001), each after a random
    /// part of the close window.
    pub close_sessions: CancellationToken,
    /// Every session task, so shutdown can wait for them.
    pub sessions: TaskTracker,
}

/// Websockets a process may hold: `max_connections`, or fewer when the
/// open-file limit `nofile` would run out first. Each websocket is one file
/// descriptor; a reserve (a quarter of the limit, at most 1 024) is kept for
/// upgrades in progress, backend and broker connections and the listener, so
/// new clients get a clean 503 instead of failed accepts, and a full process
/// can still answer `/readyz` and `/metrics`.
pub fn connection_limit(max_connections: usize, nofile: u64) -> usize {
    let reserve = fd_reserve(nofile);
    let fits = usize::try_from(nofile.saturating_sub(reserve)).unwrap_or(usize::MAX);
    max_connections.min(fits)
}

/// File descriptors kept free of websockets under the open-file limit
/// `nofile`: a quarter of it, at most 1 024. Half of it may go to
/// connections not yet upgraded ([`crate::listener::pending_limit`]), a
/// quarter to lingering closes ([`crate::linger::lingering_limit`]), the
/// rest to backend and broker connections and the listener.
pub fn fd_reserve(nofile: u64) -> u64 {
    (nofile / 4).min(1024)
}

impl Gateway {
    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::connection_limit;

    #[test]
    fn the_open_file_limit_caps_connections_with_a_reserve() {
        assert_eq!(connection_limit(50_000, 1_048_576), 50_000);
        assert_eq!(connection_limit(50_000, 20_000), 18_976);
        assert_eq!(connection_limit(50_000, 1_024), 768);
        assert_eq!(connection_limit(100, 1_024), 100);
        assert_eq!(connection_limit(10, 0), 0);
    }
}
