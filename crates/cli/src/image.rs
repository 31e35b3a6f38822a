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

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{args::AgentImageArgs, failure::Failure, locate};

/// Where the agent lives in the image; the image's entrypoint.
pub const AGENT_PATH: &str = "/usr/local/bin/graft-agent";
/// The image's `PATH`.
pub const IMAGE_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// OCI media type of the image manifest (`manifest.md`).
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI media type of the image index (`image-index.md`).
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI media type of the image config (`config.md`).
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI media type of an uncompressed layer (`layer.md`).
pub const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

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

/// An image name: `[registry/]repository:tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The fully qualified name, e.g. `docker.io/library/graft-agent:1.0`
    /// (containerd's `io.containerd.image.name`).
    pub name: String,
    /// The name as Docker shows it, e.g. `graft-agent:1.0` (`RepoTags`).
    pub familiar: String,
    /// The tag alone (`org.opencontainers.image.ref.name`, as Docker writes it).
    pub tag: String,
}

impl Reference {
    /// Parses `NAME[:TAG]` (tag `latest` when absent) and qualifies it the way
    /// Docker does: no registry means `docker.io`, no namespace there means
    /// `library/`.
    pub fn parse(input: &str) -> Result<Reference, String> {
        let bad = |why: &str| format!("bad image name {input:?}: {why}");
        if input.contains('@') {
            return Err(bad("a digest cannot be written; give NAME:TAG"));
        }
        let last_slash = input.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match input[last_slash..].rfind(':') {
            Some(i) => (&input[..last_slash + i], &input[last_slash + i + 1..]),
            None => (input, "latest"),
        };
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && !tag.starts_with(['.', '-'])
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !tag_ok {
            return Err(bad("the tag must be 1-128 of A-Z a-z 0-9 _ . -"));
        }
        let mut parts: Vec<&str> = repository.split('/').collect();
        let has_registry =
            parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost");
        let registry = if has_registry {
            parts.remove(0)
        } else {
            "docker.io"
        };
        let path_ok = parts.iter().all(|p| {
            !p.is_empty()
                && p.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
                })
        });
        let registry_ok = !registry.is_empty()
            && registry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-'));
        if !path_ok || !registry_ok {
            return Err(bad(
                "the repository must be lower-case letters, digits, `.`, `_`, `-` and `/`",
            ));
        }
        if registry == "docker.io" && parts.len() == 1 {
            parts.insert(0, "library");
        }
        let path = parts.join("/");
        let name = format!("{registry}/{path}:{tag}");
        let familiar = match (registry, path.strip_prefix("library/")) {
            ("docker.io", Some(short)) => format!("{short}:{tag}"),
            ("docker.io", None) => format!("{path}:{tag}"),
            _ => name.clone(),
        };
        Ok(Reference {
            name,
            familiar,
            tag: tag.to_owned(),
        })
    }
}

/// The platform in the config: GOARCH/GOOS names (OCI `config.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `amd64`, `arm64`, …
    pub architecture: String,
    /// `linux`.
    pub os: String,
}

impl Platform {
    /// The machine graft was built for, which is the machine whose files the
    /// image takes.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform {
            architecture: architecture.to_owned(),
            os: std::env::consts::OS.to_owned(),
        }
    }
}

/// Everything the archive holds, derived from the layer.
#[derive(Debug, Clone)]
pub struct ImageBlobs {
    /// The layer tar.
    pub layer: Vec<u8>,
    /// `sha256:<hex>` of the layer, which is also its diff ID (uncompressed).
    pub layer_digest: String,
    /// The image config JSON (OCI `config.md`, Docker's image JSON).
    pub config: Vec<u8>,
    /// `sha256:<hex>` of the config: the image ID.
    pub config_digest: String,
    /// The OCI image manifest (`manifest.md`).
    pub manifest: Vec<u8>,
    /// `sha256:<hex>` of the manifest.
    pub manifest_digest: String,
    /// `index.json` (`image-layout.md`).
    pub index: Vec<u8>,
    /// Docker's `manifest.json` (image spec v1.2).
    pub docker_manifest: Vec<u8>,
}

impl ImageBlobs {
    /// The config, manifest and index of a one-layer image of `layer`.
    pub fn new(layer: Vec<u8>, reference: &Reference, platform: &Platform, epoch: u64) -> Self {
        let layer_digest = sha256(&layer);
        let created = rfc3339(epoch);
        let version = env!("CARGO_PKG_VERSION");
        let config = json!({
            "architecture": platform.architecture,
            "os": platform.os,
            "created": created,
            "config": {
                "Entrypoint": [AGENT_PATH],
                "Env": [IMAGE_PATH_ENV],
                "WorkingDir": "/",
                "Labels": {
                    "org.opencontainers.image.version": version,
                    "org.opencontainers.image.title": "graft-agent",
                },
            },
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
            "history": [{
                "created": created,
                "created_by": format!("graft agent-image (graft {version})"),
            }],
        });
        let config = to_json(&config);
        let config_digest = sha256(&config);
        let manifest = to_json(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {
                "mediaType": MEDIA_CONFIG,
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": MEDIA_LAYER,
                "digest": layer_digest,
                "size": layer.len(),
            }],
        }));
        let manifest_digest = sha256(&manifest);
        let index = to_json(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [{
                "mediaType": MEDIA_MANIFEST,
                "digest": manifest_digest,
                "size": manifest.len(),
                "annotations": {
                    "io.containerd.image.name": reference.name,
                    "org.opencontainers.image.ref.name": reference.tag,
                },
            }],
        }));
        let docker_manifest = to_json(&json!([{
            "Config": blob_path(&config_digest),
            "RepoTags": [reference.familiar],
            "Layers": [blob_path(&layer_digest)],
        }]));
        ImageBlobs {
            layer,
            layer_digest,
            config,
            config_digest,
            manifest,
            manifest_digest,
            index,
            docker_manifest,
        }
    }
}

/// Writes the archive (OCI layout and `docker save` layout in one tar) to
/// `out`, entries sorted, owned by root, time stamps `mtime`.
pub fn write_archive<W: Write>(out: W, blobs: &ImageBlobs, mtime: u64) -> io::Result<W> {
    let mut entries: BTreeMap<String, &[u8]> = BTreeMap::new();
    for (digest, data) in [
        (&blobs.layer_digest, &blobs.layer),
        (&blobs.config_digest, &blobs.config),
        (&blobs.manifest_digest, &blobs.manifest),
    ] {
        entries.insert(blob_path(digest), data);
    }
    entries.insert("index.json".into(), &blobs.index);
    entries.insert("manifest.json".into(), &blobs.docker_manifest);
    entries.insert("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#);

    let mut builder = tar::Builder::new(out);
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_mtime(mtime);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(0);
        builder.append_data(&mut header, dir, io::empty())?;
    }
    for (name, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_mtime(mtime);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(data.len() as u64);
        builder.append_data(&mut header, name, data)?;
    }
    builder.into_inner()
}

/// `blobs/sha256/<hex>` for `sha256:<hex>`.
pub fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!(
        "sha256:{}",
        graft_protocol::secret::hex(Sha256::digest(data))
    )
}

fn to_json(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("JSON values always serialize")
}

/// `epoch` seconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC, RFC 3339), as the OCI image
/// config's `created` field wants it.
pub fn rfc3339(epoch: u64) -> String {
    i64::try_from(epoch)
        .ok()
        .and_then(|secs| jiff::Timestamp::from_second(secs).ok())
        .unwrap_or(jiff::Timestamp::MAX)
        .to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// The archive's regular files by name, checking the tar's own invariants
    /// on the way: sorted names, root-owned, time stamp `mtime`.
    fn entries(archive: &[u8], mtime: u64) -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        let mut last = String::new();
        let mut tar = tar::Archive::new(archive);
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            assert!(name > last, "{name} after {last}");
            last.clone_from(&name);
            let header = entry.header();
            assert_eq!(header.mtime().unwrap(), mtime, "{name}");
            assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (0, 0));
            if header.entry_type().is_file() {
                let mut data = Vec::new();
                io::Read::read_to_end(&mut entry, &mut data).unwrap();
                files.insert(name, data);
            }
        }
        files
    }

    fn json_of(files: &BTreeMap<String, Vec<u8>>, name: &str) -> Value {
        serde_json::from_slice(files.get(name).unwrap_or_else(|| panic!("no {name}")))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Checks everything a loader relies on; returns the layer.
    fn check_archive(archive: &[u8], mtime: u64, reference: &Reference) -> Vec<u8> {
        let files = entries(archive, mtime);
        for (name, data) in &files {
            if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                assert_eq!(sha256(data), format!("sha256:{hex}"), "{name}");
            }
        }
        let blob = |digest: &Value, size: &Value| -> &Vec<u8> {
            let path = blob_path(digest.as_str().unwrap());
            let data = files.get(&path).unwrap_or_else(|| panic!("no blob {path}"));
            assert_eq!(size.as_u64(), Some(data.len() as u64), "{path}");
            data
        };
        assert_eq!(
            json_of(&files, "oci-layout"),
            json!({"imageLayoutVersion": "1.0.0"})
        );

        let index = json_of(&files, "index.json");
        assert_eq!(index["schemaVersion"], 2);
        assert_eq!(index["mediaType"], MEDIA_INDEX);
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1);
        let descriptor = &manifests[0];
        assert_eq!(descriptor["mediaType"], MEDIA_MANIFEST);
        assert_eq!(
            descriptor["annotations"]["io.containerd.image.name"],
            reference.name.as_str()
        );
        assert_eq!(
            descriptor["annotations"]["org.opencontainers.image.ref.name"],
            reference.tag.as_str()
        );
        let manifest: Value =
            serde_json::from_slice(blob(&descriptor["digest"], &descriptor["size"])).unwrap();
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["mediaType"], MEDIA_MANIFEST);
        assert_eq!(manifest["config"]["mediaType"], MEDIA_CONFIG);
        let config_bytes = blob(&manifest["config"]["digest"], &manifest["config"]["size"]);
        let config: Value = serde_json::from_slice(config_bytes).unwrap();
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0]["mediaType"], MEDIA_LAYER);
        let layer = blob(&layers[0]["digest"], &layers[0]["size"]);
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(config["rootfs"]["diff_ids"], json!([sha256(layer)]));
        assert_eq!(config["config"]["Entrypoint"], json!([AGENT_PATH]));
        assert_eq!(config["config"]["Env"], json!([IMAGE_PATH_ENV]));
        assert_eq!(
            config["config"]["Labels"]["org.opencontainers.image.version"],
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(config["created"], rfc3339(mtime).as_str());

        let docker = json_of(&files, "manifest.json");
        let docker = docker.as_array().unwrap();
        assert_eq!(docker.len(), 1);
        assert_eq!(docker[0]["RepoTags"], json!([reference.familiar]));
        let config_path = docker[0]["Config"].as_str().unwrap();
        assert_eq!(files.get(config_path), Some(config_bytes));
        let docker_layers = docker[0]["Layers"].as_array().unwrap();
        assert_eq!(docker_layers.len(), 1);
        assert_eq!(files.get(docker_layers[0].as_str().unwrap()), Some(layer));
        layer.clone()
    }

    fn small_rootfs() -> Rootfs {
        let mut rootfs = Rootfs::new("/nonexistent");
        rootfs.insert(
            Path::new(AGENT_PATH),
            Node::File(0o755, b"\x7fELF agent".to_vec()),
        );
        rootfs.insert(Path::new("/lib"), Node::Symlink("usr/lib".into()));
        rootfs.insert(
            Path::new("/usr/lib/ld.so"),
            Node::File(0o755, b"loader".to_vec()),
        );
        add_basics(&mut rootfs);
        rootfs
    }

    fn build(rootfs: &Rootfs, reference: &Reference, epoch: u64) -> Vec<u8> {
        let layer = rootfs.layer_tar(epoch).unwrap();
        let blobs = ImageBlobs::new(layer, reference, &Platform::host(), epoch);
        write_archive(Vec::new(), &blobs, epoch).unwrap()
    }

    #[test]
    fn archive_digests_and_pointers_hold() {
        let reference = Reference::parse("example.com/team/graft-agent:t1").unwrap();
        let archive = build(&small_rootfs(), &reference, 1_700_000_000);
        let layer = check_archive(&archive, 1_700_000_000, &reference);

        let mut tar = tar::Archive::new(layer.as_slice());
        let mut seen = HashMap::new();
        for entry in tar.entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            assert_eq!(header.mtime().unwrap(), 1_700_000_000);
            assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (0, 0));
            seen.insert(
                entry.path().unwrap().display().to_string(),
                (header.entry_type(), header.mode().unwrap()),
            );
        }
        assert_eq!(
            seen["usr/local/bin/graft-agent"],
            (tar::EntryType::Regular, 0o755)
        );
        assert_eq!(seen["tmp"], (tar::EntryType::Directory, 0o1777));
        assert_eq!(seen["run"], (tar::EntryType::Directory, 0o755));
        assert_eq!(seen["lib"].0, tar::EntryType::Symlink);
        assert!(seen.contains_key("etc/passwd"));
        // Parents come before children, and every parent is there.
        assert_eq!(seen["usr"].0, tar::EntryType::Directory);
        assert_eq!(seen["usr/local/bin"].0, tar::EntryType::Directory);
    }

    #[test]
    fn a_broken_blob_is_noticed() {
        // The checks above must be able to fail: flip one byte of the layer.
        let reference = Reference::parse("graft-agent:x").unwrap();
        let layer = small_rootfs().layer_tar(0).unwrap();
        let mut blobs = ImageBlobs::new(layer, &reference, &Platform::host(), 0);
        blobs.layer[600] ^= 1;
        let archive = write_archive(Vec::new(), &blobs, 0).unwrap();
        let result = std::panic::catch_unwind(|| check_archive(&archive, 0, &reference));
        assert!(result.is_err());
    }

    #[test]
    fn the_output_is_deterministic() {
        let reference = Reference::parse("graft-agent:x").unwrap();
        let one = build(&small_rootfs(), &reference, 0);
        let two = build(&small_rootfs(), &reference, 0);
        assert_eq!(sha256(&one), sha256(&two));
        assert_ne!(sha256(&one), sha256(&build(&small_rootfs(), &reference, 1)));
    }

    #[test]
    fn host_paths_keep_their_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mk = |p: &str, data: &[u8]| {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        };
        mk("usr/lib/x86/libc.so.6", b"libc");
        mk("usr/sbin/xtables-nft-multi", b"multi");
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("libc.so.6", root.join("usr/lib/x86/libc.so")).unwrap();
        std::fs::create_dir_all(root.join("etc/alternatives")).unwrap();
        std::os::unix::fs::symlink(
            "/usr/sbin/iptables-nft",
            root.join("etc/alternatives/iptables"),
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/alternatives/iptables", root.join("usr/sbin/iptables"))
            .unwrap();
        std::os::unix::fs::symlink("xtables-nft-multi", root.join("usr/sbin/iptables-nft"))
            .unwrap();
        std::os::unix::fs::symlink("../../lib/x86/libc.so", root.join("usr/sbin/up")).unwrap();

        let mut rootfs = Rootfs::new(root);
        assert_eq!(
            rootfs.add_host_path(Path::new("/lib/x86/libc.so")).unwrap(),
            Path::new("/usr/lib/x86/libc.so.6")
        );
        assert_eq!(
            rootfs
                .add_host_path(Path::new("/usr/sbin/iptables"))
                .unwrap(),
            Path::new("/usr/sbin/xtables-nft-multi")
        );
        assert_eq!(
            rootfs.add_host_path(Path::new("/usr/sbin/up")).unwrap(),
            Path::new("/usr/lib/x86/libc.so.6")
        );
        let link = |p: &str| Node::Symlink(p.into());
        assert_eq!(rootfs.nodes[Path::new("lib")], link("usr/lib"));
        assert_eq!(
            rootfs.nodes[Path::new("usr/lib/x86/libc.so")],
            link("libc.so.6")
        );
        assert_eq!(
            rootfs.nodes[Path::new("etc/alternatives/iptables")],
            link("/usr/sbin/iptables-nft")
        );
        assert_eq!(
            rootfs.nodes[Path::new("usr/sbin/xtables-nft-multi")],
            Node::File(0o644, b"multi".to_vec())
        );
        assert!(!rootfs.nodes.contains_key(Path::new("lib/x86")));
        assert_eq!(rootfs.nodes[Path::new("etc")], Node::Dir(0o755));
        let (real, node) = rootfs.lookup(Path::new("/usr/sbin/iptables")).unwrap();
        assert_eq!(real, Path::new("/usr/sbin/xtables-nft-multi"));
        assert!(matches!(node, Node::File(..)));
        assert!(rootfs.lookup(Path::new("/usr/sbin/absent")).is_none());

        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(rootfs.add_host_path(Path::new("/loop")).is_err());
    }

    #[test]
    fn ldd_output_is_parsed() {
        let one = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(one).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        let several = "/usr/lib/xtables/libxt_tcp.so:\n\
                       \tlibxtables.so.12 => /lib/libxtables.so.12 (0x1)\n\
                       /usr/lib/xtables/libxt_udp.so:\n\
                       \tlibxtables.so.12 => /lib/libxtables.so.12 (0x1)\n\
                       \tstatically linked\n";
        assert_eq!(
            parse_ldd(several).unwrap(),
            [PathBuf::from("/lib/libxtables.so.12")]
        );
        assert_eq!(
            parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err(),
            ["libfoo.so.1"]
        );
    }

    #[test]
    fn references_are_qualified_like_docker_does() {
        let r = Reference::parse("graft-agent:1.2").unwrap();
        assert_eq!(r.name, "docker.io/library/graft-agent:1.2");
        assert_eq!(r.familiar, "graft-agent:1.2");
        assert_eq!(r.tag, "1.2");
        let r = Reference::parse("me/graft-agent").unwrap();
        assert_eq!(r.name, "docker.io/me/graft-agent:latest");
        assert_eq!(r.familiar, "me/graft-agent:latest");
        let r = Reference::parse("localhost:5000/graft-agent:dev").unwrap();
        assert_eq!(r.name, "localhost:5000/graft-agent:dev");
        assert_eq!(r.familiar, r.name);
        assert_eq!(r.tag, "dev");
        let default = graft_kube::manifest::default_agent_image();
        assert_eq!(Reference::parse(&default).unwrap().name, default);
        for bad in [
            "Graft:1",
            "graft:",
            "graft@sha256:00",
            "a//b:1",
            "graft:-x",
            "",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    /// Collects from this machine (scripts/install-deps installs iptables),
    /// with this test binary standing in for the agent.
    #[test]
    fn collect_takes_the_agent_its_loader_and_iptables() {
        let agent = std::env::current_exe().unwrap();
        let rootfs = collect(&agent).unwrap();
        let file = |path: &str| match rootfs.lookup(Path::new(path)) {
            Some((real, Node::File(mode, _))) => (real, *mode),
            other => panic!("{path} is not a file in the image: {other:?}"),
        };
        assert_eq!(file(AGENT_PATH).1, 0o755);
        for path in ["/usr/sbin/iptables", "/usr/sbin/ip6tables"] {
            let (real, mode) = file(path);
            assert!(
                real.to_string_lossy().contains("xtables"),
                "{path} -> {}",
                real.display()
            );
            assert_ne!(mode & 0o111, 0, "{path} is not executable");
        }
        let ip = find_program("ip").unwrap();
        let (_, mode) = file(&ip.display().to_string());
        assert_ne!(mode & 0o111, 0, "ip is not executable");
        // Every library ldd names for the agent, and the loader, is there.
        let out = Command::new("ldd").arg(&agent).output().unwrap();
        let libraries = parse_ldd(&String::from_utf8_lossy(&out.stdout)).unwrap();
        assert!(
            libraries
                .iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libraries:?}"
        );
        for library in libraries {
            file(&library.display().to_string());
        }
        let modules: Vec<_> = rootfs
            .nodes
            .keys()
            .filter(|p| p.to_string_lossy().contains("xtables/lib"))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        for wanted in [
            "libxt_REDIRECT.so",
            "libxt_tcp.so",
            "libxt_standard.so",
            "libxt_comment.so",
        ] {
            assert!(
                modules.iter().any(|m| m == wanted),
                "{wanted} in {modules:?}"
            );
        }
        // No dangling links.
        for (path, node) in &rootfs.nodes {
            if matches!(node, Node::Symlink(_)) {
                let abs = Path::new("/").join(path);
                assert!(rootfs.lookup(&abs).is_some(), "{} dangles", abs.display());
            }
        }
        assert_eq!(rootfs.nodes[Path::new("tmp")], Node::Dir(0o1777));
    }
}
