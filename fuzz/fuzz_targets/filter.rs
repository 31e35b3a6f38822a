//! Fuzzes graft's HTTP filters. The first byte picks where the filter comes from:
//! a postcard-encoded `HttpFilterSpec` (as a `Subscribe` frame carries it to the
//! agent), rules written as text (one per line, `h:`/`p:`/`m:` then the pattern,
//! as the flags give them), or an `[incoming.filter]` table of `graft.toml`. Each
//! spec that compiles is matched against a fixed request. Refusals are fine;
//! panics, and compiles that blow the memory limit, are not.
#![no_main]

use graft_config::FilterFile;
use graft_filter::HttpFilter;
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
}

fn text_spec(text: &str, combine: Combine) -> HttpFilterSpec {
    let rules = text
        .lines()
        .filter_map(|line| {
            let (kind, pattern) = line.split_at_checked(2)?;
            Some(match kind {
                "h:" => FilterRule::Header(pattern.to_owned()),
                "p:" => FilterRule::Path(pattern.to_owned()),
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
