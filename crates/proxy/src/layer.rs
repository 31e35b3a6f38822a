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
    fdpass::send_with_fds,
    layer::{LayerRequest, LayerResponse},
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

type LayerFramed = Framed<UnixStream, FrameCodec<LayerRequest, LayerResponse>>;

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
                    Some(fd) => send_with_fd(&mut framed, &response, fd).await,
                    None => framed.send(response).await.map_err(|e| e.to_string()),
                }
            }
            LayerRequest::Remote(RemoteRequest::ConnectFd { remote }) => {
                let (response, fd) = connect_fd(&shared, fds, remote).await;
                match fd {
                    Some(fd) => send_with_fd(&mut framed, &response, fd).await,
                    None => framed.send(response).await.map_err(|e| e.to_string()),
                }
            }
            LayerRequest::PeerOf { proxy_side } if fds => match shared.take_passed(proxy_side) {
                Some((peer, fd)) => {
                    tracing::debug!(pid, client = %peer.peer, "stolen connection handed to the program as the target's socket");
                    send_with_fd(&mut framed, &LayerResponse::PeerFd(peer), fd).await
                }
                None => {
                    let response = LayerResponse::Peer(shared.peer_of(proxy_side));
                    framed.send(response).await.map_err(|e| e.to_string())
                }
            },
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
async fn send_with_fd(
    framed: &mut LayerFramed,
    response: &LayerResponse,
    fd: OwnedFd,
) -> Result<(), String> {
    framed.flush().await.map_err(|e| e.to_string())?;
    let frame = encode_frame(response).map_err(|e| e.to_string())?;
    let stream = framed.get_ref();
    let mut sent = 0;
    while sent < frame.len() {
        stream.writable().await.map_err(|e| e.to_string())?;
        let fds = if sent == 0 {
            vec![fd.as_fd()]
        } else {
            Vec::new()
        };
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            send_with_fds(stream, &frame[sent..], &fds)
        }) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
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
        LayerRequest::PeerOf { proxy_side } => LayerResponse::Peer(shared.peer_of(proxy_side)),
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
