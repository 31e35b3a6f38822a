//! Kubernetes targets against a fake API server ([`FakeKube`]): the real
//! `graft`, given a kubeconfig, resolves `deploy/api` to the pod
//! `api-7d9f-abcde` whose container is the bed's target process, places the
//! real `graft-agent` (the fake kubelet starts it: an ephemeral container, or
//! a node-mode pod), reaches it through a WebSocket port-forward into the
//! target's network namespace, and cleans up.
//!
//! The first tests check the fake server itself with kube-rs (what graft-kube
//! is built on); the `graft_*` tests drive the CLI:
//! `graft run --kubeconfig FILE -n shop --target deploy/api [--agent-mode
//! ephemeral|node] [--agent-image IMG] [--steal] -- CMD`.
//!
//! The `*all_pods*` tests give the Deployment a second ready pod,
//! `api-7d9f-fghij`: a second bed's target, with its own process and network
//! namespace ([`FakeKube::for_beds`]).

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use futures::{AsyncBufReadExt, TryStreamExt};
use graft_tests::fake_kube::{NAMESPACE, SECOND_POD, SeenRequest, TARGET_CONTAINER, TARGET_POD};
use graft_tests::{Bed, FakeKube, Outcome, Proc, curl, fixture_str, python, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerState, Pod};
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::await_condition;
use nix::sys::signal::Signal;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one `graft run` against the fake cluster may take.
const KUBE_RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the agent, its rules and its pod may take to go after graft ends.
const CLEANUP: Duration = Duration::from_secs(10);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A kube-rs client built from the fake server's kubeconfig, as graft builds
/// it with `--kubeconfig`.
async fn client(kube: &FakeKube) -> kube::Client {
    let kubeconfig = Kubeconfig::read_from(kube.kubeconfig()).expect("the kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube-rs accepts the kubeconfig");
    assert_eq!(config.default_namespace, NAMESPACE);
    kube::Client::try_from(config).expect("a client")
}

fn ephemeral_state(pod: Option<&Pod>, container: &str) -> Option<ContainerState> {
    pod?.status
        .as_ref()?
        .ephemeral_container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == container)?
        .state
        .clone()
}

fn container_state(pod: Option<&Pod>, container: &str) -> Option<ContainerState> {
    pod?.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == container)?
        .state
        .clone()
}

/// Follows a container's log until its `ready tcp:127.0.0.1:PORT` line.
async fn ready_port(pods: &Api<Pod>, pod: &str, container: &str) -> Option<u16> {
    let params = LogParams {
        container: Some(container.to_owned()),
        follow: true,
        ..LogParams::default()
    };
    let log = pods.log_stream(pod, &params).await.expect("the log opens");
    let mut lines = std::pin::pin!(log.lines());
    while let Some(line) = lines.try_next().await.expect("the log reads") {
        if let Some(port) = line.trim().strip_prefix("ready tcp:127.0.0.1:") {
            return port.parse().ok();
        }
    }
    None
}

/// A TCP echo server on 127.0.0.1 inside the target's network namespace;
/// returns its port.
fn echo_server_in_target(bed: &Bed) -> u16 {
    let listener = bed.in_target_netns(|| {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind in the target's netns")
    });
    let port = listener.local_addr().expect("bound").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

// ----- the fake server itself ------------------------------------------------

#[test]
fn fake_server_serves_the_deployment_and_its_pod_to_kube_rs() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    runtime().block_on(async {
        let client = client(&kube).await;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
        let deployment = deployments.get("api").await.expect("deploy/api exists");
        let selector = deployment.spec.unwrap().selector.match_labels.unwrap();
        assert_eq!(selector.get("app").map(String::as_str), Some("api"));

        let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
        let list = pods
            .list(&ListParams::default().labels("app=api"))
            .await
            .expect("pods list");
        assert_eq!(list.items.len(), 1);
        let pod = &list.items[0];
        assert_eq!(pod.metadata.name.as_deref(), Some(TARGET_POD));
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(
            status.pod_ip.as_deref(),
            Some(bed.target_v4.to_string().as_str())
        );
        let web = &status.container_statuses.as_ref().unwrap()[0];
        assert_eq!(web.name, TARGET_CONTAINER);
        assert_eq!(
            web.container_id.as_deref(),
            Some(format!("containerd://{}", kube.target_container_id()).as_str())
        );
        assert!(
            pods.list(&ListParams::default().labels("app=web"))
                .await
                .unwrap()
                .items
                .is_empty()
        );

        // Errors are Status objects kube-rs understands.
        match deployments.get("nope").await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 404);
                assert!(s.message.contains("\"nope\" not found"), "{s:?}");
            }
            other => panic!("expected a 404, got {other:?}"),
        }
        kube.deny("list", "pods");
        match pods.list(&ListParams::default()).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 403);
                assert!(s.message.contains("cannot list resource \"pods\""), "{s:?}");
            }
            other => panic!("expected a 403, got {other:?}"),
        }
    });
    // The target's process sits in a cgroup named after its container ID.
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", bed.target_pid)).unwrap();
    assert!(cgroup.contains(kube.target_container_id()), "{cgroup}");
    let requests = kube.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/api/v1/namespaces/shop/pods"
                && r.param("labelSelector").as_deref() == Some("app=api")),
        "{}",
        kube.request_report()
    );
    let dir = kube
        .target_cgroup()
        .expect("the target was put into a cgroup");
    drop(kube);
    assert!(!dir.exists(), "{} was left behind", dir.display());
}

#[test]
fn fake_port_forward_reaches_the_target_netns_and_can_be_cut() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    let port = echo_server_in_target(&bed);
    runtime().block_on(async {
        let pods: Api<Pod> = Api::namespaced(client(&kube).await, NAMESPACE);
        let mut forward = pods
            .portforward(TARGET_POD, &[port])
            .await
            .expect("the port-forward opens");
        let mut stream = forward.take_stream(port).unwrap();
        for round in 0..3 {
            let text = format!("ping {round}\n");
            stream.write_all(text.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; text.len()];
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
                .await
                .expect("the echo comes back")
                .unwrap();
            assert_eq!(buf, text.as_bytes());
        }
        assert_eq!(kube.open_port_forwards(), 1);

        kube.cut_port_forwards();
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {}
            other => panic!("the cut port-forward still reads: {other:?}"),
        }
        assert!(
            wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
                (kube.open_port_forwards() == 0).then_some(())
            })
            .is_some()
        );

        // A port nobody listens on: the error channel says so.
        let closed = {
            let l = bed.in_target_netns(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
            l.local_addr().unwrap().port()
        };
        let mut forward = pods.portforward(TARGET_POD, &[closed]).await.unwrap();
        let error = forward.take_error(closed).unwrap();
        let message = tokio::time::timeout(Duration::from_secs(5), error)
            .await
            .expect("an error arrives");
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("refused") && m.contains(TARGET_POD)),
            "{message:?}"
        );
    });
    let forwards: Vec<SeenRequest> = kube
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/portforward"))
        .collect();
    assert_eq!(forwards.len(), 2);
    assert_eq!(forwards[0].param("ports"), Some(port.to_string()));
}

#[test]
fn fake_kubelet_runs_the_real_agent_as_an_ephemeral_container() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    let name = "graft-agent-fake1";
    runtime().block_on(async {
        let pods: Api<Pod> = Api::namespaced(client(&kube).await, NAMESPACE);
        let uid = pods.get(TARGET_POD).await.unwrap().metadata.uid.unwrap();

        // A stale UID is refused, as the API server's precondition does.
        let stale = json!({"metadata": {"uid": "0000"}, "spec": {"ephemeralContainers": []}});
        match pods
            .patch_subresource(
                "ephemeralcontainers",
                TARGET_POD,
                &PatchParams::default(),
                &Patch::Strategic(stale),
            )
            .await
        {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 409, "{s:?}"),
            other => panic!("expected a 409, got {other:?}"),
        }

        let patch = json!({
            "metadata": {"uid": uid},
            "spec": {"ephemeralContainers": [{
                "name": name,
                "image": "ghcr.io/graft-dev/graft-agent:test",
                "args": ["--target-pid", "1", "--listen", "tcp:127.0.0.1:0",
                         "--connect-timeout", "5"],
                "env": [{"name": "GRAFT_AGENT_SECRET", "value": "fake-secret"},
                        {"name": "GRAFT_SESSION", "value": "fake1"}],
                "targetContainerName": TARGET_CONTAINER,
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }]},
        });
        pods.patch_subresource(
            "ephemeralcontainers",
            TARGET_POD,
            &PatchParams {
                field_manager: Some("graft".into()),
                ..PatchParams::default()
            },
            &Patch::Strategic(patch),
        )
        .await
        .expect("the ephemeral container is added");

        // The watch graft uses sees the container run.
        let settled = tokio::time::timeout(
            Duration::from_secs(10),
            await_condition(pods.clone(), TARGET_POD, move |pod: Option<&Pod>| {
                ephemeral_state(pod, name).is_some_and(|s| s.waiting.is_none())
            }),
        )
        .await
        .expect("the agent starts within 10 s")
        .unwrap();
        let state = ephemeral_state(settled.as_ref(), name).unwrap();
        assert!(state.running.is_some(), "{state:?}\n{}", kube.log_report());
        let agents = kube.agent_pids();
        assert_eq!(agents.len(), 1);
        // `--target-pid 1` became the target's real pid (the agent's forked
        // watchdog has the same command line).
        assert!(bed.agent_pids().contains(&agents[0]), "{agents:?}");

        let port = ready_port(&pods, TARGET_POD, name)
            .await
            .unwrap_or_else(|| panic!("no ready line\n{}", kube.log_report()));
        let mut forward = pods.portforward(TARGET_POD, &[port]).await.unwrap();
        let stream = forward.take_stream(port).unwrap();
        // Hang up without a Hello: the agent's session ends and it exits.
        drop(stream);
        drop(forward);
        let ended = tokio::time::timeout(
            Duration::from_secs(10),
            await_condition(pods.clone(), TARGET_POD, move |pod: Option<&Pod>| {
                ephemeral_state(pod, name).is_some_and(|s| s.terminated.is_some())
            }),
        )
        .await
        .expect("the agent exits within 10 s")
        .unwrap();
        let terminated = ephemeral_state(ended.as_ref(), name)
            .unwrap()
            .terminated
            .unwrap();
        assert!(terminated.finished_at.is_some(), "{terminated:?}");
    });
    assert!(kube.agent_pids().is_empty());
    assert!(
        kube.log(NAMESPACE, TARGET_POD, name)
            .contains("ready tcp:127.0.0.1:")
    );
}

#[test]
fn fake_kubelet_runs_and_deletes_a_node_mode_pod() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    runtime().block_on(async {
        let pods: Api<Pod> = Api::namespaced(client(&kube).await, NAMESPACE);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "graft-agent-fake2", "labels": {"app.kubernetes.io/managed-by": "graft"}},
            "spec": {
                "nodeName": "node-1", "hostPID": true, "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 10,
                "containers": [{
                    "name": "agent", "image": "ghcr.io/graft-dev/graft-agent:test",
                    "args": ["--target-pid", bed.target_pid.to_string(),
                             "--listen", "tcp:127.0.0.1:0", "--connect-timeout", "20"],
                    "env": [{"name": "GRAFT_AGENT_SECRET", "value": "fake-secret"}],
                }],
            },
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let running = tokio::time::timeout(
            Duration::from_secs(10),
            await_condition(pods.clone(), "graft-agent-fake2", |pod: Option<&Pod>| {
                container_state(pod, "agent").is_some_and(|s| s.waiting.is_none())
            }),
        )
        .await
        .expect("the pod runs within 10 s")
        .unwrap()
        .unwrap();
        assert_eq!(
            running.status.unwrap().phase.as_deref(),
            Some("Running"),
            "{}",
            kube.log_report()
        );
        assert!(ready_port(&pods, "graft-agent-fake2", "agent").await.is_some());
        assert_eq!(kube.agent_pids().len(), 1);
        let listed = pods
            .list(&ListParams::default().labels("app.kubernetes.io/managed-by=graft"))
            .await
            .unwrap();
        assert_eq!(listed.items.len(), 1);

        // Deleting the pod stops the agent (SIGTERM) and then the pod is gone.
        pods.delete("graft-agent-fake2", &DeleteParams::default())
            .await
            .unwrap();
        let gone = tokio::time::timeout(
            Duration::from_secs(10),
            await_condition(pods.clone(), "graft-agent-fake2", |pod: Option<&Pod>| {
                pod.is_none()
            }),
        )
        .await
        .expect("the pod goes within 10 s");
        assert!(gone.unwrap().is_none());

        // An image that does not exist never starts.
        let bad: Pod = serde_json::from_value(json!({
            "metadata": {"name": "bad-image"},
            "spec": {"nodeName": "node-1", "containers": [{"name": "agent", "image": "registry.invalid/nothing:1"}]},
        }))
        .unwrap();
        pods.create(&PostParams::default(), &bad).await.unwrap();
        let waiting = tokio::time::timeout(
            Duration::from_secs(5),
            await_condition(pods.clone(), "bad-image", |pod: Option<&Pod>| {
                container_state(pod, "agent")
                    .and_then(|s| s.waiting)
                    .is_some_and(|w| w.reason.as_deref() == Some("ErrImagePull"))
            }),
        )
        .await;
        assert!(waiting.is_ok(), "no ErrImagePull");
    });
    assert!(kube.agent_pids().is_empty());
    assert!(kube.saw("DELETE", "/api/v1/namespaces/shop/pods/graft-agent-fake2"));
}

#[test]
fn fake_server_gives_each_pod_of_two_beds_its_own_process_netns_and_cgroup() {
    let bed = Bed::new();
    let bed2 = Bed::new();
    assert_ne!(bed.n, bed2.n, "two beds of one test share a slot");
    assert_ne!(bed.target_pid, bed2.target_pid);
    // Both targets answer, each for itself.
    assert_eq!(curl(&bed.target_url(80)).unwrap(), bed.target_reply());
    assert_eq!(curl(&bed2.target_url(80)).unwrap(), bed2.target_reply());
    let kube = FakeKube::for_beds(&bed, &[&bed2]);
    assert_eq!(kube.target_pods(), [TARGET_POD, SECOND_POD]);
    let port1 = echo_server_in_target(&bed);
    let port2 = echo_server_in_target(&bed2);
    runtime().block_on(async {
        let client = client(&kube).await;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
        let deployment = deployments.get("api").await.expect("deploy/api exists");
        assert_eq!(deployment.status.unwrap().ready_replicas, Some(2));
        let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
        let list = pods
            .list(&ListParams::default().labels("app=api"))
            .await
            .expect("pods list");
        let mut seen: Vec<(String, String, String)> = list
            .items
            .iter()
            .map(|pod| {
                let status = pod.status.as_ref().unwrap();
                assert_eq!(status.phase.as_deref(), Some("Running"));
                assert!(
                    status
                        .conditions
                        .iter()
                        .flatten()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                );
                (
                    pod.metadata.name.clone().unwrap(),
                    status.pod_ip.clone().unwrap(),
                    status.container_statuses.as_ref().unwrap()[0]
                        .container_id
                        .clone()
                        .unwrap(),
                )
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                (
                    TARGET_POD.to_owned(),
                    bed.target_v4.to_string(),
                    format!("containerd://{}", kube.target_container_id())
                ),
                (
                    SECOND_POD.to_owned(),
                    bed2.target_v4.to_string(),
                    format!(
                        "containerd://{}",
                        kube.pod_container_id(SECOND_POD).unwrap()
                    )
                ),
            ]
        );
        assert_ne!(
            kube.target_container_id(),
            kube.pod_container_id(SECOND_POD).unwrap()
        );
        // Each pod's port-forward reaches its own bed's netns: the echo
        // server of the other bed is not there.
        for (pod, port, other) in [(TARGET_POD, port1, port2), (SECOND_POD, port2, port1)] {
            let mut forward = pods.portforward(pod, &[port]).await.unwrap();
            let mut stream = forward.take_stream(port).unwrap();
            stream.write_all(b"hello\n").await.unwrap();
            let mut buf = [0u8; 6];
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
                .await
                .expect("the echo comes back")
                .unwrap();
            assert_eq!(&buf, b"hello\n");
            if other != port {
                let mut forward = pods.portforward(pod, &[other]).await.unwrap();
                let error = forward.take_error(other).unwrap();
                let message = tokio::time::timeout(Duration::from_secs(5), error)
                    .await
                    .expect("an error arrives");
                assert!(
                    message.as_deref().is_some_and(|m| m.contains("refused")),
                    "{pod} reached port {other} of the other bed: {message:?}"
                );
            }
        }
    });
    // Each target sits in the cgroup named after its own container ID.
    for (b, id) in [
        (&bed, kube.target_container_id()),
        (&bed2, kube.pod_container_id(SECOND_POD).unwrap()),
    ] {
        let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", b.target_pid)).unwrap();
        assert!(cgroup.contains(id), "{cgroup}");
    }
    let dirs = kube.target_cgroups();
    assert_eq!(dirs.len(), 2);
    drop(kube);
    for dir in dirs {
        assert!(!dir.exists(), "{} was left behind", dir.display());
    }
}

// ----- graft against the fake cluster ----------------------------------------

/// `graft run --kubeconfig FILE -n shop --target TARGET FLAGS... -- CMD...`.
fn kube_command(bed: &Bed, kube: &FakeKube, target: &str, flags: &[&str], cmd: &[&str]) -> Command {
    let kubeconfig = kube.kubeconfig_str();
    let mut args = vec![
        "run",
        "--kubeconfig",
        &kubeconfig,
        "-n",
        NAMESPACE,
        "--target",
        target,
    ];
    args.extend_from_slice(flags);
    args.push("--");
    args.extend_from_slice(cmd);
    let mut command = bed.graft(&args);
    command.env_remove("KUBECONFIG");
    command
}

fn kube_run(bed: &Bed, kube: &FakeKube, target: &str, flags: &[&str], cmd: &[&str]) -> Outcome {
    let what = format!(
        "graft run --target {target} {} -- {}",
        flags.join(" "),
        cmd.join(" ")
    );
    bed.spawn(kube_command(bed, kube, target, flags, cmd), &what)
        .finish(KUBE_RUN_TIMEOUT)
}

/// Everything to show when a test fails.
fn report(kube: &FakeKube) -> String {
    format!("{}{}", kube.request_report(), kube.log_report())
}

/// Runs a CMD that prints the target's environment marker, a file only the
/// target has, and the reply of the service only the target reaches.
fn assert_basics(bed: &Bed, kube: &FakeKube, flags: &[&str]) -> Outcome {
    let script = format!(
        "echo \"$GRAFT_TEST_MARKER\" && cat {file} && curl -sS --max-time 10 {url}",
        file = bed.remote("hello.txt"),
        url = bed.service_url(),
    );
    let out = kube_run(bed, kube, "deploy/api", flags, &["sh", "-c", &script]);
    assert!(out.success(), "{out}\n{}", report(kube));
    let lines = out.lines();
    assert_eq!(
        lines,
        [
            bed.marker.clone(),
            format!("hello from target {}", bed.n),
            "second line".into(),
            "third line".into(),
            bed.service_reply(),
        ],
        "{out}"
    );
    assert!(
        out.stderr.contains(TARGET_POD),
        "graft did not say which pod it chose\n{out}"
    );
    out
}

/// After a session: no agent process, no packet rule of graft in the target.
fn assert_cleaned_up(bed: &Bed, kube: &FakeKube) {
    assert!(
        kube.wait_agents_gone(CLEANUP),
        "agents still run: {:?}\n{}",
        kube.agent_pids(),
        report(kube)
    );
    let none = wait_until(CLEANUP, Duration::from_millis(50), || {
        bed.agent_pids().is_empty().then_some(())
    });
    assert!(none.is_some(), "{:?}", bed.agent_pids());
    let clean = wait_until(CLEANUP, Duration::from_millis(100), || {
        (!bed.has_graft_rules()).then_some(())
    });
    assert!(clean.is_some(), "rules left:\n{}", bed.packet_rules());
}

/// Starts `graft run ... --steal -- python3 http_app.py APP_PORT` and waits
/// until the target's app port is answered by the local app.
fn steal_session(bed: &Bed, kube: &FakeKube, flags: &[&str]) -> Proc {
    let mut all = vec!["--steal"];
    all.extend_from_slice(flags);
    let app = fixture_str("http_app.py");
    let port = bed.app_port.to_string();
    let what = format!(
        "graft run --target deploy/api {} -- http_app.py",
        all.join(" ")
    );
    let mut session = bed.spawn(
        kube_command(bed, kube, "deploy/api", &all, &[python(), &app, &port]),
        &what,
    );
    let url = bed.target_url(bed.app_port);
    let reply = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!(
                "{what} exited ({status}) before the steal took effect\n{}\n{}",
                session.output_report(),
                report(kube)
            );
        }
        curl(&url).ok().filter(|body| body.starts_with("local"))
    });
    assert!(
        reply.is_some(),
        "{url} was not answered by the local app\n{}\n{}",
        session.output_report(),
        report(kube)
    );
    session
}

/// The agent Job graft created in node mode: (namespace, name).
fn created_agent_job(kube: &FakeKube) -> (String, String) {
    let post = kube
        .requests()
        .into_iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/jobs"))
        .unwrap_or_else(|| panic!("graft created no job\n{}", report(kube)));
    let namespace = post
        .path
        .trim_start_matches("/apis/batch/v1/namespaces/")
        .trim_end_matches("/jobs")
        .to_owned();
    let name = post.body["metadata"]["name"]
        .as_str()
        .expect("the job has a name")
        .to_owned();
    let spec = &post.body["spec"];
    assert_eq!(spec["backoffLimit"], 0, "{spec}");
    assert_eq!(spec["ttlSecondsAfterFinished"], 0, "{spec}");
    let args = spec["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("--target-container-id") && args.contains(kube.target_container_id()),
        "the agent job does not name the target container: {args}"
    );
    (namespace, name)
}

/// The pods in `namespace` that the Job `job` owns.
fn pods_of_job(kube: &FakeKube, namespace: &str, job: &str) -> Vec<String> {
    kube.pod_names(namespace)
        .into_iter()
        .filter(|name| {
            kube.pod(namespace, name).is_some_and(|pod| {
                pod["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|o| o["kind"] == "Job" && o["name"] == job))
            })
        })
        .collect()
}

/// graft deleted its agent's Job, and the Job and its pod are gone.
fn assert_agent_job_deleted(kube: &FakeKube) {
    let (namespace, name) = created_agent_job(kube);
    let path = format!("/apis/batch/v1/namespaces/{namespace}/jobs/{name}");
    assert!(
        kube.saw("DELETE", &path),
        "graft did not delete {path}\n{}",
        report(kube)
    );
    assert_agent_job_gone(kube, &namespace, &name, CLEANUP);
}

/// The Job and its pods are gone within `within`.
fn assert_agent_job_gone(kube: &FakeKube, namespace: &str, name: &str, within: Duration) {
    let gone = wait_until(within, Duration::from_millis(100), || {
        (kube.job(namespace, name).is_none() && pods_of_job(kube, namespace, name).is_empty())
            .then_some(())
    });
    assert!(
        gone.is_some(),
        "job {namespace}/{name} or its pods are still there: {:?}\n{}",
        pods_of_job(kube, namespace, name),
        report(kube)
    );
}

#[test]
fn graft_ephemeral_agent_gives_cmd_the_pods_env_files_and_network() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    assert_basics(&bed, &kube, &[]);
    // The agent was added to the target pod as an ephemeral container.
    let patch = kube
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH" && r.path.ends_with("/ephemeralcontainers"))
        .unwrap_or_else(|| panic!("no ephemeral container was added\n{}", report(&kube)));
    assert_eq!(
        patch.path,
        format!("/api/v1/namespaces/shop/pods/{TARGET_POD}/ephemeralcontainers")
    );
    let container = &patch.body["spec"]["ephemeralContainers"][0];
    assert_eq!(container["targetContainerName"], TARGET_CONTAINER);
    assert!(
        !container["env"]
            .to_string()
            .contains("\"GRAFT_AGENT_SECRET\""),
        "the secret itself is in the spec: {container}"
    );
    assert_cleaned_up(&bed, &kube);
    let pod = kube.pod(NAMESPACE, TARGET_POD).unwrap();
    assert!(
        pod["status"]["ephemeralContainerStatuses"][0]["state"]["terminated"].is_object(),
        "{}",
        pod["status"]
    );
}

#[test]
fn graft_ephemeral_steal_takes_the_pods_traffic_until_stopped() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    let mut session = steal_session(&bed, &kube, &["--agent-mode", "ephemeral"]);
    assert!(
        session.stderr().contains(TARGET_POD),
        "{}",
        session.output_report()
    );
    session.signal(Signal::SIGTERM);
    assert!(
        session.wait_timeout(CLEANUP).is_some(),
        "graft did not exit on SIGTERM\n{}",
        session.output_report()
    );
    assert_cleaned_up(&bed, &kube);
    assert_eq!(
        curl(&bed.target_url(bed.app_port)).unwrap(),
        bed.target_reply()
    );
}

#[test]
fn graft_node_mode_runs_a_session_and_deletes_its_agent_job() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    assert_basics(&bed, &kube, &["--agent-mode", "node"]);
    assert!(
        !kube
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/ephemeralcontainers") && r.is_mutating()),
        "node mode added an ephemeral container"
    );
    assert_agent_job_deleted(&kube);
    assert_cleaned_up(&bed, &kube);
}

#[test]
fn graft_node_mode_deletes_its_agent_job_when_stopped_with_sigterm() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    let mut session = steal_session(&bed, &kube, &["--agent-mode", "node"]);
    session.signal(Signal::SIGTERM);
    assert!(
        session.wait_timeout(CLEANUP).is_some(),
        "graft did not exit on SIGTERM\n{}",
        session.output_report()
    );
    assert_agent_job_deleted(&kube);
    assert_cleaned_up(&bed, &kube);
    assert_eq!(
        curl(&bed.target_url(bed.app_port)).unwrap(),
        bed.target_reply()
    );
}

#[test]
fn graft_takes_the_kubeconfig_from_kubeconfig_and_the_namespace_from_the_context() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    let mut command = bed.graft(&[
        "run",
        "--context",
        "fake",
        "--target",
        "deploy/api",
        "--",
        "sh",
        "-c",
        "echo \"$GRAFT_TEST_MARKER\"",
    ]);
    command.env("KUBECONFIG", kube.kubeconfig());
    let out = bed
        .spawn(command, "KUBECONFIG=... graft run --context fake")
        .finish(KUBE_RUN_TIMEOUT);
    assert!(out.success(), "{out}\n{}", report(&kube));
    assert_eq!(out.out(), bed.marker, "{out}");
    assert!(
        kube.saw("GET", "/apis/apps/v1/namespaces/shop/deployments/api"),
        "{}",
        report(&kube)
    );
    assert_cleaned_up(&bed, &kube);
}

#[test]
fn graft_names_the_missing_permission_when_rbac_forbids_the_port_forward() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    // A 1.35+ API server authorizes the WebSocket upgrade as `create` too.
    kube.deny("create", "pods/portforward");
    let out = kube_run(&bed, &kube, "deploy/api", &[], &["true"]);
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("create pods/portforward"),
        "the error does not name the missing permission\n{out}"
    );
    // The agent that was placed exits by itself once nobody connects.
    assert!(
        kube.requests()
            .iter()
            .any(|r| r.path.ends_with("/portforward")),
        "{}",
        report(&kube)
    );
}

#[test]
fn graft_suggests_node_mode_once_a_pod_carries_exited_agents() {
    // Each ephemeral session leaves an exited container in the pod (issue 15):
    // from the third on, graft says so before it adds another.
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    for session in 1..=4 {
        let out = kube_run(&bed, &kube, "deploy/api", &[], &["true"]);
        out.assert_success();
        let warned = out.stderr.contains("exited graft agents");
        assert_eq!(warned, session == 4, "session {session}\n{out}");
        if warned {
            assert!(
                out.stderr.contains("already carries 3 exited graft agents")
                    && out.stderr.contains("--agent-mode node"),
                "{out}"
            );
        }
        // The agent exits once the link closes; its container is then terminated.
        let exited = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            kube.agent_pids().is_empty().then_some(())
        });
        assert!(
            exited.is_some(),
            "the agent of session {session} still runs"
        );
    }
}

#[test]
fn graft_names_a_missing_target_and_creates_nothing() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    let out = kube_run(&bed, &kube, "deploy/nope", &[], &["true"]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("nope"), "{out}");
    assert!(
        out.stderr.contains("deployment"),
        "the error does not say what kind was looked for\n{out}"
    );
    assert!(
        kube.mutating_requests().is_empty(),
        "graft changed the cluster: {:?}",
        kube.mutating_requests()
    );
    assert!(kube.agent_pids().is_empty());
}

#[test]
fn graft_names_the_missing_permission_when_rbac_forbids_ephemeral_containers() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    kube.deny("patch", "pods/ephemeralcontainers");
    let out = kube_run(&bed, &kube, "deploy/api", &[], &["true"]);
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("patch pods/ephemeralcontainers"),
        "the error does not name the missing permission\n{out}"
    );
    assert!(kube.agent_pids().is_empty());
    assert!(
        !kube.requests().iter().any(|r| r.method == "POST"),
        "{}",
        report(&kube)
    );
}

#[test]
fn graft_reports_an_agent_image_that_cannot_be_pulled() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    let out = kube_run(
        &bed,
        &kube,
        "deploy/api",
        &["--agent-image", "registry.invalid/nothing:1"],
        &["true"],
    );
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("ErrImagePull"), "{out}");
    assert!(kube.agent_pids().is_empty());
}

#[test]
fn graft_survives_a_cut_port_forward_and_keeps_stealing() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    let mut session = steal_session(&bed, &kube, &["--agent-mode", "ephemeral"]);
    let url = bed.target_url(bed.app_port);
    let forwards_before = kube
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/portforward"))
        .count();
    for round in 0..3 {
        kube.cut_port_forwards();
        // The session goes on: graft opens a new port-forward and the agent
        // re-attaches the link, so the steal keeps working.
        let reply = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            if let Some(status) = session.try_status() {
                panic!(
                    "graft exited ({status}) after the port-forward was cut (round {round})\n{}\n{}",
                    session.output_report(),
                    report(&kube)
                );
            }
            curl(&url).ok().filter(|body| body.starts_with("local"))
        });
        assert!(
            reply.is_some(),
            "the steal did not come back after cut {round}\n{}\n{}",
            session.output_report(),
            report(&kube)
        );
    }
    let forwards_after = kube
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/portforward"))
        .count();
    assert!(
        forwards_after >= forwards_before + 3,
        "graft did not open new port-forwards ({forwards_before} → {forwards_after})\n{}",
        report(&kube)
    );
    session.signal(Signal::SIGTERM);
    assert!(
        session.wait_timeout(CLEANUP).is_some(),
        "graft did not exit on SIGTERM\n{}",
        session.output_report()
    );
    assert_cleaned_up(&bed, &kube);
}

#[test]
fn targetless_reaches_the_namespaces_network_and_deletes_its_pod() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    // The service answers only connections from the cluster network; files and
    // environment stay local in a targetless session.
    let script = format!(
        "echo \"marker=$GRAFT_TEST_MARKER\" && curl -sS --max-time 10 {url}",
        url = bed.service_url()
    );
    let out = kube_run(&bed, &kube, "targetless", &[], &["sh", "-c", &script]);
    assert!(out.success(), "{out}\n{}", report(&kube));
    assert_eq!(
        out.lines(),
        ["marker=".to_owned(), bed.service_reply()],
        "{out}"
    );
    assert!(out.stderr.contains("targetless"), "{out}");
    let post = kube
        .requests()
        .into_iter()
        .find(|r| r.method == "POST" && r.path == "/apis/batch/v1/namespaces/shop/jobs")
        .unwrap_or_else(|| panic!("graft created no agent job\n{}", report(&kube)));
    let name = post.body["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(name.starts_with("graft-agent-"), "{name}");
    assert!(
        post.body["spec"]["template"]["spec"]["hostPID"].is_null(),
        "a targetless pod needs no host PIDs"
    );
    let path = format!("/apis/batch/v1/namespaces/shop/jobs/{name}");
    assert!(
        kube.saw("DELETE", &path),
        "graft did not delete {path}\n{}",
        report(&kube)
    );
    assert_agent_job_gone(&kube, NAMESPACE, &name, CLEANUP);
    assert!(
        !kube
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/ephemeralcontainers") && r.is_mutating()),
        "a targetless session touched a workload\n{}",
        report(&kube)
    );
    assert_cleaned_up(&bed, &kube);

    // Incoming traffic makes no sense without a workload.
    let out = kube_run(&bed, &kube, "targetless", &["--steal"], &["true"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("no incoming traffic"), "{out}");
}

/// `graft ls --target deploy/api` against the fake cluster.
fn kube_ls(bed: &Bed, kube: &FakeKube) -> Outcome {
    let kubeconfig = kube.kubeconfig_str();
    let mut command = bed.graft(&[
        "ls",
        "--kubeconfig",
        &kubeconfig,
        "-n",
        NAMESPACE,
        "--target",
        "deploy/api",
    ]);
    command.env_remove("KUBECONFIG");
    bed.spawn(command, "graft ls --target deploy/api")
        .finish(KUBE_RUN_TIMEOUT)
}

#[test]
fn graft_ls_lists_the_sessions_of_a_pod_through_a_short_lived_agent_pod() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    let mut session = steal_session(&bed, &kube, &["--agent-mode", "ephemeral"]);
    let out = kube_ls(&bed, &kube);
    assert!(out.success(), "{out}\n{}", report(&kube));
    let port = bed.app_port.to_string();
    let rows: Vec<&str> = out
        .lines()
        .into_iter()
        .filter(|l| l.split_whitespace().any(|w| w == port))
        .collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert!(rows[0].contains("steal"), "{out}");
    assert!(rows[0].contains('@'), "no user@host: {out}");
    // The listing's own agent Job is gone again.
    let posts: Vec<String> = kube
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/jobs"))
        .filter_map(|r| r.body["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(posts.len(), 1, "{}", report(&kube));
    assert!(
        kube.saw(
            "DELETE",
            &format!("/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{}", posts[0])
        ),
        "graft ls left its agent job\n{}",
        report(&kube)
    );
    assert_agent_job_gone(&kube, NAMESPACE, &posts[0], CLEANUP);

    session.signal(Signal::SIGTERM);
    assert!(
        session.wait_timeout(CLEANUP).is_some(),
        "graft did not exit on SIGTERM\n{}",
        session.output_report()
    );
    let out = kube_ls(&bed, &kube);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("no graft sessions"), "{out}");
    assert_cleaned_up(&bed, &kube);
}

/// Starts `graft run --target deploy/api --all-pods --steal --port-map MAP:80
/// FLAGS... -- python3 http_app.py MAP` against a Deployment of two pods (the
/// targets of `bed` and `bed2`) and waits until port 80 of both pods is
/// answered by the local app; returns the session and both replies.
fn all_pods_session(bed: &Bed, bed2: &Bed, kube: &FakeKube, flags: &[&str]) -> (Proc, [String; 2]) {
    let map = format!("{}:80", bed.map_port);
    let mut all = vec!["--all-pods", "--steal", "--port-map", &map];
    all.extend_from_slice(flags);
    let app = fixture_str("http_app.py");
    let port = bed.map_port.to_string();
    let what = format!(
        "graft run --target deploy/api {} -- http_app.py {port}",
        all.join(" ")
    );
    let mut session = bed.spawn(
        kube_command(bed, kube, "deploy/api", &all, &[python(), &app, &port]),
        &what,
    );
    let urls = [bed.target_url(80), bed2.target_url(80)];
    let replies = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!(
                "{what} exited ({status}) before the steal took effect\n{}\n{}",
                session.output_report(),
                report(kube)
            );
        }
        let first = curl(&urls[0]).ok().filter(|b| b.starts_with("local"))?;
        let second = curl(&urls[1]).ok().filter(|b| b.starts_with("local"))?;
        Some([first, second])
    });
    let Some(replies) = replies else {
        panic!(
            "{} and {} were not both answered by the local app (last answers: {:?}, {:?})\n{}\n{}",
            urls[0],
            urls[1],
            curl(&urls[0]),
            curl(&urls[1]),
            session.output_report(),
            report(kube)
        );
    };
    for reply in &replies {
        assert!(
            reply.starts_with(&format!("local port={}", bed.map_port)),
            "{reply}"
        );
    }
    let said = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        session
            .stderr()
            .contains("--all-pods: incoming traffic of 2 pods")
            .then_some(())
    });
    assert!(
        said.is_some(),
        "graft did not say it serves both pods\n{}",
        session.output_report()
    );
    (session, replies)
}

/// Stops an `--all-pods` session with SIGTERM and checks that both pods are
/// as before: no agent, no packet rule, each target answering for itself.
fn stop_all_pods_session(bed: &Bed, bed2: &Bed, kube: &FakeKube, mut session: Proc) {
    session.signal(Signal::SIGTERM);
    assert!(
        session.wait_timeout(CLEANUP).is_some(),
        "graft did not exit on SIGTERM\n{}",
        session.output_report()
    );
    assert_cleaned_up(bed, kube);
    assert_cleaned_up(bed2, kube);
    // A normal end is no lost link (issue 15), and each port was announced once.
    let stderr = session.stderr();
    assert!(
        !stderr.contains("lost the link"),
        "a spurious warning at the end\n{}",
        session.output_report()
    );
    for line in stderr
        .lines()
        .filter(|l| l.contains(" port ") && l.contains("of the target"))
    {
        assert_eq!(
            stderr.matches(line).count(),
            1,
            "announced twice: {line}\n{}",
            session.output_report()
        );
    }
    for b in [bed, bed2] {
        assert_eq!(
            curl(&b.target_url(80)).unwrap(),
            b.target_reply(),
            "\n{}",
            session.output_report()
        );
    }
}

#[test]
fn graft_all_pods_steals_on_every_ready_pod() {
    let bed = Bed::new();
    let bed2 = Bed::new();
    assert_ne!(bed.n, bed2.n, "two beds of one test share a slot");
    assert_eq!(curl(&bed2.target_url(80)).unwrap(), bed2.target_reply());
    let kube = FakeKube::for_beds(&bed, &[&bed2]);
    let (session, _) = all_pods_session(&bed, &bed2, &kube, &["--agent-mode", "ephemeral"]);
    // One ephemeral container per pod, each agent working on its own pod's
    // target.
    let mut patched: Vec<String> = kube
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/ephemeralcontainers"))
        .map(|r| r.path)
        .collect();
    patched.sort();
    assert_eq!(
        patched,
        [
            format!("/api/v1/namespaces/{NAMESPACE}/pods/{TARGET_POD}/ephemeralcontainers"),
            format!("/api/v1/namespaces/{NAMESPACE}/pods/{SECOND_POD}/ephemeralcontainers"),
        ],
        "{}",
        report(&kube)
    );
    assert_eq!(kube.agent_pids().len(), 2, "{}", report(&kube));
    assert!(!bed.agent_pids().is_empty(), "no agent on {TARGET_POD}");
    assert!(!bed2.agent_pids().is_empty(), "no agent on {SECOND_POD}");
    // A rule listing can miss while another tool rewrites the ruleset: retry.
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            (bed.has_graft_rules() && bed2.has_graft_rules()).then_some(())
        })
        .is_some(),
        "graft's rules missing on a pod\n{}",
        session.output_report()
    );
    stop_all_pods_session(&bed, &bed2, &kube, session);
    for pod in [TARGET_POD, SECOND_POD] {
        let pod = kube.pod(NAMESPACE, pod).unwrap();
        assert!(
            pod["status"]["ephemeralContainerStatuses"][0]["state"]["terminated"].is_object(),
            "{}",
            pod["status"]
        );
    }
}

#[test]
fn graft_all_pods_in_node_mode_creates_and_deletes_one_agent_job_per_pod() {
    let bed = Bed::new();
    let bed2 = Bed::new();
    let kube = FakeKube::for_beds(&bed, &[&bed2]);
    let (session, _) = all_pods_session(&bed, &bed2, &kube, &["--agent-mode", "node"]);
    assert!(
        !kube
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/ephemeralcontainers") && r.is_mutating()),
        "node mode added an ephemeral container"
    );
    // One agent Job per target pod, each naming its own pod's container.
    let posts: Vec<SeenRequest> = kube
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/jobs"))
        .collect();
    assert_eq!(posts.len(), 2, "{}", report(&kube));
    let mut named: Vec<String> = posts
        .iter()
        .map(|post| post.body["spec"]["template"]["spec"]["containers"][0]["args"].to_string())
        .collect();
    named.sort();
    let ids = [
        kube.target_container_id().to_owned(),
        kube.pod_container_id(SECOND_POD).unwrap().to_owned(),
    ];
    for id in &ids {
        assert_eq!(
            named
                .iter()
                .filter(|args| args.contains(id.as_str()))
                .count(),
            1,
            "container {id} is not named by exactly one agent pod: {named:?}"
        );
    }
    assert_eq!(kube.agent_pids().len(), 2, "{}", report(&kube));
    // A rule listing can miss while another tool rewrites the ruleset: retry.
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            (bed.has_graft_rules() && bed2.has_graft_rules()).then_some(())
        })
        .is_some(),
        "graft's rules missing on a pod\n{}",
        session.output_report()
    );
    stop_all_pods_session(&bed, &bed2, &kube, session);
    for post in posts {
        let name = post.body["metadata"]["name"].as_str().unwrap().to_owned();
        let path = format!("/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}");
        assert!(
            kube.saw("DELETE", &path),
            "graft did not delete {path}\n{}",
            report(&kube)
        );
        assert_agent_job_gone(&kube, NAMESPACE, &name, CLEANUP);
    }
}
