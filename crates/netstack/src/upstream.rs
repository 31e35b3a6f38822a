//! Where the stack's flows go: an [`Upstream`] opens each TCP connection and UDP
//! flow and resolves names. [`SessionUpstream`] goes out from graft's target
//! through a proxy [`Session`]; [`LocalUpstream`] goes out from this machine's own
//! network namespace (the `--outgoing-local` destinations).
//!
//! A TCP connection comes back as a [`TcpRelay`]: a closure the stack calls with
//! the program's side ([`TcpFlow`]) once its handshake is done, so the connect in
//! the target happens *before* the program's SYN is answered. A UDP flow comes back
//! as a [`UdpRelay`], a pair of datagram channels.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
};

use graft_protocol::remote::{AddressFamily, RemoteError, RemoteRequest, RemoteResponse};
use graft_proxy::{LocalStream, ProxyError, Session};
use tokio::{io::AsyncWriteExt, sync::mpsc};

use crate::tcp::TcpFlow;

/// A boxed `Send` future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Splices an opened connection with the program's side; the returned future does
/// the work until both directions are done or either breaks.
pub type TcpRelay = Box<dyn FnOnce(TcpFlow) -> BoxFuture<'static, ()> + Send>;

/// Datagrams queued per UDP flow, each way, before new ones are dropped.
pub const UDP_QUEUE: usize = 256;

/// One UDP flow opened by an [`Upstream`]: datagrams for the remote go into
/// `to_remote`, the remote's answers come out of `from_remote`. Dropping
/// `to_remote` ends the flow; `from_remote` ends when the remote side is gone.
#[derive(Debug)]
pub struct UdpRelay {
    /// Datagrams to send to the remote.
    pub to_remote: mpsc::Sender<Vec<u8>>,
    /// Datagrams the remote sent back.
    pub from_remote: mpsc::Receiver<Vec<u8>>,
}

/// The outcome of a name look-up ([`Upstream::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// The addresses of the wanted family, in resolver order; never empty.
    Addrs(Vec<IpAddr>),
    /// The name has no address of this family (it may have some of the other).
    NoName,
    /// The resolver failed or timed out; the asker may try again.
    TryAgain,
}

/// Opens connections and resolves names for the stack.
pub trait Upstream: Send + Sync + 'static {
    /// Connects to `remote`.
    ///
    /// # Errors
    ///
    /// The `connect(2)` error (`ECONNREFUSED`, `ENETUNREACH`, `ETIMEDOUT`, ...) as
    /// an [`io::Error`] with its raw OS error set where one is known.
    fn connect_tcp(&self, remote: SocketAddr) -> BoxFuture<'_, io::Result<TcpRelay>>;

    /// Opens a UDP flow to `remote`.
    ///
    /// # Errors
    ///
    /// As [`Upstream::connect_tcp`].
    fn connect_udp(&self, remote: SocketAddr) -> BoxFuture<'_, io::Result<UdpRelay>>;

    /// Resolves `host` (an absolute name when it ends with a dot) for `family`.
    fn resolve(&self, host: String, family: AddressFamily) -> BoxFuture<'_, Resolved>;
}

/// The target's side of a graft session: every flow leaves from the target,
/// names are resolved with the target's `/etc/hosts` and `/etc/resolv.conf`.
#[derive(Debug, Clone)]
pub struct SessionUpstream(pub Arc<Session>);

fn proxy_io_error(e: ProxyError) -> io::Error {
    match e {
        ProxyError::Connect { errno, .. } => io::Error::from_raw_os_error(errno),
        other => io::Error::new(io::ErrorKind::ConnectionAborted, other.to_string()),
    }
}

impl Upstream for SessionUpstream {
    fn connect_tcp(&self, remote: SocketAddr) -> BoxFuture<'_, io::Result<TcpRelay>> {
        Box::pin(async move {
            let outgoing = self.0.connect_tcp(remote).await.map_err(proxy_io_error)?;
            let relay: TcpRelay = Box::new(move |flow| Box::pin(outgoing.splice(flow)));
            Ok(relay)
        })
    }

    fn connect_udp(&self, remote: SocketAddr) -> BoxFuture<'_, io::Result<UdpRelay>> {
        Box::pin(async move {
            let mut outgoing = self.0.connect_udp(remote).await.map_err(proxy_io_error)?;
            let (to_remote, mut to_remote_rx) = mpsc::channel::<Vec<u8>>(UDP_QUEUE);
            let (from_remote_tx, from_remote) = mpsc::channel(UDP_QUEUE);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        datagram = to_remote_rx.recv() => match datagram {
                            Some(d) => if outgoing.send(&d).await.is_err() { break },
                            None => break,
                        },
                        datagram = outgoing.recv() => match datagram {
                            // A full queue drops the datagram, as a full socket buffer would.
                            Some(d) => { let _ = from_remote_tx.try_send(d); }
                            None => break,
                        },
                    }
                }
            });
            Ok(UdpRelay {
                to_remote,
                from_remote,
            })
        })
    }

    fn resolve(&self, host: String, family: AddressFamily) -> BoxFuture<'_, Resolved> {
        Box::pin(async move {
            match self.0.remote(RemoteRequest::Resolve { host, family }).await {
                Ok(RemoteResponse::Resolved { addrs, .. }) if !addrs.is_empty() => {
                    Resolved::Addrs(addrs)
                }
                Ok(RemoteResponse::Error(RemoteError::NoName)) => Resolved::NoName,
                Ok(RemoteResponse::Resolved { .. }) => Resolved::NoName,
                _ => Resolved::TryAgain,
            }
        })
    }
}

/// This machine's own network namespace (graft's): for `--outgoing-local`
/// destinations, and for tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalUpstream;

impl Upstream for LocalUpstream {
    fn connect_tcp(&self, remote: SocketAddr) -> BoxFuture<'_, io::Result<TcpRelay>> {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(remote).await?;
            let _ = stream.set_nodelay(true);
            let relay: TcpRelay = Box::new(move |flow| Box::pin(splice_local(flow, stream)));
            Ok(relay)
        })
    }

    fn connect_udp(&self, remote: SocketAddr) -> BoxFuture<'_, io::Result<UdpRelay>> {
        Box::pin(async move {
            let any: SocketAddr = match remote {
                SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let socket = tokio::net::UdpSocket::bind(any).await?;
            socket.connect(remote).await?;
            let (to_remote, mut to_remote_rx) = mpsc::channel::<Vec<u8>>(UDP_QUEUE);
            let (from_remote_tx, from_remote) = mpsc::channel(UDP_QUEUE);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    tokio::select! {
                        datagram = to_remote_rx.recv() => match datagram {
                            Some(d) => { let _ = socket.send(&d).await; }
                            None => break,
                        },
                        // ICMP errors (ECONNREFUSED) do not end a UDP flow.
                        received = socket.recv(&mut buf) => if let Ok(n) = received {
                            let _ = from_remote_tx.try_send(buf[..n].to_vec());
                        },
                    }
                }
            });
            Ok(UdpRelay {
                to_remote,
                from_remote,
            })
        })
    }

    fn resolve(&self, host: String, family: AddressFamily) -> BoxFuture<'_, Resolved> {
        Box::pin(async move {
            let name = host.trim_end_matches('.').to_owned();
            match tokio::net::lookup_host((name.as_str(), 0)).await {
                Ok(addrs) => {
                    let addrs: Vec<IpAddr> = addrs
                        .map(|a| a.ip())
                        .filter(|ip| match family {
                            AddressFamily::Any => true,
                            AddressFamily::V4 => ip.is_ipv4(),
                            AddressFamily::V6 => ip.is_ipv6(),
                        })
                        .collect();
                    if addrs.is_empty() {
                        Resolved::NoName
                    } else {
                        Resolved::Addrs(addrs)
                    }
                }
                Err(_) => Resolved::NoName,
            }
        })
    }
}

/// Splices the program's side with a connection from this machine: each EOF
/// becomes a FIN on the other side, an error on either resets both.
async fn splice_local(mut flow: TcpFlow, mut stream: tokio::net::TcpStream) {
    match tokio::io::copy_bidirectional(&mut flow, &mut stream).await {
        Ok(_) => {
            let _ = flow.shutdown().await;
        }
        Err(_) => {
            flow.abort();
            let _ = stream.set_zero_linger();
        }
    }
}
