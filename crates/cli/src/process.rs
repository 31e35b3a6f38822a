//! Child processes: dying with graft, stopping them, and reading their exit.
//!
//! The only `unsafe` of the binary is here: the `pre_exec` hook that asks the
//! kernel to send SIGTERM to a child when graft dies, so neither CMD nor the agent
//! outlives a `kill -9` of graft. `PR_SET_PDEATHSIG` fires when the *thread* that
//! forked the child exits, so children are spawned from the main thread (the main
//! future of `#[tokio::main]` runs there).

use std::{os::unix::process::ExitStatusExt, process::ExitStatus, time::Duration};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::process::{Child, Command};

/// Makes the child receive SIGTERM when graft dies.
#[allow(unsafe_code)]
pub fn die_with_parent(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the hook runs between fork and exec and calls only prctl and getppid,
    // both async-signal-safe; it allocates nothing (the error is a raw OS error).
    unsafe {
        command.pre_exec(move || {
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

/// Sends `signal` to `child` if it is still running.
pub fn signal(child: &Child, signal: Signal) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), signal);
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
}
