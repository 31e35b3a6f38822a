//! Machine scope: `graft connect`, `graft status`, `graft quit`.
//!
//! `graft connect` makes every program on this machine reach the target's
//! network: the cluster's pod and Service ranges (or, for a `pid:` target, the
//! networks of its namespace) are routed to a tun device served by graft's
//! user-space stack, whose connections leave from the target; cluster names
//! resolve through graft's DNS server, wired into systemd-resolved or
//! `/etc/resolv.conf`. It starts the connection as a detached daemon
//! (`daemon`), waits until it is up and prints what it did; `graft status` and
//! `graft quit` talk to the daemon over its root-only control socket (`state`).
//! Modules: `daemon` (the connection), `state` (state directory, control
//! socket, repair), `ranges` and `kube_ranges` (what to route), `dns` (the
//! server), `resolv` (the machine's resolver).

mod daemon;
mod dns;
mod kube_ranges;
mod ranges;
pub mod resolv;
pub mod state;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use clap::{Args, ValueEnum};

use crate::{
    args::KubeFlags,
    failure::Failure,
    process::{self, Signals},
};
use state::{Request, Response, Status};

/// The tun device of the connection.
pub const TUN_NAME: &str = "graft-connect";
/// The tun's IPv4 address, where graft's DNS server listens: link-local
/// (RFC 3927), so it collides with no network a machine routes.
pub const DNS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 53, 53);
/// The tun's IPv6 address (a unique local address, RFC 4193).
pub const DNS_V6: Ipv6Addr = Ipv6Addr::new(0xfd67, 0x7261, 0x6674, 0, 0, 0, 0, 0x53);
/// How long `graft connect` waits for the daemon to be up.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// `--dns` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum DnsArg {
    /// systemd-resolved when it runs, else /etc/resolv.conf.
    #[default]
    Auto,
    /// Per-link DNS and routing domains in systemd-resolved.
    SystemdResolved,
    /// Rewrite /etc/resolv.conf (restored on quit).
    ResolvConf,
}

/// `graft connect` flags.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// `targetless` (default: a targetless agent in the namespace), a workload
    /// `KIND/NAME` whose pod's network to join, or `pid:PID` (that process's
    /// network namespace).
    #[arg(long, value_name = "TARGET")]
    pub target: Option<String>,
    /// Kubernetes access.
    #[command(flatten)]
    pub kube: KubeFlags,
    /// How the agent is placed beside a workload target: `ephemeral` or `node`.
    #[arg(long, value_name = "MODE", value_parser = ["ephemeral", "node"])]
    pub agent_mode: Option<String>,
    /// The agent image (default: graft's, tagged with its version).
    #[arg(long, value_name = "IMAGE")]
    pub agent_image: Option<String>,
    /// The agent image's pull policy: Always, IfNotPresent or Never.
    #[arg(long, value_name = "POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub agent_pull_policy: Option<String>,
    /// Also route CIDR through graft (repeatable), e.g. a range graft could not
    /// discover or one this machine routes elsewhere; adds to `[connect]
    /// also_proxy` of graft.toml.
    #[arg(long = "also-proxy", value_name = "CIDR")]
    pub also_proxy: Vec<String>,
    /// How cluster names reach graft's DNS server.
    #[arg(long, value_enum, default_value_t = DnsArg::Auto)]
    pub dns: DnsArg,
    /// Names this machine's name servers answer even when they look like the
    /// cluster's (`db.shop`, `*.corp.example`; repeatable; adds to `[dns] local`).
    #[arg(long = "dns-local", value_name = "NAME")]
    pub dns_local: Vec<String>,
    /// Names the target's resolver answers besides the cluster's, e.g. a
    /// domain only the cluster's DNS knows (repeatable; adds to `[dns] remote`).
    #[arg(long = "dns-remote", value_name = "NAME")]
    pub dns_remote: Vec<String>,
    /// Config file [default: ./graft.toml when it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run the connection in the foreground (what `graft connect` starts).
    #[arg(long, hide = true)]
    pub foreground: bool,
}

/// `graft status` flags.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// `json`: one JSON object (`connected`, then the connection's fields).
    #[arg(short, long, value_name = "FORMAT", value_parser = ["text", "json"], default_value = "text")]
    pub output: String,
}

/// `graft quit` flags.
#[derive(Debug, Clone, Args)]
pub struct QuitArgs {}

/// Fails unless graft runs as root.
pub fn require_root(what: &str) -> Result<(), Failure> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Failure::usage(format!(
            "{what} changes this machine's routes and DNS (a tun device, routes, the \
             resolver's configuration) and needs root"
        ))
        .hint(format!("run it with sudo: sudo graft {what}")))
    }
}

/// Runs `graft connect`.
pub async fn connect(args: ConnectArgs) -> Result<u8, Failure> {
    require_root("connect")?;
    if args.foreground {
        return daemon::run(args).await;
    }
    if let Some(Response::Status(status)) =
        state::ask(&Request::Status, Duration::from_secs(5)).await?
    {
        return Err(Failure::usage(format!(
            "already connected to {} (graft connect pid {})",
            status.target, status.pid
        ))
        .hint("run `graft quit` first, or `graft status` to see the connection"));
    }
    {
        let Some(_lock) = state::lock_within(Duration::from_secs(5)).await? else {
            return Err(Failure::usage("another graft connect is starting")
                .hint("wait for it, then see `graft status`"));
        };
        for line in state::repair() {
            eprintln!("graft: repaired what a previous connection left: {line}");
        }
    }
    let log_path = state::path("daemon.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| Failure::session(format!("cannot create {}: {e}", log_path.display())))?;
    let exe = std::env::current_exe()
        .map_err(|e| Failure::session(format!("cannot find graft's own binary: {e}")))?;
    let mut command = tokio::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .arg("--foreground")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| Failure::session_error(&e))?)
        .stderr(log);
    process::detach(&mut command);
    let mut child = command
        .spawn()
        .map_err(|e| Failure::session(format!("cannot start the connection: {e}")))?;
    let mut signals = Signals::new()?;
    let started = Instant::now();
    loop {
        if let Some(exit) = child.try_wait().map_err(|e| Failure::session_error(&e))? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            eprint!("{log}");
            return Err(Failure::session(format!("graft connect failed ({exit})"))
                .hint(format!("the whole log is in {}", log_path.display())));
        }
        if let Ok(Some(Response::Status(status))) =
            state::ask(&Request::Status, Duration::from_secs(5)).await
        {
            print!("{}", render(&status));
            return Ok(0);
        }
        if started.elapsed() > START_TIMEOUT {
            process::signal(&child, nix::sys::signal::Signal::SIGTERM);
            let _ = process::wait_or_kill(&mut child, Duration::from_secs(15)).await;
            return Err(Failure::session(format!(
                "the connection was not up within {} s",
                START_TIMEOUT.as_secs()
            ))
            .hint(format!("see {}", log_path.display())));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            received = signals.recv() => {
                process::signal(&child, nix::sys::signal::Signal::SIGTERM);
                let _ = process::wait_or_kill(&mut child, Duration::from_secs(15)).await;
                return Err(Failure::session(format!("stopped by {received:?} while connecting")));
            }
        }
    }
}

/// Runs `graft status`.
pub async fn status(args: StatusArgs) -> Result<u8, Failure> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Failure::usage(
            "graft status reads graft connect's control socket, which is root's only",
        )
        .hint("run it with sudo: sudo graft status"));
    }
    let answer = state::ask(&Request::Status, Duration::from_secs(5)).await?;
    let json = args.output == "json";
    match answer {
        Some(Response::Status(status)) => {
            if json {
                let mut value = serde_json::to_value(&*status).expect("the status serialises");
                value["connected"] = true.into();
                println!("{value}");
            } else {
                print!("{}", render(&status));
            }
        }
        Some(Response::Error(e)) => return Err(Failure::session(e)),
        _ => {
            let intercepts = state::intercepts();
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "connected": false, "intercepts": intercepts })
                );
            } else {
                println!("graft: not connected");
                for i in intercepts {
                    println!("  intercept {}", intercept_line(&i));
                }
            }
        }
    }
    Ok(0)
}

/// Runs `graft quit`: ends the intercepts and the connection, or repairs what a
/// crashed one left.
pub async fn quit(_args: QuitArgs) -> Result<u8, Failure> {
    require_root("quit")?;
    for intercept in state::intercepts() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(intercept.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        eprintln!("graft: ended intercept {}", intercept.name);
    }
    match state::ask(&Request::Quit, Duration::from_secs(60)).await? {
        Some(Response::Quit { notes }) => {
            for note in notes {
                eprintln!("graft: {note}");
            }
            eprintln!("graft: disconnected; the tun, its routes and DNS are restored");
            Ok(0)
        }
        Some(Response::Error(e)) => Err(Failure::session(e)),
        _ => {
            let Some(_lock) = state::lock_within(Duration::from_secs(5)).await? else {
                return Err(Failure::session(
                    "graft connect is running but does not answer its control socket",
                )
                .hint("see /run/graft/connect/daemon.log; kill it, then run `graft quit` again"));
            };
            let repaired = state::repair();
            if repaired.is_empty() {
                eprintln!("graft: not connected; nothing to restore");
            }
            for line in repaired {
                eprintln!("graft: repaired what a previous connection left: {line}");
            }
            Ok(0)
        }
    }
}

fn intercept_line(i: &state::InterceptEntry) -> String {
    format!(
        "{}: {} port {} → 127.0.0.1:{} ({}{})",
        i.name,
        i.target,
        i.remote_port,
        i.local_port,
        i.mode,
        i.filter
            .as_deref()
            .map(|f| format!(", filter {f}"))
            .unwrap_or_default()
    )
}

/// The human form of a status.
fn render(status: &Status) -> String {
    let mut out = format!("graft: connected to {}", status.target);
    if let Some(ns) = &status.namespace {
        out.push_str(&format!(" in namespace {ns}"));
    }
    if let Some(context) = &status.context {
        out.push_str(&format!(" (context {context})"));
    }
    let since = jiff::Timestamp::from_second(status.since as i64)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default();
    out.push_str(&format!(" since {since}, pid {}\n", status.pid));
    for range in &status.ranges {
        out.push_str(&format!("  route    {range} → {}\n", status.tun));
    }
    for skipped in &status.skipped {
        out.push_str(&format!(
            "  skipped  {}: {}\n",
            skipped.range, skipped.reason
        ));
    }
    out.push_str(&format!(
        "  dns      {} on {} via {}; search {}\n",
        status.dns_address,
        status.tun,
        status.dns_mode,
        if status.search.is_empty() {
            "-".to_owned()
        } else {
            status.search.join(" ")
        }
    ));
    for note in &status.notes {
        out.push_str(&format!("  note     {note}\n"));
    }
    for i in &status.intercepts {
        out.push_str(&format!("  intercept {}\n", intercept_line(i)));
    }
    out
}
