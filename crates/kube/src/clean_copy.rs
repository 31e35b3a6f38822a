//! `graft clean` for `--copy-target` and `--scale-down`: the copies of
//! sessions that were killed, and the workloads they left scaled down.
//!
//! A copy's session is live while an agent of that session runs (the copy's
//! own ephemeral agent, or a node-mode agent [`crate::clean`] kept); without
//! one, or with `force`, the copy is deleted ([`crate::copy::delete_copy`]),
//! and a workload whose [`crate::scale::SCALED_DOWN_ANNOTATION`] names such a
//! session gets its replica count back ([`crate::scale::restore`], which only
//! scales a workload still at 0). Both appear in the [`CleanReport`] as
//! `copy` and `scale-down` entries; `dry_run` lists them and changes nothing.

use kube::Client;

use crate::KubeError;
use crate::clean::{AgentPod, CleanReport};
use crate::copy::{COPY_OF_ANNOTATION, copies, copy_has_running_agent, delete_copy};
use crate::manifest::SESSION_LABEL;
use crate::scale::{Restored, restore, scaled_down};

/// Deletes the copies of dead sessions (all with `force`) and restores the
/// workloads they scaled down, recording each in `report`.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `list pods` or `list` of a scalable
/// kind, or another API failure listing them.
pub async fn clean_copies(
    client: &Client,
    namespace: Option<&str>,
    force: bool,
    dry_run: bool,
    report: &mut CleanReport,
) -> Result<(), KubeError> {
    let mut live: Vec<String> = report
        .kept
        .iter()
        .filter_map(|kept| kept.session.clone())
        .collect();
    let copies = copies(client, namespace).await?;
    live.extend(
        copies
            .iter()
            .filter(|pod| copy_has_running_agent(pod))
            .filter_map(|pod| pod.metadata.labels.as_ref()?.get(SESSION_LABEL).cloned()),
    );
    for pod in &copies {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let session = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SESSION_LABEL))
            .cloned();
        let of = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(COPY_OF_ANNOTATION))
            .cloned()
            .unwrap_or_else(|| "?".into());
        let running = copy_has_running_agent(pod);
        let entry = AgentPod {
            kind: "copy",
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            session: session.clone(),
            state: format!(
                "copy of {of}, {}",
                if running {
                    "agent running"
                } else {
                    "no agent running"
                }
            ),
            terminated: !running,
        };
        let is_live = session.as_ref().is_some_and(|s| live.contains(s));
        if is_live && !force {
            report.kept.push(entry);
        } else if dry_run {
            report.removed.push(entry);
        } else {
            match delete_copy(client, &entry.namespace, &entry.name).await {
                Ok(()) => report.removed.push(entry),
                Err(e) => {
                    let message = e.to_string();
                    report.failed.push((entry, message));
                }
            }
        }
    }
    for scaled in scaled_down(client, namespace).await? {
        let session = scaled.record.session.clone();
        let mut entry = AgentPod {
            kind: "scale-down",
            namespace: scaled.namespace.clone(),
            name: format!("{}/{}", scaled.kind, scaled.name),
            session: Some(session.clone()),
            state: if scaled.replicas_now == 0 {
                format!(
                    "scaled to 0, restore to {} replicas",
                    scaled.record.replicas
                )
            } else {
                format!(
                    "rescaled to {} since, only its record goes",
                    scaled.replicas_now
                )
            },
            terminated: false,
        };
        if live.contains(&session) && !force {
            report.kept.push(entry);
            continue;
        }
        if dry_run {
            report.removed.push(entry);
            continue;
        }
        match restore(client, &scaled.namespace, scaled.kind, &scaled.name, None).await {
            Ok(Restored::Scaled(n)) => {
                entry.state = format!("restored to {n} replicas");
                report.removed.push(entry);
            }
            Ok(Restored::LeftAlone(n)) => {
                entry.state = format!("left at {n} replicas (rescaled since), record removed");
                report.removed.push(entry);
            }
            Ok(Restored::NotOurs) => {}
            Err(e) => {
                let message = e.to_string();
                report.failed.push((entry, message));
            }
        }
    }
    Ok(())
}
