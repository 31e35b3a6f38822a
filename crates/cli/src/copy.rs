//! `graft run --copy-target [--scale-down]`: make the copy of the target pod
//! that the session then runs against, scale the original workload down, and
//! undo both on every way out ([`Teardown`]).
//!
//! ```text
//! make_copy(target) ─► copy running ─► Resolution of pod/COPY ─► (agent placed in it)
//!                                                              └► scale_down(original)
//! Teardown::run: restore the count, delete the copy (also after a failed or
//! interrupted start)
//! ```
//!
//! The pure parts (the copy's manifest, the scale record) are
//! `graft_kube::copy` and `graft_kube::scale`; this file only sequences them
//! and reports.

use std::collections::BTreeMap;

use graft_config::KubeSettings;
use graft_kube::copy::{
    COPY_START_TIMEOUT, CopyOptions, check_keep_labels, copies_template, copy_pod, create_copy,
    delete_copy, wait_copy_running,
};
use graft_kube::scale::{Restored, restore, scale_down};
use graft_kube::select::choose_container;
use graft_kube::{Cluster, KubeError, KubeTarget, Resolution, WorkloadKind};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use kube::Api;

use crate::cluster::{Progress, kube_failure};
use crate::failure::Failure;

/// What a copy session created, to undo at its end: the copy, and the
/// workload it scaled down. Filled in as each is created, so a start that
/// fails or is interrupted half-way is undone as far as it got.
#[derive(Default)]
pub struct Teardown {
    cluster: Option<Cluster>,
    copy: Option<(String, String)>,
    scaled: Option<Scaled>,
}

struct Scaled {
    namespace: String,
    kind: WorkloadKind,
    name: String,
    session: String,
}

impl Teardown {
    /// Restores the scaled-down workload (when it is still at 0 and its
    /// record is this session's) and deletes the copy. Failures are printed,
    /// with `graft clean` as the way out: this runs on the way out.
    pub async fn run(&mut self) {
        let Some(cluster) = self.cluster.take() else {
            return;
        };
        if let Some(scaled) = self.scaled.take() {
            let shown = format!(
                "{}/{} in namespace {}",
                scaled.kind, scaled.name, scaled.namespace
            );
            match restore(
                &cluster.client,
                &scaled.namespace,
                scaled.kind,
                &scaled.name,
                Some(&scaled.session),
            )
            .await
            {
                Ok(Restored::Scaled(n)) => eprintln!("graft: scaled {shown} back to {n}"),
                Ok(Restored::LeftAlone(n)) => eprintln!(
                    "graft: {shown} was rescaled to {n} during the session; left as it is"
                ),
                Ok(Restored::NotOurs) => eprintln!(
                    "graft: {shown} no longer carries this session's scale-down record; left \
                     as it is"
                ),
                Err(e) => eprintln!(
                    "graft: could not scale {shown} back: {e}; `graft clean -n {}` restores it",
                    scaled.namespace
                ),
            }
        }
        if let Some((namespace, name)) = self.copy.take()
            && let Err(e) = delete_copy(&cluster.client, &namespace, &name).await
        {
            eprintln!(
                "graft: could not delete the copy {namespace}/{name}: {e}; `graft clean -n \
                 {namespace}` deletes it"
            );
        }
    }
}

/// Reads the pod template of a Job or CronJob target.
async fn template_of(cluster: &Cluster, target: &KubeTarget) -> Result<PodTemplateSpec, KubeError> {
    let ns = &cluster.namespace;
    let name = &target.name;
    let not_found = |kind: &str| KubeError::NotFound {
        kind: kind.to_owned(),
        name: name.clone(),
        namespace: ns.clone(),
        existing: None,
    };
    if target.kind == WorkloadKind::Job {
        let api: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
        let job = api
            .get(name)
            .await
            .map_err(|e| KubeError::from_api(e, graft_kube::rbac::GET_JOBS, ns, "job", name))?;
        return job.spec.map(|s| s.template).ok_or_else(|| not_found("job"));
    }
    let api: Api<CronJob> = Api::namespaced(cluster.client.clone(), ns);
    let cronjob = api
        .get(name)
        .await
        .map_err(|e| KubeError::from_api(e, graft_kube::rbac::GET_CRONJOBS, ns, "cronjob", name))?;
    cronjob
        .spec
        .and_then(|s| s.job_template.spec)
        .map(|s| s.template)
        .ok_or_else(|| not_found("cronjob"))
}

/// Makes the copy of `target` (from its chosen pod, or from a Job's or
/// CronJob's template with the command replaced), waits until it runs, and
/// resolves it: the session then targets the copy. What it creates goes into
/// `teardown` at once.
///
/// # Errors
///
/// A [`Failure`] naming what failed: the target, a refused `keep_labels`, a
/// missing permission (`create pods`), the copy not starting.
pub async fn make_copy(
    cluster: &Cluster,
    target: &KubeTarget,
    settings: &KubeSettings,
    options: &graft_kube::AgentOptions,
    progress: &mut Progress,
    teardown: &mut Teardown,
) -> Result<Resolution, Failure> {
    let client = &cluster.client;
    let namespace = &cluster.namespace;
    progress.phase(&format!(
        "reading {target} in namespace {namespace} to copy it"
    ));
    // (the source's metadata and spec, its name, the container, the kind of
    // its controller, whether the command is replaced)
    let (source, source_name, container, owner_kind, replace) = if copies_template(target.kind) {
        let template = template_of(cluster, target).await.map_err(kube_failure)?;
        let pod = Pod {
            metadata: template.metadata.unwrap_or_default(),
            spec: template.spec,
            status: None,
        };
        let choice = choose_container(&pod, target.container.as_deref()).map_err(kube_failure)?;
        (pod, target.name.clone(), choice.name, None, true)
    } else {
        let ready_timeout = std::time::Duration::from_secs(settings.ready_timeout_secs);
        let resolution =
            graft_kube::resolve_waiting(client, namespace, target, ready_timeout, |_| {})
                .await
                .map_err(kube_failure)?;
        let chosen = resolution.target;
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let pod = api.get(&chosen.pod).await.map_err(|e| {
            kube_failure(KubeError::from_api(
                e,
                graft_kube::rbac::GET_PODS,
                namespace,
                "pod",
                &chosen.pod,
            ))
        })?;
        let owner = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .map(|o| o.kind.clone());
        (pod, chosen.pod, chosen.container.name, owner, false)
    };
    if settings.copy_keep_labels {
        let empty = BTreeMap::new();
        let labels = source.metadata.labels.as_ref().unwrap_or(&empty);
        check_keep_labels(owner_kind.as_deref(), labels).map_err(kube_failure)?;
    }
    let copy_options = CopyOptions {
        session: options.session.clone(),
        keep_labels: settings.copy_keep_labels,
        replace_command: replace.then(|| container.clone()),
        active_deadline_secs: options.active_deadline_secs,
    };
    let spec = source.spec.clone().unwrap_or_default();
    let manifest = copy_pod(
        &source.metadata,
        &spec,
        &source_name,
        namespace,
        &target.to_string(),
        &copy_options,
    )
    .map_err(kube_failure)?;
    let name = manifest.metadata.name.clone().unwrap_or_default();
    progress.phase(&format!("creating the copy {name} of {target}"));
    teardown.cluster = Some(cluster.clone());
    create_copy(client, &manifest).await.map_err(kube_failure)?;
    teardown.copy = Some((namespace.clone(), name.clone()));
    progress.say(&format!(
        "copy {namespace}/{name} of {target} ({}; {})",
        if replace {
            format!("container {container} sleeps instead of running the job")
        } else {
            format!("from pod {source_name}")
        },
        if settings.copy_keep_labels {
            "with the original's labels"
        } else {
            "no Service selects it"
        }
    ));
    progress.phase(&format!("waiting for the copy {name} to run"));
    wait_copy_running(client, namespace, &name, &container, COPY_START_TIMEOUT)
        .await
        .map_err(kube_failure)?;
    let copy_target = KubeTarget {
        kind: WorkloadKind::Pod,
        name,
        container: Some(container),
    };
    graft_kube::resolve(client, namespace, &copy_target)
        .await
        .map_err(kube_failure)
}

/// Scales the original `target` to 0 for the session `session` and records it
/// in `teardown`.
///
/// # Errors
///
/// A [`Failure`]: a kind without a scale, a workload another session holds, a
/// missing permission.
pub async fn scale_original(
    cluster: &Cluster,
    target: &KubeTarget,
    session: &str,
    progress: &mut Progress,
    teardown: &mut Teardown,
) -> Result<(), Failure> {
    progress.phase(&format!("scaling {target} down to 0"));
    let record = scale_down(
        &cluster.client,
        &cluster.namespace,
        target.kind,
        &target.name,
        session,
    )
    .await
    .map_err(kube_failure)?;
    teardown.cluster = Some(cluster.clone());
    teardown.scaled = Some(Scaled {
        namespace: cluster.namespace.clone(),
        kind: target.kind,
        name: target.name.clone(),
        session: session.to_owned(),
    });
    progress.say(&format!(
        "scaled {target} down to 0 (from {}); it is scaled back when the session ends",
        record.replicas
    ));
    Ok(())
}

/// Checks, before anything is created, that `--scale-down` can scale `target`.
///
/// # Errors
///
/// A usage [`Failure`] for a kind without a scale.
pub fn check_scalable(target: &KubeTarget) -> Result<(), Failure> {
    if graft_kube::scale::scalable(target.kind) {
        return Ok(());
    }
    Err(Failure::usage(format!(
        "--scale-down scales a deployment, statefulset or replicaset; {target} is a {}",
        target.kind
    ))
    .hint("drop --scale-down, or target the workload that owns the pods"))
}
