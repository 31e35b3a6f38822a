//! Item 7 of issue 2, ending: graft exits with CMD's exit code; SIGTERM and Ctrl-C
//! stop CMD and end the session; whatever ends it — CMD exiting, a signal,
//! `kill -9` of graft or of the agent — the agent's packet rules are gone and the
//! target serves its port again within 2 seconds. A signal to graft or the lost
//! link stops what CMD started and left running too (a shell's background job).

use std::time::{Duration, Instant};

use graft_tests::{Bed, Proc, alive, curl, wait_until};
use nix::sys::signal::Signal;

/// How soon after a session ends its rules must be gone and the target must serve.
const RESTORE: Duration = Duration::from_secs(2);

/// Waits (at most [`RESTORE`] after `since`) until the target serves `url` again
/// and no graft rule is left in its namespace.
fn assert_restored(bed: &Bed, url: &str, since: Instant, session: &Proc) {
    let restored = wait_until(RESTORE, Duration::from_millis(50), || {
        let served = curl(url).ok().filter(|b| *b == bed.target_reply());
        (served.is_some() && !bed.has_graft_rules()).then_some(())
    });
    assert!(
        restored.is_some(),
        "{:?} after the session ended: {url} answers {:?}; rules:\n{}\n{}",
        since.elapsed(),
        curl(url),
        bed.packet_rules(),
        session.output_report()
    );
}

/// Waits (until [`RESTORE`] after `since`) for the agent and its watchdog to exit.
fn assert_agents_gone(bed: &Bed, since: Instant) {
    let left = RESTORE.saturating_sub(since.elapsed());
    let gone = wait_until(left, Duration::from_millis(50), || {
        bed.agent_pids().is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "agents still running {:?} after the session ended: {:?}",
        since.elapsed(),
        bed.agent_pids()
    );
}

/// The pids of the local app (http_app.py) started through this bed.
fn app_pids(bed: &Bed) -> Vec<u32> {
    bed.pids_running("http_app.py")
}

#[test]
fn graft_exits_with_the_exit_code_of_cmd() {
    let bed = Bed::new();
    for code in [0, 3, 7, 42] {
        let out = bed.run(&[], &["sh", "-c", &format!("exit {code}")]);
        assert_eq!(out.code(), Some(code), "{out}");
    }
}

#[test]
fn session_ends_when_cmd_exits_and_leaves_nothing_behind() {
    let bed = Bed::new();
    let script = format!(
        "import socket, time\n\
         s = socket.create_server(('0.0.0.0', {port}))\n\
         time.sleep(3)\n\
         raise SystemExit(5)",
        port = bed.app_port
    );
    let out = bed.run(&["--steal"], &[graft_tests::python(), "-c", &script]);
    let ended = Instant::now();
    assert_eq!(out.code(), Some(5), "{out}");
    let gone = wait_until(RESTORE, Duration::from_millis(50), || {
        bed.agent_pids().is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "agents left running: {:?}",
        bed.agent_pids()
    );
    let restored = wait_until(RESTORE, Duration::from_millis(50), || {
        (!bed.has_graft_rules()).then_some(())
    });
    assert!(
        restored.is_some(),
        "{:?}: rules left:\n{}",
        ended.elapsed(),
        bed.packet_rules()
    );
    assert_eq!(
        curl(&bed.target_url(bed.app_port)).unwrap(),
        bed.target_reply()
    );
}

#[test]
fn sigterm_to_graft_stops_cmd_and_ends_the_session() {
    let bed = Bed::new();
    let url = bed.target_url(bed.app_port);
    let (mut session, _) = bed.steal(&[], bed.app_port, &url);
    let apps = app_pids(&bed);
    assert!(!apps.is_empty(), "cannot find the app's process");

    session.signal(Signal::SIGTERM);
    let since = Instant::now();
    assert_restored(&bed, &url, since, &session);
    assert_agents_gone(&bed, since);
    let status = session.wait_timeout(Duration::from_secs(10));
    assert!(
        status.is_some(),
        "graft did not exit on SIGTERM\n{}",
        session.output_report()
    );
    // 128 + SIGTERM, as shells report it (issue 15).
    assert_eq!(
        status.unwrap().code(),
        Some(143),
        "{}",
        session.output_report()
    );
    let stopped = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        apps.iter().all(|pid| !alive(*pid)).then_some(())
    });
    assert!(stopped.is_some(), "CMD survived SIGTERM to graft: {apps:?}");
}

#[test]
fn ctrl_c_stops_cmd_and_ends_the_session() {
    let bed = Bed::new();
    let url = bed.target_url(bed.app_port);
    let (mut session, _) = bed.steal(&[], bed.app_port, &url);
    let apps = app_pids(&bed);

    // A terminal sends SIGINT to the whole foreground process group.
    session.signal_group(Signal::SIGINT);
    let since = Instant::now();
    assert_restored(&bed, &url, since, &session);
    assert_agents_gone(&bed, since);
    let status = session.wait_timeout(Duration::from_secs(10));
    assert!(
        status.is_some(),
        "graft did not exit on Ctrl-C\n{}",
        session.output_report()
    );
    // 130 after Ctrl-C, whatever CMD made of its SIGINT (issue 15).
    assert_eq!(
        status.unwrap().code(),
        Some(130),
        "{}",
        session.output_report()
    );
    let stopped = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        apps.iter().all(|pid| !alive(*pid)).then_some(())
    });
    assert!(stopped.is_some(), "CMD survived Ctrl-C: {apps:?}");
}

#[test]
fn kill_9_of_graft_restores_the_target_within_2s_and_leaves_no_rules() {
    let bed = Bed::new();
    let url = bed.target_url(bed.app_port);
    let (mut session, _) = bed.steal(&[], bed.app_port, &url);
    assert!(
        bed.has_graft_rules(),
        "no GRAFT chain while stealing:\n{}",
        bed.packet_rules()
    );

    session.signal(Signal::SIGKILL);
    let since = Instant::now();
    assert_restored(&bed, &url, since, &session);
    assert_agents_gone(&bed, since);
    assert!(session.wait_timeout(Duration::from_secs(1)).is_some());
}

#[test]
fn kill_9_of_the_agent_restores_the_target_within_2s() {
    let bed = Bed::new();
    let url = bed.target_url(bed.app_port);
    let (session, _) = bed.steal(&[], bed.app_port, &url);
    // The agent and its watchdog share a command line: the agent is the one whose
    // parent is not an agent.
    let agents = bed.agent_pids();
    let main: Vec<u32> = agents
        .iter()
        .copied()
        .filter(|pid| !agents.contains(&graft_proc::parent(*pid).unwrap_or(0)))
        .collect();
    let described: Vec<String> = agents
        .iter()
        .map(|pid| format!("{pid} (parent {})", graft_proc::parent(*pid).unwrap_or(0)))
        .collect();
    assert_eq!(
        main.len(),
        1,
        "expected one agent for the target: {described:?}"
    );

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(main[0] as i32), Signal::SIGKILL).unwrap();
    let since = Instant::now();
    assert_restored(&bed, &url, since, &session);
    assert_agents_gone(&bed, since);
}

/// `graft run -- sh -c 'PYTHON -c … MARKER & wait'` in `bed`: a shell whose
/// background job outlives the shell's own SIGTERM (dash dies of it in `wait`;
/// the job runs on); returns the session and the job's pids, once it runs.
fn run_with_background_job(bed: &Bed) -> (Proc, Vec<u32>) {
    let marker = format!("graft-background-job-{}", bed.n);
    let script = format!(
        "{py} -c 'import time; time.sleep(600)' {marker} & wait",
        py = graft_tests::python()
    );
    let mut session = bed.spawn(
        bed.graft_run(&[], &["sh", "-c", &script]),
        "graft run -- sh (background job)",
    );
    let job = wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
        if let Some(status) = session.try_status() {
            panic!("graft exited ({status})\n{}", session.output_report());
        }
        let pids = bed.pids_running(&marker);
        (pids.len() >= 2).then_some(pids)
    })
    .unwrap_or_else(|| panic!("the background job never ran\n{}", session.output_report()));
    (session, job)
}

/// Asserts that every process of `job` has ended within 5 s (after `what`
/// ended the session).
#[track_caller]
fn assert_job_gone(job: &[u32], session: &Proc, what: &str) {
    let gone = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        job.iter().all(|pid| !alive(*pid)).then_some(())
    });
    assert!(
        gone.is_some(),
        "CMD's background job survived {what}: {:?} of {job:?} still run\n{}",
        job.iter().filter(|pid| alive(**pid)).collect::<Vec<_>>(),
        session.output_report()
    );
}

#[test]
fn sigterm_to_graft_stops_what_cmd_started_and_left_running_too() {
    // A terminal's Ctrl-C reaches CMD's whole process group; graft stopping
    // CMD does the same, so nothing CMD started runs on with a layer whose
    // session is gone.
    let bed = Bed::new();
    let (mut session, job) = run_with_background_job(&bed);
    session.signal(Signal::SIGTERM);
    let status = session.wait_timeout(Duration::from_secs(15));
    assert!(
        status.is_some(),
        "graft did not exit on SIGTERM\n{}",
        session.output_report()
    );
    assert_job_gone(&job, &session, "graft");
}

#[test]
fn a_lost_link_stops_what_cmd_started_and_left_running_too() {
    let bed = Bed::new();
    let (mut session, job) = run_with_background_job(&bed);
    let agent = bed.agent_of(session.pid());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent as i32), Signal::SIGKILL)
        .expect("kill -9 of the agent");
    let status = session.wait_timeout(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "graft did not end with the link ({status:?})\n{}",
        session.output_report()
    );
    assert_job_gone(&job, &session, "the lost link");
}
