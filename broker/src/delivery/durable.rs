//! The durable backend of the delivery engine: messages go through the store.
//!
//! - **Publish.** The message's row is queued for insert before anything else happens to it.
//!   When the channel has no backlog, receivers with room get it at once and the row is queued
//!   as held by them; when it has a backlog (or nobody has room), the row is queued free and
//!   the receivers take it in order with the rest. The sender's `send-result` waits for the
//!   commit, or for the delivery when that came first (then nothing is written: see
//!   [`crate::storage`]).
//! - **Backlog.** A receiver with room takes the oldest free rows of its channel from the store
//!   ([`pump`]): up to its window (acknowledged mode) or [`LEGACY_WINDOW`] rows in frames not
//!   yet written (legacy receivers), and up to the bytes its queue has room for. The next claim
//!   goes out as soon as it makes room again, so a backlog flows at the speed of the socket.
//!   Legacy receivers get it as the original broker sent it: frames rebuilt by the server,
//!   `{"command":"send-message","channel":..,"data":[items]}`, at most `storage.limit` items
//!   and `max_frame` bytes each; a stored message too big to share a frame goes alone, and a
//!   lone stored message goes byte for byte.
//! - **Completion.** A legacy receiver's row is delivered once the frame carrying it is written
//!   to its socket ([`written`]); an acknowledged receiver's once it sends `ack` ([`ack`]). A
//!   receiver that leaves, or does not acknowledge within `ack_timeout`, frees what it held.
//! - **Expiry.** A sweep deletes expired rows every second and tells senders that asked
//!   (`"report": true`, while they are connected).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::{debug, warn};
use wsmb_protocol::ResponseCode;
use wsmb_protocol::reply::{self, ExpiredData};

use super::channels::{Channel, HeldRows, Receiver};
use super::{Accepted, Engine, Outcome, Publish};
use crate::outbox::{Carried, Out, Outbox};
use crate::storage::{Claim, ClaimRequest, NewRow, StoreError, StoredRow};
use crate::ws::Text;

/// Stored rows a legacy receiver may hold in frames not yet written: enough for the backlog to
/// flow while the next claim is on its way.
pub(super) const LEGACY_WINDOW: u32 = 1024;
/// Most rows one claim takes.
const CLAIM_ROWS: usize = 512;
/// Bytes of stored rows a legacy receiver may hold beyond its outbox, so that one claim (one
/// commit of the store) feeds its socket for a while.
const PREFETCH_BYTES: usize = 1024 * 1024;
/// Most expiry reports kept (past it, senders are not told).
const MAX_REPORTS: usize = 100_000;
/// How often the engine looks for rows it was not told about (put there by another process,
/// or whose holder ran out of time).
const POLL: Duration = Duration::from_secs(5);

/// Whom to tell if a message expires undelivered.
pub struct Report {
    /// The sender's queue (a weak reference: a sender that left is not told).
    pub to: Weak<Outbox>,
    /// Its item ids.
    pub ids: Vec<String>,
}

struct Registered {
    report: Report,
    message_id: String,
    channel: Arc<str>,
}

/// Expiry reports by row.
#[derive(Default)]
pub(super) struct Reports {
    map: HashMap<i64, Registered>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn holder(e: &Engine, r: &Receiver) -> Arc<str> {
    r.holder
        .get_or_init(|| Arc::from(format!("{}/{}", e.cfg.node, r.conn)))
        .clone()
}

/// Whether receiver `r` can take one more message of `len` bytes now (a legacy receiver with
/// stored frames still waiting for its outbox cannot: they go first).
fn fits(r: &Receiver, len: usize) -> bool {
    let held = if r.ack {
        r.held.acks.len()
    } else {
        r.held.legacy_rows
    };
    held < r.window as usize && r.held.queue.is_empty() && r.outbox.has_room(len)
}

/// Hands a fresh message to receiver `r` as row `data_id` (`None`: not stored, the database
/// is down). Returns whether it was queued.
fn hand_fresh(
    r: &mut Receiver,
    channel: &Arc<str>,
    message_id: &str,
    frame: &Text,
    data_id: Option<i64>,
    ack_timeout: Duration,
) -> bool {
    let id = data_id.unwrap_or(-1);
    if r.ack {
        let envelope = reply::deliver(message_id, channel, 1, frame.as_str());
        if r.outbox.try_push(Out::text(Bytes::from(envelope))).is_err() {
            return false;
        }
        let key: Arc<str> = Arc::from(message_id);
        r.held
            .deadlines
            .push_back((Instant::now() + ack_timeout, Arc::clone(&key)));
        r.held.acks.entry(key).or_default().push((id, 1));
        true
    } else {
        let out = match data_id {
            Some(id) => Out::delivery(
                frame.bytes().clone(),
                Box::new(Carried {
                    channel: Arc::clone(channel),
                    rows: vec![(id, 1)],
                }),
            ),
            None => Out::text(frame.bytes().clone()),
        };
        if r.outbox.try_push(out).is_err() {
            return false;
        }
        if data_id.is_some() {
            r.held.legacy_rows += 1;
        }
        true
    }
}

/// Publishes through the store.
pub(super) async fn publish(e: &Engine, p: Publish<'_>) -> Accepted {
    let Some(store) = e.store.clone() else {
        return Accepted::Done(Outcome::refused(
            ResponseCode::StorageUnavailable,
            "no store".into(),
        ));
    };
    let now = now_ms();
    if p.expires_at.is_some_and(|x| (x as i64) * 1000 <= now) {
        return Accepted::Done(Outcome::refused(
            ResponseCode::Expired,
            "the message had already expired when it arrived".into(),
        ));
    }
    if let Err(why) = store.health() {
        return Accepted::Done(unstored(e, &p, &why));
    }
    let admission = store.admit(p.frame.len()).await;
    if let Err(StoreError::Full(why) | StoreError::Unavailable(why)) = store.reserve(p.channel, 1) {
        return Accepted::Done(Outcome::refused(ResponseCode::StorageFull, why));
    }
    let mut first = First {
        admission,
        commit: None,
        id: None,
        reserved: true,
    };
    let mut handed = 0u32;
    let mut waiting: Vec<(u64, Arc<Outbox>)> = Vec::new();
    let mut pump_now = false;
    let name;
    let counters;
    {
        let mut t = e.lock();
        counters = t.counters(p.channel);
        let (n, ch) = t.channel(p.channel);
        name = n;
        let (order, want, rotate) = ch.order(p.limit);
        // A message for one receiver queues behind the backlog (order is kept). A message for
        // several cannot wait in the store (a stored row goes to one receiver): it goes to
        // those online, as in memory mode.
        let fanout = want > 1;
        if fanout || !ch.backlog.pending() {
            let mut examined = 0;
            for i in order.iter() {
                if handed as usize >= want {
                    break;
                }
                examined += 1;
                let r = &mut ch.receivers[i];
                if r.conn == p.sender {
                    continue;
                }
                if !fits(r, p.frame.len()) {
                    if fanout {
                        waiting.push((r.conn, Arc::clone(&r.outbox)));
                    }
                    continue;
                }
                match hand_copy(e, &store, &p, &name, r, &mut first) {
                    Some(true) => handed += 1,
                    Some(false) => {
                        // It filled up meanwhile: the row is part of the backlog.
                        ch.backlog.freed(1);
                        pump_now = true;
                    }
                    None => break,
                }
            }
            ch.advance(&order, examined, rotate);
            waiting.truncate(want.saturating_sub(handed as usize));
        }
        if first.commit.is_none() && waiting.is_empty() {
            store_free(&store, &p, &name, &mut first);
            ch.backlog.freed(1);
            pump_now = !ch.receivers.is_empty();
        }
    }
    if pump_now {
        pump(e, &name);
    }
    if !waiting.is_empty() {
        handed += wait_and_hand(e, &store, &p, &name, waiting, &mut first).await;
        if first.commit.is_none() {
            // Nobody made room in time: it waits in the store for the next receiver.
            store_free(&store, &p, &name, &mut first);
            let mut t = e.lock();
            t.channel(&name).1.backlog.freed(1);
            drop(t);
            pump(e, &name);
        }
    }
    e.stats
        .deliveries
        .fetch_add(u64::from(handed), Ordering::Relaxed);
    counters.messages_in.fetch_add(1, Ordering::Relaxed);
    counters
        .deliveries
        .fetch_add(u64::from(handed), Ordering::Relaxed);
    if let (Some(report), Some(id)) = (p.report, first.id) {
        register_report(e, id, report, p.message_id, name);
    }
    match first.commit {
        Some(commit) => Accepted::Committing {
            commit,
            receivers: handed,
        },
        None => Accepted::Done(Outcome::refused(
            ResponseCode::StorageFull,
            "the broker's store is full; retry later".into(),
        )),
    }
}

/// The first row of a message: its sender's reply waits for its commit.
struct First {
    admission: Option<crate::storage::Admission>,
    commit: Option<tokio::sync::oneshot::Receiver<Result<crate::storage::Committed, StoreError>>>,
    id: Option<i64>,
    /// The stored place taken for it before anything else is still unused.
    reserved: bool,
}

impl First {
    /// Takes a stored place for one more row of the message (the first is reserved already);
    /// `false` when the store is full.
    fn place(&mut self, store: &crate::storage::Storage, name: &Arc<str>) -> bool {
        std::mem::take(&mut self.reserved) || store.reserve(name, 1).is_ok()
    }

    /// Queues the insert of the message's row `data_id`.
    fn insert(
        &mut self,
        store: &crate::storage::Storage,
        p: &Publish<'_>,
        name: &Arc<str>,
        data_id: i64,
        claim: Option<Claim>,
    ) -> tokio::sync::oneshot::Receiver<Result<crate::storage::Committed, StoreError>> {
        store.insert(
            NewRow {
                data_id,
                key: p.message_id.clone(),
                channel: Arc::clone(name),
                frame: p.frame.clone(),
                expires_at: p.expires_at,
                claim,
            },
            self.admission.take(),
        )
    }
}

/// Queues the insert of a copy held by `r`, then hands it over. `Some(true)`: handed;
/// `Some(false)`: stored free instead (its queue filled meanwhile); `None`: the store is full.
fn hand_copy(
    e: &Engine,
    store: &crate::storage::Storage,
    p: &Publish<'_>,
    name: &Arc<str>,
    r: &mut Receiver,
    first: &mut First,
) -> Option<bool> {
    if !first.place(store, name) {
        return None;
    }
    let data_id = store.next_id();
    // The insert is queued before the frame can be written, so its completion comes after it.
    let claim = Claim {
        holder: holder(e, r),
        until_ms: now_ms() + claim_time(e, r.ack),
    };
    let rx = first.insert(store, p, name, data_id, Some(claim));
    let ok = hand_fresh(
        r,
        name,
        &p.message_id,
        &p.frame,
        Some(data_id),
        e.cfg.ack_timeout,
    );
    if !ok {
        store.release(vec![data_id]);
    }
    if first.commit.is_none() {
        first.commit = Some(rx);
        first.id = Some(data_id);
    }
    Some(ok)
}

/// Queues the message's insert as a free row (nobody holds it).
fn store_free(
    store: &crate::storage::Storage,
    p: &Publish<'_>,
    name: &Arc<str>,
    first: &mut First,
) {
    if !first.place(store, name) {
        return;
    }
    let data_id = store.next_id();
    first.commit = Some(first.insert(store, p, name, data_id, None));
    first.id = Some(data_id);
}

fn claim_time(e: &Engine, ack: bool) -> i64 {
    let d = if ack {
        e.cfg.ack_timeout
    } else {
        e.cfg.write_timeout
    };
    d.as_millis() as i64
}

/// Fan-out: waits (the sender is not read meanwhile) for receivers that had no room, up to
/// `slow_receiver_timeout` in all, and hands each the message as its own held row when it makes
/// room. A receiver still full then is slow (see [`Engine::slow`]).
async fn wait_and_hand(
    e: &Engine,
    store: &crate::storage::Storage,
    p: &Publish<'_>,
    name: &Arc<str>,
    waiting: Vec<(u64, Arc<Outbox>)>,
    first: &mut First,
) -> u32 {
    let deadline = tokio::time::Instant::now() + e.cfg.slow_receiver_timeout;
    let mut late = 0;
    for (conn, ob) in waiting {
        if ob.is_lagging() {
            continue;
        }
        let handed = loop {
            let room = ob.room_notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut t = e.lock();
                let Some(ch) = t.chans.get_mut(name) else {
                    break false;
                };
                let Some(i) = ch.find(conn) else {
                    break false;
                };
                let r = &mut ch.receivers[i];
                if fits(r, p.frame.len()) {
                    match hand_copy(e, store, p, name, r, first) {
                        Some(true) => break true,
                        Some(false) => {
                            ch.backlog.freed(1);
                            break false;
                        }
                        None => break false,
                    }
                }
            }
            tokio::select! {
                _ = room => {}
                _ = ob.gone() => break false,
                _ = tokio::time::sleep_until(deadline) => {
                    e.slow(&ob);
                    break false;
                }
            }
        };
        if handed {
            late += 1;
        }
    }
    late
}

/// The database is down: the message goes to the receivers online that have room, and is not
/// stored.
fn unstored(e: &Engine, p: &Publish<'_>, why: &str) -> Outcome {
    let mut handed = 0u32;
    let counters;
    {
        let mut t = e.lock();
        counters = t.counters(p.channel);
        if let Some(ch) = t.chans.get_mut(p.channel) {
            let (order, want, rotate) = ch.order(p.limit);
            let mut examined = 0;
            let name: Arc<str> = Arc::from(p.channel);
            for i in order.iter() {
                if handed as usize >= want {
                    break;
                }
                examined += 1;
                let r = &mut ch.receivers[i];
                if r.conn == p.sender || !fits(r, p.frame.len()) {
                    continue;
                }
                if hand_fresh(r, &name, &p.message_id, &p.frame, None, e.cfg.ack_timeout) {
                    handed += 1;
                }
            }
            ch.advance(&order, examined, rotate);
        }
    }
    e.stats
        .deliveries
        .fetch_add(u64::from(handed), Ordering::Relaxed);
    counters.messages_in.fetch_add(1, Ordering::Relaxed);
    counters
        .deliveries
        .fetch_add(u64::from(handed), Ordering::Relaxed);
    if handed > 0 {
        Outcome {
            code: ResponseCode::Accepted,
            receivers: handed,
            stored: Some(false),
            reason: None,
        }
    } else {
        e.stats.unrouted.fetch_add(1, Ordering::Relaxed);
        counters.unrouted.fetch_add(1, Ordering::Relaxed);
        Outcome::refused(
            ResponseCode::StorageUnavailable,
            format!(
                "no receiver could take the message now and it cannot be stored: the database is \
                 unavailable ({why}); retry later"
            ),
        )
    }
}

fn register_report(e: &Engine, data_id: i64, report: Report, message_id: String, ch: Arc<str>) {
    let mut r = e.reports.lock().unwrap_or_else(|p| p.into_inner());
    if r.map.len() >= MAX_REPORTS {
        debug!("too many expiry reports registered; this one is not kept");
        return;
    }
    r.map.insert(
        data_id,
        Registered {
            report,
            message_id,
            channel: ch,
        },
    );
    e.reports_n.store(r.map.len(), Ordering::Relaxed);
}

fn forget_reports(e: &Engine, ids: impl Iterator<Item = i64>) {
    if e.reports_n.load(Ordering::Relaxed) == 0 {
        return;
    }
    let mut r = e.reports.lock().unwrap_or_else(|p| p.into_inner());
    for id in ids {
        r.map.remove(&id);
    }
    e.reports_n.store(r.map.len(), Ordering::Relaxed);
}

/// Frames carrying stored rows were written to `conn`: those deliveries are done.
pub(super) fn written(e: &Engine, conn: u64, carried: Vec<Carried>) {
    let Some(store) = e.store.as_ref() else {
        return;
    };
    let mut channels: Vec<Arc<str>> = Vec::new();
    {
        let mut t = e.lock();
        for c in &carried {
            if let Some(ch) = t.chans.get_mut(&c.channel) {
                if let Some(i) = ch.find(conn) {
                    let r = &mut ch.receivers[i];
                    r.held.legacy_rows = r.held.legacy_rows.saturating_sub(c.rows.len());
                    refill(r);
                    // a sender waiting for this receiver's window (fan-out) looks again
                    r.outbox.wake_room();
                }
                if ch.backlog.pending() && !channels.contains(&c.channel) {
                    channels.push(Arc::clone(&c.channel));
                }
            }
        }
    }
    for c in carried {
        for &(id, remaining) in &c.rows {
            store.complete(id, Arc::clone(&c.channel), remaining);
        }
        forget_reports(e, c.rows.iter().map(|r| r.0));
    }
    for ch in channels {
        pump(e, &ch);
    }
}

/// Frames carrying stored rows will never be written: the rows are free again.
pub(super) fn dropped(e: &Engine, carried: Vec<Carried>) {
    let Some(store) = e.store.as_ref() else {
        return;
    };
    let mut channels = Vec::new();
    {
        let mut t = e.lock();
        for c in &carried {
            let (_, ch) = t.channel(&c.channel);
            ch.backlog.freed(c.rows.len() as u64);
            if !channels.contains(&c.channel) {
                channels.push(Arc::clone(&c.channel));
            }
        }
    }
    // Counted as redelivered when they are handed out again (a claim of a row handed out
    // before), not here: counting both would count one redelivery twice.
    for c in carried {
        store.release(c.rows.iter().map(|r| r.0).filter(|id| *id >= 0).collect());
    }
    for ch in channels {
        pump(e, &ch);
    }
}

/// Acknowledgements from `conn`.
pub(super) fn ack(e: &Engine, conn: u64, ids: &[&str]) {
    let Some(store) = e.store.as_ref() else {
        return;
    };
    let mut done: Vec<(Arc<str>, HeldRows)> = Vec::new();
    {
        let mut t = e.lock();
        let Some(list) = t.conns.get(&conn).cloned() else {
            return;
        };
        for name in list {
            let Some(ch) = t.chans.get_mut(&name) else {
                continue;
            };
            let Some(i) = ch.find(conn) else { continue };
            let r = &mut ch.receivers[i];
            let mut rows = Vec::new();
            for id in ids {
                if let Some(held) = r.held.acks.remove(*id) {
                    rows.extend(held);
                }
            }
            if !rows.is_empty() {
                r.outbox.wake_room();
                done.push((name, rows));
            }
        }
    }
    for (name, rows) in done {
        for &(id, remaining) in &rows {
            if id >= 0 {
                store.complete(id, Arc::clone(&name), remaining);
            }
        }
        forget_reports(e, rows.iter().map(|r| r.0));
        pump(e, &name);
    }
}

/// What a receiver that left held in acknowledged mode is free again.
pub(super) fn give_back(e: &Engine, channel: &str, held: super::channels::Held) {
    let Some(store) = e.store.as_ref() else {
        return;
    };
    let queued = held
        .queue
        .into_iter()
        .filter_map(|o| o.token)
        .flat_map(|c| c.rows.into_iter().map(|r| r.0));
    let ids: Vec<i64> = held
        .acks
        .into_values()
        .flatten()
        .map(|(id, _)| id)
        .chain(queued)
        .filter(|id| *id >= 0)
        .collect();
    if ids.is_empty() {
        return;
    }
    let name = {
        let mut t = e.lock();
        let (name, ch) = t.channel(channel);
        ch.backlog.freed(ids.len() as u64);
        name
    };
    store.release(ids);
    pump(e, &name);
}

/// Receivers of `channel` with room take the next free rows from the store (one claim at a
/// time per channel; the next when it is answered).
pub(super) fn pump(e: &Engine, channel: &Arc<str>) {
    let (Some(store), Some(engine)) = (e.store.clone(), e.me.upgrade()) else {
        return;
    };
    let now = Instant::now();
    let (req, conn) = {
        let mut t = e.lock();
        let Some(ch) = t.chans.get_mut(channel) else {
            return;
        };
        if ch.backlog.fetching || !ch.backlog.maybe || ch.receivers.is_empty() {
            return;
        }
        let Some((i, rows)) = next_with_room(ch, now) else {
            return;
        };
        let n = ch.receivers.len();
        ch.next = (i + 1) % n;
        let r = &ch.receivers[i];
        let ms = now_ms();
        ch.backlog.fetching = true;
        ch.backlog.maybe = false;
        (
            ClaimRequest {
                channel: Arc::clone(channel),
                claim: Claim {
                    holder: holder(e, r),
                    until_ms: ms + claim_time(e, r.ack),
                },
                max_rows: rows.min(CLAIM_ROWS),
                max_bytes: if r.ack {
                    r.outbox.room_bytes().max(1)
                } else {
                    PREFETCH_BYTES.saturating_sub(r.held.queue_bytes).max(1)
                },
                now_ms: ms,
            },
            r.conn,
        )
    };
    let channel = Arc::clone(channel);
    tracing::trace!(%channel, conn, rows = req.max_rows, bytes = req.max_bytes, "claiming");
    tokio::spawn(async move {
        let result = store.claim(req).await;
        claimed(&engine, &channel, conn, result);
    });
}

/// The receiver in turn with room (preferring one that has no timeouts), and how many rows.
fn next_with_room(ch: &Channel, now: Instant) -> Option<(usize, usize)> {
    let n = ch.receivers.len();
    let mut second = None;
    for k in 0..n {
        let i = (ch.next + k) % n;
        let r = &ch.receivers[i];
        let room = r.room(now);
        let has_space = if r.ack {
            r.outbox.has_room(1)
        } else {
            r.held.queue_bytes < PREFETCH_BYTES
        };
        if room == 0 || !has_space {
            continue;
        }
        if r.held.timed_out.is_empty() {
            return Some((i, room));
        }
        second.get_or_insert((i, room));
    }
    second
}

/// A claim came back: hand the rows to the receiver they were taken for.
fn claimed(
    e: &Engine,
    channel: &Arc<str>,
    conn: u64,
    result: Result<(Vec<StoredRow>, bool), StoreError>,
) {
    let Some(store) = e.store.as_ref() else {
        return;
    };
    let free: Vec<i64>;
    let again;
    {
        let mut t = e.lock();
        let counters = t.counters(channel);
        let (_, ch) = t.channel(channel);
        ch.backlog.fetching = false;
        match result {
            Err(err) => {
                // The database is down; the periodic poll tries again.
                debug!(%channel, "claim failed: {err}");
                ch.backlog.maybe = true;
                return;
            }
            Ok((rows, more)) => {
                tracing::trace!(%channel, conn, rows = rows.len(), more, "claimed");
                if more {
                    ch.backlog.maybe = true;
                }
                let redelivered = rows.iter().filter(|r| r.deliveries > 1).count();
                e.stats
                    .redelivered
                    .fetch_add(redelivered as u64, Ordering::Relaxed);
                counters
                    .redelivered
                    .fetch_add(redelivered as u64, Ordering::Relaxed);
                match ch.find(conn) {
                    Some(i) => {
                        let r = &mut ch.receivers[i];
                        let n = rows.len();
                        let left = if r.ack {
                            hand_acked(r, channel, rows, e.cfg.ack_timeout)
                        } else {
                            hand_legacy(r, channel, rows, e.cfg.limit, e.cfg.max_frame)
                        };
                        let handed = (n - left.len()) as u64;
                        e.stats.deliveries.fetch_add(handed, Ordering::Relaxed);
                        counters.deliveries.fetch_add(handed, Ordering::Relaxed);
                        free = left;
                    }
                    None => free = rows.into_iter().map(|r| r.data_id).collect(),
                }
                if !free.is_empty() {
                    ch.backlog.freed(free.len() as u64);
                }
            }
        }
        again = ch.backlog.maybe;
        if ch.is_idle() {
            t.chans.remove(channel);
        }
    }
    store.release(free);
    if again {
        pump(e, channel);
    }
}

/// Hands rows to a receiver in acknowledged mode, one `deliver` frame each. Returns the ids of
/// rows it could not take.
fn hand_acked(
    r: &mut Receiver,
    channel: &Arc<str>,
    rows: Vec<StoredRow>,
    ack_timeout: Duration,
) -> Vec<i64> {
    let mut left = Vec::new();
    let deadline = Instant::now() + ack_timeout;
    for row in rows {
        let message_id = row.message_id();
        if let Some(held) = r.held.acks.get_mut(message_id.as_str()) {
            // Another copy of a message it holds: acknowledged together.
            held.push((row.data_id, row.remaining));
            continue;
        }
        let frame = match (&row.frame, &row.data) {
            (Some(f), _) => f.clone(),
            (None, Some(item)) => rebuild(channel, &[item.as_str()]),
            (None, None) => rebuild(channel, &[]),
        };
        let envelope = reply::deliver(&message_id, channel, row.deliveries, &frame);
        if r.outbox.try_push(Out::text(Bytes::from(envelope))).is_err() {
            left.push(row.data_id);
            continue;
        }
        let key: Arc<str> = Arc::from(message_id);
        r.held.deadlines.push_back((deadline, Arc::clone(&key)));
        r.held.acks.insert(key, vec![(row.data_id, row.remaining)]);
    }
    left
}

#[derive(Deserialize)]
struct DataOnly<'a> {
    #[serde(borrow)]
    data: Vec<&'a RawValue>,
}

/// The items of a stored row: the elements of its frame's `data`, or its legacy item.
fn items_of(row: &StoredRow) -> Vec<&str> {
    match (&row.frame, &row.data) {
        (Some(f), _) => match serde_json::from_str::<DataOnly<'_>>(f) {
            Ok(d) => d.data.iter().map(|r| r.get()).collect(),
            Err(e) => {
                warn!(
                    "stored frame {} unreadable ({e}); sending it whole",
                    row.data_id
                );
                Vec::new()
            }
        },
        (None, Some(item)) => vec![item.as_str()],
        (None, None) => Vec::new(),
    }
}

/// Hands rows to a legacy receiver in frames of at most `limit` items and `max_frame` bytes.
/// Returns the ids of rows it could not take.
fn hand_legacy(
    r: &mut Receiver,
    channel: &Arc<str>,
    rows: Vec<StoredRow>,
    limit: usize,
    max_frame: usize,
) -> Vec<i64> {
    // Group rows into frames: a row is never split.
    let mut groups: Vec<Vec<StoredRow>> = Vec::new();
    let mut items = 0;
    let mut bytes = 0;
    for row in rows {
        let n = items_of(&row).len().max(1);
        let size = row.size() + 64;
        let start_new = match groups.last() {
            None => true,
            Some(g) => g.is_empty() || items + n > limit || bytes + size > max_frame,
        };
        if start_new {
            groups.push(Vec::new());
            items = 0;
            bytes = 0;
        }
        items += n;
        bytes += size;
        if let Some(g) = groups.last_mut() {
            g.push(row);
        }
    }
    let mut left = Vec::new();
    for g in groups {
        let payload = match (&g[..], g.first().and_then(|r| r.frame.as_ref())) {
            // a lone stored message goes byte for byte
            ([_], Some(f)) => Bytes::from(f.clone()),
            _ => {
                let all: Vec<&str> = g.iter().flat_map(items_of).collect();
                Bytes::from(rebuild(channel, &all))
            }
        };
        let carried = Box::new(Carried {
            channel: Arc::clone(channel),
            rows: g.iter().map(|r| (r.data_id, r.remaining)).collect(),
        });
        r.held.legacy_rows += g.len();
        let out = Out::delivery(payload, carried);
        if r.held.queue.is_empty() {
            match r.outbox.try_push(out) {
                Ok(()) => continue,
                Err((crate::outbox::Refused::Closed, out)) => {
                    r.held.legacy_rows -= g.len();
                    if let Some(c) = out.token {
                        left.extend(c.rows.iter().map(|r| r.0));
                    }
                    continue;
                }
                Err((crate::outbox::Refused::Full, out)) => {
                    r.held.queue_bytes += out.counted;
                    r.held.queue.push_back(out);
                }
            }
        } else {
            r.held.queue_bytes += out.counted;
            r.held.queue.push_back(out);
        }
    }
    left
}

/// Moves frames waiting in a legacy receiver's queue into its outbox while there is room.
fn refill(r: &mut Receiver) {
    while let Some(out) = r.held.queue.pop_front() {
        let n = out.counted;
        match r.outbox.try_push(out) {
            Ok(()) => r.held.queue_bytes -= n,
            Err((_, out)) => {
                r.held.queue.push_front(out);
                break;
            }
        }
    }
    if r.held.queue.is_empty() && r.held.queue.capacity() > 16 {
        r.held.queue = std::collections::VecDeque::new();
    }
}

/// `{"command":"send-message","channel":..,"data":[items]}`, the frame the original broker
/// rebuilt for stored rows.
fn rebuild(channel: &str, items: &[&str]) -> String {
    let raw: Vec<&RawValue> = items
        .iter()
        .filter_map(|i| serde_json::from_str::<&RawValue>(i).ok())
        .collect();
    wsmb_protocol::frames::send_message(channel, &raw)
}

/// Pumps `channel` at `at` (a legacy receiver's first backlog flush).
pub(super) fn pump_at(e: &Engine, channel: Arc<str>, at: Instant) {
    let Some(engine) = e.me.upgrade() else { return };
    tokio::spawn(async move {
        tokio::time::sleep_until(at.into()).await;
        pump(&engine, &channel);
    });
}

/// Starts the durable backend's periodic work: acknowledgement deadlines (every 100 ms), the
/// expiry sweep (every second), polling for rows nobody announced, and the first pump once the
/// store has been recovered.
pub(super) fn spawn_background(e: &Arc<Engine>, shutdown: tokio_util::sync::CancellationToken) {
    let Some(store) = e.store.clone() else { return };
    let weak = Arc::downgrade(e);
    tokio::spawn(async move {
        // The backlog the store already holds.
        let mut recovered = store.recovered();
        let counts = loop {
            if let Some(r) = recovered.borrow_and_update().clone() {
                break r;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                c = recovered.changed() => if c.is_err() { return },
            }
        };
        if let Some(e) = weak.upgrade() {
            let names: Vec<Arc<str>> = {
                let mut t = e.lock();
                counts
                    .counts
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(ch, _)| {
                        let (name, c) = t.channel(ch);
                        c.backlog.freed(1);
                        name
                    })
                    .collect()
            };
            for n in names {
                pump(&e, &n);
            }
        }
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            n += 1;
            let Some(e) = weak.upgrade() else { return };
            deadlines(&e);
            if n % 10 == 0 {
                sweep(&e).await;
            }
            if n % (POLL.as_millis() as u64 / 100) == 0 {
                poll(&e);
            }
        }
    });
}

/// Rows not acknowledged in time are freed for another receiver.
fn deadlines(e: &Engine) {
    let Some(store) = e.store.as_ref() else {
        return;
    };
    let now = Instant::now();
    let mut freed: Vec<(Arc<str>, Vec<i64>)> = Vec::new();
    {
        let mut t = e.lock();
        for (name, ch) in t.chans.iter_mut() {
            let mut ids = Vec::new();
            for r in ch.receivers.iter_mut().filter(|r| r.ack) {
                while let Some((at, _)) = r.held.deadlines.front() {
                    if *at > now {
                        break;
                    }
                    let Some((_, key)) = r.held.deadlines.pop_front() else {
                        break;
                    };
                    if let Some(rows) = r.held.acks.remove(&key) {
                        debug!(message = %key, conn = r.conn, "not acknowledged in time: redelivering");
                        for (id, _) in rows {
                            if id >= 0 {
                                r.held.timed_out(id);
                                ids.push(id);
                            }
                        }
                    }
                }
                if r.held.deadlines.len() > 4 * r.held.acks.len() + 64 {
                    // acknowledged entries pile up at the back: drop them
                    let acks = &r.held.acks;
                    r.held.deadlines.retain(|(_, k)| acks.contains_key(k));
                }
            }
            if !ids.is_empty() {
                ch.backlog.freed(ids.len() as u64);
                freed.push((Arc::clone(name), ids));
            }
        }
    }
    for (name, ids) in freed {
        e.stats
            .redelivered
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        store.release(ids);
        pump(e, &name);
    }
}

/// Deletes expired rows and tells their senders.
async fn sweep(e: &Engine) {
    let Some(store) = e.store.clone() else {
        return;
    };
    if store.health().is_err() {
        return;
    }
    loop {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let Ok(rows) = store.sweep(now, 1000).await else {
            return;
        };
        if rows.is_empty() {
            return;
        }
        e.stats
            .expired
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        {
            let mut t = e.lock();
            for (_, channel) in &rows {
                t.counters(channel).expired.fetch_add(1, Ordering::Relaxed);
            }
        }
        debug!("{} stored message(s) expired undelivered", rows.len());
        if e.reports_n.load(Ordering::Relaxed) > 0 {
            let mut reports = e.reports.lock().unwrap_or_else(|p| p.into_inner());
            for (id, _) in &rows {
                if let Some(reg) = reports.map.remove(id) {
                    if let Some(to) = reg.report.to.upgrade() {
                        let frame = reply::encode(
                            reply::EXPIRED,
                            ResponseCode::Expired,
                            &[ExpiredData {
                                message_id: reg.message_id,
                                channel: reg.channel.to_string(),
                                ids: reg.report.ids,
                            }],
                        );
                        let _ = to.try_push(Out::text(Bytes::from(frame)));
                    }
                }
            }
            e.reports_n.store(reports.map.len(), Ordering::Relaxed);
        }
        if rows.len() < 1000 {
            return;
        }
    }
}

/// Channels whose receivers have room look in the store for rows nobody announced.
fn poll(e: &Engine) {
    let now = Instant::now();
    let names: Vec<Arc<str>> = {
        let mut t = e.lock();
        t.chans
            .iter_mut()
            .filter(|(_, c)| !c.backlog.fetching && next_with_room(c, now).is_some())
            .map(|(k, c)| {
                c.backlog.maybe = true;
                Arc::clone(k)
            })
            .collect()
    };
    for n in names {
        pump(e, &n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, frame: Option<&str>, data: Option<&str>) -> StoredRow {
        StoredRow {
            data_id: id,
            key: Some(format!("m-{id}")),
            frame: frame.map(str::to_owned),
            data: data.map(str::to_owned),
            remaining: 1,
            expires_at: None,
            deliveries: 1,
        }
    }

    fn receiver() -> (Receiver, Arc<Outbox>) {
        let ob = Arc::new(Outbox::new(1000, 16 << 20));
        (
            Receiver {
                conn: 1,
                outbox: Arc::clone(&ob),
                ack: false,
                window: 1024,
                held: Default::default(),
                holder: Default::default(),
                ready_at: None,
            },
            ob,
        )
    }

    fn frames(ob: &Outbox) -> Vec<(String, usize)> {
        let mut b = Vec::new();
        ob.take(&mut b, 1000);
        b.into_iter()
            .map(|o| {
                let n = o.token.as_ref().map_or(0, |t| t.rows.len());
                match o.frame {
                    crate::ws::Frame::Text(t) => (String::from_utf8_lossy(&t).into_owned(), n),
                    other => panic!("{other:?}"),
                }
            })
            .collect()
    }

    #[test]
    fn legacy_frames_hold_at_most_limit_items_and_max_frame_bytes() {
        let (mut r, ob) = receiver();
        let ch: Arc<str> = Arc::from("sms");
        let rows: Vec<StoredRow> = (1..=5)
            .map(|i| {
                row(
                    i,
                    Some(&format!(
                        r#"{{"command":"send-message","channel":"sms","data":[{{"id":"{i}"}}]}}"#
                    )),
                    None,
                )
            })
            .collect();
        let left = hand_legacy(&mut r, &ch, rows, 2, 1 << 20);
        assert!(left.is_empty());
        let got = frames(&ob);
        assert_eq!(got.iter().map(|f| f.1).collect::<Vec<_>>(), vec![2, 2, 1]);
        assert_eq!(
            got[0].0,
            r#"{"command":"send-message","channel":"sms","data":[{"id":"1"},{"id":"2"}]}"#
        );
        // a lone one goes byte for byte
        assert_eq!(
            got[2].0,
            r#"{"command":"send-message","channel":"sms","data":[{"id":"5"}]}"#
        );
        assert_eq!(r.held.legacy_rows, 5);
    }

    #[test]
    fn big_stored_messages_go_one_per_frame() {
        let (mut r, ob) = receiver();
        let ch: Arc<str> = Arc::from("sms");
        let big = "x".repeat(900 * 1024);
        let rows: Vec<StoredRow> = (1..=3)
            .map(|i| {
                row(
                    i,
                    Some(&format!(
                        r#"{{"command":"send-message","channel":"sms","data":[{{"id":"{i}","m":"{big}"}}]}}"#
                    )),
                    None,
                )
            })
            .collect();
        let left = hand_legacy(&mut r, &ch, rows, 20, 1 << 20);
        assert!(left.is_empty());
        let got = frames(&ob);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|f| f.0.len() < (1 << 20)));
    }

    #[test]
    fn legacy_rows_of_the_original_are_rebuilt() {
        let (mut r, ob) = receiver();
        let ch: Arc<str> = Arc::from("sms");
        let rows = vec![
            row(1, None, Some(r#"{"id":"a"}"#)),
            row(2, None, Some(r#"{"id":"b"}"#)),
        ];
        hand_legacy(&mut r, &ch, rows, 20, 1 << 20);
        assert_eq!(
            frames(&ob)[0].0,
            r#"{"command":"send-message","channel":"sms","data":[{"id":"a"},{"id":"b"}]}"#
        );
    }
}
