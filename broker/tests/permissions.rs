//! `[permissions]`: who may send and receive on which channel, over WebSocket and the HTTP SMS
//! API, and the rules reloaded from the config file while the broker runs.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsmb_broker::auth::permissions::PermissionsConfig;

const T: Duration = Duration::from_secs(20);

/// The deployment's rules, for the test users: `qa` is the application, `sha` the agent.
const RULES: &str = r#"
default = "none"
[users.qa]
send = ["sms"]
receive = ["sms-status", "sms-inbox"]
[users.sha]
receive = ["sms"]
send = ["sms-*"]
"#;

fn rules(text: &str) -> PermissionsConfig {
    wsmb_common::from_toml(text, std::path::Path::new("rules.toml")).expect("rules")
}

/// The next reply, skipping forwarded messages.
async fn next_reply(ws: &mut Ws) -> wsmb_protocol::reply::BrokerReply {
    loop {
        if let Some(r) = wsmb_protocol::reply::BrokerReply::parse(&recv_text(ws).await) {
            return r;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_actions_follow_the_rules() {
    let b = broker_with(|c| c.permissions = rules(RULES)).await;
    // The agent receives jobs; the application sends them.
    let mut agent = connect_as(b.addr, SHA_USER).await;
    receive_on(&mut agent, "sms").await;
    let mut app = connect(b.addr).await;
    send(&mut app, &sms("sms", "job-1")).await;
    assert!(recv_text(&mut agent).await.contains("job-1"));
    let r = next_reply(&mut app).await;
    assert_eq!(
        (r.command.as_str(), r.response_code.as_str()),
        ("send-result", "00")
    );
    // The application may not take jobs, nor the agent send them: error 20, nothing happens,
    // the connection stays.
    send(&mut app, r#"{"command":"receive-message","channel":"sms"}"#).await;
    let r = next_reply(&mut app).await;
    assert_eq!(
        (r.command.as_str(), r.response_code.as_str()),
        ("error", "20"),
        "{r:?}"
    );
    let reason = r.data[0]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(
        reason.contains("\"qa\"") && reason.contains("receive on"),
        "{reason}"
    );
    let mut agent_tx = connect_as(b.addr, SHA_USER).await;
    send(&mut agent_tx, &sms("sms", "forged-job")).await;
    let r = next_reply(&mut agent_tx).await;
    assert_eq!(
        (r.command.as_str(), r.response_code.as_str()),
        ("error", "20")
    );
    expect_silence(&mut agent, Duration::from_millis(300)).await;
    // The agent's statuses reach the application (a prefix rule).
    let mut app_rx = connect(b.addr).await;
    receive_on(&mut app_rx, "sms-status").await;
    send(&mut agent_tx, &sms("sms-status", "status-1")).await;
    assert!(recv_text(&mut app_rx).await.contains("status-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_follows_the_same_rules() {
    let b = broker_with(|c| c.permissions = rules(RULES)).await;
    let _agent = {
        let mut a = connect_as(b.addr, SHA_USER).await;
        receive_on(&mut a, "sms").await;
        a
    };
    let call = |creds: (&'static str, &'static str), method: &'static str, path: &'static str| {
        let addr = b.addr;
        async move {
            let body = r#"{"textMessage":{"text":"x"},"phoneNumbers":["+628126666666"]}"#;
            let req = format!(
                "{method} /3rdparty/v1{path} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
                basic(creds.0, creds.1),
                if method == "POST" { body.len() } else { 0 },
                if method == "POST" { body } else { "" }
            );
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(req.as_bytes()).await.expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).await.expect("read");
            out
        }
    };
    let r = call(QA, "POST", "/messages").await;
    assert!(r.starts_with("HTTP/1.1 202 "), "the application sends: {r}");
    for path in ["/messages", "/inbox", "/devices"] {
        let r = call(QA, "GET", path).await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{path}: {r}");
    }
    let r = call(SHA_USER, "POST", "/messages").await;
    assert!(
        r.starts_with("HTTP/1.1 403 "),
        "the agent may not send SMS: {r}"
    );
    assert!(r.contains("[permissions]"), "{r}");
    let r = call(SHA_USER, "GET", "/messages").await;
    assert!(r.starts_with("HTTP/1.1 403 "), "nor read states: {r}");
    let r = call(SHA_USER, "GET", "/health").await;
    assert!(
        r.starts_with("HTTP/1.1 200 "),
        "health needs only a user: {r}"
    );
}

/// Rules come from the config file and are read again when it changes, without a restart;
/// a broken file keeps the rules in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_reloaded_when_the_config_file_changes() {
    let dir = std::env::temp_dir().join(format!("wsmb-perm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("broker.toml");
    let closed = "[permissions]\ndefault = \"none\"\n";
    std::fs::write(&file, closed).expect("write");
    let f = file.clone();
    let b = broker_with(move |c| {
        c.permissions = rules("default = \"none\"");
        c.path = Some(f);
        c.credentials.reload_interval = Duration::from_millis(100);
    })
    .await;
    let try_receive = |addr| async move {
        let mut ws = connect(addr).await;
        send(&mut ws, r#"{"command":"receive-message","channel":"news"}"#).await;
        send(&mut ws, r#"{"command":"ping"}"#).await;
        next_reply(&mut ws).await.response_code
    };
    assert_eq!(try_receive(b.addr).await, "20");
    std::fs::write(
        &file,
        "[permissions]\ndefault = \"none\"\n[permissions.users.qa]\nreceive = [\"news\"]\n",
    )
    .expect("write");
    let deadline = Instant::now() + T;
    while try_receive(b.addr).await != "00" {
        assert!(
            Instant::now() < deadline,
            "the new rules never came into force"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A broken file: the rules in force stay.
    std::fs::write(&file, "[permissions]\ndefault = \"maybe\"\n").expect("write");
    let failures = &b.shared.stats.reload_failures;
    let deadline = Instant::now() + T;
    while failures.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the broken file was never read");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(try_receive(b.addr).await, "00");
    let _ = std::fs::remove_dir_all(&dir);
}
