//! Command line: `high-templar-gateway serve` and `check-config`. Every
//! flag has an `HT_*` environment variable; flags override the config file.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{BrokerKind, Config, ConfigError, Listen, Secret};
use crate::process::LogFormat;

/// The gateway binary's arguments.
#[derive(Debug, Parser)]
#[command(
    name = "high-templar-gateway",
    version,
    about = "Websocket gateway for an existing HTTP API (high-templar 3.x compatible)"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Validate the configuration and print it as YAML (secrets redacted), then exit.
    CheckConfig(ServeArgs),
}

/// Settings of `serve`; each overrides the config file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// YAML config file holding every setting (flags override it).
    #[arg(long, env = "HT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen address [default: 0.0.0.0:8080].
    #[arg(long, env = "HT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Backend base URL, e.g. http://api:8000/api/.
    #[arg(long, env = "HT_BACKEND_URL")]
    pub backend_url: Option<String>,
    /// Reach the backend through this unix socket instead of TCP.
    #[arg(long, env = "HT_BACKEND_SOCKET")]
    pub backend_socket: Option<PathBuf>,
    /// Bootstrap path, relative to the backend URL [default: bootstrap/].
    #[arg(long, env = "HT_BOOTSTRAP_PATH")]
    pub bootstrap_path: Option<String>,
    /// Trigger broker [default: memory].
    #[arg(long, env = "HT_BROKER", value_enum)]
    pub broker: Option<BrokerKind>,
    /// RabbitMQ URL for the amqp broker, e.g. amqp://user:pass@rabbitmq:5672/%2f.
    #[arg(long, env = "HT_AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<String>,
    /// Exchange triggers are published to [default: hightemplar].
    #[arg(long, env = "HT_EXCHANGE")]
    pub exchange: Option<String>,
    /// Declare the exchange durable (true|false) [default: true].
    #[arg(long, env = "HT_EXCHANGE_DURABLE", action = clap::ArgAction::Set)]
    pub exchange_durable: Option<bool>,
    /// Bearer token of POST /trigger (disabled when unset).
    #[arg(long, env = "HT_TRIGGER_TOKEN", hide_env_values = true)]
    pub trigger_token: Option<String>,
    /// Log format.
    #[arg(long, env = "HT_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

impl ServeArgs {
    /// The config file (if any) with the flags applied on top, validated.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(listen) = self.listen {
            config.listen = Listen(listen);
        }
        if let Some(url) = &self.backend_url {
            config.backend.url = Some(url.clone());
        }
        if let Some(socket) = &self.backend_socket {
            config.backend.socket = Some(socket.clone());
        }
        if let Some(path) = &self.bootstrap_path {
            config.backend.bootstrap_path = path.clone();
        }
        if let Some(kind) = self.broker {
            config.broker.kind = kind;
        }
        if let Some(url) = &self.amqp_url {
            config.broker.amqp.url = Some(Secret(url.clone()));
        }
        if let Some(exchange) = &self.exchange {
            config.broker.amqp.exchange = exchange.clone();
        }
        if let Some(durable) = self.exchange_durable {
            config.broker.amqp.exchange_durable = durable;
        }
        if let Some(token) = &self.trigger_token {
            config.trigger.token = Some(Secret(token.clone()));
        }
        config.validate()?;
        Ok(config)
    }
}
