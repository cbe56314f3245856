//! Editing htpasswd files: `wsmb-broker passwd FILE USER` adds, changes or removes one user.
//!
//! Hashes are made the way Apache's `htpasswd` makes them (bcrypt `$2y$` by default, `$apr1$`
//! with `--apr1`, `{SHA}` with `--sha`), so files stay interchangeable with Apache tools. The
//! file is rewritten atomically (a temporary file in the same directory, fsynced, renamed over
//! the old one, the directory fsynced) with the old file's mode, owner and group; every other
//! line (comments, other users) is kept as it was. The running broker notices the new file
//! (its inode changes) within `credentials.reload_interval`, or at once on SIGHUP.

use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use sha1::{Digest as _, Sha1};

use super::apr1::apr1_hash;
use super::htpasswd::PasswordHash;

/// The hash kind to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// bcrypt `$2y$` with this cost (Apache's default is 5; ours 10).
    Bcrypt(u32),
    /// `$apr1$` (MD5-crypt): for old setups and tools that need it.
    Apr1,
    /// `{SHA}` (unsalted SHA-1): only for very old setups.
    Sha,
}

/// The default bcrypt cost: about 50 ms per check on a small VPS, cached after the first
/// success by the broker.
pub const DEFAULT_BCRYPT_COST: u32 = 10;

/// What to do with the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Add the user, or change its password.
    Set(String),
    /// Remove the user.
    Delete,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new user was added (the file may have been created).
    Added,
    /// An existing user's password was changed.
    Changed,
    /// The user was removed.
    Deleted,
}

/// Why the file was not changed.
#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    /// The user name cannot be written in an htpasswd file.
    #[error("user name {0:?} is not usable: {1}")]
    BadUser(String, &'static str),
    /// The password cannot be used.
    #[error("the password is not usable: {0}")]
    BadPassword(&'static str),
    /// `--delete` of a user the file does not have.
    #[error("{file}: there is no user {user:?} to delete")]
    NoSuchUser {
        /// The file.
        file: PathBuf,
        /// The user.
        user: String,
    },
    /// `--delete` on a file that does not exist.
    #[error("{0}: no such file (nothing to delete)")]
    NoFile(PathBuf),
    /// Reading or writing failed.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// Hashing failed.
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// Hashes `password` as the line's hash field.
pub fn hash(password: &str, scheme: Scheme) -> Result<String, PasswdError> {
    match scheme {
        Scheme::Bcrypt(cost) => bcrypt::hash_with_result(password, cost)
            .map(|h| h.format_for_version(bcrypt::Version::TwoY))
            .map_err(|e| PasswdError::Hash(e.to_string())),
        Scheme::Apr1 => {
            const ALPHABET: &[u8] =
                b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
            let mut raw = [0u8; 8];
            getrandom::fill(&mut raw).map_err(|e| PasswdError::Hash(e.to_string()))?;
            let salt: Vec<u8> = raw
                .iter()
                .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()])
                .collect();
            let hash = apr1_hash(password.as_bytes(), &salt);
            Ok(format!("$apr1${}${hash}", String::from_utf8_lossy(&salt)))
        }
        Scheme::Sha => Ok(format!(
            "{{SHA}}{}",
            base64::engine::general_purpose::STANDARD.encode(Sha1::digest(password.as_bytes()))
        )),
    }
}

fn check_user(user: &str) -> Result<(), PasswdError> {
    let bad = |why| Err(PasswdError::BadUser(user.to_owned(), why));
    if user.is_empty() {
        return bad("it is empty");
    }
    if user.contains(':') {
        return bad("it contains `:` (the htpasswd separator)");
    }
    if user.starts_with('#') {
        return bad("it starts with `#` (a comment in htpasswd files)");
    }
    if user.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("it contains white space or control characters");
    }
    if user.len() > 255 {
        return bad("it is longer than 255 bytes");
    }
    Ok(())
}

/// Checks a password given on a prompt or stdin.
pub fn check_password(password: &str) -> Result<(), PasswdError> {
    if password.is_empty() {
        return Err(PasswdError::BadPassword("it is empty"));
    }
    if password.contains(['\n', '\r', '\0']) {
        return Err(PasswdError::BadPassword(
            "it contains a line break or NUL character",
        ));
    }
    // bcrypt only looks at the first 72 bytes: refuse rather than silently ignore the rest.
    if password.len() > 72 {
        return Err(PasswdError::BadPassword(
            "it is longer than 72 bytes (bcrypt ignores the rest)",
        ));
    }
    Ok(())
}

/// The user name of an htpasswd line, if it is an entry.
fn user_of(line: &str) -> Option<&str> {
    let l = line.trim_end_matches('\r').trim_start();
    if l.is_empty() || l.starts_with('#') {
        return None;
    }
    l.split_once(':').map(|(u, _)| u)
}

/// Applies `change` for `user` to `file` (created with mode 0640 when missing and the change
/// adds a user).
pub fn apply(
    file: &Path,
    user: &str,
    change: &Change,
    scheme: Scheme,
) -> Result<Outcome, PasswdError> {
    check_user(user)?;
    let io = |e| PasswdError::Io(file.to_path_buf(), e);
    let (text, meta) = match std::fs::read_to_string(file) {
        Ok(t) => (t, Some(std::fs::metadata(file).map_err(io)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if *change == Change::Delete {
                return Err(PasswdError::NoFile(file.to_path_buf()));
            }
            (String::new(), None)
        }
        Err(e) => return Err(io(e)),
    };
    let new_line = match change {
        Change::Set(pw) => {
            check_password(pw)?;
            let h = hash(pw, scheme)?;
            // Never write what the broker would refuse to load.
            PasswordHash::parse(&h).map_err(PasswdError::Hash)?;
            Some(format!("{user}:{h}"))
        }
        Change::Delete => None,
    };
    let mut out = String::with_capacity(text.len() + 80);
    let mut found = false;
    for line in text.lines() {
        if user_of(line) == Some(user) {
            // A later duplicate of the same user is dropped: one line per user.
            if !found {
                if let Some(l) = &new_line {
                    out.push_str(l);
                    out.push('\n');
                }
            }
            found = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    let outcome = match (change, found) {
        (Change::Delete, false) => {
            return Err(PasswdError::NoSuchUser {
                file: file.to_path_buf(),
                user: user.to_owned(),
            });
        }
        (Change::Delete, true) => Outcome::Deleted,
        (Change::Set(_), true) => Outcome::Changed,
        (Change::Set(_), false) => {
            if let Some(l) = &new_line {
                out.push_str(l);
                out.push('\n');
            }
            Outcome::Added
        }
    };
    write_atomically(file, out.as_bytes(), meta.as_ref()).map_err(io)?;
    Ok(outcome)
}

/// Writes `bytes` to `file` through a temporary file in the same directory, keeping `meta`'s
/// mode, owner and group (0640 and the current user for a new file).
fn write_atomically(
    file: &Path,
    bytes: &[u8],
    meta: Option<&std::fs::Metadata>,
) -> std::io::Result<()> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "htpasswd".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mode = meta
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o640);
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if let Some(m) = meta {
            // Keep the owner and group (root editing the broker's file); when we may not
            // (an ordinary user), the group alone may still be settable.
            if std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid())).is_err() {
                let _ = std::os::unix::fs::fchown(&f, None, Some(m.gid()));
            }
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, file)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wsmb-passwd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn verify(file: &Path, user: &str, pw: &str) -> bool {
        let text = std::fs::read_to_string(file).expect("read");
        super::super::htpasswd::parse(&text, "t")
            .expect("parses")
            .iter()
            .any(|e| e.user == user && e.hash.verify(pw.as_bytes()))
    }

    #[test]
    fn adds_changes_and_deletes_keeping_other_lines_and_the_mode() {
        let d = scratch("edit");
        let f = d.join("htpasswd");
        std::fs::write(
            &f,
            "# users\nqa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1\r\nother:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n",
        )
        .expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let ino = std::fs::metadata(&f).expect("meta").ino();

        let set = |pw: &str| Change::Set(pw.to_owned());
        assert_eq!(
            apply(&f, "app", &set("s3cret-1"), Scheme::Bcrypt(4)).expect("add"),
            Outcome::Added
        );
        assert!(verify(&f, "app", "s3cret-1"));
        assert!(verify(&f, "qa", "4lt0@1234"));
        assert!(verify(&f, "other", "test"));
        let text = std::fs::read_to_string(&f).expect("read");
        assert!(text.starts_with("# users\n"), "{text}");
        assert!(text.contains("app:$2y$04$"), "{text}");
        let meta = std::fs::metadata(&f).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_ne!(
            meta.ino(),
            ino,
            "replaced by rename, so the broker sees a new file"
        );

        assert_eq!(
            apply(&f, "qa", &set("new-pass"), Scheme::Apr1).expect("change"),
            Outcome::Changed
        );
        assert!(verify(&f, "qa", "new-pass"));
        assert!(!verify(&f, "qa", "4lt0@1234"));
        assert_eq!(
            apply(&f, "other", &set("x"), Scheme::Sha).expect("sha"),
            Outcome::Changed
        );
        assert!(verify(&f, "other", "x"));

        assert_eq!(
            apply(&f, "app", &Change::Delete, Scheme::Sha).expect("delete"),
            Outcome::Deleted
        );
        assert!(!std::fs::read_to_string(&f).expect("read").contains("app:"));
        assert!(matches!(
            apply(&f, "app", &Change::Delete, Scheme::Sha),
            Err(PasswdError::NoSuchUser { .. })
        ));
        // Nothing left behind.
        let names: Vec<_> = std::fs::read_dir(&d).expect("ls").flatten().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_new_file_is_0640_and_bad_input_changes_nothing() {
        let d = scratch("new");
        let f = d.join("users");
        assert!(matches!(
            apply(&f, "a", &Change::Delete, Scheme::Sha),
            Err(PasswdError::NoFile(_))
        ));
        apply(&f, "a", &Change::Set("pw".into()), Scheme::Bcrypt(4)).expect("create");
        let meta = std::fs::metadata(&f).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        let before = std::fs::read(&f).expect("read");
        for (user, pw) in [("b:c", "pw"), ("", "pw"), ("b c", "pw"), ("#b", "pw")] {
            assert!(matches!(
                apply(&f, user, &Change::Set(pw.into()), Scheme::Sha),
                Err(PasswdError::BadUser(..))
            ));
        }
        for pw in ["", "a\nb", &"x".repeat(73)] {
            assert!(matches!(
                apply(&f, "b", &Change::Set(pw.into()), Scheme::Sha),
                Err(PasswdError::BadPassword(_))
            ));
        }
        assert_eq!(std::fs::read(&f).expect("read"), before);
    }

    #[test]
    fn duplicate_lines_of_a_user_become_one() {
        let d = scratch("dup");
        let f = d.join("h");
        std::fs::write(&f, "a:{SHA}x\nb:{SHA}y\na:{SHA}z\n").expect("write");
        apply(&f, "a", &Change::Set("pw".into()), Scheme::Sha).expect("set");
        let text = std::fs::read_to_string(&f).expect("read");
        assert_eq!(text.matches("a:").count(), 1, "{text}");
        assert!(text.starts_with("a:{SHA}") && text.contains("b:{SHA}y"));
    }
}
