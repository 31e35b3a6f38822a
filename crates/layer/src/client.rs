//! This thread's connection to the proxy.
//!
//! Each thread opens its own Unix-socket connection on first need, so a thread
//! blocked on a slow remote call (a `connect` to an unreachable host) never holds
//! up another. The connection remembers the pid that opened it: after `fork` the
//! child sees a different pid and opens its own instead of sharing the parent's
//! byte stream. A broken connection (the program closed our fd, the proxy went
//! away) is dropped and re-opened once before the call fails.
//!
//! Must be called with the re-entrancy guard held (see [`crate::guard`]).

use std::{
    cell::RefCell,
    os::fd::{BorrowedFd, OwnedFd},
    os::unix::net::UnixStream,
};

use graft_protocol::{
    codec::{FrameError, encode_frame, read_frame, write_frame},
    fdpass::{FdReader, write_all_with_fds},
    layer::{LayerRequest, LayerResponse},
    remote::{FileStat, RemoteError, RemoteRequest, RemoteResponse},
    version::{FEATURE_FDS, has_feature, version_with},
};

struct Connection {
    pid: u32,
    /// Inode of our socket: if the program closed our descriptor and the number
    /// now names one of its own files, we must neither write to it nor close it.
    ino: u64,
    stream: UnixStream,
    /// The proxy passes descriptors on this connection (a local target).
    fds: bool,
}

impl Connection {
    fn still_ours(&self) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: stat is plain old data; `st` is a valid out-pointer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on any descriptor number is safe; it only fills `st`.
        let rc = unsafe {
            real!(fstat(self.stream.as_raw_fd(), &mut st): fn(std::os::raw::c_int, *mut libc::stat) -> std::os::raw::c_int)
        };
        rc == 0 && st.st_ino == self.ino
    }

    /// Drops the connection without closing a descriptor that is no longer ours.
    fn abandon(self) {
        if !self.still_ours() {
            use std::os::fd::IntoRawFd;
            let _ = self.stream.into_raw_fd();
        }
    }
}

thread_local! {
    static CONNECTION: RefCell<Option<Connection>> = const { RefCell::new(None) };
}

/// Why a request to the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The layer is inert.
    #[error("graft layer is not configured")]
    Inert,
    /// The proxy could not be reached or the link broke.
    #[error("cannot talk to the graft proxy: {0}")]
    Link(FrameError),
    /// The proxy refused the handshake.
    #[error("the graft proxy refused this layer: {0}")]
    Refused(String),
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> ClientError {
        ClientError::Link(e)
    }
}

impl ClientError {
    /// The `errno` a hook returns when the proxy cannot be asked.
    pub fn errno(&self) -> i32 {
        libc::ECONNABORTED
    }
}

fn connect() -> Result<Connection, ClientError> {
    let state = crate::state().ok_or(ClientError::Inert)?;
    let mut stream = UnixStream::connect(&state.socket_path).map_err(FrameError::Io)?;
    let pid = std::process::id();
    write_frame(
        &mut stream,
        &LayerRequest::Hello {
            version: version_with(&[FEATURE_FDS]),
            pid,
        },
    )?;
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&stream)
    ))
    .map(|m| m.ino())
    .unwrap_or(0);
    match read_frame(&mut FdReader::new(&stream))? {
        LayerResponse::Hello { version } => Ok(Connection {
            pid,
            ino,
            fds: has_feature(&version, FEATURE_FDS),
            stream,
        }),
        LayerResponse::Error { message, .. } => Err(ClientError::Refused(message)),
        other => Err(ClientError::Refused(format!(
            "unexpected handshake answer {other:?}"
        ))),
    }
}

/// One request and its response, with the descriptors that came beside it.
/// Every read is a `recvmsg` that keeps descriptors, so none is lost to a plain
/// `read`; the caller closes those it does not expect.
fn exchange(
    conn: &mut Connection,
    request: &LayerRequest,
) -> Result<(LayerResponse, Vec<OwnedFd>), FrameError> {
    write_frame(&mut conn.stream, request)?;
    let mut reader = FdReader::new(&conn.stream);
    let response = read_frame(&mut reader)?;
    Ok((response, reader.fds))
}

/// Sends `request` with `fds` beside its frame (at most
/// [`graft_protocol::fdpass::MAX_FDS_PER_SEND`]) on this thread's connection and
/// waits for the response. Not retried: the descriptors may have arrived.
///
/// # Errors
///
/// [`ClientError`] when the proxy cannot be reached or the link breaks.
pub fn request_with_fds(
    request: &LayerRequest,
    fds: &[BorrowedFd<'_>],
) -> Result<LayerResponse, ClientError> {
    if !passes_fds() {
        return Err(ClientError::Refused(
            "this connection passes no descriptors".into(),
        ));
    }
    CONNECTION.with(|cell| {
        let mut slot = cell.borrow_mut();
        let conn = slot.as_mut().ok_or(ClientError::Inert)?;
        let sent = encode_frame(request)
            .and_then(|frame| write_all_with_fds(&conn.stream, &frame, fds).map_err(FrameError::Io))
            .and_then(|()| read_frame(&mut FdReader::new(&conn.stream)));
        match sent {
            Ok(response) => Ok(response),
            Err(e) => {
                if let Some(conn) = slot.take() {
                    conn.abandon();
                }
                Err(e.into())
            }
        }
    })
}

/// Whether this thread's connection to the proxy passes descriptors (opening it
/// when needed); `false` when the proxy cannot be reached.
pub fn passes_fds() -> bool {
    CONNECTION.with(|cell| {
        let mut slot = cell.borrow_mut();
        let pid = std::process::id();
        if slot
            .as_ref()
            .is_none_or(|c| c.pid != pid || !c.still_ours())
        {
            if let Some(conn) = slot.take() {
                conn.abandon();
            }
            *slot = connect().ok();
        }
        slot.as_ref().is_some_and(|c| c.fds)
    })
}

/// Sends `request` and waits for its response.
///
/// # Errors
///
/// [`ClientError`] when the proxy cannot be reached twice in a row.
pub fn request(request: &LayerRequest) -> Result<LayerResponse, ClientError> {
    request_fds(request).map(|(response, _)| response)
}

/// As [`request`], and the descriptors the proxy passed beside the response.
///
/// # Errors
///
/// As [`request`].
pub fn request_fds(request: &LayerRequest) -> Result<(LayerResponse, Vec<OwnedFd>), ClientError> {
    CONNECTION.with(|cell| {
        let mut slot = cell.borrow_mut();
        let pid = std::process::id();
        if slot.as_ref().is_some_and(|c| c.pid != pid) {
            // Inherited through fork: the parent still uses this stream. Forget it
            // without a shutdown; dropping our copy of the fd does not affect it.
            if let Some(conn) = slot.take() {
                conn.abandon();
            }
        }
        if slot.as_ref().is_some_and(|c| !c.still_ours())
            && let Some(conn) = slot.take()
        {
            conn.abandon();
        }
        for attempt in 0..2 {
            if slot.is_none() {
                *slot = Some(connect()?);
            }
            let conn = slot.as_mut().expect("just connected");
            match exchange(conn, request) {
                Ok(response) => return Ok(response),
                Err(e) => {
                    if let Some(conn) = slot.take() {
                        conn.abandon();
                    }
                    if attempt == 1 {
                        layer_log!(warn, "proxy request failed: {e}");
                        return Err(e.into());
                    }
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    })
}

/// Opens a remote file as its own descriptor ([`RemoteRequest::OpenFd`]); `Ok`
/// with the descriptor and the file's metadata. Call only when [`passes_fds`].
///
/// # Errors
///
/// The remote error ([`RemoteError::Unsupported`]: use the relayed path).
pub fn open_fd(request: RemoteRequest) -> Result<(OwnedFd, FileStat), RemoteError> {
    match request_fds(&LayerRequest::Remote(request)) {
        Ok((LayerResponse::Remote(RemoteResponse::FdOpened { stat }), mut fds))
            if fds.len() == 1 =>
        {
            Ok((fds.remove(0), stat))
        }
        Ok((LayerResponse::Remote(RemoteResponse::Error(e)), _)) => Err(e),
        Ok((LayerResponse::Error { errno, .. }, _)) => Err(RemoteError::Os(errno)),
        Ok((other, fds)) => Err(RemoteError::Other(format!(
            "unexpected proxy answer {other:?} with {} descriptors",
            fds.len()
        ))),
        Err(e) => Err(RemoteError::Os(e.errno())),
    }
}

/// Sends a remote operation; link failures become [`RemoteError::Os`]`(ECONNABORTED)`.
pub fn remote(request: RemoteRequest) -> Result<RemoteResponse, RemoteError> {
    match self::request(&LayerRequest::Remote(request)) {
        Ok(LayerResponse::Remote(RemoteResponse::Error(e))) => Err(e),
        Ok(LayerResponse::Remote(response)) => Ok(response),
        Ok(LayerResponse::Error { errno, .. }) => Err(RemoteError::Os(errno)),
        Ok(other) => Err(RemoteError::Other(format!(
            "unexpected proxy answer {other:?}"
        ))),
        Err(e) => Err(RemoteError::Os(e.errno())),
    }
}
