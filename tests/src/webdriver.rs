//! A real headless Chromium for the tests of web pages (the traffic inspector),
//! driven through Debian's `chromedriver` with the W3C WebDriver protocol
//! (<https://www.w3.org/TR/webdriver2/>): a few JSON calls over HTTP, each made
//! with curl, so the suite needs no WebDriver crate.
//!
//! The browser runs with its own throw-away profile, no network beyond what the
//! page asks for, and as a child of chromedriver in a process group the bed
//! kills on teardown.

use std::{path::PathBuf, process::Command, time::Duration};

use serde_json::{Value, json};

use crate::{Bed, Proc, wait_until};

/// The key under which WebDriver returns an element reference (W3C WebDriver
/// §12.1, "web element identifier").
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A Chromium session through chromedriver; ends the session when dropped.
pub struct Browser {
    base: String,
    _driver: Proc,
    _profile: tempfile::TempDir,
}

/// An element of the page, as WebDriver names it.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Browser {
    /// Starts chromedriver (in `bed`'s process group) and a headless Chromium.
    ///
    /// # Panics
    ///
    /// When chromedriver or Chromium does not start, with chromedriver's output.
    pub fn start(bed: &Bed) -> Browser {
        // The port is free when picked but may be taken before chromedriver binds
        // it (parallel tests bind ephemeral ports): try a few.
        let (driver, base) = (0..5)
            .find_map(|_| {
                let port = free_port();
                let mut command = Command::new(chromedriver());
                command.arg(format!("--port={port}"));
                let mut driver = bed.spawn(command, "chromedriver");
                let base = format!("http://127.0.0.1:{port}");
                let ready = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
                    if driver.try_status().is_some() {
                        return Some(false);
                    }
                    call("GET", &format!("{base}/status"), None)
                        .ok()
                        .filter(|v| v["value"]["ready"] == true)
                        .map(|_| true)
                });
                match ready {
                    Some(true) => Some((driver, base)),
                    Some(false) => {
                        eprintln!(
                            "chromedriver did not start; again\n{}",
                            driver.output_report()
                        );
                        None
                    }
                    None => panic!("chromedriver was not ready\n{}", driver.output_report()),
                }
            })
            .expect("chromedriver starts within 5 attempts");
        let profile = tempfile::tempdir().expect("a temporary profile directory");
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--disable-crash-reporter",
                    "--disable-breakpad", "--no-first-run", "--disable-extensions",
                    "--disable-background-networking",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        }}});
        let created = call("POST", &format!("{base}/session"), Some(&capabilities))
            .unwrap_or_else(|e| panic!("no browser session: {e}\n{}", driver.output_report()));
        let id = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {created}"))
            .to_owned();
        Browser {
            base: format!("{base}/session/{id}"),
            _driver: driver,
            _profile: profile,
        }
    }

    fn command(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let url = format!("{}{path}", self.base);
        match call(method, &url, body) {
            Ok(answer) => answer["value"].clone(),
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        }
    }

    /// Opens `url` and waits for the page to load.
    pub fn goto(&self, url: &str) {
        self.command("POST", "/url", Some(&json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page
    /// and returns what it returns.
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// The elements matching an XPath expression.
    pub fn find_all(&self, xpath: &str) -> Vec<Element> {
        let found = self.command(
            "POST",
            "/elements",
            Some(&json!({ "using": "xpath", "value": xpath })),
        );
        found
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|e| e[ELEMENT_KEY].as_str().map(|id| Element(id.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The first element with id `id`.
    ///
    /// # Panics
    ///
    /// When there is none.
    pub fn by_id(&self, id: &str) -> Element {
        self.find_all(&format!("//*[@id='{id}']"))
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no element #{id} in the page"))
    }

    /// Clicks `element` as a user would.
    pub fn click(&self, element: &Element) {
        self.command(
            "POST",
            &format!("/element/{}/click", element.0),
            Some(&json!({})),
        );
    }

    /// Types `text` into `element`.
    pub fn type_into(&self, element: &Element, text: &str) {
        self.command(
            "POST",
            &format!("/element/{}/value", element.0),
            Some(&json!({ "text": text })),
        );
    }

    /// Empties an input `element`.
    pub fn clear(&self, element: &Element) {
        self.command(
            "POST",
            &format!("/element/{}/clear", element.0),
            Some(&json!({})),
        );
    }

    /// The rendered text of `element` (empty when it is hidden).
    pub fn text(&self, element: &Element) -> String {
        self.command("GET", &format!("/element/{}/text", element.0), None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closes Chromium; the bed kills chromedriver's process group after.
        let _ = call("DELETE", &self.base, None);
    }
}

/// One WebDriver call: its JSON answer, or the error it reports.
fn call(method: &str, url: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--noproxy", "*", "--max-time", "60", "-X", method])
        .arg(url);
    if let Some(body) = body {
        command
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(body.to_string());
    }
    let out = command
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let answer: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(error) = answer["value"]["error"].as_str() {
        return Err(format!("{error}: {}", answer["value"]["message"]));
    }
    Ok(answer)
}

fn chromedriver() -> PathBuf {
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("chromedriver is installed (Debian: apt-get install chromium-driver)")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
