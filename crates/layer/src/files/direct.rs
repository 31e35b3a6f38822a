//! The direct open of a local target's files: no hop to the proxy or the agent.
//!
//! For a `pid:` target the agent runs on this machine and resolves every path
//! below `/proc/PID/root` with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`.
//! The program can often open that same directory itself: `/proc/PID/root` is
//! open to whoever passes the kernel's ptrace access check on the target
//! (proc(5), `PTRACE_MODE_READ_FSCREDS`), root in the common `sudo graft run`.
//! Then the layer asks the agent once per process where the root is
//! ([`RemoteRequest::TargetRoot`]), opens it itself with the program's own
//! credentials (an `O_PATH` descriptor, close-on-exec), checks that it is the
//! very directory and mount the agent uses ([`RootIdentity`]), and from then on
//! opens remote paths with the same `openat2` call the agent would make: the
//! open costs one system call instead of two hops and a descriptor pass. The
//! `stat` family's remote metadata is read the same way (the agent's `O_PATH`
//! open and `fstat`), and so are `access` (`faccessat2` on that descriptor),
//! `readlink` (`readlinkat` with an empty path on an `O_NOFOLLOW` one) and
//! `opendir` (libc's `fdopendir` on the directory opened the same way).
//!
//! Nothing crosses a process boundary but the identity: the descriptor is one the
//! program could open without graft, and every open through it is checked by the
//! kernel with the program's credentials. When the program may not open the root
//! (another user's target), when an open fails for a reason that may depend on
//! who asks (`EACCES`, `EPERM`), or when the direct open could differ from the
//! agent's in any way (a file it would create: owner, group and umask would be
//! the program's, not the agent's; anything but a regular file; a concurrent
//! mount or rename, `EXDEV`/`EAGAIN`), the open takes the agent's path as before
//! ([`Direct::Fallback`]): behaviour never changes, only speed. The file rules
//! ([`graft_config::fs`]) are applied before this module is reached, exactly as
//! for the agent's path. `GRAFT_OPEN_DIRECT=0` turns it off; `GRAFT_LOG=debug`
//! says which path each open took. See docs/security.md, "Direct opens in a
//! local target's root".

use std::sync::atomic::{AtomicI32, AtomicU64};

use graft_protocol::remote::RootIdentity;

use super::*;

/// The root descriptor: [`UNKNOWN`] before the first remote open of this
/// process, [`OFF`] when the direct path is not available, else the descriptor.
static ROOT_FD: AtomicI32 = AtomicI32::new(UNKNOWN);
/// `st_dev` and `st_ino` of [`ROOT_FD`], checked before each use: the program
/// may have closed the number or put another file there (`dup2`, `closefrom`).
static ROOT_DEV: AtomicU64 = AtomicU64::new(0);
static ROOT_INO: AtomicU64 = AtomicU64::new(0);
/// Serialises the first look-up; held only while it runs, never waited for.
static INIT: Mutex<()> = Mutex::new(());

const UNKNOWN: c_int = -1;
const OFF: c_int = -2;

/// `STATX_MNT_ID_UNIQUE` (Linux 6.8, include/uapi/linux/stat.h); the agent asks
/// for the same bits, so both sides read the same kind of mount id.
const STATX_MNT_ID_UNIQUE: c_uint = 0x4000;

/// How a direct open ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Direct {
    /// The target's file, as the program's descriptor.
    Opened(c_int),
    /// The open failed as it would in the agent (`ENOENT`, `ELOOP`, ...).
    Failed(i32),
    /// Take the agent's path.
    Fallback,
}

/// Opens the remote `path` (absolute, normalised, remote by the rules) with the
/// program's `flags`, in the target's root, without asking anyone.
pub(super) fn open(path: &str, flags: c_int) -> Direct {
    // A file to create must be the agent's (owner, group, umask): an existing
    // one is opened here without O_CREAT, a missing one by the agent.
    let create = flags & libc::O_CREAT != 0;
    if create && flags & libc::O_EXCL != 0 {
        layer_log!(
            debug,
            "open {path}: through the agent (it creates the file, which must be the agent's)"
        );
        return Direct::Fallback;
    }
    let Some(root) = root() else {
        return Direct::Fallback;
    };
    let Ok(cpath) = CString::new(path) else {
        return Direct::Fallback;
    };
    // The flags the agent's path honours (`Files::open_fd` and the layer's
    // `open_passed`), and never a blocking open: a FIFO or a device is found out
    // by `fstat` below and left to the agent's path.
    let keep = libc::O_ACCMODE
        | libc::O_TRUNC
        | libc::O_APPEND
        | libc::O_EXCL
        | libc::O_NOFOLLOW
        | libc::O_CLOEXEC;
    // SAFETY: open_how is plain old data; zero is "no mode".
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = ((flags & keep) | libc::O_NONBLOCK) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    let fd = match openat2(root, &cpath, how) {
        Ok(fd) => fd,
        Err(libc::ENOENT) if create => {
            layer_log!(
                debug,
                "open {path}: through the agent (it creates the file, which must be the agent's)"
            );
            return Direct::Fallback;
        }
        Err(errno) if same_for_the_agent(errno) => {
            layer_log!(debug, "open {path}: direct, failed with errno {errno}");
            return Direct::Failed(errno);
        }
        Err(errno) => {
            layer_log!(
                debug,
                "open {path}: direct open refused (errno {errno}), through the agent"
            );
            return Direct::Fallback;
        }
    };
    let regular = real_fstat(fd).is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
    if !regular {
        real_close(fd);
        layer_log!(debug, "open {path}: not a regular file, through the agent");
        return Direct::Fallback;
    }
    if flags & libc::O_NONBLOCK == 0 {
        // F_SETFL sets every status flag it may change: O_APPEND as asked, and
        // O_NONBLOCK off (fcntl(2)).
        let status = (flags & libc::O_APPEND) as libc::c_ulong;
        // SAFETY: fcntl on the descriptor just opened changes only its flags.
        unsafe {
            real!(fcntl(fd, libc::F_SETFL, status): fn(c_int, c_int, libc::c_ulong) -> c_int)
        };
    }
    layer_log!(
        debug,
        "open {path}: direct, the target's file as fd {fd} (opened in the target's root by the program itself, no hop)"
    );
    Direct::Opened(fd)
}

/// The metadata of the remote `path` (absolute, normalised, remote by the
/// rules), following a final symlink when `follow`: the agent's `Stat` (an
/// `O_PATH` open in the root and `fstat`), made here. `None`: ask the agent.
pub(super) fn stat(path: &str, follow: bool) -> Option<Result<FileStat, i32>> {
    let fd = match open_path("stat", path, follow)? {
        Ok(fd) => fd,
        Err(errno) => return Some(Err(errno)),
    };
    let st = real_fstat(fd);
    real_close(fd);
    let st = st?;
    layer_log!(debug, "stat {path}: direct, in the target's root (no hop)");
    Some(Ok(file_stat(&st)))
}

/// Opens `path` in the target's root as an `O_PATH` descriptor (following a
/// final symlink when `follow`), for a call that acts on the file without
/// opening it; `what` names the call in the log. `None`: take the agent's path.
fn open_path(what: &str, path: &str, follow: bool) -> Option<Result<c_int, i32>> {
    let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
    resolve(what, path, libc::O_PATH | libc::O_CLOEXEC | nofollow)
}

/// `openat2(root, path, flags)` confined to the target's root for the call
/// `what`: the descriptor, an errno the agent would meet too (logged), or
/// `None` for the agent's path (logged).
fn resolve(what: &str, path: &str, flags: c_int) -> Option<Result<c_int, i32>> {
    let root = root()?;
    let cpath = CString::new(path).ok()?;
    // SAFETY: open_how is plain old data; zero is "no mode".
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    match openat2(root, &cpath, how) {
        Ok(fd) => Some(Ok(fd)),
        Err(errno) if same_for_the_agent(errno) => {
            layer_log!(debug, "{what} {path}: direct, failed with errno {errno}");
            Some(Err(errno))
        }
        Err(errno) => {
            layer_log!(
                debug,
                "{what} {path}: direct {what} refused (errno {errno}), through the agent"
            );
            None
        }
    }
}

/// `faccessat2(2)` of the remote `path` in the target's root with the
/// program's credentials: `mode` as access(2)'s, `flags` `AT_EACCESS` and
/// `AT_SYMLINK_NOFOLLOW`. A check the program passes the agent (root) passes
/// too; one it fails for want of permission (`EACCES`, `EPERM`) is the agent's
/// to answer, as before (`None`), so the answer never changes, only its cost.
pub(super) fn access(path: &str, mode: c_int, flags: c_int) -> Option<Result<(), i32>> {
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    let fd = match open_path("access", path, follow)? {
        Ok(fd) => fd,
        Err(errno) => return Some(Err(errno)),
    };
    let result = if mode == libc::F_OK {
        Ok(())
    } else {
        // SAFETY: an empty C string with AT_EMPTY_PATH checks `fd` itself
        // (faccessat2(2), Linux 5.8).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_faccessat2,
                fd,
                c"".as_ptr(),
                mode,
                libc::AT_EMPTY_PATH | (flags & libc::AT_EACCESS),
            )
        };
        if rc == 0 { Ok(()) } else { Err(guard::errno()) }
    };
    real_close(fd);
    match result {
        Ok(()) => {
            layer_log!(
                debug,
                "access {path}: direct, in the target's root (no hop)"
            );
            Some(Ok(()))
        }
        Err(errno) if same_for_the_agent(errno) => {
            layer_log!(debug, "access {path}: direct, failed with errno {errno}");
            Some(Err(errno))
        }
        Err(errno) => {
            layer_log!(
                debug,
                "access {path}: direct access refused (errno {errno}), through the agent"
            );
            None
        }
    }
}

/// Opens the remote directory `path` in the target's root for listing
/// (`O_RDONLY | O_DIRECTORY`), for `opendir` to hand to libc's `fdopendir`: the
/// program then lists the target's directory itself, real inodes and types.
pub(super) fn open_dir(path: &str) -> Option<Result<c_int, i32>> {
    let opened = resolve(
        "opendir",
        path,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
    );
    if let Some(Ok(fd)) = opened {
        layer_log!(
            debug,
            "opendir {path}: direct, the target's directory as fd {fd} (no hop)"
        );
    }
    opened
}

/// The target of the remote symlink `path`, read in the target's root
/// (readlink(2) on an `O_PATH | O_NOFOLLOW` descriptor with an empty path);
/// `EINVAL` when `path` is no symlink, as readlink(2) says.
pub(super) fn readlink(path: &str) -> Option<Result<Vec<u8>, i32>> {
    let fd = match open_path("readlink", path, false)? {
        Ok(fd) => fd,
        Err(errno) => return Some(Err(errno)),
    };
    let result = match real_fstat(fd) {
        None => None,
        Some(st) if st.st_mode & libc::S_IFMT != libc::S_IFLNK => Some(Err(libc::EINVAL)),
        Some(_) => {
            let mut buf = vec![0u8; libc::PATH_MAX as usize];
            // SAFETY: `buf` is writable for its length; the empty path reads the
            // link `fd` itself.
            let n =
                unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                None
            } else {
                buf.truncate(n as usize);
                Some(Ok(buf))
            }
        }
    };
    real_close(fd);
    match &result {
        Some(Ok(_)) => layer_log!(
            debug,
            "readlink {path}: direct, in the target's root (no hop)"
        ),
        Some(Err(errno)) => layer_log!(debug, "readlink {path}: direct, failed with errno {errno}"),
        None => layer_log!(
            debug,
            "readlink {path}: direct readlink failed, through the agent"
        ),
    }
    result
}

/// How many times a lookup that met a concurrent mount or rename (`EAGAIN`)
/// is tried again before the open takes the agent's path (which waits
/// longer, crates/agent/src/files.rs `Raced`): with `RESOLVE_IN_ROOT` every
/// `..` fails with `EAGAIN` when any mount or rename on the system raced the
/// lookup (fs/namei.c `handle_dots`), and openat2(2) says to try again. Mount
/// churn comes in bursts (a pod starting, a recursive bind of `/`): measured
/// here, up to 7 failures in a row under a loop of `mount --rbind /` of 300
/// mounts. A retry costs one system call.
const RACE_RETRIES: u32 = 32;

/// After this many retries each one yields the CPU first, so that the writer
/// of the mount table, which may share this CPU, can finish its burst.
const RACE_YIELD_AFTER: u32 = 8;

/// `openat2(root, path, how)`, retried on `EINTR`, and on `EAGAIN` up to
/// [`RACE_RETRIES`] times. The errno otherwise.
fn openat2(root: c_int, path: &CStr, how: libc::open_how) -> Result<c_int, i32> {
    let mut raced = 0;
    loop {
        // SAFETY: `path` is a C string and `how` a valid `open_how` of the size
        // passed (openat2(2)).
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root,
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        } as c_int;
        if fd >= 0 {
            return Ok(fd);
        }
        match guard::errno() {
            libc::EINTR => continue,
            libc::EAGAIN if raced < RACE_RETRIES => {
                raced += 1;
                if raced > RACE_YIELD_AFTER {
                    std::thread::yield_now();
                }
            }
            errno => return Err(errno),
        }
    }
}

/// Whether the agent's open would fail with `errno` too: the same resolution
/// in the same root, and no credential decides these. Any other errno
/// (`EACCES`, `EPERM`, `EXDEV`, the `EAGAIN` of a concurrent mount or rename
/// that outlasted the retries, ...) sends the call to the agent.
fn same_for_the_agent(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOENT
            | libc::ENOTDIR
            | libc::ELOOP
            | libc::ENAMETOOLONG
            | libc::EISDIR
            | libc::ETXTBSY
            | libc::EROFS
            | libc::EMFILE
            | libc::ENFILE
    )
}

/// The kernel `stat` as the protocol's [`FileStat`], by the conversion the
/// agent uses too ([`graft_protocol::file_stat_of`]), for the same answer.
fn file_stat(st: &libc::stat64) -> FileStat {
    graft_protocol::file_stat_of!(st)
}

/// The root descriptor, looked up on first use; `None` when the direct path is
/// off for this process.
fn root() -> Option<c_int> {
    let fd = ROOT_FD.load(Ordering::Acquire);
    if fd == OFF {
        return None;
    }
    if fd >= 0 && still_root(fd) {
        return Some(fd);
    }
    // Never wait for the look-up: another thread's may be under way, or may
    // have been when this process forked (the lock then stays taken in the
    // child). This open takes the agent's path instead.
    let _init = match INIT.try_lock() {
        Ok(guard) => guard,
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            layer_log!(
                debug,
                "the target's root is being looked up; this open goes through the agent"
            );
            return None;
        }
    };
    let fd = ROOT_FD.load(Ordering::Acquire);
    if fd == OFF {
        return None;
    }
    if fd >= 0 {
        if still_root(fd) {
            return Some(fd);
        }
        // Not ours any more (the program closed or replaced the number): never
        // close it, open the root again.
        layer_log!(
            debug,
            "the target's root descriptor {fd} was replaced; opening it again"
        );
    }
    match open_root() {
        Ok((fd, st)) => {
            ROOT_DEV.store(st.st_dev, Ordering::Relaxed);
            ROOT_INO.store(st.st_ino, Ordering::Relaxed);
            ROOT_FD.store(fd, Ordering::Release);
            Some(fd)
        }
        Err(why) => {
            layer_log!(debug, "remote files open through the agent: {why}");
            ROOT_FD.store(OFF, Ordering::Release);
            None
        }
    }
}

fn still_root(fd: c_int) -> bool {
    real_fstat(fd).is_some_and(|st| {
        st.st_dev == ROOT_DEV.load(Ordering::Relaxed)
            && st.st_ino == ROOT_INO.load(Ordering::Relaxed)
    })
}

/// Asks the agent where the target's root is, opens it with the program's
/// credentials and checks it is the agent's. `Err` says why not.
fn open_root() -> Result<(c_int, libc::stat64), String> {
    if std::env::var_os("GRAFT_OPEN_DIRECT").is_some_and(|v| v == "0") {
        return Err("the direct path is off (GRAFT_OPEN_DIRECT=0)".into());
    }
    if !client::passes_fds() {
        return Err("the target is not on this machine or its link passes no descriptors".into());
    }
    let expected = match client::remote(RemoteRequest::TargetRoot) {
        Ok(RemoteResponse::TargetRoot(identity)) => identity,
        Ok(other) => return Err(format!("unexpected answer to TargetRoot: {other:?}")),
        Err(e) => return Err(format!("the agent names no root: {e}")),
    };
    let path = CString::new(format!("/proc/{}/root", expected.pid)).expect("no NUL in a number");
    // SAFETY: `path` is a C string; the flags ask for no file content.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            0,
        )
    } as c_int;
    if fd < 0 {
        let errno = guard::errno();
        return Err(format!(
            "this program may not open /proc/{}/root itself (errno {errno}): its user may not \
             inspect the target",
            expected.pid
        ));
    }
    let checked = identity(fd, expected.pid).and_then(|seen| {
        if seen == expected {
            real_fstat(fd).ok_or_else(|| "fstat of the root failed".to_owned())
        } else {
            Err(format!(
                "/proc/{}/root is not the agent's root ({seen:?} against {expected:?}): the \
                 target is gone or changed its root",
                expected.pid
            ))
        }
    });
    match checked {
        Ok(st) => {
            layer_log!(
                debug,
                "remote files open directly in /proc/{}/root as fd {fd} (the program's own credentials)",
                expected.pid
            );
            Ok((fd, st))
        }
        Err(why) => {
            real_close(fd);
            Err(why)
        }
    }
}

/// The [`RootIdentity`] of the directory `fd`, computed as the agent does.
fn identity(fd: c_int, pid: u32) -> Result<RootIdentity, String> {
    // SAFETY: statx is plain old data.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer, the path an empty C string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_statx,
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_INO | libc::STATX_MNT_ID | STATX_MNT_ID_UNIQUE,
            &mut st as *mut libc::statx,
        )
    };
    if rc != 0 {
        return Err(format!(
            "statx of the root failed (errno {})",
            guard::errno()
        ));
    }
    Ok(RootIdentity {
        pid,
        dev: (u64::from(st.stx_dev_major) << 32) | u64::from(st.stx_dev_minor),
        ino: st.stx_ino,
        mnt_id: st.stx_mnt_id,
    })
}
