//! Frames the broker sends to clients, all in the legacy reply shape:
//! `{"command":..,"response_code":..,"response_text":..,"data":[..]}` (compact, keys in that
//! order, as the PHP broker's `json_encode` produced them).
//!
//! - `connect`: the welcome frame, and the reply to `ping`.
//! - `send-result`: the acknowledgement of a `send-message` (new; legacy senders ignore it).
//! - `error`: the reply to a frame the broker could not accept (new).
//!
//! Encoding helpers are used by the broker; [`BrokerReply`] decodes any of them for clients (the
//! gateway agent, tests, tools).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codes::ResponseCode;

/// `command` of the welcome frame and of the `ping` reply.
pub const CONNECT: &str = "connect";
/// `command` of the acknowledgement of a `send-message`.
pub const SEND_RESULT: &str = "send-result";
/// `command` of an error reply.
pub const ERROR: &str = "error";
/// `command` of a message delivered to a receiver in acknowledged mode.
pub const DELIVER: &str = "deliver";
/// `command` of the report of a stored message that expired undelivered.
pub const EXPIRED: &str = "expired";

#[derive(Serialize)]
struct Out<'a, D: Serialize> {
    command: &'a str,
    response_code: &'a str,
    response_text: &'a str,
    data: &'a [D],
}

/// Encodes a reply frame. Serialising these plain structs cannot fail; should it ever, the
/// result is still a valid frame (with empty `data`), never a panic.
pub fn encode<D: Serialize>(command: &str, code: ResponseCode, data: &[D]) -> String {
    let out = Out {
        command,
        response_code: code.code(),
        response_text: code.text(),
        data,
    };
    serde_json::to_string(&out).unwrap_or_else(|_| {
        serde_json::to_string(&Out::<()> {
            command,
            response_code: code.code(),
            response_text: code.text(),
            data: &[],
        })
        .unwrap_or_default()
    })
}

/// `data[0]` of `connect` and `ping` replies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectData {
    /// UTC, seconds precision, `.000Z` (see [`crate::time`]).
    pub time_stamp: String,
    /// `ping` replies of a broker with a database: `ok`, or `down: <reason>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
}

/// The `connect` frame (welcome, or `ping` reply) with the given code.
pub fn connect(code: ResponseCode, time_stamp: String) -> String {
    encode(
        CONNECT,
        code,
        &[ConnectData {
            time_stamp,
            storage: None,
        }],
    )
}

/// The `ping` reply of a broker with a database: `00` when it is reachable, `01` when not (as
/// the legacy broker answered), with the state in `storage`.
pub fn ping_with_storage(time_stamp: String, storage: Result<(), String>) -> String {
    let (code, storage) = match storage {
        Ok(()) => (ResponseCode::Accepted, "ok".to_owned()),
        Err(e) => (ResponseCode::Rejected, format!("down: {e}")),
    };
    encode(
        CONNECT,
        code,
        &[ConnectData {
            time_stamp,
            storage: Some(storage),
        }],
    )
}

/// A message for a receiver in acknowledged mode:
/// `{"command":"deliver","message_id":..,"channel":..,"delivery":n,"frame":<the sender's frame>}`.
/// `frame` is the sender's JSON verbatim (it must be valid JSON: the broker parsed it);
/// `delivery` counts attempts (2 and more are redeliveries). Acknowledge with
/// `{"command":"ack","data":[message_id]}`.
pub fn deliver(message_id: &str, channel: &str, delivery: u32, frame: &str) -> String {
    let id = serde_json::to_string(message_id).unwrap_or_else(|_| "\"\"".into());
    let ch = serde_json::to_string(channel).unwrap_or_else(|_| "\"\"".into());
    let mut out = String::with_capacity(frame.len() + id.len() + ch.len() + 64);
    out.push_str("{\"command\":\"deliver\",\"message_id\":");
    out.push_str(&id);
    out.push_str(",\"channel\":");
    out.push_str(&ch);
    out.push_str(",\"delivery\":");
    out.push_str(&delivery.to_string());
    out.push_str(",\"frame\":");
    out.push_str(frame);
    out.push('}');
    out
}

/// A decoded `deliver` frame (for clients).
#[derive(Debug, Deserialize)]
pub struct Delivery {
    /// The id to acknowledge.
    pub message_id: String,
    /// The channel.
    pub channel: String,
    /// 1 for the first delivery, more for redeliveries.
    pub delivery: u32,
    /// The sender's frame, verbatim.
    pub frame: Box<serde_json::value::RawValue>,
}

impl Delivery {
    /// Decodes a `deliver` frame; `None` for anything else.
    pub fn parse(text: &str) -> Option<Delivery> {
        #[derive(Deserialize)]
        struct Head<'a> {
            #[serde(borrow)]
            command: std::borrow::Cow<'a, str>,
        }
        let head: Head<'_> = serde_json::from_str(text).ok()?;
        if head.command != DELIVER {
            return None;
        }
        serde_json::from_str(text).ok()
    }
}

/// `data[0]` of an `expired` report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiredData {
    /// The message.
    pub message_id: String,
    /// Its channel.
    pub channel: String,
    /// Its item ids.
    pub ids: Vec<String>,
}

/// `data[0]` of a `send-result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendResult {
    /// The broker's id for this `send-message` frame.
    pub message_id: String,
    /// The channel it was sent on.
    pub channel: String,
    /// How many receivers it was handed to (0 when not accepted).
    pub receivers: u32,
    /// One id per element of `data`, in order: the item's own `id`, or `<message_id>.<index>`.
    /// Empty when they would not fit in a reply (see `ids_omitted`).
    #[serde(default)]
    pub ids: Vec<String>,
    /// Set (to the number of items) when the message had so many items that their ids were
    /// left out of this reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids_omitted: Option<u64>,
    /// With a database: whether the message was stored durably before this reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<bool>,
    /// Why it was not accepted (codes `04`, `05`, `06`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `data[0]` of an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorData {
    /// What was wrong and how to fix it.
    pub reason: String,
    /// The command of the refused frame, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

/// An `error` frame.
pub fn error(code: ResponseCode, reason: String, command: Option<&str>) -> String {
    encode(
        ERROR,
        code,
        &[ErrorData {
            reason,
            command: command.map(str::to_owned),
        }],
    )
}

/// Any broker reply, decoded (for clients).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BrokerReply {
    /// `connect`, `send-result` or `error`.
    pub command: String,
    /// See [`ResponseCode`].
    pub response_code: String,
    /// The code's fixed text.
    pub response_text: String,
    /// Command-specific payload.
    #[serde(default)]
    pub data: Vec<serde_json::Value>,
}

impl BrokerReply {
    /// Decodes a reply; `None` when the text is not a reply frame (for instance a forwarded
    /// `send-message`, which has no `response_code`).
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    /// The response code, if it is a known one.
    pub fn code(&self) -> Option<ResponseCode> {
        ResponseCode::from_code(&self.response_code)
    }

    /// `data[0]` decoded as `T`.
    pub fn first<T: DeserializeOwned>(&self) -> Option<T> {
        self.data
            .first()
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_frame_is_byte_identical_to_the_legacy_one() {
        assert_eq!(
            connect(ResponseCode::Accepted, "2026-11-28T06:19:08.000Z".into()),
            r#"{"command":"connect","response_code":"00","response_text":"Accepted","data":[{"time_stamp":"2026-11-28T06:19:08.000Z"}]}"#
        );
        assert_eq!(
            connect(ResponseCode::Rejected, "2026-11-28T06:19:08.000Z".into()),
            r#"{"command":"connect","response_code":"01","response_text":"Rejected","data":[{"time_stamp":"2026-11-28T06:19:08.000Z"}]}"#
        );
    }

    #[test]
    fn send_result_and_error_round_trip() {
        let r = SendResult {
            message_id: "m1".into(),
            channel: "sms".into(),
            receivers: 2,
            ids: vec!["a".into(), "m1.1".into()],
            ids_omitted: None,
            stored: None,
            reason: None,
        };
        let s = encode(
            SEND_RESULT,
            ResponseCode::Accepted,
            std::slice::from_ref(&r),
        );
        assert_eq!(
            s,
            r#"{"command":"send-result","response_code":"00","response_text":"Accepted","data":[{"message_id":"m1","channel":"sms","receivers":2,"ids":["a","m1.1"]}]}"#
        );
        let back = BrokerReply::parse(&s).expect("reply");
        assert_eq!(back.code(), Some(ResponseCode::Accepted));
        assert_eq!(back.first::<SendResult>(), Some(r));

        let e = error(ResponseCode::InvalidJson, "bad".into(), None);
        assert_eq!(
            e,
            r#"{"command":"error","response_code":"10","response_text":"Invalid JSON","data":[{"reason":"bad"}]}"#
        );
        let back = BrokerReply::parse(&e).expect("reply");
        assert_eq!(
            back.first::<ErrorData>(),
            Some(ErrorData {
                reason: "bad".into(),
                command: None
            })
        );
    }

    #[test]
    fn deliveries_embed_the_frame_verbatim() {
        let frame = "{\n  \"command\": \"send-message\", \"channel\": \"sms\", \"data\": [{\"id\": \"é\"}]\n}";
        let d = deliver("abc-1", "sms", 2, frame);
        assert!(d.ends_with(&format!(",\"frame\":{frame}}}")));
        let back = Delivery::parse(&d).expect("delivery");
        assert_eq!(
            (
                back.message_id.as_str(),
                back.channel.as_str(),
                back.delivery
            ),
            ("abc-1", "sms", 2)
        );
        assert_eq!(back.frame.get(), frame);
        assert!(Delivery::parse(r#"{"command":"send-message","data":[]}"#).is_none());
        let p = ping_with_storage("t".into(), Err("connection refused".into()));
        assert!(
            p.contains("\"response_code\":\"01\"")
                && p.contains("\"storage\":\"down: connection refused\""),
            "{p}"
        );
    }

    #[test]
    fn a_forwarded_message_is_not_a_reply() {
        assert!(
            BrokerReply::parse(r#"{"command":"send-message","channel":"sms","data":[]}"#).is_none()
        );
    }
}
