//! Reading a tapped connection: the stream of
//! [`graft_protocol::incoming::tap`] frames the agent sends for a mirror that asked
//! for responses, demultiplexed into the two directions, each parsed by
//! [`crate::http1`], and requests paired with their responses in order
//! (HTTP/1.1 answers requests in the order they came, RFC 9112 §9.3.2).

use std::{collections::VecDeque, sync::Arc, time::Instant};

use graft_protocol::incoming::tap::{self, Direction, Frame};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{
    clock,
    exchange::{Exchange, Origin},
    http1::{Message, Parser, Side},
};

/// Why a tapped connection could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Reading the stream failed.
    #[error("reading a tapped connection failed: {0}")]
    Io(std::io::Error),
    /// The stream does not carry tap frames (an agent that does not speak
    /// protocol 0.4, or a corrupted stream).
    #[error(
        "a tapped connection sent a bad frame ({0}); are graft and graft-agent from the same release?"
    )]
    Frame(String),
}

impl From<std::io::Error> for TapError {
    fn from(e: std::io::Error) -> TapError {
        TapError::Io(e)
    }
}

/// The two directions of one connection and the pairing of their messages.
#[derive(Debug)]
pub struct Pairing {
    origin: Arc<Origin>,
    requests: Parser,
    responses: Parser,
    /// Whether each request whose head was seen, not yet answered, was a `HEAD`.
    heads: VecDeque<bool>,
    /// Whole requests not yet answered, oldest first.
    waiting: VecDeque<Message>,
    /// Whole responses whose request is not whole yet (an early answer).
    early: VecDeque<Message>,
}

impl Pairing {
    /// A connection at `origin` with nothing read yet.
    pub fn new(origin: Arc<Origin>) -> Pairing {
        Pairing {
            origin,
            requests: Parser::new(Side::Request),
            responses: Parser::new(Side::Response),
            heads: VecDeque::new(),
            waiting: VecDeque::new(),
            early: VecDeque::new(),
        }
    }

    /// Feeds bytes read in `direction` at `now`; returns the exchanges they completed.
    pub fn feed(&mut self, direction: Direction, bytes: &[u8], now: Instant) -> Vec<Exchange> {
        match direction {
            Direction::Request => {
                for request in self.requests.feed(bytes, now, &mut || false) {
                    self.heads.push_back(request.head.method == "HEAD");
                    self.waiting.push_back(request);
                }
            }
            Direction::Response => {
                let heads = &self.heads;
                // Responses already whole but not paired answer the first requests.
                let mut answered = self.early.len();
                let responses = self.responses.feed(bytes, now, &mut || {
                    let head = heads.get(answered).copied().unwrap_or(false);
                    answered += 1;
                    head
                });
                self.early.extend(responses);
            }
        }
        self.pair()
    }

    /// The end of the connection: requests cut short or left unanswered come out
    /// with what there is.
    pub fn finish(&mut self, now: Instant) -> Vec<Exchange> {
        if let Some(request) = self.requests.finish(now) {
            self.waiting.push_back(request);
        }
        if let Some(response) = self.responses.finish(now) {
            self.early.push_back(response);
        }
        let mut out = self.pair();
        while let Some(request) = self.waiting.pop_front() {
            out.push(Exchange::new(self.origin.clone(), request, None));
        }
        out
    }

    /// How many requests were read whole and not answered yet.
    pub fn unanswered(&self) -> usize {
        self.waiting.len()
    }

    fn pair(&mut self) -> Vec<Exchange> {
        let mut out = Vec::new();
        while !self.waiting.is_empty() && !self.early.is_empty() {
            let (Some(request), Some(response)) =
                (self.waiting.pop_front(), self.early.pop_front())
            else {
                break;
            };
            self.heads.pop_front();
            out.push(Exchange::new(self.origin.clone(), request, Some(response)));
        }
        out
    }
}

/// Reads the tap frames of one connection from `stream` until it ends, calling
/// `each` with every exchange as soon as its response is whole.
///
/// Messages are timed by the stream's time frames, when it has them (when the
/// agent captured their bytes: two connections read at once still keep the
/// order and the gaps of their requests), and by when they are read here
/// before the first one.
///
/// # Errors
///
/// [`TapError::Io`] when reading fails, [`TapError::Frame`] on a bad frame; the
/// exchanges completed before were already passed to `each`.
///
/// # Cancel safety
///
/// Not cancel safe: bytes read but not yet parsed are lost.
pub async fn read_tapped<R: AsyncRead + Unpin>(
    mut stream: R,
    origin: Arc<Origin>,
    mut each: impl FnMut(Exchange),
) -> Result<(), TapError> {
    let mut pairing = Pairing::new(origin);
    let mut chunk = vec![0u8; tap::MAX_CHUNK];
    let mut captured: Option<Instant> = None;
    let now = |captured: Option<Instant>| captured.unwrap_or_else(Instant::now);
    loop {
        let mut header = [0u8; tap::HEADER_LEN];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => {
                pairing
                    .finish(now(captured))
                    .into_iter()
                    .for_each(&mut each);
                return Err(e.into());
            }
        }
        match tap::parse_header(header).map_err(TapError::Frame)? {
            Frame::Time => {
                let mut at = [0u8; tap::TIME_LEN];
                stream.read_exact(&mut at).await?;
                captured = Some(clock::instant_of(tap::parse_time(at)));
            }
            Frame::Bytes(direction, len) => {
                stream.read_exact(&mut chunk[..len]).await?;
                for exchange in pairing.feed(direction, &chunk[..len], now(captured)) {
                    each(exchange);
                }
            }
        }
    }
    pairing.finish(now(captured)).into_iter().for_each(each);
    Ok(())
}

/// Reads the chunks of one connection as they come (e.g. the proxy's copy of a
/// stolen connection, `graft_proxy::TappedConnection`) until the channel ends,
/// calling `each` with every exchange as soon as its response is whole.
pub async fn read_chunks(
    mut chunks: tokio::sync::mpsc::Receiver<(Direction, Vec<u8>)>,
    origin: Arc<Origin>,
    mut each: impl FnMut(Exchange),
) {
    let mut pairing = Pairing::new(origin);
    while let Some((direction, bytes)) = chunks.recv().await {
        for exchange in pairing.feed(direction, &bytes, Instant::now()) {
            each(exchange);
        }
    }
    pairing.finish(Instant::now()).into_iter().for_each(each);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::Route;
    use graft_protocol::incoming::IncomingMode;

    fn origin() -> Arc<Origin> {
        Arc::new(Origin {
            target: "pid:1".into(),
            port: 80,
            mode: IncomingMode::Mirror,
            client: None,
            route: Route::Target,
            filter: None,
        })
    }

    fn frame(direction: Direction, bytes: &[u8]) -> Vec<u8> {
        let mut out = tap::header(direction, bytes.len()).to_vec();
        out.extend_from_slice(bytes);
        out
    }

    #[tokio::test]
    async fn pipelined_requests_pair_with_their_responses_in_order() {
        let mut wire = frame(
            Direction::Request,
            b"GET /a HTTP/1.1\r\n\r\nHEAD /b HTTP/1.1\r\n\r\n",
        );
        wire.extend(frame(
            Direction::Response,
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 404 Not Found\r\nContent-Length: 7\r\n\r\n",
        ));
        wire.extend(frame(Direction::Request, b"GET /c HTTP/1.1\r\n\r\n"));
        let mut seen = Vec::new();
        read_tapped(&wire[..], origin(), |e| seen.push(e))
            .await
            .unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].request.target, "/a");
        assert_eq!(seen[0].response.as_ref().unwrap().body.bytes, b"a");
        assert_eq!(seen[1].request.target, "/b");
        assert_eq!(seen[1].response.as_ref().unwrap().status, 404);
        assert_eq!(seen[2].request.target, "/c");
        assert!(seen[2].response.is_none());
    }

    /// Two connections whose frames reach graft at once: the time frames, not
    /// the reading, date and time their requests.
    #[tokio::test]
    async fn time_frames_date_the_requests_and_time_the_answers() {
        use std::time::{Duration, SystemTime};
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_micros(1_800_000_000_000_000);
        let connection = |start: SystemTime, path: &str| {
            let mut wire = tap::time(start).to_vec();
            wire.extend(frame(
                Direction::Request,
                format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes(),
            ));
            wire.extend(tap::time(start + Duration::from_millis(7)));
            wire.extend(frame(
                Direction::Response,
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            ));
            wire
        };
        let mut seen = Vec::new();
        // The later connection is read first.
        for (start, path) in [(t0 + Duration::from_micros(250), "/second"), (t0, "/first")] {
            read_tapped(&connection(start, path)[..], origin(), |e| seen.push(e))
                .await
                .unwrap();
        }
        seen.sort_by_key(|e| e.started_unix_us);
        assert_eq!(seen[0].request.target, "/first");
        assert_eq!(seen[0].started_unix_us, 1_800_000_000_000_000);
        assert_eq!(seen[1].request.target, "/second");
        assert_eq!(seen[1].started_unix_us, 1_800_000_000_000_250);
        assert!((seen[0].wait_ms - 7.0).abs() < 1e-6, "{}", seen[0].wait_ms);
    }

    #[tokio::test]
    async fn a_time_frame_of_the_wrong_length_is_an_error() {
        let err = read_tapped(&[2u8, 0, 0, 0, 4, 0, 0, 0, 0][..], origin(), |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, TapError::Frame(_)), "{err}");
    }

    #[tokio::test]
    async fn a_stream_that_is_not_tap_frames_is_an_error() {
        let err = read_tapped(&b"GET / HTTP/1.1\r\n\r\n"[..], origin(), |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, TapError::Frame(_)), "{err}");
    }
}
