//! `wsmb-bench`: measures a broker from the outside, over real WebSocket connections, so the
//! same run works against wsmb-broker and against the legacy PHP broker.
//!
//! - `throughput`: S senders and R receivers on one channel, each message to one receiver
//!   (`number_of_receiver: 1`); senders pipeline as fast as the broker takes frames. Prints
//!   delivered messages per second.
//! - `latency`: one sender at a fixed rate, one receiver; prints p50/p99/max of send-to-receive
//!   time (both ends in this process, one clock).

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{WebSocketStream, client_async};

#[derive(Parser)]
#[command(name = "wsmb-bench", version, about)]
struct Cli {
    /// Broker address
    #[arg(long, default_value = "127.0.0.1:8888")]
    addr: String,
    /// User name
    #[arg(long, default_value = "qa")]
    user: String,
    /// Password
    #[arg(long, default_value = "4lt0@1234", env = "WSMB_PASSWORD")]
    password: String,
    /// Message size in bytes (approximate, at least 100)
    #[arg(long, default_value_t = 200)]
    size: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Delivered messages per second
    Throughput {
        /// Messages in total
        #[arg(long, default_value_t = 200_000)]
        messages: u64,
        /// Sending connections
        #[arg(long, default_value_t = 1)]
        senders: u64,
        /// Receiving connections
        #[arg(long, default_value_t = 1)]
        receivers: u64,
        /// Receivers in acknowledged mode (a broker with a database): each delivery is
        /// acknowledged, in batches
        #[arg(long)]
        ack: bool,
    },
    /// Latency percentiles at a fixed rate
    Latency {
        /// Messages per second
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        /// Seconds
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

type Ws = WebSocketStream<TcpStream>;

async fn connect(cli: &Cli) -> anyhow::Result<Ws> {
    use base64::Engine as _;
    let mut req = format!("ws://{}/", cli.addr).into_client_request()?;
    let token =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", cli.user, cli.password));
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Basic {token}"))?,
    );
    let tcp = TcpStream::connect(&cli.addr)
        .await
        .with_context(|| format!("connect to {}", cli.addr))?;
    tcp.set_nodelay(true)?;
    let (mut ws, _) = client_async(req, tcp).await?;
    // the connect frame
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.contains("\"00\"") => Ok(ws),
        other => bail!("not accepted: {other:?}"),
    }
}

async fn receiver(cli: &Cli, channel: &str, ack: bool) -> anyhow::Result<Ws> {
    let mut ws = connect(cli).await?;
    let mode = if ack {
        r#","protocol":2,"ack":true,"window":1024"#
    } else {
        ""
    };
    ws.send(Message::text(format!(
        r#"{{"command":"receive-message","channel":"{channel}"{mode},"data":[]}}"#
    )))
    .await?;
    ws.send(Message::text(r#"{"command":"ping"}"#)).await?;
    // wait for the ping reply so the subscription is in place
    while let Some(m) = ws.next().await {
        if let Message::Text(t) = m? {
            if t.contains("\"connect\"") {
                break;
            }
        }
    }
    Ok(ws)
}

fn message(channel: &str, seq: u64, sent_ns: u64, size: usize) -> String {
    let head = format!(
        r#"{{"command":"send-message","channel":"{channel}","number_of_receiver":1,"data":[{{"id":"{seq}","t":{sent_ns},"p":""#
    );
    let pad = size.saturating_sub(head.len() + 4).max(1);
    format!("{head}{}\"}}]}}", "x".repeat(pad))
}

/// The `"t":` value of a forwarded message.
fn sent_ns(text: &str) -> Option<u64> {
    let i = text.find("\"t\":")? + 4;
    let rest = &text[i..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Arc::new(Cli::parse());
    match cli.cmd {
        Cmd::Throughput {
            messages,
            senders,
            receivers,
            ack,
        } => throughput(cli.clone(), messages, senders, receivers, ack).await,
        Cmd::Latency { rate, seconds } => latency(cli.clone(), rate, seconds).await,
    }
}

/// The `message_id` of a `deliver` frame.
fn message_id(text: &str) -> Option<&str> {
    let i = text.find("\"message_id\":\"")? + 14;
    let rest = &text[i..];
    Some(&rest[..rest.find('"')?])
}

fn ack_frame(ids: &mut Vec<String>) -> String {
    let list: Vec<String> = ids.drain(..).map(|i| format!("\"{i}\"")).collect();
    format!(r#"{{"command":"ack","data":[{}]}}"#, list.join(","))
}

async fn throughput(
    cli: Arc<Cli>,
    messages: u64,
    senders: u64,
    receivers: u64,
    ack: bool,
) -> anyhow::Result<()> {
    let channel = "bench-throughput";
    let got = Arc::new(AtomicU64::new(0));
    let mut rx_tasks = Vec::new();
    for _ in 0..receivers {
        let ws = receiver(&cli, channel, ack).await?;
        let got = Arc::clone(&got);
        rx_tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let mut ids: Vec<String> = Vec::new();
            loop {
                // Acknowledge in batches: when 256 are pending, or when no frame is waiting.
                let next = match tokio::time::timeout(Duration::from_millis(2), stream.next()).await
                {
                    Ok(n) => n,
                    Err(_) => {
                        if !ids.is_empty()
                            && sink.send(Message::text(ack_frame(&mut ids))).await.is_err()
                        {
                            break;
                        }
                        continue;
                    }
                };
                match next {
                    Some(Ok(Message::Text(t))) => {
                        if ack {
                            let Some(id) = message_id(&t) else { continue };
                            ids.push(id.to_owned());
                            if ids.len() >= 256
                                && sink.send(Message::text(ack_frame(&mut ids))).await.is_err()
                            {
                                break;
                            }
                        }
                        got.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
        }));
    }
    let per_sender = messages / senders;
    let start = Instant::now();
    let mut tx_tasks = Vec::new();
    for s in 0..senders {
        let ws = connect(&cli).await?;
        let size = cli.size;
        tx_tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            // drain the send-results so the broker never has to hold them back
            let drain = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
            for i in 0..per_sender {
                let m = message(channel, s * per_sender + i, 0, size);
                if sink.feed(Message::text(m)).await.is_err() {
                    break;
                }
                if i % 64 == 63 && sink.flush().await.is_err() {
                    break;
                }
            }
            let _ = sink.flush().await;
            (sink, drain)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let total = per_sender * senders;
    while got.load(Ordering::Relaxed) < total {
        if Instant::now() > deadline {
            bail!(
                "only {} of {total} messages arrived",
                got.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "throughput{}: {total} messages of {} bytes, {senders} sender(s) -> {receivers} receiver(s): {:.0} msgs/s ({secs:.2} s)",
        if ack { " (acknowledged)" } else { "" },
        cli.size,
        total as f64 / secs
    );
    for t in rx_tasks {
        t.abort();
    }
    for t in tx_tasks {
        t.abort();
    }
    Ok(())
}

async fn latency(cli: Arc<Cli>, rate: u64, seconds: u64) -> anyhow::Result<()> {
    let channel = "bench-latency";
    let mut rx = receiver(&cli, channel, false).await?;
    let ws = connect(&cli).await?;
    let (mut sink, mut stream) = ws.split();
    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    let origin = Instant::now();
    let total = rate * seconds;
    let size = cli.size;
    let sender = tokio::spawn(async move {
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for i in 0..total {
            tick.tick().await;
            let ns = origin.elapsed().as_nanos() as u64;
            if sink
                .send(Message::text(message(channel, i, ns, size)))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut lat = Vec::with_capacity(total as usize);
    while (lat.len() as u64) < total {
        match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Some(ns) = sent_ns(&t) {
                    lat.push(origin.elapsed().as_nanos() as u64 - ns);
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => bail!("receiver stopped after {} messages", lat.len()),
        }
    }
    sender.await?;
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "latency at {rate} msgs/s for {seconds} s ({} messages of {} bytes): p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, max {:.0} us",
        lat.len(),
        size,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
    Ok(())
}
