//! Our PDUs, decoded by an independent implementation: Gammu (Debian package python3-gammu,
//! installed by .ci/run). Every message of the corpus is encoded by us, each part decoded by
//! `gammu.DecodePDU`, the parts joined by `gammu.LinkSMS` + `gammu.DecodeSMS`; the number, the
//! text, the coding and the part headers must come back exactly.

use std::io::Write;
use std::process::{Command, Stdio};

mod common;

use common::gammu::{self, python};
use wsmb_agent::pdu::{Address, SubmitOptions, encode_submit};

const DECODER: &str = r#"
import json, sys, gammu
out = []
for case in json.load(sys.stdin):
    parts = [gammu.DecodePDU(bytes.fromhex(h)) for h in case["pdus"]]
    r = {
        "number": parts[0]["Number"],
        "coding": parts[0]["Coding"],
        "texts": [p["Text"] for p in parts],
        "udh": [[p["UDH"]["ID8bit"], p["UDH"]["AllParts"], p["UDH"]["PartNumber"]] for p in parts],
    }
    if len(parts) > 1:
        linked = gammu.LinkSMS([[p] for p in parts])
        if len(linked) != 1:
            r["error"] = "parts did not link into one message: %d" % len(linked)
        else:
            d = gammu.DecodeSMS(linked[0])
            r["linked"] = "".join(e["Buffer"] or "" for e in d["Entries"])
    else:
        # Gammu's own encoding of the same text, for comparing the user data octets.
        enc = gammu.EncodeSMS({"Class": -1, "Unicode": case["unicode"], "Entries": [{"ID": "Text", "Buffer": case["text"]}]})
        enc[0]["SMSC"] = {"Location": 1}
        enc[0]["Number"] = case["number"]
        r["gammu_pdu"] = gammu.EncodePDU(enc[0]).hex()
    out.append(r)
json.dump(out, sys.stdout)
"#;

fn corpus() -> Vec<String> {
    let mut c: Vec<String> = vec![
        "Kode OTP Anda adalah 482913. Jangan berikan kode ini kepada siapa pun.".into(),
        "Halo! Pesanan #1234 sudah dikirim; estimasi tiba besok (Senin).".into(),
        "€[]{}^~\\|".into(),
        "Prix: 10€ [promo] {code} ^_^ ~ a\\b | fin".into(),
        "àéèùìòÇÑÜßÅåÆæØøÄÖäöü¿¡§£¥".into(),
        "Crème brûlée à la française".into(), // û is not GSM: UCS-2
        "مرحبا، رمز التحقق الخاص بك هو 123456".into(),
        "OTP 123456 😀👍🏽".into(),
        "line one\nline two\r\nline three".into(),
        "@£$¥ΔΦΓΛΩΠΨΣΘΞ".into(),
    ];
    // every boundary, 1 to 10 parts
    for n in [
        1usize, 159, 160, 161, 305, 306, 307, 458, 459, 460, 1529, 1530,
    ] {
        c.push("a".repeat(n));
    }
    for k in 1..=10 {
        c.push("b".repeat(153 * k));
        c.push("c".repeat(153 * k + 1));
    }
    for n in [69usize, 70, 71, 133, 134, 135, 670] {
        c.push("ع".repeat(n));
    }
    for k in 2..=10 {
        c.push("ش".repeat(67 * k));
        c.push("ش".repeat(67 * k + 1));
    }
    // escapes and surrogate pairs straddling every part boundary
    for lead in 150..=154 {
        c.push(format!("{}€{}", "x".repeat(lead), "y".repeat(200)));
        c.push(format!("{}{}", "z".repeat(lead), "[]".repeat(80)));
    }
    for lead in 64..=68 {
        c.push(format!("{}😀{}", "ع".repeat(lead), "😀".repeat(40)));
    }
    c.push("Indonesia: Terima kasih telah berbelanja. ".repeat(12));
    c.push("😀".repeat(335)); // 670 units: 10 parts
    c
}

#[test]
fn gammu_decodes_our_pdus_to_the_same_number_and_text() {
    let numbers = ["+628123456789", "08126666666", "+4915112345678", "12345"];
    let mut cases = Vec::new();
    let mut expected = Vec::new();
    for (i, text) in corpus().iter().enumerate() {
        let number = numbers[i % numbers.len()];
        let addr = Address::parse(number).expect("number");
        let reference = (i * 37 % 256) as u8;
        let parts =
            encode_submit(&addr, text, reference, SubmitOptions::default()).expect("encode");
        cases.push(serde_json::json!({
            "pdus": parts.iter().map(|p| p.hex.clone()).collect::<Vec<_>>(),
            "text": text,
            "number": number,
            "unicode": !wsmb_agent::pdu::gsm7::is_gsm7(text),
        }));
        expected.push((number.to_owned(), text.clone(), parts.clone(), reference));
    }
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", DECODER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 with python3-gammu (installed by .ci/run)");
    let input = serde_json::to_vec(&cases).expect("json");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&input)
        .expect("write");
    let out = child.wait_with_output().expect("decoder");
    assert!(
        out.status.success(),
        "gammu decoder failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("decoder output");
    assert_eq!(results.len(), expected.len());
    for (i, (r, (number, text, parts, reference))) in results.iter().zip(&expected).enumerate() {
        let nparts = &parts.len();
        assert!(r.get("error").is_none(), "case {i}: {r}");
        assert_eq!(r["number"], number.as_str(), "case {i}");
        if *nparts > 1 {
            assert_eq!(r["linked"], text.as_str(), "case {i}: text differs");
        } else {
            // Gammu's DecodePDU decodes as many characters as there are septets, so each
            // escape (2 septets, 1 character) adds one junk character at the end of its Text;
            // the text itself must match exactly.
            let got = r["texts"][0].as_str().expect("text");
            let escapes = text
                .chars()
                .filter(|c| "€[]{}^~\\|\u{0C}".contains(*c))
                .count();
            let got_chars: Vec<char> = got.chars().collect();
            let want: Vec<char> = text.chars().collect();
            assert_eq!(got_chars.len(), want.len() + escapes, "case {i}: {got:?}");
            assert_eq!(
                &got_chars[..want.len()],
                &want[..],
                "case {i}: text differs"
            );
            // and Gammu's own encoder produces the same user data (from TP-PID on, skipping
            // its validity-period octet)
            let ours = &parts[0].hex;
            let theirs = r["gammu_pdu"].as_str().expect("gammu pdu").to_uppercase();
            let ud_ours = user_data(ours);
            let ud_theirs = user_data(&theirs);
            assert_eq!(
                ud_ours, ud_theirs,
                "case {i}: user data differs from Gammu's encoding"
            );
        }
        let gsm = wsmb_agent::pdu::gsm7::is_gsm7(text);
        let coding = r["coding"].as_str().expect("coding");
        assert_eq!(coding.starts_with("Default"), gsm, "case {i}: {coding}");
        let udh = r["udh"].as_array().expect("udh");
        assert_eq!(udh.len(), *nparts);
        if *nparts > 1 {
            for (k, u) in udh.iter().enumerate() {
                assert_eq!(u[0], i64::from(*reference), "case {i} part {k}");
                assert_eq!(u[1], *nparts as i64, "case {i} part {k}");
                assert_eq!(u[2], (k + 1) as i64, "case {i} part {k}");
            }
        }
    }
}

/// DCS, UDL and UD of a single-part SMS-SUBMIT hex (skipping the validity period if present).
fn user_data(hex: &str) -> String {
    let b = wsmb_agent::pdu::from_hex(hex).expect("hex");
    let t = &b[1 + b[0] as usize..];
    let first = t[0];
    let ndigits = t[2] as usize;
    let mut i = 4 + ndigits.div_ceil(2); // first, MR, len, type, digits
    i += 1; // PID
    let dcs = t[i];
    i += 1;
    if (first >> 3) & 3 == 2 {
        i += 1;
    }
    let rest: String = t[i..].iter().map(|x| format!("{x:02X}")).collect();
    format!("{dcs:02X}{rest}")
}

/// Gammu encodes SMS-DELIVER PDUs (as a modem would receive them, SMSC information included):
/// every message of the corpus, in 8-bit or 16-bit reference parts, from international,
/// national and alphanumeric senders; our decoder gets the sender, the time, the coding and,
/// with the parts joined by their headers in any order, the text back exactly.
#[test]
fn we_decode_gammus_deliver_pdus_to_the_same_sender_and_text() {
    use wsmb_agent::pdu::{Coding, Received, decode_received};
    let senders = ["+628123456789", "08126666666", "BANK", "Telkomsel"];
    let mut cases = Vec::new();
    for (i, text) in corpus().iter().enumerate() {
        cases.push(serde_json::json!({
            "text": text,
            "sender": senders[i % senders.len()],
            "unicode": !wsmb_agent::pdu::gsm7::is_gsm7(text),
            "wide": i % 2 == 1,
        }));
    }
    cases.push(serde_json::json!({"sender": "+628123456789", "data": "0102ff006162"}));
    let results = python(
        gammu::DELIVER_ENCODER,
        &serde_json::Value::Array(cases.clone()),
    );
    let results = results.as_array().expect("list");
    assert_eq!(results.len(), cases.len());
    for (i, (case, pdus)) in cases.iter().zip(results).enumerate() {
        let mut parts: Vec<_> = pdus
            .as_array()
            .expect("pdus")
            .iter()
            .map(|h| {
                let h = h.as_str().expect("hex");
                match decode_received(h) {
                    Ok(Received::Deliver(d)) => d,
                    other => panic!("case {i}: {h}: {other:?}"),
                }
            })
            .collect();
        // Joined by their headers, whatever the order they are read in.
        parts.reverse();
        parts.sort_by_key(|p| p.concat.map(|c| c.2));
        let sender = case["sender"].as_str().expect("sender");
        for p in &parts {
            assert_eq!(p.sender, sender, "case {i}");
            assert_eq!(
                p.alphanumeric,
                sender.starts_with(char::is_alphabetic),
                "case {i}"
            );
            assert_eq!(
                p.timestamp.rfc3339(),
                "2026-12-05T17:30:00+00:00",
                "case {i}"
            );
        }
        if let Some(data) = case["data"].as_str() {
            assert_eq!(parts[0].coding, Coding::Data8, "case {i}");
            assert_eq!(parts[0].text, data, "case {i}");
            assert_eq!(
                parts[0].data.as_deref(),
                Some(&[1u8, 2, 0xff, 0, 0x61, 0x62][..])
            );
            continue;
        }
        let text = case["text"].as_str().expect("text");
        let joined: String = parts.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(joined, text, "case {i}");
        let want = if case["unicode"] == true {
            Coding::Ucs2
        } else {
            Coding::Gsm7
        };
        assert!(parts.iter().all(|p| p.coding == want), "case {i}");
        if parts.len() > 1 {
            let (reference, total, _) = parts[0].concat.expect("header");
            for (k, p) in parts.iter().enumerate() {
                assert_eq!(
                    p.concat,
                    Some((reference, total, (k + 1) as u8)),
                    "case {i}"
                );
                assert_eq!(p.wide_reference, case["wide"] == true, "case {i}");
            }
            assert_eq!(usize::from(total), parts.len(), "case {i}");
        }
    }
}

/// The status reports the modem simulator sends (our encoder) read the same in Gammu's decoder
/// and in ours: message reference (wrapping at 255), recipient, times, TP-ST.
#[test]
fn gammu_reads_our_status_reports_as_we_do() {
    use wsmb_agent::pdu::{
        Received, SmscTime, StatusReport, decode_received, encode_status_report,
    };
    let decoder = r#"
import json, sys, gammu
out = []
for h in json.load(sys.stdin):
    d = gammu.DecodePDU(bytes.fromhex(h))
    out.append({"type": d["Type"], "mr": d["MessageReference"], "number": d["Number"],
                "status": d["DeliveryStatus"], "sent": d["DateTime"].isoformat(),
                "done": d["SMSCDateTime"].isoformat()})
json.dump(out, sys.stdout)
"#;
    let mut reports = Vec::new();
    for (k, (mr, status)) in [
        (0u8, 0x00u8),
        (1, 0x21),
        (128, 0x46),
        (254, 0x62),
        (255, 0x00),
    ]
    .into_iter()
    .enumerate()
    {
        reports.push(StatusReport {
            mr,
            recipient: if k % 2 == 0 {
                "+628123456789"
            } else {
                "08126666666"
            }
            .into(),
            submitted: SmscTime {
                epoch: 1_796_491_800 + k as i64,
                offset_minutes: 0,
            },
            discharged: SmscTime {
                epoch: 1_796_491_860 + k as i64,
                offset_minutes: 0,
            },
            status,
        });
    }
    let hexes: Vec<String> = reports
        .iter()
        .map(|r| encode_status_report(r).expect("encode"))
        .collect();
    let theirs = python(decoder, &serde_json::json!(hexes));
    for (i, (r, hex)) in reports.iter().zip(&hexes).enumerate() {
        let t = &theirs[i];
        assert_eq!(t["type"], "Status_Report", "{hex}");
        assert_eq!(t["mr"], i64::from(r.mr), "{hex}");
        assert_eq!(t["number"], r.recipient.as_str(), "{hex}");
        assert_eq!(t["status"], i64::from(r.status), "{hex}");
        assert_eq!(
            t["sent"],
            format!("2026-12-05T17:30:0{i}"),
            "{hex}: SMSC time read by Gammu"
        );
        assert_eq!(t["done"], format!("2026-12-05T17:31:0{i}"), "{hex}");
        assert_eq!(
            decode_received(hex).expect("ours"),
            Received::StatusReport(r.clone())
        );
    }
}
