//! Rooms: canonical key/value dicts, and the two relations between them
//! (permission and delivery) from DESIGN.md §2.
//!
//! A room is a JSON object whose values are scalars. Two rooms are the same
//! room when they have the same keys with the same values, whatever the key
//! order. Values compare as JSON values: `"1"` and `1` differ, and so do `1`
//! and `1.0`. The string `"*"` is the wildcard.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::{Map, Number, Value};

/// Most keys a room may have. Wildcard positions are tracked in a `u32`
/// bit mask by the index, and real rooms have a handful of keys.
pub const MAX_ROOM_KEYS: usize = 32;

/// Longest key or string value accepted in a room, in bytes.
pub const MAX_ROOM_TEXT: usize = 1024;

/// Most distinct texts [`shared_text`] keeps, and the longest it keeps;
/// past them, texts are allocated per use, so clients sending random keys
/// cannot grow the table forever (it stays under ≈ 0.5 MiB).
const MAX_SHARED_TEXTS: usize = 4096;
const MAX_SHARED_TEXT_BYTES: usize = 64;

/// One shared copy of a room key (or of the wildcard): every connection's
/// allowed rooms and subscriptions repeat the same few keys (`user`,
/// `group`, …), and an idle connection is mostly such rooms.
fn shared_text(text: &str) -> Arc<str> {
    static TEXTS: LazyLock<Mutex<HashSet<Arc<str>>>> = LazyLock::new(Mutex::default);
    if text.len() > MAX_SHARED_TEXT_BYTES {
        return Arc::from(text);
    }
    // Poisoning cannot leave the set inconsistent (insert is the only write).
    let mut texts = TEXTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(shared) = texts.get(text) {
        return shared.clone();
    }
    let shared: Arc<str> = Arc::from(text);
    if texts.len() < MAX_SHARED_TEXTS {
        texts.insert(shared.clone());
    }
    shared
}

/// One value of a room.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scalar {
    /// JSON `null`.
    Null,
    /// JSON `true` / `false`.
    Bool(bool),
    /// A JSON number, compared by its JSON form (so `1` is not `1.0`).
    Number(Number),
    /// A JSON string; `"*"` is the wildcard.
    Str(Arc<str>),
}

impl Scalar {
    /// Whether this value is the wildcard `"*"`.
    pub fn is_wildcard(&self) -> bool {
        matches!(self, Scalar::Str(s) if &**s == "*")
    }

    fn to_json(&self) -> Value {
        match self {
            Scalar::Null => Value::Null,
            Scalar::Bool(b) => Value::Bool(*b),
            Scalar::Number(n) => Value::Number(n.clone()),
            Scalar::Str(s) => Value::String(s.to_string()),
        }
    }
}

/// Why a JSON value is not a room.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRoom {
    /// The value is not a JSON object.
    #[error("a room must be a JSON object")]
    NotAnObject,
    /// One value is an object or an array.
    #[error("room key {0:?} has a value that is not a string, number, boolean or null")]
    NotScalar(String),
    /// More than [`MAX_ROOM_KEYS`] keys.
    #[error("a room has at most {MAX_ROOM_KEYS} keys")]
    TooManyKeys,
    /// A key or value longer than [`MAX_ROOM_TEXT`].
    #[error("room keys and string values are at most {MAX_ROOM_TEXT} bytes")]
    TooLong,
}

/// A room in canonical form: entries sorted by key, keys unique.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Room {
    /// `(key, value)` pairs sorted by key.
    entries: Box<[(Arc<str>, Scalar)]>,
}

/// Why a JSON list of rooms was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidRoomList {
    /// Not a JSON list.
    NotAList,
    /// More rooms than the limit given.
    TooMany(usize),
    /// One room is not a room.
    BadRoom {
        /// Its position in the list.
        index: usize,
        /// What is wrong with it.
        reason: InvalidRoom,
    },
}

/// Visits a JSON list one room at a time: reading stops at the first bad
/// room or past `max` rooms, so what a list costs to read is bounded by the
/// limit, not by how many rooms the sender wrote.
struct RoomListVisitor {
    /// The most rooms taken.
    max: usize,
    /// Why reading stopped early, when it did.
    stopped: std::cell::Cell<Option<InvalidRoomList>>,
}

impl<'de> serde::de::Visitor<'de> for &RoomListVisitor {
    type Value = Vec<Room>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of rooms")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Room>, A::Error> {
        let mut rooms = Vec::new();
        while let Some(value) = seq.next_element::<Value>()? {
            let index = rooms.len();
            if index == self.max {
                self.stopped.set(Some(InvalidRoomList::TooMany(self.max)));
                return Err(serde::de::Error::custom("too many rooms"));
            }
            match Room::from_json(&value) {
                Ok(room) => rooms.push(room),
                Err(reason) => {
                    self.stopped.set(Some(InvalidRoomList::BadRoom { index, reason }));
                    return Err(serde::de::Error::custom("bad room"));
                }
            }
        }
        Ok(rooms)
    }
}

/// Reads the JSON text of a list of at most `max` rooms (a trigger's
/// `rooms`, a bootstrap answer's `allowed_rooms`).
pub fn parse_room_list(json: &str, max: usize) -> Result<Vec<Room>, InvalidRoomList> {
    if !json.trim_start().starts_with('[') {
        return Err(InvalidRoomList::NotAList);
    }
    let visitor = RoomListVisitor { max, stopped: std::cell::Cell::new(None) };
    let mut de = serde_json::Deserializer::from_str(json);
    serde::Deserializer::deserialize_seq(&mut de, &visitor)
        .map_err(|_| visitor.stopped.take().unwrap_or(InvalidRoomList::NotAList))
}

impl Room {
    /// What the room holds in memory, bytes, roughly (shared keys counted
    /// as if they were not): what per-connection budgets count.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Room>()
            + self
                .entries
                .iter()
                .map(|(k, v)| {
                    let value = match v {
                        Scalar::Str(s) => s.len() + 16,
                        _ => 0,
                    };
                    std::mem::size_of::<(Arc<str>, Scalar)>() + k.len() + 16 + value
                })
                .sum::<usize>()
    }

    /// Parses a JSON value into a canonical room.
    pub fn from_json(value: &Value) -> Result<Room, InvalidRoom> {
        let Value::Object(map) = value else {
            return Err(InvalidRoom::NotAnObject);
        };
        Room::from_map(map)
    }

    /// Parses a JSON object into a canonical room.
    pub fn from_map(map: &Map<String, Value>) -> Result<Room, InvalidRoom> {
        if map.len() > MAX_ROOM_KEYS {
            return Err(InvalidRoom::TooManyKeys);
        }
        let mut entries: Vec<(Arc<str>, Scalar)> = Vec::with_capacity(map.len());
        for (key, value) in map {
            if key.len() > MAX_ROOM_TEXT {
                return Err(InvalidRoom::TooLong);
            }
            let scalar = match value {
                Value::Null => Scalar::Null,
                Value::Bool(b) => Scalar::Bool(*b),
                Value::Number(n) => Scalar::Number(n.clone()),
                Value::String(s) if s.len() > MAX_ROOM_TEXT => return Err(InvalidRoom::TooLong),
                Value::String(s) if s == "*" => Scalar::Str(shared_text(s)),
                Value::String(s) => Scalar::Str(Arc::from(s.as_str())),
                Value::Array(_) | Value::Object(_) => return Err(InvalidRoom::NotScalar(key.clone())),
            };
            entries.push((shared_text(key), scalar));
        }
        // A JSON object has unique keys, so sorting gives the canonical order.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Room { entries: entries.into_boxed_slice() })
    }

    /// Builds a room from `(key, value)` pairs; a later duplicate key wins.
    pub fn from_pairs<K: Into<Arc<str>>>(pairs: impl IntoIterator<Item = (K, Scalar)>) -> Room {
        let mut entries: Vec<(Arc<str>, Scalar)> = pairs.into_iter().map(|(k, v)| (k.into(), v)).collect();
        entries.reverse();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.dedup_by(|a, b| a.0 == b.0);
        Room { entries: entries.into_boxed_slice() }
    }

    /// The sorted `(key, value)` pairs.
    pub fn entries(&self) -> &[(Arc<str>, Scalar)] {
        &self.entries
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the room has no keys at all (`{}`).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether both rooms have exactly the same key set.
    pub fn same_keys(&self, other: &Room) -> bool {
        self.entries.len() == other.entries.len()
            && self.entries.iter().zip(other.entries.iter()).all(|(a, b)| a.0 == b.0)
    }

    /// Permission: may a user allowed `self` subscribe to `requested`?
    /// Same key set, and for every key `self[k] == "*"` or `self[k] == requested[k]`.
    pub fn permits(&self, requested: &Room) -> bool {
        self.same_keys(requested)
            && self.entries.iter().zip(requested.entries.iter()).all(|(a, r)| a.1.is_wildcard() || a.1 == r.1)
    }

    /// Delivery: does a trigger to `self` reach a subscription to `subscribed`?
    /// Same key set, and for every key the values are equal or either is `"*"`.
    pub fn delivers_to(&self, subscribed: &Room) -> bool {
        self.same_keys(subscribed)
            && self
                .entries
                .iter()
                .zip(subscribed.entries.iter())
                .all(|(p, s)| p.1 == s.1 || p.1.is_wildcard() || s.1.is_wildcard())
    }

    /// The room as a JSON object (keys in canonical order).
    pub fn to_json(&self) -> Value {
        Value::Object(self.entries.iter().map(|(k, v)| (k.to_string(), v.to_json())).collect())
    }
}

impl fmt::Debug for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn room(v: Value) -> Room {
        Room::from_json(&v).expect("valid room")
    }

    #[test]
    fn keys_and_wildcards_are_shared_between_rooms() {
        let a = room(json!({"shared_key_test": "*", "v": "x"}));
        let b = room(json!({"shared_key_test": "*", "v": "x"}));
        let (ka, Scalar::Str(wa)) = &a.entries()[0] else { panic!("string value") };
        let (kb, Scalar::Str(wb)) = &b.entries()[0] else { panic!("string value") };
        assert!(Arc::ptr_eq(ka, kb) && Arc::ptr_eq(wa, wb));
        // Other string values are not kept (they would grow without bound).
        let (Scalar::Str(va), Scalar::Str(vb)) = (&a.entries()[1].1, &b.entries()[1].1) else { panic!("strings") };
        assert!(!Arc::ptr_eq(va, vb));
    }

    #[test]
    fn key_order_is_irrelevant() {
        assert_eq!(room(json!({"a": 1, "b": "x"})), room(json!({"b": "x", "a": 1})));
    }

    #[test]
    fn string_and_number_differ() {
        assert_ne!(room(json!({"a": 1})), room(json!({"a": "1"})));
        assert_ne!(room(json!({"a": 1})), room(json!({"a": 1.0})));
        assert_ne!(room(json!({"a": true})), room(json!({"a": 1})));
        assert_ne!(room(json!({"a": null})), room(json!({"a": "null"})));
    }

    #[test]
    fn rejects_non_rooms() {
        assert_eq!(Room::from_json(&json!([1])), Err(InvalidRoom::NotAnObject));
        assert_eq!(Room::from_json(&json!("a")), Err(InvalidRoom::NotAnObject));
        assert_eq!(Room::from_json(&json!({"a": {"b": 1}})), Err(InvalidRoom::NotScalar("a".into())));
        assert_eq!(Room::from_json(&json!({"a": [1]})), Err(InvalidRoom::NotScalar("a".into())));
        let many: Map<String, Value> = (0..=MAX_ROOM_KEYS).map(|i| (format!("k{i}"), json!(i))).collect();
        assert_eq!(Room::from_map(&many), Err(InvalidRoom::TooManyKeys));
        let long = "x".repeat(MAX_ROOM_TEXT + 1);
        assert_eq!(Room::from_json(&json!({"a": long})), Err(InvalidRoom::TooLong));
    }

    #[test]
    fn permission_wildcard_only_on_the_allowed_side() {
        let allowed = room(json!({"user": "*", "target": "message"}));
        assert!(allowed.permits(&room(json!({"user": 5, "target": "message"}))));
        assert!(allowed.permits(&room(json!({"user": "*", "target": "message"}))));
        assert!(!allowed.permits(&room(json!({"user": 5, "target": "other"}))));
        assert!(!allowed.permits(&room(json!({"user": 5}))));
        assert!(!allowed.permits(&room(json!({"user": 5, "target": "message", "x": 1}))));
        let exact = room(json!({"user": 5}));
        assert!(exact.permits(&room(json!({"user": 5}))));
        assert!(!exact.permits(&room(json!({"user": "*"}))), "a subscriber cannot widen a concrete permission");
        assert!(!exact.permits(&room(json!({"user": "5"}))));
    }

    #[test]
    fn delivery_wildcard_on_either_side() {
        let sub = room(json!({"customer": 1, "warehouse": "*"}));
        assert!(room(json!({"customer": 1, "warehouse": 7})).delivers_to(&sub));
        assert!(room(json!({"customer": "*", "warehouse": 7})).delivers_to(&sub));
        assert!(!room(json!({"customer": 2, "warehouse": 7})).delivers_to(&sub));
        assert!(!room(json!({"customer": 1})).delivers_to(&sub));
        let concrete = room(json!({"customer": 1, "warehouse": 3}));
        assert!(room(json!({"customer": 1, "warehouse": "*"})).delivers_to(&concrete));
        assert!(!room(json!({"customer": 1, "warehouse": 4})).delivers_to(&concrete));
        assert!(room(json!({})).delivers_to(&room(json!({}))));
    }

    #[test]
    fn from_pairs_canonicalises() {
        let r = Room::from_pairs([("b", Scalar::Bool(true)), ("a", Scalar::Null), ("b", Scalar::Bool(false))]);
        assert_eq!(r, room(json!({"a": null, "b": false})));
    }

    #[test]
    fn round_trips_to_json() {
        let v = json!({"a": 1, "b": "*", "c": null, "d": false, "e": 1.5});
        assert_eq!(room(v.clone()).to_json(), v);
    }
}
