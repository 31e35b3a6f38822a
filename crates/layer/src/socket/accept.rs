//! `accept` and `accept4` on a stolen port's listener: a connection from the
//! direct listener ([`super::direct`]) first; else the program's own, where a
//! loopback connection of the proxy stands for a stolen connection whose real
//! client (and, when passed, socket: [`super::passed`]) the layer asks for.

use std::{net::SocketAddr, os::raw::c_int};

use graft_protocol::layer::{LayerRequest, LayerResponse};
use libc::{sockaddr, socklen_t};

use super::{direct, passed, real_peername, real_sockname, socket_family};
use crate::{
    addr::{self, RawAddr},
    client,
    fds::{self, FdKind},
    guard::hooked,
};

/// Whether the accepted connection `fd` from `peer` may be one the proxy made:
/// the proxy connects from the listener's own address (a loopback address, or
/// the machine's address the program bound, such as `192.168.1.5:8080`), so
/// its peer is a loopback address or the connection's own local address. A
/// client from elsewhere is served as it came, without asking the proxy.
fn from_this_machine(fd: c_int, peer: &SocketAddr) -> bool {
    addr::is_local_only(peer)
        || real_sockname(fd).is_some_and(|local| addr::unmap(local.ip()) == addr::unmap(peer.ip()))
}

/// After a successful accept on a stolen listener: find the real client.
unsafe fn after_accept(
    listener: c_int,
    new_fd: c_int,
    address: *mut sockaddr,
    len: *mut socklen_t,
) -> c_int {
    if !matches!(fds::get(listener), Some(FdKind::Listener { .. })) {
        return new_fd;
    }
    let Some(proxy_side) = real_peername(new_fd) else {
        return new_fd;
    };
    if !from_this_machine(new_fd, &proxy_side) {
        return new_fd;
    }
    // SAFETY: the caller's buffer obeys accept(2)'s contract.
    let delivered =
        match unsafe { passed::adopt_accepted(listener, new_fd, proxy_side, address, len) } {
            passed::Accepted::Passed | passed::Accepted::Local => None,
            passed::Accepted::Relayed(delivered) => Some(delivered),
            passed::Accepted::NotAsked => match client::request(&LayerRequest::PeerOf {
                proxy_side: addr::unmap_socket(proxy_side),
            }) {
                Ok(LayerResponse::Peer(delivered)) => delivered,
                _ => None,
            },
        };
    if let Some(delivered) = delivered {
        let relay = real_sockname(new_fd).unwrap_or(proxy_side);
        fds::insert(
            new_fd,
            FdKind::Relayed {
                peer: delivered.peer,
                local: delivered.local,
                relay,
            },
        );
        let raw = RawAddr::new(delivered.peer, socket_family(new_fd));
        // SAFETY: the caller's buffer obeys accept(2)'s contract (null or valid).
        unsafe { raw.write_to(address, len) };
    }
    new_fd
}

/// The shared body of `accept` and `accept4` (with `flags`, 0 for
/// `accept`): `real` performs the call.
fn accept_with(
    fd: c_int,
    address: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
    real: impl Fn() -> c_int,
) -> c_int {
    if fds::is_empty() {
        return real();
    }
    hooked(&real, || {
        let accept_own = || {
            let new_fd = real();
            if new_fd < 0 {
                return new_fd;
            }
            // SAFETY: the caller's buffer obeys accept(2)'s contract.
            unsafe { after_accept(fd, new_fd, address, len) }
        };
        if let Some(found) = direct::of(fd) {
            // SAFETY: the caller's buffer obeys accept(2)'s contract.
            return unsafe { direct::accept(fd, found, address, len, flags, accept_own) };
        }
        accept_own()
    })
}

/// `accept(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept(fd: c_int, address: *mut sockaddr, len: *mut socklen_t) -> c_int {
    accept_with(fd, address, len, 0, || {
        // SAFETY: forwards the caller's arguments unchanged.
        unsafe {
            real!(accept(fd, address, len): fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int)
        }
    })
}

/// `accept4(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    address: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    accept_with(fd, address, len, flags, || {
        // SAFETY: forwards the caller's arguments unchanged.
        unsafe {
            real!(accept4(fd, address, len, flags)
                : fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int)
        }
    })
}
