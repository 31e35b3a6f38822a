//! Descriptor passing over a Unix stream socket (`SCM_RIGHTS`, see unix(7) and
//! cmsg(3)), for the links of a local target: the agent hands the proxy the real
//! file or socket, and the proxy hands it on to the layer.
//!
//! A descriptor travels beside the frame that announces it: the sender queues the
//! descriptor *before* the frame's bytes are written, and every `sendmsg` carries
//! whatever is queued, so a descriptor always reaches the peer with or before the
//! first byte of its frame (the kernel delivers ancillary data with the bytes it
//! was sent with, never after them). When more descriptors wait than one
//! `sendmsg` carries ([`MAX_FDS_PER_SEND`]), a write sends one byte with the first
//! of them, so none falls behind the frames written with it in one buffer. The receiver reads every byte with `recvmsg`,
//! queues the descriptors that arrive, and takes the oldest one when it decodes a
//! frame that announces one. Both sides keep frames that carry descriptors in one
//! order, so the queues match.
//!
//! A plain `read` on a Unix socket closes any descriptor that arrives with the
//! bytes (the kernel drops what the reader gives no room for), which is how a
//! peer that never expects descriptors (the agent reading the proxy, the proxy
//! reading a layer) refuses them: nothing to leak. A reader here refuses more than
//! [`MAX_PENDING`] descriptors nobody claimed, and a truncated control message
//! (`MSG_CTRUNC`: more descriptors at once than [`MAX_FDS_PER_SEND`]), with an
//! error that ends the link; the descriptors it did receive are closed.

use std::{
    collections::VecDeque,
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The most descriptors one `sendmsg` carries (and one `recvmsg` accepts).
///
/// 32, so that one answer to a program's `accept` takes up to 31 stolen
/// connections ahead (the layer keeps 32 at most) and a burst of new
/// connections needs a quarter of the round trips it needed at 8: with 1000
/// connections opened at once, the p99.9 of their first requests' latency
/// (1-second wrk runs, 12 each, interleaved) went from 14–56 ms (median 26) to
/// 9–42 ms (median 19); straight to the local server it is 8–10 ms. The
/// kernel's own bound is `SCM_MAX_FD`, 253 (unix(7)).
pub const MAX_FDS_PER_SEND: usize = 32;

/// The most received descriptors a link holds that no frame has claimed yet.
pub const MAX_PENDING: usize = 64;

/// Sends `bytes` on `socket` with `fds` attached (at most [`MAX_FDS_PER_SEND`]);
/// returns how many bytes the kernel took. The descriptors are duplicated into
/// the peer when any byte is sent; the caller still owns its copies.
///
/// # Errors
///
/// The `sendmsg(2)` error (`WouldBlock` on a non-blocking socket that is full);
/// `InvalidInput` for too many descriptors.
pub fn send_with_fds(socket: impl AsFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_SEND {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors for one message",
        ));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_SEND))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the descriptors do not fit the control buffer",
        ));
    }
    let sent = rustix::net::sendmsg(
        socket,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(sent)
}

/// Receives bytes into `buf` from `socket` with `recvmsg(2)`, appending the
/// descriptors that came with them to `fds` (close-on-exec set); returns how many
/// bytes arrived (0 at end of stream).
///
/// # Errors
///
/// The `recvmsg(2)` error; `InvalidData` when the peer sent more descriptors at
/// once than [`MAX_FDS_PER_SEND`] (the kernel closed the rest; the ones received
/// are closed too, as `fds` is left as it was).
pub fn recv_with_fds(
    socket: impl AsFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_SEND))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut received = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            received.extend(rights);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the peer passed more than {MAX_FDS_PER_SEND} descriptors at once; refused"),
        ));
    }
    fds.extend(received);
    Ok(msg.bytes)
}

/// A blocking [`io::Read`] over a Unix socket that keeps the descriptors that
/// arrive (for the layer, which reads its proxy connection this way).
#[derive(Debug)]
pub struct FdReader<'a, S: AsFd> {
    socket: &'a S,
    /// Descriptors received so far, oldest first.
    pub fds: Vec<OwnedFd>,
}

impl<'a, S: AsFd> FdReader<'a, S> {
    /// A reader of `socket` that has received no descriptor yet.
    pub fn new(socket: &'a S) -> Self {
        FdReader {
            socket,
            fds: Vec::new(),
        }
    }
}

impl<S: AsFd> io::Read for FdReader<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match recv_with_fds(self.socket, buf, &mut self.fds) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        }
        .and_then(|n| {
            if self.fds.len() > MAX_PENDING {
                self.fds.clear();
                Err(unclaimed())
            } else {
                Ok(n)
            }
        })
    }
}

fn unclaimed() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the peer passed more than {MAX_PENDING} descriptors no message announced"),
    )
}

/// Writes all of `bytes` to a blocking `socket`, the first piece carrying `fds`.
///
/// # Errors
///
/// As [`send_with_fds`].
pub fn write_all_with_fds(
    socket: impl AsFd,
    mut bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut fds = fds;
    while !bytes.is_empty() {
        match send_with_fds(socket.as_fd(), bytes, fds) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                bytes = &bytes[n..];
                fds = &[];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The descriptors of one link waiting to leave, and those received and not yet
/// claimed. Shared by a link's stream ([`FdStream`]) and the code that frames
/// messages.
#[derive(Debug, Default)]
pub struct FdQueues {
    outgoing: std::sync::Mutex<VecDeque<OwnedFd>>,
    incoming: std::sync::Mutex<VecDeque<OwnedFd>>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FdQueues {
    /// Queues `fd` to leave with the next bytes written. Call it before the frame
    /// that announces `fd` is written, in the order of those frames.
    pub fn push_outgoing(&self, fd: OwnedFd) {
        lock(&self.outgoing).push_back(fd);
    }

    /// Takes every descriptor still waiting to leave (a link that ended before
    /// they could), oldest first, so the caller can close them its way.
    pub fn take_outgoing(&self) -> Vec<OwnedFd> {
        lock(&self.outgoing).drain(..).collect()
    }

    /// The oldest descriptor received and not yet claimed.
    pub fn pop_incoming(&self) -> Option<OwnedFd> {
        lock(&self.incoming).pop_front()
    }

    /// How many received descriptors wait to be claimed.
    pub fn pending_incoming(&self) -> usize {
        lock(&self.incoming).len()
    }
}

/// Closes `fd`, with a reset if it is a TCP socket (`SO_LINGER` 0, socket(7)),
/// so that a passed connection nobody will take ends at once for its peer
/// instead of waiting on a socket nobody holds. Any other descriptor just
/// closes.
pub fn reset(fd: OwnedFd) {
    let linger = Some(std::time::Duration::ZERO);
    let _ = rustix::net::sockopt::set_socket_linger(&fd, linger);
    drop(fd);
}

#[cfg(feature = "fdpass-async")]
pub use stream::FdStream;

#[cfg(feature = "fdpass-async")]
mod stream {
    use std::{
        io,
        os::fd::AsFd,
        pin::Pin,
        sync::Arc,
        task::{Context, Poll, ready},
    };

    use tokio::{
        io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
        net::UnixStream,
    };

    use super::{FdQueues, MAX_FDS_PER_SEND, MAX_PENDING, lock, recv_with_fds, send_with_fds};

    /// A tokio Unix stream whose reads keep the descriptors that arrive and whose
    /// writes carry the queued ones (see the module docs).
    #[derive(Debug)]
    pub struct FdStream {
        io: UnixStream,
        fds: Arc<FdQueues>,
    }

    impl FdStream {
        /// Wraps `io`; returns the stream and its queues.
        pub fn new(io: UnixStream) -> (FdStream, Arc<FdQueues>) {
            let fds = Arc::new(FdQueues::default());
            (
                FdStream {
                    io,
                    fds: fds.clone(),
                },
                fds,
            )
        }

        /// The underlying socket.
        pub fn get_ref(&self) -> &UnixStream {
            &self.io
        }
    }

    impl AsyncRead for FdStream {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            loop {
                ready!(this.io.poll_read_ready(cx))?;
                let mut fds = Vec::new();
                let unfilled = buf.initialize_unfilled();
                let io = &this.io;
                match io.try_io(Interest::READABLE, || {
                    recv_with_fds(io.as_fd(), unfilled, &mut fds)
                }) {
                    Ok(n) => {
                        buf.advance(n);
                        if !fds.is_empty() {
                            let mut incoming = lock(&this.fds.incoming);
                            incoming.extend(fds);
                            if incoming.len() > MAX_PENDING {
                                incoming.clear();
                                return Poll::Ready(Err(super::unclaimed()));
                            }
                        }
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
    }

    impl AsyncWrite for FdStream {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            loop {
                ready!(this.io.poll_write_ready(cx))?;
                let mut outgoing = lock(&this.fds.outgoing);
                let count = outgoing.len().min(MAX_FDS_PER_SEND);
                let borrowed: Vec<_> = outgoing.iter().take(count).map(AsFd::as_fd).collect();
                // More descriptors wait than one message carries: the bytes of
                // their frames may be in `buf` too, and must not go out before
                // them. One byte now (no frame is shorter), the next descriptors
                // with the next byte.
                let bytes = if outgoing.len() > MAX_FDS_PER_SEND {
                    &buf[..buf.len().min(1)]
                } else {
                    buf
                };
                let io = &this.io;
                match io.try_io(Interest::WRITABLE, || {
                    send_with_fds(io.as_fd(), bytes, &borrowed)
                }) {
                    Ok(n) => {
                        drop(borrowed);
                        // Sent: the peer holds its own copies now.
                        outgoing.drain(..count);
                        return Poll::Ready(Ok(n));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    #[test]
    fn a_descriptor_arrives_with_its_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        write_all_with_fds(&a, b"hello", &[file.as_fd()]).unwrap();
        let mut reader = FdReader::new(&b);
        let mut buf = [0u8; 5];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(reader.fds.len(), 1);
        let got = std::fs::File::from(reader.fds.pop().unwrap());
        assert_eq!(
            rustix::fs::fstat(&got).unwrap().st_ino,
            rustix::fs::fstat(&file).unwrap().st_ino
        );
    }

    #[test]
    fn too_many_descriptors_at_once_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        const TOO_MANY: usize = MAX_FDS_PER_SEND + 12;
        let files: Vec<_> = (0..TOO_MANY)
            .map(|_| std::fs::File::open("/proc/self/status").unwrap())
            .collect();
        let before = open_fds();
        // Past the send-side check, straight with rustix: a hostile peer.
        let borrowed: Vec<_> = files.iter().map(AsFd::as_fd).collect();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(TOO_MANY))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
        rustix::net::sendmsg(&a, &[IoSlice::new(b"x")], &mut control, SendFlags::empty()).unwrap();
        let mut reader = FdReader::new(&b);
        let mut buf = [0u8; 1];
        let err = reader.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(reader.fds.is_empty());
        assert_eq!(open_fds(), before, "no received descriptor is left open");
    }

    /// More frames than one `sendmsg` carries descriptors for, each announcing
    /// one, written in one buffer (as a link's writer batches them): every
    /// frame's first byte arrives with or after its descriptor.
    #[cfg(feature = "fdpass-async")]
    #[tokio::test]
    async fn a_batch_of_frames_never_outruns_its_descriptors() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const FRAMES: usize = super::MAX_FDS_PER_SEND + 12;
        const FRAME: usize = 4;
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (mut writer, out) = FdStream::new(a);
        let (mut reader, incoming) = FdStream::new(b);
        for _ in 0..FRAMES {
            out.push_outgoing(std::fs::File::open("/proc/self/status").unwrap().into());
        }
        let batch = vec![7u8; FRAMES * FRAME];
        writer.write_all(&batch).await.unwrap();
        let mut received = 0;
        let mut claimed = 0;
        let mut buf = [0u8; FRAMES * FRAME];
        while received < batch.len() {
            let n = reader.read(&mut buf).await.unwrap();
            assert!(n > 0);
            received += n;
            // Frames begun so far: each claims its descriptor.
            let begun = received.div_ceil(FRAME);
            while claimed < begun {
                assert!(
                    incoming.pop_incoming().is_some(),
                    "frame {claimed} arrived before its descriptor"
                );
                claimed += 1;
            }
        }
        assert_eq!(claimed, FRAMES);
    }

    #[test]
    fn a_plain_read_drops_passed_descriptors() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let before = open_fds();
        write_all_with_fds(&a, b"hi", &[file.as_fd()]).unwrap();
        let mut buf = [0u8; 2];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(open_fds(), before);
    }
}
