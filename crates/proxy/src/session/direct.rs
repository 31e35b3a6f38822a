//! Direct listeners (`AgentMessage::DirectListener`, a local target): while
//! this session alone steals a port without a filter, the agent redirects it
//! to a listener of its own in the target's network namespace and passes that
//! listening socket here. The proxy keeps it for the port and gives the
//! program's layer a descriptor of it with the answer to its `Listen`
//! (`LayerResponse::ListenDirect`); the program then accepts the stolen
//! connections from it itself. When the layer says the program watches it
//! (`LayerRequest::DirectAttached`), the proxy tells the agent, which stops
//! taking its connections as they come.
//!
//! While somebody watches the session's traffic (the inspector), no port goes
//! to a direct listener: [`PauseHandle::set`] tells the agent, which moves the
//! redirects back to its own listener, whose connections the proxy sees.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use graft_protocol::link::ClientMessage;

use super::{Shared, lock};

/// The environment variable that turns direct listeners off (`0`), for a
/// comparison or a program they do not suit: every stolen connection is then
/// handed over by the agent.
pub const DIRECT_ENV: &str = "GRAFT_DIRECT_LISTENER";

/// Whether this process may take direct listeners (not turned off by
/// [`DIRECT_ENV`]).
pub(crate) fn wanted() -> bool {
    std::env::var(DIRECT_ENV).as_deref() != Ok("0")
}

impl Shared {
    /// Keeps the direct listener `fd` the agent passed for `port` (its IPv4
    /// listener: a new direct listener, which replaces any earlier one).
    pub(super) fn keep_direct(&self, port: u16, fd: OwnedFd) {
        tracing::debug!(port, "direct listener from the agent");
        lock(&self.direct_listeners).insert(port, vec![fd]);
    }

    /// Adds the IPv6 listener `fd` to `port`'s direct listener, which the
    /// agent passed right before it; dropped when the port has none or has
    /// one already.
    pub(super) fn keep_direct6(&self, port: u16, fd: OwnedFd) {
        let mut listeners = lock(&self.direct_listeners);
        match listeners.get_mut(&port) {
            Some(kept) if kept.len() == 1 => {
                tracing::debug!(port, "IPv6 direct listener from the agent");
                kept.push(fd);
            }
            _ => tracing::warn!(
                port,
                "the agent passed an IPv6 direct listener without its IPv4 one; dropped"
            ),
        }
    }

    /// Descriptors of `port`'s direct listener (IPv4, then IPv6 if it has
    /// one), for a layer that listens on the port; empty when the port has
    /// none or they could not be copied.
    pub(crate) fn direct_listener(&self, port: u16) -> Vec<OwnedFd> {
        let listeners = lock(&self.direct_listeners);
        let Some(fds) = listeners.get(&port) else {
            return Vec::new();
        };
        match fds.iter().map(OwnedFd::try_clone).collect() {
            Ok(copies) => copies,
            Err(e) => {
                tracing::debug!(port, "the direct listener could not be copied ({e})");
                Vec::new()
            }
        }
    }

    /// Drops `port`'s direct listener (its listener closed).
    pub(super) fn forget_direct(&self, port: u16) {
        lock(&self.direct_listeners).remove(&port);
    }

    /// Tells the agent that the program watches `port`'s direct listener.
    pub(crate) async fn direct_attached(&self, port: u16) {
        if self.direct.load(Ordering::Relaxed) && lock(&self.direct_listeners).contains_key(&port) {
            let _ = self.send(ClientMessage::DirectAttached { port }).await;
        }
    }
}

/// How long [`PauseHandle::set`] waits for the agent to move its redirects.
pub const PAUSE_WAIT: Duration = Duration::from_secs(2);

/// Pauses a session's direct listeners while somebody watches its traffic
/// ([`crate::Session::pause_handle`]).
#[derive(Clone)]
pub struct PauseHandle(pub(super) Arc<Shared>);

impl std::fmt::Debug for PauseHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PauseHandle")
    }
}

impl PauseHandle {
    /// Pauses (`true`) or resumes the session's direct listeners; returns once
    /// the agent's redirects follow, at most [`PAUSE_WAIT`] (at once where the
    /// link has no direct listeners).
    pub async fn set(&self, paused: bool) {
        let shared = &self.0;
        if !shared.direct.load(Ordering::Relaxed) {
            return;
        }
        let seq = shared.pause_seq.fetch_add(1, Ordering::SeqCst) + 1;
        let mut acked = shared.pause_acked.subscribe();
        if shared
            .send(ClientMessage::PauseDirect { paused, seq })
            .await
            .is_err()
        {
            return;
        }
        if tokio::time::timeout(PAUSE_WAIT, acked.wait_for(|&done| done >= seq))
            .await
            .is_err()
        {
            tracing::debug!(paused, "the agent did not answer PauseDirect in time");
        }
    }
}
