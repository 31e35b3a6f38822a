//! The flow-control windows of one TCP connection on the link (see
//! [`crate::link`]): a sender may have at most [`TCP_WINDOW`] bytes of `Data`
//! in flight, and a receiver gives them back in `Credit` messages of at least
//! [`CREDIT_BATCH`] bytes as its socket takes them. The agent's relays and the
//! proxy's splices both keep one [`SendWindow`] and one [`ReturnedCredit`] per
//! connection.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

use crate::link::{CREDIT_BATCH, TCP_WINDOW};

/// What the peer lets this side send on one connection, in bytes: starts at
/// [`TCP_WINDOW`], shrinks with each `Data` sent ([`SendWindow::spend`]) and
/// grows with each `Credit` received ([`SendWindow::grant`]).
///
/// Shared by reference between the future that reads the local socket and the
/// one that handles the peer's messages (both in one task, or in two).
#[derive(Debug)]
pub struct SendWindow {
    available: AtomicUsize,
    granted: Notify,
}

impl Default for SendWindow {
    fn default() -> SendWindow {
        SendWindow::new()
    }
}

impl SendWindow {
    /// A fresh connection's window: [`TCP_WINDOW`] bytes.
    pub fn new() -> SendWindow {
        SendWindow {
            available: AtomicUsize::new(TCP_WINDOW as usize),
            granted: Notify::new(),
        }
    }

    /// How many bytes may be sent now, at most `max` (a read buffer's size).
    pub fn room(&self, max: usize) -> usize {
        self.available.load(Ordering::Acquire).min(max)
    }

    /// Waits until at least one byte may be sent, then returns how many may,
    /// at most `max`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is taken from the window until [`Self::spend`].
    pub async fn ready(&self, max: usize) -> usize {
        loop {
            let notified = self.granted.notified();
            let room = self.room(max);
            if room > 0 {
                return room;
            }
            notified.await;
        }
    }

    /// Takes `n` bytes just sent from the window.
    ///
    /// # Panics
    ///
    /// In debug builds, when `n` is more than the window allowed: the caller
    /// reads at most [`Self::room`] bytes.
    pub fn spend(&self, n: usize) {
        let before = self.available.fetch_sub(n, Ordering::AcqRel);
        debug_assert!(before >= n, "sent {n} bytes with {before} of credit");
    }

    /// Adds a `Credit` of `bytes` from the peer, and wakes a waiting
    /// [`Self::ready`].
    pub fn grant(&self, bytes: u32) {
        let _ = self
            .available
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                Some(a.saturating_add(bytes as usize))
            });
        self.granted.notify_one();
    }
}

/// The bytes of the peer's `Data` that the local socket took and that are not
/// credited back yet; handed back in batches of at least [`CREDIT_BATCH`].
#[derive(Debug, Default)]
pub struct ReturnedCredit {
    owed: u32,
}

impl ReturnedCredit {
    /// Records that the local socket took `n` bytes of the peer's data; returns
    /// the `Credit` to send now, if a batch is complete (the count starts again
    /// at zero then).
    pub fn took(&mut self, n: usize) -> Option<u32> {
        self.owed = self
            .owed
            .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        (self.owed >= CREDIT_BATCH).then(|| std::mem::take(&mut self.owed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_starts_full_and_shrinks_with_what_is_sent() {
        let w = SendWindow::new();
        assert_eq!(w.room(usize::MAX), TCP_WINDOW as usize);
        assert_eq!(w.room(16 * 1024), 16 * 1024);
        w.spend(TCP_WINDOW as usize - 10);
        assert_eq!(w.room(16 * 1024), 10);
        w.spend(10);
        assert_eq!(w.room(16 * 1024), 0);
        w.grant(100);
        assert_eq!(w.room(16 * 1024), 100);
    }

    #[test]
    fn a_grant_never_overflows_the_window() {
        let w = SendWindow::new();
        w.grant(u32::MAX);
        w.grant(u32::MAX);
        assert!(w.room(usize::MAX) >= TCP_WINDOW as usize);
    }

    #[tokio::test]
    async fn a_sender_out_of_credit_waits_for_a_grant() {
        let w = std::sync::Arc::new(SendWindow::new());
        w.spend(TCP_WINDOW as usize);
        let waiting = tokio::spawn({
            let w = w.clone();
            async move { w.ready(1024).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no credit: the sender waits");
        w.grant(300);
        assert_eq!(waiting.await.unwrap(), 300);
    }

    #[test]
    fn credit_goes_back_in_batches() {
        let mut r = ReturnedCredit::default();
        let batch = CREDIT_BATCH as usize;
        assert_eq!(r.took(batch - 1), None);
        assert_eq!(r.took(2), Some(CREDIT_BATCH + 1));
        assert_eq!(r.took(1), None, "the count starts again after a batch");
        assert_eq!(r.took(batch), Some(CREDIT_BATCH + 1));
    }
}
