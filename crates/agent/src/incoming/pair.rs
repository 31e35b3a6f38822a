//! A connected pair of loopback TCP sockets, made in the agent's network
//! namespace: one end goes to a session's program as a descriptor
//! (SCM_RIGHTS), the agent writes the requests that the program's filter
//! matched to the other. The program then reads a real TCP socket (its socket
//! options, `TCP_NODELAY` included, work as on any accepted connection) and
//! no byte crosses the session's link.
//!
//! The listener lives for one `connect`: a connection from anyone else that
//! slips into it in that time is not the agent's own (its address differs)
//! and is closed, never handed to the program.

use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;

/// How many strangers' connections [`loopback_pair`] closes before it gives
/// up.
const STRANGERS: usize = 8;

/// Makes a connected loopback TCP pair: the agent's end (non-blocking, for
/// tokio) and the end to pass, both with `TCP_NODELAY`.
///
/// # Errors
///
/// No loopback in the namespace (`bind`/`connect` fail), or more than
/// [`STRANGERS`] foreign connections raced into the listener.
pub fn loopback_pair() -> io::Result<(tokio::net::TcpStream, OwnedFd)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    // A loopback connect completes at once: the connection is queued before
    // `connect` returns, so a non-blocking accept finds it.
    let ours = TcpStream::connect(listener.local_addr()?)?;
    let ours_addr = ours.local_addr()?;
    listener.set_nonblocking(true)?;
    for _ in 0..STRANGERS {
        let (theirs, from) = listener.accept()?;
        if from != ours_addr {
            tracing::warn!(%from, "a stranger connected to the agent's transient loopback listener; closed");
            continue;
        }
        ours.set_nodelay(true)?;
        theirs.set_nodelay(true)?;
        ours.set_nonblocking(true)?;
        theirs.set_nonblocking(false)?;
        return Ok((tokio::net::TcpStream::from_std(ours)?, theirs.into()));
    }
    Err(io::Error::other(
        "strangers kept connecting to the agent's transient loopback listener",
    ))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_two_ends_are_connected() {
        let (mut ours, theirs) = super::loopback_pair().unwrap();
        let mut theirs = std::net::TcpStream::from(theirs);
        ours.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        theirs.write_all(b"pong").unwrap();
        ours.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        assert_eq!(
            ours.peer_addr().unwrap(),
            theirs.local_addr().unwrap(),
            "the pair is one connection"
        );
    }
}
