//! The stack with real kernel sockets: a thread in a private network namespace
//! whose default routes lead to a tun device, served by the stack with an upstream
//! that sends port 7 to local echo servers and refuses everything else. Needs root
//! (a network namespace and a tun device).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{Arc, mpsc},
    time::Duration,
};

use graft_netstack::{
    LocalUpstream, Netstack, NetstackOptions, Upstream,
    upstream::{BoxFuture, Resolved, TcpRelay, UdpRelay},
};
use graft_protocol::remote::AddressFamily;
use hickory_proto::{
    op::{Message, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};

/// The namespace's resolver address, served by the stack.
const DNS: &str = "198.18.0.2";

/// Sends port 7 (TCP and UDP) to local echo servers, refuses the rest; knows one name.
struct Echoes {
    tcp: SocketAddr,
    udp: SocketAddr,
    /// Reads one byte, then resets the connection.
    resets: SocketAddr,
}

impl Upstream for Echoes {
    fn connect_tcp(&self, remote: SocketAddr) -> BoxFuture<'_, std::io::Result<TcpRelay>> {
        Box::pin(async move {
            match remote.port() {
                7 => LocalUpstream.connect_tcp(self.tcp).await,
                8 => LocalUpstream.connect_tcp(self.resets).await,
                _ => Err(std::io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            }
        })
    }

    fn connect_udp(&self, remote: SocketAddr) -> BoxFuture<'_, std::io::Result<UdpRelay>> {
        Box::pin(async move {
            if remote.port() != 7 {
                return Err(std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
            }
            LocalUpstream.connect_udp(self.udp).await
        })
    }

    fn resolve(&self, host: String, family: AddressFamily) -> BoxFuture<'_, Resolved> {
        Box::pin(async move {
            match (host.as_str(), family) {
                ("svc.test.", AddressFamily::V4) => {
                    Resolved::Addrs(vec!["192.0.2.7".parse().unwrap()])
                }
                _ => Resolved::NoName,
            }
        })
    }
}

/// A thread in its own network namespace, running jobs there.
struct Namespace {
    jobs: mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl Namespace {
    /// Makes the namespace and its tun; returns the tun's descriptor side.
    fn new() -> Option<(Namespace, tun_rs::SyncDevice)> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root for a network namespace and a tun device");
            return None;
        }
        let (jobs, jobs_rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let (device_tx, device_rx) = mpsc::channel();
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let device = tun_rs::DeviceBuilder::new()
                .name("gtest0")
                .mtu(1500)
                .build_sync()
                .expect("tun");
            for args in [
                "link set lo up",
                "link set gtest0 up",
                "addr add 198.18.0.1/30 dev gtest0",
                "addr add fd00:6772::1/64 dev gtest0 nodad",
                "route add default dev gtest0",
                "-6 route add default dev gtest0",
            ] {
                let status = std::process::Command::new("ip")
                    .args(args.split(' '))
                    .status()
                    .expect("ip");
                assert!(status.success(), "ip {args}");
            }
            device_tx.send(device).unwrap();
            while let Ok(job) = jobs_rx.recv() {
                job();
            }
        });
        Some((Namespace { jobs }, device_rx.recv().unwrap()))
    }

    /// Runs `f` in the namespace (threads it starts are in it too).
    fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .unwrap();
        rx.recv().expect("the job panicked")
    }
}

/// A local server that reads one byte of each connection, then resets it.
fn reset_server() -> SocketAddr {
    let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in std.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut byte = [0u8; 1];
            let _ = stream.read_exact(&mut byte);
            // SO_LINGER 0: close sends an RST.
            let socket = nix::sys::socket::sockopt::Linger;
            let _ = nix::sys::socket::setsockopt(
                &stream,
                socket,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            );
            drop(stream);
        }
    });
    addr
}

/// Local echo servers (TCP and UDP) on loopback of the test's own namespace.
fn echo_servers() -> (SocketAddr, SocketAddr) {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in tcp.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_addr = udp.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    (tcp_addr, udp_addr)
}

struct Bed {
    ns: Namespace,
    stack: tokio::task::JoinHandle<std::io::Result<()>>,
    runtime: tokio::runtime::Runtime,
}

impl Bed {
    /// Fails the test when the stack has stopped.
    fn assert_serving(&mut self) {
        if self.stack.is_finished() {
            let ended = self.runtime.block_on(&mut self.stack);
            panic!("the stack stopped: {ended:?}");
        }
    }
}

fn bed() -> Option<Bed> {
    let (ns, device) = Namespace::new()?;
    let (tcp, udp) = echo_servers();
    let resets = reset_server();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The device registers with the runtime's reactor.
    let entered = runtime.enter();
    let device = tun_rs::AsyncDevice::new(device).unwrap();
    let options = NetstackOptions {
        dns: Some(DNS.parse().unwrap()),
        ..NetstackOptions::default()
    };
    let stack = Netstack::serve_with(device, Arc::new(Echoes { tcp, udp, resets }), options);
    drop(entered);
    Some(Bed { ns, stack, runtime })
}

fn echo_once(remote: &str, size: usize) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&remote.parse().unwrap(), Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let writer = {
        let mut stream = stream.try_clone()?;
        let data = data.clone();
        std::thread::spawn(move || stream.write_all(&data))
    };
    let mut back = vec![0u8; size];
    stream.read_exact(&mut back)?;
    writer.join().unwrap()?;
    assert!(back == data, "echoed bytes differ");
    Ok(())
}

#[test]
fn many_concurrent_tcp_flows_v4_and_v6_reach_the_upstream_intact() {
    let Some(bed) = bed() else { return };
    let failures = bed.ns.run(|| {
        let threads: Vec<_> = (0..100)
            .map(|i| {
                std::thread::spawn(move || {
                    let remote = if i % 4 == 0 {
                        "[2001:db8::7]:7"
                    } else {
                        "192.0.2.7:7"
                    };
                    echo_once(remote, 64 * 1024 + i * 1000).map_err(|e| e.to_string())
                })
            })
            .collect();
        threads
            .into_iter()
            .filter_map(|t| t.join().unwrap().err())
            .collect::<Vec<_>>()
    });
    assert!(failures.is_empty(), "{failures:?}");
    // A bigger transfer on one connection.
    bed.ns.run(|| echo_once("192.0.2.9:7", 8 << 20)).unwrap();
}

#[test]
fn a_refused_upstream_connect_is_a_refused_connect() {
    let Some(bed) = bed() else { return };
    let err = bed
        .ns
        .run(|| {
            TcpStream::connect_timeout(&"192.0.2.7:80".parse().unwrap(), Duration::from_secs(10))
        })
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // The resolver's address has nothing but DNS.
    let err = bed
        .ns
        .run(|| {
            TcpStream::connect_timeout(
                &format!("{DNS}:22").parse().unwrap(),
                Duration::from_secs(10),
            )
        })
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn udp_flows_and_dns_over_udp_and_tcp() {
    let Some(bed) = bed() else { return };
    bed.ns.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 2048];
        for i in 0..20u8 {
            socket.send_to(&[i; 100], "192.0.2.7:7").unwrap();
            let (n, from) = socket.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 100]);
            assert_eq!(from, "192.0.2.7:7".parse().unwrap());
        }
    });
    let query = |name: &str, kind| {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        m.to_vec().unwrap()
    };
    let a = query("svc.test.", RecordType::A);
    let answer = bed.ns.run(move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket.send_to(&a, (DNS, 53)).unwrap();
        let mut buf = [0u8; 2048];
        let n = socket.recv(&mut buf).unwrap();
        buf[..n].to_vec()
    });
    let answer = Message::from_vec(&answer).unwrap();
    assert_eq!(answer.answers.len(), 1);
    assert_eq!(
        answer.answers[0].data,
        RData::A(hickory_proto::rr::rdata::A("192.0.2.7".parse().unwrap()))
    );
    let missing = query("missing.test.", RecordType::A);
    let answer = bed.ns.run(move || {
        let mut stream = TcpStream::connect((DNS, 53)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut framed = (missing.len() as u16).to_be_bytes().to_vec();
        framed.extend(&missing);
        stream.write_all(&framed).unwrap();
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).unwrap();
        let mut buf = vec![0u8; u16::from_be_bytes(len).into()];
        stream.read_exact(&mut buf).unwrap();
        buf
    });
    let answer = Message::from_vec(&answer).unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn a_reset_upstream_resets_the_program() {
    let Some(bed) = bed() else { return };
    let err = bed
        .ns
        .run(|| {
            let mut stream = TcpStream::connect("192.0.2.7:8")?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(b"x")?;
            let mut buf = [0u8; 16];
            match stream.read(&mut buf) {
                Ok(0) => Ok(()),
                Ok(_) => panic!("bytes from a server that sends none"),
                Err(e) => Err(e),
            }
        })
        .expect_err("a reset, not a clean end of stream");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

/// Attack: thousands of malformed and random packets from the namespace (bad
/// lengths, bogus TCP flags and ports, unknown protocols, SYN floods) do not crash
/// the stack or stop it serving the next connection.
#[test]
fn hostile_packets_do_not_break_the_stack() {
    let Some(mut bed) = bed() else { return };
    let sent = bed.ns.run(|| {
        use nix::sys::socket::{
            AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, socket,
        };
        let raw = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::Raw,
        )
        .expect("raw socket");
        let mut seed = 0x9e37_79b9_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let mut sent = 0;
        for i in 0..5000u32 {
            let len = 20 + (next() % 120) as usize;
            let mut packet: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            packet[0] = 0x45;
            packet[1] = 0;
            packet[4..9].copy_from_slice(&[0, 0, 0x40, 0, 64]);
            packet[9] = match i % 4 {
                0 | 1 => 6,
                2 => 17,
                _ => next() as u8,
            };
            if i % 3 == 0 && len >= 40 {
                packet[33] = 0x02; // SYN
            }
            packet[12..16].copy_from_slice(&[198, 18, 0, 1]);
            let dst = [192, 0, 2, (next() % 4) as u8];
            packet[16..20].copy_from_slice(&dst);
            let to = SockaddrIn::new(dst[0], dst[1], dst[2], dst[3], 0);
            // The tun's queue fills faster than the stack drains it: wait a little.
            for _ in 0..100 {
                match sendto(raw.as_raw_fd(), &packet, &to, MsgFlags::empty()) {
                    Err(nix::errno::Errno::ENOBUFS) => std::thread::sleep(Duration::from_millis(1)),
                    Ok(_) => {
                        sent += 1;
                        break;
                    }
                    Err(e) => {
                        eprintln!("sendto: {e}");
                        break;
                    }
                }
            }
        }
        sent
    });
    bed.assert_serving();
    assert!(sent > 1000, "only {sent} packets went out");
    bed.ns.run(|| echo_once("192.0.2.7:7", 100_000)).unwrap();
}
