//! The HTTP/1.1 fast path of a filtered port: the request head is parsed with
//! `httparse` (the parser hyper itself uses), routed by the filters, and then
//! the head and body bytes go to their destination as the client sent them;
//! the answer comes back the same way. Nothing is decoded into hyper's types
//! and re-encoded, so a request costs a parse, a filter match and the copies
//! of its bytes.
//!
//! Message framing is tracked by hand (RFC 9112 §6): `Content-Length`, or
//! `Transfer-Encoding: chunked` (chunk sizes and trailers are read with
//! `httparse`, [`framing`]), or, for a response only, the end of the
//! connection. The head of a request carries the filters' whole input here:
//! this path serves ports none of whose filters looks at bodies.
//!
//! A connection goes to hyper ([`super::http::serve`], with the bytes already
//! read replayed first) as soon as one of its requests needs more than this:
//! HTTP/2 prior knowledge, HTTP/1.0, `CONNECT`, `Upgrade`, `Expect`,
//! transfer codings other than `chunked` alone, or a session that watches its
//! routes ([`super::routes`]). On a port with mirrors, or with a body filter,
//! hyper serves every connection.
//!
//! Hostile clients: a head over [`MAX_HEAD`] bytes or [`MAX_HEADERS`] fields
//! gets `431`, a malformed head `400`, and a request with both
//! `Content-Length` and `Transfer-Encoding` (a request smuggling attempt, RFC
//! 9112 §6.3) or differing `Content-Length` values `400`; each closes the
//! connection and nothing of it is forwarded. A head that does not arrive
//! within [`HEAD_WAIT`] closes the connection. Pipelined requests are parsed
//! and routed one by one, each with exactly its own body bytes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use graft_protocol::incoming::IncomingMode;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

use super::framing::{self, Framing};
use super::{BoxIo, ConnMeta, PortSubs, Sub};

/// The largest request or response head, in bytes.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a head (hyper's default too).
pub const MAX_HEADERS: usize = 100;
/// How long a head may take to arrive once its first byte came.
pub const HEAD_WAIT: Duration = Duration::from_secs(30);
/// How many bytes one read asks for.
const READ_CHUNK: usize = 16 * 1024;

/// Whether connections of a port with subscriptions `subs` take this path:
/// every subscription steals and no filter looks at bodies.
pub fn eligible(subs: &PortSubs) -> bool {
    subs.subs.iter().all(|s| {
        s.subscription.mode == IncomingMode::Steal
            && !s.filter.as_ref().is_some_and(|f| f.needs_body())
    })
}

/// A parsed request head.
struct RequestHead {
    /// Its length in bytes, from the start of the buffer.
    len: usize,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Framing,
    /// The client asked to close after this request.
    close: bool,
    /// Why hyper must serve it, if it must.
    unusual: Option<&'static str>,
}

/// What the start of a buffer holds.
enum Parsed {
    Head(Box<RequestHead>),
    Partial,
    /// A bad request: the status to answer and why.
    Bad(u16, String),
}

/// Parses the request head at the start of `buf`.
fn parse_request(buf: &[u8]) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Parsed::Bad(431, format!("the request head is over {MAX_HEAD} bytes"));
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Bad(
                431,
                format!("the request has over {MAX_HEADERS} header fields"),
            );
        }
        Err(e) => return Parsed::Bad(400, format!("malformed request head: {e}")),
    };
    if len > MAX_HEAD {
        return Parsed::Bad(431, format!("the request head is over {MAX_HEAD} bytes"));
    }
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Bad(400, "malformed request line".to_owned());
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Bad(400, "malformed method".to_owned());
    };
    let Ok(uri) = path.parse::<Uri>() else {
        return Parsed::Bad(400, "malformed request target".to_owned());
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for field in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return Parsed::Bad(400, "malformed header field".to_owned());
        };
        headers.append(name, value);
    }
    let body = match framing::request_body(&headers) {
        Ok(Some(body)) => body,
        Ok(None) => {
            return Parsed::Head(Box::new(RequestHead {
                len,
                method,
                uri,
                headers,
                body: Framing::Length(0),
                close: true,
                unusual: Some("a transfer coding other than chunked"),
            }));
        }
        Err(why) => return Parsed::Bad(400, why.to_owned()),
    };
    let connection = framing::connection_tokens(&headers);
    let unusual = if version != 1 {
        Some("HTTP/1.0")
    } else if method == Method::CONNECT {
        Some("CONNECT")
    } else if headers.contains_key(http::header::UPGRADE) || connection.upgrade {
        Some("an upgrade")
    } else if headers.contains_key(http::header::EXPECT) {
        Some("Expect")
    } else {
        None
    };
    Parsed::Head(Box::new(RequestHead {
        len,
        method,
        uri,
        headers,
        body,
        close: connection.close,
        unusual,
    }))
}

/// An upstream connection of a client connection, kept between requests.
struct Upstream {
    /// `None` for the target, else the address of the session's subscription.
    dest: Option<usize>,
    io: BoxIo,
    buf: BytesMut,
}

/// How one exchange ended.
enum Exchange {
    /// Both sides may go on.
    KeepAlive,
    /// The client connection ends after this answer.
    Close,
}

/// A failure on one side of an exchange.
enum Failed {
    /// The client broke the exchange (or went away): close it.
    Client,
    /// The destination failed before any byte of its answer reached the
    /// client; `retry` when nothing of the request was lost (a kept upstream
    /// connection that the destination had closed).
    Upstream { error: String, retry: bool },
    /// The destination failed after part of its answer went out: close.
    UpstreamMidAnswer,
}

/// Serves the HTTP/1.1 client connection `stream` of a filtered port until it
/// ends; falls back to hyper ([`super::http::serve`]) when a request needs it.
pub async fn serve(
    mut stream: TcpStream,
    meta: ConnMeta,
    subs: Arc<PortSubs>,
    in_flight: TaskTracker,
) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut upstreams: Vec<Upstream> = Vec::new();
    let mut first = true;
    loop {
        let head = match read_head(&mut stream, &mut buf, first).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(HeadError::Bad(status, why)) => {
                tracing::info!(peer = %meta.peer, port = meta.port, "bad request ({status}): {why}; connection closed");
                let _ = stream.write_all(&error_response(status, &why)).await;
                let _ = stream.shutdown().await;
                return;
            }
            Err(HeadError::Hyper(why)) => {
                return hand_to_hyper(stream, buf, meta, subs, in_flight, why).await;
            }
            Err(HeadError::Gone) => return,
        };
        first = false;
        if let Some(why) = head.unusual {
            return hand_to_hyper(stream, buf, meta, subs, in_flight, why).await;
        }
        if subs.subs.iter().any(|s| s.to.watches_routes()) {
            let why = "a session watches its routes";
            return hand_to_hyper(stream, buf, meta, subs, in_flight, why).await;
        }
        let stealer = select(&subs, &head);
        tracing::trace!(method = %head.method, uri = %head.uri, to = ?stealer.as_ref().map(|s| &s.client), "request");
        match exchange(
            &mut stream,
            &mut buf,
            *head,
            stealer.as_ref(),
            meta,
            &mut upstreams,
        )
        .await
        {
            Ok(Exchange::KeepAlive) => {}
            Ok(Exchange::Close) => {
                let _ = stream.shutdown().await;
                return;
            }
            Err(()) => return,
        }
    }
}

/// Serves the rest of the connection with hyper, `buf` read first.
async fn hand_to_hyper(
    stream: TcpStream,
    buf: BytesMut,
    meta: ConnMeta,
    subs: Arc<PortSubs>,
    in_flight: TaskTracker,
    why: &str,
) {
    tracing::debug!(peer = %meta.peer, port = meta.port, "HTTP connection served by hyper: {why}");
    let io = Rewind {
        prefix: buf,
        inner: stream,
    };
    super::http::serve(io, meta, subs, in_flight, None).await;
}

/// The session that steals a request with `head` (`None`: the target): the
/// first whose filter matches, else the unfiltered stealer; kubelet probes
/// always go to the target.
fn select(subs: &PortSubs, head: &RequestHead) -> Option<Arc<Sub>> {
    if super::http::is_kubelet_probe(&head.headers) {
        return None;
    }
    subs.subs
        .iter()
        .find(|s| {
            s.subscription.mode == IncomingMode::Steal
                && s.filter
                    .as_ref()
                    .is_some_and(|f| f.matches(&head.method, &head.uri, &head.headers))
        })
        .or_else(|| subs.plain_steal())
        .cloned()
}

/// Why no head was read.
enum HeadError {
    /// A bad request: answer the status, close.
    Bad(u16, String),
    /// hyper must serve the connection (HTTP/2 prior knowledge).
    Hyper(&'static str),
    /// The client went away or stalled mid-head.
    Gone,
}

/// Reads the next request head into `buf`; `None` when the client closed
/// between requests.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    first: bool,
) -> Result<Option<Box<RequestHead>>, HeadError> {
    loop {
        if first && buf.starts_with(b"PRI ") {
            return Err(HeadError::Hyper("HTTP/2 prior knowledge"));
        }
        if !buf.is_empty() {
            match parse_request(buf) {
                Parsed::Head(head) => return Ok(Some(head)),
                Parsed::Bad(status, why) => return Err(HeadError::Bad(status, why)),
                Parsed::Partial => {}
            }
        }
        buf.reserve(READ_CHUNK);
        let read = if buf.is_empty() {
            stream.read_buf(buf).await
        } else {
            match tokio::time::timeout(HEAD_WAIT, stream.read_buf(buf)).await {
                Ok(read) => read,
                Err(_) => return Err(HeadError::Gone),
            }
        };
        match read {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) | Err(_) => return Err(HeadError::Gone),
            Ok(_) => {}
        }
    }
}

/// Forwards one request (head at the start of `buf`) to its destination and
/// its answer back; `Err` when the client connection must end at once.
async fn exchange(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    head: RequestHead,
    stealer: Option<&Arc<Sub>>,
    meta: ConnMeta,
    upstreams: &mut Vec<Upstream>,
) -> Result<Exchange, ()> {
    let dest = stealer.map(|s| Arc::as_ptr(s) as usize);
    let mut body = head.body;
    // The head and the body bytes already read go out in one write.
    let mut out = buf.split_to(head.len);
    let (n, body_done) = match body.advance(buf) {
        Ok(step) => step,
        Err(why) => return bad_request(client, &meta, why).await,
    };
    out.unsplit(buf.split_to(n));
    let is_head = head.method == Method::HEAD;
    let mut retried = false;
    loop {
        let kept = upstreams.iter().position(|u| u.dest == dest);
        let (mut up, reused) = match kept {
            Some(i) => (upstreams.swap_remove(i), true),
            None => match open(stealer, meta).await {
                Ok(io) => (
                    Upstream {
                        dest,
                        io,
                        buf: BytesMut::new(),
                    },
                    false,
                ),
                Err(e) => return bad_gateway(client, stealer, &e.to_string(), body_done).await,
            },
        };
        let result = if body_done {
            send_whole(client, &mut up, &out, is_head).await
        } else {
            send_streamed(client, buf, &mut body, &mut up, &out, is_head).await
        };
        match result {
            Ok((end, up_reusable)) => {
                if up_reusable {
                    upstreams.push(up);
                }
                return Ok(match (end, head.close) {
                    (Exchange::KeepAlive, false) => Exchange::KeepAlive,
                    _ => Exchange::Close,
                });
            }
            Err(Failed::Upstream { retry: true, .. }) if reused && body_done && !retried => {
                // The kept connection had been closed by the destination.
                retried = true;
            }
            Err(Failed::Upstream { error, .. }) => {
                return bad_gateway(client, stealer, &error, body_done).await;
            }
            Err(Failed::Client | Failed::UpstreamMidAnswer) => return Err(()),
        }
    }
}

/// Sends a request that is all in `out` and relays the answer.
async fn send_whole(
    client: &mut TcpStream,
    up: &mut Upstream,
    out: &[u8],
    is_head: bool,
) -> Result<(Exchange, bool), Failed> {
    if let Err(e) = up.io.write_all(out).await {
        return Err(Failed::Upstream {
            error: e.to_string(),
            retry: true,
        });
    }
    relay_answer(&mut up.io, &mut up.buf, client, is_head).await
}

/// Sends a request whose body is still coming: `out` first, then the rest of
/// the body as the client sends it, while the answer is relayed back. An
/// answer that ends before the body closes the client connection.
async fn send_streamed(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    body: &mut Framing,
    up: &mut Upstream,
    out: &[u8],
    is_head: bool,
) -> Result<(Exchange, bool), Failed> {
    if let Err(e) = up.io.write_all(out).await {
        return Err(Failed::Upstream {
            error: e.to_string(),
            retry: false,
        });
    }
    let (mut client_rd, mut client_wr) = client.split();
    let (mut up_rd, mut up_wr) = tokio::io::split(&mut up.io);
    let sending = relay_body(&mut client_rd, buf, body, &mut up_wr);
    let answering = relay_answer(&mut up_rd, &mut up.buf, &mut client_wr, is_head);
    let mut sending = std::pin::pin!(sending);
    let mut answering = std::pin::pin!(answering);
    let mut sent = false;
    loop {
        tokio::select! {
            done = &mut sending, if !sent => match done {
                Ok(()) => sent = true,
                Err(BodyError::Client) => return Err(Failed::Client),
                // The destination stopped reading: its answer says why.
                Err(BodyError::Upstream) => sent = true,
            },
            answer = &mut answering => {
                return match answer {
                    Ok((end, reusable)) if sent => Ok((end, reusable)),
                    Ok(_) => Ok((Exchange::Close, false)),
                    Err(e) => Err(e),
                };
            }
        }
    }
}

/// Why a request body stopped.
enum BodyError {
    Client,
    Upstream,
}

/// Relays the rest of a request body (framed by `body`) from `client` (bytes
/// already read in `buf`) to `up`.
async fn relay_body<R, W>(
    client: &mut R,
    buf: &mut BytesMut,
    body: &mut Framing,
    up: &mut W,
) -> Result<(), BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let (n, done) = body.advance(buf).map_err(|_| BodyError::Client)?;
        if n > 0 {
            up.write_all(&buf[..n])
                .await
                .map_err(|_| BodyError::Upstream)?;
            buf.advance(n);
        }
        if done {
            return Ok(());
        }
        if buf.len() > framing::MAX_PENDING {
            return Err(BodyError::Client);
        }
        buf.reserve(READ_CHUNK);
        match client.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(BodyError::Client),
            Ok(_) => {}
        }
    }
}

/// Relays one answer (interim `1xx` heads, then the final head and its body)
/// from `up` to `client`. Returns how the exchange ends and whether `up` may
/// carry another request.
async fn relay_answer<R, W>(
    up: &mut R,
    up_buf: &mut BytesMut,
    client: &mut W,
    is_head: bool,
) -> Result<(Exchange, bool), Failed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut answered = false;
    let fail = |answered: bool, error: String| {
        if answered {
            Failed::UpstreamMidAnswer
        } else {
            Failed::Upstream {
                error,
                retry: false,
            }
        }
    };
    loop {
        // The head.
        let head = loop {
            if !up_buf.is_empty() {
                match framing::parse_response(up_buf, is_head) {
                    Ok(Some(head)) => break head,
                    Ok(None) => {}
                    Err(why) => return Err(fail(answered, why)),
                }
            }
            up_buf.reserve(READ_CHUNK);
            match up.read_buf(up_buf).await {
                Ok(0) if up_buf.is_empty() && !answered => {
                    return Err(Failed::Upstream {
                        error: "the connection closed before an answer".to_owned(),
                        retry: true,
                    });
                }
                Ok(0) => return Err(fail(answered, "the answer was cut off".to_owned())),
                Err(e) => return Err(fail(answered, e.to_string())),
                Ok(_) => {}
            }
        };
        let mut out = up_buf.split_to(head.len);
        let mut body = head.body;
        loop {
            let (n, done) = body
                .advance(up_buf)
                .map_err(|why| fail(answered, why.to_owned()))?;
            out.unsplit(up_buf.split_to(n));
            if !out.is_empty() {
                client.write_all(&out).await.map_err(|_| Failed::Client)?;
                answered = true;
            }
            if done {
                break;
            }
            if up_buf.len() > framing::MAX_PENDING {
                return Err(fail(answered, "an endless chunk header".to_owned()));
            }
            // Reuse the buffer the write emptied.
            out = BytesMut::new();
            up_buf.reserve(READ_CHUNK);
            match up.read_buf(up_buf).await {
                Ok(0) if matches!(body, Framing::UntilClose) => {
                    return Ok((Exchange::Close, false));
                }
                Ok(0) => return Err(fail(true, "the answer was cut off".to_owned())),
                Err(e) => return Err(fail(answered, e.to_string())),
                Ok(_) => {}
            }
        }
        if head.interim {
            continue;
        }
        let reusable = !head.close && up_buf.is_empty();
        let end = if head.close {
            Exchange::Close
        } else {
            Exchange::KeepAlive
        };
        return Ok((end, reusable));
    }
}

/// Opens a connection to the session of `stealer`, or to the target.
async fn open(stealer: Option<&Arc<Sub>>, meta: ConnMeta) -> io::Result<BoxIo> {
    match stealer {
        Some(sub) => sub.to.clone().open(meta).await,
        None => Ok(Box::new(
            super::tee::connect_target(meta.local, meta.peer).await?,
        )),
    }
}

/// Answers a request whose body is malformed: `400`, then the connection ends.
async fn bad_request(client: &mut TcpStream, meta: &ConnMeta, why: &str) -> Result<Exchange, ()> {
    tracing::info!(peer = %meta.peer, port = meta.port, "bad request body: {why}; connection closed");
    let _ = client.write_all(&error_response(400, why)).await;
    Ok(Exchange::Close)
}

/// Answers `502` for a destination that did not answer; the connection goes
/// on when the request was read whole.
async fn bad_gateway(
    client: &mut TcpStream,
    stealer: Option<&Arc<Sub>>,
    error: &str,
    request_read: bool,
) -> Result<Exchange, ()> {
    let whom = match stealer {
        None => "the target's server".to_owned(),
        Some(sub) => format!("the session of {}", sub.client),
    };
    tracing::debug!("forwarding to {whom} failed: {error}");
    let text = format!("graft: {whom} did not answer: {error}\n");
    let resp = response(502, &text, !request_read);
    client.write_all(&resp).await.map_err(|_| ())?;
    Ok(if request_read {
        Exchange::KeepAlive
    } else {
        Exchange::Close
    })
}

/// A complete response with `status` and the text `why`, closing.
fn error_response(status: u16, why: &str) -> Vec<u8> {
    response(status, why, true)
}

/// A complete response with `status` and the text `why`, with `connection:
/// close` when `close`.
fn response(status: u16, why: &str, close: bool) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let text = if why.ends_with('\n') {
        why.to_owned()
    } else {
        format!("{why}\n")
    };
    let close = if close { "connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{close}\r\n{text}",
        text.len()
    )
    .into_bytes()
}

/// A stream that yields `prefix` before the bytes of `inner`.
struct Rewind<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(raw: &[u8]) -> (u16, String) {
        match parse_request(raw) {
            Parsed::Bad(status, why) => (status, why),
            Parsed::Head(_) => panic!("accepted {raw:?}"),
            Parsed::Partial => panic!("partial {raw:?}"),
        }
    }

    #[test]
    fn a_plain_request_is_parsed_with_its_framing() {
        let raw = b"POST /x?y=1 HTTP/1.1\r\nHost: a\r\nX-User: alice\r\nContent-Length: 5\r\n\r\nhelloGET";
        let Parsed::Head(head) = parse_request(raw) else {
            panic!("not parsed")
        };
        assert_eq!(head.len, raw.len() - 8);
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.uri.path(), "/x");
        assert_eq!(head.headers["x-user"], "alice");
        assert!(matches!(head.body, Framing::Length(5)));
        assert!(head.unusual.is_none() && !head.close);
    }

    #[test]
    fn smuggling_and_bad_heads_are_refused() {
        // RFC 9112 §6.3: both framings at once.
        let (status, why) = bad(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(status, 400);
        assert!(why.contains("smuggling"), "{why}");
        assert_eq!(
            bad(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n").0,
            400
        );
        assert_eq!(bad(b"POST / HTTP/1.1\r\nContent-Length: +4\r\n\r\n").0, 400);
        assert_eq!(
            bad(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n").0,
            400
        );
        // A space before the colon (RFC 9112 §5.1).
        assert_eq!(bad(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n").0, 400);
        assert_eq!(bad(b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n").0, 400);
        assert_eq!(bad(b"G\x01T / HTTP/1.1\r\n\r\n").0, 400);
        let big = format!("GET / HTTP/1.1\r\nA: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(bad(big.as_bytes()).0, 431);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        assert_eq!(
            bad(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).0,
            431
        );
    }

    #[test]
    fn unusual_requests_go_to_hyper() {
        for raw in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        ] {
            let Parsed::Head(head) = parse_request(raw) else {
                panic!("not parsed: {raw:?}")
            };
            assert!(head.unusual.is_some(), "{raw:?}");
        }
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nHost"),
            Parsed::Partial
        ));
    }
}
