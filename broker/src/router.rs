//! Channels and their receivers, and the choice of who gets each message.
//!
//! One mutex guards the whole table; it is held only for map lookups and non-blocking queue
//! pushes, never across an `.await`. Delivery hands each chosen receiver a clone of the same
//! `Message` (a reference-counted buffer), so fan-out copies no payload.
//!
//! Fairness: when a message goes to N of M receivers (N < M), selection starts where the previous
//! message on that channel stopped, so receivers take turns (competing consumers) instead of the
//! legacy broker's "first N in connection order".

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{ConnControl, Outgoing};

/// A connection registered as a receiver.
#[derive(Clone)]
pub struct ReceiverHandle {
    /// Connection id.
    pub id: u64,
    /// Its outgoing queue.
    pub tx: mpsc::Sender<Outgoing>,
    /// Its control block (to close a slow consumer).
    pub ctl: Arc<ConnControl>,
}

#[derive(Default)]
struct Channel {
    receivers: Vec<ReceiverHandle>,
    next: usize,
}

/// Outcome of the immediate part of a delivery.
#[derive(Default)]
pub struct Delivery {
    /// Receivers the message was queued to.
    pub delivered: u32,
    /// Chosen receivers whose queue was full, in the order they were chosen.
    pub full: Vec<ReceiverHandle>,
    /// How many more receivers should get the message (at most `full.len()`).
    pub missing: usize,
}

/// The channel table.
#[derive(Default)]
pub struct Router {
    channels: Mutex<HashMap<Box<str>, Channel>>,
}

impl Router {
    fn lock(&self) -> MutexGuard<'_, HashMap<Box<str>, Channel>> {
        // A panic while holding the lock cannot leave the table inconsistent in a way that
        // matters more than losing the broker, so keep serving.
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `h` as a receiver of `channel` (no effect if it already is).
    pub fn subscribe(&self, channel: &str, h: ReceiverHandle) {
        let mut map = self.lock();
        let ch = map.entry(channel.into()).or_default();
        if !ch.receivers.iter().any(|r| r.id == h.id) {
            ch.receivers.push(h);
        }
    }

    /// Removes connection `id` from `channel`.
    pub fn unsubscribe(&self, channel: &str, id: u64) {
        let mut map = self.lock();
        if let Some(ch) = map.get_mut(channel) {
            if let Some(pos) = ch.receivers.iter().position(|r| r.id == id) {
                ch.receivers.remove(pos);
                if pos < ch.next {
                    ch.next -= 1;
                }
            }
            if ch.receivers.is_empty() {
                map.remove(channel);
            }
        }
    }

    /// Number of receivers of `channel`.
    pub fn receivers(&self, channel: &str) -> usize {
        self.lock().get(channel).map_or(0, |c| c.receivers.len())
    }

    /// Total receiver registrations and channels with receivers.
    pub fn totals(&self) -> (usize, usize) {
        let map = self.lock();
        (map.values().map(|c| c.receivers.len()).sum(), map.len())
    }

    /// Queues `msg` to up to `limit` receivers of `channel` (0 = all), never to connection
    /// `exclude` (the sender), preferring receivers with room in their queue. Receivers that
    /// would have been chosen but are full are returned in [`Delivery::full`], for the caller to
    /// wait on (outside this lock) when the others could not take the message.
    pub fn deliver(
        &self,
        channel: &str,
        limit: u32,
        exclude: u64,
        msg: &Message,
        max_bytes: usize,
    ) -> Delivery {
        let len = msg.len();
        let mut out = Delivery::default();
        let mut map = self.lock();
        let Some(ch) = map.get_mut(channel) else {
            return out;
        };
        let n = ch.receivers.len();
        if n == 0 {
            return out;
        }
        let limit = limit as usize;
        let rotate = limit != 0 && limit < n;
        let want = if rotate { limit } else { n };
        let start = if rotate { ch.next % n } else { 0 };
        let mut examined = 0;
        while examined < n && (out.delivered as usize) < want {
            let r = &ch.receivers[(start + examined) % n];
            examined += 1;
            if r.id == exclude {
                continue;
            }
            if !r.ctl.reserve(len, max_bytes) {
                out.full.push(r.clone());
                continue;
            }
            match r.tx.try_send(Outgoing::counted(msg.clone(), len)) {
                Ok(()) => out.delivered += 1,
                Err(e) => {
                    r.ctl.release(len);
                    if let TrySendError::Full(_) = e {
                        out.full.push(r.clone());
                    }
                    // Closed: the connection is going away and unsubscribes itself.
                }
            }
        }
        out.missing = want
            .saturating_sub(out.delivered as usize)
            .min(out.full.len());
        if rotate {
            ch.next = (start + examined) % n;
        }
        out
    }
}

/// Waits until `r` has room for `msg` and queues it. Returns false if the connection went away.
/// Cancel-safe: dropped while waiting, it gives back what it reserved.
pub async fn send_when_room(r: &ReceiverHandle, msg: &Message, max_bytes: usize) -> bool {
    let len = msg.len();
    loop {
        let room = r.ctl.room_notified();
        tokio::pin!(room);
        room.as_mut().enable();
        if r.ctl.reserve(len, max_bytes) {
            break;
        }
        tokio::select! {
            _ = room => {}
            _ = r.ctl.gone() => return false,
        }
    }
    struct Release<'a>(&'a ReceiverHandle, usize);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.ctl.release(self.1);
        }
    }
    let guard = Release(r, len);
    let permit = tokio::select! {
        p = r.tx.reserve() => p,
        _ = r.ctl.gone() => return false,
    };
    match permit {
        Ok(permit) => {
            std::mem::forget(guard);
            permit.send(Outgoing::counted(msg.clone(), len));
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SKIP: usize = usize::MAX / 2;
    const DISCONNECT: usize = SKIP;

    fn handle(id: u64, cap: usize) -> (ReceiverHandle, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(cap);
        (
            ReceiverHandle {
                id,
                tx,
                ctl: Arc::new(ConnControl::new()),
            },
            rx,
        )
    }

    #[test]
    fn rotation_is_fair_and_exact() {
        let r = Router::default();
        let mut rxs = Vec::new();
        for id in 1..=3 {
            let (h, rx) = handle(id, 1000);
            r.subscribe("sms", h);
            rxs.push(rx);
        }
        let m = Message::text("x");
        for _ in 0..300 {
            assert_eq!(r.deliver("sms", 1, 0, &m, SKIP).delivered, 1);
        }
        for rx in &rxs {
            assert_eq!(rx.len(), 100);
        }
        // limit 2 of 3: every receiver gets 2/3 of them
        for _ in 0..300 {
            assert_eq!(r.deliver("sms", 2, 0, &m, SKIP).delivered, 2);
        }
        for rx in &rxs {
            assert_eq!(rx.len(), 300);
        }
        // 0 = all; limit above count = all
        assert_eq!(r.deliver("sms", 0, 0, &m, SKIP).delivered, 3);
        assert_eq!(r.deliver("sms", 7, 0, &m, SKIP).delivered, 3);
    }

    #[test]
    fn sender_is_excluded_and_full_queues_are_passed_over() {
        let r = Router::default();
        let (h1, _rx1) = handle(1, 1);
        let (h2, _rx2_first) = handle(2, 10);
        let ctl1 = Arc::clone(&h1.ctl);
        r.subscribe("c", h1);
        r.subscribe("c", h2);
        let m = Message::text("x");
        // 1 takes one, then its queue is full: the next goes to 2
        assert_eq!(r.deliver("c", 1, 0, &m, DISCONNECT).delivered, 1);
        let d = r.deliver("c", 1, 0, &m, DISCONNECT);
        assert_eq!(d.delivered, 1);
        let d = r.deliver("c", 1, 0, &m, DISCONNECT);
        assert_eq!((d.delivered, d.missing), (1, 0));
        assert_eq!(d.full.iter().map(|h| h.id).collect::<Vec<_>>(), vec![1]);
        assert!(!ctl1.close_requested(), "being full once is not being slow");
        // all full: the caller is told whom to wait for
        let (h3, _rx3) = handle(3, 1);
        r.unsubscribe("c", 2);
        r.subscribe("c", h3);
        assert_eq!(r.deliver("c", 1, 0, &m, DISCONNECT).delivered, 1);
        let d = r.deliver("c", 1, 0, &m, DISCONNECT);
        assert_eq!((d.delivered, d.missing, d.full.len()), (0, 1, 2));
        let (h2, rx2) = handle(2, 10);
        r.subscribe("c", h2);
        // sender 2 never receives its own message
        let before = rx2.len();
        assert_eq!(r.deliver("c", 0, 2, &m, SKIP).delivered, 0);
        assert_eq!(rx2.len(), before);
    }

    #[test]
    fn byte_budget_counts_queued_messages() {
        let r = Router::default();
        let (h, mut rx) = handle(1, 100);
        let ctl = Arc::clone(&h.ctl);
        r.subscribe("c", h);
        let m = Message::text("0123456789");
        let limit = 25;
        assert_eq!(r.deliver("c", 0, 0, &m, limit).delivered, 1);
        assert_eq!(r.deliver("c", 0, 0, &m, limit).delivered, 1);
        let d = r.deliver("c", 0, 0, &m, limit);
        assert_eq!((d.delivered, d.missing), (0, 1));
        assert!(!ctl.close_requested());
        // the writer releases what it wrote
        let o = rx.try_recv().expect("queued");
        ctl.release(o.bytes);
        assert_eq!(r.deliver("c", 0, 0, &m, limit).delivered, 1);
    }

    #[tokio::test]
    async fn waiting_for_room_succeeds_when_the_writer_catches_up() {
        let (h, mut rx) = handle(1, 1);
        let m = Message::text("0123456789");
        assert!(send_when_room(&h, &m, 15).await);
        let ctl = Arc::clone(&h.ctl);
        let waiter = tokio::spawn(async move { send_when_room(&h, &m, 15).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "must wait for room");
        let o = rx.recv().await.expect("first");
        ctl.release(o.bytes);
        assert!(waiter.await.expect("join"));
        assert_eq!(rx.recv().await.expect("second").bytes, 10);
        // cancelled while waiting: nothing stays reserved
        let (h, _rx) = handle(2, 1);
        let m = Message::text("0123456789");
        assert!(send_when_room(&h, &m, 100).await);
        let r = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            send_when_room(&h, &m, 100),
        )
        .await;
        assert!(r.is_err());
        assert!(
            h.ctl.reserve(90, 100),
            "the cancelled wait leaked its reservation"
        );
    }

    #[test]
    fn channels_match_exactly_and_empty_ones_disappear() {
        let r = Router::default();
        let (h, _rx) = handle(1, 10);
        r.subscribe("01", h.clone());
        r.subscribe("01", h);
        assert_eq!(r.receivers("01"), 1);
        let m = Message::text("x");
        assert_eq!(r.deliver("1", 0, 0, &m, SKIP).delivered, 0);
        assert_eq!(r.deliver("01", 0, 0, &m, SKIP).delivered, 1);
        r.unsubscribe("01", 1);
        assert_eq!(r.totals(), (0, 0));
    }

    #[test]
    fn rotation_survives_unsubscribe() {
        let r = Router::default();
        let mut rxs = Vec::new();
        for id in 1..=4 {
            let (h, rx) = handle(id, 1000);
            r.subscribe("c", h);
            rxs.push(rx);
        }
        let m = Message::text("x");
        for _ in 0..3 {
            r.deliver("c", 1, 0, &m, SKIP);
        }
        r.unsubscribe("c", 2);
        for _ in 0..30 {
            r.deliver("c", 1, 0, &m, SKIP);
        }
        let counts: Vec<usize> = rxs.iter().map(|rx| rx.len()).collect();
        // 1 and 3 got one each before; then 30 split evenly among 1, 3, 4
        assert_eq!(counts.iter().sum::<usize>(), 33);
        for (i, c) in counts.iter().enumerate() {
            if i != 1 {
                assert!((10..=12).contains(c), "{counts:?}");
            }
        }
    }
}
