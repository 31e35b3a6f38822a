//! `--scale-down`: the original workload (a Deployment, StatefulSet or
//! ReplicaSet) is scaled to 0 for a `--copy-target` session, so the copy is
//! the only pod doing its work (a queue consumer, a scheduler), and scaled
//! back at the end.
//!
//! The count is first written into the workload's [`SCALED_DOWN_ANNOTATION`]
//! (`{"session":"…","replicas":3}`, with the workload's `resourceVersion` as
//! a precondition), then the `scale` subresource is set to 0 (what `kubectl
//! scale` and the HorizontalPodAutoscaler use; Kubernetes API reference,
//! "Scale"). [`restore`] does the reverse: it scales back only when the
//! annotation is this session's and the workload is still at 0 (nobody
//! rescaled it since), then removes the annotation. A session killed in
//! between leaves the annotation, which `graft clean` reads to restore the
//! count ([`scaled_down`]); a second session refuses a workload that carries
//! one ([`KubeError::ScaleDownTaken`]).

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::place::FIELD_MANAGER;
use crate::rbac::{self, Permission};
use crate::{KubeError, WorkloadKind};

/// The annotation that records a scale-down: a [`ScaledDown`] as JSON.
pub const SCALED_DOWN_ANNOTATION: &str = "graft.dev/scaled-down";

/// What the annotation records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaledDown {
    /// The session that scaled the workload down.
    pub session: String,
    /// Its replica count before.
    pub replicas: i32,
}

/// A workload graft scaled down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaled {
    /// Its kind: Deployment, StatefulSet or ReplicaSet.
    pub kind: WorkloadKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// What its annotation says.
    pub record: ScaledDown,
    /// Its replica count now.
    pub replicas_now: i32,
}

/// What [`restore`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// Scaled back to this count.
    Scaled(i32),
    /// Someone set the count since (to this): left as it is, annotation
    /// removed.
    LeftAlone(i32),
    /// No annotation of this session (none, or another session's): nothing
    /// done.
    NotOurs,
}

/// Whether `--scale-down` can scale `kind` (it has a `scale` subresource
/// graft uses).
pub fn scalable(kind: WorkloadKind) -> bool {
    matches!(
        kind,
        WorkloadKind::Deployment | WorkloadKind::StatefulSet | WorkloadKind::ReplicaSet
    )
}

fn permissions(kind: WorkloadKind) -> (Permission, Permission) {
    match kind {
        WorkloadKind::StatefulSet => (rbac::PATCH_STATEFULSETS, rbac::PATCH_STATEFULSETS_SCALE),
        WorkloadKind::ReplicaSet => (rbac::PATCH_REPLICASETS, rbac::PATCH_REPLICASETS_SCALE),
        _ => (rbac::PATCH_DEPLOYMENTS, rbac::PATCH_DEPLOYMENTS_SCALE),
    }
}

/// Reads a workload's annotation record, if it has a valid one.
pub fn record_of(annotations: &std::collections::BTreeMap<String, String>) -> Option<ScaledDown> {
    serde_json::from_str(annotations.get(SCALED_DOWN_ANNOTATION)?).ok()
}

/// Scales `kind/name` down to 0 for `session`; returns what it recorded.
///
/// # Errors
///
/// [`KubeError::CopyRefused`] for a kind without a scale or a ReplicaSet a
/// Deployment owns; [`KubeError::ScaleDownTaken`] when it carries a
/// scale-down annotation already; [`KubeError::Forbidden`] without `patch`
/// on the workload or its `scale`; another API failure (the workload changed
/// while graft annotated it: run again).
pub async fn scale_down(
    client: &Client,
    namespace: &str,
    kind: WorkloadKind,
    name: &str,
    session: &str,
) -> Result<ScaledDown, KubeError> {
    match kind {
        WorkloadKind::Deployment => {
            scale_down_typed::<Deployment>(client, namespace, kind, name, session).await
        }
        WorkloadKind::StatefulSet => {
            scale_down_typed::<StatefulSet>(client, namespace, kind, name, session).await
        }
        WorkloadKind::ReplicaSet => {
            scale_down_typed::<ReplicaSet>(client, namespace, kind, name, session).await
        }
        other => Err(KubeError::CopyRefused {
            reason: format!(
                "--scale-down scales a deployment, statefulset or replicaset; the target is a {other}"
            ),
            fix: "drop --scale-down, or target the workload that owns the pods".into(),
        }),
    }
}

trait Workload:
    Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + DeserializeOwned
    + Serialize
    + Debug
{
}
impl<K> Workload for K where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug
{
}

/// `spec.replicas` of a workload (the API server's default is 1).
fn replicas<K: Serialize>(object: &K) -> i32 {
    serde_json::to_value(object)
        .ok()
        .and_then(|v| v["spec"]["replicas"].as_i64())
        .and_then(|n| i32::try_from(n).ok())
        .unwrap_or(1)
}

async fn get<K: Workload>(
    api: &Api<K>,
    kind: WorkloadKind,
    namespace: &str,
    name: &str,
) -> Result<K, KubeError> {
    let (get, _) = match kind {
        WorkloadKind::StatefulSet => (rbac::GET_STATEFULSETS, ()),
        WorkloadKind::ReplicaSet => (rbac::GET_REPLICASETS, ()),
        _ => (rbac::GET_DEPLOYMENTS, ()),
    };
    api.get(name)
        .await
        .map_err(|e| KubeError::from_api(e, get, namespace, kind.as_str(), name))
}

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

async fn set_scale<K: Workload>(
    api: &Api<K>,
    kind: WorkloadKind,
    namespace: &str,
    name: &str,
    replicas: i32,
) -> Result<(), KubeError> {
    let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
    api.patch_scale(name, &params(), &patch)
        .await
        .map(drop)
        .map_err(|e| KubeError::from_api(e, permissions(kind).1, namespace, kind.as_str(), name))
}

async fn set_annotation<K: Workload>(
    api: &Api<K>,
    kind: WorkloadKind,
    namespace: &str,
    name: &str,
    value: Option<&ScaledDown>,
    resource_version: Option<String>,
) -> Result<(), KubeError> {
    let value = value.map(|v| serde_json::to_string(v).expect("a record serializes"));
    let mut metadata = json!({"annotations": {SCALED_DOWN_ANNOTATION: value}});
    if let Some(version) = resource_version {
        // A precondition: 409 when the workload changed since it was read.
        metadata["resourceVersion"] = json!(version);
    }
    api.patch(
        name,
        &params(),
        &Patch::Merge(json!({"metadata": metadata})),
    )
    .await
    .map(drop)
    .map_err(|e| KubeError::from_api(e, permissions(kind).0, namespace, kind.as_str(), name))
}

async fn scale_down_typed<K: Workload>(
    client: &Client,
    namespace: &str,
    kind: WorkloadKind,
    name: &str,
    session: &str,
) -> Result<ScaledDown, KubeError> {
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let workload = get(&api, kind, namespace, name).await?;
    if let Some(held) = record_of(workload.annotations()) {
        return Err(KubeError::ScaleDownTaken {
            workload: format!("{kind}/{name}"),
            namespace: namespace.to_owned(),
            session: held.session,
        });
    }
    if kind == WorkloadKind::ReplicaSet
        && workload
            .owner_references()
            .iter()
            .any(|o| o.controller == Some(true))
    {
        return Err(KubeError::CopyRefused {
            reason: format!(
                "replicaset {name} belongs to a controller that would scale it back at once"
            ),
            fix: "target its deployment with --scale-down".into(),
        });
    }
    let record = ScaledDown {
        session: session.to_owned(),
        replicas: replicas(&workload),
    };
    set_annotation(
        &api,
        kind,
        namespace,
        name,
        Some(&record),
        workload.resource_version(),
    )
    .await?;
    if let Err(e) = set_scale(&api, kind, namespace, name, 0).await {
        // Nothing was scaled: take the record back.
        let _ = set_annotation(&api, kind, namespace, name, None, None).await;
        return Err(e);
    }
    Ok(record)
}

/// Scales `kind/name` back to the count `session` recorded, when its
/// annotation is that session's and the workload is still at 0, and removes
/// the annotation (`session` `None`: whichever session's, for `graft clean`).
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `patch` on the workload or its `scale`,
/// or another API failure; a workload that is gone is
/// [`KubeError::NotFound`].
pub async fn restore(
    client: &Client,
    namespace: &str,
    kind: WorkloadKind,
    name: &str,
    session: Option<&str>,
) -> Result<Restored, KubeError> {
    match kind {
        WorkloadKind::Deployment => {
            restore_typed::<Deployment>(client, namespace, kind, name, session).await
        }
        WorkloadKind::StatefulSet => {
            restore_typed::<StatefulSet>(client, namespace, kind, name, session).await
        }
        WorkloadKind::ReplicaSet => {
            restore_typed::<ReplicaSet>(client, namespace, kind, name, session).await
        }
        _ => Ok(Restored::NotOurs),
    }
}

async fn restore_typed<K: Workload>(
    client: &Client,
    namespace: &str,
    kind: WorkloadKind,
    name: &str,
    session: Option<&str>,
) -> Result<Restored, KubeError> {
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let workload = get(&api, kind, namespace, name).await?;
    let Some(record) = record_of(workload.annotations()) else {
        return Ok(Restored::NotOurs);
    };
    if session.is_some_and(|s| s != record.session) {
        return Ok(Restored::NotOurs);
    }
    let now = replicas(&workload);
    let outcome = if now == 0 {
        set_scale(&api, kind, namespace, name, record.replicas).await?;
        Restored::Scaled(record.replicas)
    } else {
        Restored::LeftAlone(now)
    };
    set_annotation(&api, kind, namespace, name, None, None).await?;
    Ok(outcome)
}

/// The workloads in `namespace` (all with `None`) that carry a scale-down
/// annotation, for `graft clean`. ReplicaSets that a Deployment owns are left
/// out: the Deployment copies its annotations onto them, and it is the
/// Deployment that was scaled.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `list` of one of the kinds, or another API
/// failure.
pub async fn scaled_down(
    client: &Client,
    namespace: Option<&str>,
) -> Result<Vec<Scaled>, KubeError> {
    let mut found = Vec::new();
    found.extend(list::<Deployment>(client, namespace, WorkloadKind::Deployment).await?);
    found.extend(list::<StatefulSet>(client, namespace, WorkloadKind::StatefulSet).await?);
    found.extend(list::<ReplicaSet>(client, namespace, WorkloadKind::ReplicaSet).await?);
    Ok(found)
}

async fn list<K: Workload>(
    client: &Client,
    namespace: Option<&str>,
    kind: WorkloadKind,
) -> Result<Vec<Scaled>, KubeError> {
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let permission = match kind {
        WorkloadKind::StatefulSet => rbac::LIST_STATEFULSETS,
        WorkloadKind::ReplicaSet => rbac::LIST_REPLICASETS,
        _ => rbac::LIST_DEPLOYMENTS,
    };
    let items = match api.list(&ListParams::default()).await {
        Ok(items) => items,
        // A server that does not serve the kind has nothing graft scaled.
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Vec::new()),
        Err(e) => {
            return Err(KubeError::from_api(
                e,
                permission,
                namespace.unwrap_or(crate::error::ALL_NAMESPACES),
                kind.as_str(),
                crate::error::ALL_NAMESPACES,
            ));
        }
    };
    Ok(items
        .items
        .iter()
        .filter(|w| {
            kind != WorkloadKind::ReplicaSet
                || !w
                    .owner_references()
                    .iter()
                    .any(|o| o.controller == Some(true))
        })
        .filter_map(|w| {
            Some(Scaled {
                kind,
                namespace: w.namespace().unwrap_or_default(),
                name: w.name_any(),
                record: record_of(w.annotations())?,
                replicas_now: replicas(w),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_through_the_annotation() {
        let record = ScaledDown {
            session: "0123456789".into(),
            replicas: 3,
        };
        let text = serde_json::to_string(&record).unwrap();
        assert_eq!(text, r#"{"session":"0123456789","replicas":3}"#);
        let annotations = [(SCALED_DOWN_ANNOTATION.to_owned(), text)].into();
        assert_eq!(record_of(&annotations), Some(record));
        let bad = [(SCALED_DOWN_ANNOTATION.to_owned(), "3".to_owned())].into();
        assert_eq!(record_of(&bad), None, "not graft's record");
        assert_eq!(record_of(&Default::default()), None);
    }

    #[test]
    fn replicas_default_to_one() {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {"selector": {}, "template": {}},
        }))
        .unwrap();
        assert_eq!(replicas(&d), 1);
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {"replicas": 4, "selector": {}, "template": {}},
        }))
        .unwrap();
        assert_eq!(replicas(&d), 4);
    }

    #[test]
    fn only_workloads_with_a_scale_are_scaled() {
        assert!(scalable(WorkloadKind::Deployment));
        assert!(scalable(WorkloadKind::StatefulSet));
        assert!(scalable(WorkloadKind::ReplicaSet));
        for kind in [
            WorkloadKind::Pod,
            WorkloadKind::DaemonSet,
            WorkloadKind::Job,
            WorkloadKind::CronJob,
            WorkloadKind::Rollout,
        ] {
            assert!(!scalable(kind), "{kind}");
        }
        assert_eq!(
            permissions(WorkloadKind::StatefulSet).1.to_string(),
            "patch statefulsets.apps/scale"
        );
    }
}
