//! Websocket clients speaking the high-templar 3.x client protocol, or
//! Centrifugo's JSON protocol for the comparison's Centrifugo peer
//! ([`crate::centrifugo`]).
//!
//! Three kinds:
//! * **stable** clients connect, wait for the controller's go, subscribe
//!   (pipelined), then read publish frames until told to stop, recording
//!   per subscription the sequence numbers received;
//! * **slow** clients connect and subscribe like stable ones, then stop
//!   reading;
//! * **churn** clients connect, subscribe, read for a while and disconnect.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::centrifugo::{self, Reply};
use crate::reader::Reader;

/// A client websocket.
pub type Ws = WebSocketStream<TcpStream>;

/// The client protocol of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// high-templar 3.x: authorisation frame, `subscribe` frames with a
    /// `requestId`, `publish` frames naming it.
    #[default]
    HighTemplar,
    /// Centrifugo's JSON protocol: connect command, one channel per room,
    /// publications pushed by channel, application-level ping/pong.
    Centrifugo,
}

/// One connection's subscriptions, in the run's protocol.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    /// The protocol the frames are in.
    pub protocol: Protocol,
    /// The subscribe frames, in order: local index `i` is `requestId` `i`
    /// (3.x) or command id `i + 2` (Centrifugo).
    pub frames: Vec<String>,
    /// Centrifugo only: the channel of each subscription (a publication
    /// names its channel, not a request id); empty for 3.x.
    pub channels: Vec<String>,
}

impl Subscriptions {
    /// The subscriptions to `rooms` (room JSON objects) in `protocol`;
    /// `Err` for a room Centrifugo cannot have (a wildcard).
    pub fn new(protocol: Protocol, rooms: &[Value]) -> Result<Subscriptions, String> {
        match protocol {
            Protocol::HighTemplar => Ok(Subscriptions {
                protocol,
                frames: rooms.iter().enumerate().map(|(i, room)| subscribe_frame(room, i)).collect(),
                channels: Vec::new(),
            }),
            Protocol::Centrifugo => {
                let channels = rooms.iter().map(centrifugo::channel).collect::<Result<Vec<_>, _>>()?;
                let frames = channels.iter().enumerate().map(|(i, c)| centrifugo::subscribe_frame(c, i)).collect();
                Ok(Subscriptions { protocol, frames, channels })
            }
        }
    }

    /// How many subscriptions.
    pub fn len(&self) -> usize {
        self.frames.len()
    }
}

/// What the controller tells the stable and slow clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Connect and wait.
    Connect,
    /// Subscribe, then read (stable) or stop reading (slow).
    Subscribe,
    /// Stop: close and hand the results back.
    Stop,
}

/// A new latency histogram in microseconds (1 µs .. 10 min, 3 digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

/// Deliveries received for one phase (step) of a run, by stable clients.
#[derive(Debug)]
pub struct PhaseRecv {
    /// Trigger → delivery latency, µs.
    pub latency: Histogram<u64>,
    /// Deliveries received.
    pub count: u64,
    /// When the last one arrived, µs since the run's epoch.
    pub last_us: u64,
}

/// Counters shared by every client of a run and the controller.
#[derive(Debug)]
pub struct Stats {
    /// Stable and slow connections authorised.
    pub connected: AtomicU64,
    /// Stable and slow connections that failed to connect or were refused.
    pub connect_failed: AtomicU64,
    /// Stable and slow connections done subscribing (with or without errors).
    pub subscribe_done: AtomicU64,
    /// Subscriptions that got `success` (all kinds of clients).
    pub subscribes_ok: AtomicU64,
    /// Subscriptions that got an error or no answer (all kinds of clients).
    pub subscribes_failed: AtomicU64,
    /// Publish frames received by stable clients.
    pub received: AtomicU64,
    /// Per phase: latency and counts of stable clients' deliveries.
    pub phases: Mutex<Vec<PhaseRecv>>,
    /// Latency of deliveries to churn clients, µs.
    pub churn_latency: Mutex<Histogram<u64>>,
    /// Churn clients: connect + authorise + subscribe time, µs.
    pub churn_setup: Mutex<Histogram<u64>>,
    /// Problems, by kind (message → count).
    pub errors: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    /// Fresh counters for a run of `phases` phases.
    pub fn new(phases: usize) -> Stats {
        Stats {
            connected: AtomicU64::new(0),
            connect_failed: AtomicU64::new(0),
            subscribe_done: AtomicU64::new(0),
            subscribes_ok: AtomicU64::new(0),
            subscribes_failed: AtomicU64::new(0),
            received: AtomicU64::new(0),
            phases: Mutex::new(
                (0..phases).map(|_| PhaseRecv { latency: new_histogram(), count: 0, last_us: 0 }).collect(),
            ),
            churn_latency: Mutex::new(new_histogram()),
            churn_setup: Mutex::new(new_histogram()),
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts one problem of kind `what`.
    pub fn error(&self, what: impl Into<String>) {
        *lock(&self.errors).entry(what.into()).or_insert(0) += 1;
    }
}

/// Locks `m`, ignoring poisoning (a panicked client must not hide results).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What every client of a run shares.
#[derive(Debug)]
pub struct Ctx {
    /// The websocket URL, token included.
    pub url: String,
    /// The server's address.
    pub server: SocketAddr,
    /// Source addresses to spread connections over; empty: the kernel's choice.
    pub sources: Vec<IpAddr>,
    /// Websocket settings (small buffers: tens of thousands of clients).
    pub ws_config: WebSocketConfig,
    /// Longest connect + handshake + authorisation.
    pub connect_timeout: Duration,
    /// Longest wait for all subscribe replies of one connection.
    pub subscribe_timeout: Duration,
    /// Time zero of the run: trigger timestamps are µs since then.
    pub epoch: Instant,
    /// Shared counters.
    pub stats: Arc<Stats>,
    /// Connections being opened at once, at most.
    pub connect_permits: Arc<Semaphore>,
    /// Send the raw `ping` text frame this often (keeps 3.x-style idle
    /// timeouts away); `None`: never.
    pub client_ping: Option<Duration>,
    /// The client protocol.
    pub protocol: Protocol,
}

impl Ctx {
    /// µs since the run's epoch.
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

/// What a stable client hands back.
#[derive(Debug, Default)]
pub struct StableOutcome {
    /// Per subscription (by local index = requestId): sequence numbers received.
    pub received: Vec<Vec<u32>>,
    /// Publish frames that were not the bench's (no sequence number or
    /// unknown requestId).
    pub foreign: u64,
}

/// What a slow client hands back.
#[derive(Debug, Default, Clone, Copy)]
pub struct SlowOutcome {
    /// Connected and subscribed.
    pub subscribed: bool,
    /// The server closed it before the end (close frame, EOF or reset:
    /// a close frame cannot get through a socket the client does not read).
    pub closed_by_server: bool,
    /// The close code, when a close frame got through.
    pub close_code: Option<u16>,
}

/// What a churn client hands back.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChurnOutcome {
    /// Connected and authorised.
    pub connected: bool,
    /// Publish frames received.
    pub deliveries: u64,
    /// Publish frames received twice for one subscription.
    pub duplicated: u64,
}

/// The fields of a server frame the bench looks at.
#[derive(Debug, Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(borrow)]
    message: Option<Cow<'a, str>>,
    #[serde(rename = "requestId")]
    request_id: Option<Value>,
    data: Option<Data>,
    is_authorized: Option<bool>,
    /// Only in the authorisation frame.
    allowed_rooms: Option<Vec<Value>>,
}

/// The bench's trigger data: sequence number, send time, phase.
#[derive(Debug, Deserialize)]
struct Data {
    seq: Option<u64>,
    ts: Option<u64>,
    p: Option<usize>,
}

/// The bench's own publish frame exactly as this gateway writes it,
/// `{"type":"publish","data":{"seq":S,"ts":T,"p":P…},"requestId":N}`, read
/// without a JSON parser: serde_json was most of the reading thread's time
/// at 1 M frames/s. Any other shape (another server's key order or
/// spacing, a foreign frame) is left to serde_json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BenchPublish {
    request_id: usize,
    seq: u64,
    ts: u64,
    phase: usize,
}

impl BenchPublish {
    fn read(text: &str) -> Option<BenchPublish> {
        /// The leading decimal digits of `s` (at most 19: no overflow) and what follows.
        fn number(s: &str) -> Option<(u64, &str)> {
            let end = s.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(s.len());
            if end == 0 || end > 19 {
                return None;
            }
            Some((s[..end].parse().ok()?, &s[end..]))
        }
        let rest = text.strip_prefix(r#"{"type":"publish","data":{"seq":"#)?;
        let (seq, rest) = number(rest)?;
        let (ts, rest) = number(rest.strip_prefix(r#","ts":"#)?)?;
        let (phase, rest) = number(rest.strip_prefix(r#","p":"#)?)?;
        if !rest.starts_with([',', '}']) {
            return None;
        }
        let body = text.strip_suffix('}')?;
        let before_id = body.trim_end_matches(|c: char| c.is_ascii_digit());
        let (request_id, _) = number(&body[before_id.len()..])?;
        let data = before_id.strip_suffix(r#","requestId":"#)?;
        // The id must come right after the data object.
        if data.len() < text.len() - rest.len() || !data.ends_with('}') {
            return None;
        }
        Some(BenchPublish { request_id: request_id as usize, seq, ts, phase: phase as usize })
    }
}

/// The subscribe frame for `room` with numeric `request_id`.
fn subscribe_frame(room: &Value, request_id: usize) -> String {
    serde_json::json!({"type": "subscribe", "room": room, "requestId": request_id}).to_string()
}

/// Why opening a connection failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// The server answered the upgrade with this HTTP status instead of
    /// 101 (with its `Retry-After`, in whole seconds, and the first line of
    /// its body).
    Refused {
        /// HTTP status.
        status: u16,
        /// `Retry-After` as delay-seconds, when present and numeric.
        retry_after: Option<u64>,
        /// The body's first line (at most 80 bytes), often the reason.
        reason: String,
    },
    /// Closed with this code before the authorisation frame.
    Closed(u16),
    /// The authorisation frame said `is_authorized: false`.
    Unauthorized,
    /// No authorisation frame within the connect timeout.
    TimedOut,
    /// Anything else (socket, handshake, frame errors).
    Failed(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Refused { status, .. } => write!(f, "handshake: HTTP {status}"),
            OpenError::Closed(code) => write!(f, "auth: closed ({code})"),
            OpenError::Unauthorized => f.write_str("auth: refused (is_authorized false)"),
            OpenError::TimedOut => f.write_str("connect: timed out"),
            OpenError::Failed(e) => f.write_str(e),
        }
    }
}

/// Connects (bound to a source address picked by `index`), upgrades and
/// waits for the authorisation frame.
pub async fn open(ctx: &Ctx, index: usize) -> Result<Ws, String> {
    let _permit = ctx.connect_permits.acquire().await.map_err(|_| "connect: stopped".to_string())?;
    match tokio::time::timeout(ctx.connect_timeout, open_inner(ctx, &ctx.url, index)).await {
        Ok(result) => result.map(|(ws, _)| ws).map_err(|e| e.to_string()),
        Err(_) => Err(OpenError::TimedOut.to_string()),
    }
}

/// One attempt of [`open`] on `url` (its own token), from the source
/// address picked by `source`; the structured error says whether and when
/// to retry. On success also returns the allowed rooms of the
/// authorisation frame.
pub async fn attempt(ctx: &Ctx, url: &str, source: usize) -> Result<(Ws, Vec<Value>), OpenError> {
    let _permit = ctx.connect_permits.acquire().await.map_err(|_| OpenError::Failed("connect: stopped".into()))?;
    match tokio::time::timeout(ctx.connect_timeout, open_inner(ctx, url, source)).await {
        Ok(result) => result,
        Err(_) => Err(OpenError::TimedOut),
    }
}

/// What a refused upgrade's response says.
fn refused(response: &tokio_tungstenite::tungstenite::handshake::client::Response) -> OpenError {
    let retry_after =
        response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    let body = response.body().as_deref().unwrap_or_default();
    let line = String::from_utf8_lossy(body).lines().next().unwrap_or_default().trim().to_string();
    let reason = match line.char_indices().nth(80) {
        Some((at, _)) => line[..at].to_string(),
        None => line,
    };
    OpenError::Refused { status: response.status().as_u16(), retry_after, reason }
}

async fn open_inner(ctx: &Ctx, url: &str, source: usize) -> Result<(Ws, Vec<Value>), OpenError> {
    let failed = OpenError::Failed;
    let socket = match ctx.server {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| failed(format!("socket: {}", e.kind())))?;
    if !ctx.sources.is_empty() {
        let source = ctx.sources[source % ctx.sources.len()];
        socket.bind(SocketAddr::new(source, 0)).map_err(|e| failed(format!("bind {source}: {}", e.kind())))?;
    }
    let stream = socket.connect(ctx.server).await.map_err(|e| failed(format!("connect: {}", e.kind())))?;
    let _ = stream.set_nodelay(true);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(ctx.ws_config)).await.map_err(|e| match e {
            WsError::Http(response) => refused(&response),
            other => failed(format!("handshake: {other}")),
        })?;
    if ctx.protocol == Protocol::Centrifugo {
        return centrifugo_connect(ws).await.map(|ws| (ws, Vec::new()));
    }
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let frame: Incoming = serde_json::from_str(text.as_str())
                    .map_err(|_| failed("auth: first frame is not JSON".to_string()))?;
                return match frame.is_authorized {
                    Some(true) => Ok((ws, frame.allowed_rooms.unwrap_or_default())),
                    Some(false) => Err(OpenError::Unauthorized),
                    None => Err(failed("auth: first frame has no is_authorized".to_string())),
                };
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(OpenError::Closed(frame.map_or(1005, |f| u16::from(f.code))));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(failed(format!("auth: {e}"))),
            None => return Err(failed("auth: connection closed".to_string())),
        }
    }
}

/// Centrifugo's connect exchange on the upgraded `ws`: the connect command,
/// then its reply (a ping before it is answered).
async fn centrifugo_connect(mut ws: Ws) -> Result<Ws, OpenError> {
    let failed = OpenError::Failed;
    ws.send(Message::text(centrifugo::CONNECT_FRAME)).await.map_err(|e| failed(format!("connect: send: {e}")))?;
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                return Err(OpenError::Closed(frame.map_or(1005, |f| u16::from(f.code))));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(failed(format!("connect: {e}"))),
            None => return Err(failed("connect: connection closed".to_string())),
        };
        let mut pong = false;
        for line in centrifugo::lines(text.as_str()) {
            match centrifugo::parse(line).map_err(failed)? {
                Reply::Connected => return Ok(ws),
                Reply::Failed { id: centrifugo::CONNECT_ID, code, message } => {
                    return Err(failed(format!("connect: error {code} ({message})")));
                }
                Reply::Disconnect(code, reason) => {
                    return Err(failed(format!("connect: disconnected {code} ({reason})")));
                }
                Reply::Ping => pong = true,
                _ => return Err(failed("connect: unexpected reply before the connect reply".to_string())),
            }
        }
        if pong {
            ws.send(Message::text(centrifugo::PONG)).await.map_err(|e| failed(format!("connect: pong: {e}")))?;
        }
    }
}

/// One client's subscriptions and what they received.
pub struct Session {
    /// Per subscription: sequence numbers received.
    received: Vec<Vec<u32>>,
    /// Subscribe replies still awaited, per subscription.
    pending: Vec<bool>,
    /// How many are still awaited.
    pending_count: usize,
    /// Foreign publish frames.
    foreign: u64,
    /// Whose deliveries these are.
    kind: Kind,
    /// The protocol the server speaks.
    protocol: Protocol,
    /// Centrifugo only: each subscription's channel (see [`Subscriptions`]).
    channels: Vec<String>,
}

/// Which statistics a client's deliveries go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Stable,
    Slow,
    Churn,
}

/// What a frame was.
pub enum Event {
    /// Nothing to do.
    Nothing,
    /// The server closed the websocket (code).
    Closed(u16),
    /// Centrifugo pinged: answer [`centrifugo::PONG`].
    Pong,
    /// One of the bench's publish frames, to be recorded: its phase (when
    /// it names one) and its latency in µs.
    Delivered {
        /// The trigger's phase (step).
        phase: Option<usize>,
        /// Trigger → delivery, µs.
        latency: u64,
    },
}

impl Session {
    fn new(subscriptions: &Subscriptions, kind: Kind) -> Session {
        let n = subscriptions.len();
        Session {
            received: vec![Vec::new(); n],
            pending: vec![false; n],
            pending_count: 0,
            foreign: 0,
            kind,
            protocol: subscriptions.protocol,
            channels: subscriptions.channels.clone(),
        }
    }

    /// Sends one subscribe frame per room (pipelined: one flush) and
    /// marks their replies as awaited.
    async fn subscribe(&mut self, ws: &mut Ws, frames: &[String]) -> Result<(), String> {
        for frame in frames {
            ws.feed(Message::text(frame.as_str())).await.map_err(|e| format!("subscribe: send: {e}"))?;
        }
        ws.flush().await.map_err(|e| format!("subscribe: send: {e}"))?;
        self.pending.iter_mut().for_each(|p| *p = true);
        self.pending_count = frames.len();
        Ok(())
    }

    /// Reads until every subscribe reply arrived (or `timeout`), handling
    /// publish frames that arrive meanwhile.
    async fn await_replies(&mut self, ws: &mut Ws, ctx: &Ctx) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + ctx.subscribe_timeout;
        while self.pending_count > 0 {
            let next = match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(next) => next,
                Err(_) => {
                    ctx.stats.subscribes_failed.fetch_add(self.pending_count as u64, Ordering::Relaxed);
                    ctx.stats.error("subscribe: no reply in time");
                    return Err("subscribe: timed out".to_string());
                }
            };
            match next {
                Some(Ok(message)) => match self.handle(message, ctx) {
                    Event::Closed(code) => {
                        ctx.stats.subscribes_failed.fetch_add(self.pending_count as u64, Ordering::Relaxed);
                        return Err(format!("closed by server while subscribing ({code})"));
                    }
                    Event::Pong => pong(ws).await,
                    _ => {}
                },
                Some(Err(e)) => {
                    ctx.stats.subscribes_failed.fetch_add(self.pending_count as u64, Ordering::Relaxed);
                    return Err(format!("read error while subscribing: {}", short_ws_error(&e)));
                }
                None => {
                    ctx.stats.subscribes_failed.fetch_add(self.pending_count as u64, Ordering::Relaxed);
                    return Err("connection ended while subscribing".to_string());
                }
            }
        }
        Ok(())
    }

    /// What a stable client hands back: what this session received.
    pub fn outcome(self) -> StableOutcome {
        StableOutcome { received: self.received, foreign: self.foreign }
    }

    /// Handles one frame, recording a delivery at once.
    fn handle(&mut self, message: Message, ctx: &Ctx) -> Event {
        let text = match &message {
            Message::Text(text) => text.as_str(),
            Message::Binary(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => text,
                Err(_) => {
                    ctx.stats.error("binary frame that is not UTF-8");
                    return Event::Nothing;
                }
            },
            Message::Close(frame) => return Event::Closed(frame.as_ref().map_or(1005, |f| u16::from(f.code))),
            _ => return Event::Nothing,
        };
        let now = ctx.now_us();
        let mut deliveries = Vec::new();
        let mut outcome = Event::Nothing;
        self.handle_frame(text, now, ctx, |event| match event {
            Event::Delivered { phase, latency } => deliveries.push((phase, latency)),
            // A close wins over a pong (nothing to answer any more).
            Event::Closed(_) => outcome = event,
            Event::Pong if matches!(outcome, Event::Nothing) => outcome = Event::Pong,
            _ => {}
        });
        for (phase, latency) in deliveries {
            self.record(phase, latency, now, ctx);
        }
        outcome
    }

    /// Handles the text of one frame that arrived at `now` (µs since the
    /// run's epoch), handing each event to `on` (a Centrifugo frame may
    /// carry several replies, one per line); deliveries are not recorded.
    pub fn handle_frame(&mut self, text: &str, now: u64, ctx: &Ctx, mut on: impl FnMut(Event)) {
        match self.protocol {
            Protocol::HighTemplar => on(self.handle_text(text, now, ctx)),
            Protocol::Centrifugo => {
                for line in centrifugo::lines(text) {
                    on(self.handle_centrifugo(line, now, ctx));
                }
            }
        }
    }

    /// Handles one Centrifugo reply line (see [`Session::handle_frame`]).
    fn handle_centrifugo(&mut self, line: &str, now: u64, ctx: &Ctx) -> Event {
        let reply = match centrifugo::parse(line) {
            Ok(reply) => reply,
            Err(e) => {
                ctx.stats.error(e);
                return Event::Nothing;
            }
        };
        match reply {
            Reply::Ping => return Event::Pong,
            Reply::Publication { channel, bench } => {
                let Some(index) = self.channels.iter().position(|c| *c == channel) else {
                    self.foreign += 1;
                    return Event::Nothing;
                };
                let data = bench.map(|b| Data { seq: Some(b.seq), ts: Some(b.ts), p: Some(b.p) });
                return self.delivery(Some(index), data, now);
            }
            Reply::Subscribed(index) => self.subscribe_reply(index, Ok(()), ctx),
            Reply::Failed { id, code, message } => match centrifugo::subscription_index(id) {
                Some(index) => self.subscribe_reply(index, Err(format!("error {code} ({message})")), ctx),
                None => ctx.stats.error(format!("centrifugo: error {code} ({message}) for command {id}")),
            },
            Reply::Disconnect(code, _) => return Event::Closed(u16::try_from(code).unwrap_or(u16::MAX)),
            Reply::Connected => ctx.stats.error("centrifugo: a second connect reply"),
            Reply::Other(what) => ctx.stats.error(format!("centrifugo: {what}")),
        }
        Event::Nothing
    }

    /// Notes the reply to subscription `index`'s subscribe command.
    fn subscribe_reply(&mut self, index: usize, result: Result<(), String>, ctx: &Ctx) {
        if !self.pending.get(index).copied().unwrap_or(false) {
            ctx.stats.error("centrifugo: reply to no pending subscribe");
            return;
        }
        self.pending[index] = false;
        self.pending_count -= 1;
        match result {
            Ok(()) => {
                ctx.stats.subscribes_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                ctx.stats.subscribes_failed.fetch_add(1, Ordering::Relaxed);
                ctx.stats.error(format!("subscribe: {e}"));
            }
        }
    }

    /// Handles the text of one 3.x frame that arrived at `now` (µs since
    /// the run's epoch); a delivery is returned, not recorded.
    fn handle_text(&mut self, text: &str, now: u64, ctx: &Ctx) -> Event {
        if text == "pong" {
            return Event::Nothing;
        }
        if let Some(publish) = BenchPublish::read(text) {
            let data = Data { seq: Some(publish.seq), ts: Some(publish.ts), p: Some(publish.phase) };
            return self.delivery(Some(publish.request_id), Some(data), now);
        }
        let Ok(frame) = serde_json::from_str::<Incoming>(text) else {
            ctx.stats.error("server frame that is not JSON");
            return Event::Nothing;
        };
        let request_id = frame.request_id.as_ref().and_then(Value::as_u64).map(|id| id as usize);
        if frame.kind.as_deref() == Some("publish") {
            return self.delivery(request_id, frame.data, now);
        }
        match (frame.code.as_deref(), request_id) {
            (Some(code), Some(id)) if self.pending.get(id).copied().unwrap_or(false) => {
                self.pending[id] = false;
                self.pending_count -= 1;
                if code == "success" {
                    ctx.stats.subscribes_ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    ctx.stats.subscribes_failed.fetch_add(1, Ordering::Relaxed);
                    ctx.stats.error(format!("subscribe: {}", frame.message.as_deref().unwrap_or(code)));
                }
            }
            (Some(code), _) => {
                ctx.stats.error(format!("unexpected reply: {code} {}", frame.message.as_deref().unwrap_or_default()))
            }
            _ => ctx.stats.error("unexpected server frame"),
        }
        Event::Nothing
    }

    /// Notes one publish frame's sequence number; the bench's are returned
    /// as deliveries, others counted as foreign.
    fn delivery(&mut self, request_id: Option<usize>, data: Option<Data>, now: u64) -> Event {
        let (Some(id), Some(Data { seq: Some(seq), ts: Some(ts), p })) = (request_id, data) else {
            self.foreign += 1;
            return Event::Nothing;
        };
        let Some(slot) = self.received.get_mut(id) else {
            self.foreign += 1;
            return Event::Nothing;
        };
        slot.push(seq as u32);
        Event::Delivered { phase: p, latency: now.saturating_sub(ts).max(1) }
    }

    /// Records one delivery in the statistics of this session's kind.
    fn record(&self, p: Option<usize>, latency: u64, now: u64, ctx: &Ctx) {
        match self.kind {
            Kind::Stable => {
                // Histogram first: the drain wait reads `received`.
                {
                    let mut phases = lock(&ctx.stats.phases);
                    if let Some(phase) = p.and_then(|p| phases.get_mut(p)) {
                        phase.latency.saturating_record(latency);
                        phase.count += 1;
                        phase.last_us = phase.last_us.max(now);
                    }
                }
                ctx.stats.received.fetch_add(1, Ordering::Relaxed);
            }
            Kind::Churn => lock(&ctx.stats.churn_latency).saturating_record(latency),
            Kind::Slow => {}
        }
    }
}

/// Answers Centrifugo's ping; a failure shows up as the next read's error.
async fn pong(ws: &mut Ws) {
    let _ = ws.send(Message::text(centrifugo::PONG)).await;
}

/// A short form of a websocket error for the error counts.
fn short_ws_error(e: &WsError) -> String {
    match e {
        WsError::Io(io) => format!("io: {}", io.kind()),
        WsError::Protocol(p) => format!("protocol: {p}"),
        other => other.to_string(),
    }
}

/// A stable client: connect, wait for the go, subscribe to `frames`
/// (request ids 0..), read until [`Stage::Stop`].
///
/// With `reader`, the subscribed connection is read by the reading thread
/// (see [`crate::reader`]) instead of this task.
pub async fn stable(
    ctx: Arc<Ctx>,
    index: usize,
    frames: Arc<Subscriptions>,
    mut stage: watch::Receiver<Stage>,
    reader: Option<Arc<Reader>>,
) -> StableOutcome {
    let mut session = Session::new(&frames, Kind::Stable);
    let Some(mut ws) = connect_and_subscribe(&ctx, index, &frames.frames, &mut stage, &mut session).await else {
        return session.outcome();
    };
    if let Some(reader) = reader {
        let outcome = match reader.add(ws, session) {
            Ok(outcome) => outcome.await.unwrap_or_default(),
            Err(e) => {
                ctx.stats.error(e);
                StableOutcome::default()
            }
        };
        reach(&mut stage, Stage::Stop).await;
        return outcome;
    }
    let mut ping = ctx.client_ping.map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
    loop {
        let ping_tick = async {
            match ping.as_mut() {
                Some(interval) => {
                    interval.tick().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            next = ws.next() => match next {
                Some(Ok(message)) => match session.handle(message, &ctx) {
                    Event::Closed(code) => {
                        ctx.stats.error(format!("closed by server ({code})"));
                        break;
                    }
                    Event::Pong => pong(&mut ws).await,
                    _ => {}
                },
                Some(Err(e)) => {
                    ctx.stats.error(format!("read error: {}", short_ws_error(&e)));
                    break;
                }
                None => {
                    ctx.stats.error("connection ended by server");
                    break;
                }
            },
            _ = ping_tick => {
                if ws.send(Message::text("ping")).await.is_err() {
                    ctx.stats.error("ping: send failed");
                    break;
                }
            }
            _ = reach(&mut stage, Stage::Stop) => {
                close(ws).await;
                return session.outcome();
            }
        }
    }
    // Ended early: wait for the end of the run so the controller can
    // still collect the results.
    reach(&mut stage, Stage::Stop).await;
    session.outcome()
}

/// Opens the connection, waits for [`Stage::Subscribe`] and subscribes.
/// Counts the outcome in the shared stats; `None` when it failed.
async fn connect_and_subscribe(
    ctx: &Ctx,
    index: usize,
    frames: &[String],
    stage: &mut watch::Receiver<Stage>,
    session: &mut Session,
) -> Option<Ws> {
    let opened = open(ctx, index).await;
    let mut ws = match opened {
        Ok(ws) => {
            ctx.stats.connected.fetch_add(1, Ordering::Relaxed);
            ws
        }
        Err(e) => {
            ctx.stats.connect_failed.fetch_add(1, Ordering::Relaxed);
            ctx.stats.subscribes_failed.fetch_add(frames.len() as u64, Ordering::Relaxed);
            ctx.stats.subscribe_done.fetch_add(1, Ordering::Relaxed);
            ctx.stats.error(e);
            reach(stage, Stage::Stop).await;
            return None;
        }
    };
    // Wait for the go, answering the server's pings meanwhile.
    let failure = loop {
        tokio::select! {
            _ = reach(stage, Stage::Subscribe) => break None,
            next = ws.next() => match next {
                Some(Ok(message)) => match session.handle(message, ctx) {
                    Event::Closed(code) => break Some(format!("closed by server before subscribing ({code})")),
                    Event::Pong => pong(&mut ws).await,
                    _ => {}
                },
                Some(Err(e)) => break Some(format!("read error before subscribing: {}", short_ws_error(&e))),
                None => break Some("connection ended before subscribing".to_string()),
            }
        }
    };
    if let Some(error) = failure {
        ctx.stats.error(error);
        ctx.stats.subscribes_failed.fetch_add(frames.len() as u64, Ordering::Relaxed);
        ctx.stats.subscribe_done.fetch_add(1, Ordering::Relaxed);
        reach(stage, Stage::Stop).await;
        return None;
    }
    if *stage.borrow() >= Stage::Stop {
        ctx.stats.subscribe_done.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let result = match session.subscribe(&mut ws, frames).await {
        Ok(()) => session.await_replies(&mut ws, ctx).await,
        Err(e) => {
            ctx.stats.subscribes_failed.fetch_add(frames.len() as u64, Ordering::Relaxed);
            Err(e)
        }
    };
    ctx.stats.subscribe_done.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(()) => Some(ws),
        Err(e) => {
            ctx.stats.error(e);
            reach(stage, Stage::Stop).await;
            None
        }
    }
}

/// Waits until the controller's stage is at least `target` (or the
/// controller is gone).
async fn reach(stage: &mut watch::Receiver<Stage>, target: Stage) {
    let _ = stage.wait_for(|s| *s >= target).await;
}

/// Closes politely, waiting a little for the server's close frame.
pub async fn close(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// A slow client: connects and subscribes like a stable one, then stops
/// reading. At the end it reads what is left (at most `drain`) to see
/// whether the server closed it as a slow consumer (1013).
pub async fn slow(
    ctx: Arc<Ctx>,
    index: usize,
    frames: Arc<Subscriptions>,
    mut stage: watch::Receiver<Stage>,
    drain: Duration,
) -> SlowOutcome {
    let mut session = Session::new(&frames, Kind::Slow);
    let Some(mut ws) = connect_and_subscribe(&ctx, index, &frames.frames, &mut stage, &mut session).await else {
        return SlowOutcome::default();
    };
    // Stop reading: the socket buffers fill, then the server's queue.
    reach(&mut stage, Stage::Stop).await;
    // Read what is buffered until the end of the connection, a quiet
    // moment (still open), or `drain`.
    let mut outcome = SlowOutcome { subscribed: true, ..SlowOutcome::default() };
    let deadline = tokio::time::Instant::now() + drain;
    loop {
        let quiet = (tokio::time::Instant::now() + Duration::from_millis(200)).min(deadline);
        match tokio::time::timeout_at(quiet, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                outcome.closed_by_server = true;
                outcome.close_code = Some(frame.map_or(1005, |f| u16::from(f.code)));
                break;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => {
                outcome.closed_by_server = true;
                break;
            }
            Err(_) => break,
        }
    }
    outcome
}

/// A churn client: connect, subscribe to `frames`, read for `hold`, close.
pub async fn churn(ctx: Arc<Ctx>, index: usize, subscriptions: Arc<Subscriptions>, hold: Duration) -> ChurnOutcome {
    let frames = &subscriptions.frames;
    let started = Instant::now();
    let mut ws = match open(&ctx, index).await {
        Ok(ws) => ws,
        Err(e) => {
            ctx.stats.subscribes_failed.fetch_add(frames.len() as u64, Ordering::Relaxed);
            ctx.stats.error(format!("churn: {e}"));
            return ChurnOutcome::default();
        }
    };
    let mut session = Session::new(&subscriptions, Kind::Churn);
    let subscribed = match session.subscribe(&mut ws, frames).await {
        Ok(()) => session.await_replies(&mut ws, &ctx).await,
        Err(e) => {
            ctx.stats.subscribes_failed.fetch_add(frames.len() as u64, Ordering::Relaxed);
            Err(e)
        }
    };
    if let Err(e) = subscribed {
        ctx.stats.error(format!("churn: {e}"));
        return ChurnOutcome { connected: true, ..ChurnOutcome::default() };
    }
    lock(&ctx.stats.churn_setup).saturating_record(started.elapsed().as_micros() as u64);
    let _ = tokio::time::timeout(hold, async {
        while let Some(Ok(message)) = ws.next().await {
            match session.handle(message, &ctx) {
                Event::Closed(code) => {
                    ctx.stats.error(format!("churn: closed by server ({code})"));
                    break;
                }
                Event::Pong => pong(&mut ws).await,
                _ => {}
            }
        }
    })
    .await;
    close(ws).await;
    let mut deliveries = 0;
    let mut duplicated = 0;
    for seqs in &mut session.received {
        deliveries += seqs.len() as u64;
        seqs.sort_unstable();
        duplicated += seqs.windows(2).filter(|w| w[0] == w[1]).count() as u64;
    }
    ChurnOutcome { connected: true, deliveries, duplicated }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frame the gateway writes for the bench's trigger data.
    fn gateway_frame(seq: u64, ts: u64, phase: usize, request_id: usize, payload_bytes: usize) -> String {
        // The gateway forwards `data` as it was published, byte for byte.
        let body = String::from_utf8(crate::publish::trigger_body("[]", seq, ts, phase, payload_bytes)).expect("UTF-8");
        let data = body.strip_prefix(r#"{"rooms":[],"data":"#).and_then(|d| d.strip_suffix('}')).expect("body shape");
        format!(r#"{{"type":"publish","data":{data},"requestId":{request_id}}}"#)
    }

    #[test]
    fn reads_the_bench_publish_frame_like_serde_json() {
        for (seq, ts, phase, id, pad) in
            [(0, 1, 0, 0, 0), (7, 123_456_789, 3, 4_999, 128), (u32::MAX as u64, 9, 12, 1, 1024)]
        {
            let text = gateway_frame(seq, ts, phase, id, pad);
            let fast = BenchPublish::read(&text).unwrap_or_else(|| panic!("fast path reads {text}"));
            let slow: Incoming = serde_json::from_str(&text).expect("JSON");
            let data = slow.data.expect("data");
            assert_eq!((Some(fast.seq), Some(fast.ts), Some(fast.phase)), (data.seq, data.ts, data.p), "{text}");
            assert_eq!(slow.request_id.and_then(|v| v.as_u64()), Some(fast.request_id as u64));
        }
    }

    #[test]
    fn leaves_other_shapes_to_serde_json() {
        for text in [
            r#"{"type": "publish", "data": {"seq": 1, "ts": 2, "p": 0}, "requestId": 3}"#,
            r#"{"type":"publish","requestId":3,"data":{"seq":1,"ts":2,"p":0}}"#,
            r#"{"type":"publish","data":{"seq":1,"ts":2,"p":0},"requestId":"3"}"#,
            r#"{"type":"publish","data":{"seq":1,"ts":2,"p":0x},"requestId":3}"#,
            r#"{"type":"publish","data":{"seq":1,"ts":2,"p":0},"requestId":3} "#,
            r#"{"type":"publish","data":{"seq":1,"ts":2,"p":0,"pad":"x"},"requestId":3,"requestId":4x}"#,
            r#"{"type":"publish","data":{"seq":99999999999999999999,"ts":2,"p":0},"requestId":3}"#,
            r#"{"type":"publish","data":{"seq":1,"ts":2,"p":0,"x":",\"requestId\":5"}"#,
        ] {
            assert_eq!(BenchPublish::read(text), None, "{text}");
        }
    }
}
