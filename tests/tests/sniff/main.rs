//! The sniffing mirror (issue 13): a port that sessions only mirror is copied off
//! the packet path (an `AF_PACKET` socket in the target's network namespace and
//! graft's own TCP reassembly), so the target's clients talk to the target with
//! no redirect and no pass-through.
//!
//! What is shown, with real servers in the target's namespace and real clients
//! (curl, python, wrk) on the host:
//! - no packet rule of graft exists while a port is mirrored, the target answers
//!   every client, and CMD gets the copies;
//! - pipelined requests and multi-MiB bodies reach CMD byte for byte (IPv4 and
//!   IPv6);
//! - without `CAP_NET_RAW` the agent falls back to the pass-through mirror by
//!   itself, and says so at debug level;
//! - attacks: a SYN flood of thousands of flows, overlapping segments with
//!   different data, huge sequence jumps and a tiny-segment flood leave the
//!   target serving every other client and the agent's memory bounded, and the
//!   copy keeps the bytes the target took; a process in the pod that writes raw
//!   segments into another client's connection (blind) or spoofs a client's
//!   handshake gets nothing into the copy.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use graft_tests::{Bed, Proc, STEAL_TIMEOUT, curl, fixture_str, python, wait_until};
use nix::sys::signal::Signal;

/// How long a mirrored copy may take to reach CMD.
const COPY_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's peak anonymous memory under attack may not exceed this, in KiB
/// (the bound of the other attack tests, `bounds.rs`).
const RSS_LIMIT_KIB: u64 = 64 * 1024;

/// The log line of a port mirrored off the packet path.
const SNIFFING: &str = "mirroring off the packet path";

/// Starts `named_http.py NAME PORT` in the target's network namespace.
fn serve_in_target(bed: &Bed, name: &str, port: u16) -> Proc {
    serve_in_target_with(bed, name, port, &[])
}

/// [`serve_in_target`] with more environment (`named_http.py`'s knobs).
fn serve_in_target_with(bed: &Bed, name: &str, port: u16, env: &[(&str, &str)]) -> Proc {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &bed.target_ns, python()])
        .arg(fixture_str("named_http.py"))
        .args([name, &port.to_string()])
        .envs(env.iter().copied());
    let mut server = bed.spawn(command, &format!("named_http.py {name} in the target"));
    wait_listening(&mut server, "the target's server");
    server
}

fn wait_listening(proc: &mut Proc, what: &str) {
    let up = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        if let Some(status) = proc.try_status() {
            panic!("{what} exited ({status})\n{}", proc.output_report());
        }
        proc.stdout().contains("listening").then_some(())
    });
    assert!(
        up.is_some(),
        "{what} did not listen\n{}",
        proc.output_report()
    );
}

/// `graft run --target pid:PID --mirror -- CMD` with `GRAFT_LOG=debug`.
fn mirror_session(bed: &Bed, cmd: &[String]) -> Proc {
    mirror_session_with(bed, cmd, &[])
}

/// [`mirror_session`] with more environment for graft and CMD.
fn mirror_session_with(bed: &Bed, cmd: &[String], env: &[(&str, &str)]) -> Proc {
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut command = bed.graft_run(&["--mirror"], &args);
    command.env("GRAFT_LOG", "debug").envs(env.iter().copied());
    bed.spawn(command, "graft run --mirror")
}

fn named_http(name: &str, port: u16) -> Vec<String> {
    vec![
        python().to_owned(),
        fixture_str("named_http.py"),
        name.to_owned(),
        port.to_string(),
    ]
}

/// `GET path` on a fresh connection to the target; who answered (empty on failure).
fn who_answers(addr: SocketAddr, path: &str) -> String {
    let get = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        Ok(raw)
    };
    get()
        .ok()
        .and_then(|raw| {
            raw.lines()
                .find_map(|l| l.strip_prefix("x-served-by: ").map(str::to_owned))
        })
        .unwrap_or_default()
}

/// Sends requests until one shows up in CMD's output (CMD prints `request ...`).
fn wait_mirrored(session: &mut Proc, addr: SocketAddr, tag: &str) {
    let mut i = 0;
    let copied = wait_until(STEAL_TIMEOUT, Duration::from_millis(200), || {
        if let Some(status) = session.try_status() {
            panic!("graft exited ({status})\n{}", session.output_report());
        }
        i += 1;
        assert_eq!(who_answers(addr, &format!("/{tag}-{i}")), "target");
        session.stdout().contains(&format!("/{tag}-")).then_some(())
    });
    assert!(
        copied.is_some(),
        "no request was mirrored to CMD\n{}",
        session.output_report()
    );
}

fn end(session: &mut Proc) {
    session.signal(Signal::SIGTERM);
    assert!(
        session.wait_timeout(Duration::from_secs(10)).is_some(),
        "graft did not exit\n{}",
        session.output_report()
    );
}

/// Waits until CMD's output holds `needle`.
fn wait_output(session: &Proc, needle: &str) -> bool {
    wait_until(COPY_TIMEOUT, Duration::from_millis(100), || {
        session.stdout().contains(needle).then_some(())
    })
    .is_some()
}

#[test]
fn a_mirrored_port_is_copied_off_the_packet_path_with_no_redirect() {
    let bed = Bed::new();
    let port = bed.map_port;
    let addr = SocketAddr::from((bed.target_v4, port));
    let target = serve_in_target(&bed, "target", port);
    let mut session = mirror_session(&bed, &named_http("local", port));
    wait_mirrored(&mut session, addr, "probe");
    assert!(
        session.stderr().contains(SNIFFING),
        "{}",
        session.output_report()
    );
    // Nothing of graft's in the target's packet rules: no redirect, no chain.
    assert!(
        !bed.has_graft_rules(),
        "graft rules while only mirroring:\n{}",
        bed.packet_rules()
    );

    // Real clients: curl over IPv4 and IPv6, python's urllib, wrk.
    let url = bed.target_url(port);
    let body = curl(&format!("{url}curl")).expect("curl reaches the target");
    assert!(body.starts_with("target GET /curl "), "{body}");
    let body6 = curl(&format!("{}curl6", bed.target_url6(port))).expect("curl over IPv6");
    assert!(body6.starts_with("target GET /curl6 "), "{body6}");
    let py = Command::new(python())
        .args([
            "-c",
            "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())",
            &format!("{url}python"),
        ])
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .output()
        .expect("python runs");
    let answer = String::from_utf8_lossy(&py.stdout);
    assert!(answer.starts_with("target GET /python "), "{answer}");
    if let Ok(wrk) = Command::new("wrk")
        .args(["-t1", "-c4", "-d1s", &format!("{url}wrk")])
        .output()
    {
        let out = String::from_utf8_lossy(&wrk.stdout);
        assert!(out.contains("requests in"), "{out}");
        assert!(
            !out.contains("Socket errors") && !out.contains("Non-2xx"),
            "{out}"
        );
    }
    for path in ["/curl ", "/curl6 ", "/python ", "/wrk "] {
        assert!(
            wait_output(&session, &format!("request local GET {path}")),
            "no copy of {path}\n{}",
            session.output_report()
        );
        assert!(target.stdout().contains(&format!("GET {path}")));
    }
    end(&mut session);
    assert!(!bed.has_graft_rules(), "{}", bed.packet_rules());
    assert_eq!(who_answers(addr, "/after"), "target");
}

/// The bytes CMD's `record_bytes.py` kept of each connection.
fn recorded(dir: &std::path::Path) -> Vec<Vec<u8>> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Sends `requests` on one connection to `addr` and reads every answer to EOF
/// (the last request closes it).
fn exchange(addr: SocketAddr, requests: &[u8]) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let requests = requests.to_vec();
    let sender = std::thread::spawn(move || writer.write_all(&requests));
    let mut answers = String::new();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).expect("the target answers");
    sender.join().unwrap().expect("the target reads everything");
    answers.push_str(&String::from_utf8_lossy(&buf));
    answers
}

#[test]
fn pipelined_and_large_requests_reach_the_mirror_byte_exact() {
    let bed = Bed::new();
    let port = bed.map_port;
    let addr = SocketAddr::from((bed.target_v4, port));
    let _target = serve_in_target(&bed, "target", port);
    let dir = tempfile::tempdir().unwrap();
    let recorder = vec![
        python().to_owned(),
        fixture_str("record_bytes.py"),
        dir.path().display().to_string(),
        port.to_string(),
    ];
    let mut session = mirror_session(&bed, &recorder);
    let up = wait_until(STEAL_TIMEOUT, Duration::from_millis(200), || {
        assert_eq!(who_answers(addr, "/probe"), "target");
        session.stdout().contains("closed ").then_some(())
    });
    assert!(up.is_some(), "no copy\n{}", session.output_report());
    assert!(session.stderr().contains(SNIFFING));

    // Three pipelined requests in one write, then a 3 MiB body, on one connection.
    let big: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut sent = Vec::new();
    for path in ["/p1", "/p2", "/p3"] {
        sent.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    }
    sent.extend_from_slice(
        format!(
            "POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    );
    sent.extend_from_slice(&big);
    let answers = exchange(addr, &sent);
    for line in ["target GET /p1 ", "target GET /p2 ", "target GET /p3 "] {
        assert!(answers.contains(line), "{answers}");
    }
    assert!(
        answers.contains(&format!("target POST /big len={}", big.len())),
        "{answers}"
    );
    // The same body over IPv6.
    let addr6 = SocketAddr::from((bed.target_v6, port));
    let mut sent6 = format!(
        "PUT /big6 HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        big.len()
    )
    .into_bytes();
    sent6.extend_from_slice(&big);
    let answers6 = exchange(addr6, &sent6);
    assert!(answers6.contains("target PUT /big6 "), "{answers6}");

    for (what, bytes) in [("IPv4", &sent), ("IPv6", &sent6)] {
        let exact = wait_until(COPY_TIMEOUT, Duration::from_millis(200), || {
            recorded(dir.path())
                .iter()
                .any(|copy| copy == bytes)
                .then_some(())
        });
        let sizes: Vec<usize> = recorded(dir.path()).iter().map(Vec::len).collect();
        assert!(
            exact.is_some(),
            "no byte-exact copy of the {what} connection ({} bytes); copies: {sizes:?}\n{}",
            bytes.len(),
            session.output_report()
        );
    }
    end(&mut session);
}

#[test]
fn without_cap_net_raw_the_mirror_passes_through_the_agent() {
    let bed = Bed::new();
    let port = bed.map_port;
    let addr = SocketAddr::from((bed.target_v4, port));
    let _target = serve_in_target(&bed, "target", port);
    // The same `graft run`, under a bounding set without CAP_NET_RAW.
    let run = bed.graft_run(&["--mirror"], &[]);
    let mut command = Command::new("capsh");
    command
        .arg("--drop=cap_net_raw")
        .args(["--", "-c", "exec \"$0\" \"$@\""])
        .arg(run.get_program())
        .args(run.get_args())
        .args(named_http("local", port))
        .current_dir(graft_tests::package_dir())
        .env("GRAFT_LOG", "debug");
    let mut session = bed.spawn(command, "capsh --drop=cap_net_raw -- graft run --mirror");
    wait_mirrored(&mut session, addr, "probe");
    let log = session.stderr();
    assert!(
        log.contains("no packet socket") && log.contains("pass through the agent"),
        "{}",
        session.output_report()
    );
    assert!(!log.contains(SNIFFING), "{log}");
    assert!(
        bed.has_graft_rules(),
        "the pass-through mirror redirects:\n{}",
        bed.packet_rules()
    );
    end(&mut session);
    assert_eq!(who_answers(addr, "/after"), "target");
}

/// The agent's peak anonymous memory in KiB: `VmHWM` less `RssFile` (its code).
fn agent_peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    field("VmHWM:").saturating_sub(field("RssFile:"))
}

/// Requests on fresh connections until `stop`; returns (sent, failures).
fn keep_asking(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u32, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut sent, mut wrong) = (0, Vec::new());
        while !stop.load(Ordering::SeqCst) {
            sent += 1;
            let who = who_answers(addr, &format!("/steady-{sent}"));
            if who != "target" {
                wrong.push(format!("/steady-{sent}: {who:?}"));
            }
        }
        (sent, wrong)
    })
}

fn forge(bed: &Bed, in_target: bool, args: &[&str]) -> String {
    let forge = bed.compile("tcpforge");
    let mut command = if in_target {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &bed.target_ns, &forge]);
        c
    } else {
        Command::new(&forge)
    };
    let out = command.args(args).output().expect("tcpforge runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tcpforge {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn hostile_segments_leave_the_target_serving_and_the_agent_bounded() {
    let bed = Bed::new();
    let port = bed.map_port;
    let addr = SocketAddr::from((bed.target_v4, port));
    let target = serve_in_target(&bed, "target", port);
    let mut session = mirror_session(&bed, &named_http("local", port));
    wait_mirrored(&mut session, addr, "probe");
    let agent = *bed.agent_pids().first().expect("an agent runs");

    let (dst, p) = (bed.target_v4.to_string(), port.to_string());
    let net = format!("198.18.{}", bed.n);
    // Overlapping segments: the target takes the first bytes, and so does the
    // copy. A copy may drop on a loaded machine (never the original): up to
    // five hostile connections until one copy arrives, before the steady
    // clients below add their copies to the local program's queue.
    let mut copied = false;
    for _ in 0..5 {
        let hostile = forge(&bed, false, &["hostile", &dst, &p]);
        assert!(hostile.contains("answered\ndone hostile"), "{hostile}");
        if wait_output(&session, "request local GET /overlap-A ") {
            copied = true;
            break;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let asking = keep_asking(addr, stop.clone());
    for _ in 0..2 {
        let flood = forge(&bed, false, &["synflood", &dst, &p, "6000", &net]);
        assert!(flood.contains("done synflood 6000"), "{flood}");
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let (sent, wrong) = asking.join().unwrap();
    assert!(
        wrong.is_empty(),
        "{} of {sent} requests to the target went wrong during the floods: {wrong:?}",
        wrong.len()
    );

    assert!(target.stdout().contains("GET /overlap-A "));
    assert!(copied, "{}", session.output_report());
    assert!(!session.stdout().contains("/overlap-B"));
    assert!(!target.stdout().contains("/overlap-B"));

    // The tiny-segment flood hit the bound and cost that connection its copy.
    assert!(
        session
            .stderr()
            .contains("copy ends: too many out-of-order segments"),
        "{}",
        session.output_report()
    );
    let peak = agent_peak_kib(agent);
    assert!(
        peak <= RSS_LIMIT_KIB,
        "the agent peaked at {peak} KiB under attack"
    );
    // The mirror still copies.
    wait_mirrored(&mut session, addr, "after-attack");
    end(&mut session);
}

/// Reads one HTTP/1.1 answer with a `Content-Length` from `stream`.
fn read_answer(stream: &mut TcpStream) -> String {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("an answer");
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("a Content-Length");
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).unwrap();
    head + &String::from_utf8_lossy(&body)
}

#[test]
fn a_process_in_the_pod_cannot_inject_into_a_mirrored_connection() {
    let bed = Bed::new();
    let port = bed.map_port;
    let addr = SocketAddr::from((bed.target_v4, port));
    let target = serve_in_target(&bed, "target", port);
    let mut session = mirror_session(&bed, &named_http("local", port));
    wait_mirrored(&mut session, addr, "probe");

    // A client's keep-alive connection, mirrored.
    let mut client = TcpStream::connect(addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client
        .write_all(b"GET /before HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert!(read_answer(&mut client).contains("target GET /before "));
    assert!(wait_output(&session, "request local GET /before "));

    // Root in the pod, blind: raw segments into that connection, and a spoofed
    // handshake from the client's address.
    let local = client.local_addr().unwrap();
    let out = forge(
        &bed,
        true,
        &[
            "blind",
            &local.ip().to_string(),
            &local.port().to_string(),
            &bed.target_v4.to_string(),
            &port.to_string(),
            "1000",
        ],
    );
    assert!(out.contains("done blind 2001"), "{out}");

    client
        .write_all(b"GET /after-injection HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert!(read_answer(&mut client).contains("target GET /after-injection "));
    // The copy survives the injection. Only when the capture fell behind the
    // flood (a loaded machine: the kernel then drops captured packets, a copy
    // with a hole ends, and the original never waits) may it lose its bytes:
    // the designed loss of an overloaded mirror, not a breach.
    let copied = wait_output(&session, "request local GET /after-injection ");
    assert!(
        copied
            || session
                .stderr()
                .contains("the kernel dropped captured packets"),
        "the copy of the connection broke, with no captured packet dropped\n{}",
        session.output_report()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !session.stdout().contains("/injected"),
        "an injected request reached the copy\n{}",
        session.output_report()
    );
    assert!(!target.stdout().contains("/injected"));
    // Whatever the flood cost, the mirror copies new connections.
    wait_mirrored(&mut session, addr, "after-injection");
    end(&mut session);
}

#[test]
fn a_mirrored_program_calling_the_target_through_graft_is_not_sent_its_own_calls() {
    let bed = Bed::new();
    let port = bed.map_port;
    let addr = SocketAddr::from((bed.target_v4, port));
    let target = serve_in_target(&bed, "target", port);
    let dir = tempfile::tempdir().unwrap();
    let cmd = vec![
        python().to_owned(),
        fixture_str("mirror_self_call.py"),
        port.to_string(),
        bed.target_url(port),
        dir.path().display().to_string(),
    ];
    let mut session = mirror_session(&bed, &cmd);
    wait_mirrored(&mut session, addr, "probe");
    // The program's own call leaves from the target's network namespace, to the
    // mirrored port: the target answers it, and it is not mirrored back.
    std::fs::write(dir.path().join("go"), b"").unwrap();
    assert!(
        wait_output(&session, "fetched target GET /from-local "),
        "{}",
        session.output_report()
    );
    assert!(target.stdout().contains("GET /from-local "));
    wait_mirrored(&mut session, addr, "after");
    assert!(
        !session.stdout().contains("request local GET /from-local"),
        "the program was sent a copy of its own call\n{}",
        session.output_report()
    );
    end(&mut session);
}

/// Sends each request on one connection after the answer to the one before
/// (whose body is one line naming its path), and returns the answers.
fn one_by_one(addr: SocketAddr, paths: &[&str]) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answers = String::new();
    for path in paths {
        write!(stream, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let line = format!(" GET {path} ");
        let mut buf = [0u8; 4096];
        while !answers.contains(&line) {
            let n = stream.read(&mut buf).expect("the target answers");
            assert!(n > 0, "the target closed the connection\n{answers}");
            answers.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    answers
}

/// A filtered mirror's copy of a request that comes while the mirror still
/// sends its answer to the copy before (its head came, its body not yet) waits
/// for that connection or opens another; it was dropped, which made
/// `incoming::filtered_mirror_copies_only_matching_requests` flaky.
#[test]
fn a_filtered_mirrors_copy_is_not_dropped_while_the_copy_before_is_answered() {
    let bed = Bed::new();
    let port = bed.map_port;
    let addr = SocketAddr::from((bed.target_v4, port));
    // The target answers after 150 ms, so the client's second request comes
    // well after the local program sent the head of its answer to the first
    // copy, and well before the body it holds back 500 ms.
    let _target = serve_in_target_with(
        &bed,
        "target",
        port,
        &[("NAMED_HTTP_ANSWER_DELAY_MS", "150")],
    );
    let cmd = named_http("local", port);
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut command = bed.graft_run(&["--mirror", "--filter-path", "^/copy"], &args);
    command
        .env("GRAFT_LOG", "debug")
        .env("NAMED_HTTP_BODY_DELAY_MS", "500");
    let mut session = bed.spawn(command, "graft run --mirror --filter-path");
    wait_mirrored(&mut session, addr, "copy-probe");

    let answers = one_by_one(addr, &["/copy-a", "/skip", "/copy-b"]);
    assert!(answers.contains("target GET /copy-b "), "{answers}");
    assert!(
        wait_output(&session, "request local GET /copy-b "),
        "the copy of /copy-b never reached the local program\n{}",
        session.output_report()
    );
    assert!(
        !session.stdout().contains(" /skip "),
        "a request the filter does not take was copied\n{}",
        session.output_report()
    );
    end(&mut session);
}

mod answers;
