//! Command line: `wsmb-agent run | probe | send NUMBER TEXT | check-config`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{Config, ENV_PASSWORD, ModemConfig};
use crate::modem::{self, Health, PartOutcome};
use crate::pdu::{self, Address, SubmitOptions};

/// WSMB gateway agent: sends the broker's SMS jobs through GSM modems.
#[derive(Debug, Parser)]
#[command(name = "wsmb-agent", version, about, long_about = None)]
pub struct Cli {
    /// Config file [default: /etc/wsmb/agent.toml when it exists, else embedded defaults]
    #[arg(short, long, value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,
    /// Broker URL, overriding broker.url (ws://HOST:PORT/ or wss://HOST/)
    #[arg(long, value_name = "URL", global = true)]
    pub broker: Option<String>,
    /// Broker user, overriding broker.user (the password comes from WSMB_PASSWORD)
    #[arg(long, value_name = "NAME", global = true)]
    pub user: Option<String>,
    /// Jobs channel, overriding broker.channel
    #[arg(long, value_name = "NAME", global = true)]
    pub channel: Option<String>,
    /// One modem at this device, replacing the [[modem]] list
    #[arg(long, value_name = "PATH", global = true)]
    pub device: Option<PathBuf>,
    /// State directory (job queue), overriding agent.state_dir
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// Log filter, overriding log.level
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
    /// Run the agent (the default)
    Run,
    /// Show each modem's model, IMEI, SIM state, operator, signal and registration
    Probe,
    /// Send one SMS now through the first modem, and print the outcome
    Send {
        /// Destination number (+628123456789 or national)
        number: String,
        /// Text
        text: String,
    },
    /// Check the configuration, print a summary and exit (non-zero when something is wrong)
    CheckConfig,
}

/// Loads the config, applies WSMB_PASSWORD and the flags.
pub fn effective_config(cli: &Cli) -> anyhow::Result<(Config, String)> {
    let (mut c, origin) = Config::load(cli.config.as_deref())?;
    if let Ok(p) = std::env::var(ENV_PASSWORD) {
        c.broker.password = p;
    }
    if let Some(v) = &cli.broker {
        c.broker.url = v.clone();
    }
    if let Some(v) = &cli.user {
        c.broker.user = v.clone();
    }
    if let Some(v) = &cli.channel {
        c.broker.channel = v.clone();
    }
    if let Some(d) = &cli.device {
        let base = c.modems.first().cloned().unwrap_or_default();
        c.modems = vec![ModemConfig {
            device: d.clone(),
            ..base
        }];
    }
    if let Some(d) = &cli.state_dir {
        c.agent.state_dir = d.clone();
    }
    if let Some(l) = &cli.log_level {
        c.log.level = l.clone();
    }
    if let Some(f) = &cli.log_format {
        c.log.format = f.parse().map_err(anyhow::Error::msg)?;
    }
    c.fill_names();
    Ok((c, origin.to_string()))
}

/// Entry point of the `wsmb-agent` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let (cfg, origin) = match effective_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wsmb-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = cfg.validate() {
        eprintln!("wsmb-agent: {e}");
        return ExitCode::from(2);
    }
    let cmd = cli.command.unwrap_or(Cmd::Run);
    if let Cmd::CheckConfig = cmd {
        return check_config(&cfg, &origin);
    }
    wsmb_common::init_logging(&cfg.log);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsmb-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cmd {
            Cmd::Run => {
                tracing::info!(
                    "wsmb-agent {} starting; config: {origin}",
                    env!("CARGO_PKG_VERSION")
                );
                crate::agent::run(cfg, stop_signal())
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Cmd::Probe => Ok(probe(&cfg).await),
            Cmd::Send { number, text } => Ok(send(&cfg, &number, &text).await),
            Cmd::CheckConfig => Ok(ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wsmb-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => tracing::info!("SIGTERM received"),
                _ = i.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => std::future::pending().await,
    }
}

fn check_config(cfg: &Config, origin: &str) -> ExitCode {
    println!("config: {origin}");
    println!(
        "broker: {} as {:?} (password {}), jobs on {:?}, status on {:?}",
        cfg.broker.url,
        cfg.broker.user,
        if cfg.broker.password.is_empty() {
            "EMPTY: set WSMB_PASSWORD"
        } else {
            "set"
        },
        cfg.broker.channel,
        cfg.broker.status_channel
    );
    println!("state: {}", cfg.agent.state_dir.display());
    for m in &cfg.modems {
        let exists = m.device.exists();
        println!(
            "modem {}: {} ({}), group {:?}, limits {}",
            m.name,
            m.device.display(),
            if exists { "present" } else { "NOT FOUND now" },
            m.group,
            limits(m)
        );
    }
    for r in &cfg.routes {
        println!("route {:?} -> group {:?}", r.prefixes, r.group);
    }
    if let Ok(Some(w)) = crate::quiet::Window::parse(&cfg.agent.quiet_hours) {
        println!("{}", crate::quiet::describe(&w, &cfg.agent.quiet_hours));
    }
    println!("configuration OK");
    ExitCode::SUCCESS
}

/// A modem's sending limits in words: "10/min, 500/day" or "none".
fn limits(m: &crate::config::ModemConfig) -> String {
    let l: Vec<String> = [
        (m.rate_per_minute, "min"),
        (m.rate_per_hour, "hour"),
        (m.rate_per_day, "day"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, per)| format!("{n}/{per}"))
    .collect();
    if l.is_empty() {
        "none".into()
    } else {
        l.join(", ")
    }
}

async fn probe(cfg: &Config) -> ExitCode {
    let mut ok = true;
    for m in &cfg.modems {
        println!("== {} ({})", m.name, m.device.display());
        let s = m.settings();
        let mut at = match modem::open_port(&s) {
            Ok(at) => at,
            Err(e) => {
                println!("error: {e}");
                ok = false;
                continue;
            }
        };
        match modem::prepare(&mut at, &s).await {
            Ok(()) => {
                // A freshly unlocked SIM needs a moment to register: give it a few seconds so
                // the report shows the settled state.
                let mut quick = s.clone();
                quick.registration_timeout = s.registration_timeout.min(Duration::from_secs(10));
                let _ = modem::wait_registration(&mut at, &quick).await;
            }
            Err(e) => {
                println!("initialisation: {e}");
                if matches!(e, modem::InitError::Retry(_)) {
                    ok = false;
                    continue;
                }
            }
        }
        match modem::probe(&mut at, s.command_timeout).await {
            Ok(info) => println!("{info}"),
            Err(e) => {
                println!("error: {e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn send(cfg: &Config, number: &str, text: &str) -> ExitCode {
    let number = match crate::jobs::normalize_number(number, &cfg.agent) {
        Ok(n) => n,
        Err(r) => {
            eprintln!("wsmb-agent: {}", r.reason);
            return ExitCode::from(2);
        }
    };
    let (addr, parts) = match Address::parse(&number).and_then(|a| {
        let opts = SubmitOptions {
            status_report: cfg.agent.status_report,
            validity: cfg.validity(),
        };
        let reference = (std::process::id() % 256) as u8;
        pdu::encode_submit(&a, text, reference, opts).map(|p| (a, p))
    }) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("wsmb-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(mc) = cfg.modems.first() else {
        eprintln!("wsmb-agent: no modem configured");
        return ExitCode::from(2);
    };
    let s = mc.settings();
    let wait = s.registration_timeout + Duration::from_secs(30);
    let m = modem::spawn(s);
    let mut w = m.watch();
    let ready = tokio::time::timeout(wait, async {
        loop {
            let h = w.borrow_and_update().clone();
            match h {
                Health::Ready => return Ok(()),
                Health::Stopped(r) => return Err(r),
                Health::Down(r) if !r.contains("initialising") => return Err(r),
                _ => {}
            }
            if w.changed().await.is_err() {
                return Err("modem actor stopped".into());
            }
        }
    })
    .await;
    match ready {
        Ok(Ok(())) => {}
        Ok(Err(r)) => {
            eprintln!("wsmb-agent: modem {}: {r}", mc.name);
            return ExitCode::FAILURE;
        }
        Err(_) => {
            eprintln!("wsmb-agent: modem {} not ready within {wait:?}", mc.name);
            return ExitCode::FAILURE;
        }
    }
    let total = parts.len();
    let mut mrs = Vec::new();
    for p in parts {
        match m.send_part_simple(p.hex, p.tpdu_len).await {
            PartOutcome::Sent { mr } => mrs.push(mr.to_string()),
            PartOutcome::Failed {
                class,
                code,
                reason,
            } => {
                eprintln!(
                    "wsmb-agent: not sent ({class:?}{}): {reason}",
                    code.map(|c| format!(", {c}")).unwrap_or_default()
                );
                return ExitCode::FAILURE;
            }
            PartOutcome::Unavailable(r) => {
                eprintln!("wsmb-agent: modem unavailable: {r}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "sent to {addr} through {}: {total} part(s), message reference(s) {}",
        mc.name,
        mrs.join(", ")
    );
    ExitCode::SUCCESS
}
