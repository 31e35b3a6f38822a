//! `graft record`: mirror a port of the target (never steal: the target keeps
//! serving every request) with the target's responses, and write the exchanges as
//! a HAR 1.2 archive, headers redacted before the archive exists.
//!
//! ```text
//! open(target, mirror + responses) ─► steal(P, Channel) ─► each connection:
//!   tap frames ─► graft_traffic::read_tapped ─► filter ─► exchanges
//! until --duration / --count / Ctrl-C ─► release, close ─► redact ─► FILE (0600)
//! ```
//!
//! The `--filter-*` flags are applied here, to whole exchanges: the agent mirrors
//! every connection of the port, so a filter never changes what the target sees.

use std::{
    io::Write,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use clap::Args;
use graft_config::{Config, RunOverrides, Target};
use graft_filter::HttpFilter;
use graft_protocol::incoming::IncomingMode;
use graft_proxy::{Delivery, IncomingTcp, SessionOptions};
use graft_traffic::{Exchange, Har, Origin, Redaction, Route};
use tokio::sync::mpsc;

use crate::{
    args::KubeFlags,
    cluster,
    failure::{EXIT_SESSION, Failure},
    locate::locate_agent,
    open::{self, OpenRequest},
    process::Signals,
    run::load_file,
    session_dir::{SessionDir, random_hex},
};

/// How many bytes of buffer each tapped connection has between the proxy and its
/// reader.
const TAP_BUFFER: usize = 256 * 1024;

/// `graft record` flags.
#[derive(Debug, Args)]
pub struct RecordArgs {
    /// The target: `pid:PID` or a Kubernetes workload `KIND/NAME[/container/NAME]`.
    #[arg(long, env = "GRAFT_TARGET", value_name = "TARGET")]
    pub target: Option<String>,
    /// The target's port to record (HTTP/1.x).
    #[arg(long, value_name = "PORT")]
    pub port: u16,
    /// Record only requests with a header line `name: value` (name in lower case)
    /// matching REGEX, searched case-insensitively (repeatable; every filter flag
    /// must match).
    #[arg(long = "filter-header", value_name = "REGEX")]
    pub filter_header: Vec<String>,
    /// Record only requests whose path and query match REGEX (repeatable).
    #[arg(long = "filter-path", value_name = "REGEX")]
    pub filter_path: Vec<String>,
    /// Record only requests whose method is exactly METHOD (repeatable).
    #[arg(long = "filter-method", value_name = "METHOD")]
    pub filter_method: Vec<String>,
    /// Where to write the HAR file (created with mode 0600) [default: stdout].
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Stop after this long, e.g. `30s`, `5m`, `1h` [default: until Ctrl-C].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many requests were recorded.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// A header whose value is replaced by `[redacted by graft]` before anything is
    /// written (repeatable; case-insensitive) [default: Authorization, Cookie,
    /// Set-Cookie, Proxy-Authorization; giving the flag replaces the default list].
    #[arg(long = "redact-header", value_name = "NAME")]
    pub redact_header: Vec<String>,
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
    /// The agent image's pull policy: Always, IfNotPresent or Never.
    #[arg(long, value_name = "POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub agent_pull_policy: Option<String>,
    /// Config file [default: ./graft.toml when it exists]; its target and
    /// `[kube]` settings apply.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Parses `30s`, `5m`, `1h30m`, `500ms` (jiff's friendly format) or ISO 8601.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let signed = jiff::SignedDuration::from_str(text)
        .map_err(|e| format!("{text:?} is not a duration like 30s, 5m or 1h: {e}"))?;
    Duration::try_from(signed)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?}: the duration must be positive"))
}

/// Why recording ended.
enum Stop {
    Duration,
    Count,
    Signal,
    LinkLost(String),
}

/// Runs `graft record`: 0 when the HAR was written, 1 when the link was lost
/// (what was recorded until then is still written).
pub async fn record(args: RecordArgs) -> Result<u8, Failure> {
    let flags = RunOverrides {
        target: args.target.clone(),
        namespace: args.kube.namespace.clone(),
        context: args.kube.context.clone(),
        kubeconfig: args.kube.kubeconfig.clone(),
        agent_mode: args.agent_mode.clone(),
        agent_image: args.agent_image.clone(),
        agent_pull_policy: args.agent_pull_policy.clone(),
        ..RunOverrides::default()
    };
    let file = load_file(args.config.as_deref())?;
    let cwd = std::env::current_dir().ok();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let config = Config::resolve(&flags, &file, cwd.as_deref(), home.as_deref())?;
    if config.target == Target::Kube(cluster::TARGETLESS.into()) {
        return Err(Failure::usage(
            "a targetless agent has no incoming traffic to record: give --target",
        ));
    }
    let filter = graft_filter::from_flags(&graft_filter::FilterFlags {
        header: &args.filter_header,
        path: &args.filter_path,
        method: &args.filter_method,
        ..graft_filter::FilterFlags::default()
    })
    .map_err(|e| Failure::usage_error(&e))?
    .map(|spec| HttpFilter::compile(&spec).map_err(|e| Failure::usage_error(&e)))
    .transpose()?;
    let redaction = if args.redact_header.is_empty() {
        Redaction::default()
    } else {
        Redaction::new(args.redact_header.iter().cloned())
    };
    // A file that cannot be written is found before an agent is placed.
    let out = Output::open(args.output.as_deref())?;

    let exe = std::env::current_exe().ok();
    let agent = locate_agent(exe.as_deref(), &|name| std::env::var_os(name))?;
    let uid = nix::unistd::getuid().as_raw();
    let dir = SessionDir::create(uid, std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from))?;
    let secret = random_hex(32)?;
    let graft_log = std::env::var("GRAFT_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let mut signals = Signals::new()?;
    let opened = open::open(OpenRequest {
        config: &config,
        dir: dir.path(),
        agent_binary: &agent,
        secret: &secret,
        graft_log: graft_log.as_deref(),
        options: SessionOptions {
            announce_steals: false,
            incoming_mode: IncomingMode::Mirror,
            tap_responses: true,
            ..SessionOptions::default()
        },
    })
    .await?;
    let session = opened.session;
    let (conns_tx, conns_rx) = mpsc::channel(64);
    if let Err(e) = session.steal(args.port, Delivery::Channel(conns_tx)).await {
        session.close().await;
        opened.agents.stop(false).await;
        out.discard();
        return Err(Failure::session(format!(
            "cannot mirror port {} of {}: {e}",
            args.port, config.target
        )));
    }
    eprintln!(
        "graft: recording port {} of {} (mirrored: the target keeps serving every request){}",
        args.port,
        config.target,
        match (&args.duration, &args.count) {
            (Some(d), _) => format!(
                " for {}",
                jiff::SignedDuration::try_from(*d)
                    .map_or_else(|_| format!("{d:?}"), |d| format!("{d:#}"))
            ),
            (None, Some(n)) => format!(" until {n} requests"),
            (None, None) => ", Ctrl-C to stop".into(),
        }
    );
    let origin = Arc::new(Origin {
        target: config.target.to_string(),
        port: args.port,
        mode: IncomingMode::Mirror,
        client: None,
        route: Route::Target,
        filter: filter.as_ref().map(|f| f.spec().to_string()),
    });
    let closed = session.closed();
    let (stop, mut recorded) = collect(
        conns_rx,
        origin,
        filter.as_ref(),
        &args,
        &mut signals,
        closed,
    )
    .await;
    session.release(args.port).await;
    session.close().await;
    let link_lost = matches!(stop, Stop::LinkLost(_));
    opened.agents.stop(link_lost).await;
    drop(dir);
    if let Stop::LinkLost(reason) = &stop {
        eprintln!("graft: lost the link to the agent ({reason}); writing what was recorded");
    }
    if let Some(n) = args.count {
        recorded.truncate(n as usize);
    }
    // Completion order is not start order (a response that ends with its
    // connection is published late); microseconds tell apart requests that
    // started within one millisecond.
    recorded.sort_by_key(|e| e.started_unix_us);
    // Redaction happens here, in memory, before any byte of the archive exists.
    let har = Har::from_exchanges(&recorded, &redaction);
    out.write(&har)?;
    eprintln!(
        "graft: recorded {} request{}{}{}",
        recorded.len(),
        if recorded.len() == 1 { "" } else { "s" },
        args.output
            .as_ref()
            .map(|p| format!(" to {}", p.display()))
            .unwrap_or_default(),
        match stop {
            Stop::Duration => " (--duration reached)",
            Stop::Count => " (--count reached)",
            _ => "",
        }
    );
    Ok(if link_lost { EXIT_SESSION } else { 0 })
}

/// Reads the mirrored connections until a stop condition; returns why it stopped
/// and the exchanges the filter kept.
async fn collect(
    mut conns_rx: mpsc::Receiver<IncomingTcp>,
    origin: Arc<Origin>,
    filter: Option<&HttpFilter>,
    args: &RecordArgs,
    signals: &mut Signals,
    closed: impl Future<Output = graft_proxy::LinkEnd>,
) -> (Stop, Vec<Exchange>) {
    let (exchanges_tx, mut exchanges_rx) = mpsc::unbounded_channel::<Exchange>();
    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let mut deadline = std::pin::pin!(deadline);
    let mut closed = std::pin::pin!(closed);
    let mut recorded = Vec::new();
    let mut readers = tokio::task::JoinSet::new();
    let stop = loop {
        tokio::select! {
            conn = conns_rx.recv() => {
                let Some(conn) = conn else {
                    break Stop::LinkLost("the session ended".into());
                };
                let (ours, theirs) = tokio::io::duplex(TAP_BUFFER);
                let origin = Arc::new(Origin {
                    client: Some(conn.peer().peer),
                    ..(*origin).clone()
                });
                readers.spawn(conn.splice(theirs));
                let tx = exchanges_tx.clone();
                readers.spawn(async move {
                    if let Err(e) = graft_traffic::read_tapped(ours, origin, |e| {
                        let _ = tx.send(e);
                    })
                    .await
                    {
                        eprintln!("graft: {e}");
                    }
                });
            }
            Some(exchange) = exchanges_rx.recv() => {
                if !filter.is_none_or(|f| matches(f, &exchange)) {
                    continue;
                }
                recorded.push(exchange);
                if args.count.is_some_and(|n| recorded.len() as u64 >= n) {
                    break Stop::Count;
                }
            }
            () = &mut deadline => break Stop::Duration,
            _ = signals.recv() => break Stop::Signal,
            end = &mut closed => break Stop::LinkLost(end.to_string()),
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
        }
    };
    readers.abort_all();
    (stop, recorded)
}

/// Whether `filter` takes the request of `exchange`.
fn matches(filter: &HttpFilter, exchange: &Exchange) -> bool {
    let request = &exchange.request;
    let Ok(method) = http::Method::from_bytes(request.method.as_bytes()) else {
        return false;
    };
    let Ok(uri) = request.target.parse::<http::Uri>() else {
        return false;
    };
    let mut headers = http::HeaderMap::new();
    for (name, value) in &request.headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    filter.matches(&method, &uri, &headers)
}

/// Where the HAR goes: stdout, or a file written through a private temporary
/// file renamed into place (a reader never sees half an archive).
enum Output {
    Stdout,
    File {
        path: PathBuf,
        temp: PathBuf,
        file: std::fs::File,
    },
}

impl Output {
    fn open(path: Option<&Path>) -> Result<Output, Failure> {
        use std::os::unix::fs::OpenOptionsExt;
        let Some(path) = path else {
            return Ok(Output::Stdout);
        };
        let name = path
            .file_name()
            .ok_or_else(|| Failure::usage(format!("-o {}: not a file name", path.display())))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".graft-{}", std::process::id()));
        let temp = path.with_file_name(temp_name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| {
                Failure::usage(format!("cannot write {}: {e}", path.display()))
                    .hint("pick a writable directory with -o")
            })?;
        Ok(Output::File {
            path: path.to_owned(),
            temp,
            file,
        })
    }

    fn discard(self) {
        if let Output::File { temp, .. } = self {
            let _ = std::fs::remove_file(temp);
        }
    }

    fn write(self, har: &Har) -> Result<(), Failure> {
        let text = serde_json::to_string_pretty(har)
            .map_err(|e| Failure::session(format!("cannot encode the HAR: {e}")))?;
        match self {
            Output::Stdout => crate::output::print_text(&format!("{text}\n")),
            Output::File {
                path,
                temp,
                mut file,
            } => {
                let written = file
                    .write_all(text.as_bytes())
                    .and_then(|()| file.write_all(b"\n"))
                    .and_then(|()| file.sync_all())
                    .and_then(|()| std::fs::rename(&temp, &path));
                written.map_err(|e| {
                    let _ = std::fs::remove_file(&temp);
                    Failure::session(format!("cannot write {}: {e}", path.display()))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_friendly_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
