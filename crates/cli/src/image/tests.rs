//! Tests of `graft agent-image`: the archive's digests and pointers, its
//! determinism, the root filesystem's links, `ldd` parsing and references.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::archive::{blob_path, rfc3339, sha256};
use super::*;

// The media types as the OCI image spec writes them (`media-types.md`), to
// check what oci-spec wrote.
/// OCI media type of the image manifest (`manifest.md`).
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI media type of the image index (`image-index.md`).
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI media type of the image config (`config.md`).
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI media type of an uncompressed layer (`layer.md`).
pub const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

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
    std::os::unix::fs::symlink("xtables-nft-multi", root.join("usr/sbin/iptables-nft")).unwrap();
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
