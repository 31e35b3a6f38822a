//! Issue 5, fault tests: graft or its agent killed with `kill -9` at the points
//! `ending.rs` does not cover (graft before any traffic and in the middle of a
//! stolen transfer; the agent while CMD holds a remote connection and while it
//! streams through one, which cuts the link mid-transfer), the target process
//! exiting mid-session, and 1000 concurrent connections through a steal.
//!
//! After graft or its agent is killed during a steal, the target serves its port
//! again within 2 s and no `GRAFT` chain is left in its namespace
//! (`iptables-save`, `ip6tables-save`); after every fault no agent or watchdog of
//! the session remains within 2 s, and whatever graft says about it is a clear
//! message rather than a hang or a panic.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use graft_tests::{Bed, Proc, STEAL_TIMEOUT, alive, curl, python, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How soon after a fault the rules must be gone and the target must serve.
const RESTORE: Duration = Duration::from_secs(2);

/// How long graft may take to end after a fault that ends its session.
const END_TIMEOUT: Duration = Duration::from_secs(15);

/// A local TCP app for `--steal` (`python3 -c APP MODE PORT`): every connection
/// first gets `local\n`, then in mode `stream` endless 64 KiB chunks, in mode
/// `echo` `echo LINE` for every line it sends. asyncio, so a thousand connections
/// cost no thousand threads.
const APP: &str = r#"
import asyncio, sys
mode, port = sys.argv[1], int(sys.argv[2])
async def handle(reader, writer):
    try:
        writer.write(b"local\n")
        await writer.drain()
        if mode == "stream":
            chunk = b"x" * 65536
            while True:
                writer.write(chunk)
                await writer.drain()
        while line := await reader.readline():
            writer.write(b"echo " + line)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", port, backlog=4096)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"#;

/// Starts `graft run --steal -- python3 -c APP MODE APP_PORT` and waits until a
/// connection to the target's app port gets the app's `local` greeting.
fn steal_app(bed: &Bed, mode: &str) -> Proc {
    let port = bed.app_port.to_string();
    let command = bed.graft_run(&["--steal"], &[python(), "-c", APP, mode, &port]);
    let mut session = bed.spawn(command, &format!("graft run --steal -- app {mode}"));
    let addr = SocketAddr::from((bed.target_v4, bed.app_port));
    let stolen = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!(
                "graft exited ({status}) before the steal took effect\n{}",
                session.output_report()
            );
        }
        greeting(addr).ok().filter(|g| g == "local\n")
    });
    assert!(
        stolen.is_some(),
        "{addr} was not answered by the local app within {STEAL_TIMEOUT:?}\n{}",
        session.output_report()
    );
    session
}

/// Connects to `addr` and reads the first line (the target's HTTP server sends
/// nothing first, so a read timeout means the target answered).
fn greeting(addr: SocketAddr) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line)
}

/// Waits (at most [`RESTORE`] after `since`) until the target serves its app port
/// again, no graft rule is left, and no agent or watchdog of the target runs.
fn assert_restored(bed: &Bed, since: Instant, session: &Proc) {
    let url = bed.target_url(bed.app_port);
    let left = RESTORE.saturating_sub(since.elapsed());
    let restored = wait_until(left, Duration::from_millis(50), || {
        let served = curl(&url).ok().filter(|b| *b == bed.target_reply());
        (served.is_some() && !bed.has_graft_rules()).then_some(())
    });
    assert!(
        restored.is_some(),
        "{:?} after the fault: {url} answers {:?}; rules:\n{}\n{}",
        since.elapsed(),
        curl(&url),
        bed.packet_rules(),
        session.output_report()
    );
    let left = RESTORE.saturating_sub(since.elapsed());
    let gone = wait_until(left, Duration::from_millis(50), || {
        bed.agent_pids().is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "agent or watchdog still running {:?} after the fault: {:?}",
        since.elapsed(),
        bed.agent_pids()
    );
}

fn kill_9(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("cannot kill -9 {pid}: {e}"));
}

#[test]
fn kill_9_of_graft_before_any_traffic_restores_the_target_and_leaves_no_agent() {
    let bed = Bed::new();
    let port = bed.app_port.to_string();
    let command = bed.graft_run(&["--steal"], &[python(), "-c", APP, "echo", &port]);
    let mut session = bed.spawn(command, "graft run --steal -- app echo");
    // No connection reaches the target's port before the kill: the rules being
    // in place is what says the steal is live.
    let installed = wait_until(STEAL_TIMEOUT, Duration::from_millis(50), || {
        if let Some(status) = session.try_status() {
            panic!(
                "graft exited ({status}) before its rules appeared\n{}",
                session.output_report()
            );
        }
        bed.has_graft_rules().then_some(())
    });
    assert!(
        installed.is_some(),
        "no GRAFT chain within {STEAL_TIMEOUT:?}\n{}",
        session.output_report()
    );
    let apps = bed.pids_running(APP);
    assert!(!apps.is_empty(), "cannot find CMD's process");

    session.signal(Signal::SIGKILL);
    let since = Instant::now();
    assert_restored(&bed, since, &session);
    let stopped = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        apps.iter().all(|pid| !alive(*pid)).then_some(())
    });
    assert!(stopped.is_some(), "CMD survived kill -9 of graft: {apps:?}");
}

#[test]
fn kill_9_of_graft_during_a_stolen_transfer_restores_the_target_and_ends_the_transfer() {
    let bed = Bed::new();
    let session = steal_app(&bed, "stream");
    let addr = SocketAddr::from((bed.target_v4, bed.app_port));
    let mut client = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0usize;
    while received < 4 << 20 {
        let n = client.read(&mut buf).expect("the stolen stream flows");
        assert!(n > 0, "the stolen stream ended after {received} bytes");
        received += n;
    }

    session.signal(Signal::SIGKILL);
    let since = Instant::now();
    assert_restored(&bed, since, &session);
    // What was in flight may still arrive; then the stream must end, not stall.
    let ended = loop {
        match client.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(_) if since.elapsed() < Duration::from_secs(10) => {}
            Ok(_) => break Err("still flowing 10 s after the kill".to_owned()),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break Ok(()),
            Err(e) => break Err(format!("{e} ({:?})", e.kind())),
        }
    };
    assert!(
        ended.is_ok(),
        "the stolen connection neither ended nor was reset: {ended:?}"
    );
}

#[test]
fn kill_9_of_the_agent_ends_graft_with_a_clear_message_and_resets_cmds_remote_connections() {
    let bed = Bed::new();
    // CMD listens (so rules exist), holds a connection to the service's echo port
    // (remote: it leaves from the target), and reports how that connection ends.
    // SIGTERM from graft is ignored so the report is not cut short.
    let script = format!(
        "import signal, socket\n\
         signal.signal(signal.SIGTERM, lambda *a: None)\n\
         listener = socket.create_server(('0.0.0.0', {port}))\n\
         s = socket.create_connection(('{svc}', 7), timeout=10)\n\
         s.sendall(b'ping\\n')\n\
         got = b''\n\
         while len(got) < 5:\n    got += s.recv(16)\n\
         print('connected', got.decode().strip(), flush=True)\n\
         s.settimeout(4)\n\
         try:\n    print('eof' if s.recv(16) == b'' else 'data', flush=True)\n\
         except ConnectionResetError:\n    print('reset', flush=True)\n\
         except socket.timeout:\n    print('hung', flush=True)\n",
        port = bed.app_port,
        svc = bed.service_v4,
    );
    let mut command = bed.graft_run(&["--steal"], &[python(), "-c", &script]);
    // A connection the link relays: the target's own socket, which a local
    // target's program gets by default (fdpass.rs), outlives the agent.
    command.env("GRAFT_FD_PASSING", "0");
    let mut session = bed.spawn(command, "graft run --steal -- holder");
    let ready = wait_until(STEAL_TIMEOUT, Duration::from_millis(50), || {
        if let Some(status) = session.try_status() {
            panic!(
                "graft exited ({status}) before CMD connected\n{}",
                session.output_report()
            );
        }
        (session.stdout().contains("connected ping") && bed.has_graft_rules()).then_some(())
    });
    assert!(
        ready.is_some(),
        "CMD did not connect to the service or no rule appeared within {STEAL_TIMEOUT:?}\n{}",
        session.output_report()
    );

    kill_9(bed.agent_of(session.pid()));
    let since = Instant::now();
    assert_restored(&bed, since, &session);
    let status = session.wait_timeout(END_TIMEOUT);
    assert!(
        status.is_some(),
        "graft still runs {END_TIMEOUT:?} after its agent was killed\n{}",
        session.output_report()
    );
    let out = session.stdout();
    assert!(
        out.contains("reset"),
        "CMD's remote connection was not reset when the agent died (it says {:?})\n{}",
        out.lines().last(),
        session.output_report()
    );
    let status = status.unwrap();
    assert!(
        !status.success(),
        "graft exited successfully after losing its agent\n{}",
        session.output_report()
    );
    let err = session.stderr();
    assert!(
        err.contains("lost the link to the agent") && !err.contains("panicked"),
        "graft did not say it lost its agent\n{}",
        session.output_report()
    );
}

/// A server for the service's namespace (`python3 -c STREAMER PORT`): sends
/// endless 64 KiB chunks to every connection.
const STREAMER: &str = r#"
import socket, sys, threading
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
def stream(conn):
    try:
        while True:
            conn.sendall(b"z" * 65536)
    except OSError:
        pass
while True:
    conn, _ = server.accept()
    threading.Thread(target=stream, args=(conn,), daemon=True).start()
"#;

#[test]
fn link_cut_mid_outgoing_transfer_resets_cmds_connection() {
    let bed = Bed::new();
    let port: u16 = 5000;
    let mut streamer = Command::new("ip");
    streamer
        .args(["netns", "exec", &bed.service_ns, python(), "-c", STREAMER])
        .arg(port.to_string());
    let _streamer = bed.spawn(streamer, "streamer in the service netns");
    let service = SocketAddr::from((bed.service_v4, port));
    let up = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        bed.in_target_netns(move || {
            TcpStream::connect_timeout(&service, Duration::from_secs(1)).ok()
        })
        .map(drop)
    });
    assert!(up.is_some(), "the streamer did not come up at {service}");
    // CMD only reads (so the error of a reset reaches its recv, not a writer):
    // it reports `flowing` after 1 MiB, then how the stream ended. SIGTERM from
    // graft is ignored so the report is not cut short.
    let script = format!(
        "import signal, socket\n\
         signal.signal(signal.SIGTERM, lambda *a: None)\n\
         s = socket.create_connection(('{svc}', {port}), timeout=10)\n\
         got, told = 0, False\n\
         s.settimeout(4)\n\
         try:\n    while True:\n        n = len(s.recv(65536))\n        if n == 0:\n            print('eof', flush=True); break\n        got += n\n        if got >= 1 << 20 and not told:\n            print('flowing', flush=True); told = True\n\
         except ConnectionResetError:\n    print('reset', flush=True)\n\
         except socket.timeout:\n    print('hung', flush=True)\n",
        svc = bed.service_v4,
    );
    let mut command = bed.graft_run(&[], &[python(), "-c", &script]);
    // Through the link: the target's own socket (fdpass.rs) has no link to cut.
    command.env("GRAFT_FD_PASSING", "0");
    let mut session = bed.spawn(command, "graft run -- streamer");
    let flowing = wait_until(STEAL_TIMEOUT, Duration::from_millis(50), || {
        if let Some(status) = session.try_status() {
            panic!(
                "graft exited ({status}) before the transfer flowed\n{}",
                session.output_report()
            );
        }
        session.stdout().contains("flowing").then_some(())
    });
    assert!(
        flowing.is_some(),
        "the outgoing transfer did not flow within {STEAL_TIMEOUT:?}\n{}",
        session.output_report()
    );

    kill_9(bed.agent_of(session.pid()));
    let status = session.wait_timeout(END_TIMEOUT);
    assert!(
        status.is_some(),
        "graft still runs {END_TIMEOUT:?} after the link was cut\n{}",
        session.output_report()
    );
    let out = session.stdout();
    assert!(
        out.lines().last() == Some("reset"),
        "CMD's transfer was not reset when the link was cut\n{}",
        session.output_report()
    );
    assert!(
        !status.unwrap().success() && session.stderr().contains("lost the link to the agent"),
        "{}",
        session.output_report()
    );
    let gone = wait_until(RESTORE, Duration::from_millis(50), || {
        bed.agent_pids().is_empty().then_some(())
    });
    assert!(gone.is_some(), "agents left: {:?}", bed.agent_pids());
}

#[test]
fn target_exiting_mid_session_ends_graft_with_a_clear_message() {
    let bed = Bed::new();
    let mut session = steal_app(&bed, "echo");
    kill_9(bed.target_pid);
    let status = session.wait_timeout(END_TIMEOUT);
    assert!(
        status.is_some(),
        "graft still runs {END_TIMEOUT:?} after the target exited\n{}",
        session.output_report()
    );
    assert!(
        !status.unwrap().success(),
        "graft exited successfully although its target went away\n{}",
        session.output_report()
    );
    let err = session.stderr();
    let why = format!("target process {} exited", bed.target_pid);
    assert!(
        !err.contains("panicked") && err.contains(&why),
        "graft did not say {why:?}\n{}",
        session.output_report()
    );
    let gone = wait_until(RESTORE, Duration::from_millis(50), || {
        bed.agent_pids().is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "agents left after the target exited: {:?}",
        bed.agent_pids()
    );
}

/// Raises this process's open-file limit to its hard limit (children inherit it):
/// the test and CMD each hold a thousand sockets.
#[allow(unsafe_code)]
fn raise_fd_limit(needed: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own; setrlimit reads it.
    let ok = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    assert!(
        ok && limit.rlim_cur >= needed,
        "cannot raise the open-file limit to {needed} (hard limit {})",
        limit.rlim_max
    );
}

#[test]
fn a_thousand_concurrent_connections_through_a_steal_all_get_their_answer() {
    const CONNS: usize = 1000;
    raise_fd_limit(3 * CONNS as u64 + 256);
    let bed = Bed::new();
    let session = steal_app(&bed, "echo");
    let addr = SocketAddr::from((bed.target_v4, bed.app_port));
    let deadline = Instant::now() + Duration::from_secs(60);

    // All connections open at once before any is answered.
    let mut conns: Vec<BufReader<TcpStream>> = (0..CONNS)
        .map(|i| {
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("connection {i} of {CONNS} failed: {e}"));
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            BufReader::new(stream)
        })
        .collect();
    for (i, conn) in conns.iter_mut().enumerate() {
        conn.get_mut()
            .write_all(format!("conn-{i}\n").as_bytes())
            .unwrap_or_else(|e| panic!("write on connection {i} failed: {e}"));
    }
    let mut failures = Vec::new();
    for (i, conn) in conns.iter_mut().enumerate() {
        assert!(
            Instant::now() < deadline,
            "{CONNS} connections took over 60 s"
        );
        let mut greeting = String::new();
        let mut echo = String::new();
        let read = conn
            .read_line(&mut greeting)
            .and_then(|_| conn.read_line(&mut echo));
        if read.is_err() || greeting != "local\n" || echo != format!("echo conn-{i}\n") {
            failures.push(format!("{i}: {read:?} {greeting:?} {echo:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {CONNS} stolen connections failed, first: {:?}\n{}",
        failures.len(),
        failures.first(),
        session.output_report()
    );
    drop(conns);
    let err = session.stderr();
    assert!(!err.contains("panicked"), "{}", session.output_report());
}
