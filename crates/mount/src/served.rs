//! Serving a FUSE connection that someone else mounted: `graft run --isolate`'s
//! helper mounts inside its private mount namespace (`mount(2)` with `fd=N` on a
//! `/dev/fuse` it opened, `fuse(4)`) and passes the descriptor to graft, which
//! serves it here. Nothing is mounted in graft's own namespace, so nothing can be
//! left behind on this machine: the mount goes with the namespace, and the
//! connection ends (`ENODEV` on the device) when the last mount of it is gone.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use graft_proxy::Session;

use crate::MountOptions;
use crate::fs::RemoteFs;
use crate::placeholders::{AtOwnPath, Placeholder, Placeholders};

/// How many threads serve one connection passed in (a namespace holds several
/// mounts; each sees less traffic than a `graft mount`).
const THREADS: usize = 2;

/// A FUSE connection being served; dropping it makes every further request fail
/// with `EIO` (the connection itself ends with its mounts).
pub struct Served {
    closing: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served").finish_non_exhaustive()
    }
}

impl Served {
    /// Fails further requests and waits up to `wait` for the connection to end
    /// (it ends when its mounts are gone); whether it ended.
    pub fn close(mut self, wait: Duration) -> bool {
        self.closing.store(true, Ordering::Relaxed);
        let Some(thread) = self.thread.take() else {
            return true;
        };
        let deadline = Instant::now() + wait;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !thread.is_finished() {
            return false;
        }
        if let Ok(Err(e)) = thread.join() {
            tracing::debug!("mount: a passed FUSE connection ended with {e}");
        }
        true
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Relaxed);
    }
}

/// Serves the FUSE connection `fd` (a `/dev/fuse` descriptor already mounted
/// with `fd=`, its `FUSE_INIT` waiting) as the target's `options.root`, with
/// `placeholders` (mount-relative paths) shown whatever the target holds, and a
/// symbolic link that leaves the subtree shown as the absolute path it resolves to
/// in the target when `at_own_path` says that path shows at its own path. The
/// handshake and the requests run on their own threads, which block on `runtime`.
/// `options.allow_other` only sets what fuser checks; the kernel's check is the
/// mount's own `allow_other` option.
///
/// # Errors
///
/// When the serving thread cannot be started.
pub fn serve(
    session: Arc<Session>,
    runtime: tokio::runtime::Handle,
    fd: OwnedFd,
    options: &MountOptions,
    placeholders: &[(String, Placeholder)],
    at_own_path: AtOwnPath,
) -> std::io::Result<Served> {
    let closing = Arc::new(AtomicBool::new(false));
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    let filesystem = RemoteFs::new(
        session,
        runtime,
        &options.root,
        options.writable,
        closing.clone(),
        Placeholders::new(placeholders, uid, gid).with_links_at_own_path(at_own_path),
    );
    let mut config = fuser::Config::default();
    config.n_threads = Some(THREADS);
    let acl = if options.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.acl = acl;
    let root = options.root.clone();
    let thread = std::thread::Builder::new()
        .name("graft-mount".to_owned())
        .spawn(move || {
            let session = fuser::Session::from_fd(filesystem, fd, acl, config)?;
            tracing::debug!("mount: serving the target's {root} in the isolated namespace");
            session.run()
        })?;
    Ok(Served {
        closing,
        thread: Some(thread),
    })
}
