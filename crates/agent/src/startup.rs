//! Startup and shutdown of one agent run, in the order the crate's
//! documentation gives: find the target, enter its network namespace, take the
//! rules lock and fork the watchdog, build the runtime, listen, serve one
//! client, and remove every packet rule on the way out.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::args::{Args, Listen};
use crate::session::{SessionConfig, SessionEnd, Stop};
use crate::{
    files, incoming, limits, ns, rules, session, target, target_id, tcp_link, transparent, watchdog,
};

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

/// Builds the agent's runtime: a current-thread one, or tokio's multi-thread
/// one when `TOKIO_WORKER_THREADS` is set (tokio's own setting, which its
/// `Builder` reads for the number of workers).
///
/// Why one thread: the agent shares its node with the target's workload, and
/// each of its tasks runs a few µs between waits. With a worker per core
/// (tokio's default) on a busy node, a task woken on a worker that the kernel
/// has just preempted waits for that worker: tokio keeps the task it woke last
/// in a per-worker slot that other workers do not steal from (tokio issue
/// #4941; stealing from it was reverted in 1.52, and turning the slot off needs
/// `tokio_unstable`). The multi-thread scheduler also reads the clock and
/// updates a floating-point average around every batch of polls, which a
/// current-thread one does not. Measured on the bench's two cores, a filtered
/// steal with 8 busy connections (issue 13): p99 0.7–3.4 ms and p99.9
/// 3.7–5.5 ms with two workers, 0.16–0.18 ms and 0.8–1.2 ms on one thread,
/// at about 5 % less throughput. linkerd2-proxy, a sidecar with the same job, runs a
/// single-threaded runtime on small nodes for the same reason.
fn build_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().thread_name("graft-agent").build()
}

/// A startup failure: what to print and the exit code.
pub struct Failure {
    /// The process's exit code (see the crate's documentation).
    pub code: u8,
    /// What failed, with its causes.
    pub error: anyhow::Error,
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

/// Runs the agent as `args` say and returns its exit code: 0 when a session
/// ran and ended (or the agent was stopped before a client came).
///
/// # Errors
///
/// A [`Failure`] carries the exit code of what went wrong (see the crate's
/// documentation) and the error to print.
pub fn run(args: Args) -> Result<u8, Failure> {
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
    let runtime = build_runtime().map_err(|e| {
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
