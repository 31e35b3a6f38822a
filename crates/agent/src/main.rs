//! `graft-agent`: runs beside the target process, enters its network namespace,
//! and serves one graft session over one link: it steals the target's incoming
//! traffic, makes connections and resolves names from the target's network, and
//! reads and writes files and the environment of the target.
//!
//! ```text
//! GRAFT_AGENT_SECRET=... graft-agent --target-pid PID --listen unix:/run/graft/S/agent.sock
//! ```
//!
//! Startup, in this order (see `docs/architecture.md`): check the target exists;
//! enter the target's network namespace on the main thread; take the rules lock
//! (see `rules::stale`) and fork the watchdog while the process has one thread;
//! open the target's root; build the async runtime (its threads inherit the
//! namespace); remove dead agents' stale rules in the background; listen (on
//! TCP: with TLS 1.3 and a key pair made for this run, whose certificate's
//! SHA-256 is printed first as `link-cert sha256:HEX`); print `ready <address>`
//! on stdout; accept one client (on TCP: the first that proves the session
//! secret inside TLS); serve it. On the way out every packet rule is removed and
//! every connection reset.
//!
//! Exit codes: 0 the session ran and ended; 1 any other failure; 2 bad arguments or
//! environment; 3 the target does not exist; 4 not allowed to enter the target's
//! namespaces; 5 no client connected in time; 6 the handshake failed (wrong secret,
//! incompatible version, not a graft client).

mod dns;
mod env;
mod files;
mod incoming;
mod limits;
mod ns;
mod outgoing;
mod passing;
mod relay;
mod rules;
mod session;
mod steal;
mod target;
mod target_id;
mod tcp_link;
mod transparent;
mod watchdog;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

use crate::session::{SessionConfig, SessionEnd, Stop};

/// Exit code: a failure not covered by a more specific code.
const EXIT_FAILURE: u8 = 1;
/// Exit code: bad arguments or environment.
const EXIT_USAGE: u8 = 2;
/// Exit code: the target process does not exist.
const EXIT_NO_TARGET: u8 = 3;
/// Exit code: not allowed to enter the target's namespaces.
const EXIT_PERMISSION: u8 = 4;
/// Exit code: no client connected within `--connect-timeout`.
const EXIT_NO_CLIENT: u8 = 5;
/// Exit code: the client's handshake failed.
const EXIT_REFUSED: u8 = 6;

/// The agent's command line.
#[derive(Debug, Parser)]
#[command(
    name = "graft-agent",
    version,
    about = "graft's agent: serves one graft session beside a target process",
    after_help = "The session secret is read from the environment variable GRAFT_AGENT_SECRET, \
                  or its SHA-256 (64 hex digits) from GRAFT_AGENT_SECRET_SHA256."
)]
struct Args {
    /// The target process, as this agent sees it.
    #[arg(
        long,
        value_name = "PID",
        required_unless_present = "target_container_id"
    )]
    target_pid: Option<u32>,
    /// The target container (node mode): its process is found by this ID
    /// (`containerd://3f9a…` or the bare hex) in `/proc/*/cgroup`.
    #[arg(long, value_name = "ID", conflicts_with = "target_pid")]
    target_container_id: Option<String>,
    /// Where to accept the client: `unix:/path/agent.sock` or `tcp:127.0.0.1:PORT`
    /// (loopback only; inside the target's network namespace).
    #[arg(long, value_name = "ADDRESS", value_parser = parse_listen)]
    listen: Listen,
    /// Seconds to wait for the client to connect (and then to send Hello).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    connect_timeout: u64,
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
    packet_rules: rules::Backend,
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
    probe_source: Vec<rules::probes::ProbeSource>,
    /// Log filter for stderr (`error`, `warn`, `info`, `debug`, `trace`, or a
    /// tracing directive).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
}

/// Where the agent listens for its client.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Listen {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A loopback TCP address.
    Tcp(SocketAddr),
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("unix: needs a path, e.g. unix:/run/graft/agent.sock".into());
        }
        Ok(Listen::Unix(PathBuf::from(path)))
    } else if let Some(addr) = s.strip_prefix("tcp:") {
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an address like 127.0.0.1:7777"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{addr} is not a loopback address; the agent listens on loopback only \
                 (127.0.0.1 or [::1])"
            ));
        }
        Ok(Listen::Tcp(addr))
    } else {
        Err("expected unix:/path or tcp:127.0.0.1:PORT".into())
    }
}

/// A startup failure: what to print and the exit code.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    fn new(code: u8, error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code,
            error: error.into(),
        }
    }
}

impl From<ns::NsError> for Failure {
    fn from(e: ns::NsError) -> Failure {
        let code = match e {
            ns::NsError::NoSuchProcess { .. } => EXIT_NO_TARGET,
            ns::NsError::Permission { .. } => EXIT_PERMISSION,
            ns::NsError::Other { .. } => EXIT_FAILURE,
        };
        Failure::new(code, e)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("{:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

fn run(args: Args) -> Result<u8, Failure> {
    let pid = match (&args.target_pid, &args.target_container_id) {
        (Some(pid), _) => *pid,
        (None, Some(id)) => target_id::find_container_pid(Path::new("/proc"), id).map_err(|e| {
            let code = match e {
                target_id::FindError::Invalid(_) => EXIT_USAGE,
                target_id::FindError::NotFound(_) => EXIT_NO_TARGET,
            };
            Failure::new(code, e)
        })?,
        (None, None) => unreachable!("clap requires --target-pid or --target-container-id"),
    };
    ns::check_exists(pid)?;
    match limits::raise_nofile() {
        Ok(limit) => tracing::debug!(?limit, "open file limit"),
        Err(e) => tracing::warn!("could not raise the open file limit to its maximum: {e}"),
    }
    let secret = session_secret().map_err(|e| Failure::new(EXIT_USAGE, e))?;
    let netns = ns::open_netns(pid)?;
    let pidfd = target::open_pidfd(pid);
    ns::enter_netns(pid, &netns)?;
    drop(netns);
    // In the target's namespace: the lock that says this agent's rules are alive,
    // held by the agent and inherited by the watchdog.
    let (chain, _rules_lock) =
        rules::stale::new_locked_chain().map_err(|e| Failure::new(EXIT_FAILURE, e))?;
    transparent::init(&chain);
    rules::configure(rules::Settings {
        backend: args.packet_rules,
        excluded: rules::probes::resolve(&args.probe_source, pid),
    });
    tracing::debug!(excluded = ?rules::settings().excluded, "probe sources");

    // Still one thread: fork now.
    let watchdog = watchdog::spawn(&chain).map_err(|e| Failure::new(EXIT_FAILURE, e))?;
    tracing::debug!(watchdog = watchdog.pid(), %chain, "watchdog started");
    let root = Arc::new(files::TargetRoot::new(ns::open_root(pid)?));

    // Built after setns: every runtime thread starts in the target's namespace.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("graft-agent")
        .build()
        .map_err(|e| {
            Failure::new(
                EXIT_FAILURE,
                anyhow::Error::new(e).context("starting the runtime"),
            )
        })?;
    let rules_touched = Arc::new(AtomicBool::new(false));
    let config = SessionConfig {
        target_pid: pid,
        secret,
        chain: chain.clone(),
        root,
        rules_touched: rules_touched.clone(),
        hello_timeout: Duration::from_secs(args.connect_timeout.max(1)),
        attached: None,
        fds: None,
    };
    // Chains of agents that died with their watchdog (an OOM-killed container).
    runtime.spawn(rules::stale::sweep());
    let outcome = runtime.block_on(serve(&args, config, pidfd));
    // Tasks still running are dropped here; their sockets reset (ResetOnDrop).
    runtime.shutdown_timeout(Duration::from_millis(500));
    // Connections are reset (above); now the rules go: an nf_tables owner table
    // with its socket, an iptables chain with its cleanup commands.
    rules::nft::close_parked();
    if let Some(flavour) = rules::iptables::touched() {
        rules::iptables::cleanup_blocking(flavour, &chain);
        tracing::debug!(%chain, "packet rules removed");
    }
    if transparent::touched() {
        transparent::cleanup_blocking(&chain);
    }
    watchdog.done();
    outcome
}

/// The secret check from the environment: `GRAFT_AGENT_SECRET` (local agents) or
/// `GRAFT_AGENT_SECRET_SHA256` (agents in a cluster, whose spec must not carry the
/// secret itself). The rule commands the agent runs inherit neither (see
/// [`rules`]).
fn session_secret() -> anyhow::Result<session::Secret> {
    let plain = std::env::var(rules::SECRET_ENV)
        .ok()
        .filter(|s| !s.is_empty());
    let digest = std::env::var(rules::SECRET_DIGEST_ENV)
        .ok()
        .filter(|s| !s.is_empty());
    let secret = match (plain, digest) {
        (Some(secret), _) => session::Secret::Plain(secret),
        (None, Some(hex)) => {
            let hex = hex.to_ascii_lowercase();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                anyhow::bail!(
                    "{} must be 64 hex digits (a SHA-256), not {hex:?}",
                    rules::SECRET_DIGEST_ENV
                );
            }
            session::Secret::Sha256(hex)
        }
        (None, None) => anyhow::bail!(
            "the session secret is missing: set {} (or {}) in graft-agent's environment",
            rules::SECRET_ENV,
            rules::SECRET_DIGEST_ENV
        ),
    };
    Ok(secret)
}

/// Resolves when the agent must stop from outside: target exit or a signal.
async fn stop_signal(pid: u32, pidfd: Option<std::os::fd::OwnedFd>) -> Stop {
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let (mut term, mut int) = match (term, int) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            target::exited(pid, pidfd).await;
            return Stop::TargetExited;
        }
    };
    tokio::select! {
        () = target::exited(pid, pidfd) => Stop::TargetExited,
        _ = term.recv() => Stop::Signal("SIGTERM"),
        _ = int.recv() => Stop::Signal("SIGINT"),
    }
}

/// Hands the hub this agent owned over to the other sessions' agents and
/// relays what it holds until that ends (`incoming::peer::handover`), unless
/// `stop` comes first.
///
/// graft stops waiting for this agent when it reads the `draining` line, and
/// the agent no longer asks to be signalled when graft exits: the drain
/// outlives graft's session, bounded by `handover::DRAIN_MAX`.
async fn hand_over(
    handover: incoming::peer::Handover,
    stop: std::pin::Pin<&mut impl std::future::Future<Output = Stop>>,
) {
    if let Err(e) = rustix::process::set_parent_process_death_signal(None) {
        tracing::warn!("could not outlive graft to hand the hub over: {e}");
    }
    {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(
            stdout,
            "draining: handing the target's hub over to {} other sessions' agents",
            handover.peers()
        )
        .and_then(|()| stdout.flush());
    }
    tokio::select! {
        () = handover.run() => {}
        stopped = stop => tracing::info!(?stopped, "stopped while handing the hub over"),
    }
}

/// A listener for either kind of address.
enum Listener {
    /// The socket file goes with the listener.
    Unix(tokio::net::UnixListener, RemoveOnDrop),
    /// TLS only, with the run's certificate.
    Tcp(tokio::net::TcpListener, graft_protocol::tls::TlsAcceptor),
}

/// Removes the Unix socket file when the listener goes.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path)
                .with_context(|| format!("could not remove the stale socket {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; choose another --listen path",
            path.display()
        ),
        Err(_) => {}
    }
    // No one but the owner may connect, even for the instant before the chmod.
    let old_umask = rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    rustix::process::umask(old_umask);
    let listener = bound.with_context(|| format!("could not listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("could not restrict {} to its owner", path.display()))?;
    Ok(listener)
}

async fn serve(
    args: &Args,
    config: SessionConfig,
    pidfd: Option<std::os::fd::OwnedFd>,
) -> Result<u8, Failure> {
    let pid = config.target_pid;
    let failed = |what: &'static str| {
        move |e: std::io::Error| Failure::new(EXIT_FAILURE, anyhow::Error::new(e).context(what))
    };
    // A TCP listener (a port-forward's end, on the loopback the whole pod
    // shares) speaks TLS only, with a key pair made for this run; a Unix
    // socket (a local target, reachable by its owner alone) carries the
    // session as it is.
    let (listener, ready, cert_line) = match &args.listen {
        Listen::Unix(path) => {
            let l = bind_unix(path).map_err(|e| Failure::new(EXIT_FAILURE, e))?;
            (
                Listener::Unix(l, RemoveOnDrop(path.clone())),
                format!("unix:{}", path.display()),
                None,
            )
        }
        Listen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("could not listen on {addr} in the target's network"))
                .map_err(|e| Failure::new(EXIT_FAILURE, e))?;
            let local = l
                .local_addr()
                .map_err(failed("reading the listener's address"))?;
            let identity = graft_protocol::tls::AgentIdentity::generate()
                .map_err(failed("making the link's key pair"))?;
            let acceptor = identity
                .acceptor()
                .map_err(failed("setting up the link's TLS"))?;
            let line = identity.cert_line();
            (
                Listener::Tcp(l, acceptor),
                format!("tcp:{local}"),
                Some(line),
            )
        }
    };
    {
        // The certificate line comes first: graft pins it when it reads `ready`.
        let mut stdout = std::io::stdout().lock();
        cert_line
            .iter()
            .try_for_each(|line| writeln!(stdout, "{line}"))
            .and_then(|()| writeln!(stdout, "ready {ready}"))
            .and_then(|()| stdout.flush())
            .map_err(failed("writing the ready line"))?;
    }
    tracing::info!(target_pid = pid, listen = %ready, "ready");

    let mut stop = std::pin::pin!(stop_signal(pid, pidfd));
    let timeout = Duration::from_secs(args.connect_timeout);
    let no_client = || {
        Failure::new(
            EXIT_NO_CLIENT,
            anyhow::anyhow!(
                "no client connected to {ready} within {} s (--connect-timeout); exiting",
                args.connect_timeout
            ),
        )
    };
    let end = match listener {
        Listener::Unix(l, socket_file) => {
            let accepted = tokio::select! {
                stopped = &mut stop => {
                    tracing::info!(?stopped, "stopped before a client connected");
                    return Ok(0);
                }
                accepted = tokio::time::timeout(timeout, l.accept()) => accepted,
            };
            let stream = match accepted {
                Ok(Ok((stream, _))) => stream,
                Ok(Err(e)) => return Err(failed("accepting the client")(e)),
                Err(_) => return Err(no_client()),
            };
            // Exactly one client: stop listening (and remove the socket file) now.
            drop((l, socket_file));
            // A client on this machine: files and sockets can pass as descriptors.
            let (stream, fds) = graft_protocol::fdpass::FdStream::new(stream);
            let config = SessionConfig {
                fds: Some(fds),
                ..config
            };
            session::run(stream, config, stop.as_mut()).await
        }
        Listener::Tcp(l, acceptor) => {
            // The link survives new transports (a port-forward the API server
            // dropped), which arrive on the same listener.
            let (first, accepter) = tcp_link::listen(l, acceptor, config.secret.clone());
            let first = tokio::select! {
                stopped = &mut stop => {
                    tracing::info!(?stopped, "stopped before a client connected");
                    accepter.abort();
                    return Ok(0);
                }
                first = tokio::time::timeout(timeout, first) => first,
            };
            let tcp_link::Linked { link, attached } = match first {
                Ok(Ok(linked)) => linked,
                Ok(Err(_)) | Err(_) => {
                    accepter.abort();
                    return Err(no_client());
                }
            };
            // While the client is detached the target serves its own traffic.
            let config = SessionConfig {
                attached: Some(attached),
                ..config
            };
            let end = session::run(link, config, stop.as_mut()).await;
            accepter.abort();
            end
        }
    };
    let session::Ended { end, handover } = end;
    if let Some(handover) = handover {
        if matches!(end, SessionEnd::Stopped(_)) {
            // Told to stop (or the target is gone): the peers take over the
            // old way, when this agent's links close.
            tracing::info!(
                peers = handover.peers(),
                "stopped: the target's hub is not handed over"
            );
        } else {
            hand_over(handover, stop.as_mut()).await;
        }
    }
    Ok(match end {
        SessionEnd::Refused(reason) => {
            eprintln!("graft-agent: session refused: {reason}");
            EXIT_REFUSED
        }
        SessionEnd::LinkClosed | SessionEnd::LinkError(_) | SessionEnd::Stopped(_) => 0,
    })
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
        assert!(refused.contains("loopback"), "{refused}");
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
