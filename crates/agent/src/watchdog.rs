//! The watchdog: a child process, forked before the agent starts any thread, that
//! removes the agent's iptables rules once the agent is gone, however it died.
//!
//! Only the iptables backend needs it (the kernel removes an nf_tables owner
//! table by itself, see [`crate::rules::nft`]). The agent keeps the only write
//! end of a pipe; the watchdog blocks reading the read end. The agent writes one
//! byte naming the iptables flavour before it writes its first rule
//! ([`announce`]), and `D` once it has removed its rules itself ([`Watchdog::done`]).
//! When the agent exits for any reason, `kill -9` included, the kernel closes
//! the write end, the watchdog's `read` returns 0, and unless it was told `D` it
//! runs the cleanup commands of [`crate::rules::iptables::cleanup_commands`] in
//! the target's network namespace (the agent forks it after entering it), then
//! exits.
//!
//! The watchdog starts a session of its own (`setsid`), so a signal to the
//! agent's process group (`kill -9 -PGID`, a terminal's Ctrl-C) does not reach
//! it, and it ignores `SIGINT`, `SIGTERM` and `SIGHUP`. What kills the agent's
//! whole container or cgroup kills the watchdog too; the agent's rules lock
//! ([`crate::rules::stale`]), which the watchdog inherits, then tells the next
//! agent that the chain is stale.
#![allow(unsafe_code)]

use std::os::fd::OwnedFd;
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::unistd::{ForkResult, Pid, fork, pipe2, read, write};

use crate::rules::iptables::{self, Flavour};

/// The byte that says the agent removed its rules itself.
const DONE: u8 = b'D';

/// The pipe's write end, for [`announce`]; closed when the process exits.
static ALIVE: OnceLock<OwnedFd> = OnceLock::new();

/// The agent's end of the watchdog.
#[derive(Debug)]
pub struct Watchdog {
    /// The watchdog's PID.
    pid: Pid,
}

impl Watchdog {
    /// The watchdog process's PID.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Tells the watchdog that the agent removed its rules: it exits without
    /// running any command once the agent is gone.
    pub fn done(self) {
        if let Some(fd) = ALIVE.get() {
            let _ = write(fd, &[DONE]);
        }
    }
}

/// Tells the watchdog which iptables flavour the agent writes rules with; the
/// agent calls it before its first rule. Does nothing without a watchdog.
pub fn announce(flavour: Flavour) {
    if let Some(fd) = ALIVE.get() {
        let _ = write(fd, &[flavour.to_byte()]);
    }
}

/// Why the watchdog could not be started.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    /// `pipe2` failed.
    #[error("could not create the watchdog's pipe: {0}")]
    Pipe(Errno),
    /// `fork` failed.
    #[error("could not fork the watchdog process: {0}")]
    Fork(Errno),
}

/// Forks the watchdog, which removes the iptables chain `chain` of the calling
/// thread's network namespace once the calling process is gone.
///
/// Must be called while the process has a single thread, after it entered the
/// target's network namespace and took the rules lock.
///
/// # Errors
///
/// [`WatchdogError`] when the pipe or the fork fails.
pub fn spawn(chain: &str) -> Result<Watchdog, WatchdogError> {
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
            let _ = ALIVE.set(write_end);
            Ok(Watchdog { pid: child })
        }
        ForkResult::Child => {
            drop(write_end);
            let code = watch(chain, read_end);
            std::process::exit(code);
        }
    }
}

/// The watchdog's whole life; returns its exit code.
fn watch(chain: &str, alive: OwnedFd) -> i32 {
    // Out of the agent's process group and session: `kill -PGID` spares it.
    let _ = nix::unistd::setsid();
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
    let mut flavour = None;
    let mut done = false;
    let mut byte = [0u8; 1];
    loop {
        match read(&alive, &mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == DONE => done = true,
            Ok(_) => flavour = Flavour::from_byte(byte[0]).or(flavour),
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    if !done {
        if let Some(flavour) = flavour {
            iptables::cleanup_blocking(flavour, chain);
        }
        // The client-address rules (mangle chain, policy route) are iptables and
        // `ip rule` whatever the redirect backend.
        crate::transparent::cleanup_blocking(chain);
        tracing::debug!(chain, "watchdog: agent gone, packet rules removed");
    }
    0
}
