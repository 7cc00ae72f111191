//! The gateway configuration a `HighTemplar` asks for: the YAML the
//! ConfigMap carries. Secrets (AMQP URL, trigger token) are not in it; the
//! Deployment passes them as environment variables from their Secrets.

use high_templar_gateway::config::{BrokerKind, Config, Listen, TlsConfig, seconds};
use high_templar_gateway::forwarding::{ForwardRule, Source, Sources};

use crate::crd::{ForwardSourceSpec, HighTemplarSpec, TlsSpec};

/// Port the gateway listens on inside the pod.
pub const GATEWAY_PORT: u16 = 8080;

/// Path of the config file inside the pod.
pub const CONFIG_PATH: &str = "/etc/high-templar/config.yaml";

/// Where the TLS Secrets are mounted inside the pod (not under the config
/// volume: nested mounts in a ConfigMap volume are fragile): `<dir>/rabbitmq/` and
/// `<dir>/backend/`, each with `ca.crt`, `tls.crt`, `tls.key` as configured.
pub const TLS_DIR: &str = "/etc/high-templar-tls";

/// The file a TLS Secret key is mounted as: `peer` is `rabbitmq` or
/// `backend`, `role` is `ca`, `cert` or `key`. Relative to [`TLS_DIR`].
pub fn tls_file(peer: &str, role: &str) -> String {
    let file = match role {
        "ca" => "ca.crt",
        "cert" => "tls.crt",
        _ => "tls.key",
    };
    format!("{peer}/{file}")
}

/// The gateway's TLS settings for `tls`: the mounted files.
fn tls_config(peer: &str, tls: Option<&TlsSpec>) -> TlsConfig {
    let path = |role| Some(format!("{TLS_DIR}/{}", tls_file(peer, role)).into());
    let Some(tls) = tls else { return TlsConfig::default() };
    let client = tls.client_cert_secret_ref.is_some();
    TlsConfig {
        ca_file: tls.ca_secret_ref.as_ref().and_then(|_| path("ca")),
        cert_file: if client { path("cert") } else { None },
        key_file: if client { path("key") } else { None },
    }
}

fn source(spec: &ForwardSourceSpec) -> Option<Source> {
    // The CRD's CEL rule guarantees exactly one field is set.
    if let Some(h) = &spec.header {
        Some(Source::Header(h.clone()))
    } else if let Some(c) = &spec.cookie {
        Some(Source::Cookie(c.clone()))
    } else if let Some(q) = &spec.query {
        Some(Source::Query(q.clone()))
    } else if let Some(v) = &spec.value {
        Some(Source::Value(v.clone()))
    } else if spec.peer_address == Some(true) {
        Some(Source::PeerAddress)
    } else {
        None
    }
}

/// The gateway configuration for `spec`.
pub fn gateway_config(spec: &HighTemplarSpec) -> Config {
    let mut c =
        Config { listen: Listen(std::net::SocketAddr::from(([0, 0, 0, 0], GATEWAY_PORT))), ..Config::default() };
    c.backend.url = Some(spec.backend.url.clone());
    c.backend.bootstrap_path = spec.backend.bootstrap_path.clone();
    c.backend.timeout_seconds = f64::from(spec.backend.timeout_seconds);
    c.backend.forward = spec
        .backend
        .forward
        .iter()
        .map(|rule| ForwardRule {
            header: rule.header.clone(),
            from: Sources::Many(rule.from.iter().filter_map(source).collect()),
            format: rule.format.clone(),
        })
        .collect();
    let admission = &spec.backend.admission;
    c.backend.admission.max_concurrent =
        usize::try_from(admission.max_concurrent).unwrap_or(c.backend.admission.max_concurrent);
    c.backend.admission.max_queued = usize::try_from(admission.max_queued).unwrap_or(c.backend.admission.max_queued);
    c.backend.admission.max_wait_seconds = admission.max_wait_seconds as f64;
    c.backend.coalesce = spec.backend.coalesce;
    c.backend.max_body_bytes = usize::try_from(spec.backend.max_body_bytes).unwrap_or(c.backend.max_body_bytes);
    c.backend.max_allowed_rooms =
        usize::try_from(spec.backend.max_allowed_rooms).unwrap_or(c.backend.max_allowed_rooms);
    c.backend.answer_reuse.seconds = f64::from(spec.backend.answer_reuse_seconds);
    c.backend.tls = tls_config("backend", spec.backend.tls.as_ref());
    let breaker = &spec.backend.circuit_breaker;
    c.backend.circuit_breaker.enabled = breaker.enabled;
    c.backend.circuit_breaker.window = usize::try_from(breaker.window).unwrap_or(c.backend.circuit_breaker.window);
    c.backend.circuit_breaker.failure_ratio = (breaker.failure_percent as f64 / 100.0).clamp(0.01, 1.0);
    c.backend.circuit_breaker.open_seconds = breaker.open_seconds as f64;
    if let Some(rabbitmq) = &spec.rabbitmq {
        c.broker.kind = BrokerKind::Amqp;
        c.broker.amqp.exchange = rabbitmq.exchange.clone();
        c.broker.amqp.exchange_durable = rabbitmq.durable;
        c.broker.amqp.tls = tls_config("rabbitmq", rabbitmq.tls.as_ref());
    }
    c.permissions.user_path = spec.permissions.user_path.clone();
    c.permissions.refresh_seconds = f64::from(spec.permissions.refresh_seconds);
    c.security.allowed_origins = spec.security.allowed_origins.clone();
    // The CRD's CEL rule admits CIDRs only.
    c.security.trusted_proxies = spec.security.trusted_proxies.iter().filter_map(|n| n.parse().ok()).collect();
    let limits = &spec.limits;
    c.limits.max_connections = usize::try_from(limits.max_connections).unwrap_or(usize::MAX);
    c.limits.max_subscriptions_per_connection =
        usize::try_from(limits.max_subscriptions_per_connection).unwrap_or(usize::MAX);
    c.limits.max_message_bytes = usize::try_from(limits.max_message_bytes).unwrap_or(usize::MAX);
    c.limits.idle_timeout_seconds = limits.idle_timeout_seconds as f64;
    c.limits.send_buffer_bytes = usize::try_from(limits.send_buffer_bytes).unwrap_or(0);
    c.limits.max_connection_bytes =
        usize::try_from(limits.max_connection_bytes).unwrap_or(c.limits.max_connection_bytes);
    c.limits.max_request_id_bytes =
        usize::try_from(limits.max_request_id_bytes).unwrap_or(c.limits.max_request_id_bytes);
    c.limits.handshake_timeout_seconds = limits.handshake_timeout_seconds as f64;
    c.trigger.max_body_bytes = usize::try_from(limits.max_trigger_body_bytes).unwrap_or(c.trigger.max_body_bytes);
    c.trigger.max_rooms = usize::try_from(limits.max_trigger_rooms).unwrap_or(c.trigger.max_rooms);
    c.trigger.body_timeout_seconds = limits.trigger_body_timeout_seconds as f64;
    c.limits.max_pending_connections =
        usize::try_from(limits.max_pending_connections).unwrap_or(c.limits.max_pending_connections);
    c.shutdown.drain_delay_seconds = f64::from(spec.shutdown.drain_delay_seconds);
    c.shutdown.close_window_seconds = f64::from(spec.shutdown.close_window_seconds);
    c
}

/// The ConfigMap's `config.yaml`.
pub fn gateway_config_yaml(spec: &HighTemplarSpec) -> String {
    // Serialising plain data structures to YAML cannot fail.
    serde_yaml::to_string(&gateway_config(spec)).unwrap_or_default()
}

/// Seconds a gateway pod needs to shut down: drain delay, close window,
/// and margin for the last close frames.
pub fn termination_grace_seconds(spec: &HighTemplarSpec) -> i64 {
    let window =
        seconds(f64::from(spec.shutdown.drain_delay_seconds)) + seconds(f64::from(spec.shutdown.close_window_seconds));
    (window.as_secs() as i64 + 10).max(30)
}
