//! The modem actor against the simulator on a real pseudo-terminal.

use std::path::PathBuf;
use std::time::Duration;

use wsmb_agent::modem::{self, FailureClass, Health, ModemHandle, ModemSettings, PartOutcome};
use wsmb_agent::pdu::{Address, SubmitOptions, encode_submit};
use wsmb_agent::sim::{Fault, SimConfig, Simulator};

fn scratch(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("wsmb-modem-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

fn settings(sim: &Simulator) -> ModemSettings {
    let mut s = ModemSettings::new("m1", sim.path());
    s.command_timeout = Duration::from_secs(2);
    s.prompt_timeout = Duration::from_secs(2);
    s.send_timeout = Duration::from_secs(2);
    s.registration_timeout = Duration::from_secs(5);
    s.health_interval = Duration::from_millis(300);
    s.reopen_max = Duration::from_millis(500);
    s
}

/// A simulator in a fresh scratch directory.
async fn start_sim(tag: &str, cfg: SimConfig) -> Simulator {
    Simulator::start(scratch(tag).join("modem"), cfg)
        .await
        .expect("sim")
}

/// A simulated SIM locked with `pin`.
fn locked(pin: &str) -> SimConfig {
    SimConfig {
        pin: Some(pin.into()),
        ..SimConfig::default()
    }
}

/// Spawns the modem actor and waits until it is ready to send.
async fn ready(s: ModemSettings) -> ModemHandle {
    let m = modem::spawn(s);
    wait_health(&m, Health::is_ready, Duration::from_secs(20)).await;
    m
}

async fn wait_health(m: &ModemHandle, want: impl Fn(&Health) -> bool, within: Duration) -> Health {
    let mut w = m.watch();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let h = w.borrow_and_update().clone();
        if want(&h) {
            return h;
        }
        match tokio::time::timeout_at(deadline, w.changed()).await {
            Ok(Ok(())) => {}
            _ => panic!("health never matched; last {:?}", m.health()),
        }
    }
}

async fn send_text(m: &ModemHandle, number: &str, text: &str) -> Vec<PartOutcome> {
    let parts = encode_submit(
        &Address::parse(number).expect("number"),
        text,
        7,
        SubmitOptions::default(),
    )
    .expect("encode");
    let mut out = Vec::new();
    for p in parts {
        out.push(m.send_part_simple(p.hex, p.tpdu_len).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initialises_with_pin_probes_and_sends() {
    let sim = start_sim("basic", locked("1234")).await;
    let mut s = settings(&sim);
    s.pin = Some("1234".into());
    let m = ready(s).await;

    let info = m.probe().await.expect("probe");
    assert_eq!(info.model, "SIM800 simulator");
    assert_eq!(info.imei, "356938035643809");
    assert_eq!(info.sim, "READY");
    assert_eq!(info.operator.as_deref(), Some("Telkomsel"));
    assert_eq!(info.signal_dbm, Some(-71));
    assert_eq!(info.registration, "registered, home network");

    let text = "Kode OTP Anda 123456 €".repeat(10); // two parts
    let out = send_text(&m, "+628123456789", &text).await;
    assert_eq!(out.len(), 2);
    assert!(
        out.iter().all(|o| matches!(o, PartOutcome::Sent { .. })),
        "{out:?}"
    );
    assert_eq!(sim.messages(), vec![("+628123456789".to_owned(), text)]);
    let cmds = sim.commands();
    assert!(
        cmds.iter().any(|c| c == "ATE0") && cmds.iter().any(|c| c == "AT+CMGF=0"),
        "{cmds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsolicited_lines_at_awkward_moments_change_nothing() {
    let sim = start_sim("noise", SimConfig::default()).await;
    sim.set_noise(true);
    let m = ready(settings(&sim)).await;
    assert_eq!(m.probe().await.expect("probe").signal_dbm, Some(-71));
    for i in 0..5 {
        let out = send_text(&m, "08126666666", &format!("pesan {i}")).await;
        assert!(matches!(out[0], PartOutcome::Sent { .. }), "{out:?}");
    }
    assert_eq!(sim.messages().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_stops_the_modem_and_is_never_retried() {
    let sim = start_sim("pin", locked("1234")).await;
    let mut s = settings(&sim);
    s.pin = Some("9999".into());
    let m = modem::spawn(s);
    let h = wait_health(
        &m,
        |h| matches!(h, Health::Stopped(_)),
        Duration::from_secs(10),
    )
    .await;
    let Health::Stopped(reason) = h else {
        unreachable!()
    };
    assert!(reason.contains("wrong PIN"), "{reason}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tries = sim.pin_attempts();
    assert_eq!(tries, 1, "the PIN was tried {tries} times");
    // jobs get a prompt answer, not a hang
    let out = send_text(&m, "0812", "x").await;
    assert!(
        matches!(&out[0], PartOutcome::Unavailable(r) if r.contains("PIN")),
        "{out:?}"
    );

    // no PIN configured for a locked SIM: stopped with advice
    let sim = start_sim("nopin", locked("1234")).await;
    let m = modem::spawn(settings(&sim));
    let h = wait_health(
        &m,
        |h| matches!(h, Health::Stopped(_)),
        Duration::from_secs(10),
    )
    .await;
    assert!(matches!(h, Health::Stopped(r) if r.contains("set `pin`")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_modem_goes_down_and_comes_back() {
    let sim = start_sim("silent", SimConfig::default()).await;
    let m = ready(settings(&sim)).await;
    sim.set_silent(true);
    // a send while silent: the prompt never comes, nothing was sent
    let out = send_text(&m, "0812", "hello").await;
    match &out[0] {
        PartOutcome::Failed { class, .. } => assert_eq!(*class, FailureClass::Transient),
        PartOutcome::Unavailable(_) => {}
        other => panic!("{other:?}"),
    }
    wait_health(
        &m,
        |h| matches!(h, Health::Down(_)),
        Duration::from_secs(10),
    )
    .await;
    let out = send_text(&m, "0812", "while down").await;
    assert!(matches!(out[0], PartOutcome::Unavailable(_)), "{out:?}");
    sim.set_silent(false);
    wait_health(&m, Health::is_ready, Duration::from_secs(20)).await;
    let out = send_text(&m, "0812", "after").await;
    assert!(matches!(out[0], PartOutcome::Sent { .. }), "{out:?}");
    assert_eq!(
        sim.messages(),
        vec![("0812".to_owned(), "after".to_owned())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modem_that_disappears_is_reopened_when_it_comes_back() {
    let sim = start_sim("gone", locked("0000")).await;
    let mut s = settings(&sim);
    s.pin = Some("0000".into());
    let m = ready(s).await;
    sim.disappear();
    wait_health(
        &m,
        |h| matches!(h, Health::Down(_)),
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    sim.reappear().expect("reappear");
    wait_health(&m, Health::is_ready, Duration::from_secs(15)).await;
    let out = send_text(&m, "+6281", "back").await;
    assert!(matches!(out[0], PartOutcome::Sent { .. }), "{out:?}");
    // the SIM was unlocked again after the "reboot"
    assert_eq!(sim.pin_attempts(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cms_errors_are_classified_and_the_modem_keeps_working() {
    let sim = start_sim("cms", SimConfig::default()).await;
    let m = ready(settings(&sim)).await;
    let cases = [
        (Fault::ErrorAfterPdu(38), FailureClass::Transient),
        (Fault::ErrorAfterPdu(28), FailureClass::Permanent),
        (Fault::ErrorAfterPdu(500), FailureClass::Ambiguous),
        (Fault::RefuseBeforePrompt(331), FailureClass::Transient),
        (Fault::NoResult, FailureClass::Ambiguous),
        (Fault::NoPrompt, FailureClass::Transient),
    ];
    for (fault, want) in cases {
        sim.push_fault(fault);
        let out = send_text(&m, "0812", "x").await;
        match &out[0] {
            PartOutcome::Failed { class, .. } => assert_eq!(*class, want, "{fault:?}"),
            other => panic!("{fault:?}: {other:?}"),
        }
        // and the next message goes through
        wait_health(&m, Health::is_ready, Duration::from_secs(20)).await;
        let out = send_text(&m, "0812", "ok").await;
        assert!(
            matches!(out[0], PartOutcome::Sent { .. }),
            "after {fault:?}: {out:?}"
        );
    }
    let out = {
        sim.push_fault(Fault::ErrorAfterPdu(38));
        send_text(&m, "0812", "x").await
    };
    match &out[0] {
        PartOutcome::Failed { code, .. } => assert_eq!(code.as_deref(), Some("+CMS ERROR: 38")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_has_a_deadline() {
    let sim = start_sim(
        "reg",
        SimConfig {
            registration_delay: Duration::from_secs(3600),
            ..SimConfig::default()
        },
    )
    .await;
    let mut s = settings(&sim);
    s.registration_timeout = Duration::from_millis(700);
    let m = modem::spawn(s);
    let h = wait_health(
        &m,
        |h| matches!(h, Health::Down(_)),
        Duration::from_secs(10),
    )
    .await;
    assert!(matches!(h, Health::Down(r) if r.contains("not registered")));
}
