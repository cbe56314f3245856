//! The accept loop, shared state, credential reloading and graceful shutdown.
//!
//! [`run`] takes an already-bound listener (tests bind `127.0.0.1:0`) and a shutdown token; it
//! returns once every connection has been closed with 1001 and its queue flushed, or after
//! `shutdown_timeout`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::auth::{Authenticator, CredentialSources};
use crate::config::Config;
use crate::router::Router;

/// Counters, exposed on `/healthz` (and later as metrics).
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
    /// Messages queued to receivers (one per receiver).
    pub deliveries: AtomicU64,
    /// `send-message` frames that reached no receiver.
    pub unrouted: AtomicU64,
    /// Frames answered with an `error`.
    pub rejected_frames: AtomicU64,
    /// Receivers closed for a full queue.
    pub slow_consumers: AtomicU64,
    /// Connections dropped after `dead_peer_timeout` of silence.
    pub dead_peers: AtomicU64,
}

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

/// State shared by every connection.
pub struct Shared {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Channels and receivers.
    pub router: Router,
    /// Credentials.
    pub auth: Arc<Authenticator>,
    /// Counters.
    pub stats: Stats,
    /// Cancelled on SIGTERM/SIGINT (or by a test).
    pub shutdown: CancellationToken,
    /// Message id generator.
    pub message_ids: MessageIds,
    /// The database (every backend but `memory`).
    pub storage: Option<Arc<crate::storage::Storage>>,
    /// Delivery of stored messages (with `storage`).
    pub engine: Option<crate::durable::Engine>,
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
}

impl Shared {
    /// Shared state for `config`, authenticating with `auth` (memory mode).
    pub fn new(config: Config, auth: Arc<Authenticator>, shutdown: CancellationToken) -> Arc<Self> {
        Self::with_storage(config, auth, shutdown, None)
    }

    /// Shared state with an opened database.
    pub fn with_storage(
        config: Config,
        auth: Arc<Authenticator>,
        shutdown: CancellationToken,
        storage: Option<Arc<crate::storage::Storage>>,
    ) -> Arc<Self> {
        let engine = storage
            .as_ref()
            .map(|st| crate::durable::Engine::start(Arc::clone(st), config.storage.clone()));
        Arc::new(Shared {
            storage,
            engine,
            config: Arc::new(config),
            router: Router::default(),
            auth,
            stats: Stats::default(),
            shutdown,
            message_ids: MessageIds::default(),
            started: Instant::now(),
            next_conn: AtomicU64::new(1),
        })
    }

    /// The `/healthz` body.
    pub fn health_json(&self) -> String {
        let (receivers, channels) = self.router.totals();
        let storage_health = self.storage.as_ref().map(|s| s.health());
        let h = Health {
            status: if self.shutdown.is_cancelled() {
                "stopping"
            } else if matches!(storage_health, Some(Err(_))) {
                "degraded"
            } else {
                "ok"
            },
            storage: match (&self.storage, &storage_health) {
                (None, _) => "memory".into(),
                (Some(_), Some(Err(e))) => format!("down: {e}"),
                (Some(st), _) => format!("{:?}", st.backend()).to_lowercase(),
            },
            stored: self.storage.as_ref().map_or(0, |s| s.stored()),
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            connections: self.stats.connections_open.load(Ordering::Relaxed),
            receivers,
            channels,
            users: self.auth.user_count(),
            messages_in: self.stats.messages_in.load(Ordering::Relaxed),
            deliveries: self.stats.deliveries.load(Ordering::Relaxed),
            unrouted: self.stats.unrouted.load(Ordering::Relaxed),
        };
        serde_json::to_string(&h).unwrap_or_else(|_| "{\"status\":\"ok\"}".into())
    }
}

/// Accepts connections until `shared.shutdown` is cancelled, then waits for them to close.
pub async fn run(listener: TcpListener, shared: Arc<Shared>) {
    let cfg = &shared.config.server;
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shared.shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            shared
                .stats
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            warn!(%peer, "connection limit ({}) reached: refusing", cfg.max_connections);
            tracker.spawn(refuse(stream));
            continue;
        };
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let sh = Arc::clone(&shared);
        tracker.spawn(async move {
            sh.stats.connections_open.fetch_add(1, Ordering::Relaxed);
            sh.stats.connections_total.fetch_add(1, Ordering::Relaxed);
            crate::conn::handle(stream, peer, Arc::clone(&sh), id).await;
            sh.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    let open = shared.stats.connections_open.load(Ordering::Relaxed);
    info!("shutting down: closing {open} connection(s)");
    let limit = cfg.shutdown_timeout + Duration::from_secs(3);
    if tokio::time::timeout(limit, tracker.wait()).await.is_err() {
        warn!("some connections did not close within {limit:?}");
    }
}

async fn refuse(mut stream: tokio::net::TcpStream) {
    let resp = crate::http::text_response(
        503,
        "Service Unavailable",
        "Retry-After: 5\r\n",
        "too many connections (server.max_connections); retry later",
        false,
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        crate::http::send_and_close(&mut stream, &resp),
    )
    .await;
}

type Fingerprint = Vec<Option<(SystemTime, u64, u64)>>;

fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .map(|m| (m.modified().unwrap_or(UNIX_EPOCH), m.len(), m.ino()))
        })
        .collect()
}

/// Reloads the credentials when a file changes (checked every `interval`; zero disables) or on
/// SIGHUP. A load that fails is logged and the previous users stay in force.
pub fn spawn_credentials_watcher(
    shared: &Arc<Shared>,
    sources: CredentialSources,
    interval: Duration,
) {
    let auth = Arc::clone(&shared.auth);
    let shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("cannot listen for SIGHUP ({e}); credentials reload on file change only");
                None
            }
        };
        let mut seen = fingerprint(sources.watched_files());
        let poll = if interval.is_zero() {
            Duration::from_secs(3600 * 24 * 365)
        } else {
            interval
        };
        loop {
            let forced = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(poll) => false,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            let now = fingerprint(sources.watched_files());
            if !forced && (now == seen || interval.is_zero()) {
                continue;
            }
            seen = now;
            let src = sources.clone();
            match tokio::task::spawn_blocking(move || src.load()).await {
                Ok(Ok((table, warnings))) => {
                    for w in warnings {
                        warn!("{w}");
                    }
                    info!(
                        "credentials reloaded ({}): {} user(s) ({})",
                        if forced { "SIGHUP" } else { "file changed" },
                        table.len(),
                        table.kinds()
                    );
                    auth.replace_table(table);
                }
                Ok(Err(e)) => error!("credentials reload failed, keeping the previous users: {e}"),
                Err(e) => error!("credentials reload failed: {e}"),
            }
        }
    });
}

/// A broker running in this process (tests, embedding).
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    /// Shared state (counters, shutdown token).
    pub shared: Arc<Shared>,
    /// Completes when the server has shut down.
    pub task: tokio::task::JoinHandle<()>,
}

/// Loads credentials, binds `config.server.listen` and starts serving in the background.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let listener = TcpListener::bind(config.listen_addr()?).await?;
    start_on(listener, config).await
}

/// Like [`start`] with an already-bound listener.
pub async fn start_on(listener: TcpListener, config: Config) -> anyhow::Result<Running> {
    let sources = config.credential_sources();
    let src = sources.clone();
    let (table, warnings) = tokio::task::spawn_blocking(move || src.load()).await??;
    for w in warnings {
        warn!("{w}");
    }
    info!("{} user(s) loaded ({})", table.len(), table.kinds());
    let auth = Arc::new(Authenticator::new(table, config.auth_tuning()));
    let interval = config.credentials.reload_interval;
    let storage = if config.storage.backend == crate::config::Backend::Memory {
        None
    } else {
        let st = crate::storage::Storage::open(&config.storage).await?;
        info!("storage: {:?}", config.storage.backend);
        Some(st)
    };
    let shared = Shared::with_storage(config, auth, CancellationToken::new(), storage);
    if let (Some(st), Some(engine)) = (&shared.storage, &shared.engine) {
        let (st, engine) = (Arc::clone(st), engine.clone());
        let load = async move {
            let rows = st.load_all().await;
            if !rows.is_empty() {
                info!("{} stored message(s) to deliver", rows.len());
            }
            engine.send(crate::durable::Cmd::Load(rows));
        };
        if shared.storage.as_ref().is_some_and(|s| s.health().is_ok()) {
            // Loaded before the first connection is accepted.
            load.await;
        } else {
            // A database that is down at start-up: serve live traffic meanwhile, load when it
            // comes back.
            tokio::spawn(load);
        }
    }
    spawn_credentials_watcher(&shared, sources, interval);
    let addr = listener.local_addr()?;
    let task = tokio::spawn(run(listener, Arc::clone(&shared)));
    Ok(Running { addr, shared, task })
}
