//! The link to the broker: receive jobs, publish status events.
//!
//! One WebSocket connection (`ws://` or `wss://`, Basic auth) registered as a protocol-2
//! receiver of the jobs channel, so that it can also publish on the status channel without
//! stopping receiving. Jobs are validated and written to the store before anything else happens
//! with them. Status events are read from the store's outbox and deleted only when the broker's
//! `send-result` for them has arrived, so a dropped connection re-sends them (at least once).
//! The agent pings the broker; silence for two ping intervals drops the connection. Any failure
//! leads to a reconnect with exponential back-off and jitter, capped at `reconnect_max`, forever.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wsmb_protocol::reply::{BrokerReply, Delivery, SEND_RESULT};
use wsmb_protocol::sms::{Status, parse_jobs};
use wsmb_protocol::{ResponseCode, frames};

use crate::config::Config;
use crate::health::{Board, MIN_BEAT_SPACING};
use crate::jobs;
use crate::store::{Ending, Inserted, Store};
use wsmb_common::problem::{Problem, REMIND_EVERY, Say, human};

/// Most status events per published frame.
const BATCH: usize = 50;
/// Most unacknowledged status frames.
const WINDOW: usize = 8;
/// Most jobs the broker may have in flight to this agent (acknowledged mode).
const WINDOW_JOBS: u32 = 32;
/// First wait before status events the broker could not take are sent again; it doubles up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What a reply to a status frame means for its events.
#[derive(Debug, PartialEq, Eq)]
enum StatusReply {
    /// Handled (delivered, stored, or nobody listens on a broker without storage): forget them.
    Taken,
    /// Not taken for now (receivers busy, store full or unavailable): keep them, send again.
    Later(String),
    /// Refused as malformed: sending them again cannot help.
    Refused(String),
}

fn status_reply(r: &BrokerReply) -> StatusReply {
    let why = || {
        let reason = r
            .data
            .first()
            .and_then(|d| d.get("reason"))
            .and_then(|v| v.as_str())
            .unwrap_or("");
        format!("{} {}: {reason}", r.response_code, r.response_text)
    };
    if r.command == "error" {
        return StatusReply::Refused(why());
    }
    match r.code() {
        Some(ResponseCode::Accepted | ResponseCode::NoReceiver) => StatusReply::Taken,
        _ => StatusReply::Later(why()),
    }
}

/// The link's state, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected; the reason of the last failure.
    Down(String),
    /// Connected and receiving.
    Up,
}

/// Validates and stores the jobs of one forwarded frame. Returns how many new jobs were
/// queued, or an error when a job could not be stored (then the frame must not be
/// acknowledged: the broker will offer it again).
///
/// `message_id` is the broker's id of the frame when it came in a `deliver` frame: a job
/// without an id of its own is then named after it (`local-<message_id>.<index>`), so that the
/// same frame delivered again is recognised and not sent twice. Without it (a plain forwarded
/// frame, which no broker delivers twice) such a job gets a random `local-...` id.
pub async fn intake(
    store: &Store,
    cfg: &Config,
    text: &str,
    message_id: Option<&str>,
) -> Result<usize, crate::store::StoreError> {
    let items = match parse_jobs(text) {
        Ok((_, items)) => items,
        Err(e) => {
            warn!("ignoring a frame that carries no jobs: {e}");
            return Ok(0);
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut queued = 0;
    for (index, item) in items.into_iter().enumerate() {
        let result = match item {
            Err(e) => {
                store
                    .refuse(
                        e.id,
                        None,
                        Ending {
                            status: Status::Failed,
                            code: Some("invalid_job".into()),
                            reason: e.reason,
                            ambiguous: false,
                            modem: None,
                        },
                    )
                    .await
            }
            Ok(job) => {
                let id = job.id.clone().unwrap_or_else(|| match message_id {
                    Some(m) => format!("local-{m}.{index}"),
                    None => local_id(),
                });
                let valid = jobs::validate(
                    &id,
                    job.receiver.as_deref(),
                    job.message.as_deref(),
                    job.expiration,
                    now,
                    &cfg.agent,
                )
                .and_then(|v| Ok((v, jobs::modem_for_sim(job.sim, &cfg.modems)?)));
                match valid {
                    Ok((mut valid, modem)) => {
                        valid.priority = job.priority;
                        valid.status_report = job.delivery_report;
                        valid.modem = modem;
                        let r = store.insert(valid).await;
                        if let Ok(Inserted::New) = r {
                            queued += 1;
                        } else if let Ok(Inserted::Duplicate) = r {
                            debug!(job = %id, "duplicate job ignored");
                        }
                        r
                    }
                    Err(refusal) => {
                        info!(job = %id, "refused: {}", refusal.reason);
                        let status = if refusal.code == "expired" {
                            Status::Expired
                        } else {
                            Status::Failed
                        };
                        store
                            .refuse(
                                Some(id),
                                job.receiver.clone(),
                                Ending {
                                    status,
                                    code: Some(refusal.code.to_owned()),
                                    reason: refusal.reason,
                                    ambiguous: false,
                                    modem: None,
                                },
                            )
                            .await
                    }
                }
            }
        };
        if let Err(e) = result {
            // Without the store the job cannot be kept: say so loudly and do not acknowledge;
            // a broker with acknowledged delivery offers it again.
            tracing::error!("could not store a job: {e}");
            return Err(e);
        }
    }
    Ok(queued)
}

/// An id for a job that came without one.
fn local_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    format!(
        "local-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let r = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX);
    d.mul_f64(0.5 + r / 2.0)
}

/// Runs the link until `shutdown`.
pub async fn run(
    cfg: Arc<Config>,
    store: Store,
    board: Arc<Board>,
    wake_dispatcher: Arc<Notify>,
    state: watch::Sender<LinkState>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(500);
    let mut problem = Problem::default();
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = connect(&cfg) => r,
        };
        let reason = match outcome {
            Ok(ws) => {
                match problem.cleared() {
                    Some(over) => info!(
                        url = %cfg.broker.url,
                        "connected to the broker again, after {} away ({} failed attempt(s))",
                        human(over.lasted),
                        over.count
                    ),
                    None => info!(url = %cfg.broker.url, "connected to the broker"),
                }
                backoff = Duration::from_millis(500);
                board.broker(true);
                let r = serve(
                    ws,
                    &cfg,
                    &store,
                    &board,
                    &wake_dispatcher,
                    &state,
                    &shutdown,
                )
                .await;
                board.broker(false);
                if shutdown.is_cancelled() {
                    return;
                }
                r
            }
            Err(e) => e,
        };
        let pause = jitter(backoff);
        match problem.occurred(&reason) {
            Say::Start => warn!(
                url = %cfg.broker.url,
                "broker link down: {reason}{}; reconnecting with growing pauses (up to \
                 broker.reconnect_max), said again only if it changes or every {}",
                link_hint(&reason),
                human(REMIND_EVERY)
            ),
            Say::Remind { since, count } => warn!(
                url = %cfg.broker.url,
                "broker link still down after {} ({count} attempts): {reason}{}",
                human(since),
                link_hint(&reason)
            ),
            Say::Quiet => debug!("broker link down: {reason}; reconnecting in {pause:.1?}"),
        }
        let _ = state.send(LinkState::Down(reason));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        backoff = (backoff * 2).min(cfg.broker.reconnect_max);
    }
}

/// What to check for a broker link that failed with `reason`, as "; ..." (empty when the
/// reason says it already).
fn link_hint(reason: &str) -> &'static str {
    let r = reason.to_lowercase();
    if r.contains("check ") {
        ""
    } else if r.contains("401") || r.contains("unauthorized") || r.contains("password") {
        "; check broker.user and the password (WSMB_PASSWORD) against the broker's htpasswd file"
    } else if r.contains("certificate") || r.contains("tls") {
        "; check the broker's certificate, or broker.ca_file for a private one"
    } else if r.contains("dns") || r.contains("resolve") || r.contains("lookup") {
        "; check the host name in broker.url and the Pi's DNS"
    } else if r.contains("refused") {
        "; the broker's host answers but nothing listens there: check that wsmb-broker runs \
         and the port in broker.url"
    } else if r.contains("timed out") || r.contains("no frame") || r.contains("unreachable") {
        "; check the Pi's network and that the broker's host is up"
    } else if r.contains("403") || r.contains("banned") {
        "; the broker refuses this address for now (repeated failed logins): check the password"
    } else {
        "; check broker.url, the network, and the broker's log (journalctl -u wsmb-broker)"
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(cfg: &Config) -> Result<Ws, String> {
    use base64::Engine as _;
    let mut req = cfg
        .broker
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad broker URL {}: {e}", cfg.broker.url))?;
    let token = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", cfg.broker.user, cfg.broker.password));
    let header = HeaderValue::from_str(&format!("Basic {token}")).map_err(|_| {
        "the user name or password contains characters a header cannot carry".to_owned()
    })?;
    req.headers_mut().insert("Authorization", header);
    let connecting = tokio_tungstenite::connect_async_tls_with_config(
        req,
        None,
        true,
        crate::tls::connector(&cfg.broker.url, &cfg.broker.ca_file)?,
    );
    let (mut ws, _) = tokio::time::timeout(cfg.broker.connect_timeout, connecting)
        .await
        .map_err(|_| format!("no connection within {:?}", cfg.broker.connect_timeout))?
        .map_err(|e| format!("cannot connect to {}: {e}", cfg.broker.url))?;
    // Register first: the broker then sends `connect` at once instead of after its welcome
    // delay. Acknowledged mode: a broker with a database keeps each job until this agent has
    // stored it; a broker without one (or the legacy broker) simply forwards the frames.
    ws.send(Message::text(frames::receive_message_acked(
        &cfg.broker.channel,
        WINDOW_JOBS,
    )))
    .await
    .map_err(|e| e.to_string())?;
    let first = tokio::time::timeout(cfg.broker.connect_timeout, ws.next())
        .await
        .map_err(|_| "no connect frame from the broker".to_owned())?;
    match first {
        Some(Ok(Message::Text(t))) => match BrokerReply::parse(&t) {
            Some(r) if r.command == "connect" && r.code() == Some(ResponseCode::Accepted) => Ok(ws),
            Some(r) if r.command == "connect" => Err(format!(
                "the broker rejected user {:?} (response {}): check broker.user and WSMB_PASSWORD",
                cfg.broker.user, r.response_code
            )),
            _ => Err(format!("unexpected first frame from the broker: {t}")),
        },
        other => Err(format!("the broker closed the connection: {other:?}")),
    }
}

async fn serve(
    mut ws: Ws,
    cfg: &Config,
    store: &Store,
    board: &Board,
    wake: &Notify,
    state: &watch::Sender<LinkState>,
    shutdown: &CancellationToken,
) -> String {
    let _ = state.send(LinkState::Up);
    // Status frames sent and not yet answered (their events and text, to send again), and
    // those the broker could not take, waiting for `retry_at`.
    let mut inflight: VecDeque<(Vec<i64>, String)> = VecDeque::new();
    let mut retry: VecDeque<(Vec<i64>, String)> = VecDeque::new();
    let mut retry_at = tokio::time::Instant::now();
    let mut retry_backoff = RETRY_FIRST;
    let mut sent_up_to = 0i64;
    let mut ping = tokio::time::interval(cfg.broker.ping_interval);
    ping.reset();
    let mut last_rx = tokio::time::Instant::now();
    // The heartbeat: at once (the broker learns the modems as soon as the agent is back), then
    // every interval. Not stored: one the broker cannot take now is worthless later.
    let beat_every = cfg.agent.heartbeat_interval;
    let mut beat = tokio::time::interval(beat_every.max(Duration::from_secs(1)));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Long enough ago that a first request is answered at once.
    let mut last_beat = tokio::time::Instant::now()
        .checked_sub(MIN_BEAT_SPACING)
        .unwrap_or_else(tokio::time::Instant::now);
    store.poke(); // publish what is pending
    loop {
        // Biased: frames already waiting are read before the silence check runs, so time
        // spent storing a large batch of jobs is not mistaken for a silent broker.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let _ = ws.close(None).await;
                return "shutting down".into();
            }
            m = ws.next() => {
                last_rx = tokio::time::Instant::now();
                match m {
                    Some(Ok(Message::Text(t))) => {
                        if let Some(reply) = BrokerReply::parse(&t) {
                            if reply.command == SEND_RESULT || reply.command == "error" {
                                let Some((seqs, frame)) = inflight.pop_front() else {
                                    warn!("a reply from the broker for nothing sent: {t}");
                                    continue;
                                };
                                if seqs.is_empty() {
                                    // A heartbeat's answer: nothing to keep or send again.
                                    if let StatusReply::Refused(why) | StatusReply::Later(why) = status_reply(&reply) {
                                        debug!("the broker did not take a heartbeat: {why}");
                                    }
                                    continue;
                                }
                                match status_reply(&reply) {
                                    StatusReply::Taken => {
                                        if reply.code() == Some(ResponseCode::NoReceiver) {
                                            debug!("no application listens on {}", cfg.broker.status_channel);
                                        }
                                        retry_backoff = RETRY_FIRST;
                                        if let Err(e) = store.published(seqs).await {
                                            warn!("{e}");
                                        }
                                        store.poke();
                                    }
                                    StatusReply::Later(why) => {
                                        warn!(
                                            "the broker did not take {} status event(s) ({why}); \
                                             sending them again in {retry_backoff:?}",
                                            seqs.len()
                                        );
                                        if retry.is_empty() {
                                            retry_at = tokio::time::Instant::now() + retry_backoff;
                                            retry_backoff = (retry_backoff * 2).min(RETRY_MAX);
                                        }
                                        retry.push_back((seqs, frame));
                                    }
                                    StatusReply::Refused(why) => {
                                        tracing::error!(
                                            "the broker refused a status frame ({why}); its {} event(s) \
                                             are dropped: check broker.status_channel",
                                            seqs.len()
                                        );
                                        if let Err(e) = store.published(seqs).await {
                                            warn!("{e}");
                                        }
                                        store.poke();
                                    }
                                }
                            }
                        } else if let Some(d) = Delivery::parse(&t) {
                            // Acknowledged only once the jobs are stored.
                            match intake(store, cfg, d.frame.get(), Some(&d.message_id)).await {
                                Ok(n) => {
                                    board.jobs_received(n as u64);
                                    if n > 0 {
                                        wake.notify_one();
                                    }
                                    if let Err(e) = ws.send(Message::text(frames::ack(&[&d.message_id]))).await {
                                        return format!("write error: {e}");
                                    }
                                }
                                Err(_) => warn!(message = %d.message_id, "not acknowledged: the broker will offer it again"),
                            }
                        } else if let Ok(n) = intake(store, cfg, &t, None).await {
                            board.jobs_received(n as u64);
                            if n > 0 {
                                wake.notify_one();
                            }
                        }
                    }
                    Some(Ok(Message::Binary(b))) => {
                        if let Ok(t) = std::str::from_utf8(&b) {
                            if let Ok(n) = intake(store, cfg, t, None).await {
                                board.jobs_received(n as u64);
                                if n > 0 {
                                    wake.notify_one();
                                }
                            }
                        }
                    }
                    Some(Ok(Message::Close(c))) => return format!("the broker closed the connection ({c:?})"),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return format!("read error: {e}"),
                    None => return "the broker closed the connection".into(),
                }
            }
            _ = tokio::time::sleep_until(retry_at), if !retry.is_empty() && inflight.len() < WINDOW => {
                if let Some((seqs, frame)) = retry.pop_front() {
                    if let Err(e) = ws.send(Message::text(frame.clone())).await {
                        return format!("write error: {e}");
                    }
                    inflight.push_back((seqs, frame));
                }
            }
            _ = store.changed(), if inflight.len() < WINDOW && retry.is_empty() => {
                match store.outbox(sent_up_to, BATCH).await {
                    Ok((kind, events)) if !events.is_empty() => {
                        let seqs: Vec<i64> = events.iter().map(|(s, _)| *s).collect();
                        // Forwarded as stored, byte for byte.
                        let items: Vec<Box<serde_json::value::RawValue>> = events
                            .iter()
                            .filter_map(|(_, e)| serde_json::value::RawValue::from_string(e.clone()).ok())
                            .collect();
                        let channel = if kind == crate::store::OUT_INBOX {
                            &cfg.broker.inbox_channel
                        } else {
                            &cfg.broker.status_channel
                        };
                        let frame = frames::send_message(channel, &items);
                        if let Err(e) = ws.send(Message::text(frame.clone())).await {
                            return format!("write error: {e}");
                        }
                        sent_up_to = seqs.iter().copied().max().unwrap_or(sent_up_to);
                        // More may follow (a full batch, or items of the other channel).
                        store.poke();
                        inflight.push_back((seqs, frame));
                    }
                    Ok(_) => {}
                    Err(e) => warn!("{e}"),
                }
            }
            _ = board.report_requested(), if !beat_every.is_zero() => {
                // Soon, but not closer than MIN_BEAT_SPACING to the last one (nor later than
                // the interval would have it).
                beat.reset_at(last_beat + MIN_BEAT_SPACING.min(beat_every));
            }
            _ = beat.tick(), if !beat_every.is_zero() && inflight.len() < WINDOW => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                last_beat = tokio::time::Instant::now();
                let e = board.heartbeat(store, beat_every, now).await;
                let frame = frames::send_message_ttl(&cfg.broker.status_channel, &[e], beat_every.as_secs());
                if let Err(e) = ws.send(Message::text(frame.clone())).await {
                    return format!("write error: {e}");
                }
                inflight.push_back((Vec::new(), frame));
            }
            _ = ping.tick() => {
                if last_rx.elapsed() > cfg.broker.ping_interval * 2 {
                    return format!("no frame from the broker for {:?}", last_rx.elapsed());
                }
                if let Err(e) = ws.send(Message::Ping(Default::default())).await {
                    return format!("write error: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_replies_that_do_not_take_the_events_keep_them() {
        let r = |t: &str| status_reply(&BrokerReply::parse(t).expect("reply"));
        let ok = r#"{"command":"send-result","response_code":"00","response_text":"Accepted","data":[]}"#;
        assert_eq!(r(ok), StatusReply::Taken);
        let none = r#"{"command":"send-result","response_code":"02","response_text":"No receiver","data":[]}"#;
        assert_eq!(r(none), StatusReply::Taken);
        for code in ["03", "04", "05"] {
            let t = format!(
                r#"{{"command":"send-result","response_code":"{code}","response_text":"x","data":[{{"reason":"why"}}]}}"#
            );
            assert!(
                matches!(r(&t), StatusReply::Later(w) if w.contains("why")),
                "{code}"
            );
        }
        let e = r#"{"command":"error","response_code":"12","response_text":"Invalid channel","data":[{"reason":"bad"}]}"#;
        assert!(matches!(r(e), StatusReply::Refused(_)));
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_delay() {
        let d = Duration::from_secs(10);
        for _ in 0..200 {
            let j = jitter(d);
            assert!(j >= Duration::from_secs(5) && j <= d, "{j:?}");
        }
    }
}
