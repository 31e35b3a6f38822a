//! The byte paths of one connection between a local socket and the link.
//!
//! - [`deliver`]: a stolen incoming connection, handed to the program's listener.
//! - [`relay_tcp`]: an outgoing TCP connection, whose relay listener the program's
//!   socket connects to.
//! - [`relay_udp`]: an outgoing UDP flow through a loopback relay socket.
//!
//! Each runs as its own task. Bytes from the link arrive on the connection's own
//! channel, so a program that reads slowly never stalls the link reader; the
//! agent sends at most `TCP_WINDOW` bytes ahead of what the program's socket took
//! (flow control, see `graft_protocol::link`), which bounds that channel. Bytes to
//! the link go through the session's outbox, which throttles a fast socket to the
//! link's pace, and at most `TCP_WINDOW` ahead of what the agent's socket took.
//!
//! A TCP splice follows the link's rules (see `graft_protocol::link`): local EOF →
//! `Shutdown`; the agent's `Shutdown` → `shutdown(SHUT_WR)` locally; a local read
//! or write error → `Close { reset: true }`; the agent's `Close { reset: true }` or
//! the end of the link → the local socket is aborted with an RST (`SO_LINGER` 0);
//! both directions finished → `Close { reset: false }`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use graft_protocol::{
    ConnectionId,
    credit::{ReturnedCredit, SendWindow},
    layer::DeliveredPeer,
    link::ClientMessage,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream, UdpSocket},
};

use crate::{
    flows::LocalStream,
    session::{ConnEvent, ConnEvents, Shared},
};

/// The largest chunk read from a local socket into one `Data` frame.
pub(crate) const CHUNK_LEN: usize = 64 * 1024;

/// Delivers a stolen connection to the program's listener at `target` and splices
/// it. The proxy-side address is known (and recorded for `PeerOf`) before the
/// connection is made, so the program's `accept` can never ask too early.
pub(crate) async fn deliver(
    shared: Arc<Shared>,
    conn: ConnectionId,
    target: SocketAddr,
    peer: DeliveredPeer,
    events: ConnEvents,
) {
    let mut proxy_side = None;
    let connected = async {
        let socket = match target {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // Bound to the listener's own address: a source that is always valid for it.
        socket.bind(SocketAddr::new(target.ip(), 0))?;
        let local = socket.local_addr()?;
        shared.add_delivered(local, peer);
        proxy_side = Some(local);
        socket.connect(target).await
    };
    let result = tokio::time::timeout(shared.options.relay_timeout, connected).await;
    match result {
        Ok(Ok(stream)) => {
            tracing::debug!(%conn, %target, client = %peer.peer, "delivering stolen connection");
            let _ = stream.set_nodelay(true);
            // The inspector's copy, when somebody watches (see `crate::tap`).
            let tapped = match &shared.options.incoming_tap {
                Some(tap) => tap.wrap(stream, peer),
                None => Err(stream),
            };
            match tapped {
                Ok(tapped) => splice_stream(shared.clone(), conn, tapped, events).await,
                Err(stream) => splice_tcp(shared.clone(), conn, stream, events).await,
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(%conn, %target, error = %e, "cannot deliver a stolen connection to the local listener; reset");
            close_reset(&shared, conn).await;
        }
        Err(_) => {
            tracing::warn!(%conn, %target, "the local listener did not accept a stolen connection in time; reset");
            close_reset(&shared, conn).await;
        }
    }
    if let Some(local) = proxy_side {
        shared.remove_delivered(local);
    }
}

/// Waits for the program to connect to the relay `listener` (exactly one
/// connection), then splices it with outgoing connection `conn`.
pub(crate) async fn relay_tcp(
    shared: Arc<Shared>,
    conn: ConnectionId,
    listener: TcpListener,
    events: ConnEvents,
) {
    match tokio::time::timeout(shared.options.relay_timeout, listener.accept()).await {
        Ok(Ok((stream, _))) => {
            drop(listener);
            let _ = stream.set_nodelay(true);
            splice_tcp(shared, conn, stream, events).await;
        }
        Ok(Err(e)) => {
            tracing::warn!(%conn, error = %e, "relay accept failed");
            close_reset(&shared, conn).await;
        }
        Err(_) => {
            tracing::warn!(%conn, "the program never connected to its relay; closing the connection");
            close_reset(&shared, conn).await;
        }
    }
}

async fn close_reset(shared: &Shared, conn: ConnectionId) {
    shared.forget(conn);
    let _ = shared
        .send(ClientMessage::Close { conn, reset: true })
        .await;
}

/// How a TCP splice ended.
#[derive(Debug)]
enum Outcome {
    /// The program sent FIN, the other direction is still open.
    LocalEof,
    /// Both directions finished in order.
    Done,
    /// Reading or writing the local socket failed.
    LocalError(std::io::Error),
    /// The agent closed the connection in order.
    AgentClosed,
    /// The agent closed the connection with an RST.
    AgentReset,
    /// The link ended.
    LinkGone,
}

/// Splices `stream` with `conn` until both sides are done or either breaks.
pub(crate) async fn splice_tcp(
    shared: Arc<Shared>,
    conn: ConnectionId,
    mut stream: TcpStream,
    events: ConnEvents,
) {
    // `TcpStream::split` borrows both halves without the lock `tokio::io::split` takes.
    let (mut from_program, mut to_program) = stream.split();
    let outcome = splice_halves(&shared, conn, &mut from_program, &mut to_program, events).await;
    if finish(&shared, conn, outcome).await {
        let _ = stream.set_zero_linger();
    }
}

/// [`splice_tcp`] for any [`LocalStream`]: a user-space stack's socket, a pipe.
pub(crate) async fn splice_stream<S: LocalStream>(
    shared: Arc<Shared>,
    conn: ConnectionId,
    stream: S,
    events: ConnEvents,
) {
    let (mut from_program, mut to_program) = tokio::io::split(stream);
    let outcome = splice_halves(&shared, conn, &mut from_program, &mut to_program, events).await;
    // Both halves come from the same `split`, so `unsplit` cannot panic.
    let mut stream = from_program.unsplit(to_program);
    if finish(&shared, conn, outcome).await {
        stream.abort();
    }
}

/// Moves bytes both ways between the program's side and `conn` under the link's
/// flow control, until both directions are done or either breaks.
async fn splice_halves<R, W>(
    shared: &Shared,
    conn: ConnectionId,
    mut from_program: R,
    mut to_program: W,
    mut events: ConnEvents,
) -> Outcome
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    {
        // Both futures run in this one task; the flags tell each whether the other
        // direction has finished.
        let program_done = AtomicBool::new(false);
        let agent_done = AtomicBool::new(false);
        // Flow control (graft_protocol::link): what the agent lets us send.
        let window = SendWindow::new();
        let up = async {
            let mut buf = vec![0u8; CHUNK_LEN];
            loop {
                let room = window.ready(CHUNK_LEN).await;
                match from_program.read(&mut buf[..room]).await {
                    Ok(0) => {
                        if shared.send(ClientMessage::Shutdown { conn }).await.is_err() {
                            return Outcome::LinkGone;
                        }
                        program_done.store(true, Ordering::Relaxed);
                        return if agent_done.load(Ordering::Relaxed) {
                            Outcome::Done
                        } else {
                            Outcome::LocalEof
                        };
                    }
                    Ok(n) => {
                        window.spend(n);
                        let data = ClientMessage::Data {
                            conn,
                            bytes: buf[..n].to_vec(),
                        };
                        if shared.send(data).await.is_err() {
                            return Outcome::LinkGone;
                        }
                    }
                    Err(e) => return Outcome::LocalError(e),
                }
            }
        };
        let down = async {
            // Bytes of the agent's that the program's socket took, not yet
            // credited back.
            let mut owed = ReturnedCredit::default();
            while let Some(event) = events.recv().await {
                match event {
                    ConnEvent::Data(bytes) => {
                        if let Err(e) = to_program.write_all(&bytes).await {
                            return Outcome::LocalError(e);
                        }
                        if let Some(bytes) = owed.took(bytes.len()) {
                            let update = ClientMessage::Credit { conn, bytes };
                            if shared.send(update).await.is_err() {
                                return Outcome::LinkGone;
                            }
                        }
                    }
                    ConnEvent::Credit(bytes) => {
                        window.grant(bytes);
                    }
                    ConnEvent::Shutdown => {
                        if let Err(e) = to_program.shutdown().await {
                            return Outcome::LocalError(e);
                        }
                        agent_done.store(true, Ordering::Relaxed);
                        if program_done.load(Ordering::Relaxed) {
                            return Outcome::Done;
                        }
                    }
                    ConnEvent::Close { reset: true } => return Outcome::AgentReset,
                    ConnEvent::Close { reset: false } => return Outcome::AgentClosed,
                }
            }
            Outcome::LinkGone
        };
        tokio::pin!(up, down);
        let mut up_done = false;
        loop {
            tokio::select! {
                outcome = &mut up, if !up_done => match outcome {
                    Outcome::LocalEof => up_done = true,
                    other => break other,
                },
                outcome = &mut down => break outcome,
            }
        }
    }
}

/// Tells the agent how the splice of `conn` ended; true when the program's side
/// must see a failure (RST) rather than a clean end.
async fn finish(shared: &Shared, conn: ConnectionId, outcome: Outcome) -> bool {
    tracing::debug!(%conn, ?outcome, "connection finished");
    shared.forget(conn);
    match outcome {
        Outcome::Done | Outcome::LocalEof => {
            let _ = shared
                .send(ClientMessage::Close { conn, reset: false })
                .await;
            false
        }
        Outcome::LocalError(e) => {
            tracing::debug!(%conn, error = %e, "local socket failed; resetting the connection");
            let _ = shared
                .send(ClientMessage::Close { conn, reset: true })
                .await;
            true
        }
        // The program must see the failure at once, not a clean end of stream.
        Outcome::AgentReset | Outcome::LinkGone => true,
        Outcome::AgentClosed => false,
    }
}

/// Relays outgoing UDP flow `conn` through `socket`: datagrams from the program
/// (its address is learnt from the first one) go to the agent, the agent's go back
/// to the program. Ends on the agent's `Close`, the end of the link, or
/// [`crate::SessionOptions::udp_idle`] without a datagram either way.
pub(crate) async fn relay_udp(
    shared: Arc<Shared>,
    conn: ConnectionId,
    socket: UdpSocket,
    mut events: ConnEvents,
) {
    let idle = shared.options.udp_idle;
    let mut program: Option<SocketAddr> = None;
    let mut buf = vec![0u8; CHUNK_LEN];
    let deadline = tokio::time::sleep(idle);
    tokio::pin!(deadline);
    let agent_gone = loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok((n, from)) => {
                    if *program.get_or_insert(from) != from {
                        tracing::debug!(%conn, %from, "datagram from a stranger on a UDP relay; dropped");
                        continue;
                    }
                    deadline.as_mut().reset(tokio::time::Instant::now() + idle);
                    let data = ClientMessage::Data { conn, bytes: buf[..n].to_vec() };
                    if shared.send(data).await.is_err() {
                        break true;
                    }
                }
                Err(e) => tracing::debug!(%conn, error = %e, "UDP relay receive failed"),
            },
            event = events.recv() => match event {
                Some(ConnEvent::Data(bytes)) => {
                    deadline.as_mut().reset(tokio::time::Instant::now() + idle);
                    match program {
                        Some(to) => {
                            if let Err(e) = socket.send_to(&bytes, to).await {
                                tracing::debug!(%conn, error = %e, "UDP relay send failed");
                            }
                        }
                        None => tracing::debug!(%conn, "datagram before the program sent any; dropped"),
                    }
                }
                // UDP is not flow-controlled.
                Some(ConnEvent::Shutdown | ConnEvent::Credit(_)) => {}
                Some(ConnEvent::Close { .. }) | None => break true,
            },
            () = &mut deadline => break false,
        }
    };
    shared.forget(conn);
    if !agent_gone {
        tracing::debug!(%conn, "UDP flow idle; closing");
        let _ = shared
            .send(ClientMessage::Close { conn, reset: false })
            .await;
    }
}
