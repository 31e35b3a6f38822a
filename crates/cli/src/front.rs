//! What the front ends without the layer (`port-forward`, `expose`) share: their
//! target and Kubernetes flags, turned into a resolved [`Config`], and the session
//! opened with [`crate::open`] beside that target.
//!
//! ```text
//! TargetFlags ──► Config (graft.toml + flags) ──► open::open ──► Front { opened, dir }
//! ```

use std::path::PathBuf;

use clap::Args;
use graft_config::{Config, ConfigFile, RunOverrides};
use graft_proxy::SessionOptions;

use crate::{
    args::KubeFlags,
    cluster::TARGETLESS,
    failure::Failure,
    locate::locate_agent,
    open::{self, OpenRequest, Opened},
    session_dir::{SessionDir, random_hex},
};

/// The target and how to reach it, as `graft run` takes them.
#[derive(Debug, Clone, Args)]
pub struct TargetFlags {
    /// The target: `pid:PID`, a Kubernetes workload `KIND/NAME`, or `targetless`
    /// (the default: an agent pod of its own in the namespace).
    #[arg(long, env = "GRAFT_TARGET", value_name = "TARGET")]
    pub target: Option<String>,
    /// Kubernetes access.
    #[command(flatten)]
    pub kube: KubeFlags,
    /// How the agent is placed beside a Kubernetes workload: an `ephemeral`
    /// container in the pod (default), or a pod on the target's `node`.
    #[arg(long, value_name = "MODE", value_parser = ["ephemeral", "node"])]
    pub agent_mode: Option<String>,
    /// The agent image (default: graft's, tagged with its version).
    #[arg(long, value_name = "IMAGE")]
    pub agent_image: Option<String>,
    /// The agent image's pull policy: Always, IfNotPresent or Never.
    #[arg(long, value_name = "POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub agent_pull_policy: Option<String>,
    /// Config file [default: ./graft.toml when it exists]; its target and
    /// `[kube]` settings are used.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl TargetFlags {
    /// The resolved configuration: the flags over `graft.toml`, the target
    /// defaulting to `targetless` when neither names one.
    ///
    /// # Errors
    ///
    /// A usage [`Failure`] for a bad config file or flag.
    pub fn resolve(&self) -> Result<Config, Failure> {
        let file = crate::run::load_file(self.config.as_deref())?;
        let target = self
            .target
            .clone()
            .or_else(|| file.target.clone())
            .unwrap_or_else(|| TARGETLESS.to_owned());
        let flags = RunOverrides {
            target: Some(target),
            namespace: self.kube.namespace.clone(),
            context: self.kube.context.clone(),
            kubeconfig: self.kube.kubeconfig.clone(),
            agent_mode: self.agent_mode.clone(),
            agent_image: self.agent_image.clone(),
            agent_pull_policy: self.agent_pull_policy.clone(),
            ..RunOverrides::default()
        };
        let cwd = std::env::current_dir().ok();
        let home = std::env::var_os("HOME").map(PathBuf::from);
        Ok(Config::resolve(
            &flags,
            &ConfigFile {
                target: None,
                ..file
            },
            cwd.as_deref(),
            home.as_deref(),
        )?)
    }
}

/// An open session of a front end and its private directory (removed on drop,
/// after the agents stopped).
pub struct Front {
    /// The session and its agents.
    pub opened: Opened,
    /// The session directory (the local agent's socket and log).
    pub dir: SessionDir,
}

/// Opens a session beside `config.target` with `options`.
///
/// # Errors
///
/// As [`open::open`], and when the agent binary is missing for a `pid:` target.
pub async fn open_session(config: &Config, options: SessionOptions) -> Result<Front, Failure> {
    let exe = std::env::current_exe().ok();
    let agent_binary = match &config.target {
        graft_config::Target::Pid(_) => locate_agent(exe.as_deref(), &|n| std::env::var_os(n))?,
        // The cluster's agent runs from its image.
        graft_config::Target::Kube(_) => PathBuf::new(),
    };
    let uid = nix::unistd::getuid().as_raw();
    let dir = SessionDir::create(uid, std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from))?;
    let secret = random_hex(32)?;
    let graft_log = std::env::var("GRAFT_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let opened = open::open(OpenRequest {
        config,
        dir: dir.path(),
        agent_binary: &agent_binary,
        secret: &secret,
        graft_log: graft_log.as_deref(),
        options,
    })
    .await?;
    Ok(Front { opened, dir })
}
