//! Issue 10: connections the agent passes through to the target's own server
//! (requests no filter matches, connections that are not HTTP) reach it from the
//! client's real address, as they would without graft, so the server's logs,
//! IP allow-lists and rate limits see the real client. The target's server here
//! prints the peer address it sees, over IPv4 and IPv6.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use graft_tests::{Bed, STEAL_TIMEOUT, curl, fixture_str, python, wait_until};

/// A server for the target: answers every connection with `peer ADDRESS` (the
/// client address `accept` gave, IPv4-mapped addresses unmapped), over HTTP when
/// the connection starts with `GET`, as a bare line otherwise.
const PEER_SERVER: &str = r#"
import socket, sys, threading
def handle(c, a):
    ip = a[0][7:] if a[0].startswith('::ffff:') else a[0]
    data = b''
    try:
        while b'\n' not in data:
            d = c.recv(4096)
            if not d:
                break
            data += d
        if data.startswith(b'GET'):
            while b'\r\n\r\n' not in data:
                d = c.recv(4096)
                if not d:
                    break
                data += d
            body = ('peer %s\n' % ip).encode()
            c.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n'
                      % len(body) + body)
        else:
            c.sendall(('peer %s\n' % ip).encode())
    finally:
        c.close()
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('::', int(sys.argv[1])))
s.listen(64)
print('listening', flush=True)
while True:
    c, a = s.accept()
    threading.Thread(target=handle, args=(c, a), daemon=True).start()
"#;

/// The first line a bare (non-HTTP) connection to `addr` gets.
fn bare_line(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"PEER?\n").unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line.trim().to_owned()
}

#[test]
fn passed_through_connections_reach_the_target_from_the_client_address() {
    let bed = Bed::new();
    let port = bed.map_port;
    let mut server = Command::new("nsenter");
    server
        .args(["-t", &bed.target_pid.to_string(), "-n", "--"])
        .args([python(), "-c", PEER_SERVER, &port.to_string()]);
    let server = bed.spawn(server, "peer server");
    wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        server.stdout().contains("listening").then_some(())
    })
    .unwrap_or_else(|| panic!("the peer server did not start\n{}", server.output_report()));
    let url = bed.target_url(port);
    let url6 = bed.target_url6(port);
    let addr = SocketAddr::from((bed.target_v4, port));
    let addr6 = SocketAddr::from((bed.target_v6, port));

    // Without graft: what the target sees of this client.
    let real = curl(&url).unwrap();
    assert!(real.starts_with("peer "), "{real}");
    assert!(
        !real.contains(&bed.target_v4.to_string()),
        "the client is the target itself? {real}"
    );
    let real6 = curl(&url6).unwrap();
    assert!(real6.starts_with("peer ") && real6.contains(':'), "{real6}");

    // A filtered steal that takes only requests with `x-graft: yes`.
    let app = fixture_str("http_app.py");
    let command = bed.graft_run(
        &["--steal", "--filter-header", "x-graft: yes"],
        &[python(), &app, &port.to_string()],
    );
    let mut session = bed.spawn(command, "graft run --steal --filter-header");
    let marked = || {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "-H", "x-graft: yes", &url])
            .output()
            .ok()?;
        String::from_utf8(out.stdout).ok()
    };
    wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!("graft exited ({status})\n{}", session.output_report());
        }
        marked().filter(|r| r.starts_with("local"))
    })
    .unwrap_or_else(|| panic!("the filter never took effect\n{}", session.output_report()));
    // A request the filter takes reaches the program from the client too (on a
    // local target, over the loopback pair the agent passes).
    let client = real
        .trim()
        .strip_prefix("peer ")
        .unwrap_or(&real)
        .to_owned();
    let local = marked().unwrap_or_default();
    assert!(
        local.contains(&format!(" peer={client} ")),
        "the program saw {local:?}, not the client {client}\n{}",
        session.output_report()
    );

    // A request no filter matches goes on to the target: from the client.
    let passed = curl(&url).unwrap();
    assert_eq!(
        passed,
        real,
        "the request passed through came from another address\n{}",
        session.output_report()
    );
    // So does a connection that is not HTTP (passed through whole).
    assert_eq!(bare_line(addr), real.trim(), "{}", session.output_report());
    // And both over IPv6.
    assert_eq!(curl(&url6).unwrap(), real6, "{}", session.output_report());
    assert_eq!(
        bare_line(addr6),
        real6.trim(),
        "{}",
        session.output_report()
    );

    // The agent (not its watchdog) is killed outright: the watchdog removes the routing rule,
    // the table and the mangle chain it added.
    let graft = session.pid();
    let agent = bed.agent_of(graft);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let gone = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let rules: String = ["-4", "-6"]
            .iter()
            .map(|family| {
                let out = Command::new("ip")
                    .args(["netns", "exec", &bed.target_ns, "ip", family, "rule"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .collect();
        (!rules.contains("fwmark") && !bed.has_graft_rules()).then_some(())
    });
    assert!(
        gone.is_some(),
        "rules left after the agent was killed:\n{}",
        bed.packet_rules()
    );
    drop(session);
}

/// The `ip rule` lines of both families in the target's namespace.
fn policy_rules(bed: &Bed) -> String {
    ["-4", "-6"]
        .iter()
        .map(|family| {
            let out = Command::new("ip")
                .args(["netns", "exec", &bed.target_ns, "ip", family, "rule"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
}

/// The `GRAFT-` chains of the target's mangle table (both families).
fn mangle_chains(bed: &Bed) -> Vec<String> {
    ["iptables-save", "ip6tables-save"]
        .iter()
        .flat_map(|save| {
            let out = Command::new("ip")
                .args(["netns", "exec", &bed.target_ns, save, "-t", "mangle"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix(":GRAFT-"))
                .filter_map(|l| l.split_whitespace().next())
                .map(|hex| format!("GRAFT-{hex}"))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn a_new_agent_removes_the_client_address_rules_of_an_agent_killed_with_its_watchdog() {
    let bed = Bed::new();
    let port = bed.map_port;
    let mut server = Command::new("nsenter");
    server
        .args(["-t", &bed.target_pid.to_string(), "-n", "--"])
        .args([python(), "-c", PEER_SERVER, &port.to_string()]);
    let server = bed.spawn(server, "peer server");
    wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        server.stdout().contains("listening").then_some(())
    })
    .unwrap_or_else(|| panic!("the peer server did not start\n{}", server.output_report()));
    let url = bed.target_url(port);
    let real = curl(&url).unwrap();

    let app = fixture_str("http_app.py");
    let command = bed.graft_run(
        &["--steal", "--filter-header", "x-graft: yes"],
        &[python(), &app, &port.to_string()],
    );
    let mut session = bed.spawn(command, "graft run --steal --filter-header");
    wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!("graft exited ({status})\n{}", session.output_report());
        }
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "-H", "x-graft: yes", &url])
            .output()
            .ok()?;
        String::from_utf8(out.stdout)
            .ok()
            .filter(|r| r.starts_with("local"))
    })
    .unwrap_or_else(|| panic!("the filter never took effect\n{}", session.output_report()));
    // A passed-through request sets the client-address rules up.
    assert_eq!(curl(&url).unwrap(), real, "{}", session.output_report());
    let chains = mangle_chains(&bed);
    assert!(
        policy_rules(&bed).contains("fwmark") && !chains.is_empty(),
        "no client-address rules were set up:\n{}\n{}",
        policy_rules(&bed),
        bed.packet_rules()
    );

    // What an OOM kill of the whole container does: the agent and its watchdog
    // die at once and nobody cleans up.
    for pid in bed.agent_pids() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    session.signal(nix::sys::signal::Signal::SIGKILL);
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        bed.agent_pids().is_empty().then_some(())
    })
    .unwrap_or_else(|| panic!("agents left: {:?}", bed.agent_pids()));
    assert!(
        policy_rules(&bed).contains("fwmark"),
        "the killed agent's policy rule vanished by itself?"
    );

    // The next agent on the target sweeps the dead agent's rules at start.
    let next = bed.spawn(
        bed.graft_run(&["--steal"], &["sleep", "30"]),
        "graft run --steal -- sleep 30",
    );
    let swept = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        let now = mangle_chains(&bed);
        (!policy_rules(&bed).contains("fwmark") && chains.iter().all(|c| !now.contains(c)))
            .then_some(())
    });
    assert!(
        swept.is_some(),
        "the dead agent's client-address rules remain:\n{}\n{}\n{}",
        policy_rules(&bed),
        bed.packet_rules(),
        next.output_report()
    );
    drop(next);
}
