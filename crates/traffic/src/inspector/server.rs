//! The inspector's HTTP server (hyper, HTTP/1.1) on 127.0.0.1 and a random
//! port: the page, its script and style (embedded in the binary, no CDN), and
//! the event stream as server-sent events (HTML Living Standard §9.2,
//! `text/event-stream`), each event one JSON object.
//!
//! Every URL starts with a random token (`http://127.0.0.1:PORT/TOKEN/`); what
//! the server refuses, and why:
//!
//! - a request whose `Host` is not `127.0.0.1:PORT` or `localhost:PORT`: 403
//!   (DNS rebinding: a foreign site whose name resolves to 127.0.0.1 sends its
//!   own name as `Host`);
//! - a request with an `Origin` other than the page's own: 403 (another site's
//!   script);
//! - a path without the token (compared in constant time): 404;
//! - any method but `GET` and `HEAD`: 405.
//!
//! Every answer forbids inline scripts and foreign sources
//! (`Content-Security-Policy`), framing, MIME sniffing, caching and referrers.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};

use super::hub::Hub;

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const APP_CSS: &str = include_str!("page/app.css");

/// How often an idle event stream carries a comment, so proxies and the browser
/// keep it open.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// How long a client may take to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The Content-Security-Policy of every answer: only the page's own script,
/// style and event stream; nothing inline, nothing foreign, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                       connect-src 'self'; img-src 'self'; base-uri 'none'; \
                       form-action 'none'; frame-ancestors 'none'";

type Body = BoxBody<Bytes, Infallible>;

/// A running inspector server; stops when dropped.
#[derive(Debug)]
pub struct Inspector {
    addr: SocketAddr,
    token: String,
    task: JoinHandle<()>,
}

impl Drop for Inspector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Inspector {
    /// Binds 127.0.0.1 on a port the kernel picks and serves `hub`'s events to
    /// pages that know `token` (hex, from a random source).
    ///
    /// # Errors
    ///
    /// When the listener cannot be bound.
    pub async fn serve(hub: Arc<Hub>, token: String) -> std::io::Result<Inspector> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Served {
            hub,
            token: token.clone(),
            port: addr.port(),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(shared.answer(request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        // A client that never finishes its head does not hold a task.
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEAD_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Inspector { addr, token, task })
    }

    /// The address the server listens on (always 127.0.0.1).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's URL, token included: `http://127.0.0.1:PORT/TOKEN/`.
    pub fn url(&self) -> String {
        format!("http://{}/{}/", self.addr, self.token)
    }
}

/// What a request asks for, once it passed the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// `/TOKEN`: sent on to `/TOKEN/`.
    Slash,
    /// `/TOKEN/`: the page.
    Page,
    /// `/TOKEN/app.js`.
    Script,
    /// `/TOKEN/app.css`.
    Style,
    /// `/TOKEN/events`: the event stream.
    Events,
}

/// Decides what a request may have: the checks of this module's doc, in order
/// (host, origin, token, method).
///
/// # Errors
///
/// The status to answer with: 403, 404 or 405.
pub fn check(
    method: &Method,
    path: &str,
    host: Option<&str>,
    origin: Option<&str>,
    token: &str,
    port: u16,
) -> Result<Asked, StatusCode> {
    let ours = |authority: &str| {
        authority == format!("127.0.0.1:{port}") || authority == format!("localhost:{port}")
    };
    if !host.is_some_and(ours) {
        return Err(StatusCode::FORBIDDEN);
    }
    if let Some(origin) = origin
        && !origin.strip_prefix("http://").is_some_and(ours)
    {
        return Err(StatusCode::FORBIDDEN);
    }
    let path = path.strip_prefix('/').unwrap_or(path);
    let (given, rest) = match path.split_once('/') {
        Some((given, rest)) => (given, Some(rest)),
        None => (path, None),
    };
    if !same_secret(given.as_bytes(), token.as_bytes()) {
        return Err(StatusCode::NOT_FOUND);
    }
    let asked = match rest {
        None => Asked::Slash,
        Some("") => Asked::Page,
        Some("app.js") => Asked::Script,
        Some("app.css") => Asked::Style,
        Some("events") => Asked::Events,
        Some(_) => return Err(StatusCode::NOT_FOUND),
    };
    if method != Method::GET && method != Method::HEAD {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    Ok(asked)
}

/// Compares a secret in time that depends on its length only.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

struct Served {
    hub: Arc<Hub>,
    token: String,
    port: u16,
}

impl Served {
    fn answer(&self, request: Request<Incoming>) -> Response<Body> {
        let text = |name: header::HeaderName| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let host = text(header::HOST);
        let origin = text(header::ORIGIN);
        let asked = check(
            request.method(),
            request.uri().path(),
            host.as_deref(),
            origin.as_deref(),
            &self.token,
            self.port,
        );
        let mut response = match asked {
            Err(status) => plain(status, status.canonical_reason().unwrap_or("refused")),
            Ok(Asked::Slash) => {
                let mut response = plain(StatusCode::PERMANENT_REDIRECT, "");
                let location = format!("/{}/", self.token);
                if let Ok(value) = HeaderValue::from_str(&location) {
                    response.headers_mut().insert(header::LOCATION, value);
                }
                response
            }
            Ok(Asked::Page) => asset(INDEX_HTML, "text/html; charset=utf-8"),
            Ok(Asked::Script) => asset(APP_JS, "text/javascript; charset=utf-8"),
            Ok(Asked::Style) => asset(APP_CSS, "text/css; charset=utf-8"),
            Ok(Asked::Events) => self.events(),
        };
        let headers = response.headers_mut();
        for (name, value) in [
            ("content-security-policy", CSP),
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
            ("referrer-policy", "no-referrer"),
            ("cache-control", "no-store"),
            ("cross-origin-resource-policy", "same-origin"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        response
    }

    /// The event stream: the hub's snapshot, then each event as it comes.
    fn events(&self) -> Response<Body> {
        let (snapshot, mut rx) = self.hub.subscribe();
        let (frames_tx, frames_rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            for event in snapshot {
                if frames_tx.send(sse(&event)).await.is_err() {
                    return;
                }
            }
            let mut keepalive = tokio::time::interval(KEEPALIVE);
            keepalive.tick().await;
            loop {
                let frame = tokio::select! {
                    event = rx.recv() => match event {
                        Ok(event) => sse(&event),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            Bytes::from(format!("event: lagged\ndata: {n}\n\n"))
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    _ = keepalive.tick() => Bytes::from_static(b": keepalive\n\n"),
                };
                // The page went away: its body (and this receiver) was dropped.
                if frames_tx.send(frame).await.is_err() {
                    return;
                }
            }
        });
        let stream = futures::stream::unfold(frames_rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
        });
        let mut response = Response::new(StreamBody::new(stream).boxed());
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        response
    }
}

/// One server-sent event carrying `json` (one line: JSON text has no raw
/// newline).
fn sse(json: &str) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn asset(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed());
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123abcd";

    fn asked(path: &str, host: &str, origin: Option<&str>) -> Result<Asked, StatusCode> {
        check(&Method::GET, path, Some(host), origin, TOKEN, 4000)
    }

    #[test]
    fn only_the_token_opens_the_page() {
        let host = "127.0.0.1:4000";
        assert_eq!(asked("/0123abcd/", host, None), Ok(Asked::Page));
        assert_eq!(asked("/0123abcd", host, None), Ok(Asked::Slash));
        assert_eq!(asked("/0123abcd/events", host, None), Ok(Asked::Events));
        assert_eq!(
            asked("/0123abcd/app.js", "localhost:4000", None),
            Ok(Asked::Script)
        );
        for wrong in [
            "/",
            "/events",
            "/0123abce/",
            "/0123abc/events",
            "/0123abcd0/",
            "/0123abcd/x",
        ] {
            assert_eq!(
                asked(wrong, host, None),
                Err(StatusCode::NOT_FOUND),
                "{wrong}"
            );
        }
        assert_eq!(
            check(
                &Method::POST,
                "/0123abcd/events",
                Some(host),
                None,
                TOKEN,
                4000
            ),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
    }

    #[test]
    fn foreign_hosts_and_origins_are_refused() {
        for host in [
            "evil.example:4000",
            "127.0.0.1:4001",
            "127.0.0.1",
            "localhost.evil.example:4000",
        ] {
            assert_eq!(
                asked("/0123abcd/", host, None),
                Err(StatusCode::FORBIDDEN),
                "{host}"
            );
        }
        assert_eq!(
            check(&Method::GET, "/0123abcd/", None, None, TOKEN, 4000),
            Err(StatusCode::FORBIDDEN)
        );
        let host = "127.0.0.1:4000";
        assert_eq!(
            asked("/0123abcd/events", host, Some("http://127.0.0.1:4000")),
            Ok(Asked::Events)
        );
        for origin in [
            "http://evil.example",
            "null",
            "https://127.0.0.1:4000",
            "http://127.0.0.1:4001",
        ] {
            assert_eq!(
                asked("/0123abcd/events", host, Some(origin)),
                Err(StatusCode::FORBIDDEN),
                "{origin}"
            );
        }
    }
}
