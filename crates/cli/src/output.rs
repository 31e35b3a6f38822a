//! `-o json` / `--output json`: the machine-readable form of `graft ls`,
//! `graft doctor`, `graft clean` and `graft targets`, for scripts and editors.
//!
//! Each command prints one JSON document on stdout. The structs here are that
//! document: their field names are a stable interface (documented in
//! `docs/json-output.md`); add fields, never rename or remove one. They are
//! built from the library types, so the text and JSON forms show the same facts.

use clap::{Args, ValueEnum};
use graft_kube::clean::{AgentPod, CleanReport};
use graft_kube::doctor::{Check, Outcome};
use graft_protocol::incoming::SessionListing;
use serde::Serialize;

use crate::failure::Failure;

/// `-o/--output`, shared by the commands that have a JSON form.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct OutputFlag {
    /// Output format: `text` for people (default) or `json` (one document on
    /// stdout, fields in docs/json-output.md).
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        value_name = "FORMAT",
        default_value_t
    )]
    pub format: OutputFormat,
}

impl OutputFlag {
    /// Whether JSON was asked for.
    pub fn json(self) -> bool {
        self.format == OutputFormat::Json
    }
}

/// The output formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Tables and sentences.
    #[default]
    Text,
    /// One JSON document.
    Json,
}

/// Prints `value` as pretty JSON on stdout.
///
/// # Errors
///
/// A session failure if it cannot be serialized (it always can: plain data).
pub fn print_json(value: &impl Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Failure::session(format!("cannot write the JSON output: {e}")))?;
    print_text(&format!("{text}\n"))
}

/// Writes `text` to stdout; a reader that stopped reading (`| head`) is not an
/// error.
///
/// # Errors
///
/// A session failure for another write error.
pub fn print_text(text: &str) -> Result<(), Failure> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Failure::session(format!("cannot write to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

/// `graft ls -o json`.
#[derive(Debug, Serialize)]
pub struct LsJson {
    /// One entry per subscription on the target.
    pub sessions: Vec<SessionJson>,
}

/// One subscription in [`LsJson`].
#[derive(Debug, Serialize)]
pub struct SessionJson {
    /// Who runs the session: `user@host`.
    pub client: String,
    /// `steal` or `mirror`.
    pub mode: String,
    /// The target's port.
    pub port: u16,
    /// The HTTP filter as graft prints it (`header~"x-user: alice"`), or null
    /// when whole connections are taken.
    pub filter: Option<String>,
    /// When the session subscribed, in seconds since the Unix epoch.
    pub since_unix: u64,
}

impl LsJson {
    /// From the hub's listing.
    pub fn new(list: &[SessionListing]) -> LsJson {
        LsJson {
            sessions: list
                .iter()
                .map(|l| SessionJson {
                    client: l.client.clone(),
                    mode: l.subscription.mode.to_string(),
                    port: l.subscription.port,
                    filter: l.subscription.filter.as_ref().map(ToString::to_string),
                    since_unix: l.since_unix,
                })
                .collect(),
        }
    }
}

/// `graft doctor -o json`.
#[derive(Debug, Serialize)]
pub struct DoctorJson {
    /// Whether no check failed (the exit code is 0 exactly then).
    pub ok: bool,
    /// Every check, in the order they ran.
    pub checks: Vec<CheckJson>,
}

/// One check in [`DoctorJson`].
#[derive(Debug, Serialize)]
pub struct CheckJson {
    /// What was checked (`cluster access`, `permission: get pods`, …).
    pub name: String,
    /// `ok`, `info`, `warn` or `fail`.
    pub result: &'static str,
    /// What was found.
    pub detail: String,
    /// What to do about it, or null.
    pub fix: Option<String>,
}

impl DoctorJson {
    /// From the checks.
    pub fn new(checks: &[Check]) -> DoctorJson {
        DoctorJson {
            ok: !graft_kube::doctor::any_failed(checks),
            checks: checks
                .iter()
                .map(|c| CheckJson {
                    name: c.name.clone(),
                    result: match c.verdict.outcome {
                        Outcome::Ok => "ok",
                        Outcome::Info => "info",
                        Outcome::Warn => "warn",
                        Outcome::Fail => "fail",
                    },
                    detail: c.verdict.detail.clone(),
                    fix: c.verdict.fix.clone(),
                })
                .collect(),
        }
    }
}

/// `graft clean -o json`.
#[derive(Debug, Serialize)]
pub struct CleanJson {
    /// Whether this was `--dry-run` (nothing deleted: `removed` is what would
    /// be).
    pub dry_run: bool,
    /// The namespace cleaned, or null with `--all-namespaces`.
    pub namespace: Option<String>,
    /// Agent Jobs and pods deleted (with `dry_run`: that would be deleted).
    pub removed: Vec<AgentJson>,
    /// Agent Jobs and pods left in place, with why.
    pub kept: Vec<AgentJson>,
    /// Agent Jobs and pods whose deletion failed, with the error.
    pub failed: Vec<AgentJson>,
    /// Pods that carry exited graft ephemeral containers (Kubernetes cannot
    /// remove those).
    pub ephemeral: Vec<EphemeralJson>,
}

/// A node-mode agent in [`CleanJson`].
#[derive(Debug, Serialize)]
pub struct AgentJson {
    /// `job`, `pod`, `service`, `copy` or `scale-down`.
    pub kind: &'static str,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The session it served, or null.
    pub session: Option<String>,
    /// Its state (`Succeeded`, `running`, `agent exited with code 1 (Error)`).
    pub state: String,
    /// Whether its agent has terminated.
    pub terminated: bool,
    /// In `failed`: why the deletion failed; else null.
    pub error: Option<String>,
}

/// A pod with exited ephemeral agents in [`CleanJson`].
#[derive(Debug, Serialize)]
pub struct EphemeralJson {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The exited graft agent containers.
    pub containers: Vec<String>,
}

impl AgentJson {
    fn new(pod: &AgentPod, error: Option<&str>) -> AgentJson {
        AgentJson {
            kind: pod.kind,
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            session: pod.session.clone(),
            state: pod.state.clone(),
            terminated: pod.terminated,
            error: error.map(str::to_owned),
        }
    }
}

impl CleanJson {
    /// From the report of a clean (or a dry run) of `namespace`.
    pub fn new(report: &CleanReport, namespace: Option<&str>, dry_run: bool) -> CleanJson {
        CleanJson {
            dry_run,
            namespace: namespace.map(str::to_owned),
            removed: report
                .removed
                .iter()
                .map(|p| AgentJson::new(p, None))
                .collect(),
            kept: report
                .kept
                .iter()
                .map(|p| AgentJson::new(p, None))
                .collect(),
            failed: report
                .failed
                .iter()
                .map(|(p, e)| AgentJson::new(p, Some(e)))
                .collect(),
            ephemeral: report
                .ephemeral
                .iter()
                .map(|e| EphemeralJson {
                    namespace: e.namespace.clone(),
                    pod: e.pod.clone(),
                    containers: e.containers.clone(),
                })
                .collect(),
        }
    }
}
