//! What the layer remembers about the program's file descriptors.
//!
//! Only descriptors the layer made special are here: relayed sockets (their real
//! peer is a proxy relay, the program must see the remote address), stolen
//! listeners, UDP sockets with relays, remote files and directories. Every entry
//! records the inode of the open file it was made for, and [`get`] drops an entry
//! whose descriptor now refers to something else (closed behind our back by a path
//! we do not hook, e.g. `fclose` of a local file or `close_range`, and reused).
//!
//! [`is_empty`] is one atomic load: hooks that only care about special
//! descriptors (`close`, `dup`, `getpeername`, `recvfrom`) return to libc at once
//! while the table is empty.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::raw::c_int,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use graft_protocol::remote::{FileHandle, FileStat};

/// A special descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdKind {
    /// A TCP socket bound for stealing, not yet listening.
    Bound {
        /// The target port to steal (after `--port-map`).
        remote_port: u16,
        /// The address to report from `getsockname` when the real bind had to
        /// take another port (the asked one was busy locally).
        fake_local: Option<SocketAddr>,
    },
    /// A listening TCP socket whose target port is stolen.
    Listener {
        /// The stolen target port.
        remote_port: u16,
        /// As in [`FdKind::Bound`].
        fake_local: Option<SocketAddr>,
    },
    /// A socket whose real peer is a proxy relay: an outgoing TCP connection or
    /// connected UDP flow, or an accepted stolen connection.
    Relayed {
        /// The address the program believes it talks to.
        peer: SocketAddr,
        /// The address the program's end has on the target side.
        local: SocketAddr,
        /// The proxy relay the socket is really connected to.
        relay: SocketAddr,
    },
    /// A socket the agent passed (a local target): the target's own outgoing or
    /// stolen TCP connection, whose real addresses the program sees.
    Passed {
        /// The peer the program connected to, or the stolen connection's client.
        peer: SocketAddr,
        /// For a stolen connection, the target address its client connected
        /// to, shown by `getsockname` (the socket's real one is the agent's
        /// redirect listener's port); `None`: the real one.
        shown_local: Option<SocketAddr>,
        /// Only the program holds the socket (it accepted the connection from
        /// a direct listener itself): its last `close` ends it and its
        /// `epoll` registrations, as epoll(7) has it, and the layer needs no
        /// bookkeeping for them (`socket::epoll`). `false` for a socket the agent passed, whose
        /// sender may still hold its own descriptor when the program closes.
        sole: bool,
    },
    /// An unconnected UDP socket that sent to remote destinations.
    UdpRelays {
        /// `(remote destination, proxy relay)` pairs.
        relays: Vec<(SocketAddr, SocketAddr)>,
    },
    /// A remote file, read into a memfd.
    RemoteFile(RemoteFile),
    /// A remote directory opened with `open` (a placeholder fd, for `fdopendir`
    /// and `openat`-relative lookups).
    RemoteDir {
        /// Absolute path in the target.
        path: String,
    },
}

/// A remote file held in a memfd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// Absolute path in the target.
    pub path: String,
    /// The target's metadata at open time (for `fstat`).
    pub stat: FileStat,
    /// With `--fs write` and a file opened for writing: the agent's handle the
    /// memfd is written back to on `close`, `fclose` and `fsync`.
    pub writeback: Option<FileHandle>,
}

#[derive(Debug, Clone)]
struct Entry {
    ino: u64,
    kind: FdKind,
}

/// The entries by descriptor, and how many descriptors each recorded open
/// file has, so that [`has_duplicate`] is a lookup, not a walk of every entry
/// at each `close` (a server with 1000 passed connections closes often).
struct Table {
    by_fd: BTreeMap<c_int, Entry>,
    by_ino: BTreeMap<u64, usize>,
}

impl Table {
    /// Records `entry` at `fd`, replacing what was there.
    fn put(&mut self, fd: c_int, entry: Entry) {
        *self.by_ino.entry(entry.ino).or_default() += 1;
        if let Some(old) = self.by_fd.insert(fd, entry) {
            self.forget_ino(old.ino);
        }
        COUNT.store(self.by_fd.len(), Ordering::Relaxed);
    }

    /// Removes `fd`'s entry.
    fn take(&mut self, fd: c_int) -> Option<Entry> {
        let entry = self.by_fd.remove(&fd)?;
        self.forget_ino(entry.ino);
        COUNT.store(self.by_fd.len(), Ordering::Relaxed);
        Some(entry)
    }

    fn forget_ino(&mut self, ino: u64) {
        if let Some(n) = self.by_ino.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                self.by_ino.remove(&ino);
            }
        }
    }
}

static TABLE: Mutex<Table> = Mutex::new(Table {
    by_fd: BTreeMap::new(),
    by_ino: BTreeMap::new(),
});
static COUNT: AtomicUsize = AtomicUsize::new(0);

fn table() -> std::sync::MutexGuard<'static, Table> {
    // A panic while holding the lock is caught at the hook boundary; the map is
    // still consistent (every mutation is a single insert/remove), so recover it.
    TABLE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn inode(fd: c_int) -> Option<u64> {
    // SAFETY: stat is plain old data; fstat writes it fully on success.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer; the real fstat has no other preconditions.
    let rc = unsafe { real!(fstat(fd, &mut st): fn(c_int, *mut libc::stat) -> c_int) };
    (rc == 0).then_some(st.st_ino)
}

/// Whether no descriptor is special (one atomic load).
#[inline]
pub fn is_empty() -> bool {
    COUNT.load(Ordering::Relaxed) == 0
}

/// The entry for `fd`, if it still refers to the file it was recorded for.
pub fn get(fd: c_int) -> Option<FdKind> {
    if is_empty() {
        return None;
    }
    let entry = table().by_fd.get(&fd).cloned()?;
    if inode(fd) == Some(entry.ino) {
        Some(entry.kind)
    } else {
        remove(fd);
        None
    }
}

/// Whether `fd` is recorded as a socket the program holds alone
/// ([`FdKind::Passed`] with `sole`), without checking that it still refers to
/// that socket (no system call): for hooks that only skip work on such a
/// socket, where a stale entry costs nothing.
pub fn is_sole(fd: c_int) -> bool {
    !is_empty()
        && matches!(
            table().by_fd.get(&fd),
            Some(Entry {
                kind: FdKind::Passed { sole: true, .. },
                ..
            })
        )
}

/// Records `fd` as `kind`.
pub fn insert(fd: c_int, kind: FdKind) {
    let Some(ino) = inode(fd) else { return };
    table().put(fd, Entry { ino, kind });
}

/// Forgets `fd`, returning what it was.
pub fn remove(fd: c_int) -> Option<FdKind> {
    if is_empty() {
        return None;
    }
    table().take(fd).map(|e| e.kind)
}

/// Changes the entry of `fd` in place, if there is one.
pub fn update(fd: c_int, f: impl FnOnce(&mut FdKind)) {
    if let Some(entry) = table().by_fd.get_mut(&fd) {
        f(&mut entry.kind);
    }
}

/// `new` is now a duplicate of `old` (after `dup`, `dup2`, `dup3`, `F_DUPFD`).
pub fn duplicate(old: c_int, new: c_int) {
    if is_empty() {
        return;
    }
    let mut t = table();
    match t.by_fd.get(&old).cloned() {
        Some(entry) => t.put(new, entry),
        None => {
            t.take(new);
        }
    }
}

/// Whether another descriptor than `fd` is recorded with the same open file
/// (a duplicate), so closing `fd` does not end it.
pub fn has_duplicate(fd: c_int) -> bool {
    let t = table();
    let Some(ino) = t.by_fd.get(&fd).map(|e| e.ino) else {
        return false;
    };
    t.by_ino.get(&ino).is_some_and(|&n| n > 1)
}
