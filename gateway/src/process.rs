//! Process plumbing shared by the gateway and operator binaries: logging
//! setup and the termination signal.

use std::io::IsTerminal;

use tracing::Level;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::prelude::*;

/// Dependencies that write what they send or receive at debug or trace
/// level: lapin its login frame (the AMQP user and password), the HTTP
/// stacks their headers (cookies, tokens). Whatever `HT_LOG` says, their
/// lines above `info` are never written, so no log level shows a secret.
const CHATTY_DEPENDENCIES: &[&str] =
    &["lapin", "amq_protocol", "hyper", "hyper_util", "reqwest", "h2", "tungstenite", "tokio_tungstenite", "rustls"];

/// Whether a line of `target` at `level` may be written at all.
fn may_log(target: &str, level: &Level) -> bool {
    let crate_name = target.split("::").next().unwrap_or(target);
    *level <= Level::INFO || !CHATTY_DEPENDENCIES.contains(&crate_name)
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, text otherwise.
    #[default]
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

/// Logs to stderr, filtered by `HT_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("HT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !terminal,
    };
    let safe = filter_fn(|meta| may_log(meta.target(), meta.level()));
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(terminal);
    let registry = tracing_subscriber::registry().with(filter).with(safe);
    if json {
        registry.with(layer.json().flatten_event(true)).init();
    } else {
        registry.with(layer).init();
    }
}

/// Raises the soft open-file limit to the hard limit: every websocket is a
/// file descriptor, and the usual soft limit (1024) would cap connections.
pub fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_that_log_secrets_are_capped_at_info() {
        for target in ["lapin", "lapin::io_loop", "amq_protocol::frame", "hyper::proto::h1", "reqwest::connect"] {
            assert!(!may_log(target, &Level::TRACE), "{target}");
            assert!(!may_log(target, &Level::DEBUG), "{target}");
            assert!(may_log(target, &Level::INFO), "{target}");
            assert!(may_log(target, &Level::WARN), "{target}");
        }
        for target in ["high_templar_gateway::session", "high_templar_operator", "lapinx"] {
            assert!(may_log(target, &Level::TRACE), "{target}");
        }
    }
}
