//! The connection itself: `graft connect --foreground`, which `graft connect`
//! starts detached (its own session, stderr to `/run/graft/connect/daemon.log`).
//!
//! In order: take the connection's lock and repair leftovers, open the session
//! (a targetless agent in the cluster, or the agent of a `pid:` target), create
//! the tun with graft's DNS address, route the ranges to it, serve it with the
//! user-space stack (`graft-netstack`: every TCP connection and UDP flow sent
//! into the tun leaves from the target), serve DNS on the tun's address, point
//! the machine's resolver at it, then answer the control socket until `graft
//! quit`, a signal, or the link's end. The way out undoes the same steps in
//! reverse on every path; a `kill -9` leaves the resolver's backup and the lock
//! free, which the next `graft connect` or `graft quit` repairs.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use graft_config::{Config, RunOverrides, Target};
use graft_netstack::{Netstack, NetstackOptions};
use graft_protocol::remote::{RemoteRequest, RemoteResponse};
use graft_proxy::{Session, SessionOptions};
use ipnet::IpNet;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use super::{
    ConnectArgs, DNS_V4, DNS_V6, DnsArg, TUN_NAME,
    dns::{DnsServer, Domains},
    kube_ranges, ranges,
    resolv::{self, DnsMode},
    state::{self, Request, Response, Status},
};
use crate::{
    cluster,
    failure::Failure,
    locate::locate,
    open::{self, OpenRequest},
    process::Signals,
    session_dir::{SessionDir, random_hex},
};

/// The tun's MTU, in bytes.
const MTU: u16 = 1500;

/// What the way out must undo, filled in as the steps succeed.
#[derive(Default)]
struct Undo {
    dns: Option<DnsMode>,
    tun: bool,
}

impl Undo {
    /// Undoes what was done; returns notes for the user.
    fn run(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        match self.dns.take() {
            Some(DnsMode::ResolvConf) => match resolv::Managed::system().restore() {
                Ok(resolv::Restored::LeftTheirs) => notes.push(format!(
                    "{} was rewritten by someone else while connected: left as it is",
                    resolv::RESOLV_CONF
                )),
                Ok(_) => {}
                Err(e) => notes.push(format!(
                    "could not restore {} ({e}): `graft quit` tries again",
                    resolv::RESOLV_CONF
                )),
            },
            Some(DnsMode::SystemdResolved) => resolv::revert_resolved(TUN_NAME),
            None => {}
        }
        if std::mem::take(&mut self.tun) {
            // Deleting the device removes its addresses and routes with it.
            let _ = std::process::Command::new("ip")
                .args(["link", "del", TUN_NAME])
                .stderr(std::process::Stdio::null())
                .status();
        }
        notes
    }
}

/// Runs the connection until it ends; the exit code is 0 after `graft quit` or
/// a signal, 1 when the link was lost.
pub async fn run(args: ConnectArgs) -> Result<u8, Failure> {
    let Some(_lock) = state::try_lock()? else {
        return Err(Failure::usage("graft connect is already running").hint("see `graft status`"));
    };
    for line in state::repair() {
        eprintln!("graft: repaired: {line}");
    }
    std::fs::write(state::path("daemon.pid"), std::process::id().to_string())
        .map_err(|e| Failure::session(format!("cannot write the pid file: {e}")))?;
    let mut undo = Undo::default();
    let result = connected(&args, &mut undo).await;
    let notes = undo.run();
    for note in &notes {
        eprintln!("graft: {note}");
    }
    let _ = std::fs::remove_file(state::socket());
    let _ = std::fs::remove_file(state::path("daemon.pid"));
    match result {
        Ok((code, quitter)) => {
            if let Some(mut quitter) = quitter {
                let line = serde_json::to_string(&Response::Quit { notes })
                    .expect("a response serialises");
                let _ = quitter.write_all(format!("{line}\n").as_bytes()).await;
            }
            Ok(code)
        }
        Err(failure) => Err(failure),
    }
}

/// Everything between the lock and the way out; returns the exit code and the
/// `graft quit` connection to answer once everything is undone.
async fn connected(
    args: &ConnectArgs,
    undo: &mut Undo,
) -> Result<(u8, Option<UnixStream>), Failure> {
    let (config, file_also_proxy) = resolve_config(args)?;
    let exe = std::env::current_exe().ok();
    let pieces = locate(exe.as_deref(), &|name| std::env::var_os(name))?;
    let dir = SessionDir::create(0, None)?;
    let secret = random_hex(32)?;
    let graft_log = std::env::var("GRAFT_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let opened = open::open(OpenRequest {
        config: &config,
        dir: dir.path(),
        agent_binary: &pieces.agent,
        secret: &secret,
        graft_log: graft_log.as_deref(),
        options: SessionOptions {
            announce_steals: false,
            ..SessionOptions::default()
        },
    })
    .await?;
    let session = Arc::new(opened.session);
    let result = serve(args, &file_also_proxy, &config, session.clone(), undo).await;
    let link_lost = matches!(result, Ok((1, _)) | Err(_));
    match Arc::try_unwrap(session) {
        Ok(session) => session.close().await,
        // A flow still holds it: dropping the last holder ends the link.
        Err(session) => drop(session),
    }
    opened.agents.stop(link_lost).await;
    drop(dir);
    result
}

/// graft's flags and `graft.toml` for the connection: the target defaults to
/// `targetless` (never the file's target, which names a workload to run as).
/// Also returns `[connect] also_proxy` of the file.
fn resolve_config(args: &ConnectArgs) -> Result<(Config, Vec<String>), Failure> {
    let flags = RunOverrides {
        target: Some(
            args.target
                .clone()
                .unwrap_or_else(|| cluster::TARGETLESS.to_owned()),
        ),
        namespace: args.kube.namespace.clone(),
        context: args.kube.context.clone(),
        kubeconfig: args.kube.kubeconfig.clone(),
        agent_image: args.agent_image.clone(),
        agent_pull_policy: args.agent_pull_policy.clone(),
        agent_mode: args.agent_mode.clone(),
        dns_local: args.dns_local.clone(),
        dns_remote: args.dns_remote.clone(),
        ..RunOverrides::default()
    };
    let file = crate::run::load_file(args.config.as_deref())?;
    let cwd = std::env::current_dir().ok();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let config = Config::resolve(&flags, &file, cwd.as_deref(), home.as_deref())?;
    Ok((config, file.connect.also_proxy))
}

/// What the target says about names: its resolver's search list and its hosts.
async fn target_names(session: &Session) -> (Vec<String>, Vec<String>) {
    let read = |path: &'static str| async move {
        match session
            .remote(RemoteRequest::ReadFile {
                path: path.to_owned(),
                no_follow: false,
            })
            .await
        {
            Ok(RemoteResponse::File { data, .. }) => String::from_utf8_lossy(&data).into_owned(),
            _ => String::new(),
        }
    };
    let search = resolv::ResolvConf::parse(&read("/etc/resolv.conf").await).search;
    let hosts = read("/etc/hosts")
        .await
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| {
            l.split_whitespace()
                .skip(1)
                .map(str::to_ascii_lowercase)
                .collect::<Vec<_>>()
        })
        .filter(|name| !name.starts_with("localhost") && !name.starts_with("ip6-"))
        .collect();
    (search, hosts)
}

/// The cluster's (or the target's) ranges and names, and notes on what is unknown.
struct Discovered {
    ranges: Vec<IpNet>,
    domains: Domains,
    search: Vec<String>,
    notes: Vec<String>,
    context: Option<String>,
    namespace: Option<String>,
}

async fn discover(config: &Config, session: &Session) -> Result<Discovered, Failure> {
    let (target_search, hosts) = target_names(session).await;
    match &config.target {
        Target::Pid(pid) => {
            let ranges = ranges::target_routes(*pid).map_err(|e| {
                Failure::session(format!("cannot read the routes of process {pid}: {e}"))
            })?;
            let mut domains = Domains {
                absolute: target_search
                    .iter()
                    .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                    .collect(),
                ..Domains::default()
            };
            domains.exact = hosts.into_iter().collect();
            domains.local.clone_from(&config.layer.dns_local);
            domains.remote.clone_from(&config.layer.dns_remote);
            Ok(Discovered {
                ranges,
                domains,
                search: target_search,
                notes: Vec::new(),
                context: None,
                namespace: None,
            })
        }
        Target::Kube(_) => {
            let cluster = graft_kube::connect(&graft_kube::ClientOptions {
                kubeconfig: config.kube.kubeconfig.clone(),
                context: config.kube.context.clone(),
                namespace: config.kube.namespace.clone(),
            })
            .await
            .map_err(|e| Failure::session(format!("cannot reach the cluster: {e}")))?;
            let facts = kube_ranges::discover(&cluster.client, &cluster.namespace).await;
            // The cluster domain: what follows `svc.` in the pod's search list.
            let cluster_domain = target_search
                .iter()
                .find_map(|d| {
                    d.strip_prefix("svc.")
                        .map(|d| d.trim_end_matches('.').to_owned())
                })
                .unwrap_or_else(|| "cluster.local".to_owned());
            let ns = &cluster.namespace;
            let search = vec![
                format!("{ns}.svc.{cluster_domain}"),
                format!("svc.{cluster_domain}"),
                cluster_domain.clone(),
            ];
            let mut last_labels: std::collections::HashSet<String> = facts
                .namespaces
                .iter()
                .map(|n| n.to_ascii_lowercase())
                .collect();
            last_labels.insert("svc".into());
            let context = config.kube.context.clone().or_else(|| {
                kube::config::Kubeconfig::read()
                    .ok()
                    .and_then(|k| k.current_context)
            });
            Ok(Discovered {
                ranges: facts.ranges,
                domains: Domains {
                    absolute: vec![cluster_domain],
                    last_labels,
                    exact: Default::default(),
                    local: config.layer.dns_local.clone(),
                    remote: config.layer.dns_remote.clone(),
                },
                search,
                notes: facts.notes,
                context,
                namespace: Some(ns.clone()),
            })
        }
    }
}

/// Sets up the machine and answers the control socket until the end.
async fn serve(
    args: &ConnectArgs,
    file_also_proxy: &[String],
    config: &Config,
    session: Arc<Session>,
    undo: &mut Undo,
) -> Result<(u8, Option<UnixStream>), Failure> {
    let discovered = discover(config, &session).await?;
    let mut forced = Vec::new();
    for text in args.also_proxy.iter().chain(file_also_proxy) {
        forced.push(text.parse::<IpNet>().map_err(|e| {
            Failure::usage(format!("invalid --also-proxy {text:?}: {e}"))
                .hint("give a CIDR such as 10.96.0.0/12 or 10.1.2.3/32")
        })?);
    }

    let device = tun_rs::DeviceBuilder::new()
        .name(TUN_NAME)
        .ipv4(DNS_V4, 32u8, None)
        .ipv6(DNS_V6, 128u8)
        .mtu(MTU)
        .build_async()
        .map_err(|e| {
            Failure::session(format!("cannot create the tun device {TUN_NAME}: {e}"))
                .hint("graft connect needs root and /dev/net/tun (modprobe tun)")
        })?;
    undo.tun = true;
    let host = ranges::host_routes(TUN_NAME);
    let (planned, mut skipped) = ranges::plan(&discovered.ranges, &forced, &host);
    let mut routed = Vec::new();
    for range in planned {
        let family = if range.addr().is_ipv4() { "-4" } else { "-6" };
        let out = std::process::Command::new("ip")
            .args([family, "route", "add", &range.to_string(), "dev", TUN_NAME])
            .output();
        match out {
            Ok(out) if out.status.success() => routed.push(range),
            Ok(out) => skipped.push(ranges::Skipped {
                range,
                reason: format!(
                    "ip route add failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            }),
            Err(e) => skipped.push(ranges::Skipped {
                range,
                reason: format!("cannot run ip: {e}"),
            }),
        }
    }
    let mut stack = Netstack::serve(
        device,
        session.clone(),
        NetstackOptions {
            mtu: MTU,
            ..NetstackOptions::default()
        },
    );

    let managed = resolv::Managed::system();
    let original = managed.original().unwrap_or_default();
    let upstreams: Vec<SocketAddr> = original
        .nameservers
        .iter()
        .filter(|ip| **ip != IpAddr::V4(DNS_V4) && **ip != IpAddr::V6(DNS_V6))
        .map(|ip| SocketAddr::new(*ip, 53))
        .collect();
    let server = Arc::new(DnsServer::new(
        session.clone(),
        discovered.domains.clone(),
        upstreams,
    ));
    // The tun's address must be up before the server can bind to it.
    let dns_addr = SocketAddr::new(IpAddr::V4(DNS_V4), 53);
    let mut bound = Err(std::io::Error::other("not tried"));
    for _ in 0..50 {
        bound = tokio::net::UdpSocket::bind(dns_addr).await.map(drop);
        if bound.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bound.map_err(|e| Failure::session(format!("cannot serve DNS on {dns_addr}: {e}")))?;
    let mut dns_task = tokio::spawn(server.serve(dns_addr));

    let mode = match args.dns {
        DnsArg::Auto if resolv::resolved_runs() => DnsMode::SystemdResolved,
        DnsArg::Auto | DnsArg::ResolvConf => DnsMode::ResolvConf,
        DnsArg::SystemdResolved => DnsMode::SystemdResolved,
    };
    let mut routing: Vec<String> = discovered.domains.absolute.clone();
    routing.extend(discovered.domains.last_labels.iter().cloned());
    // `[dns] remote` names: a wildcard routes its domain, a name itself (a
    // routing domain covers the name and what is under it).
    routing.extend(discovered.domains.remote.iter().map(|p| {
        let text = p.to_string();
        text.strip_prefix("*.").map_or(text.clone(), str::to_owned)
    }));
    routing.sort();
    routing.dedup();
    match mode {
        DnsMode::SystemdResolved => {
            let commands = resolv::resolved_commands(
                TUN_NAME,
                IpAddr::V4(DNS_V4),
                &discovered.search,
                &routing,
            );
            resolv::apply_resolved(&commands).map_err(|e| {
                Failure::session(format!("cannot configure systemd-resolved: {e}"))
                    .hint("pass --dns resolv-conf to manage /etc/resolv.conf instead")
            })?;
        }
        DnsMode::ResolvConf => {
            let text = resolv::render(IpAddr::V4(DNS_V4), &discovered.search, &original);
            managed.install(&text).map_err(|e| {
                Failure::session(format!("cannot write {}: {e}", resolv::RESOLV_CONF))
            })?;
        }
    }
    undo.dns = Some(mode);

    let status = Status {
        pid: std::process::id(),
        target: config.target.to_string(),
        context: discovered.context,
        namespace: discovered.namespace,
        tun: TUN_NAME.into(),
        dns_address: IpAddr::V4(DNS_V4),
        dns_mode: mode,
        search: discovered.search,
        domains: routing,
        ranges: routed,
        skipped,
        notes: discovered.notes,
        since: jiff::Timestamp::now().as_second().max(0) as u64,
        intercepts: Vec::new(),
    };
    let _ = std::fs::remove_file(state::socket());
    let listener = UnixListener::bind(state::socket())
        .map_err(|e| Failure::session(format!("cannot bind the control socket: {e}")))?;
    std::fs::set_permissions(
        state::socket(),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .map_err(|e| Failure::session(format!("cannot restrict the control socket: {e}")))?;
    eprintln!("graft: connected: {}", status.target);

    let mut signals = Signals::new()?;
    let closed = session.closed();
    tokio::pin!(closed);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if let Some(quitter) = control(stream, &status).await {
                    return Ok((0, Some(quitter)));
                }
            }
            received = signals.recv() => {
                eprintln!("graft: {received:?}: disconnecting");
                return Ok((0, None));
            }
            reason = &mut closed => {
                eprintln!("graft: lost the link to the agent ({reason}): disconnecting");
                return Ok((1, None));
            }
            ended = &mut stack => {
                eprintln!("graft: the tun's stack ended ({ended:?}): disconnecting");
                dns_task.abort();
                return Ok((1, None));
            }
            ended = &mut dns_task => {
                eprintln!("graft: the DNS server ended ({ended:?}): disconnecting");
                stack.abort();
                return Ok((1, None));
            }
        }
    }
}

/// Handles one control connection: a root peer's one request. Returns the
/// connection of a `quit`, to be answered once everything is undone.
async fn control(stream: UnixStream, status: &Status) -> Option<UnixStream> {
    let root = stream.peer_cred().is_ok_and(|cred| cred.uid() == 0);
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        (&mut reader).take(64 * 1024).read_line(&mut line),
    )
    .await;
    let mut stream = reader.into_inner();
    let response = if !root {
        Response::Error("only root may control graft connect".into())
    } else {
        match (read, serde_json::from_str::<Request>(line.trim())) {
            (Ok(Ok(_)), Ok(Request::Quit)) => return Some(stream),
            (Ok(Ok(_)), Ok(Request::Status)) => {
                let mut status = status.clone();
                status.intercepts = state::intercepts();
                Response::Status(Box::new(status))
            }
            (_, Err(e)) => Response::Error(format!("bad request: {e}")),
            (Ok(Err(e)), _) => Response::Error(e.to_string()),
            (Err(_), _) => Response::Error("no request within 2 s".into()),
        }
    };
    let line = serde_json::to_string(&response).expect("a response serialises");
    let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
    None
}
