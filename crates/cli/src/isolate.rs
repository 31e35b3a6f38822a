//! `graft run --isolate`: COMMAND runs in its own network and mount namespace on
//! this machine, whose only way out is a tun device served by graft's user-space
//! TCP/IP stack (`graft-netstack`), so every connection, datagram and DNS query of
//! any program (static and Go binaries included) leaves from the target, with no
//! LD_PRELOAD.
//!
//! ```text
//! graft ──spawn──► graft __isolate-helper (unshare: user?, net, mnt; tun; mounts)
//!   ▲  ◄── tun fd ──┘        │ runs COMMAND, connects to its listeners on request
//!   │ Netstack::serve(tun) ──► Session (connect_tcp / connect_udp / resolve)
//!   └ listeners: /proc/PID/net/tcp{,6} ──► Session::steal ──► helper Connect ──► splice
//! ```
//!
//! What changes on this machine: nothing outside the namespace (no route, no
//! address, no file, no mount; a container's volumes excepted); the namespace
//! dies with COMMAND and the helper. The
//! namespace's addresses come from 198.18.0.0/15 (benchmarking, RFC 2544), which no
//! real network uses, so they never hide a target's address: the tun is
//! [`TUN_V4`]/30 and `fd67:7261:6674::1/64`, graft's resolver [`RESOLVER_V4`].
//! The target's files show at their own paths in a root of the namespace's own
//! (FUSE mounts made inside it, see `files`); a `podman run` COMMAND runs its
//! container in the namespace instead, with the target's directories as volumes
//! (`container`).
//! Modules: `helper` (inside the namespace), `wire` (graft ↔ helper), `listeners`
//! (incoming), `detect` (which programs need this), `files` (the root's plan),
//! `root` (the helper builds it), `container` (podman).

mod container;
pub(crate) mod detect;
mod files;
mod helper;
mod listeners;
mod root;
mod wire;

use std::{
    ffi::OsString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, IntoRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use graft_config::Config;
use graft_netstack::{Netstack, NetstackOptions};
use graft_protocol::remote::{RemoteRequest, RemoteResponse};
use graft_proxy::Session;
use nix::sys::signal::Signal;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

pub use helper::{HELPER_ARG, main as helper_main};

use crate::{
    failure::Failure,
    process::{self, Signals},
    run::{self, Ended, stop},
};
use helper::{CHANNEL_FD, HelperConfig};
use wire::{Channel, Message};

/// The tun device's name inside the namespace.
pub const TUN_NAME: &str = "graft0";
/// The tun's IPv4 address (prefix [`TUN_V4_PREFIX`]).
pub const TUN_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 253);
/// The prefix length of [`TUN_V4`]; [`RESOLVER_V4`] is the other host of it.
pub const TUN_V4_PREFIX: u8 = 30;
/// graft's resolver, the namespace's only `nameserver`.
pub const RESOLVER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 254);
/// The tun's IPv6 address (a unique local address, RFC 4193; "graft" in hex).
pub const TUN_V6: Ipv6Addr = Ipv6Addr::new(0xfd67, 0x7261, 0x6674, 0, 0, 0, 0, 1);
/// The tun's MTU in bytes.
const MTU: u16 = 1500;
/// How long the helper may take to set the namespace up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether COMMAND runs isolated: as configured (`--isolate`, `--no-isolate`,
/// `[run] isolate`), else when the layer cannot reach it (a static or Go
/// binary), which is said in one line.
pub fn chosen(config: &Config, command: &[OsString]) -> bool {
    if let Some(isolate) = config.isolate {
        return isolate;
    }
    match container::find_run(command) {
        Ok(Some(_)) => {
            eprintln!(
                "graft: podman run: the container joins an isolated network namespace (--isolate)"
            );
            return true;
        }
        // `run` says why.
        Err(_) => return true,
        Ok(None) => {}
    }
    let Some(program) = command.first() else {
        return false;
    };
    let path = std::env::var_os("PATH");
    let Some(file) = detect::find(program, path.as_deref()) else {
        return false;
    };
    match detect::unreachable(&file) {
        Some(why) => {
            eprintln!(
                "graft: {} is {why}: running it in an isolated network namespace (--isolate)",
                Path::new(program).display()
            );
            true
        }
        None => false,
    }
}

/// What an isolated run needs besides the session.
pub struct Isolated<'a> {
    /// The resolved configuration (outgoing-local rules, port maps, incoming mode).
    pub config: &'a Config,
    /// The session's private directory (the namespace's resolver files go there).
    pub dir: &'a Path,
    /// COMMAND and its arguments.
    pub command: &'a [OsString],
    /// COMMAND's environment (the target's laid over the local one).
    pub env: Vec<(OsString, OsString)>,
}

/// Runs COMMAND isolated until it exits, the user stops it or the link ends.
///
/// # Errors
///
/// A [`Failure`] when the namespace cannot be made (no unprivileged user
/// namespaces and not root: the message names the sysctls) or COMMAND cannot start.
pub async fn run(isolated: Isolated<'_>, session: Session) -> Result<Ended, Failure> {
    let session = Arc::new(session);
    let container_run = container::find_run(isolated.command)?;
    if container_run.is_some() && !nix::unistd::geteuid().is_root() {
        return Err(Failure::usage(
            "a podman container joins graft's isolated namespace only when graft runs as root \
             (rootless podman makes its own user namespace and cannot join graft's)",
        )
        .hint("run graft with sudo, or run the program itself under graft (no container)"));
    }
    let resolver = Resolver::of_target(&session).await;
    let binds = resolver.write(isolated.dir)?;
    let bound: Vec<&str> = binds.iter().filter_map(|(_, path)| path.to_str()).collect();
    // A container keeps this machine's files (podman needs them) and gets the
    // target's as volumes; a program gets a new root with the target's files.
    let (command, container, layout) = match container_run {
        Some(run) => {
            let prepared =
                container::Container::prepare(&session, isolated.config, isolated.dir).await?;
            (
                prepared.command(isolated.command, run),
                Some(prepared),
                None,
            )
        }
        None => {
            let layout = files::plan(
                &session,
                isolated.config,
                isolated.dir,
                isolated.command.first(),
                &bound,
            )
            .await?;
            (isolated.command.to_vec(), None, layout)
        }
    };
    let (layout, rules) = layout.unzip();
    // A link out of one remote directory shows as its absolute path when that path
    // is remote too (served at its own path by another mount); never a local one.
    let at_own_path: graft_mount::AtOwnPath = Arc::new(move |path: &str| {
        rules
            .as_ref()
            .is_some_and(|r| r.is_remote(&graft_config::fs::normalize(path)))
    });
    let helper_config = HelperConfig {
        tun: TUN_NAME.into(),
        mtu: MTU,
        addr4: (TUN_V4, TUN_V4_PREFIX),
        addr6: (TUN_V6, 64),
        user_namespace: !nix::unistd::geteuid().is_root(),
        binds,
        layout,
    };
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| Failure::session(format!("cannot make a socket pair for --isolate: {e}")))?;
    let mut child = spawn_helper(&helper_config, &command, &isolated.env, theirs)?;
    let channel = Channel::new(ours)
        .map_err(|e| Failure::session(format!("cannot talk to the isolated namespace: {e}")))?;

    // The helper's namespace, or why not; the FUSE mounts of its root come first.
    let mut mounts = Vec::new();
    let deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
    let ready = loop {
        let ready = tokio::select! {
            ready = tokio::time::timeout_at(deadline, channel.recv()) => ready,
            _ = child.wait() => Ok(Ok(None)),
        };
        let Ok(Ok(Some((Message::Fuse(index), Some(fuse))))) = ready else {
            break ready;
        };
        let planned = helper_config
            .layout
            .as_ref()
            .and_then(|l| l.mounts.get(index));
        let Some(planned) = planned else {
            break Ok(Ok(Some((
                Message::Failed(format!(
                    "the helper mounted an unplanned remote directory ({index})"
                )),
                None,
            ))));
        };
        let options = graft_mount::MountOptions {
            writable: planned.writable,
            root: planned.path.clone(),
            allow_other: false,
        };
        let served = graft_mount::serve(
            session.clone(),
            tokio::runtime::Handle::current(),
            fuse,
            &options,
            &planned.placeholders(),
            at_own_path.clone(),
        )
        .map_err(|e| {
            Failure::session(format!("cannot serve the target's {}: {e}", planned.path))
        })?;
        mounts.push(served);
    };
    let tun = match ready {
        Ok(Ok(Some((Message::Ready, Some(tun))))) => tun,
        Ok(Ok(Some((Message::Failed(why), _)))) => {
            let _ = child.wait().await;
            return Err(Failure::session(why));
        }
        Ok(other) => {
            let _ = child.start_kill();
            return Err(Failure::session(format!(
                "the isolated namespace's helper ended before it was ready ({other:?})"
            )));
        }
        Err(_) => {
            let _ = child.start_kill();
            return Err(Failure::session(format!(
                "the isolated namespace was not ready within {} s",
                SETUP_TIMEOUT.as_secs()
            )));
        }
    };
    let device = tun_device(tun)?;
    let options = NetstackOptions {
        dns: Some(IpAddr::V4(RESOLVER_V4)),
        dns_forward: resolver.nameserver.map(|ip| SocketAddr::new(ip, 53)),
        local: isolated.config.layer.outgoing_local.clone(),
        remote: isolated.config.layer.outgoing_remote.clone(),
        dns_local: isolated.config.layer.dns_local.clone(),
        dns_remote: isolated.config.layer.dns_remote.clone(),
        mtu: MTU,
        ..NetstackOptions::default()
    };
    let mut stack = Netstack::serve(device, session.clone(), options);

    // Registered before COMMAND starts, so no signal in between is lost.
    let mut signals = Signals::new()?;
    let started = async {
        channel.send(&Message::Start, None).await?;
        channel.recv().await
    };
    let helper_pid = child.id().unwrap_or(0);
    match started.await {
        Ok(Some((Message::Started(_), _))) => {}
        _ => {
            // The helper said why on stderr (COMMAND not found, ...).
            let status = child.wait().await;
            stack.abort();
            return status
                .map(Ended::Command)
                .map_err(|e| Failure::session(format!("cannot wait for the command: {e}")));
        }
    }
    let incoming = isolated.config.layer.incoming.subscription_mode().map(|_| {
        tokio::spawn(listeners::serve(
            session.clone(),
            Arc::new(listeners::Connector::new(channel)),
            helper_pid,
            isolated.config.layer.port_map.clone(),
        ))
    });

    let closed = session.closed();
    // Set when the stack's task ended on its own: its handle is not polled again.
    let mut stack_ended = false;
    let ended = tokio::select! {
        status = child.wait() => {
            let status = status.map_err(|e| {
                Failure::session(format!("cannot wait for the command: {e}"))
            })?;
            run::lost_before_exit(&session, status).unwrap_or(Ended::Command(status))
        }
        received = signals.recv() => {
            tracing::info!(signal = ?received, "stopping the command");
            let signalled = received == Signal::SIGINT && process::in_foreground();
            Ended::Command(stop(&mut child, &mut signals, signalled).await?)
        }
        reason = closed => {
            eprintln!("graft: lost the link to the agent ({reason}); stopping CMD");
            stop(&mut child, &mut signals, false).await?;
            Ended::LinkLost
        }
        result = &mut stack => {
            stack_ended = true;
            let why = match result {
                Ok(Ok(())) => "the tun device closed".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            eprintln!("graft: the isolated namespace's network stopped ({why}); stopping CMD");
            Ended::Command(stop(&mut child, &mut signals, false).await?)
        }
    };
    if let Some(incoming) = incoming {
        incoming.abort();
        let _ = incoming.await;
    }
    if !stack_ended {
        stack.abort();
        let _ = stack.await;
    }
    // The FUSE connections end with the namespace's mounts (the helper is gone).
    let _ = tokio::task::spawn_blocking(move || {
        for served in mounts {
            served.close(Duration::from_secs(2));
        }
    })
    .await;
    // The container's volumes: unmounted here, before the session closes.
    drop(container);
    // The stack's flows let go of the session as their tasks end.
    for _ in 0..50 {
        if Arc::strong_count(&session) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Ok(session) = Arc::try_unwrap(session) {
        session.close().await;
    }
    Ok(ended)
}

/// Starts `graft __isolate-helper CONFIG -- COMMAND...` with COMMAND's environment
/// and the helper's end of the socket pair at [`CHANNEL_FD`].
fn spawn_helper(
    config: &HelperConfig,
    command_line: &[OsString],
    env: &[(OsString, OsString)],
    channel: OwnedFd,
) -> Result<tokio::process::Child, Failure> {
    let exe = std::env::current_exe().map_err(|e| {
        Failure::session(format!("cannot find graft's own binary for --isolate: {e}"))
    })?;
    let json = serde_json::to_string(config).expect("the helper's configuration serialises");
    let mut command = tokio::process::Command::new(exe);
    command
        .arg(HELPER_ARG)
        .arg(json)
        .arg("--")
        .args(command_line)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)));
    process::pass_fd(&mut command, channel.as_raw_fd(), CHANNEL_FD);
    process::die_with_parent(&mut command);
    let child = command
        .spawn()
        .map_err(|e| Failure::session(format!("cannot start the isolated namespace: {e}")))?;
    drop(channel);
    Ok(child)
}

/// The tun descriptor the helper passed, on the runtime.
#[allow(unsafe_code)]
fn tun_device(tun: OwnedFd) -> Result<tun_rs::AsyncDevice, Failure> {
    // SAFETY: `tun` is a tun device the helper opened with IFF_TUN | IFF_NO_PI and
    // passed over SCM_RIGHTS (tun-rs's builder defaults: no packet information, no
    // vnet header); ownership moves to the device.
    unsafe { tun_rs::AsyncDevice::from_fd(tun.into_raw_fd()) }
        .map_err(|e| Failure::session(format!("cannot use the isolated namespace's tun: {e}")))
}

/// The namespace's resolver files, from the target's.
struct Resolver {
    /// The target's search domains.
    search: Vec<String>,
    /// The target's `ndots`.
    ndots: Option<u32>,
    /// The target's first name server (where graft relays the questions it does
    /// not answer itself).
    nameserver: Option<IpAddr>,
    /// The target's `/etc/hosts`.
    hosts: Option<Vec<u8>>,
}

impl Resolver {
    async fn of_target(session: &Session) -> Resolver {
        let resolv = read_target_file(session, "/etc/resolv.conf").await;
        let hosts = read_target_file(session, "/etc/hosts").await;
        let mut resolver = Resolver {
            search: Vec::new(),
            ndots: None,
            nameserver: None,
            hosts,
        };
        let text = resolv.map(|r| String::from_utf8_lossy(&r).into_owned());
        for line in text.as_deref().unwrap_or("").lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                // resolv.conf(5): the last `search` or `domain` line wins.
                Some("search" | "domain") => resolver.search = words.map(str::to_owned).collect(),
                Some("nameserver") if resolver.nameserver.is_none() => {
                    resolver.nameserver = words.next().and_then(|w| w.parse().ok());
                }
                Some("options") => {
                    for option in words {
                        if let Some(n) = option.strip_prefix("ndots:") {
                            resolver.ndots = n.parse().ok();
                        }
                    }
                }
                _ => {}
            }
        }
        resolver
    }

    /// The namespace's `resolv.conf`.
    fn resolv_conf(&self) -> String {
        let mut text = format!(
            "# graft --isolate: graft answers with the target's resolver\nnameserver {RESOLVER_V4}\n"
        );
        if !self.search.is_empty() {
            text.push_str(&format!("search {}\n", self.search.join(" ")));
        }
        if let Some(ndots) = self.ndots {
            text.push_str(&format!("options ndots:{ndots}\n"));
        }
        text
    }

    /// Writes the files into `dir`; returns what to bind where.
    fn write(&self, dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>, Failure> {
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).map(|()| path).map_err(|e| {
                Failure::session(format!("cannot write the isolated namespace's {name}: {e}"))
            })
        };
        let mut binds = vec![(
            write("resolv.conf", self.resolv_conf().as_bytes())?,
            PathBuf::from("/etc/resolv.conf"),
        )];
        if let Some(hosts) = &self.hosts
            && Path::new("/etc/hosts").exists()
        {
            binds.push((write("hosts", hosts)?, PathBuf::from("/etc/hosts")));
        }
        Ok(binds)
    }
}

/// A small file of the target's (its first chunk), or `None` when it cannot be read.
async fn read_target_file(session: &Session, path: &str) -> Option<Vec<u8>> {
    let request = RemoteRequest::ReadFile {
        path: path.into(),
        no_follow: false,
    };
    match session.remote(request).await.ok()? {
        RemoteResponse::File { data, rest, .. } => {
            if let Some(handle) = rest {
                let _ = session.remote(RemoteRequest::Close { handle }).await;
            }
            Some(data)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespace_resolv_conf_keeps_the_targets_search_and_ndots() {
        let resolver = Resolver {
            search: vec!["shop.svc.cluster.local".into(), "svc.cluster.local".into()],
            ndots: Some(5),
            nameserver: Some("10.96.0.10".parse().unwrap()),
            hosts: None,
        };
        let text = resolver.resolv_conf();
        assert!(text.contains("nameserver 198.18.255.254\n"), "{text}");
        assert!(
            text.contains("search shop.svc.cluster.local svc.cluster.local\n"),
            "{text}"
        );
        assert!(text.contains("options ndots:5\n"), "{text}");
    }
}
