//! Live cluster (see `graft_tests::cluster`): `graft mount` of a Deployment's
//! container shows that container's files at a local directory (a file of its
//! ConfigMap volume, its `/etc/hostname`), refuses writes in read mode, and
//! unmounts on Ctrl-C with no agent pod left.

use std::path::Path;
use std::time::{Duration, Instant};

use graft_tests::cluster::{Live, SESSION_TIMEOUT};
use graft_tests::{Proc, RUN_TIMEOUT, fixture};
use nix::sys::signal::Signal;

fn is_mount_point(dir: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let wanted = dir.display().to_string();
    text.lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
}

#[test]
fn e2e_mount_shows_the_containers_files() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("fuse-mount");
    ns.workload("Deployment", "web", 1, 1);
    let pod = ns.ready_pods("app=web").remove(0);
    let pod_name = pod.metadata.name.clone().unwrap();

    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let mut command = ns.graft("mount");
    command
        .args(["--target", "deploy/web/container/app"])
        .arg(&dir);
    let mut graft = Proc::spawn(command, "graft mount deploy/web");
    let deadline = Instant::now() + SESSION_TIMEOUT;
    while !(is_mount_point(&dir) && nix::sys::statfs::statfs(&dir).is_ok()) {
        if let Some(status) = graft.try_status() {
            panic!("graft mount ended ({status})\n{}", graft.output_report());
        }
        assert!(
            Instant::now() < deadline,
            "nothing mounted within {SESSION_TIMEOUT:?}\n{}",
            graft.output_report()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let served = std::fs::read_to_string(dir.join("fixtures/named_http.py")).unwrap();
    assert_eq!(
        served,
        std::fs::read_to_string(fixture("named_http.py")).unwrap()
    );
    let hostname = std::fs::read_to_string(dir.join("etc/hostname")).unwrap();
    assert_eq!(hostname.trim(), pod_name);
    let listed: Vec<String> = std::fs::read_dir(dir.join("fixtures"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(listed.iter().any(|n| n == "named_http.py"), "{listed:?}");
    let write = std::fs::write(dir.join("tmp/from-graft"), "x").unwrap_err();
    assert_eq!(write.raw_os_error(), Some(libc::EROFS), "{write}");

    graft.signal(Signal::SIGINT);
    let out = graft.finish(RUN_TIMEOUT);
    assert!(out.success(), "{out}");
    assert!(!is_mount_point(&dir), "still mounted after Ctrl-C\n{out}");
    assert_eq!(
        ns.agent_pods_after_cleanup(),
        0,
        "an agent pod is left\n{out}"
    );
}

/// A user other than root mounts through the setuid `fusermount3` (the mount
/// table says `fuse.graft`, owned by that user), reads the container's files,
/// and root itself cannot enter that user's mount.
#[test]
fn e2e_mount_without_root_goes_through_fusermount3() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("fuse-rootless");
    ns.workload("Pod", "web", 1, 1);
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    // A home for nobody: its own copy of the kubeconfig, the session
    // directory, the mount point.
    let home = tempfile::tempdir().unwrap();
    let kubeconfig = home.path().join("kubeconfig");
    std::fs::copy(&live.kubeconfig, &kubeconfig).unwrap();
    let dir = home.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    for path in [home.path(), kubeconfig.as_path(), dir.as_path()] {
        nix::unistd::chown(path, Some(nobody.uid), Some(nobody.gid)).unwrap();
    }
    std::fs::set_permissions(
        home.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut command = std::process::Command::new("setpriv");
    command
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(graft_tests::graft_bin())
        .args(["mount", "--kubeconfig"])
        .arg(&kubeconfig)
        .args(["-n", &ns.name, "--agent-image", &live.agent_image])
        .args([
            "--agent-pull-policy",
            "IfNotPresent",
            "--target",
            "pod/web/container/app",
        ])
        .arg(&dir)
        .env("HOME", home.path())
        .env("XDG_RUNTIME_DIR", home.path());
    let mut graft = Proc::spawn(command, "graft mount as nobody");
    let deadline = Instant::now() + SESSION_TIMEOUT;
    while !is_mount_point(&dir) {
        if let Some(status) = graft.try_status() {
            panic!("graft mount ended ({status})\n{}", graft.output_report());
        }
        assert!(
            Instant::now() < deadline,
            "nothing mounted within {SESSION_TIMEOUT:?}\n{}",
            graft.output_report()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let line = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&*dir.display().to_string()))
        .unwrap()
        .to_owned();
    assert!(
        line.contains(" - fuse.graft graft ") && line.contains(&format!("user_id={}", nobody.uid)),
        "{line}"
    );
    let file = dir.join("fixtures/named_http.py").display().to_string();
    let mut cat = std::process::Command::new("setpriv");
    cat.args([
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "cat",
        &file,
    ]);
    let read = Proc::spawn(cat, "cat as nobody").finish(RUN_TIMEOUT);
    assert_eq!(
        read.assert_success().stdout,
        std::fs::read_to_string(fixture("named_http.py")).unwrap()
    );
    let as_root = std::fs::read(&file).unwrap_err();
    assert_eq!(as_root.raw_os_error(), Some(libc::EACCES), "{as_root}");

    graft.signal(Signal::SIGTERM);
    let out = graft.finish(RUN_TIMEOUT);
    assert!(out.success(), "{out}");
    assert!(!is_mount_point(&dir), "still mounted after SIGTERM\n{out}");
}
