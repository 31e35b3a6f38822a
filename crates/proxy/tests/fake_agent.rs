//! The proxy against a scripted fake agent on an in-memory link, with real layer
//! connections on a Unix socket and real TCP/UDP sockets on loopback.

use std::{
    io::ErrorKind,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use graft_protocol::incoming::{IncomingMode, SubscribeError, Subscription};
use graft_protocol::{
    ConnectionId, PROTOCOL_VERSION, Transport,
    codec::FrameCodec,
    layer::{DeliveredPeer, LayerRequest, LayerResponse},
    link::{AgentMessage, ClientMessage, HelloReply},
    remote::{RemoteRequest, RemoteResponse},
};
use graft_proxy::{LinkEnd, Session, SessionOptions};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket, UnixStream},
};
use tokio_util::codec::Framed;

mod support;

use support::*;

type LayerLink = Framed<UnixStream, FrameCodec<LayerResponse, LayerRequest>>;

/// A layer connection that has said Hello.
async fn layer(path: &Path) -> LayerLink {
    let stream = UnixStream::connect(path).await.unwrap();
    let mut link = Framed::new(stream, FrameCodec::new());
    link.send(LayerRequest::Hello {
        version: PROTOCOL_VERSION.into(),
        pid: std::process::id(),
    })
    .await
    .unwrap();
    match within("the layer Hello", link.next()).await {
        Some(Ok(LayerResponse::Hello { version })) => assert_eq!(version, PROTOCOL_VERSION),
        other => panic!("expected Hello, got {other:?}"),
    }
    link
}

async fn ask(link: &mut LayerLink, request: LayerRequest) -> LayerResponse {
    link.send(request).await.unwrap();
    within("a layer response", link.next())
        .await
        .expect("the proxy closed the layer connection")
        .expect("a valid frame")
}

async fn serve(session: &Session, scratch: &Scratch) -> PathBuf {
    let path = scratch.path("layer.sock");
    session.serve_layer(&path).unwrap();
    path
}

#[tokio::test]
async fn handshake_accepted_reports_the_agent() {
    let (session, _agent) = open_session(test_options()).await;
    assert_eq!(session.agent().target_pid, 42);
    assert_eq!(session.agent().version, PROTOCOL_VERSION);
}

#[tokio::test]
async fn handshake_rejected_carries_the_agents_reason() {
    let (session, _agent) = session_with(
        HelloReply::Rejected {
            reason: "wrong session secret".into(),
        },
        test_options(),
    )
    .await;
    let err = session.unwrap_err();
    assert!(err.is_rejected(), "{err:?}");
    assert!(err.to_string().contains("wrong session secret"), "{err}");
}

#[tokio::test]
async fn handshake_with_another_version_names_both() {
    let (session, _agent) = session_with(
        HelloReply::Accepted {
            version: "7.0.0".into(),
            target_pid: 1,
        },
        test_options(),
    )
    .await;
    let err = session.unwrap_err().to_string();
    assert!(
        err.contains("7.0.0") && err.contains(PROTOCOL_VERSION),
        "{err}"
    );
}

#[tokio::test]
async fn remote_request_round_trips() {
    let (session, mut agent) = open_session(test_options()).await;
    let agent_side = async {
        match agent.recv().await {
            ClientMessage::Request {
                id,
                request: RemoteRequest::Env,
            } => {
                agent
                    .send(AgentMessage::Response {
                        id,
                        response: RemoteResponse::Env(vec![("A".into(), "1".into())]),
                    })
                    .await
            }
            other => panic!("expected an Env request, got {other:?}"),
        }
    };
    let (response, ()) = tokio::join!(session.remote(RemoteRequest::Env), agent_side);
    assert_eq!(
        response.unwrap(),
        RemoteResponse::Env(vec![("A".into(), "1".into())])
    );
}

#[tokio::test]
async fn layer_requests_from_many_connections_are_in_flight_at_once() {
    let scratch = Scratch::new("inflight");
    let (session, mut agent) = open_session(test_options()).await;
    let path = serve(&session, &scratch).await;
    let mut first = layer(&path).await;
    let mut second = layer(&path).await;
    let stat = |p: &str| LayerRequest::Remote(RemoteRequest::ReadLink { path: p.into() });
    first.send(stat("/a")).await.unwrap();
    second.send(stat("/b")).await.unwrap();
    // Both requests reach the agent before it answers either; answer in reverse.
    let mut ids = Vec::new();
    for _ in 0..2 {
        match agent.recv().await {
            ClientMessage::Request {
                id,
                request: RemoteRequest::ReadLink { path },
            } => ids.push((id, path)),
            other => panic!("unexpected {other:?}"),
        }
    }
    for (id, path) in ids.into_iter().rev() {
        agent
            .send(AgentMessage::Response {
                id,
                response: RemoteResponse::Link(format!("{path}-target")),
            })
            .await;
    }
    for (link, want) in [(&mut first, "/a-target"), (&mut second, "/b-target")] {
        match within("a response", link.next()).await {
            Some(Ok(LayerResponse::Remote(RemoteResponse::Link(got)))) => assert_eq!(got, want),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn garbage_frame_closes_only_that_layer_connection() {
    let scratch = Scratch::new("garbage");
    let (session, mut agent) = open_session(test_options()).await;
    let path = serve(&session, &scratch).await;
    let mut good = layer(&path).await;

    for garbage in [
        vec![0, 0, 0, 3, 0xff, 0xff, 0xff],
        (u32::MAX).to_be_bytes().to_vec(),
    ] {
        let mut bad = UnixStream::connect(&path).await.unwrap();
        bad.write_all(&garbage).await.unwrap();
        let mut rest = Vec::new();
        let n = within("the bad connection to close", bad.read_to_end(&mut rest))
            .await
            .unwrap();
        assert_eq!(n, 0, "the proxy answered garbage");
    }

    // After Hello too.
    let mut bad = layer(&path).await.into_inner();
    bad.write_all(&[0, 0, 0, 2, 0xff, 0xff]).await.unwrap();
    let mut rest = Vec::new();
    within("the bad connection to close", bad.read_to_end(&mut rest))
        .await
        .unwrap();

    // The session and the other layer connection carry on.
    let request = ask(
        &mut good,
        LayerRequest::Remote(RemoteRequest::Access {
            path: "/x".into(),
            mode: 0,
        }),
    );
    let agent_side = async {
        let ClientMessage::Request { id, .. } = agent.recv().await else {
            panic!("expected a request")
        };
        agent
            .send(AgentMessage::Response {
                id,
                response: RemoteResponse::Done,
            })
            .await;
    };
    let (response, ()) = tokio::join!(request, agent_side);
    assert_eq!(response, LayerResponse::Remote(RemoteResponse::Done));
}

#[tokio::test]
async fn layer_of_another_version_is_refused() {
    let scratch = Scratch::new("layer-version");
    let (session, _agent) = open_session(test_options()).await;
    let path = serve(&session, &scratch).await;
    let mut link: LayerLink =
        Framed::new(UnixStream::connect(&path).await.unwrap(), FrameCodec::new());
    link.send(LayerRequest::Hello {
        version: "9.0.0".into(),
        pid: 1,
    })
    .await
    .unwrap();
    match within("the refusal", link.next()).await {
        Some(Ok(LayerResponse::Error { message, .. })) => {
            assert!(message.contains("9.0.0"), "{message}")
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Asks for an outgoing TCP connection; the agent accepts it. Returns the
/// program's socket (connected to the relay), the connection id and the fake
/// target-side address.
async fn outgoing_tcp(link: &mut LayerLink, agent: &mut FakeAgent) -> (TcpStream, ConnectionId) {
    let remote: SocketAddr = "198.18.0.7:5432".parse().unwrap();
    let target_local: SocketAddr = "198.18.0.1:40000".parse().unwrap();
    let request = ask(
        link,
        LayerRequest::Connect {
            remote,
            transport: Transport::Tcp,
        },
    );
    let agent_side = async {
        match agent.recv().await {
            ClientMessage::Connect {
                conn,
                remote: asked,
                transport: Transport::Tcp,
            } => {
                assert_eq!(asked, remote);
                assert!(!conn.is_from_agent());
                agent
                    .send(AgentMessage::Connected {
                        conn,
                        local: target_local,
                    })
                    .await;
                conn
            }
            other => panic!("expected Connect, got {other:?}"),
        }
    };
    let (response, conn) = tokio::join!(request, agent_side);
    let LayerResponse::Connected { relay, local } = response else {
        panic!("expected Connected, got {response:?}")
    };
    assert_eq!(local, target_local);
    assert!(relay.ip().is_loopback());
    let program = TcpStream::connect(relay).await.unwrap();
    (program, conn)
}

async fn expect_data(agent: &mut FakeAgent, conn: ConnectionId, want: &[u8]) {
    let mut got = Vec::new();
    while got.len() < want.len() {
        match agent.recv().await {
            ClientMessage::Data { conn: c, bytes } if c == conn => got.extend(bytes),
            other => panic!("expected Data, got {other:?}"),
        }
    }
    assert_eq!(got, want);
}

async fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    within("bytes on the local socket", stream.read_exact(&mut buf))
        .await
        .unwrap();
    buf
}

#[tokio::test]
async fn outgoing_tcp_relays_both_ways_and_half_closes() {
    let scratch = Scratch::new("tcp");
    let (session, mut agent) = open_session(test_options()).await;
    let path = serve(&session, &scratch).await;
    let mut link = layer(&path).await;
    let (mut program, conn) = outgoing_tcp(&mut link, &mut agent).await;

    program.write_all(b"hello").await.unwrap();
    expect_data(&mut agent, conn, b"hello").await;
    agent
        .send(AgentMessage::Data {
            conn,
            bytes: b"world".to_vec(),
        })
        .await;
    assert_eq!(read_exactly(&mut program, 5).await, b"world");

    // A large transfer arrives whole and in order.
    let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    program.write_all(&big).await.unwrap();
    expect_data(&mut agent, conn, &big).await;

    // The program half-closes; it can still read.
    program.shutdown().await.unwrap();
    assert_eq!(agent.recv().await, ClientMessage::Shutdown { conn });
    agent
        .send(AgentMessage::Data {
            conn,
            bytes: b"late".to_vec(),
        })
        .await;
    assert_eq!(read_exactly(&mut program, 4).await, b"late");
    // The target side half-closes too: EOF for the program, orderly Close for the agent.
    agent.send(AgentMessage::Shutdown { conn }).await;
    let mut rest = Vec::new();
    within("EOF", program.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
    assert_eq!(
        agent.recv().await,
        ClientMessage::Close { conn, reset: false }
    );
}

#[tokio::test]
async fn resets_propagate_both_ways() {
    let scratch = Scratch::new("reset");
    let (session, mut agent) = open_session(test_options()).await;
    let path = serve(&session, &scratch).await;
    let mut link = layer(&path).await;

    // The target side resets: the program sees ECONNRESET.
    let (mut program, conn) = outgoing_tcp(&mut link, &mut agent).await;
    agent.send(AgentMessage::Close { conn, reset: true }).await;
    let mut buf = [0u8; 16];
    let err = within("the reset", program.read(&mut buf))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);

    // The program resets: the agent is told to reset.
    let (program, conn) = outgoing_tcp(&mut link, &mut agent).await;
    program.set_zero_linger().unwrap();
    drop(program);
    assert_eq!(
        agent.recv().await,
        ClientMessage::Close { conn, reset: true }
    );
}

#[tokio::test]
async fn failed_remote_connect_returns_its_errno() {
    let scratch = Scratch::new("refused");
    let (session, mut agent) = open_session(test_options()).await;
    let path = serve(&session, &scratch).await;
    let mut link = layer(&path).await;
    let request = ask(
        &mut link,
        LayerRequest::Connect {
            remote: "198.18.0.7:1".parse().unwrap(),
            transport: Transport::Tcp,
        },
    );
    let agent_side = async {
        let ClientMessage::Connect { conn, .. } = agent.recv().await else {
            panic!("expected Connect")
        };
        agent
            .send(AgentMessage::ConnectFailed {
                conn,
                errno: libc::ECONNREFUSED,
            })
            .await;
    };
    let (response, ()) = tokio::join!(request, agent_side);
    assert!(
        matches!(response, LayerResponse::Error { errno, .. } if errno == libc::ECONNREFUSED),
        "{response:?}"
    );
}

#[tokio::test]
async fn outgoing_udp_relays_datagrams() {
    let scratch = Scratch::new("udp");
    let (session, mut agent) = open_session(test_options()).await;
    let path = serve(&session, &scratch).await;
    let mut link = layer(&path).await;
    let request = ask(
        &mut link,
        LayerRequest::Connect {
            remote: "198.18.0.7:53".parse().unwrap(),
            transport: Transport::Udp,
        },
    );
    let agent_side = async {
        let ClientMessage::Connect {
            conn,
            transport: Transport::Udp,
            ..
        } = agent.recv().await
        else {
            panic!("expected a UDP Connect")
        };
        agent
            .send(AgentMessage::Connected {
                conn,
                local: "198.18.0.1:5000".parse().unwrap(),
            })
            .await;
        conn
    };
    let (response, conn) = tokio::join!(request, agent_side);
    let LayerResponse::Connected { relay, .. } = response else {
        panic!("expected Connected, got {response:?}")
    };
    let program = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    program.send_to(b"query", relay).await.unwrap();
    assert_eq!(
        agent.recv().await,
        ClientMessage::Data {
            conn,
            bytes: b"query".to_vec()
        }
    );
    agent
        .send(AgentMessage::Data {
            conn,
            bytes: b"answer".to_vec(),
        })
        .await;
    let mut buf = [0u8; 64];
    let (n, from) = within("the answer", program.recv_from(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf[..n], b"answer");
    assert_eq!(from, relay);
}

/// Subscribes `port` for delivery to `deliver_to`, the agent accepting the steal.
async fn steal(link: &mut LayerLink, agent: &mut FakeAgent, port: u16, deliver_to: SocketAddr) {
    let request = ask(
        link,
        LayerRequest::Listen {
            port,
            deliver_to,
            pid: std::process::id(),
        },
    );
    let agent_side = async {
        assert_eq!(
            agent.recv().await,
            ClientMessage::Subscribe(Subscription {
                port,
                mode: IncomingMode::Steal,
                filter: None,
                responses: false,
            })
        );
        agent
            .send(AgentMessage::SubscribeResult { port, error: None })
            .await;
    };
    let (response, ()) = tokio::join!(request, agent_side);
    assert_eq!(response, LayerResponse::Ok);
}

#[tokio::test]
async fn incoming_connection_is_delivered_and_its_peer_answered() {
    let scratch = Scratch::new("incoming");
    let (session, mut agent) = open_session(test_options()).await;
    let path = serve(&session, &scratch).await;
    let mut link = layer(&path).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // The program listens on 0.0.0.0: the proxy delivers on loopback.
    steal(
        &mut link,
        &mut agent,
        80,
        SocketAddr::from(([0, 0, 0, 0], port)),
    )
    .await;

    // A second Listen on the same port only updates the subscription.
    let again = ask(
        &mut link,
        LayerRequest::Listen {
            port: 80,
            deliver_to: SocketAddr::from(([0, 0, 0, 0], port)),
            pid: std::process::id(),
        },
    )
    .await;
    assert_eq!(again, LayerResponse::Ok);

    let conn = ConnectionId(ConnectionId::AGENT_BIT | 1);
    let client: SocketAddr = "198.18.0.9:40001".parse().unwrap();
    let original: SocketAddr = "198.18.0.1:80".parse().unwrap();
    agent
        .send(AgentMessage::Incoming {
            conn,
            port: 80,
            peer: client,
            local: original,
        })
        .await;
    agent
        .send(AgentMessage::Data {
            conn,
            bytes: b"GET /".to_vec(),
        })
        .await;
    let (mut accepted, proxy_side) = within("the delivered connection", listener.accept())
        .await
        .unwrap();
    assert_eq!(read_exactly(&mut accepted, 5).await, b"GET /");
    assert_eq!(
        ask(&mut link, LayerRequest::PeerOf { proxy_side }).await,
        LayerResponse::Peer(Some(DeliveredPeer {
            peer: client,
            local: original
        }))
    );
    let unknown = "127.0.0.1:1".parse().unwrap();
    assert_eq!(
        ask(
            &mut link,
            LayerRequest::PeerOf {
                proxy_side: unknown
            }
        )
        .await,
        LayerResponse::Peer(None)
    );

    accepted.write_all(b"200 OK").await.unwrap();
    expect_data(&mut agent, conn, b"200 OK").await;

    // An incoming connection for a port nobody listens on is reset.
    let stray = ConnectionId(ConnectionId::AGENT_BIT | 2);
    agent
        .send(AgentMessage::Incoming {
            conn: stray,
            port: 81,
            peer: client,
            local: original,
        })
        .await;
    assert_eq!(
        agent.recv().await,
        ClientMessage::Close {
            conn: stray,
            reset: true
        }
    );

    // Unlisten from the owner stops the steal.
    assert_eq!(
        ask(
            &mut link,
            LayerRequest::Unlisten {
                port: 80,
                pid: std::process::id()
            }
        )
        .await,
        LayerResponse::Ok
    );
    assert_eq!(agent.recv().await, ClientMessage::Unsubscribe { port: 80 });
}

#[tokio::test]
async fn refused_steal_is_eaddrinuse() {
    let scratch = Scratch::new("steal-refused");
    let (session, mut agent) = open_session(test_options()).await;
    let path = serve(&session, &scratch).await;
    let mut link = layer(&path).await;
    let request = ask(
        &mut link,
        LayerRequest::Listen {
            port: 80,
            deliver_to: "127.0.0.1:8080".parse().unwrap(),
            pid: std::process::id(),
        },
    );
    let agent_side = async {
        assert_eq!(
            agent.recv().await,
            ClientMessage::Subscribe(Subscription {
                port: 80,
                mode: IncomingMode::Steal,
                filter: None,
                responses: false,
            })
        );
        agent
            .send(AgentMessage::SubscribeResult {
                port: 80,
                error: Some(SubscribeError::PortInUse {
                    port: 80,
                    holder: "bob@other-laptop".into(),
                    since_unix: 0,
                }),
            })
            .await;
    };
    let (response, ()) = tokio::join!(request, agent_side);
    assert!(
        matches!(&response, LayerResponse::Error { errno, message } if *errno == libc::EADDRINUSE && message.contains("bob@other-laptop")),
        "{response:?}"
    );
}

#[tokio::test]
async fn steal_of_a_dead_owner_is_dropped() {
    let scratch = Scratch::new("dead-owner");
    let options = SessionOptions {
        owner_check_interval: Duration::from_millis(50),
        ..test_options()
    };
    let (session, mut agent) = open_session(options).await;
    let path = serve(&session, &scratch).await;
    let mut link = layer(&path).await;
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let request = ask(
        &mut link,
        LayerRequest::Listen {
            port: 8000,
            deliver_to: "127.0.0.1:8000".parse().unwrap(),
            pid: dead_pid,
        },
    );
    let agent_side = async {
        assert_eq!(
            agent.recv().await,
            ClientMessage::Subscribe(Subscription {
                port: 8000,
                mode: IncomingMode::Steal,
                filter: None,
                responses: false,
            })
        );
        agent
            .send(AgentMessage::SubscribeResult {
                port: 8000,
                error: None,
            })
            .await;
    };
    let (response, ()) = tokio::join!(request, agent_side);
    assert_eq!(response, LayerResponse::Ok);
    assert_eq!(
        agent.recv().await,
        ClientMessage::Unsubscribe { port: 8000 }
    );
}

#[tokio::test]
async fn link_death_resets_local_connections_and_fails_requests() {
    let scratch = Scratch::new("death");
    let (session, mut agent) = open_session(test_options()).await;
    let path = serve(&session, &scratch).await;
    let mut link = layer(&path).await;
    let (mut program, _conn) = outgoing_tcp(&mut link, &mut agent).await;
    let closed = session.closed();

    // A request in flight when the link dies.
    let mut waiting = layer(&path).await;
    waiting
        .send(LayerRequest::Remote(RemoteRequest::Env))
        .await
        .unwrap();
    assert!(matches!(
        agent.recv().await,
        ClientMessage::Request {
            request: RemoteRequest::Env,
            ..
        }
    ));

    drop(agent);
    assert_eq!(within("the link end", closed).await, LinkEnd::AgentClosed);
    let mut buf = [0u8; 16];
    let err = within("the reset", program.read(&mut buf))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    match within("the aborted request", waiting.next()).await {
        Some(Ok(LayerResponse::Error { errno, .. })) => assert_eq!(errno, libc::ECONNABORTED),
        other => panic!("expected an error, got {other:?}"),
    }
    // New requests fail fast too.
    match ask(&mut link, LayerRequest::Remote(RemoteRequest::Env)).await {
        LayerResponse::Error { errno, .. } => assert_eq!(errno, libc::ECONNABORTED),
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(
        session
            .remote(RemoteRequest::Env)
            .await
            .unwrap_err()
            .is_link_closed()
    );
}

#[tokio::test]
async fn silent_agent_is_declared_dead() {
    let options = SessionOptions {
        ping_interval: Duration::from_millis(50),
        dead_after: Duration::from_millis(300),
        ..test_options()
    };
    let (session, mut agent) = open_session(options).await;
    // The agent reads the pings but never answers.
    let drain = tokio::spawn(async move { while agent.link.next().await.is_some() {} });
    let end = within("the keepalive timeout", session.closed()).await;
    assert!(matches!(end, LinkEnd::Timeout(_)), "{end:?}");
    drop(session);
    within("the link to close", drain).await.unwrap();
}

#[tokio::test]
async fn close_shuts_the_link() {
    let (session, mut agent) = open_session(test_options()).await;
    within("close", session.close()).await;
    loop {
        match within("EOF on the link", agent.link.next()).await {
            None => break,
            Some(Ok(ClientMessage::Ping(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn fatal_message_ends_the_link_with_its_reason() {
    let (session, mut agent) = open_session(test_options()).await;
    agent
        .send(AgentMessage::Fatal {
            message: "the target exited".into(),
        })
        .await;
    assert_eq!(
        within("the link end", session.closed()).await,
        LinkEnd::Fatal("the target exited".into())
    );
}

#[tokio::test]
async fn secondary_sessions_subscribe_and_deliver_to_the_same_listener() {
    // --all-pods: the program's one listener gets the traffic of both pods.
    let scratch = Scratch::new("secondary");
    let (session, mut agent) = open_session(test_options()).await;
    let (secondary, mut other) = open_session(test_options()).await;
    session.add_secondary(&secondary);
    let path = serve(&session, &scratch).await;
    let mut link = layer(&path).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let deliver_to = listener.local_addr().unwrap();

    let request = ask(
        &mut link,
        LayerRequest::Listen {
            port: 80,
            deliver_to,
            pid: std::process::id(),
        },
    );
    let subscription = ClientMessage::Subscribe(Subscription {
        port: 80,
        mode: IncomingMode::Steal,
        filter: None,
        responses: false,
    });
    let agents = async {
        assert_eq!(agent.recv().await, subscription);
        agent
            .send(AgentMessage::SubscribeResult {
                port: 80,
                error: None,
            })
            .await;
        // The secondary is asked once the primary said yes.
        assert_eq!(other.recv().await, subscription);
        other
            .send(AgentMessage::SubscribeResult {
                port: 80,
                error: None,
            })
            .await;
    };
    let (response, ()) = tokio::join!(request, agents);
    assert_eq!(response, LayerResponse::Ok);

    // A connection stolen on the other pod reaches the same listener, and the
    // program learns its real peer.
    let conn = ConnectionId(ConnectionId::AGENT_BIT | 1);
    let client: SocketAddr = "198.18.0.9:40002".parse().unwrap();
    let original: SocketAddr = "198.18.0.77:80".parse().unwrap();
    other
        .send(AgentMessage::Incoming {
            conn,
            port: 80,
            peer: client,
            local: original,
        })
        .await;
    other
        .send(AgentMessage::Data {
            conn,
            bytes: b"GET /b".to_vec(),
        })
        .await;
    let (mut accepted, proxy_side) = within("the other pod's connection", listener.accept())
        .await
        .unwrap();
    assert_eq!(read_exactly(&mut accepted, 6).await, b"GET /b");
    assert_eq!(
        ask(&mut link, LayerRequest::PeerOf { proxy_side }).await,
        LayerResponse::Peer(Some(DeliveredPeer {
            peer: client,
            local: original
        }))
    );
    accepted.write_all(b"from b").await.unwrap();
    expect_data(&mut other, conn, b"from b").await;

    // Closing the listener releases the port on both pods.
    assert_eq!(
        ask(
            &mut link,
            LayerRequest::Unlisten {
                port: 80,
                pid: std::process::id()
            }
        )
        .await,
        LayerResponse::Ok
    );
    assert_eq!(agent.recv().await, ClientMessage::Unsubscribe { port: 80 });
    assert_eq!(other.recv().await, ClientMessage::Unsubscribe { port: 80 });
}

/// Counts the `Data` bytes of `conn` the proxy sends until it is quiet for
/// 500 ms; panics on anything else but pings.
async fn data_until_quiet(agent: &mut FakeAgent, conn: ConnectionId) -> usize {
    let mut got = 0;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), agent.link.next()).await {
            Ok(Some(Ok(ClientMessage::Data { conn: c, bytes }))) if c == conn => got += bytes.len(),
            Ok(Some(Ok(ClientMessage::Ping(_)))) => {}
            Ok(other) => panic!("expected Data, got {other:?}"),
            Err(_) => return got,
        }
    }
}

#[tokio::test]
async fn a_program_sends_no_more_than_the_agents_credit() {
    let scratch = Scratch::new("credit");
    let (session, mut agent) = open_session(test_options()).await;
    let path = serve(&session, &scratch).await;
    let mut link = layer(&path).await;
    let (program, conn) = outgoing_tcp(&mut link, &mut agent).await;
    // The program writes 8 MiB as fast as the proxy takes them.
    let (_rd, mut wr) = program.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![1u8; 64 * 1024];
        for _ in 0..128 {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let window = graft_protocol::link::TCP_WINDOW as usize;
    let first = data_until_quiet(&mut agent, conn).await;
    assert!(
        first > 0 && first <= window,
        "{first} bytes without credit; the window is {window}"
    );
    agent
        .send(AgentMessage::Credit {
            conn,
            bytes: 1 << 20,
        })
        .await;
    let more = data_until_quiet(&mut agent, conn).await;
    assert!(
        more > 0 && first + more <= window + (1 << 20),
        "{more} more bytes after 1 MiB of credit"
    );
    writer.abort();
}
