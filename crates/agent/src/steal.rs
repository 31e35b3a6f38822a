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
//! An accepted connection's original destination (`SO_ORIGINAL_DST` /
//! `IP6T_SO_ORIGINAL_DST`) says which port the client meant; the connection goes
//! to the [`Accepted`] channel with it, and the hub refuses it when that port has
//! no subscription any more.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{self as nixsock, sockopt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

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
    redirected: HashSet<u16>,
    /// The listeners' ports: IPv4, and IPv6 when it could be bound.
    listen_ports: Option<(u16, Option<u16>)>,
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
            redirected: HashSet::new(),
            listen_ports: None,
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
        let v6 = match bind_v6_only() {
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
    /// when possible) to the agent's listeners. Idempotent.
    ///
    /// # Errors
    ///
    /// What failed (binding the listeners, the packet rules), for the client.
    pub async fn redirect(&mut self, port: u16) -> Result<(), RedirectError> {
        if self.redirected.contains(&port) {
            return Ok(());
        }
        let (v4_port, v6_port) = self.ensure_listeners().await?;
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
        rules.redirect(port, v4_port, v6_port).await?;
        self.redirected.insert(port);
        tracing::info!(port, "redirecting");
        Ok(())
    }

    /// Stops redirecting `port`: its rules are deleted.
    pub async fn release(&mut self, port: u16) {
        if !self.redirected.remove(&port) {
            return;
        }
        let (Some((v4_port, v6_port)), Some(rules)) = (self.listen_ports, &mut self.rules) else {
            return;
        };
        rules.release(port, v4_port, v6_port).await;
        tracing::info!(port, "no longer redirecting");
    }
}

/// Binds `[::]:0` IPv6-only, so IPv4 connections go to the IPv4 listener.
fn bind_v6_only() -> io::Result<TcpListener> {
    let fd = nixsock::socket(
        nixsock::AddressFamily::Inet6,
        nixsock::SockType::Stream,
        nixsock::SockFlag::SOCK_CLOEXEC | nixsock::SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    nixsock::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    let addr = nixsock::SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0));
    nixsock::bind(fd.as_raw_fd(), &addr)?;
    nixsock::listen(&fd, nixsock::Backlog::new(1024)?)?;
    TcpListener::from_std(std::net::TcpListener::from(fd))
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
            let _ = stream.set_nodelay(true);
            let original = match original_dst(&stream, family) {
                Ok(addr) => addr,
                Err(e) => {
                    tracing::debug!(%peer, "connection without an original destination ({e}); refused");
                    let _ = stream.set_zero_linger();
                    continue;
                }
            };
            let accepted = Accepted {
                stream,
                peer,
                original,
            };
            if self.accepted.send(accepted).await.is_err() {
                break;
            }
        }
    }
}
