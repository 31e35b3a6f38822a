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
    /// Mirror only: the session also wants the target's answers. Each mirrored
    /// connection then carries [`tap`] frames (the client's bytes and the target's
    /// bytes, told apart) instead of the client's bytes alone. Added in protocol
    /// 0.4; absent (false) from older peers' JSON.
    #[serde(default)]
    pub responses: bool,
}

/// The framing of a mirrored connection whose subscription asked for
/// [`Subscription::responses`]: the agent writes a sequence of frames, each a
/// 1-byte kind, a 4-byte big-endian length of at most [`tap::MAX_CHUNK`], then
/// that many bytes. Kinds 0 and 1 carry bytes ([`tap::Direction`]): bytes of one
/// direction arrive in order; the two directions interleave in the order the
/// agent read them. Kind 2 ([`tap::Frame::Time`]) carries a time: when the agent
/// captured or read the bytes of the frames that follow, up to the next time
/// frame, as 8 big-endian bytes of microseconds since the Unix epoch. The agent
/// sends time frames only to a client whose `Hello` names
/// [`crate::version::FEATURE_TAP_TIMES`].
pub mod tap {
    use std::time::{Duration, SystemTime};

    /// The largest chunk one frame carries, in bytes.
    pub const MAX_CHUNK: usize = 64 * 1024;
    /// The length of a frame's header, in bytes.
    pub const HEADER_LEN: usize = 5;
    /// The length of a time frame's body, in bytes.
    pub const TIME_LEN: usize = 8;

    /// Which way a frame's bytes went.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Direction {
        /// From the client to the target's server.
        Request,
        /// From the target's server to the client.
        Response,
    }

    /// What a frame's header announces.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Frame {
        /// That many bytes (at most [`MAX_CHUNK`]) sent that way.
        Bytes(Direction, usize),
        /// A time of [`TIME_LEN`] bytes, for [`parse_time`].
        Time,
    }

    /// The header of a frame carrying `len` bytes (at most [`MAX_CHUNK`]) sent
    /// `direction`.
    ///
    /// # Panics
    ///
    /// When `len` exceeds [`MAX_CHUNK`]: callers split larger reads.
    pub fn header(direction: Direction, len: usize) -> [u8; HEADER_LEN] {
        assert!(len <= MAX_CHUNK, "tap chunks are split to MAX_CHUNK");
        let mut out = [0u8; HEADER_LEN];
        out[0] = match direction {
            Direction::Request => 0,
            Direction::Response => 1,
        };
        out[1..].copy_from_slice(&(len as u32).to_be_bytes());
        out
    }

    /// A whole time frame: the bytes of the frames after it were captured or
    /// read at `at` (a time before the epoch is sent as the epoch; one past
    /// `u64::MAX` microseconds saturates).
    pub fn time(at: SystemTime) -> [u8; HEADER_LEN + TIME_LEN] {
        let us = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let mut out = [0u8; HEADER_LEN + TIME_LEN];
        out[0] = 2;
        out[1..HEADER_LEN].copy_from_slice(&(TIME_LEN as u32).to_be_bytes());
        out[HEADER_LEN..].copy_from_slice(&us.to_be_bytes());
        out
    }

    /// Decodes a frame's header.
    ///
    /// # Errors
    ///
    /// A message when the kind byte is unknown, a byte frame's length exceeds
    /// [`MAX_CHUNK`] or a time frame's is not [`TIME_LEN`] (a peer that does not
    /// speak this framing).
    pub fn parse_header(bytes: [u8; HEADER_LEN]) -> Result<Frame, String> {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        let direction = match bytes[0] {
            0 => Direction::Request,
            1 => Direction::Response,
            2 if len == TIME_LEN => return Ok(Frame::Time),
            2 => return Err(format!("a tap time frame of {len} bytes, not {TIME_LEN}")),
            other => return Err(format!("unknown tap frame kind {other}")),
        };
        if len > MAX_CHUNK {
            return Err(format!("a tap frame of {len} bytes exceeds {MAX_CHUNK}"));
        }
        Ok(Frame::Bytes(direction, len))
    }

    /// Decodes a time frame's body.
    pub fn parse_time(bytes: [u8; TIME_LEN]) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_micros(u64::from_be_bytes(bytes))
    }
}

/// A Unix time (seconds) as the time of day, `HH:MM:SS UTC`: when a session
/// started, in messages and listings.
pub fn clock(unix: u64) -> String {
    let s = unix % 86_400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

/// Why the agent refused a [`Subscription`] (the error of
/// `AgentMessage::SubscribeResult`). Callers branch on the kind: a port held by
/// another session is `EADDRINUSE` to the program, anything else `EACCES`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SubscribeError {
    /// Another session already steals the port without a filter (a steal
    /// conflict).
    #[error(
        "port {port} is already stolen by {holder} (since {}); steal only some requests \
         with --filter-header/--filter-path/--filter-method, or use --mirror",
        clock(*since_unix)
    )]
    PortInUse {
        /// The port asked for.
        port: u16,
        /// The session that holds it (`user@host`, from its `Hello`).
        holder: String,
        /// When that session subscribed, in seconds since the Unix epoch.
        since_unix: u64,
    },
    /// The HTTP filter does not compile.
    #[error("the HTTP filter is not valid: {reason}")]
    BadFilter {
        /// What is wrong with it, as the filter compiler says.
        reason: String,
    },
    /// The agent could not redirect the port's traffic to itself (its listeners
    /// or the packet rules).
    #[error("{reason}")]
    Redirect {
        /// What failed, as the packet rules reported it.
        reason: String,
    },
    /// The target's hub (the agent that shares the port among sessions) refused
    /// or could not be reached.
    #[error("{reason}")]
    Hub {
        /// What failed.
        reason: String,
    },
    /// After an outage of the link, taking the port back failed: the port is no
    /// longer stolen or mirrored.
    #[error(
        "no longer stolen or mirrored: the link to the agent was down, and taking the port \
         back failed: {cause}"
    )]
    Lost {
        /// Why taking it back failed.
        cause: Box<SubscribeError>,
    },
    /// TLS termination (`--tls-cert`) cannot be set up for the port: a bad
    /// certificate or key, a ClientHello on a filtered port without one, or a
    /// hub owned by another session's agent.
    #[error("{reason}")]
    Tls {
        /// What failed, and the flag that fixes it.
        reason: String,
    },
}

impl SubscribeError {
    /// Whether the port is held by another session (also when that is why a
    /// port was lost after an outage).
    pub fn is_port_in_use(&self) -> bool {
        match self {
            SubscribeError::PortInUse { .. } => true,
            SubscribeError::Lost { cause } => cause.is_port_in_use(),
            _ => false,
        }
    }
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

/// Where a request of a watched port went when it did not reach the watching
/// session ([`crate::link::AgentMessage::Routed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RoutedTo {
    /// The target's own server: no filter of any session took it.
    Target,
    /// Another session's filter took it. Which session is not said, and nothing
    /// of the request is (its headers and bodies are that session's).
    AnotherSession,
}

/// A request on a port a session subscribed that went elsewhere (to the target
/// or to another session), sent to that session while it watches its routes
/// ([`crate::link::ClientMessage::WatchRoutes`]), after the response ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutedRequest {
    /// The target's port.
    pub port: u16,
    /// Where it went.
    pub to: RoutedTo,
    /// When the agent routed it, in milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// The request and its answer; `None` when it went to another session.
    pub detail: Option<RoutedDetail>,
}

/// The most bytes of each body a [`RoutedDetail`] carries.
pub const ROUTED_BODY_KEEP: usize = 64 * 1024;

/// What the watching session may see of a request the target answered: heads,
/// sizes and the first [`ROUTED_BODY_KEEP`] bytes of each body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutedDetail {
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// The method.
    pub method: String,
    /// The request target (path and query; the authority too for an absolute
    /// form).
    pub target: String,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// The request's fields in order, names in lower case, values as text
    /// (bytes that are not UTF-8 replaced, U+FFFD).
    pub request_headers: Vec<(String, String)>,
    /// How many request body bytes passed.
    pub request_body_len: u64,
    /// The request body's first bytes (at most [`ROUTED_BODY_KEEP`]), as sent
    /// (chunked framing removed, content codings such as gzip left).
    #[serde(with = "serde_bytes")]
    pub request_body: Vec<u8>,
    /// The status the client got (502 when the target did not answer).
    pub status: u16,
    /// The response's fields, as for `request_headers`.
    pub response_headers: Vec<(String, String)>,
    /// How many response body bytes passed.
    pub response_body_len: u64,
    /// The response body's first bytes, as for `request_body`.
    #[serde(with = "serde_bytes")]
    pub response_body: Vec<u8>,
    /// From routing the request to the end of the response, in microseconds.
    pub latency_us: u64,
    /// Why the target did not answer, when it did not.
    pub error: Option<String>,
}

/// Bytes that must not leak: zeroed when dropped, never printed by `Debug`.
///
/// Carries a TLS private key (PEM) from the CLI to the agent; the link is
/// authenticated and encrypted (see [`crate::link`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretBytes(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl Drop for SecretBytes {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

/// TLS termination for a filtered port that serves HTTPS: the agent decrypts the
/// client's connection with the target's certificate, applies the HTTP filter to
/// the decrypted requests, sends the unmatched ones on to the target over TLS and
/// the matched ones to the session's program.
///
/// Sent with [`crate::link::ClientMessage::SubscribeTls`] only to agents whose
/// protocol version is at least [`TLS_STEAL_SINCE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsTermination {
    /// The certificate chain the agent presents to clients, PEM (end-entity
    /// first, RFC 7468), as in a `kubernetes.io/tls` Secret's `tls.crt`.
    pub cert_chain_pem: String,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1), as in
    /// `tls.key`.
    pub key_pem: SecretBytes,
    /// Accept any certificate from the target's server (`--tls-insecure-upstream`);
    /// otherwise its certificate must be the given end-entity certificate or
    /// chain to a certificate of the given chain.
    pub insecure_upstream: bool,
    /// Deliver matched requests to the program over TLS again (`--tls-local`)
    /// rather than as plain HTTP.
    pub local: bool,
}

/// The first protocol version whose agents know
/// [`crate::link::ClientMessage::SubscribeTls`].
pub const TLS_STEAL_SINCE: &str = "0.4.0";

/// Whether an agent speaking protocol `version` knows
/// [`crate::link::ClientMessage::SubscribeTls`] (false when it does not parse).
pub fn knows_tls_steal(version: &str) -> bool {
    let since = semver::Version::parse(TLS_STEAL_SINCE).expect("a valid semver literal");
    semver::Version::parse(version).is_ok_and(|v| v >= since)
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

    #[test]
    fn tap_headers_round_trip_and_refuse_garbage() {
        use tap::{Direction, Frame, header, parse_header, parse_time, time};
        assert_eq!(
            parse_header(header(Direction::Response, 70)),
            Ok(Frame::Bytes(Direction::Response, 70))
        );
        assert_eq!(
            parse_header(header(Direction::Request, tap::MAX_CHUNK)),
            Ok(Frame::Bytes(Direction::Request, tap::MAX_CHUNK))
        );
        let at = std::time::SystemTime::UNIX_EPOCH
            + std::time::Duration::from_micros(1_700_000_000_123_456);
        let frame = time(at);
        let head: [u8; tap::HEADER_LEN] = frame[..tap::HEADER_LEN].try_into().unwrap();
        assert_eq!(parse_header(head), Ok(Frame::Time));
        assert_eq!(parse_time(frame[tap::HEADER_LEN..].try_into().unwrap()), at);
        assert!(parse_header([2, 0, 0, 0, 1]).is_err());
        assert!(parse_header([2, 0, 0, 0, 9]).is_err());
        assert!(parse_header([3, 0, 0, 0, 1]).is_err());
        assert!(parse_header([0, 0, 1, 0, 1]).is_err());
    }

    #[test]
    fn tls_steal_needs_a_new_enough_agent_and_keys_never_print() {
        assert!(!knows_tls_steal("0.3.9"));
        assert!(knows_tls_steal("0.4.0"));
        assert!(!knows_tls_steal("banana"));
        let key = SecretBytes(b"-----BEGIN PRIVATE KEY-----".to_vec());
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }
}
