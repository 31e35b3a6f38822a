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
mod tests;
