//! The public flow API (`Session::connect_tcp`, `connect_udp`, `steal` with a
//! `Delivery`) against the scripted fake agent: what front ends without the layer
//! (a user-space stack, port-forward, intercept) build on.

mod support;

use std::net::SocketAddr;

use graft_protocol::{
    ConnectionId, Transport,
    incoming::{IncomingMode, SubscribeError},
    link::{AgentMessage, ClientMessage},
};
use graft_proxy::{Delivery, ProxyError};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};

use support::*;

/// Answers the proxy's next `Connect` with `Connected` and returns its id.
async fn accept_connect(
    agent: &mut FakeAgent,
    want: SocketAddr,
    transport: Transport,
) -> ConnectionId {
    match agent.recv().await {
        ClientMessage::Connect {
            conn,
            remote,
            transport: t,
        } => {
            assert_eq!(remote, want);
            assert_eq!(t, transport);
            agent
                .send(AgentMessage::Connected {
                    conn,
                    local: "198.18.0.1:40000".parse().unwrap(),
                })
                .await;
            conn
        }
        other => panic!("expected Connect, got {other:?}"),
    }
}

#[tokio::test]
async fn outgoing_tcp_splices_a_local_stream_both_ways() {
    let (session, mut agent) = open_session(test_options()).await;
    let remote: SocketAddr = "198.18.0.2:80".parse().unwrap();
    let (opened, conn) = tokio::join!(
        session.connect_tcp(remote),
        accept_connect(&mut agent, remote, Transport::Tcp)
    );
    let outgoing = opened.expect("the agent connected");
    assert_eq!(outgoing.local_addr(), "198.18.0.1:40000".parse().unwrap());

    let (mut program, graft_side) = tokio::io::duplex(1 << 16);
    tokio::spawn(outgoing.splice(graft_side));
    program.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    assert_eq!(
        agent.recv().await,
        ClientMessage::Data {
            conn,
            bytes: b"GET / HTTP/1.0\r\n\r\n".to_vec()
        }
    );
    agent
        .send(AgentMessage::Data {
            conn,
            bytes: b"HTTP/1.0 200 OK\r\n\r\nhi".to_vec(),
        })
        .await;
    agent.send(AgentMessage::Shutdown { conn }).await;
    let mut reply = Vec::new();
    within("the reply", program.read_to_end(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply, b"HTTP/1.0 200 OK\r\n\r\nhi");
    // The program's EOF becomes a FIN in the target, then the clean close.
    program.shutdown().await.unwrap();
    assert_eq!(agent.recv().await, ClientMessage::Shutdown { conn });
    assert_eq!(
        agent.recv().await,
        ClientMessage::Close { conn, reset: false }
    );
}

#[tokio::test]
async fn a_refused_outgoing_connection_carries_the_targets_errno() {
    let (session, mut agent) = open_session(test_options()).await;
    let remote: SocketAddr = "198.18.0.2:81".parse().unwrap();
    let agent_side = async {
        match agent.recv().await {
            ClientMessage::Connect { conn, .. } => {
                agent
                    .send(AgentMessage::ConnectFailed {
                        conn,
                        errno: libc::ECONNREFUSED,
                    })
                    .await;
            }
            other => panic!("expected Connect, got {other:?}"),
        }
    };
    let (opened, ()) = tokio::join!(session.connect_tcp(remote), agent_side);
    match opened {
        Err(ProxyError::Connect {
            remote: r, errno, ..
        }) => {
            assert_eq!(r, remote);
            assert_eq!(errno, libc::ECONNREFUSED);
        }
        other => panic!("expected a Connect error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_outgoing_connection_dropped_unspliced_is_reset() {
    let (session, mut agent) = open_session(test_options()).await;
    let remote: SocketAddr = "198.18.0.2:80".parse().unwrap();
    let (opened, conn) = tokio::join!(
        session.connect_tcp(remote),
        accept_connect(&mut agent, remote, Transport::Tcp)
    );
    drop(opened.unwrap());
    assert_eq!(
        agent.recv().await,
        ClientMessage::Close { conn, reset: true }
    );
}

#[tokio::test]
async fn outgoing_udp_sends_and_receives_datagrams() {
    let (session, mut agent) = open_session(test_options()).await;
    let remote: SocketAddr = "198.18.0.2:53".parse().unwrap();
    let (opened, conn) = tokio::join!(
        session.connect_udp(remote),
        accept_connect(&mut agent, remote, Transport::Udp)
    );
    let mut flow = opened.unwrap();
    flow.send(b"query").await.unwrap();
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
    assert_eq!(within("a datagram", flow.recv()).await.unwrap(), b"answer");
    agent.send(AgentMessage::Close { conn, reset: false }).await;
    assert_eq!(within("the end of the flow", flow.recv()).await, None);
}

#[tokio::test]
async fn stolen_connections_arrive_on_the_callers_channel() {
    let (session, mut agent) = open_session(test_options()).await;
    let (deliveries, mut incoming) = mpsc::channel(4);
    let agent_side = async {
        match agent.recv().await {
            ClientMessage::Subscribe(sub) => {
                assert_eq!(sub.port, 8080);
                assert_eq!(sub.mode, IncomingMode::Steal);
                agent
                    .send(AgentMessage::SubscribeResult {
                        port: 8080,
                        error: None,
                    })
                    .await;
            }
            other => panic!("expected Subscribe, got {other:?}"),
        }
    };
    let (stolen, ()) = tokio::join!(
        session.steal(8080, Delivery::Channel(deliveries)),
        agent_side
    );
    stolen.expect("the agent steals the port");

    let conn = ConnectionId(ConnectionId::AGENT_BIT | 1);
    let client: SocketAddr = "198.18.0.9:40001".parse().unwrap();
    let original: SocketAddr = "198.18.0.1:8080".parse().unwrap();
    agent
        .send(AgentMessage::Incoming {
            conn,
            port: 8080,
            peer: client,
            local: original,
        })
        .await;
    agent
        .send(AgentMessage::Data {
            conn,
            bytes: b"ping".to_vec(),
        })
        .await;
    let connection = within("an incoming connection", incoming.recv())
        .await
        .unwrap();
    assert_eq!(connection.port(), 8080);
    assert_eq!(connection.peer().peer, client);
    assert_eq!(connection.peer().local, original);
    let (mut program, graft_side) = tokio::io::duplex(1 << 16);
    tokio::spawn(connection.splice(graft_side));
    let mut got = [0u8; 4];
    within("the stolen bytes", program.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"ping");
    program.write_all(b"pong").await.unwrap();
    assert_eq!(
        agent.recv().await,
        ClientMessage::Data {
            conn,
            bytes: b"pong".to_vec()
        }
    );

    // A connection the caller drops without splicing is reset.
    let second = ConnectionId(ConnectionId::AGENT_BIT | 2);
    agent
        .send(AgentMessage::Incoming {
            conn: second,
            port: 8080,
            peer: client,
            local: original,
        })
        .await;
    drop(
        within("a second connection", incoming.recv())
            .await
            .unwrap(),
    );
    assert_eq!(
        agent.recv().await,
        ClientMessage::Close {
            conn: second,
            reset: true
        }
    );

    // Releasing the port unsubscribes it.
    session.release(8080).await;
    assert_eq!(
        agent.recv().await,
        ClientMessage::Unsubscribe { port: 8080 }
    );
}

#[tokio::test]
async fn a_refused_steal_is_a_subscribe_error_with_the_agents_reason() {
    let (session, mut agent) = open_session(test_options()).await;
    let (deliveries, _incoming) = mpsc::channel(1);
    let agent_side = async {
        match agent.recv().await {
            ClientMessage::Subscribe(_) => {
                agent
                    .send(AgentMessage::SubscribeResult {
                        port: 9090,
                        error: Some(SubscribeError::PortInUse {
                            port: 9090,
                            holder: "bob@other-laptop".into(),
                            since_unix: 0,
                        }),
                    })
                    .await;
            }
            other => panic!("expected Subscribe, got {other:?}"),
        }
    };
    let (stolen, ()) = tokio::join!(
        session.steal(9090, Delivery::Channel(deliveries)),
        agent_side
    );
    match stolen {
        Err(ProxyError::Subscribe { port, message }) => {
            assert_eq!(port, 9090);
            assert!(message.contains("already stolen"), "{message}");
        }
        other => panic!("expected a Subscribe error, got {other:?}"),
    }
}
