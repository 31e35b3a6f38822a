//! The watchdog: a child process, forked before the agent starts any thread, that
//! removes the agent's packet rules once the agent is gone, however it died.
//!
//! The agent keeps the only write end of a pipe; the watchdog blocks reading the
//! read end. When the agent exits for any reason, `kill -9` included, the kernel
//! closes the write end, the watchdog's `read` returns 0, and it runs the cleanup
//! commands of [`crate::rules::cleanup_commands`] in the target's network
//! namespace (which it entered right after the fork), then exits. It ignores
//! `SIGINT` and `SIGTERM` so that a Ctrl-C delivered to the whole process group
//! cannot kill it before it has cleaned up.
#![allow(unsafe_code)]

use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::unistd::{ForkResult, Pid, fork, pipe2, read};

/// The agent's end of the watchdog: dropping it (or exiting) starts the cleanup.
#[derive(Debug)]
pub struct Watchdog {
    /// The pipe's write end; its closing is the signal.
    _alive: OwnedFd,
    /// The watchdog's PID.
    pid: Pid,
}

impl Watchdog {
    /// The watchdog process's PID.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }
}

/// Why the watchdog could not be started.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    /// `pipe2` failed.
    #[error("could not create the watchdog's pipe: {0}")]
    Pipe(#[source] Errno),
    /// `fork` failed.
    #[error("could not fork the watchdog process: {0}")]
    Fork(#[source] Errno),
}

/// Forks the watchdog, which enters `netns` and removes the rules of `chain` once
/// the calling process is gone.
///
/// Must be called while the process has a single thread.
///
/// # Errors
///
/// [`WatchdogError`] when the pipe or the fork fails.
pub fn spawn(chain: &str, netns: &OwnedFd) -> Result<Watchdog, WatchdogError> {
    // CLOEXEC: the commands the agent spawns later must not hold the write end, or
    // a dead agent would look alive until they exit.
    let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC).map_err(WatchdogError::Pipe)?;
    // SAFETY: the agent calls this from `main` before it creates any thread (the
    // async runtime is built afterwards), so the child is a copy of a single-threaded
    // process: no lock can be held by a thread that does not exist in the child, and
    // the child may allocate and run ordinary code.
    match unsafe { fork() }.map_err(WatchdogError::Fork)? {
        ForkResult::Parent { child } => {
            drop(read_end);
            Ok(Watchdog {
                _alive: write_end,
                pid: child,
            })
        }
        ForkResult::Child => {
            drop(write_end);
            let code = watch(chain, netns, read_end);
            std::process::exit(code);
        }
    }
}

/// The watchdog's whole life; returns its exit code.
fn watch(chain: &str, netns: &OwnedFd, alive: OwnedFd) -> i32 {
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: SIG_IGN installs no handler code, so nothing of ours runs in
        // signal context.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    let _ = rustix::thread::set_name(c"graft-watchdog");
    // The CLI reads the agent's stdout until `ready`; the watchdog must not keep it
    // open after the agent is gone.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stdin(&null);
    }
    if rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(netns),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .is_err()
    {
        // The agent fails the same way and reports it; it can install no rule.
        return 0;
    }
    let mut byte = [0u8; 1];
    loop {
        match read(&alive, &mut byte) {
            Ok(0) => break,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    crate::rules::cleanup_blocking(chain);
    crate::transparent::cleanup_blocking(chain);
    tracing::debug!(chain, "watchdog: agent gone, packet rules removed");
    0
}
