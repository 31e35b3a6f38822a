//! Unit tests of [`super`]: ordering, closing, gaps and the bounds on hostile input.

use super::*;

const C: &str = "10.0.0.2:40000";
const S: &str = "10.0.0.1:8080";
const CISN: u32 = 0xffff_fff0; // wraps soon: offsets must survive it
const SISN: u32 = 1000;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct Bed {
    r: Reassembler,
    out: Vec<Event>,
    now: Instant,
    /// The capture time of the next segment.
    at: SystemTime,
    /// The next segments' bytes after their payload that the capture did not keep.
    uncaptured: usize,
}

impl Bed {
    fn new(limits: Limits) -> Bed {
        Bed {
            r: Reassembler::new(limits),
            out: Vec::new(),
            now: Instant::now(),
            at: SystemTime::UNIX_EPOCH,
            uncaptured: 0,
        }
    }

    fn seg(&mut self, from_client: bool, seq: u32, ack: Option<u32>, flags: &str, payload: &[u8]) {
        let (src, dst) = if from_client { (C, S) } else { (S, C) };
        let seg = Segment {
            src: addr(src),
            dst: addr(dst),
            seq,
            ack,
            syn: flags.contains('S'),
            fin: flags.contains('F'),
            rst: flags.contains('R'),
            payload,
            uncaptured: self.uncaptured,
            arriving: from_client,
            at: self.at,
        };
        self.r.segment(&seg, self.now, |_, _| true, &mut self.out);
    }

    fn handshake(&mut self) {
        self.seg(true, CISN, None, "S", b"");
        self.seg(false, SISN, Some(CISN.wrapping_add(1)), "S", b"");
        self.seg(true, CISN.wrapping_add(1), Some(SISN + 1), "", b"");
    }

    /// Client data at offset `off`.
    fn client(&mut self, off: u32, payload: &[u8]) {
        self.seg(
            true,
            CISN.wrapping_add(1 + off),
            Some(SISN + 1),
            "",
            payload,
        );
    }

    fn stream(&self, direction: Direction) -> Vec<u8> {
        self.out
            .iter()
            .filter_map(|e| match e {
                Event::Data {
                    direction: d,
                    bytes,
                    ..
                } if *d == direction => Some(bytes.to_vec()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn ended(&self) -> Option<EndReason> {
        self.out.iter().find_map(|e| match e {
            Event::End { why, .. } => Some(why.clone()),
            _ => None,
        })
    }
}

#[test]
fn in_order_bytes_across_the_sequence_wrap_come_out_in_order() {
    let mut b = Bed::new(Limits::default());
    b.handshake();
    assert!(b.out.is_empty(), "nothing before the first byte");
    b.client(0, b"GET / HTTP/1.1\r\n");
    b.client(16, b"Host: x\r\n\r\n");
    assert!(matches!(b.out[0], Event::Open { .. }));
    assert_eq!(
        b.stream(Direction::Request),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    b.seg(
        false,
        SISN + 1,
        Some(CISN.wrapping_add(28)),
        "",
        b"HTTP/1.1 200 OK\r\n",
    );
    assert_eq!(b.stream(Direction::Response), b"HTTP/1.1 200 OK\r\n");
}

#[test]
fn out_of_order_segments_wait_and_retransmissions_are_not_repeated() {
    let mut b = Bed::new(Limits::default());
    b.handshake();
    b.client(6, b"world");
    assert!(b.stream(Direction::Request).is_empty());
    b.client(0, b"hello ");
    b.client(0, b"hello ");
    b.client(3, b"lo wor");
    assert_eq!(b.stream(Direction::Request), b"hello world");
    assert_eq!(b.r.buffered(), 0);
}

/// Bytes carry the capture time of the segment that made them deliverable:
/// those held out of order leave with the one that filled the hole.
#[test]
fn bytes_carry_the_capture_time_of_the_segment_that_delivered_them() {
    let mut b = Bed::new(Limits::default());
    b.handshake();
    let t = |ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    b.at = t(1);
    b.client(0, b"GET ");
    b.at = t(2);
    b.client(10, b" HTTP/1.1");
    b.at = t(3);
    b.client(4, b"/index");
    let times: Vec<(Vec<u8>, SystemTime)> = b
        .out
        .iter()
        .filter_map(|e| match e {
            Event::Data { bytes, at, .. } => Some((bytes.to_vec(), *at)),
            _ => None,
        })
        .collect();
    assert_eq!(
        times,
        [
            (b"GET ".to_vec(), t(1)),
            (b"/index".to_vec(), t(3)),
            (b" HTTP/1.1".to_vec(), t(3)),
        ]
    );
}

#[test]
fn overlapping_segments_with_other_data_never_replace_bytes_already_taken() {
    let mut b = Bed::new(Limits::default());
    b.handshake();
    b.client(0, b"AAAA");
    b.client(2, b"XXXXBB"); // overlaps "AA" with other bytes
    b.client(10, b"CC");
    b.client(10, b"ZZZZ"); // same start, longer: only its tail is new
    b.client(8, b"DD");
    assert_eq!(b.stream(Direction::Request), b"AAAAXXBBDDCCZZ");
}

#[test]
fn fins_of_both_sides_end_the_flow_and_a_rst_ends_it_at_once() {
    let mut b = Bed::new(Limits::default());
    b.handshake();
    b.client(0, b"q");
    b.seg(true, CISN.wrapping_add(2), Some(SISN + 1), "F", b"");
    assert!(b.out.contains(&Event::Closed {
        id: 1,
        direction: Direction::Request
    }));
    assert_eq!(b.ended(), None);
    b.seg(false, SISN + 1, Some(CISN.wrapping_add(3)), "F", b"a");
    assert_eq!(b.stream(Direction::Response), b"a");
    assert_eq!(b.ended(), Some(EndReason::Finished));
    assert_eq!(b.r.flows(), 0);

    let mut b = Bed::new(Limits::default());
    b.handshake();
    b.client(0, b"q");
    b.seg(false, SISN + 1, None, "R", b"");
    assert_eq!(b.ended(), Some(EndReason::Reset));
}

#[test]
fn bytes_acknowledged_but_never_seen_are_a_gap_that_ends_the_copy() {
    let mut b = Bed::new(Limits::default());
    b.handshake();
    b.client(0, b"abc");
    // The capture lost offsets 3..10; the server acknowledges up to 10.
    b.seg(false, SISN + 1, Some(CISN.wrapping_add(11)), "", b"");
    assert!(matches!(
        b.ended(),
        Some(EndReason::Gap {
            direction: Direction::Request,
            ..
        })
    ));
}

#[test]
fn a_blind_rst_or_data_far_off_the_sequence_is_ignored() {
    let mut b = Bed::new(Limits::default());
    b.handshake();
    b.client(0, b"abc");
    b.seg(true, CISN.wrapping_add(1 << 30), None, "R", b"");
    b.seg(
        true,
        CISN.wrapping_add(1 << 30),
        Some(SISN + 1),
        "",
        b"evil",
    );
    // An acknowledgment far ahead from a segment whose own number is off.
    b.seg(
        false,
        SISN + (1 << 30),
        Some(CISN.wrapping_add(1 << 20)),
        "",
        b"",
    );
    assert_eq!(b.ended(), None);
    b.client(3, b"def");
    assert_eq!(b.stream(Direction::Request), b"abcdef");
}

/// The blind injector of `tcpforge blind` that guessed a sequence number
/// inside the window: its acknowledgment number, guessed too, is far from
/// anything the server sent, so (as the kernel does, RFC 5961 §5.2) its bytes
/// never reach the copy and its acknowledgment does not end it. An in-window
/// `RST` off the exact next number is ignored too (RFC 5961 §3.2).
#[test]
fn an_in_window_segment_with_a_guessed_acknowledgment_or_rst_changes_nothing() {
    let mut b = Bed::new(Limits::default());
    b.handshake();
    b.client(0, b"GET /a");
    b.seg(false, SISN + 1, Some(CISN.wrapping_add(7)), "", b"ok");
    // In the window both behind (overlapping the next byte) and ahead.
    for (off, ack) in [(4u32, 1u32 << 28), (6, 3 << 30), (100, 1 << 31)] {
        b.seg(
            true,
            CISN.wrapping_add(1 + off),
            Some(SISN.wrapping_add(ack)),
            "",
            b"GET /injected",
        );
    }
    // Before the server's ISN: acknowledges nothing it could have sent.
    b.seg(true, CISN.wrapping_add(7), Some(SISN - 5), "", b"XX");
    b.seg(true, CISN.wrapping_add(9), None, "R", b"");
    b.seg(false, SISN + 10, Some(CISN.wrapping_add(7)), "R", b"");
    assert_eq!(b.ended(), None);
    b.client(6, b" HTTP/1.1");
    assert_eq!(b.stream(Direction::Request), b"GET /a HTTP/1.1");
    assert_eq!(b.r.buffered(), 0);
    // The real RST, at the next number, ends it; so does one past a FIN.
    b.seg(false, SISN + 3, Some(CISN.wrapping_add(16)), "R", b"");
    assert_eq!(b.ended(), Some(EndReason::Reset));

    let mut b = Bed::new(Limits::default());
    b.handshake();
    b.client(0, b"q");
    b.seg(true, CISN.wrapping_add(2), Some(SISN + 1), "F", b"");
    b.seg(true, CISN.wrapping_add(3), None, "R", b"");
    assert_eq!(b.ended(), Some(EndReason::Reset));
}

#[test]
fn a_huge_sequence_jump_is_not_buffered() {
    let mut b = Bed::new(Limits::default());
    b.handshake();
    b.client(0, b"a");
    b.client(10_000_000, &[0u8; 1000]);
    assert_eq!(b.r.buffered(), 0);
    assert_eq!(b.ended(), None);
}

#[test]
fn a_tiny_segment_flood_hits_the_segment_bound_and_drops_only_that_copy() {
    let limits = Limits::default();
    let mut b = Bed::new(limits);
    b.handshake();
    b.client(0, b"a");
    for i in 0..10_000u32 {
        b.client(2 + 2 * i, b"x"); // every other byte: nothing ever continues
    }
    assert!(matches!(b.ended(), Some(EndReason::Gap { .. })));
    assert_eq!(b.r.buffered(), 0, "the flow's buffer went with it");
}

#[test]
fn out_of_order_bytes_are_bounded_over_all_flows() {
    let limits = Limits {
        total_buffer: 4096,
        ..Limits::default()
    };
    let mut r = Reassembler::new(limits);
    let mut out = Vec::new();
    let now = Instant::now();
    for port in 0..100u16 {
        let c = SocketAddr::from(([10, 0, 0, 2], 10_000 + port));
        let s = addr(S);
        let seg = |src, dst, seq, ack, syn, payload| Segment {
            src,
            dst,
            seq,
            ack,
            syn,
            fin: false,
            rst: false,
            payload,
            uncaptured: 0,
            arriving: true,
            at: SystemTime::UNIX_EPOCH,
        };
        r.segment(&seg(c, s, 0, None, true, b""), now, |_, _| true, &mut out);
        r.segment(
            &seg(s, c, 0, Some(1), true, b""),
            now,
            |_, _| true,
            &mut out,
        );
        r.segment(
            &seg(c, s, 2, Some(1), false, &[7u8; 1000]),
            now,
            |_, _| true,
            &mut out,
        );
        assert!(r.buffered() <= 4096);
    }
}

#[test]
fn a_syn_flood_keeps_the_table_bounded_and_established_flows_survive() {
    let limits = Limits {
        max_flows: 64,
        ..Limits::default()
    };
    let mut b = Bed::new(limits);
    b.handshake();
    b.client(0, b"live");
    for i in 0..5000u32 {
        let seg = Segment {
            src: SocketAddr::from(([10, 9, (i >> 8) as u8, i as u8], 1234)),
            dst: addr(S),
            seq: i,
            ack: None,
            syn: true,
            fin: false,
            rst: false,
            payload: b"",
            uncaptured: 0,
            arriving: true,
            at: SystemTime::UNIX_EPOCH,
        };
        b.r.segment(&seg, b.now, |_, _| true, &mut b.out);
        assert!(b.r.flows() <= 64);
    }
    b.client(4, b" on");
    assert_eq!(b.stream(Direction::Request), b"live on");
    assert_eq!(b.ended(), None);
}

#[test]
fn a_syn_leaving_the_host_or_refused_by_the_caller_starts_nothing() {
    let mut r = Reassembler::new(Limits::default());
    let mut out = Vec::new();
    let mut seg = Segment {
        src: addr(C),
        dst: addr(S),
        seq: 1,
        ack: None,
        syn: true,
        fin: false,
        rst: false,
        payload: b"",
        uncaptured: 0,
        arriving: false,
        at: SystemTime::UNIX_EPOCH,
    };
    r.segment(&seg, Instant::now(), |_, _| true, &mut out);
    assert_eq!(r.flows(), 0);
    seg.arriving = true;
    r.segment(&seg, Instant::now(), |_, s| s.port() != 8080, &mut out);
    assert_eq!(r.flows(), 0);
}

#[test]
fn data_without_the_clients_acknowledgment_of_the_syn_ack_is_not_copied() {
    let mut b = Bed::new(Limits::default());
    b.seg(true, CISN, None, "S", b"");
    b.seg(false, SISN, Some(CISN.wrapping_add(1)), "S", b"");
    // A spoofer that never saw the SYN-ACK guesses the server's ISN wrong.
    b.seg(true, CISN.wrapping_add(1), Some(SISN + 77), "", b"forged");
    assert!(b.out.is_empty());
    b.client(0, b"real");
    assert_eq!(b.stream(Direction::Request), b"real");
}

#[test]
fn idle_flows_expire() {
    let mut b = Bed::new(Limits::default());
    b.handshake();
    b.client(0, b"x");
    let later = b.now + Limits::default().idle;
    b.r.expire(later, &mut b.out);
    assert_eq!(b.ended(), Some(EndReason::Idle));
    assert_eq!(b.r.flows(), 0);
}

impl Bed {
    /// A server segment at offset `off` of which the capture kept `kept` and
    /// not the `uncaptured` bytes after them.
    fn server_cut(&mut self, off: u32, kept: &[u8], uncaptured: usize, flags: &str) {
        self.uncaptured = uncaptured;
        self.seg(
            false,
            SISN + 1 + off,
            Some(CISN.wrapping_add(1)),
            flags,
            kept,
        );
        self.uncaptured = 0;
    }

    fn cuts(&self) -> Vec<Direction> {
        self.out
            .iter()
            .filter_map(|e| match e {
                Event::Cut { direction, .. } => Some(*direction),
                _ => None,
            })
            .collect()
    }
}

/// Answers whose headers alone were captured deliver nothing, count their
/// length on the wire (the client's acknowledgment of them is no gap, and the
/// server's `FIN` after them closes), and are told once.
#[test]
fn answers_cut_short_count_their_length_and_are_told_once() {
    let mut b = Bed::new(Limits::default());
    b.handshake();
    b.client(0, b"GET / HTTP/1.1\r\n\r\n");
    b.server_cut(0, b"HTTP", 1000, "");
    b.server_cut(1004, b"", 2000, "");
    assert_eq!(b.cuts(), [Direction::Response]);
    assert!(b.stream(Direction::Response).is_empty());
    // The client acknowledges all 3004 bytes: no gap.
    b.seg(true, CISN.wrapping_add(19), Some(SISN + 1 + 3004), "", b"");
    assert_eq!(b.ended(), None);
    b.server_cut(3004, b"", 10, "F");
    assert!(b.out.iter().any(|e| matches!(
        e,
        Event::Closed {
            direction: Direction::Response,
            ..
        }
    )));
    b.seg(true, CISN.wrapping_add(19), Some(SISN + 1 + 3015), "F", b"");
    assert_eq!(b.ended(), Some(EndReason::Finished));
    assert_eq!(b.stream(Direction::Request), b"GET / HTTP/1.1\r\n\r\n");
}

/// A cut answer ahead of the next expected byte waits as a length (holding
/// no bytes) and counts once the hole before it is filled.
#[test]
fn cut_answers_out_of_order_wait_as_lengths() {
    let mut b = Bed::new(Limits::default());
    b.handshake();
    b.client(0, b"GET");
    b.server_cut(1000, b"", 1000, "");
    assert!(b.cuts().is_empty(), "nothing is cut before the hole fills");
    assert_eq!(b.r.buffered(), 0);
    b.server_cut(0, b"", 1000, "");
    assert_eq!(b.cuts(), [Direction::Response]);
    b.seg(true, CISN.wrapping_add(4), Some(SISN + 1 + 2000), "", b"");
    assert_eq!(b.ended(), None, "all 2000 bytes were counted");
    // Bytes past what was counted: the capture missed them.
    b.seg(true, CISN.wrapping_add(4), Some(SISN + 1 + 2500), "", b"");
    assert!(matches!(
        b.ended(),
        Some(EndReason::Gap {
            direction: Direction::Response,
            ..
        })
    ));
}

/// A server that speaks first with answers cut short: the flow is announced
/// with the client's first byte, and its cut right after.
#[test]
fn a_cut_before_the_first_delivery_follows_the_open() {
    let mut b = Bed::new(Limits::default());
    b.handshake();
    b.server_cut(0, b"220 ", 100, "");
    assert!(b.out.is_empty());
    b.client(0, b"HELO");
    assert!(matches!(b.out[0], Event::Open { .. }));
    assert!(matches!(
        b.out[1],
        Event::Cut {
            direction: Direction::Response,
            ..
        }
    ));
    assert_eq!(b.stream(Direction::Request), b"HELO");
}
