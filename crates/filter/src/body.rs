//! Body rules (`--filter-body`, `--filter-json`): what a request body is to a
//! filter ([`RequestBody`]), and the compiled form of
//! [`FilterRule::Body`](graft_protocol::incoming::FilterRule::Body) and
//! [`FilterRule::Json`](graft_protocol::incoming::FilterRule::Json).
//!
//! The agent buffers at most the largest `limit` of a port's body rules (never
//! more than [`MAX_BODY_LIMIT`]) and hands the bytes here. A rule sees a body
//! only when it is complete and no longer than the rule's own limit; otherwise
//! the rule is left out ([`BodyRule::eval`] answers `None`) and the request is
//! routed by the filter's other rules.
//!
//! Hostile bodies: the regular expressions run on `regex::bytes` (linear time,
//! any bytes, invalid UTF-8 included); a JSON body is parsed at most once per
//! request with `serde_json`, whose recursion limit (128 nested arrays or
//! objects) refuses deeper documents with an error instead of overflowing the
//! stack — such a body does not match. Invalid UTF-8 inside a JSON string is a
//! parse error too (RFC 8259 §8.1 requires UTF-8).

use std::cell::OnceCell;

use regex::bytes::{Regex, RegexBuilder};
use serde_json::Value;

use crate::{FilterError, MAX_PATTERN_LEN, REGEX_SIZE_LIMIT, RuleKind, Shortened};

/// The body limit when none is configured: 64 KiB, in bytes.
pub const DEFAULT_BODY_LIMIT: u32 = 64 * 1024;

/// The largest body limit a rule may ask for: 1 MiB, in bytes. A `Subscribe`
/// frame asking for more is refused, so no session can make the agent buffer
/// gigabytes per request.
pub const MAX_BODY_LIMIT: u32 = 1 << 20;

/// A request body as the agent saw it: the first bytes, and whether they are
/// the whole body.
///
/// Not `Sync`: it caches the parsed JSON for the rules of one request.
#[derive(Debug)]
pub struct RequestBody<'a> {
    bytes: &'a [u8],
    complete: bool,
    json: OnceCell<Option<Value>>,
}

impl<'a> RequestBody<'a> {
    /// The whole body.
    pub fn complete(bytes: &'a [u8]) -> RequestBody<'a> {
        RequestBody {
            bytes,
            complete: true,
            json: OnceCell::new(),
        }
    }

    /// A body that was not read, or not to its end (over the limit, or too
    /// slow): body rules are left out.
    pub fn unknown() -> RequestBody<'static> {
        RequestBody {
            bytes: &[],
            complete: false,
            json: OnceCell::new(),
        }
    }

    /// The bytes a rule with `limit` may see: the whole body when it is known and
    /// at most `limit` bytes long.
    fn within(&self, limit: u32) -> Option<&'a [u8]> {
        (self.complete && self.bytes.len() <= limit as usize).then_some(self.bytes)
    }

    /// The body parsed as JSON, once; `None` when it is not JSON (or nests
    /// deeper than `serde_json`'s recursion limit).
    fn json(&self) -> Option<&Value> {
        self.json
            .get_or_init(|| serde_json::from_slice(self.bytes).ok())
            .as_ref()
    }
}

/// A compiled body rule.
#[derive(Debug, Clone)]
pub(crate) enum BodyRule {
    /// `--filter-body`.
    Regex { re: Regex, limit: u32 },
    /// `--filter-json`.
    Json {
        pointer: String,
        value: Value,
        limit: u32,
    },
}

impl BodyRule {
    /// The rule's limit, in bytes.
    pub(crate) fn limit(&self) -> u32 {
        match self {
            BodyRule::Regex { limit, .. } | BodyRule::Json { limit, .. } => *limit,
        }
    }

    /// Whether `body` matches; `None` when the rule cannot see it.
    pub(crate) fn eval(&self, body: &RequestBody<'_>) -> Option<bool> {
        let bytes = body.within(self.limit())?;
        Some(match self {
            BodyRule::Regex { re, .. } => re.is_match(bytes),
            BodyRule::Json { pointer, value, .. } => body
                .json()
                .and_then(|doc| doc.pointer(pointer))
                .is_some_and(|found| found == value),
        })
    }

    /// Compiles a [`FilterRule::Body`](graft_protocol::incoming::FilterRule::Body).
    pub(crate) fn regex(pattern: &str, limit: u32) -> Result<BodyRule, FilterError> {
        check_limit(RuleKind::Body, pattern, limit)?;
        let re = RegexBuilder::new(pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| crate::regex_error(RuleKind::Body, pattern, e))?;
        Ok(BodyRule::Regex { re, limit })
    }

    /// Compiles a [`FilterRule::Json`](graft_protocol::incoming::FilterRule::Json).
    pub(crate) fn json(pointer: &str, value: &str, limit: u32) -> Result<BodyRule, FilterError> {
        let shown = format!("{pointer}={value}");
        check_limit(RuleKind::Json, &shown, limit)?;
        if value.len() > MAX_PATTERN_LEN {
            return Err(FilterError::TooLong {
                kind: RuleKind::Json,
                len: value.len(),
                pattern: shown,
                max: MAX_PATTERN_LEN,
            });
        }
        check_pointer(pointer).map_err(|reason| FilterError::Json {
            rule: shown.clone(),
            reason,
        })?;
        let value = serde_json::from_str(value).map_err(|e| FilterError::Json {
            rule: shown.clone(),
            reason: format!("the value is not JSON text: {e}"),
        })?;
        Ok(BodyRule::Json {
            pointer: pointer.to_owned(),
            value,
            limit,
        })
    }
}

fn check_limit(kind: RuleKind, pattern: &str, limit: u32) -> Result<(), FilterError> {
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(FilterError::TooLong {
            kind,
            pattern: pattern.to_owned(),
            len: pattern.len(),
            max: MAX_PATTERN_LEN,
        });
    }
    if limit == 0 || limit > MAX_BODY_LIMIT {
        return Err(FilterError::BodyLimit {
            limit,
            max: MAX_BODY_LIMIT,
        });
    }
    Ok(())
}

/// Checks an RFC 6901 JSON pointer: empty, or `/`-separated reference tokens
/// in which `~` is only ever followed by `0` or `1` (§3).
fn check_pointer(pointer: &str) -> Result<(), String> {
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err(format!(
            "the JSON pointer {:?} must be empty or start with `/` (RFC 6901), e.g. /user/id",
            Shortened(pointer)
        ));
    }
    let mut chars = pointer.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(format!(
                "the JSON pointer {:?} has a `~` not followed by 0 or 1; write `~0` for `~` and \
                 `~1` for `/` (RFC 6901 §3)",
                Shortened(pointer)
            ));
        }
    }
    Ok(())
}

/// Splits the `--filter-json PATH=VALUE` form at its first `=` and turns VALUE
/// into JSON text: VALUE as it is when it parses as JSON (`42`, `true`,
/// `"42"`, `{"a":1}`), else VALUE as a JSON string (`alice` → `"alice"`).
///
/// # Errors
///
/// [`FilterError::Json`] when there is no `=`.
pub fn parse_json_rule(text: &str) -> Result<(String, String), FilterError> {
    let Some((pointer, value)) = text.split_once('=') else {
        return Err(FilterError::Json {
            rule: text.to_owned(),
            reason: "expected POINTER=VALUE, e.g. /user/id=42 or /user/name=alice".into(),
        });
    };
    let value = match serde_json::from_str::<Value>(value) {
        Ok(_) => value.to_owned(),
        Err(_) => Value::String(value.to_owned()).to_string(),
    };
    Ok((pointer.to_owned(), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_flag_values_default_to_strings() {
        assert_eq!(
            parse_json_rule("/user/name=alice").unwrap(),
            ("/user/name".into(), "\"alice\"".into())
        );
        assert_eq!(
            parse_json_rule("/id=42").unwrap(),
            ("/id".into(), "42".into())
        );
        assert_eq!(
            parse_json_rule("/id=\"42\"").unwrap(),
            ("/id".into(), "\"42\"".into())
        );
        // The first `=` splits: values may hold more.
        assert_eq!(
            parse_json_rule("/token=abc==").unwrap(),
            ("/token".into(), "\"abc==\"".into())
        );
        assert!(parse_json_rule("/user").is_err());
    }

    #[test]
    fn pointers_are_checked() {
        assert!(check_pointer("").is_ok());
        assert!(check_pointer("/a~1b/~0c/0").is_ok());
        assert!(check_pointer("a/b").unwrap_err().contains("start with `/`"));
        assert!(check_pointer("/a~2").unwrap_err().contains("~0"));
        assert!(check_pointer("/a~").is_err());
    }

    #[test]
    fn rules_see_only_complete_bodies_within_their_limit() {
        let rule = BodyRule::regex("alice", 8).unwrap();
        assert_eq!(rule.eval(&RequestBody::complete(b"alice")), Some(true));
        assert_eq!(rule.eval(&RequestBody::complete(b"bob")), Some(false));
        assert_eq!(rule.eval(&RequestBody::complete(b"alice and more")), None);
        assert_eq!(rule.eval(&RequestBody::unknown()), None);
    }

    #[test]
    fn json_rules_compare_values() {
        let body = br#"{"user":{"id":42,"name":"alice","tags":["a","b"]},"a/b":true}"#;
        let body = RequestBody::complete(body);
        let eval = |p: &str, v: &str| BodyRule::json(p, v, 1024).unwrap().eval(&body);
        assert_eq!(eval("/user/id", "42"), Some(true));
        assert_eq!(eval("/user/id", "\"42\""), Some(false));
        assert_eq!(eval("/user/name", "\"alice\""), Some(true));
        assert_eq!(eval("/user/tags/1", "\"b\""), Some(true));
        assert_eq!(eval("/user/tags", r#"["a","b"]"#), Some(true));
        assert_eq!(eval("/a~1b", "true"), Some(true));
        assert_eq!(eval("/missing", "null"), Some(false));
        let not_json = RequestBody::complete(b"user=alice");
        let rule = BodyRule::json("/user", "\"alice\"", 1024).unwrap();
        assert_eq!(rule.eval(&not_json), Some(false));
    }

    #[test]
    fn hostile_bodies_do_not_match_and_do_not_crash() {
        let rule = BodyRule::json("/a", "1", MAX_BODY_LIMIT).unwrap();
        // Nesting far past serde_json's recursion limit: refused, no overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(
            rule.eval(&RequestBody::complete(deep.as_bytes())),
            Some(false)
        );
        let deep = "[".repeat(500_000);
        assert_eq!(
            rule.eval(&RequestBody::complete(deep.as_bytes())),
            Some(false)
        );
        // Invalid UTF-8 inside a JSON string is not JSON.
        assert_eq!(
            rule.eval(&RequestBody::complete(b"{\"a\":\"\xff\"}")),
            Some(false)
        );
        // Byte regexes match past invalid UTF-8.
        let re = BodyRule::regex("(?-u)a\\xffb", 16).unwrap();
        assert_eq!(re.eval(&RequestBody::complete(b"xa\xffbx")), Some(true));
    }

    #[test]
    fn limits_and_values_are_checked_at_compile() {
        assert!(matches!(
            BodyRule::regex("a", MAX_BODY_LIMIT + 1),
            Err(FilterError::BodyLimit { .. })
        ));
        assert!(matches!(
            BodyRule::regex("a", 0),
            Err(FilterError::BodyLimit { .. })
        ));
        let err = BodyRule::json("/a", "alice", 10).unwrap_err();
        assert!(err.to_string().contains("not JSON text"), "{err}");
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(BodyRule::json("/a", &deep, 10).is_err());
    }
}
