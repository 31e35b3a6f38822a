//! The target's filesystem as a FUSE mount on this machine, served through a graft
//! session: programs that graft's LD_PRELOAD layer cannot reach (static and Go
//! binaries, containers, an IDE) read and, with `writable`, write the target's
//! files through an ordinary directory.
//!
//! ```text
//! program ──syscalls──► kernel FUSE ──/dev/fuse──► fuser threads (RemoteFs)
//!     ──RemoteRequest──► graft_proxy::Session ──link──► agent: openat2(RESOLVE_IN_ROOT)
//! ```
//!
//! * **Paths, not inodes.** The agent's file requests name paths; the mount gives
//!   each path the kernel looked up its own node id (the root is 1), so `st_ino`
//!   is the mount's, not the target's.
//! * **Caching.** Attributes and lookups are cached by the kernel for
//!   [`ATTR_TTL`] (1 s): a change made in the target shows within that time.
//!   File data goes through the page cache, dropped at each open.
//! * **Symlinks are resolved in the target.** The kernel resolves a FUSE
//!   symlink's text itself, so an absolute `/etc/shadow` would be this machine's
//!   and `../../..` would climb out of the mount. A symlink is shown as a link
//!   whose text is rewritten: the link is resolved in the target's root (`..`
//!   stops at the root, absolute links start at it) and the result is written
//!   relative to the link's directory, never climbing above the mount's root. A
//!   link that resolves outside the mounted subtree (with a `root` other than
//!   `/`) reads as `EXDEV`. The rewritten text is safe relative to the mount's
//!   own root only: bind-mounting a *subdirectory* of a mount elsewhere lets a
//!   `..` climb into whatever surrounds the bind. To place a remote subtree at
//!   its own path, mount it with that `root` instead (one mount per subtree).
//! * **Read-only unless `writable`**: every change fails with `EROFS` (the mount
//!   is also `ro` in the kernel). Writable mounts create, write, truncate, make
//!   and remove directories, unlink and rename; `chmod`, `chown`, `utimes`
//!   (`touch` of an existing file), hard and symbolic links fail with `EPERM`
//!   (the protocol has no request for them).
//! * **Access.** Without `allow_other` the kernel lets only the mounting user in
//!   (not even root: `fuse(8)`); that user gets the agent's access to the
//!   target's files, as programs under `graft run` do.
//! * **Sizes.** Reads and writes travel in chunks of at most
//!   [`graft_protocol::codec::MAX_CHUNK_LEN`] (1 MiB); `statfs` reports no
//!   sizes (the protocol has no such request).
//! * **Ending.** Dropping the [`MountHandle`] unmounts (lazily: a process still
//!   inside gets `EIO`, the mount point is free at once). A killed graft leaves a
//!   dead mount (`ENOTCONN`): `fusermount3 -u DIR` removes it, and so do
//!   [`sweep_stale`] (run by `graft mount` at start and by `graft clean`).
//!
//! Mounting uses fuser's pure-Rust path: `mount(2)` on `/dev/fuse` as root, the
//! setuid `fusermount3` helper (Debian package `fuse3`) otherwise.

mod fs;
mod links;
mod nodes;
mod placeholders;
mod served;
mod stale;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use fs::{ATTR_TTL, REQUEST_TIMEOUT};
use graft_proxy::Session;
pub use placeholders::{AtOwnPath, Placeholder};
pub use served::{Served, serve};
pub use stale::{FSNAME, GraftMount, SUBTYPE, is_dead, parse_mountinfo, sweep_stale, unmount};

/// How many threads serve FUSE requests: several reads in flight at once keep
/// the link busy during sequential reads (the kernel's readahead is asynchronous).
const THREADS: usize = 4;

/// How long [`MountHandle::unmount`] waits for the serving threads to end.
const JOIN_WAIT: Duration = Duration::from_secs(3);

/// How to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Allow changes (`--fs write`); otherwise every change fails with `EROFS`.
    pub writable: bool,
    /// The remote directory shown at the mount point (absolute; `/` by default).
    pub root: String,
    /// Let other local users in (`allow_other`; a non-root user needs
    /// `user_allow_other` in `/etc/fuse.conf`). Off by default: only the mounting
    /// user can enter.
    pub allow_other: bool,
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions {
            writable: false,
            root: "/".to_owned(),
            allow_other: false,
        }
    }
}

/// Why mounting failed. Each message says what to do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    /// `/dev/fuse` does not exist.
    #[error(
        "/dev/fuse is missing: load the FUSE module (`modprobe fuse`), or in a container \
         pass the device (`--device /dev/fuse`)"
    )]
    NoDevice,
    /// Not root and no `fusermount3` on `PATH`.
    #[error(
        "fusermount3 is not installed: a user other than root mounts through it; \
         install the Debian package fuse3 (`apt-get install fuse3`)"
    )]
    NoFusermount,
    /// The mount point is not usable.
    #[error("cannot mount at {}: {reason}", .dir.display())]
    MountPoint {
        /// The mount point.
        dir: PathBuf,
        /// What is wrong with it and what to do.
        reason: String,
    },
    /// The remote root is not an absolute path.
    #[error("the remote root {0:?} is not an absolute path: give one starting with /")]
    BadRoot(String),
    /// The kernel or fusermount3 refused the mount.
    #[error("mounting {} failed: {error}; check `graft doctor` and that FUSE is allowed here", .dir.display())]
    Mount {
        /// The mount point.
        dir: PathBuf,
        /// The error of `mount(2)` or fusermount3.
        error: std::io::Error,
    },
}

/// A mounted target filesystem; dropping it unmounts.
pub struct MountHandle {
    dir: PathBuf,
    unmounter: Option<fuser::SessionUnmounter>,
    threads: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    closing: Arc<AtomicBool>,
}

impl std::fmt::Debug for MountHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountHandle")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl MountHandle {
    /// Where the target's files are mounted.
    pub fn mount_point(&self) -> &Path {
        &self.dir
    }

    /// Unmounts now (what dropping does), reporting a failure instead of logging
    /// it. Programs still using files below the mount get `EIO`.
    ///
    /// # Errors
    ///
    /// What `umount2` or `fusermount3 -u` said.
    pub fn unmount(mut self) -> Result<(), String> {
        self.take_down()
    }

    fn take_down(&mut self) -> Result<(), String> {
        let Some(mut unmounter) = self.unmounter.take() else {
            return Ok(());
        };
        self.closing.store(true, Ordering::Relaxed);
        // fuser's unmount first (umount(2) as root, fusermount3 -u otherwise); a
        // busy mount point (a process inside) is then detached lazily.
        if let Err(e) = unmounter.unmount() {
            tracing::debug!("mount: plain unmount of {} failed: {e}", self.dir.display());
        }
        let result = if still_mounted(&self.dir) {
            stale::unmount(&self.dir)
        } else {
            Ok(())
        };
        // The serving threads end when the kernel closes the connection (at once
        // unless a process still holds a file open below a detached mount).
        if let Some(threads) = self.threads.take() {
            let deadline = Instant::now() + JOIN_WAIT;
            while !threads.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if threads.is_finished() {
                match threads.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!("mount: the FUSE session ended with {e}"),
                    Err(_) => tracing::warn!("mount: a FUSE thread panicked"),
                }
            }
        }
        result
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.take_down() {
            tracing::warn!("unmounting {}: {e}", self.dir.display());
        }
    }
}

/// Whether `dir` is a graft mount point right now.
fn still_mounted(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| parse_mountinfo(&text).iter().any(|m| m.mount_point == dir))
        .unwrap_or(true)
}

/// Mounts the target's filesystem (the remote `options.root`) at `dir`, served
/// through `session`; FUSE requests block on `runtime`, which must not be the
/// current thread's (call from a runtime worker or plain thread, not from inside
/// `block_on` of a current-thread runtime that is the same one).
///
/// # Errors
///
/// [`MountError::NoDevice`] without `/dev/fuse`, [`MountError::NoFusermount`] when
/// not root and `fusermount3` is missing, [`MountError::MountPoint`] when `dir` is
/// not an empty directory, [`MountError::BadRoot`], [`MountError::Mount`] when the
/// kernel or fusermount3 refuses.
pub fn mount(
    session: Arc<Session>,
    runtime: tokio::runtime::Handle,
    dir: &Path,
    options: MountOptions,
) -> Result<MountHandle, MountError> {
    preflight(dir, &options)?;
    let dir = dir.canonicalize().map_err(|e| MountError::MountPoint {
        dir: dir.to_owned(),
        reason: e.to_string(),
    })?;
    let closing = Arc::new(AtomicBool::new(false));
    let filesystem = fs::RemoteFs::new(
        session,
        runtime,
        &options.root,
        options.writable,
        closing.clone(),
        placeholders::Placeholders::default(),
    );
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(FSNAME.to_owned()),
        fuser::MountOption::Subtype(SUBTYPE.to_owned()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoAtime,
        if options.writable {
            fuser::MountOption::RW
        } else {
            fuser::MountOption::RO
        },
    ];
    config.acl = if options.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(THREADS);
    let failed = |error| MountError::Mount {
        dir: dir.clone(),
        error,
    };
    let mut session = fuser::Session::new(filesystem, &dir, &config).map_err(failed)?;
    let unmounter = session.unmount_callable();
    let threads = std::thread::Builder::new()
        .name("graft-mount".to_owned())
        .spawn(move || session.run())
        .map_err(failed)?;
    Ok(MountHandle {
        dir,
        unmounter: Some(unmounter),
        threads: Some(threads),
        closing,
    })
}

/// The checks [`mount`] makes before mounting, for a caller that wants them
/// before it opens a session: an absolute `options.root`, an empty directory
/// `dir` (a dead graft mount there is removed), `/dev/fuse`, and `fusermount3`
/// when not root.
///
/// # Errors
///
/// As [`mount`], but never [`MountError::Mount`].
pub fn preflight(dir: &Path, options: &MountOptions) -> Result<(), MountError> {
    if !options.root.starts_with('/') {
        return Err(MountError::BadRoot(options.root.clone()));
    }
    check_mount_point(dir)?;
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NoDevice);
    }
    let root = nix::unistd::geteuid().is_root();
    if !root && std::env::var_os("FUSERMOUNT_PATH").is_none() && !on_path("fusermount3") {
        return Err(MountError::NoFusermount);
    }
    Ok(())
}

/// Refuses a mount point that is missing, not a directory, or not empty (files
/// there would be hidden while mounted); a dead graft mount there is removed first.
fn check_mount_point(dir: &Path) -> Result<(), MountError> {
    let fail = |reason: String| MountError::MountPoint {
        dir: dir.to_owned(),
        reason,
    };
    if is_dead(dir) {
        unmount(dir).map_err(|e| fail(format!("a dead mount is there and {e}")))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| {
        fail(format!(
            "{e}; create an empty directory for it (`mkdir -p {}`)",
            dir.display()
        ))
    })?;
    if !meta.is_dir() {
        return Err(fail(
            "it is not a directory; give an empty directory".into(),
        ));
    }
    let mut entries = std::fs::read_dir(dir).map_err(|e| fail(e.to_string()))?;
    if entries.next().is_some() {
        return Err(fail(
            "it is not empty (its files would be hidden while mounted); give an empty directory"
                .into(),
        ));
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_point_must_be_an_empty_directory() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(check_mount_point(tmp.path()).is_ok());
        std::fs::write(tmp.path().join("f"), "x").unwrap();
        let err = check_mount_point(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
        let err = check_mount_point(&tmp.path().join("f"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a directory"), "{err}");
        let err = check_mount_point(&tmp.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("mkdir -p"), "{err}");
    }
}
