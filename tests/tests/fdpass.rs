//! Issue 13, descriptor passing for local targets: a remote file opened by the
//! program is the target's file itself (the agent opens it confined to the
//! target's root and passes the descriptor), so writes under `--fs write` are
//! live, and `mmap`, `fstat` and appends act on the real file; the relayed path
//! still works when passing is off (`GRAFT_FD_PASSING=0`, the cluster's path);
//! symlinks cannot leave the target's root on this path either; and descriptors
//! a hostile program passes to graft's layer socket are refused without a leak.
//!
//! Sockets (tests/fixtures/sockfd.py): an outgoing TCP connection is the
//! target's own socket (the service sees the target's address, getsockname and
//! getpeername are real, the program's flags and options carry over, a
//! non-blocking connect says EINPROGRESS then turns writable), a whole stolen
//! connection is accepted as the target's socket; passing off relays both; and
//! the attacks: a destination a rule keeps local gets no target socket, a
//! hand-made layer frame gets none for the target's loopback or for a
//! connection it was not delivered, a peer without `+fds` (a Kubernetes link)
//! gets none, and no socket passed is ever a listener.

#[path = "fdpass/ahead.rs"]
mod ahead;
#[path = "fdpass/sockets.rs"]
mod sockets;

use graft_tests::{Bed, fixture_str, python};

/// `graft run` with `GRAFT_LOG=debug` and `extra` environment, to completion.
/// The layer's direct open (tests/tests/files_direct.rs) is off: these tests
/// are about the descriptors the agent passes, the direct path's fallback.
fn run_logged(
    bed: &Bed,
    extra: &[(&str, &str)],
    flags: &[&str],
    cmd: &[&str],
) -> graft_tests::Outcome {
    let mut env = vec![("GRAFT_OPEN_DIRECT", "0")];
    env.extend_from_slice(extra);
    graft_tests::logged::run_logged(bed, &env, flags, cmd).0
}

#[test]
fn a_file_written_with_fs_write_is_the_live_target_file_mapped_stat_and_appended() {
    let bed = Bed::new();
    let path = bed.remote("sub/nested.txt");
    let script = fixture_str("fdpass.py");
    let out = run_logged(
        &bed,
        &[],
        &["--fs", "write"],
        &[python(), &script, "live", &path],
    );
    let seen: serde_json::Value = serde_json::from_str(out.assert_success().out())
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"));
    let expected = format!("LIVEed in target {}\n+tail", bed.n);
    assert_eq!(seen["mapped"], expected.as_str(), "{out}");
    assert_eq!(seen["size"], expected.len(), "{out}");
    // The descriptor is the target's own inode, not a local copy.
    let ino = bed.in_target(&["stat", "-c", "%i", &path]);
    assert_eq!(
        seen["ino"].to_string(),
        ino.assert_success().out().trim(),
        "the program's fstat saw another file:\n{out}"
    );
    assert!(
        out.stderr.contains("file opened as a descriptor"),
        "the debug log does not say the descriptor was passed:\n{out}"
    );
    let cat = bed.in_target(&["cat", &path]);
    assert_eq!(cat.assert_success().stdout, expected);
}

#[test]
fn with_passing_off_files_are_relayed_and_still_read() {
    let bed = Bed::new();
    let path = bed.remote("hello.txt");
    let passed = run_logged(&bed, &[], &[], &["cat", &path]);
    assert!(
        passed
            .assert_success()
            .stdout
            .starts_with("hello from target")
    );
    assert!(
        passed.stderr.contains("file opened as a descriptor"),
        "{passed}"
    );
    let relayed = run_logged(&bed, &[("GRAFT_FD_PASSING", "0")], &[], &["cat", &path]);
    assert!(
        relayed
            .assert_success()
            .stdout
            .starts_with("hello from target"),
        "{relayed}"
    );
    assert!(
        !relayed.stderr.contains("file opened as a descriptor"),
        "{relayed}"
    );
    assert!(
        relayed.stderr.contains("files from the agent: relayed"),
        "{relayed}"
    );
}

#[test]
fn a_passed_descriptor_never_leaves_the_target_root() {
    let bed = Bed::new();
    let secret = format!("host-secret {}", bed.n);
    let out = run_logged(&bed, &[], &[], &["cat", &bed.remote("secret-link")]);
    assert!(!out.stdout.contains(&secret), "a symlink escaped:\n{out}");
    assert!(!out.success(), "{out}");
    let through_up = format!(
        "{}/up{}/secret.txt",
        bed.remote_dir.display(),
        bed.hostonly_dir.display()
    );
    let out = run_logged(&bed, &[], &[], &["cat", &through_up]);
    assert!(!out.stdout.contains(&secret), "`..` escaped:\n{out}");
    // The same run passes descriptors for files inside the root.
    let hosts = format!("{}/up/etc/hosts", bed.remote_dir.display());
    let out = run_logged(&bed, &[], &[], &["cat", &hosts]);
    assert!(
        out.assert_success()
            .stdout
            .contains("only-target.graft.test"),
        "{out}"
    );
    assert!(out.stderr.contains("file opened as a descriptor"), "{out}");
}

#[test]
fn descriptors_a_hostile_program_passes_to_the_layer_socket_are_closed() {
    let bed = Bed::new();
    let script = fixture_str("fdpass.py");
    let out = bed.run(&[], &[python(), &script, "hostile"]);
    let seen: serde_json::Value = serde_json::from_str(out.assert_success().out())
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"));
    assert_eq!(
        seen["counted"], "graft",
        "the descriptors counted are not graft's: {out}"
    );
    let before = seen["before"].as_u64().unwrap();
    let after = seen["after"].as_u64().unwrap();
    // 40 descriptors were passed; none may stay in graft.
    assert!(
        after <= before + 2,
        "graft holds {} more descriptors after the attack:\n{out}",
        after - before
    );
}
