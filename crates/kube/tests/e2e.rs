//! End-to-end checks against a live cluster, run only when
//! `GRAFT_E2E_KUBECONFIG` names a kubeconfig; without it each test prints
//! `skipped: GRAFT_E2E_KUBECONFIG not set` and returns (a skip, not a pass).
//!
//! Optional variables:
//! - `GRAFT_E2E_TARGET`: a target of yours to resolve (without it
//!   `resolves_a_target_in_the_cluster` prints `skipped: …`; the live suite of
//!   `tests/tests/e2e_targets.rs` resolves every kind on workloads it creates);
//! - `GRAFT_E2E_NAMESPACE`: the namespace (default: the context's).
//!
//! What runs: connect with that kubeconfig, resolve the target, check the
//! result is a running pod with a container ID and a node; resolve a name
//! that does not exist and check the error lists what does.

use graft_kube::{ClientOptions, KubeError, KubeTarget, connect, resolve};

/// The kubeconfig to use, or `None` after printing the skip line.
fn kubeconfig() -> Option<std::path::PathBuf> {
    match std::env::var_os("GRAFT_E2E_KUBECONFIG") {
        Some(path) if !path.is_empty() => Some(path.into()),
        _ => {
            println!("skipped: GRAFT_E2E_KUBECONFIG not set");
            None
        }
    }
}

fn options(kubeconfig: std::path::PathBuf) -> ClientOptions {
    ClientOptions {
        kubeconfig: Some(kubeconfig),
        context: None,
        namespace: std::env::var("GRAFT_E2E_NAMESPACE").ok(),
    }
}

#[tokio::test]
async fn resolves_a_target_in_the_cluster() {
    let Some(kubeconfig) = kubeconfig() else {
        return;
    };
    let cluster = connect(&options(kubeconfig))
        .await
        .expect("the e2e kubeconfig loads");
    let Some(target) = std::env::var("GRAFT_E2E_TARGET")
        .ok()
        .filter(|t| !t.is_empty())
    else {
        println!("skipped: GRAFT_E2E_TARGET not set (no target of yours to resolve)");
        return;
    };
    let target: KubeTarget = target.parse().expect("GRAFT_E2E_TARGET is a valid target");

    let resolution = resolve(&cluster.client, &cluster.namespace, &target)
        .await
        .unwrap_or_else(|e| panic!("resolving {target} in {}: {e}", cluster.namespace));
    let t = &resolution.target;
    println!(
        "{target} -> pod {}/{} container {} ({}) id {}:{} on node {}; candidates {:?}",
        t.namespace,
        t.pod,
        t.container.name,
        t.container.reason,
        t.container_runtime,
        t.container_id,
        t.node,
        resolution.candidates
    );
    assert_eq!(t.namespace, cluster.namespace);
    assert_eq!(resolution.candidates.first(), Some(&t.pod));
    assert!(!t.pod_uid.is_empty());
    assert!(!t.container_id.is_empty());
    assert!(!t.container_id.contains("://"));
    assert!(!t.node.is_empty());
}

#[tokio::test]
async fn a_missing_target_says_what_exists() {
    let Some(kubeconfig) = kubeconfig() else {
        return;
    };
    let cluster = connect(&options(kubeconfig))
        .await
        .expect("the e2e kubeconfig loads");
    let target: KubeTarget = "deploy/graft-e2e-does-not-exist".parse().unwrap();
    let err = resolve(&cluster.client, &cluster.namespace, &target)
        .await
        .expect_err("the deployment does not exist");
    println!("{err}");
    assert!(
        matches!(
            err,
            KubeError::NotFound { .. } | KubeError::Forbidden { .. }
        ),
        "{err:?}"
    );
}
