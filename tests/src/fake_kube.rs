//! [`FakeKube`]: a fake Kubernetes API server that the real `graft` (through
//! kube-rs) talks to over plain HTTP, and whose "pod" is a bed's target
//! process ([`FakeKube::for_bed`]), or whose pods are several beds' targets
//! ([`FakeKube::for_beds`]: one more pod of the ReplicaSet per extra bed).
//!
//! ```text
//!  graft --kubeconfig FILE ──HTTP──> FakeKube (127.0.0.1:PORT)
//!                                     │ namespace shop: deploy/api → rs/api-7d9f → pod api-7d9f-abcde
//!                                     │   (container "web" = the bed's target_server.py)
//!                                     │   [+ pod api-7d9f-fghij, ...: other beds' targets]
//!                                     │ PATCH pods/NAME/ephemeralcontainers → starts the real
//!                                     │   graft-agent (--target-pid 1 → the real pid of NAME's
//!                                     │   target)
//!                                     │ POST jobs (node mode) → the Job controller's pod; POST pods
//!                                     │   → starts it with the pod's args
//!                                     │   (--target-container-id: each target sits in a cgroup
//!                                     │   whose path holds its container ID)
//!                                     └ GET pods/NAME/portforward (WebSocket, v4.channel.k8s.io)
//!                                        → TCP to 127.0.0.1:PORT inside NAME's target netns
//!                                          (other pods: the first target's netns)
//! ```
//!
//! It answers like an API server: objects carry `resourceVersion`s, lists
//! and label/field selectors work, `?watch=true` streams newline-delimited
//! watch events from a history (so a watch from the resourceVersion of a list
//! misses nothing), errors are `Status` objects (404 `NotFound` with details,
//! 403 `Forbidden` naming the verb and resource, 409, 422), and a container's
//! log is what its process wrote to stdout and stderr. The kubelet's part is
//! played too: container states (`waiting` → `running` → `terminated`),
//! events, SIGTERM on pod deletion and removal of the pod once its containers
//! have exited. So are the Job controller's, the TTL-after-finished
//! controller's and the garbage collector's for Jobs ([`jobs`]). Every
//! request is recorded ([`FakeKube::requests`]).
//!
//! Images: an image whose last path component starts with `graft-agent`
//! (`ghcr.io/graft-dev/graft-agent:0.1.0`, any tag) runs the `graft-agent`
//! under test ([`agent_bin`]) with the container's `args` and `env` (plus the
//! image's `PATH`); any other image fails to pull (`ErrImagePull`). Each pod
//! of the Deployment has its target's network namespace; the other pods (the
//! agent pods the fake kubelet runs) share the first target's, as a cluster
//! network would.
//!
//! Tests can deny a verb on a resource ([`FakeKube::deny`], an RBAC stand-in)
//! and cut every open port-forward ([`FakeKube::cut_port_forwards`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{Bed, SLOT_ENV};

mod jobs;
mod kubelet;
mod objects;
mod port_forward;
mod select;
mod server;
mod state;

pub use select::query_param;
use select::{random_hex, rfc3339};
use server::serve;

/// The namespace of the target.
pub const NAMESPACE: &str = "shop";
/// The target's Deployment.
pub const DEPLOYMENT: &str = "api";
/// The Deployment's ReplicaSet.
pub const REPLICASET: &str = "api-7d9f";
/// The first pod of the Deployment: the bed's target process.
pub const TARGET_POD: &str = "api-7d9f-abcde";
/// The second pod of the Deployment ([`FakeKube::for_beds`]): another bed's
/// target process.
pub const SECOND_POD: &str = "api-7d9f-fghij";
/// Names of the pods [`FakeKube::for_beds`] adds, in order.
const EXTRA_POD_NAMES: &[&str] = &[SECOND_POD, "api-7d9f-klmno", "api-7d9f-pqrst"];
/// The target pod's container.
pub const TARGET_CONTAINER: &str = "web";
/// The node the target pod runs on.
pub const NODE: &str = "node-1";
/// The user the kubeconfig authenticates as (named in 403 messages).
pub const USER: &str = "graft-tester";
/// The WebSocket subprotocol the port-forward speaks (the kubelet's binary v4).
pub const PORTFORWARD_PROTOCOL: &str = "v4.channel.k8s.io";

/// The `PATH` a container gets from its image.
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What the fake cluster is built around.
#[derive(Debug, Clone)]
pub struct FakeKubeOptions {
    /// The target process: container `web` of [`TARGET_POD`] (PID 1 of the
    /// container, as an ephemeral container sees it).
    pub target_pid: u32,
    /// The target's network namespace file (`/run/netns/NAME` or
    /// `/proc/PID/ns/net`): where port-forwards connect.
    pub target_netns: PathBuf,
    /// The target pod's `status.podIP`.
    pub pod_ip: Ipv4Addr,
    /// Ports the target's container declares.
    pub container_ports: Vec<u16>,
    /// Extra environment for every process the fake kubelet starts (test
    /// bookkeeping such as the bed's slot marker; a container would not have
    /// it, and the agent takes the target's environment from `/proc`).
    pub process_env: Vec<(String, String)>,
    /// Put the target into a cgroup whose path holds its container ID, so
    /// that node mode's `--target-container-id` finds it (every target pod's
    /// process, each in a cgroup of its own).
    pub container_cgroup: bool,
    /// More ready pods of ReplicaSet [`REPLICASET`], each its own process and
    /// network namespace (another bed's target).
    pub extra_pods: Vec<ExtraPod>,
}

/// One more pod of the Deployment: its container `web` is another process,
/// in another network namespace.
#[derive(Debug, Clone)]
pub struct ExtraPod {
    /// The pod's name, e.g. [`SECOND_POD`].
    pub name: String,
    /// The pod's target process (PID 1 of its container).
    pub target_pid: u32,
    /// The pod's network namespace file: where port-forwards to it connect.
    pub target_netns: PathBuf,
    /// The pod's `status.podIP`.
    pub pod_ip: Ipv4Addr,
    /// Extra environment for the agents the fake kubelet starts for this pod.
    pub process_env: Vec<(String, String)>,
}

impl ExtraPod {
    /// `bed`'s target as pod `name`.
    pub fn for_bed(bed: &Bed, name: &str) -> ExtraPod {
        ExtraPod {
            name: name.to_owned(),
            target_pid: bed.target_pid,
            target_netns: PathBuf::from(format!("/run/netns/{}", bed.target_ns)),
            pod_ip: bed.target_v4,
            process_env: vec![(SLOT_ENV.to_owned(), bed.n.to_string())],
        }
    }
}

impl FakeKubeOptions {
    /// Options for `bed`'s target.
    pub fn for_bed(bed: &Bed) -> FakeKubeOptions {
        FakeKubeOptions {
            target_pid: bed.target_pid,
            target_netns: PathBuf::from(format!("/run/netns/{}", bed.target_ns)),
            pod_ip: bed.target_v4,
            container_ports: vec![80, bed.app_port],
            process_env: vec![(SLOT_ENV.to_owned(), bed.n.to_string())],
            container_cgroup: true,
            extra_pods: Vec::new(),
        }
    }

    /// Options for `bed`'s target as [`TARGET_POD`] and each of `others`'
    /// targets as one more pod ([`SECOND_POD`], ...).
    ///
    /// # Panics
    ///
    /// When more than three other beds are given.
    pub fn for_beds(bed: &Bed, others: &[&Bed]) -> FakeKubeOptions {
        assert!(
            others.len() <= EXTRA_POD_NAMES.len(),
            "the fake cluster has names for {} more pods",
            EXTRA_POD_NAMES.len()
        );
        let mut options = FakeKubeOptions::for_bed(bed);
        options.extra_pods = others
            .iter()
            .zip(EXTRA_POD_NAMES)
            .map(|(other, name)| ExtraPod::for_bed(other, name))
            .collect();
        options
    }
}

/// One request the server received.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// `GET`, `PATCH`, ...
    pub method: String,
    /// The path, e.g. `/api/v1/namespaces/shop/pods/api-7d9f-abcde/ephemeralcontainers`.
    pub path: String,
    /// The raw query string (percent-encoded), possibly empty.
    pub query: String,
    /// The `Content-Type` header, possibly empty.
    pub content_type: String,
    /// The body as JSON (`Null` when empty or not JSON).
    pub body: Value,
}

impl SeenRequest {
    /// The decoded value of query parameter `key`.
    pub fn param(&self, key: &str) -> Option<String> {
        query_param(&self.query, key)
    }

    /// Whether this request changes something (not GET, HEAD or OPTIONS).
    pub fn is_mutating(&self) -> bool {
        !matches!(self.method.as_str(), "GET" | "HEAD" | "OPTIONS")
    }
}

impl std::fmt::Display for SeenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        if !self.query.is_empty() {
            write!(f, "?{}", self.query)?;
        }
        Ok(())
    }
}

/// A fake API server and its kubeconfig; dropping it stops the server, kills
/// the agents it started and takes the target out of its cgroup.
pub struct FakeKube {
    addr: SocketAddr,
    kubeconfig: PathBuf,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

struct Shared {
    options: FakeKubeOptions,
    /// The Deployment's pods: [`TARGET_POD`] first, then the extra pods.
    pods: Vec<TargetPod>,
    state: Mutex<State>,
    /// Bumped on every change of an object or a log.
    changed: watch::Sender<u64>,
    /// Bumped to cut every open port-forward.
    cut: watch::Sender<u64>,
    forwards_open: AtomicUsize,
    /// The cgroups the target pods' processes were put into.
    cgroup: Mutex<Vec<CgroupMove>>,
}

/// One pod of the Deployment and the process behind it.
struct TargetPod {
    name: String,
    container_id: String,
    target_pid: u32,
    netns: PathBuf,
    pod_ip: Ipv4Addr,
    process_env: Vec<(String, String)>,
}

struct CgroupMove {
    pod: String,
    dir: PathBuf,
    back_to: PathBuf,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(String, String, String), Value>,
    history: Vec<Change>,
    requests: Vec<SeenRequest>,
    denials: Vec<(String, String)>,
    logs: BTreeMap<(String, String, String), Log>,
    agents: BTreeMap<(String, String, String), u32>,
}

struct Change {
    rv: u64,
    resource: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Log {
    text: Vec<u8>,
    done: bool,
}

/// A resource the server knows.
struct Kind {
    group: &'static str,
    version: &'static str,
    resource: &'static str,
    kind: &'static str,
    namespaced: bool,
}

impl Kind {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods`, `deployments.apps`: how messages name the resource.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.to_owned()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }
}

const KINDS: &[Kind] = &[
    Kind {
        group: "",
        version: "v1",
        resource: "pods",
        kind: "Pod",
        namespaced: true,
    },
    Kind {
        group: "",
        version: "v1",
        resource: "events",
        kind: "Event",
        namespaced: true,
    },
    Kind {
        group: "",
        version: "v1",
        resource: "services",
        kind: "Service",
        namespaced: true,
    },
    Kind {
        group: "",
        version: "v1",
        resource: "namespaces",
        kind: "Namespace",
        namespaced: false,
    },
    Kind {
        group: "apps",
        version: "v1",
        resource: "deployments",
        kind: "Deployment",
        namespaced: true,
    },
    Kind {
        group: "apps",
        version: "v1",
        resource: "replicasets",
        kind: "ReplicaSet",
        namespaced: true,
    },
    Kind {
        group: "apps",
        version: "v1",
        resource: "statefulsets",
        kind: "StatefulSet",
        namespaced: true,
    },
    Kind {
        group: "apps",
        version: "v1",
        resource: "daemonsets",
        kind: "DaemonSet",
        namespaced: true,
    },
    Kind {
        group: "batch",
        version: "v1",
        resource: "jobs",
        kind: "Job",
        namespaced: true,
    },
    Kind {
        group: "batch",
        version: "v1",
        resource: "cronjobs",
        kind: "CronJob",
        namespaced: true,
    },
];

/// Subresources of pods the server serves.
const POD_SUBRESOURCES: &[&str] = &["log", "ephemeralcontainers", "portforward", "status"];

impl FakeKube {
    /// A fake cluster around `bed`'s target.
    ///
    /// # Panics
    ///
    /// When the server cannot start.
    pub fn for_bed(bed: &Bed) -> FakeKube {
        FakeKube::start(FakeKubeOptions::for_bed(bed))
    }

    /// A fake cluster whose Deployment has one ready pod per bed: `bed`'s
    /// target is [`TARGET_POD`], the first of `others` is [`SECOND_POD`], and
    /// so on (see [`FakeKubeOptions::for_beds`]).
    ///
    /// # Panics
    ///
    /// When the server cannot start.
    pub fn for_beds(bed: &Bed, others: &[&Bed]) -> FakeKube {
        FakeKube::start(FakeKubeOptions::for_beds(bed, others))
    }

    /// Starts the server on 127.0.0.1 (a free port) and writes its kubeconfig.
    ///
    /// # Panics
    ///
    /// When the server cannot start or the kubeconfig cannot be written.
    pub fn start(options: FakeKubeOptions) -> FakeKube {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("fake-kube")
            .build()
            .expect("a tokio runtime for the fake API server");
        let mut pods = vec![TargetPod {
            name: TARGET_POD.to_owned(),
            container_id: random_hex(32),
            target_pid: options.target_pid,
            netns: options.target_netns.clone(),
            pod_ip: options.pod_ip,
            process_env: options.process_env.clone(),
        }];
        for extra in &options.extra_pods {
            assert!(
                !pods.iter().any(|p| p.name == extra.name),
                "two pods are named {}",
                extra.name
            );
            pods.push(TargetPod {
                name: extra.name.clone(),
                container_id: random_hex(32),
                target_pid: extra.target_pid,
                netns: extra.target_netns.clone(),
                pod_ip: extra.pod_ip,
                process_env: extra.process_env.clone(),
            });
        }
        let shared = Arc::new(Shared {
            options,
            pods,
            state: Mutex::new(State::default()),
            changed: watch::Sender::new(0),
            cut: watch::Sender::new(0),
            forwards_open: AtomicUsize::new(0),
            cgroup: Mutex::new(Vec::new()),
        });
        shared.seed();
        if shared.options.container_cgroup {
            for pod in &shared.pods {
                shared.enter_cgroup(pod);
            }
        }
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("the fake API server binds 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        runtime.spawn(serve(listener, shared.clone()));

        let dir = tempfile::Builder::new()
            .prefix("graft-fake-kube-")
            .tempdir()
            .expect("cannot create a temporary directory");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text(addr))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", kubeconfig.display()));
        FakeKube {
            addr,
            kubeconfig,
            shared,
            runtime: Some(runtime),
            _dir: dir,
        }
    }

    /// The kubeconfig file (context `fake`, namespace `shop`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// [`FakeKube::kubeconfig`] as a string, for argument lists.
    pub fn kubeconfig_str(&self) -> String {
        self.kubeconfig.display().to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The target container's ID (64 hex digits, without `containerd://`).
    pub fn target_container_id(&self) -> &str {
        &self.shared.pods[0].container_id
    }

    /// The container ID of target pod `pod` ([`TARGET_POD`], [`SECOND_POD`],
    /// ...), if the Deployment has that pod.
    pub fn pod_container_id(&self, pod: &str) -> Option<&str> {
        self.shared.target_pod(pod).map(|p| p.container_id.as_str())
    }

    /// The names of the Deployment's pods: [`TARGET_POD`], then the extra pods.
    pub fn target_pods(&self) -> Vec<String> {
        self.shared.pods.iter().map(|p| p.name.clone()).collect()
    }

    /// The cgroup directory the target was put into, if any.
    pub fn target_cgroup(&self) -> Option<PathBuf> {
        self.shared
            .cgroup()
            .iter()
            .find(|c| c.pod == TARGET_POD)
            .map(|c| c.dir.clone())
    }

    /// The cgroup directories the target pods' processes were put into.
    pub fn target_cgroups(&self) -> Vec<PathBuf> {
        self.shared.cgroup().iter().map(|c| c.dir.clone()).collect()
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.shared.lock().requests.clone()
    }

    /// The requests so far that change something.
    pub fn mutating_requests(&self) -> Vec<SeenRequest> {
        self.requests()
            .into_iter()
            .filter(SeenRequest::is_mutating)
            .collect()
    }

    /// Whether a request with `method` and exactly `path` was received.
    pub fn saw(&self, method: &str, path: &str) -> bool {
        self.shared
            .lock()
            .requests
            .iter()
            .any(|r| r.method == method && r.path == path)
    }

    /// All requests, one a line, for failure messages.
    pub fn request_report(&self) -> String {
        let requests = self.requests();
        let mut text = format!(
            "--- {} requests to the fake API server ---\n",
            requests.len()
        );
        for r in requests {
            text.push_str(&format!("{r}\n"));
        }
        text
    }

    /// Denies `verb` (`get`, `list`, `watch`, `create`, `patch`, `delete`) on
    /// `resource` (`pods`, `pods/ephemeralcontainers`, `deployments`, ...)
    /// with a 403, as RBAC would.
    pub fn deny(&self, verb: &str, resource: &str) {
        self.shared
            .lock()
            .denials
            .push((verb.to_owned(), resource.to_owned()));
    }

    /// Takes back every [`FakeKube::deny`] of `verb` on `resource`.
    pub fn allow(&self, verb: &str, resource: &str) {
        self.shared
            .lock()
            .denials
            .retain(|(v, r)| !(v == verb && r == resource));
    }

    /// Closes every open port-forward abruptly (no WebSocket close frame),
    /// as when the API server or the kubelet drops the stream.
    pub fn cut_port_forwards(&self) {
        self.shared.cut.send_modify(|generation| *generation += 1);
    }

    /// How many port-forwards are open.
    pub fn open_port_forwards(&self) -> usize {
        self.shared.forwards_open.load(Ordering::SeqCst)
    }

    /// The pids of agent processes the fake kubelet started that still run.
    pub fn agent_pids(&self) -> Vec<u32> {
        self.shared.lock().agents.values().copied().collect()
    }

    /// A pod as the server has it.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .objects
            .get(&key("pods", namespace, name))
            .cloned()
    }

    /// Sets the `Ready` and `ContainersReady` conditions of `pod` (and its
    /// containers' `ready`), as the kubelet does when a readiness probe
    /// starts or stops passing; the pod keeps running.
    ///
    /// # Panics
    ///
    /// When there is no such pod.
    pub fn set_pod_ready(&self, namespace: &str, pod: &str, ready: bool) {
        self.shared.commit(|s| {
            let mut object = s
                .get("pods", namespace, pod)
                .unwrap_or_else(|| panic!("no pod {namespace}/{pod}"))
                .clone();
            let now = rfc3339(SystemTime::now());
            let status = if ready { "True" } else { "False" };
            for condition in object["status"]["conditions"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                if condition["type"] == "Ready" || condition["type"] == "ContainersReady" {
                    condition["status"] = json!(status);
                    condition["lastTransitionTime"] = json!(now);
                    if ready {
                        condition.as_object_mut().map(|c| c.remove("reason"));
                    } else {
                        condition["reason"] = json!("ContainersNotReady");
                    }
                }
            }
            for container in object["status"]["containerStatuses"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                container["ready"] = json!(ready);
            }
            s.put("pods", object, "MODIFIED");
        });
    }

    /// A Job as the server has it.
    pub fn job(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .objects
            .get(&key("jobs", namespace, name))
            .cloned()
    }

    /// The names of the Jobs in `namespace`.
    pub fn job_names(&self, namespace: &str) -> Vec<String> {
        self.shared
            .lock()
            .objects
            .keys()
            .filter(|(r, ns, _)| r == "jobs" && ns == namespace)
            .map(|(_, _, name)| name.clone())
            .collect()
    }

    /// The names of the pods in `namespace`.
    pub fn pod_names(&self, namespace: &str) -> Vec<String> {
        self.shared
            .lock()
            .objects
            .keys()
            .filter(|(r, ns, _)| r == "pods" && ns == namespace)
            .map(|(_, _, name)| name.clone())
            .collect()
    }

    /// What a container has logged so far.
    pub fn log(&self, namespace: &str, pod: &str, container: &str) -> String {
        self.shared
            .lock()
            .logs
            .get(&key(namespace, pod, container))
            .map(|l| String::from_utf8_lossy(&l.text).into_owned())
            .unwrap_or_default()
    }

    /// Every container log, for failure messages.
    pub fn log_report(&self) -> String {
        let state = self.shared.lock();
        let mut text = String::new();
        for ((ns, pod, container), log) in &state.logs {
            text.push_str(&format!(
                "--- log of {ns}/{pod}/{container} ---\n{}\n",
                String::from_utf8_lossy(&log.text)
            ));
        }
        text
    }

    /// Waits until no agent runs, at most `timeout`; whether none does.
    pub fn wait_agents_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.agent_pids().is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        let agents = self.agent_pids();
        for pid in &agents {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
        }
        // The agent's watchdog removes its packet rules when the agent ends.
        self.wait_agents_gone(Duration::from_secs(3));
        for pid in agents {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        self.shared.leave_cgroups();
    }
}

fn kubeconfig_text(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://{addr}
users:
- name: {USER}
  user:
    token: fake-token-not-a-secret
contexts:
- name: fake
  context:
    cluster: fake
    user: {USER}
    namespace: {NAMESPACE}
current-context: fake
"
    )
}

fn key(a: &str, b: &str, c: &str) -> (String, String, String) {
    (a.to_owned(), b.to_owned(), c.to_owned())
}
