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
/// process whose cgroup names the container, the one that started first (the
/// lowest PID among those that started in the same clock tick), which is the
/// container's first process. Not the lowest PID: once PIDs wrap around, a
/// process started in the container later (`kubectl exec`, an exec probe) can
/// have a lower one, and an agent that watched it took its exit for the
/// target's.
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
    // (start time, pid); a process whose start time cannot be read sorts last.
    let mut best: Option<(u64, u32)> = None;
    for pid in graft_proc::pids_in(proc_root) {
        if pid == own {
            continue;
        }
        // Processes come and go while we look: a vanished one is skipped.
        let Ok(cgroup) = graft_proc::cgroup_in(proc_root, pid) else {
            continue;
        };
        if cgroup_names(&cgroup, id) {
            let started = graft_proc::start_time_in(proc_root, pid).unwrap_or(u64::MAX);
            if best.is_none_or(|b| (started, pid) < b) {
                best = Some((started, pid));
            }
        }
    }
    best.map(|(_, pid)| pid)
        .ok_or_else(|| FindError::NotFound(id.to_owned()))
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

    /// After PIDs wrapped around: a process started in the container later
    /// has a lower PID than the container's first process.
    #[test]
    fn the_first_started_process_wins_over_a_lower_pid() {
        let dir = tempfile::tempdir().unwrap();
        let stat = |pid: &str, started: u64| {
            format!(
                "{pid} (python3) S 1 {pid} {pid} 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 {started} 1 1"
            )
        };
        for (pid, started) in [("31000", 500), ("3603", 90_000), ("45", 80_000)] {
            std::fs::create_dir(dir.path().join(pid)).unwrap();
            let cgroup = if pid == "45" {
                "0::/system.slice\n".to_owned()
            } else {
                format!("0::/kubepods/{ID}\n")
            };
            std::fs::write(dir.path().join(pid).join("cgroup"), cgroup).unwrap();
            std::fs::write(dir.path().join(pid).join("stat"), stat(pid, started)).unwrap();
        }
        assert_eq!(find_container_pid(dir.path(), ID), Ok(31000));
        assert_eq!(graft_proc::parse_start_time(&stat("7", 123)), Some(123));
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
