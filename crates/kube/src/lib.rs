//! graft's Kubernetes layer: between the CLI and the Kubernetes API.
//!
//! It turns a target (`deploy/api/container/web`) into one pod and container,
//! places the agent beside it, and opens the port-forward the proxy's session
//! runs over. Pure parts (the target grammar, pod and container choice, the
//! manifests graft sends, the RBAC permissions) are kept apart from the parts
//! that talk to a cluster (`resolve`, `place`, `events`), so they are tested
//! without one.
//!
//! A session with a Kubernetes target, in the order the CLI calls this crate:
//!
//! 1. [`KubeTarget`] from the `--target` text; [`connect`] with the kubectl
//!    flags ([`ClientOptions`]) gives a [`Cluster`];
//! 2. [`resolve`] → a [`Resolution`]: the chosen pod, container, container ID
//!    and node, and every candidate pod (the CLI says which it took);
//!    [`resolve_waiting`] waits, bounded, for a pod that is not Ready yet;
//! 3. [`AgentOptions`] with the session ID and [`SecretDigest::of`] the
//!    session secret (the secret itself never enters a spec: see
//!    [`manifest`]); then [`add_ephemeral_agent`] (default) or
//!    [`create_node_agent`] (`--agent-mode node`);
//! 4. [`wait_for_agent`] → the agent's loopback port, or an error with the
//!    pod's events;
//! 5. [`port_forward`] → the byte stream for the session's link;
//! 6. at the end, [`delete_agent_job`] in node mode (ephemeral containers
//!    cannot be removed; the agent exits by itself, and the cluster deletes
//!    a node-mode agent's Job when its agent exits).
//!
//! The agent image's `graft-agent` must accept what [`manifest`] sends:
//! `GRAFT_AGENT_SECRET_SHA256` instead of `GRAFT_AGENT_SECRET`, and in node
//! mode `--target-container-id ID` instead of `--target-pid`.
//!
//! With `--copy-target` the CLI first makes a [`copy`] of the target pod
//! (and with `--scale-down` scales the original workload to 0, [`scale`]),
//! then resolves and places the agent in the copy as above.
//!
//! Besides sessions, [`doctor`] checks a cluster and namespace before one
//! (`graft doctor`) and [`clean`] removes what crashed sessions left
//! (`graft clean`); [`targets`] lists what `--target` can name (`graft
//! targets`).
//!
//! Only APIs that are GA since Kubernetes 1.25 are used. `deploy/rbac.yaml`
//! grants exactly the permissions in [`rbac::ALL`].

pub mod clean;
pub mod clean_copy;
pub mod copy;
pub mod doctor;
mod error;
pub mod events;
pub mod expose;
pub mod job;
pub mod manifest;
pub mod place;
pub mod rbac;
mod resolve;
pub mod scale;
pub mod select;
mod target;
pub mod targets;
pub mod tls_secret;

pub use clean::{CleanReport, clean};
pub use doctor::{Check, DoctorOptions, Outcome, Verdict, run_checks, run_checks_on};
pub use error::KubeError;
pub use job::delete_agent_job;
pub use manifest::{AgentOptions, SecretDigest, SessionId};
pub use place::{
    AgentMode, AgentPlacement, AgentReady, PortForward, add_ephemeral_agent, agent_pods,
    create_node_agent, create_targetless_agent, delete_node_agent, port_forward, wait_for_agent,
};
pub use resolve::{ClientOptions, Cluster, Resolution, connect, resolve, resolve_waiting};
pub use select::{ContainerChoice, ContainerReason, ResolvedTarget};
pub use target::{KubeTarget, ParseTargetError, WorkloadKind};
