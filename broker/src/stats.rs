//! The broker's counters: plain atomics, bumped on the hot path without locks, read by
//! `/healthz` (and later by metrics).

use std::sync::atomic::AtomicU64;

/// Counters since start.
#[derive(Debug, Default)]
pub struct Stats {
    /// Open WebSocket/HTTP connections.
    pub connections_open: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Connections refused because `max_connections` was reached.
    pub connections_refused: AtomicU64,
    /// Upgrades refused for bad credentials.
    pub auth_rejected: AtomicU64,
    /// `send-message` frames accepted for routing.
    pub messages_in: AtomicU64,
    /// Messages handed to receivers (one per receiver), live or from the store.
    pub deliveries: AtomicU64,
    /// `send-message` frames that reached no receiver and were not stored.
    pub unrouted: AtomicU64,
    /// Frames answered with an `error`.
    pub rejected_frames: AtomicU64,
    /// Receivers closed for a full queue (`slow_receiver = "disconnect"`).
    pub slow_consumers: AtomicU64,
    /// Connections dropped after `dead_peer_timeout` of silence.
    pub dead_peers: AtomicU64,
    /// Connections dropped because a write did not finish within `write_timeout`.
    pub write_timeouts: AtomicU64,
    /// Stored messages expired undelivered.
    pub expired: AtomicU64,
    /// Stored messages handed out again (after a disconnect or an ack timeout).
    pub redelivered: AtomicU64,
    /// Reloads of users or permissions that failed (the previous ones stayed in force).
    pub reload_failures: AtomicU64,
}
