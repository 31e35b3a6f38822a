//! Issue 13, the stolen connection's hand-over: while one session alone
//! steals a port without a filter on a local target, the agent redirects the
//! port to a listener of its own in the target's network namespace and passes
//! it to the program, which accepts the stolen connections from it itself
//! (crates/agent/src/direct.rs, crates/layer/src/socket/direct.rs).
//!
//! Shown on real Python servers (tests/fixtures/accept_modes.py) that wait in
//! each way programs do: `epoll` (asyncio), `poll` (selectors, as
//! socketserver), a blocking `accept`; each accepts straight from the direct
//! listener, sees the client's real address and the target's port; one that
//! waits in `select` (not hooked) is served by the agent's hand-over. Another
//! session on the port moves the redirect back to the agent's own listener and
//! both sessions are served. A dual-stack IPv6 program takes both families
//! from the direct listener. Turned off (`GRAFT_DIRECT_LISTENER=0`) every
//! connection is handed over. The attacks: a process in the pod that connects
//! to the direct listener's own port is reset and never reaches the program,
//! and after the session nothing of graft listens in the target's namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use graft_tests::logged::{ACCEPTED_DIRECT, accepted_direct, layer_log_path};
use graft_tests::{Bed, Proc, curl, fixture_str, python, wait_until};
use nix::sys::signal::Signal;

/// How long a session may take to steal its port.
const STEAL_WAIT: Duration = Duration::from_secs(30);

/// `graft run --steal [FLAGS] -- accept_modes.py PORT MODE` with debug logs and
/// `env`, once the target's port answers from it; the session and its layer
/// log's path.
fn serve(
    bed: &Bed,
    mode: &str,
    flags: &[&str],
    env: &[(&str, &str)],
) -> (Proc, std::path::PathBuf) {
    let log = layer_log_path(bed);
    let port = bed.app_port.to_string();
    let script = fixture_str("accept_modes.py");
    let mut all = vec!["--steal"];
    all.extend_from_slice(flags);
    let mut command = bed.graft_run(&all, &[python(), &script, &port, mode]);
    command
        .env("GRAFT_LOG", "debug")
        .env("GRAFT_LAYER_LOG", &log);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut session = bed.spawn(
        command,
        &format!("graft run --steal -- accept_modes.py {mode}"),
    );
    let url = bed.target_url(bed.app_port);
    wait_until(STEAL_WAIT, Duration::from_millis(200), || {
        if let Some(status) = session.try_status() {
            panic!("the session exited ({status})\n{}", session.output_report());
        }
        curl(&url)
            .ok()
            .filter(|reply| reply.starts_with("local mode="))
    })
    .unwrap_or_else(|| {
        panic!(
            "{url} never reached accept_modes.py\n{}",
            session.output_report()
        )
    });
    (session, log)
}

/// How many stolen connections the agent handed over (its debug log).
fn handed_over(session: &Proc) -> usize {
    session
        .stderr()
        .matches("stolen connection passed as a descriptor")
        .count()
}

/// Asserts that the program of `mode` accepted most of the `sent` connections
/// made since `before` ([`handed_over`], [`accepted_direct`]) straight from
/// its direct listener, and
/// that the agent handed over the rest. A connection waits for the program at
/// most two of the agent's lazy ticks (40 ms, crates/agent/src/direct.rs)
/// before the agent takes it: on a loaded machine a descheduled program can
/// miss that, and the hand-over that then serves it is the designed
/// fallback, not a failure. A program the direct path does not serve at all
/// gets every connection handed over and fails here.
#[track_caller]
fn assert_mostly_direct(
    session: &Proc,
    before: (usize, usize),
    layer: &str,
    sent: usize,
    mode: &str,
) {
    let direct = accepted_direct(layer) - before.1;
    let handed = handed_over(session) - before.0;
    assert!(
        direct > handed && direct + handed >= sent,
        "{mode}: {direct} of {sent} connections accepted from the direct listener, \
         {handed} handed over:\n{layer}\n{}",
        session.output_report()
    );
}

/// Asserts that the agent handed some stolen connection over.
#[track_caller]
fn assert_handed_over(session: &Proc) {
    assert!(handed_over(session) > 0, "{}", session.output_report());
}

fn layer_log(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The port of the direct listener of `family` ("V4", "V6") the agent
/// started for the session, from its debug log.
fn direct_port(session: &Proc, family: &str) -> u16 {
    let stderr = session.stderr();
    let line = stderr
        .lines()
        .find(|line| {
            line.contains("direct listener ready") && line.contains(&format!("family={family}"))
        })
        .unwrap_or_else(|| {
            panic!(
                "the agent started no {family} direct listener\n{}",
                session.output_report()
            )
        });
    line.rsplit("port=")
        .next()
        .and_then(|p| p.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"))
}

/// The TCP ports listening in the target's network namespace.
fn listening_in_target(bed: &Bed) -> Vec<u16> {
    let out = bed.in_target(&["ss", "-ltnH"]);
    let mut ports: Vec<u16> = out
        .assert_success()
        .out()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .filter_map(|local| local.rsplit(':').next()?.parse().ok())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

#[test]
fn programs_waiting_in_epoll_poll_or_accept_take_stolen_connections_straight_from_the_target() {
    // "fork": a child per connection closes the listener; its parent's epoll
    // set (the same instance) keeps the direct listener.
    for mode in ["epoll", "poll", "blocking", "fork"] {
        let bed = Bed::new();
        let (session, log) = serve(&bed, mode, &[], &[]);
        let url = bed.target_url(bed.app_port);
        // The agent takes every connection until the program waits on the
        // listener: the probes before may have been handed over.
        std::thread::sleep(Duration::from_millis(200));
        let before = (handed_over(&session), accepted_direct(&layer_log(&log)));
        for _ in 0..5 {
            let reply =
                curl(&url).unwrap_or_else(|e| panic!("{mode}: {e}\n{}", session.output_report()));
            // The target's port (getsockname) and the client's real address.
            assert_eq!(
                reply,
                format!(
                    "local mode={mode} port={} peer={}",
                    bed.app_port, bed.host_v4
                ),
                "{mode}\n{}",
                session.output_report()
            );
        }
        let layer = layer_log(&log);
        assert_mostly_direct(&session, before, &layer, 5, mode);
        assert!(
            layer.contains("the program waits on its direct listener"),
            "{mode}: the layer did not see the program wait:\n{layer}"
        );
    }
}

#[test]
fn an_ipv6_program_takes_both_families_straight_from_the_target() {
    // A dual-stack listener (`[::]`, IPV6_V6ONLY off), as IPv6 servers bind:
    // the port's IPv6 connections come from the direct listener's IPv6
    // socket, its IPv4 ones from the IPv4 socket, shown IPv4-mapped as the
    // program's own listener would show them.
    for mode in ["epoll", "blocking"] {
        let bed = Bed::new();
        let (session, log) = serve(&bed, mode, &[], &[("ACCEPT_MODES_FAMILY", "6")]);
        std::thread::sleep(Duration::from_millis(200));
        let before = (handed_over(&session), accepted_direct(&layer_log(&log)));
        let expected = [
            (bed.target_url6(bed.app_port), bed.host_v6.to_string()),
            (
                bed.target_url(bed.app_port),
                format!("::ffff:{}", bed.host_v4),
            ),
        ];
        for _ in 0..3 {
            for (url, peer) in &expected {
                let reply = curl(url)
                    .unwrap_or_else(|e| panic!("{mode} {url}: {e}\n{}", session.output_report()));
                assert_eq!(
                    reply,
                    format!("local mode={mode} port={} peer={peer}", bed.app_port),
                    "{mode} {url}\n{}",
                    session.output_report()
                );
            }
        }
        let layer = layer_log(&log);
        for peer in [format!("[{}]", bed.host_v6), bed.host_v4.to_string()] {
            assert!(
                layer.lines().any(
                    |line| line.contains(&format!("stolen connection from {peer}:"))
                        && line.contains(ACCEPTED_DIRECT)
                ),
                "{mode}: no connection from {peer} was accepted from the direct listener:\n{layer}\n{}",
                session.output_report()
            );
        }
        assert_mostly_direct(&session, before, &layer, 6, mode);
    }
}

#[test]
fn a_program_waiting_in_select_is_served_by_the_hand_over() {
    let bed = Bed::new();
    let (session, log) = serve(&bed, "select", &[], &[]);
    let url = bed.target_url(bed.app_port);
    for _ in 0..5 {
        let reply = curl(&url).unwrap_or_else(|e| panic!("{e}\n{}", session.output_report()));
        assert_eq!(
            reply,
            format!(
                "local mode=select port={} peer={}",
                bed.app_port, bed.host_v4
            )
        );
    }
    // `select` is not hooked: the agent, never told that the program waits on
    // the direct listener, takes every connection and hands it over.
    let layer = layer_log(&log);
    assert!(
        !layer.contains("the program waits on its direct listener"),
        "{layer}"
    );
    assert_handed_over(&session);
}

#[test]
fn with_direct_listeners_off_every_connection_is_handed_over() {
    let bed = Bed::new();
    let (session, log) = serve(&bed, "epoll", &[], &[("GRAFT_DIRECT_LISTENER", "0")]);
    let url = bed.target_url(bed.app_port);
    for _ in 0..3 {
        assert!(curl(&url).unwrap().starts_with("local mode=epoll"));
    }
    let layer = layer_log(&log);
    assert!(!layer.contains("direct listener"), "{layer}");
    assert_handed_over(&session);
}

#[test]
fn a_pod_process_that_connects_to_the_direct_listener_is_reset_and_never_reaches_the_program() {
    let bed = Bed::new();
    let (session, log) = serve(&bed, "epoll", &[], &[]);
    let v4 = direct_port(&session, "V4");
    let v6 = direct_port(&session, "V6");
    // From inside the target's namespace, on the pod's addresses and on
    // loopback: the listeners' own ports, not the redirect of the stolen one.
    let addrs: [SocketAddr; 4] = [
        (bed.target_v4, v4).into(),
        (std::net::Ipv4Addr::LOCALHOST, v4).into(),
        (bed.target_v6, v6).into(),
        (std::net::Ipv6Addr::LOCALHOST, v6).into(),
    ];
    for addr in addrs {
        let reply = bed.in_target_netns(move || -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            Ok(reply)
        });
        assert!(
            !reply.as_deref().unwrap_or("").contains("local mode="),
            "a connection to {addr} reached the program: {reply:?}"
        );
    }
    let layer = layer_log(&log);
    assert!(
        layer.contains("did not come through its redirect"),
        "the layer did not refuse the connections:\n{layer}"
    );
    // The stolen port still works.
    assert!(
        curl(&bed.target_url(bed.app_port))
            .unwrap()
            .starts_with("local mode=epoll")
    );
}

#[test]
fn another_session_on_the_port_moves_the_redirect_back_and_both_are_served() {
    // nf_tables rewrites the redirect in one transaction; iptables adds the
    // new rule before it deletes the old one.
    for backend in ["nftables", "iptables"] {
        moves_back_with(backend);
    }
}

/// [`another_session_on_the_port_moves_the_redirect_back_and_both_are_served`]
/// with the agent's packet rules of `backend` (graft-agent's `--packet-rules`).
/// Both families: the first session's program listens dual-stack, so the
/// IPv6 redirect moves too.
fn moves_back_with(backend: &str) {
    let bed = Bed::new();
    let rules = [("GRAFT_AGENT_PACKET_RULES", backend)];
    let dual_stack = [rules[0], ("ACCEPT_MODES_FAMILY", "6")];
    let (first, _log) = serve(&bed, "epoll", &[], &dual_stack);
    let url = bed.target_url(bed.app_port);
    let url6 = bed.target_url6(bed.app_port);
    // What the first session's program answers to each family.
    let answers = [
        (
            url.clone(),
            format!(
                "local mode=epoll port={} peer=::ffff:{}",
                bed.app_port, bed.host_v4
            ),
        ),
        (
            url6.clone(),
            format!(
                "local mode=epoll port={} peer={}",
                bed.app_port, bed.host_v6
            ),
        ),
    ];
    // A second session mirrors the port: its copies need the agent on the
    // path, so the redirect goes back to the agent's own listener.
    let port = bed.app_port.to_string();
    // named_http.py imports `h2` only for an h2c connection.
    let script = fixture_str("named_http.py");
    let args = [python(), script.as_str(), "mirror", port.as_str()];
    let mut command = bed.graft_run(&["--mirror"], &args);
    command.envs(rules);
    let mut second = bed.spawn(command, "graft run --mirror -- named_http.py");
    let mut i = 0;
    wait_until(STEAL_WAIT, Duration::from_millis(200), || {
        if let Some(status) = second.try_status() {
            panic!(
                "the mirror session exited ({status})\n{}",
                second.output_report()
            );
        }
        i += 1;
        let _ = curl(&format!("{url}probe-{i}"));
        std::thread::sleep(Duration::from_millis(100));
        second.stdout().contains("/probe-").then_some(())
    })
    .unwrap_or_else(|| panic!("the mirror never got a copy\n{}", second.output_report()));
    for n in 0..5 {
        for (family, (url, answer)) in answers.iter().enumerate() {
            assert_eq!(
                curl(&format!("{url}after-{family}-{n}")).unwrap(),
                *answer,
                "{}",
                first.output_report()
            );
        }
    }
    let copied = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let out = second.stdout();
        (0..5)
            .all(|n| (0..2).all(|family| out.contains(&format!("/after-{family}-{n} "))))
            .then_some(())
    });
    assert!(
        copied.is_some(),
        "the mirror did not get a copy of every request:\n{}",
        second.output_report()
    );
    // When the mirror leaves, the first session keeps the port.
    second.signal(Signal::SIGTERM);
    assert!(second.wait_timeout(Duration::from_secs(10)).is_some());
    for _ in 0..3 {
        for (url, answer) in &answers {
            assert_eq!(curl(url).unwrap(), *answer, "{}", first.output_report());
        }
    }
}

#[test]
fn after_the_session_nothing_of_graft_listens_in_the_target_namespace() {
    let bed = Bed::new();
    let before = listening_in_target(&bed);
    let (mut session, _log) = serve(&bed, "epoll", &[], &[]);
    for family in ["V4", "V6"] {
        let port = direct_port(&session, family);
        assert!(
            listening_in_target(&bed).contains(&port),
            "the {family} direct listener is not in the target's namespace"
        );
    }
    session.signal(Signal::SIGTERM);
    assert!(
        session.wait_timeout(Duration::from_secs(10)).is_some(),
        "graft did not exit\n{}",
        session.output_report()
    );
    let after = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        Some(listening_in_target(&bed)).filter(|now| *now == before)
    });
    assert!(
        after.is_some(),
        "listening in the target before the session: {before:?}, after: {:?}",
        listening_in_target(&bed)
    );
}
