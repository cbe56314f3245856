//! `wsmb-agent`: the gateway agent. Not built yet: see issue 3 (broker link, durable job queue,
//! AT engine, PDU codec, modem simulator). This placeholder only keeps the workspace layout.

#![forbid(unsafe_code)]

fn main() {
    eprintln!(
        "wsmb-agent {}: not implemented yet (the gateway agent is tracked in issue 3)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
