//! The mount's inode table: FUSE names files by node ids, the agent by paths.
//!
//! Every path the kernel has looked up gets one node id, kept until the kernel
//! forgets it (`FUSE_FORGET` with the lookup count, see `fuse(4)`); the root is
//! node 1. Paths here are relative to the mount's root (`""` is the root, `"a/b"`
//! below it) and [`Nodes::remote`] joins them to the remote subtree.

use std::collections::HashMap;
use std::sync::Mutex;

/// The FUSE root node id (`FUSE_ROOT_ID`).
pub const ROOT: u64 = 1;

struct Node {
    path: String,
    lookups: u64,
}

struct Table {
    by_id: HashMap<u64, Node>,
    by_path: HashMap<String, u64>,
    next: u64,
}

/// Node ids and the paths they stand for.
pub struct Nodes {
    /// The remote directory the mount shows (absolute, no trailing `/` but for `/`).
    root: String,
    table: Mutex<Table>,
}

impl Nodes {
    /// A table whose root node shows the remote directory `root` (absolute).
    pub fn new(root: &str) -> Nodes {
        let trimmed = root.trim_end_matches('/');
        let root = if trimmed.is_empty() {
            "/".to_owned()
        } else {
            trimmed.to_owned()
        };
        let mut by_id = HashMap::new();
        by_id.insert(
            ROOT,
            Node {
                path: String::new(),
                lookups: 1,
            },
        );
        let mut by_path = HashMap::new();
        by_path.insert(String::new(), ROOT);
        Nodes {
            root,
            table: Mutex::new(Table {
                by_id,
                by_path,
                next: ROOT + 1,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The mount-relative path of node `id`, if the kernel still knows it.
    pub fn path(&self, id: u64) -> Option<String> {
        self.lock().by_id.get(&id).map(|n| n.path.clone())
    }

    /// The mount-relative path of `name` in directory node `parent`.
    pub fn child(&self, parent: u64, name: &str) -> Option<String> {
        let parent = self.path(parent)?;
        Some(if parent.is_empty() {
            name.to_owned()
        } else {
            format!("{parent}/{name}")
        })
    }

    /// The absolute remote path of a mount-relative path.
    pub fn remote(&self, path: &str) -> String {
        match (self.root.as_str(), path) {
            (root, "") => root.to_owned(),
            ("/", path) => format!("/{path}"),
            (root, path) => format!("{root}/{path}"),
        }
    }

    /// The node id of `path`, created if new; counts one kernel lookup.
    pub fn looked_up(&self, path: &str) -> u64 {
        let mut table = self.lock();
        if let Some(&id) = table.by_path.get(path) {
            if let Some(node) = table.by_id.get_mut(&id) {
                node.lookups += 1;
            }
            return id;
        }
        let id = table.next;
        table.next += 1;
        table.by_id.insert(
            id,
            Node {
                path: path.to_owned(),
                lookups: 1,
            },
        );
        table.by_path.insert(path.to_owned(), id);
        id
    }

    /// The node id of `path` if it has one, without counting a lookup (readdir).
    pub fn known(&self, path: &str) -> Option<u64> {
        self.lock().by_path.get(path).copied()
    }

    /// The kernel dropped `count` lookups of node `id`; forgets it at zero.
    pub fn forget(&self, id: u64, count: u64) {
        if id == ROOT {
            return;
        }
        let mut table = self.lock();
        let Some(node) = table.by_id.get_mut(&id) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(count);
        if node.lookups == 0 {
            let path = node.path.clone();
            table.by_id.remove(&id);
            if table.by_path.get(&path) == Some(&id) {
                table.by_path.remove(&path);
            }
        }
    }

    /// `from` was renamed to `to`: it and everything below it get the new paths.
    /// A node that was at `to` (replaced by the rename) keeps no path.
    pub fn renamed(&self, from: &str, to: &str) {
        let mut table = self.lock();
        if let Some(old) = table.by_path.remove(to) {
            table.by_id.remove(&old);
        }
        let prefix = format!("{from}/");
        let moved: Vec<(String, u64)> = table
            .by_path
            .iter()
            .filter(|(p, _)| p.as_str() == from || p.starts_with(&prefix))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        for (path, id) in moved {
            table.by_path.remove(&path);
            let new = format!("{to}{}", &path[from.len()..]);
            if let Some(node) = table.by_id.get_mut(&id) {
                node.path = new.clone();
            }
            table.by_path.insert(new, id);
        }
    }

    /// `path` was removed: its node keeps its id (open files still use it) but
    /// a new file at the same path gets a new one.
    pub fn removed(&self, path: &str) {
        self.lock().by_path.remove(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_the_remote_root() {
        let nodes = Nodes::new("/");
        assert_eq!(nodes.remote(""), "/");
        assert_eq!(nodes.remote("etc/hosts"), "/etc/hosts");
        let nodes = Nodes::new("/srv/data/");
        assert_eq!(nodes.remote(""), "/srv/data");
        assert_eq!(nodes.remote("a"), "/srv/data/a");
    }

    #[test]
    fn lookups_share_an_id_until_forgotten() {
        let nodes = Nodes::new("/");
        let a = nodes.looked_up("a");
        assert_eq!(nodes.looked_up("a"), a);
        assert_eq!(nodes.child(a, "b").as_deref(), Some("a/b"));
        nodes.forget(a, 1);
        assert_eq!(nodes.path(a).as_deref(), Some("a"));
        nodes.forget(a, 1);
        assert_eq!(nodes.path(a), None);
        assert_ne!(nodes.looked_up("a"), a, "a forgotten id is not reused");
    }

    #[test]
    fn rename_moves_a_subtree() {
        let nodes = Nodes::new("/");
        let dir = nodes.looked_up("d");
        let file = nodes.looked_up("d/f");
        let other = nodes.looked_up("e");
        let old_target = nodes.looked_up("x");
        nodes.renamed("d", "x");
        assert_eq!(nodes.path(dir).as_deref(), Some("x"));
        assert_eq!(nodes.path(file).as_deref(), Some("x/f"));
        assert_eq!(nodes.path(other).as_deref(), Some("e"));
        assert_eq!(nodes.path(old_target), None);
        assert_eq!(nodes.known("x/f"), Some(file));
    }
}
