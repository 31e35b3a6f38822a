//! [`KubeError`]: everything that can go wrong between graft and a cluster,
//! each message saying what to do next.
//!
//! API failures enter through [`KubeError::from_api`], which is given the
//! [`Permission`] the request needed, so a `403` names the verb and resource
//! to ask for, and a Pod Security rejection is told apart from RBAC.

use crate::rbac::Permission;
use crate::target::ParseTargetError;

/// The namespace given to [`KubeError::from_api`] for a request across all
/// namespaces (`graft clean -A`): its messages then speak of cluster-wide
/// access and a ClusterRoleBinding, and suggest `kubectl auth can-i …
/// --all-namespaces`.
pub const ALL_NAMESPACES: &str = "(all)";

/// How a [`KubeError::Forbidden`] names where it was refused.
struct Scope<'a>(&'a str);

impl Scope<'_> {
    fn all(&self) -> bool {
        self.0 == ALL_NAMESPACES
    }

    fn describe(&self) -> String {
        if self.all() {
            "in all namespaces (cluster-wide)".to_owned()
        } else {
            format!("in namespace {:?}", self.0)
        }
    }

    fn binding(&self) -> &'static str {
        if self.all() {
            " with a ClusterRoleBinding"
        } else {
            ""
        }
    }

    fn can_i_flag(&self) -> String {
        if self.all() {
            "--all-namespaces".to_owned()
        } else {
            format!("-n {}", self.0)
        }
    }
}

/// An error from resolving a target, placing the agent or reaching it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubeError {
    /// The target string does not parse.
    #[error(transparent)]
    Target(#[from] ParseTargetError),

    /// No usable kubeconfig or in-cluster configuration.
    #[error(
        "could not load the Kubernetes configuration: {error}; set KUBECONFIG or pass \
         --kubeconfig, and check the context with `kubectl config current-context`"
    )]
    Config {
        /// Why loading failed.
        error: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The named object does not exist in the namespace.
    #[error(
        "{kind} {name:?} not found in namespace {namespace:?}; {}",
        existing_hint(kind, existing)
    )]
    NotFound {
        /// The kind (`deployment`, `pod`, …).
        kind: String,
        /// The name looked for.
        name: String,
        /// The namespace looked in.
        namespace: String,
        /// Names of that kind that do exist there (at most a few dozen), if
        /// they could be listed.
        existing: Option<Vec<String>>,
    },

    /// RBAC denied a request.
    #[error(
        "not allowed to {permission} {scope} (needed to {why}): ask a cluster admin to bind the \
         `graft` ClusterRole from deploy/rbac.yaml{binding}, or check with \
         `kubectl auth can-i {permission} {flag}`",
        why = permission.why,
        scope = Scope(namespace).describe(),
        binding = Scope(namespace).binding(),
        flag = Scope(namespace).can_i_flag(),
    )]
    Forbidden {
        /// The permission the request needed.
        permission: Permission,
        /// The namespace of the request, or [`ALL_NAMESPACES`] for a
        /// cluster-wide one.
        namespace: String,
        /// The API server's message.
        message: String,
    },

    /// An admission check (Pod Security, a policy engine) rejected what graft
    /// sent, which RBAC had allowed.
    #[error(
        "the cluster refused the agent: {message}; the agent needs NET_ADMIN, SYS_ADMIN, \
         SYS_PTRACE and NET_RAW (node mode also hostPID), which only the `privileged` Pod Security level \
         admits: ask for the namespace to be labelled \
         pod-security.kubernetes.io/enforce=privileged, or run graft in a namespace that is"
    )]
    AdmissionRejected {
        /// The API server's message.
        message: String,
    },

    /// A workload's selector matches no pod that is ready (after waiting
    /// for one, when `waited_secs` says so).
    #[error(
        "{target} in namespace {namespace:?} has no ready pod{}{}; wait until \
         `kubectl get pods -n {namespace} -l {selector}` shows one ready{}, or target a pod \
         with pod/NAME",
        waited(*waited_secs),
        not_ready_list(not_ready),
        if waited_secs.is_some() { " (or wait longer: `ready_timeout` under [kube] in graft.toml)" } else { "" }
    )]
    NoReadyPod {
        /// The target, as written canonically.
        target: String,
        /// The namespace.
        namespace: String,
        /// The label selector used.
        selector: String,
        /// Pods that matched but are not ready, with why (`api-1 (Pending)`).
        not_ready: Vec<String>,
        /// Whether one of them may still become Ready (it runs or starts,
        /// nothing fatal in its way), so waiting is worth it.
        becoming_ready: bool,
        /// How long graft waited for one to become Ready, if it did.
        waited_secs: Option<u64>,
    },

    /// A workload without a usable selector (empty, or an unsupported operator).
    #[error("{target} has no usable pod selector ({reason}); target one of its pods with pod/NAME")]
    NoSelector {
        /// The target.
        target: String,
        /// What is wrong with the selector.
        reason: String,
    },

    /// A CronJob has no job running now.
    #[error(
        "cronjob {name:?} has no running job in namespace {namespace:?}; graft attaches to a \
         running job's pod: wait for the next run, or start one with \
         `kubectl create job --from=cronjob/{name} {name}-graft -n {namespace}`"
    )]
    NoRunningJob {
        /// The CronJob's name.
        name: String,
        /// The namespace.
        namespace: String,
    },

    /// The Argo Rollouts CRD is not installed.
    #[error(
        "rollout/{name}: this cluster has no Rollout kind (argoproj.io), so Argo Rollouts is \
         not installed; target the deployment or pod instead"
    )]
    RolloutsNotInstalled {
        /// The rollout's name.
        name: String,
    },

    /// The asked-for container is not in the pod.
    #[error(
        "pod {pod:?} has no container {container:?}; its containers are {}: add \
         /container/NAME with one of them",
        available.join(", ")
    )]
    ContainerNotFound {
        /// The pod.
        pod: String,
        /// The container asked for.
        container: String,
        /// The pod's containers.
        available: Vec<String>,
    },

    /// The chosen container is not running, so it has no process to attach to.
    #[error(
        "container {container:?} of pod {pod:?} is not running ({state}); graft needs its \
         process: check `kubectl describe pod {pod}`"
    )]
    ContainerNotRunning {
        /// The pod.
        pod: String,
        /// The container.
        container: String,
        /// Its state (`waiting: CrashLoopBackOff`, `terminated: Completed`, …).
        state: String,
    },

    /// The pod shares one process namespace between its containers, so PID 1
    /// in an ephemeral container is the pause process, not the target.
    #[error(
        "pod {pod:?} sets shareProcessNamespace, so an ephemeral agent cannot tell the target \
         container's process by its PID; use --agent-mode node"
    )]
    SharedProcessNamespace {
        /// The pod.
        pod: String,
    },

    /// The pod was deleted and re-created under the same name (a StatefulSet
    /// pod, say) between resolution and placement.
    #[error("pod {pod:?} was replaced since graft chose it; run graft again to target the new one")]
    PodReplaced {
        /// The pod.
        pod: String,
    },

    /// The cluster does not serve `pods/ephemeralcontainers`.
    #[error(
        "this cluster does not support ephemeral containers (Kubernetes 1.25 or newer is \
         needed): use --agent-mode node"
    )]
    EphemeralContainersUnsupported,

    /// The agent's container or pod failed to start.
    #[error(
        "the agent did not start in pod {pod:?}: {reason}{}{}",
        hint_for(reason),
        events_list(events)
    )]
    AgentFailed {
        /// The pod that holds the agent.
        pod: String,
        /// The container state's reason and message (`ImagePullBackOff: …`).
        reason: String,
        /// The pod's recent events, oldest first (`Failed: pulling image …`).
        events: Vec<String>,
    },

    /// The agent did not become ready in time.
    #[error(
        "the agent in pod {pod:?} was not ready after {waited_secs} s (last state: {state}){}; \
         check `kubectl describe pod {pod}`",
        events_list(events)
    )]
    AgentTimeout {
        /// The pod that holds the agent.
        pod: String,
        /// How long graft waited.
        waited_secs: u64,
        /// The last state seen.
        state: String,
        /// The pod's recent events, oldest first.
        events: Vec<String>,
    },

    /// `graft expose` found a Service of that name that it must not replace.
    #[error(
        "a Service {name:?} already exists in namespace {namespace:?} and {owner}: graft \
         expose does not replace it"
    )]
    ServiceTaken {
        /// The Service's namespace.
        namespace: String,
        /// The Service's name.
        name: String,
        /// Who holds it, in words (`graft did not create it`, `graft session S
        /// serves it`).
        owner: String,
    },

    /// `--copy-target`: the copy of the target did not start.
    #[error(
        "the copy {pod:?} of the target did not start: {reason}{}; check `kubectl describe pod \
         {pod}` (graft deleted the copy)",
        events_list(events)
    )]
    CopyFailed {
        /// The copy.
        pod: String,
        /// Why (`waiting: RunContainerError (exec: "sleep": executable file
        /// not found)`, `Unschedulable: …`).
        reason: String,
        /// The copy's recent events, oldest first.
        events: Vec<String>,
    },

    /// `--copy-target` / `--scale-down` cannot be used as asked.
    #[error("{reason}: {fix}")]
    CopyRefused {
        /// Why.
        reason: String,
        /// What to do instead.
        fix: String,
    },

    /// `--scale-down`: the workload carries a scale-down record already.
    #[error(
        "{workload} in namespace {namespace:?} is scaled down by graft session {session} \
         already; wait for that session to end, or run `graft clean -n {namespace}` if it \
         crashed (it restores the replica count)"
    )]
    ScaleDownTaken {
        /// `deployment/web`.
        workload: String,
        /// Its namespace.
        namespace: String,
        /// The session that holds it.
        session: String,
    },

    /// Any other API failure.
    #[error("Kubernetes API request failed ({action}): {error}")]
    Api {
        /// What graft was doing.
        action: String,
        /// The client's error.
        error: Box<kube::Error>,
    },
}

impl KubeError {
    /// Turns a failed request into the error a user can act on: `404` into
    /// [`KubeError::NotFound`] (without the list of what exists; callers add
    /// it), `403` into [`KubeError::Forbidden`] or, when an admission
    /// controller refused, [`KubeError::AdmissionRejected`].
    pub fn from_api(
        source: kube::Error,
        permission: Permission,
        namespace: &str,
        kind: &str,
        name: &str,
    ) -> KubeError {
        if let kube::Error::Api(status) = &source {
            if status.code == 404 {
                return KubeError::NotFound {
                    kind: kind.to_owned(),
                    name: name.to_owned(),
                    namespace: namespace.to_owned(),
                    existing: None,
                };
            }
            if status.code == 403 {
                if is_admission_message(&status.message) {
                    return KubeError::AdmissionRejected {
                        message: status.message.clone(),
                    };
                }
                return KubeError::Forbidden {
                    permission,
                    namespace: namespace.to_owned(),
                    message: status.message.clone(),
                };
            }
            if status.code == 422 && is_admission_message(&status.message) {
                return KubeError::AdmissionRejected {
                    message: status.message.clone(),
                };
            }
        }
        KubeError::Api {
            action: format!("{permission} {name:?} in namespace {namespace:?}"),
            error: Box::new(source),
        }
    }

    /// Whether the object was not found.
    pub fn is_not_found(&self) -> bool {
        matches!(self, KubeError::NotFound { .. })
    }

    /// Whether RBAC denied a request; [`KubeError::Forbidden`] names which.
    pub fn is_forbidden(&self) -> bool {
        matches!(self, KubeError::Forbidden { .. })
    }

    /// Whether the agent could not be started or did not become ready.
    pub fn is_agent_failure(&self) -> bool {
        matches!(
            self,
            KubeError::AgentFailed { .. }
                | KubeError::AgentTimeout { .. }
                | KubeError::AdmissionRejected { .. }
        )
    }
}

/// Pod Security admission and policy engines (Kyverno, Gatekeeper) answer
/// `403 Forbidden` like RBAC does; their messages tell them apart.
pub(crate) fn is_admission_message(message: &str) -> bool {
    message.contains("violates PodSecurity")
        || message.contains("admission webhook")
        || message.contains("denied the request")
}

fn existing_hint(kind: &str, existing: &Option<Vec<String>>) -> String {
    match existing {
        Some(names) if names.is_empty() => {
            format!("there is no {kind} in it: check the namespace (-n/--namespace)")
        }
        Some(names) => format!(
            "the {kind}s there are: {} (or check the namespace, -n/--namespace)",
            names.join(", ")
        ),
        None => "check the name and the namespace (-n/--namespace)".to_owned(),
    }
}

fn waited(secs: Option<u64>) -> String {
    secs.map(|s| format!(" after waiting {s} s"))
        .unwrap_or_default()
}

fn not_ready_list(not_ready: &[String]) -> String {
    if not_ready.is_empty() {
        " (its selector matches no pod at all)".to_owned()
    } else {
        format!(" (not ready: {})", not_ready.join(", "))
    }
}

fn events_list(events: &[String]) -> String {
    if events.is_empty() {
        String::new()
    } else {
        format!("\n  events:\n    {}", events.join("\n    "))
    }
}

fn hint_for(reason: &str) -> &'static str {
    if reason.starts_with("ImagePullBackOff")
        || reason.starts_with("ErrImagePull")
        || reason.starts_with("InvalidImageName")
    {
        "; the node cannot pull the agent image: check --agent-image, or load the image \
         into the cluster (`graft agent-image --output graft-agent.tar`, then \
         `kind load image-archive graft-agent.tar`)"
    } else if reason.starts_with("FailedScheduling") || reason.contains("Unschedulable") {
        "; the agent pod could not be scheduled on the target's node"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rbac;

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure(message, "Forbidden")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn forbidden_names_verb_and_resource() {
        let e = KubeError::from_api(
            api_error(
                403,
                "pods \"api\" is forbidden: User \"bob\" cannot patch resource",
            ),
            rbac::PATCH_EPHEMERAL_CONTAINERS,
            "shop",
            "pod",
            "api",
        );
        assert!(e.is_forbidden());
        let msg = e.to_string();
        assert!(
            msg.contains("not allowed to patch pods/ephemeralcontainers"),
            "{msg}"
        );
        assert!(
            msg.contains("kubectl auth can-i patch pods/ephemeralcontainers -n shop"),
            "{msg}"
        );
        assert!(msg.contains("deploy/rbac.yaml"), "{msg}");
    }

    #[test]
    fn forbidden_across_namespaces_asks_for_cluster_wide_access() {
        let e = KubeError::from_api(
            api_error(
                403,
                "pods is forbidden: cannot list resource \"pods\" at the cluster scope",
            ),
            rbac::LIST_PODS,
            ALL_NAMESPACES,
            "pod",
            ALL_NAMESPACES,
        );
        let msg = e.to_string();
        assert!(
            msg.contains("not allowed to list pods in all namespaces"),
            "{msg}"
        );
        assert!(msg.contains("ClusterRoleBinding"), "{msg}");
        assert!(
            msg.contains("kubectl auth can-i list pods --all-namespaces"),
            "{msg}"
        );
        assert!(!msg.contains("(all)"), "{msg}");
    }

    #[test]
    fn pod_security_rejection_is_not_rbac() {
        let e = KubeError::from_api(
            api_error(
                403,
                "pods \"x\" is forbidden: violates PodSecurity \"baseline:latest\": non-default \
                 capabilities",
            ),
            rbac::PATCH_EPHEMERAL_CONTAINERS,
            "shop",
            "pod",
            "x",
        );
        assert!(matches!(e, KubeError::AdmissionRejected { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("pod-security.kubernetes.io/enforce=privileged")
        );
    }

    #[test]
    fn not_found_lists_what_exists_or_points_at_the_namespace() {
        let mut e = KubeError::from_api(
            api_error(404, "not found"),
            rbac::GET_DEPLOYMENTS,
            "shop",
            "deployment",
            "apx",
        );
        assert!(e.is_not_found());
        if let KubeError::NotFound { existing, .. } = &mut e {
            *existing = Some(vec!["api".into(), "web".into()]);
        }
        assert_eq!(
            e.to_string(),
            "deployment \"apx\" not found in namespace \"shop\"; the deployments there are: \
             api, web (or check the namespace, -n/--namespace)"
        );
        if let KubeError::NotFound { existing, .. } = &mut e {
            *existing = Some(vec![]);
        }
        assert!(
            e.to_string()
                .contains("there is no deployment in it: check the namespace")
        );
    }

    #[test]
    fn image_pull_failure_says_how_to_load_the_image() {
        let e = KubeError::AgentFailed {
            pod: "api-1".into(),
            reason: "ImagePullBackOff: Back-off pulling image \"graft-agent:0.1.0\"".into(),
            events: vec!["Warning Failed: Failed to pull image".into()],
        };
        let msg = e.to_string();
        assert!(msg.contains("kind load image-archive"), "{msg}");
        assert!(msg.contains("events:\n    Warning Failed"), "{msg}");
        assert!(e.is_agent_failure());
    }
}
