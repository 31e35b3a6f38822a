//! Live cluster (see `graft_tests::cluster`), issue 15: the JSON forms and the
//! kubectl plugin against a real cluster. `graft targets -o json` lists a
//! Deployment and its pod, also through the real `kubectl` finding the
//! `kubectl-graft` link on `PATH` with kubectl's flags; `graft doctor -o json`
//! reports its checks; `graft ls -o json` shows a node-mode session's port,
//! mode and filter; `graft clean --dry-run -o json` lists the terminated
//! agent pod a crashed session left and deletes nothing, then `graft clean -o
//! json` removes it.

use std::process::Command;
use std::time::Duration;

use graft_tests::cluster::{
    APP_PORT, Live, Ns, SESSION_TIMEOUT, interrupt, local_server, wait_restored,
};
use graft_tests::{Outcome, Proc, graft_bin, wait_until};
use serde_json::{Value, json};

fn finish(command: Command, what: &str) -> Outcome {
    Proc::spawn(command, what).finish(Duration::from_secs(120))
}

/// Runs `command`, which must succeed, and parses its stdout as JSON.
fn json_of(command: Command, what: &str) -> Value {
    let out = finish(command, what);
    assert!(out.success(), "{what} failed\n{out}");
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{what} printed no JSON document ({e})\n{out}"))
}

fn graft_json(ns: &Ns<'_>, subcommand: &str, args: &[&str]) -> Value {
    let mut command = ns.graft(subcommand);
    command.args(args).args(["-o", "json"]);
    json_of(command, &format!("graft {subcommand} {args:?} -o json"))
}

fn targets(doc: &Value) -> Vec<&str> {
    doc["targets"]
        .as_array()
        .expect("targets is an array")
        .iter()
        .map(|t| t["target"].as_str().expect("target is a string"))
        .collect()
}

#[test]
fn e2e_targets_and_doctor_as_json_also_through_kubectl() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("eco-targets");
    ns.workload("Deployment", "web", 1, 1);

    let doc = graft_json(&ns, "targets", &[]);
    assert_eq!(doc["namespace"], ns.name.as_str(), "{doc:#}");
    let list = targets(&doc);
    assert_eq!(list[0], "deploy/web", "{doc:#}");
    let web = &doc["targets"][0];
    assert_eq!(web["kind"], "deployment");
    assert_eq!(web["ready"], 1);
    assert_eq!(web["desired"], 1);
    assert_eq!(web["containers"], serde_json::json!(["side", "app"]));
    assert!(
        list.iter().any(|t| t.starts_with("pod/web-")),
        "no pod of deploy/web in {doc:#}"
    );

    // kubectl finds the plugin on PATH and hands it its flags.
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(graft_bin(), bin.path().join("kubectl-graft")).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let kubectl = ["kubectl", "/usr/bin/kubectl", "/usr/local/bin/kubectl"]
        .into_iter()
        .find(|k| {
            Command::new(k)
                .arg("version")
                .arg("--client")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let mut command = match kubectl {
        Some(kubectl) => {
            let mut command = Command::new(kubectl);
            command.arg("graft");
            command
        }
        // Without kubectl, the link as kubectl would start it.
        None => Command::new(bin.path().join("kubectl-graft")),
    };
    command.env("PATH", path).args([
        "--kubeconfig",
        &live.kubeconfig,
        "-n",
        &ns.name,
        "targets",
        "-o",
        "json",
    ]);
    let through_kubectl = json_of(command, "kubectl graft -n NS targets -o json");
    assert_eq!(through_kubectl, doc);

    let doc = graft_json(&ns, "doctor", &[]);
    assert_eq!(doc["ok"], true, "{doc:#}");
    let checks = doc["checks"].as_array().expect("checks is an array");
    assert!(checks.len() > 5, "{doc:#}");
    for check in checks {
        let result = check["result"].as_str().unwrap_or_default();
        assert!(["ok", "info", "warn"].contains(&result), "{check:#}");
        assert!(
            check["name"].is_string() && check["detail"].is_string(),
            "{check:#}"
        );
    }
    assert!(
        checks.iter().any(|c| c["name"] == "cluster access"),
        "{doc:#}"
    );
}

#[test]
fn e2e_ls_and_clean_dry_run_as_json() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("eco-json");
    ns.workload("Pod", "web", 1, 1);
    let addr = ns.app_addr("app=web");

    let graft = ns.run(
        "pod/web/container/app",
        &[
            "--agent-mode",
            "node",
            "--steal",
            "--filter-header",
            "x-user: eco",
        ],
        &local_server("local", ""),
    );
    // The session is listed once its port is taken.
    let listed = wait_until(SESSION_TIMEOUT, Duration::from_millis(500), || {
        let doc = graft_json(&ns, "ls", &["--target", "pod/web"]);
        let sessions = doc["sessions"].as_array()?.clone();
        (!sessions.is_empty()).then_some(sessions)
    });
    let sessions = listed.unwrap_or_else(|| {
        panic!(
            "graft ls never listed the session\n{}",
            graft.output_report()
        )
    });
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    let s = &sessions[0];
    assert_eq!(s["mode"], "steal", "{s:#}");
    assert_eq!(s["port"], APP_PORT, "{s:#}");
    assert!(
        s["filter"]
            .as_str()
            .is_some_and(|f| f.contains("x-user: eco")),
        "{s:#}"
    );
    assert!(
        s["client"].as_str().is_some_and(|c| c.contains('@')),
        "{s:#}"
    );
    assert!(
        s["since_unix"].as_u64().is_some_and(|t| t > 1_600_000_000),
        "{s:#}"
    );

    println!("{}", interrupt(graft));
    wait_restored(&ns, addr, "web");

    // A terminated agent pod as a crashed session leaves it (graft's labels).
    let labels = json!({
        "app.kubernetes.io/managed-by": "graft",
        "app.kubernetes.io/name": "graft-agent",
        "graft.dev/session": "0123456789abcdef",
    });
    ns.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "graft-agent-leftover", "labels": labels},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [{
            "name": "agent", "image": live.app_image, "imagePullPolicy": "IfNotPresent",
            "command": ["python3", "-c", "pass"],
        }]},
    }));
    let pods = ns.pods_api();
    let present = || {
        live.block_on(pods.get_opt("graft-agent-leftover"))
            .ok()
            .flatten()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
    };
    let done = wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        (present()?.status?.phase? == "Succeeded").then_some(())
    });
    assert!(done.is_some(), "the leftover pod did not complete");

    let expected = json!([{
        "kind": "pod", "namespace": ns.name, "name": "graft-agent-leftover",
        "session": "0123456789abcdef", "state": "Succeeded", "terminated": true,
        "error": null,
    }]);
    let doc = graft_json(&ns, "clean", &["--dry-run"]);
    assert_eq!(doc["dry_run"], true, "{doc:#}");
    assert_eq!(doc["namespace"], ns.name.as_str(), "{doc:#}");
    assert_eq!(doc["removed"], expected, "{doc:#}");
    assert_eq!(doc["failed"], json!([]), "{doc:#}");
    assert!(present().is_some(), "graft clean --dry-run deleted the pod");

    let doc = graft_json(&ns, "clean", &[]);
    assert_eq!(doc["dry_run"], false, "{doc:#}");
    assert_eq!(doc["removed"], expected, "{doc:#}");
    assert!(present().is_none(), "graft clean left the pod");
}
