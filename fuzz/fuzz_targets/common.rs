//! Checks shared by the targets (each target includes this file with
//! `#[path]`; not every target uses every helper).
#![allow(dead_code)]

use high_templar_gateway::room::{MAX_ROOM_KEYS, MAX_ROOM_TEXT, Room, Scalar};

/// What `Room` promises about its canonical form (room.rs): at most
/// `MAX_ROOM_KEYS` keys, sorted and unique, keys and string values at most
/// `MAX_ROOM_TEXT` bytes; and that `to_json` → `from_json` gives the same
/// room back, as does `from_pairs` of its own entries.
pub fn check_room(room: &Room) {
    let entries = room.entries();
    assert!(entries.len() <= MAX_ROOM_KEYS, "{room:?}: too many keys");
    assert_eq!(room.len(), entries.len());
    assert_eq!(room.is_empty(), entries.is_empty());
    assert!(entries.windows(2).all(|w| w[0].0 < w[1].0), "{room:?}: keys not sorted and unique");
    for (key, value) in entries {
        assert!(key.len() <= MAX_ROOM_TEXT, "{room:?}: key too long");
        if let Scalar::Str(s) = value {
            assert!(s.len() <= MAX_ROOM_TEXT, "{room:?}: value too long");
        }
    }
    let json = room.to_json();
    assert_eq!(json.as_object().map(|m| m.len()), Some(room.len()), "{room:?}: to_json is an object of its keys");
    assert_eq!(Room::from_json(&json).as_ref(), Ok(room), "to_json → from_json round trip");
    assert_eq!(&Room::from_pairs(entries.iter().cloned()), room, "from_pairs of its own entries");
    assert_eq!(format!("{room:?}"), json.to_string(), "Debug is the JSON form");
    let _ = room.approx_bytes();
}

/// The relations of room.rs between two rooms, as documented there:
/// `permits` and `delivers_to` require the same key set; `same_keys` and
/// `delivers_to` are symmetric (equal, or a wildcard on either side);
/// permission implies delivery (a wildcard or an equal value on the allowed
/// side); a room permits and reaches itself.
pub fn check_relations(a: &Room, b: &Room) {
    let same = a.same_keys(b);
    assert_eq!(same, b.same_keys(a), "same_keys is symmetric: {a:?} {b:?}");
    let permits = a.permits(b);
    let delivers = a.delivers_to(b);
    assert!(!permits || same, "permits without the same keys: {a:?} {b:?}");
    assert!(!delivers || same, "delivers_to without the same keys: {a:?} {b:?}");
    assert_eq!(delivers, b.delivers_to(a), "delivers_to is symmetric: {a:?} {b:?}");
    assert!(!permits || delivers, "permits but does not deliver: {a:?} {b:?}");
    if a == b {
        assert!(same && permits && delivers, "a room permits and reaches itself: {a:?}");
    }
    for r in [a, b] {
        assert!(r.same_keys(r) && r.permits(r) && r.delivers_to(r), "reflexive: {r:?}");
    }
}

/// Whether `b` is `a` read back from its JSON text. serde_json (without its
/// `float_roundtrip` feature) may read a printed float back one ulp off, so
/// float values only have to be floats on both sides; everything else must
/// be equal.
pub fn same_through_text(a: &Room, b: &Room) -> bool {
    a.same_keys(b)
        && a.entries().iter().zip(b.entries()).all(|((_, x), (_, y))| match (x, y) {
            (Scalar::Number(m), Scalar::Number(n)) if m.is_f64() => n.is_f64(),
            _ => x == y,
        })
}
