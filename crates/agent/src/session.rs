//! One session over the link: the handshake, then the loop that reads
//! [`ClientMessage`]s and dispatches them, and the writer that owns the link's
//! sink.
//!
//! Data flow:
//! - the link reader (this module's loop) never waits on anything slow: requests
//!   run in their own tasks, steals in the steal task, connects and relays in
//!   per-connection tasks, and connection commands go through unbounded
//!   per-connection channels ([`ConnTable`]);
//! - every task sends its [`AgentMessage`]s through the bounded `to_link` channel
//!   (backpressure from the link to the sockets); the loop's own short answers
//!   (`Pong`, `ConnectFailed` of a refused id, `Fatal`) use an unbounded control
//!   channel that the writer serves first, so the loop never blocks on the link.
//!
//! The session ends when the link closes or breaks, the target exits (`Fatal` is
//! sent), or the agent is told to stop. Every connection is then aborted; packet
//! rules are removed by the caller.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use graft_protocol::codec::FrameCodec;
use graft_protocol::link::{AgentMessage, ClientMessage, Hello, HelloReply};
use graft_protocol::remote::{RemoteError, RemoteRequest, RemoteResponse};
use graft_protocol::secret::{self, secrets_match};
use graft_protocol::version::{
    FEATURE_DIRECT, FEATURE_DIRECT6, FEATURE_FDS, FEATURE_ROUTES, FEATURE_TAP_TIMES, has_feature,
    version_with,
};
use graft_protocol::{ConnectionId, RequestId, version};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

use crate::dns::Dns;
use crate::files::{Files, TargetRoot};
use crate::incoming::peer::{Access, Delivery, Handover};
use crate::incoming::{BoxFuture, BoxIo, ConnMeta, Subscriber};
use crate::passing::FdSender;
use crate::relay::{self, ConnCommand, ConnTable};
use graft_protocol::incoming::{SubscribeError, Subscription, TlsTermination};
use std::sync::atomic::{AtomicU64, Ordering};

mod requests;
mod subscriber;
use requests::serve_request;
use subscriber::*;

/// Capacity of the bounded channel from the tasks to the link writer.
const TO_LINK_CAPACITY: usize = 256;
/// The most remote requests served at once; the link reader waits for one to
/// finish before it reads on, so a client that never reads its answers stops
/// being read instead of piling answers up in the agent.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 16;
/// Answers to requests waiting for the link writer. With
/// [`MAX_REQUESTS_IN_FLIGHT`] this bounds what requests hold: each answer
/// carries at most one file chunk (`graft_protocol::codec::MAX_CHUNK_LEN`).
const RESPONSES_CAPACITY: usize = 4;
/// Short answers of the link reader (`Pong`, refusals) waiting for the writer; a
/// client that lets this many pile up reads nothing, and its session ends.
pub const CONTROL_CAPACITY: usize = 1024;
/// How long the writer may take to flush the last messages at the end.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

/// What a session needs to know.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The target's PID.
    pub target_pid: u32,
    /// The secret a client must present.
    pub secret: Secret,
    /// The agent's chain name.
    pub chain: String,
    /// The target's root directory.
    pub root: Arc<TargetRoot>,
    /// Set when packet rules may have been installed.
    pub rules_touched: Arc<AtomicBool>,
    /// How long the client has to send `Hello`.
    pub hello_timeout: Duration,
    /// Whether the client is attached, for a link that survives its
    /// transport ([`graft_protocol::relink::Reattach::attached`]): while it is
    /// `false` the session's subscriptions are out of the hub, so the target
    /// serves its own traffic; they come back when the client does. `None`
    /// for a link that ends with its transport.
    pub attached: Option<tokio::sync::watch::Receiver<bool>>,
    /// The descriptor queues of a link that can pass descriptors (a Unix socket,
    /// [`graft_protocol::fdpass::FdStream`]); `None` on other links. Used only when
    /// the client's `Hello` names [`graft_protocol::version::FEATURE_FDS`].
    pub fds: Option<Arc<graft_protocol::fdpass::FdQueues>>,
}

/// Why the agent must stop, from outside the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The target process exited.
    TargetExited,
    /// A signal asked the agent to stop.
    Signal(&'static str),
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The handshake failed: the client was refused or spoke garbage.
    Refused(String),
    /// The client closed the link.
    LinkClosed,
    /// The link broke or the client broke the protocol.
    LinkError(String),
    /// The agent was stopped from outside (target exit, signal).
    Stopped(Stop),
}

/// What the agent knows of the session secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// The secret itself.
    Plain(String),
    /// Its SHA-256 (FIPS 180-4) as 64 lower-case hex digits.
    Sha256(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Plain(_) => "Secret::Plain(..)",
            Secret::Sha256(_) => "Secret::Sha256(..)",
        })
    }
}

impl Secret {
    /// Whether `given` is the session secret, in time independent of where it
    /// differs.
    pub fn accepts(&self, given: &str) -> bool {
        match self {
            Secret::Plain(expected) => secrets_match(given, expected),
            Secret::Sha256(expected) => {
                use sha2::Digest;
                let digest = sha2::Sha256::digest(given.as_bytes());
                secrets_match(secret::hex(digest), expected)
            }
        }
    }
}

/// Why a client's `Hello` was refused; its message is the reason sent in
/// `Rejected`.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The client speaks an incompatible protocol version.
    #[error(transparent)]
    Version(#[from] version::VersionError),
    /// The client does not know this session's secret.
    #[error("wrong session secret: this agent belongs to another graft session")]
    WrongSecret,
}

/// Checks a client's `Hello`: its protocol version, then its secret.
///
/// # Errors
///
/// [`HelloError`], whose message is sent to the client in `Rejected`.
pub fn check_hello(hello: &Hello, secret: &Secret) -> Result<(), HelloError> {
    version::check_compatible(&hello.version)?;
    if !secret.accepts(&hello.secret) {
        return Err(HelloError::WrongSecret);
    }
    Ok(())
}

/// What the link writer is told.
enum Outbound {
    Message(AgentMessage),
    /// Flush and close the link.
    Finish,
}

/// The largest frame a client may send before its `Hello` is accepted, in bytes:
/// a `Hello` is a few hundred bytes, so an unauthenticated peer cannot make the
/// agent buffer more than this.
pub const HELLO_MAX_FRAME: usize = 16 * 1024;

/// The link, framed for the agent's side.
pub type Link<S> = Framed<S, FrameCodec<ClientMessage, AgentMessage>>;

/// A client that passed the handshake: its link and its `Hello`.
pub struct Admitted<S> {
    link: Link<S>,
    hello: Hello,
    /// Both peers pass descriptors on this link.
    fds: bool,
}

/// Reads and checks the client's `Hello` on `io` (at most `timeout`), answers it,
/// and returns the admitted link; a refused client gets its reason in the reply.
///
/// # Errors
///
/// [`SessionEnd::Refused`] when the client sent no `Hello` in time, something
/// else first, a frame larger than [`HELLO_MAX_FRAME`], an incompatible version
/// or the wrong secret; [`SessionEnd::LinkError`] when the answer cannot be sent.
pub async fn handshake<S>(
    io: S,
    secret: &Secret,
    target_pid: u32,
    timeout: Duration,
    offer_fds: bool,
) -> Result<Admitted<S>, SessionEnd>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut framed = Framed::new(
        io,
        FrameCodec::<ClientMessage, AgentMessage>::with_max_len(HELLO_MAX_FRAME),
    );
    let hello = match tokio::time::timeout(timeout, framed.next()).await {
        Ok(Some(Ok(ClientMessage::Hello(hello)))) => hello,
        Ok(Some(Ok(other))) => {
            let reason = format!("the first message must be Hello, got {other:?}");
            let fatal = AgentMessage::Fatal {
                message: reason.clone(),
            };
            return Err(refuse(&mut framed, reason, fatal).await);
        }
        Ok(Some(Err(e))) => {
            let reason = e.to_string();
            let fatal = AgentMessage::Fatal {
                message: reason.clone(),
            };
            return Err(refuse(&mut framed, reason, fatal).await);
        }
        Ok(None) => {
            return Err(SessionEnd::Refused(
                "the client closed the link before Hello".into(),
            ));
        }
        Err(_) => {
            return Err(SessionEnd::Refused(format!(
                "the client sent no Hello within {} s",
                timeout.as_secs_f32()
            )));
        }
    };
    if let Err(refused) = check_hello(&hello, secret) {
        let reason = refused.to_string();
        let reply = AgentMessage::Hello(HelloReply::Rejected {
            reason: reason.clone(),
        });
        return Err(refuse(&mut framed, reason, reply).await);
    }
    // Descriptors pass only when this link can carry them and the client asks.
    let fds = offer_fds && has_feature(&hello.version, FEATURE_FDS);
    // Routing records go only to a client that reads them.
    let routes = has_feature(&hello.version, FEATURE_ROUTES);
    // Tap times go only to a client that reads them.
    let tap_times = has_feature(&hello.version, FEATURE_TAP_TIMES);
    // Direct listeners go only to a client that takes descriptors and them.
    let direct = fds && has_feature(&hello.version, FEATURE_DIRECT);
    let direct6 = direct && has_feature(&hello.version, FEATURE_DIRECT6);
    let features: Vec<&str> = [
        (fds, FEATURE_FDS),
        (direct, FEATURE_DIRECT),
        (direct6, FEATURE_DIRECT6),
        (routes, FEATURE_ROUTES),
        (tap_times, FEATURE_TAP_TIMES),
    ]
    .into_iter()
    .filter_map(|(on, tag)| on.then_some(tag))
    .collect();
    let accepted = AgentMessage::Hello(HelloReply::Accepted {
        version: version_with(&features),
        target_pid,
    });
    if let Err(e) = framed.send(accepted).await {
        return Err(SessionEnd::LinkError(e.to_string()));
    }
    // Authenticated: full-size frames from here on.
    framed
        .codec_mut()
        .set_max_len(graft_protocol::codec::MAX_FRAME_LEN);
    Ok(Admitted {
        link: framed,
        hello,
        fds,
    })
}

/// How a session ended, and the hub it leaves to hand over.
pub struct Ended {
    /// Why it ended.
    pub end: SessionEnd,
    /// The hub this session's agent owned, when other sessions are on it: to be
    /// handed over to them ([`Handover::run`]) or dropped to end it at once.
    pub handover: Option<Handover>,
}

impl From<SessionEnd> for Ended {
    fn from(end: SessionEnd) -> Ended {
        Ended {
            end,
            handover: None,
        }
    }
}

/// Serves one client on `io` until the session ends: the handshake, then the
/// session.
pub async fn run<S>(io: S, config: SessionConfig, stop: impl Future<Output = Stop>) -> Ended
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut stop = std::pin::pin!(stop);
    let handshake = handshake(
        io,
        &config.secret,
        config.target_pid,
        config.hello_timeout,
        config.fds.is_some(),
    );
    let admitted = tokio::select! {
        stopped = &mut stop => return SessionEnd::Stopped(stopped).into(),
        admitted = handshake => match admitted {
            Ok(admitted) => admitted,
            Err(end) => return end.into(),
        },
    };
    serve(admitted, config, stop).await
}

/// Serves an admitted client until the session ends.
pub async fn serve<S>(
    admitted: Admitted<S>,
    config: SessionConfig,
    stop: impl Future<Output = Stop>,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut stop = std::pin::pin!(stop);
    let Admitted {
        link: framed,
        hello,
        fds,
    } = admitted;
    let fds = config.fds.clone().filter(|_| fds);
    tracing::debug!(
        passes_descriptors = fds.is_some(),
        "files, outgoing sockets and whole stolen connections on this link: {}",
        if fds.is_some() {
            "descriptors passed"
        } else {
            "relayed (the client takes no descriptors, or the link is not a Unix socket)"
        }
    );
    tracing::info!(client = %hello.client, "session open");

    // The session proper.
    let (sink, mut from_link) = framed.split();
    let (control_tx, control_rx) = mpsc::channel(CONTROL_CAPACITY);
    let (to_link, data_rx) = mpsc::channel(TO_LINK_CAPACITY);
    let (responses, responses_rx) = mpsc::channel(RESPONSES_CAPACITY);
    let requests = Arc::new(tokio::sync::Semaphore::new(MAX_REQUESTS_IN_FLIGHT));
    let mut writer = tokio::spawn(write_link(sink, control_rx, responses_rx, data_rx));
    let table = Arc::new(ConnTable::default());
    // Every frame that announces a descriptor takes the responses' channel.
    let fd_out = fds.map(|queues| Arc::new(FdSender::new(queues, responses.clone())));
    let sink = Arc::new(SessionSink {
        to_link: to_link.clone(),
        table: table.clone(),
        next_id: AtomicU64::new(1),
        steal_tx: std::sync::OnceLock::new(),
        fd_out: fd_out.clone(),
        fd_ports: std::sync::Mutex::new(std::collections::HashSet::new()),
        watch_routes: AtomicBool::new(false),
        tap_times: has_feature(&hello.version, FEATURE_TAP_TIMES),
        direct: fd_out.is_some() && has_feature(&hello.version, FEATURE_DIRECT),
        direct6: fd_out.is_some()
            && has_feature(&hello.version, FEATURE_DIRECT)
            && has_feature(&hello.version, FEATURE_DIRECT6),
        direct_attached: std::sync::Mutex::new(std::collections::HashMap::new()),
        direct_paused: AtomicBool::new(false),
    });
    let delivered = sink.clone();
    let access = Access::new(
        hello.client.clone(),
        config.chain.clone(),
        config.rules_touched.clone(),
        sink.clone(),
        Arc::new(move |delivery: Delivery, stream| {
            let meta = ConnMeta {
                port: delivery.port,
                peer: delivery.peer,
                local: delivery.local,
            };
            let sink = delivered.clone();
            tokio::spawn(async move {
                if let Err(e) = sink.accept(meta, stream).await {
                    tracing::debug!("delivery not accepted: {e}");
                }
            });
        }),
    );
    let services = Arc::new(Services {
        pid: config.target_pid,
        files: Arc::new(Files::new(config.root.clone())),
        dns: Dns::new(config.root.clone()),
        access: access.clone(),
        fd_out: fd_out.clone(),
    });
    let steal_tx = spawn_subscriber(access.clone(), to_link.clone());
    let _ = sink.steal_tx.set(steal_tx.clone());
    let control_full = std::cell::Cell::new(false);
    let control = |message: AgentMessage| {
        if let Err(mpsc::error::TrySendError::Full(_)) =
            control_tx.try_send(Outbound::Message(message))
        {
            control_full.set(true);
        }
    };
    let mut attached = config.attached.clone();

    let end = loop {
        tokio::select! {
            biased;
            stopped = &mut stop => {
                if stopped == Stop::TargetExited {
                    control(AgentMessage::Fatal {
                        message: format!("target process {} exited", config.target_pid),
                    });
                }
                break SessionEnd::Stopped(stopped);
            }
            written = &mut writer => {
                break SessionEnd::LinkError(match written {
                    Ok(Ok(())) => "the link writer stopped".into(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => format!("the link writer failed: {e}"),
                });
            }
            message = from_link.next() => match message {
                None => break SessionEnd::LinkClosed,
                Some(Err(e)) => {
                    if !e.is_closed() {
                        control(AgentMessage::Fatal { message: e.to_string() });
                    }
                    break SessionEnd::LinkError(e.to_string());
                }
                Some(Ok(ClientMessage::Request { id, request })) => {
                    let permit = tokio::select! {
                        stopped = &mut stop => break SessionEnd::Stopped(stopped),
                        permit = requests.clone().acquire_owned() => {
                            permit.expect("the request semaphore is never closed")
                        }
                    };
                    tokio::spawn(serve_request(id, request, services.clone(), responses.clone(), permit));
                }
                Some(Ok(ClientMessage::WatchRoutes(on))) => {
                    tracing::debug!(on, "routing records");
                    sink.watch_routes.store(on, Ordering::Relaxed);
                }
                Some(Ok(message)) => dispatch(message, &table, &to_link, &steal_tx, &control, &sink),
            },
            up = attachment_change(&mut attached) => {
                let _ = steal_tx.send(if up { SubCommand::Resume } else { SubCommand::Suspend });
            }
        }
        if control_full.get() {
            tracing::warn!(
                "the client reads nothing: {CONTROL_CAPACITY} answers wait for it; \
                 the session ends"
            );
            break SessionEnd::LinkError(format!(
                "the client read none of the last {CONTROL_CAPACITY} answers"
            ));
        }
    };
    tracing::info!(?end, "session ending");

    // Abort every connection and stop stealing; the caller removes the rules.
    if !table.is_empty() {
        tracing::debug!(connections = table.len(), "aborting connections");
    }
    table.clear();
    drop(steal_tx);
    let _ = control_tx.try_send(Outbound::Finish);
    if !writer.is_finished() {
        let _ = tokio::time::timeout(FINAL_FLUSH, &mut writer).await;
    }
    writer.abort();
    // Sockets the link could not pass any more are reset, as relayed ones are,
    // and before this session's rules go: a redirected connection's packets
    // are translated only while a NAT rule is in the namespace (see
    // `incoming::peer::key::hold_conntrack`), so a reset sent after that
    // would leave with the agent's port and its client would wait forever.
    if let Some(fd_out) = &fd_out {
        fd_out.abort();
    }
    let handover = access.close().await;
    Ended { end, handover }
}

/// Sends the last message of a refused session and closes the link.
async fn refuse<S>(framed: &mut Link<S>, reason: String, reply: AgentMessage) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tracing::warn!("session refused: {reason}");
    let _ = tokio::time::timeout(FINAL_FLUSH, async {
        framed.send(reply).await?;
        framed.close().await
    })
    .await;
    SessionEnd::Refused(reason)
}

/// What request tasks share.
struct Services {
    pid: u32,
    files: Arc<Files>,
    dns: Dns,
    access: Arc<Access>,
    /// Where descriptors leave, when both peers pass them.
    fd_out: Option<Arc<FdSender>>,
}

fn dispatch(
    message: ClientMessage,
    table: &Arc<ConnTable>,
    to_link: &mpsc::Sender<AgentMessage>,
    steal_tx: &mpsc::UnboundedSender<SubCommand>,
    control: &impl Fn(AgentMessage),
    sink: &SessionSink,
) {
    let fd_ports = || {
        sink.fd_ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    match message {
        ClientMessage::Hello(_) => tracing::warn!("second Hello ignored"),
        ClientMessage::Ping(n) => control(AgentMessage::Pong(n)),
        ClientMessage::Request { .. } => {
            unreachable!("the link reader serves requests itself, once one may start")
        }
        ClientMessage::WatchRoutes(_) => {
            unreachable!("the link reader sets the session's routing records itself")
        }
        ClientMessage::Subscribe(subscription) => {
            fd_ports().remove(&subscription.port);
            let _ = steal_tx.send(SubCommand::Subscribe(subscription, None));
        }
        ClientMessage::SubscribeTls { subscription, tls } => {
            fd_ports().remove(&subscription.port);
            let _ = steal_tx.send(SubCommand::Subscribe(subscription, Some(tls)));
        }
        ClientMessage::SubscribeFds(subscription) => {
            // The whole connections of an unfiltered steal go as their
            // sockets; a filtered steal's program, or a mirror's, gets a socket
            // the agent writes the requests its filter matched (or the copies)
            // to ([`SessionSink::open`]). A mirror with the target's answers
            // is graft's to read: relayed.
            let program = subscription.mode == graft_protocol::incoming::IncomingMode::Steal
                || !subscription.responses;
            if sink.fd_out.is_some() && program {
                fd_ports().insert(subscription.port);
            } else {
                tracing::debug!(
                    port = subscription.port,
                    "incoming connections relayed: {}",
                    if program {
                        "the link passes no descriptors"
                    } else {
                        "graft reads the mirror's answers"
                    }
                );
                fd_ports().remove(&subscription.port);
            }
            let _ = steal_tx.send(SubCommand::Subscribe(subscription, None));
        }
        ClientMessage::DirectAttached { port } => sink.attach_direct(port),
        ClientMessage::PauseDirect { paused, seq } => {
            tracing::debug!(
                paused,
                "direct listeners paused: somebody watches the session's traffic"
            );
            sink.direct_paused.store(paused, Ordering::SeqCst);
            let _ = steal_tx.send(SubCommand::Reapply(seq));
        }
        ClientMessage::Unsubscribe { port } => {
            fd_ports().remove(&port);
            let _ = steal_tx.send(SubCommand::Unsubscribe(port));
        }
        ClientMessage::Connect {
            conn,
            remote,
            transport,
        } => {
            let registration = if conn.is_from_agent() {
                None
            } else {
                table.register(conn)
            };
            match registration {
                Some(registration) => {
                    tracing::debug!(%conn, %remote, ?transport, "connect");
                    tokio::spawn(crate::outgoing::connect(
                        registration,
                        remote,
                        transport,
                        to_link.clone(),
                        table.clone(),
                    ));
                }
                None => {
                    tracing::warn!(%conn, "connect refused: id in use or reserved for the agent");
                    control(AgentMessage::ConnectFailed {
                        conn,
                        errno: libc::EINVAL,
                    });
                }
            }
        }
        ClientMessage::Data { conn, bytes } => deliver(table, conn, ConnCommand::Data(bytes)),
        ClientMessage::Shutdown { conn } => deliver(table, conn, ConnCommand::Shutdown),
        ClientMessage::Credit { conn, bytes } => deliver(table, conn, ConnCommand::Credit(bytes)),
        ClientMessage::Close { conn, reset } => deliver(table, conn, ConnCommand::Close { reset }),
    }
}

fn deliver(table: &ConnTable, conn: ConnectionId, command: ConnCommand) {
    if !table.deliver(conn, command) {
        // Normal after the agent sent Close: the client's messages crossed it.
        tracing::trace!(%conn, "message for a connection that is gone");
    }
}

/// Owns the link's sink: writes control messages first, then data, batching what
/// is ready before each flush.
async fn write_link<S>(
    mut sink: futures::stream::SplitSink<
        Framed<S, FrameCodec<ClientMessage, AgentMessage>>,
        AgentMessage,
    >,
    mut control: mpsc::Receiver<Outbound>,
    mut responses: mpsc::Receiver<AgentMessage>,
    mut data: mpsc::Receiver<AgentMessage>,
) -> Result<(), graft_protocol::FrameError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    const BATCH: usize = 64;
    loop {
        let first = tokio::select! {
            biased;
            outbound = control.recv() => match outbound {
                Some(Outbound::Message(m)) => m,
                Some(Outbound::Finish) | None => break,
            },
            Some(m) = responses.recv() => m,
            message = data.recv() => match message {
                Some(m) => m,
                None => break,
            },
        };
        sink.feed(first).await?;
        let mut finish = false;
        for _ in 0..BATCH {
            match control.try_recv() {
                Ok(Outbound::Message(m)) => {
                    sink.feed(m).await?;
                    continue;
                }
                Ok(Outbound::Finish) => {
                    finish = true;
                    break;
                }
                Err(_) => {}
            }
            let response = responses.try_recv().ok();
            let found = response.is_some();
            if let Some(m) = response {
                sink.feed(m).await?;
            }
            match data.try_recv() {
                Ok(m) => sink.feed(m).await?,
                Err(_) if found => {}
                Err(_) => break,
            }
        }
        sink.flush().await?;
        if finish {
            break;
        }
    }
    sink.close().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_protocol::PROTOCOL_VERSION;

    fn hello(version: &str, secret: &str) -> Hello {
        Hello {
            version: version.into(),
            secret: secret.into(),
            client: "test@host".into(),
        }
    }

    #[test]
    fn a_digest_accepts_only_its_secret() {
        // sha256("s3cret"), e.g. `printf s3cret | sha256sum`.
        let digest = Secret::Sha256(
            "1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0".into(),
        );
        assert!(digest.accepts("s3cret"));
        assert!(!digest.accepts("s3cre"));
        assert!(
            !digest.accepts("1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0")
        );
    }

    #[test]
    fn hello_checks_version_then_secret() {
        let k = Secret::Plain("k".into());
        assert!(check_hello(&hello(PROTOCOL_VERSION, "k"), &k).is_ok());
        let wrong_version = check_hello(&hello("9.0.0", "k"), &k)
            .unwrap_err()
            .to_string();
        assert!(
            wrong_version.contains("protocol version mismatch"),
            "{wrong_version}"
        );
        let wrong_secret = check_hello(&hello(PROTOCOL_VERSION, "x"), &k)
            .unwrap_err()
            .to_string();
        assert!(
            wrong_secret.contains("wrong session secret"),
            "{wrong_secret}"
        );
    }
}
