//! What the agent knows about its own health, in one place: each modem's counters (kept by the
//! dispatcher), state and radio (from the modem actors), the job store's backlog, and the
//! broker link (kept by the link). It becomes the heartbeat the link sends to the broker
//! ([`Board::heartbeat`]) and the Prometheus metrics served on a loopback port
//! ([`serve_metrics`], off unless `agent.metrics_listen` is set).
//!
//! The metrics endpoint is a few lines of HTTP/1.1 over a TCP listener: one path, `GET` only,
//! the request head bounded in size and time, a bounded number of connections; an HTTP
//! server crate would add more to the Pi's binary than this does.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wsmb_common::metrics::Snapshot;
use wsmb_protocol::sms::{AgentHealth, ModemHealth, Status, StatusEvent};

use crate::modem::{Health, ModemHandle, ModemView};
use crate::store::Store;

/// Least time between two heartbeats that [`Board::report_soon`] brings forward (busy
/// modems do not turn heartbeats into a stream).
pub const MIN_BEAT_SPACING: Duration = Duration::from_secs(5);

/// Longest request head the metrics endpoint reads.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Most metrics requests served at once.
const MAX_CLIENTS: usize = 8;

/// One modem's counters since the agent started.
#[derive(Debug, Default)]
pub struct ModemCounters {
    sent: AtomicU64,
    parts: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    /// Epoch seconds of the last job sent; 0: none yet.
    last_sent: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ModemCounters {
    /// A part was accepted by the network.
    pub fn part_sent(&self) {
        self.parts.fetch_add(1, Ordering::Relaxed);
    }

    /// A job went out whole.
    pub fn job_sent(&self, at_secs: u64) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.last_sent.store(at_secs, Ordering::Relaxed);
    }

    /// A job failed for good on this modem.
    pub fn job_failed(&self, why: &str) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.error(why);
    }

    /// An attempt failed and will be retried.
    pub fn retried(&self, why: &str) {
        self.retried.fetch_add(1, Ordering::Relaxed);
        self.error(why);
    }

    fn error(&self, why: &str) {
        let mut e = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        *e = Some(why.chars().take(200).collect());
    }
}

/// The agent's health.
pub struct Board {
    started: Instant,
    modems: Vec<(ModemView, ModemCounters)>,
    broker_up: AtomicBool,
    broker_connects: AtomicU64,
    jobs_received: AtomicU64,
    heartbeats: AtomicU64,
    /// A report was asked for (see [`Board::report_soon`]).
    changed: tokio::sync::Notify,
}

/// `Health` in the words of the protocol: state and reason.
fn state_words(h: &Health) -> (&'static str, Option<String>) {
    match h {
        Health::Starting => ("starting", None),
        Health::Ready => ("ready", None),
        Health::Down(r) => ("down", Some(r.clone())),
        Health::Stopped(r) => ("stopped", Some(r.clone())),
    }
}

impl Board {
    /// A board for these modems.
    pub fn new(modems: &[ModemHandle]) -> Arc<Board> {
        Arc::new(Board {
            started: Instant::now(),
            modems: modems
                .iter()
                .map(|m| (m.view(), ModemCounters::default()))
                .collect(),
            broker_up: AtomicBool::new(false),
            broker_connects: AtomicU64::new(0),
            jobs_received: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// The counters of modem `name`.
    pub fn modem(&self, name: &str) -> Option<&ModemCounters> {
        self.modems
            .iter()
            .find(|(m, _)| m.name == name)
            .map(|(_, c)| c)
    }

    /// The link to the broker came up (true) or went down.
    pub fn broker(&self, up: bool) {
        if up {
            self.broker_connects.fetch_add(1, Ordering::Relaxed);
        }
        self.broker_up.store(up, Ordering::Relaxed);
    }

    /// Something the broker should hear soon happened (a modem changed state, a job was sent
    /// or failed): the next heartbeat goes now rather than at the end of the interval, at
    /// most one every [`MIN_BEAT_SPACING`].
    pub fn report_soon(&self) {
        self.changed.notify_one();
    }

    /// Completes after [`Board::report_soon`] (at once if it was called meanwhile).
    pub async fn report_requested(&self) {
        self.changed.notified().await;
    }

    /// `n` new jobs were stored from the broker.
    pub fn jobs_received(&self, n: u64) {
        self.jobs_received.fetch_add(n, Ordering::Relaxed);
    }

    fn modem_health(&self) -> Vec<ModemHealth> {
        self.modems
            .iter()
            .map(|(m, c)| {
                let (state, reason) = state_words(&m.health());
                let radio = m.radio();
                let last = c.last_sent.load(Ordering::Relaxed);
                ModemHealth {
                    name: m.name.clone(),
                    state: state.to_owned(),
                    reason,
                    signal_dbm: radio.signal_dbm,
                    operator: radio.operator,
                    registration: radio.registration,
                    sent: c.sent.load(Ordering::Relaxed),
                    failed: c.failed.load(Ordering::Relaxed),
                    retried: c.retried.load(Ordering::Relaxed),
                    last_error: c
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                    last_sent: (last > 0).then_some(last),
                }
            })
            .collect()
    }

    /// The heartbeat to send now; `interval` is when the next one is due.
    pub async fn heartbeat(&self, store: &Store, interval: Duration, now_secs: u64) -> StatusEvent {
        let (queued, unpublished) = store.backlog().await.unwrap_or_else(|e| {
            warn!("job store: {e}");
            (0, 0)
        });
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        let mut e = StatusEvent::new("agent", Status::Heartbeat, now_secs);
        e.agent = Some(AgentHealth {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            interval: interval.as_secs(),
            uptime: self.started.elapsed().as_secs(),
            queued,
            unpublished,
            modems: self.modem_health(),
        });
        e
    }

    /// The metrics now, as Prometheus text.
    pub async fn metrics(&self, store: &Store) -> String {
        let mut s = Snapshot::default();
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        s.gauge(
            "uptime_seconds",
            "Seconds since the agent started",
            self.started.elapsed().as_secs() as i64,
        );
        s.gauge(
            "broker_connected",
            "1 while the link to the broker is up",
            i64::from(self.broker_up.load(Ordering::Relaxed)),
        );
        s.counter(
            "broker_connections",
            "Connections made to the broker",
            n(&self.broker_connects),
        );
        s.counter(
            "jobs_received",
            "Jobs received from the broker and stored",
            n(&self.jobs_received),
        );
        s.counter(
            "heartbeats",
            "Heartbeats sent to the broker",
            n(&self.heartbeats),
        );
        match store.backlog().await {
            Ok((queued, unpublished)) => {
                s.gauge(
                    "jobs_queued",
                    "Jobs stored and not finished (waiting, being sent, retrying)",
                    queued as i64,
                );
                s.gauge(
                    "unpublished",
                    "Status events and received SMS not yet taken by the broker",
                    unpublished as i64,
                );
            }
            Err(e) => warn!("job store: {e}"),
        }
        let health = self.modem_health();
        let label = |m: &ModemHealth| vec![("modem", m.name.clone())];
        for m in &health {
            for st in ["starting", "ready", "down", "stopped"] {
                let mut l = label(m);
                l.push(("state", st.into()));
                s.gauge_with(
                    "modem_state",
                    "1 for the modem's current state",
                    l,
                    i64::from(m.state == st),
                );
            }
        }
        for m in &health {
            let registered = wsmb_protocol::sms::is_registered(m.registration.as_deref());
            s.gauge_with(
                "modem_registered",
                "1 when the modem is registered on a network (home or roaming)",
                label(m),
                i64::from(registered),
            );
        }
        for m in &health {
            // Words as labels of a constant 1 (the Prometheus "info" idiom): one series per
            // modem at a time, replaced when a word changes.
            let mut l = label(m);
            l.push(("operator", m.operator.clone().unwrap_or_default()));
            l.push(("registration", m.registration.clone().unwrap_or_default()));
            l.push(("last_error", m.last_error.clone().unwrap_or_default()));
            s.gauge_with(
                "modem_info",
                "The modem's operator, registration and last error, as labels",
                l,
                1,
            );
        }
        for m in health.iter().filter(|m| m.signal_dbm.is_some()) {
            s.gauge_with(
                "modem_signal_dbm",
                "Signal, dBm (AT+CSQ, read at each idle check)",
                label(m),
                i64::from(m.signal_dbm.unwrap_or_default()),
            );
        }
        for m in &health {
            s.counters_by(
                "sms",
                "Jobs through the modem: sent, failed for good, attempts retried",
                &label(m),
                "outcome",
                [
                    ("sent", m.sent),
                    ("failed", m.failed),
                    ("retried", m.retried),
                ],
            );
        }
        for (m, c) in &self.modems {
            s.counter_with(
                "sms_parts_sent",
                "SMS parts accepted by the network",
                vec![("modem", m.name.clone())],
                n(&c.parts),
            );
        }
        for m in health.iter().filter(|m| m.last_sent.is_some()) {
            s.gauge_with(
                "modem_last_sent_timestamp_seconds",
                "When the modem last sent a job (epoch seconds)",
                label(m),
                m.last_sent.unwrap_or_default() as i64,
            );
        }
        s.render("wsmb_agent")
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    board: Arc<Board>,
    store: Store,
    shutdown: CancellationToken,
) {
    if let Ok(a) = listener.local_addr() {
        info!("metrics on http://{a}/metrics");
    }
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    warn!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            debug!("metrics: too many clients, one refused");
            continue;
        };
        let board = Arc::clone(&board);
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &board, &store).await {
                debug!("metrics request: {e}");
            }
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, board: &Board, store: &Store) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return Err(std::io::Error::other(
                    "incomplete or oversized request head",
                ));
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::other("no request head in time"))??;
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            wsmb_common::metrics::CONTENT_TYPE,
            board.metrics(store).await,
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: the metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_owned(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        out.push_str(&body);
    }
    tokio::time::timeout(HEAD_TIMEOUT, stream.write_all(out.as_bytes()))
        .await
        .map_err(|_| std::io::Error::other("write timed out"))??;
    let _ = stream.shutdown().await;
    Ok(())
}
