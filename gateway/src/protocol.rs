//! The client wire protocol of DESIGN.md §2: parsing client text frames and
//! building the gateway's replies. Pure functions, no I/O.

use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::room::{InvalidRoom, Room};

/// The raw text `ping` a client sends; answered with [`PONG`].
pub const PING: &str = "ping";
/// The reply to [`PING`].
pub const PONG: &str = "pong";

/// A client's `requestId`, kept as JSON text so it is echoed exactly as
/// given: `"1"` stays a string, `1` a number, and a number keeps its
/// original spelling (`1e2`, `-0`, `18446744073709551616`), as
/// docs/protocol.md promises. Strings are kept re-serialised, so two
/// spellings of one string (`"a"`, `"\u0061"`) are the same id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(Box<str>);

/// What a frame's `requestId` field held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestIdField {
    /// Missing, or neither a string nor a number.
    Missing,
    /// Longer than the limit (`limits.maxRequestIdBytes`); never echoed.
    TooLong,
    /// A usable id.
    Id(RequestId),
}

impl RequestIdField {
    /// The id, if usable.
    pub fn id(&self) -> Option<&RequestId> {
        match self {
            RequestIdField::Id(id) => Some(id),
            _ => None,
        }
    }
}

impl RequestId {
    /// Accepts a JSON string or number; anything else is no request id.
    pub fn from_json(value: &Value) -> Option<RequestId> {
        match value {
            Value::String(_) | Value::Number(_) => Some(RequestId(value.to_string().into_boxed_str())),
            _ => None,
        }
    }

    /// From the raw JSON text of the field: strings re-serialised, numbers
    /// kept as written, anything else no id; `max_bytes` bounds the text.
    pub fn from_raw(raw: &RawValue, max_bytes: usize) -> RequestIdField {
        let text = raw.get();
        if text.len() > max_bytes {
            return RequestIdField::TooLong;
        }
        match text.as_bytes().first() {
            Some(b'"') => match serde_json::from_str::<String>(text) {
                Ok(s) => RequestId::from_json(&Value::String(s)).map_or(RequestIdField::Missing, RequestIdField::Id),
                Err(_) => RequestIdField::Missing,
            },
            Some(b'-' | b'0'..=b'9') => RequestIdField::Id(RequestId(text.into())),
            _ => RequestIdField::Missing,
        }
    }

    /// The id as JSON text.
    pub fn as_json(&self) -> &str {
        &self.0
    }

    /// The per-subscription end of a publish frame: `<requestId>}`. Built once
    /// at subscribe time so a delivery only concatenates shared bytes.
    pub fn publish_suffix(&self) -> Arc<str> {
        let mut s = String::with_capacity(self.0.len() + 1);
        s.push_str(&self.0);
        s.push('}');
        Arc::from(s)
    }
}

/// A client frame the gateway understood.
#[derive(Debug, PartialEq)]
pub enum ClientFrame {
    /// Raw text `ping`.
    Ping,
    /// `{"type":"subscribe","room":{…},"requestId":R}`.
    Subscribe {
        /// The requested room, or why it is not one.
        room: Result<Room, InvalidRoom>,
        /// The `requestId` field.
        request_id: RequestIdField,
    },
    /// `{"type":"unsubscribe","requestId":R}`.
    Unsubscribe {
        /// The `requestId` field.
        request_id: RequestIdField,
    },
    /// `{"type":"status"}`.
    Status {
        /// Echoed when usable.
        request_id: RequestIdField,
    },
}

/// A client frame the gateway refuses; each maps to an error `message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Not JSON, or JSON that is not an object.
    NonJson,
    /// A JSON object whose `type` is missing or unknown.
    TypeNotAllowed,
}

impl FrameError {
    /// The `message` of the error reply.
    pub fn code(self) -> &'static str {
        match self {
            FrameError::NonJson => "non-json-message",
            FrameError::TypeNotAllowed => "message-type-not-allowed",
        }
    }
}

/// The fields of a client frame the gateway reads; others are skipped
/// without being built. A repeated key counts by its last value, as in
/// the JSON parsers of 3.x and browsers.
struct RawFrame<'a> {
    /// `type`, when a string.
    kind: Option<Value>,
    /// `room`.
    room: Option<Value>,
    /// `requestId`, as written.
    request_id: Option<&'a RawValue>,
}

impl<'de> serde::Deserialize<'de> for RawFrame<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(field_identifier)]
        enum Key {
            #[serde(rename = "type")]
            Kind,
            #[serde(rename = "room")]
            Room,
            #[serde(rename = "requestId")]
            RequestId,
            #[serde(other)]
            Other,
        }
        struct FrameVisitor;
        impl<'de> serde::de::Visitor<'de> for FrameVisitor {
            type Value = RawFrame<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<RawFrame<'de>, A::Error> {
                let mut frame = RawFrame { kind: None, room: None, request_id: None };
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Kind => frame.kind = Some(map.next_value()?),
                        Key::Room => frame.room = Some(map.next_value()?),
                        Key::RequestId => frame.request_id = Some(map.next_value()?),
                        Key::Other => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(frame)
            }
        }
        d.deserialize_map(FrameVisitor)
    }
}

/// Parses one client text frame; a `requestId` longer than
/// `max_request_id_bytes` (as JSON text) is [`RequestIdField::TooLong`].
pub fn parse_client_frame(text: &str, max_request_id_bytes: usize) -> Result<ClientFrame, FrameError> {
    if text == PING {
        return Ok(ClientFrame::Ping);
    }
    let Ok(frame) = serde_json::from_str::<RawFrame>(text) else {
        return Err(FrameError::NonJson);
    };
    let request_id = frame.request_id.map_or(RequestIdField::Missing, |r| RequestId::from_raw(r, max_request_id_bytes));
    match frame.kind.as_ref().and_then(Value::as_str) {
        Some("subscribe") => {
            let room = match frame.room {
                Some(Value::Object(map)) => Room::from_map(&map),
                _ => Err(InvalidRoom::NotAnObject),
            };
            Ok(ClientFrame::Subscribe { room, request_id })
        }
        Some("unsubscribe") => Ok(ClientFrame::Unsubscribe { request_id }),
        Some("status") => Ok(ClientFrame::Status { request_id }),
        _ => Err(FrameError::TypeNotAllowed),
    }
}

/// Errors of subscribe/unsubscribe, by their wire `message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// The room is not permitted by any allowed room.
    RoomNotFound,
    /// The room is not an object of scalars.
    InvalidRoom,
    /// This connection already has a subscription with that `requestId`.
    RequestIdInUse,
    /// The per-connection subscription limit is reached.
    TooManySubscriptions,
    /// `requestId` missing.
    NoRequestId,
    /// `requestId` longer than `limits.maxRequestIdBytes`.
    InvalidRequestId,
    /// Unsubscribe for a `requestId` with no subscription.
    NotSubscribed,
}

impl RequestError {
    /// The `message` of the error reply.
    pub fn code(self) -> &'static str {
        match self {
            RequestError::RoomNotFound => "room-not-found",
            RequestError::InvalidRoom => "invalid-room",
            RequestError::RequestIdInUse => "request-id-in-use",
            RequestError::TooManySubscriptions => "too-many-subscriptions",
            RequestError::NoRequestId => "no-request-id",
            RequestError::InvalidRequestId => "invalid-request-id",
            RequestError::NotSubscribed => "not-subscribed",
        }
    }
}

/// `reply` (a JSON object) with `"requestId":R` appended as R's text.
fn with_request_id(reply: Value, request_id: Option<&RequestId>) -> String {
    let mut text = reply.to_string();
    if let Some(r) = request_id
        && text.ends_with('}')
    {
        text.pop();
        text.push_str(r#","requestId":"#);
        text.push_str(r.as_json());
        text.push('}');
    }
    text
}

/// `{"code":"success","requestId":R}`.
pub fn success(request_id: &RequestId) -> String {
    format!(r#"{{"code":"success","requestId":{}}}"#, request_id.as_json())
}

/// Why the gateway ended a subscription the client did not unsubscribe.
pub const PERMISSION_REVOKED: &str = "permission-revoked";

/// `{"type":"unsubscribed","requestId":R,"reason":REASON}`: the gateway
/// dropped subscription R (3.x clients ignore frame types they do not know).
pub fn unsubscribed(request_id: &RequestId, reason: &str) -> String {
    format!(
        r#"{{"type":"unsubscribed","requestId":{},"reason":{}}}"#,
        request_id.as_json(),
        serde_json::Value::from(reason)
    )
}

/// `{"code":"error","message":M[,"requestId":R]}`.
pub fn error(message: &str, request_id: Option<&RequestId>) -> String {
    with_request_id(json!({"code": "error", "message": message}), request_id)
}

/// Counters reported by the `status` frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubStatus {
    /// Authenticated websocket connections open now.
    pub open_connections: u64,
    /// Distinct rooms with at least one subscription.
    pub num_rooms: u64,
    /// Subscriptions held.
    pub num_subscriptions: u64,
    /// Start of this process, RFC 3339.
    pub online_since: String,
    /// Triggers received (all sources).
    pub triggers_received: u64,
    /// Publish frames queued to clients.
    pub messages_delivered: u64,
}

/// The reply to `{"type":"status"}`.
pub fn status(s: &HubStatus, request_id: Option<&RequestId>) -> String {
    let reply = json!({
        "code": "success",
        "type": "status",
        "open_connections": s.open_connections,
        "num_rooms": s.num_rooms,
        "num_subscriptions": s.num_subscriptions,
        "online_since": s.online_since,
        "triggers_received": s.triggers_received,
        "messages_delivered": s.messages_delivered,
    });
    with_request_id(reply, request_id)
}

/// The first frame of an authorised connection.
pub fn authorized(allowed_rooms: &[Room]) -> String {
    json!({
        "is_authorized": true,
        "is_authenticated": true,
        "allowed_rooms": allowed_rooms.iter().map(Room::to_json).collect::<Vec<_>>(),
    })
    .to_string()
}

/// The only frame of a refused connection.
pub const UNAUTHORIZED: &str = r#"{"is_authorized":false,"is_authenticated":false}"#;

/// The shared head of every publish frame of one trigger:
/// `{"type":"publish","data":<data>,"requestId":`. Built once per trigger;
/// each subscription appends its [`RequestId::publish_suffix`].
pub fn publish_prefix(data_json: &str) -> Arc<str> {
    const HEAD: &str = r#"{"type":"publish","data":"#;
    const TAIL: &str = r#","requestId":"#;
    let mut s = String::with_capacity(HEAD.len() + data_json.len() + TAIL.len());
    s.push_str(HEAD);
    s.push_str(data_json);
    s.push_str(TAIL);
    Arc::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rid(v: Value) -> RequestId {
        RequestId::from_json(&v).expect("string or number")
    }

    fn parse_client_frame_(text: &str) -> Result<ClientFrame, FrameError> {
        parse_client_frame(text, 128)
    }

    fn id(v: Value) -> RequestIdField {
        RequestIdField::Id(rid(v))
    }

    /// The `requestId` a frame parses to, echoed in a success reply.
    fn echoed(raw_id: &str) -> String {
        let frame = format!(r#"{{"type":"unsubscribe","requestId":{raw_id}}}"#);
        let Ok(ClientFrame::Unsubscribe { request_id: RequestIdField::Id(r) }) = parse_client_frame(&frame, 128) else {
            panic!("{frame}: an unsubscribe with an id")
        };
        success(&r)
    }

    #[test]
    fn parses_every_frame_type() {
        assert_eq!(parse_client_frame_("ping"), Ok(ClientFrame::Ping));
        assert_eq!(
            parse_client_frame_(r#"{"type":"subscribe","room":{"a":1},"requestId":"x"}"#),
            Ok(ClientFrame::Subscribe { room: Room::from_json(&json!({"a": 1})), request_id: id(json!("x")) })
        );
        assert_eq!(
            parse_client_frame_(r#"{"type":"unsubscribe","requestId":3}"#),
            Ok(ClientFrame::Unsubscribe { request_id: id(json!(3)) })
        );
        assert_eq!(
            parse_client_frame_(r#"{"type":"status"}"#),
            Ok(ClientFrame::Status { request_id: RequestIdField::Missing })
        );
    }

    #[test]
    fn refuses_bad_frames() {
        assert_eq!(parse_client_frame_("pong"), Err(FrameError::NonJson));
        assert_eq!(parse_client_frame_("[1,2]"), Err(FrameError::NonJson));
        assert_eq!(parse_client_frame_(""), Err(FrameError::NonJson));
        assert_eq!(parse_client_frame_("{}"), Err(FrameError::TypeNotAllowed));
        assert_eq!(parse_client_frame_(r#"{"type":"publish"}"#), Err(FrameError::TypeNotAllowed));
        assert_eq!(parse_client_frame_(r#"{"type":5}"#), Err(FrameError::TypeNotAllowed));
    }

    #[test]
    fn subscribe_with_bad_room_or_id() {
        let Ok(ClientFrame::Subscribe { room, request_id }) =
            parse_client_frame_(r#"{"type":"subscribe","room":[1],"requestId":null}"#)
        else {
            panic!("a subscribe frame")
        };
        assert_eq!(room, Err(InvalidRoom::NotAnObject));
        assert_eq!(request_id, RequestIdField::Missing);
        let Ok(ClientFrame::Subscribe { room, .. }) = parse_client_frame_(r#"{"type":"subscribe","requestId":1}"#)
        else {
            panic!("a subscribe frame")
        };
        assert_eq!(room, Err(InvalidRoom::NotAnObject));
    }

    #[test]
    fn request_id_is_echoed_as_given() {
        assert_eq!(success(&rid(json!("7"))), r#"{"code":"success","requestId":"7"}"#);
        assert_eq!(success(&rid(json!(7))), r#"{"code":"success","requestId":7}"#);
        let e: Value = serde_json::from_str(&error("invalid-room", Some(&rid(json!(1.5))))).expect("json");
        assert_eq!(e, json!({"code": "error", "message": "invalid-room", "requestId": 1.5}));
        let e: Value = serde_json::from_str(&error("non-json-message", None)).expect("json");
        assert_eq!(e, json!({"code": "error", "message": "non-json-message"}));
        assert_ne!(rid(json!("1")), rid(json!(1)));
    }

    #[test]
    fn numbers_are_echoed_as_written() {
        for raw in ["18446744073709551616", "1e2", "-0", "1.50", "7"] {
            assert_eq!(echoed(raw), format!(r#"{{"code":"success","requestId":{raw}}}"#));
        }
        let e = error(
            "not-subscribed",
            parse_client_frame(r#"{"type":"unsubscribe","requestId":1E400}"#, 128)
                .ok()
                .and_then(|f| match f {
                    ClientFrame::Unsubscribe { request_id } => request_id.id().cloned(),
                    _ => None,
                })
                .as_ref(),
        );
        assert_eq!(e, r#"{"code":"error","message":"not-subscribed","requestId":1E400}"#);
    }

    #[test]
    fn strings_are_one_id_however_escaped() {
        assert_eq!(echoed(r#""\u0061""#), echoed(r#""a""#));
        assert_eq!(echoed(r#""a""#), r#"{"code":"success","requestId":"a"}"#);
        assert_eq!(echoed(r#""\"q\"""#), r#"{"code":"success","requestId":"\"q\""}"#);
    }

    #[test]
    fn long_request_ids_are_refused_not_kept() {
        let long = format!(r#"{{"type":"subscribe","room":{{"a":1}},"requestId":"{}"}}"#, "x".repeat(200));
        let Ok(ClientFrame::Subscribe { request_id, .. }) = parse_client_frame(&long, 128) else { panic!("subscribe") };
        assert_eq!(request_id, RequestIdField::TooLong);
        let fits = format!(r#"{{"type":"unsubscribe","requestId":"{}"}}"#, "x".repeat(126));
        assert!(matches!(
            parse_client_frame(&fits, 128),
            Ok(ClientFrame::Unsubscribe { request_id: RequestIdField::Id(_) })
        ));
        let over = format!(r#"{{"type":"unsubscribe","requestId":"{}"}}"#, "x".repeat(127));
        assert!(matches!(
            parse_client_frame(&over, 128),
            Ok(ClientFrame::Unsubscribe { request_id: RequestIdField::TooLong })
        ));
    }

    #[test]
    fn other_fields_are_skipped_and_the_last_repeat_counts() {
        let f = parse_client_frame_(r#"{"type":"status","type":"unsubscribe","x":[1,{"y":2}],"requestId":true}"#);
        assert_eq!(f, Ok(ClientFrame::Unsubscribe { request_id: RequestIdField::Missing }));
        assert_eq!(
            parse_client_frame_(r#"{"type":"unsubscribe","requestId":[1]}"#),
            Ok(ClientFrame::Unsubscribe { request_id: RequestIdField::Missing })
        );
        assert_eq!(parse_client_frame_(r#"{"type":"unsubscribe"} x"#), Err(FrameError::NonJson));
    }

    #[test]
    fn publish_frame_is_prefix_plus_suffix() {
        let prefix = publish_prefix(r#"{"x":[1,2]}"#);
        let suffix = rid(json!("r1")).publish_suffix();
        let frame = [&*prefix, &*suffix].concat();
        let v: Value = serde_json::from_str(&frame).expect("json");
        assert_eq!(v, json!({"type": "publish", "data": {"x": [1, 2]}, "requestId": "r1"}));
    }

    #[test]
    fn auth_frames() {
        let v: Value =
            serde_json::from_str(&authorized(&[Room::from_json(&json!({"u": "*"})).expect("room")])).expect("json");
        assert_eq!(v, json!({"is_authorized": true, "is_authenticated": true, "allowed_rooms": [{"u": "*"}]}));
        let v: Value = serde_json::from_str(UNAUTHORIZED).expect("json");
        assert_eq!(v, json!({"is_authorized": false, "is_authenticated": false}));
    }
}
