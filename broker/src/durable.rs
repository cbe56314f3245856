//! Delivery of stored messages (every backend but `memory`): one task owns the state of every
//! stored message and every receiver, and is driven by commands from the connections.
//!
//! A stored message owes `remaining` deliveries (its `number_of_receiver`; for 0, "all", the
//! receivers online when it was sent, at least one). Receivers take it in turns, as in memory
//! mode, and a receiver never gets the same message twice from one connection.
//! - A receiver in **acknowledged mode** (`"ack": true`) gets `deliver` frames (the sender's
//!   frame inside, verbatim, with the `message_id` to acknowledge). A message counts as
//!   delivered when acknowledged; if the receiver disconnects first, or does not acknowledge
//!   within `ack_timeout`, it goes to another receiver (or the same one after it reconnects),
//!   with the same `message_id`. Each receiver holds at most `window` unacknowledged messages.
//! - A **legacy receiver** gets the sender's frame byte for byte when the message is fresh; a
//!   backlog (messages that waited) comes as the original broker sent it: frames rebuilt by the
//!   server, `{"command":"send-message","channel":..,"data":[items]}`, at most `limit` items
//!   each, `delay_send` apart. A message counts as delivered once its frame is written to the
//!   receiver's socket.
//! - A message past its expiry is dropped (never delivered late), counted, and reported to its
//!   sender when it asked (`"report": true`) and is still connected.
//!
//! When a message has been delivered as often as it owes, its row is deleted.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::{debug, warn};
use wsmb_protocol::ResponseCode;
use wsmb_protocol::reply::{self, ExpiredData};

use crate::config::StorageConfig;
use crate::conn::{ConnControl, Outgoing, Written};
use crate::storage::{Storage, StoredRow};

/// A receiver registered with the engine.
pub struct Receiver {
    /// Connection id.
    pub conn: u64,
    /// Its outgoing queue.
    pub tx: mpsc::Sender<Outgoing>,
    /// Its control block.
    pub ctl: Arc<ConnControl>,
    /// Acknowledged mode.
    pub ack: bool,
    /// Most unacknowledged messages.
    pub window: u32,
}

/// A new message for the engine.
pub struct Publish {
    /// The broker's message id.
    pub key: String,
    /// Its row, when stored (`None`: the database was down and it goes only to who is online).
    pub data_id: Option<i64>,
    /// The channel.
    pub channel: String,
    /// The sender's frame.
    pub frame: Utf8Bytes,
    /// `number_of_receiver` in force (0 = all).
    pub limit: u32,
    /// Epoch seconds.
    pub expires_at: Option<u64>,
    /// The item ids (for an expiry report).
    pub ids: Vec<String>,
    /// The sender's queue, when it asked for an expiry report.
    pub report_to: Option<mpsc::Sender<Outgoing>>,
    /// The sender's connection (never a receiver of its own message).
    pub sender: u64,
}

/// Commands to the engine.
pub enum Cmd {
    /// A new message; the reply says how many receivers it was handed to right away.
    Publish(Box<Publish>, oneshot::Sender<u32>),
    /// A receiver starts receiving on a channel.
    Register(String, Receiver),
    /// A receiver stops (connection closed, or moved).
    Unregister(String, u64),
    /// Acknowledgements from a connection.
    Ack(u64, Vec<String>),
    /// Frames carrying these messages were written to a connection's socket.
    Written(u64, Vec<Arc<str>>),
    /// Rows loaded from the database at start-up.
    Load(Vec<StoredRow>),
}

/// Counters.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Messages expired undelivered.
    pub expired: AtomicU64,
    /// Redeliveries (after a disconnect or an ack timeout).
    pub redelivered: AtomicU64,
    /// Messages completely delivered.
    pub completed: AtomicU64,
}

/// A handle to the engine.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<Cmd>,
    /// Counters.
    pub stats: Arc<EngineStats>,
}

impl Engine {
    /// Starts the engine task.
    pub fn start(storage: Arc<Storage>, cfg: StorageConfig) -> Engine {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(EngineStats::default());
        let state = State {
            finished_before_load: Some(Default::default()),
            msgs: HashMap::new(),
            chans: HashMap::new(),
            timeouts: BinaryHeap::new(),
            expiries: BinaryHeap::new(),
            storage,
            cfg,
            stats: Arc::clone(&stats),
            me: tx.clone(),
        };
        tokio::spawn(state.run(rx));
        Engine { tx, stats }
    }

    /// Sends a command (the engine lives as long as the broker).
    pub fn send(&self, cmd: Cmd) {
        let _ = self.tx.send(cmd);
    }

    /// A sender for `Written` confirmations.
    pub fn sender(&self) -> mpsc::UnboundedSender<Cmd> {
        self.tx.clone()
    }

    /// Publishes a message; returns how many receivers got it at once.
    pub async fn publish(&self, p: Publish) -> u32 {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Publish(Box::new(p), tx));
        rx.await.unwrap_or(0)
    }
}

struct Msg {
    key: Arc<str>,
    data_id: Option<i64>,
    channel: Arc<str>,
    /// The sender's frame (WSMB messages) or the item (rows of the original broker).
    frame: Option<Utf8Bytes>,
    legacy_item: Option<Arc<str>>,
    remaining: u32,
    expires_at: Option<u64>,
    delivered_to: Vec<u64>,
    inflight: Vec<u64>,
    deliveries: u32,
    ids: Vec<String>,
    report_to: Option<mpsc::Sender<Outgoing>>,
    sender: u64,
}

struct Rx {
    r: Receiver,
    inflight: u32,
    /// Legacy receivers: a rebuilt frame is queued and not yet written.
    unconfirmed: bool,
    cooling_until: Option<Instant>,
}

#[derive(Default)]
struct Chan {
    pending: VecDeque<Arc<str>>,
    receivers: Vec<Rx>,
    next: usize,
}

struct State {
    /// Until the stored rows are loaded: keys finished meanwhile (a row read before it was
    /// deleted must not come back).
    finished_before_load: Option<std::collections::HashSet<Arc<str>>>,
    msgs: HashMap<Arc<str>, Msg>,
    chans: HashMap<Arc<str>, Chan>,
    timeouts: BinaryHeap<Reverse<(Instant, u64, Arc<str>)>>,
    expiries: BinaryHeap<Reverse<(u64, Arc<str>)>>,
    storage: Arc<Storage>,
    cfg: StorageConfig,
    stats: Arc<EngineStats>,
    me: mpsc::UnboundedSender<Cmd>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Deserialize)]
struct DataOnly<'a> {
    #[serde(borrow)]
    data: Vec<&'a RawValue>,
}

/// How many pending messages one pump looks at, per channel.
const SCAN: usize = 512;

impl State {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    fn chan(&mut self, name: &str) -> &mut Chan {
        if !self.chans.contains_key(name) {
            self.chans.insert(Arc::from(name), Chan::default());
        }
        self.chans.get_mut(name).expect("inserted above")
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Publish(p, reply) => {
                let online = self.chans.get(p.channel.as_str()).map_or(0, |c| {
                    c.receivers.iter().filter(|r| r.r.conn != p.sender).count() as u32
                });
                let remaining = if p.limit == 0 { online.max(1) } else { p.limit };
                let key: Arc<str> = Arc::from(p.key.as_str());
                let channel: Arc<str> = Arc::from(p.channel.as_str());
                if let Some(e) = p.expires_at {
                    self.expiries.push(Reverse((e, Arc::clone(&key))));
                }
                let stored = p.data_id.is_some();
                self.msgs.insert(
                    Arc::clone(&key),
                    Msg {
                        key: Arc::clone(&key),
                        data_id: p.data_id,
                        channel: Arc::clone(&channel),
                        frame: Some(p.frame),
                        legacy_item: None,
                        remaining,
                        expires_at: p.expires_at,
                        delivered_to: Vec::new(),
                        inflight: Vec::new(),
                        deliveries: 0,
                        ids: p.ids,
                        report_to: p.report_to,
                        sender: p.sender,
                    },
                );
                self.chan(&channel).pending.push_back(Arc::clone(&key));
                self.pump(&channel);
                let handed = self.msgs.get(&key).map_or(remaining, |m| m.deliveries);
                if !stored {
                    // Not stored: it lives only as long as someone has it in hand.
                    if let Some(m) = self.msgs.get(&key) {
                        if m.inflight.is_empty() {
                            self.forget(&key);
                        }
                    }
                }
                let _ = reply.send(handed);
            }
            Cmd::Register(channel, r) => {
                let c = self.chan(&channel);
                c.receivers.retain(|x| x.r.conn != r.conn);
                c.receivers.push(Rx {
                    r,
                    inflight: 0,
                    unconfirmed: false,
                    cooling_until: None,
                });
                self.pump(&channel);
            }
            Cmd::Unregister(channel, conn) => {
                if let Some(c) = self.chans.get_mut(channel.as_str()) {
                    if let Some(pos) = c.receivers.iter().position(|x| x.r.conn == conn) {
                        c.receivers.remove(pos);
                        if pos < c.next {
                            c.next -= 1;
                        }
                    }
                }
                // What it had in hand goes back to the queue, first in line.
                let held: Vec<Arc<str>> = self
                    .msgs
                    .values()
                    .filter(|m| &*m.channel == channel.as_str() && m.inflight.contains(&conn))
                    .map(|m| Arc::clone(&m.key))
                    .collect();
                let mut back = Vec::new();
                for k in held {
                    if let Some(m) = self.msgs.get_mut(&k) {
                        m.inflight.retain(|c| *c != conn);
                        if m.data_id.is_none() && m.inflight.is_empty() {
                            back.push((k, false));
                        } else {
                            back.push((k, true));
                        }
                    }
                }
                for (k, keep) in back {
                    if keep {
                        self.stats.redelivered.fetch_add(1, Ordering::Relaxed);
                        self.requeue(&k);
                    } else {
                        self.forget(&k);
                    }
                }
                self.pump(&channel);
                if self
                    .chans
                    .get(channel.as_str())
                    .is_some_and(|c| c.receivers.is_empty() && c.pending.is_empty())
                {
                    self.chans.remove(channel.as_str());
                }
            }
            Cmd::Ack(conn, keys) => {
                for k in keys {
                    self.delivered(conn, &k, true);
                }
            }
            Cmd::Written(conn, keys) => {
                let mut channels = Vec::new();
                for k in &keys {
                    if let Some(m) = self.msgs.get(k) {
                        channels.push(Arc::clone(&m.channel));
                    }
                    self.delivered(conn, k, false);
                }
                for ch in channels {
                    if let Some(c) = self.chans.get_mut(&ch) {
                        if let Some(rx) = c.receivers.iter_mut().find(|r| r.r.conn == conn) {
                            rx.unconfirmed = false;
                        }
                    }
                    self.pump(&ch);
                }
            }
            Cmd::Load(rows) => {
                let mut channels = Vec::new();
                for row in rows {
                    let key: Arc<str> = Arc::from(
                        row.key
                            .clone()
                            .unwrap_or_else(|| format!("legacy-{}", row.data_id)),
                    );
                    let channel: Arc<str> = Arc::from(row.channel.as_str());
                    if let Some(e) = row.expires_at {
                        self.expiries.push(Reverse((e, Arc::clone(&key))));
                    }
                    let (frame, legacy_item) = match row.frame {
                        Some(f) => (Some(Utf8Bytes::from(f)), None),
                        None => (None, Some(Arc::from(row.data.as_str()))),
                    };
                    self.msgs.insert(
                        Arc::clone(&key),
                        Msg {
                            key: Arc::clone(&key),
                            data_id: Some(row.data_id),
                            channel: Arc::clone(&channel),
                            frame,
                            legacy_item,
                            remaining: row.remaining,
                            expires_at: row.expires_at,
                            delivered_to: Vec::new(),
                            inflight: Vec::new(),
                            deliveries: 0,
                            ids: Vec::new(),
                            report_to: None,
                            sender: 0,
                        },
                    );
                    self.chan(&channel).pending.push_back(key);
                    if !channels.contains(&channel) {
                        channels.push(channel);
                    }
                }
                for ch in channels {
                    self.pump(&ch);
                }
            }
        }
    }

    /// `conn` delivered (acknowledged, or wrote) message `key`.
    fn delivered(&mut self, conn: u64, key: &str, acked: bool) {
        let Some(m) = self.msgs.get_mut(key) else {
            return; // already complete or expired: a late duplicate ack
        };
        if !m.inflight.contains(&conn) {
            return;
        }
        m.inflight.retain(|c| *c != conn);
        m.delivered_to.push(conn);
        m.remaining = m.remaining.saturating_sub(1);
        let channel = Arc::clone(&m.channel);
        let (remaining, data_id) = (m.remaining, m.data_id);
        if acked {
            if let Some(c) = self.chans.get_mut(&channel) {
                if let Some(rx) = c.receivers.iter_mut().find(|r| r.r.conn == conn) {
                    rx.inflight = rx.inflight.saturating_sub(1);
                }
            }
        }
        if remaining == 0 {
            self.stats.completed.fetch_add(1, Ordering::Relaxed);
            self.forget(key);
        } else {
            if let Some(id) = data_id {
                self.storage.set_remaining(id, remaining);
            }
            if self.msgs.get(key).is_some_and(|m| m.inflight.is_empty()) {
                self.requeue(key);
            }
        }
        if acked {
            self.pump(&channel);
        }
    }

    /// Removes a message for good (delivered, expired, or unstorable).
    fn forget(&mut self, key: &str) {
        let Some(m) = self.msgs.remove(key) else {
            return;
        };
        if let Some(done) = &mut self.finished_before_load {
            done.insert(Arc::clone(&m.key));
        }
        if let Some(id) = m.data_id {
            self.storage.delete(id);
            self.storage.release(&m.channel);
        }
        if let Some(c) = self.chans.get_mut(&m.channel) {
            c.pending.retain(|k| &**k != key);
        }
    }

    fn requeue(&mut self, key: &str) {
        let Some(m) = self.msgs.get(key) else { return };
        let channel = Arc::clone(&m.channel);
        let k = Arc::clone(&m.key);
        let c = self.chan(&channel);
        if !c.pending.iter().any(|p| **p == *k) {
            c.pending.push_front(k);
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let mut touched = Vec::new();
        while let Some(Reverse((deadline, conn, key))) = self.timeouts.peek().cloned() {
            if deadline > now {
                break;
            }
            self.timeouts.pop();
            let Some(m) = self.msgs.get_mut(&key) else {
                continue;
            };
            if !m.inflight.contains(&conn) {
                continue;
            }
            debug!(message = %key, conn, "not acknowledged in time: redelivering");
            m.inflight.retain(|c| *c != conn);
            // Give it to someone else (or to this receiver again after it reconnects).
            m.delivered_to.push(conn);
            let channel = Arc::clone(&m.channel);
            if let Some(c) = self.chans.get_mut(&channel) {
                if let Some(rx) = c.receivers.iter_mut().find(|r| r.r.conn == conn) {
                    rx.inflight = rx.inflight.saturating_sub(1);
                }
            }
            self.stats.redelivered.fetch_add(1, Ordering::Relaxed);
            self.requeue(&key);
            touched.push(channel);
        }
        let secs = now_secs();
        while let Some(Reverse((at, key))) = self.expiries.peek().cloned() {
            if at > secs {
                break;
            }
            self.expiries.pop();
            if let Some(m) = self.msgs.get(&key) {
                if m.expires_at.is_some_and(|e| e <= secs) {
                    self.expire(&key);
                }
            }
        }
        // cooling legacy receivers, and anything else waiting
        let waiting: Vec<Arc<str>> = self
            .chans
            .iter()
            .filter(|(_, c)| !c.pending.is_empty() && !c.receivers.is_empty())
            .map(|(k, _)| Arc::clone(k))
            .collect();
        touched.extend(waiting);
        touched.sort();
        touched.dedup();
        for ch in touched {
            self.pump(&ch);
        }
    }

    fn expire(&mut self, key: &str) {
        let Some(m) = self.msgs.get(key) else { return };
        self.stats.expired.fetch_add(1, Ordering::Relaxed);
        debug!(message = %key, channel = %m.channel, "expired undelivered");
        if let Some(to) = &m.report_to {
            let frame = reply::encode(
                reply::EXPIRED,
                ResponseCode::Expired,
                &[ExpiredData {
                    message_id: m.key.to_string(),
                    channel: m.channel.to_string(),
                    ids: m.ids.clone(),
                }],
            );
            let _ = to.try_send(Outgoing::reply(Message::text(frame)));
        }
        // in flight somewhere: the receiver's later ack finds nothing, which is fine
        let inflight = m.inflight.clone();
        let channel = Arc::clone(&m.channel);
        for conn in inflight {
            if let Some(c) = self.chans.get_mut(&channel) {
                if let Some(rx) = c.receivers.iter_mut().find(|r| r.r.conn == conn) {
                    rx.inflight = rx.inflight.saturating_sub(1);
                }
            }
        }
        self.forget(key);
    }

    /// Hands pending messages of `channel` to receivers with room.
    fn pump(&mut self, channel: &str) {
        let now = Instant::now();
        let secs = now_secs();
        let mut expired = Vec::new();
        let mut i = 0;
        let mut scanned = 0;
        while let Some(c) = self.chans.get_mut(channel) {
            if c.receivers.is_empty() || i >= c.pending.len() || scanned >= SCAN {
                break;
            }
            scanned += 1;
            let key = Arc::clone(&c.pending[i]);
            let Some(m) = self.msgs.get(&key) else {
                c.pending.remove(i);
                continue;
            };
            if m.expires_at.is_some_and(|e| e <= secs) {
                expired.push(key);
                i += 1;
                continue;
            }
            let Some(idx) = pick(c, m, now) else {
                i += 1;
                continue;
            };
            c.next = (idx + 1) % c.receivers.len();
            i += if c.receivers[idx].r.ack {
                self.hand_ack(channel, idx, i, now)
            } else {
                self.hand_legacy(channel, idx, i, now, secs)
            };
        }
        for k in expired {
            self.expire(&k);
        }
    }

    /// Delivers pending message `i` to acknowledged receiver `idx`. Returns how far to move on
    /// in the pending queue (0 when the message left it).
    fn hand_ack(&mut self, channel: &str, idx: usize, i: usize, now: Instant) -> usize {
        let Some(c) = self.chans.get_mut(channel) else {
            return 1;
        };
        let key = Arc::clone(&c.pending[i]);
        let Some(m) = self.msgs.get_mut(&key) else {
            return 1;
        };
        let rx = &mut c.receivers[idx];
        let frame_text = match (&m.frame, &m.legacy_item) {
            (Some(f), _) => f.as_str().to_owned(),
            (None, Some(item)) => rebuild(&m.channel, &[item]),
            (None, None) => return 1,
        };
        let envelope = reply::deliver(&m.key, &m.channel, m.deliveries + 1, &frame_text);
        if rx
            .r
            .tx
            .try_send(Outgoing::data(Message::text(envelope)))
            .is_err()
        {
            return 1;
        }
        m.deliveries += 1;
        m.inflight.push(rx.r.conn);
        rx.inflight += 1;
        self.timeouts.push(Reverse((
            now + self.cfg.ack_timeout,
            rx.r.conn,
            Arc::clone(&key),
        )));
        // a message owed to several receivers stays in line for the next one
        if m.remaining as usize > m.inflight.len() {
            1
        } else {
            c.pending.remove(i);
            0
        }
    }

    /// Delivers to legacy receiver `idx`: pending message `i` alone and byte for byte when it
    /// is the only one it can take, else a rebuilt frame of at most `limit` items.
    fn hand_legacy(
        &mut self,
        channel: &str,
        idx: usize,
        i: usize,
        now: Instant,
        secs: u64,
    ) -> usize {
        let Some(c) = self.chans.get(channel) else {
            return 1;
        };
        let conn = c.receivers[idx].r.conn;
        let mut batch: Vec<Arc<str>> = Vec::new();
        let mut items = 0;
        for k in c.pending.iter().skip(i) {
            let Some(m) = self.msgs.get(k) else { continue };
            if m.sender == conn
                || m.delivered_to.contains(&conn)
                || m.inflight.contains(&conn)
                || m.expires_at.is_some_and(|e| e <= secs)
            {
                continue;
            }
            let n = count_items(m);
            if !batch.is_empty() && items + n > self.cfg.limit {
                break;
            }
            items += n;
            batch.push(Arc::clone(k));
            if items >= self.cfg.limit {
                break;
            }
        }
        let Some(first) = batch.first().and_then(|k| self.msgs.get(k)) else {
            return 1;
        };
        let text = match (&first.frame, batch.len()) {
            (Some(f), 1) => f.clone(),
            _ => {
                let all: Vec<String> = batch
                    .iter()
                    .filter_map(|k| self.msgs.get(k))
                    .flat_map(items_of)
                    .collect();
                let refs: Vec<&str> = all.iter().map(String::as_str).collect();
                Utf8Bytes::from(rebuild(channel, &refs))
            }
        };
        let out = Outgoing {
            msg: Message::Text(text),
            bytes: 0,
            written: Some(Written {
                to: self.me.clone(),
                conn,
                keys: batch.clone(),
            }),
        };
        let Some(c) = self.chans.get_mut(channel) else {
            return 1;
        };
        let rx = &mut c.receivers[idx];
        if rx.r.tx.try_send(out).is_err() {
            return 1;
        }
        rx.unconfirmed = true;
        if batch.len() > 1 && !self.cfg.delay_send.is_zero() {
            rx.cooling_until = Some(now + self.cfg.delay_send);
        }
        let mut stays = Vec::new();
        for k in &batch {
            if let Some(m) = self.msgs.get_mut(k) {
                m.deliveries += 1;
                m.inflight.push(conn);
                if m.remaining as usize > m.inflight.len() {
                    stays.push(Arc::clone(k));
                }
            }
        }
        let first_stays = stays.contains(&batch[0]);
        c.pending
            .retain(|p| !batch.contains(p) || stays.contains(p));
        usize::from(first_stays)
    }
}

/// The next receiver in turn that can take `m` now.
fn pick(c: &Chan, m: &Msg, now: Instant) -> Option<usize> {
    let n = c.receivers.len();
    (0..n).map(|k| (c.next + k) % n).find(|&idx| {
        let rx = &c.receivers[idx];
        let eligible = rx.r.conn != m.sender
            && !m.delivered_to.contains(&rx.r.conn)
            && !m.inflight.contains(&rx.r.conn)
            && !rx.r.ctl.close_requested();
        let free = if rx.r.ack {
            rx.inflight < rx.r.window
        } else {
            !rx.unconfirmed && rx.cooling_until.is_none_or(|t| t <= now)
        };
        eligible && free
    })
}

fn count_items(m: &Msg) -> usize {
    match &m.frame {
        Some(f) => {
            serde_json::from_str::<DataOnly<'_>>(f.as_str()).map_or(1, |d| d.data.len().max(1))
        }
        None => 1,
    }
}

fn items_of(m: &Msg) -> Vec<String> {
    match (&m.frame, &m.legacy_item) {
        (Some(f), _) => match serde_json::from_str::<DataOnly<'_>>(f.as_str()) {
            Ok(d) => d.data.iter().map(|r| r.get().to_owned()).collect(),
            Err(e) => {
                warn!("stored frame unreadable ({e}); sending it whole");
                vec![f.as_str().to_owned()]
            }
        },
        (None, Some(item)) => vec![item.to_string()],
        (None, None) => Vec::new(),
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
