//! Process limits the agent needs: every stolen, mirrored or relayed connection
//! holds descriptors, and the default soft `RLIMIT_NOFILE` (1024 on most
//! systems, getrlimit(2)) is far below what a busy target sees, so the agent
//! raises its soft limit to the hard one at start. Its children (the rule
//! commands) get the raised limit too, which does no harm.

use rustix::process::{Resource, getrlimit, setrlimit};

/// Raises the soft limit on open descriptors to the hard limit; returns the new
/// soft limit (`None`: unlimited), or the error of `setrlimit`, which the caller
/// logs (running with the old limit is still correct, only less roomy).
///
/// # Errors
///
/// When `setrlimit(RLIMIT_NOFILE)` fails.
pub fn raise_nofile() -> rustix::io::Result<Option<u64>> {
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit)?;
    }
    Ok(limit.current)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_reaches_the_hard_limit() {
        let raised = super::raise_nofile().unwrap();
        let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(now.current, raised);
        assert_eq!(now.current, now.maximum);
    }
}
