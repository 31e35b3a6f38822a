//! Incoming traffic: how a session subscribes to a port of the target, the HTTP
//! filter it may attach, and the listing of the sessions on a target.
//!
//! A subscription is a port, a [`IncomingMode`] and an optional [`HttpFilterSpec`].
//! The filter travels as text (regular expressions in the syntax of the Rust
//! `regex` crate, <https://docs.rs/regex/latest/regex/#syntax>) and is compiled by
//! the agent, so a bad expression is an error of that one subscription.
//!
//! The filter is flat on purpose (one list combined all-of or any-of): a
//! recursive type would let a malicious frame nest deep enough to overflow the
//! decoder's stack.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What happens to the target's incoming connections on a subscribed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IncomingMode {
    /// The connections (or, with a filter, the matching requests) go to the
    /// session instead of the target.
    Steal,
    /// The target keeps serving; the session receives a copy of the incoming bytes
    /// (or, with a filter, of the matching requests) and its answers are dropped.
    Mirror,
}

impl fmt::Display for IncomingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IncomingMode::Steal => "steal",
            IncomingMode::Mirror => "mirror",
        })
    }
}

/// How the rules of an [`HttpFilterSpec`] combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Combine {
    /// A request matches when every rule matches.
    AllOf,
    /// A request matches when at least one rule matches.
    AnyOf,
}

/// One rule of an HTTP filter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FilterRule {
    /// A regular expression that must match (search, not anchored) at least one
    /// header line written `name: value`, with the name in lower case (HTTP field
    /// names are case-insensitive, RFC 9110 §5.1). The expression is compiled
    /// case-insensitively; `(?-i)` in it turns that off.
    Header(String),
    /// A regular expression that must match (search, not anchored) the request
    /// target's path and query, e.g. `/api/users?id=7` (RFC 9110 §7.1).
    Path(String),
    /// A method that must equal the request's (methods are case-sensitive, RFC 9110
    /// §9.1; conventional methods are upper case).
    Method(String),
    /// A regular expression (Rust `regex::bytes` syntax, so a body that is not
    /// UTF-8 can still match) searched in the whole request body, as sent (no
    /// `Content-Encoding` is undone), when the body is at most `limit` bytes; a
    /// longer body, or one that does not arrive in time, leaves this rule out and
    /// the request is routed by the filter's other rules.
    Body {
        /// The expression.
        regex: String,
        /// The most body bytes the agent buffers to match it.
        limit: u32,
    },
    /// A JSON pointer (RFC 6901, e.g. `/user/id`) into the request body parsed as
    /// JSON, and the value it must point to: `value` is JSON text (`42`,
    /// `"alice"`, `true`, `{"a":1}`) compared with JSON equality. A body that is
    /// not JSON, or lacks the pointer, does not match; a body longer than `limit`
    /// bytes is treated as for [`FilterRule::Body`].
    Json {
        /// The pointer, empty (the whole document) or starting with `/`.
        pointer: String,
        /// The expected value, as JSON text.
        value: String,
        /// The most body bytes the agent buffers to match it.
        limit: u32,
    },
}

/// An HTTP filter: which requests of a connection a subscription takes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HttpFilterSpec {
    /// How the rules combine.
    pub combine: Combine,
    /// The rules; an empty list matches every request.
    pub rules: Vec<FilterRule>,
}

impl fmt::Display for FilterRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterRule::Header(re) => write!(f, "header~{re:?}"),
            FilterRule::Path(re) => write!(f, "path~{re:?}"),
            FilterRule::Method(m) => write!(f, "method={m}"),
            FilterRule::Body { regex, .. } => write!(f, "body~{regex:?}"),
            FilterRule::Json { pointer, value, .. } => write!(f, "json{pointer}={value}"),
        }
    }
}

impl fmt::Display for HttpFilterSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = match self.combine {
            Combine::AllOf => " and ",
            Combine::AnyOf => " or ",
        };
        if self.rules.is_empty() {
            return f.write_str("any request");
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if i > 0 {
                f.write_str(sep)?;
            }
            write!(f, "{rule}")?;
        }
        Ok(())
    }
}

/// A session's claim on a port of the target.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Subscription {
    /// The target's port.
    pub port: u16,
    /// Steal or mirror.
    pub mode: IncomingMode,
    /// Only the HTTP requests this filter matches; `None` takes whole connections.
    pub filter: Option<HttpFilterSpec>,
}

/// A Unix time (seconds) as the time of day, `HH:MM:SS UTC`: when a session
/// started, in messages and listings.
pub fn clock(unix: u64) -> String {
    let s = unix % 86_400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

/// One subscription of one session on a target, as `graft ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionListing {
    /// Who runs the session (`user@host`, from its `Hello`).
    pub client: String,
    /// When the session subscribed, in seconds since the Unix epoch.
    pub since_unix: u64,
    /// The subscription.
    pub subscription: Subscription,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_print_readably() {
        let spec = HttpFilterSpec {
            combine: Combine::AllOf,
            rules: vec![
                FilterRule::Header("x-user: alice".into()),
                FilterRule::Method("GET".into()),
            ],
        };
        assert_eq!(spec.to_string(), r#"header~"x-user: alice" and method=GET"#);
        let any = HttpFilterSpec {
            combine: Combine::AnyOf,
            rules: vec![FilterRule::Path("^/a".into())],
        };
        assert_eq!(any.to_string(), r#"path~"^/a""#);
    }
}
