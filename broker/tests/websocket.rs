//! The broker's WebSocket behaviour, with real clients on real sockets (127.0.0.1:0).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use wsmb_protocol::reply::{BrokerReply, ConnectData, ErrorData, SendResult};

fn assert_legacy_connect(text: &str, code: &str, txt: &str) {
    let prefix = format!(
        r#"{{"command":"connect","response_code":"{code}","response_text":"{txt}","data":[{{"time_stamp":""#
    );
    assert!(text.starts_with(&prefix), "{text}");
    let ts = &text[prefix.len()..text.len() - 4];
    assert!(text.ends_with(r#""}]}"#), "{text}");
    // 2026-11-28T06:19:08.000Z
    assert_eq!(ts.len(), 24, "{ts}");
    assert!(ts.ends_with(".000Z") && ts.as_bytes()[10] == b'T', "{ts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_connect_frame_has_the_legacy_shape() {
    let b = broker().await;
    let mut ws = connect_raw(b.addr, Some(QA)).await;
    let t = recv_text(&mut ws).await;
    assert_legacy_connect(&t, "00", "Accepted");
    // {SHA} users too
    let mut ws = connect_raw(b.addr, Some(SHA_USER)).await;
    assert_legacy_connect(&recv_text(&mut ws).await, "00", "Accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_credentials_get_01_then_close_1008_and_nothing_else() {
    let b = broker().await;
    let mut rx = connect(b.addr).await;
    receive_on(&mut rx, "sms").await;

    for creds in [Some(("qa", "wrong")), Some(("nobody", "x")), None] {
        let mut ws = connect_raw(b.addr, creds).await;
        // the rejected client tries to send anyway
        let _ = ws.send(Message::text(sms("sms", "sneaky"))).await;
        let t = recv_text(&mut ws).await;
        assert_legacy_connect(&t, "01", "Rejected");
        assert_eq!(expect_close(&mut ws).await, Some(1008), "{creds:?}");
    }
    expect_silence(&mut rx, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_text_and_binary_byte_for_byte_as_text() {
    let b = broker().await;
    let mut rx = connect(b.addr).await;
    receive_on(&mut rx, "sms").await;
    let mut tx = connect(b.addr).await;

    let pretty = "{\n    \"command\": \"send-message\",\n    \"channel\": \"sms\",\n    \"extra\": {\"k\": [1, 2.50, null]},\n    \"data\": [\n        {\n            \"id\": \"5f1a\",\n            \"message\": \"Halo \\u00e9 — ünïcödé 😀\"\n        }\n    ]\n}";
    tx.send(Message::text(pretty)).await.expect("send");
    assert_eq!(recv_text(&mut rx).await, pretty);
    assert_eq!(reply(&mut tx).await.command, "send-result");

    // binary frames (the legacy PHP client) arrive as text frames with the same bytes
    tx.send(Message::binary(pretty.as_bytes().to_vec()))
        .await
        .expect("send");
    let m = tokio::time::timeout(Duration::from_secs(5), rx.next())
        .await
        .expect("in time")
        .expect("frame")
        .expect("ok");
    match m {
        Message::Text(t) => assert_eq!(t.as_str(), pretty),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_gets_a_send_result_with_ids() {
    let b = broker().await;
    let mut rx1 = connect(b.addr).await;
    let mut rx2 = connect(b.addr).await;
    receive_on(&mut rx1, "sms").await;
    receive_on(&mut rx2, "sms").await;
    let mut tx = connect(b.addr).await;

    send(
        &mut tx,
        r#"{"command":"send-message","channel":"sms","data":[{"id":"a1","message":"x"},{"message":"no id"},{"id":77}]}"#,
    )
    .await;
    let r = reply(&mut tx).await;
    assert_eq!(r.command, "send-result");
    assert_eq!(r.response_code, "00");
    let res: SendResult = r.first().expect("send result");
    assert_eq!(res.receivers, 2);
    assert_eq!(res.channel, "sms");
    assert_eq!(res.ids.len(), 3);
    assert_eq!(res.ids[0], "a1");
    assert_eq!(res.ids[1], format!("{}.1", res.message_id));
    assert_eq!(res.ids[2], "77");

    // limited to one receiver
    send(
        &mut tx,
        r#"{"command":"send-message","channel":"sms","number_of_receiver":1,"data":[{"id":"one"}]}"#,
    )
    .await;
    let res: SendResult = reply(&mut tx).await.first().expect("result");
    assert_eq!(res.receivers, 1);
    assert_eq!(res.ids, vec!["one"]);

    // nobody on the channel: not accepted, and said so
    send(&mut tx, &sms("empty", "z")).await;
    let r = reply(&mut tx).await;
    assert_eq!(r.response_code, "02");
    assert_eq!(r.response_text, "No receiver");
    let res: SendResult = r.first().expect("result");
    assert_eq!(res.receivers, 0);
    assert_eq!(res.ids, vec!["z"]);

    // message ids are unique
    send(&mut tx, &sms("empty", "z")).await;
    let res2: SendResult = reply(&mut tx).await.first().expect("result");
    assert_ne!(res.message_id, res2.message_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn number_of_receiver_from_frame_or_config() {
    // config default 2 of 3
    let b = broker_with(|c| c.server.number_of_receiver = 2).await;
    let mut rxs = Vec::new();
    for _ in 0..3 {
        let mut rx = connect(b.addr).await;
        receive_on(&mut rx, "c").await;
        rxs.push(rx);
    }
    let mut tx = connect(b.addr).await;
    let count = |v: &str| {
        let nor = if v.is_empty() {
            String::new()
        } else {
            format!(r#""number_of_receiver":{v},"#)
        };
        format!(r#"{{"command":"send-message","channel":"c",{nor}"data":[{{}}]}}"#)
    };
    for (v, want) in [
        ("", 2),
        ("0", 3),
        ("\"1\"", 1),
        ("-3", 3),
        ("\"2\"", 2),
        ("null", 2),
        ("9", 3),
    ] {
        send(&mut tx, &count(v)).await;
        let r: SendResult = reply(&mut tx).await.first().expect("result");
        assert_eq!(r.receivers, want, "number_of_receiver {v:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_receivers_limit_one_share_300_messages_fairly() {
    let b = broker().await;
    let mut rxs = Vec::new();
    for _ in 0..3 {
        let mut rx = connect(b.addr).await;
        receive_on(&mut rx, "sms").await;
        rxs.push(rx);
    }
    let mut tx = connect(b.addr).await;
    for i in 0..300 {
        let m = format!(
            r#"{{"command":"send-message","channel":"sms","number_of_receiver":1,"data":[{{"id":"m{i}"}}]}}"#
        );
        send(&mut tx, &m).await;
    }
    for _ in 0..300 {
        let r: SendResult = reply(&mut tx).await.first().expect("result");
        assert_eq!(r.receivers, 1);
    }
    let mut all = HashSet::new();
    for rx in &mut rxs {
        let mut got = 0;
        while let Some(t) = recv_text_within(rx, Duration::from_millis(500)).await {
            let v: serde_json::Value = serde_json::from_str(&t).expect("json");
            let id = v["data"][0]["id"].as_str().expect("id").to_owned();
            assert!(all.insert(id), "a message arrived twice");
            got += 1;
        }
        assert!((99..=101).contains(&got), "a receiver got {got}");
    }
    assert_eq!(all.len(), 300, "lost messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_an_error_frame_and_the_connection_keeps_working() {
    let b = broker().await;
    let mut rx = connect(b.addr).await;
    receive_on(&mut rx, "sms").await;
    let mut tx = connect(b.addr).await;

    let cases: &[(&str, &str)] = &[
        ("hello", "10"),
        ("", "10"),
        ("{\"command\":\"send-message\"", "10"),
        ("\"hello\"", "11"),
        ("42", "11"),
        ("[1,2,3]", "11"),
        ("null", "11"),
        (r#"{"channel":"sms","data":[]}"#, "13"),
        (r#"{"command":"nope","channel":"sms"}"#, "13"),
        (
            r#"{"command":"SEND-MESSAGE","channel":"sms","data":[]}"#,
            "13",
        ),
        (r#"{"command":42,"channel":"sms"}"#, "13"),
        (r#"{"command":"send-message","data":[]}"#, "12"),
        (r#"{"command":"send-message","channel":5,"data":[]}"#, "12"),
        (r#"{"command":"receive-message","channel":["sms"]}"#, "12"),
        (r#"{"command":"receive-message","channel":""}"#, "12"),
        (
            r#"{"command":"send-message","channel":"sms","data":[],"number_of_receiver":"abc"}"#,
            "14",
        ),
        (
            r#"{"command":"send-message","channel":"sms","data":[],"number_of_receiver":[]}"#,
            "14",
        ),
        (
            r#"{"command":"send-message","channel":"sms","data":[],"number_of_receiver":{}}"#,
            "14",
        ),
        (
            r#"{"command":"send-message","channel":"sms","data":[],"number_of_receiver":true}"#,
            "14",
        ),
        (
            r#"{"command":"send-message","channel":"sms","data":"x"}"#,
            "15",
        ),
        (
            r#"{"command":"send-message","channel":"sms","data":{"id":"1"}}"#,
            "15",
        ),
        (r#"{"command":"send-message","channel":"sms"}"#, "15"),
        (r#"{"command":"ping","protocol":"two"}"#, "18"),
    ];
    for (i, (input, code)) in cases.iter().enumerate() {
        send(&mut tx, input).await;
        let r = reply(&mut tx).await;
        assert_eq!(r.command, "error", "{input}");
        assert_eq!(r.response_code, *code, "{input}: {r:?}");
        let e: ErrorData = r.first().expect("error data");
        assert!(
            e.reason.len() > 20,
            "{input}: reason too short: {}",
            e.reason
        );
        // the same connection still sends, the receiver still receives
        send(&mut tx, &sms("sms", &format!("after-{i}"))).await;
        let res: SendResult = reply(&mut tx).await.first().expect("result");
        assert_eq!(res.receivers, 1, "{input}");
        assert!(recv_text(&mut rx).await.contains(&format!("after-{i}")));
    }
    // a binary frame that is not UTF-8
    tx.send(Message::binary(vec![0xff, 0xfe, b'{']))
        .await
        .expect("send");
    let r = reply(&mut tx).await;
    assert_eq!(
        (r.command.as_str(), r.response_code.as_str()),
        ("error", "17")
    );
    send(&mut tx, &sms("sms", "last")).await;
    assert_eq!(reply(&mut tx).await.response_code, "00");
    assert!(recv_text(&mut rx).await.contains("last"));
    // bad input from the receiver does not stop it receiving
    send(&mut rx, "{oops").await;
    assert_eq!(reply(&mut rx).await.response_code, "10");
    send(&mut tx, &sms("sms", "still")).await;
    assert_eq!(reply(&mut tx).await.response_code, "00");
    assert!(recv_text(&mut rx).await.contains("still"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_gets_an_error_then_close_1009_and_the_broker_goes_on() {
    let b = broker_with(|c| c.server.max_message_bytes = 4096).await;
    let mut rx = connect(b.addr).await;
    receive_on(&mut rx, "sms").await;
    let mut tx = connect(b.addr).await;
    let big = format!(
        r#"{{"command":"send-message","channel":"sms","data":[{{"message":"{}"}}]}}"#,
        "x".repeat(5000)
    );
    tx.send(Message::text(big)).await.expect("send");
    let r = reply(&mut tx).await;
    assert_eq!(
        (r.command.as_str(), r.response_code.as_str()),
        ("error", "16")
    );
    assert_eq!(expect_close(&mut tx).await, Some(1009));
    expect_silence(&mut rx, Duration::from_millis(200)).await;

    // just under the limit still goes through, on a new connection
    let mut tx = connect(b.addr).await;
    let ok = format!(
        r#"{{"command":"send-message","channel":"sms","data":[{{"message":"{}"}}]}}"#,
        "y".repeat(3900)
    );
    send(&mut tx, &ok).await;
    assert_eq!(reply(&mut tx).await.response_code, "00");
    assert_eq!(recv_text(&mut rx).await, ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_are_compared_exactly() {
    let b = broker().await;
    let mut r01 = connect(b.addr).await;
    receive_on(&mut r01, "01").await;
    let mut r_sms = connect(b.addr).await;
    receive_on(&mut r_sms, "SMS").await;
    let mut tx = connect(b.addr).await;
    for ch in ["1", "sms", "01 ", "Sms"] {
        send(&mut tx, &sms(ch, "x")).await;
        assert_eq!(reply(&mut tx).await.response_code, "02", "{ch:?}");
    }
    send(&mut tx, &sms("01", "y")).await;
    assert_eq!(reply(&mut tx).await.response_code, "00");
    assert!(recv_text(&mut r01).await.contains("\"y\""));
    expect_silence(&mut r_sms, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_gets_a_connect_shaped_reply() {
    let b = broker().await;
    let mut ws = connect(b.addr).await;
    send(&mut ws, r#"{"command":"ping","channel":"sms","data":[]}"#).await;
    let t = recv_text(&mut ws).await;
    assert_legacy_connect(&t, "00", "Accepted");
    let r = wsmb_protocol::reply::BrokerReply::parse(&t).expect("reply");
    assert!(r.first::<ConnectData>().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_roles_a_receiver_that_sends_stops_receiving() {
    let b = broker().await;
    let mut both = connect(b.addr).await;
    receive_on(&mut both, "sms").await;
    let mut tx = connect(b.addr).await;
    send(&mut tx, &sms("sms", "one")).await;
    assert_eq!(reply(&mut tx).await.response_code, "00");
    assert!(recv_text(&mut both).await.contains("one"));

    // the receiver sends: legacy rule, it is no longer a receiver
    send(&mut both, &sms("other", "mine")).await;
    assert_eq!(reply(&mut both).await.command, "send-result");
    send(&mut tx, &sms("sms", "two")).await;
    assert_eq!(reply(&mut tx).await.response_code, "02");

    // legacy: a second receive-message moves the connection to the new channel
    let mut mover = connect(b.addr).await;
    receive_on(&mut mover, "a").await;
    receive_on(&mut mover, "b").await;
    send(&mut tx, &sms("a", "to-a")).await;
    assert_eq!(reply(&mut tx).await.response_code, "02");
    send(&mut tx, &sms("b", "to-b")).await;
    assert_eq!(reply(&mut tx).await.response_code, "00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_2_connections_receive_several_channels_and_keep_receiving_when_sending() {
    let b = broker().await;
    let mut agent = connect(b.addr).await;
    send(
        &mut agent,
        r#"{"command":"receive-message","channel":"sms","protocol":2}"#,
    )
    .await;
    send(
        &mut agent,
        r#"{"command":"receive-message","channel":"sms-admin","protocol":2}"#,
    )
    .await;
    let mut app = connect(b.addr).await;
    receive_on(&mut app, "sms-status").await;
    send(&mut agent, r#"{"command":"ping"}"#).await;
    reply(&mut agent).await;

    // the agent publishes a status: it keeps its subscriptions
    send(&mut agent, &sms("sms-status", "status-1")).await;
    assert_eq!(reply(&mut agent).await.response_code, "00");
    assert!(recv_text(&mut app).await.contains("status-1"));

    send(&mut app, &sms("sms", "job-1")).await;
    // (app was a legacy receiver; sending demoted it, which is fine)
    assert_eq!(reply(&mut app).await.response_code, "00");
    assert!(recv_text(&mut agent).await.contains("job-1"));
    send(&mut app, &sms("sms-admin", "job-2")).await;
    assert_eq!(reply(&mut app).await.response_code, "00");
    assert!(recv_text(&mut agent).await.contains("job-2"));

    // a sender does not receive its own message on a channel it listens to
    send(&mut agent, &sms("sms", "echo?")).await;
    assert_eq!(reply(&mut agent).await.response_code, "02");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_waiting_for_connect_gets_it_within_250ms() {
    let b = broker().await;
    for _ in 0..5 {
        let mut ws = connect_raw(b.addr, Some(QA)).await;
        let t0 = Instant::now();
        let t = recv_text(&mut ws).await;
        let waited = t0.elapsed();
        assert_legacy_connect(&t, "00", "Accepted");
        assert!(
            waited < Duration::from_millis(250),
            "connect came after {waited:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_response_travels_alone() {
    // A client that reads right after writing its request gets exactly the 101 response: the
    // connect frame is not in the same read (the legacy client would throw it away).
    let b = broker().await;
    for _ in 0..5 {
        let mut s = tokio::net::TcpStream::connect(b.addr)
            .await
            .expect("connect");
        s.write_all(legacy_request("127.0.0.1", "qa", "4lt0@1234").as_bytes())
            .await
            .expect("write");
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.expect("read");
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(
            head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{head}"
        );
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{head}"
        );
        assert!(
            head.ends_with("\r\n\r\n"),
            "the connect frame came with the 101: {head:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_receiver_is_disconnected_and_others_keep_receiving() {
    let b = broker_with(|c| {
        c.server.outgoing_queue = 4;
        c.server.slow_receiver_timeout = Duration::from_millis(300);
    })
    .await;
    // a receiver that completes the upgrade and then never reads
    let mut stuck = tokio::net::TcpStream::connect(b.addr)
        .await
        .expect("connect");
    stuck
        .write_all(legacy_request("x", "qa", "4lt0@1234").as_bytes())
        .await
        .expect("write");
    let mut buf = vec![0u8; 1024];
    let _ = stuck.read(&mut buf).await.expect("101");
    // receive-message as a masked text frame
    let body = br#"{"command":"receive-message","channel":"sms"}"#;
    let mut frame = vec![0x81, 0x80 | body.len() as u8, 1, 2, 3, 4];
    frame.extend(
        body.iter()
            .enumerate()
            .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
    );
    stuck.write_all(&frame).await.expect("write frame");

    let mut good = connect(b.addr).await;
    receive_on(&mut good, "sms").await;
    let mut tx = connect(b.addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let payload = "z".repeat(60_000);
    let mut good_got = 0;
    for i in 0..300 {
        let m = format!(
            r#"{{"command":"send-message","channel":"sms","data":[{{"id":"{i}","message":"{payload}"}}]}}"#
        );
        send(&mut tx, &m).await;
        let r = reply(&mut tx).await;
        assert_eq!(r.command, "send-result");
        while let Some(_t) = recv_text_within(&mut good, Duration::from_millis(1)).await {
            good_got += 1;
        }
        if b.shared
            .stats
            .slow_consumers
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            break;
        }
    }
    assert_eq!(
        b.shared
            .stats
            .slow_consumers
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the stuck receiver was not disconnected"
    );
    // the good receiver got everything sent so far
    while let Some(_t) = recv_text_within(&mut good, Duration::from_millis(300)).await {
        good_got += 1;
    }
    let sent = b
        .shared
        .stats
        .messages_in
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(good_got as u64, sent);
    // and keeps receiving
    send(&mut tx, &sms("sms", "after")).await;
    let res: SendResult = reply(&mut tx).await.first().expect("result");
    assert_eq!(res.receivers, 1);
    assert!(recv_text(&mut good).await.contains("after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_pings_keep_live_peers_and_drop_dead_ones() {
    let b = broker_with(|c| {
        c.server.ping_interval = Duration::from_millis(100);
        c.server.dead_peer_timeout = Duration::from_millis(500);
    })
    .await;
    // a live client (tungstenite answers pings while we read), read in the background
    let mut live = connect(b.addr).await;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let live_task = tokio::spawn(async move {
        let mut pings = 0;
        loop {
            tokio::select! {
                m = live.next() => match m {
                    Some(Ok(Message::Ping(_))) => pings += 1,
                    Some(Ok(m)) => panic!("unexpected {m:?}"),
                    other => panic!("live peer dropped: {other:?}"),
                },
                _ = &mut stop_rx => return (live, pings),
            }
        }
    });

    // a dead one: upgrades, then never sends anything (no pong)
    let mut dead = tokio::net::TcpStream::connect(b.addr)
        .await
        .expect("connect");
    dead.write_all(legacy_request("x", "qa", "4lt0@1234").as_bytes())
        .await
        .expect("write");
    let t0 = Instant::now();
    let mut buf = vec![0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), dead.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("dead peer not dropped within 5s"),
        }
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "dropped too early"
    );
    assert!(
        b.shared
            .stats
            .dead_peers
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(());
    let (mut live, pings) = live_task.await.expect("live reader");
    assert!(pings >= 5, "only {pings} pings");
    // the live one is still fine
    send(&mut live, r#"{"command":"ping"}"#).await;
    assert_eq!(reply(&mut live).await.response_code, "00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_queued_messages_then_closes_1001() {
    let b = broker().await;
    let mut rx = connect(b.addr).await;
    receive_on(&mut rx, "sms").await;
    let mut tx = connect(b.addr).await;
    for i in 0..200 {
        send(&mut tx, &sms("sms", &format!("q{i}"))).await;
    }
    for _ in 0..200 {
        assert_eq!(reply(&mut tx).await.response_code, "00");
    }
    // everything is queued or in flight to rx, which has read nothing yet
    b.shared.shutdown.cancel();
    let mut got = 0;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                assert!(t.contains(&format!("\"q{got}\"")), "out of order: {t}");
                got += 1;
            }
            Ok(Some(Ok(Message::Close(c)))) => break c.map(|c| u16::from(c.code)),
            Ok(Some(Ok(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(got, 200);
    assert_eq!(code, Some(1001));
    assert_eq!(expect_close(&mut tx).await, Some(1001));
    tokio::time::timeout(Duration::from_secs(10), b.task)
        .await
        .expect("server stops")
        .expect("no panic");
    assert!(
        tokio::net::TcpStream::connect(b.addr).await.is_err(),
        "still listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_file_reloads_without_dropping_connections() {
    let dir = std::env::temp_dir().join(format!("wsmb-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("htpasswd");
    std::fs::write(&file, "qa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1\n").expect("write");
    let f = file.clone();
    let b = broker_with(move |c| {
        c.credentials.lines.clear();
        c.credentials.files = vec![f];
        c.credentials.reload_interval = Duration::from_millis(100);
    })
    .await;
    let mut old = connect(b.addr).await;
    receive_on(&mut old, "sms").await;

    // replace qa by sha
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(&file, "sha:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n# changed\n").expect("write");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut ws = connect_raw(b.addr, Some(QA)).await;
        let r = reply(&mut ws).await;
        if r.response_code == "01" {
            break;
        }
        assert!(Instant::now() < deadline, "reload not seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut new = connect_as(b.addr, SHA_USER).await;
    // the connection opened before the change still works
    send(&mut new, &sms("sms", "hello-old")).await;
    assert_eq!(reply(&mut new).await.response_code, "00");
    assert!(recv_text(&mut old).await.contains("hello-old"));

    // a broken file is refused and the previous users stay
    std::fs::write(&file, "sha:$6$abc$def\n").expect("write");
    tokio::time::sleep(Duration::from_millis(400)).await;
    connect_as(b.addr, SHA_USER).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bcrypt_users_log_in_and_storms_hit_the_cache() {
    let hash = bcrypt::hash("bpass", 6).expect("hash");
    let b = broker_with(move |c| c.credentials.lines.push(format!("bc:{hash}"))).await;
    for _ in 0..20 {
        connect_as(b.addr, ("bc", "bpass")).await;
    }
    let stats = &b.shared.auth.stats;
    assert_eq!(
        stats
            .bcrypt_checks
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        stats.cache_hits.load(std::sync::atomic::Ordering::Relaxed),
        19
    );
    let mut ws = connect_raw(b.addr, Some(("bc", "nope"))).await;
    assert_eq!(reply(&mut ws).await.response_code, "01");
}

/// Reads server frames until a close frame; returns its code.
async fn raw_close_code(s: &mut tokio::net::TcpStream) -> u16 {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        // parse what we have
        let mut i = 0;
        while i + 2 <= all.len() {
            let op = all[i] & 0x0f;
            let len = (all[i + 1] & 0x7f) as usize;
            assert!(len < 126, "unexpected long server frame");
            if i + 2 + len > all.len() {
                break;
            }
            if op == 8 {
                return u16::from_be_bytes([all[i + 2], all[i + 3]]);
            }
            i += 2 + len;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("close in time")
            .expect("read");
        assert!(n > 0, "closed without a close frame");
        all.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_1002_and_bad_utf8_text_with_1007() {
    let b = broker().await;
    // an unmasked client frame
    let mut s = raw_upgraded(b.addr).await;
    let body = br#"{"command":"ping"}"#;
    let mut f = vec![0x81, body.len() as u8];
    f.extend_from_slice(body);
    s.write_all(&f).await.expect("write");
    assert_eq!(raw_close_code(&mut s).await, 1002);

    // a masked text frame with invalid UTF-8
    let mut s = raw_upgraded(b.addr).await;
    let body = [0xffu8, 0xfe, 0x7b];
    let mut f = vec![0x81, 0x80 | body.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(&body);
    s.write_all(&f).await.expect("write");
    assert_eq!(raw_close_code(&mut s).await, 1007);

    // the broker is fine
    let mut ws = connect(b.addr).await;
    send(&mut ws, r#"{"command":"ping"}"#).await;
    assert_eq!(reply(&mut ws).await.response_code, "00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_policy_keeps_a_full_receiver_and_passes_it_over() {
    let b = broker_with(|c| {
        c.server.slow_receiver = wsmb_broker::config::SlowReceiverPolicy::Skip;
        c.server.slow_receiver_timeout = Duration::from_millis(200);
        c.server.max_message_bytes = 64 * 1024;
        c.server.outgoing_queue_bytes = 64 * 1024;
    })
    .await;
    // a receiver that never reads: its byte budget (64 KiB) fills once the socket buffers do
    let mut stuck = raw_upgraded(b.addr).await;
    let body = br#"{"command":"receive-message","channel":"sms"}"#;
    let mut frame = vec![0x81, 0x80 | body.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(body);
    stuck.write_all(&frame).await.expect("write");
    let mut tx = connect(b.addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let payload = "p".repeat(30_000);
    let mut busy = false;
    for i in 0..2000 {
        let t0 = Instant::now();
        send(
            &mut tx,
            &format!(r#"{{"command":"send-message","channel":"sms","data":[{{"id":"{i}","m":"{payload}"}}]}}"#),
        )
        .await;
        let r = reply(&mut tx).await;
        if r.response_code == "03" {
            // only after the sender waited for room (flow control), not at once
            assert!(
                t0.elapsed() >= Duration::from_millis(150),
                "{:?}",
                t0.elapsed()
            );
            assert_eq!(r.response_text, "Receivers busy");
            busy = true;
            break;
        }
        assert_eq!(r.response_code, "00");
    }
    assert!(busy, "the stuck receiver never filled up");
    // passed over once, it is not waited for again until it drains: five more messages do not
    // take five timeouts. Each is refused ("03") or, when the kernel grew the stuck socket's
    // buffers meanwhile and room appeared, taken ("00"); either way without a wait.
    let t0 = Instant::now();
    for i in 0..5 {
        send(
            &mut tx,
            &format!(r#"{{"command":"send-message","channel":"sms","data":[{{"id":"after-{i}","m":"{payload}"}}]}}"#),
        )
        .await;
        let code = reply(&mut tx).await.response_code;
        assert!(code == "03" || code == "00", "after-{i}: {code}");
    }
    assert!(
        t0.elapsed() < Duration::from_millis(600),
        "each message waited for the slow receiver: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        b.shared
            .stats
            .slow_consumers
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // a healthy receiver now gets the messages the stuck one cannot take
    let mut good = connect(b.addr).await;
    receive_on(&mut good, "sms").await;
    for i in 0..5 {
        send(&mut tx, &sms("sms", &format!("g{i}"))).await;
        let res: SendResult = reply(&mut tx).await.first().expect("result");
        assert!(res.receivers >= 1, "message {i}");
        assert!(recv_text(&mut good).await.contains(&format!("g{i}")));
    }
    // the stuck receiver was kept
    assert_eq!(b.shared.engine.receivers("sms"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_per_connection_are_bounded() {
    let b = broker_with(|c| c.server.max_channels_per_connection = 2).await;
    let mut ws = connect(b.addr).await;
    for ch in ["a", "b", "a"] {
        send(
            &mut ws,
            &format!(r#"{{"command":"receive-message","channel":"{ch}","protocol":2}}"#),
        )
        .await;
    }
    send(
        &mut ws,
        r#"{"command":"receive-message","channel":"c","protocol":2}"#,
    )
    .await;
    let r = reply(&mut ws).await;
    assert_eq!(
        (r.command.as_str(), r.response_code.as_str()),
        ("error", "19")
    );
    let mut tx = connect(b.addr).await;
    for (ch, code) in [("a", "00"), ("b", "00"), ("c", "02")] {
        send(&mut tx, &sms(ch, ch)).await;
        assert_eq!(reply(&mut tx).await.response_code, code, "{ch}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_data_gets_a_clear_error_not_a_crash() {
    // "data": [] with nobody listening killed the original (with its database on). Now it is
    // a clear error (15), the same in memory mode and with a database (persistence.rs).
    let b = broker().await;
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
    let e: wsmb_protocol::reply::ErrorData = r.first().expect("reason");
    assert!(e.reason.contains("empty"), "{}", e.reason);
    // the connection keeps working
    send(&mut tx, r#"{"command":"ping"}"#).await;
    assert_eq!(reply(&mut tx).await.response_code, "00");
    connect(b.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_batch_is_answered_without_a_drop() {
    // 60 000 items in a 180 KB frame: listing their ids would make a 1.3 MB reply (which used to
    // drop the sender after the message was routed, so it sent it again). The reply says how
    // many items there were instead.
    let b = broker().await;
    let mut rx = connect(b.addr).await;
    receive_on(&mut rx, "huge").await;
    let mut tx = connect(b.addr).await;
    let items = vec!["{}"; 60_000].join(",");
    let frame = format!(r#"{{"command":"send-message","channel":"huge","data":[{items}]}}"#);
    send(&mut tx, &frame).await;
    let t = recv_text(&mut tx).await;
    assert!(t.len() < 4096, "the reply is {} bytes", t.len());
    let r = BrokerReply::parse(&t).expect("reply");
    assert_eq!(r.response_code, "00");
    let res: SendResult = r.first().expect("result");
    assert_eq!(
        (res.ids.len(), res.ids_omitted, res.receivers),
        (0, Some(60_000), 1)
    );
    assert_eq!(recv_text(&mut rx).await, frame);
    send(&mut tx, r#"{"command":"ping"}"#).await;
    assert_eq!(reply(&mut tx).await.command, "connect");
    expect_silence(&mut rx, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_sender_is_slowed_to_its_receiver_and_nothing_is_lost() {
    // Flow control: a pipelining sender and a receiver that reads slowly. With a tiny queue the
    // receiver is full most of the time; the sender waits instead of messages being dropped.
    let b = broker_with(|c| c.server.outgoing_queue = 2).await;
    let mut rx = connect(b.addr).await;
    receive_on(&mut rx, "sms").await;
    let tx = connect(b.addr).await;
    let (mut sink, mut stream) = tx.split();
    let n = 2000;
    let sender = tokio::spawn(async move {
        for i in 0..n {
            sink.feed(Message::text(sms("sms", &format!("f{i}"))))
                .await
                .expect("feed");
        }
        sink.flush().await.expect("flush");
        sink
    });
    let results = tokio::spawn(async move {
        let mut codes = Vec::new();
        while codes.len() < n {
            match stream.next().await {
                Some(Ok(Message::Text(t))) => {
                    let r = wsmb_protocol::reply::BrokerReply::parse(&t).expect("reply");
                    codes.push(r.response_code);
                }
                Some(Ok(_)) => {}
                other => panic!("sender connection ended: {other:?}"),
            }
        }
        codes
    });
    for i in 0..n {
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t = recv_text(&mut rx).await;
        assert!(
            t.contains(&format!("\"f{i}\"")),
            "message {i} lost or out of order: {t}"
        );
    }
    let codes = results.await.expect("results");
    assert!(codes.iter().all(|c| c == "00"), "some were not accepted");
    let _ = sender.await;
    assert_eq!(
        b.shared
            .stats
            .slow_consumers
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_writes_and_closes_at_once_loses_nothing() {
    let b = broker().await;
    let mut rx = connect(b.addr).await;
    receive_on(&mut rx, "f").await;
    let frames = |conn: &str| -> Vec<String> {
        (0..3)
            .map(|i| {
                format!(
                    r#"{{"command":"send-message","channel":"f","data":[{{"id":"{conn}{i}"}}]}}"#
                )
            })
            .collect()
    };
    let (early, usual) = (frames("a"), frames("b"));
    // frames right behind the upgrade request, in the same write, then close without reading
    let mut s = tokio::net::TcpStream::connect(b.addr)
        .await
        .expect("connect");
    let mut bytes = legacy_request("x", "qa", "4lt0@1234").into_bytes();
    for f in &early {
        bytes.extend(masked_text(f));
    }
    s.write_all(&bytes).await.expect("write");
    drop(s);
    // and the usual order: read the 101, write, close. (Without TCP_NODELAY the client's
    // kernel may still hold frames back for Nagle when the broker's reply arrives; closing a
    // socket with unread data sends a reset that discards them on the client's side, where no
    // server can see them.)
    let mut s = raw_upgraded(b.addr).await;
    s.set_nodelay(true).expect("nodelay");
    for f in &usual {
        s.write_all(&masked_text(f)).await.expect("write");
    }
    drop(s);
    // the two connections are handled concurrently: each one's frames arrive complete and in order
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(recv_text(&mut rx).await);
    }
    for sent in [&early, &usual] {
        let seen: Vec<&String> = got.iter().filter(|g| sent.contains(g)).collect();
        assert_eq!(
            seen,
            sent.iter().collect::<Vec<_>>(),
            "all received: {got:?}"
        );
    }
}
