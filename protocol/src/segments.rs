//! How a text becomes SMS parts: the smallest encoding that holds it (GSM 7-bit with the
//! extension table, else UCS-2) and its split into parts, never between an escape and its
//! extension character nor between the halves of a surrogate pair. The agent's PDU codec
//! encodes these parts; the broker counts them to refuse a text longer than `max_parts` before
//! it is queued. One home for both, so they can never disagree.

use crate::gsm7::{self, Septets};

/// Septets in a single-part 7-bit SMS.
pub const GSM7_SINGLE: usize = 160;
/// Septets of text per part of a concatenated 7-bit SMS.
pub const GSM7_PART: usize = 153;
/// UTF-16 units in a single-part UCS-2 SMS.
pub const UCS2_SINGLE: usize = 70;
/// UTF-16 units of text per part of a concatenated UCS-2 SMS.
pub const UCS2_PART: usize = 67;
/// The concatenation header can number at most this many parts.
pub const MAX_PARTS: usize = 255;

/// The data coding of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// GSM 7-bit default alphabet (DCS 0x00).
    Gsm7,
    /// UCS-2 / UTF-16BE (DCS 0x08).
    Ucs2,
}

/// Why a text cannot be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// The text is empty.
    #[error("the message text is empty")]
    Empty,
    /// More parts than a concatenation header can number.
    #[error("the message needs {0} parts; at most {MAX_PARTS} are possible")]
    TooLong(usize),
}

/// How a text will be sent: its encoding and its parts (each a run of characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The encoding chosen.
    pub encoding: Encoding,
    /// The text of each part, in order.
    pub parts: Vec<String>,
}

/// Chooses the smallest encoding and splits `text` into parts.
pub fn plan(text: &str) -> Result<Plan, SegmentError> {
    if text.is_empty() {
        return Err(SegmentError::Empty);
    }
    let (encoding, cost, single, part): (Encoding, fn(char) -> usize, usize, usize) =
        if gsm7::is_gsm7(text) {
            (
                Encoding::Gsm7,
                |c| gsm7::septets_of(c).map_or(1, Septets::len),
                GSM7_SINGLE,
                GSM7_PART,
            )
        } else {
            (Encoding::Ucs2, char::len_utf16, UCS2_SINGLE, UCS2_PART)
        };
    let total: usize = text.chars().map(cost).sum();
    if total <= single {
        return Ok(Plan {
            encoding,
            parts: vec![text.to_owned()],
        });
    }
    // Characters are never split: an extension character (2 septets) or a surrogate pair
    // (2 units) that does not fit moves whole to the next part.
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut used = 0;
    for c in text.chars() {
        let n = cost(c);
        if used + n > part {
            parts.push(std::mem::take(&mut current));
            used = 0;
        }
        current.push(c);
        used += n;
    }
    if !current.is_empty() {
        parts.push(current);
    }
    if parts.len() > MAX_PARTS {
        return Err(SegmentError::TooLong(parts.len()));
    }
    Ok(Plan { encoding, parts })
}
