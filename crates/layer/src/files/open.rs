//! `open` and its aliases, `creat`: a remote file becomes a memfd the program
//! reads at memory speed; under `--fs write` the agent's handle is kept and the
//! memfd written back on `close`, `fsync` and `fdatasync`.

use super::*;

/// A placeholder descriptor for the remote directory `path`.
pub(super) fn dir_placeholder(path: &str, cloexec: bool) -> Result<c_int, i32> {
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

pub(super) fn remote_stat(path: &str, follow: bool) -> Result<FileStat, i32> {
    if let Some(answer) = super::direct::stat(path, follow) {
        return answer;
    }
    match call(RemoteRequest::Stat {
        path: path.to_owned(),
        follow,
    })? {
        RemoteResponse::Stat(st) => Ok(st),
        other => Err(unexpected("Stat", other)),
    }
}

pub(super) fn close_handle(handle: FileHandle) {
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
pub(super) fn open_remote(path: &str, flags: c_int, mode: mode_t) -> Handled<c_int> {
    let access = flags & libc::O_ACCMODE;
    let writing = access != libc::O_RDONLY || flags & (libc::O_CREAT | libc::O_TRUNC) != 0;
    if flags & libc::O_TMPFILE == libc::O_TMPFILE || (writing && !write_mode()) {
        return Handled::Libc;
    }
    Handled::Done(open_remote_inner(path, flags, mode, writing))
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
    match super::direct::open(path, flags) {
        super::direct::Direct::Opened(fd) => return Ok(fd),
        super::direct::Direct::Failed(errno) => return Err(errno),
        super::direct::Direct::Fallback => {}
    }
    if client::passes_fds() {
        match open_passed(path, flags, mode) {
            Ok(fd) => return Ok(fd),
            Err(Some(errno)) => return Err(errno),
            Err(None) => layer_log!(debug, "open {path}: relayed (not passed as a descriptor)"),
        }
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

/// Opens `path` in the target's root as the file itself: the agent opens it and
/// passes the descriptor, which the program then reads, writes, maps and stats
/// directly (a live file, not a copy). `Err(None)` when it cannot be passed (not
/// a regular file): the caller relays it instead.
fn open_passed(path: &str, flags: c_int, mode: mode_t) -> Result<c_int, Option<i32>> {
    let access = flags & libc::O_ACCMODE;
    let open_flags = OpenFlags {
        read: access != libc::O_WRONLY,
        write: access != libc::O_RDONLY,
        create: flags & libc::O_CREAT != 0,
        exclusive: flags & libc::O_EXCL != 0,
        truncate: flags & libc::O_TRUNC != 0,
        append: flags & libc::O_APPEND != 0,
        directory: false,
        no_follow: flags & libc::O_NOFOLLOW != 0,
    };
    let request = RemoteRequest::OpenFd {
        path: path.to_owned(),
        flags: open_flags,
        mode,
    };
    let fd = match client::open_fd(request) {
        Ok((fd, _stat)) => std::os::fd::IntoRawFd::into_raw_fd(fd),
        Err(RemoteError::Os(errno)) => return Err(Some(errno)),
        Err(e) => {
            layer_log!(debug, "open {path}: no descriptor passed: {e}");
            return Err(None);
        }
    };
    // The descriptor arrives close-on-exec; the program's flags decide.
    // SAFETY: fcntl on the descriptor we just received changes only its flags.
    unsafe {
        if flags & libc::O_CLOEXEC == 0 {
            real!(fcntl(fd, libc::F_SETFD, 0): fn(c_int, c_int, libc::c_ulong) -> c_int);
        }
        if flags & libc::O_NONBLOCK != 0 {
            let fl = real!(fcntl(fd, libc::F_GETFL, 0): fn(c_int, c_int, libc::c_ulong) -> c_int);
            real!(fcntl(fd, libc::F_SETFL, (fl | libc::O_NONBLOCK) as libc::c_ulong): fn(c_int, c_int, libc::c_ulong) -> c_int);
        }
    }
    layer_log!(
        debug,
        "open {path}: the target's file itself as fd {fd} (descriptor passed)"
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
    // SAFETY: forwarded contract.
    unsafe { open_maybe_remote(dirfd, path, flags, mode, real) }
}

/// [`open_hook`] past the fast test: out of line, so that the local opens the
/// fast test settles run a short function that saves few registers and ends
/// in a jump to libc's `open`.
///
/// # Safety
///
/// As [`open_hook`].
#[cold]
#[inline(never)]
unsafe fn open_maybe_remote(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: mode_t,
    real: impl FnOnce() -> c_int + Copy,
) -> c_int {
    hooked(real, || {
        // SAFETY: forwarded contract.
        let Some(path) = (unsafe { remote_path(dirfd, path) }) else {
            return real();
        };
        match open_remote(&path, flags, mode) {
            Handled::Libc => {
                let fd = real();
                if fd >= 0 && writes_locally(flags) {
                    local_writes::record(&path);
                }
                fd
            }
            Handled::Done(r) => ret(r),
        }
    })
}

/// Whether an open with `flags` of a remote path was kept local because it
/// writes under `--fs read` ([`open_remote`]): the path is the program's local
/// file from then on ([`local_writes`]).
pub(super) fn writes_locally(flags: c_int) -> bool {
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
            let real = move || unsafe {
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
            let real = move || unsafe { real!($name(path, flags): fn(*const c_char, c_int) -> c_int) };
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
            let real = move || unsafe {
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
            let real = move || unsafe {
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
            let real = move || unsafe { real!($name(path, mode): fn(*const c_char, mode_t) -> c_int) };
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
pub(super) fn forget(fd: c_int) {
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
    let real = move || unsafe { real!(fsync(fd): fn(c_int) -> c_int) };
    sync_hook(fd, real)
}

/// `fdatasync(2)`: as [`fsync`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    // SAFETY: forwards the caller's argument unchanged.
    let real = move || unsafe { real!(fdatasync(fd): fn(c_int) -> c_int) };
    sync_hook(fd, real)
}
