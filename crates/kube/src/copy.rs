//! `--copy-target`: the session runs against a copy of the target pod that
//! graft creates, instead of the original, and deletes at the end.
//!
//! Data flow: a source (the chosen pod of a workload, or the pod template of
//! a Job or CronJob) and [`CopyOptions`] go into [`copy_pod`], a pure
//! function whose output [`create_copy`] sends; [`wait_copy_running`] waits
//! until the copy's target container runs; the CLI then resolves the copy as
//! `pod/COPY/container/C` and places the agent in it the usual way (an
//! ephemeral container by default: the copy is deleted at the end, so the
//! exited agent container does not pile up on a production pod).
//! [`delete_copy`] removes it on every way out; `graft clean` removes the
//! copies of killed sessions ([`copies`]).
//!
//! # What the copy is
//!
//! - The same pod spec: containers, init containers, volumes, service
//!   account, environment. Cleared: `nodeName` (the scheduler places it),
//!   ephemeral containers, `hostname`, `priority` (admission derives it from
//!   `priorityClassName` again), and every liveness, readiness and startup
//!   probe (as mirrord does: a developer paused on a breakpoint must not get
//!   the copy restarted).
//! - Labels: graft's own ([`COPY_LABEL`], the session, managed-by graft) in
//!   place of the original's, so no Service, ReplicaSet or other selector
//!   picks it. With `keep_labels` the original labels stay (a Service then
//!   sends the copy its share of the traffic), minus the labels controllers
//!   keep for their own bookkeeping ([`CONTROLLER_LABELS`]: `pod-template-hash`,
//!   `controller-uid`, …), which is what keeps a ReplicaSet, StatefulSet or
//!   Job from adopting the copy; DaemonSets and bare ReplicaSets select on
//!   user labels only and would adopt it, so [`check_keep_labels`] refuses
//!   those.
//! - For a Job or CronJob (`replace_command`), the target container runs
//!   [`SLEEP_COMMAND`] instead of the job's command, so the job's work is not
//!   done a second time; its files, environment and network are the job's. The
//!   sleep is run directly (no shell), so it needs a `sleep` program in the
//!   image, which a distroless or `scratch` image lacks: the copy then fails to
//!   start and graft says so ([`KubeError::CopyFailed`]).
//! - `activeDeadlineSeconds`: the agent's deadline (12 h), after which the
//!   kubelet stops a copy that nobody deleted.
//!
//! mirrord's copy target (its paid operator) also copies the pod spec and drops
//! the probes, but keeps the labels and scales down Deployments only.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::wait::await_condition;

use crate::manifest::{MANAGED_BY_LABEL, SESSION_LABEL, SessionId};
use crate::place::FIELD_MANAGER;
use crate::rbac;
use crate::select::describe_container_state;
use crate::{KubeError, WorkloadKind};

/// The label that marks a copy (value `true`).
pub const COPY_LABEL: &str = "graft.dev/copy";

/// The selector that finds every copy graft made.
pub const COPY_SELECTOR: &str = "app.kubernetes.io/managed-by=graft,graft.dev/copy=true";

/// The annotation naming what a copy was made from (`deployment/web`).
pub const COPY_OF_ANNOTATION: &str = "graft.dev/copy-of";

/// What the target container of a Job's copy runs instead of the job: the
/// longest sleep every `sleep` (coreutils, busybox) takes, about 68 years.
pub const SLEEP_COMMAND: [&str; 2] = ["sleep", "2147483647"];

/// Labels that controllers set on their pods for their own bookkeeping; a copy
/// never keeps them (they would make the controller adopt it, or a per-pod
/// Service select it).
pub const CONTROLLER_LABELS: &[&str] = &[
    "pod-template-hash",
    "rollouts-pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "controller-uid",
    "job-name",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
    "batch.kubernetes.io/job-completion-index",
];

/// How long the copy may take to run (the image is usually on the node
/// already: it runs there now).
pub const COPY_START_TIMEOUT: Duration = Duration::from_secs(120);

/// How a copy is made.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// The session the copy belongs to (its name and label).
    pub session: SessionId,
    /// Keep the original's labels (minus [`CONTROLLER_LABELS`]).
    pub keep_labels: bool,
    /// The container whose command is replaced by [`SLEEP_COMMAND`] (Jobs and
    /// CronJobs); `None` leaves every command as it is.
    pub replace_command: Option<String>,
    /// The copy's `activeDeadlineSeconds`.
    pub active_deadline_secs: i64,
}

/// The copy's name: the source's name (cut to fit) + `-graft-` + session, at
/// most 63 characters so it is also a valid host name.
pub fn copy_name(source: &str, session: &SessionId) -> String {
    let suffix = format!("-graft-{session}");
    let room = 63usize.saturating_sub(suffix.len());
    let cut: String = source.chars().take(room).collect();
    let cut = cut.trim_end_matches(['-', '.']);
    format!("{cut}{suffix}")
}

/// Refuses `keep_labels` for a source whose controller selects its pods by
/// user labels alone, and so would adopt the copy (and, being one pod over,
/// delete one): a DaemonSet, or a ReplicaSet without a `pod-template-hash`
/// (one no Deployment made). `owner_kind` is the kind of the source pod's
/// controller, or of the target itself.
///
/// # Errors
///
/// [`KubeError::CopyRefused`] saying why and what to do.
pub fn check_keep_labels(
    owner_kind: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> Result<(), KubeError> {
    let hashed = labels.contains_key("pod-template-hash")
        || labels.contains_key("rollouts-pod-template-hash");
    let adopter = match owner_kind {
        Some("DaemonSet") => Some("DaemonSet"),
        Some("ReplicaSet") if !hashed => Some("ReplicaSet"),
        _ => None,
    };
    match adopter {
        Some(kind) => Err(KubeError::CopyRefused {
            reason: format!(
                "with --copy-keep-labels the copy would carry the labels its {kind} selects, \
                 so the {kind} would adopt it (and delete a pod to keep its count)"
            ),
            fix: "drop --copy-keep-labels (the copy then gets only graft's labels)".into(),
        }),
        None => Ok(()),
    }
}

/// The labels of a copy: graft's, over the original's (minus
/// [`CONTROLLER_LABELS`]) when `keep` is set.
pub fn copy_labels(
    original: Option<&BTreeMap<String, String>>,
    keep: bool,
    session: &SessionId,
) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = match (keep, original) {
        (true, Some(original)) => original
            .iter()
            .filter(|(k, _)| !CONTROLLER_LABELS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        _ => BTreeMap::new(),
    };
    labels.insert(MANAGED_BY_LABEL.0.into(), MANAGED_BY_LABEL.1.into());
    labels.insert(SESSION_LABEL.into(), session.as_str().into());
    labels.insert(COPY_LABEL.into(), "true".into());
    labels
}

fn strip_probes(container: &mut Container) {
    container.liveness_probe = None;
    container.readiness_probe = None;
    container.startup_probe = None;
}

/// Builds the copy of a pod (`source` is its metadata and spec, from a running
/// pod or a Job's template) named [`copy_name`] of `source_name`, in
/// `namespace`; `what` is the target as written (`job/nightly`), kept in an
/// annotation.
///
/// # Errors
///
/// [`KubeError::ContainerNotFound`] when `replace_command` names a container
/// the spec does not have.
pub fn copy_pod(
    source_meta: &ObjectMeta,
    source_spec: &PodSpec,
    source_name: &str,
    namespace: &str,
    what: &str,
    options: &CopyOptions,
) -> Result<Pod, KubeError> {
    let mut spec = source_spec.clone();
    spec.node_name = None;
    spec.ephemeral_containers = None;
    spec.hostname = None;
    spec.priority = None;
    spec.containers.iter_mut().for_each(strip_probes);
    spec.init_containers
        .iter_mut()
        .flatten()
        .for_each(strip_probes);
    if let Some(name) = &options.replace_command {
        let available: Vec<String> = spec.containers.iter().map(|c| c.name.clone()).collect();
        let container = spec
            .containers
            .iter_mut()
            .find(|c| &c.name == name)
            .ok_or_else(|| KubeError::ContainerNotFound {
                pod: source_name.to_owned(),
                container: name.clone(),
                available,
            })?;
        container.command = Some(SLEEP_COMMAND.iter().map(|s| (*s).to_owned()).collect());
        container.args = None;
    }
    spec.active_deadline_seconds = Some(
        spec.active_deadline_seconds
            .map_or(options.active_deadline_secs, |d| {
                d.min(options.active_deadline_secs)
            }),
    );
    let mut annotations = source_meta.annotations.clone().unwrap_or_default();
    annotations.insert(COPY_OF_ANNOTATION.into(), what.to_owned());
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(copy_name(source_name, &options.session)),
            namespace: Some(namespace.to_owned()),
            labels: Some(copy_labels(
                source_meta.labels.as_ref(),
                options.keep_labels,
                &options.session,
            )),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// Whether a copy is made from the workload's pod template with the command
/// replaced (Jobs and CronJobs: their work must not run twice) rather than
/// from its running pod.
pub fn copies_template(kind: WorkloadKind) -> bool {
    matches!(kind, WorkloadKind::Job | WorkloadKind::CronJob)
}

/// Creates the copy; returns its name.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `create pods`;
/// [`KubeError::AdmissionRejected`] when an admission check refuses it;
/// another API failure (a copy of that name exists).
pub async fn create_copy(client: &Client, pod: &Pod) -> Result<String, KubeError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    api.create(&params, pod)
        .await
        .map_err(|e| KubeError::from_api(e, rbac::CREATE_PODS, &namespace, "pod", &name))?;
    Ok(name)
}

/// Where a copy's start stands: `None` while it starts, `Some(Ok)` once the
/// container runs, `Some(Err(reason))` when it cannot.
fn copy_state(pod: Option<&Pod>, container: &str) -> Option<Result<(), String>> {
    let Some(pod) = pod else {
        return Some(Err("the copy was deleted".into()));
    };
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Failed" | "Succeeded")) {
        return Some(Err(format!(
            "the pod is {}{}",
            status.phase.as_deref().unwrap_or_default(),
            status
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        )));
    }
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    });
    if let Some(c) = unschedulable {
        return Some(Err(format!(
            "Unschedulable: {}",
            c.message.as_deref().unwrap_or("no node fits")
        )));
    }
    let cs = status
        .container_statuses
        .iter()
        .flatten()
        .find(|s| s.name == container);
    let state = cs.and_then(|s| s.state.as_ref())?;
    if state.running.is_some() {
        return Some(Ok(()));
    }
    let described = describe_container_state(cs);
    if state.terminated.is_some() {
        return Some(Err(described));
    }
    let fatal = state
        .waiting
        .as_ref()
        .and_then(|w| w.reason.as_deref())
        .is_some_and(|r| {
            matches!(
                r,
                "ErrImagePull"
                    | "ImagePullBackOff"
                    | "InvalidImageName"
                    | "ErrImageNeverPull"
                    | "CreateContainerConfigError"
                    | "CreateContainerError"
                    | "RunContainerError"
                    | "CrashLoopBackOff"
            )
        });
    fatal.then_some(Err(described))
}

/// Waits (at most `timeout`) until `container` of the copy `name` runs.
///
/// # Errors
///
/// [`KubeError::CopyFailed`] when it cannot start (image, scheduling, a
/// `sleep` the image lacks) or does not in time, with the pod's events;
/// [`KubeError::Forbidden`] without `watch pods`.
pub async fn wait_copy_running(
    client: &Client,
    namespace: &str,
    name: &str,
    container: &str,
    timeout: Duration,
) -> Result<(), KubeError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let settled = {
        let container = container.to_owned();
        move |pod: Option<&Pod>| copy_state(pod, &container).is_some()
    };
    let failed = |reason: String| async move {
        let events = crate::events::pod_events(client, namespace, name, None)
            .await
            .unwrap_or_default();
        KubeError::CopyFailed {
            pod: name.to_owned(),
            reason,
            events,
        }
    };
    match tokio::time::timeout(timeout, await_condition(api, name, settled)).await {
        Ok(Ok(pod)) => match copy_state(pod.as_ref(), container) {
            Some(Ok(())) => Ok(()),
            Some(Err(reason)) => Err(failed(reason).await),
            None => Err(failed("it stopped starting".into()).await),
        },
        Ok(Err(kube::runtime::wait::Error::ProbeFailed(e))) => Err(KubeError::from_api(
            match e {
                kube::runtime::watcher::Error::InitialListFailed(e)
                | kube::runtime::watcher::Error::WatchStartFailed(e)
                | kube::runtime::watcher::Error::WatchFailed(e) => e,
                kube::runtime::watcher::Error::WatchError(s) => kube::Error::Api(s),
                other => kube::Error::Service(Box::new(other)),
            },
            rbac::WATCH_PODS,
            namespace,
            "pod",
            name,
        )),
        Err(_elapsed) => Err(failed(format!(
            "container {container} was not running after {} s",
            timeout.as_secs()
        ))
        .await),
    }
}

/// Deletes a copy (one already gone is fine).
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `delete pods`, or another API failure.
pub async fn delete_copy(client: &Client, namespace: &str, name: &str) -> Result<(), KubeError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(KubeError::from_api(
            e,
            rbac::DELETE_PODS,
            namespace,
            "pod",
            name,
        )),
    }
}

/// Every copy graft made in `namespace` (all with `None`), for `graft clean`.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `list pods`, or another API failure.
pub async fn copies(client: &Client, namespace: Option<&str>) -> Result<Vec<Pod>, KubeError> {
    let api: Api<Pod> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let list = api
        .list(&ListParams::default().labels(COPY_SELECTOR))
        .await
        .map_err(|e| {
            KubeError::from_api(
                e,
                rbac::LIST_PODS,
                namespace.unwrap_or(crate::error::ALL_NAMESPACES),
                "pod",
                COPY_SELECTOR,
            )
        })?;
    // The selector asked for them; the label is checked again so nothing but
    // a copy is ever deleted as one.
    Ok(list.items.into_iter().filter(is_copy).collect())
}

/// Whether `pod` is a copy graft made.
pub fn is_copy(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.get(COPY_LABEL).map(String::as_str) == Some("true"))
}

/// Whether a graft agent runs in the copy `pod` (an ephemeral container of
/// graft's, running): then its session may be live.
pub fn copy_has_running_agent(pod: &Pod) -> bool {
    let graft = crate::manifest::graft_ephemeral_containers(pod);
    pod.status
        .as_ref()
        .and_then(|s| s.ephemeral_container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter(|s| graft.contains(&s.name.as_str()))
        .any(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn session() -> SessionId {
        SessionId::new("0123456789").unwrap()
    }

    fn options(replace: Option<&str>, keep: bool) -> CopyOptions {
        CopyOptions {
            session: session(),
            keep_labels: keep,
            replace_command: replace.map(str::to_owned),
            active_deadline_secs: 43_200,
        }
    }

    fn running_pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": "web-7d9c-x2x", "namespace": "shop", "uid": "u1",
                "resourceVersion": "42",
                "labels": {"app": "web", "pod-template-hash": "7d9c"},
                "annotations": {"kubectl.kubernetes.io/default-container": "app"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-7d9c", "uid": "rs", "controller": true}],
            },
            "spec": {
                "nodeName": "node-a", "hostname": "web", "priority": 0,
                "containers": [
                    {"name": "app", "image": "web:1", "command": ["server"],
                     "args": ["--port", "80"],
                     "readinessProbe": {"httpGet": {"port": 80}},
                     "livenessProbe": {"tcpSocket": {"port": 80}}},
                    {"name": "side", "image": "side:1",
                     "startupProbe": {"exec": {"command": ["true"]}}},
                ],
                "initContainers": [{"name": "init", "image": "init:1",
                    "restartPolicy": "Always", "readinessProbe": {"exec": {"command": ["true"]}}}],
                "ephemeralContainers": [{"name": "graft-agent-old", "image": "a"}],
            },
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    fn copy_of(pod: &Pod, options: &CopyOptions) -> Pod {
        copy_pod(
            &pod.metadata,
            pod.spec.as_ref().unwrap(),
            "web-7d9c-x2x",
            "shop",
            "deployment/web",
            options,
        )
        .unwrap()
    }

    #[test]
    fn the_copy_has_the_spec_without_node_probes_or_ephemeral_containers() {
        let copy = copy_of(&running_pod(), &options(None, false));
        let spec = copy.spec.as_ref().unwrap();
        assert_eq!(spec.node_name, None);
        assert_eq!(spec.hostname, None);
        assert_eq!(spec.priority, None);
        assert_eq!(spec.ephemeral_containers, None);
        assert_eq!(spec.active_deadline_seconds, Some(43_200));
        let app = &spec.containers[0];
        assert_eq!(app.image.as_deref(), Some("web:1"));
        assert_eq!(app.command.as_deref().unwrap(), ["server"]);
        assert_eq!(app.args.as_deref().unwrap(), ["--port", "80"]);
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            assert!(c.liveness_probe.is_none() && c.readiness_probe.is_none());
            assert!(c.startup_probe.is_none());
        }
        let meta = &copy.metadata;
        assert_eq!(meta.name.as_deref(), Some("web-7d9c-x2x-graft-0123456789"));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        assert!(meta.owner_references.is_none(), "no controller adopts it");
        assert!(meta.uid.is_none() && meta.resource_version.is_none());
        let annotations = meta.annotations.as_ref().unwrap();
        assert_eq!(annotations[COPY_OF_ANNOTATION], "deployment/web");
        assert_eq!(
            annotations["kubectl.kubernetes.io/default-container"],
            "app"
        );
        assert!(copy.status.is_none());
    }

    #[test]
    fn no_selector_picks_the_copy_unless_its_labels_are_kept() {
        let pod = running_pod();
        let copy = copy_of(&pod, &options(None, false));
        let labels = copy.metadata.labels.unwrap();
        assert!(!labels.contains_key("app"), "a Service would select it");
        assert_eq!(labels[COPY_LABEL], "true");
        assert_eq!(labels[SESSION_LABEL], "0123456789");
        assert_eq!(labels[MANAGED_BY_LABEL.0], MANAGED_BY_LABEL.1);
        assert!(is_copy(&Pod {
            metadata: ObjectMeta {
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }));

        let kept = copy_of(&pod, &options(None, true)).metadata.labels.unwrap();
        assert_eq!(kept["app"], "web", "the Service selects it");
        assert!(
            !kept.contains_key("pod-template-hash"),
            "its ReplicaSet would adopt it"
        );
        assert_eq!(kept[COPY_LABEL], "true");
    }

    #[test]
    fn a_job_copy_sleeps_instead_of_running_the_job() {
        let template: k8s_openapi::api::core::v1::PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"batch.kubernetes.io/controller-uid": "u", "job-name": "nightly",
                                    "controller-uid": "u", "app": "nightly"}},
            "spec": {"restartPolicy": "Never", "activeDeadlineSeconds": 600, "containers": [
                {"name": "main", "image": "job:1", "command": ["migrate"], "args": ["--all"]},
                {"name": "side", "image": "side:1", "command": ["proxy"]},
            ]},
        }))
        .unwrap();
        let meta = template.metadata.clone().unwrap();
        let copy = copy_pod(
            &meta,
            template.spec.as_ref().unwrap(),
            "nightly",
            "shop",
            "job/nightly",
            &options(Some("main"), true),
        )
        .unwrap();
        let spec = copy.spec.unwrap();
        assert_eq!(
            spec.containers[0].command.as_deref().unwrap(),
            SLEEP_COMMAND
        );
        assert_eq!(spec.containers[0].args, None);
        assert_eq!(spec.containers[1].command.as_deref().unwrap(), ["proxy"]);
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.active_deadline_seconds, Some(600), "the shorter one");
        let labels = copy.metadata.labels.unwrap();
        for key in [
            "job-name",
            "controller-uid",
            "batch.kubernetes.io/controller-uid",
        ] {
            assert!(!labels.contains_key(key), "the Job would adopt it: {key}");
        }
        assert_eq!(labels["app"], "nightly");
        let err = copy_pod(
            &meta,
            template.spec.as_ref().unwrap(),
            "nightly",
            "shop",
            "job/nightly",
            &options(Some("nope"), false),
        )
        .unwrap_err();
        assert!(matches!(err, KubeError::ContainerNotFound { .. }), "{err}");
    }

    #[test]
    fn copy_names_fit_in_a_host_name() {
        assert_eq!(copy_name("web", &session()), "web-graft-0123456789");
        let long = copy_name(&format!("{}-x", "a".repeat(45)), &session());
        assert!(long.len() <= 63, "{long}");
        assert!(!long.contains("--"), "{long}");
        let long = copy_name(&"b".repeat(200), &session());
        assert_eq!(long.len(), 63);
    }

    #[test]
    fn keeping_labels_is_refused_where_the_controller_would_adopt_the_copy() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let plain = labels(&[("app", "web")]);
        let hashed = labels(&[("app", "web"), ("pod-template-hash", "7d9c")]);
        assert!(check_keep_labels(Some("DaemonSet"), &hashed).is_err());
        assert!(check_keep_labels(Some("ReplicaSet"), &plain).is_err());
        assert!(check_keep_labels(Some("ReplicaSet"), &hashed).is_ok());
        assert!(check_keep_labels(Some("StatefulSet"), &plain).is_ok());
        assert!(check_keep_labels(Some("Job"), &plain).is_ok());
        assert!(check_keep_labels(None, &plain).is_ok());
        let e = check_keep_labels(Some("DaemonSet"), &plain).unwrap_err();
        assert!(e.to_string().contains("drop --copy-keep-labels"), "{e}");
    }

    #[test]
    fn the_copy_is_ready_when_its_container_runs_and_failed_when_it_cannot() {
        let pod = |state: serde_json::Value| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "c"},
                "status": {"phase": "Pending", "containerStatuses": [{
                    "name": "app", "ready": false, "restartCount": 0, "image": "a",
                    "imageID": "", "state": state}]},
            }))
            .unwrap()
        };
        assert_eq!(
            copy_state(
                Some(&pod(json!({"waiting": {"reason": "ContainerCreating"}}))),
                "app"
            ),
            None
        );
        assert_eq!(
            copy_state(Some(&pod(json!({"running": {}}))), "app"),
            Some(Ok(()))
        );
        let no_sleep = copy_state(
            Some(&pod(json!({"waiting": {"reason": "RunContainerError",
                "message": "exec: \"sleep\": executable file not found in $PATH"}}))),
            "app",
        );
        assert!(
            matches!(&no_sleep, Some(Err(m)) if m.contains("sleep")),
            "{no_sleep:?}"
        );
        assert!(matches!(copy_state(None, "app"), Some(Err(_))));
    }
}
