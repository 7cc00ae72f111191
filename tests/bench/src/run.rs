//! One run: connect N clients, subscribe them, hold, publish the steps'
//! triggers, drain, stop, and check every delivery against what the
//! generator expected.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::Value;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::client::{self, ChurnOutcome, Ctx, Protocol, SlowOutcome, StableOutcome, Stage, Stats, Subscriptions, lock};
use crate::procstat::{self, delta};
use crate::publish::Publisher;
use crate::reader::Reader;
use crate::report::{
    ChurnReport, Counts, Deliveries, Latency, PhaseTiming, RunReport, ServerReport, SlowReport, StepReport,
};
use crate::rooms::{Rng, Room, RoomSpace, SubscriptionIndex};

/// How each connection's rooms are chosen.
#[derive(Debug, Clone)]
pub enum Layout {
    /// `per_conn` rooms drawn uniformly from the spaces (a space drawn
    /// uniformly for each); a share of them with `"*"` on the last key.
    Random {
        /// Subscriptions per connection.
        per_conn: usize,
        /// Share of wildcard subscriptions.
        wildcard_share: f64,
    },
    /// Connection i subscribes `{user: i}` and `{group: i / 10}` (the
    /// spaces must be `user` then `group`).
    UserGroup,
}

impl Layout {
    /// Subscriptions per connection.
    pub fn per_conn(&self) -> usize {
        match self {
            Layout::Random { per_conn, .. } => *per_conn,
            Layout::UserGroup => 2,
        }
    }

    /// The rooms of connection `index`.
    pub fn rooms(&self, index: usize, spaces: &[RoomSpace], rng: &mut Rng) -> Vec<Room> {
        match self {
            Layout::Random { per_conn, wildcard_share } => (0..*per_conn)
                .map(|_| {
                    let space = rng.below(spaces.len() as u64) as usize;
                    Room::random(space, &spaces[space], *wildcard_share, rng)
                })
                .collect(),
            Layout::UserGroup => vec![
                Room { space: 0, values: vec![Some(index as i64)] },
                Room { space: 1, values: vec![Some(index as i64 / 10)] },
            ],
        }
    }
}

/// The rooms of one trigger.
#[derive(Debug, Clone)]
pub struct TriggerShape {
    /// Rooms drawn per trigger.
    pub rooms: usize,
    /// Share of drawn rooms with `"*"` on the last key.
    pub wildcard_share: f64,
    /// List every value of a wildcard key instead of `"*"`.
    pub expand: bool,
}

/// A phase of triggers.
#[derive(Debug, Clone)]
pub struct StepSpec {
    /// Name in reports.
    pub name: String,
    /// Triggers per second; `None`: as fast as the publisher goes.
    pub rate: Option<f64>,
    /// How long to publish.
    pub duration: Duration,
    /// Stop after this many triggers, if sooner.
    pub max_triggers: Option<u64>,
    /// The rooms of each trigger.
    pub shape: TriggerShape,
    /// Size of each trigger's `data`, bytes.
    pub payload_bytes: usize,
}

/// Clients that connect, subscribe and leave during the steps.
#[derive(Debug, Clone)]
pub struct ChurnSpec {
    /// New clients per second.
    pub rate: f64,
    /// How long each stays.
    pub hold: Duration,
}

/// Everything a run does.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Name in reports.
    pub name: String,
    /// Stable connections.
    pub connections: usize,
    /// Room spaces (distinct key sets).
    pub spaces: Vec<RoomSpace>,
    /// How subscriptions are chosen.
    pub layout: Layout,
    /// Idle time after subscribing, before the steps (server CPU measured).
    pub hold: Duration,
    /// Trigger phases.
    pub steps: Vec<StepSpec>,
    /// Clients that subscribe like stable ones and then stop reading.
    pub slow_clients: usize,
    /// Connect/subscribe/disconnect clients during the steps.
    pub churn: Option<ChurnSpec>,
}

/// Settings shared by every run of an invocation.
#[derive(Debug, Clone)]
pub struct Options {
    /// Websocket URL with the token.
    pub url: String,
    /// The server's address.
    pub server: SocketAddr,
    /// Source addresses to spread connections over.
    pub sources: Vec<IpAddr>,
    /// Opening at once, at most.
    pub connect_concurrency: usize,
    /// Per connection: connect + upgrade + authorisation.
    pub connect_timeout: Duration,
    /// Per connection: all subscribe replies.
    pub subscribe_timeout: Duration,
    /// Whole connect phase, whole subscribe phase.
    pub phase_timeout: Duration,
    /// After a step's last trigger, longest wait for its deliveries.
    pub drain_timeout: Duration,
    /// Triggers in flight (HTTP requests or unconfirmed AMQP publishes).
    pub publish_window: usize,
    /// The server's pid, for RSS and CPU.
    pub server_pid: Option<u32>,
    /// Raw `ping` every so often.
    pub client_ping: Option<Duration>,
    /// The client protocol of the server.
    pub protocol: Protocol,
    /// PRNG seed.
    pub seed: u64,
    /// Progress lines on stderr.
    pub progress: bool,
}

/// Source addresses to spread `n` connections over: with a `base`, the `n`
/// IPv4 addresses from it on (`base`, `base`+1, …); without, loopback
/// 127.0.0.2 … 127.0.0.(n+1) (at most 250) when the server is on IPv4
/// loopback, and none (the kernel chooses) otherwise. None when `n` is 0.
pub fn source_addresses(server: &SocketAddr, n: usize, base: Option<Ipv4Addr>) -> Result<Vec<IpAddr>, String> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let Some(base) = base else {
        if !server.ip().is_loopback() || !server.is_ipv4() {
            return Ok(Vec::new());
        }
        return Ok((0..n.min(250)).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8))).collect());
    };
    if !server.is_ipv4() {
        return Err(format!("--source-base {base} is IPv4 and the server {server} is not"));
    }
    let first = u32::from(base);
    let last = u32::try_from(n - 1)
        .ok()
        .and_then(|extra| first.checked_add(extra))
        .ok_or_else(|| format!("--source-base {base} with --source-addrs {n}: past 255.255.255.255"))?;
    Ok((first..=last).map(|a| IpAddr::V4(Ipv4Addr::from(a))).collect())
}

fn progress(options: &Options, message: impl AsRef<str>) {
    if options.progress {
        eprintln!("[bench] {}", message.as_ref());
    }
}

/// Waits until `done() >= target` or `timeout`; prints progress every
/// second. Returns whether the target was reached.
async fn wait_for(options: &Options, what: &str, target: u64, timeout: Duration, done: impl Fn() -> u64) -> bool {
    let start = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let n = done();
        if n >= target {
            return true;
        }
        if start.elapsed() >= timeout {
            progress(options, format!("{what}: {n}/{target} after {:.1}s: giving up", start.elapsed().as_secs_f64()));
            return false;
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            progress(options, format!("{what}: {n}/{target}"));
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Samples the server's RSS every 100 ms, keeping the maximum.
fn spawn_rss_sampler(pid: Option<u32>, max: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> Option<JoinHandle<()>> {
    let pid = pid?;
    Some(tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            if let Some(kib) = procstat::rss_kib(pid) {
                max.fetch_max(kib, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }))
}

/// What the publisher side knows about the triggers it sent.
struct Ledger {
    /// Per trigger accepted, in order: its sequence number and the stable
    /// subscriptions it must reach. Triggers that reach the same set share
    /// it, so a hot room's step records one entry per trigger, not one per
    /// delivery; the per-subscription lists are built after the run
    /// ([`Ledger::expected_by_subscription`]), outside every measurement.
    triggers: Vec<(u32, Arc<[u32]>)>,
    /// Stable subscriptions, all connections.
    subscriptions: usize,
    /// Per sequence number: the step it belongs to.
    phase_of_seq: Vec<u32>,
    /// Deliveries expected, all steps.
    expected_total: u64,
    /// Per step: deliveries expected.
    expected_per_phase: Vec<u64>,
    /// Next sequence number.
    next_seq: u64,
}

impl Ledger {
    /// Records trigger `seq` as accepted, reaching `matched`.
    fn accepted(&mut self, seq: u64, matched: &[u32], phase: usize) {
        let reuse = self.triggers.last().filter(|(_, last)| **last == *matched).map(|(_, last)| last.clone());
        self.triggers.push((seq as u32, reuse.unwrap_or_else(|| matched.into())));
        self.expected_total += matched.len() as u64;
        self.expected_per_phase[phase] += matched.len() as u64;
    }

    /// Per stable subscription: the sequence numbers it must receive.
    fn expected_by_subscription(&self) -> Vec<Vec<u32>> {
        let mut expected = vec![Vec::new(); self.subscriptions];
        for (seq, matched) in &self.triggers {
            for &sub in matched.iter() {
                expected[sub as usize].push(*seq);
            }
        }
        expected
    }
}

/// Runs `spec`; `publisher` is needed when it has steps.
pub async fn run(spec: &RunSpec, options: &Options, publisher: Option<&Publisher>) -> Result<RunReport, String> {
    let wall = Instant::now();
    let bench_cpu0 = procstat::self_cpu_seconds();
    let mut rng = Rng::new(options.seed ^ fxhash(&spec.name));
    let spaces = &spec.spaces;
    let per_conn = spec.layout.per_conn();

    // Subscriptions of the stable clients: global id = conn * per_conn + local.
    let mut subscriptions: Vec<Room> = Vec::with_capacity(spec.connections * per_conn);
    let mut frames: Vec<Arc<Subscriptions>> = Vec::with_capacity(spec.connections + spec.slow_clients);
    for conn in 0..spec.connections + spec.slow_clients {
        let rooms = spec.layout.rooms(conn, spaces, &mut rng);
        let json: Vec<Value> = rooms.iter().map(|r| r.to_json(spaces)).collect();
        frames.push(Arc::new(Subscriptions::new(options.protocol, &json)?));
        if conn < spec.connections {
            subscriptions.extend(rooms);
        }
    }
    let mut index = SubscriptionIndex::new(spaces.len(), &subscriptions);

    let stats = Arc::new(Stats::new(spec.steps.len()));
    let ctx = Arc::new(Ctx {
        url: options.url.clone(),
        server: options.server,
        sources: options.sources.clone(),
        ws_config: WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_write_buffer_size(1 << 20)
            .max_message_size(Some(16 << 20)),
        connect_timeout: options.connect_timeout,
        subscribe_timeout: options.subscribe_timeout,
        epoch: Instant::now(),
        stats: stats.clone(),
        connect_permits: Arc::new(Semaphore::new(options.connect_concurrency.max(1))),
        client_ping: options.client_ping,
        protocol: options.protocol,
    });

    // Subscribed stable clients are read by one thread on epoll (the bench
    // must not be what a hot room measures); clients that ping keep their
    // own tasks.
    let reader = match options.client_ping {
        None => Some(Reader::start(ctx.clone()).map_err(|e| format!("reader thread: {e}"))?),
        Some(_) => None,
    };

    let before = procstat::sample(options.server_pid);
    let rss_max = Arc::new(AtomicU64::new(before.rss_kib.unwrap_or(0)));
    let sampler_stop = Arc::new(AtomicBool::new(false));
    let sampler = spawn_rss_sampler(options.server_pid, rss_max.clone(), sampler_stop.clone());

    // Connect.
    let total_clients = (spec.connections + spec.slow_clients) as u64;
    progress(options, format!("{}: connecting {} clients ({} slow)", spec.name, total_clients, spec.slow_clients));
    let (stage_tx, stage_rx) = watch::channel(Stage::Connect);
    let connect_start = Instant::now();
    let mut stable_handles: Vec<JoinHandle<StableOutcome>> = Vec::with_capacity(spec.connections);
    let mut slow_handles: Vec<JoinHandle<SlowOutcome>> = Vec::with_capacity(spec.slow_clients);
    for (conn, frames) in frames.iter().enumerate() {
        let (ctx, frames, stage) = (ctx.clone(), frames.clone(), stage_rx.clone());
        if conn < spec.connections {
            stable_handles.push(tokio::spawn(client::stable(ctx, conn, frames, stage, reader.clone())));
        } else {
            slow_handles.push(tokio::spawn(client::slow(ctx, conn, frames, stage, Duration::from_secs(2))));
        }
    }
    let connect_stats = stats.clone();
    wait_for(options, "connected", total_clients, options.phase_timeout, || {
        connect_stats.connected.load(Ordering::Relaxed) + connect_stats.connect_failed.load(Ordering::Relaxed)
    })
    .await;
    let connect_seconds = connect_start.elapsed().as_secs_f64();
    let connected_sample = procstat::sample(options.server_pid);
    let established = stats.connected.load(Ordering::Relaxed);
    let connect_failed = total_clients - established;
    progress(options, format!("{}: {established} connected in {connect_seconds:.2}s", spec.name));

    // Subscribe.
    let subscribe_start = Instant::now();
    let _ = stage_tx.send(Stage::Subscribe);
    let sub_stats = stats.clone();
    wait_for(options, "subscribed", total_clients, options.phase_timeout, || {
        sub_stats.subscribe_done.load(Ordering::Relaxed)
    })
    .await;
    let subscribe_seconds = subscribe_start.elapsed().as_secs_f64();
    let subscribes_ok = stats.subscribes_ok.load(Ordering::Relaxed);
    let subscribes_failed = total_clients * per_conn as u64 - subscribes_ok;
    let subscribes_failed_counted = stats.subscribes_failed.load(Ordering::Relaxed);
    progress(options, format!("{}: {subscribes_ok} subscriptions in {subscribe_seconds:.2}s", spec.name));
    let after_subscribe = procstat::sample(options.server_pid);

    // Hold.
    let mut idle_cpu_percent = None;
    if !spec.hold.is_zero() {
        progress(options, format!("{}: holding {:.1}s", spec.name, spec.hold.as_secs_f64()));
        let cpu0 = procstat::sample(options.server_pid).cpu_seconds;
        let t0 = Instant::now();
        tokio::time::sleep(spec.hold).await;
        let cpu1 = procstat::sample(options.server_pid).cpu_seconds;
        idle_cpu_percent = delta(cpu0, cpu1).map(|cpu| 100.0 * cpu / t0.elapsed().as_secs_f64());
    }

    // Churn, during the steps.
    let churn_stop = Arc::new(AtomicBool::new(false));
    let churn_task = spec.churn.clone().map(|churn| {
        let ctx = ctx.clone();
        let layout = spec.layout.clone();
        let spaces = spaces.clone();
        let stop = churn_stop.clone();
        let first_index = spec.connections + spec.slow_clients;
        let seed = rng.next_u64();
        tokio::spawn(churn_driver(ctx, churn, layout, spaces, stop, first_index, seed))
    });

    // Steps.
    let mut ledger = Ledger {
        triggers: Vec::new(),
        subscriptions: subscriptions.len(),
        phase_of_seq: Vec::new(),
        expected_total: 0,
        expected_per_phase: vec![0; spec.steps.len()],
        next_seq: 0,
    };
    let mut step_reports = Vec::with_capacity(spec.steps.len());
    for (phase, step) in spec.steps.iter().enumerate() {
        let publisher = publisher.ok_or_else(|| "a run with triggers needs a publisher".to_string())?;
        let report =
            run_step(phase, step, spec, options, &ctx, reader.as_deref(), publisher, &mut index, &mut ledger, &mut rng)
                .await;
        step_reports.push(report);
    }
    churn_stop.store(true, Ordering::Relaxed);
    let churn_outcomes = match churn_task {
        Some(task) => Some(task.await.map_err(|e| format!("churn driver: {e}"))?),
        None => None,
    };
    if !spec.steps.is_empty() {
        // Late duplicates or strays still count.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let after_steps = procstat::sample(options.server_pid);

    // Stop and collect.
    progress(options, format!("{}: stopping", spec.name));
    let _ = stage_tx.send(Stage::Stop);
    if let Some(reader) = &reader {
        reader.stop();
    }
    let mut outcomes = Vec::with_capacity(stable_handles.len());
    for handle in stable_handles {
        outcomes.push(handle.await.unwrap_or_default());
    }
    let mut slow_outcomes = Vec::with_capacity(slow_handles.len());
    for handle in slow_handles {
        slow_outcomes.push(handle.await.unwrap_or_default());
    }
    sampler_stop.store(true, Ordering::Relaxed);
    if let Some(sampler) = sampler {
        let _ = sampler.await;
    }
    let after_close = procstat::sample(options.server_pid);

    // Check every stable subscription: expected vs received.
    let phases = spec.steps.len();
    let mut per_phase = vec![Deliveries::default(); phases];
    let mut totals = Deliveries::default();
    let mut expected = ledger.expected_by_subscription();
    for (conn, outcome) in outcomes.iter_mut().enumerate() {
        totals.foreign += outcome.foreign;
        for (local, received) in outcome.received.iter_mut().enumerate() {
            let expected = &mut expected[conn * per_conn + local];
            check(expected, received, &ledger.phase_of_seq, &mut per_phase, &mut totals);
        }
    }
    for (i, d) in per_phase.iter().enumerate() {
        let report: &mut StepReport = &mut step_reports[i];
        report.lost = d.lost;
        report.duplicated = d.duplicated;
        report.unexpected = d.unexpected;
    }

    let errors: BTreeMap<String, u64> = lock(&stats.errors).clone();
    let churn = churn_outcomes.map(|outcomes| {
        let setup = lock(&stats.churn_setup).clone();
        let latency = lock(&stats.churn_latency).clone();
        ChurnReport {
            rate: spec.churn.as_ref().map_or(0.0, |c| c.rate),
            attempted: outcomes.len() as u64,
            connected: outcomes.iter().filter(|o| o.connected).count() as u64,
            subscribes_ok: stats.subscribes_ok.load(Ordering::Relaxed) - subscribes_ok,
            subscribes_failed: stats
                .subscribes_failed
                .load(Ordering::Relaxed)
                .saturating_sub(subscribes_failed_counted),
            deliveries: outcomes.iter().map(|o| o.deliveries).sum(),
            duplicated: outcomes.iter().map(|o| o.duplicated).sum(),
            setup_ms: Latency::from_histogram(&setup),
            latency_ms: Latency::from_histogram(&latency),
        }
    });
    let slow = (spec.slow_clients > 0).then(|| SlowReport {
        count: spec.slow_clients as u64,
        subscribed: slow_outcomes.iter().filter(|o| o.subscribed).count() as u64,
        closed_by_server: slow_outcomes.iter().filter(|o| o.closed_by_server).count() as u64,
        closed_1013: slow_outcomes.iter().filter(|o| o.close_code == Some(1013)).count() as u64,
    });
    let bytes_per_connection = match (before.rss_kib, after_subscribe.rss_kib) {
        (Some(a), Some(b)) if established > 0 => Some((b as f64 - a as f64) * 1024.0 / established as f64),
        _ => None,
    };
    let rss_max_kib = options.server_pid.map(|_| rss_max.load(Ordering::Relaxed).max(after_steps.rss_kib.unwrap_or(0)));
    Ok(RunReport {
        name: spec.name.clone(),
        spaces: spaces.iter().map(ToString::to_string).collect(),
        connections: PhaseTiming {
            requested: total_clients,
            ok: established,
            failed: connect_failed,
            seconds: connect_seconds,
            per_second: rate(established, connect_seconds),
            server_cpu_seconds: delta(before.cpu_seconds, connected_sample.cpu_seconds),
        },
        subscriptions: PhaseTiming {
            requested: total_clients * per_conn as u64,
            ok: subscribes_ok,
            failed: subscribes_failed,
            seconds: subscribe_seconds,
            per_second: rate(subscribes_ok, subscribe_seconds),
            server_cpu_seconds: delta(connected_sample.cpu_seconds, after_subscribe.cpu_seconds),
        },
        server: ServerReport {
            pid: options.server_pid,
            rss_before_kib: before.rss_kib,
            rss_after_subscribe_kib: after_subscribe.rss_kib,
            rss_after_run_kib: after_steps.rss_kib,
            rss_after_close_kib: after_close.rss_kib,
            rss_max_kib,
            bytes_per_connection,
            hold_seconds: spec.hold.as_secs_f64(),
            idle_cpu_percent,
        },
        steps: step_reports,
        deliveries: Counts {
            expected: ledger.expected_total,
            received: stats.received.load(Ordering::Relaxed),
            lost: totals.lost,
            duplicated: totals.duplicated,
            unexpected: totals.unexpected,
            foreign: totals.foreign,
        },
        slow_clients: slow,
        churn,
        errors,
        bench_cpu_seconds: delta(bench_cpu0, procstat::self_cpu_seconds()),
        wall_seconds: wall.elapsed().as_secs_f64(),
    })
}

/// Per-subscription check: sorts both lists and walks them together.
fn check(
    expected: &mut [u32],
    received: &mut [u32],
    phase_of_seq: &[u32],
    per_phase: &mut [Deliveries],
    totals: &mut Deliveries,
) {
    expected.sort_unstable();
    received.sort_unstable();
    let phase = |seq: u32| phase_of_seq.get(seq as usize).map(|&p| p as usize);
    let mut count = |seq: u32, what: fn(&mut Deliveries) -> &mut u64| {
        *what(totals) += 1;
        if let Some(d) = phase(seq).and_then(|p| per_phase.get_mut(p)) {
            *what(d) += 1;
        }
    };
    let (mut i, mut j) = (0, 0);
    while i < expected.len() || j < received.len() {
        if j > 0 && j < received.len() && received[j] == received[j - 1] {
            count(received[j], |d| &mut d.duplicated);
            j += 1;
            continue;
        }
        match (expected.get(i), received.get(j)) {
            (Some(&e), Some(&r)) if e == r => {
                i += 1;
                j += 1;
            }
            (Some(&e), Some(&r)) if e < r => {
                count(e, |d| &mut d.lost);
                i += 1;
            }
            (Some(&e), None) => {
                count(e, |d| &mut d.lost);
                i += 1;
            }
            (_, Some(&r)) => {
                count(r, |d| &mut d.unexpected);
                j += 1;
            }
            (None, None) => break,
        }
    }
}

fn rate(n: u64, seconds: f64) -> Option<f64> {
    (seconds > 0.0).then(|| n as f64 / seconds)
}

/// A stable hash of a name, to derive per-run seeds.
fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Draws a trigger's rooms.
fn trigger_rooms(shape: &TriggerShape, spaces: &[RoomSpace], rng: &mut Rng) -> Vec<Room> {
    let mut rooms = Vec::with_capacity(shape.rooms);
    for _ in 0..shape.rooms.max(1) {
        let space = rng.below(spaces.len() as u64) as usize;
        let room = Room::random(space, &spaces[space], shape.wildcard_share, rng);
        if shape.expand {
            rooms.extend(room.expand_last(spaces));
        } else {
            rooms.push(room);
        }
    }
    rooms
}

/// Publishes one step's triggers, waits for their deliveries, measures.
#[allow(clippy::too_many_arguments)]
async fn run_step(
    phase: usize,
    step: &StepSpec,
    spec: &RunSpec,
    options: &Options,
    ctx: &Ctx,
    reader: Option<&Reader>,
    publisher: &Publisher,
    index: &mut SubscriptionIndex,
    ledger: &mut Ledger,
    rng: &mut Rng,
) -> StepReport {
    let spaces = &spec.spaces;
    progress(
        options,
        format!(
            "{}: step {} ({} for {:.1}s)",
            spec.name,
            step.name,
            step.rate.map_or("max rate".to_string(), |r| format!("{r}/s")),
            step.duration.as_secs_f64()
        ),
    );
    let server0 = procstat::sample(options.server_pid).cpu_seconds;
    let bench0 = procstat::self_cpu_seconds();
    let reader0 = reader.and_then(Reader::cpu_seconds);
    let start = tokio::time::Instant::now();
    let start_us = ctx.now_us();
    let end = start + step.duration;
    let window = options.publish_window.max(1);
    let mut inflight = FuturesUnordered::new();
    let (mut sent, mut ok, mut failed) = (0u64, 0u64, 0u64);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut matched = Vec::new();
    let mut on_done = |(seq, rooms, result): (u64, Vec<Room>, Result<(), String>), ledger: &mut Ledger| match result {
        Ok(()) => {
            ok += 1;
            index.matches(&rooms, &mut matched);
            ledger.accepted(seq, &matched, phase);
        }
        Err(e) => {
            failed += 1;
            *errors.entry(e).or_insert(0) += 1;
        }
    };
    loop {
        let now = tokio::time::Instant::now();
        let sending = now < end && step.max_triggers.is_none_or(|m| sent < m);
        if !sending && inflight.is_empty() {
            break;
        }
        if sending && inflight.len() < window {
            let due = step.rate.map_or(now, |r| start + Duration::from_secs_f64(sent as f64 / r));
            if due <= now {
                let rooms = trigger_rooms(&step.shape, spaces, rng);
                let rooms_json: Vec<Value> = rooms.iter().map(|r| r.to_json(spaces)).collect();
                let seq = ledger.next_seq;
                ledger.next_seq += 1;
                ledger.phase_of_seq.push(phase as u32);
                let send = publisher.trigger(&rooms_json, seq, ctx.now_us(), phase, step.payload_bytes);
                inflight.push(async move { (seq, rooms, send.await) });
                sent += 1;
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due.min(end)) => {}
                Some(done) = inflight.next() => on_done(done, ledger),
            }
        } else {
            tokio::select! {
                Some(done) = inflight.next() => on_done(done, ledger),
                _ = tokio::time::sleep_until(end), if sending => {}
            }
        }
    }
    let send_seconds = start.elapsed().as_secs_f64();
    for (e, n) in errors {
        *lock(&ctx.stats.errors).entry(e).or_insert(0) += n;
    }

    // Drain: until every expected delivery arrived, or the timeout.
    let drain_start = Instant::now();
    let expected_total = ledger.expected_total;
    let drained = wait_for(options, "delivered", expected_total, options.drain_timeout, || {
        ctx.stats.received.load(Ordering::Relaxed)
    })
    .await;
    let drain_seconds = drain_start.elapsed().as_secs_f64();
    let server1 = procstat::sample(options.server_pid).cpu_seconds;
    let bench1 = procstat::self_cpu_seconds();
    let reader1 = reader.and_then(Reader::cpu_seconds);
    let wall = start.elapsed().as_secs_f64();
    let bench_cpu_percent = delta(bench0, bench1).map(|c| 100.0 * c / wall);
    let reader_cpu_percent = delta(reader0, reader1).map(|c| 100.0 * c / wall);

    let (latency, received, last_us) = {
        let phases = lock(&ctx.stats.phases);
        let p = &phases[phase];
        (Latency::from_histogram(&p.latency), p.count, p.last_us)
    };
    let server_cpu = delta(server0, server1);
    let delivery_seconds = last_us.saturating_sub(start_us) as f64 / 1e6;
    let expected = ledger.expected_per_phase[phase];
    StepReport {
        name: step.name.clone(),
        target_rate: step.rate,
        payload_bytes: step.payload_bytes,
        seconds: send_seconds,
        triggers: ok,
        triggers_failed: failed,
        trigger_rate: rate(ok, send_seconds),
        expected,
        received,
        lost: 0,
        duplicated: 0,
        unexpected: 0,
        deliveries_per_second: rate(received, delivery_seconds),
        drained,
        drain_seconds,
        latency_ms: latency,
        server_cpu_seconds: server_cpu,
        server_cpu_percent: server_cpu.map(|c| 100.0 * c / wall),
        server_cpu_us_per_trigger: server_cpu.filter(|_| ok > 0).map(|c| c * 1e6 / ok as f64),
        server_cpu_us_per_delivery: server_cpu.filter(|_| expected > 0).map(|c| c * 1e6 / expected as f64),
        bench_cpu_percent,
        reader_cpu_percent,
        bench_bound: bench_bound(bench_cpu_percent, reader_cpu_percent, procstat::allowed_cpus()),
    }
}

/// Share of a core (%) from which the bench counts as saturated.
pub const SATURATED_PERCENT: f64 = 90.0;

/// Whether a step's figures may be the bench's rather than the server's:
/// the reading thread, or the whole bench over the `cpus` it may run on, at
/// [`SATURATED_PERCENT`] or more.
fn bench_bound(bench_percent: Option<f64>, reader_percent: Option<f64>, cpus: usize) -> bool {
    reader_percent.is_some_and(|p| p >= SATURATED_PERCENT)
        || bench_percent.is_some_and(|p| p >= SATURATED_PERCENT * cpus.max(1) as f64)
}

/// Starts churn clients at `spec.rate` per second until `stop`; returns
/// their outcomes once all ended.
async fn churn_driver(
    ctx: Arc<Ctx>,
    spec: ChurnSpec,
    layout: Layout,
    spaces: Vec<RoomSpace>,
    stop: Arc<AtomicBool>,
    first_index: usize,
    seed: u64,
) -> Vec<ChurnOutcome> {
    let mut rng = Rng::new(seed);
    let mut handles = Vec::new();
    let start = tokio::time::Instant::now();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let due = start + Duration::from_secs_f64(n as f64 / spec.rate.max(0.001));
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due.min(tokio::time::Instant::now() + Duration::from_millis(50))).await;
            continue;
        }
        let index = first_index + n;
        let rooms = layout.rooms(index, &spaces, &mut rng);
        let json: Vec<Value> = rooms.iter().map(|r| r.to_json(&spaces)).collect();
        // The stable clients' rooms were accepted, and churn draws from the same layout.
        let Ok(frames) = Subscriptions::new(ctx.protocol, &json) else {
            ctx.stats.error("churn: a room this protocol cannot have");
            n += 1;
            continue;
        };
        handles.push(tokio::spawn(client::churn(ctx.clone(), index, Arc::new(frames), spec.hold)));
        n += 1;
    }
    let mut outcomes = Vec::with_capacity(handles.len());
    for handle in handles {
        outcomes.push(handle.await.unwrap_or_default());
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_shares_a_repeated_match_set_and_expands_it_after_the_run() {
        let mut ledger = Ledger {
            triggers: Vec::new(),
            subscriptions: 4,
            phase_of_seq: Vec::new(),
            expected_total: 0,
            expected_per_phase: vec![0; 2],
            next_seq: 0,
        };
        ledger.accepted(0, &[0, 2, 3], 0);
        ledger.accepted(1, &[0, 2, 3], 0);
        ledger.accepted(2, &[1], 1);
        ledger.accepted(3, &[0, 2, 3], 1);
        assert!(Arc::ptr_eq(&ledger.triggers[0].1, &ledger.triggers[1].1), "the same set is kept once");
        assert!(!Arc::ptr_eq(&ledger.triggers[0].1, &ledger.triggers[3].1), "only the last set is compared");
        assert_eq!(ledger.expected_total, 10);
        assert_eq!(ledger.expected_per_phase, vec![6, 4]);
        assert_eq!(ledger.expected_by_subscription(), vec![vec![0, 1, 3], vec![2], vec![0, 1, 3], vec![0, 1, 3]]);
    }

    #[test]
    fn check_counts_lost_duplicated_unexpected() {
        let phase_of_seq = vec![0, 0, 1, 1, 1];
        let mut per_phase = vec![Deliveries::default(); 2];
        let mut totals = Deliveries::default();
        let mut expected = vec![3, 0, 1, 2];
        let mut received = vec![1, 0, 1, 4, 3, 1];
        check(&mut expected, &mut received, &phase_of_seq, &mut per_phase, &mut totals);
        assert_eq!((totals.lost, totals.duplicated, totals.unexpected), (1, 2, 1));
        assert_eq!((per_phase[0].lost, per_phase[0].duplicated, per_phase[0].unexpected), (0, 2, 0));
        assert_eq!((per_phase[1].lost, per_phase[1].duplicated, per_phase[1].unexpected), (1, 0, 1));
    }

    #[test]
    fn source_addresses_only_on_loopback() {
        let local: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let sources = source_addresses(&local, 3, None).expect("no base");
        assert_eq!(sources.len(), 3);
        assert_eq!(sources[0].to_string(), "127.0.0.2");
        assert!(source_addresses(&local, 0, None).expect("no base").is_empty());
        assert!(source_addresses(&"[::1]:8080".parse().expect("addr"), 3, None).expect("no base").is_empty());
        let veth: SocketAddr = "10.203.0.1:8080".parse().expect("addr");
        assert!(source_addresses(&veth, 3, None).expect("no base").is_empty());
    }

    #[test]
    fn source_addresses_from_a_base() {
        let veth: SocketAddr = "10.203.0.1:8080".parse().expect("addr");
        let base = Some(Ipv4Addr::new(10, 203, 0, 3));
        let sources = source_addresses(&veth, 16, base).expect("fits");
        let shown: Vec<String> = sources.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 16);
        assert_eq!((shown[0].as_str(), shown[15].as_str()), ("10.203.0.3", "10.203.0.18"));
        // Past the last octet it carries on into the next one.
        let sources = source_addresses(&veth, 2, Some(Ipv4Addr::new(10, 0, 0, 255))).expect("fits");
        assert_eq!(sources[1].to_string(), "10.0.1.0");
        assert!(source_addresses(&veth, 0, base).expect("none").is_empty());
        assert!(source_addresses(&veth, 2, Some(Ipv4Addr::BROADCAST)).is_err());
        assert!(source_addresses(&"[::1]:8080".parse().expect("addr"), 2, base).is_err());
    }

    #[test]
    fn user_group_layout() {
        let spaces = vec![RoomSpace::single("user", 100), RoomSpace::single("group", 10)];
        let rooms = Layout::UserGroup.rooms(42, &spaces, &mut Rng::new(1));
        assert_eq!(rooms[0].to_json(&spaces), serde_json::json!({"user": 42}));
        assert_eq!(rooms[1].to_json(&spaces), serde_json::json!({"group": 4}));
    }
}
