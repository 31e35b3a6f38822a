//! Item 6 of issue 2, programs as they are: forked and exec'd children keep the
//! layer, threads, non-blocking sockets under epoll/poll/select, dup2/dup3, and
//! getpeername/getsockname/accept report the addresses the program expects — in
//! Python, shell tools and a dynamically linked C program, unchanged.

use graft_tests::Bed;

#[test]
fn forked_child_connections_leave_from_the_target() {
    let bed = Bed::new();
    let out = bed.run_py(&[], "net_client.py", &["fork", &bed.service_url()]);
    let mut lines = out.assert_success().lines();
    lines.sort_unstable();
    let reply = bed.service_reply();
    assert_eq!(
        lines,
        [format!("child: {reply}"), format!("parent: {reply}")]
    );
}

#[test]
fn exec_children_keep_the_layer() {
    let bed = Bed::new();
    // sh execs curl, cat and getent: each must still reach the target.
    let script = format!(
        "curl -sS --max-time 10 {url} && cat {file} && getent hosts only-target.graft.test \
         && sh -c 'echo $GRAFT_TEST_MARKER'",
        url = bed.service_url(),
        file = bed.remote("sub/nested.txt"),
    );
    let out = bed.run(&[], &["sh", "-c", &script]);
    let lines = out.assert_success().lines();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(lines[0], bed.service_reply());
    assert_eq!(lines[1], format!("nested in target {}", bed.n));
    assert!(lines[2].starts_with(&bed.service_v4.to_string()), "{out}");
    assert_eq!(lines[3], bed.marker);
}

#[test]
fn python_subprocess_children_keep_the_layer() {
    let bed = Bed::new();
    let script = format!(
        "import subprocess; print(subprocess.run(['curl', '-sS', '--max-time', '10', {url:?}], \
         capture_output=True, text=True, check=True).stdout.strip())",
        url = bed.service_url()
    );
    let out = bed.run(&[], &[graft_tests::python(), "-c", &script]);
    assert_eq!(out.assert_success().out(), bed.service_reply());
}

#[test]
fn python_threads_reach_the_service_at_once() {
    let bed = Bed::new();
    let out = bed.run_py(&[], "net_client.py", &["threads", &bed.service_url(), "12"]);
    let lines = out.assert_success().lines();
    assert_eq!(lines.len(), 12, "{out}");
    assert!(lines.iter().all(|l| *l == bed.service_reply()), "{out}");
}

#[test]
fn c_threads_each_echo_through_the_target() {
    let bed = Bed::new();
    let net = bed.compile("net");
    let service = bed.service_v4.to_string();
    let out = bed.run(&[], &[&net, "threads", &service, "7", "16"]);
    assert_eq!(out.assert_success().out(), "threads ok 16 of 16");
}

#[test]
fn nonblocking_sockets_work_with_epoll_poll_and_select() {
    let bed = Bed::new();
    let net = bed.compile("net");
    let service = bed.service_v4.to_string();
    for how in ["epoll", "poll", "select"] {
        let out = bed.run(&[], &[&net, how, &service, "7"]);
        assert_eq!(out.assert_success().out(), format!("{how} echo graft"));
    }
    let out = bed.run(&[], &[&net, "epoll", &bed.service_v6.to_string(), "7"]);
    assert_eq!(out.assert_success().out(), "epoll echo graft");
}

#[test]
fn dup2_and_dup3_keep_the_remote_connection() {
    let bed = Bed::new();
    let net = bed.compile("net");
    let service = bed.service_v4.to_string();
    let out = bed.run(&[], &[&net, "dup", &service, "7"]);
    assert_eq!(
        out.assert_success().lines(),
        ["dup echo dup".to_owned(), format!("peer {service} 7")]
    );
}

#[test]
fn getpeername_and_getsockname_report_the_remote_addresses() {
    let bed = Bed::new();
    let net = bed.compile("net");
    let service = bed.service_v4.to_string();
    let out = bed.run(&[], &[&net, "addrs", &service, "7"]);
    let lines = out.assert_success().lines();
    assert_eq!(lines[0], format!("peer {service} 7"), "{out}");
    assert!(lines[1].starts_with("sock "), "{out}");
    assert!(
        !lines[1].starts_with("sock 127.") && !lines[1].starts_with("sock ::1 "),
        "getsockname shows the local relay instead of a remote address: {out}"
    );

    let out = bed.run_py(&[], "net_client.py", &["tcp-addrs", &service, "7"]);
    let seen: serde_json::Value = serde_json::from_str(out.assert_success().out()).unwrap();
    assert_eq!(seen["peer"], serde_json::json!([service, 7]));
}

#[test]
fn accept_reports_the_real_client_address_of_a_stolen_connection() {
    let bed = Bed::new();
    let url = bed.target_url(bed.app_port);
    let (_session, reply) = bed.steal(&[], bed.app_port, &url);
    assert!(
        reply.contains(&format!("peer={} ", bed.host_v4)),
        "the app saw another client than curl's address {}: {reply}",
        bed.host_v4
    );
    let reply6 = graft_tests::curl(&bed.target_url6(bed.app_port)).unwrap();
    assert!(
        reply6.contains(&format!("peer={} ", bed.host_v6)),
        "{reply6}"
    );
}

#[test]
fn stolen_python_http_server_starts_with_the_target_environment() {
    let bed = Bed::new();
    let url = bed.target_url(bed.app_port);
    let (_session, reply) = bed.steal(&[], bed.app_port, &url);
    assert!(
        reply.ends_with(&format!("marker={}", bed.marker)),
        "{reply}"
    );
}
