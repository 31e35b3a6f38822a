//! Outgoing connections: `ClientMessage::Connect` opens a TCP connection or a
//! connected UDP flow from the target's network namespace, answers `Connected` or
//! `ConnectFailed`, and hands the socket to a [`crate::relay`] task.
//!
//! For a client on this machine that takes descriptors, [`connect_fd`] starts the
//! connection and the socket itself goes to the program
//! (`RemoteRequest::ConnectFd`); nothing is relayed.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use graft_protocol::Transport;
use graft_protocol::link::AgentMessage;
use graft_protocol::remote::RemoteError;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::relay::{self, ConnTable, Registration};

/// How long a TCP connect may take before it fails with `ETIMEDOUT`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// The errno to report for a failed connect.
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(match e.kind() {
        io::ErrorKind::TimedOut => libc::ETIMEDOUT,
        io::ErrorKind::ConnectionRefused => libc::ECONNREFUSED,
        _ => libc::EIO,
    })
}

async fn connect_udp(remote: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if remote.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(remote).await?;
    Ok(socket)
}

/// Connects `registration.conn` to `remote` and relays it until it ends.
pub async fn connect(
    registration: Registration,
    remote: SocketAddr,
    transport: Transport,
    to_link: mpsc::Sender<AgentMessage>,
    table: Arc<ConnTable>,
) {
    let conn = registration.conn;
    let failed = |e: io::Error| {
        tracing::debug!(%conn, %remote, "connect failed: {e}");
        AgentMessage::ConnectFailed {
            conn,
            errno: errno_of(&e),
        }
    };
    match transport {
        Transport::Tcp => {
            let attempt = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(remote))
                .await
                .unwrap_or_else(|_| Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)));
            match attempt.and_then(|s| s.local_addr().map(|local| (s, local))) {
                Ok((stream, local)) => {
                    crate::incoming::sniff::own_connection(local);
                    let _ = stream.set_nodelay(true);
                    let stream = relay::ResetOnDrop::new(stream);
                    if to_link
                        .send(AgentMessage::Connected { conn, local })
                        .await
                        .is_ok()
                    {
                        relay::tcp(stream, registration, to_link, table).await;
                        return;
                    }
                }
                Err(e) => {
                    let _ = to_link.send(failed(e)).await;
                }
            }
        }
        Transport::Udp => match connect_udp(remote)
            .await
            .and_then(|s| s.local_addr().map(|local| (s, local)))
        {
            Ok((socket, local)) => {
                if to_link
                    .send(AgentMessage::Connected { conn, local })
                    .await
                    .is_ok()
                {
                    relay::udp(socket, registration, to_link, table).await;
                    return;
                }
            }
            Err(e) => {
                let _ = to_link.send(failed(e)).await;
            }
        },
    }
    table.finished(&registration);
}

/// Why the agent never connects a passed socket to `remote`, if it does not.
///
/// The layer sends the target's way only destinations that no rule keeps on
/// this machine, and loopback and unspecified addresses never go there
/// (`graft_config::outgoing::goes_remote`); a program that asks for one anyway
/// through a hand-made frame must not get a socket on the target's own
/// loopback services. Multicast, broadcast and port 0 are no TCP destinations.
pub fn refused_destination(remote: &SocketAddr) -> Option<&'static str> {
    let ip = match remote.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    if ip.is_loopback() {
        Some("the target's loopback stays the target's")
    } else if ip.is_unspecified() {
        Some("an unspecified address means the target's loopback")
    } else if ip.is_multicast() || matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("multicast and broadcast are no TCP destinations")
    } else if remote.port() == 0 {
        Some("port 0 is no destination")
    } else {
        None
    }
}

/// Starts a TCP connection to `remote` from the target's network namespace (the
/// agent's own) on a new non-blocking, close-on-exec socket of `remote`'s family,
/// and returns the socket with its connect possibly still in progress
/// (connect(2): `EINPROGRESS`, then writable with the outcome in `SO_ERROR`).
///
/// # Errors
///
/// [`RemoteError::Os`] with `EACCES` for a [`refused_destination`], or the
/// errno of `socket(2)` or of a connect that failed at once (`ENETUNREACH`).
pub fn connect_fd(remote: SocketAddr) -> Result<OwnedFd, RemoteError> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    if let Some(reason) = refused_destination(&remote) {
        tracing::warn!(%remote, "no socket passed: {reason}");
        return Err(RemoteError::Os(libc::EACCES));
    }
    let family = if remote.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let os = |e: rustix::io::Errno| RemoteError::Os(e.raw_os_error());
    let socket = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .map_err(os)?;
    match rustix::net::connect(&socket, &remote) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {
            // The port is bound by connect(2): the sniffing mirror must not copy
            // this connection back to a mirrored program that calls its own
            // target (see `incoming::sniff::own_connection`).
            if let Ok(local) = rustix::net::getsockname(&socket)
                && let Ok(local) = std::net::SocketAddr::try_from(local)
            {
                crate::incoming::sniff::own_connection(local);
            }
            Ok(socket)
        }
        Err(e) => Err(os(e)),
    }
}

#[cfg(test)]
mod tests {
    use graft_protocol::ConnectionId;

    use super::*;

    #[test]
    fn a_passed_socket_never_reaches_loopback_however_spelled() {
        for refused in [
            "127.0.0.1:80",
            "127.9.9.9:80",
            "[::1]:80",
            "0.0.0.0:80",
            "[::]:80",
            "[::ffff:127.0.0.1]:80",
            "[::ffff:0.0.0.0]:80",
            "224.0.0.1:80",
            "[ff02::1]:80",
            "255.255.255.255:80",
            "10.0.0.1:0",
        ] {
            let addr: SocketAddr = refused.parse().unwrap();
            assert!(refused_destination(&addr).is_some(), "{refused}");
            assert_eq!(connect_fd(addr).err(), Some(RemoteError::Os(libc::EACCES)));
        }
        for allowed in ["10.0.0.1:80", "[2001:db8::1]:443", "[::ffff:10.0.0.1]:80"] {
            let addr: SocketAddr = allowed.parse().unwrap();
            assert_eq!(refused_destination(&addr), None, "{allowed}");
        }
    }

    #[tokio::test]
    async fn refused_connect_reports_econnrefused() {
        // Bind then drop: nothing listens on that port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let table = Arc::new(ConnTable::default());
        let (tx, mut rx) = mpsc::channel(4);
        let reg = table.register(ConnectionId(9)).unwrap();
        connect(
            reg,
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Transport::Tcp,
            tx,
            table.clone(),
        )
        .await;
        assert_eq!(
            rx.recv().await.unwrap(),
            AgentMessage::ConnectFailed {
                conn: ConnectionId(9),
                errno: libc::ECONNREFUSED
            }
        );
        assert!(table.is_empty());
    }

    #[tokio::test]
    async fn udp_flow_relays_datagrams() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let table = Arc::new(ConnTable::default());
        let (tx, mut rx) = mpsc::channel(4);
        let conn = ConnectionId(5);
        let reg = table.register(conn).unwrap();
        let task = tokio::spawn(connect(
            reg,
            server.local_addr().unwrap(),
            Transport::Udp,
            tx,
            table.clone(),
        ));
        let AgentMessage::Connected { local, .. } = rx.recv().await.unwrap() else {
            panic!("not connected")
        };
        assert!(table.deliver(conn, relay::ConnCommand::Data(b"q".to_vec())));
        let mut buf = [0u8; 16];
        let (n, from) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], from.port()), (&b"q"[..], local.port()));
        server.send_to(b"answer", from).await.unwrap();
        assert_eq!(
            rx.recv().await.unwrap(),
            AgentMessage::Data {
                conn,
                bytes: b"answer".to_vec()
            }
        );
        assert!(table.deliver(conn, relay::ConnCommand::Close { reset: false }));
        task.await.unwrap();
    }
}
