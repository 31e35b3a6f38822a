//! Remote paths the program wrote on this machine under `--fs read`: opens
//! that write stay local there, so the file the program created or changed is a
//! local one, and its later reads, stats and opens of that path must be local
//! too (else `open(path, "w")` then `open(path)` reads the target's copy, or
//! fails with `ENOENT` when the target has none).
//!
//! The set belongs to the process (a forked child inherits it; a program it
//! executes starts with an empty one). [`contains`] is one atomic load while the
//! set is empty, so remote reads pay nothing until the program writes.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

static PATHS: Mutex<Option<HashSet<String>>> = Mutex::new(None);
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Remembers that the program wrote the (normalised) remote `path` locally.
pub fn record(path: &str) {
    let mut paths = PATHS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let set = paths.get_or_insert_with(HashSet::new);
    set.insert(path.to_owned());
    COUNT.store(set.len(), Ordering::Relaxed);
}

/// Whether the program wrote the (normalised) remote `path` locally.
pub fn contains(path: &str) -> bool {
    if COUNT.load(Ordering::Relaxed) == 0 {
        return false;
    }
    PATHS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_ref()
        .is_some_and(|set| set.contains(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_paths_are_found_and_others_not() {
        assert!(!contains("/srv/a"));
        record("/srv/a");
        assert!(contains("/srv/a"));
        assert!(!contains("/srv/b"));
    }
}
