//! graft against a live Kubernetes cluster, run only when `GRAFT_E2E_KUBECONFIG`
//! names a kubeconfig; without it the test prints `skipped: …` and returns (a
//! skip, not a pass). The suite's fake cluster (`tests/kube.rs`) covers the same
//! paths on every run.
//!
//! Variables:
//! - `GRAFT_E2E_KUBECONFIG`: the cluster (kind, minikube, k3s, …);
//! - `GRAFT_E2E_AGENT_IMAGE`: an agent image the cluster's nodes have (load the
//!   archive of `graft agent-image` first);
//! - `GRAFT_E2E_APP_IMAGE`: an image with `python3` (e.g. `python:3.12-slim`), for
//!   the sample server and the cluster-only service.
//!
//! What runs, in a namespace of its own (Pod Security `privileged`, deleted at
//! the end): a sample server `app` (Deployment + Service) whose spec sets an
//! environment variable and whose start writes a file that exists only in the
//! pod, and a cluster-only `backend` (Deployment + Service). For each agent mode
//! (`ephemeral`, `node`), `graft run --target deploy/app --steal` runs a local
//! Python program that prints the pod's variable, the pod's file and the answer
//! of `backend.NS.svc.cluster.local` (DNS and outgoing from the pod), then
//! serves HTTP; a request from inside the cluster to the `app` Service must be
//! answered by it. After SIGTERM, no graft pod is left running and the Service is
//! answered by the pod again.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use graft_tests::{graft_bin, python};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{AttachParams, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;
use tokio::io::AsyncReadExt;

/// The sample server: answers every GET with its first argument.
const SERVER: &str = "import http.server,sys\n\
class H(http.server.BaseHTTPRequestHandler):\n\
    def do_GET(self):\n\
        b=sys.argv[1].encode()\n\
        self.send_response(200);self.send_header('Content-Length',str(len(b)));self.end_headers();self.wfile.write(b)\n\
    def log_message(self,*a): pass\n\
http.server.ThreadingHTTPServer(('',8080),H).serve_forever()\n";

struct E2e {
    kubeconfig: String,
    agent_image: String,
    app_image: String,
}

fn settings() -> Option<E2e> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let Some(kubeconfig) = var("GRAFT_E2E_KUBECONFIG") else {
        println!("skipped: GRAFT_E2E_KUBECONFIG not set (no live cluster to test against)");
        return None;
    };
    let (Some(agent_image), Some(app_image)) =
        (var("GRAFT_E2E_AGENT_IMAGE"), var("GRAFT_E2E_APP_IMAGE"))
    else {
        panic!(
            "GRAFT_E2E_KUBECONFIG is set: set GRAFT_E2E_AGENT_IMAGE and GRAFT_E2E_APP_IMAGE too"
        );
    };
    Some(E2e {
        kubeconfig,
        agent_image,
        app_image,
    })
}

fn deployment(name: &str, image: &str, command: &[&str], env: serde_json::Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{
                    "name": name, "image": image, "command": command, "env": env,
                    "ports": [{"containerPort": 8080}],
                    "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                }]},
            },
        },
    }))
    .expect("a valid Deployment")
}

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .expect("a valid Service")
}

async fn wait_ready(api: &Api<Deployment>, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let ready = api
            .get(name)
            .await
            .ok()
            .and_then(|d| d.status)
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        if ready >= 1 {
            return;
        }
        assert!(Instant::now() < deadline, "deployment {name} is not ready");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// GET `url` from inside the cluster, from the backend's pod.
async fn get_in_cluster(pods: &Api<Pod>, ns: &str, url: &str) -> String {
    let list = pods
        .list(&ListParams::default().labels("app=backend"))
        .await
        .expect("listing the backend's pods");
    let pod = list.items[0].metadata.name.clone().expect("a pod name");
    let code = format!(
        "import urllib.request;print(urllib.request.urlopen('{url}',timeout=5).read().decode())"
    );
    let mut attached = pods
        .exec(
            &pod,
            vec!["python3", "-c", &code],
            &AttachParams::default().stdout(true).stderr(true),
        )
        .await
        .unwrap_or_else(|e| panic!("exec in {ns}/{pod}: {e}"));
    let mut out = String::new();
    if let Some(mut stdout) = attached.stdout() {
        let _ = stdout.read_to_string(&mut out).await;
    }
    let _ = attached.join().await;
    out.trim().to_owned()
}

#[test]
fn graft_runs_against_a_live_cluster_in_both_agent_modes() {
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
        let ns = format!("graft-e2e-{:x}", std::process::id());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": {"name": ns, "labels": {"pod-security.kubernetes.io/enforce": "privileged"}},
        }))
        .unwrap();
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .expect("creating the test namespace");

        let result = tokio::spawn(run_in(client.clone(), ns.clone(), e2e)).await;
        let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
        if let Err(e) = result {
            std::panic::resume_unwind(e.into_panic());
        }
    });
}

async fn run_in(client: Client, ns: String, e2e: E2e) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pp = PostParams::default();
    let app_cmd = [
        "sh",
        "-c",
        "mkdir -p /srv && echo only-in-the-pod > /srv/graft-e2e.txt && exec python3 -c \"$SERVER\" pod",
    ];
    let env = json!([
        {"name": "GRAFT_E2E_ENV", "value": "from-the-pod-spec"},
        {"name": "SERVER", "value": SERVER},
    ]);
    deployments
        .create(
            &pp,
            &deployment("app", &e2e.app_image, &app_cmd, env.clone()),
        )
        .await
        .expect("creating deploy/app");
    let backend_cmd = ["sh", "-c", "exec python3 -c \"$SERVER\" backend"];
    deployments
        .create(
            &pp,
            &deployment("backend", &e2e.app_image, &backend_cmd, env),
        )
        .await
        .expect("creating deploy/backend");
    services
        .create(&pp, &service("app"))
        .await
        .expect("svc/app");
    services
        .create(&pp, &service("backend"))
        .await
        .expect("svc/backend");
    wait_ready(&deployments, "app").await;
    wait_ready(&deployments, "backend").await;
    let app_url = format!("http://app.{ns}.svc.cluster.local/");
    assert_eq!(get_in_cluster(&pods, &ns, &app_url).await, "pod");

    let local = format!(
        "import os,sys,urllib.request,http.server\n\
         print(os.environ.get('GRAFT_E2E_ENV'))\n\
         print(open('/srv/graft-e2e.txt').read().strip())\n\
         print(urllib.request.urlopen('http://backend.{ns}.svc.cluster.local/',timeout=10).read().decode())\n\
         sys.stdout.flush()\n\
         {}",
        SERVER.replace("sys.argv[1]", "'local'")
    );
    for mode in ["ephemeral", "node"] {
        let mut graft = Command::new(graft_bin())
            .args([
                "run",
                "--kubeconfig",
                &e2e.kubeconfig,
                "-n",
                &ns,
                "--target",
                "deploy/app",
                "--agent-mode",
                mode,
                "--agent-image",
                &e2e.agent_image,
                "--agent-pull-policy",
                "IfNotPresent",
                "--steal",
                "--",
                python(),
                "-c",
                &local,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("graft starts");
        let stdout = graft.stdout.take().unwrap();
        let lines = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout)
                .lines()
                .take(3)
                .map(|l| l.unwrap_or_default())
                .collect::<Vec<_>>()
        });
        let lines = tokio::time::timeout(Duration::from_secs(240), lines)
            .await
            .unwrap_or_else(|_| panic!("{mode}: the local program printed nothing in 240 s"))
            .unwrap();
        assert_eq!(
            lines,
            ["from-the-pod-spec", "only-in-the-pod", "backend"],
            "{mode}: env, file and cluster DNS + outgoing"
        );
        // A request inside the cluster to the app's Service reaches the local
        // program.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = get_in_cluster(&pods, &ns, &app_url).await;
            if answer == "local" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode}: the Service still answers {answer:?}"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(graft.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = tokio::task::spawn_blocking(move || graft.wait())
            .await
            .unwrap()
            .unwrap();
        println!("{mode}: graft ended with {status}");

        // Nothing of graft's keeps running, and the pod serves again.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let running = pods
                .list(&ListParams::default().labels("app.kubernetes.io/managed-by=graft"))
                .await
                .map(|l| {
                    l.items
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none())
                        .count()
                })
                .unwrap_or(0);
            let answer = get_in_cluster(&pods, &ns, &app_url).await;
            if running == 0 && answer == "pod" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode}: {running} graft pods left, the Service answers {answer:?}"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
