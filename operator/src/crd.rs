//! The `HighTemplar` custom resource (`hightemplar.io/v1alpha1`,
//! DESIGN.md §5): spec, status, defaults and validation rules. The CRD YAML
//! under `crds/` is generated from these types (`high-templar-operator crd`).

// Several `printcolumn(...)` share keys like `type_`; clippy reads them as
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A websocket gateway tier in front of an existing HTTP API.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hightemplar.io",
    version = "v1alpha1",
    kind = "HighTemplar",
    plural = "hightemplars",
    shortname = "ht",
    namespaced,
    status = "HighTemplarStatus",
    derive = "PartialEq",
    doc = "A high-templar websocket gateway: Deployment, Service, PDB, HPA and RabbitMQ exchange, reconciled by the high-templar operator.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the gateway serves clients"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "string",
        json_path = ".status.replicaSummary",
        description = "Ready replicas / desired replicas"
    ),
    printcolumn(
        name = "Connections",
        type_ = "integer",
        json_path = ".status.connections",
        description = "Websocket connections open over the ready pods (read from their /metrics)"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        description = "In-cluster websocket URL"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new(
    "has(self.rabbitmq) || (self.replicas <= 1 && !(has(self.autoscaling) && (self.autoscaling.enabled || has(self.autoscaling.targetConnectionsPerPod))))"
).message("spec.rabbitmq is required when replicas > 1 or autoscaling is on: without RabbitMQ each replica only delivers the triggers sent to it"))]
#[serde(rename_all = "camelCase")]
pub struct HighTemplarSpec {
    /// Gateway pods. Ignored while autoscaling is on (`autoscaling.enabled`
    /// or `autoscaling.targetConnectionsPerPod`).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Gateway image; default: the operator's `--gateway-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image pull policy of the gateway container (Always, IfNotPresent, Never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in ['Always', 'IfNotPresent', 'Never']").message("imagePullPolicy must be Always, IfNotPresent or Never"))]
    pub image_pull_policy: Option<String>,
    /// The existing API that authenticates users.
    pub backend: BackendSpec,
    /// RabbitMQ, required for more than one replica. Without it the gateway
    /// uses its embedded broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<RabbitmqSpec>,
    /// `POST /trigger`; disabled when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<TriggerSpec>,
    /// Per-pod limits.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// SIGTERM behaviour of the gateway pods.
    #[serde(default)]
    pub shutdown: ShutdownSpec,
    /// Who may connect.
    #[serde(default)]
    pub security: SecuritySpec,
    /// Live permissions: the user identity control messages name, and the
    /// periodic refresh.
    #[serde(default)]
    pub permissions: PermissionsSpec,
    /// The Service in front of the pods.
    #[serde(default)]
    pub service: ServiceSpec,
    /// HorizontalPodAutoscaler on CPU.
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,
    /// PodDisruptionBudget, created when more than one replica may run.
    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudgetSpec,
    /// Container resources; default: requests 100m CPU / 128Mi, limit 512Mi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector of the gateway pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the gateway pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Affinity of the gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Extra annotations of the gateway pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
}

fn default_replicas() -> i32 {
    2
}

/// The backend's bootstrap endpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.tls) || self.url.startsWith('https://')").message("backend.tls needs an https:// backend.url"))]
#[serde(rename_all = "camelCase")]
pub struct BackendSpec {
    /// Base URL of the API, e.g. `http://api.default.svc:8000/api/` or
    /// `https://api.example.com/api/`.
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("backend.url must be an http:// or https:// URL"))]
    pub url: String,
    /// TLS to an `https://` backend: the CA to trust (default: the CAs of
    /// the gateway image) and an optional client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Path of the bootstrap call, relative to `url`.
    #[serde(default = "default_bootstrap_path")]
    #[x_kube(validation = Rule::new("!self.startsWith('/')").message("backend.bootstrapPath is relative to backend.url: no leading '/'"))]
    pub bootstrap_path: String,
    /// Timeout of the bootstrap call.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 300))]
    pub timeout_seconds: i32,
    /// Extra request data to forward to the backend (added to the 3.x set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub forward: Vec<ForwardRuleSpec>,
    /// Bootstrap calls in flight at once per pod, and how long upgrades
    /// wait for one (a reconnect storm reaches the API at this pace).
    #[serde(default)]
    pub admission: AdmissionSpec,
    /// When to stop calling a failing backend (new connections then get
    /// 1013 at once).
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerSpec,
    /// Concurrent connects sending the identical request to the backend
    /// (same credentials: one user's tabs) share one bootstrap call.
    #[serde(default = "default_coalesce")]
    pub coalesce: bool,
    /// Keep a successful answer this long for connects sending the
    /// identical request (a reconnect storm of users who just connected
    /// costs the backend nothing); 0 (default): not kept. Control messages
    /// drop kept answers.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub answer_reuse_seconds: i32,
    /// Largest bootstrap answer read, bytes; past it the answer is not read
    /// further and the user is refused (4401).
    #[serde(default = "default_backend_max_body_bytes")]
    #[schemars(range(min = 1024))]
    pub max_body_bytes: i64,
    /// Most allowed rooms one bootstrap answer may give a connection;
    /// more refuses the user.
    #[serde(default = "default_max_allowed_rooms")]
    #[schemars(range(min = 1))]
    pub max_allowed_rooms: i64,
}

fn default_coalesce() -> bool {
    gateway_defaults().backend.coalesce
}
fn default_backend_max_body_bytes() -> i64 {
    gateway_defaults().backend.max_body_bytes as i64
}
fn default_max_allowed_rooms() -> i64 {
    gateway_defaults().backend.max_allowed_rooms as i64
}

/// The backend circuit breaker, per gateway pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// Off: every connect calls the backend.
    #[serde(default = "default_breaker_enabled")]
    pub enabled: bool,
    /// Recent calls considered.
    #[serde(default = "default_breaker_window")]
    #[schemars(range(min = 1, max = 10000))]
    pub window: i64,
    /// Failed percentage of the window (5xx, 429, timeouts, unreachable)
    /// that opens the circuit.
    #[serde(default = "default_breaker_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_percent: i64,
    /// Seconds open (±20 % jitter) before one probe call.
    #[serde(default = "default_breaker_open")]
    #[schemars(range(min = 1, max = 300))]
    pub open_seconds: i64,
}

fn default_breaker_enabled() -> bool {
    gateway_defaults().backend.circuit_breaker.enabled
}
fn default_breaker_window() -> i64 {
    gateway_defaults().backend.circuit_breaker.window as i64
}
fn default_breaker_percent() -> i64 {
    (gateway_defaults().backend.circuit_breaker.failure_ratio * 100.0).round() as i64
}
fn default_breaker_open() -> i64 {
    gateway_defaults().backend.circuit_breaker.open_seconds as i64
}

impl Default for CircuitBreakerSpec {
    fn default() -> Self {
        CircuitBreakerSpec {
            enabled: default_breaker_enabled(),
            window: default_breaker_window(),
            failure_percent: default_breaker_percent(),
            open_seconds: default_breaker_open(),
        }
    }
}

/// Admission of bootstrap calls, per gateway pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionSpec {
    /// Bootstrap calls in flight at once.
    #[serde(default = "default_admission_concurrent")]
    #[schemars(range(min = 1))]
    pub max_concurrent: i64,
    /// Upgrades waiting for a call slot; past it, 503 with Retry-After.
    #[serde(default = "default_admission_queued")]
    #[schemars(range(min = 0))]
    pub max_queued: i64,
    /// Longest wait for a slot, seconds; then 503 with Retry-After.
    #[serde(default = "default_admission_wait")]
    #[schemars(range(min = 0, max = 300))]
    pub max_wait_seconds: i64,
}

fn default_admission_concurrent() -> i64 {
    gateway_defaults().backend.admission.max_concurrent as i64
}
fn default_admission_queued() -> i64 {
    gateway_defaults().backend.admission.max_queued as i64
}
fn default_admission_wait() -> i64 {
    gateway_defaults().backend.admission.max_wait_seconds as i64
}

impl Default for AdmissionSpec {
    fn default() -> Self {
        AdmissionSpec {
            max_concurrent: default_admission_concurrent(),
            max_queued: default_admission_queued(),
            max_wait_seconds: default_admission_wait(),
        }
    }
}

// Defaults come from the gateway's own configuration, so the CRD and the
// gateway cannot disagree on them.
fn gateway_defaults() -> high_templar_gateway::config::Config {
    high_templar_gateway::config::Config::default()
}

fn default_bootstrap_path() -> String {
    gateway_defaults().backend.bootstrap_path
}

fn default_timeout() -> i32 {
    gateway_defaults().backend.timeout_seconds as i32
}

/// Forward one header to the backend.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ForwardRuleSpec {
    /// Header name sent to the backend (not `Host`).
    #[x_kube(validation = Rule::new("self.lowerAscii() != 'host'").message("the Host header is never forwarded"))]
    #[schemars(length(min = 1, max = 128))]
    pub header: String,
    /// Sources, the first present wins.
    #[schemars(length(min = 1, max = 4))]
    pub from: Vec<ForwardSourceSpec>,
    /// Template; `{}` is the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub format: Option<String>,
}

/// Exactly one of the fields.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new(
    "[has(self.header), has(self.cookie), has(self.query), has(self.value), has(self.peerAddress) && self.peerAddress].filter(x, x).size() == 1"
).message("set exactly one of header, cookie, query, value, peerAddress"))]
#[serde(rename_all = "camelCase")]
pub struct ForwardSourceSpec {
    /// A header of the client's upgrade request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub header: Option<String>,
    /// A cookie of the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub cookie: Option<String>,
    /// A query parameter of the websocket URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub query: Option<String>,
    /// A fixed value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub value: Option<String>,
    /// The client's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_address: Option<bool>,
}

/// A key of a Secret in the HighTemplar's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// A Secret in the HighTemplar's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretRef {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// TLS to a server (`amqps://` broker, `https://` backend). The server's
/// certificate and host name are always verified.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Secret key holding the PEM CA certificates that sign the server's
    /// certificate, trusted instead of the system's CAs (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`): the client
    /// certificate presented to the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretRef>,
}

impl TlsSpec {
    /// The Secret keys it references: (role, reference), role `ca`, `cert`
    /// or `key`.
    pub fn references(&self) -> Vec<(&'static str, SecretKeyRef)> {
        let mut refs = Vec::new();
        if let Some(ca) = &self.ca_secret_ref {
            refs.push(("ca", ca.clone()));
        }
        if let Some(client) = &self.client_cert_secret_ref {
            refs.push(("cert", SecretKeyRef { name: client.name.clone(), key: "tls.crt".into() }));
            refs.push(("key", SecretKeyRef { name: client.name.clone(), key: "tls.key".into() }));
        }
        refs
    }
}

/// What happens to the exchange when the HighTemplar is deleted.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    /// Leave the exchange (other gateways or publishers may use it).
    #[default]
    Retain,
    /// Delete the exchange with the HighTemplar.
    Delete,
}

/// RabbitMQ connection and topology.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RabbitmqSpec {
    /// Secret key holding `amqp://user:pass@host:5672/vhost` (or
    /// `amqps://user:pass@host:5671/vhost`).
    pub url_secret_ref: SecretKeyRef,
    /// TLS to an `amqps://` broker: the CA to trust (default: the CAs of the
    /// gateway and operator images) and an optional client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Exchange triggers are published to (3.x: `hightemplar`).
    #[serde(default = "default_exchange")]
    #[schemars(length(min = 1, max = 255))]
    pub exchange: String,
    /// Declare the exchange durable.
    #[serde(default = "default_durable")]
    pub durable: bool,
    /// `Retain` (default) or `Delete` the exchange with this resource.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn default_exchange() -> String {
    gateway_defaults().broker.amqp.exchange
}

fn default_durable() -> bool {
    gateway_defaults().broker.amqp.exchange_durable
}

/// `POST /trigger`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TriggerSpec {
    /// Secret key holding the bearer token.
    pub token_secret_ref: SecretKeyRef,
}

/// Per-pod limits of the gateway.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Websocket connections per pod.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1))]
    pub max_connections: i64,
    /// Subscriptions per connection.
    #[serde(default = "default_max_subscriptions")]
    #[schemars(range(min = 1))]
    pub max_subscriptions_per_connection: i64,
    /// Largest client message, bytes.
    #[serde(default = "default_max_message_bytes")]
    #[schemars(range(min = 16))]
    pub max_message_bytes: i64,
    /// Idle timeout of a connection, seconds.
    #[serde(default = "default_idle_timeout")]
    #[schemars(range(min = 1))]
    pub idle_timeout_seconds: i64,
    /// Kernel send buffer per connection (SO_SNDBUF), bytes; 0 leaves it
    /// to the kernel's autotuning. Caps what a client that stops reading holds.
    #[serde(default = "default_send_buffer_bytes")]
    #[schemars(range(min = 0))]
    pub send_buffer_bytes: i64,
    /// Memory one connection's allowed rooms and subscriptions may hold,
    /// bytes, roughly; past it subscribes get `too-many-subscriptions`.
    #[serde(default = "default_max_connection_bytes")]
    #[schemars(range(min = 1))]
    pub max_connection_bytes: i64,
    /// Longest client `requestId` as JSON text, bytes; longer ones are
    /// answered `invalid-request-id` and not kept.
    #[serde(default = "default_max_request_id_bytes")]
    #[schemars(range(min = 2, max = 65536))]
    pub max_request_id_bytes: i64,
    /// Before the websocket upgrade: seconds a connection has to send each
    /// request's headers (so silent and idle connections close), and to
    /// read a response.
    #[serde(default = "default_handshake_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub handshake_timeout_seconds: i64,
    /// Connections not yet upgraded (handshakes, triggers, probes) served
    /// at once per pod; past it, 503 at once.
    #[serde(default = "default_max_pending_connections")]
    #[schemars(range(min = 1))]
    pub max_pending_connections: i64,
    /// Largest trigger body, bytes, from RabbitMQ and `POST /trigger`
    /// alike (every replica parses every AMQP trigger); larger ones are
    /// dropped (AMQP) or answered 413.
    #[serde(default = "default_max_trigger_body_bytes")]
    #[schemars(range(min = 64))]
    pub max_trigger_body_bytes: i64,
    /// Most rooms in one trigger, both sources; more is refused.
    #[serde(default = "default_max_trigger_rooms")]
    #[schemars(range(min = 1))]
    pub max_trigger_rooms: i64,
    /// Seconds a `POST /trigger` has to send its whole body; slower ones
    /// are answered 408.
    #[serde(default = "default_trigger_body_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub trigger_body_timeout_seconds: i64,
    /// `Saturated` turns true when a ready pod holds at least this
    /// percentage of its connection limit (`maxConnections`, or less when
    /// the pod's open-file limit is lower).
    #[serde(default = "default_saturated_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub saturated_percent: i64,
}

fn default_saturated_percent() -> i64 {
    90
}
fn default_max_trigger_body_bytes() -> i64 {
    gateway_defaults().trigger.max_body_bytes as i64
}
fn default_max_trigger_rooms() -> i64 {
    gateway_defaults().trigger.max_rooms as i64
}
fn default_trigger_body_timeout() -> i64 {
    gateway_defaults().trigger.body_timeout_seconds as i64
}

fn default_max_connections() -> i64 {
    gateway_defaults().limits.max_connections as i64
}
fn default_max_subscriptions() -> i64 {
    gateway_defaults().limits.max_subscriptions_per_connection as i64
}
fn default_max_message_bytes() -> i64 {
    gateway_defaults().limits.max_message_bytes as i64
}
fn default_idle_timeout() -> i64 {
    gateway_defaults().limits.idle_timeout_seconds as i64
}
fn default_send_buffer_bytes() -> i64 {
    gateway_defaults().limits.send_buffer_bytes as i64
}
fn default_max_connection_bytes() -> i64 {
    gateway_defaults().limits.max_connection_bytes as i64
}
fn default_max_request_id_bytes() -> i64 {
    gateway_defaults().limits.max_request_id_bytes as i64
}

fn default_handshake_timeout() -> i64 {
    gateway_defaults().limits.handshake_timeout_seconds as i64
}
fn default_max_pending_connections() -> i64 {
    gateway_defaults().limits.max_pending_connections as i64
}

impl Default for LimitsSpec {
    fn default() -> Self {
        LimitsSpec {
            max_connections: default_max_connections(),
            max_subscriptions_per_connection: default_max_subscriptions(),
            max_message_bytes: default_max_message_bytes(),
            idle_timeout_seconds: default_idle_timeout(),
            send_buffer_bytes: default_send_buffer_bytes(),
            max_request_id_bytes: default_max_request_id_bytes(),
            max_connection_bytes: default_max_connection_bytes(),
            max_trigger_body_bytes: default_max_trigger_body_bytes(),
            max_trigger_rooms: default_max_trigger_rooms(),
            trigger_body_timeout_seconds: default_trigger_body_timeout(),
            saturated_percent: default_saturated_percent(),
            handshake_timeout_seconds: default_handshake_timeout(),
            max_pending_connections: default_max_pending_connections(),
        }
    }
}

/// Who may connect to the gateway pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecuritySpec {
    /// Browser origins allowed to connect besides the gateway's own host
    /// (same-origin): exact origins (`https://app.example.com`),
    /// `https://*.example.com` patterns, or `"*"` for any. Clients that send
    /// no Origin (not browsers) always may. A 3.x deployment whose page is
    /// served from another host than the websocket must list that host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(max = 255)))]
    #[x_kube(validation = Rule::new(r"self.all(o, o == '*' || o.matches('^[A-Za-z][A-Za-z0-9+.-]*://([*][.])?[^/*@?# ]+/?$'))").message("allowedOrigins entries are scheme://host[:port] (e.g. https://app.example.com, https://*.example.com) or \"*\""))]
    pub allowed_origins: Vec<String>,
    /// Networks (CIDRs) of the proxies in front of the gateway, e.g. the
    /// ingress controller's pods, whose `X-Real-IP` / `X-Forwarded-For` are
    /// believed; for anyone else the TCP peer is the client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("trustedProxies entries are CIDRs, e.g. 10.0.0.0/8 or fd00::/8"))]
    pub trusted_proxies: Vec<String>,
}

/// Live permissions (docs/protocol.md "Control messages").
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PermissionsSpec {
    /// Where the user identity is in the bootstrap answer: object keys
    /// joined by `.`, e.g. `user.id` (3.x Django settings: `user.data.id`).
    /// Unset: control messages name connections by `subscribed` room only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new(r"self.matches('^[^.]+([.][^.]+)*$')").message("userPath is object keys joined by '.', e.g. user.id"))]
    pub user_path: Option<String>,
    /// Re-run bootstrap for every connection about this often (±20 %,
    /// through admission) and drop subscriptions no longer permitted;
    /// 0 (default): only when a `refresh` control message asks.
    #[serde(default)]
    #[schemars(range(min = 0, max = 86400))]
    #[x_kube(validation = Rule::new("self == 0 || self >= 10").message("refreshSeconds is 0 (off) or at least 10"))]
    pub refresh_seconds: i32,
}

/// Graceful shutdown of the gateway pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ShutdownSpec {
    /// Readiness 503 → first websocket close, seconds.
    #[serde(default = "default_drain_delay")]
    #[schemars(range(min = 0, max = 600))]
    pub drain_delay_seconds: i32,
    /// Websockets are closed over this window, seconds.
    #[serde(default = "default_close_window")]
    #[schemars(range(min = 0, max = 600))]
    pub close_window_seconds: i32,
}

fn default_drain_delay() -> i32 {
    gateway_defaults().shutdown.drain_delay_seconds as i32
}
fn default_close_window() -> i32 {
    gateway_defaults().shutdown.close_window_seconds as i32
}

impl Default for ShutdownSpec {
    fn default() -> Self {
        ShutdownSpec { drain_delay_seconds: default_drain_delay(), close_window_seconds: default_close_window() }
    }
}

/// Service type.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServiceType {
    /// In-cluster only (put an Ingress in front).
    #[default]
    ClusterIP,
    /// A port on every node.
    NodePort,
    /// A cloud load balancer.
    LoadBalancer,
}

/// The Service in front of the gateway pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Service port (the pods listen on 8080).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Annotations of the Service (load balancer settings and the like).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn default_port() -> i32 {
    80
}

impl Default for ServiceSpec {
    fn default() -> Self {
        ServiceSpec { type_: ServiceType::default(), port: default_port(), annotations: BTreeMap::new() }
    }
}

/// Autoscaling, one of two kinds: on CPU through a HorizontalPodAutoscaler
/// (`enabled`), or on connections per pod by the operator itself
/// (`targetConnectionsPerPod`, from the fleet scrape: no metrics adapter
/// needed). Either way the autoscaler owns the Deployment's `replicas`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas"))]
#[x_kube(validation = Rule::new("!(self.enabled && has(self.targetConnectionsPerPod))").message("autoscaling.enabled (CPU HPA) and autoscaling.targetConnectionsPerPod exclude each other: two autoscalers would fight over the replicas"))]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Create a HorizontalPodAutoscaler on CPU (then `replicas` is the HPA's to set).
    #[serde(default)]
    pub enabled: bool,
    /// Fewest replicas.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most replicas.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU utilisation target, percent of requests (with `enabled`).
    #[serde(default = "default_cpu_target", rename = "targetCPUUtilizationPercentage")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percentage: i32,
    /// Scale on connections: the operator keeps
    /// `ceil(connections / targetConnectionsPerPod)` replicas within
    /// `[minReplicas, maxReplicas]`. Unset: no connection autoscaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub target_connections_per_pod: Option<i64>,
    /// With `targetConnectionsPerPod`: how long a lower recommendation must
    /// hold before pods are removed (the highest recommendation of this
    /// window wins, so a dip between reconnect waves removes nothing).
    #[serde(default = "default_scale_down_stabilization")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
    /// With `targetConnectionsPerPod`: most pods added or removed at once
    /// (one decision per fleet period).
    #[serde(default = "default_max_step")]
    #[schemars(range(min = 1, max = 100))]
    pub max_step: i32,
}

fn default_min_replicas() -> i32 {
    2
}
fn default_max_replicas() -> i32 {
    10
}
fn default_cpu_target() -> i32 {
    70
}
fn default_scale_down_stabilization() -> i32 {
    300
}
fn default_max_step() -> i32 {
    4
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        AutoscalingSpec {
            enabled: false,
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            target_cpu_utilization_percentage: default_cpu_target(),
            target_connections_per_pod: None,
            scale_down_stabilization_seconds: default_scale_down_stabilization(),
            max_step: default_max_step(),
        }
    }
}

impl AutoscalingSpec {
    /// Whether an autoscaler (the CPU HPA or the operator on connections)
    /// owns the replicas.
    pub fn is_on(&self) -> bool {
        self.enabled || self.target_connections_per_pod.is_some()
    }
}

/// PodDisruptionBudget settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// Pods that may be unavailable during voluntary disruptions (number or percentage).
    #[serde(default = "default_max_unavailable")]
    pub max_unavailable: IntOrString,
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(1)
}

impl Default for PodDisruptionBudgetSpec {
    fn default() -> Self {
        PodDisruptionBudgetSpec { max_unavailable: default_max_unavailable() }
    }
}

/// Observed state, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HighTemplarStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Gateway pods (from the Deployment).
    #[serde(default)]
    pub replicas: i32,
    /// Gateway pods ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// `ready/desired`, for `kubectl get ht`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_summary: Option<String>,
    /// In-cluster websocket URL: `ws://<service>.<namespace>.svc:<port>/ws/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Label selector of the pods (scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Websocket connections open over the ready pods, from their
    /// `/metrics` (the fleet scrape, every few seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<i64>,
    /// Subscriptions held over the ready pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriptions: Option<i64>,
    /// Ready pods consuming triggers from RabbitMQ now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<i64>,
    /// The most connections one pod holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pod_connections: Option<i64>,
    /// Connections closed as slow consumers, summed over the ready pods
    /// since each started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_consumer_closes: Option<i64>,
    /// Ready pods whose `/metrics` was read in the last scrape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scraped_pods: Option<i32>,
    /// When the fleet figures above were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scrape_time: Option<Time>,
    /// With `autoscaling.targetConnectionsPerPod`: the replicas the
    /// connections call for now (`ceil(connections / target)` within the
    /// bounds), before the scale-down window and step apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended_replicas: Option<i32>,
    /// When the connection autoscaler last changed the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// `Ready`, `BrokerReady`, `Available`, `Degraded` (written by the
    /// reconciler) and `Saturated` (written by the fleet scrape). A map
    /// keyed by `type`, so the two writers own their own entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
