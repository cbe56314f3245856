//! `wsmb-broker`: a lightweight WebSocket message broker that today's WSMessageBrocker clients
//! use unchanged.
//!
//! Where things live (a message's path: `conn` reads it, `delivery` routes and stores it,
//! `outbox` queues it for each receiver, `conn` writes it):
//! - [`config`]: the TOML configuration, defaults, validation.
//! - [`auth`]: htpasswd users (`{SHA}`, `$apr1$`, bcrypt), constant-time checks, reloading.
//! - [`guard`]: defences against abuse by address and user: connection budgets and caps,
//!   failed-login delays and bans, request rates.
//! - [`http`]: the request head, routing to WebSocket, `/healthz` or an HTTP error.
//! - [`api`]: the HTTP SMS API under `/3rdparty/v1` (session side: requests, responses).
//! - [`ws`]: RFC 6455 framing (reading client frames, writing server frames), no buffers held
//!   while idle.
//! - [`conn`]: the session: one connection from the handshake to the close; welcome timing,
//!   commands, replies in order, writing with deadlines.
//! - [`outbox`]: a connection's outgoing queue, bounded in count and bytes; shared by the
//!   session and the delivery engine, importing neither.
//! - [`delivery`]: the delivery engine: channels, receivers, rotation and receiver limits,
//!   memory and durable backends, acknowledgements, expiry.
//! - [`sms`]: the SMS service: message states, jobs from the API and over WebSocket, status
//!   events, gateways, webhooks (durable, signed).
//! - [`storage`]: the database (SQLite, MariaDB/MySQL, PostgreSQL), claims, group commit.
//! - [`tls`]: the broker's own TLS listener, certificates reloaded on SIGHUP.
//! - [`state`], [`stats`]: what every connection shares; counters.
//! - [`metrics`]: the counters in the Prometheus text format (`/metrics`).
//! - [`status`]: the status page (`/status`): page, script, figures, the per-minute sampler.
//! - [`server`]: accept loop, start-up, credential reloading, graceful shutdown.
//! - [`cli`]: the `wsmb-broker` command line.
//!
//! Imports go one way: `server` → `conn` → `api` → `sms` → `delivery` → `storage`; `outbox`
//! and `ws` are leaves. The wire format itself lives in the `wsmb-protocol` crate.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod conn;
pub mod delivery;
pub mod guard;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod server;
pub mod sms;
pub mod state;
pub mod stats;
pub mod status;
pub mod storage;
pub mod tls;
pub mod ws;

pub use config::Config;
pub use server::{Running, start, start_on};
