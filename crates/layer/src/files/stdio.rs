//! stdio: `fopen` and its aliases open remote files through [`super::open`]'s
//! logic; `fclose` writes a written remote file back before libc closes it.

use super::*;

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

/// Opens a remote path for stdio: [`Handled::Libc`] when it is local after all.
///
/// # Safety
///
/// `path` and `mode` must be C strings.
unsafe fn fopen_remote(path: *const c_char, mode: *const c_char) -> Handled<c_int> {
    // SAFETY: forwarded contract.
    let Some(path) = (unsafe { remote_path(libc::AT_FDCWD, path) }) else {
        return Handled::Libc;
    };
    if mode.is_null() {
        return Handled::Libc;
    }
    // SAFETY: the caller guarantees a C string.
    let Some(flags) = fopen_flags(unsafe { CStr::from_ptr(mode) }.to_bytes()) else {
        return Handled::Libc;
    };
    let opened = open_remote(&path, flags, 0o666);
    if opened == Handled::Libc && writes_locally(flags) {
        // Recorded before the local fopen, which happens in the caller: should
        // it fail, the path stays local anyway.
        local_writes::record(&path);
    }
    opened
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
                    Handled::Libc => real(),
                    Handled::Done(Err(e)) => {
                        set_errno(e);
                        std::ptr::null_mut()
                    }
                    Handled::Done(Ok(fd)) => {
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
                    Handled::Libc => real(),
                    Handled::Done(Err(e)) => {
                        // freopen closes the stream even when the open fails.
                        // SAFETY: the caller's stream.
                        unsafe { libc::fclose(stream) };
                        set_errno(e);
                        std::ptr::null_mut()
                    }
                    Handled::Done(Ok(fd)) => {
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
}
