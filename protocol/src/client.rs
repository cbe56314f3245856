//! Frames sent by clients to the broker, parsed in a single pass.
//!
//! The broker forwards a `send-message` frame byte for byte, so it never needs a full tree of the
//! JSON: it needs the command, the channel, the optional `number_of_receiver`, whether `data` is an
//! array and the `id` of each item (for the sender's acknowledgement). [`parse_client_frame`]
//! extracts exactly that, borrowing strings from the input where JSON escapes allow, and turns
//! every malformed input into a [`FrameError`] that names the problem and how to fix it. Unknown
//! fields are ignored, as the legacy broker ignored them.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::codes::ResponseCode;

/// Longest accepted channel name, in characters. The legacy `mq_data.channel` column is
/// `varchar(100)`, so a longer name could not be stored by a site that keeps the legacy schema.
pub const MAX_CHANNEL_CHARS: usize = 100;

/// The protocol revision that enables WSMB's additions for a connection (see [`ClientFrame::protocol`]).
pub const PROTOCOL_V2: u32 = 2;

/// A client command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `send-message`: forward this frame to receivers of `channel`.
    SendMessage,
    /// `receive-message`: register as a receiver of `channel`.
    ReceiveMessage,
    /// `ping`: ask for a health reply (same shape as `connect`).
    Ping,
    /// `ack`: a receiver in acknowledged mode confirms messages by their `message_id`s (`data`
    /// is an array of them).
    Ack,
}

impl Command {
    /// The command as spelt on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::SendMessage => "send-message",
            Command::ReceiveMessage => "receive-message",
            Command::Ping => "ping",
            Command::Ack => "ack",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "send-message" => Some(Command::SendMessage),
            "receive-message" => Some(Command::ReceiveMessage),
            "ping" => Some(Command::Ping),
            "ack" => Some(Command::Ack),
            _ => None,
        }
    }
}

/// The tracking id of one item of `data`, as the sender gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemId<'a> {
    /// The item is an object with an `id` that is a string or a number (numbers keep their JSON
    /// spelling, so `"id": 42` is tracked as `"42"`).
    Given(Cow<'a, str>),
    /// The item has no usable `id`; the broker assigns one.
    Missing,
}

/// One element of `data` of a `send-message`: what the broker needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item<'a> {
    /// Its tracking id.
    pub id: ItemId<'a>,
    /// Its `expiration` (epoch seconds, a number or a string of digits), if any.
    pub expiration: Option<u64>,
}

/// A validated client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFrame<'a> {
    /// What the client asks for.
    pub command: Command,
    /// The channel, compared exactly (byte for byte). Always present for `send-message` and
    /// `receive-message`; optional for `ping`.
    pub channel: Option<Cow<'a, str>>,
    /// How many receivers should get a `send-message` (`Some(0)` = all). `None` when absent or
    /// `null`: the broker's configured default applies.
    pub number_of_receiver: Option<u32>,
    /// For `send-message`: one entry per element of `data`, in order.
    pub items: Vec<Item<'a>>,
    /// `"protocol": 2` opts the connection into WSMB's additions (several subscriptions, sending
    /// without losing them). Absent for legacy clients.
    pub protocol: Option<u32>,
    /// `receive-message` with `"ack": true`: acknowledged (at-least-once) delivery.
    pub ack: bool,
    /// `receive-message`: most unacknowledged messages this receiver wants at once.
    pub window: Option<u32>,
    /// `send-message`: time to live in seconds (`"ttl"`), from the broker's receipt.
    pub ttl: Option<u64>,
    /// `send-message`: absolute expiry, epoch seconds (`"expires_at"`).
    pub expires_at: Option<u64>,
    /// `send-message` with `"report": true`: tell this sender later when the message expires
    /// undelivered.
    pub report: bool,
    /// `ack`: the acknowledged message ids.
    pub acks: Vec<Cow<'a, str>>,
}

impl ClientFrame<'_> {
    /// When this message expires (epoch seconds), given the time of receipt: the earliest of
    /// `ttl`, `expires_at`, and, when every item carries an `expiration`, the latest of those.
    pub fn expiry(&self, now_secs: u64) -> Option<u64> {
        let mut e = [
            self.ttl.map(|t| now_secs.saturating_add(t)),
            self.expires_at,
        ]
        .into_iter()
        .flatten()
        .min();
        if !self.items.is_empty() && self.items.iter().all(|i| i.expiration.is_some()) {
            let items = self.items.iter().filter_map(|i| i.expiration).max();
            e = match (e, items) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        e
    }
}

/// Why a client frame was refused. The broker answers each with an `error` frame carrying
/// [`FrameError::code`] and [`FrameError`]'s `Display` text as the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Not valid JSON; the text is serde_json's description with line and column.
    InvalidJson(String),
    /// Valid JSON whose top level is not an object; names what it is.
    NotAnObject(&'static str),
    /// `command` is absent.
    MissingCommand,
    /// `command` is not a string; names what it is.
    CommandNotString(&'static str),
    /// `command` is a string that is not a known command.
    UnknownCommand(String),
    /// `channel` is absent (for a command that needs one).
    MissingChannel,
    /// `channel` is not a string; names what it is.
    ChannelNotString(&'static str),
    /// `channel` is the empty string.
    EmptyChannel,
    /// `channel` is longer than [`MAX_CHANNEL_CHARS`].
    ChannelTooLong(usize),
    /// `number_of_receiver` is not a number or a numeric string; describes the value.
    InvalidNumberOfReceiver(String),
    /// `data` of a `send-message` is absent.
    MissingData,
    /// `data` of a `send-message` is not an array; names what it is.
    DataNotArray(&'static str),
    /// `data` of a `send-message` is an empty array: nothing to send.
    EmptyData,
    /// `protocol` is not a positive integer.
    InvalidProtocol(String),
    /// An optional field has the wrong type: (field, what it is, what it should be).
    InvalidField(&'static str, String, &'static str),
    /// `data` of an `ack` is not an array of message ids.
    InvalidAcks,
}

impl FrameError {
    /// The response code that reports this error.
    pub fn code(&self) -> ResponseCode {
        match self {
            FrameError::InvalidJson(_) => ResponseCode::InvalidJson,
            FrameError::NotAnObject(_) => ResponseCode::NotAnObject,
            FrameError::MissingCommand
            | FrameError::CommandNotString(_)
            | FrameError::UnknownCommand(_) => ResponseCode::UnknownCommand,
            FrameError::MissingChannel
            | FrameError::ChannelNotString(_)
            | FrameError::EmptyChannel
            | FrameError::ChannelTooLong(_) => ResponseCode::InvalidChannel,
            FrameError::InvalidNumberOfReceiver(_) => ResponseCode::InvalidNumberOfReceiver,
            FrameError::MissingData | FrameError::DataNotArray(_) | FrameError::EmptyData => {
                ResponseCode::InvalidData
            }
            FrameError::InvalidProtocol(_) | FrameError::InvalidField(..) => {
                ResponseCode::InvalidField
            }
            FrameError::InvalidAcks => ResponseCode::InvalidData,
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::InvalidJson(e) => write!(
                f,
                "the frame is not valid JSON ({e}); send one JSON object such as \
                 {{\"command\":\"ping\"}}"
            ),
            FrameError::NotAnObject(kind) => write!(
                f,
                "the frame is a JSON {kind}, not an object; send an object such as \
                 {{\"command\":\"send-message\",\"channel\":\"sms\",\"data\":[...]}}"
            ),
            FrameError::MissingCommand => write!(
                f,
                "the frame has no \"command\"; use \"send-message\", \"receive-message\" or \"ping\""
            ),
            FrameError::CommandNotString(kind) => write!(
                f,
                "\"command\" is a {kind}, not a string; use \"send-message\", \"receive-message\" \
                 or \"ping\""
            ),
            FrameError::UnknownCommand(c) => write!(
                f,
                "unknown command {c:?}; use \"send-message\", \"receive-message\" or \"ping\" \
                 (commands are case-sensitive)"
            ),
            FrameError::MissingChannel => {
                write!(
                    f,
                    "the frame has no \"channel\"; add the channel name, e.g. \"sms\""
                )
            }
            FrameError::ChannelNotString(kind) => write!(
                f,
                "\"channel\" is a {kind}, not a string; channel names are strings, e.g. \"sms\""
            ),
            FrameError::EmptyChannel => write!(f, "\"channel\" is empty; give a channel name"),
            FrameError::ChannelTooLong(n) => write!(
                f,
                "\"channel\" has {n} characters; at most {MAX_CHANNEL_CHARS} are allowed"
            ),
            FrameError::InvalidNumberOfReceiver(v) => write!(
                f,
                "\"number_of_receiver\" is {v}; use a whole number (0 = every receiver) or a \
                 string of digits"
            ),
            FrameError::MissingData => write!(
                f,
                "\"send-message\" needs \"data\": an array of items, e.g. \
                 [{{\"id\":\"1\",\"receiver\":\"+628...\",\"message\":\"...\"}}]"
            ),
            FrameError::EmptyData => write!(
                f,
                "\"data\" is an empty array: there is nothing to send; put at least one item in \
                 it, e.g. [{{\"id\":\"1\",\"receiver\":\"+628...\",\"message\":\"...\"}}]"
            ),
            FrameError::DataNotArray(kind) => write!(
                f,
                "\"data\" is a {kind}, not an array; put the item(s) in an array: \"data\":[...]"
            ),
            FrameError::InvalidProtocol(v) => write!(
                f,
                "\"protocol\" is {v}; use the number {PROTOCOL_V2} or leave it out"
            ),
            FrameError::InvalidField(field, v, want) => {
                write!(f, "\"{field}\" is {v}; use {want} or leave it out")
            }
            FrameError::InvalidAcks => write!(
                f,
                "\"ack\" needs \"data\": an array of the message_id strings to acknowledge"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// Parses and validates one client frame.
///
/// `bytes` must be the complete frame payload. Strings are borrowed from it where they contain no
/// escapes. Every input either parses or yields a [`FrameError`]; nothing panics.
pub fn parse_client_frame(bytes: &[u8]) -> Result<ClientFrame<'_>, FrameError> {
    let top: TopLevel<'_> =
        serde_json::from_slice(bytes).map_err(|e| FrameError::InvalidJson(e.to_string()))?;
    let raw = match top {
        TopLevel::Object(raw) => raw,
        TopLevel::Other(kind) => return Err(FrameError::NotAnObject(kind)),
    };

    let command = match raw.command {
        None => return Err(FrameError::MissingCommand),
        Some(Loose::Str(s)) => {
            Command::parse(&s).ok_or_else(|| FrameError::UnknownCommand(truncate(&s, 64)))?
        }
        Some(Loose::Null) => return Err(FrameError::MissingCommand),
        Some(other) => return Err(FrameError::CommandNotString(other.kind())),
    };

    let channel = match raw.channel {
        None | Some(Loose::Null) => None,
        Some(Loose::Str(s)) => {
            if s.is_empty() {
                return Err(FrameError::EmptyChannel);
            }
            let n = s.chars().count();
            if n > MAX_CHANNEL_CHARS {
                return Err(FrameError::ChannelTooLong(n));
            }
            Some(s)
        }
        Some(other) => return Err(FrameError::ChannelNotString(other.kind())),
    };
    if channel.is_none() && !matches!(command, Command::Ping | Command::Ack) {
        return Err(FrameError::MissingChannel);
    }

    let protocol = match raw.protocol {
        None | Some(Loose::Null) => None,
        Some(Loose::U64(n)) if n >= 1 && n <= u64::from(u32::MAX) => Some(n as u32),
        Some(other) => return Err(FrameError::InvalidProtocol(other.describe())),
    };

    let flag = |v: Option<Loose<'_>>, name: &'static str| match v {
        None | Some(Loose::Null) => Ok(false),
        Some(Loose::Bool(b)) => Ok(b),
        Some(other) => Err(FrameError::InvalidField(
            name,
            other.describe(),
            "true or false",
        )),
    };
    let count = |v: Option<Loose<'_>>, name: &'static str, want: &'static str| match v {
        None | Some(Loose::Null) => Ok(None),
        Some(Loose::U64(n)) => Ok(Some(n)),
        Some(Loose::Str(s)) if s.trim().parse::<u64>().is_ok() => Ok(s.trim().parse::<u64>().ok()),
        Some(other) => Err(FrameError::InvalidField(name, other.describe(), want)),
    };
    let ack = flag(raw.ack, "ack")?;
    let report = flag(raw.report, "report")?;
    let window = count(raw.window, "window", "a whole number of messages")?
        .map(|w| w.clamp(1, u64::from(u32::MAX)) as u32);
    let ttl = count(raw.ttl, "ttl", "a whole number of seconds")?;
    let expires_at = count(raw.expires_at, "expires_at", "epoch seconds")?;

    let mut number_of_receiver = None;
    let mut items = Vec::new();
    let mut acks = Vec::new();
    match command {
        Command::SendMessage => {
            number_of_receiver = match raw.number_of_receiver {
                None | Some(Loose::Null) => None,
                Some(v) => Some(receiver_count(&v)?),
            };
            items = match raw.data {
                None | Some(Data::Null) => return Err(FrameError::MissingData),
                Some(Data::Array(elems)) => elems
                    .into_iter()
                    .map(|e| match e {
                        Elem::Item(item) => item,
                        Elem::Str(_) | Elem::Other => Item {
                            id: ItemId::Missing,
                            expiration: None,
                        },
                    })
                    .collect(),
                Some(Data::Other(kind)) => return Err(FrameError::DataNotArray(kind)),
            };
            if items.is_empty() {
                return Err(FrameError::EmptyData);
            }
        }
        Command::Ack => {
            let Some(Data::Array(elems)) = raw.data else {
                return Err(FrameError::InvalidAcks);
            };
            for e in elems {
                match e {
                    Elem::Str(s) => acks.push(s),
                    _ => return Err(FrameError::InvalidAcks),
                }
            }
        }
        Command::ReceiveMessage | Command::Ping => {}
    }

    Ok(ClientFrame {
        command,
        channel,
        number_of_receiver,
        items,
        protocol,
        ack,
        window,
        ttl,
        expires_at,
        report,
        acks,
    })
}

/// `number_of_receiver` the way the legacy broker read it (`abs($v * 1)`), minus its crashes:
/// integers and numeric strings, negative values taken as positive, fractions rounded up (the
/// legacy loop stopped at the first count `>=` the value), huge values clamped.
fn receiver_count(v: &Loose<'_>) -> Result<u32, FrameError> {
    let x: f64 = match v {
        Loose::U64(n) => *n as f64,
        Loose::I64(n) => *n as f64,
        Loose::F64(n) => *n,
        Loose::Str(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| FrameError::InvalidNumberOfReceiver(v.describe()))?,
        other => return Err(FrameError::InvalidNumberOfReceiver(other.describe())),
    };
    if !x.is_finite() {
        return Err(FrameError::InvalidNumberOfReceiver(v.describe()));
    }
    let x = x.abs().ceil();
    Ok(if x >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        x as u32
    })
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Lenient deserialisation: every known field is read into a type that accepts any JSON value, so
// the only serde errors left are syntax errors; type errors become precise `FrameError`s above.

// Lives on the stack for the duration of one parse; boxing the large variant would cost an
// allocation per frame on the hot path.
#[allow(clippy::large_enum_variant)]
enum TopLevel<'a> {
    Object(RawFrame<'a>),
    Other(&'static str),
}

#[derive(Default)]
struct RawFrame<'a> {
    command: Option<Loose<'a>>,
    channel: Option<Loose<'a>>,
    number_of_receiver: Option<Loose<'a>>,
    protocol: Option<Loose<'a>>,
    ack: Option<Loose<'a>>,
    window: Option<Loose<'a>>,
    ttl: Option<Loose<'a>>,
    expires_at: Option<Loose<'a>>,
    report: Option<Loose<'a>>,
    data: Option<Data<'a>>,
}

/// Any JSON value, keeping scalars and only the kind of containers.
enum Loose<'a> {
    Str(Cow<'a, str>),
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Null,
    Array,
    Object,
}

impl Loose<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Loose::Str(_) => "string",
            Loose::U64(_) | Loose::I64(_) | Loose::F64(_) => "number",
            Loose::Bool(_) => "boolean",
            Loose::Null => "null",
            Loose::Array => "array",
            Loose::Object => "object",
        }
    }

    /// A short description for error messages (the value for scalars, the kind otherwise).
    fn describe(&self) -> String {
        match self {
            Loose::Str(s) => format!("the string {:?}", truncate(s, 32)),
            Loose::U64(n) => format!("the number {n}"),
            Loose::I64(n) => format!("the number {n}"),
            Loose::F64(n) => format!("the number {n}"),
            Loose::Bool(b) => format!("the boolean {b}"),
            Loose::Null => "null".to_owned(),
            Loose::Array => "an array".to_owned(),
            Loose::Object => "an object".to_owned(),
        }
    }
}

enum Data<'a> {
    Array(Vec<Elem<'a>>),
    Null,
    Other(&'static str),
}

/// One element of `data`: an object (an item), a string (an acknowledged id), or anything else.
enum Elem<'a> {
    Item(Item<'a>),
    Str(Cow<'a, str>),
    Other,
}

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut raw = RawFrame::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    // Duplicate keys: the last one wins, as with PHP's json_decode.
                    match key.as_ref() {
                        "command" => raw.command = Some(map.next_value()?),
                        "channel" => raw.channel = Some(map.next_value()?),
                        "number_of_receiver" => raw.number_of_receiver = Some(map.next_value()?),
                        "protocol" => raw.protocol = Some(map.next_value()?),
                        "ack" => raw.ack = Some(map.next_value()?),
                        "window" => raw.window = Some(map.next_value()?),
                        "ttl" => raw.ttl = Some(map.next_value()?),
                        "expires_at" => raw.expires_at = Some(map.next_value()?),
                        "report" => raw.report = Some(map.next_value()?),
                        "data" => raw.data = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(TopLevel::Object(raw))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(TopLevel::Other("array"))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(TopLevel::Other("string"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(TopLevel::Other("number"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(TopLevel::Other("number"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(TopLevel::Other("number"))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(TopLevel::Other("boolean"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(TopLevel::Other("null"))
            }
        }
        d.deserialize_any(V)
    }
}

struct LooseVisitor;

impl<'de> Visitor<'de> for LooseVisitor {
    type Value = Loose<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Loose::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Loose::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Loose::Str(Cow::Owned(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Loose::U64(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Loose::I64(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Loose::F64(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Loose::Bool(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Loose::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Loose::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Loose::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Loose::Object)
    }
}

impl<'de> Deserialize<'de> for Loose<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LooseVisitor)
    }
}

impl<'de> Deserialize<'de> for Data<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Data<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(64));
                while let Some(item) = seq.next_element::<ElemProbe<'de>>()? {
                    items.push(item.0);
                }
                Ok(Data::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Data::Other("object"))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Data::Other("string"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Data::Other("number"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Data::Other("number"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Data::Other("number"))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Data::Other("boolean"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Data::Null)
            }
        }
        d.deserialize_any(V)
    }
}

/// One element of `data`: for objects only `id` and `expiration` are kept.
struct ElemProbe<'a>(Elem<'a>);

impl<'de> Deserialize<'de> for ElemProbe<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ElemProbe<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an item")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut id = ItemId::Missing;
                let mut expiration = None;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "id" => {
                            id = match map.next_value::<Loose<'de>>()? {
                                Loose::Str(s) => ItemId::Given(s),
                                Loose::U64(n) => ItemId::Given(Cow::Owned(n.to_string())),
                                Loose::I64(n) => ItemId::Given(Cow::Owned(n.to_string())),
                                Loose::F64(n) => ItemId::Given(Cow::Owned(n.to_string())),
                                _ => ItemId::Missing,
                            };
                        }
                        "expiration" => {
                            expiration = match map.next_value::<Loose<'de>>()? {
                                Loose::U64(n) => Some(n),
                                Loose::F64(f) if f >= 0.0 => Some(f as u64),
                                Loose::Str(s) => s.trim().parse::<u64>().ok(),
                                _ => None,
                            };
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(ElemProbe(Elem::Item(Item { id, expiration })))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(ElemProbe(Elem::Str(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ElemProbe(Elem::Str(Cow::Owned(v.to_owned()))))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ElemProbe(Elem::Other))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(ElemProbe(Elem::Other))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(ElemProbe(Elem::Other))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(ElemProbe(Elem::Other))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(ElemProbe(Elem::Other))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(ElemProbe(Elem::Other))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids<'a>(f: &ClientFrame<'a>) -> Vec<ItemId<'a>> {
        f.items.iter().map(|i| i.id.clone()).collect()
    }

    fn ok(s: &str) -> ClientFrame<'_> {
        match parse_client_frame(s.as_bytes()) {
            Ok(f) => f,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    fn err(s: &str) -> FrameError {
        match parse_client_frame(s.as_bytes()) {
            Ok(f) => panic!("{s} parsed as {f:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn legacy_sender_frame_pretty_printed() {
        let s = "{\n    \"command\": \"send-message\",\n    \"channel\": \"sms\",\n    \"data\": [\n        {\n            \"id\": \"5f1a\",\n            \"time\": 1700000000,\n            \"receiver\": \"08126666666\",\n            \"message\": \"Haloo\"\n        }\n    ]\n}";
        let f = ok(s);
        assert_eq!(f.command, Command::SendMessage);
        assert_eq!(f.channel.as_deref(), Some("sms"));
        assert_eq!(f.number_of_receiver, None);
        assert_eq!(ids(&f), vec![ItemId::Given(Cow::Borrowed("5f1a"))]);
        assert_eq!(f.protocol, None);
    }

    #[test]
    fn receive_and_ping() {
        let f = ok(r#"{"command":"receive-message","channel":"sms","data":[]}"#);
        assert_eq!(f.command, Command::ReceiveMessage);
        assert!(f.items.is_empty());
        let f = ok(r#"{"command":"ping"}"#);
        assert_eq!(f.command, Command::Ping);
        assert_eq!(f.channel, None);
        // data of a non-send command is ignored whatever it is
        ok(r#"{"command":"receive-message","channel":"sms","data":"x"}"#);
    }

    #[test]
    fn item_ids_strings_numbers_and_missing() {
        let f = ok(
            r#"{"command":"send-message","channel":"c","data":[{"id":"a\"b"},{"id":42},{"x":1},"s",[1],{"id":null},{"id":-3},{"id":1.5}]}"#,
        );
        assert_eq!(
            ids(&f),
            vec![
                ItemId::Given(Cow::Owned("a\"b".into())),
                ItemId::Given("42".into()),
                ItemId::Missing,
                ItemId::Missing,
                ItemId::Missing,
                ItemId::Missing,
                ItemId::Given("-3".into()),
                ItemId::Given("1.5".into()),
            ]
        );
    }

    #[test]
    fn number_of_receiver_like_the_legacy_broker() {
        let n = |v: &str| {
            let s = format!(
                r#"{{"command":"send-message","channel":"c","data":[{{}}],"number_of_receiver":{v}}}"#
            );
            parse_client_frame(s.as_bytes()).map(|f| f.number_of_receiver)
        };
        assert_eq!(n("2"), Ok(Some(2)));
        assert_eq!(n("\"3\""), Ok(Some(3)));
        assert_eq!(n("\" 4 \""), Ok(Some(4)));
        assert_eq!(n("-2"), Ok(Some(2)));
        assert_eq!(n("\"-1\""), Ok(Some(1)));
        assert_eq!(n("0"), Ok(Some(0)));
        assert_eq!(n("1.2"), Ok(Some(2)));
        assert_eq!(n("null"), Ok(None));
        assert_eq!(n("1e30"), Ok(Some(u32::MAX)));
        for bad in ["\"abc\"", "[]", "{}", "true", "\"\"", "\"NaN\"", "\"inf\""] {
            assert!(
                matches!(n(bad), Err(FrameError::InvalidNumberOfReceiver(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn every_bad_input_has_its_error() {
        assert!(matches!(err("hello"), FrameError::InvalidJson(_)));
        assert!(matches!(err(""), FrameError::InvalidJson(_)));
        assert!(matches!(err("{\"command\":"), FrameError::InvalidJson(_)));
        assert!(matches!(err("{} x"), FrameError::InvalidJson(_)));
        assert_eq!(err("\"hello\""), FrameError::NotAnObject("string"));
        assert_eq!(err("42"), FrameError::NotAnObject("number"));
        assert_eq!(err("[1,2]"), FrameError::NotAnObject("array"));
        assert_eq!(err("null"), FrameError::NotAnObject("null"));
        assert_eq!(err("true"), FrameError::NotAnObject("boolean"));
        assert_eq!(err("{}"), FrameError::MissingCommand);
        assert_eq!(err(r#"{"command":null}"#), FrameError::MissingCommand);
        assert_eq!(
            err(r#"{"command":5}"#),
            FrameError::CommandNotString("number")
        );
        assert_eq!(
            err(r#"{"command":"Send-Message","channel":"c"}"#),
            FrameError::UnknownCommand("Send-Message".into())
        );
        assert_eq!(
            err(r#"{"command":"send-message","data":[]}"#),
            FrameError::MissingChannel
        );
        assert_eq!(
            err(r#"{"command":"receive-message","channel":7}"#),
            FrameError::ChannelNotString("number")
        );
        assert_eq!(
            err(r#"{"command":"receive-message","channel":""}"#),
            FrameError::EmptyChannel
        );
        let long = format!(
            r#"{{"command":"receive-message","channel":"{}"}}"#,
            "é".repeat(101)
        );
        assert_eq!(err(&long), FrameError::ChannelTooLong(101));
        assert_eq!(
            err(r#"{"command":"send-message","channel":"c"}"#),
            FrameError::MissingData
        );
        assert_eq!(
            err(r#"{"command":"send-message","channel":"c","data":null}"#),
            FrameError::MissingData
        );
        assert_eq!(
            err(r#"{"command":"send-message","channel":"c","data":{"id":1}}"#),
            FrameError::DataNotArray("object")
        );
        assert_eq!(
            err(r#"{"command":"send-message","channel":"c","data":"x"}"#),
            FrameError::DataNotArray("string")
        );
        assert_eq!(
            err(r#"{"command":"send-message","channel":"c","data":[]}"#),
            FrameError::EmptyData
        );
        assert_eq!(FrameError::EmptyData.code(), ResponseCode::InvalidData);
        assert!(matches!(
            err(r#"{"command":"ping","protocol":"2"}"#),
            FrameError::InvalidProtocol(_)
        ));
        assert!(matches!(
            err(r#"{"command":"ping","protocol":0}"#),
            FrameError::InvalidProtocol(_)
        ));
    }

    #[test]
    fn channels_are_kept_exactly() {
        let f = ok(r#"{"command":"receive-message","channel":"01"}"#);
        assert_eq!(f.channel.as_deref(), Some("01"));
        let f = ok(r#"{"command":"receive-message","channel":"\u0073ms"}"#);
        assert_eq!(f.channel.as_deref(), Some("sms"));
    }

    #[test]
    fn error_codes_and_texts_are_helpful() {
        let e =
            err(r#"{"command":"send-message","channel":"c","data":[],"number_of_receiver":"abc"}"#);
        assert_eq!(e.code(), ResponseCode::InvalidNumberOfReceiver);
        assert!(e.to_string().contains("\"abc\""), "{e}");
        assert_eq!(err("x").code(), ResponseCode::InvalidJson);
        assert_eq!(err("[]").code(), ResponseCode::NotAnObject);
    }

    #[test]
    fn acknowledged_delivery_fields() {
        let f = ok(
            r#"{"command":"receive-message","channel":"sms","protocol":2,"ack":true,"window":"16"}"#,
        );
        assert!(f.ack);
        assert_eq!(f.window, Some(16));
        let f = ok(r#"{"command":"ack","data":["m-1","m-2"]}"#);
        assert_eq!(f.command, Command::Ack);
        assert_eq!(f.acks, vec!["m-1", "m-2"]);
        assert_eq!(f.channel, None);
        assert_eq!(
            err(r#"{"command":"ack","data":[1]}"#),
            FrameError::InvalidAcks
        );
        assert_eq!(err(r#"{"command":"ack"}"#), FrameError::InvalidAcks);
        assert!(matches!(
            err(r#"{"command":"receive-message","channel":"c","ack":"yes"}"#),
            FrameError::InvalidField("ack", ..)
        ));
        assert!(matches!(
            err(r#"{"command":"send-message","channel":"c","data":[],"ttl":-5}"#),
            FrameError::InvalidField("ttl", ..)
        ));
    }

    #[test]
    fn expiry_from_ttl_expires_at_and_items() {
        let f = ok(r#"{"command":"send-message","channel":"c","ttl":60,"data":[{"id":"a"}]}"#);
        assert_eq!(f.expiry(1000), Some(1060));
        let f = ok(
            r#"{"command":"send-message","channel":"c","ttl":60,"expires_at":1030,"data":[{}]}"#,
        );
        assert_eq!(f.expiry(1000), Some(1030));
        // every item has an expiration: the message lives until the last of them
        let f = ok(
            r#"{"command":"send-message","channel":"c","data":[{"expiration":1100},{"expiration":"1200"}]}"#,
        );
        assert_eq!(f.expiry(1000), Some(1200));
        assert_eq!(f.items[1].expiration, Some(1200));
        // one item without: no item-level expiry
        let f = ok(r#"{"command":"send-message","channel":"c","data":[{"expiration":1100},{}]}"#);
        assert_eq!(f.expiry(1000), None);
        let f = ok(r#"{"command":"send-message","channel":"c","report":true,"data":[{}]}"#);
        assert!(f.report);
    }

    #[test]
    fn protocol_flag() {
        let f = ok(r#"{"command":"receive-message","channel":"sms","protocol":2}"#);
        assert_eq!(f.protocol, Some(2));
    }

    #[test]
    fn deep_nesting_does_not_crash() {
        // Nested values are skipped iteratively by serde_json, so depth cannot overflow the stack.
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        let frame = format!(
            r#"{{"command":"send-message","channel":"c","data":[{deep}, {{"id":{deep}}}]}}"#
        );
        let f = ok(&frame);
        assert_eq!(ids(&f), vec![ItemId::Missing, ItemId::Missing]);
        assert_eq!(err(&deep), FrameError::NotAnObject("array"));
        let unbalanced = "[".repeat(100_000);
        assert!(matches!(err(&unbalanced), FrameError::InvalidJson(_)));
    }
}
