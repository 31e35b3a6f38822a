//! `graft replay FILE --to http://HOST:PORT`: send the requests of a HAR file (one
//! connection each, in the file's order, at most `--rate` per second) and compare
//! each response with the recorded one (`graft_traffic::replay::compare`); a table
//! or `-o json` says which differ, and the exit code is 1 when any does.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use bytes::Bytes;
use clap::Args;
use graft_traffic::replay::{self, Difference, Ignore, Recorded};
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;

use crate::{
    failure::Failure,
    output::{OutputFlag, print_json, print_text},
};

/// How long one request may take, connection to the last byte of the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `graft replay` flags.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The HAR 1.2 file to replay (graft record's, or a browser's or proxy's).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Where to send the requests: `http://HOST:PORT` (an address; the recorded
    /// Host header is sent unchanged).
    #[arg(long, value_name = "URL")]
    pub to: String,
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
    /// Output format.
    #[command(flatten)]
    pub output: OutputFlag,
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
    differences: Vec<Difference>,
}

/// Runs `graft replay`: 0 when every response is as recorded, 1 when any differs.
pub async fn replay(args: ReplayArgs) -> Result<u8, Failure> {
    let to = target_addr(&args.to)?;
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(Failure::usage(
            "--rate must be a positive number of requests per second",
        ));
    }
    let ignore = Ignore {
        headers: args.ignore_header.clone(),
        json_paths: args
            .ignore_json_path
            .iter()
            .map(|p| {
                replay::parse_json_path(p)
                    .map_err(|e| Failure::usage(format!("--ignore-json-path {e}")))
            })
            .collect::<Result<_, _>>()?,
    };
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| Failure::usage(format!("cannot read {}: {e}", args.file.display())))?;
    let entries = replay::load(&text).map_err(|e| {
        Failure::usage(format!("{}: {e}", args.file.display()))
            .hint("fix or remove that entry; graft replays HTTP/1.x entries with a method, a URL and a status")
    })?;
    let gap = args.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut results = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        if let (Some(gap), true) = (gap, i > 0) {
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
                .hint(format!("is something listening at {}?", args.to))
            })?;
        let differences = replay::compare(entry, status, &headers, &body, &ignore);
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
