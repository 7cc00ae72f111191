//! 3.x-protocol clients for the node tier: one-shot websocket clients, a
//! client that reconnects after every close (as browsers running the 3.x
//! client do) and counts what it saw, and the two ways of publishing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// One websocket connection.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a connect (TCP, upgrade, authorisation frame, subscribe) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The room every node-tier client subscribes to.
pub fn lobby() -> Value {
    json!({"chat": "lobby"})
}

/// Connects to `url` as `token`, waits for the authorisation frame and
/// subscribes to the lobby with `request_id`. `Err` says which step failed.
pub async fn connect(url: &str, token: &str, request_id: &str) -> Result<Ws, String> {
    let attempt = async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?token={token}"))
            .await
            .map_err(|e| format!("upgrade: {e}"))?;
        let auth = next_frame(&mut ws).await.map_err(|e| format!("authorisation frame: {e}"))?;
        if auth["is_authorized"] != json!(true) {
            return Err(format!("not authorised: {auth}"));
        }
        let subscribe = json!({"type": "subscribe", "room": lobby(), "requestId": request_id});
        ws.send(Message::text(subscribe.to_string())).await.map_err(|e| format!("send subscribe: {e}"))?;
        let reply = next_frame(&mut ws).await.map_err(|e| format!("subscribe reply: {e}"))?;
        if reply != json!({"code": "success", "requestId": request_id}) {
            return Err(format!("subscribe refused: {reply}"));
        }
        Ok(ws)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt).await.map_err(|_| "timed out".to_string())?
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    /// A close frame with this code (`None`: no code).
    Closed(Option<u16>),
    /// The stream failed or ended without a close frame.
    Broken(String),
}

/// The next text frame as JSON (pings and pongs skipped); `Err` when the
/// connection ends first.
pub async fn next_frame(ws: &mut Ws) -> Result<Value, Ended> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(&t).map_err(|e| Ended::Broken(format!("not JSON ({e}): {t}")));
            }
            Some(Ok(Message::Close(frame))) => return Err(Ended::Closed(frame.map(|f| u16::from(f.code)))),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(Ended::Broken(e.to_string())),
            None => return Err(Ended::Broken("stream ended".into())),
        }
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Closed(code) => write!(f, "closed with {code:?}"),
            Ended::Broken(e) => write!(f, "broken: {e}"),
        }
    }
}

/// The `data` of every publish frame that arrives within `quiet` of the
/// previous frame (or the start); stops at the first silence of `quiet`.
pub async fn publishes_until_quiet(ws: &mut Ws, quiet: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(frame) = tokio::time::timeout(quiet, next_frame(ws)).await {
        match frame {
            Ok(v) if v["type"] == "publish" => out.push(v["data"].clone()),
            Ok(other) => panic!("unexpected frame: {other}"),
            Err(e) => panic!("connection ended while waiting for publishes: {e}"),
        }
    }
    out
}

/// What a [`Reconnecting`] client saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Successful connects (the first one included).
    pub connects: u32,
    /// Attempts that did not end subscribed, with why.
    pub failed_connects: Vec<String>,
    /// When a close with 1001 (going away) arrived.
    pub going_away: Vec<Instant>,
    /// Other ends of a connection (none expected).
    pub other_ends: Vec<String>,
    /// `data` of every publish received, in order.
    pub publishes: Vec<Value>,
    /// Whether it is connected and subscribed now.
    pub up: bool,
}

/// A client that reconnects through `url` whenever its connection ends,
/// as the 3.x browser client does.
pub struct Reconnecting {
    /// What it saw so far.
    pub seen: Arc<Mutex<Seen>>,
    /// Tells it to stop.
    stop: tokio::sync::watch::Sender<bool>,
    /// Its task.
    task: tokio::task::JoinHandle<()>,
}

impl Reconnecting {
    /// Starts a client as `token` (subscribed to the lobby).
    pub fn start(url: String, token: String) -> Reconnecting {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while !*stopped.borrow() {
                    let mut ws = match connect(&url, &token, "r").await {
                        Ok(ws) => ws,
                        Err(e) => {
                            seen.lock().expect("seen lock").failed_connects.push(e);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    };
                    {
                        let mut s = seen.lock().expect("seen lock");
                        s.connects += 1;
                        s.up = true;
                    }
                    let ended = loop {
                        tokio::select! {
                            frame = next_frame(&mut ws) => match frame {
                                Ok(v) if v["type"] == "publish" => {
                                    seen.lock().expect("seen lock").publishes.push(v["data"].clone());
                                }
                                Ok(other) => break Some(Ended::Broken(format!("unexpected frame {other}"))),
                                Err(e) => break Some(e),
                            },
                            _ = stopped.changed() => break None,
                        }
                    };
                    let mut s = seen.lock().expect("seen lock");
                    s.up = false;
                    match ended {
                        Some(Ended::Closed(Some(1001))) => s.going_away.push(Instant::now()),
                        Some(other) => s.other_ends.push(other.to_string()),
                        None => {}
                    }
                }
            })
        };
        Reconnecting { seen, stop, task }
    }

    /// A copy of what it saw.
    pub fn seen(&self) -> Seen {
        self.seen.lock().expect("seen lock").clone()
    }

    /// Stops it and returns what it saw.
    pub async fn stop(self) -> Seen {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.seen.lock().expect("seen lock").clone()
    }
}

/// Opens a fresh connection through `url` every `every` until told to stop,
/// and counts the attempts and the failures: "no upgrade fails" is measured
/// by new connections, not only by the ones that were already open.
pub struct Prober {
    /// Attempts, and the failures with why.
    pub results: Arc<Mutex<(u32, Vec<String>)>>,
    /// Tells it to stop.
    stop: tokio::sync::watch::Sender<bool>,
    /// Its task.
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    /// Starts probing `url` as `token`.
    pub fn start(url: String, token: String, every: Duration) -> Prober {
        let results: Arc<Mutex<(u32, Vec<String>)>> = Arc::default();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = {
            let results = results.clone();
            tokio::spawn(async move {
                while !*stopped.borrow() {
                    let outcome = connect(&url, &token, "probe").await;
                    {
                        let mut r = results.lock().expect("prober lock");
                        r.0 += 1;
                        if let Err(e) = &outcome {
                            r.1.push(format!("{:?}: {e}", Instant::now()));
                        }
                    }
                    if let Ok(mut ws) = outcome {
                        let _ = ws.close(None).await;
                    }
                    tokio::time::sleep(every).await;
                }
            })
        };
        Prober { results, stop, task }
    }

    /// Stops it: attempts and failures.
    pub async fn stop(self) -> (u32, Vec<String>) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.results.lock().expect("prober lock").clone()
    }
}

/// `POST http://<addr>/trigger` with the bearer `token`: the status code.
pub async fn post_trigger(addr: &str, token: &str, body: &Value) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let mut s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("connect for POST /trigger in time")
        .expect("connect for POST /trigger");
    let request = format!(
        "POST /trigger HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.expect("send POST /trigger");
    let mut out = String::new();
    tokio::time::timeout(CONNECT_TIMEOUT, s.read_to_string(&mut out))
        .await
        .expect("POST /trigger answered in time")
        .expect("read the answer");
    out.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not HTTP: {out}"))
}

/// A 3.x publisher: `basic_publish(exchange, routing_key="*", body)` on a
/// confirm channel.
pub struct AmqpPublisher {
    /// The connection.
    conn: lapin::Connection,
    /// A channel in confirm mode.
    channel: lapin::Channel,
    /// The exchange.
    exchange: String,
}

impl AmqpPublisher {
    /// Connects to `url` and publishes to `exchange`.
    pub async fn connect(url: &str, exchange: &str) -> AmqpPublisher {
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await.expect("AMQP connect");
        let channel = conn.create_channel().await.expect("AMQP channel");
        channel.confirm_select(Default::default()).await.expect("confirm mode");
        AmqpPublisher { conn, channel, exchange: exchange.to_string() }
    }

    /// Publishes `{"rooms":[lobby],"data":data}` and waits for the confirm.
    pub async fn publish(&self, data: &Value) {
        let body = json!({"rooms": [lobby()], "data": data}).to_string();
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                "*".into(),
                Default::default(),
                body.as_bytes(),
                Default::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.conn.close(200, "done".into()).await;
    }
}
