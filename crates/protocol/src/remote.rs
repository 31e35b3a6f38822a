//! Operations the agent performs in the target's world for the layer: name
//! resolution, files and the environment.
//!
//! The layer sends a [`RemoteRequest`] to the proxy, which forwards it on the link
//! with a [`crate::RequestId`] and hands the [`RemoteResponse`] back unchanged.
//!
//! Errors carry Linux `errno` numbers (`asm-generic/errno-base.h` and `errno.h`), so
//! the layer can return them to the program as the syscall would have.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Identifies a file the agent holds open for a session.
pub type FileHandle = u64;

/// A request the agent answers with one [`RemoteResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteRequest {
    /// The target process's environment (`/proc/PID/environ`).
    /// Answered with [`RemoteResponse::Env`].
    Env,
    /// Resolve `host` with the target's `/etc/hosts` and `/etc/resolv.conf`.
    /// Answered with [`RemoteResponse::Resolved`] or an error
    /// ([`RemoteError::NoName`], [`RemoteError::TryAgain`], ...).
    Resolve {
        /// The name to resolve (never a numeric address: the layer answers those).
        host: String,
        /// Which address families the caller wants.
        family: AddressFamily,
    },
    /// Open `path` (absolute, inside the target's root). Answered with
    /// [`RemoteResponse::Opened`].
    Open {
        /// Absolute path as the target sees it.
        path: String,
        /// How to open it.
        flags: OpenFlags,
        /// Permission bits for a created file (as `open(2)`'s `mode`).
        mode: u32,
    },
    /// Read up to `len` bytes (at most [`crate::codec::MAX_CHUNK_LEN`]) at `offset`.
    /// Answered with [`RemoteResponse::Data`].
    Read {
        /// From an earlier [`RemoteResponse::Opened`].
        handle: FileHandle,
        /// Byte offset in the file.
        offset: u64,
        /// Most bytes to return.
        len: u32,
    },
    /// Write `data` at `offset`. Answered with [`RemoteResponse::Written`].
    Write {
        /// From an earlier [`RemoteResponse::Opened`] opened for writing.
        handle: FileHandle,
        /// Byte offset in the file.
        offset: u64,
        /// The bytes (at most [`crate::codec::MAX_CHUNK_LEN`]).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Set the file's length in bytes. Answered with [`RemoteResponse::Done`].
    Truncate {
        /// From an earlier [`RemoteResponse::Opened`] opened for writing.
        handle: FileHandle,
        /// New length in bytes.
        len: u64,
    },
    /// Close a handle. Answered with [`RemoteResponse::Done`].
    Close {
        /// The handle to close.
        handle: FileHandle,
    },
    /// `stat` (`follow`) or `lstat` a path. Answered with [`RemoteResponse::Stat`].
    Stat {
        /// Absolute path as the target sees it.
        path: String,
        /// Follow a symlink in the last component (`stat`) or not (`lstat`).
        follow: bool,
    },
    /// List a directory, without `.` and `..`. Answered with [`RemoteResponse::Dir`].
    ReadDir {
        /// Absolute path as the target sees it.
        path: String,
    },
    /// `access(2)` on a path, `mode` being `F_OK` or a mask of `R_OK | W_OK | X_OK`.
    /// Answered with [`RemoteResponse::Done`] or an error.
    Access {
        /// Absolute path as the target sees it.
        path: String,
        /// The `access(2)` mode.
        mode: i32,
    },
    /// Create a directory. Answered with [`RemoteResponse::Done`].
    MkDir {
        /// Absolute path as the target sees it.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// Remove a file (`unlink`) or an empty directory (`rmdir` when `dir`).
    /// Answered with [`RemoteResponse::Done`].
    Remove {
        /// Absolute path as the target sees it.
        path: String,
        /// Remove a directory rather than a file.
        dir: bool,
    },
    /// Rename a file. Answered with [`RemoteResponse::Done`].
    Rename {
        /// Absolute source path as the target sees it.
        from: String,
        /// Absolute destination path as the target sees it.
        to: String,
    },
    /// Read a symlink's target. Answered with [`RemoteResponse::Link`].
    ReadLink {
        /// Absolute path as the target sees it.
        path: String,
    },
    /// Open `path` read-only and return its metadata and its first
    /// [`crate::codec::MAX_CHUNK_LEN`] bytes in one round trip (the common case of
    /// a program reading a small file). Answered with [`RemoteResponse::File`].
    /// A directory is answered with its metadata and no data.
    ReadFile {
        /// Absolute path as the target sees it.
        path: String,
        /// `O_NOFOLLOW`: fail with `ELOOP` on a symlink in the last component.
        no_follow: bool,
    },
    /// List every session's subscriptions on this target (`graft ls`), the
    /// asking session's own included. Answered with [`RemoteResponse::Sessions`].
    Sessions,
    /// Open the regular file `path` (absolute, inside the target's root) and pass
    /// its descriptor itself, on a link that passes descriptors (a local target,
    /// both peers naming [`crate::version::FEATURE_FDS`]; see [`crate::fdpass`]).
    /// Answered with [`RemoteResponse::FdOpened`] and the descriptor beside it, or
    /// [`RemoteError::Unsupported`] (not a regular file, or the link passes no
    /// descriptors: use [`RemoteRequest::Open`]), or the open's error.
    OpenFd {
        /// Absolute path as the target sees it.
        path: String,
        /// How to open it.
        flags: OpenFlags,
        /// Permission bits for a created file (as `open(2)`'s `mode`).
        mode: u32,
    },
    /// Start a TCP connection from the target's network namespace to `remote` and
    /// pass the socket itself, on a link that passes descriptors (as
    /// [`RemoteRequest::OpenFd`]). The socket is non-blocking and its connect may
    /// still be in progress (connect(2), `EINPROGRESS`): its outcome is the
    /// socket's `SO_ERROR` once it is writable, as for any non-blocking connect.
    /// Answered with [`RemoteResponse::FdConnected`] and the socket beside it, or
    /// [`RemoteError::Unsupported`] (the link passes no descriptors: use
    /// `ClientMessage::Connect`), or [`RemoteError::Os`] with `EACCES` for a
    /// destination the agent never connects a passed socket to (the target's
    /// loopback, an unspecified, multicast or broadcast address, port 0), or the
    /// connect's immediate error.
    ConnectFd {
        /// The destination, in the family of the program's socket (an
        /// IPv4-mapped IPv6 address for an IPv6 socket reaching IPv4).
        remote: std::net::SocketAddr,
    },
    /// Where the target's root is, for a program on the same machine that may
    /// open it itself: answered with [`RemoteResponse::TargetRoot`] on a link that
    /// passes descriptors (a local target), [`RemoteError::Unsupported`]
    /// elsewhere. Nothing is opened or passed: the layer opens
    /// `/proc/PID/root` with the program's own credentials (the kernel's ptrace
    /// access check, proc(5)) and resolves remote paths below it itself, and
    /// compares the identity to make sure it opened the root the agent uses.
    TargetRoot,
}

/// The answer to one [`RemoteRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteResponse {
    /// The target's environment, in `/proc/PID/environ` order. Names and values that
    /// are not UTF-8 are converted lossily.
    Env(Vec<(String, String)>),
    /// The addresses `host` resolved to, in resolver order.
    Resolved {
        /// The addresses; never empty (an empty answer is [`RemoteError::NoName`]).
        addrs: Vec<IpAddr>,
        /// The canonical name, when the resolver gave one.
        canonical: Option<String>,
    },
    /// A file opened; its metadata at open time.
    Opened {
        /// Handle for later requests.
        handle: FileHandle,
        /// Metadata of the opened file.
        stat: FileStat,
    },
    /// Bytes read; fewer than asked (possibly none) only at end of file.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Bytes written.
    Written(u64),
    /// The operation succeeded and has nothing to return.
    Done,
    /// Metadata of a path.
    Stat(FileStat),
    /// The entries of a directory.
    Dir(Vec<DirEntry>),
    /// A symlink's target.
    Link(String),
    /// The operation failed.
    Error(RemoteError),
    /// The answer to [`RemoteRequest::ReadFile`].
    File {
        /// Metadata of the opened file.
        stat: FileStat,
        /// The file's first bytes (all of it when `rest` is `None`).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// When the file is longer than `data`: a handle, open for reading, for
        /// the rest ([`RemoteRequest::Read`] from offset `data.len()`), to be
        /// closed with [`RemoteRequest::Close`].
        rest: Option<FileHandle>,
    },
    /// The answer to [`RemoteRequest::Sessions`], oldest subscription first.
    Sessions(Vec<crate::incoming::SessionListing>),
    /// The answer to [`RemoteRequest::OpenFd`]: the file's descriptor travels
    /// beside this frame ([`crate::fdpass`]).
    FdOpened {
        /// Metadata of the opened file.
        stat: FileStat,
    },
    /// The answer to [`RemoteRequest::ConnectFd`]: the socket travels beside
    /// this frame ([`crate::fdpass`]).
    FdConnected,
    /// The answer to [`RemoteRequest::TargetRoot`]: the target's process as this
    /// machine numbers it and the identity of the root directory the agent
    /// resolves every path in.
    TargetRoot(RootIdentity),
}

/// Which directory, on which mount, a process's root is: what `statx(2)` says of
/// `/proc/PID/root` (`STATX_INO`, and `STATX_MNT_ID_UNIQUE` where the kernel has
/// it, Linux 6.8, else `STATX_MNT_ID`). Equal identities mean the same directory
/// seen through the same mount, so paths resolve below it alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootIdentity {
    /// The target's process id, in the pid namespace of the agent (a local
    /// agent shares graft's).
    pub pid: u32,
    /// `stx_dev_major << 32 | stx_dev_minor`.
    pub dev: u64,
    /// `stx_ino`.
    pub ino: u64,
    /// `stx_mnt_id`.
    pub mnt_id: u64,
}

/// Why a remote operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RemoteError {
    /// A system call failed with this Linux `errno`.
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Os(i32),
    /// The name does not exist (`EAI_NONAME`).
    #[error("name not known")]
    NoName,
    /// The name server did not answer in time or failed temporarily (`EAI_AGAIN`).
    #[error("temporary failure in name resolution")]
    TryAgain,
    /// The request is not supported by this agent or for this target.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// Anything else, with a message for the log.
    #[error("{0}")]
    Other(String),
}

/// Which address families a [`RemoteRequest::Resolve`] wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddressFamily {
    /// IPv4 and IPv6 (`AF_UNSPEC`).
    Any,
    /// IPv4 only (`AF_INET`).
    V4,
    /// IPv6 only (`AF_INET6`).
    V6,
}

/// How to open a remote file: the meaningful bits of `open(2)`'s `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OpenFlags {
    /// Open for reading.
    pub read: bool,
    /// Open for writing.
    pub write: bool,
    /// `O_CREAT`.
    pub create: bool,
    /// `O_EXCL`.
    pub exclusive: bool,
    /// `O_TRUNC`.
    pub truncate: bool,
    /// `O_APPEND`.
    pub append: bool,
    /// `O_DIRECTORY`.
    pub directory: bool,
    /// `O_NOFOLLOW`.
    pub no_follow: bool,
}

impl OpenFlags {
    /// Read-only, the common case.
    pub const READ: OpenFlags = OpenFlags {
        read: true,
        write: false,
        create: false,
        exclusive: false,
        truncate: false,
        append: false,
        directory: false,
        no_follow: false,
    };
}

/// File metadata, the fields of `struct stat` (see `stat(2)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FileStat {
    /// Device id.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// File type and permission bits (`st_mode`).
    pub mode: u32,
    /// Hard links.
    pub nlink: u64,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Device id of a special file.
    pub rdev: u64,
    /// Size in bytes.
    pub size: u64,
    /// Preferred I/O block size in bytes.
    pub blksize: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    /// Last access: seconds since the epoch.
    pub atime: i64,
    /// Last access: nanoseconds.
    pub atime_nsec: i64,
    /// Last modification: seconds since the epoch.
    pub mtime: i64,
    /// Last modification: nanoseconds.
    pub mtime_nsec: i64,
    /// Last status change: seconds since the epoch.
    pub ctime: i64,
    /// Last status change: nanoseconds.
    pub ctime_nsec: i64,
}

/// Builds a [`FileStat`] from a kernel `struct stat` of any binding (libc's
/// `stat64`, rustix's `Stat`): any value with the `st_*` fields of `stat(2)`.
/// One conversion for the agent's answers and the layer's direct `stat`, so
/// both give the program the same metadata.
#[macro_export]
macro_rules! file_stat_of {
    ($st:expr) => {{
        let st = $st;
        // Field types differ between bindings and architectures; a cast may
        // be a no-op.
        #[allow(clippy::unnecessary_cast)]
        let stat = $crate::remote::FileStat {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            mode: st.st_mode as u32,
            nlink: st.st_nlink as u64,
            uid: st.st_uid as u32,
            gid: st.st_gid as u32,
            rdev: st.st_rdev as u64,
            size: st.st_size as u64,
            blksize: st.st_blksize as u64,
            blocks: st.st_blocks as u64,
            atime: st.st_atime as i64,
            atime_nsec: st.st_atime_nsec as i64,
            mtime: st.st_mtime as i64,
            mtime_nsec: st.st_mtime_nsec as i64,
            ctime: st.st_ctime as i64,
            ctime_nsec: st.st_ctime_nsec as i64,
        };
        stat
    }};
}

impl FileStat {
    /// Whether this is a directory (`S_ISDIR`).
    pub fn is_dir(&self) -> bool {
        self.mode & 0o170000 == 0o040000
    }
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// The entry's name (lossy if not UTF-8).
    pub name: String,
    /// Inode number.
    pub ino: u64,
    /// `d_type` as in `readdir(3)` (`DT_REG` = 8, `DT_DIR` = 4, `DT_LNK` = 10, ...).
    pub kind: u8,
}
