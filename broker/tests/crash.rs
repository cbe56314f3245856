//! The broker process killed with SIGKILL in the middle of a stream of sends, then restarted,
//! for every database backend: every send the broker acknowledged (`stored: true`) is delivered
//! afterwards, and a message comes again only with the id it had.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::db;
use common::process::{BrokerProcess, TempDir};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use wsmb_broker::config::{Backend, StorageConfig};
use wsmb_protocol::reply::{BrokerReply, Delivery, SendResult};

fn config_file(dir: &TempDir, st: &StorageConfig) -> String {
    let backend = format!("{:?}", st.backend).to_lowercase();
    dir.file(
        "broker.toml",
        &format!(
            "[credentials]\nlines = [\"qa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1\"]\n\
             [storage]\nbackend = \"{backend}\"\npath = \"{}\"\nurl = \"{}\"\nprefix = \"{}\"\n\
             ack_timeout = \"5s\"\n",
            st.path.display(),
            st.url,
            st.prefix
        ),
    )
}

async fn crash_and_restart(backend: Backend) {
    let st = db::storage(backend, "crash");
    let dir = TempDir::new("crash");
    let cfg = config_file(&dir, &st);
    let mut broker = BrokerProcess::spawn(&["--config", &cfg], &[]);

    // A receiver in acknowledged mode that acknowledges every other message.
    let mut rx = connect(broker.addr).await;
    send(
        &mut rx,
        r#"{"command":"receive-message","channel":"sms","protocol":2,"ack":true,"window":1000}"#,
    )
    .await;
    send(&mut rx, r#"{"command":"ping"}"#).await;
    loop {
        if recv_text(&mut rx)
            .await
            .starts_with(r#"{"command":"connect""#)
        {
            break;
        }
    }
    let acked_at: std::sync::Arc<std::sync::Mutex<HashMap<String, Instant>>> = Default::default();
    let before: std::sync::Arc<std::sync::Mutex<HashMap<String, String>>> = Default::default();
    let (a2, b2) = (acked_at.clone(), before.clone());
    let receiver = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(Ok(m)) = rx.next().await {
            let Message::Text(t) = m else { continue };
            let Some(d) = Delivery::parse(&t) else {
                continue;
            };
            b2.lock()
                .expect("lock")
                .insert(d.message_id.clone(), d.frame.get().to_owned());
            n += 1;
            if n % 2 == 0 {
                let ack = format!(r#"{{"command":"ack","data":["{}"]}}"#, d.message_id);
                if rx.send(Message::text(ack)).await.is_err() {
                    break;
                }
                a2.lock()
                    .expect("lock")
                    .insert(d.message_id, Instant::now());
            }
        }
    });

    // A sender streaming as fast as the broker acknowledges.
    let tx = connect(broker.addr).await;
    let (mut sink, mut stream) = tx.split();
    let sender = tokio::spawn(async move {
        for i in 0..100_000 {
            let f = format!(
                r#"{{"command":"send-message","channel":"sms","number_of_receiver":1,"data":[{{"id":"c{i}","message":"crash {i}"}}]}}"#
            );
            if sink.send(Message::text(f)).await.is_err() {
                break;
            }
        }
    });
    let mut confirmed: HashMap<String, String> = HashMap::new(); // item id -> message id
    while confirmed.len() < 300 {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Some(r) = BrokerReply::parse(&t) {
                    if r.command == "send-result" && r.response_code == "00" {
                        let res: SendResult = r.first().expect("result");
                        assert_eq!(res.stored, Some(true));
                        confirmed.insert(res.ids[0].clone(), res.message_id);
                    }
                }
            }
            other => panic!("sender stream ended early: {other:?}\n{}", broker.log()),
        }
    }
    broker.signal("KILL");
    let killed = Instant::now();
    // results already on the wire count too
    while let Ok(Some(Ok(Message::Text(t)))) =
        tokio::time::timeout(Duration::from_millis(500), stream.next()).await
    {
        if let Some(r) = BrokerReply::parse(&t) {
            if r.command == "send-result" && r.response_code == "00" {
                let res: SendResult = r.first().expect("result");
                confirmed.insert(res.ids[0].clone(), res.message_id);
            }
        }
    }
    sender.abort();
    receiver.abort();
    let _ = tokio::task::spawn_blocking(move || broker.wait_exit(Duration::from_secs(10))).await;

    let broker = BrokerProcess::spawn(&["--config", &cfg], &[]);
    let mut rx = connect(broker.addr).await;
    send(
        &mut rx,
        r#"{"command":"receive-message","channel":"sms","protocol":2,"ack":true,"window":1000}"#,
    )
    .await;
    let mut after: HashMap<String, String> = HashMap::new(); // message id -> frame
    while let Some(t) = recv_text_within(&mut rx, Duration::from_secs(3)).await {
        if let Some(d) = Delivery::parse(&t) {
            let ack = format!(r#"{{"command":"ack","data":["{}"]}}"#, d.message_id);
            send(&mut rx, &ack).await;
            let first = after.insert(d.message_id.clone(), d.frame.get().to_owned());
            assert!(
                first.is_none(),
                "delivered twice after the restart: {}",
                d.message_id
            );
        }
    }
    let before = before.lock().expect("lock").clone();
    let acked_at = acked_at.lock().expect("lock").clone();
    // every acknowledged send arrived, before or after the crash, under its id
    let mut missing = Vec::new();
    for (item, mid) in &confirmed {
        let frame = before.get(mid).or_else(|| after.get(mid));
        match frame {
            Some(f) => assert!(
                f.contains(&format!("\"id\":\"{item}\"")),
                "{mid} carries {f}"
            ),
            None => missing.push(item.clone()),
        }
    }
    assert!(
        missing.is_empty(),
        "{} acknowledged sends lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // a message comes again only if its acknowledgement may not have been committed
    let mut dup = HashSet::new();
    for mid in after.keys() {
        if let Some(t) = acked_at.get(mid) {
            let margin = killed.saturating_duration_since(*t);
            assert!(
                margin < Duration::from_secs(2),
                "{mid} was acknowledged {margin:?} before the crash but delivered again"
            );
            dup.insert(mid.clone());
        }
    }
    eprintln!(
        "{backend:?}: {} acknowledged sends, {} delivered before the crash, {} after ({} again)",
        confirmed.len(),
        before.len(),
        after.len(),
        dup.len()
    );
    db::cleanup(&st).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_sigkill() {
    crash_and_restart(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_survives_sigkill() {
    crash_and_restart(Backend::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_sigkill() {
    crash_and_restart(Backend::Postgres).await;
}
