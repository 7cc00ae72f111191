//! `trigger::Trigger::parse`, the one parser of trigger bodies from both
//! sources (`POST /trigger` and AMQP), with the default `trigger.maxRooms`
//! (10 000); then `to_body` (what a trigger is republished as) and parsing
//! that again.
//!
//! Checks, from trigger.rs:
//! - parsing is deterministic; at most `max_rooms` rooms; `data` is JSON;
//! - `parse_within` refuses a body over `max_body_bytes` (`TooLarge`) and
//!   is `parse` otherwise;
//! - error messages never quote the body (they are logged);
//! - `to_body` of a parsed trigger parses again, to the same rooms (floats
//!   up to one ulp, see `common::same_through_text`);
//! - `Published::parse_within` (what both sources call: a trigger, or a
//!   control message when the body has `control`) is deterministic, is
//!   `parse` for bodies without `control`, and a control message's
//!   `to_body` parses again to the same action, users and rooms.
#![no_main]

use high_templar_gateway::trigger::{InvalidTrigger, Published, Trigger, TriggerLimits};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

#[path = "common.rs"]
mod common;

const MAX_ROOMS: usize = 10_000;

fuzz_target!(|body: &[u8]| {
    check_published(body);
    let parsed = Trigger::parse(body, MAX_ROOMS);
    let again = Trigger::parse(body, MAX_ROOMS);
    match (&parsed, &again) {
        (Ok(a), Ok(b)) => assert!(a.rooms == b.rooms && a.data.get() == b.data.get(), "deterministic"),
        (Err(a), Err(b)) => assert_eq!(a, b, "deterministic"),
        _ => panic!("deterministic"),
    }
    let within = |max_body_bytes| Trigger::parse_within(body, TriggerLimits { max_body_bytes, max_rooms: MAX_ROOMS });
    if let Some(smaller) = body.len().checked_sub(1) {
        assert_eq!(within(smaller).err(), Some(InvalidTrigger::TooLarge(smaller)), "over maxBodyBytes");
    }
    match (&parsed, within(body.len())) {
        (Ok(a), Ok(b)) => assert!(a.rooms == b.rooms && a.data.get() == b.data.get(), "parse_within = parse"),
        (Err(a), Err(b)) => assert_eq!(a, &b, "parse_within = parse"),
        _ => panic!("parse_within = parse"),
    }

    let trigger = match parsed {
        Ok(trigger) => trigger,
        Err(e) => {
            // "Messages never quote the body". Only bodies that start like
            // an object are looked for: the fixed message for the others
            // ("expected a JSON object") contains short bodies by chance.
            // (A `BadRoom` message does quote one room key, by design.)
            if body.len() >= 8
                && body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
                && let Ok(text) = std::str::from_utf8(body)
            {
                assert!(!e.to_string().contains(text), "the error {e} quotes the body");
            }
            return;
        }
    };
    assert!(trigger.rooms.len() <= MAX_ROOMS);
    // As raw JSON: `data` may nest deeper than serde_json's recursion limit
    // for values (the gateway forwards it as written; see trigger.rs).
    serde_json::from_str::<Box<RawValue>>(trigger.data.get()).expect("data is JSON");
    for room in &trigger.rooms {
        common::check_room(room);
    }

    let republished = trigger.to_body();
    let reparsed = Trigger::parse(&republished, MAX_ROOMS)
        .unwrap_or_else(|e| panic!("to_body {:?} does not parse again: {e}", String::from_utf8_lossy(&republished)));
    assert_eq!(reparsed.rooms.len(), trigger.rooms.len());
    for (a, b) in trigger.rooms.iter().zip(&reparsed.rooms) {
        assert!(common::same_through_text(a, b), "{a:?} republished as {b:?}");
    }
    assert_eq!(reparsed.data.get(), trigger.data.get(), "data is republished as written");
});

fn check_published(body: &[u8]) {
    let limits = TriggerLimits { max_body_bytes: body.len(), max_rooms: MAX_ROOMS };
    let published = Published::parse_within(body, limits);
    match (&published, Published::parse_within(body, limits)) {
        (Ok(a), Ok(b)) => assert_eq!(a.kind(), b.kind(), "deterministic"),
        (Err(a), Err(b)) => assert_eq!(a, &b, "deterministic"),
        _ => panic!("deterministic"),
    }
    let control = match published {
        Ok(Published::Control(control)) => control,
        Ok(Published::Trigger(trigger)) => {
            let plain = Trigger::parse(body, MAX_ROOMS).expect("a trigger for Published is one for Trigger");
            assert!(plain.rooms == trigger.rooms && plain.data.get() == trigger.data.get(), "Published = Trigger");
            return;
        }
        Err(_) => return,
    };
    assert!(!control.users.is_empty() || !control.subscribed.is_empty(), "a control names connections");
    let republished = control.to_body();
    let Ok(Published::Control(again)) =
        Published::parse_within(&republished, TriggerLimits { max_body_bytes: usize::MAX, max_rooms: MAX_ROOMS })
    else {
        panic!("control to_body {:?} does not parse again", String::from_utf8_lossy(&republished));
    };
    assert_eq!(again.action, control.action);
    assert_eq!(again.users, control.users);
    assert_eq!(again.subscribed.len(), control.subscribed.len());
    for (a, b) in control.subscribed.iter().zip(&again.subscribed) {
        assert!(common::same_through_text(a, b), "{a:?} republished as {b:?}");
    }
}
