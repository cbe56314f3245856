//! In-process harness: a broker, simulated modems, the agent, and application clients.
#![allow(dead_code)]

pub mod gammu;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{WebSocketStream, client_async};
use wsmb_agent::config::{Config, ModemConfig};
use wsmb_agent::sim::{SimConfig, Simulator};
use wsmb_protocol::reply::BrokerReply;
use wsmb_protocol::sms::{Status, StatusEvent};

pub const PASSWORD: &str = "4lt0@1234";

/// A scratch directory, on tmpfs (/dev/shm) when there is one: the job store fsyncs every
/// commit, and on a shared CI disk an fsync can take seconds, which would only measure the disk.
pub fn scratch(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("wsmb-agent-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
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

pub async fn broker() -> wsmb_broker::Running {
    logs();
    let mut c = wsmb_broker::Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.storage.backend = wsmb_broker::config::Backend::Memory;
    c.credentials.lines = vec!["qa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1".into()];
    wsmb_broker::start(c).await.expect("broker")
}

pub async fn sim(dir: &std::path::Path, name: &str, cfg: SimConfig) -> Simulator {
    Simulator::start(dir.join(name), cfg)
        .await
        .expect("simulator")
}

pub fn modem(name: &str, sim: &Simulator) -> ModemConfig {
    ModemConfig {
        name: name.into(),
        device: sim.path().to_owned(),
        rate_per_minute: 0,
        // Generous for a loaded CI machine; tests that need a timeout to fire wait for it.
        command_timeout: Duration::from_secs(3),
        prompt_timeout: Duration::from_secs(3),
        send_timeout: Duration::from_secs(3),
        registration_timeout: Duration::from_secs(5),
        ..ModemConfig::default()
    }
}

pub fn agent_config(broker: SocketAddr, dir: &std::path::Path, modems: Vec<ModemConfig>) -> Config {
    let mut c = Config::default();
    c.broker.url = format!("ws://{broker}/");
    c.broker.user = "qa".into();
    c.broker.password = PASSWORD.into();
    c.broker.reconnect_max = Duration::from_millis(500);
    c.broker.ping_interval = Duration::from_secs(2);
    c.agent.state_dir = dir.join("state");
    c.agent.retry_delay = Duration::from_millis(200);
    c.agent.max_attempts = 3;
    c.modems = modems;
    c.validate().expect("valid agent config");
    c
}

pub type Ws = WebSocketStream<TcpStream>;

pub async fn client(addr: SocketAddr) -> Ws {
    use base64::Engine as _;
    let mut req = format!("ws://{addr}/").into_client_request().expect("req");
    let token = base64::engine::general_purpose::STANDARD.encode(format!("qa:{PASSWORD}"));
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Basic {token}")).expect("h"),
    );
    let tcp = TcpStream::connect(addr).await.expect("tcp");
    let (mut ws, _) = client_async(req, tcp).await.expect("ws");
    let first = ws.next().await.expect("frame").expect("ok");
    assert!(first.to_text().expect("text").contains("\"00\""));
    ws
}

/// A client receiving on `channel`, once the broker has it (a ping round trip).
pub async fn subscribed(addr: SocketAddr, channel: &str) -> Ws {
    let mut ws = client(addr).await;
    let receive = format!(r#"{{"command":"receive-message","channel":"{channel}"}}"#);
    ws.send(Message::text(receive)).await.expect("send");
    ws.send(Message::text(r#"{"command":"ping"}"#))
        .await
        .expect("send");
    loop {
        let m = ws.next().await.expect("frame").expect("ok");
        if let Message::Text(t) = m {
            if t.contains("\"connect\"") {
                return ws;
            }
        }
    }
}

/// An application listening on `sms-status`.
pub struct StatusListener {
    ws: Ws,
    pub events: Vec<StatusEvent>,
}

impl StatusListener {
    pub async fn new(addr: SocketAddr) -> Self {
        let ws = subscribed(addr, "sms-status").await;
        StatusListener {
            ws,
            events: Vec::new(),
        }
    }

    async fn pump(&mut self, d: Duration) -> bool {
        match tokio::time::timeout(d, self.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if BrokerReply::parse(&t).is_none() {
                    let v: serde_json::Value = serde_json::from_str(&t).expect("json");
                    for item in v["data"].as_array().expect("data") {
                        let e: StatusEvent = serde_json::from_value(item.clone()).expect("event");
                        self.events.push(e);
                    }
                }
                true
            }
            Ok(Some(Ok(_))) => true,
            _ => false,
        }
    }

    /// Waits for an event of `status` for job `id`.
    pub async fn wait(&mut self, id: &str, status: Status, within: Duration) -> StatusEvent {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(e) = self
                .events
                .iter()
                .find(|e| e.id == id && e.status == status)
            {
                return e.clone();
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                panic!(
                    "no {status:?} for {id} within {within:?}; events: {:#?}",
                    self.events
                );
            }
            self.pump(left).await;
        }
    }

    /// Collects events for `d`.
    pub async fn settle(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || !self.pump(left).await {
                return;
            }
        }
    }

    pub fn of(&self, id: &str) -> Vec<Status> {
        self.events
            .iter()
            .filter(|e| e.id == id)
            .map(|e| e.status)
            .collect()
    }
}

/// An application receiving on `sms-inbox`, collecting the received SMS the agent publishes.
pub struct InboxListener {
    ws: Ws,
    pub messages: Vec<wsmb_protocol::sms::InboxMessage>,
}

impl InboxListener {
    pub async fn new(addr: SocketAddr) -> Self {
        let ws = subscribed(addr, "sms-inbox").await;
        InboxListener {
            ws,
            messages: Vec::new(),
        }
    }

    async fn pump(&mut self, d: Duration) -> bool {
        match tokio::time::timeout(d, self.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if BrokerReply::parse(&t).is_none() {
                    let v: serde_json::Value = serde_json::from_str(&t).expect("json");
                    assert_eq!(v["channel"], "sms-inbox", "{t}");
                    for item in v["data"].as_array().expect("data") {
                        self.messages
                            .push(serde_json::from_value(item.clone()).expect("an inbox item"));
                    }
                }
                true
            }
            Ok(Some(Ok(_))) => true,
            _ => false,
        }
    }

    /// Waits until `n` messages have come; returns them.
    pub async fn wait(
        &mut self,
        n: usize,
        within: Duration,
    ) -> Vec<wsmb_protocol::sms::InboxMessage> {
        let deadline = tokio::time::Instant::now() + within;
        while self.messages.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "{} of {n} received SMS within {within:?}: {:#?}",
                self.messages.len(),
                self.messages
            );
            self.pump(left).await;
        }
        self.messages.clone()
    }

    /// Collects for `d` more.
    pub async fn settle(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || !self.pump(left).await {
                return;
            }
        }
    }
}

/// Waits until the simulated modem's storage is empty (what the agent took is deleted right
/// after it is stored, so shortly after it is published).
pub async fn wait_storage_empty(sim: &Simulator) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !sim.stored().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not deleted from the modem: {:?}",
            sim.stored()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends jobs the way the seed README's sender does (legacy frame, one reply read).
pub async fn send_jobs(addr: SocketAddr, items: serde_json::Value) {
    let mut ws = client(addr).await;
    let frame = serde_json::json!({"command": "send-message", "channel": "sms", "data": items});
    ws.send(Message::text(
        serde_json::to_string_pretty(&frame).expect("json"),
    ))
    .await
    .expect("send");
    // the send-result
    loop {
        let m = ws.next().await.expect("frame").expect("ok");
        if let Message::Text(t) = m {
            let r = BrokerReply::parse(&t).expect("reply");
            assert_ne!(r.command, "error", "the broker refused the jobs: {t}");
            if r.command == "send-result" {
                assert_eq!(r.response_code, "00", "no agent received the jobs: {t}");
                return;
            }
        }
    }
}

pub fn job(id: &str, receiver: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "time": 1_700_000_000, "receiver": receiver, "message": message})
}

/// Waits until the agent is connected.
pub async fn link_up(a: &wsmb_agent::agent::Running) {
    let mut w = a.link.clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if *w.borrow_and_update() == wsmb_agent::link::LinkState::Up {
                return;
            }
            if w.changed().await.is_err() {
                return;
            }
        }
    })
    .await
    .expect("agent connected");
}

pub async fn modems_ready(a: &wsmb_agent::agent::Running) {
    for m in &a.modems {
        let mut w = m.watch();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if w.borrow_and_update().is_ready() {
                    return;
                }
                if w.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("modem {} not ready: {:?}", m.name, m.health()));
    }
}

/// Starts the agent, listens to its status channel, and waits until it is connected and every
/// modem is ready: the usual opening of a test.
pub async fn start_ready(
    cfg: Config,
    broker: SocketAddr,
) -> (wsmb_agent::agent::Running, StatusListener) {
    let a = wsmb_agent::agent::start(cfg).await.expect("agent");
    let status = StatusListener::new(broker).await;
    link_up(&a).await;
    modems_ready(&a).await;
    (a, status)
}

/// Stops the agent and waits until it has, its modems' ports closed (the whole `Running` is
/// dropped here, its modem handles with it), so that another agent can open them.
pub async fn stop(a: wsmb_agent::agent::Running) {
    let wsmb_agent::agent::Running { shutdown, task, .. } = a;
    shutdown.cancel();
    let _ = task.await;
}
