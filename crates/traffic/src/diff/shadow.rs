//! The shadow diff of one mirrored connection: the target's side arrives as
//! [`graft_protocol::incoming::tap`] frames (the client's requests and the
//! target's answers), the requests are also written to the local process on a
//! connection of its own, and each answer of the local process is compared with
//! the target's answer to the same request.
//!
//! ```text
//! tap frames ──requests──► Pairing(target) ◄──target's answers──┘
//!            └─requests──► local process ──its answers──► Pairing(local)
//! n-th exchange of each pairing ──► diff::compare ──► Difference
//! ```
//!
//! Both pairings read the same request bytes, so the n-th exchange of one answers
//! the same request as the n-th of the other (HTTP/1.1 answers in request order,
//! RFC 9112 §9.3.2). When one side's answer is whole and the other side sends
//! nothing for [`ShadowOptions::bound`], the request is a [`Change::NoResponse`];
//! that side is then given up for the rest of the connection (a late answer
//! would pair with the wrong request). A side still sending (a long body) is
//! answering and is waited for. Memory per connection is bounded: at most [`FRAME_QUEUE`] frames in
//! flight, at most [`LOCAL_QUEUE`] request chunks waiting for the local process,
//! and what [`crate::http1`] keeps of each message.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use graft_protocol::incoming::tap::{self, Direction};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

use super::{Answer, Change, Difference, Ignore, Outcome, Side, compare};
use crate::{exchange::Exchange, exchange::Origin, tap::Pairing};

/// How many tap frames may wait between the reader and the comparison.
pub const FRAME_QUEUE: usize = 16;
/// How many request chunks (each at most `tap::MAX_CHUNK` bytes) may wait for
/// the local process to read them; past that the local process is given up on
/// for the connection (it does not read its requests).
pub const LOCAL_QUEUE: usize = 64;
/// How often the bound on answers is checked.
const TICK: Duration = Duration::from_millis(100);

/// The settings of [`shadow`].
#[derive(Debug, Clone)]
pub struct ShadowOptions {
    /// The connection's number in the session, from 1 (goes into each
    /// [`Difference`]).
    pub connection: u64,
    /// What the comparison leaves out.
    pub ignore: Arc<Ignore>,
    /// How long one side's answer may lag behind the other's before it counts as
    /// no answer; also how long the connection to the local process may take.
    pub bound: Duration,
}

/// The pairing state of one connection, without I/O.
#[derive(Debug)]
pub struct ShadowConnection {
    origin: Arc<Origin>,
    options: ShadowOptions,
    target: Pairing,
    local: Pairing,
    /// Exchanges whose counterpart has not come yet, with when they completed.
    target_done: VecDeque<(Instant, Exchange)>,
    local_done: VecDeque<(Instant, Exchange)>,
    /// Why a side gives no more answers on this connection.
    target_gone: Option<String>,
    local_gone: Option<String>,
    /// When each side last sent answer bytes: a side still sending is answering.
    target_active: Option<Instant>,
    local_active: Option<Instant>,
    /// Requests compared so far.
    compared: u64,
}

impl ShadowConnection {
    /// A connection at `origin` with nothing read yet.
    pub fn new(origin: Arc<Origin>, options: ShadowOptions) -> ShadowConnection {
        ShadowConnection {
            target: Pairing::new(origin.clone()),
            local: Pairing::new(origin.clone()),
            origin,
            options,
            target_done: VecDeque::new(),
            local_done: VecDeque::new(),
            target_gone: None,
            local_gone: None,
            target_active: None,
            local_active: None,
            compared: 0,
        }
    }

    /// Request bytes from the client, read at `now`.
    pub fn request(&mut self, bytes: &[u8], now: Instant) -> Vec<Difference> {
        if self.target_gone.is_none() {
            let done = self.target.feed(Direction::Request, bytes, now);
            self.target_done.extend(done.into_iter().map(|e| (now, e)));
        }
        if self.local_gone.is_none() {
            let done = self.local.feed(Direction::Request, bytes, now);
            self.local_done.extend(done.into_iter().map(|e| (now, e)));
        }
        self.verdicts()
    }

    /// Answer bytes of the target, read at `now`.
    pub fn target_answer(&mut self, bytes: &[u8], now: Instant) -> Vec<Difference> {
        self.target_active = Some(now);
        if self.target_gone.is_none() {
            let done = self.target.feed(Direction::Response, bytes, now);
            self.target_done.extend(done.into_iter().map(|e| (now, e)));
        }
        self.verdicts()
    }

    /// Answer bytes of the local process, read at `now`.
    pub fn local_answer(&mut self, bytes: &[u8], now: Instant) -> Vec<Difference> {
        self.local_active = Some(now);
        if self.local_gone.is_none() {
            let done = self.local.feed(Direction::Response, bytes, now);
            self.local_done.extend(done.into_iter().map(|e| (now, e)));
        }
        self.verdicts()
    }

    /// The target's side of the connection ended (the tap stream closed).
    pub fn target_ended(&mut self, now: Instant) -> Vec<Difference> {
        if self.target_gone.is_none() {
            let done = self.target.finish(now);
            self.target_done.extend(done.into_iter().map(|e| (now, e)));
            self.target_gone = Some("the target's connection ended before it answered".into());
        }
        self.verdicts()
    }

    /// The local process's side ended, for `reason` (it closed the connection,
    /// or it could not be reached).
    pub fn local_ended(&mut self, now: Instant, reason: String) -> Vec<Difference> {
        if self.local_gone.is_none() {
            let done = self.local.finish(now);
            self.local_done.extend(done.into_iter().map(|e| (now, e)));
            self.local_gone = Some(reason);
        }
        self.verdicts()
    }

    /// Whether the local process is still taken into account.
    pub fn local_alive(&self) -> bool {
        self.local_gone.is_none()
    }

    /// Whether a request still waits for its comparison.
    pub fn pending(&self) -> bool {
        !self.target_done.is_empty()
            || !self.local_done.is_empty()
            || (self.local_gone.is_none() && self.local.unanswered() > 0)
    }

    /// Gives up on a side that sent nothing for the bound since the other side's
    /// answer was whole (a side still sending answer bytes is answering); the
    /// requests it leaves unanswered come out unmatched.
    pub fn overdue(&mut self, now: Instant) -> Vec<Difference> {
        let bound = self.options.bound;
        let late = |queue: &VecDeque<(Instant, Exchange)>, active: Option<Instant>| {
            queue.front().is_some_and(|(at, _)| {
                let since = active.map_or(*at, |active| active.max(*at));
                now.saturating_duration_since(since) >= bound
            })
        };
        if self.local_gone.is_none()
            && self.local_done.is_empty()
            && late(&self.target_done, self.local_active)
        {
            self.local_gone = Some(format!("CMD did not answer within {bound:?}"));
        }
        if self.target_gone.is_none()
            && self.target_done.is_empty()
            && late(&self.local_done, self.target_active)
        {
            self.target_gone = Some(format!("the target's answer was not seen within {bound:?}"));
        }
        self.verdicts()
    }

    /// The comparisons that can be made now.
    fn verdicts(&mut self) -> Vec<Difference> {
        let mut out = Vec::new();
        loop {
            let (target, local) = if !self.target_done.is_empty() && !self.local_done.is_empty() {
                (self.target_done.pop_front(), self.local_done.pop_front())
            } else if !self.target_done.is_empty() && self.local_gone.is_some() {
                (self.target_done.pop_front(), None)
            } else if !self.local_done.is_empty() && self.target_gone.is_some() {
                (None, self.local_done.pop_front())
            } else {
                break;
            };
            self.compared += 1;
            let target = target.map(|(_, e)| e);
            let local = local.map(|(_, e)| e);
            if let Some(d) = self.judge(target.as_ref(), local.as_ref()) {
                out.push(d);
            }
        }
        out
    }

    /// The verdict on one request; `None` when neither side answered it.
    fn judge(&self, target: Option<&Exchange>, local: Option<&Exchange>) -> Option<Difference> {
        let request = target.or(local)?;
        let t = target.and_then(|e| e.response.as_ref());
        let l = local.and_then(|e| e.response.as_ref());
        let answer = |r: &'_ crate::Response| -> (u16, Vec<(String, String)>, Vec<u8>, u64) {
            (
                r.status,
                r.headers.clone(),
                r.body.bytes.clone(),
                r.body.len,
            )
        };
        let (outcome, changes) = match (t, l) {
            (None, None) => return None,
            (Some(_), None) => (
                Outcome::Unmatched,
                vec![Change::NoResponse {
                    side: Side::Local,
                    reason: self
                        .local_gone
                        .clone()
                        .unwrap_or_else(|| "CMD closed the connection without answering".into()),
                }],
            ),
            (None, Some(_)) => (
                Outcome::Unmatched,
                vec![Change::NoResponse {
                    side: Side::Target,
                    reason: self
                        .target_gone
                        .clone()
                        .unwrap_or_else(|| "the target did not answer".into()),
                }],
            ),
            (Some(t), Some(l)) => {
                let (ts, th, tb, tl) = answer(t);
                let (ls, lh, lb, ll) = answer(l);
                let changes = compare(
                    &Answer {
                        status: ts,
                        headers: &th,
                        body: &tb,
                        body_len: Some(tl),
                    },
                    &Answer {
                        status: ls,
                        headers: &lh,
                        body: &lb,
                        body_len: Some(ll),
                    },
                    &self.options.ignore,
                );
                let outcome = if changes.is_empty() {
                    Outcome::Same
                } else {
                    Outcome::Differ
                };
                (outcome, changes)
            }
        };
        Some(Difference {
            started_unix_ms: request.started_unix_ms,
            port: self.origin.port,
            client: self.origin.client,
            connection: self.options.connection,
            request: self.compared,
            method: request.request.method.clone(),
            path: request.request.target.clone(),
            outcome,
            target_status: t.map(|r| r.status),
            local_status: l.map(|r| r.status),
            changes,
        })
    }
}

/// Runs the shadow diff of one tapped connection: reads `tapped` (tap frames)
/// to its end, sends its requests to the local process at `local`, and calls
/// `each` with the verdict on every request either side answered ([`Outcome::Same`]
/// included). Returns once the tap stream ended and every request was judged
/// (at most [`ShadowOptions::bound`] after the last answer).
///
/// A tap stream that is not tap frames ends the target's side as if the
/// connection had closed (its error is logged).
pub async fn shadow<R: AsyncRead + Unpin>(
    tapped: R,
    local: SocketAddr,
    origin: Arc<Origin>,
    options: ShadowOptions,
    mut each: impl FnMut(Difference),
) {
    let bound = options.bound;
    let mut state = ShadowConnection::new(origin, options);
    let (frames_tx, mut frames_rx) = mpsc::channel(FRAME_QUEUE);
    let reader = read_frames(tapped, frames_tx);
    let connected = tokio::time::timeout(bound, TcpStream::connect(local)).await;
    let (mut local_read, requests_tx, writer) = match connected {
        Ok(Ok(stream)) => {
            let (read, write) = stream.into_split();
            let (tx, rx) = mpsc::channel::<Vec<u8>>(LOCAL_QUEUE);
            (Some(read), Some(tx), Some(write_requests(write, rx)))
        }
        Ok(Err(e)) => {
            state.local_ended(
                Instant::now(),
                format!("cannot connect to CMD at {local}: {e}"),
            );
            (None, None, None)
        }
        Err(_) => {
            state.local_ended(
                Instant::now(),
                format!("CMD did not accept the connection at {local} within {bound:?}"),
            );
            (None, None, None)
        }
    };
    let mut requests_tx = requests_tx;
    let judge = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut tick = tokio::time::interval(TICK);
        let mut tap_open = true;
        loop {
            if !tap_open && !state.pending() {
                break;
            }
            let verdicts = tokio::select! {
                frame = frames_rx.recv(), if tap_open => match frame {
                    Some((Direction::Request, bytes)) => {
                        if let Some(tx) = &requests_tx
                            && tx.try_send(bytes.clone()).is_err()
                        {
                            requests_tx = None;
                            local_read = None;
                            state.local_ended(
                                Instant::now(),
                                "CMD does not read its requests".into(),
                            );
                        }
                        state.request(&bytes, Instant::now())
                    }
                    Some((Direction::Response, bytes)) => {
                        state.target_answer(&bytes, Instant::now())
                    }
                    None => {
                        tap_open = false;
                        // The local connection stays whole until its answers are
                        // in: a half-close would tell some servers (Go's
                        // net/http) that the client left, and they cancel.
                        state.target_ended(Instant::now())
                    }
                },
                read = async {
                    match local_read.as_mut() {
                        Some(r) => r.read(&mut buf).await,
                        None => std::future::pending().await,
                    }
                }, if local_read.is_some() => {
                    let now = Instant::now();
                    match read {
                        Ok(0) => {
                            local_read = None;
                            state.local_ended(now, "CMD closed the connection without answering".into())
                        }
                        Ok(n) => state.local_answer(&buf[..n], now),
                        Err(e) => {
                            local_read = None;
                            state.local_ended(now, format!("reading CMD's answer failed: {e}"))
                        }
                    }
                }
                _ = tick.tick() => {
                    let verdicts = state.overdue(Instant::now());
                    if !state.local_alive() {
                        requests_tx = None;
                        local_read = None;
                    }
                    verdicts
                }
            };
            verdicts.into_iter().for_each(&mut each);
        }
        // Dropping the sender ends the writer, which closes the local connection.
        drop(requests_tx);
        drop(local_read);
    };
    let writer = async {
        if let Some(writer) = writer {
            writer.await;
        }
    };
    tokio::join!(reader, judge, writer);
}

/// Reads tap frames from `stream` into `frames_tx` until the stream ends.
async fn read_frames<R: AsyncRead + Unpin>(
    mut stream: R,
    frames_tx: mpsc::Sender<(Direction, Vec<u8>)>,
) {
    loop {
        let mut header = [0u8; tap::HEADER_LEN];
        if stream.read_exact(&mut header).await.is_err() {
            return;
        }
        let (direction, len) = match tap::parse_header(header) {
            Ok(tap::Frame::Bytes(direction, len)) => (direction, len),
            // Shadow diff compares answers, not their timing.
            Ok(tap::Frame::Time) => {
                let mut at = [0u8; tap::TIME_LEN];
                if stream.read_exact(&mut at).await.is_err() {
                    return;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "a tapped connection sent a bad frame; its diff ends");
                return;
            }
        };
        let mut bytes = vec![0u8; len];
        if stream.read_exact(&mut bytes).await.is_err()
            || frames_tx.send((direction, bytes)).await.is_err()
        {
            return;
        }
    }
}

/// Writes each chunk of `requests_rx` to the local process; ends (closing its
/// sending side) when the channel closes or a write fails.
async fn write_requests(
    mut write: tokio::net::tcp::OwnedWriteHalf,
    mut requests_rx: mpsc::Receiver<Vec<u8>>,
) {
    while let Some(bytes) = requests_rx.recv().await {
        if write.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = write.shutdown().await;
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

    fn options(bound: Duration) -> ShadowOptions {
        ShadowOptions {
            connection: 7,
            ignore: Arc::new(Ignore::default()),
            bound,
        }
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    const BAD: &[u8] = b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\nno";

    #[test]
    fn pipelined_answers_pair_by_order_whoever_answers_first() {
        let mut c = ShadowConnection::new(origin(), options(Duration::from_secs(5)));
        let now = Instant::now();
        assert!(
            c.request(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n", now)
                .is_empty()
        );
        // The local process answers both before the target answers one.
        assert!(c.local_answer(&[OK, BAD].concat(), now).is_empty());
        let first = c.target_answer(OK, now);
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].path.as_str(), first[0].outcome),
            ("/a", Outcome::Same)
        );
        let second = c.target_answer(OK, now);
        assert_eq!(second[0].path, "/b");
        assert_eq!(second[0].outcome, Outcome::Differ);
        assert_eq!(second[0].request, 2);
        assert_eq!(
            (second[0].target_status, second[0].local_status),
            (Some(200), Some(500))
        );
        assert!(!c.pending());
    }

    #[test]
    fn a_side_that_lags_past_the_bound_is_given_up() {
        let bound = Duration::from_secs(2);
        let mut c = ShadowConnection::new(origin(), options(bound));
        let t0 = Instant::now();
        c.request(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n", t0);
        c.target_answer(OK, t0);
        assert!(c.overdue(t0 + Duration::from_secs(1)).is_empty());
        let late = c.overdue(t0 + bound);
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].outcome, Outcome::Unmatched);
        assert!(matches!(
            &late[0].changes[0],
            Change::NoResponse { side: Side::Local, reason } if reason.contains("did not answer")
        ));
        // A late answer of CMD is not paired with the next request.
        c.local_answer(OK, t0 + bound);
        let next = c.target_answer(OK, t0 + bound);
        assert_eq!(next[0].path, "/b");
        assert_eq!(next[0].outcome, Outcome::Unmatched);
    }

    #[test]
    fn an_answer_only_cmd_gives_is_unmatched_on_the_targets_side() {
        let bound = Duration::from_secs(2);
        let mut c = ShadowConnection::new(origin(), options(bound));
        let t0 = Instant::now();
        c.request(b"GET /a HTTP/1.1\r\n\r\n", t0);
        assert!(c.local_answer(OK, t0).is_empty());
        // The target keeps sending (a slow body): it is answering, not late.
        c.target_answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab",
            t0 + bound,
        );
        assert!(c.overdue(t0 + bound + Duration::from_secs(1)).is_empty());
        let late = c.overdue(t0 + bound * 2);
        assert_eq!(late.len(), 1, "{late:?}");
        assert_eq!(
            (late[0].target_status, late[0].local_status),
            (None, Some(200))
        );
        assert!(matches!(
            &late[0].changes[0],
            Change::NoResponse {
                side: Side::Target,
                ..
            }
        ));
        assert!(!c.pending());
    }

    #[tokio::test]
    async fn a_local_process_that_never_answers_is_no_response_within_the_bound() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        // Accepts and reads, never answers.
        let silent = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
            std::future::pending::<()>().await;
        });
        let request = b"GET /x HTTP/1.1\r\n\r\n";
        let mut wire = tap::header(Direction::Request, request.len()).to_vec();
        wire.extend_from_slice(request);
        wire.extend(tap::header(Direction::Response, OK.len()));
        wire.extend_from_slice(OK);
        let mut seen = Vec::new();
        let started = Instant::now();
        shadow(
            &wire[..],
            local,
            origin(),
            options(Duration::from_millis(300)),
            |d| seen.push(d),
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].outcome, Outcome::Unmatched);
        assert_eq!(seen[0].target_status, Some(200));
        silent.abort();
    }
}
