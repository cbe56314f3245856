//! MariaDB/MySQL and PostgreSQL through sqlx. Every statement is parameterised; only the table
//! name (from the validated prefix) is formatted in.
//!
//! (sqlx's `Any` driver would save the two-armed matches below, but enabling it drags sqlx's
//! SQLite driver into dependency resolution, whose `links = "sqlite3"` clashes with rusqlite's.)

use std::str::FromStr;

use sqlx::Row;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use std::sync::Arc;

use super::{Claim, DbError, NewRow, Op, OpResult, Recovered, StoredRow};
use crate::config::{Backend, StorageConfig};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Mysql,
    Postgres,
}

/// A MySQL/MariaDB or PostgreSQL pool (shared with the SMS service's tables).
pub enum Pool {
    /// MySQL/MariaDB.
    My(MySqlPool),
    /// PostgreSQL.
    Pg(PgPool),
}

/// A lazily connecting pool of at most `max` connections for the database `cfg` names.
pub(crate) fn connect_lazy(cfg: &StorageConfig, max: u32) -> Result<Pool, DbError> {
    let url = url_with_password(&cfg.url, &cfg.password)?;
    let url = url.replacen("mariadb://", "mysql://", 1);
    let bad = |e: sqlx::Error| DbError(format!("storage.url is not a valid database URL: {e}"));
    // Short: while the server is down, a write should fail (and the sender hear `05`) soon,
    // not after a long wait for a connection that cannot be made.
    let timeout = std::time::Duration::from_secs(2);
    Ok(if cfg.backend == Backend::Postgres {
        Pool::Pg(
            PgPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(timeout)
                .connect_lazy_with(PgConnectOptions::from_str(&url).map_err(bad)?),
        )
    } else {
        Pool::My(
            MySqlPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(timeout)
                .connect_lazy_with(MySqlConnectOptions::from_str(&url).map_err(bad)?),
        )
    })
}

/// Runs `$body` with `$p` bound to the concrete pool (the same code, typed for each database).
macro_rules! on_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            Pool::My($p) => $body,
            Pool::Pg($p) => $body,
        }
    };
}

/// A MySQL/MariaDB or PostgreSQL database.
pub struct SqlDb {
    pool: Pool,
    dialect: Dialect,
    table: String,
}

/// Marks a statement as audited: the only formatted-in part of any statement here is the table
/// name, built from `storage.prefix`, which validation restricts to letters, digits and `_`.
/// Values always go through bind parameters. (sqlx 0.8 takes the statement as `&str`; 0.9's
/// `AssertSqlSafe` needs Rust 1.94, beyond the workspace's 1.85.)
pub(crate) fn safe(sql: impl AsRef<str>) -> String {
    sql.as_ref().to_owned()
}

/// `url` with `password` put in (when given), for the driver.
fn url_with_password(url: &str, password: &str) -> Result<String, DbError> {
    if password.is_empty() {
        return Ok(url.to_owned());
    }
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| DbError(format!("storage.url {url:?} has no scheme")))?;
    let (userinfo, host) = rest.split_once('@').ok_or_else(|| {
        DbError("storage.url needs a user (USER@HOST) when a password is given".into())
    })?;
    let user = userinfo.split(':').next().unwrap_or(userinfo);
    let enc: String = password
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    Ok(format!("{scheme}://{user}:{enc}@{host}"))
}

impl SqlDb {
    /// Prepares a lazily connecting pool (a database that is down is not an error here).
    pub fn new(cfg: &StorageConfig) -> Result<SqlDb, DbError> {
        let pool = connect_lazy(cfg, 4)?;
        let dialect = match pool {
            Pool::My(_) => Dialect::Mysql,
            Pool::Pg(_) => Dialect::Postgres,
        };
        let mut table = format!("{}data", cfg.prefix);
        if dialect == Dialect::Postgres {
            // unquoted identifiers are folded to lower case
            table = table.to_lowercase();
        }
        Ok(SqlDb {
            pool,
            dialect,
            table,
        })
    }

    async fn columns(&self) -> Result<Vec<(String, Option<String>)>, DbError> {
        let sql = match self.dialect {
            Dialect::Mysql => {
                "SELECT column_name, character_set_name FROM information_schema.columns
                 WHERE table_schema = DATABASE() AND table_name = ?"
            }
            Dialect::Postgres => {
                "SELECT column_name::text, NULL::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1"
            }
        };
        on_pool!(&self.pool, p => {
            let rows = sqlx::query(&safe(sql)).bind(&self.table).fetch_all(p).await?;
            rows.iter()
                .map(|r| {
                    Ok((
                        r.try_get::<String, _>(0)?.to_lowercase(),
                        r.try_get::<Option<String>, _>(1)?,
                    ))
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(DbError::from)
        })
    }

    pub(super) async fn migrate(&self) -> Result<(), DbError> {
        let t = &self.table;
        match self.dialect {
            Dialect::Mysql => {
                // The original's table, exactly (the prefix is configurable).
                sqlx::query(&safe(format!(
                    "CREATE TABLE IF NOT EXISTS `{t}` (
                      `data_id` bigint(20) NOT NULL AUTO_INCREMENT,
                      `channel` varchar(100) DEFAULT NULL,
                      `data` longtext,
                      `created` datetime DEFAULT NULL,
                      PRIMARY KEY (`data_id`),
                      KEY `channel` (`channel`)
                    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
                )))
                .execute(self.my()?)
                .await?;
            }
            Dialect::Postgres => {
                sqlx::query(&safe(format!(
                    "CREATE TABLE IF NOT EXISTS {t} (
                      data_id BIGSERIAL PRIMARY KEY,
                      channel VARCHAR(100),
                      data TEXT,
                      created TIMESTAMP
                    )"
                )))
                .execute(self.pg()?)
                .await?;
            }
        }
        let have = self.columns().await?;
        let add: [(&str, &str, &str); 7] = [
            ("frame", "LONGTEXT CHARACTER SET utf8mb4 NULL", "TEXT"),
            ("remaining", "INT NULL", "INTEGER"),
            ("expires_at", "BIGINT NULL", "BIGINT"),
            ("msg_key", "VARCHAR(64) NULL", "VARCHAR(64)"),
            ("claimed_by", "VARCHAR(128) NULL", "VARCHAR(128)"),
            ("claimed_until", "BIGINT NULL", "BIGINT"),
            ("deliveries", "INT NULL", "INTEGER"),
        ];
        for (col, mysql, pg) in add {
            if !have.iter().any(|(c, _)| c == col) {
                let ty = if self.dialect == Dialect::Mysql {
                    mysql
                } else {
                    pg
                };
                let sql = format!("ALTER TABLE {t} ADD COLUMN {col} {ty}");
                on_pool!(&self.pool, p => sqlx::query(&safe(&sql)).execute(p).await.map(|_| ()))?;
            }
        }
        if self.dialect == Dialect::Mysql {
            // The original created its table latin1: emoji and most scripts would not fit.
            for (col, ty) in [("channel", "varchar(100)"), ("data", "longtext")] {
                let charset = have
                    .iter()
                    .find(|(c, _)| c == col)
                    .and_then(|(_, cs)| cs.clone());
                if charset.is_some_and(|cs| cs != "utf8mb4") {
                    sqlx::query(&safe(format!(
                        "ALTER TABLE `{t}` MODIFY `{col}` {ty} CHARACTER SET utf8mb4 NULL"
                    )))
                    .execute(self.my()?)
                    .await?;
                }
            }
        }
        // Indexes: the next rows of a channel (InnoDB's secondary key on `channel` carries the
        // primary key, so it serves); rows by expiry.
        let indexes = self.indexes().await?;
        let want: [(&str, &str, &str); 2] = [
            ("channel_id", "(channel, data_id)", "(channel, data_id)"),
            (
                "expires",
                "(expires_at)",
                "(expires_at) WHERE expires_at IS NOT NULL",
            ),
        ];
        for (name, mysql, pg) in want {
            let name = format!("{t}_{name}");
            if self.dialect == Dialect::Mysql && name.ends_with("_channel_id") {
                continue;
            }
            if indexes.iter().any(|i| i.eq_ignore_ascii_case(&name)) {
                continue;
            }
            let sql = match self.dialect {
                Dialect::Mysql => format!("CREATE INDEX `{name}` ON `{t}` {mysql}"),
                Dialect::Postgres => format!("CREATE INDEX IF NOT EXISTS {name} ON {t} {pg}"),
            };
            on_pool!(&self.pool, p => sqlx::query(&safe(&sql)).execute(p).await.map(|_| ()))?;
        }
        Ok(())
    }

    async fn indexes(&self) -> Result<Vec<String>, DbError> {
        let sql = match self.dialect {
            Dialect::Mysql => {
                "SELECT DISTINCT index_name FROM information_schema.statistics
                 WHERE table_schema = DATABASE() AND table_name = ?"
            }
            Dialect::Postgres => {
                "SELECT indexname::text FROM pg_indexes
                 WHERE schemaname = current_schema() AND tablename = $1"
            }
        };
        on_pool!(&self.pool, p => {
            let rows = sqlx::query(&safe(sql)).bind(&self.table).fetch_all(p).await?;
            rows.iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(DbError::from)
        })
    }

    pub(super) async fn recover(&self, node: &str) -> Result<Recovered, DbError> {
        let t = &self.table;
        let pattern = format!("{}/%", super::sqlite::like_escape(node));
        let (release, max, count) = match self.dialect {
            Dialect::Mysql => (
                format!(
                    "UPDATE `{t}` SET claimed_by = NULL, claimed_until = NULL
                     WHERE claimed_by LIKE ?"
                ),
                format!("SELECT CAST(COALESCE(MAX(data_id), 0) AS SIGNED) FROM `{t}`"),
                format!("SELECT channel, CAST(COUNT(*) AS SIGNED) FROM `{t}` GROUP BY channel"),
            ),
            Dialect::Postgres => (
                format!(
                    "UPDATE {t} SET claimed_by = NULL, claimed_until = NULL
                     WHERE claimed_by LIKE $1"
                ),
                format!("SELECT CAST(COALESCE(MAX(data_id), 0) AS BIGINT) FROM {t}"),
                format!("SELECT channel, CAST(COUNT(*) AS BIGINT) FROM {t} GROUP BY channel"),
            ),
        };
        on_pool!(&self.pool, p => {
            sqlx::query(&safe(&release)).bind(&pattern).execute(p).await?;
            let max_id: i64 = sqlx::query(&safe(&max)).fetch_one(p).await?.try_get(0)?;
            let rows = sqlx::query(&safe(&count)).fetch_all(p).await?;
            let mut counts = std::collections::HashMap::new();
            for r in &rows {
                let ch: Option<String> = r.try_get(0)?;
                let n: i64 = r.try_get(1)?;
                counts.insert(ch.unwrap_or_default(), n.max(0) as usize);
            }
            Ok(Recovered { max_id, counts })
        })
    }

    /// Applies `ops` in one transaction, as few statements as it takes: consecutive inserts
    /// become multi-row inserts, consecutive completions one `DELETE ... IN` per channel (its
    /// count says how many stored places to give back), consecutive releases one `UPDATE`.
    pub(super) async fn apply(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, DbError> {
        let n = ops.len();
        let steps = plan(ops);
        let mut results: Vec<Option<OpResult>> = std::iter::repeat_with(|| None).take(n).collect();
        match &self.pool {
            Pool::My(p) => {
                let mut tx = p.begin().await?;
                for step in steps {
                    self.step_my(&mut tx, step, &mut results).await?;
                }
                tx.commit().await?;
            }
            Pool::Pg(p) => {
                let mut tx = p.begin().await?;
                for step in steps {
                    self.step_pg(&mut tx, step, &mut results).await?;
                }
                tx.commit().await?;
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(OpResult::Updated))
            .collect())
    }

    async fn step_my(
        &self,
        tx: &mut sqlx::MySqlConnection,
        step: Step,
        results: &mut [Option<OpResult>],
    ) -> Result<(), DbError> {
        let t = &self.table;
        match step {
            Step::Insert(rows) => {
                for chunk in insert_chunks(&rows) {
                    let values =
                        vec!["(?, ?, ?, NOW(), ?, 1, ?, ?, ?, ?, ?)"; chunk.len()].join(",");
                    let sql = format!(
                        "INSERT INTO `{t}`(data_id, channel, data, created, frame, remaining,
                                           expires_at, msg_key, claimed_by, claimed_until,
                                           deliveries) VALUES {values}"
                    );
                    let mut q = sqlx::query(&sql);
                    for (_, m) in chunk {
                        let (holder, until) = claim_parts(&m.claim);
                        q = q
                            .bind(m.data_id)
                            .bind(&*m.channel)
                            .bind(Option::<&str>::None)
                            .bind(m.frame.as_str())
                            .bind(m.expires_at.map(|e| e as i64))
                            .bind(m.key.as_str())
                            .bind(holder)
                            .bind(until)
                            .bind(i32::from(m.claim.is_some()));
                    }
                    q.execute(&mut *tx).await?;
                    for (i, _) in chunk {
                        results[*i] = Some(OpResult::Inserted);
                    }
                }
            }
            Step::Delete(ops) => {
                for chunk in ops.chunks(ID_CHUNK) {
                    let ids: Vec<i64> = chunk.iter().map(|(_, id)| *id).collect();
                    let r = sqlx::query(&safe(format!(
                        "DELETE FROM `{t}` WHERE data_id IN ({})",
                        id_list(&ids)
                    )))
                    .execute(&mut *tx)
                    .await?;
                    mark_deleted(chunk, r.rows_affected(), results);
                }
            }
            Step::Decrement(i, id) => {
                sqlx::query(&safe(format!(
                    "UPDATE `{t}` SET remaining = remaining - 1, claimed_by = NULL,
                     claimed_until = NULL WHERE data_id = ?"
                )))
                .bind(id)
                .execute(&mut *tx)
                .await?;
                results[i] = Some(OpResult::Updated);
            }
            Step::Release(ids) => {
                for chunk in ids.chunks(ID_CHUNK) {
                    sqlx::query(&safe(format!(
                        "UPDATE `{t}` SET claimed_by = NULL, claimed_until = NULL
                         WHERE data_id IN ({})",
                        id_list(chunk)
                    )))
                    .execute(&mut *tx)
                    .await?;
                }
            }
            Step::Claim(i, req) => {
                let candidates = sqlx::query(&safe(format!(
                    "SELECT data_id,
                            CAST(COALESCE(LENGTH(frame), 0) + COALESCE(LENGTH(data), 0) AS SIGNED)
                     FROM `{t}`
                     WHERE channel = ? AND (claimed_until IS NULL OR claimed_until < ?)
                       AND (expires_at IS NULL OR expires_at > ?) AND COALESCE(remaining, 1) > 0
                     ORDER BY data_id LIMIT ?"
                )))
                .bind(&*req.channel)
                .bind(req.now_ms)
                .bind(req.now_ms.div_euclid(1000))
                .bind(req.max_rows as i64)
                .fetch_all(&mut *tx)
                .await?;
                let n = candidates.len();
                let ids = within_bytes(
                    candidates
                        .iter()
                        .map(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?)))
                        .collect::<Result<Vec<_>, sqlx::Error>>()?,
                    req.max_bytes,
                );
                let more = n >= req.max_rows || ids.len() < n;
                if ids.is_empty() {
                    results[i] = Some(OpResult::Claimed(Vec::new(), more));
                    return Ok(());
                }
                let list = id_list(&ids);
                let rows = sqlx::query(&safe(format!(
                    "SELECT data_id, msg_key, frame, CASE WHEN frame IS NULL THEN data END,
                            CAST(COALESCE(remaining, 1) AS SIGNED), expires_at,
                            CAST(COALESCE(deliveries, 0) AS SIGNED)
                     FROM `{t}` WHERE data_id IN ({list}) ORDER BY data_id"
                )))
                .fetch_all(&mut *tx)
                .await?;
                sqlx::query(&safe(format!(
                    "UPDATE `{t}` SET claimed_by = ?, claimed_until = ?,
                            deliveries = COALESCE(deliveries, 0) + 1 WHERE data_id IN ({list})"
                )))
                .bind(&*req.claim.holder)
                .bind(req.claim.until_ms)
                .execute(&mut *tx)
                .await?;
                let rows = rows
                    .iter()
                    .map(stored_row)
                    .collect::<Result<_, sqlx::Error>>()?;
                results[i] = Some(OpResult::Claimed(rows, more));
            }
            Step::Sweep(i, now, max, key) => {
                let sql = safe(match key {
                    None => format!(
                        "SELECT data_id, channel FROM `{t}`
                         WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?"
                    ),
                    Some(_) => format!(
                        "SELECT data_id, channel FROM `{t}`
                         WHERE msg_key = ? AND claimed_until IS NULL LIMIT ? FOR UPDATE"
                    ),
                });
                let q = sqlx::query(&sql);
                let rows = match key {
                    None => q.bind(now as i64),
                    Some(k) => q.bind(k),
                }
                .bind(max as i64)
                .fetch_all(&mut *tx)
                .await?;
                let swept = swept_rows(&rows)?;
                if !swept.is_empty() {
                    let ids: Vec<i64> = swept.iter().map(|(id, _)| *id).collect();
                    sqlx::query(&safe(format!(
                        "DELETE FROM `{t}` WHERE data_id IN ({})",
                        id_list(&ids)
                    )))
                    .execute(&mut *tx)
                    .await?;
                }
                results[i] = Some(OpResult::Swept(swept));
            }
        }
        Ok(())
    }

    async fn step_pg(
        &self,
        tx: &mut sqlx::PgConnection,
        step: Step,
        results: &mut [Option<OpResult>],
    ) -> Result<(), DbError> {
        let t = &self.table;
        match step {
            Step::Insert(rows) => {
                for chunk in insert_chunks(&rows) {
                    let values: Vec<String> = (0..chunk.len())
                        .map(|k| {
                            let b = k * 9;
                            format!(
                                "(${}, ${}, ${}, NOW(), ${}, 1, ${}, ${}, ${}, ${}, ${})",
                                b + 1,
                                b + 2,
                                b + 3,
                                b + 4,
                                b + 5,
                                b + 6,
                                b + 7,
                                b + 8,
                                b + 9
                            )
                        })
                        .collect();
                    let sql = format!(
                        "INSERT INTO {t}(data_id, channel, data, created, frame, remaining,
                                         expires_at, msg_key, claimed_by, claimed_until,
                                         deliveries) VALUES {}",
                        values.join(",")
                    );
                    let mut q = sqlx::query(&sql);
                    for (_, m) in chunk {
                        let (holder, until) = claim_parts(&m.claim);
                        q = q
                            .bind(m.data_id)
                            .bind(&*m.channel)
                            .bind(Option::<&str>::None)
                            .bind(m.frame.as_str())
                            .bind(m.expires_at.map(|e| e as i64))
                            .bind(m.key.as_str())
                            .bind(holder)
                            .bind(until)
                            .bind(i32::from(m.claim.is_some()));
                    }
                    q.execute(&mut *tx).await?;
                    for (i, _) in chunk {
                        results[*i] = Some(OpResult::Inserted);
                    }
                }
            }
            Step::Delete(ops) => {
                for chunk in ops.chunks(ID_CHUNK) {
                    let ids: Vec<i64> = chunk.iter().map(|(_, id)| *id).collect();
                    let r = sqlx::query(&safe(format!("DELETE FROM {t} WHERE data_id = ANY($1)")))
                        .bind(ids)
                        .execute(&mut *tx)
                        .await?;
                    mark_deleted(chunk, r.rows_affected(), results);
                }
            }
            Step::Decrement(i, id) => {
                sqlx::query(&safe(format!(
                    "UPDATE {t} SET remaining = remaining - 1, claimed_by = NULL,
                     claimed_until = NULL WHERE data_id = $1"
                )))
                .bind(id)
                .execute(&mut *tx)
                .await?;
                results[i] = Some(OpResult::Updated);
            }
            Step::Release(ids) => {
                for chunk in ids.chunks(ID_CHUNK) {
                    sqlx::query(&safe(format!(
                        "UPDATE {t} SET claimed_by = NULL, claimed_until = NULL
                         WHERE data_id = ANY($1)"
                    )))
                    .bind(chunk.to_vec())
                    .execute(&mut *tx)
                    .await?;
                }
            }
            Step::Claim(i, req) => {
                let candidates = sqlx::query(&safe(format!(
                    "SELECT data_id,
                            CAST(COALESCE(LENGTH(frame), 0) + COALESCE(LENGTH(data), 0) AS BIGINT)
                     FROM {t}
                     WHERE channel = $1 AND (claimed_until IS NULL OR claimed_until < $2)
                       AND (expires_at IS NULL OR expires_at > $3) AND COALESCE(remaining, 1) > 0
                     ORDER BY data_id LIMIT $4"
                )))
                .bind(&*req.channel)
                .bind(req.now_ms)
                .bind(req.now_ms.div_euclid(1000))
                .bind(req.max_rows as i64)
                .fetch_all(&mut *tx)
                .await?;
                let n = candidates.len();
                let ids = within_bytes(
                    candidates
                        .iter()
                        .map(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?)))
                        .collect::<Result<Vec<_>, sqlx::Error>>()?,
                    req.max_bytes,
                );
                let more = n >= req.max_rows || ids.len() < n;
                if ids.is_empty() {
                    results[i] = Some(OpResult::Claimed(Vec::new(), more));
                    return Ok(());
                }
                let rows = sqlx::query(&safe(format!(
                    "UPDATE {t} SET claimed_by = $1, claimed_until = $2,
                            deliveries = COALESCE(deliveries, 0) + 1
                     WHERE data_id = ANY($3)
                     RETURNING data_id, msg_key, frame, CASE WHEN frame IS NULL THEN data END,
                               CAST(COALESCE(remaining, 1) AS BIGINT), expires_at,
                               CAST(COALESCE(deliveries, 1) - 1 AS BIGINT)"
                )))
                .bind(&*req.claim.holder)
                .bind(req.claim.until_ms)
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?;
                let mut rows: Vec<StoredRow> = rows
                    .iter()
                    .map(stored_row)
                    .collect::<Result<_, sqlx::Error>>()?;
                rows.sort_by_key(|r| r.data_id);
                results[i] = Some(OpResult::Claimed(rows, more));
            }
            Step::Sweep(i, now, max, key) => {
                let sql = safe(match key {
                    None => format!(
                        "DELETE FROM {t} WHERE data_id IN (
                           SELECT data_id FROM {t}
                           WHERE expires_at IS NOT NULL AND expires_at <= $1 LIMIT $2)
                         RETURNING data_id, channel"
                    ),
                    Some(_) => format!(
                        "DELETE FROM {t} WHERE data_id IN (
                           SELECT data_id FROM {t}
                           WHERE msg_key = $1 AND claimed_until IS NULL LIMIT $2 FOR UPDATE)
                         RETURNING data_id, channel"
                    ),
                });
                let q = sqlx::query(&sql);
                let rows = match key {
                    None => q.bind(now as i64),
                    Some(k) => q.bind(k),
                }
                .bind(max as i64)
                .fetch_all(&mut *tx)
                .await?;
                results[i] = Some(OpResult::Swept(swept_rows(&rows)?));
            }
        }
        Ok(())
    }

    pub(super) async fn ping(&self) -> Result<(), DbError> {
        on_pool!(&self.pool, p => sqlx::query(&safe("SELECT 1")).execute(p).await.map(|_| ()))?;
        Ok(())
    }

    fn my(&self) -> Result<&MySqlPool, DbError> {
        match &self.pool {
            Pool::My(p) => Ok(p),
            Pool::Pg(_) => Err(DbError("internal: MySQL statement on PostgreSQL".into())),
        }
    }

    fn pg(&self) -> Result<&PgPool, DbError> {
        match &self.pool {
            Pool::Pg(p) => Ok(p),
            Pool::My(_) => Err(DbError("internal: PostgreSQL statement on MySQL".into())),
        }
    }
}

/// Most ids in one `IN (...)` list.
const ID_CHUNK: usize = 1000;
/// Most rows, and bytes, in one multi-row insert.
const INSERT_ROWS: usize = 256;
const INSERT_BYTES: usize = 4 * 1024 * 1024;

/// What one statement (or a few) does.
enum Step {
    /// Rows to insert, with the index of their op.
    Insert(Vec<(usize, NewRow)>),
    /// Completions of rows of one channel: (op index, row).
    Delete(Vec<(usize, i64)>),
    /// A completion of a row that owes more deliveries.
    Decrement(usize, i64),
    /// Releases.
    Release(Vec<i64>),
    /// A claim.
    Claim(usize, super::ClaimRequest),
    /// A sweep.
    Sweep(usize, u64, usize, Option<String>),
}

/// Completions of one channel: (op index, row).
type ChannelDeletes = (Arc<str>, Vec<(usize, i64)>);

/// Groups consecutive ops of one kind (the writer orders a batch by kind).
fn plan(ops: Vec<Op>) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut deletes: Vec<ChannelDeletes> = Vec::new();
    let flush = |steps: &mut Vec<Step>, deletes: &mut Vec<ChannelDeletes>| {
        for (_, d) in deletes.drain(..) {
            steps.push(Step::Delete(d));
        }
    };
    for (i, op) in ops.into_iter().enumerate() {
        if !matches!(
            op,
            Op::Complete {
                remaining: 0 | 1,
                ..
            }
        ) {
            flush(&mut steps, &mut deletes);
        }
        match op {
            Op::Insert(row) => match steps.last_mut() {
                Some(Step::Insert(v)) => v.push((i, row)),
                _ => steps.push(Step::Insert(vec![(i, row)])),
            },
            Op::Complete {
                data_id, remaining, ..
            } if remaining > 1 => steps.push(Step::Decrement(i, data_id)),
            Op::Complete {
                data_id, channel, ..
            } => match deletes.iter_mut().find(|(c, _)| *c == channel) {
                Some((_, v)) => v.push((i, data_id)),
                None => deletes.push((channel, vec![(i, data_id)])),
            },
            Op::Release(ids) => match steps.last_mut() {
                Some(Step::Release(v)) => v.extend(ids),
                _ => steps.push(Step::Release(ids)),
            },
            Op::Claim(req) => steps.push(Step::Claim(i, req)),
            Op::Sweep { now, max, key } => steps.push(Step::Sweep(i, now, max, key)),
        }
    }
    flush(&mut steps, &mut deletes);
    steps
}

/// Inserts in chunks of at most [`INSERT_ROWS`] rows and [`INSERT_BYTES`] (a row alone may be
/// larger).
fn insert_chunks(rows: &[(usize, NewRow)]) -> Vec<&[(usize, NewRow)]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (k, (_, r)) in rows.iter().enumerate() {
        let size = r.frame.len();
        if k > start && (k - start >= INSERT_ROWS || bytes + size > INSERT_BYTES) {
            out.push(&rows[start..k]);
            start = k;
            bytes = 0;
        }
        bytes += size;
    }
    if start < rows.len() {
        out.push(&rows[start..]);
    }
    out
}

/// `affected` rows of `chunk` (one channel) were deleted: the first that many count as
/// deleted (which ones does not matter: each gives back one stored place of the channel).
fn mark_deleted(chunk: &[(usize, i64)], affected: u64, results: &mut [Option<OpResult>]) {
    for (k, (i, _)) in chunk.iter().enumerate() {
        results[*i] = Some(OpResult::Deleted((k as u64) < affected));
    }
}

fn claim_parts(c: &Option<Claim>) -> (Option<&str>, Option<i64>) {
    match c {
        Some(c) => (Some(&*c.holder), Some(c.until_ms)),
        None => (None, None),
    }
}

/// Integers for an `IN (...)` list (integers only: nothing from outside is formatted in).
fn id_list(ids: &[i64]) -> String {
    let mut s = String::with_capacity(ids.len() * 8);
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&id.to_string());
    }
    s
}

/// The ids of `candidates` (id, size) that fit in `max_bytes`, the first always.
fn within_bytes(candidates: Vec<(i64, i64)>, max_bytes: usize) -> Vec<i64> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for (id, size) in candidates {
        let size = size.max(0) as usize;
        if !out.is_empty() && bytes + size > max_bytes {
            break;
        }
        bytes += size;
        out.push(id);
    }
    out
}

fn stored_row<R: Row>(r: &R) -> Result<StoredRow, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(StoredRow {
        data_id: r.try_get(0)?,
        key: r.try_get(1)?,
        frame: r.try_get(2)?,
        data: r.try_get(3)?,
        remaining: r.try_get::<i64, _>(4)?.clamp(1, i64::from(u32::MAX)) as u32,
        expires_at: r.try_get::<Option<i64>, _>(5)?.map(|e| e.max(0) as u64),
        deliveries: (r.try_get::<i64, _>(6)?.max(0) as u32).saturating_add(1),
    })
}

fn swept_rows<R: Row>(rows: &[R]) -> Result<Vec<(i64, String)>, DbError>
where
    usize: sqlx::ColumnIndex<R>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get::<i64, _>(0)?,
                r.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
            ))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(DbError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_put_into_the_url_encoded() {
        assert_eq!(
            url_with_password("mysql://wsmb@db:3306/mq", "p@ss:w/rd").expect("url"),
            "mysql://wsmb:p%40ss%3Aw%2Frd@db:3306/mq"
        );
        assert_eq!(
            url_with_password("mysql://wsmb@db/mq", "").expect("url"),
            "mysql://wsmb@db/mq"
        );
        assert!(url_with_password("mysql://db/mq", "x").is_err());
    }
}
