//! The agent of a local target: `graft-agent` started on this machine, reached
//! over a Unix socket in the session directory.
//!
//! graft starts it with the session secret in `GRAFT_AGENT_SECRET`, waits for the
//! one line `ready <address>` on its stdout, and explains its exit code when it
//! stops before that (see the exit codes in docs/architecture.md).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use graft_proxy::{Session, SessionOptions};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::UnixStream,
    process::{Child, Command},
};

use crate::{failure::Failure, process};

/// How long the agent may take to print `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's exit code for a target process that does not exist.
const EXIT_NO_TARGET: i32 = 3;
/// The agent's exit code for missing privileges.
const EXIT_PRIVILEGES: i32 = 4;

/// Where the agent listens, from its `ready` line.
///
/// A local agent is always told to listen on a Unix socket in the session
/// directory (mode 0600, so only its owner reaches it, and no packet capture
/// sees what crosses it); its TCP listener, which speaks TLS only, is for
/// port-forwards ([`crate::cluster`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// `unix:PATH` (or a bare path).
    Unix(PathBuf),
}

impl AgentAddress {
    /// Parses the address of a `ready <address>` line.
    pub fn parse(text: &str) -> Option<AgentAddress> {
        let text = text.trim();
        if let Some(path) = text.strip_prefix("unix:") {
            return Some(AgentAddress::Unix(path.into()));
        }
        text.starts_with('/')
            .then(|| AgentAddress::Unix(text.into()))
    }
}

/// The environment variable that turns descriptor passing off (`0` or `off`):
/// every byte of a local target's files, outgoing TCP connections and stolen
/// connections is then relayed as for a cluster's, the fallback path (for
/// comparing the two, and for working around a problem).
pub const FD_PASSING_ENV: &str = "GRAFT_FD_PASSING";

/// Whether a local agent's files and sockets reach the program as descriptors.
fn pass_fds() -> bool {
    !matches!(
        std::env::var(FD_PASSING_ENV).as_deref(),
        Ok("0" | "off" | "false" | "no")
    )
}

/// A running local agent.
#[derive(Debug)]
pub struct LocalAgent {
    child: Child,
    log: Option<PathBuf>,
    address: AgentAddress,
    /// Set when the agent says `draining`: its session is over, and it stays to
    /// hand the target's hub over to other sessions (docs/architecture.md).
    draining: tokio::sync::watch::Receiver<bool>,
}

impl LocalAgent {
    /// Starts `graft-agent` for target `pid`, listening in `dir`, and waits until it
    /// is ready. `log_level` is `GRAFT_LOG` when set: then the agent's stderr is
    /// graft's, else it goes to `dir/agent.log`.
    pub async fn start(
        binary: &Path,
        pid: u32,
        dir: &Path,
        secret: &str,
        log_level: Option<&str>,
    ) -> Result<LocalAgent, Failure> {
        let socket = dir.join("agent.sock");
        let mut command = Command::new(binary);
        command
            .arg("--target-pid")
            .arg(pid.to_string())
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .env("GRAFT_AGENT_SECRET", secret)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C must not kill it before
            // graft has stopped CMD and closed the link in order.
            .process_group(0);
        if let Some(level) = log_level.and_then(simple_level) {
            command.arg("--log-level").arg(level);
        }
        let log = match log_level {
            Some(_) => {
                command.stderr(Stdio::inherit());
                None
            }
            None => {
                let path = dir.join("agent.log");
                let file = std::fs::File::create(&path).map_err(|e| {
                    Failure::session(format!("cannot create {}: {e}", path.display()))
                })?;
                command.stderr(file);
                Some(path)
            }
        };
        process::die_with_parent(&mut command);
        let mut child = command.spawn().map_err(|e| {
            Failure::session(format!("cannot start {}: {e}", binary.display()))
                .hint("check that graft-agent is installed and executable, or set GRAFT_AGENT_BIN")
        })?;
        let stdout = child.stdout.take().expect("stdout is piped above");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                match line.strip_prefix("ready ") {
                    Some(address) => return Some(line_address(address, &socket)),
                    None => tracing::debug!(line, "agent stdout"),
                }
            }
            None
        })
        .await;
        let (draining_tx, draining) = tokio::sync::watch::channel(false);
        let mut agent = LocalAgent {
            child,
            log,
            address: AgentAddress::Unix(socket),
            draining,
        };
        match ready {
            Ok(Some(address)) => {
                agent.address = address;
                // Keep reading: an agent writing to a closed pipe would fail.
                tokio::spawn(async move {
                    while let Ok(Some(line)) = lines.next_line().await {
                        tracing::debug!(line, "agent stdout");
                        if line.starts_with("draining") {
                            let _ = draining_tx.send(true);
                        }
                    }
                });
                Ok(agent)
            }
            Ok(None) => {
                let status = process::wait_or_kill(&mut agent.child, Duration::from_secs(2)).await;
                Err(agent.not_ready(pid, status.ok().and_then(|s| s.code())))
            }
            Err(_) => {
                let _ = agent.child.start_kill();
                let _ = agent.child.wait().await;
                Err(Failure::session(format!(
                    "graft-agent did not get ready within {} s{}",
                    READY_TIMEOUT.as_secs(),
                    agent.log_tail_text()
                ))
                .hint("run with GRAFT_LOG=debug to see what the agent does"))
            }
        }
    }

    fn not_ready(&self, pid: u32, code: Option<i32>) -> Failure {
        let tail = self.log_tail_text();
        match code {
            Some(EXIT_PRIVILEGES) => Failure::session(format!(
                "graft-agent may not enter the namespaces of pid:{pid}{tail}"
            ))
            .hint(
                "the agent needs root or CAP_SYS_ADMIN + CAP_NET_ADMIN + CAP_SYS_PTRACE: run graft \
                 with sudo, or `sudo setcap cap_sys_admin,cap_net_admin,cap_sys_ptrace+ep \
                 $(command -v graft-agent)`",
            ),
            Some(EXIT_NO_TARGET) => Failure::session(format!("no process with PID {pid}{tail}"))
                .hint("pick a running process (e.g. `pgrep -f server`)"),
            Some(code) => Failure::session(format!(
                "graft-agent exited with code {code} before it was ready{tail}"
            )),
            None => Failure::session(format!("graft-agent stopped before it was ready{tail}")),
        }
    }

    /// Connects to the agent and opens the session.
    pub async fn connect(
        &self,
        secret: &str,
        client: &str,
        options: SessionOptions,
    ) -> Result<Session, Failure> {
        let failed = |e: &dyn std::fmt::Display| {
            Failure::session(format!("cannot open the session with the agent: {e}"))
        };
        let session = match &self.address {
            AgentAddress::Unix(path) => {
                let stream = UnixStream::connect(path).await.map_err(|e| failed(&e))?;
                Session::connect_unix(stream, secret, client, options, pass_fds()).await
            }
        };
        session.map_err(|e| failed(&e))
    }

    /// Waits up to `grace` for the agent to exit (after the link closed), then
    /// kills it. Returns its exit code when it exited by itself, or 0 when it
    /// said it stays to hand the target's hub over to other sessions: it then
    /// ends by itself when the connections it relays for them end (at most
    /// 10 min), and graft does not wait for it.
    pub async fn stop(&mut self, grace: Duration) -> Option<i32> {
        let mut draining = self.draining.clone();
        tokio::select! {
            status = process::wait_or_kill(&mut self.child, grace) => {
                status.ok().and_then(|s| s.code())
            }
            Ok(_) = draining.wait_for(|d| *d) => {
                tracing::info!(
                    "the agent stays to hand the target's hub over to other sessions"
                );
                Some(0)
            }
        }
    }

    /// The last lines of the agent's log, each prefixed for the user.
    pub fn log_tail(&self) -> Vec<String> {
        let Some(text) = self
            .log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
        else {
            return Vec::new();
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(10)..]
            .iter()
            .map(|l| format!("graft: agent: {l}"))
            .collect()
    }

    fn log_tail_text(&self) -> String {
        let tail = self.log_tail();
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its log ends with:\n{}", tail.join("\n"))
        }
    }
}

fn line_address(text: &str, fallback: &Path) -> AgentAddress {
    AgentAddress::parse(text).unwrap_or_else(|| {
        tracing::warn!(
            address = text,
            "unknown address in the agent's ready line; using its socket"
        );
        AgentAddress::Unix(fallback.to_owned())
    })
}

/// `GRAFT_LOG` when it is a single level (`debug`), for the agent and the layer,
/// which take a level rather than a filter.
pub fn simple_level(filter: &str) -> Option<&str> {
    let level = filter.trim();
    ["error", "warn", "info", "debug", "trace"]
        .contains(&level)
        .then_some(level)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_addresses_parse() {
        assert_eq!(
            AgentAddress::parse("unix:/run/graft/x/agent.sock"),
            Some(AgentAddress::Unix("/run/graft/x/agent.sock".into()))
        );
        assert_eq!(AgentAddress::parse("tcp:127.0.0.1:7000"), None);
        assert_eq!(
            AgentAddress::parse("/tmp/a.sock"),
            Some(AgentAddress::Unix("/tmp/a.sock".into()))
        );
        assert_eq!(AgentAddress::parse("banana"), None);
    }

    #[test]
    fn only_plain_levels_are_passed_on() {
        assert_eq!(simple_level("debug"), Some("debug"));
        assert_eq!(simple_level("graft=debug,info"), None);
    }

    /// A fake agent script: prints what it is told, exits with a code.
    fn fake_agent(dir: &Path, script: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("fake-agent");
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn missing_privileges_are_explained_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let agent = fake_agent(
            dir.path(),
            "echo 'cannot enter the network namespace: Operation not permitted' >&2; exit 4",
        );
        let err = LocalAgent::start(&agent, 1, dir.path(), "s", None)
            .await
            .unwrap_err();
        assert_eq!(err.code, 1);
        assert!(
            err.message.contains("Operation not permitted"),
            "{}",
            err.message
        );
        assert!(err.hint.unwrap().contains("CAP_SYS_ADMIN"));
    }

    #[tokio::test]
    async fn ready_line_gives_the_address_and_secret_is_passed() {
        let dir = tempfile::tempdir().unwrap();
        let agent = fake_agent(
            dir.path(),
            "[ \"$GRAFT_AGENT_SECRET\" = s3 ] || exit 9\n\
             [ \"$1 $2 $3\" = '--target-pid 77 --listen' ] || exit 8\n\
             echo starting; echo 'ready unix:/run/graft/elsewhere.sock'; sleep 5",
        );
        let mut started = LocalAgent::start(&agent, 77, dir.path(), "s3", None)
            .await
            .unwrap();
        assert_eq!(
            started.address,
            AgentAddress::Unix("/run/graft/elsewhere.sock".into())
        );
        let _ = started.child.start_kill();
        started.stop(Duration::from_secs(5)).await;
    }
}
