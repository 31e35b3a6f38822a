//! Mirroring of whole connections: the client's bytes go to their destination
//! (the target's server or a stealer) and a copy goes to each mirroring session
//! through a bounded queue. A mirror that falls behind by more than
//! [`MIRROR_QUEUE`] chunks is dropped; the original connection never waits for a
//! mirror. What a mirror's program answers is read and thrown away.
//!
//! A mirror whose subscription asked for the target's answers
//! ([`Subscription::responses`]) gets both directions as
//! [`graft_protocol::incoming::tap`] frames: the client's bytes as they are read
//! from the client, the target's as they are read from the target. On a port
//! where HTTP filters route each request ([`super::http`]) such a mirror gets the
//! client's bytes only, still framed. A session that reads tap times
//! ([`Subscriber::tap_times`]) gets a time frame before each chunk's bytes: when
//! the agent read them here, or when the kernel captured them for the sniffing
//! mirror ([`super::sniff`]), whose chunks reach the session a capture block at
//! a time.
//!
//! [`Subscriber::tap_times`]: super::Subscriber::tap_times
//!
//! [`Subscription::responses`]: graft_protocol::incoming::Subscription::responses

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use graft_protocol::incoming::tap::{self, Direction};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::{BoxIo, ConnMeta, Sub};

/// How many chunks (each at most one read, 64 KiB) a mirror may lag behind.
pub const MIRROR_QUEUE: usize = 64;

/// How long a mirror's program may take to finish answering after the original
/// connection ended.
const MIRROR_LINGER: Duration = Duration::from_secs(5);

/// Connects to the target's own server at `addr` (the original destination, from
/// inside the target's network namespace, where the redirect rules of
/// `PREROUTING` do not apply), from the address of `client` where the agent can
/// ([`crate::transparent`]).
///
/// # Errors
///
/// The `connect` error.
pub async fn connect_target(addr: SocketAddr, client: SocketAddr) -> io::Result<TcpStream> {
    let stream = crate::transparent::connect_target(addr, client).await?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The queue of one mirror: the copy task writes what it receives to the session.
#[derive(Clone)]
pub struct Mirror {
    tx: mpsc::Sender<Bytes>,
    /// The session asked for both directions, as tap frames.
    framed: bool,
    /// The session reads time frames too (only with `framed`).
    times: bool,
}

/// Bytes read in one direction of a connection, and when.
#[derive(Debug, Clone)]
pub struct Part {
    /// Which way they went.
    pub direction: Direction,
    /// The bytes.
    pub bytes: Bytes,
    /// When they were read or captured (the wall clock).
    pub at: SystemTime,
}

/// Starts one copy task per mirror, under `in_flight`; returns the queues to feed.
pub fn start_mirrors<'a>(
    meta: ConnMeta,
    mirrors: impl Iterator<Item = &'a Arc<Sub>>,
    in_flight: &TaskTracker,
) -> Vec<Mirror> {
    mirrors
        .map(|sub| {
            let (tx, rx) = mpsc::channel(MIRROR_QUEUE);
            let framed = sub.subscription.responses;
            let times = framed && sub.to.tap_times();
            let to = sub.to.clone();
            in_flight.spawn(async move {
                match to.open(meta).await {
                    Ok(io) => feed_mirror(io, rx).await,
                    Err(e) => tracing::debug!(port = meta.port, "mirror not opened: {e}"),
                }
            });
            Mirror { tx, framed, times }
        })
        .collect()
}

/// The answers a mirror's program may leave unread on a TCP mirror socket
/// before they wake the agent, in bytes (`SO_RCVLOWAT`, socket(7)).
///
/// The agent reads a mirror's answers only to throw them away, and with every
/// answer waking the mirror's thread, that thread woke 0.8 times per copy on
/// the bench's bed at 10 000 requests/s over 16 connections, half of it for
/// the answers. The kernel neither marks a TCP socket readable nor wakes its
/// reader until this much is queued, or the connection ends (tcp(7),
/// `tcp_poll` and `tcp_data_ready`), and grows the socket's receive buffer to
/// hold it, so a program that answers more than this still writes on.
const ANSWERS_LOWAT: libc::c_int = 64 * 1024;

/// Sets [`ANSWERS_LOWAT`] on `io` when it is a TCP socket (a local program's
/// loopback pair); other streams wake the agent per answer as before.
fn quiet_answers(io: &BoxIo) {
    use std::os::fd::AsFd;
    let any: &dyn std::any::Any = &**io;
    let Some(stream) = any.downcast_ref::<TcpStream>() else {
        return;
    };
    let set = crate::sockopt::set(
        stream.as_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVLOWAT,
        &ANSWERS_LOWAT,
    );
    if let Err(e) = set {
        tracing::debug!("a mirror's answers wake the agent each: SO_RCVLOWAT refused ({e})");
    }
}

/// Writes queued chunks to a mirror connection and drains its answers.
async fn feed_mirror(io: BoxIo, mut rx: mpsc::Receiver<Bytes>) {
    quiet_answers(&io);
    let (mut rd, mut wr) = tokio::io::split(io);
    let drain = async move {
        let mut sink = vec![0u8; 16 * 1024];
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let mut drain = std::pin::pin!(drain);
    loop {
        tokio::select! {
            chunk = rx.recv() => match chunk {
                Some(chunk) => {
                    if wr.write_all(&chunk).await.is_err() {
                        return;
                    }
                    // The mirror's program wakes now; a sniffed copy lets
                    // it, or the target, have this CPU (`sniff::yield_now`).
                    super::sniff::yield_now();
                }
                None => break,
            },
            () = &mut drain => return,
        }
    }
    let _ = wr.shutdown().await;
    let _ = tokio::time::timeout(MIRROR_LINGER, drain).await;
}

/// Appends `bytes` to `out` as tap frames of at most [`tap::MAX_CHUNK`] bytes
/// each, after a time frame of `at` when there is one.
fn frame_into(out: &mut BytesMut, direction: Direction, bytes: &[u8], at: Option<SystemTime>) {
    if let Some(at) = at {
        out.put_slice(&tap::time(at));
    }
    for chunk in bytes.chunks(tap::MAX_CHUNK) {
        out.put_slice(&tap::header(direction, chunk.len()));
        out.put_slice(chunk);
    }
}

/// The room [`frame_into`] takes for `len` bytes.
fn framed_len(len: usize) -> usize {
    tap::HEADER_LEN + tap::TIME_LEN + len + len.div_ceil(tap::MAX_CHUNK) * tap::HEADER_LEN
}

/// Sends a copy of `bytes`, read in `direction`, to every mirror (framed for the
/// mirrors that asked for both directions; only those get responses); a mirror
/// whose queue is full or gone is dropped.
pub fn copy_to(mirrors: &mut Vec<Mirror>, direction: Direction, bytes: &[u8]) {
    if mirrors.is_empty() || bytes.is_empty() {
        return;
    }
    let mut raw = None;
    let mut frames = None;
    let mut timed = None;
    let framed = |at| {
        let mut out = BytesMut::with_capacity(framed_len(bytes.len()));
        frame_into(&mut out, direction, bytes, at);
        out.freeze()
    };
    mirrors.retain(|mirror| {
        let chunk = match (mirror.framed, direction) {
            (true, _) if mirror.times => timed
                .get_or_insert_with(|| framed(Some(SystemTime::now())))
                .clone(),
            (true, _) => frames.get_or_insert_with(|| framed(None)).clone(),
            (false, Direction::Request) => raw
                .get_or_insert_with(|| Bytes::copy_from_slice(bytes))
                .clone(),
            (false, Direction::Response) => return true,
        };
        send_chunk(&mirror.tx, chunk)
    });
}

/// Sends a copy of `parts` (bytes in the order they were read) to every mirror
/// as one chunk: the request bytes joined for the plain mirrors, every part as
/// tap frames for those that asked for both directions (each after a time frame
/// for those that read times). A mirror whose queue is full or gone is dropped.
pub fn copy_parts(mirrors: &mut Vec<Mirror>, parts: &[Part]) {
    if mirrors.is_empty() || parts.is_empty() {
        return;
    }
    let mut raw: Option<Bytes> = None;
    let mut frames: Option<Bytes> = None;
    let mut timed: Option<Bytes> = None;
    let framed = |times: bool| {
        let len = parts.iter().map(|p| framed_len(p.bytes.len())).sum();
        let mut out = BytesMut::with_capacity(len);
        for part in parts {
            let at = times.then_some(part.at);
            frame_into(&mut out, part.direction, &part.bytes, at);
        }
        out.freeze()
    };
    mirrors.retain(|mirror| {
        let chunk = if mirror.times {
            timed.get_or_insert_with(|| framed(true)).clone()
        } else if mirror.framed {
            frames.get_or_insert_with(|| framed(false)).clone()
        } else {
            raw.get_or_insert_with(|| {
                let mut out = BytesMut::new();
                for part in parts.iter().filter(|p| p.direction == Direction::Request) {
                    out.put_slice(&part.bytes);
                }
                out.freeze()
            })
            .clone()
        };
        chunk.is_empty() || send_chunk(&mirror.tx, chunk)
    });
}

/// Whether any of `mirrors` asked for the target's responses.
pub fn want_responses(mirrors: &[Mirror]) -> bool {
    mirrors.iter().any(|m| m.framed)
}

/// Queues one chunk; false when the mirror is to be dropped.
fn send_chunk(tx: &mpsc::Sender<Bytes>, chunk: Bytes) -> bool {
    match tx.try_send(chunk) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::debug!("a mirror fell behind; its copy is dropped");
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// A stream whose received bytes are copied to mirrors as they are read.
pub struct Tee<S> {
    inner: S,
    mirrors: Vec<Mirror>,
    direction: Direction,
}

impl<S> Tee<S> {
    /// Wraps the client's stream `inner`: what it reads is the request direction.
    pub fn new(inner: S, mirrors: Vec<Mirror>) -> Tee<S> {
        Tee {
            inner,
            mirrors,
            direction: Direction::Request,
        }
    }

    /// Wraps the target's stream `inner`: what it reads is the response direction,
    /// copied only to the mirrors that asked for it.
    pub fn responses(inner: S, mut mirrors: Vec<Mirror>) -> Tee<S> {
        mirrors.retain(|m| m.framed);
        Tee {
            inner,
            mirrors,
            direction: Direction::Response,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tee<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            copy_to(&mut this.mirrors, this.direction, &buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tee<S> {
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

/// Splices the client connection and `dest` both ways, copying the client's
/// bytes to `mirrors` (and `dest`'s to those that asked for responses); a failure
/// resets the client.
pub async fn pipe(stream: TcpStream, dest: BoxIo, mirrors: Vec<Mirror>) {
    let mut dest = Tee::responses(dest, mirrors.clone());
    let mut client = Tee::new(stream, mirrors);
    if tokio::io::copy_bidirectional_with_sizes(&mut client, &mut dest, 64 * 1024, 64 * 1024)
        .await
        .is_err()
    {
        let _ = client.get_ref().set_zero_linger();
    }
}
