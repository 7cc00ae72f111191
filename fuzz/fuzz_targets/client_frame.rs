//! `protocol::parse_client_frame` on client text frames (UTF-8 only: the
//! websocket layer refuses other text frames), with the default
//! `limits.maxRequestIdBytes` (128).
//!
//! Besides "never panics", checks what protocol.rs documents, against a
//! second reading of the same text as a JSON object of raw fields:
//! - parsing is deterministic; `ping` (exactly) is the only ping;
//! - the frame type is the object's `type` (the last one when repeated);
//! - `requestId`: longer than the limit (as JSON text) is `TooLong`; a
//!   number is kept as written; a string is kept re-serialised; anything
//!   else is `Missing`;
//! - a subscribe's room is `Room::from_map` of `room`, or `NotAnObject`;
//! - replies that echo a request id are JSON and carry the id as its text.
#![no_main]

use std::collections::HashMap;

use high_templar_gateway::protocol::{
    ClientFrame, HubStatus, RequestId, RequestIdField, error, parse_client_frame, publish_prefix, status, success,
};
use high_templar_gateway::room::{InvalidRoom, Room};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use serde_json::value::RawValue;

#[path = "common.rs"]
mod common;

const MAX_REQUEST_ID_BYTES: usize = 128;

/// What the `requestId` field should be, from its raw text.
#[derive(Debug)]
enum ExpectedId<'a> {
    Missing,
    TooLong,
    /// A string: kept as its re-serialised text.
    Text(String),
    /// A number: kept exactly as written.
    AsWritten(&'a str),
}

fn expected_request_id(raw: Option<&RawValue>) -> ExpectedId<'_> {
    let Some(raw) = raw else { return ExpectedId::Missing };
    let text = raw.get();
    if text.len() > MAX_REQUEST_ID_BYTES {
        return ExpectedId::TooLong;
    }
    if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return ExpectedId::AsWritten(text);
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::String(s)) => ExpectedId::Text(serde_json::to_string(&s).expect("a string serialises")),
        _ => ExpectedId::Missing,
    }
}

/// Replies echoing `id` are JSON objects whose `requestId` is `id`'s text.
fn check_replies(id: &RequestId) {
    let check = |reply: &str| {
        let fields: HashMap<String, &RawValue> =
            serde_json::from_str(reply).unwrap_or_else(|e| panic!("reply {reply:?} is not a JSON object: {e}"));
        assert_eq!(fields.get("requestId").map(|r| r.get()), Some(id.as_json()), "reply {reply:?}");
    };
    check(&success(id));
    check(&error("room-not-found", Some(id)));
    check(&status(&HubStatus::default(), Some(id)));
    check(&[&*publish_prefix(r#"{"x":[1,"y"]}"#), &*id.publish_suffix()].concat());
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = parse_client_frame(text, MAX_REQUEST_ID_BYTES);
    assert_eq!(parsed, parse_client_frame(text, MAX_REQUEST_ID_BYTES), "deterministic");
    if text == "ping" {
        assert_eq!(parsed, Ok(ClientFrame::Ping));
        return;
    }
    assert_ne!(parsed, Ok(ClientFrame::Ping), "only `ping` is a ping");

    // The same text as an object of raw fields (a repeated key: the last).
    let fields = serde_json::from_str::<HashMap<String, &RawValue>>(text);
    let Ok(frame) = parsed else {
        // Refused frames are refused as a whole: nothing else to compare
        // (the raw reading accepts more, e.g. a `type` of 1e400).
        return;
    };
    let fields = fields.unwrap_or_else(|e| panic!("a frame the gateway read is a JSON object: {e}"));
    let field_value = |name: &str| fields.get(name).map(|r| serde_json::from_str::<Value>(r.get()));
    let kind = match field_value("type") {
        Some(Ok(Value::String(s))) => s,
        other => panic!("a frame without a string `type` was accepted: {other:?}"),
    };
    let raw_id = fields.get("requestId").copied();
    let expected_id = expected_request_id(raw_id);
    let request_id = match &frame {
        ClientFrame::Ping => unreachable!("checked above"),
        ClientFrame::Subscribe { room, request_id } => {
            assert_eq!(kind, "subscribe");
            let expected_room = match field_value("room") {
                Some(Ok(Value::Object(map))) => Room::from_map(&map),
                _ => Err(InvalidRoom::NotAnObject),
            };
            assert_eq!(room, &expected_room, "the subscribe room is `room`");
            if let Ok(room) = room {
                common::check_room(room);
            }
            request_id
        }
        ClientFrame::Unsubscribe { request_id } => {
            assert_eq!(kind, "unsubscribe");
            request_id
        }
        ClientFrame::Status { request_id } => {
            assert_eq!(kind, "status");
            request_id
        }
    };
    match (request_id, &expected_id) {
        (RequestIdField::Missing, ExpectedId::Missing) | (RequestIdField::TooLong, ExpectedId::TooLong) => {}
        (RequestIdField::Id(id), ExpectedId::Text(text)) => assert_eq!(id.as_json(), text, "a string id"),
        (RequestIdField::Id(id), ExpectedId::AsWritten(text)) => assert_eq!(id.as_json(), *text, "a number id"),
        (got, want) => panic!("requestId {:?}: got {got:?}, expected {want:?}", raw_id.map(RawValue::get)),
    }
    if let Some(id) = request_id.id() {
        assert!(id.as_json().len() <= MAX_REQUEST_ID_BYTES, "a kept id fits the limit");
        check_replies(id);
    }
});
