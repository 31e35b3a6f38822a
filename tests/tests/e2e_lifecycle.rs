//! A session's life beyond its happy path on a live Kubernetes cluster, run
//! only when `GRAFT_E2E_KUBECONFIG`, `GRAFT_E2E_AGENT_IMAGE` and
//! `GRAFT_E2E_APP_IMAGE` are set (see `e2e_cluster.rs`); without them each test
//! prints `skipped: …` and returns. `tests/kube_lifecycle.rs` covers the same
//! behaviour against the fake cluster on every run.
//!
//! Each test works in a namespace of its own, `e2e-life-<pid>-<test>` (Pod
//! Security `privileged`), deleted at the end:
//!
//! - `kill -9` of graft, in each agent mode, while it steals the port of a
//!   Deployment behind a Service: a client pod that polls the Service sees
//!   the pod's own server answer again within 2 s of the kill, and within a
//!   bounded time nothing of graft's is left (no agent Job or pod; an
//!   ephemeral agent has exited) without `graft clean`;
//! - a Deployment whose only pod runs but turns Ready only some seconds
//!   later: graft waits for it, then runs its command with the pod's
//!   environment.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use graft_tests::{graft_bin, python};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{AttachParams, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;
use tokio::io::AsyncReadExt;

/// A server on port 8080 that answers every GET with its first argument.
const SERVER: &str = "import http.server,sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b=sys.argv[1].encode()
        self.send_response(200);self.send_header('Content-Length',str(len(b)));self.end_headers();self.wfile.write(b)
    def log_message(self,*a): pass
http.server.ThreadingHTTPServer(('',8080),H).serve_forever()
";

/// The bound: the target serves again this soon after `kill -9`.
const BACK_TO_THE_TARGET: f64 = 2.0;

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

/// Runs `test` with a client and a fresh privileged namespace, deleted after.
fn in_namespace<F, Fut>(suffix: &str, test: F)
where
    F: FnOnce(Client, String, E2e) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
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
        let ns = format!("e2e-life-{:x}-{suffix}", std::process::id());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": {"name": ns, "labels": {"pod-security.kubernetes.io/enforce": "privileged"}},
        }))
        .unwrap();
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .expect("creating the test namespace");
        let result = tokio::spawn(test(client.clone(), ns.clone(), e2e)).await;
        let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
        if let Err(e) = result {
            std::panic::resume_unwind(e.into_panic());
        }
    });
}

fn deployment(
    name: &str,
    image: &str,
    command: &[&str],
    readiness: serde_json::Value,
) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": name, "image": image, "imagePullPolicy": "IfNotPresent",
                        "command": command,
                        "env": [{"name": "SERVER", "value": SERVER},
                                {"name": "GRAFT_E2E_ENV", "value": "from-the-pod-spec"}],
                        "ports": [{"containerPort": 8080}],
                        "readinessProbe": readiness,
                    }],
                },
            },
        },
    }))
    .expect("a valid Deployment")
}

async fn create_app(client: &Client, ns: &str, e2e: &E2e) {
    let pp = PostParams::default();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let app = deployment(
        "app",
        &e2e.app_image,
        &["sh", "-c", "exec python3 -c \"$SERVER\" pod"],
        // exec: a network probe keeps the node's connections (this machine's
        // test clients) on the target.
        json!({"exec": {"command": ["python3", "-S", "-c", "import socket; socket.create_connection(('127.0.0.1', 8080), 1)"]}, "periodSeconds": 1}),
    );
    deployments.create(&pp, &app).await.expect("deploy/app");
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {"selector": {"app": "app"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    services.create(&pp, &service).await.expect("svc/app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let poller: Pod = serde_json::from_value(json!({
        "metadata": {"name": "poller"},
        "spec": {"terminationGracePeriodSeconds": 0, "containers": [{
            "name": "poller", "image": e2e.app_image, "imagePullPolicy": "IfNotPresent",
            "command": ["sleep", "100000"],
        }]},
    }))
    .unwrap();
    pods.create(&pp, &poller).await.expect("pod/poller");
    wait_ready(client, ns, "app=app").await;
    wait_pod_ready(&pods, "poller").await;
}

async fn wait_ready(client: &Client, ns: &str, selector: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let list = pods.list(&ListParams::default().labels(selector)).await;
        if list.is_ok_and(|l| l.items.iter().any(pod_ready)) {
            return;
        }
        assert!(Instant::now() < deadline, "no pod {selector} is ready");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn wait_pod_ready(pods: &Api<Pod>, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(240);
    while !pods.get(name).await.is_ok_and(|p| pod_ready(&p)) {
        assert!(Instant::now() < deadline, "pod {name} is not ready");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Runs python `code` in the poller pod; its stdout.
async fn in_poller(pods: &Api<Pod>, code: &str) -> String {
    let mut attached = pods
        .exec(
            "poller",
            vec!["python3", "-c", code],
            &AttachParams::default().stdout(true).stderr(false),
        )
        .await
        .expect("exec in the poller");
    let mut out = String::new();
    if let Some(mut stdout) = attached.stdout() {
        let _ = stdout.read_to_string(&mut out).await;
    }
    let _ = attached.join().await;
    out
}

fn graft(e2e: &E2e, ns: &str, target: &str, mode: &str, steal: bool, cmd: &[&str]) -> Command {
    let mut command = Command::new(graft_bin());
    command.args([
        "run",
        "--kubeconfig",
        &e2e.kubeconfig,
        "-n",
        ns,
        "--target",
        target,
        "--agent-mode",
        mode,
        "--agent-image",
        &e2e.agent_image,
        "--agent-pull-policy",
        "IfNotPresent",
    ]);
    if steal {
        command.arg("--steal");
    }
    command.arg("--").args(cmd);
    command
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// Polls the Service from inside the cluster every 100 ms for `secs`, and
/// prints `UNIX_TIME BODY` per answer (`-` for none): the cluster's pods
/// share this machine's clock (a single-node cluster).
fn poll_service(secs: u32) -> String {
    format!(
        "import time,urllib.request\n\
         end=time.time()+{secs}\n\
         while time.time()<end:\n\
         \x20   t=time.time()\n\
         \x20   try: b=urllib.request.urlopen('http://app/',timeout=0.5).read().decode()\n\
         \x20   except Exception: b='-'\n\
         \x20   print('%.3f %s'%(t,b),flush=True)\n\
         \x20   time.sleep(0.1)\n"
    )
}

async fn kill_9_gives_the_target_back(client: Client, ns: String, e2e: E2e, mode: &'static str) {
    create_app(&client, &ns, &e2e).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let local = SERVER.replace("sys.argv[1]", "'local'");
    let mut graft = graft(
        &e2e,
        &ns,
        "deploy/app",
        mode,
        true,
        &[python(), "-c", &local],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::inherit())
    .spawn()
    .expect("graft starts");
    // The steal is on once the Service answers from here.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let seen = in_poller(&pods, &poll_service(1)).await;
        if seen.lines().any(|l| l.ends_with(" local")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{mode}: the Service never answered from the local program: {seen}"
        );
        assert!(graft.try_wait().unwrap().is_none(), "{mode}: graft exited");
    }
    // Poll across the kill.
    let poll = {
        let pods = pods.clone();
        tokio::spawn(async move { in_poller(&pods, &poll_service(12)).await })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed_at = now_unix();
    graft.kill().expect("kill -9 of graft");
    let _ = graft.wait();
    let seen = poll.await.unwrap();
    let answers: Vec<(f64, &str)> = seen
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(t, b)| Some((t.parse().ok()?, b)))
        .collect();
    assert!(
        answers.iter().any(|(t, b)| *t < killed_at && *b == "local"),
        "{mode}: the steal was not on before the kill: {seen}"
    );
    let back = answers
        .iter()
        .find(|(t, b)| *t > killed_at && *b == "pod")
        .map(|(t, _)| t - killed_at)
        .unwrap_or_else(|| panic!("{mode}: the pod never answered after the kill: {seen}"));
    println!("{mode}: the pod answered {back:.2} s after kill -9");
    assert!(
        back <= BACK_TO_THE_TARGET,
        "{mode}: the pod answered only {back:.2} s after kill -9: {seen}"
    );
    assert!(
        !answers
            .iter()
            .any(|(t, b)| *t > killed_at + back && *b != "pod"),
        "{mode}: once back, every request reaches the pod: {seen}"
    );

    // Nothing of graft's is left, without graft clean: the agent gives up on
    // its client (30 s) and the cluster deletes its Job and pod.
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let graft_objects = ListParams::default().labels("app.kubernetes.io/managed-by=graft");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let job_count = jobs.list(&graft_objects).await.unwrap().items.len();
        let pod_count = pods.list(&graft_objects).await.unwrap().items.len();
        let running_agents = pods
            .list(&ListParams::default().labels("app=app"))
            .await
            .unwrap()
            .items
            .iter()
            .flat_map(|p| {
                p.status
                    .iter()
                    .flat_map(|s| s.ephemeral_container_statuses.iter().flatten())
            })
            .filter(|s| s.state.as_ref().is_some_and(|st| st.terminated.is_none()))
            .count();
        if job_count + pod_count + running_agents == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{mode}: left after kill -9: {job_count} jobs, {pod_count} pods, \
             {running_agents} running ephemeral agents"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let seen = in_poller(&pods, &poll_service(1)).await;
    assert!(
        seen.lines().all(|l| l.ends_with(" pod")),
        "{mode}: the Service answers {seen}"
    );
}

#[test]
fn kill_9_of_graft_in_ephemeral_mode_gives_the_target_back_and_leaves_nothing() {
    in_namespace("kill-eph", |client, ns, e2e| {
        kill_9_gives_the_target_back(client, ns, e2e, "ephemeral")
    });
}

#[test]
fn kill_9_of_graft_in_node_mode_gives_the_target_back_and_leaves_nothing() {
    in_namespace("kill-node", |client, ns, e2e| {
        kill_9_gives_the_target_back(client, ns, e2e, "node")
    });
}

#[test]
fn graft_waits_for_a_running_pod_that_becomes_ready_later() {
    in_namespace("ready", |client, ns, e2e| async move {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        // Ready 12 s after it starts serving.
        let slow = deployment(
            "slow",
            &e2e.app_image,
            &[
                "sh",
                "-c",
                "(sleep 12; touch /tmp/ready) & exec python3 -c \"$SERVER\" pod",
            ],
            json!({"exec": {"command": ["test", "-f", "/tmp/ready"]}, "periodSeconds": 1}),
        );
        deployments
            .create(&PostParams::default(), &slow)
            .await
            .expect("deploy/slow");
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        // Wait until its pod runs, not Ready yet.
        let deadline = Instant::now() + Duration::from_secs(120);
        let pod = loop {
            let list = pods
                .list(&ListParams::default().labels("app=slow"))
                .await
                .unwrap();
            let running = list
                .items
                .into_iter()
                .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
            if let Some(pod) = running {
                break pod;
            }
            assert!(Instant::now() < deadline, "deploy/slow has no running pod");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(!pod_ready(&pod), "the pod is Ready too early for the test");
        let started = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            graft(
                &e2e,
                &ns,
                "deploy/slow",
                "ephemeral",
                false,
                &["sh", "-c", "echo \"$GRAFT_E2E_ENV\""],
            )
            .output()
            .expect("graft runs")
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "graft failed: {stderr}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "from-the-pod-spec",
            "{stderr}"
        );
        println!(
            "graft waited for readiness and ran in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let name = pod.metadata.name.unwrap();
        assert!(
            pod_ready(&pods.get(&name).await.unwrap()),
            "graft ran before the pod was Ready"
        );
    });
}
