//! Operator metrics (`/metrics`), prefixed `hightemplar_operator_`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why the reconciliation failed.
    pub reason: &'static str,
}

/// Metrics of the operator process.
pub struct Metrics {
    /// The registry of the families below.
    registry: Registry,
    /// Reconciliations run.
    pub reconciliations: Counter,
    /// Failed reconciliations, by reason.
    pub failures: Family<Reason, Counter>,
    /// Duration of reconciliations, seconds.
    pub duration: Histogram,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
    /// Gateway `/metrics` pages read by the fleet scrape, by outcome
    /// (`read`, `failed`).
    pub fleet_pages: Family<Outcome, Counter>,
    /// Duration of one resource's fleet scrape (list pods, read pages), seconds.
    pub fleet_scrape_duration: Histogram,
    /// Replica changes made by the connection autoscaler, by direction
    /// (`up`, `down`).
    pub scale_events: Family<Direction, Counter>,
}

/// A `direction` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    /// `up` or `down`.
    pub direction: &'static str,
}

/// `reconcile_failures_total{reason}`: every `reconcile::Error::reason`.
pub const FAILURE_REASONS: &[&str] = &[
    "ApplyFailed",
    "SecretMissing",
    "NoNamespace",
    "InvalidURL",
    "InvalidTLSSecret",
    "TLSError",
    "AccessRefused",
    "Unreachable",
    "PreconditionFailed",
    "BrokerError",
];

/// An `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// What happened.
    pub outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hightemplar_operator");
        let reconciliations = Counter::default();
        let failures = Family::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let leader = Gauge::default();
        registry.register("reconciliations", "Reconciliations run", reconciliations.clone());
        registry.register("reconcile_failures", "Failed reconciliations", failures.clone());
        registry.register("reconcile_duration_seconds", "Duration of reconciliations", duration.clone());
        registry.register("leader", "1 while this replica holds the leader Lease", leader.clone());
        let fleet_pages = Family::default();
        let fleet_scrape_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register("fleet_pages", "Gateway /metrics pages read by the fleet scrape", fleet_pages.clone());
        registry.register(
            "fleet_scrape_duration_seconds",
            "Duration of one resource's fleet scrape",
            fleet_scrape_duration.clone(),
        );
        // At zero from the start: a series that first appears at 1 hides
        // that first failure from `rate()`, so the reconcile-errors alert
        // would miss it.
        for &reason in FAILURE_REASONS {
            let _ = failures.get_or_create(&Reason { reason });
        }
        for outcome in ["read", "failed"] {
            let _ = fleet_pages.get_or_create(&Outcome { outcome });
        }
        let scale_events = Family::default();
        registry.register("scale_events", "Replica changes made by the connection autoscaler", scale_events.clone());
        for direction in ["up", "down"] {
            let _ = scale_events.get_or_create(&Direction { direction });
        }
        Metrics {
            registry,
            reconciliations,
            failures,
            duration,
            leader,
            fleet_pages,
            fleet_scrape_duration,
            scale_events,
        }
    }

    /// Records one replica change of the connection autoscaler.
    pub fn scaled(&self, direction: &'static str) {
        self.scale_events.get_or_create(&Direction { direction }).inc();
    }

    /// Records one resource's fleet scrape: pages read and failed.
    pub fn fleet_pages(&self, read: u32, failed: u32) {
        self.fleet_pages.get_or_create(&Outcome { outcome: "read" }).inc_by(u64::from(read));
        self.fleet_pages.get_or_create(&Outcome { outcome: "failed" }).inc_by(u64::from(failed));
    }

    /// Records one reconciliation.
    pub fn observe(&self, took: Duration, failure: Option<&'static str>) {
        self.reconciliations.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(reason) = failure {
            self.failures.get_or_create(&Reason { reason }).inc();
        }
    }

    /// Text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
