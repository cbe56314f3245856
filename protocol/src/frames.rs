//! Building the frames a client sends (the agent, tools, tests): compact JSON in the legacy
//! shape `{"command":..,"channel":..,"data":[..]}`.

use serde::Serialize;

#[derive(Serialize)]
struct Out<'a, D: Serialize> {
    command: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ack: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    window: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<u64>,
    data: &'a [D],
}

fn encode<D: Serialize>(
    command: &str,
    channel: Option<&str>,
    protocol: Option<u32>,
    data: &[D],
) -> String {
    serde_json::to_string(&Out {
        command,
        channel,
        protocol,
        ack: false,
        window: None,
        ttl: None,
        data,
    })
    .unwrap_or_default()
}

/// `receive-message` in acknowledged mode (protocol 2): the broker sends `deliver` frames and
/// keeps each message until it is acknowledged with [`ack`]; at most `window` unacknowledged.
pub fn receive_message_acked(channel: &str, window: u32) -> String {
    serde_json::to_string(&Out::<()> {
        command: "receive-message",
        channel: Some(channel),
        protocol: Some(crate::client::PROTOCOL_V2),
        ack: true,
        window: Some(window),
        ttl: None,
        data: &[],
    })
    .unwrap_or_default()
}

/// `ack` of delivered messages.
pub fn ack(message_ids: &[&str]) -> String {
    encode("ack", None, None, message_ids)
}

/// `receive-message` on `channel`; `protocol2` adds `"protocol":2` (several channels, and
/// sending does not end receiving).
pub fn receive_message(channel: &str, protocol2: bool) -> String {
    encode::<()>(
        "receive-message",
        Some(channel),
        protocol2.then_some(crate::client::PROTOCOL_V2),
        &[],
    )
}

/// `send-message` of `data` on `channel`.
pub fn send_message<D: Serialize>(channel: &str, data: &[D]) -> String {
    encode("send-message", Some(channel), None, data)
}

/// `send-message` of `data` on `channel` that the broker keeps at most `ttl_secs` for a
/// receiver (a heartbeat: worthless once the next one is due).
pub fn send_message_ttl<D: Serialize>(channel: &str, data: &[D], ttl_secs: u64) -> String {
    serde_json::to_string(&Out {
        command: "send-message",
        channel: Some(channel),
        protocol: None,
        ack: false,
        window: None,
        ttl: Some(ttl_secs),
        data,
    })
    .unwrap_or_default()
}

/// `ping`.
pub fn ping() -> String {
    encode::<()>("ping", None, None, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Command, parse_client_frame};

    #[test]
    fn built_frames_parse() {
        let r = receive_message("sms", true);
        assert_eq!(
            r,
            r#"{"command":"receive-message","channel":"sms","protocol":2,"data":[]}"#
        );
        let f = parse_client_frame(r.as_bytes()).expect("parse");
        assert_eq!((f.command, f.protocol), (Command::ReceiveMessage, Some(2)));
        assert_eq!(
            receive_message("sms", false),
            r#"{"command":"receive-message","channel":"sms","data":[]}"#
        );
        let s = send_message("sms-status", &[serde_json::json!({"id":"1"})]);
        let f = parse_client_frame(s.as_bytes()).expect("parse");
        assert_eq!(f.command, Command::SendMessage);
        assert_eq!(f.items.len(), 1);
        assert_eq!(ping(), r#"{"command":"ping","data":[]}"#);
        let r = receive_message_acked("sms", 32);
        let f = parse_client_frame(r.as_bytes()).expect("parse");
        assert!(f.ack && f.window == Some(32) && f.protocol == Some(2));
        let a = ack(&["m-1", "m-2"]);
        let f = parse_client_frame(a.as_bytes()).expect("parse");
        assert_eq!((f.command, f.acks.len()), (Command::Ack, 2));
    }
}
