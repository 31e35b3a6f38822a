//! Selectors, query strings and generated names: label and field selector
//! matching as the API server does it, percent-decoding of query parameters,
//! object UIDs and RFC 3339 timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The decoded value of `key` in a query string.
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| percent_decode(k) == key)
        .map(|(_, v)| percent_decode(v))
}

pub(super) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits on commas outside parentheses.
pub(super) fn split_terms(selector: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    terms.push(current);
    terms
        .into_iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

pub(super) fn labels_match(labels: &Value, selector: &str) -> Result<bool, String> {
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    for term in split_terms(selector) {
        let set = |rest: &str| -> Result<Vec<String>, String> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("unable to parse requirement: {term}"))?;
            Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
        };
        let matched = if let Some((k, rest)) = term.split_once(" notin ") {
            let values = set(rest)?;
            label(k.trim()).is_none_or(|v| !values.iter().any(|x| x == v))
        } else if let Some((k, rest)) = term.split_once(" in ") {
            let values = set(rest)?;
            label(k.trim()).is_some_and(|v| values.iter().any(|x| x == v))
        } else if let Some((k, v)) = term.split_once("!=") {
            label(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            label(k.trim()) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            label(k.trim()).is_none()
        } else {
            label(&term).is_some()
        };
        if !matched {
            return Ok(false);
        }
    }
    Ok(true)
}

pub(super) fn fields_match(object: &Value, selector: &str) -> Result<bool, String> {
    for term in split_terms(selector) {
        let (path, want, equal) = if let Some((p, v)) = term.split_once("!=") {
            (p, v, false)
        } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (p, v, true)
        } else {
            return Err(format!("invalid field selector: {term}"));
        };
        let mut value = object;
        for part in path.trim().split('.') {
            value = &value[part];
        }
        let have = match value {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        if (have == want.trim()) != equal {
            return Ok(false);
        }
    }
    Ok(true)
}

pub(super) fn random_hex(bytes: usize) -> String {
    graft_protocol::secret::random_hex(bytes).expect("the kernel's random source works")
}

pub(super) fn uid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// `2026-01-02T03:04:05Z` (RFC 3339, whole seconds, as the API server writes).
pub(super) fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    jiff::Timestamp::from_second(secs)
        .expect("a time after the epoch is a valid timestamp")
        .to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    #[test]
    fn selectors() {
        let labels = json!({"app": "api", "tier": "web"});
        assert!(labels_match(&labels, "app=api").unwrap());
        assert!(labels_match(&labels, "app==api,tier").unwrap());
        assert!(!labels_match(&labels, "app=api,tier!=web").unwrap());
        assert!(labels_match(&labels, "tier in (web, db),!missing").unwrap());
        assert!(!labels_match(&labels, "app notin (api)").unwrap());
        let pod = json!({"metadata": {"name": "p"}, "involvedObject": {"kind": "Pod"}});
        assert!(fields_match(&pod, "metadata.name=p").unwrap());
        assert!(!fields_match(&pod, "metadata.name=q").unwrap());
        assert!(fields_match(&pod, "involvedObject.kind=Pod,spec.nodeName=").unwrap());
    }

    #[test]
    fn queries_and_times() {
        let q = "labelSelector=app%3Dapi&watch=true&x";
        assert_eq!(query_param(q, "labelSelector").as_deref(), Some("app=api"));
        assert_eq!(query_param(q, "watch").as_deref(), Some("true"));
        assert_eq!(query_param(q, "x").as_deref(), Some(""));
        assert_eq!(query_param(q, "y"), None);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_767_323_045)),
            "2026-01-02T03:04:05Z"
        );
    }
}
