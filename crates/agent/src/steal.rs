//! Redirection: the target's incoming TCP connections to a port are redirected
//! to the agent's own listeners and handed to the [`crate::incoming`] hub.
//!
//! On the first port the agent binds two listeners in the target's network
//! namespace, `0.0.0.0:0` and `[::]:0` (IPv6-only; IPv4 alone if IPv6 cannot be
//! bound), and opens its packet rules ([`crate::rules::PacketRules`]: an
//! nf_tables table the kernel removes with the agent, or an iptables chain).
//! Each redirected port then gets its redirect rules, and releasing it deletes
//! them. Connections from the probe sources are never redirected
//! ([`crate::rules::probes`]). The hub calls [`Redirector::redirect`] and
//! [`Redirector::release`] one at a time, under its lock.
//!
//! While one session alone steals a port without a filter and its program
//! takes descriptors, the port's redirects go to a direct listener of the
//! port instead ([`crate::direct`]: IPv4, and IPv6 where the program takes
//! it), which the program accepts from.
//!
//! An accepted connection's original destination (`SO_ORIGINAL_DST` /
//! `IP6T_SO_ORIGINAL_DST`) says which port the client meant; the connection goes
//! to the [`Accepted`] channel with it, and the hub refuses it when that port has
//! no subscription any more.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{self as nixsock, sockopt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::direct::{DirectFor, DirectListener, Offer};
use crate::rules::{Family, PacketRules, RedirectError};

/// A redirected connection, as accepted.
#[derive(Debug)]
pub struct Accepted {
    /// The accepted socket.
    pub stream: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// The address the client connected to (the target's port).
    pub original: SocketAddr,
}

/// The agent's listeners and packet rules for redirected ports.
#[derive(Debug)]
pub struct Redirector {
    name: String,
    rules_touched: Arc<AtomicBool>,
    accepted: mpsc::Sender<Accepted>,
    /// Each redirected port's listener ports (IPv4, IPv6), as its rules name them.
    redirected: HashMap<u16, (u16, Option<u16>)>,
    /// The shared listeners' ports: IPv4, and IPv6 when it could be bound.
    listen_ports: Option<(u16, Option<u16>)>,
    /// The direct listener each port has ([`crate::direct`]): redirected to it
    /// when it is the port's IPv4 destination, else only taking what was
    /// queued before the redirect left it.
    direct: HashMap<u16, DirectListener>,
    /// The rules, once the first port needed them.
    rules: Option<PacketRules>,
}

impl Redirector {
    /// A redirector whose rules are named `name` (the agent's chain name), that
    /// sets `rules_touched` before the first rule, and sends accepted connections
    /// to `accepted`.
    pub fn new(
        name: String,
        rules_touched: Arc<AtomicBool>,
        accepted: mpsc::Sender<Accepted>,
    ) -> Redirector {
        Redirector {
            name,
            rules_touched,
            accepted,
            redirected: HashMap::new(),
            listen_ports: None,
            direct: HashMap::new(),
            rules: None,
        }
    }

    async fn ensure_listeners(&mut self) -> Result<(u16, Option<u16>), RedirectError> {
        if let Some(ports) = self.listen_ports {
            return Ok(ports);
        }
        let listen_failed = |error| RedirectError::Listen {
            addr: "0.0.0.0:0",
            error,
        };
        let v4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .map_err(listen_failed)?;
        let v4_port = v4.local_addr().map_err(listen_failed)?.port();
        let v6 = match listen_any(Family::V6)
            .and_then(|fd| TcpListener::from_std(std::net::TcpListener::from(fd)))
        {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(
                    "no IPv6 listener in the target's network ({e}); redirecting IPv4 only"
                );
                None
            }
        };
        let v6_port = v6
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port());
        self.spawn_accept(v4, Family::V4);
        if let Some(v6) = v6 {
            self.spawn_accept(v6, Family::V6);
        }
        tracing::debug!(v4_port, ?v6_port, "redirect listeners ready");
        self.listen_ports = Some((v4_port, v6_port));
        Ok((v4_port, v6_port))
    }

    fn spawn_accept(&self, listener: TcpListener, family: Family) {
        let accept = Acceptor {
            accepted: self.accepted.clone(),
        };
        tokio::spawn(accept.run(listener, family));
    }

    /// Redirects the target's incoming TCP connections to `port` (IPv4, and IPv6
    /// when possible) to the agent's shared listeners, or, with `direct` (the
    /// subscription whose program takes it), to a direct listener of the port
    /// ([`crate::direct`]): the one that program holds, or a new one. A
    /// direct listener without an IPv6 half leaves IPv6 connections to the
    /// shared IPv6 listener.
    /// Idempotent; a port redirected the other way is retargeted with no gap
    /// (the new rule before the old one goes).
    ///
    /// Returns the direct listener's [`Offer`] when this call started it.
    ///
    /// # Errors
    ///
    /// What failed (binding the listeners, the packet rules), for the client.
    /// A direct listener that cannot be bound is not an error: the port is
    /// redirected to the shared listeners.
    pub async fn redirect(
        &mut self,
        port: u16,
        direct: Option<DirectFor>,
    ) -> Result<Option<Offer>, RedirectError> {
        let shared = self.ensure_listeners().await?;
        let is_direct = self.is_direct(port);
        if self.redirected.contains_key(&port)
            && is_direct == direct.is_some()
            && (!is_direct || self.direct.get(&port).map(DirectListener::of) == direct)
        {
            return Ok(None);
        }
        let mut offer = None;
        let mut to = shared;
        let kept = self
            .direct
            .get(&port)
            .filter(|kept| Some(kept.of()) == direct);
        if let Some(kept) = kept {
            // Its program still holds it (the redirect left it while somebody
            // watched the session's traffic, `PauseDirect`).
            to = direct_ports(kept, shared);
        } else if let Some(of) = direct {
            if let Some(old) = self.direct.remove(&port) {
                old.stop();
            }
            match DirectListener::start(of, self.accepted.clone()) {
                Ok((listener, started)) => {
                    to = direct_ports(&listener, shared);
                    self.direct.insert(port, listener);
                    offer = Some(started);
                }
                Err(e) => tracing::warn!(
                    port,
                    "no direct listener ({e}); the port's connections are handed over"
                ),
            }
        }
        let rules = match &mut self.rules {
            Some(rules) => rules,
            None => {
                self.rules_touched.store(true, Ordering::SeqCst);
                let opened = PacketRules::open(&self.name)
                    .await
                    .map_err(|error| RedirectError::Nftables { port, error })?;
                self.rules.insert(opened)
            }
        };
        let result = match self.redirected.get(&port) {
            Some(&from) => rules.retarget(port, from, to).await,
            None => rules.redirect(port, to.0, to.1).await.map(|()| to),
        };
        let now = match result {
            Ok(now) => now,
            Err(e) => {
                if offer.is_some()
                    && let Some(listener) = self.direct.remove(&port)
                {
                    listener.stop();
                }
                return Err(e);
            }
        };
        self.redirected.insert(port, now);
        if let Some(listener) = self.direct.get(&port) {
            if direct.is_some() {
                listener.come_back();
            } else {
                listener.leave();
            }
        }
        tracing::info!(port, direct = offer.is_some(), "redirecting");
        Ok(offer)
    }

    /// Whether `port`'s IPv4 connections go to its direct listener.
    pub fn is_direct(&self, port: u16) -> bool {
        let to = self.redirected.get(&port).map(|t| t.0);
        to.is_some() && to == self.direct.get(&port).map(|d| d.ports().0)
    }

    /// Stops redirecting `port`: its direct listener, if any, is shut down
    /// (what waits in it is reset), then its rules are deleted.
    pub async fn release(&mut self, port: u16) {
        let Some((to_v4, to_v6)) = self.redirected.remove(&port) else {
            return;
        };
        // First, while the redirect still translates the resets of what waits.
        if let Some(listener) = self.direct.remove(&port) {
            listener.stop();
        }
        if let Some(rules) = &mut self.rules {
            rules.release(port, to_v4, to_v6).await;
        }
        tracing::info!(port, "no longer redirecting");
    }
}

/// Where a port with the direct listener `listener` is redirected: its
/// listeners, and the `shared` IPv6 listener when it has no IPv6 one.
fn direct_ports(listener: &DirectListener, shared: (u16, Option<u16>)) -> (u16, Option<u16>) {
    let (v4, v6) = listener.ports();
    (v4, v6.or(shared.1))
}

/// The listen backlog of the agent's redirect listeners, shared and direct.
const BACKLOG: i32 = 1024;

/// A listening socket of `family` on the unspecified address, port 0, with
/// [`BACKLOG`], in this network namespace: IPv6-only for IPv6, so IPv4
/// connections go to the IPv4 one. Non-blocking, close-on-exec.
///
/// # Errors
///
/// Creating, binding or listening failed (`EAFNOSUPPORT` where the namespace
/// has no IPv6, `EMFILE`, ...).
pub fn listen_any(family: Family) -> io::Result<OwnedFd> {
    let domain = match family {
        Family::V4 => nixsock::AddressFamily::Inet,
        Family::V6 => nixsock::AddressFamily::Inet6,
    };
    let fd = nixsock::socket(
        domain,
        nixsock::SockType::Stream,
        nixsock::SockFlag::SOCK_CLOEXEC | nixsock::SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    match family {
        Family::V4 => {
            let any = nixsock::SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
            nixsock::bind(fd.as_raw_fd(), &any)?;
        }
        Family::V6 => {
            nixsock::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
            let any = nixsock::SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0));
            nixsock::bind(fd.as_raw_fd(), &any)?;
        }
    }
    nixsock::listen(&fd, nixsock::Backlog::new(BACKLOG)?)?;
    Ok(fd)
}

/// The original destination of a redirected connection.
///
/// # Errors
///
/// The `getsockopt` error, e.g. `ENOENT` for a connection that was not redirected.
pub fn original_dst(stream: &TcpStream, family: Family) -> io::Result<SocketAddr> {
    Ok(match family {
        Family::V4 => {
            let sin = nixsock::getsockopt(stream, sockopt::OriginalDst)?;
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        }
        Family::V6 => {
            let sin6 = nixsock::getsockopt(stream, sockopt::Ip6tOriginalDst)?;
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            ))
        }
    })
}

/// A connection accepted from a redirect listener, with its original
/// destination; `None` (the connection reset) when the kernel knows none for
/// it. One that came to the listener's own port has one (the listener's
/// address), and the hub refuses it: no subscription names that port.
pub fn accepted(stream: TcpStream, peer: SocketAddr, family: Family) -> Option<Accepted> {
    let _ = stream.set_nodelay(true);
    match original_dst(&stream, family) {
        Ok(original) => Some(Accepted {
            stream,
            peer,
            original,
        }),
        Err(e) => {
            tracing::debug!(%peer, "connection without an original destination ({e}); refused");
            let _ = stream.set_zero_linger();
            None
        }
    }
}

/// One listener's accept loop.
struct Acceptor {
    accepted: mpsc::Sender<Accepted>,
}

impl Acceptor {
    async fn run(self, listener: TcpListener, family: Family) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accepting a redirected connection failed: {e}");
                    // EMFILE and friends: give the system a moment.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(accepted) = accepted(stream, peer, family) else {
                continue;
            };
            if self.accepted.send(accepted).await.is_err() {
                break;
            }
        }
    }
}
