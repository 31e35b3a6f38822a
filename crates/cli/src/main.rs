//! `graft`: the command people type. It parses flags, resolves the configuration
//! with `graft-config`, and wires the local agent, the `graft-proxy` session and
//! the user's command together; the real work lives in those libraries.

mod agent;
mod args;
mod clean;
mod cluster;
mod config;
mod connect;
mod copy;
mod doctor;
mod expose;
mod failure;
mod front;
mod image;
mod intercept;
mod isolate;
mod kubectl;
mod locate;
mod ls;
mod mount;
mod open;
mod output;
mod port_forward;
mod process;
mod record;
mod replay;
mod run;
mod session_dir;
mod shadow;
mod shell;
mod targets;
mod tls;
mod ui;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::args::{Cli, Command};

fn main() -> ExitCode {
    // The isolated namespace's helper must still be single-threaded when it
    // enters a user namespace: it starts before any runtime.
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == isolate::HELPER_ARG) {
        return isolate::helper_main(args.collect());
    }
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(graft()),
        Err(e) => {
            eprintln!("graft: cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn graft() -> ExitCode {
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
    let cli = match kubectl::args(std::env::args_os()) {
        Ok(argv) => Cli::parse_from(argv),
        Err(failure) => {
            failure.print();
            return ExitCode::from(failure.code);
        }
    };
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
        Command::Targets(args) => targets::targets(args).await,
        Command::Config(args) => config::config(args),
        Command::Completions(args) => shell::completions(args),
        Command::Man(args) => shell::man(args),
        Command::PortForward(args) => port_forward::port_forward(*args).await,
        Command::Expose(args) => expose::expose(*args).await,
        Command::Connect(args) => connect::connect(*args).await,
        Command::Status(args) => connect::status(args).await,
        Command::Quit(args) => connect::quit(args).await,
        Command::Intercept(args) => intercept::intercept(*args).await,
        Command::Leave(args) => intercept::leave(args),
        Command::Record(args) => record::record(*args).await,
        Command::Replay(args) => replay::replay(*args).await,
        Command::Ui(args) => ui::ui(args).await,
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            failure.print();
            ExitCode::from(failure.code)
        }
    }
}
