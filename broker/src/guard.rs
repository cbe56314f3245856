//! The broker's defences against abuse, by client address and by user: what an outsider can
//! make it spend before being refused.
//!
//! - **Connections.** A connection that has not authenticated yet holds a permit of its own
//!   small budget (`server.max_pending_connections`), never one of `server.max_connections`,
//!   which only authenticated WebSocket sessions take: half-open sockets cannot crowd out real
//!   clients. One address may hold at most `server.max_connections_per_address` connections
//!   of any kind (trusted proxies excepted: they carry many clients).
//! - **Failed logins.** Each failure from an address makes its next answer wait longer
//!   (`auth_fail_delay`, doubling, up to `auth_fail_delay_max`); `auth_ban_after` failures
//!   within `auth_ban_window` ban the address for `auth_ban_for`: its connections are closed at
//!   once, before any work. The first failures are logged, then one line at the ban; a metric
//!   counts them. An address with recent failures is a suspect: its bcrypt checks queue behind
//!   one permit of their own ([`Guard::suspect`]), so they cannot hold up everyone else's.
//! - **Requests.** HTTP API requests per address, and messages per user, are paced by token
//!   buckets (`http_requests_per_second`, `messages_per_second_per_user`).
//!
//! Behind a reverse proxy the client address is the last one of `X-Forwarded-For`, believed
//! only from `server.trusted_proxies` ([`Guard::client_address`]).
//!
//! Every table here is bounded ([`MAX_TRACKED`] addresses); the oldest entries go first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

/// Most addresses (or users) any table tracks.
pub const MAX_TRACKED: usize = 10_000;

/// Why a connection is refused at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The address is banned until then.
    Banned(Duration),
    /// The address has `server.max_connections_per_address` connections open.
    PerAddress(usize),
    /// `server.max_pending_connections` connections are still authenticating.
    Pending(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Banned(left) => write!(
                f,
                "this address is banned for {}s after repeated failed logins",
                left.as_secs().max(1)
            ),
            Refusal::PerAddress(n) => write!(
                f,
                "this address has {n} connections open (server.max_connections_per_address)"
            ),
            Refusal::Pending(n) => write!(
                f,
                "{n} connections are still authenticating (server.max_pending_connections); \
                 retry later"
            ),
        }
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct GuardStats {
    /// Failed logins.
    pub auth_failures: AtomicU64,
    /// Bans given.
    pub bans: AtomicU64,
    /// Connections refused because their address was banned.
    pub refused_banned: AtomicU64,
    /// Connections refused by the per-address cap.
    pub refused_per_address: AtomicU64,
    /// Connections refused because the pending budget was spent.
    pub refused_pending: AtomicU64,
    /// HTTP API requests answered 429.
    pub http_limited: AtomicU64,
    /// Messages that waited for their user's rate.
    pub messages_paced: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    first: Instant,
    last: Instant,
    banned_until: Option<Instant>,
}

/// A token bucket: `rate` tokens a second, at most `burst`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token now, or says how long until one is there.
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// Keeps `map` under [`MAX_TRACKED`] entries by dropping the ones `age` says are oldest.
fn bound<K: Clone + Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, age: impl Fn(&V) -> Instant) {
    if map.len() < MAX_TRACKED {
        return;
    }
    let mut ages: Vec<(Instant, K)> = map.iter().map(|(k, v)| (age(v), k.clone())).collect();
    ages.sort_by_key(|(t, _)| *t);
    for (_, k) in ages.into_iter().take(MAX_TRACKED / 10) {
        map.remove(&k);
    }
}

/// The limits in force (from `[server]`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections still authenticating, in all.
    pub max_pending: usize,
    /// Connections per address.
    pub max_per_address: usize,
    /// Addresses whose `X-Forwarded-For` is believed, and which the per-address cap spares.
    pub trusted_proxies: Vec<IpAddr>,
    /// First delay after a failed login.
    pub fail_delay: Duration,
    /// Longest delay.
    pub fail_delay_max: Duration,
    /// Failures within `ban_window` that ban the address (0: never).
    pub ban_after: u32,
    /// See `ban_after`.
    pub ban_window: Duration,
    /// How long a ban lasts.
    pub ban_for: Duration,
    /// HTTP API requests per second per address (0: no limit), and the burst.
    pub http_rate: f64,
    /// See `http_rate`.
    pub http_burst: f64,
    /// Messages per second per user (0: no limit), and the burst.
    pub user_rate: f64,
    /// See `user_rate`.
    pub user_burst: f64,
}

/// The guard.
pub struct Guard {
    limits: Limits,
    pending: Arc<Semaphore>,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    http: Mutex<HashMap<IpAddr, Bucket>>,
    users: Mutex<HashMap<String, Bucket>>,
    /// One permit: the bcrypt checks of suspect addresses queue here first.
    suspects: Semaphore,
    /// Counters.
    pub stats: GuardStats,
}

/// What an admitted connection holds: its place in the pending budget (until it authenticates)
/// and in its address's count (until it closes).
pub struct Admission {
    guard: Arc<Guard>,
    address: Option<IpAddr>,
    pending: Option<OwnedSemaphorePermit>,
}

impl Admission {
    /// The connection authenticated: its pending permit goes back.
    pub fn authenticated(&mut self) {
        self.pending = None;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(ip) = self.address {
            let mut m = lock(&self.guard.per_address);
            if let Some(n) = m.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Guard {
    /// A guard with `limits`.
    pub fn new(limits: Limits) -> Arc<Guard> {
        Arc::new(Guard {
            pending: Arc::new(Semaphore::new(limits.max_pending.max(1))),
            limits,
            per_address: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            http: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            suspects: Semaphore::new(1),
            stats: GuardStats::default(),
        })
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.limits.trusted_proxies.contains(&ip)
    }

    /// The client's address: `peer`, or behind a trusted proxy the last address of
    /// `X-Forwarded-For` (the one the proxy added).
    pub fn client_address(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        if !self.trusted(peer) {
            return peer;
        }
        forwarded_for
            .and_then(|f| f.rsplit(',').next())
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or(peer)
    }

    /// Whether `ip` is banned now; for how long still.
    pub fn banned(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let f = lock(&self.failures).get(&ip).copied()?;
        f.banned_until
            .and_then(|u| u.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// A new connection from `peer`: admitted (holding a pending permit and its place in the
    /// address's count), or refused at once.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admission, Refusal> {
        if let Some(left) = self.banned(peer) {
            self.stats.refused_banned.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Banned(left));
        }
        let address = if self.trusted(peer) {
            None
        } else {
            let mut m = lock(&self.per_address);
            let n = m.entry(peer).or_insert(0);
            if *n >= self.limits.max_per_address {
                self.stats
                    .refused_per_address
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::PerAddress(*n));
            }
            *n += 1;
            Some(peer)
        };
        let mut admission = Admission {
            guard: Arc::clone(self),
            address,
            pending: None,
        };
        match Arc::clone(&self.pending).try_acquire_owned() {
            Ok(p) => {
                admission.pending = Some(p);
                Ok(admission)
            }
            Err(_) => {
                self.stats.refused_pending.fetch_add(1, Ordering::Relaxed);
                Err(Refusal::Pending(self.limits.max_pending))
            }
        }
    }

    /// A failed login from `ip` (user `user`): how long to wait before answering. Bans the
    /// address after `auth_ban_after` failures within `auth_ban_window`.
    pub fn auth_failed(&self, ip: IpAddr, user: &str) -> Duration {
        self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut m = lock(&self.failures);
        bound(&mut m, |f| f.last);
        let f = m.entry(ip).or_insert(Failures {
            count: 0,
            first: now,
            last: now,
            banned_until: None,
        });
        if now.saturating_duration_since(f.first) > self.limits.ban_window {
            *f = Failures {
                count: 0,
                first: now,
                last: now,
                banned_until: None,
            };
        }
        f.count += 1;
        f.last = now;
        let count = f.count;
        // A trusted proxy's own address (a local client, or a proxy that did not say who the
        // client is) is slowed down but never banned: that would lock out everyone behind it.
        if self.limits.ban_after > 0
            && count >= self.limits.ban_after
            && f.banned_until.is_none()
            && !self.trusted(ip)
        {
            f.banned_until = Some(now + self.limits.ban_for);
            drop(m);
            self.stats.bans.fetch_add(1, Ordering::Relaxed);
            warn!(
                client = %ip, user = %user,
                "{count} failed logins within {:?}: address banned for {:?} \
                 (server.auth_ban_after / auth_ban_for)",
                self.limits.ban_window, self.limits.ban_for
            );
        } else if count <= 3 {
            // The user name helps operators; the password is never logged.
            info!(client = %ip, user = %user, "wrong user name or password");
        }
        let shift = count.saturating_sub(1).min(16);
        self.limits
            .fail_delay
            .saturating_mul(1 << shift)
            .min(self.limits.fail_delay_max)
    }

    /// A successful login from `ip`: its failures are forgotten.
    pub fn auth_ok(&self, ip: IpAddr) {
        let mut m = lock(&self.failures);
        if m.get(&ip).is_some_and(|f| f.banned_until.is_none()) {
            m.remove(&ip);
        }
    }

    /// Whether `ip` failed to log in recently: its expensive checks go behind everyone's.
    pub fn suspect(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        lock(&self.failures)
            .get(&ip)
            .is_some_and(|f| now.saturating_duration_since(f.last) < self.limits.ban_window)
    }

    /// The queue suspects' bcrypt checks wait in first (one at a time).
    pub fn suspect_gate(&self) -> &Semaphore {
        &self.suspects
    }

    /// Whether an HTTP API request from `ip` may go now; else how long until it may.
    pub fn http_request(&self, ip: IpAddr) -> Result<(), Duration> {
        if self.limits.http_rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut m = lock(&self.http);
        bound(&mut m, |b| b.at);
        let b = m.entry(ip).or_insert(Bucket {
            tokens: self.limits.http_burst,
            at: now,
        });
        let r = b.take(self.limits.http_rate, self.limits.http_burst, now);
        if r.is_err() {
            self.stats.http_limited.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Waits until `user` may send one more message (`messages_per_second_per_user`): a
    /// flooding user is slowed down, not cut off, and others are not affected.
    pub async fn pace_user(&self, user: &str) {
        if self.limits.user_rate <= 0.0 {
            return;
        }
        loop {
            let wait = {
                let now = Instant::now();
                let mut m = lock(&self.users);
                bound(&mut m, |b| b.at);
                let b = m.entry(user.to_owned()).or_insert(Bucket {
                    tokens: self.limits.user_burst,
                    at: now,
                });
                match b.take(self.limits.user_rate, self.limits.user_burst, now) {
                    Ok(()) => return,
                    Err(w) => w,
                }
            };
            self.stats.messages_paced.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_pending: 2,
            max_per_address: 2,
            trusted_proxies: vec!["127.0.0.2".parse().expect("ip")],
            fail_delay: Duration::from_millis(100),
            fail_delay_max: Duration::from_millis(350),
            ban_after: 4,
            ban_window: Duration::from_secs(60),
            ban_for: Duration::from_secs(60),
            http_rate: 10.0,
            http_burst: 2.0,
            user_rate: 0.0,
            user_burst: 1.0,
        }
    }

    #[test]
    fn connections_are_capped_per_address_and_pending_budget() {
        let g = Guard::new(limits());
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let a1 = g.admit(a).expect("a1");
        let mut a2 = g.admit(a).expect("a2");
        assert_eq!(g.admit(a).err(), Some(Refusal::PerAddress(2)));
        // the pending budget (2) is spent by a1 and a2
        assert_eq!(g.admit(b).err(), Some(Refusal::Pending(2)));
        a2.authenticated();
        let b1 = g.admit(b).expect("b1 after a2 authenticated");
        drop(a1);
        drop(b1);
        assert!(g.admit(a).is_ok(), "a's count went down");
        assert!(lock(&g.per_address).len() <= 1);
    }

    #[test]
    fn failures_slow_down_then_ban_and_proxies_forward_the_address() {
        let g = Guard::new(limits());
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let delays: Vec<u64> = (0..3)
            .map(|_| g.auth_failed(a, "qa").as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 350]);
        assert!(g.suspect(a));
        assert!(g.banned(a).is_none());
        g.auth_failed(a, "qa");
        assert!(g.banned(a).is_some(), "banned after 4");
        assert!(matches!(g.admit(a).err(), Some(Refusal::Banned(_))));
        g.auth_ok(a);
        assert!(g.banned(a).is_some(), "a success does not lift a ban");
        let proxy: IpAddr = "127.0.0.2".parse().expect("ip");
        assert_eq!(
            g.client_address(proxy, Some("1.2.3.4, 10.0.0.9")),
            "10.0.0.9".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            g.client_address(a, Some("10.0.0.9")),
            a,
            "not a trusted proxy"
        );
        // trusted proxies are not capped per address
        let _p: Vec<_> = (0..2).map(|_| g.admit(proxy).expect("proxy")).collect();
        assert_eq!(g.stats.bans.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn http_requests_are_paced_per_address() {
        let g = Guard::new(limits());
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(g.http_request(a).is_ok());
        assert!(g.http_request(a).is_ok());
        let wait = g.http_request(a).expect_err("burst of 2 spent");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(
            g.http_request("10.0.0.2".parse().expect("ip")).is_ok(),
            "per address"
        );
    }
}
