//! A parser of one direction of an HTTP/1.x connection, without I/O: bytes go in
//! with [`Parser::feed`] as they were read, whole messages (head, the first
//! [`BODY_KEEP`] bytes of the body and its full length) come out.
//!
//! Message framing follows RFC 9112 §6: `Transfer-Encoding: chunked`, else
//! `Content-Length`, else (responses only) the body runs to the end of the
//! connection; responses to `HEAD`, and 1xx, 204 and 304 responses, have no body
//! (RFC 9110 §6.4.1). Heads are parsed by `httparse`. Nothing on the wire is
//! trusted beyond the limits here: a head over [`MAX_HEAD`] bytes or
//! [`MAX_HEADERS`] fields, a malformed head or length, or a switch of protocol
//! (101) ends the parsing of the connection; only a body's first [`BODY_KEEP`]
//! bytes are kept, whatever its length says.

use std::time::{Instant, SystemTime};

use crate::clock::wall_of;

/// The largest message head (start line and fields) parsed, in bytes.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields one head may carry.
pub const MAX_HEADERS: usize = 128;
/// How many bytes of each body are kept.
pub const BODY_KEEP: usize = 64 * 1024;
/// The longest chunk-size line of a chunked body (RFC 9112 §7.1), in bytes.
const MAX_CHUNK_LINE: usize = 4096;

/// Which direction a parser reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Requests, from the client.
    Request,
    /// Responses, from the server.
    Response,
}

/// The start line and fields of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Requests: the method.
    pub method: String,
    /// Requests: the request target as sent (usually path and query).
    pub target: String,
    /// Responses: the status code.
    pub status: u16,
    /// Responses: the reason phrase.
    pub reason: String,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: String,
    /// The fields in order, names as sent, values decoded as UTF-8 (lossily).
    pub headers: Vec<(String, String)>,
    /// The head's length on the wire, in bytes.
    pub len: usize,
}

impl Head {
    /// The value of the first field named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One whole (or, at the end of the connection, cut) message.
#[derive(Debug, Clone)]
pub struct Message {
    /// Its head.
    pub head: Head,
    /// The first [`BODY_KEEP`] bytes of the body (chunked bodies decoded).
    pub body: Vec<u8>,
    /// The body's full length, in bytes.
    pub body_len: u64,
    /// False when the connection ended before the body did.
    pub complete: bool,
    /// When its first byte was read.
    pub started: Instant,
    /// The wall-clock time of `started`.
    pub started_wall: SystemTime,
    /// When its last byte was read.
    pub finished: Instant,
}

/// How the current body ends.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// Chunked, at this point of the chunk grammar.
    Chunked(Chunk),
    /// At the end of the connection.
    UntilClose,
}

/// Where a chunked body is (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data; this many bytes remain.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line.
    Trailers,
}

/// What the parser is doing.
///
/// `Head` → `Body` → `Head` for each message; any state → `Stopped` on bad input,
/// a limit or a protocol switch, for good.
#[derive(Debug)]
enum State {
    /// Waiting for a whole head.
    Head,
    /// Reading the body of `current`.
    Body(Framing),
    /// No more parsing on this connection; why.
    Stopped(String),
}

/// The parser of one direction of one connection.
#[derive(Debug)]
pub struct Parser {
    side: Side,
    buf: Vec<u8>,
    state: State,
    current: Option<Message>,
    /// When the first byte not yet part of a message was read.
    pending_start: Option<Instant>,
}

impl Parser {
    /// A parser of `side`.
    pub fn new(side: Side) -> Parser {
        Parser {
            side,
            buf: Vec::new(),
            state: State::Head,
            current: None,
            pending_start: None,
        }
    }

    /// Why parsing stopped, if it did.
    pub fn stopped(&self) -> Option<&str> {
        match &self.state {
            State::Stopped(why) => Some(why),
            _ => None,
        }
    }

    /// Feeds bytes read at `now`; returns the messages they completed.
    /// `body_less` is asked, for each final response head, whether the request it
    /// answers makes it body-less (a `HEAD` request); it is never called for
    /// requests.
    pub fn feed(
        &mut self,
        data: &[u8],
        now: Instant,
        body_less: &mut dyn FnMut() -> bool,
    ) -> Vec<Message> {
        let mut out = Vec::new();
        if matches!(self.state, State::Stopped(_)) || data.is_empty() {
            return out;
        }
        if self.pending_start.is_none() && self.current.is_none() {
            self.pending_start = Some(now);
        }
        self.buf.extend_from_slice(data);
        while self.step(now, body_less, &mut out) {}
        out
    }

    /// The end of the connection: a body that runs to the close is complete, one
    /// cut short comes out with `complete: false`.
    pub fn finish(&mut self, now: Instant) -> Option<Message> {
        let framing = match self.state {
            State::Body(framing) => framing,
            _ => return None,
        };
        let mut message = self.current.take()?;
        message.complete = matches!(framing, Framing::UntilClose);
        message.finished = now;
        self.state = State::Stopped("the connection ended".into());
        Some(message)
    }

    /// One step of progress; false when more bytes are needed.
    fn step(
        &mut self,
        now: Instant,
        body_less: &mut dyn FnMut() -> bool,
        out: &mut Vec<Message>,
    ) -> bool {
        match self.state {
            State::Stopped(_) => false,
            State::Head => self.head(now, body_less, out),
            State::Body(framing) => self.body(framing, now, out),
        }
    }

    fn stop(&mut self, why: impl Into<String>) -> bool {
        self.state = State::Stopped(why.into());
        self.buf = Vec::new();
        self.current = None;
        false
    }

    fn head(
        &mut self,
        now: Instant,
        body_less: &mut dyn FnMut() -> bool,
        out: &mut Vec<Message>,
    ) -> bool {
        // RFC 9112 §2.2: empty lines before a request line are ignored.
        let blank = self
            .buf
            .iter()
            .take_while(|b| **b == b'\r' || **b == b'\n')
            .count();
        if blank > 0 {
            self.buf.drain(..blank);
        }
        if self.buf.is_empty() {
            return false;
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let parsed = match self.side {
            Side::Request => {
                let mut req = httparse::Request::new(&mut fields);
                match req.parse(&self.buf) {
                    Ok(httparse::Status::Complete(len)) => Ok(Some((
                        Head {
                            method: req.method.unwrap_or_default().to_owned(),
                            target: req.path.unwrap_or_default().to_owned(),
                            status: 0,
                            reason: String::new(),
                            version: version(req.version),
                            headers: owned(req.headers),
                            len,
                        },
                        len,
                    ))),
                    Ok(httparse::Status::Partial) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            Side::Response => {
                let mut resp = httparse::Response::new(&mut fields);
                match resp.parse(&self.buf) {
                    Ok(httparse::Status::Complete(len)) => Ok(Some((
                        Head {
                            method: String::new(),
                            target: String::new(),
                            status: resp.code.unwrap_or_default(),
                            reason: resp.reason.unwrap_or_default().to_owned(),
                            version: version(resp.version),
                            headers: owned(resp.headers),
                            len,
                        },
                        len,
                    ))),
                    Ok(httparse::Status::Partial) => Ok(None),
                    Err(e) => Err(e),
                }
            }
        };
        let (head, len) = match parsed {
            Ok(Some(found)) => found,
            Ok(None) if self.buf.len() > MAX_HEAD => {
                return self.stop(format!("a message head exceeds {MAX_HEAD} bytes"));
            }
            Ok(None) => return false,
            Err(e) => return self.stop(format!("not HTTP/1.x: {e}")),
        };
        self.buf.drain(..len);
        let started = self.pending_start.take().unwrap_or(now);
        if self.side == Side::Response && (100..200).contains(&head.status) && head.status != 101 {
            // An interim response: the final one follows.
            self.pending_start = (!self.buf.is_empty()).then_some(now);
            return true;
        }
        let framing = match self.framing(&head, body_less) {
            Ok(framing) => framing,
            Err(why) => return self.stop(why),
        };
        let switching = self.side == Side::Response && head.status == 101;
        let message = Message {
            head,
            body: Vec::new(),
            body_len: 0,
            complete: true,
            started,
            started_wall: wall_of(started),
            finished: now,
        };
        if switching {
            out.push(message);
            return self.stop("the connection switched protocols");
        }
        self.current = Some(message);
        self.state = State::Body(framing);
        true
    }

    /// How the body of `head` ends (RFC 9112 §6.3).
    fn framing(&self, head: &Head, body_less: &mut dyn FnMut() -> bool) -> Result<Framing, String> {
        if self.side == Side::Response && (body_less() || head.status == 204 || head.status == 304)
        {
            return Ok(Framing::Length(0));
        }
        if let Some(te) = head.header("transfer-encoding") {
            let last = te.rsplit(',').next().unwrap_or("").trim();
            return if last.eq_ignore_ascii_case("chunked") {
                Ok(Framing::Chunked(Chunk::Size))
            } else if self.side == Side::Response {
                Ok(Framing::UntilClose)
            } else {
                Err(format!("a request body with transfer coding {te:?}"))
            };
        }
        let lengths: Vec<&str> = head
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .collect();
        if let Some(first) = lengths.first() {
            if lengths.iter().any(|l| l != first) {
                return Err("conflicting Content-Length fields".into());
            }
            return first
                .parse::<u64>()
                .map(Framing::Length)
                .map_err(|_| format!("a bad Content-Length {first:?}"));
        }
        Ok(match self.side {
            Side::Request => Framing::Length(0),
            Side::Response => Framing::UntilClose,
        })
    }

    fn body(&mut self, framing: Framing, now: Instant, out: &mut Vec<Message>) -> bool {
        match framing {
            Framing::Length(0) => {
                self.complete(now, out);
                true
            }
            Framing::Length(left) => {
                let n = self.take_body(left);
                if n == 0 {
                    return false;
                }
                self.state = State::Body(Framing::Length(left - n));
                true
            }
            Framing::UntilClose => {
                self.take_body(u64::MAX);
                false
            }
            Framing::Chunked(chunk) => self.chunk(chunk, now, out),
        }
    }

    fn chunk(&mut self, chunk: Chunk, now: Instant, out: &mut Vec<Message>) -> bool {
        match chunk {
            Chunk::Size => {
                let Some(end) = find_crlf(&self.buf) else {
                    return if self.buf.len() > MAX_CHUNK_LINE {
                        self.stop("a chunk-size line is too long")
                    } else {
                        false
                    };
                };
                match httparse::parse_chunk_size(&self.buf[..end + 2]) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        self.buf.drain(..used);
                        self.state = State::Body(Framing::Chunked(if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        }));
                        true
                    }
                    _ => self.stop("a bad chunk-size line"),
                }
            }
            Chunk::Data(left) => {
                let n = self.take_body(left);
                if n == 0 {
                    return false;
                }
                let next = if left == n {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n)
                };
                self.state = State::Body(Framing::Chunked(next));
                true
            }
            Chunk::DataEnd => {
                if self.buf.len() < 2 {
                    return false;
                }
                if &self.buf[..2] != b"\r\n" {
                    return self.stop("a chunk not followed by CRLF");
                }
                self.buf.drain(..2);
                self.state = State::Body(Framing::Chunked(Chunk::Size));
                true
            }
            Chunk::Trailers => {
                let Some(end) = find_crlf(&self.buf) else {
                    return if self.buf.len() > MAX_HEAD {
                        self.stop("a trailer field is too long")
                    } else {
                        false
                    };
                };
                self.buf.drain(..end + 2);
                if end == 0 {
                    self.complete(now, out);
                }
                true
            }
        }
    }

    /// Moves up to `max` buffered bytes into the body; returns how many.
    fn take_body(&mut self, max: u64) -> u64 {
        let n = (self.buf.len() as u64).min(max) as usize;
        if n == 0 {
            return 0;
        }
        if let Some(message) = &mut self.current {
            let room = BODY_KEEP.saturating_sub(message.body.len());
            message.body.extend_from_slice(&self.buf[..n.min(room)]);
            message.body_len += n as u64;
        }
        self.buf.drain(..n);
        n as u64
    }

    fn complete(&mut self, now: Instant, out: &mut Vec<Message>) {
        if let Some(mut message) = self.current.take() {
            message.finished = now;
            out.push(message);
        }
        self.state = State::Head;
        self.pending_start = (!self.buf.is_empty()).then_some(now);
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

fn version(minor: Option<u8>) -> String {
    format!("HTTP/1.{}", minor.unwrap_or(1))
}

fn owned(fields: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(side: Side, chunks: &[&[u8]]) -> (Vec<Message>, Parser) {
        let mut p = Parser::new(side);
        let now = Instant::now();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(p.feed(c, now, &mut || false));
        }
        (out, p)
    }

    #[test]
    fn requests_split_anywhere_come_out_whole() {
        let wire = b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n";
        for cut in 1..wire.len() {
            let (msgs, _) = all(Side::Request, &[&wire[..cut], &wire[cut..]]);
            assert_eq!(msgs.len(), 2, "cut at {cut}");
            assert_eq!(msgs[0].head.method, "POST");
            assert_eq!(msgs[0].head.target, "/a?b=1");
            assert_eq!(msgs[0].body, b"hello");
            assert_eq!(msgs[1].head.method, "GET");
            assert_eq!(msgs[1].body_len, 0);
        }
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: v\r\n\r\n";
        for cut in 1..wire.len() {
            let (msgs, _) = all(Side::Response, &[&wire[..cut], &wire[cut..]]);
            assert_eq!(msgs.len(), 1, "cut at {cut}");
            assert_eq!(msgs[0].body, b"abcde");
            assert_eq!(msgs[0].head.status, 200);
        }
    }

    #[test]
    fn a_body_to_the_close_ends_with_the_connection() {
        let (msgs, mut p) = all(Side::Response, &[b"HTTP/1.0 200 OK\r\n\r\nsome", b" data"]);
        assert!(msgs.is_empty());
        let last = p.finish(Instant::now()).expect("a message at the close");
        assert!(last.complete);
        assert_eq!(last.body, b"some data");
    }

    #[test]
    fn interim_responses_are_skipped_and_head_answers_have_no_body() {
        let mut p = Parser::new(Side::Response);
        let out = p.feed(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            Instant::now(),
            &mut || true,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].head.status, 200);
        assert_eq!(out[0].body_len, 0);
    }

    #[test]
    fn only_the_first_bytes_of_a_large_body_are_kept() {
        let body = vec![b'x'; BODY_KEEP * 3];
        let head = format!(
            "PUT /big HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let (msgs, _) = all(Side::Request, &[head.as_bytes(), &body]);
        assert_eq!(msgs[0].body.len(), BODY_KEEP);
        assert_eq!(msgs[0].body_len, body.len() as u64);
    }

    #[test]
    fn hostile_input_stops_the_parser_instead_of_growing_it() {
        let (msgs, p) = all(Side::Request, &[&vec![b'A'; MAX_HEAD + 10]]);
        assert!(msgs.is_empty());
        assert!(p.stopped().is_some());
        let (_, p) = all(
            Side::Request,
            &[b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"],
        );
        assert!(p.stopped().unwrap().contains("conflicting"));
        let (_, p) = all(
            Side::Request,
            &[b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"],
        );
        assert!(p.stopped().is_some());
        let (_, p) = all(Side::Response, &[b"\x16\x03\x01\x00\xa5garbage\r\n\r\n"]);
        assert!(p.stopped().is_some());
    }
}
