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
use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::{Bed, SLOT_ENV, agent_bin};

mod jobs;

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

// ----- state ------------------------------------------------------------------

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cgroup(&self) -> MutexGuard<'_, Vec<CgroupMove>> {
        self.cgroup
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The Deployment's pod `name`, if it is one.
    fn target_pod(&self, name: &str) -> Option<&TargetPod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// The Deployment's pod whose process an agent container of pod `pod`
    /// works on: `pod` itself for an ephemeral container, the pod whose
    /// container ID `args` name (`--target-container-id`, node mode), else
    /// (a targetless agent) the first pod, whose network the cluster shares.
    fn pod_of_agent(&self, pod: &str, ephemeral: bool, args: &[String]) -> &TargetPod {
        if ephemeral && let Some(target) = self.target_pod(pod) {
            return target;
        }
        let named = args.iter().enumerate().find_map(|(i, a)| {
            if a == "--target-container-id" {
                args.get(i + 1).map(String::as_str)
            } else {
                a.strip_prefix("--target-container-id=")
            }
        });
        named
            .and_then(|id| {
                self.pods
                    .iter()
                    .find(|p| !id.is_empty() && id.ends_with(&p.container_id))
            })
            .unwrap_or(&self.pods[0])
    }

    /// Runs `f` on the state, then wakes watches and log followers.
    fn commit<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (result, rv) = {
            let mut state = self.lock();
            let result = f(&mut state);
            (result, state.rv)
        };
        self.changed.send_modify(|v| *v = v.wrapping_add(1).max(rv));
        result
    }

    fn seed(&self) {
        let o = &self.options;
        let replicas = self.pods.len();
        let created = rfc3339(SystemTime::now() - Duration::from_secs(3600));
        let deploy_uid = uid();
        let rs_uid = uid();
        let labels = json!({"app": "api", "pod-template-hash": "7d9f"});
        let container = json!({
            "name": TARGET_CONTAINER,
            "image": "registry.example/shop/api:1.4.2",
            "ports": o.container_ports.iter()
                .map(|p| json!({"containerPort": p, "protocol": "TCP"}))
                .collect::<Vec<_>>(),
            "terminationMessagePolicy": "File",
            "imagePullPolicy": "IfNotPresent",
        });
        let template = json!({
            "metadata": {"labels": labels},
            "spec": {"containers": [container], "restartPolicy": "Always"},
        });
        self.commit(|s| {
            for ns in ["default", "kube-system", NAMESPACE] {
                s.put(
                    "namespaces",
                    json!({
                        "apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": ns, "uid": uid(), "creationTimestamp": created,
                                     "labels": {"kubernetes.io/metadata.name": ns}},
                        "spec": {"finalizers": ["kubernetes"]},
                        "status": {"phase": "Active"},
                    }),
                    "ADDED",
                );
            }
            s.put(
                "deployments",
                json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": DEPLOYMENT, "namespace": NAMESPACE, "uid": deploy_uid,
                                 "generation": 1, "creationTimestamp": created,
                                 "labels": {"app": "api"}},
                    "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "api"}},
                             "template": template},
                    "status": {"observedGeneration": 1, "replicas": replicas,
                               "updatedReplicas": replicas, "readyReplicas": replicas,
                               "availableReplicas": replicas},
                }),
                "ADDED",
            );
            s.put(
                "replicasets",
                json!({
                    "apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "metadata": {"name": REPLICASET, "namespace": NAMESPACE, "uid": rs_uid,
                                 "generation": 1, "creationTimestamp": created, "labels": labels,
                                 "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": DEPLOYMENT, "uid": deploy_uid,
                                     "controller": true, "blockOwnerDeletion": true}]},
                    "spec": {"replicas": replicas,
                             "selector": {"matchLabels": {"app": "api", "pod-template-hash": "7d9f"}},
                             "template": template},
                    "status": {"observedGeneration": 1, "replicas": replicas,
                               "fullyLabeledReplicas": replicas, "readyReplicas": replicas,
                               "availableReplicas": replicas},
                }),
                "ADDED",
            );
            let conditions: Vec<Value> =
                ["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"]
                    .iter()
                    .map(|t| json!({"type": t, "status": "True", "lastTransitionTime": created}))
                    .collect();
            for pod in &self.pods {
                s.put(
                    "pods",
                    json!({
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": pod.name, "namespace": NAMESPACE, "uid": uid(),
                                     "creationTimestamp": created, "labels": labels,
                                     "generateName": format!("{REPLICASET}-"),
                                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                         "name": REPLICASET, "uid": rs_uid,
                                         "controller": true, "blockOwnerDeletion": true}]},
                        "spec": {"containers": [container], "restartPolicy": "Always",
                                 "nodeName": NODE, "serviceAccountName": "default",
                                 "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst"},
                        "status": {
                            "phase": "Running", "conditions": conditions,
                            "hostIP": "10.0.0.11", "hostIPs": [{"ip": "10.0.0.11"}],
                            "podIP": pod.pod_ip.to_string(), "podIPs": [{"ip": pod.pod_ip.to_string()}],
                            "startTime": created, "qosClass": "BestEffort",
                            "containerStatuses": [{
                                "name": TARGET_CONTAINER, "ready": true, "started": true,
                                "restartCount": 0, "image": "registry.example/shop/api:1.4.2",
                                "imageID": format!("registry.example/shop/api@sha256:{}", random_hex(32)),
                                "containerID": format!("containerd://{}", pod.container_id),
                                "state": {"running": {"startedAt": created}},
                            }],
                        },
                    }),
                    "ADDED",
                );
            }
        });
    }

    /// Puts `pod`'s process into `CGROUP2/graft-test-<container id>`.
    fn enter_cgroup(&self, pod: &TargetPod) {
        let root = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            PathBuf::from("/sys/fs/cgroup")
        } else if Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
            PathBuf::from("/sys/fs/cgroup/unified")
        } else {
            eprintln!("fake-kube: no cgroup2 mount; node mode cannot find the target");
            return;
        };
        let pid = pod.target_pid;
        let current = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            })
            .unwrap_or_else(|| "/".into());
        let back_to = root.join(current.trim_start_matches('/'));
        let dir = root.join(format!("graft-test-{}", pod.container_id));
        let moved = std::fs::create_dir(&dir)
            .and_then(|()| std::fs::write(dir.join("cgroup.procs"), pid.to_string()));
        match moved {
            Ok(()) => self.cgroup().push(CgroupMove {
                pod: pod.name.clone(),
                dir,
                back_to,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                eprintln!(
                    "fake-kube: cannot put pid {pid} into {}: {e}",
                    dir.display()
                );
            }
        }
    }

    fn leave_cgroups(&self) {
        let moves = std::mem::take(&mut *self.cgroup());
        for moved in moves {
            Self::leave_cgroup(&moved);
        }
    }

    fn leave_cgroup(moved: &CgroupMove) {
        let procs = std::fs::read_to_string(moved.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(moved.back_to.join("cgroup.procs"), pid);
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&moved.dir).is_ok() || !moved.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("fake-kube: cannot remove {}", moved.dir.display());
    }
}

impl State {
    /// Stores `object` (of `resource`) with a new resourceVersion and records
    /// the change for watches; returns the stored object.
    fn put(&mut self, resource: &str, mut object: Value, kind: &'static str) -> Value {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
        self.history.push(Change {
            rv: self.rv,
            resource: resource.to_owned(),
            namespace: namespace.clone(),
            kind,
            object: object.clone(),
        });
        self.objects
            .insert(key(resource, &namespace, &name), object.clone());
        object
    }

    fn remove(&mut self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let mut object = self.objects.remove(&key(resource, namespace, name))?;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.history.push(Change {
            rv: self.rv,
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            kind: "DELETED",
            object: object.clone(),
        });
        Some(object)
    }

    fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<&Value> {
        self.objects.get(&key(resource, namespace, name))
    }

    fn denied(&self, verb: &str, resource: &str) -> bool {
        self.denials
            .iter()
            .any(|(v, r)| (v == verb || v == "*") && r == resource)
    }

    /// Records a kubelet event about `pod` (and its container `container`).
    fn event(
        &mut self,
        namespace: &str,
        pod: &str,
        field_path: Option<String>,
        type_: &str,
        reason: &str,
        message: &str,
    ) {
        let pod_uid = self
            .get("pods", namespace, pod)
            .map(|p| p["metadata"]["uid"].clone())
            .unwrap_or(Value::Null);
        let now = rfc3339(SystemTime::now());
        let mut involved = json!({"apiVersion": "v1", "kind": "Pod", "name": pod,
                                  "namespace": namespace, "uid": pod_uid});
        if let Some(path) = field_path {
            involved["fieldPath"] = json!(path);
        }
        self.put(
            "events",
            json!({
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"name": format!("{pod}.{}", random_hex(8)), "namespace": namespace,
                             "uid": uid(), "creationTimestamp": now},
                "involvedObject": involved,
                "reason": reason, "message": message, "type": type_, "count": 1,
                "firstTimestamp": now, "lastTimestamp": now,
                "source": {"component": "kubelet", "host": NODE},
                "reportingComponent": "kubelet", "reportingInstance": NODE,
            }),
            "ADDED",
        );
    }

    /// Sets the state of container `name` of `pod` (in
    /// `ephemeralContainerStatuses` or `containerStatuses`).
    fn set_container_state(&mut self, ctr: &Ctr<'_>, container_id: Option<&str>, state: Value) {
        let Ctr {
            namespace,
            pod,
            name,
            ephemeral,
            image,
        } = *ctr;
        let Some(mut object) = self.get("pods", namespace, pod).cloned() else {
            return;
        };
        let field = if ephemeral {
            "ephemeralContainerStatuses"
        } else {
            "containerStatuses"
        };
        let running = state.get("running").is_some();
        let mut status = json!({
            "name": name, "image": image, "imageID": "", "restartCount": 0,
            "ready": !ephemeral && running, "started": running, "state": state,
        });
        if let Some(id) = container_id {
            status["containerID"] = json!(format!("containerd://{id}"));
            status["imageID"] = json!(format!("{image}@sha256:{}", "0".repeat(64)));
        }
        if !object["status"].is_object() {
            object["status"] = json!({});
        }
        let list = object["status"][field]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut list: Vec<Value> = list.into_iter().filter(|s| s["name"] != name).collect();
        list.push(status);
        object["status"][field] = Value::Array(list);
        if !ephemeral {
            update_pod_phase(&mut object);
        }
        self.put("pods", object, "MODIFIED");
    }
}

/// One container of a pod, for status updates.
struct Ctr<'a> {
    namespace: &'a str,
    pod: &'a str,
    name: &'a str,
    ephemeral: bool,
    image: &'a str,
}

/// The phase and conditions of a (node-mode) pod from its container states.
fn update_pod_phase(pod: &mut Value) {
    let statuses = pod["status"]["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let all_running =
        !statuses.is_empty() && statuses.iter().all(|s| s["state"].get("running").is_some());
    let terminated: Vec<i64> = statuses
        .iter()
        .filter_map(|s| s["state"]["terminated"]["exitCode"].as_i64())
        .collect();
    let count = pod["spec"]["containers"].as_array().map_or(0, Vec::len);
    let now = rfc3339(SystemTime::now());
    let phase = if count > 0 && terminated.len() == count {
        if terminated.iter().all(|c| *c == 0) {
            "Succeeded"
        } else {
            "Failed"
        }
    } else if all_running || !terminated.is_empty() {
        "Running"
    } else {
        "Pending"
    };
    pod["status"]["phase"] = json!(phase);
    let ready = if all_running { "True" } else { "False" };
    pod["status"]["conditions"] = json!([
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        {"type": "Initialized", "status": "True", "lastTransitionTime": now},
        {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
        {"type": "Ready", "status": ready, "lastTransitionTime": now},
    ]);
}

// ----- HTTP -------------------------------------------------------------------

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(
            serde_json::to_vec(body).expect("JSON values serialize"),
        ))
        .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn ok(body: &Value) -> Response<Body> {
    full(StatusCode::OK, body)
}

/// A `Status` failure.
fn status(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Response<Body> {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    full(code, &body)
}

fn not_found(kind: &Kind, name: &str) -> Response<Body> {
    let mut details = json!({"name": name, "kind": kind.resource});
    if !kind.group.is_empty() {
        details["group"] = json!(kind.group);
    }
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", kind.qualified()),
        Some(details),
    )
}

fn no_route() -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
        Some(json!({})),
    )
}

fn bad_request(message: &str) -> Response<Body> {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

fn invalid(kind: &Kind, name: &str, message: &str) -> Response<Body> {
    status(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        &format!("{} \"{name}\" is invalid: {message}", kind.kind),
        Some(json!({"name": name, "kind": kind.resource})),
    )
}

/// A chunked body fed by a channel: watches and followed logs.
fn streaming(rx: mpsc::Receiver<Bytes>, content_type: &'static str) -> Response<Body> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// What a request addresses.
struct Target {
    kind: &'static Kind,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

enum Route {
    Discovery(Value),
    Resource(Target),
    Missing,
}

fn route(path: &str) -> Route {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => {
            return Route::Discovery(json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake",
                "platform": "linux/amd64", "goVersion": "go1.24",
                "compiler": "gc", "gitCommit": "fake", "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z",
            }));
        }
        ["api"] => {
            return Route::Discovery(json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [],
            }));
        }
        ["apis"] => {
            let groups: Vec<Value> = ["apps", "batch"].iter().map(|g| api_group(g)).collect();
            return Route::Discovery(json!({
                "kind": "APIGroupList", "apiVersion": "v1", "groups": groups,
            }));
        }
        ["apis", g] if *g == "apps" || *g == "batch" => {
            let mut group = api_group(g);
            group["kind"] = json!("APIGroup");
            group["apiVersion"] = json!("v1");
            return Route::Discovery(group);
        }
        ["api", "v1"] => return Route::Discovery(resource_list("", "v1")),
        ["apis", g, "v1"] if *g == "apps" || *g == "batch" => {
            return Route::Discovery(resource_list(g, "v1"));
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Route::Missing,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, resource, tail @ ..] => {
            (Some((*ns).to_owned()), [&[*resource][..], tail].concat())
        }
        other => (None, other.to_vec()),
    };
    let Some(kind) = KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && Some(&k.resource) == rest.first())
    else {
        return Route::Missing;
    };
    if namespace.is_some() && !kind.namespaced || rest.len() > 3 {
        return Route::Missing;
    }
    let name = rest.get(1).map(|s| (*s).to_owned());
    let sub = rest.get(2).map(|s| (*s).to_owned());
    if let Some(sub) = &sub
        && (kind.resource != "pods" || !POD_SUBRESOURCES.contains(&sub.as_str()))
    {
        return Route::Missing;
    }
    Route::Resource(Target {
        kind,
        namespace,
        name,
        sub,
    })
}

fn api_group(group: &str) -> Value {
    let gv = format!("{group}/v1");
    json!({
        "name": group,
        "versions": [{"groupVersion": gv, "version": "v1"}],
        "preferredVersion": {"groupVersion": gv, "version": "v1"},
    })
}

fn resource_list(group: &str, version: &str) -> Value {
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    let mut resources = Vec::new();
    for k in KINDS.iter().filter(|k| k.group == group) {
        resources.push(json!({
            "name": k.resource, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced,
            "kind": k.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        }));
        if k.resource == "pods" {
            for sub in POD_SUBRESOURCES {
                resources.push(json!({
                    "name": format!("pods/{sub}"), "singularName": "", "namespaced": true,
                    "kind": if *sub == "portforward" { "PodPortForwardOptions" } else { "Pod" },
                    "verbs": ["get", "patch", "create"],
                }));
            }
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

/// The RBAC verb of a request.
fn verb(method: &Method, target: &Target, query: &str) -> &'static str {
    let watching = matches!(query_param(query, "watch").as_deref(), Some("true" | "1"));
    match *method {
        Method::GET | Method::HEAD if target.name.is_none() => {
            if watching {
                "watch"
            } else {
                "list"
            }
        }
        Method::GET | Method::HEAD => {
            if watching {
                "watch"
            } else {
                "get"
            }
        }
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if target.name.is_none() => "deletecollection",
        Method::DELETE => "delete",
        _ => "unknown",
    }
}

fn forbidden(target: &Target, verb: &str) -> Response<Body> {
    let resource = match &target.sub {
        Some(sub) => format!("{}/{sub}", target.kind.resource),
        None => target.kind.resource.to_owned(),
    };
    let object = match &target.name {
        Some(name) => format!("{} \"{name}\"", target.kind.qualified()),
        None => target.kind.qualified(),
    };
    let scope = match &target.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    let mut details = json!({"kind": target.kind.resource});
    if let Some(name) = &target.name {
        details["name"] = json!(name);
    }
    if !target.kind.group.is_empty() {
        details["group"] = json!(target.kind.group);
    }
    status(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &format!(
            "{object} is forbidden: User \"{USER}\" cannot {verb} resource \"{resource}\" in API \
             group \"{}\" {scope}",
            target.kind.group
        ),
        Some(details),
    )
}

async fn handle(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let body = if upgrade {
        Bytes::new()
    } else {
        match req.body_mut().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        }
    };
    shared.lock().requests.push(SeenRequest {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        content_type: content_type.clone(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });

    let target = match route(&path) {
        Route::Discovery(value) if method == Method::GET => return Ok(ok(&value)),
        Route::Discovery(_) => {
            return Ok(status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                None,
            ));
        }
        Route::Missing => return Ok(no_route()),
        Route::Resource(target) => target,
    };
    let verb = verb(&method, &target, &query);
    {
        let resource = match &target.sub {
            Some(sub) => format!("{}/{sub}", target.kind.resource),
            None => target.kind.resource.to_owned(),
        };
        if shared.lock().denied(verb, &resource) {
            return Ok(forbidden(&target, verb));
        }
        // Since Kubernetes 1.35 a WebSocket upgrade of `pods/portforward`
        // (and exec, attach) is also authorized as `create`.
        if upgrade && resource == "pods/portforward" && shared.lock().denied("create", &resource) {
            return Ok(forbidden(&target, "create"));
        }
    }
    if let Some(ns) = &target.namespace
        && shared.lock().get("namespaces", "", ns).is_none()
        && matches!(verb, "get" | "create" | "patch" | "update" | "delete")
    {
        let namespaces = KINDS
            .iter()
            .find(|k| k.resource == "namespaces")
            .expect("namespaces is a kind");
        return Ok(not_found(namespaces, ns));
    }

    let response = match (verb, target.sub.as_deref()) {
        ("watch", None) => watch_objects(&shared, &target, &query),
        ("list", None) => list(&shared, &target, &query),
        ("get", None) => get(&shared, &target),
        ("create", None) => create(&shared, &target, &body),
        ("delete", None) => delete(&shared, &target, &query, &body),
        ("patch", None) => patch_object(&shared, &target, &content_type, &body),
        ("get", Some("log")) => pod_log(&shared, &target, &query),
        ("get", Some("ephemeralcontainers" | "status")) => get(&shared, &target),
        ("patch", Some("ephemeralcontainers")) => {
            patch_ephemeral(&shared, &target, &content_type, &body)
        }
        ("get", Some("portforward")) if upgrade => {
            port_forward(&shared, &target, &query, &mut req).await
        }
        ("get" | "create", Some("portforward")) => bad_request("Upgrade request required"),
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("{verb} is not supported on the requested resource by this fake"),
            None,
        ),
    };
    Ok(response)
}

fn get(shared: &Shared, target: &Target) -> Response<Body> {
    let name = target.name.as_deref().unwrap_or("");
    let ns = target.namespace.as_deref().unwrap_or("");
    match shared.lock().get(target.kind.resource, ns, name) {
        Some(object) => ok(object),
        None => not_found(target.kind, name),
    }
}

/// Whether `object` matches the request's label and field selectors.
fn selected(object: &Value, query: &str) -> Result<bool, String> {
    if let Some(selector) = query_param(query, "labelSelector")
        && !labels_match(&object["metadata"]["labels"], &selector)?
    {
        return Ok(false);
    }
    if let Some(selector) = query_param(query, "fieldSelector")
        && !fields_match(object, &selector)?
    {
        return Ok(false);
    }
    Ok(true)
}

fn list(shared: &Shared, target: &Target, query: &str) -> Response<Body> {
    let state = shared.lock();
    let mut items = Vec::new();
    for ((resource, ns, _), object) in &state.objects {
        if resource != target.kind.resource
            || target.namespace.as_ref().is_some_and(|want| want != ns)
        {
            continue;
        }
        match selected(object, query) {
            Ok(true) => items.push(object.clone()),
            Ok(false) => {}
            Err(message) => return bad_request(&message),
        }
    }
    ok(&json!({
        "kind": format!("{}List", target.kind.kind),
        "apiVersion": target.kind.api_version(),
        "metadata": {"resourceVersion": state.rv.to_string()},
        "items": items,
    }))
}

fn watch_objects(shared: &Arc<Shared>, target: &Target, query: &str) -> Response<Body> {
    if let Err(message) = selected(&json!({}), query) {
        return bad_request(&message);
    }
    let since: u64 = query_param(query, "resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    let initial = matches!(
        query_param(query, "sendInitialEvents").as_deref(),
        Some("true")
    ) || since == 0;
    let timeout = query_param(query, "timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(1800u64);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let shared = shared.clone();
    let resource = target.kind.resource;
    let kind = target.kind.kind;
    let api_version = target.kind.api_version();
    let namespace = target.namespace.clone();
    let query = query.to_owned();
    let bookmarks = query_param(&query, "allowWatchBookmarks").as_deref() == Some("true");
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut changed = shared.changed.subscribe();
        let in_scope =
            |r: &str, ns: &str| r == resource && namespace.as_deref().is_none_or(|want| want == ns);
        let line = |kind: &str, object: &Value| {
            let mut text = serde_json::to_vec(&json!({"type": kind, "object": object}))
                .expect("JSON values serialize");
            text.push(b'\n');
            Bytes::from(text)
        };
        let mut last = since;
        if initial {
            let (objects, rv) = {
                let state = shared.lock();
                let objects: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|((r, ns, _), o)| {
                        in_scope(r, ns) && selected(o, &query).unwrap_or(false)
                    })
                    .map(|(_, o)| o.clone())
                    .collect();
                (objects, state.rv)
            };
            for object in &objects {
                if tx.send(line("ADDED", object)).await.is_err() {
                    return;
                }
            }
            last = rv;
            if bookmarks {
                let mark = json!({"kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": rv.to_string(),
                                 "annotations": {"k8s.io/initial-events-end": "true"}}});
                if tx.send(line("BOOKMARK", &mark)).await.is_err() {
                    return;
                }
            }
        }
        loop {
            changed.mark_unchanged();
            let pending: Vec<(u64, &'static str, Value)> = {
                let state = shared.lock();
                state
                    .history
                    .iter()
                    .filter(|c| c.rv > last && in_scope(&c.resource, &c.namespace))
                    .map(|c| (c.rv, c.kind, c.object.clone()))
                    .collect()
            };
            for (rv, kind, object) in pending {
                last = rv;
                if selected(&object, &query).unwrap_or(false)
                    && tx.send(line(kind, &object)).await.is_err()
                {
                    return;
                }
            }
            tokio::select! {
                result = changed.changed() => if result.is_err() { return },
                () = tokio::time::sleep_until(deadline) => return,
                () = tx.closed() => return,
            }
        }
    });
    streaming(rx, "application/json")
}

fn new_metadata(object: &mut Value, namespace: Option<&str>) {
    let now = rfc3339(SystemTime::now());
    let meta = &mut object["metadata"];
    meta["uid"] = json!(uid());
    meta["creationTimestamp"] = json!(now);
    if let Some(ns) = namespace {
        meta["namespace"] = json!(ns);
    }
}

fn create(shared: &Arc<Shared>, target: &Target, body: &[u8]) -> Response<Body> {
    if target.name.is_some() {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            None,
        );
    }
    let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
        return bad_request("the body of the request was in an unknown format");
    };
    let ns = target.namespace.clone();
    let mut name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
    if name.is_empty()
        && let Some(prefix) = object["metadata"]["generateName"].as_str()
    {
        name = format!("{prefix}{}", &random_hex(3)[..5]);
        object["metadata"]["name"] = json!(name);
    }
    if name.is_empty() {
        return invalid(
            target.kind,
            "",
            "metadata.name: Required value: name or generateName is required",
        );
    }
    if let Some(body_ns) = object["metadata"]["namespace"].as_str()
        && Some(body_ns) != ns.as_deref()
    {
        return bad_request(
            "the namespace of the provided object does not match the namespace sent on the \
             request",
        );
    }
    object["apiVersion"] = json!(target.kind.api_version());
    object["kind"] = json!(target.kind.kind);
    new_metadata(&mut object, ns.as_deref());
    let ns = ns.unwrap_or_default();
    let is_pod = target.kind.resource == "pods";
    if is_pod && let Err(message) = admit_pod(&mut object) {
        return invalid(target.kind, &name, message);
    }
    let stored = shared.commit(|s| {
        if s.get(target.kind.resource, &ns, &name).is_some() {
            return None;
        }
        Some(s.put(target.kind.resource, object, "ADDED"))
    });
    let Some(stored) = stored else {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", target.kind.qualified()),
            Some(json!({"name": name, "kind": target.kind.resource})),
        );
    };
    if is_pod {
        start_pod(shared, &stored);
    }
    if target.kind.resource == "jobs" {
        jobs::created(shared, &stored);
    }
    full(StatusCode::CREATED, &stored)
}

/// The API server's defaults for a new pod, and the fake scheduler's
/// binding: a pod bound to no node goes to the only one.
fn admit_pod(object: &mut Value) -> Result<(), &'static str> {
    let containers = object["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if containers.is_empty() {
        return Err("spec.containers: Required value");
    }
    object["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
    if object["spec"]["nodeName"].is_null() {
        object["spec"]["nodeName"] = json!(NODE);
    }
    if object["spec"]["nodeName"] == NODE {
        object["status"]["hostIP"] = json!("10.0.0.11");
        object["status"]["podIP"] = json!("10.244.1.77");
        object["status"]["startTime"] = json!(rfc3339(SystemTime::now()));
        object["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "True"}]);
    }
    Ok(())
}

/// The fake kubelet runs the containers of a stored pod bound to its node.
fn start_pod(shared: &Arc<Shared>, pod: &Value) {
    if pod["spec"]["nodeName"] != NODE {
        return;
    }
    let ns = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_owned();
    for container in pod["spec"]["containers"].as_array().into_iter().flatten() {
        tokio::spawn(run_container(
            shared.clone(),
            ns.clone(),
            name.clone(),
            container.clone(),
            false,
        ));
    }
}

fn delete(shared: &Arc<Shared>, target: &Target, query: &str, body: &[u8]) -> Response<Body> {
    let name = target.name.clone().unwrap_or_default();
    let ns = target.namespace.clone().unwrap_or_default();
    let resource = target.kind.resource;
    let Some(object) = delete_object(shared, resource, &ns, &name) else {
        return not_found(target.kind, &name);
    };
    if resource == "jobs" {
        // DeleteOptions come in the body (kube-rs) or the query (kubectl).
        let options: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let policy = options["propagationPolicy"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| query_param(query, "propagationPolicy"));
        jobs::deleted(shared, &object, policy.as_deref());
    }
    ok(&object)
}

/// Deletes an object as the API server and kubelet would: a pod whose
/// containers run gets a deletion timestamp, SIGTERM to each process and
/// SIGKILL after its grace period, and goes once they have all exited
/// (run_container); anything else goes at once. Returns the object, or
/// `None` when there is none.
fn delete_object(shared: &Arc<Shared>, resource: &str, ns: &str, name: &str) -> Option<Value> {
    let (object, running, grace) = shared.commit(|s| {
        let object = s.get(resource, ns, name)?.clone();
        let running: Vec<u32> = s
            .agents
            .iter()
            .filter(|((a_ns, pod, _), _)| *a_ns == ns && *pod == name)
            .map(|(_, pid)| *pid)
            .collect();
        if resource != "pods" || running.is_empty() {
            return s.remove(resource, ns, name).map(|o| (o, Vec::new(), 0));
        }
        if object["metadata"]["deletionTimestamp"].is_string() {
            return Some((object, Vec::new(), 0));
        }
        let grace = object["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        let mut object = object;
        object["metadata"]["deletionTimestamp"] = json!(rfc3339(SystemTime::now()));
        object["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
        let stored = s.put(resource, object, "MODIFIED");
        Some((stored, running, grace))
    })?;
    for pid in &running {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
    }
    if !running.is_empty() {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(grace)).await;
            let alive: Vec<u32> = shared.lock().agents.values().copied().collect();
            for pid in running.into_iter().filter(|p| alive.contains(p)) {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        });
    }
    Some(object)
}

/// RFC 7386 JSON merge patch (what a strategic-merge patch is for fields
/// without a merge key).
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in fields {
                if v.is_null() {
                    if let Some(map) = target.as_object_mut() {
                        map.remove(k);
                    }
                } else {
                    merge_patch(&mut target[k.as_str()], v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn patch_object(
    shared: &Shared,
    target: &Target,
    content_type: &str,
    body: &[u8],
) -> Response<Body> {
    if !content_type.starts_with("application/merge-patch+json")
        && !content_type.starts_with("application/strategic-merge-patch+json")
    {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!(
                "the body of the request was in an unknown format - accepted media types \
                      include: application/merge-patch+json, \
                      application/strategic-merge-patch+json (this fake), got {content_type:?}"
            ),
            None,
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return bad_request("the body of the request was in an unknown format");
    };
    let name = target.name.clone().unwrap_or_default();
    let ns = target.namespace.clone().unwrap_or_default();
    let result = shared.commit(|s| {
        let mut object = s.get(target.kind.resource, &ns, &name)?.clone();
        merge_patch(&mut object, &patch);
        object["metadata"]["name"] = json!(name);
        Some(s.put(target.kind.resource, object, "MODIFIED"))
    });
    match result {
        Some(object) => ok(&object),
        None => not_found(target.kind, &name),
    }
}

/// `PATCH pods/NAME/ephemeralcontainers`: strategic merge (merge key `name`),
/// JSON merge patch or JSON patch; existing ephemeral containers cannot be
/// changed or removed, new ones are started by the fake kubelet.
fn patch_ephemeral(
    shared: &Arc<Shared>,
    target: &Target,
    content_type: &str,
    body: &[u8],
) -> Response<Body> {
    let name = target.name.clone().unwrap_or_default();
    let ns = target.namespace.clone().unwrap_or_default();
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return bad_request("the body of the request was in an unknown format");
    };
    let Some(pod) = shared.lock().get("pods", &ns, &name).cloned() else {
        return not_found(target.kind, &name);
    };
    let existing: Vec<Value> = pod["spec"]["ephemeralContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut patched = pod.clone();
    if content_type.starts_with("application/strategic-merge-patch+json") {
        let listed = patch["spec"]["ephemeralContainers"].as_array().cloned();
        let mut rest = patch.clone();
        if let Some(spec) = rest.get_mut("spec").and_then(Value::as_object_mut) {
            spec.remove("ephemeralContainers");
        }
        merge_patch(&mut patched, &rest);
        let mut merged = existing.clone();
        for c in listed.into_iter().flatten() {
            match merged.iter_mut().find(|e| e["name"] == c["name"]) {
                Some(e) => merge_patch(e, &c),
                None => merged.push(c),
            }
        }
        patched["spec"]["ephemeralContainers"] = Value::Array(merged);
    } else if content_type.starts_with("application/merge-patch+json") {
        merge_patch(&mut patched, &patch);
    } else if content_type.starts_with("application/json-patch+json") {
        for op in patch.as_array().into_iter().flatten() {
            let path = op["path"].as_str().unwrap_or("");
            match (op["op"].as_str(), path) {
                (Some("add"), "/spec/ephemeralContainers/-") => {
                    let list = &mut patched["spec"]["ephemeralContainers"];
                    if !list.is_array() {
                        *list = json!([]);
                    }
                    if let Some(list) = list.as_array_mut() {
                        list.push(op["value"].clone());
                    }
                }
                (Some("add" | "replace"), "/spec/ephemeralContainers") => {
                    patched["spec"]["ephemeralContainers"] = op["value"].clone();
                }
                (Some("test"), "/metadata/uid") => {
                    if pod["metadata"]["uid"] != op["value"] {
                        return status(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid",
                            "the server rejected our request due to an error in our request",
                            None,
                        );
                    }
                }
                _ => {
                    return bad_request(&format!(
                        "this fake does not apply JSON patch operation {op}"
                    ));
                }
            }
        }
    } else {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!(
                "the body of the request was in an unknown format - accepted media types \
                      include: application/json-patch+json, application/merge-patch+json, \
                      application/strategic-merge-patch+json; got {content_type:?}"
            ),
            None,
        );
    }
    if patched["metadata"]["uid"] != pod["metadata"]["uid"] {
        return status(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on pods \"{name}\": Precondition failed: UID in \
                 precondition: {}, UID in object meta: {}",
                patched["metadata"]["uid"].as_str().unwrap_or(""),
                pod["metadata"]["uid"].as_str().unwrap_or("")
            ),
            Some(json!({"name": name, "kind": "pods"})),
        );
    }
    let after: Vec<Value> = patched["spec"]["ephemeralContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // Validation as the API server does it.
    for old in &existing {
        match after.iter().find(|c| c["name"] == old["name"]) {
            Some(c) if c == old => {}
            _ => {
                return invalid(
                    target.kind,
                    &name,
                    "spec.ephemeralContainers: Forbidden: existing ephemeral containers may not \
                     be removed or changed",
                );
            }
        }
    }
    let containers: Vec<String> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect();
    let added: Vec<Value> = after
        .iter()
        .filter(|c| !existing.iter().any(|e| e["name"] == c["name"]))
        .cloned()
        .collect();
    for c in &added {
        let cname = c["name"].as_str().unwrap_or("");
        if cname.is_empty() {
            return invalid(
                target.kind,
                &name,
                "spec.ephemeralContainers[0].name: Required value",
            );
        }
        if c["image"].as_str().unwrap_or("").is_empty() {
            return invalid(
                target.kind,
                &name,
                &format!("spec.ephemeralContainers[{cname}].image: Required value"),
            );
        }
        if containers.iter().any(|n| n == cname) {
            return invalid(
                target.kind,
                &name,
                &format!("spec.ephemeralContainers[{cname}].name: Duplicate value: \"{cname}\""),
            );
        }
        if let Some(t) = c["targetContainerName"].as_str()
            && !containers.iter().any(|n| n == t)
        {
            return invalid(
                target.kind,
                &name,
                &format!(
                    "spec.ephemeralContainers[{cname}].targetContainerName: Not found: \"{t}\""
                ),
            );
        }
        for field in ["ports", "resources", "livenessProbe", "readinessProbe"] {
            if !c[field].is_null() {
                return invalid(
                    target.kind,
                    &name,
                    &format!(
                        "spec.ephemeralContainers[{cname}].{field}: Forbidden: cannot be set for \
                         an Ephemeral Container"
                    ),
                );
            }
        }
    }
    let stored = shared.commit(|s| {
        let mut current = s.get("pods", &ns, &name)?.clone();
        current["spec"]["ephemeralContainers"] = Value::Array(after.clone());
        Some(s.put("pods", current, "MODIFIED"))
    });
    let Some(stored) = stored else {
        return not_found(target.kind, &name);
    };
    for c in added {
        tokio::spawn(run_container(
            shared.clone(),
            ns.clone(),
            name.clone(),
            c,
            true,
        ));
    }
    ok(&stored)
}

fn pod_log(shared: &Arc<Shared>, target: &Target, query: &str) -> Response<Body> {
    let name = target.name.clone().unwrap_or_default();
    let ns = target.namespace.clone().unwrap_or_default();
    let Some(pod) = shared.lock().get("pods", &ns, &name).cloned() else {
        return not_found(target.kind, &name);
    };
    let names = |field: &str| -> Vec<String> {
        pod["spec"][field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_owned))
            .collect()
    };
    let containers = names("containers");
    let ephemeral = names("ephemeralContainers");
    let container = match query_param(query, "container") {
        Some(c) => c,
        None if containers.len() == 1 => containers[0].clone(),
        None => {
            return bad_request(&format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            ));
        }
    };
    if !containers.contains(&container) && !ephemeral.contains(&container) {
        return bad_request(&format!(
            "container {container} is not valid for pod {name}"
        ));
    }
    let key = key(&ns, &name, &container);
    let follow = matches!(query_param(query, "follow").as_deref(), Some("true" | "1"));
    if !shared.lock().logs.contains_key(&key) {
        if container == TARGET_CONTAINER && shared.target_pod(&name).is_some() {
            // The target's own output goes to the bed, not here.
            let (_tx, rx) = mpsc::channel(1);
            return streaming(rx, "text/plain");
        }
        return bad_request(&format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: ContainerCreating"
        ));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut offset = 0;
        let mut changed = shared.changed.subscribe();
        loop {
            changed.mark_unchanged();
            let (chunk, done) = {
                let state = shared.lock();
                let Some(log) = state.logs.get(&key) else {
                    return;
                };
                (log.text[offset..].to_vec(), log.done)
            };
            offset += chunk.len();
            if !chunk.is_empty() && tx.send(Bytes::from(chunk)).await.is_err() {
                return;
            }
            if done || !follow {
                return;
            }
            tokio::select! {
                result = changed.changed() => if result.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    streaming(rx, "text/plain")
}

// ----- the fake kubelet -------------------------------------------------------

fn is_agent_image(image: &str) -> bool {
    image
        .rsplit('/')
        .next()
        .is_some_and(|last| last.starts_with("graft-agent"))
}

/// Runs one container of a pod: the real `graft-agent` for an agent image,
/// an image pull failure for anything else.
async fn run_container(shared: Arc<Shared>, ns: String, pod: String, spec: Value, ephemeral: bool) {
    let name = spec["name"].as_str().unwrap_or("").to_owned();
    let image = spec["image"].as_str().unwrap_or("").to_owned();
    let ctr = Ctr {
        namespace: &ns,
        pod: &pod,
        name: &name,
        ephemeral,
        image: &image,
    };
    let field_path = Some(if ephemeral {
        format!("spec.ephemeralContainers{{{name}}}")
    } else {
        format!("spec.containers{{{name}}}")
    });
    shared.commit(|s| {
        s.set_container_state(
            &ctr,
            None,
            json!({"waiting": {"reason": "ContainerCreating"}}),
        );
    });
    if !is_agent_image(&image) {
        let message = format!(
            "Failed to pull image \"{image}\": rpc error: code = NotFound desc = failed to pull \
             and unpack image \"{image}\": not found"
        );
        shared.commit(|s| {
            s.event(&ns, &pod, field_path.clone(), "Warning", "Failed", &message);
            s.set_container_state(
                &ctr,
                None,
                json!({"waiting": {"reason": "ErrImagePull", "message": message}}),
            );
        });
        return;
    }
    let args: Vec<String> = spec["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    // `--target-pid 1`: in an ephemeral container, PID 1 of the target
    // container's PID namespace is the target itself (the real pid of the pod
    // the container was added to); in a pod of its own (a targetless agent),
    // PID 1 is the agent, in the pod's network. This fake's other pods share
    // the cluster network of the first bed's target namespace, so there it
    // becomes the first target's real pid.
    let target = shared.pod_of_agent(&pod, ephemeral, &args);
    // The bed's host stands for both the node and every client of the tests, so
    // the kubelet-probe exclusion (`--probe-source gateway`: the target's
    // default gateway is the host) would keep every test request from being
    // stolen; tests/tests/rules.rs covers it on its own.
    let mut kept = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        if arg == "--probe-source" {
            it.next();
        } else if !arg.starts_with("--probe-source=") {
            kept.push(arg);
        }
    }
    let mut args = kept;
    {
        let real = target.target_pid.to_string();
        for i in 0..args.len() {
            if args[i] == "--target-pid=1" {
                args[i] = format!("--target-pid={real}");
            } else if args[i] == "--target-pid" && args.get(i + 1).map(String::as_str) == Some("1")
            {
                args[i + 1] = real.clone();
            }
        }
    }
    let mut command = tokio::process::Command::new(agent_bin());
    command
        .args(&args)
        .env_clear()
        .env("PATH", IMAGE_PATH)
        .env("HOSTNAME", &pod)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    for var in spec["env"].as_array().into_iter().flatten() {
        if let (Some(k), Some(v)) = (var["name"].as_str(), var["value"].as_str()) {
            command.env(k, v);
        }
    }
    for (k, v) in &target.process_env {
        command.env(k, v);
    }
    let log_key = key(&ns, &pod, &name);
    shared.commit(|s| {
        s.logs.insert(log_key.clone(), Log::default());
        s.event(
            &ns,
            &pod,
            field_path.clone(),
            "Normal",
            "Pulled",
            &format!("Container image \"{image}\" already present on machine"),
        );
    });
    let container_id = random_hex(32);
    let started = rfc3339(SystemTime::now());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let message = format!("failed to start {}: {e}", agent_bin().display());
            shared.commit(|s| {
                s.event(&ns, &pod, field_path.clone(), "Warning", "Failed", &message);
                if let Some(log) = s.logs.get_mut(&log_key) {
                    log.done = true;
                }
                s.set_container_state(
                    &ctr,
                    Some(&container_id),
                    json!({"terminated": {"exitCode": 128, "reason": "StartError",
                                          "message": message, "startedAt": started,
                                          "finishedAt": started}}),
                );
            });
            return;
        }
    };
    let pid = child.id().unwrap_or(0);
    shared.commit(|s| {
        s.agents.insert(log_key.clone(), pid);
        s.event(
            &ns,
            &pod,
            field_path.clone(),
            "Normal",
            "Created",
            &format!("Created container: {name}"),
        );
        s.event(
            &ns,
            &pod,
            field_path.clone(),
            "Normal",
            "Started",
            &format!("Started container {name}"),
        );
        s.set_container_state(
            &ctr,
            Some(&container_id),
            json!({"running": {"startedAt": started}}),
        );
    });
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    .map(|pipe| {
        let shared = shared.clone();
        let log_key = log_key.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match lines.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => shared.commit(|s| {
                        if let Some(log) = s.logs.get_mut(&log_key) {
                            log.text.extend_from_slice(&line);
                        }
                    }),
                }
            }
        })
    })
    .collect();
    let exit = child.wait().await;
    // The agent's watchdog inherits the pipes: give it a moment, not forever.
    for reader in readers {
        let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    }
    let code = match exit {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
        }
        Err(_) => 255,
    };
    let finished = rfc3339(SystemTime::now());
    shared.commit(|s| {
        s.agents.remove(&log_key);
        let mut terminated = json!({
            "exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
            "startedAt": started, "finishedAt": finished,
            "containerID": format!("containerd://{container_id}"),
        });
        let log = s.logs.get_mut(&log_key).map(|log| {
            log.done = true;
            log.text.clone()
        });
        if code != 0
            && spec["terminationMessagePolicy"] == "FallbackToLogsOnError"
            && let Some(text) = log
        {
            let tail: Vec<&str> = std::str::from_utf8(&text)
                .unwrap_or("")
                .lines()
                .rev()
                .take(20)
                .collect();
            let message: Vec<&str> = tail.into_iter().rev().collect();
            terminated["message"] = json!(message.join("\n"));
        }
        s.set_container_state(
            &ctr,
            Some(&container_id),
            json!({ "terminated": terminated }),
        );
        // A pod being deleted goes once none of its containers runs.
        let deleting = s
            .get("pods", &ns, &pod)
            .is_some_and(|p| p["metadata"]["deletionTimestamp"].is_string());
        let others = s
            .agents
            .keys()
            .any(|(a_ns, a_pod, _)| *a_ns == ns && *a_pod == pod);
        if deleting && !others {
            s.remove("pods", &ns, &pod);
        }
    });
    if !ephemeral {
        jobs::pod_exited(&shared, &ns, &pod);
    }
}

// ----- port-forward -----------------------------------------------------------

async fn port_forward(
    shared: &Arc<Shared>,
    target: &Target,
    query: &str,
    req: &mut Request<Incoming>,
) -> Response<Body> {
    let name = target.name.clone().unwrap_or_default();
    let ns = target.namespace.clone().unwrap_or_default();
    let Some(pod) = shared.lock().get("pods", &ns, &name).cloned() else {
        return not_found(target.kind, &name);
    };
    if pod["status"]["phase"] != "Running" {
        return bad_request(&format!(
            "unable to upgrade connection: pod {name} is not running"
        ));
    }
    let ports: Result<Vec<u16>, _> = query_param(query, "ports")
        .unwrap_or_default()
        .split(',')
        .map(|p| p.trim().parse::<u16>())
        .collect();
    let ports = match ports {
        Ok(ports) if !ports.is_empty() && !ports.contains(&0) => ports,
        _ => return bad_request("ports: invalid or missing port numbers"),
    };
    let offered = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if !offered.split(',').any(|p| p.trim() == PORTFORWARD_PROTOCOL) {
        return bad_request(&format!(
            "unable to upgrade connection: none of the offered subprotocols ({offered:?}) is \
             supported; this server speaks {PORTFORWARD_PROTOCOL}"
        ));
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return bad_request("missing Sec-WebSocket-Key");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    // Each pod of the Deployment has its own network namespace (its bed's
    // target namespace); the other pods (agent pods the fake kubelet runs)
    // share the first bed's target namespace, as the cluster network.
    let netns = Some(
        shared
            .target_pod(&name)
            .unwrap_or(&shared.pods[0])
            .netns
            .clone(),
    );
    let upgrade = hyper::upgrade::on(req);
    let shared = shared.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        shared.forwards_open.fetch_add(1, Ordering::SeqCst);
        serve_forward(&shared, ws, &ports, netns, &name).await;
        shared.forwards_open.fetch_sub(1, Ordering::SeqCst);
    });
    let mut response = Response::new(Empty::new().boxed_unsync());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(PORTFORWARD_PROTOCOL),
    );
    response
}

/// Connects to 127.0.0.1:`port` inside the network namespace `netns`, from a
/// thread of its own (so no pooled thread is left in that namespace).
fn connect_in_netns(netns: PathBuf, port: u16) -> std::io::Result<std::net::TcpStream> {
    std::thread::spawn(move || {
        let file = File::open(&netns)?;
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        let stream = std::net::TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Duration::from_secs(5),
        )?;
        stream.set_nonblocking(true)?;
        Ok(stream)
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("the connecting thread panicked")))
}

/// The kubelet's side of a port-forward: for port `i`, channel `2i` carries
/// data and `2i+1` errors; each starts with the port number (2 bytes, little
/// endian).
async fn serve_forward<S>(
    shared: &Shared,
    ws: WebSocketStream<S>,
    ports: &[u16],
    netns: Option<PathBuf>,
    pod: &str,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut cut = shared.cut.subscribe();
    cut.mark_unchanged();
    let (mut sink, mut stream) = ws.split();
    for (i, port) in ports.iter().enumerate() {
        let [lo, hi] = port.to_le_bytes();
        let data = (2 * i) as u8;
        for channel in [data, data + 1] {
            if sink
                .send(Message::binary(vec![channel, lo, hi]))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    let (from_pod_tx, mut from_pod) = mpsc::channel::<(u8, Option<Bytes>)>(16);
    let mut writers: Vec<Option<tokio::net::tcp::OwnedWriteHalf>> = Vec::new();
    let mut open = 0usize;
    for (i, port) in ports.iter().enumerate() {
        let connected = match &netns {
            Some(netns) => {
                let netns = netns.clone();
                let port = *port;
                tokio::task::spawn_blocking(move || connect_in_netns(netns, port))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                    .and_then(tokio::net::TcpStream::from_std)
            }
            None => Err(std::io::Error::other(
                "this pod has no network namespace in the fake cluster",
            )),
        };
        let data = (2 * i) as u8;
        match connected {
            Ok(tcp) => {
                let (mut read, write) = tcp.into_split();
                writers.push(Some(write));
                open += 1;
                let tx = from_pod_tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match read.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                let _ = tx.send((data, None)).await;
                                return;
                            }
                            Ok(n) => {
                                if tx
                                    .send((data, Some(Bytes::copy_from_slice(&buf[..n]))))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
            Err(e) => {
                writers.push(None);
                let mut frame = vec![data + 1];
                frame.extend_from_slice(
                    format!(
                        "error forwarding port {port} to pod {pod}, uid : failed to connect to \
                         localhost:{port} inside namespace: {e}"
                    )
                    .as_bytes(),
                );
                let _ = sink.send(Message::binary(frame)).await;
            }
        }
    }
    drop(from_pod_tx);
    if open == 0 {
        let _ = sink.send(Message::Close(None)).await;
        return;
    }
    loop {
        tokio::select! {
            _ = cut.changed() => return, // dropped without a close frame
            message = stream.next() => match message {
                Some(Ok(Message::Binary(bytes))) if bytes.len() > 1 => {
                    let channel = usize::from(bytes[0]);
                    if channel % 2 == 0
                        && let Some(Some(writer)) = writers.get_mut(channel / 2)
                        && writer.write_all(&bytes[1..]).await.is_err()
                    {
                        writers[channel / 2] = None;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            event = from_pod.recv() => match event {
                Some((channel, Some(bytes))) => {
                    let mut frame = Vec::with_capacity(bytes.len() + 1);
                    frame.push(channel);
                    frame.extend_from_slice(&bytes);
                    if sink.send(Message::binary(frame)).await.is_err() {
                        return;
                    }
                }
                Some((_, None)) => {
                    open -= 1;
                    if open == 0 {
                        let _ = sink.send(Message::Close(None)).await;
                        return;
                    }
                }
                None => return,
            },
        }
    }
}

// ----- selectors, queries, names ----------------------------------------------

/// The decoded value of `key` in a query string.
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| percent_decode(k) == key)
        .map(|(_, v)| percent_decode(v))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits on commas outside parentheses.
fn split_terms(selector: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    terms.push(current);
    terms
        .into_iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

fn labels_match(labels: &Value, selector: &str) -> Result<bool, String> {
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    for term in split_terms(selector) {
        let set = |rest: &str| -> Result<Vec<String>, String> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("unable to parse requirement: {term}"))?;
            Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
        };
        let matched = if let Some((k, rest)) = term.split_once(" notin ") {
            let values = set(rest)?;
            label(k.trim()).is_none_or(|v| !values.iter().any(|x| x == v))
        } else if let Some((k, rest)) = term.split_once(" in ") {
            let values = set(rest)?;
            label(k.trim()).is_some_and(|v| values.iter().any(|x| x == v))
        } else if let Some((k, v)) = term.split_once("!=") {
            label(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            label(k.trim()) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            label(k.trim()).is_none()
        } else {
            label(&term).is_some()
        };
        if !matched {
            return Ok(false);
        }
    }
    Ok(true)
}

fn fields_match(object: &Value, selector: &str) -> Result<bool, String> {
    for term in split_terms(selector) {
        let (path, want, equal) = if let Some((p, v)) = term.split_once("!=") {
            (p, v, false)
        } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (p, v, true)
        } else {
            return Err(format!("invalid field selector: {term}"));
        };
        let mut value = object;
        for part in path.trim().split('.') {
            value = &value[part];
        }
        let have = match value {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        if (have == want.trim()) != equal {
            return Ok(false);
        }
    }
    Ok(true)
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("/dev/urandom is readable");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn uid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// `2026-01-02T03:04:05Z` (RFC 3339, whole seconds, as the API server writes).
fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    jiff::Timestamp::from_second(secs)
        .expect("a time after the epoch is a valid timestamp")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let labels = json!({"app": "api", "tier": "web"});
        assert!(labels_match(&labels, "app=api").unwrap());
        assert!(labels_match(&labels, "app==api,tier").unwrap());
        assert!(!labels_match(&labels, "app=api,tier!=web").unwrap());
        assert!(labels_match(&labels, "tier in (web, db),!missing").unwrap());
        assert!(!labels_match(&labels, "app notin (api)").unwrap());
        let pod = json!({"metadata": {"name": "p"}, "involvedObject": {"kind": "Pod"}});
        assert!(fields_match(&pod, "metadata.name=p").unwrap());
        assert!(!fields_match(&pod, "metadata.name=q").unwrap());
        assert!(fields_match(&pod, "involvedObject.kind=Pod,spec.nodeName=").unwrap());
    }

    #[test]
    fn queries_and_times() {
        let q = "labelSelector=app%3Dapi&watch=true&x";
        assert_eq!(query_param(q, "labelSelector").as_deref(), Some("app=api"));
        assert_eq!(query_param(q, "watch").as_deref(), Some("true"));
        assert_eq!(query_param(q, "x").as_deref(), Some(""));
        assert_eq!(query_param(q, "y"), None);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_767_323_045)),
            "2026-01-02T03:04:05Z"
        );
    }

    #[test]
    fn routes() {
        let Route::Resource(t) = route("/api/v1/namespaces/shop/pods/p/ephemeralcontainers") else {
            panic!("no route");
        };
        assert_eq!(
            (
                t.kind.resource,
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.sub.as_deref()
            ),
            ("pods", Some("shop"), Some("p"), Some("ephemeralcontainers"))
        );
        assert!(matches!(
            route("/apis/apps/v1/namespaces/shop/deployments"),
            Route::Resource(Target { name: None, .. })
        ));
        assert!(matches!(
            route("/api/v1/namespaces/shop"),
            Route::Resource(_)
        ));
        assert!(matches!(
            route("/apis/argoproj.io/v1alpha1"),
            Route::Missing
        ));
        assert!(matches!(
            route("/api/v1/namespaces/shop/pods/p/exec"),
            Route::Missing
        ));
    }
}
