//! The isolated namespace's files: the paths graft's file rules make remote
//! (`graft_config::fs`, the same rules as the layer's, `--fs`, `--fs-local`,
//! `--fs-remote`) show the target's files at their own paths; the rest stays this
//! machine's.
//!
//! graft plans a new root here and the helper builds it (`root.rs`): a tmpfs
//! whose top-level entries are
//!
//! * this machine's own, bound (`/usr`, `/lib*`, `/bin`, `/proc`, `/sys`, `/dev`,
//!   `/tmp`, `$HOME`'s top directory, ... whatever the rules keep local), or its
//!   symbolic links copied;
//! * the target's, one graft FUSE mount per remote top-level directory (`/etc`,
//!   `/var`, `/run`, `/app`, ...), served by graft through the session (read-only
//!   unless `--fs write`). A remote directory that holds a local exception (the
//!   working directory under `/work`, `/etc/ld.so.cache`, `/var/tmp`, an
//!   `--fs-local` path) shows a placeholder at the exception's path, over which
//!   the local file is bound; a target's top-level symbolic link is copied.
//!
//! Subdirectories of one FUSE mount are never bound elsewhere (a `..` in a
//! rewritten symlink could then climb out of the target's tree). Limits: an
//! `--fs-local` pattern counts by its literal prefix (`^/app/cache` keeps
//! `/app/cache` local when it exists here; `\.log$` cannot be served by mounts),
//! and a remote path below a local directory (`--fs-remote ^/tmp/x`) stays local.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use graft_config::{
    Config,
    fs::{FsMode, FsRules},
};
use graft_protocol::remote::{RemoteRequest, RemoteResponse};
use graft_proxy::Session;
use serde::{Deserialize, Serialize};

use crate::failure::Failure;

/// The new root graft plans and the helper builds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layout {
    /// An empty directory of the session's where the helper builds the root.
    pub root: PathBuf,
    /// The root's top-level entries.
    pub entries: Vec<Top>,
    /// The FUSE mounts, by the index a [`Top::Remote`] names.
    pub mounts: Vec<RemoteDir>,
    /// Local files bound over placeholders of the FUSE mounts: (this machine's
    /// path, the same path in the new root).
    pub binds: Vec<PathBuf>,
    /// COMMAND's working directory in the new root.
    pub cwd: PathBuf,
}

/// One top-level entry of the new root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Top {
    /// This machine's `/NAME`, bound.
    Local(String),
    /// A symbolic link NAME with this text.
    Link(String, String),
    /// The FUSE mount of [`Layout::mounts`]`[index]` at `/NAME`.
    Remote(String, usize),
}

/// A remote directory served by one FUSE mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteDir {
    /// The target's directory (absolute), also where it shows in the new root.
    pub path: String,
    /// Writable (`--fs write`).
    pub writable: bool,
    /// Placeholders, relative to `path`: (path, is a directory).
    pub placeholders: Vec<(String, bool)>,
}

impl RemoteDir {
    /// The placeholders as `graft_mount` takes them.
    pub fn placeholders(&self) -> Vec<(String, graft_mount::Placeholder)> {
        self.placeholders
            .iter()
            .map(|(path, dir)| {
                let kind = if *dir {
                    graft_mount::Placeholder::Dir
                } else {
                    graft_mount::Placeholder::File
                };
                (path.clone(), kind)
            })
            .collect()
    }
}

/// Plans the new root for COMMAND (`program` its first word), with the file rules
/// it follows: `None` under `--fs local` (the namespace keeps this machine's
/// files). `extra` are files that will be bound over paths of the new root later
/// (the resolver's files).
///
/// # Errors
///
/// A bad `--fs-local`/`--fs-remote` regex, or the session directory cannot hold
/// the root.
pub async fn plan(
    session: &Session,
    config: &Config,
    dir: &Path,
    program: Option<&OsString>,
    extra: &[&str],
) -> Result<Option<(Layout, FsRules)>, Failure> {
    let mut rules = FsRules::new(&config.layer)
        .map_err(|e| Failure::usage(format!("cannot use the file rules: {e}")))?;
    if rules.mode() == FsMode::Local {
        return Ok(None);
    }
    // The program's own directory stays local, as under the layer.
    let program_dir = program
        .and_then(|p| super::detect::find(p, std::env::var_os("PATH").as_deref()))
        .and_then(|p| p.canonicalize().ok())
        .and_then(|p| p.parent().map(Path::to_path_buf));
    if let Some(dir) = program_dir.as_deref().and_then(Path::to_str) {
        rules.add_local_dir(dir);
    }
    let mut anchors: Vec<String> = config.layer.local_dirs.clone();
    anchors.extend(program_dir.and_then(|d| d.to_str().map(str::to_owned)));
    anchors.extend(
        config
            .layer
            .fs_local
            .iter()
            .filter_map(|r| literal_prefix(r)),
    );
    let anchors = outermost(
        anchors
            .into_iter()
            .filter(|a| a.len() > 1 && Path::new(a).exists())
            .collect(),
    );

    let target_top = list_target(session, "/").await.unwrap_or_default();
    let mut names: Vec<String> = std::fs::read_dir("/")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.extend(target_top.iter().map(|(n, _)| n.clone()));
    names.sort();
    names.dedup();

    let mut layout = Layout {
        root: dir.join("root"),
        entries: Vec::new(),
        mounts: Vec::new(),
        binds: Vec::new(),
        cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
    };
    for name in names {
        let path = format!("/{name}");
        let local = std::fs::symlink_metadata(&path).ok();
        if !rules.is_remote(&path) {
            match local {
                Some(meta) if meta.file_type().is_symlink() => {
                    if let Ok(text) = std::fs::read_link(&path) {
                        layout
                            .entries
                            .push(Top::Link(name, text.to_string_lossy().into_owned()));
                    }
                }
                Some(_) => layout.entries.push(Top::Local(name)),
                None => {}
            }
            continue;
        }
        // Local exceptions inside: anchors below, and entries the rules keep local.
        let mut inside: Vec<String> = anchors
            .iter()
            .filter(|a| a.strip_prefix(&path).is_some_and(|r| r.starts_with('/')))
            .cloned()
            .collect();
        if local.as_ref().is_some_and(|m| m.is_dir()) {
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                let Ok(child) = entry.file_name().into_string() else {
                    continue;
                };
                let child = format!("{path}/{child}");
                if !rules.is_remote(&child) {
                    inside.push(child);
                }
            }
        }
        for file in extra {
            if file.strip_prefix(&path).is_some_and(|r| r.starts_with('/')) {
                inside.push((*file).to_owned());
            }
        }
        let inside = outermost(inside);
        let kind = target_top.iter().find(|(n, _)| *n == name).map(|(_, k)| *k);
        match kind {
            Some(libc::DT_LNK) => {
                if let Some(text) = read_target_link(session, &path).await {
                    layout.entries.push(Top::Link(name, text));
                }
                continue;
            }
            Some(libc::DT_DIR) => {}
            // A remote path the target lacks: only its local exceptions show.
            None if !inside.is_empty() => {}
            _ => continue,
        }
        let mut placeholders = Vec::new();
        for local in &inside {
            let is_dir = Path::new(local).is_dir();
            placeholders.push((local[path.len() + 1..].to_owned(), is_dir));
            if !extra.contains(&local.as_str()) {
                layout.binds.push(PathBuf::from(local));
            }
        }
        layout.entries.push(Top::Remote(name, layout.mounts.len()));
        layout.mounts.push(RemoteDir {
            path,
            writable: rules.mode() == FsMode::Write,
            placeholders,
        });
    }
    std::fs::create_dir(&layout.root).map_err(|e| {
        Failure::session(format!(
            "cannot make the isolated namespace's root at {}: {e}",
            layout.root.display()
        ))
    })?;
    Ok(Some((layout, rules)))
}

/// The literal path an anchored regex starts with: `^/app/cache` → `/app/cache`,
/// `^/etc/ssl/.*\.pem$` → `/etc/ssl`; `None` when unanchored or not a path.
pub fn literal_prefix(regex: &str) -> Option<String> {
    let rest = regex.strip_prefix('^')?;
    let mut out = String::new();
    let mut chars = rest.chars().peekable();
    let mut whole = true;
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) if !n.is_ascii_alphanumeric() => out.push(n),
                _ => {
                    whole = false;
                    break;
                }
            },
            '$' if chars.peek().is_none() => break,
            '.' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '$' | '^' => {
                // A quantifier applies to the character before it.
                if matches!(c, '*' | '?' | '{') {
                    out.pop();
                }
                whole = false;
                break;
            }
            c => out.push(c),
        }
    }
    if !whole {
        out.truncate(out.rfind('/').unwrap_or(0));
    }
    let out = out.trim_end_matches('/').to_owned();
    (out.starts_with('/') && out.len() > 1).then_some(out)
}

/// `paths` without those inside another of them, sorted.
fn outermost(mut paths: Vec<String>) -> Vec<String> {
    paths.sort();
    paths.dedup();
    let mut kept: Vec<String> = Vec::new();
    for path in paths {
        let covered = kept.iter().any(|k| {
            path.strip_prefix(k.as_str())
                .is_some_and(|r| r.starts_with('/'))
        });
        if !covered {
            kept.push(path);
        }
    }
    kept
}

/// The target's directory entries (name, `d_type`), `None` when it cannot be read.
async fn list_target(session: &Session, path: &str) -> Option<Vec<(String, u8)>> {
    let request = RemoteRequest::ReadDir { path: path.into() };
    match session.remote(request).await.ok()? {
        RemoteResponse::Dir(entries) => Some(
            entries
                .into_iter()
                .filter(|e| e.name != "." && e.name != "..")
                .map(|e| (e.name, e.kind))
                .collect(),
        ),
        _ => None,
    }
}

async fn read_target_link(session: &Session, path: &str) -> Option<String> {
    let request = RemoteRequest::ReadLink { path: path.into() };
    match session.remote(request).await.ok()? {
        RemoteResponse::Link(text) => Some(text),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_anchored_regex_gives_its_literal_path() {
        assert_eq!(literal_prefix("^/app/cache").as_deref(), Some("/app/cache"));
        assert_eq!(
            literal_prefix("^/app/cache/").as_deref(),
            Some("/app/cache")
        );
        assert_eq!(
            literal_prefix("^/etc/ssl/.*\\.pem$").as_deref(),
            Some("/etc/ssl")
        );
        assert_eq!(
            literal_prefix("^/data/local\\.txt$").as_deref(),
            Some("/data/local.txt")
        );
        assert_eq!(literal_prefix("^/var/logs?/").as_deref(), Some("/var"));
        assert_eq!(literal_prefix("\\.log$"), None);
        assert_eq!(literal_prefix("^/"), None);
        assert_eq!(literal_prefix("^/\\w+"), None);
    }

    #[test]
    fn nested_exceptions_keep_only_the_outer_one() {
        let kept = outermost(vec![
            "/work/wt/iso".into(),
            "/work/wt/iso/target".into(),
            "/work/wt/isolate".into(),
            "/root".into(),
        ]);
        assert_eq!(kept, vec!["/root", "/work/wt/iso", "/work/wt/isolate"]);
    }
}
