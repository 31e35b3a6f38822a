//! The fake API server's HTTP side: the accept loop, routing a path to a
//! resource ([`route`]), discovery documents, RBAC-style denials and the
//! `Status` error bodies an API server answers with. [`handle`] dispatches a
//! request to the verbs in `objects`, the port-forward or a pod's log.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::objects::{
    create, delete, get, list, patch_ephemeral, patch_object, pod_log, watch_objects,
};
use super::port_forward::port_forward;
use super::select::query_param;
use super::{Body, KINDS, Kind, POD_SUBRESOURCES, SeenRequest, Shared, USER};

pub(super) async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
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

pub(super) fn full(status: StatusCode, body: &Value) -> Response<Body> {
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

pub(super) fn ok(body: &Value) -> Response<Body> {
    full(StatusCode::OK, body)
}

/// A `Status` failure.
pub(super) fn status(
    code: StatusCode,
    reason: &str,
    message: &str,
    details: Option<Value>,
) -> Response<Body> {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    full(code, &body)
}

pub(super) fn not_found(kind: &Kind, name: &str) -> Response<Body> {
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

pub(super) fn no_route() -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
        Some(json!({})),
    )
}

pub(super) fn bad_request(message: &str) -> Response<Body> {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

pub(super) fn invalid(kind: &Kind, name: &str, message: &str) -> Response<Body> {
    status(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        &format!("{} \"{name}\" is invalid: {message}", kind.kind),
        Some(json!({"name": name, "kind": kind.resource})),
    )
}

/// A chunked body fed by a channel: watches and followed logs.
pub(super) fn streaming(rx: mpsc::Receiver<Bytes>, content_type: &'static str) -> Response<Body> {
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
pub(super) struct Target {
    pub(super) kind: &'static Kind,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) sub: Option<String>,
}

pub(super) enum Route {
    Discovery(Value),
    Resource(Target),
    Missing,
}

pub(super) fn route(path: &str) -> Route {
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

pub(super) fn api_group(group: &str) -> Value {
    let gv = format!("{group}/v1");
    json!({
        "name": group,
        "versions": [{"groupVersion": gv, "version": "v1"}],
        "preferredVersion": {"groupVersion": gv, "version": "v1"},
    })
}

pub(super) fn resource_list(group: &str, version: &str) -> Value {
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
pub(super) fn verb(method: &Method, target: &Target, query: &str) -> &'static str {
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

pub(super) fn forbidden(target: &Target, verb: &str) -> Response<Body> {
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

pub(super) async fn handle(
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

#[cfg(test)]
mod tests {
    use super::*;

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
