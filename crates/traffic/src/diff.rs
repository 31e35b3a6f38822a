//! Comparing an HTTP response with the one it should equal, shared by `graft
//! replay` (a new answer against the recorded one) and the shadow diff of `graft
//! run --mirror --diff` (the local process's answer against the target's, see
//! [`shadow`]).
//!
//! [`compare`] takes two [`Answer`]s and an [`Ignore`] rule set and lists the
//! [`Change`]s: the status, each header by name (case-insensitive, framing fields
//! never compared), and the body: JSON bodies structurally (key order and spacing
//! do not matter, ignored JSON paths removed from both first), others byte for
//! byte. Only the first [`BODY_COMPARED`] bytes of a body are kept anywhere in
//! graft's view of traffic ([`crate::http1::BODY_KEEP`]); past that, bodies are
//! compared by their kept bytes and their full lengths. A shadow [`Difference`] is
//! one request whose answers differ, as written to the JSON lines file.

use std::{net::SocketAddr, sync::Arc};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;

pub mod shadow;

/// How many bytes of each body are compared: what graft keeps of a body.
pub const BODY_COMPARED: usize = crate::http1::BODY_KEEP;

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

/// Builds an [`Ignore`] from `--ignore-header` names and `--ignore-json-path`
/// paths.
///
/// # Errors
///
/// The message of [`parse_json_path`] for the first bad path, prefixed with the
/// flag's name.
pub fn ignore_from_flags(headers: &[String], json_paths: &[String]) -> Result<Ignore, String> {
    Ok(Ignore {
        headers: headers.to_vec(),
        json_paths: json_paths
            .iter()
            .map(|p| parse_json_path(p).map_err(|e| format!("--ignore-json-path {e}")))
            .collect::<Result<_, _>>()?,
    })
}

/// One side of a comparison: a response's status, fields and body.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    /// The status code.
    pub status: u16,
    /// The fields, names as sent.
    pub headers: &'a [(String, String)],
    /// The body's bytes as kept (chunked bodies decoded).
    pub body: &'a [u8],
    /// The body's full length in bytes; `None` when only `body`'s bytes are known
    /// to be its start (a HAR entry whose body was cut when it was recorded).
    pub body_len: Option<u64>,
}

impl Answer<'_> {
    /// Whether `body` is the whole body.
    fn whole(&self) -> bool {
        self.body_len == Some(self.body.len() as u64)
    }
}

/// Which side of a shadow comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The target's answer (the expected one).
    Target,
    /// The local process's answer.
    Local,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Target => "the target",
            Side::Local => "CMD",
        })
    }
}

/// One way an answer differs from the expected one (replay: the recorded one;
/// shadow diff: the target's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// Another status code.
    Status {
        /// Expected.
        expected: u16,
        /// Got.
        got: u16,
    },
    /// A header's values differ (or it is missing on one side).
    Header {
        /// The name, in lower case.
        name: String,
        /// Expected values, sorted.
        expected: Vec<String>,
        /// Values got, sorted.
        got: Vec<String>,
    },
    /// The bodies differ (after the ignored JSON paths were removed).
    Body {
        /// What differs, shortly: the two JSON values (each cut at 120 bytes), or
        /// the lengths and the first differing byte.
        detail: String,
    },
    /// One side gave no answer: nothing to compare with.
    NoResponse {
        /// Who did not answer.
        side: Side,
        /// Why, e.g. `CMD did not answer within 10s`.
        reason: String,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Status { expected, got } => write!(f, "status {expected} → {got}"),
            Change::Header {
                name,
                expected,
                got,
            } => write!(f, "header {name}: {expected:?} → {got:?}"),
            Change::Body { detail } => write!(f, "body: {detail}"),
            Change::NoResponse { reason, .. } => write!(f, "no response: {reason}"),
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

/// Compares `got` with `expected`; empty when they are the same under `ignore`.
/// Headers are compared by name (case-insensitive) over the names either side
/// has, values sorted; bodies as described in the module doc.
pub fn compare(expected: &Answer<'_>, got: &Answer<'_>, ignore: &Ignore) -> Vec<Change> {
    let mut out = Vec::new();
    if expected.status != got.status {
        out.push(Change::Status {
            expected: expected.status,
            got: got.status,
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
    let mut names: Vec<String> = expected
        .headers
        .iter()
        .chain(got.headers)
        .map(|(n, _)| n.to_ascii_lowercase())
        .filter(|n| !skipped(n))
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        let (was, now) = (values(expected.headers, &name), values(got.headers, &name));
        if was != now {
            out.push(Change::Header {
                name,
                expected: was,
                got: now,
            });
        }
    }
    if let Some(detail) = body_difference(expected, got, ignore) {
        out.push(Change::Body { detail });
    }
    out
}

/// Why two bodies differ, or `None`.
fn body_difference(expected: &Answer<'_>, got: &Answer<'_>, ignore: &Ignore) -> Option<String> {
    if expected.whole() && got.whole() {
        if let (Ok(mut a), Ok(mut b)) = (
            serde_json::from_slice::<Value>(expected.body),
            serde_json::from_slice::<Value>(got.body),
        ) {
            for path in &ignore.json_paths {
                remove_path(&mut a, path);
                remove_path(&mut b, path);
            }
            return (a != b)
                .then(|| format!("JSON {} → {}", short(&a.to_string()), short(&b.to_string())));
        }
        return bytes_difference(expected.body, got.body, expected.body_len, got.body_len);
    }
    match (expected.body_len, got.body_len) {
        // Both lengths known: they must agree, and so must the bytes kept.
        (Some(a), Some(b)) if a != b => Some(format!("{a} bytes → {b} bytes")),
        (Some(_), Some(_)) => {
            let n = expected.body.len().min(got.body.len());
            bytes_difference(&expected.body[..n], &got.body[..n], None, None)
                .map(|d| format!("{d} (of the first {n} bytes compared)"))
        }
        // Only the start of one is known: compare that start.
        _ => {
            let n = expected.body.len().min(got.body.len());
            let short_got = got.body_len.is_some_and(|l| l < expected.body.len() as u64);
            let short_expected = expected.body_len.is_some_and(|l| l < got.body.len() as u64);
            if short_got || short_expected {
                return bytes_difference(expected.body, got.body, expected.body_len, got.body_len);
            }
            bytes_difference(&expected.body[..n], &got.body[..n], None, None)
        }
    }
}

/// How `a` and `b` differ as bytes, or `None` when they are equal.
fn bytes_difference(a: &[u8], b: &[u8], a_len: Option<u64>, b_len: Option<u64>) -> Option<String> {
    (a != b).then(|| {
        format!(
            "{} bytes → {} bytes, first difference at byte {}",
            a_len.unwrap_or(a.len() as u64),
            b_len.unwrap_or(b.len() as u64),
            a.iter()
                .zip(b)
                .position(|(x, y)| x != y)
                .unwrap_or(a.len().min(b.len()))
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

/// What a shadow comparison found for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Both answered, the same under the ignore rules.
    Same,
    /// Both answered, differently.
    Differ,
    /// Only one side answered (see [`Change::NoResponse`]).
    Unmatched,
}

/// One request of the shadow diff whose two answers differ, or that only one
/// side answered: one line of the `--diff-out` JSON lines file, and what the
/// inspector shows.
///
/// ```json
/// {"started_unix_ms":1764496800123,"port":8080,"client":"10.0.0.7:51234",
///  "connection":3,"request":1,"method":"GET","path":"/users/7",
///  "outcome":"differ","target_status":200,"local_status":500,
///  "changes":[{"kind":"status","expected":200,"got":500}]}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// When the request's first byte was read, in milliseconds since the Unix
    /// epoch.
    pub started_unix_ms: u64,
    /// The target's port.
    pub port: u16,
    /// The client's address, as the target saw it.
    pub client: Option<SocketAddr>,
    /// The mirrored connection's number in the session, from 1.
    pub connection: u64,
    /// The request's number on its connection, from 1.
    pub request: u64,
    /// The request's method.
    pub method: String,
    /// The request target (path and query) as sent.
    pub path: String,
    /// [`Outcome::Differ`] or [`Outcome::Unmatched`].
    pub outcome: Outcome,
    /// The target's status; `None` when it did not answer.
    pub target_status: Option<u16>,
    /// The local process's status; `None` when it did not answer.
    pub local_status: Option<u16>,
    /// What differs: expected is the target's, got is the local process's.
    pub changes: Vec<Change>,
}

/// The publisher of a session's shadow [`Difference`]s (the inspector watches
/// it). Cloning shares it. Publishing never waits: a watcher more than
/// [`crate::exchange::WATCH_QUEUE`] differences behind misses the oldest (its
/// receiver reports `Lagged`).
#[derive(Debug, Clone)]
pub struct Differences {
    tx: broadcast::Sender<Arc<Difference>>,
}

impl Default for Differences {
    fn default() -> Self {
        Differences::new()
    }
}

impl Differences {
    /// A publisher nobody watches yet.
    pub fn new() -> Differences {
        Differences {
            tx: broadcast::channel(crate::exchange::WATCH_QUEUE).0,
        }
    }

    /// Hands `difference` to every current watcher.
    pub fn publish(&self, difference: Difference) {
        // No watcher is not an error: nobody is looking.
        let _ = self.tx.send(Arc::new(difference));
    }

    /// A new watcher: it sees the differences published from now on.
    pub fn watch(&self) -> broadcast::Receiver<Arc<Difference>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer<'a>(status: u16, headers: &'a [(String, String)], body: &'a [u8]) -> Answer<'a> {
        Answer {
            status,
            headers,
            body,
            body_len: Some(body.len() as u64),
        }
    }

    #[test]
    fn ignore_rules_remove_what_always_differs() {
        let was = vec![("Date".into(), "Mon".into()), ("X-Kind".into(), "a".into())];
        let now = vec![("date".into(), "Tue".into()), ("x-kind".into(), "a".into())];
        let expected = answer(
            200,
            &was,
            br#"{"id":1,"items":[{"id":7,"v":1}],"name":"x"}"#,
        );
        let got = answer(
            200,
            &now,
            br#"{"name":"x","id":2,"items":[{"id":8,"v":1}]}"#,
        );
        let diffs = compare(&expected, &got, &Ignore::default());
        assert_eq!(diffs.len(), 2, "{diffs:?}");
        let ignore =
            ignore_from_flags(&["DATE".into()], &["$.id".into(), "items[*].id".into()]).unwrap();
        assert_eq!(compare(&expected, &got, &ignore), []);
        let diffs = compare(&expected, &answer(500, &now, br#"{"name":"y"}"#), &ignore);
        assert!(matches!(
            diffs[0],
            Change::Status {
                expected: 200,
                got: 500
            }
        ));
        assert!(matches!(diffs[1], Change::Body { .. }));
        assert!(parse_json_path("a..b").is_err());
        assert!(parse_json_path("a[x]").is_err());
        assert!(ignore_from_flags(&[], &["a[".into()]).is_err());
    }

    #[test]
    fn bodies_past_the_kept_bytes_compare_by_length_and_start() {
        let kept = vec![b'a'; 16];
        let long = |len| Answer {
            status: 200,
            headers: &[],
            body: &kept,
            body_len: Some(len),
        };
        assert_eq!(
            compare(&long(1_000_000), &long(1_000_000), &Ignore::default()),
            []
        );
        let diffs = compare(&long(1_000_000), &long(2_000_000), &Ignore::default());
        assert_eq!(
            diffs,
            [Change::Body {
                detail: "1000000 bytes → 2000000 bytes".into()
            }]
        );
        // A recorded body cut at 4 bytes matches any answer that starts alike.
        let cut = Answer {
            status: 200,
            headers: &[],
            body: b"aaaa",
            body_len: None,
        };
        assert_eq!(compare(&cut, &long(99), &Ignore::default()), []);
        let other = Answer {
            body: b"aaab",
            ..cut
        };
        assert_eq!(compare(&other, &long(99), &Ignore::default()).len(), 1);
    }

    #[test]
    fn a_difference_is_one_json_line_with_its_kind_tags() {
        let d = Difference {
            started_unix_ms: 1,
            port: 80,
            client: Some("10.0.0.7:5".parse().unwrap()),
            connection: 3,
            request: 1,
            method: "GET".into(),
            path: "/x".into(),
            outcome: Outcome::Unmatched,
            target_status: Some(200),
            local_status: None,
            changes: vec![Change::NoResponse {
                side: Side::Local,
                reason: "CMD did not answer within 2s".into(),
            }],
        };
        let line = serde_json::to_string(&d).unwrap();
        assert!(!line.contains('\n'));
        assert!(line.contains(r#""outcome":"unmatched""#), "{line}");
        assert!(
            line.contains(r#""kind":"no_response","side":"local""#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Difference>(&line).unwrap(), d);
        // Published to watchers as it is.
        let differences = Differences::new();
        let mut watcher = differences.watch();
        differences.publish(d.clone());
        assert_eq!(*watcher.try_recv().unwrap(), d);
    }
}
