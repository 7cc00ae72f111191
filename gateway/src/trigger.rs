//! Triggers: `{"rooms":[room,…],"data":<any JSON>}`, as published by 3.x
//! Django publishers over AMQP or sent to `POST /trigger` (DESIGN.md §3).
//!
//! `data` is kept as the raw JSON text it arrived as, so it is serialised
//! into publish frames exactly once and never re-encoded.

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::control::{Control, ControlFields, InvalidControl};
use crate::room::{InvalidRoom, InvalidRoomList, Room, parse_room_list};

/// What a publisher sends on the trigger channels: a trigger, or (with a
/// `control` key) a control message.
#[derive(Debug)]
pub enum Published {
    /// Data for the subscriptions of some rooms.
    Trigger(Trigger),
    /// An action on live connections.
    Control(Control),
}

/// A parsed trigger.
#[derive(Debug)]
pub struct Trigger {
    /// Rooms to deliver to; a subscription matching several gets one copy.
    pub rooms: Vec<Room>,
    /// The payload, as JSON text (`null` when the body had none).
    pub data: Box<RawValue>,
}

/// Bounds on one trigger body, the same for `POST /trigger` and AMQP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TriggerLimits {
    /// Largest body, bytes (`trigger.maxBodyBytes`).
    pub max_body_bytes: usize,
    /// Most rooms (`trigger.maxRooms`).
    pub max_rooms: usize,
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
    /// Larger than `trigger.maxBodyBytes`.
    #[error("a trigger body is at most {0} bytes")]
    TooLarge(usize),
    /// More rooms than `trigger.maxRooms`.
    #[error("a trigger has at most {0} rooms")]
    TooManyRooms(usize),
    /// One room is not an object of scalars.
    #[error("rooms[{index}]: {reason}")]
    BadRoom {
        /// Position of the room in `rooms`.
        index: usize,
        /// What is wrong with it.
        reason: InvalidRoom,
    },
    /// A body with `control` that is not a control message.
    #[error("control message: {0}")]
    BadControl(InvalidControl),
}

impl InvalidTrigger {
    /// A short label for metrics (`triggers_rejected_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            InvalidTrigger::NotJson(_) => "not_json",
            InvalidTrigger::NoRooms => "no_rooms",
            InvalidTrigger::TooManyRooms(_) => "too_many_rooms",
            InvalidTrigger::TooLarge(_) => "too_large",
            InvalidTrigger::BadRoom { .. } => "invalid_room",
            InvalidTrigger::BadControl(_) => "invalid_control",
        }
    }
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    rooms: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    control: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    users: Option<&'a RawValue>,
    #[serde(borrow)]
    subscribed: Option<&'a RawValue>,
    #[serde(borrow)]
    code: Option<&'a RawValue>,
}

impl<'a> Body<'a> {
    /// Reads a body: a JSON object (serde would also read a struct from a
    /// JSON array).
    fn read(body: &'a [u8]) -> Result<Body<'a>, InvalidTrigger> {
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(InvalidTrigger::NotJson("expected a JSON object".into()));
        }
        serde_json::from_slice(body).map_err(|e| {
            // Only the category and position: serde's message may quote the body.
            InvalidTrigger::NotJson(format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column()))
        })
    }
}

impl Published {
    /// Parses a body from a publisher (AMQP or `POST /trigger`) within `limits`.
    pub fn parse_within(body: &[u8], limits: TriggerLimits) -> Result<Published, InvalidTrigger> {
        if body.len() > limits.max_body_bytes {
            return Err(InvalidTrigger::TooLarge(limits.max_body_bytes));
        }
        let parsed = Body::read(body)?;
        match &parsed.control {
            None => Trigger::from_body(parsed, limits.max_rooms).map(Published::Trigger),
            Some(action) => {
                let fields = ControlFields {
                    action,
                    users: parsed.users,
                    subscribed: parsed.subscribed,
                    code: parsed.code,
                    has_rooms: parsed.rooms.is_some(),
                };
                Control::from_fields(fields, limits.max_rooms)
                    .map(Published::Control)
                    .map_err(InvalidTrigger::BadControl)
            }
        }
    }

    /// The message as a JSON body, for publishing to the broker.
    pub fn to_body(&self) -> Vec<u8> {
        match self {
            Published::Trigger(trigger) => trigger.to_body(),
            Published::Control(control) => control.to_body(),
        }
    }

    /// Metric label of the kind of message.
    pub fn kind(&self) -> &'static str {
        match self {
            Published::Trigger(_) => "trigger",
            Published::Control(control) => control.action.label(),
        }
    }
}

impl Trigger {
    /// Parses a trigger body within `limits`.
    pub fn parse_within(body: &[u8], limits: TriggerLimits) -> Result<Trigger, InvalidTrigger> {
        if body.len() > limits.max_body_bytes {
            return Err(InvalidTrigger::TooLarge(limits.max_body_bytes));
        }
        Trigger::parse(body, limits.max_rooms)
    }

    /// Parses a trigger body of at most `max_rooms` rooms.
    pub fn parse(body: &[u8], max_rooms: usize) -> Result<Trigger, InvalidTrigger> {
        Trigger::from_body(Body::read(body)?, max_rooms)
    }

    fn from_body(parsed: Body<'_>, max_rooms: usize) -> Result<Trigger, InvalidTrigger> {
        let rooms = parse_room_list(parsed.rooms.map_or("", RawValue::get), max_rooms).map_err(|e| match e {
            InvalidRoomList::NotAList => InvalidTrigger::NoRooms,
            InvalidRoomList::TooMany(max) => InvalidTrigger::TooManyRooms(max),
            InvalidRoomList::BadRoom { index, reason } => InvalidTrigger::BadRoom { index, reason },
        })?;
        let data = match parsed.data {
            Some(raw) => raw.to_owned(),
            None => RawValue::from_string("null".into()).map_err(|e| InvalidTrigger::NotJson(e.to_string()))?,
        };
        Ok(Trigger { rooms, data })
    }

    /// The trigger as a JSON body, for publishing to the broker.
    pub fn to_body(&self) -> Vec<u8> {
        let rooms: Vec<Value> = self.rooms.iter().map(Room::to_json).collect();
        // `data` is copied as written: turning it into a `Value` (as `json!`
        // does) would parse it again, and panic past serde_json's nesting
        // limit (found by fuzzing: `data` nested 128 deep).
        let data = self.data.get();
        let mut body = Vec::with_capacity(data.len() + 64);
        body.extend_from_slice(br#"{"rooms":"#);
        // Writing a `Value` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut body, &rooms);
        body.extend_from_slice(br#","data":"#);
        body.extend_from_slice(data.as_bytes());
        body.push(b'}');
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    impl Trigger {
        fn parse_(body: &[u8]) -> Result<Trigger, InvalidTrigger> {
            Trigger::parse(body, 1000)
        }
    }

    /// Found by fuzzing (fuzz/seeds/trigger/deep-data.json): `to_body`
    /// panicked on `data` nested deeper than serde_json re-parses.
    #[test]
    fn deeply_nested_data_is_republished_as_written() {
        let data = format!("{}{}", "[".repeat(130), "]".repeat(130));
        let body = format!(r#"{{"rooms":[{{"a":1}}],"data":{data}}}"#);
        let trigger = Trigger::parse_(body.as_bytes()).expect("parses");
        let republished = trigger.to_body();
        let again = Trigger::parse_(&republished).expect("parses again");
        assert_eq!(again.data.get(), data);
        assert_eq!(again.rooms, trigger.rooms);
        // The same for a number no f64 holds (fuzz/seeds/trigger/huge-number.json).
        let trigger = Trigger::parse_(br#"{"rooms":[{"a":1}],"data":{"x":1e400}}"#).expect("parses");
        assert_eq!(Trigger::parse_(&trigger.to_body()).expect("parses again").data.get(), r#"{"x":1e400}"#);
    }

    #[test]
    fn rooms_past_the_limit_are_refused_before_they_are_read() {
        let body = |n: usize| {
            let rooms: Vec<String> = (0..n).map(|i| format!(r#"{{"u":{i}}}"#)).collect();
            format!(r#"{{"rooms":[{}],"data":1}}"#, rooms.join(","))
        };
        assert_eq!(Trigger::parse(body(3).as_bytes(), 3).expect("at the limit").rooms.len(), 3);
        let e = Trigger::parse(body(4).as_bytes(), 3).expect_err("over the limit");
        assert_eq!(e, InvalidTrigger::TooManyRooms(3));
        assert_eq!(e.reason(), "too_many_rooms");
        // The limit is checked as the list is read: an invalid tail past it
        // is never looked at (only JSON syntax, checked once for the body).
        let e = Trigger::parse(br#"{"rooms":[{"u":1},{"u":2},{"u":{"x":1}}]}"#, 2).expect_err("over");
        assert_eq!(e, InvalidTrigger::TooManyRooms(2));
    }

    #[test]
    fn parses_3x_body() {
        let t = Trigger::parse_(br#"{"rooms":[{"target":"message","user":5}],"data":{"id":1, "x": [1,2]}}"#)
            .expect("valid");
        assert_eq!(t.rooms, vec![Room::from_json(&json!({"user": 5, "target": "message"})).expect("room")]);
        assert_eq!(t.data.get(), r#"{"id":1, "x": [1,2]}"#, "data is kept verbatim");
    }

    #[test]
    fn missing_data_is_null() {
        let t = Trigger::parse_(br#"{"rooms":[]}"#).expect("valid");
        assert_eq!(t.data.get(), "null");
        assert!(t.rooms.is_empty());
    }

    #[test]
    fn rejects_bad_bodies_without_quoting_them() {
        let e = Trigger::parse_(b"secret-token-xyz").expect_err("not json");
        assert!(matches!(e, InvalidTrigger::NotJson(_)));
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = Trigger::parse_(br#"{"rooms":"secret"}"#).expect_err("rooms not a list");
        assert_eq!(e, InvalidTrigger::NoRooms);
        let e = Trigger::parse_(br#"[1]"#).expect_err("not an object");
        assert_eq!(e.reason(), "not_json");
        let e = Trigger::parse_(br#"{"data":1}"#).expect_err("no rooms");
        assert_eq!(e, InvalidTrigger::NoRooms);
        let e = Trigger::parse_(br#"{"rooms":[{"a":1},{"a":{"secret":1}}]}"#).expect_err("bad room");
        assert_eq!(
            e.to_string(),
            r#"rooms[1]: room key "a" has a value that is not a string, number, boolean or null"#
        );
    }

    fn published(body: &str) -> Result<Published, InvalidTrigger> {
        Published::parse_within(body.as_bytes(), TriggerLimits { max_body_bytes: 4096, max_rooms: 3 })
    }

    #[test]
    fn control_messages_parse_and_round_trip() {
        use crate::control::{Action, InvalidControl};
        let Ok(Published::Control(c)) = published(r#"{"control":"refresh","users":[5,"a"],"subscribed":[{"t":"*"}]}"#)
        else {
            panic!("a control message")
        };
        assert_eq!(c.action, Action::Refresh);
        assert_eq!(c.users.iter().map(|u| u.as_json()).collect::<Vec<_>>(), ["5", r#""a""#]);
        assert_eq!(c.subscribed, vec![Room::from_json(&json!({"t": "*"})).expect("room")]);
        let Ok(Published::Control(again)) = published(std::str::from_utf8(&c.to_body()).expect("utf-8")) else {
            panic!("round trip")
        };
        assert_eq!(again, c);
        let Ok(Published::Control(d)) = published(r#"{"control":"disconnect","users":[1]}"#) else {
            panic!("disconnect")
        };
        assert_eq!(d.action, Action::Disconnect(crate::control::CLOSE_DISCONNECTED));
        let Ok(Published::Control(d)) = published(r#"{"control":"disconnect","users":[1],"code":4999}"#) else {
            panic!("disconnect")
        };
        assert_eq!(Published::Control(d.clone()).kind(), "disconnect");
        assert_eq!(published(std::str::from_utf8(&d.to_body()).expect("utf-8")).map(|p| p.kind()), Ok("disconnect"));
        let refused = |body: &str| match published(body) {
            Err(InvalidTrigger::BadControl(e)) => e,
            other => panic!("{body}: {other:?}"),
        };
        assert_eq!(refused(r#"{"control":"refresh","users":[1,2,3,4]}"#), InvalidControl::TooMany(3));
        assert_eq!(
            refused(r#"{"control":"refresh","subscribed":[{"a":1},{"a":2},{"a":3},{"a":4}]}"#),
            InvalidControl::TooMany(3)
        );
        assert_eq!(refused(r#"{"control":"refresh","users":[]}"#), InvalidControl::NoSelector);
        assert_eq!(refused(r#"{"control":"refresh","users":[null]}"#), InvalidControl::BadUsers);
        assert_eq!(refused(r#"{"control":"refresh","users":"x"}"#), InvalidControl::BadUsers);
        assert_eq!(refused(r#"{"control":"disconnect","users":[1],"code":3999}"#), InvalidControl::BadCode);
        assert_eq!(refused(r#"{"control":"disconnect","users":[1],"code":"4001"}"#), InvalidControl::BadCode);
        assert!(matches!(published(r#"{"control":1}"#), Err(InvalidTrigger::NotJson(_))));
        assert_eq!(published(r#"{"control":"refresh","users":[1]}"#).map(|p| p.kind()), Ok("refresh"));
        // Found by fuzzing (fuzz/seeds/trigger/control_huge_user_id.json): an
        // id past u64 is a float, and must come back as the same id when
        // republished (serde_json's float_roundtrip).
        let body = r#"{"control":"refresh","users":[22222122222222222220]}"#;
        let Ok(Published::Control(c)) = published(body) else { panic!("control") };
        let Ok(Published::Control(again)) = published(std::str::from_utf8(&c.to_body()).expect("utf-8")) else {
            panic!("round trip")
        };
        assert_eq!(again.users, c.users);
        // Without `control` it is a trigger, as before.
        assert!(matches!(published(r#"{"rooms":[],"data":1}"#), Ok(Published::Trigger(_))));
        assert_eq!(published(&"x".repeat(5000)).map(|p| p.kind()), Err(InvalidTrigger::TooLarge(4096)));
    }

    #[test]
    fn body_round_trips() {
        let t = Trigger::parse_(br#"{"rooms":[{"a":"*"}],"data":[1,"two"]}"#).expect("valid");
        let again = Trigger::parse_(&t.to_body()).expect("valid");
        assert_eq!(again.rooms, t.rooms);
        assert_eq!(again.data.get(), t.data.get());
    }
}
