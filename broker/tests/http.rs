//! The plain-HTTP side of the broker's port: health check, wrong paths, plain GETs, limits.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes, returns everything the broker answers until it closes.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out))
        .await
        .expect("the broker closes the connection")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_json() {
    let b = broker().await;
    let _rx = connect(b.addr).await;
    // Strangers (and wrong credentials) learn only whether it is up.
    for creds in ["", "Authorization: Basic cWE6d3Jvbmc=\r\n"] {
        let r = exchange(
            b.addr,
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{creds}\r\n").as_bytes(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        let body = r.split("\r\n\r\n").nth(1).expect("body");
        assert_eq!(body, r#"{"status":"ok"}"#, "{creds:?}");
    }
    // A user sees the figures.
    let r = exchange(
        b.addr,
        format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
            basic("qa", "4lt0@1234")
        )
        .as_bytes(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.contains("Content-Type: application/json\r\n"), "{r}");
    let body = r.split("\r\n\r\n").nth(1).expect("body");
    let v: serde_json::Value = serde_json::from_str(body).expect("json body");
    assert_eq!(v["status"], "ok");
    assert_eq!(v["users"], 2);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["connections"].as_u64().expect("connections") >= 1);

    let r = exchange(b.addr, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
        "{r}"
    );
    let r = exchange(
        b.addr,
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_paths_get_404_and_plain_get_on_the_ws_path_gets_a_clear_4xx() {
    let b = broker_with(|c| c.server.path = "/ws".into()).await;
    let r = exchange(b.addr, b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
    assert!(
        r.contains("/ws"),
        "404 should say where the endpoint is: {r}"
    );

    // even a proper upgrade on the wrong path
    let up = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: {}\r\n\r\n",
        basic("qa", "4lt0@1234")
    );
    let r = exchange(b.addr, up.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 404 "), "{r}");

    let r = exchange(b.addr, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{r}");
    assert!(r.contains("WebSocket"), "{r}");

    // query strings do not matter
    let up = up.replace("GET / ", "GET /ws?x=1 ");
    let mut s = TcpStream::connect(b.addr).await.expect("connect");
    s.write_all(up.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101 "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx() {
    let b = broker().await;
    let r = exchange(
        b.addr,
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000));
    let r = exchange(b.addr, big.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    let v12 = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n";
    let r = exchange(b.addr, v12.as_bytes()).await;
    assert!(
        r.starts_with("HTTP/1.1 426 ") && r.contains("Sec-WebSocket-Version: 13"),
        "{r}"
    );
    let nokey = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n";
    let r = exchange(b.addr, nokey.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    // the broker is still fine
    connect(b.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_handshake_timeout() {
    let b = broker_with(|c| c.server.handshake_timeout = Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let addr = b.addr;
    let silent = tokio::spawn(async move { exchange(addr, b"GET / HTTP/1.1\r\n").await });
    // Meanwhile a well-behaved client is served.
    let mut rx = connect(b.addr).await;
    receive_on(&mut rx, "meanwhile").await;
    let mut tx = connect(b.addr).await;
    send(&mut tx, &sms("meanwhile", "served")).await;
    assert!(recv_text(&mut rx).await.contains("served"));
    let r = silent.await.expect("silent client");
    assert!(r.starts_with("HTTP/1.1 408 "), "{r}");
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_over_the_limit_get_503() {
    let b = broker_with(|c| c.server.max_connections = 2).await;
    let _a = connect(b.addr).await;
    let _b = connect(b.addr).await;
    let upgrade = legacy_request("x", "qa", "4lt0@1234");
    let r = exchange(b.addr, upgrade.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
    assert!(r.contains("server.max_connections"), "{r}");
    // Not a session: the health check is still answered.
    let r = exchange(b.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    drop(_a);
    // the slot frees up once the broker sees the close
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = TcpStream::connect(b.addr).await.expect("connect");
        s.write_all(upgrade.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; 256];
        let n = s.read(&mut buf).await.unwrap_or(0);
        if String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101 ") {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
