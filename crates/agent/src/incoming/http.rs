//! HTTP routing on a filtered port: each request of a client connection goes to
//! the first session whose steal filter matches it, else to the unfiltered
//! stealer, else to the target's own server; sessions whose mirror filter matches
//! get a copy.
//!
//! The client connection is served with hyper (HTTP/1.1 with keep-alive,
//! pipelining, chunked bodies, `Expect: 100-continue` and upgrades; HTTP/2 with
//! prior knowledge, RFC 9113 §3.3). Each request is forwarded over an upstream
//! connection of the same HTTP version, kept per destination for the life of the
//! client connection, so keep-alive connections that mix destinations work and
//! each destination sees a normal client. Bodies and trailers stream through
//! unbuffered, except the start of a body that a filter's body rule needs
//! ([`super::body`], bounded). An `Upgrade` request (WebSocket, RFC 6455) gets its own upstream
//! connection, and when the destination answers `101 Switching Protocols` the two
//! connections are spliced: the whole rest of the connection belongs to that
//! destination.
//!
//! Mirror copies of a request go through a bounded queue; a copy that falls behind
//! is cut off, and the answers of mirrors are read and thrown away.

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use graft_filter::RequestBody;
use graft_protocol::incoming::IncomingMode;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::body::{self, Unread};
use super::tee::{self, Tee};
use super::{BoxIo, ConnMeta, Io, PortSubs, Sub};

/// The error type of forwarded bodies.
pub type BoxError = Box<dyn StdError + Send + Sync>;
/// The body type of forwarded messages.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// How many body frames a mirror copy of a request may lag behind.
const MIRROR_FRAMES: usize = 32;
/// How long a request waits for a busy HTTP/1 upstream connection before it
/// opens another.
const READY_WAIT: Duration = Duration::from_millis(50);

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Request methods recognized at the start of a connection (RFC 9110 §9, RFC 5789).
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Classifies the first bytes: `Some(true)` HTTP, `Some(false)` not HTTP, `None`
/// not enough bytes to tell.
pub fn classify(first: &[u8]) -> Option<bool> {
    if first.is_empty() {
        return None;
    }
    let mut undecided = false;
    for pattern in METHODS.iter().copied().chain([H2_PREFACE]) {
        if first.starts_with(pattern) {
            return Some(true);
        }
        if pattern.starts_with(first) {
            undecided = true;
        }
    }
    if undecided { None } else { Some(false) }
}

/// An upstream destination of a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Dest {
    /// The target's own server.
    Target,
    /// A session, by the address of its subscription.
    Session(usize),
    /// A session's mirror copy.
    Mirror(usize),
}

impl Dest {
    /// Where a request goes: the session of `stealer`, else the target.
    fn of(stealer: Option<&Arc<Sub>>) -> Dest {
        match stealer {
            Some(sub) => Dest::Session(Arc::as_ptr(sub) as usize),
            None => Dest::Target,
        }
    }
}

/// A client side of an upstream connection.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<ProxyBody>),
    H2(hyper::client::conn::http2::SendRequest<ProxyBody>),
}

/// One client connection's routing state.
struct Conn {
    meta: ConnMeta,
    subs: Arc<PortSubs>,
    upstreams: tokio::sync::Mutex<HashMap<(Dest, Version), Sender>>,
    /// How upstream connections are opened when the client's was decrypted
    /// ([`super::tls`]); `None` on a plain port.
    hops: Option<Arc<super::tls::Hops>>,
    /// Where the tasks that outlive a request run (mirror copies, upgraded
    /// connections), so a draining hub waits for them.
    in_flight: TaskTracker,
}

/// Serves the HTTP client connection `stream` until it ends; tasks that relay
/// parts of it run under `in_flight`. `hops` opens the upstream connections of a
/// decrypted (TLS) connection.
pub async fn serve<S: Io>(
    stream: S,
    meta: ConnMeta,
    subs: Arc<PortSubs>,
    in_flight: TaskTracker,
    hops: Option<Arc<super::tls::Hops>>,
) {
    let mirrors = tee::start_mirrors(meta, subs.plain_mirrors(), &in_flight);
    let io = Tee::new(stream, mirrors);
    let conn = Arc::new(Conn {
        meta,
        subs,
        upstreams: tokio::sync::Mutex::default(),
        hops,
        in_flight,
    });
    let service = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(conn, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .half_close(true)
        .preserve_header_case(true)
        .pipeline_flush(true);
    builder.http2().timer(TokioTimer::new());
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        tracing::debug!(peer = %meta.peer, "HTTP connection ended: {e}");
    }
}

fn matches(
    sub: &Sub,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &RequestBody<'_>,
) -> bool {
    sub.filter
        .as_ref()
        .is_some_and(|f| f.matches_request(method, uri, headers, body))
}

/// How many body bytes the filters of `subs` still need to decide on this
/// request (the largest limit among those the head does not decide); 0 when
/// none does.
fn body_needed(subs: &PortSubs, method: &Method, uri: &Uri, headers: &HeaderMap) -> usize {
    subs.subs
        .iter()
        .filter_map(|s| s.filter.as_ref())
        .filter(|f| f.decide_head(method, uri, headers).is_none())
        .map(|f| f.body_limit() as usize)
        .max()
        .unwrap_or(0)
}

/// Whether a request is a kubelet probe: the kubelet's HTTP probes send
/// `User-Agent: kube-probe/<major>.<minor>` (Kubernetes docs, "Configure
/// Liveness, Readiness and Startup Probes"). They always go to the target, so a
/// stopped or slow local process never fails them; the packet rules already
/// let the probe sources through (`crate::rules::probes`), this catches probes
/// from any other address.
pub(super) fn is_kubelet_probe(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::USER_AGENT)
        .and_then(|ua| ua.to_str().ok())
        .is_some_and(|ua| ua.starts_with("kube-probe/"))
}

/// Routes and forwards one request.
async fn handle(conn: Arc<Conn>, req: Request<Incoming>) -> Response<ProxyBody> {
    let (mut req, stealer, mirrors) = select(&conn, req).await;
    let dest = Dest::of(stealer.as_ref());
    tracing::trace!(method = %req.method(), uri = %req.uri(), ?dest, mirrors = mirrors.len(), "request");

    let upgrade =
        req.version() < Version::HTTP_2 && req.headers().contains_key(http::header::UPGRADE);
    let down_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let recording = super::routes::start(&conn.subs, &conn.meta, stealer.as_ref(), &mirrors, &req);

    let req = copy_to_mirrors(&conn, req, mirrors);
    let req = match &recording {
        Some(recording) => req.map(|body| recording.count(body)),
        None => req,
    };

    let forwarded = match down_upgrade {
        Some(down) => forward_upgrade(&conn, dest, stealer.as_ref(), req, down).await,
        None => forward(&conn, dest, stealer.as_ref(), req).await,
    };
    match forwarded {
        Ok(resp) => {
            let resp = resp.map(|b| b.map_err(BoxError::from).boxed());
            match recording {
                Some(recording) => recording.respond(resp),
                None => resp,
            }
        }
        Err(e) => {
            let whom = match dest {
                Dest::Target => "the target's server".to_owned(),
                _ => format!(
                    "the session of {}",
                    stealer.as_ref().map_or("?", |s| s.client.as_str())
                ),
            };
            tracing::debug!("forwarding to {whom} failed: {e}");
            let mut resp = Response::new(
                Full::new(Bytes::from(format!("graft: {whom} did not answer: {e}\n")))
                    .map_err(BoxError::from)
                    .boxed(),
            );
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            if let Some(recording) = recording {
                recording.failed(StatusCode::BAD_GATEWAY.as_u16(), e.to_string());
            }
            resp
        }
    }
}

/// Reads what the filters of `conn`'s port need of `req` (its head, the start
/// of its body) and picks the session that steals it (none: the target) and the
/// sessions that get a copy; kubelet probes go to the target, uncopied.
async fn select(
    conn: &Conn,
    req: Request<Incoming>,
) -> (Request<ProxyBody>, Option<Arc<Sub>>, Vec<Arc<Sub>>) {
    let probe = is_kubelet_probe(req.headers());
    let limit = if probe {
        0
    } else {
        body_needed(&conn.subs, req.method(), req.uri(), req.headers())
    };
    let (req, prefix) = if limit == 0 {
        (req.map(|b| b.map_err(BoxError::from).boxed()), None)
    } else {
        let (req, prefix, unread) = body::buffer(req, limit).await;
        if let Some(why) = unread {
            let reason = match why {
                Unread::OverLimit => format!("is over the {limit}-byte limit of the body filters"),
                Unread::TooSlow => format!("did not arrive within {:?}", body::BODY_WAIT),
                Unread::NoBudget => format!(
                    "cannot be buffered: the agent already holds {} KiB of request bodies",
                    body::BODY_BUDGET_KIB
                ),
                Unread::Broken => "was broken off by the client".to_owned(),
            };
            tracing::info!(
                peer = %conn.meta.peer,
                "the body of {} {} {reason}; the request is routed by the filters' other rules",
                req.method(),
                req.uri().path(),
            );
        }
        (req, Some(prefix))
    };
    let (method, uri, headers) = (req.method(), req.uri(), req.headers());
    let body = match &prefix {
        Some(p) if p.complete => RequestBody::complete(&p.bytes),
        _ => RequestBody::unknown(),
    };
    let stealer = conn
        .subs
        .subs
        .iter()
        .find(|s| {
            s.subscription.mode == IncomingMode::Steal && matches(s, method, uri, headers, &body)
        })
        .or_else(|| conn.subs.plain_steal())
        .filter(|_| !probe)
        .cloned();
    let mirrors: Vec<Arc<Sub>> = conn
        .subs
        .subs
        .iter()
        .filter(|s| {
            s.subscription.mode == IncomingMode::Mirror && matches(s, method, uri, headers, &body)
        })
        .filter(|_| !probe)
        .cloned()
        .collect();
    drop(body);
    drop(prefix);
    (req, stealer, mirrors)
}

/// Starts a mirror copy of `req` for each of `mirrors`; the returned request
/// copies its body frames to them as it is read.
fn copy_to_mirrors(
    conn: &Arc<Conn>,
    req: Request<ProxyBody>,
    mirrors: Vec<Arc<Sub>>,
) -> Request<ProxyBody> {
    let mut copies = Vec::new();
    for sub in mirrors {
        let head = Head::of(&req);
        let (tx, rx) = if req.body().is_end_stream() {
            (None, None)
        } else {
            let (tx, rx) = mpsc::channel(MIRROR_FRAMES);
            (Some(tx), Some(rx))
        };
        copies.extend(tx);
        conn.in_flight
            .spawn(mirror_request(conn.clone(), sub, head, rx));
    }
    req.map(|body| -> ProxyBody {
        if copies.is_empty() {
            body
        } else {
            TeeBody {
                inner: body,
                copies,
            }
            .boxed()
        }
    })
}

/// Parses the client bytes of a sniffed connection ([`super::sniff`]), which
/// the target serves itself, and sends each request that a mirror filter
/// matches to that mirror; what is written to `stream` is thrown away.
pub async fn copy_requests<S: Io>(
    stream: S,
    meta: ConnMeta,
    subs: Arc<PortSubs>,
    in_flight: TaskTracker,
) {
    let conn = Arc::new(Conn {
        meta,
        subs,
        upstreams: tokio::sync::Mutex::default(),
        hops: None,
        in_flight,
    });
    let service = service_fn(move |req| {
        let conn = conn.clone();
        async move {
            let (req, _, mirrors) = select(&conn, req).await;
            let req = copy_to_mirrors(&conn, req, mirrors);
            // Read the body through, so the copies get it and the next
            // request of the connection is parsed.
            let _ = req.into_body().collect().await;
            Ok::<_, Infallible>(Response::new(
                Empty::<Bytes>::new().map_err(BoxError::from).boxed(),
            ))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).half_close(true);
    // The client sends what the target's windows allow: never less than these.
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(i32::MAX as u32)
        .initial_connection_window_size(i32::MAX as u32)
        .max_concurrent_streams(None);
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(peer = %meta.peer, "the HTTP copy ended: {e}");
    }
}

/// Opens a byte stream to `dest`, and the HTTP version it must speak when its
/// TLS handshake fixed one (ALPN).
async fn open(
    conn: &Conn,
    stealer: Option<&Arc<Sub>>,
    dest: Dest,
) -> Result<(BoxIo, Option<Version>), BoxError> {
    match (dest, stealer, &conn.hops) {
        (Dest::Target, _, Some(hops)) => Ok(hops.open_target(conn.meta).await?),
        (Dest::Target, _, None) => Ok((
            Box::new(tee::connect_target(conn.meta.local, conn.meta.peer).await?),
            None,
        )),
        (_, Some(sub), Some(hops)) => {
            let io = sub.to.clone().open(conn.meta).await?;
            Ok(hops.open_session(sub, io).await?)
        }
        (_, Some(sub), None) => Ok((sub.to.clone().open(conn.meta).await?, None)),
        (_, None, _) => Err("no session for this request".into()),
    }
}

/// The HTTP version a request of `version` with `headers` is sent in to `dest`.
fn wanted_version(conn: &Conn, dest: Dest, version: Version, headers: &HeaderMap) -> Version {
    match &conn.hops {
        Some(hops) => hops.wanted(dest == Dest::Target, version, headers),
        None => version,
    }
}

/// Opens a new upstream connection of `version` to `dest`.
async fn connect(
    conn: &Conn,
    stealer: Option<&Arc<Sub>>,
    dest: Dest,
    version: Version,
) -> Result<Sender, BoxError> {
    let (io, fixed) = open(conn, stealer, dest).await?;
    let io = TokioIo::new(io);
    if fixed.unwrap_or(version) == Version::HTTP_2 {
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(connection);
        Ok(Sender::H2(sender))
    } else {
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .handshake(io)
            .await?;
        tokio::spawn(connection);
        Ok(Sender::H1(sender))
    }
}

/// Takes a usable upstream connection to `dest` (or opens one), waiting at most
/// [`READY_WAIT`] for a busy HTTP/1 one.
///
/// A mirror's copy waits too: an HTTP/1 connection goes back to the table when
/// its answer's head arrives, and stays busy until its body is read, so the
/// copy of a client's next request often finds it so. Dropping that copy lost
/// requests a slow mirror had time for (a copy waits in its own task, never in
/// the original's way).
async fn take_sender(
    conn: &Conn,
    stealer: Option<&Arc<Sub>>,
    dest: Dest,
    version: Version,
) -> Result<Sender, BoxError> {
    let cached = {
        let mut upstreams = conn.upstreams.lock().await;
        match upstreams.get(&(dest, version)) {
            // An HTTP/2 connection carries many requests at once: share it.
            Some(Sender::H2(sender)) if !sender.is_closed() => Some(Sender::H2(sender.clone())),
            // An HTTP/1 connection carries one at a time: take it.
            Some(Sender::H1(_)) => upstreams.remove(&(dest, version)),
            _ => None,
        }
    };
    match cached {
        Some(Sender::H2(mut sender)) => {
            let ready = sender.ready().await.is_ok();
            if ready {
                return Ok(Sender::H2(sender));
            }
        }
        Some(Sender::H1(mut sender)) if !sender.is_closed() => {
            let ready = sender.is_ready()
                || matches!(
                    tokio::time::timeout(READY_WAIT, sender.ready()).await,
                    Ok(Ok(()))
                );
            if ready {
                return Ok(Sender::H1(sender));
            }
        }
        _ => {}
    }
    let sender = connect(conn, stealer, dest, version).await?;
    if let Sender::H2(shared) = &sender {
        conn.upstreams
            .lock()
            .await
            .insert((dest, version), Sender::H2(shared.clone()));
    }
    Ok(sender)
}

/// Sends `req` to `dest` and returns its response.
async fn forward(
    conn: &Conn,
    dest: Dest,
    stealer: Option<&Arc<Sub>>,
    req: Request<ProxyBody>,
) -> Result<Response<Incoming>, BoxError> {
    let version = wanted_version(conn, dest, req.version(), req.headers());
    let sender = take_sender(conn, stealer, dest, version).await?;
    send(conn, (dest, version), sender, req).await
}

/// Sends on `sender` (kept under `key`) and puts it back for the next request.
async fn send(
    conn: &Conn,
    key: (Dest, Version),
    sender: Sender,
    mut req: Request<ProxyBody>,
) -> Result<Response<Incoming>, BoxError> {
    match sender {
        Sender::H1(mut sender) => {
            super::tls::adapt_version(&mut req, Version::HTTP_11);
            let resp = sender.send_request(req);
            let resp = resp.await;
            conn.upstreams.lock().await.insert(key, Sender::H1(sender));
            Ok(resp?)
        }
        Sender::H2(mut sender) => Ok(sender.send_request(req).await?),
    }
}

/// Forwards an `Upgrade` request over a connection of its own and, on `101`,
/// splices the client's connection with it.
async fn forward_upgrade(
    conn: &Conn,
    dest: Dest,
    stealer: Option<&Arc<Sub>>,
    req: Request<ProxyBody>,
    down: hyper::upgrade::OnUpgrade,
) -> Result<Response<Incoming>, BoxError> {
    let io = TokioIo::new(open(conn, stealer, dest).await?.0);
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .handshake(io)
        .await?;
    tokio::spawn(connection.with_upgrades());
    let mut resp = sender.send_request(req).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let up = hyper::upgrade::on(&mut resp);
        conn.in_flight.spawn(async move {
            match tokio::try_join!(down, up) {
                Ok((down, up)) => {
                    let mut down = TokioIo::new(down);
                    let mut up = TokioIo::new(up);
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
                Err(e) => tracing::debug!("upgrade failed: {e}"),
            }
        });
    }
    Ok(resp)
}

/// The head of a request, for a mirror copy.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    fn of<B>(req: &Request<B>) -> Head {
        Head {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }
}

/// Sends a mirror copy of a request to `sub` and throws the answer away. Skipped
/// when the session's connection is still busy with an earlier copy.
async fn mirror_request(
    conn: Arc<Conn>,
    sub: Arc<Sub>,
    head: Head,
    body: Option<mpsc::Receiver<Frame<Bytes>>>,
) {
    let dest = Dest::Mirror(Arc::as_ptr(&sub) as usize);
    let version = wanted_version(&conn, dest, head.version, &head.headers);
    let sender = match take_sender(&conn, Some(&sub), dest, version).await {
        Ok(sender) => sender,
        Err(e) => {
            tracing::debug!("mirror not reachable: {e}");
            return;
        }
    };
    let body: ProxyBody = match body {
        None => Empty::new().map_err(BoxError::from).boxed(),
        Some(rx) => {
            let frames = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|f| (Ok::<_, BoxError>(f), rx))
            });
            StreamBody::new(frames).boxed()
        }
    };
    let mut req = Request::new(body);
    *req.method_mut() = head.method;
    *req.uri_mut() = head.uri;
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers;
    match send(&conn, (dest, version), sender, req).await {
        Ok(resp) => {
            let _ = resp.into_body().collect().await;
        }
        Err(e) => tracing::debug!("mirror copy failed: {e}"),
    }
}

/// A request body that copies its frames to mirrors as they pass.
struct TeeBody {
    inner: ProxyBody,
    copies: Vec<mpsc::Sender<Frame<Bytes>>>,
}

fn copy_frame(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(data) = frame.data_ref() {
        Some(Frame::data(data.clone()))
    } else {
        frame.trailers_ref().map(|t| Frame::trailers(t.clone()))
    }
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.copies.retain(|tx| match copy_frame(&frame) {
                    Some(copy) => tx.try_send(copy).is_ok(),
                    None => true,
                });
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.copies.clear();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.copies.clear();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn kubelet_probes_are_told_by_their_user_agent() {
        let mut h = HeaderMap::new();
        assert!(!super::is_kubelet_probe(&h));
        h.insert(http::header::USER_AGENT, "kube-probe/1.25".parse().unwrap());
        assert!(super::is_kubelet_probe(&h));
        h.insert(
            http::header::USER_AGENT,
            "curl/7.88 kube-probe/1".parse().unwrap(),
        );
        assert!(!super::is_kubelet_probe(&h));
    }

    use super::*;

    #[test]
    fn first_bytes_classify() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(true));
        assert_eq!(classify(b"POST /x"), Some(true));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(true));
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GETX"), Some(false));
        assert_eq!(classify(b"\x16\x03\x01"), Some(false));
        assert_eq!(classify(b"hello\n"), Some(false));
        assert_eq!(classify(b""), None);
    }
}
