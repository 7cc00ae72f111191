//! Triggers: `{"rooms":[room,…],"data":<any JSON>}`, as published by 3.x
//! Django publishers over AMQP or sent to `POST /trigger` (DESIGN.md §3).
//!
//! `data` is kept as the raw JSON text it arrived as, so it is serialised
//! into publish frames exactly once and never re-encoded.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::room::{InvalidRoom, Room};

/// A parsed trigger.
#[derive(Debug)]
pub struct Trigger {
    /// Rooms to deliver to; a subscription matching several gets one copy.
    pub rooms: Vec<Room>,
    /// The payload, as JSON text (`null` when the body had none).
    pub data: Box<RawValue>,
}

/// Why a body is not a trigger. Messages never quote the body, so they are
/// safe to log (DESIGN.md: AMQP bodies are logged without contents).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTrigger {
    /// Not JSON, or not a JSON object.
    #[error("body is not a JSON object ({0})")]
    NotJson(String),
    /// `rooms` missing or not a list.
    #[error("`rooms` must be a list of rooms")]
    NoRooms,
    /// One room is not an object of scalars.
    #[error("rooms[{index}]: {reason}")]
    BadRoom {
        /// Position of the room in `rooms`.
        index: usize,
        /// What is wrong with it.
        reason: InvalidRoom,
    },
}

impl InvalidTrigger {
    /// A short label for metrics (`triggers_rejected_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            InvalidTrigger::NotJson(_) => "not_json",
            InvalidTrigger::NoRooms => "no_rooms",
            InvalidTrigger::BadRoom { .. } => "invalid_room",
        }
    }
}

#[derive(Deserialize)]
struct Body<'a> {
    rooms: Option<Value>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

impl Trigger {
    /// Parses a trigger body.
    pub fn parse(body: &[u8]) -> Result<Trigger, InvalidTrigger> {
        // serde would also read a struct from a JSON array; a trigger is an object.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(InvalidTrigger::NotJson("expected a JSON object".into()));
        }
        let parsed: Body<'_> = serde_json::from_slice(body).map_err(|e| {
            // Only the category and position: serde's message may quote the body.
            InvalidTrigger::NotJson(format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column()))
        })?;
        let Some(Value::Array(rooms)) = parsed.rooms else {
            return Err(InvalidTrigger::NoRooms);
        };
        let rooms = rooms
            .iter()
            .enumerate()
            .map(|(index, r)| Room::from_json(r).map_err(|reason| InvalidTrigger::BadRoom { index, reason }))
            .collect::<Result<Vec<_>, _>>()?;
        let data = match parsed.data {
            Some(raw) => raw.to_owned(),
            None => RawValue::from_string("null".into()).map_err(|e| InvalidTrigger::NotJson(e.to_string()))?,
        };
        Ok(Trigger { rooms, data })
    }

    /// The trigger as a JSON body, for publishing to the broker.
    pub fn to_body(&self) -> Vec<u8> {
        let rooms: Vec<Value> = self.rooms.iter().map(Room::to_json).collect();
        json!({"rooms": rooms, "data": &self.data}).to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_3x_body() {
        let t =
            Trigger::parse(br#"{"rooms":[{"target":"message","user":5}],"data":{"id":1, "x": [1,2]}}"#).expect("valid");
        assert_eq!(t.rooms, vec![Room::from_json(&json!({"user": 5, "target": "message"})).expect("room")]);
        assert_eq!(t.data.get(), r#"{"id":1, "x": [1,2]}"#, "data is kept verbatim");
    }

    #[test]
    fn missing_data_is_null() {
        let t = Trigger::parse(br#"{"rooms":[]}"#).expect("valid");
        assert_eq!(t.data.get(), "null");
        assert!(t.rooms.is_empty());
    }

    #[test]
    fn rejects_bad_bodies_without_quoting_them() {
        let e = Trigger::parse(b"secret-token-xyz").expect_err("not json");
        assert!(matches!(e, InvalidTrigger::NotJson(_)));
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = Trigger::parse(br#"{"rooms":"secret"}"#).expect_err("rooms not a list");
        assert_eq!(e, InvalidTrigger::NoRooms);
        let e = Trigger::parse(br#"[1]"#).expect_err("not an object");
        assert_eq!(e.reason(), "not_json");
        let e = Trigger::parse(br#"{"data":1}"#).expect_err("no rooms");
        assert_eq!(e, InvalidTrigger::NoRooms);
        let e = Trigger::parse(br#"{"rooms":[{"a":1},{"a":{"secret":1}}]}"#).expect_err("bad room");
        assert_eq!(
            e.to_string(),
            r#"rooms[1]: room key "a" has a value that is not a string, number, boolean or null"#
        );
    }

    #[test]
    fn body_round_trips() {
        let t = Trigger::parse(br#"{"rooms":[{"a":"*"}],"data":[1,"two"]}"#).expect("valid");
        let again = Trigger::parse(&t.to_body()).expect("valid");
        assert_eq!(again.rooms, t.rooms);
        assert_eq!(again.data.get(), t.data.get());
    }
}
