//! The fake cluster's state: objects by resource, namespace and name, each
//! change recorded in a history that watches replay, and the bookkeeping a
//! kubelet does for the pods it runs (container states, events, pod phase,
//! the target's cgroup). Every change goes through [`Shared::commit`].

use std::path::{Path, PathBuf};
use std::sync::MutexGuard;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::select::{random_hex, rfc3339, uid};
use super::{
    CgroupMove, Change, DEPLOYMENT, NAMESPACE, NODE, REPLICASET, Shared, State, TARGET_CONTAINER,
    TargetPod, key,
};

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn cgroup(&self) -> MutexGuard<'_, Vec<CgroupMove>> {
        self.cgroup
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The Deployment's pod `name`, if it is one.
    pub(super) fn target_pod(&self, name: &str) -> Option<&TargetPod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// The Deployment's pod whose process an agent container of pod `pod`
    /// works on: `pod` itself for an ephemeral container, the pod whose
    /// container ID `args` name (`--target-container-id`, node mode), else
    /// (a targetless agent) the first pod, whose network the cluster shares.
    pub(super) fn pod_of_agent(&self, pod: &str, ephemeral: bool, args: &[String]) -> &TargetPod {
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
    pub(super) fn commit<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (result, rv) = {
            let mut state = self.lock();
            let result = f(&mut state);
            (result, state.rv)
        };
        self.changed.send_modify(|v| *v = v.wrapping_add(1).max(rv));
        result
    }

    pub(super) fn seed(&self) {
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
    pub(super) fn enter_cgroup(&self, pod: &TargetPod) {
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

    pub(super) fn leave_cgroups(&self) {
        let moves = std::mem::take(&mut *self.cgroup());
        for moved in moves {
            Self::leave_cgroup(&moved);
        }
    }

    pub(super) fn leave_cgroup(moved: &CgroupMove) {
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
    pub(super) fn put(&mut self, resource: &str, mut object: Value, kind: &'static str) -> Value {
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

    pub(super) fn remove(&mut self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
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

    pub(super) fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<&Value> {
        self.objects.get(&key(resource, namespace, name))
    }

    pub(super) fn denied(&self, verb: &str, resource: &str) -> bool {
        self.denials
            .iter()
            .any(|(v, r)| (v == verb || v == "*") && r == resource)
    }

    /// Records a kubelet event about `pod` (and its container `container`).
    pub(super) fn event(
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
    pub(super) fn set_container_state(
        &mut self,
        ctr: &Ctr<'_>,
        container_id: Option<&str>,
        state: Value,
    ) {
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
pub(super) struct Ctr<'a> {
    pub(super) namespace: &'a str,
    pub(super) pod: &'a str,
    pub(super) name: &'a str,
    pub(super) ephemeral: bool,
    pub(super) image: &'a str,
}

/// The phase and conditions of a (node-mode) pod from its container states.
pub(super) fn update_pod_phase(pod: &mut Value) {
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
