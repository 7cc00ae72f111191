//! Centrifugo's client protocol (JSON over websocket) and server HTTP API,
//! for the side-by-side comparison (issue #13 item 4): the same rooms,
//! triggers and checks as for a 3.x gateway, spoken to Centrifugo v6.
//!
//! What this peer maps, and why:
//! * a room becomes a channel without namespace, `key=value` pairs sorted
//!   by key and joined with `,` (`{"customer":1,"warehouse":2}` →
//!   `customer=1,warehouse=2`): Centrifugo gives `:` (namespace), `#`
//!   (user-limited channel) and a leading `$` (private channel) meanings,
//!   so the room's JSON cannot be the name. Centrifugo has no wildcard
//!   rooms: a `"*"` value is refused here rather than silently published;
//! * a connection sends `{"id":1,"connect":{}}` and waits for the reply
//!   (the 3.x authorisation frame's place); subscription `i` is
//!   `{"id":i+2,"subscribe":{"channel":…}}`, its reply carries that id;
//! * a publication arrives as `{"push":{"channel":…,"pub":{"data":…}}}`:
//!   the channel, not a request id, names the subscription (one per
//!   channel and connection: Centrifugo refuses a second one);
//! * the server's application-level ping is the empty reply `{}`; the
//!   client must answer `{}` (and only then: an unasked pong disconnects);
//! * several replies may share one websocket frame, one per line
//!   (`protocol.JSONDataEncoder` in github.com/centrifugal/protocol joins
//!   them with `\n`);
//! * a trigger is `POST <api>/publish` `{"channel":…,"data":…}` (one room)
//!   or `POST <api>/broadcast` `{"channels":[…],"data":…}` (several), with
//!   `X-API-Key`; `data` is the bench's data object, byte for byte, which
//!   Centrifugo passes through unchanged (kept as raw JSON from the API
//!   request to the push).

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

/// The connect command; its reply's id is [`CONNECT_ID`].
pub const CONNECT_FRAME: &str = r#"{"id":1,"connect":{}}"#;
/// Id of the connect command.
pub const CONNECT_ID: u32 = 1;
/// Subscription `i` is command `i + FIRST_SUBSCRIBE_ID` (after the connect).
const FIRST_SUBSCRIBE_ID: u32 = 2;
/// The answer to the server's ping (an empty command: id 0, no request).
pub const PONG: &str = "{}";

/// The channel of `room` (a JSON object of strings and numbers).
pub fn channel(room: &Value) -> Result<String, String> {
    let Value::Object(pairs) = room else {
        return Err(format!("centrifugo: room {room} is not an object"));
    };
    let mut parts: Vec<(&str, String)> = Vec::with_capacity(pairs.len());
    for (key, value) in pairs {
        let value = match value {
            Value::String(s) if s == "*" => {
                return Err(format!("centrifugo: room {room} has a wildcard; Centrifugo has no wildcard rooms"));
            }
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => return Err(format!("centrifugo: room value {other} is neither a string nor a number")),
        };
        parts.push((key, value));
    }
    parts.sort_unstable();
    let name = parts.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    if name.is_empty() || name.contains([':', '#', '"', '\\']) || name.starts_with('$') {
        return Err(format!("centrifugo: room {room} makes channel {name:?}, which Centrifugo reads differently"));
    }
    Ok(name)
}

/// The subscription whose subscribe command had id `id` (`None`: the
/// connect command).
pub fn subscription_index(id: u32) -> Option<usize> {
    id.checked_sub(FIRST_SUBSCRIBE_ID).map(|i| i as usize)
}

/// The subscribe command of subscription `index` to `channel`.
pub fn subscribe_frame(channel: &str, index: usize) -> String {
    serde_json::json!({"id": index as u64 + u64::from(FIRST_SUBSCRIBE_ID), "subscribe": {"channel": channel}})
        .to_string()
}

/// The request body of a trigger to `channels` carrying `data` (the bench's
/// data object, JSON text): `(path under the API prefix, body)`. The
/// channels are de-duplicated, so that one subscription gets one copy, as
/// a 3.x gateway delivers it.
pub fn api_request(channels: &[String], data: &str) -> (&'static str, Vec<u8>) {
    let mut unique: Vec<&str> = channels.iter().map(String::as_str).collect();
    unique.sort_unstable();
    unique.dedup();
    let (path, head) = match unique.as_slice() {
        [one] => ("/publish", format!(r#"{{"channel":{}"#, Value::from(*one))),
        many => ("/broadcast", format!(r#"{{"channels":{}"#, Value::from(many.to_vec()))),
    };
    let mut body = String::with_capacity(head.len() + data.len() + 16);
    body.push_str(&head);
    body.push_str(r#","data":"#);
    body.push_str(data);
    body.push('}');
    (path, body.into_bytes())
}

/// Whether an HTTP API answer (status 2xx) reports an error: the default
/// error mode answers 200 with `{"error":…}`, and a broadcast reports each
/// channel's error inside `result.responses`.
pub fn api_error(body: &[u8]) -> Option<String> {
    let answer: Value = serde_json::from_slice(body).ok()?;
    let failed = |v: &Value| v.get("error").filter(|e| !e.is_null()).map(Value::to_string);
    if let Some(error) = failed(&answer) {
        return Some(error);
    }
    answer.pointer("/result/responses")?.as_array()?.iter().find_map(failed)
}

/// One reply line from the server, as far as the bench cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `{}`: the server's ping; answer [`PONG`].
    Ping,
    /// The connect reply.
    Connected,
    /// A command failed (`id`: the command's; for the connect command
    /// [`CONNECT_ID`]).
    Failed {
        /// The command's id.
        id: u32,
        /// Centrifugo's error code.
        code: u64,
        /// Its message.
        message: Cow<'a, str>,
    },
    /// Subscription `index` succeeded.
    Subscribed(usize),
    /// A publication in `channel`, with the bench's fields when its data
    /// has them.
    Publication {
        /// The channel it was published to.
        channel: Cow<'a, str>,
        /// Sequence number, send time (µs since the run's epoch) and phase.
        bench: Option<BenchFields>,
    },
    /// The server disconnects the client (code, reason).
    Disconnect(u32, Cow<'a, str>),
    /// Anything else (join/leave, an unsubscribe push, replies to commands
    /// the bench did not send).
    Other(&'static str),
}

/// The bench's fields of a trigger's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct BenchFields {
    /// Sequence number.
    pub seq: u64,
    /// Send time, µs since the run's epoch.
    pub ts: u64,
    /// Phase (step) of the run.
    pub p: usize,
}

/// The lines of one websocket frame's text (one reply each).
pub fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n').filter(|line| !line.is_empty())
}

/// Reads one reply line; `Err` when it is not JSON of Centrifugo's shape.
pub fn parse(line: &str) -> Result<Reply<'_>, String> {
    if line == "{}" {
        return Ok(Reply::Ping);
    }
    if let Some(reply) = fast_publication(line) {
        return Ok(reply);
    }
    let frame: ReplyFrame = serde_json::from_str(line).map_err(|_| "centrifugo: reply that is not JSON".to_string())?;
    if let Some(error) = frame.error {
        return Ok(Reply::Failed { id: frame.id, code: error.code, message: error.message });
    }
    if frame.id == CONNECT_ID && frame.connect.is_some() {
        return Ok(Reply::Connected);
    }
    if frame.subscribe.is_some() && frame.id >= FIRST_SUBSCRIBE_ID {
        return Ok(Reply::Subscribed((frame.id - FIRST_SUBSCRIBE_ID) as usize));
    }
    let Some(push) = frame.push else {
        return Ok(if frame.id == 0 && frame.connect.is_none() && frame.subscribe.is_none() {
            Reply::Ping
        } else {
            Reply::Other("reply to an unknown command")
        });
    };
    if let Some(disconnect) = push.disconnect {
        return Ok(Reply::Disconnect(disconnect.code, disconnect.reason));
    }
    if push.unsubscribe.is_some() {
        return Ok(Reply::Other("unsubscribed by the server"));
    }
    match (push.channel, push.publication) {
        (Some(channel), Some(publication)) => {
            let bench = publication.data.and_then(|d| Some(BenchFields { seq: d.seq?, ts: d.ts?, p: d.p? }));
            Ok(Reply::Publication { channel, bench })
        }
        _ => Ok(Reply::Other("push the bench does not read")),
    }
}

/// A publication exactly as Centrifugo v6 writes the bench's data without
/// history (`{"push":{"channel":"C","pub":{"data":{"seq":S,"ts":T,"p":P…}}}}`),
/// read without a JSON parser, like the 3.x publish frame (serde_json was
/// most of the reading thread's time at 1 M frames/s). Anything else is
/// left to serde_json.
fn fast_publication(line: &str) -> Option<Reply<'_>> {
    /// The leading decimal digits of `s` (at most 19: no overflow) and what follows.
    fn number(s: &str) -> Option<(u64, &str)> {
        let end = s.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(s.len());
        if end == 0 || end > 19 {
            return None;
        }
        Some((s[..end].parse().ok()?, &s[end..]))
    }
    let rest = line.strip_prefix(r#"{"push":{"channel":""#)?;
    let end = rest.find('"')?;
    let channel = &rest[..end];
    // An escaped quote would end the name early: leave it to serde_json.
    if channel.contains('\\') {
        return None;
    }
    let rest = rest[end..].strip_prefix(r#"","pub":{"data":{"seq":"#)?;
    let (seq, rest) = number(rest)?;
    let (ts, rest) = number(rest.strip_prefix(r#","ts":"#)?)?;
    let (p, rest) = number(rest.strip_prefix(r#","p":"#)?)?;
    // The data object goes on (`,"pad":"xx…"`) or ends; the line ends with
    // the data, pub, push and reply objects closing (no offset, no tags).
    if !rest.starts_with([',', '}']) || !rest.ends_with("}}}}") {
        return None;
    }
    Some(Reply::Publication {
        channel: Cow::Borrowed(channel),
        bench: Some(BenchFields { seq, ts, p: usize::try_from(p).ok()? }),
    })
}

/// The fields of a reply the bench reads.
#[derive(Debug, Deserialize)]
struct ReplyFrame<'a> {
    /// The command's id; 0 for pushes and pings.
    #[serde(default)]
    id: u32,
    /// Set when the command failed.
    #[serde(borrow)]
    error: Option<ErrorFrame<'a>>,
    /// An asynchronous push (publication, disconnect…).
    #[serde(borrow)]
    push: Option<PushFrame<'a>>,
    /// The connect reply's result.
    connect: Option<IgnoredAny>,
    /// A subscribe reply's result.
    subscribe: Option<IgnoredAny>,
}

/// A command's error.
#[derive(Debug, Deserialize)]
struct ErrorFrame<'a> {
    /// Centrifugo's error code (100 internal, 102 unknown channel, 103
    /// permission denied, 105 already subscribed…).
    #[serde(default)]
    code: u64,
    /// Its text.
    #[serde(borrow, default)]
    message: Cow<'a, str>,
}

/// A push.
#[derive(Debug, Deserialize)]
struct PushFrame<'a> {
    /// The channel it concerns.
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    /// A publication.
    #[serde(rename = "pub")]
    publication: Option<PublicationFrame>,
    /// The server disconnects the client.
    #[serde(borrow)]
    disconnect: Option<DisconnectFrame<'a>>,
    /// The server unsubscribed the client from `channel`.
    unsubscribe: Option<IgnoredAny>,
}

/// A publication's fields the bench reads.
#[derive(Debug, Deserialize)]
struct PublicationFrame {
    /// The published data.
    data: Option<DataFrame>,
}

/// The bench's data object, each field optional (foreign publications).
#[derive(Debug, Deserialize)]
struct DataFrame {
    /// Sequence number.
    seq: Option<u64>,
    /// Send time, µs.
    ts: Option<u64>,
    /// Phase.
    p: Option<usize>,
}

/// A disconnect push.
#[derive(Debug, Deserialize)]
struct DisconnectFrame<'a> {
    /// The disconnect code (3000–4999).
    #[serde(default)]
    code: u32,
    /// Why.
    #[serde(borrow, default)]
    reason: Cow<'a, str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The bench's data object for these fields (as published).
    fn data(seq: u64, ts: u64, phase: usize, payload_bytes: usize) -> String {
        crate::publish::trigger_data(seq, ts, phase, payload_bytes)
    }

    #[test]
    fn rooms_become_channels_without_namespace() {
        assert_eq!(channel(&json!({"hot": 0})), Ok("hot=0".to_string()));
        assert_eq!(channel(&json!({"warehouse": 2, "customer": "a"})), Ok("customer=a,warehouse=2".to_string()));
        assert!(channel(&json!({"customer": 1, "warehouse": "*"})).is_err_and(|e| e.contains("wildcard")));
        assert!(channel(&json!({"user": "a:b"})).is_err(), "':' would name a namespace");
        assert!(channel(&json!({"user": "a#b"})).is_err(), "'#' would make a user-limited channel");
        assert!(channel(&json!({})).is_err());
        assert!(channel(&json!([1])).is_err());
    }

    #[test]
    fn subscribe_and_api_requests() {
        assert_eq!(subscribe_frame("hot=0", 0), r#"{"id":2,"subscribe":{"channel":"hot=0"}}"#);
        let d = data(7, 8, 1, 64);
        let (path, body) = api_request(&["hot=0".to_string()], &d);
        assert_eq!(path, "/publish");
        assert_eq!(String::from_utf8(body).expect("UTF-8"), format!(r#"{{"channel":"hot=0","data":{d}}}"#));
        let rooms = ["b=1".to_string(), "a=1".to_string(), "b=1".to_string()];
        let (path, body) = api_request(&rooms, &d);
        assert_eq!(path, "/broadcast");
        let text = String::from_utf8(body).expect("UTF-8");
        assert_eq!(text, format!(r#"{{"channels":["a=1","b=1"],"data":{d}}}"#), "sorted, one copy per channel");
        let v: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(v["data"]["seq"], 7);
    }

    #[test]
    fn api_errors_in_a_2xx_answer() {
        assert_eq!(api_error(br#"{"result":{}}"#), None);
        assert_eq!(api_error(br#"{}"#), None);
        assert_eq!(api_error(b"not json"), None);
        assert_eq!(
            api_error(br#"{"error":{"code":102,"message":"unknown channel"}}"#).as_deref(),
            Some(r#"{"code":102,"message":"unknown channel"}"#)
        );
        let broadcast = br#"{"result":{"responses":[{"result":{}},{"error":{"code":103,"message":"x"}}]}}"#;
        assert!(api_error(broadcast).is_some());
        assert_eq!(api_error(br#"{"result":{"responses":[{"result":{}},{}]}}"#), None);
    }

    #[test]
    fn reads_command_replies_and_pings() {
        assert_eq!(parse("{}"), Ok(Reply::Ping));
        assert_eq!(
            parse(r#"{"id":1,"connect":{"client":"c","version":"6.9.1","ping":25,"pong":true}}"#),
            Ok(Reply::Connected)
        );
        assert_eq!(parse(r#"{"id":2,"subscribe":{}}"#), Ok(Reply::Subscribed(0)));
        assert_eq!(parse(r#"{"id":5,"subscribe":{"recoverable":false}}"#), Ok(Reply::Subscribed(3)));
        assert_eq!(
            parse(r#"{"id":3,"error":{"code":103,"message":"permission denied"}}"#),
            Ok(Reply::Failed { id: 3, code: 103, message: "permission denied".into() })
        );
        assert_eq!(
            parse(r#"{"push":{"disconnect":{"code":3501,"reason":"bad request"}}}"#),
            Ok(Reply::Disconnect(3501, "bad request".into()))
        );
        assert!(matches!(parse(r#"{"push":{"channel":"a=1","unsubscribe":{"code":2000}}}"#), Ok(Reply::Other(_))));
        assert!(parse("{").is_err());
        assert!(parse("ping").is_err());
    }

    #[test]
    fn several_replies_in_one_frame() {
        let d = data(1, 2, 0, 0);
        let text = format!(
            "{{\"id\":2,\"subscribe\":{{}}}}\n{{}}\n{{\"push\":{{\"channel\":\"hot=0\",\"pub\":{{\"data\":{d}}}}}}}"
        );
        let replies: Vec<_> = lines(&text).map(parse).collect();
        assert_eq!(
            replies,
            vec![
                Ok(Reply::Subscribed(0)),
                Ok(Reply::Ping),
                Ok(Reply::Publication { channel: "hot=0".into(), bench: Some(BenchFields { seq: 1, ts: 2, p: 0 }) }),
            ]
        );
        assert_eq!(lines("").count(), 0);
        assert_eq!(lines("{}\n").count(), 1);
    }

    #[test]
    fn reads_the_bench_publication_like_serde_json() {
        for (seq, ts, phase, pad, channel) in [
            (0, 1, 0, 0, "hot=0"),
            (7, 123_456_789, 3, 128, "customer=1,warehouse=2"),
            (u32::MAX as u64, 9, 12, 1024, "u=x"),
        ] {
            let line =
                format!(r#"{{"push":{{"channel":"{channel}","pub":{{"data":{}}}}}}}"#, data(seq, ts, phase, pad));
            let fast = fast_publication(&line).unwrap_or_else(|| panic!("fast path reads {line}"));
            let frame: ReplyFrame = serde_json::from_str(&line).expect("JSON");
            let push = frame.push.expect("push");
            let d = push.publication.and_then(|p| p.data).expect("data");
            let slow = Reply::Publication {
                channel: push.channel.expect("channel"),
                bench: Some(BenchFields { seq: d.seq.expect("seq"), ts: d.ts.expect("ts"), p: d.p.expect("p") }),
            };
            assert_eq!(fast, slow, "{line}");
        }
    }

    #[test]
    fn leaves_other_publication_shapes_to_serde_json() {
        for line in [
            r#"{"push":{"channel":"a","pub":{"data":{"seq":1,"ts":2,"p":0},"offset":3}}}"#,
            r#"{"push":{"channel":"a\"b","pub":{"data":{"seq":1,"ts":2,"p":0}}}}"#,
            r#"{"push":{"channel":"a","pub":{"data":{"ts":2,"seq":1,"p":0}}}}"#,
            r#"{"push":{"channel":"a","pub":{"data":{"seq":1,"ts":2,"p":0x}}}}"#,
            r#"{"push":{"channel":"a","pub":{"data":{"seq":99999999999999999999,"ts":2,"p":0}}}}"#,
            r#"{"push":{"channel":"a","pub":{"data":{"seq":1,"ts":2,"p":0}}}} "#,
        ] {
            assert_eq!(fast_publication(line), None, "{line}");
        }
        // serde_json still reads the first one, offset and all.
        assert_eq!(
            parse(r#"{"push":{"channel":"a","pub":{"data":{"seq":1,"ts":2,"p":0},"offset":3}}}"#),
            Ok(Reply::Publication { channel: "a".into(), bench: Some(BenchFields { seq: 1, ts: 2, p: 0 }) })
        );
    }
}
