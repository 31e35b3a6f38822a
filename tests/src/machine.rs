//! [`Connected`]: a test's hold on this machine's `graft connect` (one tun device,
//! the machine's `/etc/resolv.conf`), for the machine-scope tests.
//!
//! Those tests change the machine itself, so they run one at a time, whichever
//! test binary or worktree they come from: [`Connected::lock`] takes an exclusive
//! `flock` on `/run/graft-testbed/connect.lock` (released by the kernel however
//! the test ends). Dropping the hold ends any connection (`graft quit`), and puts
//! back `/etc/resolv.conf` as it was when the hold was taken, and removes the tun,
//! should graft have failed to.

use std::fs::File;
use std::path::Path;
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};

use crate::{BED_ROOT, graft_bin, require_root};

/// The machine's resolver configuration.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// graft connect's tun device.
pub const TUN: &str = "graft-connect";

/// The machine, held by one test; restored on drop.
pub struct Connected {
    /// `/etc/resolv.conf` as it was before the test.
    pub original_resolv: Vec<u8>,
    _lock: Flock<File>,
}

impl Connected {
    /// Waits for the machine and records its resolver configuration.
    ///
    /// # Panics
    ///
    /// When not root, or the lock file cannot be opened.
    pub fn lock() -> Connected {
        require_root();
        std::fs::create_dir_all(BED_ROOT).expect("cannot create the test-bed root");
        let path = Path::new(BED_ROOT).join("connect.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("cannot lock {}: {e}", path.display()));
        // A test killed outright left a connection: end it first.
        let _ = Command::new(graft_bin()).arg("quit").output();
        Connected {
            original_resolv: std::fs::read(RESOLV_CONF).expect("cannot read /etc/resolv.conf"),
            _lock: lock,
        }
    }

    /// Whether the tun device exists.
    pub fn tun_exists() -> bool {
        Path::new("/sys/class/net").join(TUN).exists()
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        let _ = Command::new(graft_bin()).arg("quit").output();
        if std::fs::read(RESOLV_CONF).ok().as_deref() != Some(&self.original_resolv[..]) {
            let _ = std::fs::write(RESOLV_CONF, &self.original_resolv);
        }
        if Connected::tun_exists() {
            let _ = Command::new("ip").args(["link", "del", TUN]).status();
        }
    }
}
