//! Takes due jobs from the store and sends them through the modems.
//!
//! - Routing: the longest `[[route]]` prefix matching the number picks a group (default group
//!   `default`; when no modem has that group, any modem); modems of the group take turns
//!   (round-robin). A job whose first parts went out through a modem finishes on that modem
//!   (phones join parts only from one sender); a job whose `sim` named a modem goes through
//!   that one only (waiting while it is down), and fails if it is no longer configured.
//! - One job at a time per modem; sending limits per modem (parts per minute, hour and day,
//!   counted across restarts). A job that only limited modems could send is reported `held`
//!   once per reason, with the limit and until when; a job that expires while it waits ends
//!   `expired`.
//! - Failures: transient ones are retried with exponential back-off (another modem of the group
//!   takes over at once on the first failure), up to `max_attempts`; permanent ones fail the
//!   job; ambiguous ones fail it with `ambiguous` (or retry when `retry_ambiguous`); SIM trouble
//!   sends the job elsewhere without counting an attempt. A bad job is delayed or failed, never
//!   retried in a loop, so it cannot hold up the queue.
//! - Expiry is checked before every attempt.
//! - Quiet hours (`agent.quiet_hours`, [`crate::quiet`]): a job outside the OTP lane that no
//!   part of has gone yet waits for the window's end, reported `held` with until when.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wsmb_protocol::sms::{Status, StatusEvent};

use crate::config::Config;
use crate::health::Board;
use crate::modem::{FailureClass, Health, ModemHandle, PartOutcome, PartRequest};
use crate::pdu::{self, Address, SubmitOptions};
use crate::store::{Ending, JobRow, Store};

/// The longest retry delay.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(600);

/// A sending limit of a modem: at most `max` parts per `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limit {
    max: u32,
    window_ms: i64,
    /// Its config key, for messages.
    key: &'static str,
}

impl Limit {
    fn words(&self, modem: &str) -> String {
        let per = match self.key {
            "rate_per_minute" => "minute",
            "rate_per_hour" => "hour",
            _ => "day",
        };
        format!(
            "modem {modem} has sent its {} SMS part(s) per {per} ({} = {})",
            self.max, self.key, self.max
        )
    }
}

/// The sending limits of one modem, and when it sent its recent parts (epoch ms, oldest
/// first). Only the longest limited window is kept, so the times are bounded by that limit.
/// Times are wall-clock and kept in the job store: a restart does not reset a day's count.
#[derive(Debug, Default)]
struct Rate {
    limits: Vec<Limit>,
    sent: VecDeque<i64>,
}

impl Rate {
    fn new(per_minute: u32, per_hour: u32, per_day: u32) -> Rate {
        let limits = [
            (per_minute, 60_000, "rate_per_minute"),
            (per_hour, 3_600_000, "rate_per_hour"),
            (per_day, 86_400_000, "rate_per_day"),
        ]
        .into_iter()
        .filter(|(max, _, _)| *max > 0)
        .map(|(max, window_ms, key)| Limit {
            max,
            window_ms,
            key,
        })
        .collect();
        Rate {
            limits,
            sent: VecDeque::new(),
        }
    }

    fn horizon(&self) -> i64 {
        self.limits.iter().map(|l| l.window_ms).max().unwrap_or(0)
    }

    fn purge(&mut self, now: i64) {
        let from = now - self.horizon();
        while self.sent.front().is_some_and(|t| *t <= from) {
            self.sent.pop_front();
        }
    }

    /// None when one more part may go now; else how long until it may (ms) and the limit that
    /// holds it (the one that frees up last).
    fn hold(&mut self, now: i64) -> Option<(i64, Limit)> {
        self.purge(now);
        let mut worst: Option<(i64, Limit)> = None;
        for l in &self.limits {
            let from = now - l.window_ms;
            let first = self.sent.partition_point(|t| *t <= from);
            let in_window = self.sent.len() - first;
            if in_window < l.max as usize {
                continue;
            }
            // The part whose leaving the window makes room for one more.
            let leaving = self.sent[first + in_window - l.max as usize];
            let wait = (leaving + l.window_ms - now).max(1);
            if worst.is_none_or(|(w, _)| wait > w) {
                worst = Some((wait, *l));
            }
        }
        worst
    }

    fn record(&mut self, at: i64) {
        if !self.limits.is_empty() {
            self.sent.push_back(at);
            self.purge(at);
        }
    }
}

struct Slot {
    modem: ModemHandle,
    group: String,
    rate: Arc<Mutex<Rate>>,
    busy: bool,
}

/// What the sending tasks share.
struct Ctx {
    store: Store,
    cfg: Arc<Config>,
    opts: SubmitOptions,
    board: Arc<Board>,
}

/// Runs the dispatcher until `shutdown`; then waits for the parts in flight to finish.
pub async fn run(
    store: Store,
    cfg: Arc<Config>,
    modems: Vec<ModemHandle>,
    board: Arc<Board>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut slots: Vec<Slot> = modems
        .into_iter()
        .map(|m| {
            let mc = cfg.modems.iter().find(|c| c.name == m.name);
            Slot {
                group: mc.map_or_else(|| "default".to_owned(), |c| c.group.clone()),
                rate: Arc::new(Mutex::new(mc.map_or_else(Rate::default, |c| {
                    Rate::new(c.rate_per_minute, c.rate_per_hour, c.rate_per_day)
                }))),
                modem: m,
                busy: false,
            }
        })
        .collect();
    for s in &slots {
        spawn_health_watcher(
            s.modem.name.clone(),
            s.modem.watch(),
            s.modem.radio(),
            store.clone(),
            Arc::clone(&wake),
            Arc::clone(&board),
        );
    }
    let mut routes: Vec<(String, String)> = cfg
        .routes
        .iter()
        .flat_map(|r| r.prefixes.iter().map(|p| (p.clone(), r.group.clone())))
        .collect();
    routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
    // Validated with the configuration; a window that does not parse here is none.
    let quiet = crate::quiet::Window::parse(&cfg.agent.quiet_hours)
        .ok()
        .flatten()
        .map(|w| (w, cfg.agent.quiet_hours.clone()));
    let ctx = Arc::new(Ctx {
        store: store.clone(),
        opts: SubmitOptions {
            status_report: cfg.agent.status_report,
            validity: cfg.validity(),
        },
        cfg,
        board,
    });
    let mut rr: HashMap<String, usize> = HashMap::new();
    let mut running: JoinSet<(usize, String)> = JoinSet::new();
    let mut in_progress: HashSet<String> = HashSet::new();
    // Jobs reported held back (by a sending limit or quiet hours) and why: said once per
    // reason, again when the reason changes (the quiet hours end on a full modem); bounded by
    // the due jobs looked at, and emptied as they go.
    let mut held: HashMap<String, String> = HashMap::new();
    match store
        .recent_sends(crate::store::now_ms() - 86_400_000)
        .await
    {
        Ok(sends) => {
            for (modem, at) in sends {
                if let Some(s) = slots.iter().find(|s| s.modem.name == modem) {
                    if let Ok(mut r) = s.rate.lock() {
                        r.record(at);
                    }
                }
            }
        }
        Err(e) => warn!("cannot read the recent sends (sending limits start from zero): {e}"),
    }

    loop {
        if shutdown.is_cancelled() {
            break;
        }
        // Due jobs no modem can take now (all busy, down or rate-limited) wait for a wake-up
        // (a send finished, a modem changed state, a new job) or a second at most.
        let mut blocked = false;
        match store.due(64).await {
            Ok(due) => {
                for job in due {
                    if in_progress.contains(&job.id) {
                        continue;
                    }
                    if job.expires_at.is_some_and(|e| e <= now_secs()) {
                        // Expired while it waited (for a free modem, or behind a limit): it
                        // ends now, whatever the modems do.
                        expire(&store, &job).await;
                        held.remove(&job.id);
                        continue;
                    }
                    let quiet_hold = quiet.as_ref().and_then(|(w, text)| {
                        (job.priority < wsmb_protocol::sms::PRIORITY_LANE && job.parts_done == 0)
                            .then(|| w.hold(text))
                            .flatten()
                    });
                    if let Some((wait_ms, why)) = quiet_hold {
                        blocked = true;
                        report_held(&store, &mut held, &job, wait_ms, why).await;
                        continue;
                    }
                    let i = match pick(&slots, &routes, &mut rr, &job) {
                        Ok(i) => i,
                        Err(NoModem::Gone(m)) => {
                            gone(&store, &job, &m).await;
                            held.remove(&job.id);
                            continue;
                        }
                        Err(why) => {
                            blocked = true;
                            if let NoModem::Held { wait_ms, why } = why {
                                report_held(&store, &mut held, &job, wait_ms, why).await;
                            }
                            continue;
                        }
                    };
                    held.remove(&job.id);
                    slots[i].busy = true;
                    in_progress.insert(job.id.clone());
                    let ctx = Arc::clone(&ctx);
                    let modem = slots[i].modem.clone();
                    let rate = Arc::clone(&slots[i].rate);
                    let others = alternatives(&slots, i);
                    running.spawn(async move {
                        let id = job.id.clone();
                        send_job(&ctx, &modem, &rate, others, job).await;
                        (i, id)
                    });
                }
            }
            Err(e) => warn!("cannot read the job queue: {e}"),
        }
        let sleep = match store.next_due_ms().await {
            _ if blocked => Duration::from_secs(1),
            Ok(Some(ms)) => {
                let d = ms - crate::store::now_ms();
                Duration::from_millis(d.clamp(20, 5_000) as u64)
            }
            _ => Duration::from_secs(5),
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wake.notified() => {}
            Some(done) = running.join_next() => {
                if let Ok((i, id)) = done {
                    slots[i].busy = false;
                    in_progress.remove(&id);
                }
            }
            _ = tokio::time::sleep(sleep) => {}
        }
        // a modem whose rate limit frees up, or several finished sends: just loop
        while let Some(done) = running.try_join_next() {
            if let Ok((i, id)) = done {
                slots[i].busy = false;
                in_progress.remove(&id);
            }
        }
    }
    if !running.is_empty() {
        info!("waiting for {} send(s) in progress", running.len());
        while running.join_next().await.is_some() {}
    }
}

/// Ends a job whose expiry passed before a modem took it.
async fn expire(store: &Store, job: &JobRow) {
    let end = Ending {
        status: Status::Expired,
        code: Some("expired".into()),
        reason: "the job expired before a modem could send it".into(),
        ambiguous: false,
        modem: job.modem.clone(),
    };
    if let Err(e) = store.finish(&job.id, end).await {
        warn!(job = %job.id, "job store: {e}");
    }
}

/// Ends a job that must go through a modem the configuration no longer has.
async fn gone(store: &Store, job: &JobRow, modem: &str) {
    let reason = if job.parts_done > 0 {
        format!(
            "its first {} part(s) went through modem {modem}, which is no longer configured \
             ([[modem]] sections), and the rest cannot be joined to them from another modem",
            job.parts_done
        )
    } else {
        format!(
            "its sim named modem {modem}, which is no longer configured ([[modem]] sections); \
             send it again"
        )
    };
    warn!(job = %job.id, "failed: {reason}");
    let end = Ending {
        status: Status::Failed,
        code: Some("no_such_modem".into()),
        reason,
        ambiguous: false,
        modem: None,
    };
    if let Err(e) = store.finish(&job.id, end).await {
        warn!(job = %job.id, "job store: {e}");
    }
}

/// Tells (once per hold) that a job waits for a modem's sending limit, and until when.
async fn report_held(
    store: &Store,
    held: &mut HashMap<String, String>,
    job: &JobRow,
    wait_ms: i64,
    why: String,
) {
    if held.get(&job.id) == Some(&why) {
        return;
    }
    held.insert(job.id.clone(), why.clone());
    let until = (crate::store::now_ms() + wait_ms + 999) / 1000;
    info!(job = %job.id, "held back: {why}");
    let mut e = StatusEvent::new(job.id.clone(), Status::Held, now_secs());
    e.receiver = Some(job.receiver.clone());
    e.reason = Some(why);
    e.until = Some(until.max(0) as u64);
    if let Err(err) = store.event(e).await {
        warn!(job = %job.id, "job store: {err}");
    }
}

/// Whether another modem could take a job that just failed on `i`.
fn alternatives(slots: &[Slot], i: usize) -> bool {
    slots
        .iter()
        .enumerate()
        .any(|(j, s)| j != i && s.group == slots[i].group && s.modem.health().is_ready())
}

fn group_of(routes: &[(String, String)], receiver: &str) -> String {
    routes
        .iter()
        .find(|(p, _)| receiver.starts_with(p.as_str()))
        .map_or_else(|| "default".to_owned(), |(_, g)| g.clone())
}

/// Why no modem takes a job now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NoModem {
    /// Busy or down: it goes when one is free or back.
    Wait,
    /// Every modem that could send it has reached a sending limit: it goes in `wait_ms` at the
    /// earliest, for the reason given.
    Held { wait_ms: i64, why: String },
    /// It must go through this modem, which is not configured (any more).
    Gone(String),
}

/// What a modem can do for a job now.
enum Avail {
    Free,
    Busy,
    Down,
    Limited(i64, Limit),
}

fn avail(s: &Slot, now: i64) -> Avail {
    if !s.modem.health().is_ready() {
        return Avail::Down;
    }
    let held = s.rate.lock().map(|mut r| r.hold(now)).unwrap_or(None);
    match held {
        Some((w, l)) => Avail::Limited(w, l),
        None if s.busy => Avail::Busy,
        None => Avail::Free,
    }
}

fn pick(
    slots: &[Slot],
    routes: &[(String, String)],
    rr: &mut HashMap<String, usize>,
    job: &JobRow,
) -> Result<usize, NoModem> {
    let now = crate::store::now_ms();
    let candidates: Vec<usize> = if let Some(m) = &job.modem {
        // continue a partly sent message on the same modem, or the modem its sim named
        match slots.iter().position(|s| &s.modem.name == m) {
            Some(i) => vec![i],
            None => return Err(NoModem::Gone(m.clone())),
        }
    } else {
        let group = group_of(routes, &job.receiver);
        let members: Vec<usize> = (0..slots.len())
            .filter(|i| slots[*i].group == group)
            .collect();
        if members.is_empty() {
            (0..slots.len()).collect()
        } else {
            members
        }
    };
    let group = group_of(routes, &job.receiver);
    let start = if job.modem.is_some() {
        0
    } else {
        rr.get(&group).copied().unwrap_or(0)
    };
    let n = candidates.len();
    let mut fallback = None;
    let mut waiting = false;
    let mut held: Option<(i64, usize, Limit)> = None;
    for k in 0..n {
        let i = candidates[(start + k) % n];
        match avail(&slots[i], now) {
            Avail::Free => {}
            Avail::Busy => {
                waiting = true;
                continue;
            }
            Avail::Down => continue,
            Avail::Limited(w, l) => {
                if held.is_none_or(|(hw, _, _)| w < hw) {
                    held = Some((w, i, l));
                }
                continue;
            }
        }
        if job.modem.is_none()
            && job.last_failed_modem.as_deref() == Some(slots[i].modem.name.as_str())
        {
            fallback.get_or_insert((i, k));
            continue;
        }
        if job.modem.is_none() {
            rr.insert(group, (start + k + 1) % n);
        }
        return Ok(i);
    }
    if let Some((i, k)) = fallback {
        rr.insert(group, (start + k + 1) % n);
        return Ok(i);
    }
    match held {
        Some((wait_ms, i, l)) if !waiting => Err(NoModem::Held {
            wait_ms,
            why: l.words(&slots[i].modem.name),
        }),
        _ => Err(NoModem::Wait),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn retry_delay(cfg: &Config, attempts: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(16));
    cfg.agent
        .retry_delay
        .saturating_mul(factor)
        .min(MAX_RETRY_DELAY)
}

async fn send_job(
    ctx: &Ctx,
    modem: &ModemHandle,
    rate: &Mutex<Rate>,
    alternatives: bool,
    job: JobRow,
) {
    let store = &ctx.store;
    let counters = ctx.board.modem(&modem.name);
    let log_err = |e: crate::store::StoreError| warn!(job = %job.id, "job store: {e}");
    // the job's last word: recorded with its status event, or logged when the store fails
    let finish = async |status, code: &str, reason: String, ambiguous| {
        let end = Ending {
            status,
            code: Some(code.to_owned()),
            reason,
            ambiguous,
            modem: Some(modem.name.clone()),
        };
        let _ = store.finish(&job.id, end).await.map_err(log_err);
    };
    // back to the queue, not before `delay_ms`, away from this modem when there is another
    let retry = async |delay_ms: i64, reason: String, count_attempt| {
        let _ = store
            .retry_later(
                &job.id,
                delay_ms,
                Some(modem.name.clone()),
                reason,
                count_attempt,
            )
            .await
            .map_err(log_err);
    };
    if job.expires_at.is_some_and(|e| e <= now_secs()) {
        finish(
            Status::Expired,
            "expired",
            "the job expired before it could be sent".into(),
            false,
        )
        .await;
        return;
    }
    let addr = match Address::parse(&job.receiver) {
        Ok(a) => a,
        Err(e) => {
            finish(Status::Failed, "invalid_receiver", e.to_string(), false).await;
            return;
        }
    };
    let parts_needed = match pdu::plan(&job.message) {
        Ok(p) => p.parts.len() as u32,
        Err(e) => {
            finish(Status::Failed, "too_long", e.to_string(), false).await;
            return;
        }
    };
    let reference = match store.begin_attempt(&job.id, parts_needed).await {
        Ok(r) => r,
        Err(e) => {
            log_err(e);
            return;
        }
    };
    let attempts = job.attempts + 1;
    let parts =
        match pdu::encode_submit(&addr, &job.message, reference, job_options(ctx.opts, &job)) {
            Ok(p) => p,
            Err(e) => {
                finish(Status::Failed, "too_long", e.to_string(), false).await;
                return;
            }
        };
    let total = parts.len() as u32;
    debug!(job = %job.id, modem = %modem.name, attempt = attempts, "sending {total} part(s)");
    for (k, part) in parts.into_iter().enumerate().skip(job.parts_done as usize) {
        let k = k as u32;
        // A limit reached in the middle of a long message: a short wait here; a long one
        // puts the job back (it goes on later on this modem, from this part).
        loop {
            let now = crate::store::now_ms();
            let hold = rate.lock().map(|mut r| r.hold(now)).unwrap_or(None);
            match hold {
                None => {
                    if let Ok(mut r) = rate.lock() {
                        r.record(now);
                    }
                    break;
                }
                Some((wait, _)) if wait <= 2_000 => {
                    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                }
                Some((wait, limit)) => {
                    let why = limit.words(&modem.name);
                    debug!(job = %job.id, "part {k} waits {wait} ms: {why}");
                    retry(wait, why, false).await;
                    return;
                }
            }
        }
        let (prompted, prompted_rx) = oneshot::channel();
        let (go_tx, go) = oneshot::channel();
        let send = modem.send_part(PartRequest {
            hex: part.hex,
            tpdu_len: part.tpdu_len,
            prompted,
            go,
        });
        tokio::pin!(send);
        let outcome = tokio::select! {
            p = prompted_rx => {
                if p.is_ok() {
                    // Recorded before the PDU goes: after a crash from here on the part is
                    // known to be ambiguous.
                    let armed = store.mark_inflight(&job.id, k, &modem.name).await.map_err(log_err).is_ok();
                    let _ = go_tx.send(armed);
                }
                send.await
            }
            o = &mut send => o,
        };
        match outcome {
            PartOutcome::Sent { mr } => {
                if let Some(c) = counters {
                    c.part_sent();
                }
                match store.part_sent(&job.id, k, mr, total, &modem.name).await {
                    Ok(true) => {
                        if let Some(c) = counters {
                            c.job_sent(now_secs());
                        }
                        ctx.board.report_soon();
                        info!(job = %job.id, modem = %modem.name, "sent ({total} part(s))")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        log_err(e);
                        return;
                    }
                }
            }
            PartOutcome::Unavailable(reason) => {
                debug!(job = %job.id, "modem unavailable: {reason}");
                retry(1_000, reason, false).await;
                return;
            }
            PartOutcome::Failed {
                class,
                code,
                reason,
            } => {
                let code_s = code.clone().unwrap_or_else(|| "modem_error".into());
                // Counted on the modem: it gave up for good, or will be retried.
                let gives_up = match class {
                    FailureClass::Permanent => true,
                    FailureClass::Ambiguous if !ctx.cfg.agent.retry_ambiguous => true,
                    FailureClass::Sim => false,
                    FailureClass::Transient | FailureClass::Ambiguous => {
                        attempts >= ctx.cfg.agent.max_attempts
                    }
                };
                if let Some(c) = counters {
                    if gives_up {
                        c.job_failed(&reason);
                    } else {
                        c.retried(&reason);
                    }
                }
                ctx.board.report_soon();
                match class {
                    FailureClass::Permanent => {
                        warn!(job = %job.id, "failed permanently: {reason}");
                        finish(Status::Failed, &code_s, reason, false).await;
                    }
                    FailureClass::Ambiguous if !ctx.cfg.agent.retry_ambiguous => {
                        warn!(job = %job.id, "ambiguous answer, not sending again: {reason}");
                        let reason = format!(
                            "{reason}: the SMS may have been sent, so it is not sent again \
                             (agent.retry_ambiguous = false)"
                        );
                        let code = code.unwrap_or_else(|| "timeout".into());
                        finish(Status::Failed, &code, reason, true).await;
                    }
                    FailureClass::Sim => {
                        warn!(job = %job.id, modem = %modem.name, "SIM trouble: {reason}");
                        retry(1_000, reason, false).await;
                    }
                    FailureClass::Transient | FailureClass::Ambiguous => {
                        if attempts >= ctx.cfg.agent.max_attempts {
                            warn!(job = %job.id, "giving up after {attempts} attempts: {reason}");
                            let reason =
                                format!("gave up after {attempts} attempts; last error: {reason}");
                            finish(
                                Status::Failed,
                                &code_s,
                                reason,
                                class == FailureClass::Ambiguous,
                            )
                            .await;
                        } else {
                            let delay = if alternatives && attempts == 1 && job.modem.is_none() {
                                Duration::ZERO
                            } else {
                                retry_delay(&ctx.cfg, attempts)
                            };
                            info!(job = %job.id, "will retry in {delay:?}: {reason}");
                            retry(delay.as_millis() as i64, reason, true).await;
                        }
                    }
                }
                return;
            }
        }
    }
}

/// Reports modem state changes as status events. Holds only the health receiver, so the
/// modem's actor stops once the agent drops its handles.
fn spawn_health_watcher(
    name: String,
    mut w: tokio::sync::watch::Receiver<Health>,
    radio: tokio::sync::watch::Receiver<crate::modem::Radio>,
    store: Store,
    wake: Arc<Notify>,
    board: Arc<Board>,
) {
    tokio::spawn(async move {
        let mut last: Option<Health> = None;
        loop {
            let h = w.borrow_and_update().clone();
            let state = match &h {
                Health::Ready => Some(("ready", None)),
                Health::Down(r) => Some(("down", Some(r.clone()))),
                Health::Stopped(r) => Some(("stopped", Some(r.clone()))),
                Health::Starting => None,
            };
            let same_kind = last
                .as_ref()
                .is_some_and(|l| std::mem::discriminant(l) == std::mem::discriminant(&h));
            if let (Some((state, reason)), false) = (state, same_kind) {
                let mut e = StatusEvent::new(format!("modem:{name}"), Status::Modem, now_secs());
                e.modem = Some(name.clone());
                e.modem_state = Some(state.to_owned());
                e.reason = reason;
                if h.is_ready() {
                    let r = radio.borrow().clone();
                    e.signal_dbm = r.signal_dbm;
                    e.operator = r.operator;
                }
                if let Err(err) = store.event(e).await {
                    warn!("job store: {err}");
                }
                board.report_soon();
                last = Some(h);
            }
            wake.notify_one();
            if w.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The submit options of one job: the agent's, with the job's own delivery-report choice.
fn job_options(agent: SubmitOptions, job: &JobRow) -> SubmitOptions {
    SubmitOptions {
        status_report: job.status_report.unwrap_or(agent.status_report),
        ..agent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_count_their_windows() {
        let mut r = Rate::new(2, 3, 0);
        let t0 = 1_000_000_000;
        assert_eq!(r.hold(t0), None);
        r.record(t0);
        r.record(t0 + 1_000);
        // two in the minute: the next when the first leaves it
        let (w, l) = r.hold(t0 + 2_000).expect("held");
        assert_eq!((w, l.key), (58_000, "rate_per_minute"));
        assert!(
            l.words("m1")
                .contains("2 SMS part(s) per minute (rate_per_minute = 2)")
        );
        assert_eq!(r.hold(t0 + 60_000), None);
        r.record(t0 + 60_000);
        // three in the hour: the hour's limit holds longer than the minute's
        let (w, l) = r.hold(t0 + 61_000).expect("held");
        assert_eq!((w, l.key), (3_600_000 - 61_000, "rate_per_hour"));
        assert_eq!(r.hold(t0 + 3_600_000), None);
        // only the longest window is kept
        r.record(t0 + 3_600_000);
        r.record(t0 + 2 * 3_600_000);
        assert!(r.sent.len() <= 3, "{:?}", r.sent);

        let mut day = Rate::new(0, 0, 1);
        day.record(t0);
        let (w, l) = day.hold(t0 + 1).expect("held");
        assert_eq!((w, l.key), (86_400_000 - 1, "rate_per_day"));

        let mut unlimited = Rate::new(0, 0, 0);
        for i in 0..100 {
            unlimited.record(t0 + i);
        }
        assert_eq!(unlimited.hold(t0 + 100), None);
        assert!(unlimited.sent.is_empty());
    }

    #[test]
    fn retry_delays_double_and_cap() {
        let cfg = Config::default();
        assert_eq!(retry_delay(&cfg, 1), Duration::from_secs(30));
        assert_eq!(retry_delay(&cfg, 2), Duration::from_secs(60));
        assert_eq!(retry_delay(&cfg, 3), Duration::from_secs(120));
        assert_eq!(retry_delay(&cfg, 30), MAX_RETRY_DELAY);
    }

    #[test]
    fn routes_pick_the_longest_prefix() {
        let routes = vec![
            ("+62812".to_owned(), "tsel".to_owned()),
            ("+62".to_owned(), "id".to_owned()),
        ];
        assert_eq!(group_of(&routes, "+628123"), "tsel");
        assert_eq!(group_of(&routes, "+62811"), "id");
        assert_eq!(group_of(&routes, "0812"), "default");
    }
}
