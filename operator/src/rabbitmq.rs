//! RabbitMQ topology: the operator declares (and, with `deletionPolicy:
//! Delete`, deletes) the exchange, with exactly the arguments the gateways
//! use (`high_templar_gateway::broker::amqp::exchange_options`).

use std::time::Duration;

use high_templar_gateway::broker::amqp::{exchange_kind, exchange_options, is_precondition_failed};
use high_templar_gateway::tls::TlsMaterial;
use lapin::options::ExchangeDeleteOptions;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ErrorKind};

/// Whole-operation timeout (connect, declare, close).
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why the exchange could not be declared or deleted. Messages never
/// contain the URL (it holds a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// The Secret value is not an `amqp://` or `amqps://` URL.
    #[error("the RabbitMQ URL in the referenced Secret is not an amqp:// or amqps:// URL")]
    InvalidUrl,
    /// `spec.rabbitmq.tls` with an `amqp://` URL.
    #[error("spec.rabbitmq.tls is set but the RabbitMQ URL in the referenced Secret is amqp://: use amqps://")]
    TlsWithoutAmqps,
    /// The TLS Secrets cannot be used (not PEM, key of another certificate).
    #[error("spec.rabbitmq.tls: {0}")]
    TlsConfig(String),
    /// The TLS handshake failed: unknown CA, hostname mismatch, refused
    /// client certificate.
    #[error("RabbitMQ unreachable: {0}")]
    Tls(String),
    /// RabbitMQ refused the credentials or the vhost.
    #[error("RabbitMQ refused the credentials or vhost: {0}")]
    AccessRefused(String),
    /// RabbitMQ could not be reached in time.
    #[error("RabbitMQ unreachable: {0}")]
    Unreachable(String),
    /// The exchange exists with other arguments.
    #[error(
        "exchange {0:?} exists with other arguments (high-templar 3.x declares it non-durable): set spec.rabbitmq.durable to match, or delete the exchange"
    )]
    PreconditionFailed(String),
    /// Anything else RabbitMQ answered.
    #[error("RabbitMQ error: {0}")]
    Other(String),
}

impl TopologyError {
    /// The condition reason (`BrokerReady` False).
    pub fn reason(&self) -> &'static str {
        match self {
            TopologyError::InvalidUrl | TopologyError::TlsWithoutAmqps => "InvalidURL",
            TopologyError::TlsConfig(_) => "InvalidTLSSecret",
            TopologyError::Tls(_) => "TLSError",
            TopologyError::AccessRefused(_) => "AccessRefused",
            TopologyError::Unreachable(_) => "Unreachable",
            TopologyError::PreconditionFailed(_) => "PreconditionFailed",
            TopologyError::Other(_) => "BrokerError",
        }
    }
}

fn classify(e: lapin::Error) -> TopologyError {
    if let Some(tls) = high_templar_gateway::tls::failure(&e) {
        return TopologyError::Tls(tls.message);
    }
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                TopologyError::AccessRefused(amqp.to_string())
            }
            _ => TopologyError::Other(amqp.to_string()),
        },
        ErrorKind::IOError(io) => TopologyError::Unreachable(io.to_string()),
        // RabbitMQ drops the connection on bad credentials during the handshake.
        ErrorKind::InvalidConnectionState(_) => {
            TopologyError::AccessRefused("connection closed during the handshake".into())
        }
        _ => TopologyError::Other(e.to_string()),
    }
}

/// Where to connect: the URL (from its Secret) and, for `amqps://`, the
/// TLS material of `spec.rabbitmq.tls` (from its Secrets).
#[derive(Clone, Debug)]
pub struct Target {
    /// `amqp://` or `amqps://` URL; holds a password.
    pub url: high_templar_gateway::config::Secret,
    /// `Some` when `spec.rabbitmq.tls` is set: its CA and client certificate.
    pub tls: Option<TlsMaterial>,
}

async fn connect(target: &Target) -> Result<Connection, TopologyError> {
    let mut uri: lapin::uri::AMQPUri = target.url.0.parse().map_err(|_| TopologyError::InvalidUrl)?;
    let tls = match (&uri.scheme, &target.tls) {
        (lapin::uri::AMQPScheme::AMQP, None) => None,
        (lapin::uri::AMQPScheme::AMQP, Some(_)) => return Err(TopologyError::TlsWithoutAmqps),
        // Without spec.rabbitmq.tls: the system's CAs, as the gateway does.
        (lapin::uri::AMQPScheme::AMQPS, material) => Some(
            material
                .clone()
                .unwrap_or_default()
                .client_config("spec.rabbitmq.tls")
                .map_err(|e| TopologyError::TlsConfig(e.to_string()))?,
        ),
    };
    uri.query.connection_timeout.get_or_insert(5_000);
    let properties = ConnectionProperties::default().with_connection_name("high-templar-operator".into());
    high_templar_gateway::broker::amqp::connect(uri, properties, tls).await.map_err(classify)
}

async fn with_timeout<T>(
    what: impl std::future::Future<Output = Result<T, TopologyError>>,
) -> Result<T, TopologyError> {
    tokio::time::timeout(TIMEOUT, what)
        .await
        .unwrap_or_else(|_| Err(TopologyError::Unreachable(format!("no answer within {}s", TIMEOUT.as_secs()))))
}

/// Declares `exchange` (direct, durable as asked).
pub async fn declare_exchange(target: &Target, exchange: &str, durable: bool) -> Result<(), TopologyError> {
    with_timeout(async {
        let connection = connect(target).await?;
        let channel = connection.create_channel().await.map_err(classify)?;
        let result = channel
            .exchange_declare(exchange.into(), exchange_kind(), exchange_options(durable), FieldTable::default())
            .await;
        let _ = connection.close(200, "done".into()).await;
        result.map_err(|e| {
            if is_precondition_failed(&e) { TopologyError::PreconditionFailed(exchange.into()) } else { classify(e) }
        })
    })
    .await
}

/// Deletes `exchange` (absent is fine).
pub async fn delete_exchange(target: &Target, exchange: &str) -> Result<(), TopologyError> {
    with_timeout(async {
        let connection = connect(target).await?;
        let channel = connection.create_channel().await.map_err(classify)?;
        let result = channel.exchange_delete(exchange.into(), ExchangeDeleteOptions::default()).await;
        let _ = connection.close(200, "done".into()).await;
        match result {
            Ok(()) => Ok(()),
            // RabbitMQ answers NOT_FOUND for a missing exchange on some versions.
            Err(e) if matches!(e.kind(), ErrorKind::ProtocolError(a) if *a.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)) => {
                Ok(())
            }
            Err(e) => Err(classify(e)),
        }
    })
    .await
}
