//! Child processes: dying with graft, stopping them, and reading their exit; and
//! graft's own limit on open descriptors.
//!
//! The `unsafe` of the binary is here (and in `isolate`, for descriptors received
//! over `SCM_RIGHTS`): the `pre_exec` hook that asks the
//! kernel to send SIGTERM to a child when graft dies, so neither CMD nor the agent
//! outlives a `kill -9` of graft, the one that passes a descriptor to a child
//! ([`pass_fd`]), and the `getrlimit`/`setrlimit` calls. graft
//! relays every connection of CMD, so it raises its soft `RLIMIT_NOFILE` to the
//! hard limit at start ([`raise_nofile`]); the hook gives children the soft limit
//! graft started with, so CMD runs with the limits it would have had without
//! graft (programs that use `select` rely on descriptors below 1024). `PR_SET_PDEATHSIG` fires when the *thread* that
//! forked the child exits, so children are spawned from the main thread (the main
//! future of `#[tokio::main]` runs there).

use std::{os::unix::process::ExitStatusExt, process::ExitStatus, time::Duration};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::{
    process::{Child, Command},
    signal::unix::SignalKind,
};

use crate::failure::Failure;

/// The soft `RLIMIT_NOFILE` graft started with, once [`raise_nofile`] raised it.
static ORIGINAL_NOFILE: std::sync::OnceLock<libc::rlimit> = std::sync::OnceLock::new();

/// Raises graft's soft limit on open descriptors to the hard limit
/// (getrlimit(2)); children started with [`die_with_parent`] get the original
/// soft limit back.
///
/// # Errors
///
/// The error of `getrlimit` or `setrlimit`; graft runs on with its old limit.
#[allow(unsafe_code)]
pub fn raise_nofile() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur != limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; setrlimit only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let _ = ORIGINAL_NOFILE.set(limit);
    }
    Ok(limit.rlim_max)
}

/// Gives the child `fd` as descriptor number `target` (without `FD_CLOEXEC`): how
/// graft hands the isolated namespace's helper its end of the socket pair. The
/// caller keeps `fd` open until the child is spawned.
#[allow(unsafe_code)]
pub fn pass_fd(command: &mut Command, fd: std::os::fd::RawFd, target: std::os::fd::RawFd) {
    // SAFETY: the hook runs between fork and exec and calls only dup2 and fcntl,
    // both async-signal-safe; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if fd == target {
                // dup2 onto itself keeps FD_CLOEXEC: clear it.
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes the child receive SIGTERM when graft dies.
#[allow(unsafe_code)]
pub fn die_with_parent(command: &mut Command) {
    let parent = std::process::id();
    let original = ORIGINAL_NOFILE.get().copied();
    // SAFETY: the hook runs between fork and exec and calls only prctl, getppid
    // and setrlimit, all async-signal-safe; it allocates nothing (the error is a
    // raw OS error).
    unsafe {
        command.pre_exec(move || {
            if let Some(limit) = &original
                && libc::setrlimit(libc::RLIMIT_NOFILE, limit) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // graft died before the prctl took effect: do not start orphaned.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Makes the child the leader of a new session (`setsid(2)`): no terminal, not
/// in graft's process group, so it outlives the terminal and graft (the
/// detached `graft connect` daemon).
#[allow(unsafe_code)]
pub fn detach(command: &mut Command) {
    // SAFETY: the hook runs between fork and exec and calls only setsid, which
    // is async-signal-safe; it allocates nothing.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `signal` to `child` if it is still running.
pub fn signal(child: &Child, signal: Signal) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), signal);
    }
}

/// What CMD started: its descendants when graft stops it, each held by a
/// pidfd (pidfd_open(2), Linux 5.3), so a signal never reaches another
/// process that took a freed pid. A terminal's Ctrl-C reaches CMD's whole
/// process group; graft stopping CMD (SIGTERM to graft, the link lost) does
/// the same, and whatever CMD started and left running (a shell's background
/// job, strace's tracee, a child that ignored the signal) ends with it instead
/// of running on with a layer whose session is gone.
///
/// Processes CMD started and whose parent had exited before the look-up
/// belong to init (or a subreaper) and are not found: a daemon that detached
/// on purpose is left alone.
pub struct Tree {
    members: Vec<rustix::fd::OwnedFd>,
}

impl Tree {
    /// CMD's descendants now ([`graft_proc::descendants`]); one whose pid was
    /// reused between the look-up and its pidfd (its parent is no longer in
    /// the tree) is left out.
    pub fn of(child: &Child) -> Tree {
        let Some(root) = child.id() else {
            return Tree {
                members: Vec::new(),
            };
        };
        let pids = graft_proc::descendants(root);
        let members = pids
            .iter()
            .filter_map(|&pid| {
                let fd = rustix::process::pidfd_open(
                    rustix::process::Pid::from_raw(pid as i32)?,
                    rustix::process::PidfdFlags::empty(),
                )
                .ok()?;
                let parent = graft_proc::parent(pid)?;
                (parent == root || pids.contains(&parent)).then_some(fd)
            })
            .collect();
        Tree { members }
    }

    /// Sends `signal` to every member still running.
    pub fn signal(&self, signal: Signal) {
        let Some(signal) = rustix::process::Signal::from_named_raw(signal as i32) else {
            return;
        };
        for member in &self.members {
            let _ = rustix::process::pidfd_send_signal(member, signal);
        }
    }

    /// Whether every member has exited (its pidfd is readable, pidfd_open(2)).
    fn ended(&self) -> bool {
        use std::os::fd::AsFd;
        let mut fds: Vec<nix::poll::PollFd<'_>> = self
            .members
            .iter()
            .map(|fd| nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN))
            .collect();
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
            Ok(ready) => ready as usize == fds.len(),
            Err(_) => true,
        }
    }

    /// Ends what is left of the tree once CMD has exited: SIGTERM, up to
    /// `grace` (or until `cut` resolves) to exit, then SIGKILL.
    pub async fn end(self, grace: Duration, cut: impl std::future::Future<Output = ()>) {
        if self.members.is_empty() || self.ended() {
            return;
        }
        self.signal(Signal::SIGTERM);
        let wait = async {
            while !self.ended() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            () = wait => return,
            () = tokio::time::sleep(grace) => {}
            () = cut => {}
        }
        self.signal(Signal::SIGKILL);
    }
}

/// Waits up to `grace` for `child` to exit, then kills it; returns its status.
pub async fn wait_or_kill(child: &mut Child, grace: Duration) -> std::io::Result<ExitStatus> {
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            let _ = child.start_kill();
            child.wait().await
        }
    }
}

/// graft's exit code for a finished CMD: its code, or 128 + the signal that
/// killed it, as shells report it.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.wrapping_add(signal as u8),
        (None, None) => 1,
    }
}

/// Whether graft runs in the terminal's foreground process group, where a
/// Ctrl-C reaches every process of the group (CMD included) by itself.
pub fn in_foreground() -> bool {
    nix::unistd::tcgetpgrp(std::io::stdin()).is_ok_and(|pgrp| pgrp == nix::unistd::getpgrp())
}

/// SIGINT, SIGTERM and SIGHUP to graft.
pub struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Registers the handlers.
    ///
    /// # Errors
    ///
    /// A [`Failure`] when tokio cannot register a handler.
    pub fn new() -> Result<Signals, Failure> {
        let register = |kind| {
            tokio::signal::unix::signal(kind)
                .map_err(|e| Failure::session(format!("cannot handle signals: {e}")))
        };
        Ok(Signals {
            interrupt: register(SignalKind::interrupt())?,
            terminate: register(SignalKind::terminate())?,
            hangup: register(SignalKind::hangup())?,
        })
    }

    /// The next of the three signals to arrive.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => Signal::SIGINT,
            _ = self.terminate.recv() => Signal::SIGTERM,
            _ = self.hangup.recv() => Signal::SIGHUP,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGTERM)), 128 + 15);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 128 + 9);
    }

    #[tokio::test]
    async fn a_child_that_ignores_sigterm_is_killed_after_the_grace() {
        use tokio::io::AsyncBufReadExt;
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; echo ignoring; exec sleep 30"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Signal only once the shell ignores SIGTERM.
        let stdout = child.stdout.take().unwrap();
        let line = tokio::io::BufReader::new(stdout)
            .lines()
            .next_line()
            .await
            .unwrap();
        assert_eq!(line.as_deref(), Some("ignoring"));
        signal(&child, Signal::SIGTERM);
        let status = wait_or_kill(&mut child, Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(exit_code(status), 128 + 9);
    }

    #[tokio::test]
    async fn children_started_with_the_hook_run() {
        let mut command = Command::new("sh");
        command.args(["-c", "exit 7"]);
        die_with_parent(&mut command);
        let status = command.spawn().unwrap().wait().await.unwrap();
        assert_eq!(exit_code(status), 7);
    }

    #[tokio::test]
    async fn graft_raises_its_descriptor_limit_and_children_get_the_original() {
        let soft = || graft_proc::soft_nofile_limit().unwrap().to_string();
        let before = soft();
        let hard = raise_nofile().unwrap();
        assert_eq!(soft(), hard.to_string());
        let mut command = Command::new("sh");
        command.args(["-c", "ulimit -Sn"]);
        command.stdout(std::process::Stdio::piped());
        die_with_parent(&mut command);
        let out = command.output().await.unwrap();
        let child = String::from_utf8(out.stdout).unwrap();
        // Another test of this process may have raised it first: then the
        // original is what that one saw, still not necessarily `before`.
        if ORIGINAL_NOFILE.get().is_some() {
            assert_eq!(
                child.trim(),
                ORIGINAL_NOFILE.get().unwrap().rlim_cur.to_string(),
                "before: {before}"
            );
        }
    }
}
