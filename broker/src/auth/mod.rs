//! Who may connect: htpasswd users, checked in constant time, reloaded without a restart; and
//! what they may do ([`permissions`], reloaded with them).
//!
//! [`Authenticator`] owns the current [`UserTable`] and answers `verify(user, password)`.
//! - An unknown user costs what a wrong password costs: the password is checked against a dummy
//!   hash of the most expensive kind in the table, so timing does not reveal who exists.
//! - bcrypt runs on the blocking pool behind a small semaphore, so a reconnect storm queues
//!   instead of pinning every core, and its results are cached under a keyed MAC of
//!   (user, password, table generation): the cache never holds a password or anything that can
//!   be checked offline, and a reload empties it.
//! - [`CredentialSources::load`] reads files and inline lines; a bad entry fails the whole load
//!   with its file and line, and a reload that fails keeps the previous table.

pub mod apr1;
pub mod htpasswd;
pub mod passwd;
pub mod permissions;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;

pub use htpasswd::{EntryError, PasswordHash};

/// What HTTP Basic credentials came to ([`login`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// No `Authorization` header, or not Basic credentials.
    Missing,
    /// The user, whose password is right.
    User(String),
    /// The user named, with a wrong password (or an unknown user).
    Failed(String),
}

/// Checks the `Authorization` header of a request from `client` (WebSocket upgrade, HTTP API,
/// `/healthz`): a client that failed recently is checked behind everyone else, and a failure
/// makes it wait, longer each time, and may ban its address ([`crate::guard`]).
pub async fn login(
    auth: &Authenticator,
    guard: &crate::guard::Guard,
    authorization: Option<&[u8]>,
    client: std::net::IpAddr,
) -> Login {
    let Some((user, password)) = authorization.and_then(crate::http::basic_credentials) else {
        return Login::Missing;
    };
    let suspects = guard.suspect(client).then(|| guard.suspect_gate());
    if auth.verify_from(&user, &password, suspects).await {
        guard.auth_ok(client);
        Login::User(user)
    } else {
        let wait = guard.auth_failed(client, &user);
        tokio::time::sleep(wait).await;
        Login::Failed(user)
    }
}

/// Where users come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialSources {
    /// htpasswd files, read in order; a later entry for the same user replaces an earlier one.
    pub files: Vec<PathBuf>,
    /// htpasswd lines given inline, with a description of where they were given.
    pub lines: Vec<(String, String)>,
}

/// A credentials load failure.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read htpasswd file {path}: {err}; check the path and its permissions")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
    /// An entry is unsupported or malformed.
    #[error(transparent)]
    Entry(#[from] EntryError),
}

impl CredentialSources {
    /// Reads every source into a table. Warnings (duplicate users, no users) are returned for
    /// the caller to log.
    pub fn load(&self) -> Result<(UserTable, Vec<String>), LoadError> {
        let mut users: HashMap<String, htpasswd::Entry> = HashMap::new();
        let mut warnings = Vec::new();
        let mut add = |entries: Vec<htpasswd::Entry>, warnings: &mut Vec<String>| {
            for e in entries {
                if let Some(old) = users.get(&e.user) {
                    warnings.push(format!(
                        "user `{}` is defined twice ({} and {}); the later one is used",
                        e.user, old.origin, e.origin
                    ));
                }
                users.insert(e.user.clone(), e);
            }
        };
        for path in &self.files {
            let text = std::fs::read_to_string(path).map_err(|err| LoadError::Io {
                path: path.clone(),
                err,
            })?;
            add(
                htpasswd::parse(&text, &path.display().to_string())?,
                &mut warnings,
            );
        }
        for (origin, line) in &self.lines {
            add(htpasswd::parse(line, origin)?, &mut warnings);
        }
        if users.is_empty() {
            warnings.push(
                "no users are configured: every connection will be rejected; add an htpasswd \
                 file (credentials.files or --htpasswd)"
                    .to_owned(),
            );
        }
        Ok((UserTable::new(users), warnings))
    }

    /// The files to watch for changes.
    pub fn watched_files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// The users in force, plus the dummy hash that unknown users are checked against.
pub struct UserTable {
    users: HashMap<String, htpasswd::Entry>,
    dummy: PasswordHash,
}

impl UserTable {
    fn new(users: HashMap<String, htpasswd::Entry>) -> Self {
        let dummy = dummy_hash(users.values().map(|e| &e.hash));
        UserTable { users, dummy }
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// How many entries of each kind, for start-up logs.
    pub fn kinds(&self) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for e in self.users.values() {
            match counts.iter_mut().find(|(k, _)| *k == e.hash.kind()) {
                Some((_, n)) => *n += 1,
                None => counts.push((e.hash.kind(), 1)),
            }
        }
        counts.sort();
        counts
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A hash of the most expensive kind present (bcrypt at the highest cost, else apr1, else
/// {SHA}) for a password nobody knows.
fn dummy_hash<'a>(hashes: impl Iterator<Item = &'a PasswordHash>) -> PasswordHash {
    let mut secret = [0u8; 16];
    // Without OS randomness the dummy is still a hash of an unguessable-enough constant; it only
    // has to cost time, never to match.
    let _ = getrandom::fill(&mut secret);
    let secret = hex(&secret);
    let mut max_cost = None;
    let mut any_apr1 = false;
    for h in hashes {
        match h {
            PasswordHash::Bcrypt { cost, .. } => {
                max_cost = Some(max_cost.map_or(*cost, |c: u32| c.max(*cost)))
            }
            PasswordHash::Apr1 { .. } => any_apr1 = true,
            PasswordHash::Sha1(_) => {}
        }
    }
    if let Some(cost) = max_cost {
        if let Ok(hash) = bcrypt::hash(&secret, cost) {
            return PasswordHash::Bcrypt { hash, cost };
        }
    }
    if any_apr1 {
        let salt = secret[..8].to_owned();
        let hash = apr1::apr1_hash(secret.as_bytes(), salt.as_bytes());
        return PasswordHash::Apr1 { salt, hash };
    }
    use sha1::Digest as _;
    PasswordHash::Sha1(sha1::Sha1::digest(secret.as_bytes()).into())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Counters for tests and metrics.
#[derive(Debug, Default)]
pub struct AuthStats {
    /// Password checks actually computed (any kind).
    pub hash_checks: AtomicU64,
    /// bcrypt checks actually computed.
    pub bcrypt_checks: AtomicU64,
    /// Checks answered from the cache.
    pub cache_hits: AtomicU64,
    /// Successful logins.
    pub accepted: AtomicU64,
    /// Refused logins.
    pub rejected: AtomicU64,
}

/// Tuning of the verification cache and the bcrypt gate.
#[derive(Debug, Clone)]
pub struct AuthTuning {
    /// How many bcrypt checks may run at once.
    pub bcrypt_concurrency: usize,
    /// How long a successful bcrypt check is remembered.
    pub success_ttl: Duration,
    /// How long a failed bcrypt check is remembered (repeated wrong passwords stay cheap).
    pub failure_ttl: Duration,
    /// Most remembered results.
    pub cache_capacity: usize,
}

impl Default for AuthTuning {
    fn default() -> Self {
        AuthTuning {
            bcrypt_concurrency: 1,
            success_ttl: Duration::from_secs(3600),
            failure_ttl: Duration::from_secs(60),
            cache_capacity: 4096,
        }
    }
}

type CacheKey = [u8; 32];

struct Cached {
    ok: bool,
    until: Instant,
}

/// Checks credentials against the current user table.
pub struct Authenticator {
    table: RwLock<Arc<UserTable>>,
    permissions: RwLock<Arc<permissions::PermissionsConfig>>,
    generation: AtomicU64,
    cache: Mutex<HashMap<CacheKey, Cached>>,
    mac_key: [u8; 64],
    gate: Semaphore,
    tuning: AuthTuning,
    /// Counters.
    pub stats: AuthStats,
}

impl Authenticator {
    /// A new authenticator serving `table`.
    pub fn new(table: UserTable, tuning: AuthTuning) -> Self {
        let mut mac_key = [0u8; 64];
        if getrandom::fill(&mut mac_key).is_err() {
            // Without OS randomness, fall back to the clock; the cache then only protects
            // against a reader of process memory less well, never against remote clients.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                .to_le_bytes();
            mac_key[..16].copy_from_slice(&t);
        }
        Authenticator {
            table: RwLock::new(Arc::new(table)),
            permissions: RwLock::new(Arc::new(permissions::PermissionsConfig::default())),
            generation: AtomicU64::new(0),
            cache: Mutex::new(HashMap::new()),
            mac_key,
            gate: Semaphore::new(tuning.bcrypt_concurrency.max(1)),
            tuning,
            stats: AuthStats::default(),
        }
    }

    /// Swaps in a freshly loaded table; remembered results are dropped. Open connections are
    /// not affected.
    pub fn replace_table(&self, table: UserTable) {
        let table = Arc::new(table);
        match self.table.write() {
            Ok(mut t) => *t = table,
            Err(poisoned) => *poisoned.into_inner() = table,
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.lock_cache().clear();
    }

    /// Puts `rules` in force (at start and on reload); open connections keep their current
    /// subscriptions, new actions are checked against them.
    pub fn replace_permissions(&self, rules: permissions::PermissionsConfig) {
        let rules = Arc::new(rules);
        match self.permissions.write() {
            Ok(mut p) => *p = rules,
            Err(poisoned) => *poisoned.into_inner() = rules,
        }
    }

    /// Whether `user` may `action` on `channel`.
    pub fn allows(&self, user: &str, action: permissions::Action, channel: &str) -> bool {
        let rules = match self.permissions.read() {
            Ok(p) => Arc::clone(&p),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        rules.allows(user, action, channel)
    }

    /// Number of users in force.
    pub fn user_count(&self) -> usize {
        self.current().len()
    }

    fn current(&self) -> Arc<UserTable> {
        match self.table.read() {
            Ok(t) => Arc::clone(&t),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Cached>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cache_key(&self, generation: u64, user: &str, password: &[u8]) -> CacheKey {
        // A 64-byte key is exactly SHA-256's block size, so this constructor is infallible.
        let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new((&self.mac_key).into());
        mac.update(&generation.to_le_bytes());
        mac.update(&(user.len() as u64).to_le_bytes());
        mac.update(user.as_bytes());
        mac.update(password);
        mac.finalize().into_bytes().into()
    }

    /// Like [`Authenticator::verify`], for a client that failed recently when `suspects` is
    /// given: its check first waits for that gate (one at a time), so suspects' expensive
    /// checks queue behind each other and hold at most one place in the bcrypt queue that
    /// everyone else uses.
    pub async fn verify_from(
        &self,
        user: &str,
        password: &str,
        suspects: Option<&Semaphore>,
    ) -> bool {
        let _turn = match suspects {
            Some(g) => g.acquire().await.ok(),
            None => None,
        };
        self.verify(user, password).await
    }

    /// Whether `user` may log in with `password`.
    pub async fn verify(&self, user: &str, password: &str) -> bool {
        let ok = self.verify_inner(user, password.as_bytes()).await;
        if ok {
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    async fn verify_inner(&self, user: &str, password: &[u8]) -> bool {
        let generation = self.generation.load(Ordering::SeqCst);
        let table = self.current();
        let (hash, known) = match table.users.get(user) {
            Some(e) => (e.hash.clone(), true),
            None => (table.dummy.clone(), false),
        };
        drop(table);

        if !hash.is_expensive() {
            self.stats.hash_checks.fetch_add(1, Ordering::Relaxed);
            return hash.verify(password) && known;
        }

        let key = self.cache_key(generation, user, password);
        if let Some(c) = self.lock_cache().get(&key) {
            if c.until > Instant::now() {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                return c.ok && known;
            }
        }

        let ok = {
            let Ok(_permit) = self.gate.acquire().await else {
                return false;
            };
            self.stats.hash_checks.fetch_add(1, Ordering::Relaxed);
            self.stats.bcrypt_checks.fetch_add(1, Ordering::Relaxed);
            let pw = password.to_vec();
            tokio::task::spawn_blocking(move || hash.verify(&pw))
                .await
                .unwrap_or(false)
        } && known;

        if self.generation.load(Ordering::SeqCst) == generation {
            let ttl = if ok {
                self.tuning.success_ttl
            } else {
                self.tuning.failure_ttl
            };
            let now = Instant::now();
            let mut cache = self.lock_cache();
            if cache.len() >= self.tuning.cache_capacity {
                cache.retain(|_, c| c.until > now);
                if cache.len() >= self.tuning.cache_capacity {
                    cache.clear();
                }
            }
            cache.insert(
                key,
                Cached {
                    ok,
                    until: now + ttl,
                },
            );
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(lines: &str) -> UserTable {
        let src = CredentialSources {
            files: vec![],
            lines: vec![("test".into(), lines.into())],
        };
        src.load().expect("load").0
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn bcrypt_success_is_cached_and_reload_forgets_it() {
        let h = bcrypt::hash("pw", 4).expect("hash");
        let auth = Authenticator::new(table(&format!("u:{h}")), AuthTuning::default());
        rt().block_on(async {
            assert!(auth.verify("u", "pw").await);
            assert!(auth.verify("u", "pw").await);
            assert_eq!(auth.stats.bcrypt_checks.load(Ordering::Relaxed), 1);
            assert_eq!(auth.stats.cache_hits.load(Ordering::Relaxed), 1);
            // a wrong password is never answered by the success entry
            assert!(!auth.verify("u", "pw2").await);
            assert_eq!(auth.stats.bcrypt_checks.load(Ordering::Relaxed), 2);
            // repeated wrong password: cached failure
            assert!(!auth.verify("u", "pw2").await);
            assert_eq!(auth.stats.bcrypt_checks.load(Ordering::Relaxed), 2);

            let h2 = bcrypt::hash("new", 4).expect("hash");
            auth.replace_table(table(&format!("u:{h2}")));
            assert!(
                !auth.verify("u", "pw").await,
                "old password must stop working"
            );
            assert!(auth.verify("u", "new").await);
        });
    }

    #[test]
    fn unknown_user_pays_a_bcrypt_check_like_a_wrong_password() {
        let h = bcrypt::hash("pw", 5).expect("hash");
        let auth = Authenticator::new(
            table(&format!("u:{h}\nqa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1")),
            AuthTuning::default(),
        );
        rt().block_on(async {
            assert!(!auth.verify("nobody", "pw").await);
            assert_eq!(auth.stats.bcrypt_checks.load(Ordering::Relaxed), 1);
            assert!(!auth.verify("u", "wrong").await);
            assert_eq!(auth.stats.bcrypt_checks.load(Ordering::Relaxed), 2);
        });
        let t = table(&format!("u:{h}"));
        assert!(matches!(t.dummy, PasswordHash::Bcrypt { cost: 5, .. }));
    }

    #[test]
    fn unknown_user_never_matches_even_the_dummy() {
        let auth = Authenticator::new(
            table("qa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1"),
            AuthTuning::default(),
        );
        rt().block_on(async {
            assert!(auth.verify("qa", "4lt0@1234").await);
            assert!(!auth.verify("qa", "4lt0@123").await);
            assert!(!auth.verify("QA", "4lt0@1234").await);
            assert!(!auth.verify("", "").await);
        });
        assert!(matches!(
            table("qa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1").dummy,
            PasswordHash::Apr1 { .. }
        ));
    }

    #[test]
    fn duplicates_and_empty_tables_warn() {
        let src = CredentialSources {
            files: vec![],
            lines: vec![
                ("a".into(), "u:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=".into()),
                ("b".into(), "u:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1".into()),
            ],
        };
        let (t, w) = src.load().expect("load");
        assert_eq!(t.len(), 1);
        assert!(w[0].contains("defined twice"), "{w:?}");
        let (_, w) = CredentialSources::default().load().expect("load");
        assert!(w[0].contains("no users"), "{w:?}");
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let src = CredentialSources {
            files: vec!["/nonexistent/htpasswd".into()],
            lines: vec![],
        };
        let e = src.load().err().expect("error").to_string();
        assert!(e.contains("/nonexistent/htpasswd"), "{e}");
    }
}
