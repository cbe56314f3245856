//! The WSMB wire protocol: every frame the broker, the gateway agent and their clients exchange.
//!
//! The protocol is the one of the legacy PHP broker (WSMessageBrocker), kept byte for byte where
//! its clients depend on it, plus backward-compatible additions. `docs/protocol.md` describes it
//! for humans; this crate is the single place where it exists as code. Neither the broker nor the
//! agent builds or parses JSON frames anywhere else.
//!
//! Layout:
//! - [`codes`]: the `response_code` values and their texts.
//! - [`client`]: frames a client sends (`send-message`, `receive-message`, `ping`), parsed in one
//!   pass without copying, with a precise error for every malformed input.
//! - [`reply`]: frames the broker sends back (`connect`, `send-result`, `error`).
//! - [`frames`]: building the frames a client sends.
//! - [`gsm7`], [`segments`]: the GSM 7-bit alphabet and how a text splits into SMS parts.
//! - [`sms`]: the SMS gateway's payloads: jobs on `sms`, status events on `sms-status`.
//! - [`time`]: the legacy timestamp format.
//!
//! No I/O happens here.

#![forbid(unsafe_code)]

pub mod client;
pub mod codes;
pub mod frames;
pub mod gsm7;
pub mod reply;
pub mod segments;
pub mod sms;
pub mod time;

pub use client::{ClientFrame, Command, FrameError, ItemId, parse_client_frame};
pub use codes::ResponseCode;
