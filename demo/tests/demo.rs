//! The README's first command, run as a user runs it: `wsmb-demo` prints the OTP the broker
//! accepted, the PDU the simulated modem was given (checked here with Gammu, an independent
//! decoder), the status that came back and how to send another; it stays up and handles what
//! `wsmb-demo send` sends; SIGTERM stops it cleanly.

use std::process::Command;
use std::time::Duration;

use wsmb_e2e::Proc;

const T: Duration = Duration::from_secs(60);

fn line(p: &Proc, needle: &str) -> String {
    p.wait_line(needle, T)
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{}", p.output()))
}

/// Number and text of a PDU (SMSC part first), decoded by python3-gammu.
fn gammu(pdu: &str) -> (String, String) {
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import gammu,sys,json; d=gammu.DecodePDU(bytes.fromhex(sys.argv[1])); \
             print(json.dumps([d['Number'], d['Text']]))",
            pdu,
        ])
        .output()
        .expect("/usr/bin/python3 with python3-gammu");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<String> = serde_json::from_slice(&out.stdout).expect("json");
    (v[0].clone(), v[1].clone())
}

#[test]
fn the_demo_sends_an_otp_through_the_whole_bundle_and_stays_up() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsmb-demo"));
    cmd.args(["--listen", "127.0.0.1:0"]).env_remove("RUST_LOG");
    let mut demo = Proc::spawn(cmd).expect("wsmb-demo");

    let broker = line(&demo, "broker  listening on ws://");
    let url = broker.split_whitespace().nth(3).expect("url").to_owned();
    let sending = line(&demo, "sender  sending OTP ");
    let id = sending.split_whitespace().nth(3).expect("id").to_owned();
    let text = sending
        .split(": \"")
        .nth(1)
        .expect("text")
        .trim_end_matches('"')
        .to_owned();
    assert!(text.contains("code is "), "{sending}");
    line(&demo, &format!("broker  accepted {id}: message_id "));
    let given = line(&demo, "modem   given AT+CMGS=");
    let pdu = given.rsplit(' ').next().expect("pdu").to_owned();
    let decoded = line(&demo, "modem   decoded: to +6281234567890");
    assert!(decoded.contains(&text), "{decoded} vs {text}");
    assert_eq!(gammu(&pdu), ("+6281234567890".to_owned(), text.clone()));
    line(&demo, &format!("status  {id}: queued to +6281234567890"));
    line(
        &demo,
        &format!("status  {id}: sent to +6281234567890 via sim1"),
    );
    // The network's delivery report for it.
    line(&demo, &format!("status  {id}: delivered"));
    let ready = line(&demo, "ready   send another");
    assert!(
        ready.contains("send --url ") && ready.contains("php "),
        "{ready}"
    );
    // The status page it names shows the demo's gateway.
    let page = line(&demo, "status  page http://");
    let page_url = page.split_whitespace().nth(2).expect("page url").to_owned();
    let out = Command::new("curl")
        .args(["-s", "-f", "-u", "qa:4lt0@1234"])
        .arg(format!("{page_url}/data"))
        .output()
        .expect("curl");
    let data = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{page_url}: {out:?}");
    let v: serde_json::Value = serde_json::from_str(&data).expect("status data");
    assert_eq!(v["sms"]["gateways"][0]["connected"], true, "{data}");
    assert_eq!(
        v["sms"]["gateways"][0]["modems"][0]["state"], "ready",
        "{data}"
    );

    // Still up: the command-line sender goes through the same bundle.
    let out = Command::new(env!("CARGO_BIN_EXE_wsmb-demo"))
        .args([
            "send",
            "--url",
            &url,
            "--id",
            "cli-1",
            "08129999000",
            "Hello again",
        ])
        .output()
        .expect("wsmb-demo send");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("accepted cli-1") && stdout.contains("cli-1: sent to +628129999000"),
        "{stdout}"
    );
    line(
        &demo,
        "modem   decoded: to +628129999000, GSM 7-bit: \"Hello again\"",
    );
    line(&demo, "status  cli-1: sent");

    let kill = Command::new("kill")
        .args(["-TERM", &demo.pid().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let status = demo.wait(T).expect("the demo did not stop on SIGTERM");
    assert!(status.success(), "{}", demo.output());
    assert!(demo.output().contains("stopping"));
}
