//! `OutboundQueue`: the bounded queue of publish frames between the hub's
//! fan-out and one session's socket writer, with the session's
//! slow-consumer flag and the control requests (refresh, disconnect) the
//! hub hands it.
//!
//! The queue also holds the session's websocket once the session is
//! authorised, so a delivery can skip the queue: when nothing is queued or
//! being written for the session, the fan-out writes the frame itself
//! with one non-blocking `send` straight to the socket
//! ([`OutboundQueue::push`] with `write_through`,
//! [`crate::websocket::ClientStream::write_frame`]), and the session's task
//! is not woken at all. Anything that cannot go out at once stays with the
//! socket and the session is woken to finish it, as for queued frames.
//! The session sends what queued for it the same way, many frames per
//! `sendmsg`, while tungstenite holds nothing ([`OutboundQueue::poll_feed`]),
//! and does all its other socket I/O through [`QueueSocket`], under the
//! same lock, so frames leave in the order they were queued or fed.
//!
//! Invariant: `write_pending` is false only when tungstenite holds no
//! bytes of its own (its write buffer and its queued pong are empty):
//! every frame the session starts, and every ping or close it reads (which
//! tungstenite answers), sets it, and only a completed flush clears it. So
//! a frame written through never lands inside one of tungstenite's.
//!
//! Hand-made rather than a channel crate's because of what an idle
//! connection costs: the queue allocates nothing until its first delivery
//! (a `VecDeque` grows on demand; tokio's bounded channel allocates its
//! shared state and a first 32-slot block up front, ≈ 1.5 KB per
//! connection), and the overflow flag and the wake-up share the queue's one
//! allocation.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tungstenite::{Error, Message};

use crate::websocket::{FRAMES_PER_SEND, Socket, Written};

/// One publish frame for one subscription, as two shared halves: the
/// trigger's prefix (built once per trigger) and the subscription's
/// `requestId` suffix (built once per subscription). Queueing it allocates
/// nothing per subscriber. Both are `str`, so the socket writer joins them
/// into a text frame without re-validating UTF-8.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// `{"type":"publish","data":…,"requestId":`
    pub prefix: Arc<str>,
    /// `<requestId>}`
    pub suffix: Arc<str>,
}

impl Delivery {
    /// The whole frame text.
    pub fn text(&self) -> String {
        let mut s = String::with_capacity(self.prefix.len() + self.suffix.len());
        s.push_str(&self.prefix);
        s.push_str(&self.suffix);
        s
    }
}

/// A queue that empties above this many slots of capacity gives the memory
/// back, so a burst does not pin its peak on an otherwise quiet connection.
const KEEP_CAPACITY: usize = 64;

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued for the writer.
    Queued,
    /// Written to the socket by the caller (write-through); whatever the
    /// socket did not take at once is left for the session to flush.
    Written,
    /// The queue was full (or had overflowed before): the delivery was
    /// dropped and the session is marked as a slow consumer.
    Dropped,
}

/// What the writer should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// At least one delivery is queued.
    Deliveries,
    /// The queue overflowed: the session must close (1013).
    Overflowed,
    /// A control message closes the session with this code.
    Disconnect(u16),
    /// A control message asks the session to re-run bootstrap; the number
    /// is the request's generation ([`OutboundQueue::request_refresh`]).
    Refresh(u64),
}

/// The queue's state, behind one lock.
#[derive(Default)]
struct State {
    /// The session's websocket, from [`OutboundQueue::attach`] to
    /// [`OutboundQueue::detach`].
    socket: Option<Box<Socket>>,
    /// A write is unfinished (the socket would block, or the session is
    /// answering client frames whose replies must go first): frames are
    /// queued, not written through, until the session's next flush ends.
    write_pending: bool,
    /// Frames not yet written, oldest first.
    frames: VecDeque<Delivery>,
    /// Set once when a push found the queue full; never cleared.
    overflowed: bool,
    /// A disconnect asked for, with its close code.
    disconnect: Option<u16>,
    /// A refresh asked for and not yet taken: the latest request's generation.
    refresh: Option<u64>,
}

/// The oldest of `frames`; an emptied queue above [`KEEP_CAPACITY`] gives
/// its memory back.
fn pop_front(frames: &mut VecDeque<Delivery>) -> Option<Delivery> {
    let frame = frames.pop_front();
    if frames.is_empty() && frames.capacity() > KEEP_CAPACITY {
        *frames = VecDeque::new();
    }
    frame
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("socket", &self.socket.is_some())
            .field("write_pending", &self.write_pending)
            .field("frames", &self.frames.len())
            .field("overflowed", &self.overflowed)
            .field("disconnect", &self.disconnect)
            .field("refresh", &self.refresh)
            .finish()
    }
}

/// Bounded queue of one session's publish frames (many producers: every
/// fan-out; one consumer: the session's task).
#[derive(Debug)]
pub struct OutboundQueue {
    /// Frames and overflow flag.
    state: Mutex<State>,
    /// The session task, woken when a frame is queued or the queue overflows.
    waker: AtomicWaker,
    /// Frames queued at most.
    capacity: usize,
}

impl OutboundQueue {
    /// An empty queue holding at most `capacity` frames (at least one).
    pub fn new(capacity: usize) -> OutboundQueue {
        OutboundQueue { state: Mutex::default(), waker: AtomicWaker::new(), capacity: capacity.max(1) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock (push and pop only); were it
        // poisoned anyway, the queue itself is still consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Gives the queue the session's websocket: from now on the session
    /// reads and writes through [`QueueSocket`], and pushes may write
    /// through.
    pub fn attach(&self, socket: Box<Socket>) {
        self.state().socket = Some(socket);
    }

    /// Takes the websocket back (the session is closing).
    pub fn detach(&self) -> Option<Box<Socket>> {
        self.state().socket.take()
    }

    /// Queues `delivery` unless the queue is full; never waits. With
    /// `write_through`, a delivery for a session with nothing queued or
    /// being written goes to its socket at once (one non-blocking write):
    /// the session is woken only if the socket did not take all of it.
    pub fn push(&self, delivery: Delivery, write_through: bool) -> Pushed {
        let pushed = {
            let mut state = self.state();
            let state = &mut *state;
            if state.overflowed {
                return Pushed::Dropped;
            }
            let socket =
                state.socket.as_mut().filter(|_| write_through && state.frames.is_empty() && !state.write_pending);
            match socket.map(|socket| write_now(socket, &delivery)) {
                Some(Written::Whole) => return Pushed::Written,
                Some(Written::Partly) => {
                    // Left in the socket's buffer (or the socket failed,
                    // which the session's flush then reports): the session
                    // finishes it, and frames queue behind it meanwhile.
                    state.write_pending = true;
                    Pushed::Written
                }
                Some(Written::NotTaken) | None if state.frames.len() >= self.capacity => {
                    state.overflowed = true;
                    Pushed::Dropped
                }
                Some(Written::NotTaken) | None if !state.frames.is_empty() => {
                    // The push that queued the first of these woke the
                    // session, which has not taken them all yet and looks at
                    // the queue before it sleeps again (`poll_ready`):
                    // another wake would only cost the fan-out a cold task
                    // header per delivery (a tenth of its time at 200
                    // triggers/s).
                    state.frames.push_back(delivery);
                    return Pushed::Queued;
                }
                Some(Written::NotTaken) | None => {
                    state.frames.push_back(delivery);
                    Pushed::Queued
                }
            }
        };
        // After the lock: the woken task may run at once on another thread.
        self.waker.wake();
        pushed
    }

    /// The oldest queued frame.
    pub fn pop(&self) -> Option<Delivery> {
        pop_front(&mut self.state().frames)
    }

    /// Feeds queued frames (up to `max`) to the socket, popping each under
    /// the same lock as the write so that no write-through overtakes them;
    /// returns how many. Pending when the socket takes no more for now
    /// (the rest stays queued; `cx` is woken when it can take more).
    pub fn poll_feed(&self, cx: &mut Context<'_>, max: usize) -> Poll<Result<usize, Error>> {
        let mut state = self.state();
        let state = &mut *state;
        let Some(socket) = state.socket.as_mut() else { return Poll::Ready(Err(no_socket())) };
        let mut fed = 0;
        // While tungstenite holds nothing, straight to the socket, many
        // frames per `sendmsg`: no frame is built, copied or framed by
        // tungstenite (a fifth of the gateway's time at 200 triggers/s).
        while fed < max && !state.write_pending && !state.frames.is_empty() {
            let batch = (max - fed).min(FRAMES_PER_SEND);
            let frames = state.frames.iter().take(batch).map(|d| (d.prefix.as_bytes(), d.suffix.as_bytes()));
            let sent = socket.get_mut().write_frames(frames);
            for _ in 0..sent.whole {
                pop_front(&mut state.frames);
            }
            fed += sent.whole;
            if sent.partly {
                // Its rest waits in the stream for the session's flush.
                pop_front(&mut state.frames);
                fed += 1;
                state.write_pending = true;
            } else if sent.whole == batch {
                continue;
            }
            // The socket is full (or failed): what is left goes the polled
            // way below, which waits for room (or meets the error).
            break;
        }
        while fed < max && !state.frames.is_empty() {
            match socket.poll_ready_unpin(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if fed > 0 => break,
                Poll::Pending => {
                    state.write_pending = true;
                    return Poll::Pending;
                }
            }
            let Some(delivery) = pop_front(&mut state.frames) else { break };
            state.write_pending = true;
            socket.start_send_unpin(Message::Text(delivery.text().into()))?;
            fed += 1;
        }
        Poll::Ready(Ok(fed))
    }

    /// Keeps pushes from writing through until the session's next flush
    /// ends: the session is about to write replies (a subscribe's success
    /// must reach the client before that subscription's first publish).
    pub fn hold_writes(&self) {
        self.state().write_pending = true;
    }

    /// Ready when the queue overflowed, a disconnect or (if `take_refresh`)
    /// a refresh is asked for, or a frame is queued or a write is
    /// unfinished; in that order. A
    /// refresh returned is taken (asked again, it is returned again).
    pub fn poll_ready(&self, cx: &mut Context<'_>, take_refresh: bool) -> Poll<Ready> {
        // Register before looking, so a push after the look wakes us.
        self.waker.register(cx.waker());
        let mut state = self.state();
        if state.overflowed {
            Poll::Ready(Ready::Overflowed)
        } else if let Some(code) = state.disconnect {
            Poll::Ready(Ready::Disconnect(code))
        } else if let Some(generation) = state.refresh.filter(|_| take_refresh) {
            state.refresh = None;
            Poll::Ready(Ready::Refresh(generation))
        } else if state.frames.is_empty() && !state.write_pending {
            Poll::Pending
        } else {
            Poll::Ready(Ready::Deliveries)
        }
    }

    /// Asks the session to re-run bootstrap; `generation` (increasing per
    /// control message) lets sessions asked by the same message share one
    /// backend call, and no later request share an earlier call.
    pub fn request_refresh(&self, generation: u64) {
        self.state().refresh = Some(generation);
        self.waker.wake();
    }

    /// Asks the session to close with `code`; the first request wins.
    pub fn request_disconnect(&self, code: u16) {
        self.state().disconnect.get_or_insert(code);
        self.waker.wake();
    }

    /// Ready once the queue overflowed (used while a write is in progress).
    pub fn poll_overflowed(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.state().overflowed { Poll::Ready(()) } else { Poll::Pending }
    }

    /// Whether the queue overflowed.
    pub fn is_overflowed(&self) -> bool {
        self.state().overflowed
    }

    /// Frames queued now.
    pub fn len(&self) -> usize {
        self.state().frames.len()
    }

    /// Whether no frame is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes `delivery` straight to `socket` without waiting. The caller
/// makes sure tungstenite holds nothing (`write_pending` is false).
fn write_now(socket: &mut Socket, delivery: &Delivery) -> Written {
    socket.get_mut().write_frame(delivery.prefix.as_bytes(), delivery.suffix.as_bytes())
}

fn no_socket() -> Error {
    Error::AlreadyClosed
}

/// The session's own view of its websocket while the queue holds it: a
/// `Stream` of client messages and a `Sink` of frames, each call made
/// under the queue's lock. A write that would block marks the queue's
/// write as unfinished, and a flush that ends clears it (pushes may then
/// write through again).
pub struct QueueSocket<'a>(pub &'a OutboundQueue);

impl Stream for QueueSocket<'_> {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut state = self.0.state();
        let state = &mut *state;
        let Some(socket) = state.socket.as_mut() else { return Poll::Ready(None) };
        let polled = socket.poll_next_unpin(cx);
        if let Poll::Ready(Some(Ok(Message::Ping(_) | Message::Close(_)))) = &polled {
            // tungstenite has queued its answer (pong, close): no
            // write-through until a flush has sent it.
            state.write_pending = true;
        }
        polled
    }
}

impl Sink<Message> for QueueSocket<'_> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let mut state = self.0.state();
        let state = &mut *state;
        let Some(socket) = state.socket.as_mut() else { return Poll::Ready(Err(no_socket())) };
        let poll = socket.poll_ready_unpin(cx);
        if poll.is_pending() {
            state.write_pending = true;
        }
        poll
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Error> {
        let mut state = self.0.state();
        let state = &mut *state;
        let Some(socket) = state.socket.as_mut() else { return Err(no_socket()) };
        // In tungstenite's buffer until the next completed flush.
        state.write_pending = true;
        socket.start_send_unpin(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let mut state = self.0.state();
        let state = &mut *state;
        let Some(socket) = state.socket.as_mut() else { return Poll::Ready(Err(no_socket())) };
        let poll = socket.poll_flush_unpin(cx);
        match poll {
            Poll::Ready(Ok(())) => state.write_pending = false,
            Poll::Pending => state.write_pending = true,
            Poll::Ready(Err(_)) => {}
        }
        poll
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let mut state = self.0.state();
        let state = &mut *state;
        state.write_pending = true;
        match state.socket.as_mut() {
            Some(socket) => socket.poll_close_unpin(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    struct CountingWaker(AtomicUsize);
    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A waker that counts its wakes, and the count.
    fn counting_waker() -> (Waker, Arc<CountingWaker>) {
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        (Waker::from(counter.clone()), counter)
    }

    fn delivery(n: u32) -> Delivery {
        Delivery { prefix: Arc::from(format!("{n}")), suffix: Arc::from("}") }
    }

    /// A server websocket over a real loopback pair, and its client.
    async fn websocket_pair() -> (Socket, tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) {
        use tungstenite::protocol::Role;
        let (ours, peer) = crate::websocket::tests::pair().await;
        let server = tokio_tungstenite::WebSocketStream::from_raw_socket(ours, Role::Server, None).await;
        let client = tokio_tungstenite::WebSocketStream::from_raw_socket(peer, Role::Client, None).await;
        (server, client)
    }

    #[tokio::test]
    async fn a_ping_read_holds_write_through_until_its_pong_is_flushed() {
        let (server, mut client) = websocket_pair().await;
        let q = OutboundQueue::new(8);
        q.attach(Box::new(server));
        assert_eq!(q.push(delivery(1), true), Pushed::Written, "an idle socket is written through");
        client.send(Message::Ping(b"p".to_vec().into())).await.expect("ping");
        let mut socket = QueueSocket(&q);
        assert!(matches!(socket.next().await, Some(Ok(Message::Ping(_)))));
        // tungstenite holds the pong: a frame written now could cut into it.
        assert_eq!(q.push(delivery(2), true), Pushed::Queued);
        std::future::poll_fn(|cx| q.poll_feed(cx, 8)).await.expect("feed");
        socket.flush().await.expect("flush");
        assert_eq!(q.push(delivery(3), true), Pushed::Written, "written through again after the flush");
        let mut got = Vec::new();
        while got.len() < 4 {
            match client.next().await.expect("open").expect("frame") {
                Message::Text(t) => got.push(t.to_string()),
                Message::Pong(p) => got.push(format!("pong {}", String::from_utf8_lossy(&p))),
                other => panic!("unexpected {other:?}"),
            }
        }
        // tungstenite puts its pong after the frame it was given with it;
        // the frame written through comes after both, whole.
        assert_eq!(got, ["1}", "2}", "pong p", "3}"]);
    }

    #[tokio::test]
    async fn queued_frames_go_out_together_in_order_and_write_through_resumes() {
        let (server, mut client) = websocket_pair().await;
        let q = OutboundQueue::new(512);
        q.attach(Box::new(server));
        for n in 0..300 {
            assert_eq!(q.push(delivery(n), false), Pushed::Queued);
        }
        let fed = std::future::poll_fn(|cx| q.poll_feed(cx, 256)).await.expect("feed");
        assert_eq!(fed, 256, "at most `max` per feed");
        let fed = std::future::poll_fn(|cx| q.poll_feed(cx, 256)).await.expect("feed");
        assert_eq!(fed, 44);
        // Sent straight to the socket: nothing is left for a flush, so the
        // next delivery is written through at once.
        assert_eq!(q.push(delivery(300), true), Pushed::Written);
        for n in 0..=300 {
            match client.next().await.expect("open").expect("frame") {
                Message::Text(t) => assert_eq!(t.as_str(), format!("{n}}}")),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn only_the_first_queued_frame_wakes_the_session_and_overflow_always_does() {
        let q = OutboundQueue::new(3);
        let (waker, counter) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let wakes = || counter.0.load(Ordering::SeqCst);
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Pending);
        q.push(delivery(1), false);
        assert_eq!(wakes(), 1);
        // Registered again (as the session's next poll does) but not yet
        // drained: a second frame needs no wake.
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Ready(Ready::Deliveries));
        q.push(delivery(2), false);
        assert_eq!(wakes(), 1);
        // Drained: the next first frame wakes it again.
        while q.pop().is_some() {}
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Pending);
        q.push(delivery(3), false);
        assert_eq!(wakes(), 2);
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Ready(Ready::Deliveries));
        q.push(delivery(4), false);
        q.push(delivery(5), false);
        assert_eq!(wakes(), 2);
        q.push(delivery(6), false);
        assert_eq!(wakes(), 3, "an overflow wakes the session, whatever is queued");
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Ready(Ready::Overflowed));
    }

    #[test]
    fn allocates_nothing_until_used_and_gives_back_after_a_burst() {
        let q = OutboundQueue::new(1024);
        assert_eq!(q.state().frames.capacity(), 0);
        for n in 0..500 {
            assert_eq!(q.push(delivery(n), false), Pushed::Queued);
        }
        assert_eq!(std::iter::from_fn(|| q.pop()).count(), 500);
        assert_eq!(q.state().frames.capacity(), 0);
    }

    #[test]
    fn keeps_order() {
        let q = OutboundQueue::new(8);
        for n in 0..3 {
            q.push(delivery(n), false);
        }
        assert_eq!(q.len(), 3);
        assert_eq!(std::iter::from_fn(|| q.pop()).map(|d| d.text()).collect::<Vec<_>>(), ["0}", "1}", "2}"]);
        assert!(q.is_empty());
    }

    #[test]
    fn overflow_is_sticky_and_drops() {
        let q = OutboundQueue::new(2);
        assert_eq!(q.push(delivery(1), false), Pushed::Queued);
        assert_eq!(q.push(delivery(2), false), Pushed::Queued);
        assert!(!q.is_overflowed());
        assert_eq!(q.push(delivery(3), false), Pushed::Dropped);
        assert!(q.is_overflowed());
        while q.pop().is_some() {}
        // Even with room again, a slow consumer gets nothing more.
        assert_eq!(q.push(delivery(4), false), Pushed::Dropped);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn wakes_the_registered_task() {
        let q = OutboundQueue::new(4);
        let (waker, counter) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Pending);
        q.push(delivery(1), false);
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Ready(Ready::Deliveries));
        assert_eq!(q.poll_overflowed(&mut cx), Poll::Pending);
        for n in 0..4 {
            q.push(delivery(n), false);
        }
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Ready(Ready::Overflowed));
        assert_eq!(q.poll_overflowed(&mut cx), Poll::Ready(()));
    }

    #[test]
    fn control_requests_wake_and_come_in_order() {
        let q = OutboundQueue::new(4);
        let (waker, counter) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Pending);
        q.request_refresh(3);
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "a request wakes the session");
        q.push(delivery(1), false);
        q.request_refresh(4);
        // While a refresh runs the session does not take another: deliveries go on.
        assert_eq!(q.poll_ready(&mut cx, false), Poll::Ready(Ready::Deliveries));
        // The latest request's generation, taken once.
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Ready(Ready::Refresh(4)));
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Ready(Ready::Deliveries));
        q.request_refresh(5);
        q.request_disconnect(4001);
        q.request_disconnect(4403);
        // A disconnect comes before a refresh, and the first code wins.
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Ready(Ready::Disconnect(4001)));
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Ready(Ready::Disconnect(4001)));
    }
}
