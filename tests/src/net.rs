//! Small network clients for assertions: a raw HTTP/1.0 GET, curl, and polling.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// GETs `path` from `addr` with HTTP/1.0 and returns the trimmed body.
///
/// # Errors
///
/// Whatever connecting, writing or reading fails with (within `timeout` each).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    match reply.split_once("\r\n\r\n") {
        Some((_, body)) => Ok(body.trim().to_owned()),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an HTTP reply: {reply:?}"),
        )),
    }
}

/// Runs `curl` on the host (not under graft) and returns the trimmed body, or a
/// description of the failure. Gives up after 3 seconds.
///
/// # Errors
///
/// curl's exit code and error message when it fails.
pub fn curl(url: &str) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "-g", "--noproxy", "*", "--max-time", "3", url])
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "curl {url} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Calls `probe` every `interval` until it returns `Some`, for at most `timeout`;
/// returns the value, or `None` when the time ran out.
pub fn wait_until<T>(
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(interval);
    }
}
