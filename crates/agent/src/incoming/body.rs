//! Request bodies for the body rules of HTTP filters (`--filter-body`,
//! `--filter-json`): [`buffer`] reads the start of a request body, at most the
//! largest limit of the filters that still need it, and gives back the request
//! with a body that replays those bytes and then streams the rest
//! ([`Replayed`]), so the destination sees the body unchanged.
//!
//! Limits on hostile clients:
//!
//! - a body whose `Content-Length` is over the limit is not read at all; a
//!   chunked body is read until it passes the limit (at most one more read
//!   buffer of hyper's). Either way the request is routed by the filters'
//!   other rules, and the log says so;
//! - a body that does not arrive within [`BODY_WAIT`] (slow-loris) is routed
//!   the same way with what came, and the rest streams on as it comes;
//! - all connections together buffer at most [`BODY_BUDGET_KIB`] KiB for body
//!   rules; a request that finds the budget spent is routed by the other rules
//!   at once, so many slow bodies cannot exhaust the agent's memory;
//! - reading the body is what makes hyper answer `Expect: 100-continue`
//!   (RFC 9110 §10.1.1), so a client waiting for `100 Continue` is never left
//!   waiting by the filter.
//!
//! Each connection is served by its own task, so a connection whose body is
//! being read never holds up another.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::http::{BoxError, ProxyBody};

/// How long the agent waits for a body that a filter needs, from the end of the
/// request head.
pub const BODY_WAIT: Duration = Duration::from_secs(10);

/// The most KiB that every connection together may buffer for body rules:
/// 64 MiB.
pub const BODY_BUDGET_KIB: usize = 64 * 1024;

/// The budget of [`BODY_BUDGET_KIB`], one permit per KiB.
static BODY_BUDGET: Semaphore = Semaphore::const_new(BODY_BUDGET_KIB);

/// What was read of a request body.
#[derive(Debug)]
pub struct Prefix {
    /// The bytes read, from the start of the body.
    pub bytes: Bytes,
    /// Whether they are the whole body.
    pub complete: bool,
}

/// Why a body was not read to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unread {
    /// Its `Content-Length`, or the bytes that came, passed the limit.
    OverLimit,
    /// It did not arrive within [`BODY_WAIT`].
    TooSlow,
    /// Every connection together already buffers [`BODY_BUDGET_KIB`].
    NoBudget,
    /// The client broke off the body.
    Broken,
}

/// Reads up to `limit` bytes (more than 0) of `req`'s body and returns the
/// request with a body that replays them, what was read, and why it is not the
/// whole body, if it is not.
pub async fn buffer(
    req: Request<Incoming>,
    limit: usize,
) -> (Request<ProxyBody>, Prefix, Option<Unread>) {
    let (parts, mut incoming) = req.into_parts();
    let untouched = |parts, incoming: Incoming, why: Option<Unread>| {
        let prefix = Prefix {
            bytes: Bytes::new(),
            complete: why.is_none(),
        };
        let body = incoming.map_err(BoxError::from).boxed();
        (Request::from_parts(parts, body), prefix, why)
    };
    if incoming.is_end_stream() {
        return untouched(parts, incoming, None);
    }
    if incoming.size_hint().lower() > limit as u64 {
        return untouched(parts, incoming, Some(Unread::OverLimit));
    }
    // One more KiB for the read that crosses the limit, at least.
    let kib = u32::try_from(limit.div_ceil(1024) + 1).unwrap_or(u32::MAX);
    let Ok(permit) = BODY_BUDGET.try_acquire_many(kib) else {
        return untouched(parts, incoming, Some(Unread::NoBudget));
    };

    let mut read = BytesMut::new();
    let mut trailers = None;
    let mut error = None;
    let mut ended = false;
    let reading = async {
        while read.len() <= limit {
            match incoming.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => read.extend_from_slice(&data),
                    Err(frame) => {
                        trailers = frame.into_trailers().ok();
                        ended = true;
                        return;
                    }
                },
                Some(Err(e)) => {
                    error = Some(e);
                    return;
                }
                None => {
                    ended = true;
                    return;
                }
            }
        }
    };
    let timed_out = tokio::time::timeout(BODY_WAIT, reading).await.is_err();
    let bytes = read.freeze();
    let why = if error.is_some() {
        Some(Unread::Broken)
    } else if ended && bytes.len() <= limit {
        None
    } else if timed_out {
        Some(Unread::TooSlow)
    } else {
        Some(Unread::OverLimit)
    };
    let prefix = Prefix {
        bytes: bytes.clone(),
        complete: why.is_none(),
    };
    let body = Replayed {
        head: (!bytes.is_empty()).then_some(bytes),
        trailers,
        error: error.map(BoxError::from),
        rest: (!ended).then_some(incoming),
        permit: Some(permit),
    };
    (Request::from_parts(parts, body.boxed()), prefix, why)
}

/// A body that yields the bytes already read, then the rest of the client's.
struct Replayed {
    head: Option<Bytes>,
    trailers: Option<HeaderMap>,
    error: Option<BoxError>,
    /// The rest of the body, `None` when it was read to its end.
    rest: Option<Incoming>,
    /// The share of the budget the read bytes hold, given back once they are
    /// passed on.
    permit: Option<SemaphorePermit<'static>>,
}

impl Body for Replayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(head) = this.head.take() {
            this.permit = None;
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        this.permit = None;
        if let Some(e) = this.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none()
            && self.error.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        let mut hint = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint);
        // A Content-Length body keeps its exact length, so it is forwarded with
        // the same framing.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + head);
        }
        hint.set_lower(hint.lower() + head);
        hint
    }
}
