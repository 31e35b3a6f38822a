//! Stolen connections passed ahead (issue 13, the 1000-connection tail): when
//! a burst of stolen connections waits in a program's listener queue, the
//! answer to one `accept` carries the sockets of up to 31 more, so their
//! `accept`s need no round trip. Shown on a real Python server
//! (tests/fixtures/burst.py): every client of a burst gets its own socket and
//! its own address from `accept`, also when four threads accept at once or
//! the server forked before it listened; a server that forks after taking sockets
//! ahead gives them back, and its child serves them; a listener closed with
//! sockets kept ahead closes their connections instead of leaving the clients
//! waiting.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use graft_tests::logged::layer_log_path;
use graft_tests::{Bed, Proc, fixture_str, python, wait_until};

/// How long a client of the burst waits for its answer.
const CLIENT_WAIT: Duration = Duration::from_secs(15);

/// `graft run --steal -- burst.py PORT COUNT MODE`, once a probe reaches it;
/// returns the session and the layer's log path.
fn burst_server(bed: &Bed, count: usize, mode: &str) -> (Proc, std::path::PathBuf) {
    let log = layer_log_path(bed);
    let port = bed.app_port.to_string();
    let count = count.to_string();
    let script = fixture_str("burst.py");
    let mut command = bed.graft_run(&["--steal"], &[python(), &script, &port, &count, mode]);
    // The hand-over's tests: without the direct listener (crates/agent/src/direct.rs),
    // which takes these connections otherwise.
    command
        .env("GRAFT_LOG", "debug")
        .env("GRAFT_LAYER_LOG", &log)
        .env("GRAFT_DIRECT_LISTENER", "0");
    let mut session = bed.spawn(command, "graft run --steal -- burst.py");
    let target: SocketAddr = (bed.target_v4, bed.app_port).into();
    wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        if let Some(status) = session.try_status() {
            panic!("the session exited ({status})\n{}", session.output_report());
        }
        ask(target, "probe", Duration::from_secs(2))
            .ok()
            .filter(|reply| reply.starts_with("probe "))
    })
    .unwrap_or_else(|| {
        panic!(
            "{target} never reached burst.py\n{}",
            session.output_report()
        )
    });
    (session, log)
}

/// Connects to `target`, sends `id`, and reads the whole answer.
fn ask(target: SocketAddr, id: &str, wait: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&target, wait)?;
    stream.set_read_timeout(Some(wait))?;
    stream.write_all(format!("{id}\n").as_bytes())?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

/// One client of a burst: its id, its own address, and what it got.
struct Client {
    id: String,
    local: SocketAddr,
    reply: std::io::Result<String>,
    took: Duration,
}

/// `count` clients connecting to `target` at once.
fn burst(target: SocketAddr, count: usize) -> Vec<Client> {
    let threads: Vec<_> = (0..count)
        .map(|i| {
            std::thread::spawn(move || {
                let id = format!("c{i}");
                let start = Instant::now();
                let mut stream = TcpStream::connect_timeout(&target, CLIENT_WAIT)
                    .unwrap_or_else(|e| panic!("{id}: connect: {e}"));
                let local = stream.local_addr().unwrap();
                stream.set_read_timeout(Some(CLIENT_WAIT)).unwrap();
                let reply = stream
                    .write_all(format!("{id}\n").as_bytes())
                    .and_then(|()| {
                        let mut reply = String::new();
                        stream.read_to_string(&mut reply).map(|_| reply)
                    });
                Client {
                    id,
                    local,
                    reply,
                    took: start.elapsed(),
                }
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Checks that `client` got its own answer: its id and its own address as
/// `accept` reported it; returns the serving pid.
fn own_answer(client: &Client, report: &str) -> u32 {
    let reply = match &client.reply {
        Ok(reply) => reply,
        Err(e) => panic!("{}: no answer ({e})\n{report}", client.id),
    };
    let fields: Vec<&str> = reply.split_whitespace().collect();
    let expected = [
        client.id.clone(),
        client.local.ip().to_string(),
        client.local.port().to_string(),
    ];
    assert!(
        fields.len() == 4 && fields[..3] == expected,
        "{}: another connection's answer or address: {reply:?} (its own: {expected:?})\n{report}",
        client.id
    );
    fields[3].parse().unwrap()
}

/// A burst of `count` clients against `burst.py` in `mode`: the session, each
/// client's outcome, the layer's log, and everything to show on failure.
fn run_burst(bed: &Bed, count: usize, mode: &str) -> (Proc, Vec<Client>, String, String) {
    let (session, log) = burst_server(bed, count, mode);
    let clients = burst((bed.target_v4, bed.app_port).into(), count);
    let layer = std::fs::read_to_string(&log).unwrap_or_default();
    let report = format!("{}\n--- layer log\n{layer}", session.output_report());
    (session, clients, layer, report)
}

#[test]
fn a_burst_of_stolen_connections_each_gets_its_own_socket_most_passed_ahead() {
    let bed = Bed::new();
    let (mut session, clients, layer, report) = run_burst(&bed, 20, "single");
    for client in &clients {
        own_answer(client, &report);
    }
    let ahead = layer.matches("(descriptor passed ahead)").count();
    assert!(
        ahead >= 7,
        "only {ahead} of 20 waiting connections were passed ahead:\n{report}"
    );
    session.wait_timeout(Duration::from_secs(10));
}

#[test]
fn a_server_that_forked_before_it_listened_still_takes_sockets_ahead() {
    let bed = Bed::new();
    let (mut session, clients, layer, report) = run_burst(&bed, 12, "daemon");
    for client in &clients {
        own_answer(client, &report);
    }
    assert!(
        layer.contains("(descriptor passed ahead)"),
        "a listener made after the fork is the child's alone, yet nothing was passed ahead:\n{report}"
    );
    session.wait_timeout(Duration::from_secs(10));
}

#[test]
fn threads_that_accept_at_once_each_find_the_socket_of_their_connection() {
    let bed = Bed::new();
    let (mut session, clients, layer, report) = run_burst(&bed, 24, "threads");
    for client in &clients {
        own_answer(client, &report);
    }
    assert!(
        layer.contains("(descriptor passed ahead)"),
        "no connection was passed ahead:\n{report}"
    );
    session.wait_timeout(Duration::from_secs(10));
}

#[test]
fn a_server_that_forks_gives_sockets_passed_ahead_back_for_its_child() {
    let bed = Bed::new();
    let (mut session, clients, layer, report) = run_burst(&bed, 10, "fork");
    let pids: Vec<u32> = clients.iter().map(|c| own_answer(c, &report)).collect();
    let mut distinct = pids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        2,
        "the parent served one and its child the rest: {pids:?}\n{report}"
    );
    assert!(
        layer.contains("stolen connections passed ahead back to the proxy"),
        "the parent gave nothing back before fork:\n{report}"
    );
    session.wait_timeout(Duration::from_secs(10));
}

#[test]
fn a_listener_closed_with_sockets_kept_ahead_closes_their_connections() {
    let bed = Bed::new();
    let (session, clients, _, report) = run_burst(&bed, 6, "close");
    let served = clients
        .iter()
        .filter(|c| c.reply.as_ref().is_ok_and(|r| !r.is_empty()))
        .count();
    assert_eq!(
        served, 1,
        "one client is served before the listener closes\n{report}"
    );
    for client in clients
        .iter()
        .filter(|c| !c.reply.as_ref().is_ok_and(|r| !r.is_empty()))
    {
        let timed_out = client.reply.as_ref().err().is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        });
        assert!(
            !timed_out && client.took < CLIENT_WAIT,
            "{}: left waiting on a closed listener ({:?} after {:?})\n{report}",
            client.id,
            client.reply,
            client.took
        );
    }
    drop(session);
}

#[test]
fn a_socket_given_back_that_was_never_passed_ahead_is_refused() {
    use graft_protocol::codec::{encode_frame, read_frame};
    use graft_protocol::fdpass::{FdReader, write_all_with_fds};
    use graft_protocol::layer::{DeliveredPeer, LayerRequest, LayerResponse, PassedPeer};
    use graft_protocol::version::{FEATURE_FDS, version_with};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    let bed = Bed::new();
    let script = "import os, time\n\
                  print(os.environ['GRAFT_LAYER_SOCKET'], flush=True)\n\
                  time.sleep(60)\n";
    let command = bed.graft_run(&["--steal"], &[python(), "-c", script]);
    let session = bed.spawn(command, "graft run -- print layer socket");
    let socket = wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
        session
            .stdout()
            .lines()
            .next()
            .map(std::path::PathBuf::from)
    })
    .unwrap_or_else(|| panic!("CMD never printed its socket\n{}", session.output_report()));
    let stream = UnixStream::connect(&socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let exchange = |request: &LayerRequest, fds: &[std::os::fd::BorrowedFd<'_>]| {
        write_all_with_fds(&stream, &encode_frame(request).unwrap(), fds).unwrap();
        let mut reader = FdReader::new(&stream);
        let response: LayerResponse = read_frame(&mut reader).expect("the proxy answers");
        (response, reader.fds)
    };
    let hello = LayerRequest::Hello {
        version: version_with(&[FEATURE_FDS]),
        pid: std::process::id(),
    };
    assert!(matches!(
        exchange(&hello, &[]).0,
        LayerResponse::Hello { .. }
    ));
    // A socket of the attacker's own, named as a stolen connection it was never
    // passed: the proxy must not keep it for another process to adopt.
    let own = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let decoy = TcpStream::connect(own.local_addr().unwrap()).unwrap();
    let peer = PassedPeer {
        proxy_side: "127.0.0.1:45454".parse().unwrap(),
        port: bed.app_port,
        delivered: DeliveredPeer {
            peer: decoy.local_addr().unwrap(),
            local: (bed.target_v4, bed.app_port).into(),
        },
    };
    let (response, fds) = exchange(&LayerRequest::ReturnPassed(vec![peer]), &[decoy.as_fd()]);
    assert!(fds.is_empty());
    assert!(
        matches!(
            response,
            LayerResponse::Error {
                errno: libc::EINVAL,
                ..
            }
        ),
        "a socket never passed ahead was taken back: {response:?}"
    );
    // Nor does asking for that loopback connection now hand it out.
    let (response, fds) = exchange(
        &LayerRequest::PeerOfBatch {
            proxy_side: peer.proxy_side,
            more: 7,
        },
        &[],
    );
    assert!(fds.is_empty(), "the decoy was handed out: {response:?}");
    assert_eq!(response, LayerResponse::Peer(None));
    // A frame that names more sockets than came beside it is refused too.
    let (response, _) = exchange(&LayerRequest::ReturnPassed(vec![peer, peer]), &[]);
    assert!(
        matches!(response, LayerResponse::Error { .. }),
        "{response:?}"
    );
}
