//! HTTP request filters: an [`HttpFilterSpec`] (text, as it travels in the
//! protocol and sits in `graft.toml`) compiled once into an [`HttpFilter`] that
//! decides, per request, whether a steal or mirror subscription takes it.
//!
//! Specs enter from the CLI flags ([`from_flags`]), from `graft.toml` (through
//! `graft-config`) or from a `Subscribe` frame (in the agent); all three go through
//! [`HttpFilter::compile`], which is where hostile input is refused: at most
//! [`MAX_RULES`] rules, [`MAX_PATTERN_LEN`] bytes per pattern, and
//! [`REGEX_SIZE_LIMIT`] bytes for each compiled expression and its lazy DFA.
//! Matching ([`HttpFilter::matches`]) runs on every request of a filtered
//! connection, so it allocates nothing in the common case.
//!
//! The semantics of each rule are those documented on
//! [`graft_protocol::incoming::FilterRule`]; regular expressions use the syntax
//! of the Rust `regex` crate (<https://docs.rs/regex/latest/regex/#syntax>).

use std::{cell::RefCell, fmt};

use graft_protocol::incoming::{Combine, FilterRule, HttpFilterSpec};
use http::{HeaderMap, HeaderValue, Method, Uri};
use regex::{Regex, RegexBuilder};

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
}

impl RuleKind {
    /// The `graft run` flag that gives such a rule, e.g. `--filter-header`.
    pub fn flag(self) -> &'static str {
        match self {
            RuleKind::Header => "--filter-header",
            RuleKind::Path => "--filter-path",
            RuleKind::Method => "--filter-method",
        }
    }

    /// The key in `[incoming.filter]` of `graft.toml` that gives such a rule,
    /// e.g. `header`.
    pub fn key(self) -> &'static str {
        match self {
            RuleKind::Header => "header",
            RuleKind::Path => "path",
            RuleKind::Method => "method",
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
}

impl FilterError {
    /// The kind of rule at fault; `None` for [`FilterError::TooManyRules`].
    pub fn rule_kind(&self) -> Option<RuleKind> {
        match self {
            FilterError::TooManyRules { .. } => None,
            FilterError::TooLong { kind, .. } | FilterError::Regex { kind, .. } => Some(*kind),
            FilterError::Method { .. } => Some(RuleKind::Method),
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
        };
        for rule in &spec.rules {
            let (kind, pattern) = match rule {
                FilterRule::Header(p) => (RuleKind::Header, p),
                FilterRule::Path(p) => (RuleKind::Path, p),
                FilterRule::Method(p) => (RuleKind::Method, p),
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
            }
        }
        Ok(filter)
    }

    /// The spec this filter was compiled from.
    pub fn spec(&self) -> &HttpFilterSpec {
        &self.spec
    }

    /// Whether a request with this method, target and headers matches.
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
        if self.spec.rules.is_empty() {
            return true;
        }
        let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let method_hit = |m: &Method| m == method;
        let path_hit = |re: &Regex| re.is_match(path);
        match self.spec.combine {
            Combine::AllOf => {
                self.methods.iter().all(method_hit)
                    && self.paths.iter().all(path_hit)
                    && self.headers.iter().all(|re| any_header_line(re, headers))
            }
            Combine::AnyOf => {
                self.methods.iter().any(method_hit)
                    || self.paths.iter().any(path_hit)
                    || self.headers.iter().any(|re| any_header_line(re, headers))
            }
        }
    }
}

/// Builds the spec of the `graft run` filter flags: every rule given, all-of
/// (headers, then paths, then methods, each in the order given).
///
/// Returns `Ok(None)` when no flag was given.
///
/// # Errors
///
/// As [`HttpFilter::compile`]: the spec is compiled once to check it.
pub fn from_flags(
    header: &[String],
    path: &[String],
    method: &[String],
) -> Result<Option<HttpFilterSpec>, FilterError> {
    let rules: Vec<FilterRule> = header
        .iter()
        .cloned()
        .map(FilterRule::Header)
        .chain(path.iter().cloned().map(FilterRule::Path))
        .chain(method.iter().cloned().map(FilterRule::Method))
        .collect();
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
        .map_err(|e| FilterError::Regex {
            kind,
            pattern: pattern.to_owned(),
            reason: match e {
                regex::Error::CompiledTooBig(limit) => format!(
                    "the expression is too big once compiled (over {limit} bytes); \
                     simplify it, e.g. smaller repetition counts"
                ),
                other => other.to_string(),
            },
        })
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
mod tests {
    use super::*;
    use http::HeaderName;

    fn spec(combine: Combine, rules: Vec<FilterRule>) -> HttpFilterSpec {
        HttpFilterSpec { combine, rules }
    }

    fn all(rules: Vec<FilterRule>) -> HttpFilter {
        HttpFilter::compile(&spec(Combine::AllOf, rules)).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    fn get(uri: &str, h: &HeaderMap, f: &HttpFilter) -> bool {
        f.matches(&Method::GET, &uri.parse().unwrap(), h)
    }

    #[test]
    fn header_name_is_matched_case_insensitively() {
        let f = all(vec![FilterRule::Header("^X-User: alice$".into())]);
        assert!(get("/", &headers(&[("x-user", "alice")]), &f));
        assert!(get("/", &headers(&[("X-USER", "ALICE")]), &f));
        assert!(!get("/", &headers(&[("x-other", "alice")]), &f));
    }

    #[test]
    fn header_value_regex_searches_every_line() {
        let f = all(vec![FilterRule::Header(r"^x-tenant: (a|b)\d+$".into())]);
        let h = headers(&[("host", "api"), ("x-tenant", "b42"), ("accept", "*/*")]);
        assert!(get("/", &h, &f));
        assert!(!get("/", &headers(&[("x-tenant", "c42")]), &f));
        assert!(!get("/", &HeaderMap::new(), &f));
    }

    #[test]
    fn case_sensitivity_can_be_turned_back_on() {
        let f = all(vec![FilterRule::Header("x-user: (?-i)Alice".into())]);
        assert!(get("/", &headers(&[("x-user", "Alice")]), &f));
        assert!(!get("/", &headers(&[("x-user", "alice")]), &f));
    }

    #[test]
    fn non_utf8_header_values_match_lossily() {
        let f = all(vec![FilterRule::Header("^x-bin: a\u{FFFD}b$".into())]);
        let mut h = HeaderMap::new();
        h.insert("x-bin", HeaderValue::from_bytes(b"a\xffb").unwrap());
        assert!(get("/", &h, &f));
    }

    #[test]
    fn path_rule_sees_the_query() {
        let f = all(vec![FilterRule::Path(r"^/api/users\?id=7$".into())]);
        let h = HeaderMap::new();
        assert!(get("/api/users?id=7", &h, &f));
        assert!(get("http://example.com/api/users?id=7", &h, &f));
        assert!(!get("/api/users", &h, &f));
        // Path rules are case-sensitive (only header rules are not).
        assert!(!get("/API/users?id=7", &h, &f));
    }

    #[test]
    fn missing_path_is_slash() {
        let f = all(vec![FilterRule::Path("^/$".into())]);
        assert!(get("example.com:443", &HeaderMap::new(), &f));
    }

    #[test]
    fn method_is_exact() {
        let f = all(vec![FilterRule::Method("POST".into())]);
        let (uri, h) = ("/".parse().unwrap(), HeaderMap::new());
        assert!(f.matches(&Method::POST, &uri, &h));
        assert!(!f.matches(&Method::GET, &uri, &h));
        let lower = all(vec![FilterRule::Method("post".into())]);
        assert!(!lower.matches(&Method::POST, &uri, &h));
        let custom = all(vec![FilterRule::Method("PURGE".into())]);
        assert!(custom.matches(&Method::from_bytes(b"PURGE").unwrap(), &uri, &h));
    }

    #[test]
    fn all_of_needs_every_rule_any_of_one() {
        let rules = vec![
            FilterRule::Method("GET".into()),
            FilterRule::Path("^/a".into()),
            FilterRule::Header("^x-user: alice$".into()),
        ];
        let all_of = HttpFilter::compile(&spec(Combine::AllOf, rules.clone())).unwrap();
        let any_of = HttpFilter::compile(&spec(Combine::AnyOf, rules)).unwrap();
        let alice = headers(&[("x-user", "alice")]);
        let bob = headers(&[("x-user", "bob")]);
        assert!(get("/a", &alice, &all_of));
        assert!(!get("/a", &bob, &all_of));
        assert!(!get("/b", &alice, &all_of));
        assert!(get("/b", &alice, &any_of));
        assert!(get("/a", &bob, &any_of));
        let (uri, h) = ("/b".parse().unwrap(), bob);
        assert!(!any_of.matches(&Method::PUT, &uri, &h));
        assert!(any_of.matches(&Method::GET, &uri, &h));
    }

    #[test]
    fn empty_filter_matches_everything() {
        for combine in [Combine::AllOf, Combine::AnyOf] {
            let f = HttpFilter::compile(&spec(combine, vec![])).unwrap();
            assert!(f.matches(&Method::DELETE, &"/x?y".parse().unwrap(), &HeaderMap::new()));
        }
    }

    #[test]
    fn bad_regex_names_the_flag_and_the_problem() {
        let err = HttpFilter::compile(&spec(Combine::AllOf, vec![FilterRule::Header("(".into())]))
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(r#"--filter-header "(": regex parse error"#),
            "{text}"
        );
        assert!(text.contains("unclosed group"), "{text}");
        assert_eq!(err.rule_kind(), Some(RuleKind::Header));
        let err = HttpFilter::compile(&spec(Combine::AllOf, vec![FilterRule::Path("[".into())]))
            .unwrap_err();
        assert!(err.to_string().starts_with(r#"--filter-path "[""#), "{err}");
    }

    #[test]
    fn too_large_regex_is_refused() {
        let err = HttpFilter::compile(&spec(
            Combine::AllOf,
            vec![FilterRule::Path(r"\w{1000}{1000}".into())],
        ))
        .unwrap_err();
        assert!(matches!(err, FilterError::Regex { .. }), "{err:?}");
        assert!(err.to_string().contains("too big once compiled"), "{err}");
    }

    #[test]
    fn limits_on_rule_count_and_pattern_length() {
        let many = vec![FilterRule::Method("GET".into()); MAX_RULES + 1];
        assert!(matches!(
            HttpFilter::compile(&spec(Combine::AnyOf, many)),
            Err(FilterError::TooManyRules { count: 65, max: 64 })
        ));
        let long = "a".repeat(MAX_PATTERN_LEN + 1);
        let err =
            HttpFilter::compile(&spec(Combine::AllOf, vec![FilterRule::Path(long)])).unwrap_err();
        assert!(
            matches!(err, FilterError::TooLong { len: 4097, .. }),
            "{err:?}"
        );
        // The message shows only the start of the pattern.
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn bad_methods_are_refused() {
        for bad in ["", "GE T", "GET\n", "(GET)"] {
            let err =
                HttpFilter::compile(&spec(Combine::AllOf, vec![FilterRule::Method(bad.into())]))
                    .unwrap_err();
            assert!(err.to_string().starts_with("--filter-method"), "{err}");
        }
    }

    #[test]
    fn flags_combine_all_of_and_none_is_no_filter() {
        assert_eq!(from_flags(&[], &[], &[]).unwrap(), None);
        let spec = from_flags(&["x-a: 1".into()], &["^/p".into()], &["GET".into()])
            .unwrap()
            .unwrap();
        assert_eq!(spec.combine, Combine::AllOf);
        assert_eq!(
            spec.rules,
            vec![
                FilterRule::Header("x-a: 1".into()),
                FilterRule::Path("^/p".into()),
                FilterRule::Method("GET".into()),
            ]
        );
        assert!(from_flags(&[], &["(".into()], &[]).is_err());
        let f = HttpFilter::compile(&spec).unwrap();
        assert_eq!(f.spec(), &spec);
    }

    #[test]
    fn long_header_lines_do_not_pin_the_buffer() {
        let f = all(vec![FilterRule::Header("^x-big: a+$".into())]);
        let big = "a".repeat(KEEP_LINE_CAPACITY * 2);
        assert!(get("/", &headers(&[("x-big", &big)]), &f));
        HEADER_LINE.with_borrow(|line| assert!(line.capacity() <= KEEP_LINE_CAPACITY));
    }
}
