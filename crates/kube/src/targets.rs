//! `graft targets`: the workloads of a namespace that `--target` can name, for
//! pickers (the VS Code extension's quick pick) and people. Deployments,
//! StatefulSets, DaemonSets and pods, each as the `--target` text that selects
//! it, with how many of its pods are ready. Reads only; the listing needs the
//! `list` permissions of [`rbac::ALL`](crate::rbac::ALL).

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};
use serde::de::DeserializeOwned;

use crate::KubeError;
use crate::rbac::{self, Permission};

/// One target of a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetEntry {
    /// The `--target` text that selects it: `deploy/api`, `sts/db`, `ds/agent`,
    /// `pod/api-7d9c-x2`.
    pub target: String,
    /// `deployment`, `statefulset`, `daemonset` or `pod`.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Ready pods (for a pod: ready containers).
    pub ready: u32,
    /// Pods wanted (for a pod: its containers).
    pub desired: u32,
    /// The containers of its pod template (`KIND/NAME/container/C` picks one).
    pub containers: Vec<String>,
}

async fn list<K>(
    client: &Client,
    namespace: &str,
    permission: Permission,
    kind: &str,
) -> Result<Vec<K>, KubeError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.list(&ListParams::default())
        .await
        .map(|list| list.items)
        .map_err(|e| KubeError::from_api(e, permission, namespace, kind, "(all)"))
}

fn names(spec: Option<&k8s_openapi::api::core::v1::PodSpec>) -> Vec<String> {
    spec.map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

fn entry(
    short: &str,
    kind: &'static str,
    meta: &kube::api::ObjectMeta,
    counts: (i32, i32),
    containers: Vec<String>,
) -> TargetEntry {
    let name = meta.name.clone().unwrap_or_default();
    let count = |n: i32| u32::try_from(n).unwrap_or(0);
    TargetEntry {
        target: format!("{short}/{name}"),
        kind,
        name,
        namespace: meta.namespace.clone().unwrap_or_default(),
        ready: count(counts.0),
        desired: count(counts.1),
        containers,
    }
}

/// The Deployments, StatefulSets, DaemonSets and pods of `namespace`, in
/// that order, each sorted by name.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without one of the `list` permissions (naming it),
/// or another API failure.
pub async fn list_targets(client: &Client, namespace: &str) -> Result<Vec<TargetEntry>, KubeError> {
    let mut out = Vec::new();
    let mut group = |mut entries: Vec<TargetEntry>| {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(entries);
    };
    let deployments: Vec<Deployment> =
        list(client, namespace, rbac::LIST_DEPLOYMENTS, "deployment").await?;
    group(
        deployments
            .iter()
            .map(|d| {
                let status = d.status.as_ref();
                let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                let ready = status.and_then(|s| s.ready_replicas).unwrap_or(0);
                let containers = names(d.spec.as_ref().and_then(|s| s.template.spec.as_ref()));
                entry(
                    "deploy",
                    "deployment",
                    &d.metadata,
                    (ready, desired),
                    containers,
                )
            })
            .collect(),
    );
    let sets: Vec<StatefulSet> =
        list(client, namespace, rbac::LIST_STATEFULSETS, "statefulset").await?;
    group(
        sets.iter()
            .map(|s| {
                let desired = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                let ready = s
                    .status
                    .as_ref()
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0);
                let containers = names(s.spec.as_ref().and_then(|s| s.template.spec.as_ref()));
                entry(
                    "sts",
                    "statefulset",
                    &s.metadata,
                    (ready, desired),
                    containers,
                )
            })
            .collect(),
    );
    let daemons: Vec<DaemonSet> =
        list(client, namespace, rbac::LIST_DAEMONSETS, "daemonset").await?;
    group(
        daemons
            .iter()
            .map(|d| {
                let status = d.status.as_ref();
                let counts =
                    status.map_or((0, 0), |s| (s.number_ready, s.desired_number_scheduled));
                let containers = names(d.spec.as_ref().and_then(|s| s.template.spec.as_ref()));
                entry("ds", "daemonset", &d.metadata, counts, containers)
            })
            .collect(),
    );
    let pods: Vec<Pod> = list(client, namespace, rbac::LIST_PODS, "pod").await?;
    group(
        pods.iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| {
                let containers = names(p.spec.as_ref());
                let ready = p
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .map_or(0, |c| c.iter().filter(|c| c.ready).count());
                let counts = (
                    i32::try_from(ready).unwrap_or(i32::MAX),
                    i32::try_from(containers.len()).unwrap_or(i32::MAX),
                );
                entry("pod", "pod", &p.metadata, counts, containers)
            })
            .collect(),
    );
    Ok(out)
}
