//! The `graft.toml` file as written: every section and key optional
//! ([`ConfigFile`]), loaded from TOML, JSON or YAML ([`ConfigFile::load`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{ConfigError, FilterFile, FsMode, IncomingMode, schema, tls};
/// The `graft.toml` file. Every key is optional; flags win over the file.
///
/// ```toml
/// target = "pid:1234"
/// [incoming]
/// mode = "steal"
/// port_map = ["8080:80"]
/// [incoming.filter]
/// header = "^x-user: alice$"
/// [outgoing]
/// local = ["10.0.0.0/8", "192.168.1.5:5432", "db.internal:5432"]
/// remote = ["*.svc.cluster.local", "udp://10.96.0.0/12"]
/// [dns]
/// local = ["*.corp.example.com"]
/// remote = ["*.svc.cluster.local"]
/// [env]
/// include = ["DATABASE_*"]
/// exclude = ["AWS_*"]
/// remote = true
/// [fs]
/// mode = "read"
/// local = ["^/etc/ssl/"]
/// remote = ["^/home/app/"]
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The target when `--target` is not given: `pid:PID` (a local process),
    /// `KIND/NAME[/container/NAME]` (a Kubernetes workload: pod, deploy, sts,
    /// ds, rs, job, cronjob, rollout) or `targetless`.
    pub target: Option<String>,
    /// `[incoming]`: what happens to the target's incoming traffic.
    #[serde(default)]
    pub incoming: IncomingFile,
    /// `[outgoing]`: which outgoing connections stay on this machine.
    #[serde(default)]
    pub outgoing: OutgoingFile,
    /// `[dns]`: which names the target resolves.
    #[serde(default)]
    pub dns: DnsFile,
    /// `[env]`: which of the target's environment variables the program gets.
    #[serde(default)]
    pub env: EnvFile,
    /// `[fs]`: which files are read (or written) in the target.
    #[serde(default)]
    pub fs: FsFile,
    /// Kubernetes access (`[kube]`).
    #[serde(default)]
    pub kube: KubeFile,
    /// The agent in a cluster (`[agent]`).
    #[serde(default)]
    pub agent: AgentFile,
    /// How CMD is run (`[run]`).
    #[serde(default)]
    pub run: RunFile,
    /// `graft connect` (`[connect]`).
    #[serde(default)]
    pub connect: ConnectFile,
}

/// `[run]` of `graft.toml`: how CMD is run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// `true`: always in an isolated network and mount namespace served by
    /// graft's own TCP/IP stack (`--isolate`); `false`: always with the
    /// LD_PRELOAD layer (`--no-isolate`); unset: isolated only when CMD is a
    /// static or Go binary, which the layer cannot reach.
    pub isolate: Option<bool>,
}

/// `[connect]` of `graft.toml`: the machine scope.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectFile {
    /// CIDRs routed through graft besides the discovered ranges (as
    /// `--also-proxy`, which adds to them).
    #[serde(default)]
    pub also_proxy: Vec<String>,
}

/// `[kube]` of `graft.toml`: how to reach the cluster, as kubectl's flags.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KubeFile {
    /// The namespace of the target (`-n`; default: the context's).
    pub namespace: Option<String>,
    /// The kubeconfig context (`--context`; default: the current one).
    pub context: Option<String>,
    /// The kubeconfig file (`--kubeconfig`; default: `KUBECONFIG`, else
    /// `~/.kube/config`, else the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// Seconds to wait for a workload whose pods run but none is Ready yet
    /// (default 60).
    pub ready_timeout: Option<u64>,
    /// Run the session against a copy of the target pod that graft creates
    /// and deletes at the end (`--copy-target`); a Job's or CronJob's copy
    /// sleeps instead of running the job.
    pub copy_target: Option<bool>,
    /// With `copy_target`: scale the original Deployment, StatefulSet or
    /// ReplicaSet to 0 for the session, and back at the end (`--scale-down`).
    pub scale_down: Option<bool>,
    /// With `copy_target`: the copy keeps the original's labels, so the
    /// Services that select the original select it too
    /// (`--copy-keep-labels`).
    pub copy_keep_labels: Option<bool>,
}

/// How the agent is placed beside a Kubernetes target.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum AgentMode {
    /// An ephemeral container in the target pod.
    #[default]
    Ephemeral,
    /// A pod on the target's node that enters the target container's namespaces.
    Node,
}

impl std::str::FromStr for AgentMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "ephemeral" => Ok(AgentMode::Ephemeral),
            "node" => Ok(AgentMode::Node),
            _ => Err(ConfigError::Invalid {
                what: "agent mode",
                value: s.to_owned(),
                reason: "expected ephemeral or node".into(),
            }),
        }
    }
}

/// `[agent]` of `graft.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// How the agent is placed (`--agent-mode`): `"ephemeral"` (default) or
    /// `"node"`.
    pub mode: Option<AgentMode>,
    /// The agent image (`--agent-image`; default: graft's own, tagged with its
    /// version).
    pub image: Option<String>,
    /// The agent image's pull policy (`--agent-pull-policy`): `Always`,
    /// `IfNotPresent` or `Never` (default: the cluster's).
    #[schemars(extend("enum" = ["Always", "IfNotPresent", "Never"]))]
    pub pull_policy: Option<String>,
    /// Seconds to wait for the agent to start (default 120).
    pub start_timeout: Option<u64>,
}

/// Kubernetes settings of a session, flags over `graft.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KubeSettings {
    /// `-n`, else the context's namespace.
    pub namespace: Option<String>,
    /// `--context`.
    pub context: Option<String>,
    /// `--kubeconfig`, else `KUBECONFIG` / `~/.kube/config` / in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Ephemeral container or node pod.
    pub agent_mode: AgentMode,
    /// `None`: graft's default image.
    pub agent_image: Option<String>,
    /// `None`: the cluster's default pull policy.
    pub pull_policy: Option<String>,
    /// How long the agent may take to start, in seconds.
    pub start_timeout_secs: u64,
    /// How long to wait for a workload's pod to become Ready, in seconds.
    pub ready_timeout_secs: u64,
    /// `--all-pods`: an agent on every ready pod of the workload, stealing (or
    /// mirroring) on all of them.
    pub all_pods: bool,
    /// `--copy-target`: the session runs against a copy of the target pod.
    #[serde(default)]
    pub copy_target: bool,
    /// `--scale-down`: the original workload is at 0 for the session.
    #[serde(default)]
    pub scale_down: bool,
    /// `--copy-keep-labels`: the copy keeps the original's labels.
    #[serde(default)]
    pub copy_keep_labels: bool,
}

/// `[incoming]` of `graft.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingFile {
    /// `"mirror"` (the default), `"steal"` or `"off"` (`--mirror`, `--steal`).
    pub mode: Option<IncomingMode>,
    /// `LOCAL:REMOTE` entries (`--port-map`): the program listens on LOCAL, the
    /// target's REMOTE port is stolen or mirrored.
    #[serde(default)]
    pub port_map: Vec<String>,
    /// `[incoming.filter]`: which HTTP requests to take; without it, whole
    /// connections.
    pub filter: Option<FilterFile>,
    /// `[incoming.tls]`: the certificate with which the agent decrypts a
    /// filtered port that serves HTTPS.
    pub tls: Option<tls::TlsFile>,
}

/// `[outgoing]` of `graft.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutgoingFile {
    /// `[tcp://|udp://]HOST[:PORT]` destinations that stay local besides
    /// loopback (`--outgoing-local`); HOST is a CIDR, an address, a name, `*.`
    /// and a domain, or empty (any), e.g. `10.0.0.0/8`, `192.168.1.5:5432`,
    /// `db.internal:5432`, `udp://:53`. They win over `remote`.
    #[serde(default)]
    pub local: Vec<String>,
    /// When given, only these destinations go through the target, the rest
    /// stay local (`--outgoing-remote`); same forms as `local`, e.g.
    /// `*.svc.cluster.local`, `10.96.0.0/12`, `tcp://db.shop:5432`.
    #[serde(default)]
    pub remote: Vec<String>,
}

/// `[dns]` of `graft.toml`: which names the target's resolver answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsFile {
    /// Names resolved by this machine's resolver (`--dns-local`): a name, or
    /// `*.` and a domain for every name under it, e.g. `*.corp.example.com`.
    /// They win over `remote`.
    #[serde(default)]
    pub local: Vec<String>,
    /// When given, only these names are resolved by the target, the rest here
    /// (`--dns-remote`), e.g. `*.svc.cluster.local`.
    #[serde(default)]
    pub remote: Vec<String>,
}

/// `[env]` of `graft.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvFile {
    /// Globs of the target's variables to take, e.g. `DATABASE_*` (all when
    /// empty; `--env-include`).
    #[serde(default)]
    pub include: Vec<String>,
    /// Globs of the target's variables to leave out (`--env-exclude`).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Whether to take the target's environment at all (default true;
    /// `--no-remote-env` is false).
    pub remote: Option<bool>,
}

/// `[fs]` of `graft.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FsFile {
    /// `"read"` (default: remote paths are read in the target), `"write"` (also
    /// written there) or `"local"` (`--fs`).
    pub mode: Option<FsMode>,
    /// Regexes of paths that stay local; they win over everything
    /// (`--fs-local`).
    #[serde(default)]
    pub local: Vec<String>,
    /// Regexes of paths that are remote (`--fs-remote`).
    #[serde(default)]
    pub remote: Vec<String>,
}

impl ConfigFile {
    /// Loads `path`: TOML, or JSON / YAML by its extension
    /// ([`schema::Format::of`]).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        schema::parse(&text, schema::Format::of(path)).map_err(|problem| ConfigError::Parse {
            path: path.to_owned(),
            problem,
        })
    }
}
