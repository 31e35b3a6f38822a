//! The node-mode and targetless agents as Jobs the cluster removes by itself
//! ([`crate::manifest::agent_job`]): create the Job, find the pod its
//! controller creates, delete the Job (and, through the garbage collector, its
//! pod) at the end, and list what is left for `graft clean`.
//!
//! Data flow: a [`Job`] from the manifest goes in; [`start_agent_job`] creates
//! it and returns the name of its pod once the Job controller has made it, or
//! the reason it cannot (the controller's `FailedCreate` event: Pod Security,
//! quota, a webhook). The pod is found by the session label the Job's
//! template carries, with a watch.

use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;

use crate::KubeError;
use crate::manifest::SESSION_LABEL;
use crate::place::{FIELD_MANAGER, delete_agent_object, list_agent_objects};
use crate::rbac;

/// How long the Job controller may take to create the agent's pod.
pub const JOB_POD_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the Job's events are read for a failure to create its pod.
const EVENT_POLL: Duration = Duration::from_millis(500);

/// Creates `job` in `namespace` and waits (at most [`JOB_POD_TIMEOUT`]) for
/// the pod its controller creates; returns the pod's name. A Job whose pod
/// cannot be created is deleted again.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `create jobs` or `watch pods`;
/// [`KubeError::AdmissionRejected`] when Pod Security (or a webhook) refuses
/// the pod (the Job controller's `FailedCreate` event says so);
/// [`KubeError::AgentFailed`] for another `FailedCreate`;
/// [`KubeError::AgentTimeout`] when no pod appears in time.
pub async fn start_agent_job(
    client: &Client,
    job: &Job,
    namespace: &str,
) -> Result<String, KubeError> {
    let name = job.metadata.name.clone().unwrap_or_default();
    let api: Api<Job> = Api::namespaced(client.clone(), namespace);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    api.create(&params, job)
        .await
        .map_err(|e| KubeError::from_api(e, rbac::CREATE_JOBS, namespace, "job", &name))?;
    let session = job
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SESSION_LABEL))
        .cloned()
        .unwrap_or_default();
    let found = tokio::select! {
        found = tokio::time::timeout(JOB_POD_TIMEOUT, job_pod(client, namespace, &session)) => {
            match found {
                Ok(found) => found,
                Err(_elapsed) => Err(KubeError::AgentTimeout {
                    pod: format!("(the pod of job {name})"),
                    waited_secs: JOB_POD_TIMEOUT.as_secs(),
                    state: "the Job controller created no pod".into(),
                    events: job_events(client, namespace, &name).await.unwrap_or_default(),
                }),
            }
        }
        failed = failed_create(client, namespace, &name) => Err(failed),
    };
    if found.is_err() {
        let _ = delete_agent_job(client, namespace, &name).await;
    }
    found
}

/// The name of the first pod labelled with `session`, as soon as it exists.
async fn job_pod(client: &Client, namespace: &str, session: &str) -> Result<String, KubeError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = format!("{SESSION_LABEL}={session}");
    let config = watcher::Config::default().labels(&selector);
    let pods = watcher(api, config).applied_objects();
    let mut pods = std::pin::pin!(pods);
    loop {
        match pods.try_next().await {
            Ok(Some(pod)) => {
                if let Some(name) = pod.metadata.name {
                    return Ok(name);
                }
            }
            Ok(None) => {
                return Err(KubeError::Api {
                    action: format!("watching the pods labelled {selector}"),
                    error: Box::new(kube::Error::Service("the watch ended".into())),
                });
            }
            Err(e) => return Err(watcher_error(e, namespace, &selector)),
        }
    }
}

fn watcher_error(e: watcher::Error, namespace: &str, selector: &str) -> KubeError {
    use watcher::Error as W;
    let source = match e {
        W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => e,
        W::WatchError(status) => kube::Error::Api(status),
        other => kube::Error::Service(Box::new(other)),
    };
    KubeError::from_api(source, rbac::WATCH_PODS, namespace, "pod", selector)
}

/// Resolves with the error when the Job controller reports that it could
/// not create the Job's pod; never resolves otherwise.
async fn failed_create(client: &Client, namespace: &str, job: &str) -> KubeError {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().fields(&format!(
        "involvedObject.kind=Job,involvedObject.name={job}"
    ));
    loop {
        tokio::time::sleep(EVENT_POLL).await;
        // Without `list events` the wait ends by its timeout instead.
        let Ok(events) = api.list(&params).await else {
            continue;
        };
        let failure = events
            .items
            .iter()
            .find(|e| e.reason.as_deref() == Some("FailedCreate"));
        if let Some(event) = failure {
            let message = event.message.clone().unwrap_or_default();
            if crate::error::is_admission_message(&message) {
                return KubeError::AdmissionRejected { message };
            }
            return KubeError::AgentFailed {
                pod: format!("(the pod of job {job})"),
                reason: format!("the Job controller could not create it: {message}"),
                events: crate::events::format_events(events.items, None),
            };
        }
    }
}

async fn job_events(
    client: &Client,
    namespace: &str,
    job: &str,
) -> Result<Vec<String>, kube::Error> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().fields(&format!(
        "involvedObject.kind=Job,involvedObject.name={job}"
    ));
    Ok(crate::events::format_events(
        api.list(&params).await?.items,
        None,
    ))
}

/// Deletes an agent's Job; the garbage collector deletes its pod
/// (background propagation: a Job's default would orphan it), whose agent
/// gets SIGTERM and removes its packet rules. A Job already gone is fine.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `delete jobs`, or another API failure.
pub async fn delete_agent_job(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(), KubeError> {
    delete_agent_object::<Job>(
        client,
        namespace,
        name,
        &DeleteParams::background(),
        rbac::DELETE_JOBS,
        "job",
    )
    .await
}

/// The agent Jobs in `namespace` (all namespaces with `None`), for `graft
/// clean`.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `list jobs`, or another API failure.
pub async fn agent_jobs(client: &Client, namespace: Option<&str>) -> Result<Vec<Job>, KubeError> {
    list_agent_objects(client, namespace, rbac::LIST_JOBS, "job").await
}

/// Whether a Job has finished (condition `Complete` or `Failed` true), with
/// the condition's type and reason.
pub fn job_finished(job: &Job) -> Option<String> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| matches!(c.type_.as_str(), "Complete" | "Failed") && c.status == "True")
        .map(|c| match c.reason.as_deref() {
            Some(reason) => format!("{}: {reason}", c.type_),
            None => c.type_.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_job_is_finished_by_its_complete_or_failed_condition() {
        let job = |conditions: serde_json::Value| -> Job {
            serde_json::from_value(json!({
                "metadata": {"name": "graft-agent-a"},
                "status": {"conditions": conditions},
            }))
            .expect("a valid Job")
        };
        assert_eq!(job_finished(&job(json!([]))), None);
        assert_eq!(
            job_finished(&job(json!([{"type": "Complete", "status": "True"}]))),
            Some("Complete".into())
        );
        assert_eq!(
            job_finished(&job(json!([
                {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}
            ]))),
            Some("Failed: DeadlineExceeded".into())
        );
        assert_eq!(
            job_finished(&job(json!([{"type": "Failed", "status": "False"}]))),
            None
        );
    }
}
