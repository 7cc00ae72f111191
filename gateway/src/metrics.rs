//! Prometheus metrics of the gateway (DESIGN.md §4), served at `/metrics`
//! in the text exposition format. All names start with `hightemplar_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A single `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why (a short snake_case word).
    pub reason: &'static str,
}

/// A single `source` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerSource {
    /// `http` or `amqp`.
    pub source: &'static str,
}

/// A single `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// Result of a backend bootstrap call.
    pub outcome: &'static str,
}

/// A single `action` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    /// A control message's action (`refresh`, `disconnect`).
    pub action: &'static str,
}

/// Labels of a TLS failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsFailureLabels {
    /// `broker` or `backend`.
    pub peer: &'static str,
    /// `tls::TlsFailure::reason`: `unknown_ca`, `hostname_mismatch`, ...
    pub reason: &'static str,
}

/// `auth_total{outcome}`: `authorized` and every `BootstrapError::outcome`.
pub const AUTH_OUTCOMES: &[&str] = &["authorized", "denied", "invalid_body", "unavailable", "circuit_open", "busy"];
/// `permission_refreshes_total{outcome}`.
pub const REFRESH_OUTCOMES: &[&str] = &["unchanged", "revoked", "denied", "failed"];
/// `connections_refused_total{reason}`: the upgrade's refusals
/// (`http::websocket`) and admission's (`admission::Refused::reason`).
pub const REFUSAL_REASONS: &[&str] =
    &["origin", "draining", "max_connections", "admission_queue_full", "admission_timeout"];
/// `disconnects_total{reason}` of the closes operators watch: slow
/// consumers, memory budget, revoked permissions, idle clients.
pub const DISCONNECT_REASONS: &[&str] = &["slow_consumer", "over_budget", "permission_revoked", "idle"];

/// Every metric of one gateway process.
pub struct Metrics {
    /// The registry the families below are registered in.
    registry: Registry,
    /// Websocket connections open now (authenticated or not yet).
    pub connections_open: Gauge,
    /// Websocket connections accepted since start.
    pub connections: Counter,
    /// Websockets this process accepts at most: `limits.maxConnections`,
    /// or less when the open-file limit leaves room for fewer.
    pub connections_limit: Gauge,
    /// TCP connections not yet upgraded to a websocket, open now.
    pub http_connections_pending: Gauge,
    /// Connections not yet upgraded served at most at once.
    pub http_connections_limit: Gauge,
    /// Connections closed before any upgrade by the listener, by reason
    /// (`pending_limit`, `header_timeout`, `write_stalled`).
    pub http_connections_closed: Family<Reason, Counter>,
    /// Accept errors other than the peer's (usually out of descriptors).
    pub accept_errors: Counter,
    /// Bootstrap calls in flight now (at most `backend.admission.maxConcurrent`).
    pub bootstrap_in_flight: Gauge,
    /// Upgrades waiting for a bootstrap slot now.
    pub bootstrap_queued: Gauge,
    /// Bootstraps answered by another connection's identical call.
    pub bootstrap_coalesced: Counter,
    /// Connects answered with a kept answer (`backend.answerReuse`).
    pub bootstrap_reused: Counter,
    /// Answers kept now (`backend.answerReuse`).
    pub answers_kept: Gauge,
    /// Connections refused before the upgrade, by reason.
    pub connections_refused: Family<Reason, Counter>,
    /// Bootstrap outcomes (`authorized`, `denied`, `invalid_body`, `unavailable`).
    pub auth: Family<Outcome, Counter>,
    /// Subscriptions held now.
    pub subscriptions_active: Gauge,
    /// Distinct rooms with at least one subscription now.
    pub rooms_active: Gauge,
    /// Wildcard projections the index holds (bounded per room shape).
    pub index_projections: Gauge,
    /// Triggers received, by source.
    pub triggers: Family<TriggerSource, Counter>,
    /// Triggers refused, by reason.
    pub triggers_rejected: Family<Reason, Counter>,
    /// Publish frames queued to a connection.
    pub messages_delivered: Counter,
    /// Of those, written to the socket by the fan-out itself.
    pub messages_written_through: Counter,
    /// Publish frames not delivered, by reason.
    pub messages_dropped: Family<Reason, Counter>,
    /// Connections closed by the gateway, by reason (`slow_consumer`, `idle`, …).
    pub disconnects: Family<Reason, Counter>,
    /// Control messages received (either source), by action.
    pub controls: Family<ActionLabel, Counter>,
    /// Permission refreshes of a connection, by outcome (`unchanged`,
    /// `revoked`, `denied`, `failed`).
    pub permission_refreshes: Family<Outcome, Counter>,
    /// Subscriptions dropped because a refresh no longer permits them.
    pub subscriptions_revoked: Counter,
    /// The backend circuit breaker: 0 closed, 1 open, 2 half-open.
    pub backend_circuit_state: Gauge,
    /// Times the backend circuit breaker opened.
    pub backend_circuit_opened: Counter,
    /// Duration of the backend bootstrap call, seconds.
    pub backend_latency: Histogram,
    /// Duration of one trigger's fan-out (index lookup and queueing), seconds.
    pub fanout_latency: Histogram,
    /// 1 when triggers come from RabbitMQ (`broker: amqp`), so an alert on
    /// `amqp_connected` leaves memory-broker gateways alone.
    pub amqp_configured: Gauge,
    /// 1 while consuming from RabbitMQ (amqp broker only).
    pub amqp_connected: Gauge,
    /// Reconnection attempts to RabbitMQ.
    pub amqp_reconnects: Counter,
    /// Connections to the broker or the backend that failed in TLS, by reason.
    pub tls_failures: Family<TlsFailureLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every family registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hightemplar");
        let m = Metrics {
            connections_open: Gauge::default(),
            connections: Counter::default(),
            connections_limit: Gauge::default(),
            connections_refused: Family::default(),
            http_connections_pending: Gauge::default(),
            bootstrap_in_flight: Gauge::default(),
            bootstrap_queued: Gauge::default(),
            bootstrap_coalesced: Counter::default(),
            bootstrap_reused: Counter::default(),
            answers_kept: Gauge::default(),
            http_connections_limit: Gauge::default(),
            http_connections_closed: Family::default(),
            accept_errors: Counter::default(),
            auth: Family::default(),
            subscriptions_active: Gauge::default(),
            rooms_active: Gauge::default(),
            index_projections: Gauge::default(),
            triggers: Family::default(),
            triggers_rejected: Family::default(),
            messages_delivered: Counter::default(),
            messages_written_through: Counter::default(),
            messages_dropped: Family::default(),
            disconnects: Family::default(),
            controls: Family::default(),
            permission_refreshes: Family::default(),
            subscriptions_revoked: Counter::default(),
            backend_circuit_state: Gauge::default(),
            backend_circuit_opened: Counter::default(),
            // 1 ms .. ~16 s
            backend_latency: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // 10 µs .. ~0.3 s
            fanout_latency: Histogram::new(exponential_buckets(0.00001, 2.0, 15)),
            amqp_configured: Gauge::default(),
            amqp_connected: Gauge::default(),
            amqp_reconnects: Counter::default(),
            tls_failures: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("connections_open", "Websocket connections open now", m.connections_open.clone());
        r.register("connections", "Websocket connections accepted", m.connections.clone());
        r.register(
            "connections_limit",
            "Websockets accepted at most (limits.maxConnections, lowered to fit the open-file limit)",
            m.connections_limit.clone(),
        );
        r.register(
            "connections_refused",
            "Upgrade requests refused before the websocket opened",
            m.connections_refused.clone(),
        );
        r.register(
            "http_connections_pending",
            "TCP connections not yet upgraded to a websocket",
            m.http_connections_pending.clone(),
        );
        r.register(
            "http_connections_limit",
            "TCP connections not yet upgraded served at most (limits.maxPendingConnections)",
            m.http_connections_limit.clone(),
        );
        r.register(
            "http_connections_closed",
            "Connections closed before an upgrade by the listener (pending_limit, header_timeout, write_stalled)",
            m.http_connections_closed.clone(),
        );
        r.register("accept_errors", "Failed accepts (usually out of file descriptors)", m.accept_errors.clone());
        r.register("bootstrap_in_flight", "Bootstrap calls in flight", m.bootstrap_in_flight.clone());
        r.register("bootstrap_queued", "Upgrades waiting for a bootstrap slot", m.bootstrap_queued.clone());
        r.register(
            "bootstrap_coalesced",
            "Bootstraps answered by a concurrent identical call",
            m.bootstrap_coalesced.clone(),
        );
        r.register(
            "bootstrap_reused",
            "Connects answered with a kept answer to an identical request (backend.answerReuse)",
            m.bootstrap_reused.clone(),
        );
        r.register("bootstrap_answers_kept", "Bootstrap answers kept for reuse now", m.answers_kept.clone());
        r.register("auth", "Backend bootstrap outcomes", m.auth.clone());
        r.register("subscriptions_active", "Subscriptions held now", m.subscriptions_active.clone());
        r.register("rooms_active", "Distinct subscribed rooms now", m.rooms_active.clone());
        r.register(
            "index_projections",
            "Wildcard projections held by the subscription index (at most 8 per room shape and wildcard mask)",
            m.index_projections.clone(),
        );
        r.register("triggers", "Triggers received", m.triggers.clone());
        r.register("triggers_rejected", "Triggers refused as malformed or unauthorised", m.triggers_rejected.clone());
        r.register("messages_delivered", "Publish frames queued to clients", m.messages_delivered.clone());
        r.register(
            "messages_written_through",
            "Publish frames the fan-out wrote to an idle socket itself (part of messages_delivered)",
            m.messages_written_through.clone(),
        );
        r.register("messages_dropped", "Publish frames not delivered", m.messages_dropped.clone());
        r.register("disconnects", "Connections closed by the gateway", m.disconnects.clone());
        r.register("controls", "Control messages received, by action", m.controls.clone());
        r.register(
            "permission_refreshes",
            "Bootstrap re-runs of live connections, by outcome (unchanged, revoked, denied, failed)",
            m.permission_refreshes.clone(),
        );
        r.register(
            "subscriptions_revoked",
            "Subscriptions dropped because a refresh no longer permits them",
            m.subscriptions_revoked.clone(),
        );
        r.register(
            "backend_circuit_state",
            "Backend circuit breaker: 0 closed, 1 open, 2 half-open",
            m.backend_circuit_state.clone(),
        );
        r.register(
            "backend_circuit_opened",
            "Times the backend circuit breaker opened",
            m.backend_circuit_opened.clone(),
        );
        r.register(
            "backend_request_duration_seconds",
            "Duration of the bootstrap call to the backend",
            m.backend_latency.clone(),
        );
        r.register(
            "fanout_duration_seconds",
            "Duration of one trigger's fan-out to the connection queues",
            m.fanout_latency.clone(),
        );
        r.register("amqp_configured", "1 when triggers come from RabbitMQ (broker: amqp)", m.amqp_configured.clone());
        r.register("amqp_connected", "1 while consuming triggers from RabbitMQ", m.amqp_connected.clone());
        r.register("amqp_reconnects", "Reconnection attempts to RabbitMQ", m.amqp_reconnects.clone());
        r.register(
            "tls_failures",
            "Connections to the broker or the backend that failed in TLS (unknown CA, hostname mismatch, ...)",
            m.tls_failures.clone(),
        );
        let m = Metrics { registry, ..m };
        m.preset();
        m
    }

    /// Creates, at zero, the labelled series that dashboards and alerts
    /// select on. A series that first appears at 1 hides that first event
    /// from `rate()` and `increase()`, and a query over a family with no
    /// series returns nothing rather than 0, so an alert on a rare event
    /// (a slow consumer, a failing backend) would miss its first burst.
    fn preset(&self) {
        let reasons = |family: &Family<Reason, Counter>, reasons: &[&'static str]| {
            for &reason in reasons {
                let _ = family.get_or_create(&Reason { reason });
            }
        };
        for &outcome in AUTH_OUTCOMES {
            let _ = self.auth.get_or_create(&Outcome { outcome });
        }
        for &outcome in REFRESH_OUTCOMES {
            let _ = self.permission_refreshes.get_or_create(&Outcome { outcome });
        }
        for source in ["http", "amqp"] {
            let _ = self.triggers.get_or_create(&TriggerSource { source });
        }
        for action in ["refresh", "disconnect"] {
            let _ = self.controls.get_or_create(&ActionLabel { action });
        }
        reasons(&self.connections_refused, REFUSAL_REASONS);
        reasons(&self.http_connections_closed, &["pending_limit", "header_timeout", "write_stalled"]);
        reasons(&self.triggers_rejected, &["unauthorized", "too_large", "not_json", "invalid_room"]);
        reasons(&self.messages_dropped, &["slow_consumer"]);
        reasons(&self.disconnects, DISCONNECT_REASONS);
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerted_series_exist_at_zero_before_any_event() {
        let page = Metrics::new().encode();
        for line in [
            r#"hightemplar_disconnects_total{reason="slow_consumer"} 0"#,
            r#"hightemplar_messages_dropped_total{reason="slow_consumer"} 0"#,
            r#"hightemplar_auth_total{outcome="unavailable"} 0"#,
            r#"hightemplar_connections_refused_total{reason="admission_queue_full"} 0"#,
            r#"hightemplar_triggers_total{source="amqp"} 0"#,
            "hightemplar_amqp_configured 0",
        ] {
            assert!(page.lines().any(|l| l == line), "missing {line:?} in\n{page}");
        }
    }
}
