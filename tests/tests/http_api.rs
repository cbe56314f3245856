//! The HTTP SMS API (`/3rdparty/v1`) end to end: the official SMSGate clients (Python from
//! PyPI, JS from npm), PHP with curl, the real broker and agent binaries on a simulated modem,
//! and webhooks received by a local HTTP server that checks their signatures itself.
//!
//! The clients come from `.ci/run`: `WSMB_TEST_PYTHON` (a venv with `android-sms-gateway`) and
//! `WSMB_TEST_NODE_MODULES` (a folder with the npm package `android-sms-gateway`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use wsmb_agent::sim::{SimConfig, Simulator};
use wsmb_e2e::{Proc, QA_PASSWORD, agent_config, ready_agent, repo_root, scratch, sqlite_broker};

const T: Duration = Duration::from_secs(30);
const BROKER: &str = env!("CARGO_BIN_EXE_e2e-broker");
const AGENT: &str = env!("CARGO_BIN_EXE_e2e-agent");

/// Webhook retries fast enough for a test.
const FAST_RETRY: &str =
    "[sms]\nwebhook_retry_initial = \"200ms\"\nwebhook_retry_max = \"400ms\"\n";

// ---- a webhook receiver ---------------------------------------------------------------------

/// One webhook call as received.
#[derive(Debug, Clone)]
struct Hit {
    headers: HashMap<String, String>,
    body: String,
    answered: u16,
}

impl Hit {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// A local HTTP server that records every call; the first `fail_first` get a 500.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    hits: Arc<(Mutex<Vec<Hit>>, Condvar)>,
}

impl Receiver {
    fn start(fail_first: usize) -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let hits: Arc<(Mutex<Vec<Hit>>, Condvar)> = Arc::default();
        let h = Arc::clone(&hits);
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let Some((headers, body)) = read_request(&mut conn) else {
                    continue;
                };
                let (lock, cv) = &*h;
                let mut v = lock.lock().expect("lock");
                let answered = if v.len() < fail_first { 500 } else { 200 };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {answered} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                v.push(Hit {
                    headers,
                    body,
                    answered,
                });
                cv.notify_all();
            }
        });
        Receiver { addr, hits }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Waits until `pred` holds for the calls received; returns them.
    fn wait(&self, what: &str, pred: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
        let (lock, cv) = &*self.hits;
        let deadline = Instant::now() + T;
        let mut v = lock.lock().expect("lock");
        while !pred(&v) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("webhook receiver: {what} did not happen: {v:#?}"));
            v = cv.wait_timeout(v, left).expect("wait").0;
        }
        v.clone()
    }
}

fn read_request(conn: &mut std::net::TcpStream) -> Option<(HashMap<String, String>, String)> {
    let mut r = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut headers = HashMap::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).ok()?;
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    headers.insert(":request".into(), line.trim().to_owned());
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((headers, String::from_utf8(body).ok()?))
}

/// Checks a call's signature with our own HMAC: hex HMAC-SHA256 over body + timestamp.
fn signature_ok(hit: &Hit, key: &str) -> bool {
    let (Some(ts), Some(sig)) = (
        hit.headers.get("x-timestamp"),
        hit.headers.get("x-signature"),
    ) else {
        return false;
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("key");
    mac.update(hit.body.as_bytes());
    mac.update(ts.as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let fresh = ts
        .parse::<u64>()
        .ok()
        .zip(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok(),
        )
        .is_some_and(|(t, now)| now.as_secs().abs_diff(t) < 300);
    *sig == want && fresh
}

// ---- the bundle -----------------------------------------------------------------------------

struct Bundle {
    dir: PathBuf,
    broker: Option<Proc>,
    addr: SocketAddr,
    sim: Simulator,
    agent: Option<Proc>,
}

impl Bundle {
    /// Broker (SQLite, `broker_toml` as its config file), simulated modem, agent (`agent_extra`
    /// in its modem section).
    async fn start(tag: &str, broker_toml: &str, agent_extra: &str) -> Bundle {
        Bundle::start_with(tag, broker_toml, agent_extra, SimConfig::default()).await
    }

    /// [`Bundle::start`] with a simulated modem configured by `sim`.
    async fn start_with(tag: &str, broker_toml: &str, agent_extra: &str, sim: SimConfig) -> Bundle {
        let dir = scratch(tag);
        let cfg = dir.join("broker.toml");
        std::fs::write(&cfg, broker_toml).expect("config");
        let (broker, addr) = tokio::task::block_in_place(|| {
            sqlite_broker(
                BROKER,
                &dir,
                "127.0.0.1:0",
                &["--config", &cfg.display().to_string()],
            )
        });
        let sim = Simulator::start(dir.join("modem"), sim).await.expect("sim");
        let mut b = Bundle {
            dir,
            broker: Some(broker),
            addr,
            sim,
            agent: None,
        };
        b.start_agent(agent_extra);
        b
    }

    fn start_agent(&mut self, extra: &str) {
        let cfg = agent_config(
            &self.dir,
            &format!("ws://{}/", self.addr),
            self.sim.path(),
            extra,
        );
        self.agent = Some(tokio::task::block_in_place(|| ready_agent(AGENT, &cfg)));
    }

    fn restart_broker(&mut self) {
        drop(self.broker.take());
        let cfg = self.dir.join("broker.toml").display().to_string();
        let listen = self.addr.to_string();
        let (b, _) = tokio::task::block_in_place(|| {
            sqlite_broker(BROKER, &self.dir, &listen, &["--config", &cfg])
        });
        self.broker = Some(b);
    }

    fn base(&self) -> String {
        format!("http://{}/3rdparty/v1", self.addr)
    }

    /// `wsmb-broker webhook-key` on this broker's state.
    fn key(&self) -> String {
        let out = Command::new(BROKER)
            .args([
                "--config",
                &self.dir.join("broker.toml").display().to_string(),
                "--state-dir",
                &self.dir.join("broker").display().to_string(),
                "webhook-key",
            ])
            .env_remove("WSMB_WEBHOOK_KEY")
            .output()
            .expect("webhook-key");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The broker's metrics, as text (curl, user qa).
    fn metrics(&self) -> String {
        let out = Command::new("curl")
            .args(["-s", "-f", "-u", &format!("qa:{QA_PASSWORD}")])
            .arg(format!("http://{}/metrics", self.addr))
            .output()
            .expect("curl");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One API request with curl: (status, JSON body or Null).
    fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-u", &format!("qa:{QA_PASSWORD}"), "-X", method])
            .args(["-w", "\n%{http_code}", &format!("{}{path}", self.base())]);
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "-d", &b.to_string()]);
        }
        let out = cmd.output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }

    /// Polls `GET /messages/{id}` until its state is `state` (every 50 ms, for `T` at most).
    fn wait_state(&self, id: &str, state: &str) -> Value {
        let deadline = Instant::now() + T;
        loop {
            let (code, v) = self.api("GET", &format!("/messages/{id}"), None);
            if code == 200 && v["state"] == state {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{id} never became {state}: {code} {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Publishes `data` on `channel` over WebSocket as user qa, as the PHP sender does; returns
/// the broker's response code.
async fn ws_publish(addr: SocketAddr, channel: &str, data: Value) -> String {
    use base64::Engine as _;
    use futures_util::{SinkExt, StreamExt};
    let url = format!("ws://{addr}/");
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .expect("req");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("qa:{QA_PASSWORD}"));
    req.headers_mut().insert(
        "Authorization",
        format!("Basic {auth}").parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("ws");
    let frame = json!({"command": "send-message", "channel": channel, "data": data});
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        frame.to_string(),
    ))
    .await
    .expect("send");
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a send-result in time");
        let Some(Ok(m)) = m else {
            panic!("the connection ended before the send-result");
        };
        if let Ok(t) = m.to_text() {
            let v: Value = serde_json::from_str(t).unwrap_or(Value::Null);
            if v["command"] == "send-result" {
                return v["response_code"].as_str().unwrap_or_default().to_owned();
            }
        }
    }
}

/// A file of JSON lines that something else appends to.
struct LogFile {
    path: PathBuf,
}

impl LogFile {
    /// Polls until a line contains `needle`; returns it.
    fn wait(&self, needle: &str) -> String {
        let deadline = Instant::now() + T;
        loop {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.contains(needle)) {
                return l.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{needle} not in {}: {text}",
                self.path.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn send_body(id: &str, text: &str, extra: Value) -> Value {
    let mut b = json!({"id": id, "textMessage": {"text": text}, "phoneNumbers": ["+628126666666"]});
    if let (Some(o), Value::Object(e)) = (b.as_object_mut(), extra) {
        o.extend(e);
    }
    b
}

fn tool(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(default))
}

fn run(mut cmd: Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (.ci/run installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// The last line of `out` that parses as JSON.
fn last_json(out: &str) -> Value {
    out.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| panic!("no JSON line in:\n{out}"))
}

/// The sim got `text` for +628126666666, and the webhook receiver a signed `sms:sent` for
/// message `id` of webhook `hook`.
fn check_sent_and_signed(b: &Bundle, hooks: &Receiver, id: &str, hook: &str, text: &str) {
    let msgs = b.sim.messages();
    assert!(
        msgs.iter().any(|(n, t)| n == "+628126666666" && t == text),
        "the modem did not get it: {msgs:?}"
    );
    let hits = hooks.wait("sms:sent", |h| {
        h.iter().any(|x| x.json()["payload"]["messageId"] == id)
    });
    let hit = hits
        .iter()
        .find(|x| x.json()["payload"]["messageId"] == id)
        .expect("hit");
    let v = hit.json();
    assert_eq!(v["event"], "sms:sent", "{v}");
    assert_eq!(v["webhookId"], hook, "{v}");
    assert_eq!(v["deviceId"], "qa", "{v}");
    assert_eq!(v["payload"]["phoneNumber"], "+628126666666", "{v}");
    assert!(v["id"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    assert!(signature_ok(hit, &b.key()), "bad signature: {hit:?}");
    assert!(!signature_ok(hit, "another key"));
}

// ---- the tests ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_sends_reads_the_state_and_gets_a_signed_webhook() {
    let b = Bundle::start("api-py", "", "").await;
    let hooks = Receiver::start(0);
    let script = r#"
import json, os, time
import android_sms_gateway as g
with g.APIClient("qa", os.environ["PW"], base_url=os.environ["BASE"]) as c:
    hook = c.create_webhook(g.Webhook(id=None, url=os.environ["HOOK"], event=g.WebhookEvent.SMS_SENT))
    st = c.send(g.Message(phone_numbers=["+628126666666"], text_message=g.TextMessage(text="Your code is 482913"), id="py-otp-1", sim_number=1))
    print("accepted:", st.state.value, flush=True)
    def settled(st):
        deadline = time.time() + 30
        while st.state.value not in ("Sent", "Delivered", "Failed") and time.time() < deadline:
            time.sleep(0.05)
            st = c.get_state(st.id)
        return st
    st = settled(st)
    listed = [m.id for m in c.get_messages()]
    sim2 = settled(c.send(g.Message(phone_numbers=["+628126666667"], text_message=g.TextMessage(text="x"), id="py-sim-2", sim_number=2)))
    print(json.dumps({"hook": hook.id, "state": st.state.value,
                      "recipients": [[r.phone_number, r.state.value] for r in st.recipients],
                      "states": sorted((st.states or {}).keys()),
                      "listed": listed,
                      "webhooks": [w.url for w in c.get_webhooks()],
                      "sim2": [sim2.state.value, sim2.recipients[0].error]}))
"#;
    let py = tool("WSMB_TEST_PYTHON", "target/ci-venv/bin/python");
    let mut cmd = Command::new(&py);
    cmd.args(["-c", script])
        .env("PW", QA_PASSWORD)
        .env("BASE", b.base())
        .env("HOOK", hooks.url());
    let out = tokio::task::block_in_place(|| run(cmd, "the Python client (android-sms-gateway)"));
    assert!(out.contains("accepted: Pending"), "{out}");
    let v = last_json(&out);
    assert_eq!(v["state"], "Sent", "{out}");
    assert_eq!(v["recipients"], json!([["+628126666666", "Sent"]]), "{out}");
    assert_eq!(
        v["states"],
        json!(["Pending", "Processed", "Sent"]),
        "{out}"
    );
    assert_eq!(v["listed"], json!(["py-otp-1"]), "{out}");
    assert_eq!(v["webhooks"], json!([hooks.url()]), "{out}");
    // simNumber picks the gateway's modem by position: the client's sim_number=1 went through
    // the one modem; 2 fails with the modems there are.
    assert_eq!(v["sim2"][0], "Failed", "{out}");
    assert!(
        v["sim2"][1].as_str().is_some_and(
            |e| e.contains("sim 2: this gateway has 1 modem(s) (sim1); use 1 or leave sim out")
        ),
        "{out}"
    );
    let hook = v["hook"].as_str().expect("hook id").to_owned();
    tokio::task::block_in_place(|| {
        check_sent_and_signed(&b, &hooks, "py-otp-1", &hook, "Your code is 482913")
    });
    // The client's default withDeliveryReport = true asked the network for a report.
    let sent = b.sim.sent();
    assert!(
        sent.iter()
            .filter_map(|s| s.submit.as_ref())
            .all(|s| s.status_report),
        "TP-SRR not set: {sent:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_js_client_sends_reads_the_state_and_gets_a_signed_webhook() {
    let b = Bundle::start("api-js", "", "").await;
    let hooks = Receiver::start(0);
    let script = r#"
const Client = require("android-sms-gateway").default;
const http = {
  get: async (url, headers) => (await fetch(url, { method: "GET", headers })).json(),
  post: async (url, body, headers) =>
    (await fetch(url, { method: "POST", headers, body: JSON.stringify(body) })).json(),
  delete: async (url, headers) => { await fetch(url, { method: "DELETE", headers }); },
};
(async () => {
  const api = new Client("qa", process.env.PW, http, process.env.BASE);
  const hook = await api.registerWebhook({ url: process.env.HOOK, event: "sms:sent" });
  let st = await api.send({ id: "js-otp-1", phoneNumbers: ["+628126666666"],
                            textMessage: { text: "Kode Anda 771204" } });
  console.log("accepted:", st.state);
  const deadline = Date.now() + 30000;
  while (!["Sent", "Delivered", "Failed"].includes(st.state) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
    st = await api.getState("js-otp-1");
  }
  const health = await api.getHealth();
  console.log(JSON.stringify({ hook: hook.id, state: st.state,
                               recipients: st.recipients.map((r) => [r.phoneNumber, r.state]),
                               health: health.status, checks: Object.keys(health.checks).sort() }));
})().catch((e) => { console.error(e); process.exit(1); });
"#;
    let modules = tool("WSMB_TEST_NODE_MODULES", "target/ci-node/node_modules");
    let mut cmd = Command::new("node");
    cmd.args(["-e", script])
        .env("NODE_PATH", &modules)
        .env("PW", QA_PASSWORD)
        .env("BASE", b.base())
        .env("HOOK", hooks.url());
    let out = tokio::task::block_in_place(|| run(cmd, "the JS client (npm android-sms-gateway)"));
    assert!(out.contains("accepted: Pending"), "{out}");
    let v = last_json(&out);
    assert_eq!(v["state"], "Sent", "{out}");
    assert_eq!(v["recipients"], json!([["+628126666666", "Sent"]]), "{out}");
    assert_eq!(v["health"], "pass", "{out}");
    assert_eq!(v["checks"], json!(["agents", "modems", "storage"]), "{out}");
    let hook = v["hook"].as_str().expect("hook id").to_owned();
    tokio::task::block_in_place(|| {
        check_sent_and_signed(&b, &hooks, "js-otp-1", &hook, "Kode Anda 771204")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_php_curl_example_sends_an_otp_and_prints_its_state() {
    let b = Bundle::start("api-php", "", "").await;
    // The webhook receiver example under PHP's built-in server, given the broker's key.
    let hook_log = LogFile {
        path: b.dir.join("webhooks.jsonl"),
    };
    let mut server = Command::new("php");
    server
        .args(["-S", "127.0.0.1:0"])
        .arg(repo_root().join("clients/php/examples/webhook-receiver.php"))
        .env("WSMB_WEBHOOK_KEY", b.key())
        .env("WSMB_WEBHOOK_LOG", &hook_log.path)
        .env("TMPDIR", &b.dir);
    let php_server = tokio::task::block_in_place(|| Proc::spawn(server)).expect("php -S");
    let started = tokio::task::block_in_place(|| php_server.wait_line("started", T))
        .unwrap_or_else(|| panic!("php -S: {}", php_server.output()));
    let receiver_url = started
        .split("(http://")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .map(|a| format!("http://{a}/"))
        .expect("address");
    let (code, h) = tokio::task::block_in_place(|| {
        b.api(
            "POST",
            "/webhooks",
            Some(json!({"url": receiver_url, "event": "sms:sent"})),
        )
    });
    assert_eq!(code, 201, "{h}");
    let example = repo_root().join("clients/php/examples/http-send-otp.php");
    let mut cmd = Command::new("php");
    cmd.arg(&example)
        .args(["+628126666666", "Your code is 118822"])
        .env("WSMB_API", b.base())
        .env("WSMB_USER", "qa")
        .env("WSMB_PASSWORD", QA_PASSWORD);
    let out = tokio::task::block_in_place(|| run(cmd, "php with php-curl"));
    assert!(out.contains("accepted: Pending"), "{out}");
    assert!(out.contains("state: Sent"), "{out}");
    // The PHP webhook receiver example checked the broker's signature and recorded the event.
    let id = out
        .lines()
        .find_map(|l| l.split("(id ").nth(1))
        .map(|r| r.trim_end_matches(')').to_owned())
        .expect("the example prints the id");
    let line = hook_log.wait(&format!("\"messageId\":\"{id}\""));
    let v: Value = serde_json::from_str(&line).expect("json");
    assert_eq!(v["event"], "sms:sent", "{line}");
    assert_eq!(v["phoneNumber"], "+628126666666", "{line}");
    // A forged call is refused; the same event again is taken and not recorded twice.
    let forged = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "X-Timestamp: 1",
        ])
        .args(["-H", "X-Signature: 00", "-d", "{}", &receiver_url])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&forged.stdout), "401");
    let key = b.key();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        .to_string();
    let body = json!({"deviceId": "qa", "event": "sms:sent", "id": v["id"], "payload": {"messageId": id}, "webhookId": "x"}).to_string();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("key");
    mac.update(body.as_bytes());
    mac.update(ts.as_bytes());
    let sig: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let again = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .args([
            "-H",
            &format!("X-Timestamp: {ts}"),
            "-H",
            &format!("X-Signature: {sig}"),
        ])
        .args(["-d", &body, &receiver_url])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&again.stdout), "204");
    let recorded = std::fs::read_to_string(&hook_log.path).unwrap_or_default();
    assert_eq!(
        recorded.lines().filter(|l| l.contains(&id)).count(),
        1,
        "{recorded}"
    );
    let msgs = b.sim.messages();
    assert!(
        msgs.contains(&("+628126666666".into(), "Your code is 118822".into())),
        "{msgs:?}"
    );
    // A bad number: the example prints the API's reason and exits 1.
    let mut cmd = Command::new("php");
    cmd.arg(&example)
        .args(["0812", "x"])
        .env("WSMB_API", b.base())
        .env("WSMB_USER", "qa")
        .env("WSMB_PASSWORD", QA_PASSWORD);
    let out = cmd.output().expect("php");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("HTTP 400") && text.contains("international format"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_fails_five_times_is_delivered_once_across_a_broker_kill() {
    let mut b = Bundle::start("api-retry", FAST_RETRY, "").await;
    let hooks = Receiver::start(5);
    let (code, h) = b.api(
        "POST",
        "/webhooks",
        Some(json!({"url": hooks.url(), "event": "sms:sent", "id": "flaky"})),
    );
    assert_eq!(code, 201, "{h}");
    let (code, v) = b.api(
        "POST",
        "/messages",
        Some(send_body("retry-1", "Code 5501", json!({}))),
    );
    assert_eq!(code, 202, "{v}");
    tokio::task::block_in_place(|| {
        hooks.wait("two failed calls", |h| h.len() >= 2);
        // Killed between failures: the call is in the database and is tried again after the
        // restart.
        b.restart_broker();
        let hits = hooks.wait("a 2xx", |h| h.iter().any(|x| x.answered == 200));
        assert_eq!(
            hits.iter().filter(|x| x.answered == 500).count(),
            5,
            "{hits:#?}"
        );
        let event = hits[0].json()["id"].clone();
        assert!(
            hits.iter().all(|x| x.json()["id"] == event),
            "one event: {hits:#?}"
        );
        // Done: nothing of it is left to send again.
        let deadline = Instant::now() + T;
        loop {
            let (_, list) = b.api("GET", "/webhooks", None);
            let w = &list[0];
            if w["pendingDeliveries"] == 0 {
                assert_eq!(w["failedDeliveries"], 0, "{w}");
                assert_eq!(w["id"], "flaky");
                break;
            }
            assert!(Instant::now() < deadline, "still pending: {list}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let ok = hooks
            .wait("the 2xx", |h| h.iter().any(|x| x.answered == 200))
            .iter()
            .filter(|x| x.answered == 200)
            .count();
        assert_eq!(ok, 1, "exactly one successful delivery");
        b.wait_state("retry-1", "Sent");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_ids_cancel_expiry_and_bad_input() {
    let mut b = Bundle::start("api-rules", "", "").await;
    tokio::task::block_in_place(|| {
        // A repeated id is not sent again; the same id with another text is a conflict.
        let (code, _) = b.api(
            "POST",
            "/messages",
            Some(send_body("dup-1", "Code 1", json!({}))),
        );
        assert_eq!(code, 202);
        b.wait_state("dup-1", "Sent");
        let (code, v) = b.api(
            "POST",
            "/messages",
            Some(send_body("dup-1", "Code 1", json!({}))),
        );
        assert_eq!((code, v["state"].as_str()), (200, Some("Sent")), "{v}");
        let (code, v) = b.api(
            "POST",
            "/messages",
            Some(send_body("dup-1", "Code 2", json!({}))),
        );
        assert_eq!(code, 409, "{v}");
        // Bad input: 400 with the reason.
        for (body, needle) in [
            (
                json!({"textMessage": {"text": "x"}, "phoneNumbers": ["12"]}),
                "international format",
            ),
            (
                json!({"textMessage": {"text": " "}, "phoneNumbers": ["+628126666666"]}),
                "empty",
            ),
            (json!({"phoneNumbers": ["+628126666666"]}), "no text"),
            (
                send_body("long", &"x".repeat(153 * 10 + 1), json!({})),
                "11 SMS parts",
            ),
            (
                send_body(
                    "both",
                    "x",
                    json!({"ttl": 60, "validUntil": "2030-01-01T00:00:00Z"}),
                ),
                "mutually exclusive",
            ),
            (send_body("prio", "x", json!({"priority": 300})), "priority"),
        ] {
            let (code, v) = b.api("POST", "/messages", Some(body));
            assert_eq!(code, 400, "{v}");
            assert!(
                v["message"].as_str().is_some_and(|m| m.contains(needle)),
                "{needle}: {v}"
            );
        }
        let (code, v) = b.api("GET", "/messages/nope", None);
        assert_eq!(code, 404, "{v}");
        // With no agent: a cancelled message is never sent, an expired one fails.
        drop(b.agent.take());
        let (code, _) = b.api(
            "POST",
            "/messages",
            Some(send_body("cancel-1", "Cancelled code", json!({}))),
        );
        assert_eq!(code, 202);
        let (code, _) = b.api("DELETE", "/messages/cancel-1", None);
        assert_eq!(code, 204);
        let v = b.wait_state("cancel-1", "Cancelled");
        assert_eq!(v["recipients"][0]["state"], "Cancelled", "{v}");
        let (code, _) = b.api(
            "POST",
            "/messages",
            Some(send_body("expire-1", "Expired code", json!({"ttl": 1}))),
        );
        assert_eq!(code, 202);
        let v = b.wait_state("expire-1", "Failed");
        assert!(
            v["recipients"][0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("expired")),
            "{v}"
        );
    });
    b.start_agent("");
    tokio::task::block_in_place(|| {
        let (code, _) = b.api(
            "POST",
            "/messages",
            Some(send_body("after-1", "After code", json!({}))),
        );
        assert_eq!(code, 202);
        b.wait_state("after-1", "Sent");
        let (code, v) = b.api("DELETE", "/messages/after-1", None);
        assert_eq!(code, 409, "{v}");
        let texts: Vec<String> = b.sim.messages().into_iter().map(|(_, t)| t).collect();
        assert_eq!(
            texts,
            ["Code 1", "After code"],
            "sent once each, cancelled and expired never"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_jobs_are_tracked_and_their_webhooks_fire() {
    let b = Bundle::start("api-ws", "", "").await;
    let hooks = Receiver::start(0);
    let (code, h) = tokio::task::block_in_place(|| {
        b.api(
            "POST",
            "/webhooks",
            Some(json!({"url": hooks.url(), "event": "sms:sent"})),
        )
    });
    assert_eq!(code, 201, "{h}");
    // The legacy way: a send-message on `sms` over WebSocket, as the PHP sender does.
    let code = ws_publish(
        b.addr,
        "sms",
        json!([{"id": "ws-job-7", "time": 1_800_000_000, "receiver": "08126666666", "message": "Legacy code 7"}]),
    )
    .await;
    assert_eq!(code, "00");
    tokio::task::block_in_place(|| {
        let v = b.wait_state("ws-job-7", "Sent");
        assert_eq!(v["deviceId"], "qa", "{v}");
        let hits = hooks.wait("sms:sent of ws-job-7", |h| {
            h.iter()
                .any(|x| x.json()["payload"]["messageId"] == "ws-job-7")
        });
        assert!(signature_ok(&hits[0], &b.key()));
        let (code, devices) = b.api("GET", "/devices", None);
        assert_eq!(code, 200);
        assert_eq!(devices[0]["id"], "qa", "{devices}");
        assert_eq!(devices[0]["connected"], true, "{devices}");
    });
}

/// Jobs ask for a delivery report by themselves (`withDeliveryReport`), whatever the agent's
/// default (off here); `false` leaves it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_delivery_report_sets_tp_srr_per_job() {
    let b = Bundle::start("api-srr", "", "").await;
    tokio::task::block_in_place(|| {
        for (id, report) in [("srr-on", true), ("srr-off", false)] {
            let (code, v) = b.api(
                "POST",
                "/messages",
                Some(send_body(id, id, json!({"withDeliveryReport": report}))),
            );
            assert_eq!(code, 202, "{v}");
            b.wait_state(id, "Sent");
        }
    });
    let sent = b.sim.sent();
    let srr = |text: &str| {
        sent.iter()
            .filter_map(|s| s.submit.as_ref())
            .find(|s| s.text == text)
            .map(|s| s.status_report)
    };
    assert_eq!(srr("srr-on"), Some(true), "{sent:?}");
    assert_eq!(srr("srr-off"), Some(false), "{sent:?}");
    let _ = Path::new("");
}

/// A modem's sending limit holds a message back, and the API says so and until when; the
/// gateway shows its modem with signal and operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modem_limit_holds_a_message_back_visibly() {
    let b = Bundle::start("api-held", "", "rate_per_minute = 1\n").await;
    tokio::task::block_in_place(|| {
        let (code, _) = b.api(
            "POST",
            "/messages",
            Some(send_body("first", "First code", json!({}))),
        );
        assert_eq!(code, 202);
        b.wait_state("first", "Sent");
        let (code, _) = b.api(
            "POST",
            "/messages",
            Some(send_body("second", "Second code", json!({}))),
        );
        assert_eq!(code, 202);
        let deadline = Instant::now() + T;
        let v = loop {
            let (_, v) = b.api("GET", "/messages/second", None);
            if v["recipients"][0]["heldBack"].is_string() {
                break v;
            }
            assert!(Instant::now() < deadline, "never held: {v}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(v["state"], "Processed", "{v}");
        let held = v["recipients"][0]["heldBack"].as_str().unwrap_or_default();
        assert!(
            held.contains("rate_per_minute = 1") && held.contains("sends it from"),
            "{v}"
        );
        assert_eq!(b.sim.messages().len(), 1, "the second waits");
        let (_, devices) = b.api("GET", "/devices", None);
        let m = &devices[0]["modems"][0];
        assert_eq!(m["name"], "sim1", "{devices}");
        assert_eq!(m["state"], "ready", "{devices}");
        assert!(m["signalDbm"].as_i64().is_some_and(|d| d < 0), "{devices}");
        assert!(
            m["operator"].as_str().is_some_and(|o| !o.is_empty()),
            "{devices}"
        );
    });
}

/// `wsmb-broker webhook-key`: the key made at first start and kept, or `WSMB_WEBHOOK_KEY`.
#[test]
fn the_webhook_key_command_shows_the_kept_key_or_the_environments() {
    let dir = scratch("api-key");
    std::fs::write(dir.join("broker.toml"), "").expect("config");
    let key = |env: Option<&str>| {
        let mut cmd = Command::new(BROKER);
        cmd.args([
            "--config",
            &dir.join("broker.toml").display().to_string(),
            "--state-dir",
            &dir.join("broker").display().to_string(),
            "webhook-key",
        ])
        .env_remove("WSMB_WEBHOOK_KEY");
        if let Some(k) = env {
            cmd.env("WSMB_WEBHOOK_KEY", k);
        }
        let out = cmd.output().expect("webhook-key");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let made = key(None);
    assert_eq!(made.len(), 64, "{made}");
    assert_eq!(key(None), made, "kept in the state directory");
    assert_eq!(key(Some("from the environment")), "from the environment");
}

/// An OTP sent through the HTTP API goes from `Sent` to `Delivered` when the network's
/// delivery report comes (the official clients' default `withDeliveryReport`), with a signed
/// `sms:delivered`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_otp_goes_from_sent_to_delivered_with_its_webhook() {
    let sim = SimConfig {
        delivery_report: Some(0x00),
        ..SimConfig::default()
    };
    let b = Bundle::start_with("api-dlr", "", "", sim).await;
    let hooks = Receiver::start(0);
    tokio::task::block_in_place(|| {
        let (code, h) = b.api(
            "POST",
            "/webhooks",
            Some(json!({"url": hooks.url(), "event": "sms:delivered"})),
        );
        assert_eq!(code, 201, "{h}");
        let (code, v) = b.api(
            "POST",
            "/messages",
            Some(send_body("dlr-1", "Your code is 660021", json!({}))),
        );
        assert_eq!(code, 202, "{v}");
        let v = b.wait_state("dlr-1", "Delivered");
        for s in ["Pending", "Processed", "Sent", "Delivered"] {
            assert!(v["states"][s].is_string(), "{s}: {v}");
        }
        assert_eq!(v["recipients"][0]["state"], "Delivered", "{v}");
        let hits = hooks.wait("sms:delivered", |h| {
            h.iter()
                .any(|x| x.json()["payload"]["messageId"] == "dlr-1")
        });
        let hit = &hits[0];
        assert_eq!(hit.json()["event"], "sms:delivered");
        assert_eq!(hit.json()["payload"]["phoneNumber"], "+628126666666");
        assert!(signature_ok(hit, &b.key()), "{hit:?}");
    });
    assert_eq!(b.sim.reports().len(), 1);
}

/// An SMS received by the modem (its PDU from Gammu's encoder, in two parts) reaches the
/// original `receiver.php` listening on `sms-inbox`, `GET /inbox`, and a signed
/// `sms:received` webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_received_sms_reaches_a_legacy_php_receiver_the_inbox_and_the_webhook() {
    let b = Bundle::start("api-inbound", "", "").await;
    let hooks = Receiver::start(0);
    let text = "Balasan: YA, saya setuju dengan pesanan #4821. Terima kasih banyak atas \
                bantuannya, kami tunggu kiriman berikutnya minggu depan. Salam hangat dari \
                seluruh tim kami di Bandung.";
    let pdus = wsmb_e2e::gammu_deliver(text, "+628123456789");
    assert_eq!(pdus.len(), 2);
    let dir = repo_root().join("tests/fixtures/legacy-php");
    let mut php = Command::new("php");
    php.current_dir(&dir)
        .arg(dir.join("receiver.php"))
        .env("MQ_SERVER_HOST", "127.0.0.1")
        .env("MQ_SERVER_PORT", b.addr.port().to_string())
        .env("MQ_CLIENT_USERNAME", "qa")
        .env("MQ_CLIENT_PASSWORD", QA_PASSWORD)
        .env("MQ_CANNEL_NAME", "sms-inbox");
    let receiver = Proc::spawn(php).expect("php");
    tokio::task::block_in_place(|| {
        assert!(
            receiver.wait_line("Connected", T).is_some(),
            "{}",
            receiver.output()
        );
        let (code, h) = b.api(
            "POST",
            "/webhooks",
            Some(json!({"url": hooks.url(), "event": "sms:received"})),
        );
        assert_eq!(code, 201, "{h}");
    });
    // The second part first.
    b.sim.receive(&pdus[1], true).expect("room");
    b.sim.receive(&pdus[0], true).expect("room");
    tokio::task::block_in_place(|| {
        // print_r of the frame: the sender and the whole text in one item.
        assert!(
            receiver.wait_line(text, T).is_some(),
            "{}",
            receiver.output()
        );
        let out = receiver.output();
        assert!(out.contains("[sender] => +628123456789"), "{out}");
        let hits = hooks.wait("sms:received", |h| !h.is_empty());
        let v = hits[0].json();
        assert_eq!(v["event"], "sms:received", "{v}");
        assert_eq!(v["payload"]["message"], text, "{v}");
        assert_eq!(v["payload"]["phoneNumber"], "+628123456789", "{v}");
        assert_eq!(
            v["payload"]["receivedAt"], "2026-12-05T17:30:00+00:00",
            "{v}"
        );
        assert!(signature_ok(&hits[0], &b.key()));
        let (code, inbox) = b.api("GET", "/inbox", None);
        assert_eq!(code, 200);
        assert_eq!(inbox[0]["message"], text, "{inbox}");
        assert_eq!(inbox[0]["parts"], 2, "{inbox}");
        assert_eq!(inbox[0]["deviceId"], "qa", "{inbox}");
    });
    assert!(b.sim.stored().is_empty());
}

/// `/metrics` after an OTP through the real agent, read by the Prometheus project's own
/// parser (`prometheus_client` from PyPI, as a scraper would): the families are well formed
/// and say what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_read_by_the_prometheus_parser_after_an_otp() {
    let b = Bundle::start("api-metrics", "", "").await;
    let script = r#"
import json, os, requests
from prometheus_client.parser import text_string_to_metric_families
r = requests.get(os.environ["URL"], auth=("qa", os.environ["PW"]), timeout=10)
r.raise_for_status()
out = {"type": r.headers["Content-Type"], "families": {}, "samples": {}}
for f in text_string_to_metric_families(r.text):
    out["families"][f.name] = f.type
    for s in f.samples:
        key = s.name + "".join("|%s=%s" % kv for kv in sorted(s.labels.items()))
        out["samples"][key] = s.value
print(json.dumps(out))
"#;
    tokio::task::block_in_place(|| {
        let (code, _) = b.api(
            "POST",
            "/messages",
            Some(send_body("metrics-1", "Your code is 112233", json!({}))),
        );
        assert_eq!(code, 202);
        b.wait_state("metrics-1", "Sent");
        // The agent's heartbeat follows its modem's state: registration and its sent count.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, d) = b.api("GET", "/devices", None);
            if d[0]["modems"][0]["sent"] == 1 {
                assert_eq!(d[0]["agent"]["queued"], 0, "{d}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{d}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let py = tool("WSMB_TEST_PYTHON", "target/ci-venv/bin/python");
        let parse = |url: String| {
            let mut cmd = Command::new(&py);
            cmd.args(["-c", script])
                .env("PW", QA_PASSWORD)
                .env("URL", url);
            let out = run(cmd, "the Prometheus parser (prometheus_client)");
            (last_json(&out), out)
        };
        // The agent's own, on the loopback port its log names.
        let log = b.agent.as_ref().map(Proc::output).unwrap_or_default();
        let url = log
            .lines()
            .find_map(|l| l.split("metrics on ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no metrics address in the agent's log:\n{log}"))
            .to_owned();
        let (a, out) = parse(url);
        assert_eq!(a["families"]["wsmb_agent_sms"], "counter", "{out}");
        assert_eq!(a["families"]["wsmb_agent_modem_info"], "gauge", "{out}");
        let s = &a["samples"];
        assert_eq!(
            s["wsmb_agent_sms_total|modem=sim1|outcome=sent"], 1.0,
            "{out}"
        );
        assert_eq!(s["wsmb_agent_broker_connected"], 1.0, "{out}");
        assert_eq!(
            s["wsmb_agent_modem_state|modem=sim1|state=ready"], 1.0,
            "{out}"
        );
        assert_eq!(
            s["wsmb_agent_modem_info|last_error=|modem=sim1|operator=Telkomsel|registration=registered, home network"],
            1.0,
            "{out}"
        );
        // The broker's.
        let (v, out) = parse(format!("http://{}/metrics", b.addr));
        assert!(
            v["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("text/plain")),
            "{out}"
        );
        for (family, kind) in [
            ("wsmb_messages_in", "counter"),
            ("wsmb_connections_open", "gauge"),
            ("wsmb_sms", "counter"),
            ("wsmb_modem_signal_dbm", "gauge"),
        ] {
            assert_eq!(v["families"][family], kind, "{family}: {out}");
        }
        let s = &v["samples"];
        assert_eq!(s["wsmb_sms_total|event=accepted"], 1.0, "{out}");
        assert_eq!(s["wsmb_sms_total|event=sent"], 1.0, "{out}");
        assert_eq!(s["wsmb_http_api_requests_total|status=202"], 1.0, "{out}");
        assert_eq!(s["wsmb_gateway_connected|gateway=qa"], 1.0, "{out}");
        assert_eq!(s["wsmb_modem_ready|gateway=qa|modem=sim1"], 1.0, "{out}");
        assert_eq!(
            s["wsmb_modem_registered|gateway=qa|modem=sim1"], 1.0,
            "{out}"
        );
        assert_eq!(
            s["wsmb_modem_sms_total|gateway=qa|modem=sim1|outcome=sent"], 1.0,
            "{out}"
        );
        assert_eq!(s["wsmb_gateway_queued_jobs|gateway=qa"], 0.0, "{out}");
        assert!(
            s["wsmb_modem_signal_dbm|gateway=qa|modem=sim1"]
                .as_f64()
                .is_some_and(|d| d < 0.0),
            "{out}"
        );
        assert!(
            s["wsmb_messages_in_total"]
                .as_f64()
                .is_some_and(|n| n >= 2.0),
            "the job and its status events: {out}"
        );
    });
}

/// The status page in a real headless Chromium (Debian's `chromium`, driven by playwright-core
/// from npm), the size of a phone: it needs a user, loads nothing from elsewhere, shows the
/// channels with their queues, the gateway with its modem, the last messages and the failure
/// with its reason as the broker counts them (checked against `/metrics`), treats a channel
/// named like markup as text, fits the screen, and shows a new message without a reload. The
/// screenshot is kept in target/screenshots/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_a_real_browser_shows_the_broker_as_it_is() {
    let b = Bundle::start("status-page", "", "").await;
    // A queue: messages on a channel nobody receives from (SQLite stores them).
    for n in 0..2 {
        let code = ws_publish(b.addr, "parked", json!([{"n": n}])).await;
        assert_eq!(code, "00", "stored");
    }
    let markup = "<img src=x onerror=alert(1)>";
    ws_publish(b.addr, markup, json!([{"n": 0}])).await;
    let shot = repo_root().join("target/screenshots/status-page-phone.png");
    let _ = std::fs::remove_file(&shot);
    tokio::task::block_in_place(|| {
        let (code, _) = b.api(
            "POST",
            "/messages",
            Some(send_body("page-ok", "Your code is 4711", json!({}))),
        );
        assert_eq!(code, 202);
        b.wait_state("page-ok", "Sent");
        // The next SMS is refused by the network for good: CMS ERROR 21.
        b.sim
            .push_fault(wsmb_agent::sim::Fault::RefuseBeforePrompt(21));
        let (code, _) = b.api(
            "POST",
            "/messages",
            Some(send_body("page-bad", "Your code is 0815", json!({}))),
        );
        assert_eq!(code, 202);
        let failed = b.wait_state("page-bad", "Failed");
        // The agent's heartbeat has counted both.
        let deadline = Instant::now() + T;
        loop {
            let (_, d) = b.api("GET", "/devices", None);
            if d[0]["modems"][0]["failed"] == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "{d}");
            std::thread::sleep(Duration::from_millis(50));
        }
        // What the broker counts before the page is read (the script then sends one more).
        let metrics = b.metrics();
        std::fs::create_dir_all(shot.parent().expect("dir")).expect("screenshots dir");
        let mut cmd = Command::new("node");
        cmd.arg(repo_root().join("tests/browser/status-page.js"))
            .env(
                "NODE_MODULES",
                tool("WSMB_TEST_NODE_MODULES", "target/ci-node/node_modules"),
            )
            .env("CHROMIUM", tool("WSMB_TEST_CHROMIUM", "/usr/bin/chromium"))
            .env("BASE", format!("http://{}", b.addr))
            .env("USER_NAME", "qa")
            .env("PASSWORD", QA_PASSWORD)
            .env("SHOT", &shot)
            .env("LIVE_ID", "page-live");
        let out = run(cmd, "the status page in Chromium (playwright-core)");
        let v = last_json(&out);
        let page = &v["view"];
        // Access, offline, no errors, fits a phone.
        assert_eq!(v["anonymousStatus"], 401, "{out}");
        assert_eq!(v["anonymousShowsPage"], false, "{out}");
        assert_eq!(v["pageStatus"], 200, "{out}");
        assert!(
            v["csp"]
                .as_str()
                .unwrap_or_default()
                .contains("default-src 'none'"),
            "{out}"
        );
        assert_eq!(v["offsite"], json!([]), "nothing from elsewhere: {out}");
        assert_eq!(v["consoleErrors"], json!([]), "{out}");
        assert!(
            page["overflow"].as_i64().is_some_and(|o| o <= 0),
            "wider than the phone: {out}"
        );
        // Channels and queues, as the metrics count them.
        let m = |k: &str| metric_value(&metrics, k);
        let parked = &page["channels"]["parked"];
        assert_eq!(parked["stored"], 2, "{out}");
        assert_eq!(parked["receivers"], 0, "{out}");
        assert_eq!(
            parked["stored"].as_f64(),
            Some(m(r#"wsmb_channel_stored_messages{channel="parked"}"#))
        );
        assert_eq!(
            parked["in"].as_f64(),
            Some(m(r#"wsmb_channel_messages_in_total{channel="parked"}"#))
        );
        assert_eq!(page["channels"]["sms"]["receivers"], 1, "the agent: {out}");
        assert_eq!(page["channels"][markup]["in"], 1, "{out}");
        assert_eq!(page["injected"], 0, "a channel name became markup: {out}");
        // The gateway and its modem, from the agent's heartbeat.
        let gw = &page["gateways"]["qa"];
        assert_eq!(gw["online"], "online", "{out}");
        let modem = &gw["modems"]["sim1"];
        assert_eq!(modem["state"], "ready", "{out}");
        assert!(
            modem["signal"].as_str().is_some_and(|s| s.ends_with("dBm")),
            "{out}"
        );
        assert_eq!(modem["operator"], "Telkomsel", "{out}");
        assert_eq!(modem["registration"], "registered, home network", "{out}");
        assert_eq!(modem["counts"], "1 / 1", "{out}");
        assert!(
            modem["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("21")),
            "{out}"
        );
        // The last messages, numbers masked, and the failure with its reason.
        let msgs = page["messages"].as_array().expect("messages");
        let row = |id: &str| msgs.iter().find(|r| r["id"] == id).cloned();
        let ok = row("page-ok").unwrap_or_else(|| panic!("page-ok missing: {out}"));
        assert!(
            matches!(ok["state"].as_str(), Some("Sent" | "Delivered")),
            "{out}"
        );
        assert!(
            ok["to"]
                .as_str()
                .is_some_and(|t| t.contains('•') && !t.contains("6666666")),
            "{out}"
        );
        assert_eq!(
            row("page-bad").map(|r| r["state"].clone()),
            Some(json!("Failed"))
        );
        let reason = failed["recipients"][0]["error"]
            .as_str()
            .unwrap_or_default();
        assert!(!reason.is_empty(), "{failed}");
        let f = &page["failures"][0];
        assert_eq!(f["id"], "page-bad", "{out}");
        assert_eq!(f["reason"], reason, "{out}");
        assert!(
            !out.contains("Your code is"),
            "message texts never shown: {out}"
        );
        // The chart: an hour of minutes, the hour's totals as counted.
        for series in ["in", "out", "sent", "failed"] {
            assert_eq!(page["lines"][series], 60, "{series}: {out}");
        }
        assert_eq!(
            page["totals"]["sent"].as_f64(),
            Some(m(r#"wsmb_sms_total{event="sent"}"#))
        );
        assert_eq!(page["totals"]["failed"], 1, "{out}");
        assert!(
            page["totals"]["in"].as_f64().is_some_and(|n| n >= 5.0),
            "{out}"
        );
        // Live.
        assert_eq!(v["liveApiStatus"], 202, "{out}");
        assert!(
            v["liveAfterUpdates"].as_i64().is_some_and(|n| n >= 1),
            "{out}"
        );
        assert_eq!(v["reloaded"], false, "{out}");
        let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 10_000, "screenshot {}: {size} bytes", shot.display());
    });
}

/// The value of the series `key` (name with its labels, as exposed) in a Prometheus text.
fn metric_value(text: &str, key: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} not in the metrics:\n{text}"))
}
