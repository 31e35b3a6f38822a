//! Live cluster (see `graft_tests::cluster`): issue 11 item 4, kubefwd's and
//! ktunnel's jobs. `graft port-forward` reaches a Service by its `NAME.NS` name
//! from a targetless agent; `graft expose` makes a Service whose traffic, from a
//! pod of the cluster, reaches a server on this machine, and leaves nothing
//! behind after Ctrl-C, nor after `kill -9` once `graft clean` ran. The attack:
//! expose does not take over a Service it did not create.

use std::process::Command;
use std::time::Duration;

use graft_tests::cluster::{APP_PORT, Live, Ns, SESSION_TIMEOUT, interrupt};
use graft_tests::{Proc, curl, python, wait_until};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, LogParams};
use nix::sys::signal::Signal;
use serde_json::json;

/// A free local port (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `graft SUBCOMMAND` against the namespace with the suite's agent image.
fn graft(ns: &Ns<'_>, subcommand: &str, args: &[&str]) -> Command {
    let mut command = ns.graft(subcommand);
    command
        .args(["--agent-image", &ns.live.agent_image])
        .args(["--agent-pull-policy", "IfNotPresent"])
        .args(args);
    command
}

fn services(ns: &Ns<'_>) -> Api<Service> {
    Api::namespaced(ns.live.client.clone(), &ns.name)
}

fn service_exists(ns: &Ns<'_>, name: &str) -> bool {
    ns.live
        .block_on(services(ns).get_opt(name))
        .unwrap()
        .is_some_and(|s| s.metadata.deletion_timestamp.is_none())
}

/// A Python HTTP server on this machine at `port` answering `body`.
fn local_server(port: u16, body: &str) -> Proc {
    let program = format!(
        "import http.server\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       b = {body:?}.encode()\n\
         \x20       self.send_response(200); self.send_header('Content-Length', str(len(b)))\n\
         \x20       self.end_headers(); self.wfile.write(b)\n\
         http.server.ThreadingHTTPServer(('127.0.0.1', {port}), H).serve_forever()\n"
    );
    let mut command = Command::new(python());
    command.args(["-c", &program]);
    let server = Proc::spawn(command, "local http server");
    let up = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        curl(&format!("http://127.0.0.1:{port}/")).ok()
    });
    assert_eq!(up.as_deref(), Some(body), "the local server did not start");
    server
}

/// Starts `graft expose` and waits until its Service exists and it says it is ready.
fn expose(ns: &Ns<'_>, local: u16, name: &str, port: u16) -> Proc {
    let command = graft(
        ns,
        "expose",
        &[
            &local.to_string(),
            "--as",
            name,
            "--port",
            &port.to_string(),
        ],
    );
    let mut proc = Proc::spawn(command, "graft expose");
    let ready = wait_until(SESSION_TIMEOUT, Duration::from_millis(250), || {
        if let Some(status) = proc.try_status() {
            panic!("graft expose exited ({status})\n{}", proc.output_report());
        }
        (proc.stderr().contains("Ctrl-C ends it") && service_exists(ns, name)).then_some(())
    });
    assert!(
        ready.is_some(),
        "expose not ready\n{}",
        proc.output_report()
    );
    proc
}

/// A pod of the cluster that GETs `url` (retrying for a minute) and prints the
/// body; returns what it printed.
fn get_from_a_pod(ns: &Ns<'_>, pod: &str, url: &str) -> String {
    let program = format!(
        "import time, urllib.request\n\
         for i in range(60):\n\
         \x20   try:\n\
         \x20       print(urllib.request.urlopen({url:?}, timeout=5).read().decode()); break\n\
         \x20   except Exception as e:\n\
         \x20       print('retry', e, flush=True); time.sleep(1)\n"
    );
    ns.apply(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "client", "image": ns.live.app_image, "imagePullPolicy": "IfNotPresent",
            "command": ["python3", "-u", "-c", program]}]},
    }));
    let pods: Api<Pod> = ns.pods_api();
    let done = wait_until(Duration::from_secs(120), Duration::from_millis(500), || {
        let p = ns.live.block_on(pods.get(pod)).ok()?;
        let phase = p.status?.phase?;
        matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
    });
    let logs = ns
        .live
        .block_on(pods.logs(pod, &LogParams::default()))
        .unwrap_or_default();
    assert_eq!(done.as_deref(), Some("Succeeded"), "client pod: {logs}");
    logs
}

#[test]
fn e2e_port_forward_reaches_a_service_by_its_name() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("pf-fwd");
    ns.workload("Pod", "backend", 1, 1);
    ns.apply(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend"},
        "spec": {"selector": {"app": "backend"}, "ports": [{"port": 80, "targetPort": APP_PORT}]},
    }));
    let (a, b) = (free_port(), free_port());
    let by_name = format!("{a}:backend.{}:80", ns.name);
    let by_fqdn = format!("{b}:backend.{}.svc.cluster.local:80", ns.name);
    let mut proc = Proc::spawn(
        graft(&ns, "port-forward", &["-L", &by_name, "-L", &by_fqdn]),
        "graft port-forward",
    );
    let ready = wait_until(SESSION_TIMEOUT, Duration::from_millis(250), || {
        if let Some(status) = proc.try_status() {
            panic!(
                "graft port-forward exited ({status})\n{}",
                proc.output_report()
            );
        }
        proc.stderr().contains("port-forward ready").then_some(())
    });
    assert!(ready.is_some(), "{}", proc.output_report());
    for port in [a, b] {
        let body = curl(&format!("http://127.0.0.1:{port}/")).unwrap();
        assert!(body.starts_with("backend "), "{body}");
    }
    let outcome = interrupt(proc);
    assert_eq!(outcome.code(), Some(0), "{outcome}");
    assert_eq!(ns.agent_pods_after_cleanup(), 0, "the agent pod is left");
}

#[test]
fn e2e_expose_serves_a_local_server_to_the_cluster_and_cleans_up_on_ctrl_c() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("pf-expose");
    let local = free_port();
    let _server = local_server(local, "hello from the developer's machine");
    let proc = expose(&ns, local, "web-dev", 80);
    let logs = get_from_a_pod(&ns, "client", "http://web-dev/");
    assert!(
        logs.contains("hello from the developer's machine"),
        "{logs}\n{}",
        proc.output_report()
    );
    let outcome = interrupt(proc);
    assert_eq!(outcome.code(), Some(0), "{outcome}");
    assert!(!service_exists(&ns, "web-dev"), "the Service is left");
    assert_eq!(ns.agent_pods_after_cleanup(), 0, "the agent pod is left");
}

#[test]
fn e2e_expose_killed_leaves_what_graft_clean_removes() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("pf-kill");
    let local = free_port();
    let _server = local_server(local, "ok");
    let proc = expose(&ns, local, "web-dev", 8080);
    proc.signal_group(Signal::SIGKILL);
    let _ = proc.finish(Duration::from_secs(10));
    assert!(service_exists(&ns, "web-dev"));
    let mut clean = ns.graft("clean");
    clean.arg("--force");
    let out = Proc::spawn(clean, "graft clean --force").finish(Duration::from_secs(60));
    assert!(out.success(), "{out}");
    assert!(
        out.out().contains("web-dev"),
        "clean does not list the Service: {out}"
    );
    let gone = wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        (!service_exists(&ns, "web-dev")).then_some(())
    });
    assert!(gone.is_some(), "the Service is left after graft clean");
    assert_eq!(ns.agent_pods_after_cleanup(), 0, "the agent pod is left");
}

#[test]
fn e2e_attack_expose_does_not_take_over_a_foreign_service() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("pf-attack");
    ns.apply(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "payments"},
        "spec": {"selector": {"app": "payments"}, "ports": [{"port": 80}]},
    }));
    let local = free_port();
    let command = graft(&ns, "expose", &[&local.to_string(), "--as", "payments"]);
    let out = Proc::spawn(command, "graft expose --as payments").finish(Duration::from_secs(60));
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.to_string().contains("graft did not create it"), "{out}");
    let service = ns.get("v1", "Service", "payments");
    assert_eq!(service["spec"]["selector"], json!({"app": "payments"}));
    assert!(service["metadata"]["labels"].is_null(), "{service}");
    assert_eq!(
        ns.agent_pods(),
        0,
        "an agent was placed for a refused expose"
    );
}
