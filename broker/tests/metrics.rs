//! `/metrics`: who may read them (`metrics.access`), turning them off, and the figures moving
//! with what the broker does. The SMS service's series are checked in `sms.rs`, a real
//! Prometheus parser reads them in `tests/tests/http_api.rs`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use wsmb_broker::config::MetricsAccess;

/// One GET; the status and the whole answer.
async fn get(addr: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    http_request(addr, "GET", path, headers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_a_user_and_follow_the_broker() {
    let b = broker().await;
    // Strangers and wrong passwords: 401 with a Basic challenge, no figures.
    for headers in [String::new(), auth_header(("qa", "wrong"))] {
        let (status, text) = get(b.addr, "/metrics", &headers).await;
        assert_eq!(status, 401, "{text}");
        assert!(text.contains("WWW-Authenticate: Basic"), "{text}");
        assert!(!text.contains("wsmb_"), "{text}");
    }
    let (status, text) = get(b.addr, "/metrics", &auth_header(SHA_USER)).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("Content-Type: application/openmetrics-text")
            || text.contains("Content-Type: text/plain"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE wsmb_messages_in_total counter")
            && text.contains("# HELP wsmb_connections_open "),
        "{text}"
    );
    let before = scrape_metrics(b.addr, QA).await;
    assert!(metric(&before, r#"wsmb_authentications_total{outcome="failed"}"#) >= 1.0);
    assert_eq!(metric(&before, "wsmb_receivers"), 0.0);

    // A receiver and one message: the figures move by exactly that.
    let mut rx = connect(b.addr).await;
    receive_on(&mut rx, "metrics-ch").await;
    let mut tx = connect_as(b.addr, SHA_USER).await;
    send(&mut tx, &sms("metrics-ch", "m-1")).await;
    assert!(recv_text(&mut rx).await.contains("m-1"));
    let r = reply(&mut tx).await;
    assert_eq!(r.response_code, "00", "{r:?}");
    let after = scrape_metrics(b.addr, QA).await;
    for (key, delta) in [
        ("wsmb_messages_in_total", 1.0),
        ("wsmb_messages_out_total", 1.0),
        ("wsmb_messages_unrouted_total", 0.0),
    ] {
        assert_eq!(metric(&after, key) - metric(&before, key), delta, "{key}");
    }
    assert_eq!(metric(&after, "wsmb_receivers"), 1.0);
    assert_eq!(metric(&after, "wsmb_channels"), 1.0);
    assert!(metric(&after, "wsmb_connections_open") >= 2.0);
    assert!(
        metric(&after, r#"wsmb_authentications_total{outcome="ok"}"#)
            >= metric(&before, r#"wsmb_authentications_total{outcome="ok"}"#) + 2.0
    );
    assert_eq!(metric(&after, "wsmb_storage_up"), 1.0);
    // A frame the broker refuses is counted too.
    send(&mut tx, "{not json").await;
    let r = reply(&mut tx).await;
    assert_eq!(r.command, "error", "{r:?}");
    let later = scrape_metrics(b.addr, QA).await;
    assert_eq!(
        metric(&later, "wsmb_frames_rejected_total") - metric(&after, "wsmb_frames_rejected_total"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_access_serves_local_scrapers_only_and_an_empty_path_turns_them_off() {
    let b = broker_with(|c| c.metrics.access = MetricsAccess::Loopback).await;
    // A Prometheus on the same host needs no credentials.
    let (status, text) = get(b.addr, "/metrics", "").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("wsmb_connections_open"), "{text}");
    // Through a reverse proxy on the same host the peer is loopback but the client is not.
    let (status, text) = get(b.addr, "/metrics", "X-Forwarded-For: 203.0.113.9\r\n").await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("loopback"), "{text}");

    let b = broker_with(|c| c.metrics.path = String::new()).await;
    let (status, text) = get(b.addr, "/metrics", &auth_header(QA)).await;
    assert_ne!(status, 200, "{text}");
    assert!(!text.contains("wsmb_connections_open"), "{text}");

    let b = broker_with(|c| c.metrics.path = "/internal/metrics".into()).await;
    let (status, text) = get(b.addr, "/internal/metrics", &auth_header(QA)).await;
    assert_eq!(status, 200, "{text}");
}

/// Each channel has its own figures: messages in and out, queue depth (stored), receivers; a
/// channel's queue drains when a receiver comes. Channel names past the bound are counted
/// together, so a client inventing names cannot grow the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_have_their_own_figures_and_queue_depths() {
    let st = common::db::storage(wsmb_broker::config::Backend::Sqlite, "chanmetrics");
    let b = broker_with(move |c| c.storage = st).await;
    let mut rx = connect(b.addr).await;
    receive_on(&mut rx, "ch-a").await;
    let mut tx = connect_as(b.addr, SHA_USER).await;
    send(&mut tx, &sms("ch-a", "a-1")).await;
    assert!(recv_text(&mut rx).await.contains("a-1"));
    assert_eq!(reply(&mut tx).await.response_code, "00");
    for id in ["b-1", "b-2"] {
        send(&mut tx, &sms("ch-b", id)).await;
        let r = reply(&mut tx).await;
        assert_eq!(r.response_code, "00", "stored: {r:?}");
    }
    let m = scrape_metrics(b.addr, QA).await;
    for (key, want) in [
        (r#"wsmb_channel_messages_in_total{channel="ch-a"}"#, 1.0),
        (r#"wsmb_channel_messages_out_total{channel="ch-a"}"#, 1.0),
        (r#"wsmb_channel_receivers{channel="ch-a"}"#, 1.0),
        (r#"wsmb_channel_stored_messages{channel="ch-a"}"#, 0.0),
        (r#"wsmb_channel_messages_in_total{channel="ch-b"}"#, 2.0),
        (r#"wsmb_channel_messages_out_total{channel="ch-b"}"#, 0.0),
        (r#"wsmb_channel_receivers{channel="ch-b"}"#, 0.0),
        (r#"wsmb_channel_stored_messages{channel="ch-b"}"#, 2.0),
        (
            r#"wsmb_channel_messages_unrouted_total{channel="ch-b"}"#,
            0.0,
        ),
    ] {
        assert_eq!(metric(&m, key), want, "{key}: {m:?}");
    }
    // A receiver on ch-b takes its queue.
    let mut rb = connect(b.addr).await;
    send(&mut rb, r#"{"command":"receive-message","channel":"ch-b"}"#).await;
    let mut got = String::new();
    while !(got.contains("b-1") && got.contains("b-2")) {
        got.push_str(&recv_text(&mut rb).await);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let m = scrape_metrics(b.addr, QA).await;
        if metric(&m, r#"wsmb_channel_stored_messages{channel="ch-b"}"#) == 0.0 {
            assert_eq!(
                metric(&m, r#"wsmb_channel_messages_out_total{channel="ch-b"}"#),
                2.0
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_figures_are_bounded() {
    let b = broker().await;
    let mut tx = connect_as(b.addr, SHA_USER).await;
    for i in 0..300 {
        send(&mut tx, &sms(&format!("invented-{i}"), "x")).await;
        assert_eq!(reply(&mut tx).await.response_code, "02");
    }
    let m = scrape_metrics(b.addr, QA).await;
    let labelled: Vec<&String> = m
        .keys()
        .filter(|k| k.starts_with("wsmb_channel_messages_in_total{"))
        .collect();
    assert!(
        labelled.len() <= 256,
        "{} channels: {labelled:?}",
        labelled.len()
    );
    let other = metric(&m, r#"wsmb_channel_messages_in_total{channel="(other)"}"#);
    let named: f64 = labelled
        .iter()
        .filter(|k| !k.contains("(other)"))
        .map(|k| m[*k])
        .sum();
    assert_eq!(named + other, 300.0, "every message counted once");
    assert!(other >= 44.0, "{other}");
    assert_eq!(
        metric(
            &m,
            r#"wsmb_channel_messages_unrouted_total{channel="(other)"}"#
        ),
        other
    );
}
