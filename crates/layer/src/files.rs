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
//!
//! Submodules by concern, each with its C-ABI exports after the logic they call:
//! `open` (open, creat, write-back, fsync), `direct` (a local target's files
//! opened by the program itself, no hop), `stdio` (fopen & co.), `stat`, `paths`
//! (access, readlink, realpath, xattrs, `--fs write` changes), `dirs` (opendir &
//! co.). This file holds the helpers they share.

use std::{
    collections::HashSet,
    ffi::{CStr, CString},
    os::raw::{c_char, c_int, c_long, c_uint},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use graft_config::{
    FsMode,
    fs::{NormalScan, normalize},
};
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
    guard::{self, Handled, hooked, set_errno},
    local_writes, state,
};

mod direct;
mod dirs;
mod open;
mod paths;
mod stat;
mod stdio;

pub(crate) use self::open::before_close;
use self::open::*;

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
#[inline(always)]
unsafe fn may_be_remote(dirfd: c_int, path: *const c_char) -> bool {
    if path.is_null() || !files_enabled() {
        return false;
    }
    // SAFETY: `path` is a non-null C string, so its first byte is readable.
    let first = unsafe { *path } as u8;
    if first != b'/' {
        return first != 0 && dirfd != libc::AT_FDCWD && !fds::is_empty();
    }
    // An absolute path already in normal form is classified here, without an
    // allocation: most opens (libraries, /dev, /proc) end here, local.
    // SAFETY: as above, a C string that starts with '/'.
    match unsafe { normal_path(path) } {
        Some(path) => match state().and_then(|s| s.fs_rules_ready()) {
            Some(rules) => rules.is_remote(path) && !local_writes::contains(path),
            // The first hook compiles the rules, inside the guard.
            None => true,
        },
        None => true,
    }
}

/// The C string `path` as text when it is valid UTF-8 and in normal form
/// ([`is_normal`]), else `None`. One pass finds the terminator and checks the
/// form and the encoding together: this runs on every absolute `open`, `stat`
/// and `access` of the program, where separate `strlen`, UTF-8 and form passes
/// cost more than the rest of the decision.
///
/// # Safety
///
/// `path` must be a C string whose first byte is `/`.
#[inline(always)]
unsafe fn normal_path<'a>(path: *const c_char) -> Option<&'a str> {
    let bytes = path.cast::<u8>();
    let mut scan = NormalScan::new();
    let (mut len, mut ascii) = (1, true);
    loop {
        // SAFETY: every byte up to and including the terminator is readable.
        let b = unsafe { *bytes.add(len) };
        if b == 0 {
            break;
        }
        if !scan.push(b) {
            return None;
        }
        ascii &= b.is_ascii();
        len += 1;
    }
    if !scan.finish() {
        return None;
    }
    // SAFETY: the `len` bytes before the terminator, alive as long as the caller's string.
    let bytes = unsafe { std::slice::from_raw_parts(bytes, len) };
    if ascii {
        // SAFETY: ASCII is UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes).ok()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_one_pass_scan_decides_as_is_normal() {
        // Every path of up to 6 bytes after the leading '/' over an alphabet
        // that makes every kind of component ("", ".", "..", "...", names),
        // non-ASCII ones included.
        let alphabet = ['/', '.', 'a', '\u{e9}'];
        let mut paths = vec![String::from("/")];
        let mut last = paths.clone();
        for _ in 0..6 {
            last = last
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            paths.extend(last.iter().cloned());
        }
        for path in &paths {
            let c = CString::new(path.as_str()).unwrap();
            // SAFETY: a C string that starts with '/'.
            let scanned = unsafe { normal_path(c.as_ptr()) };
            let expected = graft_config::fs::is_normal(path).then_some(path.as_str());
            assert_eq!(scanned, expected, "{path:?}");
        }
        // Not UTF-8: never classified here (the slow path decides).
        let c = CString::new(b"/srv/\xff".to_vec()).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { normal_path(c.as_ptr()) }, None);
    }

    #[test]
    fn basenames() {
        assert_eq!(basename("/etc/hosts"), "hosts");
        assert_eq!(basename("/"), "root");
    }
}
