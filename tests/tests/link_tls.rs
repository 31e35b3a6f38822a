//! Issue 10, the port-forwarded link: nothing of a session crosses the pod's
//! loopback in the clear, and a process in the pod can neither open, join,
//! replay nor take over the link.
//!
//! The "pod" is a bed's target network namespace; the agent runs there as the
//! fake cluster's ephemeral container (capture test) or by hand with a known
//! secret (attack tests), and the attacker is a socket in that namespace, as
//! a process of another container of the pod would be.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use graft_protocol::link::{AgentMessage, ClientMessage, Hello, HelloReply};
use graft_protocol::remote::{RemoteRequest, RemoteResponse};
use graft_tests::fake_kube::NAMESPACE;
use graft_tests::link::{LinkClient, link_cert};
use graft_tests::{Bed, FakeKube, Outcome, Proc, agent_bin, fixture_str, python, wait_until};
use nix::sys::signal::Signal;
use sha2::Digest;

const SECRET: &str = "link-tls-secret-0123456789abcdef";

/// `graft run --kubeconfig FILE -n shop --target deploy/api FLAGS... -- CMD...`.
fn kube_command(bed: &Bed, kube: &FakeKube, flags: &[&str], cmd: &[&str]) -> Command {
    let kubeconfig = kube.kubeconfig_str();
    let mut args = vec![
        "run",
        "--kubeconfig",
        &kubeconfig,
        "-n",
        NAMESPACE,
        "--target",
        "deploy/api",
    ];
    args.extend_from_slice(flags);
    args.push("--");
    args.extend_from_slice(cmd);
    let mut command = bed.graft(&args);
    command.env_remove("KUBECONFIG");
    command
}

/// Starts `tcpdump` on the loopback of the target's network namespace (the
/// pod's), writing every TCP packet whole to `pcap`; returns once it captures.
fn capture_loopback(bed: &Bed, pcap: &Path) -> Proc {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &bed.target_ns])
        .args([
            "tcpdump", "-i", "lo", "-n", "-U", "-s", "0", "-B", "32768", "-w",
        ])
        .arg(pcap)
        .arg("tcp");
    let dump = bed.spawn(command, "tcpdump -i lo in the pod");
    let listening = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        dump.stderr().contains("listening on lo").then_some(())
    });
    assert!(
        listening.is_some(),
        "tcpdump did not start:\n{}",
        dump.output_report()
    );
    dump
}

/// The TCP payload of every connection in a pcap file (tcpdump's format,
/// IPv4 over Ethernet or Linux cooked capture), per direction
/// `(source port, destination port)`, in capture order.
fn tcp_streams(pcap: &[u8]) -> BTreeMap<(u16, u16), Vec<u8>> {
    assert!(pcap.len() >= 24, "the capture is empty");
    let magic = u32::from_le_bytes(pcap[0..4].try_into().unwrap());
    assert!(
        magic == 0xa1b2_c3d4 || magic == 0xa1b2_3c4d,
        "not a little-endian pcap file: {magic:#x}"
    );
    let link_header = match u32::from_le_bytes(pcap[20..24].try_into().unwrap()) {
        1 => 14,   // Ethernet
        113 => 16, // Linux cooked (SLL)
        276 => 20, // SLL2
        other => panic!("unexpected pcap link type {other}"),
    };
    let mut streams: BTreeMap<(u16, u16), Vec<u8>> = BTreeMap::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let caplen = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        let packet = &pcap[at + 16..(at + 16 + caplen).min(pcap.len())];
        at += 16 + caplen;
        let Some(ip) = packet.get(link_header..) else {
            continue;
        };
        if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
            continue;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
        let Some(tcp) = ip.get(ihl..total) else {
            continue;
        };
        if tcp.len() < 20 {
            continue;
        }
        let ports = (
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
        );
        let offset = usize::from(tcp[12] >> 4) * 4;
        if let Some(payload) = tcp.get(offset..) {
            streams.entry(ports).or_default().extend_from_slice(payload);
        }
    }
    streams
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every run of exactly 64 lower-case hex digits in `bytes` (graft's session
/// secrets look like that).
fn hex64_runs(bytes: &[u8]) -> Vec<&[u8]> {
    bytes
        .split(|b| !matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        .filter(|run| run.len() == 64)
        .collect()
}

/// The session-secret digest graft put in the ephemeral container's spec.
fn secret_digest(kube: &FakeKube) -> String {
    let patch = kube
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH" && r.path.ends_with("/ephemeralcontainers"))
        .expect("graft added an ephemeral container");
    let env = &patch.body["spec"]["ephemeralContainers"][0]["env"];
    env.as_array()
        .and_then(|vars| {
            vars.iter()
                .find(|v| v["name"] == "GRAFT_AGENT_SECRET_SHA256")
                .and_then(|v| v["value"].as_str())
        })
        .unwrap_or_else(|| panic!("no secret digest in the agent's env: {env}"))
        .to_owned()
}

#[test]
fn the_pods_loopback_carries_nothing_of_the_session_in_the_clear() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("pod-lo.pcap");
    let dump = capture_loopback(&bed, &pcap);
    // A control: plaintext on the pod's loopback is found by the checks below.
    let control = format!("CONTROL-PLAINTEXT-{}", bed.n);
    let sent = control.clone();
    bed.in_target_netns(move || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(sent.as_bytes()).unwrap();
        let mut got = vec![0u8; sent.len()];
        server.read_exact(&mut got).unwrap();
    });

    // The session reads a file and the environment of the pod, sends marked
    // bytes out from the pod (the service echoes them back), then serves the
    // target's app port, where the test sends a marked stolen request.
    let outgoing_marker = format!("OUTGOING-MARKER-{}-", bed.n);
    let stolen_marker = format!("STOLEN-MARKER-{}", bed.n);
    let echo = format!(
        "import socket, sys\n\
         data = {outgoing_marker:?}.encode() * 20000\n\
         s = socket.create_connection(({service:?}, 7))\n\
         s.sendall(data)\n\
         s.shutdown(socket.SHUT_WR)\n\
         got = b''\n\
         while True:\n    b = s.recv(65536)\n    if not b: break\n    got += b\n\
         print('echoed', len(got), got == data, flush=True)\n",
        service = bed.service_v4.to_string(),
    );
    let app = fixture_str("http_app.py");
    let script = format!(
        "echo \"env=$GRAFT_TEST_MARKER\" && cat {file} && {py} -c \"$ECHO\" && exec {py} {app} {port}",
        file = bed.remote("hello.txt"),
        py = python(),
        port = bed.app_port,
    );
    let mut command = kube_command(&bed, &kube, &["--steal"], &["sh", "-c", &script]);
    command.env("ECHO", &echo);
    let mut session = bed.spawn(command, "graft run --steal (captured)");
    let url = bed.target_url(bed.app_port);
    let stolen = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!(
                "graft exited ({status}) before stealing\n{}\n{}",
                session.output_report(),
                kube.log_report()
            );
        }
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "-H"])
            .arg(format!("X-Stolen: {stolen_marker}"))
            .arg(format!("{url}?q={stolen_marker}"))
            .output()
            .ok()?;
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        body.starts_with("local").then_some(body)
    })
    .unwrap_or_else(|| {
        panic!(
            "the stolen request never reached the local app\n{}",
            session.output_report()
        )
    });
    assert!(stolen.contains(&bed.marker), "{stolen}");
    let stdout = session.stdout();
    assert!(stdout.contains(&format!("env={}", bed.marker)), "{stdout}");
    let file_line = format!("hello from target {}", bed.n);
    assert!(stdout.contains(&file_line), "{stdout}");
    let echoed_len = outgoing_marker.len() * 20000;
    assert!(
        stdout.contains(&format!("echoed {echoed_len} True")),
        "the outgoing bytes did not come back whole: {stdout}"
    );

    session.signal(Signal::SIGTERM);
    let out = session.finish(Duration::from_secs(20));
    assert!(out.code().is_some(), "{out}");
    // tcpdump writes each packet as it takes it from the kernel (-U): stop it
    // once the file has stopped growing, so nothing is left in its buffer.
    let mut last = 0;
    let settled = wait_until(Duration::from_secs(20), Duration::from_millis(700), || {
        let size = std::fs::metadata(&pcap).map_or(0, |m| m.len());
        let same = size == last && size > 0;
        last = size;
        same.then_some(())
    });
    assert!(settled.is_some(), "the capture never settled");
    dump.signal(Signal::SIGINT);
    let dumped = dump.finish(Duration::from_secs(10));
    let capture = std::fs::read(&pcap).unwrap_or_else(|e| panic!("no capture: {e}\n{dumped}"));
    let streams = tcp_streams(&capture);

    // The capture saw the link: its TLS ClientHello (whose ALPN is plaintext)
    // and, in that connection, at least the echoed bytes both ways.
    let link = streams
        .iter()
        .find(|(_, bytes)| contains(bytes, graft_protocol::tls::ALPN))
        .map(|(&(from, to), _)| (from, to))
        .unwrap_or_else(|| {
            panic!(
                "no TLS handshake of the link on the pod's loopback; streams: {:?}",
                streams
                    .iter()
                    .map(|(k, v)| (k, v.len()))
                    .collect::<Vec<_>>()
            )
        });
    let link_bytes: usize = [link, (link.1, link.0)]
        .iter()
        .map(|k| streams.get(k).map_or(0, Vec::len))
        .sum();
    assert!(
        link_bytes > 2 * echoed_len,
        "the capture holds {link_bytes} bytes of the link, fewer than the session sent\n{dumped}"
    );

    assert!(
        streams
            .values()
            .any(|bytes| contains(bytes, control.as_bytes())),
        "the capture missed the control's plaintext"
    );

    // Nothing of the session is readable in any of it.
    let digest = secret_digest(&kube);
    let secrets = [
        ("the file's content", file_line.as_bytes().to_vec()),
        (
            "the pod's environment value",
            bed.marker.as_bytes().to_vec(),
        ),
        ("the outgoing data", outgoing_marker.as_bytes().to_vec()),
        ("the stolen request", stolen_marker.as_bytes().to_vec()),
        ("the local app's answer", b"local port=".to_vec()),
        ("the relink attach (token follows it)", b"GRAFTRL".to_vec()),
        ("the session's Hello", b"graft-tests".to_vec()),
        ("the secret's digest", digest.as_bytes().to_vec()),
    ];
    for ((from, to), bytes) in &streams {
        for (what, needle) in &secrets {
            assert!(
                !contains(bytes, needle),
                "{what} crosses the pod's loopback in the clear ({from} → {to})"
            );
        }
        for run in hex64_runs(bytes) {
            let hashed: String = sha2::Sha256::digest(run)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_ne!(
                hashed, digest,
                "the session secret crosses the pod's loopback"
            );
        }
    }
}

/// An agent started by hand on the target's loopback with [`SECRET`].
struct TcpAgent {
    proc: Proc,
    addr: SocketAddr,
    pin: graft_protocol::tls::Fingerprint,
}

impl TcpAgent {
    fn start(bed: &Bed) -> TcpAgent {
        let mut command = Command::new(agent_bin());
        command
            .args(["--target-pid", &bed.target_pid.to_string()])
            .args(["--listen", "tcp:127.0.0.1:0", "--connect-timeout", "30"])
            .env("GRAFT_AGENT_SECRET", SECRET);
        let mut proc = bed.spawn(command, "graft-agent tcp");
        let addr = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            if let Some(status) = proc.try_status() {
                panic!("graft-agent exited ({status})\n{}", proc.output_report());
            }
            proc.stdout()
                .lines()
                .find_map(|l| l.strip_prefix("ready tcp:").and_then(|a| a.parse().ok()))
        })
        .unwrap_or_else(|| panic!("graft-agent never said ready\n{}", proc.output_report()));
        let pin = link_cert(&proc.stdout());
        TcpAgent { proc, addr, pin }
    }

    fn finish(self) -> Outcome {
        let out = self.proc.finish(Duration::from_secs(10));
        assert!(!out.stderr.contains("panicked"), "{out}");
        out
    }
}

fn hello() -> ClientMessage {
    ClientMessage::Hello(Hello {
        version: graft_protocol::PROTOCOL_VERSION.into(),
        secret: SECRET.into(),
        client: "graft-tests link_tls".into(),
    })
}

/// Reads `path` of the target through the session; returns its text.
fn read_file(link: &mut LinkClient, id: u64, path: &str) -> String {
    let request = RemoteRequest::ReadFile {
        path: path.into(),
        no_follow: false,
    };
    link.send(&ClientMessage::Request { id, request }).unwrap();
    loop {
        match link.receive().expect("the agent answers ReadFile") {
            AgentMessage::Response { id: got, response } if got == id => match response {
                RemoteResponse::File { data, .. } => {
                    return String::from_utf8_lossy(&data).into_owned();
                }
                other => panic!("ReadFile {path}: {other:?}"),
            },
            _ => {}
        }
    }
}

/// Whether the agent closed `stream` (EOF or reset) within `within`, reading
/// and dropping whatever it sent before.
fn closed_by_agent(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn a_process_in_the_pod_can_neither_open_join_replay_nor_cut_the_link() {
    let bed = Bed::new();
    let agent = TcpAgent::start(&bed);
    let (addr, pin) = (agent.addr, agent.pin);
    let file = bed.remote("hello.txt");
    let file_line = format!("hello from target {}", bed.n);
    let report = bed.in_target_netns(move || {
        let mut report = Vec::new();
        // 1. The attacker connects first and says nothing: the agent does not
        //    take it for its client.
        let mut idle = TcpStream::connect(addr).unwrap();
        // 2. ... or connects first and speaks plaintext: closed.
        let mut plain = TcpStream::connect(addr).unwrap();
        plain
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        assert!(
            closed_by_agent(&mut plain, Duration::from_secs(3)),
            "a plaintext connection was kept"
        );
        // 3. ... or completes TLS (anyone can) and attaches without the secret.
        let mut guess = LinkClient::connect(addr, pin).expect("TLS with the agent");
        let refused = guess.attach([7; 16], b"not-the-secret");
        assert!(
            refused.is_err(),
            "an attach without the secret was answered"
        );

        // The real client still gets in, and its session works.
        let mut real = LinkClient::connect(addr, pin).expect("TLS with the agent");
        let token = [0x5a; 16];
        real.attach(token, SECRET.as_bytes())
            .expect("the real client attaches");
        real.send(&hello()).unwrap();
        match real.receive().unwrap() {
            AgentMessage::Hello(HelloReply::Accepted { .. }) => {}
            other => panic!("the real client was refused: {other:?}"),
        }
        assert!(read_file(&mut real, 1, &file).contains(&file_line));

        // 4. A replay of everything the real client sent (as a sniffer on the
        //    loopback saw it) opens nothing: TLS 1.3 binds it to the agent's
        //    fresh random of that handshake.
        let mut replay = TcpStream::connect(addr).unwrap();
        replay.write_all(&real.written()).unwrap();
        assert!(
            closed_by_agent(&mut replay, Duration::from_secs(8)),
            "the agent kept a replayed connection"
        );
        // 5. The link's token alone (had it leaked) does not re-attach, nor
        //    does a fresh token with a wrong secret.
        let mut with_token = LinkClient::connect(addr, pin).unwrap();
        assert!(
            with_token.attach(token, b"").is_err(),
            "the token without the secret re-attached the link"
        );
        let mut fresh = LinkClient::connect(addr, pin).unwrap();
        assert!(fresh.attach([9; 16], b"wrong").is_err());

        // The real session still works; nothing cut it off.
        assert!(read_file(&mut real, 3, &file).contains(&file_line));
        real.send(&ClientMessage::Ping(42)).unwrap();
        loop {
            match real.receive().expect("the link still answers") {
                AgentMessage::Pong(42) => break,
                _ => continue,
            }
        }
        // The idle first connection was closed by the agent's handshake timeout.
        report.push(format!(
            "idle closed: {}",
            closed_by_agent(&mut idle, Duration::from_secs(10))
        ));
        real.close().expect("closing the link");
        report
    });
    assert_eq!(report, ["idle closed: true"]);
    let out = agent.finish();
    assert_eq!(out.code(), Some(0), "{out}");
    for refusal in [
        "it is no graft link",
        "its attach did not carry the session secret",
        "TLS handshake failed",
        "did not authenticate within 5 s",
    ] {
        assert!(
            out.stderr.contains(refusal),
            "no refusal {refusal:?} logged:\n{out}"
        );
    }
    assert!(!bed.has_graft_rules(), "{}", bed.packet_rules());
}

#[test]
fn a_graft_of_the_old_plaintext_protocol_is_told_to_use_one_release() {
    let bed = Bed::new();
    let agent = TcpAgent::start(&bed);
    let addr = agent.addr;
    let answer = bed.in_target_netns(move || {
        let mut old = TcpStream::connect(addr).unwrap();
        let mut attach = b"GRAFTRL1".to_vec();
        attach.extend_from_slice(&[1; 16]);
        attach.extend_from_slice(&0u64.to_be_bytes());
        old.write_all(&attach).unwrap();
        old.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = [0u8; 16];
        old.read_exact(&mut answer).unwrap();
        assert_eq!(&answer[..8], b"GRAFTRL1", "{answer:?}");
        // Its session sends Hello in a data record...
        let hello = graft_protocol::codec::encode_frame(&hello()).unwrap();
        let mut record = vec![0u8];
        record.extend_from_slice(&(hello.len() as u32).to_be_bytes());
        record.extend_from_slice(&hello);
        old.write_all(&record).unwrap();
        let mut rest = Vec::new();
        let _ = old.read_to_end(&mut rest);
        rest
    });
    // ... and reads one data record back: a Hello rejection.
    let record = &answer[..];
    assert_eq!(record[0], 0, "a data record");
    let len = u32::from_be_bytes(record[1..5].try_into().unwrap()) as usize;
    let reply: AgentMessage =
        graft_protocol::codec::read_frame(&mut &record[5..5 + len]).expect("a frame");
    match reply {
        AgentMessage::Hello(HelloReply::Rejected { reason }) => {
            assert!(reason.contains("same release"), "{reason}");
            assert!(
                reason.contains(graft_protocol::PROTOCOL_VERSION),
                "{reason}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // The agent is still there for its real client; stop it.
    agent.proc.signal(Signal::SIGTERM);
    let out = agent.finish();
    assert_eq!(out.code(), Some(0), "{out}");
}

#[test]
fn graft_refuses_an_agent_whose_certificate_is_not_the_one_it_printed() {
    let bed = Bed::new();
    let agent = TcpAgent::start(&bed);
    let impostor_pin = graft_protocol::tls::AgentIdentity::generate()
        .unwrap()
        .fingerprint();
    let addr = agent.addr;
    let err = bed
        .in_target_netns(move || LinkClient::connect(addr, impostor_pin).err())
        .expect("the handshake fails");
    assert!(err.to_string().contains("something else answered"), "{err}");
    agent.proc.signal(Signal::SIGTERM);
    let _ = agent.finish();
}
