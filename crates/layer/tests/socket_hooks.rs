//! The socket hooks under real Python, against a fake proxy: outgoing TCP goes to
//! the relay the proxy names while the program sees the remote address, a
//! stolen listener is announced with `Listen` and an accepted delivered
//! connection reports the real client, and UDP `sendto`/`recvfrom` are relayed
//! with the remote address shown. Loopback never reaches the proxy.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::net::{UnixListener, UnixStream},
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use graft_config::{IncomingMode, LayerConfig};
use graft_protocol::{
    PROTOCOL_VERSION, Transport,
    codec::{read_frame, write_frame},
    layer::{DeliveredPeer, LayerRequest, LayerResponse},
};

/// Test addresses come from 198.18.0.0/15 (RFC 2544 benchmarking); while tests
/// run, the host routes that range `unreachable`, so a packet the layer failed to
/// relay dies here instead of leaving the machine.
fn contain_test_range() {
    let _ = Command::new("ip")
        .args(["route", "replace", "unreachable", "198.18.0.0/15"])
        .stderr(Stdio::null())
        .status();
}

/// The layer `cargo test` just built: next to the test binary in `deps/` (the
/// copy in `target/debug/` is only refreshed by `cargo build`).
fn layer_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let fresh = deps.join("libgraft_layer.so");
    if fresh.exists() {
        fresh
    } else {
        deps.parent().unwrap().join("libgraft_layer.so")
    }
}

type Handler = dyn Fn(&LayerRequest) -> LayerResponse + Send + Sync;

/// A fake proxy that answers with `handler` and records every request.
struct FakeProxy {
    path: PathBuf,
    seen: Arc<Mutex<Vec<LayerRequest>>>,
}

impl FakeProxy {
    fn start(name: &str, handler: Arc<Handler>) -> FakeProxy {
        contain_test_range();
        let path =
            std::env::temp_dir().join(format!("graft-layer-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let handler = handler.clone();
                let seen = seen2.clone();
                thread::spawn(move || serve(&mut stream, &*handler, &seen));
            }
        });
        FakeProxy { path, seen }
    }

    fn run(&self, config: &LayerConfig, script: &str) -> Output {
        // Files off: these tests count the proxy's requests, and the file hooks
        // would add the interpreter's own lookups (pyenv shim, /etc/...).
        let config = &LayerConfig {
            fs: graft_config::FsMode::Local,
            ..config.clone()
        };
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .env("LD_PRELOAD", layer_path())
            .env(graft_protocol::layer::SOCKET_ENV, &self.path)
            .env(
                graft_protocol::layer::CONFIG_ENV,
                serde_json::to_string(config).unwrap(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }
}

impl Drop for FakeProxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: &mut UnixStream, handler: &Handler, seen: &Mutex<Vec<LayerRequest>>) {
    while let Ok(request) = read_frame::<_, LayerRequest>(stream) {
        let response = match &request {
            LayerRequest::Hello { .. } => LayerResponse::Hello {
                version: PROTOCOL_VERSION.into(),
            },
            other => {
                seen.lock().unwrap().push(other.clone());
                handler(other)
            }
        };
        if write_frame(stream, &response).is_err() {
            return;
        }
    }
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "program failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn outgoing_tcp_goes_to_the_relay_and_shows_the_remote_address() {
    // The relay: answers "relayed:" + what it got.
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap();
    thread::spawn(move || {
        for s in relay.incoming() {
            let mut s = s.unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap();
            // One write, so the program's single recv sees the whole reply.
            s.write_all(&[b"relayed:", &buf[..n]].concat()).unwrap();
        }
    });
    let target_local: SocketAddr = "198.18.99.2:40000".parse().unwrap();
    let proxy = FakeProxy::start(
        "tcp",
        Arc::new(move |req| match req {
            LayerRequest::Connect {
                transport: Transport::Tcp,
                ..
            } => LayerResponse::Connected {
                relay: relay_addr,
                local: target_local,
            },
            _ => LayerResponse::Error {
                errno: libc::EINVAL,
                message: "unexpected".into(),
            },
        }),
    );
    let out = proxy.run(
        &LayerConfig::default(),
        r#"
import socket
s = socket.create_connection(("198.18.99.1", 80))
s.sendall(b"hi")
print(s.recv(64).decode())
print(s.getpeername())
print(s.getsockname())
"#,
    );
    let text = stdout(&out);
    assert!(text.contains("relayed:hi"), "{text}");
    assert!(text.contains("('198.18.99.1', 80)"), "{text}");
    assert!(text.contains("('198.18.99.2', 40000)"), "{text}");
    let seen = proxy.seen.lock().unwrap();
    assert_eq!(
        *seen,
        vec![LayerRequest::Connect {
            remote: "198.18.99.1:80".parse().unwrap(),
            transport: Transport::Tcp
        }]
    );
}

#[test]
fn refused_remote_connect_is_refused_locally() {
    let proxy = FakeProxy::start(
        "refused",
        Arc::new(|_| LayerResponse::Error {
            errno: libc::ECONNREFUSED,
            message: "refused".into(),
        }),
    );
    let out = proxy.run(
        &LayerConfig::default(),
        r#"
import socket
try:
    socket.create_connection(("198.18.99.1", 81))
except ConnectionRefusedError:
    print("refused")
"#,
    );
    assert_eq!(stdout(&out).trim(), "refused");
}

#[test]
fn loopback_and_outgoing_local_never_reach_the_proxy() {
    let local = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = local.local_addr().unwrap().port();
    thread::spawn(move || {
        for s in local.incoming() {
            let _ = s.unwrap().write_all(b"local");
        }
    });
    let proxy = FakeProxy::start("loopback", Arc::new(|_| LayerResponse::Ok));
    let config = LayerConfig {
        outgoing_local: vec!["198.18.99.0/24:9".parse().unwrap()],
        ..LayerConfig::default()
    };
    let out = proxy.run(
        &config,
        &format!(
            r#"
import socket
s = socket.create_connection(("127.0.0.1", {port}))
print(s.recv(16).decode())
t = socket.socket()
t.settimeout(0.2)
try:
    t.connect(("198.18.99.1", 9))
except OSError as e:
    print("local-attempt", type(e).__name__)
"#
        ),
    );
    let text = stdout(&out);
    assert!(text.contains("local"), "{text}");
    assert!(
        proxy.seen.lock().unwrap().is_empty(),
        "{:?}",
        proxy.seen.lock().unwrap()
    );
}

#[test]
fn listen_subscribes_and_accept_reports_the_real_client() {
    let (deliver_tx, deliver_rx) = mpsc::channel::<SocketAddr>();
    let deliver_tx = Mutex::new(deliver_tx);
    let delivered_from: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    let delivered_from2 = delivered_from.clone();
    let proxy = FakeProxy::start(
        "listen",
        Arc::new(move |req| match req {
            LayerRequest::Listen { deliver_to, .. } => {
                deliver_tx.lock().unwrap().send(*deliver_to).unwrap();
                LayerResponse::Ok
            }
            LayerRequest::PeerOf { proxy_side } => {
                // The program may accept before our connect() returned and
                // recorded the address; a real proxy records it before connecting.
                let deadline = Instant::now() + Duration::from_secs(5);
                while delivered_from2.lock().unwrap().is_none() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(5));
                }
                if Some(*proxy_side) == *delivered_from2.lock().unwrap() {
                    LayerResponse::Peer(Some(DeliveredPeer {
                        peer: "198.18.99.7:5555".parse().unwrap(),
                        local: "198.18.99.2:80".parse().unwrap(),
                    }))
                } else {
                    LayerResponse::Peer(None)
                }
            }
            LayerRequest::Unlisten { .. } => LayerResponse::Ok,
            _ => LayerResponse::Error {
                errno: libc::EINVAL,
                message: "unexpected".into(),
            },
        }),
    );
    let config = LayerConfig {
        incoming: IncomingMode::Steal,
        port_map: vec!["18080:80".parse().unwrap()],
        ..LayerConfig::default()
    };
    let delivered = thread::spawn(move || {
        let deliver_to = deliver_rx.recv_timeout(Duration::from_secs(15)).unwrap();
        let target = SocketAddr::new("127.0.0.1".parse().unwrap(), deliver_to.port());
        let mut s = TcpStream::connect(target).unwrap();
        *delivered_from.lock().unwrap() = Some(s.local_addr().unwrap());
        s.write_all(b"ping").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    });
    let out = proxy.run(
        &config,
        r#"
import socket, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 18080))
srv.listen()
c, addr = srv.accept()
time.sleep(0.05)
data = c.recv(16)
c.sendall(b"pong " + str(addr).encode() + b" " + str(c.getpeername()).encode() + b" " + str(c.getsockname()).encode())
c.close()
srv.close()
"#,
    );
    stdout(&out);
    let reply = delivered.join().unwrap();
    assert!(reply.starts_with("pong ('198.18.99.7', 5555)"), "{reply}");
    assert!(reply.contains("('198.18.99.2', 80)"), "{reply}");
    let seen = proxy.seen.lock().unwrap();
    assert!(
        matches!(seen.first(), Some(LayerRequest::Listen { port: 80, .. })),
        "port map 18080:80 steals 80: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|r| matches!(r, LayerRequest::Unlisten { port: 80, .. })),
        "{seen:?}"
    );
}

#[test]
fn udp_sendto_is_relayed_and_recvfrom_shows_the_remote() {
    let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap();
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = relay.recv_from(&mut buf) {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            relay.send_to(&reply, from).unwrap();
        }
    });
    let proxy = FakeProxy::start(
        "udp",
        Arc::new(move |req| match req {
            LayerRequest::Connect {
                transport: Transport::Udp,
                ..
            } => LayerResponse::Connected {
                relay: relay_addr,
                local: "198.18.99.2:5353".parse().unwrap(),
            },
            _ => LayerResponse::Error {
                errno: libc::EINVAL,
                message: "unexpected".into(),
            },
        }),
    );
    let out = proxy.run(
        &LayerConfig::default(),
        r#"
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(b"x", ("198.18.99.1", 53))
data, addr = u.recvfrom(64)
print(data.decode(), addr)
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.settimeout(5)
c.connect(("198.18.99.1", 54))
c.send(b"y")
print(c.recv(64).decode(), c.getpeername())
"#,
    );
    let text = stdout(&out);
    assert!(text.contains("echo:x ('198.18.99.1', 53)"), "{text}");
    assert!(text.contains("echo:y ('198.18.99.1', 54)"), "{text}");
}
