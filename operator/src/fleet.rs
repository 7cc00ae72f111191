//! Fleet figures (#14 item 1): what one gateway pod's `/metrics` says
//! about its load, and the sum over a HighTemplar's ready pods that goes
//! into its status. Pure: the scrape itself (HTTP, timeouts, concurrency)
//! is done by the caller; this module only reads text and adds numbers.
//!
//! Only the families the status needs are read, line by line, so a pod's
//! page costs O(its size) and nothing is kept of it:
//! `hightemplar_connections_open`, `hightemplar_connections_limit`,
//! `hightemplar_subscriptions_active`, `hightemplar_amqp_connected` and the
//! slow-consumer closes of
//! `hightemplar_disconnects_total{reason="slow_consumer"}`. Four families
//! of our own gateway's page do not need a general exposition parser (and
//! its regex and time dependencies).

use std::fmt;

/// One pod's figures, from its `/metrics` page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodFigures {
    /// Websocket connections open now.
    pub connections: u64,
    /// The most websocket connections the pod accepts (`None`: the page
    /// does not say).
    pub limit: Option<u64>,
    /// Subscriptions held now.
    pub subscriptions: u64,
    /// Consuming triggers from RabbitMQ now (`None`: the pod does not say,
    /// e.g. the memory broker).
    pub amqp_connected: Option<bool>,
    /// Connections closed as slow consumers since the pod started.
    pub slow_consumer_closes: u64,
}

/// Why a pod's page could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsError {
    /// The page has no `hightemplar_connections_open` sample: not a
    /// gateway's page (or a truncated one).
    NotAGateway,
    /// A sample of a family the status needs has a value that is not a
    /// non-negative number.
    BadValue {
        /// The metric line, cut to 120 bytes.
        line: String,
    },
}

impl fmt::Display for MetricsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsError::NotAGateway => {
                f.write_str("no hightemplar_connections_open sample: is this a high-templar gateway's /metrics?")
            }
            MetricsError::BadValue { line } => write!(f, "unreadable metric value in {line:?}"),
        }
    }
}

impl std::error::Error for MetricsError {}

/// Reads one pod's figures from its Prometheus (or OpenMetrics) text page.
pub fn parse_metrics(text: &str) -> Result<PodFigures, MetricsError> {
    let mut figures = PodFigures::default();
    let mut saw_connections = false;
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = match line.split_once(' ') {
            Some((series, rest)) => (series, rest.split(' ').next().unwrap_or_default()),
            None => continue,
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.strip_suffix('}').unwrap_or(labels)),
            None => (series, ""),
        };
        let read = || count(value).ok_or_else(|| MetricsError::BadValue { line: cut(line) });
        match name {
            "hightemplar_connections_open" => {
                figures.connections = read()?;
                saw_connections = true;
            }
            "hightemplar_connections_limit" => figures.limit = Some(read()?),
            "hightemplar_subscriptions_active" => figures.subscriptions = read()?,
            "hightemplar_amqp_connected" => figures.amqp_connected = Some(read()? > 0),
            "hightemplar_disconnects_total" if has_label(labels, "reason", "slow_consumer") => {
                figures.slow_consumer_closes += read()?;
            }
            _ => {}
        }
    }
    if saw_connections { Ok(figures) } else { Err(MetricsError::NotAGateway) }
}

/// A sample value as a count: a finite, non-negative number (gauges and
/// counters are written as integers or as floats like `12.0`).
fn count(value: &str) -> Option<u64> {
    let v: f64 = value.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| v.round() as u64)
}

/// Whether the label set `labels` (`a="x",b="y"`) has `key="value"`.
fn has_label(labels: &str, key: &str, value: &str) -> bool {
    labels.split(',').any(|pair| {
        pair.split_once('=').is_some_and(|(k, v)| {
            k.trim() == key && v.trim().strip_prefix('"').and_then(|v| v.strip_suffix('"')) == Some(value)
        })
    })
}

fn cut(line: &str) -> String {
    let mut end = line.len().min(120);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_string()
}

/// The sum over a HighTemplar's ready pods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetFigures {
    /// Connections open, all pods read.
    pub connections: u64,
    /// Subscriptions held, all pods read.
    pub subscriptions: u64,
    /// Pods consuming from RabbitMQ now.
    pub consumers: u64,
    /// The most connections one pod holds.
    pub max_pod_connections: u64,
    /// Slow-consumer closes, all pods read, since they started.
    pub slow_consumer_closes: u64,
    /// Pods whose page was read.
    pub pods_read: u32,
    /// Pods whose page could not be fetched or read.
    pub pods_failed: u32,
    /// The fullest pod's connections as a percentage of its limit (its
    /// own `connections_limit`, else the limit given to [`FleetFigures::new`]).
    pub max_fill_percent: u64,
    /// The limit of a pod whose page gives none.
    default_limit: u64,
}

impl FleetFigures {
    /// No pods yet; `default_limit` is the connection limit of a pod whose
    /// page gives none (the resource's `limits.maxConnections`).
    pub fn new(default_limit: u64) -> FleetFigures {
        FleetFigures { default_limit, ..FleetFigures::default() }
    }

    /// Adds one pod's scrape outcome.
    pub fn add<E>(&mut self, pod: &Result<PodFigures, E>) {
        match pod {
            Ok(p) => {
                self.pods_read += 1;
                self.connections += p.connections;
                self.subscriptions += p.subscriptions;
                self.consumers += u64::from(p.amqp_connected == Some(true));
                self.max_pod_connections = self.max_pod_connections.max(p.connections);
                self.slow_consumer_closes += p.slow_consumer_closes;
                let limit = p.limit.unwrap_or(self.default_limit);
                if let Some(fill) = p.connections.saturating_mul(100).checked_div(limit) {
                    self.max_fill_percent = self.max_fill_percent.max(fill);
                }
            }
            Err(_) => self.pods_failed += 1,
        }
    }

    /// Whether some pod holds at least `percent` % of its connection limit.
    pub fn saturated(&self, percent: u64) -> bool {
        self.pods_read > 0 && self.max_fill_percent >= percent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "\
# HELP hightemplar_connections_open Websocket connections open now.
# TYPE hightemplar_connections_open gauge
hightemplar_connections_open 1234
hightemplar_connections_limit 18976
# TYPE hightemplar_subscriptions_active gauge
hightemplar_subscriptions_active 2468
hightemplar_amqp_connected 1
hightemplar_disconnects_total{reason=\"slow_consumer\"} 3
hightemplar_disconnects_total{reason=\"idle\"} 40
hightemplar_disconnects_total{code=\"x\",reason=\"slow_consumer\"} 2
hightemplar_connections_total 99999
# EOF
";

    #[test]
    fn reads_the_figures_the_status_needs() {
        let figures = parse_metrics(PAGE).expect("a gateway page");
        assert_eq!(
            figures,
            PodFigures {
                connections: 1234,
                limit: Some(18976),
                subscriptions: 2468,
                amqp_connected: Some(true),
                slow_consumer_closes: 5
            }
        );
    }

    #[test]
    fn refuses_pages_that_are_not_a_gateways() {
        assert_eq!(parse_metrics("up 1\n"), Err(MetricsError::NotAGateway));
        assert_eq!(parse_metrics(""), Err(MetricsError::NotAGateway));
        let bad = parse_metrics("hightemplar_connections_open -3\n");
        assert!(matches!(bad, Err(MetricsError::BadValue { .. })), "{bad:?}");
        let bad = parse_metrics("hightemplar_connections_open NaN\n");
        assert!(matches!(bad, Err(MetricsError::BadValue { .. })), "{bad:?}");
        assert_eq!(parse_metrics("hightemplar_connections_open 7.0\n").map(|f| f.connections), Ok(7));
    }

    #[test]
    fn sums_pods_and_counts_failures() {
        let mut fleet = FleetFigures::new(100);
        let a = PodFigures {
            connections: 10,
            limit: Some(10),
            subscriptions: 20,
            amqp_connected: Some(true),
            slow_consumer_closes: 1,
        };
        let b = PodFigures {
            connections: 30,
            limit: None,
            subscriptions: 5,
            amqp_connected: Some(false),
            slow_consumer_closes: 0,
        };
        fleet.add(&Ok::<_, ()>(a));
        fleet.add(&Ok::<_, ()>(b));
        fleet.add(&Err::<PodFigures, _>("timed out"));
        assert_eq!(
            fleet,
            FleetFigures {
                connections: 40,
                subscriptions: 25,
                consumers: 1,
                max_pod_connections: 30,
                slow_consumer_closes: 1,
                pods_read: 2,
                pods_failed: 1,
                max_fill_percent: 100,
                default_limit: 100,
            }
        );
        assert!(fleet.saturated(90), "pod a is at its own limit");
        let mut fleet = FleetFigures::new(100);
        fleet.add(&Ok::<_, ()>(b));
        assert_eq!(fleet.max_fill_percent, 30, "pod b has no limit gauge: the resource's limit counts");
        assert!(!fleet.saturated(90));
        assert!(!FleetFigures::new(100).saturated(1), "no pod read: not saturated, unknown");
        let mut zero = FleetFigures::new(0);
        zero.add(&Ok::<_, ()>(PodFigures { connections: 5, ..PodFigures::default() }));
        assert_eq!(zero.max_fill_percent, 0, "no limit at all: no division");
    }
}
