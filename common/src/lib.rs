//! What `wsmb-broker` and `wsmb-agent` share besides the wire protocol: loading a TOML config
//! file (explicit path, else a default path when it exists, else embedded defaults), durations
//! written `"30s"`, the `[log]` section, and logging to stderr.
//! [`systemd`]: READY, STATUS and the watchdog of `Type=notify` units. [`tls`]: what TLS
//! clients trust. [`metrics`]: a snapshot of figures rendered in the Prometheus text format.
//! [`problem`]: lasting problems logged once, reminded, and cleared. [`capture`]: logs kept
//! in memory, for tests that read them.

#![forbid(unsafe_code)]

pub mod capture;
pub mod metrics;
pub mod problem;
pub mod systemd;
pub mod tls;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {err}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a wrong type.
    #[error("config file {path}: {msg}")]
    Parse {
        /// The path.
        path: PathBuf,
        /// toml's message, with line and column.
        msg: String,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// Where a configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A file.
    File(PathBuf),
    /// Embedded defaults: no file given, none at the default path (named here).
    Defaults(&'static str),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Defaults(p) => write!(f, "embedded defaults ({p} not found)"),
        }
    }
}

/// Parses TOML text into `T`; errors name the file, line and column.
pub fn from_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        msg: e.to_string().trim_end().to_owned(),
    })
}

/// Loads `explicit` (which must exist), else `default_path` when it exists, else `T::default()`.
pub fn load<T: DeserializeOwned + Default>(
    explicit: Option<&Path>,
    default_path: &'static str,
) -> Result<(T, Origin), ConfigError> {
    let (path, must_exist) = match explicit {
        Some(p) => (p.to_owned(), true),
        None => (PathBuf::from(default_path), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((from_toml(&text, &path)?, Origin::File(path))),
        Err(e) if !must_exist && e.kind() == std::io::ErrorKind::NotFound => {
            Ok((T::default(), Origin::Defaults(default_path)))
        }
        Err(err) => Err(ConfigError::Io { path, err }),
    }
}

/// Serde helper: a duration written `"30s"`, `"100ms"`, `"1m 30s"` (humantime), or a bare
/// number of seconds.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) => humantime::parse_duration(&t).map_err(|e| {
            serde::de::Error::custom(format!(
                "{t:?} is not a duration ({e}); write e.g. \"30s\", \"100ms\" or \"2m\""
            ))
        }),
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: `error`, `warn`, `info`, `debug`, `trace`, or per-module directives
    /// such as `wsmb_broker=debug`.
    pub level: String,
    /// `text` (one readable line per event) or `json` (one JSON object per line, for log
    /// shippers).
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `2026-12-06T01:02:03.456Z  WARN wsmb_broker::conn: message key=value`
    #[default]
    Text,
    /// `{"timestamp":"...","level":"WARN","fields":{"message":"...","key":"value"},"target":"..."}`
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?}: use text or json")),
        }
    }
}

impl LogConfig {
    /// Checks the filter. (tracing's own parser takes a bare word such as `loud` as a target
    /// name, which would silently log nothing.)
    pub fn validate(&self) -> Result<(), ConfigError> {
        use std::str::FromStr;
        use tracing_subscriber::filter::LevelFilter;
        let s = &self.level;
        let ok = !s.trim().is_empty()
            && s.split(',').all(|d| {
                let level = d.rsplit_once('=').map_or(d, |(_, l)| l).trim();
                LevelFilter::from_str(level).is_ok()
            })
            && filter(s).is_ok();
        if ok {
            Ok(())
        } else {
            Err(ConfigError::Invalid(format!(
                "log.level = {s:?} is not a valid filter; use error, warn, info, debug or trace"
            )))
        }
    }
}

/// A log filter: a level (`info`), or `target=level` directives separated by commas
/// (`warn,wsmb_broker=debug`). (tracing-subscriber's `Targets`: the same syntax as `RUST_LOG`
/// without span and field filters, and without the regex engine those need.)
pub fn filter(s: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    s.trim()
        .parse::<tracing_subscriber::filter::Targets>()
        .map_err(|e| e.to_string())
}

/// Logs to stderr (journald under systemd) as `log` says; `RUST_LOG`, when set, wins over
/// `log.level`. Colours only on a terminal, never in JSON.
pub fn init_logging(log: &LogConfig) {
    let level = log.level.as_str();
    use std::io::IsTerminal as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| filter(&v).ok())
        .or_else(|| filter(level).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new()
                .with_default(tracing_subscriber::filter::LevelFilter::INFO)
        });
    let registry = tracing_subscriber::registry().with(targets);
    let _ = match log.format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct T {
        #[serde(deserialize_with = "duration")]
        d: Duration,
    }

    #[test]
    fn durations_accept_text_and_seconds() {
        let p = Path::new("x.toml");
        assert_eq!(
            from_toml::<T>("d = 10", p).expect("secs").d,
            Duration::from_secs(10)
        );
        assert_eq!(
            from_toml::<T>("d = \"1m 5s\"", p).expect("text").d,
            Duration::from_secs(65)
        );
        assert_eq!(
            from_toml::<T>("d = \"50ms\"", p).expect("ms").d,
            Duration::from_millis(50)
        );
        let e = from_toml::<T>("d = \"often\"", p).expect_err("bad");
        assert!(e.to_string().contains("not a duration") && e.to_string().contains("x.toml"));
        let e = from_toml::<T>("x = 1", p).expect_err("unknown");
        assert!(e.to_string().contains('x'));
    }

    #[test]
    fn loading_explicit_default_and_missing() {
        let (t, o) = load::<T>(None, "/nonexistent/default.toml").expect("defaults");
        assert_eq!(
            (t, o.to_string()),
            (
                T::default(),
                "embedded defaults (/nonexistent/default.toml not found)".to_owned()
            )
        );
        let e = load::<T>(Some(Path::new("/nonexistent/x.toml")), "/d").expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/x.toml"));
    }

    #[test]
    fn log_filters() {
        for ok in ["debug", "WARN", "wsmb_broker=debug,info", "off"] {
            LogConfig {
                level: ok.into(),
                ..Default::default()
            }
            .validate()
            .expect(ok);
        }
        for bad in ["loud", "", "x=loud"] {
            assert!(
                LogConfig {
                    level: bad.into(),
                    ..Default::default()
                }
                .validate()
                .is_err(),
                "{bad}"
            );
        }
    }
}
