//! The helper builds the isolated namespace's root that graft planned
//! (`files.rs`), inside its private mount namespace, and moves into it:
//!
//! 1. a tmpfs at the planned directory;
//! 2. per top-level entry: a recursive bind of this machine's `/NAME`, a copied
//!    symbolic link, or a FUSE mount: `/dev/fuse` opened here, mounted with
//!    `fd=N` (fuse(4); allowed in a user namespace since Linux 4.18), its
//!    descriptor passed to graft, which serves it; no `allow_other`, so only the
//!    mounting user's processes get in (not even root of this machine);
//! 3. local exceptions bound over the FUSE mounts' placeholders, then the
//!    resolver's files;
//! 4. `pivot_root(2)` into it; the old root is detached; the new root's tmpfs
//!    made read-only.
//!
//! Every mount lives in the private namespace only: it goes when the helper and
//! COMMAND are gone, whatever ended them (graft killed with SIGKILL included);
//! this machine's mount table never sees one.

use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::{fcntl::OFlag, mount::MsFlags, sys::stat::Mode};

use super::files::{Layout, Top};
use super::wire::{Channel, Message};

/// Builds `layout` and moves into it; `binds` are (file, path) bound over paths of
/// the new root at the end (the resolver's files). Returns a message for graft
/// when a step fails.
pub async fn build(
    layout: &Layout,
    binds: &[(PathBuf, PathBuf)],
    channel: &Channel,
) -> Result<(), String> {
    let root = &layout.root;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    for entry in &layout.entries {
        match entry {
            Top::Local(name) => {
                let from = Path::new("/").join(name);
                let to = root.join(name);
                mount_point(&to, from.is_dir())?;
                mount(
                    Some(&from),
                    &to,
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None,
                )?;
            }
            Top::Link(name, text) => {
                std::os::unix::fs::symlink(text, root.join(name)).map_err(|e| {
                    format!("cannot copy the link /{name} into the isolated root: {e}")
                })?;
            }
            Top::Remote(name, index) => {
                let to = root.join(name);
                mount_point(&to, true)?;
                let writable = layout.mounts.get(*index).is_some_and(|m| m.writable);
                let fuse = mount_fuse(&to, writable)?;
                channel
                    .send(&Message::Fuse(*index), Some(fuse.as_fd()))
                    .await
                    .map_err(|e| format!("cannot pass the FUSE mount of /{name} to graft: {e}"))?;
            }
        }
    }
    for path in &layout.binds {
        let to = root.join(path.strip_prefix("/").unwrap_or(path));
        mount(
            Some(path),
            &to,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
    }
    for (file, path) in binds {
        let to = root.join(path.strip_prefix("/").unwrap_or(path));
        if to.exists() {
            mount(Some(file), &to, None, MsFlags::MS_BIND, None)?;
        }
    }
    // pivot_root(2): put the old root below the new one, then detach it.
    let old = root.join(".graft-old-root");
    mount_point(&old, true)?;
    nix::unistd::pivot_root(root, &old)
        .map_err(|e| format!("cannot move into the isolated root (pivot_root): {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("cannot enter the isolated root: {e}"))?;
    nix::mount::umount2("/.graft-old-root", nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| format!("cannot detach the old root: {e}"))?;
    let _ = std::fs::remove_dir("/.graft-old-root");
    mount(
        None::<&str>,
        Path::new("/"),
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None,
    )?;
    if nix::unistd::chdir(&layout.cwd).is_err() {
        eprintln!(
            "graft: the working directory {} is not in the isolated namespace; COMMAND starts in /",
            layout.cwd.display()
        );
    }
    Ok(())
}

/// An empty directory or file at `path` (in the new root's tmpfs).
fn mount_point(path: &Path, dir: bool) -> Result<(), String> {
    let made = if dir {
        std::fs::create_dir(path)
    } else {
        std::fs::File::create(path).map(drop)
    };
    made.map_err(|e| {
        format!(
            "cannot make the mount point {} in the isolated root: {e}",
            path.display()
        )
    })
}

/// Mounts a new FUSE connection at `dir`; returns its `/dev/fuse` descriptor.
fn mount_fuse(dir: &Path, writable: bool) -> Result<OwnedFd, String> {
    let fuse = nix::fcntl::open("/dev/fuse", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| {
            format!(
                "cannot open /dev/fuse for the target's files ({e}): load the FUSE module \
             (`modprobe fuse`), or pass --fs local to keep this machine's files"
            )
        })?;
    let options = format!(
        "fd={},rootmode=40000,user_id={},group_id={}",
        fuse.as_raw_fd(),
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME;
    if !writable {
        flags |= MsFlags::MS_RDONLY;
    }
    let fstype = format!("fuse.{}", graft_mount::SUBTYPE);
    mount(
        Some(graft_mount::FSNAME),
        dir,
        Some(fstype.as_str()),
        flags,
        Some(options.as_str()),
    )?;
    Ok(fuse)
}

fn mount<S: nix::NixPath + ?Sized>(
    source: Option<&S>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    nix::mount::mount(source, target, fstype, flags, data).map_err(|e| {
        format!(
            "cannot mount {} in the isolated namespace: {e}",
            target.display()
        )
    })
}
