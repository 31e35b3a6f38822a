//! TLS steal with HTTP filters: the agent decrypts a filtered HTTPS port with the
//! certificate the session gives (`--tls-cert`/`--tls-key`), routes each decrypted
//! request by the filter, sends unmatched ones on to the target's HTTPS server
//! (which must prove the given certificate, unless `--tls-insecure-upstream`) and
//! matched ones to CMD as plain HTTP (or over TLS again with `--tls-local`).
//!
//! A test CA made with rcgen signs the target's certificate for the bed's target
//! address and `api.graft.test`; real curl (`--cacert`, `--http1.1` and
//! `--http2`), a Python HTTPS server (`named_http.py` with a certificate: ALPN h2
//! and http/1.1) in the target's network namespace, and the same server in plain
//! HTTP as CMD. Attacks: a malformed ClientHello ends only its own connection; an
//! impostor target without the key gets nothing; the key never reaches the logs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use graft_tests::pki::{HOST, Pki};
use graft_tests::{Bed, Proc, STEAL_TIMEOUT, fixture_str, python, wait_until};

/// The header filter of the sessions.
const ALICE: &str = "x-user: alice";
/// A python3 that can import `h2` (the suite's, else Debian's).
fn py_h2() -> String {
    for candidate in [python(), "/usr/bin/python3"] {
        let ok = Command::new(candidate)
            .args(["-c", "import h2"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return candidate.to_owned();
        }
    }
    panic!("no python3 can import h2: run scripts/install-deps (python3-h2)")
}

/// `named_http.py NAME PORT [CERT KEY]`.
fn named_http(name: &str, port: u16, tls: Option<(&str, &str)>) -> Vec<String> {
    let mut cmd = vec![
        py_h2(),
        fixture_str("named_http.py"),
        name.into(),
        port.to_string(),
    ];
    if let Some((cert, key)) = tls {
        cmd.extend([cert.to_owned(), key.to_owned()]);
    }
    cmd
}

/// Starts `graft run --target pid:PID FLAGS -- CMD` with `GRAFT_LOG=debug`, so
/// the test sees everything graft and its agent log.
fn start_session(bed: &Bed, flags: &[&str], cmd: &[String]) -> Proc {
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut command = bed.graft_run(flags, &args);
    command.env("GRAFT_LOG", "debug");
    bed.spawn(command, &format!("graft run {}", flags.join(" ")))
}

/// One curl answer.
#[derive(Debug, Default)]
struct Reply {
    status: u16,
    served_by: String,
    body: String,
    http_version: String,
}

/// `curl --cacert CA https://api.graft.test:PORT/PATH` (resolved to the target),
/// with `extra` flags (`--http2`, `-H ...`).
fn curl(bed: &Bed, ca: &str, port: u16, path: &str, extra: &[&str]) -> Reply {
    let resolve = format!("{HOST}:{port}:{}", bed.target_v4);
    let url = format!("https://{HOST}:{port}{path}");
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "--cacert",
            ca,
            "--resolve",
            &resolve,
            "-i",
        ])
        .args(["-w", "\n@version=%{http_version}"])
        .args(extra)
        .arg(&url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    let Some((head, rest)) = text.split_once("\n\n") else {
        return Reply::default();
    };
    let (body, version) = rest.rsplit_once("\n@version=").unwrap_or((rest, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let served_by = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("x-served-by"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    Reply {
        status,
        served_by,
        body: body.trim().to_owned(),
        http_version: version.trim().to_owned(),
    }
}

/// Waits until a matching request is answered by `server`.
fn wait_routed(bed: &Bed, session: &mut Proc, ca: &str, port: u16, server: &str) {
    let routed = wait_until(STEAL_TIMEOUT, Duration::from_millis(200), || {
        if let Some(status) = session.try_status() {
            panic!("the session exited ({status})\n{}", session.output_report());
        }
        (curl(bed, ca, port, "/probe", &["--http1.1", "-H", ALICE]).served_by == server)
            .then_some(())
    });
    assert!(
        routed.is_some(),
        "matching HTTPS requests never reached {server}\n{}",
        session.output_report()
    );
}

/// Sends a malformed ClientHello (a handshake record whose body is junk) and
/// returns whether the agent closed that connection within 5 s.
fn malformed_hello_is_closed(addr: SocketAddr) -> bool {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut record = vec![0x16, 0x03, 0x01, 0x00, 0x20];
    record.extend_from_slice(&[0x01, 0xff, 0xff, 0xff]);
    record.extend_from_slice(&[0x5a; 28]);
    stream.write_all(&record).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            // A TLS alert may come first; then the close.
            Ok(_) => continue,
            Err(e) => {
                return e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut;
            }
        }
    }
}

fn received(proc: &Proc, path: &str) -> bool {
    proc.stdout()
        .lines()
        .any(|l| l.starts_with("request ") && l.contains(&format!(" {path} ")))
}

#[test]
fn https_requests_are_routed_by_the_filter_after_decryption_over_h1_and_h2() {
    let bed = Bed::new();
    let pki = Pki::new(Some(bed.target_v4));
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("server.crt"),
        pki.path("server.key"),
    );
    let port = bed.map_port;
    let target = bed.serve_in_target(&named_http("target", port, Some((&cert, &key))));
    let mut session = start_session(
        &bed,
        &[
            "--steal",
            "--filter-header",
            ALICE,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &named_http("local", port, None),
    );
    wait_routed(&bed, &mut session, &ca, port, "local");

    let alice = ["-H", ALICE];
    let h1 = curl(
        &bed,
        &ca,
        port,
        "/h1-alice",
        &["--http1.1", alice[0], alice[1]],
    );
    assert_eq!((h1.status, h1.served_by.as_str()), (200, "local"), "{h1:?}");
    assert!(
        h1.body.contains("/h1-alice") && h1.body.contains("proto=http/1.1"),
        "{h1:?}"
    );
    let h1 = curl(&bed, &ca, port, "/h1-other", &["--http1.1"]);
    assert_eq!(
        (h1.status, h1.served_by.as_str()),
        (200, "target"),
        "{h1:?}"
    );

    // HTTP/2 (ALPN h2, which the target's server chose): an h2 request reaches
    // CMD, a plain HTTP/1.1 server, as HTTP/1.1; the target gets h2.
    let h2 = curl(
        &bed,
        &ca,
        port,
        "/h2-alice",
        &["--http2", alice[0], alice[1]],
    );
    assert_eq!((h2.status, h2.served_by.as_str()), (200, "local"), "{h2:?}");
    assert_eq!(h2.http_version, "2", "{h2:?}");
    assert!(
        h2.body.contains("/h2-alice") && h2.body.contains("proto=http/1.1"),
        "{h2:?}"
    );
    let h2 = curl(&bed, &ca, port, "/h2-other", &["--http2"]);
    assert_eq!(
        (h2.status, h2.served_by.as_str()),
        (200, "target"),
        "{h2:?}"
    );
    assert!(h2.body.contains("proto=h2"), "{h2:?}");

    // Each request reached one server only.
    assert!(!received(&target, "/h1-alice") && !received(&target, "/h2-alice"));
    assert!(!received(&session, "/h1-other") && !received(&session, "/h2-other"));

    // Attack: a malformed ClientHello ends its own connection, nothing else.
    let addr = SocketAddr::from((bed.target_v4, port));
    assert!(
        malformed_hello_is_closed(addr),
        "the agent kept a malformed ClientHello open"
    );
    let after = curl(
        &bed,
        &ca,
        port,
        "/after-attack",
        &["--http1.1", alice[0], alice[1]],
    );
    assert_eq!(
        after.served_by,
        "local",
        "{after:?}\n{}",
        session.output_report()
    );
    assert!(
        session.try_status().is_none(),
        "{}",
        session.output_report()
    );

    // The private key never shows in graft's or the agent's debug log.
    let line = pki.key_line();
    let report = session.output_report();
    assert!(
        !report.contains(&line),
        "the private key leaked into the log"
    );
    assert!(
        report.contains("SecretBytes(<") || !report.contains("key_pem"),
        "{report}"
    );
}

#[test]
fn the_target_must_prove_the_given_certificate_unless_insecure_upstream() {
    let bed = Bed::new();
    let pki = Pki::new(Some(bed.target_v4));
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("server.crt"),
        pki.path("server.key"),
    );
    let (fake_cert, fake_key) = (pki.path("impostor.crt"), pki.path("impostor.key"));
    let port = bed.map_port;
    // Attack: something without the target's key answers on the target's port.
    let impostor =
        bed.serve_in_target(&named_http("impostor", port, Some((&fake_cert, &fake_key))));
    let mut session = start_session(
        &bed,
        &[
            "--steal",
            "--filter-header",
            ALICE,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &named_http("local", port, None),
    );
    wait_routed(&bed, &mut session, &ca, port, "local");
    let other = curl(&bed, &ca, port, "/to-impostor", &["--http1.1"]);
    assert_eq!(other.status, 502, "{other:?}");
    assert_ne!(other.served_by, "impostor");
    assert!(
        !received(&impostor, "/to-impostor"),
        "the impostor got a request"
    );
    session.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = session.wait_timeout(Duration::from_secs(10));

    let mut insecure = start_session(
        &bed,
        &[
            "--steal",
            "--filter-header",
            ALICE,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-insecure-upstream",
        ],
        &named_http("local", port, None),
    );
    wait_routed(&bed, &mut insecure, &ca, port, "local");
    let other = curl(&bed, &ca, port, "/insecure", &["--http1.1"]);
    assert_eq!(
        (other.status, other.served_by.as_str()),
        (200, "impostor"),
        "{other:?}"
    );
}

#[test]
fn tls_on_a_filtered_port_without_a_certificate_is_refused_and_passes_through() {
    let bed = Bed::new();
    let pki = Pki::new(Some(bed.target_v4));
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("server.crt"),
        pki.path("server.key"),
    );
    let port = bed.map_port;
    let _target = bed.serve_in_target(&named_http("target", port, Some((&cert, &key))));
    let mut session = start_session(
        &bed,
        &["--steal", "--filter-header", ALICE],
        &named_http("local", port, None),
    );
    let message = format!("port {port} received a TLS connection");
    let refused = wait_until(STEAL_TIMEOUT, Duration::from_millis(200), || {
        if let Some(status) = session.try_status() {
            panic!("the session exited ({status})\n{}", session.output_report());
        }
        let reply = curl(&bed, &ca, port, "/refused", &["--http1.1", "-H", ALICE]);
        // The TLS connection passes on to the target, whole and unread.
        assert_ne!(reply.served_by, "local", "{reply:?}");
        session.stderr().contains(&message).then_some(reply)
    });
    let reply = refused.unwrap_or_else(|| panic!("no refusal\n{}", session.output_report()));
    assert_eq!(reply.served_by, "target", "{reply:?}");
    let stderr = session.stderr();
    assert!(
        stderr.contains("--tls-cert FILE --tls-key FILE"),
        "{stderr}"
    );
    session.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = session.wait_timeout(Duration::from_secs(10));

    // Without a filter the whole connection is CMD's, TLS and all: CMD serves
    // HTTPS itself with the target's certificate, and curl checks it.
    let mut plain = start_session(
        &bed,
        &["--steal"],
        &named_http("local", port, Some((&cert, &key))),
    );
    let through = wait_until(STEAL_TIMEOUT, Duration::from_millis(200), || {
        if let Some(status) = plain.try_status() {
            panic!("the session exited ({status})\n{}", plain.output_report());
        }
        let reply = curl(&bed, &ca, port, "/through", &["--http2"]);
        (reply.served_by == "local").then_some(reply)
    });
    let reply = through.unwrap_or_else(|| panic!("not stolen\n{}", plain.output_report()));
    assert_eq!(
        (reply.status, reply.http_version.as_str()),
        (200, "2"),
        "{reply:?}"
    );
}

#[test]
fn tls_local_delivers_matched_requests_to_cmd_over_tls() {
    let bed = Bed::new();
    let pki = Pki::new(Some(bed.target_v4));
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("server.crt"),
        pki.path("server.key"),
    );
    let port = bed.map_port;
    let _target = bed.serve_in_target(&named_http("target", port, Some((&cert, &key))));
    let mut session = start_session(
        &bed,
        &[
            "--steal",
            "--filter-header",
            ALICE,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-local",
        ],
        &named_http("local", port, Some((&cert, &key))),
    );
    wait_routed(&bed, &mut session, &ca, port, "local");
    // CMD speaks only TLS here: the h2 request reaches it as h2 (its ALPN choice).
    let h2 = curl(&bed, &ca, port, "/h2-local", &["--http2", "-H", ALICE]);
    assert_eq!((h2.status, h2.served_by.as_str()), (200, "local"), "{h2:?}");
    assert!(h2.body.contains("proto=h2"), "{h2:?}");
    let other = curl(&bed, &ca, port, "/h2-other", &["--http2"]);
    assert_eq!(other.served_by, "target", "{other:?}");
}

/// A python3 that can import `modules`.
fn py_with(modules: &str) -> String {
    for candidate in [python(), "/usr/bin/python3"] {
        let ok = Command::new(candidate)
            .args(["-c", &format!("import {modules}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return candidate.to_owned();
        }
    }
    panic!("no python3 can import {modules}: run scripts/install-deps")
}

/// `FIXTURE server NAME PORT`, serving TLS with `tls` (cert, key) when given.
fn tls_fixture_server(
    bed: &Bed,
    modules: &str,
    script: &str,
    name: &str,
    tls: Option<(&str, &str)>,
) -> Proc {
    let port = bed.map_port.to_string();
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &bed.target_ns, &py_with(modules)])
        .arg(fixture_str(script))
        .args(["server", name, &port]);
    if let Some((cert, key)) = tls {
        command
            .env("GRAFT_TEST_TLS_CERT", cert)
            .env("GRAFT_TEST_TLS_KEY", key);
    }
    let what = format!("{script} server {name} in the target netns");
    let mut server = bed.spawn(command, &what);
    server.wait_listening(&what);
    server
}

/// Runs `FIXTURE client ARGS...` on the host with the test CA; its JSON output.
fn tls_fixture_client(modules: &str, script: &str, ca: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(py_with(modules))
        .arg(fixture_str(script))
        .arg("client")
        .args(args)
        .env("GRAFT_TEST_TLS_CA", ca)
        .output()
        .expect("the client runs");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        serde_json::json!({"error": format!("{text} {}", String::from_utf8_lossy(&out.stderr))})
    })
}

#[test]
fn grpc_over_tls_is_routed_by_the_filter_with_trailers() {
    let bed = Bed::new();
    let pki = Pki::new(Some(bed.target_v4));
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("server.crt"),
        pki.path("server.key"),
    );
    let port = bed.map_port.to_string();
    let host = bed.target_v4.to_string();
    let target = tls_fixture_server(&bed, "grpc", "grpc_app.py", "target", Some((&cert, &key)));
    let cmd = vec![
        py_with("grpc"),
        fixture_str("grpc_app.py"),
        "server".into(),
        "local".into(),
        port.clone(),
    ];
    let mut session = start_session(
        &bed,
        &[
            "--steal",
            "--filter-header",
            ALICE,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &cmd,
    );
    let call = |user: &str, message: &str| {
        tls_fixture_client("grpc", "grpc_app.py", &ca, &[&host, &port, user, message])
    };
    let routed = wait_until(STEAL_TIMEOUT, Duration::from_millis(300), || {
        if let Some(status) = session.try_status() {
            panic!("the session exited ({status})\n{}", session.output_report());
        }
        let reply = call("alice", "probe");
        reply["unary"]
            .as_str()
            .is_some_and(|u| u.starts_with("local"))
            .then_some(())
    });
    assert!(
        routed.is_some(),
        "gRPC never reached CMD\n{}",
        session.output_report()
    );

    let mine = call("alice", "hello");
    assert_eq!(mine["unary"], "local unary hello", "{mine}");
    assert_eq!(mine["unary_trailers"]["x-trailer"], "local-done", "{mine}");
    assert_eq!(mine["stream"].as_array().map(Vec::len), Some(3), "{mine}");
    assert_eq!(mine["stream_code"], "OK", "{mine}");
    let theirs = call("bob", "hello");
    assert_eq!(theirs["unary"], "target unary hello", "{theirs}");
    assert_eq!(
        theirs["stream_trailers"]["x-trailer"], "target-done",
        "{theirs}"
    );
    assert!(
        !target.stdout().contains("user=alice"),
        "{}",
        target.stdout()
    );
}

#[test]
fn websocket_over_tls_is_routed_by_the_filter() {
    let bed = Bed::new();
    let pki = Pki::new(Some(bed.target_v4));
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("server.crt"),
        pki.path("server.key"),
    );
    let port = bed.map_port.to_string();
    let _target = tls_fixture_server(
        &bed,
        "websockets",
        "ws_app.py",
        "target",
        Some((&cert, &key)),
    );
    let cmd = vec![
        py_with("websockets"),
        fixture_str("ws_app.py"),
        "server".into(),
        "local".into(),
        port.clone(),
    ];
    let mut session = start_session(
        &bed,
        &[
            "--steal",
            "--filter-header",
            ALICE,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &cmd,
    );
    let url = format!("wss://{}:{port}/", bed.target_v4);
    let talk = |user: &str| {
        tls_fixture_client("websockets", "ws_app.py", &ca, &[&url, user, "one", "two"])
    };
    let routed = wait_until(STEAL_TIMEOUT, Duration::from_millis(300), || {
        if let Some(status) = session.try_status() {
            panic!("the session exited ({status})\n{}", session.output_report());
        }
        (talk("alice")[0] == "local: one").then_some(())
    });
    assert!(
        routed.is_some(),
        "the WebSocket never reached CMD\n{}",
        session.output_report()
    );
    assert_eq!(
        talk("alice"),
        serde_json::json!(["local: one", "local: two"])
    );
    assert_eq!(
        talk("bob"),
        serde_json::json!(["target: one", "target: two"])
    );
}
