//! The daemon: store, modems, dispatcher and broker link wired together.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::health::Board;
use crate::link::LinkState;
use crate::store::Store;
use crate::{dispatch, link, modem};

/// A running agent (for tests and embedding).
pub struct Running {
    /// The job store.
    pub store: Store,
    /// The broker link's state.
    pub link: watch::Receiver<LinkState>,
    /// The modems.
    pub modems: Vec<modem::ModemHandle>,
    /// The agent's health (heartbeat, metrics).
    pub board: Arc<Board>,
    /// Where the metrics are served (`agent.metrics_listen`), when they are.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Cancel to stop.
    pub shutdown: CancellationToken,
    /// Completes when the agent has stopped.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the agent in the background.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let cfg = Arc::new(cfg);
    let store = Store::open(&cfg.agent.state_dir)?;
    let (requeued, ambiguous) = store.recover(cfg.agent.retry_ambiguous).await?;
    if requeued + ambiguous > 0 {
        info!("recovered after a restart: {requeued} job(s) queued again, {ambiguous} ambiguous");
    }
    let counts = store.counts().await?;
    info!("job store {}: {counts:?}", cfg.agent.state_dir.display());
    let (incoming_tx, incoming_rx) = tokio::sync::mpsc::channel(64);
    let modems: Vec<_> = cfg
        .modems
        .iter()
        .map(|m| {
            let mut s = m.settings();
            s.inbox_sweep = cfg.agent.inbox_sweep;
            modem::spawn_with(s, Some(incoming_tx.clone()))
        })
        .collect();
    drop(incoming_tx);
    let board = Board::new(&modems);
    // Bound before anything runs: a port in use stops the start with the reason.
    let metrics = if cfg.agent.metrics_listen.is_empty() {
        None
    } else {
        let l = tokio::net::TcpListener::bind(&cfg.agent.metrics_listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "agent.metrics_listen = {:?}: cannot listen there: {e}",
                    cfg.agent.metrics_listen
                )
            })?;
        Some(l)
    };
    let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
    let shutdown = CancellationToken::new();
    if let Some(l) = metrics {
        tokio::spawn(crate::health::serve_metrics(
            l,
            Arc::clone(&board),
            store.clone(),
            shutdown.clone(),
        ));
    }
    let incoming = tokio::spawn(crate::incoming::run(
        store.clone(),
        incoming_rx,
        cfg.agent.inbox_part_timeout,
        shutdown.clone(),
    ));
    let wake = Arc::new(Notify::new());
    let (link_tx, link_rx) = watch::channel(LinkState::Down("starting".into()));
    let dispatcher = tokio::spawn(dispatch::run(
        store.clone(),
        Arc::clone(&cfg),
        modems.clone(),
        Arc::clone(&board),
        Arc::clone(&wake),
        shutdown.clone(),
    ));
    let link = tokio::spawn(link::run(
        Arc::clone(&cfg),
        store.clone(),
        Arc::clone(&board),
        wake,
        link_tx,
        shutdown.clone(),
    ));
    let task = tokio::spawn(async move {
        let _ = dispatcher.await;
        let _ = link.await;
        let _ = incoming.await;
    });
    Ok(Running {
        store,
        link: link_rx,
        modems,
        board,
        metrics_addr,
        shutdown,
        task,
    })
}

/// Feeds systemd's watchdog (when the unit has `WatchdogSec`) while the agent works: each feed
/// first reads the job store's counts (a store that does not answer within the interval stops
/// the feeding, and systemd restarts the agent), and the status line says what the link and the
/// modems are doing.
fn spawn_watchdog(running: &Running) -> Option<tokio::task::JoinHandle<()>> {
    let every = wsmb_common::systemd::watchdog_interval()?;
    info!("systemd watchdog: feeding every {every:?}");
    let store = running.store.clone();
    let link = running.link.clone();
    let modems = running.modems.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(Ok(counts)) = tokio::time::timeout(every, store.counts()).await else {
                tracing::warn!(
                    "the job store did not answer within {every:?}: not feeding the watchdog"
                );
                continue;
            };
            wsmb_common::systemd::feed_watchdog();
            let link = match &*link.borrow() {
                LinkState::Up => "broker connected".to_owned(),
                LinkState::Down(why) => format!("broker down ({why})"),
            };
            let modems: Vec<String> = modems
                .iter()
                .map(|m| format!("{} {:?}", m.name, m.health()))
                .collect();
            wsmb_common::systemd::status(&format!(
                "{link}; {}; jobs {counts:?}",
                modems.join(", ")
            ));
        }
    }))
}

/// Runs until `stop` resolves, then stops gracefully: no new sends, the parts in flight finish.
pub async fn run(cfg: Config, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let grace = cfg
        .modems
        .iter()
        .map(|m| m.send_timeout + m.prompt_timeout)
        .max()
        .unwrap_or_default()
        + Duration::from_secs(5);
    let running = start(cfg).await?;
    wsmb_common::systemd::ready("job store open, modems and broker link started");
    let watchdog = spawn_watchdog(&running);
    // `systemctl reload`: nothing to reload in place (the broker CA file is read at every
    // connection); without this handler SIGHUP would end the process.
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                info!(
                    "SIGHUP: broker.ca_file is read again at the next connection; \
                     other changes take a restart (systemctl restart wsmb-agent)"
                );
            }
        });
    }
    stop.await;
    wsmb_common::systemd::stopping();
    if let Some(w) = watchdog {
        w.abort();
    }
    info!("stopping: finishing the sends in progress (at most {grace:?})");
    running.shutdown.cancel();
    let _ = tokio::time::timeout(grace, running.task).await;
    info!("stopped");
    Ok(())
}
