//! The real MariaDB and PostgreSQL servers stopped and started under traffic: the broker keeps
//! serving live traffic, refuses what it cannot store with a clear error, reports the state, and
//! recovers by itself. The servers are stopped with WSMB_TEST_{MYSQL,PG}_{STOP,START} (default:
//! `service mariadb stop` ...), which `.ci/run` can run as root.

mod common;

use std::time::Duration;

use common::db;
use common::*;
use wsmb_broker::config::Backend;
use wsmb_protocol::reply::{BrokerReply, SendResult};

fn server(backend: Backend, action: &str) {
    let (var, default) = match (backend, action) {
        (Backend::Mysql, "stop") => ("WSMB_TEST_MYSQL_STOP", "service mariadb stop"),
        (Backend::Mysql, _) => ("WSMB_TEST_MYSQL_START", "service mariadb start"),
        (_, "stop") => ("WSMB_TEST_PG_STOP", "service postgresql stop"),
        (_, _) => ("WSMB_TEST_PG_START", "service postgresql start"),
    };
    let cmd = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    let st = std::process::Command::new("sh")
        .args(["-c", &cmd])
        .status()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(st.success(), "{cmd} failed ({var} sets the command)");
}

/// Starts the server again even when the test fails half-way.
struct Restart(Backend);

impl Drop for Restart {
    fn drop(&mut self) {
        server(self.0, "start");
    }
}

/// Next frame, allowing for a database that takes a while to time out.
async fn slow_text(ws: &mut Ws) -> String {
    recv_text_within(ws, Duration::from_secs(20))
        .await
        .expect("a frame within 20s")
}

async fn result(ws: &mut Ws) -> (String, SendResult) {
    loop {
        let t = slow_text(ws).await;
        if let Some(r) = BrokerReply::parse(&t) {
            if r.command == "send-result" {
                return (r.response_code.clone(), r.first().expect("result"));
            }
        }
    }
}

async fn ping(ws: &mut Ws) -> (String, String) {
    send(ws, r#"{"command":"ping"}"#).await;
    loop {
        let t = slow_text(ws).await;
        if let Some(r) = BrokerReply::parse(&t) {
            if r.command == "connect" {
                let storage = r.data[0]["storage"].as_str().unwrap_or_default().to_owned();
                return (r.response_code, storage);
            }
        }
    }
}

async fn healthz(addr: std::net::SocketAddr) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    serde_json::from_str(out.split("\r\n\r\n").nth(1).expect("body")).expect("json")
}

async fn database_stopped_and_started_under_traffic(backend: Backend) {
    let mut st = db::storage(backend, "outage");
    st.reconnect_max = Duration::from_secs(1);
    let st2 = st.clone();
    let b = broker_with(move |c| c.storage = st2).await;
    let mut live = connect(b.addr).await;
    receive_on(&mut live, "live").await;
    let mut tx = connect(b.addr).await;

    send(&mut tx, &sms("sms", "stored-before")).await;
    let (code, r) = result(&mut tx).await;
    assert_eq!((code.as_str(), r.stored), ("00", Some(true)));
    db::wait_rows(&st, 1).await;

    server(backend, "stop");
    let _restart = Restart(backend);

    // live traffic goes on, unstored and saying so
    let mut saw_down = false;
    for i in 0..20 {
        send(&mut tx, &sms("live", &format!("live-{i}"))).await;
        let (code, r) = result(&mut tx).await;
        assert_eq!(
            code, "00",
            "live delivery refused while the database is down"
        );
        assert!(slow_text(&mut live).await.contains(&format!("live-{i}")));
        if r.stored == Some(false) {
            saw_down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(saw_down, "the broker never noticed the database was down");
    // what cannot be delivered now is refused with a clear error, not lost silently
    send(&mut tx, &sms("nobody", "would-be-lost")).await;
    let (code, r) = result(&mut tx).await;
    assert_eq!(code, "05");
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|x| x.contains("cannot be stored")),
        "{r:?}"
    );
    let (code, storage) = ping(&mut tx).await;
    assert_eq!(code, "01");
    assert!(storage.starts_with("down: "), "{storage}");
    let h = healthz(b.addr).await;
    assert_eq!(h["status"], "degraded", "{h}");
    // the message stored before the outage lives in the database: a receiver that comes
    // during the outage waits for it (nothing is lost, nothing is delivered from memory)
    let mut acker = connect(b.addr).await;
    send(
        &mut acker,
        r#"{"command":"receive-message","channel":"sms","protocol":2,"ack":true}"#,
    )
    .await;
    expect_silence(&mut acker, Duration::from_millis(500)).await;

    drop(_restart); // start the server
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, _) = ping(&mut tx).await;
        if code == "00" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // back: the stored message is delivered (once) and acknowledged
    let t = slow_text(&mut acker).await;
    let d = wsmb_protocol::reply::Delivery::parse(&t).unwrap_or_else(|| panic!("{t}"));
    assert!(d.frame.get().contains("stored-before"));
    send(
        &mut acker,
        &format!(r#"{{"command":"ack","data":["{}"]}}"#, d.message_id),
    )
    .await;
    send(&mut tx, &sms("nobody", "stored-after")).await;
    let (code, r) = result(&mut tx).await;
    assert_eq!((code.as_str(), r.stored), ("00", Some(true)));
    db::wait_rows(&st, 1).await; // "stored-before" deleted, "stored-after" kept
    let h = healthz(b.addr).await;
    assert_eq!(h["status"], "ok", "{h}");
    b.shared.shutdown.cancel();
    db::cleanup(&st).await;
}

/// Messages stored by one run of the broker; the next run starts while the database is down,
/// with a receiver waiting: when the database comes back, each stored message is delivered
/// exactly once (the previous engine loaded them again on reconnection and could deliver a
/// message twice).
async fn a_restart_with_the_database_down_delivers_each_stored_message_once(backend: Backend) {
    let mut st = db::storage(backend, "restartdown");
    st.reconnect_max = Duration::from_secs(1);
    let st2 = st.clone();
    let b = broker_with(move |c| c.storage = st2).await;
    let mut tx = connect(b.addr).await;
    for i in 0..10 {
        send(&mut tx, &sms("later", &format!("m{i}"))).await;
        let (code, r) = result(&mut tx).await;
        assert_eq!((code.as_str(), r.stored), ("00", Some(true)));
    }
    db::wait_rows(&st, 10).await;
    b.shared.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), b.task).await;

    server(backend, "stop");
    let restart = Restart(backend);
    let st2 = st.clone();
    let b = broker_with(move |c| c.storage = st2).await;
    let mut rx = connect(b.addr).await;
    send(
        &mut rx,
        r#"{"command":"receive-message","channel":"later","protocol":2,"ack":true,"window":100}"#,
    )
    .await;
    expect_silence(&mut rx, Duration::from_millis(500)).await;
    drop(restart); // the database comes back

    let mut ids = std::collections::BTreeSet::new();
    let mut items = Vec::new();
    for _ in 0..10 {
        let t = slow_text(&mut rx).await;
        let d = wsmb_protocol::reply::Delivery::parse(&t).unwrap_or_else(|| panic!("{t}"));
        assert_eq!(d.delivery, 1, "{t}");
        assert!(ids.insert(d.message_id.clone()), "delivered twice: {t}");
        items.push(d.frame.get().to_owned());
        send(
            &mut rx,
            &format!(r#"{{"command":"ack","data":["{}"]}}"#, d.message_id),
        )
        .await;
    }
    items.sort();
    let mut want: Vec<String> = (0..10).map(|i| sms("later", &format!("m{i}"))).collect();
    want.sort();
    assert_eq!(items, want);
    expect_silence(&mut rx, Duration::from_millis(1500)).await;
    db::wait_rows(&st, 0).await;
    b.shared.shutdown.cancel();
    db::cleanup(&st).await;
}

// One test per server: the scenarios stop and start it, so they run one after the other.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_outage() {
    database_stopped_and_started_under_traffic(Backend::Mysql).await;
    a_restart_with_the_database_down_delivers_each_stored_message_once(Backend::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage() {
    database_stopped_and_started_under_traffic(Backend::Postgres).await;
    a_restart_with_the_database_down_delivers_each_stored_message_once(Backend::Postgres).await;
}
