//! `epoll` registrations of passed sockets, removed when the program closes
//! them; and of listeners with a direct listener, repeated for it
//! ([`super::direct`]).
//!
//! The kernel keeps an `epoll` registration until every descriptor of its open
//! file description is closed, not the one registered (epoll(7), "Questions
//! and answers", Q6). A passed socket's file description is the agent's, and
//! the agent, then the proxy, hold their own descriptors of it until just after
//! they send it on: a sender preempted between its `sendmsg` and its `close` can
//! outlive a fast program's whole use of the connection. The program's `close`
//! then leaves the registration alive, and the next event on the connection
//! comes back with the registration's stale data (an event loop's freed
//! connection record): the native bench server aborted with "double free or
//! corruption" in a 1000-connection steal. So the layer remembers which `epoll`
//! sets each passed socket joined and removes it from them (`EPOLL_CTL_DEL`)
//! before the program's last descriptor of it closes, as if the program had
//! held the only one. A connection the program accepted from a direct
//! listener itself ([`super::direct`]) is held by the program alone: the
//! kernel ends its registrations at its close, and the layer keeps none.

use std::{
    collections::BTreeMap,
    ffi::c_int,
    sync::{Mutex, MutexGuard},
};

use crate::fds::{self, FdKind};

/// Passed sockets by descriptor, with the `epoll` sets they joined.
static JOINED: Mutex<BTreeMap<c_int, Vec<c_int>>> = Mutex::new(BTreeMap::new());

fn joined() -> MutexGuard<'static, BTreeMap<c_int, Vec<c_int>>> {
    // Every mutation is a single insert or remove: a poisoned map is still whole.
    JOINED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The real `epoll_ctl`.
fn real_ctl(epfd: c_int, op: c_int, fd: c_int, event: *mut libc::epoll_event) -> c_int {
    // SAFETY: forwards the arguments unchanged; `event` obeys epoll_ctl(2)'s
    // contract (the caller's, or null for `EPOLL_CTL_DEL`).
    unsafe {
        real!(epoll_ctl(epfd, op, fd, event): fn(c_int, c_int, c_int, *mut libc::epoll_event) -> c_int)
    }
}

/// `epoll_ctl(2)`: as libc's; an `EPOLL_CTL_ADD` or `EPOLL_CTL_DEL` of a passed
/// socket that succeeds is remembered, and any change to a listener with a
/// direct listener is repeated for that one.
///
/// # Safety
///
/// As `epoll_ctl(2)`: `event` is valid for `EPOLL_CTL_ADD` and `EPOLL_CTL_MOD`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    event: *mut libc::epoll_event,
) -> c_int {
    let real = || real_ctl(epfd, op, fd, event);
    if fds::is_empty()
        || (op != libc::EPOLL_CTL_ADD && op != libc::EPOLL_CTL_DEL && !super::direct::any())
    {
        return real();
    }
    crate::guard::hooked(real, || {
        let rc = real();
        if rc == 0 {
            super::direct::mirror_epoll(epfd, op, fd, event);
        }
        // A socket the program holds alone goes from its sets at its close.
        if rc == 0
            && op != libc::EPOLL_CTL_MOD
            && !fds::is_sole(fd)
            && matches!(fds::get(fd), Some(FdKind::Passed { .. }))
        {
            let mut joined = joined();
            let sets = joined.entry(fd).or_default();
            sets.retain(|&set| set != epfd);
            if op == libc::EPOLL_CTL_ADD {
                sets.push(epfd);
            }
            if sets.is_empty() {
                joined.remove(&fd);
            }
        }
        rc
    })
}

/// Before the passed socket `fd` closes: takes it out of every `epoll` set it
/// joined when `last` (no other descriptor of the program refers to it), and
/// forgets the sets either way.
pub(super) fn before_close(fd: c_int, last: bool) {
    let Some(sets) = joined().remove(&fd) else {
        return;
    };
    if last {
        for set in sets {
            // A set closed since is EBADF, one that dropped it ENOENT: nothing to undo.
            real_ctl(set, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut());
        }
    }
}
