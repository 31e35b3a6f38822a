//! Placeholders: paths a mount shows whatever the target holds, so that local
//! files can be bound over them (`graft run --isolate` keeps `$HOME`, the working
//! directory or `/etc/ld.so.cache` local inside a remote `/home` or `/etc`).
//!
//! A placeholder is an empty directory or an empty regular file owned by the
//! mounting user; the directories above it are the target's when it has them
//! (as directories), placeholders otherwise. A placeholder's attributes never
//! change, whatever happens in the target: the kernel detaches the mounts on a
//! FUSE entry whose kind changes or whose lookup fails (`d_invalidate`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use graft_protocol::remote::{DirEntry, FileStat};

/// What a placeholder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    /// An empty directory (a local directory is bound over it).
    Dir,
    /// An empty regular file (a local file is bound over it).
    File,
    /// A directory above a placeholder: the target's when it is a directory there.
    Above,
}

/// Whether an absolute path of the target shows at its own path where the mount
/// is used (every mount of an isolated namespace sits at its remote root).
pub type AtOwnPath = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The placeholders of one mount, by mount-relative path (`""` is the root).
#[derive(Clone, Default)]
pub struct Placeholders {
    paths: BTreeMap<String, Placeholder>,
    /// Links out of the mount's subtree to a path for which this says yes show as
    /// that absolute path; others read as `EXDEV`.
    at_own_path: Option<AtOwnPath>,
    uid: u32,
    gid: u32,
    /// When the mount was made (the placeholders' times).
    born: i64,
}

impl Placeholders {
    /// Placeholders at `paths` (mount-relative, no leading `/`), owned by `uid`:`gid`.
    pub fn new(paths: &[(String, Placeholder)], uid: u32, gid: u32) -> Placeholders {
        let mut map = BTreeMap::new();
        for (path, kind) in paths {
            let path = path.trim_matches('/');
            // Every directory above it, the root included.
            let mut above = path;
            while let Some((parent, _)) = above.rsplit_once('/') {
                map.entry(parent.to_owned()).or_insert(Placeholder::Above);
                above = parent;
            }
            if !path.is_empty() {
                map.entry(String::new()).or_insert(Placeholder::Above);
                map.insert(path.to_owned(), *kind);
            }
        }
        let born = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Placeholders {
            paths: map,
            at_own_path: None,
            uid,
            gid,
            born,
        }
    }

    /// Links that leave the mount's subtree for a path `at_own_path` accepts show
    /// as that absolute path (resolved in the target's root, so never above it).
    pub fn with_links_at_own_path(mut self, at_own_path: AtOwnPath) -> Placeholders {
        self.at_own_path = Some(at_own_path);
        self
    }

    /// Whether the target's absolute `path` shows at its own path here.
    pub fn shows_at_own_path(&self, path: &str) -> bool {
        self.at_own_path.as_ref().is_some_and(|f| f(path))
    }

    /// Whether `path` (mount-relative) is a placeholder or lies above one.
    pub fn get(&self, path: &str) -> Option<Placeholder> {
        self.paths.get(path).copied()
    }

    /// The attributes of placeholder `path`.
    pub fn stat(&self, path: &str) -> FileStat {
        let (mode, nlink) = match self.get(path) {
            Some(Placeholder::File) => (libc::S_IFREG | 0o644, 1),
            _ => (libc::S_IFDIR | 0o755, 2),
        };
        FileStat {
            dev: 0,
            ino: 0,
            mode,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            size: 0,
            blksize: 4096,
            blocks: 0,
            atime: self.born,
            atime_nsec: 0,
            mtime: self.born,
            mtime_nsec: 0,
            ctime: self.born,
            ctime_nsec: 0,
        }
    }

    /// Adds the placeholders directly inside `dir` to its listing, replacing the
    /// target's entries of the same name.
    pub fn add_children(&self, dir: &str, entries: &mut Vec<DirEntry>) {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        for (path, kind) in self.paths.range(prefix.clone()..) {
            let Some(name) = path.strip_prefix(&prefix) else {
                break;
            };
            if name.is_empty() || name.contains('/') {
                continue;
            }
            let d_type = match kind {
                Placeholder::File => libc::DT_REG,
                Placeholder::Dir => libc::DT_DIR,
                // The target's own entry (a directory) stays when it has one.
                Placeholder::Above if entries.iter().any(|e| e.name == name) => continue,
                Placeholder::Above => libc::DT_DIR,
            };
            entries.retain(|e| e.name != name);
            entries.push(DirEntry {
                name: name.to_owned(),
                ino: 0,
                kind: d_type,
            });
        }
    }
}

impl std::fmt::Debug for Placeholders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placeholders")
            .field("paths", &self.paths)
            .field("at_own_path", &self.at_own_path.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_above_a_placeholder_are_placeholders_too() {
        let p = Placeholders::new(
            &[
                ("work/wt/iso".into(), Placeholder::Dir),
                ("ld.so.cache".into(), Placeholder::File),
            ],
            1000,
            1000,
        );
        assert_eq!(p.get(""), Some(Placeholder::Above));
        assert_eq!(p.get("work"), Some(Placeholder::Above));
        assert_eq!(p.get("work/wt"), Some(Placeholder::Above));
        assert_eq!(p.get("work/wt/iso"), Some(Placeholder::Dir));
        assert_eq!(p.get("ld.so.cache"), Some(Placeholder::File));
        assert_eq!(p.get("work/other"), None);
        assert!(p.stat("work/wt/iso").is_dir());
        assert!(!p.stat("ld.so.cache").is_dir());
        assert_eq!(p.stat("ld.so.cache").uid, 1000);
    }

    #[test]
    fn listings_gain_the_placeholders_and_lose_the_targets_entries_they_replace() {
        let p = Placeholders::new(
            &[
                ("a/b".into(), Placeholder::Dir),
                ("ld.so.cache".into(), Placeholder::File),
            ],
            0,
            0,
        );
        let mut root = vec![
            DirEntry {
                name: "ld.so.cache".into(),
                ino: 9,
                kind: libc::DT_LNK,
            },
            DirEntry {
                name: "hosts".into(),
                ino: 10,
                kind: libc::DT_REG,
            },
        ];
        p.add_children("", &mut root);
        let names: Vec<(&str, u8)> = root.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert!(names.contains(&("hosts", libc::DT_REG)));
        assert!(names.contains(&("ld.so.cache", libc::DT_REG)));
        assert!(names.contains(&("a", libc::DT_DIR)));
        assert_eq!(names.len(), 3);
        let mut a = Vec::new();
        p.add_children("a", &mut a);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].name, "b");
    }
}
