//! `wsmb-bench suite`: starts the brokers itself (wsmb-broker in memory and SQLite mode, and
//! the original PHP broker when a checkout of it is given), pins each to CPU 0 and this process
//! to CPU 1 (`taskset`), runs the same scenarios against each, and prints one table (or JSON).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::client::Target;
use crate::scenarios::{self, Flood, FloodResult, IdleResult};

/// What the suite runs.
#[derive(Clone, Debug)]
pub struct SuiteOptions {
    /// The wsmb-broker binary.
    pub broker: PathBuf,
    /// A checkout of the original WSMessageBrocker (bin/server.php), if any.
    pub original: Option<PathBuf>,
    /// The PHP interpreter.
    pub php: String,
    /// Messages per flood.
    pub messages: u64,
    /// Idle connections to hold.
    pub idle: u64,
    /// Stored-backlog scenarios: (messages, size).
    pub backlogs: Vec<(u64, usize)>,
    /// Where state goes (SQLite files, the original's copy).
    pub dir: PathBuf,
    /// Progress on stderr.
    pub progress: bool,
}

/// One broker's figures.
#[derive(Debug, Default, Serialize)]
pub struct BrokerReport {
    /// Name in the table.
    pub name: String,
    /// RSS once started, KiB.
    pub idle_rss_kib: u64,
    /// 1 -> 1 flood.
    pub flood_1_1: Option<FloodResult>,
    /// 4 senders -> 4 receivers, every receiver gets every message.
    pub flood_4_4: Option<FloodResult>,
    /// 1 -> 1 at 2000 msg/s.
    pub paced_2000: Option<FloodResult>,
    /// 1 -> 1 at 5000 msg/s.
    pub paced_5000: Option<FloodResult>,
    /// 1 -> 1, the receiver in acknowledged mode (stored, committed, delivered, acknowledged).
    pub acked_1_1: Option<FloodResult>,
    /// RSS after the floods, KiB.
    pub after_rss_kib: u64,
    /// Idle authenticated receivers held.
    pub idle: Option<IdleResult>,
    /// Stored backlogs.
    pub backlogs: Vec<BacklogReport>,
    /// Scenarios that failed, with why.
    pub errors: Vec<String>,
}

/// A stored backlog: stored, the broker restarted on it, drained.
#[derive(Debug, Default, Serialize)]
pub struct BacklogReport {
    /// Messages.
    pub messages: u64,
    /// Bytes each.
    pub size: usize,
    /// Stored per second (every one committed before its `00`).
    pub store_per_second: f64,
    /// Largest RSS while storing, KiB.
    pub store_peak_kib: u64,
    /// Seconds from start to listening, on that state.
    pub restart_seconds: f64,
    /// Largest RSS while starting (until listening and 2 s after), KiB.
    pub restart_peak_kib: u64,
    /// Drained by a legacy receiver, per second.
    pub drain_per_second: f64,
    /// Largest RSS while draining, KiB.
    pub drain_peak_kib: u64,
    /// Messages that did not arrive.
    pub lost: u64,
}

/// A broker process under test.
struct Proc {
    child: Child,
    addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn have_taskset() -> bool {
    Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Pins this process to CPU 1 (the brokers get CPU 0).
pub fn pin_self() -> bool {
    if !have_taskset() {
        return false;
    }
    Command::new("taskset")
        .args(["-a", "-pc", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn pinned(program: &str) -> Command {
    if have_taskset() {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", program]);
        c
    } else {
        Command::new(program)
    }
}

async fn wait_listening(addr: &str, child: &mut Child) -> anyhow::Result<f64> {
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(start.elapsed().as_secs_f64());
        }
        if let Some(st) = child.try_wait()? {
            bail!("the broker exited: {st}");
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("the broker did not listen on {addr} within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const QA: &str = "qa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1";

fn wsmb_config(dir: &Path, port: u16, storage: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("broker.toml");
    let cfg = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
max_connections = 30000
[credentials]
lines = ["{QA}"]
[storage]
backend = "{storage}"
path = "{}"
max_stored_per_channel = 5000000
max_stored_total = 5000000
[log]
level = "warn"
"#,
        dir.join("broker.sqlite").display()
    );
    std::fs::write(&path, cfg)?;
    Ok(path)
}

async fn start_wsmb(opts: &SuiteOptions, config: &Path, port: u16) -> anyhow::Result<(Proc, f64)> {
    let broker = opts.broker.to_string_lossy().into_owned();
    let mut child = pinned(&broker)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {broker}"))?;
    let addr = format!("127.0.0.1:{port}");
    let t = wait_listening(&addr, &mut child).await?;
    Ok((Proc { child, addr }, t))
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let name = e.file_name();
        if name == ".git" {
            continue;
        }
        let ty = e.file_type()?;
        if ty.is_dir() {
            copy_tree(&e.path(), &to.join(&name))?;
        } else if ty.is_file() {
            std::fs::copy(e.path(), to.join(&name))?;
        }
    }
    Ok(())
}

async fn start_original(opts: &SuiteOptions, src: &Path) -> anyhow::Result<Proc> {
    let dir = opts.dir.join("original");
    let _ = std::fs::remove_dir_all(&dir);
    copy_tree(src, &dir)?;
    let port = free_port()?;
    // Raw INI parsing: "false" would be true, so 0 (see legacy-protocol.md section 7).
    std::fs::write(
        dir.join("config.ini"),
        format!(
            "[server]\nport={port}\npath=/\nnumber_of_receiver=0\nkeep_data=0\ndelay_send=0\n\
             [database]\nlimit=20\n[credential]\nsource=file\ndata[]=.htpasswd\n\
             [secret]\nuse_secret=0\n"
        ),
    )?;
    std::fs::write(dir.join(".htpasswd"), format!("{QA}\n"))?;
    patch_for_php8(&dir)?;
    let mut child = pinned(&opts.php)
        .arg("bin/server.php")
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {} bin/server.php", opts.php))?;
    let addr = format!("127.0.0.1:{port}");
    wait_listening(&addr, &mut child).await?;
    Ok(Proc { child, addr })
}

/// The original vendors Guzzle 3, whose `Url::factory` passes an empty query string where its
/// constructor types a `QueryString`: on PHP 8 every upgrade request dies with a TypeError (and
/// takes the server with it). This changes that one line of the copy, nothing else.
fn patch_for_php8(dir: &Path) -> anyhow::Result<()> {
    let p = dir.join("vendor/guzzle/http/Guzzle/Http/Url.php");
    let Ok(s) = std::fs::read_to_string(&p) else {
        return Ok(());
    };
    let old = "            $parts['query'] = QueryString::fromString($parts['query']);\n        }";
    if s.contains(old) && !s.contains("$parts['query'] = null;") {
        let new = format!("{old} else {{\n            $parts['query'] = null;\n        }}");
        std::fs::write(&p, s.replacen(old, &new, 1))?;
    }
    Ok(())
}

fn target(addr: &str) -> Target {
    Target {
        addr: addr.to_owned(),
        user: "qa".into(),
        password: "4lt0@1234".into(),
    }
}

fn flood(opts: &SuiteOptions, senders: u64, receivers: u64, rate: u64, seconds: u64) -> Flood {
    Flood {
        messages: if rate > 0 {
            rate * seconds
        } else {
            opts.messages
        },
        senders,
        receivers,
        fanout: true,
        ack: false,
        size: 200,
        rate,
        quiet: Duration::from_secs(5),
        progress: opts.progress,
    }
}

async fn settle_rss(pid: u32) -> u64 {
    tokio::time::sleep(Duration::from_millis(1000)).await;
    scenarios::rss_kib(pid).unwrap_or(0)
}

/// The floods and paced runs every broker gets.
async fn common(opts: &SuiteOptions, p: &Proc, r: &mut BrokerReport, tag: &str) {
    let t = target(&p.addr);
    let pid = p.child.id();
    let note = |r: &mut BrokerReport, what: &str, e: anyhow::Error| {
        r.errors.push(format!("{what}: {e:#}"));
    };
    eprintln!("{}: 1 -> 1 flood", r.name);
    match scenarios::flood(&t, &flood(opts, 1, 1, 0, 0), &format!("{tag}-f11")).await {
        Ok(f) => r.flood_1_1 = Some(f),
        Err(e) => note(r, "1 -> 1 flood", e),
    }
    eprintln!("{}: 4 -> 4 flood", r.name);
    match scenarios::flood(&t, &flood(opts, 4, 4, 0, 0), &format!("{tag}-f44")).await {
        Ok(f) => r.flood_4_4 = Some(f),
        Err(e) => note(r, "4 -> 4 flood", e),
    }
    for (rate, slot) in [(2000u64, 0), (5000, 1)] {
        eprintln!("{}: 1 -> 1 paced {rate}/s", r.name);
        match scenarios::flood(&t, &flood(opts, 1, 1, rate, 5), &format!("{tag}-p{rate}")).await {
            Ok(f) => {
                if slot == 0 {
                    r.paced_2000 = Some(f)
                } else {
                    r.paced_5000 = Some(f)
                }
            }
            Err(e) => note(r, &format!("paced {rate}/s"), e),
        }
    }
    r.after_rss_kib = settle_rss(pid).await;
}

/// Runs everything; returns one report per broker.
pub async fn run(opts: &SuiteOptions) -> anyhow::Result<Vec<BrokerReport>> {
    std::fs::create_dir_all(&opts.dir)?;
    let mut out = Vec::new();

    if let Some(src) = &opts.original {
        let mut r = BrokerReport {
            name: "original PHP (no DB)".into(),
            ..Default::default()
        };
        match start_original(opts, src).await {
            Ok(p) => {
                r.idle_rss_kib = settle_rss(p.child.id()).await;
                common(opts, &p, &mut r, "orig").await;
            }
            Err(e) => r.errors.push(format!("start: {e:#}")),
        }
        out.push(r);
    }

    for storage in ["memory", "sqlite"] {
        let dir = opts.dir.join(format!("wsmb-{storage}"));
        let _ = std::fs::remove_dir_all(&dir);
        let port = free_port()?;
        let config = wsmb_config(&dir, port, storage)?;
        let mut r = BrokerReport {
            name: format!("wsmb {storage}"),
            ..Default::default()
        };
        let (p, _) = start_wsmb(opts, &config, port).await?;
        let pid = p.child.id();
        r.idle_rss_kib = settle_rss(pid).await;
        common(opts, &p, &mut r, storage).await;
        let t = target(&p.addr);
        if storage == "sqlite" {
            eprintln!("{}: 1 -> 1 acknowledged", r.name);
            let mut f = flood(opts, 1, 1, 0, 0);
            f.ack = true;
            f.fanout = false;
            match scenarios::flood(&t, &f, "ack-f11").await {
                Ok(res) => r.acked_1_1 = Some(res),
                Err(e) => r.errors.push(format!("acknowledged: {e:#}")),
            }
        }
        if opts.idle > 0 {
            eprintln!("{}: {} idle receivers", r.name, opts.idle);
            match scenarios::idle(&t, pid, opts.idle, true).await {
                Ok(i) => r.idle = Some(i),
                Err(e) => r.errors.push(format!("idle: {e:#}")),
            }
        }
        let mut p = Some(p);
        if storage == "sqlite" {
            for (k, &(n, size)) in opts.backlogs.iter().enumerate() {
                let Some(cur) = p.take() else { break };
                let (next, b) = backlog(opts, cur, &config, port, n, size, k).await;
                match b {
                    Ok(b) => r.backlogs.push(b),
                    Err(e) => r.errors.push(format!("backlog {n} x {size} B: {e:#}")),
                }
                p = next;
            }
        }
        drop(p);
        out.push(r);
    }
    Ok(out)
}

/// Connects and sends one message to a probe channel until the broker answers `00` (it
/// stored it), within 60 s.
async fn ready_to_store(t: &Target) -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut ws = tokio::time::timeout_at(deadline, crate::client::connect(t))
        .await
        .context("no connection within 60 s")??;
    ws.send(Message::text(crate::client::message(
        "restart-probe",
        0,
        0,
        10,
        0,
    )))
    .await?;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => bail!("no send-result within 60 s"),
            Ok(Some(Ok(Message::Text(text)))) if text.contains("\"send-result\"") => {
                if text.contains("\"response_code\":\"00\"") {
                    return Ok(());
                }
                bail!("the probe message was refused: {text}");
            }
            Ok(Some(Ok(_))) => {}
            Ok(other) => bail!("closed before the send-result: {other:?}"),
        }
    }
}

/// Stores `n` messages, restarts the broker on them, drains them.
async fn backlog(
    opts: &SuiteOptions,
    p: Proc,
    config: &Path,
    port: u16,
    n: u64,
    size: usize,
    k: usize,
) -> (Option<Proc>, anyhow::Result<BacklogReport>) {
    let channel = format!("backlog-{k}");
    let t = target(&p.addr);
    let mut rep = BacklogReport {
        messages: n,
        size,
        ..Default::default()
    };
    eprintln!("wsmb sqlite: storing {n} x {size} B");
    match scenarios::store(&t, p.child.id(), &channel, n, size, opts.progress).await {
        Ok((rate, peak)) => {
            rep.store_per_second = rate;
            rep.store_peak_kib = peak;
        }
        Err(e) => return (Some(p), Err(e)),
    }
    drop(p);
    eprintln!("wsmb sqlite: restarting on {n} stored");
    let started = Instant::now();
    let (p, secs) = match start_wsmb(opts, config, port).await {
        Ok(x) => x,
        Err(e) => return (None, Err(e)),
    };
    // Listening comes before the store is open: ready is when a message is stored (`00`).
    let secs = match ready_to_store(&t).await {
        Ok(()) => started.elapsed().as_secs_f64(),
        Err(e) => {
            eprintln!("wsmb sqlite: not ready after the restart: {e:#}");
            secs
        }
    };
    rep.restart_seconds = secs;
    let pid = p.child.id();
    let mut peak = scenarios::rss_kib(pid).unwrap_or(0);
    while started.elapsed() < Duration::from_secs_f64(secs + 2.0) {
        peak = peak.max(scenarios::rss_kib(pid).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rep.restart_peak_kib = peak;
    eprintln!("wsmb sqlite: draining {n}");
    match scenarios::drain(&t, pid, &channel, n, opts.progress).await {
        Ok((rate, peak, got)) => {
            rep.drain_per_second = rate;
            rep.drain_peak_kib = peak;
            rep.lost = n.saturating_sub(got);
        }
        Err(e) => return (Some(p), Err(e)),
    }
    (Some(p), Ok(rep))
}

fn mb(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 / 1024.0)
}

fn rate(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn ms(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn flood_cell(f: &Option<FloodResult>) -> String {
    match f {
        None => "-".into(),
        Some(f) => {
            let mut lost = if f.lost > 0 || f.duplicates > 0 {
                format!(", {} lost, {} dup", f.lost, f.duplicates)
            } else {
                String::new()
            };
            if f.refused > 0 {
                lost.push_str(&format!(", {} refused", f.refused));
            }
            format!("{}/s, p99 {}{lost}", rate(f.per_second), ms(f.p99_us))
        }
    }
}

fn paced_cell(f: &Option<FloodResult>) -> String {
    match f {
        None => "-".into(),
        Some(f) => {
            let lost = if f.lost > 0 {
                format!(", {} lost", f.lost)
            } else {
                String::new()
            };
            format!("p50 {}, p99 {}{lost}", ms(f.p50_us), ms(f.p99_us))
        }
    }
}

/// The table, one column per broker.
pub fn table(reports: &[BrokerReport], messages: u64) -> String {
    let mut rows: Vec<(String, Vec<String>)> = vec![
        (
            "idle RSS".into(),
            reports.iter().map(|r| mb(r.idle_rss_kib)).collect(),
        ),
        (
            format!("1 -> 1 flood, {messages} msgs"),
            reports.iter().map(|r| flood_cell(&r.flood_1_1)).collect(),
        ),
        (
            format!("4 -> 4 flood, {messages} msgs to all 4"),
            reports.iter().map(|r| flood_cell(&r.flood_4_4)).collect(),
        ),
        (
            "1 -> 1 paced 2 000/s, 5 s".into(),
            reports.iter().map(|r| paced_cell(&r.paced_2000)).collect(),
        ),
        (
            "1 -> 1 paced 5 000/s, 5 s".into(),
            reports.iter().map(|r| paced_cell(&r.paced_5000)).collect(),
        ),
        (
            "1 -> 1 acknowledged (durable)".into(),
            reports.iter().map(|r| flood_cell(&r.acked_1_1)).collect(),
        ),
        (
            "RSS after the floods".into(),
            reports.iter().map(|r| mb(r.after_rss_kib)).collect(),
        ),
        (
            "idle receivers".into(),
            reports
                .iter()
                .map(|r| match &r.idle {
                    None => "-".into(),
                    Some(i) => format!(
                        "{}: +{} ({:.1} KB each)",
                        i.connections,
                        mb(i.after_kib.saturating_sub(i.before_kib)),
                        i.per_connection_bytes / 1024.0
                    ),
                })
                .collect(),
        ),
    ];
    let most = reports.iter().map(|r| r.backlogs.len()).max().unwrap_or(0);
    for k in 0..most {
        let label = reports
            .iter()
            .find_map(|r| r.backlogs.get(k))
            .map(|b| format!("backlog {} x {} B", b.messages, b.size))
            .unwrap_or_default();
        rows.push((
            format!("{label}: store"),
            reports
                .iter()
                .map(|r| match r.backlogs.get(k) {
                    None => "-".into(),
                    Some(b) => format!(
                        "{}/s, peak {}",
                        rate(b.store_per_second),
                        mb(b.store_peak_kib)
                    ),
                })
                .collect(),
        ));
        rows.push((
            format!("{label}: restart"),
            reports
                .iter()
                .map(|r| match r.backlogs.get(k) {
                    None => "-".into(),
                    Some(b) => format!(
                        "{:.2} s, peak {}",
                        b.restart_seconds,
                        mb(b.restart_peak_kib)
                    ),
                })
                .collect(),
        ));
        rows.push((
            format!("{label}: drain (legacy)"),
            reports
                .iter()
                .map(|r| match r.backlogs.get(k) {
                    None => "-".into(),
                    Some(b) => format!(
                        "{}/s, peak {}, {} lost",
                        rate(b.drain_per_second),
                        mb(b.drain_peak_kib),
                        b.lost
                    ),
                })
                .collect(),
        ));
    }
    let headers: Vec<String> = std::iter::once("scenario".to_owned())
        .chain(reports.iter().map(|r| r.name.clone()))
        .collect();
    let mut out = String::new();
    out.push_str(&format!("| {} |\n", headers.join(" | ")));
    out.push_str(&format!(
        "|{}\n",
        headers.iter().map(|_| "---|").collect::<String>()
    ));
    for (label, cells) in rows {
        if cells.iter().all(|c| c == "-") {
            continue;
        }
        out.push_str(&format!("| {label} | {} |\n", cells.join(" | ")));
    }
    for r in reports {
        for e in &r.errors {
            out.push_str(&format!("\n{}: {e}", r.name));
        }
    }
    out
}
