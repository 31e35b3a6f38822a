//! Tests of the ring: blocks laid out as the kernel lays them, hostile blocks,
//! and real packets read through the kernel's ring.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::*;
use crate::incoming::capture::{HEAD_SNAP, PACKET_HOST, PacketSocket, Watched};

/// Where the packet header's fields are.
const NEXT: usize = offset_of!(libc::tpacket3_hdr, tp_next_offset);
const SNAPLEN: usize = offset_of!(libc::tpacket3_hdr, tp_snaplen);
const LEN: usize = offset_of!(libc::tpacket3_hdr, tp_len);
const NET: usize = offset_of!(libc::tpacket3_hdr, tp_net);
const PKTTYPE: usize = PACKET_HDR + offset_of!(libc::sockaddr_ll, sll_pkttype);

/// The offset of the first packet in the blocks built here (the kernel puts it
/// right after the aligned block header).
const FIRST: usize = 48;

fn put32(block: &mut [u8], at: usize, v: u32) {
    block[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put16(block: &mut [u8], at: usize, v: u16) {
    block[at..at + 2].copy_from_slice(&v.to_ne_bytes());
}

/// A block holding `packets` (data, pkttype, original length) as the kernel
/// writes them.
fn block(packets: &[(&[u8], u8, u32)]) -> Vec<u8> {
    let mut block = vec![0u8; 4096];
    put32(&mut block, BLOCK_NUM_PKTS, packets.len() as u32);
    put32(&mut block, BLOCK_FIRST, FIRST as u32);
    let net = (PACKET_HDR + size_of::<libc::sockaddr_ll>()).next_multiple_of(16);
    let mut at = FIRST;
    for (i, (data, pkttype, len)) in packets.iter().enumerate() {
        let size = (net + data.len()).next_multiple_of(16);
        let next = if i + 1 == packets.len() { 0 } else { size };
        put32(&mut block, at + NEXT, next as u32);
        put32(&mut block, at + SNAPLEN, data.len() as u32);
        put32(&mut block, at + LEN, *len);
        put16(&mut block, at + NET, net as u16);
        block[at + PKTTYPE] = *pkttype;
        block[at + net..at + net + data.len()].copy_from_slice(data);
        at += size;
    }
    block
}

fn collect(block: &[u8]) -> Vec<(Vec<u8>, u8, bool)> {
    let mut seen = Vec::new();
    let n = packets(block, |p| {
        seen.push((p.data.to_vec(), p.pkttype, p.truncated))
    });
    assert_eq!(n, seen.len());
    seen
}

#[test]
fn a_block_yields_its_packets_in_order() {
    let b = block(&[(b"first", 0, 5), (b"second!", 4, 7), (b"cut", 0, 1500)]);
    assert_eq!(
        collect(&b),
        vec![
            (b"first".to_vec(), 0, false),
            (b"second!".to_vec(), 4, false),
            (b"cut".to_vec(), 0, true),
        ]
    );
}

#[test]
fn an_empty_or_short_block_yields_nothing() {
    assert!(collect(&[]).is_empty());
    assert!(collect(&[0u8; 10]).is_empty());
    assert!(collect(&block(&[])).is_empty());
}

#[test]
fn offsets_that_leave_the_block_end_the_walk() {
    let good = block(&[(b"one", 0, 3), (b"two", 0, 3)]);
    let second = FIRST + u32_at(&good, FIRST + NEXT).unwrap() as usize;

    // The first packet's offset past the end.
    let mut b = good.clone();
    put32(&mut b, BLOCK_FIRST, u32::MAX);
    assert!(collect(&b).is_empty());

    // Data reaching past the end: a huge snap length, then one that overflows.
    for snaplen in [5000, u32::MAX] {
        let mut b = good.clone();
        put32(&mut b, FIRST + SNAPLEN, snaplen);
        assert!(collect(&b).is_empty(), "snaplen {snaplen}");
    }

    // The data offset past the end.
    let mut b = good.clone();
    put16(&mut b, FIRST + NET, u16::MAX);
    assert!(collect(&b).is_empty());

    // A next offset past the end, or overflowing: only the first packet.
    for next in [4096, u32::MAX] {
        let mut b = good.clone();
        put32(&mut b, FIRST + NEXT, next);
        assert_eq!(collect(&b).len(), 1, "next {next}");
    }

    // A count larger than what the block holds: the walk ends at the last
    // packet (its next offset is 0).
    let mut b = good.clone();
    put32(&mut b, BLOCK_NUM_PKTS, u32::MAX);
    assert_eq!(collect(&b).len(), 2);

    // A next offset of one byte: each step reads a header made of the bytes
    // one further on, and the walk still ends inside the block.
    let mut b = good.clone();
    put32(&mut b, BLOCK_NUM_PKTS, u32::MAX);
    put32(&mut b, second + NEXT, 1);
    let seen = collect(&b);
    assert!(seen.len() >= 2 && seen.len() < b.len(), "{}", seen.len());
}

#[test]
fn random_blocks_never_panic_and_stay_inside() {
    // xorshift: the same bytes on every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..2000 {
        let len = (next() % 2048) as usize;
        let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Plausible headers now and then, so the walk goes past the first packet.
        if len >= FIRST + 64 && next() % 2 == 0 {
            put32(&mut b, BLOCK_FIRST, FIRST as u32);
            put32(&mut b, BLOCK_NUM_PKTS, (next() % 64) as u32);
            put16(&mut b, FIRST + NET, (next() % 256) as u16);
            put32(&mut b, FIRST + SNAPLEN, (next() % 256) as u32);
            put32(&mut b, FIRST + NEXT, (next() % 512) as u32);
        }
        let range = b.as_ptr_range();
        packets(&b, |p| {
            let inside = p.data.as_ptr_range();
            assert!(range.start <= inside.start && inside.end <= range.end);
        });
    }
}

/// A started packet socket that watches `port` (its answers whole or not),
/// or `None` without `CAP_NET_RAW`.
fn capture(port: u16, answers: bool) -> Option<PacketSocket> {
    let mut socket = match PacketSocket::open() {
        Ok(socket) => socket,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => return None,
        Err(e) => panic!("the packet socket with its ring: {e}"),
    };
    socket.set_ports(&[Watched { port, answers }]).unwrap();
    socket.start().unwrap();
    Some(socket)
}

#[test]
fn the_ring_reads_real_packets() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let Some(mut socket) = capture(port, true) else {
        return; // no CAP_NET_RAW here
    };
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let message = b"read through the ring";
    let before = std::time::SystemTime::now();
    client.write_all(message).unwrap();
    let mut got = [0u8; 21];
    server.read_exact(&mut got).unwrap();
    let after = std::time::SystemTime::now();

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut found = None;
    let mut packets = 0;
    while found.is_none() && Instant::now() < deadline {
        packets += socket
            .read_batch(|p| {
                if p.data.windows(message.len()).any(|w| w == message) {
                    found = Some((p.pkttype, p.truncated, p.data.len(), p.at));
                }
            })
            .unwrap();
    }
    let (pkttype, truncated, len, at) =
        found.expect("the segment with the message came through the ring");
    // The kernel's stamp: when the segment passed, not when it was read here.
    assert!(
        before <= at && at <= after,
        "{before:?} <= {at:?} <= {after:?}"
    );
    // Loopback's arriving copy (the leaving one is filtered), whole: an IPv4
    // header, a TCP header with options, the message.
    assert_eq!(pkttype, PACKET_HOST);
    assert!(!truncated);
    assert!(len >= 20 + 20 + message.len(), "{len}");
    // The handshake came first, through the same ring.
    assert!(packets >= 3, "{packets} packets");
}

/// A port whose answers nobody reads: the kernel hands over the client's
/// segments whole and the server's cut to their headers, with their length on
/// the wire intact.
#[test]
fn answers_nobody_reads_come_through_the_ring_as_headers() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let Some(mut socket) = capture(port, false) else {
        return; // no CAP_NET_RAW here
    };
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let question = [b'q'; 3000];
    client.write_all(&question).unwrap();
    let mut got = vec![0u8; question.len()];
    server.read_exact(&mut got).unwrap();
    let answer = vec![b'a'; 50_000];
    server.write_all(&answer).unwrap();
    let mut got = vec![0u8; answer.len()];
    client.read_exact(&mut got).unwrap();

    // (whole request bytes, answer bytes on the wire, answer bytes captured)
    let (mut asked, mut answered, mut kept) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while (asked < question.len() || answered < answer.len()) && Instant::now() < deadline {
        socket
            .read_batch(|p| {
                let ihl = usize::from(p.data[0] & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([p.data[2], p.data[3]]));
                let tcp = &p.data[ihl..];
                let header = usize::from(tcp[12] >> 4) * 4;
                let src = u16::from_be_bytes([tcp[0], tcp[1]]);
                let on_wire = total - ihl - header;
                if src == port {
                    answered += on_wire;
                    kept += p.data.len();
                    if on_wire > 0 {
                        assert!(p.truncated, "an answer came whole");
                        assert_eq!(p.data.len(), HEAD_SNAP as usize);
                    }
                } else {
                    assert!(!p.truncated, "a request was cut");
                    assert_eq!(p.data.len(), total);
                    asked += on_wire;
                }
            })
            .unwrap();
    }
    assert_eq!(asked, question.len());
    assert_eq!(answered, answer.len());
    assert!(
        kept < answer.len() / 10,
        "{kept} bytes of the answers were kept"
    );
}

/// A client whose own port is the watched one (a hostile or unlucky pick):
/// its segments go to the watched port, so they come whole although they also
/// come from it; the filter compares the destination first.
#[test]
fn a_client_sending_from_the_watched_port_still_comes_whole() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let Some(mut socket) = capture(port, false) else {
        return; // no CAP_NET_RAW here
    };
    use nix::sys::socket::{self as nixsock, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = nixsock::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    nixsock::bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 2, port)).unwrap();
    nixsock::connect(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port)).unwrap();
    let mut client = TcpStream::from(fd);
    let (mut server, _) = listener.accept().unwrap();
    let question = [b'q'; 3000];
    client.write_all(&question).unwrap();
    let mut got = vec![0u8; question.len()];
    server.read_exact(&mut got).unwrap();

    let mut asked = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while asked < question.len() && Instant::now() < deadline {
        socket
            .read_batch(|p| {
                let total = usize::from(u16::from_be_bytes([p.data[2], p.data[3]]));
                let from_client = p.data[12..16] == [127, 0, 0, 2];
                if from_client && total > 100 {
                    assert!(!p.truncated, "the client's segment was cut");
                    asked += total - 20 - usize::from(p.data[32] >> 4) * 4;
                }
            })
            .unwrap();
    }
    assert_eq!(asked, question.len());
}
