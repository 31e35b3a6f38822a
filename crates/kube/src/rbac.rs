//! Every Kubernetes API permission graft uses, as data.
//!
//! Each request this crate makes names its [`Permission`] (that is where a
//! `403 Forbidden` is turned into a [`KubeError::Forbidden`](crate::KubeError)
//! naming the verb and resource), and [`ALL`] lists them. The tests check that
//! `deploy/rbac.yaml` grants exactly [`ALL`], so the manifest an administrator
//! applies cannot drift from what the code does. `graft doctor` can check the
//! same list with `SelfSubjectAccessReview`s.
//!
//! Discovery (`/api`, `/apis`, used to find the Argo Rollouts kind) is a
//! non-resource URL that every authenticated user may read through the
//! built-in `system:discovery` role, so it is not listed.

use std::fmt;

/// One RBAC permission: a verb on a (sub)resource of an API group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Permission {
    /// The API group, `""` for the core group.
    pub group: &'static str,
    /// The resource, with its subresource if any (`pods/ephemeralcontainers`),
    /// as RBAC rules spell it.
    pub resource: &'static str,
    /// The verb (`get`, `list`, `watch`, `create`, `patch`, `delete`).
    pub verb: &'static str,
    /// What graft does with it, for `graft doctor` and error messages.
    pub why: &'static str,
}

impl fmt::Display for Permission {
    /// `get deployments.apps`, `patch pods/ephemeralcontainers`: the words
    /// `kubectl auth can-i` takes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (resource, sub) = match self.resource.split_once('/') {
            Some((resource, sub)) => (resource, Some(sub)),
            None => (self.resource, None),
        };
        write!(f, "{} {resource}", self.verb)?;
        if !self.group.is_empty() {
            write!(f, ".{}", self.group)?;
        }
        if let Some(sub) = sub {
            write!(f, "/{sub}")?;
        }
        Ok(())
    }
}

const fn core(resource: &'static str, verb: &'static str, why: &'static str) -> Permission {
    Permission {
        group: "",
        resource,
        verb,
        why,
    }
}

const fn grouped(
    group: &'static str,
    resource: &'static str,
    verb: &'static str,
    why: &'static str,
) -> Permission {
    Permission {
        group,
        resource,
        verb,
        why,
    }
}

/// Read a pod named by a target, or the agent's pod.
pub const GET_PODS: Permission = core("pods", "get", "read the target pod");
/// List the pods a workload's selector matches.
pub const LIST_PODS: Permission = core("pods", "list", "find the ready pods of a workload");
/// Watch a pod until the agent's container runs.
pub const WATCH_PODS: Permission = core("pods", "watch", "wait for the agent to start");
/// Delete agent pods that no Job owns (`graft clean`, for pods of graft
/// versions before agent Jobs).
pub const DELETE_PODS: Permission = core("pods", "delete", "remove a left-over agent pod");
/// Start the node-mode (or targetless) agent: a Job the cluster removes when
/// the agent exits.
pub const CREATE_JOBS: Permission = grouped(
    "batch",
    "jobs",
    "create",
    "start the node-mode agent (a Job)",
);
/// Delete the node-mode agent's Job (session end, `graft clean`).
pub const DELETE_JOBS: Permission = grouped(
    "batch",
    "jobs",
    "delete",
    "remove the node-mode agent's Job",
);
/// Add the agent as an ephemeral container.
pub const PATCH_EPHEMERAL_CONTAINERS: Permission = core(
    "pods/ephemeralcontainers",
    "patch",
    "add the agent as an ephemeral container",
);
/// Read the agent's `ready` line from its log.
pub const GET_POD_LOGS: Permission = core("pods/log", "get", "read the agent's ready line");
/// Open a port-forward to the agent. kube-rs port-forwards over WebSocket,
/// an HTTP GET, which the API server authorizes as `get`; clusters from 1.35
/// on (and earlier ones with `AuthorizePodWebsocketUpgradeCreatePermission`)
/// also ask for `create`, as they do for SPDY. graft asks for both.
pub const GET_PORTFORWARD: Permission = core(
    "pods/portforward",
    "get",
    "connect to the agent (WebSocket)",
);
/// See [`GET_PORTFORWARD`].
pub const CREATE_PORTFORWARD: Permission =
    core("pods/portforward", "create", "connect to the agent");
/// List a pod's events to explain why the agent did not start.
pub const LIST_EVENTS: Permission = core("events", "list", "explain why the agent did not start");
/// Read a Deployment target.
pub const GET_DEPLOYMENTS: Permission =
    grouped("apps", "deployments", "get", "resolve deployment/NAME");
/// List Deployments to say which exist when a name is not found.
pub const LIST_DEPLOYMENTS: Permission = grouped(
    "apps",
    "deployments",
    "list",
    "list deployments when a name is not found",
);
/// Read a StatefulSet target.
pub const GET_STATEFULSETS: Permission =
    grouped("apps", "statefulsets", "get", "resolve statefulset/NAME");
/// List StatefulSets when a name is not found.
pub const LIST_STATEFULSETS: Permission = grouped(
    "apps",
    "statefulsets",
    "list",
    "list statefulsets when a name is not found",
);
/// Read a DaemonSet target.
pub const GET_DAEMONSETS: Permission =
    grouped("apps", "daemonsets", "get", "resolve daemonset/NAME");
/// List DaemonSets when a name is not found.
pub const LIST_DAEMONSETS: Permission = grouped(
    "apps",
    "daemonsets",
    "list",
    "list daemonsets when a name is not found",
);
/// Read a ReplicaSet target.
pub const GET_REPLICASETS: Permission =
    grouped("apps", "replicasets", "get", "resolve replicaset/NAME");
/// List ReplicaSets when a name is not found.
pub const LIST_REPLICASETS: Permission = grouped(
    "apps",
    "replicasets",
    "list",
    "list replicasets when a name is not found",
);
/// Read a Job target.
pub const GET_JOBS: Permission = grouped("batch", "jobs", "get", "resolve job/NAME");
/// List Jobs: a CronJob's running jobs, which exist when a name is not found,
/// and graft's own agent Jobs (`graft clean`, the wait for an agent's pod).
pub const LIST_JOBS: Permission = grouped(
    "batch",
    "jobs",
    "list",
    "find a cronjob's running job or graft's agent jobs",
);
/// Read a CronJob target.
pub const GET_CRONJOBS: Permission = grouped("batch", "cronjobs", "get", "resolve cronjob/NAME");
/// List CronJobs when a name is not found.
pub const LIST_CRONJOBS: Permission = grouped(
    "batch",
    "cronjobs",
    "list",
    "list cronjobs when a name is not found",
);
/// Read an Argo Rollouts Rollout target.
pub const GET_ROLLOUTS: Permission =
    grouped("argoproj.io", "rollouts", "get", "resolve rollout/NAME");
/// List Rollouts when a name is not found.
pub const LIST_ROLLOUTS: Permission = grouped(
    "argoproj.io",
    "rollouts",
    "list",
    "list rollouts when a name is not found",
);

/// Read the namespace's Pod Security labels (`graft doctor`). A RoleBinding
/// in a namespace grants this on that namespace itself.
pub const GET_NAMESPACES: Permission = core(
    "namespaces",
    "get",
    "read the namespace's Pod Security labels (graft doctor)",
);

/// `graft expose`: find whether a Service of that name exists, and whose.
pub const GET_SERVICES: Permission = core(
    "services",
    "get",
    "check that graft expose does not take over a Service it did not create",
);

/// `graft expose`: create the Service that leads to the local port.
pub const CREATE_SERVICES: Permission =
    core("services", "create", "create the Service of graft expose");

/// `graft expose` and `graft clean`: delete the Service at the end.
pub const DELETE_SERVICES: Permission = core(
    "services",
    "delete",
    "delete the Service of graft expose (and what graft clean finds)",
);

/// `graft clean`: find the Services of crashed `graft expose` sessions.
pub const LIST_SERVICES: Permission = core(
    "services",
    "list",
    "find the Services crashed graft expose sessions left (graft clean)",
);

/// `--copy-target`: create the copy of the target pod (deleted with
/// [`DELETE_PODS`]).
pub const CREATE_PODS: Permission = core(
    "pods",
    "create",
    "create the copy of the target (--copy-target)",
);

/// `--scale-down`: record the replica count in a Deployment's annotation.
pub const PATCH_DEPLOYMENTS: Permission = grouped(
    "apps",
    "deployments",
    "patch",
    "record the replica count of a deployment graft scales down (--scale-down)",
);
/// `--scale-down`: record the replica count in a StatefulSet's annotation.
pub const PATCH_STATEFULSETS: Permission = grouped(
    "apps",
    "statefulsets",
    "patch",
    "record the replica count of a statefulset graft scales down (--scale-down)",
);
/// `--scale-down`: record the replica count in a ReplicaSet's annotation.
pub const PATCH_REPLICASETS: Permission = grouped(
    "apps",
    "replicasets",
    "patch",
    "record the replica count of a replicaset graft scales down (--scale-down)",
);
/// `--scale-down`: scale a Deployment to 0 and back.
pub const PATCH_DEPLOYMENTS_SCALE: Permission = grouped(
    "apps",
    "deployments/scale",
    "patch",
    "scale a deployment to 0 and back (--scale-down)",
);
/// `--scale-down`: scale a StatefulSet to 0 and back.
pub const PATCH_STATEFULSETS_SCALE: Permission = grouped(
    "apps",
    "statefulsets/scale",
    "patch",
    "scale a statefulset to 0 and back (--scale-down)",
);
/// `--scale-down`: scale a ReplicaSet to 0 and back.
pub const PATCH_REPLICASETS_SCALE: Permission = grouped(
    "apps",
    "replicasets/scale",
    "patch",
    "scale a replicaset to 0 and back (--scale-down)",
);

/// The permissions only `--copy-target` and `--scale-down` need (`graft
/// doctor` warns, rather than fails, when they are missing).
pub const COPY_ONLY: &[Permission] = &[
    CREATE_PODS,
    PATCH_DEPLOYMENTS,
    PATCH_STATEFULSETS,
    PATCH_REPLICASETS,
    PATCH_DEPLOYMENTS_SCALE,
    PATCH_STATEFULSETS_SCALE,
    PATCH_REPLICASETS_SCALE,
];

/// Every permission graft uses; `deploy/rbac.yaml` grants exactly these.
pub const ALL: &[Permission] = &[
    GET_PODS,
    LIST_PODS,
    WATCH_PODS,
    DELETE_PODS,
    CREATE_JOBS,
    DELETE_JOBS,
    PATCH_EPHEMERAL_CONTAINERS,
    GET_POD_LOGS,
    GET_PORTFORWARD,
    CREATE_PORTFORWARD,
    LIST_EVENTS,
    GET_DEPLOYMENTS,
    LIST_DEPLOYMENTS,
    GET_STATEFULSETS,
    LIST_STATEFULSETS,
    GET_DAEMONSETS,
    LIST_DAEMONSETS,
    GET_REPLICASETS,
    LIST_REPLICASETS,
    GET_JOBS,
    LIST_JOBS,
    GET_CRONJOBS,
    LIST_CRONJOBS,
    GET_ROLLOUTS,
    LIST_ROLLOUTS,
    GET_NAMESPACES,
    GET_SERVICES,
    CREATE_SERVICES,
    DELETE_SERVICES,
    LIST_SERVICES,
    CREATE_PODS,
    PATCH_DEPLOYMENTS,
    PATCH_STATEFULSETS,
    PATCH_REPLICASETS,
    PATCH_DEPLOYMENTS_SCALE,
    PATCH_STATEFULSETS_SCALE,
    PATCH_REPLICASETS_SCALE,
];

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::rbac::v1::PolicyRule;
    use std::collections::BTreeSet;

    /// The part of a Role or ClusterRole the check needs.
    #[derive(serde::Deserialize)]
    struct RoleDoc {
        kind: String,
        #[serde(default)]
        rules: Vec<PolicyRule>,
    }

    type Grant = (String, String, String);

    fn granted() -> BTreeSet<Grant> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/rbac.yaml");
        let text = std::fs::read_to_string(path).expect("deploy/rbac.yaml is in the repository");
        let docs: Vec<RoleDoc> = serde_saphyr::from_multiple(&text).expect("rbac.yaml parses");
        let mut granted = BTreeSet::new();
        let roles: Vec<&RoleDoc> = docs
            .iter()
            .filter(|d| d.kind == "ClusterRole" || d.kind == "Role")
            .collect();
        assert!(!roles.is_empty(), "rbac.yaml holds no Role or ClusterRole");
        for role in roles {
            for rule in &role.rules {
                let groups = rule.api_groups.clone().unwrap_or_default();
                let resources = rule.resources.clone().unwrap_or_default();
                for g in &groups {
                    for r in &resources {
                        for v in &rule.verbs {
                            assert!(
                                g != "*" && r != "*" && v != "*",
                                "rbac.yaml must not use wildcards"
                            );
                            granted.insert((g.clone(), r.clone(), v.clone()));
                        }
                    }
                }
            }
        }
        granted
    }

    fn used() -> BTreeSet<Grant> {
        ALL.iter()
            .map(|p| (p.group.into(), p.resource.into(), p.verb.into()))
            .collect()
    }

    #[test]
    fn rbac_yaml_grants_every_permission_the_code_uses() {
        let missing: Vec<_> = used().difference(&granted()).cloned().collect();
        assert!(missing.is_empty(), "deploy/rbac.yaml lacks {missing:?}");
    }

    #[test]
    fn rbac_yaml_grants_nothing_the_code_does_not_use() {
        let extra: Vec<_> = granted().difference(&used()).cloned().collect();
        assert!(extra.is_empty(), "deploy/rbac.yaml grants unused {extra:?}");
    }

    /// A permission constant that is declared but not in [`ALL`] would escape
    /// the checks above; so would a request made without naming one.
    #[test]
    fn every_declared_permission_is_in_all_and_every_request_names_one() {
        let me = include_str!("rbac.rs");
        let declared: Vec<&str> = me
            .lines()
            .filter_map(|line| line.strip_prefix("pub const ")?.split_once(':'))
            .filter(|(_, ty)| ty.trim_start().starts_with("Permission"))
            .map(|(name, _)| name)
            .collect();
        assert_eq!(
            declared.len(),
            ALL.len(),
            "a Permission constant is missing from ALL"
        );
        assert_eq!(used().len(), ALL.len(), "ALL lists a permission twice");

        // Every constant is used by some request in the crate.
        let sources = [
            include_str!("resolve.rs"),
            include_str!("place.rs"),
            include_str!("job.rs"),
            include_str!("clean.rs"),
            include_str!("events.rs"),
            include_str!("doctor.rs"),
            include_str!("expose.rs"),
            include_str!("copy.rs"),
            include_str!("scale.rs"),
        ]
        .concat();
        for name in declared {
            assert!(
                sources.contains(&format!("rbac::{name}")),
                "rbac::{name} is granted but no request uses it"
            );
        }
    }

    #[test]
    fn display_is_what_kubectl_auth_can_i_takes() {
        assert_eq!(GET_DEPLOYMENTS.to_string(), "get deployments.apps");
        assert_eq!(
            PATCH_EPHEMERAL_CONTAINERS.to_string(),
            "patch pods/ephemeralcontainers"
        );
        assert_eq!(GET_ROLLOUTS.to_string(), "get rollouts.argoproj.io");
    }
}
