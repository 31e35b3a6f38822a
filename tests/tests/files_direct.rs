//! Issue 13, a local target's files opened without a hop: the layer opens the
//! target's root (`/proc/PID/root`) itself, with the program's credentials,
//! and remote paths with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`
//! below it (crates/layer/src/files/direct.rs).
//!
//! Behaviour: a file read that way is the target's own (its inode, its
//! content), `cat` and Python alike, and so are the answers of `stat`,
//! `access`, `readlink` and `opendir`; writes obey `--fs` (kept local under
//! `--fs read`, live in the target under `--fs write`); what the direct path
//! must not do takes the agent's path and still works: a file to create, a
//! directory, `GRAFT_OPEN_DIRECT=0`, a program that may not open the root; a
//! root descriptor the program replaced (`dup2`) is opened again, and the
//! program's own descriptor is left alone.
//!
//! Attacks, each on a run whose layer log shows the direct path handled the
//! open: a symlink in the target to a host-only file, a symlink to `/`, a `..`
//! walk through a relative symlink, a /proc magic link (`/proc/self/root`) —
//! for `access`, `readlink` and `opendir` too, so none tells whether a
//! host-only file exists, where a host-only link points or what a host-only
//! directory holds; and a
//! program that finds the layer's root descriptor and, as another user, tries
//! to write the target's file, read its private file, and leave the root with
//! `..`: the kernel checks every use with the program's own credentials.

use std::os::unix::fs::PermissionsExt;

use graft_tests::logged::run_logged;
use graft_tests::{Bed, Outcome, fixture_str, python};

fn json(out: &Outcome) -> serde_json::Value {
    serde_json::from_str(out.assert_success().out())
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

fn script() -> String {
    fixture_str("direct.py")
}

/// The layer log's lines about `path`, and those that name no test-bed path
/// (root look-ups, fallbacks): what a failure message needs when the whole log
/// is too long for CI to print.
fn about(layer: &str, path: &str) -> String {
    layer
        .lines()
        .filter(|line| line.contains(path) || !line.contains("/graft-testbed/"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn direct_line(path: &str) -> String {
    format!("open {path}: direct, the target's file")
}

#[test]
fn a_remote_file_is_opened_directly_and_is_the_targets_own() {
    let bed = Bed::new();
    let path = bed.remote("hello.txt");
    let (out, layer) = run_logged(&bed, &[], &[], &[python(), &script(), "read", &path]);
    let seen = json(&out);
    assert!(
        seen["data"]
            .as_str()
            .unwrap()
            .starts_with("hello from target"),
        "{out}"
    );
    let ino = bed.in_target(&["stat", "-c", "%i", &path]);
    assert_eq!(
        seen["ino"].to_string(),
        ino.assert_success().out().trim(),
        "the program's fstat saw another file:\n{out}"
    );
    assert!(layer.contains(&direct_line(&path)), "{layer}");
    assert!(
        !out.stderr.contains("file opened as a descriptor"),
        "the agent was asked:\n{out}"
    );
    // cat (openat, read, close) the same way, and a file the symlink in the
    // target leads to (`hosts-link` → /etc/hosts, the target's own).
    let hosts = bed.remote("hosts-link");
    let (out, layer) = run_logged(&bed, &[], &[], &["cat", &path, &hosts]);
    let text = out.assert_success().stdout.clone();
    assert!(text.starts_with("hello from target"), "{out}");
    assert!(text.contains("only-target.graft.test"), "{out}");
    assert!(layer.contains(&direct_line(&hosts)), "{layer}");
}

#[test]
fn stat_and_lstat_are_answered_directly_from_the_target_root() {
    let bed = Bed::new();
    let link = bed.remote("hosts-link");
    let (out, layer) = run_logged(&bed, &[], &[], &[python(), &script(), "stat", &link]);
    let seen = json(&out);
    let ino = bed.in_target(&["stat", "-L", "-c", "%i", &link]);
    assert_eq!(
        seen["ino"].to_string(),
        ino.assert_success().out().trim(),
        "stat did not follow the link to the target's /etc/hosts:\n{out}"
    );
    assert_eq!(seen["link"], true, "{out}");
    assert!(
        layer.contains(&format!("stat {link}: direct, in the target's root")),
        "{layer}"
    );
    // A missing file: the same ENOENT, answered here.
    let missing = bed.remote("no-such-file");
    let (out, layer) = run_logged(&bed, &[], &[], &["stat", &missing]);
    assert!(!out.success(), "{out}");
    assert!(
        layer.contains(&format!(
            "stat {missing}: direct, failed with errno {}",
            libc::ENOENT
        )),
        "{layer}"
    );
}

#[test]
fn access_readlink_and_opendir_are_answered_directly_and_never_see_past_the_root() {
    let bed = Bed::new();
    let hostonly = bed.hostonly_dir.display().to_string();
    // A link only the host has, and the target's links to `/`.
    let host_link = format!("{hostonly}/host-link");
    std::os::unix::fs::symlink("/HOST-ONLY-TARGET", &host_link).unwrap();
    let root_link = bed.remote("root-link");
    bed.in_target(&["ln", "-s", "/", &root_link])
        .assert_success();
    let hello = bed.remote("hello.txt");
    let link = bed.remote("hosts-link");
    let missing = bed.remote("no-such-file");
    let escapes = [
        format!("{}/up{hostonly}/secret.txt", bed.remote_dir.display()),
        format!("{root_link}{hostonly}/secret.txt"),
        format!("{}/up{host_link}", bed.remote_dir.display()),
        format!("{root_link}{host_link}"),
    ];
    let script = script();
    let sub = bed.remote("sub");
    let hostonly_via_root = format!("{root_link}{hostonly}");
    let mut args = vec![python(), &script, "paths", &hello, &link, &missing, &sub];
    args.push(&hostonly_via_root);
    args.extend(escapes.iter().map(String::as_str));
    let (out, layer) = run_logged(&bed, &[], &[], &args);
    let seen = json(&out);
    let expect = |path: &str, access: bool, readlink: &str| {
        assert_eq!(seen[path]["access"], access, "access({path}):\n{out}");
        assert_eq!(seen[path]["exists"], access, "access({path}, F_OK):\n{out}");
        assert_eq!(seen[path]["readlink"], readlink, "readlink({path}):\n{out}");
    };
    // opendir lists the target's directory itself, and through the link to
    // `/` lists what the target has at the host-only path, not the host's.
    assert_eq!(
        seen[&sub]["listdir"],
        serde_json::json!(["nested.txt"]),
        "{out}"
    );
    assert!(
        layer.contains(&format!("opendir {sub}: direct, the target's directory")),
        "{layer}"
    );
    // The target's own (empty) directory at that path, never the host's.
    let listed = seen[&hostonly_via_root]["listdir"].to_string();
    assert!(
        !listed.contains("secret.txt") && !listed.contains("host-link"),
        "listed the host-only directory: {listed}\n{out}"
    );
    let in_target = bed.in_target(&["ls", "-A", &hostonly]);
    let expected: Vec<&str> = in_target.stdout.lines().collect();
    assert_eq!(
        seen[&hostonly_via_root]["listdir"],
        serde_json::json!(expected),
        "{out}"
    );
    assert_eq!(seen[&hello]["listdir"], "ENOTDIR", "{out}");
    expect(&hello, true, "EINVAL");
    expect(&link, true, "/etc/hosts");
    expect(&missing, false, "ENOENT");
    // Resolved in the target's root, where the host-only directory is not.
    for path in &escapes {
        expect(path, false, "ENOENT");
    }
    for path in [&hello, &link] {
        assert!(
            layer.contains(&format!("access {path}: direct, in the target's root")),
            "{layer}"
        );
    }
    assert!(
        layer.contains(&format!("readlink {link}: direct, in the target's root")),
        "{layer}"
    );
    for path in &escapes {
        assert!(
            layer.contains(&format!(
                "readlink {path}: direct, failed with errno {}",
                libc::ENOENT
            )),
            "the direct path did not handle {path}:\n{}",
            about(&layer, path)
        );
    }
    assert!(
        !out.stderr.contains("HOST-ONLY-TARGET") && !out.stdout.contains("HOST-ONLY-TARGET"),
        "{out}"
    );
}

#[test]
fn writes_obey_the_fs_mode_on_the_direct_path() {
    let bed = Bed::new();
    let path = bed.remote("hello.txt");
    // --fs read (the default): the write stays local, the target's file is
    // untouched and the direct path is never asked.
    let (out, layer) = run_logged(&bed, &[], &[], &[python(), &script(), "write", &path]);
    let target = bed.in_target(&["cat", &path]);
    assert!(
        target
            .assert_success()
            .stdout
            .starts_with("hello from target"),
        "--fs read wrote the target's file:\n{out}"
    );
    assert!(!layer.contains(&direct_line(&path)), "{layer}");
    // --fs write: the write goes to the target's file itself, directly.
    let (out, layer) = run_logged(
        &bed,
        &[],
        &["--fs", "write"],
        &[python(), &script(), "write", &path],
    );
    let seen = json(&out);
    let target = bed.in_target(&["cat", &path]);
    assert!(
        target.assert_success().stdout.starts_with("DIRECT"),
        "{out}\n{layer}"
    );
    let ino = bed.in_target(&["stat", "-c", "%i", &path]);
    assert_eq!(seen["ino"].to_string(), ino.assert_success().out().trim());
    assert!(layer.contains(&direct_line(&path)), "{layer}");
    // A file that does not exist yet goes through the agent, which creates it
    // (its owner is the agent's) in the target.
    let created = bed.remote("created-by-sh.txt");
    let (out, layer) = run_logged(
        &bed,
        &[],
        &["--fs", "write"],
        &["sh", "-c", &format!("echo made > {created}")],
    );
    out.assert_success();
    assert!(
        layer.contains(&format!("open {created}: through the agent")),
        "{layer}"
    );
    let made = bed.in_target(&["cat", &created]);
    assert_eq!(made.assert_success().stdout, "made\n");
    // Once it exists, the same `O_CREAT | O_TRUNC` open is direct.
    let (out, layer) = run_logged(
        &bed,
        &[],
        &["--fs", "write"],
        &["sh", "-c", &format!("echo again > {created}")],
    );
    out.assert_success();
    assert!(layer.contains(&direct_line(&created)), "{layer}");
    let again = bed.in_target(&["cat", &created]);
    assert_eq!(again.assert_success().stdout, "again\n");
}

#[test]
fn what_the_direct_path_leaves_takes_the_agents_path_and_works() {
    let bed = Bed::new();
    let path = bed.remote("hello.txt");
    // Turned off: the agent passes the descriptor, as before.
    let (out, layer) = run_logged(&bed, &[("GRAFT_OPEN_DIRECT", "0")], &[], &["cat", &path]);
    assert!(out.assert_success().stdout.starts_with("hello from target"));
    assert!(layer.contains("GRAFT_OPEN_DIRECT=0"), "{layer}");
    assert!(!layer.contains(&direct_line(&path)), "{layer}");
    assert!(out.stderr.contains("file opened as a descriptor"), "{out}");
    // A directory: not a regular file, listed through the agent.
    let dir = bed.remote("sub");
    let list = format!("import os; print(os.listdir(os.open({dir:?}, os.O_RDONLY)))");
    let (out, layer) = run_logged(&bed, &[], &[], &[python(), "-c", &list]);
    assert!(out.assert_success().stdout.contains("nested.txt"), "{out}");
    assert!(
        layer.contains(&format!(
            "open {dir}: not a regular file, through the agent"
        )),
        "{layer}"
    );
    // A program that may not open the target's root itself (it dropped to
    // nobody before its first open; the target is root's): its opens take the
    // agent's path and read the same file, and it gets no root of its own.
    // (`-S -I`: no site module, which may open remote files, such as a CA
    // bundle under /etc, while the interpreter is still root.)
    let pid = bed.target_pid.to_string();
    let (out, layer) = run_logged(
        &bed,
        &[],
        &[],
        &[python(), "-S", "-I", &script(), "drop", &path, &pid],
    );
    let seen = json(&out);
    assert!(
        seen["data"]
            .as_str()
            .unwrap()
            .starts_with("hello from target"),
        "{out}"
    );
    assert_eq!(seen["proc_root"], "EACCES", "{out}");
    assert!(
        layer.contains(&format!("may not open /proc/{pid}/root itself")),
        "{layer}"
    );
    assert!(!layer.contains(&direct_line(&path)), "{layer}");
}

#[test]
fn a_root_descriptor_the_program_replaced_is_opened_again_and_the_programs_file_kept() {
    let bed = Bed::new();
    let path = bed.remote("hello.txt");
    let pid = bed.target_pid.to_string();
    let (out, layer) = run_logged(
        &bed,
        &[],
        &[],
        &[python(), &script(), "replace", &path, &pid],
    );
    let seen = json(&out);
    assert!(
        seen["first"]
            .as_str()
            .unwrap()
            .starts_with("hello from target"),
        "{out}"
    );
    assert_eq!(seen["second"], seen["first"], "{out}");
    // The layer never closed the program's /dev/null at its old number.
    assert_eq!(seen["kept"], "/dev/null", "{out}\n{layer}");
    assert!(layer.contains("was replaced; opening it again"), "{layer}");
    assert_eq!(
        layer.matches(&direct_line(&path)).count(),
        2,
        "both opens were not direct:\n{layer}"
    );
}

#[test]
fn symlinks_dotdot_and_magic_links_never_leave_the_root_on_the_direct_path() {
    let bed = Bed::new();
    let secret = format!("host-secret {}", bed.n);
    let hostonly = bed.hostonly_dir.display().to_string();
    // A symlink to `/` and one to a /proc magic link, made in the target:
    // `/proc/self/root` is the opening process's own root, the host's `/`.
    let root_link = bed.remote("root-link");
    let magic = bed.remote("magic");
    bed.in_target(&["ln", "-s", "/", &root_link])
        .assert_success();
    bed.in_target(&["ln", "-s", "/proc/self/root", &magic])
        .assert_success();
    let attempts = [
        // absolute symlink to the host-only file: resolved in the target's root
        bed.remote("secret-link"),
        // `..` through a relative symlink (`up` → ../../../..)
        format!("{}/up{hostonly}/secret.txt", bed.remote_dir.display()),
        // symlink to `/`, then down to the host-only file
        format!("{root_link}{hostonly}/secret.txt"),
        // /proc/self/root is the program's root (the host's): a magic link
        format!("{magic}{hostonly}/secret.txt"),
    ];
    for path in &attempts {
        let (out, layer) = run_logged(&bed, &[], &[], &["cat", path]);
        assert!(!out.stdout.contains(&secret), "{path} escaped:\n{out}");
        assert!(!out.success(), "{out}");
        assert!(
            layer.contains(&format!("open {path}: direct, failed")),
            "the direct path did not handle {path}:\n{}",
            about(&layer, path)
        );
    }
    // The magic link fails as a magic link (ELOOP), not for want of a file.
    let (_, layer) = run_logged(&bed, &[], &[], &["cat", &attempts[3]]);
    assert!(
        layer.contains(&format!(
            "open {}: direct, failed with errno {}",
            attempts[3],
            libc::ELOOP
        )),
        "{layer}"
    );
    // The same run's direct path does reach the target's files below the link
    // to `/`: the link resolved in the target's root.
    let hosts = format!("{root_link}/etc/hosts");
    let (out, layer) = run_logged(&bed, &[], &[], &["cat", &hosts]);
    assert!(
        out.assert_success()
            .stdout
            .contains("only-target.graft.test"),
        "{out}"
    );
    assert!(layer.contains(&direct_line(&hosts)), "{layer}");
}

#[test]
fn the_layers_root_descriptor_gives_the_program_nothing_its_user_could_not_open() {
    let bed = Bed::new();
    let path = bed.remote("hello.txt");
    let private = bed.remote("private.txt");
    bed.in_target(&[
        "sh",
        "-c",
        &format!("echo private > {private} && chmod 600 {private}"),
    ])
    .assert_success();
    // The host-only secret, readable by root alone: what `..` out of the
    // target's root would reach without RESOLVE_IN_ROOT.
    let secret = bed.hostonly_dir.join("secret.txt");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let escape = format!(
        "{}{}",
        "../".repeat(16),
        secret.display().to_string().trim_start_matches('/')
    );
    let pid = bed.target_pid.to_string();
    let (out, layer) = run_logged(
        &bed,
        &[],
        &[],
        &[
            python(),
            &script(),
            "fdattack",
            &path,
            &pid,
            &private,
            &escape,
        ],
    );
    let seen = json(&out);
    assert!(layer.contains(&direct_line(&path)), "{layer}");
    assert_eq!(
        seen["found"], true,
        "no root descriptor found:\n{out}\n{layer}"
    );
    assert_eq!(seen["write"], "EACCES", "{out}");
    assert_eq!(seen["private"], "EACCES", "{out}");
    assert_eq!(seen["escape"], "EACCES", "{out}");
    let target = bed.in_target(&["cat", &path]);
    assert!(
        target
            .assert_success()
            .stdout
            .starts_with("hello from target")
    );
}

#[test]
fn a_mount_churn_on_the_machine_never_fails_a_remote_open_with_eagain() {
    // With RESOLVE_IN_ROOT every `..` fails with EAGAIN when a mount or rename
    // anywhere on the machine raced the lookup (fs/namei.c), and a node's
    // mounts churn in bursts (pods starting and stopping). A churn of
    // recursive binds of 200 mounts runs beside a program that reads a remote
    // file through `..` across the target's mounts and opens a host-only one
    // the same way; on the direct path and on the agent's, every read is the
    // target's file and every escape ENOENT: no EAGAIN reaches the program.
    let bed = Bed::new();
    let src = bed.work_dir().join("churn-src");
    let dst = bed.work_dir().join("churn-dst");
    for dir in [&src, &dst] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let (src, dst) = (src.display(), dst.display());
    let churn_script = format!(
        "set -e; mount -t tmpfs churn {src}; \
         for i in $(seq 200); do mkdir {src}/$i; mount -t tmpfs c$i {src}/$i; done; \
         while :; do mount --rbind {src} {dst}; umount -R {dst}; done"
    );
    let mut churn = std::process::Command::new("unshare");
    churn.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &churn_script,
    ]);
    let mut churn = bed.spawn(churn, "mount churn");
    let remote = bed.remote_dir.display().to_string();
    let hello = bed.remote("hello.txt");
    let good = format!("{remote}/up{hello}");
    let bad = format!("{remote}/up{}/secret.txt", bed.hostonly_dir.display());
    let expected = bed
        .in_target(&["cat", &hello])
        .assert_success()
        .stdout
        .clone();
    let times = 1500;
    let script = script();
    let args = [python(), &script, "churn", &times.to_string(), &good, &bad];
    for env in [&[][..], &[("GRAFT_OPEN_DIRECT", "0")][..]] {
        let (out, layer) = run_logged(&bed, env, &[], &args);
        let seen = json(&out);
        assert_eq!(
            seen["read"],
            serde_json::json!({ expected.as_str(): times }),
            "{env:?}:\n{out}"
        );
        assert_eq!(
            seen["size"],
            serde_json::json!({ expected.len().to_string(): times }),
            "{env:?}:\n{out}"
        );
        assert_eq!(
            seen["bad"],
            serde_json::json!({ "ENOENT": times }),
            "{env:?}:\n{out}"
        );
        assert_eq!(
            layer.contains(&direct_line(&good)),
            env.is_empty(),
            "{env:?}:\n{}",
            about(&layer, &good)
        );
    }
    assert!(
        churn.try_status().is_none(),
        "the mount churn stopped early:\n{}",
        churn.output_report()
    );
}
