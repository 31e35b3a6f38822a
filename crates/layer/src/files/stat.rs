//! The `stat` family (`stat`, `lstat`, `fstat`, `fstatat`, `statx` and glibc's
//! old `__xstat` entry points) filled from the agent's metadata.

use super::*;

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

/// The remote metadata of a special descriptor, [`Handled::Libc`] when `fd` is
/// not ours.
fn fd_stat(fd: c_int) -> Handled<FileStat> {
    let Some(kind) = fds::get(fd) else {
        return Handled::Libc;
    };
    match kind {
        FdKind::RemoteFile(RemoteFile { mut stat, .. }) => {
            if let Some(local) = real_fstat(fd) {
                stat.size = local.st_size as u64;
                stat.blocks = stat.size.div_ceil(512);
            }
            Handled::Done(Ok(stat))
        }
        FdKind::RemoteDir { path } => Handled::Done(remote_stat(&path, true)),
        _ => Handled::Libc,
    }
}

/// Where a `stat`-like call looks.
enum StatTarget {
    Fd(c_int),
    Path(c_int, *const c_char, bool),
}

/// Remote metadata for `target`, or [`Handled::Libc`].
///
/// # Safety
///
/// A path must be null or a C string.
unsafe fn stat_of(target: StatTarget) -> Handled<FileStat> {
    match target {
        StatTarget::Fd(fd) => fd_stat(fd),
        StatTarget::Path(dirfd, path, follow) => {
            // SAFETY: forwarded contract.
            match unsafe { remote_path(dirfd, path) } {
                Some(path) => Handled::Done(remote_stat(&path, follow)),
                None => Handled::Libc,
            }
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
    // SAFETY: forwarded contract.
    unsafe { stat_hook_slow(target, buf, fill, real) }
}

/// [`stat_hook`] past the fast test, out of line as `open`'s is, so that the
/// local calls the fast test settles run a short function.
///
/// # Safety
///
/// As [`stat_hook`].
#[cold]
#[inline(never)]
unsafe fn stat_hook_slow<B>(
    target: StatTarget,
    buf: *mut B,
    fill: unsafe fn(*mut B, &FileStat),
    real: impl FnOnce() -> c_int + Copy,
) -> c_int {
    hooked(real, || {
        // SAFETY: forwarded contract.
        match unsafe { stat_of(target) } {
            Handled::Libc => real(),
            Handled::Done(Ok(st)) => {
                if buf.is_null() {
                    set_errno(libc::EFAULT);
                    return -1;
                }
                // SAFETY: the caller's buffer.
                unsafe { fill(buf, &st) };
                0
            }
            Handled::Done(Err(e)) => {
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
