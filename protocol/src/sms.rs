//! The SMS gateway's payloads, carried in ordinary `send-message` frames:
//!
//! - **jobs**, sent by applications on the `sms` channel: `data` is an array of items
//!   `{"id", "time", "receiver", "message"}` (the seed README's shape), optionally with
//!   `expiration` (epoch seconds; the job is dropped as expired after it) and `date_time`
//!   (informational, as the original author's Pi gateway used), `priority` (-128..127; 100 and
//!   above jump the agent's queue: the OTP lane) and `delivery_report` (true: ask the network
//!   for a delivery report for this job whatever the agent's default) and `sim` (1, 2, ...: send
//!   through that `[[modem]]` of the agent, in the order of its configuration, as SMS Gateway
//!   for Android's `simNumber` picks a phone's SIM). A single object as
//!   `data` is accepted too. [`JobItem`] builds one (the broker's HTTP API does).
//! - **status events**, published by the agent on the status channel (`sms-status`): one item
//!   per event, `{"id", "status", ...}`, see [`StatusEvent`].
//! - **received SMS**, published by the agent on the inbox channel (`sms-inbox`): one item per
//!   message, its parts joined, see [`InboxMessage`].
//!
//! Only the shape lives here; what makes a job valid (number format, length) is the agent's
//! business.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A job as read from the wire, fields typed but not yet validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The application's id (strings as given, numbers as their JSON text).
    pub id: Option<String>,
    /// The destination, as given (a JSON number is taken as its digits).
    pub receiver: Option<String>,
    /// The text.
    pub message: Option<String>,
    /// Epoch seconds after which the job must not be sent.
    pub expiration: Option<u64>,
    /// Informational date-time string.
    pub date_time: Option<String>,
    /// The application's `time` (epoch seconds).
    pub time: Option<i64>,
    /// Queue priority, -128..127 (0 when absent); 100 and above: the OTP lane.
    pub priority: i32,
    /// `Some(true)`: request a delivery report for this job; `None`: the agent's default.
    pub delivery_report: Option<bool>,
    /// Send through this modem of the agent (1-based, in the order of its `[[modem]]`
    /// sections); `None`: the agent's routes pick one.
    pub sim: Option<u8>,
}

/// The highest `sim` a job may name (a gateway with more modems than this is not expected).
pub const MAX_SIM: u64 = 64;

/// Priority from which a job jumps the queue (the OTP lane).
pub const PRIORITY_LANE: i32 = 100;

/// A job as the broker writes it (the same shape as an application's item).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobItem<'a> {
    /// Job id.
    pub id: &'a str,
    /// Epoch seconds, when it was accepted.
    pub time: u64,
    /// Destination.
    pub receiver: &'a str,
    /// Text.
    pub message: &'a str,
    /// Epoch seconds after which it must not be sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiration: Option<u64>,
    /// Queue priority.
    #[serde(skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// Ask for a delivery report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_report: Option<bool>,
    /// The agent's modem to send it through (1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sim: Option<u8>,
}

fn is_zero(p: &i32) -> bool {
    *p == 0
}

/// Why an item of `data` is not a job at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemError {
    /// The item's `id`, when it has one.
    pub id: Option<String>,
    /// What is wrong.
    pub reason: String,
}

/// Why a forwarded frame carries no jobs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobFrameError {
    /// Not JSON, not an object.
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// `command` is not `send-message` (a reply, or something else).
    #[error("not a send-message frame")]
    NotAMessage,
    /// `data` is neither an array nor an object.
    #[error("data is neither an array nor an object")]
    BadData,
}

#[derive(Deserialize)]
struct Frame {
    command: Option<Value>,
    channel: Option<Value>,
    data: Option<Value>,
}

/// Reads the jobs of a forwarded `send-message` frame; returns the channel too. Each item is a
/// job or an [`ItemError`], in order.
#[allow(clippy::type_complexity)]
pub fn parse_jobs(
    text: &str,
) -> Result<(Option<String>, Vec<Result<Job, ItemError>>), JobFrameError> {
    let f: Frame = serde_json::from_str(text).map_err(|e| JobFrameError::NotJson(e.to_string()))?;
    if f.command.as_ref().and_then(Value::as_str) != Some("send-message") {
        return Err(JobFrameError::NotAMessage);
    }
    let channel = f
        .channel
        .as_ref()
        .and_then(Value::as_str)
        .map(str::to_owned);
    let items = match f.data {
        Some(Value::Array(items)) => items,
        Some(obj @ Value::Object(_)) => vec![obj],
        _ => return Err(JobFrameError::BadData),
    };
    Ok((channel, items.into_iter().map(job_from_value).collect()))
}

fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Epoch seconds from a number or a numeric string.
fn epoch(v: &Value) -> Option<Option<u64>> {
    match v {
        Value::Null => Some(None),
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some),
        Value::String(s) if s.trim().is_empty() => Some(None),
        Value::String(s) => s.trim().parse::<u64>().ok().map(Some),
        _ => None,
    }
}

fn job_from_value(v: Value) -> Result<Job, ItemError> {
    let Value::Object(map) = v else {
        return Err(ItemError {
            id: None,
            reason: "an item of data is not an object".into(),
        });
    };
    let id = map.get("id").and_then(id_of);
    let err = |reason: String| ItemError {
        id: id.clone(),
        reason,
    };
    let receiver = match map.get("receiver") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err(err("\"receiver\" must be a string".into())),
    };
    let message = match map.get("message") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err(err("\"message\" must be a string".into())),
    };
    let expiration = match map.get("expiration") {
        None => None,
        Some(v) => epoch(v).ok_or_else(|| {
            err("\"expiration\" must be epoch seconds (a number or a string of digits)".into())
        })?,
    };
    let date_time = map
        .get("date_time")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let time = map.get("time").and_then(Value::as_i64);
    let priority = match map.get("priority") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .filter(|p| (-128..=127).contains(p))
            .ok_or_else(|| err("\"priority\" must be a whole number from -128 to 127".into()))?
            as i32,
    };
    let delivery_report = match map.get("delivery_report") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err(err("\"delivery_report\" must be true or false".into())),
    };
    let sim = match map.get("sim") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| (1..=MAX_SIM).contains(n))
                .ok_or_else(|| {
                    err(format!(
                        "\"sim\" must be a whole number from 1 to {MAX_SIM} (the agent's modem, \
                         in the order of its [[modem]] sections)"
                    ))
                })? as u8,
        ),
    };
    Ok(Job {
        id,
        receiver,
        message,
        expiration,
        date_time,
        time,
        priority,
        delivery_report,
        sim,
    })
}

/// The kind of a status event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The agent has the job, stored durably, and will send it.
    Queued,
    /// The network accepted every part.
    Sent,
    /// The network reported every part delivered to the handset.
    Delivered,
    /// The job will not be sent (see `reason`, `error_code`, `ambiguous`).
    Failed,
    /// The job's `expiration` passed before it could be sent.
    Expired,
    /// A modem changed state (`id` is `modem:<name>`; see `modem_state`).
    Modem,
    /// The job waits because every modem that could send it has reached a sending limit
    /// (`rate_per_minute`, `rate_per_hour`, `rate_per_day`); it stays queued until `until`
    /// (epoch seconds), and `reason` names the limit. Sent once per hold, not repeated.
    Held,
    /// The agent's health (`id` is `agent`; see `agent`): sent when the agent connects and
    /// every `agent.heartbeat_interval`, with a `ttl` of that interval so that a copy nobody
    /// takes does not outlive the next one. Not kept by the agent while the broker is away.
    Heartbeat,
}

/// What a heartbeat says about the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHealth {
    /// `wsmb-agent`'s version.
    pub version: String,
    /// Seconds until the next heartbeat (the broker calls the agent stale after three).
    pub interval: u64,
    /// Seconds since the agent started.
    pub uptime: u64,
    /// Jobs stored and not finished yet (waiting, being sent, retrying).
    pub queued: u64,
    /// Status events and received SMS stored, not yet taken by the broker.
    pub unpublished: u64,
    /// Each modem.
    pub modems: Vec<ModemHealth>,
}

/// A modem's network registration (`AT+CREG?` stat) in the words the heartbeat carries in
/// `registration`.
pub fn registration_words(stat: u8) -> &'static str {
    match stat {
        0 => "not registered, not searching",
        1 => "registered, home network",
        2 => "not registered, searching",
        3 => "registration denied",
        5 => "registered, roaming",
        _ => "unknown",
    }
}

/// Whether `registration` (see [`registration_words`]) says the modem is on a network, at
/// home or roaming.
pub fn is_registered(registration: Option<&str>) -> bool {
    registration.is_some_and(|r| r.starts_with("registered"))
}

/// One modem in a heartbeat. Counters are since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModemHealth {
    /// The modem's name (`[[modem]] name`).
    pub name: String,
    /// `starting`, `ready`, `down` or `stopped`.
    pub state: String,
    /// Why it is down or stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Signal in dBm, as last read (`AT+CSQ`, at each idle check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_dbm: Option<i32>,
    /// Network operator (`AT+COPS?`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// Network registration in words (`registered, home network`, `registration denied`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<String>,
    /// Jobs sent through it (every part accepted by the network).
    pub sent: u64,
    /// Jobs that failed on it for good.
    pub failed: u64,
    /// Attempts on it that will be retried.
    pub retried: u64,
    /// The last error it gave, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it last sent a job (epoch seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sent: Option<u64>,
}

/// One status event, an item of the `data` array published on the status channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEvent {
    /// The job's id (or `modem:<name>` for modem events).
    pub id: String,
    /// What happened.
    pub status: Status,
    /// When, epoch seconds.
    pub time: u64,
    /// The destination, normalised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiver: Option<String>,
    /// The modem that sent (or tried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modem: Option<String>,
    /// For `sent`: the TP-Message-Reference of each part, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub message_references: Vec<u8>,
    /// For `sent` (and `queued`): the number of SMS parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<u32>,
    /// For `failed`: a short code (`+CMS ERROR: 28`, `invalid_receiver`, `blocked`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// For `failed`/`expired`/`modem`: what happened, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For `failed`: the SMS may nevertheless have gone out (the modem's answer after sending
    /// was ambiguous), so it was not sent again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ambiguous: bool,
    /// Sending attempts made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// For `modem`: `ready`, `down` or `stopped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modem_state: Option<String>,
    /// For `modem`: the signal in dBm, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_dbm: Option<i32>,
    /// For `modem`: the network operator's name, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// For `held`: when a modem may send it (epoch seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    /// For `heartbeat`: the agent's health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentHealth>,
}

/// An SMS the gateway received, an item of the `data` array published on the inbox channel.
/// A plain legacy receiver gets the sender and the whole text in one item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxMessage {
    /// The gateway's id of the message (unique; its parts' re-reads never make another).
    pub id: String,
    /// The sender as the network gave it: `+628123456789` (with the plus when international),
    /// national digits, or an alphanumeric name such as `BANK`.
    pub sender: String,
    /// The whole text, its parts joined in order (for 8-bit data: the bytes as hex).
    pub message: String,
    /// When the SMSC received it, epoch seconds.
    pub time: i64,
    /// The same, RFC 3339 in the SMSC's own time zone (`2026-12-05T17:30:00+07:00`).
    pub received_at: String,
    /// SMS parts it came in.
    pub parts: u32,
    /// Some parts never came (published after `agent.inbox_part_timeout` with what arrived;
    /// missing parts are left out).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    /// `gsm7`, `ucs2` or `8bit`.
    pub coding: String,
    /// The modem that received it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modem: Option<String>,
}

impl StatusEvent {
    /// An event with only the required fields set.
    pub fn new(id: impl Into<String>, status: Status, time: u64) -> Self {
        StatusEvent {
            id: id.into(),
            status,
            time,
            receiver: None,
            modem: None,
            message_references: Vec::new(),
            parts: None,
            error_code: None,
            reason: None,
            ambiguous: false,
            attempts: None,
            modem_state: None,
            signal_dbm: None,
            operator: None,
            until: None,
            agent: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_readme_job() {
        let text = "{\n    \"command\": \"send-message\",\n    \"channel\": \"sms\",\n    \"data\": [\n        {\n            \"id\": \"6560a1b2c3d4e\",\n            \"time\": 1700000000,\n            \"receiver\": \"08126666666\",\n            \"message\": \"Haloo. Pesan ini dikirim 28 November 2026\"\n        }\n    ]\n}";
        let (ch, jobs) = parse_jobs(text).expect("jobs");
        assert_eq!(ch.as_deref(), Some("sms"));
        assert_eq!(
            jobs,
            vec![Ok(Job {
                id: Some("6560a1b2c3d4e".into()),
                receiver: Some("08126666666".into()),
                message: Some("Haloo. Pesan ini dikirim 28 November 2026".into()),
                expiration: None,
                date_time: None,
                time: Some(1_700_000_000),
                priority: 0,
                delivery_report: None,
                sim: None,
            })]
        );
    }

    #[test]
    fn single_object_expiration_and_date_time() {
        let text = r#"{"command":"send-message","channel":"sms","data":{"id":7,"receiver":628123,"message":"x","expiration":"1800000000","date_time":"2026-11-28 10:00:00"}}"#;
        let (_, jobs) = parse_jobs(text).expect("jobs");
        let j = jobs[0].clone().expect("job");
        assert_eq!(j.id.as_deref(), Some("7"));
        assert_eq!(j.receiver.as_deref(), Some("628123"));
        assert_eq!(j.expiration, Some(1_800_000_000));
        assert_eq!(j.date_time.as_deref(), Some("2026-11-28 10:00:00"));
    }

    #[test]
    fn sim_picks_a_modem_by_position() {
        let text = r#"{"command":"send-message","channel":"sms","data":[{"id":"a","receiver":"1","message":"x","sim":2},{"id":"b","receiver":"1","message":"x","sim":null},{"id":"c","receiver":"1","message":"x","sim":0},{"id":"d","receiver":"1","message":"x","sim":"2"},{"id":"e","receiver":"1","message":"x","sim":65}]}"#;
        let (_, jobs) = parse_jobs(text).expect("jobs");
        assert_eq!(jobs[0].clone().expect("job").sim, Some(2));
        assert_eq!(jobs[1].clone().expect("job").sim, None);
        for bad in &jobs[2..] {
            let e = bad.clone().expect_err("bad sim");
            assert!(
                e.reason
                    .contains("\"sim\" must be a whole number from 1 to 64"),
                "{e:?}"
            );
        }
        let item = JobItem {
            id: "a",
            time: 1,
            receiver: "+62812",
            message: "x",
            expiration: None,
            priority: 0,
            delivery_report: None,
            sim: Some(3),
        };
        assert_eq!(
            serde_json::to_string(&item).expect("json"),
            r#"{"id":"a","time":1,"receiver":"+62812","message":"x","sim":3}"#
        );
    }

    #[test]
    fn bad_items_are_reported_one_by_one() {
        let text = r#"{"command":"send-message","channel":"sms","data":["x",{"id":"a","receiver":["1"]},{"id":"b","expiration":"soon"},{"id":"c","receiver":"1","message":"ok"}]}"#;
        let (_, jobs) = parse_jobs(text).expect("frame");
        assert!(jobs[0].is_err());
        assert_eq!(jobs[1].clone().expect_err("bad").id.as_deref(), Some("a"));
        assert!(
            jobs[2]
                .clone()
                .expect_err("bad")
                .reason
                .contains("expiration")
        );
        assert!(jobs[3].is_ok());
        assert!(matches!(parse_jobs("nope"), Err(JobFrameError::NotJson(_))));
        assert_eq!(
            parse_jobs(r#"{"command":"connect","response_code":"00","data":[]}"#),
            Err(JobFrameError::NotAMessage)
        );
        assert_eq!(
            parse_jobs(r#"{"command":"send-message","data":"x"}"#),
            Err(JobFrameError::BadData)
        );
    }

    #[test]
    fn status_events_serialise_compactly() {
        let mut e = StatusEvent::new("6560", Status::Sent, 1_800_000_000);
        e.receiver = Some("+628126666666".into());
        e.modem = Some("modem1".into());
        e.message_references = vec![12, 13];
        e.parts = Some(2);
        let s = serde_json::to_string(&e).expect("json");
        assert_eq!(
            s,
            r#"{"id":"6560","status":"sent","time":1800000000,"receiver":"+628126666666","modem":"modem1","message_references":[12,13],"parts":2}"#
        );
        let back: StatusEvent = serde_json::from_str(&s).expect("parse");
        assert_eq!(back, e);
        let mut f = StatusEvent::new("x", Status::Failed, 1);
        f.ambiguous = true;
        assert!(
            serde_json::to_string(&f)
                .expect("json")
                .contains("\"ambiguous\":true")
        );
    }
}
