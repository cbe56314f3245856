//! A webhook endpoint that keeps failing is said once, with what to check, not at every call
//! and retry; its recovery once. (Its own test binary: it sets the process-wide log
//! subscriber.)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wsmb_common::capture::Captured;

/// How many captured lines have `level` and `text`.
fn count(logs: &Captured, level: &str, text: &str) -> usize {
    logs.text()
        .lines()
        .filter(|l| l.contains(level) && l.contains(text))
        .count()
}

/// An endpoint answering 500 to its first `failures` requests, then 200; counts requests.
async fn endpoint(failures: usize) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", l.local_addr().expect("addr"));
    let n = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&n);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let i = seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = 0;
                // The head, then the body by its length.
                loop {
                    let Ok(k) = s.read(&mut buf[got..]).await else {
                        return;
                    };
                    if k == 0 {
                        return;
                    }
                    got += k;
                    let text = String::from_utf8_lossy(&buf[..got]).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if got >= end + 4 + len {
                            break;
                        }
                    }
                }
                let status = if i < failures {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let resp =
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, n)
}

async fn post_json(addr: std::net::SocketAddr, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        basic(QA.0, QA.1),
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_string(&mut out))
        .await
        .expect("in time")
        .expect("read");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_endpoint_is_said_once_and_its_recovery_once() {
    let logs = Captured::install(tracing::Level::DEBUG);
    let b = broker_with(|c| {
        c.sms.webhook_retry_initial = Duration::from_millis(50);
        c.sms.webhook_retry_max = Duration::from_millis(100);
    })
    .await;
    let (url, requests) = endpoint(8).await;
    let r = post_json(
        b.addr,
        "/3rdparty/v1/webhooks",
        &json!({"url": url, "event": "sms:received"}).to_string(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 201"), "{r}");
    // Three received SMS: three calls, each failing and retried until the endpoint recovers.
    let mut jobs = connect_as(b.addr, SHA_USER).await;
    receive_on(&mut jobs, "sms").await;
    let mut agent = connect_as(b.addr, SHA_USER).await;
    let items: Vec<_> = (1..=3)
        .map(|i| {
            json!({"id": format!("q-{i}"), "sender": "+628123456789", "message": "hi",
                        "time": 1_800_000_000, "received_at": "2027-01-15T15:00:00+07:00", "parts": 1, "coding": "gsm7"})
        })
        .collect();
    send(
        &mut agent,
        &json!({"command": "send-message", "channel": "sms-inbox", "data": items}).to_string(),
    )
    .await;
    let r = reply(&mut agent).await;
    assert_eq!(r.response_code, "02", "kept, no receiver: {r:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count(&logs, "INFO", "webhook endpoint answers again") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} requests; {:#?}",
            requests.load(Ordering::SeqCst),
            logs.text().lines().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(requests.load(Ordering::SeqCst) >= 9);
    assert_eq!(
        count(&logs, "WARN", "webhook endpoint failing"),
        1,
        "{:#?}",
        logs.text().lines().collect::<Vec<_>>()
    );
    assert!(
        count(&logs, "DEBUG", "webhook call failed") >= 6,
        "{:#?}",
        logs.text().lines().collect::<Vec<_>>()
    );
    let text = logs.text();
    let warn = text
        .lines()
        .find(|l| l.contains("WARN") && l.contains("webhook endpoint failing"))
        .unwrap_or_default();
    assert!(
        warn.contains("HTTP 500") && warn.contains("answers a POST with 2xx"),
        "{warn}"
    );
    assert!(warn.contains(&url), "{warn}");
}
