//! `graft run` with the debug logs that say which path graft took: the
//! session's (`GRAFT_LOG=debug`, on stderr) and the layer's (`GRAFT_LAYER_LOG`,
//! a file per run in the bed's work directory), for tests that check a socket
//! was passed or relayed, or a file opened directly or through the agent.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{Bed, Outcome, RUN_TIMEOUT};

/// A fresh layer log path in `bed`'s work directory (`layer-N.log`).
pub fn layer_log_path(bed: &Bed) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    bed.work_dir().join(format!("layer-{n}.log"))
}

/// Runs `graft run FLAGS -- CMD` with `GRAFT_LOG=debug`, a fresh layer log and
/// the `extra` environment, to completion (at most [`RUN_TIMEOUT`]); returns
/// its outcome and the layer's log (empty when the layer wrote none).
pub fn run_logged(
    bed: &Bed,
    extra: &[(&str, &str)],
    flags: &[&str],
    cmd: &[&str],
) -> (Outcome, String) {
    let log = layer_log_path(bed);
    let mut command = bed.graft_run(flags, cmd);
    command
        .env("GRAFT_LOG", "debug")
        .env("GRAFT_LAYER_LOG", &log);
    for (k, v) in extra {
        command.env(k, v);
    }
    let out = bed.finish(bed.spawn(command, "graft run (debug)"), RUN_TIMEOUT);
    let layer = std::fs::read_to_string(&log).unwrap_or_default();
    (out, layer)
}

/// What the layer logs for each stolen connection the program accepted from
/// its direct listener (crates/layer/src/socket/direct.rs).
pub const ACCEPTED_DIRECT: &str = "accepted from the direct listener";

/// How many stolen connections the program accepted from its direct listener,
/// counted in the layer's log text `layer`.
pub fn accepted_direct(layer: &str) -> usize {
    layer.matches(ACCEPTED_DIRECT).count()
}
