//! HTTP request filters: an [`HttpFilterSpec`] (text, as it travels in the
//! protocol and sits in `graft.toml`) compiled once into an [`HttpFilter`] that
//! decides, per request, whether a steal or mirror subscription takes it.
//!
//! Specs enter from the CLI flags ([`from_flags`]), from `graft.toml` (through
//! `graft-config`) or from a `Subscribe` frame (in the agent); all three go through
//! [`HttpFilter::compile`], which is where hostile input is refused: at most
//! [`MAX_RULES`] rules, [`MAX_PATTERN_LEN`] bytes per pattern, and
//! [`REGEX_SIZE_LIMIT`] bytes for each compiled expression and its lazy DFA,
//! and body rules buffer at most [`MAX_BODY_LIMIT`] bytes ([`body`] says how
//! hostile bodies are handled). Matching ([`HttpFilter::matches`],
//! [`HttpFilter::matches_request`]) runs on every request of a filtered
//! connection, so it allocates nothing in the common case (a JSON rule parses
//! the body once per request).
//!
//! The semantics of each rule are those documented on
//! [`graft_protocol::incoming::FilterRule`]; regular expressions use the syntax
//! of the Rust `regex` crate (<https://docs.rs/regex/latest/regex/#syntax>).

pub mod body;

use std::{cell::RefCell, fmt};

use graft_protocol::incoming::{Combine, FilterRule, HttpFilterSpec};
use http::{HeaderMap, HeaderValue, Method, Uri};
use regex::{Regex, RegexBuilder};

use body::BodyRule;
pub use body::{DEFAULT_BODY_LIMIT, MAX_BODY_LIMIT, RequestBody, parse_json_rule};

/// The most rules one filter may have.
pub const MAX_RULES: usize = 64;

/// The longest pattern (regular expression or method) of one rule, in bytes.
pub const MAX_PATTERN_LEN: usize = 4096;

/// The most memory, in bytes, that one compiled expression may take, and
/// separately the most its lazy DFA cache may take (`RegexBuilder::size_limit`
/// and `dfa_size_limit`). 1 MiB is ample for a hand-written filter and stops
/// expressions like `\w{1000}{1000}` that would take gigabytes.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Header lines longer than this, in bytes, do not keep the per-thread buffer
/// grown after the request; one huge header should not pin memory for good.
const KEEP_LINE_CAPACITY: usize = 16 * 1024;

/// Which kind of rule an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleKind {
    /// [`FilterRule::Header`].
    Header,
    /// [`FilterRule::Path`].
    Path,
    /// [`FilterRule::Method`].
    Method,
    /// [`FilterRule::Body`].
    Body,
    /// [`FilterRule::Json`].
    Json,
}

impl RuleKind {
    /// The `graft run` flag that gives such a rule, e.g. `--filter-header`.
    pub fn flag(self) -> &'static str {
        match self {
            RuleKind::Header => "--filter-header",
            RuleKind::Path => "--filter-path",
            RuleKind::Method => "--filter-method",
            RuleKind::Body => "--filter-body",
            RuleKind::Json => "--filter-json",
        }
    }

    /// The key in `[incoming.filter]` of `graft.toml` that gives such a rule,
    /// e.g. `header`.
    pub fn key(self) -> &'static str {
        match self {
            RuleKind::Header => "header",
            RuleKind::Path => "path",
            RuleKind::Method => "method",
            RuleKind::Body => "body",
            RuleKind::Json => "json",
        }
    }
}

impl fmt::Display for RuleKind {
    /// Writes the flag form, e.g. `--filter-header`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.flag())
    }
}

/// Why a filter was refused. Each message names the rule (in the form of its
/// `graft run` flag) and says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// More than [`MAX_RULES`] rules.
    #[error("too many filter rules ({count}); at most {max} are allowed")]
    TooManyRules {
        /// How many rules were given.
        count: usize,
        /// [`MAX_RULES`].
        max: usize,
    },
    /// A pattern longer than [`MAX_PATTERN_LEN`] bytes.
    #[error(
        "{kind} {:?}: the pattern is {len} bytes long; at most {max} are allowed",
        Shortened(pattern)
    )]
    TooLong {
        /// The rule's kind.
        kind: RuleKind,
        /// The pattern given.
        pattern: String,
        /// Its length in bytes.
        len: usize,
        /// [`MAX_PATTERN_LEN`].
        max: usize,
    },
    /// A regular expression that does not parse, or compiles too big.
    #[error("{kind} {:?}: {reason}", Shortened(pattern))]
    Regex {
        /// The rule's kind ([`RuleKind::Header`] or [`RuleKind::Path`]).
        kind: RuleKind,
        /// The expression given.
        pattern: String,
        /// Why it is refused: the `regex` crate's parse error, or the size limit.
        reason: String,
    },
    /// A method that is empty or not an HTTP token (RFC 9110 §5.6.2).
    #[error(
        "{} {method:?}: not an HTTP method; expected a token such as GET or POST",
        RuleKind::Method
    )]
    Method {
        /// The method given.
        method: String,
    },
    /// A body rule whose limit is 0 or over [`MAX_BODY_LIMIT`].
    #[error(
        "the body filter limit is {limit} bytes; it must be from 1 byte to {max} bytes ({} KiB)",
        max / 1024
    )]
    BodyLimit {
        /// The limit asked for, in bytes.
        limit: u32,
        /// [`MAX_BODY_LIMIT`].
        max: u32,
    },
    /// A JSON rule whose pointer or value is malformed.
    #[error("{} {:?}: {reason}", RuleKind::Json, Shortened(rule))]
    Json {
        /// The rule as `POINTER=VALUE`.
        rule: String,
        /// What is wrong and the expected form.
        reason: String,
    },
}

impl FilterError {
    /// The kind of rule at fault; `None` for [`FilterError::TooManyRules`].
    pub fn rule_kind(&self) -> Option<RuleKind> {
        match self {
            FilterError::TooManyRules { .. } | FilterError::BodyLimit { .. } => None,
            FilterError::TooLong { kind, .. } | FilterError::Regex { kind, .. } => Some(*kind),
            FilterError::Method { .. } => Some(RuleKind::Method),
            FilterError::Json { .. } => Some(RuleKind::Json),
        }
    }
}

/// Prints at most the first 60 characters of a pattern, so a 4 KiB expression
/// does not flood the terminal.
struct Shortened<'a>(&'a str);

impl fmt::Debug for Shortened<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 60;
        match self.0.char_indices().nth(SHOWN) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(f, "{:?}…", &self.0[..cut]),
        }
    }
}

/// A compiled [`HttpFilterSpec`]: cheap to clone (the expressions are shared),
/// safe to use from many threads.
#[derive(Debug, Clone)]
pub struct HttpFilter {
    spec: HttpFilterSpec,
    /// The rules by kind, so `matches` tries the cheapest first whatever the
    /// order of the spec (the result does not depend on the order).
    methods: Vec<Method>,
    paths: Vec<Regex>,
    headers: Vec<Regex>,
    /// Body rules, tried last: they need the buffered body.
    bodies: Vec<BodyRule>,
}

impl HttpFilter {
    /// Compiles `spec`.
    ///
    /// # Errors
    ///
    /// - [`FilterError::TooManyRules`]: more than [`MAX_RULES`] rules.
    /// - [`FilterError::TooLong`]: a pattern over [`MAX_PATTERN_LEN`] bytes.
    /// - [`FilterError::Regex`]: a header or path expression that does not parse,
    ///   or whose compiled form exceeds [`REGEX_SIZE_LIMIT`].
    /// - [`FilterError::Method`]: an empty method or one that is not an HTTP
    ///   token.
    /// - [`FilterError::BodyLimit`]: a body rule whose limit is 0 or over
    ///   [`MAX_BODY_LIMIT`].
    /// - [`FilterError::Json`]: a JSON rule whose pointer is not RFC 6901 or
    ///   whose value is not JSON text.
    pub fn compile(spec: &HttpFilterSpec) -> Result<HttpFilter, FilterError> {
        if spec.rules.len() > MAX_RULES {
            return Err(FilterError::TooManyRules {
                count: spec.rules.len(),
                max: MAX_RULES,
            });
        }
        let mut filter = HttpFilter {
            spec: spec.clone(),
            methods: Vec::new(),
            paths: Vec::new(),
            headers: Vec::new(),
            bodies: Vec::new(),
        };
        for rule in &spec.rules {
            let (kind, pattern) = match rule {
                FilterRule::Header(p) => (RuleKind::Header, p),
                FilterRule::Path(p) => (RuleKind::Path, p),
                FilterRule::Method(p) => (RuleKind::Method, p),
                FilterRule::Body { regex, limit } => {
                    filter.bodies.push(BodyRule::regex(regex, *limit)?);
                    continue;
                }
                FilterRule::Json {
                    pointer,
                    value,
                    limit,
                } => {
                    filter.bodies.push(BodyRule::json(pointer, value, *limit)?);
                    continue;
                }
            };
            if pattern.len() > MAX_PATTERN_LEN {
                return Err(FilterError::TooLong {
                    kind,
                    pattern: pattern.clone(),
                    len: pattern.len(),
                    max: MAX_PATTERN_LEN,
                });
            }
            match kind {
                RuleKind::Header => filter.headers.push(compile_regex(kind, pattern, true)?),
                RuleKind::Path => filter.paths.push(compile_regex(kind, pattern, false)?),
                RuleKind::Method => filter.methods.push(parse_method(pattern)?),
                RuleKind::Body | RuleKind::Json => unreachable!("body rules are compiled above"),
            }
        }
        Ok(filter)
    }

    /// The spec this filter was compiled from.
    pub fn spec(&self) -> &HttpFilterSpec {
        &self.spec
    }

    /// Whether some rule looks at the body ([`FilterRule::Body`],
    /// [`FilterRule::Json`]).
    pub fn needs_body(&self) -> bool {
        !self.bodies.is_empty()
    }

    /// The most body bytes any rule of this filter looks at (0 without body
    /// rules): how much the agent buffers for it.
    pub fn body_limit(&self) -> u32 {
        self.bodies.iter().map(BodyRule::limit).max().unwrap_or(0)
    }

    /// Whether a request with this method, target and headers matches, its body
    /// unknown: as [`HttpFilter::matches_request`] with
    /// [`RequestBody::unknown`], so body rules are left out.
    ///
    /// `uri` is the request target as a server sees it: its path and query are
    /// matched by path rules, or `/` when it has none (an HTTP/2 request whose
    /// `:path` is absent, a `CONNECT`). Header rules see each header as one line
    /// `name: value` (name in lower case, as [`http::HeaderName`] keeps it); a
    /// value that is not UTF-8 is matched with U+FFFD in place of the bad bytes.
    /// A filter without rules matches every request.
    ///
    /// Allocates nothing unless a header line is longer than any seen before on
    /// this thread.
    pub fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        self.matches_request(method, uri, headers, &RequestBody::unknown())
    }

    /// Whether the head alone decides: `Some(hit)` when the body rules cannot
    /// change the answer (there are none, an all-of head rule failed, or an
    /// any-of head rule matched), `None` when the body is needed.
    pub fn decide_head(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<bool> {
        if self.bodies.is_empty() {
            return Some(self.matches(method, uri, headers));
        }
        match self.spec.combine {
            Combine::AllOf => (!self.head_all(method, uri, headers)).then_some(false),
            Combine::AnyOf => self.head_any(method, uri, headers).then_some(true),
        }
    }

    /// Whether a request matches, body rules included.
    ///
    /// Head rules as in [`HttpFilter::matches`]. A body rule that cannot see the
    /// body (unknown, not read to its end, or longer than the rule's limit) is
    /// left out, and the request is routed by the other rules: all-of matches
    /// when every rule left matches and at least one is left; any-of when one
    /// rule left matches.
    pub fn matches_request(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &RequestBody<'_>,
    ) -> bool {
        if self.spec.rules.is_empty() {
            return true;
        }
        match self.spec.combine {
            Combine::AllOf => {
                if !self.head_all(method, uri, headers) {
                    return false;
                }
                let mut seen = self.spec.rules.len() - self.bodies.len();
                for rule in &self.bodies {
                    match rule.eval(body) {
                        Some(false) => return false,
                        Some(true) => seen += 1,
                        None => {}
                    }
                }
                seen > 0
            }
            Combine::AnyOf => {
                self.head_any(method, uri, headers)
                    || self.bodies.iter().any(|r| r.eval(body) == Some(true))
            }
        }
    }

    /// Every head rule matches (true without head rules).
    fn head_all(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
        self.methods.iter().all(|m| m == method)
            && self.paths.iter().all(|re| re.is_match(path))
            && self.headers.iter().all(|re| any_header_line(re, headers))
    }

    /// Some head rule matches.
    fn head_any(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
        self.methods.iter().any(|m| m == method)
            || self.paths.iter().any(|re| re.is_match(path))
            || self.headers.iter().any(|re| any_header_line(re, headers))
    }
}

/// The `graft run` filter flags, raw.
#[derive(Debug, Clone, Copy)]
pub struct FilterFlags<'a> {
    /// `--filter-header` expressions.
    pub header: &'a [String],
    /// `--filter-path` expressions.
    pub path: &'a [String],
    /// `--filter-method` methods.
    pub method: &'a [String],
    /// `--filter-body` expressions.
    pub body: &'a [String],
    /// `--filter-json` rules, `POINTER=VALUE` ([`parse_json_rule`]).
    pub json: &'a [String],
    /// The body limit of the body rules, in bytes (`--filter-body-limit` is in
    /// KiB); [`DEFAULT_BODY_LIMIT`] when not given.
    pub body_limit: u32,
}

impl Default for FilterFlags<'_> {
    fn default() -> Self {
        FilterFlags {
            header: &[],
            path: &[],
            method: &[],
            body: &[],
            json: &[],
            body_limit: DEFAULT_BODY_LIMIT,
        }
    }
}

/// Builds the spec of the `graft run` filter flags: every rule given, all-of
/// (headers, paths, methods, bodies, then JSON rules, each in the order given).
///
/// Returns `Ok(None)` when no flag was given.
///
/// # Errors
///
/// As [`HttpFilter::compile`] (the spec is compiled once to check it), and
/// [`FilterError::Json`] for a `--filter-json` without `=`.
pub fn from_flags(flags: &FilterFlags<'_>) -> Result<Option<HttpFilterSpec>, FilterError> {
    let limit = flags.body_limit;
    let mut rules: Vec<FilterRule> = flags
        .header
        .iter()
        .cloned()
        .map(FilterRule::Header)
        .chain(flags.path.iter().cloned().map(FilterRule::Path))
        .chain(flags.method.iter().cloned().map(FilterRule::Method))
        .chain(flags.body.iter().map(|regex| FilterRule::Body {
            regex: regex.clone(),
            limit,
        }))
        .collect();
    for text in flags.json {
        let (pointer, value) = parse_json_rule(text)?;
        rules.push(FilterRule::Json {
            pointer,
            value,
            limit,
        });
    }
    if rules.is_empty() {
        return Ok(None);
    }
    let spec = HttpFilterSpec {
        combine: Combine::AllOf,
        rules,
    };
    HttpFilter::compile(&spec)?;
    Ok(Some(spec))
}

fn compile_regex(
    kind: RuleKind,
    pattern: &str,
    case_insensitive: bool,
) -> Result<Regex, FilterError> {
    RegexBuilder::new(pattern)
        .case_insensitive(case_insensitive)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| regex_error(kind, pattern, e))
}

/// The [`FilterError::Regex`] of a refused expression.
fn regex_error(kind: RuleKind, pattern: &str, e: regex::Error) -> FilterError {
    FilterError::Regex {
        kind,
        pattern: pattern.to_owned(),
        reason: match e {
            regex::Error::CompiledTooBig(limit) => format!(
                "the expression is too big once compiled (over {limit} bytes); \
                 simplify it, e.g. smaller repetition counts"
            ),
            other => other.to_string(),
        },
    }
}

fn parse_method(text: &str) -> Result<Method, FilterError> {
    // `Method::from_bytes` refuses empty input and any byte outside the token set.
    Method::from_bytes(text.as_bytes()).map_err(|_| FilterError::Method {
        method: text.to_owned(),
    })
}

thread_local! {
    /// The `name: value` line being matched; one per thread so matching needs no
    /// lock and, once grown, no allocation.
    static HEADER_LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Whether `re` matches at least one header line `name: value`.
fn any_header_line(re: &Regex, headers: &HeaderMap) -> bool {
    HEADER_LINE.with_borrow_mut(|line| {
        let hit = headers.iter().any(|(name, value)| {
            line.clear();
            line.push_str(name.as_str());
            line.push_str(": ");
            push_lossy(line, value);
            re.is_match(line)
        });
        if line.capacity() > KEEP_LINE_CAPACITY {
            *line = String::new();
        }
        hit
    })
}

/// Appends `value` as text, U+FFFD for each invalid UTF-8 sequence (as
/// `String::from_utf8_lossy`, without its allocation).
fn push_lossy(line: &mut String, value: &HeaderValue) {
    for chunk in value.as_bytes().utf8_chunks() {
        line.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            line.push(char::REPLACEMENT_CHARACTER);
        }
    }
}

#[cfg(test)]
mod tests;
