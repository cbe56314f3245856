//! Durable storage of messages: one interface, three databases (SQLite through rusqlite,
//! MariaDB/MySQL and PostgreSQL through sqlx). The `memory` backend has no storage at all.
//!
//! **The table.** `<prefix>data`, the layout of the original WSMessageBrocker (`data_id`,
//! `channel`, `data`, `created`) plus columns WSMB adds at start-up: `frame` (the sender's frame
//! verbatim; a WSMB row leaves `data`, the original's single item, empty), `remaining` (deliveries still owed; 1 for every row WSMB writes), `expires_at`,
//! `msg_key` (the broker's message id), `claimed_by` / `claimed_until` (which receiver holds the
//! row, until when: epoch milliseconds), `deliveries` (how often it was handed out). Rows the
//! original left behind have no `frame`: their `data` is one item.
//!
//! **What lives where.** Messages live in the table, not in memory. The broker holds, per
//! channel, a count of stored rows (for the caps, checked and taken atomically), and the rows
//! its receivers hold right now (bounded by their windows). A receiver with room takes the
//! next rows of its channel with [`Storage::claim`]: one statement picks the oldest rows that
//! nobody holds and marks them held by that receiver until a deadline. Because claims are in
//! the table, several brokers could later share one PostgreSQL or MariaDB queue
//! (`FOR UPDATE SKIP LOCKED`, `LISTEN/NOTIFY`); today one broker owns it, and at start-up it
//! releases the claims of its previous run.
//!
//! **Writes.** One writer task applies every write in batches (group commit: one transaction,
//! one fsync for every write waiting). Ids are assigned by the broker (`data_id`, from the
//! largest in the table), so that a write can be named before it is committed: a message
//! delivered before its insert was committed (a receiver that keeps up) is cancelled in the
//! batch, insert and delete together, and never touches the disk. The queue is bounded by
//! admission ([`Storage::admit`]: a count and bytes of inserts not yet committed); every other
//! write belongs to a row a receiver holds, whose number the receivers' windows bound.
//!
//! **Failures.** A database error never crashes the broker: the state goes `down`, inserts are
//! refused (the sender gets `05`), completions and releases wait in memory (bounded by what
//! receivers hold), and the writer reconnects with back-off. Every commit has a deadline
//! (`storage.commit_timeout`).

mod sql;
mod sqlite;

pub use sql::Pool as SqlPool;
pub(crate) use sql::{connect_lazy, safe};
pub(crate) use sqlite::open_file;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::config::{Backend, StorageConfig};
use crate::ws::Text;

/// A message to store.
#[derive(Debug, Clone)]
pub struct NewRow {
    /// Its id, assigned by the broker ([`Storage::next_id`]).
    pub data_id: i64,
    /// The broker's message id.
    pub key: String,
    /// Its channel.
    pub channel: Arc<str>,
    /// The sender's frame, verbatim (the legacy `data` column stays empty: a WSMB row is a
    /// whole frame, not the single item the original stored there).
    pub frame: Text,
    /// Epoch seconds.
    pub expires_at: Option<u64>,
    /// Held by a receiver from the start (it was handed one at once).
    pub claim: Option<Claim>,
}

/// "Held by this receiver until then".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// `<node>/<connection>`.
    pub holder: Arc<str>,
    /// Epoch milliseconds.
    pub until_ms: i64,
}

/// A stored row, as a receiver takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    /// Primary key.
    pub data_id: i64,
    /// The broker's message id; `None` for rows the original broker stored.
    pub key: Option<String>,
    /// The sender's frame (WSMB rows) ...
    pub frame: Option<String>,
    /// ... or the item (rows of the original broker).
    pub data: Option<String>,
    /// Deliveries owed (1 for rows WSMB writes).
    pub remaining: u32,
    /// Epoch seconds.
    pub expires_at: Option<u64>,
    /// How often it was handed out, this time included.
    pub deliveries: u32,
}

impl StoredRow {
    /// The message id receivers acknowledge it by.
    pub fn message_id(&self) -> String {
        self.key
            .clone()
            .unwrap_or_else(|| format!("legacy-{}", self.data_id))
    }

    /// Bytes of payload it holds.
    pub fn size(&self) -> usize {
        self.frame.as_ref().map_or(0, String::len) + self.data.as_ref().map_or(0, String::len)
    }
}

/// What [`Storage::claim`] asks for.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The channel.
    pub channel: Arc<str>,
    /// Who will hold the rows.
    pub claim: Claim,
    /// Most rows.
    pub max_rows: usize,
    /// Most bytes (past the first row).
    pub max_bytes: usize,
    /// Now, epoch milliseconds (claims that ran out are free again).
    pub now_ms: i64,
}

/// Rows taken by a claim, and whether there may be more.
pub type ClaimResult = Result<(Vec<StoredRow>, bool), StoreError>;

/// A database failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct DbError(pub String);

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        DbError(format!("sqlite: {e}"))
    }
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        DbError(e.to_string())
    }
}

/// Why a message cannot be stored now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A cap is reached.
    #[error("{0}")]
    Full(String),
    /// The database is unavailable.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
}

/// How an insert ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The row is committed.
    Stored,
    /// Every receiver it was meant for had it before the commit: nothing was written.
    Delivered,
}

/// One write, as a database backend applies it.
#[derive(Debug)]
pub enum Op {
    /// Insert a row.
    Insert(NewRow),
    /// A delivery is done: delete the row (or, when it owes more, count one down and release
    /// it).
    Complete {
        /// The row.
        data_id: i64,
        /// Its channel.
        channel: Arc<str>,
        /// Deliveries it owed before this one.
        remaining: u32,
    },
    /// Release rows (their holder went away or ran out of time).
    Release(Vec<i64>),
    /// Take rows for a receiver.
    Claim(ClaimRequest),
    /// Delete expired rows: at most `max` of those with `expires_at <= now`; or, with `key`,
    /// the rows of that message that nobody holds (a withdrawn message).
    Sweep {
        /// Epoch seconds.
        now: u64,
        /// Most rows.
        max: usize,
        /// Withdraw this message (`msg_key`) instead.
        key: Option<String>,
    },
}

/// What one [`Op`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum OpResult {
    /// Inserted.
    Inserted,
    /// Whether a row was deleted (false: it was gone already).
    Deleted(bool),
    /// Updated.
    Updated,
    /// The rows taken, and whether there may be more.
    Claimed(Vec<StoredRow>, bool),
    /// The rows deleted: id and channel.
    Swept(Vec<(i64, String)>),
}

/// What the broker learns from the database when it first reaches it.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// The largest `data_id` in the table.
    pub max_id: i64,
    /// Stored rows per channel.
    pub counts: HashMap<String, usize>,
}

/// The databases.
pub enum Db {
    /// rusqlite.
    Sqlite(sqlite::SqliteDb),
    /// sqlx (MySQL/MariaDB, PostgreSQL).
    Sql(sql::SqlDb),
}

impl Db {
    async fn migrate(&self) -> Result<(), DbError> {
        match self {
            Db::Sqlite(d) => d.migrate().await,
            Db::Sql(d) => d.migrate().await,
        }
    }

    /// Applies `ops` in one transaction.
    async fn apply(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, DbError> {
        match self {
            Db::Sqlite(d) => d.apply(ops).await,
            Db::Sql(d) => d.apply(ops).await,
        }
    }

    /// Releases the claims of `node`'s previous run and reads what recovery needs.
    async fn recover(&self, node: &str) -> Result<Recovered, DbError> {
        match self {
            Db::Sqlite(d) => d.recover(node).await,
            Db::Sql(d) => d.recover(node).await,
        }
    }

    async fn ping(&self) -> Result<(), DbError> {
        match self {
            Db::Sqlite(d) => d.ping().await,
            Db::Sql(d) => d.ping().await,
        }
    }
}

/// Stored rows per channel and in all, taken and given back under one lock.
#[derive(Default)]
struct Counters {
    total: usize,
    per_channel: HashMap<Arc<str>, usize>,
}

enum Job {
    Insert(
        NewRow,
        oneshot::Sender<Result<Committed, StoreError>>,
        Option<Admission>,
    ),
    Complete {
        data_id: i64,
        channel: Arc<str>,
        remaining: u32,
    },
    Release(Vec<i64>),
    Claim(ClaimRequest, oneshot::Sender<ClaimResult>),
    Sweep(
        u64,
        usize,
        Option<String>,
        oneshot::Sender<Result<Vec<(i64, String)>, StoreError>>,
    ),
}

/// A place in the queue of inserts not yet committed (count and bytes), held until the insert
/// is committed or cancelled.
pub struct Admission {
    _count: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// The persistent store shared by the delivery engine.
pub struct Storage {
    tx: mpsc::UnboundedSender<Job>,
    health: watch::Receiver<Result<(), String>>,
    recovered: watch::Receiver<Option<Arc<Recovered>>>,
    counters: Mutex<Counters>,
    next_id: AtomicI64,
    admit_count: Arc<Semaphore>,
    admit_bytes: Arc<Semaphore>,
    admit_bytes_max: usize,
    cfg: StorageConfig,
    backend: Backend,
}

/// Inserts that may wait for their commit at once.
const ADMIT_COUNT: usize = 8192;
/// Bytes of inserts that may wait for their commit at once (what a slow database can make the
/// broker hold for senders).
const ADMIT_BYTES: usize = 16 * 1024 * 1024;

impl Storage {
    /// Opens the database for `cfg` (not `memory`). SQLite problems (a path that cannot be
    /// written) are errors; a network database that is down is not: the storage starts `down`
    /// and connects (and recovers) when it can. `node` names this broker in claims.
    pub async fn open(cfg: &StorageConfig, node: &str) -> Result<Arc<Storage>, DbError> {
        let db = match cfg.backend {
            Backend::Memory => return Err(DbError("the memory backend has no storage".into())),
            Backend::Sqlite => Db::Sqlite(sqlite::SqliteDb::open(&cfg.path, &cfg.prefix)?),
            Backend::Mysql | Backend::Postgres => Db::Sql(sql::SqlDb::new(cfg)?),
        };
        let db = Arc::new(db);
        let first = match db.migrate().await {
            Ok(()) => match db.recover(node).await {
                Ok(r) => Ok(r),
                Err(e) if cfg.backend == Backend::Sqlite => return Err(e),
                Err(e) => Err(e),
            },
            Err(e) if cfg.backend == Backend::Sqlite => return Err(e),
            Err(e) => Err(e),
        };
        let (health_tx, health) = watch::channel(Ok(()));
        let (recovered_tx, recovered) = watch::channel(None);
        let (tx, rx) = mpsc::unbounded_channel();
        let storage = Arc::new(Storage {
            tx,
            health,
            recovered,
            counters: Mutex::new(Counters::default()),
            next_id: AtomicI64::new(1),
            admit_count: Arc::new(Semaphore::new(ADMIT_COUNT)),
            admit_bytes: Arc::new(Semaphore::new(ADMIT_BYTES)),
            admit_bytes_max: ADMIT_BYTES,
            cfg: cfg.clone(),
            backend: cfg.backend,
        });
        match first {
            Ok(r) => {
                storage.apply_recovery(&r);
                let _ = recovered_tx.send(Some(Arc::new(r)));
            }
            Err(e) => {
                warn!("database unavailable at start-up: {e}; retrying in the background");
                let _ = health_tx.send(Err(e.0));
            }
        }
        tokio::spawn(writer(
            db,
            rx,
            health_tx,
            recovered_tx,
            Arc::clone(&storage),
            node.to_owned(),
        ));
        Ok(storage)
    }

    fn apply_recovery(&self, r: &Recovered) {
        self.next_id.fetch_max(r.max_id + 1, Ordering::SeqCst);
        let mut c = self.lock_counters();
        for (ch, n) in &r.counts {
            *c.per_channel.entry(Arc::from(ch.as_str())).or_insert(0) += n;
            c.total += n;
        }
        if !r.counts.is_empty() {
            info!(
                "{} stored message(s) on {} channel(s) to deliver",
                r.counts.values().sum::<usize>(),
                r.counts.len()
            );
        }
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// `Ok` when the database is reachable, else why not.
    pub fn health(&self) -> Result<(), String> {
        self.health.borrow().clone()
    }

    /// What the first contact with the database found (`None` until then).
    pub fn recovered(&self) -> watch::Receiver<Option<Arc<Recovered>>> {
        self.recovered.clone()
    }

    /// A new row id.
    pub fn next_id(&self) -> i64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn lock_counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a place in the queue of inserts (back-pressure on senders while the database
    /// is slower than they are).
    pub async fn admit(&self, bytes: usize) -> Option<Admission> {
        let bytes = bytes.clamp(1, self.admit_bytes_max) as u32;
        let count = Arc::clone(&self.admit_count).acquire_owned().await.ok()?;
        let bytes = Arc::clone(&self.admit_bytes)
            .acquire_many_owned(bytes)
            .await
            .ok()?;
        Some(Admission {
            _count: count,
            _bytes: bytes,
        })
    }

    /// Takes `n` stored places on `channel`, unless a cap would be passed (checked and taken
    /// under one lock).
    pub fn reserve(&self, channel: &str, n: usize) -> Result<(), StoreError> {
        let mut c = self.lock_counters();
        if c.total + n > self.cfg.max_stored_total {
            return Err(StoreError::Full(format!(
                "the broker stores {} messages, its limit (storage.max_stored_total); retry when \
                 receivers have caught up",
                c.total
            )));
        }
        let have = c.per_channel.get(channel).copied().unwrap_or(0);
        if have + n > self.cfg.max_stored_per_channel {
            return Err(StoreError::Full(format!(
                "channel {channel:?} has {have} stored messages, its limit \
                 (storage.max_stored_per_channel); retry when its receivers have caught up"
            )));
        }
        if have == 0 && c.per_channel.len() >= self.cfg.max_channels {
            return Err(StoreError::Full(format!(
                "messages are stored for {} channels, the limit (storage.max_channels); retry \
                 when receivers have caught up",
                c.per_channel.len()
            )));
        }
        match c.per_channel.get_mut(channel) {
            Some(k) => *k += n,
            None => {
                c.per_channel.insert(Arc::from(channel), n);
            }
        }
        c.total += n;
        Ok(())
    }

    /// Gives back one stored place of `channel`.
    pub fn unreserve(&self, channel: &str) {
        let mut c = self.lock_counters();
        if let Some(n) = c.per_channel.get_mut(channel) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_channel.remove(channel);
            }
            c.total = c.total.saturating_sub(1);
        }
    }

    /// Messages stored now (committed or about to be).
    pub fn stored(&self) -> usize {
        self.lock_counters().total
    }

    /// Messages stored per channel now (bounded by `storage.max_channels`).
    pub fn stored_per_channel(&self) -> Vec<(Arc<str>, usize)> {
        self.lock_counters()
            .per_channel
            .iter()
            .map(|(k, v)| (Arc::clone(k), *v))
            .collect()
    }

    /// Messages stored for `channel`.
    pub fn stored_on(&self, channel: &str) -> usize {
        self.lock_counters()
            .per_channel
            .get(channel)
            .copied()
            .unwrap_or(0)
    }

    /// Queues an insert (its place reserved with [`Storage::reserve`]); the receiver resolves
    /// when it is committed, or cancelled because delivered.
    pub fn insert(
        &self,
        row: NewRow,
        admission: Option<Admission>,
    ) -> oneshot::Receiver<Result<Committed, StoreError>> {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(Job::Insert(row, tx, _))) =
            self.tx.send(Job::Insert(row, tx, admission))
        {
            self.unreserve(&row.channel);
            let _ = tx.send(Err(StoreError::Unavailable(
                "the storage writer stopped".into(),
            )));
        }
        rx
    }

    /// A delivery of `data_id` is done.
    pub fn complete(&self, data_id: i64, channel: Arc<str>, remaining: u32) {
        let _ = self.tx.send(Job::Complete {
            data_id,
            channel,
            remaining,
        });
    }

    /// Releases rows nobody holds any more.
    pub fn release(&self, data_ids: Vec<i64>) {
        if !data_ids.is_empty() {
            let _ = self.tx.send(Job::Release(data_ids));
        }
    }

    /// Takes the next free rows of a channel for a receiver; says whether there may be more.
    pub async fn claim(&self, req: ClaimRequest) -> ClaimResult {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Claim(req, tx)).is_err() {
            return Err(StoreError::Unavailable("the storage writer stopped".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("the storage writer stopped".into())))
    }

    /// Deletes up to `max` rows that expired by `now` (epoch seconds); returns them.
    pub async fn sweep(&self, now: u64, max: usize) -> Result<Vec<(i64, String)>, StoreError> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Sweep(now, max, None, tx)).is_err() {
            return Err(StoreError::Unavailable("the storage writer stopped".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("the storage writer stopped".into())))
    }

    /// Deletes the stored rows of message `key` that no receiver holds; returns them (none:
    /// it was handed out already, or is not stored).
    pub async fn withdraw(&self, key: &str) -> Result<Vec<(i64, String)>, StoreError> {
        let (tx, rx) = oneshot::channel();
        if self
            .tx
            .send(Job::Sweep(0, 64, Some(key.to_owned()), tx))
            .is_err()
        {
            return Err(StoreError::Unavailable("the storage writer stopped".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("the storage writer stopped".into())))
    }
}

/// How often an idle writer checks that the database is still there.
const IDLE_CHECK: Duration = Duration::from_secs(5);
/// Most completions and releases kept while the database is down (each belongs to a row a
/// receiver held, so this is reached only after a very long outage under traffic; past it the
/// oldest are dropped, and those rows may be delivered again after the outage).
const MAX_RETRY: usize = 200_000;

/// What waits for the outcome of one op of a batch.
enum Waiter {
    Insert(
        oneshot::Sender<Result<Committed, StoreError>>,
        Arc<str>,
        Option<Admission>,
    ),
    Complete(Arc<str>),
    Claim(oneshot::Sender<ClaimResult>),
    Sweep(oneshot::Sender<Result<Vec<(i64, String)>, StoreError>>),
    None,
}

/// The group-commit writer: takes every write waiting, cancels inserts already delivered,
/// commits the rest in one transaction.
async fn writer(
    db: Arc<Db>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    health: watch::Sender<Result<(), String>>,
    recovered: watch::Sender<Option<Arc<Recovered>>>,
    storage: Arc<Storage>,
    node: String,
) {
    let cfg = storage.cfg.clone();
    // Completions and releases that could not be written yet (database down).
    let mut retry: std::collections::VecDeque<Job> = std::collections::VecDeque::new();
    let mut backoff = Duration::from_millis(200);
    let mut batch: Vec<Job> = Vec::new();
    loop {
        if health.borrow().is_err() {
            let check = async {
                db.migrate().await?;
                if recovered.borrow().is_none() {
                    let r = db.recover(&node).await?;
                    storage.apply_recovery(&r);
                    let _ = recovered.send(Some(Arc::new(r)));
                }
                db.ping().await
            };
            match tokio::time::timeout(cfg.commit_timeout, check).await {
                Ok(Ok(())) => {
                    info!("database reachable again");
                    backoff = Duration::from_millis(200);
                    let _ = health.send(Ok(()));
                }
                Ok(Err(e)) => {
                    down(&health, &e.0);
                    refuse_until(&mut rx, &mut retry, backoff, &e.0, &storage).await;
                    backoff = (backoff * 2).min(cfg.reconnect_max);
                    continue;
                }
                Err(_) => {
                    let why = format!("no answer within {:?}", cfg.commit_timeout);
                    down(&health, &why);
                    refuse_until(&mut rx, &mut retry, backoff, &why, &storage).await;
                    backoff = (backoff * 2).min(cfg.reconnect_max);
                    continue;
                }
            }
        }
        batch.clear();
        batch.extend(retry.drain(..));
        if batch.is_empty() {
            // Idle: check the database now and then, so that `ping` and `/healthz` tell the
            // truth even without traffic.
            match tokio::time::timeout(IDLE_CHECK, rx.recv()).await {
                Ok(Some(j)) => batch.push(j),
                Ok(None) => return,
                Err(_) => {
                    match tokio::time::timeout(cfg.commit_timeout, db.ping()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => down(&health, &e.0),
                        Err(_) => down(&health, "no answer to a ping"),
                    }
                    continue;
                }
            }
            if !cfg.commit_delay.is_zero() {
                // Let more writes join this commit (and deliveries cancel their inserts).
                let until = tokio::time::Instant::now() + cfg.commit_delay;
                while batch.len() < cfg.commit_batch {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(j)) => batch.push(j),
                        _ => break,
                    }
                }
            }
        }
        while batch.len() < cfg.commit_batch {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        commit(&db, &mut batch, &mut retry, &health, &storage, &cfg).await;
    }
}

fn down(health: &watch::Sender<Result<(), String>>, why: &str) {
    if health.borrow().is_ok() {
        warn!(
            "database unavailable: {why}; check that the database server runs and answers \
             at storage.url (journalctl -u mariadb / postgresql; for SQLite: the disk and the \
             file's permissions). Messages go to receivers online meanwhile and are refused \
             with 05 when none can take them; said again when it is back"
        );
    }
    let _ = health.send(Err(why.to_owned()));
}

/// While the database is down, for `pause`: refuses inserts and claims at once, keeps
/// completions and releases for later.
async fn refuse_until(
    rx: &mut mpsc::UnboundedReceiver<Job>,
    retry: &mut std::collections::VecDeque<Job>,
    pause: Duration,
    why: &str,
    storage: &Storage,
) {
    let deadline = tokio::time::Instant::now() + pause;
    while let Ok(Some(j)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        fail(j, why, retry, storage);
    }
}

fn fail(j: Job, why: &str, retry: &mut std::collections::VecDeque<Job>, storage: &Storage) {
    let err = || StoreError::Unavailable(why.to_owned());
    match j {
        Job::Insert(row, reply, _) => {
            storage.unreserve(&row.channel);
            let _ = reply.send(Err(err()));
        }
        Job::Claim(_, reply) => {
            let _ = reply.send(Err(err()));
        }
        Job::Sweep(_, _, _, reply) => {
            let _ = reply.send(Err(err()));
        }
        j @ (Job::Complete { .. } | Job::Release(_)) => {
            if retry.len() >= MAX_RETRY {
                retry.pop_front();
                warn!(
                    "{MAX_RETRY} deliveries wait to be recorded while the database is down; \
                     dropping the oldest (those messages may be delivered again)"
                );
            }
            retry.push_back(j);
        }
    }
}

async fn commit(
    db: &Db,
    batch: &mut Vec<Job>,
    retry: &mut std::collections::VecDeque<Job>,
    health: &watch::Sender<Result<(), String>>,
    storage: &Storage,
    cfg: &StorageConfig,
) {
    // Cancel inserts whose delivery is already done in this batch; a release of a row not yet
    // inserted only clears its claim.
    let mut pending: HashMap<i64, usize> = HashMap::new();
    for (i, j) in batch.iter().enumerate() {
        if let Job::Insert(row, ..) = j {
            pending.insert(row.data_id, i);
        }
    }
    let mut cancelled = vec![false; batch.len()];
    if !pending.is_empty() {
        for i in 0..batch.len() {
            match &mut batch[i] {
                Job::Complete {
                    data_id,
                    remaining: 1,
                    ..
                } => {
                    if let Some(&at) = pending.get(data_id) {
                        cancelled[at] = true;
                        cancelled[i] = true;
                    }
                }
                Job::Release(ids) => {
                    let (early, late): (Vec<i64>, Vec<i64>) =
                        ids.iter().partition(|id| pending.contains_key(id));
                    *ids = late;
                    for id in early {
                        if let Some(&at) = pending.get(&id) {
                            if let Job::Insert(row, ..) = &mut batch[at] {
                                row.claim = None;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut ops = Vec::with_capacity(batch.len());
    let mut waiters = Vec::with_capacity(batch.len());
    let mut kept: Vec<Job> = Vec::new();
    for (j, cancel) in batch.drain(..).zip(cancelled) {
        if cancel {
            if let Job::Insert(row, reply, admission) = j {
                storage.unreserve(&row.channel);
                let _ = reply.send(Ok(Committed::Delivered));
                drop(admission);
            }
            continue;
        }
        match j {
            Job::Insert(row, reply, admission) => {
                let ch = Arc::clone(&row.channel);
                ops.push(Op::Insert(row));
                waiters.push(Waiter::Insert(reply, ch, admission));
            }
            Job::Complete {
                data_id,
                channel,
                remaining,
            } => {
                ops.push(Op::Complete {
                    data_id,
                    channel: Arc::clone(&channel),
                    remaining,
                });
                waiters.push(if remaining <= 1 {
                    Waiter::Complete(Arc::clone(&channel))
                } else {
                    Waiter::None
                });
                kept.push(Job::Complete {
                    data_id,
                    channel,
                    remaining,
                });
            }
            Job::Release(ids) => {
                if ids.is_empty() {
                    continue;
                }
                ops.push(Op::Release(ids.clone()));
                waiters.push(Waiter::None);
                kept.push(Job::Release(ids));
            }
            Job::Claim(req, reply) => {
                ops.push(Op::Claim(req));
                waiters.push(Waiter::Claim(reply));
            }
            Job::Sweep(now, max, key, reply) => {
                ops.push(Op::Sweep { now, max, key });
                waiters.push(Waiter::Sweep(reply));
            }
        }
    }
    if ops.is_empty() {
        return;
    }
    // By kind: inserts, releases, completions, claims, sweeps. Safe (an insert and the
    // completion of the same row never reach here together; a claim takes only free rows, and
    // may as well see those released or inserted after it was asked), and it lets a database
    // do each kind in one statement.
    let mut pairs: Vec<(Op, Waiter)> = ops.into_iter().zip(waiters).collect();
    pairs.sort_by_key(|(op, _)| match op {
        Op::Insert(_) => 0,
        Op::Release(_) => 1,
        Op::Complete { .. } => 2,
        Op::Claim(_) => 3,
        Op::Sweep { .. } => 4,
    });
    let (ops, waiters): (Vec<Op>, Vec<Waiter>) = pairs.into_iter().unzip();
    let result = match tokio::time::timeout(cfg.commit_timeout, db.apply(ops)).await {
        Ok(r) => r,
        Err(_) => Err(DbError(format!(
            "a commit took longer than {:?} (storage.commit_timeout)",
            cfg.commit_timeout
        ))),
    };
    match result {
        Ok(results) => {
            for (w, r) in waiters.into_iter().zip(results) {
                match (w, r) {
                    (Waiter::Insert(reply, _, admission), _) => {
                        let _ = reply.send(Ok(Committed::Stored));
                        drop(admission);
                    }
                    (Waiter::Complete(ch), OpResult::Deleted(true)) => storage.unreserve(&ch),
                    (Waiter::Claim(reply), OpResult::Claimed(rows, more)) => {
                        let _ = reply.send(Ok((rows, more)));
                    }
                    (Waiter::Sweep(reply), OpResult::Swept(rows)) => {
                        for (_, ch) in &rows {
                            storage.unreserve(ch);
                        }
                        let _ = reply.send(Ok(rows));
                    }
                    _ => {}
                }
            }
        }
        Err(e) => {
            warn!("database write failed: {e}");
            for w in waiters {
                match w {
                    Waiter::Insert(reply, ch, _) => {
                        storage.unreserve(&ch);
                        let _ = reply.send(Err(StoreError::Unavailable(e.0.clone())));
                    }
                    Waiter::Claim(reply) => {
                        let _ = reply.send(Err(StoreError::Unavailable(e.0.clone())));
                    }
                    Waiter::Sweep(reply) => {
                        let _ = reply.send(Err(StoreError::Unavailable(e.0.clone())));
                    }
                    Waiter::Complete(_) | Waiter::None => {}
                }
            }
            for j in kept {
                fail(j, &e.0, retry, storage);
            }
            down(health, &e.0);
        }
    }
}
