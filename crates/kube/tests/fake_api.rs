//! The I/O paths of `resolve` and `place` against a fake API server: a tower
//! service given to `kube::Client::new` that answers the requests graft
//! makes with canned objects, and records them. No cluster is needed; what is
//! checked is which requests graft sends and how it reads the answers.

use std::time::Duration;

use graft_kube::{
    AgentMode, AgentOptions, KubeError, KubeTarget, SecretDigest, SessionId, add_ephemeral_agent,
    resolve, wait_for_agent,
};
use http::Method;
use serde_json::{Value, json};

mod common;

use std::sync::{Arc, Mutex};

use common::{Seen, status};

/// A client whose every request is answered by `route(method, path, query)`.
fn fake_client(
    route: impl Fn(&Method, &str, &str) -> (u16, Value) + Send + Sync + 'static,
) -> (kube::Client, Arc<Mutex<Vec<Seen>>>) {
    common::fake_client(move |r: &Seen| route(&r.method, &r.path, &r.query))
}

fn pod(name: &str, created: &str, ready: bool) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "creationTimestamp": created, "labels": {"app": "api"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "app"}]},
        "status": {
            "phase": if ready { "Running" } else { "Pending" },
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            "containerStatuses": [{
                "name": "app", "ready": ready, "restartCount": 0, "image": "app", "imageID": "",
                "containerID": format!("containerd://id-{name}"), "state": {"running": {}},
            }],
        },
    })
}

fn pod_list(items: Vec<Value>) -> Value {
    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items})
}

fn target(s: &str) -> KubeTarget {
    s.parse().unwrap()
}

fn query_has(query: &str, needle: &str) -> bool {
    query.split('&').any(|kv| kv == needle)
}

#[tokio::test]
async fn deployment_resolves_to_its_newest_ready_pod() {
    let (client, seen) = fake_client(|method, path, query| match (method.as_str(), path) {
        ("GET", "/apis/apps/v1/namespaces/shop/deployments/api") => (
            200,
            json!({"metadata": {"name": "api"},
                   "spec": {"selector": {"matchLabels": {"app": "api"}}, "template": {}}}),
        ),
        ("GET", "/api/v1/namespaces/shop/pods") if query_has(query, "labelSelector=app%3Dapi") => (
            200,
            pod_list(vec![
                pod("api-old", "2026-01-01T00:00:00Z", true),
                pod("api-new", "2026-01-02T00:00:00Z", true),
                pod("api-pending", "2026-01-03T00:00:00Z", false),
            ]),
        ),
        _ => status(404, "NotFound", "not found"),
    });
    let r = resolve(&client, "shop", &target("deploy/api"))
        .await
        .unwrap();
    assert_eq!(r.target.pod, "api-new");
    assert_eq!(r.target.container_id, "id-api-new");
    assert_eq!(r.candidates, ["api-new", "api-old"]);
    assert_eq!(r.selector.as_deref(), Some("app=api"));
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_missing_deployment_lists_those_that_exist() {
    let (client, _) = fake_client(|_, path, _| match path {
        "/apis/apps/v1/namespaces/shop/deployments/apx" => {
            status(404, "NotFound", "deployments.apps \"apx\" not found")
        }
        "/apis/apps/v1/namespaces/shop/deployments" => (
            200,
            json!({"metadata": {}, "items": [
                {"metadata": {"name": "api"}, "spec": {"selector": {}, "template": {}}},
                {"metadata": {"name": "web"}, "spec": {"selector": {}, "template": {}}},
            ]}),
        ),
        _ => status(404, "NotFound", "not found"),
    });
    let err = resolve(&client, "shop", &target("deploy/apx"))
        .await
        .unwrap_err();
    assert!(err.is_not_found());
    assert!(
        err.to_string()
            .contains("the deployments there are: api, web"),
        "{err}"
    );
}

#[tokio::test]
async fn forbidden_names_the_missing_verb() {
    let (client, _) = fake_client(|_, _, _| {
        status(
            403,
            "Forbidden",
            "statefulsets.apps \"db\" is forbidden: User \"bob\" cannot get resource",
        )
    });
    let err = resolve(&client, "shop", &target("sts/db"))
        .await
        .unwrap_err();
    assert!(err.is_forbidden(), "{err:?}");
    assert!(
        err.to_string()
            .contains("not allowed to get statefulsets.apps"),
        "{err}"
    );
}

#[tokio::test]
async fn cronjob_resolves_through_its_running_job() {
    let (client, _) = fake_client(|_, path, query| match path {
        "/apis/batch/v1/namespaces/shop/cronjobs/nightly" => (
            200,
            json!({"metadata": {"name": "nightly", "uid": "cj-uid"},
                   "spec": {"schedule": "@daily", "jobTemplate": {}}}),
        ),
        "/apis/batch/v1/namespaces/shop/jobs" => (
            200,
            json!({"metadata": {}, "items": [{
                "metadata": {"name": "nightly-29000", "ownerReferences": [{
                    "apiVersion": "batch/v1", "kind": "CronJob", "name": "nightly",
                    "uid": "cj-uid", "controller": true}]},
                "spec": {"selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": "job-uid"}},
                         "template": {}},
                "status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"},
            }]}),
        ),
        "/api/v1/namespaces/shop/pods"
            if query_has(
                query,
                "labelSelector=batch.kubernetes.io%2Fcontroller-uid%3Djob-uid",
            ) =>
        {
            (
                200,
                pod_list(vec![pod("nightly-29000-x", "2026-01-01T00:00:00Z", true)]),
            )
        }
        _ => status(404, "NotFound", "not found"),
    });
    let r = resolve(&client, "shop", &target("cj/nightly"))
        .await
        .unwrap();
    assert_eq!(r.job.as_deref(), Some("nightly-29000"));
    assert_eq!(r.target.pod, "nightly-29000-x");
}

#[tokio::test]
async fn rollout_without_the_crd_says_argo_is_not_installed() {
    let (client, _) = fake_client(|_, path, _| match path {
        "/apis" => (
            200,
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
                "name": "apps", "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"}}]}),
        ),
        _ => status(404, "NotFound", "not found"),
    });
    let err = resolve(&client, "shop", &target("rollout/api"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, KubeError::RolloutsNotInstalled { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn rollout_resolves_through_the_dynamic_api() {
    let (client, _) = fake_client(|_, path, query| match path {
        "/apis" => (
            200,
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
                "name": "argoproj.io",
                "versions": [{"groupVersion": "argoproj.io/v1alpha1", "version": "v1alpha1"}],
                "preferredVersion": {"groupVersion": "argoproj.io/v1alpha1", "version": "v1alpha1"}}]}),
        ),
        "/apis/argoproj.io/v1alpha1" => (
            200,
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "argoproj.io/v1alpha1",
                   "resources": [{"name": "rollouts", "singularName": "rollout", "namespaced": true,
                                  "kind": "Rollout", "verbs": ["get", "list", "watch"]}]}),
        ),
        "/apis/argoproj.io/v1alpha1/namespaces/shop/rollouts/api" => (
            200,
            json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
                   "metadata": {"name": "api"},
                   "spec": {"selector": {"matchLabels": {"app": "api"}}}}),
        ),
        "/api/v1/namespaces/shop/pods" if query_has(query, "labelSelector=app%3Dapi") => (
            200,
            pod_list(vec![pod("api-r1", "2026-01-01T00:00:00Z", true)]),
        ),
        _ => status(404, "NotFound", "not found"),
    });
    let r = resolve(&client, "shop", &target("rollout/api"))
        .await
        .unwrap();
    assert_eq!(r.target.pod, "api-r1");
}

fn options() -> AgentOptions {
    AgentOptions::new(
        SessionId::new("0123456789abcdef").unwrap(),
        SecretDigest::of("s3cret"),
    )
}

async fn resolved_api_pod() -> graft_kube::ResolvedTarget {
    let (client, _) = fake_client(|_, path, _| match path {
        "/api/v1/namespaces/shop/pods/api-1" => (200, pod("api-1", "2026-01-01T00:00:00Z", true)),
        _ => status(404, "NotFound", "not found"),
    });
    resolve(&client, "shop", &target("pod/api-1"))
        .await
        .unwrap()
        .target
}

#[tokio::test]
async fn ephemeral_agent_is_a_strategic_patch_of_the_subresource_guarded_by_uid() {
    let resolved = resolved_api_pod().await;
    let (client, seen) = fake_client(|_, _, _| (200, pod("api-1", "2026-01-01T00:00:00Z", true)));
    let placement = add_ephemeral_agent(&client, &resolved, &options())
        .await
        .unwrap();
    assert_eq!(placement.mode, AgentMode::Ephemeral);
    assert_eq!(placement.port_forward_pod, "api-1");
    let seen = seen.lock().unwrap();
    let patch = &seen[0];
    assert_eq!(patch.method, Method::PATCH);
    assert_eq!(
        patch.path,
        "/api/v1/namespaces/shop/pods/api-1/ephemeralcontainers"
    );
    assert_eq!(patch.content_type, "application/strategic-merge-patch+json");
    assert!(
        query_has(&patch.query, "fieldManager=graft"),
        "{}",
        patch.query
    );
    assert_eq!(patch.body["metadata"]["uid"], "uid-api-1");
    let added = &patch.body["spec"]["ephemeralContainers"][0];
    assert_eq!(added["name"], "graft-agent-0123456789abcdef");
    assert_eq!(added["targetContainerName"], "app");
}

#[tokio::test]
async fn old_clusters_without_the_subresource_are_told_to_use_node_mode() {
    let resolved = resolved_api_pod().await;
    let (client, _) = fake_client(|_, _, _| {
        status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    });
    let err = add_ephemeral_agent(&client, &resolved, &options())
        .await
        .unwrap_err();
    assert!(
        matches!(err, KubeError::EphemeralContainersUnsupported),
        "{err:?}"
    );
}

fn pod_with_agent(state: Value) -> Value {
    let mut p = pod("api-1", "2026-01-01T00:00:00Z", true);
    p["status"]["ephemeralContainerStatuses"] = json!([{
        "name": "graft-agent-0123456789abcdef", "ready": false, "restartCount": 0,
        "image": "graft-agent", "imageID": "", "state": state,
    }]);
    p
}

#[tokio::test]
async fn wait_reads_the_port_from_the_ready_line() {
    let resolved = resolved_api_pod().await;
    let (client, _) = fake_client(|_, path, query| match path {
        "/api/v1/namespaces/shop/pods/api-1/ephemeralcontainers" => {
            (200, pod_with_agent(json!({})))
        }
        "/api/v1/namespaces/shop/pods" if !query_has(query, "watch=true") => {
            (200, pod_list(vec![pod_with_agent(json!({"running": {}}))]))
        }
        "/api/v1/namespaces/shop/pods/api-1/log" => (
            200,
            Value::String("INFO starting\nready tcp:127.0.0.1:43117\n".into()),
        ),
        _ => status(404, "NotFound", "not found"),
    });
    let placement = add_ephemeral_agent(&client, &resolved, &options())
        .await
        .unwrap();
    let ready = wait_for_agent(&client, &placement, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(ready.port, 43117);
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_fails_with_the_pod_events() {
    let resolved = resolved_api_pod().await;
    let (client, _) = fake_client(|_, path, query| match path {
        "/api/v1/namespaces/shop/pods/api-1/ephemeralcontainers" => {
            (200, pod_with_agent(json!({})))
        }
        "/api/v1/namespaces/shop/pods" if !query_has(query, "watch=true") => (
            200,
            pod_list(vec![pod_with_agent(json!({"waiting": {
                "reason": "ImagePullBackOff",
                "message": "Back-off pulling image \"graft-agent:0.1.0\"",
            }}))]),
        ),
        "/api/v1/namespaces/shop/events" => (
            200,
            json!({"metadata": {}, "items": [{
                "metadata": {"name": "e1"},
                "involvedObject": {"kind": "Pod", "name": "api-1",
                                   "fieldPath": "spec.ephemeralContainers{graft-agent-0123456789abcdef}"},
                "type": "Warning", "reason": "Failed",
                "message": "Failed to pull image \"graft-agent:0.1.0\": not found",
                "lastTimestamp": "2026-01-01T00:00:01Z",
            }]}),
        ),
        _ => status(404, "NotFound", "not found"),
    });
    let placement = add_ephemeral_agent(&client, &resolved, &options())
        .await
        .unwrap();
    let err = wait_for_agent(&client, &placement, Duration::from_secs(10))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, KubeError::AgentFailed { .. }), "{err:?}");
    assert!(msg.contains("ImagePullBackOff"), "{msg}");
    assert!(
        msg.contains("Warning Failed: Failed to pull image"),
        "{msg}"
    );
    assert!(msg.contains("kind load image-archive"), "{msg}");
}

#[tokio::test]
async fn a_pod_replaced_since_resolution_is_not_patched() {
    let resolved = resolved_api_pod().await;
    let (client, _) = fake_client(|_, _, _| {
        status(
            409,
            "Conflict",
            "Precondition failed: UID in precondition: uid-api-1, UID in object meta: uid-new",
        )
    });
    let err = add_ephemeral_agent(&client, &resolved, &options())
        .await
        .unwrap_err();
    assert!(matches!(err, KubeError::PodReplaced { .. }), "{err:?}");
}
