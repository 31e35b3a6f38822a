//! The agent's side of a link that survives its transport
//! ([`graft_protocol::relink`]): a TCP client whose first bytes are the relink
//! magic gets a link that later connections with its token re-attach to.

use std::time::Duration;

use graft_protocol::relink::{self, Reattach};
use tokio::net::{TcpListener, TcpStream};

/// Whether the first bytes on `stream` (waiting at most `timeout` for them) are
/// a relink attach. Nothing is consumed.
pub async fn starts_with_attach(stream: &TcpStream, timeout: Duration) -> bool {
    let mut first = [0u8; 8];
    let peek = async {
        loop {
            match stream.peek(&mut first).await {
                Ok(n) if n >= first.len() => return relink::is_attach(&first),
                // A plain client's first frame header may already say no.
                Ok(n) if n > 0 && !relink::MAGIC.starts_with(&first[..n]) => return false,
                Ok(0) | Err(_) => return false,
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    };
    tokio::time::timeout(timeout, peek).await.unwrap_or(false)
}

/// Accepts connections on `listener` for as long as the session runs: each one
/// that attaches with the link's token replaces the link's transport; anything
/// else is closed. At most [`MAX_PENDING`](crate::admission::MAX_PENDING)
/// connections wait for their attach at once, each for at most
/// [`HANDSHAKE_TIMEOUT`](crate::admission::HANDSHAKE_TIMEOUT).
pub async fn accept_reattach(listener: TcpListener, reattach: Reattach) {
    let pending = std::sync::Arc::new(tokio::sync::Semaphore::new(crate::admission::MAX_PENDING));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections wait to re-attach; this one is closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let reattach = reattach.clone();
        tokio::spawn(async move {
            let mut transport: relink::BoxTransport = Box::new(stream);
            let attach = tokio::time::timeout(
                crate::admission::HANDSHAKE_TIMEOUT,
                relink::read_attach(&mut transport),
            )
            .await;
            drop(permit);
            match attach {
                Ok(Ok(attach))
                    if crate::session::secrets_match_bytes(&attach.token, &reattach.token()) =>
                {
                    tracing::info!(%peer, "the client re-attaches its link");
                    reattach.attach(transport, attach.received).await;
                }
                Ok(Ok(_)) => {
                    tracing::warn!(%peer, "a connection with another link's token was refused")
                }
                _ => tracing::debug!(%peer, "a connection that is no relink attach was closed"),
            }
        });
    }
}
