//! `graft doctor`: checks, before a session, whether graft can work against a
//! cluster and namespace, each result saying what to fix.
//!
//! The checks, in order: the cluster can be reached and runs Kubernetes 1.25
//! or newer; every permission in [`rbac::ALL`] is granted
//! (`SelfSubjectAccessReview`s, `authorization.k8s.io/v1`); the namespace's
//! Pod Security admission labels allow the agent; and, given a target, that
//! it resolves and that the API server would admit the agent beside it (a
//! server-side dry run of the node-mode agent's Job or of the
//! ephemeral-container patch, which runs admission — Pod Security for the
//! patch, policy webhooks — without persisting anything; Pod Security judges
//! a Job's pod only when the Job controller creates it, which the namespace
//! labels check covers).
//!
//! The verdicts are pure functions ([`version_ok`], [`parse_version`],
//! [`pod_security_verdict`], [`permission_verdict`]) so they are tested
//! without a cluster; [`run_checks`] and [`run_checks_on`] do the requests.
//!
//! Asking the API server with a `SelfSubjectAccessReview` needs `create
//! selfsubjectaccessreviews.authorization.k8s.io`, which the built-in
//! `system:basic-user` ClusterRole grants every authenticated user, so it is
//! not in [`rbac::ALL`] nor in `deploy/rbac.yaml`.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::manifest::{AgentOptions, SecretDigest, SessionId, node_agent_job};
use crate::place::{AgentMode, FIELD_MANAGER, ephemeral_agent_patch, is_missing_subresource};
use crate::rbac::{self, Permission};
use crate::resolve::{ClientOptions, Cluster, connect, resolve};
use crate::{KubeError, KubeTarget, ResolvedTarget};

/// The oldest Kubernetes minor version graft supports (`1.25`: ephemeral
/// containers and Pod Security admission are GA).
pub const MIN_VERSION: (u32, u32) = (1, 25);

/// The label that sets a namespace's enforced Pod Security level.
pub const ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";
/// The label that makes the API server warn about pods above a level.
pub const WARN_LABEL: &str = "pod-security.kubernetes.io/warn";
/// The label that adds audit annotations for pods above a level.
pub const AUDIT_LABEL: &str = "pod-security.kubernetes.io/audit";

/// The name of the session the dry-run agent claims (never created).
const DRY_RUN_SESSION: &str = "doctor-dry-run";

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Nothing to do.
    Ok,
    /// Not checked, only reported (the agent image).
    Info,
    /// Might be a problem; graft may still work.
    Warn,
    /// graft will not work until this is fixed.
    Fail,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Ok => "ok",
            Outcome::Info => "info",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
        })
    }
}

/// The result of evaluating one thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// ok, info, warn or FAIL.
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
    /// What to do about it, when something should be done.
    pub fix: Option<String>,
}

impl Verdict {
    /// An `ok` verdict.
    pub fn ok(detail: impl Into<String>) -> Verdict {
        Verdict {
            outcome: Outcome::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    /// An `info` verdict.
    pub fn info(detail: impl Into<String>) -> Verdict {
        Verdict {
            outcome: Outcome::Info,
            detail: detail.into(),
            fix: None,
        }
    }

    /// A `warn` verdict with what to do.
    pub fn warn(detail: impl Into<String>, fix: impl Into<String>) -> Verdict {
        Verdict {
            outcome: Outcome::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// A `FAIL` verdict with what to do.
    pub fn fail(detail: impl Into<String>, fix: impl Into<String>) -> Verdict {
        Verdict {
            outcome: Outcome::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// One line of the doctor's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked (`cluster access`, `permission: get pods`, …).
    pub name: String,
    /// What was found.
    pub verdict: Verdict,
}

impl Check {
    fn new(name: impl Into<String>, verdict: Verdict) -> Check {
        Check {
            name: name.into(),
            verdict,
        }
    }
}

/// Whether any check failed: `graft doctor` exits 1 then.
pub fn any_failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.verdict.outcome == Outcome::Fail)
}

/// What `graft doctor` checks against.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// `--target`: resolve it and dry-run the agent beside it.
    pub target: Option<KubeTarget>,
    /// `--agent-mode`.
    pub mode: AgentMode,
    /// `--agent-image`.
    pub image: String,
}

/// Whether a server version is one graft supports (1.25 or newer).
pub fn version_ok(major: u32, minor: u32) -> bool {
    (major, minor) >= MIN_VERSION
}

/// The major and minor version from the API server's `/version`: `major` and
/// `minor` (some providers write `28+`), else parsed from `gitVersion`
/// (`v1.28.3-gke.100`).
pub fn parse_version(major: &str, minor: &str, git_version: &str) -> Option<(u32, u32)> {
    fn number(s: &str) -> Option<u32> {
        let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }
    if let (Some(major), Some(minor)) = (number(major), number(minor)) {
        return Some((major, minor));
    }
    let mut parts = git_version.trim_start_matches('v').split('.');
    Some((number(parts.next()?)?, number(parts.next()?)?))
}

/// The verdict on a server version.
pub fn version_verdict(version: Option<(u32, u32)>, shown: &str) -> Verdict {
    match version {
        Some((major, minor)) if version_ok(major, minor) => {
            Verdict::ok(format!("Kubernetes {shown}"))
        }
        Some(_) => Verdict::fail(
            format!("Kubernetes {shown} is older than 1.25"),
            "graft needs Kubernetes 1.25 or newer (ephemeral containers and Pod Security \
             admission are GA there); upgrade the cluster",
        ),
        None => Verdict::warn(
            format!("cannot tell the Kubernetes version from {shown:?}"),
            "graft needs Kubernetes 1.25 or newer; check `kubectl version`",
        ),
    }
}

/// The Pod Security levels, least to most restrictive.
fn level_rank(level: &str) -> Option<u8> {
    match level {
        "privileged" => Some(0),
        "baseline" => Some(1),
        "restricted" => Some(2),
        _ => None,
    }
}

/// What the agent needs from Pod Security, for messages.
fn agent_needs(mode: AgentMode) -> &'static str {
    match mode {
        AgentMode::Ephemeral => "the agent adds NET_ADMIN, SYS_ADMIN, SYS_PTRACE and NET_RAW",
        AgentMode::Node => {
            "the agent adds NET_ADMIN, SYS_ADMIN, SYS_PTRACE and NET_RAW and uses hostPID"
        }
    }
}

/// Evaluates a namespace's Pod Security admission labels for the agent.
///
/// The agent needs the `privileged` level in both modes: `baseline` and
/// `restricted` forbid the capabilities it adds (and `hostPID` in node
/// mode). An `enforce` level above `privileged` (or one the API server does
/// not know, which it treats as `restricted`) fails; `warn` or `audit` above
/// it only warns, since the agent is admitted then, with a warning or an
/// audit annotation. Without an `enforce` label the cluster's default level
/// applies, which is `privileged` unless the administrator configured the
/// PodSecurity admission plugin otherwise (a dry run with `--target` tells).
pub fn pod_security_verdict(labels: &BTreeMap<String, String>, mode: AgentMode) -> Verdict {
    let needs = agent_needs(mode);
    let fix_enforce = "ask for the namespace to be labelled \
                       pod-security.kubernetes.io/enforce=privileged, or use a namespace that is \
                       (`kubectl label namespace NS pod-security.kubernetes.io/enforce=privileged`)";
    if let Some(level) = labels.get(ENFORCE_LABEL) {
        match level_rank(level) {
            Some(0) => {}
            Some(_) => {
                return Verdict::fail(
                    format!(
                        "enforce={level}: the API server will refuse the agent ({needs}, which \
                         only the privileged level admits)"
                    ),
                    fix_enforce,
                );
            }
            None => {
                return Verdict::fail(
                    format!(
                        "enforce={level:?} is not a Pod Security level; the API server treats \
                         it as restricted and will refuse the agent ({needs})"
                    ),
                    fix_enforce,
                );
            }
        }
    }
    let noisy: Vec<String> = [WARN_LABEL, AUDIT_LABEL]
        .into_iter()
        .filter_map(|key| {
            let level = labels.get(key)?;
            (level_rank(level) != Some(0)).then(|| {
                let short = key.rsplit('/').next().unwrap_or(key);
                format!("{short}={level}")
            })
        })
        .collect();
    let enforce = match labels.get(ENFORCE_LABEL) {
        Some(_) => "enforce=privileged".to_owned(),
        None => "no enforce label (the cluster's default level applies, privileged unless \
                 configured otherwise)"
            .to_owned(),
    };
    if noisy.is_empty() {
        Verdict::ok(enforce)
    } else {
        Verdict::warn(
            format!(
                "{enforce}; {}: the agent is admitted, but the API server will warn about it or \
                 record it in the audit log ({needs})",
                noisy.join(", ")
            ),
            "nothing needed for graft; label the namespace's warn/audit levels privileged to \
             silence it",
        )
    }
}

/// Whether `permission` is needed with `mode`: the node-mode agent Job's
/// create and delete, and the deletion of left-over pods, are not needed in
/// ephemeral mode (except by `graft ls` and `graft clean`); the
/// ephemeral-container patch is not needed in node mode; Services are only
/// needed by `graft expose`, so their absence warns.
fn needed_in(permission: &Permission, mode: AgentMode) -> bool {
    // Only `graft expose` (and `graft clean` of its leftovers) touches Services;
    // only --copy-target and --scale-down create pods and scale workloads.
    if permission.resource == "services" || rbac::COPY_ONLY.contains(permission) {
        return false;
    }
    match mode {
        AgentMode::Ephemeral => {
            ![rbac::CREATE_JOBS, rbac::DELETE_JOBS, rbac::DELETE_PODS].contains(permission)
        }
        AgentMode::Node => *permission != rbac::PATCH_EPHEMERAL_CONTAINERS,
    }
}

/// The verdict on one permission: granted is ok; denied fails when `mode`
/// needs it and warns otherwise.
pub fn permission_verdict(
    permission: &Permission,
    allowed: bool,
    namespace: &str,
    mode: AgentMode,
) -> Verdict {
    if allowed {
        return Verdict::ok(format!("allowed (to {})", permission.why));
    }
    let detail = format!(
        "not allowed to {permission} in namespace {namespace:?}, needed to {}",
        permission.why
    );
    let fix = format!(
        "ask a cluster admin to bind the `graft` ClusterRole from deploy/rbac.yaml \
         (`kubectl auth can-i {permission} -n {namespace}` checks it)"
    );
    if needed_in(permission, mode) {
        Verdict::fail(detail, fix)
    } else {
        let other = match mode {
            _ if rbac::COPY_ONLY.contains(permission) => "--copy-target / --scale-down",
            AgentMode::Ephemeral => "--agent-mode node and graft clean",
            AgentMode::Node => "the default --agent-mode ephemeral",
        };
        Verdict::warn(format!("{detail} (only with {other})"), fix)
    }
}

/// The `ResourceAttributes` a permission is reviewed with.
fn attributes(permission: &Permission, namespace: &str) -> ResourceAttributes {
    let (resource, subresource) = match permission.resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_owned())),
        None => (permission.resource, None),
    };
    ResourceAttributes {
        namespace: Some(namespace.to_owned()),
        group: Some(permission.group.to_owned()),
        resource: Some(resource.to_owned()),
        subresource,
        verb: Some(permission.verb.to_owned()),
        // A namespace is cluster-scoped: name the one asked about, which a
        // RoleBinding in it may grant `get` on.
        name: (permission.resource == "namespaces").then(|| namespace.to_owned()),
        ..ResourceAttributes::default()
    }
}

/// Asks the API server whether the current user may do `permission` in
/// `namespace`.
///
/// # Errors
///
/// The client's error when the review cannot be created.
pub async fn can_i(
    client: &Client,
    permission: &Permission,
    namespace: &str,
) -> Result<bool, kube::Error> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(attributes(permission, namespace)),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// Connects with `client_options` and runs every check. Never fails: a
/// problem is a failed [`Check`].
pub async fn run_checks(client_options: &ClientOptions, options: &DoctorOptions) -> Vec<Check> {
    match connect(client_options).await {
        Ok(cluster) => run_checks_on(&cluster, options).await,
        Err(e) => vec![Check::new(
            "cluster access",
            Verdict::fail(
                e.to_string(),
                "check the kubeconfig and context: `kubectl config current-context`, \
                 `kubectl cluster-info`",
            ),
        )],
    }
}

/// Runs every check on a connected cluster, in its namespace.
pub async fn run_checks_on(cluster: &Cluster, options: &DoctorOptions) -> Vec<Check> {
    let client = &cluster.client;
    let namespace = cluster.namespace.as_str();
    let mut checks = Vec::new();

    match client.apiserver_version().await {
        Ok(info) => {
            checks.push(Check::new(
                "cluster access",
                Verdict::ok(format!("connected; namespace {namespace:?}")),
            ));
            let version = parse_version(&info.major, &info.minor, &info.git_version);
            let shown = if info.git_version.is_empty() {
                format!("{}.{}", info.major, info.minor)
            } else {
                info.git_version.clone()
            };
            checks.push(Check::new(
                "server version",
                version_verdict(version, &shown),
            ));
        }
        Err(e) => {
            checks.push(Check::new(
                "cluster access",
                Verdict::fail(
                    format!("cannot read the server version: {e}"),
                    "check that the cluster is reachable and the credentials are valid: \
                     `kubectl version`",
                ),
            ));
            return checks;
        }
    }

    checks.extend(permission_checks(client, namespace, options.mode).await);
    checks.push(Check::new(
        "pod security",
        pod_security_check(client, namespace, options.mode).await,
    ));

    let Some(target) = &options.target else {
        checks.push(Check::new(
            "agent admission",
            Verdict::info("not checked: pass --target to dry-run the agent beside it"),
        ));
        checks.push(image_check(options));
        return checks;
    };
    match resolve(client, namespace, target).await {
        Ok(resolution) => {
            let t = &resolution.target;
            checks.push(Check::new(
                format!("target {target}"),
                Verdict::ok(format!(
                    "pod {}, container {} ({}), node {}",
                    t.pod, t.container.name, t.container.reason, t.node
                )),
            ));
            checks.push(Check::new(
                "agent admission (dry run)",
                dry_run_verdict(client, t, options).await,
            ));
        }
        Err(e) => {
            checks.push(Check::new(
                format!("target {target}"),
                Verdict::fail(
                    e.to_string(),
                    "fix the target or the namespace (-n); `kubectl get pods -n NS` lists pods",
                ),
            ));
        }
    }
    checks.push(image_check(options));
    checks
}

async fn permission_checks(client: &Client, namespace: &str, mode: AgentMode) -> Vec<Check> {
    let answers =
        futures::future::join_all(rbac::ALL.iter().map(|p| can_i(client, p, namespace))).await;
    let mut checks = Vec::new();
    for (permission, answer) in rbac::ALL.iter().zip(answers) {
        match answer {
            Ok(allowed) => checks.push(Check::new(
                format!("permission: {permission}"),
                permission_verdict(permission, allowed, namespace, mode),
            )),
            Err(e) => {
                // One error (the API server refusing reviews) would repeat
                // for every permission: report it once.
                return vec![Check::new(
                    "permissions",
                    Verdict::warn(
                        format!("could not ask the API server (SelfSubjectAccessReview): {e}"),
                        "every authenticated user may create SelfSubjectAccessReviews unless \
                         the cluster removed it from system:basic-user; check by hand with \
                         `kubectl auth can-i --list -n NS` against deploy/rbac.yaml",
                    ),
                )];
            }
        }
    }
    checks
}

async fn pod_security_check(client: &Client, namespace: &str, mode: AgentMode) -> Verdict {
    let api: Api<Namespace> = Api::all(client.clone());
    match api.get(namespace).await {
        Ok(ns) => pod_security_verdict(&ns.metadata.labels.unwrap_or_default(), mode),
        Err(kube::Error::Api(s)) if s.code == 403 => Verdict::warn(
            format!(
                "cannot read namespace {namespace:?} (not allowed to {}), so its Pod Security \
                 labels are unknown",
                rbac::GET_NAMESPACES
            ),
            "bind the `graft` ClusterRole from deploy/rbac.yaml, or ask an admin for the \
             namespace's pod-security.kubernetes.io/enforce label (it must be privileged); \
             --target makes a dry run that checks admission anyway",
        ),
        Err(kube::Error::Api(s)) if s.code == 404 => Verdict::fail(
            format!("namespace {namespace:?} does not exist"),
            "pass an existing namespace with -n (`kubectl get namespaces`)",
        ),
        Err(e) => Verdict::warn(
            format!("cannot read namespace {namespace:?}: {e}"),
            "check its pod-security.kubernetes.io/enforce label by hand (it must be privileged)",
        ),
    }
}

fn image_check(options: &DoctorOptions) -> Check {
    Check::new(
        "agent image",
        Verdict::info(format!(
            "{}: not pulled now; whether the node can pull it is checked when the agent starts \
             (--agent-image picks another)",
            options.image
        )),
    )
}

/// The agent options of the dry run: a session ID that no real session has,
/// and the digest of a secret nobody holds.
fn dry_run_options(image: &str) -> AgentOptions {
    let session = SessionId::new(DRY_RUN_SESSION).expect("a valid session ID");
    let mut options = AgentOptions::new(session, SecretDigest::of("graft doctor dry run"));
    options.image = image.to_owned();
    options
}

/// Sends the agent's placement with `dryRun=All`: the API server
/// authorizes, admits (Pod Security, webhooks) and validates it, and stores
/// nothing.
async fn dry_run_verdict(
    client: &Client,
    target: &ResolvedTarget,
    options: &DoctorOptions,
) -> Verdict {
    let agent = dry_run_options(&options.image);
    let namespace = &target.namespace;
    let result = match options.mode {
        AgentMode::Node => {
            // Pod Security judges the Job's pod only when the Job controller
            // creates it; the namespace's labels are checked above.
            let job = node_agent_job(target, &agent, namespace);
            let api: Api<Job> = Api::namespaced(client.clone(), namespace);
            let params = PostParams {
                dry_run: true,
                field_manager: Some(FIELD_MANAGER.into()),
            };
            api.create(&params, &job)
                .await
                .map(drop)
                .map_err(|e| KubeError::from_api(e, rbac::CREATE_JOBS, namespace, "job", "agent"))
        }
        AgentMode::Ephemeral => {
            if target.shares_process_namespace {
                return Verdict::fail(
                    format!(
                        "pod {} sets shareProcessNamespace, so the ephemeral agent cannot tell \
                         the target's process",
                        target.pod
                    ),
                    "use --agent-mode node",
                );
            }
            let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
            let params = PatchParams {
                dry_run: true,
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            let patch = Patch::Strategic(ephemeral_agent_patch(target, &agent));
            api.patch_subresource("ephemeralcontainers", &target.pod, &params, &patch)
                .await
                .map(drop)
                .map_err(|e| {
                    if is_missing_subresource(&e) {
                        return KubeError::EphemeralContainersUnsupported;
                    }
                    KubeError::from_api(
                        e,
                        rbac::PATCH_EPHEMERAL_CONTAINERS,
                        namespace,
                        "pod",
                        &target.pod,
                    )
                })
        }
    };
    let what = match options.mode {
        AgentMode::Node => format!("the agent pod on node {}", target.node),
        AgentMode::Ephemeral => format!("the agent container in pod {}", target.pod),
    };
    match result {
        Ok(()) => Verdict::ok(format!("the API server would admit {what}")),
        Err(e @ KubeError::AdmissionRejected { .. }) => Verdict::fail(
            format!("the API server would refuse {what}: {e}"),
            "label the namespace pod-security.kubernetes.io/enforce=privileged, or exempt \
             graft's agent from the policy that refused it",
        ),
        Err(e @ KubeError::EphemeralContainersUnsupported) => {
            Verdict::fail(e.to_string(), "use --agent-mode node")
        }
        Err(e) => Verdict::fail(
            format!("the dry run of {what} failed: {e}"),
            "see the message; the permission checks above name missing RBAC grants",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn versions_from_1_25_on_are_supported() {
        assert!(version_ok(1, 25));
        assert!(version_ok(1, 33));
        assert!(version_ok(2, 0));
        assert!(!version_ok(1, 24));
        assert!(!version_ok(0, 99));
    }

    #[test]
    fn versions_parse_with_provider_suffixes() {
        assert_eq!(parse_version("1", "28", "v1.28.3"), Some((1, 28)));
        assert_eq!(parse_version("1", "28+", "v1.28.3-eks-1"), Some((1, 28)));
        assert_eq!(parse_version("", "", "v1.30.1-gke.100"), Some((1, 30)));
        assert_eq!(parse_version("", "", "garbage"), None);
    }

    #[test]
    fn version_verdicts() {
        assert_eq!(
            version_verdict(Some((1, 30)), "v1.30.0").outcome,
            Outcome::Ok
        );
        let old = version_verdict(Some((1, 24)), "v1.24.9");
        assert_eq!(old.outcome, Outcome::Fail);
        assert!(old.detail.contains("older than 1.25"), "{old:?}");
        assert_eq!(version_verdict(None, "?").outcome, Outcome::Warn);
    }

    #[test]
    fn enforce_above_privileged_fails_in_both_modes() {
        for mode in [AgentMode::Ephemeral, AgentMode::Node] {
            for level in ["baseline", "restricted", "strict"] {
                let v = pod_security_verdict(&labels(&[(ENFORCE_LABEL, level)]), mode);
                assert_eq!(v.outcome, Outcome::Fail, "{level} {mode:?}");
                assert!(
                    v.fix.as_deref().unwrap().contains("enforce=privileged"),
                    "{v:?}"
                );
            }
        }
        let node = pod_security_verdict(&labels(&[(ENFORCE_LABEL, "baseline")]), AgentMode::Node);
        assert!(node.detail.contains("hostPID"), "{node:?}");
    }

    #[test]
    fn privileged_or_unlabelled_is_ok_and_warn_or_audit_only_warns() {
        let ok = pod_security_verdict(
            &labels(&[(ENFORCE_LABEL, "privileged")]),
            AgentMode::Ephemeral,
        );
        assert_eq!(ok.outcome, Outcome::Ok);
        let none = pod_security_verdict(&labels(&[]), AgentMode::Node);
        assert_eq!(none.outcome, Outcome::Ok);
        assert!(none.detail.contains("no enforce label"), "{none:?}");
        let warned = pod_security_verdict(
            &labels(&[
                (ENFORCE_LABEL, "privileged"),
                (WARN_LABEL, "restricted"),
                (AUDIT_LABEL, "baseline"),
            ]),
            AgentMode::Ephemeral,
        );
        assert_eq!(warned.outcome, Outcome::Warn);
        assert!(warned.detail.contains("warn=restricted"), "{warned:?}");
        assert!(warned.detail.contains("audit=baseline"), "{warned:?}");
        // enforce wins over warn/audit.
        let enforced = pod_security_verdict(
            &labels(&[(ENFORCE_LABEL, "restricted"), (WARN_LABEL, "restricted")]),
            AgentMode::Ephemeral,
        );
        assert_eq!(enforced.outcome, Outcome::Fail);
    }

    #[test]
    fn denied_permissions_fail_when_the_mode_needs_them() {
        let v = permission_verdict(&rbac::GET_PODS, false, "shop", AgentMode::Ephemeral);
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.detail.contains("get pods"), "{v:?}");
        assert!(v.detail.contains(rbac::GET_PODS.why), "{v:?}");
        assert!(v.fix.as_deref().unwrap().contains("deploy/rbac.yaml"));
        let other_mode =
            permission_verdict(&rbac::CREATE_JOBS, false, "shop", AgentMode::Ephemeral);
        assert_eq!(other_mode.outcome, Outcome::Warn);
        assert_eq!(
            permission_verdict(&rbac::CREATE_JOBS, false, "shop", AgentMode::Node).outcome,
            Outcome::Fail
        );
        assert_eq!(
            permission_verdict(
                &rbac::PATCH_EPHEMERAL_CONTAINERS,
                false,
                "shop",
                AgentMode::Node
            )
            .outcome,
            Outcome::Warn
        );
        assert_eq!(
            permission_verdict(&rbac::GET_PODS, true, "shop", AgentMode::Node).outcome,
            Outcome::Ok
        );
        let copy = permission_verdict(
            &rbac::PATCH_DEPLOYMENTS_SCALE,
            false,
            "shop",
            AgentMode::Ephemeral,
        );
        assert_eq!(copy.outcome, Outcome::Warn);
        assert!(copy.detail.contains("--scale-down"), "{copy:?}");
    }

    #[test]
    fn subresources_and_namespaces_are_reviewed_as_rbac_sees_them() {
        let a = attributes(&rbac::PATCH_EPHEMERAL_CONTAINERS, "shop");
        assert_eq!(a.resource.as_deref(), Some("pods"));
        assert_eq!(a.subresource.as_deref(), Some("ephemeralcontainers"));
        assert_eq!(a.group.as_deref(), Some(""));
        let n = attributes(&rbac::GET_NAMESPACES, "shop");
        assert_eq!(n.name.as_deref(), Some("shop"));
        assert_eq!(attributes(&rbac::GET_DEPLOYMENTS, "shop").name, None);
    }

    #[test]
    fn only_fail_fails_the_run() {
        let c = |outcome| {
            Check::new(
                "x",
                Verdict {
                    outcome,
                    detail: String::new(),
                    fix: None,
                },
            )
        };
        assert!(!any_failed(&[
            c(Outcome::Ok),
            c(Outcome::Warn),
            c(Outcome::Info)
        ]));
        assert!(any_failed(&[c(Outcome::Ok), c(Outcome::Fail)]));
    }

    #[test]
    fn the_dry_run_session_id_is_valid() {
        let o = dry_run_options("img:1");
        assert_eq!(o.image, "img:1");
        assert_eq!(o.session.agent_name(), "graft-agent-doctor-dry-run");
    }
}
