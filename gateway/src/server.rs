//! `Server`: builds a [`Gateway`] from a configuration, binds the listener,
//! serves until told to stop, then shuts down gracefully (DESIGN.md §4):
//! readiness 503 at once, a drain delay, websockets closed with 1001 spread
//! over the close window, exit.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::{BackendSetupError, BootstrapClient};
use crate::broker::amqp::AmqpSetupError;
use crate::broker::{AmqpBroker, Broker, MemoryBroker};
use crate::config::{BrokerKind, Config, ConfigError, seconds};
use crate::forwarding::ForwardingTable;
use crate::gateway::Gateway;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The backend client cannot be built.
    #[error(transparent)]
    Backend(#[from] BackendSetupError),
    /// The AMQP broker cannot be set up.
    #[error(transparent)]
    Amqp(#[from] AmqpSetupError),
    /// The memory broker's fan-out thread cannot be started.
    #[error("cannot start the fan-out thread: {0}")]
    FanOutThread(std::io::Error),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Connections the kernel queues before they are accepted (capped by
/// `net.core.somaxconn`). The standard library's 128 overflows in a
/// reconnect storm, and each overflowed connect waits a 1 s SYN retransmit.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As std's bind does: a restarted gateway rebinds despite TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A bound, not yet serving, gateway.
pub struct Server {
    /// The bound listener.
    listener: TcpListener,
    /// Shared state.
    gateway: Arc<Gateway>,
    /// The soft open-file limit at start.
    nofile: u64,
}

impl Server {
    /// Validates `config`, builds the gateway and binds its listener.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(metrics.clone()));
        hub.set_write_through(config.fanout.write_through);
        let broker: Arc<dyn Broker> = match config.broker.kind {
            BrokerKind::Memory => Arc::new(MemoryBroker::new(hub.clone()).map_err(StartError::FanOutThread)?),
            BrokerKind::Amqp => Arc::new(AmqpBroker::start(
                config.broker.amqp.clone(),
                config.trigger.limits(),
                hub.clone(),
                metrics.clone(),
            )?),
        };
        let user_path = match &config.permissions.user_path {
            None => None,
            Some(path) => Some(
                crate::identity::UserPath::parse(path)
                    .map_err(|e| ConfigError::Invalid { field: "permissions.userPath", message: e.to_string() })?,
            ),
        };
        let backend = BootstrapClient::new(&config.backend, metrics.clone())?
            .with_user_path(user_path)
            .with_control_count(hub.control_count());
        let forwarding = ForwardingTable::new(&config.backend.forward)
            .map_err(|e| ConfigError::Invalid { field: "backend.forward", message: e.to_string() })?;
        let origins = crate::origin::OriginPolicy::new(&config.security.allowed_origins)
            .map_err(|e| ConfigError::Invalid { field: "security.allowedOrigins", message: e.to_string() })?;
        let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(u64::MAX, |(soft, _)| soft);
        let connection_limit = crate::gateway::connection_limit(config.limits.max_connections, nofile);
        if connection_limit < config.limits.max_connections {
            warn!(
                max_connections = config.limits.max_connections,
                open_file_limit = nofile,
                accepted_at_most = connection_limit,
                "limits.maxConnections does not fit the open-file limit: raise the limit (the container runtime's \
                 LimitNOFILE) or lower limits.maxConnections"
            );
        }
        metrics.connections_limit.set(i64::try_from(connection_limit).unwrap_or(i64::MAX));
        let addr = config.listen.0;
        let listener = listen(addr).map_err(|source| StartError::Bind { addr, source })?;
        let admission = crate::admission::Admission::new(
            &config.backend.admission,
            metrics.bootstrap_in_flight.clone(),
            metrics.bootstrap_queued.clone(),
        );
        let gateway = Arc::new(Gateway {
            config,
            hub,
            broker,
            backend,
            admission,
            forwarding,
            origins,
            connection_limit,
            metrics,
            draining: Default::default(),
            close_sessions: CancellationToken::new(),
            sessions: TaskTracker::new(),
        });
        Ok(Server { listener, gateway, nofile })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The shared state (tests read metrics through it).
    pub fn gateway(&self) -> Arc<Gateway> {
        self.gateway.clone()
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let Server { listener, gateway, nofile } = self;
        let addr = listener.local_addr()?;
        info!(
            %addr,
            broker = gateway.broker.name(),
            backend = %gateway.backend.url(),
            "high-templar gateway listening"
        );
        let stop_accepting = CancellationToken::new();
        let shutdown_sequence = {
            let gateway = gateway.clone();
            let stop_accepting = stop_accepting.clone();
            async move {
                shutdown.await;
                let shutdown = &gateway.config.shutdown;
                info!(
                    drain_delay_s = shutdown.drain_delay_seconds,
                    close_window_s = shutdown.close_window_seconds,
                    "shutting down: readiness is now 503"
                );
                gateway.draining.store(true, Ordering::Relaxed);
                tokio::time::sleep(seconds(shutdown.drain_delay_seconds)).await;
                gateway.close_sessions.cancel();
                stop_accepting.cancel();
            }
        };
        tokio::spawn(shutdown_sequence);
        let router = crate::http::router(gateway.clone());
        crate::listener::Listener::new(listener, router, gateway.clone(), nofile).serve(stop_accepting).await;
        // Sessions close at random moments within the window; give them a
        // little more to send their close frames, then leave anyway.
        gateway.sessions.close();
        let window = seconds(gateway.config.shutdown.close_window_seconds);
        if tokio::time::timeout(window + Duration::from_secs(3), gateway.sessions.wait()).await.is_err() {
            warn!(left = gateway.sessions.len(), "sessions still open at the end of the close window");
        }
        info!("gateway stopped");
        Ok(())
    }
}
