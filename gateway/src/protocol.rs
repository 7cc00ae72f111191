//! The client wire protocol of DESIGN.md §2: parsing client text frames and
//! building the gateway's replies. Pure functions, no I/O.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::room::{InvalidRoom, Room};

/// The raw text `ping` a client sends; answered with [`PONG`].
pub const PING: &str = "ping";
/// The reply to [`PING`].
pub const PONG: &str = "pong";

/// A client's `requestId`, kept as its JSON text so it is echoed exactly as
/// given (`"1"` stays a string, `1` a number).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(Box<str>);

impl RequestId {
    /// Accepts a JSON string or number; anything else is no request id.
    pub fn from_json(value: &Value) -> Option<RequestId> {
        match value {
            Value::String(_) | Value::Number(_) => Some(RequestId(value.to_string().into_boxed_str())),
            _ => None,
        }
    }

    /// The id as JSON text.
    pub fn as_json(&self) -> &str {
        &self.0
    }

    fn to_value(&self) -> Value {
        // Built from a serialised string or number, so it parses back.
        serde_json::from_str(&self.0).unwrap_or(Value::Null)
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
        /// `None` when missing or not a string/number.
        request_id: Option<RequestId>,
    },
    /// `{"type":"unsubscribe","requestId":R}`.
    Unsubscribe {
        /// `None` when missing or not a string/number.
        request_id: Option<RequestId>,
    },
    /// `{"type":"status"}`.
    Status {
        /// Echoed when present.
        request_id: Option<RequestId>,
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

/// Parses one client text frame.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    if text == PING {
        return Ok(ClientFrame::Ping);
    }
    let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(text) else {
        return Err(FrameError::NonJson);
    };
    let request_id = obj.get("requestId").and_then(RequestId::from_json);
    match obj.get("type").and_then(Value::as_str) {
        Some("subscribe") => {
            let room = match obj.remove("room") {
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
            RequestError::NotSubscribed => "not-subscribed",
        }
    }
}

fn with_request_id(mut reply: Value, request_id: Option<&RequestId>) -> String {
    if let (Some(r), Value::Object(obj)) = (request_id, &mut reply) {
        obj.insert("requestId".into(), r.to_value());
    }
    reply.to_string()
}

/// `{"code":"success","requestId":R}`.
pub fn success(request_id: &RequestId) -> String {
    format!(r#"{{"code":"success","requestId":{}}}"#, request_id.as_json())
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

    #[test]
    fn parses_every_frame_type() {
        assert_eq!(parse_client_frame("ping"), Ok(ClientFrame::Ping));
        assert_eq!(
            parse_client_frame(r#"{"type":"subscribe","room":{"a":1},"requestId":"x"}"#),
            Ok(ClientFrame::Subscribe { room: Room::from_json(&json!({"a": 1})), request_id: Some(rid(json!("x"))) })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"unsubscribe","requestId":3}"#),
            Ok(ClientFrame::Unsubscribe { request_id: Some(rid(json!(3))) })
        );
        assert_eq!(parse_client_frame(r#"{"type":"status"}"#), Ok(ClientFrame::Status { request_id: None }));
    }

    #[test]
    fn refuses_bad_frames() {
        assert_eq!(parse_client_frame("pong"), Err(FrameError::NonJson));
        assert_eq!(parse_client_frame("[1,2]"), Err(FrameError::NonJson));
        assert_eq!(parse_client_frame(""), Err(FrameError::NonJson));
        assert_eq!(parse_client_frame("{}"), Err(FrameError::TypeNotAllowed));
        assert_eq!(parse_client_frame(r#"{"type":"publish"}"#), Err(FrameError::TypeNotAllowed));
        assert_eq!(parse_client_frame(r#"{"type":5}"#), Err(FrameError::TypeNotAllowed));
    }

    #[test]
    fn subscribe_with_bad_room_or_id() {
        let Ok(ClientFrame::Subscribe { room, request_id }) =
            parse_client_frame(r#"{"type":"subscribe","room":[1],"requestId":null}"#)
        else {
            panic!("a subscribe frame")
        };
        assert_eq!(room, Err(InvalidRoom::NotAnObject));
        assert_eq!(request_id, None);
        let Ok(ClientFrame::Subscribe { room, .. }) = parse_client_frame(r#"{"type":"subscribe","requestId":1}"#)
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
