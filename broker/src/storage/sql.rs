//! MariaDB/MySQL and PostgreSQL through sqlx. Every statement is parameterised; only the table
//! name (from the validated prefix) is formatted in.
//!
//! (sqlx's `Any` driver would save the two-armed matches below, but enabling it drags sqlx's
//! SQLite driver into dependency resolution, whose `links = "sqlite3"` clashes with rusqlite's.)

use std::str::FromStr;

use sqlx::Row;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::{DbError, Op, StoredRow};
use crate::config::{Backend, StorageConfig};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Mysql,
    Postgres,
}

enum Pool {
    My(MySqlPool),
    Pg(PgPool),
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
/// Values always go through bind parameters.
fn safe(sql: impl AsRef<str>) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(sql.as_ref().to_owned())
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
        let dialect = if cfg.backend == Backend::Postgres {
            Dialect::Postgres
        } else {
            Dialect::Mysql
        };
        let url = url_with_password(&cfg.url, &cfg.password)?;
        let url = url.replacen("mariadb://", "mysql://", 1);
        let bad = |e: sqlx::Error| DbError(format!("storage.url is not a valid database URL: {e}"));
        // Short: while the server is down, a write should fail (and the sender hear `05`) soon,
        // not after a long wait for a connection that cannot be made.
        let timeout = std::time::Duration::from_secs(2);
        let pool = match dialect {
            Dialect::Mysql => Pool::My(
                MySqlPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(timeout)
                    .connect_lazy_with(MySqlConnectOptions::from_str(&url).map_err(bad)?),
            ),
            Dialect::Postgres => Pool::Pg(
                PgPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(timeout)
                    .connect_lazy_with(PgConnectOptions::from_str(&url).map_err(bad)?),
            ),
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
            let rows = sqlx::query(safe(sql)).bind(&self.table).fetch_all(p).await?;
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
                sqlx::query(safe(format!(
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
                sqlx::query(safe(format!(
                    "CREATE TABLE IF NOT EXISTS {t} (
                      data_id BIGSERIAL PRIMARY KEY,
                      channel VARCHAR(100),
                      data TEXT,
                      created TIMESTAMP
                    )"
                )))
                .execute(self.pg()?)
                .await?;
                sqlx::query(safe(format!(
                    "CREATE INDEX IF NOT EXISTS {t}_channel ON {t}(channel)"
                )))
                .execute(self.pg()?)
                .await?;
            }
        }
        let have = self.columns().await?;
        let add: [(&str, &str, &str); 4] = [
            ("frame", "LONGTEXT CHARACTER SET utf8mb4 NULL", "TEXT"),
            ("remaining", "INT NULL", "INTEGER"),
            ("expires_at", "BIGINT NULL", "BIGINT"),
            ("msg_key", "VARCHAR(64) NULL", "VARCHAR(64)"),
        ];
        for (col, mysql, pg) in add {
            if !have.iter().any(|(c, _)| c == col) {
                let ty = if self.dialect == Dialect::Mysql {
                    mysql
                } else {
                    pg
                };
                let sql = format!("ALTER TABLE {t} ADD COLUMN {col} {ty}");
                on_pool!(&self.pool, p => sqlx::query(safe(&sql)).execute(p).await.map(|_| ()))?;
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
                    sqlx::query(safe(format!(
                        "ALTER TABLE `{t}` MODIFY `{col}` {ty} CHARACTER SET utf8mb4 NULL"
                    )))
                    .execute(self.my()?)
                    .await?;
                }
            }
        }
        Ok(())
    }

    pub(super) async fn apply(&self, ops: Vec<Op>) -> Result<Vec<i64>, DbError> {
        let t = &self.table;
        let (ins, del, rem) = match self.dialect {
            Dialect::Mysql => (
                format!(
                    "INSERT INTO `{t}`(channel, data, created, frame, remaining, expires_at, msg_key)
                     VALUES (?, ?, NOW(), ?, ?, ?, ?)"
                ),
                format!("DELETE FROM `{t}` WHERE data_id = ?"),
                format!("UPDATE `{t}` SET remaining = ? WHERE data_id = ?"),
            ),
            Dialect::Postgres => (
                format!(
                    "INSERT INTO {t}(channel, data, created, frame, remaining, expires_at, msg_key)
                     VALUES ($1, $2, NOW(), $3, $4, $5, $6) RETURNING data_id"
                ),
                format!("DELETE FROM {t} WHERE data_id = $1"),
                format!("UPDATE {t} SET remaining = $1 WHERE data_id = $2"),
            ),
        };
        let mut ids = Vec::new();
        match &self.pool {
            Pool::My(p) => {
                let mut tx = p.begin().await?;
                for op in ops {
                    match op {
                        Op::Insert(m) => {
                            let r = sqlx::query(safe(&ins))
                                .bind(m.channel)
                                .bind(m.data)
                                .bind(m.frame.as_str())
                                .bind(i64::from(m.remaining))
                                .bind(m.expires_at.map(|e| e as i64))
                                .bind(m.key)
                                .execute(&mut *tx)
                                .await?;
                            ids.push(r.last_insert_id() as i64);
                        }
                        Op::Delete(id) => {
                            sqlx::query(safe(&del)).bind(id).execute(&mut *tx).await?;
                        }
                        Op::Remaining(id, n) => {
                            sqlx::query(safe(&rem))
                                .bind(i64::from(n))
                                .bind(id)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                }
                tx.commit().await?;
            }
            Pool::Pg(p) => {
                let mut tx = p.begin().await?;
                for op in ops {
                    match op {
                        Op::Insert(m) => {
                            let row = sqlx::query(safe(&ins))
                                .bind(m.channel)
                                .bind(m.data)
                                .bind(m.frame.as_str())
                                .bind(i32::try_from(m.remaining).unwrap_or(i32::MAX))
                                .bind(m.expires_at.map(|e| e as i64))
                                .bind(m.key)
                                .fetch_one(&mut *tx)
                                .await?;
                            ids.push(row.try_get::<i64, _>(0)?);
                        }
                        Op::Delete(id) => {
                            sqlx::query(safe(&del)).bind(id).execute(&mut *tx).await?;
                        }
                        Op::Remaining(id, n) => {
                            sqlx::query(safe(&rem))
                                .bind(i32::try_from(n).unwrap_or(i32::MAX))
                                .bind(id)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                }
                tx.commit().await?;
            }
        }
        Ok(ids)
    }

    pub(super) async fn load(&self, after: i64, limit: usize) -> Result<Vec<StoredRow>, DbError> {
        let t = &self.table;
        let sql = match self.dialect {
            Dialect::Mysql => format!(
                "SELECT data_id, msg_key, channel, frame, data, CAST(remaining AS SIGNED), expires_at
                 FROM `{t}` WHERE data_id > ? ORDER BY data_id LIMIT ?"
            ),
            Dialect::Postgres => format!(
                "SELECT data_id, msg_key, channel, frame, data, CAST(remaining AS BIGINT), expires_at
                 FROM {t} WHERE data_id > $1 ORDER BY data_id LIMIT $2"
            ),
        };
        on_pool!(&self.pool, p => {
            let rows = sqlx::query(safe(&sql))
                .bind(after)
                .bind(limit as i64)
                .fetch_all(p)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(StoredRow {
                        data_id: r.try_get(0)?,
                        key: r.try_get(1)?,
                        channel: r.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
                        frame: r.try_get(3)?,
                        data: r.try_get::<Option<String>, _>(4)?.unwrap_or_default(),
                        remaining: r
                            .try_get::<Option<i64>, _>(5)?
                            .map_or(1, |n| n.max(1) as u32),
                        expires_at: r.try_get::<Option<i64>, _>(6)?.map(|e| e.max(0) as u64),
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(DbError::from)
        })
    }

    pub(super) async fn ping(&self) -> Result<(), DbError> {
        on_pool!(&self.pool, p => sqlx::query(safe("SELECT 1")).execute(p).await.map(|_| ()))?;
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
