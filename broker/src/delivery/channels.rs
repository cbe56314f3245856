//! Channel membership, receiver rotation and the receiver limit: the one implementation both
//! backends use.
//!
//! The table lives behind one mutex in [`super::Engine`]; it is held only for map lookups and
//! non-blocking queue pushes, never across an `.await`.
//!
//! Fairness: when a message goes to N of M receivers (N < M), selection starts where the
//! previous message on that channel stopped, so receivers take turns (competing consumers)
//! instead of the legacy broker's "first N in connection order".

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::outbox::Outbox;
use crate::stats::{ChannelCounters, MAX_COUNTED_CHANNELS, OTHER_CHANNELS};

/// Rows a receiver in acknowledged mode holds under one message id (a message fanned out to
/// several receivers is one row per copy; after a redelivery one receiver may hold two).
pub(super) type HeldRows = Vec<(i64, u32)>;

/// A receiver of a channel.
pub(super) struct Receiver {
    /// Its connection.
    pub conn: u64,
    /// Its outgoing queue.
    pub outbox: Arc<Outbox>,
    /// Acknowledged mode.
    pub ack: bool,
    /// Most stored messages it holds unconfirmed.
    pub window: u32,
    /// Durable: what it holds.
    pub held: Held,
    /// Its name in the store's claims (`<node>/<conn>`), made once.
    pub holder: std::sync::OnceLock<Arc<str>>,
    /// Legacy receivers: no backlog before this instant (`storage.delay_send` after it
    /// registered, as the original flushed its table).
    pub ready_at: Option<Instant>,
}

/// What a receiver holds of the store (durable backend only).
#[derive(Default)]
pub(super) struct Held {
    /// Acknowledged mode: rows by message id, until acknowledged.
    pub acks: HashMap<Arc<str>, HeldRows>,
    /// Acknowledged mode: (deadline, message id), oldest first.
    pub deadlines: VecDeque<(Instant, Arc<str>)>,
    /// Legacy mode: rows in frames not yet written (in its outbox, or in `queue`).
    pub legacy_rows: usize,
    /// Legacy mode: frames of stored rows taken for it that its outbox had no room for yet
    /// (bounded: a claim asks for at most `PREFETCH_BYTES` minus what waits here).
    pub queue: VecDeque<crate::outbox::Out>,
    /// Bytes in `queue`.
    pub queue_bytes: usize,
    /// Messages that timed out here, so that the next delivery prefers someone else (bounded).
    pub timed_out: VecDeque<i64>,
}

impl Held {
    /// Remembers a timeout of `data_id` here.
    pub fn timed_out(&mut self, data_id: i64) {
        if self.timed_out.len() >= 256 {
            self.timed_out.pop_front();
        }
        self.timed_out.push_back(data_id);
    }
}

impl Receiver {
    /// Stored rows it could take now (durable backend), by its window.
    pub fn room(&self, now: Instant) -> usize {
        if self.outbox.stop_requested().is_some() || self.outbox.is_gone() {
            return 0;
        }
        if self.ready_at.is_some_and(|t| t > now) {
            return 0;
        }
        let held = if self.ack {
            self.held.acks.len()
        } else {
            self.held.legacy_rows
        };
        (self.window as usize).saturating_sub(held)
    }
}

/// The backlog of a channel: rows in the store that nobody holds (durable backend only).
#[derive(Default)]
pub(super) struct Backlog {
    /// There may be free rows in the store.
    pub maybe: bool,
    /// A claim is on its way to the store.
    pub fetching: bool,
}

impl Backlog {
    /// Whether fresh messages must queue behind stored ones (to keep their order).
    pub fn pending(&self) -> bool {
        self.maybe || self.fetching
    }

    /// Rows were made free (inserted unclaimed, or released): receivers should look.
    pub fn freed(&mut self, _n: u64) {
        self.maybe = true;
    }
}

/// A channel.
#[derive(Default)]
pub(super) struct Channel {
    /// Its receivers, in registration order.
    pub receivers: Vec<Receiver>,
    /// Where the next rotation starts.
    pub next: usize,
    /// Durable backend.
    pub backlog: Backlog,
}

impl Channel {
    /// The receivers that should get a message limited to `limit` receivers (0 = all), in
    /// turn: the order to try them in, how many are wanted, and whether the rotation moves on
    /// (only when `limit` is below the count). No allocation: a message is routed per call.
    pub fn order(&self, limit: u32) -> (Order, usize, bool) {
        let n = self.receivers.len();
        let limit = limit as usize;
        let rotate = limit != 0 && limit < n;
        let want = if rotate { limit } else { n };
        let start = if rotate && n > 0 { self.next % n } else { 0 };
        (Order { start, n }, want, rotate)
    }

    /// Moves the rotation on: `examined` receivers were looked at from the start of `order`.
    pub fn advance(&mut self, order: &Order, examined: usize, rotate: bool) {
        if rotate && order.n > 0 {
            self.next = (order.start + examined) % order.n;
        }
    }

    /// Index of the receiver of connection `conn`.
    pub fn find(&self, conn: u64) -> Option<usize> {
        self.receivers.iter().position(|r| r.conn == conn)
    }

    /// Whether the channel can be dropped from the table.
    pub fn is_idle(&self) -> bool {
        self.receivers.is_empty() && !self.backlog.maybe && !self.backlog.fetching
    }
}

/// Receiver indexes from `start` round to `start - 1`.
#[derive(Debug, Clone, Copy)]
pub struct Order {
    start: usize,
    n: usize,
}

impl Order {
    /// The indexes, in order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + use<> {
        let (start, n) = (self.start, self.n);
        (0..n).map(move |k| (start + k) % n)
    }

    /// How many.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.n
    }

    /// The first, if any.
    #[cfg(test)]
    pub fn first(&self) -> Option<usize> {
        (self.n > 0).then_some(self.start)
    }
}

/// Pushes growing exactly while small (most channels have one or two receivers, most
/// connections one channel), by doubling past that.
pub(super) fn push_compact<T>(v: &mut Vec<T>, x: T) {
    if v.len() == v.capacity() && v.len() < 4 {
        v.reserve_exact(1);
    }
    v.push(x);
}

/// Every channel, and the channels each connection receives on.
#[derive(Default)]
pub(super) struct Table {
    /// Channels with receivers or a backlog.
    pub chans: HashMap<Arc<str>, Channel>,
    /// Channels each receiving connection is on.
    pub conns: HashMap<u64, Vec<Arc<str>>>,
    /// Counters of every channel a message was published on, kept when the channel goes idle
    /// (bounded: see [`MAX_COUNTED_CHANNELS`]).
    pub counted: HashMap<Arc<str>, Arc<ChannelCounters>>,
}

impl Table {
    /// The channel, created if missing; returns its shared name too.
    pub fn channel(&mut self, name: &str) -> (Arc<str>, &mut Channel) {
        let key: Arc<str> = match self.chans.get_key_value(name) {
            Some((k, _)) => Arc::clone(k),
            None => {
                let k: Arc<str> = Arc::from(name);
                self.chans.insert(Arc::clone(&k), Channel::default());
                k
            }
        };
        let ch = self.chans.entry(Arc::clone(&key)).or_default();
        (key, ch)
    }

    /// The counters of `name` (created on first use; past [`MAX_COUNTED_CHANNELS`] channels,
    /// the shared ones of [`OTHER_CHANNELS`]). A map lookup under the table's lock, which
    /// every caller holds anyway: no lock of its own.
    pub fn counters(&mut self, name: &str) -> Arc<ChannelCounters> {
        if let Some(c) = self.counted.get(name) {
            return Arc::clone(c);
        }
        let key = if self.counted.len() + 1 >= MAX_COUNTED_CHANNELS {
            OTHER_CHANNELS
        } else {
            name
        };
        Arc::clone(self.counted.entry(Arc::from(key)).or_default())
    }

    /// Adds a receiver (replacing one of the same connection).
    pub fn add(&mut self, channel: &str, r: Receiver) -> Arc<str> {
        let conn = r.conn;
        let (name, ch) = self.channel(channel);
        if let Some(i) = ch.find(conn) {
            ch.receivers.remove(i);
            if i < ch.next {
                ch.next -= 1;
            }
        }
        push_compact(&mut ch.receivers, r);
        let list = self.conns.entry(conn).or_default();
        if !list.iter().any(|c| **c == *channel) {
            push_compact(list, Arc::clone(&name));
        }
        name
    }

    /// Removes the receiver of `conn` from `channel`.
    pub fn remove(&mut self, channel: &str, conn: u64) -> Option<Receiver> {
        let ch = self.chans.get_mut(channel)?;
        let i = ch.find(conn)?;
        let r = ch.receivers.remove(i);
        if i < ch.next {
            ch.next -= 1;
        }
        if ch.is_idle() {
            self.chans.remove(channel);
        }
        if let Some(list) = self.conns.get_mut(&conn) {
            list.retain(|c| **c != *channel);
            if list.is_empty() {
                self.conns.remove(&conn);
            }
        }
        Some(r)
    }

    /// Receiver registrations and channels with receivers.
    pub fn totals(&self) -> (usize, usize) {
        let with: Vec<&Channel> = self
            .chans
            .values()
            .filter(|c| !c.receivers.is_empty())
            .collect();
        (with.iter().map(|c| c.receivers.len()).sum(), with.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rx(conn: u64) -> Receiver {
        Receiver {
            conn,
            outbox: Arc::new(Outbox::new(10, 1000)),
            ack: false,
            window: 10,
            held: Held::default(),
            holder: Default::default(),
            ready_at: None,
        }
    }

    #[test]
    fn rotation_takes_turns_and_survives_removal() {
        let mut t = Table::default();
        for c in 1..=3 {
            t.add("sms", rx(c));
        }
        let mut got = Vec::new();
        for _ in 0..6 {
            let ch = t.chans.get_mut("sms").expect("ch");
            let (order, want, rotate) = ch.order(1);
            assert_eq!(want, 1);
            got.push(ch.receivers[order.first().expect("one")].conn);
            ch.advance(&order, 1, rotate);
        }
        assert_eq!(got, vec![1, 2, 3, 1, 2, 3]);
        t.remove("sms", 2);
        let ch = t.chans.get_mut("sms").expect("ch");
        let (order, _, _) = ch.order(1);
        assert_eq!(ch.receivers[order.first().expect("one")].conn, 1);
        // 0 = all, no rotation
        let (order, want, rotate) = ch.order(0);
        assert_eq!((order.len(), want, rotate), (2, 2, false));
        t.remove("sms", 1);
        t.remove("sms", 3);
        assert!(t.chans.is_empty() && t.conns.is_empty());
    }

    #[test]
    fn channels_match_exactly() {
        let mut t = Table::default();
        t.add("01", rx(1));
        assert!(!t.chans.contains_key("1"));
        assert_eq!(t.totals(), (1, 1));
    }
}
