//! `graft ls`: the sessions on a target — who holds which port, in which mode,
//! with which filter, since when. It asks the target's hub through an agent of its
//! own, which never becomes the hub itself (no session: nothing to list): a local
//! agent for `pid:PID`, a short-lived node-mode agent pod for a Kubernetes target.

use std::path::PathBuf;

use graft_config::{AgentMode, KubeSettings, Target};
use graft_protocol::incoming::{SessionListing, clock};
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
        .map_err(|e: graft_config::ConfigError| Failure::usage_error(&e))?;
    let list = match target {
        Target::Pid(pid) => list_local(pid).await?,
        Target::Kube(text) => list_in_cluster(&text, &args).await?,
    };
    if args.output.json() {
        crate::output::print_json(&crate::output::LsJson::new(&list))?;
    } else {
        print!("{}", table(&list));
    }
    Ok(0)
}

/// Asks the session's agent for the hub's listing.
async fn ask(session: graft_proxy::Session) -> Result<Vec<SessionListing>, Failure> {
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

fn quiet() -> SessionOptions {
    SessionOptions {
        announce_steals: false,
        ..SessionOptions::default()
    }
}

async fn list_local(pid: u32) -> Result<Vec<SessionListing>, Failure> {
    let exe = std::env::current_exe().ok();
    let pieces = locate(exe.as_deref(), &|name| std::env::var_os(name))?;
    let uid = nix::unistd::getuid().as_raw();
    let dir = SessionDir::create(uid, std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from))?;
    let secret = random_hex(32)?;
    let mut agent = LocalAgent::start(&pieces.agent, pid, dir.path(), &secret, None).await?;
    let listed = async {
        let session = agent
            .connect(&secret, &crate::run::client_name(), quiet())
            .await?;
        ask(session).await
    }
    .await;
    agent.stop(AGENT_GRACE).await;
    drop(dir);
    listed
}

/// A Kubernetes target: a node-mode agent (a pod graft deletes right after,
/// unlike an ephemeral container, which would stay in the pod's spec) joins the
/// pod's hub and asks it.
async fn list_in_cluster(text: &str, args: &LsArgs) -> Result<Vec<SessionListing>, Failure> {
    if text == crate::cluster::TARGETLESS {
        return Err(Failure::usage(
            "a targetless session takes no incoming traffic: there is nothing to list",
        ));
    }
    let settings = KubeSettings {
        namespace: args.kube.namespace.clone(),
        context: args.kube.context.clone(),
        kubeconfig: args.kube.kubeconfig.clone(),
        agent_mode: AgentMode::Node,
        agent_image: args.agent_image.clone(),
        pull_policy: args.agent_pull_policy.clone(),
        start_timeout_secs: graft_config::DEFAULT_START_TIMEOUT_SECS,
        ready_timeout_secs: graft_config::DEFAULT_READY_TIMEOUT_SECS,
        all_pods: false,
        ..KubeSettings::default()
    };
    let secret = random_hex(32)?;
    let mut progress = crate::cluster::Progress::new();
    let started = crate::cluster::start(text, &settings, &secret, &mut progress).await;
    progress.finish();
    let crate::cluster::Started {
        primary: (agent, stream),
        ..
    } = started?;
    let listed = match graft_proxy::Session::connect_with(
        stream,
        &secret,
        &crate::run::client_name(),
        quiet(),
    )
    .await
    {
        Ok(session) => ask(session).await,
        Err(e) => Err(Failure::session(format!(
            "cannot open the session with the agent: {e}"
        ))),
    };
    agent.stop().await;
    listed
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
    format!("{} ({}s ago)", clock(unix), now.saturating_sub(unix))
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
                    responses: false,
                },
            },
            SessionListing {
                client: "bob@box".into(),
                since_unix: 7200,
                subscription: Subscription {
                    port: 8080,
                    mode: IncomingMode::Mirror,
                    filter: None,
                    responses: false,
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
