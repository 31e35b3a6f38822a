//! The layer link: the layer in the user's process talks to the proxy.
//!
//! Each thread of the user's process opens its own Unix-socket connection to the
//! proxy (path in the `GRAFT_LAYER_SOCKET` environment variable) and starts it with
//! [`LayerRequest::Hello`]. After that the layer sends one request and blocks for
//! its one response; requests on different connections are independent.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{
    Transport,
    remote::{RemoteRequest, RemoteResponse},
};

/// The environment variable that carries the proxy's Unix socket path to the layer.
pub const SOCKET_ENV: &str = "GRAFT_LAYER_SOCKET";

/// The environment variable that carries the layer's configuration (JSON of
/// `graft_config::LayerConfig`).
pub const CONFIG_ENV: &str = "GRAFT_LAYER_CONFIG";

/// A request from the layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerRequest {
    /// First message on every connection. Answered with [`LayerResponse::Hello`] or
    /// [`LayerResponse::Error`] (incompatible version).
    Hello {
        /// The layer's protocol version ([`crate::PROTOCOL_VERSION`]).
        version: String,
        /// The process the layer is loaded into.
        pid: u32,
    },
    /// An operation the agent performs unchanged. Answered with
    /// [`LayerResponse::Remote`].
    Remote(RemoteRequest),
    /// The program listens on `deliver_to` (a local address, the one its socket is
    /// really bound to) and wants the target's incoming TCP traffic to `port` there.
    /// Answered with [`LayerResponse::Ok`] or [`LayerResponse::Error`] (for example
    /// the port is already stolen).
    Listen {
        /// The target's port whose traffic is wanted (after `--port-map`).
        port: u16,
        /// Where the proxy connects to hand over each stolen connection.
        deliver_to: SocketAddr,
        /// The listening process, so the proxy can drop the subscription when it exits.
        pid: u32,
    },
    /// The program closed the listening socket for `port`. Answered with
    /// [`LayerResponse::Ok`].
    Unlisten {
        /// The target's port.
        port: u16,
        /// The process that closed it.
        pid: u32,
    },
    /// The program accepted a connection whose peer address is `proxy_side`, the
    /// proxy's own end of a delivered connection. Answered with
    /// [`LayerResponse::Peer`]: the real client's address as the target saw it, and
    /// the address it connected to.
    PeerOf {
        /// The accepted socket's peer address as the kernel reports it.
        proxy_side: SocketAddr,
    },
    /// Open an outgoing connection (TCP) or flow (UDP) from the target to `remote`.
    /// Answered with [`LayerResponse::Connected`] or [`LayerResponse::Error`] with the
    /// `errno` of the failed remote `connect`.
    Connect {
        /// The destination the program asked for.
        remote: SocketAddr,
        /// TCP or UDP.
        transport: Transport,
    },
    /// As [`LayerRequest::PeerOf`] on a connection that passes descriptors, from
    /// a process that alone accepts on its listener: besides the connection
    /// asked for, the proxy may pass up to `more` other stolen connections of the
    /// same port whose loopback connections already wait in the listener's
    /// queue, so their `accept`s need no round trip. Answered with
    /// [`LayerResponse::PeerFds`] (the asked connection first, its socket the
    /// first descriptor beside the frame; at most
    /// [`crate::fdpass::MAX_FDS_PER_SEND`] in all), else as `PeerOf`.
    PeerOfBatch {
        /// The accepted socket's peer address as the kernel reports it.
        proxy_side: SocketAddr,
        /// How many other connections the layer can take now.
        more: u8,
    },
    /// Stolen connections a [`LayerResponse::PeerFds`] passed ahead that this
    /// process will not accept (it is about to `fork` or `exec`): their sockets
    /// travel beside this frame, in this order, and the proxy keeps them for
    /// whichever process accepts their loopback connections. At most
    /// [`crate::fdpass::MAX_FDS_PER_SEND`]. Answered with [`LayerResponse::Ok`].
    ReturnPassed(Vec<PassedPeer>),
    /// The program waits on the direct listener of `port`
    /// ([`LayerResponse::ListenDirect`]) in an `epoll` set or `poll`: the
    /// agent leaves its connections to the program. Answered with
    /// [`LayerResponse::Ok`].
    DirectAttached {
        /// The target's port.
        port: u16,
    },
}

/// The proxy's answer to one [`LayerRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerResponse {
    /// The handshake succeeded.
    Hello {
        /// The proxy's protocol version.
        version: String,
    },
    /// The answer to a [`LayerRequest::Remote`].
    Remote(RemoteResponse),
    /// Done, nothing to return.
    Ok,
    /// The answer to [`LayerRequest::PeerOf`]; `None` when the proxy delivered no
    /// connection from that address (the connection is a local one).
    Peer(Option<DeliveredPeer>),
    /// The outgoing connection is open on the target side.
    Connected {
        /// Where the program's socket must really connect (TCP) or send (UDP): a
        /// loopback address of the proxy that relays to the target-side socket.
        relay: SocketAddr,
        /// The target-side socket's local address, for `getsockname`.
        local: SocketAddr,
    },
    /// The request failed.
    Error {
        /// The Linux `errno` to return to the program.
        errno: i32,
        /// What failed, for the log.
        message: String,
    },
    /// The answer to [`LayerRequest::PeerOf`] on a connection that passes
    /// descriptors, for a stolen connection the agent passed as its socket: the
    /// socket travels beside this frame, and the layer puts it at the accepted
    /// descriptor's number in place of the proxy's loopback connection.
    PeerFd(DeliveredPeer),
    /// The answer to [`LayerRequest::PeerOfBatch`] for a passed stolen
    /// connection: one entry per descriptor beside the frame, in order, the
    /// connection asked for first.
    PeerFds(Vec<PassedPeer>),
    /// The answer to [`LayerRequest::Listen`] on a connection that passes
    /// descriptors when the agent redirects the port to a listener of its own
    /// in the target's network namespace for this session alone: those
    /// listening sockets (IPv4, then IPv6 when the port has one) travel
    /// beside this frame, and the program accepts
    /// the stolen connections from it as well as from its own listener (see
    /// `graft_protocol::link::AgentMessage::DirectListener`). Otherwise as
    /// [`LayerResponse::Ok`].
    ListenDirect,
}

/// A stolen connection passed as its socket, named by the proxy's loopback
/// connection that stands for it in the program's listener queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassedPeer {
    /// The proxy's end of the loopback connection (the accepted socket's peer).
    pub proxy_side: SocketAddr,
    /// The target's stolen port.
    pub port: u16,
    /// The connection's addresses as the target saw them.
    pub delivered: DeliveredPeer,
}

/// The addresses of a delivered (stolen) connection as the target saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredPeer {
    /// The client's address.
    pub peer: SocketAddr,
    /// The target address the client connected to.
    pub local: SocketAddr,
}
