//! `graft agent-image`: the archive it writes from the real graft-agent holds a
//! self-contained root filesystem (the agent and iptables run chrooted into the
//! unpacked layer, with nothing from the host), and, when skopeo is installed,
//! skopeo reads it both as a `docker save` archive and as an OCI archive.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(path: &Path) -> Value {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sha256_of(path: &Path) -> String {
    let out = ok("sha256sum", &[&path.display().to_string()]);
    format!("sha256:{}", out.split_whitespace().next().unwrap())
}

/// Builds the image from the real agent, returns (archive, unpacked archive dir).
fn build_image(dir: &Path, tag: &str) -> (PathBuf, PathBuf) {
    let archive = dir.join("agent.tar");
    let agent = graft_tests::agent_bin();
    assert!(
        agent.is_file(),
        "{} missing: run `cargo build --workspace` (scripts/test does)",
        agent.display()
    );
    let out = Command::new(graft_tests::graft_bin())
        .args(["agent-image", "--output"])
        .arg(&archive)
        .args(["--tag", tag, "--agent"])
        .arg(&agent)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .expect("graft runs");
    assert!(
        out.status.success(),
        "graft agent-image failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unpacked = dir.join("archive");
    std::fs::create_dir(&unpacked).unwrap();
    ok(
        "tar",
        &[
            "-xf",
            &archive.display().to_string(),
            "-C",
            &unpacked.display().to_string(),
        ],
    );
    (archive, unpacked)
}

#[test]
fn agent_image_is_self_contained_and_loadable() {
    graft_tests::require_root();
    let dir = tempfile::tempdir().unwrap();
    let tag = "localhost/graft-agent:test";
    let (archive, unpacked) = build_image(dir.path(), tag);

    // docker save's view: manifest.json → config and layer blobs.
    let manifest = json(&unpacked.join("manifest.json"));
    let entry = &manifest[0];
    assert_eq!(entry["RepoTags"], serde_json::json!([tag]), "{manifest}");
    let layer_name = entry["Layers"][0].as_str().expect("one layer");
    let layer = unpacked.join(layer_name);
    let config = json(&unpacked.join(entry["Config"].as_str().unwrap()));
    assert_eq!(
        config["rootfs"]["diff_ids"][0].as_str(),
        Some(sha256_of(&layer).as_str())
    );
    assert_eq!(
        format!("sha256:{}", layer_name.rsplit('/').next().unwrap()),
        sha256_of(&layer)
    );
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
    // The OCI view: index.json → manifest blob → the same layer.
    let index = json(&unpacked.join("index.json"));
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let oci_manifest = unpacked.join(format!(
        "blobs/sha256/{}",
        manifest_digest.trim_start_matches("sha256:")
    ));
    assert_eq!(sha256_of(&oci_manifest), manifest_digest);
    assert_eq!(
        json(&oci_manifest)["layers"][0]["digest"],
        config["rootfs"]["diff_ids"][0]
    );

    // The layer alone is a working root filesystem.
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let root = rootfs.display().to_string();
    ok("tar", &["-xpf", &layer.display().to_string(), "-C", &root]);
    let version = ok(
        "chroot",
        &[&root, "/usr/local/bin/graft-agent", "--version"],
    );
    assert!(version.starts_with("graft-agent "), "{version}");
    let iptables = ok("chroot", &[&root, "/usr/sbin/iptables", "--version"]);
    assert!(iptables.starts_with("iptables v"), "{iptables}");
    let nat = ok(
        "unshare",
        &[
            "-n",
            "chroot",
            &root,
            "/usr/sbin/iptables",
            "-t",
            "nat",
            "-L",
            "-n",
        ],
    );
    assert!(nat.contains("Chain OUTPUT"), "{nat}");
    // The agent's policy routing for pass-through connections (transparent.rs)
    // runs `ip` found on PATH in the image: a rule and a local route in a table.
    let ip = |args: &str| format!("chroot {root} ip {args}");
    let routing = [
        ip("link set lo up"),
        ip("rule add fwmark 0x4752 lookup 4752 priority 4752"),
        ip("route add local 0.0.0.0/0 dev lo table 4752"),
        ip("-6 rule add fwmark 0x4752 lookup 4752 priority 4752"),
        ip("rule show"),
        ip("route show table 4752"),
    ]
    .join(" && ");
    let shown = ok("unshare", &["-n", "sh", "-c", &routing]);
    assert!(
        shown.contains("fwmark 0x4752 lookup 4752") && shown.contains("local default dev lo"),
        "{shown}"
    );
    // The rules the agent writes need the REDIRECT, tcp and comment modules.
    let script = "/usr/sbin/iptables -t nat -A OUTPUT -p tcp --dport 80 \
                  -m comment --comment graft -j REDIRECT --to-ports 8080 && \
                  /usr/sbin/ip6tables -t nat -A OUTPUT -p tcp --dport 80 \
                  -m comment --comment graft -j REDIRECT --to-ports 8080 && \
                  /usr/sbin/iptables-save -t nat";
    // No shell in the image: run each command chrooted, in one namespace.
    let netns_script = script
        .split(" && ")
        .map(|cmd| format!("chroot {root} {cmd}"))
        .collect::<Vec<_>>()
        .join(" && ");
    let saved = ok("unshare", &["-n", "sh", "-c", &netns_script]);
    assert!(
        saved.contains("--to-ports 8080") && saved.contains("graft"),
        "{saved}"
    );

    // skopeo, when there, reads both layouts.
    let skopeo_present = Command::new("skopeo").arg("--version").output().is_ok();
    if !skopeo_present {
        eprintln!(
            "skopeo not installed: skipping `skopeo inspect` of the archive \
             (scripts/install-deps installs it)"
        );
        return;
    }
    let archive = archive.display().to_string();
    for transport in ["docker-archive", "oci-archive"] {
        let out = ok("skopeo", &["inspect", &format!("{transport}:{archive}")]);
        let inspected: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(inspected["Architecture"], config["architecture"], "{out}");
        assert_eq!(
            inspected["Layers"][0], config["rootfs"]["diff_ids"][0],
            "{out}"
        );
        assert_eq!(
            inspected["Labels"]["org.opencontainers.image.version"],
            config["config"]["Labels"]["org.opencontainers.image.version"],
            "{out}"
        );
    }
    let config_out = ok(
        "skopeo",
        &["inspect", "--config", &format!("oci-archive:{archive}")],
    );
    let inspected: Value = serde_json::from_str(&config_out).unwrap();
    assert_eq!(
        inspected["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/graft-agent"])
    );
}

#[test]
fn agent_image_output_is_reproducible() {
    let one = tempfile::tempdir().unwrap();
    let two = tempfile::tempdir().unwrap();
    let (a, _) = build_image(one.path(), "graft-agent:repro");
    let (b, _) = build_image(two.path(), "graft-agent:repro");
    assert_eq!(sha256_of(&a), sha256_of(&b));
}

#[test]
fn agent_image_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let graft = graft_tests::graft_bin();
    let missing = Command::new(&graft)
        .args(["agent-image", "--output"])
        .arg(dir.path().join("x.tar"))
        .args(["--agent", "/nonexistent/graft-agent"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(stderr.contains("/nonexistent/graft-agent"), "{stderr}");

    let unwritable = Command::new(&graft)
        .args([
            "agent-image",
            "--output",
            "/nonexistent-dir/x.tar",
            "--agent",
        ])
        .arg(graft_tests::agent_bin())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&unwritable.stderr);
    assert!(!unwritable.status.success());
    assert!(
        stderr.contains("cannot write /nonexistent-dir/x.tar"),
        "{stderr}"
    );
}
