//! Store-and-forward and acknowledged delivery, the same suite against every database backend:
//! SQLite, and the real MariaDB and PostgreSQL servers started by `.ci/run`.

mod common;

use std::time::{Duration, Instant};

use common::db;
use common::*;
use wsmb_broker::Running;
use wsmb_broker::config::{Backend, StorageConfig};
use wsmb_protocol::reply::{BrokerReply, Delivery, SendResult};

async fn start(st: &StorageConfig, f: impl FnOnce(&mut wsmb_broker::Config)) -> Running {
    let st = st.clone();
    broker_with(move |c| {
        c.storage = st;
        f(c);
    })
    .await
}

async fn stop(b: Running) {
    b.shared.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), b.task).await;
}

/// A receiver: its connection, and frames that arrived while it was registering.
struct Rcv {
    ws: Ws,
    early: std::collections::VecDeque<String>,
}

impl Rcv {
    /// Registers with `request`, and waits (ping round trip) until the broker has it; messages
    /// that arrive meanwhile are kept.
    async fn register(addr: std::net::SocketAddr, request: &str) -> Rcv {
        let mut ws = connect(addr).await;
        send(&mut ws, request).await;
        send(&mut ws, r#"{"command":"ping"}"#).await;
        let mut early = std::collections::VecDeque::new();
        loop {
            let t = recv_text(&mut ws).await;
            if t.starts_with(r#"{"command":"connect""#) {
                return Rcv { ws, early };
            }
            early.push_back(t);
        }
    }

    async fn recv(&mut self) -> String {
        match self.early.pop_front() {
            Some(t) => t,
            None => recv_text(&mut self.ws).await,
        }
    }

    async fn silence(&mut self, d: Duration) {
        assert!(self.early.is_empty(), "unexpected {:?}", self.early);
        expect_silence(&mut self.ws, d).await;
    }
}

/// A protocol-2 receiver in acknowledged mode.
async fn ack_receiver(addr: std::net::SocketAddr, channel: &str, window: Option<u32>) -> Rcv {
    let w = window
        .map(|w| format!(",\"window\":{w}"))
        .unwrap_or_default();
    Rcv::register(
        addr,
        &format!(
            r#"{{"command":"receive-message","channel":"{channel}","protocol":2,"ack":true{w}}}"#
        ),
    )
    .await
}

/// A legacy receiver.
async fn legacy_receiver(addr: std::net::SocketAddr, channel: &str) -> Rcv {
    Rcv::register(
        addr,
        &format!(r#"{{"command":"receive-message","channel":"{channel}"}}"#),
    )
    .await
}

async fn next_delivery(r: &mut Rcv) -> (String, u32, String) {
    let t = r.recv().await;
    let d = Delivery::parse(&t).unwrap_or_else(|| panic!("not a delivery: {t}"));
    (d.message_id, d.delivery, d.frame.get().to_owned())
}

async fn ack(r: &mut Rcv, ids: &[&str]) {
    let list: Vec<String> = ids.iter().map(|i| format!("\"{i}\"")).collect();
    send(
        &mut r.ws,
        &format!(r#"{{"command":"ack","data":[{}]}}"#, list.join(",")),
    )
    .await;
}

async fn send_ok(ws: &mut Ws, frame: &str) -> SendResult {
    send(ws, frame).await;
    loop {
        let t = recv_text(ws).await;
        if let Some(r) = BrokerReply::parse(&t) {
            if r.command == "send-result" {
                assert_eq!(r.response_code, "00", "{t}");
                return r.first().expect("result");
            }
        }
    }
}

async fn stored_while_nobody_listens_then_delivered(backend: Backend) {
    let st = db::storage(backend, "fwd");
    let b = start(&st, |_| {}).await;
    let mut tx = connect(b.addr).await;
    let frame = sms("sms", "later");
    let r = send_ok(&mut tx, &frame).await;
    assert_eq!((r.receivers, r.stored), (0, Some(true)));
    db::wait_rows(&st, 1).await;
    let mut rx = legacy_receiver(b.addr, "sms").await;
    assert_eq!(
        rx.recv().await,
        frame,
        "a lone stored message goes byte for byte"
    );
    db::wait_rows(&st, 0).await;
    // a live message to an online legacy receiver: byte for byte, nothing left behind
    let r = send_ok(&mut tx, &sms("sms", "live")).await;
    assert_eq!((r.receivers, r.stored), (1, Some(true)));
    assert_eq!(rx.recv().await, sms("sms", "live"));
    db::wait_rows(&st, 0).await;
    stop(b).await;
    db::cleanup(&st).await;
}

async fn legacy_backlog_in_frames_of_limit_at_the_speed_of_the_socket(backend: Backend) {
    let mut st = db::storage(backend, "batch");
    st.limit = 2;
    st.delay_send = Duration::from_millis(300);
    let b = start(&st, |_| {}).await;
    let mut tx = connect(b.addr).await;
    for i in 0..5 {
        send_ok(&mut tx, &sms("sms", &format!("b{i}"))).await;
    }
    db::wait_rows(&st, 5).await;
    let mut rx = connect(b.addr).await;
    let registered = Instant::now();
    send(&mut rx, r#"{"command":"receive-message","channel":"sms"}"#).await;
    let mut sizes = Vec::new();
    let mut ids = Vec::new();
    let mut times = Vec::new();
    while ids.len() < 5 {
        let t = recv_text(&mut rx).await;
        if t.contains("\"connect\"") {
            continue;
        }
        times.push(Instant::now());
        let v: serde_json::Value = serde_json::from_str(&t).expect("json");
        assert_eq!(v["command"], "send-message");
        assert_eq!(v["channel"], "sms");
        let data = v["data"].as_array().expect("data");
        sizes.push(data.len());
        ids.extend(
            data.iter()
                .map(|i| i["id"].as_str().expect("id").to_owned()),
        );
    }
    assert_eq!(
        sizes,
        vec![2, 2, 1],
        "frames of at most storage.limit items"
    );
    assert_eq!(ids, vec!["b0", "b1", "b2", "b3", "b4"], "in order");
    // the first frame waits delay_send (the original's pause before its flush)...
    assert!(
        times[0] - registered >= Duration::from_millis(250),
        "first frame after {:?}",
        times[0] - registered
    );
    // ...the others follow as fast as the receiver reads: no timer between them
    assert!(
        times[2] - times[0] < Duration::from_millis(300),
        "frames {:?} apart",
        times[2] - times[0]
    );
    db::wait_rows(&st, 0).await;
    stop(b).await;
    db::cleanup(&st).await;
}

async fn acknowledged_delivery_redelivers_after_disconnect(backend: Backend) {
    let st = db::storage(backend, "ack");
    let b = start(&st, |_| {}).await;
    let mut a = ack_receiver(b.addr, "sms", None).await;
    let mut tx = connect(b.addr).await;
    let frame = sms("sms", "otp-1");
    let r = send_ok(&mut tx, &frame).await;
    assert_eq!((r.receivers, r.stored), (1, Some(true)));
    let (id, n, got) = next_delivery(&mut a).await;
    assert_eq!(
        (id.as_str(), n, got.as_str()),
        (r.message_id.as_str(), 1, frame.as_str())
    );
    // a crashes before acknowledging
    drop(a);
    let mut bb = ack_receiver(b.addr, "sms", None).await;
    let (id2, n2, got2) = next_delivery(&mut bb).await;
    assert_eq!(
        (id2.as_str(), n2, got2.as_str()),
        (id.as_str(), 2, frame.as_str())
    );
    assert_eq!(db::rows(&st).await, 1, "deleted before it was acknowledged");
    ack(&mut bb, &[&id2]).await;
    db::wait_rows(&st, 0).await;
    // acknowledging again is harmless
    ack(&mut bb, &[&id2, "no-such-id"]).await;
    send(&mut bb.ws, r#"{"command":"ping"}"#).await;
    assert_eq!(reply(&mut bb.ws).await.response_code, "00");
    stop(b).await;
    db::cleanup(&st).await;
}

async fn ack_timeout_moves_the_message_on(backend: Backend) {
    let mut st = db::storage(backend, "timeout");
    st.ack_timeout = Duration::from_millis(800);
    let b = start(&st, |_| {}).await;
    let mut a = ack_receiver(b.addr, "sms", None).await;
    let mut tx = connect(b.addr).await;
    send_ok(&mut tx, &sms("sms", "slow")).await;
    let (id, _, _) = next_delivery(&mut a).await;
    let mut c = ack_receiver(b.addr, "sms", None).await;
    // a sits on it: after the timeout it goes to c
    let (id2, n2, _) = next_delivery(&mut c).await;
    assert_eq!((id2.as_str(), n2), (id.as_str(), 2));
    ack(&mut c, &[&id2]).await;
    db::wait_rows(&st, 0).await;
    stop(b).await;
    db::cleanup(&st).await;
}

async fn window_bounds_unacknowledged_messages(backend: Backend) {
    let st = db::storage(backend, "window");
    let b = start(&st, |_| {}).await;
    let mut a = ack_receiver(b.addr, "sms", Some(2)).await;
    let mut tx = connect(b.addr).await;
    for i in 0..5 {
        send_ok(&mut tx, &sms("sms", &format!("w{i}"))).await;
    }
    let (id0, _, _) = next_delivery(&mut a).await;
    let (id1, _, _) = next_delivery(&mut a).await;
    a.silence(Duration::from_millis(400)).await;
    ack(&mut a, &[&id0]).await;
    let (id2, _, f2) = next_delivery(&mut a).await;
    assert!(f2.contains("w2"), "{f2}");
    ack(&mut a, &[&id1, &id2]).await;
    for _ in 0..2 {
        let (id, _, _) = next_delivery(&mut a).await;
        ack(&mut a, &[&id]).await;
    }
    db::wait_rows(&st, 0).await;
    stop(b).await;
    db::cleanup(&st).await;
}

async fn expired_messages_are_never_delivered_late(backend: Backend) {
    let st = db::storage(backend, "expiry");
    let b = start(&st, |_| {}).await;
    let mut tx = connect(b.addr).await;
    // ttl 3 s: long enough that a loaded database stores it before it expires (with 1 s, a
    // MariaDB commit on a busy machine outlasted it and the broker rightly answered 06).
    let r = send_ok(
        &mut tx,
        r#"{"command":"send-message","channel":"sms","ttl":3,"report":true,"protocol":2,"data":[{"id":"short","message":"code 1"}]}"#,
    )
    .await;
    assert_eq!(r.stored, Some(true));
    let t = recv_text_within(&mut tx, Duration::from_secs(15))
        .await
        .expect("expired report");
    let rep = BrokerReply::parse(&t).expect("reply");
    assert_eq!(
        (rep.command.as_str(), rep.response_code.as_str()),
        ("expired", "06")
    );
    let data: wsmb_protocol::reply::ExpiredData = rep.first().expect("data");
    assert_eq!(
        (data.message_id, data.ids),
        (r.message_id, vec!["short".to_owned()])
    );
    let mut rx = legacy_receiver(b.addr, "sms").await;
    rx.silence(Duration::from_millis(500)).await;
    db::wait_rows(&st, 0).await;
    // already expired on arrival: refused, not stored
    send(
        &mut tx,
        r#"{"command":"send-message","channel":"sms","expires_at":1000,"data":[{"id":"old"}]}"#,
    )
    .await;
    let rep = reply(&mut tx).await;
    assert_eq!(rep.response_code, "06");
    assert_eq!(
        b.shared
            .stats
            .expired
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    stop(b).await;
    db::cleanup(&st).await;
}

async fn caps_refuse_new_messages_and_drop_nothing(backend: Backend) {
    let mut st = db::storage(backend, "caps");
    st.max_stored_per_channel = 3;
    let b = start(&st, |_| {}).await;
    let mut tx = connect(b.addr).await;
    for i in 0..3 {
        send_ok(&mut tx, &sms("sms", &format!("c{i}"))).await;
    }
    send(&mut tx, &sms("sms", "c3")).await;
    let r = reply(&mut tx).await;
    assert_eq!(
        (r.command.as_str(), r.response_code.as_str()),
        ("send-result", "04")
    );
    let res: SendResult = r.first().expect("result");
    assert!(
        res.reason
            .as_deref()
            .is_some_and(|x| x.contains("max_stored_per_channel"))
    );
    // another channel is not affected
    send_ok(&mut tx, &sms("other", "o")).await;
    let mut rx = ack_receiver(b.addr, "sms", None).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let (id, _, f) = next_delivery(&mut rx).await;
        got.push(f);
        ack(&mut rx, &[&id]).await;
    }
    assert!(got[0].contains("c0") && got[2].contains("c2"));
    db::wait_rows(&st, 1).await;
    send_ok(&mut tx, &sms("sms", "c4")).await;
    stop(b).await;
    db::cleanup(&st).await;
}

async fn acknowledged_sends_survive_a_restart(backend: Backend) {
    let st = db::storage(backend, "restart");
    let b = start(&st, |_| {}).await;
    let mut tx = connect(b.addr).await;
    let mut sent = Vec::new();
    for i in 0..20 {
        let text = format!("r{i} é 😀 {}", "x".repeat(i * 50));
        let frame = format!(
            r#"{{"command":"send-message","channel":"sms","data":[{{"id":"r{i}","message":"{text}"}}]}}"#
        );
        let r = send_ok(&mut tx, &frame).await;
        assert_eq!(r.stored, Some(true));
        sent.push((r.message_id, frame));
    }
    stop(b).await;
    let b = start(&st, |_| {}).await;
    let mut rx = ack_receiver(b.addr, "sms", Some(100)).await;
    let mut got = Vec::new();
    for _ in 0..20 {
        let (id, _, frame) = next_delivery(&mut rx).await;
        got.push((id.clone(), frame));
        ack(&mut rx, &[&id]).await;
    }
    got.sort();
    sent.sort();
    assert_eq!(
        got, sent,
        "every acknowledged send, byte for byte, with its id"
    );
    db::wait_rows(&st, 0).await;
    stop(b).await;
    db::cleanup(&st).await;
}

async fn rows_left_by_the_original_broker_are_delivered(backend: Backend) {
    let st = db::storage(backend, "legacy");
    let items = [
        r#"{"id":"6560a1","time":1700000000,"receiver":"08126666666","message":"Halo 1"}"#,
        r#"{"id":"6560a2","time":1700000001,"receiver":"08126666667","message":"Halo 2"}"#,
        r#"{"id":"6560a3","time":1700000002,"receiver":"08126666668","message":"Halo 3"}"#,
    ];
    db::legacy_rows(&st, "sms", &items).await;
    let b = start(&st, |_| {}).await;
    let mut rx = legacy_receiver(b.addr, "sms").await;
    let t = rx.recv().await;
    let v: serde_json::Value = serde_json::from_str(&t).expect("json");
    assert_eq!(v["command"], "send-message");
    assert_eq!(v["channel"], "sms");
    let want: Vec<serde_json::Value> = items
        .iter()
        .map(|i| serde_json::from_str(i).expect("item"))
        .collect();
    assert_eq!(v["data"].as_array().expect("data"), &want);
    db::wait_rows(&st, 0).await;
    // and the migrated table takes new, non-Latin messages
    let mut tx = connect(b.addr).await;
    send_ok(&mut tx, &sms("nobody", "مرحبا 😀")).await;
    db::wait_rows(&st, 1).await;
    stop(b).await;
    db::cleanup(&st).await;
}

async fn a_sender_that_writes_and_closes_loses_nothing(backend: Backend) {
    use tokio::io::AsyncWriteExt;
    let st = db::storage(backend, "fireforget");
    let b = start(&st, |_| {}).await;
    let mut s = raw_upgraded(b.addr).await;
    for i in 0..3 {
        let f = format!(r#"{{"command":"send-message","channel":"ff","data":[{{"id":"{i}"}}]}}"#);
        s.write_all(&masked_text(&f)).await.expect("write");
    }
    // no close frame, no reading: only the end of its half of the connection
    s.shutdown().await.expect("shutdown");
    db::wait_rows(&st, 3).await;
    let mut rx = ack_receiver(b.addr, "ff", None).await;
    for i in 0..3 {
        let (id, _, f) = next_delivery(&mut rx).await;
        assert!(f.contains(&format!("\"id\":\"{i}\"")), "{f}");
        ack(&mut rx, &[&id]).await;
    }
    db::wait_rows(&st, 0).await;
    stop(b).await;
    db::cleanup(&st).await;
}

async fn a_lagging_legacy_receiver_catches_up_with_nothing_left_behind(backend: Backend) {
    use futures_util::StreamExt;
    let st = db::storage(backend, "lag");
    let b = start(&st, |c| {
        // small queues, so that the backlog goes to the store soon
        c.server.max_message_bytes = 64 * 1024;
        c.server.outgoing_queue_bytes = 64 * 1024;
        c.server.outgoing_queue = 64;
    })
    .await;
    let mut rx = legacy_receiver(b.addr, "lag").await;
    let tx = connect(b.addr).await;
    // more than the socket buffers and the queue hold, so that the receiver falls behind
    let n = 10_000;
    let payload = "p".repeat(1000);
    // pipelined sends while the receiver reads nothing
    let (mut sink, mut replies) = tx.split();
    let sender = tokio::spawn(async move {
        use futures_util::SinkExt;
        for i in 0..n {
            let f = format!(
                r#"{{"command":"send-message","channel":"lag","data":[{{"id":"{i}","m":"{payload}"}}]}}"#
            );
            sink.feed(tokio_tungstenite::tungstenite::Message::text(f))
                .await
                .expect("send");
        }
        sink.flush().await.expect("flush");
        sink
    });
    let mut ok = 0;
    while ok < n {
        let t = match replies.next().await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            other => panic!("sender connection ended: {other:?}"),
        };
        let r = BrokerReply::parse(&t).expect("reply");
        if r.command == "send-result" {
            assert_eq!(r.response_code, "00", "{t}");
            ok += 1;
        }
    }
    let _sink = sender.await.expect("sender");
    // now it reads: every message, once, in order
    let mut got = Vec::with_capacity(n);
    let mut from_store = 0;
    while got.len() < n {
        let t = rx.recv().await;
        let v: serde_json::Value = serde_json::from_str(&t).expect("json");
        let data = v["data"].as_array().expect("data");
        if data.len() > 1 {
            // a frame rebuilt from stored rows: the receiver had fallen behind
            from_store += 1;
        }
        for item in data {
            got.push(
                item["id"]
                    .as_str()
                    .expect("id")
                    .parse::<usize>()
                    .expect("n"),
            );
        }
    }
    assert!(
        from_store > 0,
        "the receiver never fell behind; the test proves nothing"
    );
    if let Some(at) = got.iter().enumerate().position(|(i, g)| *g != i) {
        panic!(
            "not every message once, in order: at {at}: {:?}",
            &got[at.saturating_sub(3)..(at + 5).min(got.len())]
        );
    }
    assert_eq!(got.len(), n);
    rx.silence(Duration::from_millis(300)).await;
    db::wait_rows(&st, 0).await;
    assert_eq!(b.shared.engine.store().expect("store").stored(), 0);
    stop(b).await;
    db::cleanup(&st).await;
}

async fn stored_messages_of_900_kb_reach_a_legacy_receiver(backend: Backend) {
    let st = db::storage(backend, "big");
    let b = start(&st, |_| {}).await;
    let mut tx = connect(b.addr).await;
    let mut sent = Vec::new();
    for i in 0..3 {
        let frame = format!(
            r#"{{"command":"send-message","channel":"big","data":[{{"id":"big{i}","m":"{}"}}]}}"#,
            "x".repeat(900 * 1024)
        );
        let r = send_ok(&mut tx, &frame).await;
        assert_eq!((r.receivers, r.stored), (0, Some(true)));
        sent.push(frame);
    }
    db::wait_rows(&st, 3).await;
    // three stored messages of 900 KB: never one frame of 2.7 MB, each goes alone, verbatim
    let mut rx = legacy_receiver(b.addr, "big").await;
    for frame in &sent {
        let got = rx.recv().await;
        assert_eq!(got.len(), frame.len());
        assert!(got == *frame, "a stored message alone goes byte for byte");
    }
    db::wait_rows(&st, 0).await;
    // and the receiver is still there for the next one
    let r = send_ok(&mut tx, &sms("big", "after")).await;
    assert_eq!(r.receivers, 1);
    assert!(rx.recv().await.contains("after"));
    stop(b).await;
    db::cleanup(&st).await;
}

async fn a_huge_batch_is_answered_without_a_drop(backend: Backend) {
    let st = db::storage(backend, "huge");
    let b = start(&st, |_| {}).await;
    let mut rx = legacy_receiver(b.addr, "huge").await;
    let mut tx = connect(b.addr).await;
    let items = vec!["{}"; 60_000].join(",");
    let frame = format!(r#"{{"command":"send-message","channel":"huge","data":[{items}]}}"#);
    send(&mut tx, &frame).await;
    let t = recv_text(&mut tx).await;
    assert!(t.len() < 4096, "the reply is {} bytes", t.len());
    let r = BrokerReply::parse(&t).expect("reply");
    assert_eq!(
        (r.command.as_str(), r.response_code.as_str()),
        ("send-result", "00")
    );
    let res: SendResult = r.first().expect("result");
    assert_eq!((res.ids.len(), res.ids_omitted), (0, Some(60_000)));
    assert_eq!(res.receivers, 1);
    // delivered once, and the sender is still connected
    assert_eq!(rx.recv().await, frame);
    send(&mut tx, r#"{"command":"ping"}"#).await;
    assert_eq!(reply(&mut tx).await.command, "connect");
    rx.silence(Duration::from_millis(300)).await;
    db::wait_rows(&st, 0).await;
    stop(b).await;
    db::cleanup(&st).await;
}

async fn empty_data_gets_the_same_error_as_in_memory_mode(backend: Backend) {
    let st = db::storage(backend, "emptydata");
    let b = start(&st, |_| {}).await;
    let mut tx = connect(b.addr).await;
    send(
        &mut tx,
        r#"{"command":"send-message","channel":"sms","data":[]}"#,
    )
    .await;
    let r = reply(&mut tx).await;
    assert_eq!(
        (r.command.as_str(), r.response_code.as_str()),
        ("error", "15")
    );
    assert_eq!(db::rows(&st).await, 0, "nothing stored");
    stop(b).await;
    db::cleanup(&st).await;
}

async fn receivers_counts_every_receiver_that_got_it(backend: Backend) {
    let st = db::storage(backend, "count");
    let b = start(&st, |_| {}).await;
    let mut rxs = Vec::new();
    for _ in 0..3 {
        rxs.push(legacy_receiver(b.addr, "fan").await);
    }
    let mut tx = connect(b.addr).await;
    let r = send_ok(&mut tx, &sms("fan", "all")).await;
    assert_eq!((r.receivers, r.stored), (3, Some(true)));
    for rx in &mut rxs {
        assert_eq!(rx.recv().await, sms("fan", "all"));
    }
    db::wait_rows(&st, 0).await;
    stop(b).await;
    db::cleanup(&st).await;
}

async fn a_message_for_every_receiver_reaches_them_all_with_a_backlog_waiting(backend: Backend) {
    // A stored row goes to one receiver; a message for all of them (number_of_receiver 0, the
    // default) must not become one: it goes to every receiver online even while older stored
    // messages wait (seen losing half the copies of a 4 -> 4 flood).
    let mut st = db::storage(backend, "fanbacklog");
    st.delay_send = Duration::from_secs(3);
    let b = start(&st, |_| {}).await;
    let mut tx = connect(b.addr).await;
    let r = send_ok(&mut tx, &sms("fan", "old")).await;
    assert_eq!(r.receivers, 0);
    // three legacy receivers, whose backlog flush waits delay_send: the old row stays pending
    let mut rxs = Vec::new();
    for _ in 0..3 {
        rxs.push(legacy_receiver(b.addr, "fan").await);
    }
    let r = send_ok(&mut tx, &sms("fan", "new")).await;
    assert_eq!(r.receivers, 3);
    for rx in &mut rxs {
        let t = recv_text_within(&mut rx.ws, Duration::from_secs(2))
            .await
            .expect("the message for everyone, before the backlog flush");
        assert_eq!(t, sms("fan", "new"));
    }
    // the old one goes to one of them, later
    let mut old = 0;
    for rx in &mut rxs {
        if let Some(t) = recv_text_within(&mut rx.ws, Duration::from_secs(5)).await {
            assert_eq!(t, sms("fan", "old"));
            old += 1;
            break;
        }
    }
    assert_eq!(old, 1);
    db::wait_rows(&st, 0).await;
    stop(b).await;
    db::cleanup(&st).await;
}

macro_rules! per_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Mysql).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await
                }
            )*
        }
    };
}

per_backend!(
    stored_while_nobody_listens_then_delivered,
    legacy_backlog_in_frames_of_limit_at_the_speed_of_the_socket,
    acknowledged_delivery_redelivers_after_disconnect,
    ack_timeout_moves_the_message_on,
    window_bounds_unacknowledged_messages,
    expired_messages_are_never_delivered_late,
    caps_refuse_new_messages_and_drop_nothing,
    acknowledged_sends_survive_a_restart,
    rows_left_by_the_original_broker_are_delivered,
    a_sender_that_writes_and_closes_loses_nothing,
    a_lagging_legacy_receiver_catches_up_with_nothing_left_behind,
    stored_messages_of_900_kb_reach_a_legacy_receiver,
    a_huge_batch_is_answered_without_a_drop,
    empty_data_gets_the_same_error_as_in_memory_mode,
    receivers_counts_every_receiver_that_got_it,
    a_message_for_every_receiver_reaches_them_all_with_a_backlog_waiting,
);
