//! `graft config`: the `graft.toml` JSON Schema (`graft config schema`) and a
//! check of a config file (`graft config check [FILE]`) that says on which line
//! a problem is. Both are `graft_config::schema`'s; this prints them.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use graft_config::schema::{self, Format};

use crate::failure::Failure;

/// `graft config` flags.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ConfigCommand,
}

/// The `graft config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the JSON Schema of graft.toml (also valid for graft.json and
    /// graft.yaml), for editors: taplo / Even Better TOML, VS Code.
    #[command(after_help = "Example:\n  graft config schema > graft.schema.json")]
    Schema,
    /// Check a config file as `graft run` would load it; say on which line
    /// each problem is.
    #[command(after_help = "Example:\n  graft config check graft.toml")]
    Check {
        /// The file [default: ./graft.toml, else ./graft.json, ./graft.yaml].
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

/// Runs `graft config`.
pub fn config(args: ConfigArgs) -> Result<u8, Failure> {
    match args.command {
        ConfigCommand::Schema => {
            let schema = schema::json_schema();
            crate::output::print_json(&schema)?;
            Ok(0)
        }
        ConfigCommand::Check { file } => {
            let path = match file {
                Some(path) => path,
                None => schema::default_file(Path::new(".")).ok_or_else(|| {
                    Failure::usage(
                        "no config file here: none of ./graft.toml, ./graft.json, \
                         ./graft.yaml, ./graft.yml exists",
                    )
                    .hint("name the file: graft config check FILE")
                })?,
            };
            println!("{}", check_file(&path)?);
            Ok(0)
        }
    }
}

/// Checks the file at `path`: `FILE: OK` when valid.
///
/// # Errors
///
/// A usage failure `FILE:LINE:COLUMN: message` (the position when known), or
/// one saying the file cannot be read.
pub fn check_file(path: &Path) -> Result<String, Failure> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("cannot read config file {shown}: {e}")))?;
    match schema::check(&text, Format::of(path)) {
        Ok(_) => Ok(format!("{shown}: OK")),
        Err(problem) => Err(Failure::usage(match problem.position {
            Some((line, column)) => format!("{shown}:{line}:{column}: {}", problem.message),
            None => format!("{shown}: {}", problem.message),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("graft.toml");
        std::fs::write(&good, "target = \"deploy/api\"\n").unwrap();
        assert_eq!(
            check_file(&good).unwrap(),
            format!("{}: OK", good.display())
        );

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "target = \"deploy/api\"\n[fs]\nmode = \"cloud\"\n").unwrap();
        let err = check_file(&bad).unwrap_err();
        assert_eq!(err.code, crate::failure::EXIT_USAGE);
        let prefix = format!("{}:3:8: ", bad.display());
        assert!(err.message.starts_with(&prefix), "{}", err.message);

        let missing = check_file(&dir.path().join("nope.toml")).unwrap_err();
        assert!(
            missing.message.contains("cannot read"),
            "{}",
            missing.message
        );
    }
}
