//! `Session`: one websocket connection, from the bootstrap call to close.
//!
//! One task per connection drives everything: it reads client frames,
//! answers them, writes queued publish frames in batches (feed all that is
//! queued, flush once), sends server pings, and enforces the idle timeout.
//! It stops for one [`Stop`] reason, sends the matching close frame, and
//! removes its subscriptions from the hub.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use axum::http::{HeaderName, HeaderValue};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{Sleep, interval_at, sleep};
use tracing::{debug, info};

use crate::backend::CLOSE_TRY_AGAIN_LATER;
use crate::config::seconds;
use crate::gateway::Gateway;
use crate::hub::{Delivery, SessionHandle};
use crate::index::SubscriptionId;
use crate::metrics::Reason;
use crate::protocol::{self, ClientFrame, RequestError, RequestId};
use crate::room::Room;

/// Close code when a client message exceeds `limits.maxMessageBytes`.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code on graceful shutdown.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for the idle timeout.
pub const CLOSE_NORMAL: u16 = 1000;

/// Publish frames written per flush at most, so a busy queue cannot starve
/// reading the client.
const MAX_BATCH: usize = 256;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The client closed or the socket failed.
    ClientGone,
    /// No client frame within the idle timeout.
    Idle,
    /// The client could not keep up (queue overflow or stuck writes).
    SlowConsumer,
    /// A client message over the size limit.
    TooBig,
    /// The process is shutting down.
    Shutdown,
}

impl Stop {
    /// The close frame to send, if any.
    fn close(self) -> Option<(u16, &'static str)> {
        match self {
            Stop::ClientGone => None,
            Stop::Idle => Some((CLOSE_NORMAL, "idle timeout")),
            Stop::SlowConsumer => Some((CLOSE_TRY_AGAIN_LATER, "slow consumer")),
            Stop::TooBig => Some((CLOSE_TOO_BIG, "message too big")),
            Stop::Shutdown => Some((CLOSE_GOING_AWAY, "server shutting down")),
        }
    }

    /// Metric label of a gateway-initiated close.
    fn label(self) -> &'static str {
        match self {
            Stop::ClientGone => "client_gone",
            Stop::Idle => "idle",
            Stop::SlowConsumer => "slow_consumer",
            Stop::TooBig => "message_too_big",
            Stop::Shutdown => "shutdown",
        }
    }
}

/// The protocol state of one authorised connection: what it may join and
/// what it has joined. Socket I/O lives in [`run`].
struct Session {
    /// Rooms the backend allowed.
    allowed: Vec<Room>,
    /// Subscriptions by `requestId`.
    subscriptions: HashMap<RequestId, (Room, SubscriptionId)>,
    /// This session's queue and overflow flag, as the hub sees them.
    handle: Arc<SessionHandle>,
    /// Shared process state.
    gateway: Arc<Gateway>,
}

impl Session {
    /// Answers one client text frame (every frame gets exactly one reply).
    fn on_text(&mut self, text: &str) -> String {
        match protocol::parse_client_frame(text) {
            Err(e) => protocol::error(e.code(), None),
            Ok(ClientFrame::Ping) => protocol::PONG.to_string(),
            Ok(ClientFrame::Subscribe { room, request_id }) => {
                let Some(request_id) = request_id else {
                    return protocol::error(RequestError::NoRequestId.code(), None);
                };
                match self.subscribe(room, &request_id) {
                    Ok(()) => protocol::success(&request_id),
                    Err(e) => protocol::error(e.code(), Some(&request_id)),
                }
            }
            Ok(ClientFrame::Unsubscribe { request_id }) => {
                let Some(request_id) = request_id else {
                    return protocol::error(RequestError::NoRequestId.code(), None);
                };
                match self.subscriptions.remove(&request_id) {
                    Some((room, id)) => {
                        self.gateway.hub.unsubscribe([(&room, id)]);
                        protocol::success(&request_id)
                    }
                    None => protocol::error(RequestError::NotSubscribed.code(), Some(&request_id)),
                }
            }
            Ok(ClientFrame::Status { request_id }) => {
                if self.gateway.config.client_status.enabled {
                    protocol::status(&self.gateway.hub.status(), request_id.as_ref())
                } else {
                    protocol::error(protocol::FrameError::TypeNotAllowed.code(), request_id.as_ref())
                }
            }
        }
    }

    fn subscribe(
        &mut self,
        room: Result<Room, crate::room::InvalidRoom>,
        request_id: &RequestId,
    ) -> Result<(), RequestError> {
        let room = room.map_err(|_| RequestError::InvalidRoom)?;
        if self.subscriptions.contains_key(request_id) {
            return Err(RequestError::RequestIdInUse);
        }
        if self.subscriptions.len() >= self.gateway.config.limits.max_subscriptions_per_connection {
            return Err(RequestError::TooManySubscriptions);
        }
        if !self.allowed.iter().any(|a| a.permits(&room)) {
            return Err(RequestError::RoomNotFound);
        }
        let id = self.gateway.hub.subscribe(&self.handle, &room, request_id);
        self.subscriptions.insert(request_id.clone(), (room, id));
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.gateway.hub.unsubscribe(self.subscriptions.iter().map(|(_, (room, id))| (room, *id)));
    }
}

/// Decrements the open-connections gauge however the session ends.
struct OpenConnection(Arc<Gateway>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.metrics.connections_open.dec();
    }
}

fn close_message(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }))
}

/// Runs `write` unless the client proves too slow first: its queue
/// overflowed, or the write is still stuck when the idle timer fires.
/// Both futures live for the whole session, so a write registers no timer
/// and no waiter of its own (this runs once per delivery batch).
async fn write_or_stop<F>(
    write: F,
    overflowed: Pin<&mut impl Future<Output = ()>>,
    idle: Pin<&mut Sleep>,
) -> Result<(), Stop>
where
    F: Future<Output = Result<(), axum::Error>>,
{
    tokio::select! {
        result = write => result.map_err(|_| Stop::ClientGone),
        _ = overflowed => Err(Stop::SlowConsumer),
        _ = idle => Err(Stop::SlowConsumer),
    }
}

/// Feeds the first delivery and whatever else is queued (up to
/// [`MAX_BATCH`]), then flushes once.
async fn write_batch(
    socket: &mut WebSocket,
    first: Delivery,
    queue: &mut mpsc::Receiver<Delivery>,
) -> Result<(), axum::Error> {
    socket.feed(Message::Text(first.text().into())).await?;
    for _ in 1..MAX_BATCH {
        let Ok(next) = queue.try_recv() else { break };
        socket.feed(Message::Text(next.text().into())).await?;
    }
    socket.flush().await
}

fn is_too_big(e: &axum::Error) -> bool {
    // axum wraps the tungstenite error; a size limit is `Capacity`.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tungstenite::Error::Capacity(_)) = err.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Drives one websocket from bootstrap to close.
pub async fn run(
    mut socket: WebSocket,
    gateway: Arc<Gateway>,
    backend_headers: Vec<(HeaderName, HeaderValue)>,
    peer: SocketAddr,
) {
    gateway.metrics.connections_open.inc();
    gateway.metrics.connections.inc();
    let _open = OpenConnection(gateway.clone());
    let started = Instant::now();
    let limits = &gateway.config.limits;
    let idle_timeout = seconds(limits.idle_timeout_seconds);

    // Boxed: the HTTP call's state would otherwise be part of this task's
    // allocation for the whole life of the connection.
    let allowed = match Box::pin(gateway.backend.bootstrap(backend_headers)).await {
        Ok(allowed) => allowed,
        Err(e) => {
            info!(peer = %peer, outcome = e.outcome(), error = %e, "connection refused");
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                socket.send(Message::Text(Utf8Bytes::from_static(protocol::UNAUTHORIZED))).await?;
                socket.send(close_message(e.close_code(), "not authorized")).await
            })
            .await;
            return;
        }
    };
    info!(peer = %peer, allowed_rooms = allowed.len(), "connection authorized");
    if socket.send(Message::Text(protocol::authorized(&allowed).into())).await.is_err() {
        return;
    }

    let (handle, mut queue) = gateway.hub.open_session(limits.outbound_queue);
    let mut session =
        Session { allowed, subscriptions: HashMap::new(), handle: handle.clone(), gateway: gateway.clone() };

    let ping_every = seconds(limits.ping_interval_seconds);
    let mut pings = interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    // Created once and reset, not re-created per loop turn: each new timer
    // or cancellation waiter costs a registration.
    let idle = sleep(idle_timeout);
    tokio::pin!(idle);
    let overflowed = handle.overflowed();
    tokio::pin!(overflowed);
    // On shutdown each session waits a random part of the close window, so
    // clients reconnect to other pods spread out rather than all at once.
    let window = seconds(gateway.config.shutdown.close_window_seconds);
    let shutdown = {
        let gateway = gateway.clone();
        async move {
            gateway.close_sessions.cancelled().await;
            sleep(window.mul_f64(rand::random::<f64>())).await;
        }
    };
    tokio::pin!(shutdown);

    let stop = loop {
        tokio::select! {
            biased;
            _ = &mut overflowed => break Stop::SlowConsumer,
            _ = &mut shutdown => break Stop::Shutdown,
            _ = &mut idle => break Stop::Idle,
            frame = socket.next() => {
                let text = match frame {
                    None => break Stop::ClientGone,
                    Some(Err(e)) if is_too_big(&e) => break Stop::TooBig,
                    Some(Err(_)) => break Stop::ClientGone,
                    Some(Ok(Message::Close(_))) => break Stop::ClientGone,
                    Some(Ok(Message::Text(t))) => Some(t),
                    Some(Ok(Message::Binary(b))) => Some(Utf8Bytes::try_from(b).unwrap_or_default()),
                    // Browsers answer pings by themselves: a pong says the
                    // peer is alive, not that the client is active.
                    Some(Ok(Message::Pong(_))) => continue,
                    Some(Ok(Message::Ping(_))) => None,
                };
                idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                if let Some(text) = text {
                    let reply = session.on_text(&text);
                    if let Err(stop) = write_or_stop(socket.send(Message::Text(reply.into())), overflowed.as_mut(), idle.as_mut()).await {
                        break stop;
                    }
                }
            }
            Some(first) = queue.recv() => {
                if let Err(stop) = write_or_stop(write_batch(&mut socket, first, &mut queue), overflowed.as_mut(), idle.as_mut()).await {
                    break stop;
                }
            }
            _ = pings.tick() => {
                if let Err(stop) = write_or_stop(socket.send(Message::Ping(Default::default())), overflowed.as_mut(), idle.as_mut()).await {
                    break stop;
                }
            }
        }
    };

    // Unsubscribe before the close frame: nothing more is queued for us.
    drop(session);
    if stop != Stop::ClientGone {
        gateway.metrics.disconnects.get_or_create(&Reason { reason: stop.label() }).inc();
    }
    if let Some((code, reason)) = stop.close() {
        let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(close_message(code, reason))).await;
    }
    info!(
        peer = %peer,
        reason = stop.label(),
        duration_ms = started.elapsed().as_millis() as u64,
        "connection closed"
    );
    debug!(queued_left = queue.len(), "session ended");
}
