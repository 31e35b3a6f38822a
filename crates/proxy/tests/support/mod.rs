//! The scripted fake agent the proxy's integration tests drive: the agent's end of
//! an in-memory link, and helpers to open a session with it.

#![allow(dead_code)]

use std::{future::Future, path::PathBuf, time::Duration};

use futures::{SinkExt, StreamExt};
use graft_protocol::{
    PROTOCOL_VERSION,
    codec::FrameCodec,
    link::{AgentMessage, ClientMessage, HelloReply},
};
use graft_proxy::{ProxyError, Session, SessionOptions};
use tokio::io::DuplexStream;
use tokio_util::codec::Framed;

pub const DEADLINE: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test when it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A scratch directory removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("graft-proxy-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent's end of the link, driven by the test.
pub struct FakeAgent {
    pub link: Framed<DuplexStream, FrameCodec<ClientMessage, AgentMessage>>,
}

impl FakeAgent {
    /// The next message that is not a keepalive ping.
    pub async fn recv(&mut self) -> ClientMessage {
        loop {
            let message = within("a frame from the proxy", self.link.next())
                .await
                .expect("the proxy closed the link")
                .expect("a valid frame");
            if !matches!(message, ClientMessage::Ping(_)) {
                return message;
            }
        }
    }

    pub async fn send(&mut self, message: AgentMessage) {
        self.link.send(message).await.unwrap();
    }
}

pub fn test_options() -> SessionOptions {
    SessionOptions {
        announce_steals: false,
        ..SessionOptions::default()
    }
}

/// Opens a session whose agent accepts with `reply`.
pub async fn session_with(
    reply: HelloReply,
    options: SessionOptions,
) -> (Result<Session, ProxyError>, FakeAgent) {
    let (client, agent) = tokio::io::duplex(1 << 20);
    let mut agent = FakeAgent {
        link: Framed::new(agent, FrameCodec::new()),
    };
    let agent_side = async {
        match agent.recv().await {
            ClientMessage::Hello(hello) => {
                assert_eq!(hello.secret, "s3cret");
                assert_eq!(hello.client, "me@here");
                // This release's version, naming the tap times graft reads.
                assert_eq!(
                    graft_protocol::version::check_compatible(&hello.version),
                    Ok(())
                );
                assert!(
                    graft_protocol::version::has_feature(
                        &hello.version,
                        graft_protocol::version::FEATURE_TAP_TIMES
                    ),
                    "{}",
                    hello.version
                );
            }
            other => panic!("expected Hello, got {other:?}"),
        }
        agent.send(AgentMessage::Hello(reply)).await;
    };
    let (session, ()) = tokio::join!(
        Session::connect_with(client, "s3cret", "me@here", options),
        agent_side
    );
    (session, agent)
}

pub async fn open_session(options: SessionOptions) -> (Session, FakeAgent) {
    let (session, agent) = session_with(
        HelloReply::Accepted {
            version: PROTOCOL_VERSION.into(),
            target_pid: 42,
        },
        options,
    )
    .await;
    (session.expect("handshake accepted"), agent)
}
