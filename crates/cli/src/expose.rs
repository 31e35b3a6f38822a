//! `graft expose LOCAL_PORT --as NAME`: traffic to a port of the target reaches a
//! port of this machine (ktunnel's job), until graft ends.
//!
//! - In a cluster (`targetless`, the default): a Service NAME in the namespace
//!   selects graft's own agent pod; the agent steals port P in that pod's network
//!   namespace (nothing listens there: its redirect catches the connections) and
//!   the session delivers each one to `127.0.0.1:LOCAL_PORT`. The Service is owned
//!   by the agent's Job, so the cluster removes it with the Job whatever ends
//!   graft; graft deletes both on its way out, `graft clean` what is left.
//! - For `pid:PID`: port P of that process's network namespace is stolen the same
//!   way, nothing is created.
//!
//! ```text
//! NAME:P ──► agent pod:P ──(steal)──► link ──► 127.0.0.1:LOCAL_PORT
//! ```

use std::net::{Ipv4Addr, SocketAddr};

use clap::Args;
use graft_config::Target;
use graft_kube::{ClientOptions, KubeError, expose as kexpose};
use graft_proxy::{Delivery, Session, SessionOptions};

use crate::{
    cluster::TARGETLESS,
    failure::{EXIT_SESSION, Failure},
    front::{TargetFlags, open_session},
    open::Opened,
    process::Signals,
};

/// `graft expose` flags.
#[derive(Debug, Args)]
pub struct ExposeArgs {
    /// The local port that receives the traffic (on 127.0.0.1).
    #[arg(value_name = "LOCAL_PORT")]
    pub local_port: u16,
    /// The Service's name (a DNS label: lower-case letters, digits, `-`). Needed
    /// in a cluster; for `pid:` targets only a label for messages.
    #[arg(long = "as", value_name = "NAME")]
    pub name: Option<String>,
    /// The port of the Service (or of the `pid:` target) [default: LOCAL_PORT].
    #[arg(long, value_name = "P")]
    pub port: Option<u16>,
    /// The target and how to reach it.
    #[command(flatten)]
    pub target: TargetFlags,
}

/// Checks a Service name: an RFC 1035 label, as Kubernetes requires of Services.
fn check_service_name(name: &str) -> Result<(), Failure> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Failure::usage(format!(
            "--as {name:?} is not a valid Service name: at most 63 lower-case letters, digits \
             and `-`, starting with a letter and not ending with `-` (RFC 1035)"
        )))
    }
}

fn kube_failure(e: KubeError) -> Failure {
    let forbidden = e.is_forbidden();
    let failure = Failure::session_error(&e);
    if forbidden {
        failure.hint("ask for the permissions in deploy/rbac.yaml, or run `graft doctor`")
    } else {
        failure
    }
}

/// Runs `graft expose` until Ctrl-C (exit 0) or the link is lost (exit 1).
pub async fn expose(args: ExposeArgs) -> Result<u8, Failure> {
    if args.local_port == 0 {
        return Err(Failure::usage("LOCAL_PORT cannot be 0"));
    }
    let port = args.port.unwrap_or(args.local_port);
    if port == 0 {
        return Err(Failure::usage("--port cannot be 0"));
    }
    let config = args.target.resolve()?;
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, args.local_port));
    match &config.target {
        Target::Pid(_) => {
            let front = open_session(&config, quiet()).await?;
            let Opened { session, agents } = front.opened;
            let result = serve(&session, port, local, &config.target.to_string()).await;
            session.close().await;
            agents.stop(!matches!(result, Ok(0))).await;
            drop(front.dir);
            result
        }
        Target::Kube(text) if text == TARGETLESS => {
            let name = args.name.as_deref().ok_or_else(|| {
                Failure::usage("graft expose in a cluster needs --as NAME, the Service's name")
            })?;
            check_service_name(name)?;
            in_cluster(&config, name, port, local).await
        }
        Target::Kube(text) => Err(Failure::usage(format!(
            "graft expose makes a pod of its own; it does not take a workload target ({text})"
        ))
        .hint(
            "leave --target out (or use `targetless`); to send a workload's traffic to this \
             machine, use `graft run --target … --steal`",
        )),
    }
}

/// Session options: steal, without the layer's announcement (expose says it itself).
fn quiet() -> SessionOptions {
    SessionOptions {
        announce_steals: false,
        ..SessionOptions::default()
    }
}

/// The cluster path: check NAME, place the agent, steal P, create the Service,
/// wait, and delete the Service and the agent on every way out.
async fn in_cluster(
    config: &graft_config::Config,
    name: &str,
    port: u16,
    local: SocketAddr,
) -> Result<u8, Failure> {
    let cluster = graft_kube::connect(&ClientOptions {
        kubeconfig: config.kube.kubeconfig.clone(),
        context: config.kube.context.clone(),
        namespace: config.kube.namespace.clone(),
    })
    .await
    .map_err(kube_failure)?;
    // Before anything is placed: a foreign Service is never taken over.
    kexpose::check_name_free(&cluster.client, &cluster.namespace, name)
        .await
        .map_err(kube_failure)?;
    let front = open_session(config, quiet()).await?;
    let Opened { session, agents } = front.opened;
    let placement = agents
        .cluster_placement()
        .cloned()
        .expect("a targetless session has a cluster agent");
    let created = async {
        take(&session, port, local, "the agent pod").await?;
        let job = placement
            .job
            .as_deref()
            .expect("a targetless agent runs as a Job");
        let session_id = job
            .strip_prefix(graft_kube::manifest::EPHEMERAL_NAME_PREFIX)
            .unwrap_or(job);
        let owner = kexpose::job_owner(&cluster.client, &placement.namespace, job)
            .await
            .map_err(kube_failure)?;
        let service = kexpose::expose_service(
            &placement.namespace,
            name,
            port,
            session_id,
            local.port(),
            Some(owner),
        );
        kexpose::create_service(&cluster.client, &service)
            .await
            .map_err(kube_failure)
    };
    let result = match created.await {
        Ok(()) => {
            let target = format!("Service {}/{name}", placement.namespace);
            let served = serve(&session, port, local, &target).await;
            if let Err(e) =
                kexpose::delete_service(&cluster.client, &placement.namespace, name).await
            {
                eprintln!(
                    "graft: could not delete Service {}/{name}: {e}; it goes with the agent's \
                     Job, or run `graft clean`",
                    placement.namespace
                );
            }
            served
        }
        Err(failure) => Err(failure),
    };
    session.close().await;
    agents.stop(!matches!(result, Ok(0))).await;
    drop(front.dir);
    result
}

/// Steals `port` of the target to `local`.
async fn take(session: &Session, port: u16, local: SocketAddr, what: &str) -> Result<(), Failure> {
    session
        .steal(port, Delivery::Listener(local))
        .await
        .map_err(|e| Failure::session(format!("cannot take port {port} of {what}: {e}")))
}

/// Steals `port` to `local` and waits for Ctrl-C or the link's end.
async fn serve(session: &Session, port: u16, local: SocketAddr, what: &str) -> Result<u8, Failure> {
    let mut signals = Signals::new()?;
    take(session, port, local, what).await?;
    eprintln!("graft: {what} port {port} → this machine's {local} (Ctrl-C ends it)");
    let closed = session.closed();
    let code = tokio::select! {
        received = signals.recv() => {
            tracing::info!(signal = ?received, "ending the expose");
            0
        }
        reason = closed => {
            eprintln!("graft: lost the link to the agent ({reason}); the expose ends");
            EXIT_SESSION
        }
    };
    if code == 0 {
        session.release(port).await;
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_follow_rfc_1035() {
        for good in ["web", "web-dev", "a1", &"a".repeat(63)] {
            assert!(check_service_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Web",
            "1web",
            "web-",
            "web_dev",
            "web.dev",
            &"a".repeat(64),
        ] {
            assert!(check_service_name(bad).is_err(), "{bad}");
        }
    }
}
