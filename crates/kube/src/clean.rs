//! `graft clean`: removes what crashed sessions left behind.
//!
//! A session that ends normally deletes its node-mode agent's Job; one that
//! crashed (or was killed) leaves it, and its agent exits by itself once
//! nobody re-attaches. The cluster then deletes the Job and its pod
//! (`ttlSecondsAfterFinished: 0`, see [`crate::manifest`]), so there is
//! usually nothing left; where the TTL controller is off, or for the bare
//! agent pods of graft versions before agent Jobs, [`plan_clean`] chooses,
//! among the Jobs [`agent_jobs`](crate::job::agent_jobs) and the pods
//! [`agent_pods`](crate::agent_pods) find, those whose agent has terminated
//! (a Job `Complete`/`Failed`, pod phase `Succeeded`/`Failed`, or its agent
//! container terminated); with `force`, running ones too (they may belong
//! to live sessions). A pod a Job owns goes with its Job. The Services of
//! `graft expose` ([`crate::expose`]) go with their agent's Job too (an owner
//! reference); those whose session has no running agent left (every one with
//! `force`) are deleted here as well, and a Service without graft's expose
//! labels never is.
//!
//! The copies of `--copy-target` sessions that were killed, and the workloads
//! their `--scale-down` left at 0, are [`crate::clean_copy`]'s.
//!
//! Ephemeral containers cannot be removed: Kubernetes keeps them in the pod
//! until the pod is deleted. [`exited_ephemeral_agents`] lists the pods that
//! carry exited graft agents, so `graft clean` can say so; they cost nothing
//! but a line in the pod's status.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::Client;
use kube::api::{Api, ListParams};

use crate::KubeError;
use crate::job::{agent_jobs, delete_agent_job, job_finished};
use crate::manifest::{SESSION_LABEL, graft_ephemeral_containers};
use crate::place::{agent_pods, delete_node_agent};
use crate::rbac;

/// A node-mode agent (its Job, or a pod no Job owns) and what state it is
/// in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPod {
    /// `job`, `pod` or `service` (of `graft expose`), `copy` (of
    /// `--copy-target`) or `scale-down` (a workload to restore): what is
    /// deleted or restored.
    pub kind: &'static str,
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
        kind: "pod",
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

/// Reads one agent Job's state: finished by its conditions, or by the state
/// of its pod among `pods`.
pub fn agent_job(job: &Job, pods: &[Pod]) -> AgentPod {
    let meta = &job.metadata;
    let owned: Vec<AgentPod> = pods
        .iter()
        .filter(|p| owner_job(p).is_some_and(|uid| Some(uid) == meta.uid.as_deref()))
        .map(agent_pod)
        .collect();
    let (terminated, state) = match job_finished(job) {
        Some(state) => (true, state),
        None => match owned.first() {
            Some(pod) => (pod.terminated, pod.state.clone()),
            None => (false, "no pod yet".to_owned()),
        },
    };
    AgentPod {
        kind: "job",
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

/// The UID of the Job that owns `pod`, if one does.
fn owner_job(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.kind == "Job")
        .map(|o| o.uid.as_str())
}

/// Chooses which agent Jobs and pods to delete: those whose agent
/// terminated, and with `force` every one; never one already being deleted,
/// nor a pod that a Job owns (it goes with the Job).
pub fn plan_clean(jobs: &[Job], pods: &[Pod], force: bool) -> CleanPlan {
    let mut plan = CleanPlan::default();
    let jobs = jobs.iter().map(|job| {
        (
            agent_job(job, pods),
            job.metadata.deletion_timestamp.is_some(),
        )
    });
    let pods = pods
        .iter()
        .filter(|pod| owner_job(pod).is_none() && !crate::copy::is_copy(pod))
        .map(|pod| (agent_pod(pod), pod.metadata.deletion_timestamp.is_some()));
    for (mut entry, deleting) in jobs.chain(pods) {
        if deleting {
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

/// Deletes the agent Jobs and pods [`plan_clean`] chooses in `namespace`
/// (every namespace with `None`) and lists the pods with exited ephemeral
/// agents. A failed deletion is recorded in [`CleanReport::failed`] and the
/// others go on.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `list jobs` or `list pods`, or another
/// API failure listing them.
pub async fn clean(
    client: &Client,
    namespace: Option<&str>,
    force: bool,
) -> Result<CleanReport, KubeError> {
    clean_or_plan(client, namespace, force, false).await
}

/// What [`clean`] would do, deleting nothing (`graft clean --dry-run`): the
/// report's [`CleanReport::removed`] holds what it would delete, `failed` stays
/// empty.
///
/// # Errors
///
/// As [`clean`]: it lists the same objects.
pub async fn dry_run(
    client: &Client,
    namespace: Option<&str>,
    force: bool,
) -> Result<CleanReport, KubeError> {
    clean_or_plan(client, namespace, force, true).await
}

async fn clean_or_plan(
    client: &Client,
    namespace: Option<&str>,
    force: bool,
    dry_run: bool,
) -> Result<CleanReport, KubeError> {
    let jobs = agent_jobs(client, namespace).await?;
    let plan = plan_clean(&jobs, &agent_pods(client, namespace).await?, force);
    let mut report = CleanReport {
        kept: plan.keep,
        ..CleanReport::default()
    };
    let delete = if dry_run {
        report.removed = plan.delete;
        Vec::new()
    } else {
        plan.delete
    };
    // Services first: deleting their agent's Job lets the garbage collector
    // take them at any moment, and a Service taken that way would go unnamed.
    clean_services(client, namespace, force, dry_run, &mut report).await?;
    for pod in delete {
        let deleted = match pod.kind {
            "job" => delete_agent_job(client, &pod.namespace, &pod.name).await,
            _ => delete_node_agent(client, &pod.namespace, &pod.name).await,
        };
        match deleted {
            Ok(()) => report.removed.push(pod),
            Err(e) => {
                let message = e.to_string();
                report.failed.push((pod, message));
            }
        }
    }
    crate::clean_copy::clean_copies(client, namespace, force, dry_run, &mut report).await?;
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

/// Deletes the Services of `graft expose` whose session has no agent left
/// running (every one with `force`). They normally go with their agent's Job
/// (an owner reference); this covers a Job deleted with orphaning, or a
/// cluster whose garbage collector lags.
async fn clean_services(
    client: &Client,
    namespace: Option<&str>,
    force: bool,
    dry_run: bool,
    report: &mut CleanReport,
) -> Result<(), KubeError> {
    let live: Vec<String> = report
        .kept
        .iter()
        .filter_map(|kept| kept.session.clone())
        .collect();
    for service in crate::expose::expose_services(client, namespace).await? {
        // Never a Service that is not labelled as graft expose's.
        let Some(session) = crate::expose::graft_session(&service).map(str::to_owned) else {
            continue;
        };
        let entry = AgentPod {
            kind: "service",
            namespace: service.metadata.namespace.clone().unwrap_or_default(),
            name: service.metadata.name.clone().unwrap_or_default(),
            session: Some(session.clone()),
            state: "graft expose".into(),
            terminated: false,
        };
        if service.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if !force && live.contains(&session) {
            report.kept.push(entry);
            continue;
        }
        if dry_run {
            report.removed.push(entry);
            continue;
        }
        match crate::expose::delete_service(client, &entry.namespace, &entry.name).await {
            Ok(()) => report.removed.push(entry),
            Err(e) => {
                let message = e.to_string();
                report.failed.push((entry, message));
            }
        }
    }
    Ok(())
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
        let plan = plan_clean(&[], &pods, false);
        assert_eq!(
            names(&plan.delete),
            ["graft-agent-a", "graft-agent-b", "graft-agent-c"]
        );
        assert_eq!(names(&plan.keep), ["graft-agent-d", "graft-agent-e"]);
        assert_eq!(plan.delete[2].state, "agent exited with code 3 (Error)");
        assert_eq!(plan.delete[0].session.as_deref(), Some("a"));
        assert_eq!(plan.keep[0].state, "running");

        let forced = plan_clean(&[], &pods, true);
        assert_eq!(forced.delete.len(), 5);
        assert!(forced.keep.is_empty());
    }

    fn job(name: &str, uid: &str, conditions: Value) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "uid": uid,
                         "labels": {"app.kubernetes.io/managed-by": "graft",
                                    "graft.dev/session": name.trim_start_matches("graft-agent-")}},
            "status": {"conditions": conditions},
        }))
        .expect("valid test Job")
    }

    fn owned_by(mut pod: Pod, uid: &str) -> Pod {
        pod.metadata.owner_references = Some(vec![
            serde_json::from_value(json!({
                "apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": uid,
                "controller": true,
            }))
            .expect("valid owner reference"),
        ]);
        pod
    }

    #[test]
    fn jobs_are_cleaned_by_their_state_and_their_pods_go_with_them() {
        let jobs = [
            job(
                "graft-agent-done",
                "u1",
                json!([{"type": "Complete", "status": "True"}]),
            ),
            // TTL controller off: finished by its pod's exit, no condition yet.
            job("graft-agent-exited", "u2", json!([])),
            job("graft-agent-live", "u3", json!([])),
            job("graft-agent-stuck", "u4", json!([])),
        ];
        let pods = [
            owned_by(
                agent(
                    "graft-agent-done-x1",
                    "Succeeded",
                    json!({"terminated": {"exitCode": 0}}),
                ),
                "u1",
            ),
            owned_by(
                agent(
                    "graft-agent-exited-x2",
                    "Failed",
                    json!({"terminated": {"exitCode": 5}}),
                ),
                "u2",
            ),
            owned_by(
                agent("graft-agent-live-x3", "Running", json!({"running": {}})),
                "u3",
            ),
            // A bare pod of an older graft.
            agent(
                "graft-agent-old",
                "Succeeded",
                json!({"terminated": {"exitCode": 0}}),
            ),
        ];
        let plan = plan_clean(&jobs, &pods, false);
        let deleted: Vec<(&str, &str)> = plan
            .delete
            .iter()
            .map(|p| (p.kind, p.name.as_str()))
            .collect();
        assert_eq!(
            deleted,
            [
                ("job", "graft-agent-done"),
                ("job", "graft-agent-exited"),
                ("pod", "graft-agent-old")
            ]
        );
        assert_eq!(plan.delete[0].state, "Complete");
        assert_eq!(plan.delete[1].state, "Failed");
        let kept: Vec<(&str, &str)> = plan
            .keep
            .iter()
            .map(|p| (p.kind, p.name.as_str()))
            .collect();
        assert_eq!(
            kept,
            [("job", "graft-agent-live"), ("job", "graft-agent-stuck")]
        );
        assert_eq!(plan.keep[1].state, "no pod yet");
        assert_eq!(plan_clean(&jobs, &pods, true).delete.len(), 5);
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
        let plan = plan_clean(&[], &[p], true);
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
