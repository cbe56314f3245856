//! The GSM 7-bit default alphabet and its extension table (3GPP TS 23.038, 6.2.1), and septet
//! packing.

/// The escape septet that introduces an extension-table character.
pub const ESC: u8 = 0x1B;

/// The default alphabet, indexed by septet. 0x1B is the escape (never a character by itself).
const BASIC: [char; 128] = [
    '@', '£', '$', '¥', 'è', 'é', 'ù', 'ì', 'ò', 'Ç', '\n', 'Ø', 'ø', '\r', 'Å', 'å', //
    'Δ', '_', 'Φ', 'Γ', 'Λ', 'Ω', 'Π', 'Ψ', 'Σ', 'Θ', 'Ξ', '\u{1b}', 'Æ', 'æ', 'ß', 'É', //
    ' ', '!', '"', '#', '¤', '%', '&', '\'', '(', ')', '*', '+', ',', '-', '.', '/', //
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', ':', ';', '<', '=', '>', '?', //
    '¡', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K', 'L', 'M', 'N', 'O', //
    'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z', 'Ä', 'Ö', 'Ñ', 'Ü', '§', //
    '¿', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o', //
    'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z', 'ä', 'ö', 'ñ', 'ü', 'à', //
];

/// The extension table: (septet after ESC, character).
const EXTENSION: [(u8, char); 10] = [
    (0x0A, '\u{0C}'),
    (0x14, '^'),
    (0x28, '{'),
    (0x29, '}'),
    (0x2F, '\\'),
    (0x3C, '['),
    (0x3D, '~'),
    (0x3E, ']'),
    (0x40, '|'),
    (0x65, '€'),
];

/// Latin-1 characters (most texts) to their septets without a search: `0x100 | septet` for
/// the default alphabet, `0x200 | code` for the extension table, 0 for none.
const LATIN1: [u16; 256] = latin1_table();

const fn latin1_table() -> [u16; 256] {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < BASIC.len() {
        let c = BASIC[i] as u32;
        if c < 256 && i != ESC as usize {
            t[c as usize] = 0x100 | i as u16;
        }
        i += 1;
    }
    let mut j = 0;
    while j < EXTENSION.len() {
        let (code, c) = EXTENSION[j];
        if (c as u32) < 256 {
            t[c as usize] = 0x200 | code as u16;
        }
        j += 1;
    }
    t
}

/// The septets of `c`: one for the default alphabet, two (ESC, code) for the extension table,
/// `None` when `c` cannot be written in GSM 7-bit.
pub fn septets_of(c: char) -> Option<Septets> {
    if let Some(&v) = LATIN1.get(c as usize) {
        return match v >> 8 {
            1 => Some(Septets::One(v as u8)),
            2 => Some(Septets::Two(v as u8)),
            _ => None,
        };
    }
    // Greek capitals and the euro sign.
    if let Some(i) = BASIC.iter().position(|b| *b == c) {
        return Some(Septets::One(i as u8));
    }
    EXTENSION
        .iter()
        .find(|(_, e)| *e == c)
        .map(|(code, _)| Septets::Two(*code))
}

/// One character as septets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Septets {
    /// A default-alphabet character.
    One(u8),
    /// ESC followed by this extension code.
    Two(u8),
}

impl Septets {
    /// 1 or 2.
    pub fn len(self) -> usize {
        match self {
            Septets::One(_) => 1,
            Septets::Two(_) => 2,
        }
    }

    /// Whether this is an empty encoding (never).
    pub fn is_empty(self) -> bool {
        false
    }

    /// Appends the septets to `out`.
    pub fn push_to(self, out: &mut Vec<u8>) {
        match self {
            Septets::One(s) => out.push(s),
            Septets::Two(s) => {
                out.push(ESC);
                out.push(s);
            }
        }
    }
}

/// Whether every character of `text` exists in GSM 7-bit (default or extension table).
pub fn is_gsm7(text: &str) -> bool {
    text.chars().all(|c| septets_of(c).is_some())
}

/// Decodes septets to text. An ESC followed by an unknown code decodes as the default-alphabet
/// character of that code (as 23.038 asks receivers to do); a trailing ESC is dropped.
pub fn decode(septets: &[u8]) -> String {
    let mut out = String::with_capacity(septets.len());
    let mut i = 0;
    while i < septets.len() {
        let s = septets[i] & 0x7f;
        if s == ESC {
            if let Some(&next) = septets.get(i + 1) {
                let next = next & 0x7f;
                match EXTENSION.iter().find(|(code, _)| *code == next) {
                    Some((_, c)) => out.push(*c),
                    None => out.push(BASIC[next as usize]),
                }
            }
            i += 2;
        } else {
            out.push(BASIC[s as usize]);
            i += 1;
        }
    }
    out
}

/// Packs septets into octets, least significant bits first, after `fill_bits` zero bits
/// (used to align text after a user data header).
pub fn pack(septets: &[u8], fill_bits: usize) -> Vec<u8> {
    let total_bits = fill_bits + septets.len() * 7;
    let mut out = vec![0u8; total_bits.div_ceil(8)];
    let mut bit = fill_bits;
    for &s in septets {
        let s = u16::from(s & 0x7f);
        let byte = bit / 8;
        let shift = bit % 8;
        let v = s << shift;
        out[byte] |= (v & 0xff) as u8;
        if shift > 1 {
            out[byte + 1] |= (v >> 8) as u8;
        }
        bit += 7;
    }
    out
}

/// Unpacks `count` septets from `octets`, skipping `fill_bits` first. Missing bits read as 0.
pub fn unpack(octets: &[u8], fill_bits: usize, count: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(count);
    let mut bit = fill_bits;
    for _ in 0..count {
        let byte = bit / 8;
        let shift = bit % 8;
        let lo = u16::from(*octets.get(byte).unwrap_or(&0));
        let hi = u16::from(*octets.get(byte + 1).unwrap_or(&0));
        let v = ((hi << 8) | lo) >> shift;
        out.push((v & 0x7f) as u8);
        bit += 7;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_round_trips() {
        for (i, c) in BASIC.iter().enumerate() {
            if i == ESC as usize {
                continue;
            }
            assert_eq!(septets_of(*c), Some(Septets::One(i as u8)), "{c:?}");
        }
        for c in "€[]{}^~\\|\u{0C}".chars() {
            assert!(matches!(septets_of(c), Some(Septets::Two(_))), "{c:?}");
        }
        for c in ['`', 'ç', 'â', 'ع', '😀', '\u{1b}', '\t'] {
            assert_eq!(septets_of(c), None, "{c:?}");
        }
    }

    #[test]
    fn the_latin1_table_agrees_with_the_tables_for_every_character() {
        for u in 0..=0x10FFFFu32 {
            let Some(c) = char::from_u32(u) else { continue };
            let searched = if c == '\u{1b}' {
                None
            } else if let Some(i) = BASIC.iter().position(|b| *b == c) {
                Some(Septets::One(i as u8))
            } else {
                EXTENSION
                    .iter()
                    .find(|(_, e)| *e == c)
                    .map(|(code, _)| Septets::Two(*code))
            };
            assert_eq!(septets_of(c), searched, "{c:?}");
        }
    }

    #[test]
    fn packing_matches_the_classic_example() {
        // "hellohello" packs to E8329BFD4697D9EC37 (3GPP example)
        let s: Vec<u8> = "hellohello"
            .chars()
            .map(|c| match septets_of(c) {
                Some(Septets::One(x)) => x,
                _ => panic!(),
            })
            .collect();
        let packed = pack(&s, 0);
        let hex: String = packed.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(hex, "E8329BFD4697D9EC37");
        assert_eq!(unpack(&packed, 0, s.len()), s);
        for fill in 0..7 {
            assert_eq!(unpack(&pack(&s, fill), fill, s.len()), s);
        }
    }

    #[test]
    fn decode_handles_escapes() {
        assert_eq!(decode(&[0x1B, 0x65, 0x41, 0x1B, 0x3C, 0x1B]), "€A[");
    }
}
