//! Live cluster (see `graft_tests::cluster`), issue 11 point 3: `graft connect -n
//! NS` with a targetless agent in the namespace; then plain programs of this
//! machine resolve the cluster's names (`NAME.NS`, the full name, a short name in
//! the connected namespace) through graft's DNS server, reach a Service by name
//! and a pod by an address routed through the tun (`--also-proxy POD/32`: the
//! lab's node is this machine, so it routes the pod and Service ranges itself and
//! graft leaves those alone, as the status says; the Service's ClusterIP is
//! routed the same way, so the names lead through graft), and `graft quit` restores
//! `/etc/resolv.conf` byte for byte and removes the tun.

use std::process::Command;
use std::time::Duration;

use graft_tests::cluster::{APP_PORT, Live};
use graft_tests::machine::{Connected, RESOLV_CONF, TUN};
use graft_tests::{Proc, curl, wait_until};
use serde_json::json;

fn tun_rx_packets() -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{TUN}/statistics/rx_packets"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn e2e_connect_resolves_and_reaches_the_cluster_and_quit_restores() {
    let Some(live) = Live::get() else {
        return;
    };
    let machine = Connected::lock();
    let ns = live.namespace("connect");
    ns.workload("Pod", "backend", 1, 1);
    ns.apply(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend"},
        "spec": {"selector": {"app": "backend"}, "ports": [{"port": 80, "targetPort": APP_PORT}]},
    }));
    let pod = ns.app_addr("app=backend");
    let cluster_ip = ns.get("v1", "Service", "backend")["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut command = ns.graft("connect");
    command.args([
        "--agent-image",
        &live.agent_image,
        "--agent-pull-policy",
        "IfNotPresent",
        "--also-proxy",
        &format!("{}/32", pod.ip()),
        "--also-proxy",
        &format!("{cluster_ip}/32"),
    ]);
    let out = Proc::spawn(command, "graft connect").finish(Duration::from_secs(180));
    out.assert_success();

    let status = Command::new(graft_tests::graft_bin())
        .args(["status", "-o", "json"])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["connected"], true, "{status}");
    assert_eq!(status["target"], "targetless");
    assert_eq!(status["namespace"], ns.name.as_str());
    let listed = |key: &str| -> Vec<String> {
        status[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.get("range").unwrap_or(r).as_str().unwrap().to_owned())
            .collect()
    };
    let all: Vec<String> = [listed("ranges"), listed("skipped")].concat();
    assert!(
        all.iter().any(|r| r == "198.19.160.0/20"),
        "the Service range was discovered: {status}"
    );
    assert!(
        listed("ranges").contains(&format!("{}/32", pod.ip())),
        "{status}"
    );

    // Names, as any program resolves them.
    for name in [
        format!("backend.{}", ns.name),
        format!("backend.{}.svc.cluster.local", ns.name),
        "backend".to_owned(),
    ] {
        let url = format!("http://{name}/");
        let body = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
            curl(&url).ok()
        })
        .unwrap_or_else(|| panic!("{url}: {:?}", curl(&url)));
        assert!(body.starts_with("backend GET /"), "{url}: {body}");
    }
    // A pod address routed through the tun: the request crosses graft.
    let before = tun_rx_packets();
    let body = curl(&format!("http://{pod}/")).unwrap();
    assert!(body.starts_with("backend GET /"), "{body}");
    assert!(tun_rx_packets() > before, "the request went through {TUN}");

    let quit = Command::new(graft_tests::graft_bin())
        .arg("quit")
        .output()
        .unwrap();
    assert!(
        quit.status.success(),
        "{}",
        String::from_utf8_lossy(&quit.stderr)
    );
    assert_eq!(std::fs::read(RESOLV_CONF).unwrap(), machine.original_resolv);
    assert!(!Connected::tun_exists());
    assert!(curl(&format!("http://backend.{}/", ns.name)).is_err());
}
