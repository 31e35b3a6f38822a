//! Mirroring of whole connections: the client's bytes go to their destination
//! (the target's server or a stealer) and a copy goes to each mirroring session
//! through a bounded queue. A mirror that falls behind by more than
//! [`MIRROR_QUEUE`] chunks is dropped; the original connection never waits for a
//! mirror. What a mirror's program answers is read and thrown away.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
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

/// Starts one copy task per mirror, under `in_flight`; returns the queues to feed.
pub fn start_mirrors<'a>(
    meta: ConnMeta,
    mirrors: impl Iterator<Item = &'a Arc<Sub>>,
    in_flight: &TaskTracker,
) -> Vec<mpsc::Sender<Bytes>> {
    mirrors
        .map(|sub| {
            let (tx, rx) = mpsc::channel(MIRROR_QUEUE);
            let to = sub.to.clone();
            in_flight.spawn(async move {
                match to.open(meta).await {
                    Ok(io) => feed_mirror(io, rx).await,
                    Err(e) => tracing::debug!(port = meta.port, "mirror not opened: {e}"),
                }
            });
            tx
        })
        .collect()
}

/// Writes queued chunks to a mirror connection and drains its answers.
async fn feed_mirror(io: BoxIo, mut rx: mpsc::Receiver<Bytes>) {
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
                }
                None => break,
            },
            () = &mut drain => return,
        }
    }
    let _ = wr.shutdown().await;
    let _ = tokio::time::timeout(MIRROR_LINGER, drain).await;
}

/// Sends a copy of `bytes` to every mirror; a mirror whose queue is full or gone
/// is dropped.
pub fn copy_to(mirrors: &mut Vec<mpsc::Sender<Bytes>>, bytes: &[u8]) {
    if mirrors.is_empty() || bytes.is_empty() {
        return;
    }
    let chunk = Bytes::copy_from_slice(bytes);
    mirrors.retain(|tx| match tx.try_send(chunk.clone()) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::debug!("a mirror fell behind; its copy is dropped");
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    });
}

/// A stream whose received bytes are copied to mirrors as they are read.
pub struct Tee<S> {
    inner: S,
    mirrors: Vec<mpsc::Sender<Bytes>>,
}

impl<S> Tee<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, mirrors: Vec<mpsc::Sender<Bytes>>) -> Tee<S> {
        Tee { inner, mirrors }
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
            copy_to(&mut this.mirrors, &buf.filled()[before..]);
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
/// bytes to `mirrors`; a failure resets the client.
pub async fn pipe(stream: TcpStream, mut dest: BoxIo, mirrors: Vec<mpsc::Sender<Bytes>>) {
    let mut client = Tee::new(stream, mirrors);
    if tokio::io::copy_bidirectional_with_sizes(&mut client, &mut dest, 64 * 1024, 64 * 1024)
        .await
        .is_err()
    {
        let _ = client.get_ref().set_zero_linger();
    }
}
