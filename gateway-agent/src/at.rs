//! The AT engine: one command at a time over a serial port, with a fixed deadline per command.
//!
//! What it guarantees, against the classic failures of SMS gateways:
//! - Final results (`OK`, `ERROR`, `+CME ERROR: n`, `+CMS ERROR: n`, ...) are told from
//!   information lines and from unsolicited result codes (URCs: `+CMTI`, `RING`, `^RSSI`,
//!   `SMS DONE`, ...) that may arrive at any moment, even inside a reply or right after the
//!   `> ` prompt. URCs are collected for the owner, never taken as the answer.
//! - Every command has a deadline fixed when it is sent; lines arriving meanwhile (URCs
//!   included) do not extend it.
//! - The `> ` prompt of `AT+CMGS` is recognised without a line ending; the PDU is written only
//!   after it. A prompt that does not come is cancelled with ESC, so the modem never takes the
//!   next command as message text.
//! - Input left over from an earlier command (a late answer after a timeout) is drained before
//!   the next command is written, so a stale reply cannot satisfy it.
//!
//! The engine knows nothing about SMS semantics or recovery: `modem` decides what a failure
//! means.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// How long a read waits for a readiness wake-up before looking at the port directly.
const READ_SLICE: Duration = Duration::from_millis(250);

/// A port the engine can drive: async reads and writes, plus an optional direct read that
/// bypasses the runtime's readiness tracking.
///
/// Why: on some serial drivers and pseudo-terminals a readiness edge can be missed (seen on
/// Linux ptys under load: the modem's `+CMGS` answer sat in the kernel buffer while the read
/// slept until its deadline, turning a sent SMS into an ambiguous timeout). The engine
/// therefore waits in short slices and, when a slice ends without a wake-up, tries one
/// non-blocking read itself. A port without such a read (tests over in-memory pipes) keeps the
/// default, which finds nothing.
pub trait ModemIo: AsyncRead + AsyncWrite + Unpin {
    /// Reads what is pending right now without waiting: `None` when unsupported or when
    /// nothing is pending.
    fn try_read_now(&mut self, _buf: &mut [u8]) -> Option<std::io::Result<usize>> {
        None
    }
}

impl ModemIo for tokio_serial::SerialStream {
    fn try_read_now(&mut self, buf: &mut [u8]) -> Option<std::io::Result<usize>> {
        match self.try_read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
            // A serial port opened with a read timeout reports "nothing yet" as TimedOut.
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => None,
            other => Some(other),
        }
    }
}

impl ModemIo for tokio::io::DuplexStream {}

/// Commands that carry a secret (the SIM PIN or PUK, facility passwords): what follows `=` is
/// never written to a log or an error, at any level.
const SECRET_COMMANDS: &[&str] = &["AT+CPIN=", "AT+CLCK=", "AT+CPWD="];

/// `text` with the secret of a PIN-carrying command hidden (`AT+CPIN=<hidden>`).
pub fn redact(text: &str) -> std::borrow::Cow<'_, str> {
    let t = text.trim_start();
    for p in SECRET_COMMANDS {
        // Compared as bytes: `t` may hold anything a modem sent (slicing it at a byte offset
        // could fall inside a character). A match is ASCII, so it ends on a boundary.
        if let Some(head) = t.get(..p.len()).filter(|h| h.eq_ignore_ascii_case(p)) {
            return std::borrow::Cow::Owned(format!("{head}<hidden>"));
        }
    }
    std::borrow::Cow::Borrowed(text)
}

/// Prefixes of unsolicited result codes. Lines starting with one of these are URCs unless the
/// running command asked for that prefix (`AT+CREG?` expects `+CREG:`).
const URC_PREFIXES: &[&str] = &[
    "+CMTI:",
    "+CMT:",
    "+CDS:",
    "+CDSI:",
    "+CBM:",
    "+CBMI:",
    "RING",
    "+CRING:",
    "+CLIP:",
    "+CREG:",
    "+CGREG:",
    "+CEREG:",
    "+CPIN:",
    "+CUSD:",
    "+CIEV:",
    "+CFUN:",
    "+QIND:",
    "^RSSI:",
    "^HCSQ:",
    "^BOOT:",
    "^MODE:",
    "^SRVST:",
    "^SIMST:",
    "^SYSSTART",
    "^SMMEMFULL",
    "^CEND:",
    "^ORIG:",
    "^CONF:",
    "^CONN:",
    "SMS DONE",
    "PB DONE",
    "RDY",
    "Call Ready",
    "SMS Ready",
    "+STIN:",
    "+PACSP",
    "NO CARRIER",
];

/// URCs followed by a second line that belongs to them (the PDU).
const TWO_LINE_URCS: &[&str] = &["+CMT:", "+CDS:", "+CBM:"];

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Final {
    /// `OK`.
    Ok,
    /// `ERROR`.
    Error,
    /// `+CME ERROR: n` (equipment / SIM errors).
    Cme(u16),
    /// `+CMS ERROR: n` (SMS errors).
    Cms(u16),
    /// A verbose `+CME ERROR: text` / `+CMS ERROR: text`, or another final line such as
    /// `COMMAND NOT SUPPORT`.
    Other(String),
}

impl Final {
    /// The final result a line is, if it is one (`OK`, `ERROR`, `+CME ERROR: n`, ...).
    pub fn parse(line: &str) -> Option<Final> {
        let code = |rest: &str| rest.trim().parse::<u16>().ok();
        if line == "OK" {
            Some(Final::Ok)
        } else if line == "ERROR" {
            Some(Final::Error)
        } else if let Some(rest) = line.strip_prefix("+CME ERROR:") {
            Some(code(rest).map_or_else(|| Final::Other(line.to_owned()), Final::Cme))
        } else if let Some(rest) = line.strip_prefix("+CMS ERROR:") {
            Some(code(rest).map_or_else(|| Final::Other(line.to_owned()), Final::Cms))
        } else if matches!(
            line,
            "COMMAND NOT SUPPORT" | "TOO MANY PARAMETERS" | "NO DIALTONE" | "BUSY" | "NO ANSWER"
        ) {
            Some(Final::Other(line.to_owned()))
        } else {
            None
        }
    }

    /// Whether the command succeeded.
    pub fn is_ok(&self) -> bool {
        *self == Final::Ok
    }
}

impl std::fmt::Display for Final {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Final::Ok => f.write_str("OK"),
            Final::Error => f.write_str("ERROR"),
            Final::Cme(n) => write!(f, "+CME ERROR: {n}"),
            Final::Cms(n) => write!(f, "+CMS ERROR: {n}"),
            Final::Other(s) => f.write_str(s),
        }
    }
}

/// The answer to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Information lines, URCs and echo removed.
    pub lines: Vec<String>,
    /// The final result.
    pub result: Final,
}

impl Response {
    /// The first information line starting with `prefix`, with the prefix removed and trimmed.
    pub fn value(&self, prefix: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    }
}

/// An unsolicited result code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Urc {
    /// The line.
    pub line: String,
    /// The second line of `+CMT`/`+CDS`/`+CBM`.
    pub data: Option<String>,
}

/// A failure to talk to the modem.
#[derive(Debug, thiserror::Error)]
pub enum AtError {
    /// No final result before the deadline.
    #[error("no answer to {cmd} within {after:?}")]
    Timeout {
        /// The command.
        cmd: String,
        /// Its deadline.
        after: Duration,
    },
    /// The port reached end of file (the device went away).
    #[error("the modem port was closed")]
    Closed,
    /// A read or write failed.
    #[error("modem port error: {0}")]
    Io(#[from] std::io::Error),
}

/// Where an `AT+CMGS` failed, which decides whether the SMS may have gone out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Before the PDU was written: nothing was sent.
    BeforePdu,
    /// After the PDU and Ctrl-Z were written: the SMS may have been sent.
    AfterPdu,
}

/// A failed `AT+CMGS`.
#[derive(Debug, thiserror::Error)]
#[error("{what} ({stage:?})")]
pub struct SubmitError {
    /// When it failed.
    pub stage: Stage,
    /// The final result, if the modem gave one.
    pub result: Option<Final>,
    /// Human-readable description.
    pub what: String,
    /// Whether the port itself failed (closed, I/O error): the modem must be re-opened.
    pub port_failed: bool,
}

/// Timeouts of one `AT+CMGS`.
#[derive(Debug, Clone, Copy)]
pub struct SubmitTimeouts {
    /// From the command to the `> ` prompt.
    pub prompt: Duration,
    /// From Ctrl-Z to the final result.
    pub result: Duration,
}

enum Input {
    Line(String),
    Prompt,
}

/// The engine, owning the port.
pub struct AtPort<P> {
    port: P,
    buf: Vec<u8>,
    /// Collected URCs, oldest first, at most [`MAX_URCS`]: a modem that chatters (signal
    /// reports every few seconds) while nobody takes them cannot make the agent's memory grow.
    urcs: std::collections::VecDeque<Urc>,
    urc_awaiting_data: bool,
}

/// Most URCs kept until taken; past it the oldest go.
pub const MAX_URCS: usize = 256;

impl<P: ModemIo> AtPort<P> {
    /// Wraps an open port.
    pub fn new(port: P) -> Self {
        AtPort {
            port,
            buf: Vec::with_capacity(1024),
            urcs: std::collections::VecDeque::new(),
            urc_awaiting_data: false,
        }
    }

    /// URCs collected so far (and forgets them).
    pub fn take_urcs(&mut self) -> Vec<Urc> {
        self.urcs.drain(..).collect()
    }

    fn next_line(&mut self) -> Option<String> {
        loop {
            let end = self.buf.iter().position(|b| *b == b'\r' || *b == b'\n')?;
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1])
                .trim()
                .to_owned();
            if !text.is_empty() {
                return Some(text);
            }
        }
    }

    fn take_prompt(&mut self) -> bool {
        let start = self
            .buf
            .iter()
            .position(|b| *b != b'\r' && *b != b'\n')
            .unwrap_or(self.buf.len());
        if self.buf.get(start) == Some(&b'>') {
            let mut end = start + 1;
            if self.buf.get(end) == Some(&b' ') {
                end += 1;
            }
            self.buf.drain(..end);
            return true;
        }
        false
    }

    /// Reads once, waiting until `deadline`. Returns whether anything arrived.
    async fn fill(&mut self, deadline: Instant) -> Result<bool, AtError> {
        let mut chunk = [0u8; 512];
        let read = loop {
            let slice = deadline.min(Instant::now() + READ_SLICE);
            match tokio::time::timeout_at(slice, self.port.read(&mut chunk)).await {
                Ok(r) => break r,
                Err(_) => {
                    if let Some(r) = self.port.try_read_now(&mut chunk) {
                        if matches!(r, Ok(n) if n > 0) {
                            tracing::debug!("modem data found without a readiness wake-up");
                        }
                        break r;
                    }
                    if slice >= deadline {
                        return Ok(false);
                    }
                }
            }
        };
        match read {
            Ok(0) => Err(AtError::Closed),
            Ok(n) => {
                tracing::trace!(read = %String::from_utf8_lossy(&chunk[..n]).escape_debug(), "modem said");
                self.buf.extend_from_slice(&chunk[..n]);
                // A modem that floods without line endings cannot grow this forever.
                if self.buf.len() > 64 * 1024 {
                    let cut = self.buf.len() - 4096;
                    self.buf.drain(..cut);
                }
                Ok(true)
            }
            Err(e) => Err(AtError::Io(e)),
        }
    }

    async fn next_input(
        &mut self,
        deadline: Instant,
        want_prompt: bool,
    ) -> Result<Option<Input>, AtError> {
        loop {
            if want_prompt && self.take_prompt() {
                return Ok(Some(Input::Prompt));
            }
            if let Some(l) = self.next_line() {
                return Ok(Some(Input::Line(l)));
            }
            if !self.fill(deadline).await? {
                return Ok(None);
            }
        }
    }

    /// Records `line` as a URC if it is one (for the running command `expect`). Returns
    /// whether it was.
    fn absorb_urc(&mut self, line: &str, expect: Option<&str>) -> bool {
        if self.urc_awaiting_data {
            self.urc_awaiting_data = false;
            if let Some(last) = self.urcs.back_mut() {
                last.data = Some(line.to_owned());
            }
            return true;
        }
        if expect.is_some_and(|p| line.starts_with(p)) {
            return false;
        }
        if URC_PREFIXES.iter().any(|p| line.starts_with(p)) {
            self.urc_awaiting_data = TWO_LINE_URCS.iter().any(|p| line.starts_with(p));
            if self.urcs.len() >= MAX_URCS {
                self.urcs.pop_front();
            }
            self.urcs.push_back(Urc {
                line: line.to_owned(),
                data: None,
            });
            return true;
        }
        false
    }

    /// While no command runs: reads what the modem sent on its own (waiting at most `quiet`
    /// for more), keeping URCs. Other complete lines are stale and dropped; a partial line (a
    /// PDU still arriving) stays for the next read.
    pub async fn poll(&mut self, quiet: Duration) -> Result<(), AtError> {
        loop {
            while let Some(l) = self.next_line() {
                if self.absorb_urc(&l, None) {
                    continue;
                }
                if l.starts_with("+CMS ERROR: 322") {
                    // Some modems say so, unasked, when the message storage is full.
                    self.urcs.push_back(Urc {
                        line: l,
                        data: None,
                    });
                } else {
                    tracing::debug!(line = %l, "unexpected line from an idle modem, dropped");
                }
            }
            if !self.fill(Instant::now() + quiet).await? {
                return Ok(());
            }
        }
    }

    /// Reads whatever is pending (waiting at most `quiet` for more) and discards it, keeping
    /// URCs. Used before each command and after a failure, so that a late answer can never be
    /// taken for the next command's.
    pub async fn drain(&mut self, quiet: Duration) -> Result<Vec<String>, AtError> {
        let mut stale = Vec::new();
        loop {
            while let Some(l) = self.next_line() {
                if !self.absorb_urc(&l, None) {
                    stale.push(l);
                }
            }
            if !self.fill(Instant::now() + quiet).await? {
                break;
            }
        }
        // A lone prompt or partial line left over is stale too.
        if !self.buf.is_empty() {
            stale.push(String::from_utf8_lossy(&self.buf).trim().to_owned());
            self.buf.clear();
        }
        Ok(stale)
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), AtError> {
        tracing::trace!(write = %redact(&String::from_utf8_lossy(bytes)).escape_debug(), "to modem");
        self.port.write_all(bytes).await?;
        self.port.flush().await?;
        Ok(())
    }

    /// Sends ESC (cancels a pending `> ` prompt) and discards what follows.
    pub async fn cancel_prompt(&mut self) -> Result<(), AtError> {
        self.write(&[0x1b]).await?;
        self.drain(Duration::from_millis(200)).await?;
        Ok(())
    }

    /// Sends `cmd` (without `\r`) and waits for its final result until `timeout` from now.
    pub async fn command(&mut self, cmd: &str, timeout: Duration) -> Result<Response, AtError> {
        let stale = self.drain(Duration::ZERO).await?;
        if !stale.is_empty() {
            let stale: Vec<_> = stale.iter().map(|l| redact(l)).collect();
            tracing::debug!(
                ?stale,
                "discarded stale modem output before {}",
                redact(cmd)
            );
        }
        let deadline = Instant::now() + timeout;
        self.write(format!("{cmd}\r").as_bytes()).await?;
        let expect = expected_prefix(cmd);
        let mut lines = Vec::new();
        loop {
            match self.next_input(deadline, false).await? {
                None => {
                    return Err(AtError::Timeout {
                        cmd: redact(cmd).into_owned(),
                        after: timeout,
                    });
                }
                Some(Input::Prompt) => {}
                Some(Input::Line(l)) => {
                    if l == cmd {
                        continue; // echo
                    }
                    if let Some(result) = Final::parse(&l) {
                        return Ok(Response { lines, result });
                    }
                    if !self.absorb_urc(&l, expect.as_deref()) {
                        lines.push(l);
                    }
                }
            }
        }
    }

    /// `AT+CMGS=<tpdu_len>`, the prompt, the PDU and Ctrl-Z, then `+CMGS: <mr>`. Returns the
    /// message reference.
    ///
    /// `arm` runs once the prompt has arrived, just before the PDU is written: the caller
    /// records there that this part is in flight (so that a crash from here on is known to be
    /// ambiguous). If it returns false, or takes longer than the prompt timeout, the prompt is
    /// cancelled and nothing is sent.
    pub async fn submit_pdu(
        &mut self,
        tpdu_len: usize,
        pdu_hex: &str,
        timeouts: SubmitTimeouts,
        arm: impl std::future::Future<Output = bool>,
    ) -> Result<u8, SubmitError> {
        let before = |what: String, result: Option<Final>, port_failed: bool| SubmitError {
            stage: Stage::BeforePdu,
            result,
            what,
            port_failed,
        };
        let after = |what: String, result: Option<Final>, port_failed: bool| SubmitError {
            stage: Stage::AfterPdu,
            result,
            what,
            port_failed,
        };
        let cmd = format!("AT+CMGS={tpdu_len}");
        if let Err(e) = self.drain(Duration::ZERO).await {
            return Err(before(e.to_string(), None, true));
        }
        if let Err(e) = self.write(format!("{cmd}\r").as_bytes()).await {
            return Err(before(e.to_string(), None, true));
        }
        let deadline = Instant::now() + timeouts.prompt;
        loop {
            match self.next_input(deadline, true).await {
                Err(e) => return Err(before(e.to_string(), None, true)),
                Ok(None) => {
                    // Never leave a prompt armed: the next command would become message text.
                    let cancel = self.cancel_prompt().await;
                    return Err(before(
                        format!("no > prompt within {:?}", timeouts.prompt),
                        None,
                        cancel.is_err(),
                    ));
                }
                Ok(Some(Input::Prompt)) => break,
                Ok(Some(Input::Line(l))) => {
                    if l == cmd {
                        continue;
                    }
                    if let Some(result) = Final::parse(&l) {
                        return Err(before(
                            format!("{cmd} refused: {result}"),
                            Some(result),
                            false,
                        ));
                    }
                    self.absorb_urc(&l, None);
                }
            }
        }
        if !tokio::time::timeout(timeouts.prompt, arm)
            .await
            .unwrap_or(false)
        {
            let cancel = self.cancel_prompt().await;
            return Err(before(
                "cancelled before the PDU was written".into(),
                None,
                cancel.is_err(),
            ));
        }
        let mut payload = pdu_hex.as_bytes().to_vec();
        payload.push(0x1a);
        if let Err(e) = self.write(&payload).await {
            return Err(after(e.to_string(), None, true));
        }
        let deadline = Instant::now() + timeouts.result;
        let mut mr = None;
        loop {
            match self.next_input(deadline, false).await {
                Err(e) => return Err(after(e.to_string(), None, true)),
                Ok(None) => {
                    return Err(after(
                        format!(
                            "no answer within {:?} after the PDU was sent",
                            timeouts.result
                        ),
                        None,
                        false,
                    ));
                }
                Ok(Some(Input::Prompt)) => {}
                Ok(Some(Input::Line(l))) => {
                    if let Some(v) = l.strip_prefix("+CMGS:") {
                        mr = v
                            .trim()
                            .split(',')
                            .next()
                            .and_then(|n| n.trim().parse::<u16>().ok());
                        continue;
                    }
                    match Final::parse(&l) {
                        Some(Final::Ok) => {
                            return match mr {
                                Some(mr) => Ok((mr % 256) as u8),
                                // OK without +CMGS: sent, reference unknown.
                                None => Ok(0),
                            };
                        }
                        Some(result) => {
                            return Err(after(format!("{result}"), Some(result), false));
                        }
                        None => {
                            self.absorb_urc(&l, None);
                        }
                    }
                }
            }
        }
    }
}

/// `AT+CREG?` expects `+CREG:`; `AT+CSQ` expects `+CSQ:`.
fn expected_prefix(cmd: &str) -> Option<String> {
    let rest = cmd.get(2..)?;
    if !(rest.starts_with('+') || rest.starts_with('^')) {
        return None;
    }
    let name: String = rest
        .chars()
        .take_while(|c| !matches!(c, '?' | '='))
        .collect();
    Some(format!("{name}:"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream, duplex};

    /// A scripted modem on the other end of an in-memory pipe: for each command it receives,
    /// it writes the given bytes.
    fn scripted(script: Vec<(&'static str, &'static str)>) -> AtPort<DuplexStream> {
        let (ours, theirs) = duplex(4096);
        tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(theirs);
            let mut r = BufReader::new(r);
            for (expect, answer) in script {
                let mut got = Vec::new();
                let term = if expect.ends_with('\x1a') {
                    0x1a
                } else {
                    b'\r'
                };
                if r.read_until(term, &mut got).await.unwrap_or(0) == 0 {
                    return;
                }
                let got = String::from_utf8_lossy(&got).to_string();
                assert_eq!(got.trim_end_matches('\r'), expect.trim_end_matches('\r'));
                if w.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
            // keep the pipe open
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        AtPort::new(ours)
    }

    const T: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn ok_error_and_numeric_errors() {
        let mut at = scripted(vec![
            ("AT", "\r\nOK\r\n"),
            ("AT+FOO", "\r\nERROR\r\n"),
            ("AT+CPIN?", "\r\n+CME ERROR: 10\r\n"),
            ("AT+CMGS=3", "\r\n+CMS ERROR: 331\r\n"),
            ("AT+X", "\r\n+CME ERROR: SIM not inserted\r\n"),
        ]);
        assert_eq!(at.command("AT", T).await.expect("ok").result, Final::Ok);
        assert_eq!(
            at.command("AT+FOO", T).await.expect("r").result,
            Final::Error
        );
        assert_eq!(
            at.command("AT+CPIN?", T).await.expect("r").result,
            Final::Cme(10)
        );
        assert_eq!(
            at.command("AT+CMGS=3", T).await.expect("r").result,
            Final::Cms(331)
        );
        assert!(matches!(
            at.command("AT+X", T).await.expect("r").result,
            Final::Other(_)
        ));
    }

    #[tokio::test]
    async fn echo_and_urcs_inside_a_reply_are_not_the_answer() {
        let mut at = scripted(vec![(
            "AT+CSQ",
            "AT+CSQ\r\r\nRING\r\n+CSQ: 21,99\r\n^RSSI:21\r\n+CMT: ,23\r\n0791ABCD\r\n\r\nOK\r\n",
        )]);
        let r = at.command("AT+CSQ", T).await.expect("answer");
        assert_eq!(r.lines, vec!["+CSQ: 21,99"]);
        assert_eq!(r.value("+CSQ:"), Some("21,99"));
        let urcs = at.take_urcs();
        assert_eq!(urcs.len(), 3, "{urcs:?}");
        assert_eq!(urcs[2].data.as_deref(), Some("0791ABCD"));
    }

    /// Found by the `at_response` fuzz target: a line whose 8th byte falls inside a character
    /// (modem noise read as U+FFFD) made `redact` panic, which would have killed the modem's
    /// task.
    #[test]
    fn redact_survives_any_text() {
        let noise = String::from_utf8_lossy(&[0x8a, 0x82, 0x8a, 0x82]).into_owned();
        assert_eq!(redact(&noise), noise);
        for s in [
            "AT+CPIN\u{e9}xx",
            "\u{1f600}\u{1f600}\u{1f600}",
            "AT+CPI\u{e9}",
        ] {
            assert_eq!(redact(s), s);
        }
    }

    #[test]
    fn secrets_are_hidden() {
        assert_eq!(redact("AT+CPIN=\"1234\"\r"), "AT+CPIN=<hidden>");
        assert_eq!(redact("at+cpin=1234"), "at+cpin=<hidden>");
        assert_eq!(redact("AT+CPIN?"), "AT+CPIN?");
        assert_eq!(redact("AT+CLCK=\"SC\",0,\"1234\""), "AT+CLCK=<hidden>");
        assert_eq!(redact("AT+CSQ"), "AT+CSQ");
    }

    #[tokio::test]
    async fn urcs_nobody_takes_stay_bounded() {
        let mut chatter = String::from("AT\r\r\n");
        for i in 0..(MAX_URCS + 100) {
            chatter.push_str(&format!("^RSSI:{}\r\n", i % 32));
        }
        chatter.push_str("+CMTI: \"SM\",3\r\nOK\r\n");
        let chatter: &'static str = Box::leak(chatter.into_boxed_str());
        let mut at = scripted(vec![("AT", chatter)]);
        at.command("AT", T).await.expect("answer");
        let urcs = at.take_urcs();
        assert_eq!(urcs.len(), MAX_URCS);
        assert_eq!(
            urcs[MAX_URCS - 1].line,
            "+CMTI: \"SM\",3",
            "the newest are kept"
        );
    }

    #[tokio::test]
    async fn a_prefix_the_command_asked_for_is_an_answer_not_a_urc() {
        let mut at = scripted(vec![("AT+CREG?", "\r\n+CREG: 1\r\n+CREG: 0,1\r\nOK\r\n")]);
        let r = at.command("AT+CREG?", T).await.expect("answer");
        assert_eq!(r.lines, vec!["+CREG: 1", "+CREG: 0,1"]);
    }

    #[tokio::test]
    async fn urcs_do_not_extend_the_deadline() {
        let (ours, mut theirs) = duplex(4096);
        tokio::spawn(async move {
            for _ in 0..100 {
                if theirs.write_all(b"\r\n^RSSI:12\r\n").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let mut at = AtPort::new(ours);
        let t0 = Instant::now();
        let e = at
            .command("AT", Duration::from_millis(300))
            .await
            .expect_err("timeout");
        assert!(matches!(e, AtError::Timeout { .. }));
        assert!(
            t0.elapsed() < Duration::from_millis(600),
            "{:?}",
            t0.elapsed()
        );
        assert!(at.take_urcs().len() >= 5);
    }

    #[tokio::test]
    async fn a_late_answer_does_not_satisfy_the_next_command() {
        let (ours, theirs) = duplex(4096);
        let (r, mut w) = tokio::io::split(theirs);
        tokio::spawn(async move {
            let mut r = BufReader::new(r);
            let mut line = Vec::new();
            // first command: answer late (after its deadline)
            let _ = r.read_until(b'\r', &mut line).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = w.write_all(b"\r\n+CSQ: 5,99\r\nOK\r\n").await;
            // second command: answered properly
            line.clear();
            let _ = r.read_until(b'\r', &mut line).await;
            let _ = w.write_all(b"\r\nMODEL-X\r\nOK\r\n").await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let mut at = AtPort::new(ours);
        assert!(
            at.command("AT+CSQ", Duration::from_millis(100))
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = at.command("AT+CGMM", T).await.expect("answer");
        assert_eq!(
            r.lines,
            vec!["MODEL-X"],
            "the stale +CSQ answer leaked into AT+CGMM"
        );
    }

    #[tokio::test]
    async fn submit_waits_for_the_prompt_and_reads_the_reference() {
        let mut at = scripted(vec![
            ("AT+CMGS=22", "\r\n> "),
            ("0011\x1a", "\r\n+CMTI: \"SM\",1\r\n+CMGS: 77\r\n\r\nOK\r\n"),
        ]);
        let t = SubmitTimeouts {
            prompt: T,
            result: T,
        };
        assert_eq!(
            at.submit_pdu(22, "0011", t, async { true })
                .await
                .expect("sent"),
            77
        );
        assert_eq!(at.take_urcs().len(), 1);
    }

    #[tokio::test]
    async fn urc_right_after_the_prompt_is_fine() {
        let mut at = scripted(vec![
            ("AT+CMGS=5", "\r\n> \r\n^RSSI:20\r\n"),
            ("AB\x1a", "\r\n+CMGS: 3\r\nOK\r\n"),
        ]);
        let t = SubmitTimeouts {
            prompt: T,
            result: T,
        };
        assert_eq!(
            at.submit_pdu(5, "AB", t, async { true })
                .await
                .expect("sent"),
            3
        );
    }

    #[tokio::test]
    async fn submit_errors_say_whether_anything_was_sent() {
        let t = SubmitTimeouts {
            prompt: Duration::from_millis(200),
            result: Duration::from_millis(200),
        };
        // refused before the prompt
        let mut at = scripted(vec![("AT+CMGS=5", "\r\n+CMS ERROR: 331\r\n")]);
        let e = at
            .submit_pdu(5, "AB", t, async { true })
            .await
            .expect_err("refused");
        assert_eq!(
            (e.stage, e.result),
            (Stage::BeforePdu, Some(Final::Cms(331)))
        );
        // no prompt: cancelled with ESC, nothing sent
        let (ours, theirs) = duplex(4096);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = std::sync::Arc::clone(&seen);
        tokio::spawn(async move {
            let (mut r, _w) = tokio::io::split(theirs);
            let mut buf = [0u8; 64];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                s.lock().expect("lock").extend_from_slice(&buf[..n]);
            }
        });
        let mut at = AtPort::new(ours);
        let e = at
            .submit_pdu(5, "AB", t, async { true })
            .await
            .expect_err("no prompt");
        assert_eq!(e.stage, Stage::BeforePdu);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            &seen.lock().expect("lock")[..],
            b"AT+CMGS=5\r\x1b",
            "ESC must follow"
        );
        // error after the PDU
        let mut at = scripted(vec![
            ("AT+CMGS=5", "> "),
            ("AB\x1a", "\r\n+CMS ERROR: 500\r\n"),
        ]);
        let e = at
            .submit_pdu(5, "AB", t, async { true })
            .await
            .expect_err("500");
        assert_eq!(
            (e.stage, e.result),
            (Stage::AfterPdu, Some(Final::Cms(500)))
        );
        // silence after the PDU
        let mut at = scripted(vec![("AT+CMGS=5", "> "), ("AB\x1a", "")]);
        let e = at
            .submit_pdu(5, "AB", t, async { true })
            .await
            .expect_err("timeout");
        assert_eq!((e.stage, e.result), (Stage::AfterPdu, None));
    }

    #[tokio::test]
    async fn a_closed_port_is_reported() {
        let (ours, theirs) = duplex(64);
        drop(theirs);
        let mut at = AtPort::new(ours);
        assert!(matches!(
            at.command("AT", T).await,
            Err(AtError::Closed) | Err(AtError::Io(_))
        ));
    }

    /// A port whose readiness wake-up never comes (the lost edge seen on ptys): reads stay
    /// pending forever, and only a direct read finds the answer written to it.
    struct NoWakeups {
        pending: Vec<u8>,
    }

    impl AsyncRead for NoWakeups {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }
    }

    impl AsyncWrite for NoWakeups {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if buf.ends_with(b"\r") {
                self.pending.extend_from_slice(b"\r\nOK\r\n");
            }
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    impl ModemIo for NoWakeups {
        fn try_read_now(&mut self, buf: &mut [u8]) -> Option<std::io::Result<usize>> {
            if self.pending.is_empty() {
                return None;
            }
            let n = self.pending.len().min(buf.len());
            buf[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            Some(Ok(n))
        }
    }

    #[tokio::test]
    async fn an_answer_without_a_wakeup_is_found_before_the_deadline() {
        let mut at = AtPort::new(NoWakeups {
            pending: Vec::new(),
        });
        let start = Instant::now();
        let r = at
            .command("AT", Duration::from_secs(5))
            .await
            .expect("answer");
        assert!(r.result.is_ok(), "{r:?}");
        assert!(
            start.elapsed() <= READ_SLICE * 2,
            "found only after {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn expected_prefixes() {
        assert_eq!(expected_prefix("AT+CREG?").as_deref(), Some("+CREG:"));
        assert_eq!(expected_prefix("AT+CMGS=22").as_deref(), Some("+CMGS:"));
        assert_eq!(expected_prefix("AT^SYSINFO").as_deref(), Some("^SYSINFO:"));
        assert_eq!(expected_prefix("ATE0"), None);
    }
}
