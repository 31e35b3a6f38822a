//! `graft mount`: the target's filesystem at a local directory (FUSE, see
//! `graft_mount`), for programs graft's layer does not reach. Stays in the
//! foreground until Ctrl-C, SIGTERM, SIGHUP or the loss of the link, then
//! unmounts and stops the agent.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use graft_config::{Config, RunOverrides, Target};
use graft_mount::{MountError, MountOptions};
use graft_proxy::SessionOptions;

use crate::{
    args::KubeFlags,
    cluster,
    failure::{EXIT_SESSION, Failure},
    locate::locate,
    open::{self, OpenRequest},
    process::Signals,
    run::load_file,
    session_dir::{SessionDir, random_hex},
};

/// `graft mount` flags.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// The target: `pid:PID` or a Kubernetes workload `KIND/NAME[/container/NAME]`.
    #[arg(long, env = "GRAFT_TARGET", value_name = "TARGET")]
    pub target: Option<String>,
    /// Kubernetes access.
    #[command(flatten)]
    pub kube: KubeFlags,
    /// How the agent is placed beside a Kubernetes target: an `ephemeral`
    /// container in the pod (default), or a pod on the target's `node`.
    #[arg(long, value_name = "MODE", value_parser = ["ephemeral", "node"])]
    pub agent_mode: Option<String>,
    /// The agent image (default: graft's, tagged with its version).
    #[arg(long, value_name = "IMAGE")]
    pub agent_image: Option<String>,
    /// The agent image's pull policy: Always, IfNotPresent or Never.
    #[arg(long, value_name = "POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub agent_pull_policy: Option<String>,
    /// `read` (default: changes fail with "Read-only file system") or `write`
    /// (create, write, truncate, mkdir, rm, mv in the target).
    #[arg(long, value_enum, value_name = "MODE", default_value = "read")]
    pub fs: MountFs,
    /// The target's directory to show at DIR.
    #[arg(long, value_name = "/REMOTE/PATH", default_value = "/")]
    pub root: String,
    /// Let other local users in (non-root needs `user_allow_other` in
    /// /etc/fuse.conf). Off: only you can enter DIR.
    #[arg(long)]
    pub allow_other: bool,
    /// Config file [default: ./graft.toml when it exists]; its target and
    /// `[kube]` settings apply.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// An empty local directory to mount at.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// `graft mount --fs` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MountFs {
    /// Read the target's files; changes fail with EROFS.
    Read,
    /// Read and change the target's files.
    Write,
}

/// Runs `graft mount`: 0 after Ctrl-C/SIGTERM, 1 when the link was lost.
pub async fn mount(args: MountArgs) -> Result<u8, Failure> {
    let flags = RunOverrides {
        target: args.target.clone(),
        namespace: args.kube.namespace.clone(),
        context: args.kube.context.clone(),
        kubeconfig: args.kube.kubeconfig.clone(),
        agent_mode: args.agent_mode.clone(),
        agent_image: args.agent_image.clone(),
        agent_pull_policy: args.agent_pull_policy.clone(),
        ..RunOverrides::default()
    };
    let file = load_file(args.config.as_deref())?;
    let cwd = std::env::current_dir().ok();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let config = Config::resolve(&flags, &file, cwd.as_deref(), home.as_deref())?;
    if config.target == Target::Kube(cluster::TARGETLESS.into()) {
        return Err(Failure::usage(
            "a targetless agent has no target filesystem to mount: give --target",
        ));
    }
    for swept in graft_mount::sweep_stale() {
        eprintln!(
            "graft: removed a dead graft mount at {} (left by a killed graft)",
            swept.display()
        );
    }
    let options = MountOptions {
        writable: args.fs == MountFs::Write,
        root: args.root.clone(),
        allow_other: args.allow_other,
    };
    // Refuse a bad DIR or a missing FUSE before starting an agent.
    graft_mount::preflight(&args.dir, &options).map_err(mount_failure)?;

    let exe = std::env::current_exe().ok();
    let pieces = locate(exe.as_deref(), &|name| std::env::var_os(name))?;
    let uid = nix::unistd::getuid().as_raw();
    let dir = SessionDir::create(uid, std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from))?;
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
    let result = serve(&session, &args, options).await;
    let link_lost = matches!(result, Ok(true) | Err(_));
    match Arc::try_unwrap(session) {
        Ok(session) => session.close().await,
        Err(session) => drop(session),
    }
    opened.agents.stop(link_lost).await;
    drop(dir);
    result.map(|lost| if lost { EXIT_SESSION } else { 0 })
}

/// Mounts, waits for a signal or the link's end, unmounts. `Ok(true)` when the
/// link was lost.
async fn serve(
    session: &Arc<graft_proxy::Session>,
    args: &MountArgs,
    options: MountOptions,
) -> Result<bool, Failure> {
    let mut signals = Signals::new()?;
    let runtime = tokio::runtime::Handle::current();
    let (shared, dir) = (session.clone(), args.dir.clone());
    let mode = if options.writable {
        "read-write"
    } else {
        "read-only"
    };
    let root = options.root.clone();
    let handle =
        tokio::task::spawn_blocking(move || graft_mount::mount(shared, runtime, &dir, options))
            .await
            .map_err(|e| Failure::session(format!("mounting failed: {e}")))?
            .map_err(mount_failure)?;
    eprintln!(
        "graft: {} of {} mounted at {} ({mode}); Ctrl-C unmounts",
        root,
        args.target.as_deref().unwrap_or("the target"),
        handle.mount_point().display()
    );
    let closed = session.closed();
    let lost = tokio::select! {
        received = signals.recv() => {
            tracing::info!(signal = ?received, "unmounting");
            false
        }
        reason = closed => {
            eprintln!("graft: lost the link to the agent ({reason}); unmounting");
            true
        }
    };
    let dir = handle.mount_point().to_owned();
    let unmounted = tokio::task::spawn_blocking(move || handle.unmount())
        .await
        .map_err(|e| Failure::session(format!("unmounting failed: {e}")))?;
    match unmounted {
        Ok(()) => eprintln!("graft: unmounted {}", dir.display()),
        Err(e) => {
            return Err(
                Failure::session(format!("unmounting {} failed: {e}", dir.display()))
                    .hint(format!("run `fusermount3 -u {}`", dir.display())),
            );
        }
    }
    Ok(lost)
}

fn mount_failure(error: MountError) -> Failure {
    match error {
        MountError::MountPoint { .. } | MountError::BadRoot(_) => Failure::usage(error.to_string()),
        _ => Failure::session(error.to_string()),
    }
}
