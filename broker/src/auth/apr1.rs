//! Apache's `$apr1$` password hash (MD5-crypt with the `$apr1$` magic), written in-house because
//! no maintained crate offers it. Only verification and hashing with a given salt are needed.

use md5::{Digest, Md5};

const ITOA64: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const MAGIC: &[u8] = b"$apr1$";

/// Returns the 22-character hash part of `$apr1$<salt>$<hash>` for `password` and `salt` (at most
/// the first 8 bytes of the salt are used, as Apache does).
pub fn apr1_hash(password: &[u8], salt: &[u8]) -> String {
    let salt = &salt[..salt.len().min(8)];

    let mut alt = Md5::new();
    alt.update(password);
    alt.update(salt);
    alt.update(password);
    let alt = alt.finalize();

    let mut ctx = Md5::new();
    ctx.update(password);
    ctx.update(MAGIC);
    ctx.update(salt);
    let mut remaining = password.len();
    while remaining > 0 {
        let n = remaining.min(16);
        ctx.update(&alt[..n]);
        remaining -= n;
    }
    let mut i = password.len();
    while i > 0 {
        if i & 1 == 1 {
            ctx.update([0u8]);
        } else {
            ctx.update(&password[..1]);
        }
        i >>= 1;
    }
    let mut fin: [u8; 16] = ctx.finalize().into();

    for round in 0..1000 {
        let mut c = Md5::new();
        if round & 1 == 1 {
            c.update(password);
        } else {
            c.update(fin);
        }
        if round % 3 != 0 {
            c.update(salt);
        }
        if round % 7 != 0 {
            c.update(password);
        }
        if round & 1 == 1 {
            c.update(fin);
        } else {
            c.update(password);
        }
        fin = c.finalize().into();
    }

    let mut out = String::with_capacity(22);
    let mut push = |v: u32, n: usize| {
        let mut v = v;
        for _ in 0..n {
            out.push(ITOA64[(v & 0x3f) as usize] as char);
            v >>= 6;
        }
    };
    let b = |i: usize| u32::from(fin[i]);
    push((b(0) << 16) | (b(6) << 8) | b(12), 4);
    push((b(1) << 16) | (b(7) << 8) | b(13), 4);
    push((b(2) << 16) | (b(8) << 8) | b(14), 4);
    push((b(3) << 16) | (b(9) << 8) | b(15), 4);
    push((b(4) << 16) | (b(10) << 8) | b(5), 4);
    push(b(11), 2);
    out
}

/// Splits `$apr1$<salt>$<hash>` into salt and hash; `None` if the shape is wrong.
pub fn parse_apr1(s: &str) -> Option<(&str, &str)> {
    let rest = s.strip_prefix("$apr1$")?;
    let (salt, hash) = rest.split_once('$')?;
    let valid = |c: u8| ITOA64.contains(&c);
    if salt.is_empty() || salt.len() > 8 || hash.len() != 22 {
        return None;
    }
    if !salt.bytes().all(valid) || !hash.bytes().all(valid) {
        return None;
    }
    Some((salt, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_documented_user() {
        // qa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1 is user qa, password 4lt0@1234
        assert_eq!(
            apr1_hash(b"4lt0@1234", b"v7oipsaf"),
            "bHYHIpWTQbVLBGRumBHIG1"
        );
        assert_ne!(
            apr1_hash(b"4lt0@1235", b"v7oipsaf"),
            "bHYHIpWTQbVLBGRumBHIG1"
        );
    }

    #[test]
    fn matches_openssl() {
        // `openssl passwd -apr1` is an independent implementation; compare a few cases with it.
        let cases: [(&str, &str); 4] = [
            ("", "abc"),
            ("a", "12345678"),
            ("pässwörd long enough to pass sixteen", "s4lt"),
            ("x", "./xY"),
        ];
        for (pw, salt) in cases {
            let out = std::process::Command::new("openssl")
                .args(["passwd", "-apr1", "-salt", salt, pw])
                .output()
                .expect("the openssl command (Debian package openssl, installed by .ci/run)");
            assert!(out.status.success(), "openssl passwd failed");
            let expected = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            assert_eq!(
                format!("$apr1${salt}${}", apr1_hash(pw.as_bytes(), salt.as_bytes())),
                expected
            );
        }
    }

    #[test]
    fn parse_shapes() {
        assert_eq!(
            parse_apr1("$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1"),
            Some(("v7oipsaf", "bHYHIpWTQbVLBGRumBHIG1"))
        );
        assert_eq!(parse_apr1("$apr1$v7oipsaf$short"), None);
        assert_eq!(parse_apr1("$apr1$$bHYHIpWTQbVLBGRumBHIG1"), None);
        assert_eq!(parse_apr1("$1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1"), None);
    }
}
