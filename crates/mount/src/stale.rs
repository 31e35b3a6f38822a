//! Dead graft mounts: a graft that was killed (`SIGKILL`, a crash) cannot unmount,
//! and its mount point then answers every access with `ENOTCONN` ("Transport
//! endpoint is not connected") until someone runs `fusermount3 -u DIR`.
//! [`sweep_stale`] finds this user's dead graft mounts in `/proc/self/mountinfo`
//! (`proc(5)`) and unmounts them; `graft mount` runs it at start and `graft clean`
//! on demand.

use std::path::{Path, PathBuf};

/// The FUSE subtype graft mounts with (the mount table's type is `fuse.graft`
/// when mounted through fusermount3).
pub const SUBTYPE: &str = "graft";

/// The source name graft mounts with (the mount table's second-to-last field).
pub const FSNAME: &str = "graft";

/// A graft FUSE mount listed in `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraftMount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The uid that mounted it (`user_id=` of the super options).
    pub uid: u32,
}

/// The graft FUSE mounts in `mountinfo` text (the format of `proc(5)`).
pub fn parse_mountinfo(text: &str) -> Vec<GraftMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut right = right.split(' ');
        let (Some(fstype), Some(source), Some(options)) =
            (right.next(), right.next(), right.next())
        else {
            continue;
        };
        // mount(2) as root shows `fuse graft`, fusermount3 `fuse.graft graft`.
        let ours = source == FSNAME && (fstype == "fuse" || fstype == format!("fuse.{SUBTYPE}"));
        if !ours {
            continue;
        }
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        let uid = options
            .split(',')
            .find_map(|o| o.strip_prefix("user_id="))
            .and_then(|v| v.parse().ok());
        let Some(uid) = uid else { continue };
        out.push(GraftMount {
            mount_point: PathBuf::from(unescape(mount_point)),
            uid,
        });
    }
    out
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(byte) = u8::from_str_radix(digits, 8) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the mount at `dir` has lost its server (`ENOTCONN` on `stat`).
pub fn is_dead(dir: &Path) -> bool {
    matches!(
        std::fs::metadata(dir),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN)
    )
}

/// Unmounts `dir`: lazily with `umount2(MNT_DETACH)` as root, through
/// `fusermount3 -u -z` otherwise (the setuid helper of Debian's `fuse3`).
///
/// # Errors
///
/// What `umount2` or `fusermount3` said.
pub fn unmount(dir: &Path) -> Result<(), String> {
    if nix::unistd::geteuid().is_root() {
        return nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| format!("umount2 {}: {e}", dir.display()));
    }
    let output = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(dir)
        .output()
        .map_err(|e| format!("running fusermount3 (Debian package fuse3): {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "fusermount3 -u -z {}: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Unmounts every dead graft mount of the current user (every user's, as root)
/// and returns where they were. Live mounts (a running `graft mount`) are left
/// alone; failures are logged and skipped.
pub fn sweep_stale() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let me = nix::unistd::geteuid();
    let mut swept = Vec::new();
    for mount in parse_mountinfo(&text) {
        if !me.is_root() && mount.uid != me.as_raw() {
            continue;
        }
        if !is_dead(&mount.mount_point) {
            continue;
        }
        match unmount(&mount.mount_point) {
            Ok(()) => swept.push(mount.mount_point),
            Err(e) => tracing::warn!("could not remove a dead graft mount: {e}"),
        }
    }
    swept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_graft_mounts_and_their_owner() {
        let text = "\
36 35 98:0 / /mnt1 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
120 29 0:52 / /tmp/my\\040dir rw,nosuid,nodev,relatime shared:66 - fuse.graft graft rw,user_id=1000,group_id=1000
121 29 0:53 / /tmp/other rw,nosuid,nodev - fuse.sshfs host: rw,user_id=0,group_id=0
56 27 0:65 / /tmp/fuse-m1 ro,nosuid,nodev,noatime - fuse graft ro,user_id=0,group_id=0
57 27 0:66 / /tmp/not-ours ro,nosuid,nodev,noatime - fuse other ro,user_id=0,group_id=0
";
        assert_eq!(
            parse_mountinfo(text),
            vec![
                GraftMount {
                    mount_point: PathBuf::from("/tmp/my dir"),
                    uid: 1000
                },
                GraftMount {
                    mount_point: PathBuf::from("/tmp/fuse-m1"),
                    uid: 0
                }
            ]
        );
    }

    #[test]
    fn a_plain_directory_is_not_dead() {
        assert!(!is_dead(Path::new("/")));
    }
}
