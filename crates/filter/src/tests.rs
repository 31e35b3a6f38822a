use super::*;
use http::HeaderName;

fn spec(combine: Combine, rules: Vec<FilterRule>) -> HttpFilterSpec {
    HttpFilterSpec { combine, rules }
}

fn all(rules: Vec<FilterRule>) -> HttpFilter {
    HttpFilter::compile(&spec(Combine::AllOf, rules)).unwrap()
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(n, v)| {
            (
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            )
        })
        .collect()
}

fn get(uri: &str, h: &HeaderMap, f: &HttpFilter) -> bool {
    f.matches(&Method::GET, &uri.parse().unwrap(), h)
}

#[test]
fn header_name_is_matched_case_insensitively() {
    let f = all(vec![FilterRule::Header("^X-User: alice$".into())]);
    assert!(get("/", &headers(&[("x-user", "alice")]), &f));
    assert!(get("/", &headers(&[("X-USER", "ALICE")]), &f));
    assert!(!get("/", &headers(&[("x-other", "alice")]), &f));
}

#[test]
fn header_value_regex_searches_every_line() {
    let f = all(vec![FilterRule::Header(r"^x-tenant: (a|b)\d+$".into())]);
    let h = headers(&[("host", "api"), ("x-tenant", "b42"), ("accept", "*/*")]);
    assert!(get("/", &h, &f));
    assert!(!get("/", &headers(&[("x-tenant", "c42")]), &f));
    assert!(!get("/", &HeaderMap::new(), &f));
}

#[test]
fn case_sensitivity_can_be_turned_back_on() {
    let f = all(vec![FilterRule::Header("x-user: (?-i)Alice".into())]);
    assert!(get("/", &headers(&[("x-user", "Alice")]), &f));
    assert!(!get("/", &headers(&[("x-user", "alice")]), &f));
}

#[test]
fn non_utf8_header_values_match_lossily() {
    let f = all(vec![FilterRule::Header("^x-bin: a\u{FFFD}b$".into())]);
    let mut h = HeaderMap::new();
    h.insert("x-bin", HeaderValue::from_bytes(b"a\xffb").unwrap());
    assert!(get("/", &h, &f));
}

#[test]
fn path_rule_sees_the_query() {
    let f = all(vec![FilterRule::Path(r"^/api/users\?id=7$".into())]);
    let h = HeaderMap::new();
    assert!(get("/api/users?id=7", &h, &f));
    assert!(get("http://example.com/api/users?id=7", &h, &f));
    assert!(!get("/api/users", &h, &f));
    // Path rules are case-sensitive (only header rules are not).
    assert!(!get("/API/users?id=7", &h, &f));
}

#[test]
fn missing_path_is_slash() {
    let f = all(vec![FilterRule::Path("^/$".into())]);
    assert!(get("example.com:443", &HeaderMap::new(), &f));
}

#[test]
fn method_is_exact() {
    let f = all(vec![FilterRule::Method("POST".into())]);
    let (uri, h) = ("/".parse().unwrap(), HeaderMap::new());
    assert!(f.matches(&Method::POST, &uri, &h));
    assert!(!f.matches(&Method::GET, &uri, &h));
    let lower = all(vec![FilterRule::Method("post".into())]);
    assert!(!lower.matches(&Method::POST, &uri, &h));
    let custom = all(vec![FilterRule::Method("PURGE".into())]);
    assert!(custom.matches(&Method::from_bytes(b"PURGE").unwrap(), &uri, &h));
}

#[test]
fn all_of_needs_every_rule_any_of_one() {
    let rules = vec![
        FilterRule::Method("GET".into()),
        FilterRule::Path("^/a".into()),
        FilterRule::Header("^x-user: alice$".into()),
    ];
    let all_of = HttpFilter::compile(&spec(Combine::AllOf, rules.clone())).unwrap();
    let any_of = HttpFilter::compile(&spec(Combine::AnyOf, rules)).unwrap();
    let alice = headers(&[("x-user", "alice")]);
    let bob = headers(&[("x-user", "bob")]);
    assert!(get("/a", &alice, &all_of));
    assert!(!get("/a", &bob, &all_of));
    assert!(!get("/b", &alice, &all_of));
    assert!(get("/b", &alice, &any_of));
    assert!(get("/a", &bob, &any_of));
    let (uri, h) = ("/b".parse().unwrap(), bob);
    assert!(!any_of.matches(&Method::PUT, &uri, &h));
    assert!(any_of.matches(&Method::GET, &uri, &h));
}

#[test]
fn empty_filter_matches_everything() {
    for combine in [Combine::AllOf, Combine::AnyOf] {
        let f = HttpFilter::compile(&spec(combine, vec![])).unwrap();
        assert!(f.matches(&Method::DELETE, &"/x?y".parse().unwrap(), &HeaderMap::new()));
    }
}

#[test]
fn bad_regex_names_the_flag_and_the_problem() {
    let err = HttpFilter::compile(&spec(Combine::AllOf, vec![FilterRule::Header("(".into())]))
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(r#"--filter-header "(": regex parse error"#),
        "{text}"
    );
    assert!(text.contains("unclosed group"), "{text}");
    assert_eq!(err.rule_kind(), Some(RuleKind::Header));
    let err =
        HttpFilter::compile(&spec(Combine::AllOf, vec![FilterRule::Path("[".into())])).unwrap_err();
    assert!(err.to_string().starts_with(r#"--filter-path "[""#), "{err}");
}

#[test]
fn too_large_regex_is_refused() {
    let err = HttpFilter::compile(&spec(
        Combine::AllOf,
        vec![FilterRule::Path(r"\w{1000}{1000}".into())],
    ))
    .unwrap_err();
    assert!(matches!(err, FilterError::Regex { .. }), "{err:?}");
    assert!(err.to_string().contains("too big once compiled"), "{err}");
}

#[test]
fn limits_on_rule_count_and_pattern_length() {
    let many = vec![FilterRule::Method("GET".into()); MAX_RULES + 1];
    assert!(matches!(
        HttpFilter::compile(&spec(Combine::AnyOf, many)),
        Err(FilterError::TooManyRules { count: 65, max: 64 })
    ));
    let long = "a".repeat(MAX_PATTERN_LEN + 1);
    let err = HttpFilter::compile(&spec(Combine::AllOf, vec![FilterRule::Path(long)])).unwrap_err();
    assert!(
        matches!(err, FilterError::TooLong { len: 4097, .. }),
        "{err:?}"
    );
    // The message shows only the start of the pattern.
    assert!(err.to_string().len() < 200, "{err}");
}

#[test]
fn bad_methods_are_refused() {
    for bad in ["", "GE T", "GET\n", "(GET)"] {
        let err = HttpFilter::compile(&spec(Combine::AllOf, vec![FilterRule::Method(bad.into())]))
            .unwrap_err();
        assert!(err.to_string().starts_with("--filter-method"), "{err}");
    }
}

fn flags<'a>(header: &'a [String], path: &'a [String], method: &'a [String]) -> FilterFlags<'a> {
    FilterFlags {
        header,
        path,
        method,
        ..FilterFlags::default()
    }
}

#[test]
fn flags_combine_all_of_and_none_is_no_filter() {
    assert_eq!(from_flags(&FilterFlags::default()).unwrap(), None);
    let spec = from_flags(&flags(&["x-a: 1".into()], &["^/p".into()], &["GET".into()]))
        .unwrap()
        .unwrap();
    assert_eq!(spec.combine, Combine::AllOf);
    assert_eq!(
        spec.rules,
        vec![
            FilterRule::Header("x-a: 1".into()),
            FilterRule::Path("^/p".into()),
            FilterRule::Method("GET".into()),
        ]
    );
    assert!(from_flags(&flags(&[], &["(".into()], &[])).is_err());
    let f = HttpFilter::compile(&spec).unwrap();
    assert_eq!(f.spec(), &spec);
}

#[test]
fn long_header_lines_do_not_pin_the_buffer() {
    let f = all(vec![FilterRule::Header("^x-big: a+$".into())]);
    let big = "a".repeat(KEEP_LINE_CAPACITY * 2);
    assert!(get("/", &headers(&[("x-big", &big)]), &f));
    HEADER_LINE.with_borrow(|line| assert!(line.capacity() <= KEEP_LINE_CAPACITY));
}

fn body_request(f: &HttpFilter, headers_: &HeaderMap, body: &RequestBody<'_>) -> bool {
    f.matches_request(&Method::POST, &"/api".parse().unwrap(), headers_, body)
}

#[test]
fn body_flags_become_rules_with_the_limit() {
    let body = vec!["alice".to_owned()];
    let json = vec!["/user/id=42".to_owned(), "/user/name=bob".to_owned()];
    let spec = from_flags(&FilterFlags {
        body: &body,
        json: &json,
        body_limit: 100,
        ..FilterFlags::default()
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        spec.rules,
        vec![
            FilterRule::Body {
                regex: "alice".into(),
                limit: 100
            },
            FilterRule::Json {
                pointer: "/user/id".into(),
                value: "42".into(),
                limit: 100
            },
            FilterRule::Json {
                pointer: "/user/name".into(),
                value: "\"bob\"".into(),
                limit: 100
            },
        ]
    );
    let f = HttpFilter::compile(&spec).unwrap();
    assert!(f.needs_body());
    assert_eq!(f.body_limit(), 100);
    let h = HeaderMap::new();
    let hit = br#"{"user":{"id":42,"name":"bob"},"who":"alice"}"#;
    assert!(body_request(&f, &h, &RequestBody::complete(hit)));
    let miss = br#"{"user":{"id":43,"name":"bob"},"who":"alice"}"#;
    assert!(!body_request(&f, &h, &RequestBody::complete(miss)));
    let bad = ["nope".to_owned()];
    let err = from_flags(&FilterFlags {
        json: &bad,
        ..FilterFlags::default()
    })
    .unwrap_err();
    assert!(
        err.to_string().starts_with("--filter-json \"nope\""),
        "{err}"
    );
    let err = from_flags(&FilterFlags {
        body: &body,
        body_limit: MAX_BODY_LIMIT + 1,
        ..FilterFlags::default()
    })
    .unwrap_err();
    assert!(matches!(err, FilterError::BodyLimit { .. }), "{err}");
}

#[test]
fn over_limit_bodies_are_routed_by_the_other_rules() {
    let body = |regex: &str| FilterRule::Body {
        regex: regex.into(),
        limit: 8,
    };
    let alice = headers(&[("x-user", "alice")]);
    let bob = headers(&[("x-user", "bob")]);
    let big = RequestBody::complete(b"0123456789 needle");
    let small_hit = RequestBody::complete(b"needle");
    let small_miss = RequestBody::complete(b"hay");

    let all = HttpFilter::compile(&spec(
        Combine::AllOf,
        vec![FilterRule::Header("x-user: alice".into()), body("needle")],
    ))
    .unwrap();
    assert!(body_request(&all, &alice, &small_hit));
    assert!(!body_request(&all, &alice, &small_miss));
    assert!(!body_request(&all, &bob, &small_hit));
    // Over the limit: the header decides.
    assert!(body_request(&all, &alice, &big));
    assert!(!body_request(&all, &bob, &big));
    assert_eq!(
        all.decide_head(&Method::POST, &"/".parse().unwrap(), &bob),
        Some(false)
    );
    assert_eq!(
        all.decide_head(&Method::POST, &"/".parse().unwrap(), &alice),
        None
    );

    // A filter of body rules only takes no over-limit body.
    let only = HttpFilter::compile(&spec(Combine::AllOf, vec![body("needle")])).unwrap();
    assert!(body_request(&only, &bob, &small_hit));
    assert!(!body_request(&only, &bob, &big));
    assert!(!body_request(&only, &bob, &RequestBody::unknown()));

    let any = HttpFilter::compile(&spec(
        Combine::AnyOf,
        vec![FilterRule::Header("x-user: alice".into()), body("needle")],
    ))
    .unwrap();
    assert!(body_request(&any, &bob, &small_hit));
    assert!(!body_request(&any, &bob, &small_miss));
    assert!(!body_request(&any, &bob, &big));
    assert!(body_request(&any, &alice, &big));
    assert_eq!(
        any.decide_head(&Method::GET, &"/".parse().unwrap(), &alice),
        Some(true)
    );
    assert_eq!(
        any.decide_head(&Method::GET, &"/".parse().unwrap(), &bob),
        None
    );
}

#[test]
fn hostile_body_rules_are_refused_cleanly() {
    let huge = FilterRule::Body {
        regex: r"\w{1000}{1000}".into(),
        limit: 1024,
    };
    let err = HttpFilter::compile(&spec(Combine::AllOf, vec![huge])).unwrap_err();
    assert!(err.to_string().starts_with("--filter-body"), "{err}");
    assert!(err.to_string().contains("too big once compiled"), "{err}");
    let long = FilterRule::Body {
        regex: "a".repeat(MAX_PATTERN_LEN + 1),
        limit: 1024,
    };
    assert!(matches!(
        HttpFilter::compile(&spec(Combine::AllOf, vec![long])),
        Err(FilterError::TooLong { .. })
    ));
    let greedy = FilterRule::Json {
        pointer: "/a".into(),
        value: "1".into(),
        limit: u32::MAX,
    };
    assert!(matches!(
        HttpFilter::compile(&spec(Combine::AllOf, vec![greedy])),
        Err(FilterError::BodyLimit { .. })
    ));
}
