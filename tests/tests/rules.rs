//! Issue 10 (rules die with the agent) and issue 9 (kubelet probes are never
//! stolen), on the netns bed with the real graft and agent.
//!
//! - `kill -9` of the agent's whole process group: the target serves its port
//!   again within 2 s and no graft rule is left — with the default nf_tables
//!   owner table (the kernel deletes it with the agent's socket) and with the
//!   iptables fallback (the watchdog, in a session of its own, survives the
//!   group kill and removes the chain).
//! - The agent *and* its watchdog killed (what an OOM kill of the container
//!   does): the iptables chain stays, and the next agent that starts on the
//!   target removes it.
//! - Probe sources: with `--probe-source gateway` (what graft passes for pods),
//!   requests from the target's default gateway (the bed's host side, standing
//!   for the node the kubelet probes from) reach the target's own server while
//!   requests from elsewhere (the service namespace) are stolen; the same with
//!   the address given outright.
//!
//! The agent options are passed in graft's environment, which the local agent
//! inherits (`GRAFT_AGENT_PACKET_RULES`, `GRAFT_AGENT_PROBE_SOURCES`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use graft_tests::{Bed, Proc, STEAL_TIMEOUT, curl, python, wait_until};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, getpgid};

/// graft-agent's `--packet-rules` in the environment.
const RULES_ENV: &str = "GRAFT_AGENT_PACKET_RULES";
/// graft-agent's `--probe-source` in the environment.
const PROBES_ENV: &str = "GRAFT_AGENT_PROBE_SOURCES";

/// How soon after a fault the target must serve again (issue 10).
const RESTORE: Duration = Duration::from_secs(2);

/// Agent options, as graft-agent reads them from the environment graft
/// passes on: `(variable, value)`.
type AgentEnv = [(&'static str, String)];

/// `graft run --steal -- http_app.py APP_PORT` with the agent `agent`, waiting
/// until `answered()` sees the local app.
fn steal_with(bed: &Bed, agent: &AgentEnv, stolen: impl Fn() -> Option<String>) -> Proc {
    let app = bed_fixture("http_app.py");
    let port = bed.app_port.to_string();
    let mut command = bed.graft_run(&["--steal"], &[python(), &app, &port]);
    command.envs(agent.iter().map(|(k, v)| (k, v)));
    let mut session = bed.spawn(command, "graft run --steal -- http_app.py");
    let reply = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!(
                "graft exited ({status}) before the steal took effect\n{}",
                session.output_report()
            );
        }
        stolen().filter(|body| body.starts_with("local"))
    });
    assert!(
        reply.is_some(),
        "the steal did not take effect within {STEAL_TIMEOUT:?}\n{}",
        session.output_report()
    );
    session
}

fn bed_fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
        .display()
        .to_string()
}

/// The session's agent (the `graft-agent` whose parent is graft) and its
/// watchdog (the one whose parent is the agent, or that the agent left).
fn agent_and_watchdog(bed: &Bed, graft: u32) -> (u32, Vec<u32>) {
    let all = bed.agent_pids();
    let agent = all
        .iter()
        .copied()
        .find(|pid| graft_proc::parent(*pid).unwrap_or(0) == graft)
        .unwrap_or_else(|| panic!("no agent child of graft {graft} among {all:?}"));
    let others = all.into_iter().filter(|pid| *pid != agent).collect();
    (agent, others)
}

/// Waits at most [`RESTORE`] after `since` until the target serves its app port
/// again and no graft rule is left in its namespace.
fn assert_restored(bed: &Bed, since: Instant, what: &str) {
    let url = bed.target_url(bed.app_port);
    let left = RESTORE.saturating_sub(since.elapsed());
    let restored = wait_until(left, Duration::from_millis(50), || {
        let served = curl(&url).ok().filter(|b| *b == bed.target_reply());
        (served.is_some() && !bed.has_graft_rules()).then_some(())
    });
    assert!(
        restored.is_some(),
        "{what}: {:?} later {url} answers {:?}; rules:\n{}",
        since.elapsed(),
        curl(&url),
        bed.packet_rules()
    );
}

/// Kills the agent's process group with SIGKILL (`kill -9 -PGID`).
fn kill_group_of(agent: u32) {
    let group = getpgid(Some(Pid::from_raw(agent as i32))).expect("the agent's process group");
    killpg(group, Signal::SIGKILL).expect("kill -9 -PGID");
}

#[test]
fn kill_9_of_the_agents_process_group_and_watchdog_removes_its_nftables_table_at_once() {
    let bed = Bed::new();
    let agent_bin = [(RULES_ENV, "nftables".to_owned())];
    let url = bed.target_url(bed.app_port);
    let session = steal_with(&bed, &agent_bin, || curl(&url).ok());
    assert!(
        bed.packet_rules().contains("GRAFT-"),
        "no owner table while stealing:\n{}",
        bed.packet_rules()
    );
    let (agent, watchdogs) = agent_and_watchdog(&bed, session.pid());
    // The whole group and the watchdog (in a session of its own) at once: the
    // kernel alone removes the rules.
    kill_group_of(agent);
    for pid in watchdogs {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    assert_restored(
        &bed,
        Instant::now(),
        "nf_tables, kill -9 -PGID and the watchdog",
    );
}

#[test]
fn kill_9_of_the_agents_process_group_leaves_the_watchdog_to_remove_iptables_rules() {
    let bed = Bed::new();
    let agent_bin = [(RULES_ENV, "iptables".to_owned())];
    let url = bed.target_url(bed.app_port);
    let session = steal_with(&bed, &agent_bin, || curl(&url).ok());
    let rules = bed.packet_rules();
    assert!(
        rules.contains(":GRAFT-") && !rules.contains("table inet GRAFT-"),
        "expected an iptables chain and no nf_tables table:\n{rules}"
    );
    let (agent, watchdogs) = agent_and_watchdog(&bed, session.pid());
    assert_eq!(watchdogs.len(), 1, "one watchdog: {watchdogs:?}");
    let group = getpgid(Some(Pid::from_raw(agent as i32))).unwrap();
    let watchdog_group = getpgid(Some(Pid::from_raw(watchdogs[0] as i32))).unwrap();
    assert_ne!(
        group, watchdog_group,
        "the watchdog is in the agent's group"
    );
    kill_group_of(agent);
    assert_restored(&bed, Instant::now(), "iptables, kill -9 -PGID");
}

#[test]
fn a_new_agent_removes_the_chain_of_an_agent_killed_with_its_watchdog() {
    let bed = Bed::new();
    let agent_bin = [(RULES_ENV, "iptables".to_owned())];
    let url = bed.target_url(bed.app_port);
    let session = steal_with(&bed, &agent_bin, || curl(&url).ok());
    let (agent, watchdogs) = agent_and_watchdog(&bed, session.pid());
    // What an OOM kill of the whole container does: nobody cleans up.
    for pid in watchdogs.iter().chain([&agent]) {
        kill(Pid::from_raw(*pid as i32), Signal::SIGKILL).expect("kill -9");
    }
    session.signal(Signal::SIGKILL);
    let dead = wait_until(RESTORE, Duration::from_millis(50), || {
        bed.agent_pids().is_empty().then_some(())
    });
    assert!(dead.is_some(), "agents left: {:?}", bed.agent_pids());
    let rules = bed.packet_rules();
    let stale: Vec<String> = rules
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("GRAFT-"))
        .map(str::to_owned)
        .collect();
    assert!(!stale.is_empty(), "the dead agent left no chain:\n{rules}");
    assert!(
        curl(&url).is_err() || curl(&url).is_ok_and(|b| b != bed.target_reply()),
        "the stale redirect should break the port until a new agent starts"
    );

    // A new session on the target: its agent removes the stale chain at start.
    let mut command = bed.graft_run(&["--steal"], &["sleep", "30"]);
    command.envs(agent_bin.iter().map(|(k, v)| (k, v)));
    let _next = bed.spawn(command, "graft run --steal -- sleep 30");
    let started = Instant::now();
    let swept = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        let now = bed.packet_rules();
        stale
            .iter()
            .all(|c| !now.contains(c.as_str()))
            .then_some(())
    });
    assert!(
        swept.is_some(),
        "{:?} after a new agent started the stale chains {stale:?} remain:\n{}",
        started.elapsed(),
        bed.packet_rules()
    );
    assert_eq!(curl(&url).ok(), Some(bed.target_reply()));
}

/// GETs `http://LINK_V4:APP_PORT/` from the service namespace: a client that
/// is not the target's gateway.
fn curl_from_service(bed: &Bed) -> Option<String> {
    let url = format!("http://{}:{}/", bed.link_v4, bed.app_port);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &bed.service_ns,
            "curl",
            "-sS",
            "-m",
            "2",
            &url,
        ])
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn probe_sources_reach_the_target(sources: impl Fn(&Bed) -> String) {
    let bed = Bed::new();
    let agent_bin = [(PROBES_ENV, sources(&bed))];
    let _session = steal_with(&bed, &agent_bin, || curl_from_service(&bed));
    for _ in 0..3 {
        // From the gateway (the "node"): the target's own server answers.
        assert_eq!(
            curl(&bed.target_url(bed.app_port)).ok(),
            Some(bed.target_reply()),
            "a request from the probe source was stolen; rules:\n{}",
            bed.packet_rules()
        );
        assert_eq!(
            curl(&bed.target_url6(bed.app_port)).ok(),
            Some(bed.target_reply()),
            "an IPv6 request from the probe source was stolen"
        );
        // From elsewhere: stolen.
        let other = curl_from_service(&bed).unwrap_or_default();
        assert!(other.starts_with("local"), "not stolen: {other:?}");
    }
}

#[test]
fn requests_from_the_targets_gateway_reach_the_target_and_others_are_stolen() {
    probe_sources_reach_the_target(|_| "gateway".to_owned());
}

#[test]
fn requests_from_a_named_probe_source_reach_the_target_and_others_are_stolen() {
    probe_sources_reach_the_target(|bed| format!("{},{}", bed.host_v4, bed.host_v6));
}

/// GETs `url` from the host with `User-Agent: agent`.
fn curl_as(url: &str, agent: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sS", "-m", "5", "--noproxy", "*", "-A", agent, url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn kubelet_probe_requests_on_a_filtered_port_reach_the_target() {
    let bed = Bed::new();
    let url = bed.target_url(bed.app_port);
    // A filter that every GET matches: only the probe exception keeps probes
    // away from the local app.
    let (_session, _) = bed.steal(&["--filter-method", "GET"], bed.app_port, &url);
    for _ in 0..3 {
        assert_eq!(
            curl_as(&url, "kube-probe/1.25").map(|b| b.trim().to_owned()),
            Some(bed.target_reply()),
            "a kubelet probe was stolen"
        );
        let user = curl_as(&url, "curl/7.88").unwrap_or_default();
        assert!(
            user.starts_with("local"),
            "a user request was not stolen: {user:?}"
        );
    }
}
