//! The SMS service's document store (`<prefix>sms`) behaves alike on every backend: memory,
//! SQLite, and the real MariaDB and PostgreSQL servers started by `.ci/run`. (MariaDB reports
//! the table's `utf8mb4_bin` text columns as binary; a store that decoded them as strings
//! failed there only.)

mod common;

use common::db;
use wsmb_broker::config::Backend;
use wsmb_broker::sms::store::{Doc, DocStore, Kind, Query, Write};

fn doc(kind: Kind, id: &str, created: i64, state: &str, due: i64) -> Doc {
    Doc {
        kind,
        id: id.into(),
        owner: "app".into(),
        created,
        state: state.into(),
        due,
        body: format!("{{\"id\":\"{id}\",\"text\":\"Kode 🔐 é\"}}"),
    }
}

fn listing(owner: &str) -> Query {
    Query {
        kind: Kind::Message,
        owner: Some(owner.into()),
        state: None,
        from: None,
        to: None,
        limit: 10,
        offset: 0,
        newest_first: true,
    }
}

async fn exercise(backend: Backend) {
    let cfg = db::storage(backend, "smsdoc");
    let s = DocStore::open(&cfg).await.expect("open");
    assert_eq!(s.durable(), backend != Backend::Memory);
    let r = s
        .apply(vec![
            Write::Insert(doc(Kind::Message, "a", 1, "Pending", 0)),
            Write::Insert(doc(Kind::Message, "b", 2, "Sent", 0)),
            // an existing id is not overwritten by an insert
            Write::Insert(doc(Kind::Message, "a", 3, "Sent", 0)),
            // ids are case-sensitive: "A" is another message
            Write::Insert(doc(Kind::Message, "A", 4, "Pending", 0)),
            Write::Put(doc(Kind::Outbox, "o1", 1, "", 50)),
            Write::Put(doc(Kind::Outbox, "o2", 1, "", 10)),
            Write::Put(doc(Kind::Outbox, "o3", 1, "", 0)),
        ])
        .await
        .expect("apply");
    assert_eq!(
        r,
        vec![true, true, false, true, true, true, true],
        "{backend:?}"
    );
    let a = s.get(Kind::Message, "a").await.expect("get").expect("a");
    assert_eq!((a.created, a.state.as_str()), (1, "Pending"), "{backend:?}");
    assert_eq!(a.body, doc(Kind::Message, "a", 1, "", 0).body, "UTF-8 kept");
    assert_eq!(a.owner, "app");
    assert_eq!(a.kind, Kind::Message);
    let big_a = s.get(Kind::Message, "A").await.expect("get").expect("A");
    assert_eq!(big_a.created, 4, "{backend:?}");
    assert!(s.get(Kind::Webhook, "a").await.expect("get").is_none());

    let ids = |docs: Vec<Doc>| docs.into_iter().map(|d| d.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list(&listing("app")).await.expect("list")),
        ["A", "b", "a"]
    );
    let oldest = Query {
        newest_first: false,
        ..listing("app")
    };
    assert_eq!(ids(s.list(&oldest).await.expect("list")), ["a", "b", "A"]);
    let pending = Query {
        state: Some("Pending".into()),
        ..listing("app")
    };
    assert_eq!(ids(s.list(&pending).await.expect("list")), ["A", "a"]);
    let page = Query {
        offset: 1,
        limit: 1,
        ..listing("app")
    };
    assert_eq!(ids(s.list(&page).await.expect("list")), ["b"]);
    let window = Query {
        from: Some(2),
        to: Some(4),
        ..listing("app")
    };
    assert_eq!(ids(s.list(&window).await.expect("list")), ["b"]);
    assert!(s.list(&listing("other")).await.expect("list").is_empty());

    assert_eq!(ids(s.due(Kind::Outbox, 20, 10).await.expect("due")), ["o2"]);
    assert_eq!(
        ids(s.due(Kind::Outbox, 100, 10).await.expect("due")),
        ["o2", "o1"]
    );
    s.apply(vec![
        Write::Put(doc(Kind::Message, "a", 1, "Sent", 0)),
        Write::Delete(Kind::Outbox, "o2".into()),
    ])
    .await
    .expect("apply");
    let a = s.get(Kind::Message, "a").await.expect("get").expect("a");
    assert_eq!(a.state, "Sent", "{backend:?}");
    assert_eq!(
        ids(s.due(Kind::Outbox, 100, 10).await.expect("due")),
        ["o1"]
    );
    assert_eq!(s.count(Kind::Message, Some("app")).await.expect("n"), 3);
    assert_eq!(s.count(Kind::Message, Some("other")).await.expect("n"), 0);
    assert_eq!(s.count(Kind::Outbox, None).await.expect("n"), 2);
    s.ping().await.expect("ping");

    // What was written is there for the next start (durable backends).
    if backend != Backend::Memory {
        drop(s);
        let again = DocStore::open(&cfg).await.expect("reopen");
        assert_eq!(again.count(Kind::Message, None).await.expect("n"), 3);
        drop(again);
        cleanup(&cfg).await;
    }
}

async fn cleanup(cfg: &wsmb_broker::config::StorageConfig) {
    match cfg.backend {
        Backend::Mysql | Backend::Postgres => {
            let t = format!("{}sms", cfg.prefix);
            let t = if cfg.backend == Backend::Postgres {
                t.to_lowercase()
            } else {
                t
            };
            db::exec(cfg, &format!("DROP TABLE IF EXISTS {t}")).await;
        }
        _ => db::cleanup(cfg).await,
    }
}

#[tokio::test]
async fn memory() {
    exercise(Backend::Memory).await;
}

#[tokio::test]
async fn sqlite() {
    exercise(Backend::Sqlite).await;
}

#[tokio::test]
async fn mysql() {
    exercise(Backend::Mysql).await;
}

#[tokio::test]
async fn postgres() {
    exercise(Backend::Postgres).await;
}
