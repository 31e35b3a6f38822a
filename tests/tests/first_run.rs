//! Issue 15, first-run friction: what a new user meets on a first `graft run`.
//!
//! - a `./graft.toml` that graft loads is named on stderr, and every key the
//!   README documents is one graft accepts (the README's example file is the
//!   one loaded here);
//! - a COMMAND that does not exist is refused before any agent is placed, for a
//!   local target and for a Kubernetes one (no cluster is needed to see it);
//! - a refused subscription is reported once, in graft's words (no raw log
//!   line, no colour codes), and graft says when COMMAND then exits because of
//!   it;
//! - the usage line of `graft run` does not show optional flags as required;
//! - a local port CMD asks for that another program holds is said loudly;
//! - "stealing port …" is said once per port, also when CMD listens again.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use graft_tests::{Bed, STEAL_TIMEOUT, fixture_str, graft_bin, python, wait_until};
use nix::sys::signal::Signal;

/// The `graft.toml` example of the README (the block after "**`graft.toml`.**").
fn readme_example() -> String {
    let readme = std::fs::read_to_string(graft_tests::package_dir().join("../README.md"))
        .expect("the README");
    let section = readme
        .split_once("**`graft.toml`.**")
        .expect("the README documents graft.toml")
        .1;
    let block = section.split_once("```toml\n").expect("with an example").1;
    block
        .split_once("```")
        .expect("a closed block")
        .0
        .to_owned()
}

#[test]
fn a_graft_toml_in_the_working_directory_is_named_and_every_documented_key_is_accepted() {
    let bed = Bed::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("graft.toml");
    std::fs::write(&file, readme_example()).unwrap();
    // The files `[incoming.tls]` names, a real certificate and key.
    let pki = graft_tests::pki::Pki::new(None);
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::copy(pki.path("server.crt"), dir.path().join("certs/api.crt")).unwrap();
    std::fs::copy(pki.path("server.key"), dir.path().join("certs/api.key")).unwrap();
    let mut command = bed.graft_run(&[], &["true"]);
    command.current_dir(dir.path());
    let out = bed.finish(
        bed.spawn(command, "graft run -- true"),
        Duration::from_secs(60),
    );
    out.assert_success();
    let shown = std::fs::canonicalize(&file).unwrap();
    assert!(
        out.stderr
            .contains(&format!("graft: using {} ", shown.display())),
        "graft did not say it loaded {}\n{out}",
        shown.display()
    );

    // The other filter shapes the example shows in comments load too.
    let example = readme_example();
    for shape in ["# all_of = ", "# any_of = "] {
        let variant: String = example
            .lines()
            .filter(|l| {
                !["header = ", "path = ", "method = ", "body = ", "json = "]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .map(|l| {
                l.strip_prefix(shape).map_or(l.to_owned(), |rest| {
                    format!("{} = {rest}", &shape[2..shape.len() - 3])
                })
            })
            .map(|l| l + "\n")
            .collect();
        assert!(variant.contains(&shape[2..]), "{variant}");
        std::fs::write(&file, &variant).unwrap();
        let mut command = bed.graft_run(&[], &["true"]);
        command.current_dir(dir.path());
        let out = bed.finish(
            bed.spawn(command, "graft run -- true"),
            Duration::from_secs(60),
        );
        assert!(out.success(), "{variant}\n{out}");
    }

    // No file, no line.
    let out = bed.run(&[], &["true"]);
    out.assert_success();
    assert!(!out.stderr.contains("graft: using"), "{out}");
}

#[test]
fn a_missing_command_is_refused_before_any_agent_is_placed() {
    let bed = Bed::new();
    for program in ["graft-no-such-program", "./no/such/program"] {
        let out = bed.run(&[], &[program, "--flag"]);
        assert_eq!(out.code(), Some(2), "{out}");
        assert!(
            out.stderr
                .contains(&format!("graft: error: cannot run {program}")),
            "{out}"
        );
        assert!(
            !out.stderr.contains("agent ready"),
            "an agent was started\n{out}"
        );
        assert!(bed.agent_pids().is_empty(), "an agent runs\n{out}");
    }
    // A Kubernetes target: refused before graft even looks for a cluster.
    let out = bed.finish(
        bed.spawn(
            bed.graft(&[
                "run",
                "--target",
                "deploy/api",
                "--kubeconfig",
                "/nonexistent/kubeconfig",
                "--",
                "graft-no-such-program",
            ]),
            "graft run --target deploy/api -- graft-no-such-program",
        ),
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("cannot run graft-no-such-program: command not found in PATH"),
        "{out}"
    );
    assert!(!out.stderr.contains("kubeconfig"), "{out}");
}

#[test]
fn a_refused_port_is_reported_once_in_graft_words_and_the_exit_is_explained() {
    let bed = Bed::new();
    let port = bed.map_port;
    let named_http = |name: &str, port: u16| {
        vec![
            python().to_owned(),
            fixture_str("named_http.py"),
            name.to_owned(),
            port.to_string(),
        ]
    };
    let holder_cmd = named_http("holder", port);
    let holder_args: Vec<&str> = holder_cmd.iter().map(String::as_str).collect();
    let mut holder = bed.spawn(bed.graft_run(&["--steal"], &holder_args), "holder");
    let addr = SocketAddr::from((bed.target_v4, port));
    let held = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        assert!(holder.try_status().is_none(), "{}", holder.output_report());
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        std::io::Write::write_all(&mut stream, b"GET /p HTTP/1.0\r\n\r\n").ok()?;
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut stream, &mut answer).ok()?;
        answer.contains("x-served-by: holder").then_some(())
    });
    assert!(held.is_some(), "{}", holder.output_report());

    // A second unfiltered steal of the port: refused; the program's listen
    // fails and it exits.
    let map = format!("{}:{port}", bed.app_port);
    let intruder_cmd = named_http("intruder", bed.app_port);
    let intruder_args: Vec<&str> = intruder_cmd.iter().map(String::as_str).collect();
    let mut command = bed.graft_run(&["--steal", "--port-map", &map], &intruder_args);
    command.env_remove("GRAFT_LOG");
    let out = bed.finish(bed.spawn(command, "intruder"), Duration::from_secs(60));
    let refusal = format!("graft: port {port}: port {port} is already stolen by");
    assert_eq!(
        out.stderr.matches(&refusal).count(),
        1,
        "the refusal is not reported exactly once\n{out}"
    );
    assert!(!out.stderr.contains("WARN"), "a raw log line\n{out}");
    assert!(!out.stderr.contains('\u{1b}'), "colour codes\n{out}");
    let code = out.code().expect("the program exited");
    assert_ne!(code, 0, "{out}");
    assert!(
        out.stderr.contains(&format!(
            "graft: CMD exited with code {code} after the target's port {port} was refused to it"
        )),
        "{out}"
    );
    holder.signal(Signal::SIGTERM);
    assert!(holder.wait_timeout(Duration::from_secs(10)).is_some());
}

#[test]
fn the_usage_line_of_graft_run_shows_no_optional_flag_as_required() {
    let out = Command::new(graft_bin())
        .args(["run", "--namespace", "shop", "--target", "deploy/api"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let usage = stderr
        .lines()
        .find(|l| l.starts_with("Usage:"))
        .unwrap_or_else(|| panic!("no usage line\n{stderr}"));
    assert_eq!(
        usage, "Usage: graft run [OPTIONS] [--] <CMD>...",
        "{stderr}"
    );
}

#[test]
fn a_busy_local_port_is_said_loudly_and_the_steal_still_works() {
    let bed = Bed::new();
    // Another program of this machine holds the port CMD asks for.
    let _other = std::net::TcpListener::bind(("0.0.0.0", bed.app_port)).unwrap();
    let url = bed.target_url(bed.app_port);
    let (mut session, reply) = bed.steal(&[], bed.app_port, &url);
    assert!(reply.starts_with("local"), "{reply}");
    let warning = format!(
        "graft: warning: port {} is busy on this machine",
        bed.app_port
    );
    let said = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        session.stderr().contains(&warning).then_some(())
    });
    assert!(said.is_some(), "no warning\n{}", session.output_report());
    assert_eq!(session.stderr().matches(&warning).count(), 1);
    session.signal(Signal::SIGTERM);
    assert!(session.wait_timeout(Duration::from_secs(10)).is_some());
}

/// A server that answers one request, closes its listener, listens again on the
/// same port and answers one more (a dev server's reload does that).
const RELISTEN_APP: &str = r#"
import http.server, sys
port = int(sys.argv[1])
class Local(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"local\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
for _ in range(2):
    server = http.server.HTTPServer(("0.0.0.0", port), Local)
    server.handle_request()
    server.server_close()
"#;

#[test]
fn stealing_a_port_is_said_once_when_cmd_listens_again() {
    let bed = Bed::new();
    let port = bed.app_port.to_string();
    let url = bed.target_url(bed.app_port);
    let command = bed.graft_run(&["--steal"], &[python(), "-c", RELISTEN_APP, &port]);
    let mut session = bed.spawn(command, "graft run --steal -- python relisten");
    for round in 1..=2 {
        let reply = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
            graft_tests::curl(&url)
                .ok()
                .filter(|body| body.starts_with("local"))
        });
        assert!(
            reply.is_some(),
            "round {round}: the local server was not reached\n{}",
            session.output_report()
        );
    }
    let status = session.wait_timeout(Duration::from_secs(10));
    assert!(status.is_some(), "{}", session.output_report());
    let line = format!("graft: stealing port {port} of the target");
    assert_eq!(
        session.stderr().matches(&line).count(),
        1,
        "{}",
        session.output_report()
    );
}
