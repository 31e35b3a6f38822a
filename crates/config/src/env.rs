//! How the target's environment is laid over the local one.
//!
//! Every remote variable replaces the local one of the same name, except:
//! - when `--no-remote-env` is given, nothing is taken;
//! - variables in [`KEEP_LOCAL`] stay local unless an `--env-include` glob names
//!   them exactly (`--env-include PATH`);
//! - when `--env-include` globs are given, only remote variables matching one are
//!   taken;
//! - remote variables matching an `--env-exclude` glob are never taken.
//!
//! Globs use `globset` syntax (`*`, `?`, `[...]`), matched against the name.

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::ConfigError;

/// Variables that describe the local machine and session, not the workload; they
/// stay local by default.
pub const KEEP_LOCAL: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "TERM",
    "COLORTERM",
    "PWD",
    "OLDPWD",
    "SHLVL",
    "TMPDIR",
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "XAUTHORITY",
    "SSH_AUTH_SOCK",
    "SSH_CONNECTION",
    "SSH_CLIENT",
    "SSH_TTY",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
    "XDG_SESSION_ID",
    "DBUS_SESSION_BUS_ADDRESS",
    "MAIL",
    "_",
];

/// The compiled environment rules.
#[derive(Debug, Clone)]
pub struct EnvRules {
    include_patterns: Vec<String>,
    include: GlobSet,
    exclude: GlobSet,
    remote: bool,
}

impl PartialEq for EnvRules {
    fn eq(&self, other: &Self) -> bool {
        self.include_patterns == other.include_patterns && self.remote == other.remote
    }
}

impl EnvRules {
    /// Compiles include and exclude globs; `remote == false` takes nothing.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming a glob that does not parse.
    pub fn new(
        include: Vec<String>,
        exclude: Vec<String>,
        remote: bool,
    ) -> Result<EnvRules, ConfigError> {
        let build = |what: &'static str, globs: &[String]| {
            let mut set = GlobSetBuilder::new();
            for g in globs {
                set.add(Glob::new(g).map_err(|e| ConfigError::Invalid {
                    what,
                    value: g.clone(),
                    reason: e.to_string(),
                })?);
            }
            set.build().map_err(|e| ConfigError::Invalid {
                what,
                value: globs.join(" "),
                reason: e.to_string(),
            })
        };
        Ok(EnvRules {
            include: build("--env-include glob", &include)?,
            exclude: build("--env-exclude glob", &exclude)?,
            include_patterns: include,
            remote,
        })
    }

    /// Whether the remote variable `name` is taken.
    pub fn takes(&self, name: &str) -> bool {
        if !self.remote || self.exclude.is_match(name) {
            return false;
        }
        if KEEP_LOCAL.contains(&name) {
            return self.include_patterns.iter().any(|p| p == name);
        }
        self.include_patterns.is_empty() || self.include.is_match(name)
    }
}

/// Lays `remote` over `local` by `rules`; local order first, new remote variables
/// after, in remote order.
pub fn merge_env(
    local: impl IntoIterator<Item = (String, String)>,
    remote: &[(String, String)],
    rules: &EnvRules,
) -> Vec<(String, String)> {
    let mut merged: Vec<(String, String)> = local.into_iter().collect();
    for (name, value) in remote {
        if name.is_empty() || !rules.takes(name) {
            continue;
        }
        match merged.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value.clone(),
            None => merged.push((name.clone(), value.clone())),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn get<'a>(v: &'a [(String, String)], k: &str) -> Option<&'a str> {
        v.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn remote_overlays_but_keeps_local_basics() {
        let rules = EnvRules::new(vec![], vec![], true).unwrap();
        let out = merge_env(
            env(&[("PATH", "/local/bin"), ("APP", "local")]),
            &env(&[("PATH", "/remote/bin"), ("APP", "remote"), ("DB", "pg://x")]),
            &rules,
        );
        assert_eq!(get(&out, "PATH"), Some("/local/bin"));
        assert_eq!(get(&out, "APP"), Some("remote"));
        assert_eq!(get(&out, "DB"), Some("pg://x"));
    }

    #[test]
    fn include_exclude_and_off() {
        let remote = env(&[
            ("DB_URL", "a"),
            ("DB_PASS", "b"),
            ("OTHER", "c"),
            ("PATH", "/r"),
        ]);
        let rules = EnvRules::new(
            vec!["DB_*".into(), "PATH".into()],
            vec!["*_PASS".into()],
            true,
        )
        .unwrap();
        let out = merge_env(env(&[("PATH", "/l")]), &remote, &rules);
        assert_eq!(get(&out, "DB_URL"), Some("a"));
        assert_eq!(get(&out, "DB_PASS"), None);
        assert_eq!(get(&out, "OTHER"), None);
        assert_eq!(get(&out, "PATH"), Some("/r"));

        let off = EnvRules::new(vec![], vec![], false).unwrap();
        assert_eq!(
            merge_env(env(&[("A", "1")]), &remote, &off),
            env(&[("A", "1")])
        );
    }

    #[test]
    fn bad_glob_is_refused() {
        assert!(EnvRules::new(vec!["[".into()], vec![], true).is_err());
    }
}
