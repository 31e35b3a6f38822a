//! The Kubernetes target grammar: `KIND/NAME[/container/CONTAINER]`.
//!
//! Text comes in from the command line or `graft.toml` and leaves as a typed
//! [`KubeTarget`]; nothing here talks to a cluster. The kinds and their aliases
//! follow kubectl (`deploy`, `sts`, `ds`, `rs`, `cj`, plural forms, any case),
//! and names are checked against the rules the API server applies, so a typo is
//! reported before any request is made.

use std::fmt;
use std::str::FromStr;

/// The kind of object a target names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    /// A single pod (`pod/NAME`, `po/NAME`).
    Pod,
    /// An `apps/v1` Deployment (`deployment/NAME`, `deploy/NAME`).
    Deployment,
    /// An `apps/v1` StatefulSet (`statefulset/NAME`, `sts/NAME`).
    StatefulSet,
    /// An `apps/v1` DaemonSet (`daemonset/NAME`, `ds/NAME`).
    DaemonSet,
    /// An `apps/v1` ReplicaSet (`replicaset/NAME`, `rs/NAME`).
    ReplicaSet,
    /// A `batch/v1` Job (`job/NAME`).
    Job,
    /// A `batch/v1` CronJob (`cronjob/NAME`, `cj/NAME`): the pod of its newest
    /// running job.
    CronJob,
    /// An Argo Rollouts `argoproj.io` Rollout (`rollout/NAME`, `ro/NAME`),
    /// reached through the dynamic API.
    Rollout,
}

impl WorkloadKind {
    /// Every kind, in the order they are listed in help and errors.
    pub const ALL: [WorkloadKind; 8] = [
        WorkloadKind::Pod,
        WorkloadKind::Deployment,
        WorkloadKind::StatefulSet,
        WorkloadKind::DaemonSet,
        WorkloadKind::ReplicaSet,
        WorkloadKind::Job,
        WorkloadKind::CronJob,
        WorkloadKind::Rollout,
    ];

    /// The canonical lower-case singular name, as written in targets and
    /// messages (`deployment`, `statefulset`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Pod => "pod",
            WorkloadKind::Deployment => "deployment",
            WorkloadKind::StatefulSet => "statefulset",
            WorkloadKind::DaemonSet => "daemonset",
            WorkloadKind::ReplicaSet => "replicaset",
            WorkloadKind::Job => "job",
            WorkloadKind::CronJob => "cronjob",
            WorkloadKind::Rollout => "rollout",
        }
    }

    /// The API resource (plural) that holds objects of this kind, as kubectl
    /// and RBAC name it.
    pub fn resource(self) -> &'static str {
        match self {
            WorkloadKind::Pod => "pods",
            WorkloadKind::Deployment => "deployments",
            WorkloadKind::StatefulSet => "statefulsets",
            WorkloadKind::DaemonSet => "daemonsets",
            WorkloadKind::ReplicaSet => "replicasets",
            WorkloadKind::Job => "jobs",
            WorkloadKind::CronJob => "cronjobs",
            WorkloadKind::Rollout => "rollouts",
        }
    }

    /// Parses a kind as kubectl accepts it: singular, plural or short name,
    /// with an optional API group suffix (`deployment.apps`), in any case.
    fn parse(word: &str) -> Option<WorkloadKind> {
        let word = word.to_ascii_lowercase();
        // `deployment.apps`, `rollouts.argoproj.io`: the group must be the kind's own.
        let (kind, group) = match word.split_once('.') {
            Some((kind, group)) => (kind, Some(group)),
            None => (word.as_str(), None),
        };
        let parsed = match kind {
            "pod" | "pods" | "po" => WorkloadKind::Pod,
            "deployment" | "deployments" | "deploy" => WorkloadKind::Deployment,
            "statefulset" | "statefulsets" | "sts" => WorkloadKind::StatefulSet,
            "daemonset" | "daemonsets" | "ds" => WorkloadKind::DaemonSet,
            "replicaset" | "replicasets" | "rs" => WorkloadKind::ReplicaSet,
            "job" | "jobs" => WorkloadKind::Job,
            "cronjob" | "cronjobs" | "cj" => WorkloadKind::CronJob,
            "rollout" | "rollouts" | "ro" => WorkloadKind::Rollout,
            _ => return None,
        };
        match group {
            None => Some(parsed),
            Some(group) if group == parsed.group() => Some(parsed),
            Some(_) => None,
        }
    }

    /// The API group of this kind (`""` for the core group).
    pub fn group(self) -> &'static str {
        match self {
            WorkloadKind::Pod => "",
            WorkloadKind::Deployment
            | WorkloadKind::StatefulSet
            | WorkloadKind::DaemonSet
            | WorkloadKind::ReplicaSet => "apps",
            WorkloadKind::Job | WorkloadKind::CronJob => "batch",
            WorkloadKind::Rollout => "argoproj.io",
        }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Kubernetes target: a workload (or pod) and optionally one of its
/// containers.
///
/// The namespace is not part of the target: it comes from `-n/--namespace` or
/// the kubeconfig context, as with kubectl.
///
/// ```
/// use graft_kube::{KubeTarget, WorkloadKind};
///
/// let t: KubeTarget = "deploy/api/container/web".parse().unwrap();
/// assert_eq!(t.kind, WorkloadKind::Deployment);
/// assert_eq!(t.name, "api");
/// assert_eq!(t.container.as_deref(), Some("web"));
/// assert_eq!(t.to_string(), "deployment/api/container/web");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KubeTarget {
    /// What kind of object `name` is.
    pub kind: WorkloadKind,
    /// The object's name.
    pub name: String,
    /// The container asked for with `/container/NAME`; `None` means the
    /// `kubectl.kubernetes.io/default-container` annotation, else the first.
    pub container: Option<String>,
}

impl fmt::Display for KubeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)?;
        if let Some(container) = &self.container {
            write!(f, "/container/{container}")?;
        }
        Ok(())
    }
}

/// The grammar, for error messages.
const GRAMMAR: &str = "KIND/NAME or KIND/NAME/container/CONTAINER, where KIND is pod, \
     deployment (deploy), statefulset (sts), daemonset (ds), replicaset (rs), job, \
     cronjob (cj) or rollout";

/// Why a target string is not a Kubernetes target. Each message shows the
/// grammar or the rule that was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseTargetError {
    /// The string was empty.
    #[error("the target is empty; expected {GRAMMAR}")]
    Empty,
    /// The part before the first `/` is not a known kind.
    #[error("{kind:?} is not a kind graft can target; expected {GRAMMAR}{hint}")]
    UnknownKind {
        /// The word given as kind.
        kind: String,
        /// A hint for common mistakes (local targets, `kubectl`-only kinds); may be empty.
        hint: &'static str,
    },
    /// A kind without a name (`deploy`, `deploy/`).
    #[error("{kind} needs a name: {kind}/NAME")]
    MissingName {
        /// The kind that was given.
        kind: WorkloadKind,
    },
    /// What follows `KIND/NAME` is not `/container/CONTAINER`.
    #[error(
        "{rest:?} after {kind}/{name} is not understood; expected {kind}/{name}/container/CONTAINER"
    )]
    Trailing {
        /// The kind.
        kind: WorkloadKind,
        /// The object name.
        name: String,
        /// What followed the name.
        rest: String,
    },
    /// A name breaks the API server's naming rules.
    #[error("{what} {name:?} is not a valid Kubernetes name: {reason}")]
    InvalidName {
        /// `"name"` or `"container name"`.
        what: &'static str,
        /// The offending name.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
}

impl FromStr for KubeTarget {
    type Err = ParseTargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ParseTargetError::Empty);
        }
        let mut parts = s.split('/');
        // `split` always yields at least one item.
        let kind_word = parts.next().unwrap_or_default();
        let kind = WorkloadKind::parse(kind_word).ok_or_else(|| ParseTargetError::UnknownKind {
            kind: kind_word.to_owned(),
            hint: unknown_kind_hint(kind_word),
        })?;
        let name = match parts.next() {
            Some(name) if !name.is_empty() => name,
            _ => return Err(ParseTargetError::MissingName { kind }),
        };
        check_object_name(name)?;
        let rest: Vec<&str> = parts.collect();
        let container = match rest.as_slice() {
            [] => None,
            ["container" | "containers" | "c", container] if !container.is_empty() => {
                check_container_name(container)?;
                Some((*container).to_owned())
            }
            _ => {
                return Err(ParseTargetError::Trailing {
                    kind,
                    name: name.to_owned(),
                    rest: format!("/{}", rest.join("/")),
                });
            }
        };
        Ok(KubeTarget {
            kind,
            name: name.to_owned(),
            container,
        })
    }
}

fn unknown_kind_hint(word: &str) -> &'static str {
    let word = word.to_ascii_lowercase();
    if word.starts_with("pid:") || word.starts_with("pid") {
        " (a local process is targeted with pid:PID)"
    } else if matches!(word.as_str(), "svc" | "service" | "services") {
        " (a Service has no process of its own: target the deployment behind it)"
    } else if matches!(word.as_str(), "ns" | "namespace" | "namespaces") {
        " (the namespace is chosen with -n/--namespace)"
    } else {
        ""
    }
}

/// Object names (pods, workloads) are DNS-1123 subdomains.
fn check_object_name(name: &str) -> Result<(), ParseTargetError> {
    let invalid = |reason| ParseTargetError::InvalidName {
        what: "name",
        name: name.to_owned(),
        reason,
    };
    if name.len() > 253 {
        return Err(invalid("it is longer than 253 characters"));
    }
    for label in name.split('.') {
        check_dns_label_chars(label).map_err(invalid)?;
    }
    Ok(())
}

/// Container names are DNS-1123 labels.
fn check_container_name(name: &str) -> Result<(), ParseTargetError> {
    let invalid = |reason| ParseTargetError::InvalidName {
        what: "container name",
        name: name.to_owned(),
        reason,
    };
    if name.len() > 63 {
        return Err(invalid("it is longer than 63 characters"));
    }
    check_dns_label_chars(name).map_err(invalid)
}

fn check_dns_label_chars(label: &str) -> Result<(), &'static str> {
    let bytes = label.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return Err("it has an empty part between dots");
    };
    if !bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    {
        return Err("only lower-case letters, digits, '-' and '.' are allowed");
    }
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return Err("it must start and end with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<KubeTarget, ParseTargetError> {
        s.parse()
    }

    #[test]
    fn every_kind_and_alias_parses() {
        let cases = [
            ("pod/a", WorkloadKind::Pod),
            ("po/a", WorkloadKind::Pod),
            ("pods/a", WorkloadKind::Pod),
            ("deployment/a", WorkloadKind::Deployment),
            ("deploy/a", WorkloadKind::Deployment),
            ("deployments/a", WorkloadKind::Deployment),
            ("Deployment.apps/a", WorkloadKind::Deployment),
            ("statefulset/a", WorkloadKind::StatefulSet),
            ("sts/a", WorkloadKind::StatefulSet),
            ("daemonset/a", WorkloadKind::DaemonSet),
            ("ds/a", WorkloadKind::DaemonSet),
            ("replicaset/a", WorkloadKind::ReplicaSet),
            ("rs/a", WorkloadKind::ReplicaSet),
            ("job/a", WorkloadKind::Job),
            ("jobs.batch/a", WorkloadKind::Job),
            ("cronjob/a", WorkloadKind::CronJob),
            ("cj/a", WorkloadKind::CronJob),
            ("rollout/a", WorkloadKind::Rollout),
            ("rollouts.argoproj.io/a", WorkloadKind::Rollout),
            ("DEPLOY/a", WorkloadKind::Deployment),
        ];
        for (s, kind) in cases {
            let t = parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(t.kind, kind, "{s}");
            assert_eq!(t.name, "a", "{s}");
            assert_eq!(t.container, None, "{s}");
        }
    }

    #[test]
    fn container_suffix() {
        let t = parse("sts/db/container/postgres").unwrap();
        assert_eq!(t.kind, WorkloadKind::StatefulSet);
        assert_eq!(t.name, "db");
        assert_eq!(t.container.as_deref(), Some("postgres"));
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        for s in ["deploy/api", "cj/nightly/container/run", "po/x.y"] {
            let t = parse(s).unwrap();
            let shown = t.to_string();
            assert_eq!(parse(&shown).unwrap(), t);
        }
        assert_eq!(
            parse("cj/nightly/container/run").unwrap().to_string(),
            "cronjob/nightly/container/run"
        );
    }

    #[test]
    fn dotted_pod_names_are_names_not_groups() {
        let t = parse("pod/web-1.example").unwrap();
        assert_eq!(t.name, "web-1.example");
    }

    #[test]
    fn wrong_group_is_an_unknown_kind() {
        assert!(matches!(
            parse("deployment.batch/a"),
            Err(ParseTargetError::UnknownKind { .. })
        ));
    }

    #[test]
    fn errors_say_what_is_expected() {
        assert_eq!(parse("  "), Err(ParseTargetError::Empty));
        let e = parse("svc/api").unwrap_err();
        assert!(
            e.to_string().contains("target the deployment behind it"),
            "{e}"
        );
        let e = parse("pid:42").unwrap_err();
        assert!(e.to_string().contains("pid:PID"), "{e}");
        let e = parse("frobnicator/x").unwrap_err();
        assert!(e.to_string().contains("deployment (deploy)"), "{e}");

        assert_eq!(
            parse("deploy"),
            Err(ParseTargetError::MissingName {
                kind: WorkloadKind::Deployment
            })
        );
        assert_eq!(
            parse("deploy/").unwrap_err().to_string(),
            "deployment needs a name: deployment/NAME"
        );

        let e = parse("deploy/api/web").unwrap_err();
        assert!(matches!(e, ParseTargetError::Trailing { .. }));
        assert!(
            e.to_string().contains("deployment/api/container/CONTAINER"),
            "{e}"
        );
        assert!(matches!(
            parse("deploy/api/container/"),
            Err(ParseTargetError::Trailing { .. })
        ));
        assert!(matches!(
            parse("deploy/api/container/web/extra"),
            Err(ParseTargetError::Trailing { .. })
        ));
    }

    #[test]
    fn names_follow_the_api_server_rules() {
        for bad in [
            "deploy/Api",
            "deploy/-api",
            "deploy/api-",
            "deploy/a..b",
            "deploy/a_b",
        ] {
            assert!(
                matches!(
                    parse(bad),
                    Err(ParseTargetError::InvalidName { what: "name", .. })
                ),
                "{bad}"
            );
        }
        let long = format!("pod/{}", "a".repeat(254));
        assert!(matches!(
            parse(&long),
            Err(ParseTargetError::InvalidName { .. })
        ));
        // Container names are labels: no dots, at most 63 characters.
        assert!(matches!(
            parse("pod/a/container/b.c"),
            Err(ParseTargetError::InvalidName {
                what: "container name",
                ..
            })
        ));
        let long = format!("pod/a/container/{}", "c".repeat(64));
        assert!(matches!(
            parse(&long),
            Err(ParseTargetError::InvalidName { .. })
        ));
    }
}
