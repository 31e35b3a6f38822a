//! HTTP filter micro-benchmarks: matching one realistic request (10 headers)
//! against the filters a user writes (one header rule that hits and one that
//! misses, one path rule, an any-of of three rules), and compiling a filter.
//!
//! Run with `cargo bench -p graft-filter`.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use graft_filter::HttpFilter;
use graft_protocol::incoming::{Combine, FilterRule, HttpFilterSpec};
use http::{HeaderMap, HeaderValue, Method, Uri};

fn request() -> (Method, Uri, HeaderMap) {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "api.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        ("accept", "application/json, text/plain, */*"),
        ("accept-language", "en-GB,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        (
            "authorization",
            "Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.e30.c2lnbmF0dXJl",
        ),
        ("content-type", "application/json"),
        ("x-request-id", "7f1c9a52-3b8e-4d7a-9a0f-2f1de2c6b8a1"),
        ("x-tenant", "acme"),
        ("cookie", "session=abc123; theme=dark; lang=en"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    let uri = "/api/v1/users/42/orders?limit=20&offset=40"
        .parse()
        .unwrap();
    (Method::GET, uri, headers)
}

fn filter(combine: Combine, rules: Vec<FilterRule>) -> HttpFilter {
    HttpFilter::compile(&HttpFilterSpec { combine, rules }).unwrap()
}

fn matching(c: &mut Criterion) {
    let (method, uri, headers) = request();
    let mut group = c.benchmark_group("match");
    let cases = [
        (
            "header hit",
            filter(
                Combine::AllOf,
                vec![FilterRule::Header("^x-tenant: acme$".into())],
            ),
        ),
        (
            "header miss",
            filter(
                Combine::AllOf,
                vec![FilterRule::Header("^x-user: alice$".into())],
            ),
        ),
        (
            "path",
            filter(
                Combine::AllOf,
                vec![FilterRule::Path(r"^/api/v1/users/\d+/".into())],
            ),
        ),
        (
            "any-of 3 (last hits)",
            filter(
                Combine::AnyOf,
                vec![
                    FilterRule::Method("POST".into()),
                    FilterRule::Path("^/admin/".into()),
                    FilterRule::Header("^cookie: .*session=".into()),
                ],
            ),
        ),
    ];
    for (name, f) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| {
                black_box(f.matches(black_box(&method), black_box(&uri), black_box(&headers)))
            })
        });
    }
    group.finish();
}

fn compiling(c: &mut Criterion) {
    let spec = HttpFilterSpec {
        combine: Combine::AllOf,
        rules: vec![
            FilterRule::Method("GET".into()),
            FilterRule::Path(r"^/api/v1/users/\d+/".into()),
            FilterRule::Header("^x-tenant: (acme|globex)$".into()),
        ],
    };
    c.bench_function("compile 3 rules", |b| {
        b.iter(|| HttpFilter::compile(black_box(&spec)).unwrap())
    });
}

criterion_group!(benches, matching, compiling);
criterion_main!(benches);
