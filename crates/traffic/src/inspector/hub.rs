//! The inspector's hub: the events of every watched session, handed to each
//! open page as JSON text, with the sessions alive now and the last
//! [`BACKLOG`] other events for a page that opens late.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::broadcast;

use super::Event;

/// How many events (other than sessions) a page opened late still gets.
pub const BACKLOG: usize = 500;

/// How many events a page may lag behind before it misses some.
pub const PAGE_QUEUE: usize = 4096;

#[derive(Debug, Default)]
struct State {
    /// The sessions alive now, by id, as JSON.
    sessions: BTreeMap<String, Arc<str>>,
    /// The latest events, oldest first, as JSON.
    backlog: VecDeque<Arc<str>>,
}

/// The events of every watched session. Shared between the watchers of the
/// sessions (which publish) and the HTTP server (which subscribes a page).
#[derive(Debug)]
pub struct Hub {
    state: Mutex<State>,
    tx: broadcast::Sender<Arc<str>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Hub {
    /// A hub with no session yet.
    pub fn new() -> Hub {
        Hub {
            state: Mutex::new(State::default()),
            tx: broadcast::channel(PAGE_QUEUE).0,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned lock still holds
        // consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `event` to every open page and keeps it for later ones.
    pub fn publish(&self, event: &Event) {
        let Ok(text) = serde_json::to_string(event) else {
            return;
        };
        let text: Arc<str> = text.into();
        // Under the lock, so a page subscribing now gets each event exactly once:
        // in its snapshot or on its receiver.
        let mut state = self.state();
        match event {
            Event::Session(info) => {
                state.sessions.insert(info.session.clone(), text.clone());
            }
            Event::Ended { session } => {
                state.sessions.remove(session);
            }
            Event::Exchange(_) | Event::Difference { .. } => {
                if state.backlog.len() == BACKLOG {
                    state.backlog.pop_front();
                }
                state.backlog.push_back(text.clone());
            }
        }
        let _ = self.tx.send(text);
    }

    /// For a page opening now: the sessions alive and the backlog (oldest
    /// first), and a receiver of every event published from now on.
    pub fn subscribe(&self) -> (Vec<Arc<str>>, broadcast::Receiver<Arc<str>>) {
        let state = self.state();
        let snapshot = state
            .sessions
            .values()
            .chain(state.backlog.iter())
            .cloned()
            .collect();
        (snapshot, self.tx.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspector::SessionInfo;

    fn session(id: &str) -> Event {
        Event::Session(SessionInfo {
            session: id.into(),
            target: "pid:1".into(),
            command: "app".into(),
            pid: 1,
            started_unix_ms: 0,
            mode: "steal".into(),
            filter: None,
        })
    }

    #[test]
    fn a_late_page_gets_live_sessions_and_the_latest_events_only() {
        let hub = Hub::new();
        hub.publish(&session("a"));
        hub.publish(&session("b"));
        hub.publish(&Event::Ended {
            session: "a".into(),
        });
        for i in 0..(BACKLOG + 3) {
            hub.publish(&Event::Difference {
                session: "b".into(),
                difference: serde_json::json!(i),
            });
        }
        let (snapshot, mut rx) = hub.subscribe();
        assert_eq!(snapshot.len(), 1 + BACKLOG);
        assert!(snapshot[0].contains("\"session\":\"b\""));
        assert!(snapshot[1].contains("\"difference\":3"), "{}", snapshot[1]);
        assert!(rx.try_recv().is_err());
        hub.publish(&session("c"));
        assert!(rx.try_recv().unwrap().contains("\"c\""));
    }
}
