//! A copy of the bytes of stolen (or mirrored) connections for whoever watches
//! the session's traffic (`graft run --ui`, `graft ui`).
//!
//! When [`crate::SessionOptions::incoming_tap`] is set and its owner says it is
//! watched, each connection delivered to the program's listener is wrapped in a
//! [`Tapped`] stream: the bytes written to the program (the client's requests)
//! and the bytes read from it (the program's answers) are copied, in the order
//! they passed, as chunks on the [`TappedConnection`] handed to the tap's channel.
//!
//! The copy never slows the connection down: chunks go on a bounded channel with
//! `try_send`, and a watcher that falls [`TAP_QUEUE`] chunks behind loses the
//! rest of that connection (its channel closes early, so the watcher never sees
//! a stream with a hole in the middle).
//!
//! Requests of a filtered port that no filter of this session took never reach
//! the program; a tap made [`IncomingTap::with_routes`] turns the agent's
//! routing records on while somebody watches (and off when nobody does), and
//! hands each record on.

use std::{
    fmt, io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use graft_protocol::{
    incoming::{RoutedRequest, tap::Direction},
    layer::DeliveredPeer,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::mpsc,
};

use crate::flows::LocalStream;

/// How many chunks of one connection may wait for the watcher before the copy of
/// that connection stops.
pub const TAP_QUEUE: usize = 256;

/// One tapped connection: where it came from and its bytes, both ways.
#[derive(Debug)]
pub struct TappedConnection {
    /// The client's address and the target's address it connected to (its port
    /// is the target's port, also under `--port-map`).
    pub peer: DeliveredPeer,
    /// The chunks in the order they passed: [`Direction::Request`] for the
    /// client's bytes written to the program, [`Direction::Response`] for the
    /// program's bytes going back. Ends when the connection ends, or early when
    /// the watcher fell behind.
    pub chunks: mpsc::Receiver<(Direction, Vec<u8>)>,
}

/// Where the proxy hands tapped connections, and whether anybody watches.
#[derive(Clone)]
pub struct IncomingTap {
    connections: mpsc::Sender<TappedConnection>,
    watched: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Where the agent's routing records go ([`IncomingTap::with_routes`]).
    routes: Option<mpsc::Sender<RoutedRequest>>,
}

/// How often the proxy looks whether somebody started or stopped watching, to
/// turn the agent's routing records on or off.
pub const ROUTES_POLL: Duration = Duration::from_millis(200);

impl fmt::Debug for IncomingTap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingTap").finish_non_exhaustive()
    }
}

impl IncomingTap {
    /// A tap that sends each new connection on `connections` while `watched`
    /// returns true (checked once per connection, when it is delivered).
    pub fn new(
        connections: mpsc::Sender<TappedConnection>,
        watched: impl Fn() -> bool + Send + Sync + 'static,
    ) -> IncomingTap {
        IncomingTap {
            connections,
            watched: Arc::new(watched),
            routes: None,
        }
    }

    /// Also asks the agent, while somebody watches, for a record of each
    /// request of the session's filtered ports that went to the target or to
    /// another session ([`graft_protocol::link::AgentMessage::Routed`]), and
    /// hands them to `routes` (dropped when it is full). An agent that does not
    /// know routing records sends none.
    pub fn with_routes(mut self, routes: mpsc::Sender<RoutedRequest>) -> IncomingTap {
        self.routes = Some(routes);
        self
    }

    /// Whether this tap takes routing records.
    pub(crate) fn wants_routes(&self) -> bool {
        self.routes.is_some()
    }

    /// Hands the agent's routing record on, unless nobody takes it now.
    pub(crate) fn routed(&self, record: RoutedRequest) {
        if let Some(routes) = &self.routes
            && (self.watched)()
        {
            let _ = routes.try_send(record);
        }
    }

    /// Tells the agent (through `send`) to send routing records while somebody
    /// watches and to stop when nobody does; looks every [`ROUTES_POLL`].
    /// Returns when `send` fails (the link is gone).
    pub(crate) async fn follow_watchers<F, Fut>(self, send: F)
    where
        F: Fn(bool) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let mut on = false;
        let mut tick = tokio::time::interval(ROUTES_POLL);
        loop {
            tick.tick().await;
            let watched = (self.watched)();
            if watched != on {
                if !send(watched).await {
                    return;
                }
                on = watched;
            }
        }
    }

    /// Whether somebody watches now.
    pub(crate) fn watched(&self) -> bool {
        (self.watched)()
    }

    /// Wraps `stream` when somebody watches and the channel takes the
    /// connection; otherwise gives `stream` back (spliced as it is).
    pub(crate) fn wrap<S: LocalStream>(
        &self,
        stream: S,
        peer: DeliveredPeer,
    ) -> Result<Tapped<S>, S> {
        if !(self.watched)() {
            return Err(stream);
        }
        let (chunks_tx, chunks) = mpsc::channel(TAP_QUEUE);
        match self.connections.try_send(TappedConnection { peer, chunks }) {
            Ok(()) => Ok(Tapped {
                inner: stream,
                chunks: Some(chunks_tx),
            }),
            Err(_) => Err(stream),
        }
    }
}

/// A local stream whose bytes are copied to a [`TappedConnection`].
pub(crate) struct Tapped<S> {
    inner: S,
    /// `None` once the watcher fell behind or left.
    chunks: Option<mpsc::Sender<(Direction, Vec<u8>)>>,
}

impl<S> Tapped<S> {
    fn copy(&mut self, direction: Direction, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if let Some(chunks) = &self.chunks
            && chunks.try_send((direction, bytes.to_vec())).is_err()
        {
            // Full or closed: stop here rather than leave a hole in the stream.
            self.chunks = None;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tapped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = buf.filled()[before..].to_vec();
            self.copy(Direction::Response, &read);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tapped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.copy(Direction::Request, &buf[..n]);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: LocalStream> LocalStream for Tapped<S> {
    fn abort(&mut self) {
        self.inner.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn peer() -> DeliveredPeer {
        DeliveredPeer {
            peer: "192.0.2.1:5000".parse().unwrap(),
            local: "192.0.2.2:80".parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn both_directions_are_copied_in_order() {
        let (tx, mut rx) = mpsc::channel(4);
        let tap = IncomingTap::new(tx, || true);
        let (ours, mut program) = tokio::io::duplex(1024);
        let mut tapped = tap.wrap(ours, peer()).map_err(|_| ()).unwrap();
        let mut conn = rx.recv().await.unwrap();
        assert_eq!(conn.peer.local.port(), 80);
        tapped.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut got = [0u8; 18];
        program.read_exact(&mut got).await.unwrap();
        program
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 27];
        tapped.read_exact(&mut answer).await.unwrap();
        drop(tapped);
        let mut seen = Vec::new();
        while let Some(chunk) = conn.chunks.recv().await {
            seen.push(chunk);
        }
        assert_eq!(
            seen[0],
            (Direction::Request, b"GET / HTTP/1.1\r\n\r\n".to_vec())
        );
        let answered: Vec<u8> = seen[1..].iter().flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(answered, b"HTTP/1.1 204 No Content\r\n\r\n");
    }

    #[tokio::test]
    async fn routing_records_are_asked_for_and_passed_on_only_while_watched() {
        use graft_protocol::incoming::{RoutedRequest, RoutedTo};
        use std::sync::atomic::{AtomicBool, Ordering};
        let watched = Arc::new(AtomicBool::new(false));
        let (tx, _rx) = mpsc::channel(4);
        let (routes_tx, mut routes_rx) = mpsc::channel(4);
        let tap = IncomingTap::new(tx, {
            let watched = watched.clone();
            move || watched.load(Ordering::Relaxed)
        })
        .with_routes(routes_tx);
        let record = RoutedRequest {
            port: 80,
            to: RoutedTo::AnotherSession,
            started_unix_ms: 0,
            detail: None,
        };
        tap.routed(record.clone());
        assert!(routes_rx.try_recv().is_err(), "passed on while unwatched");
        let (asks_tx, mut asks) = mpsc::unbounded_channel();
        tokio::spawn(tap.clone().follow_watchers(move |on| {
            let asks_tx = asks_tx.clone();
            async move { asks_tx.send(on).is_ok() }
        }));
        tokio::time::sleep(ROUTES_POLL * 3).await;
        assert!(asks.try_recv().is_err(), "asked for records nobody watches");
        watched.store(true, Ordering::Relaxed);
        assert_eq!(asks.recv().await, Some(true));
        tap.routed(record.clone());
        assert_eq!(routes_rx.recv().await, Some(record));
        watched.store(false, Ordering::Relaxed);
        assert_eq!(asks.recv().await, Some(false));
    }

    #[tokio::test]
    async fn nobody_watching_means_no_copy() {
        let (tx, mut rx) = mpsc::channel(4);
        let tap = IncomingTap::new(tx, || false);
        let (ours, _program) = tokio::io::duplex(64);
        assert!(tap.wrap(ours, peer()).is_err());
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_loses_the_rest_not_a_middle_part() {
        let (tx, mut rx) = mpsc::channel(4);
        let tap = IncomingTap::new(tx, || true);
        let (ours, mut program) = tokio::io::duplex(1 << 20);
        let mut tapped = tap.wrap(ours, peer()).map_err(|_| ()).unwrap();
        let mut conn = rx.recv().await.unwrap();
        for i in 0..(TAP_QUEUE + 10) {
            tapped.write_all(&[i as u8]).await.unwrap();
        }
        let mut sink = vec![0u8; TAP_QUEUE + 10];
        program.read_exact(&mut sink).await.unwrap();
        drop(tapped);
        let mut seen = Vec::new();
        while let Some((_, bytes)) = conn.chunks.recv().await {
            seen.extend(bytes);
        }
        // Exactly a prefix: the first TAP_QUEUE chunks, then nothing.
        let expected: Vec<u8> = (0..TAP_QUEUE).map(|i| i as u8).collect();
        assert_eq!(seen, expected);
    }
}
