//! What makes a job sendable: a usable number (normalised), a non-empty text that fits in
//! `max_parts` SMS, not blocked, not expired, and a `sim` (when it names one) that is one of
//! the agent's modems. A job that fails here gets a `failed` status with a
//! reason and never reaches a modem, so it cannot block the others.

use crate::config::{AgentConfig, ModemConfig};
use crate::pdu;

/// A job ready to be queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidJob {
    /// The application's id.
    pub id: String,
    /// Normalised number: `+` and digits, or national digits.
    pub receiver: String,
    /// The text.
    pub message: String,
    /// SMS parts it needs.
    pub parts: u32,
    /// Epoch seconds after which it must not be sent.
    pub expires_at: Option<u64>,
    /// Queue priority; [`wsmb_protocol::sms::PRIORITY_LANE`] and above go first.
    pub priority: i32,
    /// The job's own choice about a delivery report (`None`: `agent.status_report`).
    pub status_report: Option<bool>,
    /// The modem it must go through (the job's `sim`); `None`: the routes pick one.
    pub modem: Option<String>,
}

/// Why a job is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Short code for `error_code`.
    pub code: &'static str,
    /// In words.
    pub reason: String,
}

fn refuse(code: &'static str, reason: String) -> Refusal {
    Refusal { code, reason }
}

/// Normalises a phone number: separators removed, `00` read as `+`, national numbers written
/// internationally when a country code is configured.
pub fn normalize_number(raw: &str, cfg: &AgentConfig) -> Result<String, Refusal> {
    let cleaned: String = raw
        .trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')' | '.' | '/' | '\u{a0}'))
        .collect();
    let bad = || {
        refuse(
            "invalid_receiver",
            format!(
                "{raw:?} is not a phone number: use + and the country code (+628123456789) or a \
                 national number (08123456789)"
            ),
        )
    };
    let (international, digits) = if let Some(rest) = cleaned.strip_prefix('+') {
        (true, rest.to_owned())
    } else if let Some(rest) = cleaned.strip_prefix("00") {
        (true, rest.to_owned())
    } else {
        (false, cleaned.clone())
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if international {
        if !(7..=15).contains(&digits.len()) {
            return Err(bad());
        }
        return Ok(format!("+{digits}"));
    }
    let cc = cfg.country_code.as_str();
    if !cc.is_empty() {
        let np = cfg.national_prefix.as_str();
        if !np.is_empty() && digits.starts_with(np) && digits.len() > np.len() + 4 {
            let full = format!("{cc}{}", &digits[np.len()..]);
            if full.len() <= 15 {
                return Ok(format!("+{full}"));
            }
            return Err(bad());
        }
        if digits.starts_with(cc) && digits.len() >= cc.len() + 7 && digits.len() <= 15 {
            return Ok(format!("+{digits}"));
        }
    }
    // national or short code, sent as is
    if !(3..=20).contains(&digits.len()) {
        return Err(bad());
    }
    Ok(digits)
}

/// Validates a job read from the wire.
pub fn validate(
    id: &str,
    receiver: Option<&str>,
    message: Option<&str>,
    expires_at: Option<u64>,
    now_secs: u64,
    cfg: &AgentConfig,
) -> Result<ValidJob, Refusal> {
    let Some(receiver) = receiver else {
        return Err(refuse(
            "invalid_receiver",
            "the job has no \"receiver\"".into(),
        ));
    };
    let receiver = normalize_number(receiver, cfg)?;
    let blocked = cfg
        .block_list
        .iter()
        .any(|b| normalize_number(b, cfg).is_ok_and(|n| n == receiver));
    if blocked {
        return Err(refuse(
            "blocked",
            format!("{receiver} is on the block list"),
        ));
    }
    let message = message.unwrap_or("");
    if message.trim().is_empty() {
        return Err(refuse(
            "empty_message",
            "the job has no text (\"message\" is empty)".into(),
        ));
    }
    let plan = pdu::plan(message).map_err(|e| refuse("too_long", e.to_string()))?;
    let parts = plan.parts.len() as u32;
    if parts > cfg.max_parts {
        return Err(refuse(
            "too_long",
            format!(
                "the text needs {parts} SMS parts; at most {} are allowed (agent.max_parts)",
                cfg.max_parts
            ),
        ));
    }
    if let Some(exp) = expires_at {
        if exp <= now_secs {
            return Err(refuse(
                "expired",
                format!("the job expired at {exp} (epoch seconds)"),
            ));
        }
    }
    Ok(ValidJob {
        id: id.to_owned(),
        receiver,
        message: message.to_owned(),
        parts,
        expires_at,
        priority: 0,
        status_report: None,
        modem: None,
    })
}

/// The modem a job's `sim` names: the `sim`-th `[[modem]]` section (1-based), as SMS Gateway
/// for Android's `simNumber` picks a phone's SIM.
pub fn modem_for_sim(sim: Option<u8>, modems: &[ModemConfig]) -> Result<Option<String>, Refusal> {
    let Some(n) = sim else {
        return Ok(None);
    };
    match modems.get(usize::from(n).wrapping_sub(1)) {
        Some(m) => Ok(Some(m.name.clone())),
        None => {
            let names: Vec<&str> = modems.iter().map(|m| m.name.as_str()).collect();
            let range = match names.len() {
                1 => "use 1".to_owned(),
                k => format!("use 1 to {k}"),
            };
            Err(refuse(
                "no_such_sim",
                format!(
                    "sim {n}: this gateway has {} modem(s) ({}); {range} or leave sim out to let \
                     the gateway pick",
                    names.len(),
                    names.join(", ")
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cc: &str) -> AgentConfig {
        AgentConfig {
            country_code: cc.into(),
            ..AgentConfig::default()
        }
    }

    #[test]
    fn numbers_are_normalised() {
        let id = cfg("62");
        assert_eq!(
            normalize_number("08126666666", &id).as_deref(),
            Ok("+628126666666")
        );
        assert_eq!(
            normalize_number("0812-6666-666", &id).as_deref(),
            Ok("+628126666666")
        );
        assert_eq!(
            normalize_number("+62 812 6666 666", &id).as_deref(),
            Ok("+628126666666")
        );
        assert_eq!(
            normalize_number("628126666666", &id).as_deref(),
            Ok("+628126666666")
        );
        assert_eq!(
            normalize_number("0062812666666", &id).as_deref(),
            Ok("+62812666666")
        );
        assert_eq!(normalize_number("3636", &id).as_deref(), Ok("3636"));
        let none = cfg("");
        assert_eq!(
            normalize_number("08126666666", &none).as_deref(),
            Ok("08126666666")
        );
        assert_eq!(
            normalize_number("+49 (151) 1234567", &none).as_deref(),
            Ok("+491511234567")
        );
        for bad in [
            "",
            "+",
            "abc",
            "+62x812",
            "12",
            "+123",
            "0812345678901234567890123",
            "+1234567890123456",
        ] {
            let e = normalize_number(bad, &id).expect_err(bad);
            assert_eq!(e.code, "invalid_receiver");
        }
    }

    #[test]
    fn jobs_are_validated() {
        let mut c = cfg("62");
        c.block_list = vec!["0811111111".into()];
        c.max_parts = 2;
        let ok = validate("1", Some("0812345678"), Some("hi"), None, 100, &c).expect("ok");
        assert_eq!((ok.receiver.as_str(), ok.parts), ("+62812345678", 1));
        let r = |rec: Option<&str>, msg: Option<&str>, exp: Option<u64>| {
            validate("1", rec, msg, exp, 100, &c)
                .expect_err("refused")
                .code
        };
        assert_eq!(r(None, Some("x"), None), "invalid_receiver");
        assert_eq!(r(Some("+62811111111"), Some("x"), None), "blocked");
        assert_eq!(r(Some("0812345678"), Some("  "), None), "empty_message");
        assert_eq!(r(Some("0812345678"), None, None), "empty_message");
        assert_eq!(
            r(Some("0812345678"), Some(&"x".repeat(307)), None),
            "too_long"
        );
        assert_eq!(r(Some("0812345678"), Some("x"), Some(100)), "expired");
        assert!(
            validate(
                "1",
                Some("0812345678"),
                Some(&"x".repeat(306)),
                Some(101),
                100,
                &c
            )
            .is_ok()
        );
    }
}
