//! Socket hooks: steal (`bind`/`listen`, and `accept` in [`accept`]), outgoing TCP and UDP
//! (`connect`, `sendto`/`sendmsg`, `recvfrom`/`recvmsg`), the addresses the program
//! sees (`getsockname`/`getpeername`), and descriptor bookkeeping (`close`,
//! `dup*`, `fcntl(F_DUPFD*)`).
//!
//! Every socket stays a real kernel socket: an outgoing connection is really
//! connected to a loopback relay of the proxy, which splices it to a socket the
//! agent opened in the target's network namespace; a stolen connection is really
//! accepted (from the proxy, or from a direct listener in the target's
//! namespace, [`direct`]). The hooks only choose the real address and remember
//! the one to show (see [`crate::fds`]).

use std::{
    net::SocketAddr,
    os::raw::{c_int, c_void},
};

use graft_config::IncomingMode;
use graft_protocol::{
    Transport,
    layer::{LayerRequest, LayerResponse},
};
use libc::{msghdr, sockaddr, socklen_t, ssize_t};

mod accept;
pub(crate) mod ahead;
mod direct;
mod epoll;
mod passed;

use crate::{
    addr::{self, RawAddr},
    client,
    fds::{self, FdKind},
    guard::{self, hooked, set_errno},
    state,
};

fn sockopt_int(fd: c_int, level: c_int, name: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: value/len are valid out-pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            &mut value as *mut c_int as *mut c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

fn socket_type(fd: c_int) -> Option<c_int> {
    sockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)
}

fn socket_family(fd: c_int) -> c_int {
    sockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(libc::AF_INET)
}

fn real_sockname(fd: c_int) -> Option<SocketAddr> {
    // SAFETY: storage is a valid out-buffer of `len` bytes.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as socklen_t;
        let rc = real!(getsockname(fd, &mut storage as *mut _ as *mut sockaddr, &mut len)
            : fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int);
        if rc != 0 {
            return None;
        }
        addr::from_raw(&storage as *const _ as *const sockaddr, len)
    }
}

fn real_peername(fd: c_int) -> Option<SocketAddr> {
    // SAFETY: as in real_sockname.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as socklen_t;
        let rc = real!(getpeername(fd, &mut storage as *mut _ as *mut sockaddr, &mut len)
            : fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int);
        if rc != 0 {
            return None;
        }
        addr::from_raw(&storage as *const _ as *const sockaddr, len)
    }
}

/// Whether a destination goes through the target: the `[outgoing]` rules,
/// decided by `LayerConfig::goes_remote` with the names the program resolved
/// through the agent (`crate::dns::NAMES`). `transport` is asked only when
/// the destination is not loopback.
fn is_remote_destination(dest: &SocketAddr, transport: impl FnOnce() -> Transport) -> bool {
    let Some(state) = state() else { return false };
    state.config.outgoing
        && !addr::is_local_only(dest)
        && state
            .config
            .goes_remote(dest, transport(), &crate::dns::NAMES)
}

/// The transport of `fd` for the outgoing rules (TCP unless a datagram socket).
fn fd_transport(fd: c_int) -> Transport {
    match socket_type(fd) {
        Some(libc::SOCK_DGRAM) => Transport::Udp,
        _ => Transport::Tcp,
    }
}

/// Asks the proxy for a connection or flow to `remote`; `Ok((relay, local))`.
fn open_remote(
    remote: SocketAddr,
    transport: Transport,
) -> Result<(SocketAddr, SocketAddr), c_int> {
    let remote = addr::unmap_socket(remote);
    match client::request(&LayerRequest::Connect { remote, transport }) {
        Ok(LayerResponse::Connected { relay, local }) => {
            layer_log!(debug, "{transport:?} to {remote} relayed via {relay}");
            Ok((relay, local))
        }
        Ok(LayerResponse::Error { errno, message }) => {
            layer_log!(debug, "{transport:?} to {remote} failed: {message}");
            Err(errno)
        }
        Ok(other) => {
            layer_log!(error, "unexpected proxy answer to Connect: {other:?}");
            Err(libc::EIO)
        }
        Err(e) => Err(e.errno()),
    }
}

// ---------------------------------------------------------------- steal

/// `bind(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bind(fd: c_int, address: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real =
        || unsafe { real!(bind(fd, address, len): fn(c_int, *const sockaddr, socklen_t) -> c_int) };
    if state().is_none_or(|s| s.config.incoming == IncomingMode::Off) {
        return real();
    }
    // SAFETY: the caller passes `len` readable bytes at `address`, as bind(2) requires.
    hooked(real, || unsafe { bind_hook(fd, address, len, real) })
}

unsafe fn bind_hook(
    fd: c_int,
    address: *const sockaddr,
    len: socklen_t,
    real: impl Fn() -> c_int,
) -> c_int {
    // SAFETY: see `bind`.
    let Some(requested) = (unsafe { addr::from_raw(address, len) }) else {
        return real();
    };
    if requested.port() == 0 || socket_type(fd) != Some(libc::SOCK_STREAM) {
        return real();
    }
    let config = &state().expect("hooked only runs with state").config;
    let remote_port = config.remote_port(requested.port());
    let mut fake_local = None;
    if real() != 0 {
        if guard::errno() != libc::EADDRINUSE {
            return -1;
        }
        // The port is busy on this machine; listen on another one and show the
        // program the port it asked for: the target's port is what matters.
        let other = RawAddr::new(SocketAddr::new(requested.ip(), 0), socket_family(fd));
        // SAFETY: `other` is a valid socket address of `other.len()` bytes.
        let rc = unsafe {
            real!(bind(fd, other.as_ptr(), other.len()): fn(c_int, *const sockaddr, socklen_t) -> c_int)
        };
        if rc != 0 {
            return rc;
        }
        fake_local = Some(requested);
    }
    fds::insert(
        fd,
        FdKind::Bound {
            remote_port,
            fake_local,
        },
    );
    0
}

/// After `listen` on `fd` failed with `EADDRINUSE` (its port is busy on this
/// machine): puts at `fd` a new listening socket of the same family, flags and
/// options on the same address with port 0, and returns the address `fd` had
/// (the one the program asked for); `None` when that fails too (`fd` stays as
/// it was).
fn listen_elsewhere(fd: c_int, backlog: c_int) -> Option<SocketAddr> {
    let asked = real_sockname(fd)?;
    let family = socket_family(fd);
    // SAFETY: plain system calls on descriptors the layer owns (`new`) or the
    // program handed to the hook (`fd`); `other` is a valid address.
    unsafe {
        let status = real!(fcntl(fd, libc::F_GETFL, 0): fn(c_int, c_int, libc::c_ulong) -> c_int);
        let fd_flags = real!(fcntl(fd, libc::F_GETFD, 0): fn(c_int, c_int, libc::c_ulong) -> c_int);
        let mut kind = libc::SOCK_STREAM;
        if status >= 0 && status & libc::O_NONBLOCK != 0 {
            kind |= libc::SOCK_NONBLOCK;
        }
        let new = libc::socket(family, kind | libc::SOCK_CLOEXEC, 0);
        if new < 0 {
            return None;
        }
        passed::copy_options(fd, new);
        if family == libc::AF_INET6
            && let Some(v6only) = passed::option(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
        {
            passed::set_option(new, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &v6only);
        }
        let other = RawAddr::new(SocketAddr::new(asked.ip(), 0), family);
        let cloexec = if fd_flags >= 0 && fd_flags & libc::FD_CLOEXEC != 0 {
            libc::O_CLOEXEC
        } else {
            0
        };
        let ok = real!(bind(new, other.as_ptr(), other.len()): fn(c_int, *const sockaddr, socklen_t) -> c_int)
            == 0
            && real!(listen(new, backlog): fn(c_int, c_int) -> c_int) == 0
            && real!(dup3(new, fd, cloexec): fn(c_int, c_int, c_int) -> c_int) >= 0;
        real!(close(new): fn(c_int) -> c_int);
        ok.then_some(asked)
    }
}

/// `listen(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe { real!(listen(fd, backlog): fn(c_int, c_int) -> c_int) };
    if fds::is_empty() {
        return real();
    }
    hooked(real, || {
        let Some(FdKind::Bound {
            remote_port,
            fake_local,
        }) = fds::get(fd)
        else {
            return real();
        };
        let mut fake_local = fake_local;
        if real() != 0 {
            if guard::errno() != libc::EADDRINUSE || fake_local.is_some() {
                return -1;
            }
            // Another socket bound the port with SO_REUSEADDR between our bind
            // and this listen, and listened first: as at bind, listen on
            // another port and show the program the one it asked for.
            match listen_elsewhere(fd, backlog) {
                Some(asked) => fake_local = Some(asked),
                None => {
                    set_errno(libc::EADDRINUSE);
                    return -1;
                }
            }
        }
        let Some(deliver_to) = real_sockname(fd) else {
            return 0;
        };
        let request = LayerRequest::Listen {
            port: remote_port,
            deliver_to,
            pid: std::process::id(),
        };
        match client::request_fds(&request) {
            Ok((response @ (LayerResponse::Ok | LayerResponse::ListenDirect), passed)) => {
                layer_log!(info, "stealing target port {remote_port} → {deliver_to}");
                ahead::listening(fd);
                fds::insert(
                    fd,
                    FdKind::Listener {
                        remote_port,
                        fake_local,
                    },
                );
                if response == LayerResponse::ListenDirect && !passed.is_empty() {
                    direct::attach(fd, passed, remote_port);
                }
                0
            }
            Ok((LayerResponse::Error { errno, message }, _)) => {
                layer_log!(error, "cannot steal port {remote_port}: {message}");
                set_errno(errno);
                -1
            }
            Ok((other, _)) => {
                layer_log!(error, "unexpected proxy answer to Listen: {other:?}");
                set_errno(libc::EIO);
                -1
            }
            Err(e) => {
                set_errno(e.errno());
                -1
            }
        }
    })
}

// ---------------------------------------------------------------- outgoing

/// `connect(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn connect(fd: c_int, address: *const sockaddr, len: socklen_t) -> c_int {
    // The common case, a local destination or outgoing traffic off, decides
    // here and calls libc with nothing else on the stack (bench/hooks.c,
    // "connect(udp,127.0.0.1)"); the rest is `connect_remote`'s.
    // SAFETY: the caller passes `len` readable bytes at `address`, as connect(2) requires.
    let local = match unsafe { addr::from_raw(address, len) } {
        Some(dest) => addr::is_local_only(&dest) || !state().is_some_and(|s| s.config.outgoing),
        None => true,
    };
    if local {
        // SAFETY: forwards the caller's arguments unchanged.
        return unsafe {
            real!(connect(fd, address, len): fn(c_int, *const sockaddr, socklen_t) -> c_int)
        };
    }
    // SAFETY: as above.
    unsafe { connect_remote(fd, address, len) }
}

/// `connect` to a destination that may go through the target.
///
/// # Safety
///
/// As connect(2): `len` readable bytes at `address`.
#[cold]
#[inline(never)]
unsafe fn connect_remote(fd: c_int, address: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(connect(fd, address, len): fn(c_int, *const sockaddr, socklen_t) -> c_int)
    };
    // Parsed again rather than passed: a `SocketAddr` argument made `connect`
    // save two more registers on every local call for a parse this cold path
    // does in a few ns before a round trip to the proxy.
    // SAFETY: the caller's contract.
    let Some(dest) = (unsafe { addr::from_raw(address, len) }) else {
        return real();
    };
    if !is_remote_destination(&dest, || fd_transport(fd)) {
        return real();
    }
    hooked(real, || connect_hook(fd, dest, real))
}

fn connect_to(fd: c_int, relay: SocketAddr) -> c_int {
    let raw = RawAddr::new(relay, socket_family(fd));
    // SAFETY: `raw` is a valid socket address of `raw.len()` bytes.
    unsafe {
        real!(connect(fd, raw.as_ptr(), raw.len()): fn(c_int, *const sockaddr, socklen_t) -> c_int)
    }
}

fn connect_hook(fd: c_int, dest: SocketAddr, real: impl Fn() -> c_int) -> c_int {
    // A repeated connect on a non-blocking socket (to learn whether it finished)
    // must reach the same relay, not open a second remote connection.
    if let Some(FdKind::Relayed { peer, relay, .. }) = fds::get(fd)
        && addr::unmap_socket(peer) == addr::unmap_socket(dest)
    {
        return connect_to(fd, relay);
    }
    // A repeated connect on a passed socket is the kernel's to answer
    // (`EALREADY`, `EISCONN`).
    if let Some(FdKind::Passed { .. }) = fds::get(fd) {
        return real();
    }
    let transport = match socket_type(fd) {
        Some(libc::SOCK_STREAM) => Transport::Tcp,
        Some(libc::SOCK_DGRAM) => {
            if client::passes_fds() {
                layer_log!(
                    debug,
                    "UDP to {dest}: relayed (datagram sockets stay relayed: one may be aimed elsewhere later)"
                );
            }
            Transport::Udp
        }
        _ => return real(),
    };
    if transport == Transport::Tcp
        && let Some(rc) = passed::connect(fd, dest, socket_family(fd))
    {
        return rc;
    }
    match open_remote(dest, transport) {
        Ok((relay, local)) => {
            fds::insert(
                fd,
                FdKind::Relayed {
                    peer: addr::unmap_socket(dest),
                    local,
                    relay,
                },
            );
            connect_to(fd, relay)
        }
        Err(errno) => {
            set_errno(errno);
            -1
        }
    }
}

/// The relay for datagrams from `fd` to `dest`, opened on first use.
fn udp_relay(fd: c_int, dest: SocketAddr) -> Result<SocketAddr, c_int> {
    let dest = addr::unmap_socket(dest);
    if let Some(FdKind::UdpRelays { relays }) = fds::get(fd)
        && let Some((_, relay)) = relays.iter().find(|(remote, _)| *remote == dest)
    {
        return Ok(*relay);
    }
    let (relay, _) = open_remote(dest, Transport::Udp)?;
    match fds::get(fd) {
        Some(FdKind::UdpRelays { .. }) => fds::update(fd, |kind| {
            if let FdKind::UdpRelays { relays } = kind {
                relays.push((dest, relay));
            }
        }),
        _ => fds::insert(
            fd,
            FdKind::UdpRelays {
                relays: vec![(dest, relay)],
            },
        ),
    }
    Ok(relay)
}

/// `sendto(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: usize,
    flags: c_int,
    address: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(sendto(fd, buf, n, flags, address, len)
            : fn(c_int, *const c_void, usize, c_int, *const sockaddr, socklen_t) -> ssize_t)
    };
    // SAFETY: null or `len` readable bytes, as sendto(2) requires.
    let Some(dest) = (unsafe { addr::from_raw(address, len) }) else {
        return real();
    };
    if !is_remote_destination(&dest, || Transport::Udp) {
        return real();
    }
    hooked(real, || {
        if socket_type(fd) != Some(libc::SOCK_DGRAM) {
            return real();
        }
        match udp_relay(fd, dest) {
            Ok(relay) => {
                let raw = RawAddr::new(relay, socket_family(fd));
                // SAFETY: the caller's buffer is forwarded; `raw` is a valid address.
                unsafe {
                    real!(sendto(fd, buf, n, flags, raw.as_ptr(), raw.len())
                        : fn(c_int, *const c_void, usize, c_int, *const sockaddr, socklen_t) -> ssize_t)
                }
            }
            Err(errno) => {
                set_errno(errno);
                -1
            }
        }
    })
}

/// `sendmsg(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    // SAFETY: forwards the caller's arguments unchanged.
    let real =
        || unsafe { real!(sendmsg(fd, msg, flags): fn(c_int, *const msghdr, c_int) -> ssize_t) };
    if msg.is_null() {
        return real();
    }
    // SAFETY: `msg` is a valid msghdr per sendmsg(2); msg_name is null or msg_namelen bytes.
    let dest = unsafe { addr::from_raw((*msg).msg_name as *const sockaddr, (*msg).msg_namelen) };
    let Some(dest) = dest else { return real() };
    if !is_remote_destination(&dest, || Transport::Udp) {
        return real();
    }
    hooked(real, || {
        if socket_type(fd) != Some(libc::SOCK_DGRAM) {
            return real();
        }
        match udp_relay(fd, dest) {
            Ok(relay) => {
                let raw = RawAddr::new(relay, socket_family(fd));
                // SAFETY: a copy of the caller's msghdr with only the name replaced.
                unsafe {
                    let mut copy = *msg;
                    copy.msg_name = raw.as_ptr() as *mut c_void;
                    copy.msg_namelen = raw.len();
                    real!(sendmsg(fd, &copy, flags): fn(c_int, *const msghdr, c_int) -> ssize_t)
                }
            }
            Err(errno) => {
                set_errno(errno);
                -1
            }
        }
    })
}

/// If `fd` has UDP relays and `source` is one, the remote it stands for.
fn unrelay(fd: c_int, source: SocketAddr) -> Option<SocketAddr> {
    match fds::get(fd)? {
        FdKind::UdpRelays { relays } => {
            let source = addr::unmap_socket(source);
            relays
                .iter()
                .find(|(_, relay)| *relay == source)
                .map(|(remote, _)| *remote)
        }
        FdKind::Relayed { peer, relay, .. } if addr::unmap_socket(source) == relay => Some(peer),
        _ => None,
    }
}

/// `recvfrom(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: usize,
    flags: c_int,
    address: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(recvfrom(fd, buf, n, flags, address, len)
            : fn(c_int, *mut c_void, usize, c_int, *mut sockaddr, *mut socklen_t) -> ssize_t)
    };
    if fds::is_empty() || address.is_null() || len.is_null() {
        return real();
    }
    hooked(real, || {
        let received = real();
        if received < 0 {
            return received;
        }
        let saved = guard::errno();
        // SAFETY: the kernel just filled `*len` bytes of `address`.
        if let Some(source) = unsafe { addr::from_raw(address, *len) }
            && let Some(remote) = unrelay(fd, source)
        {
            let raw = RawAddr::new(remote, socket_family(fd));
            // SAFETY: caller's buffer, as recvfrom(2) requires; we report the full length.
            unsafe {
                let capacity =
                    std::mem::size_of::<libc::sockaddr_storage>().min(raw.len() as usize);
                let mut cap = capacity.max(*len as usize) as socklen_t;
                raw.write_to(address, &mut cap);
                *len = raw.len();
            }
        }
        set_errno(saved);
        received
    })
}

/// `recvmsg(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    // SAFETY: forwards the caller's arguments unchanged.
    let real =
        || unsafe { real!(recvmsg(fd, msg, flags): fn(c_int, *mut msghdr, c_int) -> ssize_t) };
    if fds::is_empty() || msg.is_null() {
        return real();
    }
    hooked(real, || {
        let received = real();
        if received < 0 {
            return received;
        }
        // SAFETY: `msg` is the caller's valid msghdr; the kernel filled msg_name.
        unsafe {
            let name = (*msg).msg_name as *mut sockaddr;
            if let Some(source) = addr::from_raw(name, (*msg).msg_namelen)
                && let Some(remote) = unrelay(fd, source)
            {
                let raw = RawAddr::new(remote, socket_family(fd));
                let mut cap = (*msg).msg_namelen.max(raw.len());
                raw.write_to(name, &mut cap);
                (*msg).msg_namelen = raw.len();
            }
        }
        received
    })
}

// ---------------------------------------------------------------- addresses

/// `getpeername(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getpeername(
    fd: c_int,
    address: *mut sockaddr,
    len: *mut socklen_t,
) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(getpeername(fd, address, len): fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int)
    };
    if fds::is_empty() {
        return real();
    }
    hooked(real, || match fds::get(fd) {
        // A passed socket's kernel peer is the client itself, except on a
        // filtered port, where the agent passes one end of a loopback pair.
        Some(FdKind::Relayed { peer, .. } | FdKind::Passed { peer, .. }) => {
            // SAFETY: caller's buffer per getpeername(2).
            unsafe { RawAddr::new(peer, socket_family(fd)).write_to(address, len) };
            0
        }
        _ => real(),
    })
}

/// `getsockname(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockname(
    fd: c_int,
    address: *mut sockaddr,
    len: *mut socklen_t,
) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(getsockname(fd, address, len): fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int)
    };
    if fds::is_empty() {
        return real();
    }
    hooked(real, || {
        let shown = match fds::get(fd) {
            Some(FdKind::Relayed { local, .. }) => Some(local),
            Some(FdKind::Passed { shown_local, .. }) => shown_local,
            Some(FdKind::Bound { fake_local, .. } | FdKind::Listener { fake_local, .. }) => {
                fake_local
            }
            _ => None,
        };
        match shown {
            Some(shown) => {
                // SAFETY: caller's buffer per getsockname(2).
                unsafe { RawAddr::new(shown, socket_family(fd)).write_to(address, len) };
                0
            }
            None => real(),
        }
    })
}

// ---------------------------------------------------------------- descriptors

/// Forgets `fd` before it is closed, ending what it stood for.
fn forget(fd: c_int) {
    direct::before_close(fd);
    if fds::is_sole(fd) {
        // Nothing to undo (no `epoll` bookkeeping, no duplicate): the entry
        // goes, stale or not, since the descriptor closes.
        fds::remove(fd);
        return;
    }
    let duplicated = fds::has_duplicate(fd);
    let Some(kind) = fds::get(fd) else { return };
    if let FdKind::Passed { .. } = kind {
        epoll::before_close(fd, !duplicated);
    }
    if !duplicated {
        match &kind {
            FdKind::Listener { remote_port, .. } => {
                ahead::drop_port(fd, *remote_port);
                let _ = client::request(&LayerRequest::Unlisten {
                    port: *remote_port,
                    pid: std::process::id(),
                });
            }
            FdKind::RemoteFile(_) | FdKind::RemoteDir { .. } => {
                crate::files::before_close(fd, &kind)
            }
            _ => {}
        }
    }
    fds::remove(fd);
}

/// `close(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    // SAFETY: forwards the caller's argument unchanged.
    let real = || unsafe { real!(close(fd): fn(c_int) -> c_int) };
    if fds::is_empty() {
        return real();
    }
    hooked(real, || {
        forget(fd);
        real()
    })
}

/// The shared body of `dup` and `fcntl(F_DUPFD*)`: `real` returns a new
/// descriptor duplicating `fd`.
fn dup_with(fd: c_int, real: impl Fn() -> c_int) -> c_int {
    if fds::is_empty() {
        return real();
    }
    hooked(&real, || {
        let new = real();
        if new >= 0 {
            fds::duplicate(fd, new);
        }
        new
    })
}

/// The shared body of `dup2` and `dup3`: `real` makes `new` a duplicate of
/// `old`, closing what `new` was first.
fn dup_onto(old: c_int, new: c_int, real: impl Fn() -> c_int) -> c_int {
    if fds::is_empty() {
        return real();
    }
    hooked(&real, || {
        if old != new {
            forget(new);
        }
        let rc = real();
        if rc >= 0 && old != new {
            fds::duplicate(old, new);
        }
        rc
    })
}

/// `dup(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: forwards the caller's argument unchanged.
    dup_with(fd, || unsafe { real!(dup(fd): fn(c_int) -> c_int) })
}

/// `dup2(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    dup_onto(old, new, || unsafe {
        real!(dup2(old, new): fn(c_int, c_int) -> c_int)
    })
}

/// `dup3(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    dup_onto(old, new, || unsafe {
        real!(dup3(old, new, flags): fn(c_int, c_int, c_int) -> c_int)
    })
}

/// `fcntl(2)`; the variadic third argument is taken as a machine word, which is
/// how the SysV ABIs of x86-64 and AArch64 pass it for every command.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: libc::c_ulong) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe { real!(fcntl(fd, cmd, arg): fn(c_int, c_int, libc::c_ulong) -> c_int) };
    if cmd != libc::F_DUPFD && cmd != libc::F_DUPFD_CLOEXEC {
        return real();
    }
    dup_with(fd, real)
}

/// `fcntl64`, glibc's large-file alias of [`fcntl`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: libc::c_ulong) -> c_int {
    // SAFETY: same contract as fcntl.
    unsafe { fcntl(fd, cmd, arg) }
}
