//! The traffic inspector's two ends in the CLI (see `graft_traffic::inspector`):
//!
//! - every `graft run` publishes its session's requests on `events.sock` in its
//!   0700 session directory ([`session_feed`]): the proxy copies each delivered
//!   connection while somebody watches, and the copy is parsed into exchanges;
//!   the requests of its filtered ports that went to the target (or to another
//!   session) come as the agent's routing records, asked for only meanwhile;
//! - `graft ui`, and `graft run --ui` in-process, serve the page ([`start`]):
//!   they find the sessions of this user on this machine (the session
//!   directories, as they are swept in `session_dir`), read each one's feed
//!   into one hub, and serve it on 127.0.0.1 behind a random token.
//!
//! ```text
//! graft run ─► proxy tap ─► read_chunks ─► Feed (events.sock) ─┐
//! graft run ─► …                                  ─► Feed ─────┼─► discover ─► Hub ─► Inspector (SSE)
//! ```

use std::{
    collections::HashSet,
    ffi::OsString,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use clap::Args;
use graft_protocol::incoming::IncomingMode;
use graft_proxy::{IncomingTap, SessionOptions, TappedConnection};
use graft_traffic::{
    Origin, Route,
    inspector::{
        Event, SessionInfo,
        feed::{self, Feed},
        hub::Hub,
        server::Inspector,
    },
};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    failure::Failure,
    process::Signals,
    session_dir::{base_dir, random_hex},
};

/// How often the session directories are looked at for new sessions.
const DISCOVER_EVERY: Duration = Duration::from_millis(250);

/// How many delivered connections may wait for the inspector's parser.
const TAPPED_QUEUE: usize = 64;

/// How many of the agent's routing records (requests that went to the target
/// or to another session) may wait for the feed.
const ROUTES_QUEUE: usize = 256;

/// `graft ui` flags (none yet: the page lists every session of this user).
#[derive(Debug, Args)]
pub struct UiArgs {}

/// Runs `graft ui`: serves the inspector until Ctrl-C.
pub async fn ui(_args: UiArgs) -> Result<u8, Failure> {
    let mut signals = Signals::new()?;
    let running = start().await?;
    eprintln!(
        "graft: inspector at {} (the sessions of this user on this machine; Ctrl-C to stop)",
        running.url()
    );
    signals.recv().await;
    drop(running);
    Ok(0)
}

/// A running inspector: the server and the discovery of sessions; both stop
/// when it is dropped.
#[derive(Debug)]
pub struct Running {
    inspector: Inspector,
    discovery: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.discovery.abort();
    }
}

impl Running {
    /// The page's URL, with its token.
    pub fn url(&self) -> String {
        self.inspector.url()
    }
}

/// Starts the inspector: the HTTP server on 127.0.0.1 and the discovery of the
/// sessions of this user.
///
/// # Errors
///
/// When no token can be drawn or the server cannot listen.
pub async fn start() -> Result<Running, Failure> {
    let token = random_hex(16)?;
    let hub = Arc::new(Hub::new());
    let inspector = Inspector::serve(hub.clone(), token).await.map_err(|e| {
        Failure::session(format!("cannot serve the inspector on 127.0.0.1: {e}"))
            .hint("check that loopback is up (ip link set lo up)")
    })?;
    let uid = nix::unistd::getuid().as_raw();
    let base = base_dir(uid, std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from));
    let discovery = tokio::spawn(discover(base, hub));
    Ok(Running {
        inspector,
        discovery,
    })
}

/// Watches every session directory under `base` that has a feed, as they come.
async fn discover(base: PathBuf, hub: Arc<Hub>) {
    let watching = Arc::new(Mutex::new(HashSet::<OsString>::new()));
    let mut tick = tokio::time::interval(DISCOVER_EVERY);
    loop {
        tick.tick().await;
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for entry in entries.flatten() {
            let socket = entry.path().join(feed::SOCKET_NAME);
            let id = entry.file_name();
            if !socket.exists() || !lock(&watching).insert(id.clone()) {
                continue;
            }
            let hub = hub.clone();
            let watching = watching.clone();
            tokio::spawn(async move {
                let session = id.to_string_lossy().into_owned();
                let mut started = false;
                let read = feed::watch(&socket, |event| {
                    started |= matches!(event, Event::Session(_));
                    hub.publish(&event);
                })
                .await;
                if let Err(e) = read {
                    tracing::debug!(%session, error = %e, "cannot read a session's event feed");
                }
                if started {
                    hub.publish(&Event::Ended { session });
                }
                // A session whose feed still exists is watched again at the next look.
                lock(&watching).remove(&id);
            });
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding it.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A session's feed and the tap that fills it.
#[derive(Debug)]
pub struct SessionFeed {
    feed: Arc<Feed>,
    tap: IncomingTap,
    parser: JoinHandle<()>,
}

impl Drop for SessionFeed {
    fn drop(&mut self) {
        self.parser.abort();
    }
}

impl SessionFeed {
    /// The tap for the session's options
    /// ([`graft_proxy::SessionOptions::incoming_tap`]).
    pub fn tap(&self) -> IncomingTap {
        self.tap.clone()
    }

    /// The feed, for other publishers (the shadow diff's differences).
    pub fn feed(&self) -> Arc<Feed> {
        self.feed.clone()
    }
}

/// Publishes the requests of the session in `dir` (target `target`, running
/// `command` with `options`) on `dir/events.sock`.
///
/// # Errors
///
/// When the socket cannot be made.
pub fn session_feed(
    dir: &Path,
    target: &str,
    command: &[OsString],
    options: &SessionOptions,
) -> Result<SessionFeed, Failure> {
    let session = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mode = options.incoming_mode;
    let filter = options.filter.as_ref().map(ToString::to_string);
    let info = SessionInfo {
        session,
        target: target.to_owned(),
        command: command
            .iter()
            .map(|w| w.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        pid: std::process::id(),
        started_unix_ms: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        mode: mode.to_string(),
        filter: filter.clone(),
    };
    let path = dir.join(feed::SOCKET_NAME);
    let uid = nix::unistd::getuid().as_raw();
    let feed = Arc::new(Feed::serve(&path, info, uid).map_err(|e| {
        Failure::session(format!(
            "cannot make the session's event socket {}: {e}",
            path.display()
        ))
        .hint("check that the session directory is writable, or set XDG_RUNTIME_DIR")
    })?);
    let (connections_tx, connections_rx) = mpsc::channel(TAPPED_QUEUE);
    let (routes_tx, mut routes_rx) = mpsc::channel(ROUTES_QUEUE);
    let tap = IncomingTap::new(connections_tx, feed.watched_fn()).with_routes(routes_tx);
    let origin = Origin {
        target: target.to_owned(),
        port: 0,
        mode,
        client: None,
        route: match mode {
            IncomingMode::Steal => Route::Local,
            IncomingMode::Mirror => Route::Target,
        },
        filter,
    };
    let parsed = parse_tapped(connections_rx, origin, feed.clone());
    let routed = {
        let feed = feed.clone();
        async move {
            while let Some(record) = routes_rx.recv().await {
                feed.publish_routed(&record, mode);
            }
        }
    };
    let parser = tokio::spawn(async move {
        tokio::join!(parsed, routed);
    });
    Ok(SessionFeed { feed, tap, parser })
}

/// Parses each tapped connection into exchanges on `feed`.
async fn parse_tapped(
    mut connections: mpsc::Receiver<TappedConnection>,
    origin: Origin,
    feed: Arc<Feed>,
) {
    let note = (origin.mode == IncomingMode::Mirror).then(|| {
        "mirrored: the target answered the client; the response shown is CMD's answer to \
         its copy, which graft dropped"
            .to_owned()
    });
    let mut parsers = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            connection = connections.recv() => {
                let Some(connection) = connection else { break };
                let origin = Arc::new(Origin {
                    port: connection.peer.local.port(),
                    client: Some(connection.peer.peer),
                    ..origin.clone()
                });
                let feed = feed.clone();
                let note = note.clone();
                parsers.spawn(graft_traffic::read_chunks(connection.chunks, origin, move |e| {
                    feed.publish_exchange(&e, note.clone());
                }));
            }
            Some(_) = parsers.join_next(), if !parsers.is_empty() => {}
        }
    }
    while parsers.join_next().await.is_some() {}
}
