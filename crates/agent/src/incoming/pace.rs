//! Sub-millisecond sleeps for the sniffing mirror's consumer ([`super::sniff`]),
//! which spreads a capture block's copies over the time until the next block
//! instead of writing them in one burst.
//!
//! Why spread them: the local program answers each copy on the same CPUs as the
//! target's server. Measured on the bench's machine (2 vCPUs, Linux 6.18;
//! `bench/copies.c` sending 10 000 requests a second to a local server while
//! `bench/paced.c` timed the target's own clients at the same rate, 4–5
//! interleaved rounds of 3 s), with no capture at all:
//!
//! | how the copies went out | the target's p99 |
//! |---|---|
//! | no copies | 44–67 µs |
//! | 1 ms blocks (10 copies at once) | 81–105 µs |
//! | 500 µs blocks | 54–78 µs |
//! | 250 µs blocks (2–3 copies at once) | 54–72 µs |
//! | each when due | 43–89 µs |
//!
//! A burst of copies makes a burst of the local program's work (and of the
//! loopback's softirq work), which a woken target waits behind; small groups do
//! not. Smaller is better still: at 4 000 requests a second (about 4 copies a
//! block), sending them in 2 groups of 2 instead of 4 of 1 raised the target's
//! p99 from 49–94 µs to 76–213 µs (5 interleaved runs), for 2–5 µs less CPU
//! per copy; so the groups stay as small as the slots allow. tokio's timer counts whole milliseconds, so this sleeps on a `timerfd`
//! (timerfd_create(2)), whose expiry is exact to the kernel's high-resolution
//! timers, registered with the mirror thread's own runtime.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
    timerfd_settime,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A one-shot timer of the current runtime, reused for every sleep.
pub struct Pacer {
    timer: AsyncFd<OwnedFd>,
}

impl Pacer {
    /// A timer on `CLOCK_MONOTONIC`, registered with the current tokio runtime
    /// (call it on the runtime that will sleep on it).
    ///
    /// # Errors
    ///
    /// `timerfd_create` failed (`EMFILE`, `ENOMEM`), or the runtime has no I/O
    /// driver.
    #[allow(unsafe_code)]
    pub fn new() -> io::Result<Pacer> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor
        // stays open, and is not reused for another file, for as long as it is
        // registered.
        let timer = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Pacer { timer })
    }

    /// Sleeps for `duration` (at least 1 ns), letting the runtime's other tasks
    /// run meanwhile.
    ///
    /// # Errors
    ///
    /// `timerfd_settime` or the read of the expiry count failed; never seen,
    /// but the caller then goes on without sleeping.
    pub async fn sleep(&self, duration: Duration) -> io::Result<()> {
        let nanos = duration.as_nanos().clamp(1, 999_999_999);
        let value = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec {
                tv_sec: 0,
                // At most 999 999 999: fits.
                tv_nsec: nanos as _,
            },
        };
        timerfd_settime(self.timer.get_ref(), TimerfdTimerFlags::empty(), &value)?;
        loop {
            let mut ready = self.timer.readable().await?;
            let mut expirations = [0u8; 8];
            match ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut expirations)?)) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                // Not expired yet (a readiness left from an earlier sleep).
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::Pacer;

    #[tokio::test(flavor = "current_thread")]
    async fn sleeps_at_least_the_duration_and_is_reusable() {
        let pacer = Pacer::new().unwrap();
        for micros in [250, 10, 1000] {
            let wanted = Duration::from_micros(micros);
            let start = Instant::now();
            pacer.sleep(wanted).await.unwrap();
            assert!(start.elapsed() >= wanted, "woke before the timer expired");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn other_tasks_run_while_it_sleeps() {
        let pacer = Pacer::new().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move { tx.send(()).unwrap() });
        let mut rx = rx;
        pacer.sleep(Duration::from_millis(5)).await.unwrap();
        // Nothing else runs between the sleep's end and this check.
        rx.try_recv()
            .expect("the spawned task ran during the sleep");
    }
}
