//! Takes due jobs from the store and sends them through the modems.
//!
//! - Routing: the longest `[[route]]` prefix matching the number picks a group (default group
//!   `default`; when no modem has that group, any modem); modems of the group take turns
//!   (round-robin). A job whose first parts went out through a modem finishes on that modem
//!   (phones join parts only from one sender).
//! - One job at a time per modem; a rate limit per modem (parts per minute).
//! - Failures: transient ones are retried with exponential back-off (another modem of the group
//!   takes over at once on the first failure), up to `max_attempts`; permanent ones fail the
//!   job; ambiguous ones fail it with `ambiguous` (or retry when `retry_ambiguous`); SIM trouble
//!   sends the job elsewhere without counting an attempt. A bad job is delayed or failed, never
//!   retried in a loop, so it cannot hold up the queue.
//! - Expiry is checked before every attempt.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wsmb_protocol::sms::{Status, StatusEvent};

use crate::config::Config;
use crate::modem::{FailureClass, Health, ModemHandle, PartOutcome, PartRequest};
use crate::pdu::{self, Address, SubmitOptions};
use crate::store::{Ending, JobRow, Store};

/// The longest retry delay.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(600);

/// Parts-per-minute limiter of one modem.
#[derive(Default)]
struct Rate {
    per_minute: u32,
    sent: VecDeque<Instant>,
}

impl Rate {
    fn purge(&mut self) {
        while self
            .sent
            .front()
            .is_some_and(|t| t.elapsed() >= Duration::from_secs(60))
        {
            self.sent.pop_front();
        }
    }

    /// How long until one more part may go (zero: now).
    fn wait(&mut self) -> Duration {
        if self.per_minute == 0 {
            return Duration::ZERO;
        }
        self.purge();
        if (self.sent.len() as u32) < self.per_minute {
            return Duration::ZERO;
        }
        self.sent
            .front()
            .map(|t| Duration::from_secs(60).saturating_sub(t.elapsed()))
            .unwrap_or_default()
    }

    fn record(&mut self) {
        if self.per_minute > 0 {
            self.sent.push_back(Instant::now());
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
}

/// Runs the dispatcher until `shutdown`; then waits for the parts in flight to finish.
pub async fn run(
    store: Store,
    cfg: Arc<Config>,
    modems: Vec<ModemHandle>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut slots: Vec<Slot> = modems
        .into_iter()
        .map(|m| {
            let mc = cfg.modems.iter().find(|c| c.name == m.name);
            Slot {
                group: mc.map_or_else(|| "default".to_owned(), |c| c.group.clone()),
                rate: Arc::new(Mutex::new(Rate {
                    per_minute: mc.map_or(0, |c| c.rate_per_minute),
                    sent: VecDeque::new(),
                })),
                modem: m,
                busy: false,
            }
        })
        .collect();
    for s in &slots {
        spawn_health_watcher(
            s.modem.name.clone(),
            s.modem.watch(),
            store.clone(),
            Arc::clone(&wake),
        );
    }
    let mut routes: Vec<(String, String)> = cfg
        .routes
        .iter()
        .flat_map(|r| r.prefixes.iter().map(|p| (p.clone(), r.group.clone())))
        .collect();
    routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
    let ctx = Arc::new(Ctx {
        store: store.clone(),
        opts: SubmitOptions {
            status_report: cfg.agent.status_report,
            validity: cfg.validity(),
        },
        cfg,
    });
    let mut rr: HashMap<String, usize> = HashMap::new();
    let mut running: JoinSet<(usize, String)> = JoinSet::new();
    let mut in_progress: HashSet<String> = HashSet::new();

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
                    let Some(i) = pick(&slots, &routes, &mut rr, &job) else {
                        blocked = true;
                        continue;
                    };
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

fn pick(
    slots: &[Slot],
    routes: &[(String, String)],
    rr: &mut HashMap<String, usize>,
    job: &JobRow,
) -> Option<usize> {
    let usable = |s: &Slot| {
        !s.busy
            && s.modem.health().is_ready()
            && s.rate
                .lock()
                .map(|mut r| r.wait().is_zero())
                .unwrap_or(true)
    };
    if let Some(m) = &job.modem {
        // continue a partly sent message on the same modem
        return slots.iter().position(|s| &s.modem.name == m && usable(s));
    }
    let group = group_of(routes, &job.receiver);
    let mut members: Vec<usize> = (0..slots.len())
        .filter(|i| slots[*i].group == group)
        .collect();
    if members.is_empty() {
        members = (0..slots.len()).collect();
    }
    let start = rr.get(&group).copied().unwrap_or(0);
    let n = members.len();
    let mut fallback = None;
    for k in 0..n {
        let i = members[(start + k) % n];
        if !usable(&slots[i]) {
            continue;
        }
        if job.last_failed_modem.as_deref() == Some(slots[i].modem.name.as_str()) {
            fallback.get_or_insert((i, k));
            continue;
        }
        rr.insert(group, (start + k + 1) % n);
        return Some(i);
    }
    let (i, k) = fallback?;
    rr.insert(group, (start + k + 1) % n);
    Some(i)
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
        loop {
            let wait = rate.lock().map(|mut r| r.wait()).unwrap_or_default();
            if wait.is_zero() {
                break;
            }
            tokio::time::sleep(wait).await;
        }
        if let Ok(mut r) = rate.lock() {
            r.record();
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
                match store.part_sent(&job.id, k, mr, total, &modem.name).await {
                    Ok(true) => info!(job = %job.id, modem = %modem.name, "sent ({total} part(s))"),
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
    store: Store,
    wake: Arc<Notify>,
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
                if let Err(err) = store.event(e).await {
                    warn!("job store: {err}");
                }
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
    fn rate_limit_counts_a_minute() {
        let mut r = Rate {
            per_minute: 2,
            sent: VecDeque::new(),
        };
        assert!(r.wait().is_zero());
        r.record();
        r.record();
        let w = r.wait();
        assert!(
            w > Duration::from_secs(59) && w <= Duration::from_secs(60),
            "{w:?}"
        );
        let mut unlimited = Rate::default();
        for _ in 0..100 {
            unlimited.record();
        }
        assert!(unlimited.wait().is_zero());
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
