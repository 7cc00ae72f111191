//! Results: what a run measured (serialised as JSON with `--json`) and the
//! plain-text summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;

use crate::floor::FloorComparison;

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Largest.
    pub max: Option<f64>,
}

impl Latency {
    /// Percentiles of a histogram in µs.
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| Some(us as f64 / 1000.0);
        Latency {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// Timing of the connect or the subscribe phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseTiming {
    /// Attempted.
    pub requested: u64,
    /// Succeeded.
    pub ok: u64,
    /// Failed (refused, errors, no answer in time).
    pub failed: u64,
    /// Wall time of the phase.
    pub seconds: f64,
    /// `ok / seconds`.
    pub per_second: Option<f64>,
    /// Server CPU during the phase, seconds.
    pub server_cpu_seconds: Option<f64>,
}

/// The server process, when `--server-pid` was given.
#[derive(Debug, Clone, Serialize)]
pub struct ServerReport {
    /// Its pid.
    pub pid: Option<u32>,
    /// RSS before connecting, KiB.
    pub rss_before_kib: Option<u64>,
    /// RSS after connecting and subscribing, KiB.
    pub rss_after_subscribe_kib: Option<u64>,
    /// RSS after the triggers (clients still open), KiB.
    pub rss_after_run_kib: Option<u64>,
    /// RSS once the clients closed, KiB.
    pub rss_after_close_kib: Option<u64>,
    /// Largest RSS seen during the run (sampled every 100 ms), KiB.
    pub rss_max_kib: Option<u64>,
    /// (RSS after subscribing − RSS before) / connections established.
    pub bytes_per_connection: Option<f64>,
    /// Idle hold after subscribing.
    pub hold_seconds: f64,
    /// Server CPU during the hold, % of one core.
    pub idle_cpu_percent: Option<f64>,
}

/// One step of triggers.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Name.
    pub name: String,
    /// Target triggers per second; `null`: as fast as possible.
    pub target_rate: Option<f64>,
    /// Size of each trigger's data.
    pub payload_bytes: usize,
    /// Publishing time.
    pub seconds: f64,
    /// Triggers accepted (HTTP 2xx, or AMQP confirmed).
    pub triggers: u64,
    /// Triggers refused or failed.
    pub triggers_failed: u64,
    /// Triggers accepted per second.
    pub trigger_rate: Option<f64>,
    /// Deliveries expected to stable clients.
    pub expected: u64,
    /// Deliveries received by stable clients.
    pub received: u64,
    /// Expected but not received.
    pub lost: u64,
    /// Received more than once for one subscription.
    pub duplicated: u64,
    /// Received by a subscription the trigger should not reach.
    pub unexpected: u64,
    /// Deliveries received / (last delivery − step start).
    pub deliveries_per_second: Option<f64>,
    /// Every expected delivery arrived within the drain timeout.
    pub drained: bool,
    /// Time from the last trigger to the last expected delivery.
    pub drain_seconds: f64,
    /// Trigger → delivery latency.
    pub latency_ms: Latency,
    /// Server CPU during the step (publishing + draining).
    pub server_cpu_seconds: Option<f64>,
    /// Same, % of one core.
    pub server_cpu_percent: Option<f64>,
    /// Server CPU per trigger accepted, µs.
    pub server_cpu_us_per_trigger: Option<f64>,
    /// Server CPU per expected delivery, µs.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// The bench's own CPU during the step, % of one core (near 100 %
    /// per bench core means the bench, not the server, was the limit).
    pub bench_cpu_percent: Option<f64>,
    /// The thread reading every stable connection, % of one core.
    pub reader_cpu_percent: Option<f64>,
    /// The bench was saturated during the step (its reader, or the whole
    /// bench over its cores, at 90 % or more): its latency and rate figures
    /// may be the bench's, not the server's.
    pub bench_bound: bool,
}

/// Delivery counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Deliveries {
    /// Expected but not received.
    pub lost: u64,
    /// Received more than once.
    pub duplicated: u64,
    /// Received but not expected.
    pub unexpected: u64,
    /// Publish frames that are not the bench's.
    pub foreign: u64,
}

/// Delivery totals of a run (stable clients).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Expected.
    pub expected: u64,
    /// Received.
    pub received: u64,
    /// Expected but not received.
    pub lost: u64,
    /// Received more than once.
    pub duplicated: u64,
    /// Received but not expected.
    pub unexpected: u64,
    /// Not the bench's.
    pub foreign: u64,
}

/// Slow clients.
#[derive(Debug, Clone, Serialize)]
pub struct SlowReport {
    /// How many.
    pub count: u64,
    /// Connected and subscribed.
    pub subscribed: u64,
    /// Closed by the server by the end of the run (close frame, or the
    /// connection dropped: a close frame cannot pass a full socket).
    pub closed_by_server: u64,
    /// Of those, closed with a 1013 close frame that got through.
    pub closed_1013: u64,
}

/// Churn clients.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    /// Target new clients per second.
    pub rate: f64,
    /// Started.
    pub attempted: u64,
    /// Connected and authorised.
    pub connected: u64,
    /// Their subscriptions that succeeded.
    pub subscribes_ok: u64,
    /// Their subscriptions that failed.
    pub subscribes_failed: u64,
    /// Publish frames they received.
    pub deliveries: u64,
    /// Publish frames they received twice.
    pub duplicated: u64,
    /// Connect + authorise + subscribe time.
    pub setup_ms: Latency,
    /// Trigger → delivery latency of their deliveries.
    pub latency_ms: Latency,
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Name.
    pub name: String,
    /// Room spaces.
    pub spaces: Vec<String>,
    /// Connect phase (stable and slow clients).
    pub connections: PhaseTiming,
    /// Subscribe phase (stable and slow clients).
    pub subscriptions: PhaseTiming,
    /// The server process.
    pub server: ServerReport,
    /// Trigger steps.
    pub steps: Vec<StepReport>,
    /// Delivery totals.
    pub deliveries: Counts,
    /// Slow clients, if any.
    pub slow_clients: Option<SlowReport>,
    /// Churn clients, if any.
    pub churn: Option<ChurnReport>,
    /// Problems seen, by kind.
    pub errors: BTreeMap<String, u64>,
    /// The bench's CPU time.
    pub bench_cpu_seconds: Option<f64>,
    /// Wall time.
    pub wall_seconds: f64,
}

impl RunReport {
    /// Correctness problems of this run (empty: correct).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.connections.failed > 0 {
            problems.push(format!("{}: {} connections failed", self.name, self.connections.failed));
        }
        if self.subscriptions.failed > 0 {
            problems.push(format!("{}: {} subscriptions failed", self.name, self.subscriptions.failed));
        }
        let d = &self.deliveries;
        if d.lost > 0 || d.duplicated > 0 || d.unexpected > 0 {
            problems.push(format!(
                "{}: {} lost, {} duplicated, {} unexpected deliveries",
                self.name, d.lost, d.duplicated, d.unexpected
            ));
        }
        let failed: u64 = self.steps.iter().map(|s| s.triggers_failed).sum();
        if failed > 0 {
            problems.push(format!("{}: {failed} triggers not accepted", self.name));
        }
        if let Some(churn) = &self.churn {
            if churn.connected < churn.attempted || churn.subscribes_failed > 0 || churn.duplicated > 0 {
                problems.push(format!(
                    "{}: churn clients: {}/{} connected, {} subscriptions failed, {} duplicated",
                    self.name, churn.connected, churn.attempted, churn.subscribes_failed, churn.duplicated
                ));
            }
        }
        problems
    }
}

/// The bundled backend during a storm.
#[derive(Debug, Clone, Serialize)]
pub struct AdmissionBackend {
    /// Bootstrap calls it answered.
    pub calls: u64,
    /// `calls` / `busy_seconds`.
    pub calls_per_second: Option<f64>,
    /// From the first call's arrival to the last answer.
    pub busy_seconds: Option<f64>,
    /// Most calls it had at once (waiting for one of its slots or served).
    pub peak_concurrent: u64,
    /// The bound `peak_concurrent` must stay within: the gateway's
    /// `backend.admission.maxConcurrent`.
    pub max_concurrent: u64,
    /// Calls it serves at once (the others wait inside it).
    pub capacity: Option<u64>,
    /// Time per call, ms.
    pub delay_ms: f64,
    /// Distinct credentials it was called with.
    pub credentials_called: u64,
    /// Calls answered in each second of the storm.
    pub calls_per_second_timeline: Vec<u64>,
}

/// The gateway's own counters over a storm (from its `/metrics`, when it
/// has them).
#[derive(Debug, Clone, Serialize)]
pub struct AdmissionGateway {
    /// `connections_refused_total{reason="admission_queue_full"}`.
    pub refused_queue_full: u64,
    /// `connections_refused_total{reason="admission_timeout"}`.
    pub refused_timeout: u64,
    /// `http_connections_closed_total{reason="pending_limit"}` (503 at
    /// accept, before any request was read).
    pub closed_pending_limit: u64,
    /// `bootstrap_coalesced_total`: connects that shared another's call.
    pub coalesced: u64,
    /// `auth_total{outcome="authorized"}`.
    pub authorized: u64,
    /// Largest `bootstrap_in_flight` seen (sampled every 200 ms).
    pub in_flight_max_sampled: u64,
    /// Largest `bootstrap_queued` seen (sampled every 200 ms).
    pub queued_max_sampled: u64,
}

/// One reconnect storm (`admission` scenario).
#[derive(Debug, Clone, Serialize)]
pub struct AdmissionReport {
    /// Name.
    pub name: String,
    /// `distinct`, `shared` or `grouped`.
    pub variant: String,
    /// The gateway (token removed).
    pub url: String,
    /// Clients.
    pub clients: u64,
    /// Distinct credentials among them.
    pub credentials: u64,
    /// Connected and authorised.
    pub connected: u64,
    /// Not connected within the storm's time (or refused for good).
    pub failed: u64,
    /// Authorised with rooms that were not computed for their credential.
    pub wrong_answers: u64,
    /// From the start to the last client authorised.
    pub seconds: f64,
    /// `connected / seconds`.
    pub connects_per_second: Option<f64>,
    /// Per client: first attempt → authorised.
    pub latency_ms: Latency,
    /// Attempts, all clients.
    pub attempts: u64,
    /// Most attempts one client needed.
    pub attempts_max: u64,
    /// Upgrades answered 503.
    pub refusals_503: u64,
    /// Non-101 answers by `"<status> <first line of the body>"`.
    pub refusals: BTreeMap<String, u64>,
    /// `Retry-After` values received (seconds → count).
    pub retry_after_seconds: BTreeMap<String, u64>,
    /// Clients authorised in each second of the storm.
    pub connected_per_second: Vec<u64>,
    /// The bundled backend.
    pub backend: AdmissionBackend,
    /// The gateway's counters, if it exposes them.
    pub gateway: Option<AdmissionGateway>,
    /// Gateway CPU during the storm.
    pub server_cpu_seconds: Option<f64>,
    /// Gateway's largest RSS during the storm.
    pub server_rss_max_kib: Option<u64>,
    /// Other problems, by kind (each retried unless it says otherwise).
    pub errors: BTreeMap<String, u64>,
    /// The bench's CPU (clients and the bundled backend) until every client was done.
    pub bench_cpu_seconds: Option<f64>,
    /// Wall time until every client was done.
    pub wall_seconds: f64,
}

impl AdmissionReport {
    /// Correctness problems (empty: correct).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.failed > 0 {
            problems.push(format!("admission {}: {}/{} clients not connected", self.name, self.failed, self.clients));
        }
        if self.backend.peak_concurrent > self.backend.max_concurrent {
            problems.push(format!(
                "admission {}: the backend had {} calls at once, over the gateway's cap of {}",
                self.name, self.backend.peak_concurrent, self.backend.max_concurrent
            ));
        }
        if self.wrong_answers > 0 {
            problems.push(format!(
                "admission {}: {} clients authorised with another credential's rooms",
                self.name, self.wrong_answers
            ));
        }
        problems
    }
}

/// The storms side by side.
fn admission_table(out: &mut String, storms: &[AdmissionReport]) {
    let row = |out: &mut String, label: &str, f: &dyn Fn(&AdmissionReport) -> String| {
        let _ = write!(out, "  {label:<34}");
        for s in storms {
            let _ = write!(out, " {:>16}", f(s));
        }
        let _ = writeln!(out);
    };
    let _ = writeln!(
        out,
        "
admission storms"
    );
    row(out, "variant", &|s| s.name.clone());
    row(out, "clients / credentials", &|s| format!("{}/{}", s.clients, s.credentials));
    row(out, "connected", &|s| s.connected.to_string());
    row(out, "seconds (to last authorised)", &|s| format!("{:.2}", s.seconds));
    row(out, "connects/s", &|s| opt(s.connects_per_second, 0));
    row(out, "connect p50 ms (first attempt →)", &|s| opt(s.latency_ms.p50, 0));
    row(out, "connect p90 ms", &|s| opt(s.latency_ms.p90, 0));
    row(out, "connect p99 ms", &|s| opt(s.latency_ms.p99, 0));
    row(out, "connect max ms", &|s| opt(s.latency_ms.max, 0));
    row(out, "attempts (max per client)", &|s| format!("{} ({})", s.attempts, s.attempts_max));
    row(out, "503 refusals", &|s| s.refusals_503.to_string());
    row(out, "backend calls", &|s| s.backend.calls.to_string());
    row(out, "backend calls/s", &|s| opt(s.backend.calls_per_second, 0));
    row(out, "backend peak at once (cap)", &|s| {
        format!(
            "{} (≤ {}){}",
            s.backend.peak_concurrent,
            s.backend.max_concurrent,
            if s.backend.peak_concurrent > s.backend.max_concurrent { " OVER" } else { "" }
        )
    });
    row(out, "backend credentials called", &|s| s.backend.credentials_called.to_string());
    let gw = |f: fn(&AdmissionGateway) -> u64| {
        move |s: &AdmissionReport| s.gateway.as_ref().map_or("-".to_string(), |g| f(g).to_string())
    };
    row(out, "gateway refused: queue full", &gw(|g| g.refused_queue_full));
    row(out, "gateway refused: wait timeout", &gw(|g| g.refused_timeout));
    row(out, "gateway closed: pending limit", &gw(|g| g.closed_pending_limit));
    row(out, "gateway coalesced", &gw(|g| g.coalesced));
    row(out, "gateway in flight / queued max", &|s| {
        s.gateway.as_ref().map_or("-".to_string(), |g| format!("{}/{}", g.in_flight_max_sampled, g.queued_max_sampled))
    });
    row(out, "gateway CPU s", &|s| opt(s.server_cpu_seconds, 2));
    row(out, "gateway RSS max", &|s| kib(s.server_rss_max_kib));
    row(out, "bench CPU s (clients + backend)", &|s| opt(s.bench_cpu_seconds, 2));
    for s in storms {
        for (reason, n) in &s.refusals {
            let _ = writeln!(out, "  {} refused  {n} × {reason}", s.name);
        }
        if !s.retry_after_seconds.is_empty() {
            let shown: Vec<String> = s.retry_after_seconds.iter().map(|(k, v)| format!("{k}s: {v}")).collect();
            let _ = writeln!(out, "  {} Retry-After  {}", s.name, shown.join(", "));
        }
        let shown = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
        let _ = writeln!(out, "  {} authorised per second  {}", s.name, shown(&s.connected_per_second));
        let _ = writeln!(out, "  {} backend calls per second  {}", s.name, shown(&s.backend.calls_per_second_timeline));
        for (error, n) in &s.errors {
            let _ = writeln!(out, "  {} error    {n} × {error}", s.name);
        }
    }
}

/// The whole invocation's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `"high-templar-bench"`.
    pub tool: &'static str,
    /// Bench version.
    pub version: &'static str,
    /// Preset scenario, if one.
    pub scenario: Option<String>,
    /// Scale factor of the preset.
    pub scale: Option<f64>,
    /// Websocket URL (token removed).
    pub url: String,
    /// `http`, `amqp` or `centrifugo`, if triggers were sent.
    pub publish: Option<String>,
    /// The client protocol: `high-templar` (3.x) or `centrifugo`.
    pub protocol: &'static str,
    /// Bootstrap requests the bundled backend answered (when it ran).
    pub backend_requests: Option<u64>,
    /// Runs.
    pub runs: Vec<RunReport>,
    /// Reconnect storms (`admission` scenario).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub admission: Vec<AdmissionReport>,
    /// Scenario-specific figures.
    pub summary: Value,
    /// The hot steps beside the floor probe's (`--floor`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor: Option<FloorComparison>,
    /// Correctness problems (empty: zero lost, duplicated, unexpected;
    /// every connection and subscription succeeded).
    pub problems: Vec<String>,
    /// `problems` is empty.
    pub ok: bool,
}

/// `  <label> ok/requested in Ns = N/s, server CPU Ns[, N FAILED]`.
fn phase_line(out: &mut String, label: &str, p: &PhaseTiming) {
    let _ = writeln!(
        out,
        "  {label} {}/{} in {:.2}s = {}/s, server CPU {}s{}",
        p.ok,
        p.requested,
        p.seconds,
        opt(p.per_second, 0),
        opt(p.server_cpu_seconds, 2),
        if p.failed > 0 { format!(", {} FAILED", p.failed) } else { String::new() }
    );
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

fn kib(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{:.1} MiB", v as f64 / 1024.0))
}

impl Report {
    /// The plain-text summary.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "high-templar-bench {}{} against {} (publish: {})",
            self.scenario.as_deref().map_or("custom run".to_string(), |s| format!("scenario {s}")),
            self.scale.map_or(String::new(), |s| format!(" scale {s}")),
            self.url,
            self.publish.as_deref().unwrap_or("-")
        );
        for run in &self.runs {
            let _ = writeln!(out, "\nrun {} (rooms {})", run.name, run.spaces.join("; "));
            phase_line(&mut out, "connections  ", &run.connections);
            phase_line(&mut out, "subscriptions", &run.subscriptions);
            let v = &run.server;
            if v.pid.is_some() {
                let _ = writeln!(
                    out,
                    "  server rss    before {}, subscribed {}, after run {}, after close {}, max {}; {} bytes/connection",
                    kib(v.rss_before_kib),
                    kib(v.rss_after_subscribe_kib),
                    kib(v.rss_after_run_kib),
                    kib(v.rss_after_close_kib),
                    kib(v.rss_max_kib),
                    opt(v.bytes_per_connection, 0)
                );
                if v.hold_seconds > 0.0 {
                    let _ = writeln!(
                        out,
                        "  idle          {:.1}s held, server CPU {}% of a core",
                        v.hold_seconds,
                        opt(v.idle_cpu_percent, 2)
                    );
                }
            }
            if !run.steps.is_empty() {
                let _ = writeln!(
                    out,
                    "  {:<18} {:>9} {:>9} {:>11} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7} {:>6} {:>5} {:>5}",
                    "step",
                    "trig/s",
                    "triggers",
                    "deliveries",
                    "deliv/s",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "max ms",
                    "cpu us/tr",
                    "srv cpu%",
                    "bench%",
                    "lost",
                    "dup",
                    "unexp"
                );
                for st in &run.steps {
                    let _ = writeln!(
                        out,
                        "  {:<18} {:>9} {:>9} {:>11} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7} {:>6} {:>5} {:>5}{}{}",
                        st.name,
                        opt(st.trigger_rate, 0),
                        st.triggers,
                        st.received,
                        opt(st.deliveries_per_second, 0),
                        opt(st.latency_ms.p50, 2),
                        opt(st.latency_ms.p90, 2),
                        opt(st.latency_ms.p99, 2),
                        opt(st.latency_ms.max, 2),
                        opt(st.server_cpu_us_per_trigger, 1),
                        opt(st.server_cpu_percent, 0),
                        opt(st.bench_cpu_percent, 0),
                        st.lost,
                        st.duplicated,
                        st.unexpected,
                        if st.drained { "" } else { "  (not drained)" },
                        if st.bench_bound { "  BENCH-BOUND" } else { "" }
                    );
                }
            }
            let d = &run.deliveries;
            let _ = writeln!(
                out,
                "  deliveries    expected {}, received {}, lost {}, duplicated {}, unexpected {}{}",
                d.expected,
                d.received,
                d.lost,
                d.duplicated,
                d.unexpected,
                if d.foreign > 0 { format!(", foreign {}", d.foreign) } else { String::new() }
            );
            if let Some(slow) = &run.slow_clients {
                let _ = writeln!(
                    out,
                    "  slow clients  {} ({} subscribed, {} closed by the server, {} of them with a 1013 frame)",
                    slow.count, slow.subscribed, slow.closed_by_server, slow.closed_1013
                );
            }
            if let Some(churn) = &run.churn {
                let _ = writeln!(
                    out,
                    "  churn         {}/s: {} started, {} connected, {} subscribed ({} failed), setup p50 {} p99 {} ms, {} deliveries, {} duplicated",
                    churn.rate,
                    churn.attempted,
                    churn.connected,
                    churn.subscribes_ok,
                    churn.subscribes_failed,
                    opt(churn.setup_ms.p50, 1),
                    opt(churn.setup_ms.p99, 1),
                    churn.deliveries,
                    churn.duplicated
                );
            }
            for (error, n) in &run.errors {
                let _ = writeln!(out, "  error         {n} × {error}");
            }
            let _ =
                writeln!(out, "  bench         {:.1}s wall, {}s CPU", run.wall_seconds, opt(run.bench_cpu_seconds, 2));
        }
        if !self.admission.is_empty() {
            admission_table(&mut out, &self.admission);
        }
        if let Some(floor) = &self.floor {
            floor.text(&mut out);
        }
        if let Value::Object(summary) = &self.summary {
            if !summary.is_empty() {
                let _ = writeln!(out, "\nsummary");
                for (key, value) in summary {
                    let _ = writeln!(out, "  {key}: {value}");
                }
            }
        }
        let sum = |f: fn(&RunReport) -> u64| self.runs.iter().map(f).sum::<u64>();
        let storms = |f: fn(&AdmissionReport) -> u64| self.admission.iter().map(f).sum::<u64>();
        let _ = writeln!(
            out,
            "\ntotals: {}/{} connections, {}/{} subscriptions, {}/{} deliveries, {} lost, {} duplicated, {} unexpected",
            sum(|r| r.connections.ok) + storms(|s| s.connected),
            sum(|r| r.connections.requested) + storms(|s| s.clients),
            sum(|r| r.subscriptions.ok),
            sum(|r| r.subscriptions.requested),
            sum(|r| r.deliveries.received),
            sum(|r| r.deliveries.expected),
            sum(|r| r.deliveries.lost),
            sum(|r| r.deliveries.duplicated),
            sum(|r| r.deliveries.unexpected),
        );
        if self.ok && self.runs.is_empty() && !self.admission.is_empty() {
            let _ = writeln!(
                out,
                "correctness: OK (every storm client connected and authorised with its own rooms; the backend never had more calls at once than the gateway's cap)"
            );
        } else if self.ok {
            let _ = writeln!(
                out,
                "correctness: OK (no lost, duplicated or unexpected deliveries; all subscribes succeeded)"
            );
        } else {
            let _ = writeln!(out, "correctness: FAILED");
            for problem in &self.problems {
                let _ = writeln!(out, "  {problem}");
            }
        }
        out
    }
}
