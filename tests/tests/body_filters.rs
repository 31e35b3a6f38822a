//! Issue 12, body filters: `--filter-body REGEX` and `--filter-json
//! POINTER=VALUE` route each request of a filtered steal by its body, with
//! Content-Length and chunked bodies and `Expect: 100-continue`; a body over
//! `--filter-body-limit` is routed by the other rules (and the agent's log says
//! so); every body reaches its destination unchanged (length and SHA-256
//! checked by the server). Attacks: many MiB of body, bodies that never finish,
//! and `Subscribe` frames with hostile body rules.
//!
//! Servers are `body_app.py` (python's http.server): one in the target's
//! network namespace on [`Bed::map_port`] (the "target"), one as CMD (the
//! "local" one); requests are sent by curl from the host.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use graft_protocol::incoming::{Combine, FilterRule, HttpFilterSpec, IncomingMode, Subscription};
use graft_protocol::link::{AgentMessage, ClientMessage, Hello, HelloReply};
use graft_protocol::remote::{RemoteRequest, RemoteResponse};
use graft_tests::link::{LinkClient, link_cert};
use graft_tests::{Bed, Proc, STEAL_TIMEOUT, agent_bin, fixture_str, python, wait_until};
use sha2::{Digest, Sha256};

/// How long a server may take to listen.
const SERVER_UP: Duration = Duration::from_secs(10);
/// How long one request may take (curl's `--max-time`).
const CLIENT_TIMEOUT: u64 = 20;
/// The agent's peak memory bound under the attacks, in KiB (issue 10's 64 MiB).
const RSS_LIMIT_KIB: u64 = 64 * 1024;

fn body_app(name: &str, port: u16) -> Vec<String> {
    vec![
        python().to_owned(),
        fixture_str("body_app.py"),
        name.to_owned(),
        port.to_string(),
    ]
}

fn wait_listening(server: &mut Proc, what: &str) {
    let up = wait_until(SERVER_UP, Duration::from_millis(50), || {
        if let Some(status) = server.try_status() {
            panic!("{what} exited ({status})\n{}", server.output_report());
        }
        server.stdout().contains("listening").then_some(())
    });
    assert!(
        up.is_some(),
        "{what} did not listen\n{}",
        server.output_report()
    );
}

/// Starts `body_app.py target PORT` in the target's network namespace.
fn serve_in_target(bed: &Bed, port: u16) -> Proc {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &bed.target_ns])
        .args(body_app("target", port));
    let mut server = bed.spawn(command, "body_app.py in the target netns");
    wait_listening(&mut server, "body_app.py in the target netns");
    server
}

/// Starts `graft run --steal FLAGS... -- body_app.py local PORT` with the
/// agent's log at info level on graft's stderr.
fn start_session(bed: &Bed, flags: &[&str], port: u16) -> Proc {
    let cmd = body_app("local", port);
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut all = vec!["--steal"];
    all.extend_from_slice(flags);
    let mut command = bed.graft_run(&all, &args);
    command.env("GRAFT_LOG", "info");
    bed.spawn(command, &format!("graft run {}", all.join(" ")))
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// POSTs `body` to the target's `path` with curl and `extra` curl arguments;
/// returns the answer's body.
fn post(bed: &Bed, path: &str, body: &[u8], extra: &[&str]) -> String {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), body).unwrap();
    let url = format!("http://{}:{}{path}", bed.target_v4, bed.map_port);
    let data = format!("@{}", file.path().display());
    let out = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "--max-time"])
        .arg(CLIENT_TIMEOUT.to_string())
        .args(["--expect100-timeout", "60"])
        .args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            &data,
        ])
        .args(extra)
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {url} {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts that `reply` came from `server` and that it received `body` whole.
fn assert_served(reply: &str, server: &str, path: &str, body: &[u8]) {
    let expected = format!(
        "{server} POST {path} len={} sha={}",
        body.len(),
        sha256(body)
    );
    assert_eq!(reply.trim(), expected, "for a body of {} bytes", body.len());
}

/// Waits until the steal of `session` takes a request with `body`.
fn wait_stolen(bed: &Bed, session: &mut Proc, body: &[u8], extra: &[&str]) {
    let stolen = wait_until(STEAL_TIMEOUT, Duration::from_millis(200), || {
        if let Some(status) = session.try_status() {
            panic!("the session exited ({status})\n{}", session.output_report());
        }
        post(bed, "/probe", body, extra)
            .starts_with("local ")
            .then_some(())
    });
    assert!(
        stolen.is_some(),
        "the steal never took a matching request\n{}",
        session.output_report()
    );
}

fn json_of(name: &str, pad: usize) -> Vec<u8> {
    format!(
        r#"{{"user":{{"name":"{name}","id":7}},"pad":"{}"}}"#,
        "x".repeat(pad)
    )
    .into_bytes()
}

#[test]
fn json_filter_routes_each_request_by_its_body_whatever_its_framing() {
    let bed = Bed::new();
    let _target = serve_in_target(&bed, bed.map_port);
    let mut session = start_session(&bed, &["--filter-json", "/user/name=alice"], bed.map_port);
    let alice = json_of("alice", 10);
    let bob = json_of("bob", 10);
    wait_stolen(&bed, &mut session, &alice, &[]);

    let chunked = ["-H", "Transfer-Encoding: chunked"];
    let expect = ["-H", "Expect: 100-continue"];
    let both = [chunked, expect].concat();
    for extra in [&[][..], &chunked[..], &expect[..], &both[..]] {
        assert_served(&post(&bed, "/a", &alice, extra), "local", "/a", &alice);
        assert_served(&post(&bed, "/b", &bob, extra), "target", "/b", &bob);
    }
    // Not JSON, or no such pointer: the target.
    let text = b"user=alice".to_vec();
    assert_served(&post(&bed, "/c", &text, &[]), "target", "/c", &text);
    let other = br#"{"user":"alice"}"#.to_vec();
    assert_served(&post(&bed, "/d", &other, &[]), "target", "/d", &other);
    // Nesting far past serde_json's limit: no match, no crash.
    let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000)).into_bytes();
    assert_served(&post(&bed, "/deep", &deep, &[]), "target", "/deep", &deep);
    // Alice's JSON over the 64 KiB default limit: there is no other rule, so the
    // target, and the log says why; the body arrives whole, both framings.
    let big = json_of("alice", 200 * 1024);
    assert_served(&post(&bed, "/big", &big, &[]), "target", "/big", &big);
    assert_served(&post(&bed, "/big", &big, &both), "target", "/big", &big);
    // The agent still serves matching requests after all that.
    assert_served(&post(&bed, "/e", &alice, &[]), "local", "/e", &alice);
    let log = session.stderr();
    assert!(
        log.contains(
            "the body of POST /big is over the 65536-byte limit of the body filters; \
                      the request is routed by the filters' other rules"
        ),
        "the log does not say why /big went to the target\n{}",
        session.output_report()
    );
}

#[test]
fn body_over_the_limit_is_routed_by_the_header_rule() {
    let bed = Bed::new();
    let _target = serve_in_target(&bed, bed.map_port);
    let mut session = start_session(
        &bed,
        &[
            "--filter-body",
            r"order-\d+",
            "--filter-header",
            "x-user: alice",
            "--filter-body-limit",
            "1",
        ],
        bed.map_port,
    );
    let alice = ["-H", "x-user: alice"];
    let bob = ["-H", "x-user: bob"];
    let order = b"{\"id\":\"order-7\"}".to_vec();
    wait_stolen(&bed, &mut session, &order, &alice);

    let nothing = b"{\"id\":\"none\"}".to_vec();
    assert_served(&post(&bed, "/1", &order, &alice), "local", "/1", &order);
    assert_served(&post(&bed, "/2", &order, &bob), "target", "/2", &order);
    assert_served(
        &post(&bed, "/3", &nothing, &alice),
        "target",
        "/3",
        &nothing,
    );
    // 2 KiB, over the 1 KiB limit: the header decides, whatever the body says.
    let mut long = b"order-9 ".repeat(256);
    assert_served(&post(&bed, "/4", &long, &alice), "local", "/4", &long);
    assert_served(&post(&bed, "/5", &long, &bob), "target", "/5", &long);
    long.fill(b'z');
    let chunked_alice = [&alice[..], &["-H", "Transfer-Encoding: chunked"]].concat();
    assert_served(
        &post(&bed, "/6", &long, &chunked_alice),
        "local",
        "/6",
        &long,
    );
}

/// The peak resident set of `pid` in KiB (`VmHWM`, proc(5)).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("a VmHWM line")
}

/// Bodies that never finish.
const SLOW_CLIENTS: usize = 64;
/// The size of each of the two huge bodies, in MiB.
const HUGE_MIB: usize = 48;

#[test]
fn huge_and_endless_bodies_leave_the_agent_bounded_and_other_requests_flowing() {
    let bed = Bed::new();
    let _target = serve_in_target(&bed, bed.map_port);
    let mut session = start_session(&bed, &["--filter-body", "alice"], bed.map_port);
    let alice = b"hello alice".to_vec();
    wait_stolen(&bed, &mut session, &alice, &[]);
    let agent = *bed.agent_pids().first().expect("the session's agent runs");
    let addr = SocketAddr::from((bed.target_v4, bed.map_port));

    // Slow-loris: a chunked body announced, 16 KiB of it sent, the rest never.
    let slow: Vec<TcpStream> = (0..SLOW_CLIENTS)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            write!(
                s,
                "POST /slow/{i} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\n"
            )
            .unwrap();
            s.write_all(&[b'a'; 16 * 1024]).unwrap();
            s
        })
        .collect();
    // Two huge bodies, one with a Content-Length, one chunked, with "alice"
    // only at their very end: over the limit, so they go to the target, whole.
    let huge = |chunked: bool| {
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            let len = HUGE_MIB << 20;
            let framing = if chunked {
                "Transfer-Encoding: chunked".to_owned()
            } else {
                format!("Content-Length: {len}")
            };
            write!(s, "POST /huge HTTP/1.1\r\nHost: t\r\n{framing}\r\n\r\n").unwrap();
            let block = vec![b'b'; 1 << 20];
            let mut digest = Sha256::new();
            for i in 0..HUGE_MIB {
                let mut data = block.clone();
                if i == HUGE_MIB - 1 {
                    data[(1 << 20) - 5..].copy_from_slice(b"alice");
                }
                digest.update(&data);
                if chunked {
                    write!(s, "{:x}\r\n", data.len()).unwrap();
                }
                s.write_all(&data).unwrap();
                if chunked {
                    s.write_all(b"\r\n").unwrap();
                }
            }
            if chunked {
                s.write_all(b"0\r\n\r\n").unwrap();
            }
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&answer).contains("sha=") || !answer.ends_with(b"\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "the huge body's connection closed without an answer");
                answer.extend_from_slice(&buf[..n]);
            }
            let sha: String = digest
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            (String::from_utf8_lossy(&answer).into_owned(), len, sha)
        })
    };
    let huge_length = huge(false);
    let huge_chunked = huge(true);

    // Meanwhile requests on other connections are routed by their bodies.
    for i in 0..5 {
        let path = format!("/during/{i}");
        assert_served(&post(&bed, &path, &alice, &[]), "local", &path, &alice);
        let bob = b"hello bob".to_vec();
        assert_served(&post(&bed, &path, &bob, &[]), "target", &path, &bob);
    }
    for handle in [huge_length, huge_chunked] {
        let (answer, len, sha) = handle.join().unwrap();
        assert!(
            answer.contains(&format!("target POST /huge len={len} sha={sha}")),
            "a huge body did not reach the target whole: {answer}"
        );
    }
    let peak = peak_rss_kib(agent);
    assert!(
        peak < RSS_LIMIT_KIB,
        "the agent peaked at {peak} KiB (limit {RSS_LIMIT_KIB} KiB) under huge and endless bodies"
    );
    assert!(
        session.try_status().is_none(),
        "the session ended\n{}",
        session.output_report()
    );
    drop(slow);
}

// ----- hostile Subscribe frames ---------------------------------------------------

const SECRET: &str = "body-filters-secret-0123456789ab";

fn start_agent(bed: &Bed) -> (Proc, SocketAddr, String) {
    let mut command = Command::new(agent_bin());
    command
        .args(["--target-pid", &bed.target_pid.to_string()])
        .arg("--listen=tcp:127.0.0.1:0")
        .args(["--connect-timeout", "30"])
        .env("GRAFT_AGENT_SECRET", SECRET);
    let mut proc = bed.spawn(command, "graft-agent");
    let ready = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        if let Some(status) = proc.try_status() {
            panic!("graft-agent exited ({status})\n{}", proc.output_report());
        }
        proc.stdout()
            .lines()
            .find_map(|l| l.strip_prefix("ready tcp:").map(str::to_owned))
    })
    .unwrap_or_else(|| panic!("graft-agent never said ready\n{}", proc.output_report()));
    let stdout = proc.stdout();
    (proc, ready.parse().unwrap(), stdout)
}

#[test]
fn subscribe_frames_with_hostile_body_rules_are_refused_cleanly() {
    let bed = Bed::new();
    let (mut agent, addr, stdout) = start_agent(&bed);
    let pin = link_cert(&stdout);
    let port = bed.map_port;
    let hello_path = bed.remote("hello.txt");
    let spec = |rule: FilterRule| HttpFilterSpec {
        combine: Combine::AllOf,
        rules: vec![rule],
    };
    let attacks = vec![
        (
            "an expression that compiles to gigabytes",
            spec(FilterRule::Body {
                regex: r"\w{1000}{1000}".into(),
                limit: 1024,
            }),
            "too big once compiled",
        ),
        (
            "a 4 GiB body limit",
            spec(FilterRule::Body {
                regex: "a".into(),
                limit: u32::MAX,
            }),
            "body filter limit",
        ),
        (
            "a 64 KiB expression",
            spec(FilterRule::Body {
                regex: "a".repeat(64 << 10),
                limit: 1024,
            }),
            "at most 4096 are allowed",
        ),
        (
            "a JSON value nested 2000 deep",
            spec(FilterRule::Json {
                pointer: "/a".into(),
                value: "[".repeat(2000) + &"]".repeat(2000),
                limit: 1024,
            }),
            "recursion limit exceeded",
        ),
        (
            "a JSON pointer that is not RFC 6901",
            spec(FilterRule::Json {
                pointer: "a~2".into(),
                value: "1".into(),
                limit: 1024,
            }),
            "RFC 6901",
        ),
    ];
    let (answers, read) = bed
        .in_target_netns(move || {
            let mut client = LinkClient::connect(addr, pin).unwrap();
            client.attach([3; 16], SECRET.as_bytes()).unwrap();
            client
                .send(&ClientMessage::Hello(Hello {
                    version: graft_protocol::PROTOCOL_VERSION.into(),
                    secret: SECRET.into(),
                    client: "graft-tests body filters".into(),
                }))
                .unwrap();
            assert!(matches!(
                client.receive().unwrap(),
                AgentMessage::Hello(HelloReply::Accepted { .. })
            ));
            let mut answers = Vec::new();
            for (what, filter, needle) in &attacks {
                let broken = |e: std::io::Error| format!("the link broke at {what}: {e}");
                client
                    .send(&ClientMessage::Subscribe(Subscription {
                        port,
                        mode: IncomingMode::Steal,
                        filter: Some(filter.clone()),
                        responses: false,
                    }))
                    .map_err(broken)?;
                let error = loop {
                    if let AgentMessage::SubscribeResult { port: p, error } =
                        client.receive().map_err(broken)?
                        && p == port
                    {
                        break error;
                    }
                };
                answers.push((what.to_string(), error, needle.to_string()));
            }
            client
                .send(&ClientMessage::Request {
                    id: 1,
                    request: RemoteRequest::ReadFile {
                        path: hello_path,
                        no_follow: false,
                    },
                })
                .unwrap();
            let read = loop {
                if let AgentMessage::Response { id: 1, response } = client.receive().unwrap() {
                    break response;
                }
            };
            client.close().unwrap();
            Ok::<_, String>((answers, read))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.output_report()));
    assert_eq!(answers.len(), 5);
    for (what, error, needle) in &answers {
        let error = error
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| panic!("{what} was accepted"));
        assert!(error.contains(needle.as_str()), "{what}: {error}");
        assert!(
            error.len() < 400,
            "{what}: the refusal is {} bytes long",
            error.len()
        );
    }
    assert!(
        matches!(read, RemoteResponse::File { .. }),
        "the session broke after the refusals: {read:?}"
    );
    assert!(
        !bed.has_graft_rules(),
        "a refused subscription left rules:\n{}",
        bed.packet_rules()
    );
    // The session ends cleanly when its link closes, as after any session.
    let status = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        agent.try_status()
    });
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent did not end cleanly ({status:?})\n{}",
        agent.output_report()
    );
}
