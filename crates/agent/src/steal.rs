//! Stealing: the target's incoming TCP connections to a port are redirected to the
//! agent's own listeners and announced to the client as `Incoming`.
//!
//! On the first `Steal` the agent binds two listeners in the target's network
//! namespace, `0.0.0.0:0` and `[::]:0` (IPv6-only; IPv4 alone if IPv6 cannot be
//! bound), creates its chain and hooks it into `PREROUTING` (see [`crate::rules`]).
//! Each stolen port then adds one `REDIRECT` rule per family, and `Unsteal`
//! deletes them. Steal commands are processed one at a time, in order, by one task
//! ([`spawn`]), so the link reader never waits for `iptables`.
//!
//! An accepted connection's original destination (`SO_ORIGINAL_DST` /
//! `IP6T_SO_ORIGINAL_DST`) says which port the client meant; a connection to a port
//! that is no longer stolen is refused, the others get an id with
//! [`ConnectionId::AGENT_BIT`] and a [`crate::relay`] task.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use graft_protocol::ConnectionId;
use graft_protocol::link::AgentMessage;
use nix::sys::socket::{self as nixsock, sockopt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::relay::{self, ConnTable};
use crate::rules::{self, Family};

/// A request to the steal task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StealCommand {
    /// Start stealing a port; answered with `StealResult`.
    Steal(u16),
    /// Stop stealing a port.
    Unsteal(u16),
}

/// What the steal task shares with the rest of the session.
#[derive(Debug, Clone)]
pub struct StealContext {
    /// The agent's chain name.
    pub chain: String,
    /// Messages to the client.
    pub to_link: mpsc::Sender<AgentMessage>,
    /// The session's connections.
    pub table: Arc<ConnTable>,
    /// Set once the agent may have installed a rule, so the exit path cleans up.
    pub rules_touched: Arc<AtomicBool>,
}

/// The steal task's state.
#[derive(Debug)]
struct Stealer {
    ctx: StealContext,
    stolen: Arc<Mutex<HashSet<u16>>>,
    next_id: Arc<AtomicU64>,
    /// The listeners' ports: IPv4, and IPv6 when it could be bound.
    listen_ports: Option<(u16, Option<u16>)>,
    /// Whether the chain exists and is hooked, per family.
    hooked: [bool; 2],
    /// IPv6 rules failed once: IPv4 only from then on.
    v6_broken: bool,
}

/// Starts the steal task; it runs until the returned sender is dropped.
pub fn spawn(ctx: StealContext) -> mpsc::UnboundedSender<StealCommand> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut stealer = Stealer {
        ctx,
        stolen: Arc::default(),
        next_id: Arc::new(AtomicU64::new(1)),
        listen_ports: None,
        hooked: [false; 2],
        v6_broken: false,
    };
    tokio::spawn(async move {
        while let Some(command) = rx.recv().await {
            match command {
                StealCommand::Steal(port) => {
                    let error = stealer.steal(port).await.err();
                    match &error {
                        None => tracing::info!(port, "stealing"),
                        Some(e) => tracing::warn!(port, "steal failed: {e}"),
                    }
                    let reply = AgentMessage::StealResult { port, error };
                    if stealer.ctx.to_link.send(reply).await.is_err() {
                        break;
                    }
                }
                StealCommand::Unsteal(port) => stealer.unsteal(port).await,
            }
        }
    });
    tx
}

fn family_index(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

impl Stealer {
    fn is_stolen(&self, port: u16) -> bool {
        self.stolen
            .lock()
            .expect("stolen ports lock poisoned")
            .contains(&port)
    }

    fn set_stolen(&self, port: u16, stolen: bool) {
        let mut set = self.stolen.lock().expect("stolen ports lock poisoned");
        if stolen {
            set.insert(port);
        } else {
            set.remove(&port);
        }
    }

    async fn ensure_listeners(&mut self) -> Result<(u16, Option<u16>), String> {
        if let Some(ports) = self.listen_ports {
            return Ok(ports);
        }
        let v4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .map_err(|e| format!("could not listen on 0.0.0.0 in the target's network: {e}"))?;
        let v4_port = v4.local_addr().map_err(|e| e.to_string())?.port();
        let v6 = match bind_v6_only() {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(
                    "no IPv6 listener in the target's network ({e}); stealing IPv4 only"
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
        tracing::debug!(v4_port, ?v6_port, "steal listeners ready");
        self.listen_ports = Some((v4_port, v6_port));
        Ok((v4_port, v6_port))
    }

    fn spawn_accept(&self, listener: TcpListener, family: Family) {
        let accept = Acceptor {
            to_link: self.ctx.to_link.clone(),
            table: self.ctx.table.clone(),
            stolen: self.stolen.clone(),
            next_id: self.next_id.clone(),
        };
        tokio::spawn(accept.run(listener, family));
    }

    async fn hook(&mut self, family: Family) -> Result<(), rules::RuleError> {
        let i = family_index(family);
        if self.hooked[i] {
            return Ok(());
        }
        self.ctx.rules_touched.store(true, Ordering::SeqCst);
        match rules::run(family, &rules::create_chain(&self.ctx.chain)).await {
            // Left by an earlier attempt whose jump failed.
            Err(rules::RuleError::Failed { stderr, .. }) if stderr.contains("already exists") => {}
            other => other?,
        }
        rules::run(family, &rules::jump_to_chain(&self.ctx.chain)).await?;
        self.hooked[i] = true;
        Ok(())
    }

    async fn steal(&mut self, port: u16) -> Result<(), String> {
        if self.is_stolen(port) {
            return Ok(());
        }
        let (v4_port, v6_port) = self.ensure_listeners().await?;
        // Marked stolen before the rule exists, so the first redirected connection
        // is not refused.
        self.set_stolen(port, true);
        let v4 = async {
            self.hook(Family::V4).await?;
            rules::run(
                Family::V4,
                &rules::redirect(&self.ctx.chain, true, port, v4_port),
            )
            .await
        }
        .await;
        if let Err(e) = v4 {
            self.set_stolen(port, false);
            return Err(format!("could not steal port {port}: {e}"));
        }
        if let (Some(v6_port), false) = (v6_port, self.v6_broken) {
            let v6 = async {
                self.hook(Family::V6).await?;
                rules::run(
                    Family::V6,
                    &rules::redirect(&self.ctx.chain, true, port, v6_port),
                )
                .await
            }
            .await;
            if let Err(e) = v6 {
                tracing::warn!("IPv6 traffic to port {port} is not stolen: {e}");
                self.v6_broken = true;
            }
        }
        Ok(())
    }

    async fn unsteal(&mut self, port: u16) {
        if !self.is_stolen(port) {
            return;
        }
        self.set_stolen(port, false);
        let Some((v4_port, v6_port)) = self.listen_ports else {
            return;
        };
        for (family, to) in [(Family::V4, Some(v4_port)), (Family::V6, v6_port)] {
            let Some(to) = to else { continue };
            if !self.hooked[family_index(family)] {
                continue;
            }
            match rules::run(family, &rules::redirect(&self.ctx.chain, false, port, to)).await {
                Ok(()) => {}
                Err(e) if e.is_already_gone() => {}
                Err(e) => tracing::warn!("could not remove the rule for port {port}: {e}"),
            }
        }
        tracing::info!(port, "no longer stealing");
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
    to_link: mpsc::Sender<AgentMessage>,
    table: Arc<ConnTable>,
    stolen: Arc<Mutex<HashSet<u16>>>,
    next_id: Arc<AtomicU64>,
}

impl Acceptor {
    async fn run(self, listener: TcpListener, family: Family) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accepting a stolen connection failed: {e}");
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
            let stolen = self
                .stolen
                .lock()
                .expect("stolen ports lock poisoned")
                .contains(&original.port());
            if !stolen {
                tracing::debug!(%peer, %original, "port no longer stolen; connection refused");
                let _ = stream.set_zero_linger();
                continue;
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let conn = ConnectionId(ConnectionId::AGENT_BIT | id);
            let registration = self
                .table
                .register(conn)
                .expect("agent connection ids are never reused");
            // From here on, an agent that stops resets the connection.
            let stream = relay::ResetOnDrop::new(stream);
            tracing::debug!(%conn, %peer, %original, "stolen connection");
            let incoming = AgentMessage::Incoming {
                conn,
                port: original.port(),
                peer,
                local: original,
            };
            if self.to_link.send(incoming).await.is_err() {
                break;
            }
            tokio::spawn(relay::tcp(
                stream,
                registration,
                self.to_link.clone(),
                self.table.clone(),
            ));
        }
    }
}
