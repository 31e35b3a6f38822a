//! Live cluster (see `graft_tests::cluster`): `graft record` on a real pod. The
//! agent mirrors the pod's port with its responses; the pod answers every request
//! itself; the HAR file holds each request with the pod's own answer.

use std::time::Duration;

use graft_tests::cluster::{APP_PORT, Live, SESSION_TIMEOUT, served_by, wait_restored};
use graft_tests::{Proc, wait_until};
use serde_json::Value;

#[test]
fn e2e_record_writes_the_pods_exchanges_as_har() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("traffic-record");
    ns.workload("Pod", "web", 1, 1);
    let addr = ns.app_addr("app=web");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let har_path = dir.path().join("web.har");
    let mut command = ns.graft("record");
    command.args(["--target", "pod/web/container/app", "--port"]);
    command.arg(APP_PORT.to_string());
    command.args(["--count", "2", "-o"]).arg(&har_path);
    let record = Proc::spawn(command, "graft record --target pod/web");
    let recording = wait_until(SESSION_TIMEOUT, Duration::from_millis(250), || {
        record
            .stderr()
            .contains("graft: recording port")
            .then_some(())
    });
    assert!(
        recording.is_some(),
        "graft record did not start within {SESSION_TIMEOUT:?}\n{}",
        record.output_report()
    );
    for path in ["/e2e-record-1", "/e2e-record-2"] {
        assert_eq!(
            served_by(addr, path),
            "web",
            "a recorded request was not answered by the pod\n{}",
            record.output_report()
        );
    }
    let out = record.finish(Duration::from_secs(60));
    assert!(out.success(), "graft record failed\n{out}");

    let raw = std::fs::read_to_string(&har_path).expect("the HAR file exists");
    let har: Value = serde_json::from_str(&raw).expect("the HAR file is JSON");
    let entries = har["log"]["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 2, "{raw}");
    for (entry, path) in entries.iter().zip(["/e2e-record-1", "/e2e-record-2"]) {
        let url = entry["request"]["url"].as_str().unwrap();
        assert!(url.ends_with(path), "{url} is not {path}");
        assert_eq!(entry["response"]["status"], 200, "{entry}");
        let text = entry["response"]["content"]["text"].as_str().unwrap();
        assert!(text.starts_with(&format!("web GET {path} ")), "{text}");
        assert_eq!(entry["_graft"]["target"], "pod/web/container/app");
    }
    wait_restored(&ns, addr, "web");
}
