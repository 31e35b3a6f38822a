//! The fake cluster's controllers for Jobs, as far as graft's agent Jobs
//! need them (kube-controller-manager's `job`, `ttl-after-finished` and
//! `garbage-collector` controllers):
//!
//! - a new Job gets its selector and template labels (`controller-uid`,
//!   `job-name`, as the API server defaults them) and one pod named
//!   `JOB-xxxxx`, owned by the Job (`ownerReferences`, `controller: true`),
//!   which the fake kubelet runs; the Job's status counts it `active`;
//! - when that pod's containers have all exited, the Job is `Complete` (exit
//!   code 0) or `Failed` (`BackoffLimitExceeded`: one pod is all a
//!   `backoffLimit: 0` Job gets);
//! - a finished Job with `ttlSecondsAfterFinished` is deleted that many
//!   seconds later, with its pods (the TTL controller deletes in the
//!   foreground; here the Job goes at once and its pods as a pod deletion
//!   does: SIGTERM, then removal once their containers exited);
//! - deleting a Job with `propagationPolicy` `Background` or `Foreground`
//!   deletes its pods the same way; without one (a batch/v1 Job's default is
//!   to orphan) the pods stay and lose their owner reference.
//!
//! Not modelled: `parallelism`/`completions` above 1, retries (every agent
//! Job has `backoffLimit: 0`), `activeDeadlineSeconds`, Pod Security on the
//! Job's pod.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::Shared;
use super::objects::{admit_pod, delete_object, new_metadata, start_pod};
use super::select::{random_hex, rfc3339};

/// The Job controller's reaction to a new Job: its defaults and its pod.
pub(super) fn created(shared: &Arc<Shared>, job: &Value) {
    let ns = job["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let name = job["metadata"]["name"].as_str().unwrap_or("").to_owned();
    let uid = job["metadata"]["uid"].clone();
    let mut job = job.clone();
    let controller_labels = json!({"controller-uid": uid, "job-name": name});
    job["spec"]["selector"] = json!({"matchLabels": {"controller-uid": uid}});
    let template = &mut job["spec"]["template"];
    if !template["metadata"]["labels"].is_object() {
        template["metadata"]["labels"] = json!({});
    }
    for (k, v) in controller_labels.as_object().expect("an object").iter() {
        template["metadata"]["labels"][k] = v.clone();
    }
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": template["metadata"].clone(),
        "spec": template["spec"].clone(),
    });
    pod["metadata"]["name"] = json!(format!("{name}-{}", &random_hex(3)[..5]));
    pod["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid,
        "controller": true, "blockOwnerDeletion": true,
    }]);
    new_metadata(&mut pod, Some(&ns));
    let admitted = admit_pod(&mut pod);
    let stored = shared.commit(|s| {
        if admitted.is_ok() {
            job["status"] = json!({"active": 1, "startTime": rfc3339(SystemTime::now())});
        }
        s.put("jobs", job, "MODIFIED");
        match admitted {
            Ok(()) => Some(s.put("pods", pod, "ADDED")),
            Err(message) => {
                job_event(s, &ns, &name, &format!("Error creating: {message}"));
                None
            }
        }
    });
    if let Some(pod) = stored {
        start_pod(shared, &pod);
    }
}

/// The Job controller's `FailedCreate` event on a Job.
fn job_event(s: &mut super::State, ns: &str, job: &str, message: &str) {
    let now = rfc3339(SystemTime::now());
    let uid = s
        .get("jobs", ns, job)
        .map(|j| j["metadata"]["uid"].clone())
        .unwrap_or(Value::Null);
    s.put(
        "events",
        json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": format!("{job}.{}", random_hex(8)), "namespace": ns,
                         "uid": super::select::uid(), "creationTimestamp": now},
            "involvedObject": {"apiVersion": "batch/v1", "kind": "Job", "name": job,
                               "namespace": ns, "uid": uid},
            "reason": "FailedCreate", "message": message, "type": "Warning", "count": 1,
            "firstTimestamp": now, "lastTimestamp": now,
            "source": {"component": "job-controller"},
        }),
        "ADDED",
    );
}

/// The name of the Job that owns `pod`, if one does.
fn owner(pod: &Value) -> Option<String> {
    pod["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["kind"] == "Job")
        .and_then(|o| o["name"].as_str())
        .map(str::to_owned)
}

/// After the containers of `pod` exited: the Job controller finishes its
/// Job, and the TTL controller deletes it when its time comes.
pub(super) fn pod_exited(shared: &Arc<Shared>, ns: &str, pod: &str) {
    let finished = shared.commit(|s| {
        let pod = s.get("pods", ns, pod)?.clone();
        let phase = pod["status"]["phase"].as_str().unwrap_or("");
        if !matches!(phase, "Succeeded" | "Failed") {
            return None;
        }
        let name = owner(&pod)?;
        let mut job = s.get("jobs", ns, &name)?.clone();
        let conditions = job["status"]["conditions"].as_array();
        if conditions.is_some_and(|c| !c.is_empty()) {
            return None;
        }
        let now = rfc3339(SystemTime::now());
        let (field, condition) = if phase == "Succeeded" {
            (
                "succeeded",
                json!({"type": "Complete", "status": "True", "lastTransitionTime": now}),
            )
        } else {
            (
                "failed",
                json!({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                       "message": "Job has reached the specified backoff limit",
                       "lastTransitionTime": now}),
            )
        };
        job["status"]["active"] = json!(0);
        job["status"][field] = json!(1);
        job["status"]["conditions"] = json!([condition]);
        if phase == "Succeeded" {
            job["status"]["completionTime"] = json!(now);
        }
        let ttl = job["spec"]["ttlSecondsAfterFinished"].as_u64();
        s.put("jobs", job, "MODIFIED");
        Some((name, ttl))
    });
    let Some((name, Some(ttl))) = finished else {
        return;
    };
    let shared = shared.clone();
    let ns = ns.to_owned();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(ttl)).await;
        if let Some(job) = delete_object(&shared, "jobs", &ns, &name) {
            deleted(&shared, &job, Some("Foreground"));
        }
    });
}

/// The garbage collector, after `job` was deleted with `policy`.
pub(super) fn deleted(shared: &Arc<Shared>, job: &Value, policy: Option<&str>) {
    let ns = job["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let uid = job["metadata"]["uid"].clone();
    let owned: Vec<Value> = shared
        .lock()
        .objects
        .iter()
        .filter(|((r, o_ns, _), _)| r == "pods" && *o_ns == ns)
        .map(|(_, pod)| pod)
        .filter(|pod| {
            pod["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|refs| refs.iter().any(|o| o["uid"] == uid))
        })
        .cloned()
        .collect();
    for mut pod in owned {
        let name = pod["metadata"]["name"].as_str().unwrap_or("").to_owned();
        match policy {
            Some("Background" | "Foreground") => {
                delete_object(shared, "pods", &ns, &name);
            }
            _ => shared.commit(|s| {
                if let Some(refs) = pod["metadata"]["ownerReferences"].as_array_mut() {
                    refs.retain(|o| o["uid"] != uid);
                }
                s.put("pods", pod, "MODIFIED");
            }),
        }
    }
}
