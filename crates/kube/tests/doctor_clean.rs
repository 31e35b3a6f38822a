//! `graft doctor` and `graft clean` against a fake API server (the harness
//! of `fake_api.rs`, whose router also sees the request body so
//! `SelfSubjectAccessReview`s can be answered per permission).

use std::sync::{Arc, Mutex};

use graft_kube::doctor::{Check, DoctorOptions, Outcome, run_checks_on};
use graft_kube::{AgentMode, Cluster, KubeTarget, clean};
use http::Method;
use kube::Client;
use serde_json::{Value, json};

mod common;

use common::{Seen, fake_client, status};

fn query_has(query: &str, needle: &str) -> bool {
    query.split('&').any(|kv| kv == needle)
}

fn version(minor: &str) -> Value {
    json!({"major": "1", "minor": minor, "gitVersion": format!("v1.{minor}.0"),
           "gitCommit": "", "gitTreeState": "clean", "buildDate": "", "goVersion": "",
           "compiler": "gc", "platform": "linux/amd64"})
}

fn namespace(labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": "shop", "labels": labels}})
}

/// Answers a `SelfSubjectAccessReview`: allowed unless `denied` says no to
/// its verb and resource (`patch pods/ephemeralcontainers`).
fn review(request: &Seen, denied: &[&str]) -> (u16, Value) {
    let attrs = &request.body["spec"]["resourceAttributes"];
    let mut resource = attrs["resource"].as_str().unwrap_or("").to_owned();
    if let Some(sub) = attrs["subresource"].as_str() {
        resource = format!("{resource}/{sub}");
    }
    let asked = format!("{} {resource}", attrs["verb"].as_str().unwrap_or(""));
    let allowed = !denied.contains(&asked.as_str());
    let mut answer = request.body.clone();
    answer["status"] = json!({"allowed": allowed});
    (201, answer)
}

fn target_pod() -> Value {
    json!({
        "metadata": {"name": "api-1", "namespace": "shop", "uid": "uid-api-1",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": "node-a", "containers": [{"name": "app"}]},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{
                "name": "app", "ready": true, "restartCount": 0, "image": "app", "imageID": "",
                "containerID": "containerd://id-api-1", "state": {"running": {}},
            }],
        },
    })
}

/// A cluster where everything is fine unless `tweak` answers otherwise.
fn cluster(
    tweak: impl Fn(&Seen) -> Option<(u16, Value)> + Send + Sync + 'static,
) -> (Cluster, Arc<Mutex<Vec<Seen>>>) {
    let (client, seen) = fake_client(move |r| {
        if let Some(answer) = tweak(r) {
            return answer;
        }
        match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/version") => (200, version("30")),
            ("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews") => review(r, &[]),
            ("GET", "/api/v1/namespaces/shop") => (
                200,
                namespace(json!({"pod-security.kubernetes.io/enforce": "privileged"})),
            ),
            ("GET", "/api/v1/namespaces/shop/pods/api-1") => (200, target_pod()),
            ("PATCH", "/api/v1/namespaces/shop/pods/api-1/ephemeralcontainers") => {
                (200, target_pod())
            }
            ("POST", "/api/v1/namespaces/shop/pods") => (201, r.body.clone()),
            _ => status(404, "NotFound", "not found"),
        }
    });
    let cluster = Cluster {
        client,
        namespace: "shop".into(),
    };
    (cluster, seen)
}

fn options(mode: AgentMode, target: Option<&str>) -> DoctorOptions {
    DoctorOptions {
        target: target.map(|t| t.parse::<KubeTarget>().unwrap()),
        mode,
        image: "graft-agent:test".into(),
    }
}

fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
    checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {checks:#?}"))
}

fn failed(checks: &[Check]) -> Vec<&str> {
    checks
        .iter()
        .filter(|c| c.verdict.outcome == Outcome::Fail)
        .map(|c| c.name.as_str())
        .collect()
}

#[tokio::test]
async fn a_healthy_cluster_passes_and_the_ephemeral_patch_is_a_dry_run() {
    let (cluster, seen) = cluster(|_| None);
    let checks = run_checks_on(&cluster, &options(AgentMode::Ephemeral, Some("pod/api-1"))).await;
    assert!(failed(&checks).is_empty(), "{checks:#?}");
    assert!(!graft_kube::doctor::any_failed(&checks));
    assert_eq!(find(&checks, "server version").verdict.outcome, Outcome::Ok);
    assert_eq!(
        find(&checks, "permission: patch pods/ephemeralcontainers")
            .verdict
            .outcome,
        Outcome::Ok
    );
    let target = find(&checks, "target pod/api-1");
    assert!(
        target
            .verdict
            .detail
            .contains("pod api-1, container app (the pod's only container), node node-a"),
        "{target:?}"
    );
    let image = find(&checks, "agent image");
    assert_eq!(image.verdict.outcome, Outcome::Info);
    assert!(image.verdict.detail.contains("graft-agent:test"));

    let seen = seen.lock().unwrap();
    let reviews = seen
        .iter()
        .filter(|r| r.path.ends_with("/selfsubjectaccessreviews"))
        .count();
    assert_eq!(reviews, graft_kube::rbac::ALL.len());
    let patch = seen
        .iter()
        .find(|r| r.method == Method::PATCH)
        .expect("a dry-run patch");
    assert!(query_has(&patch.query, "dryRun=All"), "{}", patch.query);
    assert_eq!(patch.body["metadata"]["uid"], "uid-api-1");
    assert_eq!(
        patch.body["spec"]["ephemeralContainers"][0]["image"],
        "graft-agent:test"
    );
    // Nothing but the dry run writes.
    assert!(
        seen.iter()
            .filter(|r| r.method != Method::GET && !r.path.ends_with("/selfsubjectaccessreviews"))
            .all(|r| query_has(&r.query, "dryRun=All"))
    );
}

#[tokio::test]
async fn denied_permissions_are_named_with_what_they_are_for() {
    let (cluster, _) = cluster(|r| {
        r.path
            .ends_with("/selfsubjectaccessreviews")
            .then(|| review(r, &["patch pods/ephemeralcontainers", "create jobs"]))
    });
    let checks = run_checks_on(&cluster, &options(AgentMode::Ephemeral, None)).await;
    assert_eq!(
        failed(&checks),
        ["permission: patch pods/ephemeralcontainers"]
    );
    let patch = find(&checks, "permission: patch pods/ephemeralcontainers");
    assert!(
        patch
            .verdict
            .detail
            .contains("needed to add the agent as an ephemeral container"),
        "{patch:?}"
    );
    assert!(
        patch
            .verdict
            .fix
            .as_deref()
            .unwrap()
            .contains("deploy/rbac.yaml")
    );
    // create jobs is node mode's: only a warning in ephemeral mode.
    assert_eq!(
        find(&checks, "permission: create jobs.batch")
            .verdict
            .outcome,
        Outcome::Warn
    );
    let node = run_checks_on(&cluster, &options(AgentMode::Node, None)).await;
    assert_eq!(failed(&node), ["permission: create jobs.batch"]);
}

#[tokio::test]
async fn an_old_server_fails() {
    let (cluster, _) = cluster(|r| (r.path == "/version").then(|| (200, version("24"))));
    let checks = run_checks_on(&cluster, &options(AgentMode::Ephemeral, None)).await;
    assert_eq!(failed(&checks), ["server version"]);
}

#[tokio::test]
async fn an_unreachable_server_stops_the_checks() {
    let (cluster, _) = cluster(|_| Some(status(401, "Unauthorized", "Unauthorized")));
    let checks = run_checks_on(&cluster, &options(AgentMode::Ephemeral, None)).await;
    assert_eq!(checks.len(), 1, "{checks:#?}");
    assert_eq!(failed(&checks), ["cluster access"]);
}

#[tokio::test]
async fn namespace_labels_decide_the_pod_security_verdict() {
    for (labels, expected) in [
        (
            json!({"pod-security.kubernetes.io/enforce": "baseline"}),
            Outcome::Fail,
        ),
        (
            json!({"pod-security.kubernetes.io/enforce": "restricted"}),
            Outcome::Fail,
        ),
        (
            json!({"pod-security.kubernetes.io/enforce": "privileged",
                   "pod-security.kubernetes.io/warn": "restricted"}),
            Outcome::Warn,
        ),
        (json!({"kubernetes.io/metadata.name": "shop"}), Outcome::Ok),
    ] {
        let answer = namespace(labels.clone());
        let (cluster, _) =
            cluster(move |r| (r.path == "/api/v1/namespaces/shop").then(|| (200, answer.clone())));
        let checks = run_checks_on(&cluster, &options(AgentMode::Node, None)).await;
        assert_eq!(
            find(&checks, "pod security").verdict.outcome,
            expected,
            "{labels}"
        );
    }
}

#[tokio::test]
async fn a_namespace_that_cannot_be_read_only_warns() {
    let (cluster, _) = cluster(|r| {
        (r.path == "/api/v1/namespaces/shop").then(|| {
            status(
                403,
                "Forbidden",
                "namespaces \"shop\" is forbidden: User \"bob\" cannot get resource",
            )
        })
    });
    let checks = run_checks_on(&cluster, &options(AgentMode::Ephemeral, None)).await;
    let ps = find(&checks, "pod security");
    assert_eq!(ps.verdict.outcome, Outcome::Warn);
    assert!(ps.verdict.detail.contains("get namespaces"), "{ps:?}");
    assert!(failed(&checks).is_empty(), "{checks:#?}");
}

#[tokio::test]
async fn node_mode_dry_runs_the_agent_job_and_reports_admission_refusals() {
    // Pod Security itself only warns about a Job; a policy engine that
    // applies the Pod Security Standards to pod templates (Kyverno's
    // autogen rules) refuses it.
    let (cluster, seen) = cluster(|r| {
        (r.method == Method::POST && r.path == "/apis/batch/v1/namespaces/shop/jobs").then(|| {
            status(
                403,
                "Forbidden",
                "admission webhook \"validate.kyverno.svc-fail\" denied the request: \
                 autogen-disallow-host-namespaces: hostPID must be unset or false",
            )
        })
    });
    let checks = run_checks_on(&cluster, &options(AgentMode::Node, Some("pod/api-1"))).await;
    assert_eq!(failed(&checks), ["agent admission (dry run)"]);
    let dry = find(&checks, "agent admission (dry run)");
    assert!(dry.verdict.detail.contains("denied the request"), "{dry:?}");
    assert!(
        dry.verdict
            .fix
            .as_deref()
            .unwrap()
            .contains("enforce=privileged")
    );
    let seen = seen.lock().unwrap();
    let post = seen
        .iter()
        .find(|r| r.method == Method::POST && r.path.ends_with("/jobs"));
    let post = post.expect("a dry-run create");
    assert!(query_has(&post.query, "dryRun=All"), "{}", post.query);
    let pod = &post.body["spec"]["template"]["spec"];
    assert_eq!(pod["nodeName"], "node-a");
    assert_eq!(pod["hostPID"], true);
}

#[tokio::test]
async fn an_unresolvable_target_fails() {
    let (cluster, _) = cluster(|_| None);
    let checks = run_checks_on(&cluster, &options(AgentMode::Ephemeral, Some("pod/nope"))).await;
    assert_eq!(failed(&checks), ["target pod/nope"]);
}

fn agent_pod(name: &str, namespace: &str, phase: &str, state: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/managed-by": "graft",
                                "graft.dev/session": "s"}},
        "spec": {"containers": [{"name": "agent"}]},
        "status": {"phase": phase, "containerStatuses": [{
            "name": "agent", "ready": false, "restartCount": 0, "image": "a",
            "imageID": "", "state": state}]},
    })
}

fn agent_job(name: &str, conditions: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "labels": {"app.kubernetes.io/managed-by": "graft",
                                "graft.dev/session": "s"}},
        "status": {"conditions": conditions},
    })
}

fn list(items: Vec<Value>) -> (u16, Value) {
    (
        200,
        json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
               "items": items}),
    )
}

fn expose_service(name: &str, session: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop",
                     "labels": {"app.kubernetes.io/managed-by": "graft",
                                "graft.dev/expose": "3000",
                                "graft.dev/session": session}},
        "spec": {"selector": {"graft.dev/session": session}},
    })
}

fn clean_cluster() -> (Client, Arc<Mutex<Vec<Seen>>>) {
    fake_client(|r| match (r.method.as_str(), r.path.as_str()) {
        // graft expose: one Service of a live session ("s"), one of a gone one.
        ("GET", "/api/v1/namespaces/shop/services" | "/api/v1/services")
            if r.query.contains("graft.dev%2Fexpose") =>
        {
            list(vec![
                expose_service("web-dev", "s"),
                expose_service("old-dev", "gone"),
            ])
        }
        // One finished agent Job (its pod already gone) and one that runs.
        ("GET", "/apis/batch/v1/namespaces/shop/jobs" | "/apis/batch/v1/jobs") => list(vec![
            agent_job(
                "graft-agent-jobdone",
                json!([{"type": "Complete", "status": "True"}]),
            ),
            agent_job("graft-agent-joblive", json!([])),
        ]),
        ("GET", "/api/v1/namespaces/shop/pods" | "/api/v1/pods")
            if query_has(
                &r.query,
                "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dgraft",
            ) =>
        {
            list(vec![
                agent_pod(
                    "graft-agent-done",
                    "shop",
                    "Succeeded",
                    json!({"terminated": {"exitCode": 0}}),
                ),
                agent_pod(
                    "graft-agent-crashed",
                    "shop",
                    "Running",
                    json!({"terminated": {"exitCode": 2, "reason": "Error"}}),
                ),
                agent_pod(
                    "graft-agent-live",
                    "shop",
                    "Running",
                    json!({"running": {}}),
                ),
            ])
        }
        ("GET", "/api/v1/namespaces/shop/pods" | "/api/v1/pods") => list(vec![json!({
            "metadata": {"name": "api-1", "namespace": "shop"},
            "spec": {"containers": [{"name": "app"}],
                     "ephemeralContainers": [{"name": "graft-agent-old"}]},
            "status": {"ephemeralContainerStatuses": [{
                "name": "graft-agent-old", "ready": false, "restartCount": 0, "image": "a",
                "imageID": "", "state": {"terminated": {"exitCode": 0}}}]},
        })]),
        ("DELETE", "/api/v1/namespaces/shop/pods/graft-agent-crashed") => {
            status(404, "NotFound", "pods \"graft-agent-crashed\" not found")
        }
        ("DELETE", _) => (200, agent_pod("x", "shop", "Succeeded", json!({}))),
        _ => status(404, "NotFound", "not found"),
    })
}

fn deletes(seen: &Arc<Mutex<Vec<Seen>>>) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|r| r.method == Method::DELETE)
        .map(|r| r.path.clone())
        .collect()
}

#[tokio::test]
async fn clean_deletes_exactly_the_terminated_agent_pods() {
    let (client, seen) = clean_cluster();
    let report = clean::clean(&client, Some("shop"), false).await.unwrap();
    assert_eq!(
        deletes(&seen),
        [
            // graft expose's Service of a session whose agent is gone, first:
            // once its agent's Job is deleted the garbage collector may take it.
            "/api/v1/namespaces/shop/services/old-dev",
            "/apis/batch/v1/namespaces/shop/jobs/graft-agent-jobdone",
            "/api/v1/namespaces/shop/pods/graft-agent-done",
            "/api/v1/namespaces/shop/pods/graft-agent-crashed",
        ]
    );
    // A Job's pods go with it, not before (background propagation).
    let job_delete = seen
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.method == Method::DELETE && r.path.contains("/jobs/"))
        .map(|r| r.body.clone())
        .unwrap();
    assert_eq!(
        job_delete["propagationPolicy"], "Background",
        "{job_delete}"
    );
    let removed: Vec<&str> = report.removed.iter().map(|p| p.name.as_str()).collect();
    // A pod already gone (404) counts as removed.
    assert_eq!(
        removed,
        [
            "old-dev",
            "graft-agent-jobdone",
            "graft-agent-done",
            "graft-agent-crashed",
        ]
    );
    let kept: Vec<&str> = report.kept.iter().map(|p| p.name.as_str()).collect();
    // The live session's Service stays with its agent.
    assert_eq!(kept, ["graft-agent-joblive", "graft-agent-live", "web-dev"]);
    assert!(report.failed.is_empty());
    assert_eq!(report.ephemeral.len(), 1);
    assert_eq!(report.ephemeral[0].pod, "api-1");
    assert_eq!(report.ephemeral[0].containers, ["graft-agent-old"]);
}

#[tokio::test]
async fn clean_dry_run_deletes_nothing_and_reports_the_plan() {
    let (client, seen) = clean_cluster();
    let report = clean::dry_run(&client, Some("shop"), false).await.unwrap();
    assert!(deletes(&seen).is_empty(), "{:?}", deletes(&seen));
    let planned: Vec<&str> = report.removed.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        planned,
        [
            "graft-agent-jobdone",
            "graft-agent-done",
            "graft-agent-crashed",
            "old-dev"
        ]
    );
    let kept: Vec<&str> = report.kept.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(kept, ["graft-agent-joblive", "graft-agent-live", "web-dev"]);
    assert_eq!(report.ephemeral.len(), 1);
}

#[tokio::test]
async fn clean_with_force_also_deletes_running_agents_in_every_namespace() {
    let (client, seen) = clean_cluster();
    let report = clean::clean(&client, None, true).await.unwrap();
    assert_eq!(deletes(&seen).len(), 7);
    assert!(deletes(&seen).contains(&"/api/v1/namespaces/shop/pods/graft-agent-live".to_owned()));
    assert!(report.kept.is_empty());
    let lists: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.method == Method::GET)
        .map(|r| r.path.clone())
        .collect();
    assert!(
        lists.iter().all(|p| [
            "/api/v1/pods",
            "/apis/batch/v1/jobs",
            "/api/v1/services",
            // The workloads a killed --scale-down session left at 0.
            "/apis/apps/v1/deployments",
            "/apis/apps/v1/statefulsets",
            "/apis/apps/v1/replicasets",
        ]
        .contains(&p.as_str())),
        "{lists:?}"
    );
}

#[tokio::test]
async fn a_failed_delete_is_reported_and_the_rest_go_on() {
    let (client, seen) = fake_client(|r| match r.method.as_str() {
        "GET" if r.query.contains("labelSelector") => list(vec![
            agent_pod(
                "graft-agent-a",
                "shop",
                "Failed",
                json!({"terminated": {"exitCode": 1}}),
            ),
            agent_pod(
                "graft-agent-b",
                "shop",
                "Failed",
                json!({"terminated": {"exitCode": 1}}),
            ),
        ]),
        "GET" => list(vec![]),
        "DELETE" if r.path.ends_with("graft-agent-a") => status(
            403,
            "Forbidden",
            "pods \"graft-agent-a\" is forbidden: User \"bob\" cannot delete resource",
        ),
        _ => (200, agent_pod("x", "shop", "Succeeded", json!({}))),
    });
    let report = clean::clean(&client, Some("shop"), false).await.unwrap();
    assert_eq!(deletes(&seen).len(), 2);
    assert_eq!(report.failed.len(), 1);
    assert!(
        report.failed[0].1.contains("not allowed to delete pods"),
        "{}",
        report.failed[0].1
    );
    assert_eq!(report.removed[0].name, "graft-agent-b");
}
