//! The delivery engine: where a message is accepted, stored, routed and handed to receivers'
//! queues. One interface ([`Engine::subscribe`], [`Engine::unsubscribe`], [`Engine::publish`],
//! [`Engine::written`], [`Engine::ack`]; expiry runs by itself) over two backends:
//!
//! - **memory** (`storage.backend = "memory"`): nothing is stored. A message goes to the
//!   receivers online; a receiver whose queue is full makes the sender wait (flow control) up
//!   to `slow_receiver_timeout`, then is closed or passed over (`slow_receiver`).
//! - **durable** (SQLite, MariaDB/MySQL, PostgreSQL; [`crate::storage`]): every message is
//!   written to the store before its sender's `00`. Receivers with room get it at once (the row
//!   is marked held by them); otherwise it waits in the store, and receivers take the oldest
//!   free rows as fast as they make room ([`durable`]). RAM holds no backlog: only the rows each
//!   receiver holds (bounded by its window) and per-channel counters.
//!
//! Both use [`channels`]: channel membership, rotation among receivers, the receiver limit.
//!
//! A message's path: the session (`conn`) parses a `send-message` and calls [`Engine::publish`];
//! the engine picks receivers ([`channels::Channel::order`]), queues the insert ([`Storage`]),
//! and pushes the frame into each chosen receiver's [`Outbox`]; the receiver's session writes
//! it and reports back with [`Engine::written`] (legacy receivers) or the receiver sends `ack`
//! ([`Engine::ack`]); the engine then completes the row in the store.
//!
//! The engine imports neither the session nor the server: it sees connections only as their
//! id and their [`Outbox`].

mod channels;
mod durable;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::info;
use wsmb_protocol::ResponseCode;

use crate::config::{Config, SlowReceiverPolicy};
use crate::outbox::{Carried, Out, Outbox, Refused, Stop};
use crate::stats::Stats;
use crate::storage::{Committed, Storage, StoreError};
use crate::ws::{Text, close};

pub use durable::Report;

/// What the engine needs of the configuration.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// How long a sender waits for a full receiver (memory mode, and fan-out).
    pub slow_receiver_timeout: Duration,
    /// What happens to a receiver still full then.
    pub slow_receiver: SlowReceiverPolicy,
    /// Acknowledged mode: time to acknowledge before redelivery.
    pub ack_timeout: Duration,
    /// How long a legacy receiver holds a row before its write must have happened.
    pub write_timeout: Duration,
    /// Items per frame rebuilt for a legacy receiver's backlog.
    pub limit: usize,
    /// Delay of a legacy receiver's first backlog frame after it registers.
    pub delay_send: Duration,
    /// Largest frame rebuilt from stored rows.
    pub max_frame: usize,
    /// Stored rows a legacy receiver holds in frames not yet written.
    pub legacy_window: u32,
    /// This broker's name in claims.
    pub node: String,
}

impl DeliveryConfig {
    /// From the broker configuration.
    pub fn from_config(c: &Config) -> DeliveryConfig {
        DeliveryConfig {
            slow_receiver_timeout: c.server.slow_receiver_timeout,
            slow_receiver: c.server.slow_receiver,
            ack_timeout: c.storage.ack_timeout,
            write_timeout: c.server.write_timeout,
            limit: c.storage.limit,
            delay_send: c.storage.delay_send,
            max_frame: c
                .server
                .max_message_bytes
                .min(c.server.outgoing_queue_bytes),
            legacy_window: durable::LEGACY_WINDOW,
            node: c.storage.node.clone(),
        }
    }
}

/// A connection that starts receiving on a channel.
pub struct Subscriber {
    /// Its connection id.
    pub conn: u64,
    /// Its outgoing queue.
    pub outbox: Arc<Outbox>,
    /// Acknowledged mode (durable backend; ignored in memory mode).
    pub ack: bool,
    /// Most unacknowledged messages.
    pub window: u32,
}

/// A `send-message` to route.
pub struct Publish<'a> {
    /// The sending connection (never a receiver of its own message).
    pub sender: u64,
    /// The channel.
    pub channel: &'a str,
    /// The broker's id for it.
    pub message_id: String,
    /// The sender's frame, verbatim.
    pub frame: Text,
    /// `number_of_receiver` in force (0 = all).
    pub limit: u32,
    /// Epoch seconds.
    pub expires_at: Option<u64>,
    /// Whom to tell if it expires undelivered.
    pub report: Option<Report>,
}

/// How a `send-message` ended, for its `send-result`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `response_code`.
    pub code: ResponseCode,
    /// Receivers it was handed to.
    pub receivers: u32,
    /// Durable backend: whether it is safe from a broker crash.
    pub stored: Option<bool>,
    /// Why it was not accepted.
    pub reason: Option<String>,
}

impl Outcome {
    fn refused(code: ResponseCode, reason: String) -> Outcome {
        Outcome {
            code,
            receivers: 0,
            stored: Some(false),
            reason: Some(reason),
        }
    }
}

/// A published message: its outcome, or what it waits for.
pub enum Accepted {
    /// Known now.
    Done(Outcome),
    /// Waiting for the commit of its row.
    Committing {
        /// The commit.
        commit: oneshot::Receiver<Result<Committed, StoreError>>,
        /// Receivers it was handed to.
        receivers: u32,
    },
}

impl Accepted {
    /// The outcome, once known.
    pub async fn outcome(self) -> Outcome {
        match self {
            Accepted::Done(o) => o,
            Accepted::Committing { commit, receivers } => {
                let r = commit.await.unwrap_or_else(|_| {
                    Err(StoreError::Unavailable("the storage writer stopped".into()))
                });
                match r {
                    Ok(_) => Outcome {
                        code: ResponseCode::Accepted,
                        receivers,
                        stored: Some(true),
                        reason: None,
                    },
                    Err(_) if receivers > 0 => Outcome {
                        code: ResponseCode::Accepted,
                        receivers,
                        stored: Some(false),
                        reason: None,
                    },
                    Err(e) => Outcome::refused(
                        ResponseCode::StorageUnavailable,
                        format!(
                            "no receiver is online and the message cannot be stored: {e}; retry \
                             later"
                        ),
                    ),
                }
            }
        }
    }
}

/// A channel as [`Engine::channels`] shows it.
#[derive(Debug, Clone)]
pub struct ChannelView {
    /// Its name.
    pub name: String,
    /// Receivers registered now.
    pub receivers: usize,
    /// Messages stored for it (waiting for a receiver or an acknowledgement).
    pub stored: usize,
    /// Its counters since start (zero for a channel nobody published on).
    pub counters: Arc<crate::stats::ChannelCounters>,
}

/// The delivery engine, shared by every connection.
pub struct Engine {
    table: Mutex<channels::Table>,
    store: Option<Arc<Storage>>,
    cfg: DeliveryConfig,
    stats: Arc<Stats>,
    reports: Mutex<durable::Reports>,
    reports_n: AtomicUsize,
    me: Weak<Engine>,
}

impl Engine {
    /// An engine over `store` (`None`: memory backend). With a store, starts its background
    /// work (expiry, acknowledgement deadlines, backlog polling) until `shutdown`.
    pub fn new(
        cfg: DeliveryConfig,
        store: Option<Arc<Storage>>,
        stats: Arc<Stats>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Arc<Engine> {
        let engine = Arc::new_cyclic(|me| Engine {
            table: Mutex::new(channels::Table::default()),
            store,
            cfg,
            stats,
            reports: Mutex::new(durable::Reports::default()),
            reports_n: AtomicUsize::new(0),
            me: me.clone(),
        });
        if engine.store.is_some() {
            durable::spawn_background(&engine, shutdown);
        }
        engine
    }

    fn lock(&self) -> MutexGuard<'_, channels::Table> {
        // Held only for lookups and non-blocking pushes; a panic while holding it leaves a
        // table that is still usable.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store, with the durable backend.
    pub fn store(&self) -> Option<&Arc<Storage>> {
        self.store.as_ref()
    }

    /// Receiver registrations and channels with receivers.
    pub fn totals(&self) -> (usize, usize) {
        self.lock().totals()
    }

    /// Every channel now: its counters, receivers and stored messages (durable backend),
    /// sorted by name. Channels counted together past the bound appear as one
    /// ([`crate::stats::OTHER_CHANNELS`]).
    pub fn channels(&self) -> Vec<ChannelView> {
        let mut v: Vec<ChannelView> = {
            let t = self.lock();
            let mut v: Vec<ChannelView> = t
                .counted
                .iter()
                .map(|(name, c)| ChannelView {
                    name: name.to_string(),
                    receivers: t.chans.get(name).map_or(0, |ch| ch.receivers.len()),
                    stored: 0,
                    counters: Arc::clone(c),
                })
                .collect();
            for (name, ch) in &t.chans {
                if !t.counted.contains_key(name) && !ch.receivers.is_empty() {
                    v.push(ChannelView {
                        name: name.to_string(),
                        receivers: ch.receivers.len(),
                        stored: 0,
                        counters: Arc::default(),
                    });
                }
            }
            v
        };
        if let Some(store) = &self.store {
            for (name, n) in store.stored_per_channel() {
                match v.iter_mut().find(|c| *c.name == *name) {
                    Some(c) => c.stored = n,
                    None => v.push(ChannelView {
                        name: name.to_string(),
                        receivers: 0,
                        stored: n,
                        counters: Arc::default(),
                    }),
                }
            }
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Receivers of `channel` now.
    pub fn receivers(&self, channel: &str) -> usize {
        self.lock()
            .chans
            .get(channel)
            .map_or(0, |c| c.receivers.len())
    }

    /// Registers a receiver on `channel` (again: no effect but its new settings).
    pub fn subscribe(&self, channel: &str, s: Subscriber) {
        let now = Instant::now();
        let ready_at = (self.store.is_some() && !s.ack && !self.cfg.delay_send.is_zero())
            .then(|| now + self.cfg.delay_send);
        let r = channels::Receiver {
            conn: s.conn,
            outbox: s.outbox,
            ack: s.ack && self.store.is_some(),
            window: if s.ack {
                s.window.max(1)
            } else {
                self.cfg.legacy_window
            },
            held: channels::Held::default(),
            holder: Default::default(),
            ready_at,
        };
        let name = {
            let mut t = self.lock();
            if let Some(old) = t.chans.get(channel).and_then(|c| {
                c.find(r.conn)
                    .map(|i| c.receivers[i].held.acks.len() + c.receivers[i].held.legacy_rows)
            }) {
                if old > 0 {
                    // Re-registering keeps what it holds: nothing to do but stay.
                    return;
                }
            }
            t.add(channel, r)
        };
        if self.store.is_some() {
            if let Some(at) = ready_at {
                durable::pump_at(self, name, at);
            } else {
                self.pump(&name);
            }
        }
    }

    /// `conn` stops receiving on `channel`; what it held goes back to the store, free.
    pub fn unsubscribe(&self, channel: &str, conn: u64) {
        let Some(r) = self.lock().remove(channel, conn) else {
            return;
        };
        if self.store.is_some() {
            self.give_back(channel, r.held);
        }
    }

    /// The frames written to `conn`'s socket carried these stored rows: they are delivered.
    pub fn written(&self, conn: u64, carried: Vec<Carried>) {
        durable::written(self, conn, carried);
    }

    /// Frames carrying these stored rows will never be written (the connection ended).
    pub fn dropped(&self, carried: Vec<Carried>) {
        durable::dropped(self, carried);
    }

    /// Acknowledgements from `conn`.
    pub fn ack(&self, conn: u64, ids: &[&str]) {
        durable::ack(self, conn, ids);
    }

    /// Takes back a stored message that no receiver has been handed yet (a cancelled SMS).
    /// `Ok(true)`: it will never be delivered; `Ok(false)`: it was handed out already, or it
    /// is not stored (memory backend).
    pub async fn withdraw(&self, message_id: &str) -> Result<bool, StoreError> {
        let Some(store) = &self.store else {
            return Ok(false);
        };
        Ok(!store.withdraw(message_id).await?.is_empty())
    }

    /// Routes one message.
    pub async fn publish(&self, p: Publish<'_>) -> Accepted {
        if self.store.is_some() {
            return durable::publish(self, p).await;
        }
        let frame = p.frame;
        let (delivered, full, counters) = {
            let mut t = self.lock();
            let counters = t.counters(p.channel);
            let (delivered, full) = match t.chans.get_mut(p.channel) {
                None => (0, Vec::new()),
                Some(ch) => hand_live(ch, p.sender, p.limit, &frame),
            };
            (delivered, full, counters)
        };
        counters.messages_in.fetch_add(1, Ordering::Relaxed);
        let (late, busy) = self.wait_for_room(full, &frame).await;
        let delivered = delivered + late;
        self.stats
            .deliveries
            .fetch_add(u64::from(delivered), Ordering::Relaxed);
        counters
            .deliveries
            .fetch_add(u64::from(delivered), Ordering::Relaxed);
        let code = if delivered > 0 {
            ResponseCode::Accepted
        } else if busy > 0 {
            ResponseCode::ReceiversBusy
        } else {
            self.stats.unrouted.fetch_add(1, Ordering::Relaxed);
            counters.unrouted.fetch_add(1, Ordering::Relaxed);
            ResponseCode::NoReceiver
        };
        Accepted::Done(Outcome {
            code,
            receivers: delivered,
            stored: None,
            reason: None,
        })
    }

    /// Flow control: waits (the sender is not read meanwhile) for receivers that were full, up
    /// to `slow_receiver_timeout` in all, and queues the frame to each that makes room. A
    /// receiver still full then is slow: closed, or passed over and not waited for again until
    /// it drains. Returns (handed late, stayed full).
    async fn wait_for_room(&self, full: Vec<Arc<Outbox>>, frame: &Text) -> (u32, u32) {
        let mut late = 0;
        let mut busy = 0;
        if full.is_empty() {
            return (0, 0);
        }
        let deadline = tokio::time::Instant::now() + self.cfg.slow_receiver_timeout;
        for ob in full {
            if ob.is_lagging() {
                busy += 1;
                continue;
            }
            match tokio::time::timeout_at(deadline, ob.push(Out::text(frame.bytes().clone()))).await
            {
                Ok(Ok(())) => late += 1,
                Ok(Err(_)) => {}
                Err(_) => {
                    busy += 1;
                    self.slow(&ob);
                }
            }
        }
        (late, busy)
    }

    fn slow(&self, ob: &Outbox) {
        match self.cfg.slow_receiver {
            SlowReceiverPolicy::Disconnect => {
                self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                info!(
                    conn = ob.conn(),
                    "closing a slow consumer (its queue stayed full for \
                     server.slow_receiver_timeout)"
                );
                ob.stop(Stop::Close {
                    code: close::POLICY,
                    reason: "slow consumer: outgoing queue full",
                    drain: false,
                });
            }
            SlowReceiverPolicy::Skip => {
                info!(
                    conn = ob.conn(),
                    "passing over a slow consumer (its queue stayed full for \
                     server.slow_receiver_timeout)"
                );
                ob.set_lagging();
            }
        }
    }

    /// Kicks the backlog of `channel`: receivers with room take stored rows.
    fn pump(&self, channel: &Arc<str>) {
        durable::pump(self, channel);
    }

    /// Frees what a receiver held (it left, or its connection ended).
    fn give_back(&self, channel: &str, held: channels::Held) {
        durable::give_back(self, channel, held);
    }
}

/// Queues `frame` to the receivers of `ch` that have room, in turn, up to `limit` (0 = all),
/// never to `sender`. Returns how many took it, and the receivers that would have been chosen
/// but were full (to wait for, outside the lock), as many as are still missing.
fn hand_live(
    ch: &mut channels::Channel,
    sender: u64,
    limit: u32,
    frame: &Text,
) -> (u32, Vec<Arc<Outbox>>) {
    let (order, want, rotate) = ch.order(limit);
    let mut delivered = 0u32;
    let mut full = Vec::new();
    let mut examined = 0;
    for i in order.iter() {
        if delivered as usize >= want {
            break;
        }
        examined += 1;
        let r = &ch.receivers[i];
        if r.conn == sender {
            continue;
        }
        match r.outbox.try_push(Out::text(frame.bytes().clone())) {
            Ok(()) => delivered += 1,
            Err((Refused::Full, _)) => full.push(Arc::clone(&r.outbox)),
            Err((Refused::Closed, _)) => {}
        }
    }
    ch.advance(&order, examined, rotate);
    let missing = want.saturating_sub(delivered as usize);
    full.truncate(missing);
    (delivered, full)
}
