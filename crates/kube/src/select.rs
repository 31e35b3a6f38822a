//! Pure selection: pods, jobs and annotations in, the chosen pod and container
//! out. No I/O, so every rule is unit-tested with objects built in the tests.
//!
//! Rules:
//! - a workload's pod must be *ready*: phase `Running`, condition `Ready` true,
//!   no deletion timestamp (a terminating pod is about to go away with its
//!   agent);
//! - among ready pods graft takes the newest (during a rollout that is the new
//!   revision), ties broken by name so the choice is stable, and reports every
//!   candidate so the CLI can say which it took;
//! - a pod named with `pod/NAME` need not be ready (people debug unready pods),
//!   but must be running and not terminating;
//! - the container is the one asked for with `/container/NAME`, else the one
//!   the `kubectl.kubernetes.io/default-container` annotation names, else the
//!   first; it must be running, and its container ID comes from the status
//!   with the runtime prefix (`containerd://`) stripped.

use std::fmt;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::KubeError;

/// The annotation kubectl uses to pick a pod's default container.
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// The result of choosing one pod among a workload's ready pods.
#[derive(Debug, Clone)]
pub struct PodChoice {
    /// The pod graft takes.
    pub chosen: Pod,
    /// Every ready pod, in preference order (the chosen one first), by name.
    pub candidates: Vec<String>,
}

/// Why a container was chosen, so the CLI can say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerReason {
    /// Named with `/container/NAME`.
    Requested,
    /// Named by the `kubectl.kubernetes.io/default-container` annotation.
    DefaultAnnotation,
    /// The pod has one container.
    OnlyContainer,
    /// The first of several containers (no annotation, or one naming a
    /// container the pod does not have).
    First,
}

impl fmt::Display for ContainerReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContainerReason::Requested => "asked for",
            ContainerReason::DefaultAnnotation => "the pod's default-container annotation",
            ContainerReason::OnlyContainer => "the pod's only container",
            ContainerReason::First => "the pod's first container",
        })
    }
}

/// A container of a pod that graft can attach to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerChoice {
    /// The container's name.
    pub name: String,
    /// Why it was chosen.
    pub reason: ContainerReason,
}

/// Where the target is: everything the agent placement and the port-forward
/// need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTarget {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's UID (guards against acting on a re-created pod of the same name).
    pub pod_uid: String,
    /// The target container.
    pub container: ContainerChoice,
    /// The container's ID without its runtime prefix (`3f9a…`).
    pub container_id: String,
    /// The container runtime the ID came from (`containerd`, `cri-o`, `docker`).
    pub container_runtime: String,
    /// The node the pod runs on.
    pub node: String,
    /// Whether the pod shares one process namespace between its containers
    /// (`shareProcessNamespace`), which changes what PID 1 is.
    pub shares_process_namespace: bool,
    /// The node's address as the pod's status reports it (`status.hostIP`):
    /// one of the sources the kubelet's probes may come from.
    pub host_ip: Option<String>,
    /// Whether a container of the pod has a kubelet probe that reaches it over
    /// the network (`httpGet`, `tcpSocket` or `grpc` liveness, readiness or
    /// startup probe). Only then does the agent keep the node's connections
    /// away from the session; without such probes, traffic from the node (a
    /// NodePort, a developer's `curl` on a local cluster) is stolen too.
    pub probed_over_network: bool,
}

/// Whether any container of `pod` has a probe the kubelet sends over the
/// network (Kubernetes docs, "Configure Liveness, Readiness and Startup
/// Probes": `httpGet`, `tcpSocket`, `grpc`; `exec` runs inside the container).
fn probed_over_network(pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    spec.containers.iter().any(|c| {
        [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
            .into_iter()
            .flatten()
            .any(|p| p.http_get.is_some() || p.tcp_socket.is_some() || p.grpc.is_some())
    })
}

/// Whether a pod can serve as a workload's target: running, `Ready`, and not
/// being deleted.
pub fn pod_is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod_phase(pod) == "Running"
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waiting reasons of a container that does not get better by waiting.
const HOPELESS_WAITING: &[&str] = &[
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Whether a pod that is not ready may still become so by itself: it runs
/// (its readiness probe has not passed yet) or is starting, is not being
/// deleted, and none of its containers waits on something that waiting does
/// not fix (an image that cannot be pulled, a crash loop).
pub fn pod_may_become_ready(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() || !matches!(pod_phase(pod), "Running" | "Pending")
    {
        return false;
    }
    let hopeless = |cs: &ContainerStatus| {
        cs.state
            .as_ref()
            .and_then(|st| st.waiting.as_ref())
            .and_then(|w| w.reason.as_deref())
            .is_some_and(|r| HOPELESS_WAITING.contains(&r))
    };
    !pod.status.iter().any(|s| {
        s.init_container_statuses
            .iter()
            .chain(s.container_statuses.iter())
            .flatten()
            .any(hopeless)
    })
}

fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Unknown")
}

/// Why a pod is not ready, for error messages: `api-1 (Pending)`,
/// `api-2 (terminating)`, `api-3 (Running, not Ready: ContainersNotReady)`.
pub fn describe_not_ready(pod: &Pod) -> String {
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    if pod.metadata.deletion_timestamp.is_some() {
        return format!("{name} (terminating)");
    }
    let phase = pod_phase(pod);
    let waiting = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .find_map(|cs| cs.state.as_ref()?.waiting.as_ref()?.reason.clone());
    match (phase, waiting) {
        (_, Some(reason)) => format!("{name} ({phase}: {reason})"),
        ("Running", None) => {
            let why = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .find(|c| c.type_ == "Ready")
                .and_then(|c| c.reason.clone())
                .unwrap_or_else(|| "no Ready condition".to_owned());
            format!("{name} (Running, not Ready: {why})")
        }
        (phase, None) => format!("{name} ({phase})"),
    }
}

/// Picks the pod graft attaches to among the pods a workload's selector
/// matched. `target` and `selector` only feed the error.
///
/// # Errors
///
/// [`KubeError::NoReadyPod`] when no pod is ready, listing why each is not.
pub fn choose_pod(
    pods: Vec<Pod>,
    target: &str,
    namespace: &str,
    selector: &str,
) -> Result<PodChoice, KubeError> {
    let (mut ready, not_ready): (Vec<Pod>, Vec<Pod>) = pods.into_iter().partition(pod_is_ready);
    if ready.is_empty() {
        return Err(KubeError::NoReadyPod {
            target: target.to_owned(),
            namespace: namespace.to_owned(),
            selector: selector.to_owned(),
            not_ready: not_ready.iter().map(describe_not_ready).collect(),
            becoming_ready: not_ready.iter().any(pod_may_become_ready),
            waited_secs: None,
        });
    }
    // Newest first; the name breaks ties (and orders pods without a timestamp)
    // so the same cluster state always gives the same choice.
    ready.sort_by(|a, b| {
        b.metadata
            .creation_timestamp
            .cmp(&a.metadata.creation_timestamp)
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    let candidates = ready
        .iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();
    let chosen = ready.swap_remove(0);
    Ok(PodChoice { chosen, candidates })
}

/// Checks a pod named directly with `pod/NAME`: it must be running and not
/// terminating (readiness is not required).
///
/// # Errors
///
/// [`KubeError::ContainerNotRunning`] naming the pod's phase otherwise.
pub fn check_named_pod(pod: &Pod) -> Result<(), KubeError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(KubeError::ContainerNotRunning {
            pod: name,
            container: "*".into(),
            state: "the pod is terminating".into(),
        });
    }
    let phase = pod_phase(pod);
    if phase != "Running" {
        return Err(KubeError::ContainerNotRunning {
            pod: name,
            container: "*".into(),
            state: format!("pod phase {phase}"),
        });
    }
    Ok(())
}

/// Chooses the target container of `pod`.
///
/// # Errors
///
/// [`KubeError::ContainerNotFound`] when `requested` is not one of the pod's
/// containers (a native sidecar, an init container with `restartPolicy:
/// Always`, counts as one).
pub fn choose_container(pod: &Pod, requested: Option<&str>) -> Result<ContainerChoice, KubeError> {
    let spec = pod.spec.as_ref();
    let containers: Vec<&str> = spec
        .map(|s| s.containers.iter().map(|c| c.name.as_str()).collect())
        .unwrap_or_default();
    let sidecars: Vec<&str> = spec
        .and_then(|s| s.init_containers.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"))
        .map(|c| c.name.as_str())
        .collect();
    let pod_name = pod.metadata.name.clone().unwrap_or_default();

    if let Some(requested) = requested {
        if containers.contains(&requested) || sidecars.contains(&requested) {
            return Ok(ContainerChoice {
                name: requested.to_owned(),
                reason: ContainerReason::Requested,
            });
        }
        return Err(KubeError::ContainerNotFound {
            pod: pod_name,
            container: requested.to_owned(),
            available: containers
                .iter()
                .chain(&sidecars)
                .map(|s| (*s).to_owned())
                .collect(),
        });
    }

    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DEFAULT_CONTAINER_ANNOTATION))
        .map(String::as_str);
    // kubectl falls back to the first container when the annotation names one
    // that does not exist; so does graft.
    if let Some(name) = annotated.filter(|n| containers.contains(n)) {
        return Ok(ContainerChoice {
            name: name.to_owned(),
            reason: ContainerReason::DefaultAnnotation,
        });
    }
    match containers.as_slice() {
        [] => Err(KubeError::ContainerNotFound {
            pod: pod_name,
            container: "(any)".into(),
            available: vec![],
        }),
        [only] => Ok(ContainerChoice {
            name: (*only).to_owned(),
            reason: ContainerReason::OnlyContainer,
        }),
        [first, ..] => Ok(ContainerChoice {
            name: (*first).to_owned(),
            reason: ContainerReason::First,
        }),
    }
}

/// Splits a status container ID (`containerd://3f9a…`) into runtime and ID.
/// An ID without a prefix is returned whole with an empty runtime.
pub fn split_container_id(id: &str) -> (&str, &str) {
    match id.split_once("://") {
        Some((runtime, id)) => (runtime, id),
        None => ("", id),
    }
}

fn container_status<'a>(pod: &'a Pod, container: &str) -> Option<&'a ContainerStatus> {
    let status = pod.status.as_ref()?;
    status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .find(|cs| cs.name == container)
}

/// Describes a container's state: `running`, `waiting: CrashLoopBackOff`,
/// `terminated: Completed (exit 0)`, `no status yet`.
pub fn describe_container_state(status: Option<&ContainerStatus>) -> String {
    let Some(state) = status.and_then(|s| s.state.as_ref()) else {
        return "no status yet".to_owned();
    };
    if state.running.is_some() {
        "running".to_owned()
    } else if let Some(w) = &state.waiting {
        let mut s = format!("waiting: {}", w.reason.as_deref().unwrap_or("unknown"));
        if let Some(m) = w.message.as_deref().filter(|m| !m.is_empty()) {
            s.push_str(&format!(" ({m})"));
        }
        s
    } else if let Some(t) = &state.terminated {
        format!(
            "terminated: {} (exit {})",
            t.reason.as_deref().unwrap_or("unknown"),
            t.exit_code
        )
    } else {
        "unknown".to_owned()
    }
}

/// Builds the [`ResolvedTarget`] for `container` of `pod`.
///
/// # Errors
///
/// [`KubeError::ContainerNotRunning`] when the container is not running (it
/// has no process, and its container ID is not final), or the pod is not yet
/// on a node.
pub fn resolved_target(pod: &Pod, container: ContainerChoice) -> Result<ResolvedTarget, KubeError> {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let status = container_status(pod, &container.name);
    let running = status
        .and_then(|s| s.state.as_ref())
        .is_some_and(|s| s.running.is_some());
    let id = status.and_then(|s| s.container_id.as_deref());
    let (Some(id), true) = (id, running) else {
        return Err(KubeError::ContainerNotRunning {
            pod: pod_name,
            container: container.name,
            state: describe_container_state(status),
        });
    };
    let (runtime, id) = split_container_id(id);
    let spec = pod.spec.as_ref();
    let Some(node) = spec.and_then(|s| s.node_name.clone()) else {
        return Err(KubeError::ContainerNotRunning {
            pod: pod_name,
            container: container.name,
            state: "the pod is not scheduled on a node".into(),
        });
    };
    Ok(ResolvedTarget {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        pod: pod_name,
        pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
        container_id: id.to_owned(),
        container_runtime: runtime.to_owned(),
        node,
        shares_process_namespace: spec.and_then(|s| s.share_process_namespace) == Some(true),
        host_ip: pod.status.as_ref().and_then(|s| s.host_ip.clone()),
        probed_over_network: probed_over_network(pod),
        container,
    })
}

/// The newest job of a CronJob that is still running: owned by the CronJob
/// (controller reference with its UID), with active pods, and neither
/// complete nor failed.
pub fn newest_running_job<'a>(jobs: &'a [Job], cronjob_uid: &str) -> Option<&'a Job> {
    jobs.iter()
        .filter(|job| {
            job.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.controller == Some(true) && o.kind == "CronJob" && o.uid == cronjob_uid)
        })
        .filter(|job| {
            let Some(status) = &job.status else {
                return false;
            };
            let finished = status.conditions.iter().flatten().any(|c| {
                matches!(c.type_.as_str(), "Complete" | "Failed" | "FailureTarget")
                    && c.status == "True"
            });
            !finished && status.active.unwrap_or(0) > 0
        })
        .max_by(|a, b| {
            let start = |j: &Job| {
                j.status
                    .as_ref()
                    .and_then(|s| s.start_time.clone())
                    .or_else(|| j.metadata.creation_timestamp.clone())
            };
            start(a)
                .cmp(&start(b))
                // Stable on equal times: the smaller name wins.
                .then_with(|| b.metadata.name.cmp(&a.metadata.name))
        })
}

/// Turns a workload's label selector into the string `ListParams` takes.
///
/// # Errors
///
/// [`KubeError::NoSelector`] for an empty selector (it would match every pod
/// of the namespace) or an invalid operator.
pub fn selector_string(
    selector: Option<&LabelSelector>,
    target: &str,
) -> Result<String, KubeError> {
    let no_selector = |reason: String| KubeError::NoSelector {
        target: target.to_owned(),
        reason,
    };
    let selector = selector.ok_or_else(|| no_selector("it has none".into()))?;
    let parsed =
        kube::core::Selector::try_from(selector.clone()).map_err(|e| no_selector(e.to_string()))?;
    if parsed.selects_all() {
        return Err(no_selector("it is empty and would match every pod".into()));
    }
    Ok(parsed.to_string())
}

/// Where a Rollout's pods are found.
#[derive(Debug, Clone, PartialEq)]
pub enum RolloutPods {
    /// Its own `spec.selector`.
    Selector(LabelSelector),
    /// `spec.workloadRef` names a Deployment whose selector (and pod template)
    /// the Rollout uses.
    Deployment(String),
}

/// Reads where a Rollout's pods are from its (untyped) object.
///
/// # Errors
///
/// [`KubeError::NoSelector`] when it has neither a selector nor a
/// `workloadRef` to a Deployment.
pub fn rollout_pods(rollout: &serde_json::Value, name: &str) -> Result<RolloutPods, KubeError> {
    let target = format!("rollout/{name}");
    let spec = rollout.get("spec");
    if let Some(selector) = spec.and_then(|s| s.get("selector")) {
        let selector: LabelSelector =
            serde_json::from_value(selector.clone()).map_err(|e| KubeError::NoSelector {
                target: target.clone(),
                reason: format!("spec.selector does not parse: {e}"),
            })?;
        return Ok(RolloutPods::Selector(selector));
    }
    if let Some(reference) = spec.and_then(|s| s.get("workloadRef")) {
        let kind = reference.get("kind").and_then(|k| k.as_str());
        let ref_name = reference.get("name").and_then(|k| k.as_str());
        if let (Some("Deployment"), Some(ref_name)) = (kind, ref_name) {
            return Ok(RolloutPods::Deployment(ref_name.to_owned()));
        }
    }
    Err(KubeError::NoSelector {
        target,
        reason: "it has neither spec.selector nor a workloadRef to a Deployment".into(),
    })
}

#[cfg(test)]
mod tests {
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
}
