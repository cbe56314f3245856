//! Apache htpasswd entries: parsing and checking one password against one entry.
//!
//! Supported, as Apache writes them: `{SHA}` (`htpasswd -s`), `$apr1$` (`htpasswd -m`) and bcrypt
//! `$2y$`/`$2b$`/`$2a$` (`htpasswd -B`, Apache's default). Anything else (`$5$`, `$6$`, `$1$`, DES
//! crypt, plain text) is refused when the file is loaded, with the file and line, so that a user
//! never silently fails to log in.

use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

use super::apr1::{apr1_hash, parse_apr1};

/// How to fix an unsupported entry; appended to every entry error.
pub const FIX_HINT: &str = "re-create the entry with `htpasswd -B FILE USER` (bcrypt), \
                            or use `htpasswd -m` (apr1) or `htpasswd -s` ({SHA})";

/// A stored password hash.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordHash {
    /// `{SHA}base64(sha1(password))`.
    Sha1([u8; 20]),
    /// `$apr1$salt$hash`.
    Apr1 {
        /// Up to 8 characters.
        salt: String,
        /// 22 characters.
        hash: String,
    },
    /// `$2y$`, `$2b$` or `$2a$` bcrypt, kept whole (the bcrypt crate parses it when verifying).
    Bcrypt {
        /// The 60-character hash string.
        hash: String,
        /// Its cost factor.
        cost: u32,
    },
}

impl std::fmt::Debug for PasswordHash {
    // Never print hashes (logs, panics): only their kind.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

impl PasswordHash {
    /// `"{SHA}"`, `"apr1"` or `"bcrypt"`.
    pub fn kind(&self) -> &'static str {
        match self {
            PasswordHash::Sha1(_) => "{SHA}",
            PasswordHash::Apr1 { .. } => "apr1",
            PasswordHash::Bcrypt { .. } => "bcrypt",
        }
    }

    /// Whether checking a password against this hash is slow enough to run off the async
    /// runtime and to cache.
    pub fn is_expensive(&self) -> bool {
        matches!(self, PasswordHash::Bcrypt { .. })
    }

    /// Parses the hash part of an htpasswd line; the error says what is wrong (without the hash).
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(b64) = s.strip_prefix("{SHA}") {
            let bytes = STANDARD
                .decode(b64)
                .map_err(|_| "malformed {SHA} entry: the digest is not valid base64".to_owned())?;
            let digest: [u8; 20] = bytes
                .try_into()
                .map_err(|_| "malformed {SHA} entry: the digest is not 20 bytes".to_owned())?;
            return Ok(PasswordHash::Sha1(digest));
        }
        if s.starts_with("$apr1$") {
            let (salt, hash) = parse_apr1(s).ok_or_else(|| {
                "malformed $apr1$ entry (expected $apr1$SALT$22-character-hash)".to_owned()
            })?;
            return Ok(PasswordHash::Apr1 {
                salt: salt.to_owned(),
                hash: hash.to_owned(),
            });
        }
        if s.starts_with("$2y$") || s.starts_with("$2b$") || s.starts_with("$2a$") {
            let parts = bcrypt::HashParts::from_str(s)
                .map_err(|e| format!("malformed bcrypt entry: {e}"))?;
            return Ok(PasswordHash::Bcrypt {
                hash: s.to_owned(),
                cost: parts.get_cost(),
            });
        }
        let what = if s.starts_with("$5$") {
            "SHA-256 crypt (`$5$`)".to_owned()
        } else if s.starts_with("$6$") {
            "SHA-512 crypt (`$6$`)".to_owned()
        } else if s.starts_with("$1$") {
            "MD5 crypt (`$1$`, not Apache's `$apr1$`)".to_owned()
        } else if s.starts_with("$2x$") {
            "bcrypt with the buggy `$2x$` prefix".to_owned()
        } else if let Some(rest) = s.strip_prefix('$') {
            let id: String = rest.chars().take_while(|c| *c != '$').take(8).collect();
            format!("the hash scheme `${id}$`")
        } else if s.is_empty() {
            "an empty password hash".to_owned()
        } else {
            "a plain-text password or DES crypt".to_owned()
        };
        Err(format!("unsupported hash: {what}"))
    }

    /// Checks `password` in constant time with respect to the stored value. bcrypt is slow by
    /// design: call this off the async runtime for [`PasswordHash::is_expensive`] hashes.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            PasswordHash::Sha1(expected) => {
                let got: [u8; 20] = Sha1::digest(password).into();
                got.ct_eq(expected).into()
            }
            PasswordHash::Apr1 { salt, hash } => {
                let got = apr1_hash(password, salt.as_bytes());
                got.as_bytes().ct_eq(hash.as_bytes()).into()
            }
            PasswordHash::Bcrypt { hash, .. } => bcrypt::verify(password, hash).unwrap_or(false),
        }
    }
}

/// One `user:hash` line.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The user name (case-sensitive, as Apache treats it).
    pub user: String,
    /// The stored hash.
    pub hash: PasswordHash,
    /// Where it came from, for messages.
    pub origin: String,
}

/// A line that could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name} line {line}: {problem}; {FIX_HINT}")]
pub struct EntryError {
    /// A file path, or a description such as `config credentials.lines`.
    pub source_name: String,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub problem: String,
}

/// Parses htpasswd text. Empty lines and lines starting with `#` are skipped; a trailing `\r` is
/// ignored (files edited on Windows).
pub fn parse(text: &str, source_name: &str) -> Result<Vec<Entry>, EntryError> {
    let mut entries = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end_matches('\r').trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |problem: String| EntryError {
            source_name: source_name.to_owned(),
            line: i + 1,
            problem,
        };
        let Some((user, hash)) = line.split_once(':') else {
            return Err(err("expected `user:hash`, found no `:`".to_owned()));
        };
        if user.is_empty() {
            return Err(err("the user name is empty".to_owned()));
        }
        let hash = PasswordHash::parse(hash).map_err(|p| err(format!("user `{user}`: {p}")))?;
        entries.push(Entry {
            user: user.to_owned(),
            hash,
            origin: format!("{source_name} line {}", i + 1),
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_supported_kinds() {
        let text = "# comment\n\nqa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1\r\n\
                    sha:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n\
                    bc:$2y$05$ABCDEFGHIJKLMNOPQRSTUOvXuE9oQQsUjYdkVnH8u3oMtiNf5/kqq\n";
        let e = parse(text, "f").expect("parses");
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].user, "qa");
        assert!(e[0].hash.verify(b"4lt0@1234"));
        assert!(!e[0].hash.verify(b"wrong"));
        assert_eq!(e[0].origin, "f line 3");
        // {SHA} of "test"
        assert!(e[1].hash.verify(b"test"));
        assert!(!e[1].hash.verify(b"Test"));
        assert!(matches!(e[2].hash, PasswordHash::Bcrypt { cost: 5, .. }));
    }

    #[test]
    fn bcrypt_prefixes_verify() {
        for v in [
            bcrypt::Version::TwoY,
            bcrypt::Version::TwoB,
            bcrypt::Version::TwoA,
        ] {
            let h = bcrypt::hash_with_result("s3cret", 4)
                .expect("hash")
                .format_for_version(v);
            let ph = PasswordHash::parse(&h).expect("parse");
            assert!(ph.verify(b"s3cret"), "{h}");
            assert!(!ph.verify(b"s3cret!"), "{h}");
        }
    }

    #[test]
    fn unsupported_entries_name_file_line_and_fix() {
        let cases = [
            ("u:$6$salt$abcdef", "SHA-512 crypt"),
            ("u:$5$salt$abcdef", "SHA-256 crypt"),
            ("u:$1$salt$abcdef", "MD5 crypt"),
            ("u:plaintext", "plain-text"),
            ("u:abJnggxhB/yWI", "plain-text password or DES crypt"),
            ("u:{SHA}notbase64!", "malformed {SHA}"),
            ("u:$apr1$x$short", "malformed $apr1$"),
            ("u:$2y$05$tooshort", "malformed bcrypt"),
            (
                "u:$2x$05$ABCDEFGHIJKLMNOPQRSTUOvXuE9oQQsUjYdkVnH8u3oMtiNf5/kqq",
                "$2x$",
            ),
            ("no-colon-here", "no `:`"),
            (":{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=", "user name is empty"),
        ];
        for (line, want) in cases {
            let text = format!("ok:{{SHA}}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n{line}\n");
            let e = parse(&text, "/etc/wsmb/htpasswd").expect_err(line);
            assert_eq!(e.line, 2);
            let msg = e.to_string();
            assert!(msg.starts_with("/etc/wsmb/htpasswd line 2: "), "{msg}");
            assert!(msg.contains(want), "{line}: {msg}");
            assert!(msg.contains("htpasswd -B"), "{msg}");
            assert!(
                !msg.contains("abcdef") && !msg.contains("tooshort"),
                "hash leaked: {msg}"
            );
        }
    }

    #[test]
    fn debug_never_shows_the_hash() {
        let h = PasswordHash::parse("{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=").expect("parse");
        assert_eq!(format!("{h:?}"), "{SHA}");
    }
}
