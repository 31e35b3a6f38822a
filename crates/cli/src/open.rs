//! Opening a session with the agent beside a target, for every command that needs
//! one (`run`, and the front ends without the layer: a mount, a port-forward, a
//! connected machine): start the local agent (`pid:`) or place one in the cluster,
//! open the session (and the `--all-pods` secondaries), and stop what was started
//! on every way out, a signal during the start included.
//!
//! ```text
//! open(target) ──► Opened { session, agents } ──► (the command's work) ──► agents.stop()
//! ```

use std::{path::Path, time::Duration};

use graft_config::{Config, Target};
use graft_proxy::{Session, SessionOptions};

use crate::{
    agent::LocalAgent,
    cluster::{self, ClusterAgent},
    failure::Failure,
    process::Signals,
    run::client_name,
};

/// How long the agent may take to clean up and exit after the link closes.
const AGENT_GRACE: Duration = Duration::from_secs(3);

/// What a command needs to open a session.
pub struct OpenRequest<'a> {
    /// The resolved configuration: its target and `[kube]` settings are used.
    pub config: &'a Config,
    /// The session's private directory (the local agent's socket and log go there).
    pub dir: &'a Path,
    /// The `graft-agent` binary for a `pid:` target.
    pub agent_binary: &'a Path,
    /// The session secret both ends prove.
    pub secret: &'a str,
    /// `GRAFT_LOG`, passed on to a local agent.
    pub graft_log: Option<&'a str>,
    /// Incoming mode, filter and timeouts of the session (and of the secondaries).
    pub options: SessionOptions,
}

/// An open session and the agents behind it.
pub struct Opened {
    /// The session with the agent of the target (the chosen pod's, with
    /// `--all-pods`).
    pub session: Session,
    /// What [`Agents::stop`] ends once the session is closed.
    pub agents: Agents,
}

/// The agents a session started, and the `--all-pods` secondaries.
pub struct Agents {
    placed: Placed,
    secondaries: Vec<Session>,
    /// What `--copy-target` made (the copy, a scaled-down workload), undone
    /// last.
    teardown: Option<crate::copy::Teardown>,
    /// Tasks that report a secondary's lost link; aborted at the end, when the
    /// links end on purpose.
    watchers: Vec<tokio::task::JoinHandle<()>>,
}

enum Placed {
    Local(Box<LocalAgent>),
    Cluster(Vec<ClusterAgent>),
}

impl Agents {
    /// Where the session's own cluster agent was placed; `None` for a local agent.
    pub fn cluster_placement(&self) -> Option<&graft_kube::AgentPlacement> {
        match &self.placed {
            Placed::Cluster(agents) => agents.first().map(ClusterAgent::placement),
            Placed::Local(_) => None,
        }
    }

    /// Closes the secondaries and stops every agent: a local agent is given
    /// [`AGENT_GRACE`] to remove its rules after the link closed (its log tail is
    /// printed when `link_lost` and it failed), cluster agents' pods or Jobs are
    /// deleted. Call after the primary session is closed.
    pub async fn stop(self, link_lost: bool) {
        for watcher in self.watchers {
            watcher.abort();
        }
        for secondary in self.secondaries {
            secondary.close().await;
        }
        match self.placed {
            Placed::Local(mut agent) => {
                let code = agent.stop(AGENT_GRACE).await;
                if link_lost && code.is_some_and(|c| c != 0) {
                    for line in agent.log_tail() {
                        eprintln!("{line}");
                    }
                }
            }
            Placed::Cluster(agents) => {
                for agent in agents {
                    agent.stop().await;
                }
            }
        }
        if let Some(mut teardown) = self.teardown {
            teardown.run().await;
        }
    }
}

/// Starts or places the agent for `request.config.target` and opens the session.
///
/// # Errors
///
/// A [`Failure`] that says what to do: no such process, missing privileges, the
/// cluster's own errors (RBAC, image, target not found), a refused session, or a
/// signal that arrived during the start (everything started is stopped first).
pub async fn open(request: OpenRequest<'_>) -> Result<Opened, Failure> {
    match &request.config.target {
        Target::Pid(pid) => {
            if !graft_proc::exists(*pid) {
                return Err(Failure::usage(format!("no process with PID {pid}"))
                    .hint("pick a running process (e.g. `pgrep -f server`)"));
            }
            let mut agent = LocalAgent::start(
                request.agent_binary,
                *pid,
                request.dir,
                request.secret,
                request.graft_log,
            )
            .await?;
            match agent
                .connect(request.secret, &client_name(), request.options)
                .await
            {
                Ok(session) => Ok(Opened {
                    session,
                    agents: Agents {
                        placed: Placed::Local(Box::new(agent)),
                        secondaries: Vec::new(),
                        teardown: None,
                        watchers: Vec::new(),
                    },
                }),
                Err(failure) => {
                    let code = agent.stop(AGENT_GRACE).await;
                    if code.is_some_and(|c| c != 0) {
                        for line in agent.log_tail() {
                            eprintln!("{line}");
                        }
                    }
                    Err(failure)
                }
            }
        }
        Target::Kube(text) => open_in_cluster(text, &request).await,
    }
}

/// The Kubernetes path: place the agent(s), open the session over the
/// port-forward, and remove what was placed when anything fails.
async fn open_in_cluster(text: &str, request: &OpenRequest<'_>) -> Result<Opened, Failure> {
    let mut signals = Signals::new()?;
    let mut progress = cluster::Progress::new();
    let mut teardown = crate::copy::Teardown::default();
    let started = tokio::select! {
        started = cluster::start_with(
            text, &request.config.kube, request.secret, &mut progress, &mut teardown,
        ) => started,
        received = signals.recv() => Err(Failure::session(format!(
            "stopped by {received:?} while starting the agent"
        ))),
    };
    let started = match started {
        Ok(started) => started,
        Err(failure) => {
            progress.finish();
            // A copy made, or a workload scaled down, before the failure.
            teardown.run().await;
            return Err(failure);
        }
    };
    let cluster::Started {
        primary: (agent, stream),
        others,
    } = started;
    let mut agents = vec![agent];
    progress.phase("opening the session");
    let client = client_name();
    let session = tokio::select! {
        session = Session::connect_with(stream, request.secret, &client, request.options.clone()) => {
            session.map_err(|e| Failure::session(format!(
                "cannot open the session with the agent: {e}"
            )))
        }
        received = signals.recv() => Err(Failure::session(format!(
            "stopped by {received:?} while opening the session"
        ))),
    };
    // --all-pods: the other pods' agents serve incoming traffic only.
    let mut secondaries = Vec::new();
    let mut watchers = Vec::new();
    // The primary announces each port once; secondaries report only refusals.
    let secondary_options = SessionOptions {
        announce_steals: false,
        ..request.options.clone()
    };
    for (other, stream) in others {
        if let Ok(primary) = &session {
            match Session::connect_with(stream, request.secret, &client, secondary_options.clone())
                .await
            {
                Ok(secondary) => {
                    primary.add_secondary(&secondary);
                    let closed = secondary.closed();
                    watchers.push(tokio::spawn(async move {
                        let reason = closed.await;
                        eprintln!(
                            "graft: lost the link to one of the --all-pods agents ({reason}); \
                             that pod keeps its own traffic"
                        );
                    }));
                    secondaries.push(secondary);
                }
                Err(e) => eprintln!("graft: an --all-pods agent refused the session: {e}"),
            }
        }
        agents.push(other);
    }
    if !secondaries.is_empty() {
        eprintln!(
            "graft: --all-pods: incoming traffic of {} pods",
            secondaries.len() + 1
        );
    }
    progress.finish();
    let agents = Agents {
        placed: Placed::Cluster(agents),
        teardown: Some(teardown),
        secondaries,
        watchers,
    };
    match session {
        Ok(session) => Ok(Opened { session, agents }),
        Err(failure) => {
            agents.stop(true).await;
            Err(failure)
        }
    }
}
