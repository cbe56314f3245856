//! Helpers for the broker's integration tests: a broker on 127.0.0.1:0 in this process, and
//! real WebSocket clients.
#![allow(dead_code)]

pub mod db;
pub mod legacy;
pub mod process;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{WebSocketStream, client_async};
use wsmb_broker::{Config, Running};
use wsmb_protocol::reply::BrokerReply;

/// qa / 4lt0@1234 (apr1, from the legacy docs)
pub const QA: (&str, &str) = ("qa", "4lt0@1234");
/// sha / test ({SHA})
pub const SHA_USER: (&str, &str) = ("sha", "test");

pub type Ws = WebSocketStream<TcpStream>;

pub fn test_config() -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.storage.backend = wsmb_broker::config::Backend::Memory;
    c.credentials.lines = vec![
        "qa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1".into(),
        "sha:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=".into(),
    ];
    c
}

pub async fn broker() -> Running {
    broker_with(|_| {}).await
}

/// Logs to the test output when WSMB_TEST_LOG is set (e.g. WSMB_TEST_LOG=debug).
pub fn logs() {
    if let Ok(level) = std::env::var("WSMB_TEST_LOG") {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let targets = wsmb_common::filter(&level).expect("WSMB_TEST_LOG: a level or directives");
        let _ = tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_test_writer())
            .with(targets)
            .try_init();
    }
}

pub async fn broker_with(f: impl FnOnce(&mut Config)) -> Running {
    logs();
    let mut c = test_config();
    f(&mut c);
    c.validate().expect("valid test config");
    wsmb_broker::start(c).await.expect("broker starts")
}

pub fn basic(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Connects with credentials; does not read anything.
pub async fn connect_raw(addr: SocketAddr, creds: Option<(&str, &str)>) -> Ws {
    let mut req = format!("ws://{addr}/")
        .into_client_request()
        .expect("request");
    if let Some((u, p)) = creds {
        req.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&basic(u, p)).expect("header"),
        );
    }
    let tcp = TcpStream::connect(addr).await.expect("tcp connect");
    let (ws, resp) = client_async(req, tcp).await.expect("websocket upgrade");
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

/// Connects as `qa` and reads the `connect` frame, asserting it is `00`.
pub async fn connect(addr: SocketAddr) -> Ws {
    connect_as(addr, QA).await
}

pub async fn connect_as(addr: SocketAddr, creds: (&str, &str)) -> Ws {
    let mut ws = connect_raw(addr, Some(creds)).await;
    let r = reply(&mut ws).await;
    assert_eq!(r.command, "connect");
    assert_eq!(r.response_code, "00", "{r:?}");
    ws
}

/// Next text frame (skipping pings), within 5 s.
pub async fn recv_text(ws: &mut Ws) -> String {
    recv_text_within(ws, Duration::from_secs(5))
        .await
        .expect("a text frame within 5s")
}

pub async fn recv_text_within(ws: &mut Ws, d: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next()).await.ok()??;
        match m {
            Ok(Message::Text(t)) => return Some(t.to_string()),
            Ok(Message::Binary(b)) => panic!("unexpected binary frame {b:?}"),
            Ok(Message::Close(c)) => panic!("unexpected close {c:?}"),
            Ok(_) => continue,
            Err(e) => panic!("read error {e}"),
        }
    }
}

/// Asserts nothing but pings arrives within `d`.
pub async fn expect_silence(ws: &mut Ws, d: Duration) {
    if let Some(t) = recv_text_within(ws, d).await {
        panic!("expected nothing, got {t}");
    }
}

/// Next frame, decoded as a broker reply.
pub async fn reply(ws: &mut Ws) -> BrokerReply {
    let t = recv_text(ws).await;
    BrokerReply::parse(&t).unwrap_or_else(|| panic!("not a reply: {t}"))
}

pub async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

pub async fn receive_on(ws: &mut Ws, channel: &str) {
    send(
        ws,
        &format!(r#"{{"command":"receive-message","channel":"{channel}","data":[]}}"#),
    )
    .await;
    // receive-message has no reply; a ping round trip makes sure it was processed.
    send(ws, r#"{"command":"ping"}"#).await;
    let r = reply(ws).await;
    assert_eq!(r.command, "connect");
}

pub fn sms(channel: &str, id: &str) -> String {
    format!(
        r#"{{"command":"send-message","channel":"{channel}","data":[{{"id":"{id}","time":1700000000,"receiver":"08126666666","message":"hi {id}"}}]}}"#
    )
}

/// Waits for the close frame and returns its code.
pub async fn expect_close(ws: &mut Ws) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("no close within 10s"),
            Ok(None) => return None,
            Ok(Some(Ok(Message::Close(c)))) => return c.map(|c| u16::from(c.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) => return None,
        }
    }
}

/// The upgrade request of the legacy PHP client (legacy-protocol.md section 5).
pub fn legacy_request(host: &str, user: &str, pass: &str) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\npragma: no-cache\r\nUpgrade: WebSocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nAuthorization: {}\r\n\r\n",
        basic(user, pass)
    )
}

/// Upgrades a raw socket as `qa` and returns it after the 101.
pub async fn raw_upgraded(addr: std::net::SocketAddr) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(legacy_request("x", "qa", "4lt0@1234").as_bytes())
        .await
        .expect("write");
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.expect("101");
    assert!(String::from_utf8_lossy(&buf[..n]).contains(" 101 "));
    s
}

/// A masked client text frame (short payloads).
pub fn masked_text(body: &str) -> Vec<u8> {
    let b = body.as_bytes();
    assert!(b.len() < 126);
    let mut f = vec![0x81, 0x80 | b.len() as u8, 9, 8, 7, 6];
    f.extend(b.iter().enumerate().map(|(i, x)| x ^ [9, 8, 7, 6][i % 4]));
    f
}

/// `GET /metrics` as `creds`: the samples, `name{labels}` → value.
/// One HTTP request without a body (`headers`: whole lines, each ending in CRLF); the status
/// and the whole answer, head and body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    (status, text)
}

/// The `Authorization` header line of `creds`.
pub fn auth_header(creds: (&str, &str)) -> String {
    format!("Authorization: {}\r\n", basic(creds.0, creds.1))
}

pub async fn scrape_metrics(
    addr: SocketAddr,
    creds: (&str, &str),
) -> std::collections::HashMap<String, f64> {
    let (_, text) = http_request(addr, "GET", "/metrics", &auth_header(creds)).await;
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

/// One sample of [`scrape_metrics`]'s answer; panics with the whole scrape when absent.
pub fn metric(m: &std::collections::HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("{key} not in the metrics: {m:?}"))
}
