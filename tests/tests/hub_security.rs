//! Issue 10, the incoming hub under attack from inside the target's network
//! namespace, and its hand-over when its owner ends.
//!
//! Each attack runs as a real process: `tests/fixtures/hub_attacker.py`, started
//! in the target's network namespace as `nobody` inside a user namespace of its
//! own (`runuser -u nobody -- unshare -Ur`), so it holds `CAP_NET_ADMIN` — but
//! only over its own user namespace, which is what the earlier check accepted. It
//! speaks the hub's real wire format. Each test shows the attack fail while real
//! graft sessions keep working:
//!
//! - joining: the attacker cannot read the hub key (`EPERM` from nf_tables),
//!   finds the hub's socket but cannot prove the key, so it never lists the
//!   sessions nor steals with `.*`;
//! - squatting: names bound before any agent starts receive nothing, the agents
//!   share their own hub, and the live hub's name cannot be taken;
//! - deliveries and redirects: the attacker names a socket of its own for
//!   deliveries and subscribes a port no session holds; nothing is redirected
//!   and nothing is delivered to it;
//! - hand-over: a download through a second session's unfiltered steal goes on
//!   to its last byte when the hub's owner (the first session's agent) is killed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use graft_tests::{Bed, Outcome, Proc, STEAL_TIMEOUT, fixture, fixture_str, python, wait_until};
use serde_json::Value;

const ALICE: &str = "x-user: alice";
const BOB: &str = "x-user: bob";

/// `named_http.py NAME PORT`.
fn named_http(name: &str, port: u16) -> Vec<String> {
    vec![
        python().to_owned(),
        fixture_str("named_http.py"),
        name.to_owned(),
        port.to_string(),
    ]
}

/// `graft run --target pid:PID FLAGS... -- CMD...` as `USER=user`.
fn start_session(bed: &Bed, flags: &[&str], cmd: &[String], user: &str) -> Proc {
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut command = bed.graft_run(flags, &args);
    command.env_remove("SUDO_USER").env("USER", user);
    bed.spawn(command, &format!("graft run {}", flags.join(" ")))
}

/// Who answers `GET path` with `headers` on the target's `port` (`x-served-by`,
/// empty when the request fails).
fn who_answers(bed: &Bed, port: u16, path: &str, headers: &[&str]) -> String {
    let addr = SocketAddr::from((bed.target_v4, port));
    let attempt = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
        for header in headers {
            head.push_str(header);
            head.push_str("\r\n");
        }
        head.push_str("Connection: close\r\n\r\n");
        stream.write_all(head.as_bytes())?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        Ok(raw
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("x-served-by"))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default())
    };
    attempt().unwrap_or_default()
}

fn wait_routed(bed: &Bed, session: &mut Proc, port: u16, headers: &[&str], server: &str) {
    let routed = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!("the session exited ({status})\n{}", session.output_report());
        }
        (who_answers(bed, port, "/probe", headers) == server).then_some(())
    });
    assert!(
        routed.is_some(),
        "requests with {headers:?} never reached {server}\n{}",
        session.output_report()
    );
}

/// Starts the attacker as `nobody` in a user namespace of its own, in the
/// target's network namespace.
fn attacker(bed: &Bed, args: &[&str]) -> Proc {
    let source = std::fs::read_to_string(fixture("hub_attacker.py")).expect("the attacker");
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &bed.target_ns])
        .args(["runuser", "-u", "nobody", "--", "unshare", "-Ur"])
        .args(["/usr/bin/python3", "-c", &source])
        .args(args);
    bed.spawn(command, &format!("hub_attacker.py {}", args.join(" ")))
}

/// The attacker's JSON report (its last line).
fn report(out: &Outcome) -> Value {
    let line = out
        .lines()
        .into_iter()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("the attacker printed no report\n{out}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad report {line}: {e}"))
}

/// `graft ls --target pid:PID`.
fn graft_ls(bed: &Bed) -> Outcome {
    let target = format!("pid:{}", bed.target_pid);
    let out = bed.finish(
        bed.spawn(bed.graft(&["ls", "--target", &target]), "graft ls"),
        Duration::from_secs(20),
    );
    out.assert_success();
    out
}

/// The user names listed by `graft ls`, with how many subscriptions each.
fn listed_users(out: &Outcome) -> BTreeMap<String, usize> {
    let mut users = BTreeMap::new();
    for word in out.out().split_whitespace() {
        if let Some((user, _)) = word.split_once('@') {
            *users.entry(user.to_owned()).or_insert(0) += 1;
        }
    }
    users
}

/// Alice's and Bob's header-filtered steals of `port` (alice first: her agent
/// owns the hub).
fn two_filtered_sessions(bed: &Bed, port: u16) -> (Proc, Proc) {
    let map = format!("{}:{port}", bed.app_port);
    let mut alice = start_session(
        bed,
        &["--steal", "--filter-header", ALICE, "--port-map", &map],
        &named_http("alice", bed.app_port),
        "graft-alice",
    );
    wait_routed(bed, &mut alice, port, &[ALICE], "alice");
    let mut bob = start_session(
        bed,
        &["--steal", "--filter-header", BOB],
        &named_http("bob", port),
        "graft-bob",
    );
    wait_routed(bed, &mut bob, port, &[BOB], "bob");
    (alice, bob)
}

fn assert_sessions_route(bed: &Bed, port: u16) {
    assert_eq!(who_answers(bed, port, "/after", &[ALICE]), "alice");
    assert_eq!(who_answers(bed, port, "/after", &[BOB]), "bob");
    assert_eq!(who_answers(bed, port, "/after", &[]), "target");
}

#[test]
fn a_user_namespace_in_the_target_netns_cannot_join_list_or_steal_through_the_hub() {
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = bed.serve_in_target(&named_http("target", port));
    let (_alice, _bob) = two_filtered_sessions(&bed, port);

    let out = attacker(&bed, &["join", &port.to_string()]).finish(Duration::from_secs(30));
    let got = report(&out);
    // It really is root with CAP_NET_ADMIN in a user namespace of its own.
    assert_eq!(got["uid_map"][0], "0", "{out}");
    assert_eq!(got["key"], "EPERM", "the attacker read the hub key: {got}");
    assert_eq!(got["legacy"], "ECONNREFUSED", "{got}");
    let joins = got["joins"].as_array().expect("join attempts");
    assert!(
        !joins.is_empty(),
        "the attacker found no hub to attack: {got}"
    );
    for join in joins {
        assert_eq!(join["connect"], "OK", "{got}");
        assert!(
            join["hub_proof_bytes"].as_u64().unwrap_or(0) > 0,
            "the hub did not even answer the challenge: {got}"
        );
        assert_eq!(
            join["accepted"], false,
            "the hub admitted the attacker: {got}"
        );
        assert_eq!(join["listed"], false, "the hub listed its sessions: {got}");
    }

    // Its `.*` steal took nothing: every request goes where it went before.
    assert_sessions_route(&bed, port);
    let users = listed_users(&graft_ls(&bed));
    assert_eq!(
        users.keys().cloned().collect::<Vec<_>>(),
        ["graft-alice", "graft-bob"],
        "{users:?}"
    );
}

#[test]
fn names_squatted_before_any_agent_receive_nothing_and_the_live_hub_cannot_be_taken() {
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = bed.serve_in_target(&named_http("target", port));
    // A directory nobody can look into, for the signal to stop squatting.
    let trigger_dir = tempfile::Builder::new()
        .prefix("graft-hub-squat-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        trigger_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let trigger = trigger_dir.path().join("go");
    let mut squatter = attacker(
        &bed,
        &[
            "squat",
            &trigger.display().to_string(),
            "graft-hub-0.2",
            "graft-hub-0.3",
            "graft-hub-1",
            "graft-hub-1-",
            "graft-hub",
        ],
    );
    squatter.wait_listening("the squatter");

    let (_alice, _bob) = two_filtered_sessions(&bed, port);
    assert_sessions_route(&bed, port);
    std::fs::write(&trigger, b"go").unwrap();
    let out = squatter.finish(Duration::from_secs(30));
    let got = report(&out);
    assert_eq!(
        got["squatted"], 10,
        "the squatter could not bind its names: {got}"
    );
    assert_eq!(
        got["connections"], 0,
        "an agent talked to the squatter: {got}"
    );
    let binds = got["bind_live_hubs"].as_object().expect("bind attempts");
    assert!(!binds.is_empty(), "no live hub seen: {got}");
    for (name, result) in binds {
        assert_eq!(result, "EADDRINUSE", "{name}: {got}");
    }
    let users = listed_users(&graft_ls(&bed));
    assert_eq!(users.len(), 2, "{users:?}");
}

#[test]
fn a_peer_cannot_name_a_delivery_socket_nor_redirect_a_port_no_session_holds() {
    let bed = Bed::new();
    let held = bed.map_port;
    let free = bed.app_port;
    let _target = bed.serve_in_target(&named_http("target", held));
    // The bed's target process serves `free` itself.
    let target_reply = bed.target_reply();
    let mut alice = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE],
        &named_http("alice", held),
        "graft-alice",
    );
    wait_routed(&bed, &mut alice, held, &[ALICE], "alice");

    let trigger_dir = tempfile::Builder::new()
        .prefix("graft-hub-deliver-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        trigger_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let trigger = trigger_dir.path().join("go");
    let mut intruder = attacker(
        &bed,
        &["deliver", &free.to_string(), &trigger.display().to_string()],
    );
    intruder.wait_listening("the intruder");
    // Traffic to the port it asked for, and to the session's port.
    for i in 0..5 {
        assert_eq!(
            graft_tests::curl(&bed.target_url(free)).as_deref(),
            Ok(target_reply.as_str()),
            "request {i} to the port nobody holds"
        );
        assert_eq!(
            who_answers(&bed, held, &format!("/held-{i}"), &[ALICE]),
            "alice"
        );
    }
    std::fs::write(&trigger, b"go").unwrap();
    let out = intruder.finish(Duration::from_secs(30));
    let got = report(&out);
    let joins = got["joins"].as_array().expect("join attempts");
    assert!(!joins.is_empty(), "no hub found: {got}");
    for join in joins {
        assert_eq!(join["accepted"], false, "{got}");
    }
    assert_eq!(
        got["deliveries"], 0,
        "the hub delivered to the intruder: {got}"
    );
    let rules = bed.packet_rules();
    assert!(
        !rules.contains(&format!("--dport {free}")),
        "a rule redirects the port nobody holds:\n{rules}"
    );
}

#[test]
fn a_download_through_another_session_survives_the_hub_owner_being_killed() {
    let bed = Bed::new();
    let alice_port = bed.app_port;
    let bob_port = bed.map_port;
    // alice's agent owns the hub: her session comes first.
    let mut alice = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE],
        &named_http("alice", alice_port),
        "graft-alice",
    );
    wait_routed(&bed, &mut alice, alice_port, &[ALICE], "alice");
    let mut bob = start_session(
        &bed,
        &["--steal"],
        &named_http("bob", bob_port),
        "graft-bob",
    );
    wait_routed(&bed, &mut bob, bob_port, &[], "bob");

    // A 6 s download (60 lines, 100 ms apart) through bob's session.
    let addr = SocketAddr::from((bed.target_v4, bob_port));
    let download = std::thread::spawn(move || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"GET /stream/60 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        stream.read_to_string(&mut body)?;
        Ok(body)
    });
    std::thread::sleep(Duration::from_secs(1));
    let owner = bed.agent_of(alice.pid());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(owner as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        alice.wait_timeout(Duration::from_secs(10)).is_some(),
        "alice's graft still runs after its agent was killed"
    );
    let body = download
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the download broke: {e}\n{}", bob.output_report()));
    for i in [0, 30, 59] {
        assert!(
            body.contains(&format!("bob chunk {i}\n")),
            "the download lost chunk {i}: {body:?}"
        );
    }
    assert!(
        body.contains("\r\n0\r\n\r\n"),
        "the download did not end cleanly: {body:?}"
    );
    // bob's agent took the hub over: new connections still reach bob.
    wait_routed(&bed, &mut bob, bob_port, &[], "bob");
}

#[test]
fn overlapping_filters_the_older_session_wins_and_the_later_one_is_warned() {
    // alice steals every request with an x-user header; bob, later, only his own.
    // A request both match goes to alice (she came first), and bob is told so at
    // start; alice is told nothing.
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = bed.serve_in_target(&named_http("target", port));
    let map = format!("{}:{port}", bed.app_port);
    let mut alice = start_session(
        &bed,
        &[
            "--steal",
            "--filter-header",
            "x-user: .*",
            "--port-map",
            &map,
        ],
        &named_http("alice", bed.app_port),
        "graft-alice",
    );
    wait_routed(&bed, &mut alice, port, &[ALICE], "alice");
    let bob = start_session(
        &bed,
        &["--steal", "--filter-header", BOB],
        &named_http("bob", port),
        "graft-bob",
    );
    let warned = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        bob.stderr().contains("graft: warning: port").then_some(())
    });
    assert!(
        warned.is_some(),
        "bob was not warned\n{}",
        bob.output_report()
    );
    let warning = bob.stderr();
    assert!(
        warning.contains(&format!(
            "port {port} is also stolen with a filter by graft-alice@"
        )) && warning.contains("goes to the session that came first"),
        "{warning}"
    );
    assert!(
        !alice.stderr().contains("warning: port"),
        "{}",
        alice.stderr()
    );
    // Matched by both: alice's; matched by none: the target's.
    assert_eq!(who_answers(&bed, port, "/both", &[BOB]), "alice");
    assert_eq!(who_answers(&bed, port, "/x", &[]), "target");
}
