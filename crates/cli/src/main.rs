//! `graft`: the command people type. It parses flags, resolves the configuration
//! with `graft-config`, and wires the local agent, the `graft-proxy` session and
//! the user's command together; the real work lives in those libraries.

mod agent;
mod args;
mod clean;
mod cluster;
mod doctor;
mod failure;
mod image;
mod locate;
mod ls;
mod process;
mod run;
mod session_dir;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::args::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    // Without GRAFT_LOG, graft speaks through its own `graft: …` lines; the log
    // adds only warnings, plainly (no colours, times or module paths).
    let logging = EnvFilter::try_from_env("GRAFT_LOG").ok();
    let plain = logging.is_none();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(logging.unwrap_or_else(|| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .with_ansi(!plain && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if plain {
        subscriber.without_time().with_target(false).init();
    } else {
        subscriber.init();
    }
    let cli = Cli::parse();
    if let Err(e) = process::raise_nofile() {
        tracing::warn!("could not raise the open file limit to its maximum: {e}");
    }
    // Awaited here, not spawned: CMD and the agent must be forked from the main
    // thread for PR_SET_PDEATHSIG (see `process`).
    let result = match cli.command {
        Command::Run(args) => run::run(*args).await,
        Command::Ls(args) => ls::ls(args).await,
        Command::Doctor(args) => doctor::doctor(args).await,
        Command::Clean(args) => clean::clean(args).await,
        Command::AgentImage(args) => image::agent_image(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            failure.print();
            ExitCode::from(failure.code)
        }
    }
}
