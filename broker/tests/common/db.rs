//! Databases for the persistence tests: SQLite files, and the real MariaDB and PostgreSQL
//! servers that `.ci/run` installs and starts (URLs overridable with WSMB_TEST_MYSQL_URL and
//! WSMB_TEST_POSTGRES_URL).

use std::path::PathBuf;
use std::time::Duration;

use sqlx::Row;
use wsmb_broker::config::{Backend, StorageConfig};

pub fn mysql_url() -> String {
    std::env::var("WSMB_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://wsmb:wsmb@127.0.0.1:3306/wsmb_test".into())
}

pub fn postgres_url() -> String {
    std::env::var("WSMB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://wsmb:wsmb@127.0.0.1:5432/wsmb_test".into())
}

fn scratch_base() -> PathBuf {
    if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    }
}

/// A storage configuration of its own for one test: a fresh SQLite file, or a fresh table
/// prefix in the shared MariaDB/PostgreSQL test database.
pub fn storage(backend: Backend, tag: &str) -> StorageConfig {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let unique = format!("t{}_{n}_{tag}", std::process::id());
    let mut c = StorageConfig {
        backend,
        prefix: format!("{unique}_"),
        ack_timeout: Duration::from_secs(30),
        delay_send: Duration::from_millis(0),
        ..StorageConfig::default()
    };
    match backend {
        Backend::Sqlite => {
            let dir = scratch_base().join(format!("wsmb-persist-{unique}"));
            let _ = std::fs::remove_dir_all(&dir);
            c.path = dir.join("broker.sqlite");
        }
        Backend::Mysql => c.url = mysql_url(),
        Backend::Postgres => c.url = postgres_url(),
        Backend::Memory => {}
    }
    c
}

fn table(c: &StorageConfig) -> String {
    let t = format!("{}data", c.prefix);
    if c.backend == Backend::Postgres {
        t.to_lowercase()
    } else {
        t
    }
}

/// Runs one statement (test set-up) directly on the database.
pub async fn exec(c: &StorageConfig, sql: &str) {
    match c.backend {
        Backend::Sqlite => {
            if let Some(d) = c.path.parent() {
                std::fs::create_dir_all(d).expect("dir");
            }
            let conn = rusqlite::Connection::open(&c.path).expect("sqlite");
            conn.execute_batch(sql).expect("statement");
        }
        // One connection per statement, closed right after: many tests run at once and a pool
        // per call would leave connections lingering past the server's limit.
        Backend::Mysql => {
            use sqlx::Connection;
            let mut conn = sqlx::MySqlConnection::connect(&c.url)
                .await
                .unwrap_or_else(|e| panic!("MariaDB at {} (started by .ci/run): {e}", c.url));
            sqlx::query(sql)
                .execute(&mut conn)
                .await
                .expect("statement");
            let _ = conn.close().await;
        }
        Backend::Postgres => {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&c.url)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL at {} (started by .ci/run): {e}", c.url));
            sqlx::query(sql)
                .execute(&mut conn)
                .await
                .expect("statement");
            let _ = conn.close().await;
        }
        Backend::Memory => {}
    }
}

/// Rows in the table.
pub async fn rows(c: &StorageConfig) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM {}", table(c));
    match c.backend {
        Backend::Sqlite => {
            let conn = rusqlite::Connection::open(&c.path).expect("sqlite");
            conn.query_row(&sql, [], |r| r.get(0)).expect("count")
        }
        Backend::Mysql => {
            use sqlx::Connection;
            let mut conn = sqlx::MySqlConnection::connect(&c.url).await.expect("mysql");
            let n = sqlx::query(&sql)
                .fetch_one(&mut conn)
                .await
                .expect("count")
                .get::<i64, _>(0);
            let _ = conn.close().await;
            n
        }
        Backend::Postgres => {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&c.url).await.expect("postgres");
            let n = sqlx::query(&sql)
                .fetch_one(&mut conn)
                .await
                .expect("count")
                .get::<i64, _>(0);
            let _ = conn.close().await;
            n
        }
        Backend::Memory => 0,
    }
}

/// Waits until the table holds `n` rows.
pub async fn wait_rows(c: &StorageConfig, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = rows(c).await;
        if got == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "table has {got} rows, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates the table exactly as the original WSMessageBrocker documented it and inserts rows
/// the way it stored them: one row per item, `data` the item's JSON.
pub async fn legacy_rows(c: &StorageConfig, channel: &str, items: &[&str]) {
    let t = table(c);
    let create = match c.backend {
        Backend::Mysql => format!(
            "CREATE TABLE `{t}` (
             `data_id` bigint(20) NOT NULL AUTO_INCREMENT,
             `channel` varchar(100) DEFAULT NULL,
             `data` longtext,
             `created` datetime DEFAULT NULL,
             PRIMARY KEY (`data_id`),
             KEY `channel` (`channel`)
            ) ENGINE=InnoDB DEFAULT CHARSET=latin1"
        ),
        Backend::Postgres => format!(
            "CREATE TABLE {t} (data_id BIGSERIAL PRIMARY KEY, channel VARCHAR(100), data TEXT, created TIMESTAMP)"
        ),
        _ => format!(
            "CREATE TABLE {t} (data_id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT, data TEXT, created TEXT)"
        ),
    };
    exec(c, &create).await;
    for item in items {
        let now = if c.backend == Backend::Sqlite {
            "datetime('now')"
        } else {
            "now()"
        };
        let escaped = item.replace('\'', "''");
        exec(
            c,
            &format!(
                "INSERT INTO {t}(channel, data, created) VALUES ('{channel}', '{escaped}', {now})"
            ),
        )
        .await;
    }
}

/// Drops the test's table.
pub async fn cleanup(c: &StorageConfig) {
    match c.backend {
        Backend::Sqlite => {
            if let Some(d) = c.path.parent() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        Backend::Mysql | Backend::Postgres => {
            exec(c, &format!("DROP TABLE IF EXISTS {}", table(c))).await;
        }
        Backend::Memory => {}
    }
}
