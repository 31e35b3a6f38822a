//! TCP stream reassembly for the sniffing mirror: turns the segments that
//! [`super::capture`] copies off the packet path into each connection's two byte
//! streams, in order, as [`Event`]s.
//!
//! A flow starts with a client's `SYN` arriving for this host (never a
//! connection the target makes itself) on a port the caller accepts, and is
//! established by the server's `SYN-ACK` and the client's acknowledgment of it
//! (RFC 9293 §3.5), so a sender that spoofs a client's address without seeing
//! the server's answers never gets bytes into a copy; its first byte in
//! either direction announces it ([`Event::Open`]). Bytes are delivered in
//! sequence order; a segment ahead of the next expected byte waits in a bounded
//! out-of-order buffer. A side's `FIN`, once every byte before it came, closes
//! that direction ([`Event::Closed`]); both closed, or a `RST`, ends the flow.
//!
//! A gap ends the flow's copy ([`EndReason::Gap`]): the peer acknowledged bytes
//! the capture never saw (the kernel dropped them from a full packet buffer, or
//! a packet was cut short), or the out-of-order buffer is full. The target's own
//! connection never notices: this code only ever reads copies.
//!
//! Limits on hostile input (every one of them costs at most the copy, never the
//! target's connection):
//! - at most [`Limits::max_flows`] flows; a new `SYN` when full evicts the oldest
//!   half-open flow, else an established one idle for [`Limits::evict_idle`],
//!   else it is not mirrored (a `SYN` flood costs a fixed table);
//! - half-open flows are forgotten after [`Limits::handshake_idle`], established
//!   ones after [`Limits::idle`] without a segment;
//! - per flow at most [`Limits::flow_segments`] out-of-order segments holding at
//!   most [`Limits::flow_buffer`] bytes, and [`Limits::total_buffer`] bytes over
//!   all flows (tiny-segment floods hit the segment count, large ones the bytes);
//! - a segment that starts more than [`Limits::flow_buffer`] bytes ahead of the
//!   next expected byte is ignored (a huge sequence jump is outside any window
//!   the kernel would accept either), and so is an acknowledgment used for gap
//!   detection whose own sequence number is that far off: a blind injector must
//!   guess the sequence number as closely as the kernel demands;
//! - as the kernel does (RFC 5961 §5.2), a segment whose acknowledgment is more
//!   than [`ACK_WINDOW`] away from the bytes the other side sent is ignored
//!   whole: a blind injector must guess the acknowledgment number too, else its
//!   bytes never reach a copy and its acknowledgment never ends one;
//! - as the kernel does (RFC 5961 §3.2), a `RST` ends a flow only at exactly the
//!   next expected sequence number; one elsewhere in the window is ignored;
//! - overlapping segments with different data: bytes already delivered are never
//!   replaced, and of two buffered segments that start at the same number the
//!   first stays; so the copy may differ from what the kernel delivered to the
//!   target only for a sender that sends conflicting bytes itself;
//! - checksums are not verified (loopback and offloaded packets carry none yet):
//!   a corrupt segment may corrupt the copy of its own flow only.
//!
//! A segment the capture kept only the headers of (an answer nobody reads,
//! [`super::capture::HEAD_SNAP`]) counts with its length on the wire and
//! delivers no bytes: its direction's numbers, `FIN` and gap checks go on as
//! for whole segments, and the first such segment of a direction tells the
//! caller once ([`Event::Cut`]), whose copy of that direction is then
//! incomplete.
//!
//! TCP Fast Open data in a `SYN` is not copied.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use graft_protocol::incoming::tap::Direction;

/// The bounds of a [`Reassembler`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Flows tracked at once.
    pub max_flows: usize,
    /// Out-of-order bytes one direction of a flow may buffer, and how far ahead
    /// of the next expected byte a segment may start.
    pub flow_buffer: usize,
    /// Out-of-order segments one direction of a flow may buffer.
    pub flow_segments: usize,
    /// Out-of-order bytes over all flows.
    pub total_buffer: usize,
    /// How long a flow may wait for its handshake.
    pub handshake_idle: Duration,
    /// How long an established flow may go without a segment.
    pub idle: Duration,
    /// How long an established flow must have been idle to be evicted for a new one.
    pub evict_idle: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_flows: 4096,
            flow_buffer: 256 * 1024,
            flow_segments: 128,
            total_buffer: 16 << 20,
            handshake_idle: Duration::from_secs(10),
            idle: Duration::from_secs(15 * 60),
            evict_idle: Duration::from_secs(60),
        }
    }
}

/// One TCP segment, as parsed from a captured packet.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    /// The sender's address.
    pub src: SocketAddr,
    /// The receiver's address.
    pub dst: SocketAddr,
    /// The sequence number.
    pub seq: u32,
    /// The acknowledgment number, when the `ACK` flag is set.
    pub ack: Option<u32>,
    /// `SYN`.
    pub syn: bool,
    /// `FIN`.
    pub fin: bool,
    /// `RST`.
    pub rst: bool,
    /// The data the capture kept: all of it, or its first bytes when
    /// `uncaptured` is not 0.
    pub payload: &'a [u8],
    /// Bytes of the data the capture did not keep (after `payload`): the
    /// segment's length on the wire is `payload.len() + uncaptured`.
    pub uncaptured: usize,
    /// The packet arrived for this host (`PACKET_HOST`); a flow only starts
    /// with such a `SYN`.
    pub arriving: bool,
    /// When it was captured (the wall clock, [`super::capture::Packet::at`]).
    pub at: SystemTime,
}

/// A flow's number, unique for a [`Reassembler`]'s life.
pub type FlowId = u64;

/// Why a flow ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// Both sides closed.
    Finished,
    /// A `RST`.
    Reset,
    /// Bytes are missing in `direction`: the copy stops there.
    Gap {
        /// The direction with the hole.
        direction: Direction,
        /// Why, for the log.
        why: &'static str,
    },
    /// Evicted for a new flow.
    Evicted,
    /// No segment for [`Limits::idle`].
    Idle,
    /// Its 4-tuple started a new connection.
    Reused,
    /// The capture stopped.
    Stopped,
}

/// What the reassembler tells its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A flow's first byte is about to be delivered.
    Open {
        /// The flow.
        id: FlowId,
        /// The client (who sent the `SYN`).
        client: SocketAddr,
        /// The server (the target's address and port).
        server: SocketAddr,
    },
    /// Bytes of one direction, in order, right after the previous ones.
    Data {
        /// The flow.
        id: FlowId,
        /// [`Direction::Request`]: client to server.
        direction: Direction,
        /// The bytes.
        bytes: Bytes,
        /// When the segment that made them deliverable was captured.
        at: SystemTime,
    },
    /// The capture kept only the headers of some of one direction's bytes:
    /// from here on that direction's [`Event::Data`] is missing them. Told
    /// once per direction, after [`Event::Open`].
    Cut {
        /// The flow.
        id: FlowId,
        /// The direction cut short.
        direction: Direction,
    },
    /// One direction sent `FIN` after all its bytes.
    Closed {
        /// The flow.
        id: FlowId,
        /// The direction that ended.
        direction: Direction,
    },
    /// The flow ended; no more events for it.
    End {
        /// The flow.
        id: FlowId,
        /// Why.
        why: EndReason,
    },
}

impl Event {
    /// The flow the event is about.
    pub fn id(&self) -> FlowId {
        match self {
            Event::Open { id, .. }
            | Event::Data { id, .. }
            | Event::Cut { id, .. }
            | Event::Closed { id, .. }
            | Event::End { id, .. } => *id,
        }
    }
}

/// How far an acknowledgment may lie from the bytes the other side sent (as
/// captured) and still be taken, in bytes: the kernel takes one from `SND.UNA -
/// MAX.SND.WND` to `SND.NXT` (RFC 5961 §5.2), and a client's acknowledgment
/// trails what the capture saw of the server's bytes by at most the server's
/// send window. 16 MiB is above the windows Linux grows to by default
/// (`tcp_rmem`'s 6 MiB maximum) and a 1/256 share of the sequence space: a
/// random acknowledgment passes with odds of 1 in 128.
pub const ACK_WINDOW: u64 = 16 << 20;

/// One direction of a flow.
#[derive(Debug, Default)]
struct Half {
    /// The initial sequence number, once seen.
    isn: Option<u32>,
    /// Bytes delivered (the next expected byte's offset from `isn + 1`).
    delivered: u64,
    /// Where the `FIN` sits, once seen.
    fin_at: Option<u64>,
    /// The `FIN` was reached.
    closed: bool,
    /// Out-of-order segments by offset.
    ooo: BTreeMap<u64, Held>,
    /// Their bytes (those of [`Held::Cut`] segments are not held).
    ooo_bytes: usize,
    /// Some of this direction's bytes were not captured.
    cut: bool,
}

/// A segment's data as captured.
#[derive(Debug, Clone, Copy)]
enum Piece<'a> {
    /// Its bytes.
    Bytes(&'a [u8]),
    /// Its length: the capture kept its headers alone.
    Cut(u64),
}

impl Piece<'_> {
    /// Its length in sequence space.
    fn len(&self) -> u64 {
        match self {
            Piece::Bytes(b) => b.len() as u64,
            Piece::Cut(n) => *n,
        }
    }

    /// What follows its first `n` bytes.
    fn after(self, n: u64) -> Self {
        match self {
            Piece::Bytes(b) => Piece::Bytes(&b[n as usize..]),
            Piece::Cut(len) => Piece::Cut(len - n),
        }
    }
}

/// An out-of-order segment.
#[derive(Debug)]
enum Held {
    /// Its bytes.
    Bytes(Bytes),
    /// A segment of this many bytes whose headers alone were captured.
    Cut(u64),
}

impl Held {
    /// Its length in sequence space.
    fn len(&self) -> u64 {
        match self {
            Held::Bytes(b) => b.len() as u64,
            Held::Cut(n) => *n,
        }
    }

    /// The bytes it holds in memory.
    fn held(&self) -> usize {
        match self {
            Held::Bytes(b) => b.len(),
            Held::Cut(_) => 0,
        }
    }
}

impl Half {
    /// The offset of `seq` near `delivered` (sequence numbers wrap, RFC 9293 §3.4),
    /// or `None` before the ISN is known or before the stream's start.
    fn offset(&self, seq: u32) -> Option<u64> {
        let isn = self.isn?;
        let rel = seq.wrapping_sub(isn.wrapping_add(1));
        let diff = i64::from(rel.wrapping_sub(self.delivered as u32) as i32);
        u64::try_from(self.delivered as i64 + diff).ok()
    }

    /// Whether a segment at `seq` is within `window` bytes of the next expected one.
    fn in_window(&self, seq: u32, window: usize) -> bool {
        self.offset(seq)
            .is_some_and(|off| off.abs_diff(self.delivered) <= window as u64)
    }
}

/// One connection.
#[derive(Debug)]
struct Flow {
    id: FlowId,
    client: SocketAddr,
    server: SocketAddr,
    /// `[client → server, server → client]`.
    halves: [Half; 2],
    established: bool,
    opened: bool,
    last: Instant,
}

impl Flow {
    /// Announces the flow before its first delivery (with the directions cut
    /// short so far); nothing once it is announced.
    fn open(&mut self, out: &mut Vec<Event>) {
        if self.opened {
            return;
        }
        self.opened = true;
        out.push(Event::Open {
            id: self.id,
            client: self.client,
            server: self.server,
        });
        for (i, half) in self.halves.iter().enumerate() {
            if half.cut {
                out.push(Event::Cut {
                    id: self.id,
                    direction: direction_of(i),
                });
            }
        }
    }

    /// Marks half `i` cut short, telling `out` the first time once announced.
    fn cut(&mut self, i: usize, out: &mut Vec<Event>) {
        if std::mem::replace(&mut self.halves[i].cut, true) || !self.opened {
            return;
        }
        out.push(Event::Cut {
            id: self.id,
            direction: direction_of(i),
        });
    }
}

fn direction_of(i: usize) -> Direction {
    if i == 0 {
        Direction::Request
    } else {
        Direction::Response
    }
}

/// The flows of the sniffed ports and their reassembly state.
#[derive(Debug)]
pub struct Reassembler {
    limits: Limits,
    /// By (client, server).
    flows: HashMap<(SocketAddr, SocketAddr), Flow>,
    next_id: FlowId,
    /// Out-of-order bytes over all flows.
    buffered: usize,
    /// SYNs not mirrored because the table was full, since the last [`Reassembler::take_refused`].
    refused: u64,
    /// The capture time of the segment being taken.
    at: SystemTime,
}

impl Reassembler {
    /// An empty reassembler with `limits`.
    pub fn new(limits: Limits) -> Reassembler {
        Reassembler {
            limits,
            flows: HashMap::new(),
            next_id: 1,
            buffered: 0,
            refused: 0,
            at: SystemTime::UNIX_EPOCH,
        }
    }

    /// How many flows are tracked.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// Out-of-order bytes held over all flows.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// The SYNs refused for a full table since the last call.
    pub fn take_refused(&mut self) -> u64 {
        std::mem::take(&mut self.refused)
    }

    /// The server ports of the tracked flows, sorted, without duplicates.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.flows.values().map(|f| f.server.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Takes one segment; `accept(client, server)` says whether a new flow may
    /// start. Events go to `out`.
    pub fn segment(
        &mut self,
        seg: &Segment<'_>,
        now: Instant,
        accept: impl Fn(SocketAddr, SocketAddr) -> bool,
        out: &mut Vec<Event>,
    ) {
        self.at = seg.at;
        if seg.syn && seg.ack.is_none() {
            self.client_syn(seg, now, accept, out);
            return;
        }
        let (key, i) = if self.flows.contains_key(&(seg.src, seg.dst)) {
            ((seg.src, seg.dst), 0)
        } else if self.flows.contains_key(&(seg.dst, seg.src)) {
            ((seg.dst, seg.src), 1)
        } else {
            return;
        };
        let limits = self.limits;
        let flow = self.flows.get_mut(&key).expect("looked up above");
        if seg.syn {
            // SYN-ACK: the server's ISN, acknowledging the client's.
            let client_isn = flow.halves[0].isn;
            if i == 1
                && flow.halves[1].isn.is_none()
                && seg.ack == client_isn.map(|isn| isn.wrapping_add(1))
            {
                flow.halves[1].isn = Some(seg.seq);
                flow.last = now;
            }
            return;
        }
        if !flow.established {
            // The client's acknowledgment of the server's ISN completes the
            // handshake: a sender that never saw the SYN-ACK cannot make it.
            let server_isn = flow.halves[1].isn;
            let completes = i == 0
                && server_isn.is_some()
                && seg.ack == server_isn.map(|isn| isn.wrapping_add(1));
            if !completes {
                return;
            }
            flow.established = true;
        }
        // Segments far off the expected numbers are another connection's, or
        // injected: ignored, as the kernel ignores them.
        let plausible = flow.halves[i].in_window(seg.seq, limits.flow_buffer);
        if !plausible {
            return;
        }
        if let Some(ack) = seg.ack {
            let other = &flow.halves[1 - i];
            let consumed = other.delivered + u64::from(other.closed);
            match other.offset(ack) {
                // Acknowledges bytes far from any the other side sent: the
                // receiver's kernel drops the segment (RFC 5961 §5.2).
                None => return,
                Some(acked) if acked.abs_diff(consumed) > ACK_WINDOW => return,
                Some(acked) if acked > consumed && !seg.rst => {
                    let why = EndReason::Gap {
                        direction: direction_of(1 - i),
                        why: "the capture missed bytes that their receiver acknowledged",
                    };
                    self.end(key, why, out);
                    return;
                }
                Some(_) => {}
            }
        }
        if seg.rst {
            // Only at the next expected byte (RFC 5961 §3.2): the kernel
            // answers one elsewhere in the window with a challenge ACK.
            // After a FIN, the next number is one past it.
            let half = &flow.halves[i];
            let after_fin = half.delivered + u64::from(half.fin_at == Some(half.delivered));
            let at = half.offset(seg.seq);
            if at == Some(half.delivered) || at == Some(after_fin) {
                self.end(key, EndReason::Reset, out);
            }
            return;
        }
        flow.last = now;
        let offset = flow.halves[i].offset(seg.seq).expect("in window, so known");
        let len = seg.payload.len() + seg.uncaptured;
        let taken = if seg.uncaptured > 0 {
            self.data(key, i, offset, Piece::Cut(len as u64), out)
        } else if !seg.payload.is_empty() {
            self.data(key, i, offset, Piece::Bytes(seg.payload), out)
        } else {
            Ok(())
        };
        if let Err(why) = taken {
            let why = EndReason::Gap {
                direction: direction_of(i),
                why,
            };
            self.end(key, why, out);
            return;
        }
        if seg.fin {
            let flow = self.flows.get_mut(&key).expect("still tracked");
            let half = &mut flow.halves[i];
            half.fin_at.get_or_insert(offset + len as u64);
        }
        self.settle(key, i, out);
    }

    fn client_syn(
        &mut self,
        seg: &Segment<'_>,
        now: Instant,
        accept: impl Fn(SocketAddr, SocketAddr) -> bool,
        out: &mut Vec<Event>,
    ) {
        let key = (seg.src, seg.dst);
        if let Some(flow) = self.flows.get_mut(&key) {
            if flow.halves[0].isn == Some(seg.seq) {
                flow.last = now;
                return;
            }
            self.end(key, EndReason::Reused, out);
        }
        if !seg.arriving || !accept(seg.src, seg.dst) {
            return;
        }
        if self.flows.len() >= self.limits.max_flows && !self.make_room(now, out) {
            self.refused += 1;
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut halves = [Half::default(), Half::default()];
        halves[0].isn = Some(seg.seq);
        self.flows.insert(
            key,
            Flow {
                id,
                client: seg.src,
                server: seg.dst,
                halves,
                established: false,
                opened: false,
                last: now,
            },
        );
    }

    /// Evicts the oldest half-open flow, else the established flow idle longest
    /// if it is idle for [`Limits::evict_idle`]; false when none may go.
    fn make_room(&mut self, now: Instant, out: &mut Vec<Event>) -> bool {
        let oldest = |established: bool| {
            self.flows
                .iter()
                .filter(|(_, f)| f.established == established)
                .min_by_key(|(_, f)| f.last)
                .map(|(k, f)| (*k, f.last))
        };
        let victim = oldest(false).or_else(|| {
            oldest(true).filter(|(_, last)| now.duration_since(*last) >= self.limits.evict_idle)
        });
        match victim {
            Some((key, _)) => {
                self.end(key, EndReason::Evicted, out);
                true
            }
            None => false,
        }
    }

    /// Takes `piece` at `offset` of half `i`.
    fn data(
        &mut self,
        key: (SocketAddr, SocketAddr),
        i: usize,
        offset: u64,
        piece: Piece<'_>,
        out: &mut Vec<Event>,
    ) -> Result<(), &'static str> {
        let limits = self.limits;
        let captured = self.at;
        let flow = self.flows.get_mut(&key).expect("tracked");
        let half = &mut flow.halves[i];
        let end = offset + piece.len();
        if end <= half.delivered || half.closed {
            return Ok(()); // a retransmission
        }
        if offset > half.delivered + limits.flow_buffer as u64 {
            return Ok(()); // outside any window: ignored
        }
        if offset <= half.delivered {
            let fresh = (half.delivered - offset) as usize;
            half.delivered = end;
            match piece {
                Piece::Bytes(payload) => {
                    let bytes = Bytes::copy_from_slice(&payload[fresh..]);
                    flow.open(out);
                    out.push(Event::Data {
                        id: flow.id,
                        direction: direction_of(i),
                        bytes,
                        at: captured,
                    });
                }
                Piece::Cut(_) => flow.cut(i, out),
            }
            return Ok(());
        }
        // Ahead of the next expected byte: buffered, first bytes win.
        let mut at = offset;
        let mut rest = piece;
        while rest.len() > 0 {
            let held = half.ooo.get(&at).map(Held::len);
            match held {
                Some(n) if n >= rest.len() => return Ok(()),
                Some(n) => {
                    at += n;
                    rest = rest.after(n);
                }
                None => {
                    if half.ooo.len() >= limits.flow_segments {
                        return Err("too many out-of-order segments for one connection");
                    }
                    let held = match rest {
                        Piece::Bytes(b) => Held::Bytes(Bytes::copy_from_slice(b)),
                        Piece::Cut(n) => Held::Cut(n),
                    };
                    let bytes = held.held();
                    if half.ooo_bytes + bytes > limits.flow_buffer {
                        return Err("out-of-order bytes over one connection's bound");
                    }
                    if self.buffered + bytes > limits.total_buffer {
                        return Err("out-of-order bytes over the agent's bound");
                    }
                    half.ooo.insert(at, held);
                    half.ooo_bytes += bytes;
                    self.buffered += bytes;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Delivers what the out-of-order buffer of half `i` now continues, and
    /// closes the half (and ends the flow) when its `FIN` is reached.
    fn settle(&mut self, key: (SocketAddr, SocketAddr), i: usize, out: &mut Vec<Event>) {
        let captured = self.at;
        let Some(flow) = self.flows.get_mut(&key) else {
            return;
        };
        loop {
            let half = &mut flow.halves[i];
            let Some(entry) = half.ooo.first_entry() else {
                break;
            };
            let at = *entry.key();
            if at > half.delivered {
                break;
            }
            let held = entry.remove();
            half.ooo_bytes -= held.held();
            self.buffered -= held.held();
            let end = at + held.len();
            if end <= half.delivered {
                continue;
            }
            let fresh = half.delivered - at;
            half.delivered = end;
            match held {
                Held::Bytes(bytes) => {
                    flow.open(out);
                    out.push(Event::Data {
                        id: flow.id,
                        direction: direction_of(i),
                        bytes: bytes.slice(fresh as usize..),
                        at: captured,
                    });
                }
                Held::Cut(_) => flow.cut(i, out),
            }
        }
        let half = &mut flow.halves[i];
        if !half.closed && half.fin_at.is_some_and(|fin| half.delivered >= fin) {
            half.closed = true;
            if flow.opened {
                out.push(Event::Closed {
                    id: flow.id,
                    direction: direction_of(i),
                });
            }
        }
        if flow.halves.iter().all(|h| h.closed) {
            self.end(key, EndReason::Finished, out);
        }
    }

    /// Forgets the flow at `key`, telling `out` when it was announced.
    fn end(&mut self, key: (SocketAddr, SocketAddr), why: EndReason, out: &mut Vec<Event>) {
        if let Some(flow) = self.flows.remove(&key) {
            self.buffered -= flow.halves.iter().map(|h| h.ooo_bytes).sum::<usize>();
            if flow.opened {
                out.push(Event::End { id: flow.id, why });
            }
        }
    }

    /// Forgets flow `id` without an event (its consumer was told otherwise).
    pub fn forget(&mut self, id: FlowId) {
        if let Some(key) = self.flows.iter().find(|(_, f)| f.id == id).map(|(k, _)| *k) {
            let mut sink = Vec::new();
            self.end(key, EndReason::Stopped, &mut sink);
        }
    }

    /// Ends the flows that saw no segment for their idle limit.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Event>) {
        let limits = self.limits;
        let stale: Vec<_> = self
            .flows
            .iter()
            .filter(|(_, f)| {
                let limit = if f.established {
                    limits.idle
                } else {
                    limits.handshake_idle
                };
                now.duration_since(f.last) >= limit
            })
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            self.end(key, EndReason::Idle, out);
        }
    }

    /// Ends every flow.
    pub fn end_all(&mut self, out: &mut Vec<Event>) {
        let keys: Vec<_> = self.flows.keys().copied().collect();
        for key in keys {
            self.end(key, EndReason::Stopped, out);
        }
    }
}

#[cfg(test)]
#[path = "reassembly_tests.rs"]
mod tests;
