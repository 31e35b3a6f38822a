//! `graft replay FILE --to http://HOST:PORT` and `graft replay FILE -- CMD`: send
//! the requests of a HAR file (one connection each, in the file's order, at most
//! `--rate` per second) and compare each response with the recorded one
//! (`graft_traffic::diff::compare`); a table or `-o json` says which differ, and
//! the exit code is 1 when any does.
//!
//! With `-- CMD`, graft starts CMD first and replays to it once it listens on the
//! recorded port (or `--port`), then stops it:
//!
//! ```text
//! load FILE ─► [--target: open(target, incoming off) ─► env ─► CMD with the layer]
//!              [no target: CMD on this machine only]
//!          ─► wait until CMD listens ─► send, compare ─► stop CMD, close, report
//! ```
//!
//! CMD's standard output goes to graft's standard error: graft's standard output
//! is the report. With a target CMD runs as under `graft run` (the target's environment, files,
//! names and outgoing connections) but with incoming traffic off: the replayed
//! requests are the only ones CMD gets, the target's live traffic never mixes in.

use std::{
    ffi::OsString,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::Args;
use graft_config::{Config, IncomingMode, RunOverrides};
use graft_traffic::{
    diff::{self, Change, Ignore},
    replay::{self, Recorded},
};
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;
use tokio::process::Child;

use crate::{
    args::KubeFlags,
    failure::Failure,
    open::{self, OpenRequest},
    output::{OutputFlag, print_json, print_text},
    process::{self, Signals},
    run::{Plan, Prepared, check_program, load_file, prepare, stderr_copy},
};

/// How long one request may take, connection to the last byte of the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long CMD may take to listen, by default.
const LISTEN_WAIT: Duration = Duration::from_secs(60);
/// How often graft looks whether CMD listens yet.
const LISTEN_POLL: Duration = Duration::from_millis(50);

/// `graft replay` flags.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The HAR 1.2 file to replay (graft record's, or a browser's or proxy's).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Where to send the requests: `http://HOST:PORT` (an address; the recorded
    /// Host header is sent unchanged).
    #[arg(
        long,
        value_name = "URL",
        required_unless_present = "command",
        conflicts_with = "command"
    )]
    pub to: Option<String>,
    /// At most this many requests per second [default: as fast as answered].
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,
    /// A response header not compared, e.g. `Date` (repeatable; case-insensitive).
    #[arg(long = "ignore-header", value_name = "NAME")]
    pub ignore_header: Vec<String>,
    /// A JSON path removed from both JSON bodies before they are compared, e.g.
    /// `$.id`, `items[*].created` (repeatable).
    #[arg(long = "ignore-json-path", value_name = "PATH")]
    pub ignore_json_path: Vec<String>,
    /// With `-- CMD`: the target whose environment, files, names and outgoing
    /// connections CMD gets, as with `graft run` (incoming traffic off) [default:
    /// none: CMD runs on this machine only].
    #[arg(long, env = "GRAFT_TARGET", value_name = "TARGET")]
    pub target: Option<String>,
    /// With `-- CMD`: the port CMD listens on [default: the port of the
    /// recorded URLs].
    #[arg(long, value_name = "PORT", requires = "command")]
    pub port: Option<u16>,
    /// With `-- CMD`: how long CMD may take to listen, e.g. `30s` [default: 60s].
    #[arg(long = "listen-timeout", value_name = "DURATION", requires = "command",
          value_parser = crate::record::parse_duration)]
    pub listen_timeout: Option<Duration>,
    /// With `-- CMD` and a target: start CMD with the local environment only.
    #[arg(long = "no-remote-env")]
    pub no_remote_env: bool,
    /// Kubernetes access.
    #[command(flatten)]
    pub kube: KubeFlags,
    /// How the agent is placed beside a Kubernetes target: an `ephemeral`
    /// container in the pod (default), or a pod on the target's `node`.
    #[arg(long, value_name = "MODE", value_parser = ["ephemeral", "node"])]
    pub agent_mode: Option<String>,
    /// The agent image (default: graft's, tagged with its version).
    #[arg(long, value_name = "IMAGE")]
    pub agent_image: Option<String>,
    /// Config file [default: ./graft.toml when it exists]; its target, `[env]`,
    /// `[fs]`, outgoing and `[kube]` settings apply to CMD.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputFlag,
    /// The command to start and replay to (after `--`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// The JSON document of `graft replay -o json` (docs/json-output.md).
#[derive(Debug, Serialize)]
struct ReplayJson {
    /// Every entry, in the file's order.
    requests: Vec<RequestJson>,
    /// How many answered as recorded.
    same: usize,
    /// How many differ.
    different: usize,
}

/// One replayed entry.
#[derive(Debug, Serialize)]
struct RequestJson {
    entry: usize,
    method: String,
    path: String,
    recorded_status: u16,
    status: u16,
    same: bool,
    differences: Vec<Change>,
}

/// Runs `graft replay`: 0 when every response is as recorded, 1 when any differs.
pub async fn replay(args: ReplayArgs) -> Result<u8, Failure> {
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(Failure::usage(
            "--rate must be a positive number of requests per second",
        ));
    }
    let ignore = diff::ignore_from_flags(&args.ignore_header, &args.ignore_json_path)
        .map_err(Failure::usage)?;
    // The file is read whole before anything starts: a bad entry starts nothing.
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| Failure::usage(format!("cannot read {}: {e}", args.file.display())))?;
    let entries = replay::load(&text).map_err(|e| {
        Failure::usage(format!("{}: {e}", args.file.display()))
            .hint("fix or remove that entry; graft replays HTTP/1.x entries with a method, a URL and a status")
    })?;
    let sending = Sending {
        entries: &entries,
        gap: args.rate.map(|r| Duration::from_secs_f64(1.0 / r)),
        ignore: &ignore,
    };
    let results = match &args.to {
        Some(url) => {
            let to = target_addr(url)?;
            sending
                .send_all(to, &format!("is something listening at {url}?"))
                .await?
        }
        None => under_command(&args, &sending).await?,
    };
    let same = results.iter().filter(|r| r.same).count();
    let report = ReplayJson {
        different: results.len() - same,
        same,
        requests: results,
    };
    if args.output.json() {
        print_json(&report)?;
    } else {
        print_text(&table(&report))?;
    }
    Ok(if report.different == 0 { 0 } else { 1 })
}

/// The entries to send and how.
struct Sending<'a> {
    entries: &'a [Recorded],
    /// The pause between two requests (`--rate`).
    gap: Option<Duration>,
    ignore: &'a Ignore,
}

impl Sending<'_> {
    /// Sends every entry to `to` and compares; `hint` goes with a failure to
    /// reach it.
    async fn send_all(&self, to: SocketAddr, hint: &str) -> Result<Vec<RequestJson>, Failure> {
        let mut results = Vec::new();
        for (i, entry) in self.entries.iter().enumerate() {
            if let (Some(gap), true) = (self.gap, i > 0) {
                tokio::time::sleep(gap).await;
            }
            let (status, headers, body) = tokio::time::timeout(REQUEST_TIMEOUT, send(to, entry))
                .await
                .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))
                .and_then(|r| r)
                .map_err(|e| {
                    Failure::session(format!(
                        "entry {} ({} {}): {e}",
                        entry.index, entry.method, entry.path
                    ))
                    .hint(hint.to_owned())
                })?;
            let differences = replay::compare(entry, status, &headers, &body, self.ignore);
            results.push(RequestJson {
                entry: entry.index,
                method: entry.method.clone(),
                path: entry.path.clone(),
                recorded_status: entry.status,
                status,
                same: differences.is_empty(),
                differences,
            });
        }
        Ok(results)
    }
}

/// `graft replay FILE -- CMD`: starts CMD (under a session when there is a
/// target), replays to it once it listens, stops it.
async fn under_command(
    args: &ReplayArgs,
    sending: &Sending<'_>,
) -> Result<Vec<RequestJson>, Failure> {
    check_program(&args.command)?;
    let port = args
        .port
        .or_else(|| sending.entries.iter().find_map(|e| e.port))
        .unwrap_or(80);
    if let Some(addr) = listening(port).await {
        return Err(Failure::usage(format!(
            "port {port} already answers on this machine ({addr}): the replay would reach that program, not CMD"
        ))
        .hint("stop that program, or make CMD listen on another port and pass --port"));
    }
    let wait = args.listen_timeout.unwrap_or(LISTEN_WAIT);
    let file = load_file(args.config.as_deref())?;
    let mut signals = Signals::new()?;
    if args.target.is_none() && file.target.is_none() {
        eprintln!(
            "graft: replay: no --target: CMD runs on this machine only (give --target for the \
             target's environment, files and outgoing connections)"
        );
        let (program, rest) = args.command.split_first().expect("checked above");
        let mut command = tokio::process::Command::new(program);
        command.args(rest).stdout(stderr_copy()?);
        process::die_with_parent(&mut command);
        let child = command.spawn().map_err(|e| {
            Failure::usage(format!(
                "cannot run `{}`: {e}",
                std::path::Path::new(program).display()
            ))
        })?;
        return drive(
            child,
            port,
            wait,
            sending,
            &mut signals,
            std::future::pending::<String>(),
        )
        .await;
    }

    let flags = RunOverrides {
        target: args.target.clone(),
        namespace: args.kube.namespace.clone(),
        context: args.kube.context.clone(),
        kubeconfig: args.kube.kubeconfig.clone(),
        agent_mode: args.agent_mode.clone(),
        agent_image: args.agent_image.clone(),
        no_remote_env: args.no_remote_env,
        ..RunOverrides::default()
    };
    let cwd = std::env::current_dir().ok();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut config = Config::resolve(&flags, &file, cwd.as_deref(), home.as_deref())?;
    // The replayed requests are the only ones CMD gets.
    config.layer.incoming = IncomingMode::Off;
    config.layer.filter = None;
    config.incoming_defaulted = false;
    let remote_env = !args.no_remote_env && file.env.remote.unwrap_or(true);
    let Prepared {
        pieces,
        dir,
        secret,
        graft_log,
    } = prepare()?;
    let plan = Plan {
        target: config.target.to_string(),
        config: &config,
        remote_env,
        layer: &pieces.layer,
        dir: dir.path(),
        command: &args.command,
        graft_log: graft_log.as_deref(),
        isolate: false,
        stdout_to_stderr: true,
    };
    let opened = open::open(OpenRequest {
        config: &config,
        dir: dir.path(),
        agent_binary: &pieces.agent,
        secret: &secret,
        graft_log: graft_log.as_deref(),
        options: plan.session_options(),
    })
    .await?;
    let session = opened.session;
    let path = std::env::var_os("PATH");
    if let Some(why) = crate::isolate::detect::find(&args.command[0], path.as_deref())
        .and_then(|file| crate::isolate::detect::unreachable(&file))
    {
        eprintln!(
            "graft: warning: CMD is {why}: it does not load the layer, so its files, names \
             and connections stay on this machine (it still gets the target's environment)"
        );
    }
    eprintln!(
        "graft: agent ready for {}; CMD gets its context, no incoming traffic",
        plan.target
    );
    let result = async {
        let env = plan.environment(&session).await?;
        let child = plan.start_with_layer(&session, env)?;
        drive(child, port, wait, sending, &mut signals, session.closed()).await
    }
    .await;
    session.close().await;
    opened.agents.stop(result.is_err()).await;
    drop(dir);
    result
}

/// Waits until `child` listens on `port`, replays to it, and stops it whatever
/// happened (SIGTERM to it and its descendants, killed after `run::CMD_GRACE`).
async fn drive(
    mut child: Child,
    port: u16,
    wait: Duration,
    sending: &Sending<'_>,
    signals: &mut Signals,
    closed: impl Future<Output = impl std::fmt::Display>,
) -> Result<Vec<RequestJson>, Failure> {
    let result = {
        let work = async {
            let to = wait_listening(&mut child, port, wait).await?;
            eprintln!(
                "graft: replay: CMD listens on {to}; sending {} request{}",
                sending.entries.len(),
                if sending.entries.len() == 1 { "" } else { "s" }
            );
            sending
                .send_all(to, "did CMD stop answering? its output is above")
                .await
        };
        tokio::select! {
            result = work => result,
            received = signals.recv() => Err(Failure::session(format!(
                "stopped by {received:?} during the replay"
            ))),
            end = closed => Err(Failure::session(format!(
                "lost the link to the agent ({end}) during the replay"
            ))),
        }
    };
    // CMD and what it started, as `graft run` stops them.
    let _ = crate::run::stop(&mut child, signals, false).await;
    result
}

/// Polls until something listens on `port` of loopback (IPv4 or IPv6); fails when
/// `child` exits first or `wait` passes.
async fn wait_listening(
    child: &mut Child,
    port: u16,
    wait: Duration,
) -> Result<SocketAddr, Failure> {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Failure::session(format!(
                "CMD exited ({status}) before it listened on port {port}"
            ))
            .hint("see CMD's output above; pass --port if it listens on another port"));
        }
        if let Some(addr) = listening(port).await {
            return Ok(addr);
        }
        if started.elapsed() >= wait {
            return Err(Failure::session(format!(
                "CMD did not listen on port {port} within {wait:?}"
            ))
            .hint("pass --port with the port CMD listens on, or a longer --listen-timeout"));
        }
        tokio::time::sleep(LISTEN_POLL).await;
    }
}

/// The loopback address where something accepts connections on `port`.
async fn listening(port: u16) -> Option<SocketAddr> {
    for addr in [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ] {
        if tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
            .await
            .is_ok_and(|c| c.is_ok())
        {
            return Some(addr);
        }
    }
    None
}

/// The address of `http://HOST:PORT[/]`.
fn target_addr(url: &str) -> Result<SocketAddr, Failure> {
    let bad = || {
        Failure::usage(format!("--to {url:?}: not http://ADDRESS:PORT"))
            .hint("e.g. --to http://127.0.0.1:8080")
    };
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Ok(addr) = authority.parse() {
        return Ok(addr);
    }
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host == "localhost" {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    Err(bad())
}

/// Sends `entry`'s request to `to` on a new connection; the status, headers and
/// body (at most `MAX_REPLAY_BODY` bytes) of the answer.
async fn send(
    to: SocketAddr,
    entry: &Recorded,
) -> Result<(u16, Vec<(String, String)>, Vec<u8>), String> {
    let stream = tokio::net::TcpStream::connect(to)
        .await
        .map_err(|e| format!("cannot connect to {to}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| format!("HTTP/1.1 with {to} failed: {e}"))?;
    let driver = tokio::spawn(conn);
    let mut request = hyper::Request::builder()
        .method(entry.method.as_str())
        .uri(entry.path.as_str());
    let has_host = entry
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("host"));
    for (name, value) in &entry.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    if !has_host {
        request = request.header("host", to.to_string());
    }
    let request = request
        .body(Full::new(Bytes::from(entry.body.clone())))
        .map_err(|e| format!("the recorded request is not valid HTTP: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{to} did not answer: {e}"))?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = Limited::new(response.into_body(), replay::MAX_REPLAY_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the answer failed: {e}"))?
        .to_bytes()
        .to_vec();
    driver.abort();
    Ok((status, headers, body))
}

/// The text report: one line per entry, the differences under it, a summary.
fn table(report: &ReplayJson) -> String {
    let mut out = format!(
        "{:<5} {:<7} {:<40} {:<11} RESULT\n",
        "ENTRY", "METHOD", "PATH", "STATUS"
    );
    for r in &report.requests {
        let status = if r.status == r.recorded_status {
            r.status.to_string()
        } else {
            format!("{}→{}", r.recorded_status, r.status)
        };
        out.push_str(&format!(
            "{:<5} {:<7} {:<40} {:<11} {}\n",
            r.entry,
            r.method,
            r.path,
            status,
            if r.same { "same" } else { "DIFFERENT" }
        ));
        for d in &r.differences {
            out.push_str(&format!("      {d}\n"));
        }
    }
    out.push_str(&format!(
        "{} requests: {} same, {} different\n",
        report.requests.len(),
        report.same,
        report.different
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_target_is_an_address() {
        assert_eq!(
            target_addr("http://127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            target_addr("http://[::1]:9/").unwrap(),
            "[::1]:9".parse().unwrap()
        );
        assert_eq!(
            target_addr("http://localhost:80").unwrap(),
            "127.0.0.1:80".parse().unwrap()
        );
        assert!(target_addr("https://127.0.0.1:1").is_err());
        assert!(target_addr("http://example.com:80").is_err());
    }
}
