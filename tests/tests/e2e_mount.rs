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
