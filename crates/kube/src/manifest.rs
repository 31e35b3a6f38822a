//! What graft sends to the cluster to place the agent, as pure functions:
//! the ephemeral container (default mode) and the node-mode pod. Snapshot and
//! structural tests pin both down.
//!
//! Inputs are the [`ResolvedTarget`] and [`AgentOptions`]; outputs are
//! k8s-openapi objects that `place` sends unchanged.
//!
//! # Which PID the agent targets
//!
//! An ephemeral container with `targetContainerName` joins the target
//! container's PID namespace (where the runtime supports it, which
//! containerd and CRI-O do). In that namespace PID 1 is the target
//! container's main process — its entrypoint — so the agent runs with
//! `--target-pid 1` and finds the target's network namespace, root and
//! environment under `/proc/1`. Two exceptions:
//! - `shareProcessNamespace: true` pods have one PID namespace whose PID 1 is
//!   the pause process; graft refuses the ephemeral mode for them
//!   ([`KubeError::SharedProcessNamespace`](crate::KubeError)) and node mode
//!   finds the process by container ID instead;
//! - a container whose entrypoint is a shell that forks the real server still
//!   has the shell as PID 1: its namespaces and root are the container's, so
//!   networking and files are right, and its environment is the container's
//!   spec environment (what a forked child inherits).
//!
//! In node mode the agent runs with `hostPID` and is given the container ID
//! (`--target-container-id`); it finds the container's process by matching
//! that ID in `/proc/*/cgroup`, which works for every runtime.
//!
//! # The session secret never appears in a spec
//!
//! An ephemeral container's spec (and a pod's) is readable by everyone who
//! may `get pods` in the namespace, is kept in etcd and shows up in audit
//! logs, so `GRAFT_AGENT_SECRET` cannot be put there. graft puts the SHA-256
//! digest of the secret in `GRAFT_AGENT_SECRET_SHA256` instead; the secret
//! itself only travels in the `Hello` of the handshake, inside the
//! port-forward (TLS to the API server, then the kubelet's stream). The agent
//! hashes the secret a client presents and compares digests in constant
//! time. The digest does not help an attacker: the secret is 32 random bytes,
//! so it cannot be recovered from its hash or guessed, and the agent listens
//! only on the pod's loopback. Other choices were weighed: a Kubernetes Secret
//! mounted into the agent needs `create secrets` (and ephemeral containers
//! cannot mount new volumes); writing the secret to the agent's stdin through
//! `pods/attach` adds a verb, a WebSocket round trip and a race with the
//! agent's start; a challenge–response would change the wire protocol for no
//! gain over a hash of a high-entropy secret.
//!
//! # Listening port
//!
//! The agent is told `--listen tcp:127.0.0.1:0`: the kernel picks a free port
//! in the target's network namespace (which every container of the pod shares,
//! so a fixed port could collide with the application or with another graft
//! session on the same pod), and the agent's `ready tcp:127.0.0.1:PORT` line,
//! read from its log, tells graft where to port-forward. In both modes the
//! agent listens in the *target's* network namespace, so the port-forward
//! always goes to the target pod.
//!
//! # Capabilities
//!
//! The agent asks for exactly `NET_ADMIN` (packet rules), `SYS_ADMIN`
//! (`setns` into the target's namespaces) and `SYS_PTRACE` (reading
//! `/proc/PID/root` and `/proc/PID/environ` of a process it does not own) and
//! `NET_RAW` (the packet socket that mirrors a port off the packet path; legacy
//! iptables also uses a raw socket), and drops every other capability;
//! without `DAC_OVERRIDE` the agent (root) cannot read a
//! target's files that are mode `0600` and owned by another user.
//!
//! # The cluster removes the agent pods
//!
//! The node-mode and targetless agents run as a [`Job`] of one pod
//! ([`agent_job`]): `backoffLimit: 0` (an agent that fails is not started
//! again), `ttlSecondsAfterFinished: 0` (the TTL-after-finished controller,
//! GA since Kubernetes 1.23, deletes the Job, and the garbage collector its
//! pod, as soon as the agent exits) and the Job's own
//! `activeDeadlineSeconds` (it also ends a Job whose pod could never be
//! created). So when graft is killed without deleting its agent, the agent
//! exits once nobody re-attaches (see the agent's relink), and the cluster
//! itself removes what graft created; `graft clean` is only needed where
//! the TTL controller is off.
//!
//! # Labels, clean-up and service meshes
//!
//! The node-mode Job and its pod carry [`labels`] (`app.kubernetes.io/managed-by:
//! graft`, `graft.dev/session`) so `graft clean` can find and delete pods of
//! sessions that crashed, and it opts out of Istio and Linkerd sidecar
//! injection. An ephemeral container has no metadata of its own: it is known
//! by its name ([`EPHEMERAL_NAME_PREFIX`] + session) and its `GRAFT_SESSION`
//! variable. Kubernetes cannot remove an ephemeral container; the agent exits
//! when its session ends or no client connects in time, leaving a terminated
//! container in the pod status. Mesh injection webhooks act on pod creation,
//! so they never touch an ephemeral container.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EphemeralContainer, Pod, PodSpec, PodTemplateSpec,
    SecurityContext, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest, Sha256};

use crate::select::ResolvedTarget;

/// The capabilities the agent adds; every other one is dropped.
pub const AGENT_CAPABILITIES: [&str; 4] = ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "NET_RAW"];

/// The environment variable that carries the SHA-256 digest (lower-case hex)
/// of the session secret to an agent in the cluster.
pub const SECRET_DIGEST_ENV: &str = "GRAFT_AGENT_SECRET_SHA256";

/// The environment variable that names the session an agent belongs to.
pub const SESSION_ENV: &str = "GRAFT_SESSION";

/// The label every object graft creates carries.
pub const MANAGED_BY_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "graft");

/// The label naming what the object is.
pub const NAME_LABEL: (&str, &str) = ("app.kubernetes.io/name", "graft-agent");

/// The label holding the session ID.
pub const SESSION_LABEL: &str = "graft.dev/session";

/// The annotation saying which target an agent pod serves
/// (`NAMESPACE/POD/CONTAINER`).
pub const TARGET_ANNOTATION: &str = "graft.dev/target";

/// The label selector that finds every node-mode agent pod (`graft clean`).
pub const AGENT_POD_SELECTOR: &str = "app.kubernetes.io/managed-by=graft";

/// Ephemeral agent containers are named this prefix + the session ID.
pub const EPHEMERAL_NAME_PREFIX: &str = "graft-agent-";

/// The default agent image repository; the tag is graft's version.
pub const DEFAULT_AGENT_IMAGE_REPOSITORY: &str = "ghcr.io/graft-dev/graft-agent";

/// The default agent image: [`DEFAULT_AGENT_IMAGE_REPOSITORY`] tagged with
/// this crate's version, which is graft's.
pub fn default_agent_image() -> String {
    format!(
        "{DEFAULT_AGENT_IMAGE_REPOSITORY}:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// A session ID: lower-case letters, digits and `-`, at most 32 characters,
/// so it fits in names and label values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

/// A session ID that cannot be used in object names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "session ID {0:?} must be 1 to 32 lower-case letters, digits or '-', starting and ending \
     with a letter or digit"
)]
pub struct InvalidSessionId(pub String);

impl SessionId {
    /// Checks and wraps a session ID (graft's are 16 hex digits).
    ///
    /// # Errors
    ///
    /// [`InvalidSessionId`] when it would not make a valid name or label.
    pub fn new(id: impl Into<String>) -> Result<SessionId, InvalidSessionId> {
        let id = id.into();
        let b = id.as_bytes();
        let ok = (1..=32).contains(&b.len())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b.first().is_some_and(u8::is_ascii_alphanumeric)
            && b.last().is_some_and(u8::is_ascii_alphanumeric);
        if ok {
            Ok(SessionId(id))
        } else {
            Err(InvalidSessionId(id))
        }
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name of this session's agent: the ephemeral container's, and the
    /// node-mode pod's.
    pub fn agent_name(&self) -> String {
        format!("{EPHEMERAL_NAME_PREFIX}{}", self.0)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The SHA-256 digest of a session secret, as lower-case hex: what an agent
/// in the cluster is given instead of the secret (see the module docs).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretDigest(String);

impl SecretDigest {
    /// Hashes `secret` (the bytes of the string the client sends in `Hello`).
    pub fn of(secret: &str) -> SecretDigest {
        SecretDigest(hex::encode(Sha256::digest(secret.as_bytes())))
    }

    /// The digest as 64 lower-case hex digits.
    pub fn as_hex(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretDigest({})", self.0)
    }
}

/// What the agent needs to be told, in either mode.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The session the agent serves.
    pub session: SessionId,
    /// The agent image.
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`; `None` leaves the cluster's
    /// default (which is `Always` for `:latest` tags, else `IfNotPresent`).
    pub image_pull_policy: Option<String>,
    /// The digest of the session secret.
    pub secret_digest: SecretDigest,
    /// The loopback port to listen on; 0 (the default) lets the kernel pick
    /// one, which the agent reports in its `ready` line.
    pub port: u16,
    /// Seconds the agent waits for graft to connect before it exits.
    pub connect_timeout_secs: u64,
    /// Node mode: the agent pod's `activeDeadlineSeconds`, after which the
    /// kubelet stops it even if graft died without deleting it.
    pub active_deadline_secs: i64,
}

impl AgentOptions {
    /// Options with the defaults: the default image, port 0, a 60 s connect
    /// timeout and a 12 h deadline for node-mode pods.
    pub fn new(session: SessionId, secret_digest: SecretDigest) -> AgentOptions {
        AgentOptions {
            session,
            image: default_agent_image(),
            image_pull_policy: None,
            secret_digest,
            port: 0,
            connect_timeout_secs: 60,
            active_deadline_secs: 12 * 60 * 60,
        }
    }

    fn listen_args(&self) -> Vec<String> {
        vec![
            "--listen".into(),
            format!("tcp:127.0.0.1:{}", self.port),
            "--connect-timeout".into(),
            self.connect_timeout_secs.to_string(),
        ]
    }

    fn env(&self) -> Vec<EnvVar> {
        vec![
            EnvVar {
                name: SECRET_DIGEST_ENV.into(),
                value: Some(self.secret_digest.as_hex().to_owned()),
                ..EnvVar::default()
            },
            EnvVar {
                name: SESSION_ENV.into(),
                value: Some(self.session.as_str().to_owned()),
                ..EnvVar::default()
            },
        ]
    }
}

/// The agent's security context: root (it reads other users' `/proc`
/// entries), exactly [`AGENT_CAPABILITIES`], nothing else.
pub fn agent_security_context() -> SecurityContext {
    SecurityContext {
        capabilities: Some(Capabilities {
            add: Some(AGENT_CAPABILITIES.iter().map(|c| (*c).to_owned()).collect()),
            drop: Some(vec!["ALL".into()]),
        }),
        privileged: Some(false),
        allow_privilege_escalation: Some(false),
        run_as_user: Some(0),
        run_as_group: Some(0),
        // A pod-level runAsNonRoot would otherwise stop the agent.
        run_as_non_root: Some(false),
        ..SecurityContext::default()
    }
}

/// The labels of everything graft creates for `session`.
pub fn labels(session: &SessionId) -> BTreeMap<String, String> {
    [
        (MANAGED_BY_LABEL.0, MANAGED_BY_LABEL.1),
        (NAME_LABEL.0, NAME_LABEL.1),
        (SESSION_LABEL, session.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Annotations of an agent pod: which target it serves, and opt-outs from
/// service-mesh sidecar injection (a sidecar would capture the agent's
/// traffic and keep the pod alive after the agent exits).
pub fn agent_pod_annotations(target: &ResolvedTarget) -> BTreeMap<String, String> {
    let mut annotations = mesh_opt_outs();
    annotations.insert(
        TARGET_ANNOTATION.to_owned(),
        format!(
            "{}/{}/{}",
            target.namespace, target.pod, target.container.name
        ),
    );
    annotations
}

/// Opt-outs from Istio's and Linkerd's sidecar injection.
fn mesh_opt_outs() -> BTreeMap<String, String> {
    [
        ("sidecar.istio.io/inject".to_owned(), "false".to_owned()),
        ("linkerd.io/inject".to_owned(), "disabled".to_owned()),
    ]
    .into_iter()
    .collect()
}

/// `--probe-source` arguments for a pod target: its default gateway and its
/// node's `hostIP`, the addresses the kubelet's probes come from, which the
/// agent never redirects (so probes always reach the target's container).
/// None when no container of the pod is probed over the network: then
/// nothing needs protecting, and the node's own traffic is stolen too.
fn probe_source_args(target: &ResolvedTarget) -> Vec<String> {
    if !target.probed_over_network {
        return Vec::new();
    }
    let mut args = vec!["--probe-source".to_owned(), "gateway".to_owned()];
    if let Some(ip) = &target.host_ip {
        args.extend(["--probe-source".to_owned(), ip.clone()]);
    }
    args
}

/// The ephemeral container that puts the agent beside `target`'s container,
/// in its PID namespace, with `--target-pid 1` (see the module docs).
pub fn ephemeral_agent(target: &ResolvedTarget, options: &AgentOptions) -> EphemeralContainer {
    let mut args = vec!["--target-pid".to_owned(), "1".to_owned()];
    args.extend(options.listen_args());
    args.extend(probe_source_args(target));
    EphemeralContainer {
        name: options.session.agent_name(),
        image: Some(options.image.clone()),
        image_pull_policy: options.image_pull_policy.clone(),
        args: Some(args),
        env: Some(options.env()),
        security_context: Some(agent_security_context()),
        target_container_name: Some(target.container.name.clone()),
        // If the agent fails before printing anything useful, its last log
        // lines become the termination message that graft shows.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        stdin: Some(false),
        tty: Some(false),
        ..EphemeralContainer::default()
    }
}

/// The node-mode agent pod: on the target's node, in the host PID namespace,
/// finding the target container's process by its ID.
pub fn node_agent_pod(target: &ResolvedTarget, options: &AgentOptions, namespace: &str) -> Pod {
    let mut args = vec![
        "--target-container-id".to_owned(),
        target.container_id.clone(),
    ];
    args.extend(options.listen_args());
    args.extend(probe_source_args(target));
    let mut pod = agent_pod(options, namespace, agent_pod_annotations(target), args);
    let spec = pod.spec.as_mut().expect("agent_pod sets a spec");
    spec.node_name = Some(target.node.clone());
    spec.host_pid = Some(true);
    // Whatever taints the target's node has, the agent must run there.
    spec.tolerations = Some(vec![Toleration {
        operator: Some("Exists".into()),
        ..Toleration::default()
    }]);
    pod
}

/// The agent pod of a `targetless` session: a pod of its own in `namespace`,
/// on any node, whose agent targets itself (`--target-pid 1`: in its own PID
/// namespace the agent is PID 1), so outgoing connections and names resolve
/// from the namespace's network and DNS, with no workload involved.
pub fn targetless_agent_pod(options: &AgentOptions, namespace: &str) -> Pod {
    let mut args = vec!["--target-pid".to_owned(), "1".to_owned()];
    args.extend(options.listen_args());
    let mut annotations = mesh_opt_outs();
    annotations.insert(TARGET_ANNOTATION.to_owned(), "targetless".to_owned());
    agent_pod(options, namespace, annotations, args)
}

/// The Job that runs `pod` (from [`node_agent_pod`] or
/// [`targetless_agent_pod`]) once, and that the cluster deletes, pod and
/// all, as soon as it finishes (see the module docs): same name, namespace,
/// labels and annotations as the pod; the pod's spec as its template.
pub fn agent_job(pod: Pod, options: &AgentOptions) -> Job {
    let Pod { metadata, spec, .. } = pod;
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: metadata.labels.clone(),
            annotations: metadata.annotations.clone(),
            ..ObjectMeta::default()
        }),
        spec,
    };
    Job {
        metadata,
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            ttl_seconds_after_finished: Some(0),
            active_deadline_seconds: Some(options.active_deadline_secs),
            completions: Some(1),
            parallelism: Some(1),
            template,
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// The node-mode agent's Job: [`agent_job`] of [`node_agent_pod`].
pub fn node_agent_job(target: &ResolvedTarget, options: &AgentOptions, namespace: &str) -> Job {
    agent_job(node_agent_pod(target, options, namespace), options)
}

/// The targetless agent's Job: [`agent_job`] of [`targetless_agent_pod`].
pub fn targetless_agent_job(options: &AgentOptions, namespace: &str) -> Job {
    agent_job(targetless_agent_pod(options, namespace), options)
}

/// A pod of graft's own that runs the agent with `args`: labelled, bounded by
/// `activeDeadlineSeconds`, never restarted, without service account token or
/// service links.
fn agent_pod(
    options: &AgentOptions,
    namespace: &str,
    annotations: BTreeMap<String, String>,
    args: Vec<String>,
) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(options.session.agent_name()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels(&options.session)),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            active_deadline_seconds: Some(options.active_deadline_secs),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            // The agent removes its packet rules on SIGTERM; this is plenty.
            termination_grace_period_seconds: Some(10),
            containers: vec![Container {
                name: "agent".into(),
                image: Some(options.image.clone()),
                image_pull_policy: options.image_pull_policy.clone(),
                args: Some(args),
                env: Some(options.env()),
                security_context: Some(agent_security_context()),
                termination_message_policy: Some("FallbackToLogsOnError".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// The names of `pod`'s ephemeral containers that graft added.
pub fn graft_ephemeral_containers(pod: &Pod) -> Vec<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.ephemeral_containers.as_ref())
        .into_iter()
        .flatten()
        .map(|c| c.name.as_str())
        .filter(|n| n.starts_with(EPHEMERAL_NAME_PREFIX))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::{ContainerChoice, ContainerReason};

    fn target() -> ResolvedTarget {
        ResolvedTarget {
            namespace: "shop".into(),
            pod: "api-7d9c-x2x".into(),
            pod_uid: "0b8e7a4e-uid".into(),
            container: ContainerChoice {
                name: "app".into(),
                reason: ContainerReason::First,
            },
            container_id: "3f9a0c".into(),
            container_runtime: "containerd".into(),
            node: "node-a".into(),
            shares_process_namespace: false,
            host_ip: Some("10.0.0.7".into()),
            probed_over_network: true,
        }
    }

    fn options() -> AgentOptions {
        let mut o = AgentOptions::new(
            SessionId::new("0123456789abcdef").unwrap(),
            SecretDigest::of("s3cret"),
        );
        o.image = "graft-agent:test".into();
        o.image_pull_policy = Some("IfNotPresent".into());
        o
    }

    #[test]
    fn ephemeral_container_snapshot() {
        insta::assert_yaml_snapshot!(ephemeral_agent(&target(), &options()));
    }

    #[test]
    fn targetless_pod_snapshot() {
        insta::assert_yaml_snapshot!(targetless_agent_pod(&options(), "shop"));
    }

    #[test]
    fn node_pod_snapshot() {
        insta::assert_yaml_snapshot!(node_agent_pod(&target(), &options(), "shop"));
    }

    #[test]
    fn node_job_snapshot() {
        insta::assert_yaml_snapshot!(node_agent_job(&target(), &options(), "shop"));
    }

    #[test]
    fn agent_jobs_run_once_and_are_removed_by_the_cluster_when_they_end() {
        for job in [
            node_agent_job(&target(), &options(), "shop"),
            targetless_agent_job(&options(), "shop"),
        ] {
            let spec = job.spec.as_ref().unwrap();
            assert_eq!(spec.backoff_limit, Some(0), "never started again");
            assert_eq!(spec.ttl_seconds_after_finished, Some(0), "deleted at once");
            assert_eq!(spec.active_deadline_seconds, Some(12 * 60 * 60));
            let pod = spec.template.spec.as_ref().unwrap();
            assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
            let labels = spec.template.metadata.as_ref().unwrap().labels.as_ref();
            assert_eq!(
                labels,
                job.metadata.labels.as_ref(),
                "the pod is found like the Job"
            );
            assert_eq!(
                job.metadata.name.as_deref(),
                Some("graft-agent-0123456789abcdef")
            );
            assert!(spec.template.metadata.as_ref().unwrap().name.is_none());
        }
    }

    fn assert_exact_capabilities(sc: &SecurityContext) {
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(
            caps.add.as_deref().unwrap(),
            ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "NET_RAW"]
        );
        assert_eq!(caps.drop.as_deref().unwrap(), ["ALL"]);
        assert_eq!(sc.privileged, Some(false));
    }

    #[test]
    fn ephemeral_agent_targets_pid_1_of_the_target_container() {
        let c = ephemeral_agent(&target(), &options());
        assert_eq!(c.target_container_name.as_deref(), Some("app"));
        let args = c.args.unwrap();
        assert_eq!(args[..2], ["--target-pid", "1"]);
        let listen = args.iter().position(|a| a == "--listen").unwrap();
        assert_eq!(args[listen + 1], "tcp:127.0.0.1:0");
        assert_eq!(c.name, "graft-agent-0123456789abcdef");
        assert_exact_capabilities(c.security_context.as_ref().unwrap());
    }

    #[test]
    fn the_secret_itself_is_never_in_a_spec() {
        let e = serde_json::to_string(&ephemeral_agent(&target(), &options())).unwrap();
        let p = serde_json::to_string(&node_agent_pod(&target(), &options(), "shop")).unwrap();
        for spec in [&e, &p] {
            assert!(!spec.contains("s3cret"), "{spec}");
            assert!(!spec.contains("\"GRAFT_AGENT_SECRET\""), "{spec}");
            assert!(spec.contains(SecretDigest::of("s3cret").as_hex()), "{spec}");
        }
    }

    #[test]
    fn secret_digest_is_sha256_hex() {
        // sha256("abc"), from FIPS 180-2.
        assert_eq!(
            SecretDigest::of("abc").as_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn node_pod_is_pinned_bounded_labelled_and_opted_out_of_meshes() {
        let p = node_agent_pod(&target(), &options(), "shop");
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        assert_eq!(spec.host_pid, Some(true));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.active_deadline_seconds, Some(12 * 60 * 60));
        let tolerations = spec.tolerations.as_ref().unwrap();
        assert_eq!(tolerations.len(), 1);
        assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
        assert_eq!(tolerations[0].key, None);
        assert_eq!(tolerations[0].effect, None);

        let c = &spec.containers[0];
        assert_exact_capabilities(c.security_context.as_ref().unwrap());
        let args = c.args.as_ref().unwrap();
        assert_eq!(args[..2], ["--target-container-id", "3f9a0c"]);

        let labels = p.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], "graft");
        assert_eq!(labels[SESSION_LABEL], "0123456789abcdef");
        let selector_key = AGENT_POD_SELECTOR.split('=').next().unwrap();
        assert!(labels.contains_key(selector_key));

        let annotations = p.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations["sidecar.istio.io/inject"], "false");
        assert_eq!(annotations["linkerd.io/inject"], "disabled");
        assert_eq!(annotations[TARGET_ANNOTATION], "shop/api-7d9c-x2x/app");
    }

    #[test]
    fn session_ids_fit_in_names_and_labels() {
        assert!(SessionId::new("0123456789abcdef").is_ok());
        for bad in ["", "ABC", "a_b", "-a", "a-", &"a".repeat(33)] {
            assert!(SessionId::new(bad).is_err(), "{bad:?}");
        }
        // The agent name is a valid container name (a DNS label).
        let name = SessionId::new("a".repeat(32)).unwrap().agent_name();
        assert!(name.len() <= 63);
    }

    #[test]
    fn ephemeral_containers_of_graft_are_found_by_name() {
        let pod = Pod {
            spec: Some(PodSpec {
                ephemeral_containers: Some(vec![
                    ephemeral_agent(&target(), &options()),
                    EphemeralContainer {
                        name: "debugger-abc".into(),
                        ..EphemeralContainer::default()
                    },
                ]),
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        assert_eq!(
            graft_ephemeral_containers(&pod),
            ["graft-agent-0123456789abcdef"]
        );
    }

    #[test]
    fn default_image_is_tagged_with_the_version() {
        assert!(default_agent_image().ends_with(concat!(":", env!("CARGO_PKG_VERSION"))));
    }
}
