//! The private channel between graft and its helper inside the isolated
//! namespace: a `SOCK_SEQPACKET` socket pair, one JSON message per packet, with a
//! descriptor attached where one travels (`SCM_RIGHTS`, unix(7)): the tun device
//! the helper made, and each socket it connected to COMMAND's listeners.
//!
//! ```text
//! helper → graft   Fuse { index } + /dev/fuse fd    (per remote directory, first)
//! helper → graft   Ready + tun fd | Failed          (namespace set up, or why not)
//! graft  → helper  Start                            (the stack serves the tun)
//! helper → graft   Started { pid }                  (COMMAND runs)
//! graft  → helper  Connect { addr }                 (a stolen connection to deliver)
//! helper → graft   Connected + socket fd | Refused  (in request order)
//! ```
//!
//! The helper's exit status is COMMAND's; graft learns it by waiting for the
//! helper.

use std::{
    io::{IoSlice, IoSliceMut},
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use tokio::io::{Interest, unix::AsyncFd};

/// The largest message, in bytes (the messages are a few dozen bytes).
const MAX_MESSAGE: usize = 64 * 1024;

/// A message between graft and the helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// The namespace is ready; the tun device's descriptor is attached.
    Ready,
    /// The namespace could not be set up; the message says why and what to do.
    Failed(String),
    /// Start COMMAND.
    Start,
    /// COMMAND started with this PID (in graft's PID namespace).
    Started(u32),
    /// Connect to this address inside the namespace and pass the socket back.
    Connect(SocketAddr),
    /// Connected; the socket is attached.
    Connected,
    /// The connect failed with this `errno`.
    Refused(i32),
    /// A FUSE connection for the remote directory of this index in the plan
    /// (`files::Layout::mounts`) is mounted; its `/dev/fuse` descriptor is
    /// attached. Sent before `Ready`.
    Fuse(usize),
}

/// One end of the socket pair, on the runtime.
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
}

impl Channel {
    /// Wraps one end of a `SOCK_SEQPACKET` socket pair (set non-blocking here).
    ///
    /// # Errors
    ///
    /// When the descriptor cannot be made non-blocking or registered.
    #[allow(unsafe_code)]
    pub fn new(fd: OwnedFd) -> std::io::Result<Channel> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: the AsyncFd owns `fd` (an OwnedFd, whose raw descriptor never
        // changes) for its whole life.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| e.into_parts().1)?;
        Ok(Channel { fd })
    }

    /// Sends `message`, with `attached` as `SCM_RIGHTS` when given.
    ///
    /// # Errors
    ///
    /// When the peer is gone or the socket fails.
    pub async fn send(
        &self,
        message: &Message,
        attached: Option<BorrowedFd<'_>>,
    ) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(message).expect("messages always serialise");
        let fds = attached.map(|fd| [fd.as_raw_fd()]);
        loop {
            let mut guard = self.fd.writable().await?;
            let result = guard.try_io(|fd| {
                let iov = [IoSlice::new(&bytes)];
                let cmsgs: Vec<ControlMessage> = fds
                    .as_ref()
                    .map(|fds| vec![ControlMessage::ScmRights(fds)])
                    .unwrap_or_default();
                sendmsg::<()>(
                    fd.get_ref().as_raw_fd(),
                    &iov,
                    &cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match result {
                Ok(sent) => return sent.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next message and the descriptor attached to it; `None` when the peer
    /// closed its end.
    ///
    /// # Errors
    ///
    /// When the socket fails or the message is not one of [`Message`].
    pub async fn recv(&self) -> std::io::Result<Option<(Message, Option<OwnedFd>)>> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let mut guard = self.fd.readable().await?;
            let result = guard.try_io(|fd| receive(fd.get_ref().as_fd(), &mut buf));
            match result {
                Ok(received) => {
                    let Some((len, attached)) = received? else {
                        return Ok(None);
                    };
                    let message = serde_json::from_slice(&buf[..len]).map_err(|e| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                    })?;
                    return Ok(Some((message, attached)));
                }
                Err(_would_block) => continue,
            }
        }
    }
}

/// One `recvmsg`: the message's length and its attached descriptor, `None` at end
/// of stream.
#[allow(unsafe_code)]
fn receive(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
) -> std::io::Result<Option<(usize, Option<OwnedFd>)>> {
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let len = msg.bytes;
    let mut attached = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // SAFETY: the kernel has just installed `raw` in this process for
                // this message (SCM_RIGHTS); nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                if attached.is_none() {
                    attached = Some(owned);
                }
            }
        }
    }
    if len == 0 && attached.is_none() {
        return Ok(None);
    }
    Ok(Some((len, attached)))
}
