//! Live cluster (see `graft_tests::cluster`): graft's other commands and its
//! behaviour when things go wrong. `graft ls` on a pod held by two node-mode
//! sessions; `graft doctor` in a `privileged` namespace (no check fails) and in
//! a `baseline` one (it says Pod Security forbids the agent, in both modes, and
//! `graft run` there fails cleanly); a ServiceAccount bound to the ClusterRole
//! of `deploy/rbac.yaml` and nothing else, with which `run` (both modes), `ls`,
//! `doctor` and `clean` all work (and which is refused elsewhere); `graft
//! clean` after `kill -9` of a node-mode session; and the port-forward cut for
//! real (`ss -K` on graft's TCP connections to the API server) in the middle of
//! a 32 MiB stolen response (both modes) and of a 32 MiB download by the local
//! program from a cluster pod: graft relinks and every byte arrives.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use graft_tests::cluster::{
    APP_PORT, ClusterObject, Live, Ns, SESSION_TIMEOUT, app_pod, interrupt, local_server,
    local_server_on, output, py_with, rbac_yaml, served_by, service_account_kubeconfig,
    wait_restored, wait_served_by,
};
use graft_tests::{Outcome, Proc, wait_until};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// Runs a prepared graft command to its end (bounded by 120 s).
fn finish(command: std::process::Command, what: &str) -> Outcome {
    Proc::spawn(command, what).finish(Duration::from_secs(120))
}

/// `graft ls --target TARGET` as the kubeconfig `kubeconfig`; the rows of its
/// listing that name a stolen port.
fn ls_rows(ns: &Ns<'_>, kubeconfig: &str, target: &str) -> Vec<String> {
    let mut command = ns.graft_as("ls", kubeconfig);
    command.args(["--target", target]);
    let out = finish(command, "graft ls");
    assert!(out.success(), "graft ls failed\n{out}");
    out.lines()
        .into_iter()
        .filter(|l| l.contains("steal") && l.split_whitespace().any(|w| w == "8080"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn e2e_ls_lists_node_mode_sessions() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("ls");
    ns.workload("Pod", "web", 1, 1);
    let addr = ns.app_addr("app=web");
    let mut sessions = Vec::new();
    for (user, port) in [("alice", APP_PORT), ("bob", 9001)] {
        let filter = format!("x-user: {user}");
        let map = format!("{port}:{APP_PORT}");
        let graft = ns.run(
            "pod/web/container/app",
            &[
                "--agent-mode",
                "node",
                "--steal",
                "--filter-header",
                &filter,
                "--port-map",
                &map,
            ],
            &local_server_on(user, "", port),
        );
        sessions.push(graft);
    }
    let host = addr.ip().to_string();
    let port = APP_PORT.to_string();
    for (graft, user) in sessions.iter().zip(["alice", "bob"]) {
        let spec = format!("user={user}");
        let taken = wait_until(SESSION_TIMEOUT, Duration::from_millis(300), || {
            let mut command = std::process::Command::new(py_with(""));
            command
                .arg(graft_tests::fixture_str("http_client.py"))
                .args(["conn", &host, &port, &spec]);
            let out = Proc::spawn(command, "http_client.py").finish(Duration::from_secs(30));
            out.out()
                .contains(&format!("\"served_by\": \"{user}\""))
                .then_some(())
        });
        assert!(
            taken.is_some(),
            "{user}'s session\n{}",
            graft.output_report()
        );
    }
    let rows = ls_rows(&ns, &live.kubeconfig, "pod/web");
    assert_eq!(rows.len(), 2, "graft ls: {rows:#?}");
    for user in ["alice", "bob"] {
        assert!(
            rows.iter().any(|r| r.contains(&format!("x-user: {user}"))),
            "graft ls lacks {user}'s session: {rows:#?}"
        );
    }
    for graft in sessions {
        println!("{}", interrupt(graft));
    }
    wait_restored(&ns, addr, "web");
    assert_eq!(
        ls_rows(&ns, &live.kubeconfig, "pod/web"),
        Vec::<String>::new()
    );
    assert_eq!(
        ns.agent_pods_after_cleanup(),
        0,
        "graft ls left its agent pod"
    );
}

/// The sample pod `web` without hostPath volumes (which the `baseline` level
/// refuses by itself).
fn plain_pod(live: &Live) -> Value {
    let mut spec = app_pod(live, "web");
    spec["volumes"] = json!([{"name": "fixtures", "configMap": {"name": "fixtures"}}]);
    for container in spec["containers"].as_array_mut().unwrap() {
        container["volumeMounts"] = json!([{"name": "fixtures", "mountPath": "/fixtures"}]);
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "web", "labels": {"app": "web"}}, "spec": spec})
}

#[test]
fn e2e_doctor_passes_and_names_a_forbidding_pod_security_level() {
    let Some(live) = Live::get() else {
        return;
    };
    let ok = live.namespace("doctor");
    ok.apply(plain_pod(&live));
    ok.wait_ready("app=web", 1);
    for mode in ["ephemeral", "node"] {
        let mut command = ok.graft("doctor");
        command.args(["--target", "pod/web", "--agent-mode", mode]);
        let out = finish(command, "graft doctor");
        assert!(
            out.success(),
            "{mode}: doctor fails in a privileged namespace\n{out}"
        );
        assert!(out.out().contains("no check failed"), "{out}");
    }

    let strict = live.namespace_with("psa", "baseline");
    strict.apply(plain_pod(&live));
    let addr = strict.app_addr("app=web");
    for mode in ["ephemeral", "node"] {
        let mut command = strict.graft("doctor");
        command.args(["--target", "pod/web", "--agent-mode", mode]);
        let out = finish(command, "graft doctor");
        assert_eq!(out.code(), Some(1), "{mode}\n{out}");
        let line = out
            .lines()
            .into_iter()
            .find(|l| l.starts_with("pod security"))
            .unwrap_or_default()
            .to_owned();
        assert!(
            line.contains("FAIL") && line.contains("enforce=baseline"),
            "{mode}: doctor does not say Pod Security forbids the agent\n{out}"
        );
        assert!(
            out.out().contains("privileged"),
            "{mode}: no fix named\n{out}"
        );

        // The attack: run anyway. The API server refuses the agent; graft says
        // why, ends, and leaves the pod serving.
        let graft = strict.run(
            "pod/web/container/app",
            &["--agent-mode", mode, "--steal"],
            &local_server("local", ""),
        );
        let out = graft.finish(Duration::from_secs(120));
        assert!(
            !out.success(),
            "{mode}: graft ran in a baseline namespace\n{out}"
        );
        assert!(
            out.stderr.contains("privileged"),
            "{mode}: graft's error does not name the Pod Security level\n{out}"
        );
        assert_eq!(
            strict.agent_pods_after_cleanup(),
            0,
            "{mode}: an agent pod was left"
        );
        assert_eq!(served_by(addr, "/"), "web");
    }
}

#[test]
fn e2e_every_command_works_with_only_the_graft_cluster_role() {
    let Some(live) = Live::get() else {
        return;
    };
    let role = format!("e2e-graft-{:x}", std::process::id());
    let text = std::fs::read_to_string(rbac_yaml()).expect("deploy/rbac.yaml");
    let mut cluster_role: Value = serde_saphyr::from_str(&text).expect("deploy/rbac.yaml parses");
    cluster_role["metadata"]["name"] = json!(role);
    let _role = ClusterObject::apply(&live, cluster_role);
    let ns = live.namespace("rbac");
    ns.apply(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "dev"}}));
    ns.apply(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "graft"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": "dev", "namespace": ns.name}],
    }));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    service_account_kubeconfig(&live, &ns.name, "dev", &path);
    let kubeconfig = path.display().to_string();
    ns.workload("Deployment", "web", 1, 1);
    let addr = ns.app_addr("app=web");

    {
        // doctor: every permission there, no check fails; elsewhere refused.
        let mut command = ns.graft_as("doctor", &kubeconfig);
        command.args(["--target", "deploy/web"]);
        let out = finish(command, "graft doctor (service account)");
        assert!(
            out.success() && out.out().contains("no check failed"),
            "{out}"
        );
        let mut command = std::process::Command::new(graft_tests::graft_bin());
        command.args(["doctor", "--kubeconfig", &kubeconfig, "-n", "kube-system"]);
        let out = finish(command, "graft doctor -n kube-system (service account)");
        assert!(!out.success(), "the service account is not confined\n{out}");
        // clean -A needs cluster-wide access, which a RoleBinding does not give:
        // graft says so and how to check it.
        let mut command = std::process::Command::new(graft_tests::graft_bin());
        command.args(["clean", "--kubeconfig", &kubeconfig, "--all-namespaces"]);
        let out = finish(command, "graft clean -A (service account)");
        assert!(
            !out.success()
                && out.stderr.contains("in all namespaces")
                && out.stderr.contains("kubectl auth can-i list ")
                && out.stderr.contains("--all-namespaces"),
            "graft clean -A does not say it needs cluster-wide access\n{out}"
        );

        for mode in ["ephemeral", "node"] {
            let mut command = ns.graft_as("run", &kubeconfig);
            command
                .args(["--target", "deploy/web/container/app", "--agent-mode", mode])
                .arg("--steal")
                .arg("--")
                .args(local_server("local", ""));
            let graft = Proc::spawn(command, &format!("graft run ({mode}, service account)"));
            wait_served_by(addr, "local", SESSION_TIMEOUT, Some(&graft));
            if mode == "ephemeral" {
                println!("{}", interrupt(graft));
                wait_restored(&ns, addr, "web");
                continue;
            }
            // ls while the node-mode session holds the pod.
            let rows = ls_rows(&ns, &kubeconfig, "deploy/web");
            assert_eq!(rows.len(), 1, "graft ls (service account): {rows:#?}");
            // A crash: the agent pod stays; clean removes it.
            graft.signal_group(Signal::SIGKILL);
            drop(graft);
            let mut command = ns.graft_as("clean", &kubeconfig);
            command.arg("--force");
            let out = finish(command, "graft clean --force (service account)");
            assert!(out.success(), "{out}");
            wait_restored(&ns, addr, "web");
        }
    }
}

#[test]
fn e2e_clean_removes_what_a_killed_session_left() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("clean");
    ns.workload("Pod", "web", 1, 1);
    let addr = ns.app_addr("app=web");
    // A terminated agent pod as a crashed session leaves it (graft's labels).
    let labels = json!({
        "app.kubernetes.io/managed-by": "graft",
        "app.kubernetes.io/name": "graft-agent",
        "graft.dev/session": "0123456789abcdef",
    });
    ns.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "graft-agent-leftover", "labels": labels},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [{
            "name": "agent", "image": live.app_image, "imagePullPolicy": "IfNotPresent",
            "command": ["python3", "-c", "pass"],
        }]},
    }));
    let pods = ns.pods_api();
    let done = wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        let phase = live
            .block_on(pods.get("graft-agent-leftover"))
            .ok()?
            .status?
            .phase?;
        (phase == "Succeeded").then_some(())
    });
    assert!(done.is_some(), "the leftover pod did not complete");

    // A live node-mode session, then kill -9 of graft.
    let graft = ns.run(
        "pod/web/container/app",
        &["--agent-mode", "node", "--steal"],
        &local_server("local", ""),
    );
    wait_served_by(addr, "local", SESSION_TIMEOUT, Some(&graft));
    graft.signal_group(Signal::SIGKILL);
    drop(graft);

    // Without --force only the terminated pod goes.
    let out = finish(ns.graft("clean"), "graft clean");
    assert!(out.success(), "{out}");
    let gone = wait_until(Duration::from_secs(30), Duration::from_millis(500), || {
        let pod = live.block_on(pods.get_opt("graft-agent-leftover")).ok()?;
        pod.is_none_or(|p| p.metadata.deletion_timestamp.is_some())
            .then_some(())
    });
    assert!(
        gone.is_some(),
        "graft clean kept a terminated agent pod\n{out}"
    );
    let out = finish(
        {
            let mut command = ns.graft("clean");
            command.arg("--force");
            command
        },
        "graft clean --force",
    );
    assert!(out.success(), "{out}");
    wait_restored(&ns, addr, "web");
}

/// A Python HTTP server on [`APP_PORT`] that answers `/big` with 32 MiB (byte
/// `i` is `i % 251`) in 256 KiB pieces 20 ms apart (so a transfer lasts long
/// enough to be cut), `/peer` with the client's address, and anything else
/// with `NAME`.
fn big_server(name: &str) -> String {
    format!(
        "import http.server, sys, time\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       if self.path != '/big':\n\
         \x20           b = (self.client_address[0] if self.path == '/peer' else '{name}').encode()\n\
         \x20           self.send_response(200); self.send_header('Content-Length', str(len(b)))\n\
         \x20           self.end_headers(); self.wfile.write(b); return\n\
         \x20       piece = bytes(i % 251 for i in range(251 * 1044))\n\
         \x20       total = 32 << 20\n\
         \x20       self.send_response(200); self.send_header('Content-Length', str(total))\n\
         \x20       self.end_headers()\n\
         \x20       sent = 0\n\
         \x20       while sent < total:\n\
         \x20           n = min(len(piece), total - sent)\n\
         \x20           self.wfile.write(piece[:n]); sent += n; time.sleep(0.02)\n\
         \x20   def log_message(self, *a): pass\n\
         http.server.ThreadingHTTPServer(('', {APP_PORT}), H).serve_forever()\n"
    )
}

/// The pids' TCP connections to port 6443 (the API server), as local ports.
fn api_connections(pid: u32) -> Vec<u16> {
    let listing = output("ss", &["-tnpH", "state", "established", "dport", "= :6443"]);
    let owner = format!("pid={pid},");
    listing
        .lines()
        .filter(|l| l.contains(&owner))
        .filter_map(|l| {
            let local = l.split_whitespace().nth(2)?;
            local.rsplit(':').next()?.parse().ok()
        })
        .collect()
}

#[test]
fn e2e_port_forward_cut_mid_transfer_loses_nothing_ephemeral() {
    cut_mid_transfer("ephemeral");
}

#[test]
fn e2e_port_forward_cut_mid_transfer_loses_nothing_node() {
    cut_mid_transfer("node");
}

fn cut_mid_transfer(mode: &str) {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace(&format!("cut-{mode}"));
    ns.workload("Pod", "web", 1, 1);
    let addr = ns.app_addr("app=web");
    // 32 MiB, byte i = i % 251, sent in 256 KiB pieces 20 ms apart.
    let server = big_server("local");
    let mut graft = ns.run(
        "pod/web/container/app",
        &["--agent-mode", mode, "--steal"],
        &[py_with(""), "-c".into(), server],
    );
    wait_served_by(addr, "local", SESSION_TIMEOUT, Some(&graft));
    let before = api_connections(graft.pid());
    assert!(
        !before.is_empty(),
        "graft has no connection to the API server"
    );

    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(stream, "GET /big HTTP/1.0\r\nHost: web\r\n\r\n").unwrap();
    let mut received = Vec::with_capacity(33 << 20);
    let mut buf = vec![0; 64 << 10];
    let mut cut = false;
    loop {
        let n = stream.read(&mut buf).unwrap_or_else(|e| {
            panic!(
                "the stolen response broke after {} bytes: {e}\n{}",
                received.len(),
                graft.output_report()
            )
        });
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
        if !cut && received.len() > 4 << 20 {
            cut = true;
            for port in api_connections(graft.pid()) {
                output(
                    "ss",
                    &[
                        "-K",
                        "state",
                        "established",
                        "sport",
                        &format!("= :{port}"),
                        "dport",
                        "= :6443",
                    ],
                );
            }
            let left = api_connections(graft.pid());
            assert!(
                left.iter().all(|p| !before.contains(p)),
                "ss -K did not cut graft's connections {before:?} (kernel without \
                 CONFIG_INET_DIAG_DESTROY?)"
            );
        }
    }
    assert!(cut, "the response ended before the cut");
    let start = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer")
        + 4;
    let body = &received[start..];
    assert_eq!(
        body.len(),
        32 << 20,
        "bytes lost across the cut\n{}",
        graft.output_report()
    );
    let wrong = body
        .iter()
        .enumerate()
        .position(|(i, b)| usize::from(*b) != i % 251);
    assert_eq!(wrong, None, "the body differs after the cut");
    // The session goes on over new connections.
    assert_eq!(served_by(addr, "/"), "local", "{}", graft.output_report());
    assert!(graft.try_status().is_none(), "graft ended after the cut");
    println!("{}", interrupt(graft));
    wait_restored(&ns, addr, "web");
}

/// The other direction: the local program downloads 32 MiB from a cluster-only
/// pod through graft's outgoing path, and the port-forward is cut while it does.
#[test]
fn e2e_port_forward_cut_mid_download_loses_nothing() {
    let Some(live) = Live::get() else {
        return;
    };
    let ns = live.namespace("cutout");
    let server = big_server("backend");
    ns.workload_serving("Pod", "backend", 1, 1, &["python3", "-c", &server]);
    ns.workload("Pod", "web", 1, 1);
    let backend = ns.app_addr("app=backend");
    let web_ip = ns.app_addr("app=web").ip();
    // Reads 4 MiB, says so, waits for the cut, reads the rest, checks it.
    let program = format!(
        "import sys, time, urllib.request\n\
         peer = urllib.request.urlopen('http://{backend}/peer', timeout=10).read().decode()\n\
         print('peer', peer, flush=True)\n\
         r = urllib.request.urlopen('http://{backend}/big', timeout=60)\n\
         data = bytearray(r.read(4 << 20))\n\
         print('progress', len(data), flush=True)\n\
         time.sleep(2)\n\
         while True:\n\
         \x20   chunk = r.read(1 << 20)\n\
         \x20   if not chunk: break\n\
         \x20   data += chunk\n\
         want = (bytes(range(251)) * (len(data) // 251 + 1))[:len(data)]\n\
         bad = None if data == want else next(i for i in range(len(data)) if data[i] != want[i])\n\
         print('done', len(data), 'bad', bad, flush=True)\n"
    );
    let graft = ns.run(
        "pod/web/container/app",
        &[],
        &[py_with(""), "-c".into(), program],
    );
    let progress = wait_until(SESSION_TIMEOUT, Duration::from_millis(50), || {
        graft.stdout().contains("progress").then_some(())
    });
    assert!(
        progress.is_some(),
        "the download did not start\n{}",
        graft.output_report()
    );
    assert!(
        graft.stdout().contains(&format!("peer {web_ip}\n")),
        "the download does not come from the pod's address {web_ip}\n{}",
        graft.output_report()
    );
    let before = api_connections(graft.pid());
    assert!(
        !before.is_empty(),
        "graft has no connection to the API server"
    );
    for port in &before {
        let sport = format!("= :{port}");
        output(
            "ss",
            &[
                "-K",
                "state",
                "established",
                "sport",
                &sport,
                "dport",
                "= :6443",
            ],
        );
    }
    let left = api_connections(graft.pid());
    assert!(
        left.iter().all(|p| !before.contains(p)),
        "ss -K did not cut graft's connections {before:?}"
    );
    let outcome = graft.finish(Duration::from_secs(120));
    assert!(
        outcome
            .out()
            .contains(&format!("done {} bad None", 32 << 20)),
        "bytes lost or changed across the cut\n{outcome}"
    );
    assert_eq!(ns.agent_pods_after_cleanup(), 0);
}
