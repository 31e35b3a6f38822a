//! Item 1 of issue 2, incoming traffic: with `--steal`, connections that reach the
//! target's namespace on a port CMD listens on are delivered to CMD (IPv4 and
//! IPv6, `--port-map`), the target's own server sees none of them, and it serves
//! again as soon as the session ends; without `--steal` (or `--mirror`) the
//! session mirrors: the target keeps serving and CMD gets copies (more in
//! `incoming.rs`).

use std::time::{Duration, Instant};

use graft_tests::{Bed, curl, fixture_str, python, wait_until};
use nix::sys::signal::Signal;

/// How soon after the session ends the target must serve its port again.
const RESTORE: Duration = Duration::from_secs(2);

#[test]
fn steal_delivers_ipv4_connections_to_cmd_and_target_serves_again_after_session() {
    let bed = Bed::new();
    let url = bed.target_url(bed.app_port);
    let (mut session, reply) = bed.steal(&[], bed.app_port, &url);
    assert!(
        reply.starts_with(&format!("local port={}", bed.app_port)),
        "{reply}"
    );
    for _ in 0..3 {
        assert!(curl(&url).unwrap().starts_with("local"));
    }

    session.signal(Signal::SIGTERM);
    let ended = Instant::now();
    let served = wait_until(RESTORE, Duration::from_millis(50), || {
        curl(&url).ok().filter(|body| *body == bed.target_reply())
    });
    assert!(
        served.is_some(),
        "the target did not serve {url} again within {RESTORE:?} of SIGTERM (last: {:?})\n{}",
        curl(&url),
        session.output_report()
    );
    assert!(ended.elapsed() <= RESTORE + Duration::from_secs(1));
    assert!(
        session.wait_timeout(Duration::from_secs(10)).is_some(),
        "graft did not exit"
    );
}

#[test]
fn steal_delivers_ipv6_connections_to_cmd() {
    let bed = Bed::new();
    let url6 = bed.target_url6(bed.app_port);
    let (_session, reply) = bed.steal(&[], bed.app_port, &url6);
    assert!(
        reply.starts_with(&format!("local port={}", bed.app_port)),
        "{reply}"
    );
    // Both families are stolen by the same session.
    assert!(
        curl(&bed.target_url(bed.app_port))
            .unwrap()
            .starts_with("local")
    );
}

#[test]
fn steal_delivers_to_a_cmd_listening_on_one_of_this_machines_addresses() {
    // A program that binds the machine's own address (`--bind 192.168.1.5`),
    // not a loopback or wildcard one: the proxy's connection to it comes from
    // that address, and the layer must still take it for a stolen one (it
    // used to hand the program the proxy's connection, and the client hung).
    let bed = Bed::new();
    let url = bed.target_url(bed.app_port);
    let app = fixture_str("http_app.py");
    let port = bed.app_port.to_string();
    let mut command = bed.graft_run(&["--steal"], &[python(), &app, &port]);
    command.env("GRAFT_TEST_BIND", bed.host_v4.to_string());
    let session = bed.spawn(
        command,
        "graft run --steal -- http_app.py (bound to the host's address)",
    );
    let reply = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        curl(&url).ok().filter(|body| body.starts_with("local"))
    });
    assert!(
        reply.is_some(),
        "{url} was not answered by the local app bound to {} (last: {:?})\n{}",
        bed.host_v4,
        curl(&url),
        session.output_report()
    );
    for _ in 0..3 {
        assert!(curl(&url).unwrap().starts_with("local"));
    }
}

#[test]
fn steal_target_server_gets_none_of_the_stolen_connections() {
    let bed = Bed::new();
    let url = bed.target_url(bed.app_port);
    let (_session, _) = bed.steal(&[], bed.app_port, &url);
    let before = bed.target_counts()[&bed.app_port];
    for _ in 0..5 {
        assert!(curl(&url).unwrap().starts_with("local"));
        assert!(
            curl(&bed.target_url6(bed.app_port))
                .unwrap()
                .starts_with("local")
        );
    }
    assert_eq!(
        bed.target_counts()[&bed.app_port],
        before,
        "the target saw stolen requests"
    );
    // A port CMD does not listen on is left to the target.
    assert_eq!(curl(&bed.target_url(80)).unwrap(), bed.target_reply());
}

#[test]
fn steal_with_port_map_steals_remote_port_for_cmd_listening_on_local_port() {
    let bed = Bed::new();
    let map = format!("{}:80", bed.map_port);
    let url = bed.target_url(80);
    let (_session, reply) = bed.steal(&["--port-map", &map], bed.map_port, &url);
    assert!(
        reply.starts_with(&format!("local port={}", bed.map_port)),
        "{reply}"
    );
    assert!(curl(&bed.target_url6(80)).unwrap().starts_with("local"));
    // The app's own port number is not stolen on the target.
    assert_eq!(
        curl(&bed.target_url(bed.app_port)).unwrap(),
        bed.target_reply()
    );
}

#[test]
fn without_steal_incoming_traffic_stays_with_the_target() {
    // Without --steal or --mirror the default is mirror: the target still answers
    // every request, CMD receives copies, and graft says so when it mirrors the port.
    let bed = Bed::new();
    let app = fixture_str("named_http.py");
    let port = bed.app_port.to_string();
    let mut session = bed.spawn(
        bed.graft_run(&[], &[python(), &app, "local", &port]),
        "graft run -- named_http.py local (no --steal)",
    );
    // The app is up locally...
    let local = format!("http://127.0.0.1:{port}/");
    let up = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        assert!(
            session.try_status().is_none(),
            "graft exited\n{}",
            session.output_report()
        );
        curl(&local).ok().filter(|body| body.starts_with("local"))
    });
    assert!(
        up.is_some(),
        "the app never listened locally\n{}",
        session.output_report()
    );
    // ...the mirror is in place once a request to the target shows up in CMD...
    let mut i = 0;
    let mirrored = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        i += 1;
        let _ = curl(&format!("{}probe-{i}", bed.target_url(bed.app_port)));
        std::thread::sleep(Duration::from_millis(100));
        session.stdout().contains(" /probe-").then_some(())
    });
    assert!(
        mirrored.is_some(),
        "no request to the target was mirrored to CMD\n{}",
        session.output_report()
    );
    // ...and graft said it mirrors because nobody chose a mode.
    let said = session.stderr();
    assert!(
        said.contains("mirroring port") && said.contains("the default"),
        "graft did not say it mirrors by default\n{}",
        session.output_report()
    );
    // ...and the target still gets (and answers) all of its traffic.
    let before = bed.target_counts()[&bed.app_port];
    for i in 0..3 {
        assert_eq!(
            curl(&format!("{}v4-{i}", bed.target_url(bed.app_port))).unwrap(),
            bed.target_reply()
        );
        assert_eq!(
            curl(&format!("{}v6-{i}", bed.target_url6(bed.app_port))).unwrap(),
            bed.target_reply()
        );
    }
    assert_eq!(bed.target_counts()[&bed.app_port], before + 6);
    let copied = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let out = session.stdout();
        (0..3)
            .all(|i| out.contains(&format!(" /v4-{i} ")) && out.contains(&format!(" /v6-{i} ")))
            .then_some(())
    });
    assert!(
        copied.is_some(),
        "CMD did not get a copy of every request\n{}",
        session.output_report()
    );
    // The mirror's rules go with the session.
    session.signal(Signal::SIGTERM);
    let gone = wait_until(RESTORE, Duration::from_millis(50), || {
        (!bed.has_graft_rules()).then_some(())
    });
    assert!(
        gone.is_some(),
        "rules left after the session:\n{}",
        bed.packet_rules()
    );
    assert_eq!(
        curl(&bed.target_url(bed.app_port)).unwrap(),
        bed.target_reply()
    );
}

/// Two programs that bind one port with `SO_REUSEADDR` both bind; the one
/// that listens second gets `EADDRINUSE` from `listen` (seen when two e2e
/// tests' programs raced for port 8080). Under graft the second one still
/// steals: the layer listens on another port for it, as when `bind` finds the
/// port busy, and the stolen connections reach it.
#[test]
fn a_cmd_whose_port_another_program_listens_on_first_still_steals() {
    let bed = Bed::new();
    let url = bed.target_url(bed.app_port);
    let dir = bed.work_dir().to_path_buf();
    let (bound, listened) = (dir.join("cmd-bound"), dir.join("other-listens"));
    // The other program, outside graft: binds once CMD has, listens first.
    let other = format!(
        "import os, socket, time\n\
         while not os.path.exists({bound:?}): time.sleep(0.02)\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port})); s.listen(8)\n\
         open({listened:?}, 'w').close()\n\
         time.sleep(60)\n",
        port = bed.app_port
    );
    let holder = bed.spawn(
        {
            let mut c = std::process::Command::new(python());
            c.args(["-c", &other]);
            c
        },
        "the other program on the port",
    );
    let cmd = format!(
        "import os, socket, time\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port}))\n\
         open({bound:?}, 'w').close()\n\
         while not os.path.exists({listened:?}): time.sleep(0.02)\n\
         s.listen(8)\n\
         print('listening on', s.getsockname()[1], flush=True)\n\
         while True:\n\
         \x20   c, _ = s.accept(); c.recv(4096)\n\
         \x20   c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: 6\\r\\n\\r\\nlocal\\n'); c.close()\n",
        port = bed.app_port
    );
    let session = bed.spawn(
        bed.graft_run(&["--steal"], &[python(), "-c", &cmd]),
        "graft run --steal -- a CMD that listens second",
    );
    let reply = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        curl(&url).ok().filter(|body| body.starts_with("local"))
    });
    assert!(
        reply.is_some(),
        "{url} was not answered by CMD (last: {:?})\n{}",
        curl(&url),
        session.output_report()
    );
    // The program sees the port it asked for.
    assert!(
        session
            .stdout()
            .contains(&format!("listening on {}", bed.app_port)),
        "{}",
        session.output_report()
    );
    holder.signal(Signal::SIGTERM);
}
