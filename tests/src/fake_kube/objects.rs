//! The API verbs on objects: get, list (with label and field selectors),
//! watch (from the history, so a watch from a list's resourceVersion misses
//! nothing), create (admitting and starting pods), delete (with SIGTERM to a
//! pod's processes), JSON merge patch, the `ephemeralcontainers` subresource
//! and a container's log.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Response, StatusCode};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::kubelet::run_container;
use super::select::{fields_match, labels_match, query_param, random_hex, rfc3339, uid};
use super::server::{Target, bad_request, full, invalid, not_found, ok, status, streaming};
use super::{Body, NODE, Shared, TARGET_CONTAINER, jobs, key};

pub(super) fn get(shared: &Shared, target: &Target) -> Response<Body> {
    let name = target.name.as_deref().unwrap_or("");
    let ns = target.namespace.as_deref().unwrap_or("");
    match shared.lock().get(target.kind.resource, ns, name) {
        Some(object) => ok(object),
        None => not_found(target.kind, name),
    }
}

/// Whether `object` matches the request's label and field selectors.
pub(super) fn selected(object: &Value, query: &str) -> Result<bool, String> {
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

pub(super) fn list(shared: &Shared, target: &Target, query: &str) -> Response<Body> {
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

pub(super) fn watch_objects(shared: &Arc<Shared>, target: &Target, query: &str) -> Response<Body> {
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

pub(super) fn new_metadata(object: &mut Value, namespace: Option<&str>) {
    let now = rfc3339(SystemTime::now());
    let meta = &mut object["metadata"];
    meta["uid"] = json!(uid());
    meta["creationTimestamp"] = json!(now);
    if let Some(ns) = namespace {
        meta["namespace"] = json!(ns);
    }
}

pub(super) fn create(shared: &Arc<Shared>, target: &Target, body: &[u8]) -> Response<Body> {
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
pub(super) fn admit_pod(object: &mut Value) -> Result<(), &'static str> {
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
pub(super) fn start_pod(shared: &Arc<Shared>, pod: &Value) {
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

pub(super) fn delete(
    shared: &Arc<Shared>,
    target: &Target,
    query: &str,
    body: &[u8],
) -> Response<Body> {
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
pub(super) fn delete_object(
    shared: &Arc<Shared>,
    resource: &str,
    ns: &str,
    name: &str,
) -> Option<Value> {
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
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
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

pub(super) fn patch_object(
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
pub(super) fn patch_ephemeral(
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

pub(super) fn pod_log(shared: &Arc<Shared>, target: &Target, query: &str) -> Response<Body> {
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
