//! Remote directories: for a local target whose root the program may open,
//! `opendir` opens the target's directory itself ([`direct::open_dir`]) and
//! libc lists it; otherwise it returns a fake `DIR*` of our own listing the
//! agent's entries, told apart from libc's by a registry of live pointers;
//! `readdir`, `closedir`, `dirfd`, `rewinddir`, `telldir`, `seekdir` serve it.

use super::*;

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
        match direct::open_dir(&path) {
            Some(Ok(fd)) => {
                // SAFETY: `fd` is a directory this hook just opened; libc's
                // `DIR*` owns it from here.
                let dir = unsafe {
                    real!(fdopendir(fd): fn(c_int) -> *mut DIR, missing = std::ptr::null_mut())
                };
                if dir.is_null() {
                    let errno = guard::errno();
                    real_close(fd);
                    set_errno(errno);
                }
                return dir;
            }
            Some(Err(errno)) => {
                set_errno(errno);
                return std::ptr::null_mut();
            }
            None => {}
        }
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
