//! One session: the link to the agent and the state every layer connection shares.
//!
//! Frames leave through one writer task fed by the `outbox` channel (so a request,
//! a steal and a thousand splices interleave without locking the link) and arrive
//! in one reader task that dispatches each [`AgentMessage`] to whoever waits for it:
//! a pending request, a pending steal or connect, or a connection's own event
//! channel. A keepalive task pings the agent; the reader declares the link dead
//! when nothing arrives for [`SessionOptions::dead_after`].
//!
//! When the link ends, for any reason, [`Shared::end`] fails everything at once:
//! pending requests, steals and connects see their senders dropped, and every
//! connection's event channel closes, which resets its local socket.
//!
//! This file holds the options and the public [`Session`]; `session/shared.rs`
//! the shared state, its dispatch and the link's tasks.

use std::{
    collections::{HashMap, hash_map::Entry},
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use graft_protocol::{
    ConnectionId, RequestId, Transport,
    codec::FrameCodec,
    incoming::{
        HttpFilterSpec, IncomingMode, SubscribeError, Subscription as PortSubscription,
        TLS_STEAL_SINCE, TlsTermination, knows_tls_steal,
    },
    layer::DeliveredPeer,
    link::{AgentMessage, ClientMessage, Hello, HelloReply},
    remote::{RemoteRequest, RemoteResponse},
    version::{
        FEATURE_DIRECT, FEATURE_DIRECT6, FEATURE_FDS, FEATURE_ROUTES, FEATURE_TAP_TIMES,
        check_compatible, has_feature, version_with,
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_util::codec::{Framed, FramedRead, FramedWrite};

use crate::{Delivery, LinkEnd, ProxyError, flows, splice};

pub mod direct;
mod listen;
mod passed;
mod shared;

pub(crate) use self::shared::{API_OWNER, Accepts, ConnEvent, ConnEvents, Shared, lock};
use self::shared::{check_owners, keepalive, message_name, read_loop, write_loop};

type LinkCodec = FrameCodec<AgentMessage, ClientMessage>;

/// Frames queued for the writer task before senders wait.
const OUTBOX_LEN: usize = 256;

/// Timeouts and switches of a session; [`Default`] holds the production values.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// How often the proxy pings the agent.
    pub ping_interval: Duration,
    /// The link is declared dead when no frame at all arrives for this long.
    pub dead_after: Duration,
    /// How long [`Session::connect`] waits for the agent's `Hello`.
    pub handshake_timeout: Duration,
    /// How long an outgoing TCP relay waits for the program to connect to it, and a
    /// stolen connection's delivery waits for the local listener.
    pub relay_timeout: Duration,
    /// An outgoing UDP flow with no datagram either way for this long is dropped.
    pub udp_idle: Duration,
    /// How often the owners of stolen ports are checked to be alive.
    pub owner_check_interval: Duration,
    /// Print `graft: stealing port P of the target → local ADDR` to stderr when a
    /// steal (or mirror) starts, and the agent's refusal when it fails.
    pub announce_steals: bool,
    /// Whether the ports the program listens on are stolen or mirrored.
    pub incoming_mode: IncomingMode,
    /// Only HTTP requests this filter matches are stolen or mirrored.
    pub filter: Option<HttpFilterSpec>,
    /// The mode is the default one (nobody chose it): the announcement says so.
    pub incoming_defaulted: bool,
    /// `--port-map`: (local port, target port) pairs. With it the announcement
    /// knows which local port the program asked for, and says loudly when the
    /// layer had to move the program to another one (the asked port was busy).
    pub port_map: Vec<(u16, u16)>,
    /// Mirror only: ask the agent for the target's answers too; each mirrored
    /// connection then carries `graft_protocol::incoming::tap` frames (see
    /// `Subscription::responses`). For `graft record` and the shadow diff.
    pub tap_responses: bool,
    /// `--tls-cert`/`--tls-key`: the agent terminates TLS on filtered ports
    /// with this certificate (sent with each subscription, never logged).
    pub tls: Option<TlsTermination>,
    /// `[outgoing] local` (`--outgoing-local`): destinations a rule keeps on
    /// this machine. The layer never asks for them; a program's hand-made
    /// `Connect` or `ConnectFd` for one is refused with `EACCES` (address and
    /// port rules; a name rule needs the names the layer saw resolved).
    pub outgoing_local: Vec<graft_config::Destination>,
    /// With `tap_responses`: the connections of ports delivered to a local
    /// listener ([`Delivery::Listener`]) are handed here with the listener's
    /// address instead of being spliced to it (they carry tap frames, which the
    /// receiver demultiplexes: the shadow diff of `graft run --mirror --diff`).
    /// A full or closed channel resets the connection.
    pub tapped_listeners: Option<mpsc::Sender<(flows::IncomingTcp, std::net::SocketAddr)>>,
    /// A copy of each connection delivered to the program's listener, for the
    /// traffic inspector (see [`crate::IncomingTap`]); `None`: no copy.
    pub incoming_tap: Option<crate::IncomingTap>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            ping_interval: Duration::from_secs(5),
            dead_after: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            relay_timeout: Duration::from_secs(10),
            udp_idle: Duration::from_secs(5 * 60),
            owner_check_interval: Duration::from_secs(1),
            announce_steals: true,
            incoming_mode: IncomingMode::Steal,
            filter: None,
            incoming_defaulted: false,
            port_map: Vec::new(),
            tap_responses: false,
            tls: None,
            outgoing_local: Vec::new(),
            tapped_listeners: None,
            incoming_tap: None,
        }
    }
}

/// What the agent said about itself when it accepted the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// The agent's protocol version.
    pub version: String,
    /// The target process as the agent sees it.
    pub target_pid: u32,
}

/// The local end of a session with an agent: multiplexes every layer connection of
/// the user's program over one link.
///
/// Dropping a `Session` ends the link as [`Session::close`] does, without waiting
/// for the last frames to leave.
pub struct Session {
    shared: Arc<Shared>,
    agent: AgentInfo,
    writer: Option<JoinHandle<()>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    layer_sockets: Mutex<Vec<PathBuf>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Opens a session over `stream` (a Unix socket to a local agent, or a
    /// port-forward stream) with the default [`SessionOptions`]; see
    /// [`Session::connect_with`].
    ///
    /// # Errors
    ///
    /// As [`Session::connect_with`].
    pub async fn connect<S>(stream: S, secret: &str, client: &str) -> Result<Session, ProxyError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Session::connect_with(stream, secret, client, SessionOptions::default()).await
    }

    /// Opens a session over `stream`: sends `Hello` with `secret` and `client`
    /// (user@host), checks the agent's answer, and starts the link's tasks on the
    /// current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`ProxyError::Rejected`] with the agent's reason, [`ProxyError::Version`] when
    /// the agent's version is incompatible (naming both), [`ProxyError::HandshakeTimeout`],
    /// [`ProxyError::Handshake`] or [`ProxyError::Frame`] when the link fails first.
    pub async fn connect_with<S>(
        stream: S,
        secret: &str,
        client: &str,
        options: SessionOptions,
    ) -> Result<Session, ProxyError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Session::open(stream, secret, client, options, None).await
    }

    /// Opens a session over a Unix socket to an agent on this machine, as
    /// [`Session::connect_with`] does, offering descriptor passing
    /// ([`graft_protocol::fdpass`]): when the agent takes it up, remote files
    /// reach the program as the real file's descriptor. With `pass_fds` false
    /// (or an agent that does not offer it) every byte is relayed as before.
    ///
    /// # Errors
    ///
    /// As [`Session::connect_with`].
    pub async fn connect_unix(
        stream: tokio::net::UnixStream,
        secret: &str,
        client: &str,
        options: SessionOptions,
        pass_fds: bool,
    ) -> Result<Session, ProxyError> {
        if !pass_fds {
            return Session::open(stream, secret, client, options, None).await;
        }
        let (stream, fds) = graft_protocol::fdpass::FdStream::new(stream);
        Session::open(stream, secret, client, options, Some(fds)).await
    }

    async fn open<S>(
        stream: S,
        secret: &str,
        client: &str,
        options: SessionOptions,
        fds: Option<Arc<graft_protocol::fdpass::FdQueues>>,
    ) -> Result<Session, ProxyError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut framed = Framed::new(stream, LinkCodec::new());
        let wants_routes = options
            .incoming_tap
            .as_ref()
            .is_some_and(crate::IncomingTap::wants_routes);
        // graft reads tap times wherever it reads tap frames (graft_traffic::tap).
        let features: Vec<&str> = [
            (fds.is_some(), FEATURE_FDS),
            (fds.is_some() && direct::wanted(), FEATURE_DIRECT),
            (fds.is_some() && direct::wanted(), FEATURE_DIRECT6),
            (wants_routes, FEATURE_ROUTES),
            (true, FEATURE_TAP_TIMES),
        ]
        .into_iter()
        .filter_map(|(on, tag)| on.then_some(tag))
        .collect();
        let hello = ClientMessage::Hello(Hello {
            version: version_with(&features),
            secret: secret.to_owned(),
            client: client.to_owned(),
        });
        let handshake = async {
            framed.send(hello).await?;
            match framed.next().await {
                Some(Ok(AgentMessage::Hello(reply))) => Ok(reply),
                Some(Ok(AgentMessage::Fatal { message })) => {
                    Err(ProxyError::Rejected { reason: message })
                }
                Some(Ok(other)) => Err(ProxyError::Handshake(format!(
                    "expected Hello, the agent sent {}",
                    message_name(&other)
                ))),
                Some(Err(e)) => Err(ProxyError::Frame(e)),
                None => Err(ProxyError::Handshake(
                    "the agent closed the link without answering; see its log".into(),
                )),
            }
        };
        let reply = tokio::time::timeout(options.handshake_timeout, handshake)
            .await
            .map_err(|_| ProxyError::HandshakeTimeout(options.handshake_timeout))??;
        let agent = match reply {
            HelloReply::Accepted {
                version,
                target_pid,
            } => {
                check_compatible(&version)?;
                if options.tls.is_some() && !knows_tls_steal(&version) {
                    return Err(ProxyError::Rejected {
                        reason: format!(
                            "the agent speaks protocol {version}, which cannot terminate TLS \
                             (--tls-cert needs {TLS_STEAL_SINCE} or later): use graft-agent \
                             from the same release as graft"
                        ),
                    });
                }
                AgentInfo {
                    version,
                    target_pid,
                }
            }
            HelloReply::Rejected { reason } => return Err(ProxyError::Rejected { reason }),
        };

        let parts = framed.into_parts();
        let (read_half, write_half) = tokio::io::split(parts.io);
        let mut reader = FramedRead::new(read_half, LinkCodec::new());
        // Keep anything that arrived right behind the Hello.
        *reader.read_buffer_mut() = parts.read_buf;
        let writer = FramedWrite::new(write_half, LinkCodec::new());

        let (outbox_tx, outbox_rx) = mpsc::channel(OUTBOX_LEN);
        let (end_tx, _) = watch::channel(None);
        let fds = fds.filter(|_| has_feature(&agent.version, FEATURE_FDS));
        tracing::debug!(
            "files from the agent: {}",
            if fds.is_some() {
                "descriptors passed (the agent is on this machine)"
            } else {
                "relayed"
            }
        );
        let direct = fds.is_some() && has_feature(&agent.version, FEATURE_DIRECT);
        let shared = Arc::new(Shared::new(outbox_tx, end_tx, options, fds));
        shared
            .direct
            .store(direct, std::sync::atomic::Ordering::Relaxed);
        let writer = tokio::spawn(write_loop(writer, outbox_rx, shared.clone()));
        let mut tasks = vec![
            tokio::spawn(read_loop(reader, shared.clone())),
            tokio::spawn(keepalive(shared.clone())),
            tokio::spawn(check_owners(shared.clone())),
        ];
        if let Some(tap) = shared.options.incoming_tap.clone()
            && tap.wants_routes()
            && has_feature(&agent.version, FEATURE_ROUTES)
        {
            let link = shared.clone();
            tasks.push(tokio::spawn(tap.follow_watchers(move |on| {
                let link = link.clone();
                async move { link.send(ClientMessage::WatchRoutes(on)).await.is_ok() }
            })));
        }
        Ok(Session {
            shared,
            agent,
            writer: Some(writer),
            tasks: Mutex::new(tasks),
            layer_sockets: Mutex::new(Vec::new()),
        })
    }

    /// The state the link's tasks share, for the other modules of this crate.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// What the agent said about itself.
    pub fn agent(&self) -> &AgentInfo {
        &self.agent
    }

    /// Makes `other` (a session with the agent of another pod of the same
    /// workload) a secondary of this one: from now on every port the program
    /// listens on is subscribed there too, and its incoming connections reach the
    /// same local listener. A secondary that fails to subscribe is reported and
    /// skipped; the program's `listen` follows this session's agent only.
    pub fn add_secondary(&self, other: &Session) {
        lock(&self.shared.secondaries).push(other.shared.clone());
    }

    /// The handle that pauses the session's direct listeners while somebody
    /// watches its traffic (see [`direct::PauseHandle`]).
    pub fn pause_handle(&self) -> direct::PauseHandle {
        direct::PauseHandle(self.shared.clone())
    }

    /// The target's ports whose subscription the agent refused during this
    /// session (a steal conflict, a bad filter, a failed redirect), in order.
    pub fn refused_ports(&self) -> Vec<u16> {
        lock(&self.shared.refused).clone()
    }

    /// Sends one remote operation to the agent and waits for its answer.
    ///
    /// # Errors
    ///
    /// [`ProxyError::LinkClosed`] when the link is gone before the answer arrives.
    /// An operation that failed in the target is `Ok(RemoteResponse::Error(..))`.
    ///
    /// # Cancel safety
    ///
    /// Cancelling forgets the answer; the agent still performs the operation.
    pub async fn remote(&self, request: RemoteRequest) -> Result<RemoteResponse, ProxyError> {
        self.shared.request(request).await
    }

    /// Binds the layer's Unix socket at `path` (mode 0600; a stale socket file there
    /// is replaced) and serves every layer connection on it until the session
    /// closes.
    ///
    /// # Errors
    ///
    /// [`ProxyError::Bind`] when the socket cannot be bound.
    pub fn serve_layer(&self, path: &Path) -> Result<(), ProxyError> {
        let listener = crate::layer::bind(path)?;
        let task = tokio::spawn(crate::layer::serve(listener, self.shared.clone()));
        lock(&self.tasks).push(task);
        lock(&self.layer_sockets).push(path.to_owned());
        Ok(())
    }

    /// A future that resolves with the reason the link ended. It may be created
    /// once and awaited later; it never resolves while the link is up.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub fn closed(&self) -> impl Future<Output = LinkEnd> + Send + 'static {
        let mut end = self.shared.end_tx.subscribe();
        async move {
            match end.wait_for(Option::is_some).await {
                Ok(reason) => reason.clone().unwrap_or(LinkEnd::Closed),
                Err(_) => LinkEnd::Closed,
            }
        }
    }

    /// Why the link ended, or `None` while it is up. Set before the session's
    /// connections are reset, so a program that ended on such a reset finds
    /// it here.
    pub fn link_end(&self) -> Option<LinkEnd> {
        self.shared.end_tx.borrow().clone()
    }

    /// Closes the session: stops serving the layer, resets every local
    /// connection, sends what is queued and shuts the link's write side so the
    /// agent removes its packet rules and exits. Waits at most 2 s for the link.
    pub async fn close(mut self) {
        // Before the agent hears of the end (see `Shared::reset_passed`).
        self.shared.reset_passed();
        self.shared.end(LinkEnd::Closed);
        if let Some(writer) = self.writer.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        }
        // Drop does the rest: abort the tasks, remove the layer sockets.
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.end(LinkEnd::Closed);
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        for path in lock(&self.layer_sockets).drain(..) {
            let _ = std::fs::remove_file(path);
        }
    }
}
