//! `memory`: the embedded broker of a single gateway process. A publish is
//! the local fan-out itself; there is nothing to connect to.

use std::sync::Arc;

use futures_util::future::{BoxFuture, FutureExt};

use super::{Broker, BrokerError};
use crate::hub::Hub;
use crate::trigger::Published;

/// Triggers and control messages go straight to this process's hub.
pub struct MemoryBroker {
    /// Where triggers are fanned out.
    hub: Arc<Hub>,
}

impl MemoryBroker {
    /// A broker delivering into `hub`.
    pub fn new(hub: Arc<Hub>) -> MemoryBroker {
        MemoryBroker { hub }
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, message: Published) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.hub.deliver(&message);
        futures_util::future::ready(Ok(())).boxed()
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}
