//! Replaying a HAR file: [`load`] reads the entries of any HAR 1.2 file (graft's
//! or another tool's) into [`Recorded`] requests and responses, with an error
//! naming the entry for anything missing or too large, and [`compare`] tells a
//! new response apart from the recorded one under [`Ignore`] rules.

use base64::Engine;
use serde::Serialize;
use serde_json::Value;

use crate::har::REDACTED;

/// The largest body (decoded) a replayed entry may carry, in bytes.
pub const MAX_REPLAY_BODY: usize = 16 * 1024 * 1024;

/// Why a HAR file cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is not JSON, or has no `log.entries` array.
    #[error("not a HAR file: {0}")]
    NotHar(String),
    /// One entry lacks something replay needs, or carries too much.
    #[error("entry {index} ({what}): {reason}")]
    Entry {
        /// The entry's number, from 1.
        index: usize,
        /// Its method and URL, as far as they are known.
        what: String,
        /// What is wrong and what to do.
        reason: String,
    },
}

/// One recorded request and its recorded response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The entry's number in the file, from 1.
    pub index: usize,
    /// The request's method.
    pub method: String,
    /// The request's path and query (from its URL).
    pub path: String,
    /// Headers to send again: without those graft redacted, and without the
    /// framing fields (`Content-Length`, `Transfer-Encoding`, `Connection`), which
    /// the sender sets for the body it sends.
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Vec<u8>,
    /// The recorded status.
    pub status: u16,
    /// The recorded response's headers (redacted ones left out).
    pub response_headers: Vec<(String, String)>,
    /// The recorded response body (as much as was recorded).
    pub response_body: Vec<u8>,
    /// Only the first bytes of the response body were recorded.
    pub response_cut: bool,
}

/// Fields a sender sets itself.
const FRAMING: [&str; 4] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
];

/// Reads the entries of a HAR document.
///
/// # Errors
///
/// [`LoadError::NotHar`] when `text` is not JSON with a `log.entries` array;
/// [`LoadError::Entry`] naming the first entry without a method, a URL or a
/// status, with a body that is bad base64 or over [`MAX_REPLAY_BODY`], or whose
/// request body was cut when it was recorded.
pub fn load(text: &str) -> Result<Vec<Recorded>, LoadError> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| LoadError::NotHar(format!("not JSON: {e}")))?;
    let entries = doc
        .pointer("/log/entries")
        .and_then(Value::as_array)
        .ok_or_else(|| LoadError::NotHar("it has no log.entries array".into()))?;
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| entry_of(i + 1, entry))
        .collect()
}

fn entry_of(index: usize, entry: &Value) -> Result<Recorded, LoadError> {
    let method = entry.pointer("/request/method").and_then(Value::as_str);
    let url = entry.pointer("/request/url").and_then(Value::as_str);
    let what = format!("{} {}", method.unwrap_or("?"), url.unwrap_or("?"));
    let fail = |reason: String| LoadError::Entry {
        index,
        what: what.clone(),
        reason,
    };
    let method = method.ok_or_else(|| fail("request.method is missing".into()))?;
    if http_method_ok(method).is_err() {
        return Err(fail(format!(
            "request.method {method:?} is not an HTTP method"
        )));
    }
    let url = url.ok_or_else(|| fail("request.url is missing".into()))?;
    let path = path_of(url).ok_or_else(|| fail(format!("request.url {url:?} is not a URL")))?;
    let status = entry
        .pointer("/response/status")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .ok_or_else(|| fail("response.status is missing or not a number".into()))?;
    if status == 0 {
        return Err(fail(
            "it has no response (status 0): nothing to compare with; remove the entry".into(),
        ));
    }
    let post = entry.pointer("/request/postData");
    if let Some(comment) = post.and_then(|p| p["comment"].as_str())
        && comment.contains("kept the first")
    {
        return Err(fail(format!(
            "its request body was cut when it was recorded ({comment}); it cannot be sent again"
        )));
    }
    let body = match post {
        Some(post) => decode(
            post["text"].as_str().unwrap_or(""),
            post["_encoding"].as_str().or(post["encoding"].as_str()),
        )
        .map_err(|e| fail(format!("request.postData: {e}")))?,
        None => Vec::new(),
    };
    let content = entry.pointer("/response/content");
    let response_body = match content {
        Some(content) => decode(
            content["text"].as_str().unwrap_or(""),
            content["encoding"].as_str(),
        )
        .map_err(|e| fail(format!("response.content: {e}")))?,
        None => Vec::new(),
    };
    let response_cut = content
        .and_then(|c| c["comment"].as_str())
        .is_some_and(|c| c.contains("kept the first"));
    let headers = headers_of(entry.pointer("/request/headers"))
        .into_iter()
        .filter(|(name, _)| !FRAMING.iter().any(|f| f.eq_ignore_ascii_case(name)))
        .collect();
    Ok(Recorded {
        index,
        method: method.to_owned(),
        path,
        headers,
        body,
        status,
        response_headers: headers_of(entry.pointer("/response/headers")),
        response_body,
        response_cut,
    })
}

/// RFC 9110 §9.1: a method is a token.
fn http_method_ok(method: &str) -> Result<(), ()> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !method.is_empty() && method.bytes().all(token) {
        Ok(())
    } else {
        Err(())
    }
}

/// The path and query of an absolute URL (or of an origin-form target).
fn path_of(url: &str) -> Option<String> {
    if url.starts_with('/') {
        return Some(url.to_owned());
    }
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    let start = rest.find(['/', '?']).unwrap_or(rest.len());
    let path = &rest[start..];
    Some(match path.strip_prefix('?') {
        Some(_) => format!("/{path}"),
        None if path.is_empty() => "/".to_owned(),
        None => path.to_owned(),
    })
}

/// Header pairs of a HAR `headers` array, leaving out redacted values.
fn headers_of(list: Option<&Value>) -> Vec<(String, String)> {
    list.and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|h| Some((h["name"].as_str()?, h["value"].as_str()?)))
                .filter(|(name, value)| *value != REDACTED && !name.starts_with(':'))
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn decode(text: &str, encoding: Option<&str>) -> Result<Vec<u8>, String> {
    let bytes = match encoding {
        Some(e) if e.eq_ignore_ascii_case("base64") => base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| format!("the base64 body does not decode: {e}"))?,
        _ => text.as_bytes().to_vec(),
    };
    if bytes.len() > MAX_REPLAY_BODY {
        return Err(format!(
            "the body is {} bytes, over the {MAX_REPLAY_BODY}-byte limit of replay",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// What the comparison leaves out.
#[derive(Debug, Clone, Default)]
pub struct Ignore {
    /// Header names (case-insensitive) not compared.
    pub headers: Vec<String>,
    /// JSON paths (`$.a.b`, `items[0].id`, `items[*].id`, `*` for any key) removed
    /// from both JSON bodies before they are compared.
    pub json_paths: Vec<Vec<Step>>,
}

/// One step of a JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// An object key.
    Key(String),
    /// An array index.
    Index(usize),
    /// Every key or index.
    Any,
}

/// Parses a JSON path of `--ignore-json-path`: `$.a.b[0].c`, `a.*.id`,
/// `items[*].id` (`$.` optional).
///
/// # Errors
///
/// A message naming the path when it is empty or a bracket is not `[N]`/`[*]`.
pub fn parse_json_path(text: &str) -> Result<Vec<Step>, String> {
    let body = text.strip_prefix('$').unwrap_or(text);
    let body = body.strip_prefix('.').unwrap_or(body);
    let mut steps = Vec::new();
    for part in body.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        match key {
            "" if rest.is_empty() => {
                return Err(format!("{text:?}: an empty step; write e.g. $.data.id"));
            }
            "" => {}
            "*" => steps.push(Step::Any),
            key => steps.push(Step::Key(key.to_owned())),
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let end = inner
                .find(']')
                .ok_or_else(|| format!("{text:?}: a '[' without ']'"))?;
            steps.push(match &inner[..end] {
                "*" => Step::Any,
                n => Step::Index(
                    n.parse()
                        .map_err(|_| format!("{text:?}: [{n}] is not an index or [*]"))?,
                ),
            });
            rest = &inner[end + 1..];
        }
        if !rest.is_empty() {
            return Err(format!("{text:?}: unexpected {rest:?}"));
        }
    }
    Ok(steps)
}

/// Removes what `path` names from `value`.
fn remove_path(value: &mut Value, path: &[Step]) {
    let Some((step, rest)) = path.split_first() else {
        return;
    };
    let last = rest.is_empty();
    match (value, step) {
        (Value::Object(map), Step::Key(key)) => {
            if last {
                map.remove(key);
            } else if let Some(child) = map.get_mut(key) {
                remove_path(child, rest);
            }
        }
        (Value::Object(map), Step::Any) => {
            if last {
                map.clear();
            } else {
                map.values_mut().for_each(|child| remove_path(child, rest));
            }
        }
        (Value::Array(items), Step::Index(i)) => {
            if last {
                if let Some(item) = items.get_mut(*i) {
                    *item = Value::Null;
                }
            } else if let Some(child) = items.get_mut(*i) {
                remove_path(child, rest);
            }
        }
        (Value::Array(items), Step::Any) => {
            if last {
                items.iter_mut().for_each(|item| *item = Value::Null);
            } else {
                items.iter_mut().for_each(|child| remove_path(child, rest));
            }
        }
        _ => {}
    }
}

/// One way a new response differs from the recorded one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Difference {
    /// Another status code.
    Status {
        /// Recorded.
        recorded: u16,
        /// Now.
        got: u16,
    },
    /// A header's values differ (or it is missing on one side).
    Header {
        /// The name, in lower case.
        name: String,
        /// Recorded values.
        recorded: Vec<String>,
        /// Values now.
        got: Vec<String>,
    },
    /// The bodies differ (after the ignored JSON paths were removed).
    Body {
        /// What differs, shortly.
        detail: String,
    },
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::Status { recorded, got } => write!(f, "status {recorded} → {got}"),
            Difference::Header {
                name,
                recorded,
                got,
            } => write!(f, "header {name}: {recorded:?} → {got:?}"),
            Difference::Body { detail } => write!(f, "body: {detail}"),
        }
    }
}

/// Header names whose values depend on the connection, never compared.
const NOT_COMPARED: [&str; 4] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
];

/// Compares a response (`status`, `headers`, `body`) with the recorded one of
/// `recorded`; empty when they are the same under `ignore`. Headers are compared
/// by name (case-insensitive) over the names either side has; a recorded body
/// that was cut is compared with the same first bytes of `body`.
pub fn compare(
    recorded: &Recorded,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    ignore: &Ignore,
) -> Vec<Difference> {
    let mut out = Vec::new();
    if recorded.status != status {
        out.push(Difference::Status {
            recorded: recorded.status,
            got: status,
        });
    }
    let skipped = |name: &str| {
        NOT_COMPARED.iter().any(|n| n.eq_ignore_ascii_case(name))
            || ignore.headers.iter().any(|n| n.eq_ignore_ascii_case(name))
    };
    let values = |list: &[(String, String)], name: &str| -> Vec<String> {
        let mut v: Vec<String> = list
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect();
        v.sort();
        v
    };
    let mut names: Vec<String> = recorded
        .response_headers
        .iter()
        .chain(headers)
        .map(|(n, _)| n.to_ascii_lowercase())
        .filter(|n| !skipped(n))
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        let (was, now) = (
            values(&recorded.response_headers, &name),
            values(headers, &name),
        );
        if was != now {
            out.push(Difference::Header {
                name,
                recorded: was,
                got: now,
            });
        }
    }
    let got = if recorded.response_cut {
        &body[..body.len().min(recorded.response_body.len())]
    } else {
        body
    };
    if let Some(detail) = body_difference(&recorded.response_body, got, ignore) {
        out.push(Difference::Body { detail });
    }
    out
}

/// Why two bodies differ, or `None`; JSON bodies are compared as values with the
/// ignored paths removed.
fn body_difference(recorded: &[u8], got: &[u8], ignore: &Ignore) -> Option<String> {
    if let (Ok(mut a), Ok(mut b)) = (
        serde_json::from_slice::<Value>(recorded),
        serde_json::from_slice::<Value>(got),
    ) {
        for path in &ignore.json_paths {
            remove_path(&mut a, path);
            remove_path(&mut b, path);
        }
        return (a != b)
            .then(|| format!("JSON {} → {}", short(&a.to_string()), short(&b.to_string())));
    }
    (recorded != got).then(|| {
        format!(
            "{} bytes → {} bytes, first difference at byte {}",
            recorded.len(),
            got.len(),
            recorded
                .iter()
                .zip(got)
                .position(|(a, b)| a != b)
                .unwrap_or(recorded.len().min(got.len()))
        )
    })
}

fn short(text: &str) -> String {
    const MAX: usize = 120;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn har(entry: &str) -> String {
        format!(r#"{{"log":{{"version":"1.2","entries":[{entry}]}}}}"#)
    }

    #[test]
    fn entries_from_elsewhere_load_and_bad_ones_are_named() {
        let ok = har(
            r#"{"request":{"method":"POST","url":"http://a.example/x?y=1","headers":[{"name":"Authorization","value":"[redacted by graft]"},{"name":"Content-Length","value":"3"},{"name":"X-A","value":"1"}],"postData":{"mimeType":"","text":"/wAB","_encoding":"base64"}},"response":{"status":201,"content":{"text":"ok"}}}"#,
        );
        let loaded = load(&ok).unwrap();
        assert_eq!(loaded[0].path, "/x?y=1");
        assert_eq!(loaded[0].body, [0xff, 0, 1]);
        assert_eq!(loaded[0].headers, [("X-A".to_owned(), "1".to_owned())]);
        assert_eq!(loaded[0].response_body, b"ok");

        let no_url = har(r#"{"request":{"method":"GET"},"response":{"status":200}}"#);
        let err = load(&no_url).unwrap_err().to_string();
        assert!(
            err.starts_with("entry 1 (GET ?): request.url is missing"),
            "{err}"
        );
        let no_status = har(r#"{"request":{"method":"GET","url":"http://h/"},"response":{}}"#);
        let err = load(&no_status).unwrap_err().to_string();
        assert!(
            err.contains("entry 1 (GET http://h/): response.status"),
            "{err}"
        );
        let cut = har(
            r#"{"request":{"method":"PUT","url":"/b","postData":{"text":"x","comment":"graft kept the first 65536 of 99999 bytes"}},"response":{"status":200}}"#,
        );
        assert!(load(&cut).unwrap_err().to_string().contains("was cut"));
        assert!(matches!(load("{}"), Err(LoadError::NotHar(_))));
        let huge = "a".repeat(MAX_REPLAY_BODY + 1);
        let big = har(&format!(
            r#"{{"request":{{"method":"PUT","url":"/b","postData":{{"text":"{huge}"}}}},"response":{{"status":200}}}}"#
        ));
        assert!(load(&big).unwrap_err().to_string().contains("limit"));
    }

    #[test]
    fn ignore_rules_remove_what_always_differs() {
        let recorded = Recorded {
            index: 1,
            method: "GET".into(),
            path: "/".into(),
            headers: vec![],
            body: vec![],
            status: 200,
            response_headers: vec![("Date".into(), "Mon".into()), ("X-Kind".into(), "a".into())],
            response_body: br#"{"id":1,"items":[{"id":7,"v":1}],"name":"x"}"#.to_vec(),
            response_cut: false,
        };
        let got_headers = vec![("date".into(), "Tue".into()), ("x-kind".into(), "a".into())];
        let got = br#"{"name":"x","id":2,"items":[{"id":8,"v":1}]}"#;
        let none = Ignore::default();
        let diffs = compare(&recorded, 200, &got_headers, got, &none);
        assert_eq!(diffs.len(), 2, "{diffs:?}");
        let ignore = Ignore {
            headers: vec!["DATE".into()],
            json_paths: vec![
                parse_json_path("$.id").unwrap(),
                parse_json_path("items[*].id").unwrap(),
            ],
        };
        assert_eq!(compare(&recorded, 200, &got_headers, got, &ignore), []);
        let diffs = compare(&recorded, 500, &got_headers, br#"{"name":"y"}"#, &ignore);
        assert!(matches!(
            diffs[0],
            Difference::Status {
                recorded: 200,
                got: 500
            }
        ));
        assert!(matches!(diffs[1], Difference::Body { .. }));
        assert!(parse_json_path("a..b").is_err());
        assert!(parse_json_path("a[x]").is_err());
    }
}
