//! Calls on paths that open nothing: `access`, `readlink`, `realpath`, extended
//! attributes, and the changes `--fs write` sends to the target (`mkdir`,
//! `unlink`, `rmdir`, `rename`).

use super::*;

/// `access`-like hooks.
///
/// # Safety
///
/// `path` must be null or a C string.
unsafe fn access_hook(
    dirfd: c_int,
    path: *const c_char,
    mode: c_int,
    flags: c_int,
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
        if let Some(done) = direct::access(&path, mode, flags) {
            return ret(done.map(|()| 0));
        }
        ret(match call(RemoteRequest::Access { path, mode }) {
            Ok(RemoteResponse::Done) => Ok(0),
            Ok(other) => Err(unexpected("Access", other)),
            Err(e) => Err(e),
        })
    })
}

macro_rules! export_access {
    ($name:ident, $flags:expr) => {
        /// `access(2)` alias (checked in the target's root with the program's
        /// credentials where that passes, else by the agent with its own).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, mode: c_int) -> c_int {
            // SAFETY: forwards the caller's arguments unchanged.
            let real = || unsafe { real!($name(path, mode): fn(*const c_char, c_int) -> c_int) };
            // SAFETY: the caller's path.
            unsafe { access_hook(libc::AT_FDCWD, path, mode, $flags, real) }
        }
    };
}
export_access!(access, 0);
export_access!(euidaccess, libc::AT_EACCESS);
export_access!(eaccess, libc::AT_EACCESS);

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
    unsafe { access_hook(dirfd, path, mode, flags, real) }
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
        ret(remote_readlink(&path).map(|target| {
            let n = target.len().min(size);
            // SAFETY: the caller's buffer holds `size` ≥ `n` bytes.
            unsafe { std::ptr::copy_nonoverlapping(target.as_ptr(), buf.cast::<u8>(), n) };
            n as ssize_t
        }))
    })
}

/// The target of the remote symlink `path`: read directly in the target's
/// root where the program may ([`direct::readlink`]), else by the agent.
fn remote_readlink(path: &str) -> Result<Vec<u8>, i32> {
    if let Some(answer) = direct::readlink(path) {
        return answer;
    }
    match call(RemoteRequest::ReadLink {
        path: path.to_owned(),
    })? {
        RemoteResponse::Link(target) => Ok(target.into_bytes()),
        other => Err(unexpected("ReadLink", other)),
    }
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
            let target =
                String::from_utf8(remote_readlink(&candidate)?).map_err(|_| libc::EILSEQ)?;
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
