//! Issue 9: kubelet probes are never stolen, on a live cluster. Runs only when
//! `GRAFT_E2E_KUBECONFIG`, `GRAFT_E2E_AGENT_IMAGE` and `GRAFT_E2E_APP_IMAGE` are
//! set (see `e2e_cluster.rs`); otherwise it prints `skipped: …` and returns.
//!
//! In a namespace of its own (`e2e-probes-…`, Pod Security `privileged`,
//! deleted at the end): `app`, a Python HTTP server on 8080 whose liveness and
//! readiness probes (HTTP GET on the stolen port every 2 s, 5 s to answer,
//! failing after three misses: at most ~16 s, with room for a loaded CI machine)
//! would restart it or take it out of its Service if they reached a
//! process that does not answer; `client`, a pod to send user traffic from. For
//! each agent mode, `graft run --target deploy/app --steal` runs a local server;
//! once the Service answers from it, the local process is stopped with SIGSTOP
//! for 60 s (a developer at a breakpoint): user traffic through the Service
//! stays stolen (it times out), and the pod must stay Ready with 0 restarts the
//! whole time — the probes reach the pod's own server — and once
//! the process continues (SIGCONT) user traffic through the Service reaches it
//! again.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use graft_tests::{graft_bin, python};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Service};
use kube::api::{AttachParams, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use tokio::io::AsyncReadExt;

/// The sample server: answers every GET with its first argument.
const SERVER: &str = "import http.server,sys\n\
class H(http.server.BaseHTTPRequestHandler):\n\
    \x20   def do_GET(self):\n\
    \x20       b=sys.argv[1].encode()\n\
    \x20       self.send_response(200);self.send_header('Content-Length',str(len(b)));self.end_headers();self.wfile.write(b)\n\
    \x20   def log_message(self,*a): pass\n\
http.server.ThreadingHTTPServer(('',8080),H).serve_forever()\n";

/// How long the local process stays stopped.
const STOPPED: Duration = Duration::from_secs(60);

struct E2e {
    kubeconfig: String,
    agent_image: String,
    app_image: String,
}

fn settings() -> Option<E2e> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (
        var("GRAFT_E2E_KUBECONFIG"),
        var("GRAFT_E2E_AGENT_IMAGE"),
        var("GRAFT_E2E_APP_IMAGE"),
    ) {
        (Some(kubeconfig), Some(agent_image), Some(app_image)) => Some(E2e {
            kubeconfig,
            agent_image,
            app_image,
        }),
        _ => {
            println!(
                "skipped: GRAFT_E2E_KUBECONFIG, GRAFT_E2E_AGENT_IMAGE and GRAFT_E2E_APP_IMAGE \
                 are not all set (no live cluster to test against)"
            );
            None
        }
    }
}

fn deployment(name: &str, image: &str, probes: bool) -> Deployment {
    let probe = json!({
        "httpGet": {"path": "/healthz", "port": 8080},
        "periodSeconds": 2, "timeoutSeconds": 5, "failureThreshold": 3,
    });
    let mut container = json!({
        "name": name, "image": image, "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", "exec python3 -c \"$SERVER\" pod"],
        "env": [{"name": "SERVER", "value": SERVER}],
        "ports": [{"containerPort": 8080}],
    });
    if probes {
        container["livenessProbe"] = probe.clone();
        container["readinessProbe"] = probe;
        // The interpreter's first start can take longer than the liveness
        // probe's 6 s on a loaded CI machine, and the kubelet would restart the
        // container before graft ever ran (a rehearsal saw it: 1 restart, all
        // probes "connection refused"). A startup probe holds the others back
        // until the server answers (Kubernetes docs, "Configure Liveness,
        // Readiness and Startup Probes"); a restart later still fails the test.
        container["startupProbe"] = json!({
            "httpGet": {"path": "/healthz", "port": 8080},
            "periodSeconds": 1, "timeoutSeconds": 5, "failureThreshold": 120,
        });
    }
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [container], "terminationGracePeriodSeconds": 1},
            },
        },
    }))
    .expect("a valid Deployment")
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

/// GET `url` from the client pod (user traffic: not from the node).
async fn get_in_cluster(pods: &Api<Pod>, url: &str) -> String {
    let list = pods
        .list(&ListParams::default().labels("app=client"))
        .await
        .expect("listing the client's pods");
    let pod = list.items[0].metadata.name.clone().expect("a pod name");
    let code = format!(
        "import urllib.request\n\
         try: print(urllib.request.urlopen('{url}',timeout=5).read().decode())\n\
         except Exception as e: print('error', e)"
    );
    let mut attached = pods
        .exec(
            &pod,
            vec!["python3", "-c", &code],
            &AttachParams::default().stdout(true).stderr(true),
        )
        .await
        .unwrap_or_else(|e| panic!("exec in {pod}: {e}"));
    let mut out = String::new();
    if let Some(mut stdout) = attached.stdout() {
        let _ = stdout.read_to_string(&mut out).await;
    }
    let _ = attached.join().await;
    out.trim().to_owned()
}

/// The namespace's events about probes and restarts (`Unhealthy`, `Killing`),
/// one a line, for a failure message: they tell a probe that timed out on a
/// loaded machine from one that reached a stopped process.
async fn probe_events(client: &Client, ns: &str) -> String {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let Ok(list) = events.list(&ListParams::default()).await else {
        return "(the events could not be listed)".to_owned();
    };
    let lines: Vec<String> = list
        .items
        .iter()
        .filter(|e| matches!(e.reason.as_deref(), Some("Unhealthy" | "Killing")))
        .map(|e| {
            format!(
                "event {} {} x{}: {}",
                e.involved_object.name.as_deref().unwrap_or("?"),
                e.reason.as_deref().unwrap_or("?"),
                e.count.unwrap_or(1),
                e.message.as_deref().unwrap_or("")
            )
        })
        .collect();
    if lines.is_empty() {
        "(no probe events)".to_owned()
    } else {
        lines.join("\n")
    }
}

/// The app pod's readiness and restart count.
async fn app_state(pods: &Api<Pod>) -> (bool, i32) {
    let list = pods
        .list(&ListParams::default().labels("app=app"))
        .await
        .expect("listing the app's pods");
    let pod = list
        .items
        .iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
        .expect("the app's pod");
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let restarts = status
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0);
    (ready, restarts)
}

/// Sends SIGTERM to graft if the test fails while it runs, so no session
/// outlives the test.
struct EndOnPanic(Option<u32>);

impl Drop for EndOnPanic {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
}

/// The direct child of `parent` whose command line contains `needle`.
fn child_running(parent: u32, needle: &str) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains(needle)
        })
}

#[test]
fn kubelet_probes_reach_the_pod_while_the_local_process_is_stopped() {
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
        let ns = format!("e2e-probes-{:x}", std::process::id());
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
    for (name, probes) in [("app", true), ("client", false)] {
        deployments
            .create(&pp, &deployment(name, &e2e.app_image, probes))
            .await
            .unwrap_or_else(|e| panic!("creating deploy/{name}: {e}"));
    }
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {"selector": {"app": "app"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    services.create(&pp, &service).await.expect("svc/app");
    wait_ready(&deployments, "app").await;
    wait_ready(&deployments, "client").await;
    let url = format!("http://app.{ns}.svc.cluster.local/");
    assert_eq!(get_in_cluster(&pods, &url).await, "pod");

    let local = SERVER.replace("sys.argv[1]", "'local'");
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
            .stdin(Stdio::null())
            .spawn()
            .expect("graft starts");
        let mut guard = EndOnPanic(Some(graft.id()));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if get_in_cluster(&pods, &url).await == "local" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode}: the Service is not answered by the local process"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let process = child_running(graft.id(), "ThreadingHTTPServer")
            .unwrap_or_else(|| panic!("{mode}: the local process under graft"));
        let (ready, restarts) = app_state(&pods).await;
        assert!(
            ready && restarts == 0,
            "{mode}: before the stop the pod is ready={ready} with {restarts} restarts\n{}",
            probe_events(&client, &ns).await
        );

        // A developer's breakpoint: the local process answers nothing for 60 s.
        kill(Pid::from_raw(process as i32), Signal::SIGSTOP).unwrap();
        let stopped = Instant::now();
        // User traffic is still stolen (and so unanswered), never served by the pod.
        let answer = get_in_cluster(&pods, &url).await;
        assert!(
            answer.starts_with("error"),
            "{mode}: with the local process stopped the Service answers {answer:?}"
        );
        while stopped.elapsed() < STOPPED {
            let (ready, restarts) = app_state(&pods).await;
            assert!(
                ready && restarts == 0,
                "{mode}: {:?} into the stop the pod is ready={ready} with {restarts} \
                 restarts: the kubelet's probes were stolen\n{}",
                stopped.elapsed(),
                probe_events(&client, &ns).await
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        kill(Pid::from_raw(process as i32), Signal::SIGCONT).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = get_in_cluster(&pods, &url).await;
            if answer == "local" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode}: after SIGCONT the Service answers {answer:?}, not the local process"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(app_state(&pods).await, (true, 0), "{mode}: at the end");

        kill(Pid::from_raw(graft.id() as i32), Signal::SIGTERM).unwrap();
        let status = tokio::task::spawn_blocking(move || graft.wait())
            .await
            .unwrap()
            .unwrap();
        guard.0 = None;
        println!("{mode}: graft ended with {status}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = get_in_cluster(&pods, &url).await;
            let running = pods
                .list(&ListParams::default().labels("app.kubernetes.io/managed-by=graft"))
                .await
                .map(|l| {
                    l.items
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none())
                        .filter(|p| {
                            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                        })
                        .count()
                })
                .unwrap_or(0);
            if answer == "pod" && running == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode}: after graft ended the Service answers {answer:?}, {running} graft pods run"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
