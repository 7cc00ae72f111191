//! Control messages: what the API publishes, on the trigger channels, to
//! act on live connections rather than to deliver data (DESIGN.md §8,
//! docs/protocol.md "Control messages").
//!
//! ```json
//! {"control": "refresh",    "users": [5], "subscribed": [{"team": 7}]}
//! {"control": "disconnect", "users": [5], "code": 4001}
//! ```
//!
//! `users` names connections by identity (`permissions.userPath`);
//! `subscribed` names the connections a trigger to those rooms would reach.
//! Either or both; a connection named twice acts once. The key is not
//! `rooms`, so a 3.x gateway sharing the exchange during a migration reads
//! the message as a trigger without rooms and delivers nothing.

use serde_json::Value;
use serde_json::value::RawValue;

use crate::identity::UserId;
use crate::room::{InvalidRoomList, Room, parse_room_list};

/// Close code of `disconnect` when the message gives none: the API closed
/// the connection; the client may reconnect (and bootstrap decides).
pub const CLOSE_DISCONNECTED: u16 = 4001;

/// What to do to the connections named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Re-run bootstrap with the connection's original request; drop the
    /// subscriptions no longer permitted (4401 when the user is refused).
    Refresh,
    /// Close with this code (4000–4999).
    Disconnect(u16),
}

impl Action {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Action::Refresh => "refresh",
            Action::Disconnect(_) => "disconnect",
        }
    }
}

/// A parsed control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    /// What to do.
    pub action: Action,
    /// Connections of these users.
    pub users: Vec<UserId>,
    /// Connections with a subscription a trigger to one of these rooms reaches.
    pub subscribed: Vec<Room>,
}

/// Why a control message is refused. Never quotes the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidControl {
    /// `control` is not `refresh` or `disconnect`.
    #[error("`control` must be \"refresh\" or \"disconnect\"")]
    UnknownAction,
    /// Neither `users` nor `subscribed` names a connection.
    #[error("a control message names connections with `users` and/or `subscribed`")]
    NoSelector,
    /// `rooms` given: a 3.x gateway on the same exchange would deliver it.
    #[error("a control message has no `rooms` (use `subscribed`)")]
    HasRooms,
    /// `users` is not a list of strings and numbers.
    #[error("`users` must be a list of strings and numbers")]
    BadUsers,
    /// `subscribed` is not a list of rooms.
    #[error("`subscribed` must be a list of rooms")]
    BadSubscribed,
    /// More users or rooms than `trigger.maxRooms`.
    #[error("a control message names at most {0} users and {0} rooms")]
    TooMany(usize),
    /// `code` is not in 4000–4999.
    #[error("`code` must be a number from 4000 to 4999")]
    BadCode,
    /// `code` on a refresh.
    #[error("only `disconnect` takes a `code`")]
    CodeOnRefresh,
}

/// The raw fields of a body that has `control`.
pub struct ControlFields<'a> {
    /// `control`.
    pub action: &'a str,
    /// `users`, unparsed.
    pub users: Option<&'a RawValue>,
    /// `subscribed`, unparsed.
    pub subscribed: Option<&'a RawValue>,
    /// `code`, unparsed.
    pub code: Option<&'a RawValue>,
    /// Whether the body had `rooms`.
    pub has_rooms: bool,
}

impl Control {
    /// Reads a control message's fields, at most `max` users and `max` rooms.
    pub fn from_fields(fields: ControlFields<'_>, max: usize) -> Result<Control, InvalidControl> {
        if fields.has_rooms {
            return Err(InvalidControl::HasRooms);
        }
        let code = match fields.code.map(RawValue::get) {
            None | Some("null") => None,
            Some(text) => match text.trim().parse::<u16>() {
                Ok(code @ 4000..=4999) => Some(code),
                _ => return Err(InvalidControl::BadCode),
            },
        };
        let action = match (fields.action, code) {
            ("refresh", None) => Action::Refresh,
            ("refresh", Some(_)) => return Err(InvalidControl::CodeOnRefresh),
            ("disconnect", code) => Action::Disconnect(code.unwrap_or(CLOSE_DISCONNECTED)),
            _ => return Err(InvalidControl::UnknownAction),
        };
        let users = match fields.users {
            None => Vec::new(),
            Some(raw) => {
                // What this builds is bounded by the body limit.
                let values: Vec<Value> = serde_json::from_str(raw.get()).map_err(|_| InvalidControl::BadUsers)?;
                if values.len() > max {
                    return Err(InvalidControl::TooMany(max));
                }
                values.iter().map(UserId::from_json).collect::<Option<Vec<_>>>().ok_or(InvalidControl::BadUsers)?
            }
        };
        let subscribed = match fields.subscribed {
            None => Vec::new(),
            Some(raw) => parse_room_list(raw.get(), max).map_err(|e| match e {
                InvalidRoomList::TooMany(max) => InvalidControl::TooMany(max),
                InvalidRoomList::NotAList | InvalidRoomList::BadRoom { .. } => InvalidControl::BadSubscribed,
            })?,
        };
        if users.is_empty() && subscribed.is_empty() {
            return Err(InvalidControl::NoSelector);
        }
        Ok(Control { action, users, subscribed })
    }

    /// The message as a JSON body, for publishing to the broker.
    pub fn to_body(&self) -> Vec<u8> {
        let mut body = serde_json::Map::new();
        body.insert("control".into(), Value::from(self.action.label()));
        if let Action::Disconnect(code) = self.action {
            body.insert("code".into(), Value::from(code));
        }
        if !self.users.is_empty() {
            // Each id is the JSON text of a string or number: it parses.
            let users: Vec<Value> = self.users.iter().filter_map(|u| serde_json::from_str(u.as_json()).ok()).collect();
            body.insert("users".into(), Value::Array(users));
        }
        if !self.subscribed.is_empty() {
            body.insert("subscribed".into(), Value::Array(self.subscribed.iter().map(Room::to_json).collect()));
        }
        // Writing a `Value` into a `Vec` cannot fail.
        serde_json::to_vec(&Value::Object(body)).unwrap_or_default()
    }
}
