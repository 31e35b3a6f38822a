//! Connection relays: one task per connection (stolen or outgoing) that moves bytes
//! between a target-side socket and the link.
//!
//! The link reader hands each connection's [`ConnCommand`]s to its task through an
//! unbounded channel registered in the [`ConnTable`], so one slow socket never
//! stalls the link. The task sends [`AgentMessage`]s through the session's bounded
//! `to_link` channel, which gives backpressure from the link to the sockets.
//!
//! A TCP relay is a small state machine in one `select!` loop:
//! - socket bytes become `Data`; socket EOF becomes `Shutdown` (the task keeps
//!   writing what the client sends);
//! - client `Data` is queued and written as the socket accepts it; client
//!   `Shutdown` half-closes the socket once the queue is empty;
//! - both directions finished → `Close { reset: false }`; a socket error →
//!   `Close { reset: true }`; client `Close { reset: true }` → abort with an RST;
//! - the session ending (the command channel closing) aborts with an RST, and so
//!   does dropping the task, through [`ResetOnDrop`].
//!
//! A UDP flow relays datagrams one `Data` each until the client closes it.
//!
//! Bytes the client sent and the socket has not taken yet are counted per
//! connection; a client that sends more than [`MAX_QUEUED`] ahead (more than the
//! flow-control window allows, so not an honest graft) has that connection reset
//! and is told so, instead of growing the agent's memory.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use graft_protocol::ConnectionId;
use graft_protocol::credit::{ReturnedCredit, SendWindow};
use graft_protocol::link::{AgentMessage, TCP_WINDOW};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

/// The most bytes read from a socket into one `Data` message.
pub const READ_CHUNK: usize = 64 * 1024;

/// The most bytes of one connection the client may have sent that its socket has
/// not taken yet: its flow-control window plus one chunk of slack.
pub const MAX_QUEUED: usize = TCP_WINDOW as usize + graft_protocol::codec::MAX_CHUNK_LEN;

/// How long queued bytes may take to drain after the client closed gracefully.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What the link reader tells a connection's task.
#[derive(Debug)]
pub enum ConnCommand {
    /// Bytes to write to the socket (one datagram for UDP).
    Data(Vec<u8>),
    /// The client will send no more bytes: half-close the socket.
    Shutdown,
    /// The client is done with the connection.
    Close {
        /// Abort with an RST rather than a FIN.
        reset: bool,
    },
    /// The client wrote this many more bytes to its socket (flow control).
    Credit(u32),
    /// The client sent more than [`MAX_QUEUED`] bytes ahead of the socket: reset
    /// the connection and tell the client.
    Overflow,
}

/// The live connections of a session: who to hand each connection's commands to.
#[derive(Debug, Default)]
pub struct ConnTable {
    inner: Mutex<HashMap<ConnectionId, Entry>>,
    generation: AtomicU64,
}

/// Bytes of a connection delivered by the client and not yet taken by its socket.
pub type Queued = Arc<AtomicUsize>;

/// A live connection in the table: its generation, its task's command channel
/// and its queued byte count.
type Entry = (u64, mpsc::UnboundedSender<ConnCommand>, Queued);

/// A connection's registration: its command receiver, and the token that lets the
/// task remove exactly its own entry when it ends.
#[derive(Debug)]
pub struct Registration {
    /// The connection.
    pub conn: ConnectionId,
    /// Commands from the link.
    pub commands: mpsc::UnboundedReceiver<ConnCommand>,
    /// The client's bytes in `commands` or the task's queue; the task subtracts
    /// what its socket takes.
    pub queued: Queued,
    generation: u64,
}

impl ConnTable {
    /// Registers `conn`; `None` when it is already live.
    pub fn register(&self, conn: ConnectionId) -> Option<Registration> {
        let mut inner = self.inner.lock().expect("connection table lock poisoned");
        if inner.contains_key(&conn) {
            return None;
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Queued::default();
        inner.insert(conn, (generation, tx, queued.clone()));
        Some(Registration {
            conn,
            commands: rx,
            queued,
            generation,
        })
    }

    /// Hands `command` to `conn`'s task; `false` when there is no such connection.
    /// A `Close` also forgets the connection.
    pub fn deliver(&self, conn: ConnectionId, command: ConnCommand) -> bool {
        let mut inner = self.inner.lock().expect("connection table lock poisoned");
        let closing = matches!(command, ConnCommand::Close { .. });
        let delivered = match inner.get(&conn) {
            Some((_, tx, queued)) => {
                let command = match command {
                    ConnCommand::Data(bytes) => {
                        let ahead = queued.fetch_add(bytes.len(), Ordering::AcqRel) + bytes.len();
                        if ahead > MAX_QUEUED {
                            tracing::warn!(
                                %conn,
                                "the client sent {ahead} bytes its socket has not taken, more \
                                 than the limit of {MAX_QUEUED}; the connection is reset"
                            );
                            queued.fetch_sub(bytes.len(), Ordering::AcqRel);
                            ConnCommand::Overflow
                        } else {
                            ConnCommand::Data(bytes)
                        }
                    }
                    other => other,
                };
                tx.send(command).is_ok()
            }
            None => false,
        };
        if closing || !delivered {
            inner.remove(&conn);
        }
        delivered
    }

    /// Forgets a connection whose task has ended (only that task's own entry).
    pub fn finished(&self, registration: &Registration) {
        let mut inner = self.inner.lock().expect("connection table lock poisoned");
        if inner
            .get(&registration.conn)
            .is_some_and(|(g, _, _)| *g == registration.generation)
        {
            inner.remove(&registration.conn);
        }
    }

    /// How many connections are live.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .expect("connection table lock poisoned")
            .len()
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every connection: their tasks see their command channels close and
    /// abort their sockets.
    pub fn clear(&self) {
        self.inner
            .lock()
            .expect("connection table lock poisoned")
            .clear();
    }
}

/// A TCP stream that is aborted with an RST when dropped, unless it was closed in
/// an orderly way.
#[derive(Debug)]
pub struct ResetOnDrop {
    stream: TcpStream,
    orderly: bool,
}

impl ResetOnDrop {
    /// Wraps `stream`.
    pub fn new(stream: TcpStream) -> ResetOnDrop {
        ResetOnDrop {
            stream,
            orderly: false,
        }
    }
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if !self.orderly {
            // SO_LINGER 0: close() sends an RST and discards unsent data.
            let _ = self.stream.set_zero_linger();
        }
    }
}

/// Whether an I/O error is the peer resetting or aborting the connection.
fn errno_of(e: &io::Error) -> String {
    e.raw_os_error()
        .map(|n| io::Error::from_raw_os_error(n).to_string())
        .unwrap_or_else(|| e.to_string())
}

/// Relays a TCP connection until it ends; forgets it in `table` afterwards.
///
/// The stream comes wrapped in [`ResetOnDrop`] so that it is reset even when the
/// future is dropped before it first runs (the runtime shutting down).
pub async fn tcp(
    mut guard: ResetOnDrop,
    mut registration: Registration,
    to_link: mpsc::Sender<AgentMessage>,
    table: Arc<ConnTable>,
) {
    let conn = registration.conn;
    let (rd, wr) = guard.stream.split();
    let queued = registration.queued.clone();
    let end = relay_tcp(rd, wr, conn, &mut registration.commands, &queued, &to_link).await;
    guard.orderly = match end {
        TcpEnd::Orderly => true,
        TcpEnd::ClientClosed { reset } => !reset,
        TcpEnd::SocketError | TcpEnd::SessionGone => false,
    };
    finish(end, conn, &to_link).await;
    table.finished(&registration);
    drop(guard);
}

/// Relays an in-agent byte stream (an HTTP connection the agent opened to the
/// client, or a connection handed over by another agent) like [`tcp`]; the other
/// end of `stream` sees EOF rather than an RST when the relay stops early.
pub async fn stream<S>(
    stream: S,
    mut registration: Registration,
    to_link: mpsc::Sender<AgentMessage>,
    table: Arc<ConnTable>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let conn = registration.conn;
    let (rd, wr) = tokio::io::split(stream);
    let queued = registration.queued.clone();
    let end = relay_tcp(rd, wr, conn, &mut registration.commands, &queued, &to_link).await;
    finish(end, conn, &to_link).await;
    table.finished(&registration);
}

/// Tells the client how a connection ended, when it does not know yet.
async fn finish(end: TcpEnd, conn: ConnectionId, to_link: &mpsc::Sender<AgentMessage>) {
    tracing::debug!(%conn, ?end, "connection ended");
    let reset = match end {
        TcpEnd::Orderly => false,
        TcpEnd::SocketError => true,
        TcpEnd::ClientClosed { .. } | TcpEnd::SessionGone => return,
    };
    let _ = to_link.send(AgentMessage::Close { conn, reset }).await;
}

/// How a TCP relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcpEnd {
    /// Both sides sent FIN and all bytes were delivered.
    Orderly,
    /// Reading or writing the socket failed (RST, timeout...).
    SocketError,
    /// The client sent `Close`.
    ClientClosed { reset: bool },
    /// The link is gone.
    SessionGone,
}

async fn relay_tcp<R, W>(
    mut rd: R,
    mut wr: W,
    conn: ConnectionId,
    commands: &mut mpsc::UnboundedReceiver<ConnCommand>,
    queued: &AtomicUsize,
    to_link: &mpsc::Sender<AgentMessage>,
) -> TcpEnd
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; READ_CHUNK];
    let mut queue: VecDeque<Vec<u8>> = VecDeque::new();
    let mut offset = 0usize;
    let mut read_eof = false;
    let mut client_shutdown = false;
    let mut wrote_shutdown = false;
    // Flow control (graft_protocol::link): what the client lets us send, and
    // what we owe it for bytes of its that the socket took.
    let window = SendWindow::new();
    let mut owed = ReturnedCredit::default();
    // A batch of credit that is due, sent at the top of the next turn.
    let mut owed_batch: Option<u32> = None;
    loop {
        if read_eof && wrote_shutdown {
            return TcpEnd::Orderly;
        }
        if let Some(bytes) = owed_batch.take() {
            let update = AgentMessage::Credit { conn, bytes };
            if to_link.send(update).await.is_err() {
                return TcpEnd::SessionGone;
            }
        }
        let pending: &[u8] = queue.front().map(|b| &b[offset..]).unwrap_or(&[]);
        let can_write = !pending.is_empty();
        let can_shutdown = queue.is_empty() && client_shutdown && !wrote_shutdown;
        let room = window.room(READ_CHUNK);
        tokio::select! {
            read = rd.read(&mut buf[..room]), if !read_eof && room > 0 => match read {
                Ok(0) => {
                    read_eof = true;
                    if to_link.send(AgentMessage::Shutdown { conn }).await.is_err() {
                        return TcpEnd::SessionGone;
                    }
                }
                Ok(n) => {
                    window.spend(n);
                    let data = AgentMessage::Data { conn, bytes: buf[..n].to_vec() };
                    if to_link.send(data).await.is_err() {
                        return TcpEnd::SessionGone;
                    }
                }
                Err(e) => {
                    tracing::debug!(%conn, "read failed: {}", errno_of(&e));
                    return TcpEnd::SocketError;
                }
            },
            out = async {
                if can_write {
                    wr.write(pending).await.map(Some)
                } else {
                    wr.shutdown().await.map(|()| None)
                }
            }, if can_write || can_shutdown => match out {
                Ok(Some(n)) => {
                    offset += n;
                    owed_batch = owed.took(n);
                    queued.fetch_sub(n, Ordering::AcqRel);
                    if queue.front().is_some_and(|b| offset >= b.len()) {
                        queue.pop_front();
                        offset = 0;
                    }
                }
                Ok(None) => wrote_shutdown = true,
                Err(e) => {
                    tracing::debug!(%conn, "write or shutdown failed: {}", errno_of(&e));
                    return TcpEnd::SocketError;
                }
            },
            command = commands.recv() => match command {
                Some(ConnCommand::Data(bytes)) => {
                    if client_shutdown {
                        tracing::debug!(%conn, "client sent data after shutdown; dropped");
                        queued.fetch_sub(bytes.len(), Ordering::AcqRel);
                    } else if !bytes.is_empty() {
                        queue.push_back(bytes);
                    }
                }
                Some(ConnCommand::Shutdown) => client_shutdown = true,
                Some(ConnCommand::Credit(n)) => window.grant(n),
                Some(ConnCommand::Overflow) => return TcpEnd::SocketError,
                Some(ConnCommand::Close { reset: true }) => return TcpEnd::ClientClosed { reset: true },
                Some(ConnCommand::Close { reset: false }) => {
                    // Deliver what the client sent before it closed, then FIN.
                    let drain = async {
                        if let Some(first) = queue.pop_front() {
                            wr.write_all(&first[offset..]).await?;
                        }
                        for chunk in queue.drain(..) {
                            wr.write_all(&chunk).await?;
                        }
                        wr.shutdown().await
                    };
                    let drained = matches!(tokio::time::timeout(DRAIN_TIMEOUT, drain).await, Ok(Ok(())));
                    return TcpEnd::ClientClosed { reset: !drained };
                }
                None => return TcpEnd::SessionGone,
            },
        }
    }
}

/// Relays a connected UDP flow until the client closes it or the session ends;
/// forgets it in `table` afterwards.
pub async fn udp(
    socket: UdpSocket,
    mut registration: Registration,
    to_link: mpsc::Sender<AgentMessage>,
    table: Arc<ConnTable>,
) {
    let conn = registration.conn;
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            received = socket.recv(&mut buf) => match received {
                Ok(n) => {
                    let data = AgentMessage::Data { conn, bytes: buf[..n].to_vec() };
                    if to_link.send(data).await.is_err() {
                        break;
                    }
                }
                // An ICMP error from an earlier datagram; the flow goes on.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    tracing::debug!(%conn, "udp receive failed: {}", errno_of(&e));
                    let _ = to_link.send(AgentMessage::Close { conn, reset: true }).await;
                    break;
                }
            },
            command = registration.commands.recv() => match command {
                Some(ConnCommand::Data(bytes)) => {
                    if let Err(e) = socket.send(&bytes).await {
                        tracing::debug!(%conn, "udp send failed: {}", errno_of(&e));
                    }
                    registration.queued.fetch_sub(bytes.len(), Ordering::AcqRel);
                }
                // UDP is not flow-controlled.
                Some(ConnCommand::Shutdown | ConnCommand::Credit(_)) => {}
                Some(ConnCommand::Overflow) => {
                    let _ = to_link.send(AgentMessage::Close { conn, reset: true }).await;
                    break;
                }
                Some(ConnCommand::Close { .. }) | None => break,
            },
        }
    }
    table.finished(&registration);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    async fn next(rx: &mut mpsc::Receiver<AgentMessage>) -> AgentMessage {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("relay sent nothing")
            .expect("relay channel closed")
    }

    #[tokio::test]
    async fn tcp_relay_half_closes_both_ways_then_closes() {
        let table = Arc::new(ConnTable::default());
        let (to_link, mut from_relay) = mpsc::channel(16);
        let (mut peer, ours) = pair().await;
        let conn = ConnectionId(ConnectionId::AGENT_BIT | 1);
        let reg = table.register(conn).unwrap();
        let task = tokio::spawn(tcp(ResetOnDrop::new(ours), reg, to_link, table.clone()));

        peer.write_all(b"ping").await.unwrap();
        assert_eq!(
            next(&mut from_relay).await,
            AgentMessage::Data {
                conn,
                bytes: b"ping".to_vec()
            }
        );
        peer.shutdown().await.unwrap();
        assert_eq!(next(&mut from_relay).await, AgentMessage::Shutdown { conn });
        // The peer half-closed but still receives.
        assert!(table.deliver(conn, ConnCommand::Data(b"pong".to_vec())));
        assert!(table.deliver(conn, ConnCommand::Shutdown));
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"pong");
        assert_eq!(
            next(&mut from_relay).await,
            AgentMessage::Close { conn, reset: false }
        );
        task.await.unwrap();
        assert!(table.is_empty());
    }

    #[tokio::test]
    async fn client_reset_sends_rst() {
        let table = Arc::new(ConnTable::default());
        let (to_link, _from_relay) = mpsc::channel(16);
        let (mut peer, ours) = pair().await;
        let conn = ConnectionId(3);
        let reg = table.register(conn).unwrap();
        let task = tokio::spawn(tcp(ResetOnDrop::new(ours), reg, to_link, table.clone()));
        assert!(table.deliver(conn, ConnCommand::Close { reset: true }));
        task.await.unwrap();
        let mut buf = [0u8; 8];
        let err = peer.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn peer_reset_is_reported_as_reset() {
        let table = Arc::new(ConnTable::default());
        let (to_link, mut from_relay) = mpsc::channel(16);
        let (peer, ours) = pair().await;
        let conn = ConnectionId(4);
        let reg = table.register(conn).unwrap();
        let task = tokio::spawn(tcp(ResetOnDrop::new(ours), reg, to_link, table.clone()));
        peer.set_zero_linger().unwrap();
        drop(peer);
        assert_eq!(
            next(&mut from_relay).await,
            AgentMessage::Close { conn, reset: true }
        );
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_beyond_its_window_gets_the_connection_reset() {
        let table = Arc::new(ConnTable::default());
        let (to_link, mut from_relay) = mpsc::channel(16);
        // The peer never reads: nothing the client sends is taken.
        let (peer, ours) = pair().await;
        let conn = ConnectionId(5);
        let reg = table.register(conn).unwrap();
        let task = tokio::spawn(tcp(ResetOnDrop::new(ours), reg, to_link, table.clone()));
        let chunk = vec![0u8; graft_protocol::codec::MAX_CHUNK_LEN];
        for _ in 0..=MAX_QUEUED / chunk.len() + 1 {
            if !table.deliver(conn, ConnCommand::Data(chunk.clone())) {
                break;
            }
        }
        // Credits for what the socket took may come first.
        let mut message = next(&mut from_relay).await;
        while matches!(message, AgentMessage::Credit { .. }) {
            message = next(&mut from_relay).await;
        }
        assert_eq!(message, AgentMessage::Close { conn, reset: true });
        task.await.unwrap();
        drop(peer);
    }

    #[test]
    fn ids_cannot_be_registered_twice_and_stale_tasks_do_not_remove_new_entries() {
        let table = ConnTable::default();
        let first = table.register(ConnectionId(1)).unwrap();
        assert!(table.register(ConnectionId(1)).is_none());
        assert!(table.deliver(ConnectionId(1), ConnCommand::Close { reset: false }));
        let _second = table.register(ConnectionId(1)).unwrap();
        table.finished(&first);
        assert_eq!(table.len(), 1);
    }
}
