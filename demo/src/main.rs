//! `wsmb-demo`: the whole bundle in one process, with no hardware and no external service.
//!
//! `wsmb-demo` starts the broker (embedded SQLite store in a scratch directory), a simulated GSM
//! modem on a pseudo-terminal, the gateway agent on that modem, and a sender that sends one test
//! OTP through the broker. It prints each step as it happens (the broker's acceptance, the PDU
//! the modem was given decoded back to number and text, every status event), then stays up so
//! more can be sent (from PHP, the seed examples, or `wsmb-demo send`) until Ctrl-C.
//!
//! `wsmb-demo send NUMBER TEXT` is the command-line sender: it sends one SMS job to a broker
//! (the demo's by default) and waits for its final status.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use wsmb_agent::sim::{SimConfig, Simulator};
use wsmb_protocol::reply::{BrokerReply, SendResult};
use wsmb_protocol::sms::{Status, StatusEvent};

/// The demo's users: the user of the original WSMessageBrocker examples, so that the seed PHP
/// examples work against the demo unchanged. The demo listens on 127.0.0.1 only.
const HTPASSWD: &str = include_str!("../../deploy/htpasswd.example");
const DEMO_USER: &str = "qa";
const DEMO_PASSWORD: &str = "4lt0@1234";
/// How long the demo waits for each step before saying what is missing.
const STEP: Duration = Duration::from_secs(30);

/// The WSMB bundle in one process: broker, gateway agent, a simulated modem and a sender.
#[derive(Debug, Parser)]
#[command(name = "wsmb-demo", version, about, long_about = None)]
struct Cli {
    /// Where the broker listens (127.0.0.1:0 picks a free port)
    #[arg(long, default_value = "127.0.0.1:8888", value_name = "ADDR:PORT")]
    listen: String,
    /// Directory for the broker's and the agent's state [default: a scratch directory, removed
    /// at exit]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The number the test OTP goes to
    #[arg(long, default_value = "+6281234567890", value_name = "NUMBER")]
    to: String,
    /// Send the test OTP, print what happens, then exit instead of staying up
    #[arg(long)]
    once: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Send one SMS job to a broker and wait for its final status (the password comes from
    /// WSMB_PASSWORD; the demo's by default)
    Send {
        /// Destination number (international +62..., or national with the agent's country code)
        number: String,
        /// The text
        text: String,
        /// The broker
        #[arg(long, default_value = "ws://127.0.0.1:8888/")]
        url: String,
        /// The broker user
        #[arg(long, default_value = DEMO_USER)]
        user: String,
        /// The job's id [default: cli-<time>]
        #[arg(long)]
        id: Option<String>,
        /// How long to wait for the final status
        #[arg(long, default_value = "60", value_name = "SECONDS")]
        wait: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    wsmb_common::init_logging(&wsmb_common::LogConfig {
        level: "warn".into(),
        ..Default::default()
    });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsmb-demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Some(Cmd::Send {
            ref number,
            ref text,
            ref url,
            ref user,
            ref id,
            wait,
        }) => {
            let password =
                std::env::var("WSMB_PASSWORD").unwrap_or_else(|_| DEMO_PASSWORD.to_owned());
            let id = id
                .clone()
                .unwrap_or_else(|| format!("cli-{}", now_millis()));
            rt.block_on(send_one(
                url,
                user,
                &password,
                &id,
                number,
                text,
                Duration::from_secs(wait),
            ))
        }
        None => rt.block_on(demo(&cli)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsmb-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn now_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

/// The scratch directory, removed when dropped (unless the user gave one).
struct StateDir {
    path: PathBuf,
    remove: bool,
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn state_dir(given: Option<&Path>) -> anyhow::Result<StateDir> {
    let (path, remove) = match given {
        Some(p) => (p.to_path_buf(), false),
        None => (
            std::env::temp_dir().join(format!("wsmb-demo-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&path)
        .with_context(|| format!("cannot create the state directory {}", path.display()))?;
    Ok(StateDir { path, remove })
}

async fn demo(cli: &Cli) -> anyhow::Result<()> {
    let dir = state_dir(cli.state_dir.as_deref())?;
    let htpasswd = dir.path.join("htpasswd");
    std::fs::write(&htpasswd, HTPASSWD)
        .with_context(|| format!("cannot write {}", htpasswd.display()))?;

    // The broker, on embedded SQLite.
    let mut bcfg = wsmb_broker::Config::default();
    bcfg.server.listen = cli.listen.clone();
    bcfg.credentials.files = vec![htpasswd];
    bcfg.storage.backend = wsmb_broker::config::Backend::Sqlite;
    bcfg.storage.path = dir.path.join("broker.sqlite");
    bcfg.validate()?;
    let listener = tokio::net::TcpListener::bind(bcfg.listen_addr()?)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is a broker or another demo running? \
                 use --listen 127.0.0.1:0 for any free port)",
                cli.listen
            )
        })?;
    let broker = wsmb_broker::start_on(listener, bcfg).await?;
    let addr = broker.addr;
    let url = format!("ws://{addr}/");
    println!("WSMB demo: broker, gateway agent and a simulated GSM modem in one process");
    println!(
        "broker  listening on {url} (SQLite store {}; user {DEMO_USER}, password {DEMO_PASSWORD})",
        dir.path.join("broker.sqlite").display()
    );

    // The modem, on a pseudo-terminal.
    // The simulated network reports every SMS delivered, as a real one does when asked.
    let sim_cfg = SimConfig {
        delivery_report: Some(0x00),
        ..SimConfig::default()
    };
    let model = format!("{}, {}", sim_cfg.model, sim_cfg.operator);
    let sim = Simulator::start(dir.path.join("modem"), sim_cfg)
        .await
        .context("cannot start the modem simulator (a pseudo-terminal)")?;
    println!(
        "modem   simulated modem ({model}) at {}",
        sim.path().display()
    );

    // The agent, on that modem.
    let mut acfg = wsmb_agent::config::Config::default();
    acfg.broker.url = url.clone();
    acfg.broker.user = DEMO_USER.into();
    acfg.broker.password = DEMO_PASSWORD.into();
    acfg.agent.state_dir = dir.path.join("agent");
    acfg.agent.country_code = "62".into();
    acfg.agent.status_report = true;
    acfg.modems = vec![wsmb_agent::config::ModemConfig {
        name: "sim1".into(),
        device: sim.path().to_path_buf(),
        ..Default::default()
    }];
    acfg.validate()?;
    let agent = wsmb_agent::agent::start(acfg).await?;
    wait_agent(&agent).await?;
    println!("agent   connected to the broker; modem sim1 registered (Telkomsel), ready");

    // The sender: one connection that receives sms-status and sends on sms (protocol 2).
    let mut app = App::connect(&url, DEMO_USER, DEMO_PASSWORD).await?;
    let code = format!("{:06}", random_u32() % 1_000_000);
    let id = format!("otp-demo-{}", now_millis());
    let text = format!("Your WSMB demo code is {code}. It expires in 5 minutes.");
    println!("sender  sending OTP {id} to {}: \"{text}\"", cli.to);
    let accepted = app.send(&id, &cli.to, &text).await?;
    println!("broker  {accepted}");

    let hint = format!(
        "ready   send another: `cargo run -q -p wsmb-demo -- send --url {url} +6281234567890 \"Hello\"`, \
         or from PHP: `WSMB_URL={url} WSMB_PASSWORD={DEMO_PASSWORD} php clients/php/examples/send-otp.php +6281234567890`; Ctrl-C stops the demo"
    );
    let mut pdus_seen = 0;
    let mut messages_seen = 0;
    let mut hinted = false;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            all = sim.wait_messages(messages_seen + 1, Duration::from_secs(3600)) => {
                messages_seen = all.len();
                let sent = sim.sent();
                for p in sent.iter().skip(pdus_seen) {
                    print_pdu(p);
                }
                pdus_seen = sent.len();
            }
            ev = app.next_status() => {
                let ev = ev?;
                println!("status  {}", describe(&ev));
                // The demo's OTP goes as far as its delivery report.
                if ev.id == id && ev.status != Status::Sent && is_final(ev.status) && !hinted {
                    hinted = true;
                    if ev.status != Status::Delivered {
                        bail!("the test OTP was not delivered: {}", describe(&ev));
                    }
                    println!("{hint}");
                    println!(
                        "status  page http://{addr}/status (user {DEMO_USER}, password \
                         {DEMO_PASSWORD}): the gateway, its modem, the SMS and a live chart"
                    );
                    if cli.once {
                        break;
                    }
                }
            }
        }
    }
    println!("stopping");
    agent.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), agent.task).await;
    broker.shared.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), broker.task).await;
    sim.disappear();
    drop(dir);
    Ok(())
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // A clock fallback is good enough for a demo code.
    if getrandom::fill(&mut b).is_err() {
        return (now_millis() % 1_000_000) as u32;
    }
    u32::from_le_bytes(b)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn wait_agent(agent: &wsmb_agent::agent::Running) -> anyhow::Result<()> {
    let mut link = agent.link.clone();
    let ready = async {
        link.wait_for(|s| matches!(s, wsmb_agent::link::LinkState::Up))
            .await
            .ok();
        for m in &agent.modems {
            let mut h = m.watch();
            h.wait_for(|h| h.is_ready()).await.ok();
        }
    };
    if tokio::time::timeout(STEP, ready).await.is_err() {
        let link = agent.link.borrow().clone();
        let modems: Vec<String> = agent
            .modems
            .iter()
            .map(|m| format!("{}: {:?}", m.name, m.health()))
            .collect();
        bail!(
            "the agent was not ready within {STEP:?}: link {link:?}, modems {}",
            modems.join(", ")
        );
    }
    Ok(())
}

fn print_pdu(p: &wsmb_agent::sim::SentPdu) {
    println!(
        "modem   given AT+CMGS={} with PDU {}",
        p.declared_len, p.hex
    );
    match &p.submit {
        Some(s) => {
            let part = match s.concat {
                Some((_, total, seq)) => format!(", part {seq} of {total}"),
                None => String::new(),
            };
            let coding = match s.encoding {
                wsmb_agent::pdu::Encoding::Gsm7 => "GSM 7-bit",
                wsmb_agent::pdu::Encoding::Ucs2 => "UCS-2",
            };
            println!(
                "modem   decoded: to {}, {coding}{part}: \"{}\"",
                s.number, s.text
            );
        }
        None => println!("modem   (the PDU did not decode as an SMS-SUBMIT)"),
    }
}

/// Nothing more will come for the job, except a delivery report after `sent` when one was
/// asked for.
fn is_final(s: Status) -> bool {
    matches!(
        s,
        Status::Sent | Status::Delivered | Status::Failed | Status::Expired
    )
}

fn describe(ev: &StatusEvent) -> String {
    let status = serde_json::to_value(ev.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut out = format!("{}: {status}", ev.id);
    if let Some(r) = &ev.receiver {
        out.push_str(&format!(" to {r}"));
    }
    if let Some(state) = &ev.modem_state {
        out.push_str(&format!(" {state}"));
    } else if let Some(m) = &ev.modem {
        out.push_str(&format!(" via {m}"));
    }
    if let Some(p) = ev.parts {
        out.push_str(&format!(", {p} part(s)"));
    }
    if !ev.message_references.is_empty() {
        out.push_str(&format!(
            ", message reference(s) {:?}",
            ev.message_references
        ));
    }
    if let Some(c) = &ev.error_code {
        out.push_str(&format!(", error {c}"));
    }
    if let Some(r) = &ev.reason {
        out.push_str(&format!(": {r}"));
    }
    if ev.ambiguous {
        out.push_str(" (ambiguous: it may have gone out)");
    }
    out
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An application's connection: receives `sms-status`, sends on `sms`.
struct App {
    ws: Ws,
    pending: std::collections::VecDeque<StatusEvent>,
}

impl App {
    async fn connect(url: &str, user: &str, password: &str) -> anyhow::Result<App> {
        use base64::Engine as _;
        let mut req = url
            .into_client_request()
            .with_context(|| format!("{url:?} is not a ws:// URL"))?;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        req.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Basic {token}"))?,
        );
        let (mut ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(req))
            .await
            .with_context(|| format!("no answer from the broker at {url} within {STEP:?}"))?
            .with_context(|| format!("cannot connect to the broker at {url}"))?;
        let welcome = next_text(&mut ws).await?;
        match BrokerReply::parse(&welcome).and_then(|r| r.code()) {
            Some(wsmb_protocol::codes::ResponseCode::Accepted) => {}
            _ => bail!("the broker refused user {user:?}: {welcome}"),
        }
        ws.send(Message::text(
            r#"{"command":"receive-message","channel":"sms-status","protocol":2}"#,
        ))
        .await?;
        Ok(App {
            ws,
            pending: Default::default(),
        })
    }

    /// Sends one job; returns the broker's acceptance in words.
    async fn send(&mut self, id: &str, number: &str, text: &str) -> anyhow::Result<String> {
        let frame = serde_json::json!({
            "command": "send-message",
            "channel": "sms",
            "number_of_receiver": 1,
            "data": [{
                "id": id,
                "time": now_millis() / 1000,
                "receiver": number,
                "message": text,
            }],
        });
        self.ws.send(Message::text(frame.to_string())).await?;
        loop {
            let t = tokio::time::timeout(STEP, next_text(&mut self.ws))
                .await
                .context("no send-result from the broker")??;
            match BrokerReply::parse(&t) {
                Some(r) if r.command == "send-result" => {
                    let code = r.response_code.clone();
                    let res: Option<SendResult> = r.first();
                    let Some(res) = res else {
                        bail!("unexpected send-result: {t}")
                    };
                    if code != "00" && code != "02" {
                        bail!("the broker did not take the job (code {code}): {t}");
                    }
                    return Ok(format!(
                        "accepted {id}: message_id {}, {} (code {code}: {})",
                        res.message_id,
                        match (res.stored, res.receivers) {
                            (Some(true), 0) => "stored until an agent takes it".to_owned(),
                            (Some(true), n) => format!("stored, handed to {n} agent(s)"),
                            (_, n) => format!("handed to {n} agent(s)"),
                        },
                        r.response_text
                    ));
                }
                Some(r) if r.command == "error" => bail!("the broker refused the job: {t}"),
                Some(_) => {}
                None => self.pending.extend(events_of(&t)),
            }
        }
    }

    /// The next status event (waits as long as it takes; the caller bounds it).
    async fn next_status(&mut self) -> anyhow::Result<StatusEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            let t = next_text(&mut self.ws).await?;
            if BrokerReply::parse(&t).is_none() {
                // The agent's heartbeats are for the broker's status page, not for the sender.
                self.pending.extend(
                    events_of(&t)
                        .into_iter()
                        .filter(|e| e.status != Status::Heartbeat),
                );
            }
        }
    }
}

fn events_of(frame: &str) -> Vec<StatusEvent> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(frame) else {
        return Vec::new();
    };
    v.get("data")
        .and_then(|d| d.as_array())
        .map(|items| {
            items
                .iter()
                .filter_map(|i| serde_json::from_value(i.clone()).ok())
                .collect()
        })
        .unwrap_or_default()
}

async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
            Some(Ok(Message::Close(c))) => bail!("the broker closed the connection: {c:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("connection to the broker lost: {e}"),
            None => bail!("connection to the broker lost"),
        }
    }
}

/// `wsmb-demo send`: one job, then its final status.
async fn send_one(
    url: &str,
    user: &str,
    password: &str,
    id: &str,
    number: &str,
    text: &str,
    wait: Duration,
) -> anyhow::Result<()> {
    let mut app = App::connect(url, user, password).await?;
    println!("{}", app.send(id, number, text).await?);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let ev = tokio::time::timeout_at(deadline, app.next_status())
            .await
            .with_context(|| {
                format!("no final status for {id} within {wait:?} (is an agent connected?)")
            })??;
        if ev.id != id {
            continue;
        }
        println!("{}", describe(&ev));
        if is_final(ev.status) {
            if ev.status == Status::Sent {
                return Ok(());
            }
            bail!("{id} was not sent");
        }
    }
}
