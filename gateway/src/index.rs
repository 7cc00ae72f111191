//! `RoomIndex`: the subscriptions of one process, indexed so that a trigger
//! costs work proportional to the subscriptions it reaches, never to the
//! number of rooms or subscriptions held (DESIGN.md §2 "Cost").
//!
//! Layout. Rooms are grouped by *shape* (their sorted key set), then by
//! *mask* (which positions of the shape hold the wildcard `"*"`). Within a
//! mask, a subscription is stored in a bucket keyed by its concrete values.
//! A trigger with no wildcard where a mask has concrete values is one hash
//! probe per mask. A trigger with wildcards constrains only some of a mask's
//! concrete positions; for those it uses a *projection*: the bucket keys
//! grouped by their values at the constrained positions. A projection is
//! built the first time a trigger of that form arrives (one pass over the
//! mask's buckets) and then kept up to date on every subscribe/unsubscribe,
//! so the steady state never scans.
//!
//! Projections are bounded: a mask keeps at most
//! [`MAX_PROJECTIONS_PER_MASK`] of them, evicting the least recently used.
//! A publisher cycling through many wildcard patterns over one shape (a
//! 10-key room has 1 022) then costs a pass over that mask's buckets per
//! new pattern, not memory per pattern ever used.
//!
//! Every bucket and every projection entry is non-empty (removal prunes), so
//! each entry a lookup visits yields at least one delivery.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::room::{Room, Scalar};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// Identifies one subscription in the whole process.
pub type SubscriptionId = u64;

/// Bit `i` set: position `i` of a shape (the `i`-th key in sorted order).
type Positions = u32;

/// Values of a room at some of its shape's positions, in key order.
type Values = Box<[Scalar]>;

/// Projections one mask keeps at most (applications use a few wildcard
/// patterns per room shape).
pub const MAX_PROJECTIONS_PER_MASK: usize = 8;

/// The subscriptions of one process, indexed by room.
pub struct RoomIndex<T> {
    /// Indexes per key set.
    shapes: FastMap<Box<[Arc<str>]>, ShapeIndex<T>>,
    /// Distinct rooms with at least one subscription.
    rooms: usize,
    /// Subscriptions held.
    subscriptions: usize,
    /// Projections held, over all masks.
    projections: usize,
    /// Projections one mask keeps at most.
    projection_limit: usize,
    /// Lookups so far: the clock of projections' last use.
    lookups: u64,
}

/// All rooms sharing one key set.
struct ShapeIndex<T> {
    /// One index per wildcard mask present among the subscriptions.
    masks: FastMap<Positions, MaskIndex<T>>,
}

/// All rooms of one shape with the wildcard at exactly the same positions.
struct MaskIndex<T> {
    /// Subscriptions keyed by their values at the concrete positions.
    buckets: FastMap<Values, FastMap<SubscriptionId, T>>,
    /// For a subset of the concrete positions: bucket keys grouped by their
    /// values there. Built on first use by a wildcard trigger, evicted
    /// least recently used past the limit.
    projections: FastMap<Positions, Projection>,
}

/// Bucket keys of one mask grouped by their values at some positions.
#[derive(Default)]
struct Projection {
    /// Projected values → the bucket keys that have them.
    keys: FastMap<Values, FastSet<Values>>,
    /// The lookup that last used it.
    last_used: u64,
}

impl<T> Default for RoomIndex<T> {
    fn default() -> Self {
        RoomIndex::with_projection_limit(MAX_PROJECTIONS_PER_MASK)
    }
}

/// The shape (key list) and wildcard positions of a room.
fn shape_of(room: &Room) -> (Box<[Arc<str>]>, Positions) {
    let mut wildcards = 0;
    let keys = room
        .entries()
        .iter()
        .enumerate()
        .map(|(i, (k, v))| {
            if v.is_wildcard() {
                wildcards |= 1 << i;
            }
            k.clone()
        })
        .collect();
    (keys, wildcards)
}

/// The room's values at `positions`, in key order.
fn values_at(room: &Room, positions: Positions) -> Values {
    room.entries().iter().enumerate().filter(|(i, _)| positions & (1 << i) != 0).map(|(_, (_, v))| v.clone()).collect()
}

/// Narrows a bucket key (values at `concrete`) to the values at `subset`.
fn project(key: &[Scalar], concrete: Positions, subset: Positions) -> Values {
    let mut out = Vec::with_capacity(subset.count_ones() as usize);
    let mut k = 0;
    for i in 0..Positions::BITS {
        if concrete & (1 << i) != 0 {
            if subset & (1 << i) != 0 {
                out.push(key[k].clone());
            }
            k += 1;
        }
    }
    out.into_boxed_slice()
}

fn all_positions(len: usize) -> Positions {
    if len >= Positions::BITS as usize { Positions::MAX } else { (1 << len) - 1 }
}

impl<T> RoomIndex<T> {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty index keeping at most `limit` (at least 1) projections per mask.
    pub fn with_projection_limit(limit: usize) -> Self {
        RoomIndex {
            shapes: FastMap::default(),
            rooms: 0,
            subscriptions: 0,
            projections: 0,
            projection_limit: limit.max(1),
            lookups: 0,
        }
    }

    /// Wildcard projections held (bounded by the limit per mask).
    pub fn projections(&self) -> usize {
        self.projections
    }

    /// Distinct rooms with at least one subscription.
    pub fn rooms(&self) -> usize {
        self.rooms
    }

    /// Subscriptions held.
    pub fn subscriptions(&self) -> usize {
        self.subscriptions
    }

    /// Adds subscription `id` to `room`. An `id` already in that room is replaced.
    pub fn insert(&mut self, room: &Room, id: SubscriptionId, value: T) {
        let (keys, mask) = shape_of(room);
        let concrete = all_positions(room.len()) & !mask;
        let key = values_at(room, concrete);
        let masks = &mut self.shapes.entry(keys).or_insert_with(|| ShapeIndex { masks: FastMap::default() }).masks;
        let index = masks
            .entry(mask)
            .or_insert_with(|| MaskIndex { buckets: FastMap::default(), projections: FastMap::default() });
        if !index.buckets.contains_key(&key) {
            self.rooms += 1;
            for (subset, projection) in index.projections.iter_mut() {
                projection.keys.entry(project(&key, concrete, *subset)).or_default().insert(key.clone());
            }
        }
        if index.buckets.entry(key).or_default().insert(id, value).is_none() {
            self.subscriptions += 1;
        }
    }

    /// Removes subscription `id` from `room`, returning its value.
    pub fn remove(&mut self, room: &Room, id: SubscriptionId) -> Option<T> {
        let (keys, mask) = shape_of(room);
        let concrete = all_positions(room.len()) & !mask;
        let key = values_at(room, concrete);
        let shape = self.shapes.get_mut(&keys)?;
        let index = shape.masks.get_mut(&mask)?;
        let bucket = index.buckets.get_mut(&key)?;
        let value = bucket.remove(&id)?;
        self.subscriptions -= 1;
        if bucket.is_empty() {
            index.buckets.remove(&key);
            self.rooms -= 1;
            for (subset, projection) in index.projections.iter_mut() {
                let projected = project(&key, concrete, *subset);
                if let Some(keys) = projection.keys.get_mut(&projected) {
                    keys.remove(&key);
                    if keys.is_empty() {
                        projection.keys.remove(&projected);
                    }
                }
            }
            if index.buckets.is_empty() {
                self.projections -= index.projections.len();
                shape.masks.remove(&mask);
                if shape.masks.is_empty() {
                    self.shapes.remove(&keys);
                }
            }
        }
        Some(value)
    }

    /// Calls `deliver` once for every subscription that a trigger to `room`
    /// reaches (DESIGN.md §2 "Delivery"). Returns the number of index entries
    /// visited (buckets probed or walked, plus subscriptions yielded): the
    /// work done, for tests and benchmarks.
    pub fn for_each_match(&mut self, room: &Room, mut deliver: impl FnMut(SubscriptionId, &T)) -> usize {
        self.lookups += 1;
        let now = self.lookups;
        let (keys, trigger_wildcards) = shape_of(room);
        let Some(shape) = self.shapes.get_mut(&keys) else {
            return 1;
        };
        let full = all_positions(room.len());
        let trigger_concrete = full & !trigger_wildcards;
        let mut visited = 1;
        for (mask, index) in shape.masks.iter_mut() {
            let concrete = full & !mask;
            // Positions where both sides are concrete must be equal; all
            // others match whatever the values.
            let constrained = concrete & trigger_concrete;
            visited += 1;
            if constrained == concrete {
                if let Some(bucket) = index.buckets.get(&values_at(room, concrete)) {
                    visited += bucket.len();
                    bucket.iter().for_each(|(id, v)| deliver(*id, v));
                }
            } else if constrained == 0 {
                for bucket in index.buckets.values() {
                    visited += 1 + bucket.len();
                    bucket.iter().for_each(|(id, v)| deliver(*id, v));
                }
            } else {
                let MaskIndex { buckets, projections } = index;
                if !projections.contains_key(&constrained) {
                    if projections.len() >= self.projection_limit
                        && let Some(oldest) = projections.iter().min_by_key(|(_, p)| p.last_used).map(|(m, _)| *m)
                    {
                        projections.remove(&oldest);
                        self.projections -= 1;
                    }
                    let mut projection = Projection::default();
                    for key in buckets.keys() {
                        projection.keys.entry(project(key, concrete, constrained)).or_default().insert(key.clone());
                    }
                    projections.insert(constrained, projection);
                    self.projections += 1;
                    visited += buckets.len();
                }
                let Some(projection) = projections.get_mut(&constrained) else { continue };
                projection.last_used = now;
                if let Some(keys) = projection.keys.get(&values_at(room, constrained)) {
                    for key in keys {
                        if let Some(bucket) = buckets.get(key) {
                            visited += 1 + bucket.len();
                            bucket.iter().for_each(|(id, v)| deliver(*id, v));
                        }
                    }
                }
            }
        }
        visited
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn room(v: Value) -> Room {
        Room::from_json(&v).expect("valid room")
    }

    fn matches(index: &mut RoomIndex<()>, trigger: &Room) -> Vec<SubscriptionId> {
        let mut out = Vec::new();
        index.for_each_match(trigger, |id, _| out.push(id));
        out.sort_unstable();
        out
    }

    #[test]
    fn exact_and_wildcard_delivery() {
        let mut index = RoomIndex::new();
        index.insert(&room(json!({"customer": 1, "warehouse": 3})), 1, ());
        index.insert(&room(json!({"customer": 1, "warehouse": "*"})), 2, ());
        index.insert(&room(json!({"customer": 2, "warehouse": 3})), 3, ());
        index.insert(&room(json!({"customer": "*", "warehouse": "*"})), 4, ());
        index.insert(&room(json!({"customer": 1})), 5, ());
        assert_eq!(index.rooms(), 5);
        assert_eq!(matches(&mut index, &room(json!({"customer": 1, "warehouse": 3}))), [1, 2, 4]);
        assert_eq!(matches(&mut index, &room(json!({"customer": 1, "warehouse": "*"}))), [1, 2, 4]);
        assert_eq!(matches(&mut index, &room(json!({"customer": "*", "warehouse": 3}))), [1, 2, 3, 4]);
        assert_eq!(matches(&mut index, &room(json!({"customer": "*", "warehouse": "*"}))), [1, 2, 3, 4]);
        assert_eq!(matches(&mut index, &room(json!({"customer": 1}))), [5]);
        assert_eq!(matches(&mut index, &room(json!({"customer": "1"}))), Vec::<u64>::new());
    }

    #[test]
    fn removal_prunes_and_projections_follow() {
        let mut index = RoomIndex::new();
        let a = room(json!({"c": 1, "w": 1}));
        let b = room(json!({"c": 1, "w": 2}));
        index.insert(&a, 1, ());
        // Builds the projection on `c`.
        assert_eq!(matches(&mut index, &room(json!({"c": 1, "w": "*"}))), [1]);
        index.insert(&b, 2, ());
        assert_eq!(matches(&mut index, &room(json!({"c": 1, "w": "*"}))), [1, 2]);
        assert_eq!(index.remove(&a, 1), Some(()));
        assert_eq!(index.remove(&a, 1), None);
        assert_eq!(matches(&mut index, &room(json!({"c": 1, "w": "*"}))), [2]);
        assert_eq!(index.remove(&b, 2), Some(()));
        assert_eq!((index.rooms(), index.subscriptions()), (0, 0));
        assert!(index.shapes.is_empty(), "empty shapes are pruned");
    }

    #[test]
    fn same_id_in_same_room_is_one_subscription() {
        let mut index = RoomIndex::new();
        let a = room(json!({"u": 1}));
        index.insert(&a, 7, ());
        index.insert(&a, 7, ());
        assert_eq!(index.subscriptions(), 1);
        assert_eq!(matches(&mut index, &a), [7]);
    }

    /// DESIGN.md §2 "Cost": with 100 000 rooms held, a trigger that matches
    /// nothing visits a constant number of entries, and one that matches
    /// k subscriptions visits O(k).
    #[test]
    fn trigger_cost_does_not_grow_with_rooms_held() {
        let mut index = RoomIndex::new();
        for i in 0..100_000u64 {
            index.insert(&room(json!({"user": i, "group": i / 10})), i, ());
        }
        assert_eq!(index.rooms(), 100_000);
        // Same shape, no such values: one probe for the shape, one per mask.
        let visited = index.for_each_match(&room(json!({"user": 1, "group": 7})), |_, _| panic!("no match"));
        assert!(visited <= 3, "visited {visited} entries for a non-matching trigger");
        // Unknown shape: one probe.
        let visited = index.for_each_match(&room(json!({"team": 1})), |_, _| panic!("no match"));
        assert_eq!(visited, 1);
        // A wildcard trigger reaching 10 subscriptions.
        let mut hits = 0;
        index.for_each_match(&room(json!({"user": "*", "group": 42})), |_, _| hits += 1); // builds projection
        assert_eq!(hits, 10);
        let visited = index.for_each_match(&room(json!({"user": "*", "group": 42})), |_, _| ());
        assert!(visited <= 2 + 2 * 10, "visited {visited} entries for 10 matches");
        let visited = index.for_each_match(&room(json!({"user": "*", "group": -1})), |_, _| panic!("no match"));
        assert!(visited <= 3, "visited {visited} entries for a non-matching wildcard trigger");
    }

    /// Issue 11 finding 4b: triggers with 1 022 distinct wildcard patterns
    /// over a 10-key room kept a projection each (+170 MB with 300
    /// subscriptions). Now at most the limit is kept, and every lookup
    /// still delivers exactly what the brute-force matcher says.
    #[test]
    fn distinct_wildcard_patterns_keep_a_bounded_number_of_projections() {
        let keys = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"];
        let mut index = RoomIndex::new();
        let mut subs = Vec::new();
        for id in 0..300u64 {
            let r =
                Room::from_pairs(keys.iter().enumerate().map(|(i, k)| (*k, Scalar::Number(((id >> i) & 1).into()))));
            index.insert(&r, id, ());
            subs.push(r);
        }
        // Every mix of wildcards and concrete values but all-wildcard and all-concrete.
        for pattern in 1..(1u32 << keys.len()) - 1 {
            let trigger = Room::from_pairs(keys.iter().enumerate().map(|(i, k)| {
                let v = if pattern & (1 << i) != 0 { Scalar::Str("*".into()) } else { Scalar::Number(1.into()) };
                (*k, v)
            }));
            let expected: Vec<u64> =
                subs.iter().enumerate().filter(|(_, s)| trigger.delivers_to(s)).map(|(id, _)| id as u64).collect();
            assert_eq!(matches(&mut index, &trigger), expected, "pattern {pattern:b}");
            assert!(index.projections() <= MAX_PROJECTIONS_PER_MASK, "{} projections", index.projections());
        }
        assert_eq!(index.projections(), MAX_PROJECTIONS_PER_MASK);
        for (id, r) in subs.iter().enumerate() {
            index.remove(r, id as u64);
        }
        assert_eq!(index.projections(), 0, "an emptied mask takes its projections with it");
    }

    fn scalar() -> impl Strategy<Value = Scalar> {
        prop_oneof![
            3 => Just(Scalar::Str("*".into())),
            3 => (0..3i64).prop_map(|n| Scalar::Number(n.into())),
            2 => (0..3u8).prop_map(|n| Scalar::Str(n.to_string().into())),
            1 => Just(Scalar::Null),
            1 => any::<bool>().prop_map(Scalar::Bool),
        ]
    }

    fn arb_room() -> impl Strategy<Value = Room> {
        proptest::collection::btree_map(prop_oneof![Just("a"), Just("b"), Just("c")], scalar(), 0..=3)
            .prop_map(Room::from_pairs)
    }

    proptest! {
        /// The index agrees with the brute-force matcher of `room.rs`,
        /// through inserts, lookups (which build projections) and removals.
        #[test]
        fn index_agrees_with_brute_force(
            subs in proptest::collection::vec(arb_room(), 0..60),
            triggers in proptest::collection::vec(arb_room(), 1..20),
            removals in proptest::collection::vec(any::<bool>(), 60),
            projection_limit in 1..=3usize,
        ) {
            // Small limits, so lookups evict and rebuild projections.
            let mut index = RoomIndex::with_projection_limit(projection_limit);
            for (id, r) in subs.iter().enumerate() {
                index.insert(r, id as u64, ());
            }
            let check = |index: &mut RoomIndex<()>, live: &dyn Fn(usize) -> bool| {
                for t in &triggers {
                    let expected: Vec<u64> = subs.iter().enumerate()
                        .filter(|(id, s)| live(*id) && t.delivers_to(s))
                        .map(|(id, _)| id as u64).collect();
                    prop_assert_eq!(matches(index, t), expected, "trigger {:?}", t);
                }
                Ok(())
            };
            check(&mut index, &|_| true)?;
            for (id, r) in subs.iter().enumerate() {
                if removals[id] {
                    prop_assert_eq!(index.remove(r, id as u64), Some(()));
                }
            }
            check(&mut index, &|id| !removals[id])?;
            let distinct: FastSet<&Room> = subs.iter().enumerate().filter(|(id, _)| !removals[*id]).map(|(_, r)| r).collect();
            prop_assert_eq!(index.rooms(), distinct.len());
        }
    }
}
