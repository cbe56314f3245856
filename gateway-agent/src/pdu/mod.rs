//! The SMS PDU codec: text to SMS-SUBMIT TPDUs (3GPP TS 23.040 / 23.038), and back.
//!
//! Written in-house because no maintained crate gets splitting right:
//! - the smallest encoding is chosen: GSM 7-bit (default alphabet + extension table) when every
//!   character fits, else UCS-2 (UTF-16BE, so characters outside the BMP, emoji, are surrogate
//!   pairs);
//! - a message longer than one SMS (160 septets / 70 UCS-2 units) is split into parts of 153
//!   septets / 67 units with a concatenation header `05 00 03 <ref> <total> <seq>`;
//! - a part never ends between ESC and its extension character, nor between the two halves of
//!   a surrogate pair;
//! - with 7-bit data, the text after the header starts on a septet boundary (fill bits).
//!
//! [`decode_submit`] reads a TPDU back; the modem simulator uses it, and the tests compare both
//! directions with Gammu's independent implementation. What a modem receives (incoming SMS,
//! delivery reports) is decoded in [`received`]; the field readers and the user data decoding
//! (headers, GSM 7-bit, UCS-2, 8-bit) are shared by both directions.

pub mod received;

pub use received::{
    Coding, Deliver, Received, ReportOutcome, SmscTime, StatusReport, decode_received,
    encode_status_report,
};
pub use wsmb_protocol::gsm7;
pub use wsmb_protocol::segments::{
    Encoding, GSM7_PART, GSM7_SINGLE, MAX_PARTS, Plan, UCS2_PART, UCS2_SINGLE,
};

use std::time::Duration;

use wsmb_protocol::segments::SegmentError;

/// A destination number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Digits only.
    pub digits: String,
    /// International (`+`, type 0x91) or unknown/national (type 0x81).
    pub international: bool,
}

impl Address {
    /// Parses `+62812...` (international) or `0812...` (national/unknown). Digits only, 1 to 20
    /// of them.
    pub fn parse(number: &str) -> Result<Address, PduError> {
        let (international, digits) = match number.strip_prefix('+') {
            Some(rest) => (true, rest),
            None => (false, number),
        };
        if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PduError::BadNumber(number.to_owned()));
        }
        Ok(Address {
            digits: digits.to_owned(),
            international,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.digits.len() as u8);
        out.push(if self.international { 0x91 } else { 0x81 });
        let d = self.digits.as_bytes();
        for pair in d.chunks(2) {
            let lo = pair[0] - b'0';
            let hi = pair.get(1).map_or(0x0f, |b| b - b'0');
            out.push((hi << 4) | lo);
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.international {
            write!(f, "+{}", self.digits)
        } else {
            f.write_str(&self.digits)
        }
    }
}

/// Why a message cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// The number is not `+` and digits, or digits.
    #[error("{0:?} is not a phone number (expected + and digits, or digits)")]
    BadNumber(String),
    /// The text is empty, or needs more parts than a concatenation header can number.
    #[error(transparent)]
    Segments(#[from] SegmentError),
    /// A TPDU that cannot be decoded.
    #[error("malformed PDU: {0}")]
    Malformed(String),
}

/// Chooses the smallest encoding and splits `text` into parts.
pub fn plan(text: &str) -> Result<Plan, PduError> {
    Ok(wsmb_protocol::segments::plan(text)?)
}

/// Options of SMS-SUBMIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubmitOptions {
    /// Ask the network for a delivery report (TP-SRR).
    pub status_report: bool,
    /// Relative validity period; `None` leaves it to the SMSC.
    pub validity: Option<Duration>,
}

/// One part ready for `AT+CMGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPart {
    /// The hex string to send after the prompt, starting with `00` (use the SIM's SMSC).
    pub hex: String,
    /// The `AT+CMGS=` length: TPDU octets, SMSC part excluded.
    pub tpdu_len: usize,
}

/// Encodes `text` to `number` as SMS-SUBMIT TPDUs. `reference` numbers the concatenated parts
/// (the same for all parts of one message; callers rotate it between messages).
pub fn encode_submit(
    number: &Address,
    text: &str,
    reference: u8,
    opts: SubmitOptions,
) -> Result<Vec<EncodedPart>, PduError> {
    let plan = plan(text)?;
    let total = plan.parts.len();
    let concat = total > 1;
    plan.parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let udh = concat.then(|| [0x05u8, 0x00, 0x03, reference, total as u8, (i + 1) as u8]);
            Ok(encode_one(
                number,
                part,
                plan.encoding,
                udh.as_ref().map(|u| &u[..]),
                opts,
            ))
        })
        .collect()
}

/// The relative validity-period octet for `d` (23.040 9.2.3.12.1), rounded up, capped at 63
/// weeks.
pub fn relative_validity(d: Duration) -> u8 {
    let mins = d.as_secs().div_ceil(60);
    if mins <= 12 * 60 {
        (mins.div_ceil(5).max(1) - 1) as u8
    } else if mins <= 24 * 60 {
        (143 + (mins - 12 * 60).div_ceil(30)) as u8
    } else if mins <= 30 * 24 * 60 {
        (166 + mins.div_ceil(24 * 60)).min(196) as u8
    } else {
        (192 + mins.div_ceil(7 * 24 * 60)).min(255) as u8
    }
}

fn encode_one(
    number: &Address,
    text: &str,
    encoding: Encoding,
    udh: Option<&[u8]>,
    opts: SubmitOptions,
) -> EncodedPart {
    let mut t = Vec::with_capacity(176);
    let mut first = 0x01u8; // SMS-SUBMIT
    if opts.validity.is_some() {
        first |= 0x10; // TP-VPF relative
    }
    if opts.status_report {
        first |= 0x20; // TP-SRR
    }
    if udh.is_some() {
        first |= 0x40; // TP-UDHI
    }
    t.push(first);
    t.push(0x00); // TP-MR: set by the modem
    number.encode(&mut t);
    t.push(0x00); // TP-PID
    t.push(match encoding {
        Encoding::Gsm7 => 0x00,
        Encoding::Ucs2 => 0x08,
    });
    if let Some(v) = opts.validity {
        t.push(relative_validity(v));
    }
    let udh_len = udh.map_or(0, <[u8]>::len);
    match encoding {
        Encoding::Gsm7 => {
            let mut septets = Vec::with_capacity(160);
            for c in text.chars() {
                if let Some(s) = gsm7::septets_of(c) {
                    s.push_to(&mut septets);
                }
            }
            // The header occupies whole septets; fill bits pad it to the next boundary.
            let header_septets = (udh_len * 8).div_ceil(7);
            let fill = header_septets * 7 - udh_len * 8;
            t.push((header_septets + septets.len()) as u8);
            if let Some(u) = udh {
                t.extend_from_slice(u);
            }
            t.extend_from_slice(&gsm7::pack(&septets, fill));
        }
        Encoding::Ucs2 => {
            let units: Vec<u16> = text.encode_utf16().collect();
            t.push((udh_len + units.len() * 2) as u8);
            if let Some(u) = udh {
                t.extend_from_slice(u);
            }
            for u in units {
                t.extend_from_slice(&u.to_be_bytes());
            }
        }
    }
    let mut hex = String::with_capacity(2 + t.len() * 2);
    hex.push_str("00");
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in &t {
        hex.push(char::from(HEX[usize::from(b >> 4)]));
        hex.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    EncodedPart {
        hex,
        tpdu_len: t.len(),
    }
}

/// A decoded SMS-SUBMIT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submit {
    /// The destination.
    pub number: Address,
    /// The data coding.
    pub encoding: Encoding,
    /// Concatenation: (reference, total, sequence), from an 8-bit or 16-bit reference header.
    pub concat: Option<(u16, u8, u8)>,
    /// TP-SRR.
    pub status_report: bool,
    /// The text of this part.
    pub text: String,
}

/// Parses hex (with or without spaces) into bytes.
pub fn from_hex(hex: &str) -> Result<Vec<u8>, PduError> {
    let clean: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if clean.len() % 2 != 0 {
        return Err(PduError::Malformed("odd number of hex digits".into()));
    }
    clean
        .chunks(2)
        .map(|p| {
            std::str::from_utf8(p)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 16).ok())
                .ok_or_else(|| PduError::Malformed("not hexadecimal".into()))
        })
        .collect()
}

/// Reads the fields of a TPDU in order; every read checks the length.
pub(crate) struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

fn malformed(what: &str) -> PduError {
    PduError::Malformed(what.to_owned())
}

impl<'a> Fields<'a> {
    /// The TPDU of a PDU as modems show it: SMSC information (its length first), then the TPDU.
    pub(crate) fn after_smsc(bytes: &'a [u8]) -> Result<Fields<'a>, PduError> {
        let smsc_len = *bytes.first().ok_or_else(|| malformed("empty"))? as usize;
        let tpdu = bytes
            .get(1 + smsc_len..)
            .ok_or_else(|| malformed("short SMSC field"))?;
        Ok(Fields { bytes: tpdu, at: 0 })
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], PduError> {
        let s = self
            .bytes
            .get(self.at..self.at + n)
            .ok_or_else(|| malformed("truncated"))?;
        self.at += n;
        Ok(s)
    }

    pub(crate) fn byte(&mut self) -> Result<u8, PduError> {
        Ok(self.take(1)?[0])
    }

    /// What is left (the user data).
    pub(crate) fn rest(&self) -> &'a [u8] {
        &self.bytes[self.at.min(self.bytes.len())..]
    }

    /// An address field (TP-DA, TP-OA, TP-RA): digit count, type, semi-octets. Returns the
    /// type of number and the raw semi-octet bytes.
    pub(crate) fn address(&mut self) -> Result<(usize, u8, &'a [u8]), PduError> {
        let ndigits = self.byte()? as usize;
        let ton = self.byte()?;
        let bcd = self.take(ndigits.div_ceil(2))?;
        Ok((ndigits, ton, bcd))
    }
}

/// The digits of semi-octets (`0x21 0xF3` → "123"), at most `n`; filler and non-digits left
/// out.
pub(crate) fn semi_octets(bcd: &[u8], n: usize) -> String {
    let mut digits = String::with_capacity(n);
    for b in bcd {
        for nib in [b & 0x0f, b >> 4] {
            if digits.len() < n && nib <= 9 {
                digits.push((b'0' + nib) as char);
            }
        }
    }
    digits
}

/// The user data of a TPDU: its header's concatenation information and its payload decoded.
pub(crate) struct UserData {
    /// Concatenation: (reference, total, sequence), from an 8-bit or 16-bit reference header.
    pub concat: Option<(u16, u8, u8)>,
    /// Whether the reference was 16-bit.
    pub wide_reference: bool,
    /// The text (GSM 7-bit, UCS-2), or for 8-bit data its bytes as lowercase hex.
    pub text: String,
    /// The payload's bytes when the coding is 8-bit data.
    pub data: Option<Vec<u8>>,
}

/// The character set of a TP-DCS: Some(0) GSM 7-bit, Some(1) 8-bit data, Some(2) UCS-2 (from
/// the general data coding and the message-class groups, 3GPP TS 23.038 section 4), None for
/// what is reserved or compressed.
pub(crate) fn alphabet(dcs: u8) -> Option<u8> {
    match dcs >> 4 {
        // general data coding, uncompressed; and the "marked for automatic deletion" group
        0b0000 | 0b0001 | 0b0100 | 0b0101 => match (dcs >> 2) & 0x03 {
            3 => None,
            a => Some(a),
        },
        0b0010 | 0b0011 | 0b0110 | 0b0111 => None, // compressed
        // message waiting indication groups: 7-bit (discard/store) or UCS-2
        0b1100 | 0b1101 => Some(0),
        0b1110 => Some(2),
        // data coding / message class
        0b1111 => Some(if dcs & 0x04 != 0 { 1 } else { 0 }),
        _ => None,
    }
}

/// Decodes user data `ud` of `udl` (septets for 7-bit, octets otherwise) in `alphabet`.
pub(crate) fn user_data(
    has_header: bool,
    alphabet: u8,
    udl: usize,
    ud: &[u8],
) -> Result<UserData, PduError> {
    let (udh_len, concat, wide_reference) = if has_header {
        let udhl = *ud.first().ok_or_else(|| malformed("missing UDH"))? as usize;
        let udh = ud
            .get(1..1 + udhl)
            .ok_or_else(|| malformed("truncated UDH"))?;
        let mut concat = None;
        let mut wide = false;
        let mut j = 0;
        while j + 2 <= udh.len() {
            let (iei, len) = (udh[j], udh[j + 1] as usize);
            let data = udh
                .get(j + 2..j + 2 + len)
                .ok_or_else(|| malformed("truncated IE"))?;
            match (iei, len) {
                (0x00, 3) => concat = Some((u16::from(data[0]), data[1], data[2])),
                (0x08, 4) => {
                    concat = Some((u16::from_be_bytes([data[0], data[1]]), data[2], data[3]));
                    wide = true;
                }
                _ => {}
            }
            j += 2 + len;
        }
        (1 + udhl, concat, wide)
    } else {
        (0, None, false)
    };
    let (text, data) = match alphabet {
        0 => {
            let header_septets = (udh_len * 8).div_ceil(7);
            let fill = header_septets * 7 - udh_len * 8;
            let count = udl
                .checked_sub(header_septets)
                .ok_or_else(|| malformed("UDL too short"))?;
            let packed = ud.get(udh_len..).ok_or_else(|| malformed("truncated UD"))?;
            if packed.len() * 8 < fill + count * 7 {
                return Err(malformed("user data shorter than its length"));
            }
            (gsm7::decode(&gsm7::unpack(packed, fill, count)), None)
        }
        2 => {
            let data = ud
                .get(udh_len..udl.max(udh_len))
                .ok_or_else(|| malformed("truncated UD"))?;
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]))
                .collect();
            (String::from_utf16_lossy(&units), None)
        }
        _ => {
            let data = ud
                .get(udh_len..udl.max(udh_len))
                .ok_or_else(|| malformed("truncated UD"))?;
            let hex = data.iter().map(|b| format!("{b:02x}")).collect();
            (hex, Some(data.to_vec()))
        }
    };
    Ok(UserData {
        concat,
        wide_reference,
        text,
        data,
    })
}

/// Decodes the hex sent after an `AT+CMGS` prompt: SMSC information then an SMS-SUBMIT TPDU.
pub fn decode_submit(hex: &str) -> Result<Submit, PduError> {
    let bytes = from_hex(hex)?;
    let mut f = Fields::after_smsc(&bytes)?;
    let first = f.byte()?;
    if first & 0x03 != 0x01 {
        return Err(malformed("not an SMS-SUBMIT"));
    }
    let _mr = f.byte()?;
    let (ndigits, ton, bcd) = f.address()?;
    let _pid = f.byte()?;
    let dcs = f.byte()?;
    match (first >> 3) & 0x03 {
        0 => {}
        2 => {
            f.take(1)?;
        }
        _ => {
            f.take(7)?;
        }
    }
    let udl = f.byte()? as usize;
    let encoding = match dcs & 0x0c {
        0x00 => Encoding::Gsm7,
        0x08 => Encoding::Ucs2,
        _ => return Err(malformed("unsupported data coding")),
    };
    let alphabet = if encoding == Encoding::Gsm7 { 0 } else { 2 };
    let ud = user_data(first & 0x40 != 0, alphabet, udl, f.rest())?;
    Ok(Submit {
        number: Address {
            digits: semi_octets(bcd, ndigits),
            international: ton & 0x70 == 0x10,
        },
        encoding,
        concat: ud.concat,
        status_report: first & 0x20 != 0,
        text: ud.text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsmb_protocol::gsm7::Septets;

    fn intl() -> Address {
        Address::parse("+628123456789").expect("number")
    }

    fn round_trip(text: &str) -> Vec<Submit> {
        let parts = encode_submit(&intl(), text, 0x42, SubmitOptions::default()).expect("encode");
        let decoded: Vec<Submit> = parts
            .iter()
            .map(|p| {
                assert_eq!(p.hex.len(), 2 + p.tpdu_len * 2);
                // user data never exceeds 140 octets: the TPDU minus the 13 octets before the UD
                // (first, MR, DA of 12 digits = 8, PID, DCS, UDL)
                assert!(
                    p.tpdu_len - 13 <= 140,
                    "{} octets of user data",
                    p.tpdu_len - 13
                );
                decode_submit(&p.hex).expect("decode")
            })
            .collect();
        let joined: String = decoded.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(joined, text);
        decoded
    }

    #[test]
    fn single_part_pdu_matches_a_known_encoding() {
        // "hellohello" to +628123456789, default SMSC, GSM 7-bit
        let p = encode_submit(&intl(), "hellohello", 0, SubmitOptions::default()).expect("encode");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].hex, "0001000C9126183254769800000AE8329BFD4697D9EC37");
        assert_eq!(p[0].tpdu_len, 22);
    }

    #[test]
    fn national_numbers_use_type_81_and_f_filler() {
        let a = Address::parse("08126666666").expect("number");
        let p = encode_submit(&a, "x", 0, SubmitOptions::default()).expect("encode");
        assert!(
            p[0].hex.starts_with("0001000B818021666666F6"),
            "{}",
            p[0].hex
        );
        let d = decode_submit(&p[0].hex).expect("decode");
        assert_eq!(d.number, a);
        assert!(Address::parse("+62 812").is_err());
        assert!(Address::parse("+").is_err());
        assert!(Address::parse("").is_err());
        assert!(Address::parse("12a").is_err());
    }

    #[test]
    fn boundaries_of_7bit_messages() {
        for (len, parts) in [
            (1, 1),
            (160, 1),
            (161, 2),
            (306, 2),
            (307, 3),
            (459, 3),
            (460, 4),
            (1530, 10),
            (1531, 11),
        ] {
            let text = "a".repeat(len);
            let d = round_trip(&text);
            assert_eq!(d.len(), parts, "{len} septets");
            assert!(d.iter().all(|p| p.encoding == Encoding::Gsm7));
            if parts > 1 {
                for (i, p) in d.iter().enumerate() {
                    assert_eq!(p.concat, Some((0x42, parts as u8, (i + 1) as u8)));
                }
            }
        }
    }

    #[test]
    fn boundaries_of_ucs2_messages() {
        for (len, parts) in [
            (1, 1),
            (70, 1),
            (71, 2),
            (134, 2),
            (135, 3),
            (670, 10),
            (671, 11),
        ] {
            let text = "ع".repeat(len);
            let d = round_trip(&text);
            assert_eq!(d.len(), parts, "{len} units");
            assert!(d.iter().all(|p| p.encoding == Encoding::Ucs2));
        }
    }

    #[test]
    fn escapes_are_never_split() {
        // 152 plain septets then '€' (2 septets): it cannot fit in part 1 (153) and moves whole.
        for lead in 150..156 {
            let text = format!("{}€{}", "a".repeat(lead), "b".repeat(100));
            let plan = plan(&text).expect("plan");
            assert_eq!(plan.encoding, Encoding::Gsm7);
            for part in &plan.parts {
                let septets: usize = part
                    .chars()
                    .map(|c| gsm7::septets_of(c).map_or(0, Septets::len))
                    .sum();
                assert!(septets <= GSM7_PART, "{lead}: part of {septets} septets");
            }
            round_trip(&text);
        }
        // exactly 160 septets with escapes still fits one part
        let text = format!("{}{}", "€".repeat(10), "a".repeat(140));
        assert_eq!(round_trip(&text).len(), 1);
        let text = format!("{}{}", "€".repeat(10), "a".repeat(141));
        assert_eq!(round_trip(&text).len(), 2);
    }

    #[test]
    fn surrogate_pairs_are_never_split() {
        for lead in 64..69 {
            let text = format!("{}😀{}", "é".repeat(lead), "ع".repeat(30));
            // 'é' is GSM, but 'ع' and '😀' force UCS-2
            let plan = plan(&text).expect("plan");
            assert_eq!(plan.encoding, Encoding::Ucs2);
            for part in &plan.parts {
                assert!(part.encode_utf16().count() <= UCS2_PART);
            }
            round_trip(&text);
        }
        let emoji = "😀".repeat(35); // 70 units: one part
        assert_eq!(round_trip(&emoji).len(), 1);
        let emoji = "😀".repeat(36); // 72 units: two parts of 66 + 6
        assert_eq!(round_trip(&emoji).len(), 2);
    }

    #[test]
    fn encoding_is_the_smallest_that_fits() {
        assert_eq!(
            plan("Kode OTP Anda 123456").expect("p").encoding,
            Encoding::Gsm7
        );
        assert_eq!(plan("€[]{}^~\\|").expect("p").encoding, Encoding::Gsm7);
        assert_eq!(plan("àéèùìòÇÑÜß").expect("p").encoding, Encoding::Gsm7);
        assert_eq!(plan("ç").expect("p").encoding, Encoding::Ucs2);
        assert_eq!(plan("مرحبا").expect("p").encoding, Encoding::Ucs2);
        assert_eq!(
            plan("").err(),
            Some(PduError::Segments(SegmentError::Empty))
        );
    }

    #[test]
    fn options_set_the_header_bits() {
        let opts = SubmitOptions {
            status_report: true,
            validity: Some(Duration::from_secs(24 * 3600)),
        };
        let p = encode_submit(&intl(), "x", 0, opts).expect("encode");
        assert!(p[0].hex.starts_with("0031"), "{}", p[0].hex);
        let d = decode_submit(&p[0].hex).expect("decode");
        assert!(d.status_report);
        assert_eq!(d.text, "x");
        assert_eq!(relative_validity(Duration::from_secs(300)), 0);
        assert_eq!(relative_validity(Duration::from_secs(12 * 3600)), 143);
        assert_eq!(relative_validity(Duration::from_secs(24 * 3600)), 167);
        assert_eq!(relative_validity(Duration::from_secs(2 * 24 * 3600)), 168);
        assert_eq!(
            relative_validity(Duration::from_secs(7 * 24 * 3600 * 100)),
            255
        );
    }

    #[test]
    fn malformed_pdus_are_errors_not_panics() {
        for bad in [
            "",
            "0",
            "00",
            "0001",
            "zz",
            "0001000C91",
            "00010003",
            "000100FF91",
        ] {
            assert!(decode_submit(bad).is_err(), "{bad}");
        }
        // every truncation of a valid PDU
        let p = encode_submit(&intl(), &"x€".repeat(100), 1, SubmitOptions::default()).expect("e");
        for part in p {
            for n in (0..part.hex.len()).step_by(2) {
                let _ = decode_submit(&part.hex[..n]);
            }
        }
    }
}
