//! Publishing triggers the way 3.x publishers do: AMQP (exchange
//! `hightemplar`, routing key `*`, publisher confirms so the bench knows
//! what the broker took), or `POST /trigger` with a bearer token.

use futures_util::future::{BoxFuture, FutureExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};

/// The routing key 3.x publishers use.
pub const ROUTING_KEY: &str = "*";

/// Where triggers go (one per invocation: the size difference between
/// the variants does not matter).
#[allow(clippy::large_enum_variant)]
pub enum Publisher {
    /// `POST <url>` with `Authorization: Bearer <token>`.
    Http {
        /// HTTP client (keeps connections alive).
        client: reqwest::Client,
        /// The trigger endpoint.
        url: String,
        /// The bearer token.
        token: String,
    },
    /// `basic_publish` to `exchange` with routing key `*`.
    Amqp {
        /// Kept open for the channel's sake.
        _connection: Connection,
        /// A channel in confirm mode.
        channel: Channel,
        /// The exchange.
        exchange: String,
    },
}

impl Publisher {
    /// An HTTP publisher.
    pub fn http(url: String, token: String) -> Result<Publisher, String> {
        let client =
            reqwest::Client::builder().pool_max_idle_per_host(256).build().map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Publisher::Http { client, url, token })
    }

    /// Connects to RabbitMQ, checks that `exchange` exists (a consuming
    /// gateway declares it) and opens a channel in confirm mode.
    pub async fn amqp(url: &str, exchange: &str) -> Result<Publisher, String> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .map_err(|e| format!("AMQP: cannot connect: {e}"))?;
        let check = connection.create_channel().await.map_err(|e| format!("AMQP: channel: {e}"))?;
        let passive = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
        check.exchange_declare(exchange.into(), ExchangeKind::Direct, passive, FieldTable::default()).await.map_err(
            |e| format!("AMQP: exchange {exchange:?} not usable ({e}); is a gateway consuming from this broker?"),
        )?;
        let _ = check.close(200, "bye".into()).await;
        let channel = connection.create_channel().await.map_err(|e| format!("AMQP: channel: {e}"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| format!("AMQP: confirm mode: {e}"))?;
        Ok(Publisher::Amqp { _connection: connection, channel, exchange: exchange.to_string() })
    }

    /// `"http"` or `"amqp"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Publisher::Http { .. } => "http",
            Publisher::Amqp { .. } => "amqp",
        }
    }

    /// Publishes `body`; resolves once the server answered `2xx` (HTTP) or
    /// RabbitMQ confirmed (AMQP).
    pub fn send(&self, body: Vec<u8>) -> BoxFuture<'static, Result<(), String>> {
        match self {
            Publisher::Http { client, url, token } => {
                let request = client
                    .post(url.as_str())
                    .bearer_auth(token)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body);
                async move {
                    let response = request.send().await.map_err(|e| format!("POST /trigger: {e}"))?;
                    let status = response.status();
                    // Read the body so the connection goes back to the pool.
                    let _ = response.bytes().await;
                    if status.is_success() { Ok(()) } else { Err(format!("POST /trigger: HTTP {}", status.as_u16())) }
                }
                .boxed()
            }
            Publisher::Amqp { channel, exchange, .. } => {
                let channel = channel.clone();
                let exchange = exchange.clone();
                async move {
                    let confirm = channel
                        .basic_publish(
                            exchange.as_str().into(),
                            ROUTING_KEY.into(),
                            BasicPublishOptions::default(),
                            &body,
                            BasicProperties::default().with_content_type("application/json".into()),
                        )
                        .await
                        .map_err(|e| format!("AMQP publish: {e}"))?;
                    match confirm.await.map_err(|e| format!("AMQP confirm: {e}"))? {
                        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
                        Confirmation::Nack(_) => Err("AMQP: broker nacked the trigger".to_string()),
                    }
                }
                .boxed()
            }
        }
    }
}

/// The trigger body `{"rooms":[…],"data":{"seq":…,"ts":…,"p":…,"pad":"…"}}`,
/// padded so `data` is about `payload_bytes` long.
pub fn trigger_body(rooms_json: &str, seq: u64, ts_us: u64, phase: usize, payload_bytes: usize) -> Vec<u8> {
    let head = format!("{{\"seq\":{seq},\"ts\":{ts_us},\"p\":{phase}");
    let pad_len = payload_bytes.saturating_sub(head.len() + ",\"pad\":\"\"}".len());
    let mut body = String::with_capacity(rooms_json.len() + head.len() + pad_len + 32);
    body.push_str("{\"rooms\":");
    body.push_str(rooms_json);
    body.push_str(",\"data\":");
    body.push_str(&head);
    if pad_len > 0 {
        body.push_str(",\"pad\":\"");
        body.extend(std::iter::repeat_n('x', pad_len));
        body.push('"');
    }
    body.push_str("}}");
    body.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn body_shape_and_size() {
        let body = trigger_body(r#"[{"hot":0}]"#, 7, 123, 2, 128);
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["rooms"], json!([{"hot": 0}]));
        assert_eq!(v["data"]["seq"], 7);
        assert_eq!(v["data"]["ts"], 123);
        assert_eq!(v["data"]["p"], 2);
        assert_eq!(v["data"].to_string().len(), 128);
        let small = trigger_body("[]", 1, 1, 0, 0);
        let v: Value = serde_json::from_slice(&small).expect("json");
        assert!(v["data"].get("pad").is_none());
    }
}
