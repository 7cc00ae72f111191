//! Brokers carry triggers and control messages to every gateway replica (DESIGN.md §3). One
//! trait, one implementation per transport; only `broker/` knows how.

use futures_util::future::BoxFuture;

use crate::trigger::Published;

pub mod amqp;
mod memory;

pub use amqp::AmqpBroker;
pub use memory::MemoryBroker;

/// Why a trigger could not be published.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker is not connected; try again later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// A transport for triggers.
pub trait Broker: Send + Sync + 'static {
    /// Publishes `message` (a trigger or a control message) so that every
    /// replica, this one included, acts on it. Resolves once the broker has
    /// accepted it.
    fn publish(&self, message: Published) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Whether triggers flow now; drives `/readyz`.
    fn is_ready(&self) -> bool;

    /// Why the broker is not ready, when it knows (shown by `/readyz`;
    /// never holds a password).
    fn last_error(&self) -> Option<String> {
        None
    }

    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;
}
