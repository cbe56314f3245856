//! What the SMS service keeps about a message and how the API shows it: states, recipients,
//! the JSON shapes of SMSGate's API (camelCase, ISO 8601 times with offset), and the requests it
//! accepts, validated with an error that says what is wrong.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A message's (or a recipient's) state, in the order they are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum State {
    /// Accepted and stored; no gateway has it yet.
    Pending,
    /// A gateway agent has it (stored in its queue).
    Processed,
    /// The network accepted every part.
    Sent,
    /// The network reported it delivered.
    Delivered,
    /// It will not be (or was not) sent; see the recipient's `error`.
    Failed,
    /// Cancelled while pending; never sent.
    Cancelled,
}

impl State {
    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "Pending",
            State::Processed => "Processed",
            State::Sent => "Sent",
            State::Delivered => "Delivered",
            State::Failed => "Failed",
            State::Cancelled => "Cancelled",
        }
    }

    /// From its name in the API.
    pub fn parse(s: &str) -> Option<State> {
        [
            State::Pending,
            State::Processed,
            State::Sent,
            State::Delivered,
            State::Failed,
            State::Cancelled,
        ]
        .into_iter()
        .find(|st| st.as_str().eq_ignore_ascii_case(s))
    }

    /// Whether nothing more will happen (a delivery report may still turn `Sent` into
    /// `Delivered`, so `Sent` is not final).
    pub fn is_final(self) -> bool {
        matches!(self, State::Delivered | State::Failed | State::Cancelled)
    }
}

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `POST /3rdparty/v1/messages`.
    Api,
    /// A `send-message` on the jobs channel over WebSocket.
    Ws,
}

/// One recipient of a message: one job on the jobs channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The number.
    pub phone: String,
    /// Its job's id.
    pub job: String,
    /// Its state.
    pub state: State,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// SMS parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<u32>,
    /// The modem that sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modem: Option<String>,
    /// Why the gateway holds it back (a modem's sending limit), while it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
}

impl Recipient {
    /// A recipient no gateway has taken yet.
    pub fn pending(phone: impl Into<String>, job: impl Into<String>) -> Recipient {
        Recipient {
            phone: phone.into(),
            job: job.into(),
            state: State::Pending,
            error: None,
            parts: None,
            modem: None,
            held: None,
        }
    }
}

/// A message as the service keeps it (the document's body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The API's id (for WebSocket jobs: the item's id).
    pub id: String,
    /// The user who sent it.
    pub owner: String,
    /// API or WebSocket.
    pub source: Source,
    /// The gateway (agent user) that took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// When it was accepted, epoch ms.
    pub created_ms: i64,
    /// Epoch seconds after which it is not sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The broker's id of the frame that carries its jobs (to withdraw it on cancel).
    #[serde(default)]
    pub frame_id: String,
    /// A digest of what was asked (owner, text, numbers): a repeated id with another content
    /// is a conflict, with the same content a no-op.
    #[serde(default)]
    pub fingerprint: String,
    /// Its recipients.
    pub recipients: Vec<Recipient>,
    /// When each message state was reached (epoch ms).
    pub states: BTreeMap<State, i64>,
}

impl Message {
    /// The message's state: the least advanced of its recipients'; once all are final, Failed
    /// if one failed, Cancelled if all were cancelled, else Delivered.
    pub fn state(&self) -> State {
        let min = self
            .recipients
            .iter()
            .map(|r| r.state)
            .filter(|s| !s.is_final())
            .min();
        if let Some(s) = min {
            return s;
        }
        if self.recipients.iter().any(|r| r.state == State::Failed) {
            State::Failed
        } else if self.recipients.iter().all(|r| r.state == State::Cancelled) {
            State::Cancelled
        } else {
            State::Delivered
        }
    }

    /// Records the message state's time when it changed; returns whether it did.
    pub fn note_state(&mut self, now_ms: i64) -> bool {
        let s = self.state();
        if self.states.contains_key(&s) {
            return false;
        }
        self.states.insert(s, now_ms);
        true
    }

    /// The API's view (`MessageState` of SMSGate's clients).
    pub fn view(&self) -> Value {
        let recipients: Vec<Value> = self
            .recipients
            .iter()
            .map(|r| {
                let mut v = serde_json::json!({
                    "phoneNumber": r.phone,
                    "state": r.state.as_str(),
                    "error": r.error,
                });
                if let (Some(h), Some(o)) = (&r.held, v.as_object_mut()) {
                    o.insert("heldBack".into(), Value::String(h.clone()));
                }
                v
            })
            .collect();
        let states: serde_json::Map<String, Value> = self
            .states
            .iter()
            .map(|(s, t)| (s.as_str().to_owned(), Value::String(iso(*t))))
            .collect();
        serde_json::json!({
            "id": self.id,
            "deviceId": self.device,
            "state": self.state().as_str(),
            "isHashed": false,
            "isEncrypted": false,
            "recipients": recipients,
            "states": states,
            "createdAt": iso(self.created_ms),
        })
    }
}

/// When a received SMS reached the SMSC, ISO 8601 as the agent gave it (in the SMSC's time
/// zone), or from its epoch seconds.
pub fn received_at(m: &wsmb_protocol::sms::InboxMessage) -> String {
    if parse_iso(&m.received_at).is_some() {
        m.received_at.clone()
    } else {
        iso(m.time.saturating_mul(1000))
    }
}

/// The API's view of a received SMS (`GET /inbox`), as SMSGate's inbox items plus `parts`
/// and `partial`; `sim` is the receiving modem's position among the gateway's (unknown before
/// its first heartbeat).
pub fn inbox_view(m: &wsmb_protocol::sms::InboxMessage, device: &str, sim: Option<usize>) -> Value {
    serde_json::json!({
        "id": m.id,
        "message": m.message,
        "phoneNumber": m.sender,
        "simNumber": sim,
        "receivedAt": received_at(m),
        "deviceId": device,
        "parts": m.parts,
        "partial": m.partial,
        "coding": m.coding,
    })
}

/// Epoch ms as ISO 8601 with milliseconds and offset (`2026-12-02T10:00:00.000+00:00`).
pub fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3f+00:00").to_string())
        .unwrap_or_default()
}

/// Reads an ISO 8601 / RFC 3339 time (`Z` or an offset; without one, UTC) as epoch ms.
pub fn parse_iso(s: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s.trim()) {
        return Some(t.timestamp_millis());
    }
    for f in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s.trim(), f) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    None
}

/// Longest message id accepted.
pub const MAX_ID: usize = 128;

/// `POST /messages` as sent by the clients.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendRequest {
    /// Optional id.
    #[serde(default)]
    pub id: Option<String>,
    /// The text.
    #[serde(default)]
    pub text_message: Option<TextMessage>,
    /// Data SMS (not supported).
    #[serde(default)]
    pub data_message: Option<Value>,
    /// MMS (not supported).
    #[serde(default)]
    pub mms_message: Option<Value>,
    /// The old clients' plain `message`.
    #[serde(default)]
    pub message: Option<String>,
    /// Numbers.
    #[serde(default)]
    pub phone_numbers: Vec<String>,
    /// Seconds.
    #[serde(default)]
    pub ttl: Option<i64>,
    /// ISO 8601.
    #[serde(default)]
    pub valid_until: Option<String>,
    /// Ask for a delivery report (the clients' default: true).
    #[serde(default = "yes")]
    pub with_delivery_report: bool,
    /// -128..127.
    #[serde(default)]
    pub priority: Option<i64>,
    /// The gateway's modem by position (1-based, the order of the agent's `[[modem]]`
    /// sections), as a phone's SIM slot.
    #[serde(default)]
    pub sim_number: Option<i64>,
    /// End-to-end encryption (not supported).
    #[serde(default)]
    pub is_encrypted: bool,
    /// The device to use (any gateway when absent).
    #[serde(default)]
    pub device_id: Option<String>,
}

fn yes() -> bool {
    true
}

/// `textMessage`.
#[derive(Debug, Deserialize)]
pub struct TextMessage {
    /// The text.
    #[serde(default)]
    pub text: String,
}

/// `POST /webhooks`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookRequest {
    /// Optional id (a repeated id replaces that webhook).
    #[serde(default)]
    pub id: Option<String>,
    /// Where to POST.
    pub url: String,
    /// Which event.
    pub event: String,
    /// Only events of this gateway.
    #[serde(default)]
    pub device_id: Option<String>,
}

/// A registered webhook (the document's body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    /// Its id.
    pub id: String,
    /// Its URL.
    pub url: String,
    /// Its event.
    pub event: String,
    /// Only this gateway's events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

/// The events a webhook can be registered for.
pub const EVENTS: [&str; 5] = [
    "sms:received",
    "sms:sent",
    "sms:delivered",
    "sms:failed",
    "system:ping",
];

/// A number in E.164 after removing separators (`+62 812-3456 789` → `+628123456789`), or why
/// not.
pub fn e164(raw: &str) -> Result<String, String> {
    let cleaned: String = raw
        .trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')' | '.' | '\u{a0}'))
        .collect();
    let digits = cleaned.strip_prefix('+').unwrap_or("");
    if digits.len() < 7
        || digits.len() > 15
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || digits.starts_with('0')
    {
        return Err(format!(
            "{raw:?} is not a phone number in international format: write + and the country code \
             (+628123456789), or send with skipPhoneValidation=true to pass it to the gateway as \
             it is"
        ));
    }
    Ok(cleaned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(states: &[State]) -> Message {
        Message {
            id: "m".into(),
            owner: "u".into(),
            source: Source::Api,
            device: None,
            created_ms: 0,
            expires_at: None,
            frame_id: String::new(),
            fingerprint: String::new(),
            recipients: states
                .iter()
                .map(|s| Recipient {
                    state: *s,
                    ..Recipient::pending("+1", "j")
                })
                .collect(),
            states: BTreeMap::new(),
        }
    }

    #[test]
    fn the_least_advanced_recipient_gives_the_state() {
        use State::*;
        assert_eq!(msg(&[Sent, Pending]).state(), Pending);
        assert_eq!(msg(&[Sent, Delivered]).state(), Sent);
        assert_eq!(msg(&[Failed, Sent]).state(), Sent);
        assert_eq!(msg(&[Failed, Delivered]).state(), Failed);
        assert_eq!(msg(&[Cancelled, Cancelled]).state(), Cancelled);
        assert_eq!(msg(&[Delivered]).state(), Delivered);
    }

    #[test]
    fn times_and_numbers() {
        assert_eq!(iso(1_796_205_600_123), "2026-12-02T10:00:00.123+00:00");
        assert_eq!(
            parse_iso("2026-12-02T10:00:00+00:00"),
            Some(1_796_205_600_000)
        );
        assert_eq!(
            parse_iso("2026-12-02T12:00:00+02:00"),
            Some(1_796_205_600_000)
        );
        assert_eq!(parse_iso("2026-12-02T10:00:00Z"), Some(1_796_205_600_000));
        assert_eq!(parse_iso("2026-12-02T10:00:00.5"), Some(1_796_205_600_500));
        assert_eq!(parse_iso("tomorrow"), None);
        assert_eq!(e164("+62 812-6666-666").as_deref(), Ok("+628126666666"));
        assert!(e164("08126666666").is_err());
        assert!(e164("+0812").is_err());
        assert!(e164("+62abc").is_err());
    }
}
