//! A Kubernetes session's life beyond its happy path, against the fake API
//! server ([`FakeKube`]: real `graft`, real `graft-agent`, the fake's kubelet
//! and Job, TTL and garbage-collector controllers):
//!
//! - `kill -9` of graft: the target serves its own traffic again at once (the
//!   agent takes its steal out of the hub as soon as the link's transport
//!   drops), and, in node mode, the cluster itself removes the agent's Job
//!   and pod once the agent gives up on its client;
//! - a port-forward that stays down for a while: the target serves meanwhile,
//!   and the steal comes back when graft re-attaches;
//! - a workload whose only pod runs but is not Ready yet: graft waits for it
//!   (bounded by `[kube] ready_timeout`), then works, or says why it gave up.
//!
//! The live-cluster versions are in `e2e_lifecycle.rs`.

use std::process::Command;
use std::time::Duration;

use graft_tests::fake_kube::{NAMESPACE, TARGET_POD};
use graft_tests::{Bed, FakeKube, Proc, curl, fixture_str, python, wait_until};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use nix::sys::signal::Signal;
use serde_json::json;

/// How long one `graft run` against the fake cluster may take.
const KUBE_RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The bound for the target to serve again after graft is killed.
const BACK_TO_THE_TARGET: Duration = Duration::from_secs(2);

/// The agent waits this long for its client to re-attach (the relink's
/// `reconnect_for`), then exits; the cluster then removes its Job.
const AGENT_GRACE: Duration = Duration::from_secs(30);

fn report(kube: &FakeKube) -> String {
    format!("{}{}", kube.request_report(), kube.log_report())
}

/// `graft run --kubeconfig FILE -n shop --target deploy/api FLAGS... -- CMD...`.
fn kube_command(bed: &Bed, kube: &FakeKube, flags: &[&str], cmd: &[&str]) -> Command {
    let kubeconfig = kube.kubeconfig_str();
    let mut args = vec![
        "run",
        "--kubeconfig",
        &kubeconfig,
        "-n",
        NAMESPACE,
        "--target",
        "deploy/api",
    ];
    args.extend_from_slice(flags);
    args.push("--");
    args.extend_from_slice(cmd);
    let mut command = bed.graft(&args);
    command.env_remove("KUBECONFIG");
    command
}

/// Starts a steal of the target's app port by `http_app.py` and waits until
/// the local app answers it.
fn steal_session(bed: &Bed, kube: &FakeKube, flags: &[&str]) -> Proc {
    let mut all = vec!["--steal"];
    all.extend_from_slice(flags);
    let app = fixture_str("http_app.py");
    let port = bed.app_port.to_string();
    let what = format!("graft run --target deploy/api {}", all.join(" "));
    let mut session = bed.spawn(
        kube_command(bed, kube, &all, &[python(), &app, &port]),
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

/// Waits until the target's own server answers its app port; how long that
/// took, or `None` after `within`.
fn target_answers_within(bed: &Bed, within: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    let url = bed.target_url(bed.app_port);
    let reply = bed.target_reply();
    wait_until(within, Duration::from_millis(50), || {
        (curl(&url).ok().as_deref() == Some(reply.as_str())).then(|| started.elapsed())
    })
}

/// The pods in `namespace` that name `job` as their owner.
fn pods_of_job(kube: &FakeKube, job: &str) -> Vec<String> {
    kube.pod_names(NAMESPACE)
        .into_iter()
        .filter(|name| {
            kube.pod(NAMESPACE, name).is_some_and(|pod| {
                pod["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|o| o["kind"] == "Job" && o["name"] == job))
            })
        })
        .collect()
}

fn killed_graft_gives_the_target_its_traffic_back(mode: &str) {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    let mut session = steal_session(&bed, &kube, &["--agent-mode", mode]);
    // SIGKILL: graft runs none of its clean-up.
    session.signal(Signal::SIGKILL);
    assert!(session.wait_timeout(Duration::from_secs(5)).is_some());
    let took = target_answers_within(&bed, BACK_TO_THE_TARGET);
    assert!(
        took.is_some(),
        "the target did not serve its port within {BACK_TO_THE_TARGET:?} of kill -9\n{}\n{}",
        session.output_report(),
        report(&kube)
    );
    // The agent gives up on its client after its grace period, exits and
    // removes its rules; the steal never comes back meanwhile.
    let cleanup = AGENT_GRACE + Duration::from_secs(20);
    assert!(
        kube.wait_agents_gone(cleanup),
        "the agent still runs {cleanup:?} after kill -9\n{}",
        report(&kube)
    );
    let clean = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        (!bed.has_graft_rules()).then_some(())
    });
    assert!(clean.is_some(), "rules left:\n{}", bed.packet_rules());
    assert_eq!(
        curl(&bed.target_url(bed.app_port)).unwrap(),
        bed.target_reply()
    );
    if mode == "node" {
        // Nobody deleted the agent's Job: the cluster removes it, and its pod.
        let job = kube
            .requests()
            .into_iter()
            .find(|r| r.method == "POST" && r.path.ends_with("/jobs"))
            .and_then(|r| r.body["metadata"]["name"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("graft created no job\n{}", report(&kube)));
        assert!(
            !kube.requests().iter().any(|r| r.method == "DELETE"),
            "someone deleted something: the test shows nothing\n{}",
            report(&kube)
        );
        let gone = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            (kube.job(NAMESPACE, &job).is_none() && pods_of_job(&kube, &job).is_empty())
                .then_some(())
        });
        assert!(
            gone.is_some(),
            "job {job} or its pods are left: {:?}\n{}",
            pods_of_job(&kube, &job),
            report(&kube)
        );
    }
}

#[test]
fn kill_9_of_graft_gives_the_target_its_traffic_back_at_once_in_ephemeral_mode() {
    killed_graft_gives_the_target_its_traffic_back("ephemeral");
}

#[test]
fn kill_9_of_graft_gives_the_target_its_traffic_back_and_leaves_no_job_in_node_mode() {
    killed_graft_gives_the_target_its_traffic_back("node");
}

#[test]
fn while_the_port_forward_is_down_the_target_serves_and_the_steal_comes_back_after() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    let mut session = steal_session(&bed, &kube, &["--agent-mode", "ephemeral"]);
    // graft cannot open a new port-forward until the test allows it again.
    kube.deny("get", "pods/portforward");
    kube.cut_port_forwards();
    assert!(
        target_answers_within(&bed, BACK_TO_THE_TARGET).is_some(),
        "the target did not serve while the link was down\n{}\n{}",
        session.output_report(),
        report(&kube)
    );
    // It keeps serving while graft knocks.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        curl(&bed.target_url(bed.app_port)).unwrap(),
        bed.target_reply()
    );
    kube.allow("get", "pods/portforward");
    let url = bed.target_url(bed.app_port);
    let back = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!(
                "graft exited ({status}) while the port-forward was down\n{}\n{}",
                session.output_report(),
                report(&kube)
            );
        }
        curl(&url).ok().filter(|body| body.starts_with("local"))
    });
    assert!(
        back.is_some(),
        "the steal did not come back with the link\n{}\n{}",
        session.output_report(),
        report(&kube)
    );
    session.signal(Signal::SIGTERM);
    assert!(session.wait_timeout(Duration::from_secs(10)).is_some());
    assert!(kube.wait_agents_gone(Duration::from_secs(10)));
}

#[test]
fn graft_waits_for_a_running_pod_to_become_ready_then_works() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    kube.set_pod_ready(NAMESPACE, TARGET_POD, false);
    let mut session = bed.spawn(
        kube_command(
            &bed,
            &kube,
            &[],
            &["sh", "-c", "echo \"$GRAFT_TEST_MARKER\""],
        ),
        "graft run --target deploy/api -- echo",
    );
    // It waits: no agent is placed while the pod is not Ready.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        session.try_status().is_none(),
        "graft did not wait for the pod\n{}",
        session.output_report()
    );
    assert!(
        !kube.requests().iter().any(|r| r.is_mutating()),
        "graft placed an agent beside a pod that is not Ready\n{}",
        report(&kube)
    );
    kube.set_pod_ready(NAMESPACE, TARGET_POD, true);
    let out = session.finish(KUBE_RUN_TIMEOUT);
    assert!(out.success(), "{out}\n{}", report(&kube));
    assert_eq!(out.lines(), [bed.marker.as_str()], "{out}");
}

#[test]
fn graft_gives_up_on_a_pod_that_stays_unready_and_says_so() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    kube.set_pod_ready(NAMESPACE, TARGET_POD, false);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("graft.toml");
    std::fs::write(&config, "[kube]\nready_timeout = 2\n").unwrap();
    let config = config.to_string_lossy().into_owned();
    let out = bed
        .spawn(
            kube_command(&bed, &kube, &["--config", &config], &["true"]),
            "graft run --target deploy/api -- true",
        )
        .finish(KUBE_RUN_TIMEOUT);
    assert!(!out.success(), "{out}");
    for words in [
        "has no ready pod after waiting 2 s",
        TARGET_POD,
        "not Ready",
        "ready_timeout",
    ] {
        assert!(out.stderr.contains(words), "no {words:?} in\n{out}");
    }
    assert!(
        !kube.requests().iter().any(|r| r.is_mutating()),
        "graft created something\n{}",
        report(&kube)
    );
}

/// The fake's Job controllers, through kube-rs: what graft relies on.
#[test]
fn fake_job_controllers_run_the_pod_finish_the_job_and_delete_both() {
    let bed = Bed::new();
    let kube = FakeKube::for_bed(&bed);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let kubeconfig = Kubeconfig::read_from(kube.kubeconfig()).unwrap();
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let jobs: Api<Job> = Api::namespaced(client.clone(), NAMESPACE);
        let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
        // An agent that nobody connects to exits after 1 s (code 5).
        let job = |name: &str, ttl: Option<i32>| -> Job {
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "graft"}},
                "spec": {
                    "backoffLimit": 0,
                    "ttlSecondsAfterFinished": ttl,
                    "template": {
                        "metadata": {"labels": {"graft.dev/session": name}},
                        "spec": {
                            "restartPolicy": "Never", "terminationGracePeriodSeconds": 10,
                            "containers": [{
                                "name": "agent", "image": "ghcr.io/graft-dev/graft-agent:test",
                                "args": ["--target-pid", bed.target_pid.to_string(),
                                         "--listen", "tcp:127.0.0.1:0", "--connect-timeout", "1"],
                                "env": [{"name": "GRAFT_AGENT_SECRET", "value": "s"}],
                            }],
                        },
                    },
                },
            }))
            .unwrap()
        };
        let pod_of = |job: &'static str| {
            let pods = pods.clone();
            async move {
                pods.list(&ListParams::default().labels(&format!("job-name={job}")))
                    .await
                    .unwrap()
                    .items
            }
        };

        // With a TTL of 0: the pod runs, fails, the Job fails, both go.
        jobs.create(&PostParams::default(), &job("short", Some(0)))
            .await
            .unwrap();
        let created = pod_of("short").await;
        assert_eq!(created.len(), 1, "{}", report(&kube));
        let owner = &created[0].metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("Job", Some(true)));
        let gone = async {
            loop {
                if jobs.get_opt("short").await.unwrap().is_none()
                    && pod_of("short").await.is_empty()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(15), gone)
            .await
            .unwrap_or_else(|_| panic!("the finished Job stays\n{}", report(&kube)));

        // Without a TTL the failed Job stays, with its condition.
        jobs.create(&PostParams::default(), &job("kept", None))
            .await
            .unwrap();
        let failed = async {
            loop {
                let job = jobs.get("kept").await.unwrap();
                let conditions = job.status.and_then(|s| s.conditions).unwrap_or_default();
                if let Some(c) = conditions.first() {
                    return (c.type_.clone(), c.reason.clone());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let condition = tokio::time::timeout(Duration::from_secs(15), failed)
            .await
            .expect("the Job fails");
        assert_eq!(
            condition,
            ("Failed".into(), Some("BackoffLimitExceeded".into()))
        );
        assert_eq!(pod_of("kept").await.len(), 1);
        // Deleting it in the background takes its pod along.
        jobs.delete("kept", &DeleteParams::background())
            .await
            .unwrap();
        assert!(jobs.get_opt("kept").await.unwrap().is_none());
        let pod_gone = async {
            while !pod_of("kept").await.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), pod_gone)
            .await
            .expect("the Job's pod goes with it");
    });
}
