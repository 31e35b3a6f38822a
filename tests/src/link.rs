//! A hand-driven client of the agent's port-forwarded link, for tests that
//! play graft or an attacker on the pod's loopback: TLS 1.3 pinned to the
//! certificate the agent printed ([`graft_protocol::tls`]), the relink attach
//! ([`graft_protocol::relink`]) with a chosen token and credential, then
//! session frames wrapped in relink data records.
//!
//! Blocking (rustls' `StreamOwned` over a `std` socket), and every byte the
//! client writes to the socket is recorded ([`LinkClient::written`]) so that a
//! test can replay it as an eavesdropper would.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use graft_protocol::codec::{encode_frame, read_frame};
use graft_protocol::link::{AgentMessage, ClientMessage};
use graft_protocol::relink::MAGIC;
use graft_protocol::tls::{self, CERT_LINE_PREFIX, Fingerprint};
use rustls::pki_types::ServerName;

/// The fingerprint in an agent's `link-cert sha256:HEX` stdout line.
///
/// # Panics
///
/// When `stdout` has no such line.
pub fn link_cert(stdout: &str) -> Fingerprint {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(CERT_LINE_PREFIX))
        .unwrap_or_else(|| panic!("the agent printed no link-cert line:\n{stdout}"))
        .parse()
        .expect("a well-formed fingerprint")
}

/// A socket that keeps a copy of everything written to it.
#[derive(Debug)]
pub struct Recorded {
    inner: TcpStream,
    written: Arc<Mutex<Vec<u8>>>,
}

impl Read for Recorded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Recorded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// One TLS connection to the agent's link port.
pub struct LinkClient {
    tls: rustls::StreamOwned<rustls::ClientConnection, Recorded>,
    written: Arc<Mutex<Vec<u8>>>,
    /// Relink payload bytes received and not yet taken as frames.
    pending: Vec<u8>,
}

impl LinkClient {
    /// Connects to `addr` (call it inside the target's network namespace) and
    /// completes a TLS handshake that accepts only `pin`.
    ///
    /// # Errors
    ///
    /// When the connection or the handshake fails (another certificate, no TLS).
    pub fn connect(addr: SocketAddr, pin: Fingerprint) -> io::Result<LinkClient> {
        let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let written = Arc::new(Mutex::new(Vec::new()));
        let mut sock = Recorded {
            inner: sock,
            written: written.clone(),
        };
        let name = ServerName::try_from(tls::SERVER_NAME).unwrap();
        let mut conn = rustls::ClientConnection::new(tls::client_config(pin), name)
            .map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).map_err(tls::plain_error)?;
        }
        Ok(LinkClient {
            tls: rustls::StreamOwned::new(conn, sock),
            written,
            pending: Vec::new(),
        })
    }

    /// Everything written to the socket so far (TLS records, as on the wire).
    pub fn written(&self) -> Vec<u8> {
        self.written.lock().unwrap().clone()
    }

    /// Sends the relink attach with `token` and `credential`, and returns the
    /// agent's `received` count.
    ///
    /// # Errors
    ///
    /// `UnexpectedEof` (or a reset) when the agent refuses the attach.
    pub fn attach(&mut self, token: [u8; 16], credential: &[u8]) -> io::Result<u64> {
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&token);
        header.extend_from_slice(&0u64.to_be_bytes());
        header.extend_from_slice(&(credential.len() as u16).to_be_bytes());
        header.extend_from_slice(credential);
        self.tls.write_all(&header)?;
        self.tls.flush()?;
        let mut answer = [0u8; 16];
        self.tls.read_exact(&mut answer)?;
        if &answer[..8] != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a relink answer",
            ));
        }
        Ok(u64::from_be_bytes(answer[8..].try_into().unwrap()))
    }

    /// Sends one session message in a relink data record.
    ///
    /// # Errors
    ///
    /// When the link is gone.
    pub fn send(&mut self, message: &ClientMessage) -> io::Result<()> {
        let frame = encode_frame(message).map_err(io::Error::other)?;
        let mut record = vec![0u8];
        record.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        record.extend_from_slice(&frame);
        self.tls.write_all(&record)?;
        self.tls.flush()
    }

    /// Closes the link as graft does: a relink close record, then TLS's
    /// close_notify. The agent then ends the session (a transport that just
    /// drops is one it waits for the client to replace).
    ///
    /// # Errors
    ///
    /// When the link is already gone.
    pub fn close(mut self) -> io::Result<()> {
        self.tls.write_all(&[2, 0, 0, 0, 0])?;
        self.tls.conn.send_close_notify();
        self.tls.flush()
    }

    /// Reads the next session message (skipping the agent's acknowledgements).
    ///
    /// # Errors
    ///
    /// When the link ends or breaks first.
    pub fn receive(&mut self) -> io::Result<AgentMessage> {
        loop {
            if self.pending.len() >= 4 {
                let len = u32::from_be_bytes(self.pending[..4].try_into().unwrap()) as usize;
                if self.pending.len() >= 4 + len {
                    let frame: Vec<u8> = self.pending.drain(..4 + len).collect();
                    return read_frame(&mut &frame[..]).map_err(io::Error::other);
                }
            }
            let mut head = [0u8; 5];
            self.tls.read_exact(&mut head)?;
            let len = u32::from_be_bytes(head[1..].try_into().unwrap()) as usize;
            let mut payload = vec![0u8; len];
            self.tls.read_exact(&mut payload)?;
            match head[0] {
                0 => self.pending.extend_from_slice(&payload),
                1 => {}
                kind => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("relink record of kind {kind}"),
                    ));
                }
            }
        }
    }
}
