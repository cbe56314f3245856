//! The `wsmb-agent` binary; everything is in the library.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    wsmb_agent::cli::main()
}
