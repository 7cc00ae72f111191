//! `Session`: one websocket connection, from the bootstrap call to close.
//!
//! One task per connection drives everything: it reads client frames and
//! answers them (pipelined frames already read are all answered before one
//! flush), writes queued publish frames in batches (feed all that is
//! queued, flush once), sends server pings, and enforces the idle timeout.
//!
//! The task is what every idle connection costs, so it is kept small: the
//! socket is boxed, one timer serves pings, the idle timeout, the shutdown
//! spread and stuck writes (its deadline is moved lazily: activity only
//! updates a field and the timer re-checks when it fires), and the queue
//! allocates nothing until the first delivery.
//! It stops for one `Stop` reason, sends the matching close frame, and
//! removes its subscriptions from the hub.
//!
//! Permissions stay live: a `refresh` control message (or the periodic
//! `permissions.refreshSeconds`) re-runs bootstrap with the connection's
//! original request, alongside everything else (deliveries keep flowing
//! while the call runs), and drops the subscriptions the answer no longer
//! permits, each with an `unsubscribed` frame. A refused user is closed
//! with 4401; a failed call keeps the current permissions and is retried
//! with backoff. A `disconnect` closes with the code it gives.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, Utf8Bytes};

use crate::admission::Admitted;
use axum::http::{HeaderName, HeaderValue};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::time::{Instant, Sleep, sleep_until};
use tracing::{debug, info, warn};

use crate::backend::{Bootstrap, BootstrapError, CLOSE_TRY_AGAIN_LATER, CLOSE_UNAUTHORIZED};
use crate::config::seconds;
use crate::gateway::Gateway;
use crate::identity::UserId;
use crate::index::SubscriptionId;
use crate::log_throttle::LogThrottle;
use crate::metrics::{Outcome, Reason};
use crate::outbound::{OutboundQueue, QueueSocket, Ready};
use crate::protocol::{self, ClientFrame, RequestError, RequestId, RequestIdField};
use crate::refresh::Refresh;
use crate::room::Room;
use crate::websocket::Socket;

/// Close code when a client message exceeds `limits.maxMessageBytes`.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code on graceful shutdown.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for the idle timeout.
pub const CLOSE_NORMAL: u16 = 1000;
/// Close code for a frame that breaks RFC 6455 (unmasked, bad opcode, …).
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code for a text message that is not UTF-8 (RFC 6455 §8.1).
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;

/// Publish frames written per flush at most, so a busy queue cannot starve
/// reading the client; also the most pipelined client frames answered per
/// flush, so a chatty client cannot starve its deliveries.
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
    /// A frame that breaks the websocket protocol.
    ProtocolError,
    /// A text message that is not UTF-8.
    InvalidUtf8,
    /// The process is shutting down.
    Shutdown,
    /// A refresh found the user refused (401/403).
    Revoked,
    /// A `disconnect` control message, with its close code.
    Disconnected(u16),
}

impl Stop {
    /// The close frame to send, if any.
    fn close(self) -> Option<(u16, &'static str)> {
        match self {
            Stop::ClientGone => None,
            Stop::Idle => Some((CLOSE_NORMAL, "idle timeout")),
            Stop::SlowConsumer => Some((CLOSE_TRY_AGAIN_LATER, "slow consumer")),
            Stop::TooBig => Some((CLOSE_TOO_BIG, "message too big")),
            Stop::ProtocolError => Some((CLOSE_PROTOCOL_ERROR, "protocol error")),
            Stop::InvalidUtf8 => Some((CLOSE_INVALID_PAYLOAD, "text is not UTF-8")),
            Stop::Shutdown => Some((CLOSE_GOING_AWAY, "server shutting down")),
            Stop::Revoked => Some((CLOSE_UNAUTHORIZED, "not authorized")),
            Stop::Disconnected(code) => Some((code, "disconnected")),
        }
    }

    /// Metric label of a gateway-initiated close.
    fn label(self) -> &'static str {
        match self {
            Stop::ClientGone => "client_gone",
            Stop::Idle => "idle",
            Stop::SlowConsumer => "slow_consumer",
            Stop::TooBig => "message_too_big",
            Stop::ProtocolError => "protocol_error",
            Stop::InvalidUtf8 => "invalid_utf8",
            Stop::Shutdown => "shutdown",
            Stop::Revoked => "permission_revoked",
            Stop::Disconnected(_) => "disconnected",
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
    /// Bytes its allowed rooms and subscriptions hold, roughly
    /// ([`subscription_bytes`]), against `limits.maxConnectionBytes`.
    held_bytes: usize,
    /// This session's queue and overflow flag, as the hub sees them.
    queue: Arc<OutboundQueue>,
    /// Who the connection belongs to (`permissions.userPath`), registered
    /// with the hub for control messages.
    user: Option<UserId>,
    /// Shared process state.
    gateway: Arc<Gateway>,
}

impl Session {
    /// Answers one client text frame (every frame gets exactly one reply).
    fn on_text(&mut self, text: &str) -> String {
        match protocol::parse_client_frame(text, self.gateway.config.limits.max_request_id_bytes) {
            Err(e) => protocol::error(e.code(), None),
            Ok(ClientFrame::Ping) => protocol::PONG.to_string(),
            Ok(ClientFrame::Subscribe { room, request_id }) => {
                let request_id = match request_id {
                    RequestIdField::Id(id) => id,
                    RequestIdField::Missing => return protocol::error(RequestError::NoRequestId.code(), None),
                    RequestIdField::TooLong => return protocol::error(RequestError::InvalidRequestId.code(), None),
                };
                match self.subscribe(room, &request_id) {
                    Ok(()) => protocol::success(&request_id),
                    Err(e) => protocol::error(e.code(), Some(&request_id)),
                }
            }
            Ok(ClientFrame::Unsubscribe { request_id }) => {
                let request_id = match request_id {
                    RequestIdField::Id(id) => id,
                    RequestIdField::Missing => return protocol::error(RequestError::NoRequestId.code(), None),
                    RequestIdField::TooLong => return protocol::error(RequestError::InvalidRequestId.code(), None),
                };
                match self.subscriptions.remove(&request_id) {
                    Some((room, id)) => {
                        self.held_bytes = self.held_bytes.saturating_sub(subscription_bytes(&room, &request_id));
                        self.gateway.hub.unsubscribe([(&room, id)]);
                        protocol::success(&request_id)
                    }
                    None => protocol::error(RequestError::NotSubscribed.code(), Some(&request_id)),
                }
            }
            Ok(ClientFrame::Status { request_id }) => {
                if self.gateway.config.client_status.enabled {
                    protocol::status(&self.gateway.hub.status(), request_id.id())
                } else {
                    protocol::error(protocol::FrameError::TypeNotAllowed.code(), request_id.id())
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
        let cost = subscription_bytes(&room, request_id);
        if self.held_bytes + cost > self.gateway.config.limits.max_connection_bytes {
            return Err(RequestError::TooManySubscriptions);
        }
        if !self.allowed.iter().any(|a| a.permits(&room)) {
            return Err(RequestError::RoomNotFound);
        }
        let id = self.gateway.hub.subscribe(&self.queue, &room, request_id);
        self.subscriptions.insert(request_id.clone(), (room, id));
        self.held_bytes += cost;
        Ok(())
    }

    /// Changes the registered identity.
    fn set_user(&mut self, user: Option<UserId>) {
        if user == self.user {
            return;
        }
        if let Some(old) = self.user.take() {
            self.held_bytes = self.held_bytes.saturating_sub(old.approx_bytes());
            self.gateway.hub.remove_user_session(&old, &self.queue);
        }
        if let Some(new) = &user {
            self.held_bytes += new.approx_bytes();
            self.gateway.hub.add_user_session(new, &self.queue);
        }
        self.user = user;
    }

    /// Takes a refreshed answer: the new allowed rooms and identity; the
    /// subscriptions they no longer permit are dropped, and their
    /// `unsubscribed` frames returned. `Err` when the new allowed rooms do
    /// not fit `limits.maxConnectionBytes`.
    fn refreshed(&mut self, answer: Bootstrap) -> Result<Vec<String>, Stop> {
        let old_bytes: usize = self.allowed.iter().map(Room::approx_bytes).sum();
        let new_bytes: usize = answer.allowed.iter().map(Room::approx_bytes).sum();
        let held = self.held_bytes.saturating_sub(old_bytes) + new_bytes;
        if held > self.gateway.config.limits.max_connection_bytes {
            return Err(Stop::Revoked);
        }
        self.held_bytes = held;
        self.allowed = answer.allowed;
        let revoked: Vec<RequestId> = self
            .subscriptions
            .iter()
            .filter(|(_, (room, _))| !self.allowed.iter().any(|a| a.permits(room)))
            .map(|(request_id, _)| request_id.clone())
            .collect();
        let mut frames = Vec::with_capacity(revoked.len());
        let mut dropped = Vec::with_capacity(revoked.len());
        for request_id in revoked {
            if let Some((room, id)) = self.subscriptions.remove(&request_id) {
                self.held_bytes = self.held_bytes.saturating_sub(subscription_bytes(&room, &request_id));
                frames.push(protocol::unsubscribed(&request_id, protocol::PERMISSION_REVOKED));
                dropped.push((room, id));
            }
        }
        self.gateway.hub.unsubscribe(dropped.iter().map(|(room, id)| (room, *id)));
        self.gateway.metrics.subscriptions_revoked.inc_by(frames.len() as u64);
        self.set_user(answer.user);
        Ok(frames)
    }
}

/// What one subscription holds, roughly: its room twice (the session's map
/// and the hub's index), its id twice (map key and publish suffix), and the
/// entries around them.
fn subscription_bytes(room: &Room, request_id: &RequestId) -> usize {
    const ENTRIES: usize = 160;
    2 * room.approx_bytes() + 2 * request_id.as_json().len() + ENTRIES
}

impl Drop for Session {
    fn drop(&mut self) {
        self.gateway.hub.unsubscribe(self.subscriptions.iter().map(|(_, (room, id))| (room, *id)));
        if let Some(user) = &self.user {
            self.gateway.hub.remove_user_session(user, &self.queue);
        }
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
    Message::Close(Some(CloseFrame { code: code.into(), reason: Utf8Bytes::from_static(reason) }))
}

/// When the session's one timer must next look at the session.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    /// No client activity by then: close with 1000. Also the latest a
    /// write may still be stuck before the client counts as too slow.
    idle_at: Instant,
    /// Next server ping.
    ping_at: Instant,
    /// Shutdown: close with 1001 then (a random point of the close window).
    close_at: Option<Instant>,
}

impl Deadlines {
    /// The earliest of them, and `refresh` (the next refresh call's).
    fn next(&self, refresh: Option<Instant>) -> Instant {
        let next = self.idle_at.min(self.ping_at);
        let next = self.close_at.map_or(next, |close| close.min(next));
        refresh.map_or(next, |refresh| refresh.min(next))
    }
}

/// Runs `write` unless the client proves too slow first: its queue
/// overflowed, or the write is still stuck at `deadline`. The session's
/// timer is reused (moved to `deadline` only if it fires meanwhile), so a
/// write registers no timer of its own; this runs once per delivery batch.
///
/// A hand-written future over a pinned borrow rather than an `async fn`:
/// an `async fn` would store `write` twice (argument and pinned local), and
/// the largest such state sets the size of every connection's task.
struct WriteOrStop<'a, F> {
    /// The write, pinned by the caller.
    write: Pin<&'a mut F>,
    /// The session's queue, for its overflow flag.
    queue: &'a OutboundQueue,
    /// The session's one timer.
    timer: Pin<&'a mut Sleep>,
    /// The write must be done by then.
    deadline: Instant,
}

fn write_or_stop<'a, F>(
    write: Pin<&'a mut F>,
    queue: &'a OutboundQueue,
    timer: Pin<&'a mut Sleep>,
    deadline: Instant,
) -> WriteOrStop<'a, F> {
    WriteOrStop { write, queue, timer, deadline }
}

impl<T, F> Future for WriteOrStop<'_, F>
where
    F: Future<Output = Result<T, Stop>>,
{
    type Output = Result<T, Stop>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is Unpin (the write is behind a pinned borrow).
        let this = self.get_mut();
        if let Poll::Ready(result) = this.write.as_mut().poll(cx) {
            return Poll::Ready(result);
        }
        if this.queue.poll_overflowed(cx).is_ready() {
            return Poll::Ready(Err(Stop::SlowConsumer));
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= this.deadline {
                return Poll::Ready(Err(Stop::SlowConsumer));
            }
            this.timer.as_mut().reset(this.deadline);
        }
        Poll::Pending
    }
}

/// Writes `frames` with one flush.
async fn write_frames(socket: &mut QueueSocket<'_>, frames: Vec<String>) -> Result<(), Stop> {
    for frame in frames {
        socket.feed(Message::Text(frame.into())).await.map_err(|_| Stop::ClientGone)?;
    }
    socket.flush().await.map_err(|_| Stop::ClientGone)
}

/// Feeds queued publish frames (up to [`MAX_BATCH`]), then flushes once
/// (which also finishes what a write-through left in the socket's buffer).
async fn write_batch(socket: &mut QueueSocket<'_>, queue: &OutboundQueue) -> Result<(), Stop> {
    poll_fn(|cx| queue.poll_feed(cx, MAX_BATCH)).await.map_err(|_| Stop::ClientGone)?;
    socket.flush().await.map_err(|_| Stop::ClientGone)
}

/// A client frame, as far as the session is concerned.
enum Incoming {
    /// A request (text, or binary holding UTF-8).
    Text(Utf8Bytes),
    /// A websocket ping (tungstenite answers it): activity, no reply.
    Ping,
    /// A websocket pong: the peer is alive, but browsers send these by
    /// themselves, so it is not client activity.
    Pong,
}

impl Incoming {
    fn read(frame: Option<Result<Message, tungstenite::Error>>) -> Result<Incoming, Stop> {
        match frame {
            None => Err(Stop::ClientGone),
            Some(Err(e)) => Err(read_error(&e)),
            Some(Ok(Message::Close(_))) => Err(Stop::ClientGone),
            Some(Ok(Message::Text(t))) => Ok(Incoming::Text(t)),
            Some(Ok(Message::Binary(b))) => Ok(Incoming::Text(Utf8Bytes::try_from(b).unwrap_or_default())),
            Some(Ok(Message::Ping(_))) => Ok(Incoming::Ping),
            // Not produced by reading (raw frames are for writing only).
            Some(Ok(Message::Pong(_) | Message::Frame(_))) => Ok(Incoming::Pong),
        }
    }
}

/// Answers `first` and every further client frame that can be read without
/// waiting (a pipelined burst of subscribes), then flushes the replies once.
/// Returns whether any frame counted as client activity.
async fn answer_frames(
    socket: &mut QueueSocket<'_>,
    session: &mut Session,
    first: Option<Result<Message, tungstenite::Error>>,
) -> Result<bool, Stop> {
    let mut frame = first;
    let mut active = false;
    let mut unflushed = false;
    for answered in 1.. {
        match Incoming::read(frame)? {
            Incoming::Pong => {}
            Incoming::Ping => active = true,
            Incoming::Text(text) => {
                // Replies go before any publish the request leads to (a
                // subscribe's success before its first publish): once per
                // burst, released by its flush.
                if !unflushed {
                    session.queue.hold_writes();
                }
                active = true;
                let reply = session.on_text(&text);
                socket.feed(Message::Text(reply.into())).await.map_err(|_| Stop::ClientGone)?;
                unflushed = true;
            }
        }
        // A frame taken here must be answered, so look only while under the cap.
        if answered == MAX_BATCH {
            break;
        }
        match socket.next().now_or_never() {
            Some(next) => frame = next,
            None => break,
        }
    }
    if unflushed {
        socket.flush().await.map_err(|_| Stop::ClientGone)?;
    }
    Ok(active)
}

/// Why reading failed: a size limit (`Capacity`), a protocol violation, a
/// text frame that is not UTF-8 (each answered with its close code, RFC
/// 6455 §7.1.7), or the connection itself (nothing to answer).
fn read_error(e: &tungstenite::Error) -> Stop {
    match e {
        tungstenite::Error::Capacity(_) => Stop::TooBig,
        tungstenite::Error::Protocol(_) => Stop::ProtocolError,
        tungstenite::Error::Utf8(_) => Stop::InvalidUtf8,
        _ => Stop::ClientGone,
    }
}

/// Drives one websocket from bootstrap to close.
///
/// A plain function around `serve`: the socket is boxed before the
/// connection's future exists, so that future (the bulk of what an idle
/// connection costs) holds a pointer instead of the socket, which rustc
/// would otherwise store twice (argument and local).
pub fn run(
    socket: Socket,
    gateway: Arc<Gateway>,
    admitted: Option<Admitted>,
    backend_headers: Vec<(HeaderName, HeaderValue)>,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    serve(Box::new(socket), gateway, admitted, backend_headers, peer)
}

async fn serve(
    mut socket: Box<Socket>,
    gateway: Arc<Gateway>,
    admitted: Option<Admitted>,
    backend_headers: Vec<(HeaderName, HeaderValue)>,
    peer: SocketAddr,
) {
    gateway.metrics.connections_open.inc();
    gateway.metrics.connections.inc();
    let _open = OpenConnection(gateway.clone());
    let started = std::time::Instant::now();
    let limits = &gateway.config.limits;
    // Durations are computed from the config where used, not kept (nor
    // captured by closures): every local here sizes every connection's task.
    let idle_timeout = |g: &Gateway| seconds(g.config.limits.idle_timeout_seconds);

    // Boxed: the HTTP call's state would otherwise be part of this task's
    // allocation for the whole life of the connection.
    // The admission slot is held for the call only (inside the box, so it
    // does not size the task).
    // Boxed before the call: the kept request costs the task a pointer.
    let mut refresh = Refresh::new(backend_headers.clone(), &gateway, Instant::now());
    let bootstrap = gateway.backend.bootstrap(backend_headers, admitted, &gateway.admission, crate::backend::CONNECT);
    let Bootstrap { allowed, user } = match Box::pin(bootstrap).await {
        Ok(answer) => answer,
        Err(e) => {
            info!(peer = %peer, outcome = e.outcome(), error = %e, "connection refused");
            // Boxed, as this rare path would otherwise size every task.
            let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), async {
                socket.send(Message::Text(Utf8Bytes::from_static(protocol::UNAUTHORIZED))).await?;
                socket.send(close_message(e.close_code(), "not authorized")).await
            }))
            .await;
            return;
        }
    };
    let allowed_bytes: usize = allowed.iter().map(Room::approx_bytes).sum();
    if allowed_bytes > limits.max_connection_bytes {
        info!(peer = %peer, allowed_rooms = allowed.len(), allowed_bytes, "connection refused: allowed rooms over limits.maxConnectionBytes");
        gateway.metrics.disconnects.get_or_create(&Reason { reason: "over_budget" }).inc();
        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), async {
            socket.send(Message::Text(Utf8Bytes::from_static(protocol::UNAUTHORIZED))).await?;
            socket.send(close_message(crate::backend::CLOSE_UNAUTHORIZED, "not authorized")).await
        }))
        .await;
        return;
    }
    info!(peer = %peer, allowed_rooms = allowed.len(), "connection authorized");
    // The first frame can be large (every allowed room): a client that
    // does not read it must not hold the connection past the idle timeout.
    // Boxed: it would otherwise size every connection's task.
    let first = Message::Text(protocol::authorized(&allowed).into());
    match Box::pin(tokio::time::timeout(idle_timeout(&gateway), socket.send(first))).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return,
        Err(_) => {
            gateway.metrics.disconnects.get_or_create(&Reason { reason: Stop::SlowConsumer.label() }).inc();
            info!(peer = %peer, reason = Stop::SlowConsumer.label(), "connection closed: the first frame was not read");
            return;
        }
    }

    let queue = Arc::new(OutboundQueue::new(limits.outbound_queue));
    // From here on the queue holds the socket, so the fan-out can write a
    // delivery through to it; the session's own I/O goes through the queue.
    queue.attach(socket);
    let mut socket = QueueSocket(&queue);
    let mut session = Session {
        allowed,
        subscriptions: HashMap::new(),
        held_bytes: allowed_bytes,
        queue: queue.clone(),
        user: None,
        gateway: gateway.clone(),
    };
    session.set_user(user);
    let now = Instant::now();
    refresh.schedule_periodic(&gateway, now);
    session.held_bytes += refresh.request_bytes();

    let ping_every = |g: &Gateway| seconds(g.config.limits.ping_interval_seconds);
    let mut clock =
        Deadlines { idle_at: now + idle_timeout(&gateway), ping_at: now + ping_every(&gateway), close_at: None };
    let timer = sleep_until(clock.next(refresh.due()));
    tokio::pin!(timer);
    let shutdown = gateway.close_sessions.cancelled();
    tokio::pin!(shutdown);
    // On shutdown each session waits a random part of the close window, so
    // clients reconnect to other pods spread out rather than all at once.
    let window = |g: &Gateway| seconds(g.config.shutdown.close_window_seconds);

    let stop = loop {
        let can_refresh = !refresh.is_running();
        tokio::select! {
            biased;
            _ = &mut shutdown, if clock.close_at.is_none() => {
                clock.close_at = Some(Instant::now() + window(&gateway).mul_f64(rand::random::<f64>()));
            }
            _ = timer.as_mut() => {
                let now = Instant::now();
                if clock.close_at.is_some_and(|close| now >= close) {
                    break Stop::Shutdown;
                }
                if now >= clock.idle_at {
                    break Stop::Idle;
                }
                refresh.start_if_due(&gateway, now);
                if now >= clock.ping_at {
                    clock.ping_at = now + ping_every(&gateway);
                    let ping = async { socket.send(Message::Ping(Default::default())).await.map_err(|_| Stop::ClientGone) };
                    if let Err(stop) = write_or_stop(pin!(ping), &queue, timer.as_mut(), clock.idle_at).await {
                        break stop;
                    }
                }
                // Fired early (activity moved a deadline): look again later.
                timer.as_mut().reset(clock.next(refresh.due()));
            }
            frame = socket.next() => {
                // Boxed (once per burst of client frames, not per delivery):
                // it is the largest state and would size every idle task.
                match write_or_stop(Box::pin(answer_frames(&mut socket, &mut session, frame)).as_mut(), &queue, timer.as_mut(), clock.idle_at).await {
                    Ok(true) => clock.idle_at = Instant::now() + idle_timeout(&gateway),
                    Ok(false) => {}
                    Err(stop) => break stop,
                }
            }
            answer = poll_fn(|cx| refresh.poll_answer(cx)) => {
                match answer {
                    Ok(answer) => {
                        refresh.succeeded(&gateway, Instant::now());
                        let frames = match session.refreshed(answer) {
                            Ok(frames) => frames,
                            Err(stop) => break stop,
                        };
                        let outcome = if frames.is_empty() { "unchanged" } else { "revoked" };
                        gateway.metrics.permission_refreshes.get_or_create(&Outcome { outcome }).inc();
                        if !frames.is_empty() {
                            info!(peer = %peer, revoked = frames.len(), "subscriptions revoked by a refresh");
                            // Boxed: rare, and it would size every task.
                            if let Err(stop) = write_or_stop(Box::pin(write_frames(&mut socket, frames)).as_mut(), &queue, timer.as_mut(), clock.idle_at).await {
                                break stop;
                            }
                        }
                    }
                    Err(BootstrapError::Denied(status)) if status.as_u16() == 401 || status.as_u16() == 403 => {
                        gateway.metrics.permission_refreshes.get_or_create(&Outcome { outcome: "denied" }).inc();
                        break Stop::Revoked;
                    }
                    Err(e) => {
                        // The current permissions stay until an answer says
                        // otherwise: a backend outage must not log everyone out.
                        gateway.metrics.permission_refreshes.get_or_create(&Outcome { outcome: "failed" }).inc();
                        static FAILED: LogThrottle = LogThrottle::new(Duration::from_secs(10));
                        if let Some(suppressed) = FAILED.allow() {
                            warn!(error = %e, suppressed, "permission refresh failed: current permissions kept, retrying");
                        }
                        refresh.failed(Instant::now());
                    }
                }
            }
            ready = poll_fn(|cx| queue.poll_ready(cx, can_refresh)) => match ready {
                Ready::Overflowed => break Stop::SlowConsumer,
                Ready::Disconnect(code) => break Stop::Disconnected(code),
                Ready::Refresh(generation) => refresh.start(&gateway, generation),
                Ready::Deliveries => {
                    if let Err(stop) = write_or_stop(pin!(write_batch(&mut socket, &queue)), &queue, timer.as_mut(), clock.idle_at).await {
                        break stop;
                    }
                }
            },
        }
        // Only ever moved earlier here; a timer that fires early re-arms itself.
        let next = clock.next(refresh.due());
        if next < timer.deadline() {
            timer.as_mut().reset(next);
        }
    };

    // Unsubscribe before the close frame: nothing more is queued for us.
    drop(session);
    if stop != Stop::ClientGone {
        gateway.metrics.disconnects.get_or_create(&Reason { reason: stop.label() }).inc();
    }
    if let Some((code, reason)) = stop.close() {
        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), socket.send(close_message(code, reason)))).await;
    }
    // The socket closes here, whoever still holds the queue.
    drop(queue.detach());
    info!(
        peer = %peer,
        reason = stop.label(),
        duration_ms = started.elapsed().as_millis() as u64,
        "connection closed"
    );
    debug!(queued_left = queue.len(), "session ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closes_operators_watch_are_preset_in_the_metrics() {
        for stop in [Stop::SlowConsumer, Stop::Revoked, Stop::Idle] {
            assert!(crate::metrics::DISCONNECT_REASONS.contains(&stop.label()), "{} not preset", stop.label());
        }
    }
}
