//! Direct listeners: while one session alone steals a port without a filter
//! and takes descriptors (a local target), the port is redirected to a
//! listener of its own in the target's network namespace, and that listening
//! socket is passed to the session's program, which accepts the stolen
//! connections from it itself: no accept by the agent, no hand-over through
//! the proxy, no loopback connection per stolen connection.
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
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
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

/// The listen backlog of a direct listener: as the shared listener's.
const BACKLOG: i32 = 1024;

/// A direct listener of one stolen port (IPv4; IPv6 connections keep the
/// shared listener).
#[derive(Debug)]
pub struct DirectListener {
    /// The hub owner id of the subscription whose program holds it.
    owner: u64,
    /// The listener's own port, the redirect's destination.
    port: u16,
    /// The port's redirect points here (else the listener only holds what
    /// was queued before it left).
    current: Arc<AtomicBool>,
    /// Ends the accept task.
    stop: Arc<Notify>,
    /// The agent's second descriptor of the listener, to shut it down.
    fd: OwnedFd,
}

/// What the session that steals the port gets of its direct listener.
#[derive(Debug)]
pub struct Offer {
    /// A descriptor of the listening socket, for the program.
    pub listener: OwnedFd,
    /// Set when the program waits on the listener: while the redirect points
    /// to it, the agent turns lazy.
    pub attached: Arc<AtomicBool>,
}

impl DirectListener {
    /// Binds a listener on `0.0.0.0:0` in this (the target's) network
    /// namespace for the program of `owner`'s subscription, and starts taking
    /// its connections to `accepted`, eagerly.
    ///
    /// # Errors
    ///
    /// Creating, binding or listening failed (`EMFILE`, ...).
    pub fn start(
        owner: u64,
        accepted: mpsc::Sender<Accepted>,
    ) -> io::Result<(DirectListener, Offer)> {
        let fd = nixsock::socket(
            nixsock::AddressFamily::Inet,
            nixsock::SockType::Stream,
            nixsock::SockFlag::SOCK_CLOEXEC | nixsock::SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        let any = nixsock::SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        nixsock::bind(fd.as_raw_fd(), &any)?;
        nixsock::listen(&fd, nixsock::Backlog::new(BACKLOG)?)?;
        let for_program = fd.try_clone()?;
        let for_shutdown = fd.try_clone()?;
        let listener = TcpListener::from_std(std::net::TcpListener::from(fd))?;
        let port = listener.local_addr()?.port();
        let current = Arc::new(AtomicBool::new(true));
        let attached = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(Notify::new());
        let eager = Eager {
            current: current.clone(),
            attached: attached.clone(),
        };
        tokio::spawn(run(listener, eager, stop.clone(), accepted));
        tracing::debug!(port, "direct listener ready");
        Ok((
            DirectListener {
                owner,
                port,
                current,
                stop,
                fd: for_shutdown,
            },
            Offer {
                listener: for_program,
                attached,
            },
        ))
    }

    /// The listener's own port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The owner of the subscription whose program holds it.
    pub fn owner(&self) -> u64 {
        self.owner
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
        let _ = nixsock::shutdown(self.fd.as_raw_fd(), nixsock::Shutdown::Both);
        self.stop.notify_one();
        tracing::debug!(port = self.port, "direct listener shut down");
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

/// The accept task of a direct listener.
async fn run(
    listener: TcpListener,
    eager: Eager,
    stop: Arc<Notify>,
    to_hub: mpsc::Sender<Accepted>,
) {
    // A connection seen waiting at the last lazy look.
    let mut seen_waiting = false;
    loop {
        if eager.now() {
            seen_waiting = false;
            // The timeout re-reads `eager`, which the program's layer clears.
            tokio::select! {
                result = listener.accept() => match result {
                    Ok((stream, peer)) => {
                        if !forward(stream, peer, &to_hub).await {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(port = listener.local_addr().map(|a| a.port()).ok(), "direct listener: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                () = tokio::time::sleep(LAZY_TICK) => {}
                () = stop.notified() => break,
            }
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(LAZY_TICK) => {}
            () = stop.notified() => break,
        }
        if !waiting(&listener) {
            seen_waiting = false;
        } else if !seen_waiting {
            seen_waiting = true;
        } else {
            seen_waiting = false;
            if !take_waiting(&listener, &to_hub).await {
                return;
            }
        }
    }
}

/// Takes every connection that waits now; `false` once the hub is gone.
async fn take_waiting(listener: &TcpListener, to_hub: &mpsc::Sender<Accepted>) -> bool {
    while let Some(Ok((stream, peer))) = listener.accept().now_or_never() {
        if !forward(stream, peer, to_hub).await {
            return false;
        }
    }
    true
}

/// Sends an accepted connection to the hub as the shared listener does;
/// `false` once the hub is gone.
async fn forward(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    to_hub: &mpsc::Sender<Accepted>,
) -> bool {
    match accepted(stream, peer, Family::V4) {
        Some(accepted) => to_hub.send(accepted).await.is_ok(),
        None => true,
    }
}
