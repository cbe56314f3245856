//! The accept loop, shared state, credential and certificate reloading and graceful shutdown.
//!
//! [`run`] takes an already-bound listener (tests bind `127.0.0.1:0`) and a shutdown token; it
//! returns once every connection has been closed with 1001 and its queue flushed, or after
//! `shutdown_timeout`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::auth::{Authenticator, CredentialSources};
use crate::config::Config;
use crate::delivery::{DeliveryConfig, Engine};
use crate::state::Shared;
use crate::stats::Stats;

/// Accepts connections until `shared.shutdown` is cancelled, then waits for them to close.
pub async fn run(listener: TcpListener, shared: Arc<Shared>, tls: Option<Arc<crate::tls::Tls>>) {
    let cfg = &shared.config.server;
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
        // Banned, over its address's cap, or no room among the connections still
        // authenticating: refused before any work (see `guard`).
        let admission = match shared.guard.admit(peer.ip()) {
            Ok(a) => a,
            Err(why) => {
                shared
                    .stats
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                match why {
                    crate::guard::Refusal::Banned(_) => debug!(%peer, "refused: {why}"),
                    _ => warn!(%peer, "connection refused: {why}"),
                }
                tracker.spawn(refuse(stream, why));
                continue;
            }
        };
        let id = shared.next_conn();
        let sh = Arc::clone(&shared);
        let tls = tls.clone();
        tracker.spawn(async move {
            sh.stats.connections_open.fetch_add(1, Ordering::Relaxed);
            sh.stats.connections_total.fetch_add(1, Ordering::Relaxed);
            match tls {
                None => crate::conn::handle(stream, peer, Arc::clone(&sh), id, admission).await,
                Some(tls) => match tls.accept(stream, sh.config.server.handshake_timeout).await {
                    Ok(plain) => {
                        crate::conn::handle(plain, peer, Arc::clone(&sh), id, admission).await
                    }
                    Err(e) => info!(conn = id, %peer, "{e}"),
                },
            }
            sh.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
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

async fn refuse(mut stream: tokio::net::TcpStream, why: crate::guard::Refusal) {
    let (status, reason) = match why {
        crate::guard::Refusal::Banned(_) => {
            // Nothing more for a banned address than closing.
            return;
        }
        _ => (503, "Service Unavailable"),
    };
    let resp = crate::http::text_response(
        status,
        reason,
        "Retry-After: 5\r\n",
        &format!("{why}"),
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
/// SIGHUP, and with them the `[permissions]` of the config file `config` (when there is one).
/// A load that fails is logged and the previous users (or rules) stay in force.
pub fn spawn_credentials_watcher(
    shared: &Arc<Shared>,
    sources: CredentialSources,
    config: Option<PathBuf>,
    interval: Duration,
) {
    let auth = Arc::clone(&shared.auth);
    let stats = Arc::clone(&shared.stats);
    let shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("cannot listen for SIGHUP ({e}); credentials reload on file change only");
                None
            }
        };
        let watched: Vec<PathBuf> = sources
            .watched_files()
            .iter()
            .cloned()
            .chain(config.iter().cloned())
            .collect();
        let mut seen = fingerprint(&watched);
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
            let now = fingerprint(&watched);
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
                Ok(Err(e)) => {
                    stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                    error!("credentials reload failed, keeping the previous users: {e}")
                }
                Err(e) => {
                    stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                    error!("credentials reload failed: {e}")
                }
            }
            if let Some(path) = &config {
                match crate::config::Config::reload_permissions(path) {
                    Ok(rules) => {
                        info!(
                            "permissions reloaded: rules for {} user(s), others: {:?}",
                            rules.users.len(),
                            rules.default
                        );
                        auth.replace_permissions(rules);
                    }
                    Err(e) => {
                        stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                        error!("permissions reload failed, keeping the previous rules: {e}")
                    }
                }
            }
        }
    });
}

/// Reads the TLS certificate and key again on SIGHUP (`systemctl reload`); new connections get
/// the new certificate, open ones keep theirs.
fn spawn_tls_reloader(shared: &Arc<Shared>, tls: Arc<crate::tls::Tls>) {
    let shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot listen for SIGHUP ({e}); the TLS certificate is read at start only");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = hup.recv() => if r.is_none() { return },
            }
            let t = Arc::clone(&tls);
            match tokio::task::spawn_blocking(move || t.reload()).await {
                Ok(Ok(())) => info!("TLS certificate reloaded (SIGHUP)"),
                Ok(Err(e)) => {
                    error!("TLS certificate reload failed, keeping the previous one: {e}")
                }
                Err(e) => error!("TLS certificate reload failed: {e}"),
            }
        }
    });
}

/// One task for every session: pings each every `ping_interval`, drops those silent for
/// `dead_peer_timeout`, and on shutdown asks each to close with 1001 once its queue is written.
fn spawn_keepalive(shared: &Arc<Shared>) {
    let sh = Arc::clone(shared);
    tokio::spawn(async move {
        let cfg = &sh.config.server;
        let every = if cfg.ping_interval.is_zero() {
            Duration::from_secs(3600 * 24 * 365)
        } else {
            cfg.ping_interval
        };
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sh.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            for (id, ob) in sh.sessions.all() {
                let silent = ob.silent_for();
                if silent > cfg.dead_peer_timeout {
                    info!(
                        conn = id,
                        "no frame from the peer for {silent:?}: dropping it"
                    );
                    sh.stats.dead_peers.fetch_add(1, Ordering::Relaxed);
                    ob.stop(crate::outbox::Stop::Quit);
                } else {
                    let _ = ob.try_push(crate::outbox::Out {
                        frame: crate::ws::Frame::Ping,
                        counted: 0,
                        token: None,
                    });
                }
            }
        }
        for (_, ob) in sh.sessions.all() {
            ob.stop(crate::state::CLOSE_ON_SHUTDOWN);
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
    if config.permissions.is_empty() {
        if config.permissions.default == crate::auth::permissions::DefaultAccess::All {
            warn!(
                "no [permissions] rules: every user may send and receive on every channel \
                 (permissions.default = \"all\"); give the application and the agent only what \
                 they need (docs/security.md)"
            );
        }
    } else {
        info!(
            "permissions: rules for {} user(s), others: {:?}",
            config.permissions.users.len(),
            config.permissions.default
        );
    }
    auth.replace_permissions(config.permissions.clone());
    let interval = config.credentials.reload_interval;
    let store = if config.storage.backend == crate::config::Backend::Memory {
        None
    } else {
        let st = crate::storage::Storage::open(&config.storage, &config.storage.node).await?;
        info!("storage: {:?}", config.storage.backend);
        Some(st)
    };
    let tls = if config.tls.enabled() {
        let (cert, key) = (config.tls.cert_file.clone(), config.tls.key_file.clone());
        let t = tokio::task::spawn_blocking(move || crate::tls::Tls::new(&cert, &key))
            .await?
            .map_err(|e| anyhow::anyhow!(e))?;
        info!("TLS: certificate {}", config.tls.cert_file.display());
        Some(Arc::new(t))
    } else {
        None
    };
    let shutdown = CancellationToken::new();
    let stats = Arc::new(Stats::default());
    let engine = Engine::new(
        DeliveryConfig::from_config(&config),
        store,
        Arc::clone(&stats),
        shutdown.clone(),
    );
    let sms = if config.sms.enabled {
        Some(crate::sms::Service::start(&config, Arc::clone(&engine), shutdown.clone()).await?)
    } else {
        None
    };
    let config_path = config.path.clone();
    let shared = Shared::new(Arc::new(config), auth, engine, stats, shutdown, sms);
    spawn_credentials_watcher(&shared, sources, config_path, interval);
    spawn_keepalive(&shared);
    crate::status::spawn_sampler(&shared);
    if let Some(t) = &tls {
        spawn_tls_reloader(&shared, Arc::clone(t));
    }
    let addr = listener.local_addr()?;
    let task = tokio::spawn(run(listener, Arc::clone(&shared), tls));
    Ok(Running { addr, shared, task })
}
