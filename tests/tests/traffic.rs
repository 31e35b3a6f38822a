//! `graft record` on the test bed: a real HTTP/1.1 server (`named_http.py`) in the
//! target's network namespace, real clients (curl) on the host, and the HAR file
//! graft writes, read back as JSON.
//!
//! What is shown: the target keeps answering every request (mirror, never steal);
//! the archive holds each request with the target's own response (chunked bodies
//! decoded, binary bodies base64); `--filter-*` picks the requests; the default
//! redaction removes `Authorization`, `Cookie` and `Set-Cookie` values so that the
//! secret is nowhere in the file; the file is private (0600); a bad `-o` fails
//! before any agent starts.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use graft_tests::{Bed, Proc, STEAL_TIMEOUT, fixture_str, python, wait_until};
use serde_json::Value;

/// How long `graft record --count N` may take to end once N requests were sent.
const RECORD_END: Duration = Duration::from_secs(20);

/// A secret the client sends; it must never reach the archive.
const SECRET: &str = "Bearer s3cret-token-4711";

/// Starts `named_http.py NAME PORT` in the target's network namespace and waits
/// until it listens.
fn serve_in_target(bed: &Bed, name: &str, port: u16) -> Proc {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &bed.target_ns, python()])
        .arg(fixture_str("named_http.py"))
        .args([name, &port.to_string()]);
    let server = bed.spawn(command, "named_http.py in the target netns");
    let up = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        server.stdout().contains("listening").then_some(())
    });
    assert!(
        up.is_some(),
        "the server did not listen\n{}",
        server.output_report()
    );
    server
}

/// Starts `graft record --target pid:PID ARGS...` and waits until it records.
fn start_record(bed: &Bed, args: &[&str]) -> Proc {
    start_record_with(bed, args, false)
}

/// [`start_record`], under a bounding set without `CAP_NET_RAW` when
/// `pass_through` (the agent then mirrors by redirect and pass-through instead
/// of sniffing).
fn start_record_with(bed: &Bed, args: &[&str], pass_through: bool) -> Proc {
    let target = format!("pid:{}", bed.target_pid);
    let mut all = vec!["record", "--target", &target];
    all.extend_from_slice(args);
    let mut command = bed.graft(&all);
    if pass_through {
        let graft = command;
        command = Command::new("capsh");
        command
            .arg("--drop=cap_net_raw")
            .args(["--", "-c", "exec \"$0\" \"$@\""])
            .arg(graft.get_program())
            .args(graft.get_args())
            .current_dir(graft_tests::package_dir())
            .env("GRAFT_LOG", "debug");
    }
    let mut record = bed.spawn(command, &format!("graft {}", all.join(" ")));
    let recording = wait_until(STEAL_TIMEOUT, Duration::from_millis(50), || {
        if let Some(status) = record.try_status() {
            panic!(
                "graft record exited ({status}) before recording\n{}",
                record.output_report()
            );
        }
        record
            .stderr()
            .contains("graft: recording port")
            .then_some(())
    });
    assert!(
        recording.is_some(),
        "graft record did not start within {STEAL_TIMEOUT:?}\n{}",
        record.output_report()
    );
    record
}

/// `curl ARGS... URL`: the response head and body (`-i`), which must succeed.
fn curl(args: &[&str], url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-i", "-g", "--noproxy", "*", "--max-time", "5"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?} {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of header `name` of HAR headers `list`.
fn har_header<'a>(list: &'a Value, name: &str) -> Option<&'a str> {
    list.as_array()?
        .iter()
        .find(|h| {
            h["name"]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .and_then(|h| h["value"].as_str())
}

#[test]
fn record_writes_the_targets_exchanges_as_har_with_secrets_redacted() {
    let bed = Bed::new();
    let port = bed.map_port;
    let _server = serve_in_target(&bed, "target", port);
    let har_path = bed.work_dir().join("api.har");
    let har_arg = har_path.to_str().unwrap().to_owned();
    let record = start_record(
        &bed,
        &[
            "--port",
            &port.to_string(),
            "--filter-path",
            "^/(api|stream)/",
            "--count",
            "3",
            "-o",
            &har_arg,
        ],
    );

    let base = format!("http://{}:{port}", bed.target_v4);
    // Not under /api/ or /stream/: answered by the target, not recorded.
    let skipped = curl(&[], &format!("{base}/health"));
    assert!(skipped.contains("x-served-by: target"), "{skipped}");
    let posted = curl(
        &[
            "-H",
            &format!("Authorization: {SECRET}"),
            "-H",
            "Cookie: session=s3cret-cookie",
            "-H",
            "X-Request-Id: rec-1",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            r#"{"name":"alice"}"#,
        ],
        &format!("{base}/api/users?team=a&x=1"),
    );
    assert!(
        posted.contains("target POST /api/users?team=a&x=1 len=16"),
        "{posted}"
    );
    let binary_path = bed.work_dir().join("body.bin");
    std::fs::write(&binary_path, [0xff, 0x00, 0x01, 0x80]).unwrap();
    let binary = format!("@{}", binary_path.display());
    let put = curl(
        &["-X", "PUT", "--data-binary", &binary],
        &format!("{base}/api/blob"),
    );
    assert!(put.contains("target PUT /api/blob len=4"), "{put}");
    let streamed = curl(&[], &format!("{base}/stream/3"));
    assert!(streamed.contains("target chunk 2"), "{streamed}");

    let out = record.finish(RECORD_END);
    assert!(out.success(), "graft record failed\n{out}");
    assert!(out.stderr.contains("recorded 3 requests"), "{out}");

    let raw = std::fs::read_to_string(&har_path).expect("the HAR file exists");
    assert!(
        !raw.contains("s3cret"),
        "a redacted secret reached the HAR file:\n{raw}"
    );
    let mode = std::fs::metadata(&har_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the HAR file is not private");
    let leftovers: Vec<_> = std::fs::read_dir(bed.work_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".graft-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    let har: Value = serde_json::from_str(&raw).expect("the HAR file is JSON");
    assert_eq!(har["log"]["version"], "1.2");
    assert_eq!(har["log"]["creator"]["name"], "graft");
    let entries = har["log"]["entries"].as_array().expect("entries");
    let urls: Vec<&str> = entries
        .iter()
        .map(|e| e["request"]["url"].as_str().unwrap())
        .collect();
    assert_eq!(
        urls,
        [
            format!("{base}/api/users?team=a&x=1"),
            format!("{base}/api/blob"),
            format!("{base}/stream/3"),
        ],
        "{raw}"
    );

    let post = &entries[0];
    assert_eq!(post["request"]["method"], "POST");
    assert_eq!(post["request"]["httpVersion"], "HTTP/1.1");
    assert_eq!(post["request"]["queryString"][0]["name"], "team");
    assert_eq!(post["request"]["postData"]["text"], r#"{"name":"alice"}"#);
    assert_eq!(post["request"]["postData"]["mimeType"], "application/json");
    let headers = &post["request"]["headers"];
    assert_eq!(har_header(headers, "x-request-id"), Some("rec-1"));
    assert_eq!(
        har_header(headers, "authorization"),
        Some("[redacted by graft]")
    );
    assert_eq!(har_header(headers, "cookie"), Some("[redacted by graft]"));
    assert_eq!(post["response"]["status"], 200);
    assert_eq!(
        har_header(&post["response"]["headers"], "x-served-by"),
        Some("target")
    );
    let text = post["response"]["content"]["text"].as_str().unwrap();
    assert!(
        text.starts_with("target POST /api/users?team=a&x=1 len=16"),
        "{text}"
    );
    assert_eq!(post["response"]["content"]["size"], text.len());
    assert!(post["time"].as_f64().unwrap() >= 0.0);
    assert!(
        post["startedDateTime"].as_str().unwrap().ends_with('Z'),
        "{post}"
    );

    let put = &entries[1];
    assert_eq!(put["request"]["bodySize"], 4);
    assert_eq!(put["request"]["postData"]["_encoding"], "base64");
    // 0xff 0x00 0x01 0x80 in base64 (RFC 4648).
    assert_eq!(put["request"]["postData"]["text"], "/wABgA==");

    let stream = &entries[2];
    let text = stream["response"]["content"]["text"].as_str().unwrap();
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["target chunk 0", "target chunk 1", "target chunk 2"],
        "the chunked body is not decoded: {stream}"
    );

    // The archive replays: against the same server every answer is as recorded
    // (but its Date), against another server every body and x-served-by differ.
    let to = format!("http://{}:{port}", bed.target_v4);
    let same = replay(
        &bed,
        &[
            &har_arg,
            "--to",
            &to,
            "--ignore-header",
            "date",
            "-o",
            "json",
        ],
    );
    assert!(same.success(), "{same}");
    let report: Value = serde_json::from_str(&same.stdout).expect("JSON");
    assert_eq!(report["same"], 3, "{report}");
    // Date has a resolution of one second (RFC 9110 §5.6.7): replayed in the
    // second it was recorded in, it would match. Past it, it cannot.
    std::thread::sleep(Duration::from_millis(1100));
    let dated = replay(&bed, &[&har_arg, "--to", &to]);
    assert_eq!(dated.code(), Some(1), "the Date header differs\n{dated}");
    assert!(dated.stdout.contains("header date"), "{dated}");

    let mut other = Command::new(python());
    other
        .arg(fixture_str("named_http.py"))
        .args(["other", &bed.app_port.to_string()]);
    let other = bed.spawn(other, "named_http.py other on the host");
    let up = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        other.stdout().contains("listening").then_some(())
    });
    assert!(up.is_some(), "{}", other.output_report());
    let elsewhere = format!("http://127.0.0.1:{}", bed.app_port);
    let differ = replay(
        &bed,
        &[
            &har_arg,
            "--to",
            &elsewhere,
            "--ignore-header",
            "date",
            "-o",
            "json",
        ],
    );
    assert_eq!(differ.code(), Some(1), "{differ}");
    let report: Value = serde_json::from_str(&differ.stdout).expect("JSON");
    assert_eq!(report["different"], 3, "{report}");
    let first = &report["requests"][0];
    assert_eq!(first["path"], "/api/users?team=a&x=1");
    let kinds: Vec<&str> = first["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["header", "body"], "{first}");
    // The replayed POST carried the recorded body (16 bytes), not the redacted
    // Authorization header.
    assert!(
        other
            .stdout()
            .contains("request other POST /api/users?team=a&x=1 len=16")
    );
}

/// `graft replay ARGS...` to completion.
fn replay(bed: &Bed, args: &[&str]) -> graft_tests::Outcome {
    let mut all = vec!["replay"];
    all.extend_from_slice(args);
    let what = format!("graft {}", all.join(" "));
    bed.finish(bed.spawn(bed.graft(&all), &what), Duration::from_secs(60))
}

/// `graft replay ARGS...` without a bed (nothing of the target is needed).
fn graft_replay(args: &[&str]) -> std::process::Output {
    Command::new(graft_tests::graft_bin())
        .arg("replay")
        .args(args)
        .output()
        .expect("graft runs")
}

#[test]
fn replay_names_the_entry_it_cannot_use_and_the_target_it_cannot_reach() {
    let dir = tempfile::tempdir().unwrap();
    let har = dir.path().join("foreign.har");
    std::fs::write(
        &har,
        r#"{"log":{"version":"1.2","creator":{"name":"browser","version":"1"},"entries":[
          {"request":{"method":"GET","url":"http://x/ok","headers":[]},"response":{"status":200,"headers":[],"content":{"size":0,"text":""}}},
          {"request":{"method":"GET","headers":[]},"response":{"status":200}}]}}"#,
    )
    .unwrap();
    let out = graft_replay(&[har.to_str().unwrap(), "--to", "http://127.0.0.1:9"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("entry 2 (GET ?): request.url is missing"),
        "{stderr}"
    );

    std::fs::write(
        &har,
        r#"{"log":{"entries":[{"request":{"method":"GET","url":"http://x/ok"},"response":{"status":200}}]}}"#,
    )
    .unwrap();
    // Port 9 (discard) listens nowhere on the test machine: refused.
    let out = graft_replay(&[har.to_str().unwrap(), "--to", "http://127.0.0.1:9"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("entry 1 (GET /ok): cannot connect to 127.0.0.1:9"),
        "{stderr}"
    );
}

#[test]
fn record_refuses_an_unwritable_output_before_starting_an_agent() {
    let bed = Bed::new();
    let target = format!("pid:{}", bed.target_pid);
    let out = bed
        .graft(&[
            "record",
            "--target",
            &target,
            "--port",
            "80",
            "-o",
            "/nonexistent-dir/x.har",
        ])
        .output()
        .expect("graft runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot write /nonexistent-dir/x.har"),
        "{stderr}"
    );
    assert!(bed.agent_pids().is_empty(), "an agent was started");
}

/// Eight requests in a row, each on its own connection, sent within a few
/// milliseconds: their copies reach graft together (one block of the sniffing
/// mirror's capture ring), on eight connections read at once. The archive still
/// lists them in the order the target got them, with times that say so: the
/// agent dates each chunk when the kernel captured it (tap time frames).
#[test]
fn record_keeps_the_order_of_requests_whose_copies_arrive_together() {
    record_burst(false);
}

/// The same through the pass-through mirror (an agent without `CAP_NET_RAW`),
/// which dates each chunk when it reads it.
#[test]
fn record_through_the_pass_through_mirror_keeps_the_order_too() {
    record_burst(true);
}

fn record_burst(pass_through: bool) {
    let bed = Bed::new();
    let port = bed.map_port;
    let _server = serve_in_target(&bed, "target", port);
    let har_path = bed.work_dir().join("burst.har");
    let har_arg = har_path.to_str().unwrap().to_owned();
    let record = start_record_with(
        &bed,
        &["--port", &port.to_string(), "--count", "8", "-o", &har_arg],
        pass_through,
    );
    let urls: Vec<String> = (0..8).map(|i| format!("http://t/seq/{i}")).collect();
    // Each request on a connection of its own, read to the server's close
    // before the next (curl would send the next request on a connection the
    // server is closing, and retry it: the target would get it twice).
    let client = format!(
        "import socket\n\
         for i in range(8):\n\
         \x20   s = socket.create_connection(('{}', {port}))\n\
         \x20   s.sendall(b'GET /seq/%d HTTP/1.1\\r\\nHost: t\\r\\nConnection: close\\r\\n\\r\\n' % i)\n\
         \x20   print(b''.join(iter(lambda: s.recv(65536), b'')).decode())\n\
         \x20   s.close()\n",
        bed.target_v4
    );
    let out = Command::new(python())
        .args(["-c", &client])
        .output()
        .expect("python runs");
    assert!(out.status.success(), "{out:?}");
    let answers = String::from_utf8_lossy(&out.stdout);
    for i in 0..8 {
        assert!(
            answers.contains(&format!("target GET /seq/{i} ")),
            "{answers}"
        );
    }

    let out = record.finish(RECORD_END);
    assert!(out.success(), "graft record failed\n{out}");
    if pass_through {
        assert!(out.stderr.contains("pass through the agent"), "{out}");
    }
    let raw = std::fs::read_to_string(&har_path).expect("the HAR file exists");
    let har: Value = serde_json::from_str(&raw).expect("the HAR file is JSON");
    let entries = har["log"]["entries"].as_array().expect("entries");
    let urls_seen: Vec<&str> = entries
        .iter()
        .map(|e| e["request"]["url"].as_str().unwrap())
        .collect();
    assert_eq!(urls_seen, urls, "{raw}\n{out}");
    let started: Vec<jiff::Timestamp> = entries
        .iter()
        .map(|e| e["startedDateTime"].as_str().unwrap().parse().unwrap())
        .collect();
    let mut sorted = started.clone();
    sorted.sort_unstable();
    assert_eq!(started, sorted, "start times out of order: {raw}");
}
