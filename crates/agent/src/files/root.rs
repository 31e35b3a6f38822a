//! The target's root directory and the confined path resolution below it
//! ([`TargetRoot`]): every path is resolved with `openat2(RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS)` relative to the descriptor of `/proc/PID/root`, and a
//! lookup that met a concurrent mount or rename is tried again ([`Raced`]).

use std::os::fd::OwnedFd;

use graft_protocol::remote::RootIdentity;
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

/// How a confined lookup that met a concurrent mount or rename is tried again.
///
/// With `RESOLVE_IN_ROOT` every `..` checks that no mount or rename happened
/// anywhere on the system since the lookup began, and fails with `EAGAIN` when
/// one did (fs/namei.c `handle_dots`; openat2(2): "the caller should retry").
/// A node's mounts churn in bursts (a pod starting, a recursive bind of `/`
/// and its unmount touch the mount table hundreds of times in a few
/// milliseconds), so a path with `..` that crosses a mount can fail many times
/// in a row: measured here, up to 7 consecutive failures under a loop of
/// `mount --rbind /` of 300 mounts. The lookup is tried again at once
/// [`Raced::SPINS`] times, then every millisecond until [`Raced::PATIENCE`]
/// has passed; only then does the caller see `EAGAIN`, which no program
/// expects from `open` or `stat`. It runs on the blocking pool, so the wait
/// holds no other request up.
struct Raced {
    tries: u32,
    since: Option<std::time::Instant>,
}

impl Raced {
    const SPINS: u32 = 16;
    const PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

    fn new() -> Self {
        Raced {
            tries: 0,
            since: None,
        }
    }

    /// Whether to try again after one more `EAGAIN` (having waited if due).
    fn again(&mut self) -> bool {
        self.tries += 1;
        if self.tries <= Self::SPINS {
            return true;
        }
        let since = *self.since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() >= Self::PATIENCE {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        true
    }
}

/// The target's root directory, and confined path resolution below it.
#[derive(Debug)]
pub struct TargetRoot {
    dir: OwnedFd,
}

impl TargetRoot {
    /// Wraps a descriptor of the target's root directory (`O_PATH` is enough).
    pub fn new(dir: OwnedFd) -> TargetRoot {
        TargetRoot { dir }
    }

    /// Opens `path` (as the target sees it) with `flags`, confined to the root.
    ///
    /// # Errors
    ///
    /// The `openat2` errno; `ENOENT` for an empty path.
    pub fn open(&self, path: &str, flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
        if path.is_empty() {
            return Err(Errno::NOENT);
        }
        let mode = if flags.contains(OFlags::CREATE) {
            mode
        } else {
            // openat2 refuses a mode without O_CREAT / O_TMPFILE.
            Mode::empty()
        };
        let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
        let mut raced = Raced::new();
        loop {
            match rustix::fs::openat2(&self.dir, path, flags | OFlags::CLOEXEC, mode, resolve) {
                Err(Errno::AGAIN) if raced.again() => {}
                other => return other,
            }
        }
    }

    /// The identity of the root directory itself ([`RootIdentity`], for the
    /// target's process `pid`): what a program on this machine compares with the
    /// `/proc/PID/root` it opens itself (see [`RemoteRequest::TargetRoot`]).
    ///
    /// # Errors
    ///
    /// The errno of `statx(2)`.
    pub fn identity(&self, pid: u32) -> Result<RootIdentity, Errno> {
        use rustix::fs::{StatxFlags, statx};
        // STATX_MNT_ID_UNIQUE (Linux 6.8, include/uapi/linux/stat.h); older
        // kernels answer STATX_MNT_ID instead, as they do for the layer.
        let unique = StatxFlags::from_bits_retain(0x4000);
        let st = statx(
            &self.dir,
            "",
            AtFlags::EMPTY_PATH,
            StatxFlags::INO | StatxFlags::MNT_ID | unique,
        )?;
        Ok(RootIdentity {
            pid,
            dev: (u64::from(st.stx_dev_major) << 32) | u64::from(st.stx_dev_minor),
            ino: st.stx_ino,
            mnt_id: st.stx_mnt_id,
        })
    }

    /// Metadata of `path`, following a final symlink when `follow`.
    ///
    /// # Errors
    ///
    /// The errno of the open or the `fstat`.
    pub fn stat(&self, path: &str, follow: bool) -> Result<Stat, Errno> {
        let mut flags = OFlags::PATH;
        if !follow {
            flags |= OFlags::NOFOLLOW;
        }
        let fd = self.open(path, flags, Mode::empty())?;
        rustix::fs::fstat(&fd)
    }

    /// Reads a whole (small) file, at most `limit` bytes.
    ///
    /// # Errors
    ///
    /// The errno of the open or a read.
    pub fn read_to_end(&self, path: &str, limit: usize) -> Result<Vec<u8>, Errno> {
        let fd = self.open(path, OFlags::RDONLY, Mode::empty())?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while out.len() < limit {
            let n = retry_intr(|| rustix::io::read(&fd, &mut buf[..]))?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out.truncate(limit);
        Ok(out)
    }

    /// Resolves the parent directory of `path` (confined) and returns it with the
    /// last component, which is a single name: not empty, `.` or `..`.
    pub(super) fn parent_of(&self, path: &str) -> Result<(OwnedFd, String), Errno> {
        let trimmed = path.trim_end_matches('/');
        if trimmed.is_empty() {
            // The root itself (or an empty path).
            return Err(if path.is_empty() {
                Errno::NOENT
            } else {
                Errno::BUSY
            });
        }
        let (parent, name) = match trimmed.rfind('/') {
            Some(i) => (&trimmed[..=i], &trimmed[i + 1..]),
            None => (".", trimmed),
        };
        if name == "." || name == ".." {
            return Err(Errno::INVAL);
        }
        let dir = self.open(parent, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        Ok((dir, name.to_owned()))
    }
}

pub(super) fn retry_intr<T>(mut f: impl FnMut() -> Result<T, Errno>) -> Result<T, Errno> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}
