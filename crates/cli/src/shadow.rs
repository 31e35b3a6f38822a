//! The shadow diff of `graft run --mirror --diff`: every mirrored connection comes
//! here as a tapped stream with the address of CMD's listener
//! (`SessionOptions::tapped_listeners`); [`graft_traffic::diff::shadow::shadow`]
//! sends its requests to CMD and compares CMD's answers with the target's. This
//! module keeps the counts, prints them (on change, at most once a second), writes
//! each [`Difference`] as one JSON line, and prints a summary at the end.
//!
//! ```text
//! session ──(IncomingTcp, CMD's address)──► per connection: splice ─► shadow()
//!                                                 verdicts ─► counts, JSON lines file
//! ```

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use graft_protocol::incoming::IncomingMode;
use graft_proxy::IncomingTcp;
use graft_traffic::{
    Origin, Route,
    diff::{
        Difference, Differences, Ignore, Outcome,
        shadow::{ShadowOptions, shadow},
    },
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::failure::Failure;

/// How many mirrored connections may wait for the shadow diff to take them.
const CONNECTION_QUEUE: usize = 256;
/// How many bytes of buffer each tapped connection has between the proxy and its
/// reader.
const TAP_BUFFER: usize = 256 * 1024;
/// The shortest time between two count lines.
const PRINT_EVERY: Duration = Duration::from_secs(1);

/// What `--diff` and its companion flags ask for.
#[derive(Debug, Clone)]
pub struct DiffRequest {
    /// `--diff-out`; `None`: a file beside the session directories.
    pub out: Option<PathBuf>,
    /// `--ignore-header` and `--ignore-json-path`.
    pub ignore: Ignore,
    /// `--diff-timeout`: how long one side's answer may lag behind the other's.
    pub bound: Duration,
    /// Where each difference is published besides the file (the inspector
    /// watches it).
    pub differences: Differences,
}

/// The counts of the shadow diff.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Requests both sides answered the same way.
    pub same: u64,
    /// Requests answered differently.
    pub differ: u64,
    /// Requests only one side answered.
    pub unmatched: u64,
}

impl Counts {
    /// Whether any request differed or went unanswered on one side.
    pub fn differs(&self) -> bool {
        self.differ + self.unmatched > 0
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} same, {} differ, {} unmatched",
            self.same, self.differ, self.unmatched
        )
    }
}

/// A running shadow diff.
pub struct Shadow {
    stop_tx: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Counts>,
    path: PathBuf,
    judging: watch::Receiver<usize>,
}

/// How long a session whose CMD exited waits for the copies of answers the
/// target already gave ([`Shadow::settle`]): they come off the packet path and
/// may trail CMD's own answer by a few milliseconds.
pub const SETTLE: Duration = Duration::from_secs(1);

impl Shadow {
    /// Opens the JSON lines file (mode 0600, truncated) and starts taking
    /// connections from the returned sender (for `SessionOptions::tapped_listeners`).
    /// `session_dir` names the default file: `diff-ID.jsonl` beside it, so that
    /// it outlives the session directory.
    ///
    /// # Errors
    ///
    /// A usage failure when the file cannot be created.
    pub fn start(
        request: DiffRequest,
        target: String,
        session_dir: &Path,
    ) -> Result<(Shadow, mpsc::Sender<(IncomingTcp, SocketAddr)>), Failure> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = request.out.clone().unwrap_or_else(|| {
            let id = session_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| std::process::id().to_string());
            session_dir
                .parent()
                .unwrap_or(session_dir)
                .join(format!("diff-{id}.jsonl"))
        });
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                Failure::usage(format!("cannot write {}: {e}", path.display()))
                    .hint("pick a writable file with --diff-out")
            })?;
        eprintln!(
            "graft: diff: CMD's answers are compared with the target's; differences go to {}",
            path.display()
        );
        let (conns_tx, conns_rx) = mpsc::channel(CONNECTION_QUEUE);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (judging_tx, judging) = watch::channel(0);
        let task = tokio::spawn(drive(
            conns_rx,
            stop_rx,
            judging_tx,
            Lines {
                file: Some(std::io::BufWriter::new(file)),
                path: path.clone(),
            },
            target,
            request,
        ));
        Ok((
            Shadow {
                stop_tx,
                task,
                path,
                judging,
            },
            conns_tx,
        ))
    }

    /// A waiter for the connections still being judged: [`Settle::wait`] returns
    /// once there are none, or after `within`.
    pub fn settle(&self) -> Settle {
        Settle(self.judging.clone())
    }

    /// Stops without a summary and removes the file (the session never opened).
    pub async fn abandon(self) {
        let _ = self.stop_tx.send(());
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.path);
    }

    /// Stops taking connections, waits for those under way to be judged (at most
    /// the bound and a little), prints the summary and returns the counts.
    pub async fn finish(self) -> Counts {
        let _ = self.stop_tx.send(());
        let counts = self.task.await.unwrap_or_default();
        let total = counts.same + counts.differ + counts.unmatched;
        eprintln!(
            "graft: diff: {total} request{} compared: {counts}{}",
            if total == 1 { "" } else { "s" },
            if counts.differs() {
                format!("; differences in {}", self.path.display())
            } else {
                String::new()
            }
        );
        counts
    }
}

/// The JSON lines file; writing stops (said once) at the first failure.
struct Lines {
    file: Option<std::io::BufWriter<std::fs::File>>,
    path: PathBuf,
}

impl Lines {
    fn write(&mut self, difference: &Difference) {
        let Some(file) = &mut self.file else {
            return;
        };
        let line = serde_json::to_string(difference).expect("a Difference serialises to JSON");
        // Flushed per line: a reader (tail -f, the inspector) sees it at once.
        if let Err(e) = writeln!(file, "{line}").and_then(|()| file.flush()) {
            eprintln!(
                "graft: diff: cannot write {} ({e}); differences are counted but no longer written",
                self.path.display()
            );
            self.file = None;
        }
    }
}

/// Waits for a shadow diff's connections under way ([`Shadow::settle`]), so that
/// a session whose CMD exited still compares the last answers before it closes.
#[derive(Debug, Clone)]
pub struct Settle(watch::Receiver<usize>);

impl Settle {
    /// Returns once no connection is being judged, or after `within`.
    pub async fn wait(mut self, within: Duration) {
        let _ = tokio::time::timeout(within, self.0.wait_for(|n| *n == 0)).await;
    }
}

/// Takes connections until stopped, judges them, counts and writes; `judging`
/// tells how many connections are being judged.
async fn drive(
    mut conns_rx: mpsc::Receiver<(IncomingTcp, SocketAddr)>,
    mut stop_rx: oneshot::Receiver<()>,
    judging: watch::Sender<usize>,
    mut lines: Lines,
    target: String,
    request: DiffRequest,
) -> Counts {
    let (verdicts_tx, mut verdicts_rx) = mpsc::unbounded_channel::<Difference>();
    let ignore = Arc::new(request.ignore);
    let mut tasks = tokio::task::JoinSet::new();
    let mut counts = Counts::default();
    let mut printed = counts;
    let mut tick = tokio::time::interval(PRINT_EVERY);
    let mut connections = 0u64;
    let mut record = |d: Difference, counts: &mut Counts| {
        match d.outcome {
            Outcome::Same => counts.same += 1,
            Outcome::Differ => counts.differ += 1,
            Outcome::Unmatched => counts.unmatched += 1,
        }
        if d.outcome != Outcome::Same {
            lines.write(&d);
            request.differences.publish(d);
        }
    };
    loop {
        tokio::select! {
            conn = conns_rx.recv() => {
                let Some((conn, local)) = conn else { break };
                connections += 1;
                let origin = Arc::new(Origin {
                    target: target.clone(),
                    port: conn.port(),
                    mode: IncomingMode::Mirror,
                    client: Some(conn.peer().peer),
                    route: Route::Target,
                    filter: None,
                });
                let options = ShadowOptions {
                    connection: connections,
                    ignore: ignore.clone(),
                    bound: request.bound,
                };
                let (ours, theirs) = tokio::io::duplex(TAP_BUFFER);
                let tx = verdicts_tx.clone();
                judging.send_modify(|n| *n += 1);
                tasks.spawn(async move {
                    let splice = conn.splice(theirs);
                    let judge = shadow(ours, local, origin, options, |d| {
                        let _ = tx.send(d);
                    });
                    tokio::join!(splice, judge);
                });
            }
            Some(d) = verdicts_rx.recv() => record(d, &mut counts),
            _ = tick.tick() => {
                if counts != printed {
                    eprintln!("graft: diff: {counts}");
                    printed = counts;
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {
                judging.send_modify(|n| *n = n.saturating_sub(1));
            }
            _ = &mut stop_rx => break,
        }
    }
    drop(conns_rx);
    drop(verdicts_tx);
    // The session is closed by now: every tap stream ends, and each connection
    // is judged within the bound.
    let drained = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(request.bound + Duration::from_secs(2), drained)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    while let Ok(d) = verdicts_rx.try_recv() {
        record(d, &mut counts);
    }
    counts
}

/// Parses `--diff-timeout`: `10s`, `500ms`, `1m`.
pub fn parse_bound(text: &str) -> Result<Duration, String> {
    crate::record::parse_duration(text)
}
