//! Outgoing connections: `ClientMessage::Connect` opens a TCP connection or a
//! connected UDP flow from the target's network namespace, answers `Connected` or
//! `ConnectFailed`, and hands the socket to a [`crate::relay`] task.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use graft_protocol::Transport;
use graft_protocol::link::AgentMessage;
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

#[cfg(test)]
mod tests {
    use graft_protocol::ConnectionId;

    use super::*;

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
