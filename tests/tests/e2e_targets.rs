//! Live cluster (see `graft_tests::cluster`): every target kind graft resolves,
//! each with `/container/app` on a two-container pod (`side` first, so the
//! default would be wrong). For each: the sample workload serves `/` with its
//! name; `graft run --target KIND/NAME/container/app --steal` runs a local
//! sample server that prints the `WHO` variable of the container graft took; a
//! request to the pod's address must be answered by the local server; after
//! Ctrl-C, no agent pod is left and the pod answers again. `rollout/NAME` goes
//! through an Argo-Rollouts-shaped CRD the test installs (no controller: the
//! Rollout's selector matches a ReplicaSet's pods, or its `workloadRef` names a
//! Deployment); targetless reaches a
//! cluster-only Service by its cluster DNS name.

use graft_tests::cluster::{
    APP_PORT, ClusterObject, Live, Ns, SESSION_TIMEOUT, interrupt, local_server, py_with,
    wait_restored, wait_served_by,
};
use serde_json::json;

/// Steals `target`'s port with a local server and checks the container, the
/// steal, and the restore after Ctrl-C; `name` is the server of the pods
/// labelled `app=NAME`.
fn steal_and_restore(ns: &Ns<'_>, target: &str, name: &str) {
    let addr = ns.app_addr(&format!("app={name}"));
    wait_served_by(addr, name, SESSION_TIMEOUT, None);
    let graft = ns.run(
        &format!("{target}/container/app"),
        &["--steal"],
        &local_server("local", ""),
    );
    wait_served_by(addr, "local", SESSION_TIMEOUT, Some(&graft));
    assert!(
        graft.stdout().contains("who=app"),
        "{target}: the local program did not get container app's environment\n{}",
        graft.output_report()
    );
    let outcome = interrupt(graft);
    println!("{target}: {outcome}");
    wait_restored(ns, addr, name);
}

fn kind_test(short: &str, kind: &str, target_kind: &str) {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace(short);
    ns.workload(kind, "web", 1, 1);
    steal_and_restore(&ns, &format!("{target_kind}/web"), "web");
}

#[test]
fn e2e_target_pod() {
    kind_test("pod", "Pod", "pod");
}

#[test]
fn e2e_target_deployment() {
    kind_test("deploy", "Deployment", "deploy");
}

#[test]
fn e2e_target_statefulset() {
    kind_test("sts", "StatefulSet", "statefulset");
}

#[test]
fn e2e_target_daemonset() {
    kind_test("ds", "DaemonSet", "daemonset");
}

#[test]
fn e2e_target_replicaset() {
    kind_test("rs", "ReplicaSet", "rs");
}

#[test]
fn e2e_target_job() {
    kind_test("job", "Job", "job");
}

#[test]
fn e2e_target_cronjob() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("cronjob");
    let labels = json!({"app": "web"});
    let mut pod = graft_tests::cluster::app_pod(&live, "web");
    pod["restartPolicy"] = json!("Never");
    let job_template = json!({
        "metadata": {"labels": labels},
        "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": pod}},
    });
    // Suspended, with a schedule far away: the test starts its Job itself, as
    // `kubectl create job --from=cronjob/web` does (owned by the CronJob).
    ns.apply(json!({
        "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "web"},
        "spec": {"schedule": "0 0 1 1 *", "suspend": true, "jobTemplate": job_template},
    }));
    let uid = ns.get("batch/v1", "CronJob", "web")["metadata"]["uid"]
        .as_str()
        .expect("the CronJob has a uid")
        .to_owned();
    ns.apply(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "web-manual", "labels": labels, "ownerReferences": [{
            "apiVersion": "batch/v1", "kind": "CronJob", "name": "web", "uid": uid,
            "controller": true,
        }]},
        "spec": job_template["spec"],
    }));
    ns.wait_ready("app=web", 1);
    steal_and_restore(&ns, "cronjob/web", "web");
}

#[test]
fn e2e_target_rollout() {
    let Some(live) = Live::get() else {
        return;
    };
    let crd = "rollouts.argoproj.io";
    let existed =
        live.has_cluster_object("apiextensions.k8s.io/v1", "CustomResourceDefinition", crd);
    // The part of Argo Rollouts' CRD graft reads (spec.selector), without its
    // controller: the pods come from a ReplicaSet with the Rollout's labels.
    let definition = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": crd},
        "spec": {
            "group": "argoproj.io", "scope": "Namespaced",
            "names": {"plural": "rollouts", "singular": "rollout", "kind": "Rollout",
                      "listKind": "RolloutList", "shortNames": ["ro"]},
            "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object",
                    "x-kubernetes-preserve-unknown-fields": true}}}],
        },
    });
    // Removed at the end (also on failure) only when this test installed it.
    let _crd = (!existed).then(|| ClusterObject::apply(&live, definition));
    let ns = live.namespace("rollout");
    let applied = graft_tests::wait_until(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(500),
        || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ns.apply(json!({
                    "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
                    "metadata": {"name": "web"},
                    "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}}},
                }));
            }))
            .ok()
        },
    );
    assert!(
        applied.is_some(),
        "the Rollout CRD was not served within 30 s"
    );
    ns.workload("ReplicaSet", "web", 1, 1);
    steal_and_restore(&ns, "rollout/web", "web");
    // The other shape: a Rollout whose pods are a Deployment's (workloadRef).
    ns.workload("Deployment", "api", 1, 1);
    ns.apply(json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "api"},
        "spec": {"replicas": 1, "workloadRef": {
            "apiVersion": "apps/v1", "kind": "Deployment", "name": "api",
        }},
    }));
    steal_and_restore(&ns, "rollout/api", "api");
    drop(ns);
}

/// Targetless: the local program runs with the cluster's DNS and outgoing
/// traffic from an agent pod: it reads a cluster-only Service by name.
#[test]
fn e2e_target_targetless() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("targetless");
    ns.workload("Pod", "backend", 1, 1);
    ns.apply(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend"},
        "spec": {"selector": {"app": "backend"}, "ports": [{"port": 80, "targetPort": APP_PORT}]},
    }));
    let url = format!("http://backend.{}.svc.cluster.local/", ns.name);
    let code = format!(
        "import urllib.request; print(urllib.request.urlopen('{url}', timeout=10).read().decode())"
    );
    let graft = ns.run("targetless", &[], &[py_with(""), "-c".into(), code]);
    let outcome = graft.finish(std::time::Duration::from_secs(120));
    outcome.assert_success();
    assert!(
        outcome.out().starts_with("backend GET /"),
        "targetless: the cluster Service's answer is missing\n{outcome}"
    );
    wait_restored(&ns, ns.app_addr("app=backend"), "backend");
}
