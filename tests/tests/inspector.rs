//! The traffic inspector (`graft run --ui`, `graft ui`) on the test bed: a real
//! session steals the target's port for `http_app.py`, real clients (curl) send
//! requests to the target, and a real headless Chromium (through chromedriver)
//! shows the page.
//!
//! What is shown: the page loads from the binary alone and lists the session; a
//! request sent during the test shows within 1 s with its method, path, status
//! and where it went; its detail view has the header the client set; the text
//! filter, pause and clear work. The attacks fail: traffic carrying `<script>`
//! and `<img onerror>` runs nothing in the page; requests without the token, with
//! a foreign `Host` (DNS rebinding) or `Origin`, or to another address than
//! 127.0.0.1 get nothing; another local user can neither connect to a session's
//! event socket nor read a byte from it when the socket is made reachable. A
//! difference of the shadow diff (published on a session's feed) is a marked row
//! whose detail is its JSON, shown as text. On a filtered port, a request no
//! filter took shows as gone to the target (status and headers, from the
//! agent's routing record) within 1 s, and a request another session's filter
//! took shows to the others as "another session" with nothing it carried.
//!
//! The page lists every session of the user on the machine, and the tests run
//! as root beside others that run sessions too: each bed's graft processes see
//! a `/run/graft` of their own ([`Bed::with_own_sessions`]), so a page shows
//! (and counts) the requests of its own test only.

use std::{
    os::unix::fs::PermissionsExt,
    process::Command,
    time::{Duration, SystemTime},
};

use graft_tests::{Bed, Proc, python, wait_until, webdriver::Browser};
use serde_json::{Value, json};

/// How long anything the page waits for may take on a loaded machine (the 1 s of
/// the issue is checked on the page's own clock, see `shown_within`).
const PAGE_WAIT: Duration = Duration::from_secs(15);

/// The inspector's URL that `proc` printed.
fn inspector_url(proc: &mut Proc) -> String {
    let url = wait_until(PAGE_WAIT, Duration::from_millis(50), || {
        if let Some(status) = proc.try_status() {
            panic!("graft exited ({status})\n{}", proc.output_report());
        }
        proc.stderr()
            .lines()
            .find_map(|l| l.strip_prefix("graft: inspector at "))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    });
    url.unwrap_or_else(|| panic!("no inspector URL printed\n{}", proc.output_report()))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as u64
}

/// `curl -i ARGS... URL` on the host: status line, headers and body.
fn curl_i(args: &[&str], url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-i", "-g", "--noproxy", "*", "--max-time", "5"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

/// Waits until the page is live and lists the session on `target`, which means
/// the inspector reads the session's feed (the session copies its traffic from
/// then on).
fn wait_listed(browser: &Browser, target: &str) {
    let listed = wait_until(PAGE_WAIT, Duration::from_millis(100), || {
        browser
            .execute(
                "return document.getElementById('status').textContent === 'live' \
                 && document.getElementById('sessions').textContent.includes(arguments[0]);",
                vec![json!(target)],
            )
            .as_bool()
            .filter(|listed| *listed)
    });
    assert!(
        listed.is_some(),
        "the page did not list the session on {target}: {}",
        browser.execute("return document.body.innerText;", vec![])
    );
}

/// The visible rows of the request list that contain `text`.
fn rows_with(browser: &Browser, text: &str) -> Vec<graft_tests::webdriver::Element> {
    // An XPath string literal cannot hold both quote kinds; the tests' texts hold none.
    assert!(!text.contains('\''));
    browser.find_all(&format!(
        "//tbody[@id='rows']/tr[not(@hidden) and contains(., '{text}')]"
    ))
}

/// `curl -N` of the page's event stream, and a wait for the first session in it
/// (the inspector reads the session's feed from then on).
fn event_stream(bed: &Bed, page: &str, graft: &Proc) -> Proc {
    let mut stream = Command::new("curl");
    stream
        .args(["-sS", "-N", "--noproxy", "*", "--max-time", "60"])
        .arg(format!("{page}events"));
    let stream = bed.spawn(stream, "curl of the event stream");
    let listed = wait_until(PAGE_WAIT, Duration::from_millis(50), || {
        stream
            .stdout()
            .contains("\"kind\":\"session\"")
            .then_some(())
    });
    assert!(
        listed.is_some(),
        "no session in the event stream\n{}",
        graft.output_report()
    );
    stream
}

/// The exchange event of the request for `path` in `stream`'s output.
fn exchange_event(stream: &Proc, path: &str) -> Value {
    wait_until(PAGE_WAIT, Duration::from_millis(50), || {
        stream
            .stdout()
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| e["kind"] == "exchange" && e["target"] == path)
    })
    .unwrap_or_else(|| panic!("no event for {path}: {}", stream.stdout()))
}

#[test]
fn the_page_shows_each_request_live_with_its_headers_and_runs_nothing_from_traffic() {
    let bed = Bed::new().with_own_sessions();
    let url = bed.target_url(bed.app_port);
    let (mut session, _) = bed.steal(&["--ui"], bed.app_port, &url);
    let page = inspector_url(&mut session);
    assert!(page.starts_with("http://127.0.0.1:"), "{page}");
    let browser = Browser::start(&bed);
    browser.goto(&page);
    let target = format!("pid:{}", bed.target_pid);
    wait_listed(&browser, &target);

    // A request during the test: in the list within 1 s, with its facts.
    let marker = format!("hello-{}", std::process::id());
    let path = format!("/inspected/{marker}?q=1");
    let sent = now_ms();
    let answer = curl_i(
        &["-H", &format!("X-Inspector-Test: {marker}")],
        &format!("{}{}", url.trim_end_matches('/'), path),
    );
    assert!(answer.contains("local port="), "{answer}");
    let row = wait_until(PAGE_WAIT, Duration::from_millis(20), || {
        rows_with(&browser, &path).into_iter().next()
    })
    .unwrap_or_else(|| {
        panic!(
            "the request never showed: {}\n{}",
            browser.execute("return document.body.innerText;", vec![]),
            session.output_report()
        )
    });
    let shown: u64 = browser
        .execute(
            "return document.evaluate(arguments[0], document, null, 9, null)\
             .singleNodeValue.dataset.shownMs;",
            vec![json!(format!(
                "//tbody[@id='rows']/tr[contains(., '{path}')]"
            ))],
        )
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("the row says when it appeared");
    assert!(
        shown.saturating_sub(sent) <= 1000,
        "the request showed {} ms after it was sent (the issue asks for 1 s)",
        shown - sent
    );
    let line = browser.text(&row);
    for expected in ["GET", "200", "local process", &bed.app_port.to_string()] {
        assert!(
            line.contains(expected),
            "{expected:?} missing from the row {line:?}"
        );
    }

    // Its detail: the header the client set, and the local app's answer.
    browser.click(&row);
    let detail = browser.text(&browser.by_id("detail"));
    assert!(detail.contains("X-Inspector-Test"), "{detail}");
    assert!(detail.contains(&marker), "{detail}");
    assert!(detail.contains("local port="), "{detail}");

    // The attack: markup in the path and in a header must stay text.
    let evil_path = "/xss/<script>window.__pwned='path'</script>";
    let evil_header = "X-Evil: <img src=x onerror=\"window.__pwned='header'\">";
    curl_i(
        &["-H", evil_header],
        &format!("{}{evil_path}", url.trim_end_matches('/')),
    );
    let evil_row = wait_until(PAGE_WAIT, Duration::from_millis(20), || {
        rows_with(&browser, "/xss/").into_iter().next()
    })
    .expect("the hostile request shows");
    assert!(browser.text(&evil_row).contains("<script>"));
    browser.click(&evil_row);
    let detail = browser.text(&browser.by_id("detail"));
    assert!(detail.contains("<img src=x onerror="), "{detail}");
    let ran = browser.execute(
        "return {pwned: window.__pwned === undefined ? null : window.__pwned, \
         markup: document.querySelectorAll('#rows script, #rows img, #detail script, #detail img').length};",
        vec![],
    );
    assert_eq!(
        ran,
        json!({"pwned": Value::Null, "markup": 0}),
        "traffic ran in the page"
    );

    // Filter by text: a text no row has hides them all; the marker keeps its row.
    let filter = browser.by_id("filter");
    browser.type_into(&filter, "no-such-text-anywhere");
    assert!(rows_with(&browser, "/").is_empty());
    browser.clear(&filter);
    browser.type_into(&filter, &marker);
    assert_eq!(rows_with(&browser, "/").len(), 1);
    browser.clear(&filter);
    // clear() does not fire `input`; typing does.
    browser.type_into(&filter, " ");
    assert!(rows_with(&browser, "/xss/").len() == 1);

    // Pause: a request arrives (counted as waiting) but is not listed until resumed.
    let pause = browser.by_id("pause");
    browser.click(&pause);
    curl_i(&[], &format!("{}/while-paused", url.trim_end_matches('/')));
    let waiting = wait_until(PAGE_WAIT, Duration::from_millis(50), || {
        browser
            .text(&browser.by_id("count"))
            .contains(", 1 waiting")
            .then_some(())
    });
    assert!(
        waiting.is_some(),
        "{}",
        browser.text(&browser.by_id("count"))
    );
    assert!(rows_with(&browser, "/while-paused").is_empty());
    browser.click(&pause);
    assert_eq!(rows_with(&browser, "/while-paused").len(), 1);

    // Clear empties the list.
    browser.click(&browser.by_id("clear"));
    assert!(browser.find_all("//tbody[@id='rows']/tr").is_empty());
}

#[test]
fn the_inspector_refuses_strangers_foreign_sites_and_other_users() {
    let bed = Bed::new().with_own_sessions();
    let url = bed.target_url(bed.app_port);
    let (session, _) = bed.steal(&[], bed.app_port, &url);
    let mut ui = bed.spawn(bed.graft(&["ui"]), "graft ui");
    let page = inspector_url(&mut ui);
    let rest = page
        .strip_prefix("http://127.0.0.1:")
        .unwrap_or_else(|| panic!("the inspector is not on 127.0.0.1: {page}"));
    let (port, token) = rest.split_once('/').expect("PORT/TOKEN/");
    let token = token.trim_end_matches('/');
    assert!(token.len() >= 32, "a guessable token: {token:?}");
    let port: u16 = port.parse().expect("a port");

    // With the token: the page, under a policy that forbids inline scripts.
    let served = curl_i(&[], &page);
    assert_eq!(status_of(&served), 200, "{served}");
    let csp = served
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-security-policy:")
                .map(str::to_owned)
        })
        .expect("a Content-Security-Policy");
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );

    // Without it, or with a wrong one: nothing.
    let base = format!("http://127.0.0.1:{port}");
    let wrong = format!(
        "{}{}",
        &token[..token.len() - 1],
        if token.ends_with('0') { '1' } else { '0' }
    );
    for path in [
        "/".to_owned(),
        "/events".to_owned(),
        "/app.js".to_owned(),
        format!("/{wrong}/"),
        format!("/{wrong}/events"),
        format!("/{token}x/events"),
    ] {
        let answer = curl_i(&[], &format!("{base}{path}"));
        assert_eq!(status_of(&answer), 404, "{path}: {answer}");
        assert!(!answer.contains("graft inspector"), "{path}: {answer}");
    }

    // DNS rebinding: a foreign site's name resolving to 127.0.0.1 sends its own Host.
    let rebound = curl_i(&["-H", &format!("Host: rebind.example:{port}")], &page);
    assert_eq!(status_of(&rebound), 403, "{rebound}");
    let events = format!("{page}events");
    let foreign = curl_i(&["-H", "Origin: http://evil.example"], &events);
    assert_eq!(status_of(&foreign), 403, "{foreign}");

    // Loopback only: the host's other address has no such port open.
    let outside =
        std::net::TcpStream::connect_timeout(&(bed.host_v4, port).into(), Duration::from_secs(3));
    assert!(
        outside.is_err(),
        "the inspector answers on {}:{port}",
        bed.host_v4
    );

    // The event stream, with the token: the running session and its requests.
    let mut stream = Command::new("curl");
    stream
        .args(["-sS", "-N", "--noproxy", "*", "--max-time", "30"])
        .arg(&events);
    let stream = bed.spawn(stream, "curl of the event stream");
    let target = format!("\"target\":\"pid:{}\"", bed.target_pid);
    let listed = wait_until(PAGE_WAIT, Duration::from_millis(50), || {
        stream.stdout().contains(&target).then_some(())
    });
    assert!(
        listed.is_some(),
        "graft ui did not list the session\n{}",
        ui.output_report()
    );
    let marker = format!("/seen-by-ui-{}", std::process::id());
    curl_i(&[], &format!("{}{marker}", url.trim_end_matches('/')));
    let seen = wait_until(PAGE_WAIT, Duration::from_millis(50), || {
        stream.stdout().contains(&marker).then_some(())
    });
    assert!(seen.is_some(), "{}", stream.stdout());

    // Another local user: the session's event socket is out of reach...
    let socket = session_socket(&bed, session.pid());
    let as_nobody = |path: &str| {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                python(),
                "-c",
            ])
            .arg(
                "import socket, sys\n\
                 s = socket.socket(socket.AF_UNIX)\n\
                 s.settimeout(5)\n\
                 try:\n    s.connect(sys.argv[1])\n\
                 except OSError as e:\n    print('refused', e.errno); sys.exit(0)\n\
                 data = s.recv(65536)\n\
                 print('read', len(data))\n",
            )
            .arg(path)
            .output()
            .expect("setpriv runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
            + &String::from_utf8_lossy(&out.stderr)
    };
    let direct = as_nobody(socket.to_str().unwrap());
    assert!(direct.starts_with("refused 13"), "{direct}");
    // ...and made reachable (a world-writable link to it), it still says nothing:
    // the session checks who connects.
    let open = tempfile::Builder::new()
        .prefix("graft-inspector-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exposed = open.path().join("exposed.sock");
    std::fs::hard_link(&socket, &exposed).unwrap();
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o666)).unwrap();
    let stranger = as_nobody(exposed.to_str().unwrap());
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(stranger, "read 0", "another user read the session's events");

    // The session ends: the page hears of it.
    drop(session);
    let ended = wait_until(PAGE_WAIT, Duration::from_millis(50), || {
        stream.stdout().contains("\"kind\":\"ended\"").then_some(())
    });
    assert!(ended.is_some(), "{}", stream.stdout());
}

/// The event socket of the session run by graft process `pid` (root's sessions
/// live under /run/graft, which is the bed's [`Bed::sessions_dir`] for graft).
fn session_socket(bed: &Bed, pid: u32) -> std::path::PathBuf {
    std::fs::read_dir(bed.sessions_dir())
        .expect("root's session directories")
        .flatten()
        .map(|e| e.path())
        .find(|dir| {
            std::fs::read_to_string(dir.join("graft.pid"))
                .is_ok_and(|p| p.trim() == pid.to_string())
        })
        .map(|dir| dir.join("events.sock"))
        .filter(|socket| socket.exists())
        .unwrap_or_else(|| panic!("no event socket for graft {pid} in the bed's /run/graft"))
}

/// Builds `fixtures/goapp.go` statically (as `tests/isolate.rs` does), so graft
/// runs it in an isolated namespace by itself.
fn go_app(bed: &Bed) -> String {
    let out = bed.work_dir().join("goapp");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(graft_tests::fixture("goapp.go"))
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .env("GOCACHE", "/tmp/graft-test-gocache")
        .env("GOPATH", "/tmp/graft-test-gopath")
        .current_dir(bed.work_dir())
        .status()
        .expect("go build (Debian's golang-go)");
    assert!(status.success(), "go build goapp.go failed");
    out.display().to_string()
}

#[test]
fn an_isolated_filtered_session_shows_its_requests_with_the_filter_that_took_them() {
    let bed = Bed::new().with_own_sessions();
    let go = go_app(&bed);
    let port = bed.app_port.to_string();
    let mut session = bed.spawn(
        bed.graft_run(
            &["--steal", "--filter-header", "^x-user: alice$", "--ui"],
            &[&go, "serve", &port],
        ),
        "graft run --steal --filter-header --ui -- goapp serve",
    );
    let page = inspector_url(&mut session);
    let url = bed.target_url(bed.app_port);
    let stolen = wait_until(PAGE_WAIT, Duration::from_millis(100), || {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "3",
                "-H",
                "X-User: alice",
            ])
            .arg(&url)
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout)
            .starts_with("local go")
            .then_some(())
    });
    assert!(
        stolen.is_some(),
        "never stolen\n{}",
        session.output_report()
    );
    // The user-space stack's path (not the layer's) delivers its connections.
    assert!(
        session
            .stderr()
            .contains("running it in an isolated network namespace (--isolate)"),
        "{}",
        session.output_report()
    );

    let stream = event_stream(&bed, &page, &session);
    let path = format!("/isolated-{}", std::process::id());
    let answer = curl_i(
        &["-H", "X-User: alice"],
        &format!("{}{path}", url.trim_end_matches('/')),
    );
    assert!(answer.contains("local go"), "{answer}");
    let event = exchange_event(&stream, &path);
    assert_eq!(event["method"], "GET");
    assert_eq!(event["route"], "local");
    assert_eq!(event["mode"], "steal");
    assert_eq!(event["port"], bed.app_port);
    assert_eq!(event["filter"], "header~\"^x-user: alice$\"");
    assert_eq!(event["response"]["status"], 200);
    let body = event["response"]["body"]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(body.starts_with("local go"), "{event}");
    let sent = event["request_headers"]
        .as_array()
        .expect("headers")
        .iter()
        .any(|h| {
            h[0].as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case("x-user"))
                && h[1] == "alice"
        });
    assert!(sent, "{event}");
}

#[test]
fn a_mirrored_session_shows_the_request_the_target_answered_and_cmds_dropped_answer() {
    let bed = Bed::new().with_own_sessions();
    let app = graft_tests::fixture_str("http_app.py");
    let port = bed.app_port.to_string();
    let mut session = bed.spawn(
        bed.graft_run(&["--mirror", "--ui"], &[python(), &app, &port]),
        "graft run --mirror --ui -- http_app.py",
    );
    let page = inspector_url(&mut session);
    let mirroring = wait_until(PAGE_WAIT, Duration::from_millis(50), || {
        session.stderr().contains("mirroring port").then_some(())
    });
    assert!(mirroring.is_some(), "{}", session.output_report());
    let stream = event_stream(&bed, &page, &session);
    let path = format!("/mirrored-{}", std::process::id());
    let url = bed.target_url(bed.app_port);
    let answer = curl_i(&[], &format!("{}{path}", url.trim_end_matches('/')));
    assert!(
        answer.contains(&bed.target_reply()),
        "the target did not answer: {answer}"
    );
    let event = exchange_event(&stream, &path);
    assert_eq!(event["mode"], "mirror");
    assert_eq!(event["route"], "target");
    assert!(
        event["note"]
            .as_str()
            .is_some_and(|n| n.contains("dropped")),
        "{event}"
    );
    let shown = event["response"]["body"]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(
        shown.starts_with("local"),
        "CMD's answer is not the one shown: {event}"
    );
}

/// A session feed that a test serves itself (as the shadow diff will publish
/// through `Feed::publish_difference`): a session line, then one difference.
const FAKE_FEED: &str = r#"
import json, os, socket, sys, time
path, session = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(4)
print("listening", flush=True)
kept = []
while True:
    conn, _ = server.accept()
    kept.append(conn)
    lines = [
        {"kind": "session", "session": session, "target": "pid:4242", "command": "diffed app",
         "pid": os.getpid(), "started_unix_ms": int(time.time() * 1000), "mode": "mirror",
         "filter": None},
        {"kind": "difference", "session": session,
         "difference": {"path": "/orders/<script>window.__pwned='diff'</script>",
                        "status": {"target": 200, "local": 500}}},
    ]
    conn.sendall("".join(json.dumps(l) + "\n" for l in lines).encode())
"#;

#[test]
fn a_difference_of_the_shadow_diff_is_a_marked_row_with_its_json() {
    let bed = Bed::new().with_own_sessions();
    // A session directory of root's, as `graft run` makes them, whose feed is ours.
    let dir = tempfile::Builder::new()
        .prefix("inspector-test-")
        .tempdir_in(bed.sessions_dir())
        .expect("a session directory in the bed's /run/graft");
    let session = dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let socket = dir.path().join("events.sock");
    let mut feed = Command::new(python());
    feed.args(["-c", FAKE_FEED]).arg(&socket).arg(&session);
    let feed = bed.spawn(feed, "a fake session feed");
    let up = wait_until(PAGE_WAIT, Duration::from_millis(50), || {
        feed.stdout().contains("listening").then_some(())
    });
    assert!(up.is_some(), "{}", feed.output_report());
    std::fs::write(dir.path().join("graft.pid"), feed.pid().to_string()).unwrap();

    let mut ui = bed.spawn(bed.graft(&["ui"]), "graft ui");
    let page = inspector_url(&mut ui);
    let browser = Browser::start(&bed);
    browser.goto(&page);
    wait_listed(&browser, "pid:4242");
    let row = wait_until(PAGE_WAIT, Duration::from_millis(50), || {
        browser
            .find_all("//tbody[@id='rows']/tr[contains(@class, 'diff')]")
            .into_iter()
            .next()
    })
    .unwrap_or_else(|| {
        panic!(
            "no difference row: {}",
            browser.execute("return document.body.innerText;", vec![])
        )
    });
    assert!(
        browser.text(&row).contains("DIFF"),
        "{}",
        browser.text(&row)
    );
    browser.click(&row);
    let detail = browser.text(&browser.by_id("detail"));
    assert!(detail.contains("Difference"), "{detail}");
    assert!(detail.contains("\"local\": 500"), "{detail}");
    assert!(
        detail.contains("<script>window.__pwned='diff'</script>"),
        "{detail}"
    );
    let ran = browser.execute(
        "return {pwned: window.__pwned === undefined ? null : window.__pwned, \
         markup: document.querySelectorAll('#rows script, #detail script').length};",
        vec![],
    );
    assert_eq!(
        ran,
        json!({"pwned": Value::Null, "markup": 0}),
        "a difference ran in the page"
    );
    drop(browser);
    drop(ui);
    drop(feed);
}

/// `graft run --steal --filter-header FILTER FLAGS... -- http_app.py LISTEN`,
/// waited for until a request carrying `header` reaches the local app.
fn filtered_session(bed: &Bed, filter: &str, flags: &[&str], listen: u16, header: &str) -> Proc {
    let mut all = vec!["--steal", "--filter-header", filter];
    all.extend_from_slice(flags);
    let app = graft_tests::fixture_str("http_app.py");
    let port = listen.to_string();
    let mut session = bed.spawn(
        bed.graft_run(&all, &[python(), &app, &port]),
        &format!("graft run {} -- http_app.py {port}", all.join(" ")),
    );
    let url = bed.target_url(bed.app_port);
    let stolen = wait_until(PAGE_WAIT, Duration::from_millis(100), || {
        if let Some(status) = session.try_status() {
            panic!("graft exited ({status})\n{}", session.output_report());
        }
        let out = Command::new("curl")
            .args(["-sS", "--noproxy", "*", "--max-time", "3", "-H", header])
            .arg(&url)
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout)
            .starts_with("local")
            .then_some(())
    });
    assert!(
        stolen.is_some(),
        "requests with {header:?} were never stolen\n{}",
        session.output_report()
    );
    session
}

/// The inspector's id of the session that graft process `pid` runs, from the
/// event stream.
fn session_id(stream: &Proc, pid: u32) -> String {
    wait_until(PAGE_WAIT, Duration::from_millis(50), || {
        stream
            .stdout()
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| e["kind"] == "session" && e["pid"] == pid)
            .and_then(|e| e["session"].as_str().map(str::to_owned))
    })
    .unwrap_or_else(|| panic!("no session of graft {pid}: {}", stream.stdout()))
}

#[test]
fn a_filtered_session_shows_the_requests_no_filter_took_as_gone_to_the_target() {
    let bed = Bed::new().with_own_sessions();
    let mut session = filtered_session(
        &bed,
        "^x-user: alice$",
        &["--ui"],
        bed.app_port,
        "X-User: alice",
    );
    let page = inspector_url(&mut session);
    let url = bed.target_url(bed.app_port);
    let base = url.trim_end_matches('/');
    let browser = Browser::start(&bed);
    browser.goto(&page);
    wait_listed(&browser, &format!("pid:{}", bed.target_pid));

    // The session asks the agent for its routing records once somebody
    // watches (within a fraction of a second): wait until they flow.
    let flowing = wait_until(PAGE_WAIT, Duration::from_millis(300), || {
        let path = format!("/warm-up-{}", now_ms());
        curl_i(&[], &format!("{base}{path}"));
        std::thread::sleep(Duration::from_millis(200));
        (!rows_with(&browser, &path).is_empty()).then_some(())
    });
    assert!(
        flowing.is_some(),
        "no request that went to the target ever showed: {}\n{}",
        browser.execute("return document.body.innerText;", vec![]),
        session.output_report()
    );

    // A request no filter takes: the target answers, and the page says so
    // within 1 s, with the target's status.
    let marker = format!("unmatched-{}", std::process::id());
    let path = format!("/to-target/{marker}");
    let sent = now_ms();
    let answer = curl_i(
        &["-H", &format!("X-Seen: {marker}")],
        &format!("{base}{path}"),
    );
    assert!(answer.contains(&bed.target_reply()), "{answer}");
    let status = status_of(&answer).to_string();
    let row = wait_until(PAGE_WAIT, Duration::from_millis(20), || {
        rows_with(&browser, &path).into_iter().next()
    })
    .unwrap_or_else(|| {
        panic!(
            "the request that went to the target never showed: {}\n{}",
            browser.execute("return document.body.innerText;", vec![]),
            session.output_report()
        )
    });
    let shown: u64 = browser
        .execute(
            "return document.evaluate(arguments[0], document, null, 9, null)\
             .singleNodeValue.dataset.shownMs;",
            vec![json!(format!(
                "//tbody[@id='rows']/tr[contains(., '{path}')]"
            ))],
        )
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("the row says when it appeared");
    assert!(
        shown.saturating_sub(sent) <= 1000,
        "the request showed {} ms after it was sent (the issue asks for 1 s)",
        shown - sent
    );
    let line = browser.text(&row);
    for expected in ["GET", status.as_str(), "target"] {
        assert!(
            line.contains(expected),
            "{expected:?} missing from {line:?}"
        );
    }
    assert!(!line.contains("local process"), "{line}");
    browser.click(&row);
    let detail = browser.text(&browser.by_id("detail"));
    assert!(detail.contains("went to target"), "{detail}");
    assert!(
        detail.contains("x-seen"),
        "the request's header is shown: {detail}"
    );
    assert!(
        detail.contains(&bed.target_reply()),
        "the target's answer is shown: {detail}"
    );

    // A request the filter takes: the local process, with the filter.
    let path = format!("/to-local/{marker}");
    let answer = curl_i(&["-H", "X-User: alice"], &format!("{base}{path}"));
    assert!(answer.contains("local port="), "{answer}");
    let row = wait_until(PAGE_WAIT, Duration::from_millis(20), || {
        rows_with(&browser, &path).into_iter().next()
    })
    .expect("the stolen request shows");
    let line = browser.text(&row);
    assert!(line.contains("local process"), "{line}");
    browser.click(&row);
    let detail = browser.text(&browser.by_id("detail"));
    assert!(
        detail.contains("went to local process · filter header~\"^x-user: alice$\""),
        "{detail}"
    );
}

#[test]
fn a_session_sees_that_another_sessions_filter_took_a_request_but_nothing_it_carried() {
    let bed = Bed::new().with_own_sessions();
    // Alice watches; her agent owns the target's hub (she came first).
    let mut alice = filtered_session(
        &bed,
        "^x-user: alice$",
        &["--ui"],
        bed.app_port,
        "X-User: alice",
    );
    let page = inspector_url(&mut alice);
    // Bob's program listens on another local port, mapped to the same target port.
    let map = format!("{}:{}", bed.map_port, bed.app_port);
    let bob = filtered_session(
        &bed,
        "^x-user: bob$",
        &["--port-map", &map],
        bed.map_port,
        "X-User: bob",
    );
    let stream = event_stream(&bed, &page, &alice);
    let alice_id = session_id(&stream, alice.pid());
    let bob_id = session_id(&stream, bob.pid());
    let base = bed.target_url(bed.app_port);
    let base = base.trim_end_matches('/');

    // Alice's records flow (a request to the target shows in her session).
    let flowing = wait_until(PAGE_WAIT, Duration::from_millis(300), || {
        let path = format!("/warm-up-{}", now_ms());
        curl_i(&[], &format!("{base}{path}"));
        std::thread::sleep(Duration::from_millis(200));
        stream
            .stdout()
            .contains(&format!("\"target\":\"{path}\""))
            .then_some(())
    });
    assert!(
        flowing.is_some(),
        "alice's session never showed a request that went to the target\n{}",
        alice.output_report()
    );

    // The attack's bait: Bob's request, with a secret in its path and a header.
    let secret = format!("s3cret-{}", std::process::id());
    let answer = curl_i(
        &[
            "-H",
            "X-User: bob",
            "-H",
            &format!("Authorization: Bearer {secret}"),
        ],
        &format!("{base}/bob/{secret}"),
    );
    assert!(
        answer.contains("local port="),
        "bob's program answers: {answer}"
    );
    // Bob's own session shows it (he watches his session through the same
    // page: same user), so the secret did travel.
    let shown = wait_until(PAGE_WAIT, Duration::from_millis(50), || {
        stream.stdout().lines().find_map(|l| {
            let e: Value = serde_json::from_str(l.strip_prefix("data: ")?).ok()?;
            (e["kind"] == "exchange"
                && e["session"] == bob_id.as_str()
                && e["target"].as_str()?.contains(&secret))
            .then_some(e)
        })
    });
    assert!(
        shown.is_some(),
        "bob's session never showed his request: {}",
        stream.stdout()
    );
    // Alice learns that another session took a request, and nothing else.
    let told = wait_until(PAGE_WAIT, Duration::from_millis(50), || {
        stream.stdout().lines().find_map(|l| {
            let e: Value = serde_json::from_str(l.strip_prefix("data: ")?).ok()?;
            (e["kind"] == "exchange"
                && e["session"] == alice_id.as_str()
                && e["route"] == "another_session")
                .then_some(e)
        })
    })
    .unwrap_or_else(|| panic!("alice was not told: {}", stream.stdout()));
    assert_eq!(told["method"], "", "{told}");
    assert_eq!(told["target"], "", "{told}");
    assert_eq!(told["request_headers"], json!([]), "{told}");
    for line in stream.stdout().lines() {
        let Some(e) = line
            .strip_prefix("data: ")
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
        else {
            continue;
        };
        if e["session"] == alice_id.as_str() {
            assert!(
                !line.contains(&secret),
                "bob's request leaked into alice's session: {line}"
            );
        }
    }
}
