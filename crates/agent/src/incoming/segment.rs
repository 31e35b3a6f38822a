//! The TCP segment of a packet the sniffing mirror captured
//! ([`super::capture`]), parsed for the reassembly ([`super::reassembly`]).

use std::net::{IpAddr, SocketAddr};

use etherparse::{LaxNetSlice, LaxSlicedPacket, TransportSlice};

use super::capture::{PACKET_HOST, Packet};
use super::reassembly::Segment;

/// The parsed TCP segment of a captured IP packet, if it is one.
///
/// A packet the capture cut short (`truncated`: the filter kept the headers of
/// an answer nobody reads, [`super::capture::HEAD_SNAP`], or the packet outgrew a
/// ring block) counts its payload's length from the IP header's length field
/// (RFC 791 §3.1 total length, RFC 8200 §3 payload length); a whole packet
/// whose length field runs past its bytes is malformed and skipped.
pub fn parse<'a>(packet: &Packet<'a>) -> Option<Segment<'a>> {
    let sliced = LaxSlicedPacket::from_ip(packet.data).ok()?;
    let (src, dst, ip_end, payload): (IpAddr, IpAddr, usize, _) = match sliced.net.as_ref()? {
        LaxNetSlice::Ipv4(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
            usize::from(ip.header().total_len()),
            ip.payload(),
        ),
        LaxNetSlice::Ipv6(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
            40 + usize::from(ip.header().payload_length()),
            ip.payload(),
        ),
    };
    if payload.fragmented || (payload.incomplete && !packet.truncated) {
        return None;
    }
    let TransportSlice::Tcp(tcp) = sliced.transport? else {
        return None;
    };
    let data = tcp.payload();
    // (An IPv4 length field below the header's own length, as in a BIG TCP
    // packet over 64 KiB, is not "incomplete": the packet's bytes count.)
    let uncaptured = if payload.incomplete {
        let start = data.as_ptr() as usize - packet.data.as_ptr() as usize;
        ip_end.checked_sub(start + data.len())?
    } else {
        0
    };
    Some(Segment {
        src: SocketAddr::new(src, tcp.source_port()),
        dst: SocketAddr::new(dst, tcp.destination_port()),
        seq: tcp.sequence_number(),
        ack: tcp.ack().then(|| tcp.acknowledgment_number()),
        syn: tcp.syn(),
        fin: tcp.fin(),
        rst: tcp.rst(),
        payload: data,
        uncaptured,
        arriving: packet.pkttype == PACKET_HOST,
        at: packet.at,
    })
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use etherparse::PacketBuilder;

    use super::*;
    use crate::incoming::capture::HEAD_SNAP;

    fn packet(v6: bool, payload: &[u8]) -> Vec<u8> {
        let builder = if v6 {
            PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
        } else {
            PacketBuilder::ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
        };
        let builder = builder.tcp(8080, 40000, 7, 1000).ack(9).psh();
        let mut out = Vec::new();
        builder.write(&mut out, payload).unwrap();
        out
    }

    fn captured(data: &[u8], truncated: bool) -> Packet<'_> {
        Packet {
            data,
            pkttype: PACKET_HOST,
            truncated,
            at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_whole_packet_has_all_its_payload() {
        for v6 in [false, true] {
            let data = packet(v6, b"hello");
            let seg = parse(&captured(&data, false)).unwrap();
            assert_eq!(seg.payload, b"hello");
            assert_eq!(seg.uncaptured, 0);
            assert_eq!(seg.seq, 7);
            assert_eq!(seg.ack, Some(9));
            assert_eq!(seg.src.port(), 8080);
        }
    }

    /// The filter's cut ([`HEAD_SNAP`]): the length on the wire comes from
    /// the IP header.
    #[test]
    fn a_packet_cut_to_its_headers_counts_its_length_from_the_ip_header() {
        for v6 in [false, true] {
            let data = packet(v6, &[b'x'; 3000]);
            let cut = &data[..HEAD_SNAP as usize];
            let seg = parse(&captured(cut, true)).unwrap();
            assert_eq!(seg.payload.len() + seg.uncaptured, 3000, "v6: {v6}");
            assert!(seg.uncaptured > 0);
        }
    }

    /// A packet the kernel says is whole but whose IP length runs past its
    /// bytes is malformed, not cut: skipped.
    #[test]
    fn a_whole_packet_shorter_than_its_ip_length_is_skipped() {
        for v6 in [false, true] {
            let data = packet(v6, &[b'x'; 300]);
            assert!(parse(&captured(&data[..200], false)).is_none());
        }
    }
}
