//! State shared by every connection: the configuration in force, the credentials, the delivery
//! engine, counters, message ids, the shutdown signal, and the registry of live sessions (for
//! keep-alive pings, dead peers and the shutdown close, done by one task for all connections
//! instead of one timer per connection). The session (`conn`) and the server (`server`) both
//! use it; it uses neither.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::delivery::Engine;
use crate::outbox::Outbox;
use crate::stats::Stats;

/// Generates message ids: `<broker start in ms, hex>-<sequence>`, unique across restarts as long
/// as the clock does not go back.
pub struct MessageIds {
    prefix: String,
    seq: AtomicU64,
}

impl Default for MessageIds {
    fn default() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        MessageIds {
            prefix: format!("{ms:x}"),
            seq: AtomicU64::new(1),
        }
    }
}

impl MessageIds {
    /// The next id.
    pub fn next(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// How sessions end on SIGTERM/SIGINT: close 1001 once what is queued is written.
pub const CLOSE_ON_SHUTDOWN: crate::outbox::Stop = crate::outbox::Stop::Close {
    code: crate::ws::close::AWAY,
    reason: "server shutting down",
    drain: true,
};

/// The outboxes of the live WebSocket sessions, by connection id.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<u64, Weak<Outbox>>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Weak<Outbox>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session starts.
    pub fn add(&self, id: u64, outbox: &Arc<Outbox>) {
        self.lock().insert(id, Arc::downgrade(outbox));
    }

    /// A session ended.
    pub fn remove(&self, id: u64) {
        let mut m = self.lock();
        m.remove(&id);
        if m.is_empty() && m.capacity() > 64 {
            m.shrink_to_fit();
        }
    }

    /// The live ones now.
    pub fn all(&self) -> Vec<(u64, Arc<Outbox>)> {
        self.lock()
            .iter()
            .filter_map(|(id, w)| w.upgrade().map(|o| (*id, o)))
            .collect()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// State shared by every connection.
pub struct Shared {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Credentials.
    pub auth: Arc<Authenticator>,
    /// Channels, receivers, stored messages.
    pub engine: Arc<Engine>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Cancelled on SIGTERM/SIGINT (or by a test).
    pub shutdown: CancellationToken,
    /// Message id generator.
    pub message_ids: MessageIds,
    /// Live WebSocket sessions.
    pub sessions: Sessions,
    /// The SMS service (`sms.enabled`).
    pub sms: Option<Arc<crate::sms::Service>>,
    /// Defences against abuse (connection budgets, failed logins, request rates).
    pub guard: Arc<crate::guard::Guard>,
    /// Authenticated WebSocket sessions (`server.max_connections`).
    pub session_slots: Arc<tokio::sync::Semaphore>,
    /// Messages per minute over the last hour (the status page's chart).
    pub history: crate::stats::History,
    started: Instant,
    next_conn: AtomicU64,
}

#[derive(Serialize)]
struct Health<'a> {
    status: &'a str,
    storage: String,
    stored: usize,
    version: &'a str,
    uptime_seconds: u64,
    connections: u64,
    receivers: usize,
    channels: usize,
    users: usize,
    messages_in: u64,
    deliveries: u64,
    unrouted: u64,
    expired: u64,
    redelivered: u64,
}

impl Shared {
    /// Shared state over an engine.
    pub fn new(
        config: Arc<Config>,
        auth: Arc<Authenticator>,
        engine: Arc<Engine>,
        stats: Arc<Stats>,
        shutdown: CancellationToken,
        sms: Option<Arc<crate::sms::Service>>,
    ) -> Arc<Self> {
        let guard = crate::guard::Guard::new(config.server.guard_limits());
        let session_slots = Arc::new(tokio::sync::Semaphore::new(config.server.max_connections));
        Arc::new(Shared {
            guard,
            session_slots,
            config,
            auth,
            engine,
            stats,
            shutdown,
            message_ids: MessageIds::default(),
            sessions: Sessions::default(),
            sms,
            history: crate::stats::History::default(),
            started: Instant::now(),
            next_conn: AtomicU64::new(1),
        })
    }

    /// A new connection id.
    pub fn next_conn(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// The `/healthz` body.
    /// What `/healthz` says without credentials: up, or how not.
    pub fn health_brief(&self) -> String {
        let status = if self.shutdown.is_cancelled() {
            "stopping"
        } else if self.engine.store().is_some_and(|s| s.health().is_err()) {
            "degraded"
        } else {
            "ok"
        };
        format!("{{\"status\":\"{status}\"}}")
    }

    /// What `/healthz` says to a user: the figures too.
    pub fn health_json(&self) -> String {
        self.health().to_string()
    }

    /// The figures of [`Shared::health_json`], as JSON (the status page carries them too).
    pub fn health(&self) -> serde_json::Value {
        let (receivers, channels) = self.engine.totals();
        let store = self.engine.store();
        let storage_health = store.map(|s| s.health());
        let h = Health {
            status: if self.shutdown.is_cancelled() {
                "stopping"
            } else if matches!(storage_health, Some(Err(_))) {
                "degraded"
            } else {
                "ok"
            },
            storage: match (store, &storage_health) {
                (None, _) => "memory".into(),
                (Some(_), Some(Err(e))) => format!("down: {e}"),
                (Some(st), _) => format!("{:?}", st.backend()).to_lowercase(),
            },
            stored: store.map_or(0, |s| s.stored()),
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            connections: self.stats.connections_open.load(Ordering::Relaxed),
            receivers,
            channels,
            users: self.auth.user_count(),
            messages_in: self.stats.messages_in.load(Ordering::Relaxed),
            deliveries: self.stats.deliveries.load(Ordering::Relaxed),
            unrouted: self.stats.unrouted.load(Ordering::Relaxed),
            expired: self.stats.expired.load(Ordering::Relaxed),
            redelivered: self.stats.redelivered.load(Ordering::Relaxed),
        };
        serde_json::to_value(&h).unwrap_or_else(|_| serde_json::json!({"status": "ok"}))
    }
}
