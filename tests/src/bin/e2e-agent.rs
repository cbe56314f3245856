//! `wsmb-agent`, built inside the end-to-end test package (see Cargo.toml).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    wsmb_agent::cli::main()
}
