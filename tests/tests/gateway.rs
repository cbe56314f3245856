//! The whole bundle with real processes: the broker binary, the agent binary, a simulated modem
//! on a pseudo-terminal (in this process, so faults can be injected), the real PHP interpreter
//! for the application, and Gammu (python3-gammu) to decode what the modem was given.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use wsmb_agent::sim::{Fault, SimConfig, Simulator};
use wsmb_e2e::{Proc, agent_config, repo_root, scratch, start_broker};
use wsmb_protocol::reply::BrokerReply;
use wsmb_protocol::sms::{Status, StatusEvent};

const PASSWORD: &str = "4lt0@1234";
const T: Duration = Duration::from_secs(30);

fn broker_args() -> Vec<String> {
    vec![
        "--htpasswd".into(),
        repo_root()
            .join("deploy/htpasswd.example")
            .display()
            .to_string(),
    ]
}

fn broker() -> (Proc, SocketAddr) {
    let args = broker_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    start_broker(env!("CARGO_BIN_EXE_e2e-broker"), &args)
}

fn broker_at(addr: SocketAddr) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_e2e-broker"));
    cmd.args(broker_args())
        .args(["--listen", &addr.to_string(), "--storage", "memory"])
        .env_remove("RUST_LOG");
    let p = Proc::spawn(cmd).expect("broker");
    assert!(
        p.wait_line("listening on", Duration::from_secs(20))
            .is_some(),
        "broker did not restart: {}",
        p.output()
    );
    p
}

/// Writes an agent config and starts `wsmb-agent run` with it.
fn agent(dir: &Path, broker: SocketAddr, sim: &Simulator, extra: &str) -> Proc {
    let path = agent_config(dir, &format!("ws://{broker}/"), sim.path(), extra);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_e2e-agent"));
    cmd.args(["--config", &path.display().to_string(), "run"])
        .env("WSMB_PASSWORD", PASSWORD)
        .env("RUST_LOG", "wsmb_agent=debug");
    Proc::spawn(cmd).expect("agent")
}

fn wait_agent_ready(a: &Proc) {
    assert!(
        a.wait_line("connected to the broker", T).is_some(),
        "agent did not connect:\n{}",
        a.output()
    );
    assert!(
        a.wait_line("modem ready", T).is_some(),
        "modem not ready:\n{}",
        a.output()
    );
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn client(addr: SocketAddr) -> Ws {
    use base64::Engine as _;
    let mut req = format!("ws://{addr}/")
        .into_client_request()
        .expect("request");
    let token = base64::engine::general_purpose::STANDARD.encode(format!("qa:{PASSWORD}"));
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Basic {token}")).expect("header"),
    );
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("upgrade");
    let first = ws.next().await.expect("frame").expect("ok");
    assert!(first.to_text().expect("text").contains("\"00\""));
    ws
}

/// The application's view of `sms-status`.
struct Statuses {
    ws: Ws,
    events: Vec<StatusEvent>,
}

impl Statuses {
    async fn listen(addr: SocketAddr) -> Statuses {
        let mut ws = client(addr).await;
        ws.send(Message::text(
            r#"{"command":"receive-message","channel":"sms-status"}"#,
        ))
        .await
        .expect("send");
        ws.send(Message::text(r#"{"command":"ping"}"#))
            .await
            .expect("send");
        while let Some(Ok(m)) = ws.next().await {
            if m.to_text().is_ok_and(|t| t.contains("\"connect\"")) {
                break;
            }
        }
        Statuses {
            ws,
            events: Vec::new(),
        }
    }

    async fn wait(&mut self, id: &str, status: Status) -> StatusEvent {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if let Some(e) = self
                .events
                .iter()
                .find(|e| e.id == id && e.status == status)
            {
                return e.clone();
            }
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if BrokerReply::parse(&t).is_none() => {
                    let v: serde_json::Value = serde_json::from_str(&t).expect("json");
                    for item in v["data"].as_array().expect("data") {
                        self.events
                            .push(serde_json::from_value(item.clone()).expect("event"));
                    }
                }
                Ok(Some(Ok(_))) => {}
                other => panic!(
                    "no {status:?} for {id} ({other:?}); events: {:#?}",
                    self.events
                ),
            }
        }
    }
}

/// The seed-README-style PHP sender (real php-cli) sending one job.
fn php_send(addr: SocketAddr, id: &str, receiver: &str, text: &str) {
    let dir = repo_root().join("tests/fixtures/legacy-php");
    let out = Command::new("php")
        .current_dir(&dir)
        .arg("send-otp.php")
        .env("MQ_SERVER_PORT", addr.port().to_string())
        .env("OTP_ID", id)
        .env("OTP_RECEIVER", receiver)
        .env("OTP_TEXT", text)
        .output()
        .expect("php (Debian package php-cli)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("\"connect\""),
        "{stdout}"
    );
}

/// Decodes PDUs with Gammu and joins the parts: (number, text) per message.
fn gammu_decode(pdus: &[String]) -> (String, String) {
    const SCRIPT: &str = r#"
import json, sys, gammu
pdus = json.load(sys.stdin)
parts = [gammu.DecodePDU(bytes.fromhex(h)) for h in pdus]
if len(parts) == 1:
    # single part: Gammu's Text has one junk character per GSM escape; use the septet count
    text = parts[0]["Text"]
else:
    linked = gammu.LinkSMS([[p] for p in parts])
    text = "".join(e["Buffer"] or "" for e in gammu.DecodeSMS(linked[0])["Entries"])
json.dump({"number": parts[0]["Number"], "text": text}, sys.stdout)
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 with python3-gammu");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::to_string(pdus).expect("json").as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("gammu");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    (
        v["number"].as_str().expect("number").to_owned(),
        v["text"].as_str().expect("text").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_otp_from_a_legacy_php_sender_is_sent_and_reported() {
    let dir = scratch("otp");
    let (_broker, addr) = broker();
    let sim = Simulator::start(dir.join("modem"), SimConfig::default())
        .await
        .expect("sim");
    let agent = agent(&dir, addr, &sim, "");
    let mut statuses = Statuses::listen(addr).await;
    tokio::task::block_in_place(|| wait_agent_ready(&agent));

    let text = "Kode OTP Anda: 482913. Berlaku 5 menit. Jangan berikan kode ini kepada siapa pun, \
                termasuk petugas kami. Abaikan pesan ini jika Anda tidak memintanya. Terima kasih.";
    tokio::task::block_in_place(|| php_send(addr, "otp-482913", "0812-3456-7890", text));
    let sent = statuses.wait("otp-482913", Status::Sent).await;
    assert_eq!(sent.receiver.as_deref(), Some("+6281234567890"));
    assert_eq!(sent.parts, Some(2));
    assert_eq!(sent.modem.as_deref(), Some("sim1"));

    let pdus: Vec<String> = sim
        .sent()
        .into_iter()
        .filter(|p| p.went_out)
        .map(|p| p.hex)
        .collect();
    assert_eq!(pdus.len(), 2);
    let (number, decoded) = tokio::task::block_in_place(|| gammu_decode(&pdus));
    assert_eq!(number, "+6281234567890");
    assert_eq!(decoded, text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_comes_back_after_a_broker_restart() {
    let dir = scratch("restart");
    let (broker, addr) = broker();
    let sim = Simulator::start(dir.join("modem"), SimConfig::default())
        .await
        .expect("sim");
    let agent = agent(&dir, addr, &sim, "");
    tokio::task::block_in_place(|| wait_agent_ready(&agent));
    drop(broker); // SIGKILL
    let _broker = tokio::task::block_in_place(|| broker_at(addr));
    assert!(
        tokio::task::block_in_place(|| agent.wait_line("connected to the broker", T)).is_some(),
        "the agent did not reconnect:\n{}",
        agent.output()
    );
    let mut statuses = Statuses::listen(addr).await;
    tokio::task::block_in_place(|| php_send(addr, "after-restart", "+628123456789", "still here"));
    statuses.wait("after-restart", Status::Sent).await;
    assert_eq!(
        sim.messages(),
        vec![("+628123456789".to_owned(), "still here".to_owned())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_with_jobs_pending_loses_none_and_sends_none_twice() {
    let dir = scratch("sigkill");
    let (_broker, addr) = broker();
    let sim = Simulator::start(dir.join("modem"), SimConfig::default())
        .await
        .expect("sim");
    // the first job hangs after its PDU went out (no answer for 30 s)
    let first = agent(&dir, addr, &sim, "send_timeout = \"30s\"");
    tokio::task::block_in_place(|| wait_agent_ready(&first));
    let mut statuses = Statuses::listen(addr).await;
    sim.push_fault(Fault::NoResult);
    tokio::task::block_in_place(|| php_send(addr, "in-flight", "+628123456789", "in flight"));
    let deadline = tokio::time::Instant::now() + T;
    while sim.sent().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first PDU never came"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..5 {
        let id = format!("pending-{i}");
        tokio::task::block_in_place(|| {
            php_send(addr, &id, "+628123456789", &format!("pending {i}"))
        });
        statuses.wait(&id, Status::Queued).await;
    }
    drop(first); // SIGKILL, mid-send, five jobs queued

    let second = agent(&dir, addr, &sim, "send_timeout = \"30s\"");
    tokio::task::block_in_place(|| wait_agent_ready(&second));
    let e = statuses.wait("in-flight", Status::Failed).await;
    assert!(e.ambiguous, "{e:?}");
    for i in 0..5 {
        statuses.wait(&format!("pending-{i}"), Status::Sent).await;
    }
    let mut texts: Vec<String> = sim.messages().into_iter().map(|(_, t)| t).collect();
    texts.sort();
    let mut want = vec!["in flight".to_owned()];
    want.extend((0..5).map(|i| format!("pending {i}")));
    assert_eq!(texts, want, "every job exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_wait_for_a_silent_or_vanished_modem_and_a_wrong_pin_is_reported() {
    let dir = scratch("modemfaults");
    let (_broker, addr) = broker();
    let sim = Simulator::start(dir.join("modem"), SimConfig::default())
        .await
        .expect("sim");
    let a = agent(&dir, addr, &sim, "");
    tokio::task::block_in_place(|| wait_agent_ready(&a));
    let mut statuses = Statuses::listen(addr).await;

    sim.set_silent(true);
    tokio::task::block_in_place(|| php_send(addr, "during-silence", "+628123456789", "silence"));
    statuses.wait("during-silence", Status::Queued).await;
    statuses.wait("modem:sim1", Status::Modem).await;
    sim.set_silent(false);
    statuses.wait("during-silence", Status::Sent).await;

    sim.disappear();
    tokio::task::block_in_place(|| php_send(addr, "while-gone", "+628123456789", "gone"));
    statuses.wait("while-gone", Status::Queued).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    sim.reappear().expect("reappear");
    statuses.wait("while-gone", Status::Sent).await;
    let texts: Vec<String> = sim.messages().into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, vec!["silence", "gone"]);
    drop(a);

    // a SIM that wants a PIN the config gets wrong: stopped, reported, PIN tried once
    let dir = scratch("pin");
    let sim = Simulator::start(
        dir.join("modem"),
        SimConfig {
            pin: Some("1234".into()),
            ..SimConfig::default()
        },
    )
    .await
    .expect("sim");
    let a = agent(&dir, addr, &sim, "pin = \"0000\"");
    assert!(
        tokio::task::block_in_place(|| a.wait_line("modem stopped", T)).is_some(),
        "{}",
        a.output()
    );
    tokio::task::block_in_place(|| php_send(addr, "pin-job", "+628123456789", "x"));
    statuses.wait("pin-job", Status::Queued).await;
    let stopped = loop {
        let e = statuses.wait("modem:sim1", Status::Modem).await;
        if e.modem_state.as_deref() == Some("stopped") {
            break e;
        }
        statuses.events.retain(|x| x != &e);
    };
    assert!(
        stopped
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("wrong PIN")),
        "{stopped:?}"
    );
    assert_eq!(sim.pin_attempts(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_agent_says_ready_feeds_the_watchdog_and_survives_sighup() {
    let dir = scratch("notify");
    let (_broker, addr) = broker();
    let sim = Simulator::start(dir.join("modem"), SimConfig::default())
        .await
        .expect("sim");
    let sock_path = dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind");
    let wait = |needle: &str| -> Option<String> {
        let deadline = std::time::Instant::now() + T;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            notify.set_read_timeout(Some(left)).ok()?;
            let n = notify.recv(&mut buf).ok()?;
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains(needle) {
                return Some(msg);
            }
        }
    };
    let cfg = agent_config(&dir, &format!("ws://{addr}/"), sim.path(), "");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_e2e-agent"));
    cmd.args(["--config", &cfg.display().to_string(), "run"])
        .env("WSMB_PASSWORD", PASSWORD)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000");
    let mut a = Proc::spawn(cmd).expect("agent");
    tokio::task::block_in_place(|| {
        assert!(wait("READY=1").is_some(), "no READY=1:\n{}", a.output());
        // The status line follows the link and the modem.
        assert!(
            wait("STATUS=broker connected; sim1 Ready").is_some(),
            "{}",
            a.output()
        );
        let kill = |sig: &str| {
            assert!(
                Command::new("kill")
                    .args([sig, &a.pid().to_string()])
                    .status()
                    .expect("kill")
                    .success()
            )
        };
        kill("-HUP");
        assert!(a.wait_line("SIGHUP: ", T).is_some(), "{}", a.output());
        for _ in 0..2 {
            assert!(
                wait("WATCHDOG=1").is_some(),
                "watchdog not fed after SIGHUP"
            );
        }
        kill("-TERM");
        assert!(wait("STOPPING=1").is_some());
        assert!(a.wait(T).is_some_and(|s| s.success()), "{}", a.output());
    });
}

/// The broker is unreachable for a while (`WSMB_FAULT_BROKER_AWAY_SECS`, 3 s by default; the
/// fault script runs it for minutes): the agent keeps trying, an SMS received meanwhile is kept
/// and published once the broker is back, and jobs flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_waits_out_a_broker_that_is_away_and_loses_nothing() {
    let away: u64 = std::env::var("WSMB_FAULT_BROKER_AWAY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = scratch("away");
    let (broker, addr) = tokio::task::block_in_place(|| {
        wsmb_e2e::sqlite_broker(env!("CARGO_BIN_EXE_e2e-broker"), &dir, "127.0.0.1:0", &[])
    });
    let sim = Simulator::start(dir.join("modem"), SimConfig::default())
        .await
        .expect("sim");
    let agent = agent(&dir, addr, &sim, "");
    tokio::task::block_in_place(|| wait_agent_ready(&agent));
    drop(broker); // SIGKILL
    let pdus = tokio::task::block_in_place(|| {
        wsmb_e2e::gammu_deliver(
            "a reply that came while the broker was away",
            "+628123456789",
        )
    });
    sim.receive(&pdus[0], true).expect("room");
    // Taken off the modem and kept by the agent while nobody can hear it.
    let deadline = std::time::Instant::now() + T;
    while !sim.stored().is_empty() {
        assert!(std::time::Instant::now() < deadline, "{}", agent.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(away)).await; // the outage itself
    let listen = addr.to_string();
    let _broker = tokio::task::block_in_place(|| {
        wsmb_e2e::sqlite_broker(env!("CARGO_BIN_EXE_e2e-broker"), &dir, &listen, &[])
    });
    assert!(
        tokio::task::block_in_place(|| agent.wait_line("connected to the broker", T)).is_some(),
        "the agent did not reconnect:\n{}",
        agent.output()
    );
    // The broker stored it for whoever receives on sms-inbox.
    let mut inbox = client(addr).await;
    inbox
        .send(Message::text(
            r#"{"command":"receive-message","channel":"sms-inbox","protocol":2,"ack":true}"#,
        ))
        .await
        .expect("send");
    let got = tokio::time::timeout(T, async {
        loop {
            let m = inbox.next().await.expect("frame").expect("ok");
            if let Ok(t) = m.to_text() {
                if t.contains("while the broker was away") {
                    return t.to_owned();
                }
            }
        }
    })
    .await
    .expect("the SMS received during the outage");
    assert!(got.contains("+628123456789"), "{got}");
    let mut statuses = Statuses::listen(addr).await;
    tokio::task::block_in_place(|| php_send(addr, "after-away", "+628123456789", "back again"));
    statuses.wait("after-away", Status::Sent).await;
}
