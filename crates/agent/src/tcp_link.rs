//! The agent's end of a port-forwarded link: a TCP listener on the target's
//! loopback, where every transport is TLS 1.3 with the agent's fresh
//! certificate ([`graft_protocol::tls`]) carrying a relink attach
//! ([`graft_protocol::relink`]) that proves the session secret.
//!
//! Any process of the pod can connect to the listener, so nothing here trusts
//! a connection before it has proven the secret:
//!
//! - every connection is served on its own task and must finish the TLS
//!   handshake and its attach within [`AUTH_TIMEOUT`], else it is closed; at
//!   most [`MAX_PENDING`] connections wait at once (more are closed at once),
//!   so idle connections bound neither memory nor the agent's life;
//! - an attach whose credential is not the session secret is refused (the
//!   connection closes) and the agent goes on waiting: connecting first wins
//!   nothing;
//! - the first attach with the secret opens the link; later ones re-attach it
//!   only with its token, which never left TLS;
//! - a client of graft before protocol 0.3 (plaintext `GRAFTRL1`) gets a
//!   `Hello` rejection in its own format that says to use one release.
//!
//! Data flows: [`listen`] spawns the accept loop and hands back the first
//! authenticated [`Relink`]; the loop keeps feeding re-attaching transports to
//! it until the session ends and the caller aborts the loop.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use graft_protocol::codec::encode_frame;
use graft_protocol::link::{AgentMessage, HelloReply};
use graft_protocol::relink::{
    self, Attach, BoxTransport, LEGACY_MAGIC, Reattach, Relink, RelinkOptions,
};
use graft_protocol::tls::TlsAcceptor;
use graft_protocol::{PROTOCOL_VERSION, relink::read_attach};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;

use graft_protocol::secret::secrets_match;

use crate::session::Secret;

/// How long a connection has to finish TLS and its attach.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// The most connections that may be in their handshake at once.
pub const MAX_PENDING: usize = 256;
/// The TLS record type of a handshake (RFC 8446, 5.1): a ClientHello's first byte.
const TLS_HANDSHAKE: u8 = 0x16;

/// Where the listener's connections go.
enum Phase {
    /// No link yet: the first authenticated attach is sent here.
    Waiting(Option<oneshot::Sender<Linked>>),
    /// The link is open: transports with its token re-attach it.
    Linked(Reattach),
}

/// The link once its first client has attached.
pub struct Linked {
    /// The session's byte stream, surviving its transports.
    pub link: Relink,
    /// Whether the client is attached now
    /// ([`graft_protocol::relink::Reattach::attached`]).
    pub attached: tokio::sync::watch::Receiver<bool>,
}

/// The state the accept loop's tasks share.
struct Shared {
    acceptor: TlsAcceptor,
    secret: Secret,
    phase: tokio::sync::Mutex<Phase>,
    /// Connections still in their handshake.
    pending: Arc<Semaphore>,
    /// Whether the "too many connections" warning was logged.
    warned_full: Mutex<bool>,
}

/// Starts accepting on `listener`. The returned receiver yields the link once
/// a client has attached with `secret`; the task serves later attaches until
/// it is aborted.
pub fn listen(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    secret: Secret,
) -> (oneshot::Receiver<Linked>, JoinHandle<()>) {
    let (tx, rx) = oneshot::channel();
    let shared = Arc::new(Shared {
        acceptor,
        secret,
        phase: tokio::sync::Mutex::new(Phase::Waiting(Some(tx))),
        pending: Arc::new(Semaphore::new(MAX_PENDING)),
        warned_full: Mutex::new(false),
    });
    let task = tokio::spawn(accept_loop(listener, shared));
    (rx, task)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and the like: wait for descriptors to come back.
                tracing::debug!("accepting a link connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = shared.pending.clone().try_acquire_owned() else {
            let mut warned = shared.warned_full.lock().expect("flag lock poisoned");
            if !*warned {
                *warned = true;
                tracing::warn!(
                    "{MAX_PENDING} connections to the link's port are in their handshake; \
                     closing new ones until they finish or time out ({} s)",
                    AUTH_TIMEOUT.as_secs()
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let authenticated = tokio::time::timeout(
                AUTH_TIMEOUT,
                authenticate(stream, &shared.acceptor, &shared.secret),
            );
            let outcome = match authenticated.await {
                Ok(Ok(Some((transport, attach)))) => {
                    drop(permit);
                    attach_link(&shared, transport, attach).await
                }
                Ok(Ok(None)) => Err(LinkRefused::NotGraft),
                Ok(Err(why)) => Err(why),
                Err(_) => Err(LinkRefused::Timeout),
            };
            match outcome {
                Ok(what) => tracing::info!(%peer, "{what}"),
                Err(why) => {
                    tracing::warn!(%peer, "a connection to the link's port was refused: {why}")
                }
            }
        });
    }
}

/// One connection's proof: runs TLS with `acceptor` and reads the relink
/// attach, whose credential must be `secret`. `Ok(None)` for a connection that
/// is no TLS client; a graft before protocol 0.3 (plaintext attach) is
/// answered with a rejection it shows, and refused. The caller bounds the time
/// ([`AUTH_TIMEOUT`]).
///
/// # Errors
///
/// Why the connection was refused (failed handshake, wrong secret, ...).
pub async fn authenticate(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    secret: &Secret,
) -> Result<Option<(BoxTransport, Attach)>, LinkRefused> {
    let mut first = [0u8; 8];
    loop {
        let n = stream.peek(&mut first).await.map_err(LinkRefused::Read)?;
        match &first[..n] {
            [] => return Ok(None),
            [TLS_HANDSHAKE, ..] => break,
            start if !LEGACY_MAGIC.starts_with(start) => return Ok(None),
            start if start.len() == LEGACY_MAGIC.len() => {
                refuse_legacy(stream).await;
                return Err(LinkRefused::Legacy);
            }
            // A prefix of the old magic so far: wait for the rest.
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let mut tls = acceptor.accept(stream).await.map_err(LinkRefused::Tls)?;
    let attach = read_attach(&mut tls).await.map_err(LinkRefused::NoAttach)?;
    let secret_ok = std::str::from_utf8(&attach.credential)
        .map(|given| secret.accepts(given))
        .unwrap_or(false);
    if !secret_ok {
        let _ = tls.shutdown().await;
        return Err(LinkRefused::WrongSecret);
    }
    Ok(Some((Box::new(tls) as BoxTransport, attach)))
}

/// Opens the link with an authenticated transport, or re-attaches it.
async fn attach_link(
    shared: &Shared,
    transport: BoxTransport,
    attach: Attach,
) -> Result<&'static str, LinkRefused> {
    let mut phase = shared.phase.lock().await;
    match &mut *phase {
        Phase::Waiting(tx) => {
            let Some(tx) = tx.take() else {
                return Err(LinkRefused::Opening);
            };
            let (link, reattach) = Relink::server(transport, attach, RelinkOptions::default())
                .await
                .map_err(LinkRefused::Answer)?;
            let attached = reattach.attached();
            *phase = Phase::Linked(reattach);
            tx.send(Linked { link, attached })
                .map_err(|_| LinkRefused::NotWaiting)?;
            Ok("the client opened the link (TLS 1.3, session secret proven)")
        }
        Phase::Linked(reattach) => {
            if !secrets_match(attach.token, reattach.token()) {
                return Err(LinkRefused::WrongToken);
            }
            let reattach = reattach.clone();
            drop(phase);
            if reattach.attach(transport, attach.received).await {
                Ok("the client re-attached its link")
            } else {
                Err(LinkRefused::Ended)
            }
        }
    }
}

/// Why a connection to the link's port was refused (logged; the peer learns
/// nothing but a closed connection, or a `Hello` rejection for an old graft).
#[derive(Debug, thiserror::Error)]
pub enum LinkRefused {
    /// Neither TLS nor an old graft's plaintext attach.
    #[error("it is no graft link (closed)")]
    NotGraft,
    /// No attach within [`AUTH_TIMEOUT`].
    #[error("it did not authenticate within {} s (closed)", AUTH_TIMEOUT.as_secs())]
    Timeout,
    /// Its first bytes could not be read.
    #[error("reading it failed: {0}")]
    Read(io::Error),
    /// A graft older than protocol 0.3, whose link is plaintext.
    #[error("a graft before protocol 0.3 tried a plaintext link (refused)")]
    Legacy,
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    /// TLS came up but no relink attach followed.
    #[error("no relink attach inside TLS: {0}")]
    NoAttach(io::Error),
    /// The attach's credential is not the session secret.
    #[error("its attach did not carry the session secret")]
    WrongSecret,
    /// Another connection is opening the link right now.
    #[error("the link is being opened")]
    Opening,
    /// The relink answer could not be sent.
    #[error("answering the attach failed: {0}")]
    Answer(io::Error),
    /// The agent no longer waits for a first client.
    #[error("the agent stopped waiting for its client")]
    NotWaiting,
    /// A second session tried to attach to this agent.
    #[error("it attached with the secret but not the link's token: this agent serves one session")]
    WrongToken,
    /// The link is over; nothing can re-attach.
    #[error("the link has ended")]
    Ended,
}

/// Answers a plaintext attach of an old graft with a `Hello` rejection it can
/// show, then waits briefly for it to close (closing with its bytes unread
/// would reset the connection and lose the answer).
async fn refuse_legacy(mut stream: TcpStream) {
    let mut header = [0u8; 32];
    if stream.read_exact(&mut header).await.is_err() || &header[..8] != LEGACY_MAGIC {
        return;
    }
    let reason = format!(
        "this graft-agent speaks protocol {PROTOCOL_VERSION}, whose link is encrypted (TLS 1.3); \
         this graft is older: use graft and graft-agent from the same release"
    );
    let frame = encode_frame(&AgentMessage::Hello(HelloReply::Rejected { reason }))
        .expect("a short rejection encodes");
    if relink::refuse_legacy(&mut stream, &frame).await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let drain = async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}
