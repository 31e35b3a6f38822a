//! Live cluster (see `graft_tests::cluster`): `graft run --copy-target
//! [--scale-down]`. A Deployment's copy gets the stolen traffic while the
//! original keeps its Service (the copy is no endpoint of it); a Job's copy
//! sleeps instead of running the job a second time; `--scale-down` puts the
//! Deployment back at its count after a normal exit, and after `kill -9` of
//! graft once `graft clean` ran (`--dry-run` first lists what it would do);
//! and the attack: a user whose role lacks `patch deployments/scale` runs
//! `--copy-target --scale-down`, graft says which verb is missing and leaves
//! no copy and no scaled-down or annotated workload behind.

use std::net::SocketAddr;
use std::time::Duration;

use graft_tests::cluster::{
    APP_PORT, ClusterObject, Live, Ns, SESSION_TIMEOUT, addr_of, app_pod_serving, interrupt,
    local_server, rbac_yaml, served_by, service_account_kubeconfig, wait_served_by,
};
use graft_tests::{Outcome, Proc, wait_until};
use k8s_openapi::api::core::v1::{Endpoints, Pod};
use kube::api::{Api, ListParams, LogParams};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// The label graft puts on its copies (crates/kube/src/copy.rs).
const COPY_SELECTOR: &str = "graft.dev/copy=true";
/// The annotation of a scaled-down workload (crates/kube/src/scale.rs).
const SCALED_DOWN: &str = "graft.dev/scaled-down";

/// The copies in `ns` that are not being deleted.
fn copies(ns: &Ns<'_>) -> Vec<Pod> {
    ns.live
        .block_on(
            ns.pods_api()
                .list(&ListParams::default().labels(COPY_SELECTOR)),
        )
        .map(|l| {
            l.items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits for the one copy in `ns` to have an address; returns it and the pod.
fn copy_addr(ns: &Ns<'_>, graft: &Proc) -> (Pod, SocketAddr) {
    wait_until(SESSION_TIMEOUT, Duration::from_millis(300), || {
        let pod = copies(ns).into_iter().next()?;
        pod.status.as_ref()?.pod_ip.as_ref()?;
        let addr = addr_of(&pod);
        Some((pod, addr))
    })
    .unwrap_or_else(|| panic!("no copy in {}\n{}", ns.name, graft.output_report()))
}

/// Waits (30 s) until `ns` holds no copy that is not being deleted.
fn assert_copies_gone(ns: &Ns<'_>, what: &str) {
    let gone = wait_until(Duration::from_secs(30), Duration::from_millis(300), || {
        copies(ns).is_empty().then_some(())
    });
    assert!(gone.is_some(), "{what}: a copy is left: {:?}", copies(ns));
}

/// The Deployment `name`'s `spec.replicas` and its scale-down annotation.
fn deployment_state(ns: &Ns<'_>, name: &str) -> (i64, Option<String>) {
    let d = ns.get("apps/v1", "Deployment", name);
    (
        d["spec"]["replicas"].as_i64().unwrap_or(-1),
        d["metadata"]["annotations"][SCALED_DOWN]
            .as_str()
            .map(str::to_owned),
    )
}

fn wait_deployment(ns: &Ns<'_>, name: &str, replicas: i64, annotated: bool, what: &str) {
    let mut last = (0, None);
    let reached = wait_until(Duration::from_secs(30), Duration::from_millis(300), || {
        last = deployment_state(ns, name);
        (last.0 == replicas && last.1.is_some() == annotated).then_some(())
    });
    assert!(
        reached.is_some(),
        "{what}: deployment {name} is at {last:?}, want {replicas} replicas, annotated \
         {annotated}"
    );
}

fn finish(command: std::process::Command, what: &str) -> Outcome {
    Proc::spawn(command, what).finish(Duration::from_secs(120))
}

#[test]
fn e2e_copy_of_a_deployment_takes_the_steal_and_the_original_keeps_its_service() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("copy-deploy");
    ns.workload("Deployment", "web", 1, 1);
    ns.apply(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": APP_PORT}]},
    }));
    let original = ns.app_addr("app=web");
    let graft = ns.run(
        "deploy/web/container/app",
        &["--copy-target", "--steal"],
        &local_server("local", ""),
    );
    let (copy, addr) = copy_addr(&ns, &graft);
    wait_served_by(addr, "local", SESSION_TIMEOUT, Some(&graft));
    // The original is untouched: its own server answers, and it is the only
    // endpoint of its Service (graft's labels keep the copy out).
    assert_eq!(served_by(original, "/"), "web");
    let labels = copy.metadata.labels.clone().unwrap_or_default();
    assert!(
        !labels.contains_key("app"),
        "the copy has labels {labels:?}"
    );
    let endpoints: Api<Endpoints> = Api::namespaced(live.client.clone(), &ns.name);
    let ips: Vec<String> = live
        .block_on(endpoints.get("web"))
        .expect("the Service's endpoints")
        .subsets
        .unwrap_or_default()
        .into_iter()
        .flat_map(|s| s.addresses.unwrap_or_default())
        .map(|a| a.ip)
        .collect();
    assert_eq!(ips, [original.ip().to_string()], "the Service's endpoints");
    // The copy runs the original's command; the agent took its environment.
    let spec = copy.spec.unwrap();
    let app = spec.containers.iter().find(|c| c.name == "app").unwrap();
    assert!(
        app.command
            .as_ref()
            .unwrap()
            .join(" ")
            .contains("named_http.py"),
        "{:?}",
        app.command
    );
    assert!(app.readiness_probe.is_none(), "the copy keeps a probe");
    assert!(
        graft.stdout().contains("who=app"),
        "{}",
        graft.output_report()
    );
    println!("{}", interrupt(graft));
    assert_copies_gone(&ns, "after Ctrl-C");
    assert_eq!(served_by(original, "/"), "web");
}

#[test]
fn e2e_copy_of_a_job_sleeps_instead_of_running_the_job_again() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("copy-job");
    // The job says it ran, then serves (so it stays running while tested).
    let port = APP_PORT.to_string();
    let script = format!(
        "print('the job ran', flush=True); import runpy, sys; \
         sys.argv = ['named_http.py', 'nightly', '{port}']; \
         runpy.run_path('/fixtures/named_http.py', run_name='__main__')"
    );
    let mut pod = app_pod_serving(&live, &["python3", "-u", "-c", &script]);
    pod["restartPolicy"] = json!("Never");
    ns.apply(json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "nightly"},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"labels": {"app": "nightly"}}, "spec": pod}},
    }));
    let original = ns.app_addr("app=nightly");
    let graft = ns.run(
        "job/nightly/container/app",
        &["--copy-target", "--steal"],
        &local_server("local", ""),
    );
    let (copy, addr) = copy_addr(&ns, &graft);
    wait_served_by(addr, "local", SESSION_TIMEOUT, Some(&graft));
    let name = copy.metadata.name.clone().unwrap();
    let spec = copy.spec.unwrap();
    let app = spec.containers.iter().find(|c| c.name == "app").unwrap();
    assert_eq!(
        app.command.as_deref().unwrap(),
        ["sleep", "2147483647"],
        "the copy runs the job's command"
    );
    // The job's work ran once: in the Job's pod, not in the copy.
    let log = live
        .block_on(ns.pods_api().logs(
            &name,
            &LogParams {
                container: Some("app".into()),
                ..LogParams::default()
            },
        ))
        .expect("the copy's log");
    assert!(!log.contains("the job ran"), "the copy ran the job: {log}");
    let job = ns.get("batch/v1", "Job", "nightly");
    assert_eq!(
        job["status"]["active"],
        json!(1),
        "the Job adopted the copy"
    );
    assert_eq!(served_by(original, "/"), "nightly");
    // The copy has the job's environment, files and network: the local
    // program got the app container's variables.
    assert!(
        graft.stdout().contains("who=app"),
        "{}",
        graft.output_report()
    );
    println!("{}", interrupt(graft));
    assert_copies_gone(&ns, "after Ctrl-C");
    let job = ns.get("batch/v1", "Job", "nightly");
    assert_eq!(job["status"]["active"], json!(1));
    assert_eq!(job["status"]["failed"], Value::Null, "{job}");
}

#[test]
fn e2e_scale_down_is_restored_after_exit_and_by_clean_after_kill_9() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("copy-scale");
    ns.workload("Deployment", "web", 2, 2);
    let flags = ["--copy-target", "--scale-down", "--steal"];

    // A normal end: Ctrl-C.
    let graft = ns.run(
        "deploy/web/container/app",
        &flags,
        &local_server("local", ""),
    );
    let (_, addr) = copy_addr(&ns, &graft);
    wait_served_by(addr, "local", SESSION_TIMEOUT, Some(&graft));
    wait_deployment(&ns, "web", 0, true, "during the session");
    let gone = wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        ns.ready_pods("app=web").is_empty().then_some(())
    });
    assert!(gone.is_some(), "the original pods still run");
    println!("{}", interrupt(graft));
    wait_deployment(&ns, "web", 2, false, "after Ctrl-C");
    assert_copies_gone(&ns, "after Ctrl-C");
    ns.wait_ready("app=web", 2);

    // A crash: kill -9. The copy and the scale-down stay until graft clean.
    let graft = ns.run(
        "deploy/web/container/app",
        &flags,
        &local_server("local", ""),
    );
    let (_, addr) = copy_addr(&ns, &graft);
    wait_served_by(addr, "local", SESSION_TIMEOUT, Some(&graft));
    wait_deployment(&ns, "web", 0, true, "during the second session");
    graft.signal_group(Signal::SIGKILL);
    drop(graft);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(deployment_state(&ns, "web").0, 0, "restored without clean");
    assert_eq!(copies(&ns).len(), 1);

    let mut dry = ns.graft("clean");
    dry.args(["--force", "--dry-run"]);
    let out = finish(dry, "graft clean --dry-run");
    assert!(out.success(), "{out}");
    assert!(
        out.out().contains("would remove scale-down")
            && out.out().contains("deployment/web")
            && out.out().contains("would remove copy"),
        "graft clean --dry-run does not list the copy and the scale-down\n{out}"
    );
    assert_eq!(deployment_state(&ns, "web").0, 0, "the dry run scaled");
    assert_eq!(copies(&ns).len(), 1, "the dry run deleted the copy");

    let mut clean = ns.graft("clean");
    clean.arg("--force");
    let out = finish(clean, "graft clean --force");
    assert!(out.success(), "{out}");
    assert!(out.out().contains("restored to 2 replicas"), "{out}");
    wait_deployment(&ns, "web", 2, false, "after graft clean");
    assert_copies_gone(&ns, "after graft clean");
    let pods = ns.wait_ready("app=web", 2);
    assert_eq!(served_by(addr_of(&pods[0]), "/"), "web");
}

#[test]
fn e2e_a_refused_scale_verb_ends_cleanly_and_leaves_nothing() {
    let Some(live) = Live::get() else {
        return;
    };
    // The graft ClusterRole without `patch deployments/scale`.
    let role = format!("e2e-copy-graft-{:x}", std::process::id());
    let text = std::fs::read_to_string(rbac_yaml()).expect("deploy/rbac.yaml");
    let mut cluster_role: Value = serde_saphyr::from_str(&text).expect("deploy/rbac.yaml parses");
    cluster_role["metadata"]["name"] = json!(role);
    for rule in cluster_role["rules"].as_array_mut().unwrap() {
        if let Some(resources) = rule["resources"].as_array_mut() {
            resources.retain(|r| r != "deployments/scale");
        }
    }
    let _role = ClusterObject::apply(&live, cluster_role);
    let ns = live.namespace("copy-rbac");
    ns.apply(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "dev"}}));
    ns.apply(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "graft"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": "dev", "namespace": ns.name}],
    }));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    service_account_kubeconfig(&live, &ns.name, "dev", &path);
    let kubeconfig = path.display().to_string();
    ns.workload("Deployment", "web", 1, 1);
    let original = ns.app_addr("app=web");

    // doctor names the missing verb as needed by --scale-down only.
    let out = finish(ns.graft_as("doctor", &kubeconfig), "graft doctor");
    let line = out
        .lines()
        .into_iter()
        .find(|l| l.contains("patch deployments.apps/scale"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.contains("warn") && line.contains("--scale-down"),
        "doctor does not name the missing verb\n{out}"
    );

    let mut command = ns.graft_as("run", &kubeconfig);
    command
        .args(["--target", "deploy/web/container/app"])
        .args(["--copy-target", "--scale-down", "--steal", "--"])
        .args(local_server("local", ""));
    let out = finish(command, "graft run --scale-down (no scale verb)");
    assert!(!out.success(), "graft ran without the scale verb\n{out}");
    assert!(
        out.stderr.contains("patch deployments.apps/scale")
            && out.stderr.contains("deploy/rbac.yaml"),
        "the error does not say which verb to ask for\n{out}"
    );
    assert!(
        !out.stdout.contains("who="),
        "CMD ran after the failure\n{out}"
    );
    assert_copies_gone(&ns, "after the refused scale");
    assert_eq!(
        deployment_state(&ns, "web"),
        (1, None),
        "the deployment was left scaled or annotated"
    );
    assert_eq!(served_by(original, "/"), "web");
}
