//! `setsockopt(2)` for the socket options that neither `nix` nor `rustix`
//! offers: the packet ring's (`SOL_PACKET`, packet(7)), `SO_ATTACH_FILTER`
//! and `SO_RCVLOWAT` (socket(7)), `IPV6_TRANSPARENT` (ipv6(7)).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Sets option `name` of `level` on the socket `fd` to `value`, whose bytes
/// the kernel copies (`T` is the option's C type: `c_int`, `tpacket_req3`,
/// `sock_fprog`, …).
///
/// # Errors
///
/// The `setsockopt` error: `ENOPROTOOPT` for an option the socket's protocol
/// does not have, `EINVAL` for a value it refuses, `EPERM` without the
/// capability the option needs, `ENOMEM` when the kernel cannot allocate
/// what it asks for (a packet ring's blocks).
#[allow(unsafe_code)]
pub fn set<T>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a live `T` and its size is passed; the kernel only
    // reads that many bytes, during the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
