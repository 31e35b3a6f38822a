//! The harness of the live Kubernetes suite (`tests/tests/e2e_*.rs`): graft against
//! a real cluster, run only when `GRAFT_E2E_KUBECONFIG` names a kubeconfig.
//! Without it every live test prints `skipped: …` and returns (a skip, not a
//! pass); the fake cluster of `tests/kube.rs` covers the same paths on every run.
//!
//! Variables (`.ci/run` sets them against `../shared/lab`; README, "Live
//! Kubernetes suite", says how to point them at kind, minikube or k3s):
//! - `GRAFT_E2E_KUBECONFIG`: the cluster;
//! - `GRAFT_E2E_AGENT_IMAGE`: an agent image the cluster's nodes have (the
//!   archive of `graft agent-image`, loaded with `ctr images import`,
//!   `kind load image-archive`, …); used with pull policy `IfNotPresent`;
//! - `GRAFT_E2E_APP_IMAGE`: an image with `python3` (e.g. `python:3.12-slim`):
//!   every sample workload runs `tests/fixtures/named_http.py` in it, mounted
//!   from a ConfigMap;
//! - `GRAFT_E2E_HOST_PYTHON=1` (optional): the cluster's node is this machine
//!   and the app image's python3 is this machine's `/usr/bin/python3` (true of
//!   the lab cluster, whose `lab.local/python:3` is built from it): the sample
//!   servers then get this machine's Python modules (`h2`, `grpc`, `websockets`)
//!   through hostPath mounts, for the h2c, gRPC and WebSocket tests, which are
//!   skipped without it;
//! - `GRAFT_E2E_NS_PREFIX` (optional, default `e2e`): the prefix of the
//!   namespaces the tests create, so runs sharing a cluster stay apart.
//!
//! The tests connect to pod addresses from this machine (the lab cluster and k3s
//! on the same machine route them; for kind, route the pod range through the
//! node container). Each test works in a namespace of its own, `e2e-NAME-PID`
//! (Pod Security `privileged`), deleted when its [`Ns`] is dropped, also when
//! the test panics, so the tests run in parallel.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};

use crate::{Proc, fixture, graft_bin, package_dir, python, wait_until};

/// The port every sample server listens on, in the pod and locally.
pub const APP_PORT: u16 = 8080;

/// How long a sample workload may take to have its pods ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// How long `graft run` may take from its start until the port is stolen (the
/// agent image is on the node; generous for a loaded 2-core machine).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(60);

/// The label graft puts on its node-mode agent pods (crates/kube/src/manifest.rs).
pub const AGENT_POD_SELECTOR: &str = "app.kubernetes.io/managed-by=graft";

/// The fixtures the sample servers run, mounted at `/fixtures` in their pods.
const POD_FIXTURES: [&str; 3] = ["named_http.py", "grpc_app.py", "ws_app.py"];

/// The live cluster and the settings of the suite.
pub struct Live {
    /// Path of the kubeconfig (`GRAFT_E2E_KUBECONFIG`).
    pub kubeconfig: String,
    /// The agent image (`GRAFT_E2E_AGENT_IMAGE`).
    pub agent_image: String,
    /// The image of the sample servers (`GRAFT_E2E_APP_IMAGE`).
    pub app_image: String,
    /// Whether pods may use this machine's Python modules (`GRAFT_E2E_HOST_PYTHON`).
    pub host_python: bool,
    /// A client of the cluster.
    pub client: Client,
    runtime: tokio::runtime::Runtime,
}

impl Live {
    /// The live cluster, or `None` after printing `skipped: …` when
    /// `GRAFT_E2E_KUBECONFIG` is not set.
    ///
    /// # Panics
    ///
    /// When the kubeconfig is set but the other variables are missing, or the
    /// kubeconfig does not load.
    pub fn get() -> Option<Live> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let Some(kubeconfig) = var("GRAFT_E2E_KUBECONFIG") else {
            println!("skipped: GRAFT_E2E_KUBECONFIG not set (no live cluster to test against)");
            return None;
        };
        let (Some(agent_image), Some(app_image)) =
            (var("GRAFT_E2E_AGENT_IMAGE"), var("GRAFT_E2E_APP_IMAGE"))
        else {
            panic!(
                "GRAFT_E2E_KUBECONFIG is set: set GRAFT_E2E_AGENT_IMAGE and GRAFT_E2E_APP_IMAGE \
                 too (see the README, \"Live Kubernetes suite\")"
            );
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let client = runtime.block_on(async {
            let config = Kubeconfig::read_from(&kubeconfig)
                .unwrap_or_else(|e| panic!("GRAFT_E2E_KUBECONFIG={kubeconfig}: {e}"));
            let config = Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
                .await
                .unwrap_or_else(|e| panic!("GRAFT_E2E_KUBECONFIG={kubeconfig}: {e}"));
            Client::try_from(config).expect("a client of the live cluster")
        });
        Some(Live {
            kubeconfig,
            agent_image,
            app_image,
            host_python: var("GRAFT_E2E_HOST_PYTHON").is_some_and(|v| v == "1"),
            client,
            runtime,
        })
    }

    /// Runs `future` on the suite's runtime.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Creates the namespace `e2e-SHORT-PID` (Pod Security `privileged`) with the
    /// ConfigMap `fixtures` the sample pods mount.
    ///
    /// # Panics
    ///
    /// When the API server refuses.
    pub fn namespace(&self, short: &str) -> Ns<'_> {
        self.namespace_with(short, "privileged")
    }

    /// [`Live::namespace`] with Pod Security level `level` enforced.
    ///
    /// # Panics
    ///
    /// When the API server refuses.
    pub fn namespace_with(&self, short: &str, level: &str) -> Ns<'_> {
        // `GRAFT_E2E_NS_PREFIX` (default `e2e`) keeps parallel runs on one
        // cluster apart.
        let prefix = std::env::var("GRAFT_E2E_NS_PREFIX")
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "e2e".to_owned());
        let name = format!("{prefix}-{short}-{:x}", std::process::id());
        let ns = Ns {
            live: self,
            name: name.clone(),
        };
        ns.apply(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {
                "pod-security.kubernetes.io/enforce": level,
                "graft-e2e": "true",
            }},
        }));
        let data: serde_json::Map<String, Value> = POD_FIXTURES
            .iter()
            .map(|file| {
                let text = std::fs::read_to_string(fixture(file))
                    .unwrap_or_else(|e| panic!("fixtures/{file}: {e}"));
                ((*file).to_owned(), Value::String(text))
            })
            .collect();
        ns.apply(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "fixtures"}, "data": data,
        }));
        ns
    }

    /// Applies `object` (cluster-scoped, or namespaced with its namespace set)
    /// with server-side apply.
    ///
    /// # Panics
    ///
    /// When its kind is unknown to the cluster or the API server refuses.
    pub fn apply(&self, object: Value) {
        self.block_on(apply(&self.client, None, object));
    }

    /// Whether the cluster-scoped object `kind/name` of `api_version` exists.
    pub fn has_cluster_object(&self, api_version: &str, kind: &str, name: &str) -> bool {
        self.block_on(async {
            match dynamic_api(&self.client, None, api_version, kind).await {
                Ok(api) => api.get_opt(name).await.ok().flatten().is_some(),
                Err(_) => false,
            }
        })
    }

    /// Deletes the cluster-scoped object `kind/name` of `api_version` (no error
    /// when it is gone).
    pub fn delete_cluster_object(&self, api_version: &str, kind: &str, name: &str) {
        self.block_on(async {
            if let Ok(api) = dynamic_api(&self.client, None, api_version, kind).await {
                let _ = api.delete(name, &DeleteParams::default()).await;
            }
        });
    }
}

/// Writes to `path` a kubeconfig for the cluster of `live` that authenticates
/// as the ServiceAccount `account` of `namespace` (a bound token from the
/// TokenRequest API, valid for an hour), with `namespace` as its default.
///
/// # Panics
///
/// When the token cannot be had or the file not written.
pub fn service_account_kubeconfig(live: &Live, namespace: &str, account: &str, path: &Path) {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    let accounts: Api<ServiceAccount> = Api::namespaced(live.client.clone(), namespace);
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [], "expirationSeconds": 3600},
    }))
    .expect("a valid TokenRequest");
    let token = live
        .block_on(accounts.create_token_request(account, &Default::default(), &request))
        .unwrap_or_else(|e| panic!("a token for {namespace}/{account}: {e}"))
        .status
        .expect("the TokenRequest has a status")
        .token;
    let admin = Kubeconfig::read_from(&live.kubeconfig).expect("the kubeconfig loads");
    let context = admin
        .contexts
        .iter()
        .find(|c| Some(&c.name) == admin.current_context.as_ref())
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone());
    let cluster = admin
        .clusters
        .iter()
        .find(|c| Some(&c.name) == context.as_ref())
        .or(admin.clusters.first())
        .expect("the kubeconfig names a cluster");
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [serde_json::to_value(cluster).expect("a cluster serializes")],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {
            "cluster": cluster.name, "user": account, "namespace": namespace,
        }}],
        "current-context": account,
    });
    std::fs::write(path, serde_json::to_vec_pretty(&config).expect("JSON"))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A cluster-scoped object a test created, deleted on drop (also when the test
/// panics).
pub struct ClusterObject<'a> {
    live: &'a Live,
    api_version: String,
    kind: String,
    name: String,
}

impl<'a> ClusterObject<'a> {
    /// Applies `object` (cluster-scoped) and returns its guard.
    ///
    /// # Panics
    ///
    /// When the API server refuses.
    pub fn apply(live: &'a Live, object: Value) -> ClusterObject<'a> {
        let text = |key: &str| object[key].as_str().unwrap_or_default().to_owned();
        let guard = ClusterObject {
            live,
            api_version: text("apiVersion"),
            kind: text("kind"),
            name: object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        };
        live.apply(object);
        guard
    }
}

impl Drop for ClusterObject<'_> {
    fn drop(&mut self) {
        self.live
            .delete_cluster_object(&self.api_version, &self.kind, &self.name);
    }
}

/// A namespace of one test, deleted on drop.
pub struct Ns<'a> {
    /// The cluster.
    pub live: &'a Live,
    /// The namespace's name.
    pub name: String,
}

impl Ns<'_> {
    /// Applies `object` in this namespace (server-side apply).
    ///
    /// # Panics
    ///
    /// When its kind is unknown to the cluster or the API server refuses.
    pub fn apply(&self, object: Value) {
        self.live
            .block_on(apply(&self.live.client, Some(&self.name), object));
    }

    /// The object `kind/name` of `api_version` in this namespace, as JSON.
    ///
    /// # Panics
    ///
    /// When it cannot be read.
    pub fn get(&self, api_version: &str, kind: &str, name: &str) -> Value {
        self.live.block_on(async {
            let api = dynamic_api(&self.live.client, Some(&self.name), api_version, kind)
                .await
                .unwrap_or_else(|e| panic!("{kind} is not served by the cluster: {e}"));
            let object = api
                .get(name)
                .await
                .unwrap_or_else(|e| panic!("reading {kind}/{name} in {}: {e}", self.name));
            serde_json::to_value(object).expect("an object serializes")
        })
    }

    /// The namespace's pods.
    pub fn pods_api(&self) -> Api<Pod> {
        Api::namespaced(self.live.client.clone(), &self.name)
    }

    /// The pods matching `selector` that are Ready and not being deleted.
    pub fn ready_pods(&self, selector: &str) -> Vec<Pod> {
        let list = self
            .live
            .block_on(
                self.pods_api()
                    .list(&ListParams::default().labels(selector)),
            )
            .unwrap_or_else(|e| panic!("listing pods {selector} in {}: {e}", self.name));
        list.items.into_iter().filter(is_ready).collect()
    }

    /// Waits until `count` pods matching `selector` are Ready; returns them.
    ///
    /// # Panics
    ///
    /// After [`READY_TIMEOUT`], with the pods' phases.
    pub fn wait_ready(&self, selector: &str, count: usize) -> Vec<Pod> {
        wait_until(READY_TIMEOUT, Duration::from_millis(500), || {
            let pods = self.ready_pods(selector);
            (pods.len() >= count).then_some(pods)
        })
        .unwrap_or_else(|| {
            let all = self
                .live
                .block_on(self.pods_api().list(&ListParams::default()))
                .map(|l| {
                    l.items
                        .iter()
                        .map(|p| format!("{} {:?}", name_of(p), p.status))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            panic!(
                "{count} pods {selector} in {} not ready within {READY_TIMEOUT:?}: {all:#?}",
                self.name
            )
        })
    }

    /// The address of the sample server of the one ready pod matching `selector`.
    pub fn app_addr(&self, selector: &str) -> SocketAddr {
        let pods = self.wait_ready(selector, 1);
        addr_of(&pods[0])
    }

    /// [`Ns::agent_pods`] once it reaches 0, or its count after 30 s: graft
    /// deletes an agent Job with background propagation, so its pod goes a
    /// moment later (the garbage collector's work).
    pub fn agent_pods_after_cleanup(&self) -> usize {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let n = self.agent_pods();
            if n == 0 || std::time::Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// How many of graft's node-mode agent pods exist and are not being deleted.
    pub fn agent_pods(&self) -> usize {
        self.live
            .block_on(
                self.pods_api()
                    .list(&ListParams::default().labels(AGENT_POD_SELECTOR)),
            )
            .map(|l| {
                l.items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .count()
            })
            .unwrap_or(0)
    }

    /// `graft SUBCOMMAND --kubeconfig … -n NS` (plus `--agent-image` for the
    /// subcommands that take it), in the package directory.
    pub fn graft(&self, subcommand: &str) -> Command {
        self.graft_as(subcommand, &self.live.kubeconfig)
    }

    /// [`Ns::graft`] with another kubeconfig.
    pub fn graft_as(&self, subcommand: &str, kubeconfig: &str) -> Command {
        let mut command = Command::new(graft_bin());
        command.current_dir(package_dir()).args([
            subcommand,
            "--kubeconfig",
            kubeconfig,
            "-n",
            &self.name,
        ]);
        if matches!(subcommand, "run" | "ls" | "doctor" | "mount" | "record") {
            command.args(["--agent-image", &self.live.agent_image]);
        }
        if matches!(subcommand, "run" | "ls" | "mount" | "record") {
            command.args(["--agent-pull-policy", "IfNotPresent"]);
        }
        command
    }

    /// Starts `graft run --target TARGET FLAGS -- CMD`.
    pub fn run(&self, target: &str, flags: &[&str], cmd: &[String]) -> Proc {
        let mut command = self.graft("run");
        command.args(["--target", target]).args(flags).arg("--");
        command.args(cmd);
        Proc::spawn(command, &format!("graft run --target {target} {flags:?}"))
    }

    /// Creates (server-side apply) the `kind` workload `name` whose pods run the
    /// sample server ([`app_pod`]), `replicas` of them where the kind has
    /// replicas, and waits until `ready` of them are Ready.
    pub fn workload(&self, kind: &str, name: &str, replicas: u32, ready: usize) {
        let port = APP_PORT.to_string();
        let server = ["python3", "-u", "/fixtures/named_http.py", name, &port];
        self.workload_serving(kind, name, replicas, ready, &server);
    }

    /// [`Ns::workload`] whose container `app` runs `server` (which must listen
    /// on [`APP_PORT`]) instead of the sample HTTP server.
    pub fn workload_serving(
        &self,
        kind: &str,
        name: &str,
        replicas: u32,
        ready: usize,
        server: &[&str],
    ) {
        let labels = json!({"app": name});
        let pod = app_pod_serving(self.live, server);
        let template = json!({"metadata": {"labels": labels}, "spec": pod});
        let selector = json!({"matchLabels": labels});
        let (api_version, spec) = match kind {
            "Pod" => ("v1", None),
            "Deployment" | "ReplicaSet" => (
                "apps/v1",
                Some(json!({"replicas": replicas, "selector": selector, "template": template})),
            ),
            "StatefulSet" => (
                "apps/v1",
                Some(
                    json!({"replicas": replicas, "selector": selector, "template": template,
                            "serviceName": name, "podManagementPolicy": "Parallel"}),
                ),
            ),
            "DaemonSet" => (
                "apps/v1",
                Some(json!({"selector": selector, "template": template})),
            ),
            "Job" => (
                "batch/v1",
                Some(
                    json!({"parallelism": replicas, "completions": replicas, "backoffLimit": 0,
                            "template": restart_never(template)}),
                ),
            ),
            other => panic!("no sample workload of kind {other}"),
        };
        let object = match spec {
            None => json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "labels": labels}, "spec": pod}),
            Some(spec) => json!({"apiVersion": api_version, "kind": kind,
                "metadata": {"name": name, "labels": labels}, "spec": spec}),
        };
        self.apply(object);
        self.wait_ready(&format!("app={name}"), ready);
    }
}

impl Drop for Ns<'_> {
    fn drop(&mut self) {
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.live.client.clone());
        let _ = self
            .live
            .block_on(api.delete(&self.name, &DeleteParams::background()));
    }
}

/// The spec of a sample pod `name`: container `app` runs
/// `named_http.py NAME 8080` (readiness: TCP 8080, environment `WHO=app`),
/// container `side` sleeps (environment `WHO=side`), so a test can see which
/// container `/container/NAME` picked.
pub fn app_pod(live: &Live, name: &str) -> Value {
    let port = APP_PORT.to_string();
    app_pod_serving(
        live,
        &["python3", "-u", "/fixtures/named_http.py", name, &port],
    )
}

/// [`app_pod`] whose container `app` runs `server`.
pub fn app_pod_serving(live: &Live, server: &[&str]) -> Value {
    let mut mounts = vec![json!({"name": "fixtures", "mountPath": "/fixtures"})];
    let mut volumes = vec![json!({"name": "fixtures", "configMap": {"name": "fixtures"}})];
    if live.host_python {
        for (volume, path) in [
            ("dist", "/usr/lib/python3/dist-packages"),
            ("libs", "/usr/lib/x86_64-linux-gnu"),
        ] {
            mounts.push(json!({"name": volume, "mountPath": path, "readOnly": true}));
            volumes.push(json!({"name": volume, "hostPath": {"path": path}}));
        }
    }
    let container = |cname: &str, command: Vec<&str>| {
        json!({
            "name": cname, "image": live.app_image, "imagePullPolicy": "IfNotPresent",
            "command": command, "env": [{"name": "WHO", "value": cname}],
            "volumeMounts": mounts,
        })
    };
    let mut app = container("app", server.to_vec());
    app["ports"] = json!([{"containerPort": APP_PORT}]);
    // An exec probe: a probe over the network makes graft keep the node's own
    // connections (this machine's test clients) on the target, as it does for
    // the kubelet's probes (tests/tests/e2e_probes.rs covers those).
    app["readinessProbe"] = json!({"exec": {"command": [
        "python3", "-S", "-c",
        format!("import socket; socket.create_connection(('127.0.0.1', {APP_PORT}), 1)"),
    ]}, "periodSeconds": 1});
    let side = container(
        "side",
        vec!["python3", "-c", "import signal; signal.pause()"],
    );
    json!({
        "terminationGracePeriodSeconds": 1,
        "enableServiceLinks": false,
        "containers": [side, app],
        "volumes": volumes,
    })
}

fn restart_never(mut template: Value) -> Value {
    template["spec"]["restartPolicy"] = json!("Never");
    template
}

/// The command line of a local sample server: `named_http.py NAME 8080`, with a
/// python3 that can import `modules` (see [`py_with`]), after printing
/// `who=$WHO` (the target container's environment, taken by graft).
pub fn local_server(name: &str, modules: &str) -> Vec<String> {
    local_server_on(name, modules, APP_PORT)
}

/// [`local_server`] listening on `port`.
pub fn local_server_on(name: &str, modules: &str, port: u16) -> Vec<String> {
    let script = format!(
        "import os,sys,runpy; print('who=' + os.environ.get('WHO', '-'), flush=True); \
         sys.argv = ['named_http.py', '{name}', '{port}']; \
         runpy.run_path('{}', run_name='__main__')",
        fixture("named_http.py").display()
    );
    vec![py_with(modules), "-u".into(), "-c".into(), script]
}

/// A python3 that can import `modules` (comma-separated; empty for none): the
/// suite's interpreter when it can, else Debian's `/usr/bin/python3`.
///
/// # Panics
///
/// When neither can.
pub fn py_with(modules: &str) -> String {
    if modules.is_empty() {
        return python().to_owned();
    }
    for candidate in [python(), "/usr/bin/python3"] {
        let imports = Command::new(candidate)
            .args(["-c", &format!("import {modules}")])
            .output()
            .is_ok_and(|out| out.status.success());
        if imports {
            return candidate.to_owned();
        }
    }
    panic!("no python3 can import {modules}: run scripts/install-deps");
}

/// Whether a pod is Ready and not being deleted.
pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A pod's name.
pub fn name_of(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// The address of a pod's sample server (pod IP, [`APP_PORT`]).
///
/// # Panics
///
/// When the pod has no IP yet.
pub fn addr_of(pod: &Pod) -> SocketAddr {
    let ip: IpAddr = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("pod {} has no IP", name_of(pod)));
    SocketAddr::new(ip, APP_PORT)
}

/// GETs `path` from a sample server at `addr` (HTTP/1.0, 5 s bound) and returns
/// the first word of the body, the name of the server that answered, or the
/// error.
pub fn served_by(addr: SocketAddr, path: &str) -> String {
    match crate::http_get(addr, path, Duration::from_secs(5)) {
        Ok(body) => body.split_whitespace().next().unwrap_or("").to_owned(),
        Err(e) => format!("error: {e}"),
    }
}

/// Waits until `addr` is answered by `name` (within `timeout`).
///
/// # Panics
///
/// When it is not, with the last answer and `graft`'s output when given.
pub fn wait_served_by(addr: SocketAddr, name: &str, timeout: Duration, graft: Option<&Proc>) {
    let mut last = String::new();
    let served = wait_until(timeout, Duration::from_millis(250), || {
        last = served_by(addr, "/");
        (last == name).then_some(())
    });
    if served.is_none() {
        panic!(
            "{addr} is not answered by {name} within {timeout:?} (last answer {last:?})\n{}",
            graft.map(Proc::output_report).unwrap_or_default()
        );
    }
}

/// Ends `graft` with SIGINT (what Ctrl-C sends to the terminal's process group)
/// and waits for it.
///
/// # Panics
///
/// When it does not end within 30 s.
pub fn interrupt(graft: Proc) -> crate::Outcome {
    graft.signal_group(nix::sys::signal::Signal::SIGINT);
    graft.finish(Duration::from_secs(30))
}

/// Waits until no graft agent pod is left in `ns` and `addr` is answered by
/// the pod's own server `name` again.
///
/// # Panics
///
/// After 60 s.
pub fn wait_restored(ns: &Ns<'_>, addr: SocketAddr, name: &str) {
    let mut state = (0, String::new());
    let restored = wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        state = (ns.agent_pods(), served_by(addr, "/"));
        (state.0 == 0 && state.1 == name).then_some(())
    });
    assert!(
        restored.is_some(),
        "after the session: {} agent pods left, {addr} answered by {:?} (want {name})",
        state.0,
        state.1
    );
}

/// Runs `program ARGS` to the end (bounded by 60 s) and returns its stdout.
///
/// # Panics
///
/// When it fails or does not end.
pub fn output(program: &str, args: &[&str]) -> String {
    let mut command = Command::new(program);
    command.args(args).current_dir(package_dir());
    let outcome =
        Proc::spawn(command, &format!("{program} {args:?}")).finish(Duration::from_secs(60));
    outcome.assert_success();
    outcome.out().to_owned()
}

/// The path of `deploy/rbac.yaml`.
pub fn rbac_yaml() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("rbac.yaml")
}

async fn dynamic_api(
    client: &Client,
    namespace: Option<&str>,
    api_version: &str,
    kind: &str,
) -> Result<Api<DynamicObject>, kube::Error> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, capabilities) = kube::discovery::pinned_kind(client, &gvk).await?;
    Ok(
        match (
            namespace,
            capabilities.scope == kube::discovery::Scope::Namespaced,
        ) {
            (Some(ns), true) => Api::namespaced_with(client.clone(), ns, &resource),
            _ => Api::all_with(client.clone(), &resource),
        },
    )
}

async fn apply(client: &Client, namespace: Option<&str>, object: Value) {
    let api_version = object["apiVersion"]
        .as_str()
        .expect("apiVersion")
        .to_owned();
    let kind = object["kind"].as_str().expect("kind").to_owned();
    let name = object["metadata"]["name"]
        .as_str()
        .expect("a name")
        .to_owned();
    let namespace = namespace
        .map(str::to_owned)
        .or_else(|| object["metadata"]["namespace"].as_str().map(str::to_owned));
    let api = dynamic_api(client, namespace.as_deref(), &api_version, &kind)
        .await
        .unwrap_or_else(|e| panic!("{kind} is not served by the cluster: {e}"));
    api.patch(
        &name,
        &PatchParams::apply("graft-e2e").force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {kind}/{name} in {namespace:?}: {e}"));
}
