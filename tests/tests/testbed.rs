//! The test bed on its own, without graft: every fact the graft tests rely on
//! (reachability, isolation of the service, the target's own names and files, and
//! cleanup) holds before graft is involved.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use graft_tests::{Bed, alive, curl, http_get};

#[test]
fn bed_target_serves_http_over_ipv4_and_ipv6() {
    let bed = Bed::new();
    for url in [
        bed.target_url(80),
        bed.target_url6(80),
        bed.target_url(bed.app_port),
        bed.target_url6(bed.app_port),
    ] {
        assert_eq!(
            curl(&url).as_deref(),
            Ok(bed.target_reply().as_str()),
            "{url}"
        );
    }
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", bed.target_pid)).unwrap();
    assert!(cmdline.contains("target_server.py"), "{cmdline:?}");
}

#[test]
fn bed_service_is_unreachable_from_host_but_reachable_from_target() {
    let bed = Bed::new();
    let service = SocketAddr::from((bed.service_v4, 80));
    let from_host = TcpStream::connect_timeout(&service, Duration::from_secs(2));
    assert!(
        from_host.is_err(),
        "the host reached the service: {from_host:?}"
    );
    let service6 = SocketAddr::from((bed.service_v6, 80));
    let from_host6 = TcpStream::connect_timeout(&service6, Duration::from_secs(2));
    assert!(
        from_host6.is_err(),
        "the host reached the service: {from_host6:?}"
    );

    assert_eq!(
        bed.get_from_target(service, "/").unwrap(),
        bed.service_reply()
    );
    assert_eq!(
        bed.get_from_target(service6, "/").unwrap(),
        format!("svc {}", bed.link_v6)
    );
    let out = bed.in_target(&["curl", "-sS", "--max-time", "3", &bed.service_url()]);
    assert_eq!(out.assert_success().out(), bed.service_reply());
}

#[test]
fn bed_target_has_its_own_hosts_resolver_and_files() {
    let bed = Bed::new();
    let service = bed.service_v4.to_string();
    let hosts = bed.in_target(&["getent", "hosts", "only-target.graft.test"]);
    assert!(
        hosts.assert_success().out().starts_with(&service),
        "{hosts}"
    );
    let dns = bed.in_target(&["getent", "ahostsv4", "svc.graft.test"]);
    assert!(dns.assert_success().out().starts_with(&service), "{dns}");
    let search = bed.in_target(&["getent", "ahostsv4", "svc"]);
    assert!(
        search.assert_success().out().starts_with(&service),
        "{search}"
    );
    // Not while a machine-scope test has this machine resolve the target's names.
    let _machine = graft_tests::machine::Connected::lock();
    let on_host = std::process::Command::new("getent")
        .args(["hosts", "only-target.graft.test"])
        .output()
        .unwrap();
    assert!(
        !on_host.status.success(),
        "the host resolves a target-only name"
    );

    let hello = bed.remote("hello.txt");
    let cat = bed.in_target(&["cat", &hello]);
    assert!(
        cat.assert_success()
            .out()
            .starts_with(&format!("hello from target {}", bed.n))
    );
    assert!(!Path::new(&hello).exists(), "{hello} exists on the host");
    let secret = bed.hostonly_dir.join("secret.txt").display().to_string();
    assert!(Path::new(&secret).exists());
    assert!(
        !bed.in_target(&["cat", &secret]).success(),
        "the target sees the host secret"
    );
    let hosts_link = bed.in_target(&["cat", &bed.remote("hosts-link")]);
    assert!(
        hosts_link
            .assert_success()
            .out()
            .contains("only-target.graft.test")
    );
    let tmp = bed
        .tmp_remote_dir
        .join("tmp-remote.txt")
        .display()
        .to_string();
    assert!(bed.in_target(&["cat", &tmp]).success());
    assert!(!Path::new(&tmp).exists());
}

#[test]
fn bed_target_counts_requests_per_port() {
    let bed = Bed::new();
    let before = bed.target_counts()[&bed.app_port];
    curl(&bed.target_url(bed.app_port)).unwrap();
    curl(&bed.target_url(bed.app_port)).unwrap();
    assert_eq!(bed.target_counts()[&bed.app_port], before + 2);
}

#[test]
fn bed_removes_namespaces_processes_and_files_when_dropped() {
    let bed = Bed::new();
    let (n, target_pid) = (bed.n, bed.target_pid);
    let namespaces = [bed.target_ns.clone(), bed.service_ns.clone()];
    let dir = bed.dir.clone();
    drop(bed);
    assert_gone(n, target_pid, &namespaces, &dir);
}

#[test]
fn bed_removes_everything_when_the_test_panics() {
    let seen = std::panic::catch_unwind(|| {
        let bed = Bed::new();
        let facts = (
            bed.n,
            bed.target_pid,
            [bed.target_ns.clone(), bed.service_ns.clone()],
            bed.dir.clone(),
        );
        std::panic::panic_any(facts);
    })
    .expect_err("the closure panics");
    let (n, target_pid, namespaces, dir) = *seen
        .downcast::<(u8, u32, [String; 2], std::path::PathBuf)>()
        .expect("the panic carries the bed's facts");
    assert_gone(n, target_pid, &namespaces, &dir);
}

#[test]
fn bed_host_has_no_route_into_the_benchmarking_ranges_except_its_links() {
    let bed = Bed::new();
    let stray = SocketAddr::from(([198, 19, 250, 250], 80));
    let err = TcpStream::connect_timeout(&stray, Duration::from_secs(2)).unwrap_err();
    assert!(
        err.raw_os_error() == Some(libc::EHOSTUNREACH)
            || err.raw_os_error() == Some(libc::ENETUNREACH),
        "{err}"
    );
    let target = SocketAddr::from((bed.target_v4, 80));
    assert_eq!(
        http_get(target, "/", Duration::from_secs(3)).unwrap(),
        bed.target_reply()
    );
}

fn assert_gone(n: u8, target_pid: u32, namespaces: &[String], dir: &Path) {
    assert!(
        !alive(target_pid),
        "the target server {target_pid} survived"
    );
    for ns in namespaces {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "netns {ns} survived"
        );
    }
    assert!(
        !Path::new("/sys/class/net").join(format!("gt{n}h")).exists(),
        "veth gt{n}h survived"
    );
    assert!(!dir.exists(), "{} survived", dir.display());
}
