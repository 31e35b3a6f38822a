//! Conversions between C socket addresses and [`SocketAddr`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Reads a `sockaddr` of length `len`; `None` for a null pointer, a family other
/// than `AF_INET`/`AF_INET6`, or a short length.
///
/// # Safety
///
/// `addr` must be null or point to at least `len` readable bytes.
pub unsafe fn from_raw(addr: *const libc::sockaddr, len: libc::socklen_t) -> Option<SocketAddr> {
    if addr.is_null() || (len as usize) < std::mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: the caller guarantees `len` readable bytes; we read the family first
    // and then only the struct that family implies, when `len` covers it. Unaligned
    // reads because programs pass byte buffers.
    unsafe {
        match (*addr).sa_family as i32 {
            libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
                let sin = std::ptr::read_unaligned(addr as *const libc::sockaddr_in);
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
                let sin6 = std::ptr::read_unaligned(addr as *const libc::sockaddr_in6);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// A C socket address with its length.
#[derive(Clone, Copy)]
pub struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawAddr {
    /// Encodes `addr`. With `family == AF_INET6`, an IPv4 address is written
    /// IPv4-mapped (`::ffff:a.b.c.d`), as an IPv6 socket reports it.
    pub fn new(addr: SocketAddr, family: i32) -> RawAddr {
        let addr = match (addr, family) {
            (SocketAddr::V4(v4), libc::AF_INET6) => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            (SocketAddr::V6(v6), libc::AF_INET) => match v6.ip().to_ipv4_mapped() {
                Some(ip) => SocketAddr::V4(SocketAddrV4::new(ip, v6.port())),
                None => addr,
            },
            _ => addr,
        };
        // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*v4.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: v6.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: v6.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        RawAddr {
            storage,
            len: len as libc::socklen_t,
        }
    }

    /// Pointer for passing to libc.
    pub fn as_ptr(&self) -> *const libc::sockaddr {
        &self.storage as *const _ as *const libc::sockaddr
    }

    /// Length in bytes.
    pub fn len(&self) -> libc::socklen_t {
        self.len
    }

    /// Whether the address is empty (never: every `RawAddr` holds an address).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies into a caller's `(addr, *addrlen)` buffer the way the kernel does:
    /// truncating to the buffer and reporting the full length.
    ///
    /// # Safety
    ///
    /// `out` must be null or point to `*out_len` writable bytes, `out_len` null or valid.
    pub unsafe fn write_to(&self, out: *mut libc::sockaddr, out_len: *mut libc::socklen_t) {
        if out.is_null() || out_len.is_null() {
            return;
        }
        // SAFETY: the caller guarantees the buffer; we copy at most its length.
        unsafe {
            let n = (*out_len).min(self.len) as usize;
            std::ptr::copy_nonoverlapping(self.as_ptr() as *const u8, out as *mut u8, n);
            *out_len = self.len;
        }
    }
}

/// Whether a destination always stays local: loopback or unspecified, including
/// their IPv4-mapped forms.
pub fn is_local_only(addr: &SocketAddr) -> bool {
    let ip = unmap(addr.ip());
    ip.is_loopback() || ip.is_unspecified()
}

/// Turns an IPv4-mapped IPv6 address into IPv4; others unchanged.
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// `addr` with an IPv4-mapped address turned into IPv4.
pub fn unmap_socket(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(unmap(addr.ip()), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families() {
        for text in ["198.18.0.2:80", "[2001:2::2]:443"] {
            let a: SocketAddr = text.parse().unwrap();
            let family = if a.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            let raw = RawAddr::new(a, family);
            // SAFETY: raw holds a valid address of raw.len() bytes.
            assert_eq!(unsafe { from_raw(raw.as_ptr(), raw.len()) }, Some(a));
        }
    }

    #[test]
    fn v4_on_v6_socket_is_mapped() {
        let a: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let raw = RawAddr::new(a, libc::AF_INET6);
        // SAFETY: as above.
        let back = unsafe { from_raw(raw.as_ptr(), raw.len()) }.unwrap();
        assert_eq!(
            back,
            "[::ffff:198.18.0.2]:80".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(unmap_socket(back), a);
    }

    #[test]
    fn loopback_and_mapped_loopback_stay_local() {
        assert!(is_local_only(&"127.0.0.1:1".parse().unwrap()));
        assert!(is_local_only(&"[::ffff:127.0.0.1]:1".parse().unwrap()));
        assert!(is_local_only(&"[::1]:1".parse().unwrap()));
        assert!(!is_local_only(&"198.18.0.1:1".parse().unwrap()));
    }
}
