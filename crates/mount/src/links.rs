//! Symlinks that cannot lead out of the mount.
//!
//! The local kernel follows a symlink on a FUSE mount by reading its text and
//! resolving it itself: an absolute `/etc/shadow` would start at this machine's
//! root and `../../..` would climb out of the mount point. So the mount never
//! shows a link's own text. [`resolve`] resolves the link in the target, as
//! `openat2(RESOLVE_IN_ROOT)` would (an absolute link starts at the target's root,
//! `..` stops there), and [`relative`] writes the result as a path relative to
//! the link's directory that climbs at most to the mount's root. A link whose
//! resolution leaves the mounted subtree (`--root`) cannot be shown: reading it
//! fails with `EXDEV`.

use fuser::Errno;

/// Most symlinks followed while resolving one path (the kernel's `MAXSYMLINKS`).
const MAX_LINKS: usize = 40;

/// What [`resolve`] learns about one absolute path of the target.
pub enum Probe {
    /// A symlink with this text.
    Link(String),
    /// Something that is not a symlink.
    Other,
    /// Nothing is there.
    Missing,
}

/// Resolves the absolute target path `path` inside the target's root, asking
/// `probe` about each prefix. Missing components are kept (the rest of the
/// path is applied lexically) so a dangling link still resolves to the path it
/// names, which then does not exist. Returns an absolute, normalized path.
///
/// # Errors
///
/// `ELOOP` after [`MAX_LINKS`] links, or the error of `probe`.
pub fn resolve(
    path: &str,
    mut probe: impl FnMut(&str) -> Result<Probe, Errno>,
) -> Result<String, Errno> {
    let mut done: Vec<String> = Vec::new();
    let mut todo: std::collections::VecDeque<String> = path.split('/').map(str::to_owned).collect();
    let mut links = 0;
    let mut missing = false;
    while let Some(part) = todo.pop_front() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        if missing {
            done.push(part);
            continue;
        }
        let candidate = format!(
            "/{}",
            [done.as_slice(), std::slice::from_ref(&part)]
                .concat()
                .join("/")
        );
        match probe(&candidate)? {
            Probe::Other => done.push(part),
            Probe::Missing => {
                missing = true;
                done.push(part);
            }
            Probe::Link(text) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(Errno::ELOOP);
                }
                if text.starts_with('/') {
                    done.clear();
                }
                for (i, piece) in text.split('/').enumerate() {
                    todo.insert(i, piece.to_owned());
                }
            }
        }
    }
    Ok(format!("/{}", done.join("/")))
}

/// The text to show for a link at mount-relative `link` (e.g. `a/b/l`) that
/// resolves to mount-relative `target` (e.g. `etc/hosts`, `""` for the mount's
/// root): a relative path from the link's directory that never climbs above the
/// mount's root.
pub fn relative(link: &str, target: &str) -> String {
    let parent: Vec<&str> = link.split('/').filter(|p| !p.is_empty()).collect();
    let parent = &parent[..parent.len().saturating_sub(1)];
    let target: Vec<&str> = target.split('/').filter(|p| !p.is_empty()).collect();
    let common = parent
        .iter()
        .zip(&target)
        .take_while(|(a, b)| a == b)
        .count();
    let mut parts: Vec<&str> = vec![".."; parent.len() - common];
    parts.extend(&target[common..]);
    if parts.is_empty() {
        ".".to_owned()
    } else {
        parts.join("/")
    }
}

/// The mount-relative form of absolute target path `path` under the mount's
/// remote root `root`, or `None` when it lies outside.
pub fn within(root: &str, path: &str) -> Option<String> {
    if root == "/" {
        return Some(path.trim_start_matches('/').to_owned());
    }
    if path == root {
        return Some(String::new());
    }
    path.strip_prefix(root)
        .and_then(|rest| rest.strip_prefix('/'))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target with `/etc/hosts`, `/srv/app/up` → `../../..`, `/srv/app/abs` →
    /// `/etc/hosts`, `/srv/app/chain` → `abs`, `/srv/loop` → `loop`.
    fn probe(path: &str) -> Result<Probe, Errno> {
        Ok(match path {
            "/etc" | "/etc/hosts" | "/srv" | "/srv/app" => Probe::Other,
            "/srv/app/up" => Probe::Link("../../..".into()),
            "/srv/app/abs" => Probe::Link("/etc/hosts".into()),
            "/srv/app/chain" => Probe::Link("abs".into()),
            "/srv/loop" => Probe::Link("loop".into()),
            _ => Probe::Missing,
        })
    }

    #[test]
    fn links_resolve_inside_the_root() {
        assert_eq!(resolve("/srv/app/up", probe).unwrap(), "/");
        assert_eq!(
            resolve("/srv/app/up/etc/hosts", probe).unwrap(),
            "/etc/hosts"
        );
        assert_eq!(resolve("/srv/app/abs", probe).unwrap(), "/etc/hosts");
        assert_eq!(resolve("/srv/app/chain", probe).unwrap(), "/etc/hosts");
        assert_eq!(
            resolve("/../../etc/../etc/hosts", probe).unwrap(),
            "/etc/hosts"
        );
        assert_eq!(resolve("/srv/gone/../x", probe).unwrap(), "/srv/x");
        assert_eq!(resolve("/srv/loop", probe), Err(Errno::ELOOP));
    }

    #[test]
    fn shown_text_never_climbs_above_the_mount() {
        assert_eq!(relative("srv/app/up", ""), "../..");
        assert_eq!(relative("srv/app/abs", "etc/hosts"), "../../etc/hosts");
        assert_eq!(relative("srv/app/l", "srv/app/f"), "f");
        assert_eq!(relative("l", "etc/shadow"), "etc/shadow");
        assert_eq!(relative("a/l", "a"), ".");
        assert_eq!(relative("a/b/l", "a/c"), "../c");
        assert_eq!(relative("l", ""), ".");
    }

    #[test]
    fn subtrees_bound_what_can_be_shown() {
        assert_eq!(within("/", "/etc/hosts").as_deref(), Some("etc/hosts"));
        assert_eq!(within("/srv", "/srv/app").as_deref(), Some("app"));
        assert_eq!(within("/srv", "/srv").as_deref(), Some(""));
        assert_eq!(within("/srv", "/srvx/app"), None);
        assert_eq!(within("/srv", "/etc/hosts"), None);
    }
}
