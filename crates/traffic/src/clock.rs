//! One process's wall clock and monotonic clock, converted into each other.
//!
//! The parsers time messages with [`Instant`]s (durations that a clock step
//! cannot bend) and date them with the [`SystemTime`] of the same moment. A
//! tapped stream may say when the agent captured its bytes (the time frames of
//! `graft_protocol::incoming::tap`), which is a wall-clock time; [`instant_of`]
//! turns it into the instant the parsers take, and [`wall_of`] turns that back
//! into the same wall-clock time, exactly, because both go through one anchor
//! taken once per process.

use std::{
    sync::LazyLock,
    time::{Instant, SystemTime},
};

/// One moment read from both clocks.
static ANCHOR: LazyLock<(Instant, SystemTime)> =
    LazyLock::new(|| (Instant::now(), SystemTime::now()));

/// The wall-clock time of `at`.
pub fn wall_of(at: Instant) -> SystemTime {
    let (instant, wall) = *ANCHOR;
    if at >= instant {
        wall + (at - instant)
    } else {
        wall - (instant - at)
    }
}

/// The instant of the wall-clock time `at` (an instant may lie before the
/// monotonic clock's start: Linux counts it in signed seconds). A time that no
/// instant can name is the anchor.
pub fn instant_of(at: SystemTime) -> Instant {
    let (instant, wall) = *ANCHOR;
    match at.duration_since(wall) {
        Ok(ahead) => instant.checked_add(ahead).unwrap_or(instant),
        Err(behind) => instant.checked_sub(behind.duration()).unwrap_or(instant),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_wall_clock_time_survives_the_round_trip() {
        let now = SystemTime::now();
        for at in [
            now,
            now + Duration::from_micros(1),
            now - Duration::from_millis(3),
            now + Duration::from_secs(3600),
        ] {
            assert_eq!(wall_of(instant_of(at)), at);
        }
        assert!(instant_of(now) < instant_of(now + Duration::from_micros(1)));
    }

    #[test]
    fn a_time_before_the_monotonic_clock_still_round_trips() {
        let long_ago = SystemTime::UNIX_EPOCH;
        assert_eq!(wall_of(instant_of(long_ago)), long_ago);
    }

    /// The largest time a tap frame can carry (`u64::MAX` microseconds) does
    /// not overflow the monotonic clock.
    #[test]
    fn a_time_no_instant_can_name_is_the_anchor() {
        let far = SystemTime::UNIX_EPOCH + Duration::from_micros(u64::MAX);
        if let Some(i) = ANCHOR.0.checked_add(far.duration_since(ANCHOR.1).unwrap()) {
            assert_eq!(instant_of(far), i);
        } else {
            assert_eq!(instant_of(far), ANCHOR.0);
        }
    }
}
