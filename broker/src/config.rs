//! Broker configuration: TOML file, embedded defaults, environment overrides for secrets,
//! validation with messages that name the key and say how to fix it.
//!
//! Precedence, lowest first: embedded defaults, the config file (`--config PATH`, else
//! `/etc/wsmb/broker.toml` when it exists), environment variables for secrets, command-line flags.
//! `deploy/broker.example.toml` documents every key with its default; a test keeps the two in
//! step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use wsmb_common::duration;
pub use wsmb_common::{ConfigError, LogConfig, Origin};

use crate::auth::{AuthTuning, CredentialSources};

/// Default config path.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/wsmb/broker.toml";

/// Environment variable whose htpasswd lines (one per line) replace `credentials.lines`.
pub const ENV_CREDENTIALS: &str = "WSMB_CREDENTIALS";

/// Where the HTTP SMS API lives.
pub const API_PREFIX: &str = "/3rdparty/v1";

/// Environment variable that replaces `sms.webhook_signing_key`.
pub const ENV_WEBHOOK_KEY: &str = "WSMB_WEBHOOK_KEY";

/// Environment variable that replaces `storage.password`.
pub const ENV_DB_PASSWORD: &str = "WSMB_DATABASE_PASSWORD";

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[credentials]`.
    pub credentials: CredentialsConfig,
    /// `[storage]`.
    pub storage: StorageConfig,
    /// `[tls]`.
    pub tls: TlsConfig,
    /// `[sms]`.
    pub sms: SmsConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[metrics]`.
    pub metrics: MetricsConfig,
    /// `[status]`: the status page.
    pub status: StatusConfig,
    /// `[permissions]`: what each user may do.
    pub permissions: crate::auth::permissions::PermissionsConfig,
    /// The file this came from (none: embedded defaults), read again for `[permissions]` when
    /// the users are reloaded.
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// Who may read the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsAccess {
    /// Any broker user (HTTP Basic credentials).
    #[default]
    Users,
    /// Clients on loopback (a Prometheus on the same host), without credentials.
    Loopback,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where the metrics are served on the broker's port; empty: not served.
    pub path: String,
    /// Who may read them.
    pub access: MetricsAccess,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            path: "/metrics".into(),
            access: MetricsAccess::Users,
        }
    }
}

impl ServerConfig {
    /// The guard's limits (`crate::guard`), from these settings.
    pub fn guard_limits(&self) -> crate::guard::Limits {
        let s = self;
        crate::guard::Limits {
            max_pending: s.max_pending_connections,
            max_per_address: s.max_connections_per_address,
            trusted_proxies: s.trusted_proxies.clone(),
            fail_delay: s.auth_fail_delay,
            fail_delay_max: s.auth_fail_delay_max,
            ban_after: s.auth_ban_after,
            ban_window: s.auth_ban_window,
            ban_for: s.auth_ban_for,
            http_rate: s.http_requests_per_second,
            http_burst: (s.http_requests_per_second * 2.0).max(1.0),
            user_rate: s.messages_per_second_per_user,
            user_burst: s.messages_per_second_per_user.max(1.0),
        }
    }
}

/// `[status]`: the status page, for any broker user (HTTP Basic).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// Where the page is served on the broker's port (its script, style and figures below
    /// it); empty: not served.
    pub path: String,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            path: "/status".into(),
        }
    }
}

/// `[tls]`: the broker's own TLS listener. Both files empty (the default): plain `ws://`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain (the server's certificate first), e.g. Let's Encrypt's
    /// `fullchain.pem`.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1), e.g. `privkey.pem`.
    pub key_file: PathBuf,
}

impl TlsConfig {
    /// Whether TLS is configured.
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty() || !self.key_file.as_os_str().is_empty()
    }
}

/// `[sms]`: the SMS service (the HTTP API under `/3rdparty/v1`, message states, webhooks).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SmsConfig {
    /// Serve the HTTP API and track SMS jobs.
    pub enabled: bool,
    /// The channel the gateway agents take jobs from.
    pub jobs_channel: String,
    /// The channel the agents publish status events on.
    pub status_channel: String,
    /// The channel the agents publish received SMS on.
    pub inbox_channel: String,
    /// Longest text, in SMS parts (the agent's `max_parts` should be the same).
    pub max_parts: u32,
    /// Most recipients of one message.
    pub max_recipients: usize,
    /// Largest HTTP request body.
    pub max_body_bytes: usize,
    /// Most messages kept (states); past it new messages get 503.
    pub max_messages: usize,
    /// How long a message's state is kept after it was accepted.
    #[serde(deserialize_with = "duration")]
    pub keep: Duration,
    /// Key of the webhook signatures (`WSMB_WEBHOOK_KEY` replaces it); empty: one is made at
    /// first start and kept in the database (`wsmb-broker webhook-key` shows it).
    pub webhook_signing_key: String,
    /// Most webhooks per user.
    pub max_webhooks: usize,
    /// Deadline of one webhook call (connect, TLS, request, response head).
    #[serde(deserialize_with = "duration")]
    pub webhook_timeout: Duration,
    /// First delay before a failed webhook call is tried again (it doubles each time)...
    #[serde(deserialize_with = "duration")]
    pub webhook_retry_initial: Duration,
    /// ...up to this.
    #[serde(deserialize_with = "duration")]
    pub webhook_retry_max: Duration,
    /// A webhook call still failing this long after its event is given up (kept, visible in
    /// `GET /webhooks`, logged).
    #[serde(deserialize_with = "duration")]
    pub webhook_give_up_after: Duration,
    /// Hosts whose webhooks may use plain `http://` (loopback always may).
    pub webhook_http_hosts: Vec<String>,
    /// PEM certificates trusted for `https://` webhooks besides the public roots.
    pub webhook_ca_file: PathBuf,
    /// Interval of `system:ping` webhooks (0 = none).
    #[serde(deserialize_with = "duration")]
    pub ping_interval: Duration,
}

impl Default for SmsConfig {
    fn default() -> Self {
        SmsConfig {
            enabled: true,
            jobs_channel: "sms".into(),
            status_channel: "sms-status".into(),
            inbox_channel: "sms-inbox".into(),
            max_parts: 10,
            max_recipients: 100,
            max_body_bytes: 64 * 1024,
            max_messages: 1_000_000,
            keep: Duration::from_secs(30 * 24 * 3600),
            webhook_signing_key: String::new(),
            max_webhooks: 100,
            webhook_timeout: Duration::from_secs(10),
            webhook_retry_initial: Duration::from_secs(10),
            webhook_retry_max: Duration::from_secs(3600),
            webhook_give_up_after: Duration::from_secs(24 * 3600),
            webhook_http_hosts: Vec::new(),
            webhook_ca_file: PathBuf::new(),
            ping_interval: Duration::ZERO,
        }
    }
}

/// Where messages are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Nothing stored: a message reaches the receivers online, or nobody (the original without
    /// a database).
    Memory,
    /// One SQLite file (WAL), the default.
    Sqlite,
    /// MariaDB/MySQL, in the legacy `mq_data` table (with the original's prefix).
    Mysql,
    /// PostgreSQL.
    Postgres,
}

/// `[storage]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `memory`, `sqlite`, `mysql` or `postgres`.
    pub backend: Backend,
    /// SQLite file.
    pub path: PathBuf,
    /// MySQL/PostgreSQL URL: `mysql://USER@HOST:3306/DB`, `postgres://USER@HOST:5432/DB`.
    pub url: String,
    /// Database password (kept out of the URL); `WSMB_DATABASE_PASSWORD` replaces it.
    pub password: String,
    /// Table prefix: the table is `<prefix>data` (the original's `mq_data`).
    pub prefix: String,
    /// Legacy receivers get stored messages in frames of at most this many items...
    pub limit: usize,
    /// ...this long apart.
    #[serde(deserialize_with = "duration")]
    pub delay_send: Duration,
    /// A message not acknowledged this long after delivery goes to another receiver.
    #[serde(deserialize_with = "duration")]
    pub ack_timeout: Duration,
    /// Unacknowledged messages per receiver when it does not ask for a `window`.
    pub window: u32,
    /// The largest `window` a receiver may ask for.
    pub max_window: u32,
    /// Most messages stored for one channel; past it senders get `04`.
    pub max_stored_per_channel: usize,
    /// Most messages stored in all; past it senders get `04`.
    pub max_stored_total: usize,
    /// Most writes committed in one transaction (group commit).
    pub commit_batch: usize,
    /// Longest wait between reconnection attempts to the database.
    #[serde(deserialize_with = "duration")]
    pub reconnect_max: Duration,
    /// Longest a commit may take; past it the database counts as down.
    #[serde(deserialize_with = "duration")]
    pub commit_timeout: Duration,
    /// How long a commit waits for more writes to join it (0 = commit at once; writes that
    /// arrive during a commit join the next one anyway).
    #[serde(deserialize_with = "duration")]
    pub commit_delay: Duration,
    /// Most channels with stored messages; past it senders to a new channel get `04`.
    pub max_channels: usize,
    /// This broker's name in the claims it writes (`<node>/<connection>`). Brokers sharing one
    /// database need different names.
    pub node: String,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Sqlite,
            path: PathBuf::from("/var/lib/wsmb/broker.sqlite"),
            url: String::new(),
            password: String::new(),
            prefix: "mq_".into(),
            limit: 20,
            delay_send: Duration::from_millis(100),
            ack_timeout: Duration::from_secs(30),
            window: 64,
            max_window: 1024,
            max_stored_per_channel: 100_000,
            max_stored_total: 1_000_000,
            commit_batch: 1024,
            reconnect_max: Duration::from_secs(30),
            commit_timeout: Duration::from_secs(10),
            commit_delay: Duration::ZERO,
            max_channels: 10_000,
            node: "local".into(),
        }
    }
}

/// What to do with a receiver whose outgoing queue stayed full for `slow_receiver_timeout`
/// while a message waited for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowReceiverPolicy {
    /// Close it (1008, "slow consumer") so that it reconnects; messages go to other receivers.
    Disconnect,
    /// Keep it; the message that waited for it is not delivered to it.
    Skip,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port to listen on.
    pub listen: String,
    /// The WebSocket path; other paths get 404 (`/healthz` excepted).
    pub path: String,
    /// Receivers per message when the sender does not say (0 = every receiver).
    pub number_of_receiver: u32,
    /// Largest accepted frame/message, in bytes; larger ones close the connection with 1009.
    pub max_message_bytes: usize,
    /// Most simultaneous authenticated WebSocket sessions; more get 503.
    pub max_connections: usize,
    /// Most connections still authenticating (any address), a budget of their own so that
    /// they never take the place of authenticated sessions; more get 503.
    pub max_pending_connections: usize,
    /// Most connections of any kind from one client address (trusted proxies excepted).
    pub max_connections_per_address: usize,
    /// Reverse proxies whose `X-Forwarded-For` names the client (its last address); they are
    /// not capped per address. Default: loopback.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// After a failed login from an address, its next answer waits this long, doubling with
    /// each failure...
    #[serde(deserialize_with = "duration")]
    pub auth_fail_delay: Duration,
    /// ...up to this.
    #[serde(deserialize_with = "duration")]
    pub auth_fail_delay_max: Duration,
    /// Failed logins from one address within `auth_ban_window` that ban it (0: never).
    pub auth_ban_after: u32,
    /// See `auth_ban_after`.
    #[serde(deserialize_with = "duration")]
    pub auth_ban_window: Duration,
    /// How long a ban lasts: the address's connections are closed at once.
    #[serde(deserialize_with = "duration")]
    pub auth_ban_for: Duration,
    /// HTTP API requests per second per client address (twice that in a burst); more get 429
    /// with `Retry-After`. 0: no limit.
    pub http_requests_per_second: f64,
    /// Messages a second one user may send (over all its connections; as many in a burst);
    /// a faster sender is slowed down, not refused. 0: no limit.
    pub messages_per_second_per_user: f64,
    /// Time a client has to complete the HTTP upgrade.
    #[serde(deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// Delay before the `connect` frame when the client has not sent anything yet (see
    /// `docs/protocol.md`, "Welcome timing").
    #[serde(deserialize_with = "duration")]
    pub welcome_delay: Duration,
    /// Channels one (protocol 2) connection may receive on.
    pub max_channels_per_connection: usize,
    /// Frames queued towards one connection before it counts as slow.
    pub outgoing_queue: usize,
    /// Bytes of forwarded messages queued towards one connection before it counts as slow.
    pub outgoing_queue_bytes: usize,
    /// How long a sender waits for a receiver whose queue is full (flow control) before the
    /// receiver counts as slow.
    #[serde(deserialize_with = "duration")]
    pub slow_receiver_timeout: Duration,
    /// What happens to a slow receiver.
    pub slow_receiver: SlowReceiverPolicy,
    /// Interval of server pings (0 = none).
    #[serde(deserialize_with = "duration")]
    pub ping_interval: Duration,
    /// A connection silent (no frame, no pong) for this long is dropped.
    #[serde(deserialize_with = "duration")]
    pub dead_peer_timeout: Duration,
    /// On SIGTERM/SIGINT, how long to wait for queued frames to be flushed.
    #[serde(deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    /// A write to a client that does not finish within this drops the connection.
    #[serde(deserialize_with = "duration")]
    pub write_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8888".into(),
            path: "/".into(),
            number_of_receiver: 0,
            max_message_bytes: 1024 * 1024,
            max_connections: 10_000,
            max_pending_connections: 512,
            max_connections_per_address: 64,
            trusted_proxies: vec![
                std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ],
            auth_fail_delay: Duration::from_secs(1),
            auth_fail_delay_max: Duration::from_secs(30),
            auth_ban_after: 10,
            auth_ban_window: Duration::from_secs(600),
            auth_ban_for: Duration::from_secs(900),
            http_requests_per_second: 50.0,
            messages_per_second_per_user: 0.0,
            handshake_timeout: Duration::from_secs(10),
            welcome_delay: Duration::from_millis(100),
            max_channels_per_connection: 64,
            outgoing_queue: 1024,
            outgoing_queue_bytes: 16 * 1024 * 1024,
            slow_receiver_timeout: Duration::from_secs(5),
            slow_receiver: SlowReceiverPolicy::Disconnect,
            ping_interval: Duration::from_secs(30),
            dead_peer_timeout: Duration::from_secs(75),
            shutdown_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// `[credentials]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CredentialsConfig {
    /// htpasswd files.
    pub files: Vec<PathBuf>,
    /// htpasswd lines given inline.
    pub lines: Vec<String>,
    /// How often the files are checked for changes (0 = only on SIGHUP).
    #[serde(deserialize_with = "duration")]
    pub reload_interval: Duration,
    /// bcrypt checks allowed to run at once.
    pub bcrypt_concurrency: usize,
}

impl Default for CredentialsConfig {
    fn default() -> Self {
        CredentialsConfig {
            files: Vec::new(),
            lines: Vec::new(),
            reload_interval: Duration::from_secs(2),
            bcrypt_concurrency: 1,
        }
    }
}

impl Config {
    /// Parses TOML text.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        wsmb_common::from_toml(text, path)
    }

    /// Loads `path`, or the default path when it exists, or the embedded defaults.
    pub fn load(path: Option<&Path>) -> Result<(Config, Origin), ConfigError> {
        let (mut c, origin): (Config, Origin) = wsmb_common::load(path, DEFAULT_CONFIG_PATH)?;
        if let Origin::File(p) = &origin {
            c.path = Some(p.clone());
        }
        Ok((c, origin))
    }

    /// The `[permissions]` of the config file `path`, read again (users reloaded), checked.
    pub fn reload_permissions(
        path: &Path,
    ) -> Result<crate::auth::permissions::PermissionsConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Io {
            path: path.to_owned(),
            err,
        })?;
        let c = Config::from_toml(&text, path)?;
        c.permissions
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(c.permissions)
    }

    /// Applies secrets from the environment (`WSMB_CREDENTIALS`, `WSMB_DATABASE_PASSWORD`).
    /// `get` abstracts `std::env`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(p) = get(ENV_DB_PASSWORD) {
            self.storage.password = p;
        }
        if let Some(k) = get(ENV_WEBHOOK_KEY).filter(|k| !k.is_empty()) {
            self.sms.webhook_signing_key = k;
        }
        if let Some(lines) = get(ENV_CREDENTIALS) {
            self.credentials.lines = lines
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
        }
    }

    /// Checks every value; the message names the key and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        self.permissions
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.tls.enabled()
            && (self.tls.cert_file.as_os_str().is_empty()
                || self.tls.key_file.as_os_str().is_empty())
        {
            return bad(
                "[tls] needs both cert_file and key_file (PEM files), or neither for plain ws://"
                    .into(),
            );
        }
        if s.listen.parse::<SocketAddr>().is_err() {
            return bad(format!(
                "server.listen = {:?} is not an IP address and port; write e.g. \"0.0.0.0:8888\" \
                 or \"[::]:8888\"",
                s.listen
            ));
        }
        if !s.path.starts_with('/') || s.path.contains(['?', '#', ' ']) {
            return bad(format!(
                "server.path = {:?} must be an absolute URL path such as \"/\" or \"/ws\"",
                s.path
            ));
        }
        let m = &self.metrics.path;
        if !m.is_empty() && (!m.starts_with('/') || *m == s.path || m == HEALTH_PATH) {
            return bad(format!(
                "metrics.path = {m:?} must start with / and differ from server.path and \
                 {HEALTH_PATH}; empty turns the metrics off"
            ));
        }
        let p = &self.status.path;
        if !p.is_empty()
            && (!p.starts_with('/')
                || p.len() < 2
                || p.ends_with('/')
                || !p
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/-_.".contains(c))
                || p.contains("//")
                || p.contains("/.")
                || *p == s.path
                || p == HEALTH_PATH
                || p == m
                || p.starts_with(API_PREFIX))
        {
            return bad(format!(
                "status.path = {p:?} must be a path such as \"/status\" (letters, digits, - _ . \
                 and /, not ending in /), \
                 other than server.path, metrics.path, {HEALTH_PATH} and the HTTP API's \
                 {API_PREFIX}; empty turns the status page off"
            ));
        }
        if s.path == HEALTH_PATH {
            return bad(format!(
                "server.path cannot be {HEALTH_PATH:?}: it is the health check"
            ));
        }
        const MIN_MSG: usize = 1024;
        const MAX_MSG: usize = 64 * 1024 * 1024;
        if !(MIN_MSG..=MAX_MSG).contains(&s.max_message_bytes) {
            return bad(format!(
                "server.max_message_bytes = {} is out of range; use {MIN_MSG} to {MAX_MSG}",
                s.max_message_bytes
            ));
        }
        if s.max_connections == 0 {
            return bad("server.max_connections must be at least 1".into());
        }
        if s.max_pending_connections == 0 || s.max_connections_per_address == 0 {
            return bad(
                "server.max_pending_connections and server.max_connections_per_address must be \
                 at least 1"
                    .into(),
            );
        }
        if !(s.http_requests_per_second >= 0.0 && s.messages_per_second_per_user >= 0.0) {
            return bad(
                "server.http_requests_per_second and server.messages_per_second_per_user must be \
                 0 (no limit) or more"
                    .into(),
            );
        }
        if s.max_channels_per_connection == 0 {
            return bad("server.max_channels_per_connection must be at least 1".into());
        }
        if s.outgoing_queue == 0 {
            return bad("server.outgoing_queue must be at least 1".into());
        }
        if s.outgoing_queue_bytes < s.max_message_bytes {
            return bad(format!(
                "server.outgoing_queue_bytes ({}) must be at least server.max_message_bytes ({}), \
                 or the largest message could never be delivered",
                s.outgoing_queue_bytes, s.max_message_bytes
            ));
        }
        if s.handshake_timeout.is_zero() {
            return bad("server.handshake_timeout must be more than 0s".into());
        }
        if s.welcome_delay > Duration::from_millis(250) {
            return bad(format!(
                "server.welcome_delay = {:?} is too long: clients that wait for `connect` must get \
                 it within 250ms; use 0ms to 250ms",
                s.welcome_delay
            ));
        }
        if !s.ping_interval.is_zero() && s.dead_peer_timeout <= s.ping_interval {
            return bad(format!(
                "server.dead_peer_timeout ({:?}) must be longer than server.ping_interval ({:?}), \
                 or a live peer could be dropped before it can answer a ping",
                s.dead_peer_timeout, s.ping_interval
            ));
        }
        let st = &self.storage;
        if st.prefix.len() > 32
            || !st
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return bad(format!(
                "storage.prefix = {:?} may hold only letters, digits and _ (at most 32)",
                st.prefix
            ));
        }
        match st.backend {
            Backend::Mysql
                if !st.url.starts_with("mysql://") && !st.url.starts_with("mariadb://") =>
            {
                return bad(format!(
                    "storage.url = {:?}: the mysql backend needs mysql://USER@HOST:3306/DATABASE",
                    st.url
                ));
            }
            Backend::Postgres
                if !st.url.starts_with("postgres://") && !st.url.starts_with("postgresql://") =>
            {
                return bad(format!(
                    "storage.url = {:?}: the postgres backend needs postgres://USER@HOST:5432/DATABASE",
                    st.url
                ));
            }
            Backend::Sqlite if st.path.as_os_str().is_empty() => {
                return bad(
                    "storage.path is empty: give the SQLite file, e.g. /var/lib/wsmb/broker.sqlite"
                        .into(),
                );
            }
            _ => {}
        }
        if st.limit == 0 || st.window == 0 || st.max_window < st.window || st.commit_batch == 0 {
            return bad(
                "storage.limit, storage.window and storage.commit_batch must be at least 1, and \
                 storage.max_window at least storage.window"
                    .into(),
            );
        }
        if st.ack_timeout.is_zero() {
            return bad("storage.ack_timeout must be more than 0s".into());
        }
        if st.commit_timeout.is_zero() || s.write_timeout.is_zero() {
            return bad(
                "storage.commit_timeout and server.write_timeout must be more than 0s".into(),
            );
        }
        if st.max_channels == 0 {
            return bad("storage.max_channels must be at least 1".into());
        }
        if st.node.is_empty()
            || st.node.len() > 64
            || !st
                .node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return bad(format!(
                "storage.node = {:?} must be 1 to 64 letters, digits, '-', '_' or '.'",
                st.node
            ));
        }
        let sms = &self.sms;
        let channel_ok = |c: &str| !c.is_empty() && c.len() <= 100;
        if !channel_ok(&sms.jobs_channel)
            || !channel_ok(&sms.status_channel)
            || !channel_ok(&sms.inbox_channel)
        {
            return bad(
                "sms.jobs_channel, sms.status_channel and sms.inbox_channel must be 1 to 100 bytes"
                    .into(),
            );
        }
        if sms.jobs_channel == sms.status_channel
            || sms.inbox_channel == sms.jobs_channel
            || sms.inbox_channel == sms.status_channel
        {
            return bad(
                "sms.jobs_channel, sms.status_channel and sms.inbox_channel must differ".into(),
            );
        }
        if !(1..=255).contains(&sms.max_parts) {
            return bad(format!(
                "sms.max_parts = {} must be 1 to 255",
                sms.max_parts
            ));
        }
        if sms.max_recipients == 0 || sms.max_messages == 0 {
            return bad("sms.max_recipients and sms.max_messages must be at least 1".into());
        }
        if !(1024..=16 * 1024 * 1024).contains(&sms.max_body_bytes) {
            return bad(format!(
                "sms.max_body_bytes = {} is out of range; use 1024 to 16777216",
                sms.max_body_bytes
            ));
        }
        if sms.webhook_timeout.is_zero() || sms.webhook_retry_initial.is_zero() {
            return bad(
                "sms.webhook_timeout and sms.webhook_retry_initial must be more than 0s".into(),
            );
        }
        if sms.webhook_retry_max < sms.webhook_retry_initial {
            return bad("sms.webhook_retry_max must be at least sms.webhook_retry_initial".into());
        }
        if !sms.webhook_ca_file.as_os_str().is_empty() {
            wsmb_common::tls::trust_store(&sms.webhook_ca_file, "sms.webhook_ca_file")
                .map_err(ConfigError::Invalid)?;
        }
        if self.credentials.bcrypt_concurrency == 0 {
            return bad("credentials.bcrypt_concurrency must be at least 1".into());
        }
        self.log.validate()
    }

    /// The listen address (valid after [`Config::validate`]).
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "server.listen = {:?} is not valid",
                self.server.listen
            ))
        })
    }

    /// The credential sources this config names.
    pub fn credential_sources(&self) -> CredentialSources {
        CredentialSources {
            files: self.credentials.files.clone(),
            lines: self
                .credentials
                .lines
                .iter()
                .enumerate()
                .map(|(i, l)| (format!("credentials.lines[{i}]"), l.clone()))
                .collect(),
        }
    }

    /// Authentication tuning from this config.
    pub fn auth_tuning(&self) -> AuthTuning {
        AuthTuning {
            bcrypt_concurrency: self.credentials.bcrypt_concurrency,
            ..AuthTuning::default()
        }
    }
}

/// The health-check path, answered on the broker's port.
pub const HEALTH_PATH: &str = "/healthz";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().expect("valid");
    }

    #[test]
    fn example_file_documents_every_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/broker.example.toml");
        let text = std::fs::read_to_string(&path).expect("deploy/broker.example.toml");
        let parsed = Config::from_toml(&text, &path).expect("example parses");
        // The example sets every key to its default (credentials aside, which it fills in).
        let mut expected = Config::default();
        expected.credentials.files = parsed.credentials.files.clone();
        expected.credentials.lines = parsed.credentials.lines.clone();
        expected.storage.url = parsed.storage.url.clone();
        // ...and the rules of the two users of a deployment (docs/deploy.md).
        expected.permissions.users = parsed.permissions.users.clone();
        assert_eq!(parsed, expected);
        use crate::auth::permissions::Action;
        let p = &parsed.permissions;
        assert!(p.allows("agent", Action::Receive, "sms"));
        assert!(p.allows("agent", Action::Send, "sms-status"));
        assert!(p.allows("agent", Action::Send, "sms-inbox"));
        assert!(!p.allows("agent", Action::Send, "sms"));
        assert!(p.allows("app", Action::Send, "sms"));
        assert!(p.allows("app", Action::Receive, "sms-status"));
        assert!(p.allows("app", Action::Receive, "sms-inbox"));
        assert!(!p.allows("app", Action::Receive, "sms"));
        // ...and mentions every key, commented or not.
        for key in [
            "listen",
            "path",
            "number_of_receiver",
            "max_message_bytes",
            "max_connections",
            "default",
            "access",
            "receive",
            "send",
            "max_pending_connections",
            "max_connections_per_address",
            "trusted_proxies",
            "auth_fail_delay",
            "auth_fail_delay_max",
            "auth_ban_after",
            "auth_ban_window",
            "auth_ban_for",
            "http_requests_per_second",
            "messages_per_second_per_user",
            "handshake_timeout",
            "welcome_delay",
            "outgoing_queue",
            "slow_receiver",
            "ping_interval",
            "dead_peer_timeout",
            "shutdown_timeout",
            "write_timeout",
            "commit_timeout",
            "commit_delay",
            "max_channels",
            "node",
            "files",
            "lines",
            "reload_interval",
            "bcrypt_concurrency",
            "cert_file",
            "key_file",
            "jobs_channel",
            "status_channel",
            "inbox_channel",
            "max_parts",
            "max_recipients",
            "max_body_bytes",
            "max_messages",
            "keep",
            "webhook_signing_key",
            "max_webhooks",
            "webhook_timeout",
            "webhook_retry_initial",
            "webhook_retry_max",
            "webhook_give_up_after",
            "webhook_http_hosts",
            "webhook_ca_file",
            "level",
        ] {
            assert!(text.contains(&format!("{key} =")), "example lacks {key}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let p = Path::new("x.toml");
        let e = Config::from_toml("[server]\nlisten_port = 1\n", p).expect_err("unknown key");
        assert!(e.to_string().contains("listen_port"), "{e}");
        let e = Config::from_toml("[server]\nping_interval = \"often\"\n", p)
            .expect_err("bad duration");
        assert!(e.to_string().contains("not a duration"), "{e}");
        let e = Config::from_toml("[server]\nslow_receiver = \"drop\"\n", p).expect_err("bad enum");
        assert!(
            e.to_string().contains("slow_receiver") || e.to_string().contains("drop"),
            "{e}"
        );

        let mut c = Config::default();
        c.server.listen = "8888".into();
        assert!(
            c.validate()
                .expect_err("listen")
                .to_string()
                .contains("server.listen")
        );
        let mut c = Config::default();
        c.server.path = "ws".into();
        assert!(
            c.validate()
                .expect_err("path")
                .to_string()
                .contains("server.path")
        );
        let mut c = Config::default();
        c.server.dead_peer_timeout = Duration::from_secs(10);
        assert!(
            c.validate()
                .expect_err("dead")
                .to_string()
                .contains("dead_peer_timeout")
        );
        let mut c = Config::default();
        c.server.max_message_bytes = 10;
        assert!(
            c.validate()
                .expect_err("size")
                .to_string()
                .contains("max_message_bytes")
        );
        let mut c = Config::default();
        c.log.level = "loud".into();
        assert!(
            c.validate()
                .expect_err("level")
                .to_string()
                .contains("log.level")
        );
    }

    #[test]
    fn durations_accept_text_and_seconds() {
        let c = Config::from_toml(
            "[server]\nping_interval = 10\ndead_peer_timeout = \"1m 5s\"\nwelcome_delay = \"50ms\"\n",
            Path::new("x"),
        )
        .expect("parse");
        assert_eq!(c.server.ping_interval, Duration::from_secs(10));
        assert_eq!(c.server.dead_peer_timeout, Duration::from_secs(65));
        assert_eq!(c.server.welcome_delay, Duration::from_millis(50));
    }

    #[test]
    fn env_replaces_inline_credentials() {
        let mut c = Config::default();
        c.credentials.lines = vec!["old:{SHA}x".into()];
        c.apply_env(|k| (k == ENV_CREDENTIALS).then(|| "a:{SHA}1\n\n b:{SHA}2 \n".to_owned()));
        assert_eq!(c.credentials.lines, vec!["a:{SHA}1", "b:{SHA}2"]);
        let mut c = Config::default();
        c.apply_env(|_| None);
        assert!(c.credentials.lines.is_empty());
    }

    #[test]
    fn missing_explicit_file_is_an_error_missing_default_is_not() {
        let e = Config::load(Some(Path::new("/nonexistent/broker.toml"))).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/broker.toml"));
    }
}
