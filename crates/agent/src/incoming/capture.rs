//! The packet socket of the sniffing mirror: an `AF_PACKET` socket in the
//! target's network namespace that the kernel hands a copy of every TCP segment
//! to or from the mirrored ports, on every interface, while the segments
//! themselves go on to the target untouched (packet(7)).
//!
//! The socket is `SOCK_DGRAM` (link headers removed: every packet starts at its
//! IP header, whatever the interface) and carries a classic BPF program
//! (`SO_ATTACH_FILTER`, the kernel's `Documentation/networking/filter.rst`) built
//! by [`program`]: it keeps unfragmented IPv4 and IPv6 TCP segments whose source
//! or destination port is mirrored and drops the rest in the kernel, so the
//! agent never sees the target's other traffic. Of the target's answers (the
//! segments from a mirrored port) it keeps only the first [`HEAD_SNAP`] bytes,
//! the IP and TCP headers, unless a session of that port reads the answers
//! (`graft tap`, `graft shadow`): the kernel copies each tapped packet into the
//! ring in the sender's context, so a target that sends megabytes would pay a
//! copy of each of them on its own send path (and fill the ring, whose drops
//! cost the requests' copies too) for bytes that a mirror throws away. On loopback the kernel taps
//! every packet twice, once leaving (`PACKET_OUTGOING`) and once arriving; the
//! program drops the leaving copy (loopback is interface 1 in every namespace,
//! `LOOPBACK_IFINDEX` in `include/net/net_namespace.h`).
//!
//! The socket is opened with protocol 0, so it receives nothing until the filter
//! is attached and [`PacketSocket::start`] binds it to every protocol
//! (`ETH_P_ALL`); the kernel writes the packets into a memory-mapped
//! `TPACKET_V3` ring ([`super::ring`]), which the capture thread reads a block
//! at a time: it is woken once per block, not once per packet.
//!
//! Segments without payload (pure ACKs) are kept: the reassembly needs the
//! client's ACK that completes the handshake (before a server that speaks first
//! sends anything) and the ACKs that show the capture missed bytes.
//!
//! Limits: IPv6 segments behind extension headers are not seen (the program
//! reads the TCP header right after the fixed IPv6 header); a packet longer than
//! a ring block ([`super::ring::BLOCK_SIZE`], more than any IP packet) would be
//! cut short, which costs its flow its copy.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self as nixsock, AddressFamily, SockFlag, SockProtocol, SockType};

use super::ring::Ring;

/// How long a read waits for a block of packets before the capture loop looks
/// at its controls again.
pub const READ_WAIT: Duration = Duration::from_millis(50);

/// How many ports one filter program can hold: its jumps are at most 255
/// instructions long.
pub const MAX_PORTS: usize = 32;

/// How much of an answer's packet the filter keeps when nobody reads the
/// answers, in bytes from the IP header: the largest IPv4 header (60) and TCP
/// header (60) fit (RFC 791 §3.1, RFC 9293 §3.1; the IPv6 header is 40). The
/// reassembly needs the headers' numbers, flags and the IP length alone.
pub const HEAD_SNAP: u32 = 128;

/// `PACKET_OUTGOING` (`include/uapi/linux/if_packet.h`).
const PACKET_OUTGOING: u32 = 4;
/// `PACKET_HOST`: addressed to this host.
pub const PACKET_HOST: u8 = 0;
/// The loopback interface's index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// One captured packet.
#[derive(Debug)]
pub struct Packet<'a> {
    /// The IP packet, from its IP header.
    pub data: &'a [u8],
    /// The packet type (`sll_pkttype`: `PACKET_HOST`, `PACKET_OUTGOING`, ...).
    pub pkttype: u8,
    /// The packet was cut short (`tp_snaplen` < `tp_len`).
    pub truncated: bool,
    /// When the kernel took it (`tp_sec`, `tp_nsec`: the wall clock).
    pub at: std::time::SystemTime,
}

/// An `AF_PACKET` socket with the mirror's filter, and its receive ring.
pub struct PacketSocket {
    // Field order: the ring is unmapped before the socket closes.
    ring: Ring,
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens the socket (receiving nothing yet) with a filter that drops
    /// everything, and maps its ring.
    ///
    /// # Errors
    ///
    /// `EPERM` without `CAP_NET_RAW` in the target's network namespace (the
    /// caller falls back to the pass-through mirror), else as `socket(2)` or
    /// [`Ring::map`] fail.
    pub fn open() -> io::Result<PacketSocket> {
        let fd = nixsock::socket(
            AddressFamily::Packet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        attach_filter(&fd, &program(&[]))?;
        let ring = Ring::map(&fd)?;
        Ok(PacketSocket { ring, fd })
    }

    /// Starts receiving: binds the socket to every protocol on every interface
    /// (the filter in place already, so nothing else is ever queued).
    ///
    /// # Errors
    ///
    /// As `bind(2)` fails.
    pub fn start(&mut self) -> io::Result<()> {
        let all = SockProtocol::EthAll as i32 as u16;
        let mut sll = sockaddr_ll_zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = all;
        bind_ll(&self.fd, &sll)
    }

    /// Replaces the filter: TCP segments from or to `ports` (at most
    /// [`MAX_PORTS`]; none: nothing), each port with whether its answers are
    /// kept whole (else their first [`HEAD_SNAP`] bytes).
    ///
    /// # Errors
    ///
    /// Too many ports (`EINVAL`), or as `setsockopt(SO_ATTACH_FILTER)` fails.
    pub fn set_ports(&self, ports: &[Watched]) -> io::Result<()> {
        if ports.len() > MAX_PORTS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {MAX_PORTS} ports can be sniffed"),
            ));
        }
        attach_filter(&self.fd, &program(ports))
    }

    /// Reads the blocks of packets the kernel has handed over (waiting up to
    /// [`READ_WAIT`] for the first) and calls `each` with each of their
    /// packets; returns how many were read.
    ///
    /// # Errors
    ///
    /// As `poll(2)` fails, except for an interruption, which reads nothing.
    pub fn read_batch(&mut self, each: impl FnMut(Packet<'_>)) -> io::Result<usize> {
        if !self.ring.ready() {
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            let wait = PollTimeout::try_from(READ_WAIT).unwrap_or(PollTimeout::MAX);
            match nix::poll::poll(&mut fds, wait) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.ring.read(each))
    }

    /// The kernel's count of packets it dropped because the socket's buffer was
    /// full, since the last call (`PACKET_STATISTICS`, packet(7)).
    pub fn drops(&self) -> u32 {
        packet_drops(&self.fd).unwrap_or(0)
    }
}

/// One classic BPF instruction (`struct sock_filter`).
type Insn = libc::sock_filter;

/// A port the filter keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Watched {
    /// The server's port.
    pub port: u16,
    /// Its answers (the segments from it) are kept whole: some session reads
    /// them. Else only their headers ([`HEAD_SNAP`]).
    pub answers: bool,
}

/// Where a jump of [`program`] leads before offsets are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To {
    /// The next instruction.
    Next,
    /// The `ret` that keeps the packet.
    Accept,
    /// The `ret` that keeps the packet's headers ([`HEAD_SNAP`]).
    Head,
    /// The `ret` that drops it.
    Drop,
    /// The IP version check.
    Version,
    /// The IPv6 branch.
    V6,
}

/// An instruction whose jumps are still symbolic.
struct Draft {
    code: u32,
    k: u32,
    jt: To,
    jf: To,
}

fn stmt(code: u32, k: u32) -> Draft {
    Draft {
        code,
        k,
        jt: To::Next,
        jf: To::Next,
    }
}

fn jump(code: u32, k: u32, jt: To, jf: To) -> Draft {
    Draft { code, k, jt, jf }
}

/// The filter program for `ports`: keeps unfragmented IPv4/IPv6 TCP segments
/// with a source or destination port among `ports`, except the leaving copy on
/// loopback; `ports` empty drops everything. The destination is compared
/// first, so a segment to a watched port is kept whole; one only from a port
/// whose answers nobody reads keeps its first [`HEAD_SNAP`] bytes. At most
/// [`MAX_PORTS`] ports (the caller checks).
pub fn program(ports: &[Watched]) -> Vec<Insn> {
    use libc::{
        BPF_ABS, BPF_ALU, BPF_B, BPF_H, BPF_IND, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD,
        BPF_LDX, BPF_MSH, BPF_RET, BPF_RSH, BPF_W, SKF_AD_IFINDEX, SKF_AD_OFF, SKF_AD_PKTTYPE,
    };
    let ld_anc = |what: i32| stmt(BPF_LD | BPF_W | BPF_ABS, (SKF_AD_OFF + what) as u32);
    let jeq = |k: u32, jt: To, jf: To| jump(BPF_JMP | BPF_JEQ | BPF_K, k, jt, jf);
    let mut d: Vec<Draft> = Vec::new();
    if ports.is_empty() {
        return vec![Insn {
            code: (BPF_RET | BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        }];
    }
    let match_ports = |d: &mut Vec<Draft>, load_src: Draft, load_dst: Draft| {
        d.push(load_dst);
        for p in ports {
            d.push(jeq(u32::from(p.port), To::Accept, To::Next));
        }
        d.push(load_src);
        for p in ports {
            let answer = if p.answers { To::Accept } else { To::Head };
            d.push(jeq(u32::from(p.port), answer, To::Next));
        }
    };
    // Loopback's leaving copy: dropped (its arriving copy is kept).
    d.push(ld_anc(SKF_AD_PKTTYPE));
    d.push(jeq(PACKET_OUTGOING, To::Next, To::Version));
    d.push(ld_anc(SKF_AD_IFINDEX));
    d.push(jeq(LOOPBACK_IFINDEX, To::Drop, To::Next));
    let version_at = d.len();
    d.push(stmt(BPF_LD | BPF_B | BPF_ABS, 0));
    d.push(stmt(BPF_ALU | BPF_RSH | BPF_K, 4));
    d.push(jeq(4, To::Next, To::V6));
    // IPv4: protocol TCP, not a fragment (offset bits 0), ports after the IHL.
    d.push(stmt(BPF_LD | BPF_B | BPF_ABS, 9));
    d.push(jeq(libc::IPPROTO_TCP as u32, To::Next, To::Drop));
    d.push(stmt(BPF_LD | BPF_H | BPF_ABS, 6));
    d.push(jump(BPF_JMP | BPF_JSET | BPF_K, 0x1fff, To::Drop, To::Next));
    d.push(stmt(BPF_LDX | BPF_B | BPF_MSH, 0));
    match_ports(
        &mut d,
        stmt(BPF_LD | BPF_H | BPF_IND, 0),
        stmt(BPF_LD | BPF_H | BPF_IND, 2),
    );
    d.push(jump(BPF_JMP | libc::BPF_JA, 0, To::Drop, To::Drop));
    let v6_at = d.len();
    d.push(jeq(6, To::Next, To::Drop));
    d.push(stmt(BPF_LD | BPF_B | BPF_ABS, 6));
    d.push(jeq(libc::IPPROTO_TCP as u32, To::Next, To::Drop));
    match_ports(
        &mut d,
        stmt(BPF_LD | BPF_H | BPF_ABS, 40),
        stmt(BPF_LD | BPF_H | BPF_ABS, 42),
    );
    let drop_at = d.len();
    d.push(stmt(BPF_RET | BPF_K, 0));
    let head_at = d.len();
    d.push(stmt(BPF_RET | BPF_K, HEAD_SNAP));
    let accept_at = d.len();
    d.push(stmt(BPF_RET | BPF_K, u32::MAX));

    let target = |to: To, i: usize| -> usize {
        match to {
            To::Next => i + 1,
            To::Accept => accept_at,
            To::Head => head_at,
            To::Drop => drop_at,
            To::Version => version_at,
            To::V6 => v6_at,
        }
    };
    d.iter()
        .enumerate()
        .map(|(i, insn)| {
            let off = |to: To| -> u8 {
                let t = target(to, i);
                u8::try_from(t - i - 1).expect("filter jumps fit in a byte for MAX_PORTS ports")
            };
            let ja = insn.code == BPF_JMP | libc::BPF_JA;
            Insn {
                code: insn.code as u16,
                jt: if ja { 0 } else { off(insn.jt) },
                jf: if ja { 0 } else { off(insn.jf) },
                k: if ja {
                    (target(insn.jt, i) - i - 1) as u32
                } else {
                    insn.k
                },
            }
        })
        .collect()
}

fn sockaddr_ll_zeroed() -> libc::sockaddr_ll {
    libc::sockaddr_ll {
        sll_family: 0,
        sll_protocol: 0,
        sll_ifindex: 0,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    }
}

#[allow(unsafe_code)]
fn bind_ll(fd: &OwnedFd, sll: &libc::sockaddr_ll) -> io::Result<()> {
    // SAFETY: `sll` is a valid, initialized sockaddr_ll and its size is passed.
    let rc = unsafe {
        libc::bind(
            fd.as_fd().as_raw_fd(),
            std::ptr::from_ref(sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn attach_filter(fd: &OwnedFd, program: &[Insn]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // `prog` points at `program`, which outlives the call; the kernel copies
    // the program (SO_ATTACH_FILTER, socket(7)).
    crate::sockopt::set(fd.as_fd(), libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)
}

#[allow(unsafe_code)]
fn packet_drops(fd: &OwnedFd) -> io::Result<u32> {
    let mut stats = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: `stats` is a writable tpacket_stats and `len` its size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            std::ptr::from_mut(&mut stats).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(stats.tp_drops)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_ports_drops_everything() {
        let p = program(&[]);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].k, 0);
    }

    fn watched(ports: &[u16], answers: bool) -> Vec<Watched> {
        ports
            .iter()
            .map(|&port| Watched { port, answers })
            .collect()
    }

    #[test]
    fn every_jump_lands_inside_the_program_on_a_ret_or_forward() {
        for (n, answers) in [(1, true), (2, false), (MAX_PORTS, true), (MAX_PORTS, false)] {
            let ports: Vec<u16> = (0..n as u16).map(|i| 8000 + i).collect();
            let p = program(&watched(&ports, answers));
            let last = p.len() - 1;
            assert_eq!(p[last].k, u32::MAX, "the last instruction accepts");
            assert_eq!(p[last - 1].k, HEAD_SNAP, "the one before keeps the headers");
            assert_eq!(p[last - 2].k, 0, "the one before that drops");
            for (i, insn) in p.iter().enumerate() {
                if u32::from(insn.code) & 0x07 == libc::BPF_JMP {
                    assert!(i + 1 + usize::from(insn.jt) <= last);
                    assert!(i + 1 + usize::from(insn.jf) <= last);
                }
            }
            // Each port is compared twice (source, destination) per IP version.
            let compares = p
                .iter()
                .filter(|insn| ports.contains(&(insn.k as u16)) && insn.k < 65536)
                .count();
            assert_eq!(compares, 4 * n);
            // A destination port's match always keeps the whole segment; a
            // source port's keeps the headers when nobody reads the answers.
            let to_head = p
                .iter()
                .enumerate()
                .filter(|(i, insn)| {
                    u32::from(insn.code) & 0x07 == libc::BPF_JMP
                        && i + 1 + usize::from(insn.jt) == last - 1
                })
                .count();
            assert_eq!(to_head, if answers { 0 } else { 2 * n });
        }
    }

    #[test]
    fn the_program_runs_in_the_kernel() {
        // Attaching checks it (sk_chk_filter): a malformed jump is refused.
        let Ok(socket) = PacketSocket::open() else {
            return; // no CAP_NET_RAW here: nothing to check
        };
        let mut ports = watched(&[80], true);
        ports.extend(watched(&[8080], false));
        socket.set_ports(&ports).expect("filter accepted");
        assert!(
            socket
                .set_ports(&watched(&[1; MAX_PORTS + 1], true))
                .is_err()
        );
    }
}
