//! Routing records on a scripted agent: a session whose tap takes them names
//! the `routes` tag in its `Hello`, asks an agent that names it too for records
//! only while somebody watches, and hands each `Routed` to the tap; an agent
//! that does not name the tag (an older one) is never sent `WatchRoutes`.

mod support;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};
use std::time::Duration;

use graft_protocol::{
    incoming::{RoutedRequest, RoutedTo},
    link::{AgentMessage, ClientMessage, HelloReply},
    version::{FEATURE_ROUTES, has_feature, version_with},
};
use graft_proxy::{IncomingTap, ROUTES_POLL, Session};
use support::{FakeAgent, test_options, within};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

struct Opened {
    session: Session,
    agent: FakeAgent,
    watched: Arc<AtomicBool>,
    records: mpsc::Receiver<RoutedRequest>,
}

/// Opens a session with a routes-taking tap; the agent answers `version`.
async fn open(version: String) -> Opened {
    let watched = Arc::new(AtomicBool::new(false));
    let (connections, _) = mpsc::channel(4);
    let (routes, records) = mpsc::channel(4);
    let tap = IncomingTap::new(connections, {
        let watched = watched.clone();
        move || watched.load(Ordering::Relaxed)
    })
    .with_routes(routes);
    let mut options = test_options();
    options.incoming_tap = Some(tap);
    let (client, agent) = tokio::io::duplex(1 << 20);
    let mut agent = FakeAgent {
        link: Framed::new(agent, graft_protocol::codec::FrameCodec::new()),
    };
    let agent_side = async {
        match agent.recv().await {
            ClientMessage::Hello(hello) => {
                assert!(has_feature(&hello.version, FEATURE_ROUTES), "{hello:?}");
            }
            other => panic!("expected Hello, got {other:?}"),
        }
        agent
            .send(AgentMessage::Hello(HelloReply::Accepted {
                version,
                target_pid: 42,
            }))
            .await;
    };
    let (session, ()) = tokio::join!(
        Session::connect_with(client, "s3cret", "me@here", options),
        agent_side
    );
    Opened {
        session: session.expect("accepted"),
        agent,
        watched,
        records,
    }
}

#[tokio::test]
async fn records_are_asked_for_while_watched_and_reach_the_tap() {
    let mut opened = open(version_with(&[FEATURE_ROUTES])).await;
    opened.watched.store(true, Ordering::Relaxed);
    assert_eq!(opened.agent.recv().await, ClientMessage::WatchRoutes(true));
    let record = RoutedRequest {
        port: 80,
        to: RoutedTo::Target,
        started_unix_ms: 1,
        detail: None,
    };
    opened
        .agent
        .send(AgentMessage::Routed(Box::new(record.clone())))
        .await;
    assert_eq!(
        within("the record", opened.records.recv()).await,
        Some(record)
    );
    opened.watched.store(false, Ordering::Relaxed);
    assert_eq!(opened.agent.recv().await, ClientMessage::WatchRoutes(false));
    drop(opened.session);
}

#[tokio::test]
async fn an_agent_without_the_tag_is_never_asked() {
    let mut opened = open(graft_protocol::PROTOCOL_VERSION.to_owned()).await;
    opened.watched.store(true, Ordering::Relaxed);
    let asked = tokio::time::timeout(ROUTES_POLL * 5 + Duration::from_millis(200), async {
        loop {
            if let ClientMessage::WatchRoutes(_) = opened.agent.recv().await {
                return;
            }
        }
    })
    .await;
    assert!(
        asked.is_err(),
        "an agent that cannot read WatchRoutes got it"
    );
}
