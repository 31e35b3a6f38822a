//! Replaying a HAR file: [`load`] reads the entries of any HAR 1.2 file (graft's
//! or another tool's) into [`Recorded`] requests and responses, with an error
//! naming the entry for anything missing or too large, and [`compare`] tells a
//! new response apart from the recorded one under [`Ignore`] rules (the comparison
//! itself is [`crate::diff`]'s, shared with the shadow diff).

use base64::Engine;
use serde_json::Value;

pub use crate::diff::{Change, Ignore, Step, parse_json_path};
use crate::{
    diff::{self, Answer},
    har::REDACTED,
};

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
    /// The port of the URL (its scheme's default when it names none); `None` for
    /// an origin-form URL (`/path`).
    pub port: Option<u16>,
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
        port: port_of(url),
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

/// The port of an absolute `http://` or `https://` URL.
fn port_of(url: &str) -> Option<u16> {
    let (rest, default) = match url.strip_prefix("http://") {
        Some(rest) => (rest, 80),
        None => (url.strip_prefix("https://")?, 443),
    };
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    // `host:port`, `[v6]:port`, or no port.
    match authority.rsplit_once(':') {
        Some((host, port))
            if !port.contains(']') && (!host.contains(':') || host.ends_with(']')) =>
        {
            port.parse().ok()
        }
        _ => Some(default),
    }
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

/// Compares a response (`status`, `headers`, `body`) with the recorded one of
/// `recorded` ([`crate::diff::compare`]); empty when they are the same under
/// `ignore`. A recorded body that was cut is compared with the same first bytes
/// of `body`.
pub fn compare(
    recorded: &Recorded,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    ignore: &Ignore,
) -> Vec<Change> {
    let expected = Answer {
        status: recorded.status,
        headers: &recorded.response_headers,
        body: &recorded.response_body,
        body_len: (!recorded.response_cut).then_some(recorded.response_body.len() as u64),
    };
    let got = Answer {
        status,
        headers,
        body,
        body_len: Some(body.len() as u64),
    };
    diff::compare(&expected, &got, ignore)
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
        assert_eq!(loaded[0].port, Some(80));
        assert_eq!(port_of("http://[::1]:8080/a"), Some(8080));
        assert_eq!(port_of("https://h?q"), Some(443));
        assert_eq!(port_of("http://h:81"), Some(81));
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
}
