//! Live cluster (see `graft_tests::cluster`), issue 11 point 1 rootless: `graft
//! run` started as `nobody` (no capability, no root) against a pod isolates a
//! static Go program in an unprivileged user namespace; the program reaches a
//! Service by its short cluster name (the pod's search domains, the pure-Go
//! resolver), runs as `nobody`, and its server serves the pod's stolen port.

use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use graft_tests::cluster::{
    APP_PORT, Live, Ns, SESSION_TIMEOUT, interrupt, wait_restored, wait_served_by,
};
use graft_tests::{Proc, fixture, graft_bin, package_dir};
use serde_json::json;

/// `nobody` and `nogroup` on Debian.
const NOBODY: u32 = 65534;

/// Whether this machine lets `nobody` make a user namespace.
fn unprivileged_userns() -> bool {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "unshare",
            "-Urn",
            "true",
        ])
        .status()
        .is_ok_and(|s| s.success())
}

/// A directory of `nobody`'s with a copy of the kubeconfig and the Go program.
fn nobody_dir(live: &Live) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("graft-iso-nobody-")
        .tempdir()
        .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::copy(&live.kubeconfig, &kubeconfig).unwrap();
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(dir.path().join("goapp"))
        .arg(fixture("goapp.go"))
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .env("GOCACHE", "/tmp/graft-test-gocache")
        .env("GOPATH", "/tmp/graft-test-gopath")
        .status()
        .expect("go build");
    assert!(status.success(), "go build goapp.go failed");
    for path in [dir.path(), &kubeconfig, &dir.path().join("goapp")] {
        chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// `graft run` as `nobody` against `target` in `ns`.
fn run_as_nobody(ns: &Ns<'_>, dir: &Path, target: &str, flags: &[&str], cmd: &[&str]) -> Proc {
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(graft_bin())
        .args(["run", "--kubeconfig"])
        .arg(dir.join("kubeconfig"))
        .args(["-n", &ns.name, "--agent-image", &ns.live.agent_image])
        .args(["--agent-pull-policy", "IfNotPresent", "--target", target])
        .args(flags)
        .arg("--")
        .args(cmd)
        .current_dir(package_dir())
        .env("HOME", dir)
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("KUBECONFIG");
    Proc::spawn(
        command,
        &format!("graft run (as nobody) --target {target} {flags:?}"),
    )
}

#[test]
fn e2e_isolate_rootless_go_program() {
    let Some(live) = Live::get() else { return };
    if !unprivileged_userns() {
        println!("skipped: this machine does not let nobody create a user namespace");
        return;
    }
    let ns = live.namespace("iso-rootless");
    ns.workload("Pod", "web", 1, 1);
    ns.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "websvc"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": APP_PORT}]},
    }));
    let dir = nobody_dir(&live);
    let go = dir.path().join("goapp").display().to_string();

    // Outgoing, by the Service's short name: only the pod's resolver knows it
    // (not `web`: the pod's own hosts file names the pod so).
    let run = run_as_nobody(
        &ns,
        dir.path(),
        "pod/web",
        &[],
        &[&go, "get", "http://websvc/"],
    );
    let out = run.finish(SESSION_TIMEOUT);
    assert!(out.out().starts_with("web GET /"), "{out}");
    assert!(out.stderr.contains("is a Go binary"), "{out}");
    let out =
        run_as_nobody(&ns, dir.path(), "pod/web", &[], &[&go, "uid", "-"]).finish(SESSION_TIMEOUT);
    assert_eq!(out.assert_success().out(), NOBODY.to_string());

    // Incoming: the pod's port, stolen, reaches the Go server in the namespace.
    let addr = ns.app_addr("app=web");
    wait_served_by(addr, "web", SESSION_TIMEOUT, None);
    let port = APP_PORT.to_string();
    let graft = run_as_nobody(
        &ns,
        dir.path(),
        "pod/web",
        &["--steal"],
        &[&go, "serve", &port],
    );
    let deadline = std::time::Instant::now() + SESSION_TIMEOUT;
    loop {
        let body = graft_tests::curl(&format!("http://{addr}/stolen")).unwrap_or_default();
        if body.starts_with("local go") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pod's port never reached the isolated Go server (last: {body:?})\n{}",
            graft.output_report()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let outcome = interrupt(graft);
    println!("{outcome}");
    wait_restored(&ns, addr, "web");
}

/// Issue 11 point 1, files: rootless, the static Go program reads the pod's own
/// files at their own paths (its service account's namespace file and
/// `/etc/hostname`), served by graft FUSE mounts inside the unprivileged user
/// namespace; this machine's mount table never shows one.
#[test]
fn e2e_isolate_rootless_go_program_reads_the_pods_files() {
    let Some(live) = Live::get() else { return };
    if !unprivileged_userns() {
        println!("skipped: this machine does not let nobody create a user namespace");
        return;
    }
    let ns = live.namespace("iso-files");
    ns.workload("Pod", "web", 1, 1);
    let dir = nobody_dir(&live);
    let go = dir.path().join("goapp").display().to_string();
    let token_ns = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
    let out = run_as_nobody(&ns, dir.path(), "pod/web", &[], &[&go, "read", token_ns])
        .finish(SESSION_TIMEOUT);
    assert_eq!(out.assert_success().out(), ns.name, "{out}");
    let out = run_as_nobody(
        &ns,
        dir.path(),
        "pod/web",
        &[],
        &[&go, "read", "/etc/hostname"],
    )
    .finish(SESSION_TIMEOUT);
    assert_eq!(out.assert_success().out(), "web", "{out}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts
            .lines()
            .any(|l| l.contains(" - fuse") && l.contains(" graft ")),
        "{mounts}"
    );
}
