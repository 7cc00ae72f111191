//! `amqp`: RabbitMQ, shared by every gateway replica (DESIGN.md §3).
//!
//! Each process declares the exchange (type `direct`), its own server-named
//! exclusive queue bound with routing key `*`, and consumes it. 3.x
//! publishers (`basic_publish(exchange="hightemplar", routing_key="*")`)
//! reach every replica. `POST /trigger` publishes into the same exchange with
//! publisher confirms, so a trigger sent to one replica reaches them all.
//!
//! A supervisor task, on a thread of its own ([`AmqpBroker::start`] says
//! why), owns the connection: on any loss it marks the broker
//! not ready, waits (capped exponential backoff with jitter), reconnects,
//! redeclares, rebinds and consumes again. Delivery is at-most-once: what is
//! published while a replica is disconnected is not delivered by it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, FutureExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::types::FieldTable;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, ExchangeKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Broker, BrokerError};
use crate::config::{AmqpConfig, seconds};
use crate::hub::Hub;
use crate::log_throttle::LogThrottle;
use crate::metrics::{Metrics, Reason, TlsFailureLabels, TriggerSource};
use crate::tls::TlsError;
use crate::trigger::{Published, TriggerLimits};

/// The routing key 3.x publishers use and every queue is bound with.
pub const ROUTING_KEY: &str = "*";

/// The exchange's declare options; the operator declares it the same way,
/// so neither side trips over the other's declaration.
pub fn exchange_options(durable: bool) -> ExchangeDeclareOptions {
    ExchangeDeclareOptions { durable, auto_delete: false, internal: false, passive: false, nowait: false }
}

/// The exchange's type.
pub fn exchange_kind() -> ExchangeKind {
    ExchangeKind::Direct
}

/// Whether `e` is the broker refusing a declare because the object exists
/// with other arguments.
pub fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(amqp)
        if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
}

/// `url` with its password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable AMQP URL>".to_string(),
    }
}

/// Connects to `uri`: plain for `amqp://`, over TLS with `tls` for
/// `amqps://` (hostname verified against the URL's host). The
/// `connection_timeout` of the URL bounds the TCP connect and the handshake.
/// Shared with the operator, which declares the exchange the same way.
pub async fn connect(
    uri: AMQPUri,
    properties: ConnectionProperties,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> lapin::Result<Connection> {
    let Some(tls) = tls.filter(|_| uri.scheme == AMQPScheme::AMQPS) else {
        if uri.scheme == AMQPScheme::AMQPS {
            return Err(std::io::Error::other("amqps:// needs a TLS configuration").into());
        }
        return Connection::connect_uri(uri, properties).await;
    };
    let connector = Arc::new(RustlsConnector::from(tls));
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            let host = uri.authority.host.clone();
            let timeout = Duration::from_millis(uri.query.connection_timeout.unwrap_or(10_000));
            let connect = async {
                let addrs: Vec<std::net::SocketAddr> =
                    tokio::net::lookup_host((host.as_str(), uri.authority.port)).await?.collect();
                AsyncTcpStream::connect(&runtime, addrs).await?.into_rustls(&connector, &host).await
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(stream) => Ok(stream?),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect and TLS handshake did not finish within {timeout:?}"),
                )
                .into()),
            }
        },
        properties,
    )
    .await
}

/// Why the broker cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum AmqpSetupError {
    /// The URL is missing or unparsable (validated config prevents this).
    #[error("broker.amqp.url is missing or not an amqp:// or amqps:// URL")]
    Url,
    /// `broker.amqp.tls` cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The consumer's thread or its runtime could not be started.
    #[error("cannot start the RabbitMQ consumer thread: {0}")]
    Thread(std::io::Error),
}

/// State shared by the broker handle and its supervisor task.
struct Shared {
    /// Settings.
    config: AmqpConfig,
    /// Bounds on a consumed body (the same as for `POST /trigger`).
    limits: TriggerLimits,
    /// Connection target, heartbeat and timeout filled in.
    uri: AMQPUri,
    /// TLS client configuration, for `amqps://`.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Why the last connection attempt failed or ended, for `/readyz`.
    last_error: Mutex<Option<String>>,
    /// Where consumed triggers are fanned out.
    hub: Arc<Hub>,
    /// Process metrics.
    metrics: Arc<Metrics>,
    /// True while consuming.
    ready: AtomicBool,
    /// Channel in confirm mode for `POST /trigger`, while connected.
    publisher: Mutex<Option<Channel>>,
    /// The "exchange exists with other arguments" warning was logged.
    warned_existing_exchange: AtomicBool,
}

impl Shared {
    fn set_publisher(&self, channel: Option<Channel>) {
        *self.publisher.lock().unwrap_or_else(|p| p.into_inner()) = channel;
    }

    fn publisher(&self) -> Option<Channel> {
        self.publisher.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.metrics.amqp_connected.set(i64::from(ready));
    }
}

/// The RabbitMQ broker.
pub struct AmqpBroker {
    /// State shared with the supervisor task.
    shared: Arc<Shared>,
    /// Cancelled when the broker is dropped: ends the consumer thread.
    stop: CancellationToken,
}

impl AmqpBroker {
    /// Starts the supervisor task (which connects in the background and
    /// retries forever) and returns the broker handle at once.
    ///
    /// The supervisor, and with it the consumer's fan-out, runs on a thread
    /// of its own (`amqp-consumer`, a one-thread tokio runtime), not as a
    /// task of the gateway's runtime: there, a trigger's wake-up would wait
    /// in tokio's first-in-first-out run queue behind every session task
    /// the previous trigger woke, once for the delivery and once for its
    /// ack, which was most of the gateway's latency from 20 triggers/s on
    /// (docs/performance.md). The operating system runs a thread that
    /// wakes from sleep soon, even on a busy core.
    pub fn start(
        config: AmqpConfig,
        limits: TriggerLimits,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<AmqpBroker, AmqpSetupError> {
        let url = config.url.as_ref().ok_or(AmqpSetupError::Url)?;
        let mut uri: AMQPUri = url.0.parse().map_err(|_| AmqpSetupError::Url)?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(config.heartbeat_seconds);
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout = Some(5_000);
        }
        let tls = match uri.scheme {
            AMQPScheme::AMQPS => Some(crate::tls::client_config(&config.tls, "broker.amqp.tls")?),
            AMQPScheme::AMQP => None,
        };
        metrics.amqp_configured.set(1);
        let shared = Arc::new(Shared {
            config,
            limits,
            uri,
            tls,
            last_error: Mutex::new(None),
            hub,
            metrics,
            ready: AtomicBool::new(false),
            publisher: Mutex::new(None),
            warned_existing_exchange: AtomicBool::new(false),
        });
        let stop = CancellationToken::new();
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AmqpSetupError::Thread)?;
        let (thread_shared, thread_stop) = (shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name("amqp-consumer".into())
            .spawn(move || {
                runtime.block_on(async {
                    tokio::select! {
                        () = supervise(thread_shared) => {}
                        () = thread_stop.cancelled() => {}
                    }
                });
            })
            .map_err(AmqpSetupError::Thread)?;
        Ok(AmqpBroker { shared, stop })
    }
}

impl Drop for AmqpBroker {
    fn drop(&mut self) {
        // Ends the consumer thread (and its connection) with the broker.
        self.stop.cancel();
    }
}

impl Broker for AmqpBroker {
    fn publish(&self, message: Published) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move {
            let channel =
                self.shared.publisher().ok_or_else(|| BrokerError::Unavailable("not connected to RabbitMQ".into()))?;
            let unavailable = |e: lapin::Error| BrokerError::Unavailable(format!("RabbitMQ: {e}"));
            let confirmation = channel
                .basic_publish(
                    self.shared.config.exchange.as_str().into(),
                    ROUTING_KEY.into(),
                    BasicPublishOptions::default(),
                    &message.to_body(),
                    BasicProperties::default().with_content_type("application/json".into()),
                )
                .await
                .map_err(unavailable)?
                .await
                .map_err(unavailable)?;
            match confirmation {
                Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
                Confirmation::Nack(_) => Err(BrokerError::Unavailable("RabbitMQ refused the trigger (nack)".into())),
            }
        }
        .boxed()
    }

    fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed)
    }

    fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn name(&self) -> &'static str {
        "amqp"
    }
}

/// Connects, consumes until the connection is lost, and starts over, with
/// capped exponential backoff and jitter between attempts.
async fn supervise(shared: Arc<Shared>) {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(seconds(shared.config.reconnect_max_seconds))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    let mut delays = backoff.build();
    let target = redact_url(&shared.config.url.as_ref().map(|u| u.0.clone()).unwrap_or_default());
    let mut first = true;
    loop {
        if !first {
            shared.metrics.amqp_reconnects.inc();
        }
        first = false;
        let (consumed, error, tls) = match consume(&shared).await {
            Ok(()) => (true, "consumer stopped".to_string(), None),
            Err(Lost { consumed, error, tls }) => (consumed, error, tls),
        };
        if let Some(reason) = tls {
            shared.metrics.tls_failures.get_or_create(&TlsFailureLabels { peer: "broker", reason }).inc();
        }
        *shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
        shared.set_ready(false);
        shared.set_publisher(None);
        if consumed {
            // Connected for a while: the next failure starts from short delays.
            delays = backoff.build();
        }
        let delay = delays.next().unwrap_or(seconds(shared.config.reconnect_max_seconds));
        warn!(
            broker = %target,
            error = %error,
            retry_in_ms = delay.as_millis() as u64,
            "RabbitMQ unavailable; readiness is 503 until consuming again"
        );
        tokio::time::sleep(delay).await;
    }
}

/// How a connection ended.
struct Lost {
    /// Whether it got as far as consuming.
    consumed: bool,
    /// What happened (never contains the URL).
    error: String,
    /// The TLS failure's reason, when it was one.
    tls: Option<&'static str>,
}

fn lost(consumed: bool) -> impl Fn(lapin::Error) -> Lost {
    move |e| match crate::tls::failure(&e) {
        Some(tls) => Lost { consumed, error: tls.message, tls: Some(tls.reason) },
        None => Lost { consumed, error: e.to_string(), tls: None },
    }
}

/// Declares the exchange; if it exists with other arguments (a 3.x gateway
/// declares it non-durable), uses it as it is. Returns a usable channel:
/// the broker closes a channel whose declare failed.
async fn declare_exchange(shared: &Shared, connection: &Connection, channel: Channel) -> lapin::Result<Channel> {
    let name = shared.config.exchange.as_str();
    let declared = channel
        .exchange_declare(
            name.into(),
            exchange_kind(),
            exchange_options(shared.config.exchange_durable),
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(()) => Ok(channel),
        Err(e) if is_precondition_failed(&e) => {
            if !shared.warned_existing_exchange.swap(true, Ordering::Relaxed) {
                warn!(
                    exchange = name,
                    "exchange exists with other arguments (3.x gateways declare it non-durable); using it as it is"
                );
            }
            let channel = connection.create_channel().await?;
            let passive = ExchangeDeclareOptions { passive: true, ..exchange_options(shared.config.exchange_durable) };
            channel.exchange_declare(name.into(), exchange_kind(), passive, FieldTable::default()).await?;
            Ok(channel)
        }
        Err(e) => Err(e),
    }
}

/// One connection's life: set up, consume until lost.
async fn consume(shared: &Shared) -> Result<(), Lost> {
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("high-templar-gateway pid {}", std::process::id()).into());
    let connection = connect(shared.uri.clone(), properties, shared.tls.clone()).await.map_err(lost(false))?;
    let channel = connection.create_channel().await.map_err(lost(false))?;
    let channel = declare_exchange(shared, &connection, channel).await.map_err(lost(false))?;
    channel.basic_qos(shared.config.prefetch, BasicQosOptions::default()).await.map_err(lost(false))?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .map_err(lost(false))?;
    channel
        .queue_bind(
            queue.name().clone(),
            shared.config.exchange.as_str().into(),
            ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(lost(false))?;
    let mut consumer = channel
        .basic_consume(queue.name().clone(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(lost(false))?;
    let publisher = connection.create_channel().await.map_err(lost(false))?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(lost(false))?;
    shared.set_publisher(Some(publisher));
    shared.set_ready(true);
    info!(exchange = %shared.config.exchange, queue = %queue.name(), "consuming triggers from RabbitMQ");

    // Fan out what is already received, then acknowledge the batch with one
    // `multiple` ack: a per-message ack costs a round of wake-ups each.
    // Acking after the fan-out keeps the prefetch bounding what is in flight.
    let batch = usize::from(shared.config.prefetch / 2).max(1);
    let mut ended = false;
    while let Some(first) = consumer.next().await {
        let mut last = first.map_err(lost(true))?;
        on_body(shared, &last.data);
        for _ in 1..batch {
            match consumer.next().now_or_never() {
                Some(Some(next)) => {
                    last = next.map_err(lost(true))?;
                    on_body(shared, &last.data);
                }
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        last.ack(BasicAckOptions { multiple: true }).await.map_err(lost(true))?;
        if ended {
            break;
        }
    }
    let _ = connection.close(200, "consumer ended".into()).await;
    Ok(())
}

/// Acts on one AMQP body; a malformed one is counted and dropped.
fn on_body(shared: &Shared, body: &[u8]) {
    match Published::parse_within(body, shared.limits) {
        Ok(message) => {
            if let Published::Trigger(_) = message {
                shared.metrics.triggers.get_or_create(&TriggerSource { source: "amqp" }).inc();
            }
            shared.hub.deliver(&message);
        }
        Err(e) => {
            shared.metrics.triggers_rejected.get_or_create(&Reason { reason: e.reason() }).inc();
            // A publisher can send malformed bodies as fast as it likes: one
            // line per interval, with a count; the reason label only, never
            // the error text (it may name a room key of the body).
            static MALFORMED: LogThrottle = LogThrottle::new(std::time::Duration::from_secs(10));
            if let Some(suppressed) = MALFORMED.allow() {
                warn!(
                    reason = e.reason(),
                    bytes = body.len(),
                    suppressed,
                    "malformed AMQP trigger dropped (counted in hightemplar_triggers_rejected_total)"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("amqp://user:hunter2@rabbit:5672/%2f"), "amqp://user:***@rabbit:5672/%2f");
        assert_eq!(redact_url("amqp://rabbit/"), "amqp://rabbit/");
        assert_eq!(redact_url("::hunter2"), "<unparsable AMQP URL>");
    }

    #[test]
    fn exchange_matches_3x_but_for_durability() {
        let o = exchange_options(false);
        assert!(!o.durable && !o.auto_delete && !o.internal && !o.passive);
        assert!(exchange_options(true).durable);
        assert_eq!(exchange_kind(), ExchangeKind::Direct);
    }
}
