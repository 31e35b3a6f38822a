//! The one error type of the binary: a message, what to do about it, and the exit
//! code it maps to (2 for usage and configuration, 1 for session failures).

use std::fmt;

/// Exit code for bad flags, a bad config file or an unknown target.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a session that could not start or broke.
pub const EXIT_SESSION: u8 = 1;

/// Why `graft` stopped before or around running CMD.
#[derive(Debug)]
pub struct Failure {
    /// The process exit code.
    pub code: u8,
    /// What failed and why.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Failure {
    /// A usage or configuration error (exit code 2).
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_USAGE,
            message: message.into(),
            hint: None,
        }
    }

    /// A session failure (exit code 1).
    pub fn session(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_SESSION,
            message: message.into(),
            hint: None,
        }
    }

    /// Adds what to do.
    pub fn hint(mut self, hint: impl Into<String>) -> Failure {
        self.hint = Some(hint.into());
        self
    }

    /// Prints the failure to stderr as `graft: error: …` and `graft: hint: …`.
    pub fn print(&self) {
        eprintln!("{self}");
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "graft: error: {}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\ngraft: hint: {hint}")?;
        }
        Ok(())
    }
}

impl From<graft_config::ConfigError> for Failure {
    fn from(e: graft_config::ConfigError) -> Failure {
        Failure::usage(e.to_string())
    }
}
