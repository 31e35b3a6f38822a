//! An [`Exchange`]: one HTTP request that reached a session and the response it
//! got, as graft saw them, and [`Exchanges`], the broadcast publisher that hands
//! each one to whoever watches (a recorder, a diff, an inspector).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use graft_protocol::incoming::IncomingMode;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::http1::{Head, Message};

/// Where a request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// The local process answered (steal).
    Local,
    /// The target answered (mirror: the local process got a copy; or no
    /// filter took the request).
    Target,
    /// Another session's filter took the request (which one is not said).
    #[serde(rename = "another_session")]
    AnotherSession,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Route::Local => "local",
            Route::Target => "target",
            Route::AnotherSession => "another session",
        })
    }
}

/// A message body: its first bytes and its full length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    /// The first [`crate::http1::BODY_KEEP`] bytes (chunked bodies decoded; other
    /// content codings such as gzip left as sent).
    pub bytes: Vec<u8>,
    /// The full length, in bytes.
    pub len: u64,
    /// False when the connection ended before the body did.
    pub complete: bool,
}

impl Body {
    /// Whether only part of the body was kept.
    pub fn truncated(&self) -> bool {
        (self.bytes.len() as u64) < self.len
    }
}

/// A request as it arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The method.
    pub method: String,
    /// The request target (path and query) as sent.
    pub target: String,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: String,
    /// Fields in order, as sent.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Body,
}

/// A response as it left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: String,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: String,
    /// Fields in order, as sent.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Body,
}

/// Where an exchange happened: the same for every exchange of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The session's target, as the user wrote it (`pid:42`, `deploy/api`).
    pub target: String,
    /// The target's port.
    pub port: u16,
    /// Steal or mirror.
    pub mode: IncomingMode,
    /// The client's address, as the target saw it.
    pub client: Option<SocketAddr>,
    /// Who answered.
    pub route: Route,
    /// The filter that took the request, as text (`None`: the whole port).
    pub filter: Option<String>,
}

/// One request and its response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    /// Where it happened.
    pub origin: Arc<Origin>,
    /// When the request's first byte was read, in milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// The same in microseconds, to order exchanges that started within one
    /// millisecond (two sequential requests inside a cluster do).
    #[serde(default)]
    pub started_unix_us: u64,
    /// The request.
    pub request: Request,
    /// The response; `None` when the connection ended without one.
    pub response: Option<Response>,
    /// From the request's first byte to its last, as read by graft, in ms.
    pub send_ms: f64,
    /// From the request's last byte to the response's first, in ms.
    pub wait_ms: f64,
    /// From the response's first byte to its last, in ms.
    pub receive_ms: f64,
}

impl Exchange {
    /// Pairs a request with its response (or none).
    pub fn new(origin: Arc<Origin>, request: Message, response: Option<Message>) -> Exchange {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let (wait_ms, receive_ms) = match &response {
            Some(r) => (
                ms(r.started.saturating_duration_since(request.finished)),
                ms(r.finished.saturating_duration_since(r.started)),
            ),
            None => (0.0, 0.0),
        };
        Exchange {
            origin,
            started_unix_ms: request
                .started_wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            started_unix_us: request
                .started_wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0),
            send_ms: ms(request.finished.saturating_duration_since(request.started)),
            wait_ms,
            receive_ms,
            request: Request {
                method: request.head.method,
                target: request.head.target,
                version: request.head.version,
                headers: request.head.headers,
                body: Body {
                    bytes: request.body,
                    len: request.body_len,
                    complete: request.complete,
                },
            },
            response: response.map(|r| {
                let Head {
                    status,
                    reason,
                    version,
                    headers,
                    ..
                } = r.head;
                Response {
                    status,
                    reason,
                    version,
                    headers,
                    body: Body {
                        bytes: r.body,
                        len: r.body_len,
                        complete: r.complete,
                    },
                }
            }),
        }
    }

    /// The total time, request's first byte to response's last, in ms.
    pub fn latency_ms(&self) -> f64 {
        self.send_ms + self.wait_ms + self.receive_ms
    }

    /// The value of the request's first field named `name` (case-insensitive).
    pub fn request_header(&self, name: &str) -> Option<&str> {
        header(&self.request.headers, name)
    }
}

/// The value of the first field named `name` (case-insensitive) in `headers`.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// How many exchanges a slow watcher may lag behind before it misses some.
pub const WATCH_QUEUE: usize = 1024;

/// The publisher of a session's exchanges. Cloning shares it. Publishing never
/// waits: a watcher more than [`WATCH_QUEUE`] exchanges behind misses the oldest
/// (its receiver reports `Lagged`).
#[derive(Debug, Clone)]
pub struct Exchanges {
    tx: broadcast::Sender<Arc<Exchange>>,
}

impl Default for Exchanges {
    fn default() -> Self {
        Exchanges::new()
    }
}

impl Exchanges {
    /// A publisher nobody watches yet.
    pub fn new() -> Exchanges {
        Exchanges {
            tx: broadcast::channel(WATCH_QUEUE).0,
        }
    }

    /// Hands `exchange` to every current watcher.
    pub fn publish(&self, exchange: Exchange) {
        // No watcher is not an error: nobody is looking.
        let _ = self.tx.send(Arc::new(exchange));
    }

    /// A new watcher: it sees the exchanges published from now on.
    pub fn watch(&self) -> broadcast::Receiver<Arc<Exchange>> {
        self.tx.subscribe()
    }
}
