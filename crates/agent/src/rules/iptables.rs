//! The iptables backend: the `iptables` / `ip6tables` command lines that steal a
//! port, the node's flavour of iptables, and the runners that execute them.
//!
//! Every rule lives in one chain of the `nat` table, named like the agent
//! (`GRAFT-` + 8 random hex digits), jumped to from the first rule of
//! `PREROUTING`. Removing the agent's rules is therefore three commands per
//! family ([`cleanup_commands`]), which the agent (on every orderly exit), its
//! watchdog (when the agent dies) and the next agent (for chains whose agent and
//! watchdog are both gone, see [`super::stale`]) run.
//!
//! Two implementations share the `iptables` command line and the kernel: the
//! legacy one (`ip_tables` modules) and the nf_tables one (`iptables-nft`).
//! Rules of one are invisible to the other, so the agent writes with the flavour
//! the target's namespace already uses ([`Flavour::detect`], the way
//! Kubernetes' iptables-wrapper picks: the one holding more rules), and the
//! system's `iptables` when neither holds any.
//!
//! The commands run in the network namespace of the calling thread: the agent's
//! threads all live in the target's namespace, so the rules land there.

use std::io;
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::OnceLock;

use super::{SECRET_DIGEST_ENV, SECRET_ENV};

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

    fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }

    fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Which implementation of iptables writes the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// `iptables-legacy`: the `ip_tables` kernel modules.
    Legacy,
    /// `iptables-nft`: nf_tables behind the iptables command line.
    Nft,
    /// Whatever `iptables` is on `PATH`.
    System,
}

impl Flavour {
    /// Every flavour whose rules can exist side by side.
    pub const DISTINCT: [Flavour; 2] = [Flavour::Legacy, Flavour::Nft];

    /// The program that manages `family`'s rules in this flavour.
    pub fn program(self, family: Family) -> &'static str {
        match (self, family) {
            (Flavour::Legacy, Family::V4) => "iptables-legacy",
            (Flavour::Legacy, Family::V6) => "ip6tables-legacy",
            (Flavour::Nft, Family::V4) => "iptables-nft",
            (Flavour::Nft, Family::V6) => "ip6tables-nft",
            (Flavour::System, Family::V4) => "iptables",
            (Flavour::System, Family::V6) => "ip6tables",
        }
    }

    /// The program that dumps `family`'s rules in this flavour.
    pub fn save_program(self, family: Family) -> String {
        format!("{}-save", self.program(family))
    }

    /// The byte that names this flavour to the watchdog.
    pub fn to_byte(self) -> u8 {
        match self {
            Flavour::Legacy => b'L',
            Flavour::Nft => b'N',
            Flavour::System => b'S',
        }
    }

    /// The flavour a watchdog byte names.
    pub fn from_byte(byte: u8) -> Option<Flavour> {
        match byte {
            b'L' => Some(Flavour::Legacy),
            b'N' => Some(Flavour::Nft),
            b'S' => Some(Flavour::System),
            _ => None,
        }
    }

    /// The flavour the target's namespace uses: of `iptables-legacy` and
    /// `iptables-nft`, the one whose dump holds more rules; the system's
    /// `iptables` when they hold as many (none, usually) or are not installed.
    pub async fn detect() -> Flavour {
        let mut counts = Vec::new();
        for flavour in Flavour::DISTINCT {
            if let Some(dump) = save(flavour, Family::V4).await {
                counts.push((
                    flavour,
                    dump.lines().filter(|l| l.starts_with("-A ")).count(),
                ));
            }
        }
        match counts.as_slice() {
            [(a, na), (b, nb)] if na != nb => {
                if na > nb {
                    *a
                } else {
                    *b
                }
            }
            _ => Flavour::System,
        }
    }
}

/// Runs `X-save` of `flavour` and `family` (all tables that exist, so no
/// kernel module is loaded just to dump it); `None` when it is not installed
/// or fails.
pub async fn save(flavour: Flavour, family: Family) -> Option<String> {
    let output = tokio::process::Command::new(flavour.save_program(family))
        .env_remove(SECRET_ENV)
        .env_remove(SECRET_DIGEST_ENV)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
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
    #[error("could not run {program}: {error}")]
    Spawn {
        /// `iptables` or `ip6tables`.
        program: &'static str,
        /// What `exec` said.
        error: io::Error,
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

/// `-t nat -A CHAIN -s ADDR -j RETURN`: leave connections from `source` alone.
pub fn exclude_source(chain: &str, source: IpAddr) -> Vec<String> {
    args(&[
        "-w",
        "-t",
        "nat",
        "-A",
        chain,
        "-s",
        &source.to_string(),
        "-j",
        "RETURN",
    ])
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
    program: &'static str,
    argv: &[String],
    result: io::Result<std::process::Output>,
) -> Result<(), RuleError> {
    let output = result.map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            RuleError::Missing { program }
        } else {
            RuleError::Spawn {
                program,
                error: source,
            }
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
pub async fn run(flavour: Flavour, family: Family, argv: &[String]) -> Result<(), RuleError> {
    let program = flavour.program(family);
    tracing::debug!(program, args = ?argv, "rule command");
    let result = tokio::process::Command::new(program)
        .args(argv)
        .env_remove(SECRET_ENV)
        .env_remove(SECRET_DIGEST_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await;
    outcome(program, argv, result)
}

/// Runs one rule command, blocking the calling thread (watchdog, exit path).
///
/// # Errors
///
/// As [`run`].
pub fn run_blocking(flavour: Flavour, family: Family, argv: &[String]) -> Result<(), RuleError> {
    let program = flavour.program(family);
    let result = std::process::Command::new(program)
        .args(argv)
        .env_remove(SECRET_ENV)
        .env_remove(SECRET_DIGEST_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    outcome(program, argv, result)
}

/// Removes `chain` and the jump to it for both families of `flavour`, blocking;
/// failures that only say "already gone" are ignored, others are logged.
pub fn cleanup_blocking(flavour: Flavour, chain: &str) {
    for family in Family::ALL {
        for argv in cleanup_commands(chain) {
            match run_blocking(flavour, family, &argv) {
                Ok(()) => {}
                Err(e) if e.is_already_gone() => {}
                Err(RuleError::Missing { .. }) => break,
                Err(e) => tracing::warn!("removing packet rules: {e}"),
            }
        }
    }
}

/// [`cleanup_blocking`] from the async runtime.
pub async fn cleanup(flavour: Flavour, chain: &str) {
    for family in Family::ALL {
        for argv in cleanup_commands(chain) {
            match run(flavour, family, &argv).await {
                Ok(()) => {}
                Err(e) if e.is_already_gone() => {}
                Err(RuleError::Missing { .. }) => break,
                Err(e) => tracing::warn!("removing stale packet rules: {e}"),
            }
        }
    }
}

/// The flavour this agent wrote rules with, once it has written any.
static TOUCHED: OnceLock<Flavour> = OnceLock::new();

/// The flavour of the rules this agent installed, if it installed any with
/// iptables: what its exit path must remove.
pub fn touched() -> Option<Flavour> {
    TOUCHED.get().copied()
}

/// The agent's chain in both families.
#[derive(Debug)]
pub struct Chains {
    chain: String,
    flavour: Flavour,
    excluded: Vec<IpAddr>,
    /// Whether the chain exists and is hooked, per family.
    hooked: [bool; 2],
    /// IPv6 rules failed once: IPv4 only from then on.
    v6_broken: bool,
}

impl Chains {
    /// The chain `chain`, written with `flavour`, letting `excluded` through.
    pub fn new(chain: String, flavour: Flavour, excluded: Vec<IpAddr>) -> Chains {
        Chains {
            chain,
            flavour,
            excluded,
            hooked: [false; 2],
            v6_broken: false,
        }
    }

    async fn hook(&mut self, family: Family) -> Result<(), RuleError> {
        let i = family.index();
        if self.hooked[i] {
            return Ok(());
        }
        // Tell the exit path and the watchdog before the first rule exists.
        let _ = TOUCHED.set(self.flavour);
        crate::watchdog::announce(self.flavour);
        match run(self.flavour, family, &create_chain(&self.chain)).await {
            // Left by an earlier attempt whose jump failed.
            Err(RuleError::Failed { stderr, .. }) if stderr.contains("already exists") => {}
            other => other?,
        }
        for source in self.excluded.iter().filter(|a| Family::of(a) == family) {
            run(self.flavour, family, &exclude_source(&self.chain, *source)).await?;
        }
        run(self.flavour, family, &jump_to_chain(&self.chain)).await?;
        self.hooked[i] = true;
        Ok(())
    }

    /// Redirects `port` to `to_v4` (and `to_v6` when IPv6 works).
    ///
    /// # Errors
    ///
    /// The IPv4 rule failed (an IPv6 failure only turns IPv6 off, with a warning).
    pub async fn redirect(
        &mut self,
        port: u16,
        to_v4: u16,
        to_v6: Option<u16>,
    ) -> Result<(), super::RedirectError> {
        let v4 = async {
            self.hook(Family::V4).await?;
            let argv = redirect(&self.chain, true, port, to_v4);
            run(self.flavour, Family::V4, &argv).await
        }
        .await;
        v4.map_err(|error| super::RedirectError::Iptables { port, error })?;
        if let (Some(to_v6), false) = (to_v6, self.v6_broken) {
            let v6 = async {
                self.hook(Family::V6).await?;
                let argv = redirect(&self.chain, true, port, to_v6);
                run(self.flavour, Family::V6, &argv).await
            }
            .await;
            if let Err(e) = v6 {
                tracing::warn!("IPv6 traffic to port {port} is not redirected: {e}");
                self.v6_broken = true;
            }
        }
        Ok(())
    }

    /// Moves `port`'s redirect of `family` from the listener `from` to `to`:
    /// the new rule is appended, and the old one, matched first until then,
    /// is deleted after it, so no connection finds the port unredirected. A
    /// family whose rules are not written (IPv6 that failed) is left alone.
    ///
    /// # Errors
    ///
    /// The new rule failed; the old one stays then.
    pub async fn retarget(
        &mut self,
        family: Family,
        port: u16,
        from: u16,
        to: u16,
    ) -> Result<(), super::RedirectError> {
        if from == to || !self.hooked[family.index()] {
            return Ok(());
        }
        run(self.flavour, family, &redirect(&self.chain, true, port, to))
            .await
            .map_err(|error| super::RedirectError::Iptables { port, error })?;
        match run(
            self.flavour,
            family,
            &redirect(&self.chain, false, port, from),
        )
        .await
        {
            Ok(()) => {}
            Err(e) if e.is_already_gone() => {}
            Err(e) => tracing::warn!("could not remove the old rule for port {port}: {e}"),
        }
        Ok(())
    }

    /// Deletes `port`'s rules; failures are logged.
    pub async fn release(&mut self, port: u16, to_v4: u16, to_v6: Option<u16>) {
        for (family, to) in [(Family::V4, Some(to_v4)), (Family::V6, to_v6)] {
            let Some(to) = to else { continue };
            if !self.hooked[family.index()] {
                continue;
            }
            match run(
                self.flavour,
                family,
                &redirect(&self.chain, false, port, to),
            )
            .await
            {
                Ok(()) => {}
                Err(e) if e.is_already_gone() => {}
                Err(e) => tracing::warn!("could not remove the rule for port {port}: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            exclude_source("GRAFT-0badcafe", "198.19.128.1".parse().unwrap()).join(" "),
            "-w -t nat -A GRAFT-0badcafe -s 198.19.128.1 -j RETURN"
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
    fn flavours_name_their_programs_and_round_trip_through_the_watchdog_byte() {
        assert_eq!(Flavour::Legacy.program(Family::V6), "ip6tables-legacy");
        assert_eq!(Flavour::Nft.save_program(Family::V4), "iptables-nft-save");
        assert_eq!(Flavour::System.program(Family::V4), "iptables");
        for f in [Flavour::Legacy, Flavour::Nft, Flavour::System] {
            assert_eq!(Flavour::from_byte(f.to_byte()), Some(f));
        }
        assert_eq!(Flavour::from_byte(b'x'), None);
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
