//! Connections of the target for callers other than the layer: the front ends
//! that have no LD_PRELOAD hook in the program (a user-space TCP/IP stack behind a
//! tun device, `port-forward`, `intercept`, `expose`).
//!
//! - [`Session::connect_tcp`] opens a TCP connection from the target and returns it
//!   as an [`OutgoingTcp`], which the caller splices with any [`LocalStream`].
//! - [`Session::connect_udp`] opens a UDP flow from the target ([`OutgoingUdp`]):
//!   datagrams go out with [`OutgoingUdp::send`] and come back from
//!   [`OutgoingUdp::recv`].
//! - [`Session::steal`] subscribes a port of the target with a [`Delivery`]: to a
//!   local listener (as the layer does), or as [`IncomingTcp`] values on a channel
//!   for the caller to splice wherever it wants.
//!
//! A connection that is dropped before it is spliced is reset on the agent's side,
//! so the target's peer sees the failure at once.

use std::{net::SocketAddr, sync::Arc};

use graft_protocol::{ConnectionId, Transport, layer::DeliveredPeer, link::ClientMessage};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpStream, UnixStream},
    sync::mpsc,
};

use crate::{
    ProxyError, Session,
    session::{ConnEvent, ConnEvents, Shared},
    splice,
};

/// A local byte stream the proxy can splice with a connection of the target's.
pub trait LocalStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Makes the local peer see a failure (for TCP, an RST) instead of a clean end
    /// of stream. Called when the target's side was reset or the link ended. The
    /// default does nothing: the stream is simply dropped.
    fn abort(&mut self) {}
}

impl LocalStream for TcpStream {
    fn abort(&mut self) {
        // SO_LINGER 0: close sends an RST.
        let _ = self.set_zero_linger();
    }
}

impl LocalStream for UnixStream {}

impl LocalStream for tokio::io::DuplexStream {}

impl LocalStream for Box<dyn LocalStream> {
    fn abort(&mut self) {
        (**self).abort();
    }
}

/// Where the incoming connections of a port subscribed with [`Session::steal`] go.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// Connect to a TCP listener at this address (an unspecified address is
    /// reached on loopback) and splice.
    Listener(SocketAddr),
    /// Send each connection on this channel; the receiver splices it
    /// ([`IncomingTcp::splice`]) or drops it (the client sees a reset). A full or
    /// closed channel resets the connection.
    Channel(mpsc::Sender<IncomingTcp>),
}

impl std::fmt::Display for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Delivery::Listener(addr) => write!(f, "local {addr}"),
            Delivery::Channel(_) => f.write_str("graft"),
        }
    }
}

/// One connection of the link not yet spliced with a local stream. Dropping it
/// resets the connection on the agent's side.
struct Unspliced {
    shared: Arc<Shared>,
    conn: ConnectionId,
    events: Option<ConnEvents>,
}

impl std::fmt::Debug for Unspliced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unspliced")
            .field("conn", &self.conn)
            .finish()
    }
}

impl Unspliced {
    fn splice<S: LocalStream>(mut self, stream: S) -> impl Future<Output = ()> + Send + use<S> {
        let shared = self.shared.clone();
        let conn = self.conn;
        // Taken here, so Drop (which runs at the end of this function) does not reset.
        let events = self.events.take();
        async move {
            if let Some(events) = events {
                splice::splice_stream(shared, conn, stream, events).await;
            }
        }
    }
}

impl Drop for Unspliced {
    fn drop(&mut self) {
        if self.events.take().is_some() {
            self.shared.forget(self.conn);
            self.shared.close_soon(self.conn, true);
        }
    }
}

/// A TCP connection the agent opened from the target ([`Session::connect_tcp`]).
#[derive(Debug)]
pub struct OutgoingTcp {
    inner: Unspliced,
    local: SocketAddr,
}

impl OutgoingTcp {
    /// The connection's local address in the target (the source its peer sees).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Splices the connection with `stream` until both directions are done or
    /// either breaks (see the link's rules in `graft_protocol::link`): an EOF of
    /// `stream` becomes a FIN in the target, a reset in the target aborts
    /// `stream` ([`LocalStream::abort`]). The returned future does the work; spawn it.
    pub fn splice<S: LocalStream>(self, stream: S) -> impl Future<Output = ()> + Send + use<S> {
        self.inner.splice(stream)
    }
}

/// A connection to a port of the target subscribed with [`Delivery::Channel`].
#[derive(Debug)]
pub struct IncomingTcp {
    inner: Unspliced,
    port: u16,
    peer: DeliveredPeer,
}

impl IncomingTcp {
    /// The target's port the client connected to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client's address and the address it connected to, as the target saw them.
    pub fn peer(&self) -> DeliveredPeer {
        self.peer
    }

    /// Splices the connection with `stream`, as [`OutgoingTcp::splice`]. When the
    /// session has an [`crate::IncomingTap`] and somebody watches, the bytes are
    /// copied to it on the way.
    pub fn splice<S: LocalStream>(self, stream: S) -> impl Future<Output = ()> + Send + use<S> {
        let tapped = match &self.inner.shared.options.incoming_tap {
            Some(tap) => tap.wrap(stream, self.peer),
            None => Err(stream),
        };
        match tapped {
            Ok(tapped) => futures::future::Either::Left(self.inner.splice(tapped)),
            Err(stream) => futures::future::Either::Right(self.inner.splice(stream)),
        }
    }
}

/// A UDP flow the agent opened from the target ([`Session::connect_udp`]): one
/// socket in the target, connected to one remote address.
///
/// The flow ends when it is dropped, when the agent closes it, or when the link
/// ends; [`OutgoingUdp::recv`] then returns `None`.
pub struct OutgoingUdp {
    shared: Arc<Shared>,
    conn: ConnectionId,
    local: SocketAddr,
    events: ConnEvents,
    closed: bool,
}

impl std::fmt::Debug for OutgoingUdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutgoingUdp")
            .field("conn", &self.conn)
            .field("local", &self.local)
            .finish()
    }
}

impl OutgoingUdp {
    /// The flow's local address in the target.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Sends one datagram (at most `graft_protocol::codec::MAX_CHUNK_LEN` bytes)
    /// from the target.
    ///
    /// # Errors
    ///
    /// [`ProxyError::LinkClosed`] when the link is gone.
    pub async fn send(&self, datagram: &[u8]) -> Result<(), ProxyError> {
        self.shared
            .send(ClientMessage::Data {
                conn: self.conn,
                bytes: datagram.to_vec(),
            })
            .await
    }

    /// The next datagram the target's socket received, or `None` once the flow has
    /// ended.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a datagram is never lost by cancelling.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        if self.closed {
            return None;
        }
        loop {
            match self.events.recv().await {
                Some(ConnEvent::Data(bytes)) => return Some(bytes),
                // UDP is not flow-controlled and has no half-close.
                Some(ConnEvent::Shutdown | ConnEvent::Credit(_)) => {}
                Some(ConnEvent::Close { .. }) | None => {
                    self.closed = true;
                    return None;
                }
            }
        }
    }
}

impl Drop for OutgoingUdp {
    fn drop(&mut self) {
        self.shared.forget(self.conn);
        if !self.closed {
            self.shared.close_soon(self.conn, false);
        }
    }
}

impl Session {
    /// Opens a TCP connection to `remote` from the target's network namespace.
    ///
    /// # Errors
    ///
    /// [`ProxyError::Connect`] with the `errno` the target's `connect` returned
    /// (`ECONNREFUSED`, `ENETUNREACH`, `ETIMEDOUT`, ...), or with `ECONNABORTED`
    /// when the link ended first.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a connection the agent opens after cancellation stays open
    /// until the session ends.
    pub async fn connect_tcp(&self, remote: SocketAddr) -> Result<OutgoingTcp, ProxyError> {
        let (conn, local, events) = self.opened(remote, Transport::Tcp).await?;
        Ok(OutgoingTcp {
            inner: Unspliced {
                shared: self.shared().clone(),
                conn,
                events: Some(events),
            },
            local,
        })
    }

    /// Opens a UDP flow to `remote` from the target's network namespace.
    ///
    /// # Errors
    ///
    /// As [`Session::connect_tcp`].
    pub async fn connect_udp(&self, remote: SocketAddr) -> Result<OutgoingUdp, ProxyError> {
        let (conn, local, events) = self.opened(remote, Transport::Udp).await?;
        Ok(OutgoingUdp {
            shared: self.shared().clone(),
            conn,
            local,
            events,
            closed: false,
        })
    }

    async fn opened(
        &self,
        remote: SocketAddr,
        transport: Transport,
    ) -> Result<(ConnectionId, SocketAddr, ConnEvents), ProxyError> {
        self.shared()
            .open(remote, transport)
            .await
            .map_err(|(errno, message)| ProxyError::Connect {
                remote,
                errno,
                message,
            })
    }

    /// Subscribes `port` of the target with the session's mode and filter
    /// ([`crate::SessionOptions`]) and sends its connections to `delivery`. A
    /// second call for the same port replaces the delivery. With `--all-pods`
    /// secondaries, each of them subscribes the port too.
    ///
    /// # Errors
    ///
    /// [`ProxyError::Subscribe`] with the agent's reason (the port is taken by
    /// another session, a rule could not be installed, a bad filter), or
    /// [`ProxyError::LinkClosed`].
    pub async fn steal(&self, port: u16, delivery: Delivery) -> Result<(), ProxyError> {
        self.shared()
            .listen(port, delivery, crate::session::API_OWNER)
            .await
            .map_err(|(errno, message)| {
                if errno == libc::ECONNABORTED {
                    self.shared().gone()
                } else {
                    ProxyError::Subscribe { port, message }
                }
            })
    }

    /// Ends the subscription of `port` made with [`Session::steal`]; the target
    /// serves the port itself again. Connections already delivered go on.
    pub async fn release(&self, port: u16) {
        self.shared()
            .unlisten(port, crate::session::API_OWNER)
            .await;
    }
}

/// Wraps a connection of the link for [`Delivery::Channel`].
pub(crate) fn incoming(
    shared: Arc<Shared>,
    conn: ConnectionId,
    port: u16,
    peer: DeliveredPeer,
    events: ConnEvents,
) -> IncomingTcp {
    IncomingTcp {
        inner: Unspliced {
            shared,
            conn,
            events: Some(events),
        },
        port,
        peer,
    }
}
