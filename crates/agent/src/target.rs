//! Watching the target process: the session ends when it exits.
//!
//! A pidfd (opened at startup, so a recycled PID cannot fool it) becomes readable
//! when the process exits; where pidfds are unavailable (Linux < 5.3) `/proc/PID`
//! is polled every 200 ms instead.

use std::os::fd::OwnedFd;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// How often `/proc/PID` is polled without a pidfd.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Opens a pidfd for `pid`, if the kernel supports it.
pub fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// Whether `pid` is gone or a zombie, judged from `/proc`.
pub fn is_gone(pid: u32) -> bool {
    !graft_proc::is_running(pid)
}

/// Resolves when the target process has exited.
///
/// # Cancel safety
///
/// Cancel safe: dropping the future only stops watching.
#[allow(unsafe_code)]
pub async fn exited(pid: u32, pidfd: Option<OwnedFd>) {
    if let Some(fd) = pidfd {
        // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor stays
        // open, and is not reused for another file, for as long as it is registered.
        match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
            Ok(fd) => {
                let _ = fd.readable().await;
                return;
            }
            Err(e) => tracing::debug!("cannot watch the pidfd ({e}); polling /proc"),
        }
    }
    while !is_gone(pid) {
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notices_a_child_exit_with_and_without_pidfd() {
        for use_pidfd in [true, false] {
            let mut child = std::process::Command::new("sleep")
                .arg("0.3")
                .spawn()
                .unwrap();
            let pid = child.id();
            assert!(!is_gone(pid));
            let pidfd = if use_pidfd { open_pidfd(pid) } else { None };
            tokio::time::timeout(Duration::from_secs(5), exited(pid, pidfd))
                .await
                .expect("exit not noticed");
            // Not reaped yet: a zombie counts as gone.
            assert!(is_gone(pid));
            child.wait().unwrap();
        }
    }
}
