//! `graft clean`: removes what crashed sessions left behind.
//!
//! A session that ends normally deletes its node-mode agent pod; one that
//! crashed (or was killed) leaves it. Such a pod stops by itself — the agent
//! exits when nobody connects, and `activeDeadlineSeconds` bounds it — but it
//! stays in the namespace, terminated, until deleted. [`plan_clean`] chooses,
//! among the pods [`agent_pods`](crate::agent_pods) finds, those whose agent
//! has terminated (pod phase `Succeeded`/`Failed`, or its agent container
//! terminated); with `force`, running ones too (they may belong to live
//! sessions).
//!
//! Ephemeral containers cannot be removed: Kubernetes keeps them in the pod
//! until the pod is deleted. [`exited_ephemeral_agents`] lists the pods that
//! carry exited graft agents, so `graft clean` can say so; they cost nothing
//! but a line in the pod's status.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::Client;
use kube::api::{Api, ListParams};

use crate::KubeError;
use crate::manifest::{SESSION_LABEL, graft_ephemeral_containers};
use crate::place::{agent_pods, delete_node_agent};
use crate::rbac;

/// A node-mode agent pod and what state it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPod {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The session it served (its `graft.dev/session` label), if labelled.
    pub session: Option<String>,
    /// Its state, for the listing (`Failed: DeadlineExceeded`, `running`).
    pub state: String,
    /// Whether its agent has terminated.
    pub terminated: bool,
}

/// What [`plan_clean`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanPlan {
    /// Pods to delete.
    pub delete: Vec<AgentPod>,
    /// Pods left in place (running agents without `force`, pods already
    /// being deleted).
    pub keep: Vec<AgentPod>,
}

/// Pods that hold exited graft ephemeral containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EphemeralLeftover {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The exited graft agents' container names.
    pub containers: Vec<String>,
}

/// What `graft clean` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanReport {
    /// Pods deleted.
    pub removed: Vec<AgentPod>,
    /// Pods left in place, see [`CleanPlan::keep`].
    pub kept: Vec<AgentPod>,
    /// Pods whose deletion failed, with the error.
    pub failed: Vec<(AgentPod, String)>,
    /// Pods with exited graft ephemeral containers, which cannot be removed.
    pub ephemeral: Vec<EphemeralLeftover>,
}

fn terminated_status(statuses: Option<&Vec<ContainerStatus>>) -> Option<&ContainerStatus> {
    statuses?
        .iter()
        .find(|s| s.state.as_ref().is_some_and(|st| st.terminated.is_some()))
}

/// Reads one agent pod's state.
pub fn agent_pod(pod: &Pod) -> AgentPod {
    let meta = &pod.metadata;
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
    let exited = terminated_status(status.and_then(|s| s.container_statuses.as_ref()));
    let (terminated, state) = if matches!(phase, "Succeeded" | "Failed") {
        let reason = status.and_then(|s| s.reason.as_deref());
        let state = match reason {
            Some(r) => format!("{phase}: {r}"),
            None => phase.to_owned(),
        };
        (true, state)
    } else if let Some(c) = exited {
        let t = c
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .expect("terminated_status only returns terminated containers");
        (
            true,
            format!(
                "agent exited with code {} ({})",
                t.exit_code,
                t.reason.as_deref().unwrap_or("unknown")
            ),
        )
    } else {
        (false, phase.to_lowercase())
    };
    AgentPod {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        session: meta
            .labels
            .as_ref()
            .and_then(|l| l.get(SESSION_LABEL))
            .cloned(),
        state,
        terminated,
    }
}

/// Chooses which agent pods to delete: those whose agent terminated, and
/// with `force` every one; never one already being deleted.
pub fn plan_clean(pods: &[Pod], force: bool) -> CleanPlan {
    let mut plan = CleanPlan::default();
    for pod in pods {
        let mut entry = agent_pod(pod);
        if pod.metadata.deletion_timestamp.is_some() {
            entry.state = format!("{}, already being deleted", entry.state);
            plan.keep.push(entry);
        } else if entry.terminated || force {
            plan.delete.push(entry);
        } else {
            plan.keep.push(entry);
        }
    }
    plan
}

/// The pods among `pods` that hold graft ephemeral agents that have exited.
pub fn exited_ephemeral_agents(pods: &[Pod]) -> Vec<EphemeralLeftover> {
    pods.iter()
        .filter_map(|pod| {
            let graft = graft_ephemeral_containers(pod);
            if graft.is_empty() {
                return None;
            }
            let statuses = pod
                .status
                .as_ref()
                .and_then(|s| s.ephemeral_container_statuses.as_ref());
            let containers: Vec<String> = statuses
                .into_iter()
                .flatten()
                .filter(|s| graft.contains(&s.name.as_str()))
                .filter(|s| s.state.as_ref().is_some_and(|st| st.terminated.is_some()))
                .map(|s| s.name.clone())
                .collect();
            (!containers.is_empty()).then(|| EphemeralLeftover {
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                pod: pod.metadata.name.clone().unwrap_or_default(),
                containers,
            })
        })
        .collect()
}

/// Deletes the agent pods [`plan_clean`] chooses in `namespace` (every
/// namespace with `None`) and lists the pods with exited ephemeral agents.
/// A failed deletion is recorded in [`CleanReport::failed`] and the others
/// go on.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `list pods`, or another API failure
/// listing pods.
pub async fn clean(
    client: &Client,
    namespace: Option<&str>,
    force: bool,
) -> Result<CleanReport, KubeError> {
    let plan = plan_clean(&agent_pods(client, namespace).await?, force);
    let mut report = CleanReport {
        kept: plan.keep,
        ..CleanReport::default()
    };
    for pod in plan.delete {
        match delete_node_agent(client, &pod.namespace, &pod.name).await {
            Ok(()) => report.removed.push(pod),
            Err(e) => {
                let message = e.to_string();
                report.failed.push((pod, message));
            }
        }
    }
    let api: Api<Pod> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let pods = api.list(&ListParams::default()).await.map_err(|e| {
        KubeError::from_api(
            e,
            rbac::LIST_PODS,
            namespace.unwrap_or(crate::error::ALL_NAMESPACES),
            "pod",
            crate::error::ALL_NAMESPACES,
        )
    })?;
    report.ephemeral = exited_ephemeral_agents(&pods.items);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).expect("valid test pod")
    }

    fn agent(name: &str, phase: &str, state: Value) -> Pod {
        pod(json!({
            "metadata": {"name": name, "namespace": "shop",
                         "labels": {"app.kubernetes.io/managed-by": "graft",
                                    "graft.dev/session": name.trim_start_matches("graft-agent-")}},
            "spec": {"containers": [{"name": "agent"}]},
            "status": {"phase": phase, "containerStatuses": [{
                "name": "agent", "ready": false, "restartCount": 0, "image": "a",
                "imageID": "", "state": state}]},
        }))
    }

    fn names(pods: &[AgentPod]) -> Vec<&str> {
        pods.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn terminated_agents_are_deleted_and_running_ones_kept() {
        let pods = [
            agent(
                "graft-agent-a",
                "Succeeded",
                json!({"terminated": {"exitCode": 0}}),
            ),
            agent(
                "graft-agent-b",
                "Failed",
                json!({"terminated": {"exitCode": 1}}),
            ),
            // Phase not updated yet, but the agent has exited.
            agent(
                "graft-agent-c",
                "Running",
                json!({"terminated": {"exitCode": 3, "reason": "Error"}}),
            ),
            agent("graft-agent-d", "Running", json!({"running": {}})),
            agent(
                "graft-agent-e",
                "Pending",
                json!({"waiting": {"reason": "ContainerCreating"}}),
            ),
        ];
        let plan = plan_clean(&pods, false);
        assert_eq!(
            names(&plan.delete),
            ["graft-agent-a", "graft-agent-b", "graft-agent-c"]
        );
        assert_eq!(names(&plan.keep), ["graft-agent-d", "graft-agent-e"]);
        assert_eq!(plan.delete[2].state, "agent exited with code 3 (Error)");
        assert_eq!(plan.delete[0].session.as_deref(), Some("a"));
        assert_eq!(plan.keep[0].state, "running");

        let forced = plan_clean(&pods, true);
        assert_eq!(forced.delete.len(), 5);
        assert!(forced.keep.is_empty());
    }

    #[test]
    fn pods_being_deleted_are_left_alone_even_with_force() {
        let mut p = agent(
            "graft-agent-a",
            "Failed",
            json!({"terminated": {"exitCode": 1}}),
        );
        p.metadata.deletion_timestamp =
            Some(serde_json::from_value(json!("2026-01-01T00:00:00Z")).expect("valid time"));
        let plan = plan_clean(&[p], true);
        assert!(plan.delete.is_empty());
        assert!(plan.keep[0].state.contains("already being deleted"));
    }

    #[test]
    fn pod_level_failure_names_its_reason() {
        let mut p = agent("graft-agent-a", "Failed", json!({"running": {}}));
        p.status.as_mut().unwrap().reason = Some("DeadlineExceeded".into());
        let entry = agent_pod(&p);
        assert!(entry.terminated);
        assert_eq!(entry.state, "Failed: DeadlineExceeded");
    }

    #[test]
    fn only_exited_graft_ephemeral_containers_are_listed() {
        let with = |statuses: Value| {
            pod(json!({
                "metadata": {"name": "api-1", "namespace": "shop"},
                "spec": {"containers": [{"name": "app"}], "ephemeralContainers": [
                    {"name": "graft-agent-aaa"}, {"name": "graft-agent-bbb"},
                    {"name": "debugger-x"}]},
                "status": {"ephemeralContainerStatuses": statuses},
            }))
        };
        let status = |name: &str, state: Value| {
            json!({"name": name, "ready": false, "restartCount": 0, "image": "a",
                   "imageID": "", "state": state})
        };
        let pods = [
            with(json!([
                status("graft-agent-aaa", json!({"terminated": {"exitCode": 0}})),
                status("graft-agent-bbb", json!({"running": {}})),
                status("debugger-x", json!({"terminated": {"exitCode": 0}})),
            ])),
            with(json!([status("graft-agent-bbb", json!({"running": {}}))])),
            pod(json!({"metadata": {"name": "plain"}, "spec": {"containers": [{"name": "a"}]}})),
        ];
        assert_eq!(
            exited_ephemeral_agents(&pods),
            [EphemeralLeftover {
                namespace: "shop".into(),
                pod: "api-1".into(),
                containers: vec!["graft-agent-aaa".into()],
            }]
        );
    }
}
