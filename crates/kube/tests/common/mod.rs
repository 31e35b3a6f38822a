//! The fake API server of graft-kube's I/O tests: a tower service given to
//! `kube::Client::new` that answers each request with what a router returns,
//! and records the requests. No cluster is needed; what is checked is which
//! requests graft sends and how it reads the answers.
//!
//! Each test file compiles its own copy, and not every file reads every field.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::Value;

/// One request the fake server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The HTTP method.
    pub method: Method,
    /// The path.
    pub path: String,
    /// The query string, without `?`.
    pub query: String,
    /// The `content-type` header.
    pub content_type: String,
    /// The body as JSON (`Null` when it is not JSON).
    pub body: Value,
}

type Router = dyn Fn(&Seen) -> (u16, Value) + Send + Sync;

/// A client in namespace `shop` whose every request is answered by
/// `route(request)`: a status and a JSON body (a JSON string is sent as plain
/// text, e.g. a log).
pub fn fake_client(
    route: impl Fn(&Seen) -> (u16, Value) + Send + Sync + 'static,
) -> (Client, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let route: Arc<Router> = Arc::new(route);
    let log = seen.clone();
    let service = tower::service_fn(move |req: Request<Body>| {
        let route = route.clone();
        let log = log.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let request = Seen {
                method: parts.method.clone(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or("").to_owned(),
                content_type: parts
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            log.lock().unwrap().push(request.clone());
            let (status, body) = route(&request);
            let bytes = match body {
                Value::String(text) => text.into_bytes(),
                other => serde_json::to_vec(&other).unwrap(),
            };
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(bytes))
                    .unwrap(),
            )
        }
    });
    (Client::new(service, "shop"), seen)
}

/// A `Status` object as the API server sends with an error.
pub fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "code": code, "reason": reason, "message": message}),
    )
}
