//! The sniffing mirror: mirrored ports are copied off the packet path instead
//! of passed through the agent, so the target's clients talk to the target
//! directly and never wait for graft.
//!
//! A [`Sniffer`] owns two threads. The capture thread reads the segments of the
//! watched ports from a [`capture::PacketSocket`], parses them (`etherparse`)
//! and reassembles each connection ([`reassembly`]); the events go through a
//! bounded channel, whose data also counts against [`IN_TRANSIT`] bytes, to the
//! consumer on the mirror thread, which feeds the same downstream as the
//! pass-through mirror ([`tee`]): every unfiltered mirror of the port gets a
//! connection with the client's bytes (and, framed, the target's answers when
//! it asked for them), and when the port has HTTP filters the client's bytes
//! are parsed as HTTP ([`super::http::copy_requests`]) so that each mirror
//! filter selects its requests. Whenever the copy cannot keep up (the channel
//! or a mirror's queue is full) that connection's copy is dropped; the capture
//! never waits.
//!
//! The mirror thread runs its own current-thread tokio runtime, so the copies'
//! tasks (the consumer, each mirror's writer, the HTTP copies) never queue
//! behind the agent's other work, nor it behind them. Both threads give their
//! CPU away often ([`yield_now`]): a ring block comes as one burst of work on a
//! CPU the target's server needs too, and on the bench's kernel (Linux 6.18,
//! `PREEMPT_NONE`) a task woken on that CPU waited for the burst to end or for
//! the next tick, whatever the burst's scheduling policy
//! (issue 13: a `SCHED_IDLE` thread that wakes every 3 ms and computes for
//! 300 µs held the target's requests up to 300 µs at p99, as a normal one
//! did). A `sched_yield(2)` enters the scheduler, which then runs the woken
//! task; when nothing else is runnable it costs about 0.3 µs. And the mirror
//! thread spreads a block's copies over the time until the next block
//! ([`pace`]): written at once, they made the local program answer them in one
//! burst, which the target's clients waited behind as well.
//!
//! New connections are copied only while their port is watched
//! ([`Sniffer::watch`]); a connection already copied stays copied until it ends
//! after its port is unwatched (so a hub that hands over still copies the
//! connections it saw start). Connections from the probe sources
//! ([`crate::rules::probes`]) are never copied, as they are never redirected,
//! and neither are the agent's own connections from the target's namespace
//! ([`own_connection`]): a mirrored program that calls its own service through
//! graft would otherwise be sent copies of its own calls, without end.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use graft_protocol::incoming::tap::Direction;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::capture::{self, PacketSocket};
use super::reassembly::{EndReason, Event, FlowId, Limits, Reassembler};
use super::{ConnMeta, Hub, PortSubs, pace, ring, segment, tee};

/// Events queued between the capture thread and the consumer.
const EVENTS: usize = 4096;

/// Copied bytes queued between the capture thread and the consumer at most.
pub const IN_TRANSIT: usize = 16 << 20;

/// The largest chunk gathered for a mirror (a pass-through read's size).
const CHUNK: usize = 64 * 1024;

/// Chunks of a connection's client bytes queued for its HTTP parser at most.
const HTTP_QUEUE: usize = 64;

/// How many groups a block's copies are spread over ([`consume`]).
const PACE_SLOTS: usize = 4;

/// The time between two groups: the block's [`ring::RETIRE`] shared by
/// [`PACE_SLOTS`] (so a block's copies are out before the next block at
/// 10 000 requests a second).
const PACE_SLOT: Duration =
    Duration::from_nanos(ring::RETIRE.as_nanos() as u64 / PACE_SLOTS as u64);

/// Bytes a connection's first bytes are kept to tell HTTP from the rest.
const DETECT_BYTES: usize = 64;

/// Packets the capture thread handles between two [`yield_now`]s (a few µs of
/// parsing and reassembly).
const YIELD_EVERY: usize = 8;

/// How often the capture thread expires idle flows and reads the kernel's drops.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// How long [`Sniffer::watch`] waits for the capture thread to filter a new port.
const APPLY_WAIT: Duration = Duration::from_secs(2);

/// How many of the agent's own connections [`own_connection`] remembers.
const OWN_MAX: usize = 16_384;

/// How long an own connection is remembered at least.
const OWN_TTL: Duration = Duration::from_secs(600);

/// The local addresses of the agent's own TCP connections, by when they were made.
static OWN: Mutex<Option<HashMap<SocketAddr, Instant>>> = Mutex::new(None);

/// Records that the agent itself opened a connection from `local` (an outgoing
/// connection of a session): the mirror never copies it. Call it before the
/// connection's first byte is written; the address is remembered for at least
/// [`OWN_TTL`] (at most [`OWN_MAX`] addresses: beyond that the oldest go).
pub fn own_connection(local: SocketAddr) {
    let mut own = OWN.lock().expect("own connections lock poisoned");
    let own = own.get_or_insert_with(HashMap::new);
    if own.len() >= OWN_MAX {
        let now = Instant::now();
        own.retain(|_, made| now.duration_since(*made) < OWN_TTL);
        if own.len() >= OWN_MAX {
            own.clear();
        }
    }
    own.insert(local, Instant::now());
}

/// Whether `client` is one of the agent's own connections.
fn is_own(client: SocketAddr) -> bool {
    let own = OWN.lock().expect("own connections lock poisoned");
    own.as_ref().is_some_and(|own| own.contains_key(&client))
}

/// What the hub tells the capture thread, and what the thread has applied.
struct Control {
    /// Ports whose new connections are copied, each with whether some session
    /// reads their answers (else the capture keeps the answers' headers only).
    ports: Mutex<BTreeMap<u16, bool>>,
    /// Bumped on every change of `ports`.
    generation: AtomicU64,
    /// The last generation whose ports the kernel filters.
    applied: tokio::sync::watch::Sender<u64>,
    stop: AtomicBool,
}

/// The sniffing mirror of one hub; dropping it stops the capture.
pub struct Sniffer {
    control: Arc<Control>,
}

impl Sniffer {
    /// Opens the packet socket in the current (the target's) network namespace
    /// and starts the capture thread and the consumer, which looks up each new
    /// connection's subscriptions in `hub`.
    ///
    /// # Errors
    ///
    /// The packet socket could not be opened: `EPERM` without `CAP_NET_RAW`
    /// (the hub then mirrors by pass-through).
    pub fn start(hub: Weak<Hub>) -> io::Result<Sniffer> {
        let socket = PacketSocket::open()?;
        let control = Arc::new(Control {
            ports: Mutex::default(),
            generation: AtomicU64::new(0),
            applied: tokio::sync::watch::Sender::new(0),
            stop: AtomicBool::new(false),
        });
        let (events_tx, events_rx) = mpsc::channel(EVENTS);
        let in_transit = Arc::new(AtomicUsize::new(0));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let consumer_transit = in_transit.clone();
        std::thread::Builder::new()
            .name("graft-mirror".to_owned())
            .spawn(move || {
                MIRROR_THREAD.set(true);
                // Ends when the capture thread does (it holds the sender) or
                // the hub is gone; dropping the runtime then cancels the
                // copies still in flight: nobody mirrors any more.
                runtime.block_on(consume(events_rx, hub, consumer_transit));
            })?;
        let thread_control = control.clone();
        std::thread::Builder::new()
            .name("graft-sniff".to_owned())
            .spawn(move || capture_loop(socket, &thread_control, &events_tx, &in_transit))?;
        Ok(Sniffer { control })
    }

    /// Copies the new connections to `port` from when it returns, with the
    /// target's answers whole when `answers` (a session reads them), else only
    /// their headers: it waits (at most [`APPLY_WAIT`]) until the kernel
    /// filters the port so. Called again for a watched port, it changes
    /// `answers`; a connection whose answers were cut short meanwhile tells its
    /// copy so ([`Event::Cut`]).
    ///
    /// # Errors
    ///
    /// [`capture::MAX_PORTS`] ports are already watched, or the capture stopped.
    pub async fn watch(&self, port: u16, answers: bool) -> io::Result<()> {
        let generation = {
            let mut ports = self.control.ports.lock().expect("sniffer lock poisoned");
            if !ports.contains_key(&port) && ports.len() >= capture::MAX_PORTS {
                return Err(io::Error::other(format!(
                    "{} ports are sniffed already",
                    capture::MAX_PORTS
                )));
            }
            if ports.insert(port, answers) == Some(answers) {
                return Ok(());
            }
            self.control.generation.fetch_add(1, Ordering::SeqCst) + 1
        };
        let mut applied = self.control.applied.subscribe();
        match tokio::time::timeout(APPLY_WAIT, applied.wait_for(|g| *g >= generation)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(io::Error::other("the capture stopped")),
            Err(_) => {
                tracing::debug!(port, "the capture has not filtered the port yet");
                Ok(())
            }
        }
    }

    /// Stops copying new connections to `port`; those being copied go on.
    pub fn unwatch(&self, port: u16) {
        let mut ports = self.control.ports.lock().expect("sniffer lock poisoned");
        if ports.remove(&port).is_some() {
            self.control.generation.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.control.stop.store(true, Ordering::SeqCst);
    }
}

thread_local! {
    /// Set on the mirror thread.
    static MIRROR_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Gives the CPU to a task that is waiting for it, if there is one
/// (`sched_yield(2)`), when called on the mirror thread; elsewhere (a
/// pass-through mirror on the agent's runtime) it does nothing, as the agent's
/// other tasks must not wait for it.
pub(super) fn yield_now() {
    if MIRROR_THREAD.get() {
        std::thread::yield_now();
    }
}

/// The capture thread: reads, reassembles and hands events on until stopped.
///
/// It runs at the agent's normal priority, as does the mirror thread. At
/// `SCHED_IDLE` they fell behind at once under a load that kept both cores of
/// the bench's machine busy, and the copies were dropped (3 to 10 % arrived),
/// a mirror that drops everything under load is no mirror; and they still held
/// the target up at 10 000 requests/s, since a woken task does not preempt
/// them either (see the module's doc).
fn capture_loop(
    mut socket: PacketSocket,
    control: &Control,
    events: &mpsc::Sender<Event>,
    in_transit: &AtomicUsize,
) {
    let excluded: HashSet<IpAddr> = crate::rules::settings().excluded.iter().copied().collect();
    let mut reassembler = Reassembler::new(Limits::default());
    let mut accepting = BTreeMap::new();
    let mut seen = u64::MAX;
    let mut filtered: Option<Vec<capture::Watched>> = None;
    let mut out = Vec::new();
    let mut pending_ends = Vec::new();
    let mut housekeeping = Instant::now();
    loop {
        if control.stop.load(Ordering::SeqCst) {
            reassembler.end_all(&mut out);
            dispatch(
                &mut out,
                events,
                in_transit,
                &mut reassembler,
                &mut pending_ends,
            );
            break;
        }
        let generation = control.generation.load(Ordering::SeqCst);
        if generation != seen {
            seen = generation;
            accepting = control.ports.lock().expect("sniffer lock poisoned").clone();
        }
        // The kernel keeps the watched ports and those of live flows (whose
        // answers whole: a copy that read them goes on until the flow ends).
        let mut wanted: Vec<capture::Watched> = accepting
            .iter()
            .map(|(&port, &answers)| capture::Watched { port, answers })
            .collect();
        for port in reassembler.ports() {
            if !accepting.contains_key(&port) {
                wanted.push(capture::Watched {
                    port,
                    answers: true,
                });
            }
        }
        wanted.sort_unstable();
        wanted.truncate(capture::MAX_PORTS);
        if filtered.as_ref() != Some(&wanted) {
            if let Err(e) = socket.set_ports(&wanted) {
                tracing::warn!("the sniffing mirror's filter was refused: {e}");
            }
            if filtered.is_none()
                && let Err(e) = socket.start()
            {
                tracing::warn!("the sniffing mirror could not start: {e}");
                break;
            }
            tracing::debug!(ports = ?wanted, "sniffing");
            filtered = Some(wanted);
        }
        control.applied.send_if_modified(|applied| {
            let changed = *applied != seen;
            *applied = seen;
            changed
        });
        let now = Instant::now();
        let mut handled = 0;
        let read = socket.read_batch(|packet| {
            handled += 1;
            if handled % YIELD_EVERY == 0 {
                std::thread::yield_now();
            }
            if let Some(seg) = segment::parse(&packet) {
                let accept = |client: SocketAddr, server: SocketAddr| {
                    accepting.contains_key(&server.port()) && !excluded.contains(&client.ip())
                };
                reassembler.segment(&seg, now, accept, &mut out);
            }
        });
        if let Err(e) = read {
            tracing::warn!("the sniffing mirror stopped reading: {e}");
            reassembler.end_all(&mut out);
            dispatch(
                &mut out,
                events,
                in_transit,
                &mut reassembler,
                &mut pending_ends,
            );
            break;
        }
        if now.duration_since(housekeeping) >= HOUSEKEEPING {
            housekeeping = now;
            reassembler.expire(now, &mut out);
            let drops = socket.drops();
            if drops > 0 {
                tracing::debug!(
                    drops,
                    "the kernel dropped captured packets (the agent fell behind)"
                );
            }
            tracing::trace!(
                flows = reassembler.flows(),
                buffered = reassembler.buffered(),
                "sniffing"
            );
            let refused = reassembler.take_refused();
            if refused > 0 {
                tracing::debug!(refused, "connections not mirrored: too many at once");
            }
        }
        dispatch(
            &mut out,
            events,
            in_transit,
            &mut reassembler,
            &mut pending_ends,
        );
    }
}

/// Hands `out` to the consumer; a flow whose event does not fit is dropped
/// (its end is sent when there is room again).
fn dispatch(
    out: &mut Vec<Event>,
    events: &mpsc::Sender<Event>,
    in_transit: &AtomicUsize,
    reassembler: &mut Reassembler,
    pending_ends: &mut Vec<FlowId>,
) {
    pending_ends.retain(|&id| {
        let end = Event::End {
            id,
            why: EndReason::Stopped,
        };
        events.try_send(end).is_err()
    });
    let mut dropped = HashSet::new();
    for event in out.drain(..) {
        let id = event.id();
        if dropped.contains(&id) {
            continue;
        }
        if let Event::End { why, .. } = &event
            && let EndReason::Gap { direction, why } = why
        {
            tracing::debug!(?direction, "a mirrored connection's copy ends: {why}");
        }
        let len = match &event {
            Event::Data { bytes, .. } => bytes.len(),
            _ => 0,
        };
        let over = in_transit.fetch_add(len, Ordering::SeqCst) + len > IN_TRANSIT;
        let sent = !over && events.try_send(event).is_ok();
        if !sent {
            in_transit.fetch_sub(len, Ordering::SeqCst);
            if events.is_closed() {
                return;
            }
            tracing::debug!("the mirror fell behind; a connection's copy is dropped");
            reassembler.forget(id);
            dropped.insert(id);
            pending_ends.push(id);
        }
    }
}

/// The consumer: turns the capture's events into mirror connections. The
/// bytes of the events ready at once (a block of the capture's ring) are
/// gathered per connection, both directions in order (up to [`CHUNK`]), so a
/// mirror's queue holds chunks as large as a pass-through read, not one segment
/// or one request each.
///
/// The gathered chunks go out spread over the time until the next block, in
/// [`PACE_SLOTS`] groups [`PACE_SLOT`] apart ([`pace`]): a block's copies
/// written at once made the local program answer them in one burst, which the
/// target's own clients waited behind. A chunk that fills, a connection's
/// close or end, goes out at once.
async fn consume(mut events: mpsc::Receiver<Event>, hub: Weak<Hub>, in_transit: Arc<AtomicUsize>) {
    let mut pacer = match pace::Pacer::new() {
        Ok(pacer) => Some(pacer),
        Err(e) => {
            tracing::debug!("the mirror's copies go out a block at a time (no timer: {e})");
            None
        }
    };
    let mut flows: HashMap<FlowId, Copy> = HashMap::new();
    let mut dirty: VecDeque<FlowId> = VecDeque::new();
    let mut group = 0;
    loop {
        let mut took = false;
        if dirty.is_empty() {
            let Some(first) = events.recv().await else {
                return;
            };
            took = true;
            if !handle(first, &mut flows, &mut dirty, &hub, &in_transit) {
                return;
            }
        }
        while let Ok(event) = events.try_recv() {
            took = true;
            if !handle(event, &mut flows, &mut dirty, &hub, &in_transit) {
                return;
            }
        }
        if took || pacer.is_none() {
            // A new block: its copies (and any left of the last) share the
            // slots until the next one.
            group = match pacer {
                Some(_) => dirty.len().div_ceil(PACE_SLOTS),
                None => dirty.len(),
            };
        }
        let now = group.max(1).min(dirty.len());
        for id in dirty.drain(..now) {
            if let Some(copy) = flows.get_mut(&id) {
                copy.flush();
            }
        }
        if dirty.is_empty() {
            continue;
        }
        let failed = match &pacer {
            Some(pacer) => pacer.sleep(PACE_SLOT).await.err(),
            None => None,
        };
        if let Some(e) = failed {
            tracing::debug!("the mirror's pacing timer failed ({e}); copies go out at once");
            pacer = None;
        }
    }
}

/// Takes one event; false when the hub is gone.
fn handle(
    event: Event,
    flows: &mut HashMap<FlowId, Copy>,
    dirty: &mut VecDeque<FlowId>,
    hub: &Weak<Hub>,
    in_transit: &AtomicUsize,
) -> bool {
    match event {
        Event::Open { id, client, server } => {
            let Some(hub) = hub.upgrade() else {
                return false;
            };
            if is_own(client) {
                tracing::debug!(%client, %server, "the agent's own connection is not mirrored");
                return true;
            }
            // A port stolen meanwhile still has this connection go to the
            // target directly (the redirect only takes new ones): copied.
            if let Some(subs) = hub.port_subs(server.port()) {
                let meta = ConnMeta {
                    port: server.port(),
                    peer: client,
                    local: server,
                };
                flows.insert(id, Copy::start(meta, subs, &hub.in_flight));
            }
        }
        Event::Data {
            id,
            direction,
            bytes,
            at,
        } => {
            in_transit.fetch_sub(bytes.len(), Ordering::SeqCst);
            if let Some(copy) = flows.get_mut(&id) {
                let was_empty = copy.parts.is_empty();
                copy.gather(tee::Part {
                    direction,
                    bytes,
                    at,
                });
                if was_empty && !copy.parts.is_empty() {
                    dirty.push_back(id);
                }
            }
        }
        Event::Cut { id, direction } => {
            // The client's bytes, or answers a mirror reads, cannot be copied
            // whole any more: that copy ends, as at a gap.
            let wanted = flows
                .get(&id)
                .is_some_and(|copy| direction == Direction::Request || copy.responses);
            if wanted && let Some(mut copy) = flows.remove(&id) {
                tracing::debug!(
                    ?direction,
                    "a mirrored connection's copy ends: the capture kept only headers"
                );
                copy.flush();
            }
        }
        Event::Closed { id, direction } => {
            if let Some(copy) = flows.get_mut(&id) {
                copy.flush();
                if direction == Direction::Request {
                    copy.http = Http::Off; // the parser sees the end of the stream
                }
            }
        }
        Event::End { id, .. } => {
            if let Some(mut copy) = flows.remove(&id) {
                copy.flush();
            }
        }
    }
    true
}

/// Where a connection's copy goes.
struct Copy {
    meta: ConnMeta,
    subs: Arc<PortSubs>,
    in_flight: TaskTracker,
    /// Unfiltered mirrors.
    mirrors: Vec<tee::Mirror>,
    http: Http,
    /// Some mirror asked for the target's responses too.
    responses: bool,
    /// Bytes gathered for the next chunk, in the order read, with their
    /// directions and capture times, and how many.
    parts: Vec<tee::Part>,
    gathered: usize,
}

/// The HTTP parsing of a connection on a port with filters.
enum Http {
    /// No filter, not HTTP, or over.
    Off,
    /// The first bytes, until they tell.
    Detecting(BytesMut),
    /// The parser's queue.
    Feeding(mpsc::Sender<Bytes>),
}

impl Copy {
    fn start(meta: ConnMeta, subs: Arc<PortSubs>, in_flight: &TaskTracker) -> Copy {
        let mirrors = tee::start_mirrors(meta, subs.plain_mirrors(), in_flight);
        let http = if subs.has_filters() {
            Http::Detecting(BytesMut::new())
        } else {
            Http::Off
        };
        Copy {
            meta,
            subs,
            in_flight: in_flight.clone(),
            responses: tee::want_responses(&mirrors),
            mirrors,
            http,
            parts: Vec::new(),
            gathered: 0,
        }
    }

    /// Adds `bytes` to the chunk being gathered (the target's responses only
    /// when a mirror wants them); a chunk goes out when it is full, or when the
    /// consumer has taken every event ready. So a batch of the capture makes
    /// one chunk per connection, whatever the number of request/response turns
    /// in it (one chunk per turn would fill a mirror's queue at once).
    fn gather(&mut self, part: tee::Part) {
        if part.direction == Direction::Response && !self.responses {
            return;
        }
        if self.gathered + part.bytes.len() > CHUNK {
            self.flush();
        }
        self.gathered += part.bytes.len();
        self.parts.push(part);
    }

    /// Sends the gathered chunk on.
    fn flush(&mut self) {
        if self.parts.is_empty() {
            return;
        }
        let parts = std::mem::take(&mut self.parts);
        self.gathered = 0;
        tee::copy_parts(&mut self.mirrors, &parts);
        if matches!(self.http, Http::Off) {
            return;
        }
        let mut requests = parts
            .into_iter()
            .filter(|p| p.direction == Direction::Request)
            .map(|p| p.bytes);
        let Some(first) = requests.next() else {
            return;
        };
        let joined = match requests.next() {
            None => first,
            Some(second) => {
                let mut all = BytesMut::from(&first[..]);
                all.extend_from_slice(&second);
                requests.for_each(|b| all.extend_from_slice(&b));
                all.freeze()
            }
        };
        self.parse(joined);
    }

    /// Hands the client's bytes to the HTTP copy, detecting first whether they
    /// are HTTP.
    fn parse(&mut self, bytes: Bytes) {
        match &mut self.http {
            Http::Off => {}
            Http::Detecting(first) => {
                first.extend_from_slice(&bytes[..bytes.len().min(DETECT_BYTES)]);
                match super::http::classify(first) {
                    None if first.len() < DETECT_BYTES => {}
                    Some(true) => {
                        let (tx, rx) = mpsc::channel(HTTP_QUEUE);
                        let _ = tx.try_send(bytes_so_far(first, &bytes));
                        self.in_flight.spawn(super::http::copy_requests(
                            Feed {
                                rx,
                                chunk: Bytes::new(),
                            },
                            self.meta,
                            self.subs.clone(),
                            self.in_flight.clone(),
                        ));
                        self.http = Http::Feeding(tx);
                    }
                    _ => self.http = Http::Off,
                }
            }
            Http::Feeding(tx) => {
                if tx.try_send(bytes).is_err() {
                    tracing::debug!("the HTTP copy fell behind; it is dropped");
                    self.http = Http::Off;
                }
            }
        }
    }
}

/// All the client bytes so far, when the last chunk `last` completed the
/// detection of `first` (which holds at most [`DETECT_BYTES`] of each chunk).
fn bytes_so_far(first: &BytesMut, last: &Bytes) -> Bytes {
    // `first` ends with the head of `last`; put `last` back whole.
    let head = last.len().min(DETECT_BYTES);
    let mut all = BytesMut::with_capacity(first.len() - head + last.len());
    all.extend_from_slice(&first[..first.len() - head]);
    all.extend_from_slice(last);
    all.freeze()
}

/// A connection's reassembled client bytes as a stream: reads what the capture
/// delivers; what is written to it (the parser's answers) is thrown away.
pub struct Feed {
    rx: mpsc::Receiver<Bytes>,
    chunk: Bytes,
}

impl AsyncRead for Feed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.chunk.is_empty() {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => self.chunk = chunk,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = self.chunk.len().min(buf.remaining());
        buf.put_slice(&self.chunk.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Feed {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
