//! Durable storage of messages: one interface, three databases (SQLite through rusqlite,
//! MariaDB/MySQL and PostgreSQL through sqlx), plus "memory" (no storage at all).
//!
//! All of them use one table, `<prefix>data`, the layout of the original WSMessageBrocker
//! (`data_id`, `channel`, `data`, `created`) plus columns WSMB adds at start-up (`frame`: the
//! sender's frame verbatim; `remaining`: deliveries still owed; `expires_at`; `msg_key`: the
//! broker's message id). Rows the original left behind have no `frame`: they are delivered the
//! original way, one item each.
//!
//! Writes go through one writer task that commits them in batches (group commit: one
//! transaction, one fsync, for every write waiting): a sender is answered once its message is
//! committed, and many senders share a commit. A database error never crashes the broker: the
//! state goes `down`, inserts are refused at once (the sender gets `05`), deletes wait in memory,
//! and the writer reconnects with back-off.

mod sql;
mod sqlite;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::config::{Backend, StorageConfig};

/// A message to store.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The broker's message id.
    pub key: String,
    /// Its channel.
    pub channel: String,
    /// The sender's frame, verbatim (shared with the frame in memory, not copied).
    pub frame: tokio_tungstenite::tungstenite::Utf8Bytes,
    /// Its `data` array as JSON with non-ASCII escaped (the legacy column may be latin1).
    pub data: String,
    /// Deliveries owed.
    pub remaining: u32,
    /// Epoch seconds.
    pub expires_at: Option<u64>,
}

/// A stored row, as loaded at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    /// Primary key.
    pub data_id: i64,
    /// The broker's id; `None` for rows the original broker stored.
    pub key: Option<String>,
    /// Channel.
    pub channel: String,
    /// The sender's frame (WSMB rows) ...
    pub frame: Option<String>,
    /// ... or the item (rows of the original broker).
    pub data: String,
    /// Deliveries owed (1 for legacy rows).
    pub remaining: u32,
    /// Epoch seconds.
    pub expires_at: Option<u64>,
}

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

/// One write.
#[derive(Debug)]
pub enum Op {
    /// Insert; the new `data_id` comes back.
    Insert(NewMessage),
    /// Delete a row.
    Delete(i64),
    /// Set `remaining` of a row.
    Remaining(i64, u32),
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

    /// Applies `ops` in one transaction; returns the ids of the inserts, in order.
    async fn apply(&self, ops: Vec<Op>) -> Result<Vec<i64>, DbError> {
        match self {
            Db::Sqlite(d) => d.apply(ops).await,
            Db::Sql(d) => d.apply(ops).await,
        }
    }

    async fn load(&self, after: i64, limit: usize) -> Result<Vec<StoredRow>, DbError> {
        match self {
            Db::Sqlite(d) => d.load(after, limit).await,
            Db::Sql(d) => d.load(after, limit).await,
        }
    }

    async fn ping(&self) -> Result<(), DbError> {
        match self {
            Db::Sqlite(d) => d.ping().await,
            Db::Sql(d) => d.ping().await,
        }
    }
}

/// `data` JSON with every non-ASCII character written `\uXXXX`: still the same JSON, and safe
/// in a latin1 column.
pub fn ascii_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for u in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

enum Write {
    Insert(NewMessage, oneshot::Sender<Result<i64, StoreError>>),
    Other(Op),
}

/// The persistent store shared by the connections and the delivery engine.
pub struct Storage {
    tx: mpsc::UnboundedSender<Write>,
    health: watch::Receiver<Result<(), String>>,
    counts: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
    cfg: StorageConfig,
    backend: Backend,
    db: Arc<Db>,
}

impl Storage {
    /// Opens the database for `cfg` (not `memory`). SQLite problems (a path that cannot be
    /// written) are errors; a network database that is down is not: the storage starts `down`
    /// and connects when it can.
    pub async fn open(cfg: &StorageConfig) -> Result<Arc<Storage>, DbError> {
        let db = match cfg.backend {
            Backend::Memory => return Err(DbError("the memory backend has no storage".into())),
            Backend::Sqlite => Db::Sqlite(sqlite::SqliteDb::open(&cfg.path, &cfg.prefix)?),
            Backend::Mysql | Backend::Postgres => Db::Sql(sql::SqlDb::new(cfg)?),
        };
        let db = Arc::new(db);
        let first = match db.migrate().await {
            Ok(()) => Ok(()),
            Err(e) if cfg.backend == Backend::Sqlite => return Err(e),
            Err(e) => {
                warn!("database unavailable at start-up: {e}; retrying in the background");
                Err(e.0)
            }
        };
        let (health_tx, health) = watch::channel(first);
        let (tx, rx) = mpsc::unbounded_channel();
        let storage = Arc::new(Storage {
            tx,
            health,
            counts: Mutex::new(HashMap::new()),
            total: AtomicUsize::new(0),
            cfg: cfg.clone(),
            backend: cfg.backend,
            db: Arc::clone(&db),
        });
        tokio::spawn(writer(db, rx, health_tx, cfg.clone()));
        Ok(storage)
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// `Ok` when the database is reachable, else why not.
    pub fn health(&self) -> Result<(), String> {
        self.health.borrow().clone()
    }

    /// A receiver of health changes.
    pub fn watch_health(&self) -> watch::Receiver<Result<(), String>> {
        self.health.clone()
    }

    fn lock_counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one more stored message on `channel`, unless a cap is reached.
    pub fn reserve(&self, channel: &str) -> Result<(), StoreError> {
        let total = self.total.load(Ordering::Relaxed);
        if total >= self.cfg.max_stored_total {
            return Err(StoreError::Full(format!(
                "the broker stores {total} messages, its limit (storage.max_stored_total); \
                 retry when receivers have caught up"
            )));
        }
        let mut counts = self.lock_counts();
        let n = counts.entry(channel.to_owned()).or_insert(0);
        if *n >= self.cfg.max_stored_per_channel {
            return Err(StoreError::Full(format!(
                "channel {channel:?} has {n} stored messages, its limit \
                 (storage.max_stored_per_channel); retry when its receivers have caught up"
            )));
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Forgets one stored message of `channel`.
    pub fn release(&self, channel: &str) {
        let mut counts = self.lock_counts();
        if let Some(n) = counts.get_mut(channel) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(channel);
            }
            let _ = self
                .total
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                    Some(t.saturating_sub(1))
                });
        }
    }

    /// Messages stored now.
    pub fn stored(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Submits a message for the next commit; the receiver resolves when it is committed
    /// (at once with an error when the database is down).
    pub fn submit(&self, m: NewMessage) -> oneshot::Receiver<Result<i64, StoreError>> {
        let (tx, rx) = oneshot::channel();
        if let Err(e) = self.health() {
            let _ = tx.send(Err(StoreError::Unavailable(e)));
            return rx;
        }
        if let Err(mpsc::error::SendError(Write::Insert(_, tx))) =
            self.tx.send(Write::Insert(m, tx))
        {
            let _ = tx.send(Err(StoreError::Unavailable(
                "the storage writer stopped".into(),
            )));
        }
        rx
    }

    /// Stores a message; resolves when it is committed.
    pub async fn insert(&self, m: NewMessage) -> Result<i64, StoreError> {
        self.submit(m)
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("the storage writer stopped".into())))
    }

    /// Deletes a row (in the next commit; kept and retried while the database is down).
    pub fn delete(&self, data_id: i64) {
        let _ = self.tx.send(Write::Other(Op::Delete(data_id)));
    }

    /// Records how many deliveries a row still owes.
    pub fn set_remaining(&self, data_id: i64, remaining: u32) {
        let _ = self
            .tx
            .send(Write::Other(Op::Remaining(data_id, remaining)));
    }

    /// Loads every stored row (in `data_id` order) and counts them against the caps. Waits
    /// for the database to be reachable.
    pub async fn load_all(&self) -> Vec<StoredRow> {
        let mut health = self.watch_health();
        loop {
            if health.borrow_and_update().is_ok() {
                let mut rows = Vec::new();
                let mut after = 0;
                let result = loop {
                    match self.db.load(after, 1000).await {
                        Ok(batch) if batch.is_empty() => break Ok(()),
                        Ok(batch) => {
                            after = batch.last().map_or(after, |r| r.data_id);
                            rows.extend(batch);
                        }
                        Err(e) => break Err(e),
                    }
                };
                match result {
                    Ok(()) => {
                        let mut counts = self.lock_counts();
                        for r in &rows {
                            *counts.entry(r.channel.clone()).or_insert(0) += 1;
                        }
                        self.total.fetch_add(rows.len(), Ordering::Relaxed);
                        return rows;
                    }
                    Err(e) => warn!("loading stored messages failed: {e}; retrying"),
                }
            }
            if tokio::time::timeout(Duration::from_secs(5), health.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return Vec::new();
            }
        }
    }
}

/// How often an idle writer checks that the database is still there.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// The group-commit writer: takes every write waiting, commits them in one transaction.
async fn writer(
    db: Arc<Db>,
    mut rx: mpsc::UnboundedReceiver<Write>,
    health: watch::Sender<Result<(), String>>,
    cfg: StorageConfig,
) {
    // Deletes and updates that could not be written yet (database down).
    let mut retry: Vec<Op> = Vec::new();
    let mut backoff = Duration::from_millis(200);
    loop {
        if health.borrow().is_err() {
            match db.migrate().await.and(db.ping().await) {
                Ok(()) => {
                    info!("database reachable again");
                    backoff = Duration::from_millis(200);
                    let _ = health.send(Ok(()));
                }
                Err(e) => {
                    let _ = health.send(Err(e.0.clone()));
                    // Inserts that arrive meanwhile are refused at once.
                    let deadline = tokio::time::Instant::now() + backoff;
                    while let Ok(Some(w)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                        match w {
                            Write::Insert(_, reply) => {
                                let _ = reply.send(Err(StoreError::Unavailable(e.0.clone())));
                            }
                            Write::Other(op) => retry.push(op),
                        }
                    }
                    backoff = (backoff * 2).min(cfg.reconnect_max);
                    continue;
                }
            }
        }
        let mut ops = std::mem::take(&mut retry);
        let mut replies = Vec::new();
        if ops.is_empty() {
            // Idle: check the database now and then, so that `ping` and `/healthz` tell the
            // truth even without traffic.
            match tokio::time::timeout(IDLE_CHECK, rx.recv()).await {
                Ok(Some(w)) => push(w, &mut ops, &mut replies),
                Ok(None) => return,
                Err(_) => {
                    if let Err(e) = db.ping().await {
                        warn!("database unavailable: {e}");
                        let _ = health.send(Err(e.0));
                    }
                    continue;
                }
            }
        }
        while ops.len() < cfg.commit_batch {
            match rx.try_recv() {
                Ok(w) => push(w, &mut ops, &mut replies),
                Err(_) => break,
            }
        }
        let kept: Vec<Op> = ops
            .iter()
            .filter_map(|o| match o {
                Op::Delete(id) => Some(Op::Delete(*id)),
                Op::Remaining(id, n) => Some(Op::Remaining(*id, *n)),
                Op::Insert(_) => None,
            })
            .collect();
        match db.apply(ops).await {
            Ok(ids) => {
                for (reply, id) in replies.into_iter().zip(ids) {
                    let _ = reply.send(Ok(id));
                }
            }
            Err(e) => {
                warn!("database write failed: {e}");
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Unavailable(e.0.clone())));
                }
                retry = kept;
                let _ = health.send(Err(e.0));
            }
        }
    }
}

fn push(w: Write, ops: &mut Vec<Op>, replies: &mut Vec<oneshot::Sender<Result<i64, StoreError>>>) {
    match w {
        Write::Insert(m, reply) => {
            ops.push(Op::Insert(m));
            replies.push(reply);
        }
        Write::Other(op) => ops.push(op),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_json_keeps_the_json() {
        let s = r#"[{"m":"é😀"}]"#;
        let a = ascii_json(s);
        assert!(a.is_ascii());
        let v: serde_json::Value = serde_json::from_str(&a).expect("json");
        assert_eq!(v[0]["m"], "é😀");
    }
}
