//! `-o json` against the fake API server ([`FakeKube`]), on every run (the
//! live suite's `e2e_ecosystem.rs` does the same against a real cluster):
//! `graft targets` lists the fake Deployment and its pod, `graft doctor`'s
//! `ok` agrees with its exit code, and `graft clean --dry-run` reports the
//! namespace it looked at and deletes nothing. Each document is parsed with
//! the field names of `docs/json-output.md`.

use std::process::Command;
use std::time::Duration;

use graft_tests::fake_kube::{DEPLOYMENT, NAMESPACE, TARGET_CONTAINER, TARGET_POD};
use graft_tests::{Bed, FakeKube, Outcome, Proc, graft_bin};
use serde_json::{Value, json};

fn graft(kube: &FakeKube, args: &[&str]) -> Outcome {
    let mut command = Command::new(graft_bin());
    command
        .args(args)
        .args(["--kubeconfig", &kube.kubeconfig_str()]);
    Proc::spawn(command, &format!("graft {args:?}")).finish(Duration::from_secs(60))
}

fn parse(out: &Outcome) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("no JSON document ({e})\n{out}"))
}

#[test]
fn targets_doctor_and_clean_print_json_against_a_fake_cluster() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);

    let out = graft(&kube, &["targets", "-o", "json"]);
    assert!(out.success(), "{out}");
    let doc = parse(&out);
    assert_eq!(doc["namespace"], NAMESPACE, "{doc:#}");
    assert_eq!(
        doc["targets"],
        json!([
            {"target": format!("deploy/{DEPLOYMENT}"), "kind": "deployment", "name": DEPLOYMENT,
             "namespace": NAMESPACE, "ready": 1, "desired": 1, "containers": [TARGET_CONTAINER]},
            {"target": format!("pod/{TARGET_POD}"), "kind": "pod", "name": TARGET_POD,
             "namespace": NAMESPACE, "ready": 1, "desired": 1, "containers": [TARGET_CONTAINER]},
        ]),
        "{doc:#}"
    );
    // The same facts as a table.
    let out = graft(&kube, &["targets"]);
    assert!(out.success(), "{out}");
    assert!(
        out.lines()[1].starts_with(&format!("deploy/{DEPLOYMENT} ")),
        "{out}"
    );

    let out = graft(&kube, &["doctor", "-o", "json"]);
    let doc = parse(&out);
    let ok = doc["ok"].as_bool().expect("ok is a bool");
    assert_eq!(out.code(), Some(if ok { 0 } else { 1 }), "{out}");
    let checks = doc["checks"].as_array().expect("checks is an array");
    assert_eq!(checks[0]["name"], "cluster access", "{doc:#}");
    assert_eq!(checks[0]["result"], "ok", "{doc:#}");
    for check in checks {
        let result = check["result"].as_str().unwrap_or_default();
        assert!(
            ["ok", "info", "warn", "fail"].contains(&result),
            "{check:#}"
        );
        assert!(
            check["fix"].is_null() || check["fix"].is_string(),
            "{check:#}"
        );
        assert!(!(ok && result == "fail"), "ok with a failed check: {doc:#}");
    }
    assert!(
        ok || checks.iter().any(|c| c["result"] == "fail"),
        "{doc:#}"
    );

    let before = kube.mutating_requests().len();
    let out = graft(&kube, &["clean", "--dry-run", "-o", "json"]);
    assert!(out.success(), "{out}");
    let doc = parse(&out);
    assert_eq!(
        doc,
        json!({"dry_run": true, "namespace": NAMESPACE, "removed": [], "kept": [],
               "failed": [], "ephemeral": []}),
        "{out}"
    );
    let changes = &kube.mutating_requests()[before..];
    assert!(
        changes.is_empty(),
        "graft clean --dry-run changed {changes:?}"
    );
}
