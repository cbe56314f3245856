//! End-to-end tests across processes: the real binaries, the real PHP interpreter.
//!
//! Helpers shared by the tests in `tests/tests/` live here.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// A scratch directory for one test (in /dev/shm when there is one: fsyncs are cheap there).
pub fn scratch(tag: &str) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("wsmb-e2e-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

/// Writes `DIR/agent.toml` for an agent of user `qa` on `broker_url` with one modem at
/// `device` (short timeouts for tests), `extra` appended to the modem's section.
pub fn agent_config(
    dir: &std::path::Path,
    broker_url: &str,
    device: &std::path::Path,
    extra: &str,
) -> PathBuf {
    let cfg = format!(
        r#"
[broker]
url = "{broker_url}"
user = "qa"
reconnect_max = "1s"
ping_interval = "2s"

[agent]
state_dir = "{state}"
country_code = "62"
retry_delay = "300ms"
# Often, so that tests see the broker follow the agent's counters.
heartbeat_interval = "2s"
# Its metrics on a free loopback port (its log says which).
metrics_listen = "127.0.0.1:0"

[[modem]]
name = "sim1"
device = "{device}"
command_timeout = "3s"
prompt_timeout = "3s"
registration_timeout = "10s"
{extra}
"#,
        state = dir.join("state").display(),
        device = device.display(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, cfg).expect("config");
    path
}

/// A child process whose output lines are collected in the background.
pub struct Proc {
    child: Child,
    lines: Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr captured (merged line by line).
    pub fn spawn(mut cmd: Command) -> std::io::Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let (tx, rx) = channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let pipes: Vec<Box<dyn Read + Send>> = vec![
            Box::new(
                child
                    .stdout
                    .take()
                    .ok_or_else(|| std::io::Error::other("stdout"))?,
            ),
            Box::new(
                child
                    .stderr
                    .take()
                    .ok_or_else(|| std::io::Error::other("stderr"))?,
            ),
        ];
        for pipe in pipes {
            let tx = tx.clone();
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut s) = seen.lock() {
                        s.push(line.clone());
                    }
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Proc {
            child,
            lines: rx,
            seen,
        })
    }

    /// Waits for a line containing `needle`; returns it, or None after `timeout`.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Some(l),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.seen.lock().map(|s| s.join("\n")).unwrap_or_default()
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the broker binary on 127.0.0.1:0 with `args`; returns it and its address.
pub fn start_broker(broker_exe: &str, args: &[&str]) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(broker_exe);
    cmd.args(args).args(["--listen", "127.0.0.1:0"]);
    if !args.contains(&"--storage") {
        cmd.args(["--storage", "memory"]);
    }
    cmd.env_remove("RUST_LOG").env_remove("WSMB_CREDENTIALS");
    spawn_listening(cmd)
}

/// Starts a broker command and waits for its `listening on ADDR` line; returns it and ADDR.
pub fn spawn_listening(cmd: Command) -> (Proc, SocketAddr) {
    let p = Proc::spawn(cmd).expect("start the broker");
    let line = p
        .wait_line("listening on ", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("broker did not start:\n{}", p.output()));
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (p, addr)
}

/// The password of user `qa` in `deploy/htpasswd.example`.
pub const QA_PASSWORD: &str = "4lt0@1234";

/// The broker binary `exe` with its SQLite store in `dir/broker`, the users of
/// `deploy/htpasswd.example`, on `listen`, with `args` added (e.g. `--config FILE`).
pub fn sqlite_broker(exe: &str, dir: &Path, listen: &str, args: &[&str]) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .args([
            "--htpasswd",
            &repo_root()
                .join("deploy/htpasswd.example")
                .display()
                .to_string(),
            "--state-dir",
            &dir.join("broker").display().to_string(),
            "--listen",
            listen,
        ])
        .env_remove("RUST_LOG")
        .env_remove("WSMB_CREDENTIALS")
        .env_remove("WSMB_WEBHOOK_KEY");
    spawn_listening(cmd)
}

/// The agent binary `exe` with config `cfg` (user `qa`), once connected and its modem ready.
pub fn ready_agent(exe: &str, cfg: &Path) -> Proc {
    let mut cmd = Command::new(exe);
    cmd.args(["--config", &cfg.display().to_string(), "run"])
        .env("WSMB_PASSWORD", QA_PASSWORD);
    let a = Proc::spawn(cmd).expect("agent");
    for needle in ["connected to the broker", "modem ready"] {
        assert!(
            a.wait_line(needle, Duration::from_secs(30)).is_some(),
            "agent: {}",
            a.output()
        );
    }
    a
}

/// The PDUs (hex, SMSC information first) of `text` from `sender` as a modem receives them,
/// encoded by Gammu (Debian's python3-gammu): an independent encoder for what the simulated
/// modem is given to "receive". SMSC time 2026-12-05 17:30:00.
pub fn gammu_deliver(text: &str, sender: &str) -> Vec<String> {
    let script = r#"
import datetime, json, sys, gammu
smsc = {"Location": 0, "Number": "+6281100000", "Format": "Text", "Validity": "NA", "DefaultNumber": "", "Name": ""}
parts = gammu.EncodeSMS({"Class": -1, "Entries": [{"ID": "ConcatenatedTextLong", "Buffer": sys.argv[1]}]})
out = []
for p in parts:
    p["Number"] = sys.argv[2]; p["Type"] = "Deliver"; p["SMSC"] = smsc
    p["DateTime"] = datetime.datetime(2026, 12, 5, 17, 30, 0)
    out.append(gammu.EncodePDU(p, "Deliver").hex())
print(json.dumps(out))
"#;
    let out = Command::new("/usr/bin/python3")
        .args(["-c", script, text, sender])
        .output()
        .expect("/usr/bin/python3 with python3-gammu (installed by .ci/run)");
    assert!(
        out.status.success(),
        "gammu: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("PDUs")
}
