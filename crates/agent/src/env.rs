//! The target's environment, read from `/proc/PID/environ` (through
//! `graft_proc::environ`).
//!
//! The file holds the environment the target was started with (`execve`'s
//! `envp`): NUL-terminated `NAME=value` entries. Entries without `=` are kept
//! with an empty value; names and values that are not UTF-8 are converted lossily.

use graft_protocol::remote::{RemoteError, RemoteResponse};

/// Answers `RemoteRequest::Env` for the target `pid` (blocking).
pub fn target_env(pid: u32) -> RemoteResponse {
    match graft_proc::environ(pid) {
        Ok(env) => RemoteResponse::Env(env),
        Err(e) => RemoteResponse::Error(RemoteError::Os(e.raw_os_error().unwrap_or(libc::EIO))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_proc::parse_environ;

    #[test]
    fn splits_at_the_first_equals_sign() {
        let env = parse_environ(b"A=1\0B=x=y\0EMPTY=\0NOEQ\0\0");
        assert_eq!(
            env,
            [
                ("A".into(), "1".into()),
                ("B".into(), "x=y".into()),
                ("EMPTY".into(), String::new()),
                ("NOEQ".into(), String::new()),
            ]
        );
    }

    #[test]
    fn non_utf8_is_lossy_and_empty_is_empty() {
        assert!(parse_environ(b"").is_empty());
        let env = parse_environ(b"K=\xff\0");
        assert_eq!(env, [("K".into(), "\u{fffd}".into())]);
    }

    #[test]
    fn reads_own_environment() {
        let RemoteResponse::Env(env) = target_env(std::process::id()) else {
            panic!("no environment")
        };
        assert!(env.iter().any(|(k, _)| k == "PATH" || k == "HOME"));
    }
}
