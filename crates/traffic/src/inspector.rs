//! The traffic inspector: a live web page of every request that the sessions on
//! this machine handle (`graft run … --ui`, `graft ui`).
//!
//! ```text
//! graft run (each session)                      graft ui / graft run --ui
//!  proxy tap ─► tap::read_chunks ─► Exchange ─► feed::Feed ══ events.sock ══►
//!      (0700 session dir, same uid only)            feed::watch ─► hub::Hub ─► server (SSE) ─► page
//! ```
//!
//! - [`Event`]: what travels, one JSON object per line on a session's event
//!   socket and one server-sent event per object to the page.
//! - [`feed`]: a session's side (the Unix socket it publishes on) and a watcher's
//!   (reading one).
//! - [`hub`]: the events of every watched session, with a short backlog for a
//!   page opened late.
//! - [`server`]: the HTTP server on 127.0.0.1 (hyper) that serves the page, its
//!   assets (embedded in the binary) and the event stream, behind a random token.
//!
//! Everything in an event comes from the network and is rendered by the page as
//! text only (never as HTML); see `docs/security.md`.

pub mod feed;
pub mod hub;
pub mod server;

use std::net::SocketAddr;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use graft_protocol::incoming::{IncomingMode, RoutedRequest, RoutedTo};

use crate::exchange::{Body, Exchange, Route};

/// A session on this machine, as its feed describes itself to each watcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The session's id: the name of its session directory.
    pub session: String,
    /// The target, as the user wrote it (`pid:42`, `deploy/api`).
    pub target: String,
    /// CMD, its words joined by spaces.
    pub command: String,
    /// The graft process that runs the session.
    pub pid: u32,
    /// When the session started, in milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// `steal` or `mirror`.
    pub mode: String,
    /// The session's HTTP filter, as text (`None`: whole ports).
    pub filter: Option<String>,
}

/// A body as the page shows it: its first bytes (at most
/// [`crate::http1::BODY_KEEP`], 64 KiB) as text when they are UTF-8, else base64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BodyView {
    /// The kept bytes, when they are UTF-8.
    pub text: Option<String>,
    /// The kept bytes in base64 (RFC 4648 §4), when they are not UTF-8.
    pub base64: Option<String>,
    /// The full length, in bytes.
    pub len: u64,
    /// Whether only the first bytes were kept.
    pub truncated: bool,
    /// False when the connection ended before the body did.
    pub complete: bool,
}

impl From<&Body> for BodyView {
    fn from(body: &Body) -> BodyView {
        let (text, base64) = match std::str::from_utf8(&body.bytes) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&body.bytes)),
            ),
        };
        BodyView {
            text,
            base64,
            len: body.len,
            truncated: body.truncated(),
            complete: body.complete,
        }
    }
}

/// A response as the page shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseView {
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: String,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: String,
    /// Fields in order, as sent.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: BodyView,
}

/// One request of a session and its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeEvent {
    /// The session's id ([`SessionInfo::session`]).
    pub session: String,
    /// Numbers the session's exchanges from 1, in the order they completed.
    pub id: u64,
    /// When the request's first byte passed, in milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// The target's port.
    pub port: u16,
    /// `steal` or `mirror`.
    pub mode: String,
    /// Who answered the client: the local process or the target.
    pub route: Route,
    /// The filter that took the request to the local process, as text (`None`:
    /// the whole port).
    pub filter: Option<String>,
    /// The client's address, as the target saw it.
    pub client: Option<SocketAddr>,
    /// A remark on what is shown (a mirror shows the local process's answer,
    /// which graft dropped).
    pub note: Option<String>,
    /// The method.
    pub method: String,
    /// The request target (path and query) as sent.
    pub target: String,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: String,
    /// The request's fields in order, as sent.
    pub request_headers: Vec<(String, String)>,
    /// The request's body.
    pub request_body: BodyView,
    /// The answer; `None` when the connection ended without one.
    pub response: Option<ResponseView>,
    /// From the request's first byte to the response's last, in milliseconds.
    pub latency_ms: f64,
}

impl ExchangeEvent {
    /// The event of `exchange`, number `id` of session `session`.
    pub fn new(session: &str, id: u64, exchange: &Exchange, note: Option<String>) -> ExchangeEvent {
        let origin = &exchange.origin;
        let request = &exchange.request;
        ExchangeEvent {
            session: session.to_owned(),
            id,
            started_unix_ms: exchange.started_unix_ms,
            port: origin.port,
            mode: origin.mode.to_string(),
            route: origin.route,
            filter: origin.filter.clone(),
            client: origin.client,
            note,
            method: request.method.clone(),
            target: request.target.clone(),
            version: request.version.clone(),
            request_headers: request.headers.clone(),
            request_body: BodyView::from(&request.body),
            response: exchange.response.as_ref().map(|r| ResponseView {
                status: r.status,
                reason: r.reason.clone(),
                version: r.version.clone(),
                headers: r.headers.clone(),
                body: BodyView::from(&r.body),
            }),
            latency_ms: exchange.latency_ms(),
        }
    }
}

impl ExchangeEvent {
    /// The event of the agent's routing record `record` (a request of a port of
    /// session `session`, in `mode`, that went elsewhere), number `id`: heads
    /// sizes and first body bytes when the target answered, nothing of the request when another
    /// session took it.
    pub fn routed(
        session: &str,
        id: u64,
        mode: IncomingMode,
        record: &RoutedRequest,
    ) -> ExchangeEvent {
        let not_kept = |len: u64| BodyView {
            text: None,
            base64: None,
            len,
            truncated: len > 0,
            complete: true,
        };
        let kept = |first: &[u8], len: u64| {
            BodyView::from(&Body {
                bytes: first.to_vec(),
                len,
                complete: true,
            })
        };
        let mut event = ExchangeEvent {
            session: session.to_owned(),
            id,
            started_unix_ms: record.started_unix_ms,
            port: record.port,
            mode: mode.to_string(),
            route: match record.to {
                RoutedTo::Target => Route::Target,
                RoutedTo::AnotherSession => Route::AnotherSession,
            },
            filter: None,
            client: None,
            note: None,
            method: String::new(),
            target: String::new(),
            version: String::new(),
            request_headers: Vec::new(),
            request_body: not_kept(0),
            response: None,
            latency_ms: 0.0,
        };
        match &record.detail {
            None => {
                event.note = Some(
                    "another session's filter took this request; what it carried is that \
                     session's and is not shown"
                        .to_owned(),
                );
            }
            Some(detail) => {
                event.note = Some(format!(
                    "no filter of this session matched: the target answered{}",
                    detail
                        .error
                        .as_ref()
                        .map(|e| format!(" (or failed to: {e})"))
                        .unwrap_or_default()
                ));
                event.client = Some(detail.peer);
                event.method.clone_from(&detail.method);
                event.target.clone_from(&detail.target);
                event.version.clone_from(&detail.version);
                event.request_headers.clone_from(&detail.request_headers);
                event.request_body = kept(&detail.request_body, detail.request_body_len);
                event.response = Some(ResponseView {
                    status: detail.status,
                    reason: http::StatusCode::from_u16(detail.status)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("")
                        .to_owned(),
                    version: detail.version.clone(),
                    headers: detail.response_headers.clone(),
                    body: kept(&detail.response_body, detail.response_body_len),
                });
                event.latency_ms = detail.latency_us as f64 / 1000.0;
            }
        }
        event
    }
}

/// What the inspector shows, one JSON object each, told apart by `kind`.
///
/// New kinds may be added at the end; a watcher skips a kind it does not know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A session: the first event of every feed.
    Session(SessionInfo),
    /// A request and its answer.
    Exchange(Box<ExchangeEvent>),
    /// A difference between the local process's answer and the target's (the
    /// shadow diff of `graft run --mirror --diff`), as the diff describes it.
    Difference {
        /// The session's id.
        session: String,
        /// The difference, as JSON (shown as it is).
        difference: serde_json::Value,
    },
    /// A session ended (or its feed can no longer be read).
    Ended {
        /// The session's id.
        session: String,
    },
}

impl Event {
    /// The session the event belongs to.
    pub fn session(&self) -> &str {
        match self {
            Event::Session(info) => &info.session,
            Event::Exchange(exchange) => &exchange.session,
            Event::Difference { session, .. } | Event::Ended { session } => session,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::exchange::{Origin, Request};

    #[test]
    fn routing_records_show_heads_and_sizes_or_nothing_of_another_session() {
        use graft_protocol::incoming::RoutedDetail;
        let detail = RoutedDetail {
            peer: "192.0.2.1:5000".parse().unwrap(),
            method: "GET".into(),
            target: "/x?y=1".into(),
            version: "HTTP/1.1".into(),
            request_headers: vec![("x-user".into(), "carol".into())],
            request_body_len: 3,
            request_body: b"a=1".to_vec(),
            status: 404,
            response_headers: vec![("content-length".into(), "9".into())],
            response_body_len: 9,
            response_body: vec![0xff; 9],
            latency_us: 1500,
            error: None,
        };
        let record = RoutedRequest {
            port: 80,
            to: RoutedTo::Target,
            started_unix_ms: 7,
            detail: Some(detail),
        };
        let json =
            serde_json::to_value(ExchangeEvent::routed("s", 1, IncomingMode::Steal, &record))
                .unwrap();
        assert_eq!(json["route"], "target");
        assert_eq!(json["target"], "/x?y=1");
        assert_eq!(json["response"]["status"], 404);
        assert_eq!(json["response"]["reason"], "Not Found");
        assert_eq!(json["response"]["body"]["len"], 9);
        assert_eq!(json["response"]["body"]["base64"], "////////////");
        assert_eq!(json["request_body"]["text"], "a=1");
        assert_eq!(json["latency_ms"], 1.5);
        let other = RoutedRequest {
            to: RoutedTo::AnotherSession,
            detail: None,
            ..record
        };
        let json = serde_json::to_value(ExchangeEvent::routed("s", 2, IncomingMode::Steal, &other))
            .unwrap();
        assert_eq!(json["route"], "another_session");
        assert_eq!(json["method"], "");
        assert_eq!(json["request_headers"], serde_json::json!([]));
        assert_eq!(json["response"], serde_json::Value::Null);
    }

    #[test]
    fn events_are_tagged_json_and_bodies_keep_their_bytes() {
        let exchange = Exchange {
            origin: Arc::new(Origin {
                target: "pid:1".into(),
                port: 80,
                mode: IncomingMode::Steal,
                client: None,
                route: Route::Local,
                filter: Some("path~\"^/api\"".into()),
            }),
            started_unix_ms: 5,
            started_unix_us: 0,
            request: Request {
                method: "POST".into(),
                target: "/api/<script>".into(),
                version: "HTTP/1.1".into(),
                headers: vec![("X-Test".into(), "1".into())],
                body: Body {
                    bytes: vec![0xff, 0x00],
                    len: 100_000,
                    complete: true,
                },
            },
            response: None,
            send_ms: 1.0,
            wait_ms: 2.0,
            receive_ms: 3.0,
        };
        let event = Event::Exchange(Box::new(ExchangeEvent::new("s1", 7, &exchange, None)));
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["kind"], "exchange");
        assert_eq!(json["mode"], "steal");
        assert_eq!(json["route"], "local");
        assert_eq!(json["request_body"]["base64"], "/wA=");
        assert_eq!(json["request_body"]["truncated"], true);
        assert_eq!(json["latency_ms"], 6.0);
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
        let difference = Event::Difference {
            session: "s1".into(),
            difference: serde_json::json!(["status", 200, 500]),
        };
        let text = serde_json::to_string(&difference).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), difference);
        assert_eq!(difference.session(), "s1");
    }
}
