//! Issue 10, names fail as fast as the target's own resolver: the same look-up
//! (`getent ahosts NAME`) runs inside the target's namespaces, with the target's
//! glibc, and under graft, with the same `resolv.conf` in the target; both must
//! give the same answer or the same failure, and graft must take at most about
//! twice as long (a generous functional bound, not a benchmark).
//!
//! The `resolv.conf` cases: a name server that answers ICMP port unreachable
//! (glibc fails at once; graft used to wait for its whole timeout), one that never
//! answers (`timeout`, `attempts`), the search list under several `ndots`, and a
//! dead first server with and without `rotate`.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use graft_tests::{Bed, Outcome};

/// Times `getent ahosts "$1"` and prints `rc=CODE ms=MILLISECONDS` after its
/// output.
const TIMED_GETENT: &str = "s=$(date +%s%N); getent ahosts \"$1\"; r=$?; e=$(date +%s%N); \
                            echo \"rc=$r ms=$(( (e - s) / 1000000 ))\"";

/// What one look-up gave.
#[derive(Debug)]
struct Lookup {
    /// getent's exit code: 0 found, 2 not found or failed.
    code: i32,
    /// The addresses, without duplicates.
    addrs: BTreeSet<String>,
    /// How long it took, in milliseconds.
    ms: u64,
}

fn parse(out: &Outcome) -> Lookup {
    let text = out.assert_success().out();
    let last = text
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no timing line:\n{out}"));
    let mut code = None;
    let mut ms = None;
    for field in last.split_whitespace() {
        if let Some(v) = field.strip_prefix("rc=") {
            code = v.parse().ok();
        } else if let Some(v) = field.strip_prefix("ms=") {
            ms = v.parse().ok();
        }
    }
    let addrs = text
        .lines()
        .filter(|l| !l.starts_with("rc="))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    Lookup {
        code: code.unwrap_or_else(|| panic!("no rc= in {last:?}:\n{out}")),
        addrs,
        ms: ms.unwrap_or_else(|| panic!("no ms= in {last:?}:\n{out}")),
    }
}

/// Sets the target's `resolv.conf` (a bind mount of the bed's file, so the
/// target sees the change at once) and looks `name` up both ways.
fn both_ways(bed: &Bed, resolv_conf: &str, name: &str) -> (Lookup, Lookup) {
    std::fs::write(bed.dir.join("resolv.conf"), resolv_conf).unwrap();
    let target = parse(&bed.in_target(&["sh", "-c", TIMED_GETENT, "sh", name]));
    let graft = parse(&bed.run(&[], &["sh", "-c", TIMED_GETENT, "sh", name]));
    (target, graft)
}

/// Asserts that graft gave the target's answer (or failure) within twice the
/// target's time, plus `slack_ms` for what a session adds to one look-up.
fn assert_same(bed: &Bed, resolv_conf: &str, name: &str, slack_ms: u64) -> (Lookup, Lookup) {
    let (target, graft) = both_ways(bed, resolv_conf, name);
    let case = format!("{name} with\n{resolv_conf}");
    assert_eq!(
        graft.code, target.code,
        "{case}\ntarget {target:?}\ngraft {graft:?}"
    );
    assert_eq!(graft.addrs, target.addrs, "{case}");
    assert!(
        graft.ms <= 2 * target.ms + slack_ms,
        "{case}\ngraft took {} ms, the target's glibc {} ms",
        graft.ms,
        target.ms
    );
    (target, graft)
}

#[test]
fn an_unreachable_name_server_fails_as_fast_as_in_the_target() {
    let bed = Bed::new();
    // Nothing listens on the target's 127.0.0.1:53: the kernel answers port
    // unreachable. Default timeout (5 s) and attempts (2): a resolver that waits
    // for its timeout takes 10 s or more per name.
    let conf = "nameserver 127.0.0.1\nsearch graft.test\n";
    for name in ["svc", "svc.graft.test", "nowhere.example"] {
        let (target, graft) = assert_same(&bed, conf, name, 1000);
        assert_eq!(target.code, 2, "the target's glibc resolved {name}");
        assert!(graft.ms < 3000, "{name}: graft took {} ms", graft.ms);
    }
}

/// A UDP "name server" on the target's 127.0.0.53:53 that reads every query and
/// answers none.
const SILENT_SERVER: &str = "import socket\n\
                             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                             s.bind(('127.0.0.53', 53))\n\
                             print('listening', flush=True)\n\
                             while True:\n    s.recvfrom(4096)\n";

#[test]
fn a_silent_name_server_is_given_the_timeout_and_attempts_of_resolv_conf() {
    let bed = Bed::new();
    let mut command = Command::new("nsenter");
    command
        .args(["-t", &bed.target_pid.to_string(), "-n", "--"])
        .args([graft_tests::python(), "-c", SILENT_SERVER]);
    let server = bed.spawn(command, "silent name server");
    graft_tests::wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        server.stdout().contains("listening").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the silent server did not start\n{}",
            server.output_report()
        )
    });
    let conf = "nameserver 127.0.0.53\noptions timeout:1 attempts:2\n";
    let (target, graft) = assert_same(&bed, conf, "svc.graft.test", 1000);
    assert_eq!(target.code, 2);
    // Not given up early either: at least half the target's wait.
    assert!(
        2 * graft.ms + 500 >= target.ms,
        "graft gave up after {} ms, the target's glibc after {} ms",
        graft.ms,
        target.ms
    );
}

#[test]
fn the_search_list_and_ndots_pick_the_same_names_as_glibc() {
    let bed = Bed::new();
    for ndots in [0, 1, 2, 4] {
        let conf = format!(
            "nameserver {}\nsearch corp.example.com graft.test\noptions ndots:{ndots} timeout:1\n",
            bed.service_v4
        );
        for name in ["svc", "svc.graft.test", "svc.graft.test.", "nowhere"] {
            assert_same(&bed, &conf, name, 1500);
        }
    }
}

#[test]
fn a_dead_first_name_server_with_or_without_rotate_still_answers() {
    let bed = Bed::new();
    for options in ["timeout:1", "rotate timeout:1"] {
        let conf = format!(
            "nameserver 127.0.0.1\nnameserver {}\nsearch graft.test\noptions {options}\n",
            bed.service_v4
        );
        for name in ["svc", "svc.graft.test"] {
            let (target, _) = assert_same(&bed, &conf, name, 1500);
            assert_eq!(target.code, 0, "{name} with {options}: {target:?}");
        }
    }
}

/// A server that resolves its own host name before it serves (as many do), then
/// serves with `http.server`; prints how long the look-up took.
const SELF_RESOLVING_SERVER: &str = "import http.server, socket, sys, time\n\
t = time.monotonic()\n\
try:\n    socket.getaddrinfo(socket.gethostname(), None)\n\
except OSError as e:\n    print('own name not resolved:', e, flush=True)\n\
print('lookup ms', int((time.monotonic() - t) * 1000), flush=True)\n\
s = http.server.HTTPServer(('0.0.0.0', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler)\n\
print('Serving HTTP', flush=True)\n";

#[test]
fn a_python_server_that_resolves_its_own_name_starts_at_once_when_the_name_server_is_unreachable() {
    let bed = Bed::new();
    std::fs::write(
        bed.dir.join("resolv.conf"),
        "nameserver 127.0.0.1\nsearch graft.test\n",
    )
    .unwrap();
    let port = bed.app_port.to_string();
    let command = bed.graft_run(
        &[],
        &[graft_tests::python(), "-c", SELF_RESOLVING_SERVER, &port],
    );
    let mut server = bed.spawn(command, "graft run -- self-resolving http.server");
    let lookup_ms: u64 =
        graft_tests::wait_until(Duration::from_secs(60), Duration::from_millis(50), || {
            if let Some(status) = server.try_status() {
                panic!("the server exited ({status})\n{}", server.output_report());
            }
            let out = server.stdout();
            if !out.contains("Serving HTTP") {
                return None;
            }
            out.lines()
                .find_map(|l| l.strip_prefix("lookup ms ")?.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("the server never served\n{}", server.output_report()));
    // The look-up went to the target's resolver, which cannot answer.
    assert!(
        server.stdout().contains("own name not resolved"),
        "{}",
        server.output_report()
    );
    // A generous bound: waiting for the resolver's timeout (5 s, twice, for two
    // names) takes 20 s.
    assert!(
        lookup_ms < 3000,
        "resolving its own name took {lookup_ms} ms\n{}",
        server.output_report()
    );
}
