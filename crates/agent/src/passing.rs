//! Descriptors the agent hands to a client on this machine (a local target's
//! link, a Unix socket that passes descriptors, [`graft_protocol::fdpass`]):
//! the files it opens, the outgoing sockets it connects, the stolen
//! connections it accepts.
//!
//! A descriptor leaves with the bytes written after it is queued, and the
//! client claims queued descriptors in the order of the frames that announce
//! them; so every frame that announces one goes through [`FdSender`], which
//! queues the descriptor and its frame together, on one channel, one frame at a
//! time.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use graft_protocol::fdpass::FdQueues;
pub use graft_protocol::fdpass::reset;
use graft_protocol::link::AgentMessage;
use tokio::sync::mpsc;

/// Queues descriptors with the frames that announce them, in one order.
#[derive(Debug)]
pub struct FdSender {
    queues: Arc<FdQueues>,
    /// Held from queueing a descriptor until its frame is queued.
    order: tokio::sync::Mutex<()>,
    /// The one channel every announcing frame takes to the link's writer.
    out: mpsc::Sender<AgentMessage>,
}

impl FdSender {
    /// A sender over a link's `queues` whose announcing frames go to `out`.
    pub fn new(queues: Arc<FdQueues>, out: mpsc::Sender<AgentMessage>) -> FdSender {
        FdSender {
            queues,
            order: tokio::sync::Mutex::new(()),
            out,
        }
    }

    /// Sends `fd` with `message`, the frame that announces it.
    ///
    /// # Errors
    ///
    /// The descriptor back when the link is gone, for the caller to close its way
    /// (a stolen connection with a reset).
    pub async fn send(&self, fd: OwnedFd, message: AgentMessage) -> Result<(), OwnedFd> {
        let _order = self.order.lock().await;
        // A place in the channel first: once the descriptor is queued, its frame
        // must follow.
        let Ok(permit) = self.out.reserve().await else {
            return Err(fd);
        };
        self.queues.push_outgoing(fd);
        permit.send(message);
        Ok(())
    }

    /// Closes every descriptor the ended link could not pass any more, a
    /// socket with a reset (`SO_LINGER` 0, socket(7)) so that its peer learns at
    /// once rather than waiting on a connection nobody holds.
    pub fn abort(&self) {
        for fd in self.queues.take_outgoing() {
            reset(fd);
        }
    }
}
