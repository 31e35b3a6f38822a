//! `graft targets`: what `--target` can name in a namespace (Deployments,
//! StatefulSets, DaemonSets, pods), as a table or `-o json` for pickers such as
//! the VS Code extension. The listing is `graft_kube::targets`'.

use clap::Args;
use graft_kube::connect;
use graft_kube::targets::{TargetEntry, list_targets};
use serde::Serialize;

use crate::args::KubeFlags;
use crate::doctor::client_options;
use crate::failure::Failure;
use crate::output::{OutputFlag, print_json};

/// `graft targets` flags.
#[derive(Debug, Args)]
pub struct TargetsArgs {
    /// Kubernetes access.
    #[command(flatten)]
    pub kube: KubeFlags,
    /// Output format.
    #[command(flatten)]
    pub output: OutputFlag,
}

/// `graft targets -o json`.
#[derive(Debug, Serialize)]
pub struct TargetsJson {
    /// The namespace listed.
    pub namespace: String,
    /// Its targets: Deployments, StatefulSets, DaemonSets, then pods.
    pub targets: Vec<TargetJson>,
}

/// One target in [`TargetsJson`].
#[derive(Debug, Serialize)]
pub struct TargetJson {
    /// The `--target` text: `deploy/api`, `sts/db`, `ds/x`, `pod/api-1`.
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
    /// The containers of its pods (`--target KIND/NAME/container/C`).
    pub containers: Vec<String>,
}

impl From<&TargetEntry> for TargetJson {
    fn from(e: &TargetEntry) -> TargetJson {
        TargetJson {
            target: e.target.clone(),
            kind: e.kind,
            name: e.name.clone(),
            namespace: e.namespace.clone(),
            ready: e.ready,
            desired: e.desired,
            containers: e.containers.clone(),
        }
    }
}

/// Runs `graft targets`.
pub async fn targets(args: TargetsArgs) -> Result<u8, Failure> {
    let cluster = connect(&client_options(&args.kube))
        .await
        .map_err(|e| Failure::session_error(&e))?;
    let list = list_targets(&cluster.client, &cluster.namespace)
        .await
        .map_err(|e| Failure::session_error(&e))?;
    if args.output.json() {
        print_json(&TargetsJson {
            namespace: cluster.namespace.clone(),
            targets: list.iter().map(TargetJson::from).collect(),
        })?;
    } else {
        print!("{}", table(&list, &cluster.namespace));
    }
    Ok(0)
}

/// `TARGET  READY  CONTAINERS`, or a sentence when there is none.
pub fn table(list: &[TargetEntry], namespace: &str) -> String {
    if list.is_empty() {
        return format!("no targets in namespace {namespace:?}\n");
    }
    let width = list
        .iter()
        .map(|e| e.target.chars().count())
        .chain(["TARGET".len()])
        .max()
        .unwrap_or(0);
    let mut out = format!("{:width$}  READY  CONTAINERS\n", "TARGET");
    for e in list {
        let ready = format!("{}/{}", e.ready, e.desired);
        out.push_str(&format!(
            "{:width$}  {ready:5}  {}\n",
            e.target,
            e.containers.join(",")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_each_target() {
        let list = [TargetEntry {
            target: "deploy/api".into(),
            kind: "deployment",
            name: "api".into(),
            namespace: "shop".into(),
            ready: 2,
            desired: 3,
            containers: vec!["app".into(), "proxy".into()],
        }];
        assert_eq!(
            table(&list, "shop"),
            "TARGET      READY  CONTAINERS\ndeploy/api  2/3    app,proxy\n"
        );
        assert_eq!(table(&[], "shop"), "no targets in namespace \"shop\"\n");
    }
}
