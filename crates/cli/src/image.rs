//! `graft agent-image`: a container image of `graft-agent`, built without Docker.
//!
//! The image has one layer, a tar of a root filesystem holding the agent, the
//! shared libraries it needs (as `ldd` resolves them, at their paths, with the
//! dynamic loader), this machine's `iptables`/`ip6tables` with their
//! libraries and xtables extension modules, and its `ip` (iproute2, for the
//! policy routing of pass-through connections) with its libraries, so the
//! agent runs in an otherwise empty image. Symbolic links met on the way (`/lib -> usr/lib`, Debian's
//! `/usr/sbin/iptables -> /etc/alternatives/iptables -> /usr/sbin/iptables-nft`)
//! are kept as links, so the image looks like this machine where it matters.
//!
//! The steps are separate functions: [`collect`] gathers the files into a
//! [`Rootfs`], [`Rootfs::layer_tar`] turns it into the layer's bytes,
//! [`ImageBlobs::new`] derives the config, manifest and index, and
//! [`write_archive`] writes one tar that is both
//!
//! * an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/<digest>`),
//!   see the OCI image spec, `image-layout.md`, `manifest.md` and `config.md`
//!   (<https://github.com/opencontainers/image-spec/blob/v1.1.0/image-layout.md>),
//!   which `ctr images import` and `kind load image-archive` read, and
//! * a `docker save` archive (`manifest.json` with `Config`, `RepoTags` and
//!   `Layers`), see Docker's image spec v1.2
//!   (<https://github.com/moby/docker-image-spec/blob/main/spec.md>, "Combined
//!   Image JSON + Filesystem Changeset Format"), which `docker load` reads,
//!
//! sharing the blobs, as `docker save` does since Docker 25. The output is
//! deterministic: sorted entries, uid/gid 0, and every time stamp
//! `SOURCE_DATE_EPOCH` (or 0).

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    io::{self, Write},
    path::{Component, Path, PathBuf},
    process::Command,
};

use crate::{args::AgentImageArgs, failure::Failure, locate};

/// Where the agent lives in the image; the image's entrypoint.
pub const AGENT_PATH: &str = "/usr/local/bin/graft-agent";
/// The image's `PATH`.
pub const IMAGE_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The `iptables` programs the image offers under `/usr/sbin` (the agent runs
/// `iptables` and `ip6tables`; the others help when debugging in the pod). The
/// first two must exist; the rest are taken when this machine has them.
const IPTABLES_NAMES: &[&str] = &[
    "iptables",
    "ip6tables",
    "iptables-save",
    "ip6tables-save",
    "iptables-restore",
    "ip6tables-restore",
    "iptables-nft",
    "ip6tables-nft",
    "iptables-nft-save",
    "ip6tables-nft-save",
    "iptables-nft-restore",
    "ip6tables-nft-restore",
    "iptables-legacy",
    "ip6tables-legacy",
    "iptables-legacy-save",
    "ip6tables-legacy-save",
    "iptables-legacy-restore",
    "ip6tables-legacy-restore",
];
/// The multi-call binaries behind the names above; both when present.
const XTABLES_MULTI: &[&str] = &["xtables-nft-multi", "xtables-legacy-multi"];
/// Where `iptables` and `ip` are looked for besides `PATH`.
const SBIN_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"];
/// Where the xtables extension modules may live when not beside `libxtables`.
const XTABLES_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/xtables",
    "/usr/lib/aarch64-linux-gnu/xtables",
    "/usr/lib64/xtables",
    "/usr/lib/xtables",
    "/lib/xtables",
    "/usr/libexec/xtables",
];
/// Small files `iptables` and libc read by name.
const ETC_FILES: &[&str] = &["/etc/protocols", "/etc/services"];
/// Symbolic links followed while resolving one path before giving up (Linux's
/// own limit).
const MAX_LINKS: usize = 40;

/// `graft agent-image`: collects, builds and writes the archive.
pub fn agent_image(args: AgentImageArgs) -> Result<u8, Failure> {
    let agent = match args.agent {
        Some(agent) => agent,
        None => {
            let exe = std::env::current_exe().ok();
            locate::locate_agent(exe.as_deref(), &|name| std::env::var_os(name))?
        }
    };
    if !agent.is_file() {
        return Err(Failure::usage(format!(
            "the agent binary {} does not exist or is not a file",
            agent.display()
        ))
        .hint("build it with `cargo build -p graft-agent`, or pass --agent PATH"));
    }
    let reference = match &args.tag {
        Some(tag) => Reference::parse(tag),
        None => Reference::parse(&graft_kube::manifest::default_agent_image()),
    }
    .map_err(Failure::usage)?;
    let epoch = source_date_epoch()?;

    let rootfs = collect(&agent)?;
    let layer = rootfs
        .layer_tar(epoch)
        .map_err(|e| Failure::session(format!("cannot build the image layer: {e}")))?;
    let blobs = ImageBlobs::new(layer, &reference, &Platform::host(), epoch);
    write_output(&args.output, &blobs, epoch)?;
    println!(
        "wrote {} ({}, {})",
        args.output.display(),
        reference.name,
        blobs.manifest_digest
    );
    Ok(0)
}

/// `SOURCE_DATE_EPOCH` (<https://reproducible-builds.org/specs/source-date-epoch/>)
/// or 0.
fn source_date_epoch() -> Result<u64, Failure> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(value) if !value.trim().is_empty() => value.trim().parse().map_err(|_| {
            Failure::usage(format!(
                "SOURCE_DATE_EPOCH={value:?} is not a number of seconds"
            ))
        }),
        _ => Ok(0),
    }
}

/// Writes the archive next to `output` and renames it into place, so a failure
/// leaves no half-written file.
fn write_output(output: &Path, blobs: &ImageBlobs, epoch: u64) -> Result<(), Failure> {
    let not_writable = |e: io::Error| {
        Failure::usage(format!("cannot write {}: {e}", output.display()))
            .hint("pass --output a path in a directory you can write to")
    };
    let dir = match output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = output.file_name().ok_or_else(|| {
        Failure::usage(format!("--output {} is not a file name", output.display()))
    })?;
    let mut tmp_name = OsStr::new(".").to_os_string();
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = std::fs::File::create(&tmp).and_then(|file| {
        let mut out = write_archive(io::BufWriter::new(file), blobs, epoch)?;
        out.flush()?;
        out.into_inner().map_err(io::Error::other)?.sync_all()?;
        std::fs::rename(&tmp, output)
    });
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        not_writable(e)
    })
}

/// One node of the image's file tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory with its permission bits.
    Dir(u32),
    /// A regular file with its permission bits and contents.
    File(u32, Vec<u8>),
    /// A symbolic link and its target, as on the host (absolute or relative).
    Symlink(PathBuf),
}

/// The image's root filesystem: nodes by path relative to `/`, sorted so that a
/// directory comes before what it holds.
#[derive(Debug, Clone)]
pub struct Rootfs {
    /// Where host paths are read from: `/`, or a directory in tests.
    host_root: PathBuf,
    /// The nodes; parents of every node are there as [`Node::Dir`] or a link.
    pub nodes: BTreeMap<PathBuf, Node>,
}

impl Rootfs {
    /// An empty tree that copies host files from `host_root` (normally `/`).
    pub fn new(host_root: impl Into<PathBuf>) -> Rootfs {
        Rootfs {
            host_root: host_root.into(),
            nodes: BTreeMap::new(),
        }
    }

    /// Adds a node at `path` (absolute in the image) and its missing parents.
    pub fn insert(&mut self, path: &Path, node: Node) {
        let rel = relative(path);
        for parent in rel.ancestors().skip(1) {
            if parent.as_os_str().is_empty() {
                break;
            }
            self.nodes
                .entry(parent.to_path_buf())
                .or_insert(Node::Dir(0o755));
        }
        self.nodes.insert(rel, node);
    }

    /// Copies the host's `path` to the same path in the image, with every
    /// symbolic link met on the way (in directories or at the end) kept as a
    /// link. Returns the real path it ended at (absolute in the image).
    pub fn add_host_path(&mut self, path: &Path) -> io::Result<PathBuf> {
        let real = self.resolve(path)?;
        let host = self.host(&real);
        let meta = std::fs::symlink_metadata(&host)?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
        if meta.is_file() {
            self.insert(&real, Node::File(mode, std::fs::read(&host)?));
        } else if meta.is_dir() {
            self.insert(&real, Node::Dir(mode));
        } else {
            return Err(io::Error::other(format!(
                "{} is neither a file nor a directory",
                host.display()
            )));
        }
        Ok(real)
    }

    /// Copies the files of the host directory `dir` (not recursing), in name
    /// order. Returns the real paths of the files.
    pub fn add_host_dir_files(&mut self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let real_dir = self.add_host_path(dir)?;
        let mut names: Vec<_> = std::fs::read_dir(self.host(&real_dir))?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        let mut files = Vec::new();
        for name in names {
            let path = real_dir.join(&name);
            if std::fs::metadata(self.host(&path))?.is_file() {
                files.push(self.add_host_path(&path)?);
            }
        }
        Ok(files)
    }

    /// The host file behind an absolute image path.
    fn host(&self, path: &Path) -> PathBuf {
        self.host_root.join(relative(path))
    }

    /// Resolves `path` on the host like `realpath`, recording each symbolic
    /// link met as a [`Node::Symlink`]. Returns the absolute resolved path.
    fn resolve(&mut self, path: &Path) -> io::Result<PathBuf> {
        let mut real = PathBuf::from("/");
        let mut pending: Vec<PathBuf> = rev_components(path);
        let mut links = 0;
        while let Some(component) = pending.pop() {
            match component.as_os_str().to_str() {
                Some(".") => continue,
                Some("..") => {
                    real.pop();
                    continue;
                }
                _ => {}
            }
            let candidate = real.join(&component);
            let meta = std::fs::symlink_metadata(self.host(&candidate)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{}: {e}", self.host(&candidate).display()),
                )
            })?;
            if !meta.file_type().is_symlink() {
                real = candidate;
                continue;
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(io::Error::other(format!(
                    "too many symbolic links resolving {}",
                    path.display()
                )));
            }
            let target = std::fs::read_link(self.host(&candidate))?;
            self.insert(&candidate, Node::Symlink(target.clone()));
            if target.is_absolute() {
                real = PathBuf::from("/");
            }
            pending.extend(rev_components(&target));
        }
        Ok(real)
    }

    /// Follows `path` (absolute) through the image's own links to a
    /// non-link node, as the kernel would inside the container.
    pub fn lookup(&self, path: &Path) -> Option<(PathBuf, &Node)> {
        let mut real = PathBuf::from("/");
        let mut pending = rev_components(path);
        let mut links = 0;
        while let Some(component) = pending.pop() {
            match component.as_os_str().to_str() {
                Some(".") => continue,
                Some("..") => {
                    real.pop();
                    continue;
                }
                _ => {}
            }
            let candidate = real.join(&component);
            match self.nodes.get(&relative(&candidate))? {
                Node::Symlink(target) => {
                    links += 1;
                    if links > MAX_LINKS {
                        return None;
                    }
                    if target.is_absolute() {
                        real = PathBuf::from("/");
                    }
                    pending.extend(rev_components(target));
                }
                _ => real = candidate,
            }
        }
        let node = self.nodes.get(&relative(&real))?;
        Some((real, node))
    }

    /// The layer: a tar of every node in path order, owned by root, with
    /// `mtime` as every time stamp.
    pub fn layer_tar(&self, mtime: u64) -> io::Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, node) in &self.nodes {
            let mut header = tar::Header::new_gnu();
            header.set_mtime(mtime);
            header.set_uid(0);
            header.set_gid(0);
            match node {
                Node::Dir(mode) => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    header.set_size(0);
                    builder.append_data(&mut header, path, io::empty())?;
                }
                Node::File(mode, data) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(data.len() as u64);
                    builder.append_data(&mut header, path, data.as_slice())?;
                }
                Node::Symlink(target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    builder.append_link(&mut header, path, target)?;
                }
            }
        }
        builder.into_inner()
    }
}

/// `path` without its root, for keys and tar names.
fn relative(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

/// The components of `path` (without the root) in reverse, for a stack.
fn rev_components(path: &Path) -> Vec<PathBuf> {
    let mut components: Vec<PathBuf> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(PathBuf::from(name)),
            Component::ParentDir => Some(PathBuf::from("..")),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
        })
        .collect();
    components.reverse();
    components
}

/// Gathers the image's files from this machine: the agent at [`AGENT_PATH`],
/// `iptables` and its pieces, every shared library they need, and the basics
/// of a root filesystem.
pub fn collect(agent: &Path) -> Result<Rootfs, Failure> {
    let mut rootfs = Rootfs::new("/");
    let copy_failed = |path: &Path, e: io::Error| {
        Failure::session(format!(
            "cannot copy {} into the image: {e}",
            path.display()
        ))
    };

    let agent_data = std::fs::read(agent).map_err(|e| {
        Failure::usage(format!(
            "cannot read the agent binary {}: {e}",
            agent.display()
        ))
        .hint("build it with `cargo build -p graft-agent`, or pass --agent PATH")
    })?;
    rootfs.insert(Path::new(AGENT_PATH), Node::File(0o755, agent_data));
    let mut libraries = ldd(&[agent.to_path_buf()])?;

    let iptables = find_iptables()?;
    let sbin = iptables
        .parent()
        .unwrap_or(Path::new("/usr/sbin"))
        .to_path_buf();
    let mut elf = Vec::new();
    for name in IPTABLES_NAMES {
        let path = sbin.join(name);
        if std::fs::symlink_metadata(&path).is_err() {
            if matches!(*name, "iptables" | "ip6tables") {
                return Err(missing_iptables(&format!(
                    "{} has no {name} beside it",
                    sbin.display()
                )));
            }
            continue;
        }
        let real = rootfs
            .add_host_path(&path)
            .map_err(|e| copy_failed(&path, e))?;
        elf.push(real);
        let in_usr_sbin = Path::new("/usr/sbin").join(name);
        if rootfs.lookup(&in_usr_sbin).is_none() {
            rootfs.insert(&in_usr_sbin, Node::Symlink(path));
        }
    }
    let multi_dirs: BTreeSet<PathBuf> = elf
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .chain([sbin.clone()])
        .collect();
    for dir in &multi_dirs {
        for name in XTABLES_MULTI {
            let path = dir.join(name);
            if path.is_file() {
                elf.push(
                    rootfs
                        .add_host_path(&path)
                        .map_err(|e| copy_failed(&path, e))?,
                );
            }
        }
    }
    // The agent runs `ip rule` and `ip route` (iproute2) so that pass-through
    // connections reach the target from the client's address (transparent.rs).
    let ip = find_program("ip").ok_or_else(missing_ip)?;
    elf.push(rootfs.add_host_path(&ip).map_err(|e| copy_failed(&ip, e))?);
    elf.sort();
    elf.dedup();
    let iptables_libraries = ldd(&elf)?;

    // libxtables loads the extensions from a directory compiled into it
    // (XTABLES_LIBDIR): `xtables/` beside libxtables on Debian and Fedora.
    let mut xtables_dirs: Vec<PathBuf> = iptables_libraries
        .iter()
        .filter(|lib| {
            lib.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libxtables"))
        })
        .filter_map(|lib| lib.parent().map(|dir| dir.join("xtables")))
        .chain(std::env::var_os("XTABLES_LIBDIR").map(PathBuf::from))
        .chain(XTABLES_DIRS.iter().map(PathBuf::from))
        .filter(|dir| dir.is_dir())
        .collect();
    let mut seen = BTreeSet::new();
    xtables_dirs.retain(|dir| seen.insert(std::fs::canonicalize(dir).unwrap_or(dir.clone())));
    if xtables_dirs.is_empty() {
        return Err(missing_iptables(
            "iptables' extension modules (an xtables/ directory of libxt_*.so) are missing",
        ));
    }
    let mut modules = Vec::new();
    for dir in &xtables_dirs {
        modules.extend(
            rootfs
                .add_host_dir_files(dir)
                .map_err(|e| copy_failed(dir, e))?,
        );
    }
    libraries.extend(iptables_libraries);
    if !modules.is_empty() {
        libraries.extend(ldd(&modules)?);
    }

    libraries.sort();
    libraries.dedup();
    for library in &libraries {
        rootfs
            .add_host_path(library)
            .map_err(|e| copy_failed(library, e))?;
    }
    for file in ETC_FILES {
        let path = Path::new(file);
        if path.is_file() {
            rootfs
                .add_host_path(path)
                .map_err(|e| copy_failed(path, e))?;
        }
    }
    add_basics(&mut rootfs);
    Ok(rootfs)
}

/// The directories and files every image has: `/tmp`, `/run`, root's account.
pub fn add_basics(rootfs: &mut Rootfs) {
    for (dir, mode) in [
        ("/tmp", 0o1777),
        ("/run", 0o755),
        ("/root", 0o700),
        ("/proc", 0o755),
        ("/sys", 0o755),
        ("/dev", 0o755),
    ] {
        rootfs.insert(Path::new(dir), Node::Dir(mode));
    }
    rootfs.insert(
        Path::new("/etc/passwd"),
        Node::File(0o644, b"root:x:0:0:root:/root:/sbin/nologin\n".to_vec()),
    );
    rootfs.insert(
        Path::new("/etc/group"),
        Node::File(0o644, b"root:x:0:\n".to_vec()),
    );
}

/// `iptables` on `PATH` or in the usual sbin directories.
fn find_iptables() -> Result<PathBuf, Failure> {
    find_program("iptables")
        .ok_or_else(|| missing_iptables("iptables is not installed on this machine"))
}

/// The program `name` on `PATH` or in the usual sbin directories.
fn find_program(name: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn missing_ip() -> Failure {
    Failure::session(
        "ip (iproute2) is not installed on this machine; the agent image takes it from \
         this machine, for the client's address on pass-through connections",
    )
    .hint(
        "install iproute2 (Debian/Ubuntu: `apt-get install iproute2`, \
         Fedora: `dnf install iproute`), then run graft agent-image again",
    )
}

fn missing_iptables(what: &str) -> Failure {
    Failure::session(format!(
        "{what}; the agent image takes iptables and ip6tables from this machine"
    ))
    .hint(
        "install iptables (Debian/Ubuntu: `apt-get install iptables`, \
         Fedora: `dnf install iptables-nft`), then run graft agent-image again",
    )
}

/// The shared libraries (and the loader) `files` need, as `ldd` finds them.
fn ldd(files: &[PathBuf]) -> Result<Vec<PathBuf>, Failure> {
    let names = || {
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let out = Command::new("ldd").args(files).output().map_err(|e| {
        Failure::session(format!("cannot run ldd: {e}"))
            .hint("install ldd (Debian/Ubuntu package libc-bin, Fedora glibc-common)")
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let statically_linked =
        |s: &str| s.contains("not a dynamic executable") || s.contains("statically linked");
    if !out.status.success() && !statically_linked(&stdout) && !statically_linked(&stderr) {
        return Err(Failure::session(format!(
            "ldd {} failed ({}): {}",
            names(),
            out.status,
            stderr.trim()
        )));
    }
    parse_ldd(&stdout).map_err(|missing| {
        Failure::session(format!(
            "ldd cannot find {} needed by {}",
            missing.join(", "),
            names()
        ))
        .hint("install the packages providing those libraries")
    })
}

/// The library paths in `ldd` output (one or several files), or the names it
/// reports `not found`.
pub fn parse_ldd(stdout: &str) -> Result<Vec<PathBuf>, Vec<String>> {
    let mut paths = Vec::new();
    let mut missing = Vec::new();
    for line in stdout.lines() {
        let line = line.trim();
        let path = if let Some((name, found)) = line.split_once("=>") {
            let found = found.trim();
            if found.starts_with("not found") {
                missing.push(name.trim().to_owned());
                continue;
            }
            found
        } else if line.ends_with(':') {
            // The header of one file when ldd is given several.
            continue;
        } else {
            line
        };
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        }
    }
    if missing.is_empty() {
        paths.sort();
        paths.dedup();
        Ok(paths)
    } else {
        Err(missing)
    }
}

mod archive;
#[cfg(test)]
mod tests;

pub use archive::{ImageBlobs, Platform, Reference, write_archive};
