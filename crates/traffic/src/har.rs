//! HAR 1.2 (HTTP Archive, <http://www.softwareishard.com/blog/har-12-spec/>), the
//! format browsers and proxies read: [`Har::from_exchanges`] writes exchanges as
//! entries, with [`Redaction`] applied first, so a redacted value never exists in
//! the archive at all.
//!
//! Bodies are text when they are UTF-8 and base64 otherwise (`encoding: "base64"`
//! on `content`, as the spec defines it; on `postData`, which the spec gives no
//! encoding, the custom field `_encoding`, as HAR allows fields starting with `_`).
//! Only the first 64 KiB of a body are kept; a cut body says so in its `comment`
//! and its full length in `size` / `bodySize`.

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::exchange::{Body, Exchange, header};

/// The value that replaces a redacted header's.
pub const REDACTED: &str = "[redacted by graft]";

/// The headers whose values are removed before anything is written.
#[derive(Debug, Clone)]
pub struct Redaction {
    names: Vec<String>,
}

impl Default for Redaction {
    /// `Authorization`, `Cookie`, `Set-Cookie`, `Proxy-Authorization`.
    fn default() -> Self {
        Redaction::new(
            [
                "authorization",
                "cookie",
                "set-cookie",
                "proxy-authorization",
            ]
            .into_iter()
            .map(String::from),
        )
    }
}

impl Redaction {
    /// Redacts the headers named in `names` (case-insensitive, RFC 9110 §5.1).
    pub fn new(names: impl IntoIterator<Item = String>) -> Redaction {
        Redaction {
            names: names.into_iter().map(|n| n.to_ascii_lowercase()).collect(),
        }
    }

    /// Whether the header `name` is redacted.
    pub fn covers(&self, name: &str) -> bool {
        self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }

    /// `headers` with the covered values replaced by [`REDACTED`].
    pub fn apply(&self, headers: &[(String, String)]) -> Vec<NameValue> {
        headers
            .iter()
            .map(|(name, value)| NameValue {
                name: name.clone(),
                value: if self.covers(name) {
                    REDACTED.to_owned()
                } else {
                    value.clone()
                },
            })
            .collect()
    }
}

/// A HAR document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Har {
    /// The log.
    pub log: Log,
}

/// The HAR `log` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Log {
    /// `1.2`.
    pub version: String,
    /// Who wrote it.
    pub creator: Creator,
    /// The exchanges, in the order their requests started.
    pub entries: Vec<Entry>,
}

/// The HAR `creator` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Creator {
    /// `graft`.
    pub name: String,
    /// graft's version.
    pub version: String,
}

/// One HAR entry: a request and its response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// ISO 8601 (RFC 3339) time the request started.
    pub started_date_time: String,
    /// Total time in ms (the sum of the timings).
    pub time: f64,
    /// The request.
    pub request: HarRequest,
    /// The response (status 0 when there was none, as browsers write aborted ones).
    pub response: HarResponse,
    /// Always empty: graft sees no cache.
    pub cache: serde_json::Map<String, serde_json::Value>,
    /// Timings in ms.
    pub timings: Timings,
    /// graft's own facts about the entry.
    #[serde(rename = "_graft", default, skip_serializing_if = "Option::is_none")]
    pub graft: Option<GraftFacts>,
}

/// The custom `_graft` object of an entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GraftFacts {
    /// The target, as given to graft.
    pub target: String,
    /// The target's port.
    pub port: u16,
    /// Who answered: `target` or `local`.
    pub route: String,
}

/// A name and a value (headers, query parameters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameValue {
    /// The name.
    pub name: String,
    /// The value.
    pub value: String,
}

/// The HAR `request` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HarRequest {
    /// The method.
    pub method: String,
    /// The absolute URL (`http://` + Host + target).
    pub url: String,
    /// `HTTP/1.1`.
    pub http_version: String,
    /// Always empty: cookies stay in the (redacted) `Cookie` header.
    pub cookies: Vec<NameValue>,
    /// Fields, redacted.
    pub headers: Vec<NameValue>,
    /// The query's parameters, percent-decoding left as sent.
    pub query_string: Vec<NameValue>,
    /// The body, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_data: Option<PostData>,
    /// The head's size; -1: not known.
    pub headers_size: i64,
    /// The body's full size in bytes.
    pub body_size: i64,
}

/// The HAR `postData` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PostData {
    /// `Content-Type`, or empty.
    pub mime_type: String,
    /// The body, as text or base64.
    pub text: String,
    /// `base64` when `text` is base64.
    #[serde(rename = "_encoding", default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    /// Says when the body was cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// The HAR `response` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HarResponse {
    /// The status code; 0 when no response came.
    pub status: u16,
    /// The reason phrase.
    pub status_text: String,
    /// `HTTP/1.1`.
    pub http_version: String,
    /// Always empty: cookies stay in the (redacted) `Set-Cookie` header.
    pub cookies: Vec<NameValue>,
    /// Fields, redacted.
    pub headers: Vec<NameValue>,
    /// The body.
    pub content: Content,
    /// `Location`, or empty.
    #[serde(rename = "redirectURL")]
    pub redirect_url: String,
    /// The head's size; -1: not known.
    pub headers_size: i64,
    /// The body's full size in bytes.
    pub body_size: i64,
}

/// The HAR `content` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Content {
    /// The body's full size in bytes.
    pub size: i64,
    /// `Content-Type`, or empty.
    pub mime_type: String,
    /// The body's first bytes, as text or base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `base64` when `text` is base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    /// Says when the body was cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// The HAR `timings` object, in ms; -1: does not apply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timings {
    /// Waiting for a connection.
    pub blocked: f64,
    /// DNS.
    pub dns: f64,
    /// Connecting.
    pub connect: f64,
    /// Sending the request.
    pub send: f64,
    /// Waiting for the response's first byte.
    pub wait: f64,
    /// Receiving the response.
    pub receive: f64,
    /// TLS.
    pub ssl: f64,
}

/// A body as HAR text: the text, and `base64` when it is base64; plus a comment
/// when it was cut.
fn body_text(body: &Body) -> (String, Option<String>, Option<String>) {
    let (text, encoding) = match std::str::from_utf8(&body.bytes) {
        Ok(text) => (text.to_owned(), None),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&body.bytes),
            Some("base64".to_owned()),
        ),
    };
    let comment = if body.truncated() {
        Some(format!(
            "graft kept the first {} of {} bytes",
            body.bytes.len(),
            body.len
        ))
    } else if !body.complete {
        Some("the connection ended before the body did".to_owned())
    } else {
        None
    };
    (text, encoding, comment)
}

/// The `name=value` pairs of the query of `target`.
fn query_string(target: &str) -> Vec<NameValue> {
    let Some((_, query)) = target.split_once('?') else {
        return Vec::new();
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            NameValue {
                name: name.to_owned(),
                value: value.to_owned(),
            }
        })
        .collect()
}

impl Entry {
    /// The entry of `exchange`, with `redaction` applied.
    pub fn from_exchange(exchange: &Exchange, redaction: &Redaction) -> Entry {
        let request = &exchange.request;
        let host = header(&request.headers, "host")
            .map(str::to_owned)
            .unwrap_or_else(|| format!("localhost:{}", exchange.origin.port));
        let url = if request.target.starts_with("http://") || request.target.starts_with("https://")
        {
            request.target.clone()
        } else {
            format!("http://{host}{}", request.target)
        };
        let post_data = (request.body.len > 0).then(|| {
            let (text, encoding, comment) = body_text(&request.body);
            PostData {
                mime_type: header(&request.headers, "content-type")
                    .unwrap_or_default()
                    .to_owned(),
                text,
                encoding,
                comment,
            }
        });
        let response = match &exchange.response {
            Some(response) => {
                let (text, encoding, comment) = body_text(&response.body);
                HarResponse {
                    status: response.status,
                    status_text: response.reason.clone(),
                    http_version: response.version.clone(),
                    cookies: Vec::new(),
                    headers: redaction.apply(&response.headers),
                    content: Content {
                        size: response.body.len as i64,
                        mime_type: header(&response.headers, "content-type")
                            .unwrap_or_default()
                            .to_owned(),
                        text: Some(text),
                        encoding,
                        comment,
                    },
                    redirect_url: header(&response.headers, "location")
                        .unwrap_or_default()
                        .to_owned(),
                    headers_size: -1,
                    body_size: response.body.len as i64,
                }
            }
            None => HarResponse {
                status: 0,
                status_text: String::new(),
                http_version: String::new(),
                cookies: Vec::new(),
                headers: Vec::new(),
                content: Content {
                    size: 0,
                    mime_type: String::new(),
                    text: None,
                    encoding: None,
                    comment: Some("no response: the connection ended first".into()),
                },
                redirect_url: String::new(),
                headers_size: -1,
                body_size: -1,
            },
        };
        let started = jiff::Timestamp::from_millisecond(exchange.started_unix_ms as i64)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        Entry {
            started_date_time: started.to_string(),
            time: exchange.latency_ms(),
            request: HarRequest {
                method: request.method.clone(),
                url,
                http_version: request.version.clone(),
                cookies: Vec::new(),
                headers: redaction.apply(&request.headers),
                query_string: query_string(&request.target),
                post_data,
                headers_size: -1,
                body_size: request.body.len as i64,
            },
            response,
            cache: serde_json::Map::new(),
            timings: Timings {
                blocked: -1.0,
                dns: -1.0,
                connect: -1.0,
                send: exchange.send_ms,
                wait: exchange.wait_ms,
                receive: exchange.receive_ms,
                ssl: -1.0,
            },
            graft: Some(GraftFacts {
                target: exchange.origin.target.clone(),
                port: exchange.origin.port,
                route: exchange.origin.route.to_string(),
            }),
        }
    }
}

impl Har {
    /// A HAR of `exchanges` (in their order), with `redaction` applied to every
    /// header before the document exists.
    pub fn from_exchanges<'a>(
        exchanges: impl IntoIterator<Item = &'a Exchange>,
        redaction: &Redaction,
    ) -> Har {
        Har {
            log: Log {
                version: "1.2".into(),
                creator: Creator {
                    name: "graft".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                },
                entries: exchanges
                    .into_iter()
                    .map(|e| Entry::from_exchange(e, redaction))
                    .collect(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::exchange::{Origin, Request, Response, Route};
    use graft_protocol::incoming::IncomingMode;

    fn exchange(body: Vec<u8>) -> Exchange {
        Exchange {
            origin: Arc::new(Origin {
                target: "pid:1".into(),
                port: 8080,
                mode: IncomingMode::Mirror,
                client: None,
                route: Route::Target,
                filter: None,
            }),
            started_unix_ms: 1_700_000_000_123,
            started_unix_us: 1_700_000_000_123_000,
            request: Request {
                method: "POST".into(),
                target: "/x?a=1&b".into(),
                version: "HTTP/1.1".into(),
                headers: vec![
                    ("Host".into(), "api:8080".into()),
                    ("Authorization".into(), "Bearer s3cret".into()),
                    ("X-Trace".into(), "t1".into()),
                ],
                body: Body {
                    len: body.len() as u64,
                    bytes: body,
                    complete: true,
                },
            },
            response: Some(Response {
                status: 201,
                reason: "Created".into(),
                version: "HTTP/1.1".into(),
                headers: vec![("set-cookie".into(), "sid=abc".into())],
                body: Body {
                    bytes: b"ok".to_vec(),
                    len: 10,
                    complete: true,
                },
            }),
            send_ms: 1.0,
            wait_ms: 2.0,
            receive_ms: 3.0,
        }
    }

    #[test]
    fn entries_follow_the_spec_and_redact_before_serializing() {
        let har = Har::from_exchanges([&exchange(b"{\"a\":1}".to_vec())], &Redaction::default());
        let text = serde_json::to_string(&har).unwrap();
        assert!(
            !text.contains("s3cret") && !text.contains("sid=abc"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let entry = &v["log"]["entries"][0];
        assert_eq!(v["log"]["version"], "1.2");
        assert_eq!(entry["startedDateTime"], "2023-11-14T22:13:20.123Z");
        assert_eq!(entry["time"], 6.0);
        assert_eq!(entry["request"]["url"], "http://api:8080/x?a=1&b");
        assert_eq!(entry["request"]["queryString"][1]["name"], "b");
        assert_eq!(entry["request"]["postData"]["text"], "{\"a\":1}");
        assert_eq!(entry["request"]["headers"][2]["value"], "t1");
        assert_eq!(entry["response"]["status"], 201);
        assert_eq!(entry["response"]["content"]["size"], 10);
        assert!(
            entry["response"]["content"]["comment"]
                .as_str()
                .unwrap()
                .contains("first 2 of 10")
        );
        assert_eq!(entry["timings"]["wait"], 2.0);
    }

    #[test]
    fn binary_bodies_are_base64() {
        let har = Har::from_exchanges([&exchange(vec![0xff, 0, 1])], &Redaction::default());
        let post = har.log.entries[0].request.post_data.as_ref().unwrap();
        assert_eq!(post.text, "/wAB");
        assert_eq!(post.encoding.as_deref(), Some("base64"));
    }
}
