//! Fuzzes graft's HTTP filters. The first byte picks where the filter comes from:
//! a postcard-encoded `HttpFilterSpec` (as a `Subscribe` frame carries it to the
//! agent), rules written as text (one per line, `h:`/`p:`/`m:`/`b:`/`j:` then the
//! pattern, as the flags give them; `j:` takes `POINTER=VALUE`), or an
//! `[incoming.filter]` table of `graft.toml`. Each spec that compiles is matched
//! against a fixed request, without a body and with fixed JSON, non-JSON,
//! deeply nested and invalid UTF-8 bodies. Refusals are fine; panics, and
//! compiles that blow the memory limit, are not.
#![no_main]

use graft_config::FilterFile;
use graft_filter::{HttpFilter, RequestBody, parse_json_rule};
use graft_protocol::incoming::{Combine, FilterRule, HttpFilterSpec};
use http::{HeaderValue, Request};
use libfuzzer_sys::fuzz_target;

fn check(spec: &HttpFilterSpec) {
    let Ok(filter) = HttpFilter::compile(spec) else {
        return;
    };
    let mut request = Request::builder()
        .method("POST")
        .uri("http://api.example.com/api/v1/users/42?id=7&x=%ff")
        .header("host", "api.example.com")
        .header("x-user", "Alice")
        .header("content-type", "application/json")
        .header("cookie", "session=abc; theme=dark")
        .body(())
        .expect("the fixed request is valid");
    request.headers_mut().insert(
        "x-binary",
        HeaderValue::from_bytes(b"a\xff\xfeb").expect("obs-text is a valid header value"),
    );
    let (parts, ()) = request.into_parts();
    let hit = filter.matches(&parts.method, &parts.uri, &parts.headers);
    // Matching is a pure function of the request.
    assert_eq!(
        hit,
        filter.matches(&parts.method, &parts.uri, &parts.headers)
    );
    assert_eq!(filter.spec(), spec);
    let deep = "[".repeat(4096);
    let bodies: [&[u8]; 5] = [
        br#"{"user":{"id":42,"name":"alice"},"tags":["a","b"]}"#,
        b"user=alice&id=42",
        deep.as_bytes(),
        b"{\"a\":\"\xff\xfe\"}",
        b"",
    ];
    for bytes in bodies {
        let body = RequestBody::complete(bytes);
        let hit = filter.matches_request(&parts.method, &parts.uri, &parts.headers, &body);
        assert_eq!(
            hit,
            filter.matches_request(&parts.method, &parts.uri, &parts.headers, &body)
        );
        if let Some(decided) = filter.decide_head(&parts.method, &parts.uri, &parts.headers) {
            assert_eq!(decided, hit, "the head decided otherwise than the whole request");
        }
    }
}

fn text_spec(text: &str, combine: Combine) -> HttpFilterSpec {
    let rules = text
        .lines()
        .filter_map(|line| {
            let (kind, pattern) = line.split_at_checked(2)?;
            Some(match kind {
                "h:" => FilterRule::Header(pattern.to_owned()),
                "p:" => FilterRule::Path(pattern.to_owned()),
                "b:" => FilterRule::Body {
                    regex: pattern.to_owned(),
                    limit: 1024,
                },
                "j:" => {
                    let (pointer, value) = parse_json_rule(pattern).ok()?;
                    FilterRule::Json {
                        pointer,
                        value,
                        limit: 1024,
                    }
                }
                _ => FilterRule::Method(pattern.to_owned()),
            })
        })
        .collect();
    HttpFilterSpec { combine, rules }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(spec) = postcard::from_bytes::<HttpFilterSpec>(rest) {
                check(&spec);
            }
        }
        1 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            let combine = if which & 0x80 == 0 {
                Combine::AllOf
            } else {
                Combine::AnyOf
            };
            check(&text_spec(text, combine));
        }
        _ => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(file) = toml::from_str::<FilterFile>(text)
                && let Ok(spec) = file.to_spec()
            {
                check(&spec);
            }
        }
    }
});
