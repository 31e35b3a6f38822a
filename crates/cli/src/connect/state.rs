//! The connection's state directory and its control socket.
//!
//! `/run/graft/connect` (mode 0700, root's) holds:
//!
//! - `lock`: an exclusive `flock` the daemon holds for its whole life; the kernel
//!   drops it however the daemon dies, so a free lock means nobody is connected
//!   and anything found is a leftover to repair ([`repair`]);
//! - `graft.pid`, `daemon.log` (the daemon's stderr);
//! - `control.sock` (mode 0600): one JSON object per line each way, a
//!   [`Request`] in and a [`Response`] out; the daemon also checks that the peer
//!   is root (`SO_PEERCRED`), so nobody else can read the status or end it;
//! - `intercepts/NAME.json`: one file per running `graft intercept`.

use std::{
    fs::File,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use super::{TUN_NAME, ranges::Skipped, resolv};
use crate::failure::Failure;

/// The state directory.
pub const STATE_DIR: &str = "/run/graft/connect";

/// A path in the state directory.
pub fn path(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(name)
}

/// The control socket.
pub fn socket() -> PathBuf {
    path("control.sock")
}

/// The directory of the intercepts' files.
pub fn intercepts_dir() -> PathBuf {
    path("intercepts")
}

/// Creates the state directory (0700) if needed.
///
/// # Errors
///
/// It cannot be created or restricted.
pub fn ensure_dir() -> Result<(), Failure> {
    let dir = Path::new(STATE_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| Failure::session(format!("cannot create {STATE_DIR}: {e}")))
}

/// Takes the connection's lock without waiting; `None` when a daemon holds it.
///
/// # Errors
///
/// The lock file cannot be opened.
pub fn try_lock() -> Result<Option<Flock<File>>, Failure> {
    ensure_dir()?;
    let lock = path("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(|e| Failure::session(format!("cannot open {}: {e}", lock.display())))?;
    Ok(Flock::lock(file, FlockArg::LockExclusiveNonblock).ok())
}

/// [`try_lock`], retried for up to `wait`: a daemon that was just killed holds
/// the lock until its last thread is gone.
///
/// # Errors
///
/// As [`try_lock`].
pub async fn lock_within(wait: Duration) -> Result<Option<Flock<File>>, Failure> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Some(lock) = try_lock()? {
            return Ok(Some(lock));
        }
        if std::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one `graft intercept` wrote about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterceptEntry {
    /// Its name (`graft leave NAME`).
    pub name: String,
    /// The `graft intercept` process.
    pub pid: u32,
    /// The target as written.
    pub target: String,
    /// The target's port.
    pub remote_port: u16,
    /// The local port its traffic reaches.
    pub local_port: u16,
    /// `steal` or `mirror`.
    pub mode: String,
    /// The filter, as given, when there is one.
    pub filter: Option<String>,
}

/// The running intercepts (files of dead processes are removed).
pub fn intercepts() -> Vec<InterceptEntry> {
    let Ok(entries) = std::fs::read_dir(intercepts_dir()) else {
        return Vec::new();
    };
    let mut list: Vec<InterceptEntry> = entries
        .flatten()
        .filter_map(|entry| {
            let text = std::fs::read(entry.path()).ok()?;
            let Ok(intercept) = serde_json::from_slice::<InterceptEntry>(&text) else {
                let _ = std::fs::remove_file(entry.path());
                return None;
            };
            if graft_proc::exists(intercept.pid) {
                Some(intercept)
            } else {
                let _ = std::fs::remove_file(entry.path());
                None
            }
        })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    list
}

/// What `graft status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's pid.
    pub pid: u32,
    /// The target as written (`targetless`, `pid:1234`, `deploy/api`).
    pub target: String,
    /// The kubeconfig context, for a cluster.
    pub context: Option<String>,
    /// The namespace, for a cluster.
    pub namespace: Option<String>,
    /// The tun device.
    pub tun: String,
    /// The DNS server's address (on the tun).
    pub dns_address: std::net::IpAddr,
    /// How the machine's resolver is pointed at it.
    pub dns_mode: resolv::DnsMode,
    /// The search domains added.
    pub search: Vec<String>,
    /// Domains answered by the target (routing domains).
    pub domains: Vec<String>,
    /// Ranges routed to the tun.
    pub ranges: Vec<IpNet>,
    /// Ranges not routed, and why.
    pub skipped: Vec<Skipped>,
    /// What could not be found out.
    pub notes: Vec<String>,
    /// When the connection came up (seconds since the Unix epoch).
    pub since: u64,
    /// The running intercepts.
    #[serde(default)]
    pub intercepts: Vec<InterceptEntry>,
}

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// What is connected.
    Status,
    /// Disconnect: restore DNS, remove the tun and routes, end the session.
    Quit,
}

/// A control response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    /// The answer to [`Request::Status`].
    Status(Box<Status>),
    /// [`Request::Quit`] is done: everything is restored.
    Quit {
        /// What the restoring said (e.g. a resolv.conf someone else rewrote).
        notes: Vec<String>,
    },
    /// The request was refused.
    Error(String),
}

/// Sends one request to the daemon and reads its answer. `None`: no daemon
/// answers (no socket, or nobody behind it).
///
/// # Errors
///
/// The daemon answered with something unreadable, or refused access.
pub async fn ask(request: &Request, timeout: Duration) -> Result<Option<Response>, Failure> {
    let stream = match UnixStream::connect(socket()).await {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(Failure::usage(format!(
                "cannot reach graft connect's control socket {}: {e}",
                socket().display()
            ))
            .hint("graft connect runs as root: use sudo"));
        }
        Err(_) => return Ok(None),
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request).expect("a request serialises");
    line.push('\n');
    if write.write_all(line.as_bytes()).await.is_err() {
        return Ok(None);
    }
    let mut lines = BufReader::new(read).lines();
    match tokio::time::timeout(timeout, lines.next_line()).await {
        Ok(Ok(Some(answer))) => serde_json::from_str(&answer).map(Some).map_err(|e| {
            Failure::session(format!("graft connect answered something unreadable: {e}"))
        }),
        Ok(_) => Ok(None),
        Err(_) => Err(Failure::session(format!(
            "graft connect did not answer within {} s",
            timeout.as_secs()
        ))
        .hint("look at /run/graft/connect/daemon.log; `graft quit` repairs once it is gone")),
    }
}

/// Puts back what a connection that is gone left (its lock must be held):
/// `/etc/resolv.conf` from its backup, the tun device (and with it its routes
/// and its systemd-resolved settings), stale files. Returns what was repaired.
pub fn repair() -> Vec<String> {
    let mut repaired = Vec::new();
    match resolv::Managed::system().restore() {
        Ok(resolv::Restored::Original) => {
            repaired.push(format!("restored {} from its backup", resolv::RESOLV_CONF))
        }
        Ok(resolv::Restored::LeftTheirs) => repaired.push(format!(
            "left {} as someone else rewrote it, removed graft's backup",
            resolv::RESOLV_CONF
        )),
        Ok(resolv::Restored::NothingSaved) => {}
        Err(e) => repaired.push(format!(
            "could not restore {} ({e}); its original is in {}",
            resolv::RESOLV_CONF,
            resolv::BACKUP_DIR
        )),
    }
    if Path::new("/sys/class/net").join(TUN_NAME).exists() {
        let deleted = std::process::Command::new("ip")
            .args(["link", "del", TUN_NAME])
            .status()
            .is_ok_and(|s| s.success());
        repaired.push(if deleted {
            format!("removed the tun device {TUN_NAME} and its routes")
        } else {
            format!("could not remove the tun device {TUN_NAME}: remove it with `ip link del {TUN_NAME}`")
        });
    }
    for stale in ["control.sock", "daemon.pid"] {
        let _ = std::fs::remove_file(path(stale));
    }
    repaired
}
