//! The Service of `graft expose`: a Service NAME whose selector is the session
//! label of graft's own (targetless) agent pod, so its traffic reaches that pod,
//! where the agent steals the port and sends each connection to the user's
//! machine.
//!
//! ```text
//! client in the cluster ──► Service NAME:P ──► agent pod:P ──(steal)──► graft ──► local port
//! ```
//!
//! The Service is labelled as graft's ([`MANAGED_BY_LABEL`], [`EXPOSE_LABEL`],
//! the session) and owned by the agent's Job (an `ownerReference`), so the
//! garbage collector deletes it with the Job: at the end of the session, when
//! the cluster removes the Job of a crashed session, or by `graft clean`.
//! [`check_name_free`] refuses a NAME that graft did not create, so an existing
//! Service is never taken over.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use crate::KubeError;
use crate::manifest::{MANAGED_BY_LABEL, SESSION_LABEL};
use crate::place::FIELD_MANAGER;
use crate::rbac;

/// The label that marks a Service of `graft expose`; its value is the local port
/// it leads to.
pub const EXPOSE_LABEL: &str = "graft.dev/expose";

/// The Services of `graft expose` (`graft clean`).
pub const EXPOSE_SELECTOR: &str = "app.kubernetes.io/managed-by=graft,graft.dev/expose";

/// The Service NAME in `namespace` whose port `port` leads to the pods labelled
/// with `session`, owned by `owner` (the agent's Job) when given.
pub fn expose_service(
    namespace: &str,
    name: &str,
    port: u16,
    session: &str,
    local_port: u16,
    owner: Option<OwnerReference>,
) -> Service {
    let labels: BTreeMap<String, String> = [
        (MANAGED_BY_LABEL.0, MANAGED_BY_LABEL.1.to_owned()),
        ("app.kubernetes.io/name", "graft-expose".to_owned()),
        (SESSION_LABEL, session.to_owned()),
        (EXPOSE_LABEL, local_port.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([(
                SESSION_LABEL.to_owned(),
                session.to_owned(),
            )])),
            ports: Some(vec![ServicePort {
                name: Some("graft".into()),
                port: i32::from(port),
                target_port: Some(IntOrString::Int(i32::from(port))),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Whether `service` is one of `graft expose`'s, and its session.
pub fn graft_session(service: &Service) -> Option<&str> {
    let labels = service.metadata.labels.as_ref()?;
    if labels.get(MANAGED_BY_LABEL.0).map(String::as_str) != Some(MANAGED_BY_LABEL.1)
        || !labels.contains_key(EXPOSE_LABEL)
    {
        return None;
    }
    labels.get(SESSION_LABEL).map(String::as_str)
}

/// Checks that no Service NAME exists in `namespace`.
///
/// # Errors
///
/// [`KubeError::ServiceTaken`] when one exists (saying whether graft made it),
/// [`KubeError::Forbidden`] without `get services`.
pub async fn check_name_free(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(), KubeError> {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    let existing = api
        .get_opt(name)
        .await
        .map_err(|e| KubeError::from_api(e, rbac::GET_SERVICES, namespace, "service", name))?;
    match existing {
        None => Ok(()),
        Some(service) => Err(KubeError::ServiceTaken {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            owner: match graft_session(&service) {
                Some(session) => format!(
                    "graft session {session} serves it (if that session ended, `graft clean` \
                     removes it)"
                ),
                None => "graft did not create it (pick another name with --as)".to_owned(),
            },
        }),
    }
}

/// The owner reference that makes a Service go with the agent's Job `job`.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `get jobs`, or the Job is gone.
pub async fn job_owner(
    client: &Client,
    namespace: &str,
    job: &str,
) -> Result<OwnerReference, KubeError> {
    let api: Api<Job> = Api::namespaced(client.clone(), namespace);
    let found = api
        .get(job)
        .await
        .map_err(|e| KubeError::from_api(e, rbac::GET_JOBS, namespace, "job", job))?;
    Ok(OwnerReference {
        api_version: "batch/v1".into(),
        kind: "Job".into(),
        name: job.to_owned(),
        uid: found.metadata.uid.unwrap_or_default(),
        block_owner_deletion: Some(false),
        controller: Some(false),
    })
}

/// Creates `service`.
///
/// # Errors
///
/// [`KubeError::ServiceTaken`] when a Service of that name appeared meanwhile,
/// [`KubeError::Forbidden`] without `create services`.
pub async fn create_service(client: &Client, service: &Service) -> Result<(), KubeError> {
    let namespace = service.metadata.namespace.clone().unwrap_or_default();
    let name = service.metadata.name.clone().unwrap_or_default();
    let api: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match api.create(&params, service).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Err(KubeError::ServiceTaken {
            namespace,
            name,
            owner: "it was created meanwhile by someone else".into(),
        }),
        Err(e) => Err(KubeError::from_api(
            e,
            rbac::CREATE_SERVICES,
            &namespace,
            "service",
            &name,
        )),
    }
}

/// Deletes the Service NAME; one already gone is fine.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `delete services`, or another API failure.
pub async fn delete_service(client: &Client, namespace: &str, name: &str) -> Result<(), KubeError> {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(KubeError::from_api(
            e,
            rbac::DELETE_SERVICES,
            namespace,
            "service",
            name,
        )),
    }
}

/// The Services of `graft expose` in `namespace` (every namespace with `None`).
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `list services`, or another API failure.
pub async fn expose_services(
    client: &Client,
    namespace: Option<&str>,
) -> Result<Vec<Service>, KubeError> {
    let api: Api<Service> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let all = crate::error::ALL_NAMESPACES;
    api.list(&ListParams::default().labels(EXPOSE_SELECTOR))
        .await
        .map(|list| list.items)
        .map_err(|e| {
            KubeError::from_api(
                e,
                rbac::LIST_SERVICES,
                namespace.unwrap_or(all),
                "service",
                all,
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_selects_the_session_pod_and_is_owned_by_its_job() {
        let owner = OwnerReference {
            api_version: "batch/v1".into(),
            kind: "Job".into(),
            name: "graft-agent-abc".into(),
            uid: "u-1".into(),
            ..OwnerReference::default()
        };
        let svc = expose_service("shop", "web-dev", 80, "abc", 3000, Some(owner));
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.selector.as_ref().unwrap()[SESSION_LABEL], "abc");
        let port = &spec.ports.as_ref().unwrap()[0];
        assert_eq!(port.port, 80);
        assert_eq!(port.target_port, Some(IntOrString::Int(80)));
        assert_eq!(graft_session(&svc), Some("abc"));
        assert_eq!(
            svc.metadata.owner_references.as_ref().unwrap()[0].uid,
            "u-1"
        );
    }

    #[test]
    fn a_service_graft_did_not_create_is_not_graft_s() {
        let mut svc = expose_service("shop", "web", 80, "abc", 3000, None);
        svc.metadata
            .labels
            .as_mut()
            .unwrap()
            .remove(MANAGED_BY_LABEL.0);
        assert_eq!(graft_session(&svc), None);
        let mut agent_like = expose_service("shop", "web", 80, "abc", 3000, None);
        agent_like
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .remove(EXPOSE_LABEL);
        assert_eq!(graft_session(&agent_like), None);
    }
}
