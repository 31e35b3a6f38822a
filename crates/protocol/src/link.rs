//! The link between the local end of a session (CLI + proxy, "the client") and the
//! agent beside the target.
//!
//! # Session
//!
//! 1. The client sends [`ClientMessage::Hello`]; the agent answers
//!    [`AgentMessage::Hello`] with [`HelloReply::Accepted`], or
//!    [`HelloReply::Rejected`] and closes the link (incompatible version, wrong
//!    session secret, target gone).
//! 2. Any number of requests, steals and connections, interleaved.
//! 3. Either side closes the link; the agent then removes every packet rule it
//!    installed, closes every connection, and exits.
//!
//! # Connections
//!
//! A connection (TCP) or flow (UDP) is opened by [`ClientMessage::Connect`]
//! (outgoing, answered by [`AgentMessage::Connected`] or
//! [`AgentMessage::ConnectFailed`]) or announced by [`AgentMessage::Incoming`]
//! (a stolen incoming connection). After that both sides send
//! [`ClientMessage::Data`] / [`AgentMessage::Data`] (a byte range of the stream, or
//! one datagram for UDP), then [`ClientMessage::Shutdown`] / [`AgentMessage::Shutdown`]
//! when their side has no more to send (TCP half-close), and
//! [`ClientMessage::Close`] / [`AgentMessage::Close`] when the connection is gone
//! for good (`reset` when it ended with an RST, so the other side resets too).
//! A side that receives `Close` sends no more about that connection.
//!
//! # Flow control
//!
//! Each side may have at most [`TCP_WINDOW`] bytes of `Data` of one TCP
//! connection in flight: sent, and not yet written to the socket by the other
//! side. The receiver gives the bytes back with [`ClientMessage::Credit`] /
//! [`AgentMessage::Credit`] as its socket takes them, in batches of
//! [`CREDIT_BATCH`] bytes or more; since a batch is smaller than the window, a
//! sender never waits for credit that a draining receiver still holds back. A
//! program that stops reading thus stops the other side's socket reads instead
//! of filling memory. UDP flows are not flow-controlled: a
//! datagram that cannot be delivered is dropped, as UDP allows.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::incoming::{RoutedRequest, Subscription, TlsTermination};

/// The most bytes of one TCP connection's `Data` a side may have in flight.
pub const TCP_WINDOW: u32 = 4 * 1024 * 1024;
/// A receiver returns credit in batches of at least this many bytes.
pub const CREDIT_BATCH: u32 = 256 * 1024;
use crate::{
    ConnectionId, RequestId, Transport,
    remote::{RemoteRequest, RemoteResponse},
};

/// First message of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's protocol version ([`crate::PROTOCOL_VERSION`]).
    pub version: String,
    /// The per-session secret the agent was started with; the agent refuses a
    /// client that does not present it.
    pub secret: String,
    /// Who runs the session (user@host), for messages and session listings.
    pub client: String,
}

/// The agent's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// The session is open.
    Accepted {
        /// The agent's protocol version.
        version: String,
        /// The target process, as the agent sees it.
        target_pid: u32,
    },
    /// The session is refused; the agent closes the link after this message.
    Rejected {
        /// Why, and what to do.
        reason: String,
    },
}

/// A message from the client to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Opens the session; must be first.
    Hello(Hello),
    /// A remote operation; answered by [`AgentMessage::Response`] with the same id.
    Request {
        /// Chosen by the client, unique among its requests in flight.
        id: RequestId,
        /// The operation.
        request: RemoteRequest,
    },
    /// Steal or mirror incoming TCP connections (or HTTP requests) to a port of
    /// the target (IPv4 and IPv6). Answered by [`AgentMessage::SubscribeResult`].
    /// A session has at most one subscription per port; a second one replaces
    /// the first.
    Subscribe(Subscription),
    /// Drop the subscription of `port`; the agent stops delivering at once and
    /// removes the port's packet rules when no session holds it any more.
    Unsubscribe {
        /// The target's port.
        port: u16,
    },
    /// Open a connection from the target's network namespace to `remote`.
    Connect {
        /// Chosen by the client, below [`ConnectionId::AGENT_BIT`].
        conn: ConnectionId,
        /// The destination.
        remote: SocketAddr,
        /// TCP or UDP.
        transport: Transport,
    },
    /// Bytes for the target-side socket of `conn`.
    Data {
        /// The connection.
        conn: ConnectionId,
        /// At most [`crate::codec::MAX_CHUNK_LEN`] bytes (TCP) or one datagram (UDP).
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The client's side of `conn` will send no more bytes (TCP `shutdown(SHUT_WR)`).
    Shutdown {
        /// The connection.
        conn: ConnectionId,
    },
    /// `conn` is gone; `reset` makes the agent abort its socket with an RST.
    Close {
        /// The connection.
        conn: ConnectionId,
        /// Abort with an RST rather than a FIN.
        reset: bool,
    },
    /// Liveness check; answered by [`AgentMessage::Pong`] with the same number.
    Ping(u64),
    /// The client wrote `bytes` more of `conn`'s data to its socket: the agent
    /// may send that much more (see the module docs, "Flow control").
    Credit {
        /// The connection.
        conn: ConnectionId,
        /// How many bytes.
        bytes: u32,
    },
    /// [`ClientMessage::Subscribe`] of a filtered port that serves HTTPS: the
    /// agent terminates TLS with `tls` (since protocol
    /// [`crate::incoming::TLS_STEAL_SINCE`]). Answered by
    /// [`AgentMessage::SubscribeResult`].
    SubscribeTls {
        /// What is asked.
        subscription: Subscription,
        /// The certificate, key and choices of the termination.
        tls: TlsTermination,
    },
    /// [`ClientMessage::Subscribe`] of an unfiltered steal whose connections the
    /// client takes as descriptors, on a link that passes them (a local target,
    /// both peers naming [`crate::version::FEATURE_FDS`]): each whole stolen
    /// connection the agent alone takes comes as [`AgentMessage::IncomingFd`]
    /// with the accepted socket beside it; one the agent must read (a mirror of
    /// the same port in another session) comes as [`AgentMessage::Incoming`].
    /// On a link that passes no descriptors it is [`ClientMessage::Subscribe`].
    /// A filtered steal may be subscribed this way too: each client connection
    /// that has requests for this session then comes as
    /// [`AgentMessage::IncomingFd`] with one end of a loopback TCP pair beside
    /// it, and the agent writes the requests the filter matched to the other
    /// end (an agent that does not know this relays them as before).
    /// Answered by [`AgentMessage::SubscribeResult`].
    SubscribeFds(Subscription),
    /// Start (`true`) or stop sending [`AgentMessage::Routed`] records of the
    /// requests of this session's filtered ports that went elsewhere. Sent only
    /// to an agent whose `Hello` version names
    /// [`crate::version::FEATURE_ROUTES`]; off at the start of a session.
    WatchRoutes(bool),
    /// The program waits for connections on the listener of
    /// [`AgentMessage::DirectListener`] for `port` (its `epoll` set or `poll`
    /// holds it): the agent stops taking that listener's connections as they
    /// come and takes only those left waiting (see
    /// [`AgentMessage::DirectListener`]). Sent only to an agent whose `Hello`
    /// version names [`crate::version::FEATURE_DIRECT`].
    DirectAttached {
        /// The stolen port.
        port: u16,
    },
    /// Somebody starts (`paused`) or stops watching the session's traffic (the
    /// inspector): while paused, the agent redirects none of the session's
    /// ports to a direct listener, so every stolen connection passes graft.
    /// Answered with [`AgentMessage::DirectPaused`] carrying `seq` once the
    /// redirects follow. Sent only to an agent whose `Hello` version names
    /// [`crate::version::FEATURE_DIRECT`].
    PauseDirect {
        /// Whether direct listeners are paused.
        paused: bool,
        /// Echoed by the answer.
        seq: u64,
    },
}

/// A message from the agent to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// The answer to [`ClientMessage::Hello`].
    Hello(HelloReply),
    /// The answer to [`ClientMessage::Request`].
    Response {
        /// The request's id.
        id: RequestId,
        /// The answer.
        response: RemoteResponse,
    },
    /// The answer to [`ClientMessage::Subscribe`].
    SubscribeResult {
        /// The port asked for.
        port: u16,
        /// `None` on success, else what failed and what to do (e.g. the port is
        /// already stolen by another session, named with its user and start).
        error: Option<crate::incoming::SubscribeError>,
    },
    /// The answer to a successful [`ClientMessage::Connect`].
    Connected {
        /// The connection.
        conn: ConnectionId,
        /// The target-side socket's local address.
        local: SocketAddr,
    },
    /// The answer to a failed [`ClientMessage::Connect`].
    ConnectFailed {
        /// The connection.
        conn: ConnectionId,
        /// The Linux `errno` of the failed `connect`.
        errno: i32,
    },
    /// An incoming connection for a subscription: a stolen connection, a
    /// connection that carries stolen HTTP requests, or a mirrored copy (whose
    /// answers the agent reads and drops).
    Incoming {
        /// Chosen by the agent, with [`ConnectionId::AGENT_BIT`] set.
        conn: ConnectionId,
        /// The stolen port (the client's original destination port).
        port: u16,
        /// The client's address.
        peer: SocketAddr,
        /// The original destination the client connected to.
        local: SocketAddr,
    },
    /// Bytes that arrived on the target-side socket of `conn`.
    Data {
        /// The connection.
        conn: ConnectionId,
        /// At most [`crate::codec::MAX_CHUNK_LEN`] bytes (TCP) or one datagram (UDP).
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The target-side peer of `conn` sent FIN: no more bytes will come.
    Shutdown {
        /// The connection.
        conn: ConnectionId,
    },
    /// `conn` is gone; `reset` when the target side saw an RST or an error.
    Close {
        /// The connection.
        conn: ConnectionId,
        /// It ended with an RST or error rather than an orderly close.
        reset: bool,
    },
    /// The answer to [`ClientMessage::Ping`].
    Pong(u64),
    /// A fatal error; the agent closes the link after this message.
    Fatal {
        /// What failed, and what to do.
        message: String,
    },
    /// The agent wrote `bytes` more of `conn`'s data to its socket: the client
    /// may send that much more (see the module docs, "Flow control").
    Credit {
        /// The connection.
        conn: ConnectionId,
        /// How many bytes.
        bytes: u32,
    },
    /// A stolen connection of a [`ClientMessage::SubscribeFds`] port, passed as
    /// the accepted socket itself, which travels beside this frame
    /// ([`crate::fdpass`]). The agent keeps nothing of it. Under a filter, the
    /// socket is one end of a loopback pair whose other end the agent writes
    /// the matching requests of the client at `peer` to.
    IncomingFd {
        /// The stolen port (the client's original destination port).
        port: u16,
        /// The client's address.
        peer: SocketAddr,
        /// The original destination the client connected to.
        local: SocketAddr,
    },
    /// A request of a filtered port of this session that went to the target or
    /// to another session, while the session watches its routes
    /// ([`ClientMessage::WatchRoutes`]). Best effort: dropped when the link is
    /// busy.
    Routed(Box<RoutedRequest>),
    /// A listener in the target's network namespace that the stolen `port` of
    /// a [`ClientMessage::SubscribeFds`] unfiltered steal is redirected to,
    /// while this session alone subscribes the port; the listening socket
    /// travels beside this frame. The client's program accepts the stolen
    /// connections from it itself, with no hand-over. The agent keeps taking
    /// the connections nobody accepts (all of them until
    /// [`ClientMessage::DirectAttached`], then those left waiting) and hands
    /// them over as [`AgentMessage::IncomingFd`]. When another subscription
    /// joins the port, the redirect goes back to the agent's own listener and
    /// this one receives nothing new. Sent only to a client whose `Hello`
    /// version names [`crate::version::FEATURE_DIRECT`].
    DirectListener {
        /// The stolen port.
        port: u16,
    },
    /// The answer to [`ClientMessage::PauseDirect`]: the session's redirects
    /// follow it now.
    DirectPaused {
        /// The request's `seq`.
        seq: u64,
    },
    /// The IPv6 listener of `port`'s direct listener, right after its
    /// [`AgentMessage::DirectListener`] (the IPv4 one): IPv6-only, the
    /// destination of the port's IPv6 redirect, accepted from as one with
    /// it. The listening socket travels beside this frame. Sent only to a
    /// client whose `Hello` version names
    /// [`crate::version::FEATURE_DIRECT6`].
    DirectListener6 {
        /// The stolen port.
        port: u16,
    },
}
