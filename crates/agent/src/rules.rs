//! Packet rules: the `iptables` / `ip6tables` command lines that steal a port, and
//! the runners that execute them.
//!
//! Every rule the agent installs lives in one chain of the `nat` table, named
//! `GRAFT-` + 8 random hex digits and chosen once per agent, jumped to from the
//! first rule of `PREROUTING`. Removing the agent's rules is therefore three
//! commands per family ([`cleanup_commands`]), which both the session (on every
//! orderly exit) and the watchdog (when the agent dies) run.
//!
//! The commands run in the network namespace of the calling thread: the agent's
//! threads all live in the target's namespace, so the rules land there.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::process::Stdio;

/// Prefix of every chain graft creates.
pub const CHAIN_PREFIX: &str = "GRAFT-";

/// The environment variable that carries the session secret; removed from the
/// environment of every command the agent runs.
pub const SECRET_ENV: &str = "GRAFT_AGENT_SECRET";
/// The environment variable with the SHA-256 of the session secret, as 64 hex
/// digits (agents placed in a cluster: the pod spec never holds the secret).
pub const SECRET_DIGEST_ENV: &str = "GRAFT_AGENT_SECRET_SHA256";

/// An IP family, and so which of `iptables` / `ip6tables` manages its rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4, managed with `iptables`.
    V4,
    /// IPv6, managed with `ip6tables`.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The program that manages this family's rules.
    pub fn program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

/// Why a rule command failed.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The program is not installed.
    #[error(
        "{program} is not installed on the machine the agent runs on; install iptables \
         (the package provides iptables and ip6tables)"
    )]
    Missing {
        /// `iptables` or `ip6tables`.
        program: &'static str,
    },
    /// The program could not be started.
    #[error("could not run {program}: {source}")]
    Spawn {
        /// `iptables` or `ip6tables`.
        program: &'static str,
        /// What `exec` said.
        #[source]
        source: io::Error,
    },
    /// The program ran and failed.
    #[error(
        "`{command}` failed: {stderr}; the target's network namespace needs the nat table \
         (kernel modules iptable_nat / ip6table_nat or nf_tables) and the agent needs CAP_NET_ADMIN"
    )]
    Failed {
        /// The command line.
        command: String,
        /// What it wrote on stderr (trimmed).
        stderr: String,
    },
}

impl RuleError {
    /// Whether the failure only says that the chain or rule is already gone, which
    /// cleanup treats as success.
    pub fn is_already_gone(&self) -> bool {
        match self {
            RuleError::Failed { stderr, .. } => {
                let s = stderr.to_ascii_lowercase();
                s.contains("does not exist")
                    || s.contains("no chain/target/match")
                    || s.contains("bad rule")
                    || s.contains("no such file or directory")
            }
            _ => false,
        }
    }
}

/// A fresh chain name: [`CHAIN_PREFIX`] + 8 random lowercase hex digits.
pub fn random_chain_name() -> String {
    // RandomState is seeded from the OS's random source once per process.
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{CHAIN_PREFIX}{:08x}", hasher.finish() as u32)
}

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

/// `-t nat -N CHAIN`: create the agent's chain.
pub fn create_chain(chain: &str) -> Vec<String> {
    args(&["-w", "-t", "nat", "-N", chain])
}

/// `-t nat -I PREROUTING 1 -j CHAIN`: send incoming packets through the chain first.
pub fn jump_to_chain(chain: &str) -> Vec<String> {
    args(&["-w", "-t", "nat", "-I", "PREROUTING", "1", "-j", chain])
}

/// `-t nat -A|-D CHAIN -p tcp --dport PORT -j REDIRECT --to-ports TO`: add
/// (`add`) or delete the rule that redirects `port` to the agent's listener `to`.
pub fn redirect(chain: &str, add: bool, port: u16, to: u16) -> Vec<String> {
    let port = port.to_string();
    let to = to.to_string();
    let op = if add { "-A" } else { "-D" };
    args(&[
        "-w",
        "-t",
        "nat",
        op,
        chain,
        "-p",
        "tcp",
        "--dport",
        &port,
        "-j",
        "REDIRECT",
        "--to-ports",
        &to,
    ])
}

/// The commands that remove the chain and the jump to it, in order.
pub fn cleanup_commands(chain: &str) -> [Vec<String>; 3] {
    [
        args(&["-w", "-t", "nat", "-D", "PREROUTING", "-j", chain]),
        args(&["-w", "-t", "nat", "-F", chain]),
        args(&["-w", "-t", "nat", "-X", chain]),
    ]
}

fn outcome(
    family: Family,
    argv: &[String],
    result: io::Result<std::process::Output>,
) -> Result<(), RuleError> {
    let program = family.program();
    let output = result.map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            RuleError::Missing { program }
        } else {
            RuleError::Spawn { program, source }
        }
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(RuleError::Failed {
            command: format!("{program} {}", argv.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Runs one rule command from the async runtime.
///
/// # Errors
///
/// [`RuleError`] when the program is missing, cannot start, or fails.
pub async fn run(family: Family, argv: &[String]) -> Result<(), RuleError> {
    tracing::debug!(program = family.program(), args = ?argv, "rule command");
    let result = tokio::process::Command::new(family.program())
        .args(argv)
        .env_remove(SECRET_ENV)
        .env_remove(SECRET_DIGEST_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await;
    outcome(family, argv, result)
}

/// Runs one rule command, blocking the calling thread (watchdog, exit path).
///
/// # Errors
///
/// As [`run`].
pub fn run_blocking(family: Family, argv: &[String]) -> Result<(), RuleError> {
    let result = std::process::Command::new(family.program())
        .args(argv)
        .env_remove(SECRET_ENV)
        .env_remove(SECRET_DIGEST_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    outcome(family, argv, result)
}

/// Removes the chain and the jump to it for both families, blocking; failures that
/// only say "already gone" are ignored, others are logged.
pub fn cleanup_blocking(chain: &str) {
    for family in Family::ALL {
        for argv in cleanup_commands(chain) {
            match run_blocking(family, &argv) {
                Ok(()) => {}
                Err(e) if e.is_already_gone() => {}
                Err(RuleError::Missing { .. }) => break,
                Err(e) => tracing::warn!("removing packet rules: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_are_prefixed_hex_and_differ() {
        let a = random_chain_name();
        let b = random_chain_name();
        assert_eq!(a.len(), CHAIN_PREFIX.len() + 8);
        assert!(a.starts_with(CHAIN_PREFIX));
        assert!(
            a[CHAIN_PREFIX.len()..]
                .chars()
                .all(|c| c.is_ascii_hexdigit())
        );
        assert_ne!(a, b);
    }

    #[test]
    fn steal_commands_are_the_documented_ones() {
        assert_eq!(
            create_chain("GRAFT-0badcafe").join(" "),
            "-w -t nat -N GRAFT-0badcafe"
        );
        assert_eq!(
            jump_to_chain("GRAFT-0badcafe").join(" "),
            "-w -t nat -I PREROUTING 1 -j GRAFT-0badcafe"
        );
        assert_eq!(
            redirect("GRAFT-0badcafe", true, 8080, 41234).join(" "),
            "-w -t nat -A GRAFT-0badcafe -p tcp --dport 8080 -j REDIRECT --to-ports 41234"
        );
        assert_eq!(
            redirect("GRAFT-0badcafe", false, 80, 1).join(" "),
            "-w -t nat -D GRAFT-0badcafe -p tcp --dport 80 -j REDIRECT --to-ports 1"
        );
    }

    #[test]
    fn cleanup_unhooks_then_flushes_then_deletes() {
        let cmds = cleanup_commands("GRAFT-00000001").map(|c| c.join(" "));
        assert_eq!(
            cmds,
            [
                "-w -t nat -D PREROUTING -j GRAFT-00000001",
                "-w -t nat -F GRAFT-00000001",
                "-w -t nat -X GRAFT-00000001",
            ]
        );
    }

    #[test]
    fn already_gone_messages_are_recognised() {
        let gone = |stderr: &str| RuleError::Failed {
            command: String::new(),
            stderr: stderr.into(),
        };
        assert!(gone("iptables: No chain/target/match by that name.").is_already_gone());
        assert!(
            !gone("iptables v1.8.9 (nf_tables): table `nat' is incompatible, use 'nft' tool.")
                .is_already_gone()
        );
        assert!(
            gone("iptables v1.8.9 (nf_tables): Chain 'GRAFT-1' does not exist").is_already_gone()
        );
        assert!(
            !RuleError::Missing {
                program: "iptables"
            }
            .is_already_gone()
        );
    }
}
