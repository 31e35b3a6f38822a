//! The hub link: a `SOCK_SEQPACKET` Unix socket between two agents, one
//! postcard-encoded message per packet, any packet optionally carrying one file
//! descriptor (`SCM_RIGHTS`, unix(7)).
//!
//! Packets keep message boundaries, so a descriptor always arrives with the
//! message it belongs to and no framing state can be desynchronised by a hostile
//! peer. Connections are handed to a peer agent as descriptors on this link:
//! the hub never connects to a socket a peer names.
//!
//! tokio has no packet-socket type; the sockets live in tokio's Unix stream and
//! listener types for their readiness and `accept4` only, and every read and
//! write goes through `sendmsg`/`recvmsg` here.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::Interest;

/// The largest message accepted, in bytes.
pub const MAX_MESSAGE: usize = 256 * 1024;

fn socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?)
}

/// A listening hub socket.
pub struct Listener(tokio::net::UnixListener);

impl Listener {
    /// Binds the abstract name `name` in the current network namespace.
    ///
    /// # Errors
    ///
    /// `AddrInUse` when some process holds the name; others as `bind` fails.
    pub fn bind_abstract(name: &str) -> io::Result<Listener> {
        let fd = socket()?;
        rustix::net::bind(&fd, &SocketAddrUnix::new_abstract_name(name.as_bytes())?)?;
        rustix::net::listen(&fd, 128)?;
        let std = std::os::unix::net::UnixListener::from(fd);
        Ok(Listener(tokio::net::UnixListener::from_std(std)?))
    }

    /// Accepts one link.
    ///
    /// # Errors
    ///
    /// As `accept4` fails.
    pub async fn accept(&self) -> io::Result<Link> {
        let (stream, _) = self.0.accept().await?;
        Ok(Link(stream))
    }
}

/// One end of a hub link.
pub struct Link(tokio::net::UnixStream);

impl Link {
    fn new(fd: OwnedFd) -> io::Result<Link> {
        let std = std::os::unix::net::UnixStream::from(fd);
        Ok(Link(tokio::net::UnixStream::from_std(std)?))
    }

    /// Connects to the abstract name `name`.
    ///
    /// # Errors
    ///
    /// `ConnectionRefused` when nothing listens there; others as `connect` fails.
    pub fn connect_abstract(name: &str) -> io::Result<Link> {
        let fd = socket()?;
        match rustix::net::connect(&fd, &SocketAddrUnix::new_abstract_name(name.as_bytes())?) {
            Ok(()) => {}
            // A full backlog: the connection completes when writable.
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INPROGRESS) => {}
            Err(e) => return Err(e.into()),
        }
        Link::new(fd)
    }

    /// The credentials of the process at the other end (`SO_PEERCRED`), for logs
    /// and error messages only: the pid is 0 when that process is in a PID
    /// namespace this one cannot see.
    pub fn peer_cred(&self) -> Option<rustix::net::UCred> {
        rustix::net::sockopt::socket_peercred(self.0.as_fd()).ok()
    }

    /// Sends `message`, with `fd` attached when given.
    ///
    /// # Errors
    ///
    /// Encoding or `sendmsg` failed (the peer is gone: `BrokenPipe`).
    pub async fn send<T: Serialize>(
        &self,
        message: &T,
        fd: Option<BorrowedFd<'_>>,
    ) -> io::Result<()> {
        let bytes = postcard::to_allocvec(message).map_err(io::Error::other)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "hub message too large",
            ));
        }
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        self.0
            .async_io(Interest::WRITABLE, || {
                let sock = self.0.as_fd();
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                    return Err(io::Error::other("no room for a descriptor"));
                }
                let sent = rustix::net::sendmsg(
                    sock,
                    &[io::IoSlice::new(&bytes)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )?;
                if sent != bytes.len() {
                    return Err(io::Error::other("short send on a packet socket"));
                }
                Ok(())
            })
            .await
    }

    /// Receives the next message and the descriptor it carries, `None` at the end
    /// of the link.
    ///
    /// # Errors
    ///
    /// `InvalidData` for a message that does not decode, is truncated, or carries
    /// more than one descriptor; others as `recvmsg` fails.
    pub async fn recv<T: DeserializeOwned>(&self) -> io::Result<Option<(T, Option<OwnedFd>)>> {
        // The buffer exists only while a packet is being taken: a link waiting
        // for its peer holds none, so many idle peers cost no memory, and only
        // the bytes received are kept.
        let (bytes, fds) = self
            .0
            .async_io(Interest::READABLE, || {
                let mut buf = vec![0u8; MAX_MESSAGE];
                let sock = self.0.as_fd();
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let got = rustix::net::recvmsg(
                    sock,
                    &mut [io::IoSliceMut::new(&mut buf)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )?;
                let mut fds: Vec<OwnedFd> = Vec::new();
                for message in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(received) = message {
                        fds.extend(received);
                    }
                }
                if got
                    .flags
                    .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
                {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated hub message",
                    ));
                }
                Ok((buf[..got.bytes].to_vec(), fds))
            })
            .await?;
        if bytes.is_empty() && fds.is_empty() {
            return Ok(None);
        }
        if fds.len() > 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a hub message with more than one descriptor",
            ));
        }
        let message = postcard::from_bytes(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(Some((message, fds.into_iter().next())))
    }

    /// Shuts both directions down, so the other end sees the link end.
    pub fn shutdown(&self) {
        let _ = rustix::net::shutdown(self.0.as_fd(), rustix::net::Shutdown::Both);
    }
}

impl AsFd for Link {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_and_descriptors_cross_the_link() {
        let name = format!("graft-test-link-{}", std::process::id());
        let listener = Listener::bind_abstract(&name).unwrap();
        let client = Link::connect_abstract(&name).unwrap();
        let server = listener.accept().await.unwrap();
        let (mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        client
            .send(&("hello".to_owned(), 7u16), Some(theirs.as_fd()))
            .await
            .unwrap();
        drop(theirs);
        client
            .send(&("plain".to_owned(), 8u16), None)
            .await
            .unwrap();
        let (first, fd) = server.recv::<(String, u16)>().await.unwrap().unwrap();
        assert_eq!(first, ("hello".to_owned(), 7));
        let received = std::os::unix::net::UnixStream::from(fd.expect("a descriptor"));
        use std::io::{Read, Write};
        (&received).write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        (&mine).read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        let (second, fd) = server.recv::<(String, u16)>().await.unwrap().unwrap();
        assert_eq!(second, ("plain".to_owned(), 8));
        assert!(fd.is_none());
        drop(client);
        assert!(server.recv::<(String, u16)>().await.unwrap().is_none());
    }
}
