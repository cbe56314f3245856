//! The `wsmb-agent` binary's commands, against a simulated modem on a pseudo-terminal.

mod common;

use std::process::Command;
use std::time::Duration;

use common::scratch;
use wsmb_agent::sim::{SimConfig, Simulator};

fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wsmb-agent"));
    c.env_remove("RUST_LOG").env_remove("WSMB_PASSWORD");
    c
}

async fn run(mut cmd: Command) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run wsmb-agent"))
        .await
        .expect("join");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_the_modem() {
    let dir = scratch("probe");
    let sim = Simulator::start(
        dir.join("modem"),
        SimConfig {
            pin: Some("1234".into()),
            ..SimConfig::default()
        },
    )
    .await
    .expect("sim");
    // registration takes a moment after the PIN
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[modem]]\nname = \"usb1\"\ndevice = \"{}\"\npin = \"1234\"\n",
            sim.path().display()
        ),
    )
    .expect("config");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = agent();
    c.args(["--config", &cfg.display().to_string(), "probe"]);
    let (code, out, err) = run(c).await;
    assert_eq!(code, 0, "{out}{err}");
    for want in [
        "== usb1",
        "model:        SIM800 simulator",
        "IMEI:         356938035643809",
        "SIM:          READY",
        "operator:     Telkomsel",
        "signal:       -71 dBm",
        "registration: registered, home network",
    ] {
        assert!(out.contains(want), "probe output lacks {want:?}:\n{out}");
    }

    // a device that does not exist: a clear error, non-zero exit
    let mut c = agent();
    c.args(["--device", "/dev/serial/by-id/nope", "probe"]);
    let (code, out, _) = run(c).await;
    assert_ne!(code, 0);
    assert!(
        out.contains("/dev/serial/by-id/nope") && out.contains("plugged in"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_delivers_one_sms_now() {
    let dir = scratch("send");
    let sim = Simulator::start(dir.join("modem"), SimConfig::default())
        .await
        .expect("sim");
    let mut c = agent();
    c.args([
        "--device",
        &sim.path().display().to_string(),
        "send",
        "+62 812-3456-789",
        "Tes kirim 😀",
    ]);
    let (code, out, err) = run(c).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("sent to +628123456789 through modem1: 1 part(s), message reference(s) 1"),
        "{out}"
    );
    assert_eq!(
        sim.messages(),
        vec![("+628123456789".to_owned(), "Tes kirim 😀".to_owned())]
    );

    let mut c = agent();
    c.args([
        "--device",
        &sim.path().display().to_string(),
        "send",
        "not-a-number",
        "x",
    ]);
    let (code, _, err) = run(c).await;
    assert_eq!(code, 2);
    assert!(err.contains("not a phone number"), "{err}");

    // --log-format json: each log line one JSON object (here the AT exchange at debug).
    let mut c = agent();
    c.args([
        "--device",
        &sim.path().display().to_string(),
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "send",
        "+628123456789",
        "json",
    ]);
    let (code, out, err) = run(c).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.lines().count() >= 2, "{err}");
    for l in err.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{l}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_and_flags() {
    let dir = scratch("check");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.example.toml");
    let mut c = agent();
    c.args(["--config", example, "check-config"]);
    let (code, out, err) = run(c).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration OK"), "{out}");
    assert!(out.contains("password EMPTY: set WSMB_PASSWORD"), "{out}");

    // flags and WSMB_PASSWORD override the file
    let mut c = agent();
    c.args([
        "--config",
        example,
        "--broker",
        "wss://broker.example.com/",
        "--user",
        "pi",
        "--channel",
        "otp",
        "--device",
        "/dev/ttyACM0",
        "check-config",
    ])
    .env("WSMB_PASSWORD", "secret");
    let (code, out, _) = run(c).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("broker: wss://broker.example.com/ as \"pi\" (password set), jobs on \"otp\""),
        "{out}"
    );
    assert!(out.contains("modem modem1: /dev/ttyACM0"), "{out}");
    assert!(
        !out.contains("secret"),
        "the password must not be printed: {out}"
    );

    // quiet hours are shown in the machine's local time, with its offset
    let quiet = dir.join("quiet.toml");
    std::fs::write(
        &quiet,
        "[agent]\nquiet_hours = \"00:00-23:59\"\n[[modem]]\ndevice = \"/dev/ttyUSB0\"\n",
    )
    .expect("write");
    let mut c = agent();
    c.args(["--config", &quiet.display().to_string(), "check-config"])
        .env("TZ", "Asia/Jakarta");
    let (code, out, err) = run(c).await;
    assert_eq!(code, 0, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("quiet hours: 00:00-23:59 local time (now "))
        .unwrap_or_else(|| panic!("no quiet hours line: {out}"));
    assert!(line.contains(" UTC+07:00; "), "{line}");
    assert!(
        line.contains("in it now, until 23:59") || line.contains("not in it now"),
        "{line}"
    );

    // problems are named
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[broker]\nurl = \"http://x\"\n[[modem]]\ndevice = \"/dev/ttyUSB0\"\n",
    )
    .expect("write");
    let mut c = agent();
    c.args(["--config", &bad.display().to_string(), "check-config"]);
    let (code, _, err) = run(c).await;
    assert_eq!(code, 2);
    assert!(err.contains("broker.url"), "{err}");
    let mut c = agent();
    c.args(["--config", "/nonexistent.toml", "check-config"]);
    let (code, _, err) = run(c).await;
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent.toml"), "{err}");
    // no modem at all
    let empty = dir.join("empty.toml");
    std::fs::write(&empty, "").expect("write");
    let mut c = agent();
    c.args(["--config", &empty.display().to_string(), "check-config"]);
    let (code, _, err) = run(c).await;
    assert_eq!(code, 2);
    assert!(err.contains("no modem configured"), "{err}");

    let mut c = agent();
    c.arg("--help");
    let (code, out, _) = run(c).await;
    assert_eq!(code, 0);
    for w in [
        "run",
        "probe",
        "send",
        "check-config",
        "--device",
        "--broker",
        "WSMB_PASSWORD",
    ] {
        assert!(out.contains(w), "--help lacks {w}");
    }
}
