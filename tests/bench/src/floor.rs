//! The floor probe beside the gateway: `tests/bench/floor` (a minimal C
//! sender and reader on raw epoll, one `send` per connection and round)
//! measures what this machine's kernel and loopback cost for the `hot`
//! scenario's fan-out, with the same connections, payload, steps and
//! pinning; `scenarios.sh` runs it just before `hot` and passes its
//! `floor.json` with `--floor`. Here each hot step is matched with the
//! floor's step of the same rate, and the gateway's figures are given as
//! ratios to the floor's (gateway / floor).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use crate::report::StepReport;

/// One side's figures for a step.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    /// CPU per delivery, µs (the gateway's process; the floor's sender).
    pub cpu_us_per_delivery: Option<f64>,
    /// 99th percentile of trigger → delivery latency, ms.
    pub p99_ms: Option<f64>,
    /// Deliveries per second.
    pub deliveries_per_second: Option<f64>,
}

/// A hot step and the floor's step of the same rate.
#[derive(Debug, Clone, Serialize)]
pub struct StepComparison {
    /// Triggers per second (the steps' target rate).
    pub rate: f64,
    /// The gateway's figures.
    pub gateway: Figures,
    /// The floor's figures (`None`: the floor has no step of this rate).
    pub floor: Option<Figures>,
    /// Gateway CPU per delivery / the floor sender's.
    pub cpu_per_delivery_ratio: Option<f64>,
    /// Gateway p99 / the floor's.
    pub p99_ratio: Option<f64>,
    /// Gateway deliveries/s / the floor's.
    pub deliveries_per_second_ratio: Option<f64>,
    /// The bench was saturated during the gateway's step: its p99 and
    /// deliveries/s may be the bench's (see `StepReport::bench_bound`).
    pub bench_bound: bool,
}

/// The whole comparison (`floor` in the bench's JSON).
#[derive(Debug, Clone, Serialize)]
pub struct FloorComparison {
    /// The floor's `floor.json`.
    pub file: String,
    /// Its connections.
    pub connections: Option<u64>,
    /// Its correctness verdict (every connection got every frame).
    pub ok: Option<bool>,
    /// When it finished (Unix seconds).
    pub finished_unix: Option<u64>,
    /// Seconds from the floor's end to this report.
    pub age_seconds: Option<u64>,
    /// Why the comparison is partial or not like for like (empty: it is).
    pub notes: Vec<String>,
    /// Per hot step.
    pub steps: Vec<StepComparison>,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn now_unix() -> Option<u64> {
    SystemTime::now().duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

/// Reads `path` and compares: never fails (an unreadable file is a note).
pub fn compare(path: &Path, steps: &[StepReport], connections: u64) -> FloorComparison {
    let file = path.display().to_string();
    let floor = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {file}: {e}"))
        .and_then(|text| serde_json::from_str::<Value>(&text).map_err(|e| format!("{file} is not JSON: {e}")));
    match floor {
        Ok(floor) => from_value(file, &floor, steps, connections, now_unix()),
        Err(e) => FloorComparison {
            file,
            connections: None,
            ok: None,
            finished_unix: None,
            age_seconds: None,
            notes: vec![e],
            steps: Vec::new(),
        },
    }
}

/// The comparison of the hot `steps` (over `connections` connections)
/// with a parsed `floor.json`.
pub fn from_value(
    file: String,
    floor: &Value,
    steps: &[StepReport],
    connections: u64,
    now_unix: Option<u64>,
) -> FloorComparison {
    let mut notes = Vec::new();
    if floor["tool"].as_str() != Some("high-templar-floor") {
        notes.push(format!("{file} is not a floor probe result (no \"tool\": \"high-templar-floor\")"));
    }
    let floor_connections = floor["connections"].as_u64();
    if floor_connections != Some(connections) {
        notes.push(format!(
            "the floor ran {} connections, the gateway's run {connections}",
            floor_connections.map_or("?".to_string(), |n| n.to_string())
        ));
    }
    let ok = floor["ok"].as_bool();
    if ok != Some(true) {
        notes.push("the floor probe was not correct (lost, duplicated or out-of-order frames)".to_string());
    }
    let floor_steps = floor["steps"].as_array().map(Vec::as_slice).unwrap_or_default();
    let compared = steps
        .iter()
        .filter_map(|st| st.target_rate.map(|rate| (rate, st)))
        .map(|(rate, st)| {
            let gateway = Figures {
                cpu_us_per_delivery: st.server_cpu_us_per_delivery,
                p99_ms: st.latency_ms.p99,
                deliveries_per_second: st.deliveries_per_second,
            };
            let matched = floor_steps
                .iter()
                .find(|f| f["target_rate"].as_f64().is_some_and(|r| (r - rate).abs() <= 1e-6 * rate.abs().max(1.0)));
            let Some(f) = matched else {
                notes.push(format!("the floor has no step at {rate}/s"));
                return StepComparison {
                    bench_bound: st.bench_bound,
                    rate,
                    gateway,
                    floor: None,
                    cpu_per_delivery_ratio: None,
                    p99_ratio: None,
                    deliveries_per_second_ratio: None,
                };
            };
            if f["payload_bytes"].as_u64() != Some(st.payload_bytes as u64) {
                notes.push(format!(
                    "{rate}/s: the floor's payload is {} bytes, the gateway's {}",
                    f["payload_bytes"], st.payload_bytes
                ));
            }
            let floor = Figures {
                cpu_us_per_delivery: f["sender_cpu_us_per_delivery"].as_f64(),
                p99_ms: f["latency_ms"]["p99"].as_f64(),
                deliveries_per_second: f["deliveries_per_second"].as_f64(),
            };
            StepComparison {
                bench_bound: st.bench_bound,
                rate,
                cpu_per_delivery_ratio: ratio(gateway.cpu_us_per_delivery, floor.cpu_us_per_delivery),
                p99_ratio: ratio(gateway.p99_ms, floor.p99_ms),
                deliveries_per_second_ratio: ratio(gateway.deliveries_per_second, floor.deliveries_per_second),
                gateway,
                floor: Some(floor),
            }
        })
        .collect();
    let finished_unix = floor["finished_unix"].as_u64();
    FloorComparison {
        file,
        connections: floor_connections,
        ok,
        finished_unix,
        age_seconds: finished_unix.zip(now_unix).map(|(then, now)| now.saturating_sub(then)),
        notes,
        steps: compared,
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

fn times(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("×{v:.2}"))
}

impl FloorComparison {
    /// The text table: per step, the gateway's figure, the floor's, and
    /// their ratio, for CPU per delivery, p99 and deliveries/s.
    pub fn text(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\nfloor probe (tests/bench/floor, {}: {} connections, measured {} before; ratio = gateway / floor)",
            self.file,
            self.connections.map_or("?".to_string(), |n| n.to_string()),
            self.age_seconds.map_or("?".to_string(), |s| format!("{s} s"))
        );
        if !self.steps.is_empty() {
            let _ = writeln!(
                out,
                "  {:<10} {:>10} {:>10} {:>7}  {:>9} {:>9} {:>7}  {:>10} {:>10} {:>6}",
                "step", "gw us/del", "floor", "ratio", "gw p99 ms", "floor", "ratio", "gw del/s", "floor", "ratio"
            );
        }
        for s in &self.steps {
            let f = s.floor.clone().unwrap_or_default();
            let _ = writeln!(
                out,
                "  {:<10} {:>10} {:>10} {:>7}  {:>9} {:>9} {:>7}  {:>10} {:>10} {:>6}{}",
                format!("{}/s", s.rate),
                opt(s.gateway.cpu_us_per_delivery, 2),
                opt(f.cpu_us_per_delivery, 2),
                times(s.cpu_per_delivery_ratio),
                opt(s.gateway.p99_ms, 1),
                opt(f.p99_ms, 1),
                times(s.p99_ratio),
                opt(s.gateway.deliveries_per_second, 0),
                opt(f.deliveries_per_second, 0),
                times(s.deliveries_per_second_ratio),
                if s.bench_bound { "  BENCH-BOUND" } else { "" }
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "  note: {note}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Latency;
    use serde_json::json;

    fn step(rate: f64, cpu_us_per_delivery: f64, p99: f64, deliveries_per_second: f64) -> StepReport {
        StepReport {
            name: format!("{rate}/s"),
            target_rate: Some(rate),
            payload_bytes: 128,
            seconds: 10.0,
            triggers: 100,
            triggers_failed: 0,
            trigger_rate: Some(rate),
            expected: 500_000,
            received: 500_000,
            lost: 0,
            duplicated: 0,
            unexpected: 0,
            deliveries_per_second: Some(deliveries_per_second),
            drained: true,
            drain_seconds: 0.1,
            latency_ms: Latency {
                count: 500_000,
                p50: Some(p99 / 2.0),
                p90: Some(p99),
                p99: Some(p99),
                max: Some(p99),
            },
            server_cpu_seconds: Some(1.0),
            server_cpu_percent: Some(10.0),
            server_cpu_us_per_trigger: Some(cpu_us_per_delivery * 5000.0),
            server_cpu_us_per_delivery: Some(cpu_us_per_delivery),
            bench_cpu_percent: Some(50.0),
            reader_cpu_percent: Some(40.0),
            bench_bound: false,
        }
    }

    fn floor_json(ok: bool) -> Value {
        json!({
            "tool": "high-templar-floor", "connections": 5000, "finished_unix": 1000, "ok": ok,
            "steps": [
                {"target_rate": 10.0, "payload_bytes": 128, "deliveries_per_second": 50000.0,
                 "latency_ms": {"p99": 25.0}, "sender_cpu_us_per_delivery": 4.0},
                {"target_rate": 200.0, "payload_bytes": 128, "deliveries_per_second": 1000000.0,
                 "latency_ms": {"p99": 40.0}, "sender_cpu_us_per_delivery": 0.5}
            ]
        })
    }

    #[test]
    fn ratios_per_matching_step() {
        let steps = [step(10.0, 12.0, 90.0, 50_000.0), step(200.0, 1.0, 900.0, 800_000.0)];
        let c = from_value("floor.json".into(), &floor_json(true), &steps, 5000, Some(1060));
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        assert_eq!(c.age_seconds, Some(60));
        assert_eq!(c.steps.len(), 2);
        assert_eq!(c.steps[0].cpu_per_delivery_ratio, Some(3.0));
        assert_eq!(c.steps[0].p99_ratio, Some(3.6));
        assert_eq!(c.steps[0].deliveries_per_second_ratio, Some(1.0));
        assert_eq!(c.steps[1].cpu_per_delivery_ratio, Some(2.0));
        assert_eq!(c.steps[1].p99_ratio, Some(22.5));
        assert_eq!(c.steps[1].deliveries_per_second_ratio, Some(0.8));
        let mut text = String::new();
        c.text(&mut text);
        assert!(text.contains("×3.60"), "{text}");
        assert!(text.contains("×22.50"), "{text}");
    }

    #[test]
    fn mismatches_are_noted_not_hidden() {
        let steps = [step(10.0, 12.0, 90.0, 50_000.0), step(50.0, 5.0, 200.0, 250_000.0)];
        let c = from_value("floor.json".into(), &floor_json(false), &steps, 4000, None);
        assert_eq!(c.age_seconds, None);
        assert!(c.steps[1].floor.is_none());
        assert_eq!(c.steps[1].p99_ratio, None);
        let notes = c.notes.join("\n");
        assert!(notes.contains("5000 connections, the gateway's run 4000"), "{notes}");
        assert!(notes.contains("not correct"), "{notes}");
        assert!(notes.contains("no step at 50/s"), "{notes}");
        let missing = compare(Path::new("/nonexistent/floor.json"), &steps, 5000);
        assert!(missing.steps.is_empty());
        assert!(missing.notes[0].contains("cannot read"), "{:?}", missing.notes);
    }
}
