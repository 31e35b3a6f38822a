//! Sockets passed as descriptors for a local target (issue 13): outgoing TCP and
//! whole stolen connections, the relayed fallbacks, and the attacks on that path.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use graft_protocol::codec::{encode_frame, read_frame};
use graft_protocol::fdpass::FdReader;
use graft_protocol::incoming::{IncomingMode, Subscription};
use graft_protocol::layer::{LayerRequest, LayerResponse};
use graft_protocol::link::{AgentMessage, ClientMessage, Hello, HelloReply};
use graft_protocol::remote::{RemoteError, RemoteRequest, RemoteResponse};
use graft_protocol::version::{FEATURE_FDS, has_feature, version_with};
use graft_tests::logged::{accepted_direct, layer_log_path, run_logged};
use graft_tests::{
    Bed, Outcome, Proc, RUN_TIMEOUT, agent_bin, curl, fixture_str, python, wait_until,
};

fn json(out: &Outcome) -> serde_json::Value {
    serde_json::from_str(out.assert_success().out())
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

fn script() -> String {
    fixture_str("sockfd.py")
}

/// `graft run -- sockfd.py MODE SERVICE 80 EXTRA...` against the bed's service
/// with `env`, logged ([`run_logged`]): its outcome and the layer's log.
fn sockfd_to_service(
    bed: &Bed,
    env: &[(&str, &str)],
    mode: &str,
    extra: &[&str],
) -> (Outcome, String) {
    let service = bed.service_v4.to_string();
    let script = script();
    let mut cmd = vec![python(), &script, mode, &service, "80"];
    cmd.extend_from_slice(extra);
    run_logged(bed, env, &[], &cmd)
}

/// Whether `fd` is a listening socket (`SO_ACCEPTCONN`, socket(7)).
fn listens(fd: &OwnedFd) -> bool {
    nix::sys::socket::getsockopt(fd, nix::sys::socket::sockopt::AcceptConn)
        .expect("getsockopt(SO_ACCEPTCONN)")
}

#[test]
fn outgoing_tcp_is_the_targets_own_socket_with_the_programs_flags_and_options() {
    let bed = Bed::new();
    let service = bed.service_v4.to_string();
    let (out, layer) = sockfd_to_service(&bed, &[], "out", &[]);
    let seen = json(&out);
    // The service saw the target's address: the connection left from there.
    assert_eq!(
        seen["reply"].as_str().map(str::trim),
        Some(bed.service_reply().as_str()),
        "{out}"
    );
    // The program's own socket reports the target's real addresses.
    assert_eq!(seen["sockname"][0], bed.link_v4.to_string(), "{out}");
    assert_eq!(seen["peername"], serde_json::json!([service, 80]), "{out}");
    // Options set before connect and the descriptor flags carried over.
    assert_ne!(seen["nodelay"], 0, "{out}");
    assert_ne!(seen["keepalive"], 0, "{out}");
    assert_eq!(seen["inheritable"], true, "{out}");
    assert_eq!(seen["blocking"], true, "{out}");
    assert_eq!(seen["acceptconn"], 0, "a listener was passed:\n{out}");
    assert!(
        layer.contains(&format!("TCP to {service}:80: the target's socket itself")),
        "the layer's log does not say the socket was passed:\n{layer}\n{out}"
    );
    assert!(
        out.stderr
            .contains("outgoing socket passed as a descriptor"),
        "{out}"
    );
    // curl (IPv4 and IPv6) over the passed socket.
    let (curl4, layer) = run_logged(
        &bed,
        &[],
        &[],
        &["curl", "-sS", "--max-time", "10", &bed.service_url()],
    );
    assert_eq!(curl4.assert_success().out(), bed.service_reply(), "{curl4}");
    assert!(layer.contains("descriptor passed"), "{layer}\n{curl4}");
    let (curl6, layer) = run_logged(
        &bed,
        &[],
        &[],
        &["curl", "-sS", "-g", "--max-time", "10", &bed.service_url6()],
    );
    assert_eq!(
        curl6.assert_success().out(),
        format!("svc {}", bed.link_v6),
        "{curl6}"
    );
    assert!(layer.contains("descriptor passed"), "{layer}\n{curl6}");
}

/// A passed socket's `close` takes it out of the program's `epoll` sets even
/// while another process still holds the socket (as the agent and the proxy
/// do for a moment after they pass it on): its later events never come back
/// with a closed descriptor's stale data. Without this the native bench server
/// freed connections twice in a 1000-connection steal.
#[test]
fn a_closed_passed_socket_leaves_the_programs_epoll_sets() {
    let bed = Bed::new();
    let (out, layer) = sockfd_to_service(&bed, &[], "epoll-close", &[]);
    assert!(
        layer.contains("the target's socket itself as fd"),
        "the socket was not passed:\n{layer}"
    );
    let seen = json(&out);
    assert_eq!(
        seen["events"],
        serde_json::json!([]),
        "epoll reported a closed socket: {out}"
    );
}

#[test]
fn a_non_blocking_connect_says_einprogress_then_turns_writable() {
    let bed = Bed::new();
    let service = bed.service_v4.to_string();
    let (out, layer) = sockfd_to_service(&bed, &[], "nonblock", &["1"]);
    let seen = json(&out);
    assert_eq!(seen["connect"], "EINPROGRESS", "{out}");
    assert_eq!(seen["writable"], true, "{out}");
    assert_eq!(seen["so_error"], 0, "{out}");
    // A second connect is the kernel's to answer: done (0) or EISCONN.
    assert!(
        ["0", "EISCONN"].contains(&seen["again"].as_str().unwrap_or("")),
        "{out}"
    );
    assert_eq!(seen["nonblocking_kept"], true, "{out}");
    assert_eq!(seen["peername"], serde_json::json!([service, 80]), "{out}");
    assert_eq!(
        seen["reply"].as_str().map(str::trim),
        Some(bed.service_reply().as_str()),
        "{out}"
    );
    assert!(layer.contains("descriptor passed"), "{layer}");
    // A refused connect reports as a native one: in SO_ERROR, or at once.
    assert_eq!(seen["closed_connect"], "EINPROGRESS", "{out}");
    assert_eq!(seen["closed_so_error"], "ECONNREFUSED", "{out}");
    assert_eq!(seen["closed_blocking"], "ECONNREFUSED", "{out}");
}

/// `graft run --steal -- sockfd.py serve PORT` with `extra` environment, once
/// the target's `PORT` answers with the local server's JSON; returns the
/// session and that first answer.
fn steal_with(bed: &Bed, extra: &[(&str, &str)]) -> (Proc, serde_json::Value, PathBuf) {
    let port = bed.app_port.to_string();
    let log = layer_log_path(bed);
    let mut command = bed.graft_run(&["--steal"], &[python(), &script(), "serve", &port]);
    command
        .env("GRAFT_LOG", "debug")
        .env("GRAFT_LAYER_LOG", &log);
    for (k, v) in extra {
        command.env(k, v);
    }
    let mut session = bed.spawn(command, "graft run --steal -- sockfd.py serve");
    let url = bed.target_url(bed.app_port);
    let answer = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!("the session exited ({status})\n{}", session.output_report());
        }
        curl(&url).ok().filter(|body| body.contains("\"local\""))
    })
    .unwrap_or_else(|| {
        panic!(
            "{url} never reached the local server\n{}",
            session.output_report()
        )
    });
    let seen = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("not JSON ({e}): {answer}"));
    (session, seen, log)
}

/// Turns the direct listener off (crates/agent/src/direct.rs): the tests of
/// the hand-over, which the agent still does for a second session on the port,
/// a program that waits in `select`, and IPv6 connections.
const HAND_OVER: &[(&str, &str)] = &[("GRAFT_DIRECT_LISTENER", "0")];

/// Asserts that the accepted socket `seen` (sockfd.py) is the target's own
/// stolen connection: the client's address, the target's, not a listener,
/// `accept4`'s flags kept.
#[track_caller]
fn assert_targets_socket(bed: &Bed, seen: &serde_json::Value) {
    let client = bed.host_v4.to_string();
    assert_eq!(seen["peer"][0], client, "accept's address: {seen}");
    assert_eq!(seen["peername"][0], client, "{seen}");
    assert_eq!(
        seen["sockname"],
        serde_json::json!([bed.target_v4.to_string(), bed.app_port]),
        "getsockname shows the target address the client connected to: {seen}"
    );
    assert_eq!(seen["acceptconn"], 0, "a listener was passed: {seen}");
    assert_eq!(
        seen["inheritable"], false,
        "accept's SOCK_CLOEXEC was lost: {seen}"
    );
}

#[test]
fn a_stolen_connection_accepted_from_the_direct_listener_is_the_targets_own_socket() {
    let bed = Bed::new();
    let (session, seen, log) = steal_with(&bed, &[]);
    assert_targets_socket(&bed, &seen);
    let layer = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        accepted_direct(&layer) > 0,
        "{layer}\n{}",
        session.output_report()
    );
}

/// The layer reads the listener's options once, at the first connection it
/// takes from the direct listener; one the program sets later must still
/// reach the connections accepted after it, as it would from its own
/// listener (tcp(7): an accepted socket inherits the listener's options).
#[test]
fn an_option_set_on_the_listener_after_the_first_connection_reaches_later_ones() {
    let bed = Bed::new();
    let (session, _, log) = steal_with(&bed, &[]);
    let url = bed.target_url(bed.app_port);
    let direct = || accepted_direct(&std::fs::read_to_string(&log).unwrap_or_default());
    let get = |url: &str| -> serde_json::Value {
        let body = curl(url).unwrap_or_else(|e| panic!("{url}: {e}\n{}", session.output_report()));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
    };
    // Until the layer has taken one connection from the direct listener,
    // which reads the options.
    let before = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let seen = get(&url);
        (direct() > 0).then_some(seen)
    })
    .unwrap_or_else(|| {
        panic!(
            "no connection came from the direct listener\n{}",
            session.output_report()
        )
    });
    assert_eq!(before["keepalive"], 0, "before the change: {before}");
    get(&format!("{url}late"));
    let direct_before = direct();
    for _ in 0..5 {
        let seen = get(&url);
        assert_targets_socket(&bed, &seen);
        assert_eq!(
            seen["keepalive"], 1,
            "SO_KEEPALIVE set on the listener was lost: {seen}"
        );
        assert_eq!(
            seen["keepidle"], 77,
            "TCP_KEEPIDLE set on the listener was lost: {seen}"
        );
    }
    assert!(
        direct() > direct_before,
        "no connection after the change came from the direct listener\n{}",
        session.output_report()
    );
}

#[test]
fn a_stolen_connection_is_accepted_as_the_targets_own_socket() {
    let bed = Bed::new();
    let (session, seen, log) = steal_with(&bed, HAND_OVER);
    assert_targets_socket(&bed, &seen);
    assert_logs_say(
        &session,
        &log,
        "stolen connection passed as a descriptor",
        "the target's socket itself as fd",
    );
}

/// The loopback connection the proxy makes for each passed stolen connection
/// (so that the program's `accept` wakes) ends with a reset once the layer
/// swaps in the target's socket: no end of it is left in `TIME_WAIT` (60 s
/// each, tcp(7)), where a thousand stolen connections a second would keep some
/// 60 000 sockets on the program's port and slow every later loopback connect.
#[test]
fn a_passed_stolen_connection_leaves_no_time_wait_on_the_loopback() {
    let bed = Bed::new();
    let (session, _, log) = steal_with(&bed, HAND_OVER);
    let url = bed.target_url(bed.app_port);
    for _ in 0..5 {
        let body = curl(&url).unwrap_or_else(|e| panic!("{e}\n{}", session.output_report()));
        assert!(body.contains("\"local\""), "{body}");
    }
    assert_logs_say(
        &session,
        &log,
        "stolen connection passed as a descriptor",
        "the target's socket itself as fd",
    );
    // The program's side of a loopback connection: a local address on the
    // program's port (the stolen connections themselves have the target's).
    let port = format!(":{}", bed.app_port);
    let out = Command::new("ss")
        .args(["-Htn", "state", "time-wait"])
        .output()
        .expect("ss runs");
    let lingering: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| {
            let local = line.split_whitespace().nth(2).unwrap_or("");
            local.ends_with(&port)
                && ["127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:"]
                    .iter()
                    .any(|loopback| local.starts_with(loopback))
        })
        .map(str::to_owned)
        .collect();
    assert!(
        lingering.is_empty(),
        "loopback connections to the program's port left in TIME_WAIT:\n{}",
        lingering.join("\n")
    );
}

/// Asserts that the session's log says `agent` and the layer's log at `log`
/// says `layer`. The agent's log reaches graft's stderr through a pipe and the
/// test's reader thread: it may trail the answer a little (5 s at most).
fn assert_logs_say(session: &Proc, log: &std::path::Path, agent: &str, layer: &str) {
    let said = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let layer_log = std::fs::read_to_string(log).unwrap_or_default();
        (session.output_report().contains(agent) && layer_log.contains(layer)).then_some(())
    });
    assert!(
        said.is_some(),
        "the debug logs do not say {agent:?} and {layer:?}:\n{}\n{}",
        std::fs::read_to_string(log).unwrap_or_default(),
        session.output_report()
    );
}

/// A mirrored connection reaches the program as a socket that the agent writes
/// the copy to, not through graft's relay: `accept` names the target's client,
/// both logs say so, and the target still answers its client itself.
#[test]
fn a_mirrored_connection_reaches_the_program_as_a_passed_socket() {
    let bed = Bed::new();
    let port = bed.map_port.to_string();
    let _target = bed.serve_in_target(&[
        python().to_owned(),
        fixture_str("named_http.py"),
        "target".to_owned(),
        port.clone(),
    ]);
    let log = layer_log_path(&bed);
    let mut command = bed.graft_run(&["--mirror"], &[python(), &script(), "serve", &port]);
    command
        .env("GRAFT_LOG", "debug")
        .env("GRAFT_LAYER_LOG", &log);
    let session = bed.spawn(command, "graft run --mirror -- sockfd.py serve");
    let url = bed.target_url(bed.map_port);
    let copy = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let answer = curl(&url).ok()?;
        assert!(
            answer.contains("target GET /"),
            "the target did not answer: {answer}"
        );
        session
            .stdout()
            .lines()
            .find(|l| l.contains("\"local\""))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("no copy reached the program\n{}", session.output_report()));
    let seen: serde_json::Value = serde_json::from_str(&copy).expect("JSON");
    assert_eq!(
        seen["peer"][0],
        bed.host_v4.to_string(),
        "accept's address: {seen}"
    );
    assert_eq!(seen["acceptconn"], 0, "a listener was passed: {seen}");
    assert_logs_say(
        &session,
        &log,
        "mirrored connection to the session passed as a loopback socket",
        "(descriptor passed)",
    );
}

#[test]
fn with_passing_off_sockets_are_relayed_and_still_work() {
    let bed = Bed::new();
    let off = [("GRAFT_FD_PASSING", "0")];
    let service = bed.service_v4.to_string();
    let (out, layer) = sockfd_to_service(&bed, &off, "out", &[]);
    let seen = json(&out);
    assert_eq!(
        seen["reply"].as_str().map(str::trim),
        Some(bed.service_reply().as_str()),
        "{out}"
    );
    assert_eq!(seen["peername"], serde_json::json!([service, 80]), "{out}");
    assert_eq!(seen["sockname"][0], bed.link_v4.to_string(), "{out}");
    assert!(!layer.contains("descriptor passed"), "{layer}");
    assert!(
        layer.contains("relayed (the proxy passes no descriptors"),
        "the layer's log does not say why the socket was relayed:\n{layer}"
    );
    let (session, seen, log) = steal_with(&bed, &off);
    assert_eq!(seen["peer"][0], bed.host_v4.to_string(), "{seen}");
    let report = session.output_report();
    let layer = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !report.contains("stolen connection passed as a descriptor"),
        "{report}"
    );
    assert!(!layer.contains("descriptor passed"), "{layer}");
}

#[test]
fn a_destination_a_rule_keeps_local_gets_no_target_socket() {
    let bed = Bed::new();
    let service = bed.service_v4.to_string();
    let rule = format!("{}/32", bed.service_v4);
    let (out, layer) = run_logged(
        &bed,
        &[],
        &["--outgoing-local", &rule],
        &["curl", "-sS", "--max-time", "3", &bed.service_url()],
    );
    // From this machine the service is unreachable: the connection stayed here.
    assert!(
        !out.stdout.contains("svc"),
        "the target's service answered:\n{out}"
    );
    assert!(!layer.contains(&format!("TCP to {service}:80")), "{layer}");
    assert!(!out.stderr.contains("outgoing socket passed"), "{out}");
}

/// A program's hand-made connection to its session's layer socket.
struct LayerClient {
    stream: UnixStream,
}

impl LayerClient {
    fn connect(socket: &PathBuf) -> LayerClient {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let hello = LayerRequest::Hello {
            version: version_with(&[FEATURE_FDS]),
            pid: std::process::id(),
        };
        stream.write_all(&encode_frame(&hello).unwrap()).unwrap();
        let mut client = LayerClient { stream };
        match client.exchange(None) {
            (LayerResponse::Hello { version }, _) => {
                assert!(
                    has_feature(&version, FEATURE_FDS),
                    "the proxy passes no descriptors: {version}"
                )
            }
            other => panic!("expected Hello, got {other:?}"),
        }
        client
    }

    fn exchange(&mut self, request: Option<&LayerRequest>) -> (LayerResponse, Vec<OwnedFd>) {
        if let Some(request) = request {
            self.stream
                .write_all(&encode_frame(request).unwrap())
                .unwrap();
        }
        let mut reader = FdReader::new(&self.stream);
        let response = read_frame(&mut reader).expect("the proxy answers");
        (response, reader.fds)
    }
}

#[test]
fn a_hand_made_layer_frame_gets_no_socket_it_must_not_have() {
    let bed = Bed::new();
    let script = "import os, sys, time\n\
                  print(os.environ['GRAFT_LAYER_SOCKET'], flush=True)\n\
                  time.sleep(60)\n";
    // The IPv6 service is kept on this machine by a rule.
    let rule = format!("{}/128", bed.service_v6);
    let command = bed.graft_run(&["--outgoing-local", &rule], &[python(), "-c", script]);
    let session = bed.spawn(command, "graft run -- print layer socket");
    let socket = wait_until(RUN_TIMEOUT, Duration::from_millis(50), || {
        session.stdout().lines().next().map(PathBuf::from)
    })
    .unwrap_or_else(|| panic!("CMD never printed its socket\n{}", session.output_report()));
    let mut layer = LayerClient::connect(&socket);
    // The target's own loopback services (and what stands for them) stay the target's.
    for remote in [
        "127.0.0.1:80",
        "[::1]:80",
        "0.0.0.0:80",
        "[::ffff:127.0.0.1]:80",
        "224.0.0.1:80",
    ] {
        let remote: SocketAddr = remote.parse().unwrap();
        let request = LayerRequest::Remote(RemoteRequest::ConnectFd { remote });
        let (response, fds) = layer.exchange(Some(&request));
        assert!(
            fds.is_empty(),
            "{remote}: a socket was passed ({response:?})"
        );
        assert_eq!(
            response,
            LayerResponse::Remote(RemoteResponse::Error(RemoteError::Os(libc::EACCES))),
            "{remote}"
        );
    }
    // A destination a rule keeps local: neither a socket nor a relayed connection.
    let kept: SocketAddr = (bed.service_v6, 80).into();
    let (response, fds) = layer.exchange(Some(&LayerRequest::Remote(RemoteRequest::ConnectFd {
        remote: kept,
    })));
    assert!(fds.is_empty(), "{response:?}");
    assert_eq!(
        response,
        LayerResponse::Remote(RemoteResponse::Error(RemoteError::Os(libc::EACCES)))
    );
    let (response, fds) = layer.exchange(Some(&LayerRequest::Connect {
        remote: kept,
        transport: graft_protocol::Transport::Tcp,
    }));
    assert!(fds.is_empty(), "{response:?}");
    assert!(
        matches!(
            response,
            LayerResponse::Error {
                errno: libc::EACCES,
                ..
            }
        ),
        "{response:?}"
    );
    // A delivery it was never given: no stolen connection's socket.
    for port in [1u16, 80, 40000, 65535] {
        let proxy_side: SocketAddr = ([127, 0, 0, 1], port).into();
        let (response, fds) = layer.exchange(Some(&LayerRequest::PeerOf { proxy_side }));
        assert!(
            fds.is_empty(),
            "{proxy_side}: a socket was passed ({response:?})"
        );
        assert_eq!(response, LayerResponse::Peer(None), "{proxy_side}");
    }
    // The control: an allowed destination does pass one, connected, not a listener.
    let remote: SocketAddr = (bed.service_v4, 80).into();
    let (response, mut fds) =
        layer.exchange(Some(&LayerRequest::Remote(RemoteRequest::ConnectFd {
            remote,
        })));
    assert_eq!(response, LayerResponse::Remote(RemoteResponse::FdConnected));
    assert_eq!(fds.len(), 1, "{response:?}");
    let fd = fds.remove(0);
    assert!(!listens(&fd), "a listener was passed");
    let mut stream = TcpStream::from(fd);
    stream.set_nonblocking(false).unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut stream, &mut reply).unwrap();
    assert!(reply.trim_end().ends_with(&bed.service_reply()), "{reply}");
}

const SECRET: &str = "sockfd-secret-0123456789abcdef01";

/// A hand-driven proxy on a local agent's Unix socket; `fds`: whether its
/// `Hello` names `+fds` (false: a Kubernetes link's or an older proxy's).
struct RawProxy {
    _agent: Proc,
    stream: UnixStream,
    _dir: tempfile::TempDir,
    next_id: u64,
}

impl RawProxy {
    fn start(bed: &Bed, fds: bool) -> (RawProxy, String) {
        let dir = tempfile::tempdir().unwrap();
        let listen = format!("unix:{}/agent.sock", dir.path().display());
        let mut command = Command::new(agent_bin());
        command
            .args(["--target-pid", &bed.target_pid.to_string()])
            .arg(format!("--listen={listen}"))
            .args(["--connect-timeout", "20"])
            .env("GRAFT_AGENT_SECRET", SECRET);
        let mut agent = bed.spawn(command, "graft-agent");
        let socket = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            if let Some(status) = agent.try_status() {
                panic!("graft-agent exited ({status})\n{}", agent.output_report());
            }
            agent
                .stdout()
                .lines()
                .find_map(|l| l.strip_prefix("ready unix:").map(PathBuf::from))
        })
        .unwrap_or_else(|| panic!("graft-agent never said ready\n{}", agent.output_report()));
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let hello = ClientMessage::Hello(Hello {
            version: version_with(if fds { &[FEATURE_FDS] } else { &[] }),
            secret: SECRET.into(),
            client: "graft-tests sockfd".into(),
        });
        stream.write_all(&encode_frame(&hello).unwrap()).unwrap();
        let mut proxy = RawProxy {
            _agent: agent,
            stream,
            _dir: dir,
            next_id: 1,
        };
        match proxy.receive() {
            (AgentMessage::Hello(HelloReply::Accepted { version, .. }), fds) => {
                assert!(fds.is_empty());
                (proxy, version)
            }
            other => panic!("expected an accepted Hello, got {other:?}"),
        }
    }

    fn send(&mut self, message: &ClientMessage) {
        self.stream
            .write_all(&encode_frame(message).unwrap())
            .unwrap();
    }

    fn receive(&mut self) -> (AgentMessage, Vec<OwnedFd>) {
        let mut reader = FdReader::new(&self.stream);
        let message = read_frame(&mut reader).expect("the agent answers");
        (message, reader.fds)
    }

    /// One remote request's answer and the descriptors that came with it.
    fn request(&mut self, request: RemoteRequest) -> (RemoteResponse, Vec<OwnedFd>) {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&ClientMessage::Request { id, request });
        let mut fds = Vec::new();
        loop {
            let (message, more) = self.receive();
            fds.extend(more);
            if let AgentMessage::Response { id: got, response } = message
                && got == id
            {
                return (response, fds);
            }
        }
    }

    /// Steals the target's `port` asking for descriptors, connects to it from
    /// this machine, and returns how the agent announced the connection.
    fn steal_one(&mut self, bed: &Bed, port: u16) -> (AgentMessage, Vec<OwnedFd>) {
        self.send(&ClientMessage::SubscribeFds(Subscription {
            port,
            mode: IncomingMode::Steal,
            filter: None,
            responses: false,
        }));
        match self.receive() {
            (AgentMessage::SubscribeResult { error: None, .. }, _) => {}
            other => panic!("the steal failed: {other:?}"),
        }
        let target: SocketAddr = (bed.target_v4, port).into();
        let client = std::thread::spawn(move || {
            let stream = TcpStream::connect_timeout(&target, Duration::from_secs(10));
            std::thread::sleep(Duration::from_secs(3));
            stream.map(|_| ())
        });
        let mut fds = Vec::new();
        let announced = loop {
            let (message, more) = self.receive();
            fds.extend(more);
            if matches!(
                message,
                AgentMessage::Incoming { .. } | AgentMessage::IncomingFd { .. }
            ) {
                break message;
            }
        };
        client.join().unwrap().unwrap();
        (announced, fds)
    }
}

#[test]
fn a_proxy_without_fds_gets_every_socket_relayed() {
    let bed = Bed::new();
    let (mut proxy, version) = RawProxy::start(&bed, false);
    assert!(!has_feature(&version, FEATURE_FDS), "{version}");
    let remote: SocketAddr = (bed.service_v4, 80).into();
    let (response, fds) = proxy.request(RemoteRequest::ConnectFd { remote });
    assert!(fds.is_empty(), "{response:?}");
    assert!(
        matches!(response, RemoteResponse::Error(RemoteError::Unsupported(_))),
        "{response:?}"
    );
    let (announced, fds) = proxy.steal_one(&bed, bed.app_port);
    assert!(fds.is_empty(), "{announced:?}");
    assert!(
        matches!(announced, AgentMessage::Incoming { .. }),
        "{announced:?}"
    );
}

#[test]
fn a_local_proxy_gets_connected_and_accepted_sockets_never_a_listener_or_loopback() {
    let bed = Bed::new();
    let (mut proxy, version) = RawProxy::start(&bed, true);
    assert!(has_feature(&version, FEATURE_FDS), "{version}");
    // The target's loopback is refused on this path, however it is spelled.
    for remote in [
        "127.0.0.1:80",
        "[::1]:80",
        "0.0.0.0:80",
        "[::ffff:127.0.0.1]:80",
        "198.19.0.0:0",
    ] {
        let remote: SocketAddr = remote.parse().unwrap();
        let (response, fds) = proxy.request(RemoteRequest::ConnectFd { remote });
        assert!(fds.is_empty(), "{remote}: {response:?}");
        assert_eq!(
            response,
            RemoteResponse::Error(RemoteError::Os(libc::EACCES)),
            "{remote}"
        );
    }
    let remote: SocketAddr = (bed.service_v4, 80).into();
    let (response, mut fds) = proxy.request(RemoteRequest::ConnectFd { remote });
    assert_eq!(response, RemoteResponse::FdConnected);
    assert_eq!(fds.len(), 1);
    let fd = fds.remove(0);
    assert!(!listens(&fd), "a listener was passed");
    let (announced, mut fds) = proxy.steal_one(&bed, bed.app_port);
    let AgentMessage::IncomingFd { port, peer, .. } = announced else {
        panic!("the stolen connection was not passed: {announced:?}");
    };
    assert_eq!((port, peer.ip()), (bed.app_port, bed.host_v4.into()));
    assert_eq!(fds.len(), 1);
    let fd = fds.remove(0);
    assert!(!listens(&fd), "a listener was passed");
    let stream = TcpStream::from(fd);
    assert_eq!(
        stream.peer_addr().unwrap().ip(),
        std::net::IpAddr::from(bed.host_v4)
    );
}
