//! Name resolution through the target: `getaddrinfo`/`freeaddrinfo` and
//! `gethostbyname{,2}{,_r}` ask the agent ([`RemoteRequest::Resolve`]), which
//! resolves with the target's `/etc/hosts` and `/etc/resolv.conf`.
//!
//! Left to libc (the fast path, no proxy): DNS off (`--no-dns`), a null name,
//! numeric addresses (and `AI_NUMERICHOST`), `localhost` and `*.localhost`,
//! and the names the `[dns]` rules keep local (`--dns-local`, or not in
//! `--dns-remote`; decided by `LayerConfig::resolves_remotely`).
//!
//! The agent's answers are remembered in [`NAMES`] when an outgoing rule names
//! a host, so `connect()` can be decided by name (`crate::socket`).
//!
//! `addrinfo` lists are allocated the way glibc does (one `malloc` per entry
//! holding the `addrinfo` and its socket address, the canonical name apart), so
//! even a list that reached libc's `freeaddrinfo` would be freed correctly; ours
//! are also remembered in a registry so our `freeaddrinfo` frees them itself.

use std::{
    cell::RefCell,
    collections::HashSet,
    ffi::{CStr, CString},
    net::IpAddr,
    os::raw::{c_char, c_int},
    sync::Mutex,
};

use graft_config::ResolvedNames;
use graft_protocol::remote::{AddressFamily, RemoteError, RemoteRequest, RemoteResponse};
use libc::{addrinfo, hostent, size_t};

use crate::{client, guard::hooked, state};

const HOST_NOT_FOUND: c_int = 1;
const TRY_AGAIN: c_int = 2;
const NO_RECOVERY: c_int = 3;
const NO_DATA: c_int = 4;
const NETDB_INTERNAL: c_int = -1;

unsafe extern "C" {
    /// glibc's per-thread `h_errno`.
    fn __h_errno_location() -> *mut c_int;
}

fn set_h_errno(value: c_int) {
    // SAFETY: glibc returns a valid pointer to this thread's h_errno.
    unsafe { *__h_errno_location() = value };
}

/// The names behind the addresses the agent answered (bounded, see
/// [`ResolvedNames`]).
pub(crate) static NAMES: std::sync::LazyLock<ResolvedNames> =
    std::sync::LazyLock::new(ResolvedNames::default);

fn dns_enabled() -> bool {
    state().is_some_and(|s| s.config.dns)
}

/// The name to resolve remotely, or `None` when libc answers it (numeric,
/// localhost, not UTF-8, empty).
///
/// # Safety
///
/// `node` must be null or a C string.
unsafe fn remote_name(node: *const c_char) -> Option<String> {
    if node.is_null() || !dns_enabled() {
        return None;
    }
    // SAFETY: the caller guarantees a C string.
    let name = unsafe { CStr::from_ptr(node) };
    let text = name.to_str().ok()?;
    if text.is_empty() || text.contains(':') || text.parse::<IpAddr>().is_ok() {
        return None;
    }
    // inet_aton's forms too ("127.1", "0x7f.1"), which glibc accepts as numeric.
    // SAFETY: plain old data.
    let mut addr: libc::in_addr = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a C string, `addr` a valid out-pointer.
    if unsafe {
        real!(inet_aton(name.as_ptr(), &mut addr): fn(*const c_char, *mut libc::in_addr) -> c_int, missing = 0)
    } != 0
    {
        return None;
    }
    let lower = text.trim_end_matches('.').to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") {
        return None;
    }
    if state().is_some_and(|s| !s.config.resolves_remotely(text)) {
        layer_log!(debug, "resolve {text}: local by the [dns] rules");
        return None;
    }
    Some(text.to_owned())
}

/// Resolves `host` through the agent.
fn resolve(
    host: &str,
    family: AddressFamily,
) -> Result<(Vec<IpAddr>, Option<String>), RemoteError> {
    let answer = client::remote(RemoteRequest::Resolve {
        host: host.to_owned(),
        family,
    });
    layer_log!(debug, "resolve {host} ({family:?}): {answer:?}");
    match answer? {
        RemoteResponse::Resolved { addrs, canonical } if !addrs.is_empty() => {
            if state().is_some_and(|s| s.config.needs_names()) {
                NAMES.record(host, &addrs);
            }
            Ok((addrs, canonical))
        }
        RemoteResponse::Resolved { .. } => Err(RemoteError::NoName),
        other => Err(RemoteError::Other(format!("unexpected answer {other:?}"))),
    }
}

// ---------------------------------------------------------------- getaddrinfo

/// Heads of the lists we allocated.
static LISTS: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

fn lists() -> std::sync::MutexGuard<'static, Option<HashSet<usize>>> {
    LISTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A socket type an answer is given for.
#[derive(Clone, Copy)]
struct Template {
    socktype: c_int,
    protocol: c_int,
    port: u16,
}

/// What `getaddrinfo` answers.
enum Gai {
    /// Let libc answer.
    Local,
    /// An `EAI_*` error (`EAI_SYSTEM` with `errno` set).
    Error(c_int),
    /// The list.
    List(*mut addrinfo),
}

/// The port of `service` for `proto` (`"tcp"`, `"udp"`): numeric, or looked up
/// in the local services database.
fn service_port(service: &CStr, proto: &CStr) -> Option<u16> {
    if let Ok(port) = service.to_str().unwrap_or("").parse::<u16>() {
        return Some(port);
    }
    // SAFETY: plain old data.
    let mut entry: libc::servent = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as c_char; 4096];
    let mut result: *mut libc::servent = std::ptr::null_mut();
    // SAFETY: valid C strings, a buffer of `buf.len()` bytes, valid out-pointers.
    let rc = unsafe {
        real!(getservbyname_r(service.as_ptr(), proto.as_ptr(), &mut entry, buf.as_mut_ptr(), buf.len(), &mut result)
            : fn(*const c_char, *const c_char, *mut libc::servent, *mut c_char, size_t, *mut *mut libc::servent) -> c_int)
    };
    (rc == 0 && !result.is_null()).then(|| u16::from_be(entry.s_port as u16))
}

/// The socket types to answer for, with their ports; `Err(EAI_*)` on a bad
/// service or socket type.
///
/// # Safety
///
/// `service` must be null or a C string.
unsafe fn templates(hints: &addrinfo, service: *const c_char) -> Result<Vec<Template>, c_int> {
    let service = (!service.is_null())
        // SAFETY: the caller guarantees a C string.
        .then(|| unsafe { CStr::from_ptr(service) })
        .filter(|s| !s.is_empty());
    if let Some(s) = service {
        let numeric = s.to_str().is_ok_and(|s| s.parse::<u16>().is_ok());
        if !numeric && hints.ai_flags & libc::AI_NUMERICSERV != 0 {
            return Err(libc::EAI_NONAME);
        }
    }
    let all: [(c_int, c_int, Option<&CStr>); 3] = [
        (libc::SOCK_STREAM, libc::IPPROTO_TCP, Some(c"tcp")),
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP, Some(c"udp")),
        (libc::SOCK_RAW, 0, None),
    ];
    if hints.ai_socktype != 0 && !all.iter().any(|t| t.0 == hints.ai_socktype) {
        return Err(libc::EAI_SOCKTYPE);
    }
    let mut out = Vec::new();
    for (socktype, protocol, proto_name) in all {
        if hints.ai_socktype != 0 && hints.ai_socktype != socktype {
            continue;
        }
        let protocol = if socktype == libc::SOCK_RAW {
            hints.ai_protocol
        } else if hints.ai_protocol != 0 && hints.ai_protocol != protocol {
            continue;
        } else {
            protocol
        };
        let numeric = service.and_then(|s| s.to_str().ok()?.parse::<u16>().ok());
        let port = match (service, proto_name) {
            (None, _) => 0,
            (Some(_), None) if numeric.is_some() => numeric.unwrap_or(0),
            (Some(_), None) => {
                // glibc answers no raw sockets for a named service.
                if hints.ai_socktype == libc::SOCK_RAW {
                    return Err(libc::EAI_SERVICE);
                }
                continue;
            }
            (Some(s), Some(proto)) => match service_port(s, proto) {
                Some(port) => port,
                None => continue,
            },
        };
        out.push(Template {
            socktype,
            protocol,
            port,
        });
    }
    if out.is_empty() {
        return Err(if hints.ai_socktype != 0 || hints.ai_protocol != 0 {
            libc::EAI_SERVICE
        } else {
            libc::EAI_NONAME
        });
    }
    Ok(out)
}

/// One `addrinfo` in glibc's layout: the socket address right after it.
fn alloc_entry(addr: IpAddr, t: Template, flags: c_int) -> *mut addrinfo {
    let (family, len) = match addr {
        IpAddr::V4(_) => (libc::AF_INET, std::mem::size_of::<libc::sockaddr_in>()),
        IpAddr::V6(_) => (libc::AF_INET6, std::mem::size_of::<libc::sockaddr_in6>()),
    };
    // SAFETY: calloc of a positive size; checked for null below.
    let ai = unsafe { libc::calloc(1, std::mem::size_of::<addrinfo>() + len) } as *mut addrinfo;
    if ai.is_null() {
        return ai;
    }
    // SAFETY: `ai` points to a zeroed block holding an addrinfo followed by `len`
    // bytes (malloc alignment suits both structs; addrinfo's size is a multiple of 8).
    unsafe {
        let sa = ai.add(1).cast::<u8>();
        match addr {
            IpAddr::V4(v4) => {
                let sin = sa.cast::<libc::sockaddr_in>();
                (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
                (*sin).sin_port = t.port.to_be();
                (*sin).sin_addr.s_addr = u32::from(v4).to_be();
            }
            IpAddr::V6(v6) => {
                let sin6 = sa.cast::<libc::sockaddr_in6>();
                (*sin6).sin6_family = libc::AF_INET6 as libc::sa_family_t;
                (*sin6).sin6_port = t.port.to_be();
                (*sin6).sin6_addr.s6_addr = v6.octets();
            }
        }
        (*ai).ai_flags = flags;
        (*ai).ai_family = family;
        (*ai).ai_socktype = t.socktype;
        (*ai).ai_protocol = t.protocol;
        (*ai).ai_addrlen = len as libc::socklen_t;
        (*ai).ai_addr = sa.cast();
    }
    ai
}

/// Frees a list built by [`build_list`].
///
/// # Safety
///
/// `list` must be a list from [`build_list`] not freed yet.
unsafe fn free_list(mut list: *mut addrinfo) {
    while !list.is_null() {
        // SAFETY: every node and canonical name came from malloc/calloc/strdup.
        unsafe {
            let next = (*list).ai_next;
            libc::free((*list).ai_canonname.cast());
            libc::free(list.cast());
            list = next;
        }
    }
}

/// Builds the `addrinfo` list for `addrs` × `templates`; null when out of memory.
fn build_list(
    addrs: &[IpAddr],
    templates: &[Template],
    flags: c_int,
    canon: Option<&str>,
) -> *mut addrinfo {
    let mut head: *mut addrinfo = std::ptr::null_mut();
    let mut tail: *mut addrinfo = std::ptr::null_mut();
    for addr in addrs {
        for t in templates {
            let ai = alloc_entry(*addr, *t, flags);
            if ai.is_null() {
                // SAFETY: the partial list is ours.
                unsafe { free_list(head) };
                return std::ptr::null_mut();
            }
            if tail.is_null() {
                head = ai;
            } else {
                // SAFETY: `tail` is the last node we allocated.
                unsafe { (*tail).ai_next = ai };
            }
            tail = ai;
        }
    }
    if let (Some(canon), false) = (canon, head.is_null())
        && let Ok(c) = CString::new(canon)
    {
        // SAFETY: `c` is a C string; `head` is ours.
        unsafe { (*head).ai_canonname = libc::strdup(c.as_ptr()) };
    }
    head
}

/// `getaddrinfo` through the agent.
///
/// # Safety
///
/// The arguments as `getaddrinfo(3)` requires.
unsafe fn getaddrinfo_remote(
    node: *const c_char,
    service: *const c_char,
    hints: *const addrinfo,
) -> Gai {
    // SAFETY: forwarded contract.
    let Some(host) = (unsafe { remote_name(node) }) else {
        return Gai::Local;
    };
    let hints: addrinfo = if hints.is_null() {
        // SAFETY: plain old data.
        let mut h: addrinfo = unsafe { std::mem::zeroed() };
        h.ai_flags = libc::AI_V4MAPPED | libc::AI_ADDRCONFIG;
        h
    } else {
        // SAFETY: the caller's hints.
        unsafe { std::ptr::read(hints) }
    };
    let flags = hints.ai_flags;
    if flags & libc::AI_NUMERICHOST != 0 {
        return Gai::Local;
    }
    let mapped = flags & libc::AI_V4MAPPED != 0;
    let query = match hints.ai_family {
        libc::AF_UNSPEC => AddressFamily::Any,
        libc::AF_INET => AddressFamily::V4,
        libc::AF_INET6 if mapped => AddressFamily::Any,
        libc::AF_INET6 => AddressFamily::V6,
        _ => return Gai::Local,
    };
    // SAFETY: forwarded contract.
    let templates = match unsafe { templates(&hints, service) } {
        Ok(t) => t,
        Err(e) => return Gai::Error(e),
    };
    let (addrs, canonical) = match resolve(&host, query) {
        Ok(r) => r,
        Err(RemoteError::NoName) => return Gai::Error(libc::EAI_NONAME),
        Err(RemoteError::TryAgain) => return Gai::Error(libc::EAI_AGAIN),
        Err(RemoteError::Os(errno)) => {
            crate::guard::set_errno(errno);
            return Gai::Error(libc::EAI_SYSTEM);
        }
        Err(_) => return Gai::Error(libc::EAI_FAIL),
    };
    let addrs: Vec<IpAddr> = match hints.ai_family {
        libc::AF_INET => addrs.into_iter().filter(IpAddr::is_ipv4).collect(),
        libc::AF_INET6 => {
            let v6: Vec<IpAddr> = addrs.iter().copied().filter(IpAddr::is_ipv6).collect();
            if mapped && (v6.is_empty() || flags & libc::AI_ALL != 0) {
                let v4 = addrs.iter().filter_map(|a| match a {
                    IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
                    IpAddr::V6(_) => None,
                });
                v6.iter().copied().chain(v4).collect()
            } else {
                v6
            }
        }
        _ => addrs,
    };
    if addrs.is_empty() {
        return Gai::Error(libc::EAI_NONAME);
    }
    let canon = (flags & libc::AI_CANONNAME != 0).then(|| canonical.as_deref().unwrap_or(&host));
    let list = build_list(&addrs, &templates, flags, canon);
    if list.is_null() {
        return Gai::Error(libc::EAI_MEMORY);
    }
    let mut set = lists();
    set.get_or_insert_with(HashSet::new).insert(list as usize);
    Gai::List(list)
}

/// `getaddrinfo(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getaddrinfo(
    node: *const c_char,
    service: *const c_char,
    hints: *const addrinfo,
    res: *mut *mut addrinfo,
) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(getaddrinfo(node, service, hints, res)
            : fn(*const c_char, *const c_char, *const addrinfo, *mut *mut addrinfo) -> c_int,
            missing = libc::EAI_SYSTEM)
    };
    if node.is_null() || !dns_enabled() {
        return real();
    }
    hooked(real, || {
        // SAFETY: the caller's arguments.
        match unsafe { getaddrinfo_remote(node, service, hints) } {
            Gai::Local => real(),
            Gai::Error(e) => e,
            Gai::List(list) => {
                // SAFETY: the caller's result pointer.
                unsafe { *res = list };
                0
            }
        }
    })
}

/// `freeaddrinfo(3)`: our lists are freed here, libc's by libc.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn freeaddrinfo(res: *mut addrinfo) {
    // SAFETY: forwards the caller's argument unchanged.
    let real = || unsafe { real!(freeaddrinfo(res): fn(*mut addrinfo) -> (), missing = ()) };
    if res.is_null() {
        return;
    }
    hooked(real, || {
        let ours = lists().as_mut().is_some_and(|s| s.remove(&(res as usize)));
        if ours {
            // SAFETY: a list we built and the program hands back once.
            unsafe { free_list(res) };
        } else {
            real();
        }
    })
}

// ---------------------------------------------------------------- gethostbyname

/// Why a `gethostbyname` lookup failed: the `h_errno` and the `_r` return value.
struct HostError {
    h_errno: c_int,
    ret: c_int,
}

/// Resolves `name` for `af` (`AF_INET` or `AF_INET6`).
fn host_lookup(name: &str, af: c_int) -> Result<(Vec<IpAddr>, String), HostError> {
    let family = if af == libc::AF_INET6 {
        AddressFamily::V6
    } else {
        AddressFamily::V4
    };
    match resolve(name, family) {
        Ok((addrs, canonical)) => {
            let addrs: Vec<IpAddr> = addrs
                .into_iter()
                .filter(|a| a.is_ipv6() == (af == libc::AF_INET6))
                .collect();
            if addrs.is_empty() {
                Err(HostError {
                    h_errno: NO_DATA,
                    ret: 0,
                })
            } else {
                Ok((addrs, canonical.unwrap_or_else(|| name.to_owned())))
            }
        }
        Err(RemoteError::NoName) => Err(HostError {
            h_errno: HOST_NOT_FOUND,
            ret: 0,
        }),
        Err(RemoteError::TryAgain) => Err(HostError {
            h_errno: TRY_AGAIN,
            ret: libc::EAGAIN,
        }),
        Err(RemoteError::Os(errno)) => Err(HostError {
            h_errno: NETDB_INTERNAL,
            ret: errno,
        }),
        Err(_) => Err(HostError {
            h_errno: NO_RECOVERY,
            ret: libc::EIO,
        }),
    }
}

fn octets(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Fills `ret` with pointers into `buf` (glibc's `_r` layout); `false` when
/// `buflen` is too small.
///
/// # Safety
///
/// `ret` must be writable, `buf` valid for `buflen` bytes.
unsafe fn fill_hostent(
    ret: *mut hostent,
    buf: *mut c_char,
    buflen: size_t,
    name: &str,
    af: c_int,
    addrs: &[IpAddr],
) -> bool {
    let ptr = std::mem::size_of::<*mut c_char>();
    let addr_len = if af == libc::AF_INET6 { 16 } else { 4 };
    let misalign = (buf as usize).wrapping_neg() % ptr;
    let pointers = (1 + addrs.len() + 1) * ptr;
    let need = misalign + pointers + addrs.len() * addr_len + name.len() + 1;
    if buf.is_null() || buflen < need {
        return false;
    }
    // SAFETY: `need` ≤ `buflen` bytes of `buf` are written, pointer arrays at an
    // aligned offset; `ret` is the caller's writable hostent.
    unsafe {
        let base = buf.cast::<u8>().add(misalign);
        let aliases = base.cast::<*mut c_char>();
        *aliases = std::ptr::null_mut();
        let list = aliases.add(1);
        let mut data = base.add(pointers);
        for (i, addr) in addrs.iter().enumerate() {
            let bytes = octets(addr);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), data, addr_len);
            *list.add(i) = data.cast();
            data = data.add(addr_len);
        }
        *list.add(addrs.len()) = std::ptr::null_mut();
        std::ptr::copy_nonoverlapping(name.as_ptr(), data, name.len());
        *data.add(name.len()) = 0;
        (*ret).h_name = data.cast();
        (*ret).h_aliases = aliases;
        (*ret).h_addrtype = af;
        (*ret).h_length = addr_len as c_int;
        (*ret).h_addr_list = list;
    }
    true
}

/// What a `gethostbyname*` hook comes to.
enum Host {
    Local,
    /// The `_r` return value (0 on success), with `h_errno` set through `h_errnop`.
    Done(c_int),
}

/// `gethostbyname2_r` through the agent.
///
/// # Safety
///
/// The arguments as `gethostbyname2_r(3)` requires.
unsafe fn gethostbyname_r_remote(
    name: *const c_char,
    af: c_int,
    ret: *mut hostent,
    buf: *mut c_char,
    buflen: size_t,
    result: *mut *mut hostent,
    h_errnop: *mut c_int,
) -> Host {
    if af != libc::AF_INET && af != libc::AF_INET6 {
        return Host::Local;
    }
    // SAFETY: forwarded contract.
    let Some(host) = (unsafe { remote_name(name) }) else {
        return Host::Local;
    };
    // SAFETY: the caller's out-pointers.
    let set = |r: *mut hostent, h: c_int| unsafe {
        if !result.is_null() {
            *result = r;
        }
        if !h_errnop.is_null() {
            *h_errnop = h;
        }
    };
    match host_lookup(&host, af) {
        Ok((addrs, canonical)) => {
            // SAFETY: the caller's hostent and buffer.
            if unsafe { fill_hostent(ret, buf, buflen, &canonical, af, &addrs) } {
                set(ret, 0);
                Host::Done(0)
            } else {
                set(std::ptr::null_mut(), NETDB_INTERNAL);
                crate::guard::set_errno(libc::ERANGE);
                Host::Done(libc::ERANGE)
            }
        }
        Err(e) => {
            set(std::ptr::null_mut(), e.h_errno);
            Host::Done(e.ret)
        }
    }
}

/// `gethostbyname2_r(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname2_r(
    name: *const c_char,
    af: c_int,
    ret: *mut hostent,
    buf: *mut c_char,
    buflen: size_t,
    result: *mut *mut hostent,
    h_errnop: *mut c_int,
) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(gethostbyname2_r(name, af, ret, buf, buflen, result, h_errnop)
            : fn(*const c_char, c_int, *mut hostent, *mut c_char, size_t, *mut *mut hostent, *mut c_int) -> c_int,
            missing = libc::ENOSYS)
    };
    if name.is_null() || !dns_enabled() {
        return real();
    }
    hooked(real, || {
        // SAFETY: the caller's arguments.
        match unsafe { gethostbyname_r_remote(name, af, ret, buf, buflen, result, h_errnop) } {
            Host::Local => real(),
            Host::Done(rc) => rc,
        }
    })
}

/// `gethostbyname_r(3)`: IPv4.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname_r(
    name: *const c_char,
    ret: *mut hostent,
    buf: *mut c_char,
    buflen: size_t,
    result: *mut *mut hostent,
    h_errnop: *mut c_int,
) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(gethostbyname_r(name, ret, buf, buflen, result, h_errnop)
            : fn(*const c_char, *mut hostent, *mut c_char, size_t, *mut *mut hostent, *mut c_int) -> c_int,
            missing = libc::ENOSYS)
    };
    if name.is_null() || !dns_enabled() {
        return real();
    }
    hooked(real, || {
        // SAFETY: the caller's arguments.
        match unsafe {
            gethostbyname_r_remote(name, libc::AF_INET, ret, buf, buflen, result, h_errnop)
        } {
            Host::Local => real(),
            Host::Done(rc) => rc,
        }
    })
}

/// Per-thread storage of the non-reentrant calls' answer (glibc uses one static
/// buffer; one per thread is at least as safe).
struct HostStorage {
    ent: hostent,
    buf: Vec<c_char>,
}

thread_local! {
    static HOST_STORAGE: RefCell<Option<Box<HostStorage>>> = const { RefCell::new(None) };
}

/// `gethostbyname2` through the agent, into the thread's storage.
///
/// # Safety
///
/// `name` must be null or a C string.
unsafe fn gethostbyname_remote(name: *const c_char, af: c_int) -> Option<*mut hostent> {
    HOST_STORAGE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let storage = slot.get_or_insert_with(|| {
            Box::new(HostStorage {
                // SAFETY: plain old data.
                ent: unsafe { std::mem::zeroed() },
                buf: vec![0; 1024],
            })
        });
        loop {
            let mut result: *mut hostent = std::ptr::null_mut();
            let mut h: c_int = 0;
            // SAFETY: our own hostent and buffer, valid out-pointers.
            let outcome = unsafe {
                gethostbyname_r_remote(
                    name,
                    af,
                    &mut storage.ent,
                    storage.buf.as_mut_ptr(),
                    storage.buf.len(),
                    &mut result,
                    &mut h,
                )
            };
            match outcome {
                Host::Local => return None,
                Host::Done(libc::ERANGE) if storage.buf.len() < 1 << 20 => {
                    let len = storage.buf.len() * 4;
                    storage.buf.resize(len, 0);
                }
                Host::Done(_) => {
                    set_h_errno(h);
                    return Some(result);
                }
            }
        }
    })
}

/// `gethostbyname2(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname2(name: *const c_char, af: c_int) -> *mut hostent {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(gethostbyname2(name, af): fn(*const c_char, c_int) -> *mut hostent, missing = std::ptr::null_mut())
    };
    if name.is_null() || !dns_enabled() {
        return real();
    }
    hooked(real, || {
        // SAFETY: the caller's name.
        unsafe { gethostbyname_remote(name, af) }.unwrap_or_else(real)
    })
}

/// `gethostbyname(3)`: IPv4.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname(name: *const c_char) -> *mut hostent {
    // SAFETY: forwards the caller's argument unchanged.
    let real = || unsafe {
        real!(gethostbyname(name): fn(*const c_char) -> *mut hostent, missing = std::ptr::null_mut())
    };
    if name.is_null() || !dns_enabled() {
        return real();
    }
    hooked(real, || {
        // SAFETY: the caller's name.
        unsafe { gethostbyname_remote(name, libc::AF_INET) }.unwrap_or_else(real)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostent_layout_and_erange() {
        let addrs: Vec<IpAddr> = vec!["198.18.7.7".parse().unwrap(), "198.18.7.8".parse().unwrap()];
        // SAFETY: plain old data.
        let mut ent: hostent = unsafe { std::mem::zeroed() };
        let mut small = [0 as c_char; 16];
        // SAFETY: valid hostent and buffer.
        assert!(!unsafe {
            fill_hostent(
                &mut ent,
                small.as_mut_ptr(),
                small.len(),
                "a.test",
                libc::AF_INET,
                &addrs,
            )
        });
        let mut buf = [0 as c_char; 256];
        // SAFETY: valid hostent and buffer.
        assert!(unsafe {
            fill_hostent(
                &mut ent,
                buf.as_mut_ptr().wrapping_add(1),
                255,
                "a.test",
                libc::AF_INET,
                &addrs,
            )
        });
        // SAFETY: just filled.
        unsafe {
            assert_eq!(CStr::from_ptr(ent.h_name).to_str().unwrap(), "a.test");
            assert!((*ent.h_aliases).is_null());
            let a0 = std::slice::from_raw_parts(*ent.h_addr_list as *const u8, 4);
            assert_eq!(a0, &[198, 18, 7, 7]);
            let a1 = std::slice::from_raw_parts(*ent.h_addr_list.add(1) as *const u8, 4);
            assert_eq!(a1, &[198, 18, 7, 8]);
            assert!((*ent.h_addr_list.add(2)).is_null());
        }
    }

    #[test]
    fn lists_are_glibc_shaped() {
        let t = Template {
            socktype: libc::SOCK_STREAM,
            protocol: libc::IPPROTO_TCP,
            port: 80,
        };
        let addrs: Vec<IpAddr> = vec!["198.18.7.7".parse().unwrap(), "::1".parse().unwrap()];
        let list = build_list(&addrs, &[t], libc::AI_CANONNAME, Some("c.test"));
        // SAFETY: a list we just built.
        unsafe {
            assert_eq!((*list).ai_family, libc::AF_INET);
            assert_eq!(
                CStr::from_ptr((*list).ai_canonname).to_str().unwrap(),
                "c.test"
            );
            let sin = &*((*list).ai_addr as *const libc::sockaddr_in);
            assert_eq!(u16::from_be(sin.sin_port), 80);
            let second = (*list).ai_next;
            assert_eq!((*second).ai_family, libc::AF_INET6);
            assert!((*second).ai_next.is_null());
            free_list(list);
        }
    }
}

#[cfg(test)]
mod template_tests {
    use super::*;

    #[test]
    fn numeric_service_includes_raw() {
        // SAFETY: plain old data.
        let hints: addrinfo = unsafe { std::mem::zeroed() };
        // SAFETY: a C string.
        let t = unsafe { templates(&hints, c"53".as_ptr()) }.unwrap();
        assert_eq!(t.len(), 3);
    }
}
