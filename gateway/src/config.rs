//! Gateway configuration: one YAML document (the file the operator writes
//! into the ConfigMap), overridden by command-line flags and `HT_*`
//! environment variables. Every field has a default except `backend.url`.
//!
//! Field names are camelCase, as in the `HighTemplar` resource. Unknown
//! fields are errors, so a typo never silently falls back to a default.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::forwarding::{ForwardRule, validate_rule};

/// A secret string: never printed by `Debug`, so it cannot reach a log line.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The whole gateway configuration.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// Address of the HTTP/websocket listener.
    pub listen: Listen,
    /// The existing API the gateway authenticates against.
    pub backend: BackendConfig,
    /// Where triggers come from.
    pub broker: BrokerConfig,
    /// `POST /trigger`.
    pub trigger: TriggerConfig,
    /// Per-connection and per-process limits.
    pub limits: Limits,
    /// SIGTERM behaviour.
    pub shutdown: ShutdownConfig,
    /// Whether clients may ask for `{"type":"status"}`.
    pub client_status: ClientStatusConfig,
    /// Who may connect: browser origins.
    pub security: SecurityConfig,
    /// Live permissions: user identity and refreshes.
    pub permissions: PermissionsConfig,
    /// How the fan-out hands deliveries to sockets.
    pub fanout: FanoutConfig,
}

/// How the fan-out hands deliveries to sockets (docs/performance.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct FanoutConfig {
    /// Write a delivery for a connection with nothing queued straight to
    /// its socket, while that keeps up (`write_through`); false: always
    /// queue it for the connection's task.
    pub write_through: bool,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        FanoutConfig { write_through: true }
    }
}

/// A listen address, default `0.0.0.0:8080`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Listen(pub SocketAddr);

impl Default for Listen {
    fn default() -> Self {
        Listen(SocketAddr::from(([0, 0, 0, 0], 8080)))
    }
}

/// The backend that answers `bootstrap/`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BackendConfig {
    /// Base URL, e.g. `http://api.default.svc:8000/api/`. Required.
    pub url: Option<String>,
    /// Unix socket to reach the backend through instead of TCP; `url`
    /// still gives the path and `Host`.
    pub socket: Option<PathBuf>,
    /// Path of the bootstrap call, relative to `url`.
    pub bootstrap_path: String,
    /// Timeout of the whole bootstrap call.
    pub timeout_seconds: f64,
    /// Extra forwarding rules (DESIGN.md §2), added to or replacing the 3.x table.
    pub forward: Vec<ForwardRule>,
    /// Largest bootstrap answer, bytes; a larger one refuses the user
    /// (`invalid_body`, close 4401).
    pub max_body_bytes: usize,
    /// Most `allowed_rooms` in one answer; more refuses the user
    /// (`invalid_body`, close 4401): a backend bug to fix, not to hold.
    pub max_allowed_rooms: usize,
    /// How many bootstrap calls run at once, and how long upgrades wait.
    pub admission: AdmissionConfig,
    /// When to stop calling a failing backend.
    pub circuit_breaker: CircuitBreakerConfig,
    /// Concurrent connects that would send the identical forwarded request
    /// (same headers, credentials included: one user's tabs) share one
    /// bootstrap call.
    pub coalesce: bool,
    /// Keep successful answers for a short time for identical requests.
    pub answer_reuse: AnswerReuseConfig,
    /// TLS to an `https://` backend: CA, client certificate.
    #[serde(skip_serializing_if = "TlsConfig::is_empty")]
    pub tls: TlsConfig,
}

/// Bootstrap answers reused by identical connects (`answer_cache::AnswerCache`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AnswerReuseConfig {
    /// How long a successful answer is given to connects sending the
    /// identical forwarded request; 0 (the default): not kept.
    pub seconds: f64,
    /// Most answers kept.
    pub max_entries: usize,
    /// Most bytes the kept answers hold (rooms and requests, roughly); an
    /// answer over a quarter of it is not kept.
    pub max_bytes: usize,
}

impl Default for AnswerReuseConfig {
    fn default() -> Self {
        AnswerReuseConfig { seconds: 0.0, max_entries: 10_000, max_bytes: 16 << 20 }
    }
}

/// TLS settings of a client connection (`backend.tls`, `broker.amqp.tls`),
/// used when the URL is `https://` or `amqps://`. The server's certificate
/// is always verified, its name against the URL's host included; there is
/// no setting to turn that off. Files are read once, at startup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file of the CA certificates that may sign the server's
    /// certificate, trusted instead of the system's CA store
    /// (`/etc/ssl/certs`, which is used when this is unset).
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (then its intermediates)
    /// presented to the server; set together with `keyFile`.
    pub cert_file: Option<PathBuf>,
    /// PEM file of `certFile`'s private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

impl TlsConfig {
    /// Nothing set: system CAs, no client certificate.
    pub fn is_empty(&self) -> bool {
        self == &TlsConfig::default()
    }

    /// `certFile` and `keyFile` come together.
    fn validate(&self, cert_field: &'static str) -> Result<(), ConfigError> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(ConfigError::Invalid {
                field: cert_field,
                message: "certFile and keyFile are set together (the client certificate and its key)".into(),
            });
        }
        Ok(())
    }
}

/// The backend's circuit breaker (`breaker::CircuitBreaker`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Off: every connect calls the backend, however it fails.
    pub enabled: bool,
    /// Recent calls considered.
    pub window: usize,
    /// Failed share of the window (5xx, `429`, timeouts, unreachable) that
    /// opens the circuit.
    pub failure_ratio: f64,
    /// Seconds the circuit stays open (±20 % jitter) before one probe call.
    pub open_seconds: f64,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig { enabled: true, window: 20, failure_ratio: 0.5, open_seconds: 5.0 }
    }
}

/// Admission of bootstrap calls: a connect storm (every browser
/// reconnecting after a rollout) waits in a bounded queue instead of
/// reaching the API all at once.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Bootstrap calls in flight at once per process.
    pub max_concurrent: usize,
    /// Upgrades waiting for a call slot; past it, `503` with `Retry-After`.
    pub max_queued: usize,
    /// Longest an upgrade waits for a slot; then `503` with `Retry-After`.
    pub max_wait_seconds: f64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig { max_concurrent: 128, max_queued: 256, max_wait_seconds: 5.0 }
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            url: None,
            socket: None,
            bootstrap_path: "bootstrap/".into(),
            timeout_seconds: 5.0,
            forward: Vec::new(),
            max_body_bytes: 4 << 20,
            max_allowed_rooms: 10_000,
            admission: AdmissionConfig::default(),
            circuit_breaker: CircuitBreakerConfig::default(),
            coalesce: true,
            answer_reuse: AnswerReuseConfig::default(),
            tls: TlsConfig::default(),
        }
    }
}

/// Which broker carries triggers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "camelCase")]
pub enum BrokerKind {
    /// In-process: a single gateway, no RabbitMQ.
    #[default]
    Memory,
    /// RabbitMQ: every replica consumes the same exchange.
    Amqp,
}

/// Broker selection and settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `memory` (default) or `amqp`.
    pub kind: BrokerKind,
    /// Settings of the `amqp` broker.
    pub amqp: AmqpConfig,
}

/// RabbitMQ settings (DESIGN.md §3).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:5672/vhost`; required with `kind: amqp`.
    /// Holds a password: prefer the `HT_AMQP_URL` environment variable.
    pub url: Option<Secret>,
    /// Exchange triggers are published to (3.x: `hightemplar`).
    pub exchange: String,
    /// Declare the exchange durable. 3.x declared it non-durable; an
    /// existing exchange with other arguments is used as it is.
    pub exchange_durable: bool,
    /// Unacknowledged triggers in flight from RabbitMQ to this process.
    pub prefetch: u16,
    /// AMQP heartbeat; a silent broker is detected after about two of them.
    pub heartbeat_seconds: u16,
    /// Longest wait between reconnection attempts (backoff starts at 0.1 s).
    pub reconnect_max_seconds: f64,
    /// TLS to an `amqps://` broker: CA, client certificate.
    #[serde(skip_serializing_if = "TlsConfig::is_empty")]
    pub tls: TlsConfig,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: None,
            exchange: "hightemplar".into(),
            exchange_durable: true,
            prefetch: 256,
            heartbeat_seconds: 2,
            reconnect_max_seconds: 10.0,
            tls: TlsConfig::default(),
        }
    }
}

/// `POST /trigger` settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TriggerConfig {
    /// Bearer token; the endpoint answers 404 when unset. Prefer the
    /// `HT_TRIGGER_TOKEN` environment variable to a file.
    pub token: Option<Secret>,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// Time to receive the whole body; a slower one is answered 408.
    pub body_timeout_seconds: f64,
    /// Most rooms in one trigger (HTTP and AMQP); more is refused.
    pub max_rooms: usize,
}

impl TriggerConfig {
    /// The bounds on one trigger body, for both sources.
    pub fn limits(&self) -> crate::trigger::TriggerLimits {
        crate::trigger::TriggerLimits { max_body_bytes: self.max_body_bytes, max_rooms: self.max_rooms }
    }
}

impl Default for TriggerConfig {
    fn default() -> Self {
        TriggerConfig { token: None, max_body_bytes: 1 << 20, body_timeout_seconds: 10.0, max_rooms: 10_000 }
    }
}

/// Limits protecting the process.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    /// Open websocket connections per process; more are refused with 503.
    pub max_connections: usize,
    /// Subscriptions per connection (`too-many-subscriptions` past it).
    pub max_subscriptions_per_connection: usize,
    /// Memory one connection's allowed rooms and subscriptions (rooms and
    /// ids) may hold, bytes, roughly; a subscribe past it gets
    /// `too-many-subscriptions`, a bootstrap answer past it refuses the user.
    pub max_connection_bytes: usize,
    /// Largest client message; a larger one closes with 1009.
    pub max_message_bytes: usize,
    /// Longest `requestId`, as JSON text (quotes included); a longer one is
    /// answered `invalid-request-id` and not kept. 3.x clients send UUIDs
    /// (38 bytes).
    pub max_request_id_bytes: usize,
    /// Close a connection after this long without any client frame.
    pub idle_timeout_seconds: f64,
    /// Before the websocket upgrade: each request's headers must arrive
    /// within this long of the connection opening or of the previous
    /// response (so silent and idle keep-alive connections close too), and
    /// a response the client does not read is dropped after this long.
    pub handshake_timeout_seconds: f64,
    /// Connections not yet upgraded to a websocket (handshakes, triggers,
    /// probes, scrapes) served at once; past it, 503 at once. Lowered to
    /// half the file-descriptor reserve when the open-file limit is small.
    pub max_pending_connections: usize,
    /// Interval of server websocket pings.
    pub ping_interval_seconds: f64,
    /// Publish frames queued per connection; a client further behind is
    /// disconnected with 1013 (slow consumer).
    pub outbound_queue: usize,
    /// Kernel send buffer per connection (`SO_SNDBUF`), bytes; 0 leaves it
    /// to the kernel's autotuning, which lets one client that stops reading
    /// hold up to `net.ipv4.tcp_wmem`'s maximum (often 4 MiB) of kernel
    /// memory before its queue fills. Linux doubles the value given.
    pub send_buffer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 50_000,
            max_subscriptions_per_connection: 10_000,
            max_connection_bytes: 8 << 20,
            max_message_bytes: 64 * 1024,
            max_request_id_bytes: 128,
            idle_timeout_seconds: 300.0,
            handshake_timeout_seconds: 10.0,
            max_pending_connections: 512,
            ping_interval_seconds: 30.0,
            outbound_queue: 1024,
            send_buffer_bytes: 0,
        }
    }
}

/// What SIGTERM does (DESIGN.md §4).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Time between readiness going 503 and the first websocket close, so
    /// load balancers stop sending new clients.
    pub drain_delay_seconds: f64,
    /// Websockets are closed (1001) at random moments over this window, so
    /// clients do not reconnect all at once.
    pub close_window_seconds: f64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { drain_delay_seconds: 5.0, close_window_seconds: 10.0 }
    }
}

/// Live permissions (docs/protocol.md "Control messages").
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PermissionsConfig {
    /// Where the user identity is in the bootstrap answer, as object keys
    /// joined by `.` (`user.id`; 3.x Django settings name `user.data.id`).
    /// Unset: connections have no identity, and control messages reach
    /// them by `subscribed` only.
    pub user_path: Option<String>,
    /// Re-run bootstrap for every connection about this often (±20 %,
    /// through admission), dropping subscriptions no longer permitted.
    /// 0 (the default): only when a `refresh` control message asks.
    pub refresh_seconds: f64,
}

/// The client `status` frame.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ClientStatusConfig {
    /// When false, `{"type":"status"}` gets `message-type-not-allowed`.
    pub enabled: bool,
}

impl Default for ClientStatusConfig {
    fn default() -> Self {
        ClientStatusConfig { enabled: true }
    }
}

/// What protects the users behind the gateway from other sites.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Browser origins allowed to open a websocket besides the gateway's
    /// own (same-origin: the Origin's host equals `Host`): exact origins
    /// (`https://app.example.com`), `https://*.example.com` patterns, or
    /// `"*"` for any. Requests without `Origin` (not browsers) are allowed.
    pub allowed_origins: Vec<String>,
    /// Networks (CIDRs, e.g. `10.0.0.0/8`) of the proxies in front of the
    /// gateway whose `X-Real-IP` / `X-Forwarded-For` are believed; anyone
    /// else could write those headers, so for them the TCP peer's address
    /// is the client's.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// A configuration that cannot be used. The message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML does not fit the schema.
    #[error("config file {path}: field `{field}`: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: `{field}`: {message}")]
    Invalid {
        /// Dotted path of the offending field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads a YAML config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::from_yaml(&text).map_err(|(field, message)| ConfigError::Parse {
            path: path.to_owned(),
            field,
            message,
        })
    }

    /// Parses YAML; on error returns the field path and the message.
    pub fn from_yaml(text: &str) -> Result<Config, (String, String)> {
        // An empty file is an empty mapping: all defaults.
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text)).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { "(top level)".to_string() } else { field };
            (field, e.into_inner().to_string())
        })
    }

    /// Checks values that types alone do not: required fields, ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: &str| ConfigError::Invalid { field, message: message.to_string() };
        match &self.backend.url {
            None => {
                return Err(invalid(
                    "backend.url",
                    "required: set it in the config file, with --backend-url or HT_BACKEND_URL",
                ));
            }
            Some(url) => {
                let parsed =
                    reqwest::Url::parse(url).map_err(|e| invalid("backend.url", &format!("not a URL: {e}")))?;
                match parsed.scheme() {
                    "http" if !self.backend.tls.is_empty() => {
                        return Err(invalid("backend.tls", "is set but backend.url is http://: use https://"));
                    }
                    "http" => {}
                    "https" if self.backend.socket.is_some() => {
                        return Err(invalid("backend.socket", "works with http:// backends only"));
                    }
                    "https" => {}
                    _ => return Err(invalid("backend.url", "only http:// and https:// backends are supported")),
                }
            }
        }
        self.backend.tls.validate("backend.tls.certFile")?;
        if self.backend.bootstrap_path.starts_with('/') {
            return Err(invalid("backend.bootstrapPath", "must be relative to backend.url (no leading '/')"));
        }
        let positive = |field, v: f64| {
            if v.is_finite() && v > 0.0 && v < 1e9 {
                Ok(())
            } else {
                Err(invalid(field, "must be a positive number of seconds"))
            }
        };
        positive("backend.timeoutSeconds", self.backend.timeout_seconds)?;
        positive("limits.idleTimeoutSeconds", self.limits.idle_timeout_seconds)?;
        positive("limits.pingIntervalSeconds", self.limits.ping_interval_seconds)?;
        let non_negative = |field, v: f64| {
            if v.is_finite() && (0.0..1e9).contains(&v) {
                Ok(())
            } else {
                Err(invalid(field, "must be zero or a positive number of seconds"))
            }
        };
        non_negative("shutdown.drainDelaySeconds", self.shutdown.drain_delay_seconds)?;
        non_negative("shutdown.closeWindowSeconds", self.shutdown.close_window_seconds)?;
        let at_least_one = |field, v: usize| {
            if v >= 1 { Ok(()) } else { Err(invalid(field, "must be at least 1")) }
        };
        at_least_one("limits.maxConnections", self.limits.max_connections)?;
        at_least_one("limits.maxSubscriptionsPerConnection", self.limits.max_subscriptions_per_connection)?;
        at_least_one("limits.maxConnectionBytes", self.limits.max_connection_bytes)?;
        at_least_one("limits.outboundQueue", self.limits.outbound_queue)?;
        at_least_one("limits.maxPendingConnections", self.limits.max_pending_connections)?;
        at_least_one("backend.admission.maxConcurrent", self.backend.admission.max_concurrent)?;
        non_negative("backend.admission.maxWaitSeconds", self.backend.admission.max_wait_seconds)?;
        let breaker = &self.backend.circuit_breaker;
        at_least_one("backend.circuitBreaker.window", breaker.window)?;
        if !(breaker.failure_ratio > 0.0 && breaker.failure_ratio <= 1.0) {
            return Err(invalid("backend.circuitBreaker.failureRatio", "must be more than 0 and at most 1"));
        }
        positive("backend.circuitBreaker.openSeconds", breaker.open_seconds)?;
        if !(self.limits.handshake_timeout_seconds >= 0.1 && self.limits.handshake_timeout_seconds <= 3600.0) {
            return Err(invalid("limits.handshakeTimeoutSeconds", "must be at least 0.1 and at most 3600"));
        }
        // The shortest id, `""` or a one-digit number, must fit.
        if self.limits.max_request_id_bytes < 2 {
            return Err(invalid("limits.maxRequestIdBytes", "must be at least 2"));
        }
        at_least_one("trigger.maxBodyBytes", self.trigger.max_body_bytes)?;
        at_least_one("trigger.maxRooms", self.trigger.max_rooms)?;
        at_least_one("backend.maxBodyBytes", self.backend.max_body_bytes)?;
        if !(self.trigger.body_timeout_seconds > 0.0 && self.trigger.body_timeout_seconds <= 3600.0) {
            return Err(invalid("trigger.bodyTimeoutSeconds", "must be more than 0 and at most 3600"));
        }
        let reuse = self.backend.answer_reuse.seconds;
        if !(reuse == 0.0 || (0.001..=3600.0).contains(&reuse)) {
            return Err(invalid("backend.answerReuse.seconds", "must be 0 (off) or at most 3600"));
        }
        if let Some(path) = &self.permissions.user_path {
            crate::identity::UserPath::parse(path).map_err(|e| invalid("permissions.userPath", &e.to_string()))?;
        }
        let refresh = self.permissions.refresh_seconds;
        if !(refresh == 0.0 || (1.0..1e9).contains(&refresh)) {
            return Err(invalid("permissions.refreshSeconds", "must be 0 (off) or at least 1"));
        }
        crate::origin::OriginPolicy::new(&self.security.allowed_origins)
            .map_err(|e| invalid("security.allowedOrigins", &e.to_string()))?;
        if self.limits.max_message_bytes < 16 {
            return Err(invalid("limits.maxMessageBytes", "must be at least 16"));
        }
        if let Some(token) = &self.trigger.token
            && token.0.is_empty()
        {
            return Err(invalid("trigger.token", "must not be empty (leave it unset to disable POST /trigger)"));
        }
        if self.broker.kind == BrokerKind::Amqp {
            let amqp = &self.broker.amqp;
            let Some(url) = &amqp.url else {
                return Err(invalid(
                    "broker.amqp.url",
                    "required with the amqp broker: set it in the config file, with --amqp-url or HT_AMQP_URL",
                ));
            };
            // The message never quotes the URL: it holds a password.
            match url.0.parse::<lapin::uri::AMQPUri>() {
                Err(_) => return Err(invalid("broker.amqp.url", "not an amqp:// or amqps:// URL")),
                Ok(uri) if uri.scheme == lapin::uri::AMQPScheme::AMQP && !amqp.tls.is_empty() => {
                    return Err(invalid("broker.amqp.tls", "is set but broker.amqp.url is amqp://: use amqps://"));
                }
                Ok(_) => {}
            }
            amqp.tls.validate("broker.amqp.tls.certFile")?;
            if amqp.exchange.is_empty() || amqp.exchange.len() > 255 {
                return Err(invalid("broker.amqp.exchange", "must be 1 to 255 characters"));
            }
            if amqp.prefetch == 0 {
                return Err(invalid("broker.amqp.prefetch", "must be at least 1"));
            }
            positive("broker.amqp.reconnectMaxSeconds", amqp.reconnect_max_seconds)?;
        }
        for rule in &self.backend.forward {
            validate_rule(rule).map_err(|e| invalid("backend.forward", &format!("header {:?}: {e}", rule.header)))?;
        }
        Ok(())
    }
}

/// Seconds as a `Duration` (validated values only).
pub fn seconds(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_document_is_all_defaults_but_needs_a_backend() {
        let c = Config::from_yaml("").expect("parses");
        assert_eq!(c.listen, Listen::default());
        assert_eq!(c.backend.bootstrap_path, "bootstrap/");
        assert_eq!(c.limits.max_message_bytes, 65536);
        let e = c.validate().expect_err("no backend url");
        assert!(e.to_string().contains("backend.url"), "{e}");
    }

    #[test]
    fn full_document() {
        let c = Config::from_yaml(
            r#"
listen: 127.0.0.1:9000
backend:
  url: http://api:8000/api/
  bootstrapPath: boot/
  timeoutSeconds: 2.5
  forward:
    - header: X-Tenant
      from: {cookie: tenant}
trigger: {token: s3cret}
limits: {maxConnections: 10, idleTimeoutSeconds: 60}
shutdown: {drainDelaySeconds: 0, closeWindowSeconds: 1}
clientStatus: {enabled: false}
"#,
        )
        .expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.listen.0.port(), 9000);
        assert_eq!(c.limits.max_connections, 10);
        assert_eq!(c.limits.max_subscriptions_per_connection, 10_000, "unset fields keep defaults");
        assert!(!c.client_status.enabled);
        assert!(!format!("{c:?}").contains("s3cret"), "Debug redacts the token");
    }

    #[test]
    fn errors_name_the_field() {
        let (field, msg) = Config::from_yaml("limits:\n  maxConnections: lots\n").expect_err("bad type");
        assert_eq!(field, "limits.maxConnections");
        assert!(msg.contains("invalid type"), "{msg}");
        let (field, _) = Config::from_yaml("backend:\n  urll: x\n").expect_err("unknown field");
        assert_eq!(field, "backend.urll");
        let (field, _) = Config::from_yaml("broker: {kind: kafka}\n").expect_err("unknown broker");
        assert_eq!(field, "broker.kind");
        let mut c = Config::from_yaml("backend: {url: 'http://a/'}\nlimits: {pingIntervalSeconds: 0}").expect("parses");
        let e = c.validate().expect_err("zero ping interval");
        assert!(e.to_string().contains("limits.pingIntervalSeconds"), "{e}");
        c.limits.ping_interval_seconds = 1.0;
        c.backend.forward.push(serde_yaml::from_str("{header: Host, from: {value: x}}").expect("rule"));
        let e = c.validate().expect_err("host rule");
        assert!(e.to_string().contains("Host"), "{e}");
    }

    #[test]
    fn amqp_broker_needs_a_valid_url_and_never_prints_it() {
        let c = Config::from_yaml("backend: {url: 'http://a/'}\nbroker: {kind: amqp}").expect("parses");
        assert!(c.validate().expect_err("no url").to_string().contains("broker.amqp.url"));
        let c =
            Config::from_yaml("backend: {url: 'http://a/'}\nbroker: {kind: amqp, amqp: {url: 'http://u:hunter2@h/'}}")
                .expect("parses");
        let e = c.validate().expect_err("not amqp").to_string();
        assert!(e.contains("broker.amqp.url") && !e.contains("hunter2"), "{e}");
        let c = Config::from_yaml("backend: {url: 'http://a/'}\nbroker: {kind: amqp, amqp: {url: 'amqps://u:p@h/'}}")
            .expect("parses");
        c.validate().expect("amqps");
        let c = Config::from_yaml(
            "backend: {url: 'http://a/'}\nbroker: {kind: amqp, amqp: {url: 'amqp://u:p@h:5672/%2f', exchangeDurable: false}}",
        )
        .expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.broker.amqp.exchange, "hightemplar");
        assert!(!c.broker.amqp.exchange_durable);
    }

    #[test]
    fn permissions_are_checked() {
        let validate = |permissions: &str| {
            Config::from_yaml(&format!("backend: {{url: 'http://a/'}}\npermissions: {permissions}"))
                .expect("parses")
                .validate()
                .map_err(|e| e.to_string())
        };
        validate("{userPath: user.data.id, refreshSeconds: 300}").expect("valid");
        validate("{refreshSeconds: 0}").expect("off");
        let e = validate("{userPath: 'user..id'}").expect_err("empty key");
        assert!(e.contains("permissions.userPath"), "{e}");
        let e = validate("{refreshSeconds: 0.5}").expect_err("too often");
        assert!(e.contains("permissions.refreshSeconds"), "{e}");
        assert!(validate("{refreshSeconds: -1}").is_err());
        assert!(Config::from_yaml("permissions: {userpath: x}").is_err(), "unknown fields are errors");
    }

    #[test]
    fn tls_settings_go_with_tls_urls_and_certificates_with_keys() {
        let check = |yaml: &str| Config::from_yaml(yaml).expect("parses").validate().map_err(|e| e.to_string());
        check("backend: {url: 'https://a/', tls: {caFile: /ca.pem, certFile: /c.pem, keyFile: /k.pem}}")
            .expect("valid");
        let e = check("backend: {url: 'http://a/', tls: {caFile: /ca.pem}}").expect_err("http with tls");
        assert!(e.contains("backend.tls") && e.contains("https://"), "{e}");
        let e = check("backend: {url: 'https://a/', tls: {certFile: /c.pem}}").expect_err("no key");
        assert!(e.contains("backend.tls.certFile") && e.contains("keyFile"), "{e}");
        let e = check("backend: {url: 'https://a/', socket: /run/api.sock}").expect_err("https over a socket");
        assert!(e.contains("backend.socket"), "{e}");
        let amqp = |url: &str, tls: &str| {
            format!("backend: {{url: 'http://a/'}}\nbroker: {{kind: amqp, amqp: {{url: '{url}', tls: {tls}}}}}")
        };
        check(&amqp("amqps://u:hunter2@h/", "{caFile: /ca.pem, certFile: /c.pem, keyFile: /k.pem}")).expect("valid");
        let e = check(&amqp("amqp://u:hunter2@h/", "{caFile: /ca.pem}")).expect_err("amqp with tls");
        assert!(e.contains("broker.amqp.tls") && e.contains("amqps://") && !e.contains("hunter2"), "{e}");
        let e = check(&amqp("amqps://u:p@h/", "{keyFile: /k.pem}")).expect_err("no cert");
        assert!(e.contains("broker.amqp.tls.certFile"), "{e}");
        // Unset TLS settings are not written out (the operator's ConfigMap).
        let yaml = serde_yaml::to_string(&Config::default()).expect("serialises");
        assert!(!yaml.contains("tls"), "{yaml}");
    }

    #[test]
    fn backend_url_must_be_http() {
        let c = Config::from_yaml("backend: {url: 'ftp://a/'}").expect("parses");
        assert!(c.validate().expect_err("ftp").to_string().contains("backend.url"));
        let c = Config::from_yaml("backend: {url: 'not a url'}").expect("parses");
        assert!(c.validate().expect_err("garbage").to_string().contains("backend.url"));
    }
}
