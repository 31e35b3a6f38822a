//! Issue 10: when the hub's owner ends normally, the connections it relays for
//! other sessions are handed over, not reset.
//!
//! Two sessions share one target: alice's (first, so her agent owns the hub)
//! steals with a header filter, bob's steals with another filter or mirrors. A
//! long keep-alive HTTP/1.1 connection of bob's (a chunked response streamed over
//! 8 s, then a second request on the same connection) runs through alice's agent,
//! which routes each request. alice's session ends (SIGTERM to graft, the normal
//! way out) in the middle of it. Each test checks that:
//!
//! - alice's graft exits without waiting for the drain, while her agent stays
//!   to relay what it holds;
//! - the connection completes with every byte, and its next request still
//!   reaches bob (or the target, copied to bob's mirror);
//! - new connections, sent without pause through the whole hand-over, are
//!   routed right every time: bob's to bob, the rest to the target (no moment
//!   where they are refused or reach the target unfiltered);
//! - alice's agent exits once the connection is done, and when bob ends no rule
//!   is left.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use graft_tests::{Bed, Proc, STEAL_TIMEOUT, fixture_str, python, wait_until};
use nix::sys::signal::Signal;

const ALICE: &str = "x-user: alice";
const BOB: &str = "x-user: bob";

/// Chunks of the long download (100 ms apart: 8 s).
const CHUNKS: usize = 80;

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

/// One HTTP/1.1 answer read off a keep-alive connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    served_by: String,
    body: Vec<u8>,
}

/// Reads one answer (fixed length or chunked) from `reader`.
fn read_answer(reader: &mut impl BufRead) -> std::io::Result<Answer> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("no status line: {line:?}")))?;
    let (mut served_by, mut length, mut chunked) = (String::new(), None, false);
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((header, ""));
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "x-served-by" => served_by = value.to_owned(),
            "content-length" => length = value.parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16)
                .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
            let mut chunk = vec![0u8; size + 2];
            reader.read_exact(&mut chunk)?;
            if &chunk[size..] != b"\r\n" {
                return Err(bad("a chunk without its CRLF".into()));
            }
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        body.resize(length.unwrap_or(0), 0);
        reader.read_exact(&mut body)?;
    }
    Ok(Answer {
        status,
        served_by,
        body,
    })
}

/// Opens a keep-alive connection to the target's `port`, asks `GET
/// /stream/CHUNKS` and then `GET /after` on it, both with `headers`, and returns
/// both answers.
fn long_keepalive(addr: SocketAddr, headers: &[&str]) -> std::io::Result<(Answer, Answer)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let mut reader = BufReader::new(stream.try_clone()?);
    stream
        .write_all(format!("GET /stream/{CHUNKS} HTTP/1.1\r\nHost: t\r\n{extra}\r\n").as_bytes())?;
    let first = read_answer(&mut reader)?;
    stream.write_all(
        format!("GET /after HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n").as_bytes(),
    )?;
    let second = read_answer(&mut reader)?;
    Ok((first, second))
}

/// The exact body of `/stream/CHUNKS` served by `name`.
fn stream_body(name: &str) -> Vec<u8> {
    (0..CHUNKS)
        .map(|i| format!("{name} chunk {i}\n"))
        .collect::<String>()
        .into_bytes()
}

/// Who answers `GET path` with `headers` on a new connection (`x-served-by`,
/// or the error).
fn who_answers(addr: SocketAddr, path: &str, headers: &[&str]) -> String {
    let attempt = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
        stream.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n")
                .as_bytes(),
        )?;
        let answer = read_answer(&mut BufReader::new(stream))?;
        Ok(answer.served_by)
    };
    attempt().unwrap_or_else(|e| format!("error: {e}"))
}

fn wait_routed(session: &mut Proc, addr: SocketAddr, headers: &[&str], server: &str) {
    let routed = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!("the session exited ({status})\n{}", session.output_report());
        }
        (who_answers(addr, "/probe", headers) == server).then_some(())
    });
    assert!(
        routed.is_some(),
        "requests with {headers:?} never reached {server}\n{}",
        session.output_report()
    );
}

/// Whether process `pid` runs (a zombie does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// New connections sent one after another until stopped, each with the
/// headers of a case and the server that must answer it; returns every wrong
/// answer.
fn probe_without_pause(
    addr: SocketAddr,
    cases: Vec<(Vec<&'static str>, &'static str)>,
) -> (
    Arc<AtomicBool>,
    std::thread::JoinHandle<(usize, Vec<String>)>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let prober = std::thread::spawn(move || {
        let (mut sent, mut wrong) = (0, Vec::new());
        while !stopped.load(Ordering::SeqCst) {
            for (headers, server) in &cases {
                sent += 1;
                let got = who_answers(addr, &format!("/p{sent}"), headers);
                if got != *server {
                    wrong.push(format!(
                        "request {sent} with {headers:?}: {got:?}, not {server}"
                    ));
                }
            }
        }
        (sent, wrong)
    });
    (stop, prober)
}

/// Ends `alice` (the hub's owner) with SIGTERM and checks that graft exits at
/// once while her agent stays to drain what it relays.
fn end_owner(alice: &mut Proc, agent: u32) {
    alice.signal(Signal::SIGTERM);
    assert!(
        alice.wait_timeout(Duration::from_secs(10)).is_some(),
        "alice's graft did not exit after SIGTERM\n{}",
        alice.output_report()
    );
    assert!(
        running(agent),
        "alice's agent ended at once, with a connection of bob's still relayed\n{}",
        alice.output_report()
    );
}

/// Waits until alice's agent has ended by itself after the drain.
fn wait_agent_gone(agent: u32) {
    let gone = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        (!running(agent)).then_some(())
    });
    assert!(
        gone.is_some(),
        "alice's agent still runs after the connections it relayed ended"
    );
}

fn assert_no_rules_left(bed: &Bed) {
    let clean = wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
        (!bed.has_graft_rules()).then_some(())
    });
    assert!(
        clean.is_some(),
        "graft rules left after every session ended:\n{}",
        bed.packet_rules()
    );
}

#[test]
fn a_filtered_download_of_another_session_survives_the_hub_owner_ending() {
    let bed = Bed::new();
    let port = bed.map_port;
    let addr = SocketAddr::from((bed.target_v4, port));
    let _target = bed.serve_in_target(&named_http("target", port));
    let map = format!("{}:{port}", bed.app_port);
    let mut alice = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE, "--port-map", &map],
        &named_http("alice", bed.app_port),
        "graft-alice",
    );
    wait_routed(&mut alice, addr, &[ALICE], "alice");
    let mut bob = start_session(
        &bed,
        &["--steal", "--filter-header", BOB],
        &named_http("bob", port),
        "graft-bob",
    );
    wait_routed(&mut bob, addr, &[BOB], "bob");
    let owner = bed.agent_of(alice.pid());

    let download = std::thread::spawn(move || long_keepalive(addr, &[BOB]));
    let (stop, prober) = probe_without_pause(addr, vec![(vec![BOB], "bob"), (vec![], "target")]);
    std::thread::sleep(Duration::from_secs(1));
    end_owner(&mut alice, owner);

    let (first, second) = download
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the download broke: {e}\n{}", bob.output_report()));
    assert_eq!((first.status, first.served_by.as_str()), (200, "bob"));
    assert!(
        first.body == stream_body("bob"),
        "the download lost bytes: {:?}",
        String::from_utf8_lossy(&first.body)
    );
    // The next request on the same connection, routed by alice's draining agent.
    assert_eq!(
        (second.status, second.served_by.as_str()),
        (200, "bob"),
        "{second:?}"
    );
    assert!(
        String::from_utf8_lossy(&second.body).contains("GET /after "),
        "{second:?}"
    );
    wait_agent_gone(owner);
    stop.store(true, Ordering::SeqCst);
    let (sent, wrong) = prober.join().unwrap();
    assert!(
        wrong.is_empty(),
        "{} of {sent} new connections went wrong during the hand-over:\n{}\n{}",
        wrong.len(),
        wrong.join("\n"),
        bob.output_report()
    );
    // bob's agent owns the hub now: alice's requests reach the target.
    assert_eq!(who_answers(addr, "/end", &[ALICE]), "target");
    assert_eq!(who_answers(addr, "/end", &[BOB]), "bob");

    bob.signal(Signal::SIGTERM);
    assert!(bob.wait_timeout(Duration::from_secs(10)).is_some());
    assert_no_rules_left(&bed);
    assert_eq!(who_answers(addr, "/gone", &[BOB]), "target");
}

#[test]
fn a_mirrored_download_relayed_by_the_hub_owner_survives_its_end() {
    let bed = Bed::new();
    let port = bed.map_port;
    let addr = SocketAddr::from((bed.target_v4, port));
    let _target = bed.serve_in_target(&named_http("target", port));
    let map = format!("{}:{port}", bed.app_port);
    let mut alice = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE, "--port-map", &map],
        &named_http("alice", bed.app_port),
        "graft-alice",
    );
    wait_routed(&mut alice, addr, &[ALICE], "alice");
    let mut bob = start_session(&bed, &["--mirror"], &named_http("bob", port), "graft-bob");
    let mirrored = wait_until(STEAL_TIMEOUT, Duration::from_millis(200), || {
        let _ = who_answers(addr, "/mirror-probe", &[]);
        bob.stdout().contains("/mirror-probe").then_some(())
    });
    assert!(mirrored.is_some(), "no copy\n{}", bob.output_report());
    let owner = bed.agent_of(alice.pid());

    // The target answers; alice's agent relays the connection and copies it to bob.
    let download = std::thread::spawn(move || long_keepalive(addr, &[]));
    let (stop, prober) = probe_without_pause(addr, vec![(vec![], "target")]);
    std::thread::sleep(Duration::from_secs(1));
    end_owner(&mut alice, owner);

    let (first, second) = download
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the download broke: {e}\n{}", bob.output_report()));
    assert_eq!((first.status, first.served_by.as_str()), (200, "target"));
    assert!(
        first.body == stream_body("target"),
        "the download lost bytes: {:?}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!(
        (second.status, second.served_by.as_str()),
        (200, "target"),
        "{second:?}"
    );
    // bob got a copy of both requests of the connection, the second one sent
    // after alice's session had ended.
    let copied = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        let out = bob.stdout();
        (out.contains(&format!("request bob GET /stream/{CHUNKS} "))
            && out.contains("request bob GET /after "))
        .then_some(())
    });
    assert!(
        copied.is_some(),
        "bob's mirror lost a copy\n{}",
        bob.output_report()
    );
    wait_agent_gone(owner);
    stop.store(true, Ordering::SeqCst);
    let (sent, wrong) = prober.join().unwrap();
    assert!(
        wrong.is_empty(),
        "{} of {sent} new connections went wrong during the hand-over:\n{}\n{}",
        wrong.len(),
        wrong.join("\n"),
        bob.output_report()
    );
    // bob's agent owns the hub now and still gets copies.
    let mirrored = wait_until(STEAL_TIMEOUT, Duration::from_millis(200), || {
        let _ = who_answers(addr, "/after-handover", &[]);
        bob.stdout().contains("/after-handover").then_some(())
    });
    assert!(mirrored.is_some(), "no copy\n{}", bob.output_report());

    bob.signal(Signal::SIGTERM);
    assert!(bob.wait_timeout(Duration::from_secs(10)).is_some());
    assert_no_rules_left(&bed);
}
