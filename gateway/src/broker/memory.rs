//! `memory`: the embedded broker of a single gateway process. A publish is
//! the local fan-out itself; there is nothing to connect to.
//!
//! The fan-out runs on a thread of its own (`fan-out`), as the RabbitMQ
//! consumer's does (`amqp::AmqpBroker::start` says why): run by the
//! publishing request's task, a trigger would wait in tokio's run queue
//! behind every session the previous one woke. The request still resolves
//! only once its trigger is fanned out, as before.

use std::sync::Arc;

use futures_util::future::{BoxFuture, FutureExt};
use tokio::sync::{mpsc, oneshot};

use super::{Broker, BrokerError};
use crate::hub::Hub;
use crate::trigger::Published;

/// Messages waiting for the fan-out thread at most; a publisher past that
/// waits for room (each is bounded by `trigger.maxBodyBytes`).
const WAITING: usize = 64;

/// A message for the fan-out thread, and who waits for it to be done.
type Job = (Published, oneshot::Sender<()>);

/// Triggers and control messages go straight to this process's hub.
pub struct MemoryBroker {
    /// The fan-out thread's inbox; the thread ends when the broker is
    /// dropped.
    jobs: mpsc::Sender<Job>,
}

impl MemoryBroker {
    /// A broker delivering into `hub`, with its fan-out thread started.
    pub fn new(hub: Arc<Hub>) -> std::io::Result<MemoryBroker> {
        let (jobs, mut inbox) = mpsc::channel::<Job>(WAITING);
        std::thread::Builder::new().name("fan-out".into()).spawn(move || {
            while let Some((message, done)) = inbox.blocking_recv() {
                hub.deliver(&message);
                // The publisher may have given up waiting: nothing to tell.
                let _ = done.send(());
            }
        })?;
        Ok(MemoryBroker { jobs })
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, message: Published) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move {
            let (done, fanned_out) = oneshot::channel();
            let gone = || BrokerError::Unavailable("the fan-out thread has stopped".into());
            self.jobs.send((message, done)).await.map_err(|_| gone())?;
            fanned_out.await.map_err(|_| gone())
        }
        .boxed()
    }

    fn is_ready(&self) -> bool {
        !self.jobs.is_closed()
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}
