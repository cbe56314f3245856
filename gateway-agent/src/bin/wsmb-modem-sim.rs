//! `wsmb-modem-sim`: a GSM modem simulator on a pseudo-terminal, for trying the agent without
//! hardware. Point the agent's `--device` at the path it prints; every SMS the agent sends is
//! printed here, decoded.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use wsmb_agent::sim::{SimConfig, Simulator};

/// A simulated GSM modem on a pseudo-terminal.
#[derive(Parser)]
#[command(name = "wsmb-modem-sim", version, about)]
struct Args {
    /// Path of the device link to create (give it to the agent as --device)
    #[arg(long, default_value = "/tmp/wsmb-modem")]
    link: PathBuf,
    /// Lock the simulated SIM with this PIN
    #[arg(long)]
    pin: Option<String>,
    /// Delay before the modem registers on the network
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    registration_delay: Duration,
    /// Mix unsolicited lines into the modem's answers
    #[arg(long)]
    noise: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let cfg = SimConfig {
        pin: args.pin.clone(),
        registration_delay: args.registration_delay,
        ..SimConfig::default()
    };
    let sim = match Simulator::start(&args.link, cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wsmb-modem-sim: cannot create {}: {e}", args.link.display());
            return std::process::ExitCode::FAILURE;
        }
    };
    sim.set_noise(args.noise);
    let target = std::fs::read_link(&args.link)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    println!(
        "modem simulator ready at {} ({target})",
        args.link.display()
    );
    let printer = {
        let sim = sim.clone();
        async move {
            let mut seen = 0;
            loop {
                let all = sim.wait_messages(seen + 1, Duration::from_secs(3600)).await;
                for (number, text) in all.iter().skip(seen) {
                    println!("SMS to {number}: {text}");
                }
                seen = all.len();
            }
        }
    };
    tokio::select! {
        _ = printer => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    sim.disappear();
    std::process::ExitCode::SUCCESS
}
