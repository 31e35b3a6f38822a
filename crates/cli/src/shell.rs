//! `graft completions SHELL` and `graft man`: shell completion scripts
//! (`clap_complete`) and man pages (`clap_mangen`), both generated from the
//! same clap command as the parser, so they cannot drift from the flags.
//! `scripts/install` writes them where bash, zsh, fish and man look.

use std::path::PathBuf;

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use crate::args::Cli;
use crate::failure::Failure;

/// `graft completions` flags.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to write the completion script for.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: Shell,
}

/// `graft man` flags.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write one page per command (`graft.1`, `graft-run.1`, …) into DIR
    /// instead of printing `graft.1` to stdout.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Prints the completion script of `args.shell` to stdout.
pub fn completions(args: CompletionsArgs) -> Result<u8, Failure> {
    clap_complete::generate(
        args.shell,
        &mut Cli::command(),
        "graft",
        &mut std::io::stdout(),
    );
    Ok(0)
}

/// Prints `graft.1`, or writes every page into `--dir`.
pub fn man(args: ManArgs) -> Result<u8, Failure> {
    let written = match &args.dir {
        Some(dir) => std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), dir)),
        None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()),
    };
    // A reader that stopped reading (`| head`) is not an error.
    let written = written.or_else(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => Ok(()),
        _ => Err(e),
    });
    written.map_err(|e| {
        let place = args
            .dir
            .as_ref()
            .map_or("stdout".to_owned(), |d| d.display().to_string());
        Failure::session(format!("cannot write the man page to {place}: {e}"))
    })?;
    Ok(0)
}
