//! Sockets the agent passes (a local target, `+fds` on the proxy's `Hello`):
//! an outgoing TCP connection the agent started in the target's network
//! namespace ([`connect`]), and a stolen connection the agent accepted
//! ([`adopt_accepted`]). The layer puts the target's socket at the program's
//! descriptor number with `dup3`, so the program reads and writes the kernel's
//! socket itself: nothing is relayed, and `getsockname`/`getpeername` are the
//! target's own addresses.
//!
//! What the program chose for its socket carries over: the file status flag
//! `O_NONBLOCK`, the descriptor flag `FD_CLOEXEC`, and the socket options of
//! [`COPIED_OPTIONS`] (set before `connect`, or inherited from its listener
//! before `accept`). A non-blocking `connect` answers `EINPROGRESS` and the
//! socket turns writable once connected, its outcome in `SO_ERROR`
//! (connect(2)); a blocking one waits for that outcome.
//!
//! Every case that stays relayed says why in `GRAFT_LOG=debug`.

use std::{
    net::SocketAddr,
    os::{
        fd::{AsRawFd, OwnedFd},
        raw::{c_int, c_void},
    },
};

use graft_protocol::{
    layer::{DeliveredPeer, LayerRequest, LayerResponse},
    remote::{RemoteError, RemoteRequest, RemoteResponse},
};
use libc::{sockaddr, socklen_t};

use crate::{
    addr::{self, RawAddr},
    client,
    fds::{self, FdKind},
    guard::set_errno,
};

/// The socket options copied from the program's socket to the passed one
/// (`(level, name)`, see socket(7), tcp(7), ip(7)): those a program sets before
/// `connect` or on its listener and that still mean something on a connected
/// socket. Buffer sizes are left out (the kernel reports them doubled).
pub const COPIED_OPTIONS: &[(c_int, c_int)] = &[
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_LINGER),
    (libc::SOL_SOCKET, libc::SO_RCVTIMEO),
    (libc::SOL_SOCKET, libc::SO_SNDTIMEO),
    (libc::SOL_SOCKET, libc::SO_PRIORITY),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    (libc::IPPROTO_IP, libc::IP_TOS),
    (libc::IPPROTO_IPV6, libc::IPV6_TCLASS),
];

/// One option's value on `fd` (getsockopt(2)); `None` where the socket has
/// no such option.
pub(super) fn option(fd: c_int, level: c_int, name: c_int) -> Option<Vec<u8>> {
    let mut value = [0u8; 32];
    let mut len = value.len() as socklen_t;
    // SAFETY: value/len describe a writable buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            value.as_mut_ptr().cast::<c_void>(),
            &mut len,
        )
    };
    (rc == 0).then(|| value[..len as usize].to_vec())
}

/// Sets an option of `fd` to `value` as [`option`] read it (setsockopt(2));
/// a failure (an option the socket does not have) is ignored.
pub(super) fn set_option(fd: c_int, level: c_int, name: c_int, value: &[u8]) {
    // SAFETY: `value` is a readable buffer of its length.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast::<c_void>(),
            value.len() as socklen_t,
        )
    };
}

/// Copies [`COPIED_OPTIONS`] from `from` to `to`; an option either socket does
/// not have (IPv4 against IPv6) is skipped.
pub(super) fn copy_options(from: c_int, to: c_int) {
    for &(level, name) in COPIED_OPTIONS {
        if let Some(value) = option(from, level, name) {
            set_option(to, level, name, &value);
        }
    }
}

/// The program's choices for descriptor `fd`: (`O_NONBLOCK`, `FD_CLOEXEC`).
fn flags_of(fd: c_int) -> (bool, bool) {
    // SAFETY: F_GETFL/F_GETFD only read the descriptor's flags.
    unsafe {
        let status = real!(fcntl(fd, libc::F_GETFL, 0): fn(c_int, c_int, libc::c_ulong) -> c_int);
        let fd_flags = real!(fcntl(fd, libc::F_GETFD, 0): fn(c_int, c_int, libc::c_ulong) -> c_int);
        (
            status >= 0 && status & libc::O_NONBLOCK != 0,
            fd_flags >= 0 && fd_flags & libc::FD_CLOEXEC != 0,
        )
    }
}

/// Puts `passed` at descriptor `at` (closing what `at` was) with the program's
/// flags and options of `at`.
///
/// With `reset_replaced`, what `at` was (the loopback connection the proxy made
/// for an `accept`, which carried no byte) closes with a reset (`SO_LINGER` 0,
/// socket(7)) rather than a FIN: a FIN leaves its end in `TIME_WAIT` for 60 s
/// (tcp(7)), one per stolen connection, on the program's own port, and every
/// later loopback connection of the proxy searches past them for a free port
/// (a thousand new connections a second kept ~60 000 of them).
fn adopt(passed: OwnedFd, at: c_int, reset_replaced: bool) -> Result<(), c_int> {
    let (nonblocking, cloexec) = flags_of(at);
    let raw = passed.as_raw_fd();
    copy_options(at, raw);
    let kept_linger = if reset_replaced {
        let old = linger(at);
        set_linger(
            at,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        );
        old
    } else {
        None
    };
    // SAFETY: fcntl and dup3 on descriptors we own (`raw`) or the program's
    // socket it handed to the hook (`at`); dup3 closes `at`'s old file atomically.
    unsafe {
        let status = real!(fcntl(raw, libc::F_GETFL, 0): fn(c_int, c_int, libc::c_ulong) -> c_int);
        if status >= 0 {
            let status = if nonblocking {
                status | libc::O_NONBLOCK
            } else {
                status & !libc::O_NONBLOCK
            };
            real!(fcntl(raw, libc::F_SETFL, status as libc::c_ulong): fn(c_int, c_int, libc::c_ulong) -> c_int);
        }
        let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
        if real!(dup3(raw, at, flags): fn(c_int, c_int, c_int) -> c_int) < 0 {
            let errno = crate::guard::errno();
            // `at` stays the program's (relayed) connection: as it was.
            if let Some(old) = kept_linger {
                set_linger(at, &old);
            }
            return Err(errno);
        }
    }
    Ok(())
}

/// `SO_LINGER` of `fd` (socket(7)); `None` when it cannot be read.
fn linger(fd: c_int) -> Option<libc::linger> {
    let mut value = libc::linger {
        l_onoff: 0,
        l_linger: 0,
    };
    let mut len = std::mem::size_of::<libc::linger>() as socklen_t;
    // SAFETY: value/len describe a writable `linger`.
    let read = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw mut value).cast::<c_void>(),
            &mut len,
        )
    };
    (read == 0).then_some(value)
}

/// Sets `SO_LINGER` of `fd` to `value`.
fn set_linger(fd: c_int, value: &libc::linger) {
    // SAFETY: `value` is a `linger` of the length given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (value as *const libc::linger).cast::<c_void>(),
            std::mem::size_of::<libc::linger>() as socklen_t,
        );
    }
}

/// Waits for the passed socket at `fd`, connecting, to finish; `0` or `-1`
/// with the connect's errno, as a blocking connect(2) returns.
fn wait_connected(fd: c_int) -> c_int {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pollfd, 1, -1) };
        if rc >= 0 || crate::guard::errno() != libc::EINTR {
            break;
        }
    }
    let mut error: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: error/len are a valid out-buffer of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut error as *mut c_int as *mut c_void,
            &mut len,
        )
    };
    match (rc, error) {
        (0, 0) => 0,
        (0, errno) => {
            set_errno(errno);
            -1
        }
        _ => -1,
    }
}

/// Connects the program's TCP socket `fd` to `dest` through a socket the agent
/// started in the target's network namespace; `None` when that path does not
/// apply here (the caller relays the connection; the reason is logged).
pub fn connect(fd: c_int, dest: SocketAddr, family: c_int) -> Option<c_int> {
    if !client::passes_fds() {
        layer_log!(
            debug,
            "TCP to {dest}: relayed (the proxy passes no descriptors: GRAFT_FD_PASSING=0 or a cluster target)"
        );
        return None;
    }
    if super::real_sockname(fd).is_some_and(|local| local.port() != 0) {
        layer_log!(
            debug,
            "TCP to {dest}: relayed (the program bound its socket first; its local address stays)"
        );
        return None;
    }
    // In the family of the program's socket: an IPv6 socket reaches IPv4 mapped.
    let remote = match (addr::unmap_socket(dest), family) {
        (SocketAddr::V4(v4), libc::AF_INET6) => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        (other, _) => other,
    };
    let passed =
        match client::request_fds(&LayerRequest::Remote(RemoteRequest::ConnectFd { remote })) {
            Ok((LayerResponse::Remote(RemoteResponse::FdConnected), mut fds)) if fds.len() == 1 => {
                fds.remove(0)
            }
            Ok((LayerResponse::Remote(RemoteResponse::Error(RemoteError::Os(errno))), _))
            | Ok((LayerResponse::Error { errno, .. }, _)) => {
                layer_log!(
                    debug,
                    "TCP to {dest}: no socket passed: {}",
                    std::io::Error::from_raw_os_error(errno)
                );
                set_errno(errno);
                return Some(-1);
            }
            Ok((other, _)) => {
                layer_log!(
                    debug,
                    "TCP to {dest}: relayed (no socket passed: {other:?})"
                );
                return None;
            }
            Err(e) => {
                set_errno(e.errno());
                return Some(-1);
            }
        };
    let (nonblocking, _) = flags_of(fd);
    if let Err(errno) = adopt(passed, fd, false) {
        layer_log!(
            debug,
            "TCP to {dest}: the passed socket could not take fd {fd}: {}",
            std::io::Error::from_raw_os_error(errno)
        );
        set_errno(errno);
        return Some(-1);
    }
    fds::insert(
        fd,
        FdKind::Passed {
            peer: addr::unmap_socket(dest),
            shown_local: None,
            sole: false,
        },
    );
    layer_log!(
        debug,
        "TCP to {dest}: the target's socket itself as fd {fd} (descriptor passed)"
    );
    if nonblocking {
        set_errno(libc::EINPROGRESS);
        -1
    } else {
        wait_connected(fd)
    }
    .into()
}

/// What [`adopt_accepted`] made of an accepted loopback connection.
pub enum Accepted {
    /// The proxy passes no descriptors: ask `PeerOf` the relayed way.
    NotAsked,
    /// The target's socket now sits at the accepted descriptor.
    Passed,
    /// A stolen connection the proxy relays, with its real addresses.
    Relayed(DeliveredPeer),
    /// No stolen connection: a local client of the program's listener.
    Local,
}

/// After `accept` on `listener` returned `new_fd`, a loopback connection from
/// the proxy at `proxy_side`: when the agent passed that stolen connection's
/// socket, puts it at `new_fd` and writes the client's address to the caller's
/// buffer. A socket passed ahead with an earlier answer needs no round trip
/// ([`super::ahead`]); otherwise the layer asks, and takes more ahead where this
/// process alone accepts on `listener`.
///
/// # Safety
///
/// `address`/`len` obey accept(2)'s contract (null or valid).
pub unsafe fn adopt_accepted(
    listener: c_int,
    new_fd: c_int,
    proxy_side: SocketAddr,
    address: *mut sockaddr,
    len: *mut socklen_t,
) -> Accepted {
    if !client::passes_fds() {
        return Accepted::NotAsked;
    }
    let proxy_side = addr::unmap_socket(proxy_side);
    // Until the sockets of a batch asked below are kept, another thread's
    // accept waits here rather than miss one of them.
    let _turn = super::ahead::accepting(listener);
    if let Some((peer, fd)) = super::ahead::take(proxy_side) {
        // SAFETY: as this function's.
        return unsafe { adopt_stolen(new_fd, peer.delivered, fd, address, len, "passed ahead") };
    }
    let more = super::ahead::room(listener);
    let request = if more > 0 {
        LayerRequest::PeerOfBatch { proxy_side, more }
    } else {
        LayerRequest::PeerOf { proxy_side }
    };
    let Ok((response, mut fds)) = client::request_fds(&request) else {
        return Accepted::Local;
    };
    match response {
        LayerResponse::PeerFd(delivered) if fds.len() == 1 => {
            // SAFETY: as this function's.
            unsafe { adopt_stolen(new_fd, delivered, fds.remove(0), address, len, "passed") }
        }
        LayerResponse::PeerFds(peers) if !peers.is_empty() && fds.len() == peers.len() => {
            let first = fds.remove(0);
            super::ahead::keep(peers[1..].iter().copied().zip(fds));
            // SAFETY: as this function's.
            unsafe { adopt_stolen(new_fd, peers[0].delivered, first, address, len, "passed") }
        }
        LayerResponse::Peer(Some(delivered)) => {
            layer_log!(
                debug,
                "stolen connection from {} relayed (graft reads it: TLS, the inspector watches, or the link passes no descriptors)",
                delivered.peer
            );
            Accepted::Relayed(delivered)
        }
        _ => Accepted::Local,
    }
}

/// Puts the stolen connection's socket `fd` at the accepted descriptor `new_fd`
/// and writes its client's address to the caller's buffer.
///
/// # Safety
///
/// `address`/`len` obey accept(2)'s contract (null or valid).
unsafe fn adopt_stolen(
    new_fd: c_int,
    delivered: DeliveredPeer,
    fd: OwnedFd,
    address: *mut sockaddr,
    len: *mut socklen_t,
    how: &str,
) -> Accepted {
    let family = super::socket_family(new_fd);
    if let Err(errno) = adopt(fd, new_fd, true) {
        layer_log!(
            error,
            "the stolen connection from {} could not take fd {new_fd}: {}; it stays with the proxy",
            delivered.peer,
            std::io::Error::from_raw_os_error(errno)
        );
        return Accepted::Local;
    }
    fds::insert(
        new_fd,
        FdKind::Passed {
            peer: delivered.peer,
            shown_local: Some(delivered.local),
            sole: false,
        },
    );
    layer_log!(
        debug,
        "stolen connection from {}: the target's socket itself as fd {new_fd} (descriptor {how})",
        delivered.peer
    );
    // SAFETY: the caller's buffer obeys accept(2)'s contract.
    unsafe { RawAddr::new(delivered.peer, family).write_to(address, len) };
    Accepted::Passed
}
