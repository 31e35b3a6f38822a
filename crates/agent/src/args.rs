//! The agent's command line (`graft-agent --help`): which target, where to
//! listen for the client, and how to redirect stolen ports. Parsed by the
//! binary (`main.rs`) and handed to [`crate::run`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::rules;

/// The agent's command line.
#[derive(Debug, Parser)]
#[command(
    name = "graft-agent",
    version,
    about = "graft's agent: serves one graft session beside a target process",
    after_help = "The session secret is read from the environment variable GRAFT_AGENT_SECRET, \
                  or its SHA-256 (64 hex digits) from GRAFT_AGENT_SECRET_SHA256."
)]
pub struct Args {
    /// The target process, as this agent sees it.
    #[arg(
        long,
        value_name = "PID",
        required_unless_present = "target_container_id"
    )]
    pub(crate) target_pid: Option<u32>,
    /// The target container (node mode): its process is found by this ID
    /// (`containerd://3f9a…` or the bare hex) in `/proc/*/cgroup`.
    #[arg(long, value_name = "ID", conflicts_with = "target_pid")]
    pub(crate) target_container_id: Option<String>,
    /// Where to accept the client: `unix:/path/agent.sock` or `tcp:127.0.0.1:PORT`
    /// (loopback only; inside the target's network namespace).
    #[arg(long, value_name = "ADDRESS", value_parser = parse_listen)]
    pub(crate) listen: Listen,
    /// Seconds to wait for the client to connect (and then to send Hello).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub(crate) connect_timeout: u64,
    /// Which packet rules redirect stolen ports: `auto` (an nf_tables table the
    /// kernel removes with the agent, where the kernel has them (Linux ≥ 5.12),
    /// else iptables with a watchdog), `nftables` or `iptables`.
    #[arg(
        long,
        value_name = "BACKEND",
        value_enum,
        default_value_t = rules::Backend::Auto,
        env = "GRAFT_AGENT_PACKET_RULES"
    )]
    pub(crate) packet_rules: rules::Backend,
    /// Never steal or mirror connections from this source: the node address the
    /// kubelet probes the pod from. An IP address, or `gateway` for the target
    /// network's default gateways. Repeatable; in the environment, separated by
    /// commas.
    #[arg(
        long,
        value_name = "ADDR|gateway",
        env = "GRAFT_AGENT_PROBE_SOURCES",
        value_delimiter = ','
    )]
    pub(crate) probe_source: Vec<rules::probes::ProbeSource>,
    /// Log filter for stderr (`error`, `warn`, `info`, `debug`, `trace`, or a
    /// tracing directive).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Where the agent listens for its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Listen {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A loopback TCP address.
    Tcp(SocketAddr),
}

/// Why a `--listen` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ListenError {
    /// `unix:` without a path.
    #[error("unix: needs a path, e.g. unix:/run/graft/agent.sock")]
    NoPath,
    /// `tcp:` followed by something that is not `IP:PORT`.
    #[error("{0:?} is not an address like 127.0.0.1:7777")]
    BadAddress(String),
    /// A TCP address other than loopback.
    #[error(
        "{0} is not a loopback address; the agent listens on loopback only (127.0.0.1 or [::1])"
    )]
    NotLoopback(SocketAddr),
    /// Neither `unix:` nor `tcp:`.
    #[error("expected unix:/path or tcp:127.0.0.1:PORT")]
    Scheme,
}

fn parse_listen(s: &str) -> Result<Listen, ListenError> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(ListenError::NoPath);
        }
        Ok(Listen::Unix(PathBuf::from(path)))
    } else if let Some(addr) = s.strip_prefix("tcp:") {
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| ListenError::BadAddress(addr.to_owned()))?;
        if !addr.ip().is_loopback() {
            return Err(ListenError::NotLoopback(addr));
        }
        Ok(Listen::Tcp(addr))
    } else {
        Err(ListenError::Scheme)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("unix:/run/graft/a.sock"),
            Ok(Listen::Unix("/run/graft/a.sock".into()))
        );
        assert_eq!(
            parse_listen("tcp:127.0.0.1:7777"),
            Ok(Listen::Tcp("127.0.0.1:7777".parse().unwrap()))
        );
        assert!(parse_listen("tcp:[::1]:0").is_ok());
        let refused = parse_listen("tcp:0.0.0.0:7777").unwrap_err();
        assert!(refused.to_string().contains("loopback"), "{refused}");
        assert!(parse_listen("tcp:10.0.0.1:1").is_err());
        assert!(parse_listen("unix:").is_err());
        assert!(parse_listen("/tmp/x").is_err());
    }

    #[test]
    fn command_line_parses() {
        let args = Args::try_parse_from([
            "graft-agent",
            "--target-pid",
            "42",
            "--listen",
            "unix:/tmp/a.sock",
        ])
        .unwrap();
        assert_eq!(args.target_pid, Some(42));
        let node = Args::try_parse_from([
            "graft-agent",
            "--target-container-id",
            "containerd://abc",
            "--listen",
            "tcp:127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!(
            node.target_container_id.as_deref(),
            Some("containerd://abc")
        );
        assert!(
            Args::try_parse_from(["graft-agent", "--listen", "tcp:127.0.0.1:0"]).is_err(),
            "a target is required"
        );
        assert!(
            Args::try_parse_from([
                "graft-agent",
                "--target-pid",
                "1",
                "--target-container-id",
                "abc",
                "--listen",
                "tcp:127.0.0.1:0"
            ])
            .is_err(),
            "one target only"
        );
        assert_eq!(args.connect_timeout, 30);
    }
}
