//! A client's remote requests (files, DNS, the environment, outgoing sockets
//! as descriptors), each served on a task of its own and answered on the
//! responses' channel.

use super::*;

/// Serves one request; `_permit` is released once its answer is queued for the
/// writer.
pub(super) async fn serve_request(
    id: RequestId,
    request: RemoteRequest,
    services: Arc<Services>,
    responses: mpsc::Sender<AgentMessage>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let response = match request {
        RemoteRequest::Env => {
            let pid = services.pid;
            blocking(move || crate::env::target_env(pid)).await
        }
        RemoteRequest::Resolve { host, family } => services.dns.resolve(&host, family).await,
        RemoteRequest::Sessions => match services.access.list().await {
            Ok(list) => RemoteResponse::Sessions(list),
            Err(e) => RemoteResponse::Error(RemoteError::Other(e.to_string())),
        },
        RemoteRequest::ConnectFd { remote } if services.fd_out.is_some() => {
            match crate::outgoing::connect_fd(remote) {
                Ok(fd) => {
                    tracing::debug!(%remote, "outgoing socket passed as a descriptor");
                    let fd_out = services.fd_out.as_ref().expect("checked by the guard");
                    let connected = AgentMessage::Response {
                        id,
                        response: RemoteResponse::FdConnected,
                    };
                    if let Err(fd) = fd_out.send(fd, connected).await {
                        crate::passing::reset(fd);
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "no outgoing socket passed");
                    RemoteResponse::Error(e)
                }
            }
        }
        RemoteRequest::ConnectFd { .. } => RemoteResponse::Error(RemoteError::Unsupported(
            "this link passes no descriptors; connect with a relayed connection".into(),
        )),
        RemoteRequest::OpenFd { path, flags, mode } if services.fd_out.is_some() => {
            let files = services.files.clone();
            let opened = tokio::task::spawn_blocking(move || {
                let opened = files.open_fd(&path, &flags, mode);
                if let Err(e) = &opened {
                    tracing::debug!(path, error = %e, "file not passed as a descriptor");
                }
                opened
            })
            .await
            .unwrap_or_else(|e| {
                Err(RemoteError::Other(format!(
                    "the agent's worker failed: {e}"
                )))
            });
            match opened {
                Ok((fd, stat)) => {
                    let fd_out = services.fd_out.as_ref().expect("checked by the guard");
                    let _ = fd_out
                        .send(
                            fd,
                            AgentMessage::Response {
                                id,
                                response: RemoteResponse::FdOpened { stat },
                            },
                        )
                        .await;
                    // A file the link could not take closes with it (Err drops it).
                    return;
                }
                Err(e) => RemoteResponse::Error(e),
            }
        }
        // Only a program on this machine can open the root itself: a link that
        // passes descriptors is a local target's.
        RemoteRequest::TargetRoot if services.fd_out.is_some() => {
            match services.files.root_identity(services.pid) {
                Ok(identity) => {
                    tracing::debug!(?identity, "the target's root named for a direct open");
                    RemoteResponse::TargetRoot(identity)
                }
                Err(e) => RemoteResponse::Error(e),
            }
        }
        RemoteRequest::TargetRoot => RemoteResponse::Error(RemoteError::Unsupported(
            "the target is not on this machine: its root cannot be opened directly".into(),
        )),
        file_request => {
            let files = services.files.clone();
            blocking(move || files.handle(file_request)).await
        }
    };
    let _ = responses
        .send(AgentMessage::Response { id, response })
        .await;
}

async fn blocking(f: impl FnOnce() -> RemoteResponse + Send + 'static) -> RemoteResponse {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        RemoteResponse::Error(RemoteError::Other(format!(
            "the agent's worker failed: {e}"
        )))
    })
}
