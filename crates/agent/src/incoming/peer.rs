//! Several sessions on one target: the agents of a target's network namespace
//! share one [`Hub`], owned by one of them, and only graft's own agents may join.
//!
//! # Who may join, and how a joining agent knows the hub is real
//!
//! Membership is proved by knowing the hub key ([`key`]), a random secret the
//! hub's owner keeps in an nf_tables table of the target's network namespace.
//! Only a process with `CAP_NET_ADMIN` over the user namespace that owns that
//! network namespace can read nf_tables at all, and that is exactly the
//! privilege graft's agent needs to redirect traffic itself, so the check admits
//! every agent and nothing that could not steal the traffic anyway:
//!
//! - a process of the pod without `CAP_NET_ADMIN` (root or not) gets `EPERM`;
//! - a process that made a user namespace of its own (`unshare -Ur`) has
//!   `CAP_NET_ADMIN` only there, not over the pod's network namespace: `EPERM`;
//! - agents in different PID namespaces (an ephemeral container in the pod's PID
//!   namespace, a node-mode agent with `hostPID`, a short-lived agent for
//!   `graft ls`) all pass: nothing depends on seeing the peer's PID.
//!
//! Alternatives and why not: the peer's capabilities from `/proc/PID/status`
//! (`SO_PEERCRED`'s pid) only work when the peer is visible in this agent's PID
//! namespace, and capabilities there are relative to the peer's *own* user
//! namespace, which is what `unshare -Ur` abused; `SO_PEERCRED`'s uid translated
//! into our user namespace cannot tell a root process of the pod without
//! `CAP_NET_ADMIN` from an agent; `SO_PEERPIDFD` names the process across PID
//! namespaces but the kernel offers no way to read a capability set through a
//! pidfd. Proof by action (the prover creates a nonce-named object only a
//! privileged process can create) proves the same privilege as reading the key,
//! but is not bound to the link: a squatter could relay one agent's proof to
//! another. The key's proofs are HMACs over both ends' nonces and the prover's
//! role, so nothing can be relayed or reflected.
//!
//! The hub's abstract socket name comes from the key ([`key::Key::hub_name`]):
//! abstract names belong to the network namespace (unix(7)), so every agent there
//! finds it, but a process that cannot read the key cannot know it in advance to
//! squat it. A joining agent still checks the hub's proof before it says anything,
//! and refuses a hub that cannot prove it (the session then fails with a clear
//! error; no rule is installed, so the target keeps serving its own traffic).
//!
//! # The link
//!
//! A `SOCK_SEQPACKET` Unix socket ([`link`]): `Challenge` → `Proof` → `Proof` →
//! `Done`, then `Subscribe` / `Unsubscribe` / `List` (and `Moved` / `Live`
//! during a [`handover`], which the hub starts with `Handover` / `Release`),
//! each answered in order. Each
//! connection routed to a peer's session arrives on the same link as a
//! `Delivery` carrying a descriptor: the client's TCP socket itself when the
//! whole connection is the peer's, else one end of a socket pair the hub relays
//! into. The hub never connects to a socket a peer names, and connections handed
//! over whole live in the peer agent's process, so they outlive the hub's owner.
//!
//! # Ownership
//!
//! The agent whose `NLM_F_EXCL` creation of the key's table succeeds owns the hub
//! (the kernel lets exactly one win). When its link to a peer closes, that peer's
//! subscriptions go at once. When the owner's session ends normally it hands the
//! hub over ([`handover`]): the others elect a new owner and move their
//! subscriptions to it while the old owner's rules still catch every new
//! connection, and the old owner then relays the connections it holds until they
//! end (at most [`handover::DRAIN_MAX`]). When the owner is killed, the kernel
//! deletes the table with the owner's netlink socket; the others race to publish
//! a new key, one wins, and each re-subscribes; connections the dead owner
//! relayed are reset.

mod access;
pub mod handover;
pub mod key;
pub mod link;

pub use access::Access;
pub use handover::Handover;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use graft_protocol::incoming::{SessionListing, SubscribeError, Subscription};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

use self::key::{Key, Role as Prover};
use self::link::{Link, Listener};
use super::{BoxFuture, BoxIo, ConnMeta, Hub, OwnerId, Subscriber};

/// How long each step of the hub handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most ports one peer agent may hold.
const MAX_PORTS_PER_PEER: usize = 64;

/// A peer agent's message to the hub.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToHub {
    /// First message: the peer's nonce; the hub answers with its own and its proof.
    Challenge {
        /// Random, fresh per link.
        nonce: [u8; key::LEN],
    },
    /// Second message: the peer's proof that it knows the key.
    Proof {
        /// [`Key::proof`] by [`Prover::Peer`].
        proof: [u8; key::LEN],
    },
    /// Subscribe (or replace the subscription of a port).
    Subscribe {
        /// The session's `user@host`.
        client: String,
        /// What it asks for.
        subscription: Subscription,
        /// When the session first subscribed the port (seconds since the Unix
        /// epoch): kept across hub take-overs, so the oldest filter keeps winning.
        since_unix: u64,
    },
    /// Drop the subscription of a port.
    Unsubscribe {
        /// The port.
        port: u16,
    },
    /// List every subscription.
    List,
    /// After [`FromHub::Handover`]: the peer's subscriptions are in the next hub
    /// (or could not be); deliveries of this hub still arrive on the link.
    Moved,
    /// After [`FromHub::Release`]: the peer's hub has its rules (or it is no owner).
    Live,
}

/// The hub's messages: one answer per [`ToHub`] message, in order, and
/// deliveries at any time after the handshake.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromHub {
    /// The answer to `Challenge`.
    Proof {
        /// The hub's nonce.
        nonce: [u8; key::LEN],
        /// [`Key::proof`] by [`Prover::Hub`].
        proof: [u8; key::LEN],
    },
    /// The answer to `Proof`, `Subscribe` and `Unsubscribe`: `None` on success.
    Done(Option<String>),
    /// The answer to `List`.
    Listing(Vec<SessionListing>),
    /// A connection for the peer's session; the message carries its descriptor.
    Delivery(Delivery),
    /// The owner's session ended and it hands the hub over: its key is withdrawn
    /// and its socket closed; elect or join the next hub, subscribe there
    /// (its rules stay staged) and answer [`ToHub::Moved`]. Until then, and
    /// while it relays connections it holds, this hub's rules and deliveries go
    /// on.
    Handover,
    /// Every peer has moved (or the wait ran out): the next hub may install its
    /// rules; answer [`ToHub::Live`] when they are in.
    Release,
    /// The answer to a refused `Subscribe`: why, as the client is told.
    Refused(SubscribeError),
}

/// What a delivered descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryKind {
    /// The client's TCP connection itself.
    Tcp,
    /// A Unix stream socket whose other end the hub relays.
    Relayed,
}

/// A delivered connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    /// What the descriptor is.
    pub kind: DeliveryKind,
    /// The target's port.
    pub port: u16,
    /// The client's address.
    pub peer: SocketAddr,
    /// The original destination.
    pub local: SocketAddr,
}

/// The peer agents of a hub, as its owner sees them: their links, and how far
/// each has come in a [`handover`].
#[derive(Default)]
pub struct Peers {
    links: std::sync::Mutex<HashMap<OwnerId, PeerState>>,
    /// Bumped at every change of `links`.
    changed: tokio::sync::watch::Sender<u64>,
}

/// One admitted peer.
struct PeerState {
    link: Arc<Link>,
    moved: bool,
    live: bool,
}

impl Peers {
    fn update(&self, change: impl FnOnce(&mut HashMap<OwnerId, PeerState>)) {
        change(&mut self.links.lock().expect("hub peers lock poisoned"));
        self.changed.send_modify(|v| *v += 1);
    }

    /// How many peers are linked.
    pub fn len(&self) -> usize {
        self.links.lock().expect("hub peers lock poisoned").len()
    }

    /// Whether no peer is linked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends `message` to every peer; a peer that cannot be reached is left to
    /// its link's end.
    async fn tell_all(&self, message: &FromHub) {
        let links: Vec<Arc<Link>> = self
            .links
            .lock()
            .expect("hub peers lock poisoned")
            .values()
            .map(|p| p.link.clone())
            .collect();
        for link in links {
            if let Err(e) = link.send(message, None).await {
                tracing::debug!("could not tell a peer agent {message:?}: {e}");
            }
        }
    }

    /// Waits until `done` holds for every linked peer (peers that leave count as
    /// done), at most `max`; returns whether it did.
    async fn wait_all(&self, max: Duration, done: impl Fn(&PeerState) -> bool) -> bool {
        let mut changed = self.changed.subscribe();
        let all = changed.wait_for(|_| {
            self.links
                .lock()
                .expect("hub peers lock poisoned")
                .values()
                .all(&done)
        });
        tokio::time::timeout(max, all).await.is_ok()
    }

    /// Drops every link: the peers see this hub end.
    fn close_all(&self) {
        self.update(|links| {
            for peer in links.values() {
                peer.link.shutdown();
            }
            links.clear();
        });
    }
}

/// Serves peer agents on `listener` for `hub`, keyed by `key`, until dropped;
/// admitted peers are kept in `peers`.
pub async fn serve_peers(listener: Listener, hub: Arc<Hub>, key: Key, peers: Arc<Peers>) {
    loop {
        let link = match listener.accept().await {
            Ok(link) => link,
            Err(e) => {
                tracing::warn!("accepting a peer agent failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(serve_peer(link, hub.clone(), key.clone(), peers.clone()));
    }
}

/// Who is at the other end, for logs.
fn describe(link: &Link) -> String {
    match link.peer_cred() {
        Some(c) if c.pid.as_raw_nonzero().get() > 0 => {
            format!(
                "process {} (uid {})",
                c.pid.as_raw_nonzero(),
                c.uid.as_raw()
            )
        }
        Some(c) => format!(
            "a process in another PID namespace (uid {})",
            c.uid.as_raw()
        ),
        None => "an unknown process".into(),
    }
}

async fn recv_in_time(link: &Link) -> io::Result<ToHub> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, link.recv::<ToHub>()).await {
        Ok(Ok(Some((message, None)))) => Ok(message),
        Ok(Ok(Some((_, Some(_))))) => Err(io::Error::other("a descriptor from a peer")),
        Ok(Ok(None)) => Err(io::Error::other("the link closed")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no answer")),
    }
}

/// The hub's side of the handshake: proves the key and checks the peer's proof.
async fn admit(link: &Link, key: &Key) -> io::Result<()> {
    let ToHub::Challenge { nonce: peer_nonce } = recv_in_time(link).await? else {
        return Err(io::Error::other("the first message was no Challenge"));
    };
    let hub_nonce = key::nonce()?;
    let proof = key.proof(Prover::Hub, &hub_nonce, &peer_nonce);
    link.send(
        &FromHub::Proof {
            nonce: hub_nonce,
            proof,
        },
        None,
    )
    .await?;
    let ToHub::Proof { proof } = recv_in_time(link).await? else {
        return Err(io::Error::other("the second message was no Proof"));
    };
    if !key.verify(Prover::Peer, &hub_nonce, &peer_nonce, &proof) {
        let _ = link
            .send(
                &FromHub::Done(Some("wrong hub key proof: not a graft agent".into())),
                None,
            )
            .await;
        return Err(io::Error::other(
            "it does not know the hub key, so it lacks CAP_NET_ADMIN over the target's \
             network namespace",
        ));
    }
    link.send(&FromHub::Done(None), None).await
}

async fn serve_peer(link: Link, hub: Arc<Hub>, key: Key, peers: Arc<Peers>) {
    let who = describe(&link);
    if let Err(e) = admit(&link, &key).await {
        tracing::warn!("refused {who} at the hub: {e}");
        return;
    }
    let link = Arc::new(link);
    let owner = hub.new_owner();
    peers.update(|links| {
        links.insert(
            owner,
            PeerState {
                link: link.clone(),
                moved: false,
                live: false,
            },
        );
    });
    let to: Arc<dyn Subscriber> = Arc::new(PeerSubscriber { link: link.clone() });
    let mut ports: Vec<u16> = Vec::new();
    tracing::info!(owner, "peer agent ({who}) joined the hub");
    loop {
        let message = match link.recv::<ToHub>().await {
            Ok(Some((message, None))) => message,
            Ok(Some((_, Some(_)))) => {
                tracing::warn!(owner, "a peer agent sent a descriptor; link closed");
                break;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(owner, "bad message from a peer agent ({e}); link closed");
                break;
            }
        };
        let reply = match message {
            ToHub::Challenge { .. } | ToHub::Proof { .. } => {
                FromHub::Done(Some("the handshake is over".into()))
            }
            ToHub::Subscribe {
                client,
                subscription,
                since_unix,
            } => {
                let port = subscription.port;
                if !ports.contains(&port) && ports.len() >= MAX_PORTS_PER_PEER {
                    FromHub::Refused(SubscribeError::Hub {
                        reason: format!(
                            "a session may hold at most {MAX_PORTS_PER_PEER} ports of a target"
                        ),
                    })
                } else {
                    let result = hub
                        .subscribe(owner, &client, subscription, to.clone(), Some(since_unix))
                        .await;
                    if result.is_ok() && !ports.contains(&port) {
                        ports.push(port);
                    }
                    match result {
                        Ok(()) => FromHub::Done(None),
                        Err(e) => FromHub::Refused(e),
                    }
                }
            }
            ToHub::Unsubscribe { port } => {
                hub.unsubscribe(owner, port).await;
                ports.retain(|p| *p != port);
                FromHub::Done(None)
            }
            ToHub::List => FromHub::Listing(hub.list()),
            ToHub::Moved => {
                peers.update(|links| {
                    if let Some(peer) = links.get_mut(&owner) {
                        peer.moved = true;
                    }
                });
                FromHub::Done(None)
            }
            ToHub::Live => {
                peers.update(|links| {
                    if let Some(peer) = links.get_mut(&owner) {
                        peer.live = true;
                    }
                });
                FromHub::Done(None)
            }
        };
        if link.send(&reply, None).await.is_err() {
            break;
        }
    }
    tracing::info!(owner, "peer agent left the hub");
    peers.update(|links| {
        links.remove(&owner);
    });
    hub.drop_owner(owner).await;
}

/// Delivers to another agent as descriptors on its hub link.
struct PeerSubscriber {
    link: Arc<Link>,
}

impl PeerSubscriber {
    async fn deliver(&self, kind: DeliveryKind, meta: ConnMeta, fd: OwnedFd) -> io::Result<()> {
        let delivery = FromHub::Delivery(Delivery {
            kind,
            port: meta.port,
            peer: meta.peer,
            local: meta.local,
        });
        self.link.send(&delivery, Some(fd.as_fd())).await
    }
}

impl Subscriber for PeerSubscriber {
    fn open(self: Arc<Self>, meta: ConnMeta) -> BoxFuture<io::Result<BoxIo>> {
        Box::pin(async move {
            let (mine, theirs) = std::os::unix::net::UnixStream::pair()?;
            self.deliver(DeliveryKind::Relayed, meta, theirs.into())
                .await?;
            mine.set_nonblocking(true)?;
            Ok(Box::new(tokio::net::UnixStream::from_std(mine)?) as BoxIo)
        })
    }

    fn hand_over(self: Arc<Self>, meta: ConnMeta, stream: TcpStream) -> BoxFuture<io::Result<()>> {
        Box::pin(async move {
            // The socket itself goes to the peer: the connection no longer
            // depends on this process.
            let fd: OwnedFd = stream.into_std()?.into();
            self.deliver(DeliveryKind::Tcp, meta, fd).await
        })
    }
}

/// Turns a delivered descriptor into a stream.
fn delivered_stream(kind: DeliveryKind, fd: OwnedFd) -> io::Result<BoxIo> {
    Ok(match kind {
        DeliveryKind::Tcp => {
            let std = std::net::TcpStream::from(fd);
            std.set_nonblocking(true)?;
            Box::new(TcpStream::from_std(std)?)
        }
        DeliveryKind::Relayed => {
            let std = std::os::unix::net::UnixStream::from(fd);
            std.set_nonblocking(true)?;
            Box::new(tokio::net::UnixStream::from_std(std)?)
        }
    })
}

/// What a joining agent does with each delivered connection.
pub type AcceptDelivery = Arc<dyn Fn(Delivery, BoxIo) + Send + Sync>;

/// Why joining a hub failed.
#[derive(Debug)]
enum JoinError {
    /// Nothing listens at the key's name yet (or any more).
    NotThere(io::Error),
    /// Something listens but it is not a graft hub, or the link broke.
    Refused(String),
}

/// How far the hub at the other end of a [`HubConn`] has come; only moves
/// forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HubState {
    /// The hub serves as usual.
    Open,
    /// Its owner hands it over ([`FromHub::Handover`]).
    HandingOver,
    /// Every peer has moved: the next hub may go live ([`FromHub::Release`]).
    Released,
    /// The link ended.
    Closed,
}

/// A connection to the hub of another agent.
pub struct HubConn {
    /// The link and the answers, taken together by one call at a time.
    calls: Mutex<mpsc::UnboundedReceiver<FromHub>>,
    link: Arc<Link>,
    state: tokio::sync::watch::Receiver<HubState>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for HubConn {
    fn drop(&mut self) {
        self.link.shutdown();
        self.reader.abort();
    }
}

impl HubConn {
    /// Connects to the hub keyed by `key`, checks its proof and gives ours;
    /// deliveries go to `accept`.
    async fn connect(key: &Key, accept: Option<AcceptDelivery>) -> Result<HubConn, JoinError> {
        let name = key.hub_name();
        let link = Link::connect_abstract(&name).map_err(JoinError::NotThere)?;
        let refused = |what: String| {
            JoinError::Refused(format!(
                "the process holding the target's hub socket @{name} ({}) {what}; \
                 refusing to join it. Some program in the target's network namespace may \
                 be impersonating graft's hub: find it with `ss -xlp | grep graft-hub` in \
                 the target's network namespace",
                describe(&link)
            ))
        };
        let peer_nonce = key::nonce().map_err(|e| JoinError::Refused(e.to_string()))?;
        let step = async {
            link.send(&ToHub::Challenge { nonce: peer_nonce }, None)
                .await?;
            link.recv::<FromHub>().await
        };
        let (hub_nonce, proof) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, step).await {
            Ok(Ok(Some((FromHub::Proof { nonce, proof }, None)))) => (nonce, proof),
            Ok(Ok(None)) => return Err(JoinError::NotThere(io::ErrorKind::ConnectionReset.into())),
            Ok(Ok(Some(_))) => {
                return Err(refused("answered the challenge with something else".into()));
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(refused(format!("does not speak the hub protocol ({e})")));
            }
            Ok(Err(e)) => return Err(JoinError::NotThere(e)),
            Err(_) => return Err(refused("did not answer the challenge within 5 s".into())),
        };
        if !key.verify(Prover::Hub, &hub_nonce, &peer_nonce, &proof) {
            return Err(refused("could not prove it knows the hub key".into()));
        }
        let ours = key.proof(Prover::Peer, &hub_nonce, &peer_nonce);
        let step = async {
            link.send(&ToHub::Proof { proof: ours }, None).await?;
            link.recv::<FromHub>().await
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, step).await {
            Ok(Ok(Some((FromHub::Done(None), None)))) => {}
            Ok(Ok(Some((FromHub::Done(Some(e)), None)))) => {
                return Err(JoinError::Refused(format!(
                    "the hub refused this agent: {e}"
                )));
            }
            Ok(Ok(None)) => return Err(JoinError::NotThere(io::ErrorKind::ConnectionReset.into())),
            Ok(Ok(Some(_))) | Ok(Err(_)) | Err(_) => {
                return Err(refused("broke off the handshake".into()));
            }
        }

        let link = Arc::new(link);
        let (tx, rx) = mpsc::unbounded_channel();
        let (state_tx, state) = tokio::sync::watch::channel(HubState::Open);
        let advance = move |to: HubState| {
            state_tx.send_if_modified(|s| {
                let later = to > *s;
                if later {
                    *s = to;
                }
                later
            });
        };
        let reader_link = link.clone();
        let reader = tokio::spawn(async move {
            loop {
                match reader_link.recv::<FromHub>().await {
                    Ok(Some((FromHub::Handover, None))) => advance(HubState::HandingOver),
                    Ok(Some((FromHub::Release, None))) => advance(HubState::Released),
                    Ok(Some((FromHub::Delivery(delivery), Some(fd)))) => {
                        let Some(accept) = &accept else { continue };
                        match delivered_stream(delivery.kind, fd) {
                            Ok(stream) => accept(delivery, stream),
                            Err(e) => tracing::debug!("unusable delivery: {e}"),
                        }
                    }
                    Ok(Some((FromHub::Delivery(_), None))) => {
                        tracing::debug!("a delivery without its connection");
                    }
                    Ok(Some((reply, _))) => {
                        if tx.send(reply).is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("bad message from the hub ({e}); leaving it");
                        break;
                    }
                }
            }
            advance(HubState::Closed);
        });
        Ok(HubConn {
            calls: Mutex::new(rx),
            link,
            state,
            reader,
        })
    }

    /// Sends one message and waits for its answer.
    ///
    /// # Errors
    ///
    /// The link to the hub broke.
    pub async fn call(&self, message: ToHub) -> io::Result<FromHub> {
        let mut replies = self.calls.lock().await;
        self.link.send(&message, None).await?;
        replies
            .recv()
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the hub agent is gone"))
    }

    /// Resolves when the hub is at `state` or later, and returns where it is.
    pub async fn reached(&self, state: HubState) -> HubState {
        let mut states = self.state.clone();
        states
            .wait_for(|s| *s >= state)
            .await
            .map_or(HubState::Closed, |s| *s)
    }
}

/// Why this agent could neither join nor become the target's hub, or could not
/// ask it; the message goes to the client (`SubscribeError::Hub`).
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The hub key could not be read or published.
    #[error(transparent)]
    Key(#[from] key::KeyError),
    /// The hub's abstract socket name is taken.
    #[error(
        "could not listen as the target's hub at @{name}: {error}; a process that can read \
         the hub key holds the name"
    )]
    Listen {
        /// The abstract socket name.
        name: String,
        /// What `bind` said.
        error: io::Error,
    },
    /// The election never settled.
    #[error("could not reach or become the target's hub: its owner keeps changing")]
    OwnerKeepsChanging,
    /// The key is published but no hub answers at its socket.
    #[error("the target's hub key is published but nothing answers at its socket")]
    NoAnswer,
    /// The process at the hub's socket is not a graft hub, or the link broke.
    #[error("{0}")]
    Refused(String),
    /// The hub's link failed during a call.
    #[error("the target's hub is unreachable: {0}")]
    Unreachable(io::Error),
    /// The hub answered with an error of its own.
    #[error("{0}")]
    Answered(String),
    /// The hub answered something other than what was asked.
    #[error("the hub answered out of turn")]
    OutOfTurn,
}

/// Joins the current hub, if there is one: `Ok(None)` when none exists.
async fn join_existing(accept: Option<AcceptDelivery>) -> Result<Option<HubConn>, HubError> {
    for _ in 0..100 {
        let key = match key::read() {
            Ok(Some(key)) => key,
            Ok(None) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match HubConn::connect(&key, accept.clone()).await {
            Ok(conn) => return Ok(Some(conn)),
            // The owner published its key and is about to listen, or just left.
            Err(JoinError::NotThere(e)) => {
                tracing::debug!("hub not reachable yet ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(JoinError::Refused(e)) => return Err(HubError::Refused(e)),
        }
    }
    Err(HubError::NoAnswer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hub_that_cannot_prove_the_key_is_refused_before_we_prove_ours() {
        let key = Key::generate().unwrap();
        let listener = Listener::bind_abstract(&key.hub_name()).unwrap();
        let impostor = tokio::spawn(async move {
            let link = listener.accept().await.unwrap();
            let _challenge = link.recv::<ToHub>().await.unwrap();
            let guess = FromHub::Proof {
                nonce: [1; key::LEN],
                proof: [2; key::LEN],
            };
            link.send(&guess, None).await.unwrap();
            // Whatever the agent says next (nothing: it leaves).
            link.recv::<ToHub>().await.ok().flatten().map(|(m, _)| m)
        });
        let Err(JoinError::Refused(error)) = HubConn::connect(&key, None).await else {
            panic!("the impostor was accepted");
        };
        assert!(
            error.contains("could not prove it knows the hub key; refusing to join it"),
            "{error}"
        );
        assert!(
            impostor.await.unwrap().is_none(),
            "the agent gave its proof to an impostor"
        );
    }

    #[tokio::test]
    async fn the_hub_refuses_a_peer_with_a_wrong_proof_and_admits_one_with_the_key() {
        let key = Key::generate().unwrap();
        let name = format!("graft-test-admit-{}", key.hub_name());
        let listener = Listener::bind_abstract(&name).unwrap();
        let hub_key = key.clone();
        let hub = tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..2 {
                let link = listener.accept().await.unwrap();
                results.push(admit(&link, &hub_key).await.is_ok());
            }
            results
        });
        for proof_with in [Key::generate().unwrap(), key.clone()] {
            let link = Link::connect_abstract(&name).unwrap();
            let peer_nonce = key::nonce().unwrap();
            link.send(&ToHub::Challenge { nonce: peer_nonce }, None)
                .await
                .unwrap();
            let Some((FromHub::Proof { nonce, proof }, None)) = link.recv().await.unwrap() else {
                panic!("no proof from the hub");
            };
            assert!(key.verify(Prover::Hub, &nonce, &peer_nonce, &proof));
            let ours = proof_with.proof(Prover::Peer, &nonce, &peer_nonce);
            link.send(&ToHub::Proof { proof: ours }, None)
                .await
                .unwrap();
            let answer = link.recv::<FromHub>().await.unwrap();
            let admitted = matches!(answer, Some((FromHub::Done(None), None)));
            assert_eq!(admitted, proof_with.hub_name() == key.hub_name());
        }
        assert_eq!(hub.await.unwrap(), [false, true]);
    }
}
