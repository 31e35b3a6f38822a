//! [`Bed`]: one test's target, service and namespaces (the topology is drawn in the
//! crate docs), the commands that drive graft against it, and its teardown.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, Once};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use tempfile::TempDir;

use crate::net::{curl, http_get, wait_until};
use crate::process::{self, Outcome, Proc};
use crate::slot::Slot;
use crate::{
    BED_ROOT, BIG_FILE_LEN, RUN_TIMEOUT, SLOT_ENV, STEAL_TIMEOUT, big_file_byte, fixture_str,
    graft_bin, package_dir, python, require_root,
};

/// How long a bed may take to come up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Proxy variables removed from every command, so curl and urllib connect directly.
const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
];

/// One test's target and service, alive until dropped.
///
/// Fields are the facts a test asserts against; all addresses are in the
/// benchmarking ranges and unique to the bed's slot `n`.
pub struct Bed {
    /// The slot index `N`.
    pub n: u8,
    /// The target server's pid: what `--target pid:PID` names.
    pub target_pid: u32,
    /// The target's network namespace (`gt{N}t`).
    pub target_ns: String,
    /// The service's network namespace (`gt{N}s`).
    pub service_ns: String,
    /// The host's end of the target link, 198.18.N.1: where curl's requests come from.
    pub host_v4: Ipv4Addr,
    /// The host's end of the target link, 2001:2:0:N::1.
    pub host_v6: Ipv6Addr,
    /// The target's address seen from the host, 198.18.N.2.
    pub target_v4: Ipv4Addr,
    /// The target's address seen from the host, 2001:2:0:N::2.
    pub target_v6: Ipv6Addr,
    /// The target's address on the service link, 198.19.N.1: the client address
    /// the service reports for connections that left from the target.
    pub link_v4: Ipv4Addr,
    /// The target's address on the service link, 2001:2:0:1NNN::1.
    pub link_v6: Ipv6Addr,
    /// The service, 198.19.N.2 (unreachable from the host).
    pub service_v4: Ipv4Addr,
    /// The service, 2001:2:0:1NNN::2 (unreachable from the host).
    pub service_v6: Ipv6Addr,
    /// A second port the target serves (28000 + N), unique to the bed so that local
    /// apps of parallel tests can listen on it without colliding.
    pub app_port: u16,
    /// A port unique to the bed for the local side of `--port-map` (29000 + N).
    pub map_port: u16,
    /// The target's environment marker, `GRAFT_TEST_MARKER=target-N`.
    pub marker: String,
    /// `/run/graft-testbed/N`: the bed's host-side files.
    pub dir: PathBuf,
    /// `/run/graft-testbed/N/remote`: empty on the host; in the target it holds
    /// `hello.txt`, `big.bin` (3 MiB), `sub/nested.txt`, and the symlinks
    /// `hosts-link` → `/etc/hosts`, `secret-link` → [`Bed::hostonly_dir`]`/secret.txt`
    /// and `up` → `../../../../../../..`.
    pub remote_dir: PathBuf,
    /// `/run/graft-testbed/N/hostonly`: holds `secret.txt` on the host; empty in the
    /// target (a tmpfs hides it), so reading the secret means escaping the target.
    pub hostonly_dir: PathBuf,
    /// `/tmp/graft-testbed/N`: empty on the host; holds `tmp-remote.txt` in the
    /// target. `/tmp` is local by default, so only `--fs-remote` reaches it.
    pub tmp_remote_dir: PathBuf,
    /// Whether graft runs with [`Bed::sessions_dir`] as its `/run/graft`
    /// ([`Bed::with_own_sessions`]).
    own_sessions: bool,
    work: TempDir,
    servers: Vec<Proc>,
    spawned: Mutex<Vec<u32>>,
    // Declared last: released only after teardown is complete.
    slot: Slot,
}

impl Bed {
    /// Builds a bed and waits until the target, the service and the service's
    /// resolver answer.
    ///
    /// # Panics
    ///
    /// When not root, when a tool is missing, or when any part of the bed does not
    /// come up (the message says which); whatever was built is removed.
    // No `Default`: building a bed creates namespaces and processes, which a
    // `Default::default()` call site would hide.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Bed {
        Bed::new_in_slot(|_| true)
    }

    /// [`Bed::new`] in a slot `N` that `usable` accepts (e.g. one whose
    /// 198.19.N.0/24 stays clear of a local cluster's ranges).
    ///
    /// # Panics
    ///
    /// As [`Bed::new`], and when no accepted slot is free.
    pub fn new_in_slot(usable: impl Fn(u8) -> bool) -> Bed {
        require_root();
        ensure_host_routes();
        sweep_abandoned();
        let slot = Slot::acquire_where(usable);
        let n = slot.n();
        teardown(n, None);
        let link6 = format!("2001:2:0:1{n:03}");
        let dir = PathBuf::from(BED_ROOT).join(n.to_string());
        let mut bed = Bed {
            n,
            target_pid: 0,
            target_ns: format!("gt{n}t"),
            service_ns: format!("gt{n}s"),
            host_v4: Ipv4Addr::new(198, 18, n, 1),
            host_v6: parse6(&format!("2001:2:0:{n}::1")),
            target_v4: Ipv4Addr::new(198, 18, n, 2),
            target_v6: parse6(&format!("2001:2:0:{n}::2")),
            link_v4: Ipv4Addr::new(198, 19, n, 1),
            link_v6: parse6(&format!("{link6}::1")),
            service_v4: Ipv4Addr::new(198, 19, n, 2),
            service_v6: parse6(&format!("{link6}::2")),
            app_port: 28000 + u16::from(n),
            map_port: 29000 + u16::from(n),
            marker: format!("target-{n}"),
            remote_dir: dir.join("remote"),
            hostonly_dir: dir.join("hostonly"),
            tmp_remote_dir: PathBuf::from(format!("/tmp/graft-testbed/{n}")),
            dir,
            own_sessions: false,
            work: tempfile::Builder::new()
                .prefix("graft-test-")
                .tempdir()
                .expect("cannot create a temporary directory"),
            servers: Vec::new(),
            spawned: Mutex::new(Vec::new()),
            slot,
        };
        bed.write_files();
        bed.build_network();
        bed.start_service();
        bed.start_target();
        bed.wait_ready();
        bed
    }

    /// This bed's graft processes see [`Bed::sessions_dir`] as `/run/graft`,
    /// where root's session directories are: each runs in a mount namespace of
    /// its own with that directory bound there, so they see each other's
    /// sessions and none of the tests running beside them.
    ///
    /// For tests of what looks at every session of the user (the inspector,
    /// `graft ui`): without it, the page lists and counts the requests of
    /// whatever other test runs a session meanwhile, and its watching turns on
    /// the copy of their connections (which then are relayed, not passed).
    pub fn with_own_sessions(mut self) -> Bed {
        for dir in [self.sessions_dir(), PathBuf::from("/run/graft")] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        self.own_sessions = true;
        self
    }

    /// `/run/graft-testbed/N/sessions`: what this bed's graft processes see as
    /// `/run/graft` after [`Bed::with_own_sessions`].
    pub fn sessions_dir(&self) -> PathBuf {
        self.dir.join("sessions")
    }

    // ----- driving graft -------------------------------------------------------

    /// A `graft` command with `args`, run from the package directory (so fixtures
    /// stay local), marked with the bed's slot, without proxy variables.
    ///
    /// After [`Bed::with_own_sessions`], graft is started by `unshare(1)` and
    /// `sh`, both replaced by graft (`exec`): the pid is graft's.
    pub fn graft(&self, args: &[&str]) -> Command {
        let mut command = if self.own_sessions {
            let mut command = Command::new("unshare");
            command
                .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                .arg(r#"mount --bind "$0" /run/graft && exec "$@""#)
                .arg(self.sessions_dir())
                .arg(graft_bin());
            command
        } else {
            Command::new(graft_bin())
        };
        command.args(args).current_dir(package_dir());
        self.mark(&mut command);
        command
    }

    /// `graft run --target pid:PID FLAGS... -- CMD...`.
    pub fn graft_run(&self, flags: &[&str], cmd: &[&str]) -> Command {
        let target = format!("pid:{}", self.target_pid);
        let mut args = vec!["run", "--target", &target];
        args.extend_from_slice(flags);
        args.push("--");
        args.extend_from_slice(cmd);
        self.graft(&args)
    }

    /// Runs `graft run --target pid:PID FLAGS... -- CMD...` to completion (at most
    /// [`RUN_TIMEOUT`]).
    pub fn run(&self, flags: &[&str], cmd: &[&str]) -> Outcome {
        let what = format!("graft run {} -- {}", flags.join(" "), cmd.join(" "));
        self.finish(self.spawn(self.graft_run(flags, cmd), &what), RUN_TIMEOUT)
    }

    /// [`Bed::run`] with `python3 fixtures/SCRIPT ARGS...` as CMD.
    pub fn run_py(&self, flags: &[&str], script: &str, args: &[&str]) -> Outcome {
        let script = fixture_str(script);
        let mut cmd = vec![python(), script.as_str()];
        cmd.extend_from_slice(args);
        self.run(flags, &cmd)
    }

    /// Starts `command` as a [`Proc`] the bed kills on teardown.
    pub fn spawn(&self, mut command: Command, what: &str) -> Proc {
        self.mark(&mut command);
        let proc = Proc::spawn(command, what);
        self.spawned
            .lock()
            .expect("no test panics while holding the lock")
            .push(proc.pid());
        proc
    }

    /// Waits for `proc` (at most `timeout`); see [`Proc::finish`].
    pub fn finish(&self, proc: Proc, timeout: Duration) -> Outcome {
        proc.finish(timeout)
    }

    /// Starts `graft run --target pid:PID --steal FLAGS... -- python3
    /// fixtures/http_app.py LISTEN_PORT` and waits until `url` (on the target)
    /// answers with the local app's reply, which it returns with the session.
    ///
    /// # Panics
    ///
    /// When the steal does not take effect within [`STEAL_TIMEOUT`], with graft's
    /// output.
    pub fn steal(&self, flags: &[&str], listen_port: u16, url: &str) -> (Proc, String) {
        let mut all = vec!["--steal"];
        all.extend_from_slice(flags);
        let app = fixture_str("http_app.py");
        let port = listen_port.to_string();
        let command = self.graft_run(&all, &[python(), &app, &port]);
        let what = format!("graft run {} -- http_app.py {port}", all.join(" "));
        let mut session = self.spawn(command, &what);
        let reply = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
            if let Some(status) = session.try_status() {
                panic!(
                    "{what} exited ({status}) before the steal took effect\n{}",
                    session.output_report()
                );
            }
            curl(url).ok().filter(|body| body.starts_with("local"))
        })
        .unwrap_or_else(|| {
            panic!(
                "{url} was not answered by the local app within {STEAL_TIMEOUT:?} \
                 (last answer: {:?})\n{}",
                curl(url),
                session.output_report()
            )
        });
        (session, reply)
    }

    // ----- addresses -----------------------------------------------------------

    /// `http://198.18.N.2:PORT/`: the target from the host over IPv4.
    pub fn target_url(&self, port: u16) -> String {
        format!("http://{}:{port}/", self.target_v4)
    }

    /// `http://[2001:2:0:N::2]:PORT/`: the target from the host over IPv6.
    pub fn target_url6(&self, port: u16) -> String {
        format!("http://[{}]:{port}/", self.target_v6)
    }

    /// `http://198.19.N.2/`: the service (reachable only from the target).
    pub fn service_url(&self) -> String {
        format!("http://{}/", self.service_v4)
    }

    /// `http://[2001:2:0:1NNN::2]/`: the service over IPv6.
    pub fn service_url6(&self) -> String {
        format!("http://[{}]/", self.service_v6)
    }

    /// What the target replies to a request that reached it: `target target-N`.
    pub fn target_reply(&self) -> String {
        format!("target {}", self.marker)
    }

    /// What the service replies to a request from the target over IPv4.
    pub fn service_reply(&self) -> String {
        format!("svc {}", self.link_v4)
    }

    /// A path under [`Bed::remote_dir`], as a string.
    pub fn remote(&self, relative: &str) -> String {
        self.remote_dir.join(relative).display().to_string()
    }

    // ----- looking at the target -----------------------------------------------

    /// Runs `f` on a thread inside the target's network namespace.
    pub fn in_target_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.target_ns, f)
    }

    /// GETs `path` from `addr` from inside the target's network namespace.
    ///
    /// # Errors
    ///
    /// As [`http_get`].
    pub fn get_from_target(&self, addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let path = path.to_owned();
        self.in_target_netns(move || http_get(addr, &path, Duration::from_secs(3)))
    }

    /// What the service's reset witness (port 11) has seen: one `eof CLIENT` or
    /// `reset CLIENT` line per connection.
    pub fn service_events(&self) -> String {
        self.get_from_target(SocketAddr::from((self.service_v4, 80)), "/events")
            .unwrap_or_else(|e| panic!("cannot ask the service for its events: {e}"))
    }

    /// How many requests the target server has answered on each port, e.g.
    /// `{80: 2, 28005: 0}` (asked on port 80, which that request then counts).
    pub fn target_counts(&self) -> BTreeMap<u16, u64> {
        let body = http_get(
            SocketAddr::from((self.target_v4, 80)),
            "/count",
            Duration::from_secs(3),
        )
        .unwrap_or_else(|e| panic!("cannot ask the target for its counts: {e}"));
        body.split_whitespace()
            .filter_map(|kv| {
                let (port, count) = kv.split_once('=')?;
                Some((port.parse().ok()?, count.parse().ok()?))
            })
            .collect()
    }

    /// Runs `args` inside the target's network and mount namespaces and root, as
    /// the target sees the world (`nsenter -t PID -n -m -r -w`).
    pub fn in_target(&self, args: &[&str]) -> Outcome {
        let pid = self.target_pid.to_string();
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &pid, "-n", "-m", "-r", "-w", "--"])
            .args(args);
        self.mark(&mut command);
        process::run(
            command,
            &format!("in the target: {}", args.join(" ")),
            RUN_TIMEOUT,
        )
    }

    /// `iptables-save` and `ip6tables-save` (both the legacy and the nft
    /// flavour) and `nft list ruleset` of the target's network namespace: every
    /// place an agent's rules can be.
    pub fn packet_rules(&self) -> String {
        [
            &["iptables-save"][..],
            &["ip6tables-save"],
            &["iptables-legacy-save"],
            &["ip6tables-legacy-save"],
            &["nft", "list", "ruleset"],
        ]
        .iter()
        .map(|tool| {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.target_ns])
                .args(*tool)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {tool:?}: {e}"));
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
    }

    /// Whether a packet rule or chain of graft (`GRAFT`) is in the target's
    /// network namespace.
    pub fn has_graft_rules(&self) -> bool {
        self.packet_rules().contains("GRAFT")
    }

    /// The pids of `graft-agent` processes started for this bed's target.
    pub fn agent_pids(&self) -> Vec<u32> {
        agents_of(self.target_pid)
    }

    /// Starts `cmd` inside the target's network namespace (beside the target
    /// process) and waits until it listens ([`Proc::wait_listening`]).
    pub fn serve_in_target(&self, cmd: &[String]) -> Proc {
        let what = format!("{} in the target netns", cmd[1..].join(" "));
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.target_ns]).args(cmd);
        let mut server = self.spawn(command, &what);
        server.wait_listening(&what);
        server
    }

    /// The session's agent: the one `graft-agent` of this bed whose parent is
    /// the graft process `graft` (its watchdog's parent is the agent).
    ///
    /// # Panics
    ///
    /// When there is not exactly one.
    pub fn agent_of(&self, graft: u32) -> u32 {
        let agents = self.agent_pids();
        let main: Vec<u32> = agents
            .iter()
            .copied()
            .filter(|pid| graft_proc::parent(*pid) == Some(graft))
            .collect();
        assert_eq!(
            main.len(),
            1,
            "expected one agent child of graft {graft} among {agents:?}"
        );
        main[0]
    }

    /// The pids of processes started through this bed (they carry its slot marker)
    /// whose command line mentions `needle`: e.g. CMD of a session.
    pub fn pids_running(&self, needle: &str) -> Vec<u32> {
        let slot = self.n.to_string();
        process::processes()
            .into_iter()
            .filter(|(_, argv)| argv.iter().any(|a| a.contains(needle)))
            .filter(|(_, argv)| {
                argv.first()
                    .is_some_and(|a| Path::new(a).file_name() != Some("graft".as_ref()))
            })
            .filter(|(pid, _)| {
                graft_proc::environ(*pid)
                    .is_ok_and(|env| env.iter().any(|(k, v)| k == SLOT_ENV && *v == slot))
            })
            .map(|(pid, _)| pid)
            .collect()
    }

    // ----- local programs ------------------------------------------------------

    /// Compiles `fixtures/NAME.c` with `cc` into the bed's temporary directory and
    /// returns the program's path.
    ///
    /// # Panics
    ///
    /// When the compiler fails, with its messages.
    pub fn compile(&self, name: &str) -> String {
        let out = self.work.path().join(name);
        let mut command = Command::new("cc");
        command
            .args(["-O1", "-Wall", "-pthread", "-o"])
            .arg(&out)
            .arg(crate::fixture(&format!("{name}.c")));
        process::run(command, &format!("cc {name}.c"), RUN_TIMEOUT).assert_success();
        out.display().to_string()
    }

    /// A scratch directory for the test (local: under the system temp dir).
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    // ----- building ------------------------------------------------------------

    fn mark(&self, command: &mut Command) {
        command.env(SLOT_ENV, self.n.to_string());
        for var in PROXY_VARS {
            command.env_remove(var);
        }
    }

    fn write_files(&self) {
        let n = self.n;
        let write = |path: &Path, contents: &[u8]| {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
            }
            std::fs::write(path, contents)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        };
        let mkdir = |path: &Path| {
            std::fs::create_dir_all(path)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        };
        mkdir(&self.dir.join("root"));
        mkdir(&self.remote_dir);
        mkdir(&self.tmp_remote_dir);
        write(
            &self.hostonly_dir.join("secret.txt"),
            format!("host-secret {n}\n").as_bytes(),
        );
        write(
            &self.dir.join("hosts"),
            format!(
                "127.0.0.1 localhost\n::1 localhost ip6-localhost\n\
                 {sv4} only-target.graft.test only-target\n\
                 {sv6} only-target6.graft.test\n",
                sv4 = self.service_v4,
                sv6 = self.service_v6
            )
            .as_bytes(),
        );
        write(
            &self.dir.join("resolv.conf"),
            format!(
                "nameserver {}\nsearch graft.test\noptions ndots:1 timeout:1 attempts:2\n",
                self.service_v4
            )
            .as_bytes(),
        );
        // What the target's tmpfs is filled from; deleted once copied.
        let seed = self.dir.join("seed");
        write(
            &seed.join("hello.txt"),
            format!("hello from target {n}\nsecond line\nthird line\n").as_bytes(),
        );
        let big: Vec<u8> = (0..BIG_FILE_LEN).map(big_file_byte).collect();
        write(&seed.join("big.bin"), &big);
        write(
            &seed.join("sub/nested.txt"),
            format!("nested in target {n}\n").as_bytes(),
        );
        let link = |to: &str, name: &str| {
            symlink(to, seed.join(name)).unwrap_or_else(|e| panic!("cannot link {name}: {e}"));
        };
        link("/etc/hosts", "hosts-link");
        link(
            &self.hostonly_dir.join("secret.txt").display().to_string(),
            "secret-link",
        );
        link("../../../../../../..", "up");
        write(
            &self.dir.join("tmpseed/tmp-remote.txt"),
            format!("tmp in target {n}\n").as_bytes(),
        );
    }

    fn build_network(&self) {
        let n = self.n;
        let (t, s) = (self.target_ns.as_str(), self.service_ns.as_str());
        let (h, a, b, c) = (
            format!("gt{n}h"),
            format!("gt{n}a"),
            format!("gt{n}b"),
            format!("gt{n}c"),
        );
        let cidr4 = |ip: Ipv4Addr| format!("{ip}/24");
        let cidr6 = |ip: Ipv6Addr| format!("{ip}/64");
        let steps: Vec<Vec<String>> = vec![
            vec!["netns", "add", t],
            vec!["netns", "add", s],
            vec!["-n", t, "link", "set", "lo", "up"],
            vec!["-n", s, "link", "set", "lo", "up"],
            // host <-> target
            vec![
                "link", "add", &h, "type", "veth", "peer", "name", &a, "netns", t,
            ],
            vec!["addr", "add", &cidr4(self.host_v4), "dev", &h],
            vec![
                "-6",
                "addr",
                "add",
                &cidr6(self.host_v6),
                "dev",
                &h,
                "nodad",
            ],
            vec!["link", "set", &h, "up"],
            vec!["-n", t, "addr", "add", &cidr4(self.target_v4), "dev", &a],
            vec![
                "-n",
                t,
                "-6",
                "addr",
                "add",
                &cidr6(self.target_v6),
                "dev",
                &a,
                "nodad",
            ],
            vec!["-n", t, "link", "set", &a, "up"],
            vec![
                "-n",
                t,
                "route",
                "add",
                "default",
                "via",
                &self.host_v4.to_string(),
            ],
            vec![
                "-n",
                t,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &self.host_v6.to_string(),
            ],
            // target <-> service
            vec![
                "-n", t, "link", "add", &b, "type", "veth", "peer", "name", &c, "netns", s,
            ],
            vec!["-n", t, "addr", "add", &cidr4(self.link_v4), "dev", &b],
            vec![
                "-n",
                t,
                "-6",
                "addr",
                "add",
                &cidr6(self.link_v6),
                "dev",
                &b,
                "nodad",
            ],
            vec!["-n", t, "link", "set", &b, "up"],
            vec!["-n", s, "addr", "add", &cidr4(self.service_v4), "dev", &c],
            vec![
                "-n",
                s,
                "-6",
                "addr",
                "add",
                &cidr6(self.service_v6),
                "dev",
                &c,
                "nodad",
            ],
            vec!["-n", s, "link", "set", &c, "up"],
            vec![
                "-n",
                s,
                "route",
                "add",
                "default",
                "via",
                &self.link_v4.to_string(),
            ],
            vec![
                "-n",
                s,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &self.link_v6.to_string(),
            ],
        ]
        .into_iter()
        .map(|step: Vec<&str>| step.into_iter().map(str::to_owned).collect())
        .collect();
        for step in steps {
            ip(&step);
        }
    }

    fn start_service(&mut self) {
        let ready = self.dir.join("service.ready");
        let mut service = Command::new("ip");
        service
            .args(["netns", "exec", &self.service_ns, python()])
            .arg(fixture_str("service.py"))
            .arg(&ready);
        let service = self.spawn(service, "service.py");
        self.servers.push(service);

        let mut dnsmasq = Command::new("ip");
        dnsmasq
            .args(["netns", "exec", &self.service_ns, "dnsmasq"])
            .args([
                "--no-daemon".to_owned(),
                "--conf-file=/dev/null".to_owned(),
                "--no-resolv".to_owned(),
                "--no-hosts".to_owned(),
                "--user=root".to_owned(),
                "--port=53".to_owned(),
                format!("--listen-address={}", self.service_v4),
                "--bind-interfaces".to_owned(),
                format!("--address=/svc.graft.test/{}", self.service_v4),
                format!("--address=/svc.graft.test/{}", self.service_v6),
                format!("--pid-file={}", self.dir.join("dnsmasq.pid").display()),
                "--log-facility=-".to_owned(),
            ]);
        let dnsmasq = self.spawn(dnsmasq, "dnsmasq");
        self.servers.push(dnsmasq);

        let up = wait_until(SETUP_TIMEOUT, Duration::from_millis(20), || {
            ready.exists().then_some(())
        });
        if up.is_none() {
            panic!(
                "the service did not come up within {SETUP_TIMEOUT:?}\n{}",
                self.servers[0].output_report()
            );
        }
    }

    fn start_target(&mut self) {
        let d = self.dir.display().to_string();
        let tmp = self.tmp_remote_dir.display().to_string();
        // Inside its own mount namespace the target gets a root of its own (a
        // recursive bind of `/`), with its hosts file, resolver, files that exist
        // only there, and the host-only directory hidden; then it chroots into it
        // and execs the server, so the process started here *is* the server.
        let script = format!(
            r#"set -e
r={d}/root
mount --rbind / "$r"
mount --bind {d}/hosts "$r/etc/hosts"
mount --bind {d}/resolv.conf "$r/etc/resolv.conf"
mount -t tmpfs -o size=16m,mode=0755 graft-remote "$r{d}/remote"
cp -a {d}/seed/. "$r{d}/remote/"
mount -t tmpfs -o size=1m,mode=0755 graft-hide "$r{d}/hostonly"
mount -t tmpfs -o size=1m,mode=0755 graft-tmp "$r{tmp}"
cp -a {d}/tmpseed/. "$r{tmp}/"
rm -rf {d}/seed {d}/tmpseed
cd "$r"
exec chroot "$r" /usr/bin/env -i \
  PATH=/target/bin:/usr/local/bin:/usr/bin:/bin \
  HOME=/srv/target USER=target-user SHELL=/bin/target-shell TERM=target-term \
  GRAFT_TEST_MARKER={marker} GRAFT_TEST_OVERLAY=remote GRAFT_TEST_SECOND=second-{n} \
  DATABASE_URL=postgres://db.graft.test:5432/app-{n} APP_MODE=target \
  {py} {server} 80 {app_port}
"#,
            marker = self.marker,
            n = self.n,
            py = python(),
            server = fixture_str("target_server.py"),
            app_port = self.app_port,
        );
        let mut target = Command::new("ip");
        target.args([
            "netns",
            "exec",
            &self.target_ns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ]);
        let target = self.spawn(target, "target_server.py");
        self.target_pid = target.pid();
        self.servers.push(target);
    }

    fn wait_ready(&mut self) {
        for port in [80, self.app_port] {
            let addr = SocketAddr::from((self.target_v4, port));
            let up = wait_until(SETUP_TIMEOUT, Duration::from_millis(20), || {
                http_get(addr, "/", Duration::from_secs(1)).ok()
            });
            match up {
                Some(body) if body == self.target_reply() => {}
                other => panic!(
                    "the target did not answer on {addr} within {SETUP_TIMEOUT:?} ({other:?})\n{}",
                    self.servers
                        .last()
                        .expect("the target was started")
                        .output_report()
                ),
            }
        }
        let cmdline = graft_proc::cmdline(self.target_pid).unwrap_or_default();
        assert!(
            cmdline.iter().any(|a| a.contains("target_server.py")),
            "pid {} is not the target server",
            self.target_pid
        );
        let service = SocketAddr::from((self.service_v4, 80));
        let reply = self.get_from_target(service, "/");
        assert_eq!(
            reply.as_deref().ok(),
            Some(self.service_reply().as_str()),
            "the service does not answer the target: {reply:?}"
        );
        let resolved = wait_until(SETUP_TIMEOUT, Duration::from_millis(50), || {
            let out = self.in_target(&["getent", "hosts", "svc.graft.test"]);
            out.success().then_some(())
        });
        if resolved.is_none() {
            panic!(
                "the service's resolver does not answer the target within {SETUP_TIMEOUT:?}\n{}",
                self.servers[1].output_report()
            );
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let spawned = std::mem::take(
            &mut *self
                .spawned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for pgid in spawned {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        teardown(self.n, Some(self.target_pid).filter(|pid| *pid != 0));
        // Reap the servers (already killed).
        self.servers.clear();
        let _ = &self.slot;
    }
}

/// Removes everything of slot `n`: processes (by slot marker, by network
/// namespace, and agents of `target_pid`), namespaces, links and files. Safe to
/// call when nothing exists.
fn teardown(n: u8, target_pid: Option<u32>) {
    let namespaces = [format!("gt{n}t"), format!("gt{n}s")];
    for _ in 0..3 {
        let mut killed = process::kill_by_env(SLOT_ENV, &n.to_string());
        if let Some(target) = target_pid {
            for agent in agents_of(target) {
                process::kill_pid(agent);
                killed += 1;
            }
        }
        for ns in &namespaces {
            for pid in netns_pids(ns) {
                process::kill_pid(pid);
                killed += 1;
            }
        }
        if killed == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for ns in &namespaces {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
    if Path::new("/sys/class/net").join(format!("gt{n}h")).exists() {
        let _ = Command::new("ip")
            .args(["link", "del", &format!("gt{n}h")])
            .output();
    }
    let _ = std::fs::remove_dir_all(PathBuf::from(BED_ROOT).join(n.to_string()));
    let _ = std::fs::remove_dir_all(format!("/tmp/graft-testbed/{n}"));
}

/// Tears down the leftovers of beds whose owner died without cleaning up (a test
/// process killed by a timeout), once per process: every slot that has a
/// namespace or directory but no owner.
fn sweep_abandoned() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let mut slots = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix("gt")
                .and_then(|rest| rest.strip_suffix(['t', 's']))
                .and_then(|n| n.parse::<u8>().ok())
            {
                slots.insert(n);
            }
        }
        for entry in std::fs::read_dir(BED_ROOT).into_iter().flatten().flatten() {
            if let Ok(n) = entry.file_name().to_string_lossy().parse::<u8>() {
                slots.insert(n);
            }
        }
        for n in slots
            .into_iter()
            .filter(|n| u16::from(*n) < crate::slot::SLOTS)
        {
            if let Some(slot) = Slot::try_take(n) {
                teardown(n, None);
                drop(slot);
            }
        }
    });
}

/// Routes the benchmarking ranges `unreachable` on the host, once per process;
/// idempotent, and left in place (other beds may be using them).
fn ensure_host_routes() {
    static ROUTES: Once = Once::new();
    ROUTES.call_once(|| {
        for (family, range) in [("-4", "198.18.0.0/15"), ("-6", "2001:2::/48")] {
            let args: Vec<String> = [family, "route", "replace", "unreachable", range]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
            ip(&args);
        }
    });
}

/// Runs `ip ARGS...`.
///
/// # Panics
///
/// When it fails, with its message.
fn ip(args: &[String]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip (install iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// The processes in network namespace `ns`.
fn netns_pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `graft-agent` processes whose `--target-pid` is `target`.
fn agents_of(target: u32) -> Vec<u32> {
    let target = target.to_string();
    let joined = format!("--target-pid={target}");
    process::processes()
        .into_iter()
        .filter(|(_, argv)| {
            argv.first().is_some_and(|a| a.ends_with("graft-agent"))
                && argv.windows(2).any(|w| {
                    (w[0] == "--target-pid" && w[1] == target) || w[0] == joined || w[1] == joined
                })
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// Runs `f` on a new thread that has entered the network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
        setns(&file, CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("cannot enter {path}: {e}"));
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn parse6(text: &str) -> Ipv6Addr {
    text.parse()
        .unwrap_or_else(|e| panic!("{text} is not an IPv6 address: {e}"))
}
