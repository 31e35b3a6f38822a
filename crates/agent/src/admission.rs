//! Admission of the client on a TCP listener: several connections may arrive
//! before the real client's (anything in the target's pod can reach the agent's
//! loopback port), so each one gets its own handshake with a deadline of
//! [`HANDSHAKE_TIMEOUT`], and the first that proves the session secret becomes
//! the session. At most [`MAX_PENDING`] handshakes run at once; a new connection
//! beyond that closes the oldest pending one, so a flood of idle connections
//! cannot keep a fresh client out (it would have to open more than
//! `MAX_PENDING` connections within the client's own handshake). A connection
//! that stays idle, speaks garbage or knows no secret is refused on its own and
//! never ends the agent or blocks the client.
//!
//! A Unix listener needs none of this: its socket file admits only its owner
//! (mode 0600), so the first connection is the client.

use std::collections::VecDeque;
use std::time::Duration;

use graft_protocol::relink::{self, BoxTransport, Reattach, Relink, RelinkOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};

use crate::session::{self, Admitted, Secret, SessionEnd};

/// How long a connection may take from `accept` to an accepted `Hello` (relink
/// attach included).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most handshakes in progress at once; a connection beyond closes the
/// oldest pending one.
pub const MAX_PENDING: usize = 32;

/// The admitted client of a TCP listener.
pub enum Client {
    /// A plain link on the TCP connection.
    Plain(Admitted<TcpStream>),
    /// A relink (port-forwarded client) whose later transports re-attach through
    /// the [`Reattach`].
    Relinked(Admitted<Relink>, Reattach),
}

/// Accepts connections on `listener` until one passes the handshake; returns it.
/// Each refused connection's reason is logged and kept in `last_refusal`, so a
/// caller that gives up waiting can say why.
///
/// # Cancel safety
///
/// Dropping the future closes every connection still in its handshake.
pub async fn first_client(
    listener: &TcpListener,
    secret: &Secret,
    target_pid: u32,
    last_refusal: &mut Option<String>,
) -> Client {
    let mut pending: JoinSet<Result<Client, String>> = JoinSet::new();
    let mut oldest_first: VecDeque<AbortHandle> = VecDeque::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    oldest_first.retain(|h| !h.is_finished());
                    if oldest_first.len() >= MAX_PENDING
                        && let Some(oldest) = oldest_first.pop_front()
                    {
                        tracing::warn!(
                            "{MAX_PENDING} connections are in their handshake; the oldest \
                             is closed for the one from {peer}"
                        );
                        oldest.abort();
                    }
                    tracing::debug!(%peer, "a connection to admit");
                    oldest_first.push_back(pending.spawn(admit(stream, secret.clone(), target_pid)));
                }
                Err(e) => {
                    // EMFILE and friends: wait for descriptors to come back.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(done) = pending.join_next(), if !pending.is_empty() => match done {
                Ok(Ok(client)) => return client,
                Ok(Err(reason)) => {
                    tracing::warn!("a connection was refused: {reason}");
                    *last_refusal = Some(reason);
                }
                Err(e) if e.is_cancelled() => {}
                Err(e) => tracing::warn!("a handshake task failed: {e}"),
            },
        }
    }
}

/// One connection's handshake, within [`HANDSHAKE_TIMEOUT`].
async fn admit(stream: TcpStream, secret: Secret, target_pid: u32) -> Result<Client, String> {
    let _ = stream.set_nodelay(true);
    let handshake = async {
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        if crate::relink::starts_with_attach(&stream, HANDSHAKE_TIMEOUT).await {
            let mut transport: BoxTransport = Box::new(stream);
            let attach = relink::read_attach(&mut transport)
                .await
                .map_err(|e| format!("bad relink attach: {e}"))?;
            let (link, reattach) = Relink::server(transport, attach, RelinkOptions::default())
                .await
                .map_err(|e| format!("answering the relink attach failed: {e}"))?;
            let admitted = session::handshake(link, &secret, target_pid, left())
                .await
                .map_err(reason)?;
            Ok(Client::Relinked(admitted, reattach))
        } else {
            let admitted = session::handshake(stream, &secret, target_pid, left())
                .await
                .map_err(reason)?;
            Ok(Client::Plain(admitted))
        }
    };
    // The inner deadline covers reads; this one also covers a peer that never
    // reads our answers.
    tokio::time::timeout(HANDSHAKE_TIMEOUT + Duration::from_secs(1), handshake)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no complete handshake within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            ))
        })
}

fn reason(end: SessionEnd) -> String {
    match end {
        SessionEnd::Refused(reason) | SessionEnd::LinkError(reason) => reason,
        other => format!("{other:?}"),
    }
}
