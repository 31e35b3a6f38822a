//! The per-session directory (agent socket, layer socket, logs) and the session
//! secret.
//!
//! `/run/graft/<id>` when graft runs as root, else `$XDG_RUNTIME_DIR/graft/<id>` or
//! `/tmp/graft-<uid>/<id>`; mode 0700, removed when the session ends.

use std::{
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use crate::failure::Failure;

/// The session directory; removed (with everything in it) on drop.
#[derive(Debug)]
pub struct SessionDir {
    path: PathBuf,
}

impl SessionDir {
    /// Creates a fresh session directory under the base for `uid`.
    pub fn create(uid: u32, runtime_dir: Option<PathBuf>) -> Result<SessionDir, Failure> {
        let base = base_dir(uid, runtime_dir);
        let fail = |what: &str, path: &Path, e: std::io::Error| {
            Failure::session(format!("cannot {what} {}: {e}", path.display()))
                .hint("check that the directory is writable, or set XDG_RUNTIME_DIR to one that is")
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&base)
            .map_err(|e| fail("create", &base, e))?;
        let meta = std::fs::metadata(&base).map_err(|e| fail("inspect", &base, e))?;
        if meta.uid() != uid {
            return Err(Failure::session(format!(
                "{} belongs to uid {}, not to you (uid {uid}); refusing to put session secrets there",
                base.display(),
                meta.uid()
            ))
            .hint("remove it, or set XDG_RUNTIME_DIR to a directory of your own"));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| fail("restrict", &base, e))?;
        }
        sweep_stale(&base);
        let path = base.join(random_hex(8)?);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| fail("create", &path, e))?;
        let dir = SessionDir { path };
        // Written aside and renamed, so a concurrent sweep never reads it half
        // written.
        let tmp = dir.path.join(format!("{PID_FILE}.tmp"));
        std::fs::write(&tmp, std::process::id().to_string())
            .and_then(|()| std::fs::rename(&tmp, dir.path.join(PID_FILE)))
            .map_err(|e| fail("write in", &dir.path, e))?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SessionDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(dir = %self.path.display(), error = %e, "cannot remove the session directory");
        }
    }
}

/// The file in a session directory naming the graft process that owns it.
const PID_FILE: &str = "graft.pid";

/// Removes session directories left behind by a graft that was killed (`kill -9`
/// gives it no chance to clean up): those whose owner process is gone.
fn sweep_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(pid) = std::fs::read_to_string(dir.join(PID_FILE)) else {
            continue;
        };
        let Ok(pid) = pid.trim().parse::<u32>() else {
            // Not a pid graft wrote: not ours to judge.
            continue;
        };
        if !graft_proc::exists(pid) {
            tracing::debug!(dir = %dir.display(), "removing a stale session directory");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Where session directories live for `uid`.
pub fn base_dir(uid: u32, runtime_dir: Option<PathBuf>) -> PathBuf {
    if uid == 0 {
        PathBuf::from("/run/graft")
    } else if let Some(dir) = runtime_dir.filter(|d| d.is_absolute()) {
        dir.join("graft")
    } else {
        PathBuf::from(format!("/tmp/graft-{uid}"))
    }
}

/// `bytes` random bytes from the kernel, as lowercase hex.
pub fn random_hex(bytes: usize) -> Result<String, Failure> {
    graft_protocol::secret::random_hex(bytes).map_err(|e| Failure::session_error(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_depends_on_who_runs() {
        assert_eq!(
            base_dir(0, Some("/run/user/0".into())),
            PathBuf::from("/run/graft")
        );
        assert_eq!(
            base_dir(1000, Some("/run/user/1000".into())),
            PathBuf::from("/run/user/1000/graft")
        );
        assert_eq!(base_dir(1000, None), PathBuf::from("/tmp/graft-1000"));
        assert_eq!(
            base_dir(1000, Some("relative".into())),
            PathBuf::from("/tmp/graft-1000")
        );
    }

    #[test]
    fn secrets_are_random_hex() {
        let a = random_hex(32).unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_hex(32).unwrap());
    }

    #[test]
    fn session_dir_is_private_and_removed() {
        let runtime = tempfile::tempdir().unwrap();
        let uid = nix::unistd::getuid().as_raw();
        // As root the base is /run/graft whatever the runtime dir; both work here.
        let dir = SessionDir::create(uid, Some(runtime.path().to_owned())).unwrap();
        let path = dir.path().to_owned();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn directories_of_dead_sessions_are_swept() {
        let base = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = base.path().join("stale");
        let live = base.path().join("live");
        let foreign = base.path().join("foreign");
        let half_written = base.path().join("half-written");
        for (dir, pid) in [
            (&stale, Some(dead.to_string())),
            (&live, Some(std::process::id().to_string())),
            (&foreign, None),
            (&half_written, Some(String::new())),
        ] {
            std::fs::create_dir(dir).unwrap();
            if let Some(pid) = pid {
                std::fs::write(dir.join(PID_FILE), pid).unwrap();
            }
        }
        sweep_stale(base.path());
        assert!(!stale.exists());
        assert!(live.exists());
        assert!(
            foreign.exists(),
            "a directory without a pid file is not ours to remove"
        );
        assert!(
            half_written.exists(),
            "regression: a sweep raced a graft still writing its pid file and removed its session"
        );
    }
}
