//! A session's event feed: a Unix socket in the session's 0700 directory on
//! which the session writes its [`Event`]s as JSON lines, to every watcher of the
//! same user.
//!
//! Who may read it is decided twice: the directory (0700) and the socket file
//! (0600) let only the session's user (and root) connect, and the feed checks
//! the connecting process's credentials (`SO_PEERCRED`, socket(7)) against the
//! session's uid before it writes a byte, so a socket that somebody made
//! reachable still tells a stranger nothing.
//!
//! A watcher first gets [`Event::Session`], then each event from then on. A
//! watcher that falls [`FEED_QUEUE`] events behind misses the oldest; the
//! session never waits for a watcher.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use futures::StreamExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::broadcast,
    task::JoinHandle,
};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use super::{Event, ExchangeEvent, SessionInfo};
use crate::exchange::Exchange;

/// The name of the feed's socket in a session directory.
pub const SOCKET_NAME: &str = "events.sock";

/// How many events a watcher may lag behind before it misses some.
pub const FEED_QUEUE: usize = 1024;

/// The longest event line a watcher accepts, in bytes: two 64 KiB bodies in
/// base64 with their heads fit with room to spare.
pub const MAX_EVENT_LINE: usize = 1024 * 1024;

/// How long a new watcher's first line waits for the [`WatchHook`].
pub const WATCH_HOOK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// What the session does when watchers come or go ([`Feed::on_watchers_changed`]).
pub type WatchHook =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

/// The publishing end of a session's feed. Dropping it closes the socket.
pub struct Feed {
    info: SessionInfo,
    lines: broadcast::Sender<Arc<str>>,
    watchers: Arc<AtomicUsize>,
    next_id: AtomicU64,
    accept: JoinHandle<()>,
    hook: Arc<std::sync::OnceLock<WatchHook>>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("info", &self.info)
            .field("watchers", &self.watchers)
            .finish_non_exhaustive()
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Feed {
    /// Binds the feed's socket at `path` (mode 0600) and serves watchers whose
    /// uid is `owner_uid`. Must run inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// When the socket cannot be bound or its mode set.
    pub fn serve(path: &Path, info: SessionInfo, owner_uid: u32) -> io::Result<Feed> {
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let (lines, _) = broadcast::channel(FEED_QUEUE);
        let watchers = Arc::new(AtomicUsize::new(0));
        let hello: Arc<str> = to_line(&Event::Session(info.clone())).into();
        let hook = Arc::new(std::sync::OnceLock::new());
        let accept = tokio::spawn(accept_loop(
            listener,
            owner_uid,
            hello,
            lines.clone(),
            watchers.clone(),
            hook.clone(),
        ));
        Ok(Feed {
            info,
            lines,
            watchers,
            next_id: AtomicU64::new(1),
            accept,
            hook,
        })
    }

    /// Runs `hook` whenever watchers come or go (it reads [`Feed::watched`]
    /// itself), and once now. A new watcher gets its first line only once the
    /// hook has run (at most [`WATCH_HOOK_WAIT`]), so that what the session
    /// changes for watchers (graft's direct listeners pause, so that every
    /// stolen connection passes the tap) holds for everything it is shown.
    /// Set once; later calls are ignored.
    pub fn on_watchers_changed(&self, hook: WatchHook) {
        if self.hook.set(hook.clone()).is_ok() {
            tokio::spawn(hook());
        }
    }

    /// The session this feed describes.
    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// Whether anybody watches now (taps are only worth their cost then).
    pub fn watched(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    /// A cheap check of [`Feed::watched`] for another task.
    pub fn watched_fn(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let watchers = self.watchers.clone();
        move || watchers.load(Ordering::Relaxed) > 0
    }

    /// Publishes `exchange` as the session's next [`Event::Exchange`].
    pub fn publish_exchange(&self, exchange: &Exchange, note: Option<String>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let event = ExchangeEvent::new(&self.info.session, id, exchange, note);
        self.publish(&Event::Exchange(Box::new(event)));
    }

    /// Publishes the agent's routing record of a request of the session's
    /// ports (in `mode`) that went elsewhere, as the session's next
    /// [`Event::Exchange`] ([`ExchangeEvent::routed`]).
    pub fn publish_routed(
        &self,
        record: &graft_protocol::incoming::RoutedRequest,
        mode: graft_protocol::incoming::IncomingMode,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let event = ExchangeEvent::routed(&self.info.session, id, mode, record);
        self.publish(&Event::Exchange(Box::new(event)));
    }

    /// Publishes a difference of the shadow diff ([`Event::Difference`]).
    pub fn publish_difference(&self, difference: serde_json::Value) {
        self.publish(&Event::Difference {
            session: self.info.session.clone(),
            difference,
        });
    }

    /// Hands `event` to every current watcher; never waits.
    pub fn publish(&self, event: &Event) {
        if self.lines.receiver_count() == 0 {
            return;
        }
        let _ = self.lines.send(to_line(event).into());
    }
}

fn to_line(event: &Event) -> String {
    // Events are plain data (strings, numbers, JSON values): encoding cannot fail.
    serde_json::to_string(event).expect("an inspector event encodes as JSON")
}

async fn accept_loop(
    listener: UnixListener,
    owner_uid: u32,
    hello: Arc<str>,
    lines: broadcast::Sender<Arc<str>>,
    watchers: Arc<AtomicUsize>,
    hook: Arc<std::sync::OnceLock<WatchHook>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == owner_uid => {}
            Ok(cred) => {
                tracing::warn!(
                    uid = cred.uid(),
                    pid = ?cred.pid(),
                    "refused a watcher of another user on the session's event socket"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a watcher's credentials; refused");
                continue;
            }
        }
        let rx = lines.subscribe();
        let hello = hello.clone();
        let watchers = watchers.clone();
        let hook = hook.clone();
        watchers.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Some(hook) = hook.get() {
                // Events published meanwhile wait in `rx`.
                let _ = tokio::time::timeout(WATCH_HOOK_WAIT, hook()).await;
            }
            serve_watcher(stream, hello, rx).await;
            watchers.fetch_sub(1, Ordering::Relaxed);
            if let Some(hook) = hook.get() {
                tokio::spawn(hook());
            }
        });
    }
}

async fn serve_watcher(stream: UnixStream, hello: Arc<str>, mut rx: broadcast::Receiver<Arc<str>>) {
    let (mut read, mut write) = stream.into_split();
    if write_line(&mut write, &hello).await.is_err() {
        return;
    }
    let mut ignored = [0u8; 64];
    loop {
        tokio::select! {
            line = rx.recv() => match line {
                Ok(line) => {
                    if write_line(&mut write, &line).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, "an inspector watcher fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            // A watcher never writes: a read that ends means it left.
            read = read.read(&mut ignored) => {
                if matches!(read, Ok(0) | Err(_)) {
                    return;
                }
            }
        }
    }
}

async fn write_line(write: &mut tokio::net::unix::OwnedWriteHalf, line: &str) -> io::Result<()> {
    write.write_all(line.as_bytes()).await?;
    write.write_all(b"\n").await
}

/// Reads the feed at `path` until it ends, calling `each` with every event.
/// Lines that are not events (a kind from a newer graft) are skipped.
///
/// # Errors
///
/// When connecting fails (no such session, or not this user's) or reading
/// fails; a line over [`MAX_EVENT_LINE`] bytes ends the feed with an error.
pub async fn watch(path: &Path, mut each: impl FnMut(Event)) -> io::Result<()> {
    let stream = UnixStream::connect(path).await?;
    let mut lines = FramedRead::new(stream, LinesCodec::new_with_max_length(MAX_EVENT_LINE));
    while let Some(line) = lines.next().await {
        let line = line.map_err(|e| match e {
            LinesCodecError::Io(e) => e,
            LinesCodecError::MaxLineLengthExceeded => io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an event line exceeds {MAX_EVENT_LINE} bytes"),
            ),
        })?;
        match serde_json::from_str::<Event>(&line) {
            Ok(event) => each(event),
            Err(e) => tracing::debug!(error = %e, "skipped an event line graft does not know"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> SessionInfo {
        SessionInfo {
            session: "abc".into(),
            target: "pid:1".into(),
            command: "app".into(),
            pid: 1,
            started_unix_ms: 0,
            mode: "steal".into(),
            filter: None,
        }
    }

    #[tokio::test]
    async fn a_watcher_gets_the_session_then_each_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_NAME);
        let uid = std::fs::metadata(dir.path())
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap();
        let feed = Feed::serve(&path, info(), uid).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!feed.watched());
        let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn({
            let path = path.clone();
            async move { watch(&path, |e| drop(events_tx.send(e))).await }
        });
        let first = events_rx.recv().await.unwrap();
        assert_eq!(first, Event::Session(info()));
        while !feed.watched() {
            tokio::task::yield_now().await;
        }
        feed.publish_difference(serde_json::json!({"status": [200, 500]}));
        let second = events_rx.recv().await.unwrap();
        assert_eq!(second.session(), "abc");
        assert!(matches!(second, Event::Difference { .. }));
        drop(feed);
        reader.abort();
    }

    #[tokio::test]
    async fn a_watcher_of_another_uid_is_refused_without_a_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_NAME);
        let me = std::fs::metadata(dir.path())
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap();
        // The feed believes it belongs to someone else: this process is the stranger.
        let _feed = Feed::serve(&path, info(), me.wrapping_add(1)).unwrap();
        let mut stream = UnixStream::connect(&path).await.unwrap();
        let mut got = Vec::new();
        let read = stream.read_to_end(&mut got).await;
        assert!(
            got.is_empty(),
            "a stranger read {:?}",
            String::from_utf8_lossy(&got)
        );
        let _ = read;
    }
}
