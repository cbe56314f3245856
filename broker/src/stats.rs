//! The broker's counters: plain atomics, bumped on the hot path without locks, read by
//! `/healthz` and the metrics. [`ChannelCounters`] are the per-channel ones; the delivery
//! engine keeps them in its channel table and bumps them under the lock it takes anyway.

use std::sync::atomic::AtomicU64;

/// Counters since start.
#[derive(Debug, Default)]
pub struct Stats {
    /// Open WebSocket/HTTP connections.
    pub connections_open: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Connections refused because `max_connections` was reached.
    pub connections_refused: AtomicU64,
    /// Upgrades refused for bad credentials.
    pub auth_rejected: AtomicU64,
    /// `send-message` frames accepted for routing.
    pub messages_in: AtomicU64,
    /// Messages handed to receivers (one per receiver), live or from the store.
    pub deliveries: AtomicU64,
    /// `send-message` frames that reached no receiver and were not stored.
    pub unrouted: AtomicU64,
    /// Frames answered with an `error`.
    pub rejected_frames: AtomicU64,
    /// Receivers closed for a full queue (`slow_receiver = "disconnect"`).
    pub slow_consumers: AtomicU64,
    /// Connections dropped after `dead_peer_timeout` of silence.
    pub dead_peers: AtomicU64,
    /// Connections dropped because a write did not finish within `write_timeout`.
    pub write_timeouts: AtomicU64,
    /// Stored messages expired undelivered.
    pub expired: AtomicU64,
    /// Stored messages handed out again (after a disconnect or an ack timeout).
    pub redelivered: AtomicU64,
    /// Reloads of users or permissions that failed (the previous ones stayed in force).
    pub reload_failures: AtomicU64,
}

/// Most channels counted under their own name; messages on further channels are counted
/// together under [`OTHER_CHANNELS`], so that clients inventing channel names cannot grow the
/// broker's memory or its metrics without bound.
pub const MAX_COUNTED_CHANNELS: usize = 256;

/// The name the channels past [`MAX_COUNTED_CHANNELS`] are counted under (not a valid
/// channel name, so it is never confused with one).
pub const OTHER_CHANNELS: &str = "(other)";

/// Counters of one channel since start.
#[derive(Debug, Default)]
pub struct ChannelCounters {
    /// Messages published on it that reached routing.
    pub messages_in: AtomicU64,
    /// Copies handed to its receivers, live or from the store.
    pub deliveries: AtomicU64,
    /// Messages that reached no receiver and were not stored.
    pub unrouted: AtomicU64,
    /// Stored messages that expired undelivered.
    pub expired: AtomicU64,
    /// Stored messages handed out again.
    pub redelivered: AtomicU64,
}

/// Minutes of [`History`] kept: the status page's chart.
pub const HISTORY_MINUTES: usize = 60;

/// The figures [`History`] follows, in this order: WebSocket messages in, copies out, SMS
/// sent, SMS failed (both per recipient, from the SMS service).
pub const HISTORY_SERIES: [&str; 4] = ["in", "out", "sent", "failed"];

/// Cumulative figures (see [`HISTORY_SERIES`]) at one moment.
pub type Figures = [u64; HISTORY_SERIES.len()];

/// Per-minute history of a few counters for the last hour: a sample of the cumulative figures
/// at each minute's start (taken by a task, not on the path of a message); a minute's count is
/// the difference between two samples. Bounded: [`HISTORY_MINUTES`] + 1 samples.
#[derive(Debug, Default)]
pub struct History {
    samples: std::sync::Mutex<std::collections::VecDeque<(i64, Figures)>>,
}

/// Per-minute counts: the minute of the first bucket (epoch minutes) and one bucket per
/// minute up to the current one, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerMinute {
    /// Epoch minute (epoch seconds / 60) of `buckets[0]`.
    pub first_minute: i64,
    /// Counts of each minute; the last is the current minute so far.
    pub buckets: Vec<Figures>,
}

impl History {
    /// Records the figures at the start of `minute` (epoch minutes); a later sample of the same
    /// minute replaces it.
    pub fn record(&self, minute: i64, figures: Figures) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if s.back().is_some_and(|(m, _)| *m >= minute) {
            s.pop_back();
        }
        s.push_back((minute, figures));
        while s.len() > HISTORY_MINUTES + 1 {
            s.pop_front();
        }
    }

    /// Counts per minute for the [`HISTORY_MINUTES`] minutes up to `now_minute`, the current
    /// one computed from `current` (the figures now). A minute without a sample of its own
    /// (before the broker started, or a late sampler) starts from the sample before it, so the
    /// counts always add up to what happened in the hour.
    pub fn per_minute(&self, now_minute: i64, current: Figures) -> PerMinute {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let first = now_minute - HISTORY_MINUTES as i64 + 1;
        let at = |minute: i64| -> Figures {
            if minute > now_minute {
                return current;
            }
            s.iter()
                .rev()
                .find(|(m, _)| *m <= minute)
                .map_or_else(|| s.front().map_or(current, |(_, f)| *f), |(_, f)| *f)
        };
        let buckets = (first..=now_minute)
            .map(|m| {
                let (a, b) = (at(m), at(m + 1));
                std::array::from_fn(|i| b[i].saturating_sub(a[i]))
            })
            .collect();
        PerMinute {
            first_minute: first,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_minute_counts_add_up_and_stay_bounded() {
        let h = History::default();
        // Started during minute 100 with nothing counted; 5 in during 100, 7 during 101,
        // the sampler missed 102, 3 more by 103's start, 2 so far in 103.
        h.record(100, [0, 0, 0, 0]);
        h.record(101, [5, 5, 1, 0]);
        h.record(102 + 1, [15, 14, 2, 1]);
        let p = h.per_minute(103, [17, 16, 2, 1]);
        assert_eq!(p.first_minute, 103 - 59);
        assert_eq!(p.buckets.len(), HISTORY_MINUTES);
        let n = p.buckets.len();
        assert_eq!(p.buckets[n - 1], [2, 2, 0, 0], "the current minute so far");
        assert_eq!(
            p.buckets[n - 2],
            [10, 9, 1, 1],
            "101 and the missed 102 together"
        );
        assert_eq!(p.buckets[n - 3], [0, 0, 0, 0]);
        assert_eq!(p.buckets[n - 4], [5, 5, 1, 0]);
        let total: u64 = p.buckets.iter().map(|b| b[0]).sum();
        assert_eq!(total, 17);
        for m in 104..400 {
            h.record(m, [m as u64; 4]);
        }
        assert!(h.samples.lock().expect("lock").len() <= HISTORY_MINUTES + 1);
        let p = h.per_minute(399, [400; 4]);
        assert_eq!(p.buckets.iter().map(|b| b[0]).sum::<u64>(), 400 - 340);
    }
}
