//! `graft clean`: removes the node-mode agent Jobs (and bare agent pods) that
//! crashed sessions left where the cluster did not, and the Services of
//! `graft expose` sessions whose agent is gone (`graft_kube::clean` chooses
//! them), and lists the pods that carry exited ephemeral agents, which
//! Kubernetes cannot remove. On this machine it first unmounts the dead FUSE
//! mounts a killed `graft mount` left.

use clap::Args;
use graft_kube::clean::{AgentPod, CleanReport};
use graft_kube::connect;

use crate::args::KubeFlags;
use crate::doctor::client_options;
use crate::failure::Failure;

/// `graft clean` flags.
#[derive(Debug, Args)]
pub struct CleanArgs {
    /// Kubernetes access.
    #[command(flatten)]
    pub kube: KubeFlags,
    /// Clean every namespace instead of one (needs `list pods` cluster-wide).
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// Also remove agent pods that still run (their sessions may be live).
    #[arg(long)]
    pub force: bool,
    /// Say what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Output format.
    #[command(flatten)]
    pub output: crate::output::OutputFlag,
}

/// Runs `graft clean`: exit code 0, or 1 when a pod could not be deleted.
pub async fn clean(args: CleanArgs) -> Result<u8, Failure> {
    // This machine first: the dead FUSE mounts of a killed `graft mount`.
    for swept in graft_mount::sweep_stale() {
        println!("removed dead graft mount {}", swept.display());
    }
    let cluster = connect(&client_options(&args.kube))
        .await
        .map_err(|e| Failure::session_error(&e))?;
    let namespace = (!args.all_namespaces).then_some(cluster.namespace.as_str());
    let report = if args.dry_run {
        graft_kube::clean::dry_run(&cluster.client, namespace, args.force).await
    } else {
        graft_kube::clean::clean(&cluster.client, namespace, args.force).await
    }
    .map_err(|e| Failure::session_error(&e))?;
    if args.output.json() {
        let json = crate::output::CleanJson::new(&report, namespace, args.dry_run);
        crate::output::print_json(&json)?;
    } else {
        let scope = match namespace {
            Some(ns) => format!("namespace {ns:?}"),
            None => "any namespace".to_owned(),
        };
        print!("{}", render_report(&report, &scope, args.dry_run));
    }
    Ok(if report.failed.is_empty() { 0 } else { 1 })
}

fn describe(pod: &AgentPod) -> String {
    let session = pod
        .session
        .as_deref()
        .map(|s| format!("session {s}, "))
        .unwrap_or_default();
    format!(
        "{} {}/{} ({session}{})",
        pod.kind, pod.namespace, pod.name, pod.state
    )
}

/// What `graft clean` prints; with `dry_run`, "would remove" for what it would
/// delete.
pub fn render_report(report: &CleanReport, scope: &str, dry_run: bool) -> String {
    let mut out = String::new();
    let removed = if dry_run { "would remove" } else { "removed" };
    for pod in &report.removed {
        out.push_str(&format!("{removed} {}\n", describe(pod)));
    }
    for (pod, error) in &report.failed {
        out.push_str(&format!("could not remove {}: {error}\n", describe(pod)));
    }
    for pod in &report.kept {
        let why = if pod.state.contains("already being deleted") {
            "Kubernetes is removing it"
        } else {
            "its agent still runs, maybe for a live session; --force removes it"
        };
        out.push_str(&format!("left {}: {why}\n", describe(pod)));
    }
    for leftover in &report.ephemeral {
        out.push_str(&format!(
            "left pod {}/{}: exited graft agent container(s) {}; Kubernetes cannot remove \
             ephemeral containers, they go when the pod is replaced (they use no resources)\n",
            leftover.namespace,
            leftover.pod,
            leftover.containers.join(", ")
        ));
    }
    if out.is_empty() {
        out = format!("nothing to clean in {scope}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser;
    use graft_kube::clean::EphemeralLeftover;

    fn parse(args: &[&str]) -> CleanArgs {
        let cli = Cli::try_parse_from(args).unwrap();
        let Command::Clean(args) = cli.command else {
            panic!("not graft clean")
        };
        args
    }

    #[test]
    fn flags_parse_and_all_namespaces_conflicts_with_a_namespace() {
        let a = parse(&["graft", "clean", "-n", "shop", "--force", "--context", "c"]);
        assert_eq!(a.kube.namespace.as_deref(), Some("shop"));
        assert!(a.force);
        assert!(!a.all_namespaces);
        assert!(parse(&["graft", "clean", "--all-namespaces"]).all_namespaces);
        let err = Cli::try_parse_from(["graft", "clean", "-A", "-n", "shop"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    fn pod(name: &str, state: &str) -> AgentPod {
        AgentPod {
            kind: "pod",
            namespace: "shop".into(),
            name: name.into(),
            session: Some("s1".into()),
            state: state.into(),
            terminated: false,
        }
    }

    #[test]
    fn report_says_what_was_removed_and_what_was_left() {
        let report = CleanReport {
            removed: vec![
                pod("graft-agent-a", "Succeeded"),
                AgentPod {
                    kind: "job",
                    ..pod("graft-agent-j", "Complete")
                },
            ],
            kept: vec![pod("graft-agent-b", "running")],
            failed: vec![(pod("graft-agent-c", "Failed"), "forbidden".into())],
            ephemeral: vec![EphemeralLeftover {
                namespace: "shop".into(),
                pod: "api-1".into(),
                containers: vec!["graft-agent-x".into()],
            }],
        };
        let text = render_report(&report, "namespace \"shop\"", false);
        let dry = render_report(&report, "namespace \"shop\"", true);
        assert!(dry.contains("would remove pod shop/graft-agent-a (session s1, Succeeded)"));
        assert!(text.contains("removed pod shop/graft-agent-a (session s1, Succeeded)"));
        assert!(text.contains("removed job shop/graft-agent-j (session s1, Complete)"));
        assert!(text.contains("could not remove pod shop/graft-agent-c"));
        assert!(text.contains("left pod shop/graft-agent-b (session s1, running)"));
        assert!(text.contains("--force removes it"));
        assert!(text.contains("Kubernetes cannot remove ephemeral containers"));
        assert_eq!(
            render_report(&CleanReport::default(), "namespace \"shop\"", false),
            "nothing to clean in namespace \"shop\"\n"
        );
    }
}
