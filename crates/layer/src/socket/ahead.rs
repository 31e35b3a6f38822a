//! Stolen connections passed ahead: sockets the proxy passed with the answer to
//! an earlier `accept` (`PeerOfBatch`), each for a loopback connection that
//! already waits in this process's listener queue. When the program accepts
//! that loopback connection, the layer finds its socket here and needs no round
//! trip to the proxy, so a burst of new connections does not hold the program's
//! event loop one round trip per `accept`.
//!
//! A socket passed ahead belongs to this process alone, so the layer asks for
//! them only where no other process can accept on the same listener:
//!
//! - not on a listener that existed when this process forked, in the parent
//!   or the child (both share it): [`prepare_fork`], a `pthread_atfork(3)`
//!   handler, gives every socket kept here back to the proxy (`ReturnPassed`)
//!   before the `fork` and counts the fork; a listener made since the last
//!   fork ([`listening`]) is this process's alone again (a server that
//!   daemonizes, then listens);
//! - not on a listener with `SO_REUSEPORT` (other processes may listen on the
//!   same port; socket(7));
//! - before an `execve` the sockets go back too ([`give_back`]), since the new
//!   image would close them (they are close-on-exec).
//!
//! Threads of one process that accept on the same listener take turns from
//! the look-up in the table until a batch's sockets are kept ([`accepting`]):
//! otherwise one thread could accept the loopback connection of a socket still
//! on its way to another thread's batch, find nothing, and leave that socket
//! kept for an `accept` that never comes. The `fork` handler takes the same
//! turn, so no batch lands in the parent after it gave its sockets back.
//!
//! A listener closed with sockets kept here for its port closes them
//! ([`drop_port`]): their loopback connections die with the listener, as the
//! kernel's queued connections do. At most [`MAX_AHEAD`] are kept.
//!
//! Limits: a process that hands its listener to another one over a Unix socket
//! (`SCM_RIGHTS`), or forks with `clone(2)` directly (no `pthread_atfork`
//! handlers), shares a listener the proxy batches for; their accepts of a
//! connection passed ahead here are delivered as local connections.

use std::{
    cell::UnsafeCell,
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    sync::{
        Mutex, Once, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use graft_protocol::{
    fdpass::MAX_FDS_PER_SEND,
    layer::{LayerRequest, LayerResponse, PassedPeer},
};

use crate::client;

/// The most sockets one process keeps passed ahead.
pub const MAX_AHEAD: usize = 32;

/// The sockets kept, and the process they belong to.
struct Ahead {
    pid: u32,
    sockets: HashMap<SocketAddr, (PassedPeer, OwnedFd)>,
}

static AHEAD: Mutex<Option<Ahead>> = Mutex::new(None);

/// How many times this process, or a parent it was forked from, forked.
static FORKS: AtomicU64 = AtomicU64::new(0);

/// Each stolen listener's [`FORKS`] when it started listening, by descriptor:
/// a listener is this process's alone while no fork has happened since.
static LISTENERS: Mutex<Option<HashMap<i32, u64>>> = Mutex::new(None);

/// Records that `listener` starts listening now (the `listen` hook).
pub fn listening(listener: i32) {
    let forks = FORKS.load(Ordering::SeqCst);
    LISTENERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(HashMap::new)
        .insert(listener, forks);
}

/// Whether no fork happened since `listener` started listening.
fn unshared(listener: i32) -> bool {
    let forks = FORKS.load(Ordering::SeqCst);
    LISTENERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .and_then(|l| l.get(&listener))
        .is_some_and(|&since| since == forks)
}

static ATFORK: Once = Once::new();

/// The turn of [`accepting`]: a pthread mutex, so that the `fork` handlers can
/// take it in `prepare` and give it back in the parent and the child
/// (pthread_atfork(3)).
struct Turn(UnsafeCell<libc::pthread_mutex_t>);

// SAFETY: the mutex is only used through pthread_mutex_lock/unlock, which are
// thread-safe.
unsafe impl Sync for Turn {}

static TURN: Turn = Turn(UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER));

fn take_turn() {
    // SAFETY: a statically initialised mutex, never moved.
    unsafe { libc::pthread_mutex_lock(TURN.0.get()) };
}

fn give_turn() {
    // SAFETY: called by the thread that holds the turn.
    unsafe { libc::pthread_mutex_unlock(TURN.0.get()) };
}

/// This thread's turn at the table of sockets passed ahead, given back on drop.
pub struct Accepting(());

impl Drop for Accepting {
    fn drop(&mut self) {
        give_turn();
    }
}

/// Waits for this thread's turn to look up, ask for and keep sockets passed
/// ahead for `listener`; `None` when it is shared since a fork, when no batch
/// is asked for and none is kept.
pub fn accepting(listener: i32) -> Option<Accepting> {
    if !unshared(listener) {
        return None;
    }
    take_turn();
    Some(Accepting(()))
}

fn lock() -> std::sync::MutexGuard<'static, Option<Ahead>> {
    AHEAD.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Installs the `fork` handler; called by the layer's constructor.
pub fn init() {
    ATFORK.call_once(|| {
        // SAFETY: registers a plain function without state; pthread_atfork(3)
        // only records the pointers.
        unsafe { libc::pthread_atfork(Some(prepare_fork), Some(give_turn_c), Some(give_turn_c)) };
    });
}

/// Runs in the parent just before `fork`: no socket stays here that the child
/// could accept, and neither process asks for more.
extern "C" fn prepare_fork() {
    // No batch is on its way while the sockets go back; the parent and the
    // child handlers give the turn back.
    take_turn();
    FORKS.fetch_add(1, Ordering::SeqCst);
    let Some(_guard) = crate::guard::enter() else {
        // Forking from inside a hook: the layer's own calls never fork.
        return;
    };
    give_back();
}

extern "C" fn give_turn_c() {
    give_turn();
}

/// How many more sockets this process can take ahead now, for the listener
/// `listener`: 0 on a listener shared since a fork, on a `SO_REUSEPORT`
/// listener, or when [`MAX_AHEAD`] are kept.
pub fn room(listener: i32) -> u8 {
    if !unshared(listener) || reuses_port(listener) {
        return 0;
    }
    let kept = lock()
        .as_ref()
        .filter(|a| a.pid == std::process::id())
        .map_or(0, |a| a.sockets.len());
    let room = MAX_AHEAD.saturating_sub(kept).min(MAX_FDS_PER_SEND - 1);
    u8::try_from(room).unwrap_or(0)
}

fn reuses_port(listener: i32) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value/len describe a writable c_int.
    let rc = unsafe {
        libc::getsockopt(
            listener,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            &mut value as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    rc != 0 || value != 0
}

/// Keeps sockets passed ahead with their connections.
pub fn keep(passed: impl IntoIterator<Item = (PassedPeer, OwnedFd)>) {
    let pid = std::process::id();
    let mut ahead = lock();
    let ahead = match ahead.as_mut() {
        Some(a) if a.pid == pid => a,
        _ => ahead.insert(Ahead {
            pid,
            sockets: HashMap::new(),
        }),
    };
    for (peer, fd) in passed {
        ahead.sockets.insert(peer.proxy_side, (peer, fd));
    }
}

/// The socket kept for the loopback connection whose proxy side is
/// `proxy_side`, taken.
pub fn take(proxy_side: SocketAddr) -> Option<(PassedPeer, OwnedFd)> {
    let mut ahead = lock();
    let ahead = ahead.as_mut().filter(|a| a.pid == std::process::id())?;
    ahead.sockets.remove(&proxy_side)
}

/// Closes the sockets kept for `port`: its listener `listener` is closed.
pub fn drop_port(listener: i32, port: u16) {
    if let Some(listeners) = LISTENERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
    {
        listeners.remove(&listener);
    }
    let mut ahead = lock();
    if let Some(ahead) = ahead.as_mut().filter(|a| a.pid == std::process::id()) {
        ahead.sockets.retain(|_, (peer, _)| peer.port != port);
    }
}

/// Gives every socket kept here back to the proxy (`ReturnPassed`), for
/// whichever process accepts their loopback connections; those the proxy
/// cannot take back are closed.
pub fn give_back() {
    let taken: Vec<(PassedPeer, OwnedFd)> = {
        let mut ahead = lock();
        match ahead.as_mut() {
            Some(a) if a.pid == std::process::id() => a.sockets.drain().map(|(_, v)| v).collect(),
            _ => return,
        }
    };
    for chunk in taken.chunks(MAX_FDS_PER_SEND) {
        let peers: Vec<PassedPeer> = chunk.iter().map(|(peer, _)| *peer).collect();
        let fds: Vec<_> = chunk.iter().map(|(_, fd)| fd.as_fd()).collect();
        match client::request_with_fds(&LayerRequest::ReturnPassed(peers), &fds) {
            Ok(LayerResponse::Ok) => {
                layer_log!(
                    debug,
                    "gave {} stolen connections passed ahead back to the proxy",
                    chunk.len()
                )
            }
            other => layer_log!(
                warn,
                "the proxy did not take back {} stolen connections passed ahead ({other:?}); closed",
                chunk.len()
            ),
        }
    }
}
