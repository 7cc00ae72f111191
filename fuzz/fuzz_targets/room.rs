//! `room::parse_room_list` (the reader of a trigger's `rooms` and a
//! bootstrap answer's `allowed_rooms`) and `Room::from_json`, then the room
//! relations (`same_keys`, `permits`, `delivers_to`) on the rooms read.
//!
//! Checks, from room.rs:
//! - parsing is deterministic; a list holds at most `max` rooms, and a list
//!   of n valid rooms is `TooMany(max)` for any max < n (reading stops past
//!   the limit) and the same rooms for any max ≥ n;
//! - a strict JSON array of rooms gives the rooms `Room::from_json` gives
//!   for its elements;
//! - every room read is canonical and round-trips (`common::check_room`),
//!   also through its JSON text (floats up to one ulp);
//! - the documented properties of the relations (`common::check_relations`)
//!   for every pair of the first rooms.
#![no_main]

use high_templar_gateway::room::{InvalidRoomList, Room, parse_room_list};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[path = "common.rs"]
mod common;

/// `trigger.maxRooms` / `backend.maxAllowedRooms` default.
const MAX: usize = 10_000;
/// A small limit, to reach the `TooMany` path with small inputs.
const SMALL: usize = 3;
/// Pairs of rooms checked: the first this many rooms, all pairs.
const PAIRS_OF: usize = 8;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let list = parse_room_list(text, MAX);
    assert_eq!(list, parse_room_list(text, MAX), "deterministic");
    let small = parse_room_list(text, SMALL);
    let mut rooms: Vec<Room> = Vec::new();
    match &list {
        Ok(list) => {
            assert!(list.len() <= MAX);
            if list.len() > SMALL {
                assert_eq!(small, Err(InvalidRoomList::TooMany(SMALL)), "{} rooms, limit {SMALL}", list.len());
            } else {
                assert_eq!(small.as_ref(), Ok(list), "under the limit, the limit changes nothing");
            }
            rooms.extend(list.iter().cloned());
        }
        Err(InvalidRoomList::TooMany(max)) => assert_eq!(*max, MAX),
        Err(InvalidRoomList::BadRoom { index, .. }) => assert!(*index < MAX),
        Err(InvalidRoomList::NotAList) => {}
    }
    if let Ok(small) = &small {
        assert!(small.len() <= SMALL);
        assert_eq!(list.as_ref(), Ok(small), "what a small limit accepts, a larger one accepts");
    }

    // The text as one JSON value: a room itself, or a list of values.
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        match &value {
            Value::Array(values) => {
                let each: Result<Vec<Room>, _> = values.iter().map(Room::from_json).collect();
                match (&list, each) {
                    (Ok(list), Ok(each)) => assert_eq!(list, &each, "list = from_json of each element"),
                    (Ok(_), Err(e)) => panic!("a list holding a non-room ({e}) was read"),
                    (Err(InvalidRoomList::TooMany(_)), Ok(each)) => assert!(each.len() > MAX),
                    (Err(e), Ok(_)) => panic!("a JSON list of rooms was refused: {e:?}"),
                    (Err(_), Err(_)) => {}
                }
            }
            _ => {
                assert!(list.is_err(), "only a list is a room list");
                if let Ok(room) = Room::from_json(&value) {
                    rooms.push(room);
                }
            }
        }
    }

    for room in &rooms {
        common::check_room(room);
        let printed = room.to_json().to_string();
        let value: Value = serde_json::from_str(&printed).expect("a printed room is JSON");
        let again = Room::from_json(&value).expect("a printed room is a room");
        assert!(common::same_through_text(room, &again), "{room:?} printed and read back: {again:?}");
    }
    let first = &rooms[..rooms.len().min(PAIRS_OF)];
    for a in first {
        for b in first {
            common::check_relations(a, b);
        }
    }
});
