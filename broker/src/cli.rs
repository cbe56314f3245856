//! Command line: `wsmb-broker [run]`, `wsmb-broker check-config`, `wsmb-broker passwd`, flags
//! that override the file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::{Config, Origin};

/// WSMB broker: a lightweight WebSocket message broker, wire-compatible with WSMessageBrocker.
#[derive(Debug, Parser)]
#[command(name = "wsmb-broker", version, about, long_about = None)]
pub struct Cli {
    /// Config file [default: /etc/wsmb/broker.toml when it exists, else embedded defaults]
    #[arg(short, long, value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,
    /// Listen on this address, overriding server.listen (e.g. 127.0.0.1:8888)
    #[arg(long, value_name = "ADDR:PORT", global = true)]
    pub listen: Option<String>,
    /// htpasswd file; repeat for several. Replaces credentials.files
    #[arg(long, value_name = "FILE", global = true)]
    pub htpasswd: Vec<PathBuf>,
    /// Storage backend, overriding storage.backend (memory, sqlite, mysql, postgres)
    #[arg(long, value_name = "BACKEND", global = true)]
    pub storage: Option<String>,
    /// Directory for the SQLite store (DIR/broker.sqlite), overriding storage.path
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// Log filter, overriding log.level (error, warn, info, debug, trace)
    #[arg(long, value_name = "FILTER", global = true)]
    pub log_level: Option<String>,
    /// Log format, overriding log.format: text, or json (one object per line, for log shippers)
    #[arg(long, value_name = "FORMAT", global = true,
          value_parser = clap::builder::PossibleValuesParser::new(["text", "json"]))]
    pub log_format: Option<String>,
    /// What to do (default: run)
    #[command(subcommand)]
    pub command: Option<Cmd>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the broker (the default)
    Run,
    /// Check the configuration and the credentials files, print a summary and exit
    /// (non-zero when something is wrong)
    CheckConfig,
    /// Print the key that signs webhook calls (X-Signature), making and storing one when there
    /// is none yet, so that a webhook receiver can be given it
    WebhookKey,
    /// Add a user to an htpasswd file, change its password, or remove it (--delete). The
    /// password is asked for on the terminal, or read from the first line of stdin with
    /// --stdin; never from the command line. The running broker picks the change up.
    Passwd {
        /// The htpasswd file (created, mode 0640, when missing)
        file: PathBuf,
        /// The user name
        user: String,
        /// Remove the user instead
        #[arg(long, short = 'D')]
        delete: bool,
        /// Read the password from the first line of stdin instead of prompting
        #[arg(long)]
        stdin: bool,
        /// Hash with $apr1$ (MD5-crypt) instead of bcrypt, for old setups
        #[arg(long, conflicts_with = "sha")]
        apr1: bool,
        /// Hash with {SHA} (unsalted SHA-1) instead of bcrypt, for very old setups
        #[arg(long)]
        sha: bool,
        /// bcrypt cost (4-31)
        #[arg(long, default_value_t = crate::auth::passwd::DEFAULT_BCRYPT_COST,
              value_parser = clap::value_parser!(u32).range(4..=31))]
        cost: u32,
    },
}

/// Loads the config file, then applies the environment and the flags, then validates.
pub fn effective_config(cli: &Cli) -> anyhow::Result<(Config, Origin)> {
    let (mut config, origin) = Config::load(cli.config.as_deref())?;
    config.apply_env(|k| std::env::var(k).ok());
    if let Some(l) = &cli.listen {
        config.server.listen = l.clone();
    }
    if !cli.htpasswd.is_empty() {
        config.credentials.files = cli.htpasswd.clone();
    }
    if let Some(b) = &cli.storage {
        config.storage.backend = match b.as_str() {
            "memory" => crate::config::Backend::Memory,
            "sqlite" => crate::config::Backend::Sqlite,
            "mysql" | "mariadb" => crate::config::Backend::Mysql,
            "postgres" | "postgresql" => crate::config::Backend::Postgres,
            other => anyhow::bail!("--storage {other:?}: use memory, sqlite, mysql or postgres"),
        };
    }
    if let Some(d) = &cli.state_dir {
        config.storage.path = d.join("broker.sqlite");
    }
    if let Some(l) = &cli.log_level {
        config.log.level = l.clone();
    }
    if let Some(f) = &cli.log_format {
        config.log.format = f.parse().map_err(anyhow::Error::msg)?;
    }
    config.validate()?;
    Ok((config, origin))
}

/// The runtime `builder` makes, or None after saying why it cannot.
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    builder
        .enable_all()
        .build()
        .map_err(|e| eprintln!("wsmb-broker: cannot start the runtime: {e}"))
        .ok()
}

/// Entry point of the `wsmb-broker` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Passwd {
        file,
        user,
        delete,
        stdin,
        apr1,
        sha,
        cost,
    }) = &cli.command
    {
        return passwd(file, user, *delete, *stdin, *apr1, *sha, *cost);
    }
    let (config, origin) = match effective_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wsmb-broker: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Cmd::Run) {
        Cmd::CheckConfig => check_config(&config, &origin),
        Cmd::Passwd { .. } => ExitCode::FAILURE,
        Cmd::WebhookKey => {
            let Some(rt) = runtime(tokio::runtime::Builder::new_current_thread()) else {
                return ExitCode::FAILURE;
            };
            match rt.block_on(crate::sms::show_signing_key(&config)) {
                Ok(k) => {
                    use std::io::Write as _;
                    let _ = writeln!(std::io::stdout(), "{k}");
                    if config.storage.backend == crate::config::Backend::Memory
                        && config.sms.webhook_signing_key.is_empty()
                    {
                        eprintln!(
                            "wsmb-broker: storage.backend = \"memory\" keeps no key: each run \
                             makes its own; set sms.webhook_signing_key or WSMB_WEBHOOK_KEY"
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("wsmb-broker: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run => {
            wsmb_common::init_logging(&config.log);
            let Some(rt) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
                return ExitCode::FAILURE;
            };
            match rt.block_on(run(config, origin)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    eprintln!("wsmb-broker: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check_config(config: &Config, origin: &Origin) -> ExitCode {
    // Written with writeln! so that a closed stdout (`| head`, `| grep -q`) is not a panic.
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    macro_rules! out {
        ($($t:tt)*) => {
            { let _ = writeln!(stdout, $($t)*); }
        };
    }
    out!("config: {origin}");
    out!(
        "listen: {}  path: {}",
        config.server.listen,
        config.server.path
    );
    match config.credential_sources().load() {
        Ok((table, warnings)) => {
            for w in warnings {
                out!("warning: {w}");
            }
            out!("users: {} ({})", table.len(), table.kinds());
            if config.tls.enabled() {
                match crate::tls::load(&config.tls.cert_file, &config.tls.key_file) {
                    Ok(_) => out!("tls: {} OK", config.tls.cert_file.display()),
                    Err(e) => {
                        eprintln!("wsmb-broker: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            out!("configuration OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wsmb-broker: {e}");
            ExitCode::from(2)
        }
    }
}

fn passwd(
    file: &std::path::Path,
    user: &str,
    delete: bool,
    from_stdin: bool,
    apr1: bool,
    sha: bool,
    cost: u32,
) -> ExitCode {
    use crate::auth::passwd::{Change, Outcome, Scheme, apply, check_password};
    let scheme = if apr1 {
        Scheme::Apr1
    } else if sha {
        Scheme::Sha
    } else {
        Scheme::Bcrypt(cost)
    };
    let change = if delete {
        Change::Delete
    } else {
        match read_password(from_stdin, user) {
            Ok(pw) => {
                if let Err(e) = check_password(&pw) {
                    eprintln!("wsmb-broker passwd: {e}");
                    return ExitCode::from(2);
                }
                Change::Set(pw)
            }
            Err(e) => {
                eprintln!("wsmb-broker passwd: {e}");
                return ExitCode::from(2);
            }
        }
    };
    match apply(file, user, &change, scheme) {
        Ok(outcome) => {
            let what = match outcome {
                Outcome::Added => "added",
                Outcome::Changed => "password changed",
                Outcome::Deleted => "deleted",
            };
            println!(
                "{}: user {user:?} {what}; a running broker picks it up within \
                 credentials.reload_interval (or at once: systemctl reload wsmb-broker)",
                file.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wsmb-broker passwd: {e}");
            ExitCode::from(2)
        }
    }
}

/// The new password: the first line of stdin, or typed twice on the terminal without echo.
fn read_password(from_stdin: bool, user: &str) -> anyhow::Result<String> {
    use std::io::{BufRead as _, Read as _};
    if from_stdin {
        let mut line = String::new();
        // At most one line of 4 KiB: a password, not a file.
        std::io::stdin()
            .lock()
            .take(4096)
            .read_line(&mut line)
            .map_err(|e| anyhow::anyhow!("cannot read the password from stdin: {e}"))?;
        let pw = line.strip_suffix('\n').unwrap_or(&line);
        let pw = pw.strip_suffix('\r').unwrap_or(pw);
        return Ok(pw.to_owned());
    }
    let first = rpassword::prompt_password(format!("New password for {user}: ")).map_err(|e| {
        anyhow::anyhow!(
            "cannot prompt for the password ({e}); without a terminal, pipe it in with --stdin"
        )
    })?;
    let again = rpassword::prompt_password("Retype it: ")
        .map_err(|e| anyhow::anyhow!("cannot prompt for the password: {e}"))?;
    if first != again {
        anyhow::bail!("the passwords do not match; nothing changed");
    }
    Ok(first)
}

async fn run(config: Config, origin: Origin) -> anyhow::Result<()> {
    info!(
        "wsmb-broker {} starting; config: {origin}",
        env!("CARGO_PKG_VERSION")
    );
    let addr = config.listen_addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let running = crate::server::start_on(listener, config).await?;
    info!("listening on {}", running.addr);
    spawn_signal_handler(running.shared.shutdown.clone())?;
    wsmb_common::systemd::ready(&format!("listening on {}", running.addr));
    spawn_watchdog(std::sync::Arc::clone(&running.shared), running.addr);
    running.task.await?;
    info!("stopped");
    Ok(())
}

fn spawn_signal_handler(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
        wsmb_common::systemd::stopping();
        token.cancel();
    });
    Ok(())
}

/// Feeds systemd's watchdog (when the unit has `WatchdogSec`) while the broker works: each
/// feed first takes the session registry's lock and reads the counters, so a runtime whose
/// workers are all stuck, or a lock that is never released, stops the feeding and systemd
/// restarts the broker.
fn spawn_watchdog(shared: std::sync::Arc<crate::state::Shared>, addr: std::net::SocketAddr) {
    let Some(every) = wsmb_common::systemd::watchdog_interval() else {
        return;
    };
    info!("systemd watchdog: feeding every {every:?}");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let sessions = shared.sessions.all().len();
            let open = shared
                .stats
                .connections_open
                .load(std::sync::atomic::Ordering::Relaxed);
            wsmb_common::systemd::feed_watchdog();
            wsmb_common::systemd::status(&format!(
                "listening on {addr}; {open} connection(s), {sessions} session(s)"
            ));
        }
    });
}
