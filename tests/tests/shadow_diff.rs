//! The shadow diff (`graft run --mirror --diff`) and `graft replay FILE -- CMD` on
//! the test bed: the same real HTTP/1.1 server (`diff_http.py`) runs as the target
//! in its network namespace and as CMD on the host, answering alike on some
//! paths and differently on others; real clients (curl) call the target.
//!
//! What is shown: the JSON lines file holds exactly the requests CMD answered
//! differently (with the target's and CMD's statuses, the connection and the
//! request's place on it), the counts and the exit code say the same, the ignore
//! rules remove a random id and header; the attacks fail: a hostile CMD's 512 MiB
//! answer leaves graft's memory bounded, a CMD that never answers is reported
//! "no response" within `--diff-timeout` instead of hanging the session, a CMD
//! that exits ends the session cleanly (no rule, no agent, no process left).
//! `graft replay -- CMD` starts CMD (on this machine, or with the target's
//! context), replays to it, stops it, and a HAR with a bad entry starts nothing.

use std::process::Command;
use std::time::Duration;

use graft_tests::{Bed, Proc, STEAL_TIMEOUT, fixture_str, python, wait_until};
use serde_json::Value;

/// How long the counts may take to show every request sent.
const COUNTED: Duration = Duration::from_secs(30);
/// How long the session may take to end once CMD exited.
const END: Duration = Duration::from_secs(30);

/// Starts `diff_http.py NAME PORT` in the target's network namespace.
fn serve_in_target(bed: &Bed, port: u16) -> Proc {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &bed.target_ns, python()])
        .arg(fixture_str("diff_http.py"))
        .args(["target", &port.to_string()]);
    let server = bed.spawn(command, "diff_http.py in the target netns");
    let up = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        server.stdout().contains("listening").then_some(())
    });
    assert!(up.is_some(), "{}", server.output_report());
    server
}

/// Starts `graft run --mirror --diff FLAGS -- diff_http.py local PORT [hostile]`
/// and waits until the mirror is on.
fn start_diff(bed: &Bed, flags: &[&str], port: u16, hostile: bool) -> Proc {
    let mut all = vec!["--mirror", "--diff"];
    all.extend_from_slice(flags);
    let script = fixture_str("diff_http.py");
    let port_arg = port.to_string();
    let mut cmd = vec![python(), script.as_str(), "local", &port_arg];
    if hostile {
        cmd.push("hostile");
    }
    let what = format!("graft run {} -- {}", all.join(" "), cmd.join(" "));
    let mut session = bed.spawn(bed.graft_run(&all, &cmd), &what);
    let on = wait_until(STEAL_TIMEOUT, Duration::from_millis(50), || {
        if let Some(status) = session.try_status() {
            panic!("{what} exited ({status})\n{}", session.output_report());
        }
        session
            .stderr()
            .contains(&format!("mirroring port {port}"))
            .then_some(())
    });
    assert!(on.is_some(), "{}", session.output_report());
    session
}

/// `curl URL...` against the target (several URLs share one connection); the
/// bodies.
fn curl_target(bed: &Bed, port: u16, paths: &[&str]) -> String {
    let urls: Vec<String> = paths
        .iter()
        .map(|p| format!("http://{}:{port}{p}", bed.target_v4))
        .collect();
    let out = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "--max-time", "10"])
        .args(&urls)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {urls:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends GET requests for `paths` to the target in one write (HTTP/1.1
/// pipelining, the last with `Connection: close`); what the target answered.
fn pipelined(bed: &Bed, port: u16, paths: &[&str]) -> String {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect((bed.target_v4, port)).expect("the target listens");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut requests = String::new();
    for (i, path) in paths.iter().enumerate() {
        let close = if i + 1 == paths.len() {
            "Connection: close\r\n"
        } else {
            ""
        };
        requests.push_str(&format!("GET {path} HTTP/1.1\r\nHost: api\r\n{close}\r\n"));
    }
    stream.write_all(requests.as_bytes()).unwrap();
    let mut answers = String::new();
    stream
        .read_to_string(&mut answers)
        .expect("the target answers");
    answers
}

/// Waits until graft's stderr holds `line`.
fn wait_stderr(session: &mut Proc, line: &str, within: Duration) {
    let seen = wait_until(within, Duration::from_millis(100), || {
        session.stderr().contains(line).then_some(())
    });
    assert!(
        seen.is_some(),
        "no {line:?} within {within:?}\n{}",
        session.output_report()
    );
}

/// The peak resident set of `pid` in KiB (`VmHWM`, proc(5)).
fn peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the process runs")
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("a VmHWM line")
}

/// The lines of a JSON lines file.
fn json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("the diff file exists")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

/// Whether the bed's CMD (`diff_http.py local ...`) still runs.
fn cmd_running(bed: &Bed) -> bool {
    bed.pids_running("diff_http.py").into_iter().any(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|argv| argv.split(|b| *b == 0).any(|a| a == b"local"))
    })
}

/// Nothing of the session is left: no packet rule, no agent, no CMD.
fn assert_nothing_left(bed: &Bed) {
    let clean = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        (!bed.has_graft_rules() && bed.agent_pids().is_empty()).then_some(())
    });
    assert!(clean.is_some(), "left behind:\n{}", bed.packet_rules());
    assert!(!cmd_running(bed), "CMD is still running");
}

#[test]
fn shadow_diff_writes_exactly_the_requests_cmd_answers_differently() {
    let bed = Bed::new();
    let port = bed.map_port;
    let target = serve_in_target(&bed, port);
    let out = bed.work_dir().join("diff.jsonl");
    let out_arg = out.to_str().unwrap().to_owned();
    let mut session = start_diff(
        &bed,
        &[
            "--diff-out",
            &out_arg,
            "--diff-timeout",
            "2s",
            "--ignore-header",
            "date",
            "--ignore-header",
            "X-Request-Id",
            "--ignore-json-path",
            "$.id",
        ],
        port,
        true,
    );
    assert!(
        session.stderr().contains(&format!(
            "diff: CMD's answers are compared with the target's; differences go to {out_arg}"
        )),
        "{}",
        session.output_report()
    );

    // Two requests pipelined on one connection: the second differs.
    let answers = pipelined(&bed, port, &["/same", "/differ"]);
    assert!(answers.contains("\r\n\r\nsame\n"), "{answers}");
    assert!(
        answers.ends_with("target\n"),
        "the target answers: {answers}"
    );
    // A random id in the body and in a header: removed by the ignore rules.
    curl_target(&bed, port, &["/id"]);
    // The id is ignored, the token is not.
    curl_target(&bed, port, &["/token"]);
    // Hostile CMD: a 512 MiB answer to a 4-byte one.
    assert_eq!(curl_target(&bed, port, &["/big"]), "big\n");
    // Hostile CMD: never answers; the target does.
    assert_eq!(curl_target(&bed, port, &["/hang"]), "hang\n");
    wait_stderr(
        &mut session,
        "graft: diff: 2 same, 3 differ, 1 unmatched",
        COUNTED,
    );
    assert!(cmd_running(&bed), "CMD runs during the session");
    let peak = peak_kib(session.pid());
    assert!(
        peak < 200 * 1024,
        "graft's peak memory is {peak} KiB after CMD sent a 512 MiB answer"
    );

    // CMD answers /exit, then exits: the session ends by itself.
    assert_eq!(curl_target(&bed, port, &["/exit"]), "bye\n");
    let ended = session.finish(END);
    assert_eq!(ended.code(), Some(1), "differences make exit 1\n{ended}");
    assert!(
        ended
            .stderr
            .contains("graft: diff: 7 requests compared: 3 same, 3 differ, 1 unmatched"),
        "{ended}"
    );
    assert_nothing_left(&bed);
    // The target answered each request once, and kept serving.
    assert_eq!(
        target.stdout().matches("request target GET /same").count(),
        1
    );

    let lines = json_lines(&out);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&out).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the diff file is not private");
    let paths: Vec<&str> = lines.iter().map(|l| l["path"].as_str().unwrap()).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(sorted, ["/big", "/differ", "/hang", "/token"], "{lines:?}");
    let find = |path: &str| lines.iter().find(|l| l["path"] == path).unwrap();

    let differ = find("/differ");
    assert_eq!(differ["outcome"], "differ");
    assert_eq!(differ["method"], "GET");
    assert_eq!(differ["port"], port);
    assert_eq!(differ["request"], 2, "second on its connection: {differ}");
    assert_eq!(
        (
            differ["target_status"].as_u64(),
            differ["local_status"].as_u64()
        ),
        (Some(200), Some(200))
    );
    let changes = differ["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "only the body differs: {differ}");
    assert_eq!(changes[0]["kind"], "body");
    assert!(
        changes[0]["detail"]
            .as_str()
            .unwrap()
            .contains("7 bytes → 6 bytes"),
        "{differ}"
    );

    let token = find("/token");
    let kinds: Vec<&str> = token["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["body"], "{token}");
    let detail = token["changes"][0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("token") && !detail.contains("\"id\""),
        "{detail}"
    );

    let big = find("/big");
    assert_eq!(big["outcome"], "differ");
    let big_changes = big["changes"].to_string();
    assert!(
        big_changes.contains(&format!("4 bytes → {} bytes", 512u64 << 20)),
        "{big}"
    );

    let hang = find("/hang");
    assert_eq!(hang["outcome"], "unmatched");
    assert_eq!(hang["target_status"], 200);
    assert!(hang["local_status"].is_null());
    assert_eq!(hang["changes"][0]["kind"], "no_response");
    assert_eq!(hang["changes"][0]["side"], "local");
    assert!(
        hang["changes"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("did not answer within 2s"),
        "{hang}"
    );
}

#[test]
fn shadow_diff_with_nothing_different_exits_0_and_keeps_its_default_file() {
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = serve_in_target(&bed, port);
    let session = start_diff(&bed, &["--ignore-header", "date"], port, false);
    let stderr = session.stderr();
    let path = stderr
        .lines()
        .find_map(|l| {
            l.split_once("differences go to ")
                .map(|(_, p)| p.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no diff file announced\n{stderr}"));
    assert!(path.ends_with(".jsonl"), "{path}");
    curl_target(&bed, port, &["/same", "/big"]);
    // Both compared before CMD is told to exit: the copies of another connection
    // may lag behind the answers the target gave.
    let mut session = session;
    wait_stderr(
        &mut session,
        "graft: diff: 2 same, 0 differ, 0 unmatched",
        COUNTED,
    );
    assert_eq!(curl_target(&bed, port, &["/exit"]), "bye\n");
    let ended = session.finish(END);
    assert_eq!(ended.code(), Some(0), "{ended}");
    assert!(
        ended
            .stderr
            .contains("graft: diff: 3 requests compared: 3 same, 0 differ, 0 unmatched"),
        "{ended}"
    );
    assert_nothing_left(&bed);
    let kept = std::fs::read_to_string(&path).expect("the default diff file outlives the session");
    assert_eq!(kept, "", "nothing differed");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn shadow_diff_needs_a_whole_mirror_and_good_rules() {
    let bed = Bed::new();
    let out = bed
        .graft_run(&["--steal", "--diff"], &["true"])
        .output()
        .expect("graft runs");
    assert_eq!(out.status.code(), Some(2));
    let out = bed
        .graft_run(&["--diff", "--filter-path", "^/api"], &["true"])
        .output()
        .expect("graft runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--filter-*"), "{stderr}");
    let out = bed
        .graft_run(&["--diff", "--ignore-json-path", "a[x"], &["true"])
        .output()
        .expect("graft runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--ignore-json-path"), "{stderr}");
    assert!(bed.agent_pids().is_empty());
}

/// A HAR of three requests to `port`, with the answers of `diff_http.py target`.
fn har(port: u16, marker: &str) -> String {
    let entry = |path: &str, body: &str, ctype: &str| {
        serde_json::json!({
            "startedDateTime": "2026-11-30T09:00:00.000Z",
            "time": 1,
            "request": {"method": "GET", "url": format!("http://api:{port}{path}"),
                        "httpVersion": "HTTP/1.1", "headers": [{"name": "Host", "value": "api"}]},
            "response": {"status": 200, "statusText": "OK", "httpVersion": "HTTP/1.1",
                         "headers": [{"name": "Content-Type", "value": ctype},
                                     {"name": "Server", "value": "ignored"}],
                         "content": {"size": body.len(), "mimeType": ctype, "text": body}}
        })
    };
    serde_json::json!({"log": {"version": "1.2", "creator": {"name": "test", "version": "1"},
    "entries": [
        entry("/same", "same\n", "text/plain"),
        entry("/differ", "target\n", "text/plain"),
        entry("/id", r#"{"v": 1, "id": "recorded"}"#, "application/json"),
        entry("/env", &format!("{marker}\n"), "text/plain"),
    ]}})
    .to_string()
}

/// `graft replay ARGS -- python3 diff_http.py local PORT` to completion.
fn replay_cmd(bed: &Bed, args: &[&str], port: u16) -> graft_tests::Outcome {
    let script = fixture_str("diff_http.py");
    let port_arg = port.to_string();
    let mut all = vec!["replay"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--", python(), &script, "local", &port_arg]);
    let what = format!("graft {}", all.join(" "));
    bed.finish(bed.spawn(bed.graft(&all), &what), Duration::from_secs(90))
}

#[test]
fn replay_starts_cmd_replays_to_it_and_stops_it() {
    let bed = Bed::new();
    let port = bed.map_port;
    let file = bed.work_dir().join("api.har");
    std::fs::write(&file, har(port, &bed.marker)).unwrap();
    let file_arg = file.to_str().unwrap();
    let rules = [
        "--ignore-header",
        "date",
        "--ignore-header",
        "server",
        "--ignore-header",
        "x-request-id",
        "--ignore-json-path",
        "$.id",
    ];

    // No target: CMD runs on this machine only, without the target's environment.
    let mut args = vec![file_arg, "-o", "json"];
    args.extend_from_slice(&rules);
    let local = replay_cmd(&bed, &args, port);
    assert_eq!(local.code(), Some(1), "{local}");
    let report: Value = serde_json::from_str(&local.stdout).expect("JSON");
    let same: Vec<bool> = report["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["same"].as_bool().unwrap())
        .collect();
    assert_eq!(same, [true, false, true, false], "{report}");
    assert!(
        local.stderr.contains("CMD runs on this machine only"),
        "{local}"
    );
    assert!(!cmd_running(&bed), "CMD left running");

    // With the target: CMD gets the target's environment, so /env matches too.
    let target = format!("pid:{}", bed.target_pid);
    let mut args = vec![file_arg, "--target", &target];
    args.extend_from_slice(&rules);
    let remote = replay_cmd(&bed, &args, port);
    assert_eq!(remote.code(), Some(1), "/differ still differs\n{remote}");
    assert!(
        remote.stderr.contains(&format!("agent ready for {target}")),
        "{remote}"
    );
    assert!(
        remote.stdout.contains("4 requests: 3 same, 1 different"),
        "{remote}"
    );
    assert_nothing_left(&bed);
}

#[test]
fn replay_with_a_bad_entry_or_a_busy_port_starts_nothing() {
    let bed = Bed::new();
    let port = bed.map_port;
    let file = bed.work_dir().join("bad.har");
    std::fs::write(
        &file,
        r#"{"log":{"entries":[{"request":{"method":"GET","url":"http://x/ok"},"response":{"status":200}},
            {"request":{"url":"http://x/no-method"},"response":{"status":200}}]}}"#,
    )
    .unwrap();
    let marker = bed.work_dir().join("started");
    let out = bed
        .graft(&[
            "replay",
            file.to_str().unwrap(),
            "--",
            "touch",
            marker.to_str().unwrap(),
        ])
        .output()
        .expect("graft runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("entry 2 (? http://x/no-method): request.method is missing"),
        "{stderr}"
    );
    assert!(!marker.exists(), "CMD was started");

    // A port that answers already: the replay would reach that program.
    std::fs::write(&file, har(port, "-")).unwrap();
    let busy = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    let out = bed
        .graft(&[
            "replay",
            file.to_str().unwrap(),
            "--",
            "touch",
            marker.to_str().unwrap(),
        ])
        .output()
        .expect("graft runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("port {port} already answers on this machine")),
        "{stderr}"
    );
    assert!(!marker.exists(), "CMD was started");
    drop(busy);

    // A CMD that exits without listening: a clear failure, not a hang.
    let out = bed
        .graft(&["replay", file.to_str().unwrap(), "--", "true"])
        .output()
        .expect("graft runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "CMD exited (exit status: 0) before it listened on port {port}"
        )),
        "{stderr}"
    );
}

#[test]
fn replay_to_a_go_server_with_the_target_warns_it_keeps_only_the_environment() {
    let bed = Bed::new();
    let port = bed.map_port;
    let goapp = bed.work_dir().join("goapp");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&goapp)
        .arg(fixture_str("goapp.go"))
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .env("GOCACHE", "/tmp/graft-test-gocache")
        .env("GOPATH", "/tmp/graft-test-gopath")
        .current_dir(bed.work_dir())
        .status()
        .expect("go build (Debian's golang-go)");
    assert!(status.success(), "go build goapp.go failed");
    let body = format!(
        "local go port={port} path=/go user=alice marker={}\n",
        bed.marker
    );
    let har = serde_json::json!({"log": {"version": "1.2", "entries": [{
        "request": {"method": "GET", "url": format!("http://api:{port}/go"),
                    "headers": [{"name": "X-User", "value": "alice"}]},
        "response": {"status": 200,
                     "headers": [{"name": "Content-Type", "value": "text/plain; charset=utf-8"}],
                     "content": {"size": body.len(), "text": body}}}]}});
    let file = bed.work_dir().join("go.har");
    std::fs::write(&file, har.to_string()).unwrap();
    let target = format!("pid:{}", bed.target_pid);
    let goapp_arg = goapp.to_str().unwrap();
    let port_arg = port.to_string();
    let args = [
        "replay",
        file.to_str().unwrap(),
        "--target",
        &target,
        "--ignore-header",
        "date",
        "--",
        goapp_arg,
        "serve",
        &port_arg,
    ];
    let out = bed.finish(
        bed.spawn(bed.graft(&args), "graft replay -- goapp"),
        Duration::from_secs(90),
    );
    assert_eq!(
        out.code(),
        Some(0),
        "the Go server answers as recorded\n{out}"
    );
    assert!(out.stderr.contains("does not load the layer"), "{out}");
    assert!(
        out.stdout.contains("1 requests: 1 same, 0 different"),
        "{out}"
    );
    assert!(bed.pids_running("goapp").is_empty(), "CMD left running");
}
