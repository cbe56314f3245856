//! The measurements, each against a running broker: floods, paced latency, idle connections,
//! stored backlogs. Each returns figures; `report` prints them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Target, Ws};

type WsSink = futures_util::stream::SplitSink<Ws, Message>;

/// How a flood is run.
#[derive(Clone, Debug)]
pub struct Flood {
    /// Messages sent in all (split between senders).
    pub messages: u64,
    /// Sending connections.
    pub senders: u64,
    /// Receiving connections.
    pub receivers: u64,
    /// Every receiver gets every message (`number_of_receiver` 0); else each message goes to
    /// one of them (1).
    pub fanout: bool,
    /// Receivers in acknowledged mode.
    pub ack: bool,
    /// Message size.
    pub size: usize,
    /// Messages per second per sender (0 = as fast as the broker takes them).
    pub rate: u64,
    /// Give up this long after the last item arrived.
    pub quiet: Duration,
    /// Print progress lines.
    pub progress: bool,
}

/// What a flood measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FloodResult {
    /// Items expected at the receivers.
    pub expected: u64,
    /// Items received (duplicates included).
    pub received: u64,
    /// Items received more than once by the same receiver.
    pub duplicates: u64,
    /// Expected items that never arrived (items of refused messages not counted).
    pub lost: u64,
    /// Messages the broker refused with a `send-result` other than `00` (a full store, a
    /// cap): told to the sender, so not lost.
    pub refused: u64,
    /// From the first send to the last expected item (or to the last item seen).
    pub seconds: f64,
    /// Deliveries per second over `seconds`.
    pub per_second: f64,
    /// Send-to-receive latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Worst.
    pub max_us: f64,
}

struct Rx {
    seen: Vec<u8>,
    lat: Vec<u64>,
    dup: u64,
}

/// Runs a flood (or, with `rate`, a paced stream) over channel `channel`.
pub async fn flood(t: &Target, f: &Flood, channel: &str) -> anyhow::Result<FloodResult> {
    let origin = Instant::now();
    let per_sender = f.messages / f.senders.max(1);
    let total = per_sender * f.senders.max(1);
    let expected = if f.fanout { total * f.receivers } else { total };
    let got = Arc::new(AtomicU64::new(0));
    let last = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut rx_tasks = Vec::new();
    for _ in 0..f.receivers {
        let mut ws = client::connect(t).await?;
        ws.send(client::receive(channel, f.ack)).await?;
        rx_tasks.push(ws);
    }
    // Ready when a probe sent to all of them has arrived everywhere (no ping: the original
    // would stop treating a receiver that pings as one).
    let mut probe = client::connect(t).await?;
    probe
        .send(Message::text(client::message(
            channel,
            u64::MAX / 2,
            0,
            100,
            0,
        )))
        .await?;
    let mut ready = Vec::new();
    for mut ws in rx_tasks {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let m = tokio::time::timeout_at(deadline, ws.next())
                .await
                .map_err(|_| anyhow::anyhow!("a receiver never got the probe message"))?;
            match m {
                Some(Ok(Message::Text(text))) => {
                    if text.contains(&format!("\"id\":\"{}\"", u64::MAX / 2)) {
                        if let Some(id) = client::deliver_id(&text) {
                            let mut ids = vec![id.to_owned()];
                            ws.send(Message::text(client::ack_frame(&mut ids))).await?;
                        }
                        break;
                    }
                }
                Some(Ok(_)) => {}
                other => anyhow::bail!("receiver closed before the probe: {other:?}"),
            }
        }
        ready.push(ws);
    }
    drop(probe);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut handles = Vec::new();
    for ws in ready {
        let got = Arc::clone(&got);
        let last = Arc::clone(&last);
        let ack = f.ack;
        let n = total as usize;
        let stop = stop_rx.clone();
        handles.push(tokio::spawn(receive(ws, ack, n, origin, got, last, stop)));
    }
    let start = Instant::now();
    let mut tx_tasks = Vec::new();
    for s in 0..f.senders {
        let ws = client::connect(t).await?;
        let (size, rate, channel) = (f.size, f.rate, channel.to_owned());
        let limit = if f.fanout { 0 } else { 1 };
        let refused = Arc::clone(&refused);
        tx_tasks.push(tokio::spawn(send(
            ws,
            refused,
            channel,
            s * per_sender,
            per_sender,
            size,
            rate,
            limit,
            origin,
        )));
    }
    // Wait for everything, or for silence.
    let mut last_count = 0;
    let mut last_change = Instant::now();
    let mut last_print = Instant::now();
    let per_refused = if f.fanout { f.receivers } else { 1 };
    loop {
        let n = got.load(Ordering::Relaxed) + refused.load(Ordering::Relaxed) * per_refused;
        if n >= expected {
            break;
        }
        if n != last_count {
            last_count = n;
            last_change = Instant::now();
        } else if last_change.elapsed() > f.quiet
            && tx_tasks
                .iter()
                .all(|t: &tokio::task::JoinHandle<_>| t.is_finished())
        {
            break;
        }
        if f.progress && last_print.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "  ... {n} of {expected} delivered ({:.0}/s)",
                n as f64 / start.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let end_ns = last.load(Ordering::Relaxed);
    let seconds = (end_ns as f64 / 1e9 - (start - origin).as_secs_f64()).max(1e-9);
    for t in tx_tasks {
        if t.is_finished() {
            if let Ok(Ok((_, drain))) = t.await {
                drain.abort();
            }
        } else {
            t.abort();
        }
    }
    let mut lat = Vec::new();
    let mut received = 0;
    let mut dup = 0;
    let _ = stop_tx.send(true);
    for h in handles {
        if let Ok(Some(rx)) = h.await.map(|r| r.ok()) {
            received += rx.lat.len() as u64;
            dup += rx.dup;
            lat.extend(rx.lat);
        }
    }
    let received = received.max(got.load(Ordering::Relaxed));
    let refused = refused.load(Ordering::Relaxed);
    let expected_here = expected.saturating_sub(refused * per_refused);
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0
        }
    };
    Ok(FloodResult {
        expected,
        received,
        duplicates: dup,
        lost: expected_here.saturating_sub(received.saturating_sub(dup)),
        refused,
        seconds,
        per_second: (received.min(expected)) as f64 / seconds,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        max_us: pct(1.0),
    })
}

#[allow(clippy::too_many_arguments)]
async fn send(
    ws: Ws,
    refused: Arc<AtomicU64>,
    channel: String,
    first: u64,
    count: u64,
    size: usize,
    rate: u64,
    limit: u32,
    origin: Instant,
) -> anyhow::Result<(WsSink, tokio::task::JoinHandle<()>)> {
    let (mut sink, mut stream) = ws.split();
    // Read replies (legacy brokers send none), so the broker never has to hold them back, and
    // count the messages it refused (a `send-result` of one message each, since every frame
    // holds one).
    let drain = tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            if let Message::Text(text) = m {
                if text.starts_with("{\"command\":\"send-result\"")
                    && !text.contains("\"response_code\":\"00\"")
                {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    let mut tick = (rate > 0).then(|| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    });
    for i in 0..count {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
            sink.send(Message::text(client::message(
                &channel,
                first + i,
                client::since(origin),
                size,
                limit,
            )))
            .await?;
        } else {
            sink.feed(Message::text(client::message(
                &channel,
                first + i,
                client::since(origin),
                size,
                limit,
            )))
            .await?;
            if i % 64 == 63 {
                sink.flush().await?;
            }
        }
    }
    sink.flush().await?;
    // Done sending; the connection stays open (sink and reader held) until the flood is over.
    Ok((sink, drain))
}

async fn receive(
    ws: Ws,
    ack: bool,
    n: usize,
    origin: Instant,
    got: Arc<AtomicU64>,
    last: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Rx> {
    let (mut sink, mut stream) = ws.split();
    let mut rx = Rx {
        seen: vec![0u8; n],
        lat: Vec::with_capacity(n),
        dup: 0,
    };
    let mut ids: Vec<String> = Vec::new();
    let mut buf = Vec::new();
    loop {
        let next = if ack && !ids.is_empty() {
            match tokio::time::timeout(Duration::from_millis(2), stream.next()).await {
                Ok(n) => n,
                Err(_) => {
                    sink.send(Message::text(client::ack_frame(&mut ids)))
                        .await?;
                    continue;
                }
            }
        } else {
            tokio::select! {
                n = stream.next() => n,
                _ = stop.changed() => return Ok(rx),
            }
        };
        if *stop.borrow() {
            return Ok(rx);
        }
        let text = match next {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            _ => return Ok(rx),
        };
        buf.clear();
        client::items(&text, &mut buf);
        let now = client::since(origin);
        let mut counted = 0;
        for &(seq, ns) in &buf {
            let Some(s) = rx.seen.get_mut(seq as usize) else {
                continue; // the probe
            };
            if *s > 0 {
                rx.dup += 1;
            }
            *s = s.saturating_add(1);
            rx.lat.push(now.saturating_sub(ns));
            counted += 1;
        }
        if counted > 0 {
            got.fetch_add(counted, Ordering::Relaxed);
            last.store(now, Ordering::Relaxed);
        }
        if ack {
            if let Some(id) = client::deliver_id(&text) {
                ids.push(id.to_owned());
                if ids.len() >= 256 {
                    sink.send(Message::text(client::ack_frame(&mut ids)))
                        .await?;
                }
            }
        }
    }
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// What holding idle connections costs the broker.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IdleResult {
    /// Connections held.
    pub connections: u64,
    /// Broker RSS before, KiB.
    pub before_kib: u64,
    /// Broker RSS with them open, KiB.
    pub after_kib: u64,
    /// Per connection, bytes.
    pub per_connection_bytes: f64,
}

/// Opens `n` authenticated connections, each registered as a receiver on its own channel
/// when `receivers`, and measures the broker's RSS.
pub async fn idle(t: &Target, pid: u32, n: u64, receivers: bool) -> anyhow::Result<IdleResult> {
    let before = rss_kib(pid).unwrap_or(0);
    let mut conns = Vec::with_capacity(n as usize);
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0;
    while i < n {
        // a few at a time: bcrypt or apr1 checks are the slow part
        while tasks.len() < 64 && i < n {
            let t = t.clone();
            let k = i;
            tasks.spawn(async move {
                let mut ws = client::connect(&t).await?;
                if receivers {
                    ws.send(client::receive(&format!("idle-{k}"), false))
                        .await?;
                }
                anyhow::Ok(ws)
            });
            i += 1;
        }
        if let Some(r) = tasks.join_next().await {
            conns.push(r??);
        }
    }
    while let Some(r) = tasks.join_next().await {
        conns.push(r??);
    }
    // let the broker settle (buffers given back after the handshakes)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid).unwrap_or(0);
    drop(conns);
    Ok(IdleResult {
        connections: n,
        before_kib: before,
        after_kib: after,
        per_connection_bytes: (after.saturating_sub(before) * 1024) as f64 / n.max(1) as f64,
    })
}

/// Stores `n` messages of `size` bytes on `channel` (nobody receives there): waits for every
/// `send-result`. Returns messages per second, and the broker's largest RSS meanwhile (KiB).
pub async fn store(
    t: &Target,
    pid: u32,
    channel: &str,
    n: u64,
    size: usize,
    progress: bool,
) -> anyhow::Result<(f64, u64)> {
    let ws = client::connect(t).await?;
    let (mut sink, mut stream) = ws.split();
    let origin = Instant::now();
    let ch = channel.to_owned();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            sink.feed(Message::text(client::message(&ch, i, 0, size, 1)))
                .await?;
            if i % 32 == 31 {
                sink.flush().await?;
            }
        }
        sink.flush().await?;
        anyhow::Ok(sink)
    });
    let mut ok = 0;
    let mut peak = 0;
    let mut last_print = Instant::now();
    while ok < n {
        let m = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .map_err(|_| anyhow::anyhow!("no reply for 30 s after {ok} stored"))?;
        match m {
            Some(Ok(Message::Text(text))) if text.starts_with("{\"command\":\"send-result\"") => {
                if !text.contains("\"response_code\":\"00\"") {
                    anyhow::bail!("not stored: {text}");
                }
                ok += 1;
                if ok % 1000 == 0 {
                    peak = peak.max(rss_kib(pid).unwrap_or(0));
                }
                if progress && last_print.elapsed() > Duration::from_secs(2) {
                    eprintln!("  ... {ok} of {n} stored");
                    last_print = Instant::now();
                }
            }
            Some(Ok(_)) => {}
            other => anyhow::bail!("the connection ended after {ok} stored: {other:?}"),
        }
    }
    let _ = sender.await;
    peak = peak.max(rss_kib(pid).unwrap_or(0));
    Ok((n as f64 / origin.elapsed().as_secs_f64(), peak))
}

/// A legacy receiver takes the `n` stored messages of `channel`. Returns deliveries per
/// second, the broker's largest RSS meanwhile, and how many arrived.
pub async fn drain(
    t: &Target,
    pid: u32,
    channel: &str,
    n: u64,
    progress: bool,
) -> anyhow::Result<(f64, u64, u64)> {
    let mut ws = client::connect(t).await?;
    ws.send(client::receive(channel, false)).await?;
    let origin = Instant::now();
    let mut got = 0u64;
    let mut peak = 0;
    let mut buf = Vec::new();
    let mut last_print = Instant::now();
    let mut frames = 0u64;
    while got < n {
        let m = match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(m) => m,
            Err(_) => break,
        };
        match m {
            Some(Ok(Message::Text(text))) => {
                buf.clear();
                client::items(&text, &mut buf);
                got += buf.len() as u64;
                frames += 1;
                if frames % 64 == 0 {
                    peak = peak.max(rss_kib(pid).unwrap_or(0));
                }
                if progress && last_print.elapsed() > Duration::from_secs(2) {
                    eprintln!("  ... {got} of {n} received");
                    last_print = Instant::now();
                }
            }
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    peak = peak.max(rss_kib(pid).unwrap_or(0));
    Ok((got as f64 / origin.elapsed().as_secs_f64(), peak, got))
}
