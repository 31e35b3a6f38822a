//! Several sessions on one target: the agents of a target's network namespace
//! share one [`Hub`], owned by the first agent that needed it.
//!
//! - The owner listens on the abstract Unix socket [`HUB_NAME`]. Abstract names
//!   belong to the network namespace (unix(7)), so every agent in the target's
//!   namespace finds the same hub and no file is left behind. The owner serves a
//!   peer only when the peer process has `CAP_NET_ADMIN` in its effective set
//!   (the capability it would need to redirect the traffic itself, capabilities(7)).
//! - Another agent connects, says `Hello` with the abstract name it accepts
//!   deliveries on and a random token, then subscribes for its session. For each
//!   connection routed to it the hub connects to that name, sends a
//!   [`Delivery`] frame with the token, and then the connection's bytes.
//! - When a peer's link to the hub closes, its subscriptions go at once. When the
//!   hub's owner goes (its session ended, or it was killed) the others take over:
//!   one binds the name and becomes the owner, and each re-subscribes.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use graft_protocol::codec::FrameCodec;
use graft_protocol::incoming::{SessionListing, Subscription};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, mpsc};
use tokio_util::codec::Framed;

use super::{BoxFuture, BoxIo, ConnMeta, Hub, OwnerId, Subscriber};

/// The abstract socket name of a target's hub (protocol minor version included,
/// so agents of incompatible releases do not talk).
pub const HUB_NAME: &str = "graft-hub-0.2";

/// How long a delivery's header may take to arrive.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest delivery header accepted, in bytes.
const MAX_DELIVERY: usize = 4096;

/// A peer agent's message to the hub.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToHub {
    /// First message: where and how to deliver this peer's connections.
    Hello {
        /// The abstract socket name the peer accepts deliveries on.
        deliver_to: String,
        /// The token each delivery must carry.
        token: String,
    },
    /// Subscribe (or replace the subscription of a port).
    Subscribe {
        /// The session's `user@host`.
        client: String,
        /// What it asks for.
        subscription: Subscription,
    },
    /// Drop the subscription of a port.
    Unsubscribe {
        /// The port.
        port: u16,
    },
    /// List every subscription.
    List,
}

/// The hub's answer, one per [`ToHub`] message, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromHub {
    /// The answer to `Hello`, `Subscribe` and `Unsubscribe`: `None` on success.
    Done(Option<String>),
    /// The answer to `List`.
    Listing(Vec<SessionListing>),
}

/// The header of a delivered connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    /// The token from the peer's `Hello`.
    pub token: String,
    /// The target's port.
    pub port: u16,
    /// The client's address.
    pub peer: SocketAddr,
    /// The original destination.
    pub local: SocketAddr,
}

fn abstract_addr(name: &str) -> io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

/// Binds an abstract listener.
pub fn bind_abstract(name: &str) -> io::Result<UnixListener> {
    let std = std::os::unix::net::UnixListener::bind_addr(&abstract_addr(name)?)?;
    std.set_nonblocking(true)?;
    UnixListener::from_std(std)
}

/// Connects to an abstract socket.
pub fn connect_abstract(name: &str) -> io::Result<UnixStream> {
    let std = std::os::unix::net::UnixStream::connect_addr(&abstract_addr(name)?)?;
    std.set_nonblocking(true)?;
    UnixStream::from_std(std)
}

/// Whether the process at the other end of `stream` has `CAP_NET_ADMIN` in its
/// effective set (bit 12, `linux/capability.h`), read from `/proc/PID/status`.
pub fn peer_is_privileged(stream: &UnixStream) -> Result<(), String> {
    let cred =
        nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::PeerCredentials)
            .map_err(|e| format!("no peer credentials: {e}"))?;
    let pid = cred.pid();
    if pid <= 0 {
        return Err("the peer's process is not visible from this agent".into());
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| format!("no CapEff in /proc/{pid}/status"))?;
    const CAP_NET_ADMIN: u32 = 12;
    if cap_eff & (1 << CAP_NET_ADMIN) == 0 {
        return Err(format!("process {pid} lacks CAP_NET_ADMIN"));
    }
    Ok(())
}

/// Serves peer agents on `listener` for `hub` until the task is dropped.
pub async fn serve_peers(listener: UnixListener, hub: Arc<Hub>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("accepting a peer agent failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = peer_is_privileged(&stream) {
            tracing::warn!("peer agent refused: {e}");
            continue;
        }
        tokio::spawn(serve_peer(stream, hub.clone()));
    }
}

async fn serve_peer(stream: UnixStream, hub: Arc<Hub>) {
    let mut framed = Framed::new(stream, FrameCodec::<ToHub, FromHub>::new());
    let Ok(Some(Ok(ToHub::Hello { deliver_to, token }))) =
        tokio::time::timeout(DELIVERY_TIMEOUT, framed.next()).await
    else {
        tracing::debug!("a peer agent sent no Hello");
        return;
    };
    if framed.send(FromHub::Done(None)).await.is_err() {
        return;
    }
    let owner = hub.new_owner();
    let to: Arc<dyn Subscriber> = Arc::new(PeerSubscriber { deliver_to, token });
    tracing::info!(owner, "peer agent joined the hub");
    while let Some(Ok(message)) = framed.next().await {
        let reply = match message {
            ToHub::Hello { .. } => FromHub::Done(Some("second Hello".into())),
            ToHub::Subscribe {
                client,
                subscription,
            } => FromHub::Done(
                hub.subscribe(owner, &client, subscription, to.clone())
                    .await
                    .err(),
            ),
            ToHub::Unsubscribe { port } => {
                hub.unsubscribe(owner, port).await;
                FromHub::Done(None)
            }
            ToHub::List => FromHub::Listing(hub.list()),
        };
        if framed.send(reply).await.is_err() {
            break;
        }
    }
    tracing::info!(owner, "peer agent left the hub");
    hub.drop_owner(owner).await;
}

/// Delivers to another agent through its abstract socket.
struct PeerSubscriber {
    deliver_to: String,
    token: String,
}

impl Subscriber for PeerSubscriber {
    fn open(self: Arc<Self>, meta: ConnMeta) -> BoxFuture<io::Result<BoxIo>> {
        Box::pin(async move {
            let mut stream = connect_abstract(&self.deliver_to)?;
            let header = graft_protocol::codec::encode_frame(&Delivery {
                token: self.token.clone(),
                port: meta.port,
                peer: meta.peer,
                local: meta.local,
            })
            .map_err(io::Error::other)?;
            stream.write_all(&header).await?;
            Ok(Box::new(stream) as BoxIo)
        })
    }
}

/// Reads a delivery header from `stream`.
pub async fn read_delivery(stream: &mut UnixStream) -> io::Result<Delivery> {
    let read = async {
        let len = stream.read_u32().await? as usize;
        if len > MAX_DELIVERY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "delivery header too large",
            ));
        }
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).await?;
        postcard::from_bytes(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    };
    tokio::time::timeout(DELIVERY_TIMEOUT, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no delivery header"))?
}

/// The sending half of a link to the hub.
type HubSink = futures::stream::SplitSink<Framed<UnixStream, FrameCodec<FromHub, ToHub>>, ToHub>;

/// A connection to the hub of another agent.
pub struct HubConn {
    /// The sink and the answers, taken together by one call at a time.
    calls: Mutex<(HubSink, mpsc::UnboundedReceiver<FromHub>)>,
    gone: tokio::sync::watch::Receiver<bool>,
}

impl HubConn {
    /// Connects to the hub and says `Hello`.
    ///
    /// # Errors
    ///
    /// `ConnectionRefused` / `NotFound` when there is no hub; others as they come.
    pub async fn connect(deliver_to: &str, token: &str) -> io::Result<HubConn> {
        let stream = connect_abstract(HUB_NAME)?;
        let (sink, mut stream) = Framed::new(stream, FrameCodec::new()).split();
        let (tx, rx) = mpsc::unbounded_channel();
        let (gone_tx, gone) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Some(Ok(reply)) = stream.next().await {
                if tx.send(reply).is_err() {
                    break;
                }
            }
            let _ = gone_tx.send(true);
        });
        let conn = HubConn {
            calls: Mutex::new((sink, rx)),
            gone,
        };
        conn.call(ToHub::Hello {
            deliver_to: deliver_to.to_owned(),
            token: token.to_owned(),
        })
        .await?;
        Ok(conn)
    }

    /// Sends one message and waits for its answer.
    ///
    /// # Errors
    ///
    /// The link to the hub broke.
    pub async fn call(&self, message: ToHub) -> io::Result<FromHub> {
        let mut calls = self.calls.lock().await;
        let (sink, replies) = &mut *calls;
        sink.send(message).await.map_err(io::Error::other)?;
        replies
            .recv()
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the hub agent is gone"))
    }

    /// Resolves when the hub closes the link (its owner went away).
    pub async fn closed(&self) {
        let mut gone = self.gone.clone();
        let _ = gone.wait_for(|g| *g).await;
    }
}

/// How this agent reaches the hub of its target.
enum Role {
    /// Not needed yet.
    Idle,
    /// This agent owns the hub.
    Owner {
        hub: Arc<Hub>,
        owner: OwnerId,
        server: tokio::task::JoinHandle<()>,
    },
    /// Another agent owns it.
    Client { conn: Arc<HubConn> },
}

/// A session's access to the hub of its target, wherever it lives; takes over the
/// hub when its owner goes.
pub struct Access {
    client: String,
    chain: String,
    rules_touched: Arc<AtomicBool>,
    local: Arc<dyn Subscriber>,
    role: Mutex<Role>,
    subscriptions: std::sync::Mutex<Vec<Subscription>>,
    /// Set while the session's client is detached ([`Access::suspend`]): the
    /// subscriptions are kept here but not in the hub.
    suspended: AtomicBool,
    deliver_to: String,
    token: String,
    deliveries: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    accept_delivery: Arc<dyn Fn(Delivery, UnixStream) + Send + Sync>,
}

impl Access {
    /// Access for the session of `client` whose connections go to `local` (when
    /// this agent owns the hub) or arrive as deliveries handled by
    /// `accept_delivery` (when another agent does).
    pub fn new(
        client: String,
        chain: String,
        rules_touched: Arc<AtomicBool>,
        local: Arc<dyn Subscriber>,
        accept_delivery: Arc<dyn Fn(Delivery, UnixStream) + Send + Sync>,
    ) -> Arc<Access> {
        let token = crate::rules::random_chain_name() + &crate::rules::random_chain_name();
        Arc::new(Access {
            client,
            deliver_to: format!("graft-agent-{chain}"),
            chain,
            rules_touched,
            local,
            role: Mutex::new(Role::Idle),
            subscriptions: std::sync::Mutex::default(),
            suspended: AtomicBool::new(false),
            token,
            deliveries: std::sync::Mutex::default(),
            accept_delivery,
        })
    }

    /// Makes sure the role is settled: owner or client.
    async fn ensure<'a>(
        self: &Arc<Self>,
        role: &mut tokio::sync::MutexGuard<'a, Role>,
    ) -> io::Result<()> {
        if !matches!(**role, Role::Idle) {
            return Ok(());
        }
        for _ in 0..50 {
            match bind_abstract(HUB_NAME) {
                Ok(listener) => {
                    let hub = Hub::start(self.chain.clone(), self.rules_touched.clone());
                    let owner = hub.new_owner();
                    let server = tokio::spawn(serve_peers(listener, hub.clone()));
                    tracing::info!("this agent owns the target's hub");
                    **role = Role::Owner { hub, owner, server };
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
                Err(e) => return Err(e),
            }
            self.listen_for_deliveries()?;
            match HubConn::connect(&self.deliver_to, &self.token).await {
                Ok(conn) => {
                    let conn = Arc::new(conn);
                    tracing::info!("joined the target's hub of another agent");
                    **role = Role::Client { conn: conn.clone() };
                    self.watch(conn);
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!("hub not reachable ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        Err(io::Error::other(
            "could not reach or become the target's hub",
        ))
    }

    fn listen_for_deliveries(&self) -> io::Result<()> {
        let mut task = self.deliveries.lock().expect("deliveries lock poisoned");
        if task.is_some() {
            return Ok(());
        }
        let listener = bind_abstract(&self.deliver_to)?;
        let token = self.token.clone();
        let accept = self.accept_delivery.clone();
        *task = Some(tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let token = token.clone();
                let accept = accept.clone();
                tokio::spawn(async move {
                    match read_delivery(&mut stream).await {
                        Ok(d) if crate::session::secrets_match(&d.token, &token) => {
                            accept(d, stream)
                        }
                        Ok(_) => tracing::warn!("a delivery with a wrong token was refused"),
                        Err(e) => tracing::debug!("bad delivery: {e}"),
                    }
                });
            }
        }));
        Ok(())
    }

    /// When the hub's owner goes, take over and subscribe again.
    fn watch(self: &Arc<Self>, conn: Arc<HubConn>) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            conn.closed().await;
            let Some(this) = this.upgrade() else { return };
            tracing::warn!("the target's hub went away; taking over");
            let mut role = this.role.lock().await;
            if matches!(&*role, Role::Client { conn: c } if Arc::ptr_eq(c, &conn)) {
                *role = Role::Idle;
            } else {
                return;
            }
            if let Err(e) = this.ensure(&mut role).await {
                tracing::warn!("could not take over the hub: {e}");
                return;
            }
            if this.suspended.load(Ordering::SeqCst) {
                // Subscribed again by `resume`.
                return;
            }
            let subs = this
                .subscriptions
                .lock()
                .expect("subscriptions lock poisoned")
                .clone();
            for sub in subs {
                let port = sub.port;
                if let Err(e) = this.subscribe_in(&role, sub).await {
                    tracing::warn!(port, "could not subscribe again: {e}");
                }
            }
        });
    }

    async fn subscribe_in(&self, role: &Role, subscription: Subscription) -> Result<(), String> {
        match role {
            Role::Idle => Err("no hub".into()),
            Role::Owner { hub, owner, .. } => {
                hub.subscribe(*owner, &self.client, subscription, self.local.clone())
                    .await
            }
            Role::Client { conn } => {
                let message = ToHub::Subscribe {
                    client: self.client.clone(),
                    subscription,
                };
                match conn.call(message).await {
                    Ok(FromHub::Done(None)) => Ok(()),
                    Ok(FromHub::Done(Some(e))) => Err(e),
                    Ok(FromHub::Listing(_)) => Err("the hub answered out of turn".into()),
                    Err(e) => Err(format!("the target's hub is unreachable: {e}")),
                }
            }
        }
    }

    /// Subscribes (or replaces the subscription of a port).
    ///
    /// # Errors
    ///
    /// The hub's refusal (conflict, bad filter, rules failed) or its absence.
    pub async fn subscribe(self: &Arc<Self>, subscription: Subscription) -> Result<(), String> {
        let mut role = self.role.lock().await;
        // While suspended it is only kept, for `resume`.
        if !self.suspended.load(Ordering::SeqCst) {
            self.ensure(&mut role).await.map_err(|e| e.to_string())?;
            self.subscribe_in(&role, subscription.clone()).await?;
        }
        let mut subs = self
            .subscriptions
            .lock()
            .expect("subscriptions lock poisoned");
        subs.retain(|s| s.port != subscription.port);
        subs.push(subscription);
        Ok(())
    }

    /// Drops the subscription of `port`.
    pub async fn unsubscribe(self: &Arc<Self>, port: u16) {
        self.subscriptions
            .lock()
            .expect("subscriptions lock poisoned")
            .retain(|s| s.port != port);
        let role = self.role.lock().await;
        match &*role {
            Role::Idle => {}
            Role::Owner { hub, owner, .. } => hub.unsubscribe(*owner, port).await,
            Role::Client { conn } => {
                let _ = conn.call(ToHub::Unsubscribe { port }).await;
            }
        }
    }

    /// Takes this session's subscriptions out of the hub and keeps them for
    /// [`Access::resume`]: while the client is detached the target serves its
    /// own traffic (DESIGN.md). Connections already delivered go on.
    pub async fn suspend(self: &Arc<Self>) {
        let role = self.role.lock().await;
        if self.suspended.swap(true, Ordering::SeqCst) {
            return;
        }
        let ports: Vec<u16> = self
            .subscriptions
            .lock()
            .expect("subscriptions lock poisoned")
            .iter()
            .map(|s| s.port)
            .collect();
        for port in ports {
            match &*role {
                Role::Idle => {}
                Role::Owner { hub, owner, .. } => hub.unsubscribe(*owner, port).await,
                Role::Client { conn } => {
                    let _ = conn.call(ToHub::Unsubscribe { port }).await;
                }
            }
            tracing::info!(
                port,
                "the client is detached: the target serves this port again"
            );
        }
    }

    /// Puts the subscriptions kept by [`Access::suspend`] back into the hub.
    /// Returns those the hub refused now (e.g. another session stole the port
    /// meanwhile), with the reason; they are dropped.
    pub async fn resume(self: &Arc<Self>) -> Vec<(u16, String)> {
        let mut role = self.role.lock().await;
        if !self.suspended.swap(false, Ordering::SeqCst) {
            return Vec::new();
        }
        let subs = self
            .subscriptions
            .lock()
            .expect("subscriptions lock poisoned")
            .clone();
        let mut refused = Vec::new();
        if subs.is_empty() {
            return refused;
        }
        if let Err(e) = self.ensure(&mut role).await {
            refused.extend(subs.iter().map(|s| (s.port, e.to_string())));
        } else {
            for sub in subs {
                let port = sub.port;
                match self.subscribe_in(&role, sub).await {
                    Ok(()) => tracing::info!(port, "the client is back: subscribed again"),
                    Err(e) => refused.push((port, e)),
                }
            }
        }
        self.subscriptions
            .lock()
            .expect("subscriptions lock poisoned")
            .retain(|s| !refused.iter().any(|(port, _)| *port == s.port));
        refused
    }

    /// Every subscription on the target; empty when no hub exists.
    pub async fn list(self: &Arc<Self>) -> Result<Vec<SessionListing>, String> {
        let role = self.role.lock().await;
        let listing = match &*role {
            Role::Owner { hub, .. } => return Ok(hub.list()),
            Role::Client { conn } => conn.call(ToHub::List).await,
            Role::Idle => match HubConn::connect("", "").await {
                Ok(conn) => conn.call(ToHub::List).await,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                    ) =>
                {
                    return Ok(Vec::new());
                }
                Err(e) => Err(e),
            },
        };
        match listing {
            Ok(FromHub::Listing(l)) => Ok(l),
            Ok(FromHub::Done(e)) => Err(e.unwrap_or_else(|| "the hub answered out of turn".into())),
            Err(e) => Err(format!("the target's hub is unreachable: {e}")),
        }
    }

    /// Ends this session's part: its subscriptions go at once.
    pub async fn close(&self) {
        let mut role = self.role.lock().await;
        match std::mem::replace(&mut *role, Role::Idle) {
            Role::Owner { hub, owner, server } => {
                server.abort();
                hub.drop_owner(owner).await;
            }
            Role::Client { conn } => drop(conn),
            Role::Idle => {}
        }
        if let Some(task) = self
            .deliveries
            .lock()
            .expect("deliveries lock poisoned")
            .take()
        {
            task.abort();
        }
    }
}
