//! Lasting problems are said once, with what to check, and their end once: a broker that does
//! not answer and a modem that is not plugged in, tried again and again, give one warning each
//! (the repeats are debug), then one line each when they come; normal work after that logs no
//! warning at all. (Its own test binary: it sets the process-wide log subscriber.)

mod common;

use std::time::Duration;

use common::*;
use wsmb_agent::config::ModemConfig;
use wsmb_agent::sim::SimConfig;
use wsmb_common::capture::Captured;
use wsmb_protocol::sms::Status;

const T: Duration = Duration::from_secs(30);

/// Reading the captured log.
trait AgentLines {
    /// The agent's lines so far (the broker of the test logs into the same sink).
    fn agent_lines(&self) -> Vec<String>;
    fn count(&self, level: &str, text: &str) -> usize;
    async fn wait_for(&self, what: &str, f: impl Fn(&Captured) -> bool);
}

impl AgentLines for Captured {
    fn agent_lines(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains("wsmb_agent"))
            .map(str::to_owned)
            .collect()
    }

    fn count(&self, level: &str, text: &str) -> usize {
        self.agent_lines()
            .iter()
            .filter(|l| l.contains(level) && l.contains(text))
            .count()
    }

    async fn wait_for(&self, what: &str, f: impl Fn(&Captured) -> bool) {
        let deadline = tokio::time::Instant::now() + T;
        while !f(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}; the agent logged:\n{}",
                self.agent_lines().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lasting_problems_are_said_once_and_their_end_once() {
    let logs = Captured::install(tracing::Level::DEBUG);

    let dir = scratch("quietlogs");
    // A broker address where nothing listens yet, and a modem path where nothing is plugged.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let device = dir.join("modem-later");
    let m = ModemConfig {
        name: "m1".into(),
        device: device.clone(),
        command_timeout: Duration::from_secs(3),
        registration_timeout: Duration::from_secs(5),
        ..ModemConfig::default()
    };
    let mut cfg = agent_config(port, &dir, vec![m]);
    cfg.broker.reconnect_max = Duration::from_millis(200);
    let a = wsmb_agent::agent::start(cfg).await.expect("agent");

    logs.wait_for("the broker tried 5 times and the modem 3 times", |l| {
        l.count("DEBUG", "broker link down") >= 4 && l.count("DEBUG", "modem down") >= 2
    })
    .await;
    assert_eq!(
        logs.count("WARN", "broker link down"),
        1,
        "{:#?}",
        logs.agent_lines()
    );
    assert_eq!(
        logs.count("WARN", "modem down"),
        1,
        "{:#?}",
        logs.agent_lines()
    );
    let lines = logs.agent_lines();
    let warn = |text: &str| {
        lines
            .iter()
            .find(|l| l.contains("WARN") && l.contains(text))
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        warn("broker link down").contains("check that wsmb-broker runs"),
        "what to check: {lines:#?}"
    );
    assert!(
        warn("modem down").contains("is the modem plugged in"),
        "what to check: {lines:#?}"
    );

    // The broker comes: one line, saying how long it was away.
    let mut c = wsmb_broker::Config::default();
    c.server.listen = port.to_string();
    c.storage.backend = wsmb_broker::config::Backend::Memory;
    c.credentials.lines = vec!["qa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1".into()];
    let b = wsmb_broker::start(c).await.expect("broker on the port");
    logs.wait_for("the link's recovery said", |l| {
        l.count("INFO", "connected to the broker again, after") == 1
    })
    .await;
    // The modem is plugged in: one line too.
    let _sim = wsmb_agent::sim::Simulator::start(&device, SimConfig::default())
        .await
        .expect("simulator");
    logs.wait_for("the modem's recovery said", |l| {
        l.count("INFO", "modem ready again, after") == 1
    })
    .await;

    // Normal work: not one warning more.
    let warnings_before = logs.count("WARN", "");
    let mut status = StatusListener::new(b.addr).await;
    send_jobs(
        b.addr,
        serde_json::json!([job("quiet-1", "+628123456789", "all well")]),
    )
    .await;
    status.wait("quiet-1", Status::Sent, T).await;
    assert_eq!(
        logs.count("WARN", ""),
        warnings_before,
        "{:#?}",
        logs.agent_lines()
    );
    assert_eq!(logs.count("ERROR", ""), 0, "{:#?}", logs.agent_lines());
    if std::env::var_os("WSMB_TEST_SHOW_LOGS").is_some() {
        eprintln!("{}", logs.agent_lines().join("\n"));
    }
    a.shutdown.cancel();
    let _ = a.task.await;
}
