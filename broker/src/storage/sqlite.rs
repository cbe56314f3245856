//! SQLite through rusqlite: one file, WAL, `synchronous=FULL` (a committed message survives a
//! power cut). Statements run on the blocking pool; every one is parameterised, only the table
//! name (from the validated prefix) is formatted in.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use super::{DbError, Op, OpResult, Recovered, StoredRow};

/// The SQLite database.
pub struct SqliteDb {
    conn: Arc<Mutex<Connection>>,
    table: String,
}

/// Columns WSMB adds to the original table.
const ADDED: [(&str, &str); 7] = [
    ("frame", "TEXT"),
    ("remaining", "INTEGER"),
    ("expires_at", "INTEGER"),
    ("msg_key", "TEXT"),
    ("claimed_by", "TEXT"),
    ("claimed_until", "INTEGER"),
    ("deliveries", "INTEGER"),
];

/// Opens (creating) the SQLite file at `path` and its directory, with a message that says what
/// to change when it cannot be; WAL, full sync and a 5 s busy timeout. The broker's message
/// table and the SMS service's table share the file, each with its own connection.
pub fn open_file(path: &Path) -> Result<Connection, DbError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            DbError(format!(
                "cannot create {} for the SQLite store: {e}; set storage.path (or \
                 --state-dir) to a writable place, or storage.backend = \"memory\"",
                dir.display()
            ))
        })?;
    }
    let conn = Connection::open(path).map_err(|e| {
        DbError(format!(
            "cannot open {} for the SQLite store: {e}; set storage.path (or --state-dir) to \
             a writable place",
            path.display()
        ))
    })?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl SqliteDb {
    /// Opens (creating) the file; its directory is created too.
    pub fn open(path: &Path, prefix: &str) -> Result<SqliteDb, DbError> {
        let conn = open_file(path)?;
        // A small page cache: the broker reads rows once, in order; memory stays bounded
        // whatever the size of the backlog.
        conn.pragma_update(None, "cache_size", -1024)?;
        Ok(SqliteDb {
            conn: Arc::new(Mutex::new(conn)),
            table: format!("{prefix}data"),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &str) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, DbError> {
        let conn = Arc::clone(&self.conn);
        let table = self.table.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c, &table).map_err(DbError::from)
        })
        .await
        .map_err(|e| DbError(e.to_string()))?
    }

    pub(super) async fn migrate(&self) -> Result<(), DbError> {
        self.run(|c, t| {
            c.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    data_id INTEGER PRIMARY KEY AUTOINCREMENT,
                    channel TEXT,
                    data TEXT,
                    created TEXT
                 );
                 CREATE INDEX IF NOT EXISTS {t}_channel ON {t}(channel);"
            ))?;
            let mut have = Vec::new();
            {
                let mut st = c.prepare(&format!("PRAGMA table_info({t})"))?;
                let names = st.query_map([], |r| r.get::<_, String>(1))?;
                for n in names {
                    have.push(n?);
                }
            }
            for (col, ty) in ADDED {
                if !have.iter().any(|h| h == col) {
                    c.execute_batch(&format!("ALTER TABLE {t} ADD COLUMN {col} {ty}"))?;
                }
            }
            c.execute_batch(&format!(
                "CREATE INDEX IF NOT EXISTS {t}_expires ON {t}(expires_at)
                 WHERE expires_at IS NOT NULL;"
            ))?;
            Ok(())
        })
        .await
    }

    pub(super) async fn recover(&self, node: &str) -> Result<Recovered, DbError> {
        let pattern = format!("{}/%", like_escape(node));
        self.run(move |c, t| {
            c.execute(
                &format!(
                    "UPDATE {t} SET claimed_by = NULL, claimed_until = NULL
                     WHERE claimed_by LIKE ?1 ESCAPE '\\'"
                ),
                params![pattern],
            )?;
            let max_id: i64 = c
                .query_row(
                    &format!("SELECT COALESCE(MAX(data_id), 0) FROM {t}"),
                    [],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            let mut counts = HashMap::new();
            let mut st = c.prepare(&format!(
                "SELECT channel, COUNT(*) FROM {t} GROUP BY channel"
            ))?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                    r.get::<_, i64>(1)?,
                ))
            })?;
            for row in rows {
                let (ch, n) = row?;
                counts.insert(ch, n.max(0) as usize);
            }
            Ok(Recovered { max_id, counts })
        })
        .await
    }

    pub(super) async fn apply(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, DbError> {
        self.run(move |c, t| {
            let tx = c.transaction()?;
            let mut out = Vec::with_capacity(ops.len());
            {
                let mut ins = tx.prepare_cached(&format!(
                    "INSERT INTO {t}(data_id, channel, data, created, frame, remaining, expires_at,
                                     msg_key, claimed_by, claimed_until, deliveries)
                     VALUES (?1, ?2, ?3, datetime('now'), ?4, 1, ?5, ?6, ?7, ?8, ?9)"
                ))?;
                let mut del = tx.prepare_cached(&format!("DELETE FROM {t} WHERE data_id = ?1"))?;
                let mut dec = tx.prepare_cached(&format!(
                    "UPDATE {t} SET remaining = remaining - 1, claimed_by = NULL,
                     claimed_until = NULL WHERE data_id = ?1"
                ))?;
                let mut rel = tx.prepare_cached(&format!(
                    "UPDATE {t} SET claimed_by = NULL, claimed_until = NULL WHERE data_id = ?1"
                ))?;
                for op in ops {
                    let r = match op {
                        Op::Insert(m) => {
                            let (holder, until) = match &m.claim {
                                Some(c) => (Some(&*c.holder), Some(c.until_ms)),
                                None => (None, None),
                            };
                            ins.execute(params![
                                m.data_id,
                                &*m.channel,
                                Option::<&str>::None,
                                m.frame.as_str(),
                                m.expires_at.map(|e| e as i64),
                                m.key,
                                holder,
                                until,
                                i64::from(m.claim.is_some()),
                            ])?;
                            OpResult::Inserted
                        }
                        Op::Complete {
                            data_id, remaining, ..
                        } if remaining > 1 => {
                            dec.execute(params![data_id])?;
                            OpResult::Updated
                        }
                        Op::Complete { data_id, .. } => {
                            OpResult::Deleted(del.execute(params![data_id])? > 0)
                        }
                        Op::Release(ids) => {
                            for id in ids {
                                rel.execute(params![id])?;
                            }
                            OpResult::Updated
                        }
                        Op::Claim(req) => {
                            let (rows, more) = claim(&tx, t, &req)?;
                            OpResult::Claimed(rows, more)
                        }
                        Op::Sweep { now, max, key } => {
                            let (cond, arg): (&str, &dyn rusqlite::ToSql) = match &key {
                                None => ("expires_at IS NOT NULL AND expires_at <= ?1", &now),
                                Some(k) => ("msg_key = ?1 AND claimed_until IS NULL", k),
                            };
                            let mut st = tx.prepare_cached(&format!(
                                "SELECT data_id, channel FROM {t} WHERE {cond} LIMIT ?2"
                            ))?;
                            let rows: Vec<(i64, String)> = st
                                .query_map(params![arg, max as i64], |r| {
                                    Ok((
                                        r.get(0)?,
                                        r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                                    ))
                                })?
                                .collect::<Result<_, _>>()?;
                            for (id, _) in &rows {
                                del.execute(params![id])?;
                            }
                            OpResult::Swept(rows)
                        }
                    };
                    out.push(r);
                }
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    pub(super) async fn ping(&self) -> Result<(), DbError> {
        self.run(|c, _| c.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }
}

/// `LIKE` pattern text with `%`, `_` and `\` taken literally.
pub(super) fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn claim(
    tx: &rusqlite::Transaction<'_>,
    t: &str,
    req: &super::ClaimRequest,
) -> rusqlite::Result<(Vec<StoredRow>, bool)> {
    let mut st = tx.prepare_cached(&format!(
        "SELECT data_id, msg_key, frame, CASE WHEN frame IS NULL THEN data END,
                COALESCE(remaining, 1), expires_at, COALESCE(deliveries, 0)
         FROM {t}
         WHERE channel = ?1 AND (claimed_until IS NULL OR claimed_until < ?2)
           AND (expires_at IS NULL OR expires_at > ?3) AND COALESCE(remaining, 1) > 0
         ORDER BY data_id LIMIT ?4"
    ))?;
    let now_s = req.now_ms.div_euclid(1000);
    let mut rows = st.query(params![
        &*req.channel,
        req.now_ms,
        now_s,
        req.max_rows as i64
    ])?;
    let mut out: Vec<StoredRow> = Vec::new();
    let mut bytes = 0;
    let mut more = false;
    while let Some(r) = rows.next()? {
        let row = StoredRow {
            data_id: r.get(0)?,
            key: r.get(1)?,
            frame: r.get(2)?,
            data: r.get(3)?,
            remaining: r.get::<_, i64>(4)?.clamp(1, i64::from(u32::MAX)) as u32,
            expires_at: r.get::<_, Option<i64>>(5)?.map(|e| e.max(0) as u64),
            deliveries: (r.get::<_, i64>(6)?.max(0) as u32).saturating_add(1),
        };
        let size = row.size();
        if !out.is_empty() && bytes + size > req.max_bytes {
            more = true;
            break;
        }
        bytes += size;
        out.push(row);
    }
    more |= out.len() >= req.max_rows;
    drop(rows);
    let mut upd = tx.prepare_cached(&format!(
        "UPDATE {t} SET claimed_by = ?2, claimed_until = ?3,
                deliveries = COALESCE(deliveries, 0) + 1 WHERE data_id = ?1"
    ))?;
    for r in &out {
        upd.execute(params![r.data_id, &*req.claim.holder, req.claim.until_ms])?;
    }
    Ok((out, more))
}
