//! Publishing triggers the way 3.x publishers do: AMQP (exchange
//! `hightemplar`, routing key `*`, publisher confirms so the bench knows
//! what the broker took), or `POST /trigger` with a bearer token; or, for
//! the Centrifugo peer of the comparison, its server HTTP API.

use futures_util::future::{BoxFuture, FutureExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;

use crate::centrifugo;

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
    /// Centrifugo's server HTTP API: `POST <api>/publish` (one room) or
    /// `<api>/broadcast` (several) with `X-API-Key`.
    Centrifugo {
        /// HTTP client (keeps connections alive).
        client: reqwest::Client,
        /// The API prefix, `http://host:port/api`.
        api: String,
        /// The API key.
        key: String,
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

    /// A publisher to Centrifugo's HTTP API under `api` (`http://host:port/api`).
    pub fn centrifugo(api: String, key: String) -> Result<Publisher, String> {
        let client =
            reqwest::Client::builder().pool_max_idle_per_host(256).build().map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Publisher::Centrifugo { client, api: api.trim_end_matches('/').to_string(), key })
    }

    /// `"http"`, `"amqp"` or `"centrifugo"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Publisher::Http { .. } => "http",
            Publisher::Amqp { .. } => "amqp",
            Publisher::Centrifugo { .. } => "centrifugo",
        }
    }

    /// Publishes the bench's trigger (sequence number `seq`, sent at `ts_us`,
    /// of `phase`, data about `payload_bytes` long) to `rooms`, in this
    /// publisher's protocol; resolves once the server or broker took it.
    pub fn trigger(
        &self,
        rooms: &[Value],
        seq: u64,
        ts_us: u64,
        phase: usize,
        payload_bytes: usize,
    ) -> BoxFuture<'static, Result<(), String>> {
        let Publisher::Centrifugo { client, api, key } = self else {
            let rooms_json = Value::Array(rooms.to_vec()).to_string();
            return self.send(trigger_body(&rooms_json, seq, ts_us, phase, payload_bytes));
        };
        let channels = match rooms.iter().map(centrifugo::channel).collect::<Result<Vec<_>, _>>() {
            Ok(channels) => channels,
            Err(e) => return futures_util::future::ready(Err(e)).boxed(),
        };
        let (path, body) = centrifugo::api_request(&channels, &trigger_data(seq, ts_us, phase, payload_bytes));
        let request = client
            .post(format!("{api}{path}"))
            .header("X-API-Key", key.as_str())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        async move {
            let response = request.send().await.map_err(|e| format!("POST /api{path}: {e}"))?;
            let status = response.status();
            let answer = response.bytes().await.map_err(|e| format!("POST /api{path}: body: {e}"))?;
            if !status.is_success() {
                return Err(format!("POST /api{path}: HTTP {}", status.as_u16()));
            }
            match centrifugo::api_error(&answer) {
                Some(error) => Err(format!("POST /api{path}: {error}")),
                None => Ok(()),
            }
        }
        .boxed()
    }

    /// Publishes the 3.x trigger `body`; resolves once the server answered
    /// `2xx` (HTTP) or RabbitMQ confirmed (AMQP). [`Publisher::trigger`] is
    /// the only caller, and sends Centrifugo its own body.
    fn send(&self, body: Vec<u8>) -> BoxFuture<'static, Result<(), String>> {
        match self {
            Publisher::Centrifugo { .. } => {
                futures_util::future::ready(Err("centrifugo: a 3.x trigger body cannot be published".to_string()))
                    .boxed()
            }
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
    let data = trigger_data(seq, ts_us, phase, payload_bytes);
    let mut body = String::with_capacity(rooms_json.len() + data.len() + 20);
    body.push_str("{\"rooms\":");
    body.push_str(rooms_json);
    body.push_str(",\"data\":");
    body.push_str(&data);
    body.push('}');
    body.into_bytes()
}

/// A trigger's data object `{"seq":…,"ts":…,"p":…,"pad":"…"}`, about
/// `payload_bytes` long; every publisher sends this text unchanged, so the
/// clients' fast paths read the same bytes whatever the server.
pub fn trigger_data(seq: u64, ts_us: u64, phase: usize, payload_bytes: usize) -> String {
    let head = format!("{{\"seq\":{seq},\"ts\":{ts_us},\"p\":{phase}");
    let pad_len = payload_bytes.saturating_sub(head.len() + ",\"pad\":\"\"}".len());
    let mut data = String::with_capacity(head.len() + pad_len + 10);
    data.push_str(&head);
    if pad_len > 0 {
        data.push_str(",\"pad\":\"");
        data.extend(std::iter::repeat_n('x', pad_len));
        data.push('"');
    }
    data.push('}');
    data
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
