//! `high-templar-gateway`: see `high_templar_gateway::cli`.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use high_templar_gateway::backend::BackendSetupError;
use high_templar_gateway::broker::amqp::{AmqpSetupError, redact_url};
use high_templar_gateway::cli::{Cli, Command};
use high_templar_gateway::config::Secret;
use high_templar_gateway::process::{init_logging, raise_open_file_limit, termination};
use high_templar_gateway::server::{Server, StartError};

/// jemalloc rather than glibc's allocator: an idle connection is ~40 small
/// allocations, which jemalloc's size classes hold without a per-block
/// header, and it returns freed pages to the OS after a connection storm.
/// Measured on the idle-density benchmark (docs/performance.md): 4.36 KB
/// per connection with glibc, 3.8 KB with jemalloc (mimalloc: more than glibc).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for an unusable configuration.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (args, check_only) = match &cli.command {
        Command::Serve(args) => (args, false),
        Command::CheckConfig(args) => (args, true),
    };
    let config = match args.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("high-templar-gateway: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if check_only {
        if let Err(e) = high_templar_gateway::tls::check_files(&config) {
            eprintln!("high-templar-gateway: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        let mut shown = config.clone();
        if shown.trigger.token.is_some() {
            shown.trigger.token = Some(Secret("<redacted>".into()));
        }
        if let Some(url) = &shown.broker.amqp.url {
            shown.broker.amqp.url = Some(Secret(redact_url(&url.0)));
        }
        match serde_yaml::to_string(&shown) {
            Ok(yaml) => print!("{yaml}"),
            Err(e) => eprintln!("high-templar-gateway: cannot print the configuration: {e}"),
        }
        return ExitCode::SUCCESS;
    }
    init_logging(args.log_format);
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("high-templar-gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let server = match Server::bind(config).await {
            Ok(s) => s,
            Err(
                e @ (StartError::Config(_)
                | StartError::Amqp(AmqpSetupError::Tls(_))
                | StartError::Backend(BackendSetupError::Tls(_))),
            ) => {
                tracing::error!(error = %e, "invalid configuration");
                return ExitCode::from(EXIT_CONFIG);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        match server.run(termination()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}
