//! Routing records: what a session that watches its routes
//! ([`graft_protocol::link::ClientMessage::WatchRoutes`], sent while somebody
//! looks at its inspector) learns of the requests of its filtered ports that
//! went elsewhere.
//!
//! [`http`](super::http) routes each request to a session or to the target; for
//! every *other* subscription of the port whose session watches
//! ([`Subscriber::watches_routes`](super::Subscriber::watches_routes)), it
//! makes a record ([`RoutedRequest`]):
//!
//! - went to the target: the request's and the response's heads, the body
//!   sizes, the first [`ROUTED_BODY_KEEP`] bytes of each body and the latency,
//!   sent when the response ends. Bodies stream on as they come; only their
//!   first bytes are copied aside.
//! - went to another session: only that it did ([`RoutedTo::AnotherSession`]),
//!   with no detail at all: that request (headers, bodies, path) belongs to the
//!   other session, and the session that gets the record may be another user's.
//!
//! The session that got the request, and sessions that got a mirror copy, get
//! no record: they see the request itself. When no subscription of the port
//! watches, [`start`] costs one check per subscription and allocates nothing;
//! when one does, a request to the target costs a copy of at most twice
//! [`ROUTED_BODY_KEEP`] bytes and its heads.
//!
//! Sessions that reach the hub through another agent ([`super::peer`]) never
//! watch: their records would have to cross the hub's peer link, which has no
//! message for them.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use graft_protocol::incoming::{ROUTED_BODY_KEEP, RoutedDetail, RoutedRequest, RoutedTo};
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::http::{BoxError, ProxyBody};
use super::{ConnMeta, PortSubs, Sub};

/// A request on its way to the target that watching sessions get a record of.
pub struct Recording {
    /// The subscriptions whose sessions get the record.
    watchers: Vec<Arc<Sub>>,
    started: Instant,
    started_unix_ms: u64,
    port: u16,
    /// The request's part of the record; the response's is filled at the end.
    detail: RoutedDetail,
    /// The request body as it passed: its length and first bytes.
    request_body: Arc<Mutex<Kept>>,
}

/// A body's length so far and its first [`ROUTED_BODY_KEEP`] bytes.
#[derive(Default)]
struct Kept {
    len: u64,
    first: Vec<u8>,
}

impl Kept {
    fn add(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        let room = ROUTED_BODY_KEEP.saturating_sub(self.first.len());
        self.first.extend_from_slice(&data[..room.min(data.len())]);
    }
}

fn lock(kept: &Mutex<Kept>) -> std::sync::MutexGuard<'_, Kept> {
    // Nothing panics while holding it.
    kept.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A header map as `(name, value)` text pairs, in order.
fn fields(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// Starts the records of `req`, routed to `stealer` (`None`: the target) with
/// copies to `mirrors`: a record of "another session" goes out at once to each
/// watcher; for a request to the target, the returned [`Recording`] finishes
/// the records when the response ends. `None` when nobody else watches.
pub fn start<B>(
    subs: &PortSubs,
    meta: &ConnMeta,
    stealer: Option<&Arc<Sub>>,
    mirrors: &[Arc<Sub>],
    req: &Request<B>,
) -> Option<Recording> {
    if !subs.subs.iter().any(|s| s.to.watches_routes()) {
        return None;
    }
    let watchers: Vec<Arc<Sub>> = subs
        .subs
        .iter()
        .filter(|s| {
            s.to.watches_routes()
                && !stealer.is_some_and(|st| Arc::ptr_eq(st, s))
                && !mirrors.iter().any(|m| Arc::ptr_eq(m, s))
        })
        .cloned()
        .collect();
    if watchers.is_empty() {
        return None;
    }
    let started_unix_ms = now_unix_ms();
    if stealer.is_some() {
        for watcher in &watchers {
            watcher.to.routed(RoutedRequest {
                port: meta.port,
                to: RoutedTo::AnotherSession,
                started_unix_ms,
                detail: None,
            });
        }
        return None;
    }
    let uri = req.uri();
    let target = match uri.authority() {
        // An absolute form stays absolute; HTTP/2 requests always carry one and
        // show their path.
        Some(_) if req.version() < http::Version::HTTP_2 => uri.to_string(),
        _ => uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
    };
    Some(Recording {
        watchers,
        started: Instant::now(),
        started_unix_ms,
        port: meta.port,
        detail: RoutedDetail {
            peer: meta.peer,
            method: req.method().to_string(),
            target,
            version: format!("{:?}", req.version()),
            request_headers: fields(req.headers()),
            request_body_len: 0,
            request_body: Vec::new(),
            status: 0,
            response_headers: Vec::new(),
            response_body_len: 0,
            response_body: Vec::new(),
            latency_us: 0,
            error: None,
        },
        request_body: Arc::default(),
    })
}

impl Recording {
    /// The request body, counted (and its first bytes kept) as it passes.
    pub fn count(&self, body: ProxyBody) -> ProxyBody {
        CountBody {
            inner: body,
            kept: self.request_body.clone(),
        }
        .boxed()
    }

    /// The response, whose body sends the records when it ends (or is dropped).
    pub fn respond(mut self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        self.detail.status = resp.status().as_u16();
        self.detail.response_headers = fields(resp.headers());
        resp.map(|inner| {
            RecordBody {
                inner,
                kept: Kept::default(),
                recording: Some(self),
            }
            .boxed()
        })
    }

    /// The target did not answer: the client got `status` because of `error`.
    pub fn failed(mut self, status: u16, error: String) {
        self.detail.status = status;
        self.detail.error = Some(error);
        self.finish(Kept::default());
    }

    /// Sends the records, the response having had the body `response`.
    fn finish(mut self, response: Kept) {
        {
            let mut request = lock(&self.request_body);
            self.detail.request_body_len = request.len;
            self.detail.request_body = std::mem::take(&mut request.first);
        }
        self.detail.response_body_len = response.len;
        self.detail.response_body = response.first;
        self.detail.latency_us = self.started.elapsed().as_micros() as u64;
        let count = self.watchers.len();
        let mut detail = Some(self.detail);
        for (i, watcher) in self.watchers.iter().enumerate() {
            let detail = if i + 1 == count {
                detail.take()
            } else {
                detail.clone()
            };
            watcher.to.routed(RoutedRequest {
                port: self.port,
                to: RoutedTo::Target,
                started_unix_ms: self.started_unix_ms,
                detail,
            });
        }
    }
}

/// A body that counts its data bytes (and keeps the first) into `kept`.
struct CountBody {
    inner: ProxyBody,
    kept: Arc<Mutex<Kept>>,
}

impl Body for CountBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            lock(&this.kept).add(data);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that sends the records of its [`Recording`] when it ends,
/// fails, or is dropped (the client left).
struct RecordBody {
    inner: ProxyBody,
    kept: Kept,
    recording: Option<Recording>,
}

impl RecordBody {
    fn finish(&mut self) {
        if let Some(recording) = self.recording.take() {
            recording.finish(std::mem::take(&mut self.kept));
        }
    }
}

impl Body for RecordBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.kept.add(data);
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(Some(Err(_)) | None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RecordBody {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use graft_protocol::incoming::{IncomingMode, Subscription};
    use http_body_util::Full;

    use super::*;
    use crate::incoming::{BoxFuture, BoxIo, Subscriber};

    /// A session that keeps the records it gets.
    struct Watcher {
        watches: bool,
        got: Mutex<Vec<RoutedRequest>>,
    }

    impl Subscriber for Watcher {
        fn open(self: Arc<Self>, _meta: ConnMeta) -> BoxFuture<std::io::Result<BoxIo>> {
            Box::pin(async { Err(std::io::Error::other("not in this test")) })
        }

        fn watches_routes(&self) -> bool {
            self.watches
        }

        fn routed(&self, record: RoutedRequest) {
            self.got.lock().unwrap().push(record);
        }
    }

    fn sub(watches: bool) -> (Arc<Sub>, Arc<Watcher>) {
        let watcher = Arc::new(Watcher {
            watches,
            got: Mutex::new(Vec::new()),
        });
        let sub = Arc::new(Sub {
            owner: 1,
            client: "someone@host".into(),
            since_unix: 0,
            subscription: Subscription {
                port: 80,
                mode: IncomingMode::Steal,
                filter: None,
                responses: false,
            },
            filter: None,
            to: watcher.clone(),
        });
        (sub, watcher)
    }

    fn meta() -> ConnMeta {
        ConnMeta {
            port: 80,
            peer: "192.0.2.1:5000".parse().unwrap(),
            local: "192.0.2.2:80".parse().unwrap(),
        }
    }

    fn request() -> Request<()> {
        Request::builder()
            .uri("/secret?token=1")
            .header("authorization", "Bearer x")
            .body(())
            .unwrap()
    }

    #[test]
    fn nobody_watching_means_no_record() {
        let (a, wa) = sub(false);
        let subs = PortSubs { subs: vec![a] };
        assert!(start(&subs, &meta(), None, &[], &request()).is_none());
        assert!(wa.got.lock().unwrap().is_empty());
    }

    #[test]
    fn another_sessions_request_is_told_without_anything_it_carried() {
        let (a, wa) = sub(true);
        let (b, wb) = sub(true);
        let subs = PortSubs {
            subs: vec![a, b.clone()],
        };
        assert!(start(&subs, &meta(), Some(&b), &[], &request()).is_none());
        let got = wa.got.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].to, RoutedTo::AnotherSession);
        assert_eq!(got[0].detail, None);
        // The session that got the request sees it itself.
        assert!(wb.got.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_request_to_the_target_is_recorded_when_its_response_ends() {
        let (a, wa) = sub(true);
        let subs = PortSubs { subs: vec![a] };
        let recording = start(&subs, &meta(), None, &[], &request()).expect("watched");
        let body = recording.count(
            Full::new(Bytes::from_static(b"abc"))
                .map_err(BoxError::from)
                .boxed(),
        );
        let _ = body.collect().await;
        let resp = Response::builder()
            .status(404)
            .body(
                Full::new(Bytes::from_static(b"not here"))
                    .map_err(BoxError::from)
                    .boxed(),
            )
            .unwrap();
        let resp = recording.respond(resp);
        assert!(
            wa.got.lock().unwrap().is_empty(),
            "recorded before the response ended"
        );
        let _ = resp.into_body().collect().await;
        let got = wa.got.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].to, RoutedTo::Target);
        let detail = got[0]
            .detail
            .as_ref()
            .expect("the target's requests are shown");
        assert_eq!(detail.target, "/secret?token=1");
        assert_eq!(detail.status, 404);
        assert_eq!(detail.request_body_len, 3);
        assert_eq!(detail.response_body_len, 8);
        assert_eq!(detail.request_body, b"abc");
        assert_eq!(detail.response_body, b"not here");
        assert_eq!(
            detail.request_headers,
            vec![("authorization".into(), "Bearer x".into())]
        );
    }
}
