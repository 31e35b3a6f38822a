//! Item 2 of issue 2, outgoing traffic: TCP and UDP from CMD leave from the
//! target's network namespace (the service, reachable only from there, answers and
//! names the target's address), bytes flow both ways, half-close and resets
//! propagate; loopback and `--outgoing-local` destinations stay local.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use graft_tests::{Bed, wait_until};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

#[test]
fn outgoing_tcp_leaves_from_the_target_namespace() {
    let bed = Bed::new();
    let out = bed.run(
        &[],
        &["curl", "-sS", "--max-time", "10", &bed.service_url()],
    );
    assert_eq!(out.assert_success().out(), bed.service_reply());
}

#[test]
fn outgoing_tcp_over_ipv6_leaves_from_the_target_namespace() {
    let bed = Bed::new();
    let out = bed.run(
        &[],
        &["curl", "-sS", "-g", "--max-time", "10", &bed.service_url6()],
    );
    assert_eq!(out.assert_success().out(), format!("svc {}", bed.link_v6));
}

#[test]
fn outgoing_tcp_bytes_flow_both_ways_and_half_close_propagates() {
    let bed = Bed::new();
    let service = bed.service_v4.to_string();
    // 3 MB each way: more than any socket buffer, so the relay must stream.
    let out = bed.run_py(&[], "net_client.py", &["echo", &service, "7", "3000000"]);
    assert_eq!(out.assert_success().out(), "echo ok 3000000");
}

#[test]
fn outgoing_tcp_reset_by_the_server_reaches_cmd() {
    let bed = Bed::new();
    let service = bed.service_v4.to_string();
    let out = bed.run_py(&[], "net_client.py", &["reset-recv", &service, "10"]);
    assert_eq!(out.assert_success().out(), "reset");
}

#[test]
fn outgoing_tcp_reset_by_cmd_reaches_the_server() {
    let bed = Bed::new();
    let service = bed.service_v4.to_string();
    let out = bed.run_py(&[], "net_client.py", &["reset-send", &service, "11"]);
    assert_eq!(out.assert_success().out(), "sent-reset");
    let expected = format!("reset {}", bed.link_v4);
    let seen = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        let events = bed.service_events();
        (!events.is_empty()).then_some(events)
    });
    assert_eq!(
        seen.as_deref(),
        Some(expected.as_str()),
        "the service saw no RST"
    );
}

#[test]
fn outgoing_udp_sendto_recvfrom_goes_through_the_target() {
    let bed = Bed::new();
    let service = bed.service_v4.to_string();
    let out = bed.run_py(&[], "net_client.py", &["udp-sendto", &service, "7"]);
    let reply = json(out.assert_success().out());
    assert_eq!(reply["data"], format!("svc-udp {} ping", bed.link_v4));
    assert_eq!(reply["from"], serde_json::json!([service, 7]));
}

#[test]
fn outgoing_udp_over_ipv6_goes_through_the_target() {
    let bed = Bed::new();
    let service = bed.service_v6.to_string();
    let out = bed.run_py(&[], "net_client.py", &["udp-sendto", &service, "7"]);
    let reply = json(out.assert_success().out());
    assert_eq!(reply["data"], format!("svc-udp {} ping", bed.link_v6));
    assert_eq!(reply["from"][0], service);
}

#[test]
fn outgoing_connected_udp_goes_through_the_target() {
    let bed = Bed::new();
    let service = bed.service_v4.to_string();
    let out = bed.run_py(&[], "net_client.py", &["udp-connected", &service, "7"]);
    let reply = json(out.assert_success().out());
    assert_eq!(reply["data"], format!("svc-udp {} pong", bed.link_v4));
    assert_eq!(reply["peer"], serde_json::json!([service, 7]));
}

#[test]
fn loopback_connections_stay_local() {
    let bed = Bed::new();
    let (addr, _server) = peer_reporting_server("127.0.0.1:0".parse().unwrap());
    let url = format!("http://{addr}/");
    let out = bed.run(&[], &["curl", "-sS", "--max-time", "10", &url]);
    assert_eq!(out.assert_success().out(), "peer 127.0.0.1");
}

#[test]
fn outgoing_local_cidr_and_port_keep_chosen_destinations_local() {
    let bed = Bed::new();
    // A server on the host's end of the target link: reachable both from the host
    // and from the target, and it tells which one connected.
    let (addr, _server) = peer_reporting_server(SocketAddr::from((bed.host_v4, 0)));
    let url = format!("http://{addr}/");
    let curl = ["curl", "-sS", "--max-time", "10", url.as_str()];
    let from_target = format!("peer {}", bed.target_v4);
    let from_host = format!("peer {}", bed.host_v4);

    let remote = bed.run(&[], &curl);
    assert_eq!(
        remote.assert_success().out(),
        from_target,
        "not sent from the target"
    );

    let cidr = format!("{}/32", bed.host_v4);
    let local = bed.run(&["--outgoing-local", &cidr], &curl);
    assert_eq!(
        local.assert_success().out(),
        from_host,
        "--outgoing-local {cidr}"
    );

    let with_port = format!("{}/24:{}", bed.host_v4, addr.port());
    let local = bed.run(&["--outgoing-local", &with_port], &curl);
    assert_eq!(
        local.assert_success().out(),
        from_host,
        "--outgoing-local {with_port}"
    );

    let other_port = format!("{}/32:{}", bed.host_v4, addr.port().wrapping_add(1));
    let remote = bed.run(&["--outgoing-local", &other_port], &curl);
    assert_eq!(
        remote.assert_success().out(),
        from_target,
        "--outgoing-local {other_port}"
    );
}

#[test]
fn outgoing_local_keeps_service_local_so_it_is_unreachable() {
    let bed = Bed::new();
    let cidr = format!("{}/24", bed.service_v4);
    let out = bed.run(
        &["--outgoing-local", &cidr],
        &["curl", "-sS", "--max-time", "5", &bed.service_url()],
    );
    assert!(
        !out.success(),
        "the service was reached although kept local:\n{out}"
    );
    assert!(!out.stdout.contains("svc"), "{out}");
}

/// A tiny HTTP server on `bind` (in the host's namespace) answering every request
/// with "peer <client address>"; it runs until the test process ends.
fn peer_reporting_server(bind: SocketAddr) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let peer = stream
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!("peer {peer}\n");
            let _ = write!(
                stream,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (addr, server)
}
