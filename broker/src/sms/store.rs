//! The SMS service's own table, `<prefix>sms`: message states, received SMS, webhooks, the
//! webhook outbox and the service's settings, each a JSON document keyed by (kind, id) with the few columns the
//! service filters on (owner, created, state, due). It lives in the broker's database (the
//! SQLite file, MariaDB/MySQL or PostgreSQL) beside the message table; with the memory backend
//! it is a map in memory (lost at restart, and the service says so at start).
//!
//! Every statement is parameterised; only the table name (from the validated prefix) is
//! formatted in. A batch of writes ([`DocStore::apply`]) is one transaction, so a state change
//! and the webhook events it causes are stored together or not at all.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension};

use crate::config::{Backend, StorageConfig};
use crate::storage::{DbError, SqlPool, connect_lazy, safe};

/// What a document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A message's state (API or WebSocket job).
    Message,
    /// A registered webhook.
    Webhook,
    /// A webhook call not yet answered with a 2xx (or given up).
    Outbox,
    /// A setting of the service (the generated signing key).
    Setting,
    /// A received SMS (from the agents' inbox channel).
    Inbox,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Message => "msg",
            Kind::Webhook => "hook",
            Kind::Outbox => "out",
            Kind::Setting => "set",
            Kind::Inbox => "in",
        }
    }
}

/// One document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    /// Its kind.
    pub kind: Kind,
    /// Its id (unique per kind).
    pub id: String,
    /// The user it belongs to.
    pub owner: String,
    /// When it was made, epoch milliseconds.
    pub created: i64,
    /// A state to filter on.
    pub state: String,
    /// When something is due for it, epoch milliseconds (0: nothing).
    pub due: i64,
    /// The JSON document.
    pub body: String,
}

/// One write of a batch.
#[derive(Debug, Clone)]
pub enum Write {
    /// Insert or replace.
    Put(Doc),
    /// Insert unless a document with this kind and id exists (its result says whether it was
    /// inserted).
    Insert(Doc),
    /// Delete.
    Delete(Kind, String),
}

/// A listing.
#[derive(Debug, Clone)]
pub struct Query {
    /// Of what.
    pub kind: Kind,
    /// Only this user's.
    pub owner: Option<String>,
    /// Only in this state.
    pub state: Option<String>,
    /// Created at or after (epoch ms).
    pub from: Option<i64>,
    /// Created before (epoch ms).
    pub to: Option<i64>,
    /// Most documents.
    pub limit: usize,
    /// Skipped first.
    pub offset: usize,
    /// Newest first.
    pub newest_first: bool,
}

/// The store.
pub enum DocStore {
    /// In memory (memory backend).
    Memory(Mutex<BTreeMap<(Kind, String), Doc>>),
    /// The SQLite file.
    Sqlite(Arc<Mutex<Connection>>, String),
    /// MariaDB/MySQL or PostgreSQL; the table is created at the first operation that reaches
    /// the server (the broker starts while the database is down, as the message store does).
    Sql(SqlPool, String, tokio::sync::OnceCell<()>),
}

const COLS: &str = "kind, id, owner, created, state, due, body";

/// A bind value.
#[derive(Debug, Clone)]
enum Arg {
    S(String),
    I(i64),
}

/// `?` placeholders as PostgreSQL's `$1, $2, ...`.
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}

macro_rules! bound {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for a in $args.iter() {
            q = match a {
                Arg::S(s) => q.bind(s.clone()),
                Arg::I(i) => q.bind(*i),
            };
        }
        q
    }};
}

fn doc_args(d: &Doc) -> Vec<Arg> {
    vec![
        Arg::S(d.kind.as_str().into()),
        Arg::S(d.id.clone()),
        Arg::S(d.owner.clone()),
        Arg::I(d.created),
        Arg::S(d.state.clone()),
        Arg::I(d.due),
        Arg::S(d.body.clone()),
    ]
}

fn kind_of(s: &str) -> Kind {
    match s {
        "msg" => Kind::Message,
        "hook" => Kind::Webhook,
        "out" => Kind::Outbox,
        "in" => Kind::Inbox,
        _ => Kind::Setting,
    }
}

/// A row of [`COLS`] from PostgreSQL.
fn pg_doc(r: &sqlx::postgres::PgRow) -> Result<Doc, sqlx::Error> {
    use sqlx::Row as _;
    Ok(Doc {
        kind: kind_of(&r.try_get::<String, _>(0)?),
        id: r.try_get(1)?,
        owner: r.try_get(2)?,
        created: r.try_get(3)?,
        state: r.try_get(4)?,
        due: r.try_get(5)?,
        body: r.try_get(6)?,
    })
}

/// A row of [`COLS`] from MariaDB/MySQL. The text columns are `utf8mb4_bin` (ids compare
/// case-sensitively), which the server flags BINARY and sqlx then refuses to decode as a
/// `String`: they are read as bytes and checked to be UTF-8 here.
fn my_doc(r: &sqlx::mysql::MySqlRow) -> Result<Doc, sqlx::Error> {
    use sqlx::Row as _;
    let text = |i: usize| -> Result<String, sqlx::Error> {
        String::from_utf8(r.try_get::<Vec<u8>, _>(i)?).map_err(|e| sqlx::Error::ColumnDecode {
            index: i.to_string(),
            source: Box::new(e),
        })
    };
    Ok(Doc {
        kind: kind_of(&text(0)?),
        id: text(1)?,
        owner: text(2)?,
        created: r.try_get(3)?,
        state: text(4)?,
        due: r.try_get(5)?,
        body: text(6)?,
    })
}

fn sqlite_doc(r: &rusqlite::Row<'_>) -> rusqlite::Result<Doc> {
    Ok(Doc {
        kind: kind_of(&r.get::<_, String>(0)?),
        id: r.get(1)?,
        owner: r.get(2)?,
        created: r.get(3)?,
        state: r.get(4)?,
        due: r.get(5)?,
        body: r.get(6)?,
    })
}

fn to_sqlite(a: &Arg) -> rusqlite::types::Value {
    match a {
        Arg::S(s) => rusqlite::types::Value::Text(s.clone()),
        Arg::I(i) => rusqlite::types::Value::Integer(*i),
    }
}

impl DocStore {
    /// Opens (creating the table) the store of the configured backend.
    pub async fn open(cfg: &StorageConfig) -> Result<DocStore, DbError> {
        let table = format!("{}sms", cfg.prefix);
        match cfg.backend {
            Backend::Memory => Ok(DocStore::Memory(Mutex::new(BTreeMap::new()))),
            Backend::Sqlite => {
                let path = cfg.path.clone();
                let t = table.clone();
                let conn = tokio::task::spawn_blocking(move || open_sqlite(&path, &t))
                    .await
                    .map_err(|e| DbError(e.to_string()))??;
                Ok(DocStore::Sqlite(Arc::new(Mutex::new(conn)), table))
            }
            Backend::Mysql | Backend::Postgres => {
                let pool = connect_lazy(cfg, 2)?;
                let table = if matches!(pool, SqlPool::Pg(_)) {
                    table.to_lowercase()
                } else {
                    table
                };
                Ok(DocStore::Sql(pool, table, tokio::sync::OnceCell::new()))
            }
        }
    }

    /// Whether documents survive a restart.
    pub fn durable(&self) -> bool {
        !matches!(self, DocStore::Memory(_))
    }

    /// Whether the table exists, creating it once the server answers.
    async fn ready(&self) -> Result<(), DbError> {
        if let DocStore::Sql(_, _, created) = self {
            created.get_or_try_init(|| self.create_sql()).await?;
        }
        Ok(())
    }

    async fn create_sql(&self) -> Result<(), DbError> {
        let DocStore::Sql(pool, t, _) = self else {
            return Ok(());
        };
        match pool {
            SqlPool::My(p) => {
                sqlx::query(&safe(format!(
                    "CREATE TABLE IF NOT EXISTS `{t}` (
                       kind VARCHAR(8) NOT NULL, id VARCHAR(191) NOT NULL,
                       owner VARCHAR(191) NOT NULL, created BIGINT NOT NULL,
                       state VARCHAR(32) NOT NULL, due BIGINT NOT NULL, body MEDIUMTEXT NOT NULL,
                       PRIMARY KEY (kind, id), INDEX `{t}_list` (kind, owner, created),
                       INDEX `{t}_age` (kind, created), INDEX `{t}_due` (kind, due)
                     ) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )))
                .execute(p)
                .await?;
            }
            SqlPool::Pg(p) => {
                for stmt in [
                    format!(
                        "CREATE TABLE IF NOT EXISTS {t} (
                           kind VARCHAR(8) NOT NULL, id VARCHAR(191) NOT NULL,
                           owner VARCHAR(191) NOT NULL, created BIGINT NOT NULL,
                           state VARCHAR(32) NOT NULL, due BIGINT NOT NULL, body TEXT NOT NULL,
                           PRIMARY KEY (kind, id))"
                    ),
                    format!("CREATE INDEX IF NOT EXISTS {t}_list ON {t} (kind, owner, created)"),
                    format!("CREATE INDEX IF NOT EXISTS {t}_age ON {t} (kind, created)"),
                    format!("CREATE INDEX IF NOT EXISTS {t}_due ON {t} (kind, due)"),
                ] {
                    sqlx::query(&safe(stmt)).execute(p).await?;
                }
            }
        }
        Ok(())
    }

    /// Applies `writes` in one transaction; one result per write (for [`Write::Insert`]:
    /// whether it was inserted; otherwise true).
    pub async fn apply(&self, writes: Vec<Write>) -> Result<Vec<bool>, DbError> {
        match self {
            DocStore::Memory(m) => {
                let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
                Ok(writes
                    .into_iter()
                    .map(|w| match w {
                        Write::Put(d) => {
                            m.insert((d.kind, d.id.clone()), d);
                            true
                        }
                        Write::Insert(d) => match m.entry((d.kind, d.id.clone())) {
                            std::collections::btree_map::Entry::Occupied(_) => false,
                            std::collections::btree_map::Entry::Vacant(v) => {
                                v.insert(d);
                                true
                            }
                        },
                        Write::Delete(k, id) => {
                            m.remove(&(k, id));
                            true
                        }
                    })
                    .collect())
            }
            DocStore::Sqlite(c, t) => {
                let (c, t) = (Arc::clone(c), t.clone());
                tokio::task::spawn_blocking(move || {
                    let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
                    let tx = c.transaction()?;
                    let mut out = Vec::with_capacity(writes.len());
                    for w in &writes {
                        let (sql, args) = write_sql(w, &t, Dialect::Sqlite);
                        let vals: Vec<rusqlite::types::Value> =
                            args.iter().map(to_sqlite).collect();
                        let n = tx.execute(&sql, rusqlite::params_from_iter(vals))?;
                        out.push(!matches!(w, Write::Insert(_)) || n > 0);
                    }
                    tx.commit()?;
                    Ok::<_, rusqlite::Error>(out)
                })
                .await
                .map_err(|e| DbError(e.to_string()))?
                .map_err(DbError::from)
            }
            DocStore::Sql(pool, t, _) => {
                self.ready().await?;
                let mut out = Vec::with_capacity(writes.len());
                match pool {
                    SqlPool::My(p) => {
                        let mut tx = p.begin().await?;
                        for w in &writes {
                            let (sql, args) = write_sql(w, t, Dialect::Mysql);
                            let q_sql = safe(sql);
                            let r = bound!(sqlx::query(&q_sql), args).execute(&mut *tx).await?;
                            out.push(!matches!(w, Write::Insert(_)) || r.rows_affected() > 0);
                        }
                        tx.commit().await?;
                    }
                    SqlPool::Pg(p) => {
                        let mut tx = p.begin().await?;
                        for w in &writes {
                            let (sql, args) = write_sql(w, t, Dialect::Postgres);
                            let q_sql = safe(numbered(&sql));
                            let r = bound!(sqlx::query(&q_sql), args).execute(&mut *tx).await?;
                            out.push(!matches!(w, Write::Insert(_)) || r.rows_affected() > 0);
                        }
                        tx.commit().await?;
                    }
                }
                Ok(out)
            }
        }
    }

    /// One document.
    pub async fn get(&self, kind: Kind, id: &str) -> Result<Option<Doc>, DbError> {
        let key = (kind, id.to_owned());
        if let DocStore::Memory(m) = self {
            return Ok(m
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .cloned());
        }
        let sql = format!("SELECT {COLS} FROM {{t}} WHERE kind = ? AND id = ?");
        let args = vec![Arg::S(kind.as_str().into()), Arg::S(key.1)];
        Ok(self.select(&sql, args).await?.pop())
    }

    /// A listing, by creation time.
    pub async fn list(&self, q: &Query) -> Result<Vec<Doc>, DbError> {
        if let DocStore::Memory(m) = self {
            let m = m.lock().unwrap_or_else(|p| p.into_inner());
            let mut docs: Vec<&Doc> = m
                .range((q.kind, String::new())..)
                .take_while(|((k, _), _)| *k == q.kind)
                .map(|(_, d)| d)
                .filter(|d| q.owner.as_ref().is_none_or(|o| &d.owner == o))
                .filter(|d| q.state.as_ref().is_none_or(|s| &d.state == s))
                .filter(|d| q.from.is_none_or(|f| d.created >= f))
                .filter(|d| q.to.is_none_or(|t| d.created < t))
                .collect();
            // Only the first offset + limit in order are wanted: picked in linear time, then
            // those sorted (the status page lists 20 of up to sms.max_messages every 3 s).
            let order = |a: &&Doc, b: &&Doc| {
                let o = (a.created, &a.id).cmp(&(b.created, &b.id));
                if q.newest_first { o.reverse() } else { o }
            };
            let want = q.offset.saturating_add(q.limit);
            if want == 0 {
                return Ok(Vec::new());
            }
            if docs.len() > want {
                docs.select_nth_unstable_by(want - 1, order);
                docs.truncate(want);
            }
            docs.sort_unstable_by(order);
            return Ok(docs
                .into_iter()
                .skip(q.offset)
                .take(q.limit)
                .cloned()
                .collect());
        }
        let mut sql = format!("SELECT {COLS} FROM {{t}} WHERE kind = ?");
        let mut args = vec![Arg::S(q.kind.as_str().into())];
        if let Some(o) = &q.owner {
            sql.push_str(" AND owner = ?");
            args.push(Arg::S(o.clone()));
        }
        if let Some(s) = &q.state {
            sql.push_str(" AND state = ?");
            args.push(Arg::S(s.clone()));
        }
        if let Some(f) = q.from {
            sql.push_str(" AND created >= ?");
            args.push(Arg::I(f));
        }
        if let Some(t) = q.to {
            sql.push_str(" AND created < ?");
            args.push(Arg::I(t));
        }
        let dir = if q.newest_first { "DESC" } else { "ASC" };
        sql.push_str(&format!(
            " ORDER BY created {dir}, id {dir} LIMIT ? OFFSET ?"
        ));
        args.push(Arg::I(q.limit.min(i64::MAX as usize) as i64));
        args.push(Arg::I(q.offset.min(i64::MAX as usize) as i64));
        self.select(&sql, args).await
    }

    /// Documents of `kind` due at `now_ms` (0 < due <= now), soonest first.
    pub async fn due(&self, kind: Kind, now_ms: i64, limit: usize) -> Result<Vec<Doc>, DbError> {
        if let DocStore::Memory(m) = self {
            let m = m.lock().unwrap_or_else(|p| p.into_inner());
            let mut docs: Vec<Doc> = m
                .range((kind, String::new())..)
                .take_while(|((k, _), _)| *k == kind)
                .map(|(_, d)| d)
                .filter(|d| d.due > 0 && d.due <= now_ms)
                .cloned()
                .collect();
            docs.sort_by_key(|d| d.due);
            docs.truncate(limit);
            return Ok(docs);
        }
        let sql = format!(
            "SELECT {COLS} FROM {{t}} WHERE kind = ? AND due > 0 AND due <= ? ORDER BY due LIMIT ?"
        );
        let args = vec![
            Arg::S(kind.as_str().into()),
            Arg::I(now_ms),
            Arg::I(limit as i64),
        ];
        self.select(&sql, args).await
    }

    /// Documents of `kind` (of `owner`, when given).
    pub async fn count(&self, kind: Kind, owner: Option<&str>) -> Result<usize, DbError> {
        if let DocStore::Memory(m) = self {
            let m = m.lock().unwrap_or_else(|p| p.into_inner());
            return Ok(m
                .range((kind, String::new())..)
                .take_while(|((k, _), _)| *k == kind)
                .filter(|(_, d)| owner.is_none_or(|o| d.owner == o))
                .count());
        }
        let mut sql = "SELECT COUNT(*) FROM {t} WHERE kind = ?".to_owned();
        let mut args = vec![Arg::S(kind.as_str().into())];
        if let Some(o) = owner {
            sql.push_str(" AND owner = ?");
            args.push(Arg::S(o.into()));
        }
        self.ready().await?;
        let n: i64 = match self {
            DocStore::Sqlite(c, t) => {
                let (c, sql) = (Arc::clone(c), sql.replace("{t}", t));
                tokio::task::spawn_blocking(move || {
                    let c = c.lock().unwrap_or_else(|p| p.into_inner());
                    let vals: Vec<rusqlite::types::Value> = args.iter().map(to_sqlite).collect();
                    c.query_row(&sql, rusqlite::params_from_iter(vals), |r| r.get(0))
                })
                .await
                .map_err(|e| DbError(e.to_string()))??
            }
            DocStore::Sql(SqlPool::My(p), t, _) => {
                let sql = sql.replace("{t}", &format!("`{t}`"));
                let q_sql = safe(sql);
                let row = bound!(sqlx::query(&q_sql), args).fetch_one(p).await?;
                sqlx::Row::try_get(&row, 0)?
            }
            DocStore::Sql(SqlPool::Pg(p), t, _) => {
                let sql = numbered(&sql.replace("{t}", t));
                let q_sql = safe(sql);
                let row = bound!(sqlx::query(&q_sql), args).fetch_one(p).await?;
                sqlx::Row::try_get(&row, 0)?
            }
            DocStore::Memory(_) => 0,
        };
        Ok(n.max(0) as usize)
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.count(Kind::Setting, None).await.map(|_| ())
    }

    /// Runs a SELECT of [`COLS`]; `{t}` in `sql` is the table.
    async fn select(&self, sql: &str, args: Vec<Arg>) -> Result<Vec<Doc>, DbError> {
        self.ready().await?;
        match self {
            DocStore::Memory(_) => Ok(Vec::new()),
            DocStore::Sqlite(c, t) => {
                let (c, sql) = (Arc::clone(c), sql.replace("{t}", t));
                tokio::task::spawn_blocking(move || {
                    let c = c.lock().unwrap_or_else(|p| p.into_inner());
                    let mut st = c.prepare_cached(&sql)?;
                    let vals: Vec<rusqlite::types::Value> = args.iter().map(to_sqlite).collect();
                    let rows = st.query_map(rusqlite::params_from_iter(vals), sqlite_doc)?;
                    rows.collect::<rusqlite::Result<Vec<Doc>>>()
                })
                .await
                .map_err(|e| DbError(e.to_string()))?
                .map_err(DbError::from)
            }
            DocStore::Sql(SqlPool::My(p), t, _) => {
                let sql = sql.replace("{t}", &format!("`{t}`"));
                let q_sql = safe(sql);
                let rows = bound!(sqlx::query(&q_sql), args).fetch_all(p).await?;
                Ok(rows.iter().map(my_doc).collect::<Result<_, _>>()?)
            }
            DocStore::Sql(SqlPool::Pg(p), t, _) => {
                let sql = numbered(&sql.replace("{t}", t));
                let q_sql = safe(sql);
                let rows = bound!(sqlx::query(&q_sql), args).fetch_all(p).await?;
                Ok(rows.iter().map(pg_doc).collect::<Result<_, _>>()?)
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Mysql,
    Postgres,
}

fn write_sql(w: &Write, t: &str, d: Dialect) -> (String, Vec<Arg>) {
    let t = if d == Dialect::Mysql {
        format!("`{t}`")
    } else {
        t.to_owned()
    };
    let vals = "?, ?, ?, ?, ?, ?, ?";
    match w {
        Write::Put(doc) => {
            let sql = match d {
                Dialect::Mysql => format!(
                    "INSERT INTO {t} ({COLS}) VALUES ({vals}) ON DUPLICATE KEY UPDATE
                     owner = VALUES(owner), created = VALUES(created), state = VALUES(state),
                     due = VALUES(due), body = VALUES(body)"
                ),
                _ => format!(
                    "INSERT INTO {t} ({COLS}) VALUES ({vals}) ON CONFLICT (kind, id) DO UPDATE SET
                     owner = excluded.owner, created = excluded.created, state = excluded.state,
                     due = excluded.due, body = excluded.body"
                ),
            };
            (sql, doc_args(doc))
        }
        Write::Insert(doc) => {
            let sql = match d {
                Dialect::Mysql => format!("INSERT IGNORE INTO {t} ({COLS}) VALUES ({vals})"),
                _ => format!(
                    "INSERT INTO {t} ({COLS}) VALUES ({vals}) ON CONFLICT (kind, id) DO NOTHING"
                ),
            };
            (sql, doc_args(doc))
        }
        Write::Delete(k, id) => (
            format!("DELETE FROM {t} WHERE kind = ? AND id = ?"),
            vec![Arg::S(k.as_str().into()), Arg::S(id.clone())],
        ),
    }
}

fn open_sqlite(path: &Path, t: &str) -> Result<Connection, DbError> {
    let c = crate::storage::open_file(path)?;
    c.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {t} (
           kind TEXT NOT NULL, id TEXT NOT NULL, owner TEXT NOT NULL, created INTEGER NOT NULL,
           state TEXT NOT NULL, due INTEGER NOT NULL, body TEXT NOT NULL,
           PRIMARY KEY (kind, id));
         CREATE INDEX IF NOT EXISTS {t}_list ON {t} (kind, owner, created);
         CREATE INDEX IF NOT EXISTS {t}_age ON {t} (kind, created);
         CREATE INDEX IF NOT EXISTS {t}_due ON {t} (kind, due);"
    ))?;
    // Read back one row to fail early on a file that is not a database.
    c.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| {
        r.get::<_, i64>(0)
    })
    .optional()?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The store's behaviour on every backend: broker/tests/sms_store.rs.
    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            numbered("a = ? AND b = ? LIMIT ?"),
            "a = $1 AND b = $2 LIMIT $3"
        );
    }
}
