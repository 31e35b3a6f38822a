//! Item 8 of issue 2, bad input: a pid that does not exist, missing privileges,
//! garbage and oversized frames on the layer socket and at the agent, and a peer
//! speaking an unknown protocol version each give one clear error, crash nothing,
//! and leave nothing behind.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use graft_protocol::codec::{encode_frame, read_frame};
use graft_protocol::link::{AgentMessage, ClientMessage, Hello, HelloReply};
use graft_tests::{Bed, Outcome, Proc, RUN_TIMEOUT, agent_bin, graft_bin, wait_until};

#[test]
fn nonexistent_pid_gives_a_clear_error_and_nonzero_exit() {
    graft_tests::require_root();
    // pid_max itself is never handed out.
    let pid = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .to_owned();
    let work = tempfile::tempdir().unwrap();
    let marker = work.path().join("cmd-ran");
    let mut command = Command::new(graft_bin());
    command
        .args(["run", "--target", &format!("pid:{pid}"), "--", "touch"])
        .arg(&marker);
    let out = Proc::spawn(command, "graft run --target pid:<none>").finish(RUN_TIMEOUT);
    assert!(!out.success() && out.code().is_some(), "{out}");
    assert!(
        out.stderr.contains(&pid),
        "the error does not name pid {pid}:\n{out}"
    );
    let lower = out.stderr.to_lowercase();
    assert!(
        ["not exist", "no such process", "not found", "no process"]
            .iter()
            .any(|s| lower.contains(s)),
        "the error does not say the process does not exist:\n{out}"
    );
    assert!(
        !marker.exists(),
        "CMD ran although the target does not exist"
    );
    assert!(!lower.contains("panicked"), "{out}");
}

#[test]
fn missing_privileges_give_a_clear_error() {
    let bed = Bed::new();
    let target = format!("pid:{}", bed.target_pid);
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(graft_bin())
        .args(["run", "--target", &target, "--", "true"])
        .current_dir("/tmp")
        .env("HOME", "/tmp");
    let out = bed.finish(bed.spawn(command, "graft run as nobody"), RUN_TIMEOUT);
    assert!(!out.success() && out.code().is_some(), "{out}");
    let lower = out.stderr.to_lowercase();
    assert!(
        ["root", "cap_sys_admin", "privilege"]
            .iter()
            .any(|s| lower.contains(s)),
        "the error does not say which privileges are missing:\n{out}"
    );
    assert!(!lower.contains("panicked"), "{out}");
    assert!(!bed.has_graft_rules());
}

#[test]
fn garbage_frames_on_the_layer_socket_do_not_crash_the_session() {
    let bed = Bed::new();
    let out = bed.run_py(&[], "net_client.py", &["garbage-layer", &bed.service_url()]);
    assert_eq!(
        out.assert_success().out(),
        format!("after garbage: {}", bed.service_reply())
    );
}

/// An agent started by the test itself for the bed's target, and its socket.
struct Agent {
    proc: Proc,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

const SECRET: &str = "test-secret-0123456789";

fn start_agent(bed: &Bed) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut command = Command::new(agent_bin());
    command
        .args(["--target-pid", &bed.target_pid.to_string()])
        .arg(format!("--listen=unix:{}", socket.display()))
        .args(["--connect-timeout", "20"])
        .env("GRAFT_AGENT_SECRET", SECRET);
    let mut proc = bed.spawn(command, "graft-agent");
    let ready = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        if let Some(status) = proc.try_status() {
            panic!(
                "graft-agent exited ({status}) before ready\n{}",
                proc.output_report()
            );
        }
        proc.stdout().contains("ready").then_some(())
    });
    assert!(
        ready.is_some(),
        "graft-agent never said ready\n{}",
        proc.output_report()
    );
    Agent {
        proc,
        socket,
        _dir: dir,
    }
}

fn connect(agent: &Agent) -> UnixStream {
    let stream = UnixStream::connect(&agent.socket)
        .unwrap_or_else(|e| panic!("connect {}: {e}", agent.socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

/// Waits for the agent to exit and checks it exited cleanly (a code, not a
/// crash) and left the target as it was.
fn assert_agent_refused(bed: &Bed, agent: Agent) -> Outcome {
    let out = agent.proc.finish(Duration::from_secs(10));
    assert!(
        out.code().is_some_and(|c| c != 0),
        "the agent did not refuse cleanly:\n{out}"
    );
    assert!(!out.stderr.to_lowercase().contains("panicked"), "{out}");
    assert!(
        !bed.has_graft_rules(),
        "rules left:\n{}",
        bed.packet_rules()
    );
    assert_eq!(
        graft_tests::curl(&bed.target_url(80)).as_deref(),
        Ok(bed.target_reply().as_str())
    );
    out
}

/// Reads until the agent closes the stream (or 5 s pass); returns what it sent.
fn drain(mut stream: UnixStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    got
}

#[test]
fn agent_refuses_a_garbage_frame_without_crashing() {
    let bed = Bed::new();
    let agent = start_agent(&bed);
    let mut stream = connect(&agent);
    // A frame of 24 bytes that decode to nothing; the agent may close as soon as it
    // has seen enough, so a failed write is part of the expected outcome.
    let _ = stream.write_all(&[0, 0, 0, 24]);
    let _ = stream.write_all(&[0x9f; 24]);
    drain(stream);
    assert_agent_refused(&bed, agent);
}

#[test]
fn agent_refuses_an_oversized_frame_without_reading_it() {
    let bed = Bed::new();
    let agent = start_agent(&bed);
    let mut stream = connect(&agent);
    stream.write_all(&u32::MAX.to_be_bytes()).unwrap();
    // The agent may refuse and close as soon as it has read the header; a failed
    // write of the rest is part of the expected outcome.
    let _ = stream.write_all(&[0u8; 1024]);
    drain(stream);
    let out = assert_agent_refused(&bed, agent);
    assert!(
        out.stderr.contains("frame"),
        "the error does not name the frame:\n{out}"
    );
}

#[test]
fn agent_refuses_an_unknown_protocol_version_with_a_clear_message() {
    let bed = Bed::new();
    let agent = start_agent(&bed);
    let mut stream = connect(&agent);
    let hello = ClientMessage::Hello(Hello {
        version: "99.0.0".into(),
        secret: SECRET.into(),
        client: "graft-tests".into(),
    });
    stream.write_all(&encode_frame(&hello).unwrap()).unwrap();
    let reply: AgentMessage = read_frame(&mut stream).expect("the agent answers Hello");
    match reply {
        AgentMessage::Hello(HelloReply::Rejected { reason }) => {
            assert!(
                reason.contains("99.0.0"),
                "the refusal does not name the version: {reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drain(stream);
    assert_agent_refused(&bed, agent);
}

#[test]
fn agent_refuses_a_client_without_the_session_secret() {
    let bed = Bed::new();
    let agent = start_agent(&bed);
    let mut stream = connect(&agent);
    let hello = ClientMessage::Hello(Hello {
        version: graft_protocol::PROTOCOL_VERSION.into(),
        secret: "wrong".into(),
        client: "graft-tests".into(),
    });
    stream.write_all(&encode_frame(&hello).unwrap()).unwrap();
    let reply: AgentMessage = read_frame(&mut stream).expect("the agent answers Hello");
    assert!(
        matches!(reply, AgentMessage::Hello(HelloReply::Rejected { .. })),
        "a wrong secret was accepted: {reply:?}"
    );
    drain(stream);
    assert_agent_refused(&bed, agent);
}

#[test]
fn agent_for_a_nonexistent_pid_exits_with_a_clear_error() {
    graft_tests::require_root();
    let pid = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(agent_bin());
    command
        .args(["--target-pid", &pid])
        .arg(format!(
            "--listen=unix:{}",
            dir.path().join("a.sock").display()
        ))
        .env("GRAFT_AGENT_SECRET", SECRET);
    let out = Proc::spawn(command, "graft-agent --target-pid <none>").finish(RUN_TIMEOUT);
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(out.stderr.contains(&pid), "{out}");
}
