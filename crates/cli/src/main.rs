//! `graft`: the command people type. It parses flags, resolves the configuration
//! with `graft-config`, and wires the local agent, the `graft-proxy` session and
//! the user's command together; the real work lives in those libraries.

mod agent;
mod args;
mod clean;
mod cluster;
mod connect;
mod doctor;
mod failure;
mod image;
mod intercept;
mod locate;
mod ls;
mod mount;
mod open;
mod process;
mod run;
mod session_dir;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::args::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let filter = EnvFilter::try_from_env("GRAFT_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
        Command::Mount(args) => mount::mount(args).await,
        Command::AgentImage(args) => image::agent_image(args),
        Command::Connect(args) => connect::connect(*args).await,
        Command::Status(args) => connect::status(args).await,
        Command::Quit(args) => connect::quit(args).await,
        Command::Intercept(args) => intercept::intercept(*args).await,
        Command::Leave(args) => intercept::leave(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            failure.print();
            ExitCode::from(failure.code)
        }
    }
}
