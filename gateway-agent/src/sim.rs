//! A GSM modem simulator on a pseudo-terminal, for tests and for a demo without hardware.
//!
//! It creates a pty pair, points a symlink (the "device path", like `/dev/serial/by-id/...`) at
//! the slave end, and answers AT commands on the master end like a real modem: echo until
//! `ATE0`, a PIN-locked SIM, a registration delay, `AT+CMGS` with the `> ` prompt and
//! `+CMGS: <mr>`. Faults can be injected while it runs: `+CMS ERROR`s before or after the PDU,
//! a prompt that never comes, a result that never comes, silence, unsolicited lines at awkward
//! moments (inside a reply, right after the prompt), and the device disappearing and coming back
//! (as after a USB re-enumeration: the path vanishes, then points to a new pty; the SIM is
//! locked again and registration starts over).
//!
//! Every PDU it is asked to send is recorded, decoded with [`crate::pdu::decode_submit`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_serial::SerialPort;

use crate::pdu::{SmscTime, StatusReport, Submit, decode_submit, encode_status_report};

/// How the simulated modem behaves when it starts (and after each reappearance).
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// PIN of the SIM; `None` means no PIN lock.
    pub pin: Option<String>,
    /// Time from SIM unlock (or power-up) to network registration.
    pub registration_delay: Duration,
    /// Register as roaming (`+CREG: 0,5`) instead of home (`0,1`).
    pub roaming: bool,
    /// `AT+CGMI`.
    pub manufacturer: String,
    /// `AT+CGMM`.
    pub model: String,
    /// `AT+CGSN`.
    pub imei: String,
    /// `AT+COPS?` operator name.
    pub operator: String,
    /// `AT+CSQ` RSSI (0-31).
    pub rssi: u8,
    /// The network's delivery report for each part sent with a report requested (TP-SRR): the
    /// TP-ST it gives (`Some(0)`: delivered), sent as `+CDS` after `report_delay`; `None`
    /// (the default): no reports unless sent with [`Simulator::send_report`].
    pub delivery_report: Option<u8>,
    /// How long after `+CMGS` the delivery report comes.
    pub report_delay: Duration,
    /// Message slots of the SIM's storage (`"SM"`), where incoming SMS are kept until deleted.
    pub storage_slots: usize,
    /// Delivery reports are stored and announced (`+CDSI: "SR",<index>`, as with
    /// `AT+CNMI=...,2,...`) instead of passed on (`+CDS`).
    pub store_reports: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            pin: None,
            registration_delay: Duration::from_millis(200),
            roaming: false,
            manufacturer: "WSMB".into(),
            model: "SIM800 simulator".into(),
            imei: "356938035643809".into(),
            operator: "Telkomsel".into(),
            rssi: 21,
            delivery_report: None,
            report_delay: Duration::from_millis(100),
            storage_slots: 10,
            store_reports: false,
        }
    }
}

/// A fault to inject into the next `AT+CMGS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer `+CMS ERROR: n` to `AT+CMGS=<len>`, before the prompt (nothing sent).
    RefuseBeforePrompt(u16),
    /// Never send the prompt (the agent must cancel with ESC).
    NoPrompt,
    /// Take the PDU, then answer `+CMS ERROR: n`. With 500 the SMS is counted as gone out
    /// (the ambiguous case); with any other code it is not.
    ErrorAfterPdu(u16),
    /// Take the PDU (the SMS goes out), then never answer.
    NoResult,
}

/// One PDU the simulator received after a prompt.
#[derive(Debug, Clone)]
pub struct SentPdu {
    /// The hex as received (SMSC part included).
    pub hex: String,
    /// The `AT+CMGS=` length given.
    pub declared_len: usize,
    /// Decoded, if it was a valid SMS-SUBMIT.
    pub submit: Option<Submit>,
    /// The message reference answered (when answered with `+CMGS`).
    pub mr: Option<u8>,
    /// Whether the SMS left the simulated modem (reached the network).
    pub went_out: bool,
}

#[derive(Default)]
struct Shared {
    sent: Vec<SentPdu>,
    faults: VecDeque<Fault>,
    silent: bool,
    noise: bool,
    present: bool,
    commands: Vec<String>,
    wrong_pins: u32,
    mr: u8,
    generation: u64,
    /// Unsolicited output waiting to be written (each a complete `\r\n...\r\n` block).
    unsolicited: VecDeque<String>,
    /// Every status report sent.
    reports: Vec<StatusReport>,
    /// The SIM's message storage: index (from 1) -> (status 0 unread / 1 read, PDU hex).
    storage: std::collections::BTreeMap<u32, (u8, String)>,
    /// `AT+CMGD` answers an error (a modem that fails to delete).
    refuse_delete: bool,
    /// The signal now, when changed from `SimConfig::rssi` ([`Simulator::set_rssi`]).
    rssi: Option<u8>,
}

struct Inner {
    cfg: SimConfig,
    link: PathBuf,
    shared: Mutex<Shared>,
    changed: Notify,
    stop: Notify,
    /// Unsolicited output was queued.
    urc: Notify,
}

/// A running simulator. Cloning gives another handle to the same modem.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

impl Simulator {
    /// Starts a simulated modem reachable at `link` (a symlink it creates to a fresh pty).
    pub async fn start(link: impl Into<PathBuf>, cfg: SimConfig) -> std::io::Result<Simulator> {
        let sim = Simulator {
            inner: Arc::new(Inner {
                cfg,
                link: link.into(),
                shared: Mutex::new(Shared::default()),
                changed: Notify::new(),
                stop: Notify::new(),
                urc: Notify::new(),
            }),
        };
        sim.power_on()?;
        Ok(sim)
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.inner.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device path to give the agent.
    pub fn path(&self) -> &Path {
        &self.inner.link
    }

    fn power_on(&self) -> std::io::Result<()> {
        let (master, slave) = tokio_serial::SerialStream::pair().map_err(std::io::Error::other)?;
        let name = slave
            .name()
            .ok_or_else(|| std::io::Error::other("the pty has no name"))?;
        drop(slave);
        let _ = std::fs::remove_file(&self.inner.link);
        std::os::unix::fs::symlink(&name, &self.inner.link)?;
        let generation = {
            let mut s = self.lock();
            s.present = true;
            s.generation += 1;
            s.wrong_pins = 0;
            s.generation
        };
        let sim = self.clone();
        tokio::spawn(async move { sim.serve(master, generation).await });
        Ok(())
    }

    /// Every PDU received so far.
    pub fn sent(&self) -> Vec<SentPdu> {
        self.lock().sent.clone()
    }

    /// The SMS that went out, joined from their parts: (number, text), in the order their last
    /// part went out.
    pub fn messages(&self) -> Vec<(String, String)> {
        let sent = self.sent();
        let mut out = Vec::new();
        let mut open: Vec<(String, u16, Vec<Option<String>>)> = Vec::new();
        for p in sent.iter().filter(|p| p.went_out) {
            let Some(s) = &p.submit else { continue };
            let number = s.number.to_string();
            match s.concat {
                None => out.push((number, s.text.clone())),
                Some((reference, total, seq)) => {
                    let idx = match open.iter().position(|(n, r, parts)| {
                        *n == number && *r == reference && parts.len() == usize::from(total)
                    }) {
                        Some(i) => i,
                        None => {
                            open.push((number.clone(), reference, vec![None; usize::from(total)]));
                            open.len() - 1
                        }
                    };
                    if let Some(slot) = open[idx].2.get_mut(usize::from(seq).saturating_sub(1)) {
                        *slot = Some(s.text.clone());
                    }
                    if open[idx].2.iter().all(Option::is_some) {
                        let (n, _, parts) = open.remove(idx);
                        out.push((n, parts.into_iter().flatten().collect()));
                    }
                }
            }
        }
        out
    }

    /// Waits until at least `n` messages went out; returns them.
    pub async fn wait_messages(&self, n: usize, timeout: Duration) -> Vec<(String, String)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.inner.changed.notified();
            let m = self.messages();
            if m.len() >= n {
                return m;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.messages();
            }
        }
    }

    /// Queues unsolicited output (`+CMTI: "SM",3`, or a line and its PDU), written between
    /// commands as a modem does.
    pub fn unsolicited(&self, lines: &[&str]) {
        let block: String = lines.iter().map(|l| format!("\r\n{l}\r\n")).collect();
        self.lock().unsolicited.push_back(block);
        self.inner.urc.notify_one();
    }

    /// Sends a delivery report (`+CDS: <length>` and its PDU, from our encoder: Gammu reads it
    /// the same, tests/pdu_gammu.rs).
    pub fn send_report(&self, r: StatusReport) {
        let Ok(hex) = encode_status_report(&r) else {
            return;
        };
        if self.inner.cfg.store_reports {
            let index = {
                let mut s = self.lock();
                let free =
                    (1..=self.inner.cfg.storage_slots as u32).find(|i| !s.storage.contains_key(i));
                let Some(index) = free else {
                    return;
                };
                s.storage.insert(index, (0, hex));
                index
            };
            self.unsolicited(&[&format!("+CDSI: \"SR\",{index}")]);
        } else {
            let len = format!("+CDS: {}", hex.len() / 2 - 1);
            self.unsolicited(&[&len, &hex]);
        }
        self.lock().reports.push(r);
    }

    /// An SMS arrives from the network: `pdu` (hex, SMSC information first, as Gammu's
    /// `EncodePDU(..., "Deliver")` gives it) is stored in the first free slot and announced with
    /// `+CMTI: "SM",<index>` (or not, with `announce = false`: modems that drop indications).
    /// Returns the index, or None when the storage is full: the modem then says so
    /// (`^SMMEMFULL`) and the network keeps the SMS, as a real one would, until there is room
    /// (call again).
    pub fn receive(&self, pdu: &str, announce: bool) -> Option<u32> {
        let index = {
            let mut s = self.lock();
            let free =
                (1..=self.inner.cfg.storage_slots as u32).find(|i| !s.storage.contains_key(i));
            let Some(index) = free else {
                drop(s);
                // As Huawei modems say it.
                self.unsolicited(&["^SMMEMFULL: \"SM\""]);
                return None;
            };
            s.storage.insert(index, (0, pdu.to_owned()));
            index
        };
        if announce {
            self.unsolicited(&[&format!("+CMTI: \"SM\",{index}")]);
        }
        self.inner.changed.notify_waiters();
        Some(index)
    }

    /// Makes `AT+CMGD` fail (true) or work again (false).
    pub fn set_refuse_delete(&self, refuse: bool) {
        self.lock().refuse_delete = refuse;
    }

    /// The SIM storage's used slots (index, PDU).
    pub fn stored(&self) -> Vec<(u32, String)> {
        self.lock()
            .storage
            .iter()
            .map(|(i, (_, p))| (*i, p.clone()))
            .collect()
    }

    /// Every status report sent so far.
    pub fn reports(&self) -> Vec<StatusReport> {
        self.lock().reports.clone()
    }

    /// Every command line received, in order (PIN entries included).
    pub fn commands(&self) -> Vec<String> {
        self.lock().commands.clone()
    }

    /// How many PIN entries (`AT+CPIN=...`) the simulator was sent: a refused PIN must never
    /// be tried again, and a modem that comes back must be unlocked again.
    pub fn pin_attempts(&self) -> usize {
        self.lock()
            .commands
            .iter()
            .filter(|c| c.starts_with("AT+CPIN="))
            .count()
    }

    /// Queues a fault for a coming `AT+CMGS`.
    pub fn push_fault(&self, f: Fault) {
        self.lock().faults.push_back(f);
    }

    /// The signal changes (`AT+CSQ` RSSI, 0-31; dBm = 2 x RSSI - 113).
    pub fn set_rssi(&self, rssi: u8) {
        self.lock().rssi = Some(rssi);
    }

    /// Stops answering anything (true) or answers again (false).
    pub fn set_silent(&self, silent: bool) {
        self.lock().silent = silent;
    }

    /// Mixes unsolicited lines into replies, after prompts and between commands.
    pub fn set_noise(&self, noise: bool) {
        self.lock().noise = noise;
    }

    /// The device disappears: the pty closes and the path is removed.
    pub fn disappear(&self) {
        self.lock().present = false;
        self.inner.stop.notify_waiters();
        let _ = std::fs::remove_file(&self.inner.link);
    }

    /// The device comes back at the same path, freshly powered on.
    pub fn reappear(&self) -> std::io::Result<()> {
        self.power_on()
    }

    async fn serve(self, mut master: tokio_serial::SerialStream, generation: u64) {
        let mut m = ModemState::new(&self.inner.cfg);
        let mut buf = [0u8; 1024];
        loop {
            let stopped = self.inner.stop.notified();
            tokio::pin!(stopped);
            stopped.as_mut().enable();
            {
                let s = self.lock();
                if !s.present || s.generation != generation {
                    return;
                }
            }
            let urc = self.inner.urc.notified();
            let n = tokio::select! {
                _ = stopped => return,
                _ = urc => {
                    let blocks: Vec<String> = self.lock().unsolicited.drain(..).collect();
                    for b in blocks {
                        if master.write_all(b.as_bytes()).await.is_err() {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    continue;
                },
                r = master.read(&mut buf) => match r {
                    Ok(0) | Err(_) => {
                        // No process has the slave open (EIO on Linux): wait for one.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Ok(n) => n,
                },
                // The same defence as the agent's AT engine against a lost readiness wake-up:
                // look at the pty directly now and then.
                _ = tokio::time::sleep(Duration::from_millis(250)) => match master.try_read(&mut buf) {
                    Ok(n) if n > 0 => n,
                    _ => continue,
                },
            };
            tracing::trace!(generation, input = %crate::at::redact(&String::from_utf8_lossy(&buf[..n])).escape_debug(), "sim read");
            let out = self.feed(&mut m, &buf[..n]);
            tracing::trace!(generation, output = %String::from_utf8_lossy(&out).escape_debug(), "sim answer");
            if !out.is_empty() && master.write_all(&out).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.inner.changed.notify_waiters();
        }
    }

    fn feed(&self, m: &mut ModemState, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in bytes {
            if m.pdu.is_some() {
                match b {
                    0x1a => {
                        let (declared, hex) = m.pdu.take().unwrap_or_default();
                        self.finish_pdu(declared, hex, &mut out);
                    }
                    0x1b => {
                        m.pdu = None;
                        out.extend_from_slice(b"\r\nOK\r\n");
                    }
                    b'\r' | b'\n' => {}
                    _ => {
                        if let Some((_, hex)) = m.pdu.as_mut() {
                            hex.push(b as char);
                        }
                    }
                }
                continue;
            }
            if m.echo && !self.lock().silent {
                out.push(b);
            }
            match b {
                b'\r' => {
                    let line = String::from_utf8_lossy(&m.line).trim().to_owned();
                    m.line.clear();
                    if !line.is_empty() {
                        self.command(m, &line, &mut out);
                    }
                }
                b'\n' => {}
                0x1b => m.line.clear(),
                _ => m.line.push(b),
            }
        }
        out
    }

    fn command(&self, m: &mut ModemState, line: &str, out: &mut Vec<u8>) {
        let (silent, noise) = {
            let mut s = self.lock();
            s.commands.push(line.to_owned());
            (s.silent, s.noise)
        };
        if silent {
            return;
        }
        let upper = line.to_ascii_uppercase();
        let mut info: Vec<String> = Vec::new();
        let ok = "OK".to_owned();
        let registered = m.registered(&self.inner.cfg);
        let result: Option<String> = match upper.as_str() {
            "AT" | "ATZ" | "AT&F" | "ATQ0" | "ATV1" | "ATE0V1" => Some(ok),
            "ATE0" => {
                m.echo = false;
                Some(ok)
            }
            "ATE1" => {
                m.echo = true;
                Some(ok)
            }
            "AT+CPIN?" => {
                info.push(format!("+CPIN: {}", m.sim_state()));
                Some(ok)
            }
            "AT+CREG?" => {
                let stat = if m.locked() {
                    0
                } else if registered {
                    if self.inner.cfg.roaming { 5 } else { 1 }
                } else {
                    2
                };
                info.push(format!("+CREG: 0,{stat}"));
                Some(ok)
            }
            "AT+CSQ" => {
                let rssi = self.lock().rssi.unwrap_or(self.inner.cfg.rssi);
                info.push(format!("+CSQ: {rssi},99"));
                Some(ok)
            }
            "AT+CGMI" => {
                info.push(self.inner.cfg.manufacturer.clone());
                Some(ok)
            }
            "AT+CGMM" => {
                info.push(self.inner.cfg.model.clone());
                Some(ok)
            }
            "AT+CGMR" => {
                info.push("Revision: SIM-1.0".into());
                Some(ok)
            }
            "AT+CGSN" | "AT+GSN" => {
                info.push(self.inner.cfg.imei.clone());
                Some(ok)
            }
            "AT+COPS?" => {
                if registered {
                    info.push(format!("+COPS: 0,0,\"{}\",7", self.inner.cfg.operator));
                } else {
                    info.push("+COPS: 0".into());
                }
                Some(ok)
            }
            _ if upper.starts_with("AT+CPIN=") => Some(self.enter_pin(m, &line[8..], out, noise)),
            _ if upper.starts_with("AT+CMGF=") => {
                m.pdu_mode = upper.ends_with('0');
                Some(ok)
            }
            _ if upper.starts_with("AT+CMEE=")
                || upper.starts_with("AT+CREG=")
                || upper.starts_with("AT+CSCS=")
                || upper.starts_with("AT+CNMI=")
                || upper.starts_with("AT+CPMS=")
                || upper.starts_with("AT+CSMP=") =>
            {
                Some(ok)
            }
            _ if upper.starts_with("AT+CMGS=") => self.cmgs(m, &upper[8..], registered, noise, out),
            "AT+CPMS?" => {
                let used = self.lock().storage.len();
                let total = self.inner.cfg.storage_slots;
                info.push(format!(
                    "+CPMS: \"SM\",{used},{total},\"SM\",{used},{total},\"SM\",{used},{total}"
                ));
                Some(ok)
            }
            _ if upper.starts_with("AT+CMGL=") => {
                if !m.pdu_mode {
                    Some("+CMS ERROR: 302".into())
                } else {
                    let mut s = self.lock();
                    for (i, (stat, pdu)) in s.storage.iter_mut() {
                        info.push(format!("+CMGL: {i},{stat},,{}", pdu.len() / 2));
                        info.push(pdu.clone());
                        *stat = 1;
                    }
                    Some(ok)
                }
            }
            _ if upper.starts_with("AT+CMGR=") => {
                let index = upper[8..].trim().parse::<u32>().ok();
                let mut s = self.lock();
                match index.and_then(|i| s.storage.get_mut(&i)) {
                    Some((stat, pdu)) => {
                        info.push(format!("+CMGR: {stat},,{}", pdu.len() / 2));
                        info.push(pdu.clone());
                        *stat = 1;
                        Some(ok)
                    }
                    None => Some("+CMS ERROR: 321".into()),
                }
            }
            _ if upper.starts_with("AT+CMGD=") => {
                let arg = upper[8..].trim();
                let (index, flag) = arg.split_once(',').unwrap_or((arg, "0"));
                let mut s = self.lock();
                if s.refuse_delete {
                    Some("+CMS ERROR: 500".into())
                } else {
                    match (index.trim().parse::<u32>(), flag.trim()) {
                        (_, "4") => {
                            s.storage.clear();
                            Some(ok)
                        }
                        (Ok(i), _) if s.storage.remove(&i).is_some() => Some(ok),
                        _ => Some("+CMS ERROR: 321".into()),
                    }
                }
            }
            _ => Some("ERROR".to_owned()),
        };
        for (i, l) in info.iter().enumerate() {
            out.extend_from_slice(format!("\r\n{l}\r\n").as_bytes());
            if noise && i == 0 {
                out.extend_from_slice(b"\r\n^RSSI:18\r\n");
            }
        }
        if let Some(r) = result {
            if noise {
                out.extend_from_slice(b"\r\nRING\r\n");
            }
            out.extend_from_slice(format!("\r\n{r}\r\n").as_bytes());
        }
    }

    fn enter_pin(&self, m: &mut ModemState, arg: &str, out: &mut Vec<u8>, noise: bool) -> String {
        let pin = arg.trim().trim_matches('"');
        if !m.locked() {
            return "+CME ERROR: 3".into();
        }
        let mut s = self.lock();
        if s.wrong_pins >= 3 {
            return "+CME ERROR: 12".into();
        }
        if self.inner.cfg.pin.as_deref() == Some(pin) {
            m.unlocked_at = Some(Instant::now());
            drop(s);
            if noise {
                out.extend_from_slice(b"\r\n+CPIN: READY\r\n\r\nSMS DONE\r\n");
            }
            "OK".into()
        } else {
            s.wrong_pins += 1;
            if s.wrong_pins >= 3 {
                m.puk = true;
                "+CME ERROR: 12".into()
            } else {
                "+CME ERROR: 16".into()
            }
        }
    }

    fn cmgs(
        &self,
        m: &mut ModemState,
        arg: &str,
        registered: bool,
        noise: bool,
        out: &mut Vec<u8>,
    ) -> Option<String> {
        if m.locked() {
            return Some("+CMS ERROR: 311".into());
        }
        if !registered {
            return Some("+CMS ERROR: 331".into());
        }
        if !m.pdu_mode {
            return Some("+CMS ERROR: 302".into());
        }
        let Ok(len) = arg.trim().parse::<usize>() else {
            return Some("+CMS ERROR: 304".into());
        };
        let fault = {
            let mut s = self.lock();
            match s.faults.front() {
                Some(Fault::RefuseBeforePrompt(_)) | Some(Fault::NoPrompt) => s.faults.pop_front(),
                _ => None,
            }
        };
        match fault {
            Some(Fault::RefuseBeforePrompt(code)) => Some(format!("+CMS ERROR: {code}")),
            Some(Fault::NoPrompt) => {
                // Swallow: the modem is stuck waiting; only ESC gets it out (answered "OK").
                m.pdu = Some((len, String::new()));
                None
            }
            _ => {
                out.extend_from_slice(b"\r\n> ");
                if noise {
                    out.extend_from_slice(b"\r\n+CMTI: \"SM\",3\r\n");
                }
                m.pdu = Some((len, String::new()));
                None
            }
        }
    }

    fn finish_pdu(&self, declared: usize, hex: String, out: &mut Vec<u8>) {
        let submit = decode_submit(&hex).ok();
        let smsc = crate::pdu::from_hex(&hex)
            .ok()
            .and_then(|b| b.first().map(|n| usize::from(*n) + 1));
        let actual = smsc.map(|s| (hex.len() / 2).saturating_sub(s));
        let mut s = self.lock();
        let fault = match s.faults.front() {
            Some(Fault::ErrorAfterPdu(_)) | Some(Fault::NoResult) => s.faults.pop_front(),
            _ => None,
        };
        let valid = submit.is_some() && actual == Some(declared);
        let (went_out, mr, answer) = match (valid, fault) {
            (false, _) => (false, None, Some("+CMS ERROR: 304".to_owned())),
            (true, Some(Fault::ErrorAfterPdu(code))) => {
                (code == 500, None, Some(format!("+CMS ERROR: {code}")))
            }
            (true, Some(Fault::NoResult)) => (true, None, None),
            (true, _) => {
                s.mr = s.mr.wrapping_add(1);
                (true, Some(s.mr), Some(format!("+CMGS: {}\r\n\r\nOK", s.mr)))
            }
        };
        let report = match (&submit, mr, self.inner.cfg.delivery_report) {
            (Some(sub), Some(mr), Some(status)) if sub.status_report => Some(StatusReport {
                mr,
                recipient: sub.number.to_string(),
                submitted: now_smsc(),
                discharged: now_smsc(),
                status,
            }),
            _ => None,
        };
        s.sent.push(SentPdu {
            hex,
            declared_len: declared,
            submit,
            mr,
            went_out,
        });
        drop(s);
        if let Some(r) = report {
            let sim = self.clone();
            let delay = self.inner.cfg.report_delay;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                sim.send_report(r);
            });
        }
        if let Some(a) = answer {
            out.extend_from_slice(format!("\r\n{a}\r\n").as_bytes());
        }
    }
}

/// Now as an SMSC timestamp (UTC).
fn now_smsc() -> SmscTime {
    SmscTime {
        epoch: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
        offset_minutes: 0,
    }
}

struct ModemState {
    echo: bool,
    line: Vec<u8>,
    pdu: Option<(usize, String)>,
    pdu_mode: bool,
    needs_pin: bool,
    puk: bool,
    powered_at: Instant,
    unlocked_at: Option<Instant>,
}

impl ModemState {
    fn new(cfg: &SimConfig) -> Self {
        ModemState {
            echo: true,
            line: Vec::new(),
            pdu: None,
            pdu_mode: false,
            needs_pin: cfg.pin.is_some(),
            puk: false,
            powered_at: Instant::now(),
            unlocked_at: None,
        }
    }

    fn locked(&self) -> bool {
        self.puk || (self.needs_pin && self.unlocked_at.is_none())
    }

    fn sim_state(&self) -> &'static str {
        if self.puk {
            "SIM PUK"
        } else if self.locked() {
            "SIM PIN"
        } else {
            "READY"
        }
    }

    fn registered(&self, cfg: &SimConfig) -> bool {
        if self.locked() {
            return false;
        }
        let since = self.unlocked_at.unwrap_or(self.powered_at);
        since.elapsed() >= cfg.registration_delay
    }
}
