//! The preset scenarios. Each is one or more runs and a summary of the
//! figures it exists for. `--scale` multiplies connection counts, room
//! counts and durations (never below a floor that keeps it meaningful),
//! not trigger rates.

use std::time::Duration;

use clap::ValueEnum;
use serde_json::{Value, json};

use crate::admission::{StormSpec, Variant};
use crate::report::RunReport;
use crate::rooms::RoomSpace;
use crate::run::{ChurnSpec, Layout, RunSpec, StepSpec, TriggerShape};

/// A preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// 20 000 connections × {user:i},{group:i/10}, held 30 s: RSS per
    /// connection, idle CPU.
    Idle,
    /// 5 000 connections in one room, 128 B triggers at 10/20/50/100/200
    /// per s, 10 s each: deliveries/s and latency per step.
    Hot,
    /// 10 000 connections × 10 rooms of 100 000, single-room triggers as
    /// fast as possible; then the same with 1 000 rooms: CPU per trigger.
    Sparse,
    /// 10 000 connections × 5 rooms {customer, warehouse}; triggers
    /// {customer:c, warehouse:"*"} vs the 10 rooms listed: CPU ratio.
    Wildcard,
    /// 5 000 connections each subscribing 100 rooms pipelined: subscribes/s.
    Storm,
    /// 2 000 clients in one room at 20 × 1 KiB triggers/s, 100
    /// connect/subscribe/disconnect per s, 20 clients that stop reading;
    /// and the same without them: healthy p99, server RSS.
    Churn,
    /// Reconnect storm: 10 000 clients at once retrying 503s, against a
    /// backend with 32 slots; distinct credentials, then 500 users' tabs:
    /// backend peak concurrency and calls, connect latency.
    Admission,
}

impl Scenario {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Hot => "hot",
            Scenario::Sparse => "sparse",
            Scenario::Wildcard => "wildcard",
            Scenario::Storm => "storm",
            Scenario::Churn => "churn",
            Scenario::Admission => "admission",
        }
    }
}

/// `n × scale`, at least `min`.
fn scaled(n: f64, scale: f64, min: f64) -> usize {
    (n * scale).round().max(min) as usize
}

/// `secs × scale`, at least `min` seconds.
fn scaled_secs(secs: f64, scale: f64, min: f64) -> Duration {
    Duration::from_secs_f64((secs * scale).max(min))
}

fn step(name: &str, rate: Option<f64>, duration: Duration, shape: TriggerShape, payload_bytes: usize) -> StepSpec {
    StepSpec { name: name.to_string(), rate, duration, max_triggers: None, shape, payload_bytes }
}

fn single_room() -> TriggerShape {
    TriggerShape { rooms: 1, wildcard_share: 0.0, expand: false }
}

/// The storms of the `admission` scenario at `scale`: 10 000 clients,
/// shared out over 500 users (20 tabs each) in the sharing variants;
/// `users` overrides the number of users.
pub fn storms(variants: &[Variant], scale: f64, users: Option<usize>) -> Vec<StormSpec> {
    let clients = scaled(10_000.0, scale, 10.0);
    let users = users.unwrap_or_else(|| scaled(500.0, scale, 2.0)).clamp(1, clients);
    variants
        .iter()
        .map(|&variant| StormSpec { variant, clients, users: if variant.shares() { users } else { clients } })
        .collect()
}

/// The shape of the `hot` scenario at `scale` for the floor probe
/// (`tests/bench/floor`, which `scenarios.sh` runs just before `hot`):
/// `<connections> <rate,rate,…> <seconds per step> <payload bytes>`.
pub fn floor_spec(scale: f64) -> Result<String, String> {
    if scale.is_nan() || scale <= 0.0 {
        return Err("--scale must be positive".into());
    }
    let runs = runs(Scenario::Hot, scale);
    let [run] = runs.as_slice() else {
        return Err("the hot scenario is not one run: the floor probe mirrors one".into());
    };
    let Some(first) = run.steps.first() else {
        return Err("the hot scenario has no step".into());
    };
    if run.steps.iter().any(|s| s.duration != first.duration || s.payload_bytes != first.payload_bytes) {
        return Err("the hot steps differ in duration or payload: the floor probe runs one of each".into());
    }
    let rates = run
        .steps
        .iter()
        .map(|s| s.rate.map(|r| r.to_string()).ok_or_else(|| format!("hot step {} has no rate", s.name)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(format!("{} {} {} {}", run.connections, rates.join(","), first.duration.as_secs_f64(), first.payload_bytes))
}

/// The runs of `scenario` at `scale` (none for `admission`: see [`storms`]).
pub fn runs(scenario: Scenario, scale: f64) -> Vec<RunSpec> {
    match scenario {
        Scenario::Admission => Vec::new(),
        Scenario::Idle => {
            let n = scaled(20_000.0, scale, 10.0);
            vec![RunSpec {
                name: "idle".into(),
                connections: n,
                spaces: vec![RoomSpace::single("user", n as u64), RoomSpace::single("group", n.div_ceil(10) as u64)],
                layout: Layout::UserGroup,
                hold: scaled_secs(30.0, scale, 1.0),
                steps: Vec::new(),
                slow_clients: 0,
                churn: None,
            }]
        }
        Scenario::Hot => {
            let duration = scaled_secs(10.0, scale, 1.0);
            vec![RunSpec {
                name: "hot".into(),
                connections: scaled(5_000.0, scale, 10.0),
                spaces: vec![RoomSpace::single("hot", 1)],
                layout: Layout::Random { per_conn: 1, wildcard_share: 0.0 },
                hold: Duration::ZERO,
                steps: [10.0, 20.0, 50.0, 100.0, 200.0]
                    .iter()
                    .map(|&r| step(&format!("{r}/s"), Some(r), duration, single_room(), 128))
                    .collect(),
                slow_clients: 0,
                churn: None,
            }]
        }
        Scenario::Sparse => {
            let n = scaled(10_000.0, scale, 10.0);
            let duration = scaled_secs(10.0, scale, 1.0);
            [("100k-rooms", 100_000.0), ("1k-rooms", 1_000.0)]
                .iter()
                .map(|&(name, rooms)| RunSpec {
                    name: format!("sparse-{name}"),
                    connections: n,
                    spaces: vec![RoomSpace::single("room", scaled(rooms, scale, 10.0) as u64)],
                    layout: Layout::Random { per_conn: 10, wildcard_share: 0.0 },
                    hold: Duration::ZERO,
                    steps: vec![step("max rate", None, duration, single_room(), 128)],
                    slow_clients: 0,
                    churn: None,
                })
                .collect()
        }
        Scenario::Wildcard => {
            let duration = scaled_secs(10.0, scale, 1.0);
            let customers = scaled(1_000.0, scale, 2.0) as u64;
            let mut space = RoomSpace::single("customer", customers);
            space.keys.push(("warehouse".into(), 10));
            let wildcard = TriggerShape { rooms: 1, wildcard_share: 1.0, expand: false };
            let explicit = TriggerShape { rooms: 1, wildcard_share: 1.0, expand: true };
            vec![RunSpec {
                name: "wildcard".into(),
                connections: scaled(10_000.0, scale, 10.0),
                spaces: vec![space],
                layout: Layout::Random { per_conn: 5, wildcard_share: 0.0 },
                hold: Duration::ZERO,
                steps: vec![
                    step("wildcard", None, duration, wildcard, 128),
                    step("explicit", None, duration, explicit, 128),
                ],
                slow_clients: 0,
                churn: None,
            }]
        }
        Scenario::Storm => vec![RunSpec {
            name: "storm".into(),
            connections: scaled(5_000.0, scale, 10.0),
            spaces: vec![RoomSpace::single("room", scaled(100_000.0, scale, 1_000.0) as u64)],
            layout: Layout::Random { per_conn: 100, wildcard_share: 0.0 },
            hold: Duration::ZERO,
            steps: Vec::new(),
            slow_clients: 0,
            churn: None,
        }],
        Scenario::Churn => {
            let duration = scaled_secs(30.0, scale, 2.0);
            let churn = ChurnSpec { rate: scaled(100.0, scale, 5.0) as f64, hold: Duration::from_secs(1) };
            [("churn-without-slow", 0), ("churn-with-slow", scaled(20.0, scale, 2.0))]
                .iter()
                .map(|&(name, slow)| RunSpec {
                    name: name.into(),
                    connections: scaled(2_000.0, scale, 10.0),
                    spaces: vec![RoomSpace::single("hot", 1)],
                    layout: Layout::Random { per_conn: 1, wildcard_share: 0.0 },
                    hold: Duration::ZERO,
                    steps: vec![step("20/s 1KiB", Some(20.0), duration, single_room(), 1024)],
                    slow_clients: slow,
                    churn: Some(churn.clone()),
                })
                .collect()
        }
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// The figures `scenario` exists for, from its runs (`admission`: see
/// [`crate::admission::summary`]).
pub fn summary(scenario: Scenario, runs: &[RunReport]) -> Value {
    match scenario {
        Scenario::Admission => json!({}),
        Scenario::Idle => {
            let run = &runs[0];
            json!({
                "connections": run.connections.ok,
                "connections_per_second": run.connections.per_second,
                "rss_bytes_per_connection": run.server.bytes_per_connection,
                "idle_cpu_percent": run.server.idle_cpu_percent,
            })
        }
        Scenario::Hot => {
            let run = &runs[0];
            let steps: Vec<Value> = run
                .steps
                .iter()
                .map(|s| {
                    json!({
                        "rate": s.target_rate,
                        "deliveries_per_second": s.deliveries_per_second,
                        "p50_ms": s.latency_ms.p50,
                        "p99_ms": s.latency_ms.p99,
                        "max_ms": s.latency_ms.max,
                    })
                })
                .collect();
            let best = run
                .steps
                .iter()
                .filter(|s| s.drained && s.latency_ms.p99.is_some_and(|p| p < 50.0))
                .filter_map(|s| s.target_rate)
                .fold(None, |acc: Option<f64>, r| Some(acc.map_or(r, |a| a.max(r))));
            json!({
                "connections": run.connections.ok,
                "steps": steps,
                "highest_rate_with_p99_under_50ms": best,
            })
        }
        Scenario::Sparse => {
            let per_trigger =
                |i: usize| runs.get(i).and_then(|r| r.steps.first()).and_then(|s| s.server_cpu_us_per_trigger);
            let triggers_per_s = |i: usize| runs.get(i).and_then(|r| r.steps.first()).and_then(|s| s.trigger_rate);
            json!({
                "cpu_us_per_trigger_many_rooms": per_trigger(0),
                "cpu_us_per_trigger_few_rooms": per_trigger(1),
                "cost_ratio_few_over_many": ratio(per_trigger(1), per_trigger(0)),
                "triggers_per_second_many_rooms": triggers_per_s(0),
                "triggers_per_second_few_rooms": triggers_per_s(1),
            })
        }
        Scenario::Wildcard => {
            let run = &runs[0];
            let per_trigger = |i: usize| run.steps.get(i).and_then(|s| s.server_cpu_us_per_trigger);
            json!({
                "cpu_us_per_trigger_wildcard": per_trigger(0),
                "cpu_us_per_trigger_explicit": per_trigger(1),
                "cost_ratio_explicit_over_wildcard": ratio(per_trigger(1), per_trigger(0)),
                "triggers_per_second_wildcard": run.steps.first().and_then(|s| s.trigger_rate),
                "triggers_per_second_explicit": run.steps.get(1).and_then(|s| s.trigger_rate),
            })
        }
        Scenario::Storm => {
            let run = &runs[0];
            json!({
                "connections": run.connections.ok,
                "subscriptions": run.subscriptions.ok,
                "seconds": run.subscriptions.seconds,
                "subscribes_per_second": run.subscriptions.per_second,
                "rss_bytes_per_connection": run.server.bytes_per_connection,
            })
        }
        Scenario::Churn => {
            let p99 = |i: usize| runs.get(i).and_then(|r| r.steps.first()).and_then(|s| s.latency_ms.p99);
            let rss = |i: usize| runs.get(i).and_then(|r| r.server.rss_max_kib);
            json!({
                "healthy_p99_ms_without_slow": p99(0),
                "healthy_p99_ms_with_slow": p99(1),
                "p99_ratio_with_over_without": ratio(p99(1), p99(0)),
                "server_rss_max_kib_without_slow": rss(0),
                "server_rss_max_kib_with_slow": rss(1),
                "slow_clients_closed": runs.get(1).and_then(|r| r.slow_clients.as_ref()).map(|s| s.closed_by_server),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_scale_matches_the_issue() {
        let idle = runs(Scenario::Idle, 1.0);
        assert_eq!(idle[0].connections, 20_000);
        assert_eq!(idle[0].hold, Duration::from_secs(30));
        let hot = runs(Scenario::Hot, 1.0);
        assert_eq!(hot[0].connections, 5_000);
        assert_eq!(hot[0].steps.len(), 5);
        assert_eq!(hot[0].steps[4].rate, Some(200.0));
        let sparse = runs(Scenario::Sparse, 1.0);
        assert_eq!(sparse[0].spaces[0].size(), 100_000);
        assert_eq!(sparse[1].spaces[0].size(), 1_000);
        let wildcard = runs(Scenario::Wildcard, 1.0);
        assert_eq!(wildcard[0].spaces[0].size(), 10_000);
        let storm = runs(Scenario::Storm, 1.0);
        assert_eq!(storm[0].layout.per_conn(), 100);
        let churn = runs(Scenario::Churn, 1.0);
        assert_eq!(churn[0].slow_clients, 0);
        assert_eq!(churn[1].slow_clients, 20);
        assert_eq!(churn[1].connections, 2_000);
        let storms = storms(&[Variant::Distinct, Variant::Shared], 1.0, None);
        assert_eq!((storms[0].clients, storms[0].users), (10_000, 10_000));
        assert_eq!((storms[1].clients, storms[1].users), (10_000, 500));
    }

    #[test]
    fn floor_spec_mirrors_hot() {
        assert_eq!(floor_spec(1.0).as_deref(), Ok("5000 10,20,50,100,200 10 128"));
        assert_eq!(floor_spec(0.5).as_deref(), Ok("2500 10,20,50,100,200 5 128"));
        assert_eq!(floor_spec(0.01).as_deref(), Ok("50 10,20,50,100,200 1 128"));
        assert!(floor_spec(0.0).is_err());
    }

    #[test]
    fn small_scale_stays_meaningful() {
        for scenario in Scenario::value_variants() {
            for run in runs(*scenario, 0.001) {
                assert!(run.connections >= 10, "{}", run.name);
                assert!(run.steps.iter().all(|s| s.duration >= Duration::from_secs(1)));
            }
        }
        let tiny = storms(&[Variant::Distinct, Variant::Grouped], 0.0001, None);
        assert_eq!((tiny[0].clients, tiny[0].users, tiny[1].users), (10, 10, 2));
        assert_eq!(storms(&[Variant::Shared], 1.0, Some(20_000))[0].users, 10_000);
        let sparse = runs(Scenario::Sparse, 0.01);
        assert_eq!(sparse[0].spaces[0].size(), 1_000);
        assert_eq!(sparse[1].spaces[0].size(), 10);
    }
}
