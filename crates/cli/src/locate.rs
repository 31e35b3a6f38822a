//! Finding the pieces graft starts: the `graft-agent` binary and the layer
//! library `libgraft_layer.so`.
//!
//! Order: next to the `graft` binary (a build tree or an unpacked release), then
//! the `GRAFT_AGENT_BIN` / `GRAFT_LAYER_PATH` variables, then `../lib/graft/`
//! relative to the binary (an installed layout: `/usr/local/bin/graft` and
//! `/usr/local/lib/graft/`), then `PATH` for the agent.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use crate::failure::Failure;

/// The agent's file name.
pub const AGENT_NAME: &str = "graft-agent";
/// The layer's file name.
pub const LAYER_NAME: &str = "libgraft_layer.so";
/// Overrides where the agent is found.
pub const AGENT_ENV: &str = "GRAFT_AGENT_BIN";
/// Overrides where the layer is found.
pub const LAYER_ENV: &str = "GRAFT_LAYER_PATH";

/// The pieces found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pieces {
    /// The agent binary.
    pub agent: PathBuf,
    /// The layer library (absolute, as `LD_PRELOAD` needs).
    pub layer: PathBuf,
}

/// Finds the agent and the layer. `exe` is the running `graft` binary, `env`
/// reads an environment variable.
pub fn locate(
    exe: Option<&Path>,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Pieces, Failure> {
    let exe_dir = exe.and_then(Path::parent);
    let agent = find(exe_dir, AGENT_NAME, env(AGENT_ENV), env("PATH"))
        .map_err(|looked| missing(AGENT_NAME, AGENT_ENV, &looked))?;
    let layer = find(exe_dir, LAYER_NAME, env(LAYER_ENV), None)
        .map_err(|looked| missing(LAYER_NAME, LAYER_ENV, &looked))?;
    let absolute = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    Ok(Pieces {
        agent: absolute(agent),
        layer: absolute(layer),
    })
}

/// Finds the agent alone (for `graft agent-image`), in the order of [`locate`].
pub fn locate_agent(
    exe: Option<&Path>,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<PathBuf, Failure> {
    let exe_dir = exe.and_then(Path::parent);
    let agent = find(exe_dir, AGENT_NAME, env(AGENT_ENV), env("PATH"))
        .map_err(|looked| missing(AGENT_NAME, AGENT_ENV, &looked))?;
    Ok(std::fs::canonicalize(&agent).unwrap_or(agent))
}

/// The first existing candidate, or every place looked at.
fn find(
    exe_dir: Option<&Path>,
    name: &str,
    from_env: Option<OsString>,
    search_path: Option<OsString>,
) -> Result<PathBuf, Vec<String>> {
    let mut candidates = Vec::new();
    if let Some(dir) = exe_dir {
        candidates.push(dir.join(name));
    }
    if let Some(path) = from_env.filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(path));
    }
    if let Some(dir) = exe_dir {
        candidates.push(dir.join("../lib/graft").join(name));
    }
    if let Some(found) = candidates.iter().find(|c| c.is_file()) {
        return Ok(found.clone());
    }
    let mut looked: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    if let Some(search_path) = search_path {
        if let Some(found) = std::env::split_paths(&search_path)
            .map(|dir| dir.join(name))
            .find(|c| c.is_file())
        {
            return Ok(found);
        }
        looked.push("PATH".into());
    }
    Err(looked)
}

fn missing(name: &str, var: &str, looked: &[String]) -> Failure {
    Failure::session(format!(
        "cannot find {name}; looked in {}",
        looked.join(", ")
    ))
    .hint(format!(
        "install graft together with {name} (next to the graft binary or in ../lib/graft/), \
         or set {var} to its path"
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    fn env_of(vars: HashMap<&'static str, PathBuf>) -> impl Fn(&str) -> Option<OsString> {
        move |name| vars.get(name).map(|p| p.clone().into_os_string())
    }

    #[test]
    fn next_to_the_binary_wins() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        touch(&bin.join(AGENT_NAME));
        touch(&bin.join(LAYER_NAME));
        let elsewhere = dir.path().join("elsewhere");
        touch(&elsewhere.join(AGENT_NAME));
        let env = env_of(HashMap::from([(AGENT_ENV, elsewhere.join(AGENT_NAME))]));
        let pieces = locate(Some(&bin.join("graft")), &env).unwrap();
        assert_eq!(pieces.agent, bin.join(AGENT_NAME).canonicalize().unwrap());
        assert_eq!(pieces.layer, bin.join(LAYER_NAME).canonicalize().unwrap());
    }

    #[test]
    fn env_then_lib_dir_then_path() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let from_env = dir.path().join("custom/agent");
        touch(&from_env);
        touch(&dir.path().join("lib/graft").join(LAYER_NAME));
        let env = env_of(HashMap::from([(AGENT_ENV, from_env.clone())]));
        let pieces = locate(Some(&bin.join("graft")), &env).unwrap();
        assert_eq!(pieces.agent, from_env.canonicalize().unwrap());
        assert_eq!(
            pieces.layer,
            dir.path()
                .join("lib/graft")
                .join(LAYER_NAME)
                .canonicalize()
                .unwrap()
        );

        let on_path = dir.path().join("path-dir");
        touch(&on_path.join(AGENT_NAME));
        let env = env_of(HashMap::from([("PATH", on_path.clone())]));
        let pieces = locate(Some(&bin.join("graft")), &env).unwrap();
        assert_eq!(
            pieces.agent,
            on_path.join(AGENT_NAME).canonicalize().unwrap()
        );
    }

    #[test]
    fn missing_pieces_say_where_we_looked_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        touch(&bin.join(AGENT_NAME));
        let err = locate(Some(&bin.join("graft")), &|_| None).unwrap_err();
        assert_eq!(err.code, crate::failure::EXIT_SESSION);
        assert!(err.message.contains(LAYER_NAME), "{}", err.message);
        assert!(
            err.message.contains(&bin.display().to_string()),
            "{}",
            err.message
        );
        assert!(err.hint.unwrap().contains(LAYER_ENV));
    }
}
