//! Live cluster (see `graft_tests::cluster`, which also says how to set it up):
//! graft's main job in both agent modes. A sample server `web` (Deployment)
//! whose container `app` has `WHO=app` in its environment and the sample
//! fixtures mounted at `/fixtures` (a path that exists only in the pod), and a
//! cluster-only `backend` (Pod + Service). For each mode
//! (`--agent-mode ephemeral|node`), `graft run --target deploy/web/container/app --steal`
//! runs a local program that prints the pod's variable, the first line of a
//! pod-only file and the answer of `backend.NS.svc.cluster.local` (cluster DNS
//! and outgoing traffic through the pod), then serves HTTP: a request to the
//! pod's address must reach it. After Ctrl-C no agent pod is left and the pod
//! serves again. The agent image these sessions use is the one the suite was
//! given (`GRAFT_E2E_AGENT_IMAGE`, in CI built from the commit under test);
//! [`e2e_agent_image_runs`] checks that image on its own.

use std::time::Duration;

use graft_tests::cluster::{
    APP_PORT, Live, SESSION_TIMEOUT, interrupt, py_with, wait_restored, wait_served_by,
};
use graft_tests::fixture;
use serde_json::json;

fn main_job(mode: &str) {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace(mode);
    ns.workload("Deployment", "web", 1, 1);
    ns.workload("Pod", "backend", 1, 1);
    ns.apply(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend"},
        "spec": {"selector": {"app": "backend"}, "ports": [{"port": 80, "targetPort": APP_PORT}]},
    }));
    assert!(
        !std::path::Path::new("/fixtures/named_http.py").exists(),
        "/fixtures exists on this machine: the pod-only file would not prove a remote read"
    );
    let addr = ns.app_addr("app=web");
    let program = format!(
        "import os, sys, runpy, urllib.request\n\
         print(os.environ.get('WHO'))\n\
         print(open('/fixtures/named_http.py').readline().strip())\n\
         print(urllib.request.urlopen('http://backend.{ns}.svc.cluster.local/', timeout=10).read().decode())\n\
         sys.stdout.flush()\n\
         sys.argv = ['named_http.py', 'local', '{APP_PORT}']\n\
         runpy.run_path('{server}', run_name='__main__')\n",
        ns = ns.name,
        server = fixture("named_http.py").display(),
    );
    let graft = ns.run(
        "deploy/web/container/app",
        &["--agent-mode", mode, "--steal"],
        &[py_with(""), "-u".into(), "-c".into(), program],
    );
    wait_served_by(addr, "local", SESSION_TIMEOUT, Some(&graft));
    let out = graft.stdout();
    let lines: Vec<&str> = out.lines().take(3).collect();
    let first_line = std::fs::read_to_string(fixture("named_http.py")).unwrap();
    assert_eq!(
        lines,
        [
            "app",
            first_line.lines().next().unwrap().trim(),
            "backend GET / len=0 user=- proto=http/1.1"
        ],
        "{mode}: env, pod-only file, cluster DNS + outgoing\n{}",
        graft.output_report()
    );
    if mode == "node" {
        assert_eq!(ns.agent_pods(), 1, "node mode runs one agent pod");
    }
    let outcome = interrupt(graft);
    println!("{mode}: {outcome}");
    wait_restored(&ns, addr, "web");
}

#[test]
fn e2e_mode_ephemeral() {
    main_job("ephemeral");
}

#[test]
fn e2e_mode_node() {
    main_job("node");
}

/// The agent image itself: a pod running it starts the agent binary, which
/// prints its version (the image holds a self-contained root filesystem).
#[test]
fn e2e_agent_image_runs() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("image");
    ns.apply(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent"},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "agent", "image": live.agent_image, "imagePullPolicy": "IfNotPresent",
            "args": ["--version"],
        }]},
    }));
    let pods = ns.pods_api();
    let phase =
        graft_tests::wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
            let pod = live.block_on(pods.get("agent")).ok()?;
            let phase = pod.status?.phase?;
            matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
        });
    let logs = live
        .block_on(pods.logs("agent", &Default::default()))
        .unwrap_or_else(|e| format!("(no logs: {e})"));
    assert_eq!(
        phase.as_deref(),
        Some("Succeeded"),
        "the agent image's pod did not succeed; logs: {logs}"
    );
    assert!(
        logs.contains(env!("CARGO_PKG_VERSION")),
        "the agent image printed {logs:?}, not version {}",
        env!("CARGO_PKG_VERSION")
    );
}

/// Ctrl-C (SIGINT to graft's process group, as a terminal sends it) while a
/// request is being served: graft ends within 30 s, the local program with it
/// (nothing is left in the group), the ephemeral agent container terminates,
/// and the pod answers again.
#[test]
fn e2e_ctrl_c_ends_the_session_and_the_agent() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("ctrlc");
    ns.workload("Pod", "web", 1, 1);
    let addr = ns.app_addr("app=web");
    let graft = ns.run(
        "pod/web/container/app",
        &["--steal"],
        &graft_tests::cluster::local_server("local", ""),
    );
    wait_served_by(addr, "local", SESSION_TIMEOUT, Some(&graft));
    let group = nix::unistd::Pid::from_raw(graft.pid() as i32);
    // A slow request in flight (its answer would come after 5 s).
    let slow = std::thread::spawn(move || graft_tests::cluster::served_by(addr, "/slow/5000"));
    std::thread::sleep(Duration::from_millis(500));
    let outcome = interrupt(graft);
    println!("{outcome}");
    let _ = slow.join();
    let gone = graft_tests::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        nix::sys::signal::killpg(group, None).is_err().then_some(())
    });
    assert!(gone.is_some(), "a process of graft's group outlived Ctrl-C");
    let pods = ns.pods_api();
    let agents_ended =
        graft_tests::wait_until(Duration::from_secs(30), Duration::from_millis(500), || {
            let pod = live.block_on(pods.get("web")).ok()?;
            let statuses = pod.status?.ephemeral_container_statuses.unwrap_or_default();
            let ended = !statuses.is_empty()
                && statuses
                    .iter()
                    .all(|s| s.state.as_ref().is_some_and(|st| st.terminated.is_some()));
            ended.then_some(())
        });
    assert!(
        agents_ended.is_some(),
        "the ephemeral agent still runs after Ctrl-C"
    );
    wait_restored(&ns, addr, "web");
}
