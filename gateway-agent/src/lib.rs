//! `wsmb-agent`: the home half of the bundle. It receives SMS jobs from the broker's `sms`
//! channel and sends them through GSM modems with AT commands, never losing one.
//!
//! Where things live:
//! - [`config`]: the TOML configuration.
//! - [`link`]: the broker connection (jobs in, status events out, reconnects).
//! - [`tls`]: the trusted certificates and the connector of a `wss://` link.
//! - [`jobs`]: job validation and number normalisation.
//! - [`store`]: the durable job queue and the status outbox (SQLite).
//! - [`dispatch`]: routing jobs to modems, rate limits, retries.
//! - [`modem`]: one actor per modem (initialisation, sending, recovery, what it receives).
//! - [`incoming`]: what the modems receive, into the store (delivery reports matched to jobs).
//! - [`at`]: the AT engine (one command at a time, deadlines, URCs, the `> ` prompt).
//! - [`pdu`]: text to SMS-SUBMIT PDUs (GSM 7-bit / UCS-2, concatenation) and back; received
//!   SMS-DELIVER and SMS-STATUS-REPORT decoded.
//! - [`sim`]: a modem simulator on a pseudo-terminal (tests, demo).
//! - [`agent`]: the daemon; [`cli`]: the command line.

#![forbid(unsafe_code)]

pub mod agent;
pub mod at;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod health;
pub mod incoming;
pub mod jobs;
pub mod link;
pub mod modem;
pub mod pdu;
pub mod quiet;
pub mod sim;
pub mod store;
pub mod tls;
