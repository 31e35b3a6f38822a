//! The hub's owner ends: how the hub passes to another agent without resetting
//! the connections the owner relays for other sessions, and without a moment in
//! which new connections are refused or reach the target unfiltered.
//!
//! The owner relays some connections of other sessions itself: every
//! connection of a filtered port (it routes each request), requests it delivers
//! to a peer through a socket pair, connections it passes through to the target
//! with a copy for a mirroring peer. Those live in the owner's process, so they
//! cannot move; they drain instead. When the owner's session ends normally
//! (its link closed), [`crate::incoming::peer::Access::close`] withdraws the
//! hub key and closes the hub's socket, and [`Handover::run`] then:
//!
//! 1. tells every peer [`FromHub::Handover`]; each peer elects or joins the next
//!    hub, subscribes there, and answers [`ToHub::Moved`]. The next hub keeps
//!    those subscriptions *staged* (no rules), while this hub's rules, with every
//!    peer's subscriptions, still catch each new connection and deliver it on
//!    the old links;
//! 2. once every peer has moved (at most [`MOVE_WAIT`]) tells them
//!    [`FromHub::Release`]: the next owner installs its rules and answers
//!    [`ToHub::Live`], the others answer at once (at most [`LIVE_WAIT`]). Whichever
//!    order the kernel evaluates two owners' `nat` chains in, both route every
//!    session's subscriptions, so no connection goes astray;
//! 3. retires this hub's rules: new connections reach the next owner;
//! 4. relays what it holds until every connection ends, at most [`DRAIN_MAX`],
//!    keeping its links to the peers (a keep-alive connection's next request may
//!    still be delivered over them) and its conntrack hold (the connections it
//!    relays were redirected to its listeners: their NAT must stay on);
//! 5. closes the links; the agent exits and the kernel removes what is left of
//!    its rules.
//!
//! A stop signal during any of this (the agent's pod deleted, SIGTERM or
//! SIGINT) ends the agent at once, and a `kill -9` of the owner ends it without
//! any of this: the peers see the link end, take over as before, and the
//! connections the owner relayed are reset. Either way every rule still dies
//! with the agent.

use std::sync::Arc;
use std::time::Duration;

use super::key::ConntrackHold;
use super::{FromHub, Peers};
use crate::incoming::Hub;

/// How long the peers may take to move their subscriptions to the next hub.
pub const MOVE_WAIT: Duration = Duration::from_secs(10);
/// How long the next owner may take to install its rules.
pub const LIVE_WAIT: Duration = Duration::from_secs(10);
/// The longest an ended owner relays the connections it holds for others.
pub const DRAIN_MAX: Duration = Duration::from_secs(600);

/// An ended owner's hub, to hand over and drain ([`Handover::run`]). Dropping it
/// instead ends everything at once: the peers see their links end and take over
/// the old way, and the connections it relays are reset.
pub struct Handover {
    pub(super) hub: Arc<Hub>,
    pub(super) peers: Arc<Peers>,
    pub(super) conntrack: Option<ConntrackHold>,
}

impl Handover {
    /// How many peer agents take the hub over.
    pub fn peers(&self) -> usize {
        self.peers.len()
    }

    /// Hands the hub over and relays what it holds until it ends (see the
    /// module docs); returns when the agent may exit.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future at any point is safe: what is left ends as if the
    /// [`Handover`] had been dropped.
    pub async fn run(self) {
        let Handover {
            hub,
            peers,
            conntrack,
        } = self;
        tracing::info!(peers = peers.len(), "handing the target's hub over");
        peers.tell_all(&FromHub::Handover).await;
        if !peers.wait_all(MOVE_WAIT, |p| p.moved).await {
            tracing::warn!(
                "some peer agents did not move to the next hub within {} s; handing over anyway",
                MOVE_WAIT.as_secs()
            );
        }
        peers.tell_all(&FromHub::Release).await;
        if !peers.wait_all(LIVE_WAIT, |p| p.live).await {
            tracing::warn!(
                "the next hub did not report its rules within {} s; retiring ours anyway",
                LIVE_WAIT.as_secs()
            );
        }
        hub.retire_rules().await;
        let held = hub.in_flight();
        if held > 0 {
            tracing::info!(
                connections = held,
                "the hub is handed over; relaying the connections it holds until they end \
                 (at most {} s)",
                DRAIN_MAX.as_secs()
            );
        }
        let left = hub.drain(DRAIN_MAX).await;
        if left > 0 {
            tracing::warn!(
                connections = left,
                "connections still relayed after {} s are reset",
                DRAIN_MAX.as_secs()
            );
        }
        peers.close_all();
        drop(conntrack);
        tracing::info!("hub handed over; every connection it held has ended");
    }
}
