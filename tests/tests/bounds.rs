//! Issue 10, bounded resources: each test performs one attack from inside the
//! target's network namespace (or as a client of the agent) with real processes,
//! then checks that the agent's peak memory (`VmHWM` of `/proc/PID/status`)
//! stayed under [`RSS_LIMIT_KIB`] and that a real session still works.
//!
//! - idle raw connections (more than the agent lets handshake at once), half a
//!   TLS ClientHello, garbage and a TLS client with a wrong secret on the agent's
//!   loopback TCP port before the real client: they are closed (at once, or
//!   after the 5 s handshake timeout) and the client still gets in over TLS;
//! - 400 processes' worth of `SOCK_SEQPACKET` peers on the hub, each sending the
//!   largest messages the kernel lets it (30 with their send buffer raised to the
//!   kernel's cap) and holding its socket;
//! - a client that sends 300 one-MiB reads and reads no answer;
//! - 1100 idle connections to a stolen port while graft was started under
//!   `ulimit -n 1024`: graft and the agent raise their own limit, requests keep
//!   being served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use graft_protocol::codec::{encode_frame, read_frame};
use graft_protocol::link::{AgentMessage, ClientMessage, Hello, HelloReply};
use graft_protocol::remote::{OpenFlags, RemoteRequest, RemoteResponse};
use graft_tests::link::{LinkClient, link_cert};
use graft_tests::{Bed, Proc, STEAL_TIMEOUT, agent_bin, curl, graft_bin, python, wait_until};

const SECRET: &str = "bounds-secret-0123456789abcdef00";

/// The most memory the agent may have used at its peak in any of these attacks,
/// in KiB (the issue's bound: 64 MiB).
const RSS_LIMIT_KIB: u64 = 64 * 1024;

/// The peak resident set of `pid` in KiB (`VmHWM`, proc(5)).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("process {pid} is gone: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

/// The resident pages of `pid` that map files (`RssFile`, proc(5)): the agent's
/// own code and libraries, which no attack can make grow beyond their size.
fn rss_file_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("process {pid} is gone: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssFile:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Checks the agent's peak memory without its mapped code: `VmHWM` less the
/// file pages resident now (a debug build's code alone is tens of MiB and
/// grows with every feature; what an attack can grow is anonymous memory).
fn assert_peak_under_limit(pid: u32, attack: &str) {
    let peak = peak_rss_kib(pid).saturating_sub(rss_file_kib(pid));
    assert!(
        peak < RSS_LIMIT_KIB,
        "the agent peaked at {} MiB during {attack} (limit {} MiB)",
        peak / 1024,
        RSS_LIMIT_KIB / 1024
    );
}

/// Soft and hard `Max open files` of `pid` (`/proc/PID/limits`).
fn nofile(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_owned(), fields[4].to_owned())
}

/// An agent started by hand for the bed's target, and what it said `ready` with.
fn start_agent(bed: &Bed, listen: &str, dir: &tempfile::TempDir) -> (Proc, String) {
    let listen = listen.replace("{dir}", &dir.path().display().to_string());
    let mut command = Command::new(agent_bin());
    command
        .args(["--target-pid", &bed.target_pid.to_string()])
        .arg(format!("--listen={listen}"))
        .args(["--connect-timeout", "30"])
        .env("GRAFT_AGENT_SECRET", SECRET);
    let mut proc = bed.spawn(command, "graft-agent");
    let ready = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        if let Some(status) = proc.try_status() {
            panic!("graft-agent exited ({status})\n{}", proc.output_report());
        }
        proc.stdout()
            .lines()
            .find_map(|l| l.strip_prefix("ready ").map(str::to_owned))
    })
    .unwrap_or_else(|| panic!("graft-agent never said ready\n{}", proc.output_report()));
    (proc, ready)
}

/// Idle connections opened to the agent's TCP port: more than it lets
/// handshake at once (`tcp_link::MAX_PENDING`, 256).
const IDLE: usize = 300;

/// The first bytes of a TLS ClientHello (RFC 8446, 5.1 and 4.1.2): a handshake
/// record announcing 512 bytes, of which only the start is sent.
const HALF_CLIENT_HELLO: [u8; 11] = [
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
];

fn hello_message(secret: &str) -> ClientMessage {
    ClientMessage::Hello(Hello {
        version: graft_protocol::PROTOCOL_VERSION.into(),
        secret: secret.into(),
        client: "graft-tests bounds".into(),
    })
}

fn hello_frame(secret: &str) -> Vec<u8> {
    encode_frame(&hello_message(secret)).unwrap()
}

fn hello<S: Read + Write>(stream: &mut S, secret: &str) -> HelloReply {
    stream.write_all(&hello_frame(secret)).unwrap();
    match read_frame(stream).expect("the agent answers Hello") {
        AgentMessage::Hello(reply) => reply,
        other => panic!("expected a Hello reply, got {other:?}"),
    }
}

/// Sends one request and waits for its answer.
fn request<S: Read + Write>(stream: &mut S, id: u64, request: RemoteRequest) -> RemoteResponse {
    let message = ClientMessage::Request { id, request };
    stream.write_all(&encode_frame(&message).unwrap()).unwrap();
    loop {
        match read_frame(stream).expect("the agent answers the request") {
            AgentMessage::Response { id: got, response } if got == id => return response,
            _ => {}
        }
    }
}

/// Whether the other end closed `stream` (EOF or reset) within its read timeout.
fn closed_by_peer(mut stream: &TcpStream) -> bool {
    match stream.read(&mut [0u8; 16]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn idle_and_bogus_connections_to_the_agent_port_neither_keep_the_client_out_nor_end_the_agent() {
    let bed = Bed::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, ready) = start_agent(&bed, "tcp:127.0.0.1:0", &dir);
    let addr: SocketAddr = ready.strip_prefix("tcp:").unwrap().parse().unwrap();
    let pin = link_cert(&agent.stdout());
    let agent_pid = agent.pid();
    let hello_path = bed.remote("hello.txt");
    let expected = format!("hello from target {}", bed.n);
    let (wrong_attached, idle_closed, accepted, read, peak) = bed.in_target_netns(move || {
        let connect = || {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            s
        };
        // Garbage, half a TLS ClientHello, more idle connections than the
        // agent lets handshake at once (the ones beyond are closed at once),
        // and a TLS client with a wrong secret: all before the real client.
        let mut garbage = connect();
        garbage.write_all(&[0xff; 64]).unwrap();
        let mut half = connect();
        half.write_all(&HALF_CLIENT_HELLO).unwrap();
        let idle: Vec<TcpStream> = (0..IDLE).map(|_| connect()).collect();
        // The TLS clients retry, as graft's relink does, while the agent's
        // handshake slots are taken; they free within its 5 s timeout.
        let mut wrong = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
            LinkClient::connect(addr, pin).ok()
        })
        .expect("a TLS client never got a handshake slot");
        let wrong_attached = wrong.attach([1; 16], b"not-the-secret").is_ok();
        let mut client = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
            let mut link = LinkClient::connect(addr, pin).ok()?;
            link.attach([2; 16], SECRET.as_bytes()).ok()?;
            Some(link)
        })
        .expect("the real client never got in");
        client.send(&hello_message(SECRET)).unwrap();
        let accepted = client.receive().unwrap();
        // The session works.
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
            if let AgentMessage::Response { id: 1, response } =
                client.receive().expect("the agent answers the request")
            {
                break response;
            }
        };
        // The idle ones are closed by the agent (EOF or reset), not left open.
        let idle_closed = idle
            .into_iter()
            .chain([half, garbage])
            .filter(closed_by_peer)
            .count();
        // Read before the link closes: the agent then ends its session.
        let peak = peak_rss_kib(agent_pid);
        client.close().unwrap();
        (wrong_attached, idle_closed, accepted, read, peak)
    });
    assert!(!wrong_attached, "a wrong secret was accepted");
    assert!(
        matches!(accepted, AgentMessage::Hello(HelloReply::Accepted { .. })),
        "the real client was refused: {accepted:?}"
    );
    match read {
        RemoteResponse::File { data, .. } => {
            assert!(String::from_utf8_lossy(&data).contains(&expected))
        }
        other => panic!("the session could not read a file: {other:?}"),
    }
    assert_eq!(idle_closed, IDLE + 2, "idle connections stayed open");
    assert!(
        peak < RSS_LIMIT_KIB,
        "the agent peaked at {} MiB during idle and bogus connections to its port",
        peak / 1024
    );
    let out = agent.wait_timeout(Duration::from_secs(10));
    assert!(
        out.is_some_and(|s| s.code() == Some(0)),
        "the agent did not end its session normally: {out:?}\n{}",
        agent.output_report()
    );
    let report = agent.output_report();
    for said in [
        "its attach did not carry the session secret",
        "it did not authenticate within 5 s",
        "it is no graft link",
        "connections to the link's port are in their handshake",
    ] {
        assert!(
            report.contains(said),
            "the agent never logged {said:?}:\n{report}"
        );
    }
}

/// Connects `PEERS` `SOCK_SEQPACKET` sockets to the hub of the namespace it
/// runs in (`@graft-hub-1-...`, found in `/proc/self/net/unix`), all before any
/// sends, so the hub has a read pending on each. The first `BIG` raise their send
/// buffer as far as the kernel lets them (`SO_SNDBUF`, capped by
/// `net.core.wmem_max`) and send the largest message it then accepts; every
/// other peer sends a `Challenge` padded to the largest message its default
/// buffer allows, so the hub reads it, answers, and waits for the next message.
/// Then each peer keeps sending such messages until the kernel refuses, holds
/// its socket `HOLD` seconds, and the script prints what was sent.
const HUB_FLOOD: &str = r#"
import errno, os, socket, sys, time
peers, big, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
names = set()
for line in open('/proc/self/net/unix'):
    f = line.split()
    if len(f) >= 8 and f[-1].startswith('@graft-hub-1-'):
        names.add(f[-1][1:])
if not names:
    print('no hub', flush=True); sys.exit(3)
name = sorted(names)[0]
socks = []
for i in range(peers):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if i < big:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 30)
    s.connect('\0' + name)
    s.setblocking(False)
    socks.append(s)
def largest(s, start):
    # The kernel refuses a packet above its send buffer (EMSGSIZE) or one it
    # cannot allocate at once (ENOBUFS, ENOMEM): step down until one goes.
    size = start
    while size > 64:
        try:
            s.send(b'\0' + os.urandom(32) + b'\1' * (size - 33))
            return size
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS, errno.ENOMEM):
                return 0
            size -= size // 16
    return 0
sizes, total, sent = {}, 0, 0
for s in socks:
    buf = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    size = largest(s, sizes.get(buf, buf))
    if size:
        sizes[buf] = size
        total += size
        sent += 1
for s in socks[:big]:
    size = sizes[s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)]
    try:
        while True:
            s.send(b'\1' * size)
            total += size
            sent += 1
    except OSError:
        pass
print('sent', sent, 'messages,', total, 'bytes; largest', max(sizes.values()), flush=True)
time.sleep(hold)
"#;

#[test]
fn hub_peers_announcing_huge_frames_cost_the_agent_little() {
    let bed = Bed::new();
    let url = bed.target_url(bed.app_port);
    let (session, _) = bed.steal(&[], bed.app_port, &url);
    let agents = bed.agent_pids();
    assert!(!agents.is_empty(), "no agent runs");
    let mut command = Command::new("nsenter");
    command
        .args(["-t", &bed.target_pid.to_string(), "-n", "--"])
        .args([python(), "-c", HUB_FLOOD, "400", "30", "6"]);
    let out = bed.finish(bed.spawn(command, "hub flood"), Duration::from_secs(120));
    assert!(out.stdout.contains("sent"), "the flood did not run:\n{out}");
    eprintln!("hub flood: {}", out.stdout.trim());
    for pid in bed.agent_pids() {
        eprintln!("agent {pid} peaked at {} KiB", peak_rss_kib(pid));
        assert_peak_under_limit(pid, "the hub flood");
    }
    assert!(
        curl(&url).is_ok_and(|r| r.starts_with("local")),
        "the steal broke after the hub flood\n{}",
        session.output_report()
    );
}

#[test]
fn a_client_that_reads_no_answer_stops_being_read() {
    let bed = Bed::new();
    let dir = tempfile::tempdir().unwrap();
    let (agent, ready) = start_agent(&bed, "unix:{dir}/agent.sock", &dir);
    let path = ready.strip_prefix("unix:").unwrap();
    let mut link = UnixStream::connect(path).unwrap();
    link.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert!(matches!(
        hello(&mut link, SECRET),
        HelloReply::Accepted { .. }
    ));
    let RemoteResponse::Opened { handle, .. } = request(
        &mut link,
        1,
        RemoteRequest::Open {
            path: bed.remote("big.bin"),
            flags: OpenFlags::READ,
            mode: 0,
        },
    ) else {
        panic!("big.bin did not open");
    };
    // 300 reads of 1 MiB each, written by a thread that blocks once the agent
    // stops reading; nobody reads the answers for a while.
    const READS: u64 = 300;
    let mut writer = link.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for id in 2..2 + READS {
            let read = ClientMessage::Request {
                id,
                request: RemoteRequest::Read {
                    handle,
                    offset: 0,
                    len: 1 << 20,
                },
            };
            writer.write_all(&encode_frame(&read).unwrap()).unwrap();
        }
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_peak_under_limit(agent.pid(), "a client that reads nothing");
    // The session is intact: reading now gets every answer, in full.
    let mut answered = 0;
    while answered < READS {
        match read_frame(&mut link).expect("the agent answers") {
            AgentMessage::Response {
                response: RemoteResponse::Data(bytes),
                ..
            } => {
                assert_eq!(bytes.len(), 1 << 20);
                answered += 1;
            }
            AgentMessage::Response { response, .. } => panic!("a read failed: {response:?}"),
            _ => {}
        }
    }
    sender.join().unwrap();
    assert_peak_under_limit(agent.pid(), "a client that reads nothing");
}

/// An HTTP app for `--steal` that raises its own descriptor limit (as servers
/// do) and answers every request with `local`; asyncio, so idle connections cost
/// no threads.
const ROOMY_APP: &str = r#"
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nlocal\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[1]), backlog=4096)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"#;

#[test]
fn idle_connections_beyond_ulimit_1024_do_not_stop_a_steal() {
    let bed = Bed::new();
    let url = bed.target_url(bed.app_port);
    let target = format!("pid:{}", bed.target_pid);
    let port = bed.app_port.to_string();
    let mut command = Command::new("sh");
    command
        .args(["-c", "ulimit -Sn 1024 && exec \"$@\"", "sh"])
        .arg(graft_bin())
        .args(["run", "--target", &target, "--steal", "--"])
        .args([python(), "-c", ROOMY_APP, &port])
        .current_dir(graft_tests::package_dir());
    let mut session = bed.spawn(command, "graft run --steal under ulimit -n 1024");
    wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!("graft exited ({status})\n{}", session.output_report());
        }
        curl(&url).ok().filter(|b| b.starts_with("local"))
    })
    .unwrap_or_else(|| panic!("the steal never took effect\n{}", session.output_report()));
    // graft and its agent run with their hard limit, not the 1024 they got.
    let graft = session.pid();
    let agents = bed.agent_pids();
    for pid in std::iter::once(graft).chain(agents.iter().copied()) {
        let (soft, hard) = nofile(pid);
        assert_eq!(soft, hard, "process {pid} kept its soft limit");
    }

    let addr = SocketAddr::from((bed.target_v4, bed.app_port));
    let idle: Vec<TcpStream> = (0..1100)
        .map(|i| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("idle connection {i}: {e}"))
        })
        .collect();
    for i in 0..5 {
        let reply = curl(&url);
        assert!(
            reply.as_deref().is_ok_and(|r| r.starts_with("local")),
            "request {i} with {} idle connections: {reply:?}\n{}",
            idle.len(),
            session.output_report()
        );
    }
    for pid in agents {
        assert_peak_under_limit(pid, "1100 idle connections");
    }
    drop(idle);
}
