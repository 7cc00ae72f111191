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
    /// What of a client's request is forwarded to the backend.
    pub forwarding: ForwardingTable,
    /// Which browser origins may connect.
    pub origins: OriginPolicy,
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

impl Gateway {
    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}
