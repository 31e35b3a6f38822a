//! Processes a test starts: each in its own process group, its output collected in
//! the background, every wait bounded by a deadline, and the whole group killed when
//! the handle is dropped, so no test hangs and nothing outlives it.

use std::fmt;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// How long a test server may take to print `listening` ([`Proc::wait_listening`]):
/// a generous functional bound, for a loaded machine.
pub const SERVER_UP: Duration = Duration::from_secs(10);

/// A running process and the output it has written so far.
pub struct Proc {
    child: Child,
    what: String,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `command` in a new process group with stdin closed and stdout and
    /// stderr collected. `what` names it in failure messages.
    ///
    /// # Panics
    ///
    /// When the program cannot be started.
    pub fn spawn(mut command: Command, what: &str) -> Proc {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({command:?}): {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().expect("stdout is piped"), &stdout),
            collect(child.stderr.take().expect("stderr is piped"), &stderr),
        ];
        Proc {
            child,
            what: what.to_owned(),
            stdout,
            stderr,
            readers,
            status: None,
        }
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        if self.status.is_none() {
            let _ = kill(pid_of(self.pid()), signal);
        }
    }

    /// Sends `signal` to the whole process group (what a terminal does on Ctrl-C).
    pub fn signal_group(&self, signal: Signal) {
        let _ = killpg(pid_of(self.pid()), signal);
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits at most `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits at most `timeout` for the process to exit and returns its outcome.
    ///
    /// # Panics
    ///
    /// When it does not exit in time: the process group is killed and the panic
    /// message carries everything it printed.
    pub fn finish(mut self, timeout: Duration) -> Outcome {
        match self.wait_timeout(timeout) {
            Some(status) => self.outcome(status),
            None => {
                self.signal_group(Signal::SIGKILL);
                let status = self.wait_timeout(Duration::from_secs(5));
                panic!(
                    "{} did not finish within {timeout:?} and was killed ({status:?})\n{}",
                    self.what,
                    self.output_report()
                );
            }
        }
    }

    /// What the process has written to stdout so far.
    pub fn stdout(&self) -> String {
        lossy(&self.stdout)
    }

    /// What the process has written to stderr so far.
    pub fn stderr(&self) -> String {
        lossy(&self.stderr)
    }

    /// Waits until the server this process is has printed `listening` on
    /// stdout ([`SERVER_UP`] at most).
    ///
    /// # Panics
    ///
    /// When it exits first or does not listen in time; `what` names it.
    pub fn wait_listening(&mut self, what: &str) {
        let up = crate::net::wait_until(SERVER_UP, Duration::from_millis(50), || {
            if let Some(status) = self.try_status() {
                panic!("{what} exited ({status})\n{}", self.output_report());
            }
            self.stdout().contains("listening").then_some(())
        });
        assert!(
            up.is_some(),
            "{what} did not listen within {SERVER_UP:?}\n{}",
            self.output_report()
        );
    }

    /// stdout and stderr so far, for failure messages.
    pub fn output_report(&self) -> String {
        format!(
            "--- stdout of {what} ---\n{}\n--- stderr of {what} ---\n{}",
            self.stdout(),
            self.stderr(),
            what = self.what
        )
    }

    fn outcome(&mut self, status: ExitStatus) -> Outcome {
        // A grandchild that outlives the process may hold the pipes open: take what
        // arrived within a moment rather than waiting for it.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        Outcome {
            what: self.what.clone(),
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal_group(Signal::SIGKILL);
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How a finished process ended and what it printed.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What ran, for messages.
    pub what: String,
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Outcome {
    /// The exit code (`None` when a signal ended it).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The signal that ended it, if one did.
    pub fn signal(&self) -> Option<i32> {
        self.status.signal()
    }

    /// Returns `self` if it exited with code 0.
    ///
    /// # Panics
    ///
    /// Otherwise, with everything it printed.
    #[track_caller]
    pub fn assert_success(&self) -> &Outcome {
        assert!(self.success(), "{self}");
        self
    }

    /// stdout, trimmed.
    pub fn out(&self) -> &str {
        self.stdout.trim()
    }

    /// stdout's lines, trimmed.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().map(str::trim).collect()
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ended with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `command` to completion with a deadline.
///
/// # Panics
///
/// When it cannot start or does not finish within `timeout`.
pub(crate) fn run(command: Command, what: &str, timeout: Duration) -> Outcome {
    Proc::spawn(command, what).finish(timeout)
}

/// Kills every process (but this one) whose environment holds `key=value`, and
/// returns how many there were.
pub(crate) fn kill_by_env(key: &str, value: &str) -> usize {
    let mut killed = 0;
    for pid in all_pids() {
        let Ok(environ) = graft_proc::environ(pid) else {
            continue;
        };
        if environ.iter().any(|(k, v)| k == key && v == value) {
            let _ = kill(pid_of(pid), Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}

/// The command lines of every process but this one, as `(pid, argv)`.
pub(crate) fn processes() -> Vec<(u32, Vec<String>)> {
    all_pids()
        .into_iter()
        .filter_map(|pid| {
            let argv = graft_proc::cmdline(pid).ok()?;
            Some((pid, argv))
        })
        .collect()
}

/// Sends SIGKILL to `pid`, ignoring a process that is already gone.
pub(crate) fn kill_pid(pid: u32) {
    let _ = kill(pid_of(pid), Signal::SIGKILL);
}

/// Whether a process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    graft_proc::is_running(pid)
}

fn all_pids() -> Vec<u32> {
    let me = std::process::id();
    graft_proc::pids()
        .into_iter()
        .filter(|pid| *pid != me)
        .collect()
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pids fit in an i32"))
}

fn collect(mut from: impl Read + Send + 'static, into: &Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    let into = Arc::clone(into);
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock()
                .expect("no reader panics while holding the lock")
                .extend_from_slice(&buf[..n]);
        }
    })
}

fn lossy(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buf.lock().expect("no reader panics while holding the lock"))
        .into_owned()
}
