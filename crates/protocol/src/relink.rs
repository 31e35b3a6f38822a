//! A link that survives its transport: when the byte stream under a session
//! (a Kubernetes port-forward) breaks while both ends live, the client opens a
//! new one and both ends resend what the other did not receive, so the session
//! above never notices.
//!
//! # Wire format
//!
//! Each transport starts with an attach exchange:
//!
//! ```text
//! client → agent: "GRAFTRL2" · token (16 bytes) · received (u64 BE)
//!                 · credential length (u16 BE) · credential
//! agent → client: "GRAFTRL2" · received (u64 BE)
//! ```
//!
//! `token` names the link (random, chosen by the client for its first
//! transport); `received` is how many payload bytes that side has taken in so
//! far, so the other side resends everything after it; `credential` is the
//! session secret, which the agent checks on every attach before it answers
//! (it closes the transport otherwise). The exchange is meant to run inside an
//! encrypted transport ([`crate::tls`] for port-forwarded agents), so neither
//! the token nor the secret is ever seen on the wire. Then records flow both
//! ways, `kind (u8) · length (u32 BE) · payload`: kind 0 carries payload bytes,
//! kind 1 an acknowledgement (`u64 BE`, payload bytes received so far), which
//! lets the sender forget what it keeps for resending.
//!
//! A side keeps at most [`MAX_UNACKED`] unacknowledged bytes; writes wait beyond
//! that. A transport on which nothing arrives for [`IDLE`] is given up (the
//! session above pings every few seconds, so a live one never is), and so is one
//! that fails or closes. The client then reconnects with backoff for at most
//! [`RelinkOptions::reconnect_for`]; the agent waits as long for the client to
//! come back. After that the link ends: reads see EOF and writes fail.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::PollSender;

#[cfg(test)]
mod tests;
mod wire;

pub use wire::{Attach, read_attach, refuse_legacy};
use wire::{client_attach, encode_record, read_record, server_answer, write_records};

/// The first bytes of every relink transport.
pub const MAGIC: &[u8; 8] = b"GRAFTRL2";
/// The first bytes of a transport of graft before protocol 0.3, which sent the
/// attach in plaintext and without a credential.
pub const LEGACY_MAGIC: &[u8; 8] = b"GRAFTRL1";
/// The longest credential an attach may carry, in bytes.
pub const MAX_CREDENTIAL: usize = 1024;
/// The most payload bytes a side keeps for resending before writes wait.
pub const MAX_UNACKED: usize = 32 << 20;
/// A transport on which nothing arrives for this long is given up.
pub const IDLE: Duration = Duration::from_secs(15);
/// The largest record payload, in bytes.
const MAX_RECORD: usize = 1 << 20;
/// An acknowledgement is due after this many unacknowledged received bytes...
const ACK_BYTES: u64 = 256 * 1024;
/// ...or this long after the last one when anything arrived since.
const ACK_EVERY: Duration = Duration::from_millis(200);

const KIND_DATA: u8 = 0;
const KIND_ACK: u8 = 1;
/// The sender closed the link: nothing follows.
const KIND_CLOSE: u8 = 2;

/// A transport: any byte stream.
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Transport for T {}

/// A boxed [`Transport`].
pub type BoxTransport = Box<dyn Transport>;

/// Opens a new transport to the agent (the client's side of reconnection).
pub type Reconnect =
    Box<dyn FnMut() -> Pin<Box<dyn Future<Output = io::Result<BoxTransport>> + Send>> + Send>;

/// The identity of a link.
pub type Token = [u8; 16];

/// Timing of a link.
#[derive(Debug, Clone, Copy)]
pub struct RelinkOptions {
    /// How long the client keeps trying to reconnect, and the agent waits for it.
    pub reconnect_for: Duration,
    /// A transport silent for this long is given up.
    pub idle: Duration,
}

impl Default for RelinkOptions {
    fn default() -> Self {
        RelinkOptions {
            reconnect_for: Duration::from_secs(30),
            idle: IDLE,
        }
    }
}

/// A fresh random token, from the kernel's random source.
///
/// # Errors
///
/// The system's random source failed ([`crate::secret::random_bytes`]).
pub fn new_token() -> io::Result<Token> {
    crate::secret::random_bytes()
}

/// Payload bytes sent and not yet acknowledged, oldest first.
#[derive(Default)]
struct Unacked {
    /// The link offset of the first byte of `queue`.
    start: u64,
    /// The link offset after the last byte sent.
    end: u64,
    queue: VecDeque<Bytes>,
}

/// The state both transports of a link share.
struct Shared {
    /// What the peer may still have to be sent again.
    unacked: Mutex<Unacked>,
    /// Payload bytes received so far.
    received: AtomicU64,
    /// Wakes the writer: an acknowledgement or room in `unacked`.
    wake: Notify,
}

impl Shared {
    fn unacked_len(&self) -> usize {
        let unacked = self.unacked.lock().expect("relink lock poisoned");
        (unacked.end - unacked.start) as usize
    }

    /// Keeps `chunk`, about to be sent, for resending.
    fn keep(&self, chunk: Bytes) {
        let mut unacked = self.unacked.lock().expect("relink lock poisoned");
        unacked.end += chunk.len() as u64;
        unacked.queue.push_back(chunk);
    }

    /// Forgets what the peer has: everything before `acked` (at most what was
    /// sent).
    fn trim(&self, acked: u64) {
        let mut guard = self.unacked.lock().expect("relink lock poisoned");
        let unacked = &mut *guard;
        let acked = acked.min(unacked.end);
        while let Some(front) = unacked.queue.front_mut() {
            let end = unacked.start + front.len() as u64;
            if end <= acked {
                unacked.start = end;
                unacked.queue.pop_front();
            } else {
                if acked > unacked.start {
                    front.advance((acked - unacked.start) as usize);
                    unacked.start = acked;
                }
                break;
            }
        }
        drop(guard);
        self.wake.notify_one();
    }
}

/// One end of a link: read and write it like the transport it replaces.
pub struct Relink {
    incoming: mpsc::Receiver<Bytes>,
    leftover: Bytes,
    outgoing: PollSender<Bytes>,
    /// Resolves once the driver has told the peer that the link is closed (or
    /// has ended): what `shutdown` waits for.
    closed: tokio::sync::oneshot::Receiver<()>,
}

/// Where an agent's link gets its later transports from: hand each new
/// connection whose [`Attach`] carries the link's token to [`Reattach::attach`].
#[derive(Clone)]
pub struct Reattach {
    token: Token,
    tx: mpsc::Sender<(BoxTransport, u64)>,
    attached: tokio::sync::watch::Receiver<bool>,
}

impl Reattach {
    /// The link's token.
    pub fn token(&self) -> Token {
        self.token
    }

    /// Gives the link a new transport whose client has received `received`
    /// bytes. Returns `false` when the link is gone.
    pub async fn attach(&self, transport: BoxTransport, received: u64) -> bool {
        self.tx.send((transport, received)).await.is_ok()
    }

    /// Whether the client is attached: `false` from the moment its transport
    /// is seen lost (closed, broken or silent for [`RelinkOptions::idle`])
    /// until a new one is attached, and for good once the link has ended.
    /// While it is `false` the agent serves nobody, so it should stop
    /// taking the target's traffic.
    pub fn attached(&self) -> tokio::sync::watch::Receiver<bool> {
        self.attached.clone()
    }
}

/// How a transport's turn ended.
enum Epoch {
    /// The transport broke, closed or went silent.
    Lost(String),
    /// A side closed the link.
    Closed,
    /// The client came back on a new transport before this one was seen to die.
    Replaced(BoxTransport, u64),
}

struct Driver {
    shared: Arc<Shared>,
    incoming: mpsc::Sender<Bytes>,
    outgoing: mpsc::Receiver<Bytes>,
    options: RelinkOptions,
    /// Dropped with the driver, when the link has ended: what
    /// [`Relink`]'s `shutdown` waits for.
    _closed: tokio::sync::oneshot::Sender<()>,
}

impl Relink {
    /// The client's end: attaches `first` as a new link and reconnects with
    /// `reconnect` whenever the transport is lost.
    ///
    /// # Errors
    ///
    /// When the first attach exchange fails.
    pub async fn client(
        mut first: BoxTransport,
        mut reconnect: Reconnect,
        options: RelinkOptions,
        credential: Vec<u8>,
    ) -> io::Result<Relink> {
        if credential.len() > MAX_CREDENTIAL {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the relink credential is longer than {MAX_CREDENTIAL} bytes"),
            ));
        }
        let token = new_token()?;
        let peer_received = client_attach(&mut first, &token, 0, &credential).await?;
        let (relink, mut driver) = Relink::pair(options);
        driver.shared.trim(peer_received);
        tokio::spawn(async move {
            let mut transport = first;
            loop {
                match driver.epoch(transport, None).await {
                    Epoch::Closed => return,
                    Epoch::Lost(why) => {
                        tracing::warn!("the link's transport was lost ({why}); reconnecting")
                    }
                    Epoch::Replaced(..) => unreachable!("only an agent's link is re-attached"),
                }
                let deadline = Instant::now() + driver.options.reconnect_for;
                let mut delay = Duration::from_millis(100);
                transport = loop {
                    if Instant::now() >= deadline {
                        tracing::warn!("could not reconnect the link; it ends");
                        return;
                    }
                    let attempt = async {
                        let mut t = reconnect().await?;
                        let received = driver.shared.received.load(Ordering::Acquire);
                        let peer = client_attach(&mut t, &token, received, &credential).await?;
                        io::Result::Ok((t, peer))
                    };
                    match tokio::time::timeout_at(deadline, attempt).await {
                        Ok(Ok((t, peer_received))) => {
                            driver.shared.trim(peer_received);
                            tracing::info!("the link is back on a new transport");
                            break t;
                        }
                        Ok(Err(e)) => tracing::debug!("reconnecting failed: {e}"),
                        Err(_) => {}
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                };
            }
        });
        Ok(relink)
    }

    /// The agent's end: `first` is the transport whose [`Attach`] (already read
    /// with [`read_attach`]) opened the link; later transports come through the
    /// returned [`Reattach`].
    ///
    /// # Errors
    ///
    /// When answering the attach fails.
    pub async fn server(
        mut first: BoxTransport,
        attach: Attach,
        options: RelinkOptions,
    ) -> io::Result<(Relink, Reattach)> {
        server_answer(&mut first, 0).await?;
        let (relink, mut driver) = Relink::pair(options);
        driver.shared.trim(attach.received);
        let (tx, mut rx) = mpsc::channel::<(BoxTransport, u64)>(4);
        let (attached_tx, attached) = tokio::sync::watch::channel(true);
        let reattach = Reattach {
            token: attach.token,
            tx,
            attached,
        };
        tokio::spawn(async move {
            let mut transport = first;
            loop {
                match driver.epoch(transport, Some(&mut rx)).await {
                    Epoch::Closed => {
                        attached_tx.send_replace(false);
                        return;
                    }
                    Epoch::Replaced(mut t, peer_received) => {
                        let received = driver.shared.received.load(Ordering::Acquire);
                        if server_answer(&mut t, received).await.is_ok() {
                            driver.shared.trim(peer_received);
                            tracing::info!("the client is back on a new transport");
                            transport = t;
                            continue;
                        }
                    }
                    Epoch::Lost(why) => {
                        tracing::warn!(
                            "the link's transport was lost ({why}); waiting for the client"
                        )
                    }
                }
                attached_tx.send_replace(false);
                // One deadline for the whole wait: attaches that fail do not
                // extend it.
                let deadline = Instant::now() + driver.options.reconnect_for;
                transport = loop {
                    let next = tokio::time::timeout_at(deadline, rx.recv()).await;
                    let Ok(Some((mut t, peer_received))) = next else {
                        tracing::warn!("the client did not come back; the link ends");
                        return;
                    };
                    let received = driver.shared.received.load(Ordering::Acquire);
                    if server_answer(&mut t, received).await.is_ok() {
                        driver.shared.trim(peer_received);
                        tracing::info!("the client is back on a new transport");
                        break t;
                    }
                };
                attached_tx.send_replace(true);
            }
        });
        Ok((relink, reattach))
    }

    fn pair(options: RelinkOptions) -> (Relink, Driver) {
        let (in_tx, in_rx) = mpsc::channel(64);
        let (out_tx, out_rx) = mpsc::channel(64);
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        let shared = Arc::new(Shared {
            unacked: Mutex::default(),
            received: AtomicU64::new(0),
            wake: Notify::new(),
        });
        (
            Relink {
                incoming: in_rx,
                leftover: Bytes::new(),
                outgoing: PollSender::new(out_tx),
                closed: closed_rx,
            },
            Driver {
                shared,
                incoming: in_tx,
                outgoing: out_rx,
                options,
                _closed: closed_tx,
            },
        )
    }
}

impl Driver {
    /// Runs the link over one transport until it is lost or the link closes.
    async fn epoch(
        &mut self,
        transport: BoxTransport,
        replacements: Option<&mut mpsc::Receiver<(BoxTransport, u64)>>,
    ) -> Epoch {
        let (mut rd, mut wr) = tokio::io::split(transport);
        let shared = self.shared.clone();
        let incoming = self.incoming.clone();
        let idle = self.options.idle;
        let last_heard = Mutex::new(Instant::now());
        // While the local side does not take what arrived, silence is ours.
        let blocked = std::sync::atomic::AtomicBool::new(false);

        let read = async {
            let mut buf = BytesMut::new();
            loop {
                let (kind, payload) = read_record(&mut rd, &mut buf).await?;
                *last_heard.lock().expect("relink lock poisoned") = Instant::now();
                match kind {
                    KIND_DATA => {
                        let n = payload.len() as u64;
                        blocked.store(true, std::sync::atomic::Ordering::Relaxed);
                        let sent = incoming.send(payload).await;
                        blocked.store(false, std::sync::atomic::Ordering::Relaxed);
                        *last_heard.lock().expect("relink lock poisoned") = Instant::now();
                        if sent.is_err() {
                            // The local side is gone: the link is closing.
                            return Ok(());
                        }
                        shared.received.fetch_add(n, Ordering::AcqRel);
                        shared.wake.notify_one();
                    }
                    KIND_CLOSE => return Ok(()),
                    KIND_ACK if payload.len() == 8 => {
                        let acked = u64::from_be_bytes(payload[..].try_into().expect("8 bytes"));
                        shared.trim(acked);
                    }
                    _ => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "bad relink record",
                        ));
                    }
                }
            }
        };

        let outgoing = &mut self.outgoing;
        let write = async {
            let mut out = Vec::new();
            // Resend what the peer has not got, then go on with new bytes.
            let resend: Vec<Bytes> = {
                let unacked = shared.unacked.lock().expect("relink lock poisoned");
                unacked.queue.iter().cloned().collect()
            };
            for chunk in resend {
                encode_record(&mut out, KIND_DATA, &chunk);
                if out.len() >= MAX_RECORD {
                    write_records(&mut wr, &mut out).await?;
                }
            }
            write_records(&mut wr, &mut out).await?;
            let mut acked_sent = 0u64;
            let mut tick = false;
            let mut ticker = tokio::time::interval(ACK_EVERY);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let room = shared.unacked_len() < MAX_UNACKED;
                tokio::select! {
                    chunk = outgoing.recv(), if room => match chunk {
                        Some(chunk) => {
                            shared.keep(chunk.clone());
                            for piece in chunk.chunks(MAX_RECORD) {
                                encode_record(&mut out, KIND_DATA, piece);
                            }
                        }
                        None => {
                            // Closed here: say so, so the peer ends too instead of
                            // waiting for a new transport.
                            encode_record(&mut out, KIND_CLOSE, &[]);
                            write_records(&mut wr, &mut out).await?;
                            let _ = wr.shutdown().await;
                            return io::Result::Ok(true);
                        }
                    },
                    () = shared.wake.notified() => {}
                    _ = ticker.tick() => tick = true,
                }
                let received = shared.received.load(Ordering::Acquire);
                let owed = received.saturating_sub(acked_sent);
                if owed > 0 && (owed >= ACK_BYTES || tick || !room) {
                    tick = false;
                    // In the same write as the data before it.
                    encode_record(&mut out, KIND_ACK, &received.to_be_bytes());
                    acked_sent = received;
                }
                write_records(&mut wr, &mut out).await?;
            }
        };

        let silence = async {
            loop {
                let heard = *last_heard.lock().expect("relink lock poisoned");
                let quiet_until = heard + idle;
                if Instant::now() >= quiet_until
                    && !blocked.load(std::sync::atomic::Ordering::Relaxed)
                {
                    return;
                }
                tokio::time::sleep_until(
                    quiet_until.max(Instant::now() + Duration::from_millis(100)),
                )
                .await;
            }
        };
        let replaced = async {
            match replacements {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };

        let mut read = std::pin::pin!(read);
        tokio::select! {
            r = &mut read => match r {
                Ok(()) => Epoch::Closed,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Epoch::Lost("the transport closed".into()),
                Err(e) => Epoch::Lost(e.to_string()),
            },
            w = write => match w {
                Ok(true) => {
                    // The close is written; a transport that relays (a
                    // port-forward) may still hold it, so wait, briefly, for the
                    // peer to hang up before the process may exit.
                    let _ = tokio::time::timeout(Duration::from_secs(1), &mut read).await;
                    Epoch::Closed
                }
                Ok(false) => Epoch::Lost("the writer stopped".into()),
                Err(e) => Epoch::Lost(e.to_string()),
            },
            () = silence => Epoch::Lost(format!("nothing arrived for {} s", idle.as_secs())),
            next = replaced => match next {
                Some((t, received)) => Epoch::Replaced(t, received),
                None => Epoch::Closed,
            },
        }
    }
}

impl AsyncRead for Relink {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.leftover.is_empty() {
            match self.incoming.poll_recv(cx) {
                Poll::Ready(Some(bytes)) => self.leftover = bytes,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = self.leftover.len().min(buf.remaining());
        buf.put_slice(&self.leftover[..n]);
        self.leftover.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Relink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.outgoing.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the link has ended",
                )));
            }
            Poll::Pending => return Poll::Pending,
        }
        let n = buf.len().min(MAX_RECORD);
        match self.outgoing.send_item(Bytes::copy_from_slice(&buf[..n])) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the link has ended",
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Closes the link: waits until the peer has been told (or the link has
    /// ended), so a process that exits right after does not leave the peer
    /// waiting for a new transport.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.outgoing.close();
        match Pin::new(&mut self.closed).poll(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }
}
