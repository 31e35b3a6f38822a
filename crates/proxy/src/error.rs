//! The proxy's errors ([`ProxyError`]) and the reasons a link ends ([`LinkEnd`]).

use std::{path::PathBuf, time::Duration};

use graft_protocol::{FrameError, VersionError};

/// Why a session's link to the agent ended. [`crate::Session::closed`] resolves with
/// it, and requests that were in flight fail with [`ProxyError::LinkClosed`] carrying
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkEnd {
    /// This side closed the session ([`crate::Session::close`] or drop).
    Closed,
    /// The agent closed the link (it exited, or was killed).
    AgentClosed,
    /// No frame at all arrived from the agent for this long.
    Timeout(Duration),
    /// The agent reported a fatal error and closed the link.
    Fatal(String),
    /// Reading or writing the link failed, or the agent sent a malformed frame.
    Broken(String),
}

impl std::fmt::Display for LinkEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkEnd::Closed => f.write_str("the session was closed"),
            LinkEnd::AgentClosed => f.write_str("the agent closed the link"),
            LinkEnd::Timeout(after) => {
                write!(f, "no answer from the agent for {} s", after.as_secs())
            }
            LinkEnd::Fatal(message) => write!(f, "the agent failed: {message}"),
            LinkEnd::Broken(message) => write!(f, "the link broke: {message}"),
        }
    }
}

/// What can go wrong in the local end of a session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The agent refused the session (wrong secret, incompatible version, target
    /// gone); `reason` is the agent's own message and says what to do.
    #[error("the agent refused the session: {reason}")]
    Rejected {
        /// The agent's reason.
        reason: String,
    },
    /// The agent speaks a protocol version this build cannot talk to; the message
    /// names both versions.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// The agent did not answer the handshake in time.
    #[error(
        "the agent did not answer the handshake within {} s; check that it is running \
         and listening where graft connects",
        .0.as_secs()
    )]
    HandshakeTimeout(Duration),
    /// The agent answered the handshake with something other than a `Hello`, or
    /// closed the link without an answer.
    #[error("the handshake with the agent failed: {0}")]
    Handshake(String),
    /// The link failed during the handshake.
    #[error("the link to the agent failed during the handshake: {0}")]
    Frame(FrameError),
    /// The link to the agent is gone; nothing more can be sent on it.
    #[error("the link to the agent is gone: {0}")]
    LinkClosed(LinkEnd),
    /// The target could not open an outgoing connection ([`crate::Session::connect_tcp`],
    /// [`crate::Session::connect_udp`]).
    #[error("{message}")]
    Connect {
        /// Where the connection was to go.
        remote: std::net::SocketAddr,
        /// The `errno` of the target's `connect` (`ECONNABORTED` when the link ended).
        errno: i32,
        /// What failed, in words.
        message: String,
    },
    /// The agent refused to subscribe a port ([`crate::Session::steal`]).
    #[error("port {port}: {message}")]
    Subscribe {
        /// The target's port.
        port: u16,
        /// The agent's reason (taken by another session, a rule it could not install).
        message: String,
    },
    /// The layer socket could not be bound.
    #[error("cannot listen for the layer on {}: {error}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
}

impl From<FrameError> for ProxyError {
    fn from(e: FrameError) -> ProxyError {
        ProxyError::Frame(e)
    }
}

impl ProxyError {
    /// Whether the agent refused the session.
    pub fn is_rejected(&self) -> bool {
        matches!(self, ProxyError::Rejected { .. })
    }

    /// Whether the request failed because the link to the agent is gone.
    pub fn is_link_closed(&self) -> bool {
        matches!(self, ProxyError::LinkClosed(_))
    }
}
