//! The one error type of the binary: a message, its causes, what to do about it,
//! and the exit code it maps to (2 for usage and configuration, 1 for session
//! failures).
//!
//! A failure made from an error ([`Failure::session_error`],
//! [`Failure::usage_error`]) keeps the error's source chain and prints each
//! cause once, as a `graft: caused by: …` line: a cause whose text the message
//! (or an earlier cause) already holds, because an error wrote its source into
//! its own message, is not printed again.

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
    /// What caused it, outermost first (the error's `source()` chain), each
    /// not already said by the message or an earlier cause.
    pub causes: Vec<String>,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Failure {
    /// A usage or configuration error (exit code 2).
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_USAGE,
            message: message.into(),
            causes: Vec::new(),
            hint: None,
        }
    }

    /// A session failure (exit code 1).
    pub fn session(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_SESSION,
            message: message.into(),
            causes: Vec::new(),
            hint: None,
        }
    }

    /// A usage or configuration error (exit code 2) from `error` and its
    /// source chain.
    pub fn usage_error(error: &(dyn std::error::Error + 'static)) -> Failure {
        Failure::of(EXIT_USAGE, error)
    }

    /// A session failure (exit code 1) from `error` and its source chain.
    pub fn session_error(error: &(dyn std::error::Error + 'static)) -> Failure {
        Failure::of(EXIT_SESSION, error)
    }

    /// A failure with exit code `code` from `error`: its message, then each
    /// cause of its source chain that no text before it already holds.
    pub fn of(code: u8, error: &(dyn std::error::Error + 'static)) -> Failure {
        let message = error.to_string();
        let mut said = message.clone();
        let mut causes = Vec::new();
        let mut next = error.source();
        while let Some(cause) = next {
            let text = cause.to_string();
            if !text.is_empty() && !said.contains(&text) {
                said.push('\n');
                said.push_str(&text);
                causes.push(text);
            }
            next = cause.source();
        }
        Failure {
            code,
            message,
            causes,
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
        for cause in &self.causes {
            write!(f, "\ngraft: caused by: {cause}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\ngraft: hint: {hint}")?;
        }
        Ok(())
    }
}

impl From<graft_config::ConfigError> for Failure {
    fn from(e: graft_config::ConfigError) -> Failure {
        Failure::usage_error(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An I/O error under a parse error under a load error, where the middle
    /// one writes its source into its message (as many `{source}` errors do).
    #[derive(Debug, thiserror::Error)]
    #[error("could not load the session")]
    struct Load(#[source] Parse);

    #[derive(Debug, thiserror::Error)]
    #[error("the state file is not valid: {0}")]
    struct Parse(#[source] std::io::Error);

    #[test]
    fn a_nested_cause_is_printed_exactly_once() {
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, "bad byte at 7");
        let failure = Failure::session_error(&Load(Parse(io))).hint("delete the file");
        let text = failure.to_string();
        assert_eq!(
            text,
            "graft: error: could not load the session\n\
             graft: caused by: the state file is not valid: bad byte at 7\n\
             graft: hint: delete the file"
        );
        assert_eq!(text.matches("bad byte at 7").count(), 1, "{text}");
        assert_eq!(failure.code, EXIT_SESSION);
    }

    #[test]
    fn every_distinct_cause_gets_its_line() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] Middle);
        #[derive(Debug, thiserror::Error)]
        #[error("middle")]
        struct Middle(#[source] std::io::Error);
        let failure = Failure::usage_error(&Outer(Middle(std::io::Error::other("inner"))));
        assert_eq!(failure.causes, ["middle", "inner"]);
        assert_eq!(failure.code, EXIT_USAGE);
    }
}
