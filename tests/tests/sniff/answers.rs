//! The target's answers and the local program's, in the sniffing mirror:
//! recorded whole from the packet path when a session reads them (also when it
//! joins a mirror that did not), cut to their headers when nobody does, so a
//! target that answers megabytes costs the capture only their headers; and a
//! local program that answers its copies with megabytes still gets every copy.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use graft_tests::{Bed, Proc, STEAL_TIMEOUT, wait_until};

use super::{
    SNIFFING, end, mirror_session, mirror_session_with, named_http, one_by_one, serve_in_target,
    serve_in_target_with, wait_mirrored, wait_output, who_answers,
};

/// Starts `graft record` of `port` for `count` requests into `har` and waits
/// until its output holds `ready`.
fn start_record(bed: &Bed, port: u16, count: u32, har: &std::path::Path, ready: &str) -> Proc {
    let target = format!("pid:{}", bed.target_pid);
    let (port_arg, count_arg, har_arg) = (
        port.to_string(),
        count.to_string(),
        har.display().to_string(),
    );
    let args = [
        "record", "--target", &target, "--port", &port_arg, "--count", &count_arg, "-o", &har_arg,
    ];
    let mut command = bed.graft(&args);
    command.env("GRAFT_LOG", "debug");
    let record = bed.spawn(command, "graft record");
    let started = wait_until(STEAL_TIMEOUT, Duration::from_millis(50), || {
        record.stderr().contains(ready).then_some(())
    });
    assert!(started.is_some(), "{}", record.output_report());
    record
}

/// Waits for `record` to end and returns its HAR entries.
fn recorded_entries(record: &mut Proc, har: &std::path::Path) -> Vec<serde_json::Value> {
    assert!(
        record.wait_timeout(Duration::from_secs(20)).is_some(),
        "graft record did not end after its requests\n{}",
        record.output_report()
    );
    let har: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(har).unwrap()).unwrap();
    har["log"]["entries"].as_array().expect("entries").clone()
}

/// An entry as "METHOD URL -> STATUS TEXT".
fn describe(e: &serde_json::Value) -> String {
    format!(
        "{} {} -> {} {}",
        e["request"]["method"].as_str().unwrap_or(""),
        e["request"]["url"].as_str().unwrap_or(""),
        e["response"]["status"],
        e["response"]["content"]["text"].as_str().unwrap_or("")
    )
}

#[test]
fn graft_record_records_the_targets_responses_from_the_packet_path() {
    let bed = Bed::new();
    let port = bed.map_port;
    let addr = SocketAddr::from((bed.target_v4, port));
    let _target = serve_in_target(&bed, "target", port);
    let har = bed.work_dir().join("sniffed.har");
    let mut record = start_record(&bed, port, 2, &har, SNIFFING);
    assert!(!bed.has_graft_rules(), "{}", bed.packet_rules());

    let body = bed.work_dir().join("body.bin");
    std::fs::write(&body, "b".repeat(200_000)).unwrap();
    let posted = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "--max-time", "5", "--data-binary"])
        .arg(format!("@{}", body.display()))
        .arg(format!("{}rec-post", bed.target_url(port)))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&posted.stdout).starts_with("target POST /rec-post len=200000")
    );
    assert_eq!(who_answers(addr, "/rec-get"), "target");
    let texts: Vec<String> = recorded_entries(&mut record, &har)
        .iter()
        .map(describe)
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("/rec-post -> 200 target POST /rec-post len=200000")),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("/rec-get -> 200 target GET /rec-get ")),
        "{texts:?}"
    );
}

/// A mirror alone has the capture keep only the headers of the target's
/// answers; a recording that joins it reads the answers, and the capture keeps
/// them whole again from then on.
#[test]
fn a_recording_that_joins_a_mirror_gets_the_targets_answers_whole() {
    let bed = Bed::new();
    let port = bed.map_port;
    let addr = SocketAddr::from((bed.target_v4, port));
    let _target = serve_in_target_with(
        &bed,
        "target",
        port,
        &[("NAMED_HTTP_ANSWER_BYTES", "100000")],
    );
    let mut session = mirror_session(&bed, &named_http("local", port));
    wait_mirrored(&mut session, addr, "probe");
    let har = bed.work_dir().join("joined.har");
    // It joins the mirror's hub, whose agent sniffs the port.
    let mut record = start_record(&bed, port, 1, &har, "graft: recording port");

    assert_eq!(who_answers(addr, "/joined"), "target");
    let entries = recorded_entries(&mut record, &har);
    let entry = entries
        .iter()
        .find(|e| describe(e).contains("/joined -> 200 "))
        .unwrap_or_else(|| panic!("{entries:?}"));
    // The HAR keeps the first 64 KiB of a body and its whole length.
    let content = &entry["response"]["content"];
    let text = content["text"].as_str().unwrap_or_default();
    assert!(text.starts_with("target GET /joined "), "{content}");
    assert!(text.len() == 65536 && text.ends_with('.'), "{}", text.len());
    assert_eq!(
        content["size"], 100_000,
        "the answer was not recorded whole"
    );
    assert!(
        wait_output(&session, "GET /joined "),
        "{}",
        session.output_report()
    );
    end(&mut session);
}

/// A local program whose answers to its copies are far larger than a socket's
/// buffers gets every copy, and finishes writing its answer even when no copy
/// comes after on that connection: the agent reads (and throws away) what the
/// program answers once 64 KiB of it waits (`SO_RCVLOWAT`), not each answer
/// as it comes, and never leaves it unread.
#[test]
fn a_mirror_whose_program_answers_megabytes_gets_every_copy() {
    let bed = Bed::new();
    let port = bed.map_port;
    let addr = SocketAddr::from((bed.target_v4, port));
    let _target = serve_in_target(&bed, "target", port);
    // 32 MiB: more than the loopback socket buffers of both ends hold.
    let bytes = (32 << 20).to_string();
    let mut session = mirror_session_with(
        &bed,
        &named_http("local", port),
        &[("NAMED_HTTP_ANSWER_BYTES", &bytes)],
    );
    wait_mirrored(&mut session, addr, "probe");

    // A request on a connection that then stays open and silent: the program
    // writes all of its answer to the copy all the same.
    let mut open = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(open, "GET /big-alone HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = open.read(&mut buf).expect("the target answers");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("x-served-by: target"));
    assert!(
        wait_output(&session, "answered local GET /big-alone "),
        "the local program never finished answering the copy\n{}",
        session.output_report()
    );

    // One connection, one request at a time: each copy reaches the program
    // on the same mirror connection, behind its answer to the one before.
    let paths = ["/big-1", "/big-2", "/big-3"];
    let answers = one_by_one(addr, &paths);
    assert!(answers.contains("target GET /big-3 "), "{answers}");
    for path in paths {
        assert!(
            wait_output(&session, &format!("answered local GET {path} ")),
            "the copy of {path} was not answered\n{}",
            session.output_report()
        );
    }
    drop(open);
    end(&mut session);
}

/// Sends `GET path` on `stream` and reads its whole answer (a
/// `Content-Length` body), returning its head.
fn get_whole(stream: &mut TcpStream, path: &str) -> String {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let head_end = loop {
        let n = stream.read(&mut buf).expect("the target answers");
        assert!(n > 0, "the target closed the connection");
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .and_then(|v| v.trim().parse().ok())
        .expect("the answer has a Content-Length");
    let mut left = length - (got.len() - head_end);
    while left > 0 {
        let n = stream
            .read(&mut buf[..left.min(1 << 16)])
            .expect("the body");
        assert!(n > 0, "the target closed the connection mid-body");
        left -= n;
    }
    head
}

/// A target whose answers are megabytes (a download), mirrored with nobody
/// reading its answers: the capture keeps only their headers, so its ring
/// does not overflow with bytes nobody copies, and every request's copy
/// arrives, each on the same connection after a 16 MiB answer (twice the
/// ring). With the answers captured whole, the kernel dropped packets from the
/// full ring and the connection's copy ended at the first gap (in about half
/// the runs here; `ring::tests::answers_nobody_reads_come_through_the_ring_as_headers`
/// shows the cut itself every time).
#[test]
fn a_mirror_of_a_target_that_answers_megabytes_gets_every_copy() {
    let bed = Bed::new();
    let port = bed.map_port;
    let addr = SocketAddr::from((bed.target_v4, port));
    let bytes = (16 << 20).to_string();
    let _target =
        serve_in_target_with(&bed, "target", port, &[("NAMED_HTTP_ANSWER_BYTES", &bytes)]);
    let mut session = mirror_session(&bed, &named_http("local", port));
    wait_mirrored(&mut session, addr, "probe");

    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut paths = Vec::new();
    for round in 0..4 {
        let path = format!("/download-{round}");
        let head = get_whole(&mut stream, &path);
        assert!(head.contains("x-served-by: target"), "{head}");
        paths.push(path);
    }
    for path in &paths {
        assert!(
            wait_output(&session, &format!("GET {path} ")),
            "the copy of {path} never reached the local program\n{}",
            session.output_report()
        );
    }
    drop(stream);
    end(&mut session);
}
