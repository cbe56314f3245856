//! The SIM PIN is never written to a log, at any level: the agent runs with every log line
//! (trace included) captured, unlocks a PIN-locked simulated modem, sends, then meets a SIM that
//! refuses its PIN; the PIN appears nowhere in what was logged. (Its own test binary: it sets
//! the process-wide log subscriber.)

mod common;

use std::time::Duration;

use common::*;
use wsmb_agent::sim::SimConfig;
use wsmb_common::capture::Captured;
use wsmb_protocol::sms::Status;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pin_never_reaches_the_logs() {
    let logs = Captured::install(tracing::Level::TRACE);

    let dir = scratch("pinlog");
    let b = broker().await;
    let locked = SimConfig {
        pin: Some("4821".into()),
        ..SimConfig::default()
    };
    let good = sim(&dir, "good", locked.clone()).await;
    let refusing = sim(&dir, "refusing", locked).await;
    let mut m1 = modem("good", &good);
    m1.pin = "4821".into();
    let mut m2 = modem("refusing", &refusing);
    m2.pin = "97531".into();
    let cfg = agent_config(b.addr, &dir, vec![m1, m2]);
    let a = wsmb_agent::agent::start(cfg).await.expect("agent");
    let mut status = StatusListener::new(b.addr).await;
    link_up(&a).await;
    send_jobs(
        b.addr,
        serde_json::json!([job("p1", "+628123456789", "after the PIN")]),
    )
    .await;
    status.wait("p1", Status::Sent, T).await;
    // The other SIM refused its PIN: stopped, and says why.
    let deadline = tokio::time::Instant::now() + T;
    while !matches!(a.modems[1].health(), wsmb_agent::modem::Health::Stopped(_)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            a.modems[1].health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = logs.text();
    assert!(
        text.contains("AT+CPIN=<hidden>"),
        "trace logging was on and the PIN command was written:\n{text}"
    );
    assert!(text.contains("refused the PIN"), "{text}");
    // Each line without its timestamp (whose digits may contain a PIN by chance).
    let bodies: String = text
        .lines()
        .map(|l| l.split_once(' ').map_or(l, |(_, rest)| rest))
        .collect::<Vec<_>>()
        .join("\n");
    for pin in ["4821", "97531"] {
        assert!(
            !bodies.contains(pin),
            "the PIN {pin} is in the logs:\n{text}"
        );
    }
}
