//! Finding a container's process by its container ID (node mode): the ID is
//! the last path component's hex part of the process's cgroup, for every runtime
//! graft knows of — containerd (`cri-containerd-<id>.scope` or `/<id>`), CRI-O
//! (`crio-<id>.scope`), Docker (`docker-<id>.scope` or `/docker/<id>`) — so the
//! search looks for the ID anywhere in `/proc/PID/cgroup` (cgroups(7)) rather than
//! parsing each runtime's layout.

use std::path::Path;

/// The shortest container ID accepted: shorter ones could match by accident.
pub const MIN_ID_LEN: usize = 12;

/// Strips a `runtime://` prefix (`containerd://3f9a…` as in a pod's status).
pub fn bare_id(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, id)| id)
}

/// Whether the text of a `/proc/PID/cgroup` file names the container `id`.
pub fn cgroup_names(cgroup: &str, id: &str) -> bool {
    cgroup.lines().any(|line| {
        // hierarchy-ID:controller-list:cgroup-path
        line.splitn(3, ':')
            .nth(2)
            .is_some_and(|path| path.contains(id))
    })
}

/// Why no process was found.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FindError {
    /// The ID is too short or not hex.
    #[error(
        "{0:?} is not a container ID (expected at least {MIN_ID_LEN} hex digits, as in a pod's \
         status.containerStatuses[].containerID)"
    )]
    Invalid(String),
    /// No process has it.
    #[error(
        "no process of container {0} on this node: the container restarted or the pod moved; \
         run graft again"
    )]
    NotFound(String),
}

/// The process of container `id` under `proc_root` (normally `/proc`): of every
/// process whose cgroup names the container, the one with the lowest PID, which
/// is the container's first process.
///
/// # Errors
///
/// [`FindError::Invalid`] for an ID that is not one, [`FindError::NotFound`] when
/// no process matches.
pub fn find_container_pid(proc_root: &Path, id: &str) -> Result<u32, FindError> {
    let id = bare_id(id);
    if id.len() < MIN_ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FindError::Invalid(id.to_owned()));
    }
    let own = std::process::id();
    let mut best: Option<u32> = None;
    for pid in graft_proc::pids_in(proc_root) {
        if pid == own || best.is_some_and(|b| b < pid) {
            continue;
        }
        // Processes come and go while we look: a vanished one is skipped.
        let Ok(cgroup) = graft_proc::cgroup_in(proc_root, pid) else {
            continue;
        };
        if cgroup_names(&cgroup, id) {
            best = Some(pid);
        }
    }
    best.ok_or_else(|| FindError::NotFound(id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f9a0c1d2e4b5a6978877665544332211aabbccddeeff00112233445566778899";

    #[test]
    fn runtimes_layouts_are_recognized() {
        for text in [
            format!("0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{ID}.scope\n"),
            format!("0::/kubepods/besteffort/pod1/{ID}\n"),
            format!("12:pids:/docker/{ID}\n0::/docker/{ID}\n"),
            format!("0::/kubepods.slice/crio-{ID}.scope\n"),
        ] {
            assert!(cgroup_names(&text, ID), "{text}");
        }
        assert!(!cgroup_names("0::/user.slice/session-1.scope\n", ID));
        assert!(!cgroup_names(&format!("{ID}::/\n"), ID));
    }

    #[test]
    fn ids_are_checked() {
        assert_eq!(bare_id(&format!("containerd://{ID}")), ID);
        assert!(matches!(
            find_container_pid(Path::new("/proc"), "abc"),
            Err(FindError::Invalid(_))
        ));
        assert!(matches!(
            find_container_pid(Path::new("/proc"), "zzzzzzzzzzzzzzzz"),
            Err(FindError::Invalid(_))
        ));
    }

    #[test]
    fn the_lowest_matching_pid_wins() {
        let dir = tempfile::tempdir().unwrap();
        for (pid, cgroup) in [
            ("40", format!("0::/kubepods/{ID}\n")),
            ("7", format!("0::/kubepods/{ID}\n")),
            ("3", "0::/system.slice\n".to_owned()),
            ("self", format!("0::/kubepods/{ID}\n")),
        ] {
            std::fs::create_dir(dir.path().join(pid)).unwrap();
            std::fs::write(dir.path().join(pid).join("cgroup"), cgroup).unwrap();
        }
        assert_eq!(find_container_pid(dir.path(), ID), Ok(7));
        let other = "ffffffffffffffffffff";
        assert_eq!(
            find_container_pid(dir.path(), other),
            Err(FindError::NotFound(other.into()))
        );
    }
}
