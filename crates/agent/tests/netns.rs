//! The agent against real processes: a Python HTTP server in a network namespace
//! made for the test, the built `graft-agent` entering it, and this test acting as
//! the client over the agent's Unix socket.
//!
//! Needs root, `ip`, `iptables`, `curl` and `python3`; without them every test
//! prints why and passes. Each test gets its own namespace (`ga-<pid>-<n>`), veth
//! pair and /30 out of 198.18.250.0/24, removed by a guard even when the test
//! fails, so the tests run in parallel with each other and with other suites.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use graft_protocol::codec::FrameCodec;
use graft_protocol::incoming::{IncomingMode, Subscription};
use graft_protocol::link::{AgentMessage, ClientMessage, Hello, HelloReply};
use graft_protocol::remote::{AddressFamily, OpenFlags, RemoteRequest, RemoteResponse};
use graft_protocol::{ConnectionId, PROTOCOL_VERSION, Transport};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

type Link = Framed<UnixStream, FrameCodec<AgentMessage, ClientMessage>>;

const SECRET: &str = "test-secret-7f3a";
const HTTP_PORT: u16 = 8080;

const DNS_SERVER: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("listening", flush=True)
while True:
    q, peer = s.recvfrom(512)
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode()); i += 1 + q[i]
    qtype, = struct.unpack("!H", q[i + 1:i + 3])
    question = q[12:i + 5]
    name = ".".join(labels).lower()
    if name != "api.corp.test":
        flags, answers = 0x8183, b""
    elif qtype == 1:
        flags = 0x8180
        answers = bytes([0xC0, 0x0C]) + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([198, 18, 250, 99])
    else:
        flags, answers = 0x8180, b""
    header = q[:2] + struct.pack("!HHHHH", flags, 1, 1 if answers else 0, 0, 0)
    s.sendto(header + question + answers, peer)
"#;

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn must(program: &str, args: &[&str]) {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why this machine cannot run the tests, if it cannot.
fn unsupported() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root".into());
    }
    for program in ["ip", "iptables", "iptables-save", "curl", "python3"] {
        if !have(program) {
            return Some(format!("{program} is not installed"));
        }
    }
    None
}

macro_rules! require_support {
    () => {
        if let Some(why) = unsupported() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// The real Python interpreter (not a pyenv shim), so the server's PID is stable.
fn python() -> String {
    let out = run("python3", &["-c", "import sys; print(sys.executable)"]);
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A network namespace with a veth pair to the host; removed on drop.
struct Netns {
    name: String,
    veth: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
    dir: PathBuf,
}

impl Netns {
    /// Namespace number `n` (1..=30) of this test process.
    fn new(n: u8) -> Netns {
        assert!((1..=30).contains(&n));
        let pid = std::process::id();
        let name = format!("ga-{pid}-{n}");
        let veth = format!("ga{pid}h{n}");
        let peer = format!("ga{pid}n{n}");
        let host_ip = Ipv4Addr::new(198, 18, 250, 8 * n + 1);
        let ns_ip = Ipv4Addr::new(198, 18, 250, 8 * n + 2);
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Keep stray test traffic to 198.18.0.0/15 on this machine.
        let routes = run("ip", &["route", "show", "198.18.0.0/15"]);
        if !String::from_utf8_lossy(&routes.stdout).contains("unreachable") {
            let _ = run("ip", &["route", "add", "unreachable", "198.18.0.0/15"]);
        }
        let ns = Netns {
            name: name.clone(),
            veth: veth.clone(),
            host_ip,
            ns_ip,
            dir,
        };
        must("ip", &["netns", "add", &name]);
        must(
            "ip",
            &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
        );
        must("ip", &["link", "set", &peer, "netns", &name]);
        must(
            "ip",
            &["addr", "add", &format!("{host_ip}/30"), "dev", &veth],
        );
        must("ip", &["link", "set", &veth, "up"]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &peer]);
        ns.exec_ok(&["ip", "link", "set", &peer, "up"]);
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, argv: &[&str]) -> Output {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(argv);
        run("ip", &args)
    }

    fn exec_ok(&self, argv: &[&str]) {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "{argv:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The nat rules of both families in the namespace, and its nf_tables
    /// ruleset (where the agent's owner table lives).
    fn nat_rules(&self) -> String {
        let mut all = String::new();
        for save in ["iptables-save", "ip6tables-save"] {
            let out = self.exec(&[save, "-t", "nat"]);
            all.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        if have("nft") {
            let out = self.exec(&["nft", "list", "ruleset"]);
            all.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        all
    }

    fn has_graft_rules(&self) -> bool {
        self.nat_rules().contains("GRAFT-")
    }

    /// Starts the HTTP server (serving `self.dir`) in the namespace.
    fn start_server(&self, marker: &str) -> Server {
        let marker = format!("GRAFT_TEST_MARKER={marker}");
        let port = HTTP_PORT.to_string();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "env", &marker])
            .args([&python(), "-m", "http.server", &port, "--bind", "0.0.0.0"])
            .arg("--directory")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Server { child };
        let addr = SocketAddr::from((self.ns_ip, HTTP_PORT));
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "the HTTP server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// Files that `ip netns exec` bind-mounts over `/etc/NAME` for processes it
    /// starts in this namespace: the target gets its own `/etc/resolv.conf`, say.
    fn etc_file(&self, name: &str, contents: &str) {
        let dir = Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), contents).unwrap();
    }

    /// Starts a tiny DNS server on the namespace's address, port 53: `A` queries for
    /// `api.corp.test` get 198.18.250.99, others NXDOMAIN; `AAAA` gets no
    /// records.
    fn start_dns(&self) -> Server {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, &python(), "-c", DNS_SERVER])
            .arg(self.ns_ip.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = Server { child };
        let mut line = String::new();
        BufReader::new(server.child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}:{HTTP_PORT}{path}", self.ns_ip)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
        let _ = run("ip", &["link", "del", &self.veth]);
        let _ = run("ip", &["netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A target process; killed on drop.
struct Server {
    child: Child,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running agent; killed on drop, its log printed when the test fails.
struct Agent {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, target_pid: u32, tag: &str) -> Agent {
        let pid = target_pid.to_string();
        Agent::start_with(
            dir,
            &["--target-pid", &pid],
            ("GRAFT_AGENT_SECRET", SECRET),
            tag,
        )
    }

    /// Starts an agent with `target` arguments and the secret variable `secret`.
    fn start_with(dir: &Path, target: &[&str], secret: (&str, &str), tag: &str) -> Agent {
        let socket = dir.join(format!("agent-{tag}.sock"));
        let log = dir.join(format!("agent-{tag}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_graft-agent"))
            .args(target)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(["--log-level", "debug", "--connect-timeout", "20"])
            .env(secret.0, secret.1)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let agent = Agent { child, socket, log };
        assert_eq!(
            line.trim_end(),
            format!("ready unix:{}", agent.socket.display()),
            "agent log:\n{}",
            agent.log_text()
        );
        agent
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn connect(&self) -> Link {
        let stream = UnixStream::connect(&self.socket).await.unwrap();
        Framed::new(stream, FrameCodec::new())
    }

    /// Waits for the agent to exit; its exit code.
    fn wait_exit(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {within:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}", self.log_text());
        }
    }
}

async fn recv(link: &mut Link) -> AgentMessage {
    tokio::time::timeout(Duration::from_secs(15), link.next())
        .await
        .expect("no message from the agent within 15 s")
        .expect("the agent closed the link")
        .expect("bad frame from the agent")
}

async fn hello(link: &mut Link, secret: &str) -> HelloReply {
    link.send(ClientMessage::Hello(Hello {
        version: PROTOCOL_VERSION.into(),
        secret: secret.into(),
        client: "test@netns".into(),
    }))
    .await
    .unwrap();
    match recv(link).await {
        AgentMessage::Hello(reply) => reply,
        other => panic!("expected Hello, got {other:?}"),
    }
}

async fn request(link: &mut Link, id: u64, request: RemoteRequest) -> RemoteResponse {
    link.send(ClientMessage::Request { id, request })
        .await
        .unwrap();
    match recv(link).await {
        AgentMessage::Response { id: got, response } if got == id => response,
        other => panic!("expected response {id}, got {other:?}"),
    }
}

fn poll_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn curl(url: &str) -> String {
    let out = run("curl", &["-s", "--max-time", "5", url]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_env_files_dns_and_outgoing() {
    require_support!();
    let ns = Netns::new(1);
    std::fs::write(
        ns.dir.join("index-marker.txt"),
        "served from the namespace\n",
    )
    .unwrap();
    let server = ns.start_server("m-1234");

    // A wrong secret is refused, and that agent exits.
    let mut refused = Agent::start(&ns.dir, server.pid(), "refused");
    let mut link = refused.connect().await;
    match hello(&mut link, "not-the-secret").await {
        HelloReply::Rejected { reason } => assert!(reason.contains("secret"), "{reason}"),
        other => panic!("wrong secret accepted: {other:?}"),
    }
    assert!(
        link.next().await.is_none(),
        "link stays open after Rejected"
    );
    assert_eq!(refused.wait_exit(Duration::from_secs(2)), 6);

    let mut agent = Agent::start(&ns.dir, server.pid(), "main");
    let mut link = agent.connect().await;
    assert_eq!(
        hello(&mut link, SECRET).await,
        HelloReply::Accepted {
            version: PROTOCOL_VERSION.into(),
            target_pid: server.pid()
        }
    );
    link.send(ClientMessage::Ping(42)).await.unwrap();
    assert_eq!(recv(&mut link).await, AgentMessage::Pong(42));

    // The target's environment.
    let RemoteResponse::Env(env) = request(&mut link, 1, RemoteRequest::Env).await else {
        panic!("no environment")
    };
    assert!(
        env.contains(&("GRAFT_TEST_MARKER".into(), "m-1234".into())),
        "{env:?}"
    );

    // A file, through the target's root.
    let path = ns.dir.join("index-marker.txt");
    let response = request(
        &mut link,
        2,
        RemoteRequest::Open {
            path: path.display().to_string(),
            flags: OpenFlags::READ,
            mode: 0,
        },
    )
    .await;
    let RemoteResponse::Opened { handle, stat } = response else {
        panic!("open failed: {response:?}")
    };
    assert_eq!(stat.size, 26);
    assert_eq!(
        request(
            &mut link,
            3,
            RemoteRequest::Read {
                handle,
                offset: 7,
                len: 100
            }
        )
        .await,
        RemoteResponse::Data(b"from the namespace\n".to_vec())
    );
    assert_eq!(
        request(&mut link, 4, RemoteRequest::Close { handle }).await,
        RemoteResponse::Done
    );
    assert_eq!(
        request(
            &mut link,
            5,
            RemoteRequest::Stat {
                path: "/no/such/file".into(),
                follow: true
            }
        )
        .await,
        RemoteResponse::Error(graft_protocol::remote::RemoteError::Os(libc::ENOENT))
    );

    // Names from the target's /etc/hosts.
    match request(
        &mut link,
        6,
        RemoteRequest::Resolve {
            host: "localhost".into(),
            family: AddressFamily::V4,
        },
    )
    .await
    {
        RemoteResponse::Resolved { addrs, .. } => {
            assert!(
                addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
                "{addrs:?}"
            )
        }
        other => panic!("localhost did not resolve: {other:?}"),
    }

    // An outgoing connection from the namespace: its loopback has the server.
    let conn = ConnectionId(1);
    link.send(ClientMessage::Connect {
        conn,
        remote: SocketAddr::from((Ipv4Addr::LOCALHOST, HTTP_PORT)),
        transport: Transport::Tcp,
    })
    .await
    .unwrap();
    match recv(&mut link).await {
        AgentMessage::Connected { conn: c, local } => {
            assert_eq!(c, conn);
            assert_eq!(local.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        other => panic!("expected Connected, got {other:?}"),
    }
    link.send(ClientMessage::Data {
        conn,
        bytes: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
    })
    .await
    .unwrap();
    link.send(ClientMessage::Shutdown { conn }).await.unwrap();
    let mut body = Vec::new();
    loop {
        match recv(&mut link).await {
            AgentMessage::Data { conn: c, bytes } if c == conn => body.extend(bytes),
            AgentMessage::Shutdown { conn: c } if c == conn => {}
            AgentMessage::Close { conn: c, reset } if c == conn => {
                assert!(!reset);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(body.contains("index-marker.txt"), "{body}");

    // A refused connection reports the errno.
    link.send(ClientMessage::Connect {
        conn: ConnectionId(2),
        remote: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)),
        transport: Transport::Tcp,
    })
    .await
    .unwrap();
    assert_eq!(
        recv(&mut link).await,
        AgentMessage::ConnectFailed {
            conn: ConnectionId(2),
            errno: libc::ECONNREFUSED
        }
    );

    drop(link);
    assert_eq!(agent.wait_exit(Duration::from_secs(2)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steal_delivers_curl_to_the_client_and_rules_go_with_the_link() {
    require_support!();
    let ns = Netns::new(2);
    let server = ns.start_server("steal");
    assert!(curl(&ns.url("/")).contains("Directory listing"));
    let mut agent = Agent::start(&ns.dir, server.pid(), "steal");
    let mut link = agent.connect().await;
    assert!(matches!(
        hello(&mut link, SECRET).await,
        HelloReply::Accepted { .. }
    ));

    link.send(ClientMessage::Subscribe(Subscription {
        port: HTTP_PORT,
        mode: IncomingMode::Steal,
        filter: None,
        responses: false,
    }))
    .await
    .unwrap();
    assert_eq!(
        recv(&mut link).await,
        AgentMessage::SubscribeResult {
            port: HTTP_PORT,
            error: None
        }
    );
    assert!(ns.has_graft_rules(), "{}", ns.nat_rules());

    let url = ns.url("/stolen");
    let curl_task = tokio::task::spawn_blocking(move || curl(&url));
    let conn = match recv(&mut link).await {
        AgentMessage::Incoming {
            conn,
            port,
            peer,
            local,
        } => {
            assert!(conn.is_from_agent());
            assert_eq!(port, HTTP_PORT);
            assert_eq!(peer.ip(), IpAddr::V4(ns.host_ip));
            assert_eq!(local, SocketAddr::from((ns.ns_ip, HTTP_PORT)));
            conn
        }
        other => panic!("expected Incoming, got {other:?}"),
    };
    match recv(&mut link).await {
        AgentMessage::Data { conn: c, bytes } => {
            assert_eq!(c, conn);
            let request = String::from_utf8_lossy(&bytes);
            assert!(request.starts_with("GET /stolen HTTP/1.1"), "{request}");
        }
        other => panic!("expected the request, got {other:?}"),
    }
    link.send(ClientMessage::Data {
        conn,
        bytes: b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nstolen-hello"
            .to_vec(),
    })
    .await
    .unwrap();
    link.send(ClientMessage::Shutdown { conn }).await.unwrap();
    assert_eq!(curl_task.await.unwrap(), "stolen-hello");
    loop {
        match recv(&mut link).await {
            AgentMessage::Shutdown { conn: c } if c == conn => {}
            AgentMessage::Close { conn: c, reset } if c == conn => {
                assert!(!reset);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    // Unsteal: the server answers again.
    link.send(ClientMessage::Unsubscribe { port: HTTP_PORT })
        .await
        .unwrap();
    assert!(
        poll_until(Duration::from_secs(5), || curl(&ns.url("/"))
            .contains("Directory listing")),
        "the server is not reachable after Unsteal"
    );

    // Steal again, then drop the link: rules go, the server answers, the agent exits.
    link.send(ClientMessage::Subscribe(Subscription {
        port: HTTP_PORT,
        mode: IncomingMode::Steal,
        filter: None,
        responses: false,
    }))
    .await
    .unwrap();
    assert!(matches!(
        recv(&mut link).await,
        AgentMessage::SubscribeResult { error: None, .. }
    ));
    drop(link);
    let dropped = Instant::now();
    assert_eq!(agent.wait_exit(Duration::from_secs(2)), 0);
    assert!(
        poll_until(
            Duration::from_secs(2).saturating_sub(dropped.elapsed()),
            || !ns.has_graft_rules()
        ),
        "rules left behind:\n{}",
        ns.nat_rules()
    );
    assert!(curl(&ns.url("/")).contains("Directory listing"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_removes_rules_after_kill_9() {
    require_support!();
    let ns = Netns::new(3);
    let server = ns.start_server("watchdog");
    let mut agent = Agent::start(&ns.dir, server.pid(), "kill");
    let mut link = agent.connect().await;
    assert!(matches!(
        hello(&mut link, SECRET).await,
        HelloReply::Accepted { .. }
    ));
    link.send(ClientMessage::Subscribe(Subscription {
        port: HTTP_PORT,
        mode: IncomingMode::Steal,
        filter: None,
        responses: false,
    }))
    .await
    .unwrap();
    assert_eq!(
        recv(&mut link).await,
        AgentMessage::SubscribeResult {
            port: HTTP_PORT,
            error: None
        }
    );
    assert!(ns.has_graft_rules());

    agent.child.kill().unwrap(); // SIGKILL: no cleanup by the agent itself
    agent.child.wait().unwrap();
    assert!(
        poll_until(Duration::from_secs(2), || !ns.has_graft_rules()),
        "the watchdog left rules behind:\n{}",
        ns.nat_rules()
    );
    assert!(curl(&ns.url("/")).contains("Directory listing"));
}

/// These need no namespace: the target is a plain process and nothing is stolen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_exit_is_fatal_and_garbage_ends_the_session() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: not root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();

    let mut target = Command::new("sleep").arg("60").spawn().unwrap();
    let mut agent = Agent::start(dir.path(), target.id(), "exit");
    let mut link = agent.connect().await;
    assert!(matches!(
        hello(&mut link, SECRET).await,
        HelloReply::Accepted { .. }
    ));
    target.kill().unwrap();
    assert_eq!(
        recv(&mut link).await,
        AgentMessage::Fatal {
            message: format!("target process {} exited", target.id())
        }
    );
    target.wait().unwrap();
    assert_eq!(agent.wait_exit(Duration::from_secs(2)), 0);

    // A frame that is not a message: Fatal, then the agent exits.
    let target = Server {
        child: Command::new("sleep").arg("60").spawn().unwrap(),
    };
    let mut agent = Agent::start(dir.path(), target.pid(), "garbage");
    let mut stream = UnixStream::connect(&agent.socket).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, &[0, 0, 0, 2, 0xff, 0xff])
        .await
        .unwrap();
    let mut link: Link = Framed::new(stream, FrameCodec::new());
    assert!(matches!(recv(&mut link).await, AgentMessage::Fatal { .. }));
    assert_eq!(agent.wait_exit(Duration::from_secs(2)), 6);

    // No target at all.
    let out = Command::new(env!("CARGO_BIN_EXE_graft-agent"))
        .args([
            "--target-pid",
            "999999999",
            "--listen",
            "unix:/tmp/none.sock",
        ])
        .env("GRAFT_AGENT_SECRET", SECRET)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolve_with_the_targets_resolv_conf_and_hosts() {
    require_support!();
    let ns = Netns::new(5);
    ns.etc_file(
        "resolv.conf",
        &format!(
            "nameserver {}\nsearch corp.test\noptions timeout:1 attempts:1\n",
            ns.ns_ip
        ),
    );
    ns.etc_file("hosts", "198.18.250.77 only-in-target\n");
    let _dns = ns.start_dns();
    let server = ns.start_server("dns");
    let mut agent = Agent::start(&ns.dir, server.pid(), "dns");
    let mut link = agent.connect().await;
    assert!(matches!(
        hello(&mut link, SECRET).await,
        HelloReply::Accepted { .. }
    ));
    let mut resolve = async |id, host: &str, family| {
        let resolve = RemoteRequest::Resolve {
            host: host.into(),
            family,
        };
        request(&mut link, id, resolve).await
    };
    // The target's hosts file, not this machine's.
    assert_eq!(
        resolve(1, "only-in-target", AddressFamily::Any).await,
        RemoteResponse::Resolved {
            addrs: vec!["198.18.250.77".parse().unwrap()],
            canonical: Some("only-in-target".into())
        }
    );
    // The target's name server and search list.
    assert_eq!(
        resolve(2, "api", AddressFamily::V4).await,
        RemoteResponse::Resolved {
            addrs: vec!["198.18.250.99".parse().unwrap()],
            canonical: Some("api.corp.test".into())
        }
    );
    assert_eq!(
        resolve(3, "api.corp.test", AddressFamily::Any).await,
        RemoteResponse::Resolved {
            addrs: vec!["198.18.250.99".parse().unwrap()],
            canonical: Some("api.corp.test".into())
        }
    );
    assert_eq!(
        resolve(4, "missing.example", AddressFamily::V4).await,
        RemoteResponse::Error(graft_protocol::remote::RemoteError::NoName)
    );
    drop(link);
    assert_eq!(agent.wait_exit(Duration::from_secs(2)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_removes_rules_and_exits_zero() {
    require_support!();
    let ns = Netns::new(6);
    let server = ns.start_server("sigterm");
    let mut agent = Agent::start(&ns.dir, server.pid(), "term");
    let mut link = agent.connect().await;
    assert!(matches!(
        hello(&mut link, SECRET).await,
        HelloReply::Accepted { .. }
    ));
    link.send(ClientMessage::Subscribe(Subscription {
        port: HTTP_PORT,
        mode: IncomingMode::Steal,
        filter: None,
        responses: false,
    }))
    .await
    .unwrap();
    assert!(matches!(
        recv(&mut link).await,
        AgentMessage::SubscribeResult { error: None, .. }
    ));
    // An open stolen connection is reset when the agent stops.
    let mut held = TcpStream::connect((ns.ns_ip, HTTP_PORT)).unwrap();
    assert!(matches!(
        recv(&mut link).await,
        AgentMessage::Incoming { .. }
    ));
    let pid = rustix::process::Pid::from_raw(agent.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert_eq!(agent.wait_exit(Duration::from_secs(2)), 0);
    assert!(!ns.has_graft_rules(), "{}", ns.nat_rules());
    held.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 1];
    let err = std::io::Read::read(&mut held, &mut buf).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(curl(&ns.url("/")).contains("Directory listing"));
}

/// The cgroup v2 mount point (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a
/// hybrid hierarchy), from `/proc/self/mountinfo`.
fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if !right.starts_with("cgroup2 ") {
            return None;
        }
        left.split(' ').nth(4).map(PathBuf::from)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_mode_finds_the_target_by_container_id_and_checks_a_secret_digest() {
    require_support!();
    let Some(cgroups) = cgroup2_root() else {
        eprintln!("SKIPPED: no cgroup v2 hierarchy mounted");
        return;
    };
    let ns = Netns::new(7);
    let server = ns.start_server("node");
    // A container's cgroup as containerd names it; the server is its process.
    let id = format!("{:064x}", u128::from(std::process::id()) << 64 | 0x9a7f);
    let group = cgroups.join(format!("graft-test-cri-containerd-{id}.scope"));
    std::fs::create_dir_all(&group).unwrap();
    /// Moves the process back to the root cgroup and removes the test's.
    struct Remove(PathBuf, PathBuf, u32);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::write(self.1.join("cgroup.procs"), self.2.to_string());
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _remove = Remove(group.clone(), cgroups.clone(), server.pid());
    std::fs::write(group.join("cgroup.procs"), server.pid().to_string()).unwrap();

    // The agent is given only the secret's SHA-256, as a pod spec carries it.
    let digest = {
        let out = Command::new("sh")
            .args(["-c", &format!("printf %s {SECRET} | sha256sum")])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()[..64].to_owned()
    };
    let container = format!("containerd://{id}");
    let mut agent = Agent::start_with(
        &ns.dir,
        &["--target-container-id", &container],
        ("GRAFT_AGENT_SECRET_SHA256", &digest),
        "node",
    );
    // A wrong secret is refused...
    let mut link = agent.connect().await;
    assert!(matches!(
        hello(&mut link, "not-the-secret").await,
        HelloReply::Rejected { .. }
    ));
    assert_eq!(agent.wait_exit(Duration::from_secs(2)), 6);

    let mut agent = Agent::start_with(
        &ns.dir,
        &["--target-container-id", &container],
        ("GRAFT_AGENT_SECRET_SHA256", &digest),
        "node2",
    );
    let mut link = agent.connect().await;
    match hello(&mut link, SECRET).await {
        HelloReply::Accepted { target_pid, .. } => assert_eq!(target_pid, server.pid()),
        other => panic!("refused: {other:?}\n{}", agent.log_text()),
    }
    drop(link);
    assert_eq!(agent.wait_exit(Duration::from_secs(5)), 0);

    // An ID no process has: exit code 3 with a message.
    let out = Command::new(env!("CARGO_BIN_EXE_graft-agent"))
        .args([
            "--target-container-id",
            &"e".repeat(64),
            "--listen",
            "unix:/tmp/none.sock",
        ])
        .env("GRAFT_AGENT_SECRET_SHA256", &digest)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no process of container"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_sends_no_more_than_the_clients_credit() {
    require_support!();
    let ns = Netns::new(8);
    // 8 MiB the target's server will send as fast as it can.
    std::fs::write(ns.dir.join("big.bin"), vec![7u8; 8 << 20]).unwrap();
    let server = ns.start_server("credit");
    let mut agent = Agent::start(&ns.dir, server.pid(), "credit");
    let mut link = agent.connect().await;
    assert!(matches!(
        hello(&mut link, SECRET).await,
        HelloReply::Accepted { .. }
    ));
    let conn = ConnectionId(1);
    link.send(ClientMessage::Connect {
        conn,
        remote: SocketAddr::from((Ipv4Addr::LOCALHOST, HTTP_PORT)),
        transport: Transport::Tcp,
    })
    .await
    .unwrap();
    assert!(matches!(
        recv(&mut link).await,
        AgentMessage::Connected { .. }
    ));
    link.send(ClientMessage::Data {
        conn,
        bytes: b"GET /big.bin HTTP/1.0\r\n\r\n".to_vec(),
    })
    .await
    .unwrap();

    // Without credit the agent stops at the window...
    let window = graft_protocol::link::TCP_WINDOW as usize;
    let mut received = 0usize;
    let first = drain_data(&mut link, conn).await;
    received += first;
    assert!(
        first > 0 && received <= window,
        "{received} bytes arrived without credit; the window is {window}"
    );
    // ...and goes on by what the client gives back.
    link.send(ClientMessage::Credit {
        conn,
        bytes: 1 << 20,
    })
    .await
    .unwrap();
    let more = drain_data(&mut link, conn).await;
    received += more;
    assert!(
        more > 0 && received <= window + (1 << 20),
        "{more} more bytes after 1 MiB of credit ({received} in all)"
    );
    drop(link);
    assert_eq!(agent.wait_exit(Duration::from_secs(5)), 0);
}

/// Counts the `Data` bytes of `conn` that arrive until the link is quiet for
/// 700 ms.
async fn drain_data(link: &mut Link, conn: ConnectionId) -> usize {
    let mut got = 0;
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(700), link.next()).await
    {
        if let AgentMessage::Data { conn: c, bytes } = message {
            assert_eq!(c, conn);
            got += bytes.len();
        }
    }
    got
}
