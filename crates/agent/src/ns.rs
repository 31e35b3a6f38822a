//! The target process and its namespaces: checking that it exists, opening its
//! network namespace and its root directory, and moving the calling thread into
//! that network namespace.
//!
//! A thread's network namespace is inherited by the threads and processes it
//! creates, so `main` enters the target's namespace before it builds the async
//! runtime: every runtime thread, every socket it creates and every `iptables` it
//! spawns then live in the target's namespace. The mount namespace is not
//! entered; files are reached through the target's root directory
//! (`/proc/PID/root`), opened once and kept as a directory file descriptor.

use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// Why the target's namespaces could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    /// There is no process with that PID (it may have just exited).
    #[error("target process {pid} does not exist")]
    NoSuchProcess {
        /// The target's PID.
        pid: u32,
    },
    /// The agent lacks the privileges to enter the target's namespaces.
    #[error(
        "graft-agent cannot enter the namespaces of process {pid}: it needs root, or \
         CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_SYS_PTRACE (run graft with sudo)"
    )]
    Permission {
        /// The target's PID.
        pid: u32,
    },
    /// Anything else.
    #[error("could not {what} of process {pid}: {error}")]
    Other {
        /// What the agent was doing.
        what: &'static str,
        /// The target's PID.
        pid: u32,
        /// The system error.
        error: std::io::Error,
    },
}

impl NsError {
    fn from_errno(pid: u32, what: &'static str, errno: Errno) -> NsError {
        match errno {
            Errno::NOENT | Errno::SRCH => NsError::NoSuchProcess { pid },
            Errno::PERM | Errno::ACCESS => NsError::Permission { pid },
            other => NsError::Other {
                what,
                pid,
                error: other.into(),
            },
        }
    }
}

/// Checks that `/proc/PID` exists.
///
/// # Errors
///
/// [`NsError::NoSuchProcess`] when it does not.
pub fn check_exists(pid: u32) -> Result<(), NsError> {
    if pid != 0 && graft_proc::exists(pid) {
        Ok(())
    } else {
        Err(NsError::NoSuchProcess { pid })
    }
}

/// Opens the target's network namespace (`/proc/PID/ns/net`).
///
/// # Errors
///
/// [`NsError::Permission`] without ptrace access to the target, else as the open fails.
pub fn open_netns(pid: u32) -> Result<OwnedFd, NsError> {
    rustix::fs::open(
        graft_proc::dir(pid).join("ns/net"),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| NsError::from_errno(pid, "open the network namespace", e))
}

/// Moves the calling thread into the network namespace `netns`.
///
/// # Errors
///
/// [`NsError::Permission`] without `CAP_SYS_ADMIN`.
pub fn enter_netns(pid: u32, netns: &OwnedFd) -> Result<(), NsError> {
    move_into_link_name_space(netns.as_fd(), Some(LinkNameSpaceType::Network))
        .map_err(|e| NsError::from_errno(pid, "enter the network namespace", e))
}

/// Opens the target's root directory (`/proc/PID/root`) as an `O_PATH` directory
/// descriptor, the anchor of every file operation.
///
/// # Errors
///
/// [`NsError::Permission`] without ptrace access to the target.
pub fn open_root(pid: u32) -> Result<OwnedFd, NsError> {
    rustix::fs::open(
        graft_proc::dir(pid).join("root"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| NsError::from_errno(pid, "open the root directory", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_exists_and_pid_zero_does_not() {
        assert!(check_exists(std::process::id()).is_ok());
        assert!(matches!(
            check_exists(0),
            Err(NsError::NoSuchProcess { pid: 0 })
        ));
    }

    #[test]
    fn permission_errors_say_what_to_do() {
        let e = NsError::from_errno(7, "x", Errno::PERM);
        assert_eq!(
            e.to_string(),
            "graft-agent cannot enter the namespaces of process 7: it needs root, or \
             CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_SYS_PTRACE (run graft with sudo)"
        );
        assert!(matches!(
            NsError::from_errno(7, "x", Errno::SRCH),
            NsError::NoSuchProcess { pid: 7 }
        ));
    }
}
