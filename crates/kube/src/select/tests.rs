use super::*;
use serde_json::json;

/// A pod as the API server would return it; `ready` sets phase, the
/// Ready condition and a running container.
fn pod(name: &str, created: &str, ready: bool) -> Pod {
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": format!("uid-{name}"),
            "creationTimestamp": created,
        },
        "spec": {
            "nodeName": "node-a",
            "containers": [{"name": "app"}, {"name": "metrics"}],
        },
        "status": {
            "phase": if ready { "Running" } else { "Pending" },
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            "containerStatuses": [
                {
                    "name": "app", "ready": ready, "restartCount": 0, "image": "app",
                    "imageID": "", "containerID": "containerd://abc123",
                    "state": if ready { json!({"running": {}}) }
                             else { json!({"waiting": {"reason": "ImagePullBackOff"}}) },
                },
                {
                    "name": "metrics", "ready": ready, "restartCount": 0, "image": "m",
                    "imageID": "", "containerID": "cri-o://def456",
                    "state": {"running": {}},
                }
            ],
        },
    }))
    .expect("test pod is valid")
}

fn with_annotation(mut pod: Pod, value: &str) -> Pod {
    pod.metadata.annotations = Some(
        [(DEFAULT_CONTAINER_ANNOTATION.to_owned(), value.to_owned())]
            .into_iter()
            .collect(),
    );
    pod
}

#[test]
fn ready_means_running_ready_and_not_terminating() {
    assert!(pod_is_ready(&pod("a", "2026-01-01T00:00:00Z", true)));
    assert!(!pod_is_ready(&pod("a", "2026-01-01T00:00:00Z", false)));

    let mut terminating = pod("a", "2026-01-01T00:00:00Z", true);
    terminating.metadata.deletion_timestamp = terminating.metadata.creation_timestamp.clone();
    assert!(!pod_is_ready(&terminating));
    assert_eq!(describe_not_ready(&terminating), "a (terminating)");

    // Running but failing its readiness probe.
    let mut unready: Pod = pod("b", "2026-01-01T00:00:00Z", true);
    let status = unready.status.as_mut().unwrap();
    status.conditions.as_mut().unwrap()[0].status = "False".into();
    status.conditions.as_mut().unwrap()[0].reason = Some("ContainersNotReady".into());
    assert!(!pod_is_ready(&unready));
    assert_eq!(
        describe_not_ready(&unready),
        "b (Running, not Ready: ContainersNotReady)"
    );
}

#[test]
fn newest_ready_pod_wins_and_all_candidates_are_reported() {
    let pods = vec![
        pod("old", "2026-01-01T00:00:00Z", true),
        pod("newest-but-pending", "2026-01-03T00:00:00Z", false),
        pod("new", "2026-01-02T00:00:00Z", true),
    ];
    let choice = choose_pod(pods, "deployment/api", "shop", "app=api").unwrap();
    assert_eq!(choice.chosen.metadata.name.as_deref(), Some("new"));
    assert_eq!(choice.candidates, ["new", "old"]);
}

#[test]
fn equal_ages_are_ordered_by_name_whatever_the_list_order() {
    let t = "2026-01-01T00:00:00Z";
    let a = choose_pod(
        vec![pod("b", t, true), pod("a", t, true)],
        "deployment/api",
        "shop",
        "app=api",
    )
    .unwrap();
    let b = choose_pod(
        vec![pod("a", t, true), pod("b", t, true)],
        "deployment/api",
        "shop",
        "app=api",
    )
    .unwrap();
    assert_eq!(a.candidates, ["a", "b"]);
    assert_eq!(a.candidates, b.candidates);
}

#[test]
fn no_ready_pod_says_why_each_is_not() {
    let err = choose_pod(
        vec![pod("api-1", "2026-01-01T00:00:00Z", false)],
        "deployment/api",
        "shop",
        "app=api",
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("api-1 (Pending: ImagePullBackOff)"), "{msg}");
    assert!(msg.contains("kubectl get pods -n shop -l app=api"), "{msg}");

    let err = choose_pod(vec![], "deployment/api", "shop", "app=api").unwrap_err();
    assert!(err.to_string().contains("matches no pod at all"), "{err}");
}

#[test]
fn only_pods_that_run_or_start_without_a_fatal_reason_are_worth_waiting_for() {
    // Running, its readiness probe not passed yet.
    let mut probing = pod("a", "2026-01-01T00:00:00Z", true);
    probing
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()[0]
        .status = "False".into();
    assert!(!pod_is_ready(&probing));
    assert!(pod_may_become_ready(&probing));
    let no_ready_pod = |pods| match choose_pod(pods, "deployment/api", "shop", "app=api") {
        Err(KubeError::NoReadyPod { becoming_ready, .. }) => becoming_ready,
        other => panic!("expected NoReadyPod, got {other:?}"),
    };
    assert!(no_ready_pod(vec![probing.clone()]));

    // Pending on an image that cannot be pulled: waiting does not help.
    let pulling = pod("b", "2026-01-01T00:00:00Z", false);
    assert!(!pod_may_become_ready(&pulling));
    assert!(!no_ready_pod(vec![pulling.clone()]));
    assert!(no_ready_pod(vec![pulling, probing.clone()]));

    let mut terminating = probing.clone();
    terminating.metadata.deletion_timestamp = terminating.metadata.creation_timestamp.clone();
    assert!(!pod_may_become_ready(&terminating));
    let mut done = probing;
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    assert!(!pod_may_become_ready(&done));
    assert!(!no_ready_pod(vec![]));
}

#[test]
fn container_requested_then_annotation_then_first() {
    let p = pod("a", "2026-01-01T00:00:00Z", true);
    assert_eq!(
        choose_container(&p, Some("metrics")).unwrap(),
        ContainerChoice {
            name: "metrics".into(),
            reason: ContainerReason::Requested
        }
    );
    assert_eq!(
        choose_container(&p, None).unwrap(),
        ContainerChoice {
            name: "app".into(),
            reason: ContainerReason::First
        }
    );
    let annotated = with_annotation(p.clone(), "metrics");
    assert_eq!(
        choose_container(&annotated, None).unwrap(),
        ContainerChoice {
            name: "metrics".into(),
            reason: ContainerReason::DefaultAnnotation
        }
    );
    // The request beats the annotation.
    assert_eq!(
        choose_container(&annotated, Some("app")).unwrap().name,
        "app"
    );
    // An annotation naming a missing container falls back to the first.
    let stale = with_annotation(p, "gone");
    assert_eq!(
        choose_container(&stale, None).unwrap().reason,
        ContainerReason::First
    );
}

#[test]
fn single_container_and_native_sidecars() {
    let mut p = pod("a", "2026-01-01T00:00:00Z", true);
    let spec = p.spec.as_mut().unwrap();
    spec.containers.truncate(1);
    spec.init_containers = Some(vec![
        serde_json::from_value(json!({"name": "proxy", "restartPolicy": "Always"})).unwrap(),
        serde_json::from_value(json!({"name": "migrate"})).unwrap(),
    ]);
    assert_eq!(
        choose_container(&p, None).unwrap().reason,
        ContainerReason::OnlyContainer
    );
    assert_eq!(choose_container(&p, Some("proxy")).unwrap().name, "proxy");
    // A plain init container has finished: it has no process to attach to.
    let err = choose_container(&p, Some("migrate")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pod \"a\" has no container \"migrate\"; its containers are app, proxy: add \
         /container/NAME with one of them"
    );
}

#[test]
fn resolved_target_strips_the_runtime_prefix() {
    let p = pod("a", "2026-01-01T00:00:00Z", true);
    let c = choose_container(&p, None).unwrap();
    let t = resolved_target(&p, c).unwrap();
    assert_eq!(t.namespace, "shop");
    assert_eq!(t.pod, "a");
    assert_eq!(t.pod_uid, "uid-a");
    assert_eq!(t.container.name, "app");
    assert_eq!(t.container_id, "abc123");
    assert_eq!(t.container_runtime, "containerd");
    assert_eq!(t.node, "node-a");
    assert!(!t.shares_process_namespace);

    let c = choose_container(&p, Some("metrics")).unwrap();
    let t = resolved_target(&p, c).unwrap();
    assert_eq!(
        (t.container_runtime.as_str(), t.container_id.as_str()),
        ("cri-o", "def456")
    );

    assert_eq!(split_container_id("plainid"), ("", "plainid"));
}

#[test]
fn a_container_that_is_not_running_cannot_be_targeted() {
    let p = pod("a", "2026-01-01T00:00:00Z", false);
    let c = choose_container(&p, Some("app")).unwrap();
    let err = resolved_target(&p, c).unwrap_err();
    assert!(
        err.to_string()
            .contains("is not running (waiting: ImagePullBackOff)"),
        "{err}"
    );
    assert!(check_named_pod(&p).is_err());
    assert!(check_named_pod(&pod("b", "2026-01-01T00:00:00Z", true)).is_ok());
}

fn job(name: &str, owner_uid: &str, started: &str, active: i32, done: Option<&str>) -> Job {
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "ownerReferences": [{
                "apiVersion": "batch/v1", "kind": "CronJob", "name": "nightly",
                "uid": owner_uid, "controller": true,
            }],
        },
        "status": {
            "startTime": started,
            "active": active,
            "conditions": done.map(|t| vec![json!({"type": t, "status": "True"})]),
        },
    }))
    .expect("test job is valid")
}

#[test]
fn cronjob_takes_its_newest_running_job() {
    let jobs = vec![
        job("nightly-1", "cj", "2026-01-01T00:00:00Z", 1, None),
        job("nightly-2", "cj", "2026-01-02T00:00:00Z", 1, None),
        job(
            "nightly-3",
            "cj",
            "2026-01-03T00:00:00Z",
            0,
            Some("Complete"),
        ),
        job("nightly-4", "cj", "2026-01-04T00:00:00Z", 1, Some("Failed")),
        job("other", "another-cj", "2026-01-05T00:00:00Z", 1, None),
    ];
    let newest = newest_running_job(&jobs, "cj").unwrap();
    assert_eq!(newest.metadata.name.as_deref(), Some("nightly-2"));
    assert!(newest_running_job(&jobs[2..4], "cj").is_none());
}

#[test]
fn selectors_become_list_params_strings() {
    let sel: LabelSelector = serde_json::from_value(json!({
        "matchLabels": {"app": "api"},
        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web"]}],
    }))
    .unwrap();
    let s = selector_string(Some(&sel), "deployment/api").unwrap();
    assert!(s.contains("app=api"), "{s}");
    assert!(s.contains("tier in (web)"), "{s}");

    let err = selector_string(Some(&LabelSelector::default()), "deployment/api").unwrap_err();
    assert!(err.to_string().contains("would match every pod"), "{err}");
    assert!(selector_string(None, "job/x").is_err());
}

#[test]
fn rollout_selector_or_workload_ref() {
    let r = json!({"spec": {"selector": {"matchLabels": {"app": "api"}}}});
    assert!(matches!(
        rollout_pods(&r, "api").unwrap(),
        RolloutPods::Selector(_)
    ));
    let r = json!({"spec": {"workloadRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api-base"}}});
    assert_eq!(
        rollout_pods(&r, "api").unwrap(),
        RolloutPods::Deployment("api-base".into())
    );
    let r = json!({"spec": {}});
    assert!(rollout_pods(&r, "api").is_err());
}
