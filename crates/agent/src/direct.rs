//! Direct listeners: while one session alone steals a port without a filter
//! and takes descriptors (a local target), the port is redirected to a
//! listener of its own in the target's network namespace, and that listening
//! socket is passed to the session's program, which accepts the stolen
//! connections from it itself: no accept by the agent, no hand-over through
//! the proxy, no loopback connection per stolen connection. Each family has
//! its listener: IPv4, and IPv6-only (bound on `[::]`) where the program's
//! client takes it ([`graft_protocol::version::FEATURE_DIRECT6`]) and the
//! namespace has IPv6; the program watches the pair as its one listener.
//!
//! The agent keeps its own descriptor of the listener and takes the
//! connections nobody else takes, so that none waits on a program that does
//! not watch the listener (one that waits in `select`, or execs):
//!
//! - *eager* (until the program's layer says it watches the listener,
//!   `ClientMessage::DirectAttached`): the agent accepts every connection as
//!   it comes and hands it over as it does from its shared listener;
//! - *lazy* (after): every [`LAZY_TICK`] the agent looks whether a connection
//!   waits, and takes what still waits one tick later. A program that accepts
//!   within a tick never races the agent; one that does not loses at most two
//!   ticks.
//!
//! Either path delivers the connection to the same program, so the race
//! between them is harmless. When another subscription joins the port, the
//! redirect goes back to the shared listener and this one turns eager for what
//! was already queued. When the port is released, the agent shuts the
//! listener down before it removes the redirect ([`DirectListener::stop`]):
//! `shutdown(2)` on a listening socket stops it listening for every
//! descriptor of it, the program's too, and resets what waits in its queue,
//! so nothing keeps listening in the target's namespace after the session.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket as nixsock;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

use crate::rules::Family;
use crate::steal::{Accepted, accepted};

/// How often a lazy direct listener is looked at, and so how long a
/// connection nobody accepts waits at most before the agent takes it (two
/// ticks).
pub const LAZY_TICK: Duration = Duration::from_millis(20);

/// Who a direct listener is for: the hub owner id of the subscription whose
/// program holds it, and whether that program takes an IPv6 listener too
/// (its client named [`graft_protocol::version::FEATURE_DIRECT6`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectFor {
    /// The subscription's owner.
    pub owner: u64,
    /// Whether the port's IPv6 connections get a direct listener too.
    pub ipv6: bool,
}

/// A direct listener of one stolen port: an IPv4 listener, and an IPv6-only
/// one where the program takes it and the namespace has IPv6.
#[derive(Debug)]
pub struct DirectListener {
    /// Whom it serves.
    of: DirectFor,
    /// The IPv4 listener.
    v4: Half,
    /// The IPv6-only listener, if any.
    v6: Option<Half>,
    /// The port's redirect points here (else the listener only holds what
    /// was queued before it left).
    current: Arc<AtomicBool>,
    /// Ends the accept task (one for both families).
    stop: Arc<Notify>,
}

/// One family's listener of a [`DirectListener`].
#[derive(Debug)]
struct Half {
    /// The listener's own port, the redirect's destination.
    port: u16,
    /// The agent's second descriptor of the listener, to shut it down.
    fd: OwnedFd,
}

/// What the session that steals the port gets of its direct listener.
#[derive(Debug)]
pub struct Offer {
    /// A descriptor of the IPv4 listening socket, for the program.
    pub listener: OwnedFd,
    /// A descriptor of the IPv6 one, if there is one.
    pub listener_v6: Option<OwnedFd>,
    /// Set when the program waits on the listener: while the redirect points
    /// to it, the agent turns lazy.
    pub attached: Arc<AtomicBool>,
}

impl Half {
    /// Opens `family`'s listener: it, the accept task's listener, and the
    /// program's descriptor of it.
    fn open(family: Family) -> io::Result<(Half, TcpListener, OwnedFd)> {
        let fd = crate::steal::listen_any(family)?;
        let for_program = fd.try_clone()?;
        let for_shutdown = fd.try_clone()?;
        let listener = TcpListener::from_std(std::net::TcpListener::from(fd))?;
        let port = listener.local_addr()?.port();
        tracing::debug!(port, ?family, "direct listener ready");
        Ok((
            Half {
                port,
                fd: for_shutdown,
            },
            listener,
            for_program,
        ))
    }

    /// See [`DirectListener::stop`].
    fn stop(&self) {
        let _ = nixsock::shutdown(self.fd.as_raw_fd(), nixsock::Shutdown::Both);
        tracing::debug!(port = self.port, "direct listener shut down");
    }
}

impl DirectListener {
    /// Binds a listener on `0.0.0.0:0` in this (the target's) network
    /// namespace for the program of `of`'s subscription, and with
    /// `of.ipv6` one on `[::]:0` (IPv6-only; none when IPv6 cannot be bound,
    /// logged), and starts taking their connections to `accepted`, eagerly.
    ///
    /// # Errors
    ///
    /// Creating, binding or listening on the IPv4 listener failed (`EMFILE`,
    /// ...).
    pub fn start(
        of: DirectFor,
        accepted: mpsc::Sender<Accepted>,
    ) -> io::Result<(DirectListener, Offer)> {
        let (v4, v4_listener, listener) = Half::open(Family::V4)?;
        let mut listeners = vec![(v4_listener, Family::V4)];
        let (v6, listener_v6) = match of.ipv6.then(|| Half::open(Family::V6)) {
            Some(Ok((half, v6_listener, fd))) => {
                listeners.push((v6_listener, Family::V6));
                (Some(half), Some(fd))
            }
            Some(Err(e)) => {
                tracing::debug!("no IPv6 direct listener ({e}); IPv6 connections are handed over");
                (None, None)
            }
            None => (None, None),
        };
        let current = Arc::new(AtomicBool::new(true));
        let attached = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(Notify::new());
        let task = Task {
            listeners,
            eager: Eager {
                current: current.clone(),
                attached: attached.clone(),
            },
            stop: stop.clone(),
            to_hub: accepted,
        };
        tokio::spawn(task.run());
        Ok((
            DirectListener {
                of,
                v4,
                v6,
                current,
                stop,
            },
            Offer {
                listener,
                listener_v6,
                attached,
            },
        ))
    }

    /// The listener's own ports: IPv4, and IPv6 when it has an IPv6 one.
    pub fn ports(&self) -> (u16, Option<u16>) {
        (self.v4.port, self.v6.as_ref().map(|h| h.port))
    }

    /// Whom it serves.
    pub fn of(&self) -> DirectFor {
        self.of
    }

    /// The port's redirect left this listener: the agent takes what was
    /// queued on it as it comes, and the program may still take some.
    pub fn leave(&self) {
        self.current.store(false, Ordering::SeqCst);
    }

    /// The port's redirect came back to this listener, which the program
    /// still holds.
    pub fn come_back(&self) {
        self.current.store(true, Ordering::SeqCst);
    }

    /// Shuts the listener down, for every descriptor of it (the program's
    /// too), and ends its accept task. A listening socket that is shut down
    /// stops listening (inet_shutdown in the kernel: TCP_LISTEN → TCP_CLOSE)
    /// and resets the connections still in its queue: the caller does this
    /// while the redirect still stands, since a reset sent once the NAT rule
    /// is gone leaves with the listener's port and its client never sees it
    /// (it waits until its own timeout).
    pub fn stop(&self) {
        self.current.store(false, Ordering::SeqCst);
        self.v4.stop();
        if let Some(v6) = &self.v6 {
            v6.stop();
        }
        self.stop.notify_one();
    }
}

/// When the agent takes a direct listener's connections as they come: until
/// the program waits on it, and once the redirect left it.
struct Eager {
    current: Arc<AtomicBool>,
    attached: Arc<AtomicBool>,
}

impl Eager {
    fn now(&self) -> bool {
        !(self.current.load(Ordering::SeqCst) && self.attached.load(Ordering::SeqCst))
    }
}

impl Drop for DirectListener {
    /// A hub that goes (its agent ends) shuts its direct listeners down too.
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a connection waits in `listener`'s accept queue.
fn waiting(listener: &TcpListener) -> bool {
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

/// The accept task of a direct listener: both families' listeners.
struct Task {
    listeners: Vec<(TcpListener, Family)>,
    eager: Eager,
    stop: Arc<Notify>,
    to_hub: mpsc::Sender<Accepted>,
}

impl Task {
    async fn run(self) {
        // A connection seen waiting at the last lazy look.
        let mut seen_waiting = false;
        loop {
            if self.eager.now() {
                seen_waiting = false;
                // The timeout re-reads `eager`, which the program's layer clears.
                tokio::select! {
                    (result, family) = self.accept() => match result {
                        Ok((stream, peer)) => {
                            if !self.forward(stream, peer, family).await {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::debug!("direct listener: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                    () = tokio::time::sleep(LAZY_TICK) => {}
                    () = self.stop.notified() => break,
                }
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(LAZY_TICK) => {}
                () = self.stop.notified() => break,
            }
            if !self.listeners.iter().any(|(listener, _)| waiting(listener)) {
                seen_waiting = false;
            } else if !seen_waiting {
                seen_waiting = true;
            } else {
                seen_waiting = false;
                if !self.take_waiting().await {
                    return;
                }
            }
        }
    }

    /// The next connection of either listener, with its family.
    async fn accept(&self) -> (io::Result<(tokio::net::TcpStream, SocketAddr)>, Family) {
        std::future::poll_fn(|cx| {
            for (listener, family) in &self.listeners {
                if let std::task::Poll::Ready(result) = listener.poll_accept(cx) {
                    return std::task::Poll::Ready((result, *family));
                }
            }
            std::task::Poll::Pending
        })
        .await
    }

    /// Takes every connection that waits now; `false` once the hub is gone.
    async fn take_waiting(&self) -> bool {
        for (listener, family) in &self.listeners {
            while let Some(Ok((stream, peer))) = listener.accept().now_or_never() {
                if !self.forward(stream, peer, *family).await {
                    return false;
                }
            }
        }
        true
    }

    /// Sends an accepted connection to the hub as the shared listener does;
    /// `false` once the hub is gone.
    async fn forward(
        &self,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        family: Family,
    ) -> bool {
        match accepted(stream, peer, family) {
            Some(accepted) => self.to_hub.send(accepted).await.is_ok(),
            None => true,
        }
    }
}
