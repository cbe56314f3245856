//! One actor per modem, owning its serial port.
//!
//! The actor opens the device, initialises the modem (escape a half-finished `AT+CMGS`, echo
//! off, numeric errors, SIM state and PIN, PDU mode, network registration with a deadline),
//! then serves requests one at a time: send one SMS part, probe. A health check runs when idle.
//! When the port fails, the device disappears or the modem stops answering (a command times out
//! and `AT` does not bring it back), the actor closes the port and starts over, with back-off;
//! requests meanwhile are answered "unavailable" at once, so jobs wait in the queue instead of
//! wedging. SIM trouble (no SIM, wrong PIN, PUK) stops the modem: a wrong PIN is never tried
//! twice, since three wrong PINs lock the SIM.
//!
//! `+CMS`/`+CME` errors are classified by [`classify`] (from 3GPP TS 27.005 and the field
//! notes): transient, permanent, SIM trouble, or ambiguous (the SMS may have gone out).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_serial::SerialPortBuilderExt;
use tracing::{debug, info, warn};
use wsmb_common::problem::{Problem, REMIND_EVERY, Say, human};
use wsmb_protocol::sms::registration_words;

use crate::at::{AtError, AtPort, Final, Response, Stage, SubmitTimeouts};
use crate::pdu::{Deliver, Received, StatusReport, decode_received};

/// How to reach and drive one modem.
#[derive(Debug, Clone)]
pub struct ModemSettings {
    /// Name used in logs, statuses and routing.
    pub name: String,
    /// Device path; prefer a stable `/dev/serial/by-id/...` path.
    pub device: PathBuf,
    /// Baud rate.
    pub baud: u32,
    /// SIM PIN, if the SIM asks for one.
    pub pin: Option<String>,
    /// Extra commands run after the standard initialisation (each must answer OK).
    pub init: Vec<String>,
    /// Deadline of ordinary commands.
    pub command_timeout: Duration,
    /// Deadline from `AT+CMGS=` to the `> ` prompt.
    pub prompt_timeout: Duration,
    /// Deadline from Ctrl-Z to `+CMGS`.
    pub send_timeout: Duration,
    /// How long to wait for network registration.
    pub registration_timeout: Duration,
    /// Idle health check interval.
    pub health_interval: Duration,
    /// Longest wait between two attempts to open the device.
    pub reopen_max: Duration,
    /// How often the modem's storage is read for received SMS whose indication was missed
    /// (also right after it becomes ready).
    pub inbox_sweep: Duration,
}

impl ModemSettings {
    /// Settings with the documented defaults for `device`.
    pub fn new(name: &str, device: impl Into<PathBuf>) -> Self {
        ModemSettings {
            name: name.to_owned(),
            device: device.into(),
            baud: 115_200,
            pin: None,
            init: Vec::new(),
            command_timeout: Duration::from_secs(10),
            prompt_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            registration_timeout: Duration::from_secs(120),
            health_interval: Duration::from_secs(30),
            reopen_max: Duration::from_secs(30),
            inbox_sweep: Duration::from_secs(60),
        }
    }
}

/// What a failure means for the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Try again later, possibly on another modem.
    Transient,
    /// This message will never go through (bad number, barred...): fail the job.
    Permanent,
    /// The SIM is in trouble: the modem stops; the job goes to another modem or waits.
    Sim,
    /// The SMS may already have gone out: re-sending risks a duplicate.
    Ambiguous,
}

/// Classifies an `AT+CMGS` failure.
pub fn classify(stage: Stage, result: Option<&Final>) -> FailureClass {
    use FailureClass::*;
    match result {
        Some(Final::Cms(500)) if stage == Stage::AfterPdu => Ambiguous,
        None if stage == Stage::AfterPdu => Ambiguous,
        Some(Final::Cms(310..=318)) => Sim,
        Some(Final::Cme(10..=13 | 15..=18)) => Sim,
        Some(Final::Cms(
            21 | 27 | 28 | 29 | 30 | 95 | 96 | 97 | 98 | 99 | 195 | 196 | 304 | 305 | 330,
        )) => Permanent,
        _ => Transient,
    }
}

/// The state of a modem, for routing and status pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Opening or initialising.
    Starting,
    /// Registered and answering.
    Ready,
    /// Not usable right now; the actor keeps trying.
    Down(String),
    /// Stopped for SIM trouble; needs a person (wrong PIN, PUK, no SIM).
    Stopped(String),
}

impl Health {
    /// Whether jobs can be sent now.
    pub fn is_ready(&self) -> bool {
        *self == Health::Ready
    }
}

/// The radio side of a ready modem, read when it became ready and again at each idle check
/// (`health_interval`): reported with its `modem` status event and in the agent's heartbeat
/// so that the broker can show it (`GET /3rdparty/v1/devices`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Radio {
    /// `AT+CSQ`, in dBm.
    pub signal_dbm: Option<i32>,
    /// `AT+COPS?` operator name.
    pub operator: Option<String>,
    /// `AT+CREG?` status in words (`registered, home network`).
    pub registration: Option<String>,
}

/// What a modem says about itself (`wsmb-agent probe`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModemInfo {
    /// `AT+CGMI`.
    pub manufacturer: String,
    /// `AT+CGMM`.
    pub model: String,
    /// `AT+CGMR`.
    pub revision: String,
    /// `AT+CGSN`.
    pub imei: String,
    /// `AT+CPIN?`: READY, SIM PIN, SIM PUK...
    pub sim: String,
    /// `AT+COPS?` operator name.
    pub operator: Option<String>,
    /// Signal from `AT+CSQ`, in dBm.
    pub signal_dbm: Option<i32>,
    /// `AT+CREG?` status, in words.
    pub registration: String,
}

impl std::fmt::Display for ModemInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "manufacturer: {}", self.manufacturer)?;
        writeln!(f, "model:        {}", self.model)?;
        writeln!(f, "revision:     {}", self.revision)?;
        writeln!(f, "IMEI:         {}", self.imei)?;
        writeln!(f, "SIM:          {}", self.sim)?;
        writeln!(
            f,
            "operator:     {}",
            self.operator.as_deref().unwrap_or("(none)")
        )?;
        match self.signal_dbm {
            Some(d) => writeln!(f, "signal:       {d} dBm")?,
            None => writeln!(f, "signal:       unknown")?,
        }
        write!(f, "registration: {}", self.registration)
    }
}

/// Something a modem received, handed to the agent.
#[derive(Debug)]
pub enum Incoming {
    /// A part of a received SMS (from `+CMT`, or read from the modem's storage). `stored` is
    /// answered once the agent has it (true: recorded, or known already); only then is it
    /// deleted from the modem.
    Sms {
        /// The modem's name.
        modem: String,
        /// The part.
        sms: Deliver,
        /// Answered when recorded.
        stored: oneshot::Sender<bool>,
    },
    /// A delivery report, from `+CDS` or read from the modem's storage after `+CDSI`.
    /// `stored` is answered once the agent has recorded it (true) or could not (false): only
    /// then is a copy kept by the modem deleted.
    Report {
        /// The modem's name.
        modem: String,
        /// The report.
        report: StatusReport,
        /// Answered when recorded.
        stored: oneshot::Sender<bool>,
    },
}

/// How often an idle modem is read for what it sends on its own (`+CDS`, `+CMTI`, ...).
const URC_POLL: Duration = Duration::from_millis(500);

/// The result of sending one part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartOutcome {
    /// Accepted by the network; the TP-Message-Reference.
    Sent {
        /// `+CMGS: <mr>`.
        mr: u8,
    },
    /// The modem answered with an error or not at all.
    Failed {
        /// How to treat it.
        class: FailureClass,
        /// `+CMS ERROR: 38`, when there was one.
        code: Option<String>,
        /// What happened.
        reason: String,
    },
    /// The modem was not usable; nothing was sent.
    Unavailable(String),
}

/// One part to send, with the hand-shake that lets the caller record "in flight" between the
/// prompt and the PDU.
pub struct PartRequest {
    /// Hex after the prompt.
    pub hex: String,
    /// `AT+CMGS=` length.
    pub tpdu_len: usize,
    /// Signalled when the prompt has arrived.
    pub prompted: oneshot::Sender<()>,
    /// The caller's go-ahead (true) once it has recorded the part as in flight.
    pub go: oneshot::Receiver<bool>,
}

enum Request {
    Part(PartRequest, oneshot::Sender<PartOutcome>),
    Probe(oneshot::Sender<Result<ModemInfo, String>>),
}

/// A handle to a running modem actor.
#[derive(Clone)]
pub struct ModemHandle {
    /// The modem's name.
    pub name: String,
    tx: mpsc::Sender<Request>,
    health: watch::Receiver<Health>,
    radio: watch::Receiver<Radio>,
}

/// What can be read about a modem without being able to ask it anything (see
/// [`ModemHandle::view`]).
#[derive(Clone)]
pub struct ModemView {
    /// The modem's name.
    pub name: String,
    health: watch::Receiver<Health>,
    radio: watch::Receiver<Radio>,
}

impl ModemView {
    /// The current health.
    pub fn health(&self) -> Health {
        self.health.borrow().clone()
    }

    /// Signal, operator and registration as last read.
    pub fn radio(&self) -> Radio {
        self.radio.borrow().clone()
    }
}

impl ModemHandle {
    /// The current health.
    pub fn health(&self) -> Health {
        self.health.borrow().clone()
    }

    /// A receiver that sees every health change.
    pub fn watch(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    /// Signal and operator as read when the modem last became ready (set before its health
    /// turns `Ready`).
    pub fn radio(&self) -> watch::Receiver<Radio> {
        self.radio.clone()
    }

    /// A read-only view of the modem (health and radio) that does not keep its actor
    /// running: the actor stops when the last handle is dropped, whoever still watches it.
    pub fn view(&self) -> ModemView {
        ModemView {
            name: self.name.clone(),
            health: self.health.clone(),
            radio: self.radio.clone(),
        }
    }

    /// Sends one part (see [`PartRequest`]).
    pub async fn send_part(&self, req: PartRequest) -> PartOutcome {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Request::Part(req, tx)).await.is_err() {
            return PartOutcome::Unavailable("modem actor stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| PartOutcome::Unavailable("modem actor stopped".into()))
    }

    /// Sends one part and records nothing between prompt and PDU (for `wsmb-agent send`).
    pub async fn send_part_simple(&self, hex: String, tpdu_len: usize) -> PartOutcome {
        let (prompted, _prompted_rx) = oneshot::channel();
        let (go_tx, go) = oneshot::channel();
        let _ = go_tx.send(true);
        self.send_part(PartRequest {
            hex,
            tpdu_len,
            prompted,
            go,
        })
        .await
    }

    /// Asks the modem about itself.
    pub async fn probe(&self) -> Result<ModemInfo, String> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Request::Probe(tx)).await.is_err() {
            return Err("modem actor stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("modem actor stopped".into()))
    }
}

/// Starts the actor for `settings`; what the modem receives is dropped (`wsmb-agent send` and
/// `probe`).
pub fn spawn(settings: ModemSettings) -> ModemHandle {
    spawn_with(settings, None)
}

/// Starts the actor for `settings`, handing what the modem receives to `incoming`.
pub fn spawn_with(
    settings: ModemSettings,
    incoming: Option<mpsc::Sender<Incoming>>,
) -> ModemHandle {
    let (tx, rx) = mpsc::channel(8);
    let (health_tx, health) = watch::channel(Health::Starting);
    let (radio_tx, radio) = watch::channel(Radio::default());
    let name = settings.name.clone();
    tokio::spawn(
        Actor {
            problem: Problem::default(),
            s: settings,
            rx,
            health: health_tx,
            radio: radio_tx,
            incoming,
        }
        .run(),
    );
    ModemHandle {
        name,
        tx,
        health,
        radio,
    }
}

type Port = AtPort<tokio_serial::SerialStream>;

/// Why initialisation failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Worth retrying later.
    #[error("{0}")]
    Retry(String),
    /// SIM trouble that needs a person. `retry_later`: worth checking again now and then
    /// (a SIM may be inserted); never after a refused PIN.
    #[error("{reason}")]
    Sim {
        /// What is wrong and what to do.
        reason: String,
        /// Whether to check again later.
        retry_later: bool,
    },
}

fn sim(reason: impl Into<String>, retry_later: bool) -> InitError {
    InitError::Sim {
        reason: reason.into(),
        retry_later,
    }
}

/// Opens the device.
pub fn open_port(s: &ModemSettings) -> Result<Port, InitError> {
    let stream = tokio_serial::new(s.device.to_string_lossy(), s.baud)
        .timeout(Duration::from_secs(1))
        .open_native_async()
        .map_err(|e| {
            let busy = e.to_string().to_lowercase();
            if busy.contains("exclusive lock") || busy.contains("busy") {
                return InitError::Retry(format!(
                    "cannot open {}: {e} (another program, or another wsmb-agent, is using it)",
                    s.device.display()
                ));
            }
            let hint = match e.kind() {
                tokio_serial::ErrorKind::NoDevice => {
                    " (is the modem plugged in? prefer a stable path under /dev/serial/by-id/)"
                }
                tokio_serial::ErrorKind::Io(std::io::ErrorKind::NotFound) => {
                    " (no such device: is the modem plugged in? prefer a stable path under /dev/serial/by-id/)"
                }
                tokio_serial::ErrorKind::Io(std::io::ErrorKind::PermissionDenied) => {
                    " (permission denied: add the agent's user to the dialout group)"
                }
                _ => "",
            };
            InitError::Retry(format!("cannot open {}: {e}{hint}", s.device.display()))
        })?;
    Ok(AtPort::new(stream))
}

fn at_err(e: AtError) -> InitError {
    InitError::Retry(e.to_string())
}

async fn expect_ok(at: &mut Port, cmd: &str, t: Duration) -> Result<Response, InitError> {
    let r = at.command(cmd, t).await.map_err(at_err)?;
    if r.result.is_ok() {
        Ok(r)
    } else {
        Err(InitError::Retry(format!("{cmd} answered {}", r.result)))
    }
}

/// Initialises an open modem up to PDU mode (no registration wait).
pub async fn prepare(at: &mut Port, s: &ModemSettings) -> Result<(), InitError> {
    let t = s.command_timeout;
    // A previous run may have left AT+CMGS waiting for its PDU: ESC cancels it.
    let _ = at.cancel_prompt().await;
    let mut alive = false;
    for _ in 0..5 {
        // ATV1: verbose result codes (OK, not 0), answered in the new form; harmless otherwise.
        match at.command("ATV1", Duration::from_secs(2).min(t)).await {
            Ok(r) if r.result.is_ok() => {
                alive = true;
                break;
            }
            Ok(_) | Err(AtError::Timeout { .. }) => {
                let _ = at.cancel_prompt().await;
            }
            Err(e) => return Err(at_err(e)),
        }
    }
    if !alive {
        return Err(InitError::Retry(
            "the modem does not answer AT commands".into(),
        ));
    }
    expect_ok(at, "ATE0", t).await?;
    expect_ok(at, "AT+CMEE=1", t).await?;
    unlock_sim(at, s).await?;
    // Before the configured init commands, so that an AT+CNMI of the operator's wins.
    enable_indications(at, s).await;
    for cmd in &s.init {
        expect_ok(at, cmd, t).await?;
    }
    expect_ok(at, "AT+CMGF=0", t).await?;
    Ok(())
}

/// Asks the modem to tell new messages (`+CMTI`) and to pass delivery reports on as they come
/// (`+CDS`), or, when it cannot, to store them and tell (`+CDSI`). A modem that refuses both
/// still sends; its reports are then not seen (logged once here).
async fn enable_indications(at: &mut Port, s: &ModemSettings) {
    for cmd in ["AT+CNMI=2,1,0,1,0", "AT+CNMI=2,1,0,2,0"] {
        match at.command(cmd, s.command_timeout).await {
            Ok(r) if r.result.is_ok() => return,
            Ok(r) => debug!(modem = %s.name, "{cmd} answered {}", r.result),
            Err(e) => debug!(modem = %s.name, "{cmd}: {e}"),
        }
    }
    warn!(
        modem = %s.name,
        "the modem refuses AT+CNMI: delivery reports and incoming SMS are not announced; add \
         the AT+CNMI your modem's manual gives to this modem's init commands"
    );
}

async fn sim_state(at: &mut Port, t: Duration) -> Result<String, InitError> {
    let r = at.command("AT+CPIN?", t).await.map_err(at_err)?;
    match &r.result {
        Final::Ok => Ok(r.value("+CPIN:").unwrap_or("UNKNOWN").to_owned()),
        Final::Cme(10) => Err(sim(
            "no SIM card (+CME ERROR: 10): insert one (modem unplugged); checked again every \
             minute",
            true,
        )),
        Final::Cme(13) => Err(sim(
            "SIM failure (+CME ERROR: 13): reseat the SIM or try it in a phone; checked again \
             every minute",
            true,
        )),
        other => Err(InitError::Retry(format!("AT+CPIN? answered {other}"))),
    }
}

async fn unlock_sim(at: &mut Port, s: &ModemSettings) -> Result<(), InitError> {
    let t = s.command_timeout;
    let state = sim_state(at, t).await?;
    match state.as_str() {
        "READY" => return Ok(()),
        "SIM PIN" => {}
        "SIM PUK" => {
            return Err(sim(
                "the SIM is PUK-locked (too many wrong PINs): unlock it in a phone",
                false,
            ));
        }
        other => return Err(sim(format!("the SIM asks for {other}"), false)),
    }
    let Some(pin) = &s.pin else {
        return Err(sim(
            "the SIM needs a PIN: set `pin` for this modem in the agent config",
            false,
        ));
    };
    let r = at
        .command(&format!("AT+CPIN=\"{pin}\""), t)
        .await
        .map_err(at_err)?;
    match r.result {
        Final::Ok => {}
        Final::Cme(16) => {
            return Err(sim(
                "the SIM refused the PIN (+CME ERROR: 16, wrong PIN); it will not be tried again, \
                 since three wrong PINs lock the SIM: fix `pin` and restart the agent",
                false,
            ));
        }
        Final::Cme(12) => {
            return Err(sim(
                "the SIM is PUK-locked (+CME ERROR: 12): unlock it in a phone",
                false,
            ));
        }
        other => {
            return Err(sim(
                format!("the SIM refused the PIN ({other}); not retried"),
                false,
            ));
        }
    }
    // The SIM takes a moment after the PIN.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if sim_state(at, t).await? == "READY" {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(InitError::Retry(
        "the SIM did not become ready after the PIN".into(),
    ))
}

async fn registration(at: &mut Port, t: Duration) -> Result<u8, InitError> {
    let r = expect_ok(at, "AT+CREG?", t).await?;
    let v = r.value("+CREG:").unwrap_or("");
    // "+CREG: <n>,<stat>[,...]" (or "+CREG: <stat>" from URC-style answers)
    let parts: Vec<&str> = v.split(',').map(str::trim).collect();
    let stat = if parts.len() >= 2 { parts[1] } else { parts[0] };
    stat.parse::<u8>()
        .map_err(|_| InitError::Retry(format!("cannot read AT+CREG? answer {v:?}")))
}

/// Waits for network registration (home or roaming) until the deadline.
pub async fn wait_registration(at: &mut Port, s: &ModemSettings) -> Result<(), InitError> {
    let deadline = Instant::now() + s.registration_timeout;
    loop {
        let stat = registration(at, s.command_timeout).await?;
        if stat == 1 || stat == 5 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(InitError::Retry(format!(
                "not registered on the network after {:?} ({})",
                s.registration_timeout,
                registration_words(stat)
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn signal_dbm(r: &Response) -> Option<i32> {
    let rssi: i32 = r.value("+CSQ:")?.split(',').next()?.trim().parse().ok()?;
    match rssi {
        0..=31 => Some(-113 + 2 * rssi),
        _ => None,
    }
}

/// The operator's name in an `AT+COPS?` answer (`+COPS: 0,0,"Telkomsel",7`).
fn operator_name(r: &Response) -> Option<String> {
    r.value("+COPS:")
        .and_then(|v| v.split(',').nth(2))
        .map(|o| o.trim().trim_matches('"').to_owned())
        .filter(|o| !o.is_empty())
}

/// Reads identity, SIM, operator, signal and registration.
pub async fn probe(at: &mut Port, t: Duration) -> Result<ModemInfo, InitError> {
    let mut info = ModemInfo::default();
    let one = |r: Response| r.lines.first().cloned().unwrap_or_default();
    info.manufacturer = one(expect_ok(at, "AT+CGMI", t).await?);
    info.model = one(expect_ok(at, "AT+CGMM", t).await?);
    info.revision = one(expect_ok(at, "AT+CGMR", t).await?);
    info.imei = one(expect_ok(at, "AT+CGSN", t).await?);
    info.sim = match sim_state(at, t).await {
        Ok(s) => s,
        Err(e) => e.to_string(),
    };
    let cops = at.command("AT+COPS?", t).await.map_err(at_err)?;
    info.operator = operator_name(&cops);
    let csq = at.command("AT+CSQ", t).await.map_err(at_err)?;
    info.signal_dbm = signal_dbm(&csq);
    info.registration = match registration(at, t).await {
        Ok(stat) => registration_words(stat).to_owned(),
        Err(e) => e.to_string(),
    };
    Ok(info)
}

/// What to check for a modem that is down for `reason`, as "; ..." (empty when the reason
/// carries its own hint, as those of the port do).
fn modem_hint(reason: &str) -> &'static str {
    let r = reason.to_lowercase();
    if r.contains("registration denied") {
        "; the network refuses the SIM: check that it is activated, paid up and not blocked \
         (try it in a phone)"
    } else if r.contains("not registered") {
        "; no network: check the antenna, the coverage at this place, and the SIM in a phone"
    } else if r.contains("cannot open") {
        ""
    } else if r.contains("timed out") || r.contains("no answer") || r.contains("timeout") {
        "; the modem does not answer: check its power (a Pi's USB port may be too weak: use a \
         powered hub) and that `device` is its AT port"
    } else {
        "; check the modem with `wsmb-agent probe` (stop the agent first)"
    }
}

struct Actor {
    problem: Problem,
    s: ModemSettings,
    rx: mpsc::Receiver<Request>,
    health: watch::Sender<Health>,
    radio: watch::Sender<Radio>,
    incoming: Option<mpsc::Sender<Incoming>>,
}

impl Actor {
    /// Publishes the modem's health and logs the change: a problem once when it starts (or its
    /// reason changes) and then every [`REMIND_EVERY`] while the modem keeps failing the same
    /// way, not at every attempt; its end once.
    fn set_health(&mut self, h: Health) {
        let changed = *self.health.borrow() != h;
        if !changed {
            return;
        }
        let name = &self.s.name;
        match &h {
            Health::Ready => match self.problem.cleared() {
                Some(over) => info!(
                    modem = %name,
                    "modem ready again, after {} ({} failed attempt(s))",
                    human(over.lasted),
                    over.count
                ),
                None => info!(modem = %name, "modem ready"),
            },
            Health::Down(r) => match self.problem.occurred(r) {
                Say::Start => warn!(
                    modem = %name,
                    "modem down: {r}{}; trying again with growing pauses, said again only if \
                     it changes or every {}",
                    modem_hint(r),
                    human(REMIND_EVERY)
                ),
                Say::Remind { since, count } => warn!(
                    modem = %name,
                    "modem still down after {} ({count} attempts): {r}",
                    human(since)
                ),
                Say::Quiet => debug!(modem = %name, "modem down: {r}"),
            },
            Health::Stopped(r) => match self.problem.occurred(r) {
                Say::Quiet => debug!(modem = %name, "modem stopped: {r}"),
                _ => tracing::error!(modem = %name, "modem stopped: {r}"),
            },
            Health::Starting => debug!(modem = %name, "modem starting"),
        }
        let _ = self.health.send(h);
    }

    async fn run(mut self) {
        let mut backoff = Duration::from_millis(500);
        loop {
            self.set_health(Health::Starting);
            let opened = async {
                let mut at = open_port(&self.s)?;
                prepare(&mut at, &self.s).await?;
                wait_registration(&mut at, &self.s).await?;
                Ok::<_, InitError>(at)
            };
            // Requests that arrive while initialising are answered at once.
            let opened = async {
                let mut at = opened.await?;
                // Signal and operator, for the logs and the modem's status event.
                let t = self.s.command_timeout;
                let signal_dbm = at
                    .command("AT+CSQ", t)
                    .await
                    .ok()
                    .and_then(|r| signal_dbm(&r));
                let operator = at
                    .command("AT+COPS?", t)
                    .await
                    .ok()
                    .and_then(|r| operator_name(&r));
                let registration = registration(&mut at, t)
                    .await
                    .ok()
                    .map(|s| registration_words(s).to_owned());
                Ok::<_, InitError>((
                    at,
                    Radio {
                        signal_dbm,
                        operator,
                        registration,
                    },
                ))
            };
            let result = {
                tokio::pin!(opened);
                loop {
                    tokio::select! {
                        r = &mut opened => break r,
                        req = self.rx.recv() => match req {
                            Some(req) => refuse(req, "modem initialising"),
                            None => return,
                        },
                    }
                }
            };
            let pause = match result {
                Ok((at, radio)) => {
                    backoff = Duration::from_millis(500);
                    let operator = radio.operator.as_deref().unwrap_or("unknown");
                    match radio.signal_dbm {
                        Some(dbm) => {
                            info!(modem = %self.s.name, "signal {dbm} dBm, operator {operator}")
                        }
                        None => info!(modem = %self.s.name, "signal unknown, operator {operator}"),
                    }
                    let _ = self.radio.send(radio);
                    self.set_health(Health::Ready);
                    match self.serve(at).await {
                        Some(reason) => {
                            self.set_health(Health::Down(reason));
                            Duration::from_millis(200)
                        }
                        None => return,
                    }
                }
                Err(InitError::Sim {
                    reason,
                    retry_later,
                }) => {
                    self.set_health(Health::Stopped(reason));
                    // A person must act (insert a SIM, fix the PIN). Check again rarely, and
                    // never after a refused PIN: that stays until the agent restarts.
                    if retry_later {
                        Duration::from_secs(60)
                    } else {
                        Duration::MAX
                    }
                }
                Err(InitError::Retry(reason)) => {
                    self.set_health(Health::Down(reason));
                    let p = backoff;
                    backoff = (backoff * 2).min(self.s.reopen_max);
                    p
                }
            };
            if !self.idle(pause).await {
                return;
            }
        }
    }

    /// Answers requests with "unavailable" for `pause`. False when the handle is gone.
    async fn idle(&mut self, pause: Duration) -> bool {
        let until = tokio::time::Instant::now()
            .checked_add(pause)
            .unwrap_or_else(|| {
                tokio::time::Instant::now() + Duration::from_secs(3600 * 24 * 365 * 10)
            });
        let reason = match &*self.health.borrow() {
            Health::Down(r) | Health::Stopped(r) => r.clone(),
            _ => "modem not ready".into(),
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                req = self.rx.recv() => match req {
                    Some(req) => refuse(req, &reason),
                    None => return false,
                },
            }
        }
    }

    /// Serves requests until the modem fails (returns why) or the handle is dropped (None).
    async fn serve(&mut self, mut at: Port) -> Option<String> {
        let mut health = tokio::time::interval(self.s.health_interval);
        health.reset();
        let mut poll = tokio::time::interval(URC_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is at once: what came while the agent was away.
        let mut sweep = tokio::time::interval(self.s.inbox_sweep.max(Duration::from_secs(1)));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                req = self.rx.recv() => {
                    let req = req?;
                    if let Err(reason) = self.handle(&mut at, req).await {
                        return Some(reason);
                    }
                    health.reset();
                }
                _ = health.tick() => {
                    if let Err(reason) = self.check(&mut at).await {
                        return Some(reason);
                    }
                }
                _ = poll.tick() => {
                    if let Err(e) = at.poll(Duration::from_millis(20)).await {
                        return Some(e.to_string());
                    }
                }
                _ = sweep.tick(), if self.incoming.is_some() => {
                    if let Err(reason) = self.sweep(&mut at).await {
                        return Some(reason);
                    }
                }
            }
            if let Err(reason) = self.unsolicited(&mut at).await {
                return Some(reason);
            }
        }
    }

    /// Acts on what the modem said on its own: received SMS and delivery reports go to the
    /// agent (a copy the modem stored is deleted once recorded). Err when the modem must be
    /// re-opened.
    async fn unsolicited(&self, at: &mut Port) -> Result<(), String> {
        for urc in at.take_urcs() {
            let line = urc.line.as_str();
            if line.starts_with("+CDS:") || line.starts_with("+CMT:") {
                // Passed on directly: `+CDS: <length>` / `+CMT: [<alpha>],<length>` and the PDU.
                match urc.data.as_deref() {
                    Some(pdu) => {
                        self.take(pdu, line).await;
                    }
                    None => warn!(modem = %self.s.name, "{line} came without its PDU"),
                }
            } else if line.starts_with("+CDSI:") || line.starts_with("+CMTI:") {
                // Stored: `+CMTI: "SM",<index>`.
                let (_, rest) = line.split_once(':').unwrap_or(("", ""));
                let (mem, index) = rest.rsplit_once(',').unwrap_or(("", rest));
                match index.trim().parse::<u32>() {
                    Ok(index) => {
                        self.use_storage(at, mem.trim().trim_matches('"')).await?;
                        self.read_stored(at, index).await?;
                    }
                    Err(_) => warn!(modem = %self.s.name, "unreadable {line}"),
                }
            } else if line.starts_with("^SMMEMFULL") || line.starts_with("+CMS ERROR: 322") {
                warn!(
                    modem = %self.s.name,
                    "the modem says its message storage is full ({line}): reading it now"
                );
                self.sweep(at).await?;
            } else {
                debug!(modem = %self.s.name, urc = %line, "unsolicited");
            }
        }
        Ok(())
    }

    /// Decodes a received PDU and hands it to the agent; whether the agent has it (recorded
    /// now or before). A PDU that cannot be decoded is logged whole (so that nothing is lost
    /// silently) and counts as taken: kept, it would fill the storage.
    async fn take(&self, pdu: &str, whence: &str) -> bool {
        let Some(tx) = &self.incoming else {
            debug!(modem = %self.s.name, "{whence}: ignored (no agent)");
            return false;
        };
        let (stored, done) = oneshot::channel();
        let modem = self.s.name.clone();
        let item = match decode_received(pdu) {
            Ok(Received::Deliver(sms)) => Incoming::Sms { modem, sms, stored },
            Ok(Received::StatusReport(report)) => Incoming::Report {
                modem,
                report,
                stored,
            },
            Err(e) => {
                warn!(
                    modem = %self.s.name,
                    "{whence}: a received PDU could not be read ({e}); it is dropped: {pdu}"
                );
                return true;
            }
        };
        if tx.send(item).await.is_err() {
            return false;
        }
        tokio::time::timeout(Duration::from_secs(10), done)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false)
    }

    /// A message or report the modem stored (`+CMTI`, `+CDSI`): read, handed over, deleted
    /// once the agent has it.
    async fn read_stored(&self, at: &mut Port, index: u32) -> Result<(), String> {
        let t = self.s.command_timeout;
        let r = match at.command(&format!("AT+CMGR={index}"), t).await {
            Ok(r) => r,
            Err(AtError::Timeout { .. }) => return self.recover(at).await,
            Err(e) => return Err(e.to_string()),
        };
        match r.lines.iter().find(|l| !l.starts_with("+CMGR:")) {
            Some(pdu) if r.result.is_ok() => {
                if self.take(pdu, &format!("stored message {index}")).await {
                    self.delete(at, index).await?;
                }
            }
            _ => debug!(modem = %self.s.name, "AT+CMGR={index} answered {}", r.result),
        }
        Ok(())
    }

    /// Selects the storage `mem` (`SM`, `ME`, `SR`, ...) for reading and deleting; whether the
    /// modem has it. An empty name leaves the storage as it is.
    async fn use_storage(&self, at: &mut Port, mem: &str) -> Result<bool, String> {
        if mem.is_empty() {
            return Ok(true);
        }
        if !mem.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Ok(false);
        }
        match at
            .command(&format!("AT+CPMS=\"{mem}\""), self.s.command_timeout)
            .await
        {
            Ok(r) => Ok(r.result.is_ok()),
            Err(AtError::Timeout { .. }) => self.recover(at).await.map(|_| false),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn delete(&self, at: &mut Port, index: u32) -> Result<(), String> {
        match at
            .command(&format!("AT+CMGD={index}"), self.s.command_timeout)
            .await
        {
            Ok(r) if r.result.is_ok() => Ok(()),
            Ok(r) => {
                warn!(modem = %self.s.name, "AT+CMGD={index} answered {}", r.result);
                Ok(())
            }
            Err(AtError::Timeout { .. }) => self.recover(at).await,
            Err(e) => Err(e.to_string()),
        }
    }

    /// Reads every message in the modem's storage (`AT+CMGL=4`): those whose indication was
    /// missed, those that came while the agent was away, and those taken before but not
    /// deleted (a crash in between: the agent knows them, so they are only deleted). A storage
    /// still full afterwards is logged: the network cannot deliver more.
    async fn sweep(&self, at: &mut Port) -> Result<(), String> {
        let t = self.s.command_timeout;
        // The SIM's storage and the modem's own (a modem without one refuses "ME").
        for mem in ["SM", "ME"] {
            if !self.use_storage(at, mem).await? {
                continue;
            }
            let r = match at.command("AT+CMGL=4", t).await {
                Ok(r) => r,
                Err(AtError::Timeout { .. }) => return self.recover(at).await,
                Err(e) => return Err(e.to_string()),
            };
            if !r.result.is_ok() {
                debug!(modem = %self.s.name, "AT+CMGL=4 ({mem}) answered {}", r.result);
                continue;
            }
            let mut listed: Vec<(u32, String)> = Vec::new();
            let mut index = None;
            for l in &r.lines {
                if let Some(rest) = l.strip_prefix("+CMGL:") {
                    index = rest
                        .split(',')
                        .next()
                        .and_then(|i| i.trim().parse::<u32>().ok());
                } else if let Some(i) = index.take() {
                    listed.push((i, l.clone()));
                }
            }
            for (i, pdu) in listed {
                if self.take(&pdu, &format!("stored message {mem} {i}")).await {
                    self.delete(at, i).await?;
                }
            }
        }
        self.use_storage(at, "SM").await?;
        if let Ok(r) = at.command("AT+CPMS?", t).await {
            let counts: Vec<u32> = r
                .value("+CPMS:")
                .unwrap_or("")
                .split(',')
                .filter_map(|v| v.trim().parse().ok())
                .collect();
            if let [used, total, ..] = counts[..] {
                if total > 0 && used >= total {
                    warn!(
                        modem = %self.s.name,
                        "the modem's message storage is full ({used} of {total}) with messages \
                         that could not be taken: new SMS cannot arrive; check the log above"
                    );
                }
            }
        }
        Ok(())
    }

    /// Idle check: the modem answers and is still registered; the signal and registration
    /// are refreshed for the heartbeat.
    async fn check(&self, at: &mut Port) -> Result<(), String> {
        let t = self.s.command_timeout;
        match at.command("AT+CREG?", t).await {
            Ok(r) if r.result.is_ok() => {
                let stat = r
                    .value("+CREG:")
                    .and_then(|v| v.split(',').nth(1).or(Some(v)))
                    .and_then(|s| s.trim().parse::<u8>().ok());
                if let Some(s) = stat {
                    self.radio.send_if_modified(|r| {
                        let words = Some(registration_words(s).to_owned());
                        let changed = r.registration != words;
                        r.registration = words;
                        changed
                    });
                }
                match stat {
                    Some(1 | 5) => {}
                    Some(s) => return Err(format!("lost the network ({})", registration_words(s))),
                    None => return Ok(()),
                }
                // The signal (an unreadable answer keeps the last value).
                match at.command("AT+CSQ", t).await {
                    Ok(r) => {
                        let dbm = signal_dbm(&r);
                        if dbm.is_some() {
                            self.radio.send_if_modified(|r| {
                                let changed = r.signal_dbm != dbm;
                                r.signal_dbm = dbm;
                                changed
                            });
                        }
                        Ok(())
                    }
                    Err(AtError::Timeout { .. }) => self.recover(at).await,
                    Err(e) => Err(e.to_string()),
                }
            }
            Ok(r) => Err(format!("AT+CREG? answered {}", r.result)),
            Err(AtError::Timeout { .. }) => self.recover(at).await,
            Err(e) => Err(e.to_string()),
        }
    }

    /// After a command timed out: ESC, then `AT` up to three times.
    async fn recover(&self, at: &mut Port) -> Result<(), String> {
        for _ in 0..3 {
            let _ = at.cancel_prompt().await;
            match at.command("AT", Duration::from_secs(2)).await {
                Ok(r) if r.result.is_ok() => return Ok(()),
                Ok(_) | Err(AtError::Timeout { .. }) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("the modem stopped answering".into())
    }

    /// Handles one request. Err when the modem must be re-opened.
    async fn handle(&self, at: &mut Port, req: Request) -> Result<(), String> {
        match req {
            Request::Probe(reply) => {
                let r = probe(at, self.s.command_timeout)
                    .await
                    .map_err(|e| e.to_string());
                let failed = r.is_err();
                let _ = reply.send(r);
                if failed {
                    self.recover(at).await?;
                }
                Ok(())
            }
            Request::Part(part, reply) => {
                let PartRequest {
                    hex,
                    tpdu_len,
                    prompted,
                    go,
                } = part;
                let arm = async move {
                    let _ = prompted.send(());
                    go.await.unwrap_or(false)
                };
                let timeouts = SubmitTimeouts {
                    prompt: self.s.prompt_timeout,
                    result: self.s.send_timeout,
                };
                match at.submit_pdu(tpdu_len, &hex, timeouts, arm).await {
                    Ok(mr) => {
                        let _ = reply.send(PartOutcome::Sent { mr });
                        Ok(())
                    }
                    Err(e) => {
                        let class = classify(e.stage, e.result.as_ref());
                        let outcome = PartOutcome::Failed {
                            class,
                            code: e.result.as_ref().and_then(|r| match r {
                                Final::Cms(_) | Final::Cme(_) => Some(r.to_string()),
                                _ => None,
                            }),
                            reason: e.what.clone(),
                        };
                        let _ = reply.send(outcome);
                        if e.port_failed {
                            return Err(e.what);
                        }
                        if class == FailureClass::Sim {
                            return Err(format!("SIM trouble while sending: {}", e.what));
                        }
                        if e.result.is_none() {
                            // A timeout: is the modem still there?
                            self.recover(at).await?;
                        }
                        Ok(())
                    }
                }
            }
        }
    }
}

fn refuse(req: Request, reason: &str) {
    match req {
        Request::Part(_, reply) => {
            let _ = reply.send(PartOutcome::Unavailable(reason.to_owned()));
        }
        Request::Probe(reply) => {
            let _ = reply.send(Err(reason.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_field_notes() {
        use FailureClass::*;
        let c = |stage, r: Option<Final>| classify(stage, r.as_ref());
        for code in [38, 41, 42, 47, 111, 331, 332, 512, 515, 535, 322] {
            assert_eq!(
                c(Stage::AfterPdu, Some(Final::Cms(code))),
                Transient,
                "{code}"
            );
            assert_eq!(
                c(Stage::BeforePdu, Some(Final::Cms(code))),
                Transient,
                "{code}"
            );
        }
        for code in [21, 28, 30, 195, 196, 304, 305, 330] {
            assert_eq!(
                c(Stage::AfterPdu, Some(Final::Cms(code))),
                Permanent,
                "{code}"
            );
        }
        for code in 310..=318 {
            assert_eq!(c(Stage::BeforePdu, Some(Final::Cms(code))), Sim, "{code}");
        }
        assert_eq!(c(Stage::BeforePdu, Some(Final::Cme(10))), Sim);
        assert_eq!(c(Stage::AfterPdu, Some(Final::Cme(14))), Transient);
        assert_eq!(c(Stage::AfterPdu, Some(Final::Cms(500))), Ambiguous);
        assert_eq!(c(Stage::AfterPdu, None), Ambiguous);
        // before the PDU, nothing can have been sent
        assert_eq!(c(Stage::BeforePdu, Some(Final::Cms(500))), Transient);
        assert_eq!(c(Stage::BeforePdu, None), Transient);
        assert_eq!(c(Stage::AfterPdu, Some(Final::Error)), Transient);
    }

    #[test]
    fn signal_in_dbm() {
        let r = |v: &str| Response {
            lines: vec![format!("+CSQ: {v}")],
            result: Final::Ok,
        };
        assert_eq!(signal_dbm(&r("0,99")), Some(-113));
        assert_eq!(signal_dbm(&r("21,99")), Some(-71));
        assert_eq!(signal_dbm(&r("31,0")), Some(-51));
        assert_eq!(signal_dbm(&r("99,99")), None);
    }
}
