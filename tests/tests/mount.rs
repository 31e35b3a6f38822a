//! `graft mount` (issue 11, the files of points 1 and 3): the target's
//! filesystem at a local directory through FUSE. Real programs (ls, cat, stat,
//! find, sha256sum, python) see the target's files, symlinks cannot lead to this
//! machine's files, read mode refuses changes with EROFS, write mode changes the
//! target, every way out unmounts, and another user cannot enter the mount.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use graft_tests::{BIG_FILE_LEN, Bed, Outcome, Proc, RUN_TIMEOUT, big_file_byte, python};
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};

/// How long a mount may take to appear (agent start included).
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `graft mount` and its mount point.
struct Mounted {
    proc: Proc,
    dir: PathBuf,
}

/// Whether `dir` is a mount point in `/proc/self/mountinfo`.
fn is_mount_point(dir: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let wanted = dir.display().to_string();
    text.lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
}

/// Starts `graft mount --target pid:PID FLAGS... DIR` (DIR a fresh empty
/// directory under the bed's work dir) and waits until DIR is mounted.
fn mount(bed: &Bed, name: &str, flags: &[&str]) -> Mounted {
    let dir = bed.work_dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    mount_at(bed, &dir, flags)
}

fn mount_at(bed: &Bed, dir: &Path, flags: &[&str]) -> Mounted {
    let target = format!("pid:{}", bed.target_pid);
    let mut args = vec!["mount", "--target", &target];
    args.extend_from_slice(flags);
    let dir_arg = dir.display().to_string();
    args.push(&dir_arg);
    let mut proc = bed.spawn(bed.graft(&args), "graft mount");
    let deadline = Instant::now() + MOUNT_TIMEOUT;
    // Mounted and answering (a dead mount left there answers ENOTCONN).
    while !(is_mount_point(dir) && nix::sys::statfs::statfs(dir).is_ok()) {
        if let Some(status) = proc.try_status() {
            panic!(
                "graft mount ended ({status}) before mounting\n{}",
                proc.output_report()
            );
        }
        assert!(
            Instant::now() < deadline,
            "nothing mounted at {} within {MOUNT_TIMEOUT:?}\n{}",
            dir.display(),
            proc.output_report()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Mounted {
        proc,
        dir: dir.to_owned(),
    }
}

impl Mounted {
    /// DIR joined with an absolute target path (the mount shows the target's `/`).
    fn at(&self, target_path: &str) -> String {
        self.dir
            .join(target_path.trim_start_matches('/'))
            .display()
            .to_string()
    }

    /// Stops graft with `signal` and returns how it ended; the mount must be gone.
    fn stop(self, signal: Signal) -> Outcome {
        self.proc.signal(signal);
        let out = self.proc.finish(RUN_TIMEOUT);
        assert!(
            !is_mount_point(&self.dir),
            "{} is still mounted after graft ended\n{out}",
            self.dir.display()
        );
        out
    }
}

/// Runs a local program (not under graft) and waits for it.
fn run(program: &str, args: &[&str]) -> Outcome {
    let mut command = Command::new(program);
    command.args(args);
    Proc::spawn(command, &format!("{program} {}", args.join(" "))).finish(RUN_TIMEOUT)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hello(bed: &Bed) -> String {
    format!("hello from target {}\nsecond line\nthird line\n", bed.n)
}

fn target_hosts(bed: &Bed) -> String {
    std::fs::read_to_string(bed.dir.join("hosts")).unwrap()
}

#[test]
fn ls_cat_stat_find_and_python_see_the_targets_files() {
    let bed = Bed::new();
    let m = mount(&bed, "mnt", &[]);
    let remote = bed.remote_dir.display().to_string();
    // The host's directory is empty: whatever shows comes from the target.
    assert_eq!(std::fs::read_dir(&bed.remote_dir).unwrap().count(), 0);

    let ls = run("ls", &["-1", &m.at(&remote)]);
    assert_eq!(
        ls.assert_success().lines(),
        [
            "big.bin",
            "hello.txt",
            "hosts-link",
            "secret-link",
            "sub",
            "up"
        ]
    );
    let cat = run("cat", &[&m.at(&bed.remote("hello.txt"))]);
    assert_eq!(cat.assert_success().stdout, hello(&bed));
    let stat = run("stat", &["-c", "%s %F", &m.at(&bed.remote("big.bin"))]);
    assert_eq!(
        stat.assert_success().out(),
        format!("{BIG_FILE_LEN} regular file")
    );
    let find = run("find", &[&m.at(&bed.remote("sub")), "-type", "f"]);
    assert_eq!(
        find.assert_success().out(),
        m.at(&bed.remote("sub/nested.txt"))
    );
    // /etc/hosts is the target's (a bind mount in its mount namespace).
    let hosts = run("cat", &[&m.at("/etc/hosts")]);
    assert_eq!(hosts.assert_success().stdout, target_hosts(&bed));

    let expected: Vec<u8> = (0..BIG_FILE_LEN).map(big_file_byte).collect();
    let sum = run("sha256sum", &[&m.at(&bed.remote("big.bin"))]);
    let want = hex(&Sha256::digest(&expected));
    assert_eq!(
        sum.assert_success().out().split(' ').next(),
        Some(want.as_str())
    );

    let script = format!(
        "import os, json; d = {dir:?}; print(json.dumps({{'text': open(os.path.join(d, 'hello.txt')).read(), \
         'list': sorted(os.listdir(d)), 'size': os.path.getsize(os.path.join(d, 'big.bin')), \
         'isdir': os.path.isdir(os.path.join(d, 'sub'))}}))",
        dir = m.at(&remote)
    );
    let py = run(python(), &["-c", &script]);
    let seen: serde_json::Value = serde_json::from_str(py.assert_success().out()).unwrap();
    assert_eq!(seen["text"], hello(&bed));
    assert_eq!(
        seen["list"],
        serde_json::json!([
            "big.bin",
            "hello.txt",
            "hosts-link",
            "secret-link",
            "sub",
            "up"
        ])
    );
    assert_eq!(seen["size"], BIG_FILE_LEN);
    assert_eq!(seen["isdir"], true);
    m.stop(Signal::SIGTERM).assert_success();
}

/// The attack: symlinks in the target that name this machine's files (an
/// absolute path to a file only the host has, `../../..` out of the mount).
#[test]
fn symlinks_cannot_lead_to_this_machines_files() {
    let bed = Bed::new();
    let secret = bed.hostonly_dir.join("secret.txt");
    assert!(
        std::fs::read_to_string(&secret)
            .unwrap()
            .starts_with("host-secret"),
        "the bed's host-only secret is missing"
    );
    let m = mount(&bed, "mnt", &[]);
    // hosts-link -> /etc/hosts: the target's hosts file, not this machine's.
    let hosts = run("cat", &[&m.at(&bed.remote("hosts-link"))]);
    assert_eq!(hosts.assert_success().stdout, target_hosts(&bed));
    assert_ne!(
        target_hosts(&bed),
        std::fs::read_to_string("/etc/hosts").unwrap()
    );
    // secret-link -> the host-only secret, which the target does not have.
    let leak = run("cat", &[&m.at(&bed.remote("secret-link"))]);
    assert!(!leak.success(), "read through secret-link:\n{leak}");
    assert!(!leak.stdout.contains("host-secret"), "{leak}");
    assert!(leak.stderr.contains("No such file"), "{leak}");
    // up -> ../../../../../../..: the target's root, inside the mount.
    let up = run("cat", &[&m.at(&bed.remote("up/etc/hosts"))]);
    assert_eq!(up.assert_success().stdout, target_hosts(&bed));
    let text = run("readlink", &[&m.at(&bed.remote("up"))]);
    assert_eq!(text.assert_success().out(), "../../../..", "{text}");
    let resolved = run("readlink", &["-f", &m.at(&bed.remote("up"))]);
    assert_eq!(resolved.assert_success().out(), m.dir.display().to_string());
    m.stop(Signal::SIGTERM).assert_success();

    // With --root, links out of the subtree lead nowhere; find stays inside.
    let remote = bed.remote_dir.display().to_string();
    let m = mount(&bed, "sub-mnt", &["--root", &remote]);
    for link in ["hosts-link", "up/etc/hosts", "secret-link"] {
        let out = run("cat", &[&m.at(link)]);
        assert!(!out.success(), "read {link} out of the subtree:\n{out}");
        assert!(!out.stdout.contains("host-secret"), "{out}");
    }
    let find = run("find", &[&m.dir.display().to_string()]);
    let mut found: Vec<String> = find
        .assert_success()
        .lines()
        .iter()
        .map(|l| l.replacen(&m.dir.display().to_string(), "", 1))
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            "",
            "/big.bin",
            "/hello.txt",
            "/hosts-link",
            "/secret-link",
            "/sub",
            "/sub/nested.txt",
            "/up"
        ]
    );
    let cat = run("cat", &[&m.at("hello.txt")]);
    assert_eq!(cat.assert_success().stdout, hello(&bed));
    m.stop(Signal::SIGTERM).assert_success();
}

#[test]
fn read_mode_refuses_every_change_with_erofs() {
    let bed = Bed::new();
    let remote = bed.remote_dir.display().to_string();
    let m = mount(&bed, "mnt", &["--root", &remote]);
    let d = m.dir.display().to_string();
    let script = format!(
        "import os, errno\n\
         def tryit(f):\n\
         \x20   try:\n\
         \x20       f(); return 'ok'\n\
         \x20   except OSError as e:\n\
         \x20       return errno.errorcode[e.errno]\n\
         print(tryit(lambda: open('{d}/new.txt', 'w')))\n\
         print(tryit(lambda: open('{d}/hello.txt', 'a')))\n\
         print(tryit(lambda: os.truncate('{d}/hello.txt', 0)))\n\
         print(tryit(lambda: os.remove('{d}/hello.txt')))\n\
         print(tryit(lambda: os.rename('{d}/hello.txt', '{d}/moved.txt')))\n\
         print(tryit(lambda: os.mkdir('{d}/newdir')))\n"
    );
    let out = run(python(), &["-c", &script]);
    assert_eq!(out.assert_success().lines(), ["EROFS"; 6]);
    let shell = run("sh", &["-c", &format!("echo x > {d}/hello.txt")]);
    assert!(shell.stderr.contains("Read-only file system"), "{shell}");
    let cat = bed.in_target(&["cat", &bed.remote("hello.txt")]);
    assert_eq!(cat.assert_success().stdout, hello(&bed));
    m.stop(Signal::SIGTERM).assert_success();
}

#[test]
fn write_mode_creates_appends_renames_and_deletes_in_the_target() {
    let bed = Bed::new();
    let remote = bed.remote_dir.display().to_string();
    let m = mount(&bed, "mnt", &["--fs", "write", "--root", &remote]);
    let d = m.dir.display().to_string();
    let script = format!(
        "set -e; echo first > {d}/new.txt; echo second >> {d}/new.txt; mkdir {d}/made; \
         mv {d}/new.txt {d}/made/moved.txt; rm {d}/hello.txt; mkdir {d}/gone; rmdir {d}/gone; \
         printf 'short' > {d}/sub/nested.txt"
    );
    run("sh", &["-c", &script]).assert_success();
    let py = format!("open('{d}/made/py.txt', 'w').write('from python\\n')");
    run(python(), &["-c", &py]).assert_success();
    // 5 MiB in one write(2): several FUSE writes of at most 1 MiB each.
    let big: Vec<u8> = (0..5 * 1024 * 1024)
        .map(|i| big_file_byte(i * 3 + 1))
        .collect();
    std::fs::write(m.dir.join("made/big.out"), &big).unwrap();
    let sum = bed.in_target(&["sha256sum", &bed.remote("made/big.out")]);
    let want = hex(&Sha256::digest(&big));
    assert_eq!(
        sum.assert_success().out().split(' ').next(),
        Some(want.as_str())
    );

    let moved = bed.in_target(&["cat", &bed.remote("made/moved.txt")]);
    assert_eq!(moved.assert_success().stdout, "first\nsecond\n");
    let py = bed.in_target(&["cat", &bed.remote("made/py.txt")]);
    assert_eq!(py.assert_success().stdout, "from python\n");
    let nested = bed.in_target(&["cat", &bed.remote("sub/nested.txt")]);
    assert_eq!(nested.assert_success().stdout, "short");
    let ls = bed.in_target(&["ls", "-1", &remote]);
    assert_eq!(
        ls.assert_success().lines(),
        ["big.bin", "hosts-link", "made", "secret-link", "sub", "up"]
    );
    let made = bed.in_target(&["ls", "-1", &bed.remote("made")]);
    assert_eq!(
        made.assert_success().lines(),
        ["big.out", "moved.txt", "py.txt"]
    );
    // Nothing of it landed on this machine.
    assert_eq!(std::fs::read_dir(&bed.remote_dir).unwrap().count(), 0);
    m.stop(Signal::SIGTERM).assert_success();
}

#[test]
fn sigterm_and_a_lost_link_unmount() {
    let bed = Bed::new();
    let m = mount(&bed, "mnt", &[]);
    let out = m.stop(Signal::SIGTERM);
    assert!(out.assert_success().stderr.contains("unmounted"), "{out}");

    let m = mount(&bed, "mnt2", &[]);
    for pid in bed.agent_pids() {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    }
    let out = m.proc.finish(RUN_TIMEOUT);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("lost the link"), "{out}");
    assert!(
        !is_mount_point(&m.dir),
        "still mounted after the link was lost\n{out}"
    );
}

#[test]
fn a_killed_graft_leaves_a_dead_mount_that_the_next_start_removes() {
    let bed = Bed::new();
    let m = mount(&bed, "mnt", &[]);
    m.proc.signal(Signal::SIGKILL);
    let dir = m.dir.clone();
    m.proc.finish(RUN_TIMEOUT);
    // Dead (ENOTCONN) until swept; a graft started by a parallel test may sweep
    // it first, which is the same repair.
    if is_mount_point(&dir) {
        assert_eq!(
            nix::sys::statfs::statfs(&dir).err(),
            Some(nix::errno::Errno::ENOTCONN),
            "a SIGKILLed graft should leave a dead mount"
        );
    }
    let again = mount_at(&bed, &dir, &[]);
    let cat = run("cat", &[&again.at(&bed.remote("hello.txt"))]);
    assert_eq!(cat.assert_success().stdout, hello(&bed));
    again.stop(Signal::SIGTERM).assert_success();
}

/// The attack: another local user reads the target's files through someone
/// else's mount. Without `--allow-other` the kernel refuses every other user.
#[test]
fn another_user_cannot_enter_the_mount() {
    let bed = Bed::new();
    // Let `nobody` reach the mount point itself: only FUSE may refuse.
    let base = bed.work_dir().join("shared");
    std::fs::create_dir_all(base.join("mnt")).unwrap();
    for dir in [bed.work_dir(), base.as_path(), base.join("mnt").as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let as_nobody = |path: &str| {
        run(
            "setpriv",
            &[
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "cat",
                path,
            ],
        )
    };
    let m = mount_at(&bed, &base.join("mnt"), &[]);
    let hello_path = m.at(&bed.remote("hello.txt"));
    let out = as_nobody(&hello_path);
    assert!(!out.success(), "nobody read another user's mount:\n{out}");
    assert!(out.stderr.contains("Permission denied"), "{out}");
    assert_eq!(
        run("cat", &[&hello_path]).assert_success().stdout,
        hello(&bed)
    );
    m.stop(Signal::SIGTERM).assert_success();

    // The control: with --allow-other the same read works.
    let m = mount_at(&bed, &base.join("mnt"), &["--allow-other"]);
    let out = as_nobody(&m.at(&bed.remote("hello.txt")));
    assert_eq!(out.assert_success().stdout, hello(&bed));
    m.stop(Signal::SIGTERM).assert_success();
}

#[test]
fn a_mount_point_that_is_not_an_empty_directory_is_refused_before_any_agent_starts() {
    let bed = Bed::new();
    let dir = bed.work_dir().join("full");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), "mine").unwrap();
    let target = format!("pid:{}", bed.target_pid);
    let proc = bed.spawn(
        bed.graft(&["mount", "--target", &target, &dir.display().to_string()]),
        "graft mount",
    );
    let out = proc.finish(RUN_TIMEOUT);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("is not empty"), "{out}");
    assert!(bed.agent_pids().is_empty(), "an agent was started");
    assert_eq!(
        std::fs::read_to_string(dir.join("keep.txt")).unwrap(),
        "mine"
    );
}

/// A 64 MiB file read whole through the mount, checksummed; the rate is printed
/// (figures, not assertions).
#[test]
fn a_64_mib_file_reads_whole_and_its_rate_is_reported() {
    let bed = Bed::new();
    // The target's root is a bind of this machine's, so a file in the bed's
    // directory is in the target too (the mount reads it through the agent).
    let len = 64 * 1024 * 1024;
    let data: Vec<u8> = (0..len).map(|i| big_file_byte(i * 7 + 3)).collect();
    let file = bed.dir.join("big64.bin");
    std::fs::write(&file, &data).unwrap();
    let root = bed.dir.display().to_string();
    let m = mount(&bed, "mnt", &["--root", &root]);
    let start = Instant::now();
    let sum = run("sha256sum", &[&m.at("big64.bin")]);
    let elapsed = start.elapsed();
    let want = hex(&Sha256::digest(&data));
    assert_eq!(
        sum.assert_success().out().split(' ').next(),
        Some(want.as_str())
    );
    eprintln!(
        "graft mount: read 64 MiB in {:.2} s: {:.1} MiB/s",
        elapsed.as_secs_f64(),
        64.0 / elapsed.as_secs_f64()
    );
    m.stop(Signal::SIGTERM).assert_success();
    std::fs::remove_file(&file).unwrap();
}
