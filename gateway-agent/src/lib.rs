//! `wsmb-agent`: the home half of the bundle. It receives SMS jobs from the broker's `sms`
//! channel and sends them through GSM modems with AT commands, never losing one.
//!
//! Where things live:
//! - [`at`]: the AT engine (one command at a time, deadlines, URCs, the `> ` prompt).
//! - [`pdu`]: text to SMS-SUBMIT PDUs (GSM 7-bit / UCS-2, concatenation) and back.

#![forbid(unsafe_code)]

pub mod at;
pub mod config;
pub mod jobs;
pub mod modem;
pub mod pdu;
pub mod sim;
pub mod store;
