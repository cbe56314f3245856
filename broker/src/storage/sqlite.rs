//! SQLite through rusqlite: one file, WAL, `synchronous=FULL` (a committed message survives a
//! power cut). Statements run on the blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, params};

use super::{DbError, Op, StoredRow};

/// The SQLite database.
pub struct SqliteDb {
    conn: Arc<Mutex<Connection>>,
    table: String,
}

impl SqliteDb {
    /// Opens (creating) the file; its directory is created too.
    pub fn open(path: &Path, prefix: &str) -> Result<SqliteDb, DbError> {
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
            for (col, ty) in [
                ("frame", "TEXT"),
                ("remaining", "INTEGER"),
                ("expires_at", "INTEGER"),
                ("msg_key", "TEXT"),
            ] {
                if !have.iter().any(|h| h == col) {
                    c.execute_batch(&format!("ALTER TABLE {t} ADD COLUMN {col} {ty}"))?;
                }
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn apply(&self, ops: Vec<Op>) -> Result<Vec<i64>, DbError> {
        self.run(move |c, t| {
            let tx = c.transaction()?;
            let mut ids = Vec::new();
            {
                let mut ins = tx.prepare_cached(&format!(
                    "INSERT INTO {t}(channel, data, created, frame, remaining, expires_at, msg_key)
                     VALUES (?1, ?2, datetime('now'), ?3, ?4, ?5, ?6)"
                ))?;
                let mut del = tx.prepare_cached(&format!("DELETE FROM {t} WHERE data_id = ?1"))?;
                let mut rem = tx
                    .prepare_cached(&format!("UPDATE {t} SET remaining = ?2 WHERE data_id = ?1"))?;
                for op in ops {
                    match op {
                        Op::Insert(m) => {
                            ins.execute(params![
                                m.channel,
                                m.data,
                                m.frame.as_str(),
                                m.remaining,
                                m.expires_at.map(|e| e as i64),
                                m.key
                            ])?;
                            ids.push(tx.last_insert_rowid());
                        }
                        Op::Delete(id) => {
                            del.execute(params![id])?;
                        }
                        Op::Remaining(id, n) => {
                            rem.execute(params![id, n])?;
                        }
                    }
                }
            }
            tx.commit()?;
            Ok(ids)
        })
        .await
    }

    pub(super) async fn load(&self, after: i64, limit: usize) -> Result<Vec<StoredRow>, DbError> {
        self.run(move |c, t| {
            let mut st = c.prepare(&format!(
                "SELECT data_id, msg_key, channel, frame, data, remaining, expires_at FROM {t}
                 WHERE data_id > ?1 ORDER BY data_id LIMIT ?2"
            ))?;
            let rows = st.query_map(params![after, limit as i64], |r| {
                Ok(StoredRow {
                    data_id: r.get(0)?,
                    key: r.get(1)?,
                    channel: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                    frame: r.get(3)?,
                    data: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                    remaining: r.get::<_, Option<i64>>(5)?.map_or(1, |n| n.max(1) as u32),
                    expires_at: r.get::<_, Option<i64>>(6)?.map(|e| e.max(0) as u64),
                })
            })?;
            rows.collect()
        })
        .await
    }

    pub(super) async fn ping(&self) -> Result<(), DbError> {
        self.run(|c, _| c.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }
}
