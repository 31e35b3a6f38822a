//! Issue 11 point 2, containers: `graft run --target pid:PID -- podman run …` runs
//! the container in the session's isolated network namespace with the target's
//! environment (`--env-file`) and remote directories (graft FUSE mounts as `-v`
//! volumes), and the target's incoming traffic reaches the container's listener.
//! The image is built here with no registry: `FROM scratch` with the static Go
//! fixture (Debian's golang-go, `CGO_ENABLED=0`).

use std::process::Command;
use std::time::Duration;

use graft_tests::{Bed, STEAL_TIMEOUT, fixture, wait_until};
use nix::sys::signal::Signal;

/// Lower than this machine's limits: podman asks runc to raise `nofile` and
/// `nproc` by default, which a root without CAP_SYS_RESOURCE (this test VM's)
/// may not do.
const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

/// Whether podman can run a container here; why not otherwise.
fn podman_usable() -> Result<(), String> {
    let out = Command::new("podman")
        .args(["info", "--format", "{{.Host.OCIRuntime.Name}}"])
        .output()
        .map_err(|e| format!("podman is not installed ({e}); apt-get install podman"))?;
    if !out.status.success() {
        return Err(format!(
            "`podman info` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Builds `localhost/graft-test-goapp:N` from scratch with the static Go fixture.
fn go_image(bed: &Bed) -> String {
    let context = bed.work_dir().join("image");
    std::fs::create_dir_all(&context).unwrap();
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(context.join("goapp"))
        .arg(fixture("goapp.go"))
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .env("GOCACHE", "/tmp/graft-test-gocache")
        .env("GOPATH", "/tmp/graft-test-gopath")
        .current_dir(bed.work_dir())
        .status()
        .expect("go build (Debian's golang-go)");
    assert!(status.success(), "go build goapp.go failed");
    std::fs::write(
        context.join("Containerfile"),
        "FROM scratch\nCOPY goapp /goapp\nENTRYPOINT [\"/goapp\"]\n",
    )
    .unwrap();
    let tag = format!("localhost/graft-test-goapp:{}", bed.n);
    let out = Command::new("podman")
        .args(["build", "-q", "-t", &tag])
        .arg(&context)
        .output()
        .unwrap();
    assert!(out.status.success(), "podman build: {out:?}");
    tag
}

/// `--runtime runc` on a machine with cgroup v1 hierarchies mounted, else
/// nothing (podman's default runtime). Debian 12's default, crun 1.8, refuses
/// such a machine when its cgroup2 hierarchy has controllers too ("cgroups in
/// hybrid mode not supported"); runc runs there (`scripts/install-deps`
/// installs it on such machines).
fn runtime_args() -> Vec<&'static str> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let cgroup_v1 = mounts
        .lines()
        .any(|line| line.split(' ').nth(2) == Some("cgroup"));
    if cgroup_v1 {
        vec!["--runtime", "runc"]
    } else {
        Vec::new()
    }
}

/// `podman run --rm [--runtime runc] ULIMITS IMAGE ARGS...`.
fn podman_run<'a>(image: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut command = vec!["podman", "run", "--rm"];
    command.extend(runtime_args());
    command.extend(ULIMITS);
    command.push(image);
    command.extend(args);
    command
}

/// graft FUSE mounts in this machine's mount table.
fn host_graft_mounts() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter(|line| {
            line.split_once(" - ").is_some_and(|(_, right)| {
                let mut fields = right.split(' ');
                fields.next().is_some_and(|t| t.starts_with("fuse"))
                    && fields.next() == Some("graft")
            })
        })
        .map(str::to_owned)
        .collect()
}

fn curl(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-g", "--noproxy", "*", "--max-time", "3", url])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_podman_container_serves_stolen_requests_and_sees_the_targets_network_env_and_files() {
    if let Err(why) = podman_usable() {
        eprintln!("SKIPPED: podman cannot run containers here: {why}");
        return;
    }
    let bed = Bed::new();
    let image = go_image(&bed);
    let remote = format!("^{}", bed.remote_dir.display());
    let hello = bed.remote("hello.txt");

    // Its client reaches a service only the target reaches.
    let url = bed.service_url();
    let out = bed.run(&[], &podman_run(&image, &["get", &url]));
    assert_eq!(out.assert_success().out(), bed.service_reply(), "{out}");
    assert!(
        out.stderr.contains("podman run: the container joins"),
        "{out}"
    );
    // The target's environment and its files (a volume of the --fs-remote path).
    let out = bed.run(&[], &podman_run(&image, &["env", "GRAFT_TEST_MARKER"]));
    assert_eq!(out.assert_success().out(), bed.marker, "{out}");
    let out = bed.run(
        &["--fs-remote", &remote],
        &podman_run(&image, &["read", &hello]),
    );
    assert!(
        out.assert_success()
            .stdout
            .starts_with(&format!("hello from target {}", bed.n)),
        "{out}"
    );
    // The container's own name resolution asks the target's resolver.
    let out = bed.run(
        &[],
        &podman_run(&image, &["resolve", "only-target.graft.test"]),
    );
    assert!(
        out.assert_success()
            .out()
            .contains(&bed.service_v4.to_string()),
        "{out}"
    );

    // Its server gets the target's stolen requests.
    let port = bed.app_port.to_string();
    let serve = podman_run(&image, &["serve", &port]);
    let session = bed.spawn(
        bed.graft_run(&["--steal"], &serve),
        "graft run -- podman run serve",
    );
    let target = format!("{}stolen", bed.target_url(bed.app_port));
    let reply = wait_until(STEAL_TIMEOUT * 2, Duration::from_millis(200), || {
        Some(curl(&target)).filter(|b| b.starts_with("local go"))
    })
    .unwrap_or_else(|| panic!("never stolen\n{}", session.output_report()));
    assert_eq!(
        reply.trim(),
        format!(
            "local go port={port} path=/stolen user= marker={}",
            bed.marker
        )
    );
    session.signal(Signal::SIGTERM);
    let _ = bed.finish(session, Duration::from_secs(30));
    // Once graft is gone the target serves its port again, and no mount is left.
    let back = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        Some(curl(&bed.target_url(bed.app_port))).filter(|b| b.trim() == bed.target_reply())
    });
    assert!(back.is_some(), "the port was not given back");
    assert!(host_graft_mounts().is_empty(), "{:?}", host_graft_mounts());
}

#[test]
fn docker_run_is_refused_with_the_reason() {
    let bed = Bed::new();
    let out = bed.run(&[], &["docker", "run", "--rm", "busybox"]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("docker daemon"), "{out}");
    let out = bed.run(&[], &["podman", "run", "--network=bridge", "img"]);
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("graft chooses the container's network"),
        "{out}"
    );
}
