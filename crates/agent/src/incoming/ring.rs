//! The receive ring of the sniffing mirror's packet socket: a `TPACKET_V3`
//! ring (`PACKET_RX_RING`, packet(7) and the kernel's
//! `Documentation/networking/packet_mmap.rst`) that the kernel fills with the
//! captured packets and the agent reads in place, mapped into its memory.
//!
//! Why a ring and not `recvmmsg(2)`: with a socket queue the kernel wakes the
//! capture thread for every packet it queues, and on a small machine those
//! wake-ups, and the per-packet work downstream that they set off, were most of
//! what mirroring cost the target's clients (measured beside bench/run's mirror
//! rows on 2 cores: `tcpdump --immediate-mode`, woken per packet, cost them as
//! much as the whole mirror, +40 µs at the median; `tcpdump` with its default
//! block ring cost nothing measurable). A `TPACKET_V3` ring is made of
//! [`BLOCKS`] blocks of [`BLOCK_SIZE`] bytes; the kernel writes packets one
//! after the other into the current block and hands it to the reader (its
//! `block_status` turns `TP_STATUS_USER`, and only then is the reader woken)
//! when it is full or [`RETIRE`] after its first packet. So the thread wakes at
//! most once per block, never per packet, and copies nothing. The copy lags the
//! original by up to [`RETIRE`]; when the reader falls behind and every block is
//! the reader's, the kernel drops packets (counted in `PACKET_STATISTICS`), which
//! costs copies their bytes, never the original.
//!
//! A block is read by [`packets`], which trusts none of the offsets it holds: a
//! packet whose header or data would reach outside the block ends the walk of
//! that block, so even a corrupt block costs copies, never the agent.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use super::capture::Packet;

/// The size of one block of the ring: a multiple of the page size, and larger
/// than the largest packet (an IP packet of 64 KiB as GRO builds them, plus the
/// block's and the packet's headers), so that every packet is kept whole.
pub const BLOCK_SIZE: usize = 256 << 10;

/// The blocks of the ring (8 MiB in all): what a burst may fill while the
/// agent is busy.
pub const BLOCKS: usize = 32;

/// How long after its first packet the kernel hands a block that is not full
/// to the reader (`tp_retire_blk_tov`, in milliseconds): the most a copy lags
/// behind the original, and the least time between two wake-ups of the reader.
///
/// The reader's work on a block comes in one burst on a CPU the target's
/// server and clients need too, so this trades wake-ups against the length of
/// those bursts (issue 13, `BENCH_ONLY=mirror bench/run`, 4 runs each): at
/// 10 ms the target's clients saw a p99 of 1.6–2.7 ms under wrk (direct:
/// 0.1–0.2 ms), at 3 ms 0.45–1.3 ms. 1 ms (the least the kernel takes) gained
/// nothing while the copies ran on the agent's runtime; with the copies on
/// their own thread that yields ([`super::sniff`]) it pays (interleaved runs,
/// 16 connections at 10 000 requests/s, 8 runs each; wrk with 8 connections,
/// 4 runs each):
///
/// | | p99 at 10 000/s | p99 under wrk | CPU per copy |
/// |---|---|---|---|
/// | 3 ms, copies on the agent's runtime | 148–245 µs | 589–713 µs | 7–7.5 µs |
/// | 3 ms, mirror thread | 86–191 µs | 528–786 µs | 6.5–9 µs |
/// | 1 ms, mirror thread | 82–120 µs | 236–602 µs | 13–15.5 µs |
/// | the target alone | 42–52 µs | 58–70 µs | – |
///
/// Three times the blocks cost twice the CPU per copy at that rate (a block
/// of a few requests spread over many connections makes a write and a wake-up
/// of the mirror's program per request); the target's tail is what a mirror
/// must not cost.
///
/// A block's copies then go out spread over the millisecond until the next
/// block ([`super::pace`]), not at once; another session's interleaved runs
/// (18 of 3 s at 10 000/s each way):
///
/// | | p99 at 10 000/s | p99 under wrk | CPU per copy |
/// |---|---|---|---|
/// | 1 ms, copies at once | 74–159 µs (median 110) | 127–381 µs | 10–15 µs |
/// | 1 ms, 4 groups 250 µs apart | 49–98 µs (median 62) | 229–382 µs | 15–18 µs |
/// | the target alone | 30–74 µs | – | – |
pub const RETIRE: Duration = Duration::from_millis(1);

/// The nominal frame size the kernel checks the ring's shape against
/// (`tp_frame_size`); `TPACKET_V3` frames are as long as their packet.
const FRAME_SIZE: usize = 2048;

/// Where, in a block, its status, packet count and first packet's offset are
/// (`struct tpacket_block_desc`, `struct tpacket_hdr_v1`).
const BLOCK_STATUS: usize =
    offset_of!(libc::tpacket_block_desc, hdr) + offset_of!(libc::tpacket_hdr_v1, block_status);
const BLOCK_NUM_PKTS: usize =
    offset_of!(libc::tpacket_block_desc, hdr) + offset_of!(libc::tpacket_hdr_v1, num_pkts);
const BLOCK_FIRST: usize = offset_of!(libc::tpacket_block_desc, hdr)
    + offset_of!(libc::tpacket_hdr_v1, offset_to_first_pkt);

/// The size of a packet's header, after which its `sockaddr_ll` follows
/// (`TPACKET_ALIGN(sizeof(struct tpacket3_hdr))`).
const PACKET_HDR: usize = size_of::<libc::tpacket3_hdr>().next_multiple_of(libc::TPACKET_ALIGNMENT);

/// A ring mapped into the agent's memory, and the block to read next.
pub struct Ring {
    map: NonNull<u8>,
    next: usize,
}

// SAFETY: the mapping belongs to the ring alone (no copy of the pointer is
// kept elsewhere); moving it to another thread moves all access with it.
#[allow(unsafe_code)]
unsafe impl Send for Ring {}

impl Ring {
    /// Makes `fd` (an `AF_PACKET` socket) a `TPACKET_V3` socket with a receive
    /// ring of [`BLOCKS`] × [`BLOCK_SIZE`] bytes, and maps the ring.
    ///
    /// # Errors
    ///
    /// As `setsockopt(PACKET_VERSION)`, `setsockopt(PACKET_RX_RING)` (`ENOMEM`
    /// when the kernel cannot allocate the blocks) or `mmap(2)` fail.
    #[allow(unsafe_code)]
    pub fn map(fd: &OwnedFd) -> io::Result<Ring> {
        let version = libc::tpacket_versions::TPACKET_V3 as libc::c_int;
        crate::sockopt::set(fd.as_fd(), libc::SOL_PACKET, libc::PACKET_VERSION, &version)?;
        let request = libc::tpacket_req3 {
            tp_block_size: BLOCK_SIZE as u32,
            tp_block_nr: BLOCKS as u32,
            tp_frame_size: FRAME_SIZE as u32,
            tp_frame_nr: (BLOCK_SIZE / FRAME_SIZE * BLOCKS) as u32,
            tp_retire_blk_tov: RETIRE.as_millis() as u32,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        crate::sockopt::set(fd.as_fd(), libc::SOL_PACKET, libc::PACKET_RX_RING, &request)?;
        // SAFETY: a fresh shared mapping of the socket's ring, of the ring's
        // size (packet_mmap.rst: the blocks are mapped one after the other).
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BLOCK_SIZE * BLOCKS,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map =
            NonNull::new(map.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Ring { map, next: 0 })
    }

    /// The status word of block `i`, which the kernel and the reader hand the
    /// block over with.
    #[allow(unsafe_code)]
    fn status(&self, i: usize) -> &AtomicU32 {
        // SAFETY: the word lies inside the mapping (i < BLOCKS), is 4-aligned
        // (blocks are page-aligned, the offset is a multiple of 4), and is only
        // ever accessed atomically by this process.
        unsafe { AtomicU32::from_ptr(self.map.as_ptr().add(i * BLOCK_SIZE + BLOCK_STATUS).cast()) }
    }

    /// Whether the next block is the reader's.
    pub fn ready(&self) -> bool {
        self.status(self.next).load(Ordering::Acquire) & libc::TP_STATUS_USER != 0
    }

    /// Reads every block the kernel has handed over, in order, calling `each`
    /// with each of its packets, and gives each block back; returns how many
    /// packets were read.
    #[allow(unsafe_code)]
    pub fn read(&mut self, mut each: impl FnMut(Packet<'_>)) -> usize {
        let mut count = 0;
        while self.ready() {
            {
                // SAFETY: the block is the reader's until its status is given
                // back below: the kernel does not write it meanwhile.
                let block = unsafe {
                    std::slice::from_raw_parts(
                        self.map.as_ptr().add(self.next * BLOCK_SIZE),
                        BLOCK_SIZE,
                    )
                };
                count += packets(block, &mut each);
            }
            self.status(self.next)
                .store(libc::TP_STATUS_KERNEL, Ordering::Release);
            self.next = (self.next + 1) % BLOCKS;
        }
        count
    }
}

impl Drop for Ring {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of that size, no longer used.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), BLOCK_SIZE * BLOCKS);
        }
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(word.try_into().ok()?))
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    let word = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes(word.try_into().ok()?))
}

/// Calls `each` with the packets of one `TPACKET_V3` block (`struct
/// tpacket_block_desc`, then `num_pkts` packets, each a `struct tpacket3_hdr`,
/// its `struct sockaddr_ll` and its data at `tp_net`, the next `tp_next_offset`
/// bytes on); returns how many. The walk stops at the first packet whose header,
/// address or data would not lie inside `block`.
pub fn packets(block: &[u8], mut each: impl FnMut(Packet<'_>)) -> usize {
    let (Some(num), Some(first)) = (u32_at(block, BLOCK_NUM_PKTS), u32_at(block, BLOCK_FIRST))
    else {
        return 0;
    };
    let mut at = first as usize;
    let mut count = 0;
    for _ in 0..num {
        let field = |off: usize| at.checked_add(off);
        let header = (|| {
            let next = u32_at(
                block,
                field(offset_of!(libc::tpacket3_hdr, tp_next_offset))?,
            )?;
            let snaplen = u32_at(block, field(offset_of!(libc::tpacket3_hdr, tp_snaplen))?)?;
            let len = u32_at(block, field(offset_of!(libc::tpacket3_hdr, tp_len))?)?;
            let net = u16_at(block, field(offset_of!(libc::tpacket3_hdr, tp_net))?)?;
            let pkttype = *block.get(field(
                PACKET_HDR + offset_of!(libc::sockaddr_ll, sll_pkttype),
            )?)?;
            let start = field(usize::from(net))?;
            let data = block.get(start..start.checked_add(snaplen as usize)?)?;
            let sec = u32_at(block, field(offset_of!(libc::tpacket3_hdr, tp_sec))?)?;
            let nsec = u32_at(block, field(offset_of!(libc::tpacket3_hdr, tp_nsec))?)?;
            Some((next, data, pkttype, snaplen < len, sec, nsec))
        })();
        let Some((next, data, pkttype, truncated, sec, nsec)) = header else {
            break;
        };
        // A packet the kernel did not stamp (never with a V3 ring) is now.
        let taken = if sec == 0 {
            SystemTime::now()
        } else {
            SystemTime::UNIX_EPOCH + Duration::new(u64::from(sec), nsec.min(999_999_999))
        };
        each(Packet {
            data,
            pkttype,
            truncated,
            at: taken,
        });
        count += 1;
        if next == 0 {
            break;
        }
        match at.checked_add(next as usize) {
            Some(n) if n < block.len() => at = n,
            _ => break,
        }
    }
    count
}

#[cfg(test)]
#[path = "ring_tests.rs"]
mod tests;
