//! Stolen connections that the agent passed as their sockets (a local target,
//! `ClientMessage::SubscribeFds`): the program's listener still accepts one
//! loopback connection from the proxy per stolen connection, which wakes its
//! `accept` where it waits (blocking, `poll`, `epoll`); the layer then asks
//! `PeerOf` that connection's address, takes the target's socket instead
//! ([`Shared::take_passed`]) and puts it at the accepted descriptor's number.
//!
//! A loopback connection the layer never claims (a program that accepts
//! without libc's `accept`) is not lost: once the program writes or closes on
//! it, or after `relay_timeout` unclaimed (for a protocol whose client speaks
//! first), the proxy splices it with the passed socket in the kernel's stead.
//!
//! A burst of stolen connections would cost the program one round trip per
//! `accept`, each while its event loop waits. So a process that alone accepts
//! on its listener asks with `PeerOfBatch`, and the proxy passes, beside the
//! socket asked for, up to seven more of the same port whose loopback
//! connections already wait in the listener's queue ([`Shared::take_ready`]):
//! their `accept`s find them in the layer without asking. A socket passed ahead
//! belongs to that process alone; one it will not accept (it forks or execs
//! first) comes back with `ReturnPassed` ([`Shared::give_back`]) before the
//! `fork`, so a child that accepts its loopback connection finds it here.

use std::{
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::{Arc, atomic::Ordering},
};

use graft_protocol::{
    fdpass::reset,
    layer::{DeliveredPeer, PassedPeer},
};
use tokio::net::{TcpSocket, TcpStream};

use super::{Shared, lock, shared::delivery_address};

impl Shared {
    /// A stolen connection of `port` passed as `fd`: delivered to the port's
    /// local listener, or closed when the port has none (any more).
    pub(super) fn incoming_fd(self: &Arc<Self>, port: u16, peer: DeliveredPeer, fd: OwnedFd) {
        match self.listener_of(port) {
            Some(listener) => {
                let target = delivery_address(listener);
                tokio::spawn(deliver_fd(self.clone(), target, port, peer, fd));
            }
            None => tracing::info!(
                port,
                client = %peer.peer,
                "a passed stolen connection for a port nobody listens on (locally); closed"
            ),
        }
    }

    /// Resets every passed socket that waits for the program's `accept`. Called
    /// before the link ends: the agent removes its rules then, and with them
    /// the NAT that translates a redirected connection's packets (its client
    /// would never see a reset sent after that, and would wait forever).
    pub(crate) fn reset_passed(&self) {
        let waiting: Vec<Passed> = lock(&self.passed).drain().map(|(_, p)| p).collect();
        if !waiting.is_empty() {
            tracing::debug!(
                connections = waiting.len(),
                "the session ends: passed stolen connections not accepted yet are reset"
            );
        }
        for passed in waiting {
            reset(passed.fd);
        }
    }

    /// The passed socket of the delivered connection whose proxy-side address is
    /// `proxy_side`, in this session or a secondary one (with the session it was
    /// found in); each is taken once.
    pub(crate) fn take_passed(
        self: &Arc<Self>,
        proxy_side: SocketAddr,
    ) -> Option<(Arc<Shared>, PassedPeer, OwnedFd)> {
        let here = |shared: &Arc<Shared>| {
            let mut passed = lock(&shared.passed);
            let (key, entry) = match passed.remove_entry(&proxy_side) {
                Some(found) => found,
                None => {
                    // A dual-stack listener may report an IPv4 peer as IPv4-mapped IPv6.
                    let SocketAddr::V6(v6) = proxy_side else {
                        return None;
                    };
                    let v4 = SocketAddr::new(v6.ip().to_ipv4_mapped()?.into(), proxy_side.port());
                    passed.remove_entry(&v4)?
                }
            };
            let peer = PassedPeer {
                proxy_side: key,
                port: entry.port,
                delivered: entry.peer,
            };
            Some((shared.clone(), peer, entry.fd))
        };
        here(self).or_else(|| {
            let secondaries = lock(&self.secondaries).clone();
            secondaries.iter().find_map(here)
        })
    }

    /// Up to `max` passed sockets of `port` whose loopback connection already
    /// waits in the program's listener queue, taken to pass ahead
    /// (`PeerOfBatch`), oldest first.
    pub(crate) fn take_ready(&self, port: u16, max: usize) -> Vec<(PassedPeer, OwnedFd)> {
        let mut passed = lock(&self.passed);
        let mut ready: Vec<(SocketAddr, u64)> = passed
            .iter()
            .filter(|(_, entry)| entry.port == port && entry.connected)
            .map(|(key, entry)| (*key, entry.serial))
            .collect();
        ready.sort_by_key(|&(_, serial)| serial);
        ready
            .into_iter()
            .take(max)
            .filter_map(|(key, _)| {
                let entry = passed.remove(&key)?;
                let peer = PassedPeer {
                    proxy_side: key,
                    port: entry.port,
                    delivered: entry.peer,
                };
                Some((peer, entry.fd))
            })
            .collect()
    }

    /// Keeps again a passed socket the layer took ahead and gave back
    /// (`ReturnPassed`), for whichever process accepts its loopback connection.
    pub(crate) fn give_back(&self, peer: PassedPeer, fd: OwnedFd) {
        let serial = self.passed_serial.fetch_add(1, Ordering::Relaxed);
        lock(&self.passed).insert(
            peer.proxy_side,
            Passed {
                peer: peer.delivered,
                fd,
                port: peer.port,
                connected: true,
                serial,
            },
        );
    }
}

/// A stolen connection passed as its socket, until the layer takes it.
#[derive(Debug)]
pub(crate) struct Passed {
    /// Its addresses as the target saw them.
    peer: DeliveredPeer,
    /// The target's socket.
    fd: OwnedFd,
    /// The target's stolen port.
    port: u16,
    /// The proxy's loopback connection is established: it waits in the
    /// program's listener queue (or was accepted).
    connected: bool,
    /// Arrival order, so a batch passes the oldest first.
    serial: u64,
}

/// Connects to the program's listener at `target` and keeps the passed socket
/// `fd` for the layer to claim; splices the two if the program uses the
/// loopback connection instead.
async fn deliver_fd(
    shared: Arc<Shared>,
    target: SocketAddr,
    port: u16,
    peer: DeliveredPeer,
    fd: OwnedFd,
) {
    if shared
        .options
        .incoming_tap
        .as_ref()
        .is_some_and(|tap| tap.watched())
    {
        // The inspector watches: this connection goes through the proxy, which
        // copies it for the page, instead of reaching the program as the
        // target's socket (a descriptor the proxy no longer sees).
        tracing::debug!(client = %peer.peer, "stolen connection relayed, not passed: the inspector watches");
        return deliver_watched(shared, target, peer, fd).await;
    }
    let client = peer.peer;
    let mut proxy_side = None;
    let connected = async {
        let socket = match target {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // Bound first: the address is recorded before the program can accept.
        socket.bind(SocketAddr::new(target.ip(), 0))?;
        let local = socket.local_addr()?;
        proxy_side = Some(local);
        Ok::<_, std::io::Error>((socket, local))
    };
    let (socket, local) = match connected.await {
        Ok(bound) => bound,
        Err(e) => {
            tracing::warn!(%target, error = %e, "cannot deliver a passed stolen connection; closed");
            return;
        }
    };
    let serial = shared.passed_serial.fetch_add(1, Ordering::Relaxed);
    lock(&shared.passed).insert(
        local,
        Passed {
            peer,
            fd,
            port,
            connected: false,
            serial,
        },
    );
    let stream =
        match tokio::time::timeout(shared.options.relay_timeout, socket.connect(target)).await {
            Ok(Ok(stream)) => {
                if let Some(entry) = lock(&shared.passed).get_mut(&local)
                    && entry.peer.peer == client
                {
                    entry.connected = true;
                }
                stream
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                connect_failed(&shared, local, client, &why);
                return;
            }
        };
    tracing::debug!(%target, client = %peer.peer, proxy_side = ?proxy_side, "stolen connection passed as a descriptor, awaiting the program's accept");
    // Readable: the layer claimed the socket and closed this connection (EOF), or
    // the program uses it without the layer (bytes or EOF, unclaimed).
    let waited = tokio::time::timeout(shared.options.relay_timeout, stream.readable()).await;
    if matches!(waited, Ok(Err(_))) {
        remove_own(&shared, local, client);
        return;
    }
    let unclaimed = remove_own(&shared, local, client);
    if let Some(Passed { fd, .. }) = unclaimed {
        tracing::debug!(client = %peer.peer, "a passed stolen connection the layer did not claim; relayed by the proxy");
        // `PeerOf` still names the real client for a late `accept`.
        shared.add_delivered(local, peer);
        splice_with_fd(stream, fd).await;
        shared.remove_delivered(local);
    }
}

/// The proxy's loopback connection from `local` failed (`why`): the passed
/// socket of `client` is closed, unless the layer has claimed it already.
///
/// The layer can claim it before this task sees the connect complete: the
/// program accepts as soon as the handshake is done, and the layer's reset of
/// the claimed loopback connection then reaches a socket still waiting to be
/// told it connected, which reports `ECONNRESET` (seen under bursts of new
/// connections). The stolen connection is the program's then, and fine.
/// Returns whether the socket was closed here.
fn connect_failed(shared: &Shared, local: SocketAddr, client: SocketAddr, why: &str) -> bool {
    if remove_own(shared, local, client).is_none() {
        tracing::debug!(%client, why, "the loopback connection failed after the layer claimed its stolen connection");
        return false;
    }
    tracing::warn!(%client, "cannot deliver a passed stolen connection to the local listener ({why}); closed");
    true
}

/// Removes the entry at `local` if it is still the stolen connection of
/// `client` (the real client's address, which no other live connection to the
/// target's port shares).
///
/// The proxy's address alone does not say: the layer closes a claimed loopback
/// connection with a reset, which frees the proxy's port at once (a socket
/// bound to port 0 gives it back when it closes, open descriptor or not), so
/// the next stolen connection may bind the same address and be entered there
/// before this one's task wakes to look.
fn remove_own(shared: &Shared, local: SocketAddr, client: SocketAddr) -> Option<Passed> {
    let mut passed = lock(&shared.passed);
    match passed.get(&local) {
        Some(entry) if entry.peer.peer == client => passed.remove(&local),
        _ => None,
    }
}

/// Delivers the passed socket `fd` as a relayed connection: the program's
/// listener at `target` accepts the proxy's loopback connection (its `PeerOf`
/// names the real client), and the proxy splices the two with the inspector's
/// copy of the bytes.
async fn deliver_watched(
    shared: Arc<Shared>,
    target: SocketAddr,
    peer: DeliveredPeer,
    fd: OwnedFd,
) {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    let bound = socket.and_then(|socket| {
        socket.bind(SocketAddr::new(target.ip(), 0))?;
        let local = socket.local_addr()?;
        Ok((socket, local))
    });
    let (socket, local) = match bound {
        Ok(bound) => bound,
        Err(e) => {
            tracing::warn!(%target, error = %e, "cannot deliver a stolen connection; closed");
            return;
        }
    };
    shared.add_delivered(local, peer);
    match tokio::time::timeout(shared.options.relay_timeout, socket.connect(target)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            let tapped = match &shared.options.incoming_tap {
                Some(tap) => tap.wrap(stream, peer),
                None => Err(stream),
            };
            match tapped {
                Ok(tapped) => splice_with_fd(tapped, fd).await,
                Err(stream) => splice_with_fd(stream, fd).await,
            }
        }
        _ => {
            tracing::warn!(%target, client = %peer.peer, "the local listener did not accept a stolen connection; closed")
        }
    }
    shared.remove_delivered(local);
}

/// Copies bytes both ways between `local` and the target's socket `fd` until
/// both ends finish.
async fn splice_with_fd<S>(mut local: S, fd: OwnedFd)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let std_stream = std::net::TcpStream::from(fd);
    let remote = std_stream
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(std_stream));
    match remote {
        Ok(mut remote) => {
            let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
        }
        Err(e) => tracing::debug!(error = %e, "cannot splice a passed stolen connection"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionOptions;
    use tokio::sync::{mpsc, watch};

    fn passed(client: SocketAddr) -> Passed {
        let (fd, _other) = std::os::unix::net::UnixStream::pair().unwrap();
        Passed {
            peer: DeliveredPeer {
                peer: client,
                local: "198.18.0.2:8080".parse().unwrap(),
            },
            fd: fd.into(),
            port: 8080,
            connected: false,
            serial: 0,
        }
    }

    #[test]
    fn a_failed_loopback_connect_closes_only_a_socket_nobody_claimed() {
        let (outbox, _rx) = mpsc::channel(1);
        let (end_tx, _end_rx) = watch::channel(None);
        let shared = Shared::new(outbox, end_tx, SessionOptions::default(), None);
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let client: SocketAddr = "198.18.0.1:50000".parse().unwrap();

        // Unclaimed: the socket is closed and its entry goes.
        lock(&shared.passed).insert(local, passed(client));
        assert!(connect_failed(&shared, local, client, "refused"));
        assert!(lock(&shared.passed).is_empty());

        // Claimed by the layer before the connect failed: nothing to close, and
        // a newer connection that took the freed address keeps its entry.
        let newer: SocketAddr = "198.18.0.1:50001".parse().unwrap();
        lock(&shared.passed).insert(local, passed(newer));
        assert!(!connect_failed(&shared, local, client, "reset"));
        assert_eq!(lock(&shared.passed)[&local].peer.peer, newer);
    }
}
