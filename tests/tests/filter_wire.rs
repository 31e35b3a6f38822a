//! Issue 13, filtered steal on the wire: the agent's HTTP/1.1 fast path
//! forwards each request's bytes as the client sent them, so these tests speak
//! raw bytes to a filtered port and check who received what.
//!
//! The attacks, each shown to fail: a request smuggled behind both
//! `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.3) reaches nobody; a
//! head over the agent's limit, an endless head and a malformed head are
//! refused and reach nobody, and the agent stops reading them (it stays
//! bounded) and still serves the next client; pipelined requests whose bodies
//! look like requests go each where its own head says, with exactly its own
//! body. And the fast path's delivery: with stolen sockets passed
//! the program gets a socket the agent writes the
//! matching requests to, while the others still reach the target.
//!
//! Servers are `named_http.py` (which prints every request it reads as
//! `request NAME METHOD PATH len=N user=U ...` and answers with the same line
//! and `x-served-by: NAME`): one in the target's namespace on
//! [`Bed::map_port`], the session's CMD on the host on the same port.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use graft_tests::{Bed, Proc, STEAL_TIMEOUT, fixture_str, python, wait_until};

/// The header filter of the session.
const ALICE: &str = "x-user: alice";

/// How long a client waits for each read or write.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// `named_http.py NAME PORT` (HTTP/1.1).
fn named_http(name: &str, port: u16) -> Vec<String> {
    vec![
        python().to_owned(),
        fixture_str("named_http.py"),
        name.to_owned(),
        port.to_string(),
    ]
}

/// A target server and a session stealing `x-user: alice` on the bed's
/// `map_port`, once the steal has taken effect; `env` goes to graft.
fn setup(bed: &Bed, env: &[(&str, &str)]) -> (Proc, Proc) {
    let port = bed.map_port;
    let target = bed.serve_in_target(&named_http("target", port));
    let cmd = named_http("local", port);
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut command = bed.graft_run(&["--steal", "--filter-header", ALICE], &args);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut session = bed.spawn(command, "graft run --steal --filter-header");
    let routed = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!("the session exited ({status})\n{}", session.output_report());
        }
        let reply = exchange(
            bed,
            b"GET /probe HTTP/1.1\r\nHost: t\r\nx-user: alice\r\nConnection: close\r\n\r\n",
        );
        reply.contains("x-served-by: local").then_some(())
    });
    routed.unwrap_or_else(|| panic!("the steal never took effect\n{}", session.output_report()));
    (target, session)
}

/// Connects to the target's `map_port`.
fn connect(bed: &Bed) -> TcpStream {
    let addr = SocketAddr::from((bed.target_v4, bed.map_port));
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to the target");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

/// Sends `raw` on a new connection and reads until the server closes it (or
/// [`IO_TIMEOUT`] passes without a byte); what came back, lossily as text.
fn exchange(bed: &Bed, raw: &[u8]) -> String {
    let mut stream = connect(bed);
    let _ = stream.write_all(raw);
    read_all(&mut stream)
}

fn read_all(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Asserts that no server printed a request line naming `path`.
#[track_caller]
fn reached_nobody(target: &Proc, session: &Proc, path: &str) {
    // Give a request that slipped through time to show up.
    std::thread::sleep(Duration::from_millis(300));
    let needle = format!(" {path} ");
    for (who, out) in [("target", target.stdout()), ("local", session.stdout())] {
        assert!(
            !out.lines()
                .any(|l| l.starts_with("request ") && l.contains(&needle)),
            "{path} reached the {who} server\n{}\n{}",
            target.output_report(),
            session.output_report()
        );
    }
}

#[test]
fn a_request_smuggled_behind_content_length_and_transfer_encoding_reaches_nobody() {
    let bed = Bed::new();
    let (target, session) = setup(&bed, &[]);
    // A front end that trusts Content-Length sees one request with a 44-byte
    // body; one that trusts Transfer-Encoding sees an empty chunked body and
    // then a second request, for alice's program.
    let smuggled = "GET /smuggled HTTP/1.1\r\nx-user: alice\r\n\r\n";
    for (outer, framing) in [
        (
            "/outer-cl-te",
            "Content-Length: 46\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "/outer-te-cl",
            "Transfer-Encoding: chunked\r\nContent-Length: 46\r\n",
        ),
        // Obfuscated codings (RFC 9112 §6.3: chunked must be the final one).
        ("/outer-te-list", "Transfer-Encoding: chunked, identity\r\n"),
    ] {
        let raw = format!("POST {outer} HTTP/1.1\r\nHost: t\r\n{framing}\r\n0\r\n\r\n{smuggled}");
        let reply = exchange(&bed, raw.as_bytes());
        assert!(reply.starts_with("HTTP/1.1 400 "), "{outer}: {reply:?}");
        assert_eq!(reply.matches("HTTP/1.1 ").count(), 1, "{outer}: {reply:?}");
        reached_nobody(&target, &session, outer);
    }
    reached_nobody(&target, &session, "/smuggled");
}

#[test]
fn oversized_endless_and_malformed_heads_are_refused_and_the_agent_stays_bounded() {
    let bed = Bed::new();
    let (target, session) = setup(&bed, &[]);

    // A head over the limit (64 KiB), complete.
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: t\r\nx-user: alice\r\nx-pad: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let reply = exchange(&bed, big.as_bytes());
    assert!(reply.starts_with("HTTP/1.1 431 "), "{reply:?}");
    reached_nobody(&target, &session, "/big");

    // A head that never ends: the agent answers and closes once it passes the
    // limit, so the client's writes fail long before 64 MiB went out.
    let mut stream = connect(&bed);
    let reader = {
        let mut stream = stream.try_clone().unwrap();
        std::thread::spawn(move || read_all(&mut stream))
    };
    stream
        .write_all(b"GET /endless HTTP/1.1\r\nHost: t\r\nx-pad: ")
        .unwrap();
    let piece = vec![b'a'; 64 * 1024];
    let mut sent = 0usize;
    while sent < 64 << 20 {
        if stream.write_all(&piece).is_err() {
            break;
        }
        sent += piece.len();
    }
    assert!(sent < 64 << 20, "the agent read 64 MiB of one request head");
    let reply = reader.join().unwrap();
    assert!(reply.starts_with("HTTP/1.1 431 "), "{reply:?}");
    reached_nobody(&target, &session, "/endless");

    // Malformed heads: a space before the colon, a folded line, a bad method,
    // differing lengths.
    for (path, raw) in [
        (
            "/space",
            "GET /space HTTP/1.1\r\nHost: t\r\nx-user : alice\r\n\r\n",
        ),
        (
            "/fold",
            "GET /fold HTTP/1.1\r\nHost: t\r\nx-user: bob\r\n alice\r\n\r\n",
        ),
        ("/method", "GET /method HTTP/9.9\r\nHost: t\r\n\r\n"),
        (
            "/lengths",
            "POST /lengths HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ),
    ] {
        let reply = exchange(&bed, raw.as_bytes());
        assert!(reply.starts_with("HTTP/1.1 400 "), "{path}: {reply:?}");
        reached_nobody(&target, &session, path);
    }

    // The agent still serves both destinations.
    let reply = exchange(
        &bed,
        b"GET /after HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.contains("x-served-by: target"), "{reply:?}");
    let reply = exchange(
        &bed,
        b"GET /after HTTP/1.1\r\nHost: t\r\nx-user: alice\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.contains("x-served-by: local"), "{reply:?}");
}

#[test]
fn pipelined_requests_go_each_where_its_own_head_says_with_its_own_body() {
    let bed = Bed::new();
    let (target, session) = setup(&bed, &[]);
    // Bodies that look like requests, for the other destination.
    let inner_for_target = "GET /inner-target HTTP/1.1\r\nHost: t\r\n\r\n";
    let inner_for_alice = "GET /inner-alice HTTP/1.1\r\nx-user: alice\r\n\r\n";
    let chunked: String = format!(
        "{:x}\r\n{inner_for_target}\r\n0\r\n\r\n",
        inner_for_target.len()
    );
    let raw = format!(
        "POST /p1 HTTP/1.1\r\nHost: t\r\nx-user: alice\r\nContent-Length: {}\r\n\r\n{inner_for_target}\
         POST /p2 HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{inner_for_alice}\
         POST /p3 HTTP/1.1\r\nHost: t\r\nx-user: alice\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}\
         GET /p4 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        inner_for_target.len(),
        inner_for_alice.len(),
    );
    let reply = exchange(&bed, raw.as_bytes());
    let served: Vec<&str> = reply
        .lines()
        .filter_map(|l| l.strip_prefix("x-served-by: "))
        .collect();
    assert_eq!(served, ["local", "target", "local", "target"], "{reply}");
    let body_len = inner_for_target.len();
    assert!(
        reply.contains(&format!("local POST /p1 len={body_len} user=alice")),
        "{reply}"
    );
    assert!(
        reply.contains(&format!(
            "target POST /p2 len={} user=-",
            inner_for_alice.len()
        )),
        "{reply}"
    );
    assert!(
        reply.contains(&format!("local POST /p3 len={body_len} user=alice")),
        "{reply}"
    );
    reached_nobody(&target, &session, "/inner-target");
    reached_nobody(&target, &session, "/inner-alice");
    let local = session.stdout();
    let theirs = target.stdout();
    assert!(
        local.contains(" /p1 ")
            && local.contains(" /p3 ")
            && !local.contains(" /p2 ")
            && !local.contains(" /p4 "),
        "{local}"
    );
    assert!(
        theirs.contains(" /p2 ")
            && theirs.contains(" /p4 ")
            && !theirs.contains(" /p1 ")
            && !theirs.contains(" /p3 "),
        "{theirs}"
    );
}

#[test]
fn with_stolen_sockets_passed_matching_requests_reach_the_program_on_a_passed_socket() {
    let bed = Bed::new();
    let (target, session) = setup(&bed, &[("GRAFT_LOG", "debug")]);
    let mut stream = connect(&bed);
    let raw = "GET /m1 HTTP/1.1\r\nHost: t\r\nx-user: alice\r\n\r\n\
               GET /o1 HTTP/1.1\r\nHost: t\r\n\r\n\
               POST /m2 HTTP/1.1\r\nHost: t\r\nx-user: alice\r\nContent-Length: 5\r\n\r\nhello\
               GET /o2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    stream.write_all(raw.as_bytes()).unwrap();
    let reply = read_all(&mut stream);
    let served: Vec<&str> = reply
        .lines()
        .filter_map(|l| l.strip_prefix("x-served-by: "))
        .collect();
    assert_eq!(served, ["local", "target", "local", "target"], "{reply}");
    assert!(reply.contains("local POST /m2 len=5 user=alice"), "{reply}");
    let theirs = target.stdout();
    assert!(
        !theirs.contains(" /m1 ") && !theirs.contains(" /m2 "),
        "{theirs}"
    );
    let report = session.output_report();
    assert!(
        report.contains("connection to the session passed as a loopback socket"),
        "the agent's debug log does not say the program got a passed socket:\n{report}"
    );
}
