//! `wsmb-bench`: measures a broker from the outside, over real WebSocket connections, so the
//! same run works against wsmb-broker and against the original PHP broker (or any other
//! implementation of the legacy protocol).
//!
//! - `throughput`: S senders and R receivers on one channel; senders pipeline as fast as the
//!   broker takes frames. Receivers count every item of every frame (forwarded, or rebuilt from
//!   stored rows), so loss and duplicates are seen, and nothing depends on `send-result`
//!   (which the original never sends).
//! - `latency`: one sender at a fixed rate, one receiver: p50/p99/p99.9/max.
//! - `idle`: holds N authenticated receivers and reads the broker's RSS (`--pid`).
//! - `store` / `drain`: a stored backlog, and a legacy receiver taking it.
//! - `suite`: starts the brokers itself, pins them, runs all of the above, prints one table.
//!
//! Modules: [`client`] (connections, messages, counting items), [`scenarios`] (the
//! measurements), [`suite`] (brokers as processes, the table).

#![forbid(unsafe_code)]

mod client;
mod scenarios;
mod suite;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "wsmb-bench", version, about)]
struct Cli {
    /// Broker address
    #[arg(long, default_value = "127.0.0.1:8888", global = true)]
    addr: String,
    /// User name
    #[arg(long, default_value = "qa", global = true)]
    user: String,
    /// Password
    #[arg(
        long,
        default_value = "4lt0@1234",
        env = "WSMB_PASSWORD",
        global = true
    )]
    password: String,
    /// Message size in bytes (approximate, at least 100)
    #[arg(long, default_value_t = 200, global = true)]
    size: usize,
    /// Print the results as JSON instead of a table
    #[arg(long, global = true)]
    json: bool,
    /// No progress lines on stderr
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Delivered messages per second, with loss and latency
    Throughput {
        /// Messages in total (split between senders)
        #[arg(long, default_value_t = 200_000)]
        messages: u64,
        /// Sending connections
        #[arg(long, default_value_t = 1)]
        senders: u64,
        /// Receiving connections
        #[arg(long, default_value_t = 1)]
        receivers: u64,
        /// Every receiver gets every message (number_of_receiver 0); default: each message to
        /// one receiver (1)
        #[arg(long)]
        fanout: bool,
        /// Receivers in acknowledged mode (wsmb-broker with a database)
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
    /// The broker's memory with N idle authenticated connections
    Idle {
        /// Connections
        #[arg(long, default_value_t = 10_000)]
        connections: u64,
        /// Each also registered as a receiver (on a channel of its own)
        #[arg(long)]
        receivers: bool,
        /// The broker's process id (its RSS is read from /proc)
        #[arg(long)]
        pid: u32,
    },
    /// Stores N messages on a channel nobody receives on
    Store {
        /// Messages
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        /// Channel
        #[arg(long, default_value = "bench-backlog")]
        channel: String,
        /// The broker's process id (for its RSS; 0: not read)
        #[arg(long, default_value_t = 0)]
        pid: u32,
    },
    /// A legacy receiver takes N stored messages
    Drain {
        /// Messages expected
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        /// Channel
        #[arg(long, default_value = "bench-backlog")]
        channel: String,
        /// The broker's process id (for its RSS; 0: not read)
        #[arg(long, default_value_t = 0)]
        pid: u32,
    },
    /// Starts the brokers, pins them, runs every scenario, prints one table
    Suite {
        /// The wsmb-broker binary [default: next to wsmb-bench]
        #[arg(long)]
        broker: Option<PathBuf>,
        /// A checkout of the original WSMessageBrocker (with bin/server.php), to measure it too
        #[arg(long)]
        original: Option<PathBuf>,
        /// The PHP interpreter for the original
        #[arg(long, default_value = "php")]
        php: String,
        /// Messages per flood
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        /// Idle receivers to hold (0: skip)
        #[arg(long, default_value_t = 10_000)]
        idle: u64,
        /// Skip the stored-backlog scenarios (1 000 000 x 200 B and 2 000 x 1 MB)
        #[arg(long)]
        no_backlog: bool,
        /// Where the brokers keep their state
        #[arg(long, default_value = "/tmp/wsmb-bench")]
        dir: PathBuf,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let t = client::Target {
        addr: cli.addr.clone(),
        user: cli.user.clone(),
        password: cli.password.clone(),
    };
    let progress = !cli.quiet;
    let print = |human: String, json: serde_json::Value| {
        if cli.json {
            println!("{json}");
        } else {
            println!("{human}");
        }
    };
    match cli.cmd {
        Cmd::Throughput {
            messages,
            senders,
            receivers,
            fanout,
            ack,
        } => {
            let f = scenarios::Flood {
                messages,
                senders,
                receivers,
                fanout,
                ack,
                size: cli.size,
                rate: 0,
                quiet: Duration::from_secs(5),
                progress,
            };
            let r = scenarios::flood(&t, &f, "bench-throughput").await?;
            print(
                format!(
                    "throughput{}: {messages} messages of {} bytes, {senders} sender(s) -> \
                     {receivers} receiver(s){}: {:.0} deliveries/s ({:.2} s), {} of {} \
                     delivered, {} lost, {} refused by the broker, {} duplicates; latency p50 \
                     {:.0} us, p99 {:.0} us, max {:.0} us",
                    if ack { " (acknowledged)" } else { "" },
                    cli.size,
                    if fanout { ", each to all" } else { "" },
                    r.per_second,
                    r.seconds,
                    r.received,
                    r.expected,
                    r.lost,
                    r.refused,
                    r.duplicates,
                    r.p50_us,
                    r.p99_us,
                    r.max_us
                ),
                serde_json::to_value(&r)?,
            );
        }
        Cmd::Latency { rate, seconds } => {
            let f = scenarios::Flood {
                messages: rate * seconds,
                senders: 1,
                receivers: 1,
                fanout: false,
                ack: false,
                size: cli.size,
                rate,
                quiet: Duration::from_secs(5),
                progress,
            };
            let r = scenarios::flood(&t, &f, "bench-latency").await?;
            print(
                format!(
                    "latency at {rate} msgs/s for {seconds} s ({} messages of {} bytes): p50 \
                     {:.0} us, p99 {:.0} us, p99.9 {:.0} us, max {:.0} us; {} lost",
                    r.expected, cli.size, r.p50_us, r.p99_us, r.p999_us, r.max_us, r.lost
                ),
                serde_json::to_value(&r)?,
            );
        }
        Cmd::Idle {
            connections,
            receivers,
            pid,
        } => {
            let r = scenarios::idle(&t, pid, connections, receivers).await?;
            print(
                format!(
                    "{connections} idle {}: broker RSS {:.1} MB -> {:.1} MB, {:.0} bytes \
                     each",
                    if receivers {
                        "receivers"
                    } else {
                        "connections"
                    },
                    r.before_kib as f64 / 1024.0,
                    r.after_kib as f64 / 1024.0,
                    r.per_connection_bytes
                ),
                serde_json::to_value(&r)?,
            );
        }
        Cmd::Store {
            messages,
            channel,
            pid,
        } => {
            let (rate, peak) =
                scenarios::store(&t, pid, &channel, messages, cli.size, progress).await?;
            print(
                format!(
                    "stored {messages} messages of {} bytes: {rate:.0}/s; broker RSS peak {:.1} MB",
                    cli.size,
                    peak as f64 / 1024.0
                ),
                serde_json::json!({"messages": messages, "per_second": rate, "peak_kib": peak}),
            );
        }
        Cmd::Drain {
            messages,
            channel,
            pid,
        } => {
            let (rate, peak, got) = scenarios::drain(&t, pid, &channel, messages, progress).await?;
            print(
                format!(
                    "drained {got} of {messages}: {rate:.0}/s; broker RSS peak {:.1} MB",
                    peak as f64 / 1024.0
                ),
                serde_json::json!({"received": got, "per_second": rate, "peak_kib": peak}),
            );
        }
        Cmd::Suite {
            broker,
            original,
            php,
            messages,
            idle,
            no_backlog,
            dir,
        } => {
            let broker = match broker {
                Some(b) => b,
                None => std::env::current_exe()?
                    .parent()
                    .map(|d| d.join("wsmb-broker"))
                    .ok_or_else(|| anyhow::anyhow!("cannot find wsmb-broker; use --broker"))?,
            };
            if !suite::pin_self() {
                eprintln!("taskset not found: the brokers and the bench are not pinned");
            }
            let opts = suite::SuiteOptions {
                broker,
                original,
                php,
                messages,
                idle,
                backlogs: if no_backlog {
                    Vec::new()
                } else {
                    vec![(1_000_000, 200), (2_000, 1_000_000)]
                },
                dir,
                progress,
            };
            let reports = suite::run(&opts).await?;
            print(
                suite::table(&reports, messages),
                serde_json::to_value(&reports)?,
            );
        }
    }
    Ok(())
}
