//! The relink's wire format: the attach exchange that opens every transport, and
//! the records that follow it (see the format in the parent module's docs).

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    BoxTransport, KIND_ACK, KIND_CLOSE, KIND_DATA, LEGACY_MAGIC, MAGIC, MAX_CREDENTIAL, MAX_RECORD,
    Token,
};

/// What a client sent to attach a transport, as the agent read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Attach {
    /// The link's token.
    pub token: Token,
    /// Payload bytes the client has received.
    pub received: u64,
    /// What the client proves itself with (the session secret).
    pub credential: Vec<u8>,
}

impl std::fmt::Debug for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attach")
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

/// Reads the client's attach header (magic included).
///
/// # Errors
///
/// `InvalidData` when the magic is wrong; I/O errors as they come.
pub async fn read_attach<T: AsyncRead + Unpin>(t: &mut T) -> io::Result<Attach> {
    let mut magic = [0u8; 8];
    t.read_exact(&mut magic).await?;
    if &magic != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a graft relink transport",
        ));
    }
    let mut token = [0u8; 16];
    t.read_exact(&mut token).await?;
    let received = t.read_u64().await?;
    let len = usize::from(t.read_u16().await?);
    if len > MAX_CREDENTIAL {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a relink credential of {len} bytes (at most {MAX_CREDENTIAL})"),
        ));
    }
    let mut credential = vec![0u8; len];
    t.read_exact(&mut credential).await?;
    Ok(Attach {
        token,
        received,
        credential,
    })
}

/// Answers a client of graft before protocol 0.3 (its transport began with
/// [`LEGACY_MAGIC`], in plaintext; the caller has read its 32-byte attach) in
/// the old relink format: the attach answer, then, once the client's first
/// data record (its `Hello`) has arrived, one data record carrying `frame` (an
/// encoded `Hello` rejection that says what to do) and a close record. The old
/// client thus shows the reason instead of a broken link: had the answer come
/// before its `Hello` was written, the close would end its link first.
///
/// # Errors
///
/// I/O errors as they come; `InvalidData` when the client sends something else.
pub async fn refuse_legacy<T: AsyncRead + AsyncWrite + Unpin>(
    t: &mut T,
    frame: &[u8],
) -> io::Result<()> {
    t.write_all(LEGACY_MAGIC).await?;
    t.write_all(&0u64.to_be_bytes()).await?;
    t.flush().await?;
    let mut buf = BytesMut::new();
    loop {
        match read_record(t, &mut buf).await? {
            (KIND_DATA, _) => break,
            (KIND_ACK, _) => continue,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not an old graft relink client",
                ));
            }
        }
    }
    let mut out = Vec::new();
    encode_record(&mut out, KIND_DATA, frame);
    encode_record(&mut out, KIND_CLOSE, &[]);
    write_records(t, &mut out).await?;
    t.flush().await?;
    t.shutdown().await
}

pub(super) async fn client_attach(
    t: &mut BoxTransport,
    token: &Token,
    received: u64,
    credential: &[u8],
) -> io::Result<u64> {
    let mut header = Vec::with_capacity(34 + credential.len());
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(token);
    header.extend_from_slice(&received.to_be_bytes());
    let len = u16::try_from(credential.len()).expect("checked against MAX_CREDENTIAL");
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(credential);
    t.write_all(&header).await?;
    t.flush().await?;
    let mut magic = [0u8; 8];
    t.read_exact(&mut magic).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the agent closed the link at the attach: it refused the session secret \
                 (another session's agent?) or the link's token",
            )
        } else {
            e
        }
    })?;
    if &magic != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the agent does not speak graft relink",
        ));
    }
    t.read_u64().await
}

pub(super) async fn server_answer(t: &mut BoxTransport, received: u64) -> io::Result<()> {
    let mut answer = Vec::with_capacity(16);
    answer.extend_from_slice(MAGIC);
    answer.extend_from_slice(&received.to_be_bytes());
    t.write_all(&answer).await?;
    t.flush().await
}

/// Reads one record: `(kind, payload)`.
pub(super) async fn read_record<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> io::Result<(u8, Bytes)> {
    let kind = rd.read_u8().await?;
    let len = rd.read_u32().await? as usize;
    if len > MAX_RECORD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "relink record too large",
        ));
    }
    buf.resize(len, 0);
    rd.read_exact(&mut buf[..]).await?;
    Ok((kind, buf.split().freeze()))
}

/// Appends one record to `out`.
pub(super) fn encode_record(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Writes records with one write: a transport that sends each write as a
/// message of its own (kube's port-forward WebSocket, on a connection to the
/// API server without `TCP_NODELAY`) then sends one segment, not a header or
/// an acknowledgement that Nagle's algorithm holds back behind the peer's
/// delayed ACK (tens of milliseconds per request) with what follows it.
pub(super) async fn write_records<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    wr.write_all(out).await?;
    out.clear();
    wr.flush().await
}
