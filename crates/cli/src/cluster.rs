//! `graft run` against a Kubernetes target: resolve the target to a pod and
//! container, place the agent beside it, wait for it, and open the port-forward
//! that carries the session's link (TLS 1.3 to the agent's pinned certificate,
//! see [`graft_protocol::tls`]). The phases show on a spinner (on a terminal)
//! and as plain `graft:` lines for what the user must know (the chosen pod, the
//! agent's start time). Whatever graft created is removed by [`ClusterAgent::stop`],
//! which the caller runs on every exit path; an ephemeral container cannot be
//! removed (Kubernetes forbids it), its agent exits when the link closes. A
//! node-mode agent is a Job the cluster deletes when its agent exits, so a
//! killed graft leaves nothing either.

use std::time::{Duration, Instant};

use graft_config::{AgentMode as ConfigAgentMode, KubeSettings};
use graft_kube::place::{AgentState, agent_state};
use graft_kube::{
    AgentMode, AgentOptions, AgentPlacement, ClientOptions, Cluster, KubeError, KubeTarget,
    SecretDigest, SessionId, add_ephemeral_agent, create_node_agent, create_targetless_agent,
    delete_agent_job, port_forward, wait_for_agent,
};
use graft_protocol::relink::{BoxTransport, Reconnect, Relink, RelinkOptions};
use graft_protocol::tls::{self, Fingerprint};
use indicatif::{ProgressBar, ProgressStyle};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use crate::failure::Failure;
use crate::session_dir::random_hex;

/// The target that is no workload: outgoing traffic and DNS from a namespace.
pub const TARGETLESS: &str = "targetless";

/// How long deleting the node-mode agent's Job may take at the end.
const DELETE_TIMEOUT: Duration = Duration::from_secs(10);

/// The spinner of the start phases; silent when stderr is not a terminal.
pub struct Progress {
    bar: ProgressBar,
    phase_start: Instant,
}

impl Progress {
    /// A spinner on stderr.
    pub fn new() -> Progress {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} graft: {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        Progress {
            bar,
            phase_start: Instant::now(),
        }
    }

    /// Starts a phase.
    pub fn phase(&mut self, message: &str) {
        self.bar.reset_elapsed();
        self.phase_start = Instant::now();
        self.bar.set_message(message.to_owned());
    }

    /// Updates the current phase's detail.
    pub fn detail(&self, message: String) {
        self.bar.set_message(message);
    }

    /// How long the current phase has run.
    pub fn elapsed(&self) -> Duration {
        self.phase_start.elapsed()
    }

    /// Prints a line above the spinner (plainly when it is hidden).
    pub fn say(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("graft: {line}");
        } else {
            self.bar.println(format!("graft: {line}"));
        }
    }

    /// Removes the spinner.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// A port-forward's stream that ends its port-forward when dropped.
struct Forwarded {
    stream: Box<dyn graft_kube::place::AgentStream>,
    forwarder: kube::api::Portforwarder,
}

impl From<graft_kube::PortForward> for Forwarded {
    fn from(forward: graft_kube::PortForward) -> Forwarded {
        Forwarded {
            stream: forward.stream,
            forwarder: forward.forwarder,
        }
    }
}

impl Drop for Forwarded {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

impl tokio::io::AsyncRead for Forwarded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Forwarded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The agent of a Kubernetes session and what graft must clean up.
pub struct ClusterAgent {
    cluster: Cluster,
    placement: AgentPlacement,
}

pub(crate) fn kube_failure(e: KubeError) -> Failure {
    let hint = if e.is_forbidden() {
        Some("ask for the permissions in deploy/rbac.yaml, or run `graft doctor`")
    } else if e.is_agent_failure() {
        Some("run `graft doctor --target …` to check the namespace and the agent image")
    } else {
        None
    };
    let failure = if e.is_not_found() {
        Failure::usage_error(&e)
    } else {
        Failure::session_error(&e)
    };
    match hint {
        Some(h) => failure.hint(h),
        None => failure,
    }
}

/// What a new agent is told: a session id of its own, the secret's digest, the
/// image and pull policy of `settings`.
fn agent_options(settings: &KubeSettings, secret: &str) -> Result<AgentOptions, Failure> {
    let mut options = AgentOptions::new(session_id()?, SecretDigest::of(secret));
    if let Some(image) = &settings.agent_image {
        options.image = image.clone();
    }
    options.image_pull_policy = settings.pull_policy.clone();
    Ok(options)
}

/// A new session id: 10 lower-case hex digits.
fn session_id() -> Result<SessionId, Failure> {
    let hex = random_hex(5)?;
    SessionId::new(hex).map_err(|e| Failure::session(format!("bad session id: {e:?}")))
}

/// Resolves `target`, places the agent and opens the port-forward (with
/// `--all-pods`, on every ready pod of the workload); returns the agents (to stop
/// at the end) and the links' byte streams.
///
/// # Errors
///
/// A [`Failure`] naming what failed: the target (not found, no ready pod), a
/// missing permission, the agent not starting (with the pod's events), the
/// port-forward. Whatever was created before the failure is removed.
pub async fn start(
    target_text: &str,
    settings: &KubeSettings,
    secret: &str,
    progress: &mut Progress,
) -> Result<Started, Failure> {
    let mut teardown = crate::copy::Teardown::default();
    let started = start_with(target_text, settings, secret, progress, &mut teardown).await;
    if started.is_err() {
        teardown.run().await;
    }
    started
}

/// [`start`], with `--copy-target`: the copy (and the workload `--scale-down`
/// scaled) go into `teardown` as they are made, for the caller to undo at the
/// end of the session, or at once when this fails or is interrupted.
///
/// # Errors
///
/// As [`start`]; `teardown` then holds what is left to undo.
pub async fn start_with(
    target_text: &str,
    settings: &KubeSettings,
    secret: &str,
    progress: &mut Progress,
    teardown: &mut crate::copy::Teardown,
) -> Result<Started, Failure> {
    let targetless = target_text == TARGETLESS;
    let target: Option<KubeTarget> = if targetless {
        None
    } else {
        Some(
            target_text
                .parse()
                .map_err(|e: graft_kube::ParseTargetError| Failure::usage_error(&e))?,
        )
    };
    progress.phase(&format!("connecting to the cluster for {target_text}"));
    let cluster = graft_kube::connect(&ClientOptions {
        kubeconfig: settings.kubeconfig.clone(),
        context: settings.context.clone(),
        namespace: settings.namespace.clone(),
    })
    .await
    .map_err(kube_failure)?;

    let options = agent_options(settings, secret)?;
    let mut resolved: Option<graft_kube::Resolution> = None;
    let placement = match &target {
        None => {
            progress.phase(&format!(
                "creating a targetless agent pod in namespace {} ({})",
                cluster.namespace, options.image
            ));
            progress.say(&format!(
                "targetless: outgoing connections and names go out from namespace {}",
                cluster.namespace
            ));
            create_targetless_agent(&cluster.client, &options, &cluster.namespace).await
        }
        Some(target) if settings.copy_target => {
            if settings.scale_down {
                crate::copy::check_scalable(target)?;
            }
            let resolution =
                crate::copy::make_copy(&cluster, target, settings, &options, progress, teardown)
                    .await?;
            progress.phase(&format!("creating the agent ({})", options.image));
            let placed = place(&cluster, &resolution.target, &options, settings.agent_mode).await;
            resolved = Some(resolution);
            placed
        }
        Some(target) => {
            progress.phase(&format!(
                "resolving {target} in namespace {}",
                cluster.namespace
            ));
            // A workload whose pods run but are not Ready yet is waited for.
            let ready_timeout = Duration::from_secs(settings.ready_timeout_secs);
            let resolution = graft_kube::resolve_waiting(
                &cluster.client,
                &cluster.namespace,
                target,
                ready_timeout,
                |not_ready| {
                    progress.detail(format!(
                        "waiting up to {} s for {target} to have a Ready pod (not ready: {})",
                        ready_timeout.as_secs(),
                        not_ready.join(", ")
                    ))
                },
            )
            .await
            .map_err(kube_failure)?;
            let chosen = &resolution.target;
            let others = resolution.candidates.len().saturating_sub(1);
            progress.say(&format!(
                "target pod {}/{} (container {}, node {}){}",
                chosen.namespace,
                chosen.pod,
                chosen.container.name,
                chosen.node,
                if others > 0 {
                    format!(
                        "; the workload has {} ready pods, this one was picked",
                        others + 1
                    )
                } else {
                    String::new()
                }
            ));
            progress.phase(&format!("creating the agent ({})", options.image));
            let placed = place(&cluster, chosen, &options, settings.agent_mode).await;
            resolved = Some(resolution);
            placed
        }
    }
    .map_err(kube_failure)?;
    let mut agent = ClusterAgent {
        cluster: cluster.clone(),
        placement,
    };
    let stream = match agent.connect(settings, secret, progress).await {
        Ok(stream) => stream,
        Err(failure) => {
            agent.stop().await;
            return Err(failure);
        }
    };
    if let (true, Some(target)) = (settings.scale_down, &target) {
        let session = options.session.as_str();
        if let Err(failure) =
            crate::copy::scale_original(&cluster, target, session, progress, teardown).await
        {
            agent.stop().await;
            return Err(failure);
        }
    }
    let mut started = Started {
        primary: (agent, stream),
        others: Vec::new(),
    };
    if let (true, Some(resolution)) = (settings.all_pods, &resolved) {
        let container = resolution.target.container.name.clone();
        for pod in resolution.candidates.iter().skip(1) {
            match start_on_pod(&cluster, pod, &container, settings, secret, progress).await {
                Ok(other) => started.others.push(other),
                Err(failure) => progress.say(&format!(
                    "pod {pod} is left out of --all-pods: {}",
                    failure.message
                )),
            }
        }
    } else if settings.all_pods && resolved.is_none() {
        progress.say("--all-pods has no pods to add: the session is targetless");
    }
    Ok(started)
}

/// The agents of a session: the one that serves everything, and for
/// `--all-pods` those of the workload's other ready pods, which serve incoming
/// traffic only.
pub struct Started {
    /// The agent and link of the chosen pod.
    pub primary: (ClusterAgent, Box<dyn graft_kube::place::AgentStream>),
    /// The agents and links of the other pods.
    pub others: Vec<(ClusterAgent, Box<dyn graft_kube::place::AgentStream>)>,
}

/// From this many exited graft agents in one pod on, `graft run` suggests node
/// mode before it adds another.
const EXITED_AGENTS_WARN: usize = 3;

/// Places an agent beside `target` the way `mode` says.
async fn place(
    cluster: &Cluster,
    target: &graft_kube::ResolvedTarget,
    options: &AgentOptions,
    mode: ConfigAgentMode,
) -> Result<AgentPlacement, KubeError> {
    match mode {
        ConfigAgentMode::Ephemeral => {
            warn_exited_agents(cluster, target).await;
            add_ephemeral_agent(&cluster.client, target, options).await
        }
        ConfigAgentMode::Node => {
            create_node_agent(&cluster.client, target, options, &target.namespace).await
        }
    }
}

/// Says how many exited graft agents the target pod already carries when they
/// are [`EXITED_AGENTS_WARN`] or more: Kubernetes never removes an ephemeral
/// container, so each session adds one to the pod's spec and status until the
/// pod is re-created. A failure to read the pod says nothing: placing the agent
/// reports what matters.
async fn warn_exited_agents(cluster: &Cluster, target: &graft_kube::ResolvedTarget) {
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &target.namespace);
    let Ok(pod) = api.get(&target.pod).await else {
        return;
    };
    let exited: usize = graft_kube::clean::exited_ephemeral_agents(std::slice::from_ref(&pod))
        .iter()
        .map(|leftover| leftover.containers.len())
        .sum();
    if exited >= EXITED_AGENTS_WARN {
        eprintln!(
            "graft: warning: pod {}/{} already carries {exited} exited graft agents \
             (Kubernetes keeps every ephemeral container until the pod is re-created; \
             each session adds one): --agent-mode node places the agent in a pod of its \
             own, removed when the session ends",
            target.namespace, target.pod
        );
    }
}

/// Places and connects one more agent, on `pod` (`--all-pods`).
async fn start_on_pod(
    cluster: &Cluster,
    pod: &str,
    container: &str,
    settings: &KubeSettings,
    secret: &str,
    progress: &mut Progress,
) -> Result<(ClusterAgent, Box<dyn graft_kube::place::AgentStream>), Failure> {
    let target: KubeTarget = format!("pod/{pod}/container/{container}")
        .parse()
        .map_err(|e: graft_kube::ParseTargetError| Failure::usage_error(&e))?;
    progress.phase(&format!("--all-pods: resolving {target}"));
    let resolution = graft_kube::resolve(&cluster.client, &cluster.namespace, &target)
        .await
        .map_err(kube_failure)?;
    let options = agent_options(settings, secret)?;
    progress.phase(&format!("--all-pods: creating the agent on {pod}"));
    let placement = place(cluster, &resolution.target, &options, settings.agent_mode)
        .await
        .map_err(kube_failure)?;
    let mut agent = ClusterAgent {
        cluster: cluster.clone(),
        placement,
    };
    match agent.connect(settings, secret, progress).await {
        Ok(stream) => Ok((agent, stream)),
        Err(failure) => {
            agent.stop().await;
            Err(failure)
        }
    }
}

impl ClusterAgent {
    /// Where the agent was placed (its pod, Job and namespace).
    pub fn placement(&self) -> &AgentPlacement {
        &self.placement
    }

    /// Waits for the agent and opens the port-forward.
    async fn connect(
        &mut self,
        settings: &KubeSettings,
        secret: &str,
        progress: &mut Progress,
    ) -> Result<Box<dyn graft_kube::place::AgentStream>, Failure> {
        progress.phase("waiting for the agent to start");
        let timeout = Duration::from_secs(settings.start_timeout_secs.max(1));
        let client = &self.cluster.client;
        let placement = &self.placement;
        let wait = wait_for_agent(client, placement, timeout);
        let watch_state = async {
            let api: Api<Pod> = Api::namespaced(client.clone(), &placement.namespace);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Ok(pod) = api.get_opt(&placement.agent_pod).await {
                    let state = match agent_state(pod.as_ref(), placement) {
                        AgentState::Starting(what) => what,
                        AgentState::Running => "started, waiting for its ready line".into(),
                        AgentState::Failed(why) => why,
                    };
                    progress.detail(format!("waiting for the agent: {state}"));
                }
            }
        };
        let ready = tokio::select! {
            ready = wait => ready.map_err(kube_failure)?,
            () = watch_state => unreachable!("the state loop never ends"),
        };
        progress.say(&format!(
            "agent {} ready in {:.1} s",
            match placement.mode {
                AgentMode::Ephemeral =>
                    format!("(ephemeral container {})", placement.agent_container),
                AgentMode::Node => format!("(pod {})", placement.agent_pod),
            },
            progress.elapsed().as_secs_f64()
        ));
        // The agent's certificate, pinned: only the agent holds its key, so
        // nothing else in the pod can answer in its place.
        let pin: Fingerprint = match &ready.link_cert {
            Some(text) => text.parse().map_err(|e: String| {
                Failure::session(format!("the agent's link-cert line is unreadable: {e}"))
            })?,
            None => {
                return Err(Failure::session(
                    "the agent printed no link certificate before its ready line: its image is \
                     from a graft release before protocol 0.3, whose link is not encrypted",
                )
                .hint("use the agent image of this graft release (`graft agent-image`, or --agent-image)"));
            }
        };
        let connector = tls::connector(pin);
        progress.phase("opening the port-forward");
        let first = port_forward(client, placement, ready.port)
            .await
            .map_err(kube_failure)?;
        let first = tls::connect(&connector, Forwarded::from(first))
            .await
            .map_err(|e| {
                Failure::session(format!(
                    "the TLS handshake with the agent through the port-forward failed: {e}"
                ))
            })?;
        // The link outlives its port-forward: when the API server drops one, a
        // new one is opened and the agent re-attaches the link to it.
        let (client, placement, port) = (client.clone(), placement.clone(), ready.port);
        let reconnect: Reconnect = Box::new(move || {
            let (client, placement, connector) =
                (client.clone(), placement.clone(), connector.clone());
            Box::pin(async move {
                let forward = port_forward(&client, &placement, port)
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let stream = tls::connect(&connector, Forwarded::from(forward)).await?;
                Ok(Box::new(stream) as BoxTransport)
            })
        });
        let link = Relink::client(
            Box::new(first),
            reconnect,
            RelinkOptions::default(),
            secret.as_bytes().to_vec(),
        )
        .await
        .map_err(|e| {
            Failure::session(format!(
                "the agent did not answer through the port-forward: {e}"
            ))
        })?;
        Ok(Box::new(link))
    }

    /// Removes what graft created (the port-forward goes with the session's
    /// link): the node-mode or targetless agent's Job, whose pod the garbage
    /// collector deletes (waiting at most [`DELETE_TIMEOUT`]). Failures are
    /// printed, not returned: this runs on the way out. Should this never
    /// run (graft killed), the cluster deletes the Job when its agent exits.
    pub async fn stop(self) {
        let Some(job) = &self.placement.job else {
            return;
        };
        let namespace = &self.placement.namespace;
        let delete = delete_agent_job(&self.cluster.client, namespace, job);
        match tokio::time::timeout(DELETE_TIMEOUT, delete).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!(
                "graft: could not delete the agent's job {namespace}/{job}: {e}; the cluster \
                 deletes it when the agent exits, or run `graft clean`"
            ),
            Err(_) => eprintln!(
                "graft: deleting the agent's job {namespace}/{job} timed out; the cluster \
                 deletes it when the agent exits, or run `graft clean`"
            ),
        }
    }
}
