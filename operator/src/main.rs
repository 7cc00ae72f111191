//! `high-templar-operator`: `crd` prints the CustomResourceDefinition;
//! `run` runs the controller (with leader election on a Lease) and serves
//! `/metrics` and `/healthz`.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use clap::{Parser, Subcommand};
use high_templar_gateway::process::{LogFormat, init_logging, termination};
use high_templar_operator::crd_yaml;
use high_templar_operator::metrics::Metrics;
use high_templar_operator::reconcile::Settings;
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{error, info, warn};

/// Default gateway image: the gateway of the same release.
const DEFAULT_GATEWAY_IMAGE: &str = concat!("high-templar-gateway:", env!("CARGO_PKG_VERSION"));

#[derive(Parser)]
#[command(name = "high-templar-operator", version, about = "Reconciles HighTemplar resources into websocket gateways")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the HighTemplar CustomResourceDefinition as YAML.
    Crd,
    /// Run the controller.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch HighTemplars in this namespace only (default: all namespaces).
    #[arg(long, env = "HT_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Gateway image for resources that name none.
    #[arg(long, env = "HT_GATEWAY_IMAGE", default_value = DEFAULT_GATEWAY_IMAGE)]
    gateway_image: String,
    /// Address of /metrics and /healthz.
    #[arg(long, env = "HT_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    metrics_listen: SocketAddr,
    /// Reconcile only while holding the Lease (run several replicas safely).
    #[arg(long, env = "HT_LEADER_ELECTION", action = clap::ArgAction::Set, default_value_t = true)]
    leader_election: bool,
    /// Namespace of the Lease (default: the pod's namespace, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the Lease.
    #[arg(long, env = "HT_LEASE_NAME", default_value = "high-templar-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (default: POD_NAME or the hostname).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds between fleet scrapes: each ready gateway pod's `/metrics`
    /// is read and the sums written into its HighTemplar's status.
    #[arg(long, env = "HT_FLEET_PERIOD_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    fleet_period_seconds: u64,
}

async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new().route("/healthz", get(|| async { "ok\n" })).route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    metrics.encode(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "serving /metrics and /healthz");
    axum::serve(listener, app).await
}

async fn run(args: RunArgs) -> ExitCode {
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "cannot configure the Kubernetes client (in-cluster config or KUBECONFIG)");
            return ExitCode::FAILURE;
        }
    };
    let metrics = Arc::new(Metrics::new());
    let server = {
        let metrics = metrics.clone();
        let addr = args.metrics_listen;
        tokio::spawn(async move {
            if let Err(e) = serve_metrics(addr, metrics).await {
                error!(error = %e, %addr, "metrics server failed");
            }
        })
    };
    let settings = Settings {
        gateway_image: args.gateway_image.clone(),
        fleet_period: std::time::Duration::from_secs(args.fleet_period_seconds),
    };
    if !args.leader_election {
        metrics.leader.set(1);
        high_templar_operator::controller::run(client, args.namespace, settings, metrics, termination()).await;
        server.abort();
        return ExitCode::SUCCESS;
    }
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("high-templar-operator-{}", std::process::id()));
    let manager = match LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&args.lease_namespace)
        .with_identity(&identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
    {
        Ok(m) => m,
        Err(e) => {
            error!(error = %e, lease = %args.lease_name, namespace = %args.lease_namespace, "cannot use the leader Lease");
            return ExitCode::FAILURE;
        }
    };
    let (mut leader, lease_task) = manager.watch().await;
    info!(%identity, lease = %args.lease_name, "waiting for leadership");
    let mut terminated = Box::pin(termination());
    loop {
        if *leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = leader.changed() => if changed.is_err() {
                error!("the lease manager stopped");
                return ExitCode::FAILURE;
            },
            _ = &mut terminated => return ExitCode::SUCCESS,
        }
    }
    info!(%identity, "leader: reconciling");
    metrics.leader.set(1);
    // Reconcile until shutdown or until the Lease is lost; then stop, so
    // two replicas never reconcile at once.
    let mut watch = leader.clone();
    let lost = async move {
        while watch.changed().await.is_ok() {
            if !*watch.borrow() {
                return;
            }
        }
    };
    let stop = async move {
        tokio::select! {
            _ = terminated => {}
            _ = lost => warn!("leadership lost"),
        }
    };
    high_templar_operator::controller::run(client, args.namespace, settings, metrics.clone(), stop).await;
    metrics.leader.set(0);
    drop(leader);
    // Closing the channel makes the lease task release the Lease.
    let _ = lease_task.await;
    server.abort();
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            init_logging(LogFormat::Auto);
            match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt.block_on(run(args)),
                Err(e) => {
                    eprintln!("high-templar-operator: cannot start the async runtime: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
