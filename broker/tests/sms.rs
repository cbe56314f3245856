//! The SMS service and its HTTP API in one broker process, with a WebSocket client playing the
//! gateway agent (it takes the jobs on `sms` and publishes status events on `sms-status`, as
//! `wsmb-agent` does) and a local HTTP server receiving the webhooks. The lifecycle runs on
//! every backend: memory, SQLite, and the real MariaDB and PostgreSQL started by `.ci/run`.
//! The real agent and the official clients are in `tests/tests/http_api.rs`.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::db;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use wsmb_broker::Running;
use wsmb_broker::config::{Backend, StorageConfig};

const T: Duration = Duration::from_secs(20);
/// The application's user (`qa`) and the agent's (`sha`), from the test config.
const APP: (&str, &str) = QA;
const AGENT: (&str, &str) = SHA_USER;

// ---- HTTP ---------------------------------------------------------------------------------

/// An HTTP answer: status, headers (lower-case names), JSON body (Null when none).
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: Value,
}

/// One request with `Connection: close`; `raw_body` is sent as is (with its Content-Length).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    creds: Option<(&str, &str)>,
    raw_body: Option<&[u8]>,
    extra_headers: &str,
) -> Answer {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut head =
        format!("{method} /3rdparty/v1{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some((u, p)) = creds {
        head.push_str(&format!("Authorization: {}\r\n", basic(u, p)));
    }
    if let Some(b) = raw_body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str(extra_headers);
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.expect("write");
    if let Some(b) = raw_body {
        // The broker may answer (413) before reading a body it refuses.
        let _ = s.write_all(b).await;
    }
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

async fn api(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Answer {
    let b = body.map(|b| b.to_string());
    request(
        addr,
        method,
        path,
        Some(APP),
        b.as_deref().map(str::as_bytes),
        "",
    )
    .await
}

/// Polls `GET /messages/{id}` until `pred` holds.
async fn wait_message(
    addr: SocketAddr,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let a = api(addr, "GET", &format!("/messages/{id}"), None).await;
        if a.status == 200 && pred(&a.body) {
            return a.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id}: {what} never happened: {} {}",
            a.status,
            a.body
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_state(addr: SocketAddr, id: &str, state: &str) -> Value {
    wait_message(addr, id, state, |v| v["state"] == state).await
}

fn send_body(id: &str, numbers: &[&str], text: &str) -> Value {
    json!({"id": id, "textMessage": {"text": text}, "phoneNumbers": numbers})
}

// ---- a webhook receiver -------------------------------------------------------------------

/// A call as received.
#[derive(Debug, Clone)]
struct Hit {
    headers: HashMap<String, String>,
    /// The body's bytes as received (what the signature covers).
    raw: Vec<u8>,
    body: Value,
    answered: u16,
}

/// A local HTTP server recording calls; it answers with `answer` (0: never answers).
#[derive(Clone)]
struct Hooks {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    answer: Arc<AtomicU16>,
    /// Extra head lines of the answer (e.g. a Location).
    extra: Arc<Mutex<String>>,
}

impl Hooks {
    async fn start(answer: u16) -> Hooks {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let h = Hooks {
            addr: l.local_addr().expect("addr"),
            hits: Arc::default(),
            answer: Arc::new(AtomicU16::new(answer)),
            extra: Arc::default(),
        };
        let me = h.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let me = me.clone();
                tokio::spawn(async move { me.serve(s).await });
            }
        });
        h
    }

    async fn serve(&self, s: TcpStream) {
        let mut r = BufReader::new(s);
        let mut headers = HashMap::new();
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        headers.insert(":request".to_owned(), line.trim().to_owned());
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).await.unwrap_or(0) == 0 {
                return;
            }
            let l = l.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if r.read_exact(&mut body).await.is_err() {
            return;
        }
        let answered = self.answer.load(Ordering::SeqCst);
        self.hits.lock().expect("lock").push(Hit {
            headers,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            raw: body,
            answered,
        });
        if answered == 0 {
            // Never answers; holds the connection until the caller gives up.
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink).await;
            return;
        }
        let extra = self.extra.lock().expect("lock").clone();
        let _ = r
            .get_mut()
            .write_all(
                format!(
                    "HTTP/1.1 {answered} X\r\nContent-Length: 0\r\nConnection: close\r\n{extra}\r\n"
                )
                .as_bytes(),
            )
            .await;
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("lock").clone()
    }

    /// Waits until `pred` holds for the calls received.
    async fn wait(&self, what: &str, pred: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let hits = self.hits();
            if pred(&hits) {
                return hits;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "webhooks: {what} did not happen: {hits:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn signed_with(hit: &Hit, key: &str) -> bool {
    let (Some(ts), Some(sig)) = (
        hit.headers.get("x-timestamp"),
        hit.headers.get("x-signature"),
    ) else {
        return false;
    };
    // Our own HMAC (the hmac and sha2 crates), not the broker's function: hex HMAC-SHA256
    // keyed with the key's UTF-8 bytes over the raw body followed by the timestamp.
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("key");
    mac.update(&hit.raw);
    mac.update(ts.as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    *sig == want
}

async fn register(addr: SocketAddr, url: &str, event: &str) -> String {
    let a = api(
        addr,
        "POST",
        "/webhooks",
        Some(json!({"url": url, "event": event})),
    )
    .await;
    assert_eq!(a.status, 201, "{a:?}");
    a.body["id"].as_str().expect("webhook id").to_owned()
}

// ---- the agent ----------------------------------------------------------------------------

/// A WebSocket client in the agent's role.
struct Agent {
    jobs: Ws,
    status: Ws,
    /// Items of a frame not yet taken by `job`.
    items: std::collections::VecDeque<Value>,
}

impl Agent {
    async fn connect(addr: SocketAddr) -> Agent {
        let mut jobs = connect_as(addr, AGENT).await;
        receive_on(&mut jobs, "sms").await;
        let status = connect_as(addr, AGENT).await;
        Agent {
            jobs,
            status,
            items: Default::default(),
        }
    }

    /// [`Agent::connect`] while jobs wait in the broker: they may come before the answer to
    /// the subscription's ping, and are kept for [`Agent::job`].
    async fn connect_to_waiting_jobs(addr: SocketAddr) -> Agent {
        let mut jobs = connect_as(addr, AGENT).await;
        send(
            &mut jobs,
            r#"{"command":"receive-message","channel":"sms","data":[]}"#,
        )
        .await;
        send(&mut jobs, r#"{"command":"ping"}"#).await;
        let mut items = std::collections::VecDeque::new();
        loop {
            let t = recv_text_within(&mut jobs, T).await.expect("a frame");
            let v: Value = serde_json::from_str(&t).expect("json");
            if v["command"] == "send-message" {
                items.extend(v["data"].as_array().expect("data").iter().cloned());
            } else {
                assert_eq!(v["command"], "connect", "the ping's answer: {t}");
                break;
            }
        }
        let status = connect_as(addr, AGENT).await;
        Agent {
            jobs,
            status,
            items,
        }
    }

    /// The next job item (a message to several numbers is one frame of several items).
    async fn job(&mut self) -> Value {
        if let Some(j) = self.items.pop_front() {
            return j;
        }
        let t = recv_text_within(&mut self.jobs, T).await.expect("a job");
        let v: Value = serde_json::from_str(&t).expect("json");
        assert_eq!(v["channel"], "sms", "{t}");
        self.items
            .extend(v["data"].as_array().expect("data").iter().cloned());
        self.items.pop_front().expect("an item")
    }

    /// Publishes status events and waits for the broker's answer; returns its code.
    async fn report(&mut self, events: Value) -> String {
        self.publish("sms-status", events).await
    }

    /// Publishes items on `channel` and waits for the broker's answer; returns its code.
    async fn publish(&mut self, channel: &str, items: Value) -> String {
        let frame = json!({"command": "send-message", "channel": channel, "data": items});
        send(&mut self.status, &frame.to_string()).await;
        loop {
            let r = reply(&mut self.status).await;
            if r.command == "send-result" {
                return r.response_code;
            }
        }
    }
}

fn event(id: &str, status: &str, extra: Value) -> Value {
    let mut e = json!({"id": id, "status": status, "time": 1_800_000_000});
    if let (Some(o), Value::Object(x)) = (e.as_object_mut(), extra) {
        o.extend(x);
    }
    e
}

// ---- brokers ------------------------------------------------------------------------------

async fn start(st: &StorageConfig, f: impl FnOnce(&mut wsmb_broker::Config)) -> Running {
    let st = st.clone();
    broker_with(move |c| {
        c.storage = st;
        c.sms.webhook_retry_initial = Duration::from_millis(100);
        c.sms.webhook_retry_max = Duration::from_millis(200);
        f(c);
    })
    .await
}

async fn stop(b: Running) {
    b.shared.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), b.task).await;
}

async fn drop_sms_table(st: &StorageConfig) {
    let t = format!("{}sms", st.prefix);
    match st.backend {
        Backend::Mysql => db::exec(st, &format!("DROP TABLE IF EXISTS {t}")).await,
        Backend::Postgres => {
            db::exec(st, &format!("DROP TABLE IF EXISTS {}", t.to_lowercase())).await
        }
        _ => {}
    }
    db::cleanup(st).await;
}

// ---- the lifecycle on every backend --------------------------------------------------------

/// A message to two numbers: its jobs (derived ids, the request's options), `Processed` when
/// the agent queued them, `Sent`, `Delivered` and `Failed` with the agent's reason, signed
/// webhooks carrying the API's message id; states, webhooks and a webhook call the endpoint
/// has not yet taken survive a restart; the signing key stays the same.
async fn lifecycle(backend: Backend) {
    let st = db::storage(backend, "smslife");
    let hooks = Hooks::start(200).await;
    let b = start(&st, |_| {}).await;
    let mut agent = Agent::connect(b.addr).await;
    let sent_hook = register(b.addr, &hooks.url("/sent"), "sms:sent").await;
    register(b.addr, &hooks.url("/failed"), "sms:failed").await;
    register(b.addr, &hooks.url("/delivered"), "sms:delivered").await;

    let mut body = send_body(
        "life-1",
        &["+628126666666", "+62 812-7777-777"],
        "Kode 🔐 4821",
    );
    body["priority"] = json!(100);
    body["ttl"] = json!(600);
    body["simNumber"] = json!(2);
    let a = api(b.addr, "POST", "/messages", Some(body)).await;
    assert_eq!(a.status, 202, "{a:?}");
    assert_eq!(a.body["id"], "life-1");
    assert_eq!(a.body["state"], "Pending");
    assert_eq!(a.body["recipients"][1]["phoneNumber"], "+628127777777");
    assert!(a.body["states"]["Pending"].as_str().is_some(), "{a:?}");

    let j1 = agent.job().await;
    let j2 = agent.job().await;
    let mut ids = [j1["id"].clone(), j2["id"].clone()];
    ids.sort_by_key(|v| v.to_string());
    assert_eq!(ids, [json!("life-1/1"), json!("life-1/2")]);
    for j in [&j1, &j2] {
        assert_eq!(j["message"], "Kode 🔐 4821", "{j}");
        assert_eq!(j["priority"], 100, "{j}");
        assert_eq!(j["sim"], 2, "simNumber becomes the job's sim: {j}");
        assert_eq!(
            j["delivery_report"], true,
            "withDeliveryReport defaults to true: {j}"
        );
        let exp = j["expiration"].as_u64().expect("expiration");
        assert!(exp >= j["time"].as_u64().expect("time") + 599, "{j}");
    }

    agent
        .report(json!([
            event("life-1/1", "queued", json!({})),
            event("life-1/2", "queued", json!({}))
        ]))
        .await;
    let v = wait_state(b.addr, "life-1", "Processed").await;
    assert_eq!(v["deviceId"], "sha", "{v}");

    agent
        .report(json!([event(
            "life-1/1",
            "sent",
            json!({"parts": 1, "modem": "m1"})
        )]))
        .await;
    // One of two sent: the message is as far as its least advanced recipient.
    let v = wait_message(b.addr, "life-1", "recipient 1 sent", |v| {
        v["recipients"][0]["state"] == "Sent"
    })
    .await;
    assert_eq!(v["state"], "Processed", "{v}");
    let hit = hooks
        .wait("sms:sent", |h| {
            h.iter().any(|x| x.body["event"] == "sms:sent")
        })
        .await
        .into_iter()
        .find(|x| x.body["event"] == "sms:sent")
        .expect("hit");
    assert_eq!(hit.headers[":request"], "POST /sent HTTP/1.1");
    assert_eq!(hit.body["webhookId"], sent_hook.as_str());
    assert_eq!(hit.body["deviceId"], "sha");
    assert_eq!(
        hit.body["payload"]["messageId"], "life-1",
        "the API's id, not the job's"
    );
    assert_eq!(hit.body["payload"]["phoneNumber"], "+628126666666");
    assert_eq!(hit.body["payload"]["partsCount"], 1);

    agent
        .report(json!([
            event(
                "life-1/2",
                "failed",
                json!({"reason": "the number does not exist", "error_code": "+CMS ERROR: 1"})
            ),
            event("life-1/1", "delivered", json!({}))
        ]))
        .await;
    let v = wait_state(b.addr, "life-1", "Failed").await;
    assert_eq!(v["recipients"][0]["state"], "Delivered", "{v}");
    let err = v["recipients"][1]["error"].as_str().expect("error");
    assert!(
        err.contains("does not exist") && err.contains("+CMS ERROR: 1"),
        "{err}"
    );
    for s in ["Pending", "Processed", "Failed"] {
        assert!(v["states"][s].as_str().is_some(), "{s} missing: {v}");
    }
    hooks
        .wait("sms:failed and sms:delivered", |h| {
            h.iter().any(|x| x.body["event"] == "sms:failed")
                && h.iter().any(|x| x.body["event"] == "sms:delivered")
        })
        .await;
    let failed = hooks
        .hits()
        .into_iter()
        .find(|x| x.body["event"] == "sms:failed")
        .expect("failed");
    assert_eq!(failed.body["payload"]["phoneNumber"], "+628127777777");
    assert!(
        failed.body["payload"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("does not exist"))
    );

    // A repeated event changes nothing and calls nothing again.
    let before = hooks.hits().len();
    agent
        .report(json!([event("life-1/1", "delivered", json!({}))]))
        .await;
    let a = api(b.addr, "GET", "/messages?state=Failed", None).await;
    assert_eq!(a.body.as_array().map(Vec::len), Some(1), "{a:?}");
    assert_eq!(hooks.hits().len(), before);

    // The key, the states and a call the endpoint does not take yet survive a restart.
    let key = b
        .shared
        .sms
        .as_ref()
        .expect("sms")
        .signing_key()
        .await
        .expect("key")
        .to_owned();
    assert!(
        hooks.hits().iter().all(|h| signed_with(h, &key)),
        "{:#?}",
        hooks.hits()
    );
    hooks.answer.store(503, Ordering::SeqCst);
    let a = api(
        b.addr,
        "POST",
        "/messages",
        Some(send_body("life-2", &["+628126666666"], "x")),
    )
    .await;
    assert_eq!(a.status, 202, "{a:?}");
    let j = agent.job().await;
    assert_eq!(j["id"], "life-2");
    agent
        .report(json!([event("life-2", "sent", json!({}))]))
        .await;
    hooks
        .wait("a refused call of life-2", |h| {
            h.iter().any(|x| x.body["payload"]["messageId"] == "life-2")
        })
        .await;
    drop(agent);
    stop(b).await;
    if backend == Backend::Memory {
        return;
    }
    let b = start(&st, |_| {}).await;
    let v = wait_state(b.addr, "life-1", "Failed").await;
    assert_eq!(v["recipients"][0]["state"], "Delivered", "{v}");
    let again = b
        .shared
        .sms
        .as_ref()
        .expect("sms")
        .signing_key()
        .await
        .expect("key")
        .to_owned();
    assert_eq!(again, key, "the signing key is kept");
    let a = api(b.addr, "GET", "/webhooks", None).await;
    assert_eq!(a.body.as_array().map(Vec::len), Some(3), "{a:?}");
    hooks.answer.store(200, Ordering::SeqCst);
    let hits = hooks
        .wait("life-2 taken after the restart", |h| {
            h.iter()
                .any(|x| x.body["payload"]["messageId"] == "life-2" && x.answered == 200)
        })
        .await;
    let life2: Vec<&Hit> = hits
        .iter()
        .filter(|x| x.body["payload"]["messageId"] == "life-2")
        .collect();
    assert!(
        life2.iter().all(|x| x.body["id"] == life2[0].body["id"]),
        "one event: {life2:#?}"
    );
    assert!(life2.iter().all(|x| signed_with(x, &key)));
    stop(b).await;
    drop_sms_table(&st).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_in_memory() {
    lifecycle(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_sqlite() {
    lifecycle(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_mariadb() {
    lifecycle(Backend::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_postgres() {
    lifecycle(Backend::Postgres).await;
}

// ---- the API's answers ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_status_and_a_reason() {
    let b = start(&db::storage(Backend::Memory, "smsbad"), |c| {
        c.sms.max_body_bytes = 2000;
    })
    .await;
    let a = request(b.addr, "GET", "/messages", None, None, "").await;
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.headers.contains_key("www-authenticate"), "{a:?}");
    let a = request(b.addr, "GET", "/messages", Some(("qa", "wrong")), None, "").await;
    assert_eq!(a.status, 401, "{a:?}");
    let big = vec![b'x'; 2001];
    let a = request(b.addr, "POST", "/messages", Some(APP), Some(&big), "").await;
    assert_eq!(a.status, 413, "{a:?}");
    assert!(
        a.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_body_bytes")),
        "{a:?}"
    );
    let a = request(
        b.addr,
        "POST",
        "/messages",
        Some(APP),
        None,
        "Transfer-Encoding: chunked\r\n",
    )
    .await;
    assert_eq!(a.status, 411, "{a:?}");
    let a = request(b.addr, "POST", "/messages", Some(APP), Some(b"{nope"), "").await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("JSON")),
        "{a:?}"
    );
    let a = request(b.addr, "POST", "/messages", Some(APP), None, "").await;
    assert_eq!(a.status, 400, "{a:?}");
    for (body, needle) in [
        (
            json!({"textMessage": {"text": "x"}, "phoneNumbers": []}),
            "phoneNumbers is empty",
        ),
        (
            json!({"textMessage": {"text": "x"}, "phoneNumbers": ["0812345"]}),
            "international format",
        ),
        (
            json!({"textMessage": {"text": ""}, "phoneNumbers": ["+628126666666"]}),
            "empty",
        ),
        (
            json!({"textMessage": {"text": "x".repeat(153 * 10 + 1)}, "phoneNumbers": ["+628126666666"]}),
            "sms.max_parts",
        ),
        (
            json!({"textMessage": {"text": "x"}, "phoneNumbers": ["+628126666666"], "ttl": 5, "validUntil": "2030-01-01T00:00:00Z"}),
            "mutually exclusive",
        ),
        (
            json!({"textMessage": {"text": "x"}, "phoneNumbers": ["+628126666666"], "validUntil": "2001-01-01T00:00:00Z"}),
            "in the past",
        ),
        (
            json!({"textMessage": {"text": "x"}, "phoneNumbers": ["+628126666666"], "validUntil": "soon"}),
            "ISO 8601",
        ),
        (
            json!({"textMessage": {"text": "x"}, "phoneNumbers": ["+628126666666"], "ttl": 0}),
            "positive",
        ),
        (
            json!({"textMessage": {"text": "x"}, "phoneNumbers": ["+628126666666"], "priority": 128}),
            "-128 to 127",
        ),
        (
            json!({"textMessage": {"text": "x"}, "phoneNumbers": ["+628126666666"], "simNumber": 0}),
            "simNumber = 0: it picks the gateway's modem by position",
        ),
        (
            json!({"textMessage": {"text": "x"}, "phoneNumbers": ["+628126666666"], "simNumber": 65}),
            "up to 64",
        ),
        (
            json!({"textMessage": {"text": "x"}, "phoneNumbers": ["+628126666666"], "isEncrypted": true}),
            "isEncrypted",
        ),
        (
            json!({"textMessage": {"text": "x"}, "phoneNumbers": ["+628126666666"], "deviceId": "pi-9"}),
            "not a known gateway",
        ),
        (
            json!({"dataMessage": {"data": "AA==", "port": 53739}, "phoneNumbers": ["+628126666666"]}),
            "dataMessage",
        ),
        (json!({"phoneNumbers": ["+628126666666"]}), "no text"),
    ] {
        let a = api(b.addr, "POST", "/messages", Some(body.clone())).await;
        assert_eq!(a.status, 400, "{body}: {a:?}");
        let m = a.body["message"].as_str().unwrap_or_default();
        assert!(m.contains(needle), "{body}: {m:?} lacks {needle:?}");
    }
    let a = api(b.addr, "GET", "/messages/nope", None).await;
    assert_eq!(a.status, 404, "{a:?}");
    let a = api(b.addr, "DELETE", "/messages/nope", None).await;
    assert_eq!(a.status, 404, "{a:?}");
    let a = api(b.addr, "DELETE", "/webhooks/nope", None).await;
    assert_eq!(a.status, 404, "{a:?}");
    let a = api(b.addr, "GET", "/nothing", None).await;
    assert_eq!(a.status, 404, "{a:?}");
    let a = api(b.addr, "PUT", "/messages", None).await;
    assert_eq!(a.status, 405, "{a:?}");
    let a = api(b.addr, "GET", "/messages?limit=0", None).await;
    assert_eq!(a.status, 400, "{a:?}");
    let a = api(b.addr, "GET", "/messages?state=Lost", None).await;
    assert_eq!(a.status, 400, "{a:?}");
    // Webhook URLs: https, or http on loopback and the configured hosts; nothing else.
    for (url, ok) in [
        ("https://hooks.example.com/sms", true),
        ("http://127.0.0.1:9/x", true),
        ("http://localhost/x", true),
        ("http://hooks.example.com/sms", false),
        ("ftp://hooks.example.com/sms", false),
        ("not a url", false),
    ] {
        let a = api(
            b.addr,
            "POST",
            "/webhooks",
            Some(json!({"url": url, "event": "sms:sent"})),
        )
        .await;
        assert_eq!(a.status == 201, ok, "{url}: {a:?}");
    }
    let a = api(
        b.addr,
        "POST",
        "/webhooks",
        Some(json!({"url": "https://x.example/", "event": "sms:lost"})),
    )
    .await;
    assert_eq!(a.status, 400, "{a:?}");
    // Another user sees none of qa's messages or webhooks.
    let a = request(b.addr, "GET", "/webhooks", Some(SHA_USER), None, "").await;
    assert_eq!(a.body, json!([]), "{a:?}");
    stop(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_answers_503_with_retry_after_and_memory_mode_needs_an_agent() {
    let st = db::storage(Backend::Sqlite, "smsfull");
    let b = start(&st, |c| c.sms.max_messages = 2).await;
    for id in ["f1", "f2"] {
        let a = api(
            b.addr,
            "POST",
            "/messages",
            Some(send_body(id, &["+628126666666"], id)),
        )
        .await;
        assert_eq!(a.status, 202, "{a:?}");
    }
    let a = api(
        b.addr,
        "POST",
        "/messages",
        Some(send_body("f3", &["+628126666666"], "f3")),
    )
    .await;
    assert_eq!(a.status, 503, "{a:?}");
    assert!(
        a.headers
            .get("retry-after")
            .is_some_and(|v| v.parse::<u64>().is_ok()),
        "{a:?}"
    );
    assert!(
        a.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("sms.max_messages")),
        "{a:?}"
    );
    // A repeat of a kept message is still answered.
    let a = api(
        b.addr,
        "POST",
        "/messages",
        Some(send_body("f1", &["+628126666666"], "f1")),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    stop(b).await;
    db::cleanup(&st).await;

    // The memory backend keeps no job for later: without an agent a message is refused, and
    // its id stays free for the retry.
    let b = start(&db::storage(Backend::Memory, "smsnoagent"), |_| {}).await;
    let a = api(
        b.addr,
        "POST",
        "/messages",
        Some(send_body("m1", &["+628126666666"], "m1")),
    )
    .await;
    assert_eq!(a.status, 503, "{a:?}");
    assert!(
        a.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("no gateway agent")),
        "{a:?}"
    );
    let mut agent = Agent::connect(b.addr).await;
    let a = api(
        b.addr,
        "POST",
        "/messages",
        Some(send_body("m1", &["+628126666666"], "m1")),
    )
    .await;
    assert_eq!(a.status, 202, "{a:?}");
    assert_eq!(agent.job().await["id"], "m1");
    stop(b).await;
}

// ---- webhooks ------------------------------------------------------------------------------

/// Redirects are not followed, a silent endpoint times out, and a call still failing after
/// `webhook_give_up_after` is given up and shown in `GET /webhooks`; meanwhile messages flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoints_are_given_up_visibly_and_never_slow_messages() {
    let redirect = Hooks::start(302).await;
    *redirect.extra.lock().expect("lock") = "Location: http://127.0.0.1:9/elsewhere\r\n".into();
    let silent = Hooks::start(0).await;
    let b = start(&db::storage(Backend::Memory, "smsgiveup"), |c| {
        c.sms.webhook_timeout = Duration::from_millis(300);
        c.sms.webhook_give_up_after = Duration::from_millis(600);
    })
    .await;
    let mut agent = Agent::connect(b.addr).await;
    let r = register(b.addr, &redirect.url("/r"), "sms:sent").await;
    let s = register(b.addr, &silent.url("/s"), "sms:sent").await;
    for i in 0..3 {
        let id = format!("g{i}");
        let a = api(
            b.addr,
            "POST",
            "/messages",
            Some(send_body(&id, &["+628126666666"], &id)),
        )
        .await;
        assert_eq!(a.status, 202, "{a:?}");
        assert_eq!(agent.job().await["id"], id.as_str());
        agent.report(json!([event(&id, "sent", json!({}))])).await;
        // The state moves on whatever the endpoints do.
        wait_state(b.addr, &id, "Sent").await;
    }
    let deadline = tokio::time::Instant::now() + T;
    let list = loop {
        let a = api(b.addr, "GET", "/webhooks", None).await;
        let done = a.body.as_array().is_some_and(|l| {
            l.iter()
                .all(|w| w["failedDeliveries"] == 3 && w["pendingDeliveries"] == 0)
        });
        if done {
            break a.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not given up: {}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let by_id = |id: &str| {
        list.as_array()
            .and_then(|l| l.iter().find(|w| w["id"] == id))
            .cloned()
            .expect("hook")
    };
    let e = by_id(&r)["lastError"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(e.contains("302") && e.contains("not followed"), "{e}");
    let e = by_id(&s)["lastError"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(e.contains("no answer within"), "{e}");
    assert!(
        redirect
            .hits()
            .iter()
            .all(|h| h.headers[":request"] == "POST /r HTTP/1.1")
    );
    stop(b).await;
}

/// `system:ping` on a timer with the broker's health; `sms.webhook_signing_key` signs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_ping_on_a_timer_signed_with_the_configured_key() {
    let hooks = Hooks::start(200).await;
    let b = start(&db::storage(Backend::Memory, "smsping"), |c| {
        c.sms.ping_interval = Duration::from_millis(200);
        c.sms.webhook_signing_key = "configured key".into();
    })
    .await;
    register(b.addr, &hooks.url("/ping"), "system:ping").await;
    let hits = hooks.wait("two pings", |h| h.len() >= 2).await;
    for h in &hits {
        assert_eq!(h.body["event"], "system:ping", "{h:?}");
        assert_eq!(
            h.body["payload"]["health"]["status"], "warn",
            "no agent: {h:?}"
        );
        assert!(signed_with(h, "configured key"), "{h:?}");
    }
    assert_ne!(hits[0].body["id"], hits[1].body["id"]);
    stop(b).await;
}

// ---- gateways, health, held and expired messages --------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_health_held_cancelled_and_expired_messages() {
    let hooks = Hooks::start(200).await;
    let st = db::storage(Backend::Sqlite, "smsdev");
    let b = start(&st, |_| {}).await;
    register(b.addr, &hooks.url("/failed"), "sms:failed").await;
    let a = api(b.addr, "GET", "/health", None).await;
    assert_eq!(
        (a.status, &a.body["status"]),
        (200, &json!("warn")),
        "{a:?}"
    );
    assert_eq!(a.body["checks"]["storage"]["status"], "pass", "{a:?}");
    assert_eq!(a.body["checks"]["agents"]["status"], "warn", "{a:?}");

    // Without an agent: a cancelled message is withdrawn, an expired one fails with the reason.
    let a = api(
        b.addr,
        "POST",
        "/messages",
        Some(send_body("c1", &["+628126666666"], "c1")),
    )
    .await;
    assert_eq!(a.status, 202, "{a:?}");
    let a = api(b.addr, "DELETE", "/messages/c1", None).await;
    assert_eq!(a.status, 204, "{a:?}");
    wait_state(b.addr, "c1", "Cancelled").await;
    let mut body = send_body("e1", &["+628126666666"], "e1");
    body["ttl"] = json!(1);
    let a = api(b.addr, "POST", "/messages", Some(body)).await;
    assert_eq!(a.status, 202, "{a:?}");
    let v = wait_state(b.addr, "e1", "Failed").await;
    assert!(
        v["recipients"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("expired")),
        "{v}"
    );
    hooks
        .wait("sms:failed of e1", |h| {
            h.iter().any(|x| x.body["payload"]["messageId"] == "e1")
        })
        .await;

    // The agent comes: it gets neither, and says what its modem is like.
    let mut agent = Agent::connect(b.addr).await;
    agent
        .report(json!([event(
            "modem:m1",
            "modem",
            json!({"modem_state": "ready", "signal_dbm": -71, "operator": "Telkomsel"})
        )]))
        .await;
    let a = api(b.addr, "GET", "/devices", None).await;
    let d = &a.body[0];
    assert_eq!(
        (&d["id"], &d["connected"]),
        (&json!("sha"), &json!(true)),
        "{a:?}"
    );
    assert_eq!(d["modems"][0]["name"], "m1", "{a:?}");
    assert_eq!(d["modems"][0]["state"], "ready", "{a:?}");
    assert_eq!(d["modems"][0]["signalDbm"], -71, "{a:?}");
    assert_eq!(d["modems"][0]["operator"], "Telkomsel", "{a:?}");
    assert!(d["lastSeen"].as_str().is_some(), "{a:?}");
    let a = api(b.addr, "GET", "/health", None).await;
    assert_eq!(a.body["status"], "pass", "{a:?}");

    // A deviceId is honoured when it names the only gateway.
    let mut body = send_body("h1", &["+628126666666"], "h1");
    body["deviceId"] = json!("sha");
    let a = api(b.addr, "POST", "/messages", Some(body)).await;
    assert_eq!(a.status, 202, "{a:?}");
    assert_eq!(
        agent.job().await["id"],
        "h1",
        "c1 and e1 never reach the agent"
    );
    // Held back by a modem's limit: Processed, and why.
    agent
        .report(json!([
            event("h1", "queued", json!({})),
            event("h1", "held", json!({"reason": "modem m1 has sent its 100 SMS part(s) per day (rate_per_day = 100)", "until": 1_900_000_000}))
        ]))
        .await;
    let v = wait_state(b.addr, "h1", "Processed").await;
    let held = v["recipients"][0]["heldBack"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        held.contains("rate_per_day = 100") && held.contains("2030-03-17"),
        "{v}"
    );
    agent.report(json!([event("h1", "sent", json!({}))])).await;
    let v = wait_state(b.addr, "h1", "Sent").await;
    assert!(v["recipients"][0].get("heldBack").is_none(), "{v}");
    let a = api(b.addr, "DELETE", "/messages/h1", None).await;
    assert_eq!(a.status, 409, "{a:?}");
    // Sent, then the network's report says it was not delivered: Failed with that reason.
    agent
        .report(json!([event("h1", "failed", json!({"error_code": "not_delivered",
            "reason": "the network reports it not delivered: validity period expired (permanent error), TP-ST 0x46"}))]))
        .await;
    let v = wait_state(b.addr, "h1", "Failed").await;
    let err = v["recipients"][0]["error"].as_str().unwrap_or_default();
    assert!(err.contains("validity period expired"), "{v}");
    assert!(v["states"]["Sent"].is_string(), "{v}");
    hooks
        .wait("sms:failed of h1", |h| {
            h.iter().any(|x| x.body["payload"]["messageId"] == "h1")
        })
        .await;

    // The agent leaves: it is shown, not connected.
    drop(agent);
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let a = api(b.addr, "GET", "/devices", None).await;
        if a.body[0]["connected"] == false {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{a:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop(b).await;
    db::cleanup(&st).await;
}

/// The agent's heartbeat tells the broker about every modem: `/devices` shows it, the metrics
/// carry it, a modem the heartbeat no longer lists goes, and heartbeats that stop while the
/// agent stays connected turn `/health` to warn with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_fill_devices_metrics_and_health() {
    let b = start(&db::storage(Backend::Memory, "smsbeat"), |_| {}).await;
    let mut agent = Agent::connect(b.addr).await;
    let modem = |name: &str, state: &str, registration: &str| {
        json!({"name": name, "state": state, "signal_dbm": -83, "operator": "Telkomsel",
               "registration": registration, "sent": 12, "failed": 2, "retried": 1,
               "last_error": "+CMS ERROR: 38 (network out of order)", "last_sent": 1_800_000_000})
    };
    let beat = |interval: u64, modems: Vec<Value>| {
        event(
            "agent",
            "heartbeat",
            json!({"agent": {"version": "9.9.9", "interval": interval, "uptime": 3600,
                   "queued": 7, "unpublished": 3, "modems": modems}}),
        )
    };
    agent
        .report(json!([beat(
            60,
            vec![
                modem("m1", "ready", "registered, home network"),
                modem("m2", "down", "registration denied")
            ]
        )]))
        .await;
    let a = api(b.addr, "GET", "/devices", None).await;
    let d = &a.body[0];
    assert_eq!(d["agent"]["version"], "9.9.9", "{a:?}");
    assert_eq!(d["agent"]["queued"], 7, "{a:?}");
    assert_eq!(d["agent"]["unpublished"], 3, "{a:?}");
    assert_eq!(d["agent"]["heartbeatInterval"], 60, "{a:?}");
    assert_eq!(d["agent"]["heartbeatLate"], false, "{a:?}");
    let m1 = &d["modems"][0];
    assert_eq!(m1["name"], "m1", "{a:?}");
    assert_eq!(m1["registration"], "registered, home network", "{a:?}");
    assert_eq!(m1["signalDbm"], -83, "{a:?}");
    assert_eq!(m1["operator"], "Telkomsel", "{a:?}");
    assert_eq!(
        (&m1["sent"], &m1["failed"], &m1["retried"]),
        (&json!(12), &json!(2), &json!(1))
    );
    assert!(
        m1["lastError"]
            .as_str()
            .unwrap_or_default()
            .contains("CMS ERROR: 38"),
        "{a:?}"
    );
    assert_eq!(m1["lastSentAt"], "2027-01-15T08:00:00.000+00:00", "{a:?}");
    assert_eq!(d["modems"][1]["state"], "down", "{a:?}");
    assert_eq!(
        (&m1["simNumber"], &d["modems"][1]["simNumber"]),
        (&json!(1), &json!(2)),
        "the simNumber that picks each modem: its place in the agent's list: {a:?}"
    );

    let m = scrape_metrics(b.addr, APP).await;
    for (key, want) in [
        (r#"wsmb_gateway_queued_jobs{gateway="sha"}"#, 7.0),
        (r#"wsmb_modem_registered{gateway="sha",modem="m1"}"#, 1.0),
        (r#"wsmb_modem_registered{gateway="sha",modem="m2"}"#, 0.0),
        (r#"wsmb_modem_ready{gateway="sha",modem="m2"}"#, 0.0),
        (
            r#"wsmb_modem_sms_total{gateway="sha",modem="m1",outcome="sent"}"#,
            12.0,
        ),
        (
            r#"wsmb_modem_sms_total{gateway="sha",modem="m1",outcome="failed"}"#,
            2.0,
        ),
        (r#"wsmb_modem_signal_dbm{gateway="sha",modem="m1"}"#, -83.0),
    ] {
        assert_eq!(metric(&m, key), want, "{key}: {m:?}");
    }
    assert!(
        m.contains_key(r#"wsmb_gateway_heartbeat_age_seconds{gateway="sha"}"#),
        "{m:?}"
    );
    let info = r#"wsmb_modem_info{gateway="sha",modem="m1",operator="Telkomsel",registration="registered, home network",last_error="+CMS ERROR: 38 (network out of order)"}"#;
    assert_eq!(metric(&m, info), 1.0, "{m:?}");

    // m2 taken out of the agent's configuration: the next heartbeat no longer lists it.
    agent
        .report(json!([beat(
            1,
            vec![modem("m1", "ready", "registered, roaming")]
        )]))
        .await;
    let a = api(b.addr, "GET", "/devices", None).await;
    assert_eq!(
        a.body[0]["modems"].as_array().map(Vec::len),
        Some(1),
        "{a:?}"
    );
    let a = api(b.addr, "GET", "/health", None).await;
    assert_eq!(a.body["checks"]["agents"]["status"], "pass", "{a:?}");

    // Then silence for more than three intervals of 1 s, the agent still connected.
    let deadline = tokio::time::Instant::now() + T;
    let a = loop {
        let a = api(b.addr, "GET", "/health", None).await;
        if a.body["checks"]["agents"]["status"] == "warn" {
            break a;
        }
        assert!(tokio::time::Instant::now() < deadline, "{a:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let why = a.body["checks"]["agents"]["description"].to_string();
    assert!(
        why.contains("connected but silent") && why.contains("sha"),
        "{a:?}"
    );
    let a = api(b.addr, "GET", "/devices", None).await;
    assert_eq!(a.body[0]["agent"]["heartbeatLate"], true, "{a:?}");
    // A heartbeat again: pass.
    agent
        .report(json!([beat(
            60,
            vec![modem("m1", "ready", "registered, roaming")]
        )]))
        .await;
    let a = api(b.addr, "GET", "/health", None).await;
    assert_eq!(a.body["checks"]["agents"]["status"], "pass", "{a:?}");
    drop(agent);
    stop(b).await;
}

/// Status events the SMS service cannot record (its database is gone) are refused with `05`,
/// so the agent keeps them and sends them again; they are taken once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_events_that_cannot_be_recorded_are_refused() {
    let st = db::storage(Backend::Sqlite, "smsrefuse");
    let b = start(&st, |_| {}).await;
    let mut agent = Agent::connect(b.addr).await;
    let a = api(
        b.addr,
        "POST",
        "/messages",
        Some(send_body("r1", &["+628126666666"], "r1")),
    )
    .await;
    assert_eq!(a.status, 202, "{a:?}");
    agent.job().await;
    let t = format!("{}sms", st.prefix);
    db::exec(&st, &format!("ALTER TABLE {t} RENAME TO {t}_away")).await;
    let code = agent.report(json!([event("r1", "sent", json!({}))])).await;
    assert_eq!(code, "05", "refused");
    db::exec(&st, &format!("ALTER TABLE {t}_away RENAME TO {t}")).await;
    let code = agent.report(json!([event("r1", "sent", json!({}))])).await;
    assert_ne!(code, "05");
    wait_state(b.addr, "r1", "Sent").await;
    stop(b).await;
    db::cleanup(&st).await;
}

/// A message that waits says why, from what the broker knows now: no agent ever, the agent
/// gone (and when it was last seen), the gateway's modems down; nothing once it moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_message_says_what_it_waits_for() {
    let st = db::storage(Backend::Sqlite, "smswait");
    let b = start(&st, |_| {}).await;
    let a = api(
        b.addr,
        "POST",
        "/messages",
        Some(send_body("w1", &["+628126666666"], "code 1")),
    )
    .await;
    assert_eq!(a.status, 202, "{a:?}");
    let waiting = |v: &Value| v["waiting"].as_str().unwrap_or_default().to_owned();
    assert!(
        waiting(&a.body).starts_with("no gateway agent has connected since the broker started"),
        "{a:?}"
    );

    let mut agent = Agent::connect_to_waiting_jobs(b.addr).await;
    assert_eq!(agent.job().await["id"], "w1");
    let modem = |state: &str, reason: &str| {
        event(
            "modem:m1",
            "modem",
            json!({"modem": "m1", "modem_state": state, "reason": reason}),
        )
    };
    agent
        .report(json!([
            event("w1", "queued", json!({})),
            modem("down", "not registered")
        ]))
        .await;
    let v = wait_state(b.addr, "w1", "Processed").await;
    assert_eq!(
        waiting(&v),
        "no modem of gateway sha is ready: m1 down (not registered)",
        "{v}"
    );
    agent.report(json!([modem("ready", "")])).await;
    let v = wait_message(b.addr, "w1", "no reason once a modem is ready", |v| {
        v.get("waiting").is_none()
    })
    .await;
    assert_eq!(v["state"], "Processed", "{v}");

    drop(agent);
    let v = wait_message(b.addr, "w1", "the agent gone", |v| {
        waiting(v).starts_with("gateway sha has it but is not connected (last seen at 20")
    })
    .await;
    assert!(
        waiting(&v).ends_with("it sends while away and reports when it is back"),
        "{v}"
    );
    let mut body = send_body("w2", &["+628126666666"], "code 2");
    body["ttl"] = json!(600);
    let a = api(b.addr, "POST", "/messages", Some(body)).await;
    assert_eq!(a.status, 202, "{a:?}");
    let w = waiting(&a.body);
    assert!(
        w.starts_with("no gateway agent is connected (the last, sha, was seen at 20")
            && w.ends_with("goes out when one connects, unless it expires first"),
        "{a:?}"
    );
    // Listed the same way.
    let a = api(b.addr, "GET", "/messages", None).await;
    let listed = a.body.as_array().expect("list");
    assert!(listed.iter().all(|m| m.get("waiting").is_some()), "{a:?}");
    stop(b).await;
    db::cleanup(&st).await;
}

/// Received SMS the agent publishes on `sms-inbox` are kept once (a frame sent again changes
/// nothing), listed by `GET /inbox` for every user, and call the signed `sms:received`
/// webhooks; the inbox survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_sms_are_kept_listed_and_call_their_webhooks() {
    let hooks = Hooks::start(200).await;
    let st = db::storage(Backend::Sqlite, "smsinbox");
    let b = start(&st, |_| {}).await;
    register(b.addr, &hooks.url("/received"), "sms:received").await;
    let mut agent = Agent::connect(b.addr).await;
    // The agent's heartbeat lists its modems in its [[modem]] order: m1 is its second.
    agent
        .report(json!([event(
            "agent",
            "heartbeat",
            json!({"agent": {"version": "1", "interval": 60, "uptime": 1, "queued": 0,
                   "unpublished": 0, "modems": [
                       {"name": "m0", "state": "ready", "sent": 0, "failed": 0, "retried": 0},
                       {"name": "m1", "state": "ready", "sent": 0, "failed": 0, "retried": 0}]}}),
        )]))
        .await;
    let items = json!([
        {"id": "in-1", "sender": "+628123456789", "message": "YA, saya setuju", "time": 1_800_000_000,
         "received_at": "2027-01-15T15:00:00+07:00", "parts": 1, "coding": "gsm7", "modem": "m1"},
        {"id": "in-2", "sender": "BANK", "message": "Saldo Anda", "time": 1_800_000_060,
         "received_at": "2027-01-15T15:01:00+07:00", "parts": 2, "partial": true, "coding": "gsm7"}
    ]);
    let code = agent.publish("sms-inbox", items.clone()).await;
    assert_eq!(code, "00", "stored for a receiver to come");
    let hits = hooks.wait("two sms:received", |h| h.len() >= 2).await;
    let key = b
        .shared
        .sms
        .as_ref()
        .expect("sms")
        .signing_key()
        .await
        .expect("key")
        .to_owned();
    for h in &hits {
        assert_eq!(h.body["event"], "sms:received", "{h:?}");
        assert_eq!(h.body["deviceId"], "sha", "{h:?}");
        assert!(signed_with(h, &key), "{h:?}");
    }
    let yes = hits
        .iter()
        .find(|h| h.body["payload"]["messageId"] == "in-1")
        .expect("in-1");
    assert_eq!(yes.body["payload"]["phoneNumber"], "+628123456789");
    assert_eq!(
        yes.body["payload"]["simNumber"], 2,
        "received by m1, the second modem"
    );
    let bank = hits
        .iter()
        .find(|h| h.body["payload"]["messageId"] == "in-2")
        .expect("in-2");
    assert_eq!(
        bank.body["payload"]["simNumber"],
        Value::Null,
        "no modem named"
    );
    assert_eq!(yes.body["payload"]["message"], "YA, saya setuju");
    assert_eq!(
        yes.body["payload"]["receivedAt"],
        "2027-01-15T15:00:00+07:00"
    );
    // Sent again: nothing new.
    agent.publish("sms-inbox", items).await;
    let list = |a: Answer| {
        let mut ids: Vec<String> = a
            .body
            .as_array()
            .expect("list")
            .iter()
            .map(|m| m["id"].as_str().unwrap_or_default().to_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(
        list(api(b.addr, "GET", "/inbox", None).await),
        ["in-1", "in-2"]
    );
    // Every user sees the gateway's inbox.
    let other = request(b.addr, "GET", "/inbox?limit=1", Some(SHA_USER), None, "").await;
    assert_eq!(other.body.as_array().map(Vec::len), Some(1), "{other:?}");
    let a = api(b.addr, "GET", "/inbox", None).await;
    let bank = a
        .body
        .as_array()
        .and_then(|l| l.iter().find(|m| m["id"] == "in-2").cloned())
        .expect("in-2");
    assert_eq!(bank["phoneNumber"], "BANK");
    assert_eq!(bank["partial"], true);
    let yes = a
        .body
        .as_array()
        .and_then(|l| l.iter().find(|m| m["id"] == "in-1").cloned())
        .expect("in-1");
    assert_eq!(yes["simNumber"], 2, "{yes}");
    assert_eq!(bank["deviceId"], "sha");
    assert_eq!(
        hooks.hits().len(),
        2,
        "no second call for a frame sent again"
    );
    drop(agent);
    stop(b).await;
    let b = start(&st, |_| {}).await;
    assert_eq!(
        list(api(b.addr, "GET", "/inbox", None).await),
        ["in-1", "in-2"]
    );
    stop(b).await;
    db::cleanup(&st).await;
}

/// Received SMS are bounded like message states: past `sms.max_messages` kept, a frame is
/// refused with `05` (the agent keeps it and sends it again later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_sms_past_the_limit_are_refused_not_dropped() {
    let b = start(&db::storage(Backend::Memory, "smsinboxcap"), |c| {
        c.sms.max_messages = 1;
    })
    .await;
    let mut agent = Agent::connect(b.addr).await;
    let item = |id: &str| {
        json!([{"id": id, "sender": "+628123456789", "message": "x", "time": 1_800_000_000,
                "received_at": "2027-01-15T15:00:00+07:00", "parts": 1, "coding": "gsm7"}])
    };
    assert_ne!(agent.publish("sms-inbox", item("a")).await, "05");
    assert_eq!(agent.publish("sms-inbox", item("b")).await, "05");
    let a = api(b.addr, "GET", "/inbox", None).await;
    assert_eq!(a.body.as_array().map(Vec::len), Some(1), "{a:?}");
    stop(b).await;
}

/// `/metrics` follows the SMS service: API requests by status, messages by outcome, webhook
/// calls, and the gateway with its modem as the agent last said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_messages_webhooks_and_gateways() {
    let hooks = Hooks::start(200).await;
    let b = start(&db::storage(Backend::Memory, "smsmetrics"), |_| {}).await;
    let mut agent = Agent::connect(b.addr).await;
    register(b.addr, &hooks.url("/sent"), "sms:sent").await;
    let a = api(
        b.addr,
        "POST",
        "/messages",
        Some(send_body("x1", &["+628126666666", "+628127777777"], "x1")),
    )
    .await;
    assert_eq!(a.status, 202, "{a:?}");
    let a = api(b.addr, "GET", "/messages/nope", None).await;
    assert_eq!(a.status, 404, "{a:?}");
    let (j1, j2) = (agent.job().await, agent.job().await);
    let (id1, id2) = (
        j1["id"].as_str().expect("id").to_owned(),
        j2["id"].as_str().expect("id").to_owned(),
    );
    agent
        .report(json!([
            event(&id1, "sent", json!({})),
            event(&id2, "failed", json!({"reason": "no such number"})),
            event(&id1, "delivered", json!({})),
            event(
                "modem:m1",
                "modem",
                json!({"modem_state": "ready", "signal_dbm": -71})
            )
        ]))
        .await;
    wait_state(b.addr, "x1", "Failed").await;
    hooks
        .wait("sms:sent of x1", |h| {
            h.iter().any(|x| x.body["payload"]["messageId"] == "x1")
        })
        .await;
    // The call is counted once the endpoint's answer is in.
    let deadline = tokio::time::Instant::now() + T;
    let m = loop {
        let m = scrape_metrics(b.addr, APP).await;
        if metric(&m, r#"wsmb_webhook_calls_total{outcome="delivered"}"#) >= 1.0 {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    for (key, want) in [
        (r#"wsmb_sms_total{event="accepted"}"#, 1.0),
        (r#"wsmb_sms_total{event="sent"}"#, 1.0),
        (r#"wsmb_sms_total{event="delivered"}"#, 1.0),
        (r#"wsmb_sms_total{event="failed"}"#, 1.0),
        (r#"wsmb_sms_total{event="received"}"#, 0.0),
        (r#"wsmb_http_api_requests_total{status="202"}"#, 1.0),
        (r#"wsmb_http_api_requests_total{status="404"}"#, 1.0),
        (r#"wsmb_webhook_calls_total{outcome="given_up"}"#, 0.0),
        (r#"wsmb_gateway_connected{gateway="sha"}"#, 1.0),
        (r#"wsmb_modem_ready{gateway="sha",modem="m1"}"#, 1.0),
        (r#"wsmb_modem_signal_dbm{gateway="sha",modem="m1"}"#, -71.0),
    ] {
        assert_eq!(metric(&m, key), want, "{key}");
    }
    stop(b).await;
}
