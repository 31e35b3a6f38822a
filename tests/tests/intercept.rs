//! Issue 11 point 3, `graft intercept`: a target's incoming traffic reaches a
//! local port where any program listens (here `python3 -m http.server`, not
//! started by graft): stolen, mirrored, or only the requests a filter matches;
//! `--env-file` / `--env-json` write the target's environment; `graft leave`
//! and `graft quit` end it.
//!
//! `graft quit` ends every intercept of the machine, so these tests hold
//! [`Connected`] like the connect tests: one at a time.

use std::process::Command;
use std::time::Duration;

use graft_tests::machine::Connected;
use graft_tests::{Bed, Proc, STEAL_TIMEOUT, alive, curl, python, wait_until};

/// What the local server's index page says.
const LOCAL: &str = "local-intercept";

/// `python3 -m http.server` on 127.0.0.1:PORT serving a page that says [`LOCAL`].
fn local_server(bed: &Bed) -> Proc {
    let root = bed.work_dir().join("www");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), format!("{LOCAL}\n")).unwrap();
    let mut command = Command::new(python());
    command
        .args([
            "-m",
            "http.server",
            &bed.map_port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--directory")
        .arg(&root);
    let server = bed.spawn(command, "python3 -m http.server");
    let url = format!("http://127.0.0.1:{}/", bed.map_port);
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        curl(&url).ok()
    })
    .expect("the local http.server answers");
    server
}

fn intercept(bed: &Bed, flags: &[&str]) -> Proc {
    let target = format!("pid:{}", bed.target_pid);
    let port = format!("{}:{}", bed.map_port, bed.app_port);
    let mut args = vec!["intercept", target.as_str(), "--port", port.as_str()];
    args.extend_from_slice(flags);
    bed.spawn(bed.graft(&args), &format!("graft {}", args.join(" ")))
}

/// Waits until the target's app port answers `want`.
fn wait_for(bed: &Bed, session: &mut Proc, want: &str) {
    let url = bed.target_url(bed.app_port);
    let got = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!(
                "graft intercept exited ({status})\n{}",
                session.output_report()
            );
        }
        curl(&url).ok().filter(|body| body == want)
    });
    assert!(
        got.is_some(),
        "{url} did not answer {want:?} (last: {:?})\n{}",
        curl(&url),
        session.output_report()
    );
}

fn graft_ok(bed: &Bed, args: &[&str]) -> String {
    let out = bed.finish(bed.spawn(bed.graft(args), "graft"), Duration::from_secs(30));
    out.assert_success();
    out.stdout
}

#[test]
fn intercept_steals_to_a_local_port_writes_the_env_and_leave_ends_it() {
    let bed = Bed::new();
    let _machine = Connected::lock();
    let _server = local_server(&bed);
    let env_file = bed.work_dir().join("target.env");
    let env_json = bed.work_dir().join("target.json");
    let mount = bed.work_dir().join("mnt");
    std::fs::create_dir(&mount).unwrap();
    let name = format!("it-{}", bed.n);
    let mut session = intercept(
        &bed,
        &[
            "--name",
            &name,
            "--env-file",
            env_file.to_str().unwrap(),
            "--env-json",
            env_json.to_str().unwrap(),
            "--mount",
            mount.to_str().unwrap(),
        ],
    );
    wait_for(&bed, &mut session, LOCAL);

    // --mount: a file that exists only in the target, through the mount.
    let hello = mount.join(bed.remote("hello.txt").trim_start_matches('/'));
    let text = std::fs::read_to_string(&hello)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", hello.display(), session.output_report()));
    assert!(
        text.starts_with(&format!("hello from target {}", bed.n)),
        "{text}"
    );
    assert!(
        std::fs::write(&hello, "x").is_err(),
        "the mount is read-only"
    );

    let text = std::fs::read_to_string(&env_file).unwrap();
    assert!(
        text.lines()
            .any(|l| l == format!("GRAFT_TEST_MARKER={}", bed.marker)),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&env_json).unwrap()).unwrap();
    assert_eq!(json["GRAFT_TEST_MARKER"], bed.marker.as_str());
    for file in [&env_file, &env_json] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(file).unwrap().permissions(),
        );
        assert_eq!(
            mode & 0o077,
            0,
            "{} holds secrets: owner only",
            file.display()
        );
    }

    let status: serde_json::Value =
        serde_json::from_str(&graft_ok(&bed, &["status", "-o", "json"])).unwrap();
    let listed = status["intercepts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["name"] == name.as_str() && i["remote_port"] == bed.app_port);
    assert!(listed, "{status}");

    graft_ok(&bed, &["leave", &name]);
    assert!(
        session.wait_timeout(Duration::from_secs(15)).is_some(),
        "leave ends it"
    );
    assert_eq!(
        curl(&bed.target_url(bed.app_port)).unwrap(),
        bed.target_reply()
    );
}

#[test]
fn intercept_mirrors_and_filters_and_quit_ends_it() {
    let bed = Bed::new();
    let _machine = Connected::lock();
    let server = local_server(&bed);
    let url = bed.target_url(bed.app_port);

    // Mirror: the target answers, the local server sees a copy.
    let mut mirror = intercept(&bed, &["--mirror", "--name", &format!("mirror-{}", bed.n)]);
    let seen = wait_until(STEAL_TIMEOUT, Duration::from_millis(200), || {
        assert!(mirror.try_status().is_none(), "{}", mirror.output_report());
        let answer = curl(&format!("{url}mirror-probe")).ok();
        assert!(
            answer.is_none() || answer.as_deref() == Some(bed.target_reply().as_str()),
            "the target keeps answering: {answer:?}"
        );
        server.stderr().contains("GET /mirror-probe").then_some(())
    });
    assert!(
        seen.is_some(),
        "the local server got a copy\n{}",
        server.output_report()
    );
    mirror.signal(nix::sys::signal::Signal::SIGINT);
    assert!(
        mirror.wait_timeout(Duration::from_secs(15)).is_some(),
        "Ctrl-C ends it"
    );

    // Filter: only requests with the header reach the local port.
    let mut filtered = intercept(
        &bed,
        &[
            "--filter-header",
            "^x-user: alice$",
            "--name",
            &format!("filter-{}", bed.n),
        ],
    );
    let with_header = || {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "3",
                "-H",
                "x-user: alice",
                &url,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let stolen = wait_until(STEAL_TIMEOUT, Duration::from_millis(100), || {
        assert!(
            filtered.try_status().is_none(),
            "{}",
            filtered.output_report()
        );
        (with_header() == LOCAL).then_some(())
    });
    assert!(stolen.is_some(), "{}", filtered.output_report());
    assert_eq!(
        curl(&url).unwrap(),
        bed.target_reply(),
        "unmatched requests stay"
    );

    // graft quit ends every intercept.
    let pid = filtered.pid();
    graft_ok(&bed, &["quit"]);
    assert!(filtered.wait_timeout(Duration::from_secs(15)).is_some());
    assert!(!alive(pid));
    assert_eq!(curl(&url).unwrap(), bed.target_reply());
}
