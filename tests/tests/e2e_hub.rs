//! Issue 9 (`graft ls` and shared hubs across agent modes) on a live Kubernetes
//! cluster, run only when `GRAFT_E2E_KUBECONFIG`, `GRAFT_E2E_AGENT_IMAGE` and
//! `GRAFT_E2E_APP_IMAGE` are set (see `e2e_cluster.rs`); without them the test
//! prints `skipped: …` and returns.
//!
//! In a namespace of its own (`e2e-hub-…`, Pod Security `privileged`, deleted at
//! the end), `deploy/web` serves HTTP naming itself. Two header-filtered steal
//! sessions in *ephemeral* mode (alice, bob) hold its port; `graft ls --target
//! deploy/web` — whose short-lived agent is a node-mode pod, in another PID
//! namespace than the ephemeral agents — must list both. Then a third session in
//! *node* mode (carol) joins the same hub: requests with each header reach their
//! session, the rest the pod, and `graft ls` lists all three.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graft_tests::{graft_bin, python};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{AttachParams, DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;
use tokio::io::AsyncReadExt;

/// A server that answers every GET with its first argument.
const SERVER: &str = "import http.server,sys\n\
class H(http.server.BaseHTTPRequestHandler):\n    \
    def do_GET(self):\n        \
        b=sys.argv[1].encode()\n        \
        self.send_response(200);self.send_header('Content-Length',str(len(b)));self.end_headers();self.wfile.write(b)\n    \
    def log_message(self,*a): pass\n\
http.server.ThreadingHTTPServer(('',int(sys.argv[2])),H).serve_forever()\n";

struct E2e {
    kubeconfig: String,
    agent_image: String,
    app_image: String,
}

fn settings() -> Option<E2e> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (Some(kubeconfig), Some(agent_image), Some(app_image)) = (
        var("GRAFT_E2E_KUBECONFIG"),
        var("GRAFT_E2E_AGENT_IMAGE"),
        var("GRAFT_E2E_APP_IMAGE"),
    ) else {
        println!(
            "skipped: set GRAFT_E2E_KUBECONFIG, GRAFT_E2E_AGENT_IMAGE and GRAFT_E2E_APP_IMAGE \
             to run the live hub tests"
        );
        return None;
    };
    Some(E2e {
        kubeconfig,
        agent_image,
        app_image,
    })
}

fn web(image: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{
                    "name": "web", "image": image, "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", "exec python3 -c \"$SERVER\" pod 8080"],
                    "env": [{"name": "SERVER", "value": SERVER}],
                    "ports": [{"containerPort": 8080}],
                    // exec: a network probe keeps the node's connections (this
                    // machine's test clients) on the target.
                    "readinessProbe": {"exec": {"command": ["python3", "-S", "-c", "import socket; socket.create_connection(('127.0.0.1', 8080), 1)"]}, "periodSeconds": 1},
                }]},
            },
        },
    }))
    .expect("a valid Deployment")
}

fn service() -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .expect("a valid Service")
}

/// A client pod to send requests from inside the cluster.
fn client_pod(image: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "client"},
        "spec": {"containers": [{
            "name": "client", "image": image, "imagePullPolicy": "IfNotPresent",
            "command": ["sleep", "3600"],
        }]},
    }))
    .expect("a valid Pod")
}

async fn wait_until_async<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// GET `url` with `header` (empty for none) from the client pod; the body, or
/// the error.
async fn get(pods: &Api<Pod>, url: &str, header: &str) -> String {
    let headers = match header.split_once(':') {
        Some((k, v)) => format!("{{'{}':'{}'}}", k.trim(), v.trim()),
        None => "{}".into(),
    };
    let code = format!(
        "import urllib.request\n\
         try:\n    \
             print(urllib.request.urlopen(urllib.request.Request('{url}',headers={headers}),timeout=5).read().decode())\n\
         except Exception as e:\n    \
             print('error', e)"
    );
    let Ok(mut attached) = pods
        .exec(
            "client",
            vec!["python3", "-c", &code],
            &AttachParams::default().stdout(true).stderr(false),
        )
        .await
    else {
        return "exec failed".into();
    };
    let mut out = String::new();
    if let Some(mut stdout) = attached.stdout() {
        let _ = stdout.read_to_string(&mut out).await;
    }
    let _ = attached.join().await;
    out.trim().to_owned()
}

/// Starts a filtered steal session in `mode` whose local server answers `name`.
fn session(e2e: &E2e, ns: &str, mode: &str, name: &str, port: u16) -> Child {
    Command::new(graft_bin())
        .args(["run", "--kubeconfig", &e2e.kubeconfig, "-n", ns])
        .args(["--target", "deploy/web", "--agent-mode", mode])
        .args(["--agent-image", &e2e.agent_image])
        .args(["--agent-pull-policy", "IfNotPresent", "--steal"])
        .args(["--filter-header", &format!("x-user: {name}")])
        .args(["--port-map", &format!("{port}:8080")])
        .args(["--", python(), "-c", SERVER, name, &port.to_string()])
        .env("USER", format!("e2e-{name}"))
        .env_remove("SUDO_USER")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("graft starts")
}

/// `graft ls --target deploy/web`: its status and output.
async fn ls(e2e: &E2e, ns: &str) -> (bool, String) {
    let mut command = tokio::process::Command::new(graft_bin());
    command
        .args(["ls", "--kubeconfig", &e2e.kubeconfig, "-n", ns])
        .args(["--target", "deploy/web", "--agent-image", &e2e.agent_image])
        .args(["--agent-pull-policy", "IfNotPresent"]);
    let out = command.output().await.expect("graft ls runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn graft_ls_and_mixed_mode_sessions_share_the_pods_hub() {
    let Some(e2e) = settings() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let kubeconfig = Kubeconfig::read_from(&e2e.kubeconfig).expect("the kubeconfig loads");
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("a client config");
        let client = Client::try_from(config).expect("a client");
        let ns = format!("e2e-hub-{:x}", std::process::id());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": {"name": ns, "labels": {"pod-security.kubernetes.io/enforce": "privileged"}},
        }))
        .unwrap();
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .expect("creating the test namespace");
        let sessions = Arc::new(Mutex::new(Vec::new()));
        let result = tokio::spawn(run_in(client.clone(), ns.clone(), e2e, sessions.clone())).await;
        for pid in sessions.lock().unwrap().iter().copied() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
        if let Err(e) = result {
            std::panic::resume_unwind(e.into_panic());
        }
    });
}

/// Runs the scenario; the pids of the graft sessions to end go to `pids`.
async fn run_in(client: Client, ns: String, e2e: E2e, pids: Arc<Mutex<Vec<u32>>>) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pp = PostParams::default();
    deployments
        .create(&pp, &web(&e2e.app_image))
        .await
        .expect("creating deploy/web");
    services.create(&pp, &service()).await.expect("svc/web");
    pods.create(&pp, &client_pod(&e2e.app_image))
        .await
        .expect("pod/client");
    let url = format!("http://web.{ns}.svc.cluster.local/");
    wait_until_async("the pod answers", Duration::from_secs(240), || async {
        (get(&pods, &url, "").await == "pod").then_some(())
    })
    .await;

    // Two ephemeral-mode sessions, one after the other (the first owns the hub).
    let mut children = Vec::new();
    for (name, port) in [("alice", 38081u16), ("bob", 38082)] {
        let child = session(&e2e, &ns, "ephemeral", name, port);
        pids.lock().unwrap().push(child.id());
        children.push(child);
        let header = format!("x-user: {name}");
        wait_until_async(
            &format!("{name}'s session steals its requests"),
            Duration::from_secs(120),
            || async { (get(&pods, &url, &header).await == name).then_some(()) },
        )
        .await;
    }
    assert_eq!(get(&pods, &url, "").await, "pod", "unmatched requests");

    let (ok, listing) = ls(&e2e, &ns).await;
    assert!(
        ok,
        "graft ls failed while two ephemeral sessions hold the pod:\n{listing}"
    );
    for name in ["e2e-alice@", "e2e-bob@"] {
        assert!(listing.contains(name), "graft ls misses {name}:\n{listing}");
    }

    // A node-mode session joins the hub of the ephemeral agents.
    let carol = session(&e2e, &ns, "node", "carol", 38083);
    pids.lock().unwrap().push(carol.id());
    children.push(carol);
    wait_until_async(
        "carol's node-mode session steals its requests",
        Duration::from_secs(120),
        || async { (get(&pods, &url, "x-user: carol").await == "carol").then_some(()) },
    )
    .await;
    for (header, who) in [
        ("x-user: alice", "alice"),
        ("x-user: bob", "bob"),
        ("", "pod"),
    ] {
        assert_eq!(get(&pods, &url, header).await, who, "{header:?}");
    }
    let (ok, listing) = ls(&e2e, &ns).await;
    assert!(ok, "graft ls failed with mixed-mode sessions:\n{listing}");
    for name in ["e2e-alice@", "e2e-bob@", "e2e-carol@"] {
        assert!(listing.contains(name), "graft ls misses {name}:\n{listing}");
    }
    for child in &mut children {
        assert!(
            child.try_wait().ok().flatten().is_none(),
            "a session exited early"
        );
    }
}
