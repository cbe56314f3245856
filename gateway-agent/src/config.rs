//! Agent configuration: TOML file (default `/etc/wsmb/agent.toml`), embedded defaults, the
//! password from `WSMB_PASSWORD`, flags for a one-off run. `deploy/agent.example.toml` documents
//! every key with its default; a test keeps the two in step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use wsmb_common::duration;
pub use wsmb_common::{ConfigError, LogConfig, Origin};

use crate::modem::ModemSettings;

/// Default config path.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/wsmb/agent.toml";
/// Environment variable holding the broker password.
pub const ENV_PASSWORD: &str = "WSMB_PASSWORD";

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[broker]`.
    pub broker: BrokerConfig,
    /// `[agent]`.
    pub agent: AgentConfig,
    /// `[[modem]]`, one per modem.
    #[serde(rename = "modem")]
    pub modems: Vec<ModemConfig>,
    /// `[[route]]`: number prefixes to modem groups.
    #[serde(rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// `[log]`.
    pub log: LogConfig,
}

/// `[broker]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `ws://` or `wss://` URL of the broker.
    pub url: String,
    /// User name (HTTP Basic).
    pub user: String,
    /// Password; `WSMB_PASSWORD` overrides it (keep it out of the file).
    pub password: String,
    /// Channel the jobs arrive on.
    pub channel: String,
    /// Channel the status events are published on.
    pub status_channel: String,
    /// Channel received SMS are published on.
    pub inbox_channel: String,
    /// Client pings to the broker; the link is considered dead after two missed.
    #[serde(deserialize_with = "duration")]
    pub ping_interval: Duration,
    /// Longest wait between reconnection attempts (back-off with jitter up to this).
    #[serde(deserialize_with = "duration")]
    pub reconnect_max: Duration,
    /// Time allowed to connect and upgrade.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// For `wss://`: a PEM file of certificates to trust besides the public roots: a private
    /// CA, or the broker's own (self-signed) certificate. Empty: public roots only.
    pub ca_file: PathBuf,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: "ws://127.0.0.1:8888/".into(),
            user: "agent".into(),
            password: String::new(),
            channel: "sms".into(),
            status_channel: "sms-status".into(),
            inbox_channel: "sms-inbox".into(),
            ping_interval: Duration::from_secs(30),
            reconnect_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            ca_file: PathBuf::new(),
        }
    }
}

/// `[agent]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Where the job queue (SQLite) lives.
    pub state_dir: PathBuf,
    /// Country calling code used to write national numbers internationally (`"62"`: `0812...`
    /// becomes `+62812...`). Empty: national numbers are sent as they are.
    pub country_code: String,
    /// The national trunk prefix replaced by the country code.
    pub national_prefix: String,
    /// Most SMS parts one job may need.
    pub max_parts: u32,
    /// Sending attempts before a job fails.
    pub max_attempts: u32,
    /// Wait before the first retry; doubles with each attempt, capped at 10 minutes.
    #[serde(deserialize_with = "duration")]
    pub retry_delay: Duration,
    /// Send again after an ambiguous answer (`+CMS ERROR: 500`, no answer after sending),
    /// accepting possible duplicates. Off by default: the job fails and says so.
    pub retry_ambiguous: bool,
    /// Numbers that are refused (normalised before comparing).
    pub block_list: Vec<String>,
    /// Ask the network for delivery reports.
    pub status_report: bool,
    /// A received SMS whose parts have not all come within this is published with what came
    /// (`partial`).
    #[serde(deserialize_with = "duration")]
    pub inbox_part_timeout: Duration,
    /// How often the modems' storage is read for SMS whose indication was missed (and at
    /// start, for what came while the agent was down).
    #[serde(deserialize_with = "duration")]
    pub inbox_sweep: Duration,
    /// Validity period given to the SMSC ("1d", "6h"); empty leaves the SMSC default.
    pub validity: String,
    /// How often the agent tells the broker how it and its modems are (a `heartbeat` status
    /// event, also sent at each connection); "0s": never.
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    /// Prometheus metrics of the agent at `http://ADDR/metrics`, e.g. "127.0.0.1:9746";
    /// loopback addresses only (no authentication). Empty (the default): off.
    pub metrics_listen: String,
    /// A daily window of local time ("21:00-07:00") in which only the OTP lane (priority 100
    /// and above) is sent; other jobs wait for its end ([`crate::quiet`]). Empty: none.
    pub quiet_hours: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            state_dir: PathBuf::from("/var/lib/wsmb-agent"),
            country_code: String::new(),
            national_prefix: "0".into(),
            max_parts: 10,
            max_attempts: 5,
            retry_delay: Duration::from_secs(30),
            retry_ambiguous: false,
            block_list: Vec::new(),
            status_report: false,
            inbox_part_timeout: Duration::from_secs(600),
            inbox_sweep: Duration::from_secs(60),
            validity: String::new(),
            heartbeat_interval: Duration::from_secs(60),
            metrics_listen: String::new(),
            quiet_hours: String::new(),
        }
    }
}

/// `[[modem]]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModemConfig {
    /// Name (logs, statuses). Default `modem1`, `modem2`, ... in file order.
    pub name: String,
    /// Serial device; prefer `/dev/serial/by-id/...`, which survives re-enumeration.
    pub device: PathBuf,
    /// Baud rate.
    pub baud: u32,
    /// SIM PIN (empty: none).
    pub pin: String,
    /// Routing group.
    pub group: String,
    /// Most SMS (parts) per minute through this modem; 0 = no limit.
    pub rate_per_minute: u32,
    /// Most SMS (parts) per hour; 0 = no limit.
    pub rate_per_hour: u32,
    /// Most SMS (parts) per day (any 24 hours); 0 = no limit. Counted across restarts.
    pub rate_per_day: u32,
    /// Extra AT commands run after initialisation.
    pub init: Vec<String>,
    /// Deadline of ordinary AT commands.
    #[serde(deserialize_with = "duration")]
    pub command_timeout: Duration,
    /// Deadline for the `> ` prompt of `AT+CMGS`.
    #[serde(deserialize_with = "duration")]
    pub prompt_timeout: Duration,
    /// Deadline for `+CMGS` after the PDU.
    #[serde(deserialize_with = "duration")]
    pub send_timeout: Duration,
    /// How long to wait for network registration.
    #[serde(deserialize_with = "duration")]
    pub registration_timeout: Duration,
    /// How often an idle modem is checked (registration, signal): a lost network is noticed
    /// and the signal in the heartbeat is at most this old.
    #[serde(deserialize_with = "duration")]
    pub check_interval: Duration,
}

impl Default for ModemConfig {
    fn default() -> Self {
        let d = ModemSettings::new("", "");
        ModemConfig {
            name: String::new(),
            device: PathBuf::new(),
            baud: d.baud,
            pin: String::new(),
            group: "default".into(),
            rate_per_minute: 10,
            rate_per_hour: 0,
            rate_per_day: 0,
            init: Vec::new(),
            command_timeout: d.command_timeout,
            prompt_timeout: d.prompt_timeout,
            send_timeout: d.send_timeout,
            registration_timeout: d.registration_timeout,
            check_interval: d.health_interval,
        }
    }
}

impl ModemConfig {
    /// The actor's settings.
    pub fn settings(&self) -> ModemSettings {
        let mut s = ModemSettings::new(&self.name, &self.device);
        s.baud = self.baud;
        s.pin = (!self.pin.is_empty()).then(|| self.pin.clone());
        s.init = self.init.clone();
        s.command_timeout = self.command_timeout;
        s.prompt_timeout = self.prompt_timeout;
        s.send_timeout = self.send_timeout;
        s.registration_timeout = self.registration_timeout;
        s.health_interval = self.check_interval;
        s
    }
}

/// `[[route]]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// International prefixes, e.g. `["+62811", "+62812"]`; the longest match wins.
    pub prefixes: Vec<String>,
    /// The modem group that sends these numbers.
    pub group: String,
}

impl Config {
    /// Parses TOML.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        wsmb_common::from_toml(text, path)
    }

    /// Loads `path`, else the default path if it exists, else defaults.
    pub fn load(path: Option<&Path>) -> Result<(Config, Origin), ConfigError> {
        wsmb_common::load(path, DEFAULT_CONFIG_PATH)
    }

    /// Names unnamed modems `modem1`, `modem2`, ...
    pub fn fill_names(&mut self) {
        for (i, m) in self.modems.iter_mut().enumerate() {
            if m.name.is_empty() {
                m.name = format!("modem{}", i + 1);
            }
        }
    }

    /// The validity period, parsed.
    pub fn validity(&self) -> Option<Duration> {
        humantime::parse_duration(self.agent.validity.trim()).ok()
    }

    /// Checks everything a `run` needs (modems included).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let url = &self.broker.url;
        if !(url.starts_with("ws://") || url.starts_with("wss://")) {
            return bad(format!(
                "broker.url = {url:?} must start with ws:// or wss:// (e.g. \"wss://broker.example.com/\")"
            ));
        }
        if !self.broker.ca_file.as_os_str().is_empty() {
            wsmb_common::tls::trust_store(&self.broker.ca_file, "broker.ca_file")
                .map_err(ConfigError::Invalid)?;
        }
        if self.broker.user.is_empty() {
            return bad("broker.user is empty: set the broker user name".into());
        }
        if self.broker.channel.is_empty() || self.broker.status_channel.is_empty() {
            return bad("broker.channel and broker.status_channel must not be empty".into());
        }
        if !self.agent.metrics_listen.is_empty() {
            match self.agent.metrics_listen.parse::<std::net::SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => {}
                Ok(_) => {
                    return bad(format!(
                        "agent.metrics_listen = {:?}: the metrics have no authentication, so \
                         only a loopback address is allowed (e.g. \"127.0.0.1:9746\"); reach \
                         them from elsewhere through an SSH tunnel or the broker's /metrics",
                        self.agent.metrics_listen
                    ));
                }
                Err(e) => {
                    return bad(format!(
                        "agent.metrics_listen = {:?} is not an address ({e}); write e.g. \
                         \"127.0.0.1:9746\", or \"\" for none",
                        self.agent.metrics_listen
                    ));
                }
            }
        }
        crate::quiet::Window::parse(&self.agent.quiet_hours).map_err(ConfigError::Invalid)?;
        if self.broker.channel == self.broker.status_channel {
            return bad("broker.status_channel must differ from broker.channel".into());
        }
        if self.broker.inbox_channel.is_empty()
            || self.broker.inbox_channel == self.broker.channel
            || self.broker.inbox_channel == self.broker.status_channel
        {
            return bad(
                "broker.inbox_channel must not be empty and must differ from broker.channel and \
                 broker.status_channel"
                    .into(),
            );
        }
        if self.broker.ping_interval.is_zero() {
            return bad("broker.ping_interval must be more than 0s".into());
        }
        let cc = &self.agent.country_code;
        if !cc.is_empty() && (cc.len() > 3 || !cc.bytes().all(|b| b.is_ascii_digit())) {
            return bad(format!(
                "agent.country_code = {:?} must be 1 to 3 digits without + (e.g. \"62\")",
                self.agent.country_code
            ));
        }
        if !(1..=255).contains(&self.agent.max_parts) {
            return bad("agent.max_parts must be 1 to 255".into());
        }
        if self.agent.max_attempts == 0 {
            return bad("agent.max_attempts must be at least 1".into());
        }
        if !self.agent.validity.trim().is_empty() && self.validity().is_none() {
            return bad(format!(
                "agent.validity = {:?} is not a duration; write e.g. \"1d\" or \"6h\", or leave it empty",
                self.agent.validity
            ));
        }
        if self.modems.is_empty() {
            return bad(
                "no modem configured: add a [[modem]] section with its device, or pass --device PATH"
                    .into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for m in &self.modems {
            if m.device.as_os_str().is_empty() {
                return bad(format!(
                    "modem {:?} has no device: set device = \"/dev/serial/by-id/...\"",
                    m.name
                ));
            }
            if !names.insert(&m.name) {
                return bad(format!(
                    "two modems are named {:?}; names must be unique",
                    m.name
                ));
            }
            if m.command_timeout.is_zero() || m.prompt_timeout.is_zero() || m.send_timeout.is_zero()
            {
                return bad(format!("modem {:?}: timeouts must be more than 0s", m.name));
            }
            if m.check_interval < Duration::from_secs(1) {
                return bad(format!(
                    "modem {:?}: check_interval must be at least 1s (e.g. \"30s\")",
                    m.name
                ));
            }
            // What goes on the serial line must not be able to end the command it is in and
            // start another one.
            let pin_ok =
                (4..=8).contains(&m.pin.len()) && m.pin.bytes().all(|b| b.is_ascii_digit());
            if !m.pin.is_empty() && !pin_ok {
                return bad(format!(
                    "modem {:?}: pin must be 4 to 8 digits (the SIM's PIN), or empty when the SIM \
                     has none",
                    m.name
                ));
            }
            for cmd in &m.init {
                let printable = cmd.bytes().all(|b| (0x20..0x7f).contains(&b));
                if !printable || !cmd.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("AT")) {
                    return bad(format!(
                        "modem {:?}: init command {cmd:?} must start with AT and hold only \
                         printable ASCII (one command per entry; no line breaks or control \
                         characters)",
                        m.name
                    ));
                }
            }
        }
        self.log.validate()?;
        for r in &self.routes {
            if !self.modems.iter().any(|m| m.group == r.group) {
                return bad(format!(
                    "route group {:?} has no modem: set group = {:?} on a [[modem]]",
                    r.group, r.group
                ));
            }
            for p in &r.prefixes {
                if !p.starts_with('+') || p.len() < 2 || !p[1..].bytes().all(|b| b.is_ascii_digit())
                {
                    return bad(format!(
                        "route prefix {p:?} must be + and digits (international form, e.g. \"+62812\")"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_documents_every_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.example.toml");
        let text = std::fs::read_to_string(&path).expect("deploy/agent.example.toml");
        let mut parsed = Config::from_toml(&text, &path).expect("parses");
        let mut expected = Config::default();
        // the example fills in one modem and one route; they must use the defaults otherwise
        assert_eq!(parsed.modems.len(), 1);
        let m = parsed.modems.remove(0);
        assert_eq!(
            m,
            ModemConfig {
                name: m.name.clone(),
                device: m.device.clone(),
                ..ModemConfig::default()
            }
        );
        parsed.routes.clear();
        expected.broker.password = parsed.broker.password.clone();
        assert_eq!(parsed, expected);
        for key in [
            "url",
            "user",
            "password",
            "channel",
            "status_channel",
            "inbox_channel",
            "inbox_part_timeout",
            "inbox_sweep",
            "ping_interval",
            "reconnect_max",
            "connect_timeout",
            "state_dir",
            "country_code",
            "national_prefix",
            "max_parts",
            "max_attempts",
            "retry_delay",
            "retry_ambiguous",
            "block_list",
            "status_report",
            "validity",
            "name",
            "device",
            "baud",
            "pin",
            "group",
            "rate_per_minute",
            "rate_per_hour",
            "rate_per_day",
            "init",
            "command_timeout",
            "prompt_timeout",
            "send_timeout",
            "registration_timeout",
            "check_interval",
            "heartbeat_interval",
            "metrics_listen",
            "prefixes",
            "level",
            "format",
        ] {
            assert!(text.contains(&format!("{key} =")), "example lacks {key}");
        }
    }

    fn valid() -> Config {
        let mut c = Config::default();
        c.modems.push(ModemConfig {
            device: "/dev/ttyUSB0".into(),
            ..ModemConfig::default()
        });
        c.fill_names();
        c
    }

    #[test]
    fn validation_names_the_key() {
        valid().validate().expect("valid");
        let mut c = valid();
        c.broker.url = "http://x".into();
        assert!(
            c.validate()
                .expect_err("url")
                .to_string()
                .contains("broker.url")
        );
        let mut c = valid();
        c.modems.clear();
        assert!(
            c.validate()
                .expect_err("modems")
                .to_string()
                .contains("--device")
        );
        let mut c = valid();
        c.agent.quiet_hours = "22:00".into();
        assert!(
            c.validate()
                .expect_err("quiet")
                .to_string()
                .contains("agent.quiet_hours = \"22:00\"")
        );
        let mut c = valid();
        c.agent.country_code = "+62".into();
        assert!(
            c.validate()
                .expect_err("cc")
                .to_string()
                .contains("country_code")
        );
        let mut c = valid();
        c.routes.push(RouteConfig {
            prefixes: vec!["+62812".into()],
            group: "nope".into(),
        });
        assert!(
            c.validate()
                .expect_err("route")
                .to_string()
                .contains("nope")
        );
        let mut c = valid();
        c.agent.validity = "forever".into();
        assert!(
            c.validate()
                .expect_err("validity")
                .to_string()
                .contains("validity")
        );
        // Nothing from the config can end an AT command and start another.
        for pin in ["123", "123456789", "12a4", "1234\"\r\nAT+CFUN=0\r"] {
            let mut c = valid();
            c.modems[0].pin = pin.into();
            let e = c.validate().expect_err("pin").to_string();
            assert!(e.contains("pin must be 4 to 8 digits"), "{pin:?}: {e}");
            assert!(
                !e.contains(pin),
                "the PIN is not repeated in the error: {e}"
            );
        }
        for pin in ["", "1234", "12345678"] {
            let mut c = valid();
            c.modems[0].pin = pin.into();
            c.validate().expect("a valid PIN");
        }
        for init in ["AT+CSCS=\"GSM\"\rAT+CFUN=0", "ATZ\u{1a}", "CFUN=1", ""] {
            let mut c = valid();
            c.modems[0].init = vec![init.into()];
            let e = c.validate().expect_err("init").to_string();
            assert!(e.contains("must start with AT"), "{init:?}: {e}");
        }
        let e =
            Config::from_toml("[agent]\ncolor = 1\n", Path::new("a.toml")).expect_err("unknown");
        assert!(e.to_string().contains("color"));
    }
}
