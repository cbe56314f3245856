//! What a modem receives (3GPP TS 23.040 section 9.2.2): SMS-DELIVER, an incoming SMS, and
//! SMS-STATUS-REPORT, the network's delivery report for an SMS the agent sent. Both arrive as
//! the hex of `+CMT`/`+CDS` indications or `AT+CMGL`/`AT+CMGR` answers, SMSC information first.
//!
//! - Sender: international (`+62...`), national or unknown (digits as given), or alphanumeric
//!   (`BANK`, GSM 7-bit packed in the address field).
//! - Text: GSM 7-bit with the extension table, UCS-2 (surrogate pairs joined), or 8-bit data
//!   (kept as bytes, shown as hex).
//! - Concatenation: 8-bit and 16-bit reference headers.
//! - SMSC timestamp: local time with its offset, kept as UTC seconds and the offset.
//! - Report status (TP-ST): delivered, still trying (temporary), or failed for good, with its
//!   meaning in words.

use super::{
    Address, Fields, PduError, alphabet, from_hex, gsm7, malformed, semi_octets, user_data,
};

/// The coding of a received message's user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// GSM 7-bit default alphabet (with the extension table).
    Gsm7,
    /// 8-bit data.
    Data8,
    /// UCS-2 / UTF-16BE.
    Ucs2,
}

/// An SMSC timestamp (TP-SCTS, TP-DT): when, and the offset the SMSC gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmscTime {
    /// Seconds since the epoch, UTC.
    pub epoch: i64,
    /// The SMSC's offset from UTC, in minutes (a multiple of 15).
    pub offset_minutes: i32,
}

impl SmscTime {
    /// RFC 3339 in the SMSC's own offset (`2026-12-05T17:30:00+07:00`).
    pub fn rfc3339(&self) -> String {
        let local = self.epoch + i64::from(self.offset_minutes) * 60;
        let days = local.div_euclid(86_400);
        let secs = local.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let sign = if self.offset_minutes < 0 { '-' } else { '+' };
        let off = self.offset_minutes.unsigned_abs();
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{sign}{:02}:{:02}",
            secs / 3600,
            secs % 3600 / 60,
            secs % 60,
            off / 60,
            off % 60
        )
    }
}

/// An incoming SMS (one part of it, when concatenated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    /// The sender as decoded: `+628123456789`, `08123456789`, or an alphanumeric name.
    pub sender: String,
    /// Whether the sender is an alphanumeric name (no number to reply to).
    pub alphanumeric: bool,
    /// When the SMSC received it.
    pub timestamp: SmscTime,
    /// The coding of its user data.
    pub coding: Coding,
    /// Concatenation: (reference, total, sequence).
    pub concat: Option<(u16, u8, u8)>,
    /// Whether the concatenation reference is 16-bit (two messages can share a number only
    /// within the same width).
    pub wide_reference: bool,
    /// The text of this part; for 8-bit data, its bytes as lowercase hex.
    pub text: String,
    /// The bytes of 8-bit data.
    pub data: Option<Vec<u8>>,
}

/// What a status report says about the SMS (part) it reports on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    /// Delivered to the handset (or, for 0x01/0x02, handed on/replaced: nothing more to come).
    Delivered,
    /// Not yet: the SMSC is still trying (temporary error, 0x20-0x3F). A final report follows.
    Pending,
    /// Not delivered, and the SMSC has stopped trying (0x40-0x7F, and reserved values).
    Failed,
}

/// A delivery report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    /// TP-MR: the message reference of the part it reports on (`+CMGS: <mr>`).
    pub mr: u8,
    /// The recipient as the report gives it: `+62...` or digits.
    pub recipient: String,
    /// When the SMSC received the part.
    pub submitted: SmscTime,
    /// When the status was reached (delivery, or the last attempt).
    pub discharged: SmscTime,
    /// TP-ST.
    pub status: u8,
}

impl StatusReport {
    /// Delivered, still pending, or failed for good.
    pub fn outcome(&self) -> ReportOutcome {
        match self.status {
            0x00..=0x1f => ReportOutcome::Delivered,
            0x20..=0x3f => ReportOutcome::Pending,
            _ => ReportOutcome::Failed,
        }
    }

    /// TP-ST in words (3GPP TS 23.040 section 9.2.3.15), with its code.
    pub fn meaning(&self) -> String {
        let s = self.status;
        let what = match s {
            0x00 => "received by the handset",
            0x01 => "forwarded to the handset, delivery not confirmed",
            0x02 => "replaced by the SMSC",
            0x03..=0x1f => "delivered (SMSC-specific status)",
            0x20 | 0x60 => "congestion",
            0x21 | 0x61 => "handset busy",
            0x22 | 0x62 => "no response from the handset",
            0x23 | 0x63 => "service rejected",
            0x24 | 0x44 | 0x64 => "quality of service not available",
            0x25 | 0x65 => "error in the handset",
            0x40 => "remote procedure error",
            0x41 => "incompatible destination",
            0x42 => "connection rejected by the handset",
            0x43 => "not obtainable",
            0x45 => "no interworking available",
            0x46 => "validity period expired",
            0x47 => "deleted by the sender",
            0x48 => "deleted by the SMSC's administration",
            0x49 => "the message does not exist",
            _ => "SMSC-specific or reserved status",
        };
        let phase = match self.outcome() {
            ReportOutcome::Delivered => "",
            ReportOutcome::Pending => " (temporary: the SMSC keeps trying)",
            ReportOutcome::Failed if (0x60..=0x7f).contains(&s) => {
                " (temporary error, but the SMSC has stopped trying)"
            }
            ReportOutcome::Failed => " (permanent error)",
        };
        format!("{what}{phase}, TP-ST 0x{s:02X}")
    }
}

/// A received PDU: an incoming SMS or a delivery report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// SMS-DELIVER.
    Deliver(Deliver),
    /// SMS-STATUS-REPORT.
    StatusReport(StatusReport),
}

/// Decodes the hex of a received PDU (SMSC information first, as modems show it in PDU mode).
pub fn decode_received(hex: &str) -> Result<Received, PduError> {
    let bytes = from_hex(hex)?;
    let mut f = Fields::after_smsc(&bytes)?;
    let first = f.byte()?;
    match first & 0x03 {
        0x00 => deliver(first, &mut f).map(Received::Deliver),
        0x02 => report(&mut f).map(Received::StatusReport),
        _ => Err(malformed("neither an SMS-DELIVER nor an SMS-STATUS-REPORT")),
    }
}

fn deliver(first: u8, f: &mut Fields<'_>) -> Result<Deliver, PduError> {
    let (ndigits, ton, bcd) = f.address()?;
    let (sender, alphanumeric) = address_text(ndigits, ton, bcd);
    let _pid = f.byte()?;
    let dcs = f.byte()?;
    let timestamp = smsc_time(f.take(7)?)?;
    let udl = f.byte()? as usize;
    let a = alphabet(dcs).ok_or_else(|| {
        malformed(&format!(
            "data coding 0x{dcs:02X} (compressed or reserved) is not supported"
        ))
    })?;
    let ud = user_data(first & 0x40 != 0, a, udl, f.rest())?;
    Ok(Deliver {
        sender,
        alphanumeric,
        timestamp,
        coding: match a {
            0 => Coding::Gsm7,
            2 => Coding::Ucs2,
            _ => Coding::Data8,
        },
        concat: ud.concat,
        wide_reference: ud.wide_reference,
        text: ud.text,
        data: ud.data,
    })
}

fn report(f: &mut Fields<'_>) -> Result<StatusReport, PduError> {
    let mr = f.byte()?;
    let (ndigits, ton, bcd) = f.address()?;
    let (recipient, _) = address_text(ndigits, ton, bcd);
    let submitted = smsc_time(f.take(7)?)?;
    let discharged = smsc_time(f.take(7)?)?;
    let status = f.byte()?;
    Ok(StatusReport {
        mr,
        recipient,
        submitted,
        discharged,
        status,
    })
}

/// An address field as text, and whether it is alphanumeric. The digit count of an
/// alphanumeric address counts semi-octets of GSM 7-bit packed text.
fn address_text(ndigits: usize, ton: u8, bcd: &[u8]) -> (String, bool) {
    match ton & 0x70 {
        0x50 => {
            let septets = ndigits * 4 / 7;
            let text = gsm7::decode(&gsm7::unpack(bcd, 0, septets));
            (text.trim_end_matches('@').to_owned(), true)
        }
        0x10 => (format!("+{}", semi_octets(bcd, ndigits)), false),
        _ => (semi_octets(bcd, ndigits), false),
    }
}

/// Two decimal digits in swapped semi-octets (`0x21` → 12).
fn swapped(b: u8) -> Result<i64, PduError> {
    let (lo, hi) = (b & 0x0f, b >> 4);
    if lo > 9 || hi > 9 {
        return Err(malformed("timestamp digit is not decimal"));
    }
    Ok(i64::from(lo) * 10 + i64::from(hi))
}

/// TP-SCTS / TP-DT: year, month, day, hour, minute, second, zone, each two swapped
/// semi-octets; the zone in quarter hours with its sign in bit 3.
fn smsc_time(t: &[u8]) -> Result<SmscTime, PduError> {
    // Two digits: 90-99 are 1990s (as Gammu reads them), the rest 20xx.
    let yy = swapped(t[0])?;
    let y = if yy >= 90 { 1900 + yy } else { 2000 + yy };
    let (mo, d, h, mi, s) = (
        swapped(t[1])?,
        swapped(t[2])?,
        swapped(t[3])?,
        swapped(t[4])?,
        swapped(t[5])?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return Err(malformed("timestamp out of range"));
    }
    let tz = t[6];
    let quarters = i32::from(tz & 0x07) * 10 + i32::from(tz >> 4);
    let offset_minutes = if tz & 0x08 != 0 { -quarters } else { quarters } * 15;
    let local = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s;
    Ok(SmscTime {
        epoch: local - i64::from(offset_minutes) * 60,
        offset_minutes,
    })
}

/// The hex of an SMS-STATUS-REPORT for `r` (no SMSC information), as the modem simulator
/// sends it in `+CDS`; Gammu's decoder reads it back the same (tests/pdu_gammu.rs).
pub fn encode_status_report(r: &StatusReport) -> Result<String, PduError> {
    let mut out = vec![0x00, 0x06, r.mr];
    Address::parse(&r.recipient)?.encode(&mut out);
    for t in [r.submitted, r.discharged] {
        out.extend(encode_time(t));
    }
    out.push(r.status);
    Ok(out.iter().map(|b| format!("{b:02X}")).collect())
}

/// TP-SCTS / TP-DT of `t` (its own offset).
fn encode_time(t: SmscTime) -> [u8; 7] {
    let local = t.epoch + i64::from(t.offset_minutes) * 60;
    let (y, mo, d) = civil_from_days(local.div_euclid(86_400));
    let secs = local.rem_euclid(86_400);
    let swap = |v: i64| {
        let v = v.rem_euclid(100) as u8;
        ((v % 10) << 4) | (v / 10)
    };
    let quarters = (t.offset_minutes.unsigned_abs() / 15).min(79) as u8;
    let mut tz = ((quarters % 10) << 4) | (quarters / 10);
    if t.offset_minutes < 0 {
        tz |= 0x08;
    }
    [
        swap(y),
        swap(mo),
        swap(d),
        swap(secs / 3600),
        swap(secs % 3600 / 60),
        swap(secs % 60),
        tz,
    ]
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver_of(hex: &str) -> Deliver {
        match decode_received(hex).expect("decode") {
            Received::Deliver(d) => d,
            other => panic!("not a deliver: {other:?}"),
        }
    }

    #[test]
    fn a_published_deliver_sample() {
        // The SMS-DELIVER example of the widely copied guide "SMS and the PDU format" (Lars
        // Pettersson, dreamfabric.com): from 27838890001 (type 0xC8), "hellohello", SMSC
        // timestamp 1999-03-29 15:16:59 at +02:00.
        let d =
            deliver_of("07917283010010F5040BC87238880900F10000993092516195800AE8329BFD4697D9EC37");
        assert_eq!(d.sender, "27838890001");
        assert!(!d.alphanumeric);
        assert_eq!(d.text, "hellohello");
        assert_eq!(d.coding, Coding::Gsm7);
        assert_eq!(d.timestamp.rfc3339(), "1999-03-29T15:16:59+02:00");
        assert_eq!(d.timestamp.epoch, 922_713_419);
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-1, 0, 1, 59, 365, 10_957, 20_454, 47_482] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(days_from_civil(2026, 12, 5), 20_792);
    }

    #[test]
    fn report_statuses_have_outcomes_and_words() {
        let r = |status| StatusReport {
            mr: 1,
            recipient: "+1".into(),
            submitted: SmscTime {
                epoch: 0,
                offset_minutes: 0,
            },
            discharged: SmscTime {
                epoch: 0,
                offset_minutes: 0,
            },
            status,
        };
        assert_eq!(r(0x00).outcome(), ReportOutcome::Delivered);
        assert_eq!(r(0x21).outcome(), ReportOutcome::Pending);
        assert_eq!(r(0x46).outcome(), ReportOutcome::Failed);
        assert_eq!(r(0x62).outcome(), ReportOutcome::Failed);
        assert_eq!(r(0xA0).outcome(), ReportOutcome::Failed);
        assert!(r(0x46).meaning().contains("validity period expired"));
        assert!(r(0x21).meaning().contains("keeps trying"));
        assert!(r(0x62).meaning().contains("stopped trying"));
    }

    #[test]
    fn status_reports_round_trip_through_our_encoder() {
        let r = StatusReport {
            mr: 255,
            recipient: "+628123456789".into(),
            submitted: SmscTime {
                epoch: 1_796_491_800,
                offset_minutes: 420,
            },
            discharged: SmscTime {
                epoch: 1_796_491_805,
                offset_minutes: -210,
            },
            status: 0x46,
        };
        let hex = encode_status_report(&r).expect("encode");
        assert_eq!(
            decode_received(&hex).expect("decode"),
            Received::StatusReport(r.clone())
        );
        assert_eq!(r.submitted.rfc3339(), "2026-12-06T00:30:00+07:00");
        assert_eq!(r.discharged.rfc3339(), "2026-12-05T14:00:05-03:30");
    }

    #[test]
    fn malformed_received_pdus_are_errors() {
        for hex in ["", "00", "0004", "000408", "00040B91", "0001000C91", "zz"] {
            assert!(decode_received(hex).is_err(), "{hex}");
        }
    }
}
