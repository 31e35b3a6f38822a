//! Incoming traffic beyond the plain steal: `--mirror` (the target keeps serving,
//! CMD gets a copy), HTTP-filtered steal and mirror (`--filter-header`,
//! `--filter-path`, `--filter-method`, all-of) over HTTP/1.1, h2c, gRPC and
//! WebSocket, non-HTTP traffic on a filtered port, several sessions on one target
//! (`graft ls`, refusal of a second unfiltered steal), and the release of a port
//! when its session ends.
//!
//! The target process of the bed is `target_server.py` (HTTP/1.0); these tests
//! need servers that speak other protocols, so each test starts its own real
//! server in the target's network namespace (`ip netns exec gt{N}t`) on
//! [`Bed::map_port`], which graft's rules (set per namespace) apply to like to the
//! target's own ports. CMD listens on the host on `map_port` too, or on
//! [`Bed::app_port`] with `--port-map APP_PORT:MAP_PORT` when a second session of
//! the same test needs its own local port. Every server names itself in its
//! answers (`x-served-by` and the body), and the HTTP servers print each request
//! they read, so a test sees who answered and who received what.
//!
//! Fixtures that need `grpc`, `websockets`, `requests` or `h2` run with a python3
//! that can import them (the suite's interpreter, else Debian's `/usr/bin/python3`,
//! where scripts/install-deps installs them).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use graft_tests::{Bed, Outcome, Proc, STEAL_TIMEOUT, fixture_str, python, wait_until};
use nix::sys::signal::Signal;
use serde_json::Value;

/// How soon after a session ends its port must be back with the target.
const RESTORE: Duration = Duration::from_secs(2);

/// How long a fixture client may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a mirrored copy may take to reach CMD.
const COPY_TIMEOUT: Duration = Duration::from_secs(5);

/// The header filter of alice's sessions.
const ALICE: &str = "x-user: alice";

/// The header filter of bob's sessions.
const BOB: &str = "x-user: bob";

// ----- fixtures ------------------------------------------------------------------

/// A python3 that can import `modules` (comma-separated; empty for none): the
/// suite's interpreter when it can, else Debian's.
fn py_with(modules: &str) -> String {
    if modules.is_empty() {
        return python().to_owned();
    }
    for candidate in [python(), "/usr/bin/python3"] {
        let imports = Command::new(candidate)
            .args(["-c", &format!("import {modules}")])
            .output()
            .is_ok_and(|out| out.status.success());
        if imports {
            return candidate.to_owned();
        }
    }
    panic!(
        "no python3 can import {modules}: run scripts/install-deps (python3-grpcio, \
         python3-websockets, python3-requests, python3-h2)"
    );
}

/// `PYTHON fixtures/SCRIPT ARGS...` with a python3 that imports `modules`.
fn fixture_cmd(modules: &str, script: &str, args: &[&str]) -> Vec<String> {
    let mut cmd = vec![py_with(modules), fixture_str(script)];
    cmd.extend(args.iter().map(|a| (*a).to_owned()));
    cmd
}

/// `named_http.py NAME PORT` (HTTP/1.1 and h2c; h2c needs the `h2` module, which
/// is imported only when an h2c connection arrives).
fn named_http(name: &str, port: u16) -> Vec<String> {
    fixture_cmd("h2", "named_http.py", &[name, &port.to_string()])
}

/// Starts `graft run --target pid:PID FLAGS... -- CMD...` with the extra
/// environment `env` (e.g. `USER`).
fn start_session(bed: &Bed, flags: &[&str], cmd: &[String], env: &[(&str, &str)]) -> Proc {
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut command = bed.graft_run(flags, &args);
    // graft names the user behind sudo first; these sessions are named by USER.
    command.env_remove("SUDO_USER");
    for (key, value) in env {
        command.env(key, value);
    }
    let what = format!("graft run {} -- {}", flags.join(" "), cmd[1..].join(" "));
    bed.spawn(command, &what)
}

/// Calls `probe` until it returns `Some` (at most [`STEAL_TIMEOUT`]), failing at
/// once when `session` exits.
///
/// # Panics
///
/// When the session exits or the time runs out, with `what` and its output.
fn wait_for<T>(session: &mut Proc, what: &str, mut probe: impl FnMut(&Proc) -> Option<T>) -> T {
    let found = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!(
                "the session exited ({status}) before {what}\n{}",
                session.output_report()
            );
        }
        probe(session)
    });
    found.unwrap_or_else(|| {
        panic!(
            "{what}: not within {STEAL_TIMEOUT:?}\n{}",
            session.output_report()
        )
    })
}

/// Runs a fixture client on the host (not under graft) to completion.
fn client(bed: &Bed, cmd: &[String]) -> Outcome {
    let mut command = Command::new(&cmd[0]);
    command.args(&cmd[1..]);
    let what = cmd[1..].join(" ");
    bed.finish(bed.spawn(command, &what), CLIENT_TIMEOUT)
}

/// The JSON values a client printed, one per line.
fn json_lines(out: &Outcome) -> Vec<Value> {
    out.lines()
        .into_iter()
        .filter(|line| !line.is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{line:?} is not JSON ({e})\n{out}"))
        })
        .collect()
}

/// `http_client.py MODE TARGET_V4 PORT SPEC...` (MODE `conn` or `pipeline`): the
/// responses, which must all have arrived.
fn http_client(bed: &Bed, mode: &str, port: u16, specs: &[&str]) -> Vec<Value> {
    let host = bed.target_v4.to_string();
    let port = port.to_string();
    let mut args = vec![mode, host.as_str(), port.as_str()];
    args.extend_from_slice(specs);
    let out = client(bed, &fixture_cmd("", "http_client.py", &args));
    let replies = json_lines(&out);
    assert!(
        out.success() && replies.len() == specs.len(),
        "not every request was answered\n{out}"
    );
    replies
}

/// Asserts that reply `i` was answered by `server` (header and body) with status
/// 200 and that its body contains every string of `contains`.
#[track_caller]
fn assert_reply(replies: &[Value], i: usize, server: &str, contains: &[&str]) {
    let reply = &replies[i];
    assert_eq!(reply["status"], 200, "reply {i}: {reply}");
    assert_eq!(
        reply["served_by"], server,
        "reply {i} came from the wrong server: {reply}"
    );
    let body = reply["body"].as_str().unwrap_or_default();
    assert!(body.starts_with(server), "reply {i}: {reply}");
    for needle in contains {
        assert!(body.contains(needle), "reply {i} lacks {needle:?}: {reply}");
    }
}

/// One HTTP/1.1 answer: status, `x-served-by`, body (trimmed).
#[derive(Debug)]
struct Reply {
    status: u16,
    served_by: String,
    body: String,
}

/// Sends one HTTP/1.1 request (`Connection: close`, empty body) with the extra
/// header lines `headers` to `addr` and reads the answer (3 s per step).
fn request(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> std::io::Result<Reply> {
    let timeout = Duration::from_secs(3);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes())?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not HTTP: {raw:?}"),
        )
    };
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let served_by = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("x-served-by"))
        .map(|(_, value)| value.trim().to_owned())
        .unwrap_or_default();
    Ok(Reply {
        status,
        served_by,
        body: body.trim().to_owned(),
    })
}

/// Who answers `GET path` with `headers` on the target's `port` (empty when the
/// request fails).
fn who_answers(bed: &Bed, port: u16, path: &str, headers: &[&str]) -> String {
    request(
        SocketAddr::from((bed.target_v4, port)),
        "GET",
        path,
        headers,
    )
    .map(|reply| reply.served_by)
    .unwrap_or_default()
}

/// Waits until `GET /probe` with `headers` on the target's `port` is answered by
/// `server`: the session's steal has taken effect.
fn wait_routed(bed: &Bed, session: &mut Proc, port: u16, headers: &[&str], server: &str) {
    let what = format!("requests with {headers:?} reach {server}");
    wait_for(session, &what, |_| {
        (who_answers(bed, port, "/probe", headers) == server).then_some(())
    });
}

/// Waits until a request sent to the target's `port` shows up in the output of
/// the mirroring `session` (probes carry `headers`, which the mirror's filter
/// must match).
fn wait_mirrored(bed: &Bed, session: &mut Proc, port: u16, headers: &[&str]) {
    let mut i = 0;
    wait_for(
        session,
        "a request to the target is mirrored to CMD",
        |session| {
            i += 1;
            let _ = who_answers(bed, port, &format!("/mirror-probe-{i}"), headers);
            // A copy may trail its answer: give it a moment before probing again.
            std::thread::sleep(Duration::from_millis(100));
            session.stdout().contains("/mirror-probe-").then_some(())
        },
    );
}

/// How many lines of `text` contain `needle`.
fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|line| line.contains(needle)).count()
}

/// Asserts that every request line `request NAME METHOD PATH ` of `paths` shows up
/// in `proc`'s output within [`COPY_TIMEOUT`].
#[track_caller]
fn assert_received(proc: &Proc, name: &str, paths: &[&str]) {
    let all = wait_until(COPY_TIMEOUT, Duration::from_millis(50), || {
        let out = proc.stdout();
        let prefix = format!("request {name} ");
        paths
            .iter()
            .all(|p| {
                let path = format!(" {p} ");
                out.lines()
                    .any(|l| l.starts_with(&prefix) && l.contains(&path))
            })
            .then_some(())
    });
    assert!(
        all.is_some(),
        "{name} did not receive all of {paths:?} within {COPY_TIMEOUT:?}\n{}",
        proc.output_report()
    );
}

/// Asserts that no request line of `proc` names any of `paths`.
#[track_caller]
fn assert_not_received(proc: &Proc, paths: &[&str]) {
    let out = proc.stdout();
    for path in paths {
        assert_eq!(
            count(&out, &format!(" {path} ")),
            0,
            "{path} reached the wrong server\n{}",
            proc.output_report()
        );
    }
}

/// Ends `session` with SIGTERM and returns when it ended.
fn end(session: &mut Proc) -> Instant {
    session.signal(Signal::SIGTERM);
    let ended = Instant::now();
    assert!(
        session.wait_timeout(Duration::from_secs(10)).is_some(),
        "graft did not exit after SIGTERM\n{}",
        session.output_report()
    );
    ended
}

/// Asserts that within [`RESTORE`] no graft rule is left in the target's
/// namespace.
#[track_caller]
fn assert_no_rules_left(bed: &Bed) {
    let clean = wait_until(RESTORE, Duration::from_millis(50), || {
        (!bed.has_graft_rules()).then_some(())
    });
    assert!(
        clean.is_some(),
        "graft rules left after every session ended:\n{}",
        bed.packet_rules()
    );
}

/// `graft ls --target pid:PID`.
fn graft_ls(bed: &Bed) -> Outcome {
    let target = format!("pid:{}", bed.target_pid);
    let out = bed.finish(
        bed.spawn(bed.graft(&["ls", "--target", &target]), "graft ls"),
        CLIENT_TIMEOUT,
    );
    out.assert_success();
    out
}

/// The lines of `graft ls` that list a subscription of `port` (a line that names
/// the port as a number of its own and a mode).
fn subscriptions(out: &Outcome, port: u16) -> Vec<String> {
    let port = port.to_string();
    out.lines()
        .into_iter()
        .filter(|line| line.split(|c: char| !c.is_ascii_digit()).any(|t| t == port))
        .filter(|line| line.contains("steal") || line.contains("mirror"))
        .map(str::to_owned)
        .collect()
}

/// This machine's host name, as graft names its sessions (`user@host`).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("the kernel knows its host name")
        .trim()
        .to_owned()
}

// ----- mirror ----------------------------------------------------------------------

#[test]
fn mirror_target_answers_and_cmd_gets_a_copy_of_every_request() {
    let bed = Bed::new();
    let port = bed.map_port;
    let target = bed.serve_in_target(&named_http("target", port));
    let mut session = start_session(&bed, &["--mirror"], &named_http("local", port), &[]);
    wait_mirrored(&bed, &mut session, port, &[]);

    // One keep-alive connection with bodies of several kinds, and IPv6.
    let replies = http_client(
        &bed,
        "conn",
        port,
        &[
            "path=/m1",
            "user=alice,path=/m2",
            "method=POST,path=/m3,body=70000",
            "method=PUT,path=/m4,body=30000,chunked=3,delay=50",
            "path=/stream/2",
        ],
    );
    assert_reply(&replies, 0, "target", &[" /m1 "]);
    assert_reply(&replies, 1, "target", &[" /m2 ", "user=alice"]);
    assert_reply(&replies, 2, "target", &[" /m3 ", "len=70000"]);
    assert_reply(&replies, 3, "target", &[" /m4 ", "len=30000"]);
    assert_eq!(
        replies[4]["body"], "target chunk 0\ntarget chunk 1",
        "{}",
        replies[4]
    );
    let six = request(SocketAddr::from((bed.target_v6, port)), "GET", "/m6", &[])
        .expect("the target answers over IPv6");
    assert_eq!(
        (six.status, six.served_by.as_str()),
        (200, "target"),
        "{six:?}"
    );

    // CMD saw a copy of each, with the same bodies.
    assert_received(
        &session,
        "local",
        &["/m1", "/m2", "/m3", "/m4", "/stream/2", "/m6"],
    );
    let copies = session.stdout();
    assert!(
        copies.contains("request local POST /m3 len=70000"),
        "{copies}"
    );
    assert!(
        copies.contains("request local PUT /m4 len=30000"),
        "{copies}"
    );
    // The target served each request exactly once.
    for path in ["/m1", "/m2", "/m3", "/m4", "/m6"] {
        assert_eq!(
            count(&target.stdout(), &format!(" {path} ")),
            1,
            "{}",
            target.output_report()
        );
    }

    let ended = end(&mut session);
    assert_no_rules_left(&bed);
    assert!(ended.elapsed() <= RESTORE + Duration::from_secs(1));
    assert_eq!(who_answers(&bed, port, "/after", &[]), "target");
}

#[test]
fn mirror_with_a_cmd_that_never_reads_leaves_the_target_unaffected() {
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = bed.serve_in_target(&named_http("target", port));
    let stall = fixture_cmd("", "tcp_app.py", &["stall", &port.to_string()]);
    let mut session = start_session(&bed, &["--mirror"], &stall, &[]);
    wait_for(&mut session, "the mirror connects to CMD", |session| {
        let _ = who_answers(&bed, port, "/probe", &[]);
        session.stdout().contains("accepted").then_some(())
    });

    // 24 MiB in 1 MiB bodies on one connection: far more than any socket buffer
    // between graft and a CMD that never reads.
    let specs: Vec<String> = (0..24)
        .map(|i| format!("method=POST,path=/big{i},body=1048576"))
        .collect();
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let started = Instant::now();
    let replies = http_client(&bed, "conn", port, &specs);
    for i in 0..specs.len() {
        assert_reply(&replies, i, "target", &["len=1048576"]);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the target was slowed down by a stalled mirror: {:?}",
        started.elapsed()
    );
    assert!(
        session.try_status().is_none(),
        "graft exited\n{}",
        session.output_report()
    );
}

#[test]
fn mirror_with_a_cmd_that_resets_every_copy_leaves_the_target_unaffected() {
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = bed.serve_in_target(&named_http("target", port));
    let reset = fixture_cmd("", "tcp_app.py", &["reset", &port.to_string()]);
    let mut session = start_session(&bed, &["--mirror"], &reset, &[]);
    wait_for(&mut session, "the mirror connects to CMD", |session| {
        let _ = who_answers(&bed, port, "/probe", &[]);
        session.stdout().contains("accepted").then_some(())
    });
    for round in 0..5 {
        let replies = http_client(
            &bed,
            "conn",
            port,
            &[
                "path=/r1",
                "method=POST,path=/r2,body=200000",
                "path=/stream/2",
            ],
        );
        assert_reply(&replies, 0, "target", &[" /r1 "]);
        assert_reply(&replies, 1, "target", &["len=200000"]);
        assert_eq!(
            replies[2]["body"], "target chunk 0\ntarget chunk 1",
            "round {round}: {}",
            replies[2]
        );
    }
    assert!(
        session.try_status().is_none(),
        "graft exited\n{}",
        session.output_report()
    );
}

#[test]
fn filtered_mirror_copies_only_matching_requests() {
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = bed.serve_in_target(&named_http("target", port));
    let mut session = start_session(
        &bed,
        &["--mirror", "--filter-header", ALICE],
        &named_http("local", port),
        &[],
    );
    wait_mirrored(&bed, &mut session, port, &[ALICE]);
    let replies = http_client(
        &bed,
        "conn",
        port,
        &[
            "path=/f1",
            "user=alice,path=/f2",
            "user=bob,method=POST,path=/f3,body=1000",
            "user=alice,method=POST,path=/f4,body=2000,chunked=2",
            "path=/f5",
        ],
    );
    for (i, path) in ["/f1", "/f2", "/f3", "/f4", "/f5"].iter().enumerate() {
        assert_reply(&replies, i, "target", &[&format!(" {path} ")]);
    }
    assert_received(&session, "local", &["/f2", "/f4"]);
    assert!(
        session.stdout().contains("request local POST /f4 len=2000"),
        "{}",
        session.stdout()
    );
    // /f5 came after /f4 on the same connection: had it been copied, it would be
    // there by now; give stragglers a moment anyway.
    std::thread::sleep(Duration::from_millis(500));
    assert_not_received(&session, &["/f1", "/f3", "/f5"]);
}

// ----- HTTP-filtered steal ---------------------------------------------------------

#[test]
fn filtered_steal_routes_each_request_of_a_keepalive_connection() {
    let bed = Bed::new();
    let port = bed.map_port;
    let target = bed.serve_in_target(&named_http("target", port));
    let mut session = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE],
        &named_http("local", port),
        &[],
    );
    wait_routed(&bed, &mut session, port, &[ALICE], "local");
    assert_eq!(who_answers(&bed, port, "/probe", &[BOB]), "target");

    let replies = http_client(
        &bed,
        "conn",
        port,
        &[
            "path=/k1",
            "user=alice,path=/k2",
            "user=bob,path=/k3",
            // Header names are matched in lower case, values case-insensitively.
            "header=X-User:ALICE,path=/k4",
            // A streamed chunked upload, to each side.
            "user=alice,method=POST,path=/k5,body=300000,chunked=6,delay=100",
            "method=POST,path=/k6,body=200000,chunked=4,delay=50",
            // Expect: 100-continue, to each side.
            "user=alice,method=POST,path=/k7,body=5000,expect=1",
            "method=PUT,path=/k8,body=5000,expect=1",
            // Streamed (chunked) responses, from each side.
            "user=alice,path=/stream/3",
            "path=/stream/3",
            "user=alice,path=/k11",
        ],
    );
    assert_reply(&replies, 0, "target", &[" /k1 "]);
    assert_reply(&replies, 1, "local", &[" /k2 ", "user=alice"]);
    assert_reply(&replies, 2, "target", &[" /k3 ", "user=bob"]);
    assert_reply(&replies, 3, "local", &[" /k4 ", "user=ALICE"]);
    assert_reply(&replies, 4, "local", &["POST /k5 len=300000"]);
    assert_reply(&replies, 5, "target", &["POST /k6 len=200000"]);
    assert_reply(&replies, 6, "local", &["POST /k7 len=5000"]);
    assert_reply(&replies, 7, "target", &["PUT /k8 len=5000"]);
    assert_eq!(
        replies[6]["continued"], true,
        "no 100 Continue: {}",
        replies[6]
    );
    assert_eq!(
        replies[7]["continued"], true,
        "no 100 Continue: {}",
        replies[7]
    );
    assert_eq!(
        replies[8]["body"],
        "local chunk 0\nlocal chunk 1\nlocal chunk 2"
    );
    assert_eq!(replies[8]["served_by"], "local");
    assert_eq!(
        replies[9]["body"],
        "target chunk 0\ntarget chunk 1\ntarget chunk 2"
    );
    assert_eq!(replies[9]["served_by"], "target");
    assert_reply(&replies, 10, "local", &[" /k11 "]);

    // Each request reached exactly one server.
    assert_not_received(&target, &["/k2", "/k4", "/k5", "/k7", "/k11"]);
    assert_not_received(&session, &["/k1", "/k3", "/k6", "/k8"]);
}

#[test]
fn filtered_steal_splits_pipelined_requests_in_order() {
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = bed.serve_in_target(&named_http("target", port));
    let mut session = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE],
        &named_http("local", port),
        &[],
    );
    wait_routed(&bed, &mut session, port, &[ALICE], "local");
    let replies = http_client(
        &bed,
        "pipeline",
        port,
        &[
            "path=/p1",
            "user=alice,path=/p2",
            "user=alice,method=POST,path=/p3,body=20000",
            "method=POST,path=/p4,body=100",
            "method=POST,path=/p5,body=3000,chunked=3",
            "user=alice,path=/p6",
        ],
    );
    assert_reply(&replies, 0, "target", &[" /p1 "]);
    assert_reply(&replies, 1, "local", &[" /p2 "]);
    assert_reply(&replies, 2, "local", &["POST /p3 len=20000"]);
    assert_reply(&replies, 3, "target", &["POST /p4 len=100"]);
    assert_reply(&replies, 4, "target", &["POST /p5 len=3000"]);
    assert_reply(&replies, 5, "local", &[" /p6 "]);
}

#[test]
fn filtered_steal_by_path_and_method_needs_both() {
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = bed.serve_in_target(&named_http("target", port));
    let mut session = start_session(
        &bed,
        &[
            "--steal",
            "--filter-path",
            "^/api/",
            "--filter-method",
            "POST",
        ],
        &named_http("local", port),
        &[],
    );
    let addr = SocketAddr::from((bed.target_v4, port));
    wait_for(&mut session, "POST /api/ reaches CMD", |_| {
        request(addr, "POST", "/api/probe", &[])
            .ok()
            .filter(|reply| reply.served_by == "local")
    });
    let replies = http_client(
        &bed,
        "conn",
        port,
        &[
            "method=POST,path=/api/a,body=10",
            "path=/api/a",
            "method=POST,path=/other,body=10",
            "method=POST,path=/api/b?debug=1,body=10",
            "method=POST,path=/other?next=/api/,body=10",
            "method=PUT,path=/api/c,body=10",
        ],
    );
    assert_reply(&replies, 0, "local", &["POST /api/a "]);
    assert_reply(&replies, 1, "target", &["GET /api/a "]);
    assert_reply(&replies, 2, "target", &["POST /other "]);
    assert_reply(&replies, 3, "local", &["POST /api/b?debug=1 "]);
    assert_reply(&replies, 4, "target", &["POST /other?next=/api/ "]);
    assert_reply(&replies, 5, "target", &["PUT /api/c "]);
}

#[test]
fn filtered_steal_over_h2c_routes_each_stream() {
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = bed.serve_in_target(&named_http("target", port));
    let mut session = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE],
        &named_http("local", port),
        // The agent's log in the report, should a stream reach the wrong server.
        &[("GRAFT_LOG", "info")],
    );
    wait_routed(&bed, &mut session, port, &[ALICE], "local");

    // curl, one request per connection.
    let url = |path: &str| format!("http://{}:{port}{path}", bed.target_v4);
    let curl_h2 = |path: &str, header: Option<&str>| {
        let mut command = Command::new("curl");
        command.args([
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "5",
            "--http2-prior-knowledge",
        ]);
        if let Some(header) = header {
            command.args(["-H", header]);
        }
        let out = command.arg(url(path)).output().expect("curl runs");
        assert!(
            out.status.success(),
            "curl {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(
        curl_h2("/c1", Some("x-user: alice")),
        "local GET /c1 len=0 user=alice proto=h2",
        "{}",
        session.output_report()
    );
    assert_eq!(curl_h2("/c2", None), "target GET /c2 len=0 user=- proto=h2");
    assert_eq!(
        curl_h2("/c3", Some("x-user: bob")),
        "target GET /c3 len=0 user=bob proto=h2"
    );

    // Concurrent streams of one connection, each routed on its own.
    let host = bed.target_v4.to_string();
    let port_s = port.to_string();
    let out = client(
        &bed,
        &fixture_cmd(
            "h2",
            "h2_client.py",
            &[
                &host,
                &port_s,
                "user=alice,path=/s1",
                "path=/s2",
                "user=bob,method=POST,path=/s3,body=5000",
                "user=alice,method=POST,path=/s4,body=7000",
                "path=/s5",
            ],
        ),
    );
    let replies = json_lines(&out);
    assert!(out.success() && replies.len() == 5, "{out}");
    assert_reply(&replies, 0, "local", &["GET /s1 ", "proto=h2"]);
    assert_reply(&replies, 1, "target", &["GET /s2 ", "proto=h2"]);
    assert_reply(&replies, 2, "target", &["POST /s3 len=5000", "proto=h2"]);
    assert_reply(&replies, 3, "local", &["POST /s4 len=7000", "proto=h2"]);
    assert_reply(&replies, 4, "target", &["GET /s5 ", "proto=h2"]);
}

#[test]
fn filtered_steal_of_grpc_unary_and_server_streaming_keeps_trailers() {
    let bed = Bed::new();
    let port = bed.map_port;
    let port_s = port.to_string();
    let _target = bed.serve_in_target(&fixture_cmd(
        "grpc",
        "grpc_app.py",
        &["server", "target", &port_s],
    ));
    let mut session = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE],
        &fixture_cmd("grpc", "grpc_app.py", &["server", "local", &port_s]),
        &[],
    );
    let host = bed.target_v4.to_string();
    let call = |user: &str| {
        let out = client(
            &bed,
            &fixture_cmd(
                "grpc",
                "grpc_app.py",
                &["client", &host, &port_s, user, "hello"],
            ),
        );
        let values = json_lines(&out);
        (out.success() && values.len() == 1).then(|| values[0].clone())
    };
    wait_for(&mut session, "alice's gRPC calls reach CMD", |_| {
        call("alice").filter(|reply| reply["unary"] == "local unary hello")
    });

    for (user, server) in [
        ("alice", "local"),
        ("bob", "target"),
        ("-", "target"),
        ("alice", "local"),
    ] {
        let reply = call(user).unwrap_or_else(|| panic!("the gRPC calls of {user} failed"));
        assert_eq!(
            reply["unary"],
            format!("{server} unary hello"),
            "{user}: {reply}"
        );
        assert_eq!(reply["unary_code"], "OK", "{user}: {reply}");
        assert_eq!(
            reply["unary_trailers"]["x-trailer"],
            format!("{server}-done"),
            "{user}: {reply}"
        );
        let stream: Vec<String> = (0..3)
            .map(|i| format!("{server} stream {i} hello"))
            .collect();
        assert_eq!(
            reply["stream"],
            serde_json::json!(stream),
            "{user}: {reply}"
        );
        assert_eq!(reply["stream_code"], "OK", "{user}: {reply}");
        assert_eq!(
            reply["stream_trailers"]["x-trailer"],
            format!("{server}-done"),
            "{user}: {reply}"
        );
    }
}

#[test]
fn filtered_steal_hands_a_matching_websocket_to_cmd_and_leaves_others() {
    let bed = Bed::new();
    let port = bed.map_port;
    let port_s = port.to_string();
    let _target = bed.serve_in_target(&fixture_cmd(
        "websockets",
        "ws_app.py",
        &["server", "target", &port_s],
    ));
    let mut session = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE],
        &fixture_cmd("websockets", "ws_app.py", &["server", "local", &port_s]),
        &[],
    );
    let url = format!("ws://{}:{port}/chat", bed.target_v4);
    let talk = |user: &str, messages: &[&str]| {
        let mut args = vec!["client", url.as_str(), user];
        args.extend_from_slice(messages);
        let out = client(&bed, &fixture_cmd("websockets", "ws_app.py", &args));
        let values = json_lines(&out);
        (out.success() && values.len() == 1).then(|| values[0].clone())
    };
    wait_for(&mut session, "alice's WebSocket reaches CMD", |_| {
        talk("alice", &["probe"]).filter(|answers| answers[0] == "local: probe")
    });
    let many = ["one", "two", "three", "four"];
    for (user, server) in [("alice", "local"), ("-", "target"), ("bob", "target")] {
        let answers = talk(user, &many).unwrap_or_else(|| panic!("the WebSocket of {user} failed"));
        let expected: Vec<String> = many.iter().map(|m| format!("{server}: {m}")).collect();
        assert_eq!(answers, serde_json::json!(expected), "{user}");
    }
}

// ----- non-HTTP traffic on a filtered port -----------------------------------------

#[test]
fn raw_tcp_on_a_filtered_port_reaches_the_target_untouched() {
    let bed = Bed::new();
    let port = bed.map_port;
    let port_s = port.to_string();
    let _target = bed.serve_in_target(&fixture_cmd("", "tcp_app.py", &["line", "target", &port_s]));
    let mut session = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE],
        &named_http("local", port),
        &[],
    );
    // An HTTP request that matches proves the filter is in place.
    wait_routed(&bed, &mut session, port, &[ALICE], "local");
    let host = bed.target_v4.to_string();
    for text in ["hello there", "*1\r$4\rPING", "\u{1}\u{2} binary-ish"] {
        let out = client(
            &bed,
            &fixture_cmd("", "tcp_app.py", &["client-line", &host, &port_s, text]),
        );
        assert!(out.success(), "{out}");
        assert_eq!(out.out(), format!("target: {text}"), "{out}");
    }
}

#[test]
fn server_speaks_first_protocol_on_a_filtered_port_reaches_the_target() {
    let bed = Bed::new();
    let port = bed.map_port;
    let port_s = port.to_string();
    let _target = bed.serve_in_target(&fixture_cmd(
        "",
        "tcp_app.py",
        &["banner", "target", &port_s],
    ));
    let mut session = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE],
        &named_http("local", port),
        &[],
    );
    wait_routed(&bed, &mut session, port, &[ALICE], "local");
    let host = bed.target_v4.to_string();
    // The client sends nothing: graft must give up waiting for a request (about
    // 1 s) and connect it to the target, which speaks first.
    let out = client(
        &bed,
        &fixture_cmd("", "tcp_app.py", &["client-banner", &host, &port_s]),
    );
    assert!(out.success(), "{out}");
    let line = out.out();
    assert!(line.starts_with("target banner (after "), "{out}");
    let seconds: f64 = line
        .trim_start_matches("target banner (after ")
        .trim_end_matches(" s)")
        .parse()
        .unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert!(seconds < 3.0, "the banner took {seconds} s");
}

// ----- several sessions on one target ------------------------------------------------

#[test]
fn two_filtered_sessions_and_the_target_share_a_port_under_load() {
    let bed = Bed::new();
    let port = bed.map_port;
    let target = bed.serve_in_target(&named_http("target", port));
    let map = format!("{}:{port}", bed.app_port);
    let mut alice = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE, "--port-map", &map],
        &named_http("alice", bed.app_port),
        &[("USER", "graft-alice")],
    );
    let mut bob = start_session(
        &bed,
        &["--steal", "--filter-header", BOB],
        &named_http("bob", port),
        &[("USER", "graft-bob")],
    );
    wait_routed(&bed, &mut alice, port, &[ALICE], "alice");
    wait_routed(&bed, &mut bob, port, &[BOB], "bob");
    assert_eq!(who_answers(&bed, port, "/probe", &[]), "target");

    // graft ls lists both subscriptions.
    let ls = graft_ls(&bed);
    let listed = subscriptions(&ls, port);
    assert_eq!(listed.len(), 2, "{ls}");
    let host = hostname();
    for (user, who) in [("graft-alice", "alice"), ("graft-bob", "bob")] {
        let line = listed
            .iter()
            .find(|line| line.contains(&format!("{user}@{host}")))
            .unwrap_or_else(|| panic!("no subscription of {user}@{host}\n{ls}"));
        assert!(line.contains("steal"), "{line}");
        assert!(line.contains(&format!("x-user: {who}")), "{line}");
    }

    // 200 requests from 16 threads on keep-alive connections, users mixed.
    let url = format!("http://{}:{port}/", bed.target_v4);
    let out = client(
        &bed,
        &fixture_cmd("requests", "http_client.py", &["load", &url, "200", "16"]),
    );
    assert!(out.success(), "{out}");
    let load = &json_lines(&out)[0];
    assert_eq!(
        load["errors"],
        serde_json::json!([]),
        "requests failed: {load}"
    );
    assert_eq!(load["bad"], serde_json::json!([]), "wrong answers: {load}");
    let routes: BTreeMap<String, u64> =
        serde_json::from_value(load["routes"].clone()).expect("routes");
    let expected: BTreeMap<String, u64> = [
        ("alice->alice".to_owned(), 67),
        ("bob->bob".to_owned(), 67),
        ("none->target".to_owned(), 66),
    ]
    .into();
    assert_eq!(routes, expected, "misrouted: {load}");
    // Each server read exactly its share: none lost, none delivered twice.
    assert_eq!(
        count(&alice.stdout(), "GET /load/"),
        67,
        "{}",
        alice.output_report()
    );
    assert_eq!(
        count(&bob.stdout(), "GET /load/"),
        67,
        "{}",
        bob.output_report()
    );
    assert_eq!(
        count(&target.stdout(), "GET /load/"),
        66,
        "{}",
        target.output_report()
    );

    // When alice's session ends, her requests go back to the target at once; bob's
    // still go to bob.
    let ended = end(&mut alice);
    let back = wait_until(RESTORE, Duration::from_millis(50), || {
        (who_answers(&bed, port, "/back", &[ALICE]) == "target").then_some(())
    });
    assert!(
        back.is_some() && ended.elapsed() <= RESTORE + Duration::from_secs(1),
        "alice's requests did not go back to the target within {RESTORE:?}\n{}",
        alice.output_report()
    );
    // Alice's agent owned the hub: its packet rules went with it at once, and
    // bob's agent takes the hub over; until it has, bob's requests reach the
    // target (never an error).
    let still = wait_until(RESTORE, Duration::from_millis(50), || {
        (who_answers(&bed, port, "/still", &[BOB]) == "bob").then_some(())
    });
    assert!(
        still.is_some(),
        "bob's requests did not reach bob again within {RESTORE:?}\n{}",
        bob.output_report()
    );
    let ls = graft_ls(&bed);
    let listed = subscriptions(&ls, port);
    assert!(
        listed.len() == 1 && listed[0].contains("graft-bob@"),
        "{ls}"
    );

    let ended = end(&mut bob);
    let back = wait_until(RESTORE, Duration::from_millis(50), || {
        (who_answers(&bed, port, "/back", &[BOB]) == "target").then_some(())
    });
    assert!(
        back.is_some() && ended.elapsed() <= RESTORE + Duration::from_secs(1),
        "bob's requests did not go back to the target within {RESTORE:?}\n{}",
        bob.output_report()
    );
    assert_no_rules_left(&bed);
    let ls = graft_ls(&bed);
    assert!(
        subscriptions(&ls, port).is_empty(),
        "sessions listed after they ended\n{ls}"
    );
}

#[test]
fn second_unfiltered_steal_of_a_stolen_port_is_refused_naming_the_holder() {
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = bed.serve_in_target(&named_http("target", port));
    let mut holder = start_session(
        &bed,
        &["--steal"],
        &named_http("holder", port),
        &[("USER", "graft-holder")],
    );
    wait_routed(&bed, &mut holder, port, &[], "holder");

    let map = format!("{}:{port}", bed.app_port);
    let intruder = start_session(
        &bed,
        &["--steal", "--port-map", &map],
        &named_http("intruder", bed.app_port),
        &[("USER", "graft-intruder")],
    );
    let refused = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        intruder.stderr().contains("already stolen").then_some(())
    });
    assert!(
        refused.is_some(),
        "no refusal\n{}",
        intruder.output_report()
    );
    let holder_name = format!("graft-holder@{}", hostname());
    assert!(
        intruder.stderr().contains(&holder_name),
        "the refusal does not name {holder_name}\n{}",
        intruder.output_report()
    );
    // The holder keeps the port.
    for i in 0..5 {
        let reply = request(
            SocketAddr::from((bed.target_v4, port)),
            "GET",
            &format!("/h{i}"),
            &[],
        )
        .expect("the port answers");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(
            reply.body.starts_with(&format!("holder GET /h{i} ")),
            "{reply:?}"
        );
    }
    assert_eq!(
        count(&intruder.stdout(), "request intruder"),
        0,
        "{}",
        intruder.output_report()
    );
    let ls = graft_ls(&bed);
    let listed = subscriptions(&ls, port);
    assert!(
        listed.len() == 1 && listed[0].contains(&holder_name),
        "{ls}"
    );
}

#[test]
fn mirror_session_coexists_with_a_filtered_steal_session() {
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = bed.serve_in_target(&named_http("target", port));
    let map = format!("{}:{port}", bed.app_port);
    let mut alice = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE, "--port-map", &map],
        &named_http("alice", bed.app_port),
        &[],
    );
    wait_routed(&bed, &mut alice, port, &[ALICE], "alice");
    let mut mirror = start_session(&bed, &["--mirror"], &named_http("mirror", port), &[]);
    wait_mirrored(&bed, &mut mirror, port, &[]);

    let replies = http_client(
        &bed,
        "conn",
        port,
        &[
            "path=/c1",
            "user=alice,path=/c2",
            "method=POST,path=/c3,body=4000",
            "user=alice,method=POST,path=/c4,body=4000",
            "user=bob,path=/c5",
        ],
    );
    assert_reply(&replies, 0, "target", &[" /c1 "]);
    assert_reply(&replies, 1, "alice", &[" /c2 "]);
    assert_reply(&replies, 2, "target", &["POST /c3 len=4000"]);
    assert_reply(&replies, 3, "alice", &["POST /c4 len=4000"]);
    assert_reply(&replies, 4, "target", &[" /c5 "]);
    // The mirror got a copy of (at least) the requests the target served.
    assert_received(&mirror, "mirror", &["/c1", "/c3", "/c5"]);

    let ls = graft_ls(&bed);
    let listed = subscriptions(&ls, port);
    assert_eq!(listed.len(), 2, "{ls}");
    assert!(
        listed
            .iter()
            .any(|l| l.contains("steal") && l.contains("x-user: alice")),
        "{ls}"
    );
    assert!(listed.iter().any(|l| l.contains("mirror")), "{ls}");

    end(&mut mirror);
    assert_eq!(who_answers(&bed, port, "/after-mirror", &[ALICE]), "alice");
    end(&mut alice);
    assert_no_rules_left(&bed);
    assert_eq!(who_answers(&bed, port, "/after", &[ALICE]), "target");
}

#[test]
fn a_killed_hub_owner_is_taken_over_by_the_other_session() {
    // alice's agent owns the target's hub (its session came first); killing it
    // with -9 ends alice's session, and bob's agent takes the hub over: bob's
    // requests keep reaching bob, the rest the target, and alice's rules go.
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = bed.serve_in_target(&named_http("target", port));
    let map = format!("{}:{port}", bed.app_port);
    let mut alice = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE, "--port-map", &map],
        &named_http("alice", bed.app_port),
        &[("USER", "graft-alice")],
    );
    wait_routed(&bed, &mut alice, port, &[ALICE], "alice");
    let mut bob = start_session(
        &bed,
        &["--steal", "--filter-header", BOB],
        &named_http("bob", port),
        &[("USER", "graft-bob")],
    );
    wait_routed(&bed, &mut bob, port, &[BOB], "bob");

    let owner = bed.agent_of(alice.pid());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(owner as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        alice.wait_timeout(Duration::from_secs(10)).is_some(),
        "alice's graft still runs after its agent was killed\n{}",
        alice.output_report()
    );
    let back = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        (who_answers(&bed, port, "/after", &[BOB]) == "bob"
            && who_answers(&bed, port, "/after", &[ALICE]) == "target"
            && who_answers(&bed, port, "/after", &[]) == "target")
            .then_some(())
    });
    assert!(
        back.is_some(),
        "bob's agent did not take the hub over\n{}\n{}",
        bob.output_report(),
        alice.output_report()
    );
    let ls = graft_ls(&bed);
    let listed = subscriptions(&ls, port);
    assert!(
        listed.len() == 1 && listed[0].contains("graft-bob@"),
        "{ls}"
    );

    end(&mut bob);
    let back = wait_until(RESTORE, Duration::from_millis(50), || {
        (who_answers(&bed, port, "/end", &[BOB]) == "target").then_some(())
    });
    assert!(back.is_some(), "the port did not go back to the target");
    assert_no_rules_left(&bed);
}
