//! Direct listeners (a local target, `LayerResponse::ListenDirect`): while
//! this session alone steals a port without a filter, the agent redirects the
//! port's connections to a listener of its own in the target's network
//! namespace and the proxy passes that listening socket with the answer to
//! `Listen` (two listening sockets: IPv4, and IPv6 where the port has an IPv6
//! one; "the direct listener" below is the pair). The program then accepts
//! the stolen connections from it itself:
//! the kernel's socket, with no accept by the agent, no hand-over through the
//! proxy and no loopback connection per stolen connection.
//!
//! The program keeps its own listener (local clients, and the connections the
//! agent still hands over, come there), and the layer makes the pair look
//! like that one listener:
//!
//! - `epoll_ctl` of the program's listener is repeated for the direct one,
//!   with the same event and data, so the program's `epoll_wait` reports
//!   either as its listener;
//! - `poll` and `ppoll` watch the direct listener beside the program's, and
//!   report its readiness as the program's;
//! - `accept` and `accept4` take a waiting connection of the direct listener
//!   first, then the program's; a blocking one waits for both.
//!
//! Once the program waits in one of these ways, the layer says so
//! (`LayerRequest::DirectAttached`) and the agent, which took every
//! connection until then, takes only those left waiting (a program that
//! waits in `select`, which is not hooked, is served by the agent).
//!
//! A connection taken from the direct listener must have come through the
//! redirect of the stolen port: its original destination (`SO_ORIGINAL_DST`,
//! netfilter's conntrack) names that port. One that names another port came
//! to the listener's own port from inside the target's namespace (a process
//! in the pod that found the port): it is reset, never handed to the program.
//! A direct listener that stops listening (the agent shut it down at the end
//! of the session: `accept` fails with `EINVAL`, `poll` reports `POLLHUP`) is
//! dropped, and the program's own listener goes on alone.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::{
        fd::{IntoRawFd, OwnedFd},
        raw::{c_int, c_void},
    },
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use graft_protocol::layer::LayerRequest;
use libc::{sockaddr, socklen_t};

use crate::{
    addr::{self, RawAddr},
    client,
    fds::{self, FdKind},
    guard::{errno, set_errno},
};

/// The layer's descriptors of a direct listener's sockets: IPv4, and IPv6
/// or -1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Listeners([c_int; 2]);

impl Listeners {
    /// The descriptors, with their index (0: IPv4, 1: IPv6).
    fn each(self) -> impl Iterator<Item = (usize, c_int)> {
        self.0.into_iter().enumerate().filter(|&(_, fd)| fd >= 0)
    }

    fn contains(self, fd: c_int) -> bool {
        fd >= 0 && self.0.contains(&fd)
    }
}

/// The direct listener of one of the program's listeners.
struct Direct {
    /// The layer's descriptors of the listening sockets.
    listeners: Listeners,
    /// The target's port it receives.
    remote_port: u16,
    /// The program's listener's address family (`SO_DOMAIN`), in which
    /// `accept` reports a client's address.
    family: c_int,
    /// The `epoll` sets it was added to beside the program's listener, with
    /// the process that added it: a set survives `fork` in both processes
    /// (one epoll instance), so a child that closes its copies must not take
    /// the listener out of its parent's set.
    sets: Vec<(c_int, u32)>,
    /// The proxy was told that the program waits on it.
    attached: bool,
    /// The options of the program's listener that a connection accepted from
    /// each of the direct listener's sockets must be given ([`options_of`]);
    /// read at its first, and again after the program changes one.
    options: [Option<Vec<SetOption>>; 2],
}

/// A socket option to set: level, name and value, as setsockopt(2) takes them.
type SetOption = (c_int, c_int, Vec<u8>);

/// The options of [`super::passed::COPIED_OPTIONS`] whose value on the
/// program's listener `fd` differs from the direct listener's: a connection
/// accepted from a listener inherits its options (tcp(7), socket(7)), so these
/// are what the program's choices would have given its connections.
/// `SO_REUSEADDR` and `SO_REUSEPORT` are left out: they mean nothing on a
/// connected socket. Read at the first connection, and again at the next one
/// after the program sets one of them on its listener ([`option_changed`]),
/// so that a stolen connection costs one `setsockopt` per option the program
/// changed, not a read and a write of every option (30 system calls).
fn options_of(fd: c_int, listener: c_int) -> Vec<SetOption> {
    super::passed::COPIED_OPTIONS
        .iter()
        .filter(|&&(level, name)| {
            !(level == libc::SOL_SOCKET
                && (name == libc::SO_REUSEADDR || name == libc::SO_REUSEPORT))
        })
        .filter_map(|&(level, name)| {
            let wanted = super::passed::option(fd, level, name)?;
            let inherited = super::passed::option(listener, level, name)?;
            (wanted != inherited).then_some((level, name, wanted))
        })
        .collect()
}

/// The program set option `(level, name)` on its listener `fd`: when the
/// option is one a connection inherits ([`options_of`]), the options are read
/// again at the next connection, so connections accepted after the change get
/// it as they would from the program's own listener.
fn option_changed(fd: c_int, level: c_int, name: c_int) {
    if !super::passed::COPIED_OPTIONS.contains(&(level, name)) {
        return;
    }
    let reset = table()
        .get_mut(&fd)
        .map(|direct| direct.options = [None, None])
        .is_some();
    if reset {
        layer_log!(
            debug,
            "listener {fd}: option {level}/{name} changed, read again at the next connection"
        );
    }
}

/// `setsockopt(2)`: [`option_changed`] when the program changes an option of
/// a listener that has a direct listener; one load when none has.
///
/// # Safety
///
/// As setsockopt(2): `value` points to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *const c_void,
    len: socklen_t,
) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(setsockopt(fd, level, name, value, len): fn(c_int, c_int, c_int, *const c_void, socklen_t) -> c_int)
    };
    if !any() {
        return real();
    }
    crate::guard::hooked(real, || {
        let r = real();
        if r == 0 {
            option_changed(fd, level, name);
        }
        r
    })
}

/// Gives the socket `new`, accepted from the direct listener's socket
/// `listener` (at `index` of its [`Listeners`]), the options of
/// [`options_of`] of `fd`.
fn set_options(fd: c_int, index: usize, listener: c_int, new: c_int) {
    let options = {
        let mut table = table();
        let Some(direct) = table.get_mut(&fd) else {
            return;
        };
        direct.options[index]
            .get_or_insert_with(|| options_of(fd, listener))
            .clone()
    };
    for (level, name, value) in options {
        super::passed::set_option(new, level, name, &value);
    }
}

/// Direct listeners by the program's listener descriptor.
static DIRECT: Mutex<BTreeMap<c_int, Direct>> = Mutex::new(BTreeMap::new());

/// Whether any direct listener exists: the hooks' fast path.
static ANY: AtomicBool = AtomicBool::new(false);

fn table() -> MutexGuard<'static, BTreeMap<c_int, Direct>> {
    // Every mutation is a single insert, remove or field store: a poisoned
    // map is still whole.
    DIRECT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether some listener of the program has a direct listener (one load).
#[inline]
pub(super) fn any() -> bool {
    ANY.load(Ordering::Relaxed)
}

fn real_fcntl(fd: c_int, cmd: c_int, arg: c_int) -> c_int {
    // SAFETY: F_GETFD/F_SETFD/F_GETFL/F_SETFL take an int and touch nothing else.
    unsafe { real!(fcntl(fd, cmd, arg as libc::c_ulong): fn(c_int, c_int, libc::c_ulong) -> c_int) }
}

fn real_close(fd: c_int) {
    // SAFETY: closes a descriptor the layer owns.
    unsafe { real!(close(fd): fn(c_int) -> c_int) };
}

fn real_ctl(epfd: c_int, op: c_int, fd: c_int, event: *mut libc::epoll_event) -> c_int {
    // SAFETY: `event` obeys epoll_ctl(2)'s contract (the program's, or null for
    // `EPOLL_CTL_DEL`).
    unsafe {
        real!(epoll_ctl(epfd, op, fd, event): fn(c_int, c_int, c_int, *mut libc::epoll_event) -> c_int)
    }
}

/// Gives the program's listener `fd`, which steals `remote_port`, the direct
/// listener `listeners` (IPv4, then IPv6 if passed; more are closed).
pub(super) fn attach(fd: c_int, listeners: Vec<OwnedFd>, remote_port: u16) {
    let mut raw = [-1; 2];
    for (slot, listener) in raw.iter_mut().zip(listeners) {
        let listener = listener.into_raw_fd();
        // Close-on-exec: an image started by `exec` knows nothing of it (the
        // agent serves its connections then). Non-blocking: the layer's
        // `accept` only takes what waits; the agent's descriptor shares the
        // flag anyway.
        real_fcntl(listener, libc::F_SETFD, libc::FD_CLOEXEC);
        let status = real_fcntl(listener, libc::F_GETFL, 0);
        if status >= 0 {
            real_fcntl(listener, libc::F_SETFL, status | libc::O_NONBLOCK);
        }
        *slot = listener;
    }
    let old = table().insert(
        fd,
        Direct {
            listeners: Listeners(raw),
            remote_port,
            family: super::socket_family(fd),
            sets: Vec::new(),
            attached: false,
            options: [None, None],
        },
    );
    if let Some(old) = old {
        drop_listener(old, None);
    }
    ANY.store(true, Ordering::Relaxed);
    layer_log!(
        info,
        "target port {remote_port}: the program accepts its stolen connections straight from the target's network namespace (direct listener, fds {raw:?})"
    );
}

/// What [`of`] tells of a direct listener.
#[derive(Debug, Clone, Copy)]
pub(super) struct Found {
    /// Its descriptors.
    listeners: Listeners,
    /// The target's port it receives.
    remote_port: u16,
    /// The program's listener's address family.
    family: c_int,
}

/// The direct listener of the program's listener `fd`.
pub(super) fn of(fd: c_int) -> Option<Found> {
    if !any() || fd < 0 {
        return None;
    }
    table().get(&fd).map(|direct| Found {
        listeners: direct.listeners,
        remote_port: direct.remote_port,
        family: direct.family,
    })
}

/// Takes the direct listener out of every `epoll` set it joined and closes
/// its descriptors, but `closing` (which the program closes itself).
fn drop_listener(direct: Direct, closing: Option<c_int>) {
    let me = std::process::id();
    let sets: Vec<c_int> = direct
        .sets
        .into_iter()
        .filter(|&(_, pid)| pid == me)
        .map(|(set, _)| set)
        .collect();
    for (_, listener) in direct.listeners.each() {
        for &set in &sets {
            // A set closed since is EBADF: nothing to undo. The kernel would
            // not do it at close: the agent holds the socket too.
            real_ctl(set, libc::EPOLL_CTL_DEL, listener, std::ptr::null_mut());
        }
        if Some(listener) != closing {
            real_close(listener);
        }
    }
}

/// Drops the direct listener of `fd` (it stopped listening).
fn detach(fd: c_int) {
    let removed = table().remove(&fd);
    if let Some(direct) = removed {
        layer_log!(
            debug,
            "target port {}: the direct listener stopped listening; the program's own listener goes on",
            direct.remote_port
        );
        drop_listener(direct, None);
    }
}

/// Before descriptor `fd` closes: the direct listener of a listener that
/// closes goes with it; a direct listener the program closes itself (a loop
/// that closes every descriptor) is dropped, that descriptor not closed
/// twice.
pub(super) fn before_close(fd: c_int) {
    if !any() {
        return;
    }
    let mut table = table();
    if let Some(direct) = table.remove(&fd) {
        drop(table);
        drop_listener(direct, None);
        return;
    }
    let Some(&owner) = table
        .iter()
        .find(|(_, direct)| direct.listeners.contains(fd))
        .map(|(owner, _)| owner)
    else {
        return;
    };
    let direct = table.remove(&owner);
    drop(table);
    if let Some(direct) = direct {
        drop_listener(direct, Some(fd));
    }
}

/// Tells the proxy, once, that the program waits on `fd`'s direct listener.
fn tell_attached(fd: c_int) {
    let port = {
        let mut table = table();
        match table.get_mut(&fd) {
            Some(direct) if !direct.attached => {
                direct.attached = true;
                direct.remote_port
            }
            _ => return,
        }
    };
    layer_log!(
        debug,
        "target port {port}: the program waits on its direct listener"
    );
    let _ = client::request(&LayerRequest::DirectAttached { port });
}

/// After the program's `epoll_ctl(epfd, op, fd, event)` succeeded: the same
/// for `fd`'s direct listener, if it has one.
pub(super) fn mirror_epoll(epfd: c_int, op: c_int, fd: c_int, event: *mut libc::epoll_event) {
    let Some(Found { listeners, .. }) = of(fd) else {
        return;
    };
    // Any socket added: the set is remembered (a family that failed, EEXIST
    // or ENOMEM, only misses its DEL later, which is harmless).
    let mut rc = -1;
    for (_, listener) in listeners.each() {
        if real_ctl(epfd, op, listener, event) == 0 {
            rc = 0;
        }
    }
    {
        let mut table = table();
        let Some(direct) = table.get_mut(&fd) else {
            return;
        };
        match op {
            libc::EPOLL_CTL_ADD if rc == 0 => direct.sets.push((epfd, std::process::id())),
            libc::EPOLL_CTL_DEL => direct.sets.retain(|&(set, _)| set != epfd),
            _ => {}
        }
    }
    if op == libc::EPOLL_CTL_ADD && rc == 0 {
        tell_attached(fd);
    }
}

/// `poll(2)` over `fds` through `call` (the real `poll` or `ppoll`), with the
/// direct listener of each of the program's listeners among them watched
/// too: its readiness is reported as the program's listener's.
///
/// # Safety
///
/// `fds` points to `nfds` valid `pollfd`s, as poll(2) requires.
pub(super) unsafe fn poll_with(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    call: impl Fn(*mut libc::pollfd, libc::nfds_t) -> c_int,
) -> c_int {
    if fds.is_null() || nfds == 0 {
        return call(fds, nfds);
    }
    // SAFETY: the caller's `nfds` pollfds, as poll(2) requires.
    let given = unsafe { std::slice::from_raw_parts_mut(fds, nfds as usize) };
    let extra: Vec<(usize, c_int)> = given
        .iter()
        .enumerate()
        .filter_map(|(i, p)| of(p.fd).map(|found| (i, found.listeners)))
        .flat_map(|(i, listeners)| listeners.each().map(move |(_, listener)| (i, listener)))
        .collect();
    if extra.is_empty() {
        return call(fds, nfds);
    }
    for &(i, _) in &extra {
        tell_attached(given[i].fd);
    }
    let mut all: Vec<libc::pollfd> = given.to_vec();
    all.extend(extra.iter().map(|&(i, listener)| libc::pollfd {
        fd: listener,
        events: given[i].events,
        revents: 0,
    }));
    let rc = call(all.as_mut_ptr(), all.len() as libc::nfds_t);
    if rc < 0 {
        return rc;
    }
    for (k, &(i, _)) in extra.iter().enumerate() {
        let revents = all[given.len() + k].revents;
        if revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            detach(given[i].fd);
        } else {
            all[i].revents |= revents & given[i].events;
        }
    }
    let mut ready = 0;
    for (mine, theirs) in given.iter_mut().zip(&all) {
        mine.revents = theirs.revents;
        ready += c_int::from(mine.revents != 0);
    }
    ready
}

/// The original destination of a redirected connection of `family`
/// (netfilter's conntrack: `SO_ORIGINAL_DST`, linux/netfilter_ipv4.h, for
/// IPv4; `IP6T_SO_ORIGINAL_DST`, linux/netfilter_ipv6/ip6_tables.h, the same
/// number at `SOL_IPV6`, for IPv6).
fn original_dst(fd: c_int, family: c_int) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain old data.
    let mut raw: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let (level, len) = match family {
        libc::AF_INET => (libc::SOL_IP, std::mem::size_of::<libc::sockaddr_in>()),
        libc::AF_INET6 => (libc::SOL_IPV6, std::mem::size_of::<libc::sockaddr_in6>()),
        _ => return None,
    };
    let mut len = len as socklen_t;
    // SAFETY: raw/len describe a writable buffer at least that long.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            libc::SO_ORIGINAL_DST,
            (&raw mut raw).cast::<c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: the kernel wrote a sockaddr of `len` bytes.
    unsafe { addr::from_raw((&raw const raw).cast::<sockaddr>(), len) }
}

/// Closes `fd` with a reset (`SO_LINGER` 0, socket(7)).
fn reset(fd: c_int) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a valid `linger` of the length given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast::<c_void>(),
            std::mem::size_of::<libc::linger>() as socklen_t,
        );
    }
    real_close(fd);
}

/// What [`take`] found on a direct listener.
enum Took {
    /// A stolen connection, at this descriptor.
    Conn(c_int),
    /// Nothing waits (or the listener is gone).
    Empty,
    /// `accept4` failed for the program (`EMFILE`, ...): errno is set.
    Failed,
}

/// Where [`take`] starts among a direct listener's sockets: it alternates,
/// so a busy family cannot starve the other.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Takes a connection waiting on a socket of the direct listener `found` of
/// the program's listener `fd`, with `accept4`'s `flags`, and writes its
/// client's address to the caller's buffer.
///
/// # Safety
///
/// `address`/`len` obey accept(2)'s contract (null or valid).
unsafe fn take(
    fd: c_int,
    found: Found,
    address: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> Took {
    let first = NEXT.fetch_add(1, Ordering::Relaxed);
    for k in 0..2 {
        let index = (first + k) % 2;
        let listener = found.listeners.0[index];
        if listener < 0 {
            continue;
        }
        // SAFETY: as this function's.
        match unsafe { take_from(fd, found, index, listener, address, len, flags) } {
            Took::Empty => {}
            took => return took,
        }
    }
    Took::Empty
}

/// [`take`] from the direct listener's socket `listener`, at `index` of its
/// [`Listeners`].
///
/// # Safety
///
/// As [`take`]'s.
unsafe fn take_from(
    fd: c_int,
    found: Found,
    index: usize,
    listener: c_int,
    address: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> Took {
    loop {
        // SAFETY: sockaddr_storage is plain old data.
        let mut raw: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut raw_len = std::mem::size_of::<libc::sockaddr_storage>() as socklen_t;
        // SAFETY: raw/raw_len describe a writable sockaddr_storage.
        let new = unsafe {
            real!(accept4(listener, (&raw mut raw).cast::<sockaddr>(), &mut raw_len, flags)
                : fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int)
        };
        if new < 0 {
            return match errno() {
                libc::EAGAIN | libc::EINTR => Took::Empty,
                libc::ECONNABORTED => continue,
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => Took::Failed,
                _ => {
                    // EINVAL: no longer listening (shut down by the agent).
                    detach(fd);
                    Took::Empty
                }
            };
        }
        // SAFETY: the kernel wrote `raw_len` bytes of the peer's address.
        let peer = unsafe { addr::from_raw((&raw const raw).cast::<sockaddr>(), raw_len) };
        let remote_port = found.remote_port;
        let original = original_dst(new, c_int::from(raw.ss_family));
        let (Some(peer), Some(original)) = (peer, original.filter(|o| o.port() == remote_port))
        else {
            layer_log!(
                warn,
                "a connection to the direct listener of target port {remote_port} did not come through its redirect (to {original:?}): reset"
            );
            reset(new);
            continue;
        };
        set_options(fd, index, listener, new);
        fds::insert(
            new,
            FdKind::Passed {
                peer,
                shown_local: Some(original),
                sole: true,
            },
        );
        // SAFETY: the caller's buffer obeys accept(2)'s contract.
        unsafe { RawAddr::new(peer, found.family).write_to(address, len) };
        layer_log!(
            debug,
            "stolen connection from {peer}: the target's socket itself as fd {new} (accepted from the direct listener)"
        );
        return Took::Conn(new);
    }
}

/// `accept4` on the program's listener `fd`, whose direct listener is
/// `found` ([`of`]): a connection of the direct listener first, else the
/// program's (`accept_own`, the hook's usual path); a blocking `fd` waits
/// for either.
///
/// # Safety
///
/// `address`/`len` obey accept(2)'s contract (null or valid).
pub(super) unsafe fn accept(
    fd: c_int,
    found: Found,
    address: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
    accept_own: impl Fn() -> c_int,
) -> c_int {
    // The caller's lookup first, then a fresh one after each wait (the
    // direct listener may have gone).
    let mut first = Some(found);
    // Read once nothing waits: a stolen connection costs no `fcntl`.
    let mut blocking = None;
    loop {
        let Some(found) = first.take().or_else(|| of(fd)) else {
            return accept_own();
        };
        // SAFETY: as this function's.
        match unsafe { take(fd, found, address, len, flags) } {
            Took::Conn(new) => return new,
            Took::Failed => return -1,
            Took::Empty => {}
        }
        let blocking = *blocking
            .get_or_insert_with(|| real_fcntl(fd, libc::F_GETFL, 0) & libc::O_NONBLOCK == 0);
        // `take` drops a direct listener that stopped listening.
        let Some(Found { listeners, .. }) = blocking.then(|| of(fd)).flatten() else {
            return accept_own();
        };
        let watch = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // The program's listener, then the direct listener's sockets (-1,
        // which poll(2) skips, for a family it lacks).
        let mut all = [fd, listeners.0[0], listeners.0[1]].map(watch);
        // A program that waited elsewhere (`select`) and calls `accept` once
        // its listener is ready does not wait here: the agent keeps taking
        // the direct listener's connections for it. One that waits here does.
        if real_poll(all.as_mut_ptr(), 3, 0) == 0 {
            tell_attached(fd);
            if real_poll(all.as_mut_ptr(), 3, -1) < 0 && errno() == libc::EINTR {
                set_errno(libc::EINTR);
                return -1;
            }
        }
        if all[1..]
            .iter()
            .any(|p| p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0)
        {
            detach(fd);
        }
        if all[0].revents != 0 {
            return accept_own();
        }
    }
}

/// The real `poll`.
fn real_poll(fds: *mut libc::pollfd, nfds: libc::nfds_t, timeout: c_int) -> c_int {
    // SAFETY: forwards the arguments unchanged; the caller's `fds` obey poll(2).
    unsafe { real!(poll(fds, nfds, timeout): fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int) }
}

/// `poll(2)`: as libc's; a listener with a direct listener is ready when
/// either is.
///
/// # Safety
///
/// As `poll(2)`: `fds` points to `nfds` valid `pollfd`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, nfds: libc::nfds_t, timeout: c_int) -> c_int {
    if !any() {
        return real_poll(fds, nfds, timeout);
    }
    crate::guard::hooked(
        || real_poll(fds, nfds, timeout),
        // SAFETY: the caller's pollfds, as poll(2) requires.
        || unsafe { poll_with(fds, nfds, |set, n| real_poll(set, n, timeout)) },
    )
}

/// `__poll_chk`, which glibc's `poll` becomes under `_FORTIFY_SOURCE` when
/// the array's size is known at compile time: as [`poll`], after the check.
///
/// # Safety
///
/// As `poll(2)`; `fdslen` is the array's size in bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __poll_chk(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    timeout: c_int,
    fdslen: libc::size_t,
) -> c_int {
    if !any() || (fdslen / std::mem::size_of::<libc::pollfd>()) < nfds as usize {
        // SAFETY: forwards the arguments unchanged: glibc's check aborts.
        return unsafe {
            real!(__poll_chk(fds, nfds, timeout, fdslen)
                : fn(*mut libc::pollfd, libc::nfds_t, c_int, libc::size_t) -> c_int)
        };
    }
    // SAFETY: as this function's.
    unsafe { poll(fds, nfds, timeout) }
}

/// `ppoll(2)`: as libc's; a listener with a direct listener is ready when
/// either is.
///
/// # Safety
///
/// As `ppoll(2)`: `fds` points to `nfds` valid `pollfd`s; `timeout` and
/// `sigmask` are null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    timeout: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    let real = |set: *mut libc::pollfd, n: libc::nfds_t| {
        // SAFETY: forwards the caller's timeout and mask unchanged.
        unsafe {
            real!(ppoll(set, n, timeout, sigmask)
                : fn(*mut libc::pollfd, libc::nfds_t, *const libc::timespec, *const libc::sigset_t) -> c_int)
        }
    };
    if !any() {
        return real(fds, nfds);
    }
    // SAFETY: the caller's pollfds, as ppoll(2) requires.
    crate::guard::hooked(|| real(fds, nfds), || unsafe { poll_with(fds, nfds, real) })
}
