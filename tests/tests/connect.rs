//! Issue 11 point 3, machine scope, against a `pid:` target: after `graft connect
//! --target pid:PID` plain programs of this machine (curl, getent: no process
//! under graft) reach the target's networks and resolve its names, `graft status`
//! tells, and `graft quit` (or the next start after a `kill -9`) restores
//! `/etc/resolv.conf` byte for byte and removes the tun and its routes. Also the
//! attacks: another user at the control socket, hostile DNS messages.
//!
//! These tests change this machine (a tun, routes, `/etc/resolv.conf`): each holds
//! [`Connected`], which runs them one at a time and restores the machine.

use std::process::Command;
use std::time::Duration;

use graft_tests::machine::{Connected, RESOLV_CONF};
use graft_tests::{Bed, Outcome, alive, curl, wait_until};

/// A bed whose service range 198.19.N.0/24 stays clear of the lab cluster's
/// 198.19.128.0/17 (this machine routes those itself, so graft would not).
fn bed() -> Bed {
    Bed::new_in_slot(|n| n < 128)
}

fn run(bed: &Bed, args: &[&str]) -> Outcome {
    let what = format!("graft {}", args.join(" "));
    bed.finish(bed.spawn(bed.graft(args), &what), Duration::from_secs(60))
}

fn connect(bed: &Bed) -> Outcome {
    let target = format!("pid:{}", bed.target_pid);
    let out = run(bed, &["connect", "--target", &target]);
    out.assert_success();
    out
}

fn status(bed: &Bed) -> serde_json::Value {
    let out = run(bed, &["status", "-o", "json"]);
    serde_json::from_str(out.assert_success().out())
        .unwrap_or_else(|e| panic!("graft status -o json is not JSON ({e}): {out}"))
}

fn getent(name: &str) -> String {
    let out = Command::new("getent")
        .args(["hosts", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn routes() -> String {
    let v4 = Command::new("ip").args(["route"]).output().unwrap();
    let v6 = Command::new("ip").args(["-6", "route"]).output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&v4.stdout),
        String::from_utf8_lossy(&v6.stdout)
    )
}

fn assert_restored(machine: &Connected) {
    assert_eq!(
        std::fs::read(RESOLV_CONF).unwrap(),
        machine.original_resolv,
        "/etc/resolv.conf is back byte for byte"
    );
    assert!(!Connected::tun_exists(), "the tun is gone");
    assert!(
        !routes().contains("graft-connect"),
        "no route is left:\n{}",
        routes()
    );
}

#[test]
fn connect_reaches_the_targets_network_and_names_and_quit_restores_everything() {
    let bed = bed();
    let machine = Connected::lock();
    assert!(
        curl(&bed.service_url()).is_err(),
        "before connecting the service is unreachable from this machine"
    );
    let out = connect(&bed);
    let range = format!("198.19.{}.0/24", bed.n);
    assert!(
        out.out().contains(&range),
        "graft connect says what it routes: {out}"
    );

    // Plain curl, outside any graft process, by address and by a name that only
    // the target's resolver (its dnsmasq) knows, and a name of its hosts file.
    assert_eq!(curl(&bed.service_url()).unwrap(), bed.service_reply());
    let by_name = curl("http://svc.graft.test/").unwrap();
    assert!(
        by_name == bed.service_reply() || by_name == format!("svc {}", bed.link_v6),
        "a name only the target resolves: {by_name}"
    );
    assert_eq!(
        curl(&bed.service_url6()).unwrap(),
        format!("svc {}", bed.link_v6)
    );
    let resolved = getent("svc.graft.test");
    assert!(
        resolved.starts_with(&bed.service_v4.to_string())
            || resolved.starts_with(&bed.service_v6.to_string()),
        "getent hosts svc.graft.test: {resolved:?}"
    );
    assert!(
        getent("only-target.graft.test").contains(&bed.service_v4.to_string()),
        "a name of the target's hosts file"
    );
    // The target's search domain: a short name (IPv4 forced: the name has both).
    let short = Command::new("curl")
        .args([
            "-4",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "5",
            "http://svc/",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&short.stdout).trim(),
        bed.service_reply()
    );
    // Other names still resolve with the machine's own resolver.
    assert!(!getent("localhost").is_empty());

    let shown = status(&bed);
    assert_eq!(shown["connected"], true, "{shown}");
    assert_eq!(shown["target"], format!("pid:{}", bed.target_pid));
    assert_eq!(shown["dns_mode"], "resolv-conf");
    let ranges: Vec<&str> = shown["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(ranges.contains(&range.as_str()), "{shown}");
    assert!(
        !ranges.contains(&format!("198.18.{}.0/24", bed.n).as_str()),
        "the link this machine shares with the target is its own: not routed ({shown})"
    );
    assert!(
        std::fs::read_to_string(RESOLV_CONF)
            .unwrap()
            .contains("169.254.53.53")
    );

    run(&bed, &["quit"]).assert_success();
    assert_restored(&machine);
    assert!(curl(&bed.service_url()).is_err(), "disconnected");
    let after = status(&bed);
    assert_eq!(after["connected"], false, "{after}");
}

#[test]
fn a_killed_connection_is_repaired_by_quit_and_by_the_next_connect() {
    let bed = bed();
    let machine = Connected::lock();
    connect(&bed);
    let pid = status(&bed)["pid"].as_u64().unwrap() as u32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            (!alive(pid)).then_some(())
        })
        .is_some()
    );
    assert_ne!(
        std::fs::read(RESOLV_CONF).unwrap(),
        machine.original_resolv,
        "kill -9 left graft's resolv.conf"
    );
    let out = run(&bed, &["quit"]);
    assert!(out.assert_success().stderr.contains("repaired"), "{out}");
    assert_restored(&machine);

    // Again, and this time the next `graft connect` repairs and connects.
    connect(&bed);
    let pid = status(&bed)["pid"].as_u64().unwrap() as u32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        (!alive(pid)).then_some(())
    });
    let out = connect(&bed);
    assert!(out.stderr.contains("repaired"), "{out}");
    assert_eq!(curl(&bed.service_url()).unwrap(), bed.service_reply());
    run(&bed, &["quit"]).assert_success();
    assert_restored(&machine);
}

/// Runs a Python snippet as `nobody`.
fn as_nobody(script: &str) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .output()
        .unwrap()
}

#[test]
fn another_user_cannot_control_the_connection_and_hostile_dns_does_not_kill_it() {
    let bed = bed();
    let _machine = Connected::lock();
    // `[connect] also_proxy` of graft.toml adds a range (a documentation address).
    let config = bed.work_dir().join("graft.toml");
    std::fs::write(&config, "[connect]\nalso_proxy = [\"198.51.100.7/32\"]\n").unwrap();
    let target = format!("pid:{}", bed.target_pid);
    run(
        &bed,
        &[
            "connect",
            "--target",
            &target,
            "--config",
            config.to_str().unwrap(),
        ],
    )
    .assert_success();
    let shown = status(&bed);
    assert!(
        shown["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "198.51.100.7/32"),
        "{shown}"
    );
    let pid = shown["pid"].as_u64().unwrap() as u32;

    // Attack 1: another local user talks to the control socket to quit it.
    let attack = as_nobody(
        "import socket\n\
         s = socket.socket(socket.AF_UNIX)\n\
         try:\n\
         \x20   s.connect('/run/graft/connect/control.sock')\n\
         \x20   s.sendall(b'{\"op\":\"quit\"}\\n')\n\
         \x20   print('connected', s.recv(1000))\n\
         except OSError as e:\n\
         \x20   print('refused', e.errno)\n",
    );
    let said = String::from_utf8_lossy(&attack.stdout);
    assert!(
        said.starts_with("refused 13"),
        "{said} {}",
        String::from_utf8_lossy(&attack.stderr)
    );
    // And through graft itself.
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(graft_tests::graft_bin())
        .arg("quit")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("root"));
    assert!(alive(pid), "the connection survives the other user");

    // Attack 2: malformed DNS messages, a huge name, a flood, a response sent to
    // the server, a TCP message that promises more than it sends.
    let hostile = "import socket, os\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for m in [b'', b'\\x00', os.urandom(11), os.urandom(12), os.urandom(600), \
                   b'\\xab\\xcd\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00' + (b'\\x3f' + b'a'*63) * 40 + b'\\x00\\x00\\x01\\x00\\x01', \
                   b'\\xab\\xcd\\x81\\x80' + bytes(8), os.urandom(65000)]:\n\
         \x20   u.sendto(m, ('169.254.53.53', 53))\n\
         for i in range(3000):\n\
         \x20   u.sendto(os.urandom(40), ('169.254.53.53', 53))\n\
         t = socket.create_connection(('169.254.53.53', 53))\n\
         t.sendall(b'\\xff\\xff' + os.urandom(100))\n\
         t.close()\n\
         print('sent')\n";
    let out = as_nobody(hostile);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sent"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(alive(pid), "the daemon survives hostile DNS");
    let resolved = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        let r = getent("svc.graft.test");
        (!r.is_empty()).then_some(r)
    });
    assert!(resolved.is_some(), "names still resolve after the attack");
    let by_name = curl("http://svc.graft.test/").unwrap();
    assert!(by_name.starts_with("svc "), "{by_name}");
    run(&bed, &["quit"]).assert_success();
}

#[test]
fn dns_local_keeps_a_name_with_this_machines_resolver_while_connected() {
    let bed = bed();
    let machine = Connected::lock();
    let target = format!("pid:{}", bed.target_pid);
    run(
        &bed,
        &[
            "connect",
            "--target",
            &target,
            "--dns-local",
            "svc.graft.test",
        ],
    )
    .assert_success();
    // The target's resolver knows svc.graft.test, this machine's does not: with
    // the rule, the machine's answer (none) is the one programs get.
    assert_eq!(getent("svc.graft.test"), "", "--dns-local was not applied");
    // Every other name of the target still resolves there.
    assert!(
        getent("only-target.graft.test").contains(&bed.service_v4.to_string()),
        "a name of the target's hosts file"
    );
    run(&bed, &["quit"]).assert_success();
    assert_restored(&machine);
}
