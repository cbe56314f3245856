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
use std::time::Duration;

use wsmb_protocol::sms::{InboxMessage, Status, StatusEvent};

use crate::jobs::ValidJob;
use crate::pdu::{Coding, Deliver};

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
    /// The modem the job must go through: the one its first parts went through (later parts
    /// must use it too: a phone joins parts only from one sender), or the one its `sim` named.
    pub modem: Option<String>,
    /// The modem of the last failed attempt (avoided when another can take it).
    pub last_failed_modem: Option<String>,
    /// The job's own choice about a delivery report (`None`: the agent's default).
    pub status_report: Option<bool>,
    /// Queue priority ([`wsmb_protocol::sms::PRIORITY_LANE`] and above: the OTP lane).
    pub priority: i32,
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
    event TEXT NOT NULL,
    channel TEXT NOT NULL DEFAULT 'status'
);
CREATE TABLE IF NOT EXISTS inbox_parts (
    key TEXT PRIMARY KEY,
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    total INTEGER NOT NULL,
    sender TEXT NOT NULL,
    scts INTEGER NOT NULL,
    received_at TEXT NOT NULL,
    coding TEXT NOT NULL,
    text TEXT NOT NULL,
    modem TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    message TEXT
);
CREATE INDEX IF NOT EXISTS inbox_parts_grp ON inbox_parts(grp, message);
CREATE TABLE IF NOT EXISTS reports (
    job TEXT NOT NULL,
    mr INTEGER NOT NULL,
    status INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (job, mr)
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

/// Columns added after the first release: a store made by an older agent gets them.
const ADDED: [(&str, &str, &str); 3] = [
    ("jobs", "priority", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "status_report", "INTEGER"),
    ("outbox", "channel", "TEXT NOT NULL DEFAULT 'status'"),
];

fn add_missing_columns(c: &Connection) -> rusqlite::Result<()> {
    for (table, name, ty) in ADDED {
        let mut st = c.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
        let have: Vec<String> = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        if !have.iter().any(|h| h == name) {
            c.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {ty}"))?;
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

/// The outbox's channels: status events, and received SMS.
pub const OUT_STATUS: &str = "status";
/// See [`OUT_STATUS`].
pub const OUT_INBOX: &str = "inbox";

/// What an incoming SMS part did, for [`Store::inbound`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Seen before: nothing changed (it can be deleted from the modem).
    Duplicate,
    /// Kept; `have` of `total` parts are here.
    Waiting {
        /// Parts here.
        have: u32,
        /// Parts in all.
        total: u32,
    },
    /// The message is complete and queued for the inbox channel.
    Joined(InboxMessage),
}

/// Joins the waiting parts of group `grp` (in order, one per sequence number) into a message
/// queued for the inbox channel; `partial` when some never came.
fn join_parts(
    tx: &rusqlite::Transaction<'_>,
    grp: &str,
    partial: bool,
) -> rusqlite::Result<InboxMessage> {
    struct Part {
        seq: u32,
        total: u32,
        sender: String,
        scts: i64,
        received_at: String,
        coding: String,
        text: String,
        modem: String,
    }
    let parts: Vec<Part> = {
        let mut st = tx.prepare_cached(
            "SELECT seq, total, sender, scts, received_at, coding, text, modem FROM inbox_parts
             WHERE grp = ?1 AND message IS NULL ORDER BY seq, received_ms",
        )?;
        let rows = st.query_map(params![grp], |r| {
            Ok(Part {
                seq: r.get(0)?,
                total: r.get(1)?,
                sender: r.get(2)?,
                scts: r.get(3)?,
                received_at: r.get(4)?,
                coding: r.get(5)?,
                text: r.get(6)?,
                modem: r.get(7)?,
            })
        })?;
        rows.collect::<Result<_, _>>()?
    };
    let mut text = String::new();
    let mut last_seq = 0;
    for p in &parts {
        if p.seq != last_seq {
            text.push_str(&p.text);
            last_seq = p.seq;
        }
    }
    let first = parts.first();
    let mut id = [0u8; 8];
    let _ = getrandom::fill(&mut id);
    let id = format!(
        "in-{:x}-{}",
        now_ms(),
        id.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let msg = InboxMessage {
        id: id.clone(),
        sender: first.map(|p| p.sender.clone()).unwrap_or_default(),
        message: text,
        time: first.map_or(0, |p| p.scts),
        received_at: first.map(|p| p.received_at.clone()).unwrap_or_default(),
        parts: first.map_or(1, |p| p.total),
        partial,
        coding: first.map(|p| p.coding.clone()).unwrap_or_default(),
        modem: first.map(|p| p.modem.clone()),
    };
    tx.execute(
        "UPDATE inbox_parts SET message = ?2 WHERE grp = ?1 AND message IS NULL",
        params![grp, id],
    )?;
    tx.execute(
        "INSERT INTO outbox(event, channel) VALUES (?1, ?2)",
        params![serde_json::to_string(&msg).unwrap_or_default(), OUT_INBOX],
    )?;
    Ok(msg)
}

fn push_event(tx: &rusqlite::Transaction<'_>, e: &StatusEvent) -> rusqlite::Result<()> {
    let json = serde_json::to_string(e).unwrap_or_default();
    tx.execute("INSERT INTO outbox(event) VALUES (?1)", params![json])?;
    Ok(())
}

/// What a delivery report did, for [`Store::apply_report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportMatch {
    /// No job sent through that modem to that recipient has that message reference: logged
    /// and counted (`meta.unmatched_reports`).
    Unmatched,
    /// Recorded for a part of `job`; `event` is the job's new status when the report settled
    /// it (`delivered`: every part delivered; `failed`: one part failed for good).
    Recorded {
        /// The job.
        job: String,
        /// Its new status, if any.
        event: Option<Status>,
    },
}

/// Settles a sent job by its parts' delivery reports: `delivered` (with its event) when every
/// part is delivered, `undelivered` (a `failed` event with the network's reason) when one part
/// failed for good; nothing while a part has no final report, or the job is not (yet) `sent`.
fn settle(tx: &rusqlite::Transaction<'_>, job: &str) -> rusqlite::Result<Option<Status>> {
    use crate::pdu::{ReportOutcome, SmscTime, StatusReport};
    let (state, parts, mrs, receiver, modem): (String, u32, String, String, Option<String>) = tx
        .query_row(
            "SELECT state, parts, mrs, receiver, modem FROM jobs WHERE id = ?1",
            params![job],
            |x| Ok((x.get(0)?, x.get(1)?, x.get(2)?, x.get(3)?, x.get(4)?)),
        )?;
    if state != "sent" {
        return Ok(None);
    }
    let refs: Vec<u8> = mrs.split(',').filter_map(|m| m.parse().ok()).collect();
    let mut delivered = 0;
    let mut failed = None;
    for mr in &refs {
        let st: Option<i64> = tx
            .query_row(
                "SELECT status FROM reports WHERE job = ?1 AND mr = ?2",
                params![job, mr],
                |x| x.get(0),
            )
            .optional()?;
        let Some(st) = st else { continue };
        let t = SmscTime {
            epoch: 0,
            offset_minutes: 0,
        };
        let part = StatusReport {
            mr: *mr,
            recipient: String::new(),
            submitted: t,
            discharged: t,
            status: st as u8,
        };
        match part.outcome() {
            ReportOutcome::Delivered => delivered += 1,
            ReportOutcome::Failed => failed = Some(part.meaning()),
            ReportOutcome::Pending => {}
        }
    }
    let mut e = StatusEvent::new(job.to_owned(), Status::Delivered, now_secs());
    e.receiver = Some(receiver);
    e.modem = modem;
    e.message_references = refs.clone();
    e.parts = Some(parts);
    if let Some(why) = failed {
        tx.execute(
            "UPDATE jobs SET state = 'undelivered', error_code = 'not_delivered', reason = ?2
             WHERE id = ?1",
            params![job, why],
        )?;
        e.status = Status::Failed;
        e.error_code = Some("not_delivered".into());
        e.reason = Some(format!("the network reports it not delivered: {why}"));
        push_event(tx, &e)?;
        return Ok(Some(Status::Failed));
    }
    if delivered >= parts as usize && refs.len() >= parts as usize {
        tx.execute(
            "UPDATE jobs SET state = 'delivered' WHERE id = ?1",
            params![job],
        )?;
        push_event(tx, &e)?;
        return Ok(Some(Status::Delivered));
    }
    Ok(None)
}

/// Whether two ways of writing a number name the same one: equal digits, or (one national,
/// one international) the same last digits, at least 7 of them.
fn same_number(a: &str, b: &str) -> bool {
    let da: String = a.chars().filter(char::is_ascii_digit).collect();
    let db: String = b.chars().filter(char::is_ascii_digit).collect();
    if da == db {
        return true;
    }
    let (na, nb) = (
        da.trim_start_matches('0').to_owned(),
        db.trim_start_matches('0').to_owned(),
    );
    let n = na.len().min(nb.len());
    n >= 7 && na.ends_with(&nb[nb.len() - n..]) && nb.ends_with(&na[na.len() - n..])
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
                "INSERT OR IGNORE INTO jobs(id, receiver, message, state, expires_at, received_at, parts, priority, status_report, modem)
                 VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8, ?9)",
                params![job.id, job.receiver, job.message, job.expires_at.map(|e| e as i64), now_secs() as i64, job.parts, job.priority, job.status_report, job.modem],
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
                "SELECT id, receiver, message, attempts, expires_at, concat_ref, parts_done, mrs, modem, last_failed_modem, status_report, priority
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
                    priority: r.get(11)?,
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

    /// Records a delivery report from `modem`: matched to the most recent job sent through it to
    /// the report's recipient with that message reference among its parts (references wrap at
    /// 255, so older jobs with the same one are passed over once they have a final report).
    /// Temporary states are kept until the final one; a job is `delivered` (event) when every
    /// part is, `undelivered` (a `failed` event with the network's reason) when one part
    /// failed for good. Repeated reports change nothing.
    pub async fn apply_report(
        &self,
        modem: &str,
        report: &crate::pdu::StatusReport,
    ) -> Result<ReportMatch, StoreError> {
        let modem = modem.to_owned();
        let r = report.clone();
        self.with_events(move |c| {
            let tx = c.transaction()?;
            let like = format!("%,{},%", r.mr);
            let candidates: Vec<(String, String)> = {
                let mut st = tx.prepare_cached(
                    "SELECT id, receiver FROM jobs WHERE modem = ?1 AND mrs != ''
                     AND (',' || mrs || ',') LIKE ?2 ORDER BY seq DESC LIMIT 50",
                )?;
                let rows = st.query_map(params![modem, like], |x| Ok((x.get(0)?, x.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            let matching: Vec<String> = candidates
                .into_iter()
                .filter(|(_, receiver)| same_number(receiver, &r.recipient))
                .map(|(id, _)| id)
                .collect();
            let is_final = |st: i64| !(0x20..=0x3f).contains(&st);
            let mut chosen = None;
            for id in &matching {
                let known: Option<i64> = tx
                    .query_row(
                        "SELECT status FROM reports WHERE job = ?1 AND mr = ?2",
                        params![id, r.mr],
                        |x| x.get(0),
                    )
                    .optional()?;
                if known.is_none_or(|k| !is_final(k)) {
                    chosen = Some(id.clone());
                    break;
                }
            }
            let Some(job) = chosen.or_else(|| matching.first().cloned()) else {
                tx.execute(
                    "INSERT INTO meta(key, value) VALUES ('unmatched_reports', 1)
                     ON CONFLICT(key) DO UPDATE SET value = value + 1",
                    [],
                )?;
                tx.commit()?;
                return Ok(ReportMatch::Unmatched);
            };
            let known: Option<i64> = tx
                .query_row(
                    "SELECT status FROM reports WHERE job = ?1 AND mr = ?2",
                    params![job, r.mr],
                    |x| x.get(0),
                )
                .optional()?;
            if known.is_some_and(is_final) {
                tx.commit()?;
                return Ok(ReportMatch::Recorded { job, event: None });
            }
            tx.execute(
                "INSERT INTO reports(job, mr, status, at_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(job, mr) DO UPDATE SET status = ?3, at_ms = ?4",
                params![job, r.mr, r.status, now_ms()],
            )?;
            let event = settle(&tx, &job)?;
            tx.commit()?;
            Ok(ReportMatch::Recorded { job, event })
        })
        .await
    }

    /// How many delivery reports matched no job (since the store was made).
    pub async fn unmatched_reports(&self) -> Result<i64, StoreError> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT value FROM meta WHERE key = 'unmatched_reports'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0))
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
                // Reports of its parts may have come before the last part was recorded.
                settle(&tx, &id)?;
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

    /// Up to `limit` unpublished items after `after`, oldest first, all for the same channel
    /// (the first one's): its name (`status` or `inbox`) and (seq, JSON) of each.
    pub async fn outbox(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<(String, Vec<(i64, String)>), StoreError> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT seq, event, channel FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = st.query_map(params![after, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            let mut channel = String::from(OUT_STATUS);
            let mut out = Vec::new();
            for row in rows {
                let (seq, item, ch) = row?;
                if out.is_empty() {
                    channel = ch;
                } else if ch != channel {
                    break;
                }
                out.push((seq, item));
            }
            Ok((channel, out))
        })
        .await
    }

    /// Takes one part of an incoming SMS (after the modem read it, before it is deleted from
    /// the modem): a part seen before (the same sender, time, header and text) is a duplicate;
    /// a part of a longer message waits for the others (in any order, across restarts); the
    /// last one joins them into an [`InboxMessage`], queued for the inbox channel.
    pub async fn inbound(&self, modem: &str, d: &Deliver) -> Result<Inbound, StoreError> {
        let modem = modem.to_owned();
        let d = d.clone();
        self.with_events(move |c| {
            let tx = c.transaction()?;
            let (reference, total, seq) = d.concat.unwrap_or((0, 1, 1));
            let key = format!(
                "{}|{}|{}|{reference}|{total}|{seq}|{}",
                d.sender, d.timestamp.epoch, d.wide_reference, d.text
            );
            let grp = if d.concat.is_some() {
                format!("{}|{}|{reference}|{total}", d.sender, d.wide_reference)
            } else {
                key.clone()
            };
            let coding = match d.coding {
                Coding::Gsm7 => "gsm7",
                Coding::Ucs2 => "ucs2",
                Coding::Data8 => "8bit",
            };
            let n = tx.execute(
                "INSERT OR IGNORE INTO inbox_parts(key, grp, seq, total, sender, scts, received_at,
                 coding, text, modem, received_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![key, grp, seq, total, d.sender, d.timestamp.epoch, d.timestamp.rfc3339(),
                        coding, d.text, modem, now_ms()],
            )?;
            if n == 0 {
                tx.commit()?;
                return Ok(Inbound::Duplicate);
            }
            let have: u32 = tx.query_row(
                "SELECT COUNT(DISTINCT seq) FROM inbox_parts WHERE grp = ?1 AND message IS NULL",
                params![grp],
                |r| r.get(0),
            )?;
            let result = if have >= u32::from(total) {
                Inbound::Joined(join_parts(&tx, &grp, false)?)
            } else {
                Inbound::Waiting {
                    have,
                    total: u32::from(total),
                }
            };
            tx.commit()?;
            Ok(result)
        })
        .await
    }

    /// Messages whose parts have waited longer than `timeout` are published with what arrived
    /// (`partial`); joined parts older than a week are forgotten (they only served to
    /// recognise re-reads).
    pub async fn flush_partial(&self, timeout: Duration) -> Result<Vec<InboxMessage>, StoreError> {
        let cutoff = now_ms() - timeout.as_millis() as i64;
        self.with_events(move |c| {
            let tx = c.transaction()?;
            let groups: Vec<String> = {
                let mut st = tx.prepare_cached(
                    "SELECT grp FROM inbox_parts WHERE message IS NULL GROUP BY grp
                     HAVING MIN(received_ms) < ?1",
                )?;
                let rows = st.query_map(params![cutoff], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut out = Vec::new();
            for g in groups {
                out.push(join_parts(&tx, &g, true)?);
            }
            tx.execute(
                "DELETE FROM inbox_parts WHERE message IS NOT NULL AND received_ms < ?1",
                params![now_ms() - 7 * 86_400_000],
            )?;
            tx.commit()?;
            Ok(out)
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

    /// Jobs not finished (queued or being sent) and outbox items not yet taken by the broker:
    /// what the heartbeat and the metrics report.
    pub async fn backlog(&self) -> Result<(u64, u64), StoreError> {
        self.read(|c| {
            let jobs: i64 = c.query_row(
                "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'sending')",
                [],
                |r| r.get(0),
            )?;
            let out: i64 = c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
            Ok((jobs.max(0) as u64, out.max(0) as u64))
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
        Status::Heartbeat => "heartbeat",
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
            modem: None,
        }
    }

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("wsmb-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn reports_match_the_latest_job_with_their_reference_then_older_ones() {
        use crate::pdu::{SmscTime, StatusReport};
        let d = dir("wrap");
        let s = Store::open(&d).expect("open");
        // Two one-part jobs to the same number got the same reference (255 sends apart).
        for id in ["old", "new"] {
            let mut j = job(id);
            j.parts = 1;
            s.insert(j).await.expect("insert");
            s.begin_attempt(id, 1).await.expect("begin");
            s.mark_inflight(id, 0, "m1").await.expect("inflight");
            assert!(s.part_sent(id, 0, 7, 1, "m1").await.expect("sent"));
        }
        let t = SmscTime {
            epoch: 0,
            offset_minutes: 0,
        };
        let r = StatusReport {
            mr: 7,
            recipient: "+628123".into(),
            submitted: t,
            discharged: t,
            status: 0,
        };
        let first = s.apply_report("m1", &r).await.expect("report");
        assert_eq!(
            first,
            ReportMatch::Recorded {
                job: "new".into(),
                event: Some(Status::Delivered)
            }
        );
        let second = s.apply_report("m1", &r).await.expect("report");
        assert_eq!(
            second,
            ReportMatch::Recorded {
                job: "old".into(),
                event: Some(Status::Delivered)
            }
        );
        // Another modem, or another number: nothing matches.
        assert_eq!(
            s.apply_report("m2", &r).await.expect("report"),
            ReportMatch::Unmatched
        );
        let other = StatusReport {
            recipient: "+4915112345678".into(),
            ..r.clone()
        };
        assert_eq!(
            s.apply_report("m1", &other).await.expect("report"),
            ReportMatch::Unmatched
        );
        assert_eq!(s.unmatched_reports().await.expect("n"), 2);
        assert_eq!(
            s.state("new").await.expect("state").as_deref(),
            Some("delivered")
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn numbers_match_in_national_and_international_form() {
        assert!(same_number("+628123456789", "08123456789"));
        assert!(same_number("+628123456789", "628123456789"));
        assert!(same_number("08123456789", "+628123456789"));
        assert!(!same_number("+628123456789", "+628123456788"));
        assert!(!same_number("12345", "012345"));
        assert!(same_number("12345", "12345"));
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
        let (_, events) = s.outbox(0, 10).await.expect("outbox");
        assert_eq!(events.len(), 2);
        let sent: StatusEvent = serde_json::from_str(&events[1].1).expect("event");
        assert_eq!(sent.status, Status::Sent);
        assert_eq!(sent.message_references, vec![10, 11]);
        assert_eq!(sent.modem.as_deref(), Some("m1"));
        s.published(vec![events[0].0]).await.expect("published");
        assert_eq!(s.outbox(0, 10).await.expect("outbox").1.len(), 1);
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
        let (_, events) = s.outbox(0, 10).await.expect("outbox");
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
