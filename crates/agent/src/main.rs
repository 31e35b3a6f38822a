//! `graft-agent`: parses the command line, sets up logging on stderr and runs
//! the agent (the library, `graft_agent`), whose exit codes it returns.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = graft_agent::Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match graft_agent::run(args) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("{:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}
