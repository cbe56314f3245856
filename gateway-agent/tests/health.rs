//! The agent's own health: the heartbeat it publishes (at once when connected, then every
//! `agent.heartbeat_interval`) and its metrics on a loopback port, following what the modems
//! and jobs do, with a simulated modem on a real pseudo-terminal.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsmb_agent::sim::{Fault, SimConfig};
use wsmb_protocol::sms::{AgentHealth, Status};

const T: Duration = Duration::from_secs(20);

impl StatusListener {
    /// The first heartbeat (from now on) for which `pred` holds.
    async fn heartbeat(&mut self, what: &str, pred: impl Fn(&AgentHealth) -> bool) -> AgentHealth {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let found = self
                .events
                .iter()
                .filter(|e| e.status == Status::Heartbeat)
                .filter_map(|e| e.agent.clone())
                .find(|h| pred(h));
            if let Some(h) = found {
                return h;
            }
            let last = self
                .events
                .iter()
                .rev()
                .find(|e| e.status == Status::Heartbeat)
                .cloned();
            assert!(
                tokio::time::Instant::now() < deadline,
                "no heartbeat with {what}; last: {last:#?}"
            );
            // Only new ones are looked at next time.
            self.events.retain(|e| e.status != Status::Heartbeat);
            self.settle(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_follow_the_modems_and_the_jobs() {
    let dir = scratch("heartbeat");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let mut m = modem("m1", &sim);
    m.check_interval = Duration::from_secs(1);
    let mut cfg = agent_config(b.addr, &dir, vec![m]);
    cfg.agent.heartbeat_interval = Duration::from_secs(1);
    cfg.agent.max_attempts = 1;
    let (_agent, mut status) = start_ready(cfg, b.addr).await;

    let h = status
        .heartbeat("a ready modem", |h| {
            h.modems.first().is_some_and(|m| m.state == "ready")
        })
        .await;
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(h.interval, 1);
    assert_eq!(h.queued, 0);
    let m = &h.modems[0];
    assert_eq!(m.name, "m1");
    assert_eq!(m.signal_dbm, Some(-71), "{m:?}");
    assert_eq!(m.operator.as_deref(), Some("Telkomsel"), "{m:?}");
    assert_eq!(
        m.registration.as_deref(),
        Some("registered, home network"),
        "{m:?}"
    );
    assert_eq!((m.sent, m.failed, m.retried), (0, 0, 0));

    // One job sent, one failed for good: counted, with the error.
    send_jobs(
        b.addr,
        serde_json::json!([job("ok", "+628123456789", "ok")]),
    )
    .await;
    status.wait("ok", Status::Sent, T).await;
    sim.push_fault(Fault::ErrorAfterPdu(28));
    send_jobs(
        b.addr,
        serde_json::json!([job("bad", "+628123456789", "x")]),
    )
    .await;
    status.wait("bad", Status::Failed, T).await;
    let h = status
        .heartbeat("one sent and one failed", |h| {
            h.modems[0].sent == 1 && h.modems[0].failed == 1
        })
        .await;
    let m = &h.modems[0];
    assert!(m.last_sent.is_some(), "{m:?}");
    assert!(
        m.last_error.as_deref().is_some_and(|e| e.contains("28")),
        "{m:?}"
    );

    // The signal drops: the next idle check sees it, the next heartbeat says it.
    sim.set_rssi(10);
    status
        .heartbeat("the new signal", |h| h.modems[0].signal_dbm == Some(-93))
        .await;

    // The modem goes away: down, with the reason.
    sim.disappear();
    let h = status
        .heartbeat("the modem down", |h| h.modems[0].state == "down")
        .await;
    assert!(h.modems[0].reason.is_some(), "{h:?}");
}

/// `GET` on the agent's metrics port; (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut out))
        .await
        .expect("an answer in time")
        .expect("read");
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

fn sample(body: &str, key: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
}

/// With a long interval, a job sent brings the next heartbeat
/// forward: the broker sees the modem's count within seconds, not at the next minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_job_brings_the_next_heartbeat_forward() {
    let dir = scratch("heartbeat-soon");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let mut cfg = agent_config(b.addr, &dir, vec![modem("m1", &sim)]);
    cfg.agent.heartbeat_interval = Duration::from_secs(600);
    let (_agent, mut status) = start_ready(cfg, b.addr).await;
    status
        .heartbeat("a ready modem", |h| h.modems[0].state == "ready")
        .await;
    let asked = tokio::time::Instant::now();
    send_jobs(
        b.addr,
        serde_json::json!([job("soon-1", "+628123456789", "hi")]),
    )
    .await;
    status
        .heartbeat("the sent job counted", |h| h.modems[0].sent == 1)
        .await;
    // Far sooner than the interval: at most the spacing after the previous heartbeat.
    assert!(
        asked.elapsed() < Duration::from_secs(60),
        "{:?}",
        asked.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_a_loopback_port() {
    let dir = scratch("agent-metrics");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let mut cfg = agent_config(b.addr, &dir, vec![modem("m1", &sim)]);
    cfg.agent.metrics_listen = "127.0.0.1:0".into();
    let (agent, mut status) = start_ready(cfg, b.addr).await;
    let addr = agent.metrics_addr.expect("metrics served");
    assert!(addr.ip().is_loopback());

    send_jobs(
        b.addr,
        serde_json::json!([job("m-1", "+628123456789", "hi")]),
    )
    .await;
    status.wait("m-1", Status::Sent, T).await;
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    for (key, want) in [
        ("wsmb_agent_broker_connected", 1.0),
        ("wsmb_agent_jobs_received_total", 1.0),
        ("wsmb_agent_jobs_queued", 0.0),
        (r#"wsmb_agent_modem_state{modem="m1",state="ready"}"#, 1.0),
        (r#"wsmb_agent_modem_state{modem="m1",state="down"}"#, 0.0),
        (r#"wsmb_agent_modem_registered{modem="m1"}"#, 1.0),
        (r#"wsmb_agent_modem_signal_dbm{modem="m1"}"#, -71.0),
        (r#"wsmb_agent_sms_total{modem="m1",outcome="sent"}"#, 1.0),
        (r#"wsmb_agent_sms_total{modem="m1",outcome="failed"}"#, 0.0),
        (r#"wsmb_agent_sms_parts_sent_total{modem="m1"}"#, 1.0),
    ] {
        assert_eq!(sample(&body, key), Some(want), "{key}:\n{body}");
    }
    let info = r#"wsmb_agent_modem_info{modem="m1",operator="Telkomsel",registration="registered, home network",last_error=""}"#;
    assert_eq!(sample(&body, info), Some(1.0), "{body}");
    assert!(
        body.contains("# TYPE wsmb_agent_sms_total counter"),
        "{body}"
    );
    let (code, _) = get(addr, "/").await;
    assert_eq!(code, 404);

    // Only loopback: the metrics carry no authentication.
    let mut bad = agent_config(b.addr, &dir, vec![modem("m1", &sim)]);
    bad.agent.metrics_listen = "0.0.0.0:9746".into();
    let e = bad.validate().expect_err("refused").to_string();
    assert!(e.contains("loopback") && e.contains("127.0.0.1"), "{e}");
    bad.agent.metrics_listen = "localhost".into();
    let e = bad.validate().expect_err("refused").to_string();
    assert!(e.contains("not an address"), "{e}");
}
