//! `graft intercept TARGET --port LOCAL[:REMOTE]` and `graft leave NAME`.
//!
//! An intercept is its own session with the target's agent (it needs no
//! `graft connect`, and works beside one): the target's port REMOTE is stolen
//! (or mirrored, or only the requests a filter matches) and every connection is
//! delivered to `127.0.0.1:LOCAL`, where any program of this machine may listen
//! (`Session::steal` with `Delivery::Listener`: no process runs under graft).
//! `--env-file` / `--env-json` write the target's environment for docker and
//! IDE run configurations, `--mount DIR` shows its filesystem (`graft-mount`,
//! read-only). The intercept runs until Ctrl-C, `graft leave NAME`
//! or `graft quit` (both signal the process named in its file under
//! `/run/graft/connect/intercepts`), or the link's end.

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;
use graft_config::{Config, RunOverrides, env::merge_env};
use graft_protocol::{
    incoming::IncomingMode as PortMode,
    remote::{RemoteRequest, RemoteResponse},
};
use graft_proxy::{Delivery, SessionOptions};

use crate::{
    args::KubeFlags,
    connect::state::{self, InterceptEntry},
    failure::Failure,
    locate::locate,
    open::{self, OpenRequest},
    process::Signals,
    session_dir::{SessionDir, random_hex},
};

/// `graft intercept` flags.
#[derive(Debug, Clone, Args)]
pub struct InterceptArgs {
    /// The target: `pid:PID` or a Kubernetes workload `KIND/NAME`.
    #[arg(value_name = "TARGET")]
    pub target: String,
    /// The local port the traffic reaches, and the target's port when it differs.
    #[arg(long, value_name = "LOCAL[:REMOTE]")]
    pub port: String,
    /// Mirror instead of steal: the target keeps serving, the local port gets a copy.
    #[arg(long)]
    pub mirror: bool,
    /// Take only HTTP requests with a header line `name: value` matching REGEX
    /// (repeatable; every filter flag must match).
    #[arg(long = "filter-header", value_name = "REGEX")]
    pub filter_header: Vec<String>,
    /// Take only HTTP requests whose path and query match REGEX (repeatable).
    #[arg(long = "filter-path", value_name = "REGEX")]
    pub filter_path: Vec<String>,
    /// Take only HTTP requests with this method (repeatable).
    #[arg(long = "filter-method", value_name = "METHOD")]
    pub filter_method: Vec<String>,
    /// Take only HTTP requests whose body matches REGEX (repeatable).
    #[arg(long = "filter-body", value_name = "REGEX")]
    pub filter_body: Vec<String>,
    /// Take only HTTP requests whose JSON body holds VALUE at POINTER (RFC 6901),
    /// e.g. `/user/id=42` (repeatable).
    #[arg(long = "filter-json", value_name = "POINTER=VALUE")]
    pub filter_json: Vec<String>,
    /// How much of a request body the body filters look at, in KiB [default: 64].
    #[arg(long = "filter-body-limit", value_name = "KIB")]
    pub filter_body_limit: Option<u32>,
    /// The intercept's name for `graft leave` [default: derived from the target
    /// and port].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Write the target's environment to FILE in docker's `--env-file` format
    /// (`NAME=value` lines; variables whose value spans lines are left out).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_file: Option<PathBuf>,
    /// Write the target's environment to FILE as one JSON object.
    #[arg(long = "env-json", value_name = "FILE")]
    pub env_json: Option<PathBuf>,
    /// Mount the target's filesystem (read-only, FUSE) at DIR, an empty
    /// directory, while the intercept runs.
    #[arg(long, value_name = "DIR")]
    pub mount: Option<PathBuf>,
    /// Kubernetes access.
    #[command(flatten)]
    pub kube: KubeFlags,
    /// How the agent is placed beside a Kubernetes target: `ephemeral` or `node`.
    #[arg(long, value_name = "MODE", value_parser = ["ephemeral", "node"])]
    pub agent_mode: Option<String>,
    /// The agent image (default: graft's, tagged with its version).
    #[arg(long, value_name = "IMAGE")]
    pub agent_image: Option<String>,
    /// The agent image's pull policy: Always, IfNotPresent or Never.
    #[arg(long, value_name = "POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub agent_pull_policy: Option<String>,
    /// Config file [default: ./graft.toml when it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `graft leave` flags.
#[derive(Debug, Clone, Args)]
pub struct LeaveArgs {
    /// The intercept's name (see `graft status`).
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// Parses `LOCAL[:REMOTE]`.
fn parse_port(text: &str) -> Result<(u16, u16), Failure> {
    let bad = || {
        Failure::usage(format!("invalid --port {text:?}"))
            .hint("give LOCAL or LOCAL:REMOTE, ports 1-65535, e.g. --port 8080:80")
    };
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad);
    match text.split_once(':') {
        Some((local, remote)) => Ok((port(local)?, port(remote)?)),
        None => port(text).map(|p| (p, p)),
    }
}

/// A name from the target and port: `api-80`, `pid-1234-80`.
fn default_name(target: &str, remote: u16) -> String {
    let base: String = target
        .rsplit('/')
        .next()
        .unwrap_or(target)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("{base}-{remote}")
}

/// Whether `name` is safe as a file name: letters, digits, `-`, `_`, `.`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Runs `graft intercept` until it is ended.
pub async fn intercept(args: InterceptArgs) -> Result<u8, Failure> {
    let (local, remote) = parse_port(&args.port)?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| default_name(&args.target, remote));
    if !valid_name(&name) {
        return Err(Failure::usage(format!("invalid intercept name {name:?}"))
            .hint("use letters, digits, '-', '_' and '.' (at most 64)"));
    }
    let config = resolve_config(&args)?;
    let filter_text = filter_text(&args);
    let exe = std::env::current_exe().ok();
    let pieces = locate(exe.as_deref(), &|n| std::env::var_os(n))?;
    let uid = nix::unistd::getuid().as_raw();
    let dir = SessionDir::create(uid, std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from))?;
    let secret = random_hex(32)?;
    let graft_log = std::env::var("GRAFT_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let mode = config
        .layer
        .incoming
        .subscription_mode()
        .unwrap_or(PortMode::Steal);
    let opened = open::open(OpenRequest {
        config: &config,
        dir: dir.path(),
        agent_binary: &pieces.agent,
        secret: &secret,
        graft_log: graft_log.as_deref(),
        options: SessionOptions {
            incoming_mode: mode,
            filter: config.layer.filter.clone(),
            ..SessionOptions::default()
        },
    })
    .await?;
    let session = std::sync::Arc::new(opened.session);
    let result = async {
        if args.env_file.is_some() || args.env_json.is_some() {
            let env = match session.remote(RemoteRequest::Env).await {
                Ok(RemoteResponse::Env(remote)) => merge_env(Vec::new(), &remote, &config.env),
                other => {
                    return Err(Failure::session(format!(
                        "cannot read the environment of {}: {other:?}",
                        args.target
                    )));
                }
            };
            if let Some(path) = &args.env_file {
                write_private(path, env_file(&env).as_bytes())?;
            }
            if let Some(path) = &args.env_json {
                let object: serde_json::Map<String, serde_json::Value> = env
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect();
                let text = serde_json::to_string_pretty(&object).expect("strings serialise");
                write_private(path, format!("{text}\n").as_bytes())?;
            }
        }
        session
            .steal(
                remote,
                Delivery::Listener(SocketAddr::from((Ipv4Addr::LOCALHOST, local))),
            )
            .await
            .map_err(|e| Failure::session(format!("cannot intercept port {remote}: {e}")))?;
        let mounted = match &args.mount {
            Some(dir) => Some(mount(&session, dir).await?),
            None => None,
        };
        let entry = InterceptEntry {
            name: name.clone(),
            pid: std::process::id(),
            target: args.target.clone(),
            remote_port: remote,
            local_port: local,
            mode: if mode == PortMode::Mirror {
                "mirror"
            } else {
                "steal"
            }
            .into(),
            filter: filter_text.clone(),
        };
        let registered = register(&entry)?;
        eprintln!(
            "graft: intercept {name}: port {remote} of {} → 127.0.0.1:{local}; Ctrl-C or \
             `graft leave {name}` ends it",
            args.target
        );
        let mut signals = Signals::new()?;
        let ended = tokio::select! {
            received = signals.recv() => {
                eprintln!("graft: intercept {name} ended ({received:?})");
                Ok(0)
            }
            reason = session.closed() => {
                eprintln!("graft: lost the link to the agent ({reason}); intercept {name} ended");
                Ok(crate::failure::EXIT_SESSION)
            }
        };
        if let Some(path) = registered {
            let _ = std::fs::remove_file(path);
        }
        if let Some(handle) = mounted {
            let dir = handle.mount_point().to_owned();
            match tokio::task::spawn_blocking(move || handle.unmount()).await {
                Ok(Ok(())) => {}
                _ => eprintln!(
                    "graft: could not unmount {}: run `fusermount3 -u {}`",
                    dir.display(),
                    dir.display()
                ),
            }
        }
        ended
    }
    .await;
    let link_lost = matches!(result, Ok(1) | Err(_));
    match std::sync::Arc::try_unwrap(session) {
        Ok(session) => session.close().await,
        Err(session) => drop(session),
    }
    opened.agents.stop(link_lost).await;
    drop(dir);
    result
}

/// Mounts the target's filesystem read-only at `dir`.
async fn mount(
    session: &std::sync::Arc<graft_proxy::Session>,
    dir: &Path,
) -> Result<graft_mount::MountHandle, Failure> {
    for swept in graft_mount::sweep_stale() {
        tracing::info!(?swept, "removed a dead graft mount");
    }
    let (shared, dir) = (session.clone(), dir.to_owned());
    let runtime = tokio::runtime::Handle::current();
    let handle = tokio::task::spawn_blocking(move || {
        graft_mount::mount(shared, runtime, &dir, graft_mount::MountOptions::default())
    })
    .await
    .map_err(|e| Failure::session(format!("mounting failed: {e}")))?
    .map_err(|e| match e {
        graft_mount::MountError::MountPoint { .. } | graft_mount::MountError::BadRoot(_) => {
            Failure::usage_error(&e)
        }
        _ => Failure::session_error(&e),
    })?;
    eprintln!(
        "graft: the target's filesystem is mounted at {} (read-only)",
        handle.mount_point().display()
    );
    Ok(handle)
}

fn resolve_config(args: &InterceptArgs) -> Result<Config, Failure> {
    let flags = RunOverrides {
        target: Some(args.target.clone()),
        steal: !args.mirror,
        mirror: args.mirror,
        filter_header: args.filter_header.clone(),
        filter_path: args.filter_path.clone(),
        filter_method: args.filter_method.clone(),
        filter_body: args.filter_body.clone(),
        filter_json: args.filter_json.clone(),
        filter_body_limit_kib: args.filter_body_limit,
        namespace: args.kube.namespace.clone(),
        context: args.kube.context.clone(),
        kubeconfig: args.kube.kubeconfig.clone(),
        agent_mode: args.agent_mode.clone(),
        agent_image: args.agent_image.clone(),
        agent_pull_policy: args.agent_pull_policy.clone(),
        ..RunOverrides::default()
    };
    let file = crate::run::load_file(args.config.as_deref())?;
    let cwd = std::env::current_dir().ok();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let config = Config::resolve(&flags, &file, cwd.as_deref(), home.as_deref())?;
    if config.target == graft_config::Target::Kube(crate::cluster::TARGETLESS.into()) {
        return Err(
            Failure::usage("a targetless agent has no incoming traffic to intercept")
                .hint("name a workload (deploy/NAME, pod/NAME) or pid:PID"),
        );
    }
    Ok(config)
}

fn filter_text(args: &InterceptArgs) -> Option<String> {
    let parts: Vec<String> = args
        .filter_header
        .iter()
        .map(|h| format!("header {h}"))
        .chain(args.filter_path.iter().map(|p| format!("path {p}")))
        .chain(args.filter_method.iter().map(|m| format!("method {m}")))
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Docker's `--env-file` format: `NAME=value` lines, no quoting (values are
/// taken literally up to the end of the line), so multi-line values are left out.
fn env_file(env: &[(String, String)]) -> String {
    let mut text = String::new();
    for (name, value) in env {
        if value.contains('\n') || value.contains('\r') || name.contains('=') {
            eprintln!("graft: {name} is left out of the env file: its value spans lines");
            continue;
        }
        text.push_str(&format!("{name}={value}\n"));
    }
    text
}

/// Writes a file only its owner can read (it holds the target's secrets).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| Failure::usage(format!("cannot write {}: {e}", path.display())))
}

/// Writes the intercept's file (root only: elsewhere `graft leave` cannot reach it
/// and Ctrl-C is the way out). Returns its path.
fn register(entry: &InterceptEntry) -> Result<Option<PathBuf>, Failure> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    state::ensure_dir()?;
    let dir = state::intercepts_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::session(format!("cannot create {}: {e}", dir.display())))?;
    if state::intercepts().iter().any(|i| i.name == entry.name) {
        return Err(
            Failure::usage(format!("an intercept named {} runs already", entry.name))
                .hint("pick another with --name, or end it with `graft leave`"),
        );
    }
    let path = dir.join(format!("{}.json", entry.name));
    let text = serde_json::to_vec(entry).expect("the entry serialises");
    write_private(&path, &text)?;
    Ok(Some(path))
}

/// Runs `graft leave NAME`: signals the intercept and waits for it to end.
pub fn leave(args: LeaveArgs) -> Result<u8, Failure> {
    crate::connect::require_root("leave")?;
    let Some(entry) = state::intercepts()
        .into_iter()
        .find(|i| i.name == args.name)
    else {
        return Err(Failure::usage(format!("no intercept named {}", args.name))
            .hint("see `graft status` for the running intercepts"));
    };
    let pid = nix::unistd::Pid::from_raw(entry.pid as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while graft_proc::exists(entry.pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("graft: left intercept {}", entry.name);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_names() {
        assert_eq!(parse_port("8080").unwrap(), (8080, 8080));
        assert_eq!(parse_port("8080:80").unwrap(), (8080, 80));
        for bad in ["", "0", "x", "8080:", "1:70000"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
        assert_eq!(default_name("deploy/api", 80), "api-80");
        assert_eq!(default_name("pid:1234", 80), "pid-1234-80");
        assert!(valid_name("api-80"));
        for bad in ["", "../x", ".hidden", "a/b", "a b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn env_file_is_docker_format_without_multiline_values() {
        let env = vec![
            ("A".to_owned(), "1".to_owned()),
            ("B".to_owned(), "x=y with spaces".to_owned()),
            ("PEM".to_owned(), "line1\nline2".to_owned()),
        ];
        assert_eq!(env_file(&env), "A=1\nB=x=y with spaces\n");
    }
}
