//! `high-templar-gateway`: see `high_templar_gateway::cli`.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use high_templar_gateway::broker::amqp::redact_url;
use high_templar_gateway::cli::{Cli, Command, LogFormat};
use high_templar_gateway::config::Secret;
use high_templar_gateway::server::{Server, StartError};
use tracing_subscriber::EnvFilter;

/// Exit code for an unusable configuration.
const EXIT_CONFIG: u8 = 2;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("HT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stopping only when killed");
            std::future::pending::<()>().await
        }
    }
}

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
            Err(e @ StartError::Config(_)) => {
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
