//! graft's configuration: `graft.toml`, command-line flags and the environment,
//! resolved once into a [`Config`] that nothing downstream re-reads.
//!
//! The CLI parses flags into [`RunOverrides`], loads the file with
//! [`ConfigFile::load`], and calls [`Config::resolve`]. The part the layer needs
//! travels to it as JSON of [`LayerConfig`] in the `GRAFT_LAYER_CONFIG` environment
//! variable. Pure logic that both sides share lives here too: the file rules
//! ([`fs::FsRules`]), the outgoing filter ([`outgoing::OutgoingLocal`]) and the
//! environment merge ([`env::merge_env`]). The incoming HTTP filter is checked
//! here ([`incoming::FilterFile`], flags through [`graft_filter::from_flags`]) and
//! travels on as an [`HttpFilterSpec`].

pub mod env;
mod file;
pub mod fs;
pub mod incoming;
pub mod outgoing;
mod resolve;
pub mod schema;
pub mod tls;

use std::path::PathBuf;

use graft_filter::FilterError;
use graft_protocol::incoming::HttpFilterSpec;
use serde::{Deserialize, Serialize};

pub use env::EnvRules;
pub use file::*;
pub use fs::{FsMode, FsRules};
pub use incoming::{FilterFile, FilterRuleFile};
pub use outgoing::{Destination, NamePattern, OutgoingLocal, ResolvedNames};
pub use resolve::*;

/// Why a configuration could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The config file is not valid TOML (JSON, YAML) of the expected shape.
    #[error("invalid config file {}: {problem}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong and where, from the parser.
        problem: schema::FileProblem,
    },
    /// A value (flag or file) is malformed.
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused, and the expected form.
        reason: String,
    },
    /// An incoming HTTP filter (flags or `[incoming.filter]`) whose rule does not
    /// compile; the message names the flag or the file key.
    #[error(
        "invalid incoming filter{}: {}",
        if *in_file { " in graft.toml" } else { "" },
        incoming::filter_message(source, *in_file)
    )]
    Filter {
        /// What is wrong with the rule.
        source: FilterError,
        /// Whether the filter came from `graft.toml` (else from the flags).
        in_file: bool,
    },
}

/// A target: what the session acts as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// A local Linux process (`pid:PID`).
    Pid(u32),
    /// A Kubernetes target as written (`deploy/api`, `pod/web-1/container/app`,
    /// `targetless`, …); its grammar is checked by `graft-kube`.
    Kube(String),
}

impl std::str::FromStr for Target {
    type Err = ConfigError;

    /// Parses `pid:PID`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: &str| ConfigError::Invalid {
            what: "target",
            value: s.to_owned(),
            reason: reason.to_owned(),
        };
        match s.split_once(':') {
            Some(("pid", pid)) => pid
                .parse::<u32>()
                .ok()
                .filter(|p| *p > 0)
                .map(Target::Pid)
                .ok_or_else(|| invalid("expected pid:PID with PID a positive number")),
            _ if s == "targetless" || s.contains('/') => Ok(Target::Kube(s.to_owned())),
            _ => Err(invalid(
                "expected pid:PID (a local process), KIND/NAME (a Kubernetes workload, e.g. \
                 deploy/api or pod/web-1) or targetless",
            )),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Pid(pid) => write!(f, "pid:{pid}"),
            Target::Kube(text) => f.write_str(text),
        }
    }
}

/// What happens to the target's incoming traffic; in `graft.toml` `"off"`,
/// `"steal"` or `"mirror"`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum IncomingMode {
    /// Incoming traffic is left alone; the program's listeners are only local.
    Off,
    /// Connections to the target's ports the program listens on go to the program
    /// (with a filter: the matching requests) instead of the target.
    Steal,
    /// The target keeps serving; the program gets a copy of the incoming traffic
    /// to the ports it listens on (with a filter: of the matching requests), and
    /// its answers are dropped. The default: it cannot disturb the target.
    #[default]
    Mirror,
}

impl IncomingMode {
    /// The mode of a port subscription in the protocol; `None` for
    /// [`IncomingMode::Off`], which subscribes nothing.
    pub fn subscription_mode(self) -> Option<graft_protocol::incoming::IncomingMode> {
        match self {
            IncomingMode::Off => None,
            IncomingMode::Steal => Some(graft_protocol::incoming::IncomingMode::Steal),
            IncomingMode::Mirror => Some(graft_protocol::incoming::IncomingMode::Mirror),
        }
    }
}

/// A `--port-map LOCAL:REMOTE` entry: the program listens on `local`, the target's
/// `remote` port is stolen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// The port the program binds.
    pub local: u16,
    /// The target's port.
    pub remote: u16,
}

impl std::str::FromStr for PortMapping {
    type Err = ConfigError;

    /// Parses `LOCAL:REMOTE`, both 1..=65535.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let parse = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p != 0);
        match s.split_once(':').map(|(l, r)| (parse(l), parse(r))) {
            Some((Some(local), Some(remote))) => Ok(PortMapping { local, remote }),
            _ => Err(ConfigError::Invalid {
                what: "port mapping",
                value: s.to_owned(),
                reason: "expected LOCAL:REMOTE, two ports from 1 to 65535".into(),
            }),
        }
    }
}

/// What the layer inside the user's process needs; sent as JSON in
/// `GRAFT_LAYER_CONFIG`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerConfig {
    /// Incoming mode.
    pub incoming: IncomingMode,
    /// Only the HTTP requests this filter matches are stolen or mirrored; `None`
    /// takes whole connections. Never set with [`IncomingMode::Off`].
    pub filter: Option<HttpFilterSpec>,
    /// Port mappings for stealing.
    pub port_map: Vec<PortMapping>,
    /// Destinations that stay local besides loopback.
    pub outgoing_local: Vec<OutgoingLocal>,
    /// When not empty, only these destinations go through the target.
    #[serde(default)]
    pub outgoing_remote: Vec<Destination>,
    /// Names resolved locally (win over `dns_remote`).
    #[serde(default)]
    pub dns_local: Vec<NamePattern>,
    /// When not empty, only these names are resolved by the target.
    #[serde(default)]
    pub dns_remote: Vec<NamePattern>,
    /// Whether outgoing connections go through the target at all.
    pub outgoing: bool,
    /// Whether name resolution goes through the target.
    pub dns: bool,
    /// File mode.
    pub fs: FsMode,
    /// Extra regexes of paths that stay local (win over everything).
    pub fs_local: Vec<String>,
    /// Extra regexes of paths that are remote (win over the defaults).
    pub fs_remote: Vec<String>,
    /// Absolute directories that stay local besides the defaults: the working
    /// directory and `$HOME` of the session.
    pub local_dirs: Vec<String>,
    /// Where the layer writes its log (never the program's stderr); `None`: no log.
    pub log_file: Option<PathBuf>,
    /// Log level for the layer's log (`error`, `warn`, `info`, `debug`, `trace`).
    pub log_level: String,
}

impl Default for LayerConfig {
    /// No incoming traffic (unlike [`IncomingMode::default`], which is what
    /// [`Config::resolve`] picks when nothing is said), so a layer under test
    /// subscribes nothing unless asked.
    fn default() -> Self {
        LayerConfig {
            incoming: IncomingMode::Off,
            filter: None,
            port_map: Vec::new(),
            outgoing_local: Vec::new(),
            outgoing_remote: Vec::new(),
            dns_local: Vec::new(),
            dns_remote: Vec::new(),
            outgoing: true,
            dns: true,
            fs: FsMode::Read,
            fs_local: Vec::new(),
            fs_remote: Vec::new(),
            local_dirs: Vec::new(),
            log_file: None,
            log_level: "info".into(),
        }
    }
}

impl LayerConfig {
    /// The target port that a program's listener on `local_port` steals: the mapped
    /// remote port, or the same port without a mapping.
    pub fn remote_port(&self, local_port: u16) -> u16 {
        self.port_map
            .iter()
            .find(|m| m.local == local_port)
            .map_or(local_port, |m| m.remote)
    }

    /// Whether a `transport` flow to `dest` goes through the target
    /// ([`outgoing::goes_remote`], never when outgoing traffic is off).
    pub fn goes_remote(
        &self,
        dest: &std::net::SocketAddr,
        transport: graft_protocol::Transport,
        names: &ResolvedNames,
    ) -> bool {
        self.outgoing
            && outgoing::goes_remote(
                &self.outgoing_local,
                &self.outgoing_remote,
                dest,
                transport,
                names,
            )
    }

    /// Whether `name` is resolved by the target ([`outgoing::resolves_remotely`],
    /// never when DNS is off).
    pub fn resolves_remotely(&self, name: &str) -> bool {
        self.dns && outgoing::resolves_remotely(&self.dns_local, &self.dns_remote, name)
    }

    /// Whether some outgoing rule names a host, so the names behind addresses
    /// must be recorded.
    pub fn needs_names(&self) -> bool {
        self.outgoing_local
            .iter()
            .chain(&self.outgoing_remote)
            .any(|d| matches!(d.host, outgoing::Host::Name(_)))
    }
}

#[cfg(test)]
mod tests {
    use graft_protocol::incoming::{Combine, FilterRule};
    use std::path::Path;

    use super::*;

    #[test]
    fn copy_target_keys_resolve_and_scale_down_needs_a_copy() {
        let file: ConfigFile = toml::from_str(
            "target = \"deploy/api\"\n[kube]\ncopy_target = true\nscale_down = true\n",
        )
        .unwrap();
        let cfg = Config::resolve(&RunOverrides::default(), &file, None, None).unwrap();
        assert!(cfg.kube.copy_target && cfg.kube.scale_down);
        assert!(!cfg.kube.copy_keep_labels);
        let flags = RunOverrides {
            target: Some("job/nightly".into()),
            copy_target: true,
            copy_keep_labels: true,
            ..RunOverrides::default()
        };
        let cfg = Config::resolve(&flags, &ConfigFile::default(), None, None).unwrap();
        assert!(cfg.kube.copy_target && cfg.kube.copy_keep_labels && !cfg.kube.scale_down);
        for flags in [
            RunOverrides {
                target: Some("deploy/api".into()),
                scale_down: true,
                ..RunOverrides::default()
            },
            RunOverrides {
                target: Some("deploy/api".into()),
                copy_keep_labels: true,
                ..RunOverrides::default()
            },
        ] {
            let err = Config::resolve(&flags, &ConfigFile::default(), None, None).unwrap_err();
            assert!(err.to_string().contains("--copy-target"), "{err}");
        }
        let flags = RunOverrides {
            target: Some("deploy/api".into()),
            copy_target: true,
            all_pods: true,
            ..RunOverrides::default()
        };
        assert!(Config::resolve(&flags, &ConfigFile::default(), None, None).is_err());
    }

    #[test]
    fn kubernetes_targets_and_settings_resolve() {
        assert_eq!(
            "deploy/api".parse::<Target>().unwrap(),
            Target::Kube("deploy/api".into())
        );
        assert_eq!(
            "targetless".parse::<Target>().unwrap(),
            Target::Kube("targetless".into())
        );
        let err = "api".parse::<Target>().unwrap_err().to_string();
        assert!(err.contains("KIND/NAME"), "{err}");

        let file: ConfigFile = toml::from_str(
            r#"
            target = "deploy/api"
            [kube]
            namespace = "shop"
            context = "kind-dev"
            [agent]
            mode = "node"
            image = "registry.local/graft-agent:dev"
            pull_policy = "IfNotPresent"
            "#,
        )
        .unwrap();
        let cfg = Config::resolve(&RunOverrides::default(), &file, None, None).unwrap();
        assert_eq!(cfg.target, Target::Kube("deploy/api".into()));
        assert_eq!(cfg.kube.namespace.as_deref(), Some("shop"));
        assert_eq!(cfg.kube.context.as_deref(), Some("kind-dev"));
        assert_eq!(cfg.kube.agent_mode, AgentMode::Node);
        assert_eq!(cfg.kube.pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(cfg.kube.start_timeout_secs, DEFAULT_START_TIMEOUT_SECS);
        assert_eq!(cfg.kube.ready_timeout_secs, DEFAULT_READY_TIMEOUT_SECS);

        let flags = RunOverrides {
            namespace: Some("other".into()),
            agent_mode: Some("ephemeral".into()),
            agent_image: Some("mine:1".into()),
            ..RunOverrides::default()
        };
        let cfg = Config::resolve(&flags, &file, None, None).unwrap();
        assert_eq!(cfg.kube.namespace.as_deref(), Some("other"));
        assert_eq!(cfg.kube.agent_mode, AgentMode::Ephemeral);
        assert_eq!(cfg.kube.agent_image.as_deref(), Some("mine:1"));

        let bad = RunOverrides {
            agent_pull_policy: Some("sometimes".into()),
            ..RunOverrides::default()
        };
        let err = Config::resolve(&bad, &file, None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("IfNotPresent"), "{err}");
        let bad = RunOverrides {
            agent_mode: Some("sidecar".into()),
            ..RunOverrides::default()
        };
        assert!(Config::resolve(&bad, &file, None, None).is_err());
    }

    #[test]
    fn target_pid_parses() {
        assert_eq!("pid:42".parse::<Target>().unwrap(), Target::Pid(42));
        assert!("pid:0".parse::<Target>().is_err());
        assert!("pid:x".parse::<Target>().is_err());
        assert_eq!(
            "pod/x".parse::<Target>().unwrap(),
            Target::Kube("pod/x".into())
        );
    }

    #[test]
    fn port_map_parses_and_maps() {
        let m: PortMapping = "8080:80".parse().unwrap();
        assert_eq!(
            m,
            PortMapping {
                local: 8080,
                remote: 80
            }
        );
        assert!("8080".parse::<PortMapping>().is_err());
        assert!("0:80".parse::<PortMapping>().is_err());
        let cfg = LayerConfig {
            port_map: vec![m],
            ..LayerConfig::default()
        };
        assert_eq!(cfg.remote_port(8080), 80);
        assert_eq!(cfg.remote_port(9090), 9090);
    }

    #[test]
    fn flags_win_over_file() {
        let file: ConfigFile = toml::from_str(
            r#"
            target = "pid:1"
            [incoming]
            mode = "off"
            port_map = ["1:2"]
            [fs]
            mode = "write"
            "#,
        )
        .unwrap();
        let flags = RunOverrides {
            target: Some("pid:7".into()),
            steal: true,
            port_map: vec!["3:4".into()],
            ..RunOverrides::default()
        };
        let cfg = Config::resolve(&flags, &file, Some(Path::new("/work")), None).unwrap();
        assert_eq!(cfg.target, Target::Pid(7));
        assert_eq!(cfg.layer.incoming, IncomingMode::Steal);
        assert_eq!(
            cfg.layer.port_map,
            vec![PortMapping {
                local: 3,
                remote: 4
            }]
        );
        assert_eq!(cfg.layer.fs, FsMode::Write);
        assert_eq!(cfg.layer.local_dirs, vec!["/work".to_string()]);
    }

    #[test]
    fn missing_target_says_what_to_do() {
        let err = Config::resolve(&RunOverrides::default(), &ConfigFile::default(), None, None)
            .unwrap_err();
        assert!(err.to_string().contains("--target (pid:PID"), "{err}");
    }

    #[test]
    fn bad_regex_is_refused() {
        let flags = RunOverrides {
            target: Some("pid:7".into()),
            fs_local: vec!["(".into()],
            ..RunOverrides::default()
        };
        assert!(Config::resolve(&flags, &ConfigFile::default(), None, None).is_err());
    }

    #[test]
    fn unknown_file_key_is_refused() {
        assert!(toml::from_str::<ConfigFile>("bogus = 1").is_err());
    }

    #[test]
    fn layer_config_round_trips_as_json() {
        let cfg = LayerConfig::default();
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(serde_json::from_str::<LayerConfig>(&json).unwrap(), cfg);
        let filtered = LayerConfig {
            incoming: IncomingMode::Mirror,
            filter: Some(HttpFilterSpec {
                combine: Combine::AnyOf,
                rules: vec![
                    FilterRule::Header("^x-user: alice$".into()),
                    FilterRule::Method("GET".into()),
                ],
            }),
            ..LayerConfig::default()
        };
        let json = serde_json::to_string(&filtered).unwrap();
        assert_eq!(
            serde_json::from_str::<LayerConfig>(&json).unwrap(),
            filtered
        );
    }

    fn pid7() -> RunOverrides {
        RunOverrides {
            target: Some("pid:7".into()),
            ..RunOverrides::default()
        }
    }

    fn file(text: &str) -> ConfigFile {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn connect_also_proxy_is_read_from_the_file() {
        let f = file("[connect]\nalso_proxy = [\"10.96.0.0/12\", \"10.1.2.3/32\"]\n");
        assert_eq!(f.connect.also_proxy, ["10.96.0.0/12", "10.1.2.3/32"]);
        assert!(toml::from_str::<ConfigFile>("[connect]\nbogus = 1\n").is_err());
    }

    fn resolve(flags: &RunOverrides, file: &ConfigFile) -> Result<Config, ConfigError> {
        Config::resolve(flags, file, None, None)
    }

    #[test]
    fn incoming_defaults_to_mirror_and_says_so() {
        let cfg = resolve(&pid7(), &ConfigFile::default()).unwrap();
        assert_eq!(cfg.layer.incoming, IncomingMode::Mirror);
        assert!(cfg.incoming_defaulted);
        assert_eq!(cfg.layer.filter, None);
    }

    #[test]
    fn file_mode_is_not_a_default() {
        for (text, mode) in [
            ("off", IncomingMode::Off),
            ("steal", IncomingMode::Steal),
            ("mirror", IncomingMode::Mirror),
        ] {
            let f = file(&format!("[incoming]\nmode = \"{text}\""));
            let cfg = resolve(&pid7(), &f).unwrap();
            assert_eq!(cfg.layer.incoming, mode);
            assert!(!cfg.incoming_defaulted);
        }
        assert!(toml::from_str::<ConfigFile>("[incoming]\nmode = \"Mirror\"").is_err());
    }

    #[test]
    fn mirror_flag_wins_over_file() {
        let flags = RunOverrides {
            mirror: true,
            ..pid7()
        };
        let cfg = resolve(&flags, &file("[incoming]\nmode = \"steal\"")).unwrap();
        assert_eq!(cfg.layer.incoming, IncomingMode::Mirror);
        assert!(!cfg.incoming_defaulted);
    }

    #[test]
    fn steal_and_mirror_together_are_refused() {
        let flags = RunOverrides {
            steal: true,
            mirror: true,
            ..pid7()
        };
        let err = resolve(&flags, &ConfigFile::default()).unwrap_err();
        assert!(err.to_string().contains("choose one"), "{err}");
    }

    #[test]
    fn file_filter_is_used() {
        let f = file(
            r#"
            [incoming]
            mode = "steal"
            [incoming.filter]
            any_of = [{ path = "^/a" }, { method = "POST" }]
            "#,
        );
        let cfg = resolve(&pid7(), &f).unwrap();
        assert_eq!(
            cfg.layer.filter,
            Some(HttpFilterSpec {
                combine: Combine::AnyOf,
                rules: vec![
                    FilterRule::Path("^/a".into()),
                    FilterRule::Method("POST".into())
                ],
            })
        );
    }

    #[test]
    fn filter_flags_replace_the_file_filter() {
        let f = file("[incoming.filter]\npath = \"^/file\"");
        let flags = RunOverrides {
            filter_header: vec!["x-a: 1".into()],
            filter_method: vec!["GET".into()],
            ..pid7()
        };
        let cfg = resolve(&flags, &f).unwrap();
        assert_eq!(
            cfg.layer.filter,
            Some(HttpFilterSpec {
                combine: Combine::AllOf,
                rules: vec![
                    FilterRule::Header("x-a: 1".into()),
                    FilterRule::Method("GET".into())
                ],
            })
        );
    }

    #[test]
    fn bad_filter_flag_names_the_flag() {
        let flags = RunOverrides {
            filter_path: vec!["(".into()],
            ..pid7()
        };
        let err = resolve(&flags, &ConfigFile::default()).unwrap_err();
        assert!(matches!(err, ConfigError::Filter { in_file: false, .. }));
        assert!(
            err.to_string()
                .starts_with(r#"invalid incoming filter: --filter-path "(": regex parse error"#),
            "{err}"
        );
    }

    #[test]
    fn bad_file_filter_is_refused() {
        let f = file("[incoming.filter]\nheader = \"(\"\nany_of = []");
        let err = resolve(&pid7(), &f).unwrap_err();
        assert!(err.to_string().contains("cannot be mixed"), "{err}");
        let f = file("[incoming.filter]\nheader = \"(\"");
        let err = resolve(&pid7(), &f).unwrap_err();
        assert!(matches!(err, ConfigError::Filter { in_file: true, .. }));
    }

    #[test]
    fn filter_with_incoming_off_is_refused() {
        let off = file("[incoming]\nmode = \"off\"\n[incoming.filter]\nmethod = \"GET\"");
        let err = resolve(&pid7(), &off).unwrap_err();
        assert!(err.to_string().contains("incoming traffic is off"), "{err}");
        let flags = RunOverrides {
            filter_method: vec!["GET".into()],
            ..pid7()
        };
        let off = file("[incoming]\nmode = \"off\"");
        assert!(resolve(&flags, &off).is_err());
        // A mode flag turns incoming traffic back on.
        let flags = RunOverrides {
            steal: true,
            ..flags
        };
        assert_eq!(
            resolve(&flags, &off).unwrap().layer.incoming,
            IncomingMode::Steal
        );
    }

    #[test]
    fn subscription_modes() {
        use graft_protocol::incoming::IncomingMode as Wire;
        assert_eq!(IncomingMode::Off.subscription_mode(), None);
        assert_eq!(IncomingMode::Steal.subscription_mode(), Some(Wire::Steal));
        assert_eq!(IncomingMode::Mirror.subscription_mode(), Some(Wire::Mirror));
    }

    #[test]
    fn outgoing_and_dns_rules_resolve_flags_over_file() {
        use graft_protocol::Transport;
        let f = file(
            r#"
            [outgoing]
            local = ["db.internal:5432"]
            remote = ["*.svc.cluster.local", "udp://:53"]
            [dns]
            local = ["*.corp.example"]
            remote = ["*.svc.cluster.local"]
            "#,
        );
        let cfg = resolve(&pid7(), &f).unwrap();
        let names = ResolvedNames::default();
        names.record(
            "web.shop.svc.cluster.local",
            &["10.96.0.7".parse().unwrap()],
        );
        names.record("db.internal", &["10.9.0.5".parse().unwrap()]);
        let l = &cfg.layer;
        assert!(l.needs_names());
        assert!(l.goes_remote(&"10.96.0.7:80".parse().unwrap(), Transport::Tcp, &names));
        assert!(!l.goes_remote(&"10.9.0.5:5432".parse().unwrap(), Transport::Tcp, &names));
        assert!(l.goes_remote(&"10.9.0.5:53".parse().unwrap(), Transport::Udp, &names));
        assert!(!l.goes_remote(&"10.9.0.5:53".parse().unwrap(), Transport::Tcp, &names));
        assert!(l.resolves_remotely("web.shop.svc.cluster.local"));
        assert!(!l.resolves_remotely("git.corp.example"));
        assert!(!l.resolves_remotely("example.com"));
        // The layer gets them as JSON.
        let json = serde_json::to_string(l).unwrap();
        assert_eq!(&serde_json::from_str::<LayerConfig>(&json).unwrap(), l);

        let flags = RunOverrides {
            dns_remote: vec!["example.com".into()],
            outgoing_remote: vec!["10.0.0.0/8".into()],
            ..pid7()
        };
        let cfg = resolve(&flags, &f).unwrap();
        assert!(cfg.layer.resolves_remotely("example.com"));
        assert!(!cfg.layer.needs_names() || !cfg.layer.outgoing_local.is_empty());
        let bad = RunOverrides {
            dns_local: vec!["not a name".into()],
            ..pid7()
        };
        let err = resolve(&bad, &ConfigFile::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid DNS name \"not a name\""), "{err}");
        assert!(toml::from_str::<ConfigFile>("[dns]\nbogus = 1\n").is_err());
    }
}
