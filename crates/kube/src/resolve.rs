//! Connecting to a cluster and resolving a [`KubeTarget`] to a pod and
//! container: the I/O around the pure rules of [`select`](crate::select).
//!
//! A workload is read with its typed API (`apps/v1`, `batch/v1`), its
//! selector lists the pods, and [`choose_pod`] picks one; a CronJob goes
//! through its newest running Job; a Rollout is read through the dynamic API
//! after discovery finds the `argoproj.io` group. Every request names its
//! [`rbac`] permission so failures say what to ask for.

use std::fmt::Debug;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DynamicObject, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, Resource};
use serde::de::DeserializeOwned;

use crate::rbac::{self, Permission};
use crate::select::{
    RolloutPods, check_named_pod, choose_container, choose_pod, newest_running_job,
    resolved_target, rollout_pods, selector_string,
};
use crate::{KubeError, KubeTarget, ResolvedTarget, WorkloadKind};

/// How to reach the cluster, as kubectl's flags say it.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// `--kubeconfig`: a kubeconfig file instead of `KUBECONFIG` /
    /// `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// `--context`: a context of the kubeconfig instead of its current one.
    pub context: Option<String>,
    /// `-n/--namespace`: instead of the context's namespace.
    pub namespace: Option<String>,
}

/// A client and the namespace targets are looked up in.
#[derive(Clone)]
pub struct Cluster {
    /// The API client.
    pub client: Client,
    /// `-n`, else the context's namespace, else the service account's
    /// (in-cluster), else `default`.
    pub namespace: String,
}

impl Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// Builds a client the way kubectl would: `--kubeconfig`, else `KUBECONFIG`
/// or `~/.kube/config`, else the in-cluster service account; `--context`
/// picks a context.
///
/// # Errors
///
/// [`KubeError::Config`] when no configuration can be loaded or the client
/// cannot be built from it (bad certificates, unknown context).
pub async fn connect(options: &ClientOptions) -> Result<Cluster, KubeError> {
    let config_error = |e: Box<dyn std::error::Error + Send + Sync>| KubeError::Config { error: e };
    let kube_options = KubeConfigOptions {
        context: options.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match (&options.kubeconfig, &options.context) {
        (Some(path), _) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| config_error(e.into()))?;
            Config::from_custom_kubeconfig(kubeconfig, &kube_options)
                .await
                .map_err(|e| config_error(e.into()))?
        }
        (None, Some(_)) => Config::from_kubeconfig(&kube_options)
            .await
            .map_err(|e| config_error(e.into()))?,
        (None, None) => Config::infer().await.map_err(|e| config_error(e.into()))?,
    };
    let namespace = options
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| config_error(e.into()))?;
    Ok(Cluster { client, namespace })
}

/// A resolved target and how graft got there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The pod and container graft attaches to.
    pub target: ResolvedTarget,
    /// Every ready pod the workload had, in preference order, the chosen one
    /// first (just the pod for `pod/NAME`): "graft picks one and says which".
    pub candidates: Vec<String>,
    /// The label selector the pods were found with, if any.
    pub selector: Option<String>,
    /// For a CronJob, the Job whose pod was taken.
    pub job: Option<String>,
}

/// Resolves `target` in `namespace` to one pod and container.
///
/// # Errors
///
/// [`KubeError::NotFound`] (listing what exists), [`KubeError::Forbidden`],
/// [`KubeError::NoReadyPod`], [`KubeError::NoRunningJob`],
/// [`KubeError::RolloutsNotInstalled`], [`KubeError::ContainerNotFound`],
/// [`KubeError::ContainerNotRunning`], or another API failure.
pub async fn resolve(
    client: &Client,
    namespace: &str,
    target: &KubeTarget,
) -> Result<Resolution, KubeError> {
    let name = target.name.as_str();
    let selector = match target.kind {
        WorkloadKind::Pod => {
            let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
            let pod = get_named(&api, target.kind, name, namespace).await?;
            check_named_pod(&pod)?;
            let container = choose_container(&pod, target.container.as_deref())?;
            return Ok(Resolution {
                target: resolved_target(&pod, container)?,
                candidates: vec![name.to_owned()],
                selector: None,
                job: None,
            });
        }
        WorkloadKind::Deployment => {
            let d: Deployment = get_typed(client, target.kind, name, namespace).await?;
            d.spec.map(|s| s.selector)
        }
        WorkloadKind::StatefulSet => {
            let s: StatefulSet = get_typed(client, target.kind, name, namespace).await?;
            s.spec.map(|s| s.selector)
        }
        WorkloadKind::DaemonSet => {
            let d: DaemonSet = get_typed(client, target.kind, name, namespace).await?;
            d.spec.map(|s| s.selector)
        }
        WorkloadKind::ReplicaSet => {
            let r: ReplicaSet = get_typed(client, target.kind, name, namespace).await?;
            r.spec.map(|s| s.selector)
        }
        WorkloadKind::Job => {
            let j: Job = get_typed(client, target.kind, name, namespace).await?;
            j.spec.and_then(|s| s.selector)
        }
        WorkloadKind::CronJob => {
            let job = running_job_of_cronjob(client, namespace, name).await?;
            let job_name = job.metadata.name.clone();
            let selector = job.spec.and_then(|s| s.selector);
            let mut resolution =
                resolve_selector(client, namespace, target, selector.as_ref()).await?;
            resolution.job = job_name;
            return Ok(resolution);
        }
        WorkloadKind::Rollout => rollout_selector(client, namespace, name).await?,
    };
    resolve_selector(client, namespace, target, selector.as_ref()).await
}

/// How often [`resolve_waiting`] looks at the pods again.
const READY_POLL: Duration = Duration::from_millis(500);

/// [`resolve`], waiting at most `timeout` for a workload whose pods are not
/// Ready yet but may become so (running with a readiness probe that has not
/// passed, or starting: [`crate::select::pod_may_become_ready`]).
/// `waiting` is called with the not-ready pods (`api-1 (Running, not Ready:
/// ContainersNotReady)`) each time graft looks again, for a spinner.
///
/// # Errors
///
/// As [`resolve`]; a [`KubeError::NoReadyPod`] at once when no pod may
/// become Ready (none at all, image pull or crash loop), or with
/// `waited_secs` after `timeout`.
pub async fn resolve_waiting(
    client: &Client,
    namespace: &str,
    target: &KubeTarget,
    timeout: Duration,
    mut waiting: impl FnMut(&[String]),
) -> Result<Resolution, KubeError> {
    let started = tokio::time::Instant::now();
    loop {
        match resolve(client, namespace, target).await {
            Err(KubeError::NoReadyPod {
                target,
                namespace,
                selector,
                not_ready,
                becoming_ready: true,
                ..
            }) => {
                if started.elapsed() >= timeout {
                    return Err(KubeError::NoReadyPod {
                        target,
                        namespace,
                        selector,
                        not_ready,
                        becoming_ready: true,
                        waited_secs: Some(timeout.as_secs()),
                    });
                }
                waiting(&not_ready);
                tokio::time::sleep(READY_POLL).await;
            }
            other => return other,
        }
    }
}

async fn resolve_selector(
    client: &Client,
    namespace: &str,
    target: &KubeTarget,
    selector: Option<&LabelSelector>,
) -> Result<Resolution, KubeError> {
    let shown = format!("{}/{}", target.kind, target.name);
    let selector = selector_string(selector, &shown)?;
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pods = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| KubeError::from_api(e, rbac::LIST_PODS, namespace, "pod", &selector))?;
    let choice = choose_pod(pods.items, &shown, namespace, &selector)?;
    let container = choose_container(&choice.chosen, target.container.as_deref())?;
    Ok(Resolution {
        target: resolved_target(&choice.chosen, container)?,
        candidates: choice.candidates,
        selector: Some(selector),
        job: None,
    })
}

async fn running_job_of_cronjob(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Job, KubeError> {
    let cronjob: CronJob = get_typed(client, WorkloadKind::CronJob, name, namespace).await?;
    let uid = cronjob.metadata.uid.unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    // Jobs have no field selector on their owner; a CronJob keeps only a few
    // (its history limits), so listing the namespace's jobs is cheap enough.
    let list = jobs
        .list(&ListParams::default())
        .await
        .map_err(|e| KubeError::from_api(e, rbac::LIST_JOBS, namespace, "job", name))?;
    newest_running_job(&list.items, &uid)
        .cloned()
        .ok_or_else(|| KubeError::NoRunningJob {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        })
}

async fn rollout_selector(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<LabelSelector>, KubeError> {
    let not_installed = || KubeError::RolloutsNotInstalled {
        name: name.to_owned(),
    };
    let group = match kube::discovery::group(client, "argoproj.io").await {
        Ok(group) => group,
        Err(kube::Error::Discovery(_)) => return Err(not_installed()),
        Err(kube::Error::Api(status)) if status.code == 404 => return Err(not_installed()),
        Err(e) => {
            return Err(KubeError::Api {
                action: "discovering the argoproj.io API group".into(),
                error: Box::new(e),
            });
        }
    };
    let (resource, _) = group
        .recommended_kind("Rollout")
        .ok_or_else(not_installed)?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let rollout = get_named(&api, WorkloadKind::Rollout, name, namespace).await?;
    match rollout_pods(&rollout.data, name)? {
        RolloutPods::Selector(selector) => Ok(Some(selector)),
        RolloutPods::Deployment(deployment) => {
            let d: Deployment =
                get_typed(client, WorkloadKind::Deployment, &deployment, namespace).await?;
            Ok(d.spec.map(|s| s.selector))
        }
    }
}

/// The `get` and `list` permissions of a kind.
fn permissions(kind: WorkloadKind) -> (Permission, Permission) {
    match kind {
        WorkloadKind::Pod => (rbac::GET_PODS, rbac::LIST_PODS),
        WorkloadKind::Deployment => (rbac::GET_DEPLOYMENTS, rbac::LIST_DEPLOYMENTS),
        WorkloadKind::StatefulSet => (rbac::GET_STATEFULSETS, rbac::LIST_STATEFULSETS),
        WorkloadKind::DaemonSet => (rbac::GET_DAEMONSETS, rbac::LIST_DAEMONSETS),
        WorkloadKind::ReplicaSet => (rbac::GET_REPLICASETS, rbac::LIST_REPLICASETS),
        WorkloadKind::Job => (rbac::GET_JOBS, rbac::LIST_JOBS),
        WorkloadKind::CronJob => (rbac::GET_CRONJOBS, rbac::LIST_CRONJOBS),
        WorkloadKind::Rollout => (rbac::GET_ROLLOUTS, rbac::LIST_ROLLOUTS),
    }
}

async fn get_typed<K>(
    client: &Client,
    kind: WorkloadKind,
    name: &str,
    namespace: &str,
) -> Result<K, KubeError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    get_named(&api, kind, name, namespace).await
}

/// How many names a not-found error lists at most.
const MAX_LISTED: u32 = 30;

/// Gets `name`; when it does not exist, lists what does so the error can
/// name it (best effort: without `list`, the error just says to check).
async fn get_named<K>(
    api: &Api<K>,
    kind: WorkloadKind,
    name: &str,
    namespace: &str,
) -> Result<K, KubeError>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let (get, list) = permissions(kind);
    match api.get(name).await {
        Ok(object) => Ok(object),
        Err(e) => {
            let mut error = KubeError::from_api(e, get, namespace, kind.as_str(), name);
            if let KubeError::NotFound { existing, .. } = &mut error {
                tracing::debug!(permission = %list, "listing what exists");
                if let Ok(objects) = api.list(&ListParams::default().limit(MAX_LISTED)).await {
                    *existing = Some(
                        objects
                            .items
                            .iter()
                            .filter_map(|o| o.meta().name.clone())
                            .collect(),
                    );
                }
            }
            Err(error)
        }
    }
}
