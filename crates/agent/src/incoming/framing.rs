//! HTTP/1.1 message framing for the fast path ([`super::h1`]): where a body
//! ends (RFC 9112 §6.3), tracked over the bytes as they pass, without
//! decoding them. Chunk sizes and trailer sections are read with `httparse`.

use http::HeaderMap;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};

use super::h1::{MAX_HEAD, MAX_HEADERS};

/// The most bytes a body may hold back while its next chunk-size line or
/// its trailer section is incomplete.
pub const MAX_PENDING: usize = MAX_HEAD;

/// Where a body ends.
#[derive(Debug)]
pub enum Framing {
    /// After this many more bytes.
    Length(u64),
    /// At the last chunk and its trailer section.
    Chunked(Chunks),
    /// When the connection closes (a response only).
    UntilClose,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunks {
    /// Before a chunk-size line.
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// Before the CRLF that ends chunk data.
    DataEnd,
    /// In the trailer section after the last chunk.
    Trailers,
}

impl Framing {
    /// Takes the body bytes at the start of `buf`: how many belong to the
    /// body, and whether the body ends with them.
    ///
    /// # Errors
    ///
    /// The bytes are not a valid chunked body.
    pub fn advance(&mut self, buf: &[u8]) -> Result<(usize, bool), &'static str> {
        match self {
            Framing::Length(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= n as u64;
                Ok((n, *left == 0))
            }
            Framing::UntilClose => Ok((buf.len(), false)),
            Framing::Chunked(state) => {
                let mut at = 0;
                loop {
                    let rest = &buf[at..];
                    match *state {
                        Chunks::Size => match httparse::parse_chunk_size(rest) {
                            Ok(httparse::Status::Complete((n, 0))) => {
                                at += n;
                                *state = Chunks::Trailers;
                            }
                            Ok(httparse::Status::Complete((n, size))) => {
                                at += n;
                                *state = Chunks::Data(size);
                            }
                            Ok(httparse::Status::Partial) => return Ok((at, false)),
                            Err(_) => return Err("malformed chunk size"),
                        },
                        Chunks::Data(left) => {
                            let n = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                            if n == 0 {
                                return Ok((at, false));
                            }
                            at += n;
                            let left = left - n as u64;
                            *state = if left == 0 {
                                Chunks::DataEnd
                            } else {
                                Chunks::Data(left)
                            };
                        }
                        Chunks::DataEnd => {
                            if rest.len() < 2 {
                                return if b"\r\n".starts_with(rest) {
                                    Ok((at, false))
                                } else {
                                    Err("chunk data not ended by CRLF")
                                };
                            }
                            if &rest[..2] != b"\r\n" {
                                return Err("chunk data not ended by CRLF");
                            }
                            at += 2;
                            *state = Chunks::Size;
                        }
                        Chunks::Trailers => {
                            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                            return match httparse::parse_headers(rest, &mut fields) {
                                Ok(httparse::Status::Complete((n, _))) => Ok((at + n, true)),
                                Ok(httparse::Status::Partial) => Ok((at, false)),
                                Err(_) => Err("malformed trailer section"),
                            };
                        }
                    }
                }
            }
        }
    }
}

/// The `Content-Length` of `headers`: `Ok(None)` without one.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        // A list of equal values is allowed (RFC 9110 §8.6).
        for item in value.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
                return Err("malformed Content-Length");
            }
            let n: u64 = std::str::from_utf8(item)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("malformed Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("differing Content-Length values");
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// What `Transfer-Encoding` says of a body: `None` without the header,
/// `Some(true)` when `chunked` alone, `Some(false)` for other codings that end
/// with `chunked`.
///
/// # Errors
///
/// Codings that do not end with `chunked`.
fn transfer_coding(headers: &HeaderMap) -> Result<Option<bool>, &'static str> {
    let mut codings = 0;
    let mut last_chunked = false;
    for value in headers.get_all(TRANSFER_ENCODING) {
        for coding in value.as_bytes().split(|&b| b == b',') {
            let coding = coding.trim_ascii();
            if coding.is_empty() {
                continue;
            }
            codings += 1;
            last_chunked = coding.eq_ignore_ascii_case(b"chunked");
        }
    }
    match (codings, last_chunked) {
        (0, _) if headers.contains_key(TRANSFER_ENCODING) => Err("empty Transfer-Encoding"),
        (0, _) => Ok(None),
        (1, true) => Ok(Some(true)),
        (_, true) => Ok(Some(false)),
        (_, false) => Err("a Transfer-Encoding that does not end with chunked"),
    }
}

/// The framing of a request body with `headers` (RFC 9112 §6.3): `Ok(None)`
/// for transfer codings besides `chunked`, which hyper handles.
///
/// # Errors
///
/// Both `Content-Length` and `Transfer-Encoding` (a request smuggling
/// attempt), a malformed or ambiguous `Content-Length`, a `Transfer-Encoding`
/// that does not end with `chunked`.
pub fn request_body(headers: &HeaderMap) -> Result<Option<Framing>, &'static str> {
    let length = content_length(headers)?;
    let coding = transfer_coding(headers)?;
    match (length, coding) {
        (Some(_), Some(_)) => Err(
            "both Content-Length and Transfer-Encoding (RFC 9112 §6.3: a request smuggling attempt)",
        ),
        (_, Some(true)) => Ok(Some(Framing::Chunked(Chunks::Size))),
        (_, Some(false)) => Ok(None),
        (Some(n), None) => Ok(Some(Framing::Length(n))),
        (None, None) => Ok(Some(Framing::Length(0))),
    }
}

/// The tokens of `Connection` the fast path acts on.
pub struct ConnectionTokens {
    pub close: bool,
    pub upgrade: bool,
}

/// Reads `Connection` (RFC 9110 §7.6.1).
pub fn connection_tokens(headers: &HeaderMap) -> ConnectionTokens {
    let mut tokens = ConnectionTokens {
        close: false,
        upgrade: false,
    };
    for value in headers.get_all(CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            tokens.close |= token.eq_ignore_ascii_case(b"close");
            tokens.upgrade |= token.eq_ignore_ascii_case(b"upgrade");
        }
    }
    tokens
}

/// A parsed response head.
pub struct ResponseHead {
    /// Its length in bytes.
    pub len: usize,
    pub body: Framing,
    /// A `1xx` other than `101`: the final answer follows.
    pub interim: bool,
    /// The connection ends after this answer.
    pub close: bool,
}

/// Parses the response head at the start of `buf`, the answer to a `HEAD`
/// request when `to_head`; `Ok(None)` when incomplete.
///
/// # Errors
///
/// A malformed or oversized head.
pub fn parse_response(buf: &[u8], to_head: bool) -> Result<Option<ResponseHead>, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
        Ok(_) => return Err(format!("an answer head over {MAX_HEAD} bytes")),
        Err(e) => return Err(format!("a malformed answer: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    let version = resp.version.unwrap_or(1);
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    for field in resp.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(field.name.as_bytes()),
            http::HeaderValue::from_bytes(field.value),
        ) {
            headers.append(name, value);
        }
    }
    let tokens = connection_tokens(&headers);
    let interim = (100..200).contains(&status) && status != 101;
    let body = if interim || to_head || status == 204 || status == 304 {
        Framing::Length(0)
    } else if status == 101 {
        Framing::UntilClose
    } else {
        match transfer_coding(&headers) {
            Ok(Some(true)) => Framing::Chunked(Chunks::Size),
            Ok(Some(false)) | Err(_) => Framing::UntilClose,
            Ok(None) => match content_length(&headers) {
                Ok(Some(n)) => Framing::Length(n),
                Ok(None) => Framing::UntilClose,
                Err(why) => return Err(format!("an answer with a {why}")),
            },
        }
    };
    let close = !interim && (tokens.close || version == 0 || matches!(body, Framing::UntilClose));
    Ok(Some(ResponseHead {
        len,
        body,
        interim,
        close,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `raw` one byte at a time; returns the bytes taken and whether
    /// the body ended.
    fn trickle(framing: &mut Framing, raw: &[u8]) -> Result<(usize, bool), &'static str> {
        let mut pending = Vec::new();
        let mut taken = 0;
        for &b in raw {
            pending.push(b);
            let (n, done) = framing.advance(&pending)?;
            pending.drain(..n);
            taken += n;
            if done {
                return Ok((taken, true));
            }
        }
        Ok((taken, false))
    }

    #[test]
    fn chunked_bodies_end_after_their_trailers() {
        let body = b"5;ext=1\r\nhello\r\n0\r\nx-t: 1\r\n\r\nGET / HTTP/1.1\r\n";
        let mut framing = Framing::Chunked(Chunks::Size);
        assert_eq!(framing.advance(body), Ok((body.len() - 16, true)));
        let mut framing = Framing::Chunked(Chunks::Size);
        assert_eq!(trickle(&mut framing, body), Ok((body.len() - 16, true)));
        let mut framing = Framing::Chunked(Chunks::Size);
        assert!(framing.advance(b"5\r\nhelloXX").is_err());
        let mut framing = Framing::Chunked(Chunks::Size);
        assert!(framing.advance(b"zz\r\n").is_err());
    }

    #[test]
    fn lengths_and_responses_are_framed() {
        let mut framing = Framing::Length(3);
        assert_eq!(framing.advance(b"ab"), Ok((2, false)));
        assert_eq!(framing.advance(b"cdef"), Ok((1, true)));
        let head = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", false)
            .unwrap()
            .unwrap();
        assert!(matches!(head.body, Framing::Length(2)) && !head.close);
        let head = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert!(matches!(head.body, Framing::Length(0)));
        let head = parse_response(b"HTTP/1.1 100 Continue\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(head.interim);
        let head = parse_response(b"HTTP/1.0 200 OK\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(matches!(head.body, Framing::UntilClose) && head.close);
        assert!(parse_response(b"HTTP/1.1 200", false).unwrap().is_none());
    }
}
