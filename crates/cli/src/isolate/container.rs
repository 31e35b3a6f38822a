//! Container scope: `graft run --target T -- podman run [OPTIONS] IMAGE [ARGS]`
//! runs the container in the session's isolated network namespace.
//!
//! graft recognises `podman run` (and `podman container run`) in COMMAND and runs
//! podman itself inside the isolated namespace (its network and mount namespaces,
//! no new root), with these options added after `run`:
//!
//! * `--network host`: the container shares podman's network namespace, which is
//!   the isolated one (its only way out is graft's tun), so the container's
//!   connections and DNS leave from the target and its listening sockets receive
//!   the target's stolen, mirrored or filtered traffic;
//! * `--env-file FILE`: the target's environment (after `--env-exclude`/`--env-include`);
//! * `-v DIR:PATH` per remote directory: a graft FUSE mount of the target's PATH
//!   under the session directory (read-only unless `--fs write`). The directories
//!   are the target's top-level directories this machine lacks (`/app`, `/data`),
//!   its service-account directory (`/var/run/secrets/kubernetes.io/serviceaccount`)
//!   and the literal paths of `--fs-remote` (`^/etc/app` → `/etc/app`); the image
//!   keeps its own `/etc`, `/usr`, ... . The mounts are made before the namespace,
//!   so podman sees them, and removed on exit; a killed graft leaves dead mounts
//!   that the next `graft mount`/container run or `graft clean` removes.
//!
//! Podman must be rootful (graft as root): rootless podman makes its own user
//! namespace and cannot join one graft made. `docker run` is refused: the docker
//! daemon starts containers outside graft's namespace and cannot join one by path.

use std::{
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    sync::Arc,
};

use graft_config::{Config, env::merge_env};
use graft_mount::{MountHandle, MountOptions};
use graft_protocol::remote::{RemoteRequest, RemoteResponse};
use graft_proxy::Session;

use crate::failure::Failure;

/// Options of `podman run` that choose the network: graft chooses it.
const NETWORK_OPTIONS: &[&str] = &["--network", "--net", "--pod"];

/// The service account's directory in a Kubernetes pod.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Where `run` is in a `podman … run …` COMMAND; `None` when COMMAND is not one.
///
/// # Errors
///
/// `docker run` (refused, with why), or a `podman run` that chooses its own network.
pub fn find_run(command: &[OsString]) -> Result<Option<usize>, Failure> {
    let Some(program) = command.first() else {
        return Ok(None);
    };
    let name = Path::new(program).file_name().unwrap_or(OsStr::new(""));
    let run = command
        .iter()
        .skip(1)
        .position(|a| a == "run")
        .map(|i| i + 1)
        // Global options come before `run` and never take the value `run`.
        .filter(|&i| {
            command[1..i]
                .iter()
                .all(|a| a.to_string_lossy().starts_with('-') || a == "container")
                || command[1..i].iter().any(|a| a == "container")
        });
    if name == "docker" && run.is_some() {
        return Err(Failure::usage(
            "graft cannot place a docker container in its isolated namespace: the docker \
             daemon starts containers outside it and cannot join a network namespace by path",
        )
        .hint("use podman (`podman run …`, same options) as root, or `graft connect` for docker"));
    }
    if name != "podman" {
        return Ok(None);
    }
    let Some(run) = run else { return Ok(None) };
    for arg in &command[run + 1..] {
        let arg = arg.to_string_lossy();
        if !arg.starts_with('-') {
            // The image: what follows is the container's command.
            break;
        }
        let option = arg.split('=').next().unwrap_or("");
        if NETWORK_OPTIONS.contains(&option) {
            return Err(Failure::usage(format!(
                "`podman run {arg}`: graft chooses the container's network (the session's \
                 isolated namespace); drop {option}"
            )));
        }
    }
    Ok(Some(run))
}

/// A container run being prepared: its volumes, mounted, and the files graft made.
pub struct Container {
    /// The remote directories mounted for the container, unmounted on drop.
    pub volumes: Vec<(MountHandle, String)>,
    /// The environment file.
    pub env_file: PathBuf,
}

impl Container {
    /// Mounts the volumes and writes the environment file into `dir`.
    ///
    /// # Errors
    ///
    /// When a file cannot be written or a mount fails (FUSE missing, ...).
    pub async fn prepare(
        session: &Arc<Session>,
        config: &Config,
        dir: &Path,
    ) -> Result<Container, Failure> {
        for swept in graft_mount::sweep_stale() {
            eprintln!(
                "graft: removed a dead graft mount at {} (left by a killed graft)",
                swept.display()
            );
        }
        let env = match session.remote(RemoteRequest::Env).await {
            Ok(RemoteResponse::Env(remote)) => merge_env(Vec::new(), &remote, &config.env),
            _ => Vec::new(),
        };
        let env_file = dir.join("container.env");
        std::fs::write(&env_file, env_file_text(&env)).map_err(|e| {
            Failure::session(format!(
                "cannot write the container's environment file: {e}"
            ))
        })?;
        let mut volumes = Vec::new();
        for (i, path) in volume_paths(session, config).await.into_iter().enumerate() {
            let mount_point = dir.join(format!("volume-{i}"));
            std::fs::create_dir(&mount_point).map_err(|e| {
                Failure::session(format!("cannot make the container's volume directory: {e}"))
            })?;
            let options = MountOptions {
                writable: config.layer.fs == graft_config::FsMode::Write,
                root: path.clone(),
                allow_other: false,
            };
            let handle = graft_mount::mount(
                session.clone(),
                tokio::runtime::Handle::current(),
                &mount_point,
                options,
            )
            .map_err(|e| Failure::session(format!("cannot mount the target's {path}: {e}")))?;
            volumes.push((handle, path));
        }
        Ok(Container { volumes, env_file })
    }

    /// COMMAND with graft's options inserted after `run` (at `run`).
    pub fn command(&self, command: &[OsString], run: usize) -> Vec<OsString> {
        let mut out: Vec<OsString> = command[..=run].to_vec();
        out.extend(["--network".into(), "host".into()]);
        out.push("--env-file".into());
        out.push(self.env_file.clone().into());
        for (handle, path) in &self.volumes {
            let mut volume = handle.mount_point().as_os_str().to_owned();
            volume.push(":");
            volume.push(path);
            out.push("-v".into());
            out.push(volume);
        }
        out.extend(command[run + 1..].iter().cloned());
        out
    }
}

/// `KEY=VALUE` lines as podman's `--env-file` reads them (no quoting: a value
/// with a newline cannot be written and is left out, said once).
fn env_file_text(env: &[(String, String)]) -> String {
    let mut text = String::new();
    for (key, value) in env {
        if value.contains('\n') || key.contains('=') || key.is_empty() {
            eprintln!("graft: the target's {key} holds a newline: left out of the container");
            continue;
        }
        text.push_str(&format!("{key}={value}\n"));
    }
    text
}

/// The target's directories the container gets as volumes (see the module docs).
async fn volume_paths(session: &Session, config: &Config) -> Vec<String> {
    let mut paths = Vec::new();
    if config.layer.fs == graft_config::FsMode::Local {
        return paths;
    }
    if let Ok(RemoteResponse::Dir(entries)) = session
        .remote(RemoteRequest::ReadDir { path: "/".into() })
        .await
    {
        for entry in entries {
            let path = format!("/{}", entry.name);
            if entry.kind == libc::DT_DIR && !Path::new(&path).exists() {
                paths.push(path);
            }
        }
    }
    let stat = RemoteRequest::Stat {
        path: SERVICE_ACCOUNT.into(),
        follow: true,
    };
    if let Ok(RemoteResponse::Stat(s)) = session.remote(stat).await
        && s.is_dir()
    {
        paths.push(SERVICE_ACCOUNT.to_owned());
    }
    paths.extend(
        config
            .layer
            .fs_remote
            .iter()
            .filter_map(|r| super::files::literal_prefix(r)),
    );
    paths.sort();
    paths.dedup();
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<OsString> {
        text.split(' ').map(OsString::from).collect()
    }

    #[test]
    fn podman_run_is_found_after_global_options() {
        assert_eq!(find_run(&words("podman run --rm img")).unwrap(), Some(1));
        assert_eq!(
            find_run(&words("/usr/bin/podman --log-level=debug run img")).unwrap(),
            Some(2)
        );
        assert_eq!(
            find_run(&words("podman container run img")).unwrap(),
            Some(2)
        );
        assert_eq!(find_run(&words("podman ps")).unwrap(), None);
        assert_eq!(find_run(&words("curl run")).unwrap(), None);
        assert_eq!(find_run(&words("podman exec c run")).unwrap(), None);
    }

    #[test]
    fn docker_and_a_chosen_network_are_refused() {
        assert!(find_run(&words("docker run img")).is_err());
        let err = find_run(&words("podman run --network=bridge img")).unwrap_err();
        assert!(format!("{err:?}").contains("--network"), "{err:?}");
        // An option of the container's own command is not podman's.
        assert_eq!(
            find_run(&words("podman run img sh --network x")).unwrap(),
            Some(1)
        );
    }

    #[test]
    fn env_files_leave_out_what_they_cannot_hold() {
        let text = env_file_text(&[("A".into(), "1 2".into()), ("B".into(), "x\ny".into())]);
        assert_eq!(text, "A=1 2\n");
    }
}
