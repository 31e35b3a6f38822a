//! Every message that crosses a process boundary in graft, and its framing.
//!
//! There are two links, each a stream of length-prefixed frames (see [`codec`]):
//!
//! - the **link** between the local end of a session (the CLI and its proxy) and the
//!   agent beside the target: [`link::ClientMessage`] flows to the agent,
//!   [`link::AgentMessage`] flows back. It is multiplexed: many connections and
//!   requests share it, told apart by [`ConnectionId`] and [`RequestId`].
//! - the **layer link** between each thread of the user's process (the layer) and
//!   the proxy: [`layer::LayerRequest`] / [`layer::LayerResponse`], strictly one
//!   request then one response, so no ids are needed.
//!
//! Operations that the agent performs for the layer unchanged (name resolution,
//! files, environment) are one shared vocabulary, [`remote`], carried by both links.
//!
//! Both links open with a version handshake ([`version`]): a peer whose version is
//! not compatible is refused with a message naming both versions.
//!
//! This crate does no I/O of its own beyond encoding and decoding frames, except
//! in its optional link pieces: `relink`, `tls` and `fdpass` (descriptor passing
//! for local targets).

pub mod codec;
#[cfg(feature = "credit")]
pub mod credit;
#[cfg(feature = "fdpass")]
pub mod fdpass;
pub mod incoming;
pub mod layer;
pub mod link;
#[cfg(feature = "relink")]
pub mod relink;
pub mod remote;
pub mod secret;
#[cfg(feature = "tls")]
pub mod tls;
pub mod version;

pub use codec::{FrameError, MAX_FRAME_LEN};
pub use version::{PROTOCOL_VERSION, VersionError};

/// Identifies one connection or UDP flow on a link.
///
/// Connections the client opens (outgoing) take ids below [`ConnectionId::AGENT_BIT`];
/// connections the agent opens (stolen incoming ones) take ids with that bit set, so
/// the two sides never pick the same id.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ConnectionId(pub u64);

impl ConnectionId {
    /// The bit set in every id the agent allocates.
    pub const AGENT_BIT: u64 = 1 << 63;

    /// Whether the agent allocated this id (an incoming, stolen connection).
    pub fn is_from_agent(self) -> bool {
        self.0 & Self::AGENT_BIT != 0
    }
}

impl std::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_from_agent() {
            write!(f, "in#{}", self.0 & !Self::AGENT_BIT)
        } else {
            write!(f, "out#{}", self.0)
        }
    }
}

/// Identifies one request on a link; the response carries the same id.
pub type RequestId = u64;

/// The transport of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Transport {
    /// A TCP stream: `Data` frames are byte ranges of the stream.
    Tcp,
    /// A connected UDP flow: each `Data` frame is one datagram.
    Udp,
}
