//! Live cluster (see `graft_tests::cluster`): incoming traffic on a real pod.
//! `--all-pods` over two replicas, `--mirror` (the pod keeps answering, the
//! local program gets a copy), and HTTP-filtered steal: two concurrent sessions
//! from two graft processes (one filtered by header, one by path and method)
//! with the unmatched requests answered by the pod, over HTTP/1.1 keep-alive and
//! a 150-request load, then h2c, gRPC and WebSocket under a header filter
//! (those three need the sample servers' Python modules in the pod:
//! `GRAFT_E2E_HOST_PYTHON=1`). Clients run on this machine against the pod's
//! address; every server names itself in its answers.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use graft_tests::cluster::{
    APP_PORT, Live, Ns, SESSION_TIMEOUT, interrupt, local_server, local_server_on, py_with,
    served_by, wait_restored, wait_served_by,
};
use graft_tests::{Outcome, Proc, fixture_str, wait_until};
use serde_json::{Value, json};

/// The header filter of alice's sessions.
const ALICE: &str = "x-user: alice";

/// Runs a fixture client on this machine (not under graft), bounded by 30 s.
fn client(modules: &str, script: &str, args: &[&str]) -> Outcome {
    let mut command = Command::new(py_with(modules));
    command.arg(fixture_str(script)).args(args);
    Proc::spawn(command, &format!("{script} {args:?}")).finish(Duration::from_secs(30))
}

/// The JSON values a client printed, one per line.
fn json_lines(out: &Outcome) -> Vec<Value> {
    out.lines()
        .into_iter()
        .filter(|line| !line.is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{line:?} is not JSON ({e})\n{out}"))
        })
        .collect()
}

/// Asserts that reply `i` came from `server` with status 200 and a body that
/// contains every string of `contains`.
#[track_caller]
fn assert_reply(replies: &[Value], i: usize, server: &str, contains: &[&str]) {
    let reply = &replies[i];
    assert_eq!(reply["status"], 200, "reply {i}: {reply}");
    assert_eq!(reply["served_by"], server, "reply {i}: {reply}");
    let body = reply["body"].as_str().unwrap_or_default();
    for part in contains {
        assert!(body.contains(part), "reply {i} lacks {part:?}: {reply}");
    }
}

/// Skips (printing why) unless the pods can run the protocol servers.
fn protocols(live: &Live) -> bool {
    if !live.host_python {
        println!(
            "skipped: GRAFT_E2E_HOST_PYTHON is not 1 (the pod's python3 has no h2, grpc and \
             websockets modules)"
        );
    }
    live.host_python
}

/// Waits until `probe` holds (within [`SESSION_TIMEOUT`]), failing with
/// `graft`'s output.
fn wait_for(graft: &Proc, what: &str, mut probe: impl FnMut() -> bool) {
    let done = wait_until(SESSION_TIMEOUT, Duration::from_millis(300), || {
        probe().then_some(())
    });
    assert!(
        done.is_some(),
        "{what}: not within {SESSION_TIMEOUT:?}\n{}",
        graft.output_report()
    );
}

#[test]
fn e2e_all_pods_steals_on_both_replicas_ephemeral() {
    all_pods("ephemeral");
}

#[test]
fn e2e_all_pods_steals_on_both_replicas_node() {
    all_pods("node");
}

fn all_pods(mode: &str) {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace(&format!("allpods-{mode}"));
    ns.workload("Deployment", "web", 2, 2);
    let addrs: Vec<SocketAddr> = ns
        .wait_ready("app=web", 2)
        .iter()
        .map(graft_tests::cluster::addr_of)
        .collect();
    let graft = ns.run(
        "deploy/web/container/app",
        &["--all-pods", "--agent-mode", mode, "--steal"],
        &local_server("local", ""),
    );
    for addr in &addrs {
        wait_served_by(*addr, "local", SESSION_TIMEOUT, Some(&graft));
    }
    println!("{}", interrupt(graft));
    for addr in addrs {
        wait_restored(&ns, addr, "web");
    }
}

#[test]
fn e2e_mirror_copies_while_the_pod_answers_ephemeral() {
    mirror("ephemeral");
}

#[test]
fn e2e_mirror_copies_while_the_pod_answers_node() {
    mirror("node");
}

fn mirror(mode: &str) {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace(&format!("mirror-{mode}"));
    ns.workload("Pod", "web", 1, 1);
    let addr = ns.app_addr("app=web");
    let graft = ns.run(
        "pod/web/container/app",
        &["--agent-mode", mode, "--mirror"],
        &local_server("local", ""),
    );
    let mut n = 0;
    wait_for(
        &graft,
        "a mirrored request reaches the local program",
        || {
            n += 1;
            let answer = served_by(addr, &format!("/mirror-{n}"));
            assert_eq!(
                answer, "web",
                "a mirrored request was not answered by the pod"
            );
            graft.stdout().contains("request local GET /mirror-")
        },
    );
    println!("{}", interrupt(graft));
    wait_restored(&ns, addr, "web");
}

/// Two graft processes on one pod: alice's takes `x-user: alice`, bob's takes
/// `POST /bob…`; everything else, on the same keep-alive connections, reaches
/// the pod.
#[test]
fn e2e_filtered_steal_two_sessions_http1() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("filters");
    ns.workload("Pod", "web", 1, 1);
    let addr = ns.app_addr("app=web");
    let alice = ns.run(
        "pod/web/container/app",
        &["--steal", "--filter-header", ALICE],
        &local_server("alice", ""),
    );
    let bob = ns.run(
        "pod/web/container/app",
        &[
            "--steal",
            "--filter-path",
            "^/bob",
            "--filter-method",
            "POST",
            "--port-map",
            "9001:8080",
        ],
        &local_server_on("bob", "", 9001),
    );
    let host = addr.ip().to_string();
    let port = APP_PORT.to_string();
    let conn = |specs: &[&str]| {
        let mut args = vec!["conn", host.as_str(), port.as_str()];
        args.extend_from_slice(specs);
        let out = client("", "http_client.py", &args);
        let replies = json_lines(&out);
        (out.success() && replies.len() == specs.len()).then_some(replies)
    };
    for (graft, spec, name) in [
        (&alice, "user=alice,path=/probe", "alice"),
        (&bob, "method=POST,path=/bob/probe", "bob"),
    ] {
        wait_for(
            graft,
            &format!("{name}'s session takes its requests"),
            || conn(&[spec]).is_some_and(|r| r[0]["served_by"] == name),
        );
    }
    let replies = conn(&[
        "user=alice,path=/a1",
        "path=/p1",
        "method=POST,path=/bob/1,body=100",
        "method=GET,path=/bob/2",
        "user=alice,method=POST,path=/bob/3,body=10",
        "method=POST,path=/other,body=5",
        "header=X-User:ALICE,path=/a2",
    ])
    .expect("every request on the keep-alive connection is answered");
    assert_reply(&replies, 0, "alice", &["GET /a1 ", "user=alice"]);
    assert_reply(&replies, 1, "web", &["GET /p1 "]);
    assert_reply(&replies, 2, "bob", &["POST /bob/1 len=100"]);
    assert_reply(&replies, 3, "web", &["GET /bob/2 "]);
    // Both sessions match: one of them takes it, never the pod.
    assert_ne!(replies[4]["served_by"], "web", "{}", replies[4]);
    assert_reply(&replies, 5, "web", &["POST /other len=5"]);
    assert_reply(&replies, 6, "alice", &["GET /a2 "]);

    // 150 requests from 6 keep-alive clients, users cycling alice, bob, none:
    // alice's go to alice, every other one to the pod, none lost or misrouted.
    let url = format!("http://{addr}");
    let out = client("requests", "http_client.py", &["load", &url, "150", "6"]);
    let load = json_lines(&out).pop().unwrap_or_default();
    assert_eq!(load["total"], 150, "{out}");
    assert_eq!(load["errors"], json!([]), "{out}");
    assert_eq!(load["bad"], json!([]), "{out}");
    assert_eq!(
        load["routes"],
        json!({"alice->alice": 50, "bob->web": 50, "none->web": 50}),
        "{out}"
    );
    println!("{}", interrupt(alice));
    println!("{}", interrupt(bob));
    wait_restored(&ns, addr, "web");
}

/// Starts the pod `web` serving `server` (a fixture under `/fixtures`, with
/// `web` and the port as its last arguments) and a session with a header filter
/// whose local program is the same server named `local`.
fn protocol_session(ns: &Ns<'_>, mode: &str, modules: &str, server: &[&str]) -> (SocketAddr, Proc) {
    let port = APP_PORT.to_string();
    let in_pod: Vec<String> = server.iter().map(|a| format!("/fixtures/{a}")).collect();
    let mut pod_cmd: Vec<&str> = vec!["python3", "-u", &in_pod[0]];
    pod_cmd.extend(&server[1..]);
    pod_cmd.extend(["web", &port]);
    ns.workload_serving("Pod", "web", 1, 1, &pod_cmd);
    let addr = ns.app_addr("app=web");
    let mut local = vec![py_with(modules), "-u".into(), fixture_str(server[0])];
    local.extend(server[1..].iter().map(|a| (*a).to_owned()));
    local.extend(["local".into(), port]);
    let graft = ns.run(
        "pod/web/container/app",
        &["--agent-mode", mode, "--steal", "--filter-header", ALICE],
        &local,
    );
    (addr, graft)
}

#[test]
fn e2e_filtered_steal_h2c_ephemeral() {
    h2c("ephemeral");
}

#[test]
fn e2e_filtered_steal_h2c_node() {
    h2c("node");
}

fn h2c(mode: &str) {
    let Some(live) = Live::get() else {
        return;
    };
    if !protocols(&live) {
        return;
    }
    let ns = live.namespace(&format!("h2c-{mode}"));
    let (addr, graft) = protocol_session(&ns, mode, "h2", &["named_http.py"]);
    let host = addr.ip().to_string();
    let port = APP_PORT.to_string();
    let streams = |specs: &[&str]| {
        let mut args = vec![host.as_str(), port.as_str()];
        args.extend_from_slice(specs);
        let out = client("h2", "h2_client.py", &args);
        let replies = json_lines(&out);
        (out.success() && replies.len() == specs.len()).then_some(replies)
    };
    wait_for(
        &graft,
        "alice's h2c stream reaches the local program",
        || streams(&["user=alice,path=/probe"]).is_some_and(|r| r[0]["served_by"] == "local"),
    );
    // Concurrent streams of one connection, each routed on its own.
    let replies = streams(&[
        "user=alice,path=/s1",
        "path=/s2",
        "user=bob,method=POST,path=/s3,body=5000",
        "user=alice,method=POST,path=/s4,body=7000",
        "path=/s5",
    ])
    .expect("every stream is answered");
    assert_reply(&replies, 0, "local", &["GET /s1 ", "proto=h2"]);
    assert_reply(&replies, 1, "web", &["GET /s2 ", "proto=h2"]);
    assert_reply(&replies, 2, "web", &["POST /s3 len=5000", "proto=h2"]);
    assert_reply(&replies, 3, "local", &["POST /s4 len=7000", "proto=h2"]);
    assert_reply(&replies, 4, "web", &["GET /s5 ", "proto=h2"]);
    println!("{}", interrupt(graft));
    wait_restored(&ns, addr, "web");
}

#[test]
fn e2e_filtered_steal_grpc_ephemeral() {
    grpc("ephemeral");
}

#[test]
fn e2e_filtered_steal_grpc_node() {
    grpc("node");
}

fn grpc(mode: &str) {
    let Some(live) = Live::get() else {
        return;
    };
    if !protocols(&live) {
        return;
    }
    let ns = live.namespace(&format!("grpc-{mode}"));
    let (addr, graft) = protocol_session(&ns, mode, "grpc", &["grpc_app.py", "server"]);
    let host = addr.ip().to_string();
    let port = APP_PORT.to_string();
    let call = |user: &str| {
        let out = client(
            "grpc",
            "grpc_app.py",
            &["client", &host, &port, user, "hello"],
        );
        let values = json_lines(&out);
        (out.success() && values.len() == 1).then(|| values[0].clone())
    };
    wait_for(&graft, "alice's gRPC calls reach the local program", || {
        call("alice").is_some_and(|r| r["unary"] == "local unary hello")
    });
    for (user, server) in [("alice", "local"), ("bob", "web"), ("-", "web")] {
        let reply = call(user).unwrap_or_else(|| panic!("the gRPC calls of {user} failed"));
        assert_eq!(reply["unary"], format!("{server} unary hello"), "{reply}");
        assert_eq!(reply["unary_code"], "OK", "{reply}");
        assert_eq!(
            reply["unary_trailers"]["x-trailer"],
            format!("{server}-done"),
            "{reply}"
        );
        let stream: Vec<String> = (0..3)
            .map(|i| format!("{server} stream {i} hello"))
            .collect();
        assert_eq!(reply["stream"], json!(stream), "{reply}");
        assert_eq!(reply["stream_code"], "OK", "{reply}");
    }
    println!("{}", interrupt(graft));
    ns.wait_ready("app=web", 1);
    assert_eq!(ns.agent_pods_after_cleanup(), 0);
    let reply = call("alice").expect("the pod answers gRPC after the session");
    assert_eq!(reply["unary"], "web unary hello");
}

#[test]
fn e2e_filtered_steal_websocket_ephemeral() {
    websocket("ephemeral");
}

#[test]
fn e2e_filtered_steal_websocket_node() {
    websocket("node");
}

fn websocket(mode: &str) {
    let Some(live) = Live::get() else {
        return;
    };
    if !protocols(&live) {
        return;
    }
    let ns = live.namespace(&format!("ws-{mode}"));
    let (addr, graft) = protocol_session(&ns, mode, "websockets", &["ws_app.py", "server"]);
    let url = format!("ws://{addr}/chat");
    let talk = |user: &str, messages: &[&str]| {
        let mut args = vec!["client", url.as_str(), user];
        args.extend_from_slice(messages);
        let out = client("websockets", "ws_app.py", &args);
        let values = json_lines(&out);
        (out.success() && values.len() == 1).then(|| values[0].clone())
    };
    wait_for(
        &graft,
        "alice's WebSocket reaches the local program",
        || talk("alice", &["probe"]).is_some_and(|a| a[0] == "local: probe"),
    );
    let many = ["one", "two", "three", "four"];
    for (user, server) in [("alice", "local"), ("-", "web"), ("bob", "web")] {
        let answers = talk(user, &many).unwrap_or_else(|| panic!("the WebSocket of {user} failed"));
        let expected: Vec<String> = many.iter().map(|m| format!("{server}: {m}")).collect();
        assert_eq!(answers, json!(expected), "{user}");
    }
    println!("{}", interrupt(graft));
    assert!(
        wait_until(Duration::from_secs(30), Duration::from_millis(500), || {
            talk("alice", &["after"]).filter(|a| a[0] == "web: after")
        })
        .is_some(),
        "the pod does not answer alice's WebSocket after the session"
    );
}
