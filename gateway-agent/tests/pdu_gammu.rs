//! Our PDUs, decoded by an independent implementation: Gammu (Debian package python3-gammu,
//! installed by .ci/run). Every message of the corpus is encoded by us, each part decoded by
//! `gammu.DecodePDU`, the parts joined by `gammu.LinkSMS` + `gammu.DecodeSMS`; the number, the
//! text, the coding and the part headers must come back exactly.

use std::io::Write;
use std::process::{Command, Stdio};

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
