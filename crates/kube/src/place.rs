//! Placing the agent and reaching it: add the ephemeral container (or start
//! the node-mode agent's Job, [`crate::job`]), wait until the agent says `ready`, open a port-forward
//! to it, and delete what graft created.
//!
//! Data flow: a [`ResolvedTarget`] and [`AgentOptions`] go in; an
//! [`AgentPlacement`] (where the agent runs and which pod to port-forward to)
//! comes out of [`add_ephemeral_agent`] / [`create_node_agent`];
//! [`wait_for_agent`] turns it into the agent's port, watching the pod with
//! kube-runtime's `await_condition` and then reading the agent's `ready`
//! line from its log; [`port_forward`] gives the byte stream the proxy's
//! session runs over.
//!
//! The agent's start is a small state machine, [`AgentState`], computed from
//! the pod's status by a pure function so every transition is unit-tested.

use std::time::{Duration, Instant};

use futures::{AsyncBufReadExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::KubeError;
use crate::events::pod_events;
use crate::manifest::{AGENT_POD_SELECTOR, AgentOptions, ephemeral_agent, node_agent_job};
use crate::rbac::{self, Permission};
use crate::select::{ResolvedTarget, describe_container_state};

/// The field manager graft writes with (server-side bookkeeping and audit).
pub const FIELD_MANAGER: &str = "graft";

/// How the agent is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentMode {
    /// An ephemeral container in the target pod.
    Ephemeral,
    /// A pod of its own on the target's node.
    Node,
}

/// Where an agent was placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPlacement {
    /// How.
    pub mode: AgentMode,
    /// The namespace of [`AgentPlacement::agent_pod`].
    pub namespace: String,
    /// The pod that holds the agent's container: the target pod in ephemeral
    /// mode, the agent's own pod in node mode.
    pub agent_pod: String,
    /// The agent container's name.
    pub agent_container: String,
    /// The namespace of the pod to port-forward to.
    pub target_namespace: String,
    /// The pod to port-forward to: always the target pod, because the agent
    /// listens on the loopback of the target's network namespace.
    pub port_forward_pod: String,
    /// The Job that runs [`AgentPlacement::agent_pod`] (node mode and
    /// targetless), in [`AgentPlacement::namespace`]: what to delete at the
    /// end ([`crate::job::delete_agent_job`]).
    pub job: Option<String>,
}

/// Where the agent's start stands, as read from its pod. Transitions:
/// `Starting` → `Running` → (the `ready` line) ready; `Starting` or
/// `Running` → `Failed` on an image, config or scheduling error or when the
/// container exits. `Failed` is final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentState {
    /// Not running yet; the text says what it waits for (`ContainerCreating`,
    /// `pulling image`, `no status yet`).
    Starting(String),
    /// The container runs; graft now waits for its `ready` line.
    Running,
    /// It cannot start, or it exited; the text is reason and message.
    Failed(String),
}

/// Waiting reasons from which a container does not recover by itself.
const FATAL_WAITING: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "CrashLoopBackOff",
];

/// Reads the agent's state from its pod (`None`: the pod is gone).
pub fn agent_state(pod: Option<&Pod>, placement: &AgentPlacement) -> AgentState {
    let Some(pod) = pod else {
        return AgentState::Failed(format!("pod {} was deleted", placement.agent_pod));
    };
    if let Some(failed) = pod_level_failure(pod) {
        return AgentState::Failed(failed);
    }
    let status = agent_status(pod, placement);
    let Some(state) = status.and_then(|s| s.state.as_ref()) else {
        return AgentState::Starting(describe_container_state(status));
    };
    if state.running.is_some() {
        return AgentState::Running;
    }
    if let Some(t) = &state.terminated {
        let mut text = format!(
            "exited with code {} ({})",
            t.exit_code,
            t.reason.as_deref().unwrap_or("unknown")
        );
        if let Some(m) = t
            .message
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty())
        {
            text.push_str(&format!(": {m}"));
        }
        return AgentState::Failed(text);
    }
    if let Some(w) = &state.waiting {
        let reason = w.reason.as_deref().unwrap_or("waiting");
        let text = match w.message.as_deref().filter(|m| !m.is_empty()) {
            Some(m) => format!("{reason}: {m}"),
            None => reason.to_owned(),
        };
        if FATAL_WAITING.contains(&reason) {
            return AgentState::Failed(text);
        }
        return AgentState::Starting(text);
    }
    AgentState::Starting("unknown".into())
}

/// Failures of the pod itself (node mode): unschedulable, evicted, past its
/// deadline.
fn pod_level_failure(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() == Some("Failed") {
        return Some(format!(
            "{}: {}",
            status.reason.as_deref().unwrap_or("Failed"),
            status.message.as_deref().unwrap_or("the pod failed")
        ));
    }
    status
        .conditions
        .iter()
        .flatten()
        .find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })
        .map(|c| {
            format!(
                "Unschedulable: {}",
                c.message.as_deref().unwrap_or("no node fits")
            )
        })
}

fn agent_status<'a>(pod: &'a Pod, placement: &AgentPlacement) -> Option<&'a ContainerStatus> {
    let status = pod.status.as_ref()?;
    let statuses = match placement.mode {
        AgentMode::Ephemeral => status.ephemeral_container_statuses.as_ref(),
        AgentMode::Node => status.container_statuses.as_ref(),
    };
    statuses?
        .iter()
        .find(|s| s.name == placement.agent_container)
}

/// Parses the agent's `ready tcp:127.0.0.1:PORT` line into the port.
pub fn parse_ready_line(line: &str) -> Option<u16> {
    let address = line.trim().strip_prefix("ready tcp:")?;
    let address: std::net::SocketAddr = address.parse().ok()?;
    address.ip().is_loopback().then_some(address.port())
}

/// The strategic-merge patch of `pods/ephemeralcontainers` that adds the
/// agent: the container, and the pod's UID as a precondition. Shared by
/// [`add_ephemeral_agent`] and `graft doctor`'s dry run.
pub(crate) fn ephemeral_agent_patch(
    target: &ResolvedTarget,
    options: &AgentOptions,
) -> serde_json::Value {
    serde_json::json!({
        "metadata": { "uid": target.pod_uid },
        "spec": { "ephemeralContainers": [ephemeral_agent(target, options)] },
    })
}

/// Adds the agent to the target pod as an ephemeral container, through the
/// `pods/ephemeralcontainers` subresource (GA since Kubernetes 1.25) with a
/// strategic-merge patch, which appends to `spec.ephemeralContainers` (merge
/// key `name`). The patch carries the pod's UID, so a pod re-created under
/// the same name since resolution is refused instead of patched.
///
/// Returns without waiting; call [`wait_for_agent`] next.
///
/// # Errors
///
/// [`KubeError::SharedProcessNamespace`] for pods where PID 1 is not the
/// target; [`KubeError::EphemeralContainersUnsupported`] on clusters without
/// the subresource; [`KubeError::Forbidden`] without `patch
/// pods/ephemeralcontainers`; [`KubeError::AdmissionRejected`] when Pod
/// Security refuses the agent's capabilities; [`KubeError::NotFound`] when
/// the pod is gone; [`KubeError::PodReplaced`] when it was re-created.
pub async fn add_ephemeral_agent(
    client: &Client,
    target: &ResolvedTarget,
    options: &AgentOptions,
) -> Result<AgentPlacement, KubeError> {
    if target.shares_process_namespace {
        return Err(KubeError::SharedProcessNamespace {
            pod: target.pod.clone(),
        });
    }
    let patch = ephemeral_agent_patch(target, options);
    let api: Api<Pod> = Api::namespaced(client.clone(), &target.namespace);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    api.patch_subresource(
        "ephemeralcontainers",
        &target.pod,
        &params,
        &Patch::Strategic(patch),
    )
    .await
    .map_err(|e| {
        if is_missing_subresource(&e) {
            return KubeError::EphemeralContainersUnsupported;
        }
        // The UID in the patch is a precondition: 409 when it no longer matches.
        if matches!(&e, kube::Error::Api(s) if s.code == 409) {
            return KubeError::PodReplaced {
                pod: target.pod.clone(),
            };
        }
        KubeError::from_api(
            e,
            rbac::PATCH_EPHEMERAL_CONTAINERS,
            &target.namespace,
            "pod",
            &target.pod,
        )
    })?;
    Ok(AgentPlacement {
        mode: AgentMode::Ephemeral,
        namespace: target.namespace.clone(),
        agent_pod: target.pod.clone(),
        agent_container: options.session.agent_name(),
        target_namespace: target.namespace.clone(),
        port_forward_pod: target.pod.clone(),
        job: None,
    })
}

/// A 404 for the subresource path itself (rather than for the pod) means the
/// API server does not serve it.
pub(crate) fn is_missing_subresource(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404
        && s.details.as_ref().is_none_or(|d| d.name.is_empty()))
}

/// Starts the node-mode agent in `namespace` (which must admit privileged
/// pods), on the target's node: a Job of one pod that the cluster deletes
/// when the agent exits ([`crate::manifest::node_agent_job`]). Returns once
/// the Job's pod exists.
///
/// # Errors
///
/// As [`crate::job::start_agent_job`]: [`KubeError::Forbidden`] without
/// `create jobs`; [`KubeError::AdmissionRejected`] when Pod Security refuses
/// `hostPID` or the capabilities; another API failure (e.g. a Job of that
/// name exists).
pub async fn create_node_agent(
    client: &Client,
    target: &ResolvedTarget,
    options: &AgentOptions,
    namespace: &str,
) -> Result<AgentPlacement, KubeError> {
    let job = node_agent_job(target, options, namespace);
    create_agent_job(client, &job, options, namespace, Some(target)).await
}

/// Creates `job` (an agent Job of graft's own) in `namespace` and finds its
/// pod. Its agent listens in the network of `serving`'s pod, the one to
/// port-forward to, or, when `None`, in its own pod's.
async fn create_agent_job(
    client: &Client,
    job: &Job,
    options: &AgentOptions,
    namespace: &str,
    serving: Option<&ResolvedTarget>,
) -> Result<AgentPlacement, KubeError> {
    let name = options.session.agent_name();
    let pod = crate::job::start_agent_job(client, job, namespace).await?;
    let (target_namespace, port_forward_pod) = match serving {
        Some(target) => (target.namespace.clone(), target.pod.clone()),
        None => (namespace.to_owned(), pod.clone()),
    };
    Ok(AgentPlacement {
        mode: AgentMode::Node,
        namespace: namespace.to_owned(),
        agent_pod: pod,
        agent_container: "agent".into(),
        target_namespace,
        port_forward_pod,
        job: Some(name),
    })
}

/// Starts the agent of a `targetless` session in `namespace`
/// ([`crate::manifest::targetless_agent_job`]); it is deleted like a
/// node-mode agent, with [`crate::job::delete_agent_job`].
///
/// # Errors
///
/// As [`create_node_agent`].
pub async fn create_targetless_agent(
    client: &Client,
    options: &AgentOptions,
    namespace: &str,
) -> Result<AgentPlacement, KubeError> {
    let job = crate::manifest::targetless_agent_job(options, namespace);
    create_agent_job(client, &job, options, namespace, None).await
}

/// Deletes an agent pod (one that no Job owns, as graft made them before it
/// used Jobs: `graft clean`); a pod already gone is fine. The agent gets
/// SIGTERM and removes its packet rules.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `delete pods`, or another API failure.
pub async fn delete_node_agent(
    client: &Client,
    namespace: &str,
    pod: &str,
) -> Result<(), KubeError> {
    delete_agent_object::<Pod>(
        client,
        namespace,
        pod,
        &DeleteParams::default(),
        rbac::DELETE_PODS,
        "pod",
    )
    .await
}

/// The node-mode agent pods graft left in `namespace` (all namespaces with
/// `None`), for `graft clean`; the caller keeps those of live sessions.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `list pods`, or another API failure.
pub async fn agent_pods(client: &Client, namespace: Option<&str>) -> Result<Vec<Pod>, KubeError> {
    list_agent_objects(client, namespace, rbac::LIST_PODS, "pod").await
}

/// Deletes the `K` named `name` (an agent pod or Job); one already gone is
/// fine. `permission` names the verb a refusal lacks, `kind` the object
/// (`pod`, `job`) in its message.
pub(crate) async fn delete_agent_object<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    params: &DeleteParams,
    permission: Permission,
    kind: &str,
) -> Result<(), KubeError>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(KubeError::from_api(e, permission, namespace, kind, name)),
    }
}

/// The `K`s (agent pods or Jobs) carrying graft's agent label in `namespace`
/// (all namespaces with `None`). `permission` names the verb a refusal lacks,
/// `kind` the object (`pod`, `job`) in its message.
pub(crate) async fn list_agent_objects<K>(
    client: &Client,
    namespace: Option<&str>,
    permission: Permission,
    kind: &str,
) -> Result<Vec<K>, KubeError>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let list = api
        .list(&ListParams::default().labels(AGENT_POD_SELECTOR))
        .await
        .map_err(|e| {
            KubeError::from_api(
                e,
                permission,
                namespace.unwrap_or(crate::error::ALL_NAMESPACES),
                kind,
                AGENT_POD_SELECTOR,
            )
        })?;
    Ok(list.items)
}

/// The agent once it is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReady {
    /// The port it listens on, on the loopback of the target pod's network
    /// namespace: port-forward to [`AgentPlacement::port_forward_pod`] at it.
    pub port: u16,
    /// The fingerprint of the agent's link certificate, as its
    /// `link-cert sha256:HEX` line before `ready` said it (the text after
    /// `link-cert `); `None` from an agent that printed none (a release whose
    /// link was not encrypted).
    pub link_cert: Option<String>,
}

/// Waits until the agent runs and has printed its `ready` line, at most
/// `timeout`. Watches the pod (kube-runtime's `await_condition`) until the
/// agent's container runs or fails, then follows its log for the line.
///
/// # Errors
///
/// [`KubeError::AgentFailed`] with the container's reason and the pod's
/// events (ImagePullBackOff, admission, unschedulable, the agent exiting);
/// [`KubeError::AgentTimeout`] with the last state and events;
/// [`KubeError::Forbidden`] without `watch pods` or `get pods/log`.
///
/// # Cancel safety
///
/// Dropping the future stops waiting; the agent keeps starting and exits by
/// itself when nobody connects within its connect timeout.
pub async fn wait_for_agent(
    client: &Client,
    placement: &AgentPlacement,
    timeout: Duration,
) -> Result<AgentReady, KubeError> {
    let started = Instant::now();
    let api: Api<Pod> = Api::namespaced(client.clone(), &placement.namespace);
    let settled = {
        let placement = placement.clone();
        move |pod: Option<&Pod>| !matches!(agent_state(pod, &placement), AgentState::Starting(_))
    };
    let watched = tokio::time::timeout(
        timeout,
        await_condition(api.clone(), &placement.agent_pod, settled),
    )
    .await;
    let pod = match watched {
        Ok(Ok(pod)) => pod,
        Ok(Err(e)) => return Err(watch_error(e, placement)),
        Err(_elapsed) => return Err(timeout_error(client, &api, placement, timeout).await),
    };
    if let AgentState::Failed(reason) = agent_state(pod.as_ref(), placement) {
        let reason = with_log_tail(&api, placement, reason).await;
        return Err(failed_error(client, placement, reason).await);
    }

    let remaining = timeout.saturating_sub(started.elapsed());
    match tokio::time::timeout(remaining, read_ready_line(&api, placement)).await {
        Ok(Ok(Some(ready))) => Ok(ready),
        Ok(Ok(None)) => {
            // The log ended without the line: the agent exited. Its state
            // says how.
            let pod = api.get_opt(&placement.agent_pod).await.ok().flatten();
            let reason = match agent_state(pod.as_ref(), placement) {
                AgentState::Failed(reason) => reason,
                _ => "its log ended before it printed its ready line".into(),
            };
            let reason = with_log_tail(&api, placement, reason).await;
            Err(failed_error(client, placement, reason).await)
        }
        Ok(Err(e)) => Err(e),
        Err(_elapsed) => Err(timeout_error(client, &api, placement, timeout).await),
    }
}

async fn read_ready_line(
    api: &Api<Pod>,
    placement: &AgentPlacement,
) -> Result<Option<AgentReady>, KubeError> {
    let params = LogParams {
        container: Some(placement.agent_container.clone()),
        follow: true,
        ..LogParams::default()
    };
    let log = api
        .log_stream(&placement.agent_pod, &params)
        .await
        .map_err(|e| {
            KubeError::from_api(
                e,
                rbac::GET_POD_LOGS,
                &placement.namespace,
                "pod",
                &placement.agent_pod,
            )
        })?;
    let mut lines = std::pin::pin!(log.lines());
    let mut link_cert = None;
    // The agent writes logs to stderr and its ready line to stdout; the
    // container log interleaves both.
    while let Some(line) = lines.try_next().await.map_err(|e| KubeError::Api {
        action: format!("reading the log of {}", placement.agent_pod),
        error: Box::new(kube::Error::ReadEvents(e)),
    })? {
        // Only what the agent printed before its first `ready` counts: it
        // writes both lines before it reads anything from anyone.
        if let Some(cert) = line.trim().strip_prefix("link-cert ") {
            link_cert.get_or_insert_with(|| cert.to_owned());
        } else if let Some(port) = parse_ready_line(&line) {
            return Ok(Some(AgentReady { port, link_cert }));
        }
    }
    Ok(None)
}

fn watch_error(e: kube::runtime::wait::Error, placement: &AgentPlacement) -> KubeError {
    use kube::runtime::watcher::Error as W;
    let kube::runtime::wait::Error::ProbeFailed(e) = e;
    let source = match e {
        W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => e,
        W::WatchError(status) => kube::Error::Api(status),
        other => {
            return KubeError::Api {
                action: format!("watching pod {}", placement.agent_pod),
                error: Box::new(kube::Error::Service(Box::new(other))),
            };
        }
    };
    KubeError::from_api(
        source,
        rbac::WATCH_PODS,
        &placement.namespace,
        "pod",
        &placement.agent_pod,
    )
}

async fn events_of(client: &Client, placement: &AgentPlacement) -> Vec<String> {
    // Events only decorate the error; without `list events` there are none.
    pod_events(
        client,
        &placement.namespace,
        &placement.agent_pod,
        Some(&placement.agent_container),
    )
    .await
    .unwrap_or_default()
}

/// How many of an exited agent's last log lines its failure quotes.
const LOG_TAIL: i64 = 6;

/// `reason` with the last [`LOG_TAIL`] lines of the agent's log, when it has
/// any: an agent that exits before its ready line says why there (a signal,
/// its target gone, a refused namespace), and a pod that is gone or a log
/// graft may not read adds nothing.
async fn with_log_tail(api: &Api<Pod>, placement: &AgentPlacement, reason: String) -> String {
    let params = LogParams {
        container: Some(placement.agent_container.clone()),
        tail_lines: Some(LOG_TAIL),
        ..LogParams::default()
    };
    let tail = api
        .logs(&placement.agent_pod, &params)
        .await
        .ok()
        .map(|log| {
            log.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .filter(|tail| !tail.is_empty());
    match tail {
        Some(tail) => format!("{reason}; its log ends: {tail}"),
        None => reason,
    }
}

async fn failed_error(client: &Client, placement: &AgentPlacement, reason: String) -> KubeError {
    KubeError::AgentFailed {
        pod: placement.agent_pod.clone(),
        reason,
        events: events_of(client, placement).await,
    }
}

async fn timeout_error(
    client: &Client,
    api: &Api<Pod>,
    placement: &AgentPlacement,
    timeout: Duration,
) -> KubeError {
    let pod = api.get_opt(&placement.agent_pod).await.ok().flatten();
    let state = match agent_state(pod.as_ref(), placement) {
        AgentState::Starting(s) | AgentState::Failed(s) => s,
        AgentState::Running => "running, but no ready line".into(),
    };
    KubeError::AgentTimeout {
        pod: placement.agent_pod.clone(),
        waited_secs: timeout.as_secs(),
        state,
        events: events_of(client, placement).await,
    }
}

/// An open port-forward to the agent.
pub struct PortForward {
    /// The byte stream to the agent: give it to the proxy's session.
    pub stream: Box<dyn AgentStream>,
    /// The port-forward itself: `join` it to learn when it ends, or `abort`
    /// it.
    pub forwarder: kube::api::Portforwarder,
}

impl std::fmt::Debug for PortForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortForward").finish_non_exhaustive()
    }
}

/// A bidirectional byte stream to the agent.
pub trait AgentStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AgentStream for T {}

/// Which port-forward permission a `403` was about: the API server's message
/// names the verb (`cannot create resource "pods/portforward"`).
fn portforward_permission(message: &str) -> Permission {
    if message.contains("cannot create") {
        rbac::CREATE_PORTFORWARD
    } else {
        rbac::GET_PORTFORWARD
    }
}

/// Opens a port-forward (kube's WebSocket port-forward through the API
/// server) to `port` of the placement's port-forward pod.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `get`/`create pods/portforward`, or
/// another API failure.
pub async fn port_forward(
    client: &Client,
    placement: &AgentPlacement,
    port: u16,
) -> Result<PortForward, KubeError> {
    let namespace = &placement.target_namespace;
    let pod = &placement.port_forward_pod;
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut forwarder = api.portforward(pod, &[port]).await.map_err(|e| {
        let permission = match &e {
            kube::Error::Api(s) => portforward_permission(&s.message),
            _ => rbac::GET_PORTFORWARD,
        };
        KubeError::from_api(e, permission, namespace, "pod", pod)
    })?;
    let stream = forwarder
        .take_stream(port)
        // `portforward` was asked for exactly this port, so its stream is there.
        .expect("the port-forward has a stream for the port it was opened for");
    Ok(PortForward {
        stream: Box::new(stream),
        forwarder,
    })
}

#[cfg(test)]
mod tests;
