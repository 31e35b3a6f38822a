//! graft's configuration: `graft.toml`, command-line flags and the environment,
//! resolved once into a [`Config`] that nothing downstream re-reads.
//!
//! The CLI parses flags into [`RunOverrides`], loads the file with
//! [`ConfigFile::load`], and calls [`Config::resolve`]. The part the layer needs
//! travels to it as JSON of [`LayerConfig`] in the `GRAFT_LAYER_CONFIG` environment
//! variable. Pure logic that both sides share lives here too: the file rules
//! ([`fs::FsRules`]), the outgoing filter ([`outgoing::OutgoingLocal`]) and the
//! environment merge ([`env::merge_env`]).

pub mod env;
pub mod fs;
pub mod outgoing;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use env::EnvRules;
pub use fs::{FsMode, FsRules};
pub use outgoing::OutgoingLocal;

/// Why a configuration could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML of the expected shape.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, from the TOML parser.
        message: String,
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
}

/// A target: what the session acts as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// A local Linux process (`pid:PID`).
    Pid(u32),
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
            _ => Err(invalid("expected pid:PID (a local process)")),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Pid(pid) => write!(f, "pid:{pid}"),
        }
    }
}

/// What happens to the target's incoming traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncomingMode {
    /// Incoming traffic is left alone; the program's listeners are only local.
    #[default]
    Off,
    /// Connections to the target's ports the program listens on go to the program.
    Steal,
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
    /// Port mappings for stealing.
    pub port_map: Vec<PortMapping>,
    /// Destinations that stay local besides loopback.
    pub outgoing_local: Vec<OutgoingLocal>,
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
    fn default() -> Self {
        LayerConfig {
            incoming: IncomingMode::Off,
            port_map: Vec::new(),
            outgoing_local: Vec::new(),
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
}

/// The `graft.toml` file. Every key is optional; flags win over the file.
///
/// ```toml
/// target = "pid:1234"
/// [incoming]
/// mode = "steal"
/// port_map = ["8080:80"]
/// [outgoing]
/// local = ["10.0.0.0/8", "192.168.1.5:5432"]
/// [env]
/// include = ["DATABASE_*"]
/// exclude = ["AWS_*"]
/// remote = true
/// [fs]
/// mode = "read"
/// local = ["^/etc/ssl/"]
/// remote = ["^/home/app/"]
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Default target.
    pub target: Option<String>,
    /// Incoming traffic settings.
    #[serde(default)]
    pub incoming: IncomingFile,
    /// Outgoing traffic settings.
    #[serde(default)]
    pub outgoing: OutgoingFile,
    /// Environment settings.
    #[serde(default)]
    pub env: EnvFile,
    /// File settings.
    #[serde(default)]
    pub fs: FsFile,
}

/// `[incoming]` of `graft.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingFile {
    /// `"steal"` or `"off"`.
    pub mode: Option<IncomingMode>,
    /// `LOCAL:REMOTE` entries.
    #[serde(default)]
    pub port_map: Vec<String>,
}

/// `[outgoing]` of `graft.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutgoingFile {
    /// `CIDR[:PORT]` entries that stay local.
    #[serde(default)]
    pub local: Vec<String>,
}

/// `[env]` of `graft.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvFile {
    /// Globs of remote variables to take (all when empty).
    #[serde(default)]
    pub include: Vec<String>,
    /// Globs of remote variables to leave out.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Whether to take the remote environment at all (default true).
    pub remote: Option<bool>,
}

/// `[fs]` of `graft.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsFile {
    /// `"read"`, `"write"` or `"local"`.
    pub mode: Option<FsMode>,
    /// Regexes of paths that stay local.
    #[serde(default)]
    pub local: Vec<String>,
    /// Regexes of paths that are remote.
    #[serde(default)]
    pub remote: Vec<String>,
}

impl ConfigFile {
    /// Loads `path`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

/// The `graft run` flags, raw; `None`/empty means "not given".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunOverrides {
    /// `--target`.
    pub target: Option<String>,
    /// `--steal`.
    pub steal: bool,
    /// `--port-map`.
    pub port_map: Vec<String>,
    /// `--outgoing-local`.
    pub outgoing_local: Vec<String>,
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
}

/// The resolved configuration of one `graft run`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// What the session acts as.
    pub target: Target,
    /// Environment rules.
    pub env: EnvRules,
    /// What the layer gets.
    pub layer: LayerConfig,
}

impl Config {
    /// Resolves flags over the file. `cwd` and `home` become local directories.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for a missing target or a malformed value, naming
    /// the value and the expected form.
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
                reason: "no target given: pass --target pid:PID or set `target` in graft.toml"
                    .into(),
            })?;
        let target: Target = target_text.parse()?;

        let incoming = if flags.steal {
            IncomingMode::Steal
        } else {
            file.incoming.mode.unwrap_or_default()
        };
        let port_map = pick(&flags.port_map, &file.incoming.port_map)
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<PortMapping>, _>>()?;
        let outgoing_local = pick(&flags.outgoing_local, &file.outgoing.local)
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<OutgoingLocal>, _>>()?;

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
            port_map,
            outgoing_local,
            fs: flags.fs.or(file.fs.mode).unwrap_or_default(),
            fs_local,
            fs_remote,
            local_dirs,
            ..LayerConfig::default()
        };
        // Compile once here so a bad regex is a clear error now, not a silent
        // local fallback inside the program.
        FsRules::new(&layer)?;
        Ok(Config { target, env, layer })
    }
}

/// Flags replace the file's list when given.
fn pick<'a>(flag: &'a [String], file: &'a [String]) -> &'a [String] {
    if flag.is_empty() { file } else { flag }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_pid_parses() {
        assert_eq!("pid:42".parse::<Target>().unwrap(), Target::Pid(42));
        assert!("pid:0".parse::<Target>().is_err());
        assert!("pod/x".parse::<Target>().is_err());
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
        assert!(err.to_string().contains("--target pid:PID"), "{err}");
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
    }
}
