//! Resolving flags over `graft.toml` ([`RunOverrides`] over [`ConfigFile`])
//! into the one [`Config`] of a `graft run`.

use std::path::{Path, PathBuf};

use graft_protocol::incoming::HttpFilterSpec;

use crate::*;
/// The `graft run` flags, raw; `None`/empty means "not given".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunOverrides {
    /// `--target`.
    pub target: Option<String>,
    /// `--steal`.
    pub steal: bool,
    /// `--mirror`.
    pub mirror: bool,
    /// `--filter-header` regexes.
    pub filter_header: Vec<String>,
    /// `--filter-path` regexes.
    pub filter_path: Vec<String>,
    /// `--filter-method` methods.
    pub filter_method: Vec<String>,
    /// `--filter-body` regexes.
    pub filter_body: Vec<String>,
    /// `--filter-json` `POINTER=VALUE` rules.
    pub filter_json: Vec<String>,
    /// `--filter-body-limit`, in KiB.
    pub filter_body_limit_kib: Option<u32>,
    /// `--port-map`.
    pub port_map: Vec<String>,
    /// `--outgoing-local`.
    pub outgoing_local: Vec<String>,
    /// `--outgoing-remote`.
    pub outgoing_remote: Vec<String>,
    /// `--dns-local`.
    pub dns_local: Vec<String>,
    /// `--dns-remote`.
    pub dns_remote: Vec<String>,
    /// `--env-include`.
    pub env_include: Vec<String>,
    /// `--env-exclude`.
    pub env_exclude: Vec<String>,
    /// `--no-remote-env`.
    pub no_remote_env: bool,
    /// `--fs`.
    pub fs: Option<FsMode>,
    /// `--fs-local`.
    pub fs_local: Vec<String>,
    /// `--fs-remote`.
    pub fs_remote: Vec<String>,
    /// `-n/--namespace`.
    pub namespace: Option<String>,
    /// `--context`.
    pub context: Option<String>,
    /// `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `--agent-mode`.
    pub agent_mode: Option<String>,
    /// `--agent-image`.
    pub agent_image: Option<String>,
    /// `--agent-pull-policy`.
    pub agent_pull_policy: Option<String>,
    /// `--all-pods`.
    pub all_pods: bool,
    /// `--copy-target`.
    pub copy_target: bool,
    /// `--scale-down`.
    pub scale_down: bool,
    /// `--copy-keep-labels`.
    pub copy_keep_labels: bool,
    /// `--isolate` (`Some(true)`) or `--no-isolate` (`Some(false)`).
    pub isolate: Option<bool>,
    /// `--tls-cert`, `--tls-key`, `--tls-insecure-upstream`, `--tls-local`.
    pub tls: tls::TlsFlags,
}

/// The resolved configuration of one `graft run`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// What the session acts as.
    pub target: Target,
    /// Environment rules.
    pub env: EnvRules,
    /// What the layer gets, including the incoming mode and filter.
    pub layer: LayerConfig,
    /// Whether the incoming mode is [`IncomingMode::default`] because neither a
    /// flag nor `graft.toml` chose one, so the CLI can say so.
    pub incoming_defaulted: bool,
    /// Kubernetes settings (used with [`Target::Kube`]).
    pub kube: KubeSettings,
    /// Whether CMD runs in an isolated namespace (`--isolate`, `[run] isolate`);
    /// `None`: chosen by what CMD is (static and Go binaries are isolated).
    pub isolate: Option<bool>,
    /// TLS steal: the certificate that decrypts filtered HTTPS ports.
    pub tls: Option<tls::TlsSettings>,
}

impl Config {
    /// Resolves flags over the file. `cwd` and `home` become local directories.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for a missing target, a malformed value (naming
    /// the value and the expected form), both `--steal` and `--mirror`, or a
    /// filter with incoming traffic off; [`ConfigError::Filter`] for a filter rule
    /// that does not compile.
    pub fn resolve(
        flags: &RunOverrides,
        file: &ConfigFile,
        cwd: Option<&Path>,
        home: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let target_text = flags
            .target
            .clone()
            .or_else(|| file.target.clone())
            .ok_or_else(|| ConfigError::Invalid {
                what: "target",
                value: String::new(),
                reason: "no target given: pass --target (pid:PID, KIND/NAME or targetless) or \
                         set `target` in graft.toml"
                    .into(),
            })?;
        let target: Target = target_text.parse()?;

        let (incoming, incoming_defaulted) = match (flags.steal, flags.mirror) {
            (true, true) => {
                return Err(ConfigError::Invalid {
                    what: "incoming mode",
                    value: "--steal --mirror".into(),
                    reason: "choose one: --steal takes the traffic, --mirror copies it".into(),
                });
            }
            (true, false) => (IncomingMode::Steal, false),
            (false, true) => (IncomingMode::Mirror, false),
            (false, false) => match file.incoming.mode {
                Some(mode) => (mode, false),
                None => (IncomingMode::default(), true),
            },
        };
        let filter = resolve_filter(flags, &file.incoming)?;
        if let (Some(spec), IncomingMode::Off) = (&filter, incoming) {
            return Err(ConfigError::Invalid {
                what: "incoming filter",
                value: spec.to_string(),
                reason: "incoming traffic is off (mode = \"off\" in graft.toml); pass --steal \
                         or --mirror, or drop the filter"
                    .into(),
            });
        }
        let port_map = pick(&flags.port_map, &file.incoming.port_map)
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<PortMapping>, _>>()?;
        let outgoing_local = pick(&flags.outgoing_local, &file.outgoing.local)
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<OutgoingLocal>, _>>()?;
        let outgoing_remote = pick(&flags.outgoing_remote, &file.outgoing.remote)
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<Destination>, _>>()?;
        let names = |flag: &[String], file: &[String]| {
            pick(flag, file)
                .iter()
                .map(|s| outgoing::parse_name(s))
                .collect::<Result<Vec<NamePattern>, _>>()
        };
        let dns_local = names(&flags.dns_local, &file.dns.local)?;
        let dns_remote = names(&flags.dns_remote, &file.dns.remote)?;

        let env = EnvRules::new(
            pick(&flags.env_include, &file.env.include).to_vec(),
            pick(&flags.env_exclude, &file.env.exclude).to_vec(),
            !flags.no_remote_env && file.env.remote.unwrap_or(true),
        )?;

        let fs_local = pick(&flags.fs_local, &file.fs.local).to_vec();
        let fs_remote = pick(&flags.fs_remote, &file.fs.remote).to_vec();
        let local_dirs = [cwd, home]
            .into_iter()
            .flatten()
            .filter(|p| p.is_absolute() && *p != Path::new("/"))
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let layer = LayerConfig {
            incoming,
            filter,
            port_map,
            outgoing_local,
            outgoing_remote,
            dns_local,
            dns_remote,
            fs: flags.fs.or(file.fs.mode).unwrap_or_default(),
            fs_local,
            fs_remote,
            local_dirs,
            ..LayerConfig::default()
        };
        // Compile once here so a bad regex is a clear error now, not a silent
        // local fallback inside the program.
        FsRules::new(&layer)?;
        let kube = resolve_kube(flags, file)?;
        Ok(Config {
            target,
            env,
            layer,
            incoming_defaulted,
            kube,
            isolate: flags.isolate.or(file.run.isolate),
            tls: tls::resolve(&flags.tls, file.incoming.tls.as_ref())?,
        })
    }
}

/// The agent's start timeout when neither flag nor file sets one, in seconds:
/// enough for an image pull on a slow node.
pub const DEFAULT_START_TIMEOUT_SECS: u64 = 120;

/// How long graft waits, by default, for a workload whose pods run but none
/// is Ready yet (`[kube] ready_timeout`).
pub const DEFAULT_READY_TIMEOUT_SECS: u64 = 60;

/// The pull policies Kubernetes knows (`Container.imagePullPolicy`,
/// <https://kubernetes.io/docs/concepts/containers/images/#image-pull-policy>).
pub(crate) const PULL_POLICIES: [&str; 3] = ["Always", "IfNotPresent", "Never"];

/// Kubernetes settings: flags over `[kube]` and `[agent]`.
fn resolve_kube(flags: &RunOverrides, file: &ConfigFile) -> Result<KubeSettings, ConfigError> {
    let agent_mode = match &flags.agent_mode {
        Some(text) => text.parse()?,
        None => file.agent.mode.unwrap_or_default(),
    };
    let pull_policy = flags
        .agent_pull_policy
        .clone()
        .or_else(|| file.agent.pull_policy.clone());
    if let Some(policy) = &pull_policy
        && !PULL_POLICIES.contains(&policy.as_str())
    {
        return Err(ConfigError::Invalid {
            what: "agent pull policy",
            value: policy.clone(),
            reason: "expected Always, IfNotPresent or Never".into(),
        });
    }
    let copy_target = flags.copy_target || file.kube.copy_target.unwrap_or(false);
    let scale_down = flags.scale_down || file.kube.scale_down.unwrap_or(false);
    let copy_keep_labels = flags.copy_keep_labels || file.kube.copy_keep_labels.unwrap_or(false);
    let needs_copy = |what: &'static str| ConfigError::Invalid {
        what,
        value: "true".into(),
        reason: "it works on the copy of --copy-target: add --copy-target (or \
                 `copy_target = true` under [kube])"
            .into(),
    };
    if scale_down && !copy_target {
        return Err(needs_copy("scale-down"));
    }
    if copy_keep_labels && !copy_target {
        return Err(needs_copy("copy-keep-labels"));
    }
    if copy_target && flags.all_pods {
        return Err(ConfigError::Invalid {
            what: "all-pods",
            value: "true".into(),
            reason: "--copy-target makes one copy of one pod: drop --all-pods".into(),
        });
    }
    Ok(KubeSettings {
        copy_target,
        scale_down,
        copy_keep_labels,
        namespace: flags
            .namespace
            .clone()
            .or_else(|| file.kube.namespace.clone()),
        context: flags.context.clone().or_else(|| file.kube.context.clone()),
        kubeconfig: flags
            .kubeconfig
            .clone()
            .or_else(|| file.kube.kubeconfig.clone()),
        agent_mode,
        agent_image: flags
            .agent_image
            .clone()
            .or_else(|| file.agent.image.clone()),
        pull_policy,
        start_timeout_secs: file
            .agent
            .start_timeout
            .unwrap_or(DEFAULT_START_TIMEOUT_SECS),
        ready_timeout_secs: file
            .kube
            .ready_timeout
            .unwrap_or(DEFAULT_READY_TIMEOUT_SECS),
        all_pods: flags.all_pods,
    })
}

/// The filter flags when any is given (all-of), else the file's filter.
fn resolve_filter(
    flags: &RunOverrides,
    file: &IncomingFile,
) -> Result<Option<HttpFilterSpec>, ConfigError> {
    let limit_flag = flags.filter_body_limit_kib.map(incoming::kib_to_bytes);
    let file_limit = file
        .filter
        .as_ref()
        .and_then(|f| f.body_limit_kib)
        .map(incoming::kib_to_bytes);
    let from_flags = graft_filter::from_flags(&graft_filter::FilterFlags {
        header: &flags.filter_header,
        path: &flags.filter_path,
        method: &flags.filter_method,
        body: &flags.filter_body,
        json: &flags.filter_json,
        body_limit: limit_flag
            .or(file_limit)
            .unwrap_or(graft_filter::DEFAULT_BODY_LIMIT),
    })
    .map_err(|source| ConfigError::Filter {
        source,
        in_file: false,
    })?;
    match from_flags {
        Some(spec) => Ok(Some(spec)),
        None => file
            .filter
            .as_ref()
            .map(|f| f.to_spec_limited(limit_flag))
            .transpose(),
    }
}

/// Flags replace the file's list when given.
fn pick<'a>(flag: &'a [String], file: &'a [String]) -> &'a [String] {
    if flag.is_empty() { file } else { flag }
}
