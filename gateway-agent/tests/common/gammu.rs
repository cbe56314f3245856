//! Gammu's python bindings (Debian's python3-gammu, installed by `.ci/run`) as an independent
//! PDU encoder and decoder for the tests.

use std::io::Write;
use std::process::{Command, Stdio};

/// Gammu's encoder of SMS-DELIVER PDUs, as a modem receives them (SMSC information first):
/// stdin a JSON list of `{"text", "sender", "unicode", "wide"}` (or `{"sender", "data": hex}`
/// for 8-bit data), stdout the list of each message's parts' PDUs (hex), SMSC time
/// 2026-12-05 17:30:00.
pub const DELIVER_ENCODER: &str = r#"
import datetime, json, sys, gammu
smsc = {"Location": 0, "Number": "+6281100000", "Format": "Text", "Validity": "NA", "DefaultNumber": "", "Name": ""}
out = []
for case in json.load(sys.stdin):
    if case.get("data"):
        parts = gammu.EncodeSMS({"Class": -1, "Entries": [{"ID": "Text", "Buffer": "x"}]})
        parts[0]["Coding"] = "8bit"
        parts[0]["Text"] = bytes.fromhex(case["data"])
    else:
        kind = "ConcatenatedTextLong16bit" if case["wide"] else "ConcatenatedTextLong"
        parts = gammu.EncodeSMS({"Class": -1, "Unicode": case["unicode"], "Entries": [{"ID": kind, "Buffer": case["text"]}]})
    pdus = []
    for p in parts:
        p["Number"] = case["sender"]
        p["Type"] = "Deliver"
        p["SMSC"] = smsc
        p["DateTime"] = datetime.datetime(2026, 12, 5, 17, 30, 0)
        pdus.append(gammu.EncodePDU(p, "Deliver").hex())
    out.append(pdus)
json.dump(out, sys.stdout)
"#;

/// Runs `script` with `input` as JSON on stdin; its JSON output.
pub fn python(script: &str, input: &serde_json::Value) -> serde_json::Value {
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 with python3-gammu (installed by .ci/run)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&serde_json::to_vec(input).expect("json"))
        .expect("write");
    let out = child.wait_with_output().expect("python");
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python's output")
}

/// Gammu's PDUs of one message (its parts, in order) from `sender`.
pub fn deliver(text: &str, sender: &str, wide: bool) -> Vec<String> {
    let case = serde_json::json!([{
        "text": text,
        "sender": sender,
        "unicode": !wsmb_agent::pdu::gsm7::is_gsm7(text),
        "wide": wide,
    }]);
    python(DELIVER_ENCODER, &case)[0]
        .as_array()
        .expect("pdus")
        .iter()
        .map(|h| h.as_str().expect("hex").to_owned())
        .collect()
}
