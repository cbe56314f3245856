//! A connection's outgoing queue: the frames waiting to be written to one client, bounded in
//! count and in bytes, and the requests to close it.
//!
//! Owned by neither side that uses it: the session (`conn`) queues its replies and writes what is
//! queued; the delivery engine (`delivery`) queues messages for receivers. Neither imports the
//! other; both import this.
//!
//! - Forwarded messages and replies count against both bounds. A frame larger than the byte
//!   bound is accepted when the queue is empty, so that an oversized stored message still goes,
//!   alone.
//! - Control frames (pongs, pings) and close requests bypass the bounds (they are tiny).
//! - Holds no memory when empty: the queue's storage is given back once it has drained.
//! - Knows when the peer was last heard from, for the broker's keep-alive (`state::Sessions`).
//! - A frame may carry stored rows ([`Carried`]): the writer hands those of what it wrote to the
//!   delivery engine, which then counts them as delivered.

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::ws::Frame;

/// Milliseconds since the first call (a monotonic clock shared by every outbox).
pub fn clock_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Stored rows a frame carries (durable backend): the delivery engine counts them delivered
/// once the frame is written, and frees them if it never is.
#[derive(Debug)]
pub struct Carried {
    /// Their channel.
    pub channel: Arc<str>,
    /// (row id, deliveries it owed).
    pub rows: Vec<(i64, u32)>,
}

/// A queued frame.
#[derive(Debug)]
pub struct Out {
    /// The frame.
    pub frame: Frame,
    /// Bytes it holds against the byte bound (0 for control frames).
    pub counted: usize,
    /// Stored messages it carries.
    pub token: Option<Box<Carried>>,
}

impl Out {
    /// A text frame counted against the bounds.
    pub fn text(payload: Bytes) -> Out {
        Out {
            counted: payload.len(),
            frame: Frame::Text(payload),
            token: None,
        }
    }

    /// A text frame carrying stored messages.
    pub fn delivery(payload: Bytes, token: Box<Carried>) -> Out {
        Out {
            counted: payload.len(),
            frame: Frame::Text(payload),
            token: Some(token),
        }
    }
}

/// How a connection is to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Send a close frame with this code and reason; when `drain`, first write what is queued.
    Close {
        /// Close code.
        code: u16,
        /// Reason.
        reason: &'static str,
        /// Write what is queued first.
        drain: bool,
    },
    /// Stop writing at once (the peer is gone or closed first).
    Quit,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is at a bound.
    Full,
    /// The connection is closing.
    Closed,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Out>,
    bytes: usize,
    stop: Option<Stop>,
    closed: bool,
}

/// The outgoing queue of one connection.
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer: frames queued, or a stop requested.
    work: Notify,
    /// Wakes those waiting for room.
    room: Notify,
    /// Set once the writer has finished: nothing more will be written.
    gone: AtomicBool,
    gone_notify: Notify,
    /// When the peer was last heard from (milliseconds on [`clock_ms`]), for keep-alive: the
    /// reader only raises `heard` (no clock read per frame); the keep-alive task turns it into
    /// a time on its rounds.
    heard_ms: AtomicU64,
    heard: AtomicBool,
    /// The connection was passed over for staying full (slow-receiver policy `skip`): do not wait
    /// for it again until it drains.
    lagging: AtomicBool,
    max_frames: usize,
    max_bytes: usize,
    conn: u64,
}

impl Outbox {
    /// An empty queue with these bounds.
    pub fn new(max_frames: usize, max_bytes: usize) -> Outbox {
        Self::for_conn(0, max_frames, max_bytes)
    }

    /// An empty queue of connection `conn` (named in log lines).
    pub fn for_conn(conn: u64, max_frames: usize, max_bytes: usize) -> Outbox {
        Outbox {
            state: Mutex::new(State::default()),
            work: Notify::new(),
            room: Notify::new(),
            gone: AtomicBool::new(false),
            gone_notify: Notify::new(),
            heard_ms: AtomicU64::new(clock_ms()),
            heard: AtomicBool::new(false),
            lagging: AtomicBool::new(false),
            max_frames: max_frames.max(1),
            max_bytes,
            conn,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Never held across an await; a panic while holding it leaves a queue that is still
        // consistent enough to be written or dropped.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fits(&self, s: &State, len: usize) -> bool {
        s.queue.is_empty() || (s.queue.len() < self.max_frames && s.bytes + len <= self.max_bytes)
    }

    /// Queues `out` if it fits now.
    pub fn try_push(&self, out: Out) -> Result<(), (Refused, Out)> {
        let mut s = self.lock();
        if s.closed {
            return Err((Refused::Closed, out));
        }
        if out.counted > 0 && !self.fits(&s, out.counted) {
            return Err((Refused::Full, out));
        }
        s.bytes += out.counted;
        s.queue.push_back(out);
        drop(s);
        self.work.notify_one();
        Ok(())
    }

    /// Queues `out`, waiting for room (the caller bounds the wait). Returns it when the
    /// connection closes first.
    pub async fn push(&self, mut out: Out) -> Result<(), Out> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_push(out) {
                Ok(()) => return Ok(()),
                Err((Refused::Closed, o)) => return Err(o),
                Err((Refused::Full, o)) => out = o,
            }
            if self.is_gone() {
                return Err(out);
            }
            // `finish` wakes the room waiters too
            room.await;
        }
    }

    /// Whether `len` more bytes would fit now.
    pub fn has_room(&self, len: usize) -> bool {
        let s = self.lock();
        !s.closed && self.fits(&s, len)
    }

    /// Takes queued frames into `batch`: at most `max` frames and, past the first, at most the
    /// byte bound in all. Gives the queue's memory back once it is empty.
    pub fn take(&self, batch: &mut Vec<Out>, max: usize) {
        let mut s = self.lock();
        let mut bytes = 0;
        while batch.len() < max {
            let Some(front) = s.queue.front() else { break };
            if !batch.is_empty() && bytes + front.counted > self.max_bytes {
                break;
            }
            bytes += front.counted;
            if let Some(o) = s.queue.pop_front() {
                batch.push(o);
            }
        }
        if s.queue.is_empty() && s.queue.capacity() > 0 {
            // An idle connection holds no queue memory.
            s.queue = VecDeque::new();
        }
    }

    /// Gives back the bytes of written (or dropped) frames.
    pub fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut s = self.lock();
        s.bytes = s.bytes.saturating_sub(bytes);
        let drained = s.bytes <= self.max_bytes / 2;
        drop(s);
        if drained {
            self.lagging.store(false, Ordering::Relaxed);
        }
        self.room.notify_waiters();
    }

    /// The connection it belongs to.
    pub fn conn(&self) -> u64 {
        self.conn
    }

    /// Bytes that would fit now (at least what an empty queue takes: everything).
    pub fn room_bytes(&self) -> usize {
        let s = self.lock();
        if s.queue.is_empty() {
            self.max_bytes
        } else {
            self.max_bytes.saturating_sub(s.bytes)
        }
    }

    /// Resolves when room may have been made (register it before checking, see `Notify`).
    pub fn room_notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.room.notified()
    }

    /// Wakes those waiting for room (something other than the queue changed, e.g. an
    /// acknowledgement freed a receiver's window).
    pub fn wake_room(&self) {
        self.room.notify_waiters();
    }

    /// Frames and bytes queued now.
    pub fn queued(&self) -> (usize, usize) {
        let s = self.lock();
        (s.queue.len(), s.bytes)
    }

    /// Waits until there is something to write or a stop was requested.
    pub async fn work(&self) {
        loop {
            let n = self.work.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            {
                let s = self.lock();
                if !s.queue.is_empty() || s.stop.is_some() {
                    return;
                }
            }
            n.await;
        }
    }

    /// Asks the writer to end the connection (the first request wins).
    pub fn stop(&self, stop: Stop) {
        let mut s = self.lock();
        if s.stop.is_none() {
            s.stop = Some(stop);
        }
        drop(s);
        self.work.notify_one();
    }

    /// The stop requested, if any.
    pub fn stop_requested(&self) -> Option<Stop> {
        self.lock().stop
    }

    /// Refuses new frames from now on (the connection is closing).
    pub fn close(&self) {
        self.lock().closed = true;
        self.room.notify_waiters();
    }

    /// Drops what is still queued (the connection is gone); returns it, for its tokens.
    pub fn drain_all(&self) -> Vec<Out> {
        let mut s = self.lock();
        s.closed = true;
        s.bytes = 0;
        let rest: Vec<Out> = std::mem::take(&mut s.queue).into();
        drop(s);
        self.room.notify_waiters();
        rest
    }

    /// Marks the writer finished.
    pub fn finish(&self) {
        self.gone.store(true, Ordering::Release);
        self.close();
        self.gone_notify.notify_waiters();
    }

    /// Resolves once the writer has finished.
    pub async fn gone(&self) {
        loop {
            let n = self.gone_notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.is_gone() {
                return;
            }
            n.await;
        }
    }

    /// Whether the writer has finished.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// The peer was heard from (any frame, pongs included).
    pub fn heard(&self) {
        if !self.heard.load(Ordering::Relaxed) {
            self.heard.store(true, Ordering::Relaxed);
        }
    }

    /// How long since the peer was last heard from, as of the keep-alive's previous round (a
    /// frame since then counts as now).
    pub fn silent_for(&self) -> std::time::Duration {
        let now = clock_ms();
        if self.heard.swap(false, Ordering::Relaxed) {
            self.heard_ms.store(now, Ordering::Relaxed);
        }
        std::time::Duration::from_millis(now.saturating_sub(self.heard_ms.load(Ordering::Relaxed)))
    }

    /// Marks the connection as passed over for staying full.
    pub fn set_lagging(&self) {
        self.lagging.store(true, Ordering::Relaxed);
    }

    /// Whether it was passed over and has not drained since.
    pub fn is_lagging(&self) -> bool {
        self.lagging.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Out {
        Out::text(Bytes::from(vec![b'x'; n]))
    }

    #[test]
    fn bounds_in_count_and_bytes_and_an_oversized_frame_alone() {
        let o = Outbox::new(3, 100);
        assert!(o.try_push(text(60)).is_ok());
        assert!(matches!(o.try_push(text(60)), Err((Refused::Full, _))));
        assert!(o.try_push(text(40)).is_ok());
        // control frames bypass the bounds
        assert!(
            o.try_push(Out {
                frame: Frame::Ping,
                counted: 0,
                token: None
            })
            .is_ok()
        );
        assert!(matches!(o.try_push(text(1)), Err((Refused::Full, _))));
        let mut b = Vec::new();
        o.take(&mut b, 10);
        assert_eq!(b.len(), 3);
        o.release(100);
        // alone, a frame over the byte bound still goes
        assert!(o.try_push(text(500)).is_ok());
        assert!(matches!(o.try_push(text(1)), Err((Refused::Full, _))));
        b.clear();
        o.take(&mut b, 10);
        o.release(500);
        o.close();
        assert!(matches!(o.try_push(text(1)), Err((Refused::Closed, _))));
    }

    #[test]
    fn bytes_being_written_still_count_until_released() {
        let o = Outbox::new(100, 1000);
        for _ in 0..3 {
            assert!(o.try_push(text(300)).is_ok());
        }
        assert!(o.try_push(text(300)).is_err());
        let mut b = Vec::new();
        o.take(&mut b, 100);
        assert_eq!(b.len(), 3);
        // taken, not yet written: the queue is empty, so one frame may go (alone)...
        assert!(o.try_push(text(300)).is_ok());
        // ...but not two
        assert!(o.try_push(text(300)).is_err());
        o.release(900);
        assert!(o.try_push(text(300)).is_ok());
    }

    #[tokio::test]
    async fn waiting_for_room_succeeds_when_the_writer_catches_up() {
        let o = std::sync::Arc::new(Outbox::new(1, 100));
        assert!(o.try_push(text(10)).is_ok());
        let o2 = std::sync::Arc::clone(&o);
        let waiter = tokio::spawn(async move { o2.push(text(10)).await.is_ok() });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "must wait for room");
        let mut b = Vec::new();
        o.take(&mut b, 10);
        o.release(10);
        assert!(waiter.await.expect("join"));
        // a waiter is let go when the connection ends
        let o2 = std::sync::Arc::clone(&o);
        let waiter = tokio::spawn(async move { o2.push(text(10)).await.is_ok() });
        tokio::task::yield_now().await;
        o.finish();
        assert!(!waiter.await.expect("join"));
        o.gone().await;
    }

    #[test]
    fn memory_is_given_back_when_drained() {
        let o = Outbox::new(1000, 1 << 20);
        for _ in 0..500 {
            assert!(o.try_push(text(10)).is_ok());
        }
        let mut b = Vec::new();
        o.take(&mut b, 1000);
        assert_eq!(o.lock().queue.capacity(), 0);
    }
}
