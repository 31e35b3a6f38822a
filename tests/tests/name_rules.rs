//! Issue 12, outgoing and DNS rules by name: `--outgoing-local` /
//! `--outgoing-remote` (`[outgoing] local/remote`) with names, `*.domain`,
//! ports and `tcp://`/`udp://`, and `--dns-local` / `--dns-remote` (`[dns]`),
//! on real programs (curl, python, getent) under the layer and under
//! `--isolate` (the netstack), both deciding with `graft_config::outgoing`.
//!
//! The bed's service (`svc.graft.test`, `only-target.graft.test`) is reachable
//! and resolvable only from the target: reaching it shows the connection went
//! through the target, failing shows it stayed on this machine.

use graft_tests::{Bed, Outcome};

fn curl(bed: &Bed, flags: &[&str], url: &str) -> Outcome {
    bed.run(flags, &["curl", "-sS", "--max-time", "5", url])
}

fn assert_reached(bed: &Bed, out: &Outcome, why: &str) {
    assert!(out.success(), "{why}: the service was not reached:\n{out}");
    assert_eq!(out.out(), bed.service_reply(), "{why}");
}

fn assert_kept_local(out: &Outcome, why: &str) {
    assert!(!out.success(), "{why}: the service was reached:\n{out}");
    assert!(!out.stdout.contains("svc"), "{why}: {out}");
}

#[test]
fn outgoing_rules_by_name_port_and_protocol_decide_each_connection() {
    let bed = Bed::new();
    let url = "http://svc.graft.test/";
    for isolate in [false, true] {
        let with = |flags: &[&str]| {
            let mut all: Vec<&str> = flags.to_vec();
            if isolate {
                all.push("--isolate");
            }
            curl(&bed, &all, url)
        };
        let scope = if isolate { "isolated" } else { "layer" };
        // The name resolved through the target decides the connection.
        let out = with(&["--outgoing-local", "svc.graft.test"]);
        assert_kept_local(&out, &format!("{scope}: --outgoing-local svc.graft.test"));
        let out = with(&["--outgoing-local", "*.graft.test:80"]);
        assert_kept_local(&out, &format!("{scope}: --outgoing-local *.graft.test:80"));
        // Another port, another protocol, another name: not matched.
        let out = with(&["--outgoing-local", "svc.graft.test:81"]);
        assert_reached(
            &bed,
            &out,
            &format!("{scope}: --outgoing-local svc.graft.test:81"),
        );
        let out = with(&["--outgoing-local", "udp://svc.graft.test"]);
        assert_reached(
            &bed,
            &out,
            &format!("{scope}: --outgoing-local udp://svc.graft.test"),
        );
        // Only what `--outgoing-remote` names goes through the target.
        let out = with(&["--outgoing-remote", "tcp://*.graft.test"]);
        assert_reached(
            &bed,
            &out,
            &format!("{scope}: --outgoing-remote tcp://*.graft.test"),
        );
        let out = with(&["--outgoing-remote", "db.elsewhere.example"]);
        assert_kept_local(
            &out,
            &format!("{scope}: --outgoing-remote db.elsewhere.example"),
        );
        // `local` wins over `remote`.
        let out = with(&[
            "--outgoing-remote",
            "*.graft.test",
            "--outgoing-local",
            "svc.graft.test",
        ]);
        assert_kept_local(&out, &format!("{scope}: local wins over remote"));
    }
}

#[test]
fn dns_rules_pick_the_resolver_for_each_name() {
    let bed = Bed::new();
    let service = bed.service_v4.to_string();
    let resolve = |flags: &[&str]| {
        bed.run_py(
            flags,
            "net_client.py",
            &["resolve", "only-target.graft.test", "4"],
        )
    };
    assert_eq!(resolve(&[]).assert_success().out(), service);
    // Resolved on this machine, which does not know the name.
    let out = resolve(&["--dns-local", "*.graft.test"]);
    assert!(
        !out.success(),
        "--dns-local: the target resolved it:\n{out}"
    );
    let out = resolve(&["--dns-remote", "other.example"]);
    assert!(
        !out.success(),
        "--dns-remote other.example: the target resolved it:\n{out}"
    );
    let out = resolve(&["--dns-remote", "*.graft.test"]);
    assert_eq!(out.assert_success().out(), service);
    // getent (glibc's getaddrinfo) and an isolated curl follow the same rules.
    let out = bed.run(
        &["--dns-remote", "only-target.graft.test"],
        &["getent", "ahostsv4", "only-target.graft.test"],
    );
    assert!(out.assert_success().out().contains(&service), "{out}");
    let out = bed.run(
        &["--dns-local", "only-target.graft.test"],
        &["getent", "ahostsv4", "only-target.graft.test"],
    );
    assert!(
        !out.success(),
        "getent --dns-local: the target resolved it:\n{out}"
    );
    let out = curl(
        &bed,
        &["--isolate", "--dns-local", "*.graft.test"],
        "http://svc.graft.test/",
    );
    assert!(
        !out.success(),
        "isolated --dns-local: the target resolved it:\n{out}"
    );
    let out = curl(
        &bed,
        &["--isolate", "--dns-remote", "svc.graft.test"],
        "http://svc.graft.test/",
    );
    assert_reached(&bed, &out, "isolated --dns-remote svc.graft.test");
}

#[test]
fn name_rules_from_graft_toml_are_used() {
    let bed = Bed::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("graft.toml");
    std::fs::write(
        &file,
        "[outgoing]\nlocal = [\"svc.graft.test:80\"]\n[dns]\nremote = [\"*.graft.test\"]\n",
    )
    .unwrap();
    let config = file.display().to_string();
    let out = curl(&bed, &["--config", &config], "http://svc.graft.test/");
    assert_kept_local(&out, "graft.toml [outgoing] local");
    std::fs::write(&file, "[dns]\nlocal = [\"svc.graft.test\"]\n").unwrap();
    let out = curl(&bed, &["--config", &config], "http://svc.graft.test/");
    assert!(
        !out.success(),
        "graft.toml [dns] local: the target resolved it:\n{out}"
    );
    std::fs::write(&file, "[dns]\nlocal = [\"not a name\"]\n").unwrap();
    let out = curl(&bed, &["--config", &config], "http://svc.graft.test/");
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(out.stderr.contains("\"not a name\" is not a name"), "{out}");
}
