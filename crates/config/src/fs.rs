//! Which paths the layer opens in the target's root and which stay local.
//!
//! Order of decision for an absolute path (after lexical normalisation, see
//! [`normalize`]):
//!
//! 1. `--fs local` mode: local.
//! 2. matches a user `--fs-local` regex: local;
//! 3. matches a user `--fs-remote` regex: remote;
//! 4. matches a default local rule ([`DEFAULT_LOCAL`]) or lies under one of the
//!    local directories (working directory, `$HOME`, the program's own
//!    directory): local;
//! 5. otherwise remote.
//!
//! Relative paths are always local (they resolve against the local working
//! directory).

use regex::RegexSet;
use serde::{Deserialize, Serialize};

use crate::{ConfigError, LayerConfig};

/// How files are handled.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum FsMode {
    /// Remote paths are read in the target; writes stay local (default).
    #[default]
    Read,
    /// Remote paths are read and written in the target.
    Write,
    /// Files are never remote.
    Local,
}

impl std::str::FromStr for FsMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "read" => Ok(FsMode::Read),
            "write" => Ok(FsMode::Write),
            "local" => Ok(FsMode::Local),
            _ => Err(ConfigError::Invalid {
                what: "fs mode",
                value: s.to_owned(),
                reason: "expected read, write or local".into(),
            }),
        }
    }
}

/// Paths that stay local by default: the program's own world (system binaries and
/// libraries, kernel interfaces, scratch space) and the few `/etc` files the C
/// library and dynamic loader read for the local machine.
pub const DEFAULT_LOCAL: &[&str] = &[
    r"^/usr(/|$)",
    r"^/lib[^/]*(/|$)",
    r"^/s?bin(/|$)",
    r"^/proc(/|$)",
    r"^/sys(/|$)",
    r"^/dev(/|$)",
    r"^/tmp(/|$)",
    r"^/var/tmp(/|$)",
    r"^/etc/(ld\.so\.[^/]*|localtime|nsswitch\.conf|gai\.conf|host\.conf)$",
];

/// Whether a normalised absolute `path` matches one of [`DEFAULT_LOCAL`]: the
/// same decision as those regexes (a unit test holds the two together), written
/// out by hand because the layer asks it on every `open` of the program and a
/// regex set search costs a few hundred ns where this costs a few.
fn is_default_local(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    // By hand rather than `split_once`: first components are a few bytes long.
    let (first, tail) = match rest.bytes().position(|b| b == b'/') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, ""),
    };
    match first {
        "usr" | "bin" | "sbin" | "proc" | "sys" | "dev" | "tmp" => true,
        "var" => tail == "tmp" || tail.starts_with("tmp/"),
        "etc" => {
            matches!(
                tail,
                "localtime" | "nsswitch.conf" | "gai.conf" | "host.conf"
            ) || tail
                .strip_prefix("ld.so.")
                .is_some_and(|name| !name.contains('/'))
        }
        lib => lib.starts_with("lib"),
    }
}

/// Whether `path` is absolute and already in [`normalize`]'s form (no empty,
/// `.` or `..` component, no trailing `/` except for the root), so that it can
/// be classified as it is, without an allocation.
pub fn is_normal(path: &str) -> bool {
    let Some(rest) = path.as_bytes().strip_prefix(b"/") else {
        return false;
    };
    let mut scan = NormalScan::new();
    rest.iter().all(|&b| scan.push(b)) && scan.finish()
}

/// [`is_normal`]'s one pass over the bytes after the leading `/`, fed a byte at
/// a time, so that a caller holding a C string can find its terminator, check
/// its encoding and its form in the same pass (the layer does, on every `open`
/// of the program).
///
/// Each component, between one `/` and the next or the end, must be neither
/// empty nor `.` nor `..`; nothing at all after the leading `/` is the root.
#[derive(Debug, Clone, Copy)]
pub struct NormalScan {
    /// Bytes in the current component.
    len: usize,
    /// Whether the current component is only dots so far.
    dots: bool,
    /// Whether any byte came after the leading `/`.
    any: bool,
}

impl NormalScan {
    /// The state just after the leading `/`.
    #[inline]
    pub const fn new() -> NormalScan {
        NormalScan {
            len: 0,
            dots: true,
            any: false,
        }
    }

    /// Takes the next byte; `false` once the path cannot be in normal form.
    #[inline]
    pub fn push(&mut self, b: u8) -> bool {
        self.any = true;
        if b == b'/' {
            if self.len == 0 || (self.dots && self.len <= 2) {
                return false;
            }
            (self.len, self.dots) = (0, true);
        } else {
            self.len += 1;
            self.dots &= b == b'.';
        }
        true
    }

    /// Whether the bytes pushed so far end a path in normal form.
    #[inline]
    pub fn finish(self) -> bool {
        !self.any || (self.len != 0 && !(self.dots && self.len <= 2))
    }
}

impl Default for NormalScan {
    fn default() -> Self {
        Self::new()
    }
}

/// The compiled file rules.
#[derive(Debug, Clone)]
pub struct FsRules {
    mode: FsMode,
    /// `None` when there are none: the layer asks [`FsRules::is_remote`] on
    /// every `open`, and an empty set's own `is_empty` reads its heap object.
    user_local: Option<RegexSet>,
    user_remote: Option<RegexSet>,
    local_dirs: Vec<String>,
}

impl FsRules {
    /// Compiles the rules of `config`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the first regex that does not compile.
    pub fn new(config: &LayerConfig) -> Result<FsRules, ConfigError> {
        let compile = |what: &'static str, patterns: &[String]| {
            if patterns.is_empty() {
                return Ok(None);
            }
            RegexSet::new(patterns)
                .map(Some)
                .map_err(|e| ConfigError::Invalid {
                    what,
                    value: patterns.join(" "),
                    reason: e.to_string(),
                })
        };
        Ok(FsRules {
            mode: config.fs,
            user_local: compile("--fs-local regex", &config.fs_local)?,
            user_remote: compile("--fs-remote regex", &config.fs_remote)?,
            local_dirs: config
                .local_dirs
                .iter()
                .map(|d| d.trim_end_matches('/').to_owned())
                .filter(|d| !d.is_empty())
                .collect(),
        })
    }

    /// The mode these rules were built with.
    pub fn mode(&self) -> FsMode {
        self.mode
    }

    /// Adds a directory whose contents stay local (the program's own directory).
    pub fn add_local_dir(&mut self, dir: &str) {
        let dir = dir.trim_end_matches('/');
        if !dir.is_empty() && !self.local_dirs.iter().any(|d| d == dir) {
            self.local_dirs.push(dir.to_owned());
        }
    }

    /// Whether `path` is opened in the target's root. `path` should already be
    /// normalised ([`normalize`]); relative paths are never remote.
    pub fn is_remote(&self, path: &str) -> bool {
        if self.mode == FsMode::Local || !path.starts_with('/') {
            return false;
        }
        if self
            .user_local
            .as_ref()
            .is_some_and(|set| set.is_match(path))
        {
            return false;
        }
        if self
            .user_remote
            .as_ref()
            .is_some_and(|set| set.is_match(path))
        {
            return true;
        }
        if is_default_local(path) {
            return false;
        }
        !self.local_dirs.iter().any(|dir| {
            path.strip_prefix(dir.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }
}

/// Normalises an absolute path lexically: collapses `//`, removes `.`, resolves `..`
/// against the preceding component (never above `/`). Symlinks are not followed:
/// this only classifies the path; the agent confines the real resolution.
pub fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let mut out = String::with_capacity(path.len());
    for p in &parts {
        out.push('/');
        out.push_str(p);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(local: &[&str], remote: &[&str], dirs: &[&str]) -> FsRules {
        FsRules::new(&LayerConfig {
            fs_local: local.iter().map(|s| s.to_string()).collect(),
            fs_remote: remote.iter().map(|s| s.to_string()).collect(),
            local_dirs: dirs.iter().map(|s| s.to_string()).collect(),
            ..LayerConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn defaults_keep_the_programs_world_local() {
        let r = rules(&[], &[], &["/home/dev", "/work/app"]);
        for local in [
            "/usr/lib/python3/os.py",
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib64/ld-linux-x86-64.so.2",
            "/bin/sh",
            "/sbin/ip",
            "/proc/self/maps",
            "/sys/class",
            "/dev/null",
            "/tmp/x",
            "/etc/ld.so.cache",
            "/home/dev/.bashrc",
            "/work/app",
            "/work/app/src/main.py",
            "relative/path",
        ] {
            assert!(!r.is_remote(local), "{local} should be local");
        }
        for remote in [
            "/etc/hosts",
            "/etc/resolv.conf",
            "/app/config.yaml",
            "/var/run/secrets/kubernetes.io/serviceaccount/token",
            "/work/application",
            "/home/devil",
            "/",
        ] {
            assert!(r.is_remote(remote), "{remote} should be remote");
        }
    }

    #[test]
    fn user_rules_override_defaults_local_first() {
        let r = rules(
            &["^/etc/ssl/"],
            &["^/tmp/shared/", "^/etc/ssl/certs/x"],
            &[],
        );
        assert!(!r.is_remote("/etc/ssl/certs/x"));
        assert!(r.is_remote("/tmp/shared/a"));
        assert!(!r.is_remote("/tmp/other"));
    }

    #[test]
    fn local_mode_is_never_remote() {
        let r = FsRules::new(&LayerConfig {
            fs: FsMode::Local,
            ..LayerConfig::default()
        })
        .unwrap();
        assert!(!r.is_remote("/etc/hosts"));
    }

    #[test]
    fn the_hand_written_default_rules_decide_as_the_regexes() {
        let regexes = RegexSet::new(DEFAULT_LOCAL).unwrap();
        let mut paths = vec![
            "/",
            "/usr",
            "/usr/",
            "/usrx",
            "/usr/bin/env",
            "/lib",
            "/lib64",
            "/libexec/x",
            "/li",
            "/bin",
            "/bins",
            "/sbin/ip",
            "/proc",
            "/procs",
            "/sys/x",
            "/dev",
            "/device",
            "/tmp",
            "/tmpx",
            "/var",
            "/var/tmp",
            "/var/tmpx",
            "/var/tmp/a",
            "/var/lib",
            "/etc",
            "/etc/",
            "/etc/hosts",
            "/etc/ld.so.cache",
            "/etc/ld.so.conf.d/x.conf",
            "/etc/ld.so.",
            "/etc/ld.so",
            "/etc/localtime",
            "/etc/localtime/x",
            "/etc/nsswitch.conf",
            "/etc/gai.conf",
            "/etc/host.conf",
            "/etc/hosts.conf",
            "/etc/x/localtime",
            "/app/usr",
            "/home/dev/tmp",
        ];
        let extra: Vec<String> = paths.iter().map(|p| format!("{p}/deeper")).collect();
        paths.extend(extra.iter().map(String::as_str));
        for path in paths {
            assert_eq!(is_default_local(path), regexes.is_match(path), "{path}");
        }
    }

    #[test]
    fn normal_paths_are_those_normalize_leaves_alone() {
        for path in [
            "/",
            "/etc/hosts",
            "//etc",
            "/etc/",
            "/./x",
            "/a/../b",
            "/a/.",
            "/a/..",
            "/.x/..y",
            "/.",
            "/..",
            "/...",
            "/a//b",
            "/a/b/",
            "/a..b/c.d",
            "relative",
            "",
        ] {
            assert_eq!(is_normal(path), normalize(path) == path, "{path}");
        }
    }

    #[test]
    fn normalize_resolves_dots() {
        assert_eq!(normalize("/usr/../etc//hosts"), "/etc/hosts");
        assert_eq!(normalize("/../../etc/./passwd"), "/etc/passwd");
        assert_eq!(normalize("/"), "/");
        assert_eq!(normalize("/tmp/.."), "/");
    }
}
