//! The few things graft reads from or writes into raw IP packets itself, around
//! the stack: which packets open a TCP connection (SYN without ACK), the sequence
//! numbers the stack sent last on each connection, and the RST that refuses or
//! aborts a connection (RFC 9293 §3.5.2 and §3.10.7.1; RFC 5961 §3.2: a reset is
//! accepted when its sequence number is exactly the next one the receiver expects).
//!
//! Parsing uses smoltcp's wire types, the ones the stack itself parses with, so a
//! packet is a SYN here exactly when it is one for the stack; building uses
//! etherparse (checksums included).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
};

use etherparse::PacketBuilder;
use netstack_smoltcp::smoltcp::wire::{
    IpProtocol, IpVersion, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket,
};

/// The TCP header fields graft needs from one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcpMeta {
    /// The sender's address.
    pub src: SocketAddr,
    /// The receiver's address.
    pub dst: SocketAddr,
    /// SYN set.
    pub syn: bool,
    /// ACK set.
    pub ack: bool,
    /// RST set.
    pub rst: bool,
    /// FIN set.
    pub fin: bool,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack_number: u32,
    /// Payload length in bytes.
    pub len: u32,
}

/// What an IP packet carries, as far as graft cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carried {
    /// A TCP segment.
    Tcp(TcpMeta),
    /// Another transport (a well-formed UDP datagram is left to the stack).
    Other,
    /// Not a valid IPv4 or IPv6 packet, or a malformed TCP or UDP header.
    Invalid,
}

/// Reads the TCP header of `packet` when it carries TCP.
pub(crate) fn parse(packet: &[u8]) -> Carried {
    // smoltcp reads the first byte unchecked.
    if packet.is_empty() {
        return Carried::Invalid;
    }
    let Ok(version) = IpVersion::of_packet(packet) else {
        return Carried::Invalid;
    };
    let (src, dst, protocol, payload) = match version {
        IpVersion::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(packet) else {
                return Carried::Invalid;
            };
            (
                IpAddr::from(ip.src_addr()),
                IpAddr::from(ip.dst_addr()),
                ip.next_header(),
                ip.payload(),
            )
        }
        IpVersion::Ipv6 => {
            let Ok(ip) = Ipv6Packet::new_checked(packet) else {
                return Carried::Invalid;
            };
            (
                IpAddr::from(ip.src_addr()),
                IpAddr::from(ip.dst_addr()),
                ip.next_header(),
                ip.payload(),
            )
        }
    };
    if protocol == IpProtocol::Udp {
        // netstack-smoltcp's UDP stream ends (yields `None`) at the first datagram
        // its parser rejects: such packets must never reach it.
        return match UdpPacket::new_checked(payload) {
            Ok(_) => Carried::Other,
            Err(_) => Carried::Invalid,
        };
    }
    if protocol != IpProtocol::Tcp {
        return Carried::Other;
    }
    let Ok(tcp) = TcpPacket::new_checked(payload) else {
        return Carried::Invalid;
    };
    Carried::Tcp(TcpMeta {
        src: SocketAddr::new(src, tcp.src_port()),
        dst: SocketAddr::new(dst, tcp.dst_port()),
        syn: tcp.syn(),
        ack: tcp.ack(),
        rst: tcp.rst(),
        fin: tcp.fin(),
        seq: tcp.seq_number().0 as u32,
        ack_number: tcp.ack_number().0 as u32,
        len: tcp.payload().len() as u32,
    })
}

/// An RST (with ACK) from `from` to `to`; `None` when the families differ.
pub(crate) fn reset(from: SocketAddr, to: SocketAddr, seq: u32, ack: u32) -> Option<Vec<u8>> {
    let builder = match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => return None,
    };
    let builder = builder.tcp(from.port(), to.port(), seq, 0).rst().ack(ack);
    let mut out = Vec::with_capacity(builder.size(0));
    builder.write(&mut out, &[]).ok()?;
    Some(out)
}

/// The RST that refuses the connection a SYN (`syn`) asked for, as a closed port
/// answers (RFC 9293 §3.10.7.1: SEQ 0, ACK the SYN's sequence number + 1).
pub(crate) fn refuse(syn: &TcpMeta) -> Option<Vec<u8>> {
    reset(syn.dst, syn.src, 0, syn.seq.wrapping_add(1))
}

/// The next sequence number the stack sends on each connection and the last
/// acknowledgement it sent, keyed by (stack side, program side): what an RST needs
/// to be accepted by the program's kernel.
#[derive(Debug, Default)]
pub(crate) struct Sequences {
    next: Mutex<HashMap<(SocketAddr, SocketAddr), (u32, u32)>>,
}

impl Sequences {
    /// Records a packet the stack sends to the program.
    pub(crate) fn sent(&self, meta: &TcpMeta) {
        let mut next = self.next.lock().expect("no panic while the lock is held");
        let key = (meta.src, meta.dst);
        if meta.rst {
            next.remove(&key);
            return;
        }
        let end = meta
            .seq
            .wrapping_add(meta.len)
            .wrapping_add(u32::from(meta.syn))
            .wrapping_add(u32::from(meta.fin));
        next.insert(key, (end, meta.ack_number));
    }

    /// The RST that aborts the connection between `stack` and `program`, if the
    /// stack sent anything on it.
    pub(crate) fn abort(&self, stack: SocketAddr, program: SocketAddr) -> Option<Vec<u8>> {
        let (seq, ack) = self
            .next
            .lock()
            .expect("no panic while the lock is held")
            .remove(&(stack, program))?;
        reset(stack, program, seq, ack)
    }

    /// Forgets a connection that ended.
    pub(crate) fn forget(&self, stack: SocketAddr, program: SocketAddr) {
        self.next
            .lock()
            .expect("no panic while the lock is held")
            .remove(&(stack, program));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_acks_the_syn_and_parses_back() {
        let program: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let remote: SocketAddr = "192.0.2.1:80".parse().unwrap();
        let syn = TcpMeta {
            src: program,
            dst: remote,
            syn: true,
            ack: false,
            rst: false,
            fin: false,
            seq: 1000,
            ack_number: 0,
            len: 0,
        };
        let rst = refuse(&syn).unwrap();
        let Carried::Tcp(meta) = parse(&rst) else {
            panic!("not TCP")
        };
        assert_eq!((meta.src, meta.dst), (remote, program));
        assert!(meta.rst && meta.ack && !meta.syn);
        assert_eq!(meta.ack_number, 1001);
    }

    #[test]
    fn an_abort_uses_the_next_sequence_number() {
        let stack: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let program: SocketAddr = "[fd00::2]:5000".parse().unwrap();
        let seqs = Sequences::default();
        assert!(seqs.abort(stack, program).is_none());
        seqs.sent(&TcpMeta {
            src: stack,
            dst: program,
            syn: false,
            ack: true,
            rst: false,
            fin: false,
            seq: u32::MAX - 1,
            ack_number: 77,
            len: 10,
        });
        let Carried::Tcp(meta) = parse(&seqs.abort(stack, program).unwrap()) else {
            panic!("not TCP")
        };
        assert_eq!(meta.seq, 8, "wraps around");
        assert_eq!(meta.ack_number, 77);
        assert!(seqs.abort(stack, program).is_none(), "used once");
    }

    #[test]
    fn garbage_is_invalid_not_a_panic() {
        assert_eq!(parse(&[]), Carried::Invalid);
        assert_eq!(parse(&[0x45, 0, 0, 4]), Carried::Invalid);
        assert_eq!(parse(&[0x60; 30]), Carried::Invalid);
        assert_eq!(parse(&[0xff; 60]), Carried::Invalid);
    }
}
