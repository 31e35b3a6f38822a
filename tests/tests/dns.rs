//! Item 3 of issue 2, names: getaddrinfo, gethostbyname and their companions
//! resolve with the target's `/etc/hosts` and `/etc/resolv.conf` from the target's
//! network namespace, so names that exist only for the target resolve for CMD —
//! in Python, curl, `getent` and a C program.

use graft_tests::Bed;

#[test]
fn getaddrinfo_resolves_a_name_only_in_the_target_hosts_file() {
    let bed = Bed::new();
    let out = bed.run_py(
        &[],
        "net_client.py",
        &["resolve", "only-target.graft.test", "4"],
    );
    assert_eq!(out.assert_success().out(), bed.service_v4.to_string());
}

#[test]
fn getaddrinfo_resolves_an_ipv6_name_only_in_the_target_hosts_file() {
    let bed = Bed::new();
    let out = bed.run_py(
        &[],
        "net_client.py",
        &["resolve", "only-target6.graft.test", "6"],
    );
    assert_eq!(out.assert_success().out(), bed.service_v6.to_string());
}

#[test]
fn getaddrinfo_resolves_a_name_served_by_the_target_resolver() {
    let bed = Bed::new();
    let out = bed.run_py(&[], "net_client.py", &["resolve", "svc.graft.test", "4"]);
    assert_eq!(out.assert_success().out(), bed.service_v4.to_string());
}

#[test]
fn getaddrinfo_applies_the_target_search_domain() {
    let bed = Bed::new();
    let out = bed.run_py(&[], "net_client.py", &["resolve", "svc", "4"]);
    assert_eq!(out.assert_success().out(), bed.service_v4.to_string());
}

#[test]
fn curl_reaches_the_service_by_a_name_only_the_target_resolves() {
    let bed = Bed::new();
    for name in ["svc.graft.test", "only-target.graft.test"] {
        let url = format!("http://{name}/");
        let out = bed.run(&[], &["curl", "-sS", "--max-time", "10", &url]);
        assert_eq!(out.assert_success().out(), bed.service_reply(), "{url}");
    }
}

#[test]
fn python_urllib_reaches_the_service_by_a_name_only_the_target_resolves() {
    let bed = Bed::new();
    let out = bed.run_py(&[], "net_client.py", &["http", "http://svc.graft.test/"]);
    assert_eq!(out.assert_success().out(), bed.service_reply());
}

#[test]
fn getent_hosts_resolves_target_only_names() {
    let bed = Bed::new();
    let service = bed.service_v4.to_string();
    for name in ["only-target.graft.test", "svc.graft.test"] {
        let out = bed.run(&[], &["getent", "hosts", name]);
        let line = out.assert_success().out();
        assert!(
            line.starts_with(&service) || line.starts_with(&bed.service_v6.to_string()),
            "getent hosts {name}: {out}"
        );
        assert!(line.contains(name), "{out}");
    }
    let out = bed.run(&[], &["getent", "ahostsv4", "only-target.graft.test"]);
    assert!(out.assert_success().out().starts_with(&service), "{out}");
}

#[test]
fn gethostbyname_family_in_a_c_program_resolves_target_only_names() {
    let bed = Bed::new();
    let net = bed.compile("net");
    let service = bed.service_v4.to_string();

    let out = bed.run(&[], &[&net, "resolve", "only-target.graft.test"]);
    let lines = out.assert_success().lines();
    for call in ["gethostbyname", "gethostbyname_r", "getaddrinfo"] {
        let line = format!("{call} {service}");
        assert!(lines.contains(&line.as_str()), "missing {line:?}:\n{out}");
    }

    let out = bed.run(&[], &[&net, "resolve", "only-target6.graft.test"]);
    let line = format!("gethostbyname2-inet6 {}", bed.service_v6);
    assert!(
        out.assert_success().lines().contains(&line.as_str()),
        "missing {line:?}:\n{out}"
    );

    let out = bed.run(&[], &[&net, "resolve", "svc.graft.test"]);
    let line = format!("gethostbyname {service}");
    assert!(
        out.assert_success().lines().contains(&line.as_str()),
        "missing {line:?}:\n{out}"
    );
}

#[test]
fn names_unknown_to_the_target_do_not_resolve() {
    let bed = Bed::new();
    let out = bed.run(&[], &["getent", "hosts", "nowhere.graft.test"]);
    assert_eq!(
        out.code(),
        Some(2),
        "getent found a name nobody knows:\n{out}"
    );
}
