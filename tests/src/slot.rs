//! Slots: which test bed index `N` (0..=253) a test process owns.
//!
//! A slot is an exclusive `flock` on `/run/graft-testbed/slots/N`. The kernel
//! releases the lock when its owner dies, however it dies, so the slot of a test
//! that was killed outright is free again at once; the next owner removes what that
//! test left behind before building its bed. Lock files are never deleted: deleting
//! a locked file would let two processes lock two different files of the same name.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};

use crate::BED_ROOT;

/// Number of slots: `N` is one octet of `198.18.N.0/24`, and 254 is the demo's.
pub(crate) const SLOTS: u16 = 254;

/// An owned slot; dropping it releases the lock.
pub(crate) struct Slot {
    n: u8,
    _lock: Flock<File>,
}

impl Slot {
    /// Takes the first free slot that `usable` accepts, starting from one derived from this process's id
    /// so that parallel test processes rarely contend for the same lock.
    ///
    /// # Panics
    ///
    /// When the slot directory cannot be created or every slot is busy.
    pub(crate) fn acquire_where(usable: impl Fn(u8) -> bool) -> Slot {
        let start = std::process::id() % u32::from(SLOTS);
        (0..u32::from(SLOTS))
            .find_map(|i| {
                let n = u8::try_from((start + i) % u32::from(SLOTS)).expect("slots fit in a u8");
                if usable(n) { Slot::try_take(n) } else { None }
            })
            .unwrap_or_else(|| panic!("all {SLOTS} test-bed slots under {BED_ROOT}/slots are busy"))
    }

    /// Takes slot `n` if nobody holds it.
    ///
    /// # Panics
    ///
    /// When the slot directory or lock file cannot be created.
    pub(crate) fn try_take(n: u8) -> Option<Slot> {
        let dir = PathBuf::from(BED_ROOT).join("slots");
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let path = dir.join(n.to_string());
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open slot lock {}: {e}", path.display()));
        let mut lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()?;
        // Who owns it, for people looking at a stuck machine.
        let _ = lock.set_len(0);
        let _ = writeln!(lock, "{}", std::process::id());
        Some(Slot { n, _lock: lock })
    }

    /// The slot's index `N`.
    pub(crate) fn n(&self) -> u8 {
        self.n
    }
}
