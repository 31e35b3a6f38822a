//! File hooks: paths the rules make remote (see [`graft_config::fs`]) are opened,
//! stat'ed and listed in the target's root through the agent.
//!
//! * `open` and every alias: the whole remote file is read (in
//!   [`MAX_CHUNK_LEN`] chunks) into a `memfd`, which is what the program gets; so
//!   `read`, `pread`, `readv`, `lseek`, `mmap` and stdio need no hook and
//!   byte-by-byte readers run at memory speed. A read-only (write-only) open gets a
//!   read-only (write-only) descriptor of the memfd, reopened through
//!   `/proc/self/fd`, so a stray `write` fails with `EBADF` as on the real file.
//! * `--fs read` (default): opens that would write (`O_WRONLY`, `O_RDWR`,
//!   `O_CREAT`, `O_TRUNC`) and `mkdir`/`unlink`/`rename`/`rmdir` stay local.
//! * `--fs write`: those are opened remotely too; the agent's handle is kept and
//!   the memfd is written back (truncate + chunks) on `close`, `fclose`, `fsync`.
//! * a remote directory opened with `open` is a placeholder memfd recorded as
//!   [`FdKind::RemoteDir`] (for `fstat`, `fdopendir` and `*at` calls relative to
//!   it); `opendir` returns a fake `DIR*` of our own, told apart from libc's by a
//!   registry of live pointers.
//! * the `stat` family fills `struct stat`/`stat64`/`statx` from the agent's
//!   metadata; on a remote file's descriptor it reports the memfd's current size.
//!
//! Every export first takes a fast path that needs no lock and no allocation:
//! files off, a null path, or a relative path against the working directory go
//! straight to libc.

use std::{
    collections::HashSet,
    ffi::{CStr, CString},
    os::raw::{c_char, c_int, c_long, c_uint},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use graft_config::{FsMode, fs::normalize};
use graft_protocol::{
    codec::MAX_CHUNK_LEN,
    remote::{
        DirEntry, FileHandle, FileStat, OpenFlags, RemoteError, RemoteRequest, RemoteResponse,
    },
};
use libc::{DIR, FILE, dirent, dirent64, mode_t, size_t, ssize_t};

use crate::{
    client,
    fds::{self, FdKind, RemoteFile},
    guard::{self, hooked, set_errno},
    local_writes, state,
};

// ---------------------------------------------------------------- helpers

/// The `errno` a failed remote operation gives the program.
fn errno_of(e: &RemoteError) -> i32 {
    match e {
        RemoteError::Os(errno) => *errno,
        _ => libc::EIO,
    }
}

/// One remote operation; errors as `errno`.
fn call(request: RemoteRequest) -> Result<RemoteResponse, i32> {
    let what = format!("{request:?}");
    match client::remote(request) {
        Ok(r) => Ok(r),
        Err(e) => {
            layer_log!(debug, "{what:.200} failed: {e}");
            Err(errno_of(&e))
        }
    }
}

fn unexpected(what: &str, r: RemoteResponse) -> i32 {
    layer_log!(error, "unexpected answer to {what}: {r:?}");
    libc::EIO
}

/// `Ok(v)` → `v`; `Err(e)` → `errno = e`, `-1`.
fn ret<T: From<i8>>(r: Result<T, i32>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => {
            set_errno(e);
            T::from(-1)
        }
    }
}

fn files_enabled() -> bool {
    state().is_some_and(|s| s.config.fs != FsMode::Local)
}

fn write_mode() -> bool {
    state().is_some_and(|s| s.config.fs == FsMode::Write)
}

/// Whether `(dirfd, path)` may name a remote file: a cheap test without locks or
/// allocation, so the common local calls go straight to libc.
///
/// # Safety
///
/// `path` must be null or a C string.
#[inline]
unsafe fn may_be_remote(dirfd: c_int, path: *const c_char) -> bool {
    if path.is_null() || !files_enabled() {
        return false;
    }
    // SAFETY: `path` is a non-null C string, so its first byte is readable.
    let first = unsafe { *path } as u8;
    first == b'/' || (first != 0 && dirfd != libc::AT_FDCWD && !fds::is_empty())
}

/// The remote path `(dirfd, path)` names, normalised, or `None` when it is local.
/// A path relative to a remote directory's descriptor is always remote.
///
/// # Safety
///
/// `path` must be null or a C string.
unsafe fn remote_path(dirfd: c_int, path: *const c_char) -> Option<String> {
    if path.is_null() || !files_enabled() {
        return None;
    }
    // SAFETY: the caller guarantees a C string.
    let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
    let path = std::str::from_utf8(bytes).ok()?;
    if path.starts_with('/') {
        let path = normalize(path);
        return (state()?.fs_rules().is_remote(&path) && !local_writes::contains(&path))
            .then_some(path);
    }
    if path.is_empty() || dirfd == libc::AT_FDCWD {
        return None;
    }
    match fds::get(dirfd)? {
        FdKind::RemoteDir { path: dir } => Some(normalize(&format!("{dir}/{path}"))),
        _ => None,
    }
}

fn basename(path: &str) -> &str {
    path.rsplit('/')
        .next()
        .filter(|b| !b.is_empty())
        .unwrap_or("root")
}

/// A new memfd named `graft:<name>`.
fn memfd(name: &str, cloexec: bool) -> Result<c_int, i32> {
    let name = CString::new(format!("graft:{name}")).unwrap_or_else(|_| c"graft".to_owned());
    let flags = if cloexec { libc::MFD_CLOEXEC } else { 0 };
    // SAFETY: `name` is a valid C string; memfd_create has no other precondition.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 { Err(guard::errno()) } else { Ok(fd) }
}

fn real_close(fd: c_int) {
    // SAFETY: closes a descriptor the layer itself opened.
    unsafe { real!(close(fd): fn(c_int) -> c_int) };
}

/// Opens `/proc/self/fd/<fd>` with `flags`: a new open file of the same memfd.
fn reopen(fd: c_int, flags: c_int) -> Result<c_int, i32> {
    let path = CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number");
    // SAFETY: `path` is a valid C string.
    let new = unsafe {
        real!(open64(path.as_ptr(), flags, 0): fn(*const c_char, c_int, mode_t) -> c_int)
    };
    if new < 0 {
        Err(guard::errno())
    } else {
        Ok(new)
    }
}

fn write_all(fd: c_int, mut data: &[u8]) -> Result<(), i32> {
    while !data.is_empty() {
        // SAFETY: `data` is a valid buffer of `data.len()` bytes.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = guard::errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        data = &data[n as usize..];
    }
    Ok(())
}

fn real_fstat(fd: c_int) -> Option<libc::stat64> {
    // SAFETY: stat64 is plain old data.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer.
    let rc = unsafe { real!(fstat64(fd, &mut st): fn(c_int, *mut libc::stat64) -> c_int) };
    (rc == 0).then_some(st)
}

// ---------------------------------------------------------------- open

/// What an open of a remote-looking path comes to.
enum Outcome {
    /// Not ours after all: call libc.
    Local,
    /// A descriptor, or an `errno`.
    Done(Result<c_int, i32>),
}

/// A placeholder descriptor for the remote directory `path`.
fn dir_placeholder(path: &str, cloexec: bool) -> Result<c_int, i32> {
    let fd = memfd(basename(path), cloexec)?;
    fds::insert(
        fd,
        FdKind::RemoteDir {
            path: path.to_owned(),
        },
    );
    layer_log!(debug, "remote directory {path} opened as fd {fd}");
    Ok(fd)
}

fn remote_stat(path: &str, follow: bool) -> Result<FileStat, i32> {
    match call(RemoteRequest::Stat {
        path: path.to_owned(),
        follow,
    })? {
        RemoteResponse::Stat(st) => Ok(st),
        other => Err(unexpected("Stat", other)),
    }
}

fn close_handle(handle: FileHandle) {
    let _ = call(RemoteRequest::Close { handle });
}

/// Reads the remote file behind `handle` from `offset` to its end into `fd`.
fn fetch(handle: FileHandle, fd: c_int, mut offset: u64) -> Result<(), i32> {
    loop {
        let data = match call(RemoteRequest::Read {
            handle,
            offset,
            len: MAX_CHUNK_LEN as u32,
        })? {
            RemoteResponse::Data(data) => data,
            other => return Err(unexpected("Read", other)),
        };
        write_all(fd, &data)?;
        offset += data.len() as u64;
        if data.len() < MAX_CHUNK_LEN {
            return Ok(());
        }
    }
}

/// Opens the remote `path` as `open(2)` would with `flags` and `mode`.
fn open_remote(path: &str, flags: c_int, mode: mode_t) -> Outcome {
    let access = flags & libc::O_ACCMODE;
    let writing = access != libc::O_RDONLY || flags & (libc::O_CREAT | libc::O_TRUNC) != 0;
    if flags & libc::O_TMPFILE == libc::O_TMPFILE || (writing && !write_mode()) {
        return Outcome::Local;
    }
    Outcome::Done(open_remote_inner(path, flags, mode, writing))
}

fn open_remote_inner(path: &str, flags: c_int, mode: mode_t, writing: bool) -> Result<c_int, i32> {
    let access = flags & libc::O_ACCMODE;
    let cloexec = flags & libc::O_CLOEXEC != 0;
    let truncate = flags & libc::O_TRUNC != 0;
    if flags & libc::O_DIRECTORY != 0 {
        let st = remote_stat(path, flags & libc::O_NOFOLLOW == 0)?;
        if !st.is_dir() {
            return Err(libc::ENOTDIR);
        }
        if writing {
            return Err(libc::EISDIR);
        }
        return dir_placeholder(path, cloexec);
    }
    if !writing {
        return open_read_only(path, flags, cloexec);
    }
    let mut open_flags = OpenFlags {
        // The memfd must start with the current content to be written back whole.
        read: access != libc::O_WRONLY || !truncate,
        write: access != libc::O_RDONLY,
        create: flags & libc::O_CREAT != 0,
        exclusive: flags & libc::O_EXCL != 0,
        truncate,
        // Appending happens in the memfd; the write-back rewrites the whole file.
        append: false,
        directory: false,
        no_follow: flags & libc::O_NOFOLLOW != 0,
    };
    let open = |open_flags: OpenFlags| {
        call(RemoteRequest::Open {
            path: path.to_owned(),
            flags: open_flags,
            mode,
        })
    };
    let mut answer = open(open_flags);
    if answer == Err(libc::EACCES) && open_flags.read && access == libc::O_WRONLY {
        // Write-only without read permission: the content cannot be fetched.
        open_flags.read = false;
        answer = open(open_flags);
    }
    let (handle, stat) = match answer {
        Ok(RemoteResponse::Opened { handle, stat }) => (handle, stat),
        Ok(other) => return Err(unexpected("Open", other)),
        Err(e) => return Err(e),
    };
    if stat.is_dir() {
        close_handle(handle);
        return Err(libc::EISDIR);
    }
    let fd = match memfd(basename(path), true) {
        Ok(fd) => fd,
        Err(e) => {
            close_handle(handle);
            return Err(e);
        }
    };
    let fetched = if open_flags.read && !truncate {
        fetch(handle, fd, 0)
    } else {
        Ok(())
    };
    if let Err(e) = fetched {
        close_handle(handle);
        real_close(fd);
        return Err(e);
    }
    let fd = finish_fd(fd, flags);
    fds::insert(
        fd,
        FdKind::RemoteFile(RemoteFile {
            path: path.to_owned(),
            stat,
            writeback: Some(handle),
        }),
    );
    layer_log!(
        debug,
        "remote file {path} opened for writing as fd {fd} ({} bytes, written back on close)",
        real_fstat(fd).map_or(0, |s| s.st_size)
    );
    Ok(fd)
}

/// The common case, a read-only open: one `ReadFile` round trip brings the
/// metadata and the first chunk (all of a file up to 1 MiB); only longer files
/// take more `Read`s.
fn open_read_only(path: &str, flags: c_int, cloexec: bool) -> Result<c_int, i32> {
    let (stat, data, rest) = match call(RemoteRequest::ReadFile {
        path: path.to_owned(),
        no_follow: flags & libc::O_NOFOLLOW != 0,
    })? {
        RemoteResponse::File { stat, data, rest } => (stat, data, rest),
        other => return Err(unexpected("ReadFile", other)),
    };
    if stat.is_dir() {
        if let Some(handle) = rest {
            close_handle(handle);
        }
        return dir_placeholder(path, cloexec);
    }
    let filled = memfd(basename(path), true).and_then(|fd| {
        let result = write_all(fd, &data).and_then(|()| match rest {
            Some(handle) => fetch(handle, fd, data.len() as u64),
            None => Ok(()),
        });
        match result {
            Ok(()) => Ok(fd),
            Err(e) => {
                real_close(fd);
                Err(e)
            }
        }
    });
    if let Some(handle) = rest {
        close_handle(handle);
    }
    let fd = finish_fd(filled?, flags);
    fds::insert(
        fd,
        FdKind::RemoteFile(RemoteFile {
            path: path.to_owned(),
            stat,
            writeback: None,
        }),
    );
    layer_log!(
        debug,
        "remote file {path} opened as fd {fd} ({} bytes)",
        stat.size
    );
    Ok(fd)
}

/// Gives the filled memfd the access mode and flags the program asked for.
fn finish_fd(memfd: c_int, flags: c_int) -> c_int {
    let access = flags & libc::O_ACCMODE;
    let keep = flags & (libc::O_APPEND | libc::O_CLOEXEC);
    let fd = if access == libc::O_RDWR {
        Err(0)
    } else {
        reopen(memfd, access | keep)
    };
    let fd = match fd {
        Ok(new) => {
            real_close(memfd);
            new
        }
        Err(_) => {
            // SAFETY: fcntl on our own descriptor.
            unsafe {
                if flags & libc::O_CLOEXEC == 0 {
                    real!(fcntl(memfd, libc::F_SETFD, 0): fn(c_int, c_int, libc::c_ulong) -> c_int);
                }
                if flags & libc::O_APPEND != 0 {
                    real!(fcntl(memfd, libc::F_SETFL, libc::O_APPEND as libc::c_ulong)
                        : fn(c_int, c_int, libc::c_ulong) -> c_int);
                }
            }
            memfd
        }
    };
    let whence = if flags & libc::O_APPEND != 0 {
        libc::SEEK_END
    } else {
        libc::SEEK_SET
    };
    // SAFETY: lseek on our own descriptor.
    unsafe { libc::lseek64(fd, 0, whence) };
    fd
}

/// The `open` family: `dirfd` is `AT_FDCWD` for the non-`at` variants.
///
/// # Safety
///
/// `path` must be null or a C string.
unsafe fn open_hook(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: mode_t,
    real: impl FnOnce() -> c_int + Copy,
) -> c_int {
    // SAFETY: forwarded contract.
    if !unsafe { may_be_remote(dirfd, path) } {
        return real();
    }
    hooked(real, || {
        // SAFETY: forwarded contract.
        let Some(path) = (unsafe { remote_path(dirfd, path) }) else {
            return real();
        };
        match open_remote(&path, flags, mode) {
            Outcome::Local => {
                let fd = real();
                if fd >= 0 && writes_locally(flags) {
                    local_writes::record(&path);
                }
                fd
            }
            Outcome::Done(r) => ret(r),
        }
    })
}

/// Whether an open with `flags` of a remote path was kept local because it
/// writes under `--fs read` ([`open_remote`]): the path is the program's local
/// file from then on ([`local_writes`]).
fn writes_locally(flags: c_int) -> bool {
    let writing =
        flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_CREAT | libc::O_TRUNC) != 0;
    writing && flags & libc::O_TMPFILE != libc::O_TMPFILE && !write_mode()
}

macro_rules! export_open {
    ($name:ident) => {
        /// `open(2)` alias.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe {
                real!($name(path, flags, mode): fn(*const c_char, c_int, mode_t) -> c_int)
            };
            // SAFETY: `path` is the caller's C string.
            unsafe { open_hook(libc::AT_FDCWD, path, flags, mode, real) }
        }
    };
}
export_open!(open);
export_open!(open64);

macro_rules! export_open_2 {
    ($name:ident) => {
        /// `_FORTIFY_SOURCE` variant of `open` (no `mode`).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, flags: c_int) -> c_int {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe { real!($name(path, flags): fn(*const c_char, c_int) -> c_int) };
            // SAFETY: `path` is the caller's C string.
            unsafe { open_hook(libc::AT_FDCWD, path, flags, 0, real) }
        }
    };
}
export_open_2!(__open_2);
export_open_2!(__open64_2);

macro_rules! export_openat {
    ($name:ident) => {
        /// `openat(2)` alias.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            dirfd: c_int,
            path: *const c_char,
            flags: c_int,
            mode: mode_t,
        ) -> c_int {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe {
                real!($name(dirfd, path, flags, mode): fn(c_int, *const c_char, c_int, mode_t) -> c_int)
            };
            // SAFETY: `path` is the caller's C string.
            unsafe { open_hook(dirfd, path, flags, mode, real) }
        }
    };
}
export_openat!(openat);
export_openat!(openat64);

macro_rules! export_openat_2 {
    ($name:ident) => {
        /// `_FORTIFY_SOURCE` variant of `openat` (no `mode`).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe {
                real!($name(dirfd, path, flags): fn(c_int, *const c_char, c_int) -> c_int)
            };
            // SAFETY: `path` is the caller's C string.
            unsafe { open_hook(dirfd, path, flags, 0, real) }
        }
    };
}
export_openat_2!(__openat_2);
export_openat_2!(__openat64_2);

macro_rules! export_creat {
    ($name:ident) => {
        /// `creat(2)`: `open(path, O_CREAT | O_WRONLY | O_TRUNC, mode)`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, mode: mode_t) -> c_int {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe { real!($name(path, mode): fn(*const c_char, mode_t) -> c_int) };
            let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
            // SAFETY: `path` is the caller's C string.
            unsafe { open_hook(libc::AT_FDCWD, path, flags, mode, real) }
        }
    };
}
export_creat!(creat);
export_creat!(creat64);

// ---------------------------------------------------------------- write-back

/// Writes the content of `fd` (a remote file's memfd) to the agent's `handle`.
fn write_back(fd: c_int, handle: FileHandle) -> Result<(), i32> {
    // SAFETY: F_GETFL on the program's descriptor has no side effect.
    let fl =
        unsafe { real!(fcntl(fd, libc::F_GETFL, 0): fn(c_int, c_int, libc::c_ulong) -> c_int) };
    let (src, own) = if fl >= 0 && fl & libc::O_ACCMODE == libc::O_WRONLY {
        (reopen(fd, libc::O_RDONLY | libc::O_CLOEXEC)?, true)
    } else {
        (fd, false)
    };
    let result = (|| {
        let size = real_fstat(src).ok_or(libc::EBADF)?.st_size as u64;
        let mut buf = vec![0u8; MAX_CHUNK_LEN.min(size as usize).max(1)];
        let mut offset = 0u64;
        while offset < size {
            let want = buf.len().min((size - offset) as usize);
            // SAFETY: `buf` has at least `want` bytes.
            let n = unsafe { libc::pread64(src, buf.as_mut_ptr().cast(), want, offset as i64) };
            if n < 0 {
                let e = guard::errno();
                if e == libc::EINTR {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            let mut data = &buf[..n as usize];
            while !data.is_empty() {
                match call(RemoteRequest::Write {
                    handle,
                    offset,
                    data: data.to_vec(),
                })? {
                    RemoteResponse::Written(0) => return Err(libc::EIO),
                    RemoteResponse::Written(w) => {
                        let w = (w as usize).min(data.len());
                        data = &data[w..];
                        offset += w as u64;
                    }
                    other => return Err(unexpected("Write", other)),
                }
            }
        }
        match call(RemoteRequest::Truncate {
            handle,
            len: offset,
        })? {
            RemoteResponse::Done => Ok(()),
            other => Err(unexpected("Truncate", other)),
        }
    })();
    if own {
        real_close(src);
    }
    layer_log!(debug, "write-back of fd {fd}: {result:?}");
    result
}

/// Called by the `close` hook (and by `fclose`, `freopen`) before a remote file's
/// or directory's last descriptor is closed: writes a `--fs write` file back and
/// releases the agent's handle.
pub(crate) fn before_close(fd: c_int, kind: &FdKind) {
    if let FdKind::RemoteFile(RemoteFile {
        writeback: Some(handle),
        path,
        ..
    }) = kind
    {
        if let Err(e) = write_back(fd, *handle) {
            layer_log!(error, "writing {path} back to the target failed: errno {e}");
        }
        if !fds::has_duplicate(fd) {
            close_handle(*handle);
        }
    }
}

/// Forgets `fd` before libc closes it behind our back (`fclose`, `freopen`).
fn forget(fd: c_int) {
    if fds::is_empty() {
        return;
    }
    let duplicated = fds::has_duplicate(fd);
    if let Some(kind) = fds::get(fd) {
        if !duplicated {
            before_close(fd, &kind);
        }
        fds::remove(fd);
    }
}

fn sync_hook(fd: c_int, real: impl FnOnce() -> c_int + Copy) -> c_int {
    if fds::is_empty() {
        return real();
    }
    hooked(real, || match fds::get(fd) {
        Some(FdKind::RemoteFile(RemoteFile {
            writeback: Some(handle),
            ..
        })) => ret(write_back(fd, handle).map(|()| 0)),
        _ => real(),
    })
}

/// `fsync(2)`: a `--fs write` remote file is written back.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    // SAFETY: forwards the caller's argument unchanged.
    let real = || unsafe { real!(fsync(fd): fn(c_int) -> c_int) };
    sync_hook(fd, real)
}

/// `fdatasync(2)`: as [`fsync`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    // SAFETY: forwards the caller's argument unchanged.
    let real = || unsafe { real!(fdatasync(fd): fn(c_int) -> c_int) };
    sync_hook(fd, real)
}

// ---------------------------------------------------------------- stdio

/// `open(2)` flags of an `fopen` mode, or `None` when the mode is invalid.
fn fopen_flags(mode: &[u8]) -> Option<c_int> {
    let (mut access, mut extra) = match mode.first()? {
        b'r' => (libc::O_RDONLY, 0),
        b'w' => (libc::O_WRONLY, libc::O_CREAT | libc::O_TRUNC),
        b'a' => (libc::O_WRONLY, libc::O_CREAT | libc::O_APPEND),
        _ => return None,
    };
    for c in &mode[1..] {
        match c {
            b'+' => access = libc::O_RDWR,
            b'x' => extra |= libc::O_EXCL,
            b'e' => extra |= libc::O_CLOEXEC,
            b',' => break,
            _ => {}
        }
    }
    Some(access | extra)
}

/// Drops a just-opened remote descriptor nobody will see (its stream failed).
fn discard(fd: c_int) {
    if let Some(FdKind::RemoteFile(RemoteFile {
        writeback: Some(handle),
        ..
    })) = fds::remove(fd)
    {
        close_handle(handle);
    }
    real_close(fd);
}

/// Opens a remote path for stdio: `Ok(None)` when it is local after all.
///
/// # Safety
///
/// `path` and `mode` must be C strings.
unsafe fn fopen_remote(path: *const c_char, mode: *const c_char) -> Option<Result<c_int, i32>> {
    // SAFETY: forwarded contract.
    let path = unsafe { remote_path(libc::AT_FDCWD, path) }?;
    if mode.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees a C string.
    let flags = fopen_flags(unsafe { CStr::from_ptr(mode) }.to_bytes())?;
    match open_remote(&path, flags, 0o666) {
        Outcome::Local => {
            if writes_locally(flags) {
                // Recorded before the local fopen, which happens in the caller:
                // should it fail, the path stays local anyway.
                local_writes::record(&path);
            }
            None
        }
        Outcome::Done(r) => Some(r),
    }
}

macro_rules! export_fopen {
    ($name:ident) => {
        /// `fopen(3)` alias (glibc's fopen opens without our `open`).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, mode: *const c_char) -> *mut FILE {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe {
                real!($name(path, mode): fn(*const c_char, *const c_char) -> *mut FILE,
                    missing = std::ptr::null_mut())
            };
            // SAFETY: `path` is the caller's C string.
            if !unsafe { may_be_remote(libc::AT_FDCWD, path) } {
                return real();
            }
            hooked(real, || {
                // SAFETY: the caller's C strings.
                match unsafe { fopen_remote(path, mode) } {
                    None => real(),
                    Some(Err(e)) => {
                        set_errno(e);
                        std::ptr::null_mut()
                    }
                    Some(Ok(fd)) => {
                        // SAFETY: `fd` is ours, `mode` the caller's valid mode string.
                        let fp = unsafe { libc::fdopen(fd, mode) };
                        if fp.is_null() {
                            let e = guard::errno();
                            discard(fd);
                            set_errno(e);
                        }
                        fp
                    }
                }
            })
        }
    };
}
export_fopen!(fopen);
export_fopen!(fopen64);

macro_rules! export_freopen {
    ($name:ident) => {
        /// `freopen(3)` alias.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            path: *const c_char,
            mode: *const c_char,
            stream: *mut FILE,
        ) -> *mut FILE {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe {
                real!($name(path, mode, stream): fn(*const c_char, *const c_char, *mut FILE) -> *mut FILE,
                    missing = std::ptr::null_mut())
            };
            if stream.is_null() || !files_enabled() {
                return real();
            }
            hooked(real, || {
                if !fds::is_empty() {
                    // SAFETY: the caller's stream; flushed before libc closes its fd.
                    let fd = unsafe {
                        libc::fflush(stream);
                        libc::fileno(stream)
                    };
                    if fd >= 0 {
                        forget(fd);
                    }
                }
                // SAFETY: the caller's C strings.
                if !unsafe { may_be_remote(libc::AT_FDCWD, path) } {
                    return real();
                }
                // SAFETY: the caller's C strings.
                match unsafe { fopen_remote(path, mode) } {
                    None => real(),
                    Some(Err(e)) => {
                        // freopen closes the stream even when the open fails.
                        // SAFETY: the caller's stream.
                        unsafe { libc::fclose(stream) };
                        set_errno(e);
                        std::ptr::null_mut()
                    }
                    Some(Ok(fd)) => {
                        let kind = fds::get(fd);
                        let proc_path = CString::new(format!("/proc/self/fd/{fd}"))
                            .expect("no NUL in a number");
                        // SAFETY: the caller's mode and stream, our path.
                        let fp = unsafe {
                            real!($name(proc_path.as_ptr(), mode, stream)
                                : fn(*const c_char, *const c_char, *mut FILE) -> *mut FILE,
                                missing = std::ptr::null_mut())
                        };
                        let e = guard::errno();
                        if fp.is_null() {
                            discard(fd);
                        } else {
                            fds::remove(fd);
                            real_close(fd);
                            // SAFETY: the stream libc just reopened.
                            let new = unsafe { libc::fileno(fp) };
                            if let Some(kind) = kind {
                                fds::insert(new, kind);
                            }
                        }
                        set_errno(e);
                        fp
                    }
                }
            })
        }
    };
}
export_freopen!(freopen);
export_freopen!(freopen64);

/// `fclose(3)`: glibc closes the descriptor internally, past our `close`, so a
/// remote file is written back and forgotten here.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fclose(stream: *mut FILE) -> c_int {
    // SAFETY: forwards the caller's argument unchanged.
    let real = || unsafe { real!(fclose(stream): fn(*mut FILE) -> c_int) };
    if stream.is_null() || fds::is_empty() {
        return real();
    }
    hooked(real, || {
        // SAFETY: the caller's open stream.
        let fd = unsafe { libc::fileno(stream) };
        if fd >= 0 && fds::get(fd).is_some() {
            // SAFETY: as above; pushes buffered bytes into the memfd first.
            unsafe { libc::fflush(stream) };
            forget(fd);
        }
        real()
    })
}

// ---------------------------------------------------------------- stat

macro_rules! fill_stat_fn {
    ($fn:ident, $ty:ty) => {
        /// Fills a `struct stat` from remote metadata.
        ///
        /// # Safety
        ///
        /// `buf` must be valid for writes.
        unsafe fn $fn(buf: *mut $ty, st: &FileStat) {
            // SAFETY: plain old data, all-zero is valid.
            let mut out: $ty = unsafe { std::mem::zeroed() };
            out.st_dev = st.dev as _;
            out.st_ino = st.ino as _;
            out.st_mode = st.mode as _;
            out.st_nlink = st.nlink as _;
            out.st_uid = st.uid as _;
            out.st_gid = st.gid as _;
            out.st_rdev = st.rdev as _;
            out.st_size = st.size as _;
            out.st_blksize = st.blksize as _;
            out.st_blocks = st.blocks as _;
            out.st_atime = st.atime as _;
            out.st_atime_nsec = st.atime_nsec as _;
            out.st_mtime = st.mtime as _;
            out.st_mtime_nsec = st.mtime_nsec as _;
            out.st_ctime = st.ctime as _;
            out.st_ctime_nsec = st.ctime_nsec as _;
            // SAFETY: the caller guarantees `buf` is writable.
            unsafe { buf.write_unaligned(out) };
        }
    };
}
fill_stat_fn!(fill_stat, libc::stat);
fill_stat_fn!(fill_stat64, libc::stat64);

/// Fills the caller's `struct statx` (glibc's is 256 bytes) with what we know.
///
/// # Safety
///
/// `buf` must be valid for 256 bytes of writes.
unsafe fn fill_statx(buf: *mut libc::statx, st: &FileStat) {
    // SAFETY: the caller's buffer is 256 bytes (glibc's struct statx); the fields
    // written all lie in its first 0x90 bytes, laid out as the kernel defines them.
    unsafe {
        std::ptr::write_bytes(buf.cast::<u8>(), 0, 256);
        let b = &raw mut *buf;
        (&raw mut (*b).stx_mask).write(libc::STATX_BASIC_STATS);
        (&raw mut (*b).stx_blksize).write(st.blksize as u32);
        (&raw mut (*b).stx_nlink).write(st.nlink as u32);
        (&raw mut (*b).stx_uid).write(st.uid);
        (&raw mut (*b).stx_gid).write(st.gid);
        (&raw mut (*b).stx_mode).write(st.mode as u16);
        (&raw mut (*b).stx_ino).write(st.ino);
        (&raw mut (*b).stx_size).write(st.size);
        (&raw mut (*b).stx_blocks).write(st.blocks);
        (&raw mut (*b).stx_atime.tv_sec).write(st.atime);
        (&raw mut (*b).stx_atime.tv_nsec).write(st.atime_nsec as u32);
        (&raw mut (*b).stx_mtime.tv_sec).write(st.mtime);
        (&raw mut (*b).stx_mtime.tv_nsec).write(st.mtime_nsec as u32);
        (&raw mut (*b).stx_ctime.tv_sec).write(st.ctime);
        (&raw mut (*b).stx_ctime.tv_nsec).write(st.ctime_nsec as u32);
        (&raw mut (*b).stx_rdev_major).write(libc::major(st.rdev));
        (&raw mut (*b).stx_rdev_minor).write(libc::minor(st.rdev));
        (&raw mut (*b).stx_dev_major).write(libc::major(st.dev));
        (&raw mut (*b).stx_dev_minor).write(libc::minor(st.dev));
    }
}

/// The remote metadata of a special descriptor, `None` when `fd` is not ours.
fn fd_stat(fd: c_int) -> Option<Result<FileStat, i32>> {
    match fds::get(fd)? {
        FdKind::RemoteFile(RemoteFile { mut stat, .. }) => {
            if let Some(local) = real_fstat(fd) {
                stat.size = local.st_size as u64;
                stat.blocks = stat.size.div_ceil(512);
            }
            Some(Ok(stat))
        }
        FdKind::RemoteDir { path } => Some(remote_stat(&path, true)),
        _ => None,
    }
}

/// Where a `stat`-like call looks.
enum StatTarget {
    Fd(c_int),
    Path(c_int, *const c_char, bool),
}

/// Remote metadata for `target`, or `None` to call libc.
///
/// # Safety
///
/// A path must be null or a C string.
unsafe fn stat_of(target: StatTarget) -> Option<Result<FileStat, i32>> {
    match target {
        StatTarget::Fd(fd) => fd_stat(fd),
        StatTarget::Path(dirfd, path, follow) => {
            // SAFETY: forwarded contract.
            let path = unsafe { remote_path(dirfd, path) }?;
            Some(remote_stat(&path, follow))
        }
    }
}

/// Whether `target` may be remote (the fast path).
///
/// # Safety
///
/// A path must be null or a C string.
unsafe fn stat_may_be_remote(target: &StatTarget) -> bool {
    match *target {
        StatTarget::Fd(_) => files_enabled() && !fds::is_empty(),
        // SAFETY: forwarded contract.
        StatTarget::Path(dirfd, path, _) => unsafe { may_be_remote(dirfd, path) },
    }
}

/// A `stat`-like hook filling the caller's buffer with `fill`.
///
/// # Safety
///
/// A path must be null or a C string; `buf` valid as `fill` requires.
unsafe fn stat_hook<B>(
    target: StatTarget,
    buf: *mut B,
    fill: unsafe fn(*mut B, &FileStat),
    real: impl FnOnce() -> c_int + Copy,
) -> c_int {
    // SAFETY: forwarded contract.
    if !unsafe { stat_may_be_remote(&target) } {
        return real();
    }
    hooked(real, || {
        // SAFETY: forwarded contract.
        match unsafe { stat_of(target) } {
            None => real(),
            Some(Ok(st)) => {
                if buf.is_null() {
                    set_errno(libc::EFAULT);
                    return -1;
                }
                // SAFETY: the caller's buffer.
                unsafe { fill(buf, &st) };
                0
            }
            Some(Err(e)) => {
                set_errno(e);
                -1
            }
        }
    })
}

/// The target of an `fstatat`-like call.
fn at_target(dirfd: c_int, path: *const c_char, flags: c_int) -> StatTarget {
    // SAFETY: a non-null path is the caller's C string.
    let empty = path.is_null() || unsafe { *path } == 0;
    if empty && flags & libc::AT_EMPTY_PATH != 0 {
        StatTarget::Fd(dirfd)
    } else {
        StatTarget::Path(dirfd, path, flags & libc::AT_SYMLINK_NOFOLLOW == 0)
    }
}

macro_rules! export_stat {
    ($name:ident, $ty:ty, $fill:ident, $follow:expr) => {
        /// `stat(2)`/`lstat(2)` alias.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, buf: *mut $ty) -> c_int {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe { real!($name(path, buf): fn(*const c_char, *mut $ty) -> c_int) };
            let target = StatTarget::Path(libc::AT_FDCWD, path, $follow);
            // SAFETY: the caller's path and buffer.
            unsafe { stat_hook(target, buf, $fill, real) }
        }
    };
}
export_stat!(stat, libc::stat, fill_stat, true);
export_stat!(stat64, libc::stat64, fill_stat64, true);
export_stat!(lstat, libc::stat, fill_stat, false);
export_stat!(lstat64, libc::stat64, fill_stat64, false);

macro_rules! export_fstat {
    ($name:ident, $ty:ty, $fill:ident) => {
        /// `fstat(2)` alias: a remote file shows its target metadata.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(fd: c_int, buf: *mut $ty) -> c_int {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe { real!($name(fd, buf): fn(c_int, *mut $ty) -> c_int) };
            // SAFETY: the caller's buffer.
            unsafe { stat_hook(StatTarget::Fd(fd), buf, $fill, real) }
        }
    };
}
export_fstat!(fstat, libc::stat, fill_stat);
export_fstat!(fstat64, libc::stat64, fill_stat64);

macro_rules! export_fstatat {
    ($name:ident, $ty:ty, $fill:ident) => {
        /// `fstatat(2)` alias.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            dirfd: c_int,
            path: *const c_char,
            buf: *mut $ty,
            flags: c_int,
        ) -> c_int {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe {
                real!($name(dirfd, path, buf, flags): fn(c_int, *const c_char, *mut $ty, c_int) -> c_int)
            };
            // SAFETY: the caller's path and buffer.
            unsafe { stat_hook(at_target(dirfd, path, flags), buf, $fill, real) }
        }
    };
}
export_fstatat!(fstatat, libc::stat, fill_stat);
export_fstatat!(fstatat64, libc::stat64, fill_stat64);

// The pre-2.33 glibc entry points old binaries still call. glibc keeps them only
// as compat symbols, so they are served by the modern calls (the `ver` argument
// names the kernel's `struct stat`, the one `stat` fills).

macro_rules! export_xstat {
    ($name:ident, $ty:ty, $modern:ident) => {
        /// Pre-2.33 glibc `stat` entry point.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(_ver: c_int, path: *const c_char, buf: *mut $ty) -> c_int {
            // SAFETY: the same contract as the modern call.
            unsafe { $modern(path, buf) }
        }
    };
}
export_xstat!(__xstat, libc::stat, stat);
export_xstat!(__xstat64, libc::stat64, stat64);
export_xstat!(__lxstat, libc::stat, lstat);
export_xstat!(__lxstat64, libc::stat64, lstat64);

/// Pre-2.33 glibc `fstat` entry point.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __fxstat(_ver: c_int, fd: c_int, buf: *mut libc::stat) -> c_int {
    // SAFETY: the same contract as fstat.
    unsafe { fstat(fd, buf) }
}

/// Pre-2.33 glibc `fstat64` entry point.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __fxstat64(_ver: c_int, fd: c_int, buf: *mut libc::stat64) -> c_int {
    // SAFETY: the same contract as fstat64.
    unsafe { fstat64(fd, buf) }
}

/// Pre-2.33 glibc `fstatat` entry point.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __fxstatat(
    _ver: c_int,
    dirfd: c_int,
    path: *const c_char,
    buf: *mut libc::stat,
    flags: c_int,
) -> c_int {
    // SAFETY: the same contract as fstatat.
    unsafe { fstatat(dirfd, path, buf, flags) }
}

/// Pre-2.33 glibc `fstatat64` entry point.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __fxstatat64(
    _ver: c_int,
    dirfd: c_int,
    path: *const c_char,
    buf: *mut libc::stat64,
    flags: c_int,
) -> c_int {
    // SAFETY: the same contract as fstatat64.
    unsafe { fstatat64(dirfd, path, buf, flags) }
}

/// `statx(2)`: the basic fields (`STATX_BASIC_STATS`) of a remote path or file.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn statx(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mask: c_uint,
    buf: *mut libc::statx,
) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(statx(dirfd, path, flags, mask, buf)
            : fn(c_int, *const c_char, c_int, c_uint, *mut libc::statx) -> c_int)
    };
    // SAFETY: the caller's path and 256-byte buffer.
    unsafe { stat_hook(at_target(dirfd, path, flags), buf, fill_statx, real) }
}

// ---------------------------------------------------------------- access, links

/// `access`-like hooks.
///
/// # Safety
///
/// `path` must be null or a C string.
unsafe fn access_hook(
    dirfd: c_int,
    path: *const c_char,
    mode: c_int,
    real: impl FnOnce() -> c_int + Copy,
) -> c_int {
    // SAFETY: forwarded contract.
    if !unsafe { may_be_remote(dirfd, path) } {
        return real();
    }
    hooked(real, || {
        // SAFETY: forwarded contract.
        let Some(path) = (unsafe { remote_path(dirfd, path) }) else {
            return real();
        };
        ret(match call(RemoteRequest::Access { path, mode }) {
            Ok(RemoteResponse::Done) => Ok(0),
            Ok(other) => Err(unexpected("Access", other)),
            Err(e) => Err(e),
        })
    })
}

macro_rules! export_access {
    ($name:ident) => {
        /// `access(2)` alias (the agent checks with its own credentials).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, mode: c_int) -> c_int {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe { real!($name(path, mode): fn(*const c_char, c_int) -> c_int) };
            // SAFETY: the caller's path.
            unsafe { access_hook(libc::AT_FDCWD, path, mode, real) }
        }
    };
}
export_access!(access);
export_access!(euidaccess);
export_access!(eaccess);

/// `faccessat(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn faccessat(
    dirfd: c_int,
    path: *const c_char,
    mode: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(faccessat(dirfd, path, mode, flags): fn(c_int, *const c_char, c_int, c_int) -> c_int)
    };
    // SAFETY: the caller's path.
    unsafe { access_hook(dirfd, path, mode, real) }
}

/// `readlink`-like hooks.
///
/// # Safety
///
/// `path` must be null or a C string, `buf` valid for `size` bytes.
unsafe fn readlink_hook(
    dirfd: c_int,
    path: *const c_char,
    buf: *mut c_char,
    size: size_t,
    real: impl FnOnce() -> ssize_t + Copy,
) -> ssize_t {
    // SAFETY: forwarded contract.
    if !unsafe { may_be_remote(dirfd, path) } {
        return real();
    }
    hooked(real, || {
        // SAFETY: forwarded contract.
        let Some(path) = (unsafe { remote_path(dirfd, path) }) else {
            return real();
        };
        ret(match call(RemoteRequest::ReadLink { path }) {
            Ok(RemoteResponse::Link(target)) => {
                let n = target.len().min(size);
                // SAFETY: the caller's buffer holds `size` ≥ `n` bytes.
                unsafe { std::ptr::copy_nonoverlapping(target.as_ptr(), buf.cast::<u8>(), n) };
                Ok(n as ssize_t)
            }
            Ok(other) => Err(unexpected("ReadLink", other)),
            Err(e) => Err(e),
        })
    })
}

/// `readlink(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readlink(path: *const c_char, buf: *mut c_char, size: size_t) -> ssize_t {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(readlink(path, buf, size): fn(*const c_char, *mut c_char, size_t) -> ssize_t)
    };
    // SAFETY: the caller's path and buffer.
    unsafe { readlink_hook(libc::AT_FDCWD, path, buf, size, real) }
}

/// `readlinkat(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readlinkat(
    dirfd: c_int,
    path: *const c_char,
    buf: *mut c_char,
    size: size_t,
) -> ssize_t {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(readlinkat(dirfd, path, buf, size): fn(c_int, *const c_char, *mut c_char, size_t) -> ssize_t)
    };
    // SAFETY: the caller's path and buffer.
    unsafe { readlink_hook(dirfd, path, buf, size, real) }
}

// ---------------------------------------------------------------- realpath

/// Resolves the remote absolute `path` component by component in the target,
/// following symlinks (glibc's `realpath` looks with internal calls we never see).
fn remote_realpath(path: &str) -> Result<String, i32> {
    let mut todo: std::collections::VecDeque<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect();
    let mut out: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(component) = todo.pop_front() {
        match component.as_str() {
            "." => continue,
            ".." => {
                out.pop();
                continue;
            }
            _ => {}
        }
        let candidate = format!(
            "/{}",
            out.iter()
                .chain([&component])
                .cloned()
                .collect::<Vec<_>>()
                .join("/")
        );
        let st = remote_stat(&candidate, false)?;
        if st.mode & libc::S_IFMT == libc::S_IFLNK {
            links += 1;
            if links > 40 {
                return Err(libc::ELOOP);
            }
            let target = match call(RemoteRequest::ReadLink { path: candidate })? {
                RemoteResponse::Link(target) => target,
                other => return Err(unexpected("ReadLink", other)),
            };
            if target.starts_with('/') {
                out.clear();
            }
            for c in target.split('/').filter(|c| !c.is_empty()).rev() {
                todo.push_front(c.to_owned());
            }
        } else {
            if !todo.is_empty() && !st.is_dir() {
                return Err(libc::ENOTDIR);
            }
            out.push(component);
        }
    }
    Ok(format!("/{}", out.join("/")))
}

/// `realpath(3)`, and glibc's `canonicalize_file_name` (`resolved` null).
///
/// # Safety
///
/// `path` must be null or a C string, `resolved` null or `PATH_MAX` bytes.
unsafe fn realpath_hook(
    path: *const c_char,
    resolved: *mut c_char,
    real: impl FnOnce() -> *mut c_char + Copy,
) -> *mut c_char {
    // SAFETY: forwarded contract.
    if !unsafe { may_be_remote(libc::AT_FDCWD, path) } {
        return real();
    }
    hooked(real, || {
        // SAFETY: forwarded contract.
        let Some(path) = (unsafe { remote_path(libc::AT_FDCWD, path) }) else {
            return real();
        };
        let result = remote_realpath(&path).and_then(|r| {
            if r.len() >= libc::PATH_MAX as usize {
                Err(libc::ENAMETOOLONG)
            } else {
                CString::new(r).map_err(|_| libc::EINVAL)
            }
        });
        match result {
            Err(e) => {
                set_errno(e);
                std::ptr::null_mut()
            }
            // SAFETY: `r` is a C string; a non-null `resolved` holds PATH_MAX bytes.
            Ok(r) => unsafe {
                if resolved.is_null() {
                    libc::strdup(r.as_ptr())
                } else {
                    libc::strcpy(resolved, r.as_ptr())
                }
            },
        }
    })
}

/// `realpath(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realpath(path: *const c_char, resolved: *mut c_char) -> *mut c_char {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(realpath(path, resolved): fn(*const c_char, *mut c_char) -> *mut c_char, missing = std::ptr::null_mut())
    };
    // SAFETY: the caller's path and buffer.
    unsafe { realpath_hook(path, resolved, real) }
}

/// `canonicalize_file_name(3)`: `realpath(path, NULL)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn canonicalize_file_name(path: *const c_char) -> *mut c_char {
    // SAFETY: forwards the caller's argument unchanged.
    let real = || unsafe {
        real!(canonicalize_file_name(path): fn(*const c_char) -> *mut c_char, missing = std::ptr::null_mut())
    };
    // SAFETY: the caller's path.
    unsafe { realpath_hook(path, std::ptr::null_mut(), real) }
}

// ---------------------------------------------------------------- extended attributes

/// Extended-attribute hooks: the protocol carries no attributes, so a remote path
/// has none (`ENODATA` for a get, an empty list), which `ls -l` and libselinux
/// take quietly instead of reporting the local `ENOENT`.
///
/// # Safety
///
/// `path` must be null or a C string.
unsafe fn xattr_hook(
    path: *const c_char,
    none: Result<ssize_t, i32>,
    real: impl FnOnce() -> ssize_t + Copy,
) -> ssize_t {
    // SAFETY: forwarded contract.
    if !unsafe { may_be_remote(libc::AT_FDCWD, path) } {
        return real();
    }
    hooked(real, || {
        // SAFETY: forwarded contract.
        match unsafe { remote_path(libc::AT_FDCWD, path) } {
            Some(_) => ret(none),
            None => real(),
        }
    })
}

macro_rules! export_getxattr {
    ($name:ident) => {
        /// `getxattr(2)` alias: a remote path has no extended attributes.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            path: *const c_char,
            name: *const c_char,
            value: *mut libc::c_void,
            size: size_t,
        ) -> ssize_t {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe {
                real!($name(path, name, value, size)
                    : fn(*const c_char, *const c_char, *mut libc::c_void, size_t) -> ssize_t)
            };
            // SAFETY: the caller's path.
            unsafe { xattr_hook(path, Err(libc::ENODATA), real) }
        }
    };
}
export_getxattr!(getxattr);
export_getxattr!(lgetxattr);

macro_rules! export_listxattr {
    ($name:ident) => {
        /// `listxattr(2)` alias: a remote path has no extended attributes.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, list: *mut c_char, size: size_t) -> ssize_t {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe {
                real!($name(path, list, size): fn(*const c_char, *mut c_char, size_t) -> ssize_t)
            };
            // SAFETY: the caller's path.
            unsafe { xattr_hook(path, Ok(0), real) }
        }
    };
}
export_listxattr!(listxattr);
export_listxattr!(llistxattr);

// ---------------------------------------------------------------- changes (--fs write)

/// A hook that changes the tree: remote only with `--fs write`.
///
/// # Safety
///
/// `path` must be null or a C string.
unsafe fn change_hook(
    dirfd: c_int,
    path: *const c_char,
    request: impl FnOnce(String) -> RemoteRequest,
    real: impl FnOnce() -> c_int + Copy,
) -> c_int {
    // SAFETY: forwarded contract.
    if !write_mode() || !unsafe { may_be_remote(dirfd, path) } {
        return real();
    }
    hooked(real, || {
        // SAFETY: forwarded contract.
        let Some(path) = (unsafe { remote_path(dirfd, path) }) else {
            return real();
        };
        ret(match call(request(path)) {
            Ok(RemoteResponse::Done) => Ok(0),
            Ok(other) => Err(unexpected("change", other)),
            Err(e) => Err(e),
        })
    })
}

/// `mkdir(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mkdir(path: *const c_char, mode: mode_t) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe { real!(mkdir(path, mode): fn(*const c_char, mode_t) -> c_int) };
    let req = |path| RemoteRequest::MkDir { path, mode };
    // SAFETY: the caller's path.
    unsafe { change_hook(libc::AT_FDCWD, path, req, real) }
}

/// `mkdirat(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mkdirat(dirfd: c_int, path: *const c_char, mode: mode_t) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real =
        || unsafe { real!(mkdirat(dirfd, path, mode): fn(c_int, *const c_char, mode_t) -> c_int) };
    let req = |path| RemoteRequest::MkDir { path, mode };
    // SAFETY: the caller's path.
    unsafe { change_hook(dirfd, path, req, real) }
}

/// `unlink(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn unlink(path: *const c_char) -> c_int {
    // SAFETY: forwards the caller's argument unchanged.
    let real = || unsafe { real!(unlink(path): fn(*const c_char) -> c_int) };
    let req = |path| RemoteRequest::Remove { path, dir: false };
    // SAFETY: the caller's path.
    unsafe { change_hook(libc::AT_FDCWD, path, req, real) }
}

/// `rmdir(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rmdir(path: *const c_char) -> c_int {
    // SAFETY: forwards the caller's argument unchanged.
    let real = || unsafe { real!(rmdir(path): fn(*const c_char) -> c_int) };
    let req = |path| RemoteRequest::Remove { path, dir: true };
    // SAFETY: the caller's path.
    unsafe { change_hook(libc::AT_FDCWD, path, req, real) }
}

/// `unlinkat(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn unlinkat(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real =
        || unsafe { real!(unlinkat(dirfd, path, flags): fn(c_int, *const c_char, c_int) -> c_int) };
    let req = |path| RemoteRequest::Remove {
        path,
        dir: flags & libc::AT_REMOVEDIR != 0,
    };
    // SAFETY: the caller's path.
    unsafe { change_hook(dirfd, path, req, real) }
}

/// `rename`-like hooks: both remote → `Rename`; one remote → `EXDEV` (as
/// across file systems, so `mv` copies).
///
/// # Safety
///
/// The paths must be null or C strings.
unsafe fn rename_hook(
    olddir: c_int,
    old: *const c_char,
    newdir: c_int,
    new: *const c_char,
    real: impl FnOnce() -> c_int + Copy,
) -> c_int {
    // SAFETY: forwarded contract.
    let maybe = unsafe { may_be_remote(olddir, old) || may_be_remote(newdir, new) };
    if !write_mode() || !maybe {
        return real();
    }
    hooked(real, || {
        // SAFETY: forwarded contract.
        let (from, to) = unsafe { (remote_path(olddir, old), remote_path(newdir, new)) };
        ret(match (from, to) {
            (None, None) => return real(),
            (Some(from), Some(to)) => match call(RemoteRequest::Rename { from, to }) {
                Ok(RemoteResponse::Done) => Ok(0),
                Ok(other) => Err(unexpected("Rename", other)),
                Err(e) => Err(e),
            },
            _ => Err(libc::EXDEV),
        })
    })
}

/// `rename(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rename(old: *const c_char, new: *const c_char) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe { real!(rename(old, new): fn(*const c_char, *const c_char) -> c_int) };
    // SAFETY: the caller's paths.
    unsafe { rename_hook(libc::AT_FDCWD, old, libc::AT_FDCWD, new, real) }
}

/// `renameat(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn renameat(
    olddir: c_int,
    old: *const c_char,
    newdir: c_int,
    new: *const c_char,
) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(renameat(olddir, old, newdir, new): fn(c_int, *const c_char, c_int, *const c_char) -> c_int)
    };
    // SAFETY: the caller's paths.
    unsafe { rename_hook(olddir, old, newdir, new, real) }
}

// ---------------------------------------------------------------- directories

/// A listing of a remote directory behind a `DIR*` of ours.
struct FakeDir {
    path: String,
    entries: Vec<DirEntry>,
    pos: usize,
    /// The descriptor `dirfd` reports and `closedir` closes; -1 until asked for
    /// (`opendir`), or the program's placeholder (`fdopendir`).
    fd: c_int,
    ent: dirent,
    ent64: dirent64,
}

/// Live fake `DIR*`s, so libc's go to libc.
static FAKE_DIRS: Mutex<Option<HashSet<usize>>> = Mutex::new(None);
static FAKE_DIR_COUNT: AtomicUsize = AtomicUsize::new(0);

fn fake_dirs() -> std::sync::MutexGuard<'static, Option<HashSet<usize>>> {
    FAKE_DIRS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether no fake `DIR*` is alive (one atomic load).
#[inline]
fn no_fake_dirs() -> bool {
    FAKE_DIR_COUNT.load(Ordering::Relaxed) == 0
}

/// Our listing behind `dir`, if it is one of ours.
fn fake_dir<'a>(dir: *mut DIR) -> Option<&'a mut FakeDir> {
    if no_fake_dirs() || !fake_dirs().as_ref()?.contains(&(dir as usize)) {
        return None;
    }
    // SAFETY: registered pointers come from Box::into_raw of a FakeDir and stay
    // valid until closedir unregisters them; a DIR* is used by one thread at a time.
    Some(unsafe { &mut *(dir as *mut FakeDir) })
}

/// Lists the remote directory `path` into a new fake `DIR*`.
fn open_fake_dir(path: &str, fd: c_int) -> Result<*mut DIR, i32> {
    let mut entries = match call(RemoteRequest::ReadDir {
        path: path.to_owned(),
    })? {
        RemoteResponse::Dir(entries) => entries,
        other => return Err(unexpected("ReadDir", other)),
    };
    // readdir(3) shows `.` and `..` too.
    for name in ["..", "."] {
        entries.insert(
            0,
            DirEntry {
                name: name.into(),
                ino: 1,
                kind: libc::DT_DIR,
            },
        );
    }
    let dir = Box::into_raw(Box::new(FakeDir {
        path: path.to_owned(),
        entries,
        pos: 0,
        fd,
        // SAFETY: plain old data.
        ent: unsafe { std::mem::zeroed() },
        // SAFETY: plain old data.
        ent64: unsafe { std::mem::zeroed() },
    }));
    let mut set = fake_dirs();
    let set = set.get_or_insert_with(HashSet::new);
    set.insert(dir as usize);
    FAKE_DIR_COUNT.store(set.len(), Ordering::Relaxed);
    layer_log!(debug, "remote directory {path} listed");
    Ok(dir.cast())
}

/// Fills a `dirent`-like record with entry `index` of `dir`.
macro_rules! fill_dirent {
    ($out:expr, $entry:expr, $index:expr) => {{
        let out = $out;
        let entry: &DirEntry = $entry;
        let name = entry.name.as_bytes();
        let n = name.len().min(out.d_name.len() - 1);
        out.d_ino = entry.ino as _;
        out.d_off = ($index + 1) as _;
        out.d_type = entry.kind;
        for (d, s) in out.d_name.iter_mut().zip(&name[..n]) {
            *d = *s as c_char;
        }
        out.d_name[n] = 0;
        let base = std::mem::offset_of!(dirent64, d_name);
        out.d_reclen = ((base + n + 1 + 7) & !7) as u16;
    }};
}

impl FakeDir {
    fn next(&mut self) -> Option<&DirEntry> {
        let entry = self.entries.get(self.pos)?;
        self.pos += 1;
        Some(entry)
    }

    fn next_dirent(&mut self) -> *mut dirent {
        let index = self.pos;
        let Some(entry) = self.next().cloned() else {
            return std::ptr::null_mut();
        };
        fill_dirent!(&mut self.ent, &entry, index);
        &mut self.ent
    }

    fn next_dirent64(&mut self) -> *mut dirent64 {
        let index = self.pos;
        let Some(entry) = self.next().cloned() else {
            return std::ptr::null_mut();
        };
        fill_dirent!(&mut self.ent64, &entry, index);
        &mut self.ent64
    }
}

/// `opendir(3)`: a remote directory is listed into a fake `DIR*`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn opendir(path: *const c_char) -> *mut DIR {
    // SAFETY: forwards the caller's argument unchanged.
    let real = || unsafe {
        real!(opendir(path): fn(*const c_char) -> *mut DIR, missing = std::ptr::null_mut())
    };
    // SAFETY: the caller's path.
    if !unsafe { may_be_remote(libc::AT_FDCWD, path) } {
        return real();
    }
    hooked(real, || {
        // SAFETY: the caller's path.
        let Some(path) = (unsafe { remote_path(libc::AT_FDCWD, path) }) else {
            return real();
        };
        open_fake_dir(&path, -1).unwrap_or_else(|e| {
            set_errno(e);
            std::ptr::null_mut()
        })
    })
}

/// `fdopendir(3)`: a remote directory's placeholder descriptor is listed into a
/// fake `DIR*` that owns the descriptor.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdopendir(fd: c_int) -> *mut DIR {
    // SAFETY: forwards the caller's argument unchanged.
    let real =
        || unsafe { real!(fdopendir(fd): fn(c_int) -> *mut DIR, missing = std::ptr::null_mut()) };
    if fds::is_empty() {
        return real();
    }
    hooked(real, || match fds::get(fd) {
        Some(FdKind::RemoteDir { path }) => open_fake_dir(&path, fd).unwrap_or_else(|e| {
            set_errno(e);
            std::ptr::null_mut()
        }),
        Some(FdKind::RemoteFile(_)) => {
            set_errno(libc::ENOTDIR);
            std::ptr::null_mut()
        }
        _ => real(),
    })
}

macro_rules! export_readdir {
    ($name:ident, $ty:ty, $next:ident) => {
        /// `readdir(3)` alias.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dir: *mut DIR) -> *mut $ty {
            // SAFETY: forwards the caller's argument unchanged.
            let real = || unsafe { real!($name(dir): fn(*mut DIR) -> *mut $ty, missing = std::ptr::null_mut()) };
            if no_fake_dirs() {
                return real();
            }
            hooked(real, || match fake_dir(dir) {
                Some(fake) => fake.$next(),
                None => real(),
            })
        }
    };
}
export_readdir!(readdir, dirent, next_dirent);
export_readdir!(readdir64, dirent64, next_dirent64);

macro_rules! export_readdir_r {
    ($name:ident, $ty:ty, $next:ident) => {
        /// `readdir_r(3)` alias (deprecated, still used).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dir: *mut DIR, entry: *mut $ty, result: *mut *mut $ty) -> c_int {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe {
                real!($name(dir, entry, result): fn(*mut DIR, *mut $ty, *mut *mut $ty) -> c_int)
            };
            if no_fake_dirs() {
                return real();
            }
            hooked(real, || match fake_dir(dir) {
                Some(fake) => {
                    let next = fake.$next();
                    // SAFETY: the caller's entry buffer and result pointer (readdir_r's
                    // contract); `next` points into our FakeDir.
                    unsafe {
                        if next.is_null() {
                            *result = std::ptr::null_mut();
                        } else {
                            std::ptr::copy_nonoverlapping(next, entry, 1);
                            *result = entry;
                        }
                    }
                    0
                }
                None => real(),
            })
        }
    };
}
export_readdir_r!(readdir_r, dirent, next_dirent);
export_readdir_r!(readdir64_r, dirent64, next_dirent64);

/// `closedir(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn closedir(dir: *mut DIR) -> c_int {
    // SAFETY: forwards the caller's argument unchanged.
    let real = || unsafe { real!(closedir(dir): fn(*mut DIR) -> c_int) };
    if no_fake_dirs() {
        return real();
    }
    hooked(real, || {
        let removed = {
            let mut set = fake_dirs();
            let removed = set.as_mut().is_some_and(|s| s.remove(&(dir as usize)));
            FAKE_DIR_COUNT.store(set.as_ref().map_or(0, HashSet::len), Ordering::Relaxed);
            removed
        };
        if !removed {
            return real();
        }
        // SAFETY: registered pointers come from Box::into_raw; unregistered above,
        // so this is the only owner.
        let fake = unsafe { Box::from_raw(dir as *mut FakeDir) };
        if fake.fd >= 0 {
            fds::remove(fake.fd);
            real_close(fake.fd);
        }
        layer_log!(trace, "remote directory {} closed", fake.path);
        0
    })
}

/// `dirfd(3)`: a placeholder descriptor for a fake `DIR*` (made on first use).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dirfd(dir: *mut DIR) -> c_int {
    // SAFETY: forwards the caller's argument unchanged.
    let real = || unsafe { real!(dirfd(dir): fn(*mut DIR) -> c_int) };
    if no_fake_dirs() {
        return real();
    }
    hooked(real, || match fake_dir(dir) {
        Some(fake) => {
            if fake.fd < 0 {
                match dir_placeholder(&fake.path, true) {
                    Ok(fd) => fake.fd = fd,
                    Err(e) => {
                        set_errno(e);
                        return -1;
                    }
                }
            }
            fake.fd
        }
        None => real(),
    })
}

/// `rewinddir(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rewinddir(dir: *mut DIR) {
    // SAFETY: forwards the caller's argument unchanged.
    let real = || unsafe { real!(rewinddir(dir): fn(*mut DIR) -> (), missing = ()) };
    if no_fake_dirs() {
        return real();
    }
    hooked(real, || match fake_dir(dir) {
        Some(fake) => fake.pos = 0,
        None => real(),
    })
}

/// `telldir(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn telldir(dir: *mut DIR) -> c_long {
    // SAFETY: forwards the caller's argument unchanged.
    let real = || unsafe { real!(telldir(dir): fn(*mut DIR) -> c_long) };
    if no_fake_dirs() {
        return real();
    }
    hooked(real, || match fake_dir(dir) {
        Some(fake) => fake.pos as c_long,
        None => real(),
    })
}

/// `seekdir(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn seekdir(dir: *mut DIR, loc: c_long) {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe { real!(seekdir(dir, loc): fn(*mut DIR, c_long) -> (), missing = ()) };
    if no_fake_dirs() {
        return real();
    }
    hooked(real, || match fake_dir(dir) {
        Some(fake) => fake.pos = usize::try_from(loc).unwrap_or(0).min(fake.entries.len()),
        None => real(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fopen_modes() {
        assert_eq!(fopen_flags(b"r"), Some(libc::O_RDONLY));
        assert_eq!(fopen_flags(b"rb"), Some(libc::O_RDONLY));
        assert_eq!(fopen_flags(b"re"), Some(libc::O_RDONLY | libc::O_CLOEXEC));
        assert_eq!(
            fopen_flags(b"w+"),
            Some(libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC)
        );
        assert_eq!(
            fopen_flags(b"ax"),
            Some(libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_EXCL)
        );
        assert_eq!(fopen_flags(b"q"), None);
        assert_eq!(fopen_flags(b""), None);
    }

    #[test]
    fn basenames() {
        assert_eq!(basename("/etc/hosts"), "hosts");
        assert_eq!(basename("/"), "root");
    }
}
