//! Who a connection belongs to: the user identity read from the bootstrap
//! answer at `permissions.userPath` (e.g. `user.id`, or 3.x's
//! `user.data.id`), so that control messages can name a user.
//!
//! An identity is a JSON string or number, compared by its JSON form, as
//! room values are: `5` and `"5"` are different users.

use std::collections::HashMap;
use std::fmt;

use serde_json::Value;
use serde_json::value::RawValue;

use crate::room::MAX_ROOM_TEXT;

/// A user identity: the JSON text of a string or a number.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UserId(Box<str>);

impl UserId {
    /// The identity in a JSON value, if it is a string or a number of at
    /// most [`MAX_ROOM_TEXT`] bytes (`null`, booleans and structures are
    /// not identities).
    pub fn from_json(value: &Value) -> Option<UserId> {
        let text = match value {
            Value::String(s) if s.len() <= MAX_ROOM_TEXT => serde_json::to_string(s).ok()?,
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        Some(UserId(text.into_boxed_str()))
    }

    /// The identity as JSON text (`5`, `"alice"`).
    pub fn as_json(&self) -> &str {
        &self.0
    }

    /// Bytes it holds, for per-connection budgets.
    pub fn approx_bytes(&self) -> usize {
        self.0.len() + std::mem::size_of::<UserId>()
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the identity is in a bootstrap answer: object keys, outermost
/// first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPath(Vec<String>);

/// Why a `permissions.userPath` is not a path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a user path is object keys joined by '.', e.g. `user.id` or `user.data.id`")]
pub struct InvalidUserPath;

impl UserPath {
    /// Parses `user.data.id`.
    pub fn parse(path: &str) -> Result<UserPath, InvalidUserPath> {
        let keys: Vec<String> = path.split('.').map(str::to_string).collect();
        if keys.iter().any(String::is_empty) || keys.len() > 16 {
            return Err(InvalidUserPath);
        }
        Ok(UserPath(keys))
    }

    /// The identity at this path in `answer` (a JSON object's text), if
    /// there is one. Each level is read as keys over unparsed values, so
    /// the rest of the answer (its allowed rooms) is never built.
    pub fn find(&self, answer: &str) -> Option<UserId> {
        let mut at: &str = answer;
        for key in &self.0 {
            let object: HashMap<String, &RawValue> = serde_json::from_str(at).ok()?;
            at = object.get(key)?.get();
        }
        UserId::from_json(&serde_json::from_str(at).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(path: &str, answer: &str) -> Option<String> {
        UserPath::parse(path).expect("path").find(answer).map(|u| u.as_json().to_string())
    }

    #[test]
    fn reads_the_identity_at_the_path() {
        let answer = r#"{"allowed_rooms":[{"u":1}],"user":{"id":5,"data":{"id":"abc"}}}"#;
        assert_eq!(find("user.id", answer).as_deref(), Some("5"));
        assert_eq!(find("user.data.id", answer).as_deref(), Some(r#""abc""#));
        assert_eq!(find("user.missing", answer), None);
        assert_eq!(find("allowed_rooms", answer), None, "a list is not an identity");
        assert_eq!(find("user", answer), None, "an object is not an identity");
        assert_eq!(find("user.id.x", answer), None, "a number has no keys");
        assert_eq!(find("user.id", r#"{"user":{"id":null}}"#), None);
        assert_eq!(find("user.id", r#"{"user":{"id":true}}"#), None);
        assert_eq!(find("user.id", "not json"), None);
    }

    #[test]
    fn identities_compare_by_json_form() {
        let id = |v: Value| UserId::from_json(&v).expect("identity");
        assert_eq!(id(serde_json::json!(5)), id(serde_json::json!(5)));
        assert_ne!(id(serde_json::json!(5)), id(serde_json::json!("5")));
        // Escapes are normalised: the same string written two ways is one user.
        let a: Value = serde_json::from_str(r#""\u0061""#).expect("json");
        assert_eq!(id(a), id(serde_json::json!("a")));
        assert_eq!(UserId::from_json(&Value::String("x".repeat(MAX_ROOM_TEXT + 1))), None);
    }

    #[test]
    fn paths() {
        assert!(UserPath::parse("user.data.id").is_ok());
        assert!(UserPath::parse("id").is_ok());
        assert_eq!(UserPath::parse(""), Err(InvalidUserPath));
        assert_eq!(UserPath::parse("user..id"), Err(InvalidUserPath));
        assert_eq!(UserPath::parse(".id"), Err(InvalidUserPath));
    }
}
