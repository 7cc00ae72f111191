//! `OutboundQueue`: the bounded queue of publish frames between the hub's
//! fan-out and one session's socket writer, with the session's
//! slow-consumer flag and the control requests (refresh, disconnect) the
//! hub hands it.
//!
//! Hand-made rather than a channel crate's because of what an idle
//! connection costs: the queue allocates nothing until its first delivery
//! (a `VecDeque` grows on demand; tokio's bounded channel allocates its
//! shared state and a first 32-slot block up front, ≈ 1.5 KB per
//! connection), and the overflow flag and the wake-up share the queue's one
//! allocation.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

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
#[derive(Debug, Default)]
struct State {
    /// Frames not yet written, oldest first.
    frames: VecDeque<Delivery>,
    /// Set once when a push found the queue full; never cleared.
    overflowed: bool,
    /// A disconnect asked for, with its close code.
    disconnect: Option<u16>,
    /// A refresh asked for and not yet taken: the latest request's generation.
    refresh: Option<u64>,
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

    /// Queues `delivery` unless the queue is full; never waits.
    pub fn push(&self, delivery: Delivery) -> Pushed {
        let pushed = {
            let mut state = self.state();
            if state.overflowed {
                return Pushed::Dropped;
            }
            if state.frames.len() >= self.capacity {
                state.overflowed = true;
                Pushed::Dropped
            } else {
                state.frames.push_back(delivery);
                Pushed::Queued
            }
        };
        // After the lock: the woken task may run at once on another thread.
        self.waker.wake();
        pushed
    }

    /// The oldest queued frame.
    pub fn pop(&self) -> Option<Delivery> {
        let mut state = self.state();
        let frame = state.frames.pop_front();
        if frame.is_none() && state.frames.capacity() > KEEP_CAPACITY {
            state.frames = VecDeque::new();
        }
        frame
    }

    /// Ready when the queue overflowed, a disconnect or (if `take_refresh`)
    /// a refresh is asked for, or a frame is queued; in that order. A
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
        } else if state.frames.is_empty() {
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

    fn delivery(n: u32) -> Delivery {
        Delivery { prefix: Arc::from(format!("{n}")), suffix: Arc::from("}") }
    }

    #[test]
    fn allocates_nothing_until_used_and_gives_back_after_a_burst() {
        let q = OutboundQueue::new(1024);
        assert_eq!(q.state().frames.capacity(), 0);
        for n in 0..500 {
            assert_eq!(q.push(delivery(n)), Pushed::Queued);
        }
        assert_eq!(std::iter::from_fn(|| q.pop()).count(), 500);
        assert_eq!(q.state().frames.capacity(), 0);
    }

    #[test]
    fn keeps_order() {
        let q = OutboundQueue::new(8);
        for n in 0..3 {
            q.push(delivery(n));
        }
        assert_eq!(q.len(), 3);
        assert_eq!(std::iter::from_fn(|| q.pop()).map(|d| d.text()).collect::<Vec<_>>(), ["0}", "1}", "2}"]);
        assert!(q.is_empty());
    }

    #[test]
    fn overflow_is_sticky_and_drops() {
        let q = OutboundQueue::new(2);
        assert_eq!(q.push(delivery(1)), Pushed::Queued);
        assert_eq!(q.push(delivery(2)), Pushed::Queued);
        assert!(!q.is_overflowed());
        assert_eq!(q.push(delivery(3)), Pushed::Dropped);
        assert!(q.is_overflowed());
        while q.pop().is_some() {}
        // Even with room again, a slow consumer gets nothing more.
        assert_eq!(q.push(delivery(4)), Pushed::Dropped);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn wakes_the_registered_task() {
        let q = OutboundQueue::new(4);
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Pending);
        q.push(delivery(1));
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Ready(Ready::Deliveries));
        assert_eq!(q.poll_overflowed(&mut cx), Poll::Pending);
        for n in 0..4 {
            q.push(delivery(n));
        }
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Ready(Ready::Overflowed));
        assert_eq!(q.poll_overflowed(&mut cx), Poll::Ready(()));
    }

    #[test]
    fn control_requests_wake_and_come_in_order() {
        let q = OutboundQueue::new(4);
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(q.poll_ready(&mut cx, true), Poll::Pending);
        q.request_refresh(3);
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "a request wakes the session");
        q.push(delivery(1));
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
