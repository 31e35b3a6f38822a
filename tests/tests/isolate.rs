//! Issue 11 point 1, `graft run --isolate`: COMMAND runs in a private network and
//! mount namespace whose only way out is graft's user-space TCP/IP stack, so
//! programs the LD_PRELOAD layer cannot reach (a static Go program built with
//! Debian's golang-go, a static musl C program) see the target: its service, its
//! names (pure-Go and musl resolvers), its environment, and its incoming traffic
//! (stolen, mirrored, filtered). Attacks: a program in the namespace cannot reach
//! this machine's own listeners, and floods of malformed packets and hostile DNS
//! messages into graft's tun do not stop graft.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use graft_tests::{Bed, Proc, STEAL_TIMEOUT, fixture, wait_until};
use nix::sys::signal::Signal;

/// The line graft prints when it isolates a program by itself.
const AUTO: &str = "running it in an isolated network namespace (--isolate)";

/// Builds `fixtures/goapp.go` as Go services are built: `CGO_ENABLED=0`, only the
/// standard library, no network (the build cache is shared between tests).
fn go_app(bed: &Bed) -> String {
    let out = bed.work_dir().join("goapp");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
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
    out.display().to_string()
}

/// Compiles `fixtures/NAME.c` statically with musl (`musl-gcc -static`).
fn musl_static(bed: &Bed, name: &str) -> String {
    let out = bed.work_dir().join(format!("{name}-static"));
    let status = Command::new("musl-gcc")
        .args(["-static", "-O1", "-pthread", "-o"])
        .arg(&out)
        .arg(fixture(&format!("{name}.c")))
        .status()
        .expect("musl-gcc (musl-tools)");
    assert!(status.success(), "musl-gcc {name}.c failed");
    out.display().to_string()
}

/// A static musl C program that prints a file (`read PATH`: open(2), read(2)) or
/// a directory's names (`dir PATH`: opendir(3)).
fn musl_reader(bed: &Bed) -> String {
    let source = bed.work_dir().join("reader.c");
    std::fs::write(
        &source,
        r#"#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    if (!strcmp(argv[1], "dir")) {
        DIR *d = opendir(argv[2]);
        if (!d) { perror(argv[2]); return 1; }
        struct dirent *e;
        while ((e = readdir(d))) printf("%s\n", e->d_name);
        return 0;
    }
    int fd = open(argv[2], O_RDONLY);
    if (fd < 0) { perror(argv[2]); return 1; }
    char buf[4096];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) fwrite(buf, 1, n, stdout);
    if (n < 0) { perror("read"); return 1; }
    return 0;
}
"#,
    )
    .unwrap();
    let out = bed.work_dir().join("reader-static");
    let status = Command::new("musl-gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&out)
        .arg(&source)
        .status()
        .expect("musl-gcc (musl-tools)");
    assert!(status.success(), "musl-gcc reader.c failed");
    out.display().to_string()
}

/// A one-shot HTTP server on `addr` of this machine's namespace that answers
/// every request with the client address it saw; the addresses come out of the
/// returned channel.
fn peer_reporter(addr: SocketAddr) -> (SocketAddr, mpsc::Receiver<String>) {
    let listener = TcpListener::bind(addr).expect("bind the host-only listener");
    let local = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let peer = stream.peer_addr().unwrap().ip().to_string();
            let _ = tx.send(peer.clone());
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = write!(stream, "HTTP/1.0 200 OK\r\n\r\npeer {peer}");
        }
    });
    (local, rx)
}

/// Stops a session with SIGTERM: graft stops COMMAND (in the namespace) and exits.
fn stop(bed: &Bed, session: Proc) {
    session.signal(Signal::SIGTERM);
    let out = bed.finish(session, Duration::from_secs(20));
    assert!(out.signal().is_none() || out.code().is_some(), "{out}");
}

fn curl_with(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-g", "--noproxy", "*", "--max-time", "3"])
        .args(args)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn isolated_curl_reaches_the_service_only_the_target_reaches() {
    let bed = Bed::new();
    let out = bed.run(
        &["--isolate"],
        &["curl", "-sS", "--max-time", "10", &bed.service_url()],
    );
    assert_eq!(out.assert_success().out(), bed.service_reply());
}

#[test]
fn a_static_go_program_is_isolated_by_itself_and_its_http_client_reaches_the_service() {
    let bed = Bed::new();
    let go = go_app(&bed);
    let out = bed.run(&[], &[&go, "get", &bed.service_url()]);
    assert_eq!(out.assert_success().out(), bed.service_reply());
    assert!(
        out.stderr.contains(&format!("is a Go binary: {AUTO}")),
        "{out}"
    );
    // Over IPv6 too.
    let out = bed.run(&[], &[&go, "get", &bed.service_url6()]);
    assert_eq!(out.assert_success().out(), format!("svc {}", bed.link_v6));
}

#[test]
fn without_isolation_a_go_program_escapes_the_layer() {
    // Why the isolated scope exists: under the layer alone, Go's own system calls
    // go out from this machine, where the service is unreachable.
    let bed = Bed::new();
    let go = go_app(&bed);
    let out = bed.run(&["--no-isolate"], &[&go, "get", &bed.service_url()]);
    assert!(!out.success(), "{out}");
    assert!(!out.stderr.contains(AUTO), "{out}");
}

#[test]
fn the_pure_go_resolver_gets_the_targets_names() {
    let bed = Bed::new();
    let go = go_app(&bed);
    let service = bed.service_v4.to_string();
    // The target's resolver (dnsmasq beside the service), its search domain, its
    // hosts file.
    for name in ["svc.graft.test", "svc", "only-target.graft.test"] {
        let out = bed.run(&[], &[&go, "resolve", name]);
        let addrs = out.assert_success().out().to_owned();
        assert!(
            addrs.split(' ').any(|a| a == service),
            "{name} resolved to {addrs:?}, not {service}\n{out}"
        );
    }
    // The target's resolver does not know it (dnsmasq refuses: a temporary
    // failure for the target's glibc too).
    let out = bed.run(&[], &[&go, "resolve", "nowhere.graft.test"]);
    assert!(!out.success(), "{out}");
}

#[test]
fn a_go_program_sees_the_target_environment_and_sends_udp_from_the_target() {
    let bed = Bed::new();
    let go = go_app(&bed);
    let out = bed.run(&[], &[&go, "env", "GRAFT_TEST_MARKER"]);
    assert_eq!(out.assert_success().out(), bed.marker);
    let service = format!("{}:7", bed.service_v4);
    let out = bed.run(&[], &[&go, "udp", &service]);
    assert_eq!(
        out.assert_success().out(),
        format!("svc-udp {} go-udp", bed.link_v4)
    );
}

#[test]
fn a_static_musl_c_program_connects_and_resolves_from_the_target() {
    let bed = Bed::new();
    let net = musl_static(&bed, "net");
    let service = bed.service_v4.to_string();
    let out = bed.run(&[], &[&net, "threads", &service, "7", "16"]);
    assert_eq!(out.assert_success().out(), "threads ok 16 of 16");
    assert!(
        out.stderr
            .contains(&format!("is statically linked: {AUTO}")),
        "{out}"
    );
    let out = bed.run(&[], &[&net, "resolve", "svc.graft.test"]);
    let lines = out.assert_success().lines();
    assert!(
        lines.contains(&format!("getaddrinfo {service}").as_str()),
        "{out}"
    );
}

#[test]
fn a_refused_connect_in_the_target_is_a_refused_connect() {
    let bed = Bed::new();
    // Nothing listens on the service's port 9.
    let url = format!("http://{}:9/", bed.service_v4);
    let out = bed.run(&["--isolate"], &["curl", "-sS", "--max-time", "10", &url]);
    // curl's exit code 7: the connect failed (not 52/56: accepted, then closed).
    assert_eq!(out.code(), Some(7), "{out}");
    let script = format!(
        "import socket\ntry:\n  socket.create_connection(('{}', 9), 10)\nexcept OSError as e:\n  print(type(e).__name__)",
        bed.service_v4
    );
    let out = bed.run(&["--isolate"], &["python3", "-c", &script]);
    assert_eq!(out.assert_success().out(), "ConnectionRefusedError");
}

#[test]
fn the_go_server_serves_stolen_requests() {
    let bed = Bed::new();
    let go = go_app(&bed);
    let port = bed.app_port.to_string();
    let session = bed.spawn(
        bed.graft_run(&["--steal"], &[&go, "serve", &port]),
        "graft run --steal -- goapp serve",
    );
    let url = bed.target_url(bed.app_port);
    let reply = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        Some(curl_with(&[&format!("{url}stolen")])).filter(|b| b.starts_with("local go"))
    })
    .unwrap_or_else(|| panic!("never stolen\n{}", session.output_report()));
    assert_eq!(
        reply.trim(),
        format!(
            "local go port={port} path=/stolen user= marker={}",
            bed.marker
        )
    );
    // IPv6 clients too.
    let reply = curl_with(&[&bed.target_url6(bed.app_port)]);
    assert!(reply.starts_with("local go"), "{reply}");
    stop(&bed, session);
}

#[test]
fn the_go_server_gets_a_copy_of_mirrored_requests() {
    let bed = Bed::new();
    let go = go_app(&bed);
    let port = bed.app_port.to_string();
    let session = bed.spawn(
        bed.graft_run(&["--mirror"], &[&go, "serve", &port]),
        "graft run --mirror -- goapp serve",
    );
    let url = format!("{}mirrored", bed.target_url(bed.app_port));
    let seen = wait_until(STEAL_TIMEOUT, Duration::from_millis(200), || {
        // The target keeps answering; the copy reaches the Go server.
        let reply = curl_with(&[&url]);
        assert!(!reply.starts_with("local"), "a mirror answered: {reply}");
        session.stdout().contains("got /mirrored").then_some(reply)
    })
    .unwrap_or_else(|| panic!("no mirrored copy\n{}", session.output_report()));
    assert_eq!(seen.trim(), bed.target_reply());
    stop(&bed, session);
}

#[test]
fn the_go_server_serves_only_filter_matched_requests() {
    let bed = Bed::new();
    let go = go_app(&bed);
    let port = bed.app_port.to_string();
    let session = bed.spawn(
        bed.graft_run(
            &["--steal", "--filter-header", "^x-user: alice$"],
            &[&go, "serve", &port],
        ),
        "graft run --steal --filter-header -- goapp serve",
    );
    let url = bed.target_url(bed.app_port);
    let alice = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        Some(curl_with(&["-H", "X-User: alice", &url])).filter(|b| b.starts_with("local go"))
    })
    .unwrap_or_else(|| {
        panic!(
            "alice's request never reached graft\n{}",
            session.output_report()
        )
    });
    assert!(alice.contains("user=alice"), "{alice}");
    let bob = curl_with(&["-H", "X-User: bob", &url]);
    assert_eq!(bob.trim(), bed.target_reply());
    stop(&bed, session);
}

#[test]
fn port_maps_apply_and_a_closed_listener_gives_the_port_back() {
    let bed = Bed::new();
    let go = go_app(&bed);
    let map = format!("{}:{}", bed.map_port, bed.app_port);
    let local = bed.map_port.to_string();
    // The Go server listens on the map's local port for 8 s, then closes.
    let session = bed.spawn(
        bed.graft_run(
            &["--steal", "--port-map", &map],
            &[&go, "serve", &local, "8"],
        ),
        "graft run --steal --port-map -- goapp serve",
    );
    let url = bed.target_url(bed.app_port);
    let reply = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        Some(curl_with(&[&url])).filter(|b| b.starts_with("local go"))
    })
    .unwrap_or_else(|| {
        panic!(
            "the mapped port was never stolen\n{}",
            session.output_report()
        )
    });
    assert!(reply.contains(&format!("port={local} ")), "{reply}");
    // Once the listener is gone, the target serves its port again.
    let back = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        Some(curl_with(&[&url])).filter(|b| b.trim() == bed.target_reply())
    });
    assert!(
        back.is_some(),
        "the port was not released after the listener closed\n{}",
        session.output_report()
    );
    assert!(
        session.stdout().contains("closed"),
        "{}",
        session.output_report()
    );
    stop(&bed, session);
}

#[test]
fn the_layer_path_is_unchanged_for_dynamic_programs() {
    let bed = Bed::new();
    let out = bed.run(
        &[],
        &["curl", "-sS", "--max-time", "10", &bed.service_url()],
    );
    assert_eq!(out.assert_success().out(), bed.service_reply());
    assert!(!out.stderr.contains("isolated"), "{out}");
}

/// Attack: a program in the isolated namespace tries this machine's own
/// listeners. Loopback is the namespace's own, and everything else goes out from
/// the target: a listener on this machine's loopback is out of reach, and one on
/// an address the target can also reach sees the target, not this machine, unless
/// `--outgoing-local` names it.
#[test]
fn an_isolated_program_cannot_reach_this_machines_own_listeners() {
    let bed = Bed::new();
    let (loopback, loopback_hits) = peer_reporter("127.0.0.1:0".parse().unwrap());
    let url = format!("http://{loopback}/");
    let out = bed.run(&["--isolate"], &["curl", "-sS", "--max-time", "5", &url]);
    assert!(!out.success(), "reached this machine's loopback: {out}");
    assert!(loopback_hits.try_recv().is_err());

    let (host, host_hits) = peer_reporter(SocketAddr::new(bed.host_v4.into(), 0));
    let url = format!("http://{host}/");
    let out = bed.run(&["--isolate"], &["curl", "-sS", "--max-time", "5", &url]);
    assert_eq!(
        out.assert_success().out(),
        format!("peer {}", bed.target_v4),
        "the connection must leave from the target"
    );
    assert_eq!(host_hits.recv().unwrap(), bed.target_v4.to_string());

    let rule = format!("{}/32", bed.host_v4);
    let out = bed.run(
        &["--isolate", "--outgoing-local", &rule],
        &["curl", "-sS", "--max-time", "5", &url],
    );
    assert_eq!(
        out.assert_success().out(),
        format!("peer {}", bed.host_v4),
        "--outgoing-local connects from this machine"
    );
}

/// Attack: 20000 malformed and random packets written straight into graft's tun
/// (AF_PACKET, as root in the namespace) and 3000 hostile DNS messages (random
/// bytes, self-referencing compression pointers) to graft's resolver; graft keeps
/// relaying.
#[test]
fn malformed_packets_and_hostile_dns_do_not_stop_graft() {
    let bed = Bed::new();
    let flood = bed.compile("rawflood");
    let service = bed.service_v4.to_string();
    let out = bed.run(
        &["--isolate"],
        &[&flood, "graft0", "198.18.255.254", &service, "7"],
    );
    let lines = out.assert_success().lines();
    assert_eq!(lines.last(), Some(&"alive"), "{out}");
    let flooded: u32 = lines[0]
        .strip_prefix("flooded ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        flooded > 10_000,
        "only {flooded} packets went into the tun\n{out}"
    );
}

/// The graft FUSE mounts in this machine's mount table (none may ever show: the
/// isolated namespace's mounts are its own).
fn host_graft_mounts() -> Vec<String> {
    // proc(5): `... - FSTYPE SOURCE OPTIONS`; graft mounts with source `graft`.
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

#[test]
fn static_programs_read_the_targets_files_at_their_own_paths() {
    let bed = Bed::new();
    let hello = format!("hello from target {}\nsecond line\nthird line\n", bed.n);
    // Only the target has it: the directory is empty on this machine.
    assert!(!std::path::Path::new(&bed.remote("hello.txt")).exists());
    let go = go_app(&bed);
    let out = bed.run(&[], &[&go, "read", &bed.remote("hello.txt")]);
    assert_eq!(out.assert_success().stdout, hello, "{out}");
    let files = musl_reader(&bed);
    let out = bed.run(&[], &[&files, "read", &bed.remote("sub/nested.txt")]);
    assert!(
        out.assert_success()
            .stdout
            .contains(&format!("nested in target {}", bed.n)),
        "{out}"
    );
    // A listing is the target's; an absolute link resolves in the target.
    let out = bed.run(&[], &[&files, "dir", &bed.remote_dir.display().to_string()]);
    let names = out.assert_success().lines();
    assert!(
        names.contains(&"hello.txt") && names.contains(&"sub"),
        "{out}"
    );
    let out = bed.run(&[], &[&go, "read", &bed.remote("hosts-link")]);
    assert!(
        out.assert_success()
            .stdout
            .contains("only-target.graft.test"),
        "{out}"
    );
    // The program's own world stays local: a dynamic program starts, and a write
    // under /tmp lands on this machine.
    let local = bed.work_dir().join("local.txt");
    let script = format!("echo here > {}", local.display());
    bed.run(&["--isolate"], &["sh", "-c", &script])
        .assert_success();
    assert_eq!(std::fs::read_to_string(&local).unwrap(), "here\n");
    // --fs read: the target's files cannot be changed.
    let script = format!("echo x > {}", bed.remote("hello.txt"));
    let out = bed.run(&["--isolate"], &["sh", "-c", &script]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("Read-only file system"), "{out}");
    assert!(host_graft_mounts().is_empty(), "{:?}", host_graft_mounts());
}

#[test]
fn with_fs_write_an_isolated_write_lands_in_the_target() {
    let bed = Bed::new();
    let path = bed.remote("written-isolated.txt");
    let script = format!("printf 'from the namespace' > {path} && cat {path}");
    let out = bed.run(&["--isolate", "--fs", "write"], &["sh", "-c", &script]);
    assert_eq!(out.assert_success().stdout, "from the namespace", "{out}");
    let cat = bed.in_target(&["cat", &path]);
    assert_eq!(cat.assert_success().stdout, "from the namespace");
    assert!(
        !std::path::Path::new(&path).exists(),
        "the write landed locally"
    );
}

#[test]
fn fs_local_keeps_a_path_local_in_the_isolated_namespace() {
    let bed = Bed::new();
    let secret = bed.hostonly_dir.join("secret.txt").display().to_string();
    let go = go_app(&bed);
    // Remote by default: the target's directory is empty.
    let out = bed.run(&[], &[&go, "read", &secret]);
    assert!(!out.success(), "{out}");
    let rule = format!("^{}", bed.hostonly_dir.display());
    let out = bed.run(&["--fs-local", &rule], &[&go, "read", &secret]);
    assert_eq!(out.assert_success().out(), format!("host-secret {}", bed.n));
    // Beside it, the target's files still show.
    let out = bed.run(
        &["--fs-local", &rule],
        &[&go, "read", &bed.remote("hello.txt")],
    );
    assert!(
        out.assert_success().stdout.starts_with("hello from target"),
        "{out}"
    );
    // --fs local: nothing is remote.
    let out = bed.run(&["--fs", "local"], &[&go, "read", &bed.remote("hello.txt")]);
    assert!(!out.success(), "{out}");
}

/// Attack: escape the target's root through the mount (a symlink to this
/// machine's secret, `..` past the root), and read the mount as another local
/// user (with CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE, through `/proc/PID/root`).
#[test]
fn the_isolated_mounts_keep_to_the_target_root_and_to_their_user() {
    let bed = Bed::new();
    let secret = format!("host-secret {}", bed.n);
    let files = musl_reader(&bed);
    let hostonly = bed.hostonly_dir.display().to_string();
    let through_link = bed.remote("secret-link");
    let through_up = format!("{}/up{hostonly}/secret.txt", bed.remote_dir.display());
    let dotdots = format!(
        "{}{}{hostonly}/secret.txt",
        bed.remote_dir.display(),
        "/..".repeat(12)
    );
    for path in [&through_link, &through_up, &dotdots] {
        let out = bed.run(&[], &[&files, "read", path]);
        assert!(
            !out.stdout.contains(&secret),
            "escaped through {path}:\n{out}"
        );
        assert!(!out.success(), "{out}");
    }
    // `up` ends at the target's root: the target's own hosts file.
    let hosts = format!("{}/up/etc/hosts", bed.remote_dir.display());
    let out = bed.run(&[], &[&files, "read", &hosts]);
    assert!(
        out.assert_success()
            .stdout
            .contains("only-target.graft.test"),
        "{out}"
    );

    // Another user, who can look into COMMAND's root, cannot read the mount.
    let session = bed.spawn(
        bed.graft_run(&["--isolate"], &["sh", "-c", "echo pid $$; exec sleep 120"]),
        "graft run --isolate -- sleep",
    );
    let pid = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        session
            .stdout()
            .lines()
            .find_map(|l| l.strip_prefix("pid ").map(str::to_owned))
    })
    .unwrap_or_else(|| panic!("COMMAND never started\n{}", session.output_report()));
    let inside = format!("/proc/{pid}/root{}", bed.remote("hello.txt"));
    let owner = Command::new("cat").arg(&inside).output().unwrap();
    assert!(
        String::from_utf8_lossy(&owner.stdout).starts_with("hello from target"),
        "the mounting user reads it: {owner:?}"
    );
    let other = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=+dac_read_search,+sys_ptrace"])
        .args(["--ambient-caps=+dac_read_search,+sys_ptrace", "--", "cat"])
        .arg(&inside)
        .output()
        .unwrap();
    assert!(
        !other.status.success(),
        "another user read the mount: {other:?}"
    );
    assert!(other.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("Permission denied"),
        "{other:?}"
    );
    assert!(host_graft_mounts().is_empty(), "{:?}", host_graft_mounts());

    // graft killed with SIGKILL: COMMAND and the mounts go with it.
    let sleep: u32 = pid.parse().unwrap();
    session.signal(Signal::SIGKILL);
    let gone = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        (!graft_tests::alive(sleep)).then_some(())
    });
    assert!(gone.is_some(), "COMMAND outlived a killed graft");
    assert!(host_graft_mounts().is_empty(), "{:?}", host_graft_mounts());
    let _ = bed.finish(session, Duration::from_secs(10));
}
