//! `graft ls`: the sessions on a target — who holds which port, in which mode,
//! with which filter, since when. It asks the target's hub through an agent of its
//! own, which never becomes the hub itself (no session: nothing to list).

use std::path::PathBuf;

use graft_config::Target;
use graft_protocol::incoming::SessionListing;
use graft_protocol::remote::{RemoteRequest, RemoteResponse};
use graft_proxy::SessionOptions;

use crate::agent::LocalAgent;
use crate::args::LsArgs;
use crate::failure::Failure;
use crate::locate::locate;
use crate::session_dir::{SessionDir, random_hex};

/// How long the agent may take to exit after the listing.
const AGENT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Runs `graft ls`; prints one line per subscription.
pub async fn ls(args: LsArgs) -> Result<u8, Failure> {
    let Some(target) = args.target.as_deref() else {
        return Err(Failure::usage("graft ls needs --target (or GRAFT_TARGET)"));
    };
    let target: Target = target
        .parse()
        .map_err(|e: graft_config::ConfigError| Failure::usage(e.to_string()))?;
    let pid = match target {
        Target::Pid(pid) => pid,
        Target::Kube(text) => {
            return Err(Failure::usage(format!(
                "graft ls lists the sessions of local targets (pid:PID); {text} is a Kubernetes \
                 target"
            ))
            .hint(
                "each Kubernetes session's agent is an ephemeral container or pod named \
                 graft-agent-…: `kubectl get pods -l app.kubernetes.io/managed-by=graft` and the \
                 target pod's ephemeral containers show them",
            ));
        }
    };
    let exe = std::env::current_exe().ok();
    let pieces = locate(exe.as_deref(), &|name| std::env::var_os(name))?;
    let uid = nix::unistd::getuid().as_raw();
    let dir = SessionDir::create(uid, std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from))?;
    let secret = random_hex(32)?;
    let mut agent = LocalAgent::start(&pieces.agent, pid, dir.path(), &secret, None).await?;
    let options = SessionOptions {
        announce_steals: false,
        ..SessionOptions::default()
    };
    let listed = async {
        let session = agent
            .connect(&secret, &crate::run::client_name(), options)
            .await?;
        let answer = session.remote(RemoteRequest::Sessions).await;
        session.close().await;
        match answer {
            Ok(RemoteResponse::Sessions(list)) => Ok(list),
            Ok(RemoteResponse::Error(e)) => Err(Failure::session(format!(
                "the agent could not list the sessions: {e}"
            ))),
            Ok(other) => Err(Failure::session(format!(
                "the agent answered the listing with {other:?}"
            ))),
            Err(e) => Err(Failure::session(format!("the listing failed: {e}"))),
        }
    }
    .await;
    agent.stop(AGENT_GRACE).await;
    drop(dir);
    let list = listed?;
    print!("{}", table(&list));
    Ok(0)
}

/// Formats the listing as an aligned table with a header; says so when empty.
pub fn table(list: &[SessionListing]) -> String {
    if list.is_empty() {
        return "no graft sessions on this target\n".to_owned();
    }
    let rows: Vec<[String; 5]> = list
        .iter()
        .map(|l| {
            [
                l.client.clone(),
                l.subscription.mode.to_string(),
                l.subscription.port.to_string(),
                l.subscription
                    .filter
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), ToString::to_string),
                graft_since(l.since_unix),
            ]
        })
        .collect();
    let header = ["SESSION", "MODE", "PORT", "FILTER", "SINCE"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `HH:MM:SS UTC` and how long ago.
fn graft_since(unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = unix % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC ({}s ago)",
        s / 3600,
        s / 60 % 60,
        s % 60,
        now.saturating_sub(unix)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_protocol::incoming::{
        Combine, FilterRule, HttpFilterSpec, IncomingMode, Subscription,
    };

    #[test]
    fn listing_is_a_table() {
        let list = vec![
            SessionListing {
                client: "alice@box".into(),
                since_unix: 3600 + 61,
                subscription: Subscription {
                    port: 80,
                    mode: IncomingMode::Steal,
                    filter: Some(HttpFilterSpec {
                        combine: Combine::AllOf,
                        rules: vec![FilterRule::Header("x-user: alice".into())],
                    }),
                },
            },
            SessionListing {
                client: "bob@box".into(),
                since_unix: 7200,
                subscription: Subscription {
                    port: 8080,
                    mode: IncomingMode::Mirror,
                    filter: None,
                },
            },
        ];
        let out = table(&list);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].starts_with("SESSION"), "{out}");
        assert!(
            lines[1].contains("alice@box") && lines[1].contains("steal"),
            "{out}"
        );
        assert!(lines[1].contains(r#"header~"x-user: alice""#), "{out}");
        assert!(lines[1].contains("01:01:01 UTC"), "{out}");
        assert!(
            lines[2].contains("bob@box") && lines[2].contains("mirror"),
            "{out}"
        );
        assert_eq!(table(&[]), "no graft sessions on this target\n");
    }
}
