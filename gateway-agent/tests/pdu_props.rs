//! Property tests of the PDU codec: for any text (GSM 7-bit with extension characters, any
//! Unicode including characters outside the BMP) and any reference, encoding then decoding
//! gives the text back, part by part in order; every part fits in one SMS; and a status report
//! survives our encoder and decoder.

use proptest::prelude::*;
use wsmb_agent::pdu::{
    Address, Received, SmscTime, StatusReport, SubmitOptions, decode_received, decode_submit,
    encode_status_report, encode_submit, plan,
};

/// Characters of the GSM alphabet (plain and extension), plus any Unicode scalar.
fn text() -> impl Strategy<Value = String> {
    let gsm = prop::sample::select(
        "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà€[]{}^~\\|\u{c}"
            .chars()
            .collect::<Vec<char>>(),
    );
    let any = any::<char>();
    prop_oneof![
        // mostly GSM (7-bit, escapes at part boundaries), sometimes anything (UCS-2)
        4 => prop::collection::vec(gsm, 1..800),
        1 => prop::collection::vec(any, 1..400),
    ]
    .prop_map(|v| v.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn encode_then_decode_is_the_identity(t in text(), reference in any::<u8>(), intl in any::<bool>()) {
        let number = if intl { "+628123456789" } else { "08123456789" };
        let addr = Address::parse(number).expect("number");
        match plan(&t) {
            Err(_) => {
                // Only too long (more parts than allowed) may be refused.
                prop_assert!(encode_submit(&addr, &t, reference, SubmitOptions::default()).is_err());
            }
            Ok(p) => {
                let parts = encode_submit(&addr, &t, reference, SubmitOptions::default())
                    .expect("a planned text encodes");
                prop_assert_eq!(parts.len(), p.parts.len());
                let mut joined = String::new();
                for (k, part) in parts.iter().enumerate() {
                    let d = decode_submit(&part.hex).expect("our PDU decodes");
                    prop_assert_eq!(d.number.to_string(), number);
                    if parts.len() > 1 {
                        prop_assert_eq!(
                            d.concat,
                            Some((u16::from(reference), parts.len() as u8, (k + 1) as u8))
                        );
                    }
                    // one SMS: at most 140 octets of user data after the 13 octets before it
                    prop_assert!(part.tpdu_len <= 13 + 140, "{} octets", part.tpdu_len);
                    joined.push_str(&d.text);
                }
                prop_assert_eq!(joined, t);
            }
        }
    }

    #[test]
    fn status_reports_round_trip(
        mr in any::<u8>(),
        digits in "[1-9][0-9]{6,14}",
        intl in any::<bool>(),
        // two-digit years: 1990 to 2089 (a day of margin for the offset)
        epoch in 946_800_000i64..3_786_700_000,
        quarters in -48i32..=56,
        status in any::<u8>(),
    ) {
        let recipient = if intl { format!("+{digits}") } else { digits };
        let t = SmscTime { epoch, offset_minutes: quarters * 15 };
        let r = StatusReport { mr, recipient, submitted: t, discharged: t, status };
        let hex = encode_status_report(&r).expect("encode");
        prop_assert_eq!(decode_received(&hex).expect("decode"), Received::StatusReport(r));
    }
}
