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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::PollSender;

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

/// What a client sent to attach a transport, as the agent read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Attach {
    /// The link's token.
    pub token: Token,
    /// Payload bytes the client has received.
    pub received: u64,
    /// What the client proves itself with (the session secret).
    pub credential: Vec<u8>,
}

impl std::fmt::Debug for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attach")
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

/// Reads the client's attach header (magic included).
///
/// # Errors
///
/// `InvalidData` when the magic is wrong; I/O errors as they come.
pub async fn read_attach<T: AsyncRead + Unpin>(t: &mut T) -> io::Result<Attach> {
    let mut magic = [0u8; 8];
    t.read_exact(&mut magic).await?;
    if &magic != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a graft relink transport",
        ));
    }
    let mut token = [0u8; 16];
    t.read_exact(&mut token).await?;
    let received = t.read_u64().await?;
    let len = usize::from(t.read_u16().await?);
    if len > MAX_CREDENTIAL {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a relink credential of {len} bytes (at most {MAX_CREDENTIAL})"),
        ));
    }
    let mut credential = vec![0u8; len];
    t.read_exact(&mut credential).await?;
    Ok(Attach {
        token,
        received,
        credential,
    })
}

/// Answers a client of graft before protocol 0.3 (its transport began with
/// [`LEGACY_MAGIC`], in plaintext; the caller has read its 32-byte attach) in
/// the old relink format: the attach answer, then, once the client's first
/// data record (its `Hello`) has arrived, one data record carrying `frame` (an
/// encoded `Hello` rejection that says what to do) and a close record. The old
/// client thus shows the reason instead of a broken link: had the answer come
/// before its `Hello` was written, the close would end its link first.
///
/// # Errors
///
/// I/O errors as they come; `InvalidData` when the client sends something else.
pub async fn refuse_legacy<T: AsyncRead + AsyncWrite + Unpin>(
    t: &mut T,
    frame: &[u8],
) -> io::Result<()> {
    t.write_all(LEGACY_MAGIC).await?;
    t.write_all(&0u64.to_be_bytes()).await?;
    t.flush().await?;
    let mut buf = BytesMut::new();
    loop {
        match read_record(t, &mut buf).await? {
            (KIND_DATA, _) => break,
            (KIND_ACK, _) => continue,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not an old graft relink client",
                ));
            }
        }
    }
    let mut out = Vec::new();
    encode_record(&mut out, KIND_DATA, frame);
    encode_record(&mut out, KIND_CLOSE, &[]);
    write_records(t, &mut out).await?;
    t.flush().await?;
    t.shutdown().await
}

/// A fresh random token, from the kernel's random source.
///
/// # Errors
///
/// When `/dev/urandom` cannot be read.
pub fn new_token() -> io::Result<Token> {
    let mut token = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut token)?;
    Ok(token)
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

async fn client_attach(
    t: &mut BoxTransport,
    token: &Token,
    received: u64,
    credential: &[u8],
) -> io::Result<u64> {
    let mut header = Vec::with_capacity(34 + credential.len());
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(token);
    header.extend_from_slice(&received.to_be_bytes());
    let len = u16::try_from(credential.len()).expect("checked against MAX_CREDENTIAL");
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(credential);
    t.write_all(&header).await?;
    t.flush().await?;
    let mut magic = [0u8; 8];
    t.read_exact(&mut magic).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the agent closed the link at the attach: it refused the session secret \
                 (another session's agent?) or the link's token",
            )
        } else {
            e
        }
    })?;
    if &magic != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the agent does not speak graft relink",
        ));
    }
    t.read_u64().await
}

async fn server_answer(t: &mut BoxTransport, received: u64) -> io::Result<()> {
    let mut answer = Vec::with_capacity(16);
    answer.extend_from_slice(MAGIC);
    answer.extend_from_slice(&received.to_be_bytes());
    t.write_all(&answer).await?;
    t.flush().await
}

/// Reads one record: `(kind, payload)`.
async fn read_record<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> io::Result<(u8, Bytes)> {
    let kind = rd.read_u8().await?;
    let len = rd.read_u32().await? as usize;
    if len > MAX_RECORD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "relink record too large",
        ));
    }
    buf.resize(len, 0);
    rd.read_exact(&mut buf[..]).await?;
    Ok((kind, buf.split().freeze()))
}

/// Appends one record to `out`.
fn encode_record(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Writes records with one write: a transport that sends each write as a
/// message of its own (kube's port-forward WebSocket, on a connection to the
/// API server without `TCP_NODELAY`) then sends one segment, not a header or
/// an acknowledgement that Nagle's algorithm holds back behind the peer's
/// delayed ACK (tens of milliseconds per request) with what follows it.
async fn write_records<W: AsyncWrite + Unpin>(wr: &mut W, out: &mut Vec<u8>) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    wr.write_all(out).await?;
    out.clear();
    wr.flush().await
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A transport that fails every read and write once its flag is set, like a
    /// port-forward whose WebSocket was cut.
    struct Cuttable {
        inner: tokio::io::DuplexStream,
        cut: Arc<AtomicBool>,
    }

    fn cut_error() -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionReset, "cut")
    }

    impl AsyncRead for Cuttable {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.cut.load(Ordering::SeqCst) {
                return Poll::Ready(Err(cut_error()));
            }
            // Poll again soon so a cut is seen even while nothing arrives.
            let waker = cx.waker().clone();
            let cut = self.cut.clone();
            let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
            if polled.is_pending() {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if cut.load(Ordering::SeqCst) {
                        waker.wake();
                    }
                });
            }
            polled
        }
    }

    impl AsyncWrite for Cuttable {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.cut.load(Ordering::SeqCst) {
                return Poll::Ready(Err(cut_error()));
            }
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A network of cuttable transports: `connect` gives the client end and sends
    /// the agent end to the accept loop.
    struct Net {
        accepted: mpsc::UnboundedSender<BoxTransport>,
        cuts: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
        connects: std::sync::atomic::AtomicUsize,
    }

    impl Net {
        /// A network, and the agent ends of the transports clients open on it.
        fn new() -> (Arc<Net>, mpsc::UnboundedReceiver<BoxTransport>) {
            let (tx, rx) = mpsc::unbounded_channel();
            let net = Net {
                accepted: tx,
                cuts: Arc::default(),
                connects: Default::default(),
            };
            (Arc::new(net), rx)
        }

        fn connect(&self) -> BoxTransport {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let cut = Arc::new(AtomicBool::new(false));
            self.cuts.lock().unwrap().push(cut.clone());
            self.connects.fetch_add(1, Ordering::SeqCst);
            let _ = self.accepted.send(Box::new(Cuttable {
                inner: b,
                cut: cut.clone(),
            }));
            Box::new(Cuttable { inner: a, cut })
        }

        fn cut_all(&self) {
            for cut in self.cuts.lock().unwrap().drain(..) {
                cut.store(true, Ordering::SeqCst);
            }
        }
    }

    /// A client and agent end over a [`Net`]; the agent's accept loop re-attaches
    /// every later transport.
    async fn linked() -> (Relink, Relink, Arc<Net>) {
        let (net, mut rx) = Net::new();
        let options = RelinkOptions {
            reconnect_for: Duration::from_secs(10),
            idle: Duration::from_secs(5),
        };
        let first = net.connect();
        let reconnect_net = net.clone();
        let reconnect: Reconnect = Box::new(move || {
            let t = reconnect_net.connect();
            Box::pin(async move { Ok(t) })
        });
        let client = tokio::spawn(Relink::client(
            first,
            reconnect,
            options,
            b"s3cret".to_vec(),
        ));
        let mut agent_first = rx.recv().await.unwrap();
        let attach = read_attach(&mut agent_first).await.unwrap();
        assert_eq!(attach.credential, b"s3cret");
        let (agent, reattach) = Relink::server(agent_first, attach, options).await.unwrap();
        tokio::spawn(async move {
            while let Some(mut t) = rx.recv().await {
                let attach = read_attach(&mut t).await.unwrap();
                assert_eq!(attach.token, reattach.token());
                assert_eq!(
                    attach.credential, b"s3cret",
                    "every attach proves the secret"
                );
                reattach.attach(t, attach.received).await;
            }
        });
        (client.await.unwrap().unwrap(), agent, net)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_survive_cut_transports_both_ways() {
        let (client, agent, net) = linked().await;
        let up = pattern(3 << 20, 1);
        let down = pattern(2 << 20, 7);
        let (mut c_rd, mut c_wr) = tokio::io::split(client);
        let (mut a_rd, mut a_wr) = tokio::io::split(agent);
        let (up2, down2) = (up.clone(), down.clone());
        let send_up = tokio::spawn(async move {
            for chunk in up2.chunks(10_000) {
                c_wr.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            c_wr
        });
        let send_down = tokio::spawn(async move {
            for chunk in down2.chunks(7_000) {
                a_wr.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            a_wr
        });
        // The agent's reader cuts every transport after each 600 KiB it takes,
        // so the cuts land in the middle of both transfers.
        let mut got_up = vec![0u8; up.len()];
        let mut got_down = vec![0u8; down.len()];
        let read_up = async {
            let mut at = 0;
            let mut next_cut = 600 << 10;
            while at < got_up.len() {
                let n = a_rd.read(&mut got_up[at..]).await?;
                assert!(n > 0, "the link ended early");
                at += n;
                if at >= next_cut {
                    net.cut_all();
                    next_cut += 600 << 10;
                }
            }
            io::Result::Ok(())
        };
        let (r1, r2) = tokio::join!(read_up, c_rd.read_exact(&mut got_down));
        r1.unwrap();
        r2.unwrap();
        assert!(got_up == up, "client → agent bytes differ");
        assert!(got_down == down, "agent → client bytes differ");
        let connects = net.connects.load(Ordering::SeqCst);
        assert!(
            connects >= 5,
            "only {connects} transports: the cuts did not bite"
        );

        // Closing one end is EOF at the other, not a wait for a new transport.
        let mut c_wr = send_up.await.unwrap();
        c_wr.shutdown().await.unwrap();
        drop(c_wr);
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), a_rd.read_to_end(&mut rest))
            .await
            .expect("EOF within 2 s")
            .unwrap();
        assert!(rest.is_empty());
        drop(send_down.await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_comes_back_ends_the_agents_link() {
        let (net, mut rx) = Net::new();
        let options = RelinkOptions {
            reconnect_for: Duration::from_millis(300),
            idle: Duration::from_secs(5),
        };
        let first = net.connect();
        let reconnect: Reconnect = Box::new(|| {
            Box::pin(async { Err(io::Error::new(io::ErrorKind::ConnectionRefused, "gone")) })
        });
        let client = tokio::spawn(Relink::client(first, reconnect, options, Vec::new()));
        let mut t = rx.recv().await.unwrap();
        let attach = read_attach(&mut t).await.unwrap();
        let (mut agent, _reattach) = Relink::server(t, attach, options).await.unwrap();
        let mut client = client.await.unwrap().unwrap();
        net.cut_all();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(3), agent.read(&mut buf))
            .await
            .expect("the agent's link ends")
            .unwrap();
        assert_eq!(n, 0);
        let n = tokio::time::timeout(Duration::from_secs(3), client.read(&mut buf))
            .await
            .expect("the client's link ends")
            .unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn an_old_client_reads_the_refusal_in_its_own_format_after_its_hello() {
        let (mut agent, mut client) = tokio::io::duplex(4096);
        let refusal = tokio::spawn(async move { refuse_legacy(&mut agent, b"frame").await });
        let mut answer = [0u8; 16];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer[..8], LEGACY_MAGIC);
        // Nothing more until the old client has sent its Hello.
        let early = tokio::time::timeout(Duration::from_millis(100), client.read_u8()).await;
        assert!(early.is_err(), "the refusal came before the Hello");
        client
            .write_all(&[KIND_DATA, 0, 0, 0, 2, 1, 2])
            .await
            .unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let mut want = vec![KIND_DATA, 0, 0, 0, 5];
        want.extend_from_slice(b"frame");
        want.extend_from_slice(&[KIND_CLOSE, 0, 0, 0, 0]);
        assert_eq!(got, want);
        refusal.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_oversized_credential_is_refused() {
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&[0u8; 24]);
        header.extend_from_slice(&u16::MAX.to_be_bytes());
        let err = read_attach(&mut &header[..]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_agent_sees_its_client_detach_and_come_back() {
        let (net, mut rx) = Net::new();
        let options = RelinkOptions {
            reconnect_for: Duration::from_secs(10),
            idle: Duration::from_secs(5),
        };
        let first = net.connect();
        // The client may reconnect only once the test allows it.
        let allowed = Arc::new(AtomicBool::new(false));
        let (reconnect_net, gate) = (net.clone(), allowed.clone());
        let reconnect: Reconnect = Box::new(move || {
            let net = reconnect_net.clone();
            let gate = gate.clone();
            Box::pin(async move {
                if !gate.load(Ordering::SeqCst) {
                    return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "not yet"));
                }
                Ok(net.connect())
            })
        });
        let client = tokio::spawn(Relink::client(first, reconnect, options, Vec::new()));
        let mut t = rx.recv().await.unwrap();
        let attach = read_attach(&mut t).await.unwrap();
        let (mut agent, reattach) = Relink::server(t, attach, options).await.unwrap();
        let mut attached = reattach.attached();
        assert!(*attached.borrow_and_update(), "attached at the start");
        let relay = reattach.clone();
        tokio::spawn(async move {
            while let Some(mut t) = rx.recv().await {
                let attach = read_attach(&mut t).await.unwrap();
                relay.attach(t, attach.received).await;
            }
        });
        let mut client = client.await.unwrap().unwrap();

        net.cut_all();
        tokio::time::timeout(Duration::from_secs(3), attached.wait_for(|a| !*a))
            .await
            .expect("the cut is seen within 3 s")
            .unwrap();
        // Written while detached: kept and delivered after the re-attach.
        client.write_all(b"while away").await.unwrap();
        allowed.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), attached.wait_for(|a| *a))
            .await
            .expect("the client re-attaches within 5 s")
            .unwrap();
        let mut got = [0u8; 10];
        tokio::time::timeout(Duration::from_secs(3), agent.read_exact(&mut got))
            .await
            .expect("the bytes arrive")
            .unwrap();
        assert_eq!(&got, b"while away");
    }
}
