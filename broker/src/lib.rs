//! `wsmb-broker`: a lightweight WebSocket message broker that today's WSMessageBrocker clients
//! use unchanged.
//!
//! Where things live:
//! - [`config`]: the TOML configuration, defaults, validation.
//! - [`auth`]: htpasswd users (`{SHA}`, `$apr1$`, bcrypt), constant-time checks, reloading.
//! - [`http`]: the request head, routing to WebSocket, `/healthz` or an HTTP error.
//! - [`conn`]: one connection: welcome timing, reading frames, writing in batches, closing.
//! - [`router`]: channels, receivers, fair choice of receivers (memory mode).
//! - [`storage`]: the database (SQLite, MariaDB/MySQL, PostgreSQL), group commit.
//! - [`durable`]: delivery of stored messages: acknowledgements, redelivery, expiry.
//! - [`server`]: accept loop, shared state, graceful shutdown.
//! - [`cli`]: the `wsmb-broker` command line.
//!
//! The wire format itself lives in the `wsmb-protocol` crate.

#![forbid(unsafe_code)]

pub mod auth;
pub mod cli;
pub mod config;
pub mod conn;
pub mod durable;
pub mod http;
pub mod router;
pub mod server;
pub mod storage;

pub use config::Config;
pub use server::{Running, start, start_on};
