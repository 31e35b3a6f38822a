//! A program that listens on one of the machine's own addresses (`--bind
//! 192.168.1.5`), not on a loopback or wildcard one. The proxy connects to it
//! from that address, and the layer's `accept` hook must still take those
//! connections for graft's: it used to serve them as a remote client's, so a
//! stolen connection hung, a filtered steal's matching request got no answer and
//! the mirror's copies never arrived. The unfiltered steal is in `steal.rs`.
//!
//! CMD is `named_http.py` bound to the bed's host address (198.18.N.1, the
//! host's end of the target's link, `NAMED_HTTP_BIND`); the target's server is
//! another `named_http.py` in the target's namespace on [`Bed::map_port`].

use std::process::Command;
use std::time::Duration;

use graft_tests::{Bed, Proc, STEAL_TIMEOUT, fixture_str, python, wait_until};

/// `curl` of the target's `port` with the header lines `headers`: the first word
/// of the body, the name of the server that answered ("" on failure).
fn served_by(bed: &Bed, port: u16, path: &str, headers: &[&str]) -> String {
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--noproxy", "*", "--max-time", "3"]);
    for header in headers {
        curl.args(["-H", header]);
    }
    curl.arg(format!("http://{}:{port}{path}", bed.target_v4));
    curl.output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// `named_http.py target PORT`, the target's server on [`Bed::map_port`].
fn serve_target(bed: &Bed) -> Proc {
    let app = fixture_str("named_http.py");
    bed.serve_in_target(&[
        python().to_owned(),
        app,
        "target".into(),
        bed.map_port.to_string(),
    ])
}

/// `graft run FLAGS -- named_http.py local PORT`, CMD bound to the host's address.
fn start_bound(bed: &Bed, flags: &[&str]) -> Proc {
    let app = fixture_str("named_http.py");
    let port = bed.map_port.to_string();
    let mut command = bed.graft_run(flags, &[python(), &app, "local", &port]);
    command.env("NAMED_HTTP_BIND", bed.host_v4.to_string());
    bed.spawn(
        command,
        &format!(
            "graft run {} -- named_http.py bound to {}",
            flags.join(" "),
            bed.host_v4
        ),
    )
}

#[test]
fn a_filtered_steal_reaches_a_cmd_bound_to_this_machines_address() {
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = serve_target(&bed);
    let session = start_bound(&bed, &["--steal", "--filter-header", "x-user: alice"]);
    let routed = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        (served_by(&bed, port, "/probe", &["x-user: alice"]) == "local").then_some(())
    });
    assert!(
        routed.is_some(),
        "alice's requests did not reach CMD (last: {:?})\n{}",
        served_by(&bed, port, "/probe", &["x-user: alice"]),
        session.output_report()
    );
    for _ in 0..3 {
        assert_eq!(served_by(&bed, port, "/a", &["x-user: alice"]), "local");
        assert_eq!(served_by(&bed, port, "/b", &["x-user: bob"]), "target");
    }
}

#[test]
fn the_mirror_reaches_a_cmd_bound_to_this_machines_address() {
    let bed = Bed::new();
    let port = bed.map_port;
    let _target = serve_target(&bed);
    let session = start_bound(&bed, &["--mirror"]);
    let mut i = 0;
    let copied = wait_until(STEAL_TIMEOUT, Duration::from_millis(200), || {
        i += 1;
        let path = format!("/copy{i}");
        assert_eq!(served_by(&bed, port, &path, &[]), "target");
        session
            .stdout()
            .contains(&format!("request local GET {path} "))
            .then_some(())
    });
    assert!(
        copied.is_some(),
        "no request to the target was copied to CMD\n{}",
        session.output_report()
    );
}
