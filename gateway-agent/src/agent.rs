//! The daemon: store, modems, dispatcher and broker link wired together.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
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
    let modems: Vec<_> = cfg
        .modems
        .iter()
        .map(|m| modem::spawn(m.settings()))
        .collect();
    let shutdown = CancellationToken::new();
    let wake = Arc::new(Notify::new());
    let (link_tx, link_rx) = watch::channel(LinkState::Down("starting".into()));
    let dispatcher = tokio::spawn(dispatch::run(
        store.clone(),
        Arc::clone(&cfg),
        modems.clone(),
        Arc::clone(&wake),
        shutdown.clone(),
    ));
    let link = tokio::spawn(link::run(
        Arc::clone(&cfg),
        store.clone(),
        wake,
        link_tx,
        shutdown.clone(),
    ));
    let task = tokio::spawn(async move {
        let _ = dispatcher.await;
        let _ = link.await;
    });
    Ok(Running {
        store,
        link: link_rx,
        modems,
        shutdown,
        task,
    })
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
    stop.await;
    info!("stopping: finishing the sends in progress (at most {grace:?})");
    running.shutdown.cancel();
    let _ = tokio::time::timeout(grace, running.task).await;
    info!("stopped");
    Ok(())
}
