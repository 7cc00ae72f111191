//! `high-templar-bench`: a load generator for websocket gateways speaking
//! the high-templar 3.x protocol (this project's gateway, or the original
//! Python high-templar).
//!
//! It opens many websocket clients, subscribes them to rooms, publishes
//! triggers over AMQP or `POST /trigger`, and measures connection and
//! subscribe rates, server memory and CPU, deliveries per second and
//! trigger → delivery latency, while checking that every subscription
//! received exactly the triggers the 3.x delivery rule says it must.
//! See `tests/bench/README.md`.

mod admission;
mod backend;
mod centrifugo;
mod client;
mod floor;
mod procstat;
mod publish;
mod reader;
mod report;
mod rooms;
mod run;
mod scenarios;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::client::Protocol;
use crate::publish::Publisher;
use crate::report::Report;
use crate::rooms::RoomSpace;
use crate::run::{ChurnSpec, Layout, Options, RunSpec, StepSpec, TriggerShape};
use crate::scenarios::Scenario;

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "high-templar-bench",
    version,
    about = "Load generator for high-templar 3.x-compatible websocket gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve only the bundled backend (GET …/bootstrap/ → allowed_rooms) until interrupted.
    ServeBackend(ServeBackendArgs),
    /// A run shaped by flags.
    Run(RunArgs),
    /// A preset scenario (see README): idle, hot, sparse, wildcard, storm, churn, admission.
    Scenario(ScenarioArgs),
    /// Print the hot scenario's shape at --scale for the floor probe (tests/bench/floor):
    /// "<connections> <rate,rate,…> <seconds per step> <payload bytes>".
    FloorSpec(FloorSpecArgs),
}

#[derive(Debug, Args)]
struct FloorSpecArgs {
    /// The hot scenario's --scale.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
}

#[derive(Debug, Args)]
struct ServeBackendArgs {
    /// Address to listen on.
    #[arg(long, env = "HTB_BACKEND_LISTEN", default_value = "127.0.0.1:8001")]
    listen: SocketAddr,
    /// An allowed room (JSON object, or a JSON list of them); repeatable.
    /// Default: wildcards for every preset's key sets.
    #[arg(long = "allow", value_name = "JSON")]
    allow: Vec<String>,
}

/// How triggers are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PublishKind {
    /// `POST /trigger` with `Authorization: Bearer <token>`.
    Http,
    /// AMQP `basic_publish` to the exchange, routing key `*` (like 3.x publishers).
    Amqp,
    /// Centrifugo's server HTTP API (`POST /api/publish` or `/api/broadcast`,
    /// `X-API-Key: <--trigger-token>`); needs `--protocol centrifugo`.
    Centrifugo,
}

/// Client protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProtocolKind {
    /// high-templar 3.x (this project's gateway, the Python 3.1.0).
    HighTemplar,
    /// Centrifugo's JSON protocol (connect, subscribe to one channel per
    /// room `key=value,…`, publications pushed by channel); needs
    /// `--publish centrifugo` and a URL ending in `/connection/websocket`.
    Centrifugo,
}

/// Flags shared by `run` and `scenario`.
#[derive(Debug, Args)]
struct CommonArgs {
    /// Websocket endpoint of the server under test.
    #[arg(long, env = "HTB_URL", default_value = "ws://127.0.0.1:8080/ws/")]
    url: String,
    /// Token sent as `?token=` (the gateway forwards it to the backend).
    #[arg(long, env = "HTB_TOKEN", default_value = "bench")]
    token: String,
    /// The server's client protocol.
    #[arg(long, env = "HTB_PROTOCOL", value_enum, default_value_t = ProtocolKind::HighTemplar)]
    protocol: ProtocolKind,
    /// How to publish triggers.
    #[arg(long, env = "HTB_PUBLISH", value_enum, default_value_t = PublishKind::Http)]
    publish: PublishKind,
    /// Trigger endpoint for --publish http [default: http://<host:port of --url>/trigger]; the API prefix
    /// for --publish centrifugo [default: http://<host:port of --url>/api].
    #[arg(long, env = "HTB_TRIGGER_URL")]
    trigger_url: Option<String>,
    /// Bearer token of POST /trigger; the API key with --publish centrifugo.
    #[arg(long, env = "HTB_TRIGGER_TOKEN", hide_env_values = true)]
    trigger_token: Option<String>,
    /// RabbitMQ URL for --publish amqp.
    #[arg(long, env = "HTB_AMQP_URL", hide_env_values = true, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Exchange for --publish amqp.
    #[arg(long, env = "HTB_EXCHANGE", default_value = "hightemplar")]
    exchange: String,
    /// Triggers in flight at once (HTTP requests, or unconfirmed AMQP publishes).
    #[arg(long, default_value_t = 64)]
    publish_window: usize,
    /// Also run the bundled backend on this address for the run's duration.
    #[arg(long, env = "HTB_SERVE_BACKEND", value_name = "ADDR")]
    serve_backend: Option<SocketAddr>,
    /// Allowed room for the bundled backend (JSON object or list); repeatable.
    /// Default: wildcards for the run's key sets and every preset's.
    #[arg(long = "allow", value_name = "JSON")]
    allow: Vec<String>,
    /// PID of the server process, for RSS (/proc/PID/status) and CPU (/proc/PID/stat).
    #[arg(long, env = "HTB_SERVER_PID")]
    server_pid: Option<u32>,
    /// Spread connections over N source addresses (0: the kernel's choice): 127.0.0.2 … 127.0.0.(N+1),
    /// or N from --source-base on.
    #[arg(long, default_value_t = 16)]
    source_addrs: usize,
    /// First of the --source-addrs addresses (IPv4; each must be an address of this machine), for a server
    /// off loopback but on this machine, e.g. in a network namespace behind a veth pair (scenarios.sh
    /// --netns); a --url off loopback needs it. Default: 127.0.0.2, for a server on loopback.
    #[arg(long, value_name = "ADDR")]
    source_base: Option<Ipv4Addr>,
    /// Connections being opened at once, at most.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Seconds allowed per connection for connect + upgrade + authorisation.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Seconds allowed per connection for all its subscribe replies.
    #[arg(long, default_value_t = 30.0)]
    subscribe_timeout: f64,
    /// Seconds allowed for the whole connect phase, and for the whole subscribe phase.
    #[arg(long, default_value_t = 300.0)]
    phase_timeout: f64,
    /// Seconds to wait after a step's last trigger for its deliveries.
    #[arg(long, default_value_t = 10.0)]
    drain_timeout: f64,
    /// Send the raw `ping` text frame every this many seconds (0: never).
    #[arg(long, default_value_t = 0.0)]
    client_ping: f64,
    /// Seed of the room choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Raise this process's open-file limit to this (capped by the hard limit).
    #[arg(long, default_value_t = 1_048_576)]
    nofile: u64,
    /// Tokio worker threads (0: one per CPU this process may run on).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Print one JSON object on stdout (the text summary goes to stderr).
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
}

/// Subscription layouts of `run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LayoutKind {
    /// --subscriptions rooms per connection drawn at random from --rooms.
    Random,
    /// {user:i} and {group:i/10} for connection i (--rooms is ignored).
    UserGroup,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Stable connections.
    #[arg(long, short = 'n', default_value_t = 100)]
    connections: usize,
    /// Room space `key=N[,key=N…]` (values 0..N-1); repeatable for several key sets.
    #[arg(long = "rooms", value_name = "SPEC", default_values_t = ["room=1000".to_string()])]
    rooms: Vec<String>,
    /// How subscriptions are chosen.
    #[arg(long, value_enum, default_value_t = LayoutKind::Random)]
    layout: LayoutKind,
    /// Subscriptions per connection (random layout).
    #[arg(long, short = 'k', default_value_t = 1)]
    subscriptions: usize,
    /// Share of subscriptions with "*" on the last key of their space.
    #[arg(long, default_value_t = 0.0)]
    wildcard_share: f64,
    /// Triggers per second (0: as fast as possible).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Several steps at these rates (comma-separated), each --duration long; overrides --rate.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Seconds of publishing (per step).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Stop each step after this many triggers.
    #[arg(long)]
    triggers: Option<u64>,
    /// Rooms drawn per trigger.
    #[arg(long, default_value_t = 1)]
    trigger_rooms: usize,
    /// Share of trigger rooms with "*" on the last key.
    #[arg(long, default_value_t = 0.0)]
    trigger_wildcard_share: f64,
    /// Send a wildcard trigger room as the list of its concrete rooms instead.
    #[arg(long)]
    expand_wildcards: bool,
    /// Bytes of each trigger's data (padded).
    #[arg(long, default_value_t = 128)]
    payload_bytes: usize,
    /// Seconds to hold the subscribed connections idle before publishing.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Extra clients that subscribe like the others, then stop reading.
    #[arg(long, default_value_t = 0)]
    slow_clients: usize,
    /// Connect/subscribe/disconnect clients per second during the steps (0: none).
    #[arg(long, default_value_t = 0.0)]
    churn_rate: f64,
    /// Seconds each churn client stays connected.
    #[arg(long, default_value_t = 1.0)]
    churn_hold: f64,
    /// Run name in reports.
    #[arg(long, default_value = "custom")]
    name: String,
}

#[derive(Debug, Args)]
struct ScenarioArgs {
    /// Which preset.
    #[arg(value_enum)]
    name: Scenario,
    /// Multiply connection counts, room counts and durations by this (e.g. 0.01 runs in seconds).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// The floor probe's result (floor.json of tests/bench/floor, measured on this machine just before):
    /// the hot report then shows, per step, the gateway's CPU per delivery, p99 and deliveries/s beside the
    /// floor's, with the ratios (hot only).
    #[arg(long, value_name = "FILE")]
    floor: Option<std::path::PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    admission: AdmissionArgs,
}

/// Flags of the `admission` scenario (a reconnect storm).
#[derive(Debug, Args)]
#[command(next_help_heading = "Admission scenario")]
struct AdmissionArgs {
    /// Storms to run, in order: distinct (every client its own credential), shared (clients over
    /// --users users, tabs in random order), grouped (shared, each user's tabs back to back).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [admission::Variant::Distinct, admission::Variant::Shared])]
    variants: Vec<admission::Variant>,
    /// Gateway for the shared and grouped storms (one with backend.coalesce: true) [default: --url].
    #[arg(long, value_name = "URL")]
    coalesce_url: Option<String>,
    /// PID of the --coalesce-url gateway [default: --server-pid when there is no --coalesce-url].
    #[arg(long, value_name = "PID")]
    coalesce_server_pid: Option<u32>,
    /// Users the clients of the shared storms are shared out over [default: 500 × --scale].
    #[arg(long)]
    users: Option<usize>,
    /// Bootstrap calls the bundled backend serves at once (the others wait inside it).
    #[arg(long, default_value_t = 32)]
    backend_capacity: usize,
    /// Milliseconds each bootstrap call takes.
    #[arg(long, default_value_t = 20.0)]
    backend_delay_ms: f64,
    /// The gateway's backend.admission.maxConcurrent: the backend must never have more calls at once
    /// [default: --backend-capacity].
    #[arg(long)]
    max_concurrent: Option<u64>,
    /// Seconds each storm may take; clients not connected by then have failed.
    #[arg(long, default_value_t = 120.0)]
    storm_timeout: f64,
    /// Milliseconds of random jitter added to each Retry-After.
    #[arg(long, default_value_t = 250.0)]
    retry_jitter_ms: f64,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Makes ring the process's rustls provider. Built in the workspace,
/// reqwest has the gateway's `rustls-no-provider` feature and panics
/// building a client (even for `http://`) without one. Idempotent.
pub fn install_tls_provider() {
    // An error only means a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn main() -> ExitCode {
    install_tls_provider();
    let cli = Cli::parse();
    let workers = match &cli.command {
        Command::ServeBackend(_) | Command::FloorSpec(_) => 1,
        Command::Run(a) => a.common.workers,
        Command::Scenario(a) => a.common.workers,
    };
    let workers = if workers == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { workers };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("high-templar-bench: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::ServeBackend(args) => serve_backend(args).await,
            Command::Run(args) => custom_run(args).await,
            Command::Scenario(args) => scenario(args).await,
            Command::FloorSpec(args) => scenarios::floor_spec(args.scale).map(|line| {
                println!("{line}");
                ExitCode::SUCCESS
            }),
        }
    });
    // Clients still closing must not hold the exit.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("high-templar-bench: {e}");
            ExitCode::from(2)
        }
    }
}

async fn serve_backend(args: ServeBackendArgs) -> Result<ExitCode, String> {
    let mut allowed = backend::parse_allowed(&args.allow)?;
    if allowed.is_empty() {
        allowed = backend::default_allowed_rooms();
    }
    let backend = backend::start(args.listen, allowed.clone()).await?;
    eprintln!("high-templar-bench: backend on http://{}/ allowing {}", backend.addr, Value::Array(allowed));
    tokio::signal::ctrl_c().await.map_err(|e| format!("waiting for ctrl-c: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

async fn custom_run(args: RunArgs) -> Result<ExitCode, String> {
    let spaces = match args.layout {
        LayoutKind::Random => args.rooms.iter().map(|s| RoomSpace::parse(s)).collect::<Result<Vec<_>, _>>()?,
        LayoutKind::UserGroup => vec![
            RoomSpace::single("user", args.connections as u64),
            RoomSpace::single("group", args.connections.div_ceil(10) as u64),
        ],
    };
    for (i, a) in spaces.iter().enumerate() {
        let mut keys: Vec<&str> = a.keys.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        for b in &spaces[i + 1..] {
            let mut other: Vec<&str> = b.keys.iter().map(|(k, _)| k.as_str()).collect();
            other.sort_unstable();
            if keys == other {
                return Err(format!("--rooms {a} and {b}: each space needs its own key set"));
            }
        }
    }
    let layout = match args.layout {
        LayoutKind::Random => {
            Layout::Random { per_conn: args.subscriptions.max(1), wildcard_share: args.wildcard_share }
        }
        LayoutKind::UserGroup => Layout::UserGroup,
    };
    let shape = TriggerShape {
        rooms: args.trigger_rooms.max(1),
        wildcard_share: args.trigger_wildcard_share,
        expand: args.expand_wildcards,
    };
    let rates: Vec<f64> = if args.rates.is_empty() { vec![args.rate] } else { args.rates.clone() };
    let steps = if args.duration > 0.0 || args.triggers.is_some_and(|t| t > 0) {
        rates
            .iter()
            .map(|&r| StepSpec {
                name: if r > 0.0 { format!("{r}/s") } else { "max rate".to_string() },
                rate: (r > 0.0).then_some(r),
                duration: if args.duration > 0.0 { secs(args.duration) } else { Duration::from_secs(3600) },
                max_triggers: args.triggers,
                shape: shape.clone(),
                payload_bytes: args.payload_bytes,
            })
            .collect()
    } else {
        Vec::new()
    };
    let spec = RunSpec {
        name: args.name.clone(),
        connections: args.connections,
        spaces,
        layout,
        hold: secs(args.hold),
        steps,
        slow_clients: args.slow_clients,
        churn: (args.churn_rate > 0.0).then(|| ChurnSpec { rate: args.churn_rate, hold: secs(args.churn_hold) }),
    };
    execute(&args.common, vec![spec], None, None).await
}

async fn scenario(args: ScenarioArgs) -> Result<ExitCode, String> {
    if args.scale.is_nan() || args.scale <= 0.0 {
        return Err("--scale must be positive".into());
    }
    if args.floor.is_some() && args.name != Scenario::Hot {
        return Err("--floor applies to the hot scenario only".into());
    }
    if args.name == Scenario::Admission {
        return admission_scenario(&args).await;
    }
    let specs = scenarios::runs(args.name, args.scale);
    execute(&args.common, specs, Some((args.name, args.scale)), args.floor.as_deref()).await
}

/// Raises the open-file limit for `needed` connections (a warning when it
/// cannot).
/// An HTTP publisher's URL (`--trigger-url`, else `default_url`) and its
/// credential (`--trigger-token`; `missing` is the error without one).
fn http_publish_target(common: &CommonArgs, missing: &str, default_url: String) -> Result<(String, String), String> {
    let token = common.trigger_token.clone().ok_or_else(|| missing.to_string())?;
    Ok((common.trigger_url.clone().unwrap_or(default_url), token))
}

fn nofile_for(common: &CommonArgs, needed: usize) {
    match raise_nofile(common.nofile) {
        Ok(limit) => {
            if (limit as usize) < needed + 64 && !common.quiet {
                eprintln!("[bench] warning: open-file limit is {limit}, below the {needed} connections needed");
            }
        }
        Err(e) => eprintln!("[bench] warning: cannot raise the open-file limit: {e}"),
    }
}

/// The server address of `url` (which must be on loopback, or reached from
/// `--source-base`) and the source addresses to use.
async fn target(common: &CommonArgs, authority: &str) -> Result<(SocketAddr, Vec<IpAddr>), String> {
    let server = tokio::net::lookup_host(authority)
        .await
        .map_err(|e| format!("--url: cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("--url: {authority} resolves to nothing"))?;
    if !server.ip().is_loopback() && common.source_base.is_none() {
        return Err(format!(
            "--url: {server} is not a loopback address; the bench only targets this machine \
             (a server in a network namespace of this machine: give --source-base, an address of this side of the link)"
        ));
    }
    let sources = run::source_addresses(&server, common.source_addrs, common.source_base)?;
    if common.source_base.is_some() {
        check_sources(&sources)?;
    }
    Ok((server, sources))
}

/// The `admission` scenario: one reconnect storm per variant, against the
/// bench's own backend.
async fn admission_scenario(args: &ScenarioArgs) -> Result<ExitCode, String> {
    let (common, a) = (&args.common, &args.admission);
    let progress = !common.quiet;
    if common.protocol != ProtocolKind::HighTemplar {
        return Err(
            "scenario admission measures the 3.x gateway's admission control: --protocol high-templar only".into()
        );
    }
    let addr = common.serve_backend.ok_or(
        "scenario admission needs --serve-backend ADDR: the bench's own backend counts the calls the gateway makes \
         (point the gateway's backend.url at it)",
    )?;
    if a.variants.is_empty() {
        return Err("--variants: nothing to run".into());
    }
    let storms = scenarios::storms(&a.variants, args.scale, a.users);
    nofile_for(common, storms.iter().map(|s| s.clients).max().unwrap_or(0));
    let mut allowed = backend::parse_allowed(&common.allow)?;
    if allowed.is_empty() {
        allowed = vec![serde_json::json!({"user": "*"})];
    }
    let options = backend::BackendOptions {
        capacity: Some(a.backend_capacity.max(1)),
        delay: secs(a.backend_delay_ms / 1e3),
        per_credential: true,
    };
    let backend = backend::start_with(addr, allowed, options).await?;
    if progress {
        eprintln!(
            "[bench] backend on http://{}/ ({} calls at once, {} ms each)",
            backend.addr, a.backend_capacity, a.backend_delay_ms
        );
    }
    let mut reports = Vec::with_capacity(storms.len());
    for (i, storm) in storms.iter().enumerate() {
        let (url, server_pid) = match (&a.coalesce_url, storm.variant.shares()) {
            (Some(url), true) => (url.as_str(), a.coalesce_server_pid),
            _ => (
                common.url.as_str(),
                if storm.variant.shares() { a.coalesce_server_pid.or(common.server_pid) } else { common.server_pid },
            ),
        };
        let (authority, url_prefix) = parse_url(url, "")?;
        let (server, sources) = target(common, &authority).await?;
        let options = admission::StormOptions {
            url_prefix,
            metrics_url: format!("http://{authority}/metrics"),
            server,
            sources,
            server_pid,
            connect_timeout: secs(common.connect_timeout),
            timeout: secs(a.storm_timeout),
            jitter: secs(a.retry_jitter_ms / 1e3),
            max_concurrent: a.max_concurrent.unwrap_or(a.backend_capacity as u64),
            backend_capacity: Some(a.backend_capacity),
            backend_delay: secs(a.backend_delay_ms / 1e3),
            seed: common.seed.wrapping_add(i as u64),
            progress,
        };
        reports.push(admission::run(storm, options, &backend.stats).await?);
        // Let the gateway settle (closed connections freed) between storms.
        if i + 1 < storms.len() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let problems: Vec<String> = reports.iter().flat_map(|r| r.problems()).collect();
    let report = Report {
        tool: "high-templar-bench",
        version: env!("CARGO_PKG_VERSION"),
        scenario: Some(Scenario::Admission.name().to_string()),
        scale: Some(args.scale),
        url: common.url.clone(),
        publish: None,
        protocol: protocol_name(Protocol::HighTemplar),
        backend_requests: Some(reports.iter().map(|r| r.backend.calls).sum()),
        runs: Vec::new(),
        summary: admission::summary(&reports),
        floor: None,
        admission: reports,
        ok: problems.is_empty(),
        problems,
    };
    print_report(&report, common.json)
}

/// The report's name of `protocol`.
fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::HighTemplar => "high-templar",
        Protocol::Centrifugo => "centrifugo",
    }
}

fn print_report(report: &Report, json: bool) -> Result<ExitCode, String> {
    if json {
        eprint!("{}", report.text());
        println!("{}", serde_json::to_string(report).map_err(|e| format!("JSON: {e}"))?);
    } else {
        print!("{}", report.text());
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Raises the open-file limit to `want`: soft and hard when allowed (root
/// may raise the hard limit), else the soft limit up to the hard one.
/// Returns the soft limit in force.
fn raise_nofile(want: u64) -> std::io::Result<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft >= want {
        return Ok(soft);
    }
    if hard < want && rlimit::Resource::NOFILE.set(want, want).is_ok() {
        return Ok(want);
    }
    rlimit::increase_nofile_limit(want)
}

/// `ws://host:port/path` → (host:port, the URL with `token` added).
fn parse_url(url: &str, token: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("--url {url:?}: only ws:// URLs are supported (no TLS in the bench)"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("--url {url:?}: no host"));
    }
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let with_path = if rest.contains('/') { url.to_string() } else { format!("{url}/") };
    let encoded: String = token
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let separator = if with_path.contains('?') { '&' } else { '?' };
    Ok((authority, format!("{with_path}{separator}token={encoded}")))
}

/// Every source address given with --source-base can be bound: it is an
/// address of this machine (bound to port 0, released at once).
fn check_sources(sources: &[IpAddr]) -> Result<(), String> {
    for &source in sources {
        let socket = match source {
            IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .map_err(|e| format!("socket: {e}"))?;
        socket.bind(SocketAddr::new(source, 0)).map_err(|e| {
            format!("--source-base: cannot bind source address {source} ({e}); is it an address of this machine?")
        })?;
    }
    Ok(())
}

async fn execute(
    common: &CommonArgs,
    specs: Vec<RunSpec>,
    preset: Option<(Scenario, f64)>,
    floor: Option<&std::path::Path>,
) -> Result<ExitCode, String> {
    let progress = !common.quiet;
    nofile_for(common, specs.iter().map(|s| s.connections + s.slow_clients).max().unwrap_or(0));
    let (authority, url) = parse_url(&common.url, &common.token)?;
    let (server, sources) = target(common, &authority).await?;

    // The bundled backend, when asked for.
    let backend = match common.serve_backend {
        Some(addr) => {
            let mut allowed = backend::parse_allowed(&common.allow)?;
            if allowed.is_empty() {
                allowed = backend::default_allowed_rooms();
                for spec in &specs {
                    for space in &spec.spaces {
                        let room = space.all_wildcard();
                        if !allowed.contains(&room) {
                            allowed.push(room);
                        }
                    }
                }
            }
            let backend = backend::start(addr, allowed).await?;
            if progress {
                eprintln!("[bench] backend on http://{}/", backend.addr);
            }
            Some(backend)
        }
        None => None,
    };

    let publishes = specs.iter().any(|s| !s.steps.is_empty());
    let protocol = match common.protocol {
        ProtocolKind::HighTemplar => Protocol::HighTemplar,
        ProtocolKind::Centrifugo => Protocol::Centrifugo,
    };
    if protocol == Protocol::Centrifugo {
        if publishes && common.publish != PublishKind::Centrifugo {
            return Err("--protocol centrifugo publishes with --publish centrifugo only".into());
        }
        if common.client_ping > 0.0 {
            return Err("--client-ping sends the 3.x raw `ping`, which Centrifugo refuses; \
                        its own pings are answered without it"
                .into());
        }
    } else if publishes && common.publish == PublishKind::Centrifugo {
        return Err("--publish centrifugo needs --protocol centrifugo".into());
    }
    let publisher = if publishes {
        Some(match common.publish {
            PublishKind::Http => {
                let (url, token) = http_publish_target(
                    common,
                    "--publish http needs --trigger-token (or HTB_TRIGGER_TOKEN)",
                    format!("http://{authority}/trigger"),
                )?;
                Publisher::http(url, token)?
            }
            PublishKind::Amqp => Publisher::amqp(&common.amqp_url, &common.exchange).await?,
            PublishKind::Centrifugo => {
                let (api, key) = http_publish_target(
                    common,
                    "--publish centrifugo needs --trigger-token (the HTTP API key)",
                    format!("http://{authority}/api"),
                )?;
                Publisher::centrifugo(api, key)?
            }
        })
    } else {
        None
    };

    let options = Options {
        url,
        server,
        sources,
        connect_concurrency: common.connect_concurrency,
        connect_timeout: secs(common.connect_timeout),
        subscribe_timeout: secs(common.subscribe_timeout),
        phase_timeout: secs(common.phase_timeout),
        drain_timeout: secs(common.drain_timeout),
        publish_window: common.publish_window,
        server_pid: common.server_pid,
        client_ping: (common.client_ping > 0.0).then(|| secs(common.client_ping)),
        protocol,
        seed: common.seed,
        progress,
    };
    if progress && common.server_pid.is_none() {
        eprintln!("[bench] note: no --server-pid: server RSS and CPU are not measured");
    }

    let mut reports = Vec::with_capacity(specs.len());
    for spec in &specs {
        reports.push(run::run(spec, &options, publisher.as_ref()).await?);
        // Let the server settle (closed connections freed) between runs.
        if specs.len() > 1 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let summary = match preset {
        Some((scenario, _)) => scenarios::summary(scenario, &reports),
        None => json!({}),
    };
    let floor = floor.map(|path| match reports.first() {
        Some(run) => floor::compare(path, &run.steps, run.connections.ok),
        None => floor::compare(path, &[], 0),
    });
    let problems: Vec<String> = reports.iter().flat_map(|r| r.problems()).collect();
    let report = Report {
        tool: "high-templar-bench",
        version: env!("CARGO_PKG_VERSION"),
        scenario: preset.map(|(s, _)| s.name().to_string()),
        scale: preset.map(|(_, scale)| scale),
        url: common.url.clone(),
        publish: publisher.as_ref().map(|p| p.kind().to_string()),
        protocol: protocol_name(protocol),
        backend_requests: backend.as_ref().map(|b| b.stats.requests.load(std::sync::atomic::Ordering::Relaxed)),
        runs: reports,
        admission: Vec::new(),
        summary,
        floor,
        ok: problems.is_empty(),
        problems,
    };
    print_report(&report, common.json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (authority, url) = parse_url("ws://127.0.0.1:8080/ws/", "a b").expect("valid");
        assert_eq!(authority, "127.0.0.1:8080");
        assert_eq!(url, "ws://127.0.0.1:8080/ws/?token=a%20b");
        let (authority, url) = parse_url("ws://localhost/ws/?x=1", "t").expect("valid");
        assert_eq!(authority, "localhost:80");
        assert_eq!(url, "ws://localhost/ws/?x=1&token=t");
        assert!(parse_url("wss://x/ws/", "t").is_err());
        assert!(parse_url("http://x/ws/", "t").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["b", "scenario", "hot", "--scale", "0.01", "--json"]).expect("parses");
        assert!(matches!(cli.command, Command::Scenario(ScenarioArgs { name: Scenario::Hot, .. })));
        let cli =
            Cli::try_parse_from(["b", "run", "-n", "5", "--rooms", "a=2,b=3", "--rooms", "u=4", "--rates", "1,2"])
                .expect("parses");
        let Command::Run(args) = cli.command else { panic!("run") };
        assert_eq!(args.rooms, vec!["a=2,b=3".to_string(), "u=4".to_string()]);
        assert_eq!(args.rates, vec![1.0, 2.0]);
        assert_eq!(args.common.source_base, None);
        let cli = Cli::try_parse_from(["b", "scenario", "hot", "--source-base", "10.203.0.3", "--source-addrs", "4"])
            .expect("parses");
        let Command::Scenario(args) = cli.command else { panic!("scenario") };
        assert_eq!((args.common.source_base, args.common.source_addrs), (Some(Ipv4Addr::new(10, 203, 0, 3)), 4));
        assert!(Cli::try_parse_from(["b", "run", "--source-base", "::1"]).is_err());
        let cli = Cli::try_parse_from(["b", "scenario", "admission", "--variants", "shared,grouped", "--users", "7"])
            .expect("parses");
        let Command::Scenario(args) = cli.command else { panic!("scenario") };
        assert_eq!(args.admission.variants, vec![admission::Variant::Shared, admission::Variant::Grouped]);
        assert_eq!((args.admission.users, args.admission.backend_capacity), (Some(7), 32));
        let cli = Cli::try_parse_from(["b", "scenario", "hot", "--floor", "r/floor.json"]).expect("parses");
        let Command::Scenario(args) = cli.command else { panic!("scenario") };
        assert_eq!(args.floor.as_deref(), Some(std::path::Path::new("r/floor.json")));
        let cli = Cli::try_parse_from(["b", "floor-spec", "--scale", "0.5"]).expect("parses");
        let Command::FloorSpec(args) = cli.command else { panic!("floor-spec") };
        assert!((args.scale - 0.5).abs() < 1e-12);
    }
}
