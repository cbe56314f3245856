//! The durable job queue: SQLite in the agent's state directory (WAL, `synchronous=FULL`, so a
//! committed job survives a power cut).
//!
//! Every state change and the status event that reports it are written in one transaction: the
//! `outbox` table holds events until the broker has acknowledged them, so no outcome is ever
//! lost either. Jobs are unique by id (duplicates are ignored).
//!
//! Sending a part is bracketed: `inflight_part` is set (committed) right before the PDU is handed
//! to the modem and cleared with the result. A job found in flight after a crash had its part's
//! outcome lost: it is ambiguous, and is not sent again unless `retry_ambiguous` is set.
//!
//! The connection is synchronous; [`Store`] runs each operation on the blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use wsmb_protocol::sms::{Status, StatusEvent};

use crate::jobs::ValidJob;

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    /// The application's id.
    pub id: String,
    /// Normalised destination.
    pub receiver: String,
    /// Text.
    pub message: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// Epoch seconds after which not to send.
    pub expires_at: Option<u64>,
    /// Concatenation reference, fixed at the first attempt.
    pub concat_ref: Option<u8>,
    /// Parts already accepted by the network.
    pub parts_done: u32,
    /// Their message references.
    pub mrs: Vec<u8>,
    /// The modem the first parts went through (later parts must use it too: a phone joins parts
    /// only from one sender).
    pub modem: Option<String>,
    /// The modem of the last failed attempt (avoided when another can take it).
    pub last_failed_modem: Option<String>,
    /// The job's own choice about a delivery report (`None`: the agent's default).
    pub status_report: Option<bool>,
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("job store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Could not create the state directory.
    #[error("job store: cannot create {path}: {err}")]
    Dir {
        /// The directory.
        path: String,
        /// The error.
        err: std::io::Error,
    },
    /// The blocking task failed.
    #[error("job store: {0}")]
    Task(String),
}

/// Result of queueing a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// New job, queued (and a `queued` event is in the outbox).
    New,
    /// A job with this id exists already; nothing changed.
    Duplicate,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    receiver TEXT NOT NULL,
    message TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER,
    received_at INTEGER NOT NULL,
    parts INTEGER NOT NULL DEFAULT 1,
    concat_ref INTEGER,
    parts_done INTEGER NOT NULL DEFAULT 0,
    inflight_part INTEGER,
    mrs TEXT NOT NULL DEFAULT '',
    modem TEXT,
    last_failed_modem TEXT,
    error_code TEXT,
    reason TEXT,
    ambiguous INTEGER NOT NULL DEFAULT 0,
    finished_at INTEGER,
    priority INTEGER NOT NULL DEFAULT 0,
    status_report INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs(state, next_attempt_ms);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sends (
    modem TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sends_at ON sends(at_ms);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// Columns added after the first release: a queue made by an older agent gets them.
const ADDED: [(&str, &str); 2] = [
    ("priority", "INTEGER NOT NULL DEFAULT 0"),
    ("status_report", "INTEGER"),
];

fn add_missing_columns(c: &Connection) -> rusqlite::Result<()> {
    let mut st = c.prepare("SELECT name FROM pragma_table_info('jobs')")?;
    let have: Vec<String> = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    for (name, ty) in ADDED {
        if !have.iter().any(|h| h == name) {
            c.execute_batch(&format!("ALTER TABLE jobs ADD COLUMN {name} {ty}"))?;
        }
    }
    Ok(())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn push_event(tx: &rusqlite::Transaction<'_>, e: &StatusEvent) -> rusqlite::Result<()> {
    let json = serde_json::to_string(e).unwrap_or_default();
    tx.execute("INSERT INTO outbox(event) VALUES (?1)", params![json])?;
    Ok(())
}

/// What ended a job, for [`Store::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// `Failed` or `Expired`.
    pub status: Status,
    /// Short code.
    pub code: Option<String>,
    /// In words.
    pub reason: String,
    /// The SMS may have gone out.
    pub ambiguous: bool,
    /// The modem involved.
    pub modem: Option<String>,
}

/// The job store.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    /// A second connection for queries: in WAL mode it reads while the writer waits for its
    /// fsync, so a slow disk (an SD card) never stalls the dispatcher's and the link's reads.
    reader: Arc<Mutex<Connection>>,
    changed: Arc<tokio::sync::Notify>,
}

impl Store {
    /// Opens (creating) `jobs.sqlite` in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|err| StoreError::Dir {
            path: dir.display().to_string(),
            err,
        })?;
        let conn = Connection::open(dir.join("jobs.sqlite"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        add_missing_columns(&conn)?;
        let reader = Connection::open_with_flags(
            dir.join("jobs.sqlite"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            reader: Arc::new(Mutex::new(reader)),
            changed: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Resolves after the next outbox change (a new event); a change that happened while nobody
    /// waited is remembered once.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Wakes whoever waits in [`Store::changed`].
    pub fn poke(&self) {
        self.changed.notify_one();
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        Self::run(Arc::clone(&self.conn), f).await
    }

    /// Runs a query on the reading connection.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        Self::run(Arc::clone(&self.reader), f).await
    }

    async fn run<T: Send + 'static>(
        conn: Arc<Mutex<Connection>>,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c).map_err(StoreError::from)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Like `with`, for operations that may add outbox events: wakes the publisher.
    async fn with_events<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let r = self.with(f).await;
        if r.is_ok() {
            self.changed.notify_one();
        }
        r
    }

    /// Queues a validated job and its `queued` event; duplicates (same id) change nothing.
    pub async fn insert(&self, job: ValidJob) -> Result<Inserted, StoreError> {
        self.with_events(move |c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO jobs(id, receiver, message, state, expires_at, received_at, parts, priority, status_report)
                 VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8)",
                params![job.id, job.receiver, job.message, job.expires_at.map(|e| e as i64), now_secs() as i64, job.parts, job.priority, job.status_report],
            )?;
            if n == 0 {
                return Ok(Inserted::Duplicate);
            }
            let mut e = StatusEvent::new(job.id.clone(), Status::Queued, now_secs());
            e.receiver = Some(job.receiver.clone());
            e.parts = Some(job.parts);
            push_event(&tx, &e)?;
            tx.commit()?;
            Ok(Inserted::New)
        })
        .await
    }

    /// Records a job refused at intake (so that a resent copy is recognised) and its event.
    /// Without an id only the event is stored.
    pub async fn refuse(
        &self,
        id: Option<String>,
        receiver: Option<String>,
        ending: Ending,
    ) -> Result<Inserted, StoreError> {
        self.with_events(move |c| {
            let tx = c.transaction()?;
            let label = match &id {
                Some(id) => {
                    let n = tx.execute(
                        "INSERT OR IGNORE INTO jobs(id, receiver, message, state, received_at, error_code, reason, finished_at)
                         VALUES (?1, ?2, '', ?3, ?4, ?5, ?6, ?4)",
                        params![id, receiver.clone().unwrap_or_default(), state_name(ending.status), now_secs() as i64, ending.code, ending.reason],
                    )?;
                    if n == 0 {
                        return Ok(Inserted::Duplicate);
                    }
                    id.clone()
                }
                None => String::new(),
            };
            let mut e = StatusEvent::new(label, ending.status, now_secs());
            e.receiver = receiver;
            e.error_code = ending.code;
            e.reason = Some(ending.reason);
            push_event(&tx, &e)?;
            tx.commit()?;
            Ok(Inserted::New)
        })
        .await
    }

    /// Up to `limit` queued jobs due now: the OTP lane (priority >= 100) first, then oldest
    /// first.
    pub async fn due(&self, limit: usize) -> Result<Vec<JobRow>, StoreError> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT id, receiver, message, attempts, expires_at, concat_ref, parts_done, mrs, modem, last_failed_modem, status_report
                 FROM jobs WHERE state = 'queued' AND next_attempt_ms <= ?1
                 ORDER BY priority >= ?3 DESC, next_attempt_ms, seq LIMIT ?2",
            )?;
            let lane = wsmb_protocol::sms::PRIORITY_LANE;
            let rows = st.query_map(params![now_ms(), limit as i64, lane], |r| {
                let mrs: String = r.get(7)?;
                Ok(JobRow {
                    id: r.get(0)?,
                    receiver: r.get(1)?,
                    message: r.get(2)?,
                    attempts: r.get(3)?,
                    expires_at: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                    concat_ref: r.get::<_, Option<i64>>(5)?.map(|v| v as u8),
                    parts_done: r.get(6)?,
                    mrs: mrs.split(',').filter_map(|m| m.parse().ok()).collect(),
                    modem: r.get(8)?,
                    last_failed_modem: r.get(9)?,
                    status_report: r.get(10)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// When the next queued job becomes due (epoch ms), if any.
    pub async fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT MIN(next_attempt_ms) FROM jobs WHERE state = 'queued'",
                [],
                |r| r.get::<_, Option<i64>>(0),
            )
        })
        .await
    }

    /// Fixes the concatenation reference of a job at its first attempt (rotating 8-bit counter
    /// kept across restarts) and counts the attempt.
    pub async fn begin_attempt(&self, id: &str, parts: u32) -> Result<u8, StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            let tx = c.transaction()?;
            let existing: Option<i64> = tx
                .query_row("SELECT concat_ref FROM jobs WHERE id = ?1", params![id], |r| r.get(0))
                .optional()?
                .flatten();
            let reference = match existing {
                Some(r) => r as u8,
                None => {
                    let next: i64 = tx
                        .query_row("SELECT value FROM meta WHERE key = 'concat_ref'", [], |r| r.get(0))
                        .optional()?
                        .unwrap_or(0);
                    tx.execute(
                        "INSERT INTO meta(key, value) VALUES ('concat_ref', ?1)
                         ON CONFLICT(key) DO UPDATE SET value = ?1",
                        params![(next + 1) % 256],
                    )?;
                    next as u8
                }
            };
            tx.execute(
                "UPDATE jobs SET concat_ref = ?2, parts = ?3, attempts = attempts + 1, state = 'sending' WHERE id = ?1",
                params![id, reference, parts],
            )?;
            tx.commit()?;
            Ok(reference)
        })
        .await
    }

    /// Marks part `part` (0-based) of job `id` as being handed to `modem` now, and counts it
    /// for the modem's sending limits (`sends`, a day of them is kept).
    pub async fn mark_inflight(&self, id: &str, part: u32, modem: &str) -> Result<(), StoreError> {
        let (id, modem) = (id.to_owned(), modem.to_owned());
        self.with(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE jobs SET inflight_part = ?2, modem = COALESCE(modem, ?3) WHERE id = ?1",
                params![id, part, modem],
            )?;
            let now = now_ms();
            tx.execute(
                "INSERT INTO sends(modem, at_ms) VALUES (?1, ?2)",
                params![modem, now],
            )?;
            tx.execute(
                "DELETE FROM sends WHERE at_ms <= ?1",
                params![now - 86_400_000],
            )?;
            tx.commit()
        })
        .await
    }

    /// Parts handed to each modem since `since_ms` (epoch ms), oldest first.
    pub async fn recent_sends(&self, since_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        self.read(move |c| {
            let mut st =
                c.prepare("SELECT modem, at_ms FROM sends WHERE at_ms > ?1 ORDER BY at_ms")?;
            let rows = st.query_map(params![since_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    /// Part `part` was accepted with reference `mr`. When it was the last, the job is `sent` and
    /// its event queued. Returns whether the job is complete.
    pub async fn part_sent(
        &self,
        id: &str,
        part: u32,
        mr: u8,
        total: u32,
        modem: &str,
    ) -> Result<bool, StoreError> {
        let (id, modem) = (id.to_owned(), modem.to_owned());
        self.with_events(move |c| {
            let tx = c.transaction()?;
            let (mrs, receiver, attempts): (String, String, u32) = tx.query_row(
                "SELECT mrs, receiver, attempts FROM jobs WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let mrs = if mrs.is_empty() { mr.to_string() } else { format!("{mrs},{mr}") };
            let done = part + 1 >= total;
            tx.execute(
                "UPDATE jobs SET parts_done = ?2, mrs = ?3, inflight_part = NULL, modem = COALESCE(modem, ?4),
                 state = CASE WHEN ?5 THEN 'sent' ELSE state END,
                 finished_at = CASE WHEN ?5 THEN ?6 ELSE finished_at END
                 WHERE id = ?1",
                params![id, part + 1, mrs, modem, done, now_secs() as i64],
            )?;
            if done {
                let mut e = StatusEvent::new(id.clone(), Status::Sent, now_secs());
                e.receiver = Some(receiver);
                e.modem = Some(modem);
                e.message_references = mrs.split(',').filter_map(|m| m.parse().ok()).collect();
                e.parts = Some(total);
                e.attempts = Some(attempts);
                push_event(&tx, &e)?;
            }
            tx.commit()?;
            Ok(done)
        })
        .await
    }

    /// Puts a job back in the queue, due in `delay_ms`; records why. `count_attempt = false`
    /// gives the attempt back (the failure was not the job's: modem unavailable, SIM trouble).
    pub async fn retry_later(
        &self,
        id: &str,
        delay_ms: i64,
        failed_modem: Option<String>,
        reason: String,
        count_attempt: bool,
    ) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            c.execute(
                "UPDATE jobs SET state = 'queued', inflight_part = NULL, next_attempt_ms = ?2,
                 last_failed_modem = ?3, reason = ?4,
                 attempts = CASE WHEN ?5 THEN attempts ELSE MAX(attempts - 1, 0) END
                 WHERE id = ?1",
                params![id, now_ms() + delay_ms, failed_modem, reason, count_attempt],
            )?;
            Ok(())
        })
        .await
    }

    /// Ends a job as failed or expired, with its event.
    pub async fn finish(&self, id: &str, ending: Ending) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.with_events(move |c| {
            let tx = c.transaction()?;
            let (receiver, attempts, mrs): (String, u32, String) = tx.query_row(
                "SELECT receiver, attempts, mrs FROM jobs WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            tx.execute(
                "UPDATE jobs SET state = ?2, inflight_part = NULL, error_code = ?3, reason = ?4, ambiguous = ?5,
                 finished_at = ?6 WHERE id = ?1",
                params![id, state_name(ending.status), ending.code, ending.reason, ending.ambiguous, now_secs() as i64],
            )?;
            let mut e = StatusEvent::new(id.clone(), ending.status, now_secs());
            e.receiver = Some(receiver);
            e.modem = ending.modem;
            e.error_code = ending.code;
            e.reason = Some(ending.reason);
            e.ambiguous = ending.ambiguous;
            e.attempts = Some(attempts);
            e.message_references = mrs.split(',').filter_map(|m| m.parse().ok()).collect();
            push_event(&tx, &e)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// After a restart: jobs caught mid-send. A part in flight had its outcome lost: ambiguous
    /// (failed, or re-queued when `retry_ambiguous`). Jobs `sending` with nothing in flight are
    /// simply queued again. Returns (requeued, failed as ambiguous).
    pub async fn recover(&self, retry_ambiguous: bool) -> Result<(usize, usize), StoreError> {
        let ambiguous: Vec<String> = self
            .with(|c| {
                let mut st = c.prepare(
                    "SELECT id FROM jobs WHERE state = 'sending' AND inflight_part IS NOT NULL",
                )?;
                let ids = st
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                Ok(ids)
            })
            .await?;
        let requeued = self
            .with(|c| {
                c.execute(
                    "UPDATE jobs SET state = 'queued' WHERE state = 'sending' AND inflight_part IS NULL",
                    [],
                )
            })
            .await?;
        let mut failed = 0;
        for id in &ambiguous {
            if retry_ambiguous {
                self.retry_later(
                    id,
                    0,
                    None,
                    "agent restarted while a part was in flight".into(),
                    true,
                )
                .await?;
            } else {
                failed += 1;
                self.finish(
                    id,
                    Ending {
                        status: Status::Failed,
                        code: Some("ambiguous".into()),
                        reason: "the agent stopped while the SMS was being handed to the modem; it may \
                                 have been sent, so it is not sent again (agent.retry_ambiguous = false)"
                            .into(),
                        ambiguous: true,
                        modem: None,
                    },
                )
                .await?;
            }
        }
        Ok((
            requeued + if retry_ambiguous { ambiguous.len() } else { 0 },
            failed,
        ))
    }

    /// Queues a status event that belongs to no job state change (modem events).
    pub async fn event(&self, e: StatusEvent) -> Result<(), StoreError> {
        self.with_events(move |c| {
            let tx = c.transaction()?;
            push_event(&tx, &e)?;
            tx.commit()
        })
        .await
    }

    /// Up to `limit` unpublished events after `after`, oldest first: (seq, JSON).
    pub async fn outbox(&self, after: i64, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT seq, event FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows =
                st.query_map(params![after, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    /// Forgets published events.
    pub async fn published(&self, seqs: Vec<i64>) -> Result<(), StoreError> {
        self.with(move |c| {
            let tx = c.transaction()?;
            for s in seqs {
                tx.execute("DELETE FROM outbox WHERE seq = ?1", params![s])?;
            }
            tx.commit()
        })
        .await
    }

    /// Counts by state (for logs, probes, tests).
    pub async fn counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.read(|c| {
            let mut st =
                c.prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state ORDER BY state")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    /// The state of one job.
    pub async fn state(&self, id: &str) -> Result<Option<String>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| {
            c.query_row("SELECT state FROM jobs WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .optional()
        })
        .await
    }
}

fn state_name(s: Status) -> &'static str {
    match s {
        Status::Queued => "queued",
        Status::Sent => "sent",
        Status::Delivered => "delivered",
        Status::Failed => "failed",
        Status::Expired => "expired",
        Status::Modem => "modem",
        Status::Held => "queued",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str) -> ValidJob {
        ValidJob {
            id: id.into(),
            receiver: "+628123".into(),
            message: "hi".into(),
            parts: 2,
            expires_at: None,
            priority: 0,
            status_report: None,
        }
    }

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("wsmb-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn the_otp_lane_goes_first_then_oldest_first() {
        let d = dir("lane");
        let s = Store::open(&d).expect("open");
        for id in ["bulk1", "bulk2"] {
            s.insert(job(id)).await.expect("insert");
        }
        let mut otp = job("otp");
        otp.priority = wsmb_protocol::sms::PRIORITY_LANE;
        s.insert(otp).await.expect("insert");
        let mut low = job("low");
        low.priority = 99;
        s.insert(low).await.expect("insert");
        let ids: Vec<String> = s
            .due(10)
            .await
            .expect("due")
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(ids, ["otp", "bulk1", "bulk2", "low"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn lifecycle_with_events_and_dedup() {
        let d = dir("life");
        let s = Store::open(&d).expect("open");
        assert_eq!(s.insert(job("a")).await.expect("insert"), Inserted::New);
        assert_eq!(
            s.insert(job("a")).await.expect("insert"),
            Inserted::Duplicate
        );
        let due = s.due(10).await.expect("due");
        assert_eq!(due.len(), 1);
        let r = s.begin_attempt("a", 2).await.expect("begin");
        assert_eq!(
            s.begin_attempt("a", 2).await.expect("again"),
            r,
            "reference is fixed"
        );
        s.mark_inflight("a", 0, "m1").await.expect("inflight");
        assert!(!s.part_sent("a", 0, 10, 2, "m1").await.expect("part"));
        s.mark_inflight("a", 1, "m1").await.expect("inflight");
        assert!(s.part_sent("a", 1, 11, 2, "m1").await.expect("part"));
        assert_eq!(s.state("a").await.expect("state").as_deref(), Some("sent"));
        let events = s.outbox(0, 10).await.expect("outbox");
        assert_eq!(events.len(), 2);
        let sent: StatusEvent = serde_json::from_str(&events[1].1).expect("event");
        assert_eq!(sent.status, Status::Sent);
        assert_eq!(sent.message_references, vec![10, 11]);
        assert_eq!(sent.modem.as_deref(), Some("m1"));
        s.published(vec![events[0].0]).await.expect("published");
        assert_eq!(s.outbox(0, 10).await.expect("outbox").len(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn crash_recovery_treats_in_flight_parts_as_ambiguous() {
        let d = dir("crash");
        {
            let s = Store::open(&d).expect("open");
            for id in ["inflight", "between", "waiting"] {
                s.insert(job(id)).await.expect("insert");
            }
            s.begin_attempt("inflight", 2).await.expect("b");
            s.mark_inflight("inflight", 0, "m1").await.expect("i");
            s.begin_attempt("between", 2).await.expect("b");
            s.mark_inflight("between", 0, "m1").await.expect("i");
            s.part_sent("between", 0, 5, 2, "m1").await.expect("p");
            // "crash": drop without finishing
        }
        let s = Store::open(&d).expect("reopen");
        assert_eq!(s.recover(false).await.expect("recover"), (1, 1));
        assert_eq!(
            s.state("inflight").await.expect("s").as_deref(),
            Some("failed")
        );
        assert_eq!(
            s.state("between").await.expect("s").as_deref(),
            Some("queued")
        );
        assert_eq!(
            s.state("waiting").await.expect("s").as_deref(),
            Some("queued")
        );
        let due = s.due(10).await.expect("due");
        let between = due.iter().find(|j| j.id == "between").expect("between");
        assert_eq!(
            (
                between.parts_done,
                between.mrs.clone(),
                between.modem.as_deref()
            ),
            (1, vec![5], Some("m1"))
        );
        let events = s.outbox(0, 10).await.expect("outbox");
        let last: StatusEvent = serde_json::from_str(&events.last().expect("e").1).expect("event");
        assert!(last.ambiguous && last.status == Status::Failed);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn retries_are_scheduled_and_refusals_deduplicated() {
        let d = dir("retry");
        let s = Store::open(&d).expect("open");
        s.insert(job("r")).await.expect("insert");
        s.begin_attempt("r", 1).await.expect("b");
        s.retry_later("r", 60_000, Some("m1".into()), "busy".into(), true)
            .await
            .expect("retry");
        assert!(s.due(10).await.expect("due").is_empty());
        assert!(s.next_due_ms().await.expect("next").expect("some") > now_ms() + 50_000);
        let ending = Ending {
            status: Status::Failed,
            code: Some("blocked".into()),
            reason: "no".into(),
            ambiguous: false,
            modem: None,
        };
        assert_eq!(
            s.refuse(Some("x".into()), None, ending.clone())
                .await
                .expect("r"),
            Inserted::New
        );
        assert_eq!(
            s.refuse(Some("x".into()), None, ending.clone())
                .await
                .expect("r"),
            Inserted::Duplicate
        );
        assert_eq!(
            s.refuse(None, None, ending).await.expect("r"),
            Inserted::New
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
