//! The helper: graft re-run as `graft __isolate-helper CONFIG -- CMD...` to make
//! the isolated namespace and live in it beside COMMAND.
//!
//! It starts single-threaded (a user namespace can only be entered by a
//! single-threaded process, unshare(2)), then: new user namespace (unless root;
//! its own uid and gid mapped to themselves, user_namespaces(7)), network and mount
//! namespaces; loopback up, a tun device with the configured addresses and
//! default routes (rtnetlink); mounts private, the new root with the target's
//! files built and entered (`root.rs`), the resolver files bound over
//! `/etc/resolv.conf` and `/etc/hosts`; the tun's descriptor to graft. On graft's
//! `Start` it runs COMMAND (which keeps the helper's uid, so it has no capability
//! left, capabilities(7)), then connects sockets to COMMAND's listeners for graft
//! on request, forwards graft's signals to COMMAND, and exits with COMMAND's
//! status.

use std::{
    ffi::OsString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, FromRawFd, OwnedFd},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use futures::TryStreamExt;
use nix::{
    mount::MsFlags,
    sched::CloneFlags,
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};

use super::files::Layout;
use super::wire::{Channel, Message};
use crate::process;

/// The first argument that makes `graft` the helper.
pub const HELPER_ARG: &str = "__isolate-helper";
/// The descriptor number of the helper's end of the socket pair.
pub const CHANNEL_FD: i32 = 3;
/// How long a connect to COMMAND's listener may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the helper sets up, from graft (JSON in its second argument).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelperConfig {
    /// The tun device's name.
    pub tun: String,
    /// Its MTU in bytes.
    pub mtu: u16,
    /// Its IPv4 address and prefix length.
    pub addr4: (Ipv4Addr, u8),
    /// Its IPv6 address and prefix length.
    pub addr6: (Ipv6Addr, u8),
    /// Whether to make a user namespace first (graft is not root).
    pub user_namespace: bool,
    /// Files bound over paths of the namespace: (file, path it covers).
    pub binds: Vec<(PathBuf, PathBuf)>,
    /// The new root with the target's files (`None` under `--fs local`).
    pub layout: Option<Layout>,
}

/// Runs the helper; `args` are the process's arguments after [`HELPER_ARG`].
pub fn main(args: Vec<OsString>) -> ExitCode {
    // SAFETY: graft's spawn put the helper's end of the socket pair at CHANNEL_FD
    // (dup2 before exec); nothing else in this fresh process owns it.
    #[allow(unsafe_code)]
    let channel = unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) };
    let (config, command) = match parse(args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("graft: {message}");
            return ExitCode::from(125);
        }
    };
    let setup = enter_namespaces(&config);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("graft: the isolated namespace's helper cannot start: {e}");
            return ExitCode::from(125);
        }
    };
    runtime.block_on(async move {
        let channel = match Channel::new(channel) {
            Ok(channel) => channel,
            Err(e) => {
                eprintln!("graft: the isolated namespace's helper lost graft: {e}");
                return ExitCode::from(125);
            }
        };
        let setup = match (setup, &config.layout) {
            (Ok(()), Some(layout)) => super::root::build(layout, &config.binds, &channel).await,
            (setup, _) => setup,
        };
        let tun = match setup {
            Ok(()) => configure(&config).await,
            Err(message) => Err(message),
        };
        let tun = match tun {
            Ok(tun) => tun,
            Err(message) => {
                let _ = channel.send(&Message::Failed(message), None).await;
                return ExitCode::from(125);
            }
        };
        if channel
            .send(&Message::Ready, Some(tun.as_fd()))
            .await
            .is_err()
        {
            return ExitCode::from(125);
        }
        drop(tun);
        match channel.recv().await {
            Ok(Some((Message::Start, _))) => {}
            _ => return ExitCode::from(125),
        }
        run_command(&channel, command).await
    })
}

fn parse(mut args: Vec<OsString>) -> Result<(HelperConfig, Vec<OsString>), String> {
    if args.len() < 3 || args[1] != "--" {
        return Err("the isolated namespace's helper is started by graft only".into());
    }
    let command = args.split_off(2);
    let config = args[0]
        .to_str()
        .and_then(|json| serde_json::from_str(json).ok())
        .ok_or("the isolated namespace's helper got a bad configuration")?;
    Ok((config, command))
}

/// Enters the new namespaces; must run while the process is single-threaded.
fn enter_namespaces(config: &HelperConfig) -> Result<(), String> {
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let mut flags = CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS;
    if config.user_namespace {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    nix::sched::unshare(flags).map_err(|e| {
        if config.user_namespace {
            format!(
                "cannot create an unprivileged user namespace for --isolate ({e}). The kernel \
                 forbids them here: check `sysctl user.max_user_namespaces` (must be > 0), \
                 `kernel.unprivileged_userns_clone` (Debian, must be 1) and \
                 `kernel.apparmor_restrict_unprivileged_userns` (Ubuntu, must be 0), or run \
                 graft as root; --no-isolate uses the LD_PRELOAD layer instead"
            )
        } else {
            format!("cannot create the network and mount namespaces for --isolate: {e}")
        }
    })?;
    if config.user_namespace {
        let write = |path: &str, text: String| {
            std::fs::write(path, text)
                .map_err(|e| format!("cannot write {path} of the isolated namespace: {e}"))
        };
        write("/proc/self/setgroups", "deny".into())?;
        write("/proc/self/uid_map", format!("{uid} {uid} 1\n"))?;
        write("/proc/self/gid_map", format!("{gid} {gid} 1\n"))?;
    }
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make the isolated namespace's mounts private: {e}"))?;
    // With a new root, the resolver's files are bound into it instead (root.rs).
    let binds = if config.layout.is_some() {
        &[][..]
    } else {
        &config.binds[..]
    };
    for (file, path) in binds {
        nix::mount::mount(
            Some(file),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            format!(
                "cannot bind {} over {} in the isolated namespace: {e}",
                file.display(),
                path.display()
            )
        })?;
    }
    Ok(())
}

/// Makes the tun device and the namespace's addresses and routes; returns the
/// tun's descriptor.
async fn configure(config: &HelperConfig) -> Result<tun_rs::SyncDevice, String> {
    let tun = tun_rs::DeviceBuilder::new()
        .name(&config.tun)
        .mtu(config.mtu)
        .build_sync()
        .map_err(|e| format!("cannot create the tun device {}: {e}", config.tun))?;
    let failed = |what: &str, e: rtnetlink::Error| {
        format!("cannot set up the isolated namespace's network ({what}): {e}")
    };
    let (connection, handle, _) = rtnetlink::new_connection()
        .map_err(|e| format!("cannot open a netlink socket in the isolated namespace: {e}"))?;
    tokio::spawn(connection);
    let index = |name: String| {
        let handle = handle.clone();
        async move {
            let link = handle
                .link()
                .get()
                .match_name(name.clone())
                .execute()
                .try_next()
                .await
                .map_err(|e| failed("find a link", e))?
                .ok_or_else(|| format!("no link {name} in the isolated namespace"))?;
            Ok::<u32, String>(link.header.index)
        }
    };
    let lo = index("lo".into()).await?;
    let dev = index(config.tun.clone()).await?;
    for link in [lo, dev] {
        handle
            .link()
            .change(rtnetlink::LinkUnspec::new_with_index(link).up().build())
            .execute()
            .await
            .map_err(|e| failed("link up", e))?;
    }
    let (v4, prefix4) = config.addr4;
    let (v6, prefix6) = config.addr6;
    for (addr, prefix) in [(IpAddr::V4(v4), prefix4), (IpAddr::V6(v6), prefix6)] {
        handle
            .address()
            .add(dev, addr, prefix)
            .execute()
            .await
            .map_err(|e| failed("address", e))?;
    }
    handle
        .route()
        .add(
            rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                .output_interface(dev)
                .build(),
        )
        .execute()
        .await
        .map_err(|e| failed("IPv4 default route", e))?;
    handle
        .route()
        .add(
            rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new()
                .output_interface(dev)
                .build(),
        )
        .execute()
        .await
        .map_err(|e| failed("IPv6 default route", e))?;
    Ok(tun)
}

/// Runs COMMAND and serves graft until it exits; returns its exit code.
async fn run_command(channel: &Channel, command: Vec<OsString>) -> ExitCode {
    let (program, args) = command.split_first().expect("parse checked a command");
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    process::die_with_parent(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!(
                "graft: cannot run `{}`: {e}",
                std::path::Path::new(program).display()
            );
            return ExitCode::from(127);
        }
    };
    let pid = child.id().unwrap_or(0);
    let _ = channel.send(&Message::Started(pid), None).await;
    let forward = |signal: Signal| {
        let _ = kill(Pid::from_raw(pid as i32), signal);
    };
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = child.start_kill();
        return ExitCode::from(125);
    };
    let mut graft_gone = false;
    loop {
        tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(status) => ExitCode::from(process::exit_code(status)),
                    Err(_) => ExitCode::from(1),
                };
            }
            _ = term.recv() => forward(Signal::SIGTERM),
            _ = hup.recv() => forward(Signal::SIGHUP),
            // A terminal's Ctrl-C reaches COMMAND by itself (same process group).
            _ = int.recv() => if !process::in_foreground() { forward(Signal::SIGINT) },
            message = channel.recv(), if !graft_gone => match message {
                Ok(Some((Message::Connect(addr), _))) => {
                    let reply = connect(addr).await;
                    let sent = match &reply {
                        Ok(fd) => channel.send(&Message::Connected, Some(fd.as_fd())).await,
                        Err(errno) => channel.send(&Message::Refused(*errno), None).await,
                    };
                    if sent.is_err() {
                        graft_gone = true;
                    }
                }
                Ok(Some(_)) => {}
                // graft is gone: COMMAND's network is too; stop it.
                Ok(None) | Err(_) => {
                    graft_gone = true;
                    forward(Signal::SIGTERM);
                }
            },
        }
    }
}

/// Connects to a listener of COMMAND's; the `errno` on failure.
async fn connect(addr: SocketAddr) -> Result<OwnedFd, i32> {
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            stream
                .into_std()
                .map(OwnedFd::from)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
        }
        Ok(Err(e)) => Err(e.raw_os_error().unwrap_or(libc::ECONNREFUSED)),
        Err(_) => Err(libc::ETIMEDOUT),
    }
}
