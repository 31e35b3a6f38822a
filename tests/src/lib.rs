//! The test bed of graft's integration suite: real targets in network namespaces,
//! driven through the real `graft` binary with real programs (curl, Python, getent,
//! small C programs).
//!
//! A test makes a [`Bed`]; the bed owns one slot `N` (0..=253, see [`slot`]) and
//! builds, for that slot alone:
//!
//! ```text
//!  host netns                 target netns gt{N}t              service netns gt{N}s
//!  198.18.N.1  ── gt{N}h ═ gt{N}a ── 198.18.N.2
//!  2001:2:0:N::1                     2001:2:0:N::2
//!                                    198.19.N.1 ── gt{N}b ═ gt{N}c ── 198.19.N.2
//!                                    2001:2:0:1NNN::1                 2001:2:0:1NNN::2
//!  curl, graft, CMD                  target_server.py (port 80       service.py (HTTP 80,
//!                                    and app_port), own mount         TCP echo 7, RST 10/11,
//!                                    namespace and chroot             UDP echo 7), dnsmasq
//! ```
//!
//! The host routes `198.18.0.0/15` and `2001:2::/48` as `unreachable` (the
//! benchmarking ranges), so the only way to the service is from the target's
//! namespace: a reply of the service that names the target's address proves a
//! connection left from the target. The target process has its own mount
//! namespace and root (a recursive bind of `/`, chrooted), with its own
//! `/etc/hosts`, `/etc/resolv.conf` (pointing at the service's dnsmasq), and files
//! that exist only there (see [`Bed::remote_dir`]).
//!
//! Every process a bed starts carries [`SLOT_ENV`] in its environment and runs in
//! its own process group, so dropping the bed (also while a test panics) kills
//! them all, the agents beside the target included, then deletes the namespaces
//! and files. Leftovers of a test process that was killed outright are removed by
//! the next bed that takes the same slot.

mod bed;
pub mod cluster;
pub mod fake_kube;
pub mod link;
pub mod logged;
pub mod machine;
mod net;
pub mod pki;
mod process;
mod slot;
pub mod webdriver;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

pub use bed::Bed;
pub use fake_kube::{FakeKube, FakeKubeOptions};
pub use net::{curl, http_get, wait_until};
pub use process::{Outcome, Proc, alive};

/// Environment variable set on every process a bed starts: its slot number. The
/// bed's teardown kills every process that carries it.
pub const SLOT_ENV: &str = "GRAFT_TESTBED_SLOT";

/// How long a short `graft run` may take before the test fails (and it is killed).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(45);

/// How long a steal may take to become effective after `graft run` starts.
pub const STEAL_TIMEOUT: Duration = Duration::from_secs(15);

/// The root of everything the beds create on the host (slots, per-bed files).
pub const BED_ROOT: &str = "/run/graft-testbed";

/// The directory holding `graft`, `graft-agent` and `libgraft_layer.so`:
/// `$GRAFT_BIN_DIR` when set, else the Cargo target directory this test binary was
/// built into (`target/debug/deps/TEST` → `target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GRAFT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    let mut dir = exe
        .parent()
        .expect("the test binary lives in a directory")
        .to_path_buf();
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.pop();
    }
    dir
}

/// The `graft` binary under test.
pub fn graft_bin() -> PathBuf {
    bin_dir().join("graft")
}

/// The `graft-agent` binary under test.
pub fn agent_bin() -> PathBuf {
    bin_dir().join("graft-agent")
}

/// The `graft-tests` package directory: the working directory of every program a
/// test runs under graft, so the fixtures below it stay local.
pub fn package_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A file of `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    package_dir().join("fixtures").join(name)
}

/// [`fixture`] as a string, for argument lists.
pub fn fixture_str(name: &str) -> String {
    fixture(name).display().to_string()
}

/// The real Python interpreter (`sys.executable`), not a version-manager shim, so
/// that a process started with it *is* Python (its pid is the server's pid).
pub fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 is installed (scripts/test installs it)");
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success() && !path.is_empty(),
            "python3 -c 'import sys; print(sys.executable)' failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    })
}

/// Fails the test with a clear message unless it runs as root: beds create network
/// namespaces, veths, mounts and routes.
///
/// # Panics
///
/// When the effective user is not root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "graft's integration tests build network namespaces and must run as root: \
         run ./scripts/test (it uses sudo when needed)"
    );
}

/// Byte `i` of the 3 MiB file `big.bin` that exists only in the target.
pub fn big_file_byte(i: usize) -> u8 {
    ((i % 251) as u8) ^ ((i >> 12) as u8)
}

/// Size of `big.bin` in bytes.
pub const BIG_FILE_LEN: usize = 3 * 1024 * 1024;

/// The 32-bit FNV-1a hash of `big.bin`, as `fixtures/files.c bytewise` prints it.
pub fn big_file_fnv() -> u32 {
    (0..BIG_FILE_LEN).fold(2_166_136_261u32, |hash, i| {
        (hash ^ u32::from(big_file_byte(i))).wrapping_mul(16_777_619)
    })
}
