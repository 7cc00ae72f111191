//! `backend::parse_bootstrap`, the reader of the backend's `bootstrap/`
//! answer (`{"allowed_rooms":[room,…], …}`; other keys such as `user` are
//! skipped; `allowed_rooms` missing or `null` is no rooms), with the default
//! `backend.maxAllowedRooms` (10 000).
//!
//! Checks, from backend.rs and room.rs:
//! - parsing is deterministic; at most `max_rooms` rooms; every refusal is
//!   `InvalidBody` (close 4401, never "try again later");
//! - an answer of n rooms is refused for any limit < n and gives the same
//!   rooms for any limit ≥ n;
//! - when the body is also a strict JSON object, the rooms are
//!   `Room::from_json` of the elements of its `allowed_rooms`;
//! - every room read is canonical and round-trips (`common::check_room`).
#![no_main]

use high_templar_gateway::backend::{BootstrapError, CLOSE_UNAUTHORIZED, parse_bootstrap};
use high_templar_gateway::room::Room;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[path = "common.rs"]
mod common;

const MAX_ROOMS: usize = 10_000;
const SMALL: usize = 2;

fuzz_target!(|body: &[u8]| {
    let parsed = parse_bootstrap(body, MAX_ROOMS);
    assert_eq!(parsed, parse_bootstrap(body, MAX_ROOMS), "deterministic");
    let small = parse_bootstrap(body, SMALL);
    let rooms = match parsed {
        Ok(rooms) => rooms,
        Err(e) => {
            assert!(matches!(e, BootstrapError::InvalidBody(_)), "{e:?}");
            assert_eq!(e.close_code(), CLOSE_UNAUTHORIZED);
            assert!(small.is_err(), "a smaller limit accepted what the larger refused");
            return;
        }
    };
    assert!(rooms.len() <= MAX_ROOMS);
    if rooms.len() > SMALL {
        assert_eq!(small, Err(BootstrapError::InvalidBody("more allowed_rooms than backend.maxAllowedRooms")));
    } else {
        assert_eq!(small.as_ref(), Ok(&rooms), "under the limit, the limit changes nothing");
    }
    for room in &rooms {
        common::check_room(room);
    }
    // The gateway only reads `allowed_rooms`, so a body with, say, a 1e400
    // elsewhere is still an answer; when the whole body is plain JSON, its
    // `allowed_rooms` must say the same.
    if let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(body) {
        let expected: Vec<Room> = match answer.get("allowed_rooms") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(values)) => {
                values.iter().map(|v| Room::from_json(v).expect("an accepted answer holds rooms")).collect()
            }
            Some(other) => panic!("accepted allowed_rooms {other}"),
        };
        assert_eq!(rooms, expected, "the rooms are allowed_rooms");
    }
    for a in rooms.iter().take(4) {
        for b in rooms.iter().take(4) {
            common::check_relations(a, b);
        }
    }
});
