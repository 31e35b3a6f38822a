//! `[incoming.filter]` of `graft.toml`: the file form of an HTTP filter, turned
//! into the [`HttpFilterSpec`] that the flags (`--filter-header`, `--filter-path`,
//! `--filter-method`, `--filter-body`, `--filter-json`, `--filter-body-limit`)
//! would give, and checked by compiling it with
//! [`graft_filter::HttpFilter::compile`].
//!
//! Three shapes, exactly one per file (`body_limit_kib` goes with any):
//!
//! ```toml
//! [incoming.filter]              # flat keys: every one given must match
//! header = "^x-user: alice$"
//! method = "POST"
//! json = "/order/priority=high"  # JSON pointer = value in the body
//! body_limit_kib = 64            # bodies are looked at up to 64 KiB
//!
//! [incoming.filter]              # the same, as a list
//! all_of = [{ header = "^x-user: alice$" }, { path = "^/api/" }]
//!
//! [incoming.filter]              # at least one must match
//! any_of = [{ path = "^/admin/" }, { method = "DELETE" }, { body = "debug" }]
//! ```

use graft_filter::{DEFAULT_BODY_LIMIT, FilterError, HttpFilter, parse_json_rule};
use graft_protocol::incoming::{Combine, FilterRule, HttpFilterSpec};
use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// `[incoming.filter]` of `graft.toml`: either the flat keys `header`, `path`,
/// `method` (all-of), or `all_of`, or `any_of` — exactly one of the three shapes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterFile {
    /// A header rule: a regex searched in each `name: value` line.
    pub header: Option<String>,
    /// A path rule: a regex searched in the path and query.
    pub path: Option<String>,
    /// A method rule: the exact method.
    pub method: Option<String>,
    /// A body rule: a regex searched in the request body (when it is at most
    /// `body_limit_kib` long).
    pub body: Option<String>,
    /// A JSON rule: `POINTER=VALUE`, a JSON pointer (RFC 6901) into the body
    /// and the value it must hold (JSON, else a string), e.g. `/user/id=42`.
    pub json: Option<String>,
    /// How much of a request body the body and JSON rules look at, in KiB
    /// (default 64, at most 1024); a longer body is routed by the other rules
    /// (`--filter-body-limit`).
    pub body_limit_kib: Option<u32>,
    /// Rules that must all match.
    pub all_of: Option<Vec<FilterRuleFile>>,
    /// Rules of which at least one must match.
    pub any_of: Option<Vec<FilterRuleFile>>,
}

/// One entry of `all_of`/`any_of`: a table with exactly one of `header`, `path`,
/// `method`, `body`, `json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterRuleFile {
    /// A header rule.
    pub header: Option<String>,
    /// A path rule.
    pub path: Option<String>,
    /// A method rule.
    pub method: Option<String>,
    /// A body rule.
    pub body: Option<String>,
    /// A JSON rule, `POINTER=VALUE`.
    pub json: Option<String>,
}

/// The `what` of [`ConfigError::Invalid`] for a malformed `[incoming.filter]`.
const WHAT: &str = "incoming filter in graft.toml";

impl FilterFile {
    /// The filter this table describes, compiled once to check it.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] when the table mixes shapes, is empty, or has an
    /// `all_of`/`any_of` entry without exactly one key; [`ConfigError::Filter`]
    /// (with `in_file` set) when a rule does not compile.
    pub fn to_spec(&self) -> Result<HttpFilterSpec, ConfigError> {
        self.to_spec_limited(None)
    }

    /// [`FilterFile::to_spec`] with `limit` (bytes; `--filter-body-limit`)
    /// over `body_limit_kib`.
    ///
    /// # Errors
    ///
    /// As [`FilterFile::to_spec`].
    pub fn to_spec_limited(&self, limit: Option<u32>) -> Result<HttpFilterSpec, ConfigError> {
        let limit = match (limit, self.body_limit_kib) {
            (Some(bytes), _) => bytes,
            (None, Some(kib)) => kib_to_bytes(kib),
            (None, None) => DEFAULT_BODY_LIMIT,
        };
        let flat = flat_rules(
            &Rules {
                header: self.header.as_ref(),
                path: self.path.as_ref(),
                method: self.method.as_ref(),
                body: self.body.as_ref(),
                json: self.json.as_ref(),
            },
            limit,
        )?;
        let shapes = [
            !flat.is_empty(),
            self.all_of.is_some(),
            self.any_of.is_some(),
        ];
        let spec = match shapes {
            [true, false, false] => HttpFilterSpec {
                combine: Combine::AllOf,
                rules: flat,
            },
            [false, true, false] => {
                list_spec(Combine::AllOf, "all_of", self.all_of.as_deref(), limit)?
            }
            [false, false, true] => {
                list_spec(Combine::AnyOf, "any_of", self.any_of.as_deref(), limit)?
            }
            [false, false, false] => {
                return Err(invalid(
                    "[incoming.filter]",
                    "the table is empty: give `header`, `path`, `method`, `body` or `json`, \
                     or a list `all_of = [...]` or `any_of = [...]`",
                ));
            }
            _ => {
                return Err(invalid(
                    "[incoming.filter]",
                    "use exactly one shape: flat `header`/`path`/`method`/`body`/`json` keys \
                     (all must match), `all_of = [...]`, or `any_of = [...]`; they cannot be \
                     mixed",
                ));
            }
        };
        HttpFilter::compile(&spec).map_err(|source| ConfigError::Filter {
            source,
            in_file: true,
        })?;
        Ok(spec)
    }
}

/// KiB to bytes, saturating (the filter refuses anything over its maximum).
pub(crate) fn kib_to_bytes(kib: u32) -> u32 {
    kib.saturating_mul(1024)
}

/// The rule keys of one table.
struct Rules<'a> {
    header: Option<&'a String>,
    path: Option<&'a String>,
    method: Option<&'a String>,
    body: Option<&'a String>,
    json: Option<&'a String>,
}

fn flat_rules(rules: &Rules<'_>, limit: u32) -> Result<Vec<FilterRule>, ConfigError> {
    let mut out: Vec<FilterRule> = rules
        .header
        .cloned()
        .map(FilterRule::Header)
        .into_iter()
        .chain(rules.path.cloned().map(FilterRule::Path))
        .chain(rules.method.cloned().map(FilterRule::Method))
        .chain(
            rules
                .body
                .cloned()
                .map(|regex| FilterRule::Body { regex, limit }),
        )
        .collect();
    if let Some(text) = rules.json {
        let (pointer, value) = parse_json_rule(text).map_err(|source| ConfigError::Filter {
            source,
            in_file: true,
        })?;
        out.push(FilterRule::Json {
            pointer,
            value,
            limit,
        });
    }
    Ok(out)
}

fn list_spec(
    combine: Combine,
    key: &str,
    entries: Option<&[FilterRuleFile]>,
    limit: u32,
) -> Result<HttpFilterSpec, ConfigError> {
    let rules = entries
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let mut rules = flat_rules(
                &Rules {
                    header: entry.header.as_ref(),
                    path: entry.path.as_ref(),
                    method: entry.method.as_ref(),
                    body: entry.body.as_ref(),
                    json: entry.json.as_ref(),
                },
                limit,
            )?;
            match rules.len() {
                1 => Ok(rules.remove(0)),
                n => Err(invalid(
                    &format!("[incoming.filter] {key}[{i}]"),
                    &format!(
                        "each entry is a table with exactly one of `header`, `path`, \
                         `method`, `body`, `json`; this one has {n}"
                    ),
                )),
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(HttpFilterSpec { combine, rules })
}

fn invalid(value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        what: WHAT,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

/// The rule part of [`ConfigError::Filter`]'s message: the filter crate's own
/// (which names the flag, `--filter-header "(": ...`) for flags, or the same
/// with the `graft.toml` key (`header = "(": ...`) so the user looks in the right
/// place.
pub(crate) fn filter_message(source: &FilterError, in_file: bool) -> String {
    let text = source.to_string();
    match source.rule_kind() {
        Some(kind) if in_file => match text.strip_prefix(kind.flag()) {
            Some(rest) => format!("{} ={rest}", kind.key()),
            None => text,
        },
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> FilterFile {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn flat_keys_are_all_of() {
        let spec = parse(
            r#"
            header = "^x-user: alice$"
            method = "GET"
            "#,
        )
        .to_spec()
        .unwrap();
        assert_eq!(
            spec,
            HttpFilterSpec {
                combine: Combine::AllOf,
                rules: vec![
                    FilterRule::Header("^x-user: alice$".into()),
                    FilterRule::Method("GET".into()),
                ],
            }
        );
    }

    #[test]
    fn lists_keep_their_combination_and_order() {
        let all = parse(r#"all_of = [{ path = "^/a" }, { header = "x-b: 1" }]"#)
            .to_spec()
            .unwrap();
        assert_eq!(all.combine, Combine::AllOf);
        assert_eq!(
            all.rules,
            vec![
                FilterRule::Path("^/a".into()),
                FilterRule::Header("x-b: 1".into())
            ]
        );
        let any = parse(r#"any_of = [{ method = "DELETE" }, { path = "^/admin/" }]"#)
            .to_spec()
            .unwrap();
        assert_eq!(any.combine, Combine::AnyOf);
        assert_eq!(any.rules.len(), 2);
    }

    #[test]
    fn mixing_shapes_is_refused() {
        for text in [
            r#"header = "a"
               any_of = [{ path = "b" }]"#,
            r#"all_of = [{ path = "a" }]
               any_of = [{ path = "b" }]"#,
        ] {
            let err = parse(text).to_spec().unwrap_err().to_string();
            assert!(err.contains("cannot be mixed"), "{err}");
        }
    }

    #[test]
    fn empty_table_is_refused() {
        let err = FilterFile::default().to_spec().unwrap_err().to_string();
        assert!(err.contains("the table is empty"), "{err}");
    }

    #[test]
    fn list_entries_need_exactly_one_key() {
        let err = parse(r#"any_of = [{ path = "a" }, { path = "b", method = "GET" }]"#)
            .to_spec()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("any_of[1]") && err.contains("exactly one"),
            "{err}"
        );
        let err = parse("all_of = [{}]").to_spec().unwrap_err().to_string();
        assert!(err.contains("all_of[0]"), "{err}");
        assert!(toml::from_str::<FilterFile>(r#"all_of = [{ query = "a" }]"#).is_err());
        assert!(toml::from_str::<FilterFile>(r#"cookie = "a""#).is_err());
    }

    #[test]
    fn bad_rule_names_the_file_key() {
        let err = parse(r#"all_of = [{ header = "(" }]"#)
            .to_spec()
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                r#"invalid incoming filter in graft.toml: header = "(": regex parse error"#
            ),
            "{err}"
        );
        let err = parse(r#"method = "G T""#)
            .to_spec()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(r#"method = "G T": not an HTTP method"#),
            "{err}"
        );
    }

    #[test]
    fn body_and_json_keys_carry_the_limit() {
        let spec = parse(
            r#"
            json = "/user/id=42"
            body = "needle"
            body_limit_kib = 2
            "#,
        )
        .to_spec()
        .unwrap();
        assert_eq!(
            spec.rules,
            vec![
                FilterRule::Body {
                    regex: "needle".into(),
                    limit: 2048
                },
                FilterRule::Json {
                    pointer: "/user/id".into(),
                    value: "42".into(),
                    limit: 2048
                },
            ]
        );
        let any = parse(r#"any_of = [{ json = "/a=x" }, { body = "b" }]"#)
            .to_spec_limited(Some(10))
            .unwrap();
        assert_eq!(
            any.rules[0],
            FilterRule::Json {
                pointer: "/a".into(),
                value: "\"x\"".into(),
                limit: 10
            }
        );
        let err = parse("body = \"a\"\nbody_limit_kib = 4096")
            .to_spec()
            .unwrap_err()
            .to_string();
        assert!(err.contains("body filter limit"), "{err}");
        let err = parse("json = \"/a\"").to_spec().unwrap_err().to_string();
        assert!(
            err.contains("json = \"/a\": expected POINTER=VALUE"),
            "{err}"
        );
    }
}
