//! The layer socket: every thread (and forked child) of the user's program opens
//! its own connection here, says `Hello`, then sends one [`LayerRequest`] at a
//! time and waits for its [`LayerResponse`].
//!
//! Connections are served concurrently, each by its own task, so one thread's
//! slow remote `open` never delays another's `connect`. A connection that breaks
//! the protocol (a malformed or oversized frame, a request before `Hello`) is
//! closed alone; the session goes on.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::Arc,
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use graft_protocol::{
    PROTOCOL_VERSION, Transport,
    codec::{FrameCodec, encode_frame},
    fdpass::{FdQueues, FdStream, MAX_FDS_PER_SEND, send_with_fds},
    layer::{LayerRequest, LayerResponse, PassedPeer},
    remote::{OpenFlags, RemoteError, RemoteRequest, RemoteResponse},
    version::{FEATURE_FDS, check_compatible, has_feature, version_with},
};
use tokio::net::{TcpListener, UdpSocket, UnixListener, UnixStream};
use tokio_util::codec::Framed;

use crate::{
    ProxyError,
    session::{Accepts, Shared},
    splice::{relay_tcp, relay_udp},
};

type LayerFramed = Framed<FdStream, FrameCodec<LayerRequest, LayerResponse>>;

/// Binds the layer socket at `path`, replacing a stale socket file, with mode 0600.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, ProxyError> {
    let fail = |error| ProxyError::Bind {
        path: path.to_owned(),
        error,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    let listener = UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    Ok(listener)
}

/// Accepts layer connections until the task is aborted.
pub(crate) async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, shared.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "cannot accept a layer connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(stream: UnixStream, shared: Arc<Shared>) {
    // Reads keep descriptors: a layer gives back sockets passed ahead
    // (`ReturnPassed`); any other descriptor it sends is closed unclaimed.
    let (stream, incoming) = FdStream::new(stream);
    let mut framed: LayerFramed = Framed::new(stream, FrameCodec::new());
    let (pid, fds) = match framed.next().await {
        Some(Ok(LayerRequest::Hello { version, pid })) => match check_compatible(&version) {
            Ok(()) => {
                // Descriptors go to the layer when it takes them and the agent
                // passes them to us.
                let fds = has_feature(&version, FEATURE_FDS) && shared.passes_fds();
                let hello = LayerResponse::Hello {
                    version: if fds {
                        version_with(&[FEATURE_FDS])
                    } else {
                        PROTOCOL_VERSION.to_owned()
                    },
                };
                if framed.send(hello).await.is_err() {
                    return;
                }
                (pid, fds)
            }
            Err(e) => {
                tracing::warn!(pid, error = %e, "refusing a layer of another version");
                let _ = framed.send(error(libc::EPROTO, e.to_string())).await;
                return;
            }
        },
        Some(Ok(other)) => {
            tracing::warn!(request = ?other, "layer connection did not start with Hello; closed");
            let _ = framed
                .send(error(
                    libc::EPROTO,
                    "the first request must be Hello".into(),
                ))
                .await;
            return;
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "bad frame from a layer connection; closed");
            return;
        }
        None => return,
    };
    tracing::debug!(pid, passes_descriptors = fds, "layer connected");
    // The sockets passed ahead to this connection's process that it may give
    // back, by the proxy side of their loopback connections.
    let mut lent = Lent::default();
    while let Some(request) = framed.next().await {
        let request = match request {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(pid, error = %e, "bad frame from a layer connection; closed");
                return;
            }
        };
        let sent = match request {
            LayerRequest::Remote(RemoteRequest::OpenFd { path, flags, mode }) => {
                let (response, fd) = open_fd(&shared, fds, path, flags, mode).await;
                match fd {
                    Some(fd) => send_with_fds_of(&mut framed, &response, vec![fd]).await,
                    None => framed.send(response).await.map_err(|e| e.to_string()),
                }
            }
            LayerRequest::Remote(RemoteRequest::ConnectFd { remote }) => {
                let (response, fd) = connect_fd(&shared, fds, remote).await;
                match fd {
                    Some(fd) => send_with_fds_of(&mut framed, &response, vec![fd]).await,
                    None => framed.send(response).await.map_err(|e| e.to_string()),
                }
            }
            LayerRequest::PeerOf { proxy_side } if fds => match shared.take_passed(proxy_side) {
                Some((_, peer, fd)) => {
                    tracing::debug!(pid, client = %peer.delivered.peer, "stolen connection handed to the program as the target's socket");
                    send_with_fds_of(
                        &mut framed,
                        &LayerResponse::PeerFd(peer.delivered),
                        vec![fd],
                    )
                    .await
                }
                None => {
                    let response = LayerResponse::Peer(shared.peer_of(proxy_side));
                    framed.send(response).await.map_err(|e| e.to_string())
                }
            },
            LayerRequest::PeerOfBatch { proxy_side, more } if fds => {
                match shared.take_passed(proxy_side) {
                    Some((home, peer, fd)) => {
                        let more = usize::from(more).min(MAX_FDS_PER_SEND - 1);
                        let mut peers = vec![peer];
                        let mut sockets = vec![fd];
                        for (peer, fd) in home.take_ready(peer.port, more) {
                            peers.push(peer);
                            sockets.push(fd);
                        }
                        tracing::debug!(pid, client = %peer.delivered.peer, ahead = peers.len() - 1, "stolen connection handed to the program as the target's socket, more passed ahead");
                        let sent = send_with_fds_of(
                            &mut framed,
                            &LayerResponse::PeerFds(peers.clone()),
                            sockets,
                        )
                        .await;
                        if sent.is_ok() {
                            for peer in &peers[1..] {
                                lent.insert(peer.proxy_side);
                            }
                        }
                        sent
                    }
                    None => {
                        let response = LayerResponse::Peer(shared.peer_of(proxy_side));
                        framed.send(response).await.map_err(|e| e.to_string())
                    }
                }
            }
            LayerRequest::Listen {
                port,
                deliver_to,
                pid: listener_pid,
            } if fds => {
                let response = match shared
                    .listen_accepting(
                        port,
                        crate::Delivery::Listener(deliver_to),
                        listener_pid,
                        Accepts::Sockets,
                    )
                    .await
                {
                    Ok(()) => Ok(shared.direct_listener(port)),
                    Err((errno, message)) => Err(error(errno, message)),
                };
                match response {
                    Ok(listeners) if !listeners.is_empty() => {
                        tracing::debug!(
                            pid,
                            port,
                            families = listeners.len(),
                            "direct listener handed to the program"
                        );
                        send_with_fds_of(&mut framed, &LayerResponse::ListenDirect, listeners).await
                    }
                    Ok(_) => framed
                        .send(LayerResponse::Ok)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(response) => framed.send(response).await.map_err(|e| e.to_string()),
                }
            }
            LayerRequest::ReturnPassed(peers) if fds => {
                let response = take_back(&shared, &incoming, &mut lent, peers);
                framed.send(response).await.map_err(|e| e.to_string())
            }
            request => {
                // A layer that takes descriptors takes stolen connections'
                // sockets.
                let accepts = if fds {
                    Accepts::Sockets
                } else {
                    Accepts::Relayed
                };
                let response = answer(&shared, request, accepts).await;
                framed.send(response).await.map_err(|e| e.to_string())
            }
        };
        if let Err(e) = sent {
            tracing::debug!(pid, error = %e, "layer connection lost");
            return;
        }
    }
}

/// Opens a remote file for the layer as its descriptor (when `fds`, both links
/// pass descriptors), else answers `Unsupported` so the layer relays it.
async fn open_fd(
    shared: &Arc<Shared>,
    fds: bool,
    path: String,
    flags: OpenFlags,
    mode: u32,
) -> (LayerResponse, Option<OwnedFd>) {
    if !fds {
        let no = RemoteError::Unsupported("descriptors are not passed on this link".into());
        return (LayerResponse::Remote(RemoteResponse::Error(no)), None);
    }
    let request = RemoteRequest::OpenFd {
        path: path.clone(),
        flags,
        mode,
    };
    match shared.request_fd(request).await {
        Ok((response, fd)) => {
            tracing::debug!(path, passed = fd.is_some(), "file opened as a descriptor");
            (LayerResponse::Remote(response), fd)
        }
        Err(e) => (error(libc::ECONNABORTED, e.to_string()), None),
    }
}

/// Starts an outgoing TCP connection from the target as a socket for the layer
/// (when `fds`, both links pass descriptors), else answers `Unsupported` so the
/// layer relays it.
async fn connect_fd(
    shared: &Arc<Shared>,
    fds: bool,
    remote: SocketAddr,
) -> (LayerResponse, Option<OwnedFd>) {
    if !fds {
        let no = RemoteError::Unsupported("descriptors are not passed on this link".into());
        return (LayerResponse::Remote(RemoteResponse::Error(no)), None);
    }
    if kept_local(shared, &remote, Transport::Tcp).is_some() {
        let no = RemoteError::Os(libc::EACCES);
        return (LayerResponse::Remote(RemoteResponse::Error(no)), None);
    }
    match shared.request_fd(RemoteRequest::ConnectFd { remote }).await {
        Ok((response, fd)) => {
            tracing::debug!(%remote, passed = fd.is_some(), "outgoing socket for the program");
            (LayerResponse::Remote(response), fd)
        }
        Err(e) => (error(libc::ECONNABORTED, e.to_string()), None),
    }
}

/// The refusal of a connection to `remote` that an `[outgoing] local` rule
/// keeps on this machine: the layer never asks for one, so the frame is a
/// program's own, and it gets no connection from the target.
fn kept_local(shared: &Shared, remote: &SocketAddr, transport: Transport) -> Option<LayerResponse> {
    let names = graft_config::ResolvedNames::default();
    let rule = shared
        .options
        .outgoing_local
        .iter()
        .find(|rule| rule.matches_flow(remote, Some(transport), &names))?;
    tracing::warn!(%remote, ?rule, "a program asked for a connection a rule keeps local; refused");
    Some(error(
        libc::EACCES,
        format!("{remote} is kept on this machine by an [outgoing] local rule"),
    ))
}

/// Writes `response` to the layer with `fd` beside its first byte.
async fn send_with_fds_of(
    framed: &mut LayerFramed,
    response: &LayerResponse,
    fds: Vec<OwnedFd>,
) -> Result<(), String> {
    framed.flush().await.map_err(|e| e.to_string())?;
    let frame = encode_frame(response).map_err(|e| e.to_string())?;
    let stream = framed.get_ref().get_ref();
    let mut sent = 0;
    while sent < frame.len() {
        stream.writable().await.map_err(|e| e.to_string())?;
        let borrowed: Vec<_> = if sent == 0 {
            fds.iter().map(AsFd::as_fd).collect()
        } else {
            Vec::new()
        };
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            send_with_fds(stream, &frame[sent..], &borrowed)
        }) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// Takes back the sockets a layer gives back (`ReturnPassed`): each must be one
/// this connection was passed ahead (`lent`) and still be that connection (its
/// addresses those the target saw), else it is closed and the answer is an
/// error; the descriptors come from the connection's queue in frame order.
fn take_back(
    shared: &Arc<Shared>,
    incoming: &FdQueues,
    lent: &mut Lent,
    peers: Vec<PassedPeer>,
) -> LayerResponse {
    let fds: Vec<OwnedFd> = (0..peers.len())
        .map_while(|_| incoming.pop_incoming())
        .collect();
    if fds.len() != peers.len() || peers.len() > MAX_FDS_PER_SEND {
        return error(
            libc::EINVAL,
            format!(
                "ReturnPassed names {} sockets; {} came",
                peers.len(),
                fds.len()
            ),
        );
    }
    let mut refused = 0;
    for (peer, fd) in peers.into_iter().zip(fds) {
        if !lent.remove(&peer.proxy_side) || !is_that_connection(&fd, &peer) {
            refused += 1;
            continue;
        }
        shared.give_back(peer, fd);
    }
    if refused > 0 {
        tracing::warn!(
            refused,
            "a layer gave back sockets that were not passed to it; closed"
        );
        return error(
            libc::EINVAL,
            format!("{refused} sockets given back were not passed ahead to this process"),
        );
    }
    LayerResponse::Ok
}

/// The sockets passed ahead to one layer connection that it may give back, by
/// the proxy side of their loopback connections: the last [`Lent::MAX`]. The
/// layer keeps at most 32 at a time, the newest of its listener queue, so an
/// older one is long accepted; the bound keeps a connection that takes
/// millions from growing without end (a socket given back past it is refused).
#[derive(Debug, Default)]
struct Lent {
    /// Lends in order, each with its number.
    order: std::collections::VecDeque<(SocketAddr, u64)>,
    /// The lends that count, with the number of the latest.
    live: std::collections::HashMap<SocketAddr, u64>,
    next: u64,
}

impl Lent {
    const MAX: usize = 1024;

    fn insert(&mut self, proxy_side: SocketAddr) {
        self.next += 1;
        self.live.insert(proxy_side, self.next);
        self.order.push_back((proxy_side, self.next));
        while self.order.len() > Lent::MAX {
            if let Some((old, n)) = self.order.pop_front()
                && self.live.get(&old) == Some(&n)
            {
                self.live.remove(&old);
            }
        }
    }

    /// Whether `proxy_side` was lent (and still counts), forgetting it.
    fn remove(&mut self, proxy_side: &SocketAddr) -> bool {
        self.live.remove(proxy_side).is_some()
    }
}

/// Whether `fd` is a TCP socket connected to the client of `peer`
/// (getpeername(2); its own address is the agent's redirect, not the one the
/// client asked for).
fn is_that_connection(fd: &OwnedFd, peer: &PassedPeer) -> bool {
    let Ok(dup) = fd.try_clone() else {
        return false;
    };
    let unmap = |a: SocketAddr| match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        a => a,
    };
    std::net::TcpStream::from(dup)
        .peer_addr()
        .is_ok_and(|remote| unmap(remote) == unmap(peer.delivered.peer))
}

fn error(errno: i32, message: String) -> LayerResponse {
    LayerResponse::Error { errno, message }
}

/// Answers one request of a layer connection that has said `Hello`.
async fn answer(shared: &Arc<Shared>, request: LayerRequest, accepts: Accepts) -> LayerResponse {
    match request {
        LayerRequest::Hello { .. } => error(libc::EPROTO, "Hello was already sent".into()),
        LayerRequest::Remote(request) => match shared.request(request).await {
            Ok(response) => LayerResponse::Remote(response),
            Err(e) => error(libc::ECONNABORTED, e.to_string()),
        },
        LayerRequest::Listen {
            port,
            deliver_to,
            pid,
        } => match shared
            .listen_accepting(port, crate::Delivery::Listener(deliver_to), pid, accepts)
            .await
        {
            Ok(()) => LayerResponse::Ok,
            Err((errno, message)) => error(errno, message),
        },
        LayerRequest::Unlisten { port, pid } => {
            shared.unlisten(port, pid).await;
            LayerResponse::Ok
        }
        LayerRequest::DirectAttached { port } => {
            shared.direct_attached(port).await;
            LayerResponse::Ok
        }
        LayerRequest::PeerOf { proxy_side } | LayerRequest::PeerOfBatch { proxy_side, .. } => {
            LayerResponse::Peer(shared.peer_of(proxy_side))
        }
        LayerRequest::ReturnPassed(_) => error(
            libc::EINVAL,
            "nothing was passed ahead on a connection that passes no descriptors".into(),
        ),
        LayerRequest::Connect { remote, transport } => match kept_local(shared, &remote, transport)
        {
            Some(refused) => refused,
            None => connect(shared, remote, transport).await,
        },
    }
}

/// Opens an outgoing connection from the target and a loopback relay for the
/// program's socket.
async fn connect(shared: &Arc<Shared>, remote: SocketAddr, transport: Transport) -> LayerResponse {
    let (conn, local, events) = match shared.open(remote, transport).await {
        Ok(opened) => opened,
        Err((errno, message)) => return error(errno, message),
    };
    let loopback: IpAddr = match remote {
        SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
    };
    let relay = match transport {
        Transport::Tcp => TcpListener::bind((loopback, 0)).await.and_then(|listener| {
            let relay = listener.local_addr()?;
            tokio::spawn(relay_tcp(shared.clone(), conn, listener, events));
            Ok(relay)
        }),
        Transport::Udp => UdpSocket::bind((loopback, 0)).await.and_then(|socket| {
            let relay = socket.local_addr()?;
            tokio::spawn(relay_udp(shared.clone(), conn, socket, events));
            Ok(relay)
        }),
    };
    match relay {
        Ok(relay) => {
            tracing::debug!(%conn, %remote, %relay, "outgoing connection open");
            LayerResponse::Connected { relay, local }
        }
        Err(e) => {
            shared.forget(conn);
            let _ = shared
                .send(graft_protocol::link::ClientMessage::Close { conn, reset: true })
                .await;
            error(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("cannot open a loopback relay: {e}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn lent_keeps_the_last_lends_and_each_counts_once() {
        let mut lent = Lent::default();
        for port in 1..=2000 {
            lent.insert(addr(port));
        }
        assert!(!lent.remove(&addr(1)), "an old lend still counts");
        assert!(!lent.remove(&addr(976)));
        assert!(lent.remove(&addr(977)));
        assert!(lent.remove(&addr(2000)));
        assert!(!lent.remove(&addr(2000)), "a lend counted twice");
        assert!(lent.order.len() <= Lent::MAX && lent.live.len() <= Lent::MAX);
    }

    #[test]
    fn a_reused_address_lent_again_outlives_its_old_lend() {
        let mut lent = Lent::default();
        lent.insert(addr(7));
        lent.remove(&addr(7));
        lent.insert(addr(7));
        // The first lend of :7 leaves the window; the second still counts.
        for port in 1000..1000 + Lent::MAX as u16 - 1 {
            lent.insert(addr(port));
        }
        assert!(lent.remove(&addr(7)));
    }
}
