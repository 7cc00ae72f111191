//! The `Hub`: the subscriptions of every session of this process, and the
//! fan-out of a trigger to them; the sessions by user identity, and the
//! control messages that act on sessions.
//!
//! Fan-out runs under the index lock and never waits: each matching
//! subscription gets a [`Delivery`] pushed onto its session's bounded
//! [`OutboundQueue`], or written through to its idle socket with one
//! non-blocking write while [`WriteThroughPolicy`] says the fan-out keeps
//! up that way. A full queue marks the session as a slow consumer (it
//! then closes itself with 1013); nobody else waits for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use crate::control::{Action, Control};
use crate::identity::UserId;
use crate::index::{RoomIndex, SubscriptionId};
use crate::metrics::{Metrics, Reason};
use crate::outbound::{Delivery, OutboundQueue, Pushed};
use crate::protocol::{self, HubStatus, RequestId};
use crate::room::Room;
use crate::trigger::{Published, Trigger};
use crate::write_through::WriteThroughPolicy;

/// What the index stores per subscription.
struct Subscriber {
    /// The queue of the session to deliver to.
    session: Arc<OutboundQueue>,
    /// `<requestId>}` of this subscription.
    suffix: Arc<str>,
}

/// Outcome of one trigger's fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FanOut {
    /// Publish frames queued or written.
    pub delivered: u64,
    /// Of those, written to the socket by the fan-out itself.
    pub written_through: u64,
    /// Publish frames dropped because the session's queue was full.
    pub dropped: u64,
}

/// Subscriptions and fan-out of one process.
pub struct Hub {
    /// All subscriptions, by room.
    index: Mutex<RoomIndex<Subscriber>>,
    /// Sessions with a user identity, by identity (a user's tabs).
    users: Mutex<HashMap<UserId, Vec<Arc<OutboundQueue>>>>,
    /// Control messages received so far: the generation of the last one's
    /// refreshes. Shared with the bootstrap client, whose kept answers
    /// predate a control message once it changes.
    controls: Arc<AtomicU64>,
    /// Next subscription id.
    next_id: AtomicU64,
    /// Whether fan-outs write through (locked once per trigger).
    write_through: Mutex<WriteThroughPolicy>,
    /// Process metrics (also the source of the `status` counters).
    metrics: Arc<Metrics>,
    /// Process start, for `status`.
    online_since: SystemTime,
}

impl Hub {
    /// An empty hub reporting into `metrics`, writing through (see
    /// [`Hub::set_write_through`]).
    pub fn new(metrics: Arc<Metrics>) -> Hub {
        Hub {
            index: Mutex::new(RoomIndex::new()),
            users: Mutex::default(),
            controls: Arc::default(),
            next_id: AtomicU64::new(1),
            write_through: Mutex::new(WriteThroughPolicy::new(Instant::now())),
            metrics,
            online_since: SystemTime::now(),
        }
    }

    fn index(&self) -> MutexGuard<'_, RoomIndex<Subscriber>> {
        // A panic while holding the lock cannot leave the index half-updated
        // in a way that matters more than losing the process; keep serving.
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The count of control messages received, shared.
    pub fn control_count(&self) -> Arc<AtomicU64> {
        self.controls.clone()
    }

    fn users(&self) -> MutexGuard<'_, HashMap<UserId, Vec<Arc<OutboundQueue>>>> {
        // Only pushes and removals happen under it: consistent even if poisoned.
        self.users.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that `session` belongs to `user`.
    pub fn add_user_session(&self, user: &UserId, session: &Arc<OutboundQueue>) {
        self.users().entry(user.clone()).or_default().push(session.clone());
    }

    /// Forgets that `session` belongs to `user`.
    pub fn remove_user_session(&self, user: &UserId, session: &Arc<OutboundQueue>) {
        let mut users = self.users();
        if let Some(sessions) = users.get_mut(user) {
            sessions.retain(|s| !Arc::ptr_eq(s, session));
            if sessions.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Hands `control`'s action to every session it names (by user, and by
    /// subscription as a trigger to `subscribed` would reach them); returns
    /// how many requests were made (a session named twice counts twice, and
    /// acts once). Never waits for a session.
    pub fn control(&self, control: &Control) -> usize {
        let generation = self.controls.fetch_add(1, Ordering::Relaxed) + 1;
        let act = |session: &OutboundQueue| match control.action {
            Action::Refresh => session.request_refresh(generation),
            Action::Disconnect(code) => session.request_disconnect(code),
        };
        let mut asked = 0;
        if !control.users.is_empty() {
            let users = self.users();
            for user in &control.users {
                for session in users.get(user).into_iter().flatten() {
                    act(session);
                    asked += 1;
                }
            }
        }
        if !control.subscribed.is_empty() {
            let mut index = self.index();
            for room in &control.subscribed {
                index.for_each_match(room, |_, subscriber| {
                    act(&subscriber.session);
                    asked += 1;
                });
            }
        }
        self.metrics.controls.get_or_create(&crate::metrics::ActionLabel { action: control.action.label() }).inc();
        asked
    }

    fn publish_gauges(&self, index: &RoomIndex<Subscriber>) {
        self.metrics.rooms_active.set(index.rooms() as i64);
        self.metrics.subscriptions_active.set(index.subscriptions() as i64);
        self.metrics.index_projections.set(index.projections() as i64);
    }

    /// Subscribes `session` to `room`; the returned id unsubscribes.
    pub fn subscribe(&self, session: &Arc<OutboundQueue>, room: &Room, request_id: &RequestId) -> SubscriptionId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let subscriber = Subscriber { session: session.clone(), suffix: request_id.publish_suffix() };
        let mut index = self.index();
        index.insert(room, id, subscriber);
        self.publish_gauges(&index);
        id
    }

    /// Removes subscriptions (one lock for all of a closing session's).
    pub fn unsubscribe<'a>(&self, subscriptions: impl IntoIterator<Item = (&'a Room, SubscriptionId)>) {
        let mut index = self.index();
        for (room, id) in subscriptions {
            index.remove(room, id);
        }
        self.publish_gauges(&index);
    }

    /// Acts on a publisher's message: fans a trigger out, or hands a
    /// control message to the sessions it names.
    pub fn deliver(&self, message: &Published) {
        match message {
            Published::Trigger(trigger) => {
                self.fan_out(trigger);
            }
            Published::Control(control) => {
                self.control(control);
            }
        }
    }

    /// `fanout.writeThrough`: false queues every delivery.
    pub fn set_write_through(&self, allowed: bool) {
        self.write_through().allow(allowed);
    }

    fn write_through(&self) -> MutexGuard<'_, WriteThroughPolicy> {
        // Plain numbers: consistent even if poisoned.
        self.write_through.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `trigger` to every matching subscription, once each, or
    /// writes it through to their idle sockets.
    pub fn fan_out(&self, trigger: &Trigger) -> FanOut {
        let start = Instant::now();
        let write_through = self.write_through().is_on();
        // A write-through is a `try_io` send, which tokio's
        // cooperative budget does not limit (a polled write would be
        // refused after the task's 128th), so no `unconstrained` here.
        let out = self.fan_out_now(trigger, write_through);
        let took = start.elapsed();
        self.write_through().record(Instant::now(), took, out.delivered, out.written_through);
        self.metrics.messages_delivered.inc_by(out.delivered);
        self.metrics.messages_written_through.inc_by(out.written_through);
        if out.dropped > 0 {
            self.metrics.messages_dropped.get_or_create(&Reason { reason: "slow_consumer" }).inc_by(out.dropped);
        }
        self.metrics.fanout_latency.observe(took.as_secs_f64());
        out
    }

    fn fan_out_now(&self, trigger: &Trigger, write_through: bool) -> FanOut {
        let prefix = protocol::publish_prefix(trigger.data.get());
        let mut out = FanOut::default();
        // A subscription can match several of the trigger's rooms; it gets one copy.
        let mut seen = (trigger.rooms.len() > 1).then(std::collections::HashSet::<SubscriptionId>::new);
        let mut index = self.index();
        for room in &trigger.rooms {
            index.for_each_match(room, |id, subscriber| {
                if let Some(seen) = &mut seen
                    && !seen.insert(id)
                {
                    return;
                }
                let delivery = Delivery { prefix: prefix.clone(), suffix: subscriber.suffix.clone() };
                match subscriber.session.push(delivery, write_through) {
                    Pushed::Queued => out.delivered += 1,
                    Pushed::Written => {
                        out.delivered += 1;
                        out.written_through += 1;
                    }
                    Pushed::Dropped => out.dropped += 1,
                }
            });
        }
        self.metrics.index_projections.set(index.projections() as i64);
        out
    }

    /// Counters for the client `status` frame.
    pub fn status(&self) -> HubStatus {
        let (rooms, subscriptions) = {
            let index = self.index();
            (index.rooms(), index.subscriptions())
        };
        let triggers_received = ["http", "amqp"]
            .iter()
            .map(|s| self.metrics.triggers.get_or_create(&crate::metrics::TriggerSource { source: s }).get())
            .sum();
        HubStatus {
            open_connections: self.metrics.connections_open.get().max(0) as u64,
            num_rooms: rooms as u64,
            num_subscriptions: subscriptions as u64,
            online_since: humantime::format_rfc3339_seconds(self.online_since).to_string(),
            triggers_received,
            messages_delivered: self.metrics.messages_delivered.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn room(v: serde_json::Value) -> Room {
        Room::from_json(&v).expect("room")
    }

    fn rid(s: &str) -> RequestId {
        RequestId::from_json(&json!(s)).expect("id")
    }

    fn frame(d: &Delivery) -> serde_json::Value {
        serde_json::from_str(&d.text()).expect("json")
    }

    #[test]
    fn one_copy_per_subscription_per_trigger() {
        let hub = Hub::new(Arc::new(Metrics::new()));
        let session = Arc::new(OutboundQueue::new(8));
        hub.subscribe(&session, &room(json!({"u": "*"})), &rid("a"));
        hub.subscribe(&session, &room(json!({"u": 1})), &rid("b"));
        let t = Trigger::parse(br#"{"rooms":[{"u":1},{"u":2},{"u":"*"}],"data":7}"#, 100).expect("trigger");
        assert_eq!(hub.fan_out(&t), FanOut { delivered: 2, written_through: 0, dropped: 0 });
        let mut got: Vec<_> = std::iter::from_fn(|| session.pop()).map(|d| frame(&d)).collect();
        got.sort_by_key(|v| v["requestId"].to_string());
        assert_eq!(
            got,
            [
                json!({"type": "publish", "data": 7, "requestId": "a"}),
                json!({"type": "publish", "data": 7, "requestId": "b"})
            ]
        );
    }

    #[test]
    fn full_queue_marks_the_slow_consumer_only() {
        let hub = Hub::new(Arc::new(Metrics::new()));
        let slow = Arc::new(OutboundQueue::new(1));
        let fast = Arc::new(OutboundQueue::new(8));
        hub.subscribe(&slow, &room(json!({"r": 1})), &rid("s"));
        hub.subscribe(&fast, &room(json!({"r": 1})), &rid("f"));
        let t = Trigger::parse(br#"{"rooms":[{"r":1}]}"#, 100).expect("trigger");
        assert_eq!(hub.fan_out(&t), FanOut { delivered: 2, written_through: 0, dropped: 0 });
        assert!(!slow.is_overflowed());
        assert_eq!(hub.fan_out(&t), FanOut { delivered: 1, written_through: 0, dropped: 1 });
        assert!(slow.is_overflowed());
        assert!(!fast.is_overflowed());
        assert_eq!(std::iter::from_fn(|| fast.pop()).count(), 2);
    }

    fn control(body: &str) -> Control {
        match Published::parse_within(
            body.as_bytes(),
            crate::trigger::TriggerLimits { max_body_bytes: 4096, max_rooms: 8 },
        ) {
            Ok(Published::Control(control)) => control,
            other => panic!("not a control message: {other:?}"),
        }
    }

    fn taken(q: &OutboundQueue) -> Option<crate::outbound::Ready> {
        let waker = futures_util::task::noop_waker();
        match q.poll_ready(&mut std::task::Context::from_waker(&waker), true) {
            std::task::Poll::Ready(ready) => Some(ready),
            std::task::Poll::Pending => None,
        }
    }

    #[test]
    fn control_reaches_sessions_by_user_and_by_subscription() {
        use crate::outbound::Ready;
        let hub = Hub::new(Arc::new(Metrics::new()));
        let [alice_1, alice_2, bob, carol] = [(); 4].map(|_| Arc::new(OutboundQueue::new(8)));
        let alice = UserId::from_json(&json!("alice")).expect("id");
        hub.add_user_session(&alice, &alice_1);
        hub.add_user_session(&alice, &alice_2);
        hub.add_user_session(&UserId::from_json(&json!(2)).expect("id"), &bob);
        hub.subscribe(&bob, &room(json!({"team": "red"})), &rid("r"));
        hub.subscribe(&carol, &room(json!({"team": "blue"})), &rid("b"));

        assert_eq!(hub.control(&control(r#"{"control":"refresh","users":["alice"]}"#)), 2);
        assert_eq!((taken(&alice_1), taken(&alice_2)), (Some(Ready::Refresh(1)), Some(Ready::Refresh(1))));
        assert_eq!((taken(&bob), taken(&carol)), (None, None));
        // By room, as a trigger would reach: a wildcard names both teams.
        assert_eq!(hub.control(&control(r#"{"control":"refresh","subscribed":[{"team":"*"}]}"#)), 2);
        assert_eq!((taken(&bob), taken(&carol)), (Some(Ready::Refresh(2)), Some(Ready::Refresh(2))));
        assert_eq!(taken(&alice_1), None);
        // Identities compare as JSON: "2" is not 2.
        assert_eq!(hub.control(&control(r#"{"control":"disconnect","users":["2"]}"#)), 0);
        assert_eq!(hub.control(&control(r#"{"control":"disconnect","users":[2],"subscribed":[{"team":"red"}]}"#)), 2);
        assert_eq!(taken(&bob), Some(Ready::Disconnect(4001)));
        // A session that left is not reached.
        hub.remove_user_session(&alice, &alice_1);
        assert_eq!(hub.control(&control(r#"{"control":"disconnect","users":["alice"],"code":4999}"#)), 1);
        assert_eq!((taken(&alice_1), taken(&alice_2)), (None, Some(Ready::Disconnect(4999))));
        hub.remove_user_session(&alice, &alice_2);
        hub.remove_user_session(&UserId::from_json(&json!(2)).expect("id"), &bob);
        assert!(hub.users().is_empty(), "no entry is left for a user without sessions");
    }

    #[test]
    fn unsubscribe_stops_delivery_and_updates_gauges() {
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::new(metrics.clone());
        let s = Arc::new(OutboundQueue::new(8));
        let r = room(json!({"r": 1}));
        let id = hub.subscribe(&s, &r, &rid("x"));
        assert_eq!(metrics.subscriptions_active.get(), 1);
        hub.unsubscribe([(&r, id)]);
        assert_eq!((metrics.subscriptions_active.get(), metrics.rooms_active.get()), (0, 0));
        let t = Trigger::parse(br#"{"rooms":[{"r":1}]}"#, 100).expect("trigger");
        assert_eq!(hub.fan_out(&t).delivered, 0);
        assert!(s.pop().is_none());
        assert_eq!(hub.status().num_rooms, 0);
    }
}
